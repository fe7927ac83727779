//! XFRM states (SAs): encoding, decoding, and the add / delete / dump / probe requests.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use netlink_packet_core::parse_u32;
use netlink_packet_xfrm::state::{DelGetMessage, GetDumpMessage, ModifyMessage};
use netlink_packet_xfrm::{
    Address, AlgAead, IPPROTO_ESP, IPPROTO_UDP, LifetimeConfig, Mark, ReplayEsn,
    Selector as NlSelector, UserSaInfo, XFRM_ALG_AEAD_HEADER_LEN, XFRM_ALG_AEAD_NAME_LEN,
    XFRM_ALG_AUTH_HEADER_LEN, XFRM_ALG_HEADER_LEN, XFRM_ENCAP_TMPL_LEN, XFRM_INF,
    XFRM_MODE_TRANSPORT, XFRM_MSG_NEWSA, XFRM_REPLAY_ESN_LEN, XFRM_STATE_ESN,
    XFRM_USER_SA_INFO_LEN, XFRMA_ALG_AEAD, XFRMA_ALG_AUTH, XFRMA_ALG_AUTH_TRUNC, XFRMA_ALG_COMP,
    XFRMA_ALG_CRYPT, XFRMA_ENCAP, XFRMA_IF_ID, XFRMA_MARK, XFRMA_REPLAY_ESN_VAL, XfrmAttrs,
    XfrmMessage,
};
use ring::rand::{SecureRandom as _, SystemRandom};
use zeroize::Zeroize;

use super::reply::{self, ReplyError};
use super::{NlError, Owned, PROBE_REQID, ack, family_of, host_len, ip_of};
use crate::kernel::KernelError;
use crate::kernel::batch::u32_at;
use crate::kernel::batch::{BatchSocket, Reply, Secrets, dump_request};
use crate::kernel::counters::SaCounters;
use crate::keys::{SA_AEAD_NAME, SA_ICV_BITS, SA_KEY_LEN, SaKey};
use crate::state::{Lifetime, Sa, SaId, ownership};

/// What an SA dump found: every SA of ours, and the ESP slots (destination, SPI) that SAs
/// of others hold (an SA of ours can never be added there: NEWSA would fail).
#[derive(Default)]
pub(super) struct SaDump {
    pub ours: BTreeMap<SaId, Sa>,
    pub foreign_esp: std::collections::BTreeSet<(IpAddr, u32)>,
}

/// Every SA in the namespace. The replies carry keys: read in place (only [`SaKey`] gets
/// a copy) and zeroed in our buffer once handled (`Secrets::Zeroize`).
pub(super) async fn dump(socket: &mut BatchSocket) -> Result<SaDump, KernelError> {
    let op = "dump xfrm states";
    let request = dump_request(XfrmMessage::GetDumpSa(GetDumpMessage::default()));
    socket
        .dump(&request, Secrets::Zeroize, SaDump::default, |out, reply| {
            let state = StateReply::parse(reply)?;
            match decode(&state) {
                Owned::Foreign => {
                    let info = &state.info;
                    if info.id.proto == IPPROTO_ESP
                        && let Some(dst) = ip_of(info.family, &info.id.daddr)
                    {
                        out.foreign_esp.insert((dst, info.id.spi));
                    }
                }
                Owned::Ours(sa) => {
                    if sa.reqid == 0 {
                        tracing::warn!(spi = format_args!("0x{:08x}", sa.id.spi), src = %sa.id.src, dst = %sa.id.dst,
                            "SA of ours in a form we never install; it will be replaced");
                    }
                    out.ours.insert(sa.id, sa);
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

/// Usage counters of every SA of ours, from a dump on our own socket: the replies are
/// read in place and zeroed, as in [`dump`] (the keys of foreign SAs pass too).
pub(super) async fn counters(
    socket: &mut BatchSocket,
) -> Result<BTreeMap<SaId, SaCounters>, KernelError> {
    let op = "dump xfrm state counters";
    let request = dump_request(XfrmMessage::GetDumpSa(GetDumpMessage::default()));
    socket
        .dump(&request, Secrets::Zeroize, BTreeMap::new, |out, reply| {
            let info = StateReply::parse(reply)?.info;
            if !ownership::is_owned_reqid(info.reqid) {
                return Ok(());
            }
            if let (Some(src), Some(dst)) = (
                ip_of(info.family, &info.saddr),
                ip_of(info.family, &info.id.daddr),
            ) {
                let id = SaId {
                    src,
                    dst,
                    spi: info.id.spi,
                };
                let counters = SaCounters {
                    bytes: info.lifetime_cur.bytes,
                    packets: info.lifetime_cur.packets,
                    added_at: info.lifetime_cur.add_time,
                };
                out.insert(id, counters);
            }
            Ok(())
        })
        .await
        .map_err(|e| e.into_kernel(op))
}

const WHAT: &str = "state";

/// A state from a dump reply, read in place: the fixed header copied out, and of the
/// attributes only what [`decode`] and [`occupant`] look at, borrowed from the reply.
pub(super) struct StateReply<'a> {
    info: UserSaInfo,
    /// The key of the last AEAD attribute with our algorithm, ICV and key length.
    key: Option<&'a [u8; SA_KEY_LEN]>,
    /// Of the last ESN replay state.
    replay_window: Option<u32>,
    /// Why no [`SaId`] can address it: the first mark or interface id met.
    unaddressable: Option<&'static str>,
    /// A mark with a non-zero value: out of reach of a DELSA without a mark.
    marked: bool,
    /// Another algorithm or an encapsulation: not a form we install.
    other_form: bool,
}

impl<'a> StateReply<'a> {
    /// Errors never quote the message: it holds a key.
    pub(super) fn parse(reply: Reply<'a>) -> Result<StateReply<'a>, ReplyError> {
        let payload = reply::payload(reply, XFRM_MSG_NEWSA, XFRM_USER_SA_INFO_LEN, WHAT)?;
        StateReply::read(payload)
    }

    /// Reads a state message (`xfrm_usersa_info` and attributes).
    pub(super) fn read(payload: &'a [u8]) -> Result<StateReply<'a>, ReplyError> {
        let short = || ReplyError::Short {
            what: WHAT,
            len: payload.len(),
        };
        let info = UserSaInfo::parse(payload).map_err(|_| short())?;
        let attrs = payload.get(XFRM_USER_SA_INFO_LEN..).ok_or_else(short)?;
        let mut s = StateReply {
            info,
            key: None,
            replay_window: None,
            unaddressable: None,
            marked: false,
            other_form: false,
        };
        for attr in reply::attributes(attrs, WHAT) {
            let attr = attr?;
            let value = attr.value;
            let malformed = || attr.malformed(WHAT);
            // The length rules are netlink-packet-xfrm's, so what it refused stays refused.
            let odd = match attr.kind {
                XFRMA_MARK => {
                    let mark = Mark::parse(value).map_err(|_| malformed())?;
                    s.marked |= mark.value != 0;
                    (mark.value != 0 || mark.mask != 0).then_some("marked")
                }
                XFRMA_IF_ID => {
                    let id = parse_u32(value).map_err(|_| malformed())?;
                    (id != 0).then_some("has an interface id")
                }
                XFRMA_ALG_AEAD => {
                    // struct xfrm_algo_aead: name[64], key_len, icv_len (bits), key.
                    let (head, key) = value
                        .split_at_checked(XFRM_ALG_AEAD_HEADER_LEN)
                        .ok_or_else(malformed)?;
                    let ours = head.starts_with(&aead_name())
                        && u32_at(head, XFRM_ALG_AEAD_NAME_LEN) == Some((SA_KEY_LEN * 8) as u32)
                        && u32_at(head, XFRM_ALG_AEAD_NAME_LEN + 4) == Some(SA_ICV_BITS);
                    if ours && let Ok(key) = key.try_into() {
                        s.key = Some(key);
                    }
                    None
                }
                XFRMA_REPLAY_ESN_VAL => {
                    // struct xfrm_replay_state_esn: six u32 (replay_window last), bitmap.
                    let bitmap = value.len().checked_sub(XFRM_REPLAY_ESN_LEN);
                    if bitmap.is_none_or(|n| n % 4 != 0) {
                        return Err(malformed());
                    }
                    s.replay_window = u32_at(value, XFRM_REPLAY_ESN_LEN - 4);
                    None
                }
                XFRMA_ALG_CRYPT | XFRMA_ALG_AUTH | XFRMA_ALG_COMP | XFRMA_ALG_AUTH_TRUNC
                | XFRMA_ENCAP => {
                    let min = match attr.kind {
                        XFRMA_ALG_AUTH_TRUNC => XFRM_ALG_AUTH_HEADER_LEN,
                        XFRMA_ENCAP => XFRM_ENCAP_TMPL_LEN,
                        _ => XFRM_ALG_HEADER_LEN,
                    };
                    if value.len() < min {
                        return Err(malformed());
                    }
                    s.other_form = true;
                    None
                }
                _ => None,
            };
            if s.unaddressable.is_none() {
                s.unaddressable = odd;
            }
        }
        Ok(s)
    }
}

/// What the kernel holds at one (destination, SPI) of ESP: the slot DELSA addresses.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(test, derive(PartialEq))]
pub(super) struct SaOccupant {
    pub reqid: u32,
    pub src: Option<IpAddr>,
}

/// Who holds each (destination, SPI) of ESP, from one dump (keys zeroed as read).
pub(super) async fn occupants(
    socket: &mut BatchSocket,
) -> Result<HashMap<(IpAddr, u32), SaOccupant>, KernelError> {
    let op = "dump xfrm states";
    let request = dump_request(XfrmMessage::GetDumpSa(GetDumpMessage::default()));
    socket
        .dump(&request, Secrets::Zeroize, HashMap::new, |out, reply| {
            if let Some((slot, occupant)) = occupant(&StateReply::parse(reply)?) {
                out.insert(slot, occupant);
            }
            Ok(())
        })
        .await
        .map_err(|e| e.into_kernel(op))
}

/// The (destination, SPI) an ESP state holds and who holds it. Marked states are left
/// out: a DELSA without a mark does not reach them.
pub(super) fn occupant(s: &StateReply<'_>) -> Option<((IpAddr, u32), SaOccupant)> {
    let info = &s.info;
    if info.id.proto != IPPROTO_ESP || s.marked {
        return None;
    }
    let dst = ip_of(info.family, &info.id.daddr)?;
    let occupant = SaOccupant {
        reqid: info.reqid,
        src: ip_of(info.family, &info.saddr),
    };
    Some(((dst, info.id.spi), occupant))
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

pub(super) fn limit_from_kernel(v: u64) -> u64 {
    if v == XFRM_INF { 0 } else { v }
}

/// The selector pinned to the pair: UDP `src/32 -> dst/32` to `dport` (any source port).
pub(super) fn pinned_selector(id: &SaId, dport: u16) -> NlSelector {
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

pub(super) fn aead_name() -> [u8; XFRM_ALG_AEAD_NAME_LEN] {
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

/// Reads an SA from a dump reply.
pub(super) fn decode(s: &StateReply<'_>) -> Owned<Sa> {
    let info = &s.info;
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
    if let Some(reason) = s.unaddressable {
        return unaddressable(reason);
    }
    let id = SaId {
        src,
        dst,
        spi: info.id.spi,
    };

    let dport = info.selector.dport;
    let c = &info.lifetime_cfg;
    let as_installed = info.mode == XFRM_MODE_TRANSPORT
        && info.flags == XFRM_STATE_ESN
        && !s.other_form
        && info.selector == pinned_selector(&id, dport)
        && c.soft_use_expires_seconds == 0
        && c.hard_use_expires_seconds == 0
        && s.key.is_some()
        && s.replay_window.is_some();
    // Copied only into the `SaKey`; the dump buffer is zeroed by `batch::dump`.
    let mut bytes = [0u8; SA_KEY_LEN];
    if let Some(k) = s.key {
        bytes.copy_from_slice(k);
    }
    let key = SaKey::from_bytes(bytes);
    bytes.zeroize();
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
        key,
        replay_window: s.replay_window.unwrap_or(0),
        dport,
        lifetime,
    })
}

#[cfg(test)]
mod dump_tests {
    use netlink_packet_core::Emitable;

    use super::*;
    use crate::kernel::batch::DumpError;

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

    fn emitted(s: &Sa) -> Vec<u8> {
        let mut m = encode(s).unwrap();
        let mut bytes = vec![0; m.buffer_len()];
        m.emit(&mut bytes);
        scrub(&mut m);
        bytes
    }

    #[test]
    fn dump_replies_read_as_the_kernel_lays_them_out() {
        let s = sa();
        let bytes = emitted(&s);
        let reply = Reply {
            kind: XFRM_MSG_NEWSA,
            payload: &bytes,
        };
        let read = StateReply::parse(reply).unwrap();
        assert!(matches!(decode(&read), Owned::Ours(t) if t == s));
        let slot = SaOccupant {
            reqid: s.reqid,
            src: Some(s.id.src),
        };
        assert_eq!(occupant(&read), Some(((s.id.dst, s.id.spi), slot)));
    }

    #[test]
    fn odd_dump_replies_are_errors_that_never_quote_the_key() {
        let bytes = emitted(&sa());
        // Cut inside the last attribute (the replay state, after the key).
        let cut = bytes.len() - 8;
        for (kind, payload) in [
            (XFRM_MSG_NEWSA + 1, &bytes[..]),
            (XFRM_MSG_NEWSA, &bytes[..XFRM_USER_SA_INFO_LEN - 1]),
            (XFRM_MSG_NEWSA, &[][..]),
            (XFRM_MSG_NEWSA, &bytes[..cut]),
        ] {
            let reply = Reply { kind, payload };
            let Err(e) = StateReply::parse(reply) else {
                panic!("read {} bytes of type {kind}", payload.len())
            };
            let DumpError::Unexpected(text) = DumpError::from(e) else {
                unreachable!()
            };
            assert!(!text.contains("5a") && !text.contains("90"), "{text}");
        }
    }
}
