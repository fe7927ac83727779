//! Links, bridges, VXLAN devices, addresses and FDB entries over rtnetlink.
//!
//! - `dump_on`: what the controller owns, from one link dump, one address dump and one
//!   bridge FDB dump (never one request per link);
//! - [`execute`]: one [`Change`] of a plan (`Kernel::execute` runs whole plans, many
//!   requests per `send()`, with the same requests: `exec`);
//! - `underlay_on` / [`local_addresses`]: which local interface holds an address.
//!
//! Ownership follows [`crate::state::ownership`]: a link is ours when its name has one
//! of our prefixes *and* its alias starts with `ovl-controller`.
//!
//! Creating a link is two requests: the kernel ignores `IFLA_IFALIAS` in the
//! `RTM_NEWLINK` that creates a device (checked on 6.18; `rtnl_create_link` never looks
//! at it), so the alias is set right after. If the process dies in between, a link with
//! our name and no alias is left behind. The create therefore puts the device in group
//! [`HALF_CREATED_GROUP`] (`IFLA_GROUP` is honoured at creation), and setting the alias
//! puts it back in group 0 in the same request. The next `CreateLink` of exactly that
//! link (same kind, parameters, MTU and master, still down, in that group) adopts it;
//! anything else with that name, such as a look-alike made by hand (group 0), is
//! reported as a [`KernelError::ForeignLink`], before the plan changes anything.

mod dump;
mod exec;

use std::net::IpAddr;

use futures::StreamExt;
use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVxlan};

pub use dump::local_addresses;
pub(super) use dump::{dump_on, underlay_on};
pub(super) use exec::{Indexes, Step, is_link_change, prepare};

use super::KernelError;
use crate::plan::Change;
use crate::state::{Link, LinkKind};

/// The device group of a link between its creation and its alias (see the module
/// docs). Nobody else has a reason to pick it ("0f71", as our XFRM reqids).
pub use crate::state::ownership::HALF_CREATED_GROUP;

const EEXIST: i32 = libc::EEXIST;
const ENODEV: i32 = libc::ENODEV;

/// Runs one link, address or FDB change, one request at a time. XFRM changes are refused
/// with [`KernelError::Unsupported`].
pub async fn execute(route: &rtnetlink::Handle, change: &Change) -> Result<(), KernelError> {
    let op = change.to_string();
    let mut indexes = Indexes::default();
    match prepare(route, change, &mut indexes).await? {
        Step::Alone => match change {
            Change::CreateLink(link) => create_link(route, link, &op, &mut indexes).await,
            _ => Err(KernelError::Unsupported {
                operation: op,
                executor: "link",
            }),
        },
        Step::Request(r) => match request_ack(route, r.message, r.flags).await {
            Err(e) if errno(&e).is_some_and(|n| r.tolerated.contains(&n)) => Ok(()),
            other => other.map_err(|e| refused(&op, e)),
        },
    }
}

/// Creates the link down, with MTU and master, then marks it as ours with the alias.
///
/// `indexes` resolves the master and the underlay; the new link's name is forgotten
/// there (its index is looked up when something needs it).
pub(super) async fn create_link(
    route: &rtnetlink::Handle,
    link: &Link,
    op: &str,
    indexes: &mut Indexes,
) -> Result<(), KernelError> {
    indexes.forget(&link.name);
    let op_text = || op.to_owned();
    let master = match &link.master {
        Some(m) => Some(indexes.resolve(route, m, &op_text).await?),
        None => None,
    };
    let mut msg = match &link.kind {
        LinkKind::Bridge => {
            // Not `LinkBridge::new`, which also sets the bridge up. A MAC address of its
            // own: otherwise the bridge takes its port's, and a VXLAN device recreated
            // (new port, new local address) would change the overlay address's MAC under
            // every peer's ARP cache.
            let b = LinkMessageBuilder::<LinkBridge>::new(link.name.as_str())
                .mtu(link.mtu)
                .address(random_mac()?);
            match master {
                Some(m) => b.controller(m).build(),
                None => b.build(),
            }
        }
        LinkKind::Vxlan(p) => {
            if let Some(bridge) = master {
                pin_mac(route, bridge, op).await?;
            }
            let dev = indexes.resolve(route, &p.underlay, &op_text).await?;
            let b = LinkVxlan::new(link.name.as_str(), p.vni)
                .dev(dev)
                .port(p.port)
                .learning(p.learning)
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
    msg.attributes
        .push(LinkAttribute::Group(HALF_CREATED_GROUP));
    match route.link().add(msg).execute().await {
        Ok(()) => {}
        Err(e) if errno(&e) == Some(EEXIST) => return adopt_half_created(route, link, op).await,
        Err(e) => return Err(refused(op, e)),
    }
    if let Err(err) = set_alias(route, link, op).await {
        // Do not leave a link that the next dump would take for a foreign one.
        let del = LinkUnspec::new_with_name(link.name.as_str()).build();
        if let Err(e) = route.link().del_with_message(del).execute().await {
            tracing::warn!(link = %link.name, error = %e, "cannot remove the link whose alias could not be set");
        }
        return Err(err);
    }
    Ok(())
}

/// Sets the bridge's MAC address to what it is now, which marks it as set: a bridge
/// whose address the kernel assigned takes its ports' lowest MAC, so adding a new VXLAN
/// port (one recreated with a new port or local address) would change the overlay MAC
/// under the peers' ARP caches. Ours get their own at creation; this also covers bridges
/// made before that, and half-created ones finished by a later apply.
async fn pin_mac(route: &rtnetlink::Handle, bridge: u32, op: &str) -> Result<(), KernelError> {
    use futures::TryStreamExt as _;
    let msg = route
        .link()
        .get()
        .match_index(bridge)
        .execute()
        .try_next()
        .await
        .map_err(|e| refused(op, e))?;
    let mac = msg.and_then(|m| {
        m.attributes.into_iter().find_map(|a| match a {
            LinkAttribute::Address(mac) => Some(mac),
            _ => None,
        })
    });
    let Some(mac) = mac else {
        return Ok(());
    };
    let set = LinkUnspec::new_with_index(bridge).address(mac).build();
    route
        .link()
        .change(set)
        .execute()
        .await
        .map_err(|e| refused(op, e))
}

/// A random locally administered unicast MAC address.
fn random_mac() -> Result<Vec<u8>, KernelError> {
    use ring::rand::SecureRandom as _;
    let mut mac = vec![0u8; 6];
    ring::rand::SystemRandom::new()
        .fill(&mut mac)
        .map_err(|_| KernelError::Unexpected {
            what: "random number generator",
            detail: "no random bytes for a bridge's MAC address".into(),
        })?;
    if let Some(first) = mac.first_mut() {
        *first = (*first & 0xfe) | 0x02;
    }
    Ok(mac)
}

/// `CreateLink` found a link with that name: adopt it only when it is exactly what an
/// interrupted `create_link` leaves behind (no alias, same kind and parameters, same
/// MTU and master, down).
async fn adopt_half_created(
    route: &rtnetlink::Handle,
    link: &Link,
    op: &str,
) -> Result<(), KernelError> {
    let all = dump::all_links(route).await?;
    let Some(found) = all.iter().find(|l| l.name == link.name.as_str()) else {
        // No link has the name: the kernel refused something else as existing.
        let reason = match &link.kind {
            LinkKind::Vxlan(p) => format!(
                "no link has that name; another VXLAN device probably uses vni {} on port {}",
                p.vni, p.port
            ),
            LinkKind::Bridge => "no link has that name".to_owned(),
        };
        return Err(KernelError::ForeignLink {
            operation: op.to_owned(),
            link: link.name.to_string(),
            reason,
            before_any_change: false,
        });
    };
    if found.alias.is_some() && found.is_owned() {
        // Ours already (the plan should have seen it): the kernel's answer stands.
        return Err(KernelError::Refused {
            operation: op.to_owned(),
            source: std::io::Error::from_raw_os_error(EEXIST),
        });
    }
    adoptable(found, link).map_err(|why| KernelError::ForeignLink {
        operation: op.to_owned(),
        link: link.name.to_string(),
        reason: format!("a link of that name exists and is not ours: {why}"),
        before_any_change: false,
    })?;
    tracing::warn!(link = %link.name, "adopting a link left without alias by an interrupted create");
    set_alias(route, link, op).await
}

/// Whether a link that is not ours is what an interrupted create of `link` leaves
/// behind, and may be adopted; otherwise why not.
fn adoptable(found: &dump::KernelLink, link: &Link) -> Result<(), String> {
    if let Some(alias) = &found.alias {
        return Err(format!("its alias is {alias:?}"));
    }
    if found.group != HALF_CREATED_GROUP {
        return Err(format!(
            "it has no alias and is in device group {} (a create of ours leaves group \
             0x{HALF_CREATED_GROUP:08x}): made by someone else",
            found.group
        ));
    }
    let mut differs = Vec::new();
    if found.kind.as_ref() != Some(&link.kind) {
        differs.push(match &found.kind {
            Some(LinkKind::Bridge) => "it is a bridge".to_owned(),
            Some(LinkKind::Vxlan(p)) => {
                format!(
                    "it is a VXLAN device with other parameters (vni {}, port {})",
                    p.vni, p.port
                )
            }
            None => "it is of another kind".to_owned(),
        });
    }
    if found.mtu != link.mtu {
        differs.push(format!("its mtu is {}", found.mtu));
    }
    if found.master != link.master {
        differs.push(match &found.master {
            Some(m) => format!("its master is {m}"),
            None => "it has no master".to_owned(),
        });
    }
    if found.up {
        differs.push("it is up".to_owned());
    }
    if differs.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "it has no alias and is not what an interrupted create of this link leaves: {}",
            differs.join(", ")
        ))
    }
}

/// The check of [`check_creatable`] alone, for a plan that is not run (a dry run, or
/// the agent's look at a new spec before it takes it).
pub(super) async fn check_plan(
    route: &rtnetlink::Handle,
    changes: &[Change],
) -> Result<(), KernelError> {
    if !changes.iter().any(|c| matches!(c, Change::CreateLink(_))) {
        return Ok(());
    }
    check_creatable(&dump::all_links(route).await?, changes)
}

/// Refuses, before a plan changes anything, links it would create where a link that is
/// not ours (and not adoptable) has the name, or a foreign VXLAN device has the VNI and
/// port (the kernel would refuse the create halfway through the plan).
fn check_creatable(all: &[dump::KernelLink], changes: &[Change]) -> Result<(), KernelError> {
    for change in changes {
        let Change::CreateLink(link) = change else {
            continue;
        };
        let conflict = |reason: String| KernelError::ForeignLink {
            operation: change.to_string(),
            link: link.name.to_string(),
            reason: format!("{reason}; nothing was changed"),
            before_any_change: true,
        };
        if let Some(found) = all.iter().find(|l| l.name == link.name.as_str())
            && !found.is_owned()
        {
            adoptable(found, link).map_err(|why| {
                conflict(format!("a link of that name exists and is not ours: {why}"))
            })?;
        }
        if let LinkKind::Vxlan(want) = &link.kind {
            // The kernel's own test: same VNI and port, same family, and the same socket
            // options (ours have none).
            let taken = all.iter().find(|l| {
                l.name != link.name.as_str()
                    && !l.is_owned()
                    && l.vxlan_socket_options.is_empty()
                    && matches!(&l.kind, Some(LinkKind::Vxlan(p)) if p.vni == want.vni
                        && p.port == want.port
                        && p.local.is_ipv6() == want.local.is_ipv6()
                        && (p.local == want.local || p.local.is_unspecified()))
            });
            if let Some(other) = taken {
                return Err(conflict(format!(
                    "the VXLAN device {} (not ours) uses vni {} on port {} already",
                    other.name, want.vni, want.port
                )));
            }
            let port_held = all.iter().find(|l| {
                !l.is_owned()
                    && l.up
                    && !l.vxlan_socket_options.is_empty()
                    && matches!(&l.kind, Some(LinkKind::Vxlan(p)) if p.port == want.port
                        && (p.local.is_ipv6() == want.local.is_ipv6()
                            || l.vxlan_socket_options.contains(&"external")))
            });
            if let Some(other) = port_held {
                return Err(conflict(format!(
                    "the VXLAN device {} (not ours) is up on port {} with {}, and the kernel \
                     lets devices share a port only with the same options",
                    other.name,
                    want.port,
                    other.vxlan_socket_options.join(", ")
                )));
            }
        }
    }
    Ok(())
}

/// Sets the alias that marks a created link as ours, and takes it out of
/// [`HALF_CREATED_GROUP`] in the same request.
async fn set_alias(route: &rtnetlink::Handle, link: &Link, op: &str) -> Result<(), KernelError> {
    let mut msg = LinkUnspec::new_with_name(link.name.as_str())
        .alias(&link.alias)
        .build();
    msg.attributes.push(LinkAttribute::Group(0));
    route
        .link()
        .change(msg)
        .execute()
        .await
        .map_err(|e| refused(op, e))
}

/// The bridge-family neighbour message of a head-end replication entry:
/// `00:00:00:00:00:00 dst REMOTE self permanent` on the VXLAN device.
pub(super) fn fdb_message(index: u32, remote: IpAddr) -> NeighbourMessage {
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

/// Sends one request (`NLM_F_REQUEST | NLM_F_ACK | flags`) and waits for its ACK.
async fn request_ack(
    route: &rtnetlink::Handle,
    msg: RouteNetlinkMessage,
    flags: u16,
) -> Result<(), rtnetlink::Error> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
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

/// Deletes what our VXLAN devices learned about remotes that are no longer peers
/// (`stale`: the device's name, the old remote): entries pointing a MAC at an address
/// the plan just took out of the head-end list, after a peer moved or left. Frames to
/// those MACs would follow them to the old address until the peer's next frame taught
/// the new one. Learned entries are the kernel's (not permanent, never someone's
/// configuration), on devices of ours only. Returns how many went.
pub(super) async fn forget_learned(
    route: &rtnetlink::Handle,
    stale: &[(crate::state::IfName, IpAddr)],
) -> Result<usize, KernelError> {
    use futures::TryStreamExt as _;
    if stale.is_empty() {
        return Ok(0);
    }
    let links = dump::all_links(route).await?;
    let targets: std::collections::HashSet<(u32, IpAddr)> = stale
        .iter()
        .filter_map(|(name, remote)| {
            links
                .iter()
                .find(|l| l.name == name.as_str() && l.is_owned())
                .map(|l| (l.index, *remote))
        })
        .collect();
    if targets.is_empty() {
        return Ok(0);
    }
    let learned: Vec<NeighbourMessage> = route
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute()
        .try_filter(|m| {
            let remote = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                    Some(IpAddr::V4(*ip))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                    Some(IpAddr::V6(*ip))
                }
                // Bridge-family messages carry the bare address bytes.
                NeighbourAttribute::Destination(NeighbourAddress::Other(bytes)) => {
                    dump::ip_from_bytes(bytes)
                }
                _ => None,
            });
            let mac_set = m.attributes.iter().any(|a| {
                matches!(a, NeighbourAttribute::LinkLayerAddress(mac) if mac.iter().any(|b| *b != 0))
            });
            let wanted = remote.is_some_and(|r| targets.contains(&(m.header.ifindex, r)))
                && mac_set
                && m.header.state != NeighbourState::Permanent
                && m.header.state != NeighbourState::Noarp;
            futures::future::ready(wanted)
        })
        .try_collect()
        .await
        .map_err(|e| refused("dump the bridge FDB", e))?;
    let count = learned.len();
    for msg in learned {
        if let Err(e) = route.neighbours().del(msg).execute().await {
            // Aged out meanwhile: nothing to delete.
            if errno(&e) != Some(libc::ENOENT) {
                return Err(refused("delete a learned FDB entry", e));
            }
        }
    }
    Ok(count)
}
