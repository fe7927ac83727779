//! Reading links, addresses and FDB entries, and keeping only what the controller owns.
//!
//! ```text
//! link dump ----> KernelLink (every link) --ownership--> state.links
//! address dump -- on our bridges, global, permanent --> state.addresses
//! bridge FDB dump -- on our VXLAN devices, 00:00:00:00:00:00 with a dst --> state.fdb
//! ```

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_core::Parseable;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::refused;
use crate::kernel::batch::{BatchSocket, DumpError, Reply, Secrets, dump_request};
use crate::kernel::{KernelError, Underlay};
use crate::state::{
    Address, FdbEntry, IfName, KernelState, Link, LinkKind, VxlanParams, ownership,
};

/// Everything the controller owns in links, addresses and FDB entries (XFRM policies
/// and SAs are left empty, see `kernel::xfrm`), on one of `Kernel`'s own sockets: the
/// replies are parsed where they were received (`batch::dump`), not copied through
/// netlink-proto. Dumps the kernel marks as interrupted are started over.
pub(in crate::kernel) async fn dump_on(
    socket: &mut BatchSocket,
) -> Result<KernelState, KernelError> {
    let op = "dump links";
    let request = dump_request(RouteNetlinkMessage::GetLink(LinkMessage::default()));
    let msgs = socket
        .dump(&request, Secrets::No, Vec::new, |out, reply| {
            out.push(parse_reply::<LinkMessage>(
                reply,
                libc::RTM_NEWLINK,
                "link",
            )?);
            Ok(())
        })
        .await
        .map_err(|e| e.into_kernel(op))?;
    let mut owned = OwnedLinks::new(kernel_links(&msgs));
    drop(msgs);
    if !owned.bridges.is_empty() {
        let op = "dump addresses";
        let request = dump_request(RouteNetlinkMessage::GetAddress(AddressMessage::default()));
        owned.state.addresses = socket
            .dump(&request, Secrets::No, BTreeSet::new, |out, reply| {
                let msg = parse_reply::<AddressMessage>(reply, libc::RTM_NEWADDR, "address")?;
                out.extend(owned.address(&msg));
                Ok(())
            })
            .await
            .map_err(|e| e.into_kernel(op))?;
    }
    if !owned.vxlans.is_empty() {
        let op = "dump the bridge FDB";
        let mut query = NeighbourMessage::default();
        query.header.family = AddressFamily::Bridge;
        let request = dump_request(RouteNetlinkMessage::GetNeighbour(query));
        owned.state.fdb = socket
            .dump(&request, Secrets::No, BTreeSet::new, |out, reply| {
                let msg = parse_reply::<NeighbourMessage>(reply, libc::RTM_NEWNEIGH, "neighbour")?;
                out.extend(owned.fdb_entry(&msg));
                Ok(())
            })
            .await
            .map_err(|e| e.into_kernel(op))?;
    }
    Ok(owned.finish())
}

/// A dump reply of type `kind`, parsed.
fn parse_reply<M: Parseable<[u8]>>(
    reply: Reply<'_>,
    kind: u16,
    what: &str,
) -> Result<M, DumpError> {
    if reply.kind != kind {
        return Err(DumpError::Unexpected(format!(
            "message type {} in a {what} dump",
            reply.kind
        )));
    }
    M::parse(reply.payload)
        .map_err(|e| DumpError::Unexpected(format!("an unreadable {what} message ({e})")))
}

/// Our links from a link dump, and what the address and FDB dumps need to find ours.
struct OwnedLinks {
    state: KernelState,
    bridges: HashMap<u32, IfName>,
    vxlans: HashMap<u32, IfName>,
}

impl OwnedLinks {
    fn new(links: Vec<KernelLink>) -> OwnedLinks {
        let mut owned = OwnedLinks {
            state: KernelState::default(),
            bridges: HashMap::new(),
            vxlans: HashMap::new(),
        };
        for kl in links.into_iter().filter(KernelLink::is_owned) {
            let Some(link) = kl.to_link() else {
                tracing::warn!(
                    link = kl.name,
                    "ignoring a link marked as ours that is neither a bridge nor a VXLAN device"
                );
                continue;
            };
            match link.kind {
                LinkKind::Bridge => owned.bridges.insert(kl.index, link.name.clone()),
                LinkKind::Vxlan(_) => owned.vxlans.insert(kl.index, link.name.clone()),
            };
            owned.state.links.insert(link.name.clone(), link);
        }
        owned
    }

    /// A configured address on one of our bridges.
    fn address(&self, msg: &AddressMessage) -> Option<Address> {
        if !is_configured(msg) {
            return None;
        }
        Some(Address {
            link: self.bridges.get(&msg.header.index)?.clone(),
            addr: address_of(msg)?,
        })
    }

    /// A head-end replication entry of one of our VXLAN devices.
    fn fdb_entry(&self, msg: &NeighbourMessage) -> Option<FdbEntry> {
        Some(FdbEntry {
            link: self.vxlans.get(&msg.header.ifindex)?.clone(),
            remote: head_end_remote(msg)?,
        })
    }

    fn finish(self) -> KernelState {
        let state = self.state;
        tracing::debug!(
            links = state.links.len(),
            addresses = state.addresses.len(),
            fdb = state.fdb.len(),
            "dumped owned links"
        );
        state
    }
}

/// The local interface holding `addr` (as its local address), with its MTU.
pub async fn underlay_for(
    route: &rtnetlink::Handle,
    addr: IpAddr,
) -> Result<Option<Underlay>, KernelError> {
    let op = format!("find the interface holding {addr}");
    let addrs: Vec<AddressMessage> = route
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| refused(&op, e))?;
    let Some(index) = addrs
        .iter()
        .find(|m| local_of(m) == Some(addr))
        .map(|m| m.header.index)
    else {
        return Ok(None);
    };
    let mut links = route.link().get().match_index(index).execute();
    let Some(msg) = links.try_next().await.map_err(|e| refused(&op, e))? else {
        return Ok(None);
    };
    let Some(name) = name_of(&msg) else {
        return Err(KernelError::Unexpected {
            what: "link message",
            detail: format!("link {index} has no name"),
        });
    };
    let name: IfName =
        name.parse()
            .map_err(|e: crate::state::BadIfName| KernelError::Unexpected {
                what: "link name",
                detail: e.to_string(),
            })?;
    let mtu = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    });
    let Some(mtu) = mtu else {
        return Err(KernelError::Unexpected {
            what: "link message",
            detail: format!("link {name} has no MTU"),
        });
    };
    Ok(Some(Underlay { name, index, mtu }))
}

/// Every address configured on a local interface, each once, sorted.
pub async fn local_addresses(route: &rtnetlink::Handle) -> Result<Vec<IpAddr>, KernelError> {
    let addrs: Vec<AddressMessage> = route
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| refused("dump addresses", e))?;
    let set: BTreeSet<IpAddr> = addrs.iter().filter_map(local_of).collect();
    Ok(set.into_iter().collect())
}

/// A link as the kernel describes it, before the ownership filter.
#[derive(Debug)]
pub(super) struct KernelLink {
    pub index: u32,
    pub name: String,
    pub alias: Option<String>,
    /// `None` for kinds the controller never creates.
    pub kind: Option<LinkKind>,
    pub mtu: u32,
    pub master: Option<IfName>,
    pub up: bool,
}

impl KernelLink {
    pub(super) fn is_owned(&self) -> bool {
        ownership::is_owned_link(&self.name, self.alias.as_deref())
    }

    /// The model's view of the link, if it is of a kind we create.
    fn to_link(&self) -> Option<Link> {
        Some(Link {
            name: self.name.parse().ok()?,
            kind: self.kind.clone()?,
            mtu: self.mtu,
            master: self.master.clone(),
            alias: self.alias.clone().unwrap_or_default(),
            up: self.up,
        })
    }
}

/// Every link in the namespace, from one dump.
pub(super) async fn all_links(route: &rtnetlink::Handle) -> Result<Vec<KernelLink>, KernelError> {
    let msgs: Vec<LinkMessage> = route
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| refused("dump links", e))?;
    Ok(kernel_links(&msgs))
}

/// The links of one link dump.
fn kernel_links(msgs: &[LinkMessage]) -> Vec<KernelLink> {
    let names: HashMap<u32, &str> = msgs
        .iter()
        .filter_map(|m| Some((m.header.index, name_of(m)?)))
        .collect();
    msgs.iter().filter_map(|m| parse_link(m, &names)).collect()
}

fn name_of(msg: &LinkMessage) -> Option<&str> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// The name of the link with this index. A link the dump did not show (another
/// namespace) gets `:INDEX`, a name no kernel link can have (the kernel forbids ':'), so
/// that it compares unequal to every desired name. (`None` cannot happen: `:INDEX` is a
/// valid [`IfName`].)
fn name_for_index(index: u32, names: &HashMap<u32, &str>) -> Option<IfName> {
    names
        .get(&index)
        .and_then(|n| n.parse().ok())
        .or_else(|| format!(":{index}").parse().ok())
}

fn parse_link(msg: &LinkMessage, names: &HashMap<u32, &str>) -> Option<KernelLink> {
    let mut link = KernelLink {
        index: msg.header.index,
        name: name_of(msg)?.to_owned(),
        alias: None,
        kind: None,
        mtu: 0,
        master: None,
        up: msg.header.flags.contains(LinkFlags::Up),
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfAlias(a) if !a.is_empty() => link.alias = Some(a.clone()),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            LinkAttribute::Controller(i) if *i != 0 => link.master = name_for_index(*i, names),
            LinkAttribute::LinkInfo(infos) => link.kind = parse_kind(infos, names),
            _ => {}
        }
    }
    Some(link)
}

fn parse_kind(infos: &[LinkInfo], names: &HashMap<u32, &str>) -> Option<LinkKind> {
    let kind = infos.iter().find_map(|i| match i {
        LinkInfo::Kind(k) => Some(k),
        _ => None,
    })?;
    match kind {
        InfoKind::Bridge => Some(LinkKind::Bridge),
        InfoKind::Vxlan => {
            let data = infos.iter().find_map(|i| match i {
                LinkInfo::Data(InfoData::Vxlan(d)) => Some(d.as_slice()),
                _ => None,
            })?;
            parse_vxlan(data, names).map(LinkKind::Vxlan)
        }
        _ => None,
    }
}

/// Missing attributes come out as values no desired link has (VNI 0, unspecified local
/// address, port 0, `:0` underlay), so the plan recreates such a device.
fn parse_vxlan(data: &[InfoVxlan], names: &HashMap<u32, &str>) -> Option<VxlanParams> {
    let mut p = VxlanParams {
        vni: 0,
        local: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        port: 0,
        underlay: name_for_index(0, names)?,
    };
    for d in data {
        match d {
            InfoVxlan::Id(v) => p.vni = *v,
            InfoVxlan::Local(a) if !a.is_unspecified() => p.local = IpAddr::V4(*a),
            InfoVxlan::Local6(a) if !a.is_unspecified() => p.local = IpAddr::V6(*a),
            InfoVxlan::Port(port) => p.port = *port,
            InfoVxlan::Link(i) => p.underlay = name_for_index(*i, names)?,
            _ => {}
        }
    }
    Some(p)
}

/// The interface's own address: IFA_LOCAL (IPv4, and IPv6 on point-to-point links,
/// where IFA_ADDRESS is the peer), else IFA_ADDRESS.
fn local_of(msg: &AddressMessage) -> Option<IpAddr> {
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}

fn address_of(msg: &AddressMessage) -> Option<IpNet> {
    IpNet::new(local_of(msg)?, msg.header.prefix_len).ok()
}

/// An address someone configured: global scope, not IPv6 link-local, and permanent
/// (infinite lifetime, as `ip addr add` and the controller create them). That leaves
/// out SLAAC, DHCP and IPv6 privacy (temporary) addresses the kernel or a daemon manage.
fn is_configured(msg: &AddressMessage) -> bool {
    if msg.header.scope != AddressScope::Universe {
        return false;
    }
    if let Some(IpAddr::V6(a)) = local_of(msg)
        && is_ipv6_link_local(&a)
    {
        return false;
    }
    // IFA_FLAGS (32 bits) supersedes the 8-bit header flags when present. Temporary
    // (privacy) and autoconfigured addresses are never permanent.
    let flags = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Flags(f) => Some(*f),
        _ => None,
    });
    match flags {
        Some(f) => f.contains(AddressFlags::Permanent),
        None => msg.header.flags.contains(AddressHeaderFlags::Permanent),
    }
}

fn is_ipv6_link_local(a: &Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

/// The remote of a head-end replication entry: an all-zero MAC with a destination, in
/// the device's own FDB (NTF_SELF).
fn head_end_remote(msg: &NeighbourMessage) -> Option<IpAddr> {
    if msg.header.family != AddressFamily::Bridge || !msg.header.flags.contains(NeighbourFlags::Own)
    {
        return None;
    }
    let zero_mac = msg.attributes.iter().any(|a| matches!(a, NeighbourAttribute::LinkLayerAddress(m) if m.len() == 6 && m.iter().all(|b| *b == 0)));
    if !zero_mac {
        return None;
    }
    msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(d) => ip_of(d),
        _ => None,
    })
}

/// In bridge-family messages the destination is raw bytes: 4 for IPv4, 16 for IPv6.
fn ip_of(d: &NeighbourAddress) -> Option<IpAddr> {
    match d {
        NeighbourAddress::Inet(a) => Some(IpAddr::V4(*a)),
        NeighbourAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        NeighbourAddress::Other(b) => match b.len() {
            4 => <[u8; 4]>::try_from(b.as_slice())
                .ok()
                .map(|o| IpAddr::V4(Ipv4Addr::from(o))),
            16 => <[u8; 16]>::try_from(b.as_slice())
                .ok()
                .map(|o| IpAddr::V6(Ipv6Addr::from(o))),
            _ => None,
        },
        _ => None,
    }
}
