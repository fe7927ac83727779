//! XFRM states (SAs): encoding, decoding, and the add / delete / dump / probe requests.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use netlink_packet_xfrm::state::{DelGetMessage, GetDumpMessage, ModifyMessage};
use netlink_packet_xfrm::{
    Address, AlgAead, IPPROTO_ESP, IPPROTO_UDP, LifetimeConfig, ReplayEsn, Selector as NlSelector,
    XFRM_ALG_AEAD_NAME_LEN, XFRM_INF, XFRM_MODE_TRANSPORT, XFRM_STATE_ESN, XfrmAttrs, XfrmMessage,
};
use ring::rand::{SecureRandom as _, SystemRandom};
use zeroize::Zeroize;

use netlink_packet_core::Parseable;
use netlink_packet_xfrm::{XFRM_MSG_NEWSA, XFRM_USER_SA_INFO_LEN};

use super::{NlError, Owned, PROBE_REQID, ack, checked_payload, family_of, host_len, ip_of};
use crate::kernel::KernelError;
use crate::kernel::batch::{BatchSocket, DumpError, Reply, Secrets, dump_request};
use crate::keys::{SA_AEAD_NAME, SA_ICV_BITS, SA_KEY_LEN, SaKey};
use crate::state::{Lifetime, Sa, SaId, ownership};

/// Every SA of ours. The replies carry keys: zeroed in our buffer once handled, and
/// in the parsed copy right after decoding.
pub(super) async fn dump(socket: &mut BatchSocket) -> Result<BTreeMap<SaId, Sa>, KernelError> {
    let op = "dump xfrm states";
    let request = dump_request(XfrmMessage::GetDumpSa(GetDumpMessage::default()));
    socket
        .dump(&request, Secrets::Zeroize, BTreeMap::new, |out, reply| {
            let mut m = parse_reply(reply)?;
            let decoded = decode(&m);
            scrub(&mut m);
            match decoded {
                Owned::Foreign => {}
                Owned::Ours(sa) => {
                    if sa.reqid == 0 {
                        tracing::warn!(spi = format_args!("0x{:08x}", sa.id.spi), src = %sa.id.src, dst = %sa.id.dst,
                            "SA of ours in a form we never install; it will be replaced");
                    }
                    out.insert(sa.id, sa);
                }
                Owned::Unaddressable { reason } => {
                    tracing::warn!(%reason, "ignoring an XFRM state with our reqid that we cannot address");
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| e.into_kernel(op))
}

/// A state from a dump reply. Errors never quote the message: it holds a key.
fn parse_reply(reply: Reply<'_>) -> Result<ModifyMessage, DumpError> {
    let payload = checked_payload(reply, XFRM_MSG_NEWSA, XFRM_USER_SA_INFO_LEN, "state")?;
    ModifyMessage::parse(payload)
        .map_err(|_| DumpError::Unexpected("an unreadable state message".into()))
}

/// What the kernel holds at one (destination, SPI) of ESP: the slot DELSA addresses.
#[derive(Clone, Copy, Debug)]
pub(super) struct SaOccupant {
    pub reqid: u32,
    pub src: Option<IpAddr>,
}

/// Who holds each (destination, SPI) of ESP, from one dump (keys zeroed as read).
/// Marked states are left out: a DELSA without a mark does not reach them.
pub(super) async fn occupants(
    socket: &mut BatchSocket,
) -> Result<HashMap<(IpAddr, u32), SaOccupant>, KernelError> {
    let op = "dump xfrm states";
    let request = dump_request(XfrmMessage::GetDumpSa(GetDumpMessage::default()));
    socket
        .dump(&request, Secrets::Zeroize, HashMap::new, |out, reply| {
            let mut m = parse_reply(reply)?;
            let info = &m.user_sa_info;
            let marked = m
                .nlas
                .iter()
                .any(|a| matches!(a, XfrmAttrs::Mark(mark) if mark.value != 0));
            if info.id.proto == IPPROTO_ESP
                && !marked
                && let Some(dst) = ip_of(info.family, &info.id.daddr)
            {
                let occupant = SaOccupant {
                    reqid: info.reqid,
                    src: ip_of(info.family, &info.saddr),
                };
                out.insert((dst, info.id.spi), occupant);
            }
            scrub(&mut m);
            Ok(())
        })
        .await
        .map_err(|e| e.into_kernel(op))
}

/// NEWSA: the kernel refuses it with EEXIST when the destination and SPI are taken, by
/// anyone, so it can never replace a foreign SA. The message holds a copy of the key:
/// the caller serializes it and scrubs it ([`scrub`]).
pub(super) fn add_request(sa: &Sa) -> Result<XfrmMessage, String> {
    encode(sa).map(XfrmMessage::AddSa)
}

/// DELSA of (destination, SPI, source).
pub(super) fn delete_request(id: &SaId) -> XfrmMessage {
    XfrmMessage::DeleteSa(id_message(id))
}

/// See [`super::check_esp`].
pub(super) async fn probe(h: &xfrmnetlink::Handle, local: IpAddr) -> Result<(), KernelError> {
    let op = format!("probe for ESP with {SA_AEAD_NAME} on {local}");
    let no_random = || KernelError::Invalid {
        operation: op.clone(),
        reason: "the OS gave no random bytes".into(),
    };
    // A random SPI can collide with an existing SA (EEXIST): draw again a few times.
    for _ in 0..4 {
        let spi = loop {
            let mut bytes = [0u8; 4];
            SystemRandom::new()
                .fill(&mut bytes)
                .map_err(|_| no_random())?;
            let spi = u32::from_be_bytes(bytes);
            if spi >= 0x100 {
                break spi; // 1..=255 are reserved by IANA
            }
        };
        let sa = Sa {
            id: SaId {
                src: local,
                dst: local,
                spi,
            },
            reqid: PROBE_REQID,
            key: SaKey::generate().map_err(|_| no_random())?,
            replay_window: 128,
            dport: 0,
            lifetime: Lifetime {
                hard_add_seconds: 60,
                ..Lifetime::default()
            },
        };
        let message = encode(&sa).map_err(|reason| KernelError::Invalid {
            operation: op.clone(),
            reason,
        })?;
        match ack(h, XfrmMessage::AddSa(message)).await {
            Ok(()) => {
                return match ack(h, XfrmMessage::DeleteSa(id_message(&sa.id))).await {
                    Ok(()) | Err(NlError::Errno(libc::ESRCH)) => Ok(()),
                    Err(e) => Err(e.into_kernel(&format!("delete the probe SA spi 0x{spi:08x}"))),
                };
            }
            Err(NlError::Errno(libc::EEXIST)) => continue,
            Err(NlError::Errno(errno @ (libc::EPERM | libc::EACCES))) => {
                return Err(NlError::Errno(errno).into_kernel(&op));
            }
            Err(NlError::Errno(errno)) => {
                let text = std::io::Error::from_raw_os_error(errno);
                let hint = match errno {
                    libc::ENOSYS => ": the kernel does not know the AEAD algorithm",
                    libc::EPROTONOSUPPORT => ": the kernel has no ESP for this address family",
                    libc::ENOENT => ": the kernel could not set up the cipher",
                    _ => "",
                };
                return Err(KernelError::NoEsp {
                    detail: format!("adding an ESP state with {SA_AEAD_NAME} failed: {text}{hint}"),
                });
            }
            Err(e) => return Err(e.into_kernel(&op)),
        }
    }
    Err(KernelError::Netlink {
        operation: op,
        message: "every random SPI tried was taken".into(),
    })
}

fn id_message(id: &SaId) -> DelGetMessage {
    let mut m = DelGetMessage::default();
    m.user_sa_id.daddr = Address::from_ip(&id.dst);
    m.user_sa_id.spi = id.spi;
    m.user_sa_id.family = family_of(id.dst);
    m.user_sa_id.proto = IPPROTO_ESP;
    m.nlas.push(XfrmAttrs::SrcAddr(Address::from_ip(&id.src)));
    m
}

/// Zeroes the key material of a state message we are done with.
pub(super) fn scrub(m: &mut ModifyMessage) {
    for attr in &mut m.nlas {
        match attr {
            XfrmAttrs::EncryptionAlgAead(a) => a.alg_key.zeroize(),
            XfrmAttrs::EncryptionAlg(a) | XfrmAttrs::AuthenticationAlg(a) => a.alg_key.zeroize(),
            XfrmAttrs::AuthenticationAlgTrunc(a) => a.alg_key.zeroize(),
            _ => {}
        }
    }
}

/// Our "no limit" is 0; the kernel's byte and packet "no limit" is u64::MAX.
fn limit_to_kernel(v: u64) -> u64 {
    if v == 0 { XFRM_INF } else { v }
}

fn limit_from_kernel(v: u64) -> u64 {
    if v == XFRM_INF { 0 } else { v }
}

/// The selector pinned to the pair: UDP `src/32 -> dst/32` to `dport` (any source port).
fn pinned_selector(id: &SaId, dport: u16) -> NlSelector {
    NlSelector {
        saddr: Address::from_ip(&id.src),
        daddr: Address::from_ip(&id.dst),
        prefixlen_s: host_len(id.src),
        prefixlen_d: host_len(id.dst),
        family: family_of(id.src),
        proto: IPPROTO_UDP,
        dport,
        dport_mask: u16::MAX,
        ..NlSelector::default()
    }
}

fn aead_name() -> [u8; XFRM_ALG_AEAD_NAME_LEN] {
    let mut name = [0u8; XFRM_ALG_AEAD_NAME_LEN];
    name[..SA_AEAD_NAME.len()].copy_from_slice(SA_AEAD_NAME.as_bytes());
    name
}

/// The NEWSA message for one of our SAs. It holds a copy of the key: hand it to the
/// kernel and drop it.
pub(super) fn encode(sa: &Sa) -> Result<ModifyMessage, String> {
    if !ownership::is_owned_reqid(sa.reqid) {
        return Err(format!(
            "reqid {} is not in our range: the SA would not be ours",
            sa.reqid
        ));
    }
    if family_of(sa.id.src) != family_of(sa.id.dst) {
        return Err(format!(
            "SA mixes address families ({} -> {})",
            sa.id.src, sa.id.dst
        ));
    }
    let l = &sa.lifetime;
    let mut m = ModifyMessage::default();
    let info = &mut m.user_sa_info;
    info.selector = pinned_selector(&sa.id, sa.dport);
    info.id.daddr = Address::from_ip(&sa.id.dst);
    info.id.spi = sa.id.spi;
    info.id.proto = IPPROTO_ESP;
    info.saddr = Address::from_ip(&sa.id.src);
    info.family = family_of(sa.id.src);
    info.mode = XFRM_MODE_TRANSPORT;
    info.reqid = sa.reqid;
    info.flags = XFRM_STATE_ESN;
    info.replay_window = 0; // the kernel insists on 0 here when the ESN replay state is given
    info.lifetime_cfg = LifetimeConfig {
        soft_byte_limit: limit_to_kernel(l.soft_bytes),
        hard_byte_limit: limit_to_kernel(l.hard_bytes),
        soft_packet_limit: limit_to_kernel(l.soft_packets),
        hard_packet_limit: limit_to_kernel(l.hard_packets),
        soft_add_expires_seconds: l.soft_add_seconds,
        hard_add_expires_seconds: l.hard_add_seconds,
        soft_use_expires_seconds: 0,
        hard_use_expires_seconds: 0,
    };
    m.nlas.push(XfrmAttrs::EncryptionAlgAead(AlgAead {
        alg_name: aead_name(),
        alg_key_len: (SA_KEY_LEN * 8) as u32,
        alg_icv_len: SA_ICV_BITS,
        alg_key: sa.key.expose().to_vec(),
    }));
    m.nlas.push(XfrmAttrs::ReplayStateEsn(ReplayEsn {
        bmp_len: sa.replay_window.div_ceil(u32::BITS),
        replay_window: sa.replay_window,
        ..ReplayEsn::default()
    }));
    Ok(m)
}

/// Reads an SA from a dump or GET reply (the caller scrubs the message afterwards).
pub(super) fn decode(m: &ModifyMessage) -> Owned<Sa> {
    let info = &m.user_sa_info;
    if info.id.proto != IPPROTO_ESP || !ownership::is_owned_reqid(info.reqid) {
        return Owned::Foreign;
    }
    let reqid = info.reqid;
    let unaddressable = |reason: &str| Owned::Unaddressable {
        reason: format!("reqid {reqid}: {reason}"),
    };
    let (Some(src), Some(dst)) = (
        ip_of(info.family, &info.saddr),
        ip_of(info.family, &info.id.daddr),
    ) else {
        return unaddressable(&format!("address family {}", info.family));
    };
    let id = SaId {
        src,
        dst,
        spi: info.id.spi,
    };

    let mut as_installed = info.mode == XFRM_MODE_TRANSPORT && info.flags == XFRM_STATE_ESN;
    let mut key = None;
    let mut replay_window = None;
    for attr in &m.nlas {
        match attr {
            XfrmAttrs::Mark(mark) if mark.value != 0 || mark.mask != 0 => {
                return unaddressable("marked");
            }
            XfrmAttrs::IfId(v) if *v != 0 => return unaddressable("has an interface id"),
            XfrmAttrs::EncryptionAlgAead(a) => {
                let ours = a.alg_name == aead_name()
                    && a.alg_icv_len == SA_ICV_BITS
                    && a.alg_key_len == (SA_KEY_LEN * 8) as u32;
                if ours && a.alg_key.len() == SA_KEY_LEN {
                    let mut bytes = [0u8; SA_KEY_LEN];
                    bytes.copy_from_slice(&a.alg_key);
                    key = Some(SaKey::from_bytes(bytes));
                    bytes.zeroize();
                }
            }
            XfrmAttrs::ReplayStateEsn(r) => replay_window = Some(r.replay_window),
            XfrmAttrs::EncryptionAlg(_)
            | XfrmAttrs::AuthenticationAlg(_)
            | XfrmAttrs::AuthenticationAlgTrunc(_)
            | XfrmAttrs::CompressionAlg(_)
            | XfrmAttrs::EncapsulationTemplate(_) => as_installed = false,
            _ => {}
        }
    }
    let dport = info.selector.dport;
    as_installed &= info.selector == pinned_selector(&id, dport);
    let c = &info.lifetime_cfg;
    as_installed &= c.soft_use_expires_seconds == 0 && c.hard_use_expires_seconds == 0;
    as_installed &= key.is_some() && replay_window.is_some();
    let lifetime = Lifetime {
        soft_bytes: limit_from_kernel(c.soft_byte_limit),
        hard_bytes: limit_from_kernel(c.hard_byte_limit),
        soft_packets: limit_from_kernel(c.soft_packet_limit),
        hard_packets: limit_from_kernel(c.hard_packet_limit),
        soft_add_seconds: c.soft_add_expires_seconds,
        hard_add_seconds: c.hard_add_expires_seconds,
    };
    Owned::Ours(Sa {
        id,
        reqid: if as_installed { reqid } else { 0 },
        key: key.unwrap_or_else(|| SaKey::from_bytes([0; SA_KEY_LEN])),
        replay_window: replay_window.unwrap_or(0),
        dport,
        lifetime,
    })
}

#[cfg(test)]
mod dump_tests {
    use netlink_packet_core::Emitable;

    use super::*;

    fn sa() -> Sa {
        Sa {
            id: SaId {
                src: "192.0.2.1".parse().unwrap(),
                dst: "192.0.2.2".parse().unwrap(),
                spi: 0x1234,
            },
            reqid: ownership::REQID_MIN,
            key: SaKey::from_bytes([0x5a; SA_KEY_LEN]),
            replay_window: 1024,
            dport: 4790,
            lifetime: Lifetime::default(),
        }
    }

    #[test]
    fn dump_replies_parse_as_the_kernel_lays_them_out() {
        let s = sa();
        let mut m = encode(&s).unwrap();
        let mut bytes = vec![0; m.buffer_len()];
        m.emit(&mut bytes);
        scrub(&mut m);
        let reply = Reply {
            kind: XFRM_MSG_NEWSA,
            payload: &bytes,
        };
        let mut parsed = parse_reply(reply).unwrap();
        assert!(matches!(decode(&parsed), Owned::Ours(t) if t == s));
        scrub(&mut parsed);
        assert_eq!(parsed, m);
    }

    #[test]
    fn odd_dump_replies_are_errors_that_never_quote_the_key() {
        let mut m = encode(&sa()).unwrap();
        let mut bytes = vec![0; m.buffer_len()];
        m.emit(&mut bytes);
        scrub(&mut m);
        // Cut inside the last attribute: refused or read without it, never a panic.
        let cut = bytes.len() - 8;
        for (kind, payload) in [
            (XFRM_MSG_NEWSA + 1, &bytes[..]),
            (XFRM_MSG_NEWSA, &bytes[..XFRM_USER_SA_INFO_LEN - 1]),
            (XFRM_MSG_NEWSA, &bytes[..cut]),
        ] {
            let reply = Reply { kind, payload };
            match parse_reply(reply) {
                Err(DumpError::Unexpected(text)) => assert!(!text.contains("5a"), "{text}"),
                Err(other) => panic!("{other:?}"),
                Ok(mut parsed) => scrub(&mut parsed),
            }
        }
        let wrong = Reply {
            kind: XFRM_MSG_NEWSA + 1,
            payload: &bytes,
        };
        assert!(parse_reply(wrong).is_err());
        let short = Reply {
            kind: XFRM_MSG_NEWSA,
            payload: &bytes[..XFRM_USER_SA_INFO_LEN - 1],
        };
        assert!(parse_reply(short).is_err());
    }
}
