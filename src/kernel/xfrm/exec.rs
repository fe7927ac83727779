//! XFRM changes of a plan as batched requests, with the ownership checks done against
//! one dump taken when `Kernel::execute` starts rather than one GET per object.
//!
//! | change | request | ownership |
//! |---|---|---|
//! | `PutPolicy`, slot empty in the dump | NEWPOLICY | the kernel: EEXIST if the slot got taken since |
//! | `PutPolicy`, ours in the dump | UPDPOLICY | dump |
//! | `PutPolicy`, foreign in the dump | none: [`KernelError::ForeignXfrm`] | dump |
//! | `DeletePolicy` | DELPOLICY if ours, nothing if empty, error if foreign | dump |
//! | `AddSa` | NEWSA | the kernel: EEXIST on a taken (dst, SPI), whoever holds it |
//! | `DeleteSa` | DELSA if ours (same source), nothing if empty, error if foreign | dump |
//!
//! The remaining race: an object of ours that someone replaces with theirs *between the
//! dump and our request* (milliseconds to a few seconds on big plans) would be replaced
//! (UPDPOLICY) or deleted (DELSA, DELPOLICY) by us. Creating needs no check at all (the
//! kernel's NEWPOLICY / NEWSA never replace), and a foreign daemon taking over a slot
//! that holds one of our objects is not something IKE daemons do: they install their own
//! selectors and SPIs. The per-object GET this replaces had the same race, only shorter.

use std::collections::HashMap;
use std::net::IpAddr;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_xfrm::XfrmMessage;

use super::sa::SaOccupant;
use super::{Occupant, policy, sa};
use crate::kernel::KernelError;
use crate::kernel::batch::{self, BatchSocket, Request};
use crate::plan::Change;
use crate::state::{PolicyId, ownership};

/// The kernel's XFRM slots as dumped at the start of `execute`, kept up to date with
/// the requests queued since.
pub(in crate::kernel) struct Ownership {
    /// Loaded when the plan has a policy change.
    policies: Option<HashMap<PolicyId, Occupant>>,
    /// Loaded when the plan deletes an SA.
    sas: Option<HashMap<(IpAddr, u32), SaOccupant>>,
}

impl Ownership {
    /// Dumps what the ownership checks of `changes` need: policies when there is a
    /// policy change, states when an SA is deleted; nothing for a plan without either.
    pub async fn load(
        socket: &mut BatchSocket,
        changes: &[Change],
    ) -> Result<Ownership, KernelError> {
        let policy_change = changes
            .iter()
            .any(|c| matches!(c, Change::PutPolicy { .. } | Change::DeletePolicy(_)));
        let sa_delete = changes.iter().any(|c| matches!(c, Change::DeleteSa(_)));
        Ok(Ownership {
            policies: match policy_change {
                true => Some(policy::occupants(socket).await?),
                false => None,
            },
            sas: match sa_delete {
                true => Some(sa::occupants(socket).await?),
                false => None,
            },
        })
    }

    /// A view given whole (unit tests).
    #[cfg(test)]
    pub(super) fn with(
        policies: impl IntoIterator<Item = (PolicyId, Occupant)>,
        sas: impl IntoIterator<Item = ((IpAddr, u32), SaOccupant)>,
    ) -> Ownership {
        Ownership {
            policies: Some(policies.into_iter().collect()),
            sas: Some(sas.into_iter().collect()),
        }
    }

    /// The request for one XFRM change (`None`: nothing to do), or why it must not run.
    /// `tag` identifies the change in batch errors. [`Self::load`] must have been given
    /// the change (its dumps cannot run while a batch holds the socket).
    pub fn prepare(&mut self, change: &Change, tag: usize) -> Result<Option<Request>, KernelError> {
        let loaded = match change {
            Change::PutPolicy { .. } | Change::DeletePolicy(_) => self.policies.is_some(),
            Change::DeleteSa(_) => self.sas.is_some(),
            _ => true,
        };
        if !loaded {
            return Err(KernelError::Invalid {
                operation: change.to_string(),
                reason: "no ownership view was loaded for this change (a bug)".into(),
            });
        }
        let op = || change.to_string();
        let invalid = |reason: String| KernelError::Invalid {
            operation: op(),
            reason,
        };
        let foreign = |what: &'static str, detail: String| KernelError::ForeignXfrm {
            operation: op(),
            what,
            detail,
        };
        let (message, tolerated): (XfrmMessage, &'static [i32]) = match change {
            Change::PutPolicy { policy: p, .. } => {
                let slots = self.policies.get_or_insert_default();
                let replace = match slots.get(&p.id) {
                    None => false,
                    Some(Occupant::Ours) => true,
                    Some(Occupant::Foreign { detail }) => {
                        return Err(foreign("policy", detail.clone()));
                    }
                };
                let message = policy::put_request(p, replace).map_err(invalid)?;
                slots.insert(p.id, Occupant::Ours);
                (message, &[])
            }
            Change::DeletePolicy(id) => {
                let slots = self.policies.get_or_insert_default();
                match slots.get(id) {
                    None => {
                        tracing::debug!(change = %op(), "policy already absent");
                        return Ok(None);
                    }
                    Some(Occupant::Foreign { detail }) => {
                        return Err(foreign("policy", detail.clone()));
                    }
                    Some(Occupant::Ours) => {}
                }
                let message = policy::delete_request(id).map_err(invalid)?;
                slots.remove(id);
                (message, &[libc::ENOENT])
            }
            Change::AddSa(s) => {
                let message = sa::add_request(s).map_err(invalid)?;
                if let Some(slots) = &mut self.sas {
                    let occupant = SaOccupant {
                        reqid: s.reqid,
                        src: Some(s.id.src),
                    };
                    slots.insert((s.id.dst, s.id.spi), occupant);
                }
                (message, &[])
            }
            Change::DeleteSa(id) => {
                let slots = self.sas.get_or_insert_default();
                match slots.get(&(id.dst, id.spi)) {
                    None => {
                        tracing::debug!(spi = format_args!("0x{:08x}", id.spi), dst = %id.dst, "SA already absent");
                        return Ok(None);
                    }
                    Some(o) if !ownership::is_owned_reqid(o.reqid) => {
                        return Err(foreign("state", format!("reqid {}", o.reqid)));
                    }
                    Some(o) if o.src != Some(id.src) => {
                        // Ours, but another SA (same destination and SPI, other source):
                        // not the one the plan means, so leave it.
                        tracing::warn!(spi = format_args!("0x{:08x}", id.spi), dst = %id.dst, "SA with this SPI has another source; not deleting it");
                        return Ok(None);
                    }
                    Some(_) => {}
                }
                slots.remove(&(id.dst, id.spi));
                (sa::delete_request(id), &[libc::ESRCH, libc::ENOENT])
            }
            _ => {
                return Err(KernelError::Unsupported {
                    operation: op(),
                    executor: "XFRM",
                });
            }
        };
        Ok(Some(Request {
            bytes: serialize(message),
            tag,
            tolerated,
        }))
    }
}

/// The request's bytes; a NEWSA message's key is zeroed once copied into them.
fn serialize(message: XfrmMessage) -> zeroize::Zeroizing<Vec<u8>> {
    let mut message = NetlinkMessage::from(message);
    let bytes = batch::encode(&mut message, 0);
    if let NetlinkPayload::InnerMessage(XfrmMessage::AddSa(m)) = &mut message.payload {
        sa::scrub(m);
    }
    bytes
}
