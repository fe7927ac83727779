//! `kernel::links` on this machine's kernel: bridges, VXLAN devices, addresses and FDB
//! entries created through the controller's executor, checked against the kernel's own
//! view (`ip -j`, `bridge -j`) and against `links::dump`.
//!
//! Each test runs in its own named network namespace (`ip netns add`), entered with
//! `setns` by a dedicated thread that then builds a current-thread tokio runtime, so the
//! netlink sockets live in that namespace (`common::netns`); the namespace is deleted by
//! a guard even when the test fails. The tests need root: without it they fail with a
//! message, they never pass silently.

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use common::netns::Netns;
use ipnet::IpNet;
use ovl::kernel::{Kernel, KernelError, Underlay, links};
use ovl::plan::Change;
use ovl::state::{Address, FdbEntry, IfName, KernelState, Link, LinkKind, SaId, VxlanParams};
use serde_json::Value;

const ALIAS: &str = "ovl-controller cluster=test network=n1";
const MTU: u32 = 1400;
const PORT: u16 = 4789;
const VNI: u32 = 4097;

// ---------------------------------------------------------------- harness

/// What a test body gets: the controller's kernel facade and a plain rtnetlink handle
/// (for `links::execute` on its own), both opened inside the test's namespace.
struct Ctx {
    kernel: Kernel,
    route: rtnetlink::Handle,
    ns: Arc<Netns>,
}

impl Ctx {
    async fn apply(&self, changes: &[Change]) {
        for c in changes {
            if let Err(e) = self.kernel.execute(std::slice::from_ref(c)).await {
                panic!("{c}: {e}");
            }
        }
    }

    async fn try_apply(&self, change: Change) -> Result<(), KernelError> {
        self.kernel.execute(&[change]).await
    }

    /// The link half of `Kernel::dump` (XFRM objects left out, so that the checks do
    /// not depend on them).
    async fn dump(&self) -> KernelState {
        let mut state = self
            .kernel
            .dump()
            .await
            .unwrap_or_else(|e| panic!("dump: {e}"));
        state.policies.clear();
        state.sas.clear();
        state
    }
}

/// Runs `body` on a fresh thread that has entered a fresh namespace `ovlt-PID-TAG`.
fn in_netns<F, Fut>(tag: &str, body: F)
where
    F: FnOnce(Ctx) -> Fut + Send,
    Fut: Future<Output = ()>,
{
    let ns = Arc::new(Netns::add(format!("ovlt-{}-{tag}", std::process::id())));
    let inner = Arc::clone(&ns);
    ns.block_on(move || async move {
        let kernel = Kernel::connect().unwrap_or_else(|e| panic!("Kernel::connect: {e}"));
        let (conn, route, _) =
            rtnetlink::new_connection().unwrap_or_else(|e| panic!("rtnetlink: {e}"));
        tokio::spawn(conn);
        body(Ctx {
            kernel,
            route,
            ns: inner,
        })
        .await;
    });
}

// ---------------------------------------------------------------- fixtures

fn name(s: &str) -> IfName {
    s.parse().unwrap_or_else(|e| panic!("{e}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// The addresses of one test flavour.
struct Family {
    local: &'static str,
    underlay_prefix: u8,
    remotes: [&'static str; 2],
    bridge_addr: &'static str,
}

const V4: Family = Family {
    local: "192.0.2.1",
    underlay_prefix: 24,
    remotes: ["192.0.2.2", "192.0.2.3"],
    bridge_addr: "10.10.0.1/24",
};

const V6: Family = Family {
    local: "2001:db8::1",
    underlay_prefix: 64,
    remotes: ["2001:db8::2", "2001:db8::3"],
    bridge_addr: "fd00:10::1/64",
};

/// A veth pair `ul0`/`ul1`, up, with `local` on `ul0`: the underlay.
fn add_underlay(ns: &Netns, f: &Family) {
    ns.ip("link add ul0 type veth peer name ul1");
    let nodad = if f.local.contains(':') { " nodad" } else { "" };
    ns.ip(&format!(
        "addr add {}/{} dev ul0{nodad}",
        f.local, f.underlay_prefix
    ));
    ns.ip("link set ul1 up");
    ns.ip("link set ul0 up");
}

fn bridge(vni: u32) -> Link {
    Link {
        name: name(&format!("ovbr-{vni}")),
        kind: LinkKind::Bridge,
        mtu: MTU,
        master: None,
        alias: ALIAS.to_owned(),
        up: false,
    }
}

fn vxlan(vni: u32, local: &str) -> Link {
    Link {
        name: name(&format!("ovvx-{vni}")),
        kind: LinkKind::Vxlan(VxlanParams {
            vni,
            local: ip(local),
            port: PORT,
            underlay: name("ul0"),
            learning: true,
        }),
        mtu: MTU,
        master: Some(name(&format!("ovbr-{vni}"))),
        alias: ALIAS.to_owned(),
        up: false,
    }
}

/// The whole network of one VNI as the plan would create it, and the state it leaves.
fn network(f: &Family) -> (Vec<Change>, KernelState) {
    let (br, vx) = (bridge(VNI), vxlan(VNI, f.local));
    let addr = Address {
        link: br.name.clone(),
        addr: net(f.bridge_addr),
    };
    let fdb: Vec<FdbEntry> = f
        .remotes
        .iter()
        .map(|r| FdbEntry {
            link: vx.name.clone(),
            remote: ip(r),
        })
        .collect();
    let mut changes = vec![
        Change::CreateLink(br.clone()),
        Change::CreateLink(vx.clone()),
    ];
    changes.push(Change::AddAddress(addr.clone()));
    changes.extend(fdb.iter().cloned().map(Change::AddFdb));
    changes.push(Change::SetUp {
        link: vx.name.clone(),
    });
    changes.push(Change::SetUp {
        link: br.name.clone(),
    });
    let mut state = KernelState::default();
    for mut l in [br, vx] {
        l.up = true;
        state.links.insert(l.name.clone(), l);
    }
    state.addresses.insert(addr);
    state.fdb.extend(fdb);
    (changes, state)
}

fn flags(link: &Value) -> Vec<String> {
    link["flags"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn is_up(link: &Value) -> bool {
    flags(link).iter().any(|f| f == "UP")
}

// ---------------------------------------------------------------- tests

/// Creates the network, checks every attribute in the kernel's view, and that the dump
/// returns exactly what was created.
async fn round_trip(ctx: Ctx, f: &Family) {
    add_underlay(&ctx.ns, f);
    let (changes, want) = network(f);
    let (create, rest) = changes.split_at(2);
    ctx.apply(create).await;

    // Created down, with MTU, alias and master.
    let br = ctx.ns.link("ovbr-4097");
    assert!(!is_up(&br), "bridge created up: {br}");
    assert_eq!(br["linkinfo"]["info_kind"], "bridge");
    assert_eq!(br["mtu"], MTU);
    assert_eq!(br["ifalias"], ALIAS);
    let vx = ctx.ns.link("ovvx-4097");
    assert!(!is_up(&vx), "vxlan created up: {vx}");
    assert_eq!(vx["mtu"], MTU);
    assert_eq!(vx["ifalias"], ALIAS);
    assert_eq!(vx["master"], "ovbr-4097");
    let data = &vx["linkinfo"]["info_data"];
    assert_eq!(vx["linkinfo"]["info_kind"], "vxlan");
    assert_eq!(data["id"], VNI);
    assert_eq!(data["port"], PORT);
    assert_eq!(data["link"], "ul0");
    assert_eq!(data["learning"], true);
    if f.local.contains(':') {
        assert_eq!(data["local6"], f.local, "{data}");
        assert_eq!(data["udp_zero_csum6_tx"], false, "{data}");
    } else {
        assert_eq!(data["local"], f.local, "{data}");
        assert_eq!(data["udp_csum"], true, "{data}");
    }
    // No remote or group: flooding goes only to the FDB's all-zero entries.
    assert!(
        data.get("remote").is_none() && data.get("group").is_none(),
        "{data}"
    );

    ctx.apply(rest).await;
    assert!(is_up(&ctx.ns.link("ovbr-4097")));
    assert!(is_up(&ctx.ns.link("ovvx-4097")));
    let addrs = ctx.ns.addresses("ovbr-4097");
    assert!(
        addrs.contains(&(f.bridge_addr.to_owned(), "global".to_owned())),
        "{addrs:?}"
    );
    let remotes: BTreeSet<String> = f.remotes.iter().map(|r| r.to_string()).collect();
    assert_eq!(ctx.ns.zero_fdb("ovvx-4097"), remotes);

    assert_eq!(ctx.dump().await, want);
    // The facade's dump (links plus XFRM, which has nothing here) agrees.
    let full = ctx
        .kernel
        .dump()
        .await
        .unwrap_or_else(|e| panic!("Kernel::dump: {e}"));
    assert_eq!(full, want);
}

#[test]
fn ipv4_network_round_trips() {
    in_netns("rt4", |ctx| round_trip(ctx, &V4));
}

#[test]
fn ipv6_network_round_trips() {
    in_netns("rt6", |ctx| round_trip(ctx, &V6));
}

/// Foreign links, addresses and FDB entries, some named like ours, stay out of the dump.
#[test]
fn foreign_objects_are_not_dumped() {
    in_netns("foreign", |ctx| async move {
        add_underlay(&ctx.ns, &V4);
        let (changes, want) = network(&V4);
        ctx.apply(&changes).await;
        let ns = &ctx.ns;
        // A user's bridge with an address.
        ns.ip("link add br-user type bridge");
        ns.ip("addr add 10.99.0.1/24 dev br-user");
        // Our name prefix, no alias / someone else's alias.
        ns.ip("link add ovbr-77 type bridge");
        ns.ip("link add ovbr-78 type bridge");
        ns.ip("link set ovbr-78 alias someone-else");
        ns.ip("link add ovvx-77 type vxlan id 77 local 192.0.2.1 dstport 4789 dev ul0");
        ns.bridge("fdb append 00:00:00:00:00:00 dev ovvx-77 dst 192.0.2.77");
        // Our alias, not our name.
        ns.ip("link add user-vx type vxlan id 79 local 192.0.2.1 dstport 4789 dev ul0");
        ns.ip(&format!("link set user-vx alias '{ALIAS}'"));
        // On our devices, but not ours: a unicast FDB entry, a link-local and a
        // non-permanent address.
        ns.bridge("fdb add 02:00:00:00:00:01 dev ovvx-4097 dst 192.0.2.50 self permanent");
        ns.ip("addr add fe80::1234/64 dev ovbr-4097");
        ns.ip("addr add 10.10.0.9/24 dev ovbr-4097 valid_lft 600 preferred_lft 600");
        // They are all really there.
        assert!(ns.zero_fdb("ovvx-77").contains("192.0.2.77"));
        assert!(
            ns.bridge("fdb show dev ovvx-4097")
                .contains("02:00:00:00:00:01 dst 192.0.2.50")
        );
        let on_ours = ns.addresses("ovbr-4097");
        for a in [("fe80::1234/64", "link"), ("10.10.0.9/24", "global")] {
            assert!(
                on_ours.contains(&(a.0.to_owned(), a.1.to_owned())),
                "{on_ours:?}"
            );
        }
        assert!(
            ns.addresses("br-user")
                .contains(&("10.99.0.1/24".to_owned(), "global".to_owned()))
        );
        assert_eq!(ns.link("user-vx")["ifalias"], ALIAS);

        assert_eq!(ctx.dump().await, want);
    });
}

/// Every Set* change, observed in the kernel and in the dump.
#[test]
fn set_changes_are_observed() {
    in_netns("set", |ctx| async move {
        add_underlay(&ctx.ns, &V4);
        let (br, vx) = (bridge(VNI), vxlan(VNI, V4.local));
        ctx.apply(&[
            Change::CreateLink(br.clone()),
            Change::CreateLink(vx.clone()),
        ])
        .await;

        ctx.apply(&[
            Change::SetMtu {
                link: vx.name.clone(),
                from: MTU,
                to: 1300,
            },
            Change::SetMtu {
                link: br.name.clone(),
                from: MTU,
                to: 1300,
            },
        ])
        .await;
        assert_eq!(ctx.ns.link("ovvx-4097")["mtu"], 1300);
        assert_eq!(ctx.ns.link("ovbr-4097")["mtu"], 1300);

        let renamed = "ovl-controller cluster=test network=renamed";
        ctx.apply(&[Change::SetAlias {
            link: br.name.clone(),
            from: ALIAS.into(),
            to: renamed.into(),
        }])
        .await;
        assert_eq!(ctx.ns.link("ovbr-4097")["ifalias"], renamed);

        ctx.apply(&[Change::SetMaster {
            link: vx.name.clone(),
            from: vx.master.clone(),
            to: None,
        }])
        .await;
        assert!(ctx.ns.link("ovvx-4097").get("master").is_none());
        let dumped = ctx.dump().await;
        assert_eq!(dumped.links[&vx.name].master, None);

        ctx.apply(&[Change::SetMaster {
            link: vx.name.clone(),
            from: None,
            to: Some(br.name.clone()),
        }])
        .await;
        assert_eq!(ctx.ns.link("ovvx-4097")["master"], "ovbr-4097");

        ctx.apply(&[
            Change::SetUp {
                link: vx.name.clone(),
            },
            Change::SetUp {
                link: br.name.clone(),
            },
        ])
        .await;
        assert!(is_up(&ctx.ns.link("ovvx-4097")));
        assert!(is_up(&ctx.ns.link("ovbr-4097")));

        let dumped = ctx.dump().await;
        let b = &dumped.links[&br.name];
        assert_eq!((b.mtu, b.alias.as_str(), b.up), (1300, renamed, true));
        let v = &dumped.links[&vx.name];
        assert_eq!(
            (v.mtu, v.master.as_ref(), v.up),
            (1300, Some(&br.name), true)
        );
    });
}

/// Every Delete* change, observed in the kernel and in the dump; deleting what is gone
/// fails with the kernel's errno.
#[test]
fn delete_changes_are_observed() {
    in_netns("delete", |ctx| async move {
        add_underlay(&ctx.ns, &V4);
        let (changes, mut want) = network(&V4);
        ctx.apply(&changes).await;

        let first = FdbEntry {
            link: name("ovvx-4097"),
            remote: ip(V4.remotes[0]),
        };
        ctx.apply(&[Change::DeleteFdb(first.clone())]).await;
        assert_eq!(
            ctx.ns.zero_fdb("ovvx-4097"),
            BTreeSet::from([V4.remotes[1].to_owned()])
        );
        want.fdb.remove(&first);
        assert_eq!(ctx.dump().await, want);
        // The kernel's own semantics: removing a remote that is not in the all-zero
        // entry succeeds (and removes nothing) while the entry exists...
        let again = ctx.try_apply(Change::DeleteFdb(first.clone())).await;
        assert!(again.is_ok(), "{again:?}");
        assert_eq!(
            ctx.ns.zero_fdb("ovvx-4097"),
            BTreeSet::from([V4.remotes[1].to_owned()])
        );
        // ...and fails with ENOENT once the last remote is gone.
        let last = FdbEntry {
            link: name("ovvx-4097"),
            remote: ip(V4.remotes[1]),
        };
        ctx.apply(&[Change::DeleteFdb(last.clone())]).await;
        assert!(ctx.ns.zero_fdb("ovvx-4097").is_empty());
        want.fdb.remove(&last);
        let again = ctx.try_apply(Change::DeleteFdb(first)).await;
        assert_eq!(
            again.as_ref().err().and_then(KernelError::errno),
            Some(libc::ENOENT),
            "{again:?}"
        );

        let addr = Address {
            link: name("ovbr-4097"),
            addr: net(V4.bridge_addr),
        };
        ctx.apply(&[Change::DeleteAddress(addr.clone())]).await;
        assert!(
            !ctx.ns
                .addresses("ovbr-4097")
                .iter()
                .any(|(a, _)| a == V4.bridge_addr)
        );
        want.addresses.remove(&addr);
        assert_eq!(ctx.dump().await, want);

        let vx = want.links[&name("ovvx-4097")].clone();
        ctx.apply(&[Change::DeleteLink(vx.clone())]).await;
        assert!(!ctx.ns.has_link("ovvx-4097"));
        let br = want.links[&name("ovbr-4097")].clone();
        ctx.apply(&[Change::DeleteLink(br.clone())]).await;
        assert!(!ctx.ns.has_link("ovbr-4097"));
        assert!(ctx.ns.has_link("ul0"), "the underlay must survive");
        assert_eq!(ctx.dump().await, KernelState::default());

        let again = ctx.try_apply(Change::DeleteLink(br)).await;
        assert_eq!(
            again.as_ref().err().and_then(KernelError::errno),
            Some(libc::ENODEV),
            "{again:?}"
        );
    });
}

/// Adding an existing FDB entry or address again succeeds and changes nothing.
#[test]
fn adding_twice_is_harmless() {
    in_netns("twice", |ctx| async move {
        add_underlay(&ctx.ns, &V4);
        let (changes, want) = network(&V4);
        ctx.apply(&changes).await;
        let again: Vec<Change> = changes
            .into_iter()
            .filter(|c| matches!(c, Change::AddFdb(_) | Change::AddAddress(_)))
            .collect();
        ctx.apply(&again).await;
        assert_eq!(ctx.ns.zero_fdb("ovvx-4097").len(), 2);
        assert_eq!(ctx.dump().await, want);
    });
}

/// A link with our name and no alias that is exactly what an interrupted create leaves
/// (down, in the half-created group) is adopted; anything else with our name makes the
/// create fail and is left alone.
#[test]
fn create_adopts_only_its_own_leftovers() {
    in_netns("adopt", |ctx| async move {
        add_underlay(&ctx.ns, &V4);
        // A create of ours leaves its link in group 0 (the half-created group is only
        // held until the alias is set).
        ctx.apply(&[Change::CreateLink(bridge(4))]).await;
        assert_eq!(ctx.ns.link("ovbr-4")["group"], "default");
        let half = ovl::kernel::HALF_CREATED_GROUP;
        ctx.ns.ip(&format!(
            "link add ovbr-5 mtu {MTU} group {half} type bridge"
        ));
        ctx.apply(&[Change::CreateLink(bridge(5))]).await;
        assert_eq!(ctx.ns.link("ovbr-5")["ifalias"], ALIAS);
        assert_eq!(ctx.ns.link("ovbr-5")["group"], "default");
        assert!(ctx.dump().await.links.contains_key(&name("ovbr-5")));
        // Creating it again: it is ours, the kernel's EEXIST stands.
        let err = ctx.try_apply(Change::CreateLink(bridge(5))).await;
        assert_eq!(
            err.as_ref().err().and_then(KernelError::errno),
            Some(libc::EEXIST),
            "{err:?}"
        );

        // Exactly like one of ours but made by hand (group 0): not adopted.
        ctx.ns.ip(&format!("link add ovbr-9 mtu {MTU} type bridge"));
        let err = ctx.try_apply(Change::CreateLink(bridge(9))).await;
        assert!(
            matches!(&err, Err(KernelError::ForeignLink { reason, .. }) if reason.contains("group 0")),
            "{err:?}"
        );
        assert!(ctx.ns.link("ovbr-9").get("ifalias").is_none());

        // Leftovers in our half-created group that the spec wants otherwise, or not at
        // all (a killed apply of another spec): ours all the same (nobody else uses the
        // group). The dump shows them, and the plan finishes one and deletes the other.
        ctx.ns.ip(&format!(
            "link add ovbr-6 mtu 1500 group {half} type bridge"
        ));
        ctx.ns.ip(&format!(
            "link add ovbr-10 mtu 1500 group {half} type bridge"
        ));
        let seen = ctx.dump().await;
        assert!(
            seen.links.contains_key(&name("ovbr-6")) && seen.links.contains_key(&name("ovbr-10")),
            "{:?}",
            seen.links.keys().collect::<Vec<_>>()
        );
        let mut want = seen.clone();
        want.links.remove(&name("ovbr-6"));
        want.links.insert(name("ovbr-10"), bridge(10));
        let plan = ovl::plan::plan(&want, &seen);
        let lines: Vec<String> = plan.changes.iter().map(|c| c.to_string()).collect();
        assert!(
            lines.iter().any(|l| l.starts_with("- link ovbr-6"))
                && lines.iter().any(|l| l.starts_with("~ link ovbr-10 alias"))
                && lines.iter().any(|l| l.starts_with("~ link ovbr-10 mtu")),
            "{lines:?}"
        );
        ctx.apply(&plan.changes).await;
        assert!(!ctx.ns.has_link("ovbr-6"), "the unwanted leftover stays");
        let l = ctx.ns.link("ovbr-10");
        assert!(
            l["ifalias"] == ALIAS && l["mtu"] == MTU && l["group"] == "default",
            "the wanted leftover was not finished: {l}"
        );
        ctx.ns.ip("link del ovbr-10");

        // Someone else's alias.
        ctx.ns.ip(&format!("link add ovbr-7 mtu {MTU} type bridge"));
        ctx.ns.ip("link set ovbr-7 alias someone-else");
        let err = ctx.try_apply(Change::CreateLink(bridge(7))).await;
        assert!(
            matches!(err, Err(KernelError::ForeignLink { .. })),
            "{err:?}"
        );
        assert_eq!(ctx.ns.link("ovbr-7")["ifalias"], "someone-else");

        // Up: not a leftover of ours either (we create links down).
        ctx.ns.ip(&format!("link add ovbr-8 mtu {MTU} type bridge"));
        ctx.ns.ip("link set ovbr-8 up");
        let err = ctx.try_apply(Change::CreateLink(bridge(8))).await;
        assert!(
            matches!(err, Err(KernelError::ForeignLink { .. })),
            "{err:?}"
        );

        let owned: Vec<String> = ctx
            .dump()
            .await
            .links
            .keys()
            .map(|k| k.to_string())
            .collect();
        assert_eq!(owned, ["ovbr-4", "ovbr-5"]);
    });
}

/// Our bridges keep their MAC address when their VXLAN port is recreated (new port or
/// local address): peers' ARP caches stay right. Also one made without its own MAC (by
/// an older version): the address it has when a port is added is pinned.
#[test]
fn bridges_keep_their_mac_when_their_port_is_recreated() {
    in_netns("brmac", |ctx| async move {
        add_underlay(&ctx.ns, &V4);
        // As created now (its own MAC), and as an older version created it (the
        // kernel's, which follows the ports'), the alias set by hand.
        ctx.apply(&[Change::CreateLink(bridge(VNI))]).await;
        ctx.ns
            .ip(&format!("link add ovbr-77 mtu {MTU} type bridge"));
        ctx.ns.ip(&format!("link set ovbr-77 alias '{ALIAS}'"));
        for vni in [VNI, 77] {
            let br = format!("ovbr-{vni}");
            ctx.apply(&[Change::CreateLink(vxlan(vni, V4.local))]).await;
            let before = ctx.ns.link(&br)["address"].clone();
            let mut moved = vxlan(vni, V4.local);
            if let LinkKind::Vxlan(p) = &mut moved.kind {
                p.port = PORT + 1;
            }
            ctx.apply(&[
                Change::DeleteLink(vxlan(vni, V4.local)),
                Change::CreateLink(moved),
            ])
            .await;
            assert_eq!(ctx.ns.link(&br)["address"], before, "{br} changed its MAC");
        }
    });
}

/// A plan that would create a link where a foreign one has the name, or a VXLAN device
/// whose VNI and port a foreign one uses, is refused before its first change.
#[test]
fn foreign_name_and_vni_clashes_are_refused_before_any_change() {
    in_netns("clash", |ctx| async move {
        add_underlay(&ctx.ns, &V4);
        ctx.ns.ip(&format!(
            "link add foo{VNI} type vxlan id {VNI} local {} dstport {PORT} dev ul0",
            V4.local
        ));
        let plan = [
            Change::CreateLink(bridge(VNI)),
            Change::CreateLink(vxlan(VNI, V4.local)),
        ];
        // Refused with a reason naming all of `names`, before the plan's first change.
        let refused_before_start = async |names: &[&str]| {
            let err = ctx.kernel.execute(&plan).await;
            assert!(
                matches!(&err, Err(KernelError::ForeignLink { reason, .. })
                    if names.iter().all(|n| reason.contains(n))
                        && reason.contains("nothing was changed")),
                "{err:?}"
            );
            assert!(!ctx.ns.has_link(&format!("ovbr-{VNI}")), "the plan started");
        };
        refused_before_start(&[&format!("foo{VNI}")]).await;
        // A name clash later in a plan stops it before its first change as well.
        ctx.ns.ip(&format!("link del foo{VNI}"));
        ctx.ns.ip("link add ovbr-77 type bridge");
        let name_clash = [
            Change::CreateLink(bridge(VNI)),
            Change::CreateLink(bridge(77)),
        ];
        let err = ctx.kernel.execute(&name_clash).await;
        assert!(
            matches!(&err, Err(KernelError::ForeignLink { link, .. }) if link == "ovbr-77"),
            "{err:?}"
        );
        assert!(!ctx.ns.has_link(&format!("ovbr-{VNI}")), "the plan started");
        assert_eq!(ctx.dump().await, KernelState::default());
        ctx.ns.ip("link del ovbr-77");

        // A foreign VXLAN device up on our port with other socket options (gbp): the
        // kernel would refuse to bring ours up, halfway through the plan.
        ctx.ns.ip(&format!(
            "link add gbp9 type vxlan id 9 local {} dstport {PORT} dev ul0 gbp",
            V4.local
        ));
        ctx.ns.ip("link set gbp9 up");
        refused_before_start(&["gbp9", "gbp"]).await;
        // Down, it holds no socket: ours may have the port. Another device with the
        // same VNI and port but other socket options does not clash either (the
        // kernel's rule).
        ctx.ns.ip("link set gbp9 down");
        ctx.ns.ip(&format!(
            "link add gbpv type vxlan id {VNI} local {} dstport {PORT} dev ul0 gbp",
            V4.local
        ));
        ctx.apply(&plan).await;
        assert!(ctx.ns.has_link(&format!("ovvx-{VNI}")));
    });
}

/// A VXLAN device on a missing underlay or with a missing master is refused cleanly
/// and leaves nothing behind.
#[test]
fn create_with_missing_dependencies_fails_cleanly() {
    in_netns("missing", |ctx| async move {
        add_underlay(&ctx.ns, &V4);
        let vx = vxlan(VNI, V4.local);
        let err = ctx.try_apply(Change::CreateLink(vx.clone())).await;
        assert!(
            matches!(&err, Err(KernelError::LinkNotFound { link, .. }) if link == "ovbr-4097"),
            "{err:?}"
        );
        let mut no_underlay = vx;
        no_underlay.master = None;
        if let LinkKind::Vxlan(p) = &mut no_underlay.kind {
            p.underlay = name("nosuch0");
        }
        let err = ctx.try_apply(Change::CreateLink(no_underlay)).await;
        assert!(
            matches!(&err, Err(KernelError::LinkNotFound { link, .. }) if link == "nosuch0"),
            "{err:?}"
        );
        assert!(!ctx.ns.has_link("ovvx-4097"));
        assert_eq!(ctx.dump().await, KernelState::default());
    });
}

/// XFRM changes handed to the link executor are refused, not run and not a panic.
#[test]
fn xfrm_changes_are_refused_by_the_link_executor() {
    in_netns("xfrm", |ctx| async move {
        let change = Change::DeleteSa(SaId {
            src: ip("192.0.2.1"),
            dst: ip("192.0.2.2"),
            spi: 0x100,
        });
        let err = links::execute(&ctx.route, &change).await;
        assert!(
            matches!(err, Err(KernelError::Unsupported { .. })),
            "{err:?}"
        );
    });
}

#[test]
fn underlay_and_local_addresses() {
    in_netns("underlay", |ctx| async move {
        add_underlay(&ctx.ns, &V4);
        ctx.ns.ip("addr add 2001:db8::1/64 dev ul1 nodad");
        ctx.ns.ip("link set ul1 mtu 9000");
        let index = ctx.ns.link("ul0")["ifindex"]
            .as_u64()
            .and_then(|i| u32::try_from(i).ok());
        let index = index.unwrap_or_else(|| panic!("no ifindex"));
        let u = ctx
            .kernel
            .underlay_for(ip("192.0.2.1"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            u,
            Some(Underlay {
                name: name("ul0"),
                index,
                mtu: 1500,
                loopback: false,
            })
        );
        // A routed VTEP: the address on lo, which is flagged as such.
        ctx.ns.ip("addr add 198.51.100.3/32 dev lo");
        let u = ctx
            .kernel
            .underlay_for(ip("198.51.100.3"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(u.map(|u| (u.name, u.loopback)), Some((name("lo"), true)));
        // The same on a dummy device, where the kernel has the driver (this machine's
        // has none).
        let dummy = common::sh(&format!(
            "ip -n {} link add vtep0 type dummy",
            ctx.ns.name()
        ));
        if dummy.status.success() {
            ctx.ns.ip("addr add 198.51.100.4/32 dev vtep0");
            let u = ctx
                .kernel
                .underlay_for(ip("198.51.100.4"))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(u.map(|u| (u.name, u.loopback)), Some((name("vtep0"), true)));
        } else {
            eprintln!("dummy device part skipped: this kernel has no dummy driver");
        }
        let u = ctx
            .kernel
            .underlay_for(ip("2001:db8::1"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(u.map(|u| (u.name, u.mtu)), Some((name("ul1"), 9000)));
        let u = ctx
            .kernel
            .underlay_for(ip("203.0.113.1"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(u, None);

        let local = ctx
            .kernel
            .local_addresses()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            local.contains(&ip("192.0.2.1")) && local.contains(&ip("2001:db8::1")),
            "{local:?}"
        );
        assert!(
            !local.contains(&ip("192.0.2.255")),
            "broadcast is not a local address: {local:?}"
        );
    });
}

/// A watched `Kernel` (as the agent has) answers a read from its last full read only
/// while the kernel announces no change: each kind of change made by hand (a link's
/// MTU, an address, an FDB entry, an XFRM policy, a link that is not even ours) makes
/// the next read a full one that shows it, and the read after that is reused again.
#[test]
fn watched_view_is_reused_only_while_the_kernel_is_quiet() {
    in_netns("watch", |ctx| async move {
        add_underlay(&ctx.ns, &V4);
        let (changes, _) = network(&V4);
        ctx.apply(&changes).await;
        let watched = Kernel::connect_watched().unwrap_or_else(|e| panic!("{e}"));
        let read = async || watched.dump().await.unwrap_or_else(|e| panic!("{e}"));
        let full_read = async || ctx.kernel.dump().await.unwrap_or_else(|e| panic!("{e}"));
        let stats = || watched.watch_stats().unwrap_or_else(|| panic!("no watch"));

        let first = read().await;
        assert_eq!((stats().full, stats().reused), (1, 0));
        assert_eq!(read().await, first);
        assert_eq!(read().await, first);
        assert_eq!(
            (stats().full, stats().reused),
            (1, 2),
            "a quiet kernel is not read again"
        );
        assert_eq!(
            ctx.kernel.watch_stats(),
            None,
            "Kernel::connect keeps no view"
        );

        // (command, whether the change shows in our model: an XFRM policy in a form we
        // never install, or a link of someone else's, must still cause a full read).
        let by_hand = [
            ("ip link set ovbr-4097 mtu 1300", true),
            ("ip addr add 10.77.0.1/24 dev ovbr-4097", true),
            (
                "bridge fdb append 00:00:00:00:00:00 dev ovvx-4097 dst 192.0.2.77",
                true,
            ),
            (
                "ip xfrm policy add src 192.0.2.1/32 dst 192.0.2.77/32 dir out priority 5",
                false,
            ),
            ("ip link add ext7 type bridge", false),
        ];
        let mut before = first;
        for (i, (command, visible)) in by_hand.into_iter().enumerate() {
            let (tool, args) = command
                .split_once(' ')
                .unwrap_or_else(|| panic!("{command}"));
            match tool {
                "ip" => ctx.ns.ip(args),
                _ => ctx.ns.bridge(args),
            };
            let after = read().await;
            let full = 2 + i as u64;
            assert_eq!(stats().full, full, "{command}: must be read again");
            assert_eq!(
                after,
                full_read().await,
                "{command}: the read is the kernel's"
            );
            assert_eq!(
                after != before,
                visible,
                "{command}: seen in the model or not"
            );
            assert_eq!(read().await, after);
            assert_eq!(stats().full, full, "{command}: then quiet again");
            before = after;
        }

        // ARP entries on the underlay are not modelled: their churn (every dial of an
        // absent peer) leaves the view in use.
        let (full, reused) = (stats().full, stats().reused);
        ctx.ns
            .ip("neigh add 192.0.2.88 lladdr 02:00:00:00:00:88 dev ul0 nud permanent");
        ctx.ns.ip("neigh del 192.0.2.88 dev ul0");
        assert_eq!(read().await, before);
        assert_eq!(
            (stats().full, stats().reused),
            (full, reused + 1),
            "an ARP entry forced a full read"
        );
    });
}
