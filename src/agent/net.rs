//! Control-plane connections: one TCP connection per pair of nodes, dialled by the node
//! whose name sorts first and accepted by the other; a Noise IK session on top. Each
//! session gets a reader task (messages -> the agent's event queue) and a writer task
//! (the agent's outbox -> the wire, with keepalives). The node whose name sorts later
//! never dials a session, but when it starts it tells each of its dialers "dial me now"
//! ([`Message::DialMe`] on a session of its own that ends right after), so a dialer may
//! back off a long-silent peer far without delaying it once it comes up.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, mpsc};

use super::Event;
use crate::control::{self, Message};
use crate::identity::Identity;
use crate::spec::{NodeName, PublicKey};

/// How long a dialer waits after a failed dial: from `min`, doubling, with ±25% jitter
/// so that a restarted cluster does not dial in lockstep, up to `expected_max` while
/// the peer is expected to answer soon and `idle_max` otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DialBackoff {
    pub min: Duration,
    /// The cap while a peer is expected to answer soon: within [`RECENTLY_CONNECTED`]
    /// of our last session with it (it is probably rebooting, and until we reconnect its
    /// traffic has no keys), or within [`STARTUP_GRACE`] of starting to dial it or of
    /// its "dial me" (a cluster coming up: its agents start within a minute or two of
    /// each other).
    pub expected_max: Duration,
    /// The cap for a peer that has not answered for long, or never (a node in the spec
    /// that is not deployed yet); such dials are also paced across peers ([`IdlePacer`]).
    /// A peer that comes up says so at once, so this only bounds how soon a healed
    /// partition is noticed.
    pub idle_max: Duration,
}

impl DialBackoff {
    pub const DEFAULT: DialBackoff = DialBackoff {
        min: Duration::from_millis(200),
        expected_max: Duration::from_secs(5),
        idle_max: Duration::from_secs(120),
    };

    /// The wait after one more failed dial: doubled, up to the cap that applies.
    pub fn next(&self, current: Duration, expected: bool) -> Duration {
        let cap = if expected {
            self.expected_max
        } else {
            self.idle_max
        };
        current.saturating_mul(2).max(self.min).min(cap)
    }
}

pub const RECENTLY_CONNECTED: Duration = Duration::from_secs(600);
pub const STARTUP_GRACE: Duration = Duration::from_secs(120);
/// A TCP connect that takes longer than this is abandoned (the peer is down).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Tries to deliver one "dial me" (waits of 1, 2, 4 s between them, jittered): a
/// transient failure (routes not up yet, the peer's handshake slots full during a mass
/// power-up) does not leave the peer at its long backoff.
const DIAL_ME_ATTEMPTS: u32 = 4;
/// "Dial me" sessions in flight at once, per agent.
pub const DIAL_ME_IN_FLIGHT: usize = 32;
/// Outgoing messages queued per session before the agent's sends start failing.
const OUTBOX_DEPTH: usize = 256;
/// Handshakes in progress at once on the listener (a slot is held until the session's
/// first message has decrypted): a flood of half-open connections cannot starve the
/// agent.
const MAX_PENDING_HANDSHAKES: usize = 64;
/// Of those, from one source address: one peer (or someone on its address) cannot take
/// the slots of the others. A peer needs two at most (its dialer and a "dial me").
const MAX_PENDING_PER_SOURCE: usize = 4;
/// Refused connections are logged one by one up to this many per [`REFUSAL_WINDOW`],
/// then counted and summed up: a flood of them cannot flood the log.
const REFUSALS_LOGGED_PER_WINDOW: u32 = 5;
const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

/// Who may connect: the spec's nodes by public key, each with its address (updated on
/// spec changes). A connection is accepted only from a node's own address and with
/// that node's key: anything else is refused before any cryptography (dialers bind
/// their node's address, and ESP between VTEPs allows no NAT anyway).
pub type Allowed = Arc<RwLock<BTreeMap<[u8; 32], (NodeName, IpAddr)>>>;

/// Whether some node of `allowed` has the address `ip`.
fn admits(allowed: &Allowed, ip: IpAddr) -> bool {
    allowed
        .read()
        .is_ok_and(|a| a.values().any(|(_, address)| *address == ip))
}

/// Counts handshakes in progress per source address; a [`SourceSlot`] gives its count
/// back when dropped.
#[derive(Default)]
struct PendingBySource(Mutex<HashMap<IpAddr, usize>>);

struct SourceSlot {
    pending: Arc<PendingBySource>,
    ip: IpAddr,
}

impl PendingBySource {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let mut counts = self.0.lock().ok()?;
        let count = counts.entry(ip).or_insert(0);
        if *count >= MAX_PENDING_PER_SOURCE {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            pending: self.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.pending.0.lock()
            && let Some(count) = counts.get_mut(&self.ip)
        {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// A connection's hold on the listener's handshake slots, given back when dropped.
pub(super) struct HandshakeSlot {
    // Dropped in this order: the address's count, then the global permit.
    _source: SourceSlot,
    _global: OwnedSemaphorePermit,
}

/// Logs refusals of one kind (control connections, control messages): the first
/// [`REFUSALS_LOGGED_PER_WINDOW`] of each [`REFUSAL_WINDOW`] one by one, the rest as one
/// count when the window closes, so that a flood cannot flood the log.
pub(super) struct RefusalLog {
    /// The message of each logged refusal, and of the count of the others.
    what: &'static str,
    more: &'static str,
    window_started: Option<std::time::Instant>,
    logged: u32,
    unlogged: u64,
}

impl RefusalLog {
    pub(super) fn new(what: &'static str, more: &'static str) -> RefusalLog {
        RefusalLog {
            what,
            more,
            window_started: None,
            logged: 0,
            unlogged: 0,
        }
    }

    pub(super) fn refused(
        &mut self,
        now: std::time::Instant,
        source: &dyn std::fmt::Display,
        reason: &dyn std::fmt::Display,
    ) {
        if self
            .window_started
            .is_none_or(|t| now.duration_since(t) >= REFUSAL_WINDOW)
        {
            self.close_window();
            self.window_started = Some(now);
        }
        if self.logged < REFUSALS_LOGGED_PER_WINDOW {
            self.logged += 1;
            tracing::warn!(remote = %source, %reason, "{}", self.what);
        } else {
            self.unlogged += 1;
        }
    }

    /// Sums up what was not logged one by one, once its window is over.
    fn close_window(&mut self) {
        if self.unlogged > 0 {
            tracing::warn!(
                count = self.unlogged,
                window_secs = REFUSAL_WINDOW.as_secs(),
                "{} (not logged one by one)",
                self.more
            );
        }
        self.logged = 0;
        self.unlogged = 0;
    }

    pub(super) fn tick(&mut self, now: std::time::Instant) {
        let over = self
            .window_started
            .is_some_and(|t| now.duration_since(t) >= REFUSAL_WINDOW);
        if over {
            self.close_window();
            self.window_started = None;
        }
    }
}

fn jitter(d: Duration) -> Duration {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 2];
    let r = ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_or(0, |_| u16::from_be_bytes(b));
    // 0.75 ..= 1.25 of d
    d.mul_f64(0.75 + f64::from(r) / f64::from(u16::MAX) / 2.0)
}

/// Accepts control connections and runs a session for each authenticated node.
pub fn spawn_listener(
    listener: TcpListener,
    identity: Arc<Identity>,
    cluster: String,
    allowed: Allowed,
    events: mpsc::UnboundedSender<Event>,
) -> tokio::task::JoinHandle<()> {
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    let by_source = Arc::new(PendingBySource::default());
    let refusals = Arc::new(Mutex::new(RefusalLog::new(
        "control connection refused",
        "more control connections refused",
    )));
    let refused = {
        let refusals = refusals.clone();
        move |remote: SocketAddr, reason: &dyn std::fmt::Display| {
            if let Ok(mut log) = refusals.lock() {
                log.refused(std::time::Instant::now(), &remote, reason);
            }
        }
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REFUSAL_WINDOW);
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tick.tick() => {
                    if let Ok(mut log) = refusals.lock() {
                        log.tick(std::time::Instant::now());
                    }
                    continue;
                }
            };
            let (stream, remote) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "control listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let ip = remote.ip().to_canonical();
            if !admits(&allowed, ip) {
                refused(
                    remote,
                    &"not the address of a node that shares an encrypted network with this one",
                );
                continue;
            }
            let Some(source) = by_source.take(ip) else {
                refused(remote, &"too many handshakes in progress from this address");
                continue;
            };
            let Ok(global) = pending.clone().try_acquire_owned() else {
                refused(remote, &"too many handshakes in progress");
                continue;
            };
            let slot = HandshakeSlot {
                _source: source,
                _global: global,
            };
            let (identity, cluster, allowed, events, refused) = (
                identity.clone(),
                cluster.clone(),
                allowed.clone(),
                events.clone(),
                refused.clone(),
            );
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                // Only a node's own key, from that node's address. A node's key from
                // another address is remembered, for a refusal that says so.
                let elsewhere: Mutex<Option<(NodeName, IpAddr)>> = Mutex::new(None);
                let check = |key: &PublicKey| {
                    let Ok(a) = allowed.read() else { return false };
                    match a.get(&key.0) {
                        Some((_, address)) if *address == ip => true,
                        Some((name, address)) => {
                            if let Ok(mut e) = elsewhere.lock() {
                                *e = Some((name.clone(), *address));
                            }
                            false
                        }
                        None => false,
                    }
                };
                let accepted = control::session::accept(stream, &identity, &cluster, check).await;
                match accepted {
                    Ok((session, key)) => {
                        let peer = allowed
                            .read()
                            .ok()
                            .and_then(|a| a.get(&key.0).map(|(n, _)| n.clone()));
                        match peer {
                            Some(peer) => {
                                tracing::info!(%peer, %remote, "control session accepted");
                                let role = Role::Responder {
                                    slot,
                                    refused: Box::new(refused),
                                    remote,
                                };
                                run_session(peer, session, events, role).await;
                            }
                            None => refused(remote, &"the peer left the spec during the handshake"),
                        }
                    }
                    Err(e) => match elsewhere.into_inner().ok().flatten() {
                        Some((name, address)) => refused(
                            remote,
                            &format!("it has the key of node {name}, whose address is {address}"),
                        ),
                        None => refused(remote, &e),
                    },
                }
            });
        }
    })
}

/// Spaces the dials of long-silent peers across all dialers of an agent, at most one
/// every `interval`: what absent peers cost then does not grow with their number (their
/// waits grow instead: with 1000 of them, each is dialed every ~8 minutes at 2 a
/// second). Dials of peers expected to answer soon are never paced.
pub struct IdlePacer {
    interval: Duration,
    next: std::sync::Mutex<tokio::time::Instant>,
}

impl IdlePacer {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(500);

    pub fn new(interval: Duration) -> IdlePacer {
        IdlePacer {
            interval,
            next: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// When a paced dial wanted at `earliest` may go: no sooner than `interval` after
    /// the one handed out before it.
    pub fn slot(&self, earliest: tokio::time::Instant) -> tokio::time::Instant {
        let Ok(mut next) = self.next.lock() else {
            return earliest;
        };
        let slot = earliest.max(*next);
        *next = slot + self.interval;
        slot
    }
}

/// Where and how to reach one peer over the control plane.
#[derive(Clone)]
pub struct PeerContact {
    pub peer: NodeName,
    pub address: SocketAddr,
    /// This node's own address, the source of every dial (peers admit a node only from
    /// its address).
    pub local: IpAddr,
    pub key: PublicKey,
    pub identity: Arc<Identity>,
    pub cluster: String,
}

impl PeerContact {
    /// TCP connect (bounded by [`CONNECT_TIMEOUT`]) and the Noise handshake as initiator.
    async fn open(&self) -> Result<control::session::Session<TcpStream>, String> {
        let socket = if self.address.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| e.to_string())?;
        // The port is chosen at connect (per destination), not reserved by the bind for
        // every destination at once: thousands of peers must not use up the port range.
        // Best effort: without it, the bind still works.
        let on: libc::c_int = 1;
        // SAFETY: a valid socket descriptor, and an int option value of the size given.
        let _ = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                std::ptr::from_ref(&on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        socket
            .bind(SocketAddr::new(self.local, 0))
            .map_err(|e| format!("binding {}: {e}", self.local))?;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(self.address))
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        control::session::connect(stream, &self.identity, &self.key, &self.cluster)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Keeps a session to a peer up: dial, run, and after any failure dial again with a
/// jittered exponential backoff (paced by `pacer` while the peer is not expected soon).
/// `wake` cuts a wait short (the peer said it is up).
pub fn spawn_dialer(
    contact: PeerContact,
    policy: DialBackoff,
    pacer: Arc<IdlePacer>,
    wake: Arc<Notify>,
    events: mpsc::UnboundedSender<Event>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (peer, address) = (&contact.peer, contact.address);
        let mut backoff = policy.min;
        // Since when the peer is expected to answer without a session behind it: when
        // we started dialing it, or when it last said it is up.
        let mut expected_since = tokio::time::Instant::now();
        let mut last_session: Option<tokio::time::Instant> = None;
        loop {
            let mut paced = false;
            match contact.open().await {
                Ok(session) => {
                    tracing::info!(%peer, %address, "control session established");
                    backoff = policy.min;
                    run_session(peer.clone(), session, events.clone(), Role::Initiator).await;
                    last_session = Some(tokio::time::Instant::now());
                    if events.is_closed() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!(%peer, %address, error = %e, "dial failed");
                    let expected = last_session.is_some_and(|t| t.elapsed() < RECENTLY_CONNECTED)
                        || expected_since.elapsed() < STARTUP_GRACE;
                    backoff = policy.next(backoff, expected);
                    paced = !expected;
                }
            }
            let mut next_dial = tokio::time::Instant::now() + jitter(backoff);
            if paced {
                next_dial = pacer.slot(next_dial);
            }
            tokio::select! {
                _ = tokio::time::sleep_until(next_dial) => {}
                _ = wake.notified() => {
                    // The agent logged it; the peer is expected now, so no pacing.
                    expected_since = tokio::time::Instant::now();
                    backoff = policy.min;
                }
            }
        }
    })
}

/// Tells a peer that dials us that we are up: one session carrying one
/// [`Message::DialMe`], tried [`DIAL_ME_ATTEMPTS`] times; `slots` bounds how many run at
/// once. If the peer is down for longer, it dials us itself when it starts.
pub fn spawn_dial_me(
    contact: PeerContact,
    slots: Arc<tokio::sync::Semaphore>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (peer, address) = (&contact.peer, contact.address);
        let mut wait = Duration::from_secs(1);
        for attempt in 1..=DIAL_ME_ATTEMPTS {
            let sent = {
                let Ok(_slot) = slots.acquire().await else {
                    return;
                };
                match contact.open().await {
                    Ok(session) => {
                        let (_reader, mut writer) = session.split();
                        writer
                            .send(&Message::DialMe)
                            .await
                            .map_err(|e| e.to_string())
                    }
                    Err(e) => Err(e),
                }
            };
            match sent {
                Ok(()) => {
                    tracing::debug!(%peer, %address, "told peer we are up");
                    return;
                }
                Err(e) => {
                    tracing::debug!(%peer, %address, attempt, error = %e, "could not tell peer we are up")
                }
            }
            if attempt < DIAL_ME_ATTEMPTS {
                tokio::time::sleep(jitter(wait)).await;
                wait *= 2;
            }
        }
    })
}

/// Logs a refused connection (through the listener's [`RefusalLog`]).
type RefusedFn = dyn Fn(SocketAddr, &dyn std::fmt::Display) + Send;

/// Which side of the Noise handshake this node played.
enum Role {
    Initiator,
    /// Holds its handshake slot until the initiator's first message has decrypted; a
    /// session dropped before that is logged as a refused connection (rate-limited).
    Responder {
        slot: HandshakeSlot,
        refused: Box<RefusedFn>,
        remote: SocketAddr,
    },
}

/// Aborts a task when dropped: a session's writer must not outlive its session, even
/// when the session's own task is aborted (its dialer restarted).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

static SESSION_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Runs one authenticated session until it ends: tells the agent it is connected (with
/// an outbox), forwards received messages, sends keepalives, and reports the end.
async fn run_session(
    peer: NodeName,
    session: control::session::Session<TcpStream>,
    events: mpsc::UnboundedSender<Event>,
    role: Role,
) {
    let id = SESSION_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (mut reader, mut writer) = session.split();
    // A responder's handshake can be completed by anyone replaying an initiator's first
    // message (Noise IK). Such a session cannot carry a valid transport message, so an
    // accepted session counts only once the initiator's first message has decrypted;
    // until then it must not displace a live session with the same peer.
    let first = match role {
        Role::Initiator => None,
        Role::Responder {
            slot,
            refused,
            remote,
        } => {
            let first =
                tokio::time::timeout(control::session::HANDSHAKE_TIMEOUT, reader.recv()).await;
            drop(slot);
            match first {
                Ok(Ok(Message::DialMe)) => {
                    // Not a session: the peer only says it is up, so we dial it.
                    let _ = events.send(Event::DialMe { peer });
                    return;
                }
                Ok(Ok(msg)) => Some(msg),
                Ok(Err(e)) => {
                    let why = format!("node {peer}'s session ended before its first message: {e}");
                    refused(remote, &why);
                    return;
                }
                Err(_) => {
                    refused(remote, &format!("node {peer}'s session sent nothing"));
                    return;
                }
            }
        }
    };
    let (outbox, mut queued) = mpsc::channel::<Message>(OUTBOX_DEPTH);
    if events
        .send(Event::Connected {
            peer: peer.clone(),
            session: id,
            outbox,
        })
        .is_err()
    {
        return;
    }
    if let Some(msg) = first.filter(|m| *m != Message::Keepalive)
        && events
            .send(Event::Received {
                peer: peer.clone(),
                session: id,
                msg,
            })
            .is_err()
    {
        return;
    }
    let writer_peer = peer.clone();
    let mut writer_task = AbortOnDrop(tokio::spawn(async move {
        let mut keepalive = tokio::time::interval(control::session::KEEPALIVE_INTERVAL);
        keepalive.tick().await;
        loop {
            let msg = tokio::select! {
                m = queued.recv() => match m { Some(m) => m, None => return },
                _ = keepalive.tick() => Message::Keepalive,
            };
            if let Err(e) = writer.send(&msg).await {
                tracing::info!(peer = %writer_peer, error = %e, "control session write failed");
                return;
            }
        }
    }));
    let reason = loop {
        tokio::select! {
            _ = &mut writer_task.0 => break "writer ended".to_owned(),
            read = tokio::time::timeout(control::session::IDLE_TIMEOUT, reader.recv()) => match read {
                Err(_) => break "idle timeout".to_owned(),
                Ok(Err(e)) => break e.to_string(),
                Ok(Ok(Message::Keepalive)) => {}
                Ok(Ok(msg)) => {
                    if events.send(Event::Received { peer: peer.clone(), session: id, msg }).is_err() {
                        break "agent stopping".to_owned();
                    }
                }
            }
        }
    };
    drop(writer_task);
    tracing::info!(%peer, %reason, "control session ended");
    let _ = events.send(Event::Disconnected { peer, session: id });
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};

    use super::*;

    #[test]
    fn dial_backoff_caps_depend_on_how_recently_the_peer_answered() {
        let policy = DialBackoff::DEFAULT;
        let walk = |recent: bool| {
            let mut b = policy.min;
            let mut waits = vec![];
            for _ in 0..12 {
                b = policy.next(b, recent);
                waits.push(b);
            }
            waits
        };
        let rebooting = walk(true);
        let absent = walk(false);
        assert_eq!(rebooting[0], Duration::from_millis(400));
        assert_eq!(*rebooting.last().unwrap(), policy.expected_max);
        assert!(rebooting.iter().all(|w| *w <= policy.expected_max));
        assert_eq!(*absent.last().unwrap(), policy.idle_max);
        assert!(absent.windows(2).all(|w| w[0] <= w[1]));
        // A peer that comes back into the recent window drops to the short cap at once.
        assert_eq!(policy.next(policy.idle_max, true), policy.expected_max);
    }

    #[test]
    fn idle_dials_are_spaced_across_dialers() {
        let step = Duration::from_millis(500);
        let pacer = IdlePacer::new(step);
        let t = tokio::time::Instant::now();
        // Three dials wanted at once go one step apart; one wanted in between waits
        // for the next free step; one wanted long after goes when it wants.
        assert_eq!(pacer.slot(t), t);
        assert_eq!(pacer.slot(t), t + step);
        assert_eq!(pacer.slot(t), t + step * 2);
        assert_eq!(pacer.slot(t + step / 2), t + step * 3);
        let later = t + Duration::from_secs(60);
        assert_eq!(pacer.slot(later), later);
        assert_eq!(pacer.slot(later), later + step);
    }

    /// A control listener of `me` on loopback that accepts only `peer` (named `name`),
    /// and the agent events it produces.
    async fn listening(
        me: Arc<Identity>,
        peer: &Identity,
        name: &NodeName,
    ) -> (SocketAddr, mpsc::UnboundedReceiver<Event>) {
        let allowed: Allowed = Arc::new(RwLock::new(BTreeMap::new()));
        allowed
            .write()
            .unwrap()
            .insert(peer.public.0, (name.clone(), Ipv4Addr::LOCALHOST.into()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        spawn_listener(listener, me, "t".into(), allowed, tx);
        (addr, rx)
    }

    fn contact(identity: Identity, to: &Identity, peer: &str, address: SocketAddr) -> PeerContact {
        PeerContact {
            peer: NodeName::new(peer).unwrap(),
            address,
            local: Ipv4Addr::LOCALHOST.into(),
            key: to.public,
            identity: Arc::new(identity),
            cluster: "t".into(),
        }
    }

    /// "Dial me" is authenticated like any session, becomes one `DialMe` event for the
    /// agent, and never a session.
    #[tokio::test]
    async fn dial_me_reaches_the_agent_as_an_event_and_not_as_a_session() {
        let dialer = Arc::new(Identity::generate().unwrap());
        let later = Identity::generate().unwrap();
        let stranger = Identity::generate().unwrap();
        let later_name = NodeName::new("node-z").unwrap();
        let (addr, mut rx) = listening(dialer.clone(), &later, &later_name).await;

        let slots = Arc::new(tokio::sync::Semaphore::new(DIAL_ME_IN_FLIGHT));
        // A key not in the spec gets nothing through (it keeps trying in the background).
        let _stranger = spawn_dial_me(contact(stranger, &dialer, "node-a", addr), slots.clone());
        spawn_dial_me(contact(later, &dialer, "node-a", addr), slots)
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(Event::DialMe { peer })) => assert_eq!(peer, later_name),
            Ok(Some(_)) => panic!("a dial-me became something else than a DialMe event"),
            other => panic!("no DialMe event: {:?}", other.map(|e| e.is_some())),
        }
        // Nothing else follows: no session was announced.
        let more = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await;
        assert!(more.is_err(), "more events after a dial-me");
    }

    /// A node's key is accepted only from that node's address, and an address that is
    /// no node's is closed before any handshake work.
    #[tokio::test]
    async fn a_node_is_admitted_only_from_its_own_address() {
        let me = Arc::new(Identity::generate().unwrap());
        let peer = Identity::generate().unwrap();
        let name = NodeName::new("node-z").unwrap();
        let peer_ip: IpAddr = Ipv4Addr::new(127, 0, 0, 2).into();
        // Another node at 127.0.0.3: its address is admitted, with its key only.
        let other_ip: IpAddr = Ipv4Addr::new(127, 0, 0, 3).into();
        let allowed: Allowed = Arc::new(RwLock::new(BTreeMap::new()));
        {
            let mut a = allowed.write().unwrap();
            a.insert(peer.public.0, (name.clone(), peer_ip));
            let other = Identity::generate().unwrap();
            a.insert(other.public.0, (NodeName::new("node-o").unwrap(), other_ip));
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        spawn_listener(listener, me.clone(), "t".into(), allowed, tx);

        // From 127.0.0.1, no node's address: closed at once, not after a handshake
        // timeout.
        let mut stranger = TcpStream::connect(addr).await.unwrap();
        let mut byte = [0u8; 1];
        let closed = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::io::AsyncReadExt::read(&mut stranger, &mut byte),
        )
        .await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "not closed at once"
        );
        // The node's own key from another address gets no session either.
        let peer = Arc::new(peer);
        let from = |local: IpAddr| PeerContact {
            peer: NodeName::new("node-a").unwrap(),
            address: addr,
            local,
            key: me.public,
            identity: peer.clone(),
            cluster: "t".into(),
        };
        assert!(
            from(other_ip).open().await.is_err(),
            "node-z's key admitted from node-o's address"
        );
        // From its address it gets through.
        let session = from(peer_ip)
            .open()
            .await
            .expect("the node from its own address");
        let (_reader, mut writer) = session.split();
        writer.send(&Message::Keepalive).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(Event::Connected { peer, .. })) => assert_eq!(peer, name),
            _ => panic!("no session from the node's own address"),
        }
    }

    /// One address cannot hold more than its share of the handshake slots; another
    /// node's address still gets in.
    #[tokio::test]
    async fn one_address_cannot_take_every_handshake_slot() {
        let me = Arc::new(Identity::generate().unwrap());
        let (busy, other) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let busy_ip: IpAddr = Ipv4Addr::new(127, 0, 0, 3).into();
        let other_ip: IpAddr = Ipv4Addr::new(127, 0, 0, 4).into();
        let other_name = NodeName::new("node-o").unwrap();
        let allowed: Allowed = Arc::new(RwLock::new(BTreeMap::new()));
        {
            let mut a = allowed.write().unwrap();
            a.insert(busy.public.0, (NodeName::new("node-b").unwrap(), busy_ip));
            a.insert(other.public.0, (other_name.clone(), other_ip));
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        spawn_listener(listener, me.clone(), "t".into(), allowed, tx);

        let connect_from = async |ip: IpAddr| {
            let socket = TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(ip, 0)).unwrap();
            socket.connect(addr).await.unwrap()
        };
        // Silent connections from one address: the ones over its share are closed at
        // once, the others held (until the handshake timeout, 5 s).
        let mut idle = Vec::new();
        for _ in 0..MAX_PENDING_PER_SOURCE + 2 {
            idle.push(connect_from(busy_ip).await);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let closed = idle
            .iter()
            .filter(|stream| {
                let mut byte = [0u8; 1];
                // Ok(0): closed; WouldBlock: still open and silent.
                !matches!(stream.try_read(&mut byte),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            })
            .count();
        assert_eq!(
            closed, 2,
            "exactly the connections over the share are closed"
        );
        let contact = PeerContact {
            peer: NodeName::new("node-a").unwrap(),
            address: addr,
            local: other_ip,
            key: me.public,
            identity: Arc::new(other),
            cluster: "t".into(),
        };
        let session = contact.open().await.expect("another node gets a slot");
        let (_reader, mut writer) = session.split();
        writer.send(&Message::Keepalive).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(Event::Connected { peer, .. })) => assert_eq!(peer, other_name),
            _ => panic!("no session for the other node"),
        }
    }

    /// Refusals are logged one by one up to a number per window, the rest counted, and
    /// the count starts over with the next window.
    #[test]
    fn refused_connections_cannot_flood_the_log() {
        let mut log = RefusalLog::new("test refused", "more tests refused");
        let remote: SocketAddr = "192.0.2.9:40000".parse().unwrap();
        let start = std::time::Instant::now();
        for _ in 0..100 {
            log.refused(start, &remote, &"test");
        }
        assert_eq!((log.logged, log.unlogged), (REFUSALS_LOGGED_PER_WINDOW, 95));
        log.tick(start + REFUSAL_WINDOW / 2);
        assert_eq!(log.unlogged, 95, "the window is not over yet");
        log.tick(start + REFUSAL_WINDOW);
        assert_eq!((log.logged, log.unlogged), (0, 0));
        log.refused(start + REFUSAL_WINDOW, &remote, &"test");
        assert_eq!((log.logged, log.unlogged), (1, 0));
    }

    /// A dialer that backed off far dials at once when woken, not before.
    #[tokio::test]
    async fn a_woken_dialer_dials_at_once() {
        let me = Identity::generate().unwrap();
        let peer = Identity::generate().unwrap();
        // One listener throughout; it drops every connection, so each dial fails.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let long = Duration::from_secs(60);
        let policy = DialBackoff {
            min: long,
            expected_max: long,
            idle_max: long,
        };
        let wake = Arc::new(Notify::new());
        let (tx, _rx) = mpsc::unbounded_channel();
        let pacer = Arc::new(IdlePacer::new(IdlePacer::DEFAULT_INTERVAL));
        let task = spawn_dialer(
            contact(me, &peer, "node-z", addr),
            policy,
            pacer,
            wake.clone(),
            tx,
        );
        let first = tokio::time::timeout(Duration::from_secs(5), listener.accept()).await;
        assert!(matches!(first, Ok(Ok(_))), "the dialer did not dial first");
        drop(first);
        let early = tokio::time::timeout(Duration::from_secs(1), listener.accept()).await;
        assert!(early.is_err(), "the dialer did not back off");
        wake.notify_one();
        let woken = tokio::time::timeout(Duration::from_secs(5), listener.accept()).await;
        assert!(
            matches!(woken, Ok(Ok(_))),
            "the woken dialer did not dial within 5 s (its backoff is 45-75 s)"
        );
        task.abort();
    }

    /// A stream that keeps a copy of everything written to it.
    struct Recording {
        inner: TcpStream,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl AsyncRead for Recording {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Recording {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let r = Pin::new(&mut self.inner).poll_write(cx, buf);
            if let Poll::Ready(Ok(n)) = &r {
                self.written.lock().unwrap().extend_from_slice(&buf[..*n]);
            }
            r
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// A replayed first handshake message completes a responder handshake (Noise IK has
    /// no way to tell), but it never becomes a session the agent sees.
    #[tokio::test]
    async fn replayed_handshake_never_reaches_the_agent() {
        let responder = Arc::new(Identity::generate().unwrap());
        let initiator = Identity::generate().unwrap();
        let peer = NodeName::new("node-b").unwrap();
        let (addr, mut rx) = listening(responder.clone(), &initiator, &peer).await;

        // The genuine initiator: its session is announced once its Hello arrives.
        let written = Arc::new(Mutex::new(Vec::new()));
        let stream = Recording {
            inner: TcpStream::connect(addr).await.unwrap(),
            written: written.clone(),
        };
        let first_frame = {
            let session = control::session::connect(stream, &initiator, &responder.public, "t")
                .await
                .unwrap();
            let frame = written.lock().unwrap().clone();
            let (_r, mut w) = session.split();
            w.send(&Message::Hello { boot_id: 7 }).await.unwrap();
            match rx.recv().await {
                Some(Event::Connected { peer: p, .. }) => assert_eq!(p, peer),
                _ => panic!("the genuine session was not announced"),
            }
            match rx.recv().await {
                Some(Event::Received {
                    msg: Message::Hello { boot_id: 7 },
                    ..
                }) => {}
                _ => panic!("the Hello was not delivered"),
            }
            frame
        };

        // An attacker replays the initiator's first handshake frame.
        let mut replay = TcpStream::connect(addr).await.unwrap();
        replay.write_all(&first_frame).await.unwrap();
        let waited = tokio::time::timeout(
            control::session::HANDSHAKE_TIMEOUT + Duration::from_secs(1),
            async {
                loop {
                    match rx.recv().await {
                        Some(Event::Connected { .. }) => return true,
                        Some(_) => continue,
                        None => return false,
                    }
                }
            },
        )
        .await;
        assert!(
            !matches!(waited, Ok(true)),
            "a replayed handshake was announced as a session"
        );
    }
}
