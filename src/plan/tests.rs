use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use proptest::prelude::*;

use super::*;
use crate::keys::SaKey;
use crate::spec::Vni;
use crate::state::{Address, FdbEntry, Lifetime, PolicyId, Sa, SaId, Selector, VxlanParams};

const ENC_PORT: u16 = 4790;

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
}

/// One network's worth of objects, with knobs for every kind of drift.
#[derive(Clone, Debug)]
struct NetChoice {
    present: bool,
    encrypted: bool,
    local: u8,
    mtu: u32,
    vx_master: bool,
    vx_up: bool,
    br_up: bool,
    alias_variant: u8,
    address: Option<u8>,
    remotes: Vec<u8>,
    bridge_missing: bool,
}

fn net_choice() -> impl Strategy<Value = NetChoice> {
    (
        any::<bool>(),
        any::<bool>(),
        1u8..3,
        prop_oneof![Just(1400u32), Just(1450), Just(1300)],
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        0u8..2,
        proptest::option::of(1u8..4),
        proptest::collection::vec(3u8..7, 0..4),
        any::<bool>(),
    )
        .prop_map(
            |(
                present,
                encrypted,
                local,
                mtu,
                vx_master,
                vx_up,
                br_up,
                alias_variant,
                address,
                remotes,
                bridge_missing,
            )| {
                NetChoice {
                    present,
                    encrypted,
                    local,
                    mtu,
                    vx_master,
                    vx_up,
                    br_up,
                    alias_variant,
                    address,
                    remotes,
                    bridge_missing,
                }
            },
        )
}

fn build_state(nets: &[NetChoice], policies: &[(u8, bool)], sas: &[(u8, bool, u8)]) -> KernelState {
    let mut s = KernelState::default();
    let underlay: IfName = "eth0".parse().unwrap();
    for (i, n) in nets.iter().enumerate() {
        if !n.present {
            continue;
        }
        let vni = Vni::new(100 + i as u32).unwrap();
        let br = IfName::bridge_for(vni);
        let vx = IfName::vxlan_for(vni);
        let alias = Link::alias_for("c", if n.alias_variant == 0 { "net" } else { "old" });
        if !n.bridge_missing {
            s.links.insert(
                br.clone(),
                Link {
                    name: br.clone(),
                    kind: LinkKind::Bridge,
                    mtu: n.mtu,
                    master: None,
                    alias: alias.clone(),
                    up: n.br_up,
                },
            );
            if let Some(a) = n.address {
                s.addresses.insert(Address {
                    link: br.clone(),
                    addr: format!("10.0.{i}.{a}/24").parse().unwrap(),
                });
            }
        }
        s.links.insert(
            vx.clone(),
            Link {
                name: vx.clone(),
                kind: LinkKind::Vxlan(VxlanParams {
                    vni: vni.get(),
                    local: ip(n.local),
                    port: if n.encrypted { ENC_PORT } else { 4789 },
                    underlay: underlay.clone(),
                    learning: true,
                }),
                mtu: n.mtu,
                master: (n.vx_master && !n.bridge_missing).then(|| br.clone()),
                alias,
                up: n.vx_up,
            },
        );
        for r in &n.remotes {
            s.fdb.insert(FdbEntry {
                link: vx.clone(),
                remote: ip(*r),
            });
        }
    }
    for (peer, out) in policies {
        let (src, dst) = if *out {
            (ip(1), ip(*peer))
        } else {
            (ip(*peer), ip(1))
        };
        let id = PolicyId {
            dir: if *out { Direction::Out } else { Direction::In },
            selector: Selector {
                src: IpNet::from(src),
                dst: IpNet::from(dst),
                dport: ENC_PORT,
            },
        };
        s.policies.insert(
            id,
            Policy {
                id,
                priority: 1000,
                action: PolicyAction::Esp {
                    src: Some(src),
                    dst: Some(dst),
                },
                reqid: 7,
            },
        );
    }
    if s.links
        .values()
        .any(|l| matches!(&l.kind, LinkKind::Vxlan(v) if v.port == ENC_PORT))
        || !policies.is_empty()
    {
        for (dir, action, dst) in [
            (Direction::Out, PolicyAction::Block, "0.0.0.0/0"),
            (
                Direction::In,
                PolicyAction::Esp {
                    src: None,
                    dst: None,
                },
                "192.0.2.1/32",
            ),
        ] {
            let id = PolicyId {
                dir,
                selector: Selector {
                    src: "0.0.0.0/0".parse().unwrap(),
                    dst: dst.parse().unwrap(),
                    dport: ENC_PORT,
                },
            };
            s.policies.insert(
                id,
                Policy {
                    id,
                    priority: 2000,
                    action,
                    reqid: 7,
                },
            );
        }
    }
    for (peer, out, key) in sas {
        let (src, dst) = if *out {
            (ip(1), ip(*peer))
        } else {
            (ip(*peer), ip(1))
        };
        let id = SaId {
            src,
            dst,
            spi: 0x100 + u32::from(*peer) * 2 + u32::from(*out),
        };
        s.sas.insert(
            id,
            Sa {
                id,
                reqid: 7,
                key: SaKey::from_bytes([*key; 36]),
                replay_window: 1024,
                dport: ENC_PORT,
                lifetime: Lifetime::default(),
            },
        );
    }
    s
}

fn state_strategy() -> impl Strategy<Value = KernelState> {
    (
        proptest::collection::vec(net_choice(), 4),
        proptest::collection::vec((3u8..6, any::<bool>()), 0..4),
        proptest::collection::vec((3u8..6, any::<bool>(), 0u8..3), 0..5),
    )
        .prop_map(|(n, p, s)| build_state(&n, &p, &s))
}

/// A desired state is always tidy: every port on its bridge, everything up.
fn desired_strategy() -> impl Strategy<Value = KernelState> {
    state_strategy().prop_map(|mut s| {
        let bridges: Vec<IfName> = s
            .links
            .keys()
            .filter(|n| n.as_str().starts_with("ovbr-"))
            .cloned()
            .collect();
        s.links.retain(|name, l| match &l.kind {
            LinkKind::Vxlan(_) => bridges.contains(&IfName::bridge_for(
                Vni::new(name.as_str()[5..].parse().unwrap()).unwrap(),
            )),
            LinkKind::Bridge => true,
        });
        let vxlans: Vec<IfName> = s
            .links
            .keys()
            .filter(|n| n.as_str().starts_with("ovvx-"))
            .cloned()
            .collect();
        s.links.retain(|name, l| {
            matches!(l.kind, LinkKind::Vxlan(_))
                || vxlans.contains(&IfName::vxlan_for(
                    Vni::new(name.as_str()[5..].parse().unwrap()).unwrap(),
                ))
        });
        for l in s.links.values_mut() {
            l.up = true;
            if matches!(l.kind, LinkKind::Vxlan(_)) {
                l.master = Some(IfName::bridge_for(
                    Vni::new(l.name.as_str()[5..].parse().unwrap()).unwrap(),
                ));
            }
        }
        let links = s.links.clone();
        s.addresses.retain(|a| links.contains_key(&a.link));
        s.fdb.retain(|e| links.contains_key(&e.link));
        s
    })
}

/// No VXLAN device on the encrypted port may exist without the catch-all block policy.
fn fail_closed(s: &KernelState) -> bool {
    let enc_link = s
        .links
        .values()
        .any(|l| matches!(&l.kind, LinkKind::Vxlan(v) if v.port == ENC_PORT));
    !enc_link
        || s.policies
            .values()
            .any(|p| p.action == PolicyAction::Block && p.id.dir == Direction::Out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn plan_converges_and_then_is_empty(desired in desired_strategy(), observed in state_strategy()) {
        let plan = plan(&desired, &observed);
        let after = simulate(&observed, &plan.changes);
        prop_assert_eq!(&after, &desired, "plan:\n{}", plan);
        prop_assert!(super::plan(&desired, &after).is_empty());
    }

    #[test]
    fn plan_touches_only_owned_or_desired_objects(desired in desired_strategy(), observed in state_strategy()) {
        for c in plan(&desired, &observed).changes {
            let ok = match &c {
                Change::DeleteLink(l) => observed.links.contains_key(&l.name),
                Change::SetMtu { link, .. } | Change::SetMaster { link, .. } | Change::SetAlias { link, .. } | Change::SetUp { link } =>
                    desired.links.contains_key(link),
                Change::CreateLink(l) => desired.links.contains_key(&l.name),
                Change::AddAddress(a) => desired.addresses.contains(a),
                Change::DeleteAddress(a) => observed.addresses.contains(a),
                Change::AddFdb(e) => desired.fdb.contains(e),
                Change::DeleteFdb(e) => observed.fdb.contains(e),
                Change::PutPolicy { policy, .. } => desired.policies.contains_key(&policy.id),
                Change::DeletePolicy(id) => observed.policies.contains_key(id),
                Change::AddSa(sa) => desired.sas.contains_key(&sa.id),
                Change::DeleteSa(id) => observed.sas.contains_key(id),
            };
            prop_assert!(ok, "{} touches something neither desired nor owned", c);
        }
    }

    #[test]
    fn every_intermediate_state_fails_closed(desired in desired_strategy(), observed in state_strategy()) {
        prop_assume!(fail_closed(&observed) && fail_closed(&desired));
        let mut s = observed.clone();
        for c in plan(&desired, &observed).changes {
            model::apply_one(&mut s, &c);
            prop_assert!(fail_closed(&s), "after {}", c);
        }
    }

    #[test]
    fn links_come_up_only_when_complete(desired in desired_strategy(), observed in state_strategy()) {
        // A port brought up by the plan is already on its bridge with its FDB entries.
        let mut s = observed.clone();
        for c in plan(&desired, &observed).changes {
            model::apply_one(&mut s, &c);
            if let Change::SetUp { link } = &c {
                let want = &desired.links[link];
                let have = &s.links[link];
                prop_assert_eq!(&have.master, &want.master);
                prop_assert_eq!(have.mtu, want.mtu);
                let want_fdb: Vec<_> = desired.fdb.iter().filter(|e| &e.link == link).collect();
                prop_assert!(want_fdb.iter().all(|e| s.fdb.contains(*e)));
            }
        }
    }
}

#[test]
fn empty_plan_prints_no_changes() {
    let s = KernelState::default();
    assert_eq!(
        plan(&s, &s).to_string(),
        "No changes: the kernel already matches the spec.\n"
    );
}

#[test]
fn inbound_sa_is_added_before_outbound_and_removed_after() {
    let none: Vec<NetChoice> = vec![];
    let desired = build_state(
        &none,
        &[(3, true), (3, false)],
        &[(3, true, 1), (3, false, 1)],
    );
    let observed = KernelState::default();
    let p = plan(&desired, &observed);
    let pos = |f: &dyn Fn(&Change) -> bool| p.changes.iter().position(f).unwrap();
    let inb = pos(&|c| matches!(c, Change::AddSa(sa) if sa.id.dst == ip(1)));
    let outb = pos(&|c| matches!(c, Change::AddSa(sa) if sa.id.src == ip(1)));
    let block = pos(
        &|c| matches!(c, Change::PutPolicy { policy, .. } if policy.action == PolicyAction::Block),
    );
    assert!(block < inb && inb < outb, "{p}");

    let back = plan(&KernelState::default(), &desired);
    let pos = |f: &dyn Fn(&Change) -> bool| back.changes.iter().position(f).unwrap();
    let del_out = pos(&|c| matches!(c, Change::DeleteSa(id) if id.src == ip(1)));
    let del_in = pos(&|c| matches!(c, Change::DeleteSa(id) if id.dst == ip(1)));
    let del_block = pos(
        &|c| matches!(c, Change::DeletePolicy(id) if id.dir == Direction::Out && id.selector.dst.prefix_len() == 0),
    );
    assert!(del_out < del_in && del_in < del_block, "{back}");
}

#[test]
fn a_key_is_never_installed_twice() {
    let none: Vec<NetChoice> = vec![];
    let observed = build_state(&none, &[(3, true)], &[(3, true, 1), (3, false, 2)]);
    // The port moved (a new encryptedDataPort): same SPIs, same keys, other selectors.
    let mut desired = observed.clone();
    for sa in desired.sas.values_mut() {
        sa.dport = ENC_PORT + 1;
    }
    let p = plan(&desired, &observed);
    assert!(
        !p.changes
            .iter()
            .any(|c| matches!(c, Change::AddSa(_) | Change::DeleteSa(_))),
        "{p}"
    );
    let mut stale: Vec<SaId> = observed.sas.keys().copied().collect();
    stale.sort();
    assert_eq!(p.needs_new_keys, stale);
    assert!(
        p.to_string()
            .contains("replaced by new keys, never reinstalled"),
        "{p}"
    );
    // With another key for the same SPI, the SA is replaced (old out first).
    let mut rekeyed = desired.clone();
    for sa in rekeyed.sas.values_mut() {
        sa.key = SaKey::from_bytes([9; 36]);
    }
    let p = plan(&rekeyed, &observed);
    assert!(p.needs_new_keys.is_empty(), "{p}");
    assert_eq!(p.count(ChangeKind::Create), 2, "{p}");
}

proptest! {
    /// The merges the plan is built on agree with lookups: `join` yields every key of
    /// either map once, in order, with its value on each side; `with_presence` says for
    /// each item whether the other set holds it.
    #[test]
    fn merges_agree_with_lookups(
        left in proptest::collection::btree_map(0u16..64, any::<u8>(), 0..40),
        right in proptest::collection::btree_map(0u16..64, any::<u8>(), 0..40),
    ) {
        let joined: Vec<(Option<&u8>, Option<&u8>)> = join(&left, &right).collect();
        let keys: BTreeSet<&u16> = left.keys().chain(right.keys()).collect();
        let expected: Vec<(Option<&u8>, Option<&u8>)> =
            keys.iter().map(|k| (left.get(*k), right.get(*k))).collect();
        prop_assert_eq!(joined, expected);

        let items: BTreeSet<u16> = left.keys().copied().collect();
        let other: BTreeSet<u16> = right.keys().copied().collect();
        let presence: Vec<(&u16, bool)> = with_presence(&items, &other).collect();
        let expected: Vec<(&u16, bool)> = items.iter().map(|i| (i, other.contains(i))).collect();
        prop_assert_eq!(presence, expected);
    }
}
