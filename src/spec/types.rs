//! Validated spec types. Constructed only by [`super::parse`], so code that holds a
//! [`Spec`] can trust every invariant listed in DESIGN.md.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

pub const DEFAULT_CONTROL_PORT: u16 = 7946;
pub const DEFAULT_DATA_PORT: u16 = 4789;
pub const DEFAULT_ENCRYPTED_DATA_PORT: u16 = 4790;
/// Rekey after 2^31 packets per SA: far below the 2^64 sequence space of ESN and the
/// AES-GCM usage bound, so keys never come near either.
pub const DEFAULT_REKEY_PACKETS: u64 = 1 << 31;
/// Small limits are for tests and demos (a rekey every few thousand packets).
pub const MIN_REKEY_PACKETS: u64 = 100;
/// Above 2^40 packets a key would be used for too long.
pub const MAX_REKEY_PACKETS: u64 = 1 << 40;
/// Rekey after 2^40 bytes (1 TiB) per SA.
pub const DEFAULT_REKEY_BYTES: u64 = 1 << 40;
pub const MIN_REKEY_BYTES: u64 = 1 << 16;
pub const MAX_REKEY_BYTES: u64 = 1 << 50;
/// The kernel deletes an SA (hard limit) at this multiple of the soft limit: the
/// window in which the agents must finish a rekey. If an agent is down that long the
/// SA goes and traffic fails closed rather than wearing a key out.
pub const HARD_LIMIT_FACTOR: u64 = 4;

pub const DEFAULT_ROTATION: Duration = Duration::from_secs(12 * 3600);

/// Shortest accepted `rotation`: a rotation needs a few seconds of its own (an offer, its
/// retry after 3 s, the old key's 2 s grace); 10 s leaves room for that and lets a test
/// cluster watch automatic rotation. Production intervals are hours.
pub const MIN_ROTATION: Duration = Duration::from_secs(10);
/// Longest accepted `rotation`: keys should not live for months even on a quiet network;
/// 30 days keeps the "fresh keys" promise meaningful.
pub const MAX_ROTATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Most nodes in one spec. The cap bounds the work and memory a hostile or mistaken
/// spec can cause; it sits above the 3000 peers the apply benchmarks scale to (an
/// encrypted full mesh of that size is 4 SAs and 2 policies per peer on every node).
pub const MAX_NODES: usize = 4096;
/// Most networks in one spec: each is a bridge and a VXLAN device on every member.
pub const MAX_NETWORKS: usize = 1024;

/// Smallest overlay MTU: the IPv4 minimum (RFC 791).
pub const MIN_MTU: u32 = 68;
/// Smallest overlay MTU for a network whose bridge addresses include IPv6 (RFC 8200).
pub const MIN_MTU_IPV6: u32 = 1280;
/// Largest overlay MTU: leaves room under the 65535-byte IP limit for the outer IPv6,
/// UDP, VXLAN and ESP headers.
pub const MAX_MTU: u32 = 65000;

/// Shortest accepted IPv4 prefix of a bridge address (a /8 is the widest private block).
pub const MIN_PREFIX_V4: u8 = 8;
/// Longest accepted IPv4 prefix: a /30 is the smallest subnet with two usable hosts.
pub const MAX_PREFIX_V4: u8 = 30;
/// Shortest accepted IPv6 prefix of a bridge address.
pub const MIN_PREFIX_V6: u8 = 16;
/// Longest accepted IPv6 prefix: a /127 still holds two hosts (RFC 6164).
pub const MAX_PREFIX_V6: u8 = 127;

/// A 24-bit VXLAN network identifier, 1..=16777215.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Vni(u32);

impl Vni {
    pub const MAX: u32 = 0x00ff_ffff;

    pub fn new(v: u32) -> Option<Vni> {
        (1..=Self::MAX).contains(&v).then_some(Vni(v))
    }
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Vni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Names of clusters, nodes and networks: 1..=63 characters of `[A-Za-z0-9._-]`,
/// starting with an alphanumeric. Kept simple so they are safe in link aliases, logs and
/// file names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    pub const MAX_LEN: usize = 63;

    pub fn new(s: &str) -> Option<Name> {
        let ok = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        ok.then(|| Name(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub type NodeName = Name;
pub type NetworkName = Name;

/// A node's static X25519 control-plane public key (32 bytes; base64 in the spec).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Standard base64 of the 32 bytes, 44 characters, as WireGuard writes keys.
    pub fn to_base64(&self) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }
    pub fn from_base64(s: &str) -> Option<PublicKey> {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .ok()?;
        Some(PublicKey(bytes.try_into().ok()?))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub cluster: Cluster,
    pub nodes: Vec<Node>,
    pub networks: Vec<Network>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    pub name: Name,
    pub control_port: u16,
    pub data_port: u16,
    pub encrypted_data_port: u16,
    pub rotation: Duration,
    /// Soft packet limit of every SA: the kernel reports it and the agents rekey.
    pub rekey_after_packets: u64,
    /// Soft byte limit of every SA.
    pub rekey_after_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: NodeName,
    /// Underlay VTEP address.
    pub address: IpAddr,
    pub public_key: Option<PublicKey>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    pub name: NetworkName,
    pub vni: Vni,
    pub encrypted: bool,
    /// Explicit MTU of the overlay; `None` means derived from the underlay.
    pub mtu: Option<u32>,
    /// Where `mtu` was written: whether it fits is known only on the node, against its
    /// underlay, and that error points here too.
    pub mtu_at: Option<SourcePos>,
    /// Where the network's name was written: errors about the network found only on the
    /// node (its derived MTU cannot serve it) point here.
    pub name_at: Option<SourcePos>,
    /// Member nodes, resolved: every node when the spec leaves `nodes` out. Sorted, unique.
    pub nodes: Vec<NodeName>,
    /// Address put on this network's bridge, per member node.
    pub addresses: BTreeMap<NodeName, IpNet>,
}

impl Spec {
    pub fn node(&self, name: &Name) -> Option<&Node> {
        self.nodes.iter().find(|n| &n.name == name)
    }
    pub fn network(&self, name: &Name) -> Option<&Network> {
        self.networks.iter().find(|n| &n.name == name)
    }
}

impl Network {
    pub fn has_member(&self, node: &Name) -> bool {
        self.nodes.iter().any(|n| n == node)
    }
}

/// A place in a spec file. Displays as `file:line:column`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourcePos {
    pub source_name: String,
    pub line: u64,
    pub column: u64,
}

impl std::fmt::Display for SourcePos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.source_name, self.line, self.column)
    }
}

/// A rejected spec: where and why. Displays as `file:line:column: reason`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}:{line}:{column}: {reason}")]
pub struct SpecError {
    pub source_name: String,
    pub line: u64,
    pub column: u64,
    pub reason: String,
}
