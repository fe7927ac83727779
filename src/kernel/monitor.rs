//! Kernel events the agent reacts to without waiting for its periodic pass: link and
//! address changes (drift: a device deleted or changed by hand) and XFRM expiry (an SA
//! reached its soft lifetime: time to rekey).
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

/// Sends `()` for every link or address change in this namespace.
pub fn link_events() -> Result<mpsc::UnboundedReceiver<()>, KernelError> {
    let (mut conn, _handle, mut messages) =
        rtnetlink::new_connection().map_err(KernelError::Connect)?;
    let groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR;
    conn.socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, groups))
        .map_err(KernelError::Connect)?;
    tokio::spawn(conn);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while messages.next().await.is_some() {
            if tx.send(()).is_err() {
                break;
            }
        }
    });
    Ok(rx)
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
