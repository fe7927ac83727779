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
const XFRM_GROUPS: u32 = xfrm_group(netlink_packet_xfrm::constants::XFRMNLGRP_EXPIRE)
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
        let route_quiet = drain(&self.route);
        let xfrm_quiet = drain(&self.xfrm);
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

/// Reads every pending datagram of `socket`; true when there was none and no error
/// (an overrun, `ENOBUFS`, means notifications were lost: not quiet).
fn drain(socket: &Socket) -> bool {
    let mut quiet = true;
    // Only the netlink header is read (MSG_TRUNC discards the rest of the datagram);
    // the content does not matter, only that something arrived. An SA notification
    // carries a key past the header: it is never copied here.
    let mut header = [0u8; 16];
    let mut errors = 0;
    loop {
        // SAFETY: `header` is valid for writes of its length for the call.
        let rc = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                header.as_mut_ptr().cast(),
                header.len(),
                libc::MSG_TRUNC | libc::MSG_DONTWAIT,
            )
        };
        if rc >= 0 {
            quiet = false;
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
    header.zeroize();
    quiet
}
