//! XFRM policies: encoding, decoding, the dumps, and the put / delete requests.

use std::collections::{BTreeMap, HashMap};

use ipnet::IpNet;
use netlink_packet_xfrm::policy::{DelGetMessage, ModifyMessage};
use netlink_packet_xfrm::{
    Address, IPPROTO_ESP, IPPROTO_UDP, Id, LifetimeConfig, Selector as NlSelector, UserTemplate,
    XFRM_MODE_TRANSPORT, XFRM_POLICY_ALLOW, XFRM_POLICY_BLOCK, XFRM_POLICY_IN, XFRM_POLICY_OUT,
    XFRM_POLICY_TYPE_MAIN, XfrmAttrs, XfrmMessage,
};

use netlink_packet_core::Parseable;
use netlink_packet_xfrm::{XFRM_MSG_NEWPOLICY, XFRM_USER_POLICY_INFO_LEN};

use super::{Occupant, Owned, checked_payload, family_of, ip_of};
use crate::kernel::KernelError;
use crate::kernel::batch::{BatchSocket, DumpError, Reply, Secrets, dump_request};
use crate::state::{Direction, Policy, PolicyAction, PolicyId, Selector, ownership};

/// Every policy of ours.
pub(super) async fn dump(
    socket: &mut BatchSocket,
) -> Result<BTreeMap<PolicyId, Policy>, KernelError> {
    let op = "dump xfrm policies";
    let request = dump_request(XfrmMessage::GetPolicy(DelGetMessage::default()));
    socket
        .dump(&request, Secrets::No, BTreeMap::new, |out, reply| {
            let m = parse_reply(reply)?;
            match decode(&m) {
                Owned::Foreign => {}
                Owned::Ours(p) => {
                    if p.reqid == 0 {
                        tracing::warn!(policy = %describe(&p.id), "policy of ours in a form we never install; it will be replaced");
                    }
                    out.insert(p.id, p);
                }
                Owned::Unaddressable { reason } => {
                    tracing::warn!(%reason, index = m.user_policy_info.index, "ignoring an XFRM policy with our reqid that we cannot address");
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| e.into_kernel(op))
}

/// A policy from a dump reply.
fn parse_reply(reply: Reply<'_>) -> Result<ModifyMessage, DumpError> {
    let payload = checked_payload(
        reply,
        XFRM_MSG_NEWPOLICY,
        XFRM_USER_POLICY_INFO_LEN,
        "policy",
    )?;
    ModifyMessage::parse(payload)
        .map_err(|e| DumpError::Unexpected(format!("an unreadable policy message ({e})")))
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
            if let Some((id, occupant)) = occupant(&parse_reply(reply)?) {
                out.insert(id, occupant);
            }
            Ok(())
        })
        .await
        .map_err(|e| e.into_kernel(op))
}

fn occupant(m: &ModifyMessage) -> Option<(PolicyId, Occupant)> {
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

/// Reads a policy from a dump or GET reply.
pub(super) fn decode(m: &ModifyMessage) -> Owned<Policy> {
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
    fn dump_replies_parse_as_the_kernel_lays_them_out() {
        let p = policy();
        let m = encode(&p).unwrap();
        let mut bytes = vec![0; m.buffer_len()];
        m.emit(&mut bytes);
        let reply = Reply {
            kind: XFRM_MSG_NEWPOLICY,
            payload: &bytes,
        };
        let parsed = parse_reply(reply).unwrap();
        assert_eq!(parsed, m);
        assert!(matches!(decode(&parsed), Owned::Ours(q) if q == p));
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
        ] {
            let reply = Reply { kind, payload };
            assert!(matches!(parse_reply(reply), Err(DumpError::Unexpected(_))));
        }
    }
}
