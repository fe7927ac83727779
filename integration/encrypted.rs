//! Encrypted networks on a real ESP kernel (run inside user-mode-linux by
//! scripts/test.sh). Keys are handed to the library directly; agents come later.
//! Everything is checked on the kernel's own view and on the underlay wire.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use ovl::desired::Keyring;

const NETWORKS: &str = "  - name: sec
    vni: 300
    encrypted: true
    addresses: {node-a: 10.3.0.1/24, node-b: 10.3.0.2/24, node-c: 10.3.0.3/24}
  - name: blue
    vni: 100
    addresses: {node-a: 10.1.0.1/24, node-b: 10.1.0.2/24, node-c: 10.1.0.3/24}
";

struct Setup {
    c: Cluster,
    rings: BTreeMap<IpAddr, Keyring>,
    spec: std::path::PathBuf,
}

fn setup(tag: &str, ipv6: bool) -> Setup {
    require_esp();
    let c = Cluster::new(tag, 3, ipv6, 1500);
    let spec = c.spec("net.yaml", NETWORKS);
    let addrs: Vec<IpAddr> = c.nodes.iter().map(|n| n.address.parse().unwrap()).collect();
    let rings = mesh_keys(&addrs, 0x1000);
    Setup { c, rings, spec }
}

impl Setup {
    fn apply_all(&self, spec: &std::path::Path) {
        for n in &self.c.nodes {
            let ring = &self.rings[&n.address.parse::<IpAddr>().unwrap()];
            apply_with_keys(&n.ns, spec, &n.name, ring)
                .unwrap_or_else(|e| panic!("apply on {}: {e}", n.name));
        }
    }
}

fn xfrm_states(c: &Cluster, node: &str) -> String {
    ok(&format!("ip -n {} -s xfrm state", c.node(node).ns))
}

/// (a) + (b): traffic over both networks; only ESP on the wire for the encrypted one;
/// one SA per pair and direction with the promised parameters.
#[test]
fn a_b_encrypted_and_plaintext_networks_across_three_nodes() {
    let s = setup("enc", false);
    let cap = Capture::start(&s.c, "ab", "");
    s.apply_all(&s.spec);
    for (i, from) in ["node-a", "node-b", "node-c"].iter().enumerate() {
        for j in 1..=3 {
            if i + 1 != j {
                assert!(
                    s.c.ping_eventually(from, &format!("10.3.0.{j}")),
                    "sec: {from} -> 10.3.0.{j}"
                );
                assert!(
                    s.c.ping_eventually(from, &format!("10.1.0.{j}")),
                    "blue: {from} -> 10.1.0.{j}"
                );
            }
        }
    }
    let pcap = cap.stop();
    assert_eq!(
        pcap.lines("udp port 4790"),
        Vec::<String>::new(),
        "plaintext on the encrypted port"
    );
    let esp = pcap.lines("esp");
    assert!(
        esp.len() >= 12,
        "expected ESP between the VTEPs, saw {}",
        esp.len()
    );
    let vteps: Vec<String> = s.c.nodes.iter().map(|n| n.address.clone()).collect();
    for l in &esp {
        assert!(
            vteps
                .iter()
                .filter(|v| l.contains(&format!("{v} >")) || l.contains(&format!("> {v}")))
                .count()
                == 2,
            "ESP not between VTEPs: {l}"
        );
    }
    assert!(
        !pcap.lines("udp port 4789").is_empty(),
        "control: plaintext VXLAN must be visible"
    );

    // (b) the SAs as the kernel reports them.
    let mut keys: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    let mut spis = BTreeSet::new();
    for n in &s.c.nodes {
        let text = xfrm_states(&s.c, &n.name);
        // One block per SA: each starts with a line "src A dst B".
        let text = format!("\n{text}");
        let blocks: Vec<&str> = text
            .split("\nsrc ")
            .filter(|b| b.contains("proto esp"))
            .collect();
        assert_eq!(blocks.len(), 4, "node {}: expected 4 SAs:\n{text}", n.name);
        for b in blocks {
            let first = b.lines().next().unwrap();
            let (src, dst) = {
                let mut w = first.split_whitespace();
                (w.next().unwrap().to_owned(), w.nth(1).unwrap().to_owned())
            };
            assert!(b.contains("aead rfc4106(gcm(aes)) 0x"), "{b}");
            let key = b
                .split("aead rfc4106(gcm(aes)) 0x")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>();
            assert_eq!(key[0].len(), 72, "288-bit key+salt expected: {b}");
            assert_eq!(
                key[1..4],
                ["(288", "bits)", "128"],
                "288-bit key, ICV 128 expected: {b}"
            );
            assert!(
                b.contains("flag esn") || b.contains("esn"),
                "ESN expected: {b}"
            );
            assert!(
                b.contains("replay_window 1024"),
                "replay window expected: {b}"
            );
            assert!(
                b.contains(&format!(
                    "sel src {src}/32 dst {dst}/32 proto udp dport 4790"
                )),
                "pinned selector expected: {b}"
            );
            let spi = b
                .split("spi ")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .to_owned();
            spis.insert((src.clone(), dst.clone(), spi));
            keys.entry((src, dst))
                .or_default()
                .insert(key[0].to_owned());
        }
    }
    assert_eq!(keys.len(), 6, "one SA per ordered pair: {keys:?}");
    assert!(
        keys.values().all(|k| k.len() == 1),
        "sender and receiver hold the same key"
    );
    let distinct: BTreeSet<&String> = keys.values().flatten().collect();
    assert_eq!(distinct.len(), 6, "every direction has its own key");
    let spi_values: BTreeSet<&String> = spis.iter().map(|(_, _, s)| s).collect();
    assert_eq!(spi_values.len(), 6, "SPIs distinct: {spis:?}");
}

const CRAFT: &str = r#"
import socket, struct, sys
dst, dport, vni, inner_src, inner_dst = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
bind = sys.argv[6] if len(sys.argv) > 6 else None
def csum(b):
    if len(b) % 2: b += b'\0'
    s = sum(struct.unpack('!%dH' % (len(b)//2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return (~s) & 0xffff
icmp = struct.pack('!BBHHH', 8, 0, 0, 0x4242, 1) + b'ovl-enforcement-probe'
icmp = icmp[:2] + struct.pack('!H', csum(icmp)) + icmp[4:]
ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0, socket.inet_aton(inner_src), socket.inet_aton(inner_dst))
ip = ip[:10] + struct.pack('!H', csum(ip)) + ip[12:]
eth = b'\xff' * 6 + b'\x02\x00\x00\x00\x00\x99' + b'\x08\x00'
vx = struct.pack('!II', 0x08000000, vni << 8)
fam = socket.AF_INET6 if ':' in dst else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
if fam == socket.AF_INET: s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
if bind: s.bind((bind, 0))
for _ in range(5): s.sendto(vx + eth + ip + icmp, (dst, dport))
"#;

fn craft(c: &Cluster, ns: &str, args: &str) {
    let script = c.dir.path().join("craft.py");
    std::fs::write(&script, CRAFT).unwrap();
    ok(&format!(
        "ip netns exec {ns} python3 {} {args}",
        script.display()
    ));
}

/// Starts tcpdump on a node's device for ICMP from `inner_src`.
fn watch(c: &Cluster, node: &str, dev: &str, inner_src: &str) -> Child {
    let ns = &c.node(node).ns;
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "tcpdump",
            "-i",
            dev,
            "-n",
            "-l",
            "-c",
            "1",
            &format!("icmp and src host {inner_src}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    child
}

fn seen(mut child: Child) -> bool {
    std::thread::sleep(Duration::from_millis(700));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

fn xfrm_errors(c: &Cluster, node: &str) -> u64 {
    ok(&format!(
        "ip netns exec {} cat /proc/net/xfrm_stat",
        c.node(node).ns
    ))
    .lines()
    .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
    .sum()
}

/// (c) plaintext VXLAN to the encrypted port is dropped whoever sends it, and an ESP
/// packet from member B claiming member A's address is dropped.
#[test]
fn c_enforcement_drops_plaintext_and_spoofed_esp() {
    let s = setup("enf", false);
    s.apply_all(&s.spec);
    assert!(s.c.ping_eventually("node-a", "10.3.0.2"));
    assert!(s.c.ping_eventually("node-b", "10.3.0.3"));
    let c = &s.c;
    // An outsider on the underlay.
    let x = format!("{}-x", c.switch);
    ok(&format!(
        "ip netns add {x} && ip -n {x} link add eth0 type veth peer name px netns {sw} && \
         ip -n {sw} link set px master ub0 up && ip -n {x} addr add 192.0.2.50/24 dev eth0 && ip -n {x} link set eth0 up",
        sw = c.switch
    ));
    let _cleanup = NsGuard(x.clone());
    let a = c.node("node-a").address.clone();

    // Control: the same crafted packet on the plaintext network is delivered.
    let w = watch(c, "node-a", "ovbr-100", "10.1.0.99");
    craft(c, &x, &format!("{a} 4789 100 10.1.0.99 10.1.0.1"));
    assert!(
        seen(w),
        "control packet on the plaintext network was not delivered: the probe is broken"
    );

    // From a non-member.
    let before = xfrm_errors(c, "node-a");
    let w = watch(c, "node-a", "ovbr-300", "10.3.0.99");
    craft(c, &x, &format!("{a} 4790 300 10.3.0.99 10.3.0.1"));
    assert!(
        !seen(w),
        "plaintext VXLAN from a non-member reached the encrypted bridge"
    );
    assert!(
        xfrm_errors(c, "node-a") > before,
        "XFRM error counters did not count the drop"
    );

    // To the underlay's broadcast address, and to a second address of the node: the
    // kernel's VXLAN socket takes the port on every local address, so the catch-all
    // must cover every destination, not only the VTEP address.
    let second = "192.0.2.201";
    ok(&format!(
        "ip -n {} addr add {second}/24 dev eth0",
        c.node("node-a").ns
    ));
    for (to, inner) in [("192.0.2.255", "10.3.0.96"), (second, "10.3.0.95")] {
        let before = xfrm_errors(c, "node-a");
        let w = watch(c, "node-a", "ovbr-300", inner);
        craft(c, &x, &format!("{to} 4790 300 {inner} 10.3.0.1"));
        assert!(
            !seen(w),
            "plaintext VXLAN to {to} reached the encrypted bridge"
        );
        assert!(
            xfrm_errors(c, "node-a") > before,
            "XFRM error counters did not count the drop of plaintext to {to}"
        );
    }

    // From a namespace spoofing member B's address.
    let b_addr = c.node("node-b").address.clone();
    ok(&format!("ip -n {x} addr add {b_addr}/32 dev eth0"));
    let before = xfrm_errors(c, "node-a");
    let w = watch(c, "node-a", "ovbr-300", "10.3.0.97");
    craft(c, &x, &format!("{a} 4790 300 10.3.0.97 10.3.0.1 {b_addr}"));
    assert!(
        !seen(w),
        "plaintext VXLAN spoofing a member reached the encrypted bridge"
    );
    assert!(xfrm_errors(c, "node-a") > before);

    // Member B's keys, but A's source address. B's own namespace already holds an SA
    // with this (dst, SPI), so the sender is the outsider namespace playing a
    // compromised B: it has B->C's key and SPI and claims A's address.
    ok(&format!("ip -n {x} addr del {b_addr}/32 dev eth0"));
    let cn = c.node("node-c");
    let b_ip: IpAddr = b_addr.parse().unwrap();
    let c_ip: IpAddr = cn.address.parse().unwrap();
    let k = &s.rings[&b_ip][&c_ip].outbound[0];
    let hex: String = k.key.expose().iter().map(|b| format!("{b:02x}")).collect();
    let bn = x.clone();
    ok(&format!(
        "ip -n {bn} addr add {a}/32 dev eth0 && \
         ip -n {bn} xfrm state add src {a} dst {cdst} proto esp spi {spi} reqid 999 mode transport \
           aead 'rfc4106(gcm(aes))' 0x{hex} 128 flag esn replay-window 128 replay-oseq 100000 && \
         ip -n {bn} xfrm policy add src {a}/32 dst {cdst}/32 proto udp dport 4790 dir out priority 10 \
           tmpl src {a} dst {cdst} proto esp reqid 999 mode transport",
        cdst = cn.address,
        spi = k.spi
    ));
    let cap = Capture::start(c, "spoof", "esp");
    let before = xfrm_errors(c, "node-c");
    let w = watch(c, "node-c", "ovbr-300", "10.3.0.98");
    craft(
        c,
        &bn,
        &format!("{} 4790 300 10.3.0.98 10.3.0.3 {a}", cn.address),
    );
    assert!(!seen(w), "ESP from B claiming A's address was delivered");
    let spoofed = cap
        .stop()
        .lines(&format!("esp and src host {a} and dst host {}", cn.address));
    assert!(
        spoofed
            .iter()
            .any(|l| l.contains(&format!("spi=0x{:08x}", k.spi))),
        "the spoofed ESP packet was not sent: {spoofed:?}"
    );
    assert!(
        xfrm_errors(c, "node-c") > before,
        "XFRM error counters did not count the spoofed packet"
    );
    // `status` explains the drops with the kernel's counters and a hint.
    let st = c.ctl("node-a", &["status"]);
    let text = stdout(&st);
    assert!(
        text.contains("KERNEL XFRM ERRORS") && text.contains("plaintext VXLAN was dropped"),
        "{text}"
    );
    let st = c.ctl("node-c", &["status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert!(
        v["xfrm_errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["counter"] == "XfrmInStateMismatch"),
        "{v}"
    );
}

struct NsGuard(String);
impl Drop for NsGuard {
    fn drop(&mut self) {
        let _ = sh(&format!("ip netns del {}", self.0));
    }
}

/// A ping flood from `from` to `to` in the background; returns it for later.
fn flood(c: &Cluster, from: &str, to: &str) -> Child {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            &c.node(from).ns,
            "ping",
            "-q",
            "-i",
            "0.01",
            "-W",
            "1",
            to,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// (d) apply, spec changes and delete with traffic flowing: never a plaintext packet of
/// the encrypted network on the wire.
#[test]
fn d_no_plaintext_during_apply_changes_and_delete() {
    let s = setup("chg", false);
    let cap = Capture::start(&s.c, "d", "udp port 4790 or esp");
    let mut floods = vec![
        flood(&s.c, "node-a", "10.3.0.2"),
        flood(&s.c, "node-b", "10.3.0.3"),
        flood(&s.c, "node-c", "10.3.0.1"),
    ];
    s.apply_all(&s.spec);
    assert!(s.c.ping_eventually("node-a", "10.3.0.3"));
    // Spec change: MTU of sec, node-c leaves sec.
    let changed = s.c.spec(
        "net2.yaml",
        "  - name: sec\n    vni: 300\n    encrypted: true\n    mtu: 1300\n    nodes: [node-a, node-b]\n    addresses: {node-a: 10.3.0.1/24, node-b: 10.3.0.2/24}\n",
    );
    s.apply_all(&changed);
    assert!(s.c.ping_eventually("node-a", "10.3.0.2"));
    assert!(s.c.link("node-c", "ovvx-300").is_none());
    // Delete through the CLI.
    for n in ["node-a", "node-b"] {
        let out = s.c.ctl(n, &["delete", "-f", changed.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(s.c.link(n, "ovbr-300").is_none());
        assert_eq!(
            ok(&format!("ip -n {} xfrm state", s.c.node(n).ns)).trim(),
            "",
            "SAs left after delete"
        );
        assert_eq!(
            ok(&format!("ip -n {} xfrm policy", s.c.node(n).ns)).trim(),
            "",
            "policies left after delete"
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    for f in &mut floods {
        let _ = f.kill();
        let _ = f.wait();
    }
    let pcap = cap.stop();
    assert_eq!(
        pcap.lines("udp port 4790"),
        Vec::<String>::new(),
        "plaintext of the encrypted network on the wire"
    );
    assert!(
        pcap.lines("esp").len() > 50,
        "the floods should have been carried in ESP"
    );
}

/// (f) foreign XFRM objects, as strongSwan would install them, survive apply and delete.
#[test]
fn f_foreign_xfrm_objects_survive() {
    let s = setup("frn", false);
    let a = s.c.node("node-a").ns.clone();
    ok(&format!(
        "ip -n {a} xfrm state add src 192.0.2.1 dst 198.51.100.7 proto esp spi 0x5000 reqid 1 mode transport \
           aead 'rfc4106(gcm(aes))' 0x{} 128 && \
         ip -n {a} xfrm policy add src 192.0.2.1/32 dst 198.51.100.7/32 proto udp dport 500 dir out priority 100 \
           tmpl src 192.0.2.1 dst 198.51.100.7 proto esp reqid 1 mode transport",
        "22".repeat(36)
    ));
    let foreign = || {
        let st = ok(&format!("ip -n {a} xfrm state"));
        let pol = ok(&format!("ip -n {a} xfrm policy"));
        (
            st.contains("198.51.100.7") && st.contains("0x00005000"),
            pol.contains("198.51.100.7/32") && pol.contains("dport 500"),
        )
    };
    assert_eq!(foreign(), (true, true));
    s.apply_all(&s.spec);
    assert!(s.c.ping_eventually("node-a", "10.3.0.2"));
    assert_eq!(foreign(), (true, true));
    let out =
        s.c.ctl("node-a", &["delete", "-f", s.spec.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(foreign(), (true, true));
    assert!(
        !ok(&format!("ip -n {a} xfrm state")).contains("192.0.2.2"),
        "our SAs should be gone"
    );
}

fn mtu_edges(ipv6: bool) {
    let s = setup("emtu", ipv6);
    s.apply_all(&s.spec);
    assert!(s.c.ping_eventually("node-a", "10.3.0.2"));
    let mtu = if ipv6 { 1396 } else { 1416 };
    assert_eq!(s.c.link("node-a", "ovvx-300").unwrap()["mtu"], mtu);
    assert_eq!(s.c.link("node-a", "ovbr-300").unwrap()["mtu"], mtu);
    assert_mtu_edge(&s.c, "node-a", "10.3.0.2", mtu);
}

/// (g) the default MTU of an encrypted network accounts for ESP exactly.
#[test]
fn g_encrypted_mtu_edge_ipv4() {
    mtu_edges(false);
}

#[test]
fn g_encrypted_mtu_edge_ipv6() {
    mtu_edges(true);
}

/// Without an agent, `apply` on an ESP kernel brings up the plaintext network, leaves
/// the encrypted one alone and exits 1 saying to start the agent.
#[test]
fn apply_without_agent_refuses_encrypted_networks() {
    let s = setup("noag", false);
    let before = s.c.kernel_dump("node-a");
    let out = s.c.ctl(
        "node-a",
        &[
            "apply",
            "-f",
            s.spec.to_str().unwrap(),
            "--socket",
            "/nonexistent/agent.sock",
        ],
    );
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("start `ovl-controller agent`"),
        "{}",
        stderr(&out)
    );
    assert!(
        s.c.link("node-a", "ovbr-100").is_some(),
        "the plaintext network must come up"
    );
    assert!(s.c.link("node-a", "ovbr-300").is_none() && s.c.link("node-a", "ovvx-300").is_none());
    assert!(
        !stdout(&out).contains("300"),
        "the plan must not touch the encrypted network: {}",
        stdout(&out)
    );
    assert_eq!(
        ok(&format!("ip -n {} xfrm state", s.c.node("node-a").ns)).trim(),
        ""
    );
    assert_ne!(before, s.c.kernel_dump("node-a"));
}
