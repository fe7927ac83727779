//! The agent-to-agent control plane: Noise-authenticated, encrypted, framed sessions
//! between nodes named in the spec, carrying versioned [`Message`]s.
//!
//! ```text
//! TCP stream --connect/accept (Noise IK, HANDSHAKE_TIMEOUT)--> Session --split-->
//!   SessionReader::recv  -> frame -> decrypt (nonce n) -> decode -> check seq -> Message
//!   SessionWriter::send  <- frame <- encrypt (nonce n) <- encode (seq n+1)   <- Message
//! ```

mod frame;
pub mod message;
pub mod session;

pub use message::{DecodeError, Message, PROTOCOL_VERSION, decode, encode};
pub use session::{
    HANDSHAKE_TIMEOUT, IDLE_TIMEOUT, KEEPALIVE_INTERVAL, MAX_PLAINTEXT, Session, SessionError,
    SessionReader, SessionWriter, accept, connect,
};
