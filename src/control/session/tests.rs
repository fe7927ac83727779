//! Sessions over in-memory duplex streams (and one over loopback TCP), with a tap in the
//! middle where a test needs to see, alter, replay or reorder frames.
//!
//! tokio's `test-util` (time pausing) is not enabled in this crate, so timeouts are
//! exercised with short explicit bounds through `*_within`, plus one test of the real
//! [`HANDSHAKE_TIMEOUT`].

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
use tokio::sync::mpsc;

use super::*;
use crate::keys::SaKey;

const CLUSTER: &str = "demo";
/// Handshake bound for tests that expect a timeout; real handshakes take well under 1 ms.
const SHORT: Duration = Duration::from_millis(200);
/// Bound on tests that must not hang.
const NO_HANG: Duration = Duration::from_secs(3);

fn identity() -> Identity {
    Identity::generate().unwrap()
}

fn pair() -> (Identity, Identity) {
    (identity(), identity())
}

/// Runs `connect` and `accept` against each other over `client`/`server`.
async fn handshake<S>(client: S, server: S, a: &Identity, b: &Identity) -> (Session<S>, Session<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let a_public = a.public;
    let (initiator, responder) = tokio::join!(
        connect(client, a, &b.public, CLUSTER),
        accept(server, b, CLUSTER, |key| *key == a_public),
    );
    let (responder, peer) = responder.unwrap();
    assert_eq!(peer, a.public);
    let initiator = initiator.unwrap();
    assert_eq!(initiator.peer(), &b.public);
    assert_eq!(responder.peer(), &a.public);
    (initiator, responder)
}

fn all_messages() -> Vec<Message> {
    vec![
        Message::Hello {
            boot_id: 0x0123_4567_89ab_cdef,
        },
        Message::KeyOffer {
            generation: 42,
            spi: 0xc000_0001,
            key: SaKey::generate().unwrap(),
        },
        Message::KeyAck {
            generation: 42,
            spi: 0xc000_0001,
        },
        Message::RekeyRequest,
        Message::Keepalive,
        Message::DialMe,
    ]
}

async fn exchange_everything<S>(a: Session<S>, b: Session<S>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut a_rx, mut a_tx) = a.split();
    let (mut b_rx, mut b_tx) = b.split();
    for round in 0..3 {
        for msg in all_messages() {
            // Sent and received concurrently: a frame may not fit the stream's buffer.
            let (sent, got) = tokio::join!(a_tx.send(&msg), b_rx.recv());
            sent.unwrap();
            // SaKey compares its bytes: the key arrives byte-exactly.
            assert_eq!(got.unwrap(), msg, "round {round}");
            let (sent, got) = tokio::join!(b_tx.send(&msg), a_rx.recv());
            sent.unwrap();
            assert_eq!(got.unwrap(), msg, "round {round}");
        }
    }
    // Both directions at once, each direction driven by its own tasks (a reader
    // that stalls would block the other side's writer once buffers are full).
    let a_sender = tokio::spawn(async move {
        for boot_id in 0..100 {
            a_tx.send(&Message::Hello { boot_id }).await.unwrap();
        }
        a_tx
    });
    let a_receiver = tokio::spawn(async move {
        for _ in 0..100 {
            assert_eq!(a_rx.recv().await.unwrap(), Message::Keepalive);
        }
        a_rx
    });
    let b_sender = tokio::spawn(async move {
        for _ in 0..100 {
            b_tx.send(&Message::Keepalive).await.unwrap();
        }
        b_tx
    });
    for boot_id in 0..100 {
        assert_eq!(b_rx.recv().await.unwrap(), Message::Hello { boot_id });
    }
    let a_rx = a_receiver.await.unwrap();
    let _b_tx = b_sender.await.unwrap();
    // A closed peer is `Closed`, and stays so.
    drop(a_sender.await.unwrap());
    drop(a_rx);
    assert!(matches!(b_rx.recv().await, Err(SessionError::Closed)));
    assert!(matches!(b_rx.recv().await, Err(SessionError::Closed)));
}

/// A tiny duplex buffer, so frames arrive in pieces.
#[tokio::test]
async fn messages_flow_both_ways_over_duplex() {
    let (a, b) = pair();
    let (client, server) = tokio::io::duplex(64);
    let (a_session, b_session) = handshake(client, server, &a, &b).await;
    exchange_everything(a_session, b_session).await;
}

#[tokio::test]
async fn messages_flow_both_ways_over_tcp() {
    let (a, b) = pair();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client, server) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    let (a_session, b_session) = handshake(client.unwrap(), server.unwrap().0, &a, &b).await;
    exchange_everything(a_session, b_session).await;
}

/// Runs a handshake expected to fail on both sides; neither may hang.
async fn failed_handshake(
    a: &Identity,
    responder_key: &PublicKey,
    client_cluster: &str,
    b: &Identity,
    allowed: impl Fn(&PublicKey) -> bool,
) -> (SessionError, SessionError) {
    let (client, server) = tokio::io::duplex(4096);
    let both = async {
        tokio::join!(
            connect(client, a, responder_key, client_cluster),
            accept(server, b, CLUSTER, allowed),
        )
    };
    let (initiator, responder) = tokio::time::timeout(NO_HANG, both).await.unwrap();
    (initiator.unwrap_err(), responder.unwrap_err())
}

#[tokio::test]
async fn unknown_initiator_is_refused_before_any_answer() {
    let (a, b) = pair();
    let other = identity().public;
    let (initiator, responder) =
        failed_handshake(&a, &b.public, CLUSTER, &b, |key| *key == other).await;
    match responder {
        SessionError::UnknownPeer { public_key } => assert_eq!(public_key, a.public.to_base64()),
        e => panic!("{e:?}"),
    }
    // The responder wrote nothing: the initiator sees the connection close.
    assert!(matches!(initiator, SessionError::Closed), "{initiator:?}");
}

#[tokio::test]
async fn wrong_cluster_fails() {
    let (a, b) = pair();
    let (initiator, responder) = failed_handshake(&a, &b.public, "other", &b, |_| true).await;
    assert!(
        matches!(responder, SessionError::Handshake(_)),
        "{responder:?}"
    );
    assert!(matches!(initiator, SessionError::Closed), "{initiator:?}");
}

#[tokio::test]
async fn wrong_responder_key_fails() {
    let (a, b) = pair();
    let wrong = identity().public;
    let (initiator, responder) = failed_handshake(&a, &wrong, CLUSTER, &b, |_| true).await;
    assert!(
        matches!(responder, SessionError::Handshake(_)),
        "{responder:?}"
    );
    assert!(matches!(initiator, SessionError::Closed), "{initiator:?}");
}

/// A man in the middle between client and server. Frames from the client are handed to
/// the test (`next`), which decides what reaches the server (`forward`); bytes from the
/// server reach the client unchanged.
struct Tap {
    frames: mpsc::UnboundedReceiver<Vec<u8>>,
    to_server: tokio::io::WriteHalf<DuplexStream>,
}

impl Tap {
    /// Returns (client end, server end, tap).
    fn new() -> (DuplexStream, DuplexStream, Tap) {
        let (client, client_side) = tokio::io::duplex(4096);
        let (server_side, server) = tokio::io::duplex(4096);
        let (mut from_client, mut to_client) = tokio::io::split(client_side);
        let (mut from_server, to_server) = tokio::io::split(server_side);
        let (frames_tx, frames) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let mut header = [0u8; 2];
                if from_client.read_exact(&mut header).await.is_err() {
                    return;
                }
                let mut raw = header.to_vec();
                raw.resize(2 + usize::from(u16::from_be_bytes(header)), 0);
                if from_client.read_exact(&mut raw[2..]).await.is_err()
                    || frames_tx.send(raw).is_err()
                {
                    return;
                }
            }
        });
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
            // The server is gone: let the client see the end of the stream.
            let _ = to_client.shutdown().await;
        });
        (client, server, Tap { frames, to_server })
    }

    /// The next whole frame (header included) the client wrote.
    async fn next(&mut self) -> Vec<u8> {
        self.frames.recv().await.unwrap()
    }

    async fn forward(&mut self, bytes: &[u8]) {
        self.to_server.write_all(bytes).await.unwrap();
        self.to_server.flush().await.unwrap();
    }

    async fn pass(&mut self) {
        let frame = self.next().await;
        self.forward(&frame).await;
    }
}

/// A session through a tap: the client's writer, the tap, the server's reader.
async fn tapped() -> (
    SessionWriter<DuplexStream>,
    Tap,
    SessionReader<DuplexStream>,
) {
    let (a, b) = pair();
    let (client, server, mut tap) = Tap::new();
    let a_public = a.public;
    let (initiator, responder, ()) = tokio::join!(
        connect(client, &a, &b.public, CLUSTER),
        accept(server, &b, CLUSTER, |key| *key == a_public),
        tap.pass(),
    );
    let (_, writer) = initiator.unwrap().split();
    let (reader, _) = responder.unwrap().0.split();
    (writer, tap, reader)
}

#[tokio::test]
async fn tampered_frame_ends_the_session() {
    let (mut writer, mut tap, mut reader) = tapped().await;
    writer.send(&Message::Keepalive).await.unwrap();
    tap.pass().await;
    assert_eq!(reader.recv().await.unwrap(), Message::Keepalive);

    let offer = all_messages().swap_remove(1);
    writer.send(&offer).await.unwrap();
    let mut frame = tap.next().await;
    let last = frame.len() - 1;
    frame[last] ^= 0x01;
    tap.forward(&frame).await;
    assert!(matches!(reader.recv().await, Err(SessionError::Decrypt)));

    // Over for good, even if good frames follow.
    writer.send(&Message::Keepalive).await.unwrap();
    tap.pass().await;
    assert!(matches!(reader.recv().await, Err(SessionError::Closed)));
}

#[tokio::test]
async fn tampered_handshake_fails() {
    let (a, b) = pair();
    let (client, server, mut tap) = Tap::new();
    let tamper = async {
        let mut first = tap.next().await;
        first[40] ^= 0x80;
        tap.forward(&first).await;
    };
    let both = async {
        tokio::join!(
            connect(client, &a, &b.public, CLUSTER),
            accept(server, &b, CLUSTER, |_| true),
            tamper,
        )
    };
    let (initiator, responder, ()) = tokio::time::timeout(NO_HANG, both).await.unwrap();
    assert!(matches!(responder, Err(SessionError::Handshake(_))));
    assert!(matches!(initiator, Err(SessionError::Closed)));
}

#[tokio::test]
async fn replayed_frame_is_rejected() {
    let (mut writer, mut tap, mut reader) = tapped().await;
    writer.send(&Message::RekeyRequest).await.unwrap();
    let frame = tap.next().await;
    tap.forward(&frame).await;
    tap.forward(&frame).await;
    assert_eq!(reader.recv().await.unwrap(), Message::RekeyRequest);
    assert!(matches!(reader.recv().await, Err(SessionError::Decrypt)));
}

#[tokio::test]
async fn reordered_frames_are_rejected() {
    let (mut writer, mut tap, mut reader) = tapped().await;
    writer.send(&Message::Hello { boot_id: 1 }).await.unwrap();
    writer.send(&Message::Keepalive).await.unwrap();
    let first = tap.next().await;
    let second = tap.next().await;
    tap.forward(&second).await;
    tap.forward(&first).await;
    assert!(matches!(reader.recv().await, Err(SessionError::Decrypt)));
}

#[tokio::test]
async fn dropped_frame_is_detected() {
    let (mut writer, mut tap, mut reader) = tapped().await;
    writer.send(&Message::Hello { boot_id: 1 }).await.unwrap();
    writer.send(&Message::Keepalive).await.unwrap();
    let _lost = tap.next().await;
    tap.pass().await;
    assert!(matches!(reader.recv().await, Err(SessionError::Decrypt)));
}

/// Nonces already stop replays on the wire; the sequence number inside is checked too,
/// against a sender that numbers wrongly.
#[tokio::test]
async fn sequence_numbers_are_checked() {
    let (mut writer, mut tap, mut reader) = tapped().await;
    writer.send(&Message::Keepalive).await.unwrap();
    tap.pass().await;
    assert_eq!(reader.recv().await.unwrap(), Message::Keepalive);
    // Correctly encrypted (next nonce), but repeating sequence number 1.
    writer
        .send_with_wrong_seq(1, &Message::Keepalive)
        .await
        .unwrap();
    tap.pass().await;
    assert!(matches!(
        reader.recv().await,
        Err(SessionError::Sequence {
            expected: 2,
            got: 1
        })
    ));

    let (mut writer, mut tap, mut reader) = tapped().await;
    writer
        .send_with_wrong_seq(5, &Message::Keepalive)
        .await
        .unwrap();
    tap.pass().await;
    assert!(matches!(
        reader.recv().await,
        Err(SessionError::Sequence {
            expected: 1,
            got: 5
        })
    ));
}

#[tokio::test]
async fn oversize_frame_is_refused_from_its_header() {
    let (mut writer, mut tap, mut reader) = tapped().await;
    writer.send(&Message::Keepalive).await.unwrap();
    let _ = tap.next().await;
    // Only the header: if the reader waited for (or allocated) 65535 bytes it would hang.
    tap.forward(&[0xff, 0xff]).await;
    let result = tokio::time::timeout(NO_HANG, reader.recv()).await.unwrap();
    assert!(
        matches!(
            result,
            Err(SessionError::FrameTooLarge {
                len: 65535,
                max: MAX_TRANSPORT_FRAME
            })
        ),
        "{result:?}"
    );

    // Just over the cap, too.
    let (mut writer, mut tap, mut reader) = tapped().await;
    writer.send(&Message::Keepalive).await.unwrap();
    let _ = tap.next().await;
    let len = u16::try_from(MAX_TRANSPORT_FRAME + 1).unwrap();
    tap.forward(&len.to_be_bytes()).await;
    assert!(matches!(
        reader.recv().await,
        Err(SessionError::FrameTooLarge { .. })
    ));
}

#[tokio::test]
async fn oversize_handshake_frame_is_refused_from_its_header() {
    let b = identity();
    let (mut client, server) = tokio::io::duplex(64);
    client.write_all(&[0x01, 0x01]).await.unwrap();
    let result = accept_within(server, &b, CLUSTER, |_| true, NO_HANG).await;
    assert!(
        matches!(
            result,
            Err(SessionError::FrameTooLarge {
                len: 257,
                max: MAX_HANDSHAKE_FRAME
            })
        ),
        "{result:?}"
    );
    drop(client);
}

/// `recv` under a timeout that fires mid-frame loses nothing.
#[tokio::test]
async fn recv_is_cancel_safe() {
    let (mut writer, mut tap, mut reader) = tapped().await;
    let offer = all_messages().swap_remove(1);
    writer.send(&offer).await.unwrap();
    let frame = tap.next().await;
    tap.forward(&frame[..1]).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(20), reader.recv())
            .await
            .is_err()
    );
    tap.forward(&frame[1..10]).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(20), reader.recv())
            .await
            .is_err()
    );
    tap.forward(&frame[10..]).await;
    assert_eq!(reader.recv().await.unwrap(), offer);
}

#[tokio::test]
async fn truncated_handshake_ends_at_once() {
    let b = &fuzz().responder;
    // A genuine first message, cut short, then the client closes.
    let first = framed(&fuzz().first);
    for cut in [1, 2, 50, first.len() - 1] {
        let (mut client, server) = tokio::io::duplex(4096);
        client.write_all(&first[..cut]).await.unwrap();
        drop(client);
        let started = Instant::now();
        let result = accept(server, b, CLUSTER, |_| true).await;
        assert!(
            matches!(result, Err(SessionError::Io { .. })),
            "{cut}: {result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    // Closed before a single byte.
    let (client, server) = tokio::io::duplex(64);
    drop(client);
    let result = accept(server, b, CLUSTER, |_| true).await;
    assert!(matches!(result, Err(SessionError::Closed)), "{result:?}");
}

#[tokio::test]
async fn silent_client_times_out() {
    let b = identity();
    let (_client, server) = tokio::io::duplex(4096);
    let started = Instant::now();
    let result = accept_within(server, &b, CLUSTER, |_| true, SHORT).await;
    assert!(
        matches!(result, Err(SessionError::Timeout { after: SHORT })),
        "{result:?}"
    );
    assert!(started.elapsed() < SHORT + Duration::from_secs(1));

    // Part of a message, then silence (a slowloris).
    let first = framed(&fuzz().first);
    let (mut _client, server) = tokio::io::duplex(4096);
    _client.write_all(&first[..first.len() - 1]).await.unwrap();
    let result = accept_within(server, &b, CLUSTER, |_| true, SHORT).await;
    assert!(
        matches!(result, Err(SessionError::Timeout { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn silent_responder_times_out() {
    let (a, b) = pair();
    let (client, _server) = tokio::io::duplex(4096);
    let result = connect_within(client, &a, &b.public, CLUSTER, SHORT).await;
    assert!(
        matches!(result, Err(SessionError::Timeout { after: SHORT })),
        "{result:?}"
    );
}

/// The public `accept` is bounded by the real constant.
#[tokio::test]
async fn accept_is_bounded_by_handshake_timeout() {
    let b = identity();
    let (_client, server) = tokio::io::duplex(4096);
    let started = Instant::now();
    let result = accept(server, &b, CLUSTER, |_| true).await;
    assert!(matches!(
        result,
        Err(SessionError::Timeout {
            after: HANDSHAKE_TIMEOUT
        })
    ));
    let elapsed = started.elapsed();
    assert!(elapsed >= HANDSHAKE_TIMEOUT && elapsed < HANDSHAKE_TIMEOUT + Duration::from_secs(2));
}

#[test]
fn errors_never_show_key_material() {
    let a = identity();
    let private = *a.private.expose();
    let hex: String = private.iter().map(|b| format!("{b:02x}")).collect();
    let errors = [
        SessionError::UnknownPeer {
            public_key: a.public.to_base64(),
        },
        super::handshake(
            "reading the initiator's first message",
            &snow::Error::Decrypt,
        ),
        SessionError::Decrypt,
    ];
    for e in errors {
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains(&hex), "{shown}");
    }
}

// Fuzzing `accept`: whatever bytes an unauthenticated client sends, the responder
// returns an error (never a session, never a panic, never a hang).

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

struct Fuzz {
    responder: Identity,
    /// A genuine first message from an initiator the responder allows.
    first: Vec<u8>,
}

fn fuzz() -> &'static Fuzz {
    static FUZZ: OnceLock<Fuzz> = OnceLock::new();
    FUZZ.get_or_init(|| {
        let (initiator, responder) = pair();
        let prologue = prologue(CLUSTER);
        let mut noise = snow::Builder::new(NOISE_PARAMS.parse().unwrap())
            .local_private_key(initiator.private.expose())
            .unwrap()
            .remote_public_key(&responder.public.0)
            .unwrap()
            .prologue(&prologue)
            .unwrap()
            .build_initiator()
            .unwrap();
        let mut buf = [0u8; MAX_HANDSHAKE_FRAME];
        let n = noise.write_message(&[], &mut buf).unwrap();
        Fuzz {
            responder,
            first: buf[..n].to_vec(),
        }
    })
}

/// Feeds `bytes` to `accept` and closes the client side.
fn accept_bytes(rt: &tokio::runtime::Runtime, bytes: &[u8]) -> Result<(), SessionError> {
    rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 17);
        client.write_all(bytes).await.unwrap();
        drop(client);
        accept_within(server, &fuzz().responder, CLUSTER, |_| true, NO_HANG)
            .await
            .map(drop)
    })
}

/// A first message built by snow directly, carrying a payload we never send.
#[test]
fn first_message_with_a_payload_is_refused() {
    let (initiator, responder) = pair();
    let prologue = prologue(CLUSTER);
    let mut noise = snow::Builder::new(NOISE_PARAMS.parse().unwrap())
        .local_private_key(initiator.private.expose())
        .unwrap()
        .remote_public_key(&responder.public.0)
        .unwrap()
        .prologue(&prologue)
        .unwrap()
        .build_initiator()
        .unwrap();
    let mut buf = [0u8; MAX_HANDSHAKE_FRAME];
    let n = noise.write_message(b"hi", &mut buf).unwrap();
    let result = runtime().block_on(async {
        let (mut client, server) = tokio::io::duplex(4096);
        client.write_all(&framed(&buf[..n])).await.unwrap();
        accept_within(server, &responder, CLUSTER, |_| true, NO_HANG)
            .await
            .map(drop)
    });
    match result {
        Err(SessionError::Handshake(why)) => assert!(why.contains("payload"), "{why}"),
        other => panic!("{other:?}"),
    }
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = u16::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

#[test]
fn genuine_first_message_is_accepted_by_the_fuzz_harness() {
    // Sanity check of the harness: without mutation the handshake goes through (the
    // answer fails to send because the client is gone).
    let rt = runtime();
    let result = accept_bytes(&rt, &framed(&fuzz().first));
    assert!(matches!(result, Err(SessionError::Io { .. })), "{result:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn accept_refuses_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let rt = runtime();
        prop_assert!(accept_bytes(&rt, &bytes).is_err());
    }

    #[test]
    fn accept_refuses_arbitrary_frames(body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let rt = runtime();
        prop_assert!(accept_bytes(&rt, &framed(&body)).is_err());
    }

    /// A genuine first message with one byte changed, or cut, or extended.
    #[test]
    fn accept_refuses_mutated_first_messages(
        index in any::<prop::sample::Index>(),
        flip in 1u8..,
        cut in any::<prop::sample::Index>(),
        extra in proptest::collection::vec(any::<u8>(), 1..8),
    ) {
        let rt = runtime();
        let first = &fuzz().first;
        let mut flipped = first.clone();
        flipped[index.index(first.len())] ^= flip;
        prop_assert!(accept_bytes(&rt, &framed(&flipped)).is_err());
        let short = &first[..cut.index(first.len())];
        prop_assert!(matches!(
            accept_bytes(&rt, &framed(short)),
            Err(SessionError::Handshake(_))
        ));
        let mut long = first.clone();
        long.extend_from_slice(&extra);
        prop_assert!(matches!(
            accept_bytes(&rt, &framed(&long)),
            Err(SessionError::Handshake(_))
        ));
    }
}
