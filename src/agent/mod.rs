//! The per-node daemon. It owns the node's overlay: it reconciles on start, on spec
//! changes (`apply` through the local socket), on control-plane events (keys agreed or
//! rotated), on kernel events (drift is repaired without waiting) and periodically.
//!
//! One task owns all state (spec, key schedule, kernel handle) and handles [`Event`]s
//! one at a time; sockets run in their own tasks and talk to it through channels. The
//! key schedule ([`crate::keys::schedule`]) is pure; this module performs its actions
//! in order: a `KernelChanged` is a reconcile pass, and the messages after it are sent
//! only if that pass succeeded (an offer is never sent for an SA the kernel lacks).

pub mod api;
mod core;
pub mod metrics;
mod net;

use std::path::PathBuf;

use tokio::sync::{mpsc, oneshot};

use crate::control::Message;
use crate::spec::{NodeName, Spec};

pub use self::core::AgentError;

pub struct AgentConfig {
    pub spec: Spec,
    pub spec_source: String,
    pub node: Option<String>,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub key: PathBuf,
    /// Where to serve Prometheus metrics; `None` = off.
    pub metrics: Option<std::net::SocketAddr>,
}

/// Everything the agent's state-owning task reacts to.
pub(crate) enum Event {
    Connected {
        peer: NodeName,
        session: u64,
        outbox: mpsc::Sender<Message>,
    },
    Disconnected {
        peer: NodeName,
        session: u64,
    },
    Received {
        peer: NodeName,
        session: u64,
        msg: Message,
    },
    /// `peer` opened a session only to say it is up ([`Message::DialMe`]).
    DialMe {
        peer: NodeName,
    },
    Api {
        request: api::Request,
        reply: oneshot::Sender<api::Response>,
        /// Progress lines for the client while the request runs.
        progress: mpsc::UnboundedSender<crate::progress::Progress>,
    },
    Metrics {
        reply: oneshot::Sender<String>,
    },
}

/// Runs the agent until SIGTERM or SIGINT. The kernel state is left in place when it
/// stops: the data path does not depend on the agent.
pub async fn run(config: AgentConfig) -> Result<(), AgentError> {
    raise_open_file_limit();
    self::core::Agent::start(config).await?.run().await
}

/// Lifts the soft limit on open files to the hard one: the agent holds a socket per
/// peer, and the usual soft limit (1024, also systemd's default for services) is below
/// what a cluster of a thousand nodes needs.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-file limit"),
            Err(e) => {
                tracing::warn!(error = %e, limit = soft, "could not raise the open-file limit")
            }
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not read the open-file limit"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        // One below: other tests run beside this one and need their descriptors.
        let low = hard - 1;
        setrlimit(Resource::RLIMIT_NOFILE, low, hard).unwrap();
        super::raise_open_file_limit();
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (hard, hard));
    }
}
