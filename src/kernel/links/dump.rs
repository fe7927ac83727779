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
use netlink_packet_core::{NLA_TYPE_MASK, NlasIterator, Parseable};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::NeighbourMessage;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::refused;
use crate::kernel::batch::{BatchSocket, DumpError, Reply, Secrets, dump_request, u32_at};
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
    // Without statistics (nothing here reads them): about half the bytes per link, so
    // fewer dump parts, and fewer chances for a busy link table to interrupt the dump.
    let mut get = LinkMessage::default();
    get.attributes
        .push(netlink_packet_route::link::LinkAttribute::ExtMask(vec![
            netlink_packet_route::link::LinkExtentMask::SkipStats,
        ]));
    let request = dump_request(RouteNetlinkMessage::GetLink(get));
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
        let mut entries = socket
            .dump(&request, Secrets::No, Vec::new, |out, reply| {
                if reply.kind != libc::RTM_NEWNEIGH {
                    return Err(DumpError::Unexpected(format!(
                        "message type {} in a neighbour dump",
                        reply.kind
                    )));
                }
                out.extend(owned.fdb_entry(reply.payload)?);
                Ok(())
            })
            .await
            .map_err(|e| e.into_kernel(op))?;
        // One sorted bulk load instead of thousands of tree inserts.
        entries.sort_unstable();
        owned.state.fdb = entries.into_iter().collect();
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

    /// A head-end replication entry of one of our VXLAN devices, from a neighbour
    /// reply's bytes (see [`head_end_remote`]).
    fn fdb_entry(&self, payload: &[u8]) -> Result<Option<FdbEntry>, DumpError> {
        let Some((index, remote)) = head_end_remote(payload)? else {
            return Ok(None);
        };
        Ok(self.vxlans.get(&index).map(|link| FdbEntry {
            link: link.clone(),
            remote,
        }))
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

/// The local interface holding `addr` (as its local address), with its MTU: one
/// address dump and one link dump on one of `Kernel`'s own sockets (parsed in place;
/// of the link dump, only the one link's message is decoded).
pub(in crate::kernel) async fn underlay_on(
    socket: &mut BatchSocket,
    addr: IpAddr,
) -> Result<Option<Underlay>, KernelError> {
    let op = format!("find the interface holding {addr}");
    let request = dump_request(RouteNetlinkMessage::GetAddress(AddressMessage::default()));
    let index = socket
        .dump(
            &request,
            Secrets::No,
            || None,
            |found, reply| {
                let msg = parse_reply::<AddressMessage>(reply, libc::RTM_NEWADDR, "address")?;
                if found.is_none() && local_of(&msg) == Some(addr) {
                    *found = Some(msg.header.index);
                }
                Ok(())
            },
        )
        .await
        .map_err(|e| e.into_kernel(&op))?;
    let Some(index) = index else {
        return Ok(None);
    };
    let request = dump_request(RouteNetlinkMessage::GetLink(LinkMessage::default()));
    let link = socket
        .dump(
            &request,
            Secrets::No,
            || None,
            |found, reply| {
                // struct ifinfomsg: family (1), pad (1), type (2), then the index.
                if u32_at(reply.payload, 4) == Some(index) {
                    *found = Some(parse_reply::<LinkMessage>(
                        reply,
                        libc::RTM_NEWLINK,
                        "link",
                    )?);
                }
                Ok(())
            },
        )
        .await
        .map_err(|e| e.into_kernel(&op))?;
    // Gone between the two dumps: as if the address were not there.
    let Some(msg) = link else {
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
    Ok(Some(Underlay {
        name,
        index,
        mtu,
        loopback: msg.header.flags.contains(LinkFlags::Loopback) || is_dummy(&msg),
    }))
}

/// A `dummy` device: like `lo`, a home for a routed VTEP address, with no path of its own.
fn is_dummy(msg: &LinkMessage) -> bool {
    msg.attributes.iter().any(|a| {
        matches!(a, LinkAttribute::LinkInfo(infos)
            if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Dummy))))
    })
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
    /// The device group (`ip link set group`); see [`super::HALF_CREATED_GROUP`].
    pub group: u32,
    /// Of a VXLAN device: the options that shape its UDP socket and that ours do not
    /// have (`gbp`, `external`, ...). The kernel lets devices share a port only with the
    /// same ones, so a foreign device up with any of them keeps ours off that port.
    pub vxlan_socket_options: Vec<&'static str>,
}

impl KernelLink {
    pub(super) fn is_owned(&self) -> bool {
        ownership::is_owned_link(&self.name, self.alias.as_deref(), self.group)
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
        group: 0,
        vxlan_socket_options: Vec::new(),
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfAlias(a) if !a.is_empty() => link.alias = Some(a.clone()),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            LinkAttribute::Controller(i) if *i != 0 => link.master = name_for_index(*i, names),
            LinkAttribute::LinkInfo(infos) => {
                link.kind = parse_kind(infos, names);
                link.vxlan_socket_options = vxlan_socket_options(infos);
            }
            LinkAttribute::Group(g) => link.group = *g,
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

/// The receive options of a VXLAN device's socket (the kernel's `VXLAN_F_RCV_FLAGS`)
/// that are on; ours have none.
fn vxlan_socket_options(infos: &[LinkInfo]) -> Vec<&'static str> {
    let data = infos.iter().find_map(|i| match i {
        LinkInfo::Data(InfoData::Vxlan(d)) => Some(d.as_slice()),
        _ => None,
    });
    data.unwrap_or_default()
        .iter()
        .filter_map(|d| match d {
            InfoVxlan::Gbp => Some("gbp"),
            InfoVxlan::Gpe => Some("gpe"),
            InfoVxlan::CollectMetadata(true) => Some("external"),
            InfoVxlan::RemCsumRX(true) => Some("remcsumrx"),
            InfoVxlan::RemCsumNoPartial => Some("remcsum nopartial"),
            InfoVxlan::UDPZeroCsumRX(true) => Some("udp6zerocsumrx"),
            InfoVxlan::Vnifilter(true) => Some("vnifilter"),
            _ => None,
        })
        .collect()
}

/// Missing attributes come out as values no desired link has (VNI 0, unspecified local
/// address, port 0, `:0` underlay), so the plan recreates such a device.
fn parse_vxlan(data: &[InfoVxlan], names: &HashMap<u32, &str>) -> Option<VxlanParams> {
    let mut p = VxlanParams {
        vni: 0,
        local: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        port: 0,
        underlay: name_for_index(0, names)?,
        learning: false,
    };
    for d in data {
        match d {
            InfoVxlan::Id(v) => p.vni = *v,
            InfoVxlan::Local(a) if !a.is_unspecified() => p.local = IpAddr::V4(*a),
            InfoVxlan::Local6(a) if !a.is_unspecified() => p.local = IpAddr::V6(*a),
            InfoVxlan::Port(port) => p.port = *port,
            InfoVxlan::Link(i) => p.underlay = name_for_index(*i, names)?,
            InfoVxlan::Learning(on) => p.learning = *on,
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

/// The device index and remote of a head-end replication entry (an all-zero MAC with a
/// destination, in the device's own FDB: NTF_SELF), read straight from a neighbour
/// reply's bytes. An FDB dump at scale is thousands of entries, most of them ours:
/// building a `NeighbourMessage` (a vector of attributes) for each was most of the
/// link half of a dump. `Ok(None)` for any other entry; an error for a malformed one.
fn head_end_remote(payload: &[u8]) -> Result<Option<(u32, IpAddr)>, DumpError> {
    // struct ndmsg: family (1), pad (3), ifindex (4), state (2), flags (1), type (1).
    const NDMSG_LEN: usize = 12;
    const NTF_SELF: u8 = 0x02;
    const NDA_DST: u16 = 1;
    const NDA_LLADDR: u16 = 2;
    let malformed = || DumpError::Unexpected("an unreadable neighbour message".into());
    let header = payload.get(..NDMSG_LEN).ok_or_else(malformed)?;
    let family = header.first().copied().unwrap_or_default();
    let flags = header.get(10).copied().unwrap_or_default();
    if i32::from(family) != libc::AF_BRIDGE || flags & NTF_SELF == 0 {
        return Ok(None);
    }
    let index = u32_at(header, 4).ok_or_else(malformed)?;
    let (mut zero_mac, mut remote) = (false, None);
    for nla in NlasIterator::new(payload.get(NDMSG_LEN..).unwrap_or_default()) {
        let nla = nla.map_err(|_| malformed())?;
        match nla.kind() & NLA_TYPE_MASK {
            NDA_LLADDR => zero_mac = nla.value().len() == 6 && nla.value().iter().all(|b| *b == 0),
            NDA_DST => remote = ip_from_bytes(nla.value()),
            _ => {}
        }
    }
    Ok(remote.filter(|_| zero_mac).map(|r| (index, r)))
}

/// In bridge-family messages the destination is raw bytes: 4 for IPv4, 16 for IPv6.
pub(super) fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    if let Ok(o) = <[u8; 4]>::try_from(b) {
        Some(IpAddr::V4(Ipv4Addr::from(o)))
    } else if let Ok(o) = <[u8; 16]>::try_from(b) {
        Some(IpAddr::V6(Ipv6Addr::from(o)))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::Emitable;
    use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags};

    use super::*;

    /// What the entry means through netlink-packet-route's own parse (the reference
    /// for [`head_end_remote`], which reads the bytes itself).
    fn reference(payload: &[u8]) -> Option<(u32, IpAddr)> {
        let msg = NeighbourMessage::parse(payload).ok()?;
        if msg.header.family != AddressFamily::Bridge
            || !msg.header.flags.contains(NeighbourFlags::Own)
        {
            return None;
        }
        let zero_mac = msg.attributes.iter().any(|a| {
            matches!(a, NeighbourAttribute::LinkLayerAddress(m) if m.len() == 6 && m.iter().all(|b| *b == 0))
        });
        let remote = msg.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => Some(IpAddr::V4(*a)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => ip_from_bytes(b),
            _ => None,
        })?;
        zero_mac.then_some((msg.header.ifindex, remote))
    }

    fn entry(
        family: AddressFamily,
        flags: NeighbourFlags,
        attrs: Vec<NeighbourAttribute>,
    ) -> Vec<u8> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family;
        msg.header.ifindex = 7;
        msg.header.flags = flags;
        msg.attributes = attrs;
        let mut bytes = vec![0; msg.buffer_len()];
        msg.emit(&mut bytes);
        bytes
    }

    #[test]
    fn head_end_entries_read_from_bytes_as_the_parsed_message_says() {
        use NeighbourAttribute::{Destination, LinkLayerAddress};
        let v4 = || Destination(NeighbourAddress::Inet(Ipv4Addr::new(198, 18, 0, 2)));
        let v6 = || {
            Destination(NeighbourAddress::Inet6(
                "2001:db8::2".parse().unwrap_or(Ipv6Addr::UNSPECIFIED),
            ))
        };
        let zero = || LinkLayerAddress(vec![0; 6]);
        let cases = [
            (
                entry(
                    AddressFamily::Bridge,
                    NeighbourFlags::Own,
                    vec![zero(), v4()],
                ),
                Some((7, IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)))),
            ),
            (
                entry(
                    AddressFamily::Bridge,
                    NeighbourFlags::Own,
                    vec![v6(), zero()],
                ),
                Some((
                    7,
                    "2001:db8::2"
                        .parse()
                        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                )),
            ),
            // Not head-end replication: a MAC, no destination, not the device's own FDB,
            // another family.
            (
                entry(
                    AddressFamily::Bridge,
                    NeighbourFlags::Own,
                    vec![LinkLayerAddress(vec![2, 0, 0, 0, 0, 1]), v4()],
                ),
                None,
            ),
            (
                entry(AddressFamily::Bridge, NeighbourFlags::Own, vec![zero()]),
                None,
            ),
            (
                entry(
                    AddressFamily::Bridge,
                    NeighbourFlags::Controller,
                    vec![zero(), v4()],
                ),
                None,
            ),
            (
                entry(AddressFamily::Inet, NeighbourFlags::Own, vec![zero(), v4()]),
                None,
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(reference(&bytes), want);
            assert_eq!(head_end_remote(&bytes).ok().flatten(), want);
        }
    }

    #[test]
    fn malformed_neighbour_replies_are_errors_not_panics() {
        let bytes = entry(
            AddressFamily::Bridge,
            NeighbourFlags::Own,
            vec![NeighbourAttribute::LinkLayerAddress(vec![0; 6])],
        );
        assert!(head_end_remote(&bytes[..5]).is_err());
        // An attribute header that claims more than there is.
        let mut cut = bytes.clone();
        cut.truncate(cut.len() - 4);
        assert!(head_end_remote(&cut).is_err());
        for len in 0..bytes.len() {
            let _ = head_end_remote(&bytes[..len]);
        }
    }
}
