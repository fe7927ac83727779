//! Key rotation with zero packet loss, inside user-mode-linux: `rotate` from cron, both
//! ends at once, a peer down, and rekeys driven by the kernel's soft lifetime.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;

const NAMES: [&str; 3] = ["node-a", "node-b", "node-c"];

fn sec_addr(node: &str) -> String {
    let i = NAMES.iter().position(|n| *n == node).unwrap();
    format!("10.3.0.{}", i + 1)
}

fn networks(extra_cluster: &str) -> String {
    let _ = extra_cluster;
    "  - name: sec
    vni: 300
    encrypted: true
    addresses: {node-a: 10.3.0.1/24, node-b: 10.3.0.2/24, node-c: 10.3.0.3/24}
"
    .to_owned()
}

fn cluster(tag: &str, cluster_extra: &str) -> (Cluster, Agents, std::path::PathBuf) {
    require_esp();
    let c = Cluster::new(tag, 3, false, 1500);
    c.keygen_all();
    let spec = c.spec("net.yaml", &networks(cluster_extra));
    if !cluster_extra.is_empty() {
        let text = std::fs::read_to_string(&spec)
            .unwrap()
            .replace("  name: test\n", &format!("  name: test\n{cluster_extra}"));
        std::fs::write(&spec, text).unwrap();
    }
    let mut agents = Agents::default();
    for n in NAMES {
        agents.0.insert(n.into(), c.start_agent(n, &spec, "info"));
    }
    for n in NAMES {
        c.apply_via_agent(n, &spec);
    }
    wait_mesh(&c, &NAMES, &sec_addr, Duration::from_secs(60));
    (c, agents, spec)
}

/// Ping trains in both directions of every pair at ~1000 packets/s.
fn flood(c: &Cluster, secs: u32) -> Vec<(String, std::process::Child)> {
    let mut v = vec![];
    for from in NAMES {
        for to in NAMES {
            if from != to {
                v.push((
                    format!("{from} -> {to}"),
                    ping_train(c, from, &sec_addr(to), "0.001", 1000 * secs),
                ));
            }
        }
    }
    v
}

/// (src, dst, spi) of every SA on every node.
fn all_sas(c: &Cluster) -> BTreeSet<(String, String, String)> {
    NAMES
        .iter()
        .flat_map(|n| c.sa_keys(n))
        .map(|(s, d, spi, _)| (s, d, spi))
        .collect()
}

/// Waits until each node holds exactly one SA per pair and direction (retired keys gone
/// after the grace period) and both ends of each direction agree on SPI and key.
fn wait_settled(c: &Cluster, nodes: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let per_node: Vec<_> = nodes.iter().map(|n| c.sa_keys(n)).collect();
        let counts_ok = per_node.iter().all(|s| s.len() == 2 * (nodes.len() - 1));
        let mut all: Vec<_> = per_node.iter().flatten().cloned().collect();
        all.sort();
        // Each (src, dst, spi, key) appears exactly twice: at the sender and the receiver.
        let agree = all.chunks(2).all(|w| w.len() == 2 && w[0] == w[1]);
        if counts_ok && agree {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "SAs did not settle: {per_node:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_twenty_rotations_under_a_flood_lose_nothing() {
    let (c, _agents, _spec) = cluster("rot", "");
    let trains = flood(&c, 25);
    std::thread::sleep(Duration::from_millis(500));
    let mut before = all_sas(&c);
    for i in 0..20 {
        let node = NAMES[i % 3];
        let out = c.ctl_agent(node, &["rotate", "--timeout", "30"]);
        assert!(
            out.status.success(),
            "rotate #{i} on {node}: {}{}",
            stdout(&out),
            stderr(&out)
        );
        let after = all_sas(&c);
        // Every SA of the rotating node has a new SPI (in and out, with both peers).
        let addr = c.node(node).address.clone();
        let fresh: Vec<_> = after
            .iter()
            .filter(|s| (s.0 == addr || s.1 == addr) && !before.contains(*s))
            .collect();
        assert!(
            fresh.len() >= 4,
            "rotation #{i} on {node} did not install new SAs for all its directions: {fresh:?}"
        );
        before = after;
    }
    assert_no_loss(trains);
    wait_settled(&c, &NAMES);
}

#[test]
fn b_rotation_with_a_peer_down_names_it_and_keeps_its_traffic() {
    let (c, mut agents, spec) = cluster("rdn", "");
    agents.kill9("node-c");
    let trains = vec![
        (
            "node-a -> node-c".to_owned(),
            ping_train(&c, "node-a", "10.3.0.3", "0.002", 5000),
        ),
        (
            "node-c -> node-a".to_owned(),
            ping_train(&c, "node-c", "10.3.0.1", "0.002", 5000),
        ),
        (
            "node-a -> node-b".to_owned(),
            ping_train(&c, "node-a", "10.3.0.2", "0.002", 5000),
        ),
    ];
    std::thread::sleep(Duration::from_millis(500));
    let out = c.ctl_agent("node-a", &["rotate", "--timeout", "20"]);
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(
        err.contains("node-c") && !err.contains("node-b:"),
        "rotate must name exactly the peer that did not rotate: {err}"
    );
    // Bring node-c back while traffic flows: it is rekeyed with no loss.
    agents
        .0
        .insert("node-c".into(), c.start_agent("node-c", &spec, "info"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = c.ctl_agent("node-a", &["rotate", "--peer", "node-c", "--timeout", "10"]);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node-c never rotated after coming back: {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_no_loss(trains);
    wait_settled(&c, &NAMES);
}

#[test]
fn c_soft_packet_lifetime_triggers_rekeys_without_loss() {
    let (c, _agents, _spec) = cluster("life", "  rekeyAfterPackets: 1500\n");
    let first: BTreeSet<_> = all_sas(&c);
    let trains = vec![
        (
            "node-a -> node-b".to_owned(),
            ping_train(&c, "node-a", "10.3.0.2", "0.001", 8000),
        ),
        (
            "node-b -> node-c".to_owned(),
            ping_train(&c, "node-b", "10.3.0.3", "0.001", 8000),
        ),
    ];
    let mut spis_seen = BTreeSet::new();
    // Sample the SAs until both trains have finished (however fast this machine runs
    // them): every SA lives ~1500 packets, far longer than the sampling period.
    let mut trains = trains;
    while trains
        .iter_mut()
        .any(|(_, t)| t.try_wait().ok().flatten().is_none())
    {
        spis_seen.extend(all_sas(&c).into_iter().filter(|s| !first.contains(s)));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_no_loss(trains);
    // a->b and b->a and b->c and c->b each carried > 1500 packets several times over.
    assert!(
        spis_seen.len() >= 8,
        "expected several lifetime-driven rekeys, saw new SAs {spis_seen:?}"
    );
    let log = c.agent_log("node-b");
    assert!(
        log.contains("reached its lifetime"),
        "the agent should log the kernel's expiry"
    );
    wait_settled(&c, &NAMES);
}

#[test]
fn d_both_ends_rotating_at_once_converge_without_loss() {
    let (c, _agents, _spec) = cluster("both", "");
    let trains = flood(&c, 10);
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..5 {
        let opts_a = c.agent_opts("node-a");
        let opts_b = c.agent_opts("node-b");
        let spawn = |node: &str, opts: &[String]| {
            std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &c.node(node).ns,
                    BIN,
                    "rotate",
                    "--peer",
                    if node == "node-a" { "node-b" } else { "node-a" },
                    "--timeout",
                    "30",
                ])
                .args(opts)
                .output()
        };
        let (ra, rb) = std::thread::scope(|s| {
            let a = s.spawn(|| spawn("node-a", &opts_a));
            let b = s.spawn(|| spawn("node-b", &opts_b));
            (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
        });
        assert!(ra.status.success(), "{}", stderr(&ra));
        assert!(rb.status.success(), "{}", stderr(&rb));
    }
    assert_no_loss(trains);
    wait_settled(&c, &NAMES);
}

/// Runs a node's command on a pseudo-terminal (util-linux `script`), as an operator at a
/// shell would; returns everything the terminal showed and the exit status.
fn on_terminal(c: &Cluster, node: &str, args: &[&str]) -> (String, bool) {
    let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    full.extend(c.agent_opts(node));
    let command = format!("{BIN} {}", full.join(" "));
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &c.node(node).ns])
        .args(["script", "-qefc", &command, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("spawn script");
    (
        format!("{}{}", stdout(&out), stderr(&out)),
        out.status.success(),
    )
}

#[test]
fn e_long_operations_show_progress_on_a_terminal_only() {
    let (c, _agents, spec) = cluster("rpg", "");
    // A rotation with both peers, on a terminal: the count of switched peers is drawn
    // and redrawn in place, ending at 2/2, and erased before the result.
    let (shown, ok) = on_terminal(&c, "node-a", &["rotate", "--timeout", "30"]);
    assert!(ok, "rotate on a terminal failed: {shown}");
    assert!(
        shown.contains("peers switched to new keys: 0/2 (0%)")
            && shown.contains("peers switched to new keys: 2/2 (100%)"),
        "no rotation progress on the terminal: {shown:?}"
    );
    assert!(
        shown.contains("\r\x1b[2KRotated: new keys in use with every peer."),
        "the progress line was not erased before the result: {shown:?}"
    );
    // The same without a terminal (cron, systemd): no progress, no control characters.
    let out = c.ctl_agent("node-a", &["rotate", "--timeout", "30"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let all = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        !all.contains("switched") && !all.contains('\x1b') && !all.contains('\r'),
        "progress leaked into non-terminal output: {all:?}"
    );
    // An apply through the agent: the kernel changes are counted.
    let text = std::fs::read_to_string(&spec).unwrap().replace(
        "  - name: sec\n",
        "  - name: extra\n    vni: 301\n    addresses: {node-a: 10.4.0.1/24}\n  - name: sec\n",
    );
    let bigger = c.spec("bigger.yaml", "");
    std::fs::write(&bigger, text).unwrap();
    let (shown, ok) = on_terminal(&c, "node-a", &["apply", "-f", bigger.to_str().unwrap()]);
    assert!(ok, "apply on a terminal failed: {shown}");
    assert!(
        shown.contains("kernel changes applied: 0/") && shown.contains("(100%)"),
        "no apply progress on the terminal: {shown:?}"
    );
}
