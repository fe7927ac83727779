//! A single network namespace for the tests that drive the library's kernel layer directly
//! (`kernel_links`, `kernel_xfrm`, `kernel_batch`): created by name, deleted on drop (also
//! when the test panicked), looked at with the kernel's own tools (`ip`, `bridge`), and
//! entered by a dedicated thread that then builds a current-thread tokio runtime, so the
//! netlink sockets of the code under test live in the namespace while the test process
//! stays where it is.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::File;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{CloneFlags, setns};
use ovl::kernel::Kernel;
use ovl::keys::SaKey;
use ovl::state::KernelState;
use serde_json::Value;

use super::{ok, require_root, sh, stderr};

/// How tests that need ESP fail outside an ESP-capable kernel.
pub const NEEDS_ESP: &str = "needs an ESP-capable kernel: run via scripts/uml-run.sh";

/// A named network namespace, deleted when dropped.
pub struct Netns {
    name: String,
}

impl Netns {
    /// A fresh namespace `PREFIX-PID-N` (N counts up within the test binary) with `lo` up.
    pub fn new(prefix: &str) -> Netns {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let ns = Netns::add(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        ns.ip("link set lo up");
        ns
    }

    /// `ip netns add NAME`, nothing else in it (`lo` stays down). A leftover of the same
    /// name (from a killed run that had the same pid) is deleted first.
    pub fn add(name: String) -> Netns {
        require_root();
        let _ = sh(&format!("ip netns del {name}"));
        ok(&format!("ip netns add {name}"));
        Netns { name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Moves the calling thread (only it) into the namespace.
    pub fn enter(&self) {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        setns(&file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
    }

    /// Runs `f` to completion inside the namespace, on a thread of its own that entered it
    /// before building its runtime; a panic there is the caller's panic.
    pub fn block_on<T, F, Fut>(&self, f: F) -> T
    where
        T: Send,
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
    {
        std::thread::scope(|s| {
            let thread = s.spawn(move || {
                self.enter();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
                rt.block_on(f())
            });
            match thread.join() {
                Ok(t) => t,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Runs `f` on a [`Kernel`] opened inside the namespace (see [`Netns::block_on`]).
    pub fn with_kernel<T, F, Fut>(&self, f: F) -> T
    where
        T: Send,
        F: FnOnce(Kernel) -> Fut + Send,
        Fut: Future<Output = T>,
    {
        self.block_on(move || async move {
            let kernel = Kernel::connect().unwrap_or_else(|e| panic!("Kernel::connect: {e}"));
            f(kernel).await
        })
    }

    /// What the controller's [`Kernel::dump`] finds in the namespace.
    pub fn dump(&self) -> KernelState {
        self.with_kernel(|k| async move { k.dump().await.expect("dump") })
    }

    /// `ip -n NS ARGS` (through `sh`, so ARGS may quote), which must succeed; its stdout.
    pub fn ip(&self, args: &str) -> String {
        ok(&format!("ip -n {} {args}", self.name))
    }

    /// `bridge -n NS ARGS`, which must succeed; its stdout.
    pub fn bridge(&self, args: &str) -> String {
        ok(&format!("bridge -n {} {args}", self.name))
    }

    /// The kernel's own description of one link (`ip -d -j link show dev NAME`).
    pub fn link(&self, name: &str) -> Value {
        json(&self.ip(&format!("-d -j link show dev {name}")))[0].clone()
    }

    pub fn has_link(&self, name: &str) -> bool {
        sh(&format!("ip -n {} link show dev {name}", self.name))
            .status
            .success()
    }

    /// `(address/prefix, scope)` of every address on a link.
    pub fn addresses(&self, name: &str) -> Vec<(String, String)> {
        let v = json(&self.ip(&format!("-j addr show dev {name}")));
        let infos = v[0]["addr_info"].as_array().cloned().unwrap_or_default();
        infos
            .iter()
            .map(|a| {
                let addr = format!("{}/{}", a["local"].as_str().unwrap_or("?"), a["prefixlen"]);
                (addr, a["scope"].as_str().unwrap_or("?").to_owned())
            })
            .collect()
    }

    /// The destinations of the `00:00:00:00:00:00 self` entries on a device.
    pub fn zero_fdb(&self, dev: &str) -> BTreeSet<String> {
        json(&self.bridge(&format!("-j fdb show dev {dev}")))
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|e| e["mac"] == "00:00:00:00:00:00")
            .filter(|e| {
                e["flags"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|f| f == "self"))
            })
            .filter_map(|e| e["dst"].as_str().map(str::to_owned))
            .collect()
    }

    /// `SAD count N` of `ip xfrm state count`.
    pub fn sa_count(&self) -> usize {
        let text = self.ip("xfrm state count");
        number_after(&text, "SAD count").unwrap_or_else(|| panic!("{text}"))
    }

    /// (IN, OUT) of `ip xfrm policy count`.
    pub fn policy_count(&self) -> (usize, usize) {
        let text = self.ip("xfrm policy count");
        let n = |w| number_after(&text, w).unwrap_or_else(|| panic!("{text}"));
        (n("IN"), n("OUT"))
    }

    /// Whether the kernel of this namespace can hold an ESP AES-GCM state, asked with
    /// `ip` (not with the code under test). Leaves no state behind.
    pub fn has_esp(&self) -> bool {
        let key = hex(&SaKey::generate().unwrap());
        let added = sh(&format!(
            "ip -n {} xfrm state add src 203.0.113.1 dst 203.0.113.2 proto esp spi 0x77 mode transport \
             aead 'rfc4106(gcm(aes))' 0x{key} 128",
            self.name
        ))
        .status
        .success();
        if added {
            self.ip("xfrm state flush");
        }
        added
    }

    /// Fails the test (never passes it silently) without ESP.
    pub fn require_esp(&self) {
        assert!(self.has_esp(), "{NEEDS_ESP}");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = sh(&format!("ip netns del {}", self.name));
        if !out.status.success() {
            eprintln!(
                "warning: cannot delete network namespace {}: {}",
                self.name,
                stderr(&out)
            );
        }
    }
}

/// A key as `ip xfrm` prints and takes it.
pub fn hex(key: &SaKey) -> String {
    key.expose().iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON from iproute2 ({e}): {text}"))
}

fn number_after(text: &str, word: &str) -> Option<usize> {
    let rest = &text[text.find(word)? + word.len()..];
    rest.split_whitespace().next()?.parse().ok()
}
