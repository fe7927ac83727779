//! The agent-to-agent control plane: Noise-authenticated, encrypted, framed sessions
//! between nodes named in the spec, carrying versioned [`Message`]s.

pub mod message;

pub use message::{Message, PROTOCOL_VERSION};
