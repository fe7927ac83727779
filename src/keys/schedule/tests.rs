//! Unit tests of the key schedule, and a simulation of two or three agents (each a
//! [`Schedule`] plus a simulated kernel) whose messages an adversary delays, drops,
//! duplicates, replays and reorders, under a virtual clock.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use proptest::prelude::*;

use super::*;
use crate::keys::SA_KEY_LEN;

type KeyBytes = [u8; SA_KEY_LEN];

const ROTATION: Duration = Duration::from_secs(120);

fn name(s: &str) -> NodeName {
    NodeName::new(s).unwrap()
}

fn free(_spi: u32) -> bool {
    false
}

/// Deterministic SPIs and jitter (xorshift), optionally from a narrow range so SPIs
/// collide and reserved values come up.
struct TestEntropy {
    state: u64,
    narrow: bool,
}

impl Entropy for TestEntropy {
    fn next_u32(&mut self) -> Option<u32> {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let v = (self.state >> 16) as u32;
        Some(if self.narrow { v % (MIN_SPI + 24) } else { v })
    }
}

/// Entropy from a fixed list, then none.
struct Scripted(Vec<u32>);

impl Entropy for Scripted {
    fn next_u32(&mut self) -> Option<u32> {
        (!self.0.is_empty()).then(|| self.0.remove(0))
    }
}

fn scripted(values: &[u32]) -> Box<dyn Entropy> {
    Box::new(Scripted(values.to_vec()))
}

fn offer_of(actions: &[Action]) -> (u64, u32, SaKey) {
    actions
        .iter()
        .find_map(|a| match a {
            Action::Send {
                msg:
                    Message::KeyOffer {
                        generation,
                        spi,
                        key,
                    },
                ..
            } => Some((*generation, *spi, key.clone())),
            _ => None,
        })
        .expect("an offer")
}

fn sends(actions: Vec<Action>) -> Vec<Message> {
    actions
        .into_iter()
        .filter_map(|a| match a {
            Action::Send { msg, .. } => Some(msg),
            Action::KernelChanged => None,
        })
        .collect()
}

/// A schedule with one peer `b`, connected, and the peer's hello received.
fn connected(boot: u64, peer_boot: u64, now: Instant) -> (Schedule, NodeName, (u64, u32, SaKey)) {
    let b = name("b");
    let mut s = Schedule::new(boot, ROTATION);
    assert!(s.set_peers(std::slice::from_ref(&b), now).is_empty());
    let actions = s.on_connected(&b, now, &free);
    let offer = offer_of(&actions);
    s.on_message(&b, Message::Hello { boot_id: peer_boot }, now, &free)
        .unwrap();
    (s, b, offer)
}

fn offer_from(epoch_boot: u64, counter: u64) -> (u64, u32, SaKey) {
    (
        epoch_of(epoch_boot) << 32 | counter,
        0x1000 + counter as u32,
        SaKey::generate().unwrap(),
    )
}

fn key_offer((generation, spi, key): &(u64, u32, SaKey)) -> Message {
    Message::KeyOffer {
        generation: *generation,
        spi: *spi,
        key: key.clone(),
    }
}

#[test]
fn session_start_orders_hello_install_offer() {
    let now = Instant::now();
    let b = name("b");
    let mut s = Schedule::new(7, ROTATION);
    s.set_peers(std::slice::from_ref(&b), now);
    let actions = s.on_connected(&b, now, &free);
    assert_eq!(
        actions[0],
        Action::Send {
            peer: b.clone(),
            msg: Message::Hello { boot_id: 7 }
        }
    );
    assert_eq!(actions[1], Action::KernelChanged);
    let (generation, spi, key) = offer_of(&actions[2..]);
    assert_eq!(generation, epoch_of(7) << 32 | 1);
    assert!(spi >= MIN_SPI);
    let keys = s.peer_keys(&b);
    assert_eq!(keys.inbound, vec![DirectionKey { spi, key }]);
    assert!(keys.outbound.is_empty());
    let st = s.status(&b).unwrap();
    assert_eq!(st.inbound[0].state, KeyState::Offered);
    assert!(st.connected);
}

#[test]
fn accepted_offer_installs_then_acks_and_replaces_outbound() {
    let now = Instant::now();
    let (mut s, b, _) = connected(1, 2, now);
    let first = offer_from(2, 1);
    let actions = s.on_message(&b, key_offer(&first), now, &free).unwrap();
    assert_eq!(
        actions,
        vec![
            Action::KernelChanged,
            Action::Send {
                peer: b.clone(),
                msg: Message::KeyAck {
                    generation: first.0,
                    spi: first.1
                }
            }
        ]
    );
    let later = now + Duration::from_secs(1);
    let second = offer_from(2, 2);
    s.on_message(&b, key_offer(&second), later, &free).unwrap();
    assert_eq!(
        s.peer_keys(&b).outbound,
        vec![DirectionKey {
            spi: second.1,
            key: second.2.clone()
        }]
    );
    let st = s.status(&b).unwrap();
    assert_eq!(st.outbound[0].generation, second.0);
    assert_eq!(st.outbound[0].state, KeyState::Active { since: later });
}

#[test]
fn stale_and_replayed_offers_never_move_the_outbound_key_back() {
    let now = Instant::now();
    let (mut s, b, _) = connected(1, 2, now);
    let (o1, o2) = (offer_from(2, 1), offer_from(2, 2));
    s.on_message(&b, key_offer(&o2), now, &free).unwrap();
    let before = s.peer_keys(&b);
    // Older generation: ignored.
    assert_eq!(s.on_message(&b, key_offer(&o1), now, &free), Ok(vec![]));
    // The same offer again (our ack was lost): acknowledged again, nothing changes,
    // and no reconcile is asked for (the SA is the one installed for the first).
    let again = s.on_message(&b, key_offer(&o2), now, &free).unwrap();
    assert_eq!(again.len(), 1, "{again:?}");
    assert!(matches!(
        &again[0],
        Action::Send { msg: Message::KeyAck { generation, .. }, .. } if *generation == o2.0
    ));
    // Same generation, another key: refused, nothing changes.
    let forged = (o2.0, o2.1, SaKey::generate().unwrap());
    assert_eq!(
        s.on_message(&b, key_offer(&forged), now, &free),
        Err(ScheduleError::ConflictingOffer {
            peer: b.clone(),
            generation: o2.0
        })
    );
    // An offer of another boot of the peer: ignored.
    let other_boot = offer_from(99, 5);
    assert_eq!(
        s.on_message(&b, key_offer(&other_boot), now, &free),
        Ok(vec![])
    );
    assert_eq!(s.peer_keys(&b), before);
}

#[test]
fn a_new_boot_of_the_peer_restarts_its_generations() {
    let now = Instant::now();
    let (mut s, b, _) = connected(1, 2, now);
    s.on_message(&b, key_offer(&offer_from(2, 9)), now, &free)
        .unwrap();
    // Same boot again (a reconnect): generation 3 is still stale.
    s.on_message(&b, Message::Hello { boot_id: 2 }, now, &free)
        .unwrap();
    assert_eq!(
        s.on_message(&b, key_offer(&offer_from(2, 3)), now, &free),
        Ok(vec![])
    );
    // The peer restarted: its generation 1 is accepted, offers of the old boot are not.
    s.on_message(&b, Message::Hello { boot_id: 3 }, now, &free)
        .unwrap();
    assert_eq!(
        s.on_message(&b, key_offer(&offer_from(2, 10)), now, &free),
        Ok(vec![])
    );
    let fresh = offer_from(3, 1);
    assert_eq!(
        s.on_message(&b, key_offer(&fresh), now, &free)
            .unwrap()
            .len(),
        2
    );
    assert_eq!(s.peer_keys(&b).outbound[0].spi, fresh.1);
}

#[test]
fn a_restarted_peer_with_a_lower_epoch_is_accepted() {
    let now = Instant::now();
    let (high, low) = (0xffff_fff0, 0x10);
    let (mut s, b, _) = connected(1, high, now);
    s.on_message(&b, key_offer(&offer_from(high, 7)), now, &free)
        .unwrap();
    s.on_message(&b, Message::Hello { boot_id: low }, now, &free)
        .unwrap();
    let fresh = offer_from(low, 1);
    assert!(fresh.0 < offer_from(high, 7).0);
    s.on_message(&b, key_offer(&fresh), now, &free).unwrap();
    assert_eq!(s.peer_keys(&b).outbound[0].spi, fresh.1);
}

#[test]
fn malformed_offers_and_unknown_peers_are_errors() {
    let now = Instant::now();
    let b = name("b");
    let mut s = Schedule::new(1, ROTATION);
    s.set_peers(std::slice::from_ref(&b), now);
    s.on_connected(&b, now, &free);
    let o = offer_from(2, 1);
    assert_eq!(
        s.on_message(&b, key_offer(&o), now, &free),
        Err(ScheduleError::OfferBeforeHello { peer: b.clone() })
    );
    s.on_message(&b, Message::Hello { boot_id: 2 }, now, &free)
        .unwrap();
    let reserved = (o.0, 0xff, o.2.clone());
    assert_eq!(
        s.on_message(&b, key_offer(&reserved), now, &free),
        Err(ScheduleError::ReservedSpi {
            peer: b.clone(),
            spi: 0xff
        })
    );
    let stranger = name("z");
    assert_eq!(
        s.on_message(&stranger, Message::Keepalive, now, &free),
        Err(ScheduleError::UnknownPeer { peer: stranger })
    );
    assert!(s.peer_keys(&b).outbound.is_empty());
}

#[test]
fn ack_activates_and_retires_older_keys_after_grace() {
    let t0 = Instant::now();
    let (mut s, b, (g1, spi1, _)) = connected(1, 2, t0);
    assert_eq!(
        s.on_message(
            &b,
            Message::KeyAck {
                generation: g1,
                spi: spi1
            },
            t0,
            &free
        ),
        Ok(vec![])
    );
    assert!(matches!(
        s.status(&b).unwrap().inbound[0].state,
        KeyState::Active { .. }
    ));
    let t1 = t0 + Duration::from_secs(10);
    let (g2, spi2, _) = offer_of(&s.rekey_inbound(&b, t1, &free));
    assert_eq!(g2, g1 + 1);
    assert_eq!(s.peer_keys(&b).inbound.len(), 2);
    s.on_message(
        &b,
        Message::KeyAck {
            generation: g2,
            spi: spi2,
        },
        t1,
        &free,
    )
    .unwrap();
    let st = s.status(&b).unwrap();
    assert_eq!(
        st.inbound[0].state,
        KeyState::Retiring { until: t1 + GRACE }
    );
    assert_eq!(s.next_wakeup(), Some(t1 + GRACE));
    // Duplicate acks, and a late ack of the retiring key, change nothing.
    for (generation, spi) in [(g2, spi2), (g1, spi1)] {
        assert_eq!(
            s.on_message(&b, Message::KeyAck { generation, spi }, t1, &free),
            Ok(vec![])
        );
    }
    // Still held just before GRACE; removed at GRACE.
    assert!(
        s.poll(t1 + GRACE - Duration::from_millis(1), &free)
            .is_empty()
    );
    assert_eq!(s.poll(t1 + GRACE, &free), vec![Action::KernelChanged]);
    assert_eq!(s.peer_keys(&b).inbound.len(), 1);
    assert_eq!(s.peer_keys(&b).inbound[0].spi, spi2);
}

#[test]
fn an_ack_that_matches_nothing_is_an_error_and_changes_nothing() {
    let now = Instant::now();
    let (mut s, b, (g1, spi1, _)) = connected(1, 2, now);
    let before = format!("{s:?}");
    for (generation, spi) in [(g1, spi1 ^ 1), (g1 + 1, spi1), (0, spi1)] {
        assert_eq!(
            s.on_message(&b, Message::KeyAck { generation, spi }, now, &free),
            Err(ScheduleError::UnexpectedAck {
                peer: b.clone(),
                generation,
                spi
            })
        );
    }
    assert_eq!(format!("{s:?}"), before);
}

#[test]
fn unacked_offers_are_retransmitted_only_in_their_session() {
    let t0 = Instant::now();
    let (mut s, b, (g1, spi1, key1)) = connected(1, 2, t0);
    assert_eq!(s.next_wakeup(), Some(t0 + OFFER_RETRY));
    assert!(
        s.poll(t0 + OFFER_RETRY - Duration::from_millis(1), &free)
            .is_empty()
    );
    let again = s.poll(t0 + OFFER_RETRY, &free);
    // A retransmission costs no reconcile: its SA was installed for the first send.
    assert!(!again.contains(&Action::KernelChanged), "{again:?}");
    assert_eq!(offer_of(&again), (g1, spi1, key1));
    assert_eq!(s.next_wakeup(), Some(t0 + OFFER_RETRY * 2));
    // Disconnected: nothing but retiring keys wakes us, and nothing is sent.
    s.on_disconnected(&b, t0);
    assert_eq!(s.next_wakeup(), None);
    assert!(s.poll(t0 + Duration::from_secs(3600), &free).is_empty());
    // A new session: a fresh offer; the old one is never sent again.
    let t1 = t0 + Duration::from_secs(3600);
    let (g2, spi2, _) = offer_of(&s.on_connected(&b, t1, &free));
    assert!(g2 > g1);
    let later = s.poll(t1 + OFFER_RETRY, &free);
    assert_eq!(offer_of(&later).0, g2);
    assert_eq!(offer_of(&later).1, spi2);
    assert_eq!(sends(later).len(), 1);
    // Both are held until an ack decides.
    assert_eq!(s.peer_keys(&b).inbound.len(), 2);
}

#[test]
fn offers_of_an_earlier_session_are_never_sent_again() {
    // The peer may have restarted with an empty kernel: installing an offer its previous
    // incarnation used would reuse the key with the sequence numbers starting over.
    let t0 = Instant::now();
    let b = name("b");
    // SPI and jitter for the first offer; then nothing: the second session's offer fails.
    let mut s = Schedule::with_entropy(1, ROTATION, scripted(&[0x4242, 7]));
    s.set_peers(std::slice::from_ref(&b), t0);
    offer_of(&s.on_connected(&b, t0, &free));
    s.on_disconnected(&b, t0);
    assert_eq!(sends(s.on_connected(&b, t0, &free)).len(), 1); // Hello only
    assert_eq!(s.status(&b).unwrap().blocked, Some(Blocked::Entropy));
    for step in 1..5 {
        let actions = s.poll(t0 + OFFER_RETRY * step, &free);
        assert!(
            sends(actions).is_empty(),
            "an offer of the previous session was sent again"
        );
    }
}

#[test]
fn rotate_offers_and_asks_the_peer_to_rekey() {
    let now = Instant::now();
    let (mut s, b, _) = connected(1, 2, now);
    let actions = s.rotate(&b, now, &free);
    assert_eq!(actions[0], Action::KernelChanged);
    assert!(matches!(
        &actions[1],
        Action::Send {
            msg: Message::KeyOffer { .. },
            ..
        }
    ));
    assert_eq!(
        actions[2],
        Action::Send {
            peer: b.clone(),
            msg: Message::RekeyRequest
        }
    );
    // The peer's request: a fresh inbound offer.
    let later = now + REKEY_REQUEST_MIN_INTERVAL;
    let answer = s
        .on_message(&b, Message::RekeyRequest, later, &free)
        .unwrap();
    assert_eq!(answer[0], Action::KernelChanged);
    assert_eq!(offer_of(&answer).0 & 0xffff_ffff, 3);
    // Not connected: nothing (the next session starts with fresh keys).
    s.on_disconnected(&b, now);
    assert!(s.rotate(&b, now, &free).is_empty());
    assert!(s.rekey_inbound(&b, now, &free).is_empty());
}

#[test]
fn a_flood_of_rekey_requests_makes_one_offer_per_interval() {
    let now = Instant::now();
    let (mut s, b, _) = connected(1, 2, now);
    let offers = |actions: &[Action]| {
        actions
            .iter()
            .filter(|a| {
                matches!(
                    a,
                    Action::Send {
                        msg: Message::KeyOffer { .. },
                        ..
                    }
                )
            })
            .count()
    };
    // Just after the session's first offer: a thousand requests make no key at once...
    let mut made = 0;
    for i in 0..1000u32 {
        let at = now + Duration::from_micros(u64::from(i) * 100);
        made += offers(&s.on_message(&b, Message::RekeyRequest, at, &free).unwrap());
    }
    assert_eq!(made, 0);
    // ...but the request is not forgotten: one fresh offer when the interval ends.
    let due = now + REKEY_REQUEST_MIN_INTERVAL;
    assert!(s.next_wakeup().is_some_and(|t| t <= due));
    let before = s.poll(due - Duration::from_millis(1), &free);
    assert_eq!(offers(&before), 0);
    let at_due = s.poll(due, &free);
    assert_eq!(offers(&at_due), 1);
    assert_eq!(offer_of(&at_due).0 & 0xffff_ffff, 2);
    // Requests spread out (one per interval) are each answered at once.
    for k in 1..=3u32 {
        let at = due + REKEY_REQUEST_MIN_INTERVAL * k;
        let answer = s.on_message(&b, Message::RekeyRequest, at, &free).unwrap();
        assert_eq!(offers(&answer), 1);
        assert_eq!(offer_of(&answer).0 & 0xffff_ffff, 2 + u64::from(k));
    }
}

#[test]
fn periodic_rotation_is_jittered_within_the_interval() {
    let now = Instant::now();
    let b = name("b");
    for (r, expected) in [
        (0u32, ROTATION * 85 / 100),
        (u32::MAX, ROTATION - Duration::from_nanos(1)),
    ] {
        // One value for the SPI, one for the jitter.
        let mut s = Schedule::with_entropy(1, ROTATION, scripted(&[0x4242, r]));
        s.set_peers(std::slice::from_ref(&b), now);
        s.on_connected(&b, now, &free);
        let next = s.status(&b).unwrap().next_rotation.unwrap();
        let d = next - now;
        assert!(d.abs_diff(expected) <= Duration::from_micros(1), "{d:?}");
    }
    let mut s = Schedule::new(1, ROTATION);
    s.set_peers(std::slice::from_ref(&b), now);
    let (g1, spi1, _) = offer_of(&s.on_connected(&b, now, &free));
    s.on_message(
        &b,
        Message::KeyAck {
            generation: g1,
            spi: spi1,
        },
        now,
        &free,
    )
    .unwrap();
    let due = s.next_wakeup().unwrap();
    assert!(due >= now + ROTATION * 85 / 100 && due <= now + ROTATION);
    let actions = s.poll(due, &free);
    assert_eq!(offer_of(&actions).0, g1 + 1);
    assert!(s.status(&b).unwrap().next_rotation.unwrap() > due);
    // The interval is at least MIN_ROTATION.
    let tiny = Schedule::new(1, Duration::from_secs(1));
    assert_eq!(tiny.rotation, MIN_ROTATION);
}

#[test]
fn spis_avoid_reserved_taken_and_held_values() {
    let now = Instant::now();
    let (b, c) = (name("b"), name("c"));
    // 5: reserved; 0x500: taken in the kernel; 0x600 for b; 0x600 again: held; 0x700.
    let mut s = Schedule::with_entropy(
        1,
        ROTATION,
        scripted(&[5, 0x500, 0x600, 1, 0x600, 0x700, 1]),
    );
    s.set_peers(&[b.clone(), c.clone()], now);
    let taken = |spi: u32| spi == 0x500;
    assert_eq!(offer_of(&s.on_connected(&b, now, &taken)).1, 0x600);
    assert_eq!(offer_of(&s.on_connected(&c, now, &taken)).1, 0x700);
}

#[test]
fn a_fresh_offer_that_cannot_be_made_is_retried() {
    let now = Instant::now();
    let b = name("b");
    let mut s = Schedule::with_entropy(1, ROTATION, scripted(&[]));
    s.set_peers(std::slice::from_ref(&b), now);
    let actions = s.on_connected(&b, now, &free);
    assert_eq!(sends(actions), vec![Message::Hello { boot_id: 1 }]);
    assert_eq!(s.status(&b).unwrap().blocked, Some(Blocked::Entropy));
    assert_eq!(s.next_wakeup(), Some(now + KEYGEN_RETRY));

    let everything = |_spi: u32| true;
    let mut s = Schedule::new(1, ROTATION);
    s.set_peers(std::slice::from_ref(&b), now);
    assert_eq!(s.on_connected(&b, now, &everything).len(), 1);
    assert_eq!(s.status(&b).unwrap().blocked, Some(Blocked::NoFreeSpi));
    assert!(
        s.poll(now + KEYGEN_RETRY - Duration::from_millis(1), &everything)
            .is_empty()
    );
    let retried = s.poll(now + KEYGEN_RETRY, &free);
    offer_of(&retried);
    assert_eq!(s.status(&b).unwrap().blocked, None);
}

#[test]
fn inbound_keys_are_bounded_dropping_retiring_then_oldest_offers() {
    let t0 = Instant::now();
    let (mut s, b, (g1, spi1, _)) = connected(1, 2, t0);
    s.on_message(
        &b,
        Message::KeyAck {
            generation: g1,
            spi: spi1,
        },
        t0,
        &free,
    )
    .unwrap();
    let mut offers = vec![];
    for i in 1..=6 {
        let t = t0 + Duration::from_millis(i);
        offers.push(offer_of(&s.rekey_inbound(&b, t, &free)));
        let held = s.status(&b).unwrap().inbound;
        assert!(held.len() <= MAX_INBOUND_PER_PEER);
        // The active key and the newest offer are always held.
        assert_eq!(held[0].generation, g1);
        assert_eq!(held.last().unwrap().generation, offers.last().unwrap().0);
    }
    // An ack of the newest: the active key retires. The next offer drops it first
    // (rather than an unacknowledged offer).
    let (g, spi, _) = offers[5].clone();
    s.on_message(&b, Message::KeyAck { generation: g, spi }, t0, &free)
        .unwrap();
    let before: Vec<u64> = s
        .status(&b)
        .unwrap()
        .inbound
        .iter()
        .map(|k| k.generation)
        .collect();
    s.rekey_inbound(&b, t0, &free);
    let after: Vec<u64> = s
        .status(&b)
        .unwrap()
        .inbound
        .iter()
        .map(|k| k.generation)
        .collect();
    assert_eq!(after.len(), MAX_INBOUND_PER_PEER);
    assert_eq!(after[..MAX_INBOUND_PER_PEER - 1], before[1..]);
}

#[test]
fn adopted_keys_are_kept_until_new_ones_are_acknowledged() {
    let t0 = Instant::now();
    let b = name("b");
    let in_old: Vec<DirectionKey> = (0..2)
        .map(|i| DirectionKey {
            spi: 0x1000 + i,
            key: SaKey::generate().unwrap(),
        })
        .collect();
    // A torn reconcile left two outbound SAs: both stay until an offer is accepted.
    let out_old: Vec<DirectionKey> = (0..2)
        .map(|i| DirectionKey {
            spi: 0x2000 + i,
            key: SaKey::generate().unwrap(),
        })
        .collect();
    let mut s = Schedule::new(5, ROTATION);
    s.set_peers(std::slice::from_ref(&b), t0);
    s.adopt(&b, in_old.clone(), out_old.clone());
    s.adopt(&name("stranger"), in_old.clone(), out_old.clone());
    // No gap: the kernel keeps exactly what it has.
    assert_eq!(
        s.peer_keys(&b),
        PeerKeys {
            inbound: in_old.clone(),
            outbound: out_old.clone()
        }
    );
    let st = s.status(&b).unwrap();
    assert!(
        st.inbound
            .iter()
            .all(|k| k.state == KeyState::Adopted && k.generation == 0)
    );
    assert!(st.outbound.iter().all(|k| k.installed_at.is_none()));
    assert!(!s.rotated_since(&b, t0 - Duration::from_secs(1)));
    assert_eq!(s.next_wakeup(), None);

    let actions = s.on_connected(&b, t0, &free);
    let (g, spi, _) = offer_of(&actions);
    assert!(![0x1000, 0x1001].contains(&spi));
    assert_eq!(s.peer_keys(&b).inbound.len(), 3);
    s.on_message(&b, Message::Hello { boot_id: 6 }, t0, &free)
        .unwrap();
    let theirs = offer_from(6, 1);
    s.on_message(&b, key_offer(&theirs), t0, &free).unwrap();
    assert_eq!(s.peer_keys(&b).outbound.len(), 1);
    s.on_message(&b, Message::KeyAck { generation: g, spi }, t0, &free)
        .unwrap();
    assert_eq!(s.poll(t0 + GRACE, &free)[0], Action::KernelChanged);
    assert_eq!(s.peer_keys(&b).inbound.len(), 1);
    assert!(s.rotated_since(&b, t0));
}

#[test]
fn set_peers_adds_without_keys_and_forgets_removed_peers() {
    let now = Instant::now();
    let (mut s, b, _) = connected(1, 2, now);
    let c = name("c");
    assert!(s.set_peers(&[b.clone(), c.clone()], now).is_empty());
    assert_eq!(s.peer_keys(&c), PeerKeys::default());
    assert!(s.status(&c).is_some());
    assert!(s.set_peers(std::slice::from_ref(&b), now).is_empty()); // c had no keys
    assert_eq!(
        s.set_peers(std::slice::from_ref(&c), now),
        vec![Action::KernelChanged]
    );
    assert!(s.status(&b).is_none());
    assert_eq!(s.peer_keys(&b), PeerKeys::default());
}

#[test]
fn debug_and_status_never_show_key_bytes() {
    let now = Instant::now();
    let (mut s, b, (_, _, inbound)) = connected(1, 2, now);
    let outbound = offer_from(2, 1);
    s.on_message(&b, key_offer(&outbound), now, &free).unwrap();
    let actions = s.rotate(&b, now, &free);
    let shown = format!("{s:?} {:?} {:#?} {actions:?}", s.status(&b), s.status(&b),);
    for key in [inbound, outbound.2] {
        let bytes = key.expose();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let list = format!("{bytes:?}");
        assert!(!shown.contains(&hex) && !shown.contains(&list[1..list.len() - 1]));
    }
    assert!(shown.contains("<SECRET>"));
    let err = ScheduleError::ConflictingOffer {
        peer: b,
        generation: 1,
    };
    assert!(!err.to_string().contains("SECRET"));
}

#[test]
fn epochs_fit_in_32_bits_and_follow_the_boot() {
    assert!(epoch_of(u64::MAX) <= 0xffff_ffff);
    assert_ne!(epoch_of(1), epoch_of(2));
    assert_ne!(epoch_of(1 << 40), epoch_of(1 << 41));
}

// ---------------------------------------------------------------------------------
// Simulation.

#[derive(Clone, Debug)]
struct Wire {
    from: usize,
    to: usize,
    session: u64,
    msg: Message,
}

struct Party {
    name: NodeName,
    boot: u64,
    sched: Schedule,
    /// What the simulated kernel holds, per peer: `peer_keys` at the last KernelChanged.
    kernel: BTreeMap<NodeName, PeerKeys>,
    /// Inbound keys adopted per peer at the last restart (they may exceed the bound).
    adopted: BTreeMap<NodeName, usize>,
}

struct Sim {
    now: Instant,
    parties: Vec<Party>,
    /// Current session of each connected pair (lower index first).
    sessions: BTreeMap<(usize, usize), u64>,
    next_session: u64,
    in_flight: Vec<Wire>,
    /// Everything sent, for replays (only of sessions still current).
    log: Vec<Wire>,
    /// Sessions whose Hello the adversary dropped: only a new session recovers them
    /// (a real session that loses a frame ends).
    hello_dropped: BTreeSet<u64>,
    entropy_seed: u64,
    narrow_spis: bool,
    // What the checks remember.
    installed_inbound: HashSet<KeyBytes>,
    installed_outbound: HashSet<KeyBytes>,
    /// Key -> (receiver, sender, spi) for every inbound key ever installed.
    owner: HashMap<KeyBytes, (usize, usize, u32)>,
    /// Keys whose loss is allowed: the receiver's kernel was wiped (a reboot), or the
    /// receiver dropped an unacknowledged offer at MAX_INBOUND_PER_PEER.
    lost: HashSet<KeyBytes>,
    /// Newest outbound generation per (sender, sender boot, receiver).
    last_generation: HashMap<(usize, u64, usize), u64>,
    errors: usize,
}

fn bytes(key: &SaKey) -> KeyBytes {
    *key.expose()
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl Sim {
    fn new(n: usize, seed: u64, narrow_spis: bool) -> Sim {
        let names: Vec<NodeName> = (0..n).map(|i| name(&format!("node{i}"))).collect();
        let mut sim = Sim {
            now: Instant::now(),
            parties: vec![],
            sessions: BTreeMap::new(),
            next_session: 1,
            in_flight: vec![],
            log: vec![],
            hello_dropped: BTreeSet::new(),
            entropy_seed: seed | 1,
            narrow_spis,
            installed_inbound: HashSet::new(),
            installed_outbound: HashSet::new(),
            owner: HashMap::new(),
            lost: HashSet::new(),
            last_generation: HashMap::new(),
            errors: 0,
        };
        for me in &names {
            let sched = sim.schedule(&names, me);
            let boot = sched.boot_id();
            sim.parties.push(Party {
                name: me.clone(),
                boot,
                sched,
                kernel: BTreeMap::new(),
                adopted: BTreeMap::new(),
            });
        }
        sim
    }

    fn schedule(&mut self, names: &[NodeName], me: &NodeName) -> Schedule {
        self.entropy_seed = self
            .entropy_seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        // Boot ids are random (a restart may well have a lower epoch).
        let boot = self.entropy_seed.rotate_left(29) ^ self.entropy_seed;
        let entropy = TestEntropy {
            state: self.entropy_seed | 1,
            narrow: self.narrow_spis,
        };
        let mut s = Schedule::with_entropy(boot, ROTATION, Box::new(entropy));
        let others: Vec<NodeName> = names.iter().filter(|n| *n != me).cloned().collect();
        assert!(s.set_peers(&others, self.now).is_empty());
        s
    }

    fn names(&self) -> Vec<NodeName> {
        self.parties.iter().map(|p| p.name.clone()).collect()
    }

    fn index(&self, n: &NodeName) -> usize {
        self.parties.iter().position(|p| &p.name == n).unwrap()
    }

    /// Calls `f` on party `i`'s schedule (with its kernel's SPIs as taken) and performs
    /// the returned actions.
    fn call<F>(&mut self, i: usize, f: F)
    where
        F: FnOnce(&mut Schedule, Instant, &dyn Fn(u32) -> bool) -> Vec<Action>,
    {
        let before = self.offered_keys(i);
        let now = self.now;
        let Party { sched, kernel, .. } = &mut self.parties[i];
        let taken = |spi: u32| {
            kernel
                .values()
                .any(|k| k.inbound.iter().any(|d| d.spi == spi))
        };
        let actions = f(sched, now, &taken);
        self.perform(i, actions, &before);
    }

    /// Inbound (spi, key) of party `i` that are unacknowledged offers now.
    fn offered_keys(&self, i: usize) -> HashSet<KeyBytes> {
        let p = &self.parties[i];
        let mut out = HashSet::new();
        for peer in self.names() {
            let (Some(st), keys) = (p.sched.status(&peer), p.sched.peer_keys(&peer)) else {
                continue;
            };
            for (info, k) in st.inbound.iter().zip(&keys.inbound) {
                assert_eq!(info.spi, k.spi);
                if info.state == KeyState::Offered {
                    out.insert(bytes(&k.key));
                }
            }
        }
        out
    }

    fn perform(&mut self, i: usize, actions: Vec<Action>, offered_before: &HashSet<KeyBytes>) {
        let mut reconciled = false;
        for action in actions {
            match action {
                Action::KernelChanged => {
                    self.apply_kernel(i, offered_before);
                    reconciled = true;
                }
                Action::Send { peer, msg } => {
                    let to = self.index(&peer);
                    let me = &self.parties[i];
                    let held = me.kernel.get(&peer).cloned().unwrap_or_default();
                    // As the agent: a key message goes out only for a key the kernel
                    // holds. After a reconcile in the same batch, it must hold it (a
                    // new announcement); a retransmission without one is dropped when
                    // its key has been superseded.
                    let holds = match &msg {
                        Message::KeyOffer { spi, key, .. } => {
                            held.inbound.contains(&DirectionKey {
                                spi: *spi,
                                key: key.clone(),
                            })
                        }
                        Message::KeyAck { spi, .. } => held.outbound.iter().any(|k| k.spi == *spi),
                        _ => true,
                    };
                    if !holds {
                        assert!(
                            !reconciled,
                            "announced a key the kernel does not hold right after reconciling: {msg:?}"
                        );
                        continue;
                    }
                    if let Some(&session) = self.sessions.get(&pair(i, to)) {
                        let wire = Wire {
                            from: i,
                            to,
                            session,
                            msg,
                        };
                        self.in_flight.push(wire.clone());
                        self.log.push(wire);
                    }
                }
            }
        }
        self.check_generations(i);
    }

    /// Party `i` reconciles: its kernel becomes `peer_keys` of every peer. Checks that
    /// no key is installed twice and that removed offers are accounted for.
    fn apply_kernel(&mut self, i: usize, offered_before: &HashSet<KeyBytes>) {
        let names = self.names();
        let mut kernel = BTreeMap::new();
        for peer in names.iter().filter(|n| **n != self.parties[i].name) {
            kernel.insert(peer.clone(), self.parties[i].sched.peer_keys(peer));
        }
        let old = std::mem::replace(&mut self.parties[i].kernel, kernel.clone());
        for (peer, keys) in &kernel {
            let j = self.index(peer);
            let was = old.get(peer).cloned().unwrap_or_default();
            for k in keys.inbound.iter().filter(|k| !was.inbound.contains(k)) {
                assert!(
                    self.installed_inbound.insert(bytes(&k.key)),
                    "an inbound key installed twice"
                );
                self.owner.insert(bytes(&k.key), (i, j, k.spi));
            }
            for k in keys.outbound.iter().filter(|k| !was.outbound.contains(k)) {
                assert!(
                    self.installed_outbound.insert(bytes(&k.key)),
                    "an outbound key installed twice (nonce reuse)"
                );
                assert_eq!(
                    self.owner.get(&bytes(&k.key)),
                    Some(&(j, i, k.spi)),
                    "outbound key not generated by that receiver for this sender"
                );
            }
            for k in was.inbound.iter().filter(|k| !keys.inbound.contains(k)) {
                if offered_before.contains(&bytes(&k.key)) {
                    // Dropped at the bound while unacknowledged: allowed to be lost.
                    self.lost.insert(bytes(&k.key));
                }
            }
            let adopted = self.parties[i].adopted.get(peer).copied().unwrap_or(0);
            assert!(keys.inbound.len() <= MAX_INBOUND_PER_PEER.max(adopted + 1));
        }
        self.check_kernels();
    }

    /// (1) no loss and (4) unique SPIs, at this instant.
    fn check_kernels(&self) {
        for (i, p) in self.parties.iter().enumerate() {
            let mut spis = HashSet::new();
            for (peer, keys) in &p.kernel {
                for k in &keys.inbound {
                    assert!(k.spi >= MIN_SPI, "reserved spi");
                    assert!(spis.insert(k.spi), "spi 0x{:x} twice on {}", k.spi, p.name);
                }
                let j = self.index(peer);
                let theirs = self.parties[j]
                    .kernel
                    .get(&p.name)
                    .cloned()
                    .unwrap_or_default();
                for k in &keys.outbound {
                    assert!(
                        theirs.inbound.contains(k) || self.lost.contains(&bytes(&k.key)),
                        "{} sends with spi 0x{:x} which {} does not hold (party {i})",
                        p.name,
                        k.spi,
                        peer
                    );
                }
            }
        }
    }

    /// (5) the outbound generation never goes back for one receiver boot.
    fn check_generations(&mut self, i: usize) {
        for peer in self.names() {
            let Some(st) = self.parties[i].sched.status(&peer) else {
                continue;
            };
            let j = self.index(&peer);
            if let [k] = st.outbound.as_slice()
                && k.generation != 0
            {
                let slot = (i, self.parties[i].boot, j);
                if let Some(&last) = self.last_generation.get(&slot)
                    && last >> 32 == k.generation >> 32
                {
                    assert!(k.generation >= last, "outbound key went back a generation");
                }
                self.last_generation.insert(slot, k.generation);
            }
        }
    }

    fn connect(&mut self, a: usize, b: usize) {
        if a == b {
            return;
        }
        self.disconnect(a, b);
        let session = self.next_session;
        self.next_session += 1;
        self.sessions.insert(pair(a, b), session);
        let (na, nb) = (self.parties[a].name.clone(), self.parties[b].name.clone());
        self.call(a, |s, now, taken| s.on_connected(&nb, now, taken));
        self.call(b, |s, now, taken| s.on_connected(&na, now, taken));
    }

    fn disconnect(&mut self, a: usize, b: usize) {
        if let Some(session) = self.sessions.remove(&pair(a, b)) {
            self.in_flight.retain(|w| w.session != session);
            let (na, nb) = (self.parties[a].name.clone(), self.parties[b].name.clone());
            let now = self.now;
            self.parties[a].sched.on_disconnected(&nb, now);
            self.parties[b].sched.on_disconnected(&na, now);
        }
    }

    fn deliver(&mut self, index: usize) {
        if self.in_flight.is_empty() {
            return;
        }
        let w = self.in_flight.remove(index % self.in_flight.len());
        let from = self.parties[w.from].name.clone();
        let to = w.to;
        let before_dbg = format!("{:?}", self.parties[to].sched);
        let before_keys = self.parties[to].sched.peer_keys(&from);
        let mut result = Ok(());
        self.call(to, |s, now, taken| {
            match s.on_message(&from, w.msg, now, taken) {
                Ok(actions) => actions,
                Err(e) => {
                    result = Err(e);
                    vec![]
                }
            }
        });
        if result.is_err() {
            self.errors += 1;
            assert_eq!(format!("{:?}", self.parties[to].sched), before_dbg);
            assert_eq!(self.parties[to].sched.peer_keys(&from), before_keys);
        }
    }

    fn deliver_all(&mut self) {
        let mut budget = 10_000;
        while !self.in_flight.is_empty() {
            self.deliver(0);
            budget -= 1;
            assert!(budget > 0, "messages never stop");
        }
    }

    /// Moves the clock forward by `d`, polling every schedule at each wakeup.
    fn advance(&mut self, d: Duration) {
        let target = self.now + d;
        for _ in 0..100_000 {
            let next = self
                .parties
                .iter()
                .filter_map(|p| p.sched.next_wakeup())
                .min();
            match next {
                Some(t) if t <= target => {
                    self.now = self.now.max(t);
                    for i in 0..self.parties.len() {
                        if self.parties[i]
                            .sched
                            .next_wakeup()
                            .is_some_and(|t| t <= self.now)
                        {
                            self.call(i, |s, now, taken| s.poll(now, taken));
                        }
                    }
                }
                _ => {
                    self.now = target;
                    return;
                }
            }
        }
        panic!("poll does not move the next wakeup");
    }

    /// The agent of party `i` restarts with a new boot id: with its kernel (an agent
    /// restart: it adopts the SAs) or without (a reboot: the kernel is empty).
    fn restart(&mut self, i: usize, keep_kernel: bool) {
        for j in 0..self.parties.len() {
            if j != i
                && let Some(session) = self.sessions.remove(&pair(i, j))
            {
                self.in_flight.retain(|w| w.session != session);
                let (ni, now) = (self.parties[i].name.clone(), self.now);
                self.parties[j].sched.on_disconnected(&ni, now);
            }
        }
        let names = self.names();
        let me = self.parties[i].name.clone();
        let mut sched = self.schedule(&names, &me);
        let mut adopted = BTreeMap::new();
        if keep_kernel {
            for (peer, keys) in &self.parties[i].kernel {
                sched.adopt(peer, keys.inbound.clone(), keys.outbound.clone());
                assert_eq!(&sched.peer_keys(peer), keys, "adoption changed the kernel");
                adopted.insert(peer.clone(), keys.inbound.len());
            }
        } else {
            for keys in std::mem::take(&mut self.parties[i].kernel).values() {
                self.lost.extend(keys.inbound.iter().map(|k| bytes(&k.key)));
            }
        }
        self.parties[i].adopted = adopted;
        self.parties[i].boot = sched.boot_id();
        self.parties[i].sched = sched;
        self.check_kernels();
    }

    fn converged(&self) -> bool {
        if !self.in_flight.is_empty() {
            return false;
        }
        for (i, p) in self.parties.iter().enumerate() {
            for (j, q) in self.parties.iter().enumerate() {
                if i == j {
                    continue;
                }
                let (Some(mine), Some(st)) = (p.kernel.get(&q.name), p.sched.status(&q.name))
                else {
                    return false;
                };
                let theirs = q.kernel.get(&p.name).cloned().unwrap_or_default();
                let active = matches!(st.inbound.as_slice(), [k] if matches!(k.state, KeyState::Active { .. }));
                if !active || mine.inbound.len() != 1 || theirs.outbound != mine.inbound {
                    return false;
                }
            }
        }
        true
    }

    /// Restores every session (a new one where the adversary dropped a Hello), delivers
    /// in order and lets time pass until (2): one SA per direction, agreed by both ends.
    fn quiesce(&mut self) {
        let n = self.parties.len();
        for a in 0..n {
            for b in a + 1..n {
                let broken = self
                    .sessions
                    .get(&(a, b))
                    .is_none_or(|s| self.hello_dropped.contains(s));
                if broken {
                    self.connect(a, b);
                }
            }
        }
        for _ in 0..200 {
            self.deliver_all();
            if self.converged() {
                return;
            }
            self.advance(Duration::from_millis(500));
        }
        panic!("no convergence");
    }
}

#[derive(Clone, Debug)]
enum Op {
    Advance(u64),
    Deliver(usize),
    DeliverAll,
    Drop(usize),
    Duplicate(usize),
    Replay(usize),
    Rotate(usize, usize),
    RekeyInbound(usize, usize),
    Connect(usize, usize),
    Disconnect(usize, usize),
    Restart(usize, bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..8_000).prop_map(Op::Advance),
        8 => (0usize..4).prop_map(Op::Deliver),
        3 => any::<usize>().prop_map(Op::Deliver),
        3 => Just(Op::DeliverAll),
        2 => any::<usize>().prop_map(Op::Drop),
        1 => any::<usize>().prop_map(Op::Duplicate),
        1 => any::<usize>().prop_map(Op::Replay),
        3 => (0usize..3, 1usize..3).prop_map(|(a, b)| Op::Rotate(a, b)),
        1 => (0usize..3, 1usize..3).prop_map(|(a, b)| Op::RekeyInbound(a, b)),
        1 => (0usize..3, 1usize..3).prop_map(|(a, b)| Op::Connect(a, b)),
        1 => (0usize..3, 1usize..3).prop_map(|(a, b)| Op::Disconnect(a, b)),
        1 => (0usize..3, any::<bool>()).prop_map(|(a, k)| Op::Restart(a, k)),
    ]
}

impl Sim {
    fn run(&mut self, op: Op) {
        let n = self.parties.len();
        let other = |a: usize, off: usize| (a % n, (a + off) % n);
        match op {
            Op::Advance(ms) => self.advance(Duration::from_millis(ms)),
            Op::Deliver(i) => self.deliver(i),
            Op::DeliverAll => self.deliver_all(),
            Op::Drop(i) => {
                if !self.in_flight.is_empty() {
                    let w = self.in_flight.remove(i % self.in_flight.len());
                    if matches!(w.msg, Message::Hello { .. }) {
                        self.hello_dropped.insert(w.session);
                    }
                }
            }
            Op::Duplicate(i) => {
                if !self.in_flight.is_empty() {
                    let w = self.in_flight[i % self.in_flight.len()].clone();
                    self.in_flight.push(w);
                }
            }
            Op::Replay(i) => {
                let current: BTreeSet<u64> = self.sessions.values().copied().collect();
                let old: Vec<&Wire> = self
                    .log
                    .iter()
                    .filter(|w| current.contains(&w.session))
                    .collect();
                if !old.is_empty() {
                    let w = old[i % old.len()].clone();
                    self.in_flight.push(w);
                }
            }
            Op::Rotate(a, off) | Op::RekeyInbound(a, off) => {
                let (a, b) = other(a, off);
                if a != b {
                    let peer = self.parties[b].name.clone();
                    let rotate = matches!(op, Op::Rotate(..));
                    self.call(a, |s, now, taken| {
                        if rotate {
                            s.rotate(&peer, now, taken)
                        } else {
                            s.rekey_inbound(&peer, now, taken)
                        }
                    });
                }
            }
            Op::Connect(a, off) => {
                let (a, b) = other(a, off);
                self.connect(a, b);
            }
            Op::Disconnect(a, off) => {
                let (a, b) = other(a, off);
                self.disconnect(a, b);
            }
            Op::Restart(a, keep) => self.restart(a % n, keep),
        }
        self.check_kernels();
    }

    fn start(n: usize, seed: u64, narrow: bool) -> Sim {
        let mut sim = Sim::new(n, seed, narrow);
        for a in 0..n {
            for b in a + 1..n {
                sim.connect(a, b);
            }
        }
        sim
    }
}

#[test]
fn simulation_two_parties_converge_and_rotate_without_loss() {
    let mut sim = Sim::start(2, 1, false);
    sim.quiesce();
    let first = sim.parties[0].kernel.clone();
    // Periodic rotation happens on its own.
    sim.advance(ROTATION);
    sim.quiesce();
    assert_ne!(sim.parties[0].kernel, first);
    assert_eq!(sim.errors, 0);
    assert!(sim.lost.is_empty());
}

#[test]
fn simulation_concurrent_rotations_converge() {
    let mut sim = Sim::start(3, 2, false);
    sim.quiesce();
    let since = sim.now;
    // (7) Both ends of every pair rotate at once, before any message is delivered.
    for a in 0..3 {
        for off in 1..3 {
            sim.run(Op::Rotate(a, off));
        }
    }
    sim.quiesce();
    for p in &sim.parties {
        for q in &sim.parties {
            if p.name != q.name {
                assert!(p.sched.rotated_since(&q.name, since));
            }
        }
    }
    assert_eq!(sim.errors, 0);
}

#[test]
fn simulation_restarted_agent_adopts_and_rekeys_without_loss() {
    let mut sim = Sim::start(3, 3, false);
    sim.quiesce();
    let old: Vec<KeyBytes> = sim.parties[1]
        .kernel
        .values()
        .flat_map(|k| k.inbound.iter().chain(&k.outbound).map(|d| bytes(&d.key)))
        .collect();
    // (6) Agent restart: the kernel keeps its SAs; no loss at any instant (checked).
    sim.restart(1, true);
    sim.advance(Duration::from_secs(30));
    sim.quiesce();
    assert!(sim.lost.is_empty());
    let now: Vec<KeyBytes> = sim
        .parties
        .iter()
        .flat_map(|p| p.kernel.values())
        .flat_map(|k| k.inbound.iter().chain(&k.outbound).map(|d| bytes(&d.key)))
        .collect();
    assert!(old.iter().all(|k| !now.contains(k)), "stale keys remain");
}

#[test]
fn simulation_rebooted_peer_gets_fresh_keys_and_survivors_drop_stale_ones() {
    let mut sim = Sim::start(2, 4, false);
    sim.quiesce();
    let survivor_old = sim.parties[0].kernel.clone();
    // (6) A reboot: new boot id, empty schedule, empty kernel.
    sim.restart(1, false);
    assert!(sim.parties[1].kernel.is_empty());
    sim.advance(Duration::from_secs(10));
    sim.connect(0, 1);
    sim.quiesce();
    let survivor = &sim.parties[0].kernel[&sim.parties[1].name];
    let old = &survivor_old[&sim.parties[1].name];
    assert!(survivor.inbound.iter().all(|k| !old.inbound.contains(k)));
    assert!(survivor.outbound.iter().all(|k| !old.outbound.contains(k)));
}

#[test]
fn simulation_spis_stay_unique_when_random_values_collide() {
    for seed in 0..20 {
        let mut sim = Sim::start(3, seed, true);
        for round in 0..20 {
            sim.run(Op::Rotate(round % 3, 1 + round % 2));
            sim.run(Op::Deliver(round));
            sim.run(Op::Advance(1_000));
        }
        sim.quiesce();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any schedule of deliveries, losses, duplicates, replays, reorderings, rotations,
    /// reconnects and restarts: (1) no loss, (3) no key installed twice, (4) unique
    /// SPIs and (5) no generation going back at every step, (2) convergence after.
    #[test]
    fn simulation_under_an_adversary(
        three in any::<bool>(),
        seed in any::<u64>(),
        narrow in proptest::bool::weighted(0.2),
        ops in proptest::collection::vec(op(), 0..80),
    ) {
        let mut sim = Sim::start(if three { 3 } else { 2 }, seed, narrow);
        for op in ops {
            sim.run(op);
        }
        sim.quiesce();
    }
}

#[test]
fn a_forgotten_peer_starts_over_without_its_keys() {
    let t0 = Instant::now();
    let b = name("b");
    let key = |spi| DirectionKey {
        spi,
        key: SaKey::generate().unwrap(),
    };
    let mut s = Schedule::new(5, ROTATION);
    s.set_peers(std::slice::from_ref(&b), t0);
    s.adopt(&b, vec![key(0x1000)], vec![key(0x2000)]);
    assert_eq!(s.forget(&b), vec![Action::KernelChanged]);
    assert!(s.status(&b).is_none());
    // Back in the spec (at its new address): known again, with no keys at all.
    s.set_peers(std::slice::from_ref(&b), t0);
    assert_eq!(s.peer_keys(&b), PeerKeys::default());
    // Forgetting a peer without keys changes nothing in the kernel.
    assert_eq!(s.forget(&b), vec![]);
    assert_eq!(s.forget(&name("stranger")), vec![]);
}

/// A peer dropped from the schedule (forgotten after an address change, or out of the
/// spec and back) is offered generations that continue where they were: its agent,
/// still running, remembers the newest generation it accepted from us in this boot and
/// ignores anything not newer, so starting over at 1 left that direction without keys.
#[test]
fn a_peer_that_comes_back_gets_newer_generations_than_before() {
    let t0 = Instant::now();
    let (mut s, b, first) = connected(1, 2, t0);
    let mut newest = first.0;
    for _ in 0..3 {
        let actions = s.rotate(&b, t0, &free);
        newest = newest.max(offer_of(&actions).0);
    }
    // The peer accepts an offer only if newer than `newest` (same boot: same epoch).
    let next_offer = |s: &mut Schedule| {
        s.on_disconnected(&b, t0);
        offer_of(&s.on_connected(&b, t0, &free)).0
    };
    s.forget(&b);
    s.set_peers(std::slice::from_ref(&b), t0);
    let after_forget = next_offer(&mut s);
    assert!(after_forget > newest, "{after_forget:#x} after {newest:#x}");
    s.set_peers(&[], t0);
    s.set_peers(std::slice::from_ref(&b), t0);
    let after_removal = next_offer(&mut s);
    assert!(
        after_removal > after_forget,
        "{after_removal:#x} after {after_forget:#x}"
    );
    assert_eq!(after_removal >> 32, first.0 >> 32, "same epoch");
}
