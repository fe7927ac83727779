//! Link, address and FDB changes as single rtnetlink requests, built so that
//! `Kernel::execute` can send many per `send()`.
//!
//! Addresses, FDB entries and `master` need interface indexes; they come from one link
//! dump taken when `execute` starts ([`Indexes::load`]), kept up to date with the links
//! the plan deletes and creates (a name missing from it is looked up with one GET).
//! An index is only trusted for the duration of one `execute`: the kernel never hands
//! an index out twice in a namespace (it counts up), so a link deleted and recreated by
//! someone else meanwhile makes our request fail with ENODEV; it never hits another link.

use std::collections::HashMap;
use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_core::{NLM_F_APPEND, NLM_F_CREATE, NLM_F_REPLACE};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::LinkAttribute;
use rtnetlink::LinkUnspec;

use super::{EEXIST, ENODEV, dump, errno, fdb_message, refused};
use crate::kernel::KernelError;
use crate::plan::Change;
use crate::state::IfName;

/// Interface indexes by name, as far as this `execute` knows them.
#[derive(Default)]
pub(in crate::kernel) struct Indexes {
    by_name: HashMap<String, u32>,
}

impl Indexes {
    /// One link dump when `changes` has a link-layer change, else nothing.
    pub async fn load(
        route: &rtnetlink::Handle,
        changes: &[Change],
    ) -> Result<Indexes, KernelError> {
        if !changes.iter().any(is_link_change) {
            return Ok(Indexes::default());
        }
        let all = dump::all_links(route).await?;
        super::check_creatable(&all, changes)?;
        let by_name = all.into_iter().map(|l| (l.name, l.index)).collect();
        Ok(Indexes { by_name })
    }

    /// The index of a link by name: from the dump, else one GET. `op` names the change
    /// in errors.
    pub async fn resolve(
        &mut self,
        route: &rtnetlink::Handle,
        name: &IfName,
        op: &dyn Fn() -> String,
    ) -> Result<u32, KernelError> {
        if let Some(index) = self.by_name.get(name.as_str()) {
            return Ok(*index);
        }
        let not_found = || KernelError::LinkNotFound {
            operation: op(),
            link: name.to_string(),
        };
        let mut links = route.link().get().match_name(name.as_str()).execute();
        let index = match links.try_next().await {
            Ok(Some(msg)) => msg.header.index,
            Ok(None) => return Err(not_found()),
            Err(e) if errno(&e) == Some(ENODEV) => return Err(not_found()),
            Err(e) => return Err(refused(&op(), e)),
        };
        self.by_name.insert(name.as_str().to_owned(), index);
        Ok(index)
    }

    /// The link is gone or about to be (re)created: its index is no longer known.
    pub fn forget(&mut self, name: &IfName) {
        self.by_name.remove(name.as_str());
    }
}

/// Whether the link executor (not the XFRM one) runs this change.
pub(in crate::kernel) fn is_link_change(change: &Change) -> bool {
    !matches!(
        change,
        Change::PutPolicy { .. } | Change::DeletePolicy(_) | Change::AddSa(_) | Change::DeleteSa(_)
    )
}

/// One rtnetlink request: the message, the header flags beyond `NLM_F_REQUEST |
/// NLM_F_ACK`, and the errnos that count as success.
pub(in crate::kernel) struct LinkRequest {
    pub message: RouteNetlinkMessage,
    pub flags: u16,
    pub tolerated: &'static [i32],
}

/// How a link-layer change is run.
pub(in crate::kernel) enum Step {
    /// One request, which can share a `send()` with others.
    Request(LinkRequest),
    /// Link creation: two requests and possibly an adoption, run on its own
    /// ([`super::create_link`]).
    Alone,
}

/// The request for one link, address or FDB change; XFRM changes are refused with
/// [`KernelError::Unsupported`].
pub(in crate::kernel) async fn prepare(
    route: &rtnetlink::Handle,
    change: &Change,
    indexes: &mut Indexes,
) -> Result<Step, KernelError> {
    let op = &|| change.to_string();
    let set = |msg: rtnetlink::LinkMessageBuilder<LinkUnspec>| LinkRequest {
        message: RouteNetlinkMessage::NewLink(msg.build()),
        flags: 0,
        tolerated: &[],
    };
    let request = match change {
        Change::CreateLink(_) => return Ok(Step::Alone),
        Change::DeleteLink(link) => {
            indexes.forget(&link.name);
            let msg = LinkUnspec::new_with_name(link.name.as_str()).build();
            LinkRequest {
                message: RouteNetlinkMessage::DelLink(msg),
                flags: 0,
                tolerated: &[],
            }
        }
        // `ip link set`: RTM_NEWLINK without NLM_F_CREATE, the link found by name.
        Change::SetMtu { link, to, .. } => set(LinkUnspec::new_with_name(link.as_str()).mtu(*to)),
        Change::SetAlias { link, to, .. } => {
            // Also out of the half-created group (see `create_link`), as a create does.
            let mut message = LinkUnspec::new_with_name(link.as_str()).alias(to).build();
            message.attributes.push(LinkAttribute::Group(0));
            LinkRequest {
                message: RouteNetlinkMessage::NewLink(message),
                flags: 0,
                tolerated: &[],
            }
        }
        Change::SetUp { link } => set(LinkUnspec::new_with_name(link.as_str()).up()),
        Change::SetMaster { link, to, .. } => {
            // IFLA_MASTER 0 is `nomaster`.
            let master = match to {
                Some(m) => indexes.resolve(route, m, op).await?,
                None => 0,
            };
            set(LinkUnspec::new_with_name(link.as_str()).controller(master))
        }
        Change::AddAddress(a) => {
            let index = indexes.resolve(route, &a.link, op).await?;
            // NLM_F_REPLACE: an address already on the bridge with a finite lifetime
            // (not one of ours, so not in the dump) becomes a permanent one instead of
            // failing with EEXIST on every apply.
            LinkRequest {
                message: RouteNetlinkMessage::NewAddress(address_message(index, a.addr)),
                flags: NLM_F_CREATE | NLM_F_REPLACE,
                tolerated: &[],
            }
        }
        Change::DeleteAddress(a) => {
            let index = indexes.resolve(route, &a.link, op).await?;
            LinkRequest {
                message: RouteNetlinkMessage::DelAddress(address_message(index, a.addr)),
                flags: 0,
                tolerated: &[],
            }
        }
        Change::AddFdb(e) => {
            // `bridge fdb append`: REPLACE would overwrite the previous all-zero entry
            // instead of adding a remote. An entry already there is fine.
            let index = indexes.resolve(route, &e.link, op).await?;
            LinkRequest {
                message: RouteNetlinkMessage::NewNeighbour(fdb_message(index, e.remote)),
                flags: NLM_F_CREATE | NLM_F_APPEND,
                tolerated: &[EEXIST],
            }
        }
        Change::DeleteFdb(e) => {
            // Removes only this remote of the all-zero entry (the kernel keeps the
            // others).
            let index = indexes.resolve(route, &e.link, op).await?;
            LinkRequest {
                message: RouteNetlinkMessage::DelNeighbour(fdb_message(index, e.remote)),
                flags: 0,
                tolerated: &[],
            }
        }
        Change::PutPolicy { .. }
        | Change::DeletePolicy(_)
        | Change::AddSa(_)
        | Change::DeleteSa(_) => {
            return Err(KernelError::Unsupported {
                operation: op(),
                executor: "link",
            });
        }
    };
    Ok(Step::Request(request))
}

fn address_message(
    index: u32,
    addr: ipnet::IpNet,
) -> netlink_packet_route::address::AddressMessage {
    match addr.addr() {
        IpAddr::V4(ip) => rtnetlink::AddressMessageBuilder::<std::net::Ipv4Addr>::new()
            .index(index)
            .address(ip, addr.prefix_len())
            .build(),
        IpAddr::V6(ip) => rtnetlink::AddressMessageBuilder::<std::net::Ipv6Addr>::new()
            .index(index)
            .address(ip, addr.prefix_len())
            .build(),
    }
}
