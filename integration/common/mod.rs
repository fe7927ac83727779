//! Test clusters made of real network namespaces: a "switch" namespace with an underlay
//! bridge, and one namespace per node joined to it by a veth pair. Everything is checked
//! with the kernel's own tools (`ip`, `bridge`, `ping`, `tcpdump`). The single-namespace
//! harness of the suites that drive the kernel layer directly is [`netns`].
#![allow(dead_code)]

pub mod netns;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// A RUST_LOG that asks for everything, including the key-carrying netlink crates' events
/// by their most specific targets (the product must silence them all the same).
pub const TRACE_EVERYTHING: &str = "trace,netlink_proto=trace,netlink_proto::codecs=trace,\
    netlink_proto::connection=trace,netlink_sys=trace,netlink_packet_xfrm=trace,\
    netlink_packet_core=trace,xfrmnetlink=trace,rtnetlink=trace,snow=trace";

pub const BIN: &str = env!("CARGO_BIN_EXE_ovl-controller");

/// Root is needed for namespaces; without it a test fails loudly rather than passing.
pub fn require_root() {
    let uid = nix::unistd::geteuid();
    assert!(
        uid.is_root(),
        "this integration test needs root (network namespaces); run it via scripts/test.sh as root"
    );
}

pub fn sh(cmd: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .output()
        .expect("spawn sh")
}

/// Runs a shell command that must succeed; returns its stdout.
pub fn ok(cmd: &str) -> String {
    let out = sh(cmd);
    assert!(
        out.status.success(),
        "command failed: {cmd}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique short prefix per test so tests can run in parallel.
pub fn unique(tag: &str) -> String {
    format!(
        "{tag}{}x{}",
        std::process::id() % 100000,
        SEQ.fetch_add(1, Ordering::SeqCst)
    )
}

pub struct Node {
    pub name: String,
    pub ns: String,
    pub address: String,
}

pub struct Cluster {
    pub switch: String,
    pub nodes: Vec<Node>,
    pub ipv6: bool,
    pub dir: tempfile::TempDir,
    /// Real public keys by node name, once `keygen_all` ran; otherwise specs carry
    /// well-formed placeholder keys.
    pub keys: std::sync::Mutex<BTreeMap<String, String>>,
}

impl Cluster {
    /// `n` nodes named node-a, node-b, ... on an IPv4 (192.0.2.0/24) or IPv6
    /// (2001:db8::/64) underlay with the given underlay MTU.
    pub fn new(tag: &str, n: usize, ipv6: bool, underlay_mtu: u32) -> Cluster {
        require_root();
        let prefix = unique(tag);
        let switch = format!("{prefix}-sw");
        ok(&format!("ip netns add {switch}"));
        let mut cluster = Cluster {
            switch: switch.clone(),
            nodes: vec![],
            ipv6,
            dir: tempfile::tempdir().unwrap(),
            keys: Default::default(),
        };
        ok(&format!(
            "ip -n {switch} link add ub0 type bridge && ip -n {switch} link set ub0 mtu {underlay_mtu} up && ip -n {switch} link set lo up"
        ));
        for i in 0..n {
            let letter = (b'a' + i as u8) as char;
            let ns = format!("{prefix}-{letter}");
            let address = if ipv6 {
                format!("2001:db8::{}", i + 1)
            } else {
                format!("192.0.2.{}", i + 1)
            };
            let plen = if ipv6 { 64 } else { 24 };
            ok(&format!("ip netns add {ns}"));
            ok(&format!(
                "ip -n {ns} link add eth0 mtu {underlay_mtu} type veth peer name p{i} netns {switch} && \
                 ip -n {switch} link set p{i} mtu {underlay_mtu} master ub0 up && \
                 ip -n {ns} link set lo up && \
                 ip netns exec {ns} sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0 && \
                 ip -n {ns} addr add {address}/{plen} dev eth0 nodad 2>/dev/null || ip -n {ns} addr add {address}/{plen} dev eth0; \
                 ip -n {ns} link set eth0 up"
            ));
            cluster.nodes.push(Node {
                name: format!("node-{letter}"),
                ns,
                address,
            });
        }
        cluster
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .expect("node in cluster")
    }

    /// Writes a spec file with these nodes and the given `networks:` YAML block.
    pub fn spec(&self, file: &str, networks_yaml: &str) -> PathBuf {
        let mut text = String::from("apiVersion: ovl/v1\ncluster:\n  name: test\nnodes:\n");
        for (i, n) in self.nodes.iter().enumerate() {
            // A well-formed public key per node (the spec requires one on encrypted
            // networks' members; these tests hand keys to the library directly).
            let real = self.keys.lock().unwrap().get(&n.name).cloned();
            let key = real.unwrap_or_else(|| {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.encode([i as u8 + 1; 32])
            });
            let _ = writeln!(
                text,
                "  - name: {}\n    address: \"{}\"\n    publicKey: \"{key}\"",
                n.name, n.address
            );
        }
        text.push_str("networks:\n");
        text.push_str(networks_yaml);
        let path = self.dir.path().join(file);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Runs the controller inside a node's namespace.
    pub fn ctl(&self, node: &str, args: &[&str]) -> Output {
        let ns = &self.node(node).ns;
        Command::new("ip")
            .args(["netns", "exec", ns, BIN])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("spawn ovl-controller")
    }

    /// `apply -f spec` on a node; must exit 0; returns stdout (the plan).
    pub fn apply(&self, node: &str, spec: &Path) -> String {
        let out = self.ctl(node, &["apply", "-f", spec.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "apply on {node} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn apply_all(&self, spec: &Path) {
        for n in &self.nodes {
            self.apply(&n.name, spec);
        }
    }

    /// One ping from `from` to `to_addr`; true when answered.
    pub fn ping(&self, from: &str, to_addr: &str) -> bool {
        let ns = &self.node(from).ns;
        sh(&format!(
            "ip netns exec {ns} ping -c 1 -W 2 -q {to_addr} >/dev/null 2>&1"
        ))
        .status
        .success()
    }

    /// Pings until three answers came (ARP/ND, bridge learning and an agent's first
    /// pass need a moment), for at most 20 s: generous, because tests run side by side
    /// and one of them holding the kernel's rtnl lock (hundreds of links) slows every
    /// other namespace's device setup. A working path answers within a second.
    pub fn ping_eventually(&self, from: &str, to_addr: &str) -> bool {
        let ns = &self.node(from).ns;
        sh(&format!(
            "ip netns exec {ns} ping -c 3 -i 0.2 -w 20 -q {to_addr} >/dev/null 2>&1"
        ))
        .status
        .success()
    }

    /// `ip -d -j link` of a node, parsed.
    pub fn links(&self, node: &str) -> Vec<serde_json::Value> {
        let ns = &self.node(node).ns;
        serde_json::from_str(&ok(&format!("ip -n {ns} -d -j link show"))).unwrap()
    }

    pub fn link(&self, node: &str, name: &str) -> Option<serde_json::Value> {
        self.links(node).into_iter().find(|l| l["ifname"] == name)
    }

    /// All-zero FDB destinations on a device, from `bridge -j fdb`.
    pub fn fdb_dsts(&self, node: &str, dev: &str) -> Vec<String> {
        let ns = &self.node(node).ns;
        let v: Vec<serde_json::Value> =
            serde_json::from_str(&ok(&format!("bridge -n {ns} -j fdb show dev {dev}"))).unwrap();
        let mut d: Vec<String> = v
            .iter()
            .filter(|e| e["mac"] == "00:00:00:00:00:00")
            .filter_map(|e| e["dst"].as_str().map(str::to_owned))
            .collect();
        d.sort();
        d
    }

    /// A fingerprint of everything in a node's namespace the controller could touch:
    /// links (kind, VXLAN parameters, MTU, master, alias, admin state), global addresses,
    /// all-zero FDB entries, XFRM policies and states. Timers, carrier and DAD flags are
    /// left out: the kernel changes those by itself.
    pub fn kernel_dump(&self, node: &str) -> String {
        let ns = &self.node(node).ns;
        let mut out = String::new();
        for l in self.links(node) {
            let info = &l["linkinfo"];
            let data = &info["info_data"];
            let up = l["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "UP"));
            let _ = writeln!(
                out,
                "link {} kind={} id={} local={} port={} mtu={} master={} alias={} up={up}",
                l["ifname"],
                info["info_kind"],
                data["id"],
                data["local"],
                data["port"],
                l["mtu"],
                l["master"],
                l["ifalias"]
            );
        }
        let addrs: Vec<serde_json::Value> =
            serde_json::from_str(&ok(&format!("ip -n {ns} -j addr show"))).unwrap();
        for a in addrs {
            for i in a["addr_info"].as_array().into_iter().flatten() {
                if i["scope"] != "link" {
                    let _ = writeln!(
                        out,
                        "addr {} {}/{}",
                        a["ifname"], i["local"], i["prefixlen"]
                    );
                }
            }
        }
        let fdb: Vec<serde_json::Value> =
            serde_json::from_str(&ok(&format!("bridge -n {ns} -j fdb show"))).unwrap();
        for e in fdb.iter().filter(|e| e["mac"] == "00:00:00:00:00:00") {
            let _ = writeln!(out, "fdb {} {}", e["ifname"], e["dst"]);
        }
        out.push_str(&ok(&format!("ip -n {ns} xfrm policy")));
        out.push_str(&ok(&format!("ip -n {ns} xfrm state")));
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &self.nodes {
            let _ = sh(&format!(
                "ip netns pids {0} | xargs -r kill -9; ip netns del {0}",
                n.ns
            ));
        }
        let _ = sh(&format!("ip netns del {}", self.switch));
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a command's exit code, showing its stdout and stderr when it differs.
pub fn assert_exit(o: &Output, code: i32) {
    assert_eq!(o.status.code(), Some(code), "{}{}", stdout(o), stderr(o));
}

/// The change lines of a printed plan (lines starting with +, ~ or -), sorted.
pub fn plan_lines(plan: &str) -> Vec<String> {
    let mut v: Vec<String> = plan
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("+ ") || l.starts_with("~ ") || l.starts_with("- "))
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

// ---- encrypted networks: keys handed to the library directly (no agents) ----

use std::collections::BTreeMap;
use std::net::IpAddr;

use ovl::desired::{DirectionKey, Keyring};
use ovl::keys::SaKey;

/// Tests that need ESP fail (never pass) outside an ESP-capable kernel.
pub fn require_esp() {
    require_root();
    assert!(
        std::env::var("OVL_IN_UML").is_ok() || esp_available(),
        "needs an ESP-capable kernel: run via scripts/test.sh (it boots user-mode-linux)"
    );
}

fn esp_available() -> bool {
    let ns = unique("espprobe");
    let ok = sh(&format!(
        "ip netns add {ns} && ip -n {ns} xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x42 mode transport \
         aead 'rfc4106(gcm(aes))' 0x{} 128",
        "11".repeat(36)
    ))
    .status
    .success();
    let _ = sh(&format!("ip netns del {ns}"));
    ok
}

/// Fresh random keys for every ordered pair of `addresses`: the key node X uses to send
/// to Y is Y's inbound key from X. Returns each node's keyring.
pub fn mesh_keys(addresses: &[IpAddr], spi_base: u32) -> BTreeMap<IpAddr, Keyring> {
    let mut rings: BTreeMap<IpAddr, Keyring> =
        addresses.iter().map(|a| (*a, Keyring::new())).collect();
    let mut spi = spi_base;
    for &x in addresses {
        for &y in addresses {
            if x == y {
                continue;
            }
            spi += 1;
            let key = SaKey::generate().unwrap();
            rings
                .get_mut(&x)
                .unwrap()
                .entry(y)
                .or_default()
                .outbound
                .push(DirectionKey {
                    spi,
                    key: key.clone(),
                });
            rings
                .get_mut(&y)
                .unwrap()
                .entry(x)
                .or_default()
                .inbound
                .push(DirectionKey { spi, key });
        }
    }
    rings
}

/// Runs one reconcile pass with the given keys inside a node's namespace (a dedicated
/// thread enters the namespace, so the test process stays where it is). Returns the plan
/// as printed, or the error.
pub fn apply_with_keys(
    ns: &str,
    spec_path: &Path,
    node: &str,
    ring: &Keyring,
) -> Result<String, String> {
    let bytes = std::fs::read(spec_path).unwrap();
    let spec =
        ovl::spec::parse(&bytes, &spec_path.display().to_string()).map_err(|e| e.to_string())?;
    let ns_path = format!("/run/netns/{ns}");
    let node = node.to_owned();
    let ring = ring.clone();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&ns_path).map_err(|e| e.to_string())?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let kernel = ovl::kernel::Kernel::connect().map_err(|e| e.to_string())?;
            let me = ovl::reconcile::identify_node(&spec, Some(&node), &kernel)
                .await
                .map_err(|e| e.to_string())?;
            let out =
                ovl::reconcile::apply(&spec, me, &kernel, ovl::reconcile::Keys::Ring(&ring), false)
                    .await
                    .map_err(|e| e.to_string())?;
            if let Some(e) = out.encrypted_not_up {
                return Err(e.to_string());
            }
            Ok(out.plan.to_string())
        })
    })
    .join()
    .unwrap()
}

/// A background tcpdump on the switch's underlay bridge, writing a pcap.
pub struct Capture {
    child: std::process::Child,
    pub file: PathBuf,
}

impl Capture {
    pub fn start(c: &Cluster, name: &str, filter: &str) -> Capture {
        let file = c.dir.path().join(format!("{name}.pcap"));
        let child = Command::new("ip")
            .args([
                "netns", "exec", &c.switch, "tcpdump", "-i", "ub0", "-n", "-U", "-s", "128", "-w",
            ])
            .arg(&file)
            .arg(filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // tcpdump needs a moment before it captures.
        for _ in 0..50 {
            if file.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        Capture { child, file }
    }

    /// Stops the capture; the pcap can then be read with several filters.
    pub fn stop(mut self) -> Pcap {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        Pcap {
            file: self.file.clone(),
        }
    }
}

pub struct Pcap {
    pub file: PathBuf,
}

impl Pcap {
    /// `tcpdump -r` lines matching `filter`.
    pub fn lines(&self, filter: &str) -> Vec<String> {
        let out = ok(&format!(
            "tcpdump -r {} -n '{}' 2>/dev/null || true",
            self.file.display(),
            filter
        ));
        out.lines().map(str::to_owned).collect()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

// ---- agents ----

impl Cluster {
    /// A node's private files: key, state dir, socket.
    pub fn node_dir(&self, node: &str) -> PathBuf {
        let d = self.dir.path().join(node);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// The options every command of a node's agent is given.
    pub fn agent_opts(&self, node: &str) -> Vec<String> {
        let d = self.node_dir(node);
        vec![
            "--node".into(),
            node.into(),
            "--key".into(),
            d.join("node.key").display().to_string(),
            "--state-dir".into(),
            d.join("state").display().to_string(),
            "--socket".into(),
            d.join("agent.sock").display().to_string(),
        ]
    }

    /// `ovl-controller keygen` for every node; the specs written afterwards carry the
    /// real public keys.
    pub fn keygen_all(&self) {
        for n in &self.nodes {
            let path = self.node_dir(&n.name).join("node.key");
            let out = Command::new(BIN)
                .args(["keygen", "--out"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(out.status.success(), "keygen: {}", stderr(&out));
            let public = stdout(&out).trim().to_owned();
            assert_eq!(public.len(), 44, "public key {public:?}");
            self.keys.lock().unwrap().insert(n.name.clone(), public);
        }
    }

    /// Runs a subcommand with the node's agent options inside its namespace.
    pub fn ctl_agent(&self, node: &str, args: &[&str]) -> Output {
        let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        full.extend(self.agent_opts(node));
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        self.ctl(node, &refs)
    }

    /// Starts a node's agent (logs to DIR/NODE/agent.log, appended across restarts).
    pub fn start_agent(&self, node: &str, spec: &Path, log_level: &str) -> std::process::Child {
        self.start_agent_with(node, spec, log_level, &[])
    }

    /// [`Cluster::start_agent`] with extra agent options. At `log_level` "trace" the
    /// agent also gets RUST_LOG=[`TRACE_EVERYTHING`].
    pub fn start_agent_with(
        &self,
        node: &str,
        spec: &Path,
        log_level: &str,
        extra: &[&str],
    ) -> std::process::Child {
        let log_path = self.node_dir(node).join("agent.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut args: Vec<String> = vec![
            "agent".into(),
            "-f".into(),
            spec.display().to_string(),
            "--log-level".into(),
            log_level.into(),
        ];
        args.extend(self.agent_opts(node));
        args.extend(extra.iter().map(|s| s.to_string()));
        // The socket of a killed agent stays behind: gone first, its reappearance below
        // means this agent listens.
        let sock = self.node_dir(node).join("agent.sock");
        let _ = std::fs::remove_file(&sock);
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.node(node).ns, BIN])
            .args(&args)
            .env_remove("RUST_LOG");
        if log_level == "trace" {
            // At trace level, RUST_LOG also asks for the netlink crates' own trace events
            // (which print whole SA replies, keys included), by the most specific
            // directives a filter knows: they must stay silenced all the same.
            command.env("RUST_LOG", TRACE_EVERYTHING);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        for _ in 0..200 {
            if sock.exists() {
                return child;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "agent on {node} did not open its socket; log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }

    pub fn agent_log(&self, node: &str) -> String {
        std::fs::read_to_string(self.node_dir(node).join("agent.log")).unwrap_or_default()
    }

    /// `apply` through the node's agent; must exit 0.
    pub fn apply_via_agent(&self, node: &str, spec: &Path) -> String {
        let out = self.ctl_agent(node, &["apply", "-f", spec.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "apply on {node}: {}{}",
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }

    /// `status -o json` through the node's agent.
    pub fn agent_status(&self, node: &str) -> serde_json::Value {
        let out = self.ctl_agent(node, &["status", "-o", "json"]);
        assert!(out.status.success(), "status on {node}: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Every (src, dst, spi, key hex) of ESP SAs a node's kernel holds.
    pub fn sa_keys(&self, node: &str) -> Vec<(String, String, String, String)> {
        let text = ok(&format!("ip -n {} -s xfrm state", self.node(node).ns));
        let text = format!("\n{text}");
        let mut out = vec![];
        for b in text.split("\nsrc ").filter(|b| b.contains("proto esp")) {
            let mut w = b.split_whitespace();
            let src = w.next().unwrap_or_default().to_owned();
            let dst = w.nth(1).unwrap_or_default().to_owned();
            let spi = b
                .split("spi ")
                .nth(1)
                .and_then(|x| x.split_whitespace().next())
                .unwrap_or_default()
                .to_owned();
            let key = b
                .split("aead rfc4106(gcm(aes)) 0x")
                .nth(1)
                .and_then(|x| x.split_whitespace().next())
                .unwrap_or_default()
                .to_owned();
            out.push((src, dst, spi, key));
        }
        out
    }
}

/// Stops agents (kill -9) when dropped, so a failing test leaves nothing running.
#[derive(Default)]
pub struct Agents(pub BTreeMap<String, std::process::Child>);

impl Agents {
    pub fn kill9(&mut self, node: &str) {
        if let Some(mut c) = self.0.remove(node) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for c in self.0.values_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---- traffic ----

/// A ping train in the background; read its result with [`ping_result`].
pub fn ping_train(
    c: &Cluster,
    from: &str,
    to: &str,
    interval: &str,
    count: u32,
) -> std::process::Child {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            &c.node(from).ns,
            "ping",
            "-q",
            "-i",
            interval,
            "-c",
            &count.to_string(),
            "-W",
            "2",
            to,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// (transmitted, received) of a finished ping train.
pub fn ping_result(child: std::process::Child) -> (u64, u64) {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary: {text}"));
    let nums: Vec<u64> = line
        .split(|ch: char| !ch.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1])
}

pub fn assert_no_loss(trains: Vec<(String, std::process::Child)>) {
    for (label, t) in trains {
        let (sent, got) = ping_result(t);
        assert!(sent > 0, "{label}: nothing sent");
        println!("{label}: {sent} sent, {got} received");
        assert_eq!(sent, got, "{label}: {sent} sent, {got} received");
    }
}

/// Waits until every ordered pair of `nodes` answers a ping at `addr_of(node)`.
pub fn wait_mesh(
    c: &Cluster,
    nodes: &[&str],
    addr_of: &dyn Fn(&str) -> String,
    limit: std::time::Duration,
) {
    let start = std::time::Instant::now();
    for from in nodes {
        for to in nodes {
            if from == to {
                continue;
            }
            while !c.ping(from, &addr_of(to)) {
                assert!(
                    start.elapsed() < limit,
                    "{from} -> {to} not reachable after {limit:?}"
                );
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

/// The MTU edge of an overlay: the largest don't-fragment ping (`mtu - 28` bytes of
/// payload) from `from` to `to_addr` passes, one byte more fails locally with "message
/// too long", and no fragment appears on the underlay meanwhile.
pub fn assert_mtu_edge(c: &Cluster, from: &str, to_addr: &str, mtu: u32) {
    let filter = if c.ipv6 {
        "ip6 and ip6[6] == 44"
    } else {
        "ip and (ip[6:2] & 0x3fff) != 0"
    };
    let cap = Capture::start(c, "frag", filter);
    let ns = &c.node(from).ns;
    let fits = sh(&format!(
        "ip netns exec {ns} ping -M do -c 2 -W 2 -s {} {to_addr}",
        mtu - 28
    ));
    let too_big = sh(&format!(
        "ip netns exec {ns} ping -M do -c 1 -W 2 -s {} {to_addr}",
        mtu - 27
    ));
    let pcap = cap.stop();
    assert!(
        fits.status.success(),
        "largest DF ping ({} bytes) failed: {}",
        mtu - 28,
        stdout(&fits)
    );
    assert!(
        !too_big.status.success(),
        "a DF ping one byte over the MTU passed"
    );
    let msg = format!("{}{}", stdout(&too_big), stderr(&too_big)).to_lowercase();
    assert!(
        msg.contains("message too long") || msg.contains("mtu"),
        "{msg}"
    );
    assert_eq!(
        pcap.lines(""),
        Vec::<String>::new(),
        "fragments on the underlay"
    );
}
