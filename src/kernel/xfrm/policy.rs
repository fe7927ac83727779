//! XFRM policies: encoding, decoding, and the put / delete / dump requests.

use std::collections::BTreeMap;

use ipnet::IpNet;
use netlink_packet_core::NLM_F_REQUEST;
use netlink_packet_xfrm::policy::{DelGetMessage, ModifyMessage};
use netlink_packet_xfrm::{
    Address, IPPROTO_ESP, IPPROTO_UDP, Id, LifetimeConfig, Selector as NlSelector, UserTemplate,
    XFRM_MODE_TRANSPORT, XFRM_POLICY_ALLOW, XFRM_POLICY_BLOCK, XFRM_POLICY_IN, XFRM_POLICY_OUT,
    XFRM_POLICY_TYPE_MAIN, XfrmAttrs, XfrmMessage,
};

use super::{NlError, Owned, ack, dump_all, exchange, family_of, ip_of};
use crate::kernel::KernelError;
use crate::state::{Direction, Policy, PolicyAction, PolicyId, Selector, ownership};

/// Every policy of ours.
pub(super) async fn dump(
    h: &xfrmnetlink::Handle,
) -> Result<BTreeMap<PolicyId, Policy>, KernelError> {
    let op = "dump xfrm policies";
    let replies = dump_all(h, || XfrmMessage::GetPolicy(DelGetMessage::default()))
        .await
        .map_err(|e| e.into_kernel(op))?;
    let mut out = BTreeMap::new();
    for reply in replies {
        let XfrmMessage::AddPolicy(m) = reply else {
            return Err(NlError::Unexpected("message type in the policy dump").into_kernel(op));
        };
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
    }
    Ok(out)
}

/// Adds the policy, or replaces the one with its selector and direction (UPDPOLICY),
/// unless that one is not ours.
pub(super) async fn put(h: &xfrmnetlink::Handle, p: &Policy, op: &str) -> Result<(), KernelError> {
    let message = encode(p).map_err(|reason| KernelError::Invalid {
        operation: op.to_owned(),
        reason,
    })?;
    if let Some(existing) = get(h, &p.id, op).await? {
        refuse_foreign(&existing, op)?;
    }
    ack(h, XfrmMessage::UpdatePolicy(message))
        .await
        .map_err(|e| e.into_kernel(op))
}

/// Deletes our policy with this selector and direction; nothing there is fine, someone
/// else's there is an error.
pub(super) async fn delete(
    h: &xfrmnetlink::Handle,
    id: &PolicyId,
    op: &str,
) -> Result<(), KernelError> {
    let request = id_message(id).map_err(|reason| KernelError::Invalid {
        operation: op.to_owned(),
        reason,
    })?;
    match get(h, id, op).await? {
        None => {
            tracing::debug!(policy = %describe(id), "policy already absent");
            return Ok(());
        }
        Some(existing) => refuse_foreign(&existing, op)?,
    }
    match ack(h, XfrmMessage::DeletePolicy(request)).await {
        Ok(()) | Err(NlError::Errno(libc::ENOENT)) => Ok(()),
        Err(e) => Err(e.into_kernel(op)),
    }
}

/// The policy the kernel holds with this selector and direction (main type, no mark).
async fn get(
    h: &xfrmnetlink::Handle,
    id: &PolicyId,
    op: &str,
) -> Result<Option<ModifyMessage>, KernelError> {
    let request = id_message(id).map_err(|reason| KernelError::Invalid {
        operation: op.to_owned(),
        reason,
    })?;
    match exchange(h, XfrmMessage::GetPolicy(request), NLM_F_REQUEST).await {
        Ok(replies) => Ok(replies.into_iter().find_map(|m| match m {
            XfrmMessage::AddPolicy(p) => Some(p),
            _ => None,
        })),
        Err(NlError::Errno(libc::ENOENT)) => Ok(None),
        Err(e) => Err(e.into_kernel(op)),
    }
}

fn refuse_foreign(existing: &ModifyMessage, op: &str) -> Result<(), KernelError> {
    if owned_reqid(existing).is_some() {
        return Ok(());
    }
    let reqids: Vec<String> = templates(existing)
        .iter()
        .map(|t| t.reqid.to_string())
        .collect();
    Err(KernelError::ForeignXfrm {
        operation: op.to_owned(),
        what: "policy",
        detail: if reqids.is_empty() {
            "it has no template".to_owned()
        } else {
            format!("template reqid {}", reqids.join(", "))
        },
    })
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
