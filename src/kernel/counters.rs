//! Usage counters of our SAs (bytes, packets, age) for `status` and metrics. A dump of
//! its own, kept apart from [`super::Kernel::dump`]: counters change with every packet
//! and must never make a plan differ. Keys in the replies are zeroed unread.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt as _;

use super::KernelError;
use crate::state::{SaId, ownership};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SaCounters {
    pub bytes: u64,
    pub packets: u64,
    /// When the kernel added the SA, in seconds since the Unix epoch.
    pub added_at: u64,
}

fn ip(family: u16, raw: &[u8; 16]) -> Option<IpAddr> {
    match family {
        2 => Some(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
        10 => Some(IpAddr::V6(Ipv6Addr::from(*raw))),
        _ => None,
    }
}

pub async fn sa_counters(
    h: &xfrmnetlink::Handle,
) -> Result<BTreeMap<SaId, SaCounters>, KernelError> {
    let mut stream = h.state().get_dump().execute();
    let mut out = BTreeMap::new();
    loop {
        let next = stream.try_next().await.map_err(|e| KernelError::Netlink {
            operation: "dump xfrm state counters".into(),
            message: e.to_string(),
        })?;
        let Some(mut m) = next else { break };
        // Zero any key material before anything else looks at the message.
        for attr in &mut m.nlas {
            use netlink_packet_xfrm::XfrmAttrs;
            match attr {
                XfrmAttrs::EncryptionAlgAead(a) => zeroize::Zeroize::zeroize(&mut a.alg_key),
                XfrmAttrs::EncryptionAlg(a) | XfrmAttrs::AuthenticationAlg(a) => {
                    zeroize::Zeroize::zeroize(&mut a.alg_key)
                }
                XfrmAttrs::AuthenticationAlgTrunc(a) => zeroize::Zeroize::zeroize(&mut a.alg_key),
                _ => {}
            }
        }
        let info = &m.user_sa_info;
        if !ownership::is_owned_reqid(info.reqid) {
            continue;
        }
        let (Some(src), Some(dst)) = (
            ip(info.family, &info.saddr.addr),
            ip(info.family, &info.id.daddr.addr),
        ) else {
            continue;
        };
        out.insert(
            SaId {
                src,
                dst,
                spi: info.id.spi,
            },
            SaCounters {
                bytes: info.lifetime_cur.bytes,
                packets: info.lifetime_cur.packets,
                added_at: info.lifetime_cur.add_time,
            },
        );
    }
    Ok(out)
}

/// The kernel's XFRM error counters of this namespace (`/proc/net/xfrm_stat`), as
/// (name, value) pairs in the kernel's order. Empty when the file is missing.
pub fn xfrm_stat() -> Vec<(String, u64)> {
    let Ok(text) = std::fs::read_to_string("/proc/net/xfrm_stat") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_owned(), w.next()?.parse().ok()?))
        })
        .collect()
}
