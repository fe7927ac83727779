//! Raw model -> [`Spec`]: every rule of DESIGN.md's "Spec file" section, each rejection
//! pointing at the value to fix (for duplicates: the second occurrence, naming the line
//! of the first).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde_saphyr::{Location, Spanned};

use super::fields;
use super::raw::{RawCluster, RawNetwork, RawNode, RawSpec, Req, Scalar, quote};
use super::types::{
    Cluster, DEFAULT_CONTROL_PORT, DEFAULT_DATA_PORT, DEFAULT_ENCRYPTED_DATA_PORT,
    DEFAULT_REKEY_BYTES, DEFAULT_REKEY_PACKETS, DEFAULT_ROTATION, MAX_MTU, MAX_NETWORKS, MAX_NODES,
    MAX_REKEY_BYTES, MAX_REKEY_PACKETS, MAX_ROTATION, MIN_MTU, MIN_MTU_IPV6, MIN_REKEY_BYTES,
    MIN_REKEY_PACKETS, MIN_ROTATION, Name, Network, Node, NodeName, SourcePos, Spec, SpecError,
    Vni,
};

/// The only `apiVersion` this build understands.
pub(super) const API_VERSION: &str = "ovl/v1";

/// Builds [`SpecError`]s for one source.
pub(super) struct Errors<'a> {
    pub source_name: &'a str,
}

impl Errors<'_> {
    /// An error at `loc`; an unknown location (line 0) becomes 1:1.
    pub fn at(&self, loc: Location, reason: impl Into<String>) -> SpecError {
        let (line, column) = if loc.line() == 0 {
            (1, 1)
        } else {
            (loc.line(), loc.column().max(1))
        };
        SpecError {
            source_name: self.source_name.to_owned(),
            line,
            column,
            reason: one_line(&reason.into()),
        }
    }

    /// Where `loc` is, kept for errors found later.
    pub fn pos(&self, loc: Location) -> SourcePos {
        let SpecError {
            source_name,
            line,
            column,
            ..
        } = self.at(loc, "");
        SourcePos {
            source_name,
            line,
            column,
        }
    }
}

/// Collapse any line breaks (and runs of whitespace around them) into single spaces.
pub(super) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Where a value was written: the use site, or the definition when that is all we have.
pub(super) fn loc<T>(s: &Spanned<T>) -> Location {
    if s.referenced == Location::UNKNOWN {
        s.defined
    } else {
        s.referenced
    }
}

/// The value of a required field and where it is: a missing field is reported at its
/// parent mapping (`parent`, described as `within`), a null one at the null.
fn required<'a, T>(
    e: &Errors<'_>,
    field: &'a Req<T>,
    name: &str,
    within: &str,
    parent: Location,
) -> Result<(&'a T, Location), SpecError> {
    match &field.0 {
        None => Err(e.at(
            parent,
            format!("missing required field `{name}` in {within}"),
        )),
        Some(s) => match &s.value {
            None => Err(e.at(loc(s), format!("`{name}` is null: it needs a value"))),
            Some(v) => Ok((v, loc(s))),
        },
    }
}

pub(super) fn check_api_version(e: &Errors<'_>, v: &str, at: Location) -> Result<(), SpecError> {
    if v == API_VERSION {
        Ok(())
    } else {
        Err(e.at(
            at,
            format!(
                "unsupported apiVersion {}: this version of ovl-controller reads {API_VERSION}",
                quote(v)
            ),
        ))
    }
}

/// Validate the whole spec; `top` is where its mapping starts.
pub(super) fn spec(e: &Errors<'_>, raw: &RawSpec, top: Location) -> Result<Spec, SpecError> {
    let (api, at) = required(e, &raw.api_version, "apiVersion", "the spec", top)?;
    check_api_version(e, api, at)?;
    let (raw_cluster, at) = required(e, &raw.cluster, "cluster", "the spec", top)?;
    let cluster = cluster(e, raw_cluster, at)?;
    let (raw_nodes, at) = required(e, &raw.nodes, "nodes", "the spec", top)?;
    let nodes = nodes(e, raw_nodes, at)?;
    let index: HashMap<Name, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.clone(), i))
        .collect();
    let mut networks = Vec::new();
    if let Some(raw_networks) = &raw.networks {
        if let Some(extra) = raw_networks.value.get(MAX_NETWORKS) {
            return Err(e.at(
                loc(extra),
                format!("too many networks: at most {MAX_NETWORKS} are supported"),
            ));
        }
        let mut names: HashMap<Name, u64> = HashMap::new();
        let mut vnis: HashMap<Vni, (u64, Name)> = HashMap::new();
        let mut bridge_addresses = SeenAddresses::default();
        for raw_net in &raw_networks.value {
            let (net, name_loc, vni_loc) = network(
                e,
                &raw_net.value,
                loc(raw_net),
                raw_nodes,
                &nodes,
                &index,
                &mut bridge_addresses,
            )?;
            if let Some(first) = names.insert(net.name.clone(), name_loc.line()) {
                return Err(e.at(
                    name_loc,
                    format!(
                        "duplicate network name `{}` (first defined at line {first})",
                        net.name
                    ),
                ));
            }
            if let Some((first, other)) = vnis.insert(net.vni, (vni_loc.line(), net.name.clone())) {
                return Err(e.at(
                    vni_loc,
                    format!(
                        "duplicate vni {}: network `{other}` uses it already (line {first})",
                        net.vni
                    ),
                ));
            }
            networks.push(net);
        }
    }
    Ok(Spec {
        cluster,
        nodes,
        networks,
    })
}

/// Bridge addresses already seen in earlier networks, for the checks across networks.
#[derive(Default)]
struct SeenAddresses {
    /// Address -> (line, network).
    addresses: HashMap<IpAddr, (u64, Name)>,
    /// Node -> its subnets in earlier networks: (subnet, network, line).
    subnets: HashMap<Name, Vec<(IpNet, Name, u64)>>,
}

impl SeenAddresses {
    /// A bridge address is unique in the whole spec: no other network has it, on any
    /// node, and it is no node's underlay address. A node's networks do not overlap
    /// either: its routes could not tell them apart. (Duplicates inside one network are
    /// caught with the network.)
    fn check(
        &mut self,
        e: &Errors<'_>,
        at: Location,
        node: &Name,
        address: IpNet,
        network: &Name,
        nodes: &[Node],
    ) -> Result<(), SpecError> {
        let ip = address.addr();
        if let Some(owner) = nodes.iter().find(|n| n.address == ip) {
            return Err(e.at(
                at,
                format!(
                    "address {ip} in network `{network}` is the underlay address of node `{}`",
                    owner.name
                ),
            ));
        }
        // The bridge's subnet becomes a route on the node: one that holds an underlay
        // address would take the VXLAN traffic to that node into the overlay itself.
        let subnet = address.trunc();
        if let Some(owner) = nodes.iter().find(|n| subnet.contains(&n.address)) {
            return Err(e.at(
                at,
                format!(
                    "address {address} in network `{network}`: its subnet {subnet} holds the \
                     underlay address {} of node `{}`, and its route would cut the nodes off \
                     from each other",
                    owner.address, owner.name
                ),
            ));
        }
        if let Some((line, other)) = self.addresses.get(&ip) {
            return Err(e.at(
                at,
                format!(
                    "duplicate address {ip} in network `{network}`: network `{other}` has it \
                     already (line {line})"
                ),
            ));
        }
        let theirs = self.subnets.entry(node.clone()).or_default();
        if let Some((other_subnet, other, line)) = theirs
            .iter()
            .find(|(s, _, _)| s.contains(&subnet.network()) || subnet.contains(&s.network()))
        {
            return Err(e.at(
                at,
                format!(
                    "address {address} of node `{node}` in network `{network}` overlaps subnet \
                     {other_subnet} of network `{other}` on the same node (line {line}): its \
                     routes could not tell the two networks apart"
                ),
            ));
        }
        theirs.push((subnet, network.clone(), at.line()));
        self.addresses.insert(ip, (at.line(), network.clone()));
        Ok(())
    }
}

fn cluster(e: &Errors<'_>, raw: &RawCluster, at: Location) -> Result<Cluster, SpecError> {
    let (name, name_loc) = required(e, &raw.name, "name", "cluster", at)?;
    let name = fields::name("cluster name", name).map_err(|r| e.at(name_loc, r))?;
    let port = |what: &str, v: &Option<Spanned<Scalar>>, default: u16| match v {
        None
        | Some(Spanned {
            value: Scalar::Null,
            ..
        }) => Ok(default),
        Some(v) => fields::port(what, &v.value).map_err(|r| e.at(loc(v), r)),
    };
    let control_port = port("controlPort", &raw.control_port, DEFAULT_CONTROL_PORT)?;
    let data_port = port("dataPort", &raw.data_port, DEFAULT_DATA_PORT)?;
    let encrypted_data_port = port(
        "encryptedDataPort",
        &raw.encrypted_data_port,
        DEFAULT_ENCRYPTED_DATA_PORT,
    )?;
    if data_port == encrypted_data_port {
        // Point at whichever of the two was written, the encrypted one first.
        let at = raw
            .encrypted_data_port
            .as_ref()
            .or(raw.data_port.as_ref())
            .map(loc)
            .unwrap_or(at);
        return Err(e.at(
            at,
            format!(
                "encryptedDataPort {encrypted_data_port} must differ from dataPort \
                 {data_port}: the kernel needs distinct UDP ports for plaintext and \
                 encrypted VXLAN"
            ),
        ));
    }
    let rotation = match &raw.rotation {
        None => DEFAULT_ROTATION,
        Some(r) => {
            let d = fields::duration(&r.value).map_err(|why| e.at(loc(r), why))?;
            if !(MIN_ROTATION..=MAX_ROTATION).contains(&d) {
                return Err(e.at(
                    loc(r),
                    format!(
                        "rotation {} is out of range: use {} to {}",
                        quote(&r.value),
                        fields::show_duration(MIN_ROTATION),
                        fields::show_duration(MAX_ROTATION)
                    ),
                ));
            }
            d
        }
    };
    let limit = |what: &str, v: &Option<Spanned<Scalar>>, lo: u64, hi: u64, default: u64| match v {
        None
        | Some(Spanned {
            value: Scalar::Null,
            ..
        }) => Ok(default),
        Some(v) => fields::int_in_u64(what, &v.value, lo, hi).map_err(|r| e.at(loc(v), r)),
    };
    let rekey_after_packets = limit(
        "rekeyAfterPackets",
        &raw.rekey_after_packets,
        MIN_REKEY_PACKETS,
        MAX_REKEY_PACKETS,
        DEFAULT_REKEY_PACKETS,
    )?;
    let rekey_after_bytes = limit(
        "rekeyAfterBytes",
        &raw.rekey_after_bytes,
        MIN_REKEY_BYTES,
        MAX_REKEY_BYTES,
        DEFAULT_REKEY_BYTES,
    )?;
    Ok(Cluster {
        name,
        control_port,
        data_port,
        encrypted_data_port,
        rotation,
        rekey_after_packets,
        rekey_after_bytes,
    })
}

fn nodes(e: &Errors<'_>, raw: &[Spanned<RawNode>], at: Location) -> Result<Vec<Node>, SpecError> {
    if raw.is_empty() {
        return Err(e.at(at, "nodes is empty: a spec needs at least one node"));
    }
    if let Some(extra) = raw.get(MAX_NODES) {
        return Err(e.at(
            loc(extra),
            format!("too many nodes: at most {MAX_NODES} are supported"),
        ));
    }
    let mut out: Vec<Node> = Vec::with_capacity(raw.len());
    let mut names: HashMap<Name, u64> = HashMap::new();
    let mut addresses: HashMap<IpAddr, (u64, Name)> = HashMap::new();
    let mut keys: HashMap<[u8; 32], (u64, Name)> = HashMap::new();
    for node in raw {
        let n = &node.value;
        let (name, name_loc) = required(e, &n.name, "name", "node", loc(node))?;
        let name = fields::name("node name", name).map_err(|r| e.at(name_loc, r))?;
        if let Some(first) = names.insert(name.clone(), name_loc.line()) {
            return Err(e.at(
                name_loc,
                format!("duplicate node name `{name}` (first defined at line {first})"),
            ));
        }
        let (address, address_loc) = required(e, &n.address, "address", "node", loc(node))?;
        let address = fields::underlay_address(address).map_err(|r| e.at(address_loc, r))?;
        let here = (address_loc.line(), name.clone());
        if let Some((first, other)) = addresses.insert(address, here) {
            return Err(e.at(
                address_loc,
                format!(
                    "duplicate node address {address}: node `{other}` has it already \
                     (line {first})"
                ),
            ));
        }
        let public_key = match &n.public_key {
            None => None,
            Some(k) => {
                let key = fields::public_key(&k.value).map_err(|r| e.at(loc(k), r))?;
                if let Some((first, other)) = keys.insert(key.0, (loc(k).line(), name.clone())) {
                    return Err(e.at(
                        loc(k),
                        format!(
                            "duplicate publicKey: node `{other}` has the same key (line \
                             {first}); every node needs its own key from `ovl-controller keygen`"
                        ),
                    ));
                }
                Some(key)
            }
        };
        out.push(Node {
            name,
            address,
            public_key,
        });
    }
    Ok(out)
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// One network (whose mapping starts at `at`), checked against the already validated
/// nodes and the bridge addresses of the networks before it; `raw_nodes[i]` is the
/// source of `nodes[i]`. Also returns where its name and vni are, for the checks across
/// networks.
fn network(
    e: &Errors<'_>,
    raw: &RawNetwork,
    at: Location,
    raw_nodes: &[Spanned<RawNode>],
    nodes: &[Node],
    index: &HashMap<Name, usize>,
    across: &mut SeenAddresses,
) -> Result<(Network, Location, Location), SpecError> {
    let (name, name_loc) = required(e, &raw.name, "name", "network", at)?;
    let name = fields::name("network name", name).map_err(|r| e.at(name_loc, r))?;
    let (vni, vni_loc) = required(e, &raw.vni, "vni", "network", at)?;
    let vni = fields::int_in("vni", vni, 1, Vni::MAX)
        .and_then(|v| Vni::new(v).ok_or_else(|| format!("vni {v} is out of range")))
        .map_err(|r| e.at(vni_loc, r))?;
    let encrypted = match &raw.encrypted {
        None
        | Some(Spanned {
            value: Scalar::Null,
            ..
        }) => false,
        Some(v) => fields::boolean("encrypted", &v.value).map_err(|r| e.at(loc(v), r))?,
    };
    let mtu = match &raw.mtu {
        None
        | Some(Spanned {
            value: Scalar::Null,
            ..
        }) => None,
        Some(v) => {
            Some(fields::int_in("mtu", &v.value, MIN_MTU, MAX_MTU).map_err(|r| e.at(loc(v), r))?)
        }
    };

    // Members, each with where it was named (the `nodes` entry, or the network's name
    // when membership is the default "every node").
    let mut members: Vec<(usize, Location)> = Vec::new();
    match &raw.nodes {
        None => members.extend((0..nodes.len()).map(|i| (i, name_loc))),
        Some(list) => {
            if list.value.is_empty() {
                return Err(e.at(
                    loc(list),
                    format!(
                        "network `{name}` lists no nodes: leave `nodes` out to mean every \
                         node, or name at least one"
                    ),
                ));
            }
            let mut listed: HashMap<usize, u64> = HashMap::new();
            for entry in &list.value {
                let at = loc(entry);
                let n = fields::name("node name", &entry.value).map_err(|r| e.at(at, r))?;
                let idx = *index.get(&n).ok_or_else(|| {
                    e.at(at, format!("network `{name}` names unknown node `{n}`"))
                })?;
                if let Some(first) = listed.insert(idx, at.line()) {
                    return Err(e.at(
                        at,
                        format!("network `{name}` lists node `{n}` twice (first at line {first})"),
                    ));
                }
                members.push((idx, at));
            }
        }
    }

    // One underlay family per network: a VXLAN device has one local address.
    if let Some(&(first, _)) = members.first() {
        let want = nodes[first].address;
        if let Some(&(odd, at)) = members
            .iter()
            .find(|(i, _)| nodes[*i].address.is_ipv4() != want.is_ipv4())
        {
            return Err(e.at(
                at,
                format!(
                    "network `{name}` mixes {} and {} underlay addresses (node `{}` is {}, node \
                     `{}` is {}): all members of a network must use the same address family",
                    family(want),
                    family(nodes[odd].address),
                    nodes[first].name,
                    want,
                    nodes[odd].name,
                    nodes[odd].address
                ),
            ));
        }
    }

    let addresses = addresses(e, raw, &name, nodes, index, &members, across)?;
    if let Some(m) = mtu
        && m < MIN_MTU_IPV6
        && addresses.values().any(|a| matches!(a, IpNet::V6(_)))
    {
        let at = raw.mtu.as_ref().map(loc).unwrap_or(name_loc);
        return Err(e.at(
            at,
            format!(
                "mtu {m} is too small for network `{name}`, which has IPv6 addresses: IPv6 \
                 needs at least {MIN_MTU_IPV6}"
            ),
        ));
    }

    if encrypted {
        for &(idx, _) in &members {
            if nodes[idx].public_key.is_none() {
                return Err(e.at(
                    loc(&raw_nodes[idx]),
                    format!(
                        "node `{}` has no publicKey but is a member of encrypted network \
                         `{name}`: add the key printed by `ovl-controller keygen`",
                        nodes[idx].name
                    ),
                ));
            }
        }
    }

    let mut member_names: Vec<NodeName> = members
        .iter()
        .map(|(i, _)| nodes[*i].name.clone())
        .collect();
    member_names.sort();
    let network = Network {
        name,
        vni,
        encrypted,
        mtu,
        mtu_at: raw.mtu.as_ref().map(|m| e.pos(loc(m))),
        name_at: Some(e.pos(name_loc)),
        nodes: member_names,
        addresses,
    };
    Ok((network, name_loc, vni_loc))
}

/// The `addresses` map: members only, usable host addresses, no two alike, one subnet,
/// and none clashing with other networks' (`across`).
fn addresses(
    e: &Errors<'_>,
    raw: &RawNetwork,
    name: &Name,
    nodes: &[Node],
    index: &HashMap<Name, usize>,
    members: &[(usize, Location)],
    across: &mut SeenAddresses,
) -> Result<BTreeMap<NodeName, IpNet>, SpecError> {
    let mut out = BTreeMap::new();
    let Some(entries) = &raw.addresses else {
        return Ok(out);
    };
    let is_member: HashSet<usize> = members.iter().map(|(i, _)| *i).collect();
    // (address, node, line) of the first entry: the subnet every other must share.
    let mut first: Option<(IpNet, Name, u64)> = None;
    let mut seen: HashMap<IpAddr, (u64, Name)> = HashMap::new();
    for (key, value) in &entries.value.0 {
        let node = fields::name("node name", &key.value).map_err(|r| e.at(loc(key), r))?;
        let Some(idx) = index.get(&node) else {
            return Err(e.at(
                loc(key),
                format!("addresses of network `{name}` name unknown node `{node}`"),
            ));
        };
        if !is_member.contains(idx) {
            return Err(e.at(
                loc(key),
                format!(
                    "addresses of network `{name}` name node `{node}`, which is not a member \
                     of the network"
                ),
            ));
        }
        let at = loc(value);
        let net = fields::bridge_address(&value.value).map_err(|r| e.at(at, r))?;
        if let Some((line, other)) = seen.insert(net.addr(), (at.line(), node.clone())) {
            return Err(e.at(
                at,
                format!(
                    "duplicate address {} in network `{name}`: node `{other}` has it already \
                     (line {line})",
                    net.addr()
                ),
            ));
        }
        match &first {
            None => first = Some((net, node.clone(), at.line())),
            Some((f, other, line)) => {
                if f.trunc() != net.trunc() {
                    return Err(e.at(
                        at,
                        format!(
                            "address {net} of node `{node}` is not in subnet {} of node \
                             `{other}` (line {line}): all addresses of network `{name}` \
                             must share one subnet",
                            f.trunc()
                        ),
                    ));
                }
            }
        }
        across.check(e, at, &node, net, name, nodes)?;
        out.insert(node, net);
    }
    Ok(out)
}
