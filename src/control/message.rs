//! Control-plane messages between agents. They travel only inside an authenticated,
//! encrypted Noise session (see [`super::session`]); the codec here is the plaintext
//! layout, version 1:
//!
//! ```text
//! u8 version (=1) | u8 type | u64 sequence (strictly increasing per session, from 1) | body
//! ```
//! Bodies are fixed-size, big-endian; unknown versions or types, wrong lengths and
//! trailing bytes are rejected. Keys are [`SaKey`]s: never printed.
//!
//! | type | message        | body                                              |
//! |------|----------------|---------------------------------------------------|
//! | 1    | `Hello`        | u64 boot_id                                       |
//! | 2    | `KeyOffer`     | u64 generation, u32 spi, 36 bytes key and salt    |
//! | 3    | `KeyAck`       | u64 generation, u32 spi                           |
//! | 4    | `RekeyRequest` | empty                                             |
//! | 5    | `Keepalive`    | empty                                             |
//! | 6    | `DialMe`       | empty                                             |
//!
//! ```
//! use ovl::control::message::{decode, encode, Message};
//! let bytes = encode(7, &Message::KeyAck { generation: 3, spi: 0x1234 });
//! assert_eq!(bytes.len(), 1 + 1 + 8 + 8 + 4);
//! assert_eq!(decode(&bytes), Ok((7, Message::KeyAck { generation: 3, spi: 0x1234 })));
//! ```

use zeroize::Zeroize as _;

use crate::keys::{SA_KEY_LEN, SaKey};

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
    /// The only message of a session that the node whose name sorts later opens to its
    /// dialer: "I am up, dial me now". Sent when an agent starts (or a peer joins the
    /// spec, or its address or key changes), so that a dialer that backed off a
    /// long-silent peer reaches it at once.
    DialMe,
}

/// Bytes before the body: version, type, sequence number.
pub const HEADER_LEN: usize = 1 + 1 + 8;

/// Type codes on the wire. Never reuse a retired code.
const TYPE_HELLO: u8 = 1;
const TYPE_KEY_OFFER: u8 = 2;
const TYPE_KEY_ACK: u8 = 3;
const TYPE_REKEY_REQUEST: u8 = 4;
const TYPE_KEEPALIVE: u8 = 5;
const TYPE_DIAL_ME: u8 = 6;

/// Why bytes are not a valid message. Carries only lengths and codes, never body bytes
/// (a body may hold key material).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("control message too short: {len} bytes, the header alone is {HEADER_LEN}")]
    TooShort { len: usize },
    #[error("control message of protocol version {version}, this agent speaks {PROTOCOL_VERSION}")]
    UnknownVersion { version: u8 },
    #[error("control message of unknown type {kind}")]
    UnknownType { kind: u8 },
    #[error("{kind} control message with a {got}-byte body, expected exactly {expected}")]
    WrongLength {
        kind: &'static str,
        expected: usize,
        got: usize,
    },
}

impl Message {
    fn type_code(&self) -> u8 {
        match self {
            Message::Hello { .. } => TYPE_HELLO,
            Message::KeyOffer { .. } => TYPE_KEY_OFFER,
            Message::KeyAck { .. } => TYPE_KEY_ACK,
            Message::RekeyRequest => TYPE_REKEY_REQUEST,
            Message::Keepalive => TYPE_KEEPALIVE,
            Message::DialMe => TYPE_DIAL_ME,
        }
    }
}

/// Body length and name of a type code, `None` for unknown codes.
fn body_layout(kind: u8) -> Option<(usize, &'static str)> {
    match kind {
        TYPE_HELLO => Some((8, "Hello")),
        TYPE_KEY_OFFER => Some((8 + 4 + SA_KEY_LEN, "KeyOffer")),
        TYPE_KEY_ACK => Some((8 + 4, "KeyAck")),
        TYPE_REKEY_REQUEST => Some((0, "RekeyRequest")),
        TYPE_KEEPALIVE => Some((0, "Keepalive")),
        TYPE_DIAL_ME => Some((0, "DialMe")),
        _ => None,
    }
}

/// The plaintext of `msg` with sequence number `seq`. The result holds key material for
/// a `KeyOffer`: the caller zeroizes it once encrypted.
pub fn encode(seq: u64, msg: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 8 + 4 + SA_KEY_LEN);
    out.push(PROTOCOL_VERSION);
    out.push(msg.type_code());
    out.extend_from_slice(&seq.to_be_bytes());
    match msg {
        Message::Hello { boot_id } => out.extend_from_slice(&boot_id.to_be_bytes()),
        Message::KeyOffer {
            generation,
            spi,
            key,
        } => {
            out.extend_from_slice(&generation.to_be_bytes());
            out.extend_from_slice(&spi.to_be_bytes());
            // Capacity was reserved up front, so this never reallocates and leaves no
            // stray copy of the key in a freed buffer.
            out.extend_from_slice(key.expose());
        }
        Message::KeyAck { generation, spi } => {
            out.extend_from_slice(&generation.to_be_bytes());
            out.extend_from_slice(&spi.to_be_bytes());
        }
        Message::RekeyRequest | Message::Keepalive | Message::DialMe => {}
    }
    out
}

/// Parses one plaintext message: `(sequence number, message)`.
pub fn decode(bytes: &[u8]) -> Result<(u64, Message), DecodeError> {
    let Some((header, body)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(DecodeError::TooShort { len: bytes.len() });
    };
    let [version, kind, seq @ ..] = *header;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnknownVersion { version });
    }
    let seq = u64::from_be_bytes(seq);
    let (expected, name) = body_layout(kind).ok_or(DecodeError::UnknownType { kind })?;
    if body.len() != expected {
        return Err(DecodeError::WrongLength {
            kind: name,
            expected,
            got: body.len(),
        });
    }
    let mut reader = Body(body);
    let msg = match kind {
        TYPE_HELLO => Message::Hello {
            boot_id: reader.u64(),
        },
        TYPE_KEY_OFFER => {
            let generation = reader.u64();
            let spi = reader.u32();
            let mut key = reader.array::<SA_KEY_LEN>();
            let secret = SaKey::from_bytes(key);
            key.zeroize();
            Message::KeyOffer {
                generation,
                spi,
                key: secret,
            }
        }
        TYPE_KEY_ACK => Message::KeyAck {
            generation: reader.u64(),
            spi: reader.u32(),
        },
        TYPE_REKEY_REQUEST => Message::RekeyRequest,
        TYPE_KEEPALIVE => Message::Keepalive,
        TYPE_DIAL_ME => Message::DialMe,
        _ => return Err(DecodeError::UnknownType { kind }),
    };
    Ok((seq, msg))
}

/// A cursor over a body whose length was already checked against its type's layout, so
/// reads cannot run past the end.
struct Body<'a>(&'a [u8]);

impl Body<'_> {
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let (head, rest) = self.0.split_at(N.min(self.0.len()));
        out[..head.len()].copy_from_slice(head);
        self.0 = rest;
        out
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.array())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.array())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn key(seed: u8) -> SaKey {
        let mut bytes = [0u8; SA_KEY_LEN];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = seed.wrapping_add(i as u8).wrapping_mul(37);
        }
        SaKey::from_bytes(bytes)
    }

    #[test]
    fn wire_layout_is_pinned() {
        let bytes = encode(
            0x0102_0304_0506_0708,
            &Message::KeyOffer {
                generation: 9,
                spi: 0xc0de_0001,
                key: key(1),
            },
        );
        let mut expected = vec![1, 2, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 9];
        expected.extend_from_slice(&[0xc0, 0xde, 0, 1]);
        expected.extend_from_slice(key(1).expose());
        assert_eq!(bytes, expected);
        assert_eq!(
            encode(1, &Message::Keepalive),
            [1, 5, 0, 0, 0, 0, 0, 0, 0, 1]
        );
        assert_eq!(
            encode(2, &Message::Hello { boot_id: 3 }),
            [1, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3]
        );
    }

    #[test]
    fn every_message_round_trips() {
        let messages = [
            Message::Hello { boot_id: u64::MAX },
            Message::KeyOffer {
                generation: 1,
                spi: 0x100,
                key: SaKey::generate().unwrap(),
            },
            Message::KeyAck {
                generation: 2,
                spi: 0x200,
            },
            Message::RekeyRequest,
            Message::Keepalive,
            Message::DialMe,
        ];
        for (seq, msg) in (1..).zip(messages) {
            assert_eq!(decode(&encode(seq, &msg)), Ok((seq, msg)));
        }
    }

    #[test]
    fn malformed_messages_are_refused() {
        let good = encode(
            1,
            &Message::KeyAck {
                generation: 1,
                spi: 2,
            },
        );
        assert_eq!(decode(&[]), Err(DecodeError::TooShort { len: 0 }));
        assert_eq!(decode(&good[..9]), Err(DecodeError::TooShort { len: 9 }));

        let mut version = good.clone();
        version[0] = 2;
        assert_eq!(
            decode(&version),
            Err(DecodeError::UnknownVersion { version: 2 })
        );

        for kind in [0u8, 7, 255] {
            let mut unknown = good.clone();
            unknown[1] = kind;
            assert_eq!(decode(&unknown), Err(DecodeError::UnknownType { kind }));
        }

        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(
            decode(&trailing),
            Err(DecodeError::WrongLength {
                kind: "KeyAck",
                expected: 12,
                got: 13
            })
        );
        assert_eq!(
            decode(&good[..good.len() - 1]),
            Err(DecodeError::WrongLength {
                kind: "KeyAck",
                expected: 12,
                got: 11
            })
        );
        let mut keepalive = encode(1, &Message::Keepalive);
        keepalive.push(0);
        assert!(matches!(
            decode(&keepalive),
            Err(DecodeError::WrongLength { expected: 0, .. })
        ));
    }

    #[test]
    fn key_offer_debug_and_errors_never_show_the_key() {
        let key = SaKey::generate().unwrap();
        let bytes = *key.expose();
        let msg = Message::KeyOffer {
            generation: 1,
            spi: 2,
            key,
        };
        let hex_lower: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let hex_upper = hex_lower.to_uppercase();
        let decimal = format!("{bytes:?}");
        let decimal_inner = decimal.trim_start_matches('[').trim_end_matches(']');
        let decimal_pretty = format!("{bytes:#?}");
        for shown in [format!("{msg:?}"), format!("{msg:#?}")] {
            assert!(shown.contains("<SECRET>"), "{shown}");
            for needle in [&*hex_lower, &*hex_upper, decimal_inner, &*decimal_pretty] {
                assert!(!shown.contains(needle), "{shown}");
            }
        }
        // A decode error on a KeyOffer body shows lengths, not bytes.
        let mut long = encode(1, &msg);
        long.push(0);
        let err = decode(&long).unwrap_err().to_string();
        assert!(
            !err.contains(&hex_lower) && !err.contains(decimal_inner),
            "{err}"
        );
    }

    fn any_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            any::<u64>().prop_map(|boot_id| Message::Hello { boot_id }),
            (any::<u64>(), any::<u32>(), any::<[u8; SA_KEY_LEN]>()).prop_map(
                |(generation, spi, key)| Message::KeyOffer {
                    generation,
                    spi,
                    key: SaKey::from_bytes(key),
                }
            ),
            (any::<u64>(), any::<u32>())
                .prop_map(|(generation, spi)| Message::KeyAck { generation, spi }),
            Just(Message::RekeyRequest),
            Just(Message::Keepalive),
            Just(Message::DialMe),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn encode_then_decode_is_identity(seq in any::<u64>(), msg in any_message()) {
            prop_assert_eq!(decode(&encode(seq, &msg)), Ok((seq, msg)));
        }

        /// Arbitrary bytes never panic, and whatever decodes is canonical: it encodes
        /// back to exactly the same bytes.
        #[test]
        fn decode_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok((seq, msg)) = decode(&bytes) {
                prop_assert_eq!(encode(seq, &msg), bytes);
            }
        }

        /// Valid headers with arbitrary type and body, to get past the version check.
        #[test]
        fn decode_arbitrary_bodies(
            kind in 0u8..8,
            seq in any::<u64>(),
            body in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut bytes = vec![PROTOCOL_VERSION, kind];
            bytes.extend_from_slice(&seq.to_be_bytes());
            bytes.extend_from_slice(&body);
            match decode(&bytes) {
                Ok((got_seq, msg)) => {
                    prop_assert_eq!(got_seq, seq);
                    prop_assert_eq!(encode(seq, &msg), bytes);
                }
                Err(DecodeError::UnknownType { kind: k }) => prop_assert!(k == 0 || k > 5),
                Err(DecodeError::WrongLength { got, .. }) => prop_assert_eq!(got, body.len()),
                Err(other) => prop_assert!(false, "unexpected {other:?}"),
            }
        }
    }
}
