//! One kernel operation of a plan, printable for people (`apply` shows the plan before
//! it runs it, `--dry-run` shows only that).

use std::fmt;

use crate::state::{
    Address, FdbEntry, IfName, Link, LinkKind, Policy, PolicyAction, PolicyId, Sa, SaId,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Create a link, administratively down, with its MTU, alias and master.
    CreateLink(Link),
    DeleteLink(Link),
    SetMtu {
        link: IfName,
        from: u32,
        to: u32,
    },
    SetMaster {
        link: IfName,
        from: Option<IfName>,
        to: Option<IfName>,
    },
    SetAlias {
        link: IfName,
        from: String,
        to: String,
    },
    SetUp {
        link: IfName,
    },
    AddAddress(Address),
    DeleteAddress(Address),
    AddFdb(FdbEntry),
    DeleteFdb(FdbEntry),
    /// Add or replace (same selector and direction) a policy.
    PutPolicy {
        policy: Policy,
        replaces: Option<Policy>,
    },
    DeletePolicy(PolicyId),
    AddSa(Sa),
    DeleteSa(SaId),
}

/// Rough kind of a change, for the plan summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Create,
    Modify,
    Delete,
}

impl Change {
    pub fn kind(&self) -> ChangeKind {
        match self {
            Change::CreateLink(_)
            | Change::AddAddress(_)
            | Change::AddFdb(_)
            | Change::AddSa(_) => ChangeKind::Create,
            Change::PutPolicy { replaces: None, .. } => ChangeKind::Create,
            Change::PutPolicy {
                replaces: Some(_), ..
            }
            | Change::SetMtu { .. }
            | Change::SetMaster { .. }
            | Change::SetAlias { .. }
            | Change::SetUp { .. } => ChangeKind::Modify,
            Change::DeleteLink(_)
            | Change::DeleteAddress(_)
            | Change::DeleteFdb(_)
            | Change::DeletePolicy(_)
            | Change::DeleteSa(_) => ChangeKind::Delete,
        }
    }
}

fn opt(name: &Option<IfName>) -> &str {
    name.as_ref().map_or("none", |n| n.as_str())
}

fn policy_text(p: &Policy) -> String {
    let action = match p.action {
        PolicyAction::Block => "block".to_owned(),
        PolicyAction::Esp {
            src: Some(s),
            dst: Some(d),
        } => format!("esp {s} -> {d}"),
        PolicyAction::Esp { .. } => "require esp".to_owned(),
    };
    format!(
        "{} priority {} {}",
        policy_id_text(&p.id),
        p.priority,
        action
    )
}

fn policy_id_text(id: &PolicyId) -> String {
    format!(
        "{} {} -> {} udp dport {}",
        id.dir, id.selector.src, id.selector.dst, id.selector.dport
    )
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::CreateLink(l) => {
                let what = match &l.kind {
                    LinkKind::Bridge => "bridge".to_owned(),
                    LinkKind::Vxlan(v) => format!(
                        "vxlan vni {} local {} dstport {} dev {}{}",
                        v.vni,
                        v.local,
                        v.port,
                        v.underlay,
                        if v.learning { "" } else { " nolearning" }
                    ),
                };
                write!(f, "+ link {} ({what}, mtu {}", l.name, l.mtu)?;
                if let Some(m) = &l.master {
                    write!(f, ", master {m}")?;
                }
                write!(f, ")")?;
                if let Some(net) = l.network_from_alias() {
                    write!(f, " network {net}")?;
                }
                Ok(())
            }
            Change::DeleteLink(l) => write!(f, "- link {}", l.name),
            Change::SetMtu { link, from, to } => write!(f, "~ link {link} mtu {from} => {to}"),
            Change::SetMaster { link, from, to } => {
                write!(f, "~ link {link} master {} => {}", opt(from), opt(to))
            }
            Change::SetAlias { link, from, to } => {
                write!(f, "~ link {link} alias {from:?} => {to:?}")
            }
            Change::SetUp { link } => write!(f, "~ link {link} down => up"),
            Change::AddAddress(a) => write!(f, "+ address {} on {}", a.addr, a.link),
            Change::DeleteAddress(a) => write!(f, "- address {} on {}", a.addr, a.link),
            Change::AddFdb(e) => {
                write!(f, "+ fdb 00:00:00:00:00:00 dst {} on {}", e.remote, e.link)
            }
            Change::DeleteFdb(e) => {
                write!(f, "- fdb 00:00:00:00:00:00 dst {} on {}", e.remote, e.link)
            }
            Change::PutPolicy {
                policy,
                replaces: None,
            } => {
                write!(f, "+ xfrm policy {}", policy_text(policy))
            }
            Change::PutPolicy {
                policy,
                replaces: Some(old),
            } => write!(
                f,
                "~ xfrm policy {} => {}",
                policy_text(old),
                policy_text(policy)
            ),
            Change::DeletePolicy(id) => write!(f, "- xfrm policy {}", policy_id_text(id)),
            Change::AddSa(sa) => write!(
                f,
                "+ xfrm state esp spi 0x{:08x} {} -> {} (aes-256-gcm, icv 128, esn, replay {})",
                sa.id.spi, sa.id.src, sa.id.dst, sa.replay_window
            ),
            Change::DeleteSa(id) => {
                write!(
                    f,
                    "- xfrm state esp spi 0x{:08x} {} -> {}",
                    id.spi, id.src, id.dst
                )
            }
        }
    }
}
