//! One reconcile pass: spec + kernel -> plan -> kernel. Shared by `apply`, `delete` and
//! (later) the agent. The pure parts live in [`crate::desired`] and [`crate::plan`];
//! this module only sequences them around the kernel calls.

use std::net::IpAddr;

use crate::desired::{self, DesiredError, Keyring, LocalNode, Scope};
use crate::kernel::{Kernel, KernelError};
use crate::plan::{self, Plan};
use crate::spec::{Node, NodeName, Spec};
use crate::state::{Direction, IfName, KernelState, LinkKind, PolicyAction};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("node {0} is not in the spec")]
    UnknownNode(String),
    #[error(
        "cannot tell which node this is: no node's address is configured on a local interface \
         (pass --node NAME)"
    )]
    NoLocalNode,
    #[error(
        "cannot tell which node this is: several nodes' addresses are local ({0}); pass --node NAME"
    )]
    SeveralLocalNodes(String),
    #[error("node {node}: its address {address} is not configured on any local interface")]
    AddressNotLocal { node: String, address: IpAddr },
    #[error(transparent)]
    Desired(#[from] DesiredError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The plan stopped at a change the kernel refused (or that was not sent, e.g. a
    /// foreign object in its way). Carries the plan, for the operator to see.
    #[error("{source}")]
    Execute {
        plan: Box<Plan>,
        source: KernelError,
    },
    /// A plan that would stop before its first change (a foreign link in the way): not
    /// started, or a dry run.
    #[error("{source}")]
    WouldStop {
        plan: Box<Plan>,
        source: KernelError,
    },
    #[error("the kernel did not reach the spec after the plan ran; still different:\n{rest}")]
    NotConverged { plan: Box<Plan>, rest: Plan },
    #[error(
        "node {node}: its address {address} is on {device}, a loopback or dummy device (a routed VTEP), \
         whose MTU says nothing of the path to its peers; set `mtu` on network(s) {networks} \
         (what the underlay path carries, less the overlay's overhead)"
    )]
    LoopbackUnderlay {
        node: String,
        address: IpAddr,
        device: String,
        networks: String,
    },
    #[error("encrypted networks {networks} were not brought up: {reason}")]
    EncryptedNotUp { networks: String, reason: String },
}

impl ReconcileError {
    /// A new spec that fails so is not taken by the agent: the operator's input, or a
    /// plan that could not even start.
    pub fn refuses_spec(&self) -> bool {
        self.is_input_error() || matches!(self, ReconcileError::WouldStop { .. })
    }

    /// What to show before the error when it stopped a running plan: the plan, and how
    /// to go on.
    pub fn plan_report(&self) -> Option<String> {
        match self {
            ReconcileError::Execute { plan, .. } => Some(format!(
                "{plan}The plan did not run to its end: it stopped at the change the error \
                 names. Running the same command again finishes or repairs what it did.\n"
            )),
            ReconcileError::WouldStop { plan, .. } => Some(format!(
                "{plan}This plan cannot start: it would stop before its first change, at the one \
                 the error names. Nothing was changed.\n"
            )),
            ReconcileError::NotConverged { plan, .. } => Some(format!(
                "{plan}The plan ran, but the kernel did not end up as planned (see the error).\n"
            )),
            _ => None,
        }
    }

    /// Errors caused by the operator's input (exit code 2) rather than by the run.
    pub fn is_input_error(&self) -> bool {
        matches!(
            self,
            ReconcileError::UnknownNode(_)
                | ReconcileError::NoLocalNode
                | ReconcileError::SeveralLocalNodes(_)
                | ReconcileError::AddressNotLocal { .. }
                | ReconcileError::LoopbackUnderlay { .. }
                | ReconcileError::Desired(_)
        )
    }
}

/// `--node NAME`, else the one node whose address is configured locally.
pub async fn identify_node<'s>(
    spec: &'s Spec,
    requested: Option<&str>,
    kernel: &Kernel,
) -> Result<&'s Node, ReconcileError> {
    if let Some(name) = requested {
        return spec
            .nodes
            .iter()
            .find(|n| n.name.as_str() == name)
            .ok_or_else(|| ReconcileError::UnknownNode(name.to_owned()));
    }
    let local = kernel.local_addresses().await?;
    let mine: Vec<&Node> = spec
        .nodes
        .iter()
        .filter(|n| local.contains(&n.address))
        .collect();
    match mine.as_slice() {
        [] => Err(ReconcileError::NoLocalNode),
        [one] => Ok(one),
        many => Err(ReconcileError::SeveralLocalNodes(
            many.iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}

/// How encrypted networks are handled on this pass.
pub enum Keys<'k> {
    /// Keys held for the peers (from the agent, or handed in by a test).
    Ring(&'k Keyring),
    /// No keys can be had (no agent): encrypted networks are left exactly as they are.
    Unavailable { reason: String },
}

pub struct Outcome {
    pub plan: Plan,
    /// Set when encrypted networks were left down; the caller reports it (exit 1).
    pub encrypted_not_up: Option<ReconcileError>,
}

impl Outcome {
    /// The plan as printed. An empty plan while encrypted networks are held does not
    /// mean the kernel matches the spec, and does not say so.
    pub fn plan_text(&self) -> String {
        if self.encrypted_not_up.is_some()
            && self.plan.is_empty()
            && self.plan.needs_new_keys.is_empty()
        {
            "No changes to the plaintext networks; the encrypted ones are left as they are.\n"
                .to_owned()
        } else {
            self.plan.to_string()
        }
    }

    /// The plan, or the reason encrypted networks were left down.
    pub fn into_result(self) -> Result<Plan, ReconcileError> {
        match self.encrypted_not_up {
            Some(e) => Err(e),
            None => Ok(self.plan),
        }
    }
}

/// Plans (and unless `dry_run`, applies) the spec on this node.
pub async fn apply(
    spec: &Spec,
    node: &Node,
    kernel: &Kernel,
    keys: Keys<'_>,
    dry_run: bool,
) -> Result<Outcome, ReconcileError> {
    let observed = kernel.dump().await?;
    apply_observed(spec, node, kernel, keys, dry_run, observed).await
}

/// [`apply`] against a dump the caller already made (the agent inspects it first).
pub async fn apply_observed(
    spec: &Spec,
    node: &Node,
    kernel: &Kernel,
    keys: Keys<'_>,
    dry_run: bool,
    observed: KernelState,
) -> Result<Outcome, ReconcileError> {
    let underlay = kernel.underlay_for(node.address).await?.ok_or_else(|| {
        ReconcileError::AddressNotLocal {
            node: node.name.to_string(),
            address: node.address,
        }
    })?;
    if underlay.loopback {
        let unsized_networks: Vec<&str> = desired::member_networks(spec, &node.name)
            .filter(|n| n.mtu.is_none())
            .map(|n| n.name.as_str())
            .collect();
        if !unsized_networks.is_empty() {
            return Err(ReconcileError::LoopbackUnderlay {
                node: node.name.to_string(),
                address: node.address,
                device: underlay.name.to_string(),
                networks: unsized_networks.join(", "),
            });
        }
    }
    let local = LocalNode {
        node,
        underlay: underlay.name,
        underlay_mtu: underlay.mtu,
    };
    let encrypted: Vec<&str> = desired::member_networks(spec, &node.name)
        .filter(|n| n.encrypted)
        .map(|n| n.name.as_str())
        .collect();

    // Encrypted networks come up only on a kernel that can carry ESP, and only with
    // keys; otherwise they are left exactly as they are and the caller reports why.
    let mut hold_reason = None;
    if !encrypted.is_empty() {
        if let Err(e) = kernel.check_esp(node.address).await {
            hold_reason = Some(e.to_string());
        } else if let Keys::Unavailable { reason } = &keys {
            hold_reason = Some(reason.clone());
        }
    }
    let empty = Keyring::new();
    let (ring, scope) = match (&keys, &hold_reason) {
        (Keys::Ring(r), None) => (*r, Scope::All),
        _ => (&empty, Scope::PlaintextOnly),
    };

    let mut want = desired::build(spec, &local, ring, scope)?;
    if scope == Scope::PlaintextOnly {
        keep_encrypted_as_is(spec, &node.name, &observed, &mut want);
    }
    let plan = plan::plan(&want, &observed);
    if dry_run && !plan.is_empty() {
        check_plan(kernel, &plan).await?;
    }
    if !dry_run && !plan.is_empty() {
        execute(kernel, &plan).await?;
        forget_learned(kernel, &plan).await;
        let after = kernel.dump().await?;
        let rest = plan::plan(&want, &after);
        if !rest.is_empty() {
            return Err(ReconcileError::NotConverged {
                plan: Box::new(plan),
                rest,
            });
        }
    }
    let encrypted_not_up = hold_reason.map(|reason| ReconcileError::EncryptedNotUp {
        networks: encrypted.join(", "),
        reason,
    });
    Ok(Outcome {
        plan,
        encrypted_not_up,
    })
}

/// Copies into `want` what the kernel holds for the node's encrypted networks (devices,
/// their addresses and FDB, all XFRM objects), so a pass that cannot handle encrypted
/// networks changes nothing about them; with no encrypted network of the node's in the
/// spec, no XFRM object is kept. Except a network whose VXLAN device's port no
/// catch-all block policy of ours protects (it was plaintext until this spec): that
/// device would carry the network in clear, so the network is not kept, and the plan
/// takes it down.
fn keep_encrypted_as_is(
    spec: &Spec,
    me: &NodeName,
    observed: &KernelState,
    want: &mut KernelState,
) {
    // Protected: the kernel holds our catch-all block for the device's port, so what no
    // per-pair ESP policy takes is dropped (an encrypted network on the previous
    // encryptedDataPort still is).
    let protected = |port: u16| blocked_by_us(observed, port);
    let in_clear = |vni| {
        observed
            .links
            .get(&IfName::vxlan_for(vni))
            .is_some_and(|l| matches!(&l.kind, LinkKind::Vxlan(v) if !protected(v.port)))
    };
    let names: Vec<IfName> = desired::member_networks(spec, me)
        .filter(|n| n.encrypted && !in_clear(n.vni))
        .flat_map(|n| [IfName::bridge_for(n.vni), IfName::vxlan_for(n.vni)])
        .collect();
    for name in &names {
        if let Some(link) = observed.links.get(name) {
            want.links.insert(name.clone(), link.clone());
        }
    }
    want.addresses.extend(
        observed
            .addresses
            .iter()
            .filter(|a| names.contains(&a.link))
            .cloned(),
    );
    want.fdb.extend(
        observed
            .fdb
            .iter()
            .filter(|e| names.contains(&e.link))
            .cloned(),
    );
    // Without an encrypted network of this node's left in the spec, our XFRM objects
    // protect nothing: they go (the plan removes them after the devices).
    if !names.is_empty() {
        want.policies = observed.policies.clone();
        want.sas = observed.sas.clone();
    }
}

/// Removes what the spec's networks own on this node. XFRM objects go only when no
/// encrypted network of ours remains.
pub async fn delete(spec: &Spec, kernel: &Kernel, dry_run: bool) -> Result<Plan, ReconcileError> {
    let observed = kernel.dump().await?;
    let want = without_networks(spec, &observed);
    let plan = plan::plan(&want, &observed);
    if !dry_run && !plan.is_empty() {
        execute(kernel, &plan).await?;
    }
    Ok(plan)
}

/// After a plan took remotes out of our head-end lists (a peer moved or left), what the
/// devices learned about those remotes goes too: frames to the peer's MACs would follow
/// its old address until it sent again. Best effort: a failure is logged.
async fn forget_learned(kernel: &Kernel, plan: &Plan) {
    let stale: Vec<(IfName, IpAddr)> = plan
        .changes
        .iter()
        .filter_map(|c| match c {
            crate::plan::Change::DeleteFdb(e) => Some((e.link.clone(), e.remote)),
            _ => None,
        })
        .collect();
    match kernel.forget_learned(&stale).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            entries = n,
            "forgot what the VXLAN devices learned about old remotes"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot forget learned FDB entries of old remotes"),
    }
}

/// Fails, with the plan, when the plan could not start (a foreign link in the way).
async fn check_plan(kernel: &Kernel, plan: &Plan) -> Result<(), ReconcileError> {
    kernel
        .check_plan(&plan.changes)
        .await
        .map_err(|source| ReconcileError::WouldStop {
            plan: Box::new(plan.clone()),
            source,
        })
}

/// Runs `plan`; a failure carries the plan along. A plan that the executor's own check
/// stopped before its first change is reported as such ([`ReconcileError::WouldStop`]).
async fn execute(kernel: &Kernel, plan: &Plan) -> Result<(), ReconcileError> {
    kernel.execute(&plan.changes).await.map_err(|source| {
        let plan = Box::new(plan.clone());
        match source {
            KernelError::ForeignLink {
                before_any_change: true,
                ..
            } => ReconcileError::WouldStop { plan, source },
            source => ReconcileError::Execute { plan, source },
        }
    })
}

/// Whether the kernel holds our catch-all outbound block for UDP `port`: a VXLAN device
/// on it belongs to an encrypted network, and fails closed.
fn blocked_by_us(observed: &KernelState, port: u16) -> bool {
    observed.policies.values().any(|p| {
        p.id.dir == Direction::Out && p.id.selector.dport == port && p.action == PolicyAction::Block
    })
}

/// `observed` minus every object of the spec's networks (pure).
pub fn without_networks(spec: &Spec, observed: &KernelState) -> KernelState {
    let names: Vec<IfName> = spec
        .networks
        .iter()
        .flat_map(|n| [IfName::bridge_for(n.vni), IfName::vxlan_for(n.vni)])
        .collect();
    let mut want = observed.clone();
    want.links.retain(|name, _| !names.contains(name));
    want.addresses.retain(|a| !names.contains(&a.link));
    want.fdb.retain(|e| !names.contains(&e.link));
    // The XFRM objects go only when no encrypted network of ours is left. Which ones
    // are is read from the kernel, not only from the file given: a VXLAN device on a
    // port our catch-all block guards is one, whatever `encryptedDataPort` that file
    // says (a short delete file that leaves the cluster's port out reads as 4790).
    let guarded =
        |port: u16| port == spec.cluster.encrypted_data_port || blocked_by_us(observed, port);
    let encrypted_left = want
        .links
        .values()
        .any(|l| matches!(&l.kind, LinkKind::Vxlan(v) if guarded(v.port)));
    if !encrypted_left {
        want.policies.clear();
        want.sas.clear();
    }
    want
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Change;

    /// A pass that cannot bring encrypted networks up keeps them as they are, unless
    /// the network's VXLAN device is on a port no catch-all block of ours protects: it
    /// was plaintext until now, and would carry the network in clear.
    #[test]
    fn held_encrypted_networks_are_kept_only_where_they_fail_closed() {
        use crate::state::{Link, Policy, PolicyId, Selector, VxlanParams, ownership};
        let text = "apiVersion: ovl/v1\ncluster:\n  name: t\nnodes:\n  - name: a\n    \
                    address: 192.0.2.1\n    publicKey: \"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\"\n  \
                    - name: b\n    address: 192.0.2.2\n    publicKey: \
                    \"AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=\"\nnetworks:\n  - name: sec\n    \
                    vni: 300\n    encrypted: true\n";
        let spec = crate::spec::parse(text.as_bytes(), "net.yaml").unwrap();
        let me = &spec.nodes[0].name;
        let link = |name: &str, kind| Link {
            name: name.parse().unwrap(),
            kind,
            mtu: 1416,
            master: None,
            alias: Link::alias_for("t", "sec"),
            up: true,
        };
        let vxlan_on = |port| {
            link(
                "ovvx-300",
                LinkKind::Vxlan(VxlanParams {
                    vni: 300,
                    local: "192.0.2.1".parse().unwrap(),
                    port,
                    underlay: "eth0".parse().unwrap(),
                    learning: true,
                }),
            )
        };
        let block_on = |port| Policy {
            id: PolicyId {
                dir: Direction::Out,
                selector: Selector {
                    src: "0.0.0.0/0".parse().unwrap(),
                    dst: "0.0.0.0/0".parse().unwrap(),
                    dport: port,
                },
            },
            priority: 100,
            action: PolicyAction::Block,
            reqid: ownership::REQID_MIN,
        };
        let kept = |vxlan: Link, policies: Vec<Policy>| {
            let mut observed = KernelState::default();
            let bridge = link("ovbr-300", LinkKind::Bridge);
            observed.links.insert(bridge.name.clone(), bridge);
            observed.links.insert(vxlan.name.clone(), vxlan);
            observed.policies = policies.into_iter().map(|p| (p.id, p)).collect();
            let mut want = KernelState::default();
            keep_encrypted_as_is(&spec, me, &observed, &mut want);
            want.links.len()
        };
        // On the encrypted port, behind our block: kept.
        assert_eq!(kept(vxlan_on(4790), vec![block_on(4790)]), 2);
        // On a port behind our block, if no longer the spec's (encryptedDataPort changed):
        // still kept, still fail-closed.
        assert_eq!(kept(vxlan_on(4999), vec![block_on(4999)]), 2);
        // On the plaintext port, or anywhere without our block: taken down.
        assert_eq!(kept(vxlan_on(4789), vec![block_on(4790)]), 0);
        assert_eq!(kept(vxlan_on(4790), vec![]), 0);

        // The XFRM objects are kept while the spec has an encrypted network of this
        // node's, and go with the last one (a plaintext-only spec applied without an
        // agent after an encrypted one).
        let xfrm_kept = |spec: &Spec| {
            let mut observed = KernelState::default();
            let block = block_on(4790);
            observed.policies.insert(block.id, block);
            let mut want = KernelState::default();
            keep_encrypted_as_is(spec, &spec.nodes[0].name, &observed, &mut want);
            want.policies.len()
        };
        assert_eq!(xfrm_kept(&spec), 1);
        let plaintext = text.replace("    encrypted: true\n", "");
        let plaintext = crate::spec::parse(plaintext.as_bytes(), "net.yaml").unwrap();
        assert!(!plaintext.networks[0].encrypted);
        assert_eq!(xfrm_kept(&plaintext), 0);
    }

    /// `delete` of one encrypted network keeps the XFRM objects while another encrypted
    /// network of ours is left, also when the delete file does not name the cluster's
    /// `encryptedDataPort` (the kernel's block policy says which port is guarded).
    #[test]
    fn delete_keeps_xfrm_while_an_encrypted_network_is_left_on_any_guarded_port() {
        use crate::state::{Link, Policy, PolicyId, Selector, VxlanParams, ownership};
        // The delete file names one network and leaves the port out (so 4790).
        let spec_deleting = |vni: u32| {
            let text = format!(
                "apiVersion: ovl/v1\ncluster:\n  name: t\nnodes:\n  - name: a\n    \
                 address: 192.0.2.1\n    publicKey: \"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\"\n\
                 networks:\n  - name: n\n    vni: {vni}\n    encrypted: true\n"
            );
            crate::spec::parse(text.as_bytes(), "del.yaml").unwrap()
        };
        let (deleting_300, deleting_400) = (spec_deleting(300), spec_deleting(400));
        let (vni_300, vni_400) = (deleting_300.networks[0].vni, deleting_400.networks[0].vni);
        let vxlan = |vni, port| Link {
            name: IfName::vxlan_for(vni),
            kind: LinkKind::Vxlan(VxlanParams {
                vni: vni.get(),
                local: "192.0.2.1".parse().unwrap(),
                port,
                underlay: "eth0".parse().unwrap(),
                learning: true,
            }),
            mtu: 1416,
            master: None,
            alias: Link::alias_for("t", "n"),
            up: true,
        };
        let block = Policy {
            id: PolicyId {
                dir: Direction::Out,
                selector: Selector {
                    src: "0.0.0.0/0".parse().unwrap(),
                    dst: "0.0.0.0/0".parse().unwrap(),
                    dport: 4800,
                },
            },
            priority: 100,
            action: PolicyAction::Block,
            reqid: ownership::REQID_MIN,
        };
        let mut observed = KernelState::default();
        for l in [vxlan(vni_300, 4800), vxlan(vni_400, 4800)] {
            observed.links.insert(l.name.clone(), l);
        }
        observed.policies.insert(block.id, block);
        let want = without_networks(&deleting_400, &observed);
        assert!(want.links.contains_key(&IfName::vxlan_for(vni_300)));
        assert_eq!(
            want.policies.len(),
            1,
            "the block stays while ovvx-300 is up"
        );
        // The last encrypted network goes: so do the XFRM objects.
        let mut last = observed.clone();
        last.links.remove(&IfName::vxlan_for(vni_400));
        assert!(without_networks(&deleting_300, &last).policies.is_empty());
    }

    /// A failure while or after running a plan comes with the plan, to be shown before
    /// the error; other failures have none.
    #[test]
    fn failures_of_a_running_plan_show_the_plan() {
        let plan = Plan {
            changes: vec![Change::SetMtu {
                link: "ovbr-600".parse().unwrap(),
                from: 1430,
                to: 1230,
            }],
            ..Plan::default()
        };
        let not_converged = ReconcileError::NotConverged {
            plan: Box::new(plan.clone()),
            rest: Plan::default(),
        };
        let report = not_converged.plan_report().unwrap();
        assert!(report.starts_with(&plan.to_string()), "{report}");
        assert!(report.contains("did not end up as planned"), "{report}");
        let stopped = ReconcileError::Execute {
            plan: Box::new(plan.clone()),
            source: KernelError::Unexpected {
                what: "test",
                detail: String::new(),
            },
        };
        assert!(
            stopped
                .plan_report()
                .unwrap()
                .contains("did not run to its end")
        );
        assert_eq!(ReconcileError::NoLocalNode.plan_report(), None);
    }
}
