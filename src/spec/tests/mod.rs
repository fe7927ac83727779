//! Spec parser tests: valid specs here; one test per rule (reason and location) in
//! `rules` (cluster and nodes) and `networks`; the CLI corpus in `integration/invalid/`,
//! hostile input and property tests in `input`.

mod input;
mod networks;
mod rules;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

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
