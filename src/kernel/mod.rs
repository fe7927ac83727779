//! The only module that talks to the kernel (netlink). Everything else is pure.
//!
//! - [`links`]: links, bridges, VXLAN devices, addresses and FDB entries (rtnetlink);
//! - [`xfrm`]: XFRM states and policies (xfrmnetlink / netlink-packet-xfrm);
//! - `batch`: many requests per `send()`, for [`Kernel::execute`].
//!
//! A [`Kernel`] works in the network namespace of the thread that opened it.

mod batch;
pub mod counters;
pub mod links;
pub mod monitor;
mod watch;
pub mod xfrm;

pub use links::HALF_CREATED_GROUP;
pub use watch::WatchStats;

use std::net::IpAddr;

use batch::{BatchError, BatchSocket};

use crate::plan::Change;
use crate::state::{IfName, KernelState, PolicyAction};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot open a netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("netlink {operation} failed: {message}")]
    Netlink { operation: String, message: String },
    #[error("kernel returned an unexpected {what}: {detail}")]
    Unexpected { what: &'static str, detail: String },
    #[error(
        "this kernel cannot carry encrypted networks: {detail} (needs CONFIG_INET_ESP/CONFIG_INET6_ESP, \
         CONFIG_XFRM_USER and the rfc4106(gcm(aes)) AEAD)"
    )]
    NoEsp { detail: String },
    #[error("cannot enter network namespace {path}: {source}")]
    Netns {
        path: String,
        source: std::io::Error,
    },
    /// The kernel answered a request with an errno (`source.raw_os_error()`).
    #[error("kernel refused \"{operation}\": {source}")]
    Refused {
        operation: String,
        source: std::io::Error,
    },
    #[error("{operation}: no link named {link}")]
    LinkNotFound { operation: String, link: String },
    /// A link with one of our names exists but is not ours (no ownership alias), so the
    /// controller will not create, adopt or change it.
    #[error("{operation}: cannot create {link}: {reason}")]
    ForeignLink {
        operation: String,
        link: String,
        reason: String,
        /// Found by the check before a plan's first change (nothing was changed), not
        /// in the middle of one.
        before_any_change: bool,
    },
    /// A change was handed to the wrong executor (a bug, never a panic).
    #[error("{operation}: not a {executor} change")]
    Unsupported {
        operation: String,
        executor: &'static str,
    },
    /// The kernel holds someone else's XFRM state or policy where the change would
    /// replace or delete one of ours (its reqid is not in our range): left alone.
    #[error("{operation}: the kernel's {what} there is not owned by ovl-controller ({detail})")]
    ForeignXfrm {
        operation: String,
        what: &'static str,
        detail: String,
    },
    /// An object that cannot be expressed to the kernel (a bug before the executor).
    #[error("{operation}: {reason}")]
    Invalid { operation: String, reason: String },
}

impl KernelError {
    /// The errno the kernel answered with, when it refused a request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            KernelError::Refused { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// The interface that carries a local address, and its MTU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Underlay {
    pub name: IfName,
    pub index: u32,
    pub mtu: u32,
    /// A loopback or dummy device (a routed VTEP address on `lo` or a `dummy`): its MTU
    /// is not the path's.
    pub loopback: bool,
}

/// How often (in changes) [`Kernel::execute`] reports progress within one phase.
const PROGRESS_EVERY: usize = 1000;

/// How long a failed ESP probe stands before the next one.
pub const ESP_RECHECK: std::time::Duration = std::time::Duration::from_secs(60);

/// The SPIs of the ESP slots (destination, SPI) in `slots` towards `dst`.
fn spis_towards(
    slots: &std::collections::BTreeSet<(std::net::IpAddr, u32)>,
    dst: std::net::IpAddr,
) -> impl Iterator<Item = u32> + '_ {
    slots.range((dst, 0)..=(dst, u32::MAX)).map(|&(_, spi)| spi)
}

pub struct Kernel {
    pub(crate) route: rtnetlink::Handle,
    /// The sockets of [`Kernel::execute`]'s batches (one batch at a time on each).
    route_batch: tokio::sync::Mutex<BatchSocket>,
    xfrm_batch: tokio::sync::Mutex<BatchSocket>,
    /// The ESP slots (destination, SPI) that SAs of others held at the last full read
    /// (see [`Kernel::foreign_esp_slots`]).
    foreign_esp: std::sync::Mutex<std::collections::BTreeSet<(std::net::IpAddr, u32)>>,
    /// ESP support does not change while we run: probe once per address family.
    esp_ok: std::sync::Mutex<std::collections::BTreeSet<bool>>,
    /// A failed probe per address family, answered again for [`ESP_RECHECK`] (a module
    /// may be loaded meanwhile, so not for good).
    esp_failed: std::sync::Mutex<std::collections::BTreeMap<bool, (std::time::Instant, String)>>,
    /// Where [`Kernel::execute`] reports how far it got (see [`Kernel::set_progress`]).
    progress: std::sync::Mutex<Option<crate::progress::Sink>>,
    /// The last full read, kept while the kernel announces no change (see `watch`);
    /// only for a long-lived `Kernel` ([`Kernel::connect_watched`]).
    watch: Option<std::sync::Mutex<watch::Watch>>,
}

impl Kernel {
    /// Opens netlink connections in the current network namespace. Must be called inside
    /// a tokio runtime (the connections are spawned on it).
    pub fn connect() -> Result<Kernel, KernelError> {
        let (conn, route, _) = rtnetlink::new_connection().map_err(KernelError::Connect)?;
        tokio::spawn(conn);
        let route_batch = BatchSocket::open(netlink_sys::constants::NETLINK_ROUTE)
            .map_err(KernelError::Connect)?;
        let xfrm_batch = BatchSocket::open(netlink_sys::constants::NETLINK_XFRM)
            .map_err(KernelError::Connect)?;
        Ok(Kernel {
            route,
            route_batch: tokio::sync::Mutex::new(route_batch),
            xfrm_batch: tokio::sync::Mutex::new(xfrm_batch),
            foreign_esp: Default::default(),
            esp_ok: Default::default(),
            esp_failed: Default::default(),
            progress: Default::default(),
            watch: None,
        })
    }

    /// [`Kernel::connect`] for a view that is only shown (`status`): a dump the kernel
    /// keeps interrupting (a large change is being carried out meanwhile) is taken as
    /// its last attempt read it, and [`Kernel::read_was_unsettled`] says so.
    pub fn connect_for_display() -> Result<Kernel, KernelError> {
        let mut kernel = Kernel::connect()?;
        for socket in [&mut kernel.route_batch, &mut kernel.xfrm_batch] {
            socket.get_mut().accept_unsettled = true;
        }
        Ok(kernel)
    }

    /// Whether a dump of a [`Kernel::connect_for_display`] was taken while the kernel
    /// kept changing (it may be off by what changed meanwhile).
    pub async fn read_was_unsettled(&self) -> bool {
        self.route_batch.lock().await.unsettled || self.xfrm_batch.lock().await.unsettled
    }

    /// [`Kernel::connect`], and [`Kernel::dump`] answers from its last full read while
    /// the kernel's change notifications say that nothing changed since (see `watch`).
    /// For the agent, which reads the kernel on every pass.
    pub fn connect_watched() -> Result<Kernel, KernelError> {
        let mut kernel = Kernel::connect()?;
        let watch = watch::Watch::open().map_err(KernelError::Connect)?;
        kernel.watch = Some(std::sync::Mutex::new(watch));
        Ok(kernel)
    }

    /// How often [`Kernel::dump`] reused its kept view and read in full (`None`
    /// without a watch).
    pub fn watch_stats(&self) -> Option<WatchStats> {
        let watch = self.watch.as_ref()?.lock().ok()?;
        Some(watch.stats())
    }

    /// The ESP slots (destination, SPI) that SAs of other software (strongSwan, ...)
    /// held at the last full read by [`Kernel::dump`]: an SA of ours cannot be added
    /// there (the kernel refuses it), so SPIs are chosen, and peers' SPIs accepted, only
    /// outside them. A watched `Kernel` reads in full after any XFRM change, so this is
    /// as fresh as its view.
    pub fn foreign_esp_slots(&self) -> std::collections::BTreeSet<(std::net::IpAddr, u32)> {
        self.foreign_esp
            .lock()
            .map(|slots| slots.clone())
            .unwrap_or_default()
    }

    /// The SPIs of [`Kernel::foreign_esp_slots`] towards `dst` (usually none: read
    /// without copying the set).
    pub fn foreign_spis_towards(&self, dst: std::net::IpAddr) -> Vec<u32> {
        self.foreign_esp
            .lock()
            .map(|slots| spis_towards(&slots, dst).collect())
            .unwrap_or_default()
    }

    /// Usage counters of our SAs (a separate dump: counters never enter a plan).
    pub async fn sa_counters(
        &self,
    ) -> Result<std::collections::BTreeMap<crate::state::SaId, counters::SaCounters>, KernelError>
    {
        xfrm::sa_counters(&mut *self.xfrm_batch.lock().await).await
    }

    /// Everything the controller owns in this namespace. With a watch
    /// ([`Kernel::connect_watched`]), the last full read when the kernel has announced
    /// no change since it started.
    pub async fn dump(&self) -> Result<KernelState, KernelError> {
        let Some(watch) = &self.watch else {
            return self.dump_full().await;
        };
        let started = std::time::Instant::now();
        // Drains the notifications either way: a change from now on invalidates the
        // read below.
        if let Some(state) = watch.lock().ok().and_then(|mut w| w.reuse()) {
            return Ok(state);
        }
        let state = self.dump_full().await?;
        if let Ok(mut w) = watch.lock() {
            w.keep(&state, started);
        }
        Ok(state)
    }

    /// Every object we own, read from the kernel.
    async fn dump_full(&self) -> Result<KernelState, KernelError> {
        let started = debug_clock();
        // On the batch sockets: parsed in place, no copy per message (see `batch::dump`).
        let mut state = links::dump_on(&mut *self.route_batch.lock().await).await?;
        let links_done = elapsed_us(started);
        let xfrm::XfrmDump {
            policies,
            sas,
            foreign_esp,
        } = xfrm::dump(&mut *self.xfrm_batch.lock().await).await?;
        if let Ok(mut slots) = self.foreign_esp.lock() {
            *slots = foreign_esp;
        }
        // An SA of ours as we install it (reqid kept: ESP, `rfc4106(gcm(aes))`, our key
        // length) proves that this kernel carries it for that address family, and the
        // modules cannot go away while it exists: no need to probe (`check_esp`) again.
        let proven: std::collections::BTreeSet<bool> = sas
            .values()
            .filter(|sa| sa.reqid != 0)
            .map(|sa| sa.id.dst.is_ipv6())
            .collect();
        if !proven.is_empty()
            && let Ok(mut ok) = self.esp_ok.lock()
        {
            ok.extend(proven);
        }
        state.policies = policies;
        state.sas = sas;
        tracing::debug!(
            links_us = links_done,
            total_us = elapsed_us(started),
            "kernel dump"
        );
        Ok(state)
    }

    /// Runs the changes in the given order, stopping at the first failure. The plan's
    /// order is what keeps every intermediate state safe, so it is never reordered here.
    ///
    /// # Many requests per send
    ///
    /// Consecutive changes of the same phase (same kind: policy puts of one rank, SA
    /// adds, FDB appends, ...) are sent as one buffer of requests per `send()` (up to
    /// ~1000, see `batch`); errors are matched to changes by sequence number, and the
    /// wait for the kernel's answers has a deadline.
    /// Before the first change of the next phase, every request of the previous one is
    /// acknowledged, so the plan's phase order holds exactly as if the changes ran one by
    /// one. Link creation runs on its own (two requests and a possible adoption).
    ///
    /// Ownership checks (never replace or delete a foreign XFRM object) use one policy
    /// dump and one state dump taken here, when the plan needs them, and the kernel's
    /// own refusal to create over a taken slot; see `xfrm::exec` for the race that
    /// remains. Interface indexes come from one link dump taken here.
    ///
    /// # Errors
    ///
    /// The first change whose request fails is reported with its `Display` text and
    /// the kernel's errno ([`KernelError::Refused`]), or why it was not sent (foreign
    /// object, missing link). Nothing is sent after the buffer that held it; changes
    /// of the same phase that followed it *in that buffer* may have been applied. That
    /// is accepted because apply is idempotent and convergent: the next reconcile
    /// repairs or finishes whatever a failed one leaves.
    pub async fn execute(&self, changes: &[Change]) -> Result<(), KernelError> {
        if changes.is_empty() {
            return Ok(());
        }
        let report = |done: usize| self.report_progress(done, changes.len());
        report(0);
        let mut xfrm_socket = self.xfrm_batch.lock().await;
        let mut ownership = xfrm::Ownership::load(&mut xfrm_socket, changes).await?;
        let mut indexes = links::Indexes::load(&self.route, changes).await?;
        let mut route_socket = self.route_batch.lock().await;
        let mut xfrm_batch = xfrm_socket.batch();
        let mut route_batch = route_socket.batch();
        let failed = |e: BatchError| batch_error(changes, e);

        let mut phase = None;
        for (i, change) in changes.iter().enumerate() {
            let this = phase_of(change);
            if phase != Some(this) {
                xfrm_batch.flush().await.map_err(failed)?;
                route_batch.flush().await.map_err(failed)?;
                phase = Some(this);
                report(i);
            } else if i % PROGRESS_EVERY == 0 {
                report(i);
            }
            tracing::debug!(%change, "kernel change");
            if !links::is_link_change(change) {
                match ownership.prepare(change, i) {
                    Ok(Some(request)) => xfrm_batch.push(request).await.map_err(failed)?,
                    Ok(None) => {}
                    Err(e) => {
                        xfrm_batch.flush().await.map_err(failed)?;
                        return Err(e);
                    }
                }
                continue;
            }
            match links::prepare(&self.route, change, &mut indexes).await {
                Ok(links::Step::Request(r)) => {
                    let mut message = netlink_packet_core::NetlinkMessage::from(r.message);
                    let request = batch::Request {
                        bytes: batch::encode(&mut message, r.flags),
                        tag: i,
                        tolerated: r.tolerated,
                    };
                    route_batch.push(request).await.map_err(failed)?;
                }
                Ok(links::Step::Alone) => {
                    route_batch.flush().await.map_err(failed)?;
                    if let Change::CreateLink(link) = change {
                        let op = change.to_string();
                        links::create_link(&self.route, link, &op, &mut indexes).await?;
                    }
                }
                Err(e) => {
                    route_batch.flush().await.map_err(failed)?;
                    return Err(e);
                }
            }
        }
        xfrm_batch.flush().await.map_err(failed)?;
        route_batch.flush().await.map_err(failed)?;
        report(changes.len());
        Ok(())
    }

    /// Sends [`Kernel::execute`]'s progress to `sink` from now on (`None`: nowhere).
    pub fn set_progress(&self, sink: Option<crate::progress::Sink>) {
        if let Ok(mut slot) = self.progress.lock() {
            *slot = sink;
        }
    }

    fn report_progress(&self, done: usize, total: usize) {
        let sink = self.progress.lock().ok().and_then(|s| s.clone());
        if let Some(sink) = sink {
            sink(&crate::progress::Progress {
                what: "kernel changes applied".into(),
                done: done as u64,
                total: total as u64,
            });
        }
    }

    /// The local interface holding `addr`, if any.
    pub async fn underlay_for(&self, addr: IpAddr) -> Result<Option<Underlay>, KernelError> {
        links::underlay_on(&mut *self.route_batch.lock().await, addr).await
    }

    /// Deletes what our VXLAN devices learned about these old remotes (see
    /// `links::forget_learned`); how many entries went.
    pub async fn forget_learned(
        &self,
        stale: &[(crate::state::IfName, std::net::IpAddr)],
    ) -> Result<usize, KernelError> {
        links::forget_learned(&self.route, stale).await
    }

    /// Fails as [`Kernel::execute`] would before its first change: a link to create
    /// where a foreign link has the name, or a foreign VXLAN device the VNI and port.
    pub async fn check_plan(&self, changes: &[Change]) -> Result<(), KernelError> {
        links::check_plan(&self.route, changes).await
    }

    /// Every address configured on a local interface (for "which node am I").
    pub async fn local_addresses(&self) -> Result<Vec<IpAddr>, KernelError> {
        links::local_addresses(&self.route).await
    }

    /// Fails with [`KernelError::NoEsp`] when this kernel cannot install an ESP
    /// AES-GCM SA. The probe runs in a throwaway network namespace of its own, so the
    /// node's namespace sees no write (a no-op apply stays a no-op for `ip xfrm monitor`).
    /// It runs once per address family and `Kernel`, and not at all for a family of
    /// which [`Kernel::dump`] found SAs of ours already installed.
    pub async fn check_esp(&self, family_of: std::net::IpAddr) -> Result<(), KernelError> {
        let v6 = family_of.is_ipv6();
        if self.esp_ok.lock().is_ok_and(|ok| ok.contains(&v6)) {
            return Ok(());
        }
        let recent_failure = self.esp_failed.lock().ok().and_then(|failed| {
            failed
                .get(&v6)
                .filter(|(at, _)| at.elapsed() < ESP_RECHECK)
                .map(|(_, detail)| detail.clone())
        });
        if let Some(detail) = recent_failure {
            return Err(KernelError::NoEsp { detail });
        }
        let result = self.probe_esp(family_of).await;
        match &result {
            Ok(()) => {
                if let Ok(mut ok) = self.esp_ok.lock() {
                    ok.insert(v6);
                }
            }
            Err(KernelError::NoEsp { detail }) => {
                if let Ok(mut failed) = self.esp_failed.lock() {
                    failed.insert(v6, (std::time::Instant::now(), detail.clone()));
                }
            }
            Err(_) => {}
        }
        result
    }

    async fn probe_esp(&self, family_of: std::net::IpAddr) -> Result<(), KernelError> {
        // A dedicated thread: unshare() moves the calling thread for good.
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let _ = tx.send(probe_esp_in_scratch_netns(family_of));
        });
        rx.await.unwrap_or_else(|_| {
            Err(KernelError::NoEsp {
                detail: "the ESP probe thread ended without an answer".into(),
            })
        })
    }
}

/// The start of a timing for a debug event, `None` when this module's debug events are
/// off: reading the clock is a system call inside UML (~16 µs), too dear for numbers
/// nobody reads.
fn debug_clock() -> Option<std::time::Instant> {
    tracing::enabled!(tracing::Level::DEBUG).then(std::time::Instant::now)
}

/// Microseconds since a [`debug_clock`] start (0 without one).
fn elapsed_us(start: Option<std::time::Instant>) -> u64 {
    start.map_or(0, |t| t.elapsed().as_micros() as u64)
}

/// Adds and deletes one ESP SA in a fresh network namespace owned by this thread.
fn probe_esp_in_scratch_netns(family_of: std::net::IpAddr) -> Result<(), KernelError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| KernelError::Netns {
        path: "(new scratch namespace)".into(),
        source: std::io::Error::from(e),
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(KernelError::Connect)?;
    rt.block_on(async {
        let (conn, xfrm, _) = xfrmnetlink::new_connection().map_err(KernelError::Connect)?;
        tokio::spawn(conn);
        let probe_addr = match family_of {
            std::net::IpAddr::V4(_) => std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            std::net::IpAddr::V6(_) => std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        };
        xfrm::check_esp(&xfrm, probe_addr).await
    })
}

/// Changes of one phase of a plan share buffers; a new phase starts after every request
/// of the previous one is acknowledged. The phases are the kinds of change, with policy
/// puts split by rank as the plan orders them (block catch-all, require-ESP catch-all,
/// per pair) and policy deletes into per-pair and catch-all.
fn phase_of(change: &Change) -> (u8, u8) {
    match change {
        Change::PutPolicy { policy, .. } => {
            let rank = match policy.action {
                PolicyAction::Block => 0,
                PolicyAction::Esp { src: None, .. } => 1,
                PolicyAction::Esp { .. } => 2,
            };
            (0, rank)
        }
        Change::DeletePolicy(id) => (1, u8::from(id.selector.src.prefix_len() == 0)),
        Change::AddSa(_) => (2, 0),
        Change::DeleteSa(_) => (3, 0),
        Change::CreateLink(_) => (4, 0),
        Change::DeleteLink(_) => (5, 0),
        Change::SetMtu { .. } => (6, 0),
        Change::SetMaster { .. } => (7, 0),
        Change::SetAlias { .. } => (8, 0),
        Change::SetUp { .. } => (9, 0),
        Change::AddAddress(_) => (10, 0),
        Change::DeleteAddress(_) => (11, 0),
        Change::AddFdb(_) => (12, 0),
        Change::DeleteFdb(_) => (13, 0),
    }
}

/// A batch failure as the error of the change it belongs to.
fn batch_error(changes: &[Change], e: BatchError) -> KernelError {
    let op = |tag: usize| {
        changes
            .get(tag)
            .map_or_else(|| format!("change #{tag}"), ToString::to_string)
    };
    match e {
        BatchError::Refused { tag, errno } => KernelError::Refused {
            operation: op(tag),
            source: std::io::Error::from_raw_os_error(errno),
        },
        BatchError::Send { tag, source } => KernelError::Netlink {
            operation: op(tag),
            message: format!("sending the batch failed: {source}"),
        },
        BatchError::Receive { tag, source } => KernelError::Netlink {
            operation: op(tag),
            message: format!(
                "reading the acknowledgements failed (changes from this one on may or may not have been applied): {source}"
            ),
        },
        BatchError::Timeout { tag, waited } => KernelError::Netlink {
            operation: op(tag),
            message: format!(
                "no acknowledgement within {} s (changes from this one on may or may not have been applied)",
                waited.as_secs()
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The SPIs held towards one address are found, and only those.
    #[test]
    fn spis_are_found_per_destination() {
        let a: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let b: std::net::IpAddr = "192.0.2.2".parse().unwrap();
        let v6: std::net::IpAddr = "2001:db8::1".parse().unwrap();
        let slots: BTreeSet<_> = [(a, 0x100), (a, u32::MAX), (b, 7), (v6, 9)].into();
        assert_eq!(
            spis_towards(&slots, a).collect::<Vec<_>>(),
            vec![0x100, u32::MAX]
        );
        assert_eq!(spis_towards(&slots, b).collect::<Vec<_>>(), vec![7]);
        let none: std::net::IpAddr = "192.0.2.3".parse().unwrap();
        assert_eq!(spis_towards(&slots, none).count(), 0);
    }
}
