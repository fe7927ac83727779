//! The agent's local API: one JSON request per connection on a Unix socket (mode 0600,
//! root only: the peer's uid is checked too), answered by zero or more progress lines
//! (`{"progress": {...}}`) and one final JSON response line. `apply`, `delete`,
//! `status` and `rotate` use it. No key ever crosses it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::progress::Progress;

/// Requests and responses are small; anything bigger is refused (a spec is at most
/// [`crate::spec::MAX_SPEC_BYTES`], JSON-escaped at most ~6x for control characters).
pub const MAX_API_MESSAGE: usize = 8 << 20;
/// Local requests being read at once; more are answered "busy" at once. With
/// [`MAX_API_MESSAGE`], this bounds what clients can make the agent hold in memory.
pub const MAX_API_CLIENTS: usize = 16;
/// Local requests read and not answered yet (waiting for the agent, or running: a
/// `rotate` waits for its peers); more are answered "busy".
pub const MAX_API_QUEUED: usize = 64;
/// How long the CLI waits for an answer to `apply` and `status`.
pub const API_TIMEOUT: Duration = Duration::from_secs(120);
/// What the CLI waits beyond a rotation's own `--timeout` before giving up on the agent.
pub const ROTATE_MARGIN: Duration = Duration::from_secs(30);

impl Request {
    /// How long the client waits for the final answer.
    pub fn wait(&self) -> Duration {
        match self {
            Request::Rotate { timeout_secs, .. } => {
                Duration::from_secs(*timeout_secs).saturating_add(ROTATE_MARGIN)
            }
            _ => API_TIMEOUT,
        }
    }
}

/// One line the agent writes back: progress, or the final response.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum Line {
    Progress { progress: Progress },
    Final(Response),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Apply {
        spec: String,
        source: String,
        dry_run: bool,
        node: Option<String>,
    },
    /// `delete`: the spec's networks are removed and dropped from the agent's spec.
    Delete {
        spec: String,
        source: String,
        dry_run: bool,
        node: Option<String>,
    },
    Status,
    Rotate {
        network: Option<String>,
        peer: Option<String>,
        timeout_secs: u64,
        /// The CLI's `--node`: refused when not the agent's.
        #[serde(default)]
        node: Option<String>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    /// Exit code for the CLI: 0 done, 1 failed at run time, 2 invalid input.
    pub code: u8,
    /// What to print on stdout.
    pub output: String,
    /// What to print on stderr (one line), when the request failed.
    pub error: Option<String>,
}

impl Response {
    pub fn ok(output: String) -> Response {
        Response {
            code: 0,
            output,
            error: None,
        }
    }
    pub fn fail(code: u8, output: String, error: impl std::fmt::Display) -> Response {
        Response {
            code,
            output,
            error: Some(error.to_string()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent's answer was not understood: {0}")]
    BadResponse(String),
    #[error(
        "the agent stopped without answering: the request may have been carried out in part \
         or in full (`apply --dry-run` shows what is left to do)"
    )]
    NoAnswer,
    #[error(
        "the agent did not answer within {0:?}; it may still carry the request out when it gets \
         to it (`status` shows what it is doing)"
    )]
    Timeout(Duration),
    #[error("{}: another agent is running and listening there", .0.display())]
    InUse(PathBuf),
    #[error("{}: exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
}

/// Sends one request to the agent and waits for its answer (at most
/// [`Request::wait`]), handing progress lines to `on_progress` as they come. `Ok(None)`
/// when no agent listens on `socket`.
pub async fn call(
    socket: &Path,
    request: &Request,
    on_progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<Option<Response>, ApiError> {
    let io = |source| ApiError::Io {
        path: socket.to_owned(),
        source,
    };
    let stream = match UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(io(e)),
    };
    let exchange = async {
        let (read, mut write) = stream.into_split();
        let mut line =
            serde_json::to_vec(request).map_err(|e| ApiError::BadResponse(e.to_string()))?;
        line.push(b'\n');
        // An agent that answers without reading the request (busy) closes its end
        // while a large request is still being written: its answer is still there to
        // read, so a failed write is reported only when no answer follows.
        let sent = match write.write_all(&line).await {
            Ok(()) => write.shutdown().await,
            Err(e) => Err(e),
        };
        let mut reader = BufReader::new(read);
        loop {
            let mut line = Vec::new();
            (&mut reader)
                .take(MAX_API_MESSAGE as u64)
                .read_until(b'\n', &mut line)
                .await
                .map_err(io)?;
            if line.is_empty() {
                sent.map_err(io)?;
                return Err(ApiError::NoAnswer);
            }
            match serde_json::from_slice::<Line>(&line) {
                Ok(Line::Progress { progress }) => on_progress(&progress),
                Ok(Line::Final(response)) => return Ok(Some(response)),
                Err(e) => return Err(ApiError::BadResponse(e.to_string())),
            }
        }
    };
    let wait = request.wait();
    tokio::time::timeout(wait, exchange)
        .await
        .map_err(|_| ApiError::Timeout(wait))?
}

use tokio::io::AsyncReadExt as _;

/// Binds the API socket: parent directory created 0700, stale socket replaced, the
/// socket itself 0600.
pub fn bind(socket: &Path) -> Result<UnixListener, ApiError> {
    use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _};
    let io = |source| ApiError::Io {
        path: socket.to_owned(),
        source,
    };
    if let Some(dir) = socket.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
    }
    // Replace only a stale socket: never another file (a mistyped --socket must not
    // destroy it), never the socket of an agent that still runs (the CLI would lose it).
    match std::fs::symlink_metadata(socket) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Err(ApiError::InUse(socket.to_owned()));
            }
            std::fs::remove_file(socket).map_err(io)?;
        }
        Ok(_) => return Err(ApiError::NotASocket(socket.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(socket).map_err(io)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Reads one request from an accepted connection; refuses non-root peers.
pub async fn read_request(stream: &mut UnixStream) -> Result<Request, String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("cannot read peer credentials: {e}"))?;
    if cred.uid() != 0 {
        return Err(format!("refused: uid {} is not root", cred.uid()));
    }
    let mut buf = Vec::new();
    let mut limited = (&mut *stream).take(MAX_API_MESSAGE as u64 + 1);
    let read = tokio::time::timeout(Duration::from_secs(10), limited.read_to_end(&mut buf)).await;
    match read {
        Err(_) => return Err("request timed out".into()),
        Ok(Err(e)) => return Err(format!("cannot read request: {e}")),
        Ok(Ok(_)) => {}
    }
    if buf.len() > MAX_API_MESSAGE {
        return Err("request too large".into());
    }
    serde_json::from_slice(&buf).map_err(|e| format!("malformed request: {e}"))
}

/// Writes one progress line; false when the client has gone.
pub async fn write_progress(stream: &mut UnixStream, progress: Progress) -> bool {
    match serde_json::to_vec(&Line::Progress { progress }) {
        Ok(mut line) => {
            line.push(b'\n');
            stream.write_all(&line).await.is_ok()
        }
        Err(_) => true,
    }
}

pub async fn write_response(stream: &mut UnixStream, response: &Response) {
    if let Ok(mut line) = serde_json::to_vec(response) {
        line.push(b'\n');
        let _ = stream.write_all(&line).await;
        let _ = stream.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bind_replaces_only_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        // Not a socket: refused, and the file is untouched.
        let file = dir.path().join("node.key");
        std::fs::write(&file, b"precious").unwrap();
        assert!(matches!(bind(&file), Err(ApiError::NotASocket(_))));
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
        // A running agent's socket: refused, and it keeps answering.
        let socket = dir.path().join("agent.sock");
        let live = bind(&socket).unwrap();
        assert!(matches!(bind(&socket), Err(ApiError::InUse(_))));
        let (accepted, connected) = tokio::join!(live.accept(), UnixStream::connect(&socket));
        assert!(accepted.is_ok() && connected.is_ok());
        // The socket of an agent that is gone: replaced.
        drop(live);
        let again = bind(&socket).unwrap();
        let (accepted, connected) = tokio::join!(again.accept(), UnixStream::connect(&socket));
        assert!(accepted.is_ok() && connected.is_ok());
    }
}
