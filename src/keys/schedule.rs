//! The key schedule: which ESP keys this node holds for each peer, and the messages that
//! agree and rotate them. A pure state machine: no I/O, time comes in as [`Instant`],
//! and every call returns the [`Action`]s the agent performs, in order.
//!
//! # Protocol
//!
//! Each direction of a pair is owned by its receiver:
//!
//! 1. The receiver generates a fresh key ([`SaKey::generate`]) and a random SPI, installs
//!    its inbound SA (`KernelChanged`) and then sends `KeyOffer { generation, spi, key }`.
//! 2. The sender replaces its outbound key with it (`KernelChanged`: the reconcile adds
//!    the new outbound SA before deleting the old one) and then sends `KeyAck`.
//! 3. On the ack the receiver marks the key active and retires every older inbound key;
//!    a retired key stays installed for [`GRACE`] (packets already in flight), then goes.
//!
//! The receiver holds a key before the sender can use it, and keeps it until the
//! sender has said it moved on: make-before-break, with no global coordination. Every
//! session starts with `Hello { boot_id }` and a fresh offer from each side; rotation
//! ([`Schedule::rotate`], periodic, kernel lifetime expiry) is another fresh offer.
//!
//! # Freshness
//!
//! - A key is generated for one offer and never again; the schedule keeps no key it does
//!   not want installed, and an offer is sent (and retransmitted) only within the session
//!   it was made in. A restarted sender therefore never installs a key that its previous
//!   incarnation used (same AES-GCM key with the sequence number, hence the nonce,
//!   starting again at 1).
//! - Generations are `epoch << 32 | counter`, where the epoch is derived from the
//!   receiver's `boot_id` and the counter counts up from 1 per peer. The sender accepts
//!   only offers newer than the last one it accepted from the same receiver boot, and
//!   only offers of the epoch of the receiver's latest `Hello`: a late offer of a previous
//!   boot of the peer (e.g. from a session that was being replaced) can neither take the
//!   sender back to a key that peer no longer holds nor block the new boot's offers.
//! - The transport (Noise over TCP, [`crate::control`]) delivers each session's messages
//!   in order, once, and never in another session. The schedule stays safe (no packet
//!   loss, no key reuse) if messages are dropped, duplicated, replayed or reordered
//!   within a session; it makes progress again once a session delivers in order.
//!
//! # Example: two agents agree on keys
//!
//! ```
//! use std::time::{Duration, Instant};
//! use ovl::keys::schedule::{Action, Schedule};
//! use ovl::spec::NodeName;
//!
//! let (name_a, name_b) = (NodeName::new("a").unwrap(), NodeName::new("b").unwrap());
//! let now = Instant::now();
//! let mut a = Schedule::new(1, Duration::from_secs(3600));
//! let mut b = Schedule::new(2, Duration::from_secs(3600));
//! a.set_peers(&[name_b.clone()], now);
//! b.set_peers(&[name_a.clone()], now);
//! let free = |_spi: u32| false; // no SPI of the kernel is taken by anyone else
//!
//! // The session comes up: each side says hello and offers its inbound key.
//! let mut from_a = a.on_connected(&name_b, now, &free);
//! let mut from_b = b.on_connected(&name_a, now, &free);
//! // The event loop: reconcile on KernelChanged (here: nothing to do), deliver Sends.
//! while !from_a.is_empty() || !from_b.is_empty() {
//!     for action in std::mem::take(&mut from_a) {
//!         if let Action::Send { msg, .. } = action {
//!             from_b.extend(b.on_message(&name_a, msg, now, &free).unwrap());
//!         }
//!     }
//!     for action in std::mem::take(&mut from_b) {
//!         if let Action::Send { msg, .. } = action {
//!             from_a.extend(a.on_message(&name_b, msg, now, &free).unwrap());
//!         }
//!     }
//! }
//! // One SA per direction, and both ends hold the same one.
//! let (ka, kb) = (a.peer_keys(&name_b), b.peer_keys(&name_a));
//! assert_eq!(ka.outbound.len(), 1);
//! assert_eq!(ka.outbound, kb.inbound);
//! assert_eq!(ka.inbound, kb.outbound);
//! assert!(a.rotated_since(&name_b, now) && b.rotated_since(&name_a, now));
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

use crate::control::Message;
use crate::desired::{DirectionKey, PeerKeys};
use crate::keys::SaKey;
use crate::spec::{MIN_ROTATION, NodeName};

#[cfg(test)]
mod tests;

/// How long a superseded inbound key stays installed after the sender acknowledged a
/// newer one. The sender switched before acknowledging, so only packets already in
/// flight (socket and qdisc queues, the underlay) still use the old SA; on any network
/// a cluster runs on they arrive within milliseconds. 2 s covers that with a wide
/// margin and keeps at most one extra SA per direction for a moment.
pub const GRACE: Duration = Duration::from_secs(2);

/// How long an unacknowledged offer waits before it is sent again (same generation, SPI
/// and key: it is the same SA). An offer goes unanswered when the sender's agent could
/// not install it yet (its reconcile failed: it holds the ack back until its kernel is in
/// sync) or when a message was lost; 3 s is well above a round trip plus a reconcile
/// pass, so a healthy peer is never asked twice, and short enough that a rotation
/// completes soon after the peer recovers.
pub const OFFER_RETRY: Duration = Duration::from_secs(3);

/// How long to wait before trying again to make a fresh offer that could not be made:
/// the OS CSPRNG failed or no free SPI was found. Both are transient (very early boot,
/// a kernel full of foreign SAs); retrying at the offer pace costs nothing.
pub const KEYGEN_RETRY: Duration = Duration::from_secs(3);

/// Periodic rotation is drawn uniformly in `[100 - ROTATION_JITTER_PERCENT, 100]` percent
/// of the `rotation` interval, per peer and per offer. Nodes started together (a cluster
/// booted at once, a spec applied everywhere) would otherwise rekey every pair in the
/// same second, every interval; the receivers of the two directions of a pair rotate
/// independently too. Drawing below the interval, never above, keeps the promise that
/// no key lives longer than `rotation`.
pub const ROTATION_JITTER_PERCENT: u32 = 15;

/// Most inbound keys held per peer. Normally one (two during a rotation, for
/// [`GRACE`]); more only while offers go unacknowledged (rotations faster than the
/// peer answers, sessions that keep dropping). When a new offer would exceed the bound,
/// the oldest retiring keys go first (the sender already moved past them; only packets
/// still in flight can lose), then the oldest unacknowledged offers (the sender may be
/// using one whose ack was lost: its packets are dropped, never sent in plaintext, until
/// it accepts a newer offer). The active key is never dropped. Keys adopted from the kernel at start may exceed the
/// bound until the first acknowledged offer retires them.
pub const MAX_INBOUND_PER_PEER: usize = 4;

/// Fresh offers made at a peer's `RekeyRequest` come at most this often per peer; a
/// request within it is served when it ends (through `next_rotation`, by
/// [`Schedule::poll`]). A peer asks when a key of its outbound direction expires, was
/// lost or collides with a foreign SA: a few times per rotation interval at most. A
/// peer that floods requests (a bug, or a compromised member of the cluster) would
/// otherwise make us generate a key and write the kernel for every message. Nothing is
/// lost by waiting: the current keys keep working meanwhile.
pub const REKEY_REQUEST_MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Lowest SPI handed out: 1 to 255 are reserved by IANA (RFC 4303 2.1), 0 is never
/// sent on the wire.
pub const MIN_SPI: u32 = 0x100;

/// Random SPIs tried before giving up for now (see [`KEYGEN_RETRY`]). A node holds a
/// few SPIs per peer out of 2^32: even one attempt fails with negligible probability.
pub const SPI_ATTEMPTS: usize = 64;

/// What the agent must do, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send `msg` to `peer` over its control session (dropped when not connected).
    Send { peer: NodeName, msg: Message },
    /// Reconcile the kernel with [`Schedule::peer_keys`] now. The actions after it
    /// assume it succeeded: if it fails, stop the batch (an offer or ack is only ever
    /// sent for an SA the kernel holds). Every `KeyOffer` and `KeyAck` of a key not
    /// announced before comes after a `KernelChanged` in its batch; retransmissions
    /// (an offer again, the ack of a repeated offer) come without one, as their SA was
    /// installed for the first announcement: the agent still checks that the kernel
    /// holds it, so a repeat costs a message, not a reconcile.
    KernelChanged,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("message from {peer}, which is not a peer of this node")]
    UnknownPeer { peer: NodeName },
    #[error("key offer from {peer} before its hello")]
    OfferBeforeHello { peer: NodeName },
    #[error("key offer from {peer} with the reserved spi 0x{spi:08x}")]
    ReservedSpi { peer: NodeName, spi: u32 },
    #[error(
        "key offer from {peer}: generation {generation:#x} was already accepted with another spi or key"
    )]
    ConflictingOffer { peer: NodeName, generation: u64 },
    #[error(
        "key acknowledgement from {peer} for generation {generation:#x} spi 0x{spi:08x}, which this node does not hold"
    )]
    UnexpectedAck {
        peer: NodeName,
        generation: u64,
        spi: u32,
    },
}

/// Randomness for SPIs and rotation jitter; injectable for tests. Keys never come from
/// here: they always come from [`SaKey::generate`] (the OS CSPRNG).
pub trait Entropy: Send + Sync {
    /// A uniformly random `u32`, or `None` when no randomness is available.
    fn next_u32(&mut self) -> Option<u32>;
}

/// [`Entropy`] from the operating system's CSPRNG.
pub struct OsEntropy;

impl Entropy for OsEntropy {
    fn next_u32(&mut self) -> Option<u32> {
        use ring::rand::SecureRandom as _;
        let mut bytes = [0u8; 4];
        ring::rand::SystemRandom::new().fill(&mut bytes).ok()?;
        Some(u32::from_be_bytes(bytes))
    }
}

/// Why a fresh offer could not be made (retried after [`KEYGEN_RETRY`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blocked {
    /// The OS CSPRNG failed.
    Entropy,
    /// [`SPI_ATTEMPTS`] random SPIs were all taken.
    NoFreeSpi,
    /// 2^32 - 1 offers to this peer in one agent run; a restart starts a new epoch.
    GenerationsExhausted,
}

/// The state of one held key. Never the key itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    /// Inbound: installed and offered, not yet acknowledged.
    Offered,
    /// Inbound: acknowledged at `since`. Outbound: accepted at `since`.
    Active { since: Instant },
    /// Found in the kernel at agent start, in use (generation 0).
    Adopted,
    /// Inbound: superseded, removed from the kernel at `until`.
    Retiring { until: Instant },
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyState::Offered => "offered",
            KeyState::Active { .. } => "active",
            KeyState::Adopted => "adopted",
            KeyState::Retiring { .. } => "retiring",
        })
    }
}

/// One held key, for status output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    /// `epoch << 32 | counter` of the receiver; 0 for adopted keys.
    pub generation: u64,
    pub spi: u32,
    /// When this node installed it (inbound: generated; outbound: accepted); `None` for
    /// keys adopted from the kernel, whose age is unknown.
    pub installed_at: Option<Instant>,
    pub state: KeyState,
}

/// The keys held for one peer and the state of its exchange. Never a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerKeyStatus {
    pub connected: bool,
    /// The peer's `boot_id` from its latest `Hello`.
    pub peer_boot: Option<u64>,
    /// Oldest first.
    pub inbound: Vec<KeyInfo>,
    /// One, or several adopted from the kernel until the first offer is accepted.
    pub outbound: Vec<KeyInfo>,
    /// When the inbound key is next rotated (only happens while connected).
    pub next_rotation: Option<Instant>,
    /// Set while a fresh offer cannot be made.
    pub blocked: Option<Blocked>,
}

#[derive(Debug)]
enum InState {
    Adopted,
    Offered { session: u64, last_sent: Instant },
    Active { since: Instant },
    Retiring { until: Instant },
}

#[derive(Debug)]
struct Inbound {
    generation: u64,
    spi: u32,
    key: SaKey,
    installed_at: Option<Instant>,
    state: InState,
}

#[derive(Debug)]
struct Outbound {
    generation: u64,
    spi: u32,
    key: SaKey,
    accepted_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct Peer {
    connected: bool,
    /// Counts sessions; offers are retransmitted only in the session they were made in.
    session: u64,
    /// Ascending generation (adopted keys, generation 0, first).
    inbound: Vec<Inbound>,
    /// Counter of the last generation offered.
    counter: u32,
    /// The current outbound key (several only when adopted).
    outbound: Vec<Outbound>,
    peer_boot: Option<u64>,
    /// The newest generation accepted from `peer_boot`.
    accepted: Option<u64>,
    next_rotation: Option<Instant>,
    blocked: Option<(Blocked, Instant)>,
    /// When the newest fresh offer was made (see [`REKEY_REQUEST_MIN_INTERVAL`]).
    last_offer: Option<Instant>,
}

impl Peer {
    fn has_keys(&self) -> bool {
        !self.inbound.is_empty() || !self.outbound.is_empty()
    }

    /// The newest inbound key if it is an offer of the current session.
    fn pending_offer(&mut self) -> Option<&mut Inbound> {
        let session = self.session;
        self.inbound
            .last_mut()
            .filter(|k| matches!(k.state, InState::Offered { session: s, .. } if s == session))
    }

    /// Makes room for one more inbound key (see [`MAX_INBOUND_PER_PEER`]).
    fn make_room(&mut self) {
        while self.inbound.len() >= MAX_INBOUND_PER_PEER {
            let victim = self
                .inbound
                .iter()
                .position(|k| matches!(k.state, InState::Retiring { .. }))
                .or_else(|| {
                    self.inbound
                        .iter()
                        .position(|k| matches!(k.state, InState::Offered { .. }))
                });
            match victim {
                Some(i) => {
                    self.inbound.remove(i);
                }
                None => break,
            }
        }
    }
}

/// The key schedule of one node: per peer, the keys of both directions.
pub struct Schedule {
    boot_id: u64,
    epoch: u64,
    rotation: Duration,
    peers: BTreeMap<NodeName, Peer>,
    /// The last generation counter offered to peers that were dropped (left the spec,
    /// or forgotten): a peer that comes back continues from there. Its agent still
    /// knows our epoch and the newest generation it accepted in it, and ignores any
    /// offer that is not newer (a replay, to it).
    dropped_counters: BTreeMap<NodeName, u32>,
    entropy: Box<dyn Entropy>,
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schedule")
            .field("boot_id", &self.boot_id)
            .field("rotation", &self.rotation)
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

/// The high half of this node's generations: `boot_id` folded to 32 bits.
fn epoch_of(boot_id: u64) -> u64 {
    (boot_id ^ (boot_id >> 32)) & 0xffff_ffff
}

impl Schedule {
    /// `boot_id` is random per agent start; `rotation` is the spec's interval (raised to
    /// [`MIN_ROTATION`] if shorter).
    pub fn new(boot_id: u64, rotation: Duration) -> Schedule {
        Schedule::with_entropy(boot_id, rotation, Box::new(OsEntropy))
    }

    /// [`Schedule::new`] with another source of SPIs and jitter.
    pub fn with_entropy(boot_id: u64, rotation: Duration, entropy: Box<dyn Entropy>) -> Schedule {
        Schedule {
            boot_id,
            epoch: epoch_of(boot_id),
            rotation: rotation.max(MIN_ROTATION),
            peers: BTreeMap::new(),
            dropped_counters: BTreeMap::new(),
            entropy,
        }
    }

    pub fn boot_id(&self) -> u64 {
        self.boot_id
    }

    /// The spec changed: new peers start without keys, removed peers are forgotten with
    /// their keys (`KernelChanged` when they had any).
    pub fn set_peers(&mut self, peers: &[NodeName], _now: Instant) -> Vec<Action> {
        let wanted: BTreeSet<&NodeName> = peers.iter().collect();
        let mut changed = false;
        let dropped = &mut self.dropped_counters;
        self.peers.retain(|name, peer| {
            let keep = wanted.contains(name);
            if !keep {
                changed |= peer.has_keys();
                dropped.insert(name.clone(), peer.counter);
            }
            keep
        });
        for name in wanted {
            if !self.peers.contains_key(name) {
                let counter = self.dropped_counters.remove(name).unwrap_or(0);
                self.peers.insert(
                    name.clone(),
                    Peer {
                        counter,
                        ..Peer::default()
                    },
                );
            }
        }
        if changed {
            vec![Action::KernelChanged]
        } else {
            vec![]
        }
    }

    /// Drops everything known about `peer` (its keys too): for a peer whose address or
    /// node key changed, whose keys must not be installed for its new address. A
    /// following [`Schedule::set_peers`] starts it afresh. `KernelChanged` when keys were
    /// dropped (their SAs must go).
    pub fn forget(&mut self, peer: &NodeName) -> Vec<Action> {
        let Some(p) = self.peers.remove(peer) else {
            return vec![];
        };
        self.dropped_counters.insert(peer.clone(), p.counter);
        if p.has_keys() {
            vec![Action::KernelChanged]
        } else {
            vec![]
        }
    }

    /// At agent start: the SAs the kernel already holds for `peer`. Adopted inbound keys
    /// count as active generation 0 and are retired when a new key is acknowledged; the
    /// adopted outbound keys stay current until an offer is accepted. Nothing changes in
    /// the kernel, so a restart has no gap. Keys for an unknown peer, and SPIs already
    /// held, are ignored; outbound keys are adopted only when none is held.
    pub fn adopt(
        &mut self,
        peer: &NodeName,
        inbound: Vec<DirectionKey>,
        outbound: Vec<DirectionKey>,
    ) {
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        for k in inbound {
            if p.inbound.iter().any(|h| h.spi == k.spi) {
                continue;
            }
            let at = p.inbound.iter().take_while(|h| h.generation == 0).count();
            p.inbound.insert(
                at,
                Inbound {
                    generation: 0,
                    spi: k.spi,
                    key: k.key,
                    installed_at: None,
                    state: InState::Adopted,
                },
            );
        }
        if p.outbound.is_empty() {
            p.outbound = outbound
                .into_iter()
                .map(|k| Outbound {
                    generation: 0,
                    spi: k.spi,
                    key: k.key,
                    accepted_at: None,
                })
                .collect();
        }
    }

    /// A new session with `peer` is up (it may replace one not yet seen to go down):
    /// `Hello`, then a fresh offer. Older keys keep working until the new ones are
    /// acknowledged.
    pub fn on_connected(
        &mut self,
        peer: &NodeName,
        now: Instant,
        taken_spis: &dyn Fn(u32) -> bool,
    ) -> Vec<Action> {
        let Some(p) = self.peers.get_mut(peer) else {
            return vec![];
        };
        p.connected = true;
        p.session += 1;
        let mut actions = vec![Action::Send {
            peer: peer.clone(),
            msg: Message::Hello {
                boot_id: self.boot_id,
            },
        }];
        actions.extend(self.fresh_offer(peer, now, taken_spis));
        actions
    }

    /// The session with `peer` is gone. Its keys stay (the data path does not depend on
    /// the agent); only retiring keys still expire.
    pub fn on_disconnected(&mut self, peer: &NodeName, _now: Instant) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.connected = false;
        }
    }

    /// A message from `peer`. On an error nothing changed.
    pub fn on_message(
        &mut self,
        peer: &NodeName,
        msg: Message,
        now: Instant,
        taken_spis: &dyn Fn(u32) -> bool,
    ) -> Result<Vec<Action>, ScheduleError> {
        let Some(p) = self.peers.get_mut(peer) else {
            return Err(ScheduleError::UnknownPeer { peer: peer.clone() });
        };
        match msg {
            Message::Hello { boot_id } => {
                if p.peer_boot != Some(boot_id) {
                    // A new boot of the peer: its generations start over.
                    p.peer_boot = Some(boot_id);
                    p.accepted = None;
                }
                Ok(vec![])
            }
            Message::KeyOffer {
                generation,
                spi,
                key,
            } => on_offer(p, peer, generation, spi, key, now),
            Message::KeyAck { generation, spi } => on_ack(p, peer, generation, spi, now),
            Message::RekeyRequest => match p.last_offer {
                Some(at) if now < at + REKEY_REQUEST_MIN_INTERVAL => {
                    let due = at + REKEY_REQUEST_MIN_INTERVAL;
                    p.next_rotation = Some(p.next_rotation.map_or(due, |t| t.min(due)));
                    Ok(vec![])
                }
                _ => Ok(self.fresh_offer(peer, now, taken_spis)),
            },
            // A DialMe means something only as the first message of a session (the
            // agent's listener handles it there); inside a running session it is moot.
            Message::Keepalive | Message::DialMe => Ok(vec![]),
        }
    }

    /// Rotates both directions with `peer`: a fresh offer for the inbound one, and a
    /// `RekeyRequest` so the peer offers a fresh key for the outbound one. Nothing when
    /// not connected: the next session starts with fresh keys anyway.
    pub fn rotate(
        &mut self,
        peer: &NodeName,
        now: Instant,
        taken_spis: &dyn Fn(u32) -> bool,
    ) -> Vec<Action> {
        if !self.peers.get(peer).is_some_and(|p| p.connected) {
            return vec![];
        }
        let mut actions = self.fresh_offer(peer, now, taken_spis);
        actions.push(Action::Send {
            peer: peer.clone(),
            msg: Message::RekeyRequest,
        });
        actions
    }

    /// A fresh offer for the inbound direction only (an inbound SA reached its kernel
    /// lifetime, or vanished). Nothing when not connected, as [`Schedule::rotate`].
    pub fn rekey_inbound(
        &mut self,
        peer: &NodeName,
        now: Instant,
        taken_spis: &dyn Fn(u32) -> bool,
    ) -> Vec<Action> {
        if !self.peers.get(peer).is_some_and(|p| p.connected) {
            return vec![];
        }
        self.fresh_offer(peer, now, taken_spis)
    }

    /// Timers: removes retired keys after [`GRACE`], retransmits unacknowledged offers
    /// every [`OFFER_RETRY`], rotates inbound keys periodically, retries blocked offers.
    /// Call at [`Schedule::next_wakeup`] (earlier is harmless).
    pub fn poll(&mut self, now: Instant, taken_spis: &dyn Fn(u32) -> bool) -> Vec<Action> {
        let mut kernel = false;
        let mut sends = Vec::new();
        let names: Vec<NodeName> = self.peers.keys().cloned().collect();
        for name in names {
            let Some(p) = self.peers.get_mut(&name) else {
                continue;
            };
            let before = p.inbound.len();
            p.inbound
                .retain(|k| !matches!(k.state, InState::Retiring { until } if until <= now));
            kernel |= p.inbound.len() != before;
            if !p.connected {
                continue;
            }
            let due = match p.blocked {
                Some((_, at)) => at + KEYGEN_RETRY <= now,
                None => p.next_rotation.is_some_and(|t| t <= now),
            };
            if due {
                for action in self.fresh_offer(&name, now, taken_spis) {
                    match action {
                        Action::KernelChanged => kernel = true,
                        send => sends.push(send),
                    }
                }
            }
            let Some(p) = self.peers.get_mut(&name) else {
                continue;
            };
            if let Some(offer) = p.pending_offer()
                && let InState::Offered { last_sent, .. } = &mut offer.state
                && *last_sent + OFFER_RETRY <= now
            {
                // Its SA was installed before the first send; the agent checks the
                // kernel still holds it.
                *last_sent = now;
                sends.push(Action::Send {
                    peer: name.clone(),
                    msg: Message::KeyOffer {
                        generation: offer.generation,
                        spi: offer.spi,
                        key: offer.key.clone(),
                    },
                });
            }
        }
        let mut actions = Vec::with_capacity(sends.len() + 1);
        if kernel {
            actions.push(Action::KernelChanged);
        }
        actions.extend(sends);
        actions
    }

    /// When [`Schedule::poll`] has something to do next.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for p in self.peers.values() {
            for k in &p.inbound {
                if let InState::Retiring { until } = k.state {
                    consider(until);
                }
            }
            if !p.connected {
                continue;
            }
            match p.blocked {
                Some((_, at)) => consider(at + KEYGEN_RETRY),
                None => {
                    if let Some(t) = p.next_rotation {
                        consider(t);
                    }
                }
            }
            if let Some(k) = p.inbound.last()
                && let InState::Offered { session, last_sent } = k.state
                && session == p.session
            {
                consider(last_sent + OFFER_RETRY);
            }
        }
        next
    }

    /// What the kernel must hold for `peer` now: every inbound key (offered, active,
    /// adopted, retiring), oldest first, and the current outbound key.
    pub fn peer_keys(&self, peer: &NodeName) -> PeerKeys {
        let Some(p) = self.peers.get(peer) else {
            return PeerKeys::default();
        };
        PeerKeys {
            inbound: p
                .inbound
                .iter()
                .map(|k| DirectionKey {
                    spi: k.spi,
                    key: k.key.clone(),
                })
                .collect(),
            outbound: p
                .outbound
                .iter()
                .map(|k| DirectionKey {
                    spi: k.spi,
                    key: k.key.clone(),
                })
                .collect(),
        }
    }

    /// Generations, SPIs and states of the keys held for `peer`; never a key.
    pub fn status(&self, peer: &NodeName) -> Option<PeerKeyStatus> {
        let p = self.peers.get(peer)?;
        Some(PeerKeyStatus {
            connected: p.connected,
            peer_boot: p.peer_boot,
            inbound: p
                .inbound
                .iter()
                .map(|k| KeyInfo {
                    generation: k.generation,
                    spi: k.spi,
                    installed_at: k.installed_at,
                    state: match k.state {
                        InState::Adopted => KeyState::Adopted,
                        InState::Offered { .. } => KeyState::Offered,
                        InState::Active { since } => KeyState::Active { since },
                        InState::Retiring { until } => KeyState::Retiring { until },
                    },
                })
                .collect(),
            outbound: p
                .outbound
                .iter()
                .map(|k| KeyInfo {
                    generation: k.generation,
                    spi: k.spi,
                    installed_at: k.accepted_at,
                    state: match k.accepted_at {
                        Some(since) => KeyState::Active { since },
                        None => KeyState::Adopted,
                    },
                })
                .collect(),
            next_rotation: p.next_rotation,
            blocked: p.blocked.map(|(b, _)| b),
        })
    }

    /// Both directions with `peer` use keys that were not in use before `since`: the
    /// active inbound key was generated at or after `since` (and acknowledged), and the
    /// outbound key was accepted at or after `since`. `ovl-controller rotate` waits for
    /// this.
    pub fn rotated_since(&self, peer: &NodeName, since: Instant) -> bool {
        let Some(p) = self.peers.get(peer) else {
            return false;
        };
        let inbound = p.inbound.iter().any(|k| {
            matches!(k.state, InState::Active { .. }) && k.installed_at.is_some_and(|t| t >= since)
        });
        let outbound = p
            .outbound
            .iter()
            .any(|k| k.accepted_at.is_some_and(|t| t >= since));
        inbound && outbound
    }

    /// A uniformly random point in the last [`ROTATION_JITTER_PERCENT`] of `rotation`.
    fn jittered_rotation(&mut self) -> Duration {
        // Without randomness, the full interval: still a valid rotation, only unjittered.
        let r = u128::from(self.entropy.next_u32().unwrap_or(u32::MAX));
        let scale = 1u128 << 32;
        let low = u128::from(100 - ROTATION_JITTER_PERCENT);
        let span = u128::from(ROTATION_JITTER_PERCENT);
        let nanos = self.rotation.as_nanos() * (low * scale + span * r) / (100 * scale);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// A random SPI of at least [`MIN_SPI`], held by no peer and not taken in the kernel.
    fn allocate_spi(&mut self, taken_spis: &dyn Fn(u32) -> bool) -> Result<u32, Blocked> {
        for _ in 0..SPI_ATTEMPTS {
            let spi = self.entropy.next_u32().ok_or(Blocked::Entropy)?;
            let held = || {
                self.peers
                    .values()
                    .any(|p| p.inbound.iter().any(|k| k.spi == spi))
            };
            if spi >= MIN_SPI && !taken_spis(spi) && !held() {
                return Ok(spi);
            }
        }
        Err(Blocked::NoFreeSpi)
    }

    /// Generates and installs a fresh inbound key for `peer` and offers it:
    /// `[KernelChanged, Send(KeyOffer)]`, or nothing (and `blocked`) if that fails.
    fn fresh_offer(
        &mut self,
        peer: &NodeName,
        now: Instant,
        taken_spis: &dyn Fn(u32) -> bool,
    ) -> Vec<Action> {
        let Some(counter) = self.peers.get(peer).map(|p| p.counter.checked_add(1)) else {
            return vec![];
        };
        let made = match counter {
            None => Err(Blocked::GenerationsExhausted),
            Some(counter) => SaKey::generate()
                .map_err(|_| Blocked::Entropy)
                .and_then(|key| Ok((counter, key, self.allocate_spi(taken_spis)?))),
        };
        let jitter = self.jittered_rotation();
        let epoch = self.epoch;
        let Some(p) = self.peers.get_mut(peer) else {
            return vec![];
        };
        let (counter, key, spi) = match made {
            Ok(made) => made,
            Err(reason) => {
                p.blocked = Some((reason, now));
                return vec![];
            }
        };
        p.make_room();
        p.counter = counter;
        let generation = epoch << 32 | u64::from(counter);
        p.inbound.push(Inbound {
            generation,
            spi,
            key: key.clone(),
            installed_at: Some(now),
            state: InState::Offered {
                session: p.session,
                last_sent: now,
            },
        });
        p.next_rotation = Some(now + jitter);
        p.blocked = None;
        p.last_offer = Some(now);
        vec![
            Action::KernelChanged,
            Action::Send {
                peer: peer.clone(),
                msg: Message::KeyOffer {
                    generation,
                    spi,
                    key,
                },
            },
        ]
    }
}

/// The sender's side: `peer` offers a key for the direction towards it.
fn on_offer(
    p: &mut Peer,
    peer: &NodeName,
    generation: u64,
    spi: u32,
    key: SaKey,
    now: Instant,
) -> Result<Vec<Action>, ScheduleError> {
    let Some(boot) = p.peer_boot else {
        return Err(ScheduleError::OfferBeforeHello { peer: peer.clone() });
    };
    if spi < MIN_SPI {
        return Err(ScheduleError::ReservedSpi {
            peer: peer.clone(),
            spi,
        });
    }
    if generation >> 32 != epoch_of(boot) {
        return Ok(vec![]); // of another boot of the peer: stale
    }
    let ack = vec![
        Action::KernelChanged,
        Action::Send {
            peer: peer.clone(),
            msg: Message::KeyAck { generation, spi },
        },
    ];
    match p.accepted {
        Some(accepted) if generation < accepted => Ok(vec![]), // stale or replayed
        Some(accepted) if generation == accepted => {
            // A retransmission: our ack was lost or is on its way. Same SA (installed
            // for the first one), ack again.
            match p.outbound.as_slice() {
                [current] if current.spi == spi && current.key == key => Ok(vec![Action::Send {
                    peer: peer.clone(),
                    msg: Message::KeyAck { generation, spi },
                }]),
                _ => Err(ScheduleError::ConflictingOffer {
                    peer: peer.clone(),
                    generation,
                }),
            }
        }
        _ => {
            p.outbound = vec![Outbound {
                generation,
                spi,
                key,
                accepted_at: Some(now),
            }];
            p.accepted = Some(generation);
            Ok(ack)
        }
    }
}

/// The receiver's side: `peer` installed and uses the key of `generation`.
fn on_ack(
    p: &mut Peer,
    peer: &NodeName,
    generation: u64,
    spi: u32,
    now: Instant,
) -> Result<Vec<Action>, ScheduleError> {
    let found = p
        .inbound
        .iter()
        .position(|k| k.generation == generation && k.spi == spi && generation != 0);
    let Some(i) = found else {
        return Err(ScheduleError::UnexpectedAck {
            peer: peer.clone(),
            generation,
            spi,
        });
    };
    if !matches!(p.inbound[i].state, InState::Offered { .. }) {
        return Ok(vec![]); // a duplicate, or late after a newer ack: nothing to do
    }
    p.inbound[i].state = InState::Active { since: now };
    for older in &mut p.inbound[..i] {
        if !matches!(older.state, InState::Retiring { .. }) {
            older.state = InState::Retiring { until: now + GRACE };
        }
    }
    // Nothing leaves the kernel yet: retired keys go after GRACE, in `poll`.
    Ok(vec![])
}
