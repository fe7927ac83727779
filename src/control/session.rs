//! Authenticated, encrypted control sessions between two agents: Noise IK
//! ([`NOISE_PARAMS`]) over any byte stream (TCP in the agent, an in-memory duplex in
//! tests), framed by [`super::frame`], carrying [`Message`]s.
//!
//! - The initiator knows the responder's static key from the spec; the responder learns
//!   the initiator's from the first handshake message and refuses it, before answering,
//!   unless the caller's `allowed` says it is a node of the spec.
//! - The prologue binds the protocol version and the cluster name, so agents of
//!   different clusters (or protocol versions) never complete a handshake.
//! - The transport uses explicit nonces (snow's stateless mode) so the two directions
//!   can be driven by different tasks ([`Session::split`]). TCP delivers in order, so
//!   the reader expects nonce 0, 1, 2, …: a replayed, reordered, dropped or altered
//!   frame fails authentication ([`SessionError::Decrypt`]) and ends the session. The
//!   sequence number inside each message is checked again ([`SessionError::Sequence`]).
//!
//! Liveness: an IK first message can be replayed by anyone who saw it, and the
//! responder answers it. Such a session is useless to the replayer (the transport keys
//! depend on the initiator's ephemeral private key), but an accepted session is only
//! proven live once its first message (the peer's `Hello`) decrypts: the agent should
//! not let a new session replace an established one with the same peer before that.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! use ovl::control::{accept, connect, Message};
//! use ovl::identity::Identity;
//!
//! let (a, b) = (Identity::generate().unwrap(), Identity::generate().unwrap());
//! let (client, server) = tokio::io::duplex(4096);
//! let a_public = a.public;
//! let (initiator, responder) = tokio::join!(
//!     connect(client, &a, &b.public, "demo"),
//!     accept(server, &b, "demo", |key| *key == a_public),
//! );
//! let (_a_reader, mut a_writer) = initiator.unwrap().split();
//! let (responder, peer) = responder.unwrap();
//! assert_eq!(peer, a.public);
//! let (mut b_reader, _b_writer) = responder.split();
//! a_writer.send(&Message::Hello { boot_id: 7 }).await.unwrap();
//! assert_eq!(b_reader.recv().await.unwrap(), Message::Hello { boot_id: 7 });
//! # });
//! ```

use std::sync::Arc;
use std::time::Duration;

use snow::StatelessTransportState;
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use zeroize::Zeroize as _;

use super::frame::{FrameReader, write_frame};
use super::message::{DecodeError, Message, decode, encode};
use crate::identity::{Identity, NOISE_PARAMS};
use crate::spec::PublicKey;

/// Bound on the whole handshake, from the first byte sent or awaited to the session
/// being ready. The handshake is one round trip carrying ~150 bytes; 5 s is generous
/// on any network a cluster runs on, yet frees a slot held by a silent or slow client
/// (the agent accepts from the whole underlay) quickly.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often an agent sends [`Message::Keepalive`] on an otherwise idle session, so
/// the peer can tell a dead session from a quiet one.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// How long an agent waits for any message before it ends a session (wrap
/// [`SessionReader::recv`] in `tokio::time::timeout`). Three keepalive intervals, so
/// one or two delayed keepalives do not drop a healthy session.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest plaintext of a transport message. The largest message, a `KeyOffer`, is 58
/// bytes; anything near this cap is not ours, and a small cap bounds what a peer can
/// make us buffer.
pub const MAX_PLAINTEXT: usize = 1024;

/// AES-GCM tag appended to every Noise message.
const TAG_LEN: usize = 16;

/// Largest transport frame accepted.
pub const MAX_TRANSPORT_FRAME: usize = MAX_PLAINTEXT + TAG_LEN;

/// Largest handshake frame accepted. IK messages with empty payloads are 96 bytes
/// (e, encrypted s, tag) and 48 bytes (e, tag).
pub const MAX_HANDSHAKE_FRAME: usize = 256;

/// Prologue prefix; the cluster name follows. Bumped with the protocol version.
const PROLOGUE_PREFIX: &[u8] = b"ovl-controller/1 cluster=";

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("control connection failed while {during}: {source}")]
    Io {
        during: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("control session timed out after {after:?}")]
    Timeout { after: Duration },
    /// The Noise handshake failed: wrong cluster, wrong keys, corrupted or foreign
    /// bytes. The text names the step and snow's error kind, never key material.
    #[error("control handshake failed: {0}")]
    Handshake(String),
    #[error(
        "refusing a control session from node key {public_key}: no node of the spec with that key shares an encrypted network with this one"
    )]
    UnknownPeer { public_key: String },
    #[error("control frame of {len} bytes is over the limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("control message failed authentication (altered, replayed or reordered)")]
    Decrypt,
    #[error("invalid control message: {0}")]
    Decode(#[from] DecodeError),
    #[error("control message out of sequence: expected {expected}, got {got}")]
    Sequence { expected: u64, got: u64 },
    #[error("control session closed")]
    Closed,
    #[error("control session used up its nonces; reconnect")]
    Exhausted,
}

/// An established session, before it is split into its two directions.
pub struct Session<S> {
    stream: S,
    noise: Arc<StatelessTransportState>,
    peer: PublicKey,
}

impl<S> std::fmt::Debug for Session<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// Initiates a session to the node whose static key is `peer`, within
/// [`HANDSHAKE_TIMEOUT`].
pub async fn connect<S>(
    stream: S,
    me: &Identity,
    peer: &PublicKey,
    cluster: &str,
) -> Result<Session<S>, SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    connect_within(stream, me, peer, cluster, HANDSHAKE_TIMEOUT).await
}

/// Answers a session initiated by a node whose static key `allowed` accepts, within
/// [`HANDSHAKE_TIMEOUT`]. Returns the session and the initiator's key.
pub async fn accept<S>(
    stream: S,
    me: &Identity,
    cluster: &str,
    allowed: impl Fn(&PublicKey) -> bool,
) -> Result<(Session<S>, PublicKey), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    accept_within(stream, me, cluster, allowed, HANDSHAKE_TIMEOUT).await
}

/// [`connect`] with an explicit handshake bound (tests use a short one).
pub(crate) async fn connect_within<S>(
    mut stream: S,
    me: &Identity,
    peer: &PublicKey,
    cluster: &str,
    timeout: Duration,
) -> Result<Session<S>, SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let prologue = prologue(cluster);
    let mut noise = snow::Builder::new(params()?)
        .local_private_key(me.private.expose())
        .and_then(|b| b.remote_public_key(&peer.0))
        .and_then(|b| b.prologue(&prologue))
        .and_then(|b| b.build_initiator())
        .map_err(|e| handshake("setting up the initiator", &e))?;
    let exchange = async {
        let mut buf = [0u8; MAX_HANDSHAKE_FRAME];
        let n = noise
            .write_message(&[], &mut buf)
            .map_err(|e| handshake("writing the first message", &e))?;
        write_frame(&mut stream, &buf[..n]).await?;
        let mut frames = FrameReader::new(MAX_HANDSHAKE_FRAME);
        let reply = frames.read(&mut stream).await?;
        let payload = noise
            .read_message(reply, &mut buf)
            .map_err(|e| handshake("reading the responder's answer", &e))?;
        if payload != 0 {
            return Err(SessionError::Handshake(
                "the responder's answer carries an unexpected payload".into(),
            ));
        }
        Ok(())
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| SessionError::Timeout { after: timeout })??;
    let noise = noise
        .into_stateless_transport_mode()
        .map_err(|e| handshake("finishing the handshake", &e))?;
    tracing::debug!(peer = %peer.to_base64(), "control session initiated");
    Ok(Session {
        stream,
        noise: Arc::new(noise),
        peer: *peer,
    })
}

/// [`accept`] with an explicit handshake bound (tests use a short one).
pub(crate) async fn accept_within<S>(
    mut stream: S,
    me: &Identity,
    cluster: &str,
    allowed: impl Fn(&PublicKey) -> bool,
    timeout: Duration,
) -> Result<(Session<S>, PublicKey), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let prologue = prologue(cluster);
    let mut noise = snow::Builder::new(params()?)
        .local_private_key(me.private.expose())
        .and_then(|b| b.prologue(&prologue))
        .and_then(|b| b.build_responder())
        .map_err(|e| handshake("setting up the responder", &e))?;
    let exchange = async {
        let mut frames = FrameReader::new(MAX_HANDSHAKE_FRAME);
        let first = frames.read(&mut stream).await?;
        let mut buf = [0u8; MAX_HANDSHAKE_FRAME];
        let payload = noise
            .read_message(first, &mut buf)
            .map_err(|e| handshake("reading the initiator's first message", &e))?;
        let peer = noise
            .get_remote_static()
            .and_then(|key| <[u8; 32]>::try_from(key).ok())
            .map(PublicKey)
            .ok_or_else(|| {
                SessionError::Handshake("the initiator's static key is missing".into())
            })?;
        // Refuse before answering: a stranger learns nothing, not even that we speak
        // this cluster's protocol.
        if !allowed(&peer) {
            return Err(SessionError::UnknownPeer {
                public_key: peer.to_base64(),
            });
        }
        if payload != 0 {
            return Err(SessionError::Handshake(
                "the initiator's first message carries an unexpected payload".into(),
            ));
        }
        let n = noise
            .write_message(&[], &mut buf)
            .map_err(|e| handshake("writing the answer", &e))?;
        write_frame(&mut stream, &buf[..n]).await?;
        Ok(peer)
    };
    let peer = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| SessionError::Timeout { after: timeout })??;
    let noise = noise
        .into_stateless_transport_mode()
        .map_err(|e| handshake("finishing the handshake", &e))?;
    tracing::debug!(peer = %peer.to_base64(), "control session accepted");
    Ok((
        Session {
            stream,
            noise: Arc::new(noise),
            peer,
        },
        peer,
    ))
}

fn params() -> Result<snow::params::NoiseParams, SessionError> {
    NOISE_PARAMS
        .parse()
        .map_err(|e: snow::Error| handshake("parsing the Noise parameters", &e))
}

pub(crate) fn prologue(cluster: &str) -> Vec<u8> {
    [PROLOGUE_PREFIX, cluster.as_bytes()].concat()
}

/// snow's errors are kinds (`Decrypt`, `Input`, …) and never carry key bytes.
fn handshake(step: &str, error: &snow::Error) -> SessionError {
    // snow's own words ("input error", "decrypt error") do not say what the peer did.
    let what = match error {
        snow::Error::Input => "it is not a handshake message of ours (wrong size)".to_owned(),
        snow::Error::Decrypt => {
            "it does not decrypt (another cluster name, or meant for another node's key)".to_owned()
        }
        other => other.to_string(),
    };
    SessionError::Handshake(format!("{step}: {what}"))
}

impl<S: AsyncRead + AsyncWrite> Session<S> {
    /// The other node's static key.
    pub fn peer(&self) -> &PublicKey {
        &self.peer
    }

    /// Separates the two directions, so one task can wait in [`SessionReader::recv`]
    /// while another sends.
    pub fn split(self) -> (SessionReader<S>, SessionWriter<S>) {
        let (read, write) = tokio::io::split(self.stream);
        let reader = SessionReader {
            stream: read,
            noise: Arc::clone(&self.noise),
            peer: self.peer,
            frames: FrameReader::new(MAX_TRANSPORT_FRAME),
            nonce: 0,
            last_seq: 0,
            ended: false,
        };
        let writer = SessionWriter {
            stream: write,
            noise: self.noise,
            peer: self.peer,
            next_seq: 1,
            ended: false,
        };
        (reader, writer)
    }
}

/// The receiving direction of a session.
pub struct SessionReader<S> {
    stream: ReadHalf<S>,
    noise: Arc<StatelessTransportState>,
    peer: PublicKey,
    frames: FrameReader,
    /// Nonce of the next frame; the peer's writer counts the same way.
    nonce: u64,
    /// Sequence number of the last message accepted, 0 before the first.
    last_seq: u64,
    /// Set by the first error: a session that failed once is over.
    ended: bool,
}

impl<S: AsyncRead> SessionReader<S> {
    pub fn peer(&self) -> &PublicKey {
        &self.peer
    }

    /// The next message. Any error ends the session: later calls return
    /// [`SessionError::Closed`].
    ///
    /// Cancel-safe: takes no timeout itself (wrap it in `tokio::time::timeout` with
    /// [`IDLE_TIMEOUT`]); a cancelled call loses no bytes, the next call resumes.
    pub async fn recv(&mut self) -> Result<Message, SessionError> {
        if self.ended {
            return Err(SessionError::Closed);
        }
        let result = self.recv_inner().await;
        if result.is_err() {
            self.ended = true;
        }
        result
    }

    async fn recv_inner(&mut self) -> Result<Message, SessionError> {
        let frame = self.frames.read(&mut self.stream).await?;
        let mut plain = [0u8; MAX_TRANSPORT_FRAME];
        let decrypted = self.noise.read_message(self.nonce, frame, &mut plain);
        let decoded = match decrypted {
            Ok(n) => decode(&plain[..n]),
            Err(_) => {
                plain.zeroize();
                return Err(SessionError::Decrypt);
            }
        };
        plain.zeroize();
        self.nonce = self.nonce.checked_add(1).ok_or(SessionError::Exhausted)?;
        let (seq, msg) = decoded?;
        let expected = self
            .last_seq
            .checked_add(1)
            .ok_or(SessionError::Exhausted)?;
        if seq != expected {
            return Err(SessionError::Sequence { expected, got: seq });
        }
        self.last_seq = seq;
        tracing::trace!(peer = %self.peer.to_base64(), seq, ?msg, "control message received");
        Ok(msg)
    }
}

/// The sending direction of a session.
pub struct SessionWriter<S> {
    stream: WriteHalf<S>,
    noise: Arc<StatelessTransportState>,
    peer: PublicKey,
    /// Sequence number of the next message; its nonce is one less.
    next_seq: u64,
    /// Set by an error or a cancelled send (which may leave half a frame behind).
    ended: bool,
}

impl<S: AsyncWrite> SessionWriter<S> {
    pub fn peer(&self) -> &PublicKey {
        &self.peer
    }

    /// Encrypts and sends `msg` with the next sequence number, and flushes. Not
    /// cancel-safe: a cancelled send ends the session (later calls return
    /// [`SessionError::Closed`]).
    pub async fn send(&mut self, msg: &Message) -> Result<(), SessionError> {
        let seq = self.next_seq;
        self.send_with_seq(seq, msg).await
    }

    async fn send_with_seq(&mut self, seq: u64, msg: &Message) -> Result<(), SessionError> {
        if self.ended {
            return Err(SessionError::Closed);
        }
        // Stays set if this future is dropped mid-write, or on any error below.
        self.ended = true;
        let nonce = self.next_seq - 1;
        let next_seq = self
            .next_seq
            .checked_add(1)
            .ok_or(SessionError::Exhausted)?;
        let mut plain = encode(seq, msg);
        if plain.len() > MAX_PLAINTEXT {
            plain.zeroize();
            return Err(SessionError::FrameTooLarge {
                len: plain.len(),
                max: MAX_PLAINTEXT,
            });
        }
        let mut sealed = vec![0u8; plain.len() + TAG_LEN];
        let written = self.noise.write_message(nonce, &plain, &mut sealed);
        plain.zeroize();
        // The buffer fits by construction, so snow's only failure left is the nonce
        // limit.
        let n = written.map_err(|_| SessionError::Exhausted)?;
        write_frame(&mut self.stream, &sealed[..n]).await?;
        self.next_seq = next_seq;
        self.ended = false;
        tracing::trace!(peer = %self.peer.to_base64(), seq, ?msg, "control message sent");
        Ok(())
    }

    /// Sends `msg` under an arbitrary sequence number (correctly encrypted), to test the
    /// receiver's sequence check.
    #[cfg(test)]
    pub(crate) async fn send_with_wrong_seq(
        &mut self,
        seq: u64,
        msg: &Message,
    ) -> Result<(), SessionError> {
        self.send_with_seq(seq, msg).await
    }
}

#[cfg(test)]
mod tests;
