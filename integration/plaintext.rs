//! Plaintext overlay end to end on this machine's kernel: real namespaces, real devices,
//! real pings, checked with `ip -d -j link`, `bridge -j fdb` and `ip monitor`.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const TWO_NETWORKS: &str = "  - name: blue
    vni: 100
    addresses: {node-a: 10.1.0.1/24, node-b: 10.1.0.2/24, node-c: 10.1.0.3/24}
  - name: red
    vni: 200
    nodes: [node-a, node-b]
    addresses: {node-a: 10.2.0.1/24, node-b: 10.2.0.2/24}
";

fn two_networks_everywhere(ipv6: bool) {
    let c = Cluster::new("pt", 3, ipv6, 1500);
    let spec = c.spec("net.yaml", TWO_NETWORKS);
    c.apply_all(&spec);
    // (a) every member pair pings over each network, both ways.
    let blue = [
        ("node-a", "10.1.0.1"),
        ("node-b", "10.1.0.2"),
        ("node-c", "10.1.0.3"),
    ];
    for (from, _) in blue {
        for (to, addr) in blue {
            if from != to {
                assert!(
                    c.ping_eventually(from, addr),
                    "blue: {from} -> {to} ({addr})"
                );
            }
        }
    }
    assert!(c.ping_eventually("node-a", "10.2.0.2"));
    assert!(c.ping_eventually("node-b", "10.2.0.1"));
    // The non-member has no device for red; the members have both devices, VNI, port.
    assert!(c.link("node-c", "ovbr-200").is_none() && c.link("node-c", "ovvx-200").is_none());
    let vx = c.link("node-a", "ovvx-200").expect("ovvx-200 on node-a");
    let info = &vx["linkinfo"]["info_data"];
    assert_eq!(info["id"], 200);
    assert_eq!(info["port"], 4789);
    assert_eq!(vx["master"], "ovbr-200");
    let expect_mtu = if ipv6 { 1430 } else { 1450 };
    assert_eq!(vx["mtu"], expect_mtu);
    assert_eq!(c.link("node-a", "ovbr-200").unwrap()["mtu"], expect_mtu);
    let (b, cc) = (
        c.node("node-b").address.clone(),
        c.node("node-c").address.clone(),
    );
    let mut want = vec![b.clone(), cc];
    want.sort();
    assert_eq!(c.fdb_dsts("node-a", "ovvx-100"), want);
    assert_eq!(c.fdb_dsts("node-a", "ovvx-200"), vec![b]);
    // status explains it.
    let st = c.ctl("node-a", &["status", "-o", "json"]);
    assert!(st.status.success());
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    let names: Vec<&str> = v["networks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["blue", "red"]);
    // Without an agent, the JSON says so rather than leaving the key out.
    assert!(
        v.get("agent").is_some_and(serde_json::Value::is_null),
        "{v}"
    );
}

#[test]
fn a_three_nodes_two_networks_ipv4() {
    two_networks_everywhere(false);
}

#[test]
fn a_three_nodes_two_networks_ipv6() {
    two_networks_everywhere(true);
}

/// Runs `ip monitor link address`, `bridge monitor fdb` and `ip xfrm monitor` in a
/// namespace; waits until the namespace has been quiet for a second (IPv6 DAD and the
/// like settle), runs `f`, and returns only the events printed while `f` ran.
fn monitored(ns: &str, f: impl FnOnce()) -> String {
    use std::io::BufRead as _;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;
    let mut mon = Command::new("sh")
        .arg("-c")
        .arg(format!("ip -n {ns} monitor link address & bridge -n {ns} monitor fdb & ip -n {ns} xfrm monitor & wait"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let lines: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let reader = std::io::BufReader::new(mon.stdout.take().unwrap());
    let sink = lines.clone();
    let collector = std::thread::spawn(move || {
        for line in reader.lines().map_while(Result::ok) {
            sink.lock().unwrap().push((Instant::now(), line));
        }
    });
    let started = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let last = lines.lock().unwrap().last().map_or(started, |(t, _)| *t);
        if last.elapsed() > Duration::from_millis(1500)
            || started.elapsed() > Duration::from_secs(20)
        {
            break;
        }
    }
    let from = Instant::now();
    f();
    std::thread::sleep(Duration::from_millis(500));
    let until = Instant::now();
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(mon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = mon.wait();
    let _ = collector.join();
    let events = lines.lock().unwrap();
    events
        .iter()
        .filter(|(t, _)| *t >= from && *t <= until)
        .map(|(_, l)| format!("{l}\n"))
        .collect()
}

use std::os::unix::process::CommandExt as _;

#[test]
fn b_second_apply_changes_nothing() {
    let c = Cluster::new("idem", 3, false, 1500);
    let spec = c.spec("net.yaml", TWO_NETWORKS);
    c.apply_all(&spec);
    for n in ["node-a", "node-c"] {
        let mut plan = String::new();
        let events = monitored(&c.node(n).ns.clone(), || plan = c.apply(n, &spec));
        assert!(plan.contains("No changes"), "{plan}");
        assert!(plan_lines(&plan).is_empty(), "{plan}");
        // Bridge learning of traffic is not ours; any event about our objects would be.
        let ours: Vec<&str> = events.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(
            ours.is_empty(),
            "kernel changed during a no-op apply on {n}:\n{events}"
        );
    }
}

#[test]
fn c_drift_is_repaired_exactly() {
    let c = Cluster::new("drift", 3, false, 1500);
    let spec = c.spec("net.yaml", TWO_NETWORKS);
    c.apply_all(&spec);
    let a = c.node("node-a").ns.clone();
    let (b, cc) = (
        c.node("node-b").address.clone(),
        c.node("node-c").address.clone(),
    );
    ok(&format!("ip -n {a} link del ovvx-200"));
    ok(&format!(
        "bridge -n {a} fdb del 00:00:00:00:00:00 dev ovvx-100 dst {cc}"
    ));
    ok(&format!("ip -n {a} link set ovbr-100 mtu 1300"));
    let plan = c.apply("node-a", &spec);
    let mut want = vec![
        "+ link ovvx-200 (vxlan vni 200 local 192.0.2.1 dstport 4789 dev eth0, mtu 1450, master ovbr-200) network red".to_owned(),
        format!("+ fdb 00:00:00:00:00:00 dst {b} on ovvx-200"),
        "~ link ovvx-200 down => up".to_owned(),
        format!("+ fdb 00:00:00:00:00:00 dst {cc} on ovvx-100"),
        "~ link ovbr-100 mtu 1300 => 1450".to_owned(),
        // The kernel resets a bridge's MTU when its last port goes: part of the drift.
        "~ link ovbr-200 mtu 1500 => 1450".to_owned(),
    ];
    want.sort();
    assert_eq!(plan_lines(&plan), want, "{plan}");
    assert!(c.apply("node-a", &spec).contains("No changes"));
    assert!(c.ping_eventually("node-a", "10.2.0.2"));
    assert!(c.ping_eventually("node-a", "10.1.0.3"));
    // Learning switched off by hand: the device is made again as it should be.
    ok(&format!(
        "ip -n {a} link set ovvx-100 type vxlan nolearning"
    ));
    assert_eq!(
        c.link("node-a", "ovvx-100").unwrap()["linkinfo"]["info_data"]["learning"],
        false
    );
    let plan = c.apply("node-a", &spec);
    assert!(
        plan.contains("- link ovvx-100") && plan.contains("+ link ovvx-100 (vxlan vni 100"),
        "{plan}"
    );
    assert_eq!(
        c.link("node-a", "ovvx-100").unwrap()["linkinfo"]["info_data"]["learning"],
        true
    );
    assert!(c.apply("node-a", &spec).contains("No changes"));
    assert!(c.ping_eventually("node-a", "10.1.0.3"));
}

#[test]
fn d_spec_changes_converge_with_exact_plans() {
    let c = Cluster::new("chg", 3, false, 1500);
    let spec = c.spec("net.yaml", TWO_NETWORKS);
    c.apply_all(&spec);
    let (a, cc) = (
        c.node("node-a").address.clone(),
        c.node("node-c").address.clone(),
    );
    // node-c leaves blue, blue's MTU changes, red's VNI changes to 201.
    let changed = c.spec(
        "net2.yaml",
        "  - name: blue
    vni: 100
    mtu: 1400
    nodes: [node-a, node-b]
    addresses: {node-a: 10.1.0.1/24, node-b: 10.1.0.2/24}
  - name: red
    vni: 201
    nodes: [node-a, node-b]
    addresses: {node-a: 10.2.0.1/24, node-b: 10.2.0.2/24}
",
    );
    let plan_b = c.apply("node-b", &changed);
    let mut want = vec![
        format!("- fdb 00:00:00:00:00:00 dst {cc} on ovvx-100"),
        "~ link ovbr-100 mtu 1450 => 1400".to_owned(),
        "~ link ovvx-100 mtu 1450 => 1400".to_owned(),
        "- link ovvx-200".to_owned(),
        "- link ovbr-200".to_owned(),
        "+ link ovbr-201 (bridge, mtu 1450) network red".to_owned(),
        "+ link ovvx-201 (vxlan vni 201 local 192.0.2.2 dstport 4789 dev eth0, mtu 1450, master ovbr-201) network red".to_owned(),
        "+ address 10.2.0.2/24 on ovbr-201".to_owned(),
        format!("+ fdb 00:00:00:00:00:00 dst {a} on ovvx-201"),
        "~ link ovbr-201 down => up".to_owned(),
        "~ link ovvx-201 down => up".to_owned(),
    ];
    want.sort();
    assert_eq!(plan_lines(&plan_b), want, "{plan_b}");
    let plan_c = c.apply("node-c", &changed);
    let mut want_c = vec!["- link ovvx-100".to_owned(), "- link ovbr-100".to_owned()];
    want_c.sort();
    assert_eq!(plan_lines(&plan_c), want_c, "{plan_c}");
    c.apply("node-a", &changed);
    assert!(c.ping_eventually("node-a", "10.2.0.2"));
    assert!(c.ping_eventually("node-b", "10.1.0.1"));
    // A network removed from the spec is removed from the kernel.
    let only_blue = c.spec(
        "net3.yaml",
        "  - name: blue\n    vni: 100\n    mtu: 1400\n    nodes: [node-a, node-b]\n",
    );
    let plan = c.apply("node-a", &only_blue);
    assert!(
        plan_lines(&plan).contains(&"- link ovbr-201".to_owned()),
        "{plan}"
    );
    assert!(
        plan_lines(&plan).contains(&"- address 10.1.0.1/24 on ovbr-100".to_owned()),
        "{plan}"
    );
    assert!(c.link("node-a", "ovvx-201").is_none());
    assert!(c.apply("node-a", &only_blue).contains("No changes"));
}

#[test]
fn e_killed_apply_converges_on_the_next_run() {
    let c = Cluster::new("crash", 1, false, 1500);
    let mut nets = String::new();
    for i in 0..200 {
        nets.push_str(&format!("  - name: n{i}\n    vni: {}\n", 1000 + i));
    }
    let spec = c.spec("big.yaml", &nets);
    let ns = c.node("node-a").ns.clone();
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            BIN,
            "apply",
            "-f",
            spec.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once it has created some but not all of the 400 links.
    let mut seen = 0;
    for _ in 0..2000 {
        seen = ok(&format!("ip -n {ns} -o link show | grep -c ' ov' || true"))
            .trim()
            .parse()
            .unwrap_or(0);
        if seen >= 40 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    let after_kill: usize = ok(&format!("ip -n {ns} -o link show | grep -c ' ov' || true"))
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(
        seen >= 40 && after_kill < 400,
        "did not catch the apply halfway (saw {seen}, then {after_kill} links)"
    );
    let plan = c.apply("node-a", &spec);
    assert!(!plan_lines(&plan).is_empty());
    assert!(c.apply("node-a", &spec).contains("No changes"));
    let links: usize = ok(&format!("ip -n {ns} -o link show up | grep -c ' ov'"))
        .trim()
        .parse()
        .unwrap();
    assert_eq!(links, 400);
    // What a kill between a create and its alias leaves (no alias, our half-created
    // device group), of a network this spec does not have: the next apply removes it.
    ok(&format!(
        "ip -n {ns} link add ovbr-7777 group {} type bridge",
        ovl::kernel::HALF_CREATED_GROUP
    ));
    let plan = c.apply("node-a", &spec);
    assert!(plan.contains("- link ovbr-7777"), "{plan}");
    assert!(c.link("node-a", "ovbr-7777").is_none());
}

#[test]
fn f_delete_removes_ours_and_spares_foreign_objects() {
    let c = Cluster::new("del", 2, false, 1500);
    let spec = c.spec(
        "net.yaml",
        "  - name: blue\n    vni: 100\n    addresses: {node-a: 10.1.0.1/24, node-b: 10.1.0.2/24}\n",
    );
    let a = c.node("node-a").ns.clone();
    // Foreign objects, including ones that look like ours by name.
    ok(&format!(
        "ip -n {a} link add userbr type bridge && \
         ip -n {a} link add uservx type vxlan id 77 local 192.0.2.1 dstport 4789 dev eth0 && \
         ip -n {a} link set uservx master userbr && \
         bridge -n {a} fdb append 00:00:00:00:00:00 dev uservx dst 192.0.2.99 && \
         ip -n {a} link add ovbr-300 type bridge"
    ));
    let foreign = |c: &Cluster| {
        (
            c.link("node-a", "userbr").is_some(),
            c.link("node-a", "uservx").is_some(),
            c.link("node-a", "ovbr-300").is_some(),
            c.fdb_dsts("node-a", "uservx"),
        )
    };
    let before = foreign(&c);
    assert_eq!(before, (true, true, true, vec!["192.0.2.99".to_owned()]));
    c.apply_all(&spec);
    assert!(c.ping_eventually("node-a", "10.1.0.2"));
    assert_eq!(foreign(&c), before);
    let out = c.ctl("node-a", &["delete", "-f", spec.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(c.link("node-a", "ovbr-100").is_none() && c.link("node-a", "ovvx-100").is_none());
    assert_eq!(foreign(&c), before);
    let st = c.ctl("node-a", &["status"]);
    assert!(
        stdout(&st).contains("No overlay networks"),
        "{}",
        stdout(&st)
    );
    // Delete again: nothing to do, still exit 0.
    let out = c.ctl("node-a", &["delete", "-f", spec.to_str().unwrap()]);
    assert!(out.status.success() && stdout(&out).contains("No changes"));

    // A network whose bridge name a foreign link holds: refused before any change, with
    // the plan shown and the clash named; exit 1.
    let clash = c.spec(
        "clash.yaml",
        "  - name: blue\n    vni: 100\n  - name: green\n    vni: 300\n",
    );
    let out = c.ctl("node-a", &["apply", "-f", clash.to_str().unwrap()]);
    assert_exit(&out, 1);
    let (text, err) = (stdout(&out), stderr(&out));
    assert!(
        text.contains("ovbr-300") && text.contains("ovbr-100"),
        "the plan is shown: {text}"
    );
    assert!(
        text.contains("This plan cannot start") && text.contains("Nothing was changed"),
        "{text}"
    );
    assert!(
        err.contains("ovbr-300") && err.contains("nothing was changed"),
        "{err}"
    );
    assert!(c.link("node-a", "ovbr-100").is_none(), "nothing created");
    assert_eq!(foreign(&c), before);
    // A dry run says the same before anything is tried.
    let out = c.ctl(
        "node-a",
        &["apply", "-f", clash.to_str().unwrap(), "--dry-run"],
    );
    assert_exit(&out, 1);
    assert!(
        stdout(&out).contains("This plan cannot start") && stderr(&out).contains("ovbr-300"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).starts_with("Dry run for node node-a: nothing is changed."),
        "a dry run says so first, also when its plan cannot start: {}",
        stdout(&out)
    );
}

fn mtu_edges(ipv6: bool) {
    let c = Cluster::new("mtu", 2, ipv6, 1500);
    let spec = c.spec(
        "net.yaml",
        "  - name: blue\n    vni: 100\n    addresses: {node-a: 10.1.0.1/24, node-b: 10.1.0.2/24}\n",
    );
    c.apply_all(&spec);
    assert!(c.ping_eventually("node-a", "10.1.0.2"));
    let mtu = if ipv6 { 1430 } else { 1450 };
    assert_mtu_edge(&c, "node-a", "10.1.0.2", mtu);
    if ipv6 {
        // An underlay that leaves less than IPv6's 1280 for a network with IPv6
        // addresses: refused before any change (the kernel would drop the addresses).
        let six = c.spec(
            "six.yaml",
            "  - name: six\n    vni: 600\n    addresses: {node-a: \"fd00:60::1/64\"}\n",
        );
        let a = c.node("node-a").ns.clone();
        ok(&format!("ip -n {a} link set eth0 mtu 1300"));
        let out = c.ctl("node-a", &["apply", "-f", six.to_str().unwrap()]);
        assert_exit(&out, 2);
        assert!(
            stderr(&out).contains("below the 1280 that its IPv6 addresses need"),
            "{}",
            stderr(&out)
        );
        assert!(c.link("node-a", "ovbr-600").is_none(), "nothing created");
        assert_eq!(
            c.link("node-a", "ovbr-100").unwrap()["mtu"],
            mtu,
            "nothing changed"
        );
    }
}

#[test]
fn h_mtu_edge_ipv4() {
    mtu_edges(false);
}

#[test]
fn h_mtu_edge_ipv6() {
    mtu_edges(true);
}

#[test]
fn i_logs_are_json_lines_or_plain_text_with_one_event_per_change() {
    require_root();
    let c = Cluster::new("logs", 3, false, 1500);
    let spec = c.spec("net.yaml", TWO_NETWORKS);
    let spec = spec.to_str().unwrap();
    // JSON: every line of stderr is one JSON object; each kernel change is one event
    // naming the change (which carries the network's devices and the peer).
    let out = c.ctl(
        "node-a",
        &[
            "apply",
            "-f",
            spec,
            "--log-level",
            "debug",
            "--log-format",
            "json",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let plan = plan_lines(&stdout(&out));
    let err = stderr(&out);
    let events: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    let changes: Vec<&str> = events
        .iter()
        .filter(|e| e["message"] == "kernel change")
        .map(|e| e["change"].as_str().expect("a change field"))
        .collect();
    assert_eq!(
        changes.len(),
        plan.len(),
        "one log event per change: {changes:?} vs plan {plan:?}"
    );
    assert!(events.iter().all(|e| e["level"].is_string()));
    // Text to a file or pipe (systemd, cron): no colour codes.
    c.ctl("node-a", &["delete", "-f", spec]);
    let out = c.ctl("node-a", &["apply", "-f", spec, "--log-level", "debug"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("kernel change"), "{err}");
    assert!(
        !err.contains('\x1b'),
        "colour codes in logs to a pipe: {err:?}"
    );
}

/// Polls `check` every 100 ms for up to `secs` seconds. Windows are generous: tests
/// run side by side on two cores, and what is awaited usually comes at once.
fn within(secs: u64, mut check: impl FnMut() -> bool) -> bool {
    for _ in 0..secs * 10 {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    check()
}

/// Writes a plaintext-only spec file without any publicKey (agents then run without key
/// files): the cluster's nodes and the given `networks:` block.
fn keyless_spec(c: &Cluster, file: &str, networks: &str) -> std::path::PathBuf {
    let nodes: String = c
        .nodes
        .iter()
        .map(|n| format!("  - name: {}\n    address: \"{}\"\n", n.name, n.address))
        .collect();
    let path = c.dir.path().join(file);
    let text = format!(
        "apiVersion: ovl/v1\ncluster:\n  name: keyless\nnodes:\n{nodes}networks:\n{networks}"
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn j_keyless_agents_keep_plaintext_networks_and_delete_goes_through_them() {
    let c = Cluster::new("agdel", 2, false, 1500);
    // Plaintext only, no publicKey anywhere and no key files: the agents still run.
    let blue =
        "  - name: blue\n    vni: 100\n    addresses: {node-a: 10.1.0.1/24, node-b: 10.1.0.2/24}\n";
    let green = "  - name: green\n    vni: 101\n    addresses: {node-a: 10.2.0.1/24, node-b: 10.2.0.2/24}\n";
    let write = |file: &str, networks: &str| keyless_spec(&c, file, networks);
    let both = write("both.yaml", &format!("{blue}{green}"));
    let only_green = write("green.yaml", green);
    let mut agents = Agents::default();
    for n in ["node-a", "node-b"] {
        assert!(!c.node_dir(n).join("node.key").exists());
        agents.0.insert(n.into(), c.start_agent(n, &both, "info"));
    }
    // The agents' first passes (their sockets are up before them).
    for n in ["node-a", "node-b"] {
        assert!(
            within(30, || c.link(n, "ovbr-100").is_some()
                && c.link(n, "ovbr-101").is_some()),
            "{}",
            c.agent_log(n)
        );
    }
    assert!(c.ping_eventually("node-a", "10.1.0.2"));
    assert!(c.ping_eventually("node-a", "10.2.0.2"));
    assert!(
        c.agent_log("node-a")
            .contains("throwaway control-plane key"),
        "{}",
        c.agent_log("node-a")
    );
    let a = c.node("node-a").ns.clone();
    // The agent keeps the spec true: a device deleted by hand comes back.
    ok(&format!("ip -n {a} link del ovvx-101"));
    assert!(
        within(30, || c.link("node-a", "ovvx-101").is_some()),
        "the agent did not repair a deleted device"
    );

    // A dry-run delete through the agent changes nothing.
    let out = c.ctl_agent(
        "node-a",
        &["delete", "-f", only_green.to_str().unwrap(), "--dry-run"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("Dry run"), "{}", stdout(&out));
    assert!(stdout(&out).contains("- link ovbr-101"), "{}", stdout(&out));
    assert!(c.link("node-a", "ovbr-101").is_some());
    // Through the agent, delete removes the network, and the agent does not bring it back.
    let out = c.ctl_agent("node-a", &["delete", "-f", only_green.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let plan = stdout(&out);
    assert!(
        plan.contains("- link ovbr-101")
            && plan.contains("- link ovvx-101")
            && !plan.contains("ovbr-100"),
        "{plan}"
    );
    // Longer than the agent's event debounce; the periodic pass would also come by.
    std::thread::sleep(Duration::from_secs(3));
    assert!(c.link("node-a", "ovbr-101").is_none() && c.link("node-a", "ovvx-101").is_none());
    assert!(
        c.ping("node-a", "10.1.0.2"),
        "the other network must keep working"
    );
    let status = stdout(&c.ctl_agent("node-a", &["status"]));
    assert!(
        status.contains("blue") && !status.contains("green"),
        "{status}"
    );
    // A --node that is not the agent's is refused, and nothing changes.
    let socket = c.node_dir("node-a").join("agent.sock");
    for command in [
        &["delete", "-f", both.to_str().unwrap()][..],
        &["status"][..],
        &["rotate"][..],
    ] {
        let mut args = command.to_vec();
        args.extend(["--node", "node-b", "--socket", socket.to_str().unwrap()]);
        let out = c.ctl("node-a", &args);
        assert_exit(&out, 2);
        assert!(
            stderr(&out).contains("this agent runs node node-a, not node-b"),
            "{command:?}: {}",
            stderr(&out)
        );
    }
    assert!(c.link("node-a", "ovbr-100").is_some());
    // Applying the whole spec again through the agent brings the network back.
    let plan = c.apply_via_agent("node-a", &both);
    assert!(plan.contains("+ link ovbr-101"), "{plan}");
    assert!(c.ping_eventually("node-a", "10.2.0.2"));
    // A spec whose MTU this node's underlay cannot carry is refused (exit 2) and not
    // taken: the agent keeps its spec, and keeps it true.
    let too_big = write(
        "too-big.yaml",
        &format!(
            "{blue}{}",
            green.replace("    vni: 101\n", "    vni: 101\n    mtu: 9000\n")
        ),
    );
    let out = c.ctl_agent("node-a", &["apply", "-f", too_big.to_str().unwrap()]);
    assert_exit(&out, 2);
    assert!(stderr(&out).contains("too-big.yaml:"), "{}", stderr(&out));
    let status = stdout(&c.ctl_agent("node-a", &["status"]));
    assert!(!status.contains("NOT in sync"), "{status}");
    // So is a spec whose plan could not start: a foreign link has a bridge's name.
    ok(&format!("ip -n {a} link add ovbr-102 type bridge"));
    let clash = write(
        "clash.yaml",
        &format!("{blue}{green}  - name: red\n    vni: 102\n"),
    );
    let out = c.ctl_agent("node-a", &["apply", "-f", clash.to_str().unwrap()]);
    assert_exit(&out, 1);
    assert!(
        stdout(&out).contains("The agent keeps the spec it had")
            && stderr(&out).contains("ovbr-102"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let status = stdout(&c.ctl_agent("node-a", &["status"]));
    assert!(
        !status.contains("NOT in sync") && !status.contains("red"),
        "{status}"
    );
    ok(&format!("ip -n {a} addr del 10.2.0.1/24 dev ovbr-101"));
    assert!(
        within(30, || c.ping("node-a", "10.2.0.2")),
        "the agent stopped repairing drift after a refused spec"
    );
    // Stopped (as systemd stops it), the agent exits 0 and removes its socket; the
    // overlay keeps working without it.
    let mut agent = agents.0.remove("node-a").unwrap();
    ok(&format!("kill -TERM {}", agent.id()));
    let status = agent.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists(), "the socket was left behind");
    assert!(c.ping("node-a", "10.2.0.2"));
    drop(agents);
}

#[test]
fn k_applies_without_an_agent_wait_for_each_other() {
    let c = Cluster::new("lock", 2, false, 1500);
    let spec = c.spec(
        "net.yaml",
        "  - name: blue\n    vni: 100\n    addresses: {node-a: 10.1.0.1/24, node-b: 10.1.0.2/24}\n",
    );
    let state = c.dir.path().join("state-a");
    let lock = state.join("apply.lock");
    std::fs::create_dir_all(&state).unwrap();
    // Someone holds the node's lock for two seconds.
    let holder = Command::new("flock")
        .arg(&lock)
        .args(["sleep", "2"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = c.ctl(
        "node-a",
        &[
            "apply",
            "-f",
            spec.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("waiting for another apply"),
        "{}",
        stderr(&out)
    );
    let mut holder = holder;
    // The apply could only finish after the holder let go.
    assert!(
        holder.try_wait().unwrap().is_some(),
        "apply did not wait for the lock"
    );
    let _ = holder.wait();
    assert!(c.link("node-a", "ovbr-100").is_some());
}

/// Routed VTEPs: each node's address on `lo`, reached through a route over eth0. The
/// MTU of `lo` says nothing of the path, so a network without `mtu` is refused (exit 2,
/// nothing created); with the fabric's MTU set in the spec, the overlay works and
/// full-size packets pass without fragmentation.
#[test]
fn l_a_vtep_address_on_loopback_needs_an_explicit_mtu() {
    let mut c = Cluster::new("lovtep", 2, false, 1500);
    for (i, node) in c.nodes.iter_mut().enumerate() {
        let (mine, theirs) = (
            format!("198.51.100.{}", i + 1),
            format!("198.51.100.{}", 2 - i),
        );
        let via = format!("192.0.2.{}", 2 - i);
        ok(&format!(
            "ip -n {ns} addr add {mine}/32 dev lo && ip -n {ns} route add {theirs}/32 via {via}",
            ns = node.ns
        ));
        node.address = mine;
    }
    let without_mtu = c.spec(
        "net.yaml",
        "  - name: blue\n    vni: 100\n    addresses: {node-a: 10.1.0.1/24, node-b: 10.1.0.2/24}\n",
    );
    let out = c.ctl("node-a", &["apply", "-f", without_mtu.to_str().unwrap()]);
    assert_exit(&out, 2);
    assert!(
        stderr(&out).contains("is on lo, a loopback or dummy device")
            && stderr(&out).contains("blue"),
        "{}",
        stderr(&out)
    );
    assert!(c.link("node-a", "ovbr-100").is_none(), "nothing created");
    // The path carries 1500: 1450 for the overlay.
    let sized = c.spec(
        "sized.yaml",
        "  - name: blue\n    vni: 100\n    mtu: 1450\n    addresses: {node-a: 10.1.0.1/24, node-b: 10.1.0.2/24}\n",
    );
    c.apply_all(&sized);
    assert!(c.ping_eventually("node-a", "10.1.0.2"));
    assert_mtu_edge(&c, "node-a", "10.1.0.2", 1450);
}

/// A peer that moves to another underlay address: the plan replaces its head-end entry,
/// and what the devices learned about its old address goes too, so frames to its MACs
/// do not keep following the old address until it sends again.
#[test]
fn m_a_moved_peer_leaves_no_learned_entries_behind() {
    let c = Cluster::new("move", 3, false, 1500);
    let blue = "  - name: blue\n    vni: 100\n    addresses: {node-a: 10.1.0.1/24, node-b: 10.1.0.2/24, node-c: 10.1.0.3/24}\n";
    let spec = c.spec("net.yaml", blue);
    c.apply_all(&spec);
    assert!(c.ping_eventually("node-a", "10.1.0.3"));
    let a = c.node("node-a").ns.clone();
    let learned_towards = |remote: &str| -> Vec<String> {
        ok(&format!("bridge -n {a} fdb show dev ovvx-100"))
            .lines()
            .filter(|l| {
                !l.starts_with("00:00:00:00:00:00") && l.contains(&format!("dst {remote} "))
            })
            .map(str::to_owned)
            .collect()
    };
    assert!(
        !learned_towards("192.0.2.3").is_empty(),
        "node-a learned nothing from node-c"
    );
    // node-c moves to 192.0.2.7 (its VXLAN device is recreated; its bridge keeps its
    // own MAC, so the peers' ARP caches stay right).
    let bridge_mac = || c.link("node-c", "ovbr-100").unwrap()["address"].clone();
    let mac_before = bridge_mac();
    let ns_c = c.node("node-c").ns.clone();
    ok(&format!(
        "ip -n {ns_c} addr del 192.0.2.3/24 dev eth0 && ip -n {ns_c} addr add 192.0.2.7/24 dev eth0"
    ));
    let moved = c.dir.path().join("moved.yaml");
    std::fs::write(
        &moved,
        std::fs::read_to_string(&spec)
            .unwrap()
            .replace("\"192.0.2.3\"", "\"192.0.2.7\""),
    )
    .unwrap();
    let plan = c.apply("node-a", &moved);
    assert!(
        plan.contains("- fdb 00:00:00:00:00:00 dst 192.0.2.3"),
        "{plan}"
    );
    assert_eq!(learned_towards("192.0.2.3"), Vec::<String>::new());
    c.apply("node-b", &moved);
    c.apply("node-c", &moved);
    assert_eq!(bridge_mac(), mac_before);
    assert!(c.ping_eventually("node-a", "10.1.0.3"));
}

/// An agent that starts while a run of `apply` without an agent holds the node's lock
/// waits for it before its first pass (the two plans would trip over each other), and a
/// run that finds the lock taken while an agent listens hands its request to the agent.
#[test]
fn n_an_agent_starting_waits_for_a_running_apply_and_takes_its_turn() {
    let c = Cluster::new("aglock", 2, false, 1500);
    let spec = keyless_spec(&c, "net.yaml", "  - name: blue\n    vni: 100\n");
    let state = c.node_dir("node-a").join("state");
    std::fs::create_dir_all(&state).unwrap();
    // A run without an agent holds the lock for three seconds.
    let mut holder = Command::new("flock")
        .arg(state.join("apply.lock"))
        .args(["sleep", "3"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut agents = Agents::default();
    agents
        .0
        .insert("node-a".into(), c.start_agent("node-a", &spec, "info"));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        holder.try_wait().unwrap().is_none() && c.link("node-a", "ovbr-100").is_none(),
        "the agent changed the kernel while the lock was held"
    );
    assert!(
        c.agent_log("node-a")
            .contains("waiting for a run of apply or delete"),
        "{}",
        c.agent_log("node-a")
    );
    let _ = holder.wait();
    assert!(
        within(30, || c.link("node-a", "ovbr-100").is_some()),
        "the agent did not take its turn: {}",
        c.agent_log("node-a")
    );
    // With the agent listening, a run goes through it.
    let out = c.ctl_agent("node-a", &["apply", "-f", spec.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("No changes"), "{}", stdout(&out));
}

/// An agent stopped (SIGTERM) while it carries out an `apply` first lets that answer
/// out: the client sees the plan and success, not a lost connection.
#[test]
fn o_an_agent_stopping_mid_apply_still_answers_it() {
    let c = Cluster::new("agstop", 2, false, 1500);
    let write = |file: &str, networks: &str| keyless_spec(&c, file, networks);
    let small = write("small.yaml", "  - name: blue\n    vni: 100\n");
    // Enough networks that applying them takes a while.
    let many: String = (0..400)
        .map(|i| format!("  - name: n{i}\n    vni: {}\n", 1000 + i))
        .collect();
    let big = write("big.yaml", &many);
    let mut agent = c.start_agent("node-a", &small, "info");
    assert!(within(30, || c.link("node-a", "ovbr-100").is_some()));
    let mut full: Vec<String> = vec!["apply".into(), "-f".into(), big.display().to_string()];
    full.extend(c.agent_opts("node-a"));
    let apply = Command::new("ip")
        .args(["netns", "exec", &c.node("node-a").ns, BIN])
        .args(&full)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Stopped as soon as the plan has begun, long before its end.
    assert!(within(30, || c.link("node-a", "ovbr-1000").is_some()));
    ok(&format!("kill -TERM {}", agent.id()));
    let stopped_before_the_end = c.link("node-a", "ovbr-1399").is_none();
    let out = apply.wait_with_output().unwrap();
    let _ = agent.wait();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("+ link ovbr-1399"),
        "{}",
        stdout(&out)
    );
    assert!(c.link("node-a", "ovbr-1399").is_some());
    if !stopped_before_the_end {
        eprintln!("note: the plan had ended before the agent was told to stop");
    }
}

/// XFRM objects of ours left behind by an encrypted spec go when a spec without any
/// encrypted network is applied without an agent; foreign ones stay. (This kernel has
/// no ESP: the leftover is made by hand, as the controller makes its catch-all block,
/// in the controller's reqid range.)
#[test]
fn p_a_plaintext_only_apply_removes_our_leftover_xfrm_objects() {
    let c = Cluster::new("xleft", 2, false, 1500);
    let spec = keyless_spec(&c, "plain.yaml", "  - name: blue\n    vni: 100\n");
    let a = c.node("node-a").ns.clone();
    let policies = || ok(&format!("ip -n {a} xfrm policy"));
    ok(&format!(
        "ip -n {a} xfrm policy add src 0.0.0.0/0 dst 0.0.0.0/0 proto udp dport 4790 dir out \
         action block priority 2000 tmpl proto esp reqid 0x0f710001 mode transport"
    ));
    ok(&format!(
        "ip -n {a} xfrm policy add src 0.0.0.0/0 dst 0.0.0.0/0 proto udp dport 5555 dir out \
         action block priority 2000 tmpl proto esp reqid 7 mode transport"
    ));
    let plan = c.apply("node-a", &spec);
    assert!(plan.contains("- xfrm policy"), "{plan}");
    let left = policies();
    assert!(!left.contains("dport 4790"), "ours stayed:\n{left}");
    assert!(
        left.contains("dport 5555"),
        "the foreign policy went:\n{left}"
    );
    // And with nothing of ours left, the next run has nothing to do.
    let again = c.apply("node-a", &spec);
    assert!(again.contains("No changes"), "{again}");
}
