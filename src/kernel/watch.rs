//! A kernel view kept true by the kernel's change notifications, so that a reconcile
//! pass on a quiet kernel does not read every object again.
//!
//! At 1000 peers a full read ([`super::Kernel::dump`]) is ~6000 objects and ~1.7 MB of
//! replies; most agent passes find nothing changed. The kernel announces every change
//! to the objects we model on multicast groups: links, addresses and neighbour/FDB
//! entries (rtnetlink), XFRM states and policies, their flushes and their expiry
//! (xfrm). A [`Watch`] listens on those groups and keeps the last full read; the next
//! read reuses it only when *nothing at all* arrived since (any notification, of any
//! object, ours or not, invalidates it), when no notification was lost (a socket
//! overrun, `ENOBUFS`) and when it is younger than [`MAX_AGE`] (a full read now and
//! then, whatever the notifications say).
//!
//! Ordering: the sockets are drained *before* a full read starts, so a change made
//! while the read runs is still waiting in a socket afterwards and invalidates what
//! was read.
//!
//! One kind of notification is let pass: neighbour entries of IPv4/IPv6 (ARP and
//! neighbour discovery). They share the group with the bridge FDB entries we model,
//! and an underlay neighbour changes state at every dial of an absent peer, so each
//! would otherwise force a full read of thousands of objects.

use std::io;
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant};

use netlink_sys::{Socket, SocketAddr, constants};
use zeroize::Zeroize as _;

use crate::state::KernelState;

/// The longest a kept view is reused without a full read.
pub const MAX_AGE: Duration = Duration::from_secs(300);

// rtnetlink groups (RTMGRP_*: 1 << (RTNLGRP_* - 1)).
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;

/// An xfrm group's bit.
const fn xfrm_group(group: u32) -> u32 {
    1 << (group - 1)
}

/// XFRMNLGRP_EXPIRE, _SA, _POLICY: expiry (a hard expiry deletes the state without a
/// DELSA), state and policy changes including flushes.
pub(super) const XFRM_GROUPS: u32 = xfrm_group(netlink_packet_xfrm::constants::XFRMNLGRP_EXPIRE)
    | xfrm_group(netlink_packet_xfrm::constants::XFRMNLGRP_SA)
    | xfrm_group(netlink_packet_xfrm::constants::XFRMNLGRP_POLICY);

/// Whether a [`Watch`] answered a read from its kept view.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchStats {
    /// Reads answered from the kept view.
    pub reused: u64,
    /// Full reads.
    pub full: u64,
}

pub(super) struct Watch {
    route: Socket,
    xfrm: Socket,
    kept: Option<(KernelState, Instant)>,
    stats: WatchStats,
}

impl Watch {
    /// Opens both notification sockets in the calling thread's network namespace.
    pub fn open() -> io::Result<Watch> {
        let open = |protocol, groups| -> io::Result<Socket> {
            let mut socket = Socket::new(protocol)?;
            socket.bind(&SocketAddr::new(0, groups))?;
            socket.set_non_blocking(true)?;
            Ok(socket)
        };
        Ok(Watch {
            route: open(
                constants::NETLINK_ROUTE,
                RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR,
            )?,
            xfrm: open(constants::NETLINK_XFRM, XFRM_GROUPS)?,
            kept: None,
            stats: WatchStats::default(),
        })
    }

    /// The kept view, if it is still the kernel's; otherwise `None`, and the kept view
    /// is dropped. Either way every pending notification has been read: a full read
    /// that starts now misses no change made after it starts.
    pub fn reuse(&mut self) -> Option<KernelState> {
        // Both sockets drained, whatever the first one says.
        let route_quiet = drain(&self.route, models_route_change);
        let xfrm_quiet = drain(&self.xfrm, |_| true);
        let fresh = self
            .kept
            .as_ref()
            .is_some_and(|(_, read_at)| read_at.elapsed() < MAX_AGE);
        if route_quiet && xfrm_quiet && fresh {
            self.stats.reused += 1;
            return self.kept.as_ref().map(|(state, _)| state.clone());
        }
        self.kept = None;
        None
    }

    /// Keeps `state`, a full read that started after the last [`Watch::reuse`].
    pub fn keep(&mut self, state: &KernelState, started: Instant) {
        self.stats.full += 1;
        self.kept = Some((state.clone(), started));
    }

    pub fn stats(&self) -> WatchStats {
        self.stats
    }
}

/// Whether an rtnetlink notification, of which `head` holds up to the first
/// [`HEAD_LEN`] bytes, may concern an object we model: anything but an IPv4/IPv6
/// neighbour entry (the FDB entries we model are `AF_BRIDGE` neighbours).
fn models_route_change(head: &[u8]) -> bool {
    let kind = head.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let neighbour = matches!(kind, Some(libc::RTM_NEWNEIGH | libc::RTM_DELNEIGH));
    let family = head.get(16).map(|f| i32::from(*f));
    !(neighbour && matches!(family, Some(libc::AF_INET | libc::AF_INET6)))
}

/// The netlink header and the first byte of the body (a neighbour's family).
const HEAD_LEN: usize = 17;

/// Reads every pending datagram of `socket`; true when none of them was `relevant` and
/// there was no error (an overrun, `ENOBUFS`, means notifications were lost: not quiet).
pub(super) fn drain(socket: &Socket, relevant: fn(&[u8]) -> bool) -> bool {
    let mut quiet = true;
    // Only the head is read (MSG_TRUNC discards the rest of the datagram); an SA
    // notification carries a key far past it, which is never copied here.
    let mut head = [0u8; HEAD_LEN];
    let mut errors = 0;
    loop {
        // SAFETY: `head` is valid for writes of its length for the call.
        let rc = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                head.as_mut_ptr().cast(),
                head.len(),
                libc::MSG_TRUNC | libc::MSG_DONTWAIT,
            )
        };
        if let Ok(len) = usize::try_from(rc) {
            // With MSG_TRUNC, `len` is the datagram's length, not what was copied.
            if relevant(&head[..len.min(HEAD_LEN)]) {
                quiet = false;
            }
            continue;
        }
        match io::Error::last_os_error().kind() {
            io::ErrorKind::WouldBlock => break,
            io::ErrorKind::Interrupted => {}
            // ENOBUFS (notifications were lost; reported once, then the queue goes on)
            // or anything else: assume a change. A persistent error must not spin.
            _ => {
                quiet = false;
                errors += 1;
                if errors > 8 {
                    break;
                }
            }
        }
    }
    head.zeroize();
    quiet
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A notification's head: a netlink header of `kind` and a body starting with `family`.
    fn head(kind: u16, family: u8) -> Vec<u8> {
        let mut h = vec![0u8; HEAD_LEN];
        h[4..6].copy_from_slice(&kind.to_ne_bytes());
        h[16] = family;
        h
    }

    #[test]
    fn only_arp_and_nd_entries_are_let_pass() {
        let (inet, inet6, bridge) = (
            libc::AF_INET as u8,
            libc::AF_INET6 as u8,
            libc::AF_BRIDGE as u8,
        );
        for kind in [libc::RTM_NEWNEIGH, libc::RTM_DELNEIGH] {
            assert!(!models_route_change(&head(kind, inet)));
            assert!(!models_route_change(&head(kind, inet6)));
            assert!(models_route_change(&head(kind, bridge)), "an FDB entry");
        }
        // Links and addresses of any family count.
        for kind in [libc::RTM_NEWLINK, libc::RTM_DELLINK, libc::RTM_NEWADDR] {
            assert!(models_route_change(&head(kind, inet)));
        }
        // A notification too short to tell counts as a change.
        assert!(models_route_change(&head(libc::RTM_NEWNEIGH, inet)[..16]));
        assert!(models_route_change(&[]));
    }
}
