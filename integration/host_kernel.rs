//! Fail closed on a kernel without ESP (this machine's own kernel): an encrypted network
//! is not brought up, `apply` exits 1 naming the missing kernel support, and plaintext
//! networks in the same spec still work.

mod common;

use common::*;

const SPEC: &str = "  - name: sec
    vni: 300
    encrypted: true
    addresses: {node-a: 10.3.0.1/24, node-b: 10.3.0.2/24}
  - name: blue
    vni: 100
    addresses: {node-a: 10.1.0.1/24, node-b: 10.1.0.2/24}
";

#[test]
fn e_encrypted_network_fails_closed_without_esp() {
    require_root();
    let c = Cluster::new("noesp", 2, false, 1500);
    let probe = sh(&format!(
        "ip -n {} xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x42 mode transport aead 'rfc4106(gcm(aes))' 0x{} 128",
        c.node("node-a").ns,
        "11".repeat(36)
    ));
    assert!(
        !probe.status.success(),
        "this test checks a kernel WITHOUT ESP; this kernel has it (the ESP tests run under UML)"
    );
    let spec = c.spec("net.yaml", SPEC);
    let cap = Capture::start(&c, "noesp", "udp port 4790");
    for n in ["node-a", "node-b"] {
        let out = c.ctl(n, &["apply", "-f", spec.to_str().unwrap()]);
        assert_exit(&out, 1);
        let err = stderr(&out);
        assert!(
            err.contains("encrypted networks sec were not brought up"),
            "{err}"
        );
        assert!(
            err.contains("CONFIG_INET_ESP"),
            "the error must name the missing kernel support: {err}"
        );
        // The plan shows the plaintext network only.
        assert!(
            stdout(&out).contains("ovbr-100") && !stdout(&out).contains("ovbr-300"),
            "{}",
            stdout(&out)
        );
    }
    assert!(c.link("node-a", "ovbr-300").is_none() && c.link("node-a", "ovvx-300").is_none());
    assert!(
        c.ping_eventually("node-a", "10.1.0.2"),
        "plaintext network must still work"
    );
    // Nothing can be sent on the encrypted network: it has no device to send through.
    let send = sh(&format!(
        "ip netns exec {} ping -c 1 -W 1 -I ovbr-300 10.3.0.2",
        c.node("node-a").ns
    ));
    assert!(!send.status.success());
    assert_eq!(
        cap.stop().lines(""),
        Vec::<String>::new(),
        "a packet to the encrypted port left a node"
    );
    // A second run changes nothing and fails the same way.
    let out = c.ctl("node-a", &["apply", "-f", spec.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains(
            "No changes to the plaintext networks; the encrypted ones are left as they are"
        ),
        "{}",
        stdout(&out)
    );
    // An encrypted network's MTU that cannot fit (1416 is the most a 1500 underlay
    // carries) is the operator's error now, ESP or not: exit 2, its place in the file,
    // and nothing changed (the plaintext network's MTU change is not applied either).
    let too_big = c.spec(
        "mtu.yaml",
        &SPEC
            .replace(
                "    encrypted: true\n",
                "    encrypted: true\n    mtu: 1417\n",
            )
            .replace("    vni: 100\n", "    vni: 100\n    mtu: 1400\n"),
    );
    let out = c.ctl("node-a", &["apply", "-f", too_big.to_str().unwrap()]);
    assert_exit(&out, 2);
    assert!(
        stderr(&out).contains("mtu.yaml:") && stderr(&out).contains("1417"),
        "{}",
        stderr(&out)
    );
    assert_eq!(c.link("node-a", "ovbr-100").unwrap()["mtu"], 1450);
}

#[test]
fn f_agents_without_esp_keep_plaintext_up_and_hold_encrypted_quietly() {
    require_root();
    let c = Cluster::new("noespag", 2, false, 1500);
    c.keygen_all();
    let spec = c.spec("net.yaml", SPEC);
    let blue_only = c.spec(
        "blue.yaml",
        "  - name: blue\n    vni: 100\n    addresses: {node-a: 10.1.0.1/24, node-b: 10.1.0.2/24}\n",
    );
    let mut agents = Agents::default();
    for n in ["node-a", "node-b"] {
        agents.0.insert(n.into(), c.start_agent(n, &spec, "info"));
    }
    assert!(c.ping_eventually("node-a", "10.1.0.2"));
    // Long enough for several retries of the failed pass and for the peers' sessions.
    std::thread::sleep(std::time::Duration::from_secs(8));
    for n in ["node-a", "node-b"] {
        let log = c.agent_log(n);
        let failures: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("reconcile failed"))
            .collect();
        assert_eq!(failures.len(), 1, "the same failure is logged once:\n{log}");
        assert!(failures[0].contains("CONFIG_INET_ESP"), "{}", failures[0]);
        // Nothing was installed, so nothing can vanish and be rekeyed over and over.
        assert!(!log.contains("vanished"), "{log}");
        // The failing passes hold back key messages, not the Hello that keeps the
        // session: the peer must not drop it as silent and make it start over.
        assert!(!log.contains("sent nothing"), "{log}");
        assert!(
            log.matches("control session established").count() <= 1,
            "sessions started over:\n{log}"
        );
        assert_eq!(ok(&format!("ip -n {} xfrm state", c.node(n).ns)).trim(), "");
        assert!(c.link(n, "ovbr-300").is_none() && c.link(n, "ovvx-300").is_none());
    }
    // rotate says at once why it cannot work.
    let started = std::time::Instant::now();
    let out = c.ctl_agent("node-a", &["rotate", "--timeout", "30"]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("cannot rotate") && stderr(&out).contains("CONFIG_INET_ESP"),
        "{}",
        stderr(&out)
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "rotate waited for its timeout"
    );
    // Deleting the plaintext network through the agent succeeds; the encrypted one that
    // stays down is a note, not a failure of the delete.
    let out = c.ctl_agent("node-a", &["delete", "-f", blue_only.to_str().unwrap()]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("- link ovbr-100") && stdout(&out).contains("Note:"),
        "{}",
        stdout(&out)
    );
    assert!(c.link("node-a", "ovbr-100").is_none());
    drop(agents);
}

/// A network that was plaintext and becomes encrypted in the spec: on a kernel without
/// ESP (or with no agent to key it) its plaintext VXLAN device must go, not keep
/// carrying the network in clear while the encrypted form is held.
#[test]
fn g_a_plaintext_network_made_encrypted_stops_carrying_cleartext() {
    require_root();
    let c = Cluster::new("toenc", 2, false, 1500);
    let plain = c.spec("plain.yaml", &SPEC.replace("    encrypted: true\n", ""));
    c.apply_all(&plain);
    assert!(
        c.ping_eventually("node-a", "10.3.0.2"),
        "sec works in clear first"
    );
    let encrypted = c.spec("net.yaml", SPEC);
    // Any VXLAN packet of VNI 300 (0x00012c in the header's VNI field) on either port.
    let cap = Capture::start(
        &c,
        "toenc",
        "udp port 4790 or (udp port 4789 and udp[12:4] = 0x00012c00)",
    );
    for n in ["node-a", "node-b"] {
        let out = c.ctl(n, &["apply", "-f", encrypted.to_str().unwrap()]);
        assert_exit(&out, 1);
        assert!(
            stderr(&out).contains("encrypted networks sec were not brought up"),
            "{}",
            stderr(&out)
        );
        assert!(
            plan_lines(&stdout(&out))
                .iter()
                .any(|l| l.starts_with("- link ovvx-300"))
                && plan_lines(&stdout(&out))
                    .iter()
                    .any(|l| l.starts_with("- link ovbr-300")),
            "the plan takes the plaintext network down: {}",
            stdout(&out)
        );
        assert!(
            c.link(n, "ovvx-300").is_none(),
            "{n} keeps no device for sec"
        );
    }
    let send = sh(&format!(
        "ip netns exec {} ping -c 3 -i 0.2 -W 1 10.3.0.2",
        c.node("node-a").ns
    ));
    assert!(!send.status.success(), "sec still carries traffic");
    assert_eq!(
        cap.stop().lines(""),
        Vec::<String>::new(),
        "a packet of the encrypted network left a node"
    );
    // The plaintext network is untouched, and a second run changes nothing.
    assert!(c.ping_eventually("node-a", "10.1.0.2"));
    let out = c.ctl("node-a", &["apply", "-f", encrypted.to_str().unwrap()]);
    assert_exit(&out, 1);
    assert!(
        stdout(&out).contains("No changes to the plaintext networks"),
        "{}",
        stdout(&out)
    );
}
