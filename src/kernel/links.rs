//! Links, bridges, VXLAN devices, addresses and FDB entries over rtnetlink.
//!
//! - [`dump`]: what the controller owns, from one link dump, one address dump and one
//!   bridge FDB dump (never one request per link);
//! - [`execute`]: one [`Change`] of a plan;
//! - [`underlay_for`] / [`local_addresses`]: which local interface holds an address.
//!
//! Ownership follows [`crate::state::ownership`]: a link is ours when its name has one
//! of our prefixes *and* its alias starts with `ovl-controller`.
//!
//! Creating a link is two requests: the kernel ignores `IFLA_IFALIAS` in the
//! `RTM_NEWLINK` that creates a device (checked on 6.18; `rtnl_create_link` never looks
//! at it), so the alias is set right after. If the process dies in between, a link with
//! our name and no alias is left behind; the next `CreateLink` of exactly that link
//! (same kind, parameters, MTU and master, still down) adopts it by setting the alias,
//! anything else with that name is reported as a [`KernelError::ForeignLink`].

mod dump;

use std::net::IpAddr;

use futures::{StreamExt, TryStreamExt};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVxlan};

pub use dump::{dump, local_addresses, underlay_for};

use super::KernelError;
use crate::plan::Change;
use crate::state::{Address, FdbEntry, IfName, Link, LinkKind};

const EEXIST: i32 = libc::EEXIST;
const ENODEV: i32 = libc::ENODEV;

/// Runs one link, address or FDB change. XFRM changes are refused with
/// [`KernelError::Unsupported`].
pub async fn execute(route: &rtnetlink::Handle, change: &Change) -> Result<(), KernelError> {
    let op = change.to_string();
    match change {
        Change::CreateLink(link) => create_link(route, link, &op).await,
        Change::DeleteLink(link) => {
            let msg = LinkUnspec::new_with_name(link.name.as_str()).build();
            let result = route.link().del_with_message(msg).execute().await;
            result.map_err(|e| refused(&op, e))
        }
        Change::SetMtu { link, to, .. } => {
            change_link(
                route,
                &op,
                LinkUnspec::new_with_name(link.as_str()).mtu(*to),
            )
            .await
        }
        Change::SetMaster { link, to, .. } => {
            // IFLA_MASTER 0 is `nomaster`.
            let master = match to {
                Some(m) => index_of(route, m, &op).await?,
                None => 0,
            };
            let msg = LinkUnspec::new_with_name(link.as_str()).controller(master);
            change_link(route, &op, msg).await
        }
        Change::SetAlias { link, to, .. } => {
            change_link(
                route,
                &op,
                LinkUnspec::new_with_name(link.as_str()).alias(to),
            )
            .await
        }
        Change::SetUp { link } => {
            change_link(route, &op, LinkUnspec::new_with_name(link.as_str()).up()).await
        }
        Change::AddAddress(a) => add_address(route, a, &op).await,
        Change::DeleteAddress(a) => delete_address(route, a, &op).await,
        Change::AddFdb(e) => add_fdb(route, e, &op).await,
        Change::DeleteFdb(e) => delete_fdb(route, e, &op).await,
        Change::PutPolicy { .. }
        | Change::DeletePolicy(_)
        | Change::AddSa(_)
        | Change::DeleteSa(_) => Err(KernelError::Unsupported {
            operation: op,
            executor: "link",
        }),
    }
}

/// Creates the link down, with MTU and master, then marks it as ours with the alias.
async fn create_link(route: &rtnetlink::Handle, link: &Link, op: &str) -> Result<(), KernelError> {
    let master = match &link.master {
        Some(m) => Some(index_of(route, m, op).await?),
        None => None,
    };
    let msg = match &link.kind {
        LinkKind::Bridge => {
            // Not `LinkBridge::new`, which also sets the bridge up.
            let b = LinkMessageBuilder::<LinkBridge>::new(link.name.as_str()).mtu(link.mtu);
            match master {
                Some(m) => b.controller(m).build(),
                None => b.build(),
            }
        }
        LinkKind::Vxlan(p) => {
            let dev = index_of(route, &p.underlay, op).await?;
            let b = LinkVxlan::new(link.name.as_str(), p.vni)
                .dev(dev)
                .port(p.port)
                // Learning fills the FDB with remote MACs from received packets; the
                // all-zero entries added by the plan do the flooding.
                .learning(true)
                .mtu(link.mtu);
            let b = match p.local {
                // IPv4 VXLAN sends a zero UDP checksum by default (RFC 7348 allows
                // either); checksums are cheap with offload and catch underlay
                // corruption that Ethernet-in-UDP would otherwise pass on. IPv6 always
                // checksums unless udp6zerocsumtx is set, which we never do.
                IpAddr::V4(a) => b.local(a).udp_csum(true),
                IpAddr::V6(a) => b.local6(a),
            };
            match master {
                Some(m) => b.controller(m).build(),
                None => b.build(),
            }
        }
    };
    match route.link().add(msg).execute().await {
        Ok(()) => {}
        Err(e) if errno(&e) == Some(EEXIST) => return adopt_half_created(route, link, op).await,
        Err(e) => return Err(refused(op, e)),
    }
    let alias = LinkUnspec::new_with_name(link.name.as_str()).alias(&link.alias);
    if let Err(err) = change_link(route, op, alias).await {
        // Do not leave a link that the next dump would take for a foreign one.
        let del = LinkUnspec::new_with_name(link.name.as_str()).build();
        if let Err(e) = route.link().del_with_message(del).execute().await {
            tracing::warn!(link = %link.name, error = %e, "cannot remove the link whose alias could not be set");
        }
        return Err(err);
    }
    Ok(())
}

/// `CreateLink` found a link with that name: adopt it only when it is exactly what an
/// interrupted `create_link` leaves behind (no alias, same kind and parameters, same
/// MTU and master, down).
async fn adopt_half_created(
    route: &rtnetlink::Handle,
    link: &Link,
    op: &str,
) -> Result<(), KernelError> {
    let found = dump::all_links(route)
        .await?
        .into_iter()
        .find(|l| l.name == link.name.as_str());
    let foreign = |reason: String| KernelError::ForeignLink {
        operation: op.to_owned(),
        link: link.name.to_string(),
        reason,
    };
    let Some(found) = found else {
        return Err(foreign("it vanished while being looked at".to_owned()));
    };
    if found.is_owned() {
        // Ours already (the plan should have seen it): the kernel's answer stands.
        return Err(KernelError::Refused {
            operation: op.to_owned(),
            source: std::io::Error::from_raw_os_error(EEXIST),
        });
    }
    if let Some(alias) = &found.alias {
        return Err(foreign(format!("its alias is {alias:?}")));
    }
    let matches = found.kind.as_ref() == Some(&link.kind)
        && found.mtu == link.mtu
        && found.master == link.master
        && !found.up;
    if !matches {
        return Err(foreign(format!(
            "it has no alias but differs from the link to create: kind {:?}, mtu {}, master {:?}, up {}",
            found.kind, found.mtu, found.master, found.up
        )));
    }
    tracing::warn!(link = %link.name, "adopting a link left without alias by an interrupted create");
    change_link(
        route,
        op,
        LinkUnspec::new_with_name(link.name.as_str()).alias(&link.alias),
    )
    .await
}

/// `ip link set`: RTM_NEWLINK without NLM_F_CREATE, the link found by name.
async fn change_link(
    route: &rtnetlink::Handle,
    op: &str,
    msg: LinkMessageBuilder<LinkUnspec>,
) -> Result<(), KernelError> {
    route
        .link()
        .change(msg.build())
        .execute()
        .await
        .map_err(|e| refused(op, e))
}

/// The index of a link by name.
async fn index_of(route: &rtnetlink::Handle, name: &IfName, op: &str) -> Result<u32, KernelError> {
    let mut links = route.link().get().match_name(name.as_str()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(msg.header.index),
        Ok(None) => Err(KernelError::LinkNotFound {
            operation: op.to_owned(),
            link: name.to_string(),
        }),
        Err(e) if errno(&e) == Some(ENODEV) => Err(KernelError::LinkNotFound {
            operation: op.to_owned(),
            link: name.to_string(),
        }),
        Err(e) => Err(refused(op, e)),
    }
}

async fn add_address(route: &rtnetlink::Handle, a: &Address, op: &str) -> Result<(), KernelError> {
    let index = index_of(route, &a.link, op).await?;
    // NLM_F_REPLACE: an address already on the bridge with a finite lifetime (not one
    // of ours, so not in the dump) becomes a permanent one instead of failing with
    // EEXIST on every apply.
    let request = route
        .address()
        .add(index, a.addr.addr(), a.addr.prefix_len())
        .replace();
    request.execute().await.map_err(|e| refused(op, e))
}

async fn delete_address(
    route: &rtnetlink::Handle,
    a: &Address,
    op: &str,
) -> Result<(), KernelError> {
    let index = index_of(route, &a.link, op).await?;
    let msg = match a.addr.addr() {
        IpAddr::V4(ip) => rtnetlink::AddressMessageBuilder::<std::net::Ipv4Addr>::new()
            .index(index)
            .address(ip, a.addr.prefix_len())
            .build(),
        IpAddr::V6(ip) => rtnetlink::AddressMessageBuilder::<std::net::Ipv6Addr>::new()
            .index(index)
            .address(ip, a.addr.prefix_len())
            .build(),
    };
    route
        .address()
        .del(msg)
        .execute()
        .await
        .map_err(|e| refused(op, e))
}

/// The bridge-family neighbour message of a head-end replication entry:
/// `00:00:00:00:00:00 dst REMOTE self permanent` on the VXLAN device.
fn fdb_message(index: u32, remote: IpAddr) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    // NTF_SELF only: the entry belongs to the VXLAN device's own FDB, not to the
    // bridge it is a port of (no flag at all would go to the bridge).
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(vec![0; 6]));
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::from(
            remote,
        )));
    msg
}

/// `bridge fdb append`: the neighbour request of rtnetlink only offers EXCL or REPLACE,
/// and REPLACE would overwrite the previous all-zero entry instead of adding a remote,
/// so NLM_F_APPEND is set by hand.
async fn add_fdb(route: &rtnetlink::Handle, e: &FdbEntry, op: &str) -> Result<(), KernelError> {
    let index = index_of(route, &e.link, op).await?;
    let msg = RouteNetlinkMessage::NewNeighbour(fdb_message(index, e.remote));
    match request_ack(
        route,
        msg,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND,
    )
    .await
    {
        Err(err) if errno(&err) == Some(EEXIST) => Ok(()),
        other => other.map_err(|err| refused(op, err)),
    }
}

/// Deletes only the remote `e.remote` of the all-zero entry (the kernel keeps the
/// others).
async fn delete_fdb(route: &rtnetlink::Handle, e: &FdbEntry, op: &str) -> Result<(), KernelError> {
    let index = index_of(route, &e.link, op).await?;
    let msg = RouteNetlinkMessage::DelNeighbour(fdb_message(index, e.remote));
    request_ack(route, msg, NLM_F_REQUEST | NLM_F_ACK)
        .await
        .map_err(|err| refused(op, err))
}

/// Sends one request with the given header flags and waits for its ACK.
async fn request_ack(
    route: &rtnetlink::Handle,
    msg: RouteNetlinkMessage,
    flags: u16,
) -> Result<(), rtnetlink::Error> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = flags;
    let mut response = route.clone().request(req)?;
    while let Some(answer) = response.next().await {
        if let NetlinkPayload::Error(err) = answer.payload {
            return Err(rtnetlink::Error::NetlinkError(err));
        }
    }
    Ok(())
}

/// The errno of a request the kernel refused.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => Some(msg.raw_code().abs()),
        _ => None,
    }
}

/// A kernel refusal keeps its errno; anything else (connection gone, undecodable answer)
/// becomes [`KernelError::Netlink`].
fn refused(op: &str, e: rtnetlink::Error) -> KernelError {
    match e {
        rtnetlink::Error::NetlinkError(msg) => KernelError::Refused {
            operation: op.to_owned(),
            source: msg.to_io(),
        },
        other => KernelError::Netlink {
            operation: op.to_owned(),
            message: other.to_string(),
        },
    }
}
