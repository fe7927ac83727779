//! One test per rule: networks, membership and bridge addresses.

use super::*;

#[test]
fn rejects_duplicate_network_name() {
    assert_rejects(
        &with_network("  - name: frontend\n    vni: 4098\n"),
        14,
        11,
        "duplicate network name `frontend` (first defined at line 12)",
    );
}

#[test]
fn rejects_duplicate_vni() {
    assert_rejects(
        &with_network("  - name: backend\n    vni: 4097\n"),
        15,
        10,
        "duplicate vni 4097: network `frontend` uses it already (line 13)",
    );
}

#[test]
fn rejects_unknown_node_in_network() {
    assert_rejects(
        &with_network("    nodes: [node-a, node-x]\n"),
        14,
        21,
        "network `frontend` names unknown node `node-x`",
    );
}

#[test]
fn rejects_node_listed_twice() {
    assert_rejects(
        &with_network("    nodes:\n      - node-b\n      - node-b\n"),
        16,
        9,
        "lists node `node-b` twice (first at line 15)",
    );
}

#[test]
fn rejects_empty_node_list() {
    assert_rejects(
        &with_network("    nodes: []\n"),
        14,
        12,
        "network `frontend` lists no nodes",
    );
}

#[test]
fn rejects_missing_public_key_in_encrypted_network() {
    let yaml = base().replace(&format!("    publicKey: \"{KEY_B}\"\n"), "")
        + "networks:\n  - name: frontend\n    vni: 4097\n    encrypted: true\n";
    assert_rejects(
        &yaml,
        8,
        5,
        "node `node-b` has no publicKey but is a member of encrypted network `frontend`",
    );
    // Not a member: fine.
    let yaml = yaml + "    nodes: [node-a]\n";
    assert!(parse_str(&yaml).is_ok());
}

#[test]
fn rejects_mixed_address_families() {
    let nodes = base().replace("192.0.2.2", "2001:db8::2") + "networks:\n";
    assert_rejects(
        &(nodes.clone() + "  - name: all\n    vni: 1\n"),
        12,
        11,
        "network `all` mixes IPv4 and IPv6 underlay addresses",
    );
    assert_rejects(
        &(nodes.clone() + "  - name: two\n    vni: 1\n    nodes: [node-a, node-b]\n"),
        14,
        21,
        "mixes IPv4 and IPv6",
    );
    // One member of each family in separate networks is fine.
    let ok = nodes
        + "  - name: v4\n    vni: 1\n    nodes: [node-a]\n  - name: v6\n    vni: 2\n    nodes: [node-b]\n";
    assert!(parse_str(&ok).is_ok());
}

#[test]
fn rejects_bad_mtu() {
    assert_rejects(
        &with_network("    mtu: 67\n"),
        14,
        10,
        "mtu 67 is out of range 68..=65000",
    );
    assert_rejects(
        &with_network("    mtu: 65001\n"),
        14,
        10,
        "mtu 65001 is out of range 68..=65000",
    );
    assert_rejects(
        &with_network("    mtu: 1279\n    addresses: {node-a: fd00::1/64}\n"),
        14,
        10,
        "mtu 1279 is too small for network `frontend`, which has IPv6 addresses",
    );
    assert!(
        parse_str(&with_network(
            "    mtu: 68\n    addresses: {node-a: 10.0.0.1/24}\n"
        ))
        .is_ok()
    );
}

#[test]
fn rejects_address_of_non_member_or_unknown_node() {
    assert_rejects(
        &with_network("    addresses:\n      node-z: 10.10.0.9/24\n"),
        15,
        7,
        "name unknown node `node-z`",
    );
    assert_rejects(
        &with_network("    nodes: [node-a]\n    addresses:\n      node-b: 10.10.0.2/24\n"),
        16,
        7,
        "name node `node-b`, which is not a member of the network",
    );
}

#[test]
fn rejects_bad_bridge_addresses() {
    let addr = |a: &str| with_network(&format!("    addresses:\n      node-a: {a}\n"));
    assert_rejects(
        &addr("10.10.0.1"),
        15,
        15,
        "expected an address with a prefix length",
    );
    assert_rejects(
        &addr("10.10.0.1/0"),
        15,
        15,
        "prefix length /0 of 10.10.0.1/0 is not sensible for a network: use /8 to /30",
    );
    assert_rejects(&addr("10.10.0.1/31"), 15, 15, "use /8 to /30");
    assert_rejects(&addr("fd00::1/128"), 15, 15, "use /16 to /127");
    assert_rejects(
        &addr("10.10.0.0/24"),
        15,
        15,
        "the network address of its subnet",
    );
    assert_rejects(
        &addr("10.10.0.255/24"),
        15,
        15,
        "the broadcast address of its subnet",
    );
    assert_rejects(&addr("127.0.0.1/8"), 15, 15, "a loopback address");
    assert_rejects(&addr("239.1.1.1/24"), 15, 15, "a multicast address");
    assert_rejects(&addr("fd00::/64"), 15, 15, "subnet-router anycast");
}

#[test]
fn rejects_duplicate_bridge_address() {
    let yaml =
        with_network("    addresses:\n      node-a: 10.10.0.1/24\n      node-b: 10.10.0.1/24\n");
    assert_rejects(
        &yaml,
        16,
        15,
        "duplicate address 10.10.0.1 in network `frontend`: node `node-a` has it already (line 15)",
    );
}

#[test]
fn rejects_addresses_in_different_subnets() {
    let yaml =
        with_network("    addresses:\n      node-a: 10.10.0.1/24\n      node-b: 10.10.1.2/24\n");
    assert_rejects(
        &yaml,
        16,
        15,
        "address 10.10.1.2/24 of node `node-b` is not in subnet 10.10.0.0/24 of node `node-a`",
    );
    let yaml =
        with_network("    addresses:\n      node-a: 10.10.0.1/24\n      node-b: 10.10.0.2/25\n");
    assert_rejects(&yaml, 16, 15, "must share one subnet");
    let yaml =
        with_network("    addresses:\n      node-a: 10.10.0.1/24\n      node-b: fd00::2/64\n");
    assert_rejects(&yaml, 16, 15, "must share one subnet");
}
