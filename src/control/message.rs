//! Control-plane messages between agents. They travel only inside an authenticated,
//! encrypted Noise session (see [`super::session`]); the codec here is the plaintext
//! layout, version 1:
//!
//! ```text
//! u8 version (=1) | u8 type | u64 sequence (strictly increasing per session, from 1) | body
//! ```
//! Bodies are fixed-size, big-endian; unknown versions or types, wrong lengths and
//! trailing bytes are rejected. Keys are [`SaKey`]s: never printed.

use crate::keys::SaKey;

pub const PROTOCOL_VERSION: u8 = 1;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// First message of each side on a new session. `boot_id` is random per agent
    /// start, so a peer can tell a restart (lost keys) from a reconnect.
    Hello { boot_id: u64 },
    /// Receiver -> sender: "send to me with this SA from now on". The receiver has
    /// already installed the inbound SA.
    KeyOffer {
        generation: u64,
        spi: u32,
        key: SaKey,
    },
    /// Sender -> receiver: the outbound SA of `generation` is installed and in use.
    KeyAck { generation: u64, spi: u32 },
    /// "Offer me a new key for the direction towards you" (rotation asked by the sender
    /// side, e.g. `ovl-controller rotate` on the other node).
    RekeyRequest,
    /// Liveness; answered by nothing.
    Keepalive,
}
