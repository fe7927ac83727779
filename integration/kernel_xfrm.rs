//! The XFRM layer (`ovl::kernel::xfrm` through [`ovl::kernel::Kernel`]) against a real
//! kernel, each test in a fresh network namespace (`common::netns`), checked with the
//! kernel's own view (`ip xfrm`).
//!
//! Most tests need ESP with `rfc4106(gcm(aes))`, which this project's development hosts
//! lack: run them inside user-mode-linux,
//!
//! ```text
//! cargo test --test kernel_xfrm --no-run      # prints the binary's path
//! scripts/uml-run.sh -- target/debug/deps/kernel_xfrm-<hash> --test-threads=1
//! ```
//!
//! Without ESP those tests fail (never pass silently) with "needs an ESP-capable
//! kernel: run via scripts/uml-run.sh". `check_esp_agrees_with_ip_xfrm` runs on any
//! kernel: it asserts `check_esp` says exactly what `ip xfrm` finds.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, UdpSocket};
use std::time::Duration;

use common::netns::{Netns, hex};
use common::{ok, sh, stderr, stdout};
use ipnet::IpNet;
use ovl::kernel::KernelError;
use ovl::keys::SaKey;
use ovl::plan::Change;
use ovl::state::{
    Direction, Lifetime, Policy, PolicyAction, PolicyId, Sa, SaId, Selector, ownership,
};

const R: u32 = ownership::REQID_MIN;
const PORT: u16 = 4790;
const A: &str = "192.0.2.1";
const B: &str = "192.0.2.2";

/// A fresh namespace for one test (see [`Netns::new`]).
fn netns() -> Netns {
    Netns::new("ovlx")
}

// --- objects --------------------------------------------------------------------------

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn policy(dir: Direction, src: &str, dst: &str, priority: u32, action: PolicyAction) -> Policy {
    Policy {
        id: PolicyId {
            dir,
            selector: Selector {
                src: net(src),
                dst: net(dst),
                dport: PORT,
            },
        },
        priority,
        action,
        reqid: R,
    }
}

/// The suggested layout for node `me` with peer `peer`: block catch-all out,
/// require-ESP catch-all in, and the pair's out and in policies.
fn policies_of(me: &str, peer: &str) -> Vec<Policy> {
    let (m, p) = (ip(me), ip(peer));
    vec![
        policy(
            Direction::Out,
            "0.0.0.0/0",
            "0.0.0.0/0",
            2000,
            PolicyAction::Block,
        ),
        policy(
            Direction::In,
            "0.0.0.0/0",
            &format!("{me}/32"),
            2000,
            PolicyAction::Esp {
                src: None,
                dst: None,
            },
        ),
        policy(
            Direction::Out,
            &format!("{me}/32"),
            &format!("{peer}/32"),
            1000,
            PolicyAction::Esp {
                src: Some(m),
                dst: Some(p),
            },
        ),
        policy(
            Direction::In,
            &format!("{peer}/32"),
            &format!("{me}/32"),
            1000,
            PolicyAction::Esp {
                src: Some(p),
                dst: Some(m),
            },
        ),
    ]
}

/// Node A's layout, with peer B.
fn policies_of_a() -> Vec<Policy> {
    policies_of(A, B)
}

/// The mirror image for node B.
fn policies_of_b() -> Vec<Policy> {
    policies_of(B, A)
}

fn sa(src: &str, dst: &str, spi: u32, replay_window: u32, lifetime: Lifetime) -> Sa {
    Sa {
        id: SaId {
            src: ip(src),
            dst: ip(dst),
            spi,
        },
        reqid: R,
        key: SaKey::generate().unwrap(),
        replay_window,
        dport: PORT,
        lifetime,
    }
}

const LIMITS: Lifetime = Lifetime {
    soft_bytes: 1 << 40,
    hard_bytes: 1 << 41,
    soft_packets: 1 << 30,
    hard_packets: 1 << 31,
    soft_add_seconds: 3600,
    hard_add_seconds: 7200,
};

fn puts(ps: &[Policy]) -> Vec<Change> {
    ps.iter()
        .map(|p| Change::PutPolicy {
            policy: p.clone(),
            replaces: None,
        })
        .collect()
}

fn by_id_p(ps: &[Policy]) -> BTreeMap<PolicyId, Policy> {
    ps.iter().map(|p| (p.id, p.clone())).collect()
}

fn by_id_s(ss: &[Sa]) -> BTreeMap<SaId, Sa> {
    ss.iter().map(|s| (s.id, s.clone())).collect()
}

// --- tests ----------------------------------------------------------------------------

#[test]
fn esp_policies_and_sas_round_trip() {
    let ns = netns();
    ns.require_esp();
    let policies = policies_of_a();
    let sas = vec![
        sa(A, B, 0x1001, 128, Lifetime::default()),
        sa(B, A, 0x2001, 256, LIMITS),
    ];
    let mut changes = puts(&policies);
    changes.extend(sas.iter().cloned().map(Change::AddSa));

    let state = ns.with_kernel(|k| async move {
        k.execute(&changes).await.expect("execute");
        k.dump().await.expect("dump")
    });
    assert_eq!(state.policies, by_id_p(&policies), "policies round-trip");
    assert!(
        state.sas == by_id_s(&sas),
        "SAs round-trip (not printed: they hold keys)"
    );

    // The kernel's own view.
    let text = ns.ip("xfrm policy");
    assert_eq!(
        text.matches("reqid 259063808 mode transport").count(),
        4,
        "{text}"
    );
    assert!(
        text.contains("dir out action block priority 2000"),
        "{text}"
    );
    assert_eq!(text.matches("proto udp dport 4790").count(), 4, "{text}");
    assert!(
        !text.contains("level use"),
        "every template is required:\n{text}"
    );
    assert!(text.contains(&format!("tmpl src {A} dst {B}")), "{text}");
    assert!(text.contains(&format!("tmpl src {B} dst {A}")), "{text}");
    let text = ns.ip("-s xfrm state");
    for s in &sas {
        let spi = format!("spi 0x{:08x}", s.id.spi);
        let block = text
            .split("\nsrc ")
            .find(|b| b.contains(&spi))
            .unwrap_or_else(|| panic!("no state with {spi}"));
        assert!(
            block.contains("reqid 259063808(0x0f710000) mode transport"),
            "state {spi}: reqid/mode"
        );
        assert!(block.contains("flag esn"), "state {spi}: ESN");
        assert!(
            block.contains(&format!("replay_window {}", s.replay_window)),
            "state {spi}: replay window"
        );
        assert!(
            block.contains(&format!(
                "aead rfc4106(gcm(aes)) 0x{} (288 bits) 128",
                hex(&s.key)
            )),
            "state {spi}: AEAD and key"
        );
        let sel = format!(
            "sel src {}/32 dst {}/32 proto udp dport {PORT}",
            s.id.src, s.id.dst
        );
        assert!(block.contains(&sel), "state {spi}: {sel}");
    }
    assert!(
        text.contains("limit: soft 1099511627776(bytes), hard 2199023255552(bytes)"),
        "byte limits"
    );
    assert!(
        text.contains("expire add: soft 3600(sec), hard 7200(sec)"),
        "time limits"
    );
    assert!(
        text.contains("limit: soft (INF)(bytes), hard (INF)(bytes)"),
        "no byte limit"
    );
}

#[test]
fn esp_put_policy_replaces_and_is_idempotent() {
    let ns = netns();
    ns.require_esp();
    let mut p = policies_of_a()[2].clone();
    let first = p.clone();
    p.priority = 1500;
    p.action = PolicyAction::Block;
    let second = p.clone();
    let (after_first, after_again, after_second) = ns.with_kernel(|k| async move {
        k.execute(&puts(std::slice::from_ref(&first)))
            .await
            .expect("put");
        let a = k.dump().await.expect("dump").policies;
        k.execute(&puts(std::slice::from_ref(&first)))
            .await
            .expect("put again");
        let b = k.dump().await.expect("dump").policies;
        k.execute(&[Change::PutPolicy {
            policy: second.clone(),
            replaces: Some(first.clone()),
        }])
        .await
        .expect("replace");
        (a, b, k.dump().await.expect("dump").policies)
    });
    assert_eq!(after_first, by_id_p(&policies_of_a()[2..3]));
    assert_eq!(after_again, after_first);
    assert_eq!(after_second, by_id_p(&[p]));
    assert_eq!(
        ns.ip("xfrm policy").matches("\tdir ").count(),
        1,
        "one policy for the selector"
    );
}

#[test]
fn esp_foreign_objects_are_left_alone() {
    let ns = netns();
    ns.require_esp();
    // strongSwan-like neighbours: reqid 1, one at a selector of ours (in catch-all).
    ns.ip("xfrm policy add src 198.51.100.0/24 dst 198.51.100.1/32 proto udp dport 500 dir in priority 10 tmpl proto esp mode transport reqid 1");
    ns.ip(&format!("xfrm policy add src 0.0.0.0/0 dst {A}/32 proto udp dport {PORT} dir in priority 5 tmpl proto esp mode transport reqid 1"));
    ns.ip("xfrm policy add src 198.51.100.0/24 dst 198.51.100.1/32 proto udp dport 501 dir in priority 10 action block");
    ns.ip(&format!(
        "xfrm state add src 198.51.100.2 dst 198.51.100.1 proto esp spi 0x3001 reqid 1 mode transport aead 'rfc4106(gcm(aes))' 0x{} 128",
        hex(&SaKey::generate().unwrap())
    ));
    let policies = policies_of_a();
    let ours = [
        sa(A, B, 0x1001, 128, Lifetime::default()),
        sa(B, A, 0x2001, 128, Lifetime::default()),
    ];
    let foreign_sa = SaId {
        src: ip("198.51.100.2"),
        dst: ip("198.51.100.1"),
        spi: 0x3001,
    };
    let foreign_policy = policies[1].id;
    let before_policies = ns.ip("xfrm policy");

    let mut changes: Vec<Change> = puts(&[
        policies[0].clone(),
        policies[2].clone(),
        policies[3].clone(),
    ]);
    changes.extend(ours.iter().cloned().map(Change::AddSa));
    let (dumped, foreign_slots, put_foreign, del_foreign, del_foreign_sa, after) =
        ns.with_kernel(|k| async move {
            k.execute(&changes).await.expect("execute");
            let dumped = k.dump().await.expect("dump");
            let foreign_slots = k.foreign_esp_slots();
            let put_foreign = k.execute(&puts(&[policies[1].clone()])).await;
            let del_foreign = k.execute(&[Change::DeletePolicy(foreign_policy)]).await;
            let del_foreign_sa = k.execute(&[Change::DeleteSa(foreign_sa)]).await;
            let mut deletes: Vec<Change> = ours.iter().map(|s| Change::DeleteSa(s.id)).collect();
            deletes.extend([0, 2, 3].map(|i| Change::DeletePolicy(policies[i].id)));
            k.execute(&deletes).await.expect("delete ours");
            // Deleting what is already gone is fine.
            k.execute(&deletes).await.expect("delete ours again");
            (
                dumped,
                foreign_slots,
                put_foreign,
                del_foreign,
                del_foreign_sa,
                k.dump().await.expect("dump"),
            )
        });
    assert_eq!(
        dumped.policies.len(),
        3,
        "only ours: {:?}",
        dumped.policies.keys()
    );
    assert!(dumped.policies.values().all(|p| p.reqid == R));
    // The foreign SA's slot is known (no SPI of ours is chosen or accepted there).
    assert_eq!(
        foreign_slots.into_iter().collect::<Vec<_>>(),
        vec![(ip("198.51.100.1"), 0x3001)]
    );
    assert_eq!(dumped.sas.keys().copied().collect::<Vec<_>>(), {
        let mut ids = vec![
            SaId {
                src: ip(A),
                dst: ip(B),
                spi: 0x1001,
            },
            SaId {
                src: ip(B),
                dst: ip(A),
                spi: 0x2001,
            },
        ];
        ids.sort();
        ids
    });
    for (what, result) in [
        ("put", put_foreign),
        ("delete", del_foreign),
        ("delete SA", del_foreign_sa),
    ] {
        match result {
            Err(KernelError::ForeignXfrm { .. }) => {}
            other => panic!("{what} over a foreign object: expected ForeignXfrm, got {other:?}"),
        }
    }
    assert!(
        after.policies.is_empty() && after.sas.is_empty(),
        "ours are gone"
    );
    assert_eq!(
        ns.ip("xfrm policy"),
        before_policies,
        "foreign policies untouched"
    );
    let states = ns.ip("xfrm state");
    assert!(
        states.contains("spi 0x00003001 reqid 1 mode transport"),
        "foreign state kept: {states}"
    );
    assert_eq!(
        states.matches("\tproto esp").count(),
        1,
        "only the foreign state is left"
    );
}

/// The XFRM layer's probe, on a connection of its own in the current namespace.
async fn probe_here(local: IpAddr) -> Result<(), KernelError> {
    let (conn, h, _) = xfrmnetlink::new_connection().expect("xfrm netlink connection");
    tokio::spawn(conn);
    ovl::kernel::xfrm::check_esp(&h, local).await
}

#[test]
fn esp_check_esp_leaves_nothing_behind() {
    let ns = netns();
    ns.require_esp();
    let (scratch, v4, v6, state) = ns.with_kernel(|k| async move {
        let scratch = k.check_esp(ip(A)).await;
        let v4 = probe_here(ip(A)).await;
        let v6 = probe_here(ip("2001:db8::1")).await;
        (scratch, v4, v6, k.dump().await.expect("dump"))
    });
    scratch.expect("Kernel::check_esp");
    v4.expect("xfrm::check_esp IPv4");
    v6.expect("xfrm::check_esp IPv6");
    assert_eq!(ns.ip("xfrm state"), "", "no state left");
    assert!(state.sas.is_empty());
}

#[test]
fn esp_ipv6_round_trip() {
    let ns = netns();
    ns.require_esp();
    let (a, b) = (ip("2001:db8::1"), ip("2001:db8::2"));
    let policies = vec![
        policy(Direction::Out, "::/0", "::/0", 2000, PolicyAction::Block),
        policy(
            Direction::In,
            "::/0",
            "2001:db8::1/128",
            2000,
            PolicyAction::Esp {
                src: None,
                dst: None,
            },
        ),
        policy(
            Direction::Out,
            "2001:db8::1/128",
            "2001:db8::2/128",
            1000,
            PolicyAction::Esp {
                src: Some(a),
                dst: Some(b),
            },
        ),
    ];
    let sas = [sa("2001:db8::1", "2001:db8::2", 0x1001, 128, LIMITS)];
    let mut changes = puts(&policies);
    changes.extend(sas.iter().cloned().map(Change::AddSa));
    let state = ns.with_kernel(|k| async move {
        k.execute(&changes).await.expect("execute");
        k.dump().await.expect("dump")
    });
    assert_eq!(state.policies, by_id_p(&policies));
    assert!(
        state.sas == by_id_s(&sas),
        "SAs round-trip (not printed: they hold keys)"
    );
    let text = ns.ip("xfrm state");
    assert!(
        text.contains("sel src 2001:db8::1/128 dst 2001:db8::2/128 proto udp dport 4790"),
        "{text}"
    );
}

/// Objects of ours changed by hand into a form we never install dump as `reqid: 0`, so
/// they never equal a desired object, and the plan's changes restore them.
#[test]
fn esp_hand_changed_objects_are_replaced() {
    let ns = netns();
    ns.require_esp();
    let p = policies_of_a()[3].clone();
    let good = sa(A, B, 0x5001, 128, Lifetime::default());
    let initial = vec![
        Change::PutPolicy {
            policy: p.clone(),
            replaces: None,
        },
        Change::AddSa(good.clone()),
    ];
    ns.with_kernel(|k| async move { k.execute(&initial).await.expect("execute") });
    // `level use` accepts plaintext; ICV 64 is not our AEAD setting.
    ns.ip(&format!(
        "xfrm policy update src {B}/32 dst {A}/32 proto udp dport {PORT} dir in priority 1000 \
         tmpl src {B} dst {A} proto esp mode transport reqid {R} level use"
    ));
    ns.ip(&format!(
        "xfrm state delete src {A} dst {B} proto esp spi 0x5001"
    ));
    ns.ip(&format!(
        "xfrm state add src {A} dst {B} proto esp spi 0x5001 reqid {R} mode transport flag esn replay-window 128 \
         aead 'rfc4106(gcm(aes))' 0x{} 64 sel src {A}/32 dst {B}/32 proto udp dport {PORT}",
        hex(&good.key)
    ));
    let (odd, fixed) = ns.with_kernel(|k| async move {
        let odd = k.dump().await.expect("dump");
        let observed = odd.policies.get(&p.id).cloned();
        let repair = vec![
            Change::PutPolicy {
                policy: p.clone(),
                replaces: observed,
            },
            Change::DeleteSa(good.id),
            Change::AddSa(good.clone()),
        ];
        k.execute(&repair).await.expect("repair");
        let fixed = k.dump().await.expect("dump");
        (odd, (fixed, p, good))
    });
    let (fixed, p, good) = fixed;
    assert_eq!(
        odd.policies.get(&p.id).map(|o| o.reqid),
        Some(0),
        "level use is not ours as installed"
    );
    assert_eq!(
        odd.sas.get(&good.id).map(|o| o.reqid),
        Some(0),
        "ICV 64 is not ours as installed"
    );
    assert_eq!(fixed.policies, by_id_p(&[p]));
    assert!(fixed.sas == by_id_s(&[good]), "SA restored");
    assert!(!ns.ip("xfrm policy").contains("level use"));
}

/// Two namespaces joined by a veth pair: A (192.0.2.1) and B (192.0.2.2).
fn pair() -> (Netns, Netns) {
    let (a, b) = (netns(), netns());
    ok(&format!(
        "ip -n {} link add va type veth peer name vb netns {}",
        a.name(),
        b.name()
    ));
    a.ip(&format!("addr add {A}/24 dev va"));
    b.ip(&format!("addr add {B}/24 dev vb"));
    a.ip("link set va up");
    b.ip("link set vb up");
    (a, b)
}

/// Sends one UDP datagram from `ns` to `dst:port` with bash's /dev/udp; whether it
/// went out, and bash's complaint if not.
fn send_udp(ns: &Netns, dst: &str, port: u16) -> (bool, String) {
    let out = sh(&format!(
        "ip netns exec {} bash -c 'echo ping >/dev/udp/{dst}/{port}'",
        ns.name()
    ));
    (
        out.status.success(),
        format!("{}{}", stdout(&out), stderr(&out)),
    )
}

/// Binds `addr:PORT` in the namespace, runs `send`, and says whether a datagram came in.
fn receives(ns: &Netns, addr: &str, send: impl FnOnce() + Send) -> bool {
    ns.with_kernel(|_k| async move {
        let sock = UdpSocket::bind((ip(addr), PORT)).expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(1500)))
            .expect("timeout");
        send();
        let mut buf = [0u8; 64];
        sock.recv(&mut buf).is_ok()
    })
}

#[test]
fn esp_block_and_require_policies_enforce() {
    let (a, b) = pair();
    a.require_esp();
    assert!(
        receives(&a, A, || assert!(send_udp(&b, A, PORT).0)),
        "control: plaintext arrives without policies"
    );

    let pa = policies_of_a();
    let pb = policies_of_b();
    // B: only the block catch-all out (with its ownership template).
    b.with_kernel(|k| async move { k.execute(&puts(&pb[..1])).await.expect("put") });
    let (sent, text) = send_udp(&b, A, PORT);
    assert!(
        !sent && text.contains("not permitted"),
        "block out drops at the sender: {text}"
    );
    assert!(send_udp(&b, A, PORT + 1).0, "other ports are not touched");
    b.with_kernel(|k| async move {
        k.execute(&[Change::DeletePolicy(policies_of_b()[0].id)])
            .await
            .expect("delete")
    });
    assert!(send_udp(&b, A, PORT).0, "the block policy is gone");
    // A: only the require-ESP catch-all in.
    a.with_kernel(|k| async move { k.execute(&puts(&pa[1..2])).await.expect("put") });
    assert!(
        !receives(&a, A, || assert!(send_udp(&b, A, PORT).0)),
        "require-ESP in drops plaintext"
    );
}

#[test]
fn esp_sas_carry_udp_between_namespaces() {
    let (a, b) = pair();
    a.require_esp();
    let ab = sa(A, B, 0x1001, 128, Lifetime::default());
    let ba = sa(B, A, 0x2001, 128, Lifetime::default());
    let mut on_a = puts(&policies_of_a());
    on_a.extend([Change::AddSa(ba.clone()), Change::AddSa(ab.clone())]);
    let mut on_b = puts(&policies_of_b());
    on_b.extend([Change::AddSa(ab.clone()), Change::AddSa(ba.clone())]);
    a.with_kernel(|k| async move { k.execute(&on_a).await.expect("execute on A") });
    b.with_kernel(|k| async move { k.execute(&on_b).await.expect("execute on B") });

    assert!(
        receives(&b, B, || assert!(send_udp(&a, B, PORT).0)),
        "A -> B over ESP"
    );
    assert!(
        receives(&a, A, || assert!(send_udp(&b, A, PORT).0)),
        "B -> A over ESP"
    );
    let stats = b.ip("-s xfrm state");
    let inbound = stats
        .split("\nsrc ")
        .find(|s| s.contains("spi 0x00001001"))
        .expect("A->B state on B");
    assert!(
        !inbound.contains("\n\t  0(bytes), 0(packets)"),
        "B decrypted with the A->B SA"
    );
}

/// Runs on any kernel: `check_esp` must agree with what `ip xfrm` finds, and leave no
/// state behind either way. On this project's hosts (no ESP) that is `NoEsp`; under
/// UML (`OVL_IN_UML=1`) it is success.
#[test]
fn check_esp_agrees_with_ip_xfrm() {
    let ns = netns();
    let esp = ns.has_esp();
    if std::env::var("OVL_IN_UML").as_deref() == Ok("1") {
        assert!(esp, "the UML guest should have ESP");
    }
    let results =
        ns.with_kernel(|k| async move { [k.check_esp(ip(A)).await, probe_here(ip(A)).await] });
    for result in results {
        match (esp, result) {
            (true, Ok(())) => {}
            (false, Err(KernelError::NoEsp { detail })) => {
                eprintln!("no ESP here, as expected: {detail}");
                assert!(!detail.is_empty());
            }
            (esp, other) => panic!("ip xfrm says ESP={esp}, check_esp says {other:?}"),
        }
    }
    assert_eq!(ns.ip("xfrm state"), "", "no state left");
}

/// A watched `Kernel` (as the agent has) sees every SA change, its own or made by hand
/// (deleted, added in a form we never install, flushed), and answers from its kept
/// view only while nothing changed.
#[test]
fn esp_watched_view_sees_every_sa_change() {
    let ns = netns();
    ns.require_esp();
    let good = sa(A, B, 0x5101, 128, Lifetime::default());
    let key = hex(&good.key);
    let ns = &ns;
    ns.block_on(move || async move {
        let k = ovl::kernel::Kernel::connect_watched().expect("connect_watched");
        let read = async || k.dump().await.expect("dump");
        let full = || k.watch_stats().expect("watch").full;
        assert!(read().await.sas.is_empty());
        k.execute(&[Change::AddSa(good.clone())])
            .await
            .expect("execute");
        let one = read().await;
        assert_eq!(
            one.sas,
            by_id_s(std::slice::from_ref(&good)),
            "our own write is seen"
        );
        assert_eq!(read().await, one);
        assert_eq!(full(), 2, "a quiet kernel is not read again");

        ns.ip(&format!(
            "xfrm state delete src {A} dst {B} proto esp spi 0x5101"
        ));
        assert!(read().await.sas.is_empty(), "a deletion by hand is seen");
        ns.ip(&format!(
            "xfrm state add src {A} dst {B} proto esp spi 0x5102 reqid {R} mode transport flag esn \
             replay-window 128 aead 'rfc4106(gcm(aes))' 0x{key} 64 sel src {A}/32 dst {B}/32"
        ));
        let odd = read().await;
        assert_eq!(
            odd.sas.values().map(|s| s.reqid).collect::<Vec<_>>(),
            [0],
            "{odd:?}"
        );
        ns.ip("xfrm state flush");
        assert!(read().await.sas.is_empty(), "a flush is seen");
        assert_eq!(full(), 5);
        assert!(read().await.sas.is_empty());
        assert_eq!(full(), 5);
    });
}
