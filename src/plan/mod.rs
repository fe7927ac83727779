//! Desired vs observed -> an ordered list of [`Change`]s (pure).
//!
//! The order is what keeps every intermediate state safe:
//! 1. enforcement first: policies (catch-all block before anything else), then SAs,
//!    inbound before outbound, so an encrypted network's device never exists without
//!    its blocking policies and a sender never switches to a key the receiver lacks;
//! 2. links that go away or must be recreated are deleted (VXLAN before bridge);
//! 3. links are created down (bridges, then VXLAN ports), then changed;
//! 4. addresses and FDB entries;
//! 5. links are brought up (ports, then bridges);
//! 6. old SAs (outbound, then inbound) and policies that are no longer wanted are removed
//!    last, after the devices that needed them are gone (catch-alls last of all).
//!
//! Only objects in `observed` can be changed or deleted, and `observed` holds only what
//! the controller owns, so a plan never touches a foreign object.

mod change;
mod model;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

pub use change::{Change, ChangeKind};
pub use model::simulate;

use crate::state::{
    Direction, IfName, KernelState, Link, LinkKind, Policy, PolicyAction, Sa, SaId,
};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub changes: Vec<Change>,
    /// SAs whose parameters changed (say the spec's `encryptedDataPort`) but whose key
    /// is the installed one. Installing a key twice would start its sequence numbers,
    /// and so its AES-GCM nonces, over: they are left as they are, and whoever holds
    /// the keys (the agent) rekeys those directions instead.
    pub needs_new_keys: Vec<SaId>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
    pub fn count(&self, kind: ChangeKind) -> usize {
        self.changes.iter().filter(|c| c.kind() == kind).count()
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() && self.needs_new_keys.is_empty() {
            return writeln!(f, "No changes: the kernel already matches the spec.");
        }
        writeln!(
            f,
            "Plan: {} to create, {} to change, {} to delete.",
            self.count(ChangeKind::Create),
            self.count(ChangeKind::Modify),
            self.count(ChangeKind::Delete)
        )?;
        for change in &self.changes {
            writeln!(f, "  {change}")?;
        }
        for id in &self.needs_new_keys {
            writeln!(
                f,
                "  ! xfrm state esp spi 0x{:08x} {} -> {}: parameters changed; replaced by new keys, never reinstalled",
                id.spi, id.src, id.dst
            )?;
        }
        Ok(())
    }
}

/// Links whose creation-time parameters differ must be deleted and created again.
fn needs_recreate(want: &Link, have: &Link) -> bool {
    match (&want.kind, &have.kind) {
        (LinkKind::Bridge, LinkKind::Bridge) => false,
        (LinkKind::Vxlan(a), LinkKind::Vxlan(b)) => a != b,
        _ => true,
    }
}

/// Catch-all block first, then the catch-all inbound requirement, then pair policies:
/// at no point is a pair policy present without the catch-alls behind it.
fn policy_rank(p: &Policy) -> (u8, Direction) {
    let rank = match p.action {
        PolicyAction::Block => 0,
        PolicyAction::Esp { src: None, .. } => 1,
        PolicyAction::Esp { .. } => 2,
    };
    (rank, p.id.dir)
}

/// The (src, dst) pairs that a desired or observed OUT policy of ours sends ESP on: an
/// SA on such a pair is outbound. Computed once per plan (a lookup per SA keeps large
/// plans linear).
fn outbound_pairs(desired: &KernelState, observed: &KernelState) -> BTreeSet<(IpAddr, IpAddr)> {
    desired
        .policies
        .values()
        .chain(observed.policies.values())
        .filter(|p| p.id.dir == Direction::Out)
        .filter_map(|p| match p.action {
            PolicyAction::Esp {
                src: Some(s),
                dst: Some(d),
            } => Some((s, d)),
            _ => None,
        })
        .collect()
}

pub fn plan(desired: &KernelState, observed: &KernelState) -> Plan {
    let mut out = Vec::new();

    // 1. Enforcement: policies, then new SAs (inbound before outbound).
    let mut puts: Vec<(&Policy, Option<&Policy>)> = join(&desired.policies, &observed.policies)
        .filter_map(|(want, have)| match want {
            Some(want) if have != Some(want) => Some((want, have)),
            _ => None,
        })
        .collect();
    puts.sort_by_key(|(p, _)| policy_rank(p));
    for (p, have) in puts {
        out.push(Change::PutPolicy {
            policy: p.clone(),
            replaces: have.cloned(),
        });
    }
    let (mut new_sas, mut old_sas) = (Vec::new(), Vec::new());
    let mut needs_new_keys = Vec::new();
    for (want, have) in join(&desired.sas, &observed.sas) {
        match (want, have) {
            (Some(want), Some(have)) if have.same_install(want) => {}
            (Some(want), Some(have)) if have.key == want.key => needs_new_keys.push(want.id),
            (Some(want), Some(_)) => {
                // Same SPI but other content: the old one must go before the new one
                // can exist.
                out.push(Change::DeleteSa(want.id));
                new_sas.push(want);
            }
            (Some(want), None) => new_sas.push(want),
            (None, Some(have)) => old_sas.push(have),
            (None, None) => {}
        }
    }
    // Only a plan that adds or deletes SAs needs to tell their directions apart.
    let outbound = if new_sas.is_empty() && old_sas.is_empty() {
        BTreeSet::new()
    } else {
        outbound_pairs(desired, observed)
    };
    let is_outbound = |sa: &Sa| outbound.contains(&(sa.id.src, sa.id.dst));
    new_sas.sort_by_key(|sa| is_outbound(sa));
    out.extend(new_sas.into_iter().map(|sa| Change::AddSa(sa.clone())));

    // 2. Links to delete or recreate: VXLAN devices before bridges.
    let mut gone: BTreeSet<IfName> = BTreeSet::new();
    let mut deletions: Vec<&Link> = observed
        .links
        .values()
        .filter(|have| {
            desired
                .links
                .get(&have.name)
                .is_none_or(|want| needs_recreate(want, have))
        })
        .collect();
    deletions.sort_by_key(|l| matches!(l.kind, LinkKind::Bridge));
    for l in deletions {
        gone.insert(l.name.clone());
        out.push(Change::DeleteLink(l.clone()));
    }

    // 3. Create (down) bridges, then ports; then change what differs.
    let mut creations: Vec<&Link> = desired
        .links
        .values()
        .filter(|l| !observed.links.contains_key(&l.name) || gone.contains(&l.name))
        .collect();
    creations.sort_by_key(|l| !matches!(l.kind, LinkKind::Bridge));
    for l in &creations {
        out.push(Change::CreateLink(Link {
            up: false,
            ..(*l).clone()
        }));
    }
    for want in desired.links.values() {
        let Some(have) = observed
            .links
            .get(&want.name)
            .filter(|_| !gone.contains(&want.name))
        else {
            continue;
        };
        if have.alias != want.alias {
            out.push(Change::SetAlias {
                link: want.name.clone(),
                from: have.alias.clone(),
                to: want.alias.clone(),
            });
        }
        if have.mtu != want.mtu {
            out.push(Change::SetMtu {
                link: want.name.clone(),
                from: have.mtu,
                to: want.mtu,
            });
        }
        // A port whose bridge was recreated has lost its master.
        let have_master = have.master.clone().filter(|m| !gone.contains(m));
        if have_master != want.master {
            out.push(Change::SetMaster {
                link: want.name.clone(),
                from: have_master,
                to: want.master.clone(),
            });
        }
    }

    // 4. Addresses and FDB entries (those on deleted links went with them).
    let survives = |link: &IfName| !gone.contains(link) && desired.links.contains_key(link);
    for a in observed.addresses.difference(&desired.addresses) {
        if survives(&a.link) {
            out.push(Change::DeleteAddress(a.clone()));
        }
    }
    for (a, present) in with_presence(&desired.addresses, &observed.addresses) {
        if gone.contains(&a.link) || !present {
            out.push(Change::AddAddress(a.clone()));
        }
    }
    for e in observed.fdb.difference(&desired.fdb) {
        if survives(&e.link) {
            out.push(Change::DeleteFdb(e.clone()));
        }
    }
    for (e, present) in with_presence(&desired.fdb, &observed.fdb) {
        if gone.contains(&e.link) || !present {
            out.push(Change::AddFdb(e.clone()));
        }
    }

    // 5. Bring links up: ports before bridges, so the bridge starts forwarding with
    //    every port in place.
    let mut ups: Vec<&Link> = desired
        .links
        .values()
        .filter(|want| {
            want.up
                && (gone.contains(&want.name)
                    || observed.links.get(&want.name).is_none_or(|have| !have.up))
        })
        .collect();
    ups.sort_by_key(|l| matches!(l.kind, LinkKind::Bridge));
    for l in ups {
        out.push(Change::SetUp {
            link: l.name.clone(),
        });
    }

    // 6. Old SAs (outbound first, so nothing is sent on an SA about to lose its inbound
    //    peer), then policies no longer wanted (pair policies before catch-alls).
    old_sas.sort_by_key(|sa| !is_outbound(sa));
    out.extend(old_sas.into_iter().map(|sa| Change::DeleteSa(sa.id)));
    let mut old_policies: Vec<&Policy> = join(&desired.policies, &observed.policies)
        .filter_map(|(want, have)| if want.is_none() { have } else { None })
        .collect();
    old_policies.sort_by_key(|p| std::cmp::Reverse(policy_rank(p)));
    out.extend(old_policies.into_iter().map(|p| Change::DeletePolicy(p.id)));

    Plan {
        changes: out,
        needs_new_keys,
    }
}

/// Walks two maps together in key order (a merge, linear in their sizes): each key of
/// either once, with its value on each side. Large plans stay linear; a lookup per
/// object would cost a tree search each.
fn join<'a, K: Ord, V>(
    left: &'a BTreeMap<K, V>,
    right: &'a BTreeMap<K, V>,
) -> impl Iterator<Item = (Option<&'a V>, Option<&'a V>)> {
    let (mut l, mut r) = (left.iter().peekable(), right.iter().peekable());
    std::iter::from_fn(move || match (l.peek(), r.peek()) {
        (None, None) => None,
        (Some(_), None) => l.next().map(|(_, v)| (Some(v), None)),
        (None, Some(_)) => r.next().map(|(_, v)| (None, Some(v))),
        (Some((a, _)), Some((b, _))) => match a.cmp(b) {
            std::cmp::Ordering::Less => l.next().map(|(_, v)| (Some(v), None)),
            std::cmp::Ordering::Greater => r.next().map(|(_, v)| (None, Some(v))),
            std::cmp::Ordering::Equal => {
                let (left, right) = (l.next().map(|(_, v)| v), r.next().map(|(_, v)| v));
                Some((left, right))
            }
        },
    })
}

/// Each item of `items` in order, with whether `other` holds it too (a merge, linear).
fn with_presence<'a, T: Ord>(
    items: &'a BTreeSet<T>,
    other: &'a BTreeSet<T>,
) -> impl Iterator<Item = (&'a T, bool)> {
    let mut rest = other.iter().peekable();
    items.iter().map(move |item| {
        while rest.next_if(|o| *o < item).is_some() {}
        (item, rest.next_if(|o| *o == item).is_some())
    })
}

#[cfg(test)]
mod tests;
