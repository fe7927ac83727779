//! The dump decoding as it was before `reply` (each reply parsed into a
//! netlink-packet-xfrm `ModifyMessage`), kept for tests only: the oracle that the
//! in-place decoding must agree with, and the baseline of the parse benchmark.

pub(super) mod sa {
    use netlink_packet_core::Parseable;
    use netlink_packet_xfrm::state::ModifyMessage;
    use netlink_packet_xfrm::{
        IPPROTO_ESP, XFRM_MODE_TRANSPORT, XFRM_MSG_NEWSA, XFRM_STATE_ESN, XFRM_USER_SA_INFO_LEN,
        XfrmAttrs,
    };
    use zeroize::Zeroize;

    use super::super::reply::{self, ReplyError};
    use super::super::sa::{SaOccupant, aead_name, limit_from_kernel, pinned_selector};
    use super::super::{Owned, ip_of};
    use crate::kernel::batch::Reply;
    use crate::keys::{SA_ICV_BITS, SA_KEY_LEN, SaKey};
    use crate::state::{Lifetime, Sa, SaId, ownership};

    /// `None` when netlink-packet-xfrm refuses the message.
    pub fn parse_reply(reply: Reply<'_>) -> Result<ModifyMessage, Option<ReplyError>> {
        let payload = reply::payload(reply, XFRM_MSG_NEWSA, XFRM_USER_SA_INFO_LEN, "state")?;
        ModifyMessage::parse(payload).map_err(|_| None)
    }

    pub fn occupant(m: &ModifyMessage) -> Option<((std::net::IpAddr, u32), SaOccupant)> {
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
            return Some(((dst, info.id.spi), occupant));
        }
        None
    }

    pub fn decode(m: &ModifyMessage) -> Owned<Sa> {
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
}

pub(super) mod policy {
    use netlink_packet_core::Parseable;
    use netlink_packet_xfrm::policy::ModifyMessage;
    use netlink_packet_xfrm::{
        Address, IPPROTO_ESP, LifetimeConfig, UserTemplate, XFRM_MODE_TRANSPORT,
        XFRM_MSG_NEWPOLICY, XFRM_POLICY_ALLOW, XFRM_POLICY_BLOCK, XFRM_POLICY_IN, XFRM_POLICY_OUT,
        XFRM_POLICY_TYPE_MAIN, XFRM_USER_POLICY_INFO_LEN, XfrmAttrs,
    };

    use super::super::policy::decode_selector;
    use super::super::reply::{self, ReplyError};
    use super::super::{Occupant, Owned, ip_of};
    use crate::kernel::batch::Reply;
    use crate::state::{Direction, Policy, PolicyAction, PolicyId, ownership};

    /// `None` when netlink-packet-xfrm refuses the message.
    pub fn parse_reply(reply: Reply<'_>) -> Result<ModifyMessage, Option<ReplyError>> {
        let payload = reply::payload(
            reply,
            XFRM_MSG_NEWPOLICY,
            XFRM_USER_POLICY_INFO_LEN,
            "policy",
        )?;
        ModifyMessage::parse(payload).map_err(|_| None)
    }

    pub fn occupant(m: &ModifyMessage) -> Option<(PolicyId, Occupant)> {
        for attr in &m.nlas {
            match attr {
                XfrmAttrs::PolicyType(t) if t.ptype != XFRM_POLICY_TYPE_MAIN => return None,
                XfrmAttrs::Mark(mark) if mark.value != 0 || mark.mask != 0 => return None,
                XfrmAttrs::IfId(id) if *id != 0 => return None,
                XfrmAttrs::SecurityContext(_) => return None,
                _ => {}
            }
        }
        let info = &m.user_policy_info;
        let dir = match info.direction {
            XFRM_POLICY_IN => Direction::In,
            XFRM_POLICY_OUT => Direction::Out,
            _ => return None,
        };
        let selector = decode_selector(&info.selector)?;
        let occupant = if owned_reqid(m).is_some() {
            Occupant::Ours
        } else {
            let reqids: Vec<String> = templates(m).iter().map(|t| t.reqid.to_string()).collect();
            Occupant::Foreign {
                detail: if reqids.is_empty() {
                    "it has no template".to_owned()
                } else {
                    format!("template reqid {}", reqids.join(", "))
                },
            }
        };
        Some((PolicyId { dir, selector }, occupant))
    }

    fn templates(m: &ModifyMessage) -> &[UserTemplate] {
        m.nlas
            .iter()
            .find_map(|a| match a {
                XfrmAttrs::Template(t) => Some(t.as_slice()),
                _ => None,
            })
            .unwrap_or(&[])
    }

    fn owned_reqid(m: &ModifyMessage) -> Option<u32> {
        templates(m)
            .iter()
            .map(|t| t.reqid)
            .find(|r| ownership::is_owned_reqid(*r))
    }

    pub fn decode(m: &ModifyMessage) -> Owned<Policy> {
        let Some(reqid) = owned_reqid(m) else {
            return Owned::Foreign;
        };
        let info = &m.user_policy_info;
        let unaddressable = |reason: &str| Owned::Unaddressable {
            reason: format!("reqid {reqid}: {reason}"),
        };
        for attr in &m.nlas {
            match attr {
                XfrmAttrs::PolicyType(t) if t.ptype != XFRM_POLICY_TYPE_MAIN => {
                    return unaddressable("sub policy");
                }
                XfrmAttrs::Mark(mark) if mark.value != 0 || mark.mask != 0 => {
                    return unaddressable("marked");
                }
                XfrmAttrs::IfId(id) if *id != 0 => return unaddressable("has an interface id"),
                XfrmAttrs::SecurityContext(_) => return unaddressable("has a security context"),
                _ => {}
            }
        }
        let dir = match info.direction {
            XFRM_POLICY_IN => Direction::In,
            XFRM_POLICY_OUT => Direction::Out,
            other => return unaddressable(&format!("direction {other}")),
        };
        let Some(sel) = decode_selector(&info.selector) else {
            return unaddressable("selector is not UDP to one destination port");
        };

        let ts = templates(m);
        let t = ts
            .iter()
            .find(|t| t.reqid == reqid)
            .copied()
            .unwrap_or_default();
        let addr = |a: &Address| ip_of(info.selector.family, a).filter(|ip| !ip.is_unspecified());
        let (src, dst) = (addr(&t.saddr), addr(&t.id.daddr));
        let action = match info.action {
            XFRM_POLICY_BLOCK => PolicyAction::Block,
            _ => PolicyAction::Esp { src, dst },
        };
        let as_installed = ts.len() == 1
            && t.id.proto == IPPROTO_ESP
            && t.id.spi == 0
            && t.mode == XFRM_MODE_TRANSPORT
            && t.optional == 0
            && t.share == 0
            && (t.family == info.selector.family || t.family == 0)
            && [t.aalgos, t.ealgos, t.calgos] == [u32::MAX; 3]
            && (info.action == XFRM_POLICY_ALLOW
                || (info.action == XFRM_POLICY_BLOCK && src.is_none() && dst.is_none()))
            && info.flags == 0
            && info.lifetime_cfg == LifetimeConfig::default();
        let id = PolicyId { dir, selector: sel };
        Owned::Ours(Policy {
            id,
            priority: info.priority,
            action,
            reqid: if as_installed { reqid } else { 0 },
        })
    }
}
