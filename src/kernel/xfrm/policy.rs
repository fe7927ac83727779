//! XFRM policies: encoding, decoding, the dumps, and the put / delete requests.

use std::collections::{BTreeMap, HashMap};

use ipnet::IpNet;
use netlink_packet_core::parse_u32;
use netlink_packet_xfrm::policy::{DelGetMessage, ModifyMessage};
use netlink_packet_xfrm::{
    Address, IPPROTO_ESP, IPPROTO_UDP, Id, LifetimeConfig, Mark, Selector as NlSelector,
    UserPolicyInfo, UserPolicyType, UserTemplate, XFRM_MODE_TRANSPORT, XFRM_MSG_NEWPOLICY,
    XFRM_POLICY_ALLOW, XFRM_POLICY_BLOCK, XFRM_POLICY_IN, XFRM_POLICY_OUT, XFRM_POLICY_TYPE_MAIN,
    XFRM_SEC_CTX_HEADER_LEN, XFRM_USER_POLICY_INFO_LEN, XFRM_USER_TEMPLATE_LEN, XFRMA_IF_ID,
    XFRMA_MARK, XFRMA_POLICY_TYPE, XFRMA_SEC_CTX, XFRMA_TMPL, XfrmAttrs, XfrmMessage,
};

use super::reply::{self, ReplyError};
use super::{Occupant, Owned, family_of, ip_of};
use crate::kernel::KernelError;
use crate::kernel::batch::{BatchSocket, Reply, Secrets, dump_request};
use crate::state::{Direction, Policy, PolicyAction, PolicyId, Selector, ownership};

/// Every policy of ours.
pub(super) async fn dump(
    socket: &mut BatchSocket,
) -> Result<BTreeMap<PolicyId, Policy>, KernelError> {
    let op = "dump xfrm policies";
    let request = dump_request(XfrmMessage::GetPolicy(DelGetMessage::default()));
    socket
        .dump(&request, Secrets::No, BTreeMap::new, |out, reply| {
            let read = PolicyReply::parse(reply)?;
            match decode(&read) {
                Owned::Foreign => {}
                Owned::Ours(p) => {
                    if p.reqid == 0 {
                        tracing::warn!(policy = %describe(&p.id), "policy of ours in a form we never install; it will be replaced");
                    }
                    out.insert(p.id, p);
                }
                Owned::Unaddressable { reason } => {
                    tracing::warn!(%reason, index = read.info.index, "ignoring an XFRM policy with our reqid that we cannot address");
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| e.into_kernel(op))
}

const WHAT: &str = "policy";

/// A policy from a dump reply, read in place: the fixed header copied out, and of the
/// attributes only what [`decode`] and [`occupant`] look at, borrowed from the reply.
pub(super) struct PolicyReply<'a> {
    info: UserPolicyInfo,
    /// The value of the first template attribute: `xfrm_user_tmpl`s (a trailing partial
    /// one is ignored, as netlink-packet-xfrm ignored it).
    templates: Option<&'a [u8]>,
    /// Why no [`PolicyId`] can address it: the first sub-policy type, mark, interface id
    /// or security context met.
    unaddressable: Option<&'static str>,
}

impl<'a> PolicyReply<'a> {
    pub(super) fn parse(reply: Reply<'a>) -> Result<PolicyReply<'a>, ReplyError> {
        let payload = reply::payload(reply, XFRM_MSG_NEWPOLICY, XFRM_USER_POLICY_INFO_LEN, WHAT)?;
        PolicyReply::read(payload)
    }

    /// Reads a policy message (`xfrm_userpolicy_info` and attributes).
    pub(super) fn read(payload: &'a [u8]) -> Result<PolicyReply<'a>, ReplyError> {
        let short = || ReplyError::Short {
            what: WHAT,
            len: payload.len(),
        };
        let info = UserPolicyInfo::parse(payload).map_err(|_| short())?;
        let attrs = payload.get(XFRM_USER_POLICY_INFO_LEN..).ok_or_else(short)?;
        let mut p = PolicyReply {
            info,
            templates: None,
            unaddressable: None,
        };
        for attr in reply::attributes(attrs, WHAT) {
            let attr = attr?;
            let value = attr.value;
            let malformed = || attr.malformed(WHAT);
            // The length rules are netlink-packet-xfrm's, so what it refused stays refused.
            let odd = match attr.kind {
                XFRMA_TMPL => {
                    p.templates.get_or_insert(value);
                    None
                }
                XFRMA_POLICY_TYPE => {
                    let t = UserPolicyType::parse(value).map_err(|_| malformed())?;
                    (t.ptype != XFRM_POLICY_TYPE_MAIN).then_some("sub policy")
                }
                XFRMA_MARK => {
                    let mark = Mark::parse(value).map_err(|_| malformed())?;
                    (mark.value != 0 || mark.mask != 0).then_some("marked")
                }
                XFRMA_IF_ID => {
                    let id = parse_u32(value).map_err(|_| malformed())?;
                    (id != 0).then_some("has an interface id")
                }
                XFRMA_SEC_CTX => {
                    if value.len() < XFRM_SEC_CTX_HEADER_LEN {
                        return Err(malformed());
                    }
                    Some("has a security context")
                }
                _ => None,
            };
            if p.unaddressable.is_none() {
                p.unaddressable = odd;
            }
        }
        Ok(p)
    }

    fn templates(&self) -> impl Iterator<Item = UserTemplate> + '_ {
        self.templates
            .unwrap_or_default()
            .chunks_exact(XFRM_USER_TEMPLATE_LEN)
            // Cannot fail on a whole template.
            .filter_map(|t| UserTemplate::parse(t).ok())
    }

    fn owned_reqid(&self) -> Option<u32> {
        self.templates()
            .map(|t| t.reqid)
            .find(|r| ownership::is_owned_reqid(*r))
    }
}

/// Who holds each policy slot one of our [`PolicyId`]s can address, from one dump.
///
/// The kernel identifies a policy by type, direction, selector, mark, interface id and
/// security context; ours are main-type policies without mark, interface id or context,
/// so only policies of that shape can sit in a slot of ours (and only those with a plain
/// UDP selector can have a selector equal to ours).
pub(super) async fn occupants(
    socket: &mut BatchSocket,
) -> Result<HashMap<PolicyId, Occupant>, KernelError> {
    let op = "dump xfrm policies";
    let request = dump_request(XfrmMessage::GetPolicy(DelGetMessage::default()));
    socket
        .dump(&request, Secrets::No, HashMap::new, |out, reply| {
            if let Some((id, occupant)) = occupant(&PolicyReply::parse(reply)?) {
                out.insert(id, occupant);
            }
            Ok(())
        })
        .await
        .map_err(|e| e.into_kernel(op))
}

/// The slot a policy holds and who holds it; `None` when none of our ids can name it.
pub(super) fn occupant(p: &PolicyReply<'_>) -> Option<(PolicyId, Occupant)> {
    if p.unaddressable.is_some() {
        return None;
    }
    let info = &p.info;
    let dir = match info.direction {
        XFRM_POLICY_IN => Direction::In,
        XFRM_POLICY_OUT => Direction::Out,
        _ => return None,
    };
    let selector = decode_selector(&info.selector)?;
    let occupant = if p.owned_reqid().is_some() {
        Occupant::Ours
    } else {
        let reqids: Vec<String> = p.templates().map(|t| t.reqid.to_string()).collect();
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

/// NEWPOLICY (`replace == false`: fails with EEXIST if the slot got taken since the
/// dump) or UPDPOLICY (replaces the policy in the slot).
pub(super) fn put_request(p: &Policy, replace: bool) -> Result<XfrmMessage, String> {
    let m = encode(p)?;
    Ok(if replace {
        XfrmMessage::UpdatePolicy(m)
    } else {
        XfrmMessage::AddPolicy(m)
    })
}

/// DELPOLICY of the slot (main type, no mark).
pub(super) fn delete_request(id: &PolicyId) -> Result<XfrmMessage, String> {
    id_message(id).map(XfrmMessage::DeletePolicy)
}

fn describe(id: &PolicyId) -> String {
    format!(
        "{} {} -> {} udp dport {}",
        id.dir, id.selector.src, id.selector.dst, id.selector.dport
    )
}

/// The kernel's selector for ours: UDP from `src` to `dst`, destination port `dport`,
/// any source port.
pub(super) fn selector(s: &Selector) -> Result<NlSelector, String> {
    let (src, dst) = (s.src.addr(), s.dst.addr());
    if family_of(src) != family_of(dst) {
        return Err(format!(
            "selector mixes address families ({} -> {})",
            s.src, s.dst
        ));
    }
    Ok(NlSelector {
        saddr: Address::from_ip(&src),
        daddr: Address::from_ip(&dst),
        prefixlen_s: s.src.prefix_len(),
        prefixlen_d: s.dst.prefix_len(),
        family: family_of(src),
        proto: IPPROTO_UDP,
        dport: s.dport,
        dport_mask: u16::MAX,
        ..NlSelector::default()
    })
}

/// Reads back a selector written by [`selector`]; `None` for any other shape.
pub(super) fn decode_selector(s: &NlSelector) -> Option<Selector> {
    let plain = s.proto == IPPROTO_UDP
        && s.dport_mask == u16::MAX
        && s.sport == 0
        && s.sport_mask == 0
        && s.ifindex == 0
        && s.user == 0;
    if !plain {
        return None;
    }
    let src = IpNet::new(ip_of(s.family, &s.saddr)?, s.prefixlen_s).ok()?;
    let dst = IpNet::new(ip_of(s.family, &s.daddr)?, s.prefixlen_d).ok()?;
    Some(Selector {
        src,
        dst,
        dport: s.dport,
    })
}

fn direction(dir: Direction) -> u8 {
    match dir {
        Direction::In => XFRM_POLICY_IN,
        Direction::Out => XFRM_POLICY_OUT,
    }
}

fn id_message(id: &PolicyId) -> Result<DelGetMessage, String> {
    let mut m = DelGetMessage::default();
    m.user_policy_id.selector = selector(&id.selector)?;
    m.user_policy_id.direction = direction(id.dir);
    Ok(m)
}

/// The NEWPOLICY / UPDPOLICY message for one of our policies.
pub(super) fn encode(p: &Policy) -> Result<ModifyMessage, String> {
    if !ownership::is_owned_reqid(p.reqid) {
        return Err(format!(
            "reqid {} is not in our range: the policy would not be ours",
            p.reqid
        ));
    }
    let sel = selector(&p.id.selector)?;
    let mut t = UserTemplate {
        family: sel.family,
        id: Id {
            proto: IPPROTO_ESP,
            ..Id::default()
        },
        mode: XFRM_MODE_TRANSPORT,
        reqid: p.reqid,
        optional: 0,               // level required: no plaintext accepted in its place
        ..UserTemplate::default()  // all algorithms allowed
    };
    let action = match p.action {
        PolicyAction::Block => XFRM_POLICY_BLOCK,
        PolicyAction::Esp { src, dst } => {
            for addr in [src, dst].into_iter().flatten() {
                if family_of(addr) != sel.family {
                    return Err(format!(
                        "template address {addr} is not of the selector's family"
                    ));
                }
            }
            t.saddr = src.map(|a| Address::from_ip(&a)).unwrap_or_default();
            t.id.daddr = dst.map(|a| Address::from_ip(&a)).unwrap_or_default();
            XFRM_POLICY_ALLOW
        }
    };
    let mut m = ModifyMessage::default();
    m.user_policy_info.selector = sel;
    m.user_policy_info.priority = p.priority;
    m.user_policy_info.direction = direction(p.id.dir);
    m.user_policy_info.action = action;
    m.nlas.push(XfrmAttrs::Template(vec![t]));
    Ok(m)
}

/// Reads a policy from a dump reply.
pub(super) fn decode(p: &PolicyReply<'_>) -> Owned<Policy> {
    let Some(reqid) = p.owned_reqid() else {
        return Owned::Foreign;
    };
    let info = &p.info;
    let unaddressable = |reason: &str| Owned::Unaddressable {
        reason: format!("reqid {reqid}: {reason}"),
    };
    if let Some(reason) = p.unaddressable {
        return unaddressable(reason);
    }
    let dir = match info.direction {
        XFRM_POLICY_IN => Direction::In,
        XFRM_POLICY_OUT => Direction::Out,
        other => return unaddressable(&format!("direction {other}")),
    };
    let Some(sel) = decode_selector(&info.selector) else {
        return unaddressable("selector is not UDP to one destination port");
    };

    let t = p.templates().find(|t| t.reqid == reqid).unwrap_or_default();
    let addr = |a: &Address| ip_of(info.selector.family, a).filter(|ip| !ip.is_unspecified());
    let (src, dst) = (addr(&t.saddr), addr(&t.id.daddr));
    let action = match info.action {
        XFRM_POLICY_BLOCK => PolicyAction::Block,
        _ => PolicyAction::Esp { src, dst },
    };
    let as_installed = p.templates().count() == 1
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

#[cfg(test)]
mod dump_tests {
    use netlink_packet_core::Emitable;

    use super::*;
    use crate::state::Selector;

    fn policy() -> Policy {
        Policy {
            id: PolicyId {
                dir: Direction::Out,
                selector: Selector {
                    src: "192.0.2.1/32".parse().unwrap(),
                    dst: "192.0.2.2/32".parse().unwrap(),
                    dport: 4790,
                },
            },
            priority: 1000,
            action: PolicyAction::Esp {
                src: Some("192.0.2.1".parse().unwrap()),
                dst: Some("192.0.2.2".parse().unwrap()),
            },
            reqid: ownership::REQID_MIN,
        }
    }

    #[test]
    fn dump_replies_read_as_the_kernel_lays_them_out() {
        let p = policy();
        let m = encode(&p).unwrap();
        let mut bytes = vec![0; m.buffer_len()];
        m.emit(&mut bytes);
        let reply = Reply {
            kind: XFRM_MSG_NEWPOLICY,
            payload: &bytes,
        };
        let read = PolicyReply::parse(reply).unwrap();
        assert_eq!(read.info, m.user_policy_info);
        assert!(matches!(decode(&read), Owned::Ours(q) if q == p));
        assert!(matches!(occupant(&read), Some((id, Occupant::Ours)) if id == p.id));
    }

    #[test]
    fn odd_dump_replies_are_errors_not_panics() {
        let m = encode(&policy()).unwrap();
        let mut bytes = vec![0; m.buffer_len()];
        m.emit(&mut bytes);
        for (kind, payload) in [
            (XFRM_MSG_NEWPOLICY + 1, &bytes[..]),
            (XFRM_MSG_NEWPOLICY, &bytes[..XFRM_USER_POLICY_INFO_LEN - 1]),
            (XFRM_MSG_NEWPOLICY, &[][..]),
            (XFRM_MSG_NEWPOLICY, &bytes[..bytes.len() - 1]),
        ] {
            let reply = Reply { kind, payload };
            assert!(PolicyReply::parse(reply).is_err(), "{}", payload.len());
        }
    }
}
