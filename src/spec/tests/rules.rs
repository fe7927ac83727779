//! One test per rule: document shape, cluster and nodes.

use super::*;

#[test]
fn rejects_wrong_api_version_before_unknown_fields() {
    assert_rejects(
        &(base().replace("ovl/v1", "ovl/v2") + "later: 1\n"),
        1,
        13,
        "unsupported apiVersion `ovl/v2`",
    );
}

#[test]
fn rejects_missing_required_fields() {
    assert_rejects(
        &base().replace("apiVersion: ovl/v1\n", ""),
        1,
        1,
        "missing required field `apiVersion` in the spec",
    );
    assert_rejects(
        &base().replace("  name: demo\n", "  rotation: 1h\n"),
        3,
        3,
        "missing required field `name` in cluster",
    );
    assert_rejects(
        &base().replace("    address: 192.0.2.2\n", ""),
        8,
        5,
        "missing required field `address` in node",
    );
    assert_rejects(
        &with_network("").replace("    vni: 4097\n", ""),
        12,
        5,
        "missing required field `vni` in network",
    );
}

#[test]
fn rejects_null_values() {
    assert_rejects(
        &base().replace("name: demo", "name: ~"),
        3,
        9,
        "`name` is null",
    );
    assert_rejects(
        &base().replace("address: 192.0.2.2", "address: null"),
        9,
        14,
        "`address` is null",
    );
}

#[test]
fn rejects_unknown_fields_at_every_depth() {
    assert_rejects(&(base() + "extra: 1\n"), 11, 1, "unknown field `extra`");
    assert_rejects(
        &base().replace("  name: demo\n", "  name: demo\n  port: 1\n"),
        4,
        3,
        "unknown field `port`",
    );
    assert_rejects(&(base() + "    key: x\n"), 11, 5, "unknown field `key`");
    assert_rejects(
        &with_network("    encrypt: true\n"),
        14,
        5,
        "unknown field `encrypt`",
    );
}

#[test]
fn rejects_duplicate_keys() {
    assert_rejects(
        &with_network("    vni: 4098\n"),
        14,
        5,
        "duplicate mapping key `vni`",
    );
}

#[test]
fn rejects_yaml_syntax_errors() {
    assert_rejects("apiVersion: ovl/v1\ncluster:\n\tname: x\n", 3, 2, "tabs");
    assert_rejects("apiVersion: \"ovl/v1\n", 1, 13, "unclosed quote");
    assert_rejects(
        "apiVersion: ovl/v1\ncluster: {name: x\nnodes: []\n",
        3,
        6,
        "did not find expected",
    );
}

#[test]
fn rejects_wrong_types() {
    assert_rejects(
        &base().replace("cluster:\n  name: demo", "cluster: demo"),
        2,
        10,
        "expected a mapping",
    );
    assert_rejects(
        &base().replace("name: demo", "name: [demo]"),
        3,
        9,
        "expected a single value",
    );
    assert_rejects(
        "apiVersion: ovl/v1\ncluster: {name: x}\nnodes: {a: 1}\n",
        3,
        8,
        "expected a list",
    );
    assert_rejects(
        &with_network("    encrypted: yes\n"),
        14,
        16,
        "encrypted must be true or false, found the string `yes`",
    );
    assert_rejects(
        &with_network("").replace("vni: 4097", "vni: \"4097\""),
        13,
        10,
        "vni must be an integer in 1..=16777215, found the string `4097`",
    );
    assert_rejects(
        &with_network("").replace("vni: 4097", "vni: {a: 1}"),
        13,
        10,
        "found a mapping",
    );
    assert_rejects(
        &with_network("").replace("vni: 4097", "vni: 4097.0"),
        13,
        10,
        "not a plain integer",
    );
}

#[test]
fn rejects_out_of_range_vni() {
    assert_rejects(
        &with_network("").replace("4097", "0"),
        13,
        10,
        "vni 0 is out of range 1..=16777215",
    );
    assert_rejects(
        &with_network("").replace("4097", "16777216"),
        13,
        10,
        "vni 16777216 is out of range",
    );
    assert_rejects(
        &with_network("").replace("4097", "-1"),
        13,
        10,
        "vni -1 is out of range",
    );
    assert_rejects(
        &with_network("").replace("4097", "123456789012345678901234567890"),
        13,
        10,
        "vni is out of range 1..=16777215",
    );
}

#[test]
fn rejects_out_of_range_ports() {
    let cluster =
        |field: &str| base().replace("  name: demo\n", &format!("  name: demo\n{field}\n"));
    assert_rejects(
        &cluster("  controlPort: 0"),
        4,
        16,
        "controlPort 0 is out of range 1..=65535",
    );
    assert_rejects(
        &cluster("  dataPort: 65536"),
        4,
        13,
        "dataPort 65536 is out of range 1..=65535",
    );
    assert_rejects(
        &cluster("  encryptedDataPort: 99999999999999999999"),
        4,
        22,
        "encryptedDataPort is out of range",
    );
}

#[test]
fn rejects_equal_data_ports() {
    let yaml = base().replace(
        "  name: demo\n",
        "  name: demo\n  dataPort: 5000\n  encryptedDataPort: 5000\n",
    );
    assert_rejects(
        &yaml,
        5,
        22,
        "encryptedDataPort 5000 must differ from dataPort 5000",
    );
    // Only dataPort written: it collides with the default encrypted port.
    let yaml = base().replace("  name: demo\n", "  name: demo\n  dataPort: 4790\n");
    assert_rejects(&yaml, 4, 13, "must differ from dataPort 4790");
}

#[test]
fn rejects_bad_rotation() {
    let rotation = |r: &str| {
        base().replace(
            "  name: demo\n",
            &format!("  name: demo\n  rotation: {r}\n"),
        )
    };
    assert_rejects(&rotation("12 hours"), 4, 13, "invalid duration `12 hours`");
    assert_rejects(
        &rotation("9s"),
        4,
        13,
        "rotation `9s` is out of range: use 10s to 30d",
    );
    assert_rejects(
        &rotation("30d1s"),
        4,
        13,
        "rotation `30d1s` is out of range",
    );
}

#[test]
fn rejects_bad_names() {
    assert_rejects(
        &base().replace("name: node-b", "name: -b"),
        8,
        11,
        "invalid node name `-b`",
    );
    assert_rejects(
        &base().replace("name: demo", &format!("name: {}", "x".repeat(64))),
        3,
        9,
        "invalid cluster name",
    );
    assert_rejects(
        &with_network("").replace("name: frontend", "name: \"front end\""),
        12,
        11,
        "invalid network name `front end`",
    );
}

#[test]
fn rejects_no_nodes_and_too_many() {
    assert_rejects(
        "apiVersion: ovl/v1\ncluster: {name: c}\nnodes: []\n",
        3,
        8,
        "nodes is empty",
    );
    let mut yaml = "apiVersion: ovl/v1\ncluster: {name: c}\nnodes:\n".to_owned();
    for i in 0..=MAX_NODES {
        yaml.push_str(&format!(
            "  - {{name: n{i}, address: 10.{}.{}.1}}\n",
            i / 256,
            i % 256
        ));
    }
    assert_rejects(
        &yaml,
        4 + MAX_NODES as u64,
        5,
        "too many nodes: at most 4096",
    );
}

#[test]
fn rejects_duplicate_node_name() {
    assert_rejects(
        &base().replace("name: node-b", "name: node-a"),
        8,
        11,
        "duplicate node name `node-a` (first defined at line 5)",
    );
}

#[test]
fn rejects_duplicate_node_address() {
    assert_rejects(
        &base().replace("192.0.2.2", "192.0.2.1"),
        9,
        14,
        "duplicate node address 192.0.2.1: node `node-a` has it already (line 6)",
    );
}

#[test]
fn rejects_duplicate_public_key() {
    assert_rejects(
        &base().replace(KEY_B, KEY_A),
        10,
        16,
        "duplicate publicKey: node `node-a` has the same key (line 7)",
    );
}

#[test]
fn rejects_bad_node_addresses() {
    let addr = |a: &str| base().replace("192.0.2.2", a);
    assert_rejects(
        &addr("127.0.0.1"),
        9,
        14,
        "address 127.0.0.1 is a loopback address",
    );
    assert_rejects(&addr("::1"), 9, 14, "is a loopback address");
    assert_rejects(&addr("224.0.0.1"), 9, 14, "is a multicast address");
    assert_rejects(&addr("0.0.0.0"), 9, 14, "is unspecified");
    assert_rejects(&addr("255.255.255.255"), 9, 14, "is the broadcast address");
    assert_rejects(&addr("fe80::1"), 9, 14, "is link-local");
    assert_rejects(&addr("::ffff:192.0.2.9"), 9, 14, "IPv4-mapped");
    assert_rejects(
        &addr("192.0.2.2/24"),
        9,
        14,
        "invalid address `192.0.2.2/24`",
    );
    assert_rejects(
        &addr("node-b.example"),
        9,
        14,
        "invalid address `node-b.example`",
    );
}

#[test]
fn rejects_bad_public_key() {
    assert_rejects(
        &base().replace(KEY_B, "c2hvcnQ="),
        10,
        16,
        "invalid publicKey `c2hvcnQ=`",
    );
    // 44 characters but not valid base64.
    assert_rejects(
        &base().replace(KEY_B, &"!".repeat(44)),
        10,
        16,
        "invalid publicKey",
    );
}

#[test]
fn rekey_limits_default_and_bounds() {
    let spec = parse(base().as_bytes(), "t.yaml").unwrap();
    assert_eq!(spec.cluster.rekey_after_packets, DEFAULT_REKEY_PACKETS);
    assert_eq!(spec.cluster.rekey_after_bytes, DEFAULT_REKEY_BYTES);
    let set = base().replace(
        "  name: demo\n",
        "  name: demo\n  rekeyAfterPackets: 5000\n  rekeyAfterBytes: 1048576\n",
    );
    let spec = parse(set.as_bytes(), "t.yaml").unwrap();
    assert_eq!(
        (
            spec.cluster.rekey_after_packets,
            spec.cluster.rekey_after_bytes
        ),
        (5000, 1 << 20)
    );
    assert_rejects(
        &base().replace("  name: demo\n", "  name: demo\n  rekeyAfterPackets: 10\n"),
        4,
        22,
        "rekeyAfterPackets 10 is out of range 100..=1099511627776",
    );
    assert_rejects(
        &base().replace("  name: demo\n", "  name: demo\n  rekeyAfterBytes: lots\n"),
        4,
        20,
        "rekeyAfterBytes must be an integer",
    );
}
