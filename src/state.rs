//! The kernel objects the controller owns, as plain data.
//!
//! One model serves both sides of the diff: [`crate::desired`] builds a [`KernelState`]
//! from the spec, [`crate::kernel`] dumps the observed one, and [`crate::plan`] compares
//! them. Only objects the controller owns ever appear here (see [`ownership`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

use crate::keys::SaKey;

/// How the controller recognises its own objects.
///
/// Links: the name has one of our prefixes *and* the alias starts with
/// [`ownership::ALIAS_PREFIX`]; a user's link that happens to share a name prefix is not
/// ours. FDB entries: all-zero-MAC entries on our own VXLAN devices. Addresses: the
/// global addresses on our bridges. XFRM states and policies: a reqid in
/// [`ownership::REQID_MIN`]..=[`ownership::REQID_MAX`] (XFRM marks cannot be used: the
/// VXLAN device cannot mark its packets, so a marked inbound SA would never match).
pub mod ownership {
    pub const BRIDGE_PREFIX: &str = "ovbr-";
    pub const VXLAN_PREFIX: &str = "ovvx-";
    pub const ALIAS_PREFIX: &str = "ovl-controller";
    /// Reserved reqid range for our SAs and policy templates ("0vl" in the high bits).
    pub const REQID_MIN: u32 = 0x0f71_0000;
    pub const REQID_MAX: u32 = 0x0f71_ffff;

    pub fn is_owned_reqid(reqid: u32) -> bool {
        (REQID_MIN..=REQID_MAX).contains(&reqid)
    }

    /// The device group a link of ours is created in and left only when its alias is
    /// set (in the same request): a link in it is one whose creation was interrupted.
    /// ("0vl" in the high bits, as the reqids.)
    pub const HALF_CREATED_GROUP: u32 = 0x0f71_0000;

    /// True when the link name and alias both say the link is ours, or when it has our
    /// name, no alias, and our half-created group (a create of ours was interrupted:
    /// the plan finishes it, or deletes it when the spec no longer wants it).
    pub fn is_owned_link(name: &str, alias: Option<&str>, group: u32) -> bool {
        (name.starts_with(BRIDGE_PREFIX) || name.starts_with(VXLAN_PREFIX))
            && match alias {
                Some(a) => a.starts_with(ALIAS_PREFIX),
                None => group == HALF_CREATED_GROUP,
            }
    }
}

/// A Linux interface name: 1..=15 bytes, no '/', no whitespace, not "." or "..".
///
/// Stored inline (no heap allocation): thousands of FDB entries and addresses name
/// their link, and each clone or comparison of a `String` cost an allocation or a
/// pointer chase. Ordered as the string is.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IfName {
    len: u8,
    /// The name's bytes, zero after `len` (so that derived equality is the string's).
    bytes: [u8; IfName::MAX_LEN],
}

impl IfName {
    pub const MAX_LEN: usize = 15;
    pub fn as_str(&self) -> &str {
        // Only ever built from a `&str` of at most MAX_LEN bytes: always valid UTF-8.
        std::str::from_utf8(self.name_bytes()).unwrap_or_default()
    }
    fn name_bytes(&self) -> &[u8] {
        self.bytes.get(..usize::from(self.len)).unwrap_or_default()
    }
    pub fn bridge_for(vni: crate::spec::Vni) -> IfName {
        IfName::with_prefix(ownership::BRIDGE_PREFIX, vni)
    }
    pub fn vxlan_for(vni: crate::spec::Vni) -> IfName {
        IfName::with_prefix(ownership::VXLAN_PREFIX, vni)
    }
    /// `prefix` + the VNI: at most 5 + 8 bytes (VNIs are 24-bit), always a valid name.
    fn with_prefix(prefix: &str, vni: crate::spec::Vni) -> IfName {
        IfName::from_valid(&format!("{prefix}{vni}"))
    }
    /// `s` already checked (or known) to be a valid name.
    fn from_valid(s: &str) -> IfName {
        let mut bytes = [0u8; IfName::MAX_LEN];
        let len = s.len().min(IfName::MAX_LEN);
        bytes[..len].copy_from_slice(&s.as_bytes()[..len]);
        IfName {
            len: len as u8,
            bytes,
        }
    }
}

impl Ord for IfName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Byte order is `str` order; no UTF-8 check on this hot path.
        self.name_bytes().cmp(other.name_bytes())
    }
}

impl PartialOrd for IfName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("IfName").field(&self.as_str()).finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid interface name {0:?}: 1 to 15 bytes, no '/' or white space")]
pub struct BadIfName(String);

impl FromStr for IfName {
    type Err = BadIfName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s != "."
            && s != ".."
            && !s
                .bytes()
                .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace());
        if ok {
            Ok(IfName::from_valid(s))
        } else {
            Err(BadIfName(s.to_owned()))
        }
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkKind {
    Bridge,
    Vxlan(VxlanParams),
}

/// VXLAN parameters fixed at creation: changing any of them means recreating the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanParams {
    pub vni: u32,
    /// Local VTEP address (underlay).
    pub local: IpAddr,
    /// UDP destination port.
    pub port: u16,
    /// Underlay device that holds `local`.
    pub underlay: IfName,
    /// Learning of remote MACs from received packets (always on for ours; off only by
    /// someone's hand, which the plan then repairs).
    pub learning: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: IfName,
    pub kind: LinkKind,
    pub mtu: u32,
    /// Bridge this link is a port of.
    pub master: Option<IfName>,
    /// Ownership mark and description: `ovl-controller cluster=C network=N`.
    pub alias: String,
    pub up: bool,
}

impl Link {
    pub fn alias_for(cluster: &str, network: &str) -> String {
        format!(
            "{} cluster={} network={}",
            ownership::ALIAS_PREFIX,
            cluster,
            network
        )
    }
    /// The network name recorded in the alias, if any.
    pub fn network_from_alias(&self) -> Option<&str> {
        self.alias
            .split(' ')
            .find_map(|kv| kv.strip_prefix("network="))
    }
    pub fn cluster_from_alias(&self) -> Option<&str> {
        self.alias
            .split(' ')
            .find_map(|kv| kv.strip_prefix("cluster="))
    }
}

/// An address on one of our bridges.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Address {
    pub link: IfName,
    pub addr: IpNet,
}

/// A head-end replication entry: `00:00:00:00:00:00 dst REMOTE` on a VXLAN device.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FdbEntry {
    pub link: IfName,
    pub remote: IpAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    In,
    Out,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::In => "in",
            Direction::Out => "out",
        })
    }
}

/// What an XFRM policy matches: UDP to `dport`, from `src` to `dst`.
/// The kernel identifies a policy by (selector, direction).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    pub src: IpNet,
    pub dst: IpNet,
    /// UDP destination port (protocol is always UDP).
    pub dport: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyId {
    pub dir: Direction,
    pub selector: Selector,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyAction {
    /// Drop everything the selector matches.
    Block,
    /// Require ESP transport between `src` and `dst` (both unspecified for a catch-all
    /// inbound policy) through an SA with our reqid.
    Esp {
        src: Option<IpAddr>,
        dst: Option<IpAddr>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub id: PolicyId,
    /// Lower wins. Per-pair policies beat the catch-alls.
    pub priority: u32,
    pub action: PolicyAction,
    /// Owned reqid, carried in the policy template.
    pub reqid: u32,
}

/// The kernel identifies an SA by (destination, SPI, protocol); protocol is always ESP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SaId {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub spi: u32,
}

/// Lifetime limits of one SA; soft ones trigger a rekey, hard ones delete the SA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Lifetime {
    pub soft_bytes: u64,
    pub hard_bytes: u64,
    pub soft_packets: u64,
    pub hard_packets: u64,
    pub soft_add_seconds: u64,
    pub hard_add_seconds: u64,
}

/// An ESP transport SA: AES-256-GCM (`rfc4106(gcm(aes))`, 36 bytes key+salt, ICV 128),
/// ESN, replay window, selector pinned to the VTEP pair and the encrypted UDP port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sa {
    pub id: SaId,
    pub reqid: u32,
    pub key: SaKey,
    pub replay_window: u32,
    pub dport: u16,
    pub lifetime: Lifetime,
}

impl Sa {
    /// Equal as installed SAs: the same key on the same SPI, pair and port. Lifetimes
    /// are left out: a changed limit applies to the next key, because putting the same
    /// key back in a new SA would restart its sequence numbers (AES-GCM nonce reuse).
    pub fn same_install(&self, other: &Sa) -> bool {
        self.id == other.id
            && self.key == other.key
            && self.reqid == other.reqid
            && self.dport == other.dport
            && self.replay_window == other.replay_window
    }
}

/// Everything the controller owns in one network namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelState {
    pub links: BTreeMap<IfName, Link>,
    pub addresses: BTreeSet<Address>,
    pub fdb: BTreeSet<FdbEntry>,
    pub policies: BTreeMap<PolicyId, Policy>,
    pub sas: BTreeMap<SaId, Sa>,
}
