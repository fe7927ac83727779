//! Agents and the control plane on a real ESP kernel (inside user-mode-linux): keys are
//! agreed by the agents, never configured by hand. Each node is a namespace with its own
//! agent, key file, state directory and socket.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};

use std::time::{Duration, Instant};

use common::*;

const NETWORKS: &str = "  - name: sec
    vni: 300
    encrypted: true
    addresses: {node-a: 10.3.0.1/24, node-b: 10.3.0.2/24, node-c: 10.3.0.3/24, node-d: 10.3.0.4/24}
  - name: blue
    vni: 100
    addresses: {node-a: 10.1.0.1/24, node-b: 10.1.0.2/24, node-c: 10.1.0.3/24, node-d: 10.1.0.4/24}
";

const NAMES: [&str; 4] = ["node-a", "node-b", "node-c", "node-d"];

fn sec_addr(node: &str) -> String {
    let i = NAMES.iter().position(|n| *n == node).unwrap();
    format!("10.3.0.{}", i + 1)
}

/// Four nodes with agents, the spec applied through each agent. Returns once every
/// ordered pair pings over the encrypted network.
fn cluster_with_agents(tag: &str, log_level: &str) -> (Cluster, Agents, std::path::PathBuf) {
    cluster_with_agents_opts(tag, log_level, &[])
}

fn cluster_with_agents_opts(
    tag: &str,
    log_level: &str,
    extra: &[&str],
) -> (Cluster, Agents, std::path::PathBuf) {
    require_esp();
    let c = Cluster::new(tag, 4, false, 1500);
    c.keygen_all();
    let spec = c.spec("net.yaml", NETWORKS);
    let mut agents = Agents::default();
    for n in NAMES {
        agents
            .0
            .insert(n.to_owned(), c.start_agent_with(n, &spec, log_level, extra));
    }
    let mut last_apply = Instant::now();
    for n in NAMES {
        c.apply_via_agent(n, &spec);
        last_apply = Instant::now();
    }
    wait_full_mesh(&c, Duration::from_secs(120));
    println!(
        "time from the last apply to full encrypted connectivity: {:?}",
        last_apply.elapsed()
    );
    (c, agents, spec)
}

/// The peers in an agent's `status -o json`.
fn peers_of(st: &serde_json::Value) -> &Vec<serde_json::Value> {
    st["agent"]["peers"]
        .as_array()
        .unwrap_or_else(|| panic!("no peers in the status: {st}"))
}

fn wait_full_mesh(c: &Cluster, limit: Duration) {
    let start = Instant::now();
    for from in NAMES {
        for to in NAMES {
            if from == to {
                continue;
            }
            loop {
                if c.ping(from, &sec_addr(to)) {
                    break;
                }
                assert!(
                    start.elapsed() < limit,
                    "{from} -> {to} not reachable over the encrypted network after {limit:?}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Every pair at ~1000 packets/s for `secs` seconds.
fn flood_all_pairs(c: &Cluster, secs: u32) -> Vec<(String, Child)> {
    let mut trains = vec![];
    for (i, from) in NAMES.iter().enumerate() {
        for to in &NAMES[i + 1..] {
            trains.push((
                format!("{from} <-> {to}"),
                ping_train(c, from, &sec_addr(to), "0.001", 1000 * secs),
            ));
        }
    }
    trains
}

#[test]
fn a_four_agents_agree_keys_and_every_pair_pings() {
    let (c, _agents, _spec) =
        cluster_with_agents_opts("agt", "info", &["--metrics-address", "9477"]);
    // Plaintext network too.
    assert!(c.ping_eventually("node-a", "10.1.0.4"));
    // One SA per pair and direction on every node, keys shared only by the two ends.
    for n in NAMES {
        let sas = c.sa_keys(n);
        assert_eq!(sas.len(), 6, "{n}: {sas:?}");
    }
    let st = c.agent_status("node-a");
    let peers = peers_of(&st);
    assert_eq!(peers.len(), 3);
    assert!(peers.iter().all(|p| p["connected"] == true), "{st}");
    assert!(
        !st.to_string().contains(&c.sa_keys("node-a")[0].3),
        "status must not show keys"
    );
    // The table view explains the same.
    let table = stdout(&c.ctl_agent("node-a", &["status"]));
    assert!(
        table.contains("node-b") && table.contains("active"),
        "{table}"
    );

    // Prometheus metrics on loopback match the kernel's own counters: each SA's packet
    // count in the scrape lies between the kernel's count just before and just after it
    // (the SAs are nearly idle, but a late packet of the overlay may still pass).
    std::thread::sleep(Duration::from_millis(500));
    let ns_a = c.node("node-a").ns.clone();
    let before = sa_packets(&ok(&format!("ip -n {ns_a} -s xfrm state")));
    let metrics = ok(&format!(
        "ip netns exec {ns_a} python3 -c 'import urllib.request;print(urllib.request.urlopen(\"http://127.0.0.1:9477/metrics\").read().decode())'"
    ));
    let after = sa_packets(&ok(&format!("ip -n {ns_a} -s xfrm state")));
    assert!(
        metrics.contains("ovl_agent_up 1")
            && metrics.contains("ovl_peer_connected{peer=\"node-b\"} 1"),
        "{metrics}"
    );
    // The agent reads the kernel in full at least once (then reuses its view while the
    // kernel stays quiet).
    let reads = |kind: &str| -> u64 {
        let prefix = format!("ovl_kernel_reads_total{{kind=\"{kind}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {kind} kernel reads in:\n{metrics}"))
    };
    assert!(reads("full") >= 1, "{metrics}");
    let _ = reads("reused");
    assert_eq!(before.len(), 6, "{before:?}");
    for (labels, low) in &before {
        let prefix = format!("ovl_sa_packets{{{labels}}} ");
        let shown: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metrics should have {prefix}:\n{metrics}"));
        let high = after.get(labels).copied().unwrap_or_default();
        assert!(
            (*low..=high).contains(&shown),
            "{prefix}{shown}: the kernel said {low} before the scrape and {high} after:\n{metrics}"
        );
    }
}

/// Packets per ESP SA in `ip -s xfrm state` output, keyed by the metrics' labels
/// (`src="..",dst="..",spi=".."`).
fn sa_packets(kernel: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for block in format!("\n{kernel}")
        .split("\nsrc ")
        .filter(|b| b.contains("proto esp"))
    {
        let mut w = block.split_whitespace();
        let (src, dst) = (w.next().unwrap().to_owned(), w.nth(1).unwrap().to_owned());
        let spi = block
            .split("spi ")
            .nth(1)
            .unwrap()
            .split(['(', ' '])
            .next()
            .unwrap()
            .to_owned();
        let packets: u64 = block
            .split("lifetime current:")
            .nth(1)
            .and_then(|t| t.split("(bytes),").nth(1))
            .and_then(|t| t.split("(packets)").next())
            .map(|t| t.trim().parse().unwrap())
            .unwrap();
        out.insert(
            format!("src=\"{src}\",dst=\"{dst}\",spi=\"{spi}\""),
            packets,
        );
    }
    out
}

#[test]
fn b_unknown_keys_and_garbage_are_refused_while_peers_keep_working() {
    let agents_started = Instant::now();
    let (c, mut agents, spec) = cluster_with_agents("rog", "info");
    // A rogue agent with a key the spec does not know, claiming node-a's name.
    let rogue_dir = c.dir.path().join("rogue");
    std::fs::create_dir_all(&rogue_dir).unwrap();
    let out = Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(rogue_dir.join("node.key"))
        .output()
        .unwrap();
    let rogue_key = stdout(&out).trim().to_owned();
    let x = format!("{}-x", c.switch);
    ok(&format!(
        "ip netns add {x} && ip -n {x} link add eth0 type veth peer name px netns {sw} && \
         ip -n {sw} link set px master ub0 up && ip -n {x} addr add 192.0.2.50/24 dev eth0 && ip -n {x} link set eth0 up && ip -n {x} link set lo up",
        sw = c.switch
    ));
    let _guard = NsDel(x.clone());
    let rogue_spec = std::fs::read_to_string(&spec)
        .unwrap()
        .replace(&c.keys.lock().unwrap()["node-a"], &rogue_key)
        .replace("192.0.2.1\"", "192.0.2.50\"");
    let rogue_spec_path = c.dir.path().join("rogue.yaml");
    std::fs::write(&rogue_spec_path, rogue_spec).unwrap();
    let rogue_log = std::fs::File::create(rogue_dir.join("agent.log")).unwrap();
    let rogue = Command::new("ip")
        .args([
            "netns",
            "exec",
            &x,
            BIN,
            "agent",
            "-f",
            rogue_spec_path.to_str().unwrap(),
            "--node",
            "node-a",
            "--key",
        ])
        .arg(rogue_dir.join("node.key"))
        .args([
            "--state-dir",
            rogue_dir.join("state").to_str().unwrap(),
            "--socket",
            rogue_dir.join("agent.sock").to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(rogue_log.try_clone().unwrap())
        .stderr(rogue_log)
        .spawn()
        .unwrap();
    agents.0.insert("rogue".into(), rogue);

    // Meanwhile traffic between real members, and a flood of garbage at node-b's port.
    let trains = vec![(
        "node-a <-> node-b".to_owned(),
        ping_train(&c, "node-a", "10.3.0.2", "0.01", 2500),
    )];
    let fuzz = c.dir.path().join("garbage.py");
    std::fs::write(&fuzz, GARBAGE).unwrap();
    // From node-c's own address (admitted, so the garbage reaches the handshake and
    // framing code), and from an address that is no node's (refused before that).
    let started = Instant::now();
    for ns in [c.node("node-c").ns.clone(), x.clone()] {
        let garbage = ok(&format!(
            "ip netns exec {ns} python3 {} 192.0.2.2 7946 1500",
            fuzz.display()
        ));
        println!("{ns}: {garbage}");
    }
    println!("flood: {} s", started.elapsed().as_secs());
    assert_no_loss(trains);

    let log_b = c.agent_log("node-b");
    let refusals = log_b.matches("control connection refused").count();
    assert!(refusals > 0, "node-b should log refused connections");
    // 3000 refusals, logged one by one only up to 5 per 10 s window of the agent's
    // life (rogue's dials included), then summed up.
    let life = agents_started.elapsed().as_secs();
    assert!(
        refusals as u64 <= 5 * (life / 10 + 2),
        "{refusals} refusal lines in {life} s: the log can be flooded"
    );
    assert!(
        log_b.contains("more control connections refused"),
        "the refusals not logged one by one are summed up"
    );
    // The rogue agent dials from an address that is no node's: refused before its key
    // is even read.
    // (node-c and node-d: the garbage from the same address went to node-b only.)
    let by_address = ["node-c", "node-d"].iter().any(|n| {
        c.agent_log(n)
            .lines()
            .any(|l| l.contains("192.0.2.50") && l.contains("not the address of a node"))
    });
    assert!(
        by_address,
        "the rogue's address should be refused and named"
    );
    // Still serving: sessions up, new traffic flows, rotation works.
    let st = c.agent_status("node-b");
    assert!(peers_of(&st).iter().all(|p| p["connected"] == true), "{st}");
    assert!(c.ping("node-b", "10.3.0.3"));

    // The spec now gives node-b another key (the rogue's): node-a closes its session
    // with node-b at once (no key may go to the old holder) and cannot open a new one.
    let rekeyed = std::fs::read_to_string(&spec)
        .unwrap()
        .replace(&c.keys.lock().unwrap()["node-b"], &rogue_key);
    let rekeyed_path = c.dir.path().join("rekeyed.yaml");
    std::fs::write(&rekeyed_path, rekeyed).unwrap();
    c.apply_via_agent("node-a", &rekeyed_path);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = c.agent_status("node-a");
        let b = peers_of(&st)
            .iter()
            .find(|p| p["name"] == "node-b")
            .cloned()
            .unwrap_or_else(|| panic!("node-b missing from node-a's status: {st}"));
        if b["connected"] == false {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node-a kept its session with node-b after node-b's key changed: {st}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        c.agent_log("node-a")
            .contains("the peer's address or key changed; its session is closed"),
        "node-a should say why it closed the session"
    );
}

/// Random bytes, oversized frames, truncated handshakes, slow clients.
const GARBAGE: &str = r#"
import os, random, socket, struct, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
random.seed(7)
kinds = {"random": 0, "oversize": 0, "truncated": 0, "short": 0, "empty": 0}
for i in range(n):
    try:
        s = socket.create_connection((host, port), timeout=2)
        k = i % 5
        if k == 0:
            s.sendall(os.urandom(random.randint(1, 4096))); kinds["random"] += 1
        elif k == 1:
            s.sendall(struct.pack("!H", 65535) + os.urandom(2000)); kinds["oversize"] += 1
        elif k == 2:
            s.sendall(struct.pack("!H", 96) + os.urandom(random.randint(0, 95))); kinds["truncated"] += 1
        elif k == 3:
            s.sendall(os.urandom(1)); kinds["short"] += 1
        else:
            kinds["empty"] += 1
        s.close()
    except OSError:
        pass
print("garbage connections:", kinds)
"#;

struct NsDel(String);
impl Drop for NsDel {
    fn drop(&mut self) {
        let _ = sh(&format!(
            "ip netns pids {0} | xargs -r kill -9; ip netns del {0}",
            self.0
        ));
    }
}

#[test]
fn c_killing_and_restarting_an_agent_loses_nothing() {
    let (c, mut agents, spec) = cluster_with_agents("kil", "info");
    let trains = flood_all_pairs(&c, 10);
    std::thread::sleep(Duration::from_secs(2));
    agents.kill9("node-a");
    assert_no_loss(trains);
    let trains = flood_all_pairs(&c, 10);
    std::thread::sleep(Duration::from_secs(1));
    agents
        .0
        .insert("node-a".into(), c.start_agent("node-a", &spec, "info"));
    assert_no_loss(trains);
    // The restarted agent took over: sessions back, fresh keys agreed, one SA per pair
    // and direction again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = c.agent_status("node-a");
        let up = peers_of(&st).iter().all(|p| p["connected"] == true);
        if up && c.sa_keys("node-a").len() == 6 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node-a did not settle after restart: {st}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // Another tool flushes every XFRM policy, then every state: the agent hears of it and
    // repairs at once, not at its next periodic pass (every 20 s).
    let ns = c.node("node-a").ns.clone();
    let policies = || {
        ok(&format!("ip -n {ns} xfrm policy"))
            .matches("\tdir ")
            .count()
    };
    let all = policies();
    assert!(all >= 8, "{all} policies");
    ok(&format!("ip -n {ns} xfrm policy flush"));
    let flushed = Instant::now();
    while policies() < all {
        assert!(
            flushed.elapsed() < Duration::from_secs(4),
            "policies not put back within 4 s of a flush by another tool"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("policies back {:?} after the flush", flushed.elapsed());
    ok(&format!("ip -n {ns} xfrm state flush"));
    let flushed = Instant::now();
    while c.sa_keys("node-a").len() < 6 {
        assert!(
            flushed.elapsed() < Duration::from_secs(10),
            "states not agreed again within 10 s of a flush by another tool"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("pairs keyed again {:?} after the flush", flushed.elapsed());
}

#[test]
fn d_node_reboot_rekeys_and_removes_stale_sas_with_distinct_keys() {
    let (c, mut agents, spec) = cluster_with_agents("rbt", "info");
    let mut seen: BTreeMap<String, BTreeSet<(String, String, String)>> = BTreeMap::new();
    let mut record = |c: &Cluster| {
        for n in &c.nodes {
            if sh(&format!("ip netns pids {} >/dev/null 2>&1", n.ns))
                .status
                .success()
            {
                for (src, dst, spi, key) in c.sa_keys(&n.name) {
                    seen.entry(key).or_default().insert((src, dst, spi));
                }
            }
        }
    };
    record(&c);
    let old_d_spis: BTreeSet<String> = c.sa_keys("node-d").into_iter().map(|s| s.2).collect();
    // "Reboot" node-d: its namespace (and all its kernel state) is destroyed.
    agents.kill9("node-d");
    let d = c.node("node-d");
    ok(&format!("ip netns del {}", d.ns));
    ok(&format!(
        "ip netns add {ns} && ip -n {ns} link add eth0 type veth peer name p3 netns {sw} && \
         ip -n {sw} link set p3 master ub0 up && ip -n {ns} link set lo up && \
         ip -n {ns} addr add {addr}/24 dev eth0 && ip -n {ns} link set eth0 up",
        ns = d.ns,
        sw = c.switch,
        addr = d.address
    ));
    agents
        .0
        .insert("node-d".into(), c.start_agent("node-d", &spec, "info"));
    c.apply_via_agent("node-d", &spec);
    wait_full_mesh(&c, Duration::from_secs(120));
    // node-d sorts last, so it is dialled by all: at each of its starts it told every
    // peer that it is up, and they dialled it at once instead of waiting out a backoff.
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in &NAMES[..3] {
        loop {
            let told = c
                .agent_log(n)
                .lines()
                .filter(|l| l.contains("peer says it is up; dialing it") && l.contains("node-d"))
                .count();
            if told >= 2 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{n} was told {told} times, not twice, that node-d is up"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // Peers converge to exactly one SA per direction with node-d, none of the old ones.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        record(&c);
        let settled = NAMES.iter().all(|n| c.sa_keys(n).len() == 6);
        let stale = NAMES[..3]
            .iter()
            .any(|n| c.sa_keys(n).iter().any(|s| old_d_spis.contains(&s.2)));
        if settled && !stale {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stale SAs not removed: {:?}",
            NAMES.map(|n| c.sa_keys(n))
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    for (key, sas) in &seen {
        assert!(!key.is_empty());
        assert_eq!(
            sas.len(),
            1,
            "a key was installed for more than one SA: {sas:?}"
        );
    }
    println!("{} distinct keys seen across the test", seen.len());
}

#[test]
fn e_no_key_in_logs_or_state_files_at_trace_level() {
    let (c, _agents, spec) = cluster_with_agents("log", "trace");
    // Some rotations so that many keys pass through.
    for n in ["node-a", "node-c"] {
        let out = c.ctl_agent(n, &["rotate", "--timeout", "30"]);
        assert!(
            out.status.success(),
            "rotate on {n}: {}{}",
            stdout(&out),
            stderr(&out)
        );
    }
    let mut keys = BTreeSet::new();
    for n in NAMES {
        for (_, _, _, k) in c.sa_keys(n) {
            keys.insert(k);
        }
    }
    assert!(keys.len() >= 12);
    let mut logs = String::new();
    for n in NAMES {
        // `status` makes the agent dump every SA (for the counters) once more.
        c.agent_status(n);
        let log = c.agent_log(n);
        assert!(log.len() > 1000, "trace logging should be verbose on {n}");
        logs.push_str(&log);
    }
    // RUST_LOG asked for the netlink crates' events by their own targets (the agents run
    // with `TRACE_EVERYTHING`): not one of them is written.
    let quiet = ["netlink_", "xfrmnetlink", "rtnetlink", "snow"];
    for line in logs.lines() {
        let target = line.split_whitespace().nth(2).unwrap_or("");
        assert!(
            !quiet.iter().any(|q| target.starts_with(q)),
            "an event of a silenced crate in the agent logs: {line:.200}"
        );
    }
    for k in &keys {
        let bytes: Vec<u8> = (0..k.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&k[i..i + 2], 16).unwrap())
            .collect();
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes[..32]);
        let dec = format!("{:?}", &bytes[..16]);
        let forms = [
            k.clone(),
            k.to_uppercase(),
            k[..32].to_owned(),
            b64[..24].to_owned(),
            dec[1..40].to_owned(),
        ];
        for f in &forms {
            assert!(
                !logs.contains(f.as_str()),
                "key material in the agent logs ({f})"
            );
        }
        // Files under the state dirs: only 0600 ones may hold anything secret.
        for n in NAMES {
            let dir = c.node_dir(n);
            for entry in walk(&dir) {
                use std::os::unix::fs::PermissionsExt as _;
                let mode = std::fs::metadata(&entry).unwrap().permissions().mode() & 0o777;
                let content = std::fs::read(&entry).unwrap_or_default();
                let has = content.windows(16).any(|w| w == &bytes[..16])
                    || String::from_utf8_lossy(&content).contains(k.as_str());
                assert!(
                    !has || mode == 0o600,
                    "{} (mode {mode:o}) holds key material",
                    entry.display()
                );
            }
        }
    }
    // Delete through the agent: node-a's overlay goes, XFRM objects included, and its
    // agent (which keeps its spec true) does not bring any of it back.
    let out = c.ctl_agent("node-a", &["delete", "-f", spec.to_str().unwrap()]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("- link ovbr-300"), "{}", stdout(&out));
    std::thread::sleep(Duration::from_secs(3));
    let ns = &c.node("node-a").ns;
    assert_eq!(ok(&format!("ip -n {ns} xfrm state")).trim(), "", "SAs left");
    assert_eq!(
        ok(&format!("ip -n {ns} xfrm policy")).trim(),
        "",
        "policies left"
    );
    assert!(c.link("node-a", "ovbr-300").is_none() && c.link("node-a", "ovbr-100").is_none());
    assert!(peers_of(&c.agent_status("node-a")).is_empty());
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            out.extend(walk(&p));
        } else if ft.is_file() {
            out.push(p);
        }
    }
    out
}

/// Every key of every SA the nodes hold.
fn all_keys(c: &Cluster) -> BTreeSet<String> {
    NAMES
        .iter()
        .flat_map(|n| c.sa_keys(n).into_iter().map(|s| s.3))
        .collect()
}

/// Until every node holds one SA per peer and direction, those between `between`
/// addresses (all when empty) with keys not in `old`, and every pair pings.
fn wait_rekeyed(c: &Cluster, old: &BTreeSet<String>, between: &[&str], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let concerned = |s: &(String, String, String, String)| {
        between.is_empty() || between.contains(&s.0.as_str()) || between.contains(&s.1.as_str())
    };
    loop {
        let fresh = NAMES.iter().all(|n| {
            let sas = c.sa_keys(n);
            sas.len() == 6
                && sas
                    .iter()
                    .filter(|s| concerned(s))
                    .all(|s| !old.contains(&s.3))
        });
        if fresh {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: SAs not replaced by fresh keys: {:?}",
            NAMES.map(|n| c.sa_keys(n))
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_full_mesh(c, Duration::from_secs(60));
}

#[test]
fn f_a_new_port_or_a_moved_peer_gets_new_keys_never_the_old_ones_again() {
    let (c, mut agents, spec) = cluster_with_agents("mov", "info");
    let text = std::fs::read_to_string(&spec).unwrap();

    // A new encryptedDataPort changes every SA's selector: each direction is rekeyed,
    // no key is installed a second time (its sequence numbers would start over).
    let before = all_keys(&c);
    assert_eq!(before.len(), 12);
    let ported = c.dir.path().join("ported.yaml");
    let text = text.replace(
        "  name: test\n",
        "  name: test\n  encryptedDataPort: 4791\n",
    );
    std::fs::write(&ported, &text).unwrap();
    for n in NAMES {
        c.apply_via_agent(n, &ported);
    }
    wait_rekeyed(&c, &before, &[], "new port");
    for n in NAMES {
        let states = ok(&format!("ip -n {} xfrm state", c.node(n).ns));
        assert!(
            states.contains("dport 4791") && !states.contains("dport 4790"),
            "{n}: {states}"
        );
        assert!(
            c.agent_log(n)
                .contains("has other parameters now; rekeying"),
            "{n} did not rekey for the new port"
        );
    }

    // node-c moves to another underlay address: the others drop its keys (which
    // belong to its old address) and agree new ones with it there.
    let before = all_keys(&c);
    let moved = c.dir.path().join("moved.yaml");
    std::fs::write(&moved, text.replace("\"192.0.2.3\"", "\"192.0.2.7\"")).unwrap();
    for n in ["node-a", "node-b", "node-d"] {
        c.apply_via_agent(n, &moved);
    }
    agents.kill9("node-c");
    let ns = &c.node("node-c").ns;
    ok(&format!(
        // Old one first: deleting a primary address takes its secondaries with it.
        "ip -n {ns} addr del 192.0.2.3/24 dev eth0 && ip -n {ns} addr add 192.0.2.7/24 dev eth0"
    ));
    agents
        .0
        .insert("node-c".into(), c.start_agent("node-c", &moved, "info"));
    c.apply_via_agent("node-c", &moved);
    wait_rekeyed(&c, &before, &["192.0.2.7"], "moved peer");
    for n in NAMES {
        let log = c.agent_log(n);
        assert!(!log.contains("File exists"), "{n}: {log}");
    }
    let a = c.sa_keys("node-a");
    assert!(
        a.iter().any(|s| s.0 == "192.0.2.7")
            && !a.iter().any(|s| s.0 == "192.0.2.3" || s.1 == "192.0.2.3"),
        "{a:?}"
    );

    // node-b leaves node-a's spec and comes back, both agents running throughout:
    // node-b still remembers the newest generation node-a offered it, and takes only
    // newer ones; the pair must agree fresh keys both ways, not wait for rotations.
    let moved_text = std::fs::read_to_string(&moved).unwrap();
    let without_b = moved_text
        .replace(
            "    encrypted: true\n",
            "    encrypted: true\n    nodes: [node-a, node-c, node-d]\n",
        )
        .replace(", node-b: 10.3.0.2/24", "");
    assert_ne!(without_b, moved_text);
    let without_b_path = c.dir.path().join("without-b.yaml");
    std::fs::write(&without_b_path, without_b).unwrap();
    c.apply_via_agent("node-a", &without_b_path);
    std::thread::sleep(Duration::from_secs(2));
    c.apply_via_agent("node-a", &moved);
    wait_full_mesh(&c, Duration::from_secs(30));
}

/// A workload (its own MAC and address) moves from behind node-c to behind node-b on the
/// encrypted network. node-a's VXLAN device moves its learned entry to node-b, but the
/// kernel kept the entry's cached route: the XFRM bundle of node-a's SA to node-c, whose
/// SPI node-b does not hold. The agent flushes the cached routes when a learned MAC
/// moves, so node-a reaches the workload at its new node at once, not after the next
/// rotation of the node-a -> node-c key.
#[test]
fn g_a_workload_moving_between_peers_is_reached_at_its_new_node() {
    let (c, _agents, _spec) = cluster_with_agents("wlm", "info");
    let vm = format!("{}-vm", c.switch);
    let _guard = NsDel(vm.clone());
    let plug = |node: &str| {
        ok(&format!(
            "ip netns add {vm} && ip -n {vm} link set lo up && \
             ip -n {vm} link add eth0 address 02:00:00:00:00:50 type veth peer name vmport netns {ns} && \
             ip -n {ns} link set vmport master ovbr-300 up && \
             ip -n {vm} addr add 10.3.0.50/24 dev eth0 && ip -n {vm} link set eth0 up",
            ns = c.node(node).ns
        ));
    };
    plug("node-c");
    assert!(
        c.ping_eventually("node-a", "10.3.0.50"),
        "workload behind node-c"
    );
    let fdb = ok(&format!(
        "bridge -n {} fdb show dev ovvx-300",
        c.node("node-a").ns
    ));
    assert!(fdb.contains("02:00:00:00:00:50 dst 192.0.2.3"), "{fdb}");
    // Moved: the workload speaks first from behind node-b (node-a learns it there).
    ok(&format!("ip netns del {vm}"));
    plug("node-b");
    let _ = sh(&format!("ip netns exec {vm} ping -c 2 -W 1 -q 10.3.0.1"));
    assert!(
        c.ping_eventually("node-a", "10.3.0.50"),
        "node-a does not reach the workload behind node-b: {}",
        ok(&format!(
            "bridge -n {} fdb show dev ovvx-300",
            c.node("node-a").ns
        ))
    );
    assert!(
        c.agent_log("node-a")
            .contains("a MAC moved to another remote"),
        "{}",
        c.agent_log("node-a")
    );
}
