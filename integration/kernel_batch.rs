//! `Kernel::execute` with large plans: many requests per `send()` must still install
//! exactly the plan, in the plan's order, stop at the first failing change and name it.
//! Checked with the kernel's own view (`ip xfrm ... count`, `bridge fdb`) and a dump
//! round trip.
//!
//! These tests need ESP (`rfc4106(gcm(aes))`): run them inside user-mode-linux,
//!
//! ```text
//! cargo test --test kernel_batch --no-run      # prints the binary's path
//! scripts/uml-run.sh -- target/debug/deps/kernel_batch-<hash> --test-threads=1
//! ```
//!
//! Without ESP they fail (never pass silently). Each test runs in a fresh named network
//! namespace, entered with `setns` by the test's own thread before it builds a
//! current-thread runtime and opens the `Kernel`.

mod common;

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use common::netns::{Netns, hex};
use ovl::desired::{self, DirectionKey, Keyring, LocalNode, PeerKeys, Scope};
use ovl::kernel::KernelError;
use ovl::keys::SaKey;
use ovl::plan::{self, Change};
use ovl::reconcile::{self, Keys, Outcome, ReconcileError};
use ovl::spec::{PublicKey, Spec};
use ovl::state::{KernelState, Sa, SaId};

const LOCAL: &str = "198.18.0.1";
const PORT: u16 = 4790;

// --- harness --------------------------------------------------------------------------

/// A fresh namespace (see [`Netns::new`]) with an underlay (`ul0`, 198.18.0.1/15).
fn netns() -> Netns {
    let ns = Netns::new("ovlb");
    ns.ip("link add ul0 type veth peer name ul1");
    ns.ip(&format!("addr add {LOCAL}/15 dev ul0"));
    ns.ip("link set ul1 up");
    ns.ip("link set ul0 up");
    ns
}

/// One reconcile pass for node-0 with these keys, inside the namespace.
fn apply(ns: &Netns, spec: &Spec, ring: &Keyring) -> Result<Outcome, ReconcileError> {
    ns.with_kernel(|k| async move {
        let me = &spec.nodes[0];
        reconcile::apply(spec, me, &k, Keys::Ring(ring), false).await
    })
}

/// After an obstacle was removed: the next pass succeeds and the one after it has
/// nothing left to do.
fn converges_after_repair(ns: &Netns, spec: &Spec, ring: &Keyring) {
    apply(ns, spec, ring).unwrap_or_else(|e| panic!("apply after repair: {e}"));
    let again = apply(ns, spec, ring).unwrap_or_else(|e| panic!("apply: {e}"));
    assert!(again.plan.is_empty(), "converged: {}", again.plan);
}

// --- the cluster ----------------------------------------------------------------------

fn peer(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(198, 18, 0, 1)) + i as u32,
    ))
}

/// node-0 (198.18.0.1, this namespace) and `peers` others; an encrypted network (VNI
/// 100) and a plaintext one (VNI 200) over all of them, with an address for node-0 on
/// each.
fn spec(peers: usize) -> Spec {
    let mut yaml = String::from("apiVersion: ovl/v1\ncluster:\n  name: batch\nnodes:\n");
    for i in 0..=peers {
        let mut key = [0u8; 32];
        // Distinct per node and never a low-order point (those are refused).
        key[0] = 9;
        key[8..16].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        let _ = writeln!(
            yaml,
            "  - name: node-{i}\n    address: {}\n    publicKey: \"{}\"",
            peer(i),
            PublicKey(key).to_base64()
        );
    }
    yaml.push_str(
        "networks:\n\
         \x20 - name: enc\n    vni: 100\n    encrypted: true\n    addresses:\n      node-0: 10.100.0.1/16\n\
         \x20 - name: plain\n    vni: 200\n    addresses:\n      node-0: 10.200.0.1/16\n",
    );
    ovl::spec::parse(yaml.as_bytes(), "batch.yaml").unwrap_or_else(|e| panic!("{e}"))
}

/// Node-0's keys: one inbound and one outbound SA per peer.
fn ring(spec: &Spec) -> Keyring {
    spec.nodes
        .iter()
        .skip(1)
        .enumerate()
        .map(|(i, n)| {
            let spi = 0x0100_0000 + 2 * i as u32;
            let keys = PeerKeys {
                inbound: vec![DirectionKey {
                    spi,
                    key: SaKey::generate().unwrap(),
                }],
                outbound: vec![DirectionKey {
                    spi: spi + 1,
                    key: SaKey::generate().unwrap(),
                }],
            };
            (n.address, keys)
        })
        .collect()
}

/// What node-0's namespace must hold (the underlay is `ul0`, MTU 1500).
fn desired_state(spec: &Spec, ring: &Keyring) -> KernelState {
    let local = LocalNode {
        node: &spec.nodes[0],
        underlay: "ul0".parse().unwrap(),
        underlay_mtu: 1500,
    };
    desired::build(spec, &local, ring, Scope::All).unwrap_or_else(|e| panic!("{e}"))
}

/// The inbound SA node-0 gets from peer `i`, as the plan adds it.
fn inbound_sa(spec: &Spec, ring: &Keyring, i: usize) -> Sa {
    let id = SaId {
        src: peer(i),
        dst: LOCAL.parse().unwrap(),
        spi: ring[&peer(i)].inbound[0].spi,
    };
    desired_state(spec, ring).sas[&id].clone()
}

// --- tests ----------------------------------------------------------------------------

/// 600 peers: 1202 policies, 1200 SAs, 1200 FDB entries, four links, two addresses,
/// several buffers of requests per phase. Everything arrives, the dump round-trips,
/// and a second pass has nothing to do.
#[test]
fn esp_large_plan_is_applied_whole() {
    const PEERS: usize = 600;
    let ns = netns();
    ns.require_esp();
    let spec = spec(PEERS);
    let ring = ring(&spec);
    let want = desired_state(&spec, &ring);

    let out = apply(&ns, &spec, &ring).unwrap_or_else(|e| panic!("apply: {e}"));
    let changes = out.plan.changes.len();
    assert!(changes > 4 * PEERS, "a plan of {changes} changes");

    assert_eq!(ns.sa_count(), 2 * PEERS, "ip xfrm state count");
    assert_eq!(
        ns.policy_count(),
        (PEERS + 1, PEERS + 1),
        "ip xfrm policy count: per peer one each way, and the two catch-alls"
    );
    assert_eq!(ns.zero_fdb("ovvx-100").len(), PEERS);
    assert_eq!(ns.zero_fdb("ovvx-200").len(), PEERS);
    for link in ["ovbr-100", "ovvx-100", "ovbr-200", "ovvx-200"] {
        let text = ns.ip(&format!("link show {link}"));
        assert!(text.contains(",UP"), "{link} is up: {text}");
    }
    assert!(ns.ip("addr show ovbr-100").contains("10.100.0.1/16"));

    let got = ns.dump();
    assert_eq!(got.links, want.links);
    assert_eq!(got.addresses, want.addresses);
    assert_eq!(got.fdb, want.fdb);
    assert_eq!(got.policies, want.policies);
    assert!(
        got.sas == want.sas,
        "SAs round-trip (not printed: they hold keys); {} dumped, {} wanted",
        got.sas.len(),
        want.sas.len()
    );

    let again = apply(&ns, &spec, &ring).unwrap_or_else(|e| panic!("apply: {e}"));
    assert!(again.plan.is_empty(), "second pass: {}", again.plan);
}

/// A foreign SA sits on the (destination, SPI) of one inbound SA in the middle of the
/// plan's SA phase: the kernel refuses that NEWSA (EEXIST), the error names exactly
/// that change, the foreign SA is untouched and no later phase ran. Once the obstacle
/// is gone, the next pass converges.
#[test]
fn esp_foreign_sa_mid_batch_is_reported_and_repaired() {
    const PEERS: usize = 300;
    let ns = netns();
    ns.require_esp();
    let spec = spec(PEERS);
    let ring = ring(&spec);
    let victim = inbound_sa(&spec, &ring, PEERS / 2);
    let (src, dst, spi) = (victim.id.src, victim.id.dst, victim.id.spi);
    let foreign_key = hex(&SaKey::generate().unwrap());
    ns.ip(&format!(
        "xfrm state add src {src} dst {dst} proto esp spi 0x{spi:08x} reqid 1 mode transport \
         aead 'rfc4106(gcm(aes))' 0x{foreign_key} 128"
    ));

    let err = match apply(&ns, &spec, &ring) {
        Ok(out) => panic!(
            "apply succeeded over a foreign SA: {}",
            out.plan.changes.len()
        ),
        Err(e) => e,
    };
    let text = err.to_string();
    let change = Change::AddSa(victim.clone()).to_string();
    assert!(
        text.contains(&change),
        "the error names the change {change:?}: {text}"
    );
    match &err {
        ReconcileError::Execute { source, plan } => {
            assert_eq!(source.errno(), Some(libc::EEXIST), "{text}");
            assert!(
                plan.changes.contains(&Change::AddSa(victim.clone())),
                "carries its plan"
            );
        }
        other => panic!("expected the kernel's refusal, got {other}"),
    }
    let report = err.plan_report().expect("a plan to show");
    assert!(report.contains(&change), "the plan is shown: {report}");
    assert!(!report.contains(&foreign_key), "no key in the plan shown");
    assert!(!text.contains(&foreign_key), "no key in the error");

    let state = ns.ip(&format!(
        "-s xfrm state get src {src} dst {dst} proto esp spi 0x{spi:08x}"
    ));
    assert!(
        state.contains("reqid 1(0x00000001)"),
        "foreign SA kept (its reqid)"
    );
    assert!(state.contains(&foreign_key), "foreign SA's key unchanged");
    // Later phases (links, FDB) never started.
    assert!(
        !ns.ip("link show").contains("ovvx-"),
        "no link created after the failure"
    );

    ns.ip(&format!(
        "xfrm state delete src {src} dst {dst} proto esp spi 0x{spi:08x}"
    ));
    converges_after_repair(&ns, &spec, &ring);
    assert_eq!(ns.sa_count(), 2 * PEERS);
    assert!(
        ns.dump().sas == desired_state(&spec, &ring).sas,
        "SAs as desired"
    );
}

/// A foreign policy holds the slot of one per-pair policy in the middle of the policy
/// phase: the executor refuses it before sending (ForeignXfrm, naming the change), after
/// the policies queued before it were sent and acknowledged; nothing after it in the
/// plan is sent. Removing the foreign policy lets the next pass converge.
#[test]
fn esp_foreign_policy_mid_batch_stops_before_it() {
    const PEERS: usize = 300;
    let ns = netns();
    ns.require_esp();
    let spec = spec(PEERS);
    let ring = ring(&spec);
    let want = desired_state(&spec, &ring);
    let plan = plan::plan(&want, &KernelState::default());
    let from = peer(PEERS / 2);
    let (index, victim) = plan
        .changes
        .iter()
        .enumerate()
        .find(|(_, c)| matches!(c, Change::PutPolicy { policy, .. } if policy.id.selector.src.addr() == from))
        .expect("a policy for the peer");
    let before = index; // every change before it is a policy put
    assert!(
        plan.changes[..index]
            .iter()
            .all(|c| matches!(c, Change::PutPolicy { .. })),
        "policies come first in a cold plan"
    );
    ns.ip(&format!(
        "xfrm policy add src {from}/32 dst {LOCAL}/32 proto udp dport {PORT} dir in priority 5 \
         tmpl proto esp mode transport reqid 1"
    ));

    let err = match apply(&ns, &spec, &ring) {
        Ok(_) => panic!("apply succeeded over a foreign policy"),
        Err(e) => e,
    };
    let text = err.to_string();
    assert!(
        matches!(
            &err,
            ReconcileError::Execute {
                source: KernelError::ForeignXfrm { .. },
                ..
            }
        ),
        "{text}"
    );
    assert!(text.contains(&victim.to_string()), "names {victim}: {text}");

    let (inbound, outbound) = ns.policy_count();
    assert_eq!(
        inbound + outbound,
        before + 1,
        "exactly the {before} policies before it, and the foreign one"
    );
    assert_eq!(ns.sa_count(), 0, "the SA phase never started");
    let foreign = ns.ip(&format!(
        "xfrm policy get src {from}/32 dst {LOCAL}/32 proto udp dport {PORT} dir in"
    ));
    assert!(
        foreign.contains("priority 5") && foreign.contains("reqid 1 "),
        "foreign policy untouched: {foreign}"
    );

    ns.ip(&format!(
        "xfrm policy delete src {from}/32 dst {LOCAL}/32 proto udp dport {PORT} dir in"
    ));
    converges_after_repair(&ns, &spec, &ring);
    assert_eq!(ns.dump().policies, want.policies);
}
