//! Kernel events the agent reacts to without waiting for its periodic pass: link,
//! address and XFRM changes (drift: a device deleted or changed by hand, a policy
//! flushed by another tool) and XFRM expiry (an SA reached its soft lifetime: time to
//! rekey).
//!
//! Each monitor is its own netlink socket, bound to the multicast groups first: an
//! unbound socket receives no multicast (see shared/notes/rust-netlink-xfrm.md).

use std::net::IpAddr;

use futures::StreamExt as _;
use netlink_packet_core::NetlinkPayload;
use netlink_packet_xfrm::XfrmMessage;
use netlink_sys::{AsyncSocket as _, SocketAddr};
use tokio::sync::mpsc;

use super::KernelError;

const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
const XFRMGRP_EXPIRE: u32 = 1 << (netlink_packet_xfrm::constants::XFRMNLGRP_EXPIRE - 1);

/// An SA reached a lifetime limit. Carries no key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SaExpired {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub spi: u32,
    pub hard: bool,
}

/// The rtnetlink messages of these multicast groups (a socket bound to them).
type RouteMessages = futures::channel::mpsc::UnboundedReceiver<(
    netlink_packet_core::NetlinkMessage<netlink_packet_route::RouteNetlinkMessage>,
    SocketAddr,
)>;

fn route_monitor(groups: u32) -> Result<RouteMessages, KernelError> {
    let (mut conn, _handle, messages) =
        rtnetlink::new_connection().map_err(KernelError::Connect)?;
    conn.socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, groups))
        .map_err(KernelError::Connect)?;
    tokio::spawn(conn);
    Ok(messages)
}

/// Sends `()` for every link or address change in this namespace, and for every change
/// of XFRM states and policies (ours or not: another tool's `ip xfrm policy flush`
/// takes our enforcement away, and must be repaired at once, not at the next periodic
/// pass).
pub fn change_events() -> Result<mpsc::UnboundedReceiver<()>, KernelError> {
    let mut messages = route_monitor(RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)?;
    let (tx, rx) = mpsc::unbounded_channel();
    let links = tx.clone();
    tokio::spawn(async move {
        while messages.next().await.is_some() {
            if links.send(()).is_err() {
                break;
            }
        }
    });
    spawn_xfrm_changes(tx)?;
    Ok(rx)
}

/// Follows XFRM state and policy notifications (and expiry: a hard expiry deletes a
/// state without a DELSA). Only each notification's head is read (`watch::drain`): SA
/// notifications carry keys, which are never copied here.
fn spawn_xfrm_changes(tx: mpsc::UnboundedSender<()>) -> Result<(), KernelError> {
    let mut socket = netlink_sys::Socket::new(netlink_sys::constants::NETLINK_XFRM)
        .map_err(KernelError::Connect)?;
    socket
        .bind(&SocketAddr::new(0, super::watch::XFRM_GROUPS))
        .map_err(KernelError::Connect)?;
    socket
        .set_non_blocking(true)
        .map_err(KernelError::Connect)?;
    // SAFETY: the `Socket` owns its descriptor and closes it only when dropped, which
    // happens with the `AsyncFd` (it is never taken out or replaced).
    let socket = unsafe { tokio::io::unix::AsyncFd::register(socket) }
        .map_err(|e| KernelError::Connect(e.into()))?;
    tokio::spawn(async move {
        loop {
            let Ok(mut ready) = socket.readable().await else {
                break;
            };
            let quiet = super::watch::drain(socket.get_ref(), |_| true);
            ready.clear_ready();
            if !quiet && tx.send(()).is_err() {
                break;
            }
        }
    });
    Ok(())
}

/// Sends every XFRM expire event of this namespace (ours or not: the receiver filters).
pub fn sa_expiry_events() -> Result<mpsc::UnboundedReceiver<SaExpired>, KernelError> {
    let (mut conn, _handle, mut messages) =
        xfrmnetlink::new_connection().map_err(KernelError::Connect)?;
    conn.socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, XFRMGRP_EXPIRE))
        .map_err(KernelError::Connect)?;
    tokio::spawn(conn);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            let NetlinkPayload::InnerMessage(XfrmMessage::Expire(expire)) = msg.payload else {
                continue;
            };
            let Some(event) = super::xfrm::expire_event(&expire) else {
                continue;
            };
            if tx.send(event).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

const RTMGRP_NEIGH: u32 = 0x4;
/// At most this many learned entries are followed (then the record starts over).
const LEARNED_TRACKED_MAX: usize = 1 << 16;

/// Follows what our VXLAN devices learn, and when a MAC moves from one remote to
/// another (a workload migrated between nodes, two nodes swapped addresses), flushes
/// the namespace's cached routes for that address family.
///
/// The kernel moves the learned entry in place but keeps its cached route, which on an
/// encrypted network is the XFRM bundle of the *old* peer's SA: frames would go to the
/// new peer under the old peer's SPI (dropped there as `XfrmInNoStates`) until that SA
/// is replaced. A flush makes the next frame look its route, and its SA, up again.
/// Nothing else is touched; the flush is the kernel's ordinary `route/flush`.
pub fn spawn_learned_move_guard() -> Result<(), KernelError> {
    let mut messages = route_monitor(RTMGRP_NEIGH)?;
    tokio::spawn(async move {
        use netlink_packet_route::RouteNetlinkMessage;
        let mut learned: std::collections::HashMap<(u32, Vec<u8>), IpAddr> =
            std::collections::HashMap::new();
        while let Some((msg, _)) = messages.next().await {
            let (gone, m) = match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(m)) => (false, m),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(m)) => (true, m),
                _ => continue,
            };
            let Some((index, mac, remote)) = learned_remote(&m) else {
                continue;
            };
            if !is_ours(index) {
                continue;
            }
            let key = (index, mac);
            if gone {
                learned.remove(&key);
                continue;
            }
            if learned.len() >= LEARNED_TRACKED_MAX && !learned.contains_key(&key) {
                learned.clear();
            }
            if let Some(before) = learned.insert(key, remote)
                && before != remote
            {
                let path = if remote.is_ipv6() {
                    "/proc/sys/net/ipv6/route/flush"
                } else {
                    "/proc/sys/net/ipv4/route/flush"
                };
                match std::fs::write(path, "1") {
                    Ok(()) => tracing::info!(%before, now = %remote,
                        "a MAC moved to another remote on a VXLAN device of ours; cached routes flushed"),
                    Err(e) => tracing::warn!(error = %e, path,
                        "a MAC moved to another remote, but the cached routes cannot be flushed"),
                }
            }
        }
    });
    Ok(())
}

/// A bridge-family entry a device learned (its own, not permanent, with a MAC and a
/// remote): its device index, MAC and remote.
fn learned_remote(
    m: &netlink_packet_route::neighbour::NeighbourMessage,
) -> Option<(u32, Vec<u8>, IpAddr)> {
    use netlink_packet_route::AddressFamily;
    use netlink_packet_route::neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState,
    };
    if m.header.family != AddressFamily::Bridge
        || !m.header.flags.contains(NeighbourFlags::Own)
        || matches!(
            m.header.state,
            NeighbourState::Permanent | NeighbourState::Noarp
        )
    {
        return None;
    }
    let mut mac = None;
    let mut remote = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::LinkLayerAddress(l) if l.iter().any(|b| *b != 0) => {
                mac = Some(l.clone());
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                remote = Some(IpAddr::V4(*ip));
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                remote = Some(IpAddr::V6(*ip));
            }
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                remote = <[u8; 4]>::try_from(b.as_slice())
                    .map(IpAddr::from)
                    .ok()
                    .or_else(|| <[u8; 16]>::try_from(b.as_slice()).map(IpAddr::from).ok());
            }
            _ => {}
        }
    }
    Some((m.header.ifindex, mac?, remote?))
}

/// Whether the device with this index is one of our VXLAN devices (by name: the alias
/// is not in neighbour messages, and a name look-up is one system call).
fn is_ours(index: u32) -> bool {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `name` has room for IF_NAMESIZE bytes, as if_indextoname requires.
    let found = unsafe { libc::if_indextoname(index, name.as_mut_ptr()) };
    if found.is_null() {
        return false;
    }
    // SAFETY: on success the kernel's name, NUL-terminated within IF_NAMESIZE, is there.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    name.to_bytes()
        .starts_with(crate::state::ownership::VXLAN_PREFIX.as_bytes())
}
