//! The agent's local API: one JSON request and one JSON response per connection on a
//! Unix socket (mode 0600, root only: the peer's uid is checked too). `apply`, `status`
//! and `rotate` use it. No key ever crosses it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Requests and responses are small; anything bigger is refused (a spec is at most
/// [`crate::spec::MAX_SPEC_BYTES`], JSON-escaped at most ~6x for control characters).
pub const MAX_API_MESSAGE: usize = 8 << 20;
/// How long the CLI waits for an answer (a rotation of every pair may take a while).
pub const API_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Apply {
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
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
}

/// Sends one request to the agent. `Ok(None)` when no agent listens on `socket`.
pub async fn call(socket: &Path, request: &Request) -> Result<Option<Response>, ApiError> {
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
        write.write_all(&line).await.map_err(io)?;
        write.shutdown().await.map_err(io)?;
        let mut answer = Vec::new();
        let mut reader = BufReader::new(read).take(MAX_API_MESSAGE as u64);
        reader.read_until(b'\n', &mut answer).await.map_err(io)?;
        serde_json::from_slice::<Response>(&answer)
            .map(Some)
            .map_err(|e| ApiError::BadResponse(e.to_string()))
    };
    tokio::time::timeout(API_TIMEOUT, exchange)
        .await
        .map_err(|_| ApiError::Timeout(API_TIMEOUT))?
}

use tokio::io::AsyncReadExt as _;

/// Binds the API socket: parent directory created 0700, stale socket replaced, the
/// socket itself 0600.
pub fn bind(socket: &Path) -> Result<UnixListener, ApiError> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
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
    match std::fs::remove_file(socket) {
        Ok(()) => {}
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

pub async fn write_response(stream: &mut UnixStream, response: &Response) {
    if let Ok(mut line) = serde_json::to_vec(response) {
        line.push(b'\n');
        let _ = stream.write_all(&line).await;
        let _ = stream.shutdown().await;
    }
}
