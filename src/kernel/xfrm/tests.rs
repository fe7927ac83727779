//! Encoding and decoding without a kernel. What the kernel itself makes of these
//! messages is tested under UML by `integration/kernel_xfrm.rs`.

mod dump_parse;

use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_xfrm::{
    IPPROTO_ESP, IPPROTO_UDP, Mark, XFRM_INF, XFRM_MODE_TRANSPORT, XFRM_MODE_TUNNEL,
    XFRM_POLICY_ALLOW, XFRM_POLICY_BLOCK, XFRM_POLICY_FWD, XFRM_STATE_ESN, XfrmAttrs,
};

use netlink_packet_core::{Emitable, NLM_F_ACK, NLM_F_REQUEST};
use netlink_packet_xfrm::policy::ModifyMessage as PolicyMessage;
use netlink_packet_xfrm::state::ModifyMessage as StateMessage;

use super::exec::Ownership;
use super::sa::SaOccupant;
use super::{Owned, legacy, policy, sa};
use crate::kernel::KernelError;
use crate::keys::{SA_KEY_LEN, SaKey};
use crate::plan::Change;
use crate::state::{
    Direction, Lifetime, Policy, PolicyAction, PolicyId, Sa, SaId, Selector, ownership,
};

const R: u32 = ownership::REQID_MIN;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}
fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn pol(dir: Direction, src: &str, dst: &str, priority: u32, action: PolicyAction) -> Policy {
    let id = PolicyId {
        dir,
        selector: Selector {
            src: net(src),
            dst: net(dst),
            dport: 4790,
        },
    };
    Policy {
        id,
        priority,
        action,
        reqid: R,
    }
}

fn policies() -> Vec<Policy> {
    let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
    let (a6, b6) = (ip("2001:db8::1"), ip("2001:db8::2"));
    vec![
        pol(
            Direction::Out,
            "0.0.0.0/0",
            "0.0.0.0/0",
            2000,
            PolicyAction::Block,
        ),
        pol(
            Direction::In,
            "0.0.0.0/0",
            "192.0.2.1/32",
            2000,
            PolicyAction::Esp {
                src: None,
                dst: None,
            },
        ),
        pol(
            Direction::Out,
            "192.0.2.1/32",
            "192.0.2.2/32",
            1000,
            PolicyAction::Esp {
                src: Some(a),
                dst: Some(b),
            },
        ),
        pol(
            Direction::In,
            "192.0.2.2/32",
            "192.0.2.1/32",
            1000,
            PolicyAction::Esp {
                src: Some(b),
                dst: Some(a),
            },
        ),
        pol(Direction::Out, "::/0", "::/0", 2000, PolicyAction::Block),
        pol(
            Direction::Out,
            "2001:db8::1/128",
            "2001:db8::2/128",
            1000,
            PolicyAction::Esp {
                src: Some(a6),
                dst: Some(b6),
            },
        ),
    ]
}

/// Emits `m` as the kernel sends it in a dump.
fn emitted(m: &impl Emitable) -> Vec<u8> {
    let mut bytes = vec![0; m.buffer_len()];
    m.emit(&mut bytes);
    bytes
}

/// Decodes `m` as a policy dump reply, read in place; checks that the decoding of
/// whole `ModifyMessage`s it replaced agrees.
fn decode_policy(m: &PolicyMessage) -> Owned<Policy> {
    let bytes = emitted(m);
    let read = policy::PolicyReply::read(&bytes).unwrap();
    let decoded = policy::decode(&read);
    assert_eq!(decoded, legacy::policy::decode(m));
    assert_eq!(policy::occupant(&read), legacy::policy::occupant(m));
    decoded
}

/// Decodes `m` as a state dump reply, read in place; checks that the decoding of whole
/// `ModifyMessage`s it replaced agrees.
fn decode_sa(m: &StateMessage) -> Owned<Sa> {
    let bytes = emitted(m);
    let read = sa::StateReply::read(&bytes).unwrap();
    let decoded = sa::decode(&read);
    assert_eq!(decoded, legacy::sa::decode(m));
    assert_eq!(sa::occupant(&read), legacy::sa::occupant(m));
    decoded
}

fn ours<T: std::fmt::Debug>(o: Owned<T>) -> T {
    match o {
        Owned::Ours(t) => t,
        other => panic!("expected ours, got {other:?}"),
    }
}

#[test]
fn policies_round_trip() {
    for p in policies() {
        let m = policy::encode(&p).unwrap();
        assert_eq!(ours(decode_policy(&m)), p);
    }
}

#[test]
fn policy_encoding_is_the_documented_one() {
    let [block, catch_in, pair_out, ..] = &policies()[..] else {
        unreachable!()
    };
    let m = policy::encode(block).unwrap();
    let info = &m.user_policy_info;
    assert_eq!(info.action, XFRM_POLICY_BLOCK);
    assert_eq!(
        (
            info.selector.proto,
            info.selector.dport,
            info.selector.dport_mask
        ),
        (IPPROTO_UDP, 4790, 0xffff)
    );
    assert_eq!((info.selector.sport, info.selector.sport_mask), (0, 0));
    assert_eq!(info.priority, 2000);
    let [XfrmAttrs::Template(t)] = &m.nlas[..] else {
        panic!("one template attribute")
    };
    assert_eq!(t.len(), 1);
    assert_eq!(
        (t[0].reqid, t[0].id.proto, t[0].mode, t[0].optional),
        (R, IPPROTO_ESP, XFRM_MODE_TRANSPORT, 0)
    );
    assert_eq!([t[0].aalgos, t[0].ealgos, t[0].calgos], [u32::MAX; 3]);
    assert_eq!(t[0].family, info.selector.family);

    let m = policy::encode(catch_in).unwrap();
    assert_eq!(m.user_policy_info.action, XFRM_POLICY_ALLOW);
    let [XfrmAttrs::Template(t)] = &m.nlas[..] else {
        panic!("one template attribute")
    };
    assert_eq!((t[0].saddr.addr, t[0].id.daddr.addr), ([0; 16], [0; 16]));

    let m = policy::encode(pair_out).unwrap();
    let [XfrmAttrs::Template(t)] = &m.nlas[..] else {
        panic!("one template attribute")
    };
    assert_eq!(&t[0].saddr.addr[..4], &[192, 0, 2, 1]);
    assert_eq!(&t[0].id.daddr.addr[..4], &[192, 0, 2, 2]);
}

#[test]
fn foreign_and_odd_policies() {
    let p = &policies()[2];
    let mut m = policy::encode(p).unwrap();
    if let XfrmAttrs::Template(t) = &mut m.nlas[0] {
        t[0].reqid = 1;
    }
    assert!(matches!(decode_policy(&m), Owned::Foreign));
    m.nlas.clear();
    assert!(
        matches!(decode_policy(&m), Owned::Foreign),
        "no template, no owner"
    );

    // `level use` would accept plaintext: ours, but never equal to what we want.
    let mut m = policy::encode(p).unwrap();
    if let XfrmAttrs::Template(t) = &mut m.nlas[0] {
        t[0].optional = 1;
    }
    let got = ours(decode_policy(&m));
    assert_eq!(got.reqid, 0);
    assert_eq!(Policy { reqid: R, ..got }, *p);

    let mut m = policy::encode(p).unwrap();
    if let XfrmAttrs::Template(t) = &mut m.nlas[0] {
        t[0].mode = XFRM_MODE_TUNNEL;
    }
    assert_eq!(ours(decode_policy(&m)).reqid, 0);

    let mut m = policy::encode(p).unwrap();
    m.nlas.push(XfrmAttrs::Mark(Mark {
        value: 1,
        mask: 0xff,
    }));
    assert!(matches!(decode_policy(&m), Owned::Unaddressable { .. }));

    let mut m = policy::encode(p).unwrap();
    m.user_policy_info.direction = XFRM_POLICY_FWD;
    assert!(matches!(decode_policy(&m), Owned::Unaddressable { .. }));

    let mut m = policy::encode(p).unwrap();
    m.user_policy_info.selector.sport_mask = 0xffff;
    assert!(matches!(decode_policy(&m), Owned::Unaddressable { .. }));
}

#[test]
fn policy_encoding_refuses_what_would_not_be_ours_or_valid() {
    let mut p = policies()[0].clone();
    p.reqid = 7;
    assert!(policy::encode(&p).is_err());
    let mut p = policies()[0].clone();
    p.id.selector.dst = net("::/0");
    assert!(policy::encode(&p).is_err());
    let mut p = policies()[2].clone();
    p.action = PolicyAction::Esp {
        src: Some(ip("2001:db8::1")),
        dst: None,
    };
    assert!(policy::encode(&p).is_err());
}

fn an_sa(src: &str, dst: &str, lifetime: Lifetime) -> Sa {
    Sa {
        id: SaId {
            src: ip(src),
            dst: ip(dst),
            spi: 0x1234_5678,
        },
        reqid: R,
        key: SaKey::generate().unwrap(),
        replay_window: 128,
        dport: 4790,
        lifetime,
    }
}

#[test]
fn sas_round_trip() {
    let limits = Lifetime {
        soft_bytes: 1 << 40,
        hard_bytes: 1 << 41,
        soft_packets: 1 << 30,
        hard_packets: 1 << 31,
        soft_add_seconds: 3600,
        hard_add_seconds: 7200,
    };
    for s in [
        an_sa("192.0.2.1", "192.0.2.2", Lifetime::default()),
        an_sa("192.0.2.1", "192.0.2.2", limits),
        an_sa("2001:db8::1", "2001:db8::2", limits),
    ] {
        let m = sa::encode(&s).unwrap();
        assert_eq!(ours(decode_sa(&m)), s);
    }
}

#[test]
fn sa_encoding_is_the_documented_one() {
    let s = an_sa(
        "192.0.2.1",
        "192.0.2.2",
        Lifetime {
            hard_add_seconds: 60,
            ..Lifetime::default()
        },
    );
    let m = sa::encode(&s).unwrap();
    let info = &m.user_sa_info;
    assert_eq!(
        (info.id.proto, info.mode, info.reqid, info.id.spi),
        (IPPROTO_ESP, XFRM_MODE_TRANSPORT, R, 0x1234_5678)
    );
    assert_eq!((info.flags, info.replay_window), (XFRM_STATE_ESN, 0));
    let sel = &info.selector;
    assert_eq!(
        (
            sel.prefixlen_s,
            sel.prefixlen_d,
            sel.proto,
            sel.dport,
            sel.dport_mask
        ),
        (32, 32, IPPROTO_UDP, 4790, 0xffff)
    );
    assert_eq!(sel.sport_mask, 0);
    let c = &info.lifetime_cfg;
    assert_eq!(
        (c.soft_byte_limit, c.hard_packet_limit),
        (XFRM_INF, XFRM_INF)
    );
    assert_eq!(
        (c.soft_add_expires_seconds, c.hard_add_expires_seconds),
        (0, 60)
    );
    let aead = m.nlas.iter().find_map(|a| match a {
        XfrmAttrs::EncryptionAlgAead(a) => Some(a),
        _ => None,
    });
    let aead = aead.unwrap();
    assert!(aead.alg_name.starts_with(b"rfc4106(gcm(aes))\0"));
    assert_eq!((aead.alg_key_len, aead.alg_icv_len), (288, 128));
    assert_eq!(aead.alg_key, s.key.expose().to_vec());
    let esn = m.nlas.iter().find_map(|a| match a {
        XfrmAttrs::ReplayStateEsn(r) => Some(r),
        _ => None,
    });
    assert_eq!(esn.map(|r| (r.bmp_len, r.replay_window)), Some((4, 128)));
}

#[test]
fn odd_and_foreign_sas() {
    let s = an_sa("192.0.2.1", "192.0.2.2", Lifetime::default());
    let mut m = sa::encode(&s).unwrap();
    m.user_sa_info.reqid = 1;
    assert!(matches!(decode_sa(&m), Owned::Foreign));

    // A larval state (after ALLOCSPI) has no key yet.
    let mut m = sa::encode(&s).unwrap();
    m.nlas
        .retain(|a| !matches!(a, XfrmAttrs::EncryptionAlgAead(_)));
    let got = ours(decode_sa(&m));
    assert_eq!((got.id, got.reqid), (s.id, 0));
    assert_eq!(got.key.expose(), &[0; SA_KEY_LEN]);

    let mut m = sa::encode(&s).unwrap();
    m.user_sa_info.flags = 0;
    assert_eq!(ours(decode_sa(&m)).reqid, 0);

    let mut m = sa::encode(&s).unwrap();
    m.nlas.push(XfrmAttrs::Mark(Mark {
        value: 5,
        mask: 0xff,
    }));
    assert!(matches!(decode_sa(&m), Owned::Unaddressable { .. }));

    let mut bad = s.clone();
    bad.reqid = 0;
    assert!(sa::encode(&bad).is_err());
    let mut bad = s.clone();
    bad.id.dst = ip("2001:db8::2");
    assert!(sa::encode(&bad).is_err());
}

#[test]
fn scrub_zeroes_keys() {
    let s = an_sa("192.0.2.1", "192.0.2.2", Lifetime::default());
    let mut m = sa::encode(&s).unwrap();
    sa::scrub(&mut m);
    for a in &m.nlas {
        if let XfrmAttrs::EncryptionAlgAead(a) = a {
            assert!(a.alg_key.iter().all(|b| *b == 0));
        }
    }
}

#[tokio::test]
async fn other_changes_are_refused() {
    let mut socket =
        crate::kernel::batch::BatchSocket::open(netlink_sys::constants::NETLINK_XFRM).unwrap();
    let change = crate::plan::Change::SetUp {
        link: "ovbr-1".parse().unwrap(),
    };
    let mut ownership = super::Ownership::load(&mut socket, std::slice::from_ref(&change))
        .await
        .unwrap();
    let err = ownership.prepare(&change, 0).err().unwrap();
    assert!(
        matches!(err, crate::kernel::KernelError::Unsupported { .. }),
        "{err}"
    );
}

// --- requests from the ownership view (no kernel: the view is given) ---

const XFRM_MSG_NEWSA: u16 = 16;
const XFRM_MSG_DELSA: u16 = 17;
const XFRM_MSG_NEWPOLICY: u16 = 19;
const XFRM_MSG_DELPOLICY: u16 = 20;
const XFRM_MSG_UPDPOLICY: u16 = 25;

/// Message type and flags of a request, or None when nothing is sent.
fn sent(o: &mut Ownership, change: &Change) -> Result<Option<(u16, u16)>, KernelError> {
    // The view is complete: preparing needs no kernel.
    let request = o.prepare(change, 7)?;
    Ok(request.map(|r| {
        assert_eq!(r.tag, 7);
        let kind = u16::from_ne_bytes([r.bytes[4], r.bytes[5]]);
        let flags = u16::from_ne_bytes([r.bytes[6], r.bytes[7]]);
        (kind, flags)
    }))
}

#[test]
fn policy_requests_follow_the_dumped_owner() {
    let ps = policies();
    let (ours, theirs, free) = (&ps[0], &ps[1], &ps[2]);
    let mut o = Ownership::with(
        [
            (ours.id, super::Occupant::Ours),
            (
                theirs.id,
                super::Occupant::Foreign {
                    detail: "template reqid 1".into(),
                },
            ),
        ],
        [],
    );
    let put = |p: &Policy| Change::PutPolicy {
        policy: p.clone(),
        replaces: None,
    };
    let acked = NLM_F_REQUEST | NLM_F_ACK;
    assert_eq!(
        sent(&mut o, &put(free)).unwrap(),
        Some((XFRM_MSG_NEWPOLICY, acked))
    );
    assert_eq!(
        sent(&mut o, &put(ours)).unwrap(),
        Some((XFRM_MSG_UPDPOLICY, acked))
    );
    // Put once, the free slot is ours: a second put replaces.
    assert_eq!(
        sent(&mut o, &put(free)).unwrap(),
        Some((XFRM_MSG_UPDPOLICY, acked))
    );
    let err = sent(&mut o, &put(theirs)).unwrap_err();
    assert!(
        matches!(err, KernelError::ForeignXfrm { what: "policy", .. }),
        "{err}"
    );
    let err = sent(&mut o, &Change::DeletePolicy(theirs.id)).unwrap_err();
    assert!(matches!(err, KernelError::ForeignXfrm { .. }), "{err}");
    assert_eq!(
        sent(&mut o, &Change::DeletePolicy(ours.id)).unwrap(),
        Some((XFRM_MSG_DELPOLICY, acked))
    );
    // Gone now: deleting again sends nothing.
    assert_eq!(sent(&mut o, &Change::DeletePolicy(ours.id)).unwrap(), None);
}

#[test]
fn sa_requests_follow_the_dumped_owner() {
    let s = an_sa("192.0.2.1", "192.0.2.2", Lifetime::default());
    let foreign = SaId {
        spi: 0x3001,
        ..s.id
    };
    let other_src = SaId {
        src: ip("192.0.2.9"),
        spi: 0x4001,
        ..s.id
    };
    let occupant = |reqid, src| SaOccupant {
        reqid,
        src: Some(ip(src)),
    };
    let mut o = Ownership::with(
        [],
        [
            ((foreign.dst, foreign.spi), occupant(1, "192.0.2.1")),
            ((other_src.dst, other_src.spi), occupant(R, "192.0.2.1")),
        ],
    );
    let acked = NLM_F_REQUEST | NLM_F_ACK;
    // Added: the kernel itself refuses a taken (dst, SPI), no check needed.
    assert_eq!(
        sent(&mut o, &Change::AddSa(s.clone())).unwrap(),
        Some((XFRM_MSG_NEWSA, acked))
    );
    assert_eq!(
        sent(&mut o, &Change::DeleteSa(s.id)).unwrap(),
        Some((XFRM_MSG_DELSA, acked))
    );
    assert_eq!(
        sent(&mut o, &Change::DeleteSa(s.id)).unwrap(),
        None,
        "already gone"
    );
    let err = sent(&mut o, &Change::DeleteSa(foreign)).unwrap_err();
    assert!(
        matches!(err, KernelError::ForeignXfrm { what: "state", .. }),
        "{err}"
    );
    assert_eq!(
        sent(&mut o, &Change::DeleteSa(other_src)).unwrap(),
        None,
        "ours with another source is not the SA meant"
    );
}
