//! Parsers for the spec's scalar values (names, integers, durations, addresses, keys).
//! Each returns the one-line reason on failure; the caller adds the location.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::IpNet;

use super::raw::{Scalar, quote};
use super::types::{MAX_PREFIX_V4, MAX_PREFIX_V6, MIN_PREFIX_V4, MIN_PREFIX_V6, Name, PublicKey};

/// A name under [`Name::new`]'s rules; `what` is e.g. "node name".
pub(super) fn name(what: &str, s: &str) -> Result<Name, String> {
    Name::new(s).ok_or_else(|| {
        format!(
            "invalid {what} {}: use 1 to {} characters of letters, digits, '.', '_' and '-', \
             starting with a letter or digit",
            quote(s),
            Name::MAX_LEN
        )
    })
}

/// An integer in `lo..=hi`; anything else (a string, a float, null, a huge number) is
/// refused with the range in the message.
pub(super) fn int_in(what: &str, v: &Scalar, lo: u32, hi: u32) -> Result<u32, String> {
    match v {
        Scalar::Int(i) => u32::try_from(*i)
            .ok()
            .filter(|n| (lo..=hi).contains(n))
            .ok_or_else(|| format!("{what} {i} is out of range {lo}..={hi}")),
        // A literal too large for 64 bits arrives as a float: say it is out of range.
        Scalar::Float(f) if f.is_finite() && f.fract() == 0.0 && f.abs() >= 9.2e18 => Err(format!(
            "{what} is out of range {lo}..={hi} (the number does not even fit in 64 bits)"
        )),
        other => Err(format!(
            "{what} must be an integer in {lo}..={hi}, found {}",
            other.describe()
        )),
    }
}

/// An integer in `lo..=hi` (64-bit bounds).
pub(super) fn int_in_u64(what: &str, v: &Scalar, lo: u64, hi: u64) -> Result<u64, String> {
    match v {
        Scalar::Int(i) => u64::try_from(*i)
            .ok()
            .filter(|n| (lo..=hi).contains(n))
            .ok_or_else(|| format!("{what} {i} is out of range {lo}..={hi}")),
        Scalar::Float(f) if f.is_finite() && f.fract() == 0.0 && f.abs() >= 9.2e18 => Err(format!(
            "{what} is out of range {lo}..={hi} (the number does not even fit in 64 bits)"
        )),
        other => Err(format!(
            "{what} must be an integer in {lo}..={hi}, found {}",
            other.describe()
        )),
    }
}

/// A port number, 1..=65535.
pub(super) fn port(what: &str, v: &Scalar) -> Result<u16, String> {
    int_in(what, v, 1, u32::from(u16::MAX)).map(|p| p as u16)
}

pub(super) fn boolean(what: &str, v: &Scalar) -> Result<bool, String> {
    match v {
        Scalar::Bool(b) => Ok(*b),
        other => Err(format!(
            "{what} must be true or false, found {}",
            other.describe()
        )),
    }
}

/// A duration such as `90s`, `30m`, `12h`, `1d` or `1h30m`: one or more
/// `<digits><unit>` groups with units `d`, `h`, `m`, `s`, each at most once and from the
/// largest to the smallest. No fractions, no signs, no spaces, no bare numbers (the unit
/// is never guessed).
pub(super) fn duration(s: &str) -> Result<Duration, String> {
    const UNITS: [(char, u64); 4] = [('d', 86_400), ('h', 3_600), ('m', 60), ('s', 1)];
    let bad = || {
        format!(
            "invalid duration {}: write it like 90s, 30m, 12h, 1d or 1h30m (units d, h, m, s, \
             largest first)",
            quote(s)
        )
    };
    if s.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut rest = s;
    let mut next_unit = 0; // index into UNITS: units must strictly decrease
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 12 {
            return Err(bad());
        }
        let (number, tail) = rest.split_at(digits);
        let n: u64 = number.parse().map_err(|_| bad())?;
        let mut chars = tail.chars();
        let unit = chars.next().ok_or_else(bad)?;
        let idx = UNITS[next_unit..]
            .iter()
            .position(|(u, _)| *u == unit)
            .map(|i| i + next_unit)
            .ok_or_else(bad)?;
        next_unit = idx + 1;
        total = n
            .checked_mul(UNITS[idx].1)
            .and_then(|secs| total.checked_add(secs))
            .ok_or_else(bad)?;
        rest = chars.as_str();
    }
    Ok(Duration::from_secs(total))
}

/// Human form of a duration for messages: `1d2h`, `90s` → `1m30s`.
pub(super) fn show_duration(d: Duration) -> String {
    let mut secs = d.as_secs();
    let mut out = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    if out.is_empty() {
        out.push_str("0s");
    }
    out
}

/// A node's underlay (VTEP) address: a unicast IPv4 or IPv6 address that can source
/// and receive VXLAN between machines.
pub(super) fn underlay_address(s: &str) -> Result<IpAddr, String> {
    no_leading_zeros(s)?;
    let ip: IpAddr = s.parse().map_err(|_| {
        format!(
            "invalid address {}: expected an IPv4 or IPv6 address such as 192.0.2.1 or \
             2001:db8::1 (no prefix length, no port)",
            quote(s)
        )
    })?;
    let problem = match ip {
        IpAddr::V4(v4) => v4_problem(v4).or(if v4 == Ipv4Addr::BROADCAST {
            Some("the broadcast address")
        } else {
            None
        }),
        IpAddr::V6(v6) => v6_problem(v6).or(if is_v6_link_local(v6) {
            Some("link-local (it needs a zone; use a global or unique-local address)")
        } else {
            None
        }),
    };
    match problem {
        Some(p) => Err(format!(
            "address {ip} is {p}; a node address must be a unicast address other nodes can reach"
        )),
        None => Ok(ip),
    }
}

/// Refuses an IPv4 address written with a leading zero in a part (`10.0.0.01`): some
/// tools read such parts as octal, so what was meant is not clear.
fn no_leading_zeros(s: &str) -> Result<(), String> {
    let address = s.split('/').next().unwrap_or(s);
    let padded = !address.contains(':')
        && address
            .split('.')
            .any(|part| part.len() > 1 && part.starts_with('0'));
    if padded {
        return Err(format!(
            "invalid address {}: a part with a leading zero is ambiguous (octal to some \
             tools); write it without",
            quote(s)
        ));
    }
    Ok(())
}

fn v4_problem(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.octets()[0] == 0 {
        Some("in 0.0.0.0/8 (\"this network\", not a host's address)")
    } else if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else {
        None
    }
}

fn v6_problem(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip.to_ipv4_mapped().is_some() {
        Some("an IPv4-mapped IPv6 address (write the IPv4 address instead)")
    } else {
        None
    }
}

fn is_v6_link_local(ip: Ipv6Addr) -> bool {
    (ip.segments()[0] & 0xffc0) == 0xfe80
}

/// A bridge address with its prefix, e.g. `10.10.0.1/24` or `fd00::1/64`. The prefix
/// must be within [`MIN_PREFIX_V4`]..=[`MAX_PREFIX_V4`] (IPv4) or
/// [`MIN_PREFIX_V6`]..=[`MAX_PREFIX_V6`] (IPv6), and the address must be a usable host
/// of its subnet: not the network or (IPv4) broadcast address, not unspecified,
/// loopback or multicast.
pub(super) fn bridge_address(s: &str) -> Result<IpNet, String> {
    no_leading_zeros(s)?;
    let net: IpNet = s.parse().map_err(|_| {
        format!(
            "invalid address {}: expected an address with a prefix length such as \
             10.10.0.1/24 or fd00::1/64",
            quote(s)
        )
    })?;
    let (lo, hi) = match net {
        IpNet::V4(_) => (MIN_PREFIX_V4, MAX_PREFIX_V4),
        IpNet::V6(_) => (MIN_PREFIX_V6, MAX_PREFIX_V6),
    };
    if !(lo..=hi).contains(&net.prefix_len()) {
        return Err(format!(
            "prefix length /{} of {net} is not sensible for a network: use /{lo} to /{hi}",
            net.prefix_len()
        ));
    }
    let problem = match net {
        IpNet::V4(v4) => v4_problem(v4.addr()).or(if v4.addr() == v4.network() {
            Some("the network address of its subnet")
        } else if v4.addr() == v4.broadcast() {
            Some("the broadcast address of its subnet")
        } else {
            None
        }),
        // In a /127 both addresses are hosts (RFC 6164); elsewhere the all-zero host is
        // the subnet-router anycast address.
        IpNet::V6(v6) => {
            v6_problem(v6.addr()).or(if is_v6_link_local(v6.addr()) {
                // The kernel gives it link scope: it is no route, and every bridge has one.
                Some("link-local (every bridge has its own already)")
            } else if v6.addr() == v6.network() && v6.prefix_len() < 127 {
                Some("the subnet-router anycast address of its subnet")
            } else {
                None
            })
        }
    };
    match problem {
        Some(p) => Err(format!(
            "address {net} is {p}; use a host address of the subnet"
        )),
        None => Ok(net),
    }
}

/// A public key: standard base64 of 32 bytes, 44 characters with the trailing `=`, as
/// printed by `ovl-controller keygen`.
pub(super) fn public_key(s: &str) -> Result<PublicKey, String> {
    let key = (s.len() == 44).then(|| PublicKey::from_base64(s)).flatten();
    let key = key.ok_or_else(|| {
        format!(
            "invalid publicKey {}: expected 44 characters of standard base64 (32 bytes), as \
             printed by `ovl-controller keygen`",
            quote(s)
        )
    })?;
    if is_low_order(&key) {
        return Err(format!(
            "invalid publicKey {}: a low-order X25519 point, which no private key stands \
             behind (a Diffie-Hellman result with it is known to anyone)",
            quote(s)
        ));
    }
    Ok(key)
}

/// Whether X25519 with this public key gives the all-zero result for every private key:
/// every clamped scalar is a multiple of the cofactor 8, so exactly the points of order
/// 1, 2, 4 or 8 (in any encoding) end at the identity, u = 0.
fn is_low_order(key: &PublicKey) -> bool {
    let point = curve25519_dalek::MontgomeryPoint(key.0);
    point.mul_clamped([0x55; 32]) == curve25519_dalek::MontgomeryPoint([0; 32])
}
