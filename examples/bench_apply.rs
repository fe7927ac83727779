//! Apply benchmarks B1-B3 of BENCHMARKS.md: the library's `reconcile::apply` against
//! `ip -batch` / `bridge -batch` doing the same kernel writes, in fresh network
//! namespaces of one (UML) boot. Not a user command: run it through
//! `scripts/bench-apply.sh`, which builds it and boots user-mode-linux (ESP).
//!
//! ```text
//! bench_apply [--peers 100,300,1000,3000] [--at 1000] [--repeat 3]
//! ```
//!
//! - B1, per N in `--peers`: cold apply for node-0 of a spec with N synthetic peers on
//!   one encrypted and one plaintext network, keys handed to the library (no agents).
//!   The iproute2 side runs the very plan the library computes, rendered as `ip`/`bridge`
//!   batch lines (so the same links, addresses, FDB entries, policies and SAs, with the
//!   same keys); afterwards both namespaces must dump identically.
//! - B2, at N = `--at`: a second apply of the same spec and keys: its plan must be empty,
//!   and `ip monitor all` + `ip xfrm monitor` must see no event (a control write made
//!   while they run proves they are listening).
//! - B3, at N = `--at`: every pair's keys rotated (new SPIs and keys in, old out), the
//!   library's plan against the same adds and deletes through `ip -batch`.
//!
//! Every measurement is the median of `--repeat` runs, library and iproute2 alternating
//! which goes first. Output: markdown tables on stdout, progress on stderr.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use ovl::desired::{self, DirectionKey, Keyring, LocalNode, PeerKeys, Scope};
use ovl::kernel::Kernel;
use ovl::keys::SaKey;
use ovl::plan::{self, Change};
use ovl::reconcile::{self, Keys};
use ovl::spec::{PublicKey, Spec};
use ovl::state::{KernelState, LinkKind, PolicyAction};

type Error = Box<dyn std::error::Error>;

const UNDERLAY: &str = "ul0";
const UNDERLAY_MTU: u32 = 1500;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_apply: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Args {
    peers: Vec<usize>,
    at: usize,
    repeat: usize,
}

fn args() -> Result<Args, Error> {
    let mut a = Args {
        peers: vec![100, 300, 1000, 3000],
        at: 1000,
        repeat: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--peers" => a.peers = value.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--at" => a.at = value.parse()?,
            "--repeat" => a.repeat = value.parse::<usize>()?.max(1),
            _ => return Err(format!("unknown option {flag}").into()),
        }
    }
    Ok(a)
}

fn run() -> Result<(), Error> {
    // As the binary does (`main`): measured as the CLI and the agent run.
    ovl::memory::keep_freed_memory();
    let args = args()?;
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root (network namespaces, XFRM); run scripts/bench-apply.sh".into());
    }
    {
        let probe = Ns::new("probe")?;
        probe
            .ip_batch(&format!(
                "xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 mode transport \
                 aead 'rfc4106(gcm(aes))' 0x{} 128\n",
                "00".repeat(36)
            ))
            .map_err(|e| {
                format!(
                    "needs a kernel with ESP (run scripts/bench-apply.sh, which boots UML): {e}"
                )
            })?;
    }
    let mut out = String::new();
    let mut b1_at = None;
    let _ = writeln!(
        out,
        "| N peers | changes | iproute2 | library apply | ratio | library per peer | of which: execute | plan (pure) | dumps + ESP probe |"
    );
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &n in &args.peers {
        let r = b1(n, args.repeat)?;
        if n == args.at {
            b1_at = Some(r.library);
        }
        let _ = writeln!(
            out,
            "| {n} | {} | {} | {} | {:.2}x | {:.3} ms | {} | {} | {} |",
            r.changes,
            ms(r.iproute2),
            ms(r.library),
            ratio(r.library, r.iproute2),
            r.library.as_secs_f64() * 1000.0 / n as f64,
            ms(r.steps.execute),
            ms(r.steps.plan),
            ms(r.steps.dump + r.steps.probe + r.steps.verify),
        );
    }
    let b1_at = match b1_at {
        Some(d) => d,
        None => b1(args.at, args.repeat)?.library,
    };
    let b2 = b2(args.at, args.repeat)?;
    let b3 = b3(args.at, args.repeat)?;
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| benchmark (N = {}) | library | reference | ratio |",
        args.at
    );
    let _ = writeln!(out, "|---|---:|---:|---:|");
    let _ = writeln!(
        out,
        "| B2 no-op apply, new `Kernel` (as the CLI) | {} | B1 library {} | {:.1}% |",
        ms(b2.fresh),
        ms(b1_at),
        100.0 * ratio(b2.fresh, b1_at)
    );
    let _ = writeln!(
        out,
        "| B2 no-op apply, same `Kernel`, full read | {} | B1 library {} | {:.1}% |",
        ms(b2.reused),
        ms(b1_at),
        100.0 * ratio(b2.reused, b1_at)
    );
    let _ = writeln!(
        out,
        "| B2 no-op apply, same watched `Kernel` (as the agent) | {} | B1 library {} | {:.1}% |",
        ms(b2.watched),
        ms(b1_at),
        100.0 * ratio(b2.watched, b1_at)
    );
    let _ = writeln!(
        out,
        "| B3 rotate every pair ({} changes) | {} | iproute2 {} | {:.2}x |",
        b3.changes,
        ms(b3.library),
        ms(b3.iproute2),
        ratio(b3.library, b3.iproute2)
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "B2 kernel events during the no-op applies: {} (`ip monitor all` + `ip xfrm monitor`; \
         the control write before them showed {} events); plan lengths: {:?}; the watched \
         `Kernel` answered {} of its timed reads from its kept view and made {} full reads.",
        b2.events_during, b2.control_events, b2.plan_lengths, b2.watch.reused, b2.watch.full
    );
    print!("{out}");
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

// --- B1 ---------------------------------------------------------------------------------

struct B1 {
    changes: usize,
    iproute2: Duration,
    library: Duration,
    /// Medians of the step-by-step run.
    steps: Steps,
}

fn b1(n: usize, repeat: usize) -> Result<B1, Error> {
    eprintln!("B1: N = {n}");
    let spec = spec(n)?;
    let ring = ring(&spec, 1)?;
    let (mut lib, mut ip, mut steps) = (vec![], vec![], vec![]);
    let mut changes = 0;
    for r in 0..repeat {
        let lib_ns = Ns::new("lib")?;
        let ip_ns = Ns::new("ip")?;
        let run_lib = || lib_ns.apply(&spec, &ring);
        let run_ip = || -> Result<Duration, Error> {
            let plan = ip_ns.plan(&spec, &ring)?;
            ip_ns.iproute2(&plan.changes)
        };
        let (l, i) = if r % 2 == 0 {
            let l = run_lib()?;
            (l, run_ip()?)
        } else {
            let i = run_ip()?;
            (run_lib()?, i)
        };
        changes = l.1;
        lib.push(l.0);
        ip.push(i);
        let (a, b) = (lib_ns.dump()?, ip_ns.dump()?);
        if a != b {
            return Err(format!("N = {n}: the library and iproute2 namespaces differ").into());
        }
        drop((lib_ns, ip_ns));
        let x_ns = Ns::new("exec")?;
        let s = x_ns.steps(&spec, &ring)?;
        eprintln!("B1: N = {n}: steps {s:?}");
        steps.push(s);
    }
    Ok(B1 {
        changes,
        iproute2: median(ip),
        library: median(lib),
        steps: Steps {
            dump: median(steps.iter().map(|s| s.dump).collect()),
            probe: median(steps.iter().map(|s| s.probe).collect()),
            plan: median(steps.iter().map(|s| s.plan).collect()),
            execute: median(steps.iter().map(|s| s.execute).collect()),
            verify: median(steps.iter().map(|s| s.verify).collect()),
        },
    })
}

// --- B2 ---------------------------------------------------------------------------------

struct B2 {
    fresh: Duration,
    reused: Duration,
    watched: Duration,
    /// How the watched `Kernel` answered its reads (full reads, reused views).
    watch: ovl::kernel::WatchStats,
    events_during: usize,
    control_events: usize,
    plan_lengths: Vec<usize>,
}

fn b2(n: usize, repeat: usize) -> Result<B2, Error> {
    eprintln!("B2: N = {n}");
    let spec = spec(n)?;
    let ring = ring(&spec, 1)?;
    let ns = Ns::new("noop")?;
    ns.apply(&spec, &ring)?;
    let monitors = Monitors::start(&ns)?;
    monitors.settle(Duration::from_secs(4));
    let settled = monitors.events().len();
    ns.ip_batch(
        "xfrm policy add src 203.0.113.1/32 dst 203.0.113.2/32 dir out priority 5 action block\n\
         xfrm policy delete src 203.0.113.1/32 dst 203.0.113.2/32 dir out\n\
         link add ctl0 type bridge\nlink del ctl0\n",
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let control = monitors.events().len();
    let control_events = control - settled;
    for line in monitors
        .events()
        .get(settled..)
        .unwrap_or_default()
        .iter()
        .take(8)
    {
        eprintln!("B2: control event: {line}");
    }
    let (mut fresh, mut lengths) = (vec![], vec![]);
    for _ in 0..repeat {
        let (d, len) = ns.apply(&spec, &ring)?;
        fresh.push(d);
        lengths.push(len);
    }
    let reused = ns.apply_reused(Kernel::connect, &spec, &ring, repeat)?;
    lengths.extend(&reused.lengths);
    let watched = ns.apply_reused(Kernel::connect_watched, &spec, &ring, repeat)?;
    lengths.extend(&watched.lengths);
    std::thread::sleep(Duration::from_millis(500));
    let during: Vec<String> = monitors.events().split_off(control);
    for line in during.iter().take(10) {
        eprintln!("B2: event during the no-op applies: {line}");
    }
    let events_during = during.len();
    drop(monitors);
    eprintln!("B2: N = {n}: steps {:?}", ns.steps(&spec, &ring)?);
    if control_events == 0 {
        return Err("the monitors saw no event for the control write: they do not work".into());
    }
    // The watched view must see a change made behind its back, and repair it.
    let repaired = ns.with_kernel_of(Kernel::connect_watched, async |kernel| {
        let me = spec.nodes.first().ok_or("no node")?;
        reconcile::apply(&spec, me, &kernel, Keys::Ring(&ring), false).await?;
        command(
            "ip",
            &["-n", &ns.0, "link", "set", "ovbr-200", "mtu", "1300"],
        )?;
        let out = reconcile::apply(&spec, me, &kernel, Keys::Ring(&ring), false).await?;
        Ok(out.plan.changes.len())
    })?;
    eprintln!("B2: watched view after an MTU changed by hand: plan of {repaired} change(s)");
    if repaired == 0 {
        return Err("the watched view missed a change made by hand".into());
    }
    let watch = watched.watch.ok_or("no watch statistics")?;
    if watch.reused < repeat as u64 {
        return Err(format!("the watched view was reused only {} times", watch.reused).into());
    }
    Ok(B2 {
        fresh: median(fresh),
        reused: median(reused.times),
        watched: median(watched.times),
        watch,
        events_during,
        control_events,
        plan_lengths: lengths,
    })
}

/// `ip monitor all` and `ip xfrm monitor` on a namespace, writing to files.
struct Monitors {
    children: Vec<std::process::Child>,
    files: Vec<std::path::PathBuf>,
}

impl Monitors {
    fn start(ns: &Ns) -> Result<Monitors, Error> {
        let mut m = Monitors {
            children: vec![],
            files: vec![],
        };
        for (i, what) in [&["monitor", "all"][..], &["xfrm", "monitor"][..]]
            .iter()
            .enumerate()
        {
            let file = std::env::temp_dir().join(format!("bench-{}-mon{i}.txt", ns.0));
            let child = Command::new("ip")
                .args(["-n", &ns.0])
                .args(*what)
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&file)?)
                .stderr(Stdio::null())
                .spawn()?;
            m.children.push(child);
            m.files.push(file);
        }
        std::thread::sleep(Duration::from_millis(500));
        Ok(m)
    }

    /// Every event line so far (continuation lines left out).
    fn events(&self) -> Vec<String> {
        self.files
            .iter()
            .flat_map(|f| {
                let text = std::fs::read_to_string(f).unwrap_or_default();
                text.lines()
                    .filter(|l| !l.starts_with(char::is_whitespace))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Waits until no event came for `quiet` (at most 60 s): the kernel's own activity
    /// after the previous apply (links coming up) is over.
    fn settle(&self, quiet: Duration) {
        let start = Instant::now();
        let mut seen = self.events().len();
        let mut since = Instant::now();
        while since.elapsed() < quiet && start.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.events().len();
            if now != seen {
                seen = now;
                since = Instant::now();
            }
        }
    }
}

impl Drop for Monitors {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

// --- B3 ---------------------------------------------------------------------------------

struct B3 {
    changes: usize,
    library: Duration,
    iproute2: Duration,
}

fn b3(n: usize, repeat: usize) -> Result<B3, Error> {
    eprintln!("B3: N = {n}");
    let spec = spec(n)?;
    let old = ring(&spec, 1)?;
    let (mut lib, mut ip) = (vec![], vec![]);
    let mut changes = 0;
    for r in 0..repeat {
        let new = ring(&spec, 2 + r as u32)?;
        let lib_ns = Ns::new("rotlib")?;
        let ip_ns = Ns::new("rotip")?;
        lib_ns.apply(&spec, &old)?;
        let setup = ip_ns.plan(&spec, &old)?;
        ip_ns.iproute2(&setup.changes)?;
        let rotation = ip_ns.plan(&spec, &new)?;
        let adds = rotation
            .changes
            .iter()
            .filter(|c| matches!(c, Change::AddSa(_)))
            .count();
        let dels = rotation
            .changes
            .iter()
            .filter(|c| matches!(c, Change::DeleteSa(_)))
            .count();
        if adds != 2 * n || dels != 2 * n || rotation.changes.len() != 4 * n {
            return Err(format!(
                "rotation plan: {adds} adds, {dels} deletes, {} changes",
                rotation.changes.len()
            )
            .into());
        }
        let run_lib = || lib_ns.apply(&spec, &new);
        let run_ip = || ip_ns.iproute2(&rotation.changes);
        let (l, i) = if r % 2 == 0 {
            let l = run_lib()?;
            (l, run_ip()?)
        } else {
            let i = run_ip()?;
            (run_lib()?, i)
        };
        changes = l.1;
        lib.push(l.0);
        ip.push(i);
        if lib_ns.dump()? != ip_ns.dump()? {
            return Err("B3: the library and iproute2 namespaces differ after the rotation".into());
        }
    }
    Ok(B3 {
        changes,
        library: median(lib),
        iproute2: median(ip),
    })
}

// --- the spec and the keys ----------------------------------------------------------------

/// node-0 (this node, 198.18.0.1) and N peers (198.18.0.2, ...), in the benchmarking
/// range (RFC 2544); an encrypted and a plaintext network over all of them. Written as
/// YAML and parsed, as an operator's spec would be.
fn spec(peers: usize) -> Result<Spec, Error> {
    use std::fmt::Write as _;
    let mut yaml = String::from("apiVersion: ovl/v1\ncluster:\n  name: bench\nnodes:\n");
    for i in 0..=peers {
        let mut k = [0u8; 32];
        // Distinct per node and never a low-order point (those are refused).
        k[0] = 9;
        k[8..16].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        let _ = write!(
            yaml,
            "  - name: node-{i}\n    address: {}\n    publicKey: \"{}\"\n",
            address(i),
            PublicKey(k).to_base64()
        );
    }
    yaml.push_str(
        "networks:\n\
         \x20 - name: enc\n    vni: 100\n    encrypted: true\n    addresses:\n      node-0: 10.100.0.1/16\n\
         \x20 - name: plain\n    vni: 200\n    addresses:\n      node-0: 10.200.0.1/16\n",
    );
    Ok(ovl::spec::parse(yaml.as_bytes(), "bench.yaml")?)
}

fn address(i: usize) -> IpAddr {
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 1));
    IpAddr::V4(Ipv4Addr::from(base + i as u32))
}

/// Node-0's keys with every peer: generation `gen` has its own SPIs and fresh keys.
fn ring(spec: &Spec, generation: u32) -> Result<Keyring, Error> {
    let mut ring = BTreeMap::new();
    for (i, peer) in spec.nodes.iter().skip(1).enumerate() {
        let spi = (generation << 24) + 2 * i as u32;
        let keys = PeerKeys {
            inbound: vec![DirectionKey {
                spi: spi + 0x100,
                key: SaKey::generate().map_err(|_| "no random bytes")?,
            }],
            outbound: vec![DirectionKey {
                spi: spi + 0x101,
                key: SaKey::generate().map_err(|_| "no random bytes")?,
            }],
        };
        ring.insert(peer.address, keys);
    }
    Ok(ring)
}

// --- namespaces -------------------------------------------------------------------------------

/// A fresh network namespace with the underlay (`ul0`, 198.18.0.1); flushed and
/// deleted on drop, then a pause so that the kernel's cleanup does not run into the next
/// measurement (UML has one CPU).
struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Result<Ns, Error> {
        let name = format!("bench-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        command("ip", &["netns", "add", &name])?;
        let ns = Ns(name);
        // No IPv6: its DAD, router and MLD packets on the new bridges would be flooded
        // to every peer and make the kernel resolve them (ARP), a background load and
        // monitor noise that has nothing to do with the writes measured.
        command(
            "ip",
            &[
                "netns",
                "exec",
                &ns.0,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        )?;
        // The peers are reached through a gateway whose address is resolved already, as
        // on a real network: flooded VXLAN packets to a thousand peers that nobody
        // answers would make the kernel ARP for each of them in the background.
        ns.ip_batch(&format!(
            "link set lo up\nlink add {UNDERLAY} mtu {UNDERLAY_MTU} type veth peer name ul1\n\
             addr add 198.18.0.1/32 dev {UNDERLAY}\nlink set ul1 up\nlink set {UNDERLAY} up\n\
             neigh add 198.51.100.1 lladdr 02:00:00:00:00:01 dev {UNDERLAY} nud permanent\n\
             route add 198.18.0.0/15 via 198.51.100.1 dev {UNDERLAY} onlink\n"
        ))?;
        Ok(ns)
    }

    fn ip_batch(&self, lines: &str) -> Result<(), Error> {
        let file = std::env::temp_dir().join(format!("{}.batch", self.0));
        std::fs::write(&file, lines)?;
        let r = command(
            "ip",
            &["-n", &self.0, "-batch", &file.display().to_string()],
        );
        let _ = std::fs::remove_file(&file);
        r
    }

    /// Runs `f` with a `Kernel` opened inside the namespace, on a thread of its own.
    fn with_kernel<T: Send>(
        &self,
        f: impl AsyncFnOnce(Kernel) -> Result<T, Error> + Send,
    ) -> Result<T, Error> {
        self.with_kernel_of(Kernel::connect, f)
    }

    /// [`Ns::with_kernel`] with a `Kernel` from `connect` (plain or watched).
    fn with_kernel_of<T: Send>(
        &self,
        connect: fn() -> Result<Kernel, ovl::kernel::KernelError>,
        f: impl AsyncFnOnce(Kernel) -> Result<T, Error> + Send,
    ) -> Result<T, Error> {
        let path = format!("/run/netns/{}", self.0);
        std::thread::scope(|s| {
            s.spawn(move || -> Result<T, String> {
                let file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| e.to_string())?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(async {
                    let kernel = connect().map_err(|e| e.to_string())?;
                    f(kernel).await.map_err(|e| e.to_string())
                })
            })
            .join()
            .map_err(|_| "the namespace thread panicked".to_owned())?
        })
        .map_err(Into::into)
    }

    /// `reconcile::apply` with a new `Kernel`, as one CLI run does: time and plan length.
    fn apply(&self, spec: &Spec, ring: &Keyring) -> Result<(Duration, usize), Error> {
        wait_idle();
        self.with_kernel(async |kernel| {
            let me = spec.nodes.first().ok_or("no node")?;
            let t0 = Instant::now();
            let out = reconcile::apply(spec, me, &kernel, Keys::Ring(ring), false).await?;
            let elapsed = t0.elapsed();
            if let Some(e) = out.encrypted_not_up {
                return Err(e.into());
            }
            Ok((elapsed, out.plan.changes.len()))
        })
    }

    /// `times` applies on one `Kernel` from `connect` (as the agent does): their times,
    /// plan lengths, and the watch's statistics over the timed applies.
    fn apply_reused(
        &self,
        connect: fn() -> Result<Kernel, ovl::kernel::KernelError>,
        spec: &Spec,
        ring: &Keyring,
        times: usize,
    ) -> Result<Reused, Error> {
        self.with_kernel_of(connect, async |kernel| {
            let me = spec.nodes.first().ok_or("no node")?;
            // The first one probes ESP (once per Kernel) and fills a watch; not timed.
            reconcile::apply(spec, me, &kernel, Keys::Ring(ring), false).await?;
            let before = kernel.watch_stats().unwrap_or_default();
            let (mut d, mut lens) = (vec![], vec![]);
            for _ in 0..times {
                wait_idle();
                let t0 = Instant::now();
                let out = reconcile::apply(spec, me, &kernel, Keys::Ring(ring), false).await?;
                d.push(t0.elapsed());
                lens.push(out.plan.changes.len());
            }
            let stats = kernel.watch_stats().map(|s| ovl::kernel::WatchStats {
                reused: s.reused - before.reused,
                full: s.full - before.full,
            });
            Ok(Reused {
                times: d,
                lengths: lens,
                watch: stats,
            })
        })
    }

    /// The plan the library would run here.
    fn plan(&self, spec: &Spec, ring: &Keyring) -> Result<plan::Plan, Error> {
        self.with_kernel(async |kernel| {
            let observed = kernel.dump().await?;
            let want = desired_state(spec, ring)?;
            Ok(plan::plan(&want, &observed))
        })
    }

    /// `reconcile::apply`'s steps one by one, timed.
    fn steps(&self, spec: &Spec, ring: &Keyring) -> Result<Steps, Error> {
        wait_idle();
        self.with_kernel(async |kernel| {
            let me = spec.nodes.first().ok_or("no node")?;
            let t = Instant::now();
            let observed = kernel.dump().await?;
            kernel.underlay_for(me.address).await?;
            let dump = t.elapsed();
            let t = Instant::now();
            kernel.check_esp(me.address).await?;
            let probe = t.elapsed();
            if std::env::var_os("OVL_BENCH_IDLE_AFTER_PROBE").is_some() {
                wait_idle();
            }
            let t = Instant::now();
            let want = desired_state(spec, ring)?;
            let plan = plan::plan(&want, &observed);
            let pure = t.elapsed();
            let t = Instant::now();
            kernel.execute(&plan.changes).await?;
            let execute = t.elapsed();
            let t = Instant::now();
            let after = kernel.dump().await?;
            let rest = plan::plan(&want, &after);
            let verify = t.elapsed();
            if !rest.is_empty() {
                return Err("not converged".into());
            }
            Ok(Steps {
                dump,
                probe,
                plan: pure,
                execute,
                verify,
            })
        })
    }

    fn dump(&self) -> Result<KernelState, Error> {
        self.with_kernel(async |kernel| Ok(kernel.dump().await?))
    }

    /// Runs `changes` as `ip -batch` / `bridge -batch` files, one process per run of
    /// lines for the same tool, in order; returns the time of the processes.
    fn iproute2(&self, changes: &[Change]) -> Result<Duration, Error> {
        let mut runs: Vec<(&str, String)> = vec![];
        for c in changes {
            for (tool, line) in iproute2_lines(c)? {
                match runs.last_mut() {
                    Some((t, text)) if *t == tool => text.push_str(&line),
                    _ => runs.push((tool, line)),
                }
            }
        }
        let mut files = vec![];
        for (i, (tool, text)) in runs.iter().enumerate() {
            let file = std::env::temp_dir().join(format!("{}-{i}.batch", self.0));
            std::fs::write(&file, text)?;
            files.push((*tool, file));
        }
        wait_idle();
        let t0 = Instant::now();
        let mut result = Ok(());
        for (tool, file) in &files {
            result = command(
                tool,
                &["-n", &self.0, "-batch", &file.display().to_string()],
            );
            if result.is_err() {
                break;
            }
        }
        let elapsed = t0.elapsed();
        for (_, file) in &files {
            let _ = std::fs::remove_file(file);
        }
        result.map(|()| elapsed)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = self.ip_batch("xfrm state flush\nxfrm policy flush\n");
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        wait_idle();
    }
}

/// Applies on one `Kernel`: their times, plan lengths and (watched) how reads went.
struct Reused {
    times: Vec<Duration>,
    lengths: Vec<usize>,
    watch: Option<ovl::kernel::WatchStats>,
}

/// Times of `reconcile::apply`'s steps.
#[derive(Debug, Clone, Copy, Default)]
struct Steps {
    dump: Duration,
    probe: Duration,
    plan: Duration,
    execute: Duration,
    verify: Duration,
}

/// Waits until the (only) CPU is idle: the kernel's deferred work (a deleted network
/// namespace is cleaned up by a worker) must not run into the next measurement.
fn wait_idle() {
    let sample = || -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu = stat.lines().next()?;
        let v: Vec<u64> = cpu
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
        Some((idle, v.iter().sum()))
    };
    let start = Instant::now();
    let mut calm = 0;
    while calm < 3 && start.elapsed() < Duration::from_secs(60) {
        let Some((i0, t0)) = sample() else { return };
        std::thread::sleep(Duration::from_millis(200));
        let Some((i1, t1)) = sample() else { return };
        let busy = 1.0 - (i1 - i0) as f64 / (t1 - t0).max(1) as f64;
        calm = if busy < 0.05 { calm + 1 } else { 0 };
    }
}

fn desired_state(spec: &Spec, ring: &Keyring) -> Result<KernelState, Error> {
    let node = spec.nodes.first().ok_or("no node")?;
    let local = LocalNode {
        node,
        underlay: UNDERLAY.parse()?,
        underlay_mtu: UNDERLAY_MTU,
    };
    Ok(desired::build(spec, &local, ring, Scope::All)?)
}

fn command(cmd: &str, args: &[&str]) -> Result<(), Error> {
    let out = Command::new(cmd).args(args).stdin(Stdio::null()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into())
    }
}

// --- one change as iproute2 batch lines ---------------------------------------------------------

fn iproute2_lines(change: &Change) -> Result<Vec<(&'static str, String)>, Error> {
    let ip = |s: String| ("ip", s + "\n");
    Ok(match change {
        Change::PutPolicy {
            policy: p,
            replaces,
        } => {
            let verb = if replaces.is_some() { "update" } else { "add" };
            let s = &p.id.selector;
            let tmpl = match p.action {
                PolicyAction::Block => "action block tmpl".to_owned(),
                PolicyAction::Esp {
                    src: Some(a),
                    dst: Some(b),
                } => format!("tmpl src {a} dst {b}"),
                PolicyAction::Esp { .. } => "tmpl".to_owned(),
            };
            vec![ip(format!(
                "xfrm policy {verb} src {} dst {} proto udp dport {} dir {} priority {} {tmpl} proto esp reqid {} mode transport",
                s.src, s.dst, s.dport, p.id.dir, p.priority, p.reqid
            ))]
        }
        Change::DeletePolicy(id) => vec![ip(format!(
            "xfrm policy delete src {} dst {} proto udp dport {} dir {}",
            id.selector.src, id.selector.dst, id.selector.dport, id.dir
        ))],
        Change::AddSa(sa) => {
            let key: String = sa.key.expose().iter().fold(String::new(), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            });
            let l = &sa.lifetime;
            let mut limits = String::new();
            for (name, v) in [
                ("byte-soft", l.soft_bytes),
                ("byte-hard", l.hard_bytes),
                ("packet-soft", l.soft_packets),
                ("packet-hard", l.hard_packets),
                ("time-soft", l.soft_add_seconds),
                ("time-hard", l.hard_add_seconds),
            ] {
                if v != 0 {
                    let _ = write!(limits, " limit {name} {v}");
                }
            }
            let (s, d) = (sa.id.src, sa.id.dst);
            let plen = if s.is_ipv6() { 128 } else { 32 };
            vec![ip(format!(
                "xfrm state add src {s} dst {d} proto esp spi 0x{:08x} reqid {} mode transport \
                 flag esn replay-window {} aead 'rfc4106(gcm(aes))' 0x{key} 128 \
                 sel src {s}/{plen} dst {d}/{plen} proto udp dport {}{limits}",
                sa.id.spi, sa.reqid, sa.replay_window, sa.dport
            ))]
        }
        Change::DeleteSa(id) => vec![ip(format!(
            "xfrm state delete src {} dst {} proto esp spi 0x{:08x}",
            id.src, id.dst, id.spi
        ))],
        Change::CreateLink(l) => {
            let kind = match &l.kind {
                LinkKind::Bridge => "type bridge".to_owned(),
                LinkKind::Vxlan(v) => format!(
                    "type vxlan id {} local {} dstport {} dev {} learning{}",
                    v.vni,
                    v.local,
                    v.port,
                    v.underlay,
                    if v.local.is_ipv4() { " udpcsum" } else { "" }
                ),
            };
            let master = l
                .master
                .as_ref()
                .map(|m| format!(" master {m}"))
                .unwrap_or_default();
            vec![
                ip(format!("link add {} mtu {}{master} {kind}", l.name, l.mtu)),
                ip(format!("link set {} alias \"{}\"", l.name, l.alias)),
            ]
        }
        Change::SetUp { link } => vec![ip(format!("link set {link} up"))],
        Change::AddAddress(a) => vec![ip(format!("addr replace {} dev {}", a.addr, a.link))],
        Change::AddFdb(e) => vec![(
            "bridge",
            format!(
                "fdb append 00:00:00:00:00:00 dev {} dst {} self permanent\n",
                e.link, e.remote
            ),
        )],
        other => return Err(format!("no iproute2 rendering for {other}").into()),
    })
}
