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

/// Why the state directory or its apply lock cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("{path}: not a directory (--state-dir)")]
    NotADirectory { path: PathBuf },
    #[error(
        "{path}: group or others may write to it (mode {mode:o}); chmod 700 it or choose another --state-dir"
    )]
    Unsafe { path: PathBuf, mode: u32 },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl StateDirError {
    /// A `--state-dir` that cannot be used as it is: a mistake in the invocation.
    pub fn is_input_error(&self) -> bool {
        matches!(
            self,
            StateDirError::NotADirectory { .. } | StateDirError::Unsafe { .. }
        )
    }
}

/// Makes the state directory (`--state-dir`) ready: missing directories are created
/// for root only (0700). An existing one is left as it is (a mistaken `--state-dir
/// /var/lib` must not change /var/lib), but refused when it is not a directory or when
/// group or others may write to it (they could put their own files in our place).
pub fn prepare_state_dir(dir: &std::path::Path) -> Result<(), StateDirError> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let not_a_directory = || StateDirError::NotADirectory {
        path: dir.to_owned(),
    };
    // A part of the path that is a file (ENOTDIR) is the same mistake as the path
    // itself being one.
    let io = |source: std::io::Error| {
        if source.raw_os_error() == Some(libc::ENOTDIR) {
            not_a_directory()
        } else {
            StateDirError::Io {
                path: dir.to_owned(),
                source,
            }
        }
    };
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => return Err(not_a_directory()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?,
        Err(e) => return Err(io(e)),
    }
    let meta = std::fs::metadata(dir).map_err(io)?;
    let mode = meta.permissions().mode() & 0o777;
    if !meta.is_dir() {
        return Err(not_a_directory());
    }
    if mode & 0o022 != 0 {
        return Err(StateDirError::Unsafe {
            path: dir.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Opens `STATE_DIR/apply.lock` (made ready by [`prepare_state_dir`]): the lock that the
/// agent holds for its whole run and a run of `apply` or `delete` without an agent holds
/// for its plan. Never follows a link there (the directory is ours, but a link planted
/// in it must not make us create or open a file elsewhere).
pub fn open_apply_lock(state_dir: &std::path::Path) -> Result<std::fs::File, StateDirError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    prepare_state_dir(state_dir)?;
    let path = state_dir.join("apply.lock");
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|source| StateDirError::Io { path, source })
}

/// Takes the node's apply lock ([`open_apply_lock`]), polling every 200 ms while someone
/// else holds it. At each busy poll `while_busy` runs (told whether it is the first, to
/// say once that we wait) and may end the wait with an outcome of its own, returned as
/// `Err`.
pub async fn wait_for_apply_lock<T>(
    state_dir: &std::path::Path,
    mut while_busy: impl AsyncFnMut(bool) -> Option<T>,
) -> Result<Result<nix::fcntl::Flock<std::fs::File>, T>, StateDirError> {
    use nix::fcntl::{Flock, FlockArg};
    let mut file = open_apply_lock(state_dir)?;
    let mut first = true;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(Ok(lock)),
            Err((back, nix::errno::Errno::EWOULDBLOCK)) => {
                if let Some(outcome) = while_busy(first).await {
                    return Ok(Err(outcome));
                }
                first = false;
                file = back;
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err((_, e)) => {
                return Err(StateDirError::Io {
                    path: state_dir.join("apply.lock"),
                    source: e.into(),
                });
            }
        }
    }
}

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
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

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

    fn mode(p: &std::path::Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// Missing directories are made for root only; an existing directory is never
    /// changed, and refused when others may write to it; a file is refused.
    #[test]
    fn the_state_dir_is_made_private_and_never_changed() {
        let root = tempfile::tempdir().unwrap();
        let fresh = root.path().join("a/b");
        prepare_state_dir(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        assert_eq!(mode(&root.path().join("a")), 0o700);

        let shared = root.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_state_dir(&shared).unwrap();
        assert_eq!(
            mode(&shared),
            0o755,
            "an existing directory is left as it is"
        );

        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = prepare_state_dir(&shared).unwrap_err();
        assert!(err.to_string().contains("mode 777"), "{err}");
        assert_eq!(mode(&shared), 0o777);

        let file = root.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let err = prepare_state_dir(&file).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        assert!(err.is_input_error());
        let under_a_file = prepare_state_dir(&file.join("sub")).unwrap_err();
        assert!(under_a_file.is_input_error(), "{under_a_file}");
    }
}
