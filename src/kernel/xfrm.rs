//! XFRM states (SAs) and policies over xfrm netlink: what the controller owns, and the
//! changes of a plan that touch them.
//!
//! # Ownership
//!
//! An SA is ours when its reqid is in [`ownership::REQID_MIN`]..=[`ownership::REQID_MAX`];
//! a policy is ours when one of its templates carries such a reqid. That holds for block
//! policies too: the kernel keeps (and dumps) a template on a `block` policy (checked on
//! 6.1 in UML and on 6.18) and a block policy with a template still drops (sendto gets
//! EPERM; `integration/kernel_xfrm.rs` checks it in UML), so no second marker (XFRM
//! marks, a priority range) is needed.
//! [`ownership::REQID_MAX`] is reserved for the throwaway SA of [`check_esp`].
//!
//! Before replacing or deleting anything, the executor looks up what occupies that slot
//! (policy: selector + direction; SA: destination + SPI) in one dump taken when
//! `Kernel::execute` starts, and refuses with [`KernelError::ForeignXfrm`] when it is
//! not ours; creations use the kernel's own refusal (NEWPOLICY and NEWSA fail with
//! EEXIST on a taken slot). So a plan computed from a stale dump never clobbers
//! strongSwan's objects; the race that remains is described in `exec`.
//! The requests of a plan are sent many per `send()` (`kernel::batch`).
//!
//! # Kernel encoding
//!
//! ```text
//! policy  sel src S dst D proto udp dport P (sport any)  dir in|out  priority N
//!   Block   action block  tmpl proto esp mode transport reqid R           (addresses 0)
//!   Esp     action allow  tmpl src A dst B proto esp mode transport reqid R
//!           level required, all algorithms                  (A, B = 0 when None)
//! state   src A dst B proto esp spi X reqid R mode transport flag esn
//!         replay-window W (ESN replay state)  aead rfc4106(gcm(aes)) <36 bytes> 128
//!         sel src A/32 dst B/32 proto udp dport P (/128 for IPv6)
//!         limits: bytes and packets 0 ("none" in [`Lifetime`]) <-> u64::MAX (the
//!         kernel's "none"); seconds 0 <-> 0 (the kernel's "none" for time limits;
//!         u64::MAX seconds would expire the SA at once)
//! ```
//!
//! # Owned objects we did not install in this form
//!
//! A dumped object of ours that the kernel holds in a form we never install (another
//! algorithm, `level use`, tunnel mode, extra templates, no key yet as after
//! `ALLOCSPI`, ...) but that a [`PolicyId`] / [`SaId`] still addresses is reported with
//! `reqid: 0`: it can never equal a desired object, so the plan replaces (policy) or
//! deletes and re-adds (SA) it. An object of ours that no [`PolicyId`] / [`SaId`] can
//! address (marked, with an interface id, a sub-policy, a forward policy, a selector
//! that is not UDP to one port) is left out of the dump with a warning: a plan could
//! not name it, and nothing we install looks like that.
//!
//! Key material reaches the kernel only inside the NEWSA message; replies that carry
//! keys (dumps, GETSA) are zeroed after decoding. Errors and logs name SPIs and
//! addresses, never keys.

mod exec;
#[cfg(test)]
mod legacy;
mod policy;
mod reply;
mod sa;
#[cfg(test)]
mod tests;

pub(super) use exec::Ownership;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use futures::StreamExt;
use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_xfrm::{AF_INET, AF_INET6, Address, XfrmMessage};

use super::KernelError;
use super::batch::BatchSocket;
use crate::state::{Policy, PolicyId, Sa, SaId, ownership};

/// How long one request may take before we give up on the kernel's answer: a lost
/// reply (netlink-proto drops datagrams it cannot decode) must not hang the agent.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The reqid of the throwaway SA of [`check_esp`].
pub const PROBE_REQID: u32 = ownership::REQID_MAX;

/// Every policy and SA of ours in this namespace, and the ESP slots (destination, SPI)
/// that SAs of others hold, dumped on one of `Kernel`'s own sockets: the replies are
/// parsed where they were received (`batch::dump`), not copied through netlink-proto,
/// and state replies are zeroed there once read.
pub(super) async fn dump(socket: &mut BatchSocket) -> Result<XfrmDump, KernelError> {
    let started = super::debug_clock();
    let policies = policy::dump(socket).await?;
    let policies_done = super::elapsed_us(started);
    let sas = sa::dump(socket).await?;
    tracing::debug!(
        policies_us = policies_done,
        total_us = super::elapsed_us(started),
        "xfrm dump"
    );
    Ok(XfrmDump {
        policies,
        sas: sas.ours,
        foreign_esp: sas.foreign_esp,
    })
}

pub(super) struct XfrmDump {
    pub policies: BTreeMap<PolicyId, Policy>,
    pub sas: BTreeMap<SaId, Sa>,
    pub foreign_esp: std::collections::BTreeSet<(IpAddr, u32)>,
}

/// Usage counters of our SAs, dumped on one of `Kernel`'s own sockets (see [`dump`]).
pub(super) async fn sa_counters(
    socket: &mut BatchSocket,
) -> Result<BTreeMap<SaId, super::counters::SaCounters>, KernelError> {
    sa::counters(socket).await
}

/// Fails with [`KernelError::NoEsp`] when this kernel cannot install the SAs we need: an
/// ESP transport SA with `rfc4106(gcm(aes))`, a 36-byte key, ICV 128, ESN and a replay
/// window, encoded exactly like ours. Adds one throwaway SA (reqid [`PROBE_REQID`],
/// `local -> local`, a random SPI, a 60 s hard lifetime in case we die before the
/// delete) and deletes it again.
pub async fn check_esp(h: &xfrmnetlink::Handle, local: IpAddr) -> Result<(), KernelError> {
    sa::probe(h, local).await
}

/// What a dumped kernel object is to us.
#[derive(Debug)]
#[cfg_attr(test, derive(PartialEq))]
enum Owned<T> {
    /// Not ours: never reported, never touched.
    Foreign,
    /// Ours, as the model sees it (with `reqid: 0` when its form is not one we install).
    Ours(T),
    /// Ours by reqid, but no id of the model can address it.
    Unaddressable { reason: String },
}

/// Who holds a policy slot that one of our [`PolicyId`]s addresses.
#[derive(Debug)]
#[cfg_attr(test, derive(PartialEq))]
enum Occupant {
    Ours,
    /// Someone else's: never replaced or deleted.
    Foreign {
        detail: String,
    },
}

/// A failed netlink exchange, before it gets its operation name.
#[derive(Debug, PartialEq, Eq)]
enum NlError {
    /// The kernel answered with this errno (positive).
    Errno(i32),
    Closed,
    Timeout,
    Unexpected(&'static str),
}

impl NlError {
    fn into_kernel(self, operation: &str) -> KernelError {
        let operation = operation.to_owned();
        match self {
            NlError::Errno(errno) => KernelError::Refused {
                operation,
                source: std::io::Error::from_raw_os_error(errno),
            },
            NlError::Closed => KernelError::Netlink {
                operation,
                message: "the netlink connection is closed".into(),
            },
            NlError::Timeout => KernelError::Netlink {
                operation,
                message: format!("no complete answer within {} s", REQUEST_TIMEOUT.as_secs()),
            },
            NlError::Unexpected(what) => KernelError::Unexpected {
                what: "netlink reply",
                detail: format!("{what} to {operation}"),
            },
        }
    }
}

/// A request that expects only an ACK (the ESP probe's add and delete). Replies are
/// never logged: a request may carry a key, and errors name only the errno.
async fn ack(h: &xfrmnetlink::Handle, message: XfrmMessage) -> Result<(), NlError> {
    let mut req = NetlinkMessage::from(message);
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut h = h.clone();
    let mut replies = h.request(req).map_err(|_| NlError::Closed)?;
    let wait = async {
        while let Some(msg) = replies.next().await {
            match msg.payload {
                NetlinkPayload::Error(e) => {
                    // No code: the ACK.
                    if let Some(code) = e.code {
                        return Err(NlError::Errno(code.get().saturating_abs()));
                    }
                }
                NetlinkPayload::InnerMessage(_)
                | NetlinkPayload::Done(_)
                | NetlinkPayload::Noop => {}
                NetlinkPayload::Overrun(_) => return Err(NlError::Unexpected("overrun")),
                _ => return Err(NlError::Unexpected("unknown netlink message")),
            }
        }
        Ok(())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, wait)
        .await
        .map_err(|_| NlError::Timeout)?
}

/// The kernel's address family number for `addr`.
fn family_of(addr: IpAddr) -> u16 {
    match addr {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

/// Reads an `xfrm_address_t` of the given family.
fn ip_of(family: u16, a: &Address) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::new(
            a.addr[0], a.addr[1], a.addr[2], a.addr[3],
        ))),
        AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(a.addr))),
        _ => None,
    }
}

/// The prefix length of a single host of `addr`'s family.
fn host_len(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// The addresses and SPI of an expire event for one of our SAs; `None` for foreign ones
/// (and the ESP probe's). The event's copy of the key is not read.
pub(super) fn expire_event(
    msg: &netlink_packet_xfrm::monitor::expire::ExpireMessage,
) -> Option<super::monitor::SaExpired> {
    let info = &msg.expire.state;
    if !ownership::is_owned_reqid(info.reqid) || info.reqid == ownership::REQID_MAX {
        return None;
    }
    Some(super::monitor::SaExpired {
        src: ip_of(info.family, &info.saddr)?,
        dst: ip_of(info.family, &info.id.daddr)?,
        spi: info.id.spi,
        hard: msg.expire.hard != 0,
    })
}
