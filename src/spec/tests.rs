//! Spec parser tests: the valid example, one test per rule (reason and location), the
//! CLI corpus in `integration/invalid/`, and property tests on hostile input.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use proptest::prelude::*;

use super::*;

const KEY_A: &str = "rvHYu4Fw9+56vSuMLNEFBC6cUBths1bValAqcZG7O8Q=";
const KEY_B: &str = "dxSm3e8CoAE5tI+TOwyyPSHQVCT5iWjgdwqjU1mRdJA=";

/// Lines 1-3: header and cluster; lines 4-10: two nodes with keys (name on lines 5 and 8,
/// address on 6 and 9, key on 7 and 10).
fn base() -> String {
    format!(
        "apiVersion: ovl/v1\n\
         cluster:\n  name: demo\n\
         nodes:\n\
         \x20 - name: node-a\n    address: 192.0.2.1\n    publicKey: \"{KEY_A}\"\n\
         \x20 - name: node-b\n    address: 192.0.2.2\n    publicKey: \"{KEY_B}\"\n"
    )
}

/// `base()` then `networks:` on line 11, a network `frontend` (name 12:11, vni 13:10)
/// and `extra` from line 14.
fn with_network(extra: &str) -> String {
    format!(
        "{}networks:\n  - name: frontend\n    vni: 4097\n{extra}",
        base()
    )
}

fn parse_str(yaml: &str) -> Result<Spec, SpecError> {
    parse(yaml.as_bytes(), "test.yaml")
}

#[track_caller]
fn assert_rejects(yaml: &str, line: u64, column: u64, reason: &str) {
    let err = match parse_str(yaml) {
        Ok(spec) => panic!("accepted, expected `{reason}`: {spec:?}\n{yaml}"),
        Err(err) => err,
    };
    assert!(
        err.reason.contains(reason),
        "reason `{}` does not contain `{reason}`",
        err.reason
    );
    assert_eq!(
        (err.line, err.column),
        (line, column),
        "wrong location for `{}`",
        err.reason
    );
    assert!(!err.reason.contains('\n'));
    assert_eq!(err.source_name, "test.yaml");
}

fn name(s: &str) -> Name {
    Name::new(s).unwrap_or_else(|| panic!("bad test name {s}"))
}

// ---------------------------------------------------------------- valid specs

#[test]
fn example_config_parses() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/networks.yaml");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let spec = parse(&bytes, "networks.yaml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(spec.cluster.name.as_str(), "demo");
    assert_eq!(spec.nodes.len(), 3);
    assert!(spec.nodes.iter().all(|n| n.public_key.is_some()));
    let frontend = spec
        .network(&name("frontend"))
        .unwrap_or_else(|| panic!("no frontend"));
    assert!(frontend.encrypted);
    assert_eq!(frontend.vni.get(), 4097);
    assert_eq!(
        frontend.nodes,
        vec![name("node-a"), name("node-b"), name("node-c")]
    );
    assert_eq!(frontend.addresses.len(), 3);
    let backend = spec
        .network(&name("backend"))
        .unwrap_or_else(|| panic!("no backend"));
    assert!(!backend.encrypted);
    assert_eq!(backend.vni.get(), 4098);
    assert_eq!(backend.nodes, vec![name("node-a"), name("node-b")]);
    assert_eq!(
        backend
            .addresses
            .get(&name("node-b"))
            .map(|a| a.to_string()),
        Some("10.20.0.2/24".to_owned())
    );
}

#[test]
fn full_spec_with_defaults() {
    let spec = parse_str(&with_network(
        "    encrypted: true\n    nodes: [node-b, node-a]\n    addresses:\n      node-a: 10.10.0.1/24\n\
         \x20 - name: backend\n    vni: 16777215\n    mtu: 1400\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let c = &spec.cluster;
    assert_eq!(c.control_port, DEFAULT_CONTROL_PORT);
    assert_eq!(c.data_port, DEFAULT_DATA_PORT);
    assert_eq!(c.encrypted_data_port, DEFAULT_ENCRYPTED_DATA_PORT);
    assert_eq!(c.rotation, DEFAULT_ROTATION);
    assert_eq!(
        spec.nodes[0].address,
        "192.0.2.1"
            .parse::<IpAddr>()
            .unwrap_or(IpAddr::from([0; 4]))
    );
    assert_eq!(
        spec.nodes[1].public_key.map(|k| k.to_base64()),
        Some(KEY_B.to_owned())
    );
    let fe = &spec.networks[0];
    assert!(fe.encrypted);
    assert_eq!(fe.mtu, None);
    // Stored sorted whatever the order in the file.
    assert_eq!(fe.nodes, vec![name("node-a"), name("node-b")]);
    let be = &spec.networks[1];
    assert!(!be.encrypted);
    assert_eq!(be.vni.get(), Vni::MAX);
    assert_eq!(be.mtu, Some(1400));
    assert_eq!(be.nodes, vec![name("node-a"), name("node-b")]);
    assert!(be.addresses.is_empty());
}

#[test]
fn minimal_spec_without_keys_or_networks() {
    let spec = parse_str(
        "apiVersion: ovl/v1\ncluster: {name: c}\nnodes: [{name: a, address: 2001:db8::1}]\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(spec.networks.is_empty());
    assert_eq!(spec.nodes[0].public_key, None);
}

#[test]
fn explicit_cluster_settings() {
    let spec = parse_str(&base().replace(
        "  name: demo\n",
        "  name: demo\n  controlPort: 1\n  dataPort: 65535\n  encryptedDataPort: 4791\n  rotation: 1d2h3m4s\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let c = &spec.cluster;
    assert_eq!(
        (c.control_port, c.data_port, c.encrypted_data_port),
        (1, 65535, 4791)
    );
    assert_eq!(
        c.rotation,
        Duration::from_secs(86_400 + 2 * 3600 + 3 * 60 + 4)
    );
}

#[test]
fn ipv6_network_with_ipv6_mtu() {
    let yaml = base()
        .replace("192.0.2.1", "2001:db8::1")
        .replace("192.0.2.2", "2001:db8::2")
        + "networks:\n  - name: v6\n    vni: 7\n    mtu: 1280\n    addresses:\n      node-a: fd00::/127\n      node-b: fd00::1/127\n";
    let spec = parse_str(&yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(spec.networks[0].mtu, Some(1280));
    assert_eq!(spec.networks[0].addresses.len(), 2);
}

#[test]
fn anchors_and_aliases_are_fine_in_moderation() {
    let yaml = with_network("    addresses: &addrs\n      node-a: 10.10.0.1/24\n")
        + "  - name: copy\n    vni: 4098\n    addresses: {node-a: 10.20.0.1/24}\n";
    parse_str(&yaml).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn durations() {
    let ok = [
        ("90s", 90),
        ("30m", 1800),
        ("12h", 43_200),
        ("1d", 86_400),
        ("1h30m", 5400),
    ];
    for (text, secs) in ok {
        assert_eq!(
            fields::duration(text),
            Ok(Duration::from_secs(secs)),
            "{text}"
        );
    }
    for bad in [
        "",
        "h",
        "12",
        "1m1h",
        "1h1h",
        "1.5h",
        "-1h",
        "1h ",
        " 1h",
        "1w",
        "999999999999999d",
        "1H",
    ] {
        assert!(fields::duration(bad).is_err(), "{bad:?} accepted");
    }
}

// ---------------------------------------------------------------- one test per rule

#[test]
fn rejects_oversized_input() {
    let mut big = base().into_bytes();
    big.resize(MAX_SPEC_BYTES + 1, b'#');
    let err = parse(&big, "big.yaml").err();
    assert_eq!(err.as_ref().map(|e| (e.line, e.column)), Some((1, 1)));
    assert!(err.is_some_and(|e| e.reason.contains("more than the limit of 1048576 bytes")));
}

#[test]
fn rejects_non_utf8_with_position() {
    let err = parse(b"apiVersion: ovl/v1\ncluster:\n  name: d\xe9mo\n", "x").err();
    assert_eq!(
        err.map(|e| (e.line, e.column, e.reason)),
        Some((3, 10, "the spec is not valid UTF-8 text".to_owned()))
    );
}

#[test]
fn rejects_empty_documents() {
    for empty in [
        "",
        "\n\n",
        "---\n",
        "# just a comment\n",
        "~\n",
        "---\n...\n",
    ] {
        assert_rejects(empty, 1, 1, "the spec is empty");
    }
}

#[test]
fn rejects_multiple_documents() {
    assert_rejects(&format!("{}---\n{}", base(), base()), 12, 1, "multiple");
}

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
        &rotation("59s"),
        4,
        13,
        "rotation `59s` is out of range: use 1m to 30d",
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
        "too many nodes: at most 1024",
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

#[test]
fn rejects_hostile_yaml() {
    let mut bomb = with_network("").replace(
        "    vni: 4097\n",
        "    vni:\n      - &a0 [x, x, x, x, x, x, x, x, x, x]\n",
    );
    for i in 1..10 {
        let p = i - 1;
        bomb.push_str(&format!(
            "      - &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    let err = parse_str(&bomb).err();
    assert!(err.is_some_and(|e| e.reason.contains("parser limit")));
    let deep = with_network("").replace(
        "vni: 4097",
        &format!("vni: {}{}", "[".repeat(10_000), "]".repeat(10_000)),
    );
    let err = parse_str(&deep).err();
    assert!(err.is_some_and(|e| e.reason.contains("limit") && e.line == 13));
}

#[test]
fn error_display_is_file_line_column_reason() {
    let err = parse(b"apiVersion: ovl/v1\nextra: 1\n", "<stdin>").err();
    assert_eq!(
        err.map(|e| e.to_string()),
        Some("<stdin>:2:1: unknown field `extra`, expected one of apiVersion, cluster, nodes, networks".to_owned())
    );
}

// ---------------------------------------------------------------- the CLI corpus

/// Every file in `integration/invalid/` is rejected with the substring and location its
/// EXPECTED.tsv row names, and every file has a row.
#[test]
fn invalid_corpus_matches_expected_tsv() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("integration/invalid");
    let tsv = std::fs::read_to_string(dir.join("EXPECTED.tsv"))
        .unwrap_or_else(|e| panic!("EXPECTED.tsv: {e}"));
    let mut listed = Vec::new();
    for (n, row) in tsv
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let cols: Vec<&str> = row.split('\t').collect();
        let [file, substring, location] = cols[..] else {
            panic!(
                "EXPECTED.tsv:{}: want 3 tab-separated columns: {row:?}",
                n + 1
            );
        };
        let bytes = std::fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let err = match parse(&bytes, file) {
            Ok(_) => panic!("{file}: accepted"),
            Err(e) => e,
        };
        assert!(
            err.reason.contains(substring),
            "{file}: `{err}` lacks `{substring}`"
        );
        if location != "-" {
            assert_eq!(
                format!("{}:{}", err.line, err.column),
                location,
                "{file}: `{err}`"
            );
        }
        assert!(
            err.to_string()
                .starts_with(&format!("{file}:{}:{}: ", err.line, err.column))
        );
        listed.push(file.to_owned());
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|f| f != "EXPECTED.tsv")
        .collect();
    on_disk.sort();
    listed.sort();
    assert_eq!(on_disk, listed, "files and EXPECTED.tsv rows differ");
    assert!(listed.len() >= 34);
}

// ---------------------------------------------------------------- properties

fn check_outcome(result: Result<Spec, SpecError>) -> Result<(), TestCaseError> {
    if let Err(e) = result {
        prop_assert!(e.line >= 1 && e.column >= 1, "{e}");
        prop_assert!(!e.reason.is_empty());
        prop_assert!(
            !e.reason.contains('\n') && !e.reason.contains('\r'),
            "{:?}",
            e.reason
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_outcome(parse(&bytes, "fuzz"))?;
    }

    #[test]
    fn arbitrary_text_never_panics(text in "[ -~\t\n]{0,400}") {
        check_outcome(parse_str(&text))?;
    }

    /// Mutations of a valid spec reach deep into validation, not only the YAML parser.
    #[test]
    fn mutated_specs_never_panic(
        cut in 0usize..600,
        at in 0usize..600,
        insert in "[-a-z0-9:{}\\[\\],&*!|>#\"' \n./]{0,12}",
    ) {
        let valid = with_network("    encrypted: true\n    addresses:\n      node-a: 10.10.0.1/24\n      node-b: 10.10.0.2/24\n");
        let mut bytes = valid.into_bytes();
        let cut = cut.min(bytes.len());
        bytes.truncate(bytes.len() - cut / 8);
        let at = at.min(bytes.len());
        bytes.splice(at..at, insert.into_bytes());
        check_outcome(parse(&bytes, "mutated"))?;
    }
}
