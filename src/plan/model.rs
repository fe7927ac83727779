//! A pure model of how the kernel reacts to each [`Change`], used to prove plans
//! convergent in property tests and to reason about intermediate states.

use super::Change;
use crate::state::KernelState;

/// Applies `changes` to a copy of `state` as the kernel would (deleting a link removes
/// its addresses and FDB entries and frees its ports).
pub fn simulate(state: &KernelState, changes: &[Change]) -> KernelState {
    let mut s = state.clone();
    for change in changes {
        apply_one(&mut s, change);
    }
    s
}

pub(crate) fn apply_one(s: &mut KernelState, change: &Change) {
    match change {
        Change::CreateLink(l) => {
            s.links.insert(l.name.clone(), l.clone());
        }
        Change::DeleteLink(l) => {
            s.links.remove(&l.name);
            s.addresses.retain(|a| a.link != l.name);
            s.fdb.retain(|e| e.link != l.name);
            for port in s.links.values_mut() {
                if port.master.as_ref() == Some(&l.name) {
                    port.master = None;
                }
            }
        }
        Change::SetMtu { link, to, .. } => {
            if let Some(l) = s.links.get_mut(link) {
                l.mtu = *to;
            }
        }
        Change::SetMaster { link, to, .. } => {
            if let Some(l) = s.links.get_mut(link) {
                l.master = to.clone();
            }
        }
        Change::SetAlias { link, to, .. } => {
            if let Some(l) = s.links.get_mut(link) {
                l.alias = to.clone();
            }
        }
        Change::SetUp { link } => {
            if let Some(l) = s.links.get_mut(link) {
                l.up = true;
            }
        }
        Change::AddAddress(a) => {
            s.addresses.insert(a.clone());
        }
        Change::DeleteAddress(a) => {
            s.addresses.remove(a);
        }
        Change::AddFdb(e) => {
            s.fdb.insert(e.clone());
        }
        Change::DeleteFdb(e) => {
            s.fdb.remove(e);
        }
        Change::PutPolicy { policy, .. } => {
            s.policies.insert(policy.id, policy.clone());
        }
        Change::DeletePolicy(id) => {
            s.policies.remove(id);
        }
        Change::AddSa(sa) => {
            s.sas.insert(sa.id, sa.clone());
        }
        Change::DeleteSa(id) => {
            s.sas.remove(id);
        }
    }
}
