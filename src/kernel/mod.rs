//! The only module that talks to the kernel (netlink). Everything else is pure.
//!
//! - [`links`]: links, bridges, VXLAN devices, addresses and FDB entries (rtnetlink);
//! - [`xfrm`]: XFRM states and policies (xfrmnetlink / netlink-packet-xfrm).
//!
//! A [`Kernel`] works in the network namespace of the thread that opened it.

pub mod links;
pub mod monitor;
pub mod xfrm;

use std::net::IpAddr;

use crate::plan::Change;
use crate::state::{IfName, KernelState};

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
    #[error(
        "{operation}: link {link} already exists and is not owned by ovl-controller ({reason})"
    )]
    ForeignLink {
        operation: String,
        link: String,
        reason: String,
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
}

pub struct Kernel {
    pub(crate) route: rtnetlink::Handle,
    pub(crate) xfrm: xfrmnetlink::Handle,
    /// ESP support does not change while we run: probe once per address family.
    esp_ok: std::sync::Mutex<std::collections::BTreeSet<bool>>,
}

impl Kernel {
    /// Opens netlink connections in the current network namespace. Must be called inside
    /// a tokio runtime (the connections are spawned on it).
    pub fn connect() -> Result<Kernel, KernelError> {
        let (conn, route, _) = rtnetlink::new_connection().map_err(KernelError::Connect)?;
        tokio::spawn(conn);
        let (conn, xfrm, _) = xfrmnetlink::new_connection().map_err(KernelError::Connect)?;
        tokio::spawn(conn);
        Ok(Kernel { route, xfrm, esp_ok: Default::default() })
    }

    /// Everything the controller owns in this namespace.
    pub async fn dump(&self) -> Result<KernelState, KernelError> {
        let mut state = links::dump(&self.route).await?;
        let (policies, sas) = xfrm::dump(&self.xfrm).await?;
        state.policies = policies;
        state.sas = sas;
        Ok(state)
    }

    /// Runs the changes in the given order, stopping at the first failure. The plan's
    /// order is what keeps every intermediate state safe, so it is never reordered here.
    pub async fn execute(&self, changes: &[Change]) -> Result<(), KernelError> {
        for change in changes {
            tracing::debug!(%change, "kernel change");
            match change {
                Change::PutPolicy { .. }
                | Change::DeletePolicy(_)
                | Change::AddSa(_)
                | Change::DeleteSa(_) => xfrm::execute(&self.xfrm, change).await?,
                _ => links::execute(&self.route, change).await?,
            }
        }
        Ok(())
    }

    /// The local interface holding `addr`, if any.
    pub async fn underlay_for(&self, addr: IpAddr) -> Result<Option<Underlay>, KernelError> {
        links::underlay_for(&self.route, addr).await
    }

    /// Every address configured on a local interface (for "which node am I").
    pub async fn local_addresses(&self) -> Result<Vec<IpAddr>, KernelError> {
        links::local_addresses(&self.route).await
    }

    /// Fails with [`KernelError::NoEsp`] when this kernel cannot install an ESP
    /// AES-GCM SA. The probe runs in a throwaway network namespace of its own, so the
    /// node's namespace sees no write (a no-op apply stays a no-op for `ip xfrm monitor`).
    pub async fn check_esp(&self, family_of: std::net::IpAddr) -> Result<(), KernelError> {
        let v6 = family_of.is_ipv6();
        if self.esp_ok.lock().is_ok_and(|ok| ok.contains(&v6)) {
            return Ok(());
        }
        let result = self.probe_esp(family_of).await;
        if result.is_ok() {
            if let Ok(mut ok) = self.esp_ok.lock() {
                ok.insert(v6);
            }
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
