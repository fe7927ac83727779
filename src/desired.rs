//! Spec + local node + keys -> the kernel objects this node should have (pure).
//!
//! For every network the node is a member of: a bridge `ovbr-VNI`, a VXLAN device
//! `ovvx-VNI` enslaved to it, the node's address on the bridge and one all-zero FDB entry
//! per other member (head-end replication). When the node is a member of any encrypted
//! network it also gets, on the encrypted VXLAN port:
//! - a catch-all OUT policy that blocks, so nothing leaves in plaintext, and a catch-all
//!   IN policy that requires ESP, so nothing unencrypted is accepted;
//! - per peer an OUT and an IN policy with an ESP transport template (they win over the
//!   catch-alls by priority), and the SAs of the keys currently held for that peer.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::keys::SaKey;
use crate::spec::{Network, Node, NodeName, Spec};
use crate::state::{
    Address, Direction, FdbEntry, IfName, KernelState, Lifetime, Link, LinkKind, Policy,
    PolicyAction, PolicyId, Sa, SaId, Selector, VxlanParams, ownership,
};

/// The reqid every SA and policy template of ours carries (ownership mark).
pub const OVERLAY_REQID: u32 = ownership::REQID_MIN;
/// Per-pair policies: lower number, so they win over the catch-alls.
pub const PAIR_POLICY_PRIORITY: u32 = 1000;
/// Catch-all policies: only what no per-pair policy matched reaches them.
pub const CATCHALL_POLICY_PRIORITY: u32 = 2000;
/// Anti-replay window (packets) of every SA; with ESN the kernel keeps a bitmap of it.
pub const REPLAY_WINDOW: u32 = 1024;
/// Lifetime of every SA: soft limits (from the spec's `rekeyAfterPackets` and
/// `rekeyAfterBytes`) make the kernel report the SA so the agents rekey; hard limits
/// ([`crate::spec::HARD_LIMIT_FACTOR`] times the soft ones) are the kernel's last line:
/// the SA is deleted and traffic fails closed. No time limits: rotation by time is the
/// agents' job, and a dead agent must not take the data path down with it.
pub fn sa_lifetime(cluster: &crate::spec::Cluster) -> Lifetime {
    let f = crate::spec::HARD_LIMIT_FACTOR;
    Lifetime {
        soft_bytes: cluster.rekey_after_bytes,
        hard_bytes: cluster.rekey_after_bytes.saturating_mul(f),
        soft_packets: cluster.rekey_after_packets,
        hard_packets: cluster.rekey_after_packets.saturating_mul(f),
        soft_add_seconds: 0,
        hard_add_seconds: 0,
    }
}

/// VXLAN encapsulation overhead: outer IP + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub fn vxlan_overhead(ipv6: bool) -> u32 {
    if ipv6 { 70 } else { 50 }
}

/// The largest overlay MTU whose VXLAN packets, in ESP transport with AES-GCM, still fit
/// the underlay MTU unfragmented. ESP adds SPI+sequence (8), IV (8), ICV (16), pad length
/// and next header (2), and pads the payload plus those two bytes to a multiple of 4.
pub fn max_mtu(underlay_mtu: u32, ipv6: bool, encrypted: bool) -> u32 {
    let plain = underlay_mtu.saturating_sub(vxlan_overhead(ipv6));
    if !encrypted {
        return plain;
    }
    let outer_ip = if ipv6 { 40 } else { 20 };
    // ESP payload = the UDP datagram: UDP 8 + VXLAN 8 + Ethernet 14 + inner packet.
    let fits = |mtu: u32| {
        let payload = 30 + mtu;
        let padded = (payload + 2).div_ceil(4) * 4;
        outer_ip + 8 + 8 + padded + 16 <= underlay_mtu
    };
    let mut mtu = plain.saturating_sub(40);
    while mtu < plain && fits(mtu + 1) {
        mtu += 1;
    }
    mtu
}

/// Where this node is: its spec entry and the underlay device carrying its address.
#[derive(Clone, Debug)]
pub struct LocalNode<'a> {
    pub node: &'a Node,
    pub underlay: IfName,
    pub underlay_mtu: u32,
}

/// One installed key of one direction with one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectionKey {
    pub spi: u32,
    pub key: SaKey,
}

/// The keys held for one peer; more than one per direction while a rotation overlaps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerKeys {
    pub inbound: Vec<DirectionKey>,
    pub outbound: Vec<DirectionKey>,
}

/// Keys by peer VTEP address.
pub type Keyring = BTreeMap<IpAddr, PeerKeys>;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DesiredError {
    #[error(
        "{at}network {network}: mtu {mtu} does not fit: the underlay {underlay} has mtu {underlay_mtu}, \
         which leaves at most {max} for this network"
    )]
    MtuTooLarge {
        /// `file:line:column: ` of the spec's `mtu`, or empty.
        at: String,
        network: String,
        mtu: u32,
        max: u32,
        underlay: String,
        underlay_mtu: u32,
    },
    #[error(
        "{at}network {network}: the underlay {underlay} (mtu {underlay_mtu}) leaves at most {max} \
         for this network, below the {min} that its IPv6 addresses need"
    )]
    TooSmallForIpv6 {
        /// `file:line:column: ` of the network's name, or empty.
        at: String,
        network: String,
        max: u32,
        min: u32,
        underlay: String,
        underlay_mtu: u32,
    },
    #[error(
        "network {network}: the underlay {underlay} (mtu {underlay_mtu}) is too small for an overlay"
    )]
    UnderlayTooSmall {
        network: String,
        underlay: String,
        underlay_mtu: u32,
    },
}

/// Networks of the spec this node is a member of.
pub fn member_networks<'s>(spec: &'s Spec, node: &NodeName) -> impl Iterator<Item = &'s Network> {
    spec.networks.iter().filter(move |n| n.has_member(node))
}

/// The overlay MTU of `net` on this node.
pub fn network_mtu(net: &Network, local: &LocalNode<'_>) -> Result<u32, DesiredError> {
    let ipv6 = local.node.address.is_ipv6();
    let max = max_mtu(local.underlay_mtu, ipv6, net.encrypted);
    if max < 68 {
        return Err(DesiredError::UnderlayTooSmall {
            network: net.name.to_string(),
            underlay: local.underlay.to_string(),
            underlay_mtu: local.underlay_mtu,
        });
    }
    match net.mtu {
        Some(mtu) if mtu > max => Err(DesiredError::MtuTooLarge {
            at: net
                .mtu_at
                .as_ref()
                .map(|p| format!("{p}: "))
                .unwrap_or_default(),
            network: net.name.to_string(),
            mtu,
            max,
            underlay: local.underlay.to_string(),
            underlay_mtu: local.underlay_mtu,
        }),
        Some(mtu) => Ok(mtu),
        // An explicit mtu below it is refused with the spec; the kernel would drop the
        // bridge's IPv6 addresses.
        None if max < crate::spec::MIN_MTU_IPV6
            && net
                .addresses
                .values()
                .any(|a| matches!(a, ipnet::IpNet::V6(_))) =>
        {
            Err(DesiredError::TooSmallForIpv6 {
                at: net
                    .name_at
                    .as_ref()
                    .map(|p| format!("{p}: "))
                    .unwrap_or_default(),
                network: net.name.to_string(),
                max,
                min: crate::spec::MIN_MTU_IPV6,
                underlay: local.underlay.to_string(),
                underlay_mtu: local.underlay_mtu,
            })
        }
        None => Ok(max),
    }
}

/// Which networks to build: all member networks, or only the plaintext ones (when the
/// kernel cannot carry ESP or no keys can be agreed, encrypted networks stay down).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    All,
    PlaintextOnly,
}

pub fn build(
    spec: &Spec,
    local: &LocalNode<'_>,
    keys: &Keyring,
    scope: Scope,
) -> Result<KernelState, DesiredError> {
    let me = &local.node.name;
    // Name -> node, once: member lists are resolved per network and per peer.
    let index: NodeIndex<'_> = spec.nodes.iter().map(|n| (&n.name, n)).collect();
    let mut state = KernelState::default();
    let mut encrypted_peers = BTreeSet::new();
    let mut any_encrypted = false;
    // Thousands of entries: built in one sorted bulk load (`collect`), not by inserts.
    let mut fdb = Vec::new();
    for net in member_networks(spec, me) {
        if net.encrypted {
            any_encrypted = true;
            if scope == Scope::PlaintextOnly {
                // Not brought up now, but its MTU is the operator's input all the same:
                // one that cannot fit is refused now, not when ESP or keys come.
                network_mtu(net, local)?;
                continue;
            }
        }
        add_network(spec, &index, net, local, &mut state, &mut fdb)?;
        if net.encrypted {
            encrypted_peers.extend(peers(&index, net, me).map(|n| n.address));
        }
    }
    state.fdb = fdb.into_iter().collect();
    // Enforcement stays in place whenever the node has an encrypted network in the spec,
    // even one that is not brought up: nothing on the encrypted port leaves in plaintext.
    if any_encrypted {
        add_enforcement(spec, local, &encrypted_peers, keys, &mut state);
    }
    Ok(state)
}

type NodeIndex<'s> = BTreeMap<&'s NodeName, &'s Node>;

fn peers<'s>(
    index: &'s NodeIndex<'s>,
    net: &'s Network,
    me: &'s NodeName,
) -> impl Iterator<Item = &'s Node> {
    net.nodes
        .iter()
        .filter(move |n| *n != me)
        .filter_map(|n| index.get(n).copied())
}

fn add_network(
    spec: &Spec,
    index: &NodeIndex<'_>,
    net: &Network,
    local: &LocalNode<'_>,
    state: &mut KernelState,
    fdb: &mut Vec<FdbEntry>,
) -> Result<(), DesiredError> {
    let mtu = network_mtu(net, local)?;
    let alias = Link::alias_for(spec.cluster.name.as_str(), net.name.as_str());
    let bridge = IfName::bridge_for(net.vni);
    let vxlan = IfName::vxlan_for(net.vni);
    let port = if net.encrypted {
        spec.cluster.encrypted_data_port
    } else {
        spec.cluster.data_port
    };
    state.links.insert(
        bridge.clone(),
        Link {
            name: bridge.clone(),
            kind: LinkKind::Bridge,
            mtu,
            master: None,
            alias: alias.clone(),
            up: true,
        },
    );
    state.links.insert(
        vxlan.clone(),
        Link {
            name: vxlan.clone(),
            kind: LinkKind::Vxlan(VxlanParams {
                vni: net.vni.get(),
                local: local.node.address,
                port,
                underlay: local.underlay.clone(),
                // Fills the FDB with remote MACs from received packets; the all-zero
                // entries do the flooding.
                learning: true,
            }),
            mtu,
            master: Some(bridge.clone()),
            alias,
            up: true,
        },
    );
    if let Some(addr) = net.addresses.get(&local.node.name) {
        state.addresses.insert(Address {
            link: bridge,
            addr: *addr,
        });
    }
    fdb.extend(peers(index, net, &local.node.name).map(|peer| FdbEntry {
        link: vxlan.clone(),
        remote: peer.address,
    }));
    Ok(())
}

fn host_net(addr: IpAddr) -> IpNet {
    IpNet::from(addr)
}

fn any_net(like: IpAddr) -> IpNet {
    match like {
        IpAddr::V4(_) => IpNet::V4(ipnet::Ipv4Net::default()),
        IpAddr::V6(_) => IpNet::V6(ipnet::Ipv6Net::default()),
    }
}

fn add_enforcement(
    spec: &Spec,
    local: &LocalNode<'_>,
    peers: &BTreeSet<IpAddr>,
    keys: &Keyring,
    state: &mut KernelState,
) {
    let me = local.node.address;
    let dport = spec.cluster.encrypted_data_port;
    // Thousands of objects at scale: gathered per kind in key order (peers come
    // sorted), then bulk-loaded (`collect` sorts, which is a linear check on sorted
    // runs), which costs far less than a tree insert each.
    let (mut outs, mut ins) = (Vec::with_capacity(1 + peers.len()), Vec::new());
    let (mut inbound, mut outbound) = (Vec::with_capacity(peers.len()), Vec::new());
    let policy = |dir, src, dst, priority, action| {
        let id = PolicyId {
            dir,
            selector: Selector { src, dst, dport },
        };
        let policy = Policy {
            id,
            priority,
            action,
            reqid: OVERLAY_REQID,
        };
        (id, policy)
    };
    outs.push(policy(
        Direction::Out,
        any_net(me),
        any_net(me),
        CATCHALL_POLICY_PRIORITY,
        PolicyAction::Block,
    ));
    // Inbound, any destination: the kernel's VXLAN socket takes the port on every local
    // address, broadcast and multicast included (a frame to the subnet's broadcast
    // address or a second address of the node reaches the device too), so a catch-all
    // that named only our VTEP address would let plaintext in through the others.
    ins.push(policy(
        Direction::In,
        any_net(me),
        any_net(me),
        CATCHALL_POLICY_PRIORITY,
        PolicyAction::Esp {
            src: None,
            dst: None,
        },
    ));
    let lifetime = sa_lifetime(&spec.cluster);
    let sa = |src, dst, k: &DirectionKey| {
        let id = SaId {
            src,
            dst,
            spi: k.spi,
        };
        let sa = Sa {
            id,
            reqid: OVERLAY_REQID,
            key: k.key.clone(),
            replay_window: REPLAY_WINDOW,
            dport,
            lifetime,
        };
        (id, sa)
    };
    for &peer in peers {
        outs.push(policy(
            Direction::Out,
            host_net(me),
            host_net(peer),
            PAIR_POLICY_PRIORITY,
            PolicyAction::Esp {
                src: Some(me),
                dst: Some(peer),
            },
        ));
        ins.push(policy(
            Direction::In,
            host_net(peer),
            host_net(me),
            PAIR_POLICY_PRIORITY,
            PolicyAction::Esp {
                src: Some(peer),
                dst: Some(me),
            },
        ));
        if let Some(peer_keys) = keys.get(&peer) {
            inbound.extend(peer_keys.inbound.iter().map(|k| sa(peer, me, k)));
            outbound.extend(peer_keys.outbound.iter().map(|k| sa(me, peer, k)));
        }
    }
    state.policies = ins.into_iter().chain(outs).collect();
    state.sas = inbound.into_iter().chain(outbound).collect();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encrypted_mtu_is_the_largest_that_fits() {
        // Worked example: 1416 + 30 = 1446, +2 = 1448 (already a multiple of 4),
        // 20 + 8 + 8 + 1448 + 16 = 1500.
        assert_eq!(max_mtu(1500, false, true), 1416);
        assert_eq!(max_mtu(1500, false, false), 1450);
        assert_eq!(max_mtu(1500, true, false), 1430);
        assert_eq!(max_mtu(1500, true, true), 1396);
    }

    #[test]
    fn an_mtu_that_does_not_fit_is_reported_where_the_spec_wrote_it() {
        let text = "apiVersion: ovl/v1\ncluster:\n  name: t\nnodes:\n  - name: a\n    \
                    address: 192.0.2.1\nnetworks:\n  - name: big\n    vni: 5\n    mtu: 9000\n  \
                    - name: small\n    vni: 6\n";
        let spec = crate::spec::parse(text.as_bytes(), "net.yaml").unwrap();
        let local = LocalNode {
            node: &spec.nodes[0],
            underlay: "eth0".parse().unwrap(),
            underlay_mtu: 1500,
        };
        let err = network_mtu(&spec.networks[0], &local)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "net.yaml:10:10: network big: mtu 9000 does not fit: the underlay eth0 has mtu \
             1500, which leaves at most 1450 for this network"
        );
        // Without an explicit mtu, the largest that fits.
        assert_eq!(network_mtu(&spec.networks[1], &local), Ok(1450));
    }

    #[test]
    fn a_derived_mtu_too_small_for_ipv6_addresses_is_refused() {
        let text = "apiVersion: ovl/v1\ncluster:\n  name: t\nnodes:\n  - name: a\n    \
                    address: 2001:db8::1\nnetworks:\n  - name: six\n    vni: 5\n    \
                    addresses: {a: \"fd00:60::1/64\"}\n  - name: four\n    vni: 6\n    \
                    addresses: {a: 10.6.0.1/24}\n";
        let spec = crate::spec::parse(text.as_bytes(), "net.yaml").unwrap();
        let local = |underlay_mtu| LocalNode {
            node: &spec.nodes[0],
            underlay: "eth0".parse().unwrap(),
            underlay_mtu,
        };
        // 1300 - 70 = 1230: no room for IPv6, fine for IPv4.
        let err = network_mtu(&spec.networks[0], &local(1300))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "net.yaml:8:11: network six: the underlay eth0 (mtu 1300) leaves at most 1230 for \
             this network, below the 1280 that its IPv6 addresses need"
        );
        assert_eq!(network_mtu(&spec.networks[1], &local(1300)), Ok(1230));
        assert_eq!(network_mtu(&spec.networks[0], &local(1350)), Ok(1280));
    }

    #[test]
    fn encrypted_mtu_never_exceeds_underlay() {
        for underlay in 200..9100u32 {
            for ipv6 in [false, true] {
                let mtu = max_mtu(underlay, ipv6, true);
                let outer = if ipv6 { 40 } else { 20 };
                let esp = 8 + 8 + (30 + mtu + 2).div_ceil(4) * 4 + 16;
                assert!(outer + esp <= underlay, "{underlay} {ipv6} {mtu}");
                let esp_next = 8 + 8 + (30 + mtu + 1 + 2).div_ceil(4) * 4 + 16;
                assert!(
                    outer + esp_next > underlay,
                    "not maximal: {underlay} {ipv6} {mtu}"
                );
            }
        }
    }
}
