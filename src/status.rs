//! What the kernel holds for us, explained: per network its devices, MTU, address and
//! peers; per pair the SAs by SPI. Never a key.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::state::{Direction, KernelState, LinkKind, PolicyAction};

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    pub networks: Vec<NetworkStatus>,
    pub policies: Vec<PolicyStatus>,
    pub sas: Vec<SaStatus>,
    /// The kernel's non-zero XFRM error counters, each with what it usually means.
    #[serde(default)]
    pub xfrm_errors: Vec<XfrmError>,
    /// Set when the status came from a running agent (`null` without one).
    #[serde(default)]
    pub agent: Option<AgentStatus>,
    /// The kernel kept changing while it was read (a large change was being carried
    /// out): the view may be off by what changed meanwhile.
    #[serde(default)]
    pub kernel_changing: bool,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct XfrmError {
    pub counter: String,
    pub value: u64,
    pub hint: String,
}

/// What a non-zero `/proc/net/xfrm_stat` counter usually means on an overlay node.
pub fn xfrm_hint(counter: &str) -> &'static str {
    match counter {
        "XfrmInNoStates" => {
            "ESP arrived for an SPI we do not hold: a peer sends with a key we do not have (stale peer state, or a rotation raced)"
        }
        "XfrmInStateProtoError" => {
            "ESP failed to decrypt or authenticate (bad ICV): tampered packets, or the two ends disagree on the key"
        }
        "XfrmInStateSeqError" => {
            "ESP outside the anti-replay window: replayed or very late packets"
        }
        "XfrmInStateMismatch" => {
            "decrypted traffic did not match its SA's pair: a member sent with another member's address (spoofing)"
        }
        "XfrmInTmplMismatch" => {
            "traffic to the encrypted port arrived without the required ESP (plaintext VXLAN was dropped)"
        }
        "XfrmInNoPols" => "inbound traffic matched no policy",
        "XfrmInPolBlock" => "inbound traffic was blocked by a policy",
        "XfrmInStateExpired" | "XfrmOutStateExpired" => {
            "an SA reached its hard lifetime before a rekey: is every agent running?"
        }
        "XfrmOutNoStates" => {
            "traffic for a peer with no outbound SA yet was dropped (keys not agreed: is the peer's agent running?)"
        }
        "XfrmOutPolBlock" => {
            "traffic to the encrypted port with no keyed peer was blocked (fail closed)"
        }
        "XfrmOutStateSeqError" => "an outbound sequence number overflowed",
        "XfrmInBufferError" | "XfrmInError" | "XfrmOutError" => {
            "out of memory or another local error in the IPsec path"
        }
        "XfrmAcquireError" => "the kernel asked for an SA no key manager could supply",
        _ => "see the kernel's Documentation/networking/xfrm_proc.rst",
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentStatus {
    pub node: String,
    pub cluster: String,
    pub uptime_secs: u64,
    /// The last reconcile pass succeeded.
    pub in_sync: bool,
    pub last_error: Option<String>,
    pub boot_id: String,
    pub peers: Vec<PeerStatus>,
    /// Set when the agent was carrying out a change (an apply or delete) when asked:
    /// the kernel view is current, the agent's own part (`in_sync`, `peers`) is as of
    /// the change's start.
    #[serde(default)]
    pub busy: Option<Busy>,
}

/// What a busy agent is doing, and for how long it has been at it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Busy {
    /// `apply` or `delete` (with ` (dry run)` for a dry run).
    pub what: String,
    pub secs: u64,
}

/// One encrypted peer: its control session and, per direction, the keys in use (by
/// generation and SPI; never the key).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerStatus {
    pub name: String,
    pub address: String,
    pub connected: bool,
    pub connected_secs: Option<u64>,
    pub inbound: Vec<KeyStatus>,
    pub outbound: Vec<KeyStatus>,
    pub next_rotation_secs: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyStatus {
    pub generation: u64,
    pub spi: String,
    pub age_secs: u64,
    /// offered, active, adopted, retiring.
    pub state: String,
    /// The SA's usage so far, from the kernel.
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub packets: u64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkStatus {
    pub name: String,
    pub cluster: String,
    pub vni: Option<u32>,
    pub bridge: Option<String>,
    pub vxlan: Option<String>,
    pub mtu: Option<u32>,
    pub up: bool,
    pub encrypted_port: Option<u16>,
    pub local: Option<String>,
    pub addresses: Vec<String>,
    pub peers: Vec<String>,
    /// What is wrong, in words, when something is.
    pub problems: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicyStatus {
    pub dir: String,
    pub src: String,
    pub dst: String,
    pub dport: u16,
    pub priority: u32,
    pub action: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SaStatus {
    pub src: String,
    pub dst: String,
    pub spi: String,
    pub replay_window: u32,
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub packets: u64,
    #[serde(default)]
    pub age_secs: u64,
}

impl Status {
    pub fn from_kernel(state: &KernelState) -> Status {
        let mut nets: BTreeMap<String, NetworkStatus> = BTreeMap::new();
        for link in state.links.values() {
            let name = link.network_from_alias().unwrap_or("?").to_owned();
            let entry = nets.entry(name.clone()).or_insert_with(|| NetworkStatus {
                name,
                cluster: link.cluster_from_alias().unwrap_or("?").to_owned(),
                vni: None,
                bridge: None,
                vxlan: None,
                mtu: None,
                up: true,
                encrypted_port: None,
                local: None,
                addresses: vec![],
                peers: vec![],
                problems: vec![],
            });
            entry.up &= link.up;
            if !link.up {
                entry.problems.push(format!("{} is down", link.name));
            }
            match &link.kind {
                LinkKind::Bridge => {
                    entry.bridge = Some(link.name.to_string());
                    entry.mtu = Some(link.mtu);
                    entry.addresses = state
                        .addresses
                        .iter()
                        .filter(|a| a.link == link.name)
                        .map(|a| a.addr.to_string())
                        .collect();
                }
                LinkKind::Vxlan(v) => {
                    entry.vxlan = Some(link.name.to_string());
                    entry.vni = Some(v.vni);
                    entry.local = Some(v.local.to_string());
                    entry.peers = state
                        .fdb
                        .iter()
                        .filter(|e| e.link == link.name)
                        .map(|e| e.remote.to_string())
                        .collect();
                    let enc = state
                        .policies
                        .values()
                        .any(|p| p.id.selector.dport == v.port);
                    entry.encrypted_port = enc.then_some(v.port);
                    if link.master.is_none() {
                        entry
                            .problems
                            .push(format!("{} is not on a bridge", link.name));
                    }
                }
            }
        }
        for n in nets.values_mut() {
            if n.bridge.is_none() {
                n.problems.push("bridge missing".into());
            }
            if n.vxlan.is_none() {
                n.problems.push("vxlan device missing".into());
            }
        }
        let policies = state
            .policies
            .values()
            .map(|p| PolicyStatus {
                dir: p.id.dir.to_string(),
                src: p.id.selector.src.to_string(),
                dst: p.id.selector.dst.to_string(),
                dport: p.id.selector.dport,
                priority: p.priority,
                action: match p.action {
                    PolicyAction::Block => "block".into(),
                    PolicyAction::Esp { src: None, .. } => "require esp".into(),
                    PolicyAction::Esp { .. } => "esp".into(),
                },
            })
            .collect();
        let sas = state
            .sas
            .values()
            .map(|sa| SaStatus {
                src: sa.id.src.to_string(),
                dst: sa.id.dst.to_string(),
                spi: format!("0x{:08x}", sa.id.spi),
                replay_window: sa.replay_window,
                bytes: 0,
                packets: 0,
                age_secs: 0,
            })
            .collect();
        Status {
            networks: nets.into_values().collect(),
            policies,
            sas,
            xfrm_errors: Vec::new(),
            agent: None,
            kernel_changing: false,
        }
    }

    /// Fills in the SAs' usage and age from the kernel's counters.
    pub fn with_counters(
        mut self,
        counters: &BTreeMap<crate::state::SaId, crate::kernel::counters::SaCounters>,
        now_unix: u64,
    ) -> Status {
        // By the SA's shown identity, looked up once each (thousands of SAs at scale).
        let by_shown: BTreeMap<(String, String, String), &crate::kernel::counters::SaCounters> =
            counters
                .iter()
                .map(|(id, c)| {
                    let shown = (
                        id.src.to_string(),
                        id.dst.to_string(),
                        format!("0x{:08x}", id.spi),
                    );
                    (shown, c)
                })
                .collect();
        for sa in &mut self.sas {
            let shown = (
                std::mem::take(&mut sa.src),
                std::mem::take(&mut sa.dst),
                std::mem::take(&mut sa.spi),
            );
            let found = by_shown.get(&shown);
            (sa.src, sa.dst, sa.spi) = shown;
            if let Some(c) = found {
                sa.bytes = c.bytes;
                sa.packets = c.packets;
                sa.age_secs = now_unix.saturating_sub(c.added_at);
            }
        }
        self
    }

    /// Adds the non-zero XFRM error counters with their hints.
    pub fn with_xfrm_stat(mut self, stat: &[(String, u64)]) -> Status {
        self.xfrm_errors = stat
            .iter()
            .filter(|(_, v)| *v > 0)
            .map(|(c, v)| XfrmError {
                counter: c.clone(),
                value: *v,
                hint: xfrm_hint(c).to_owned(),
            })
            .collect();
        self
    }

    pub fn with_agent(mut self, agent: AgentStatus) -> Status {
        self.agent = Some(agent);
        self
    }
}

/// The SAs' usage counters, by SA.
pub type SaUsage = BTreeMap<crate::state::SaId, crate::kernel::counters::SaCounters>;

/// The kernel's own view: devices, policies, SAs with their usage, and the XFRM error
/// counters; with the usage it was built from (an agent adds it to its keys).
pub async fn read_kernel(
    kernel: &crate::kernel::Kernel,
) -> Result<(Status, SaUsage), crate::kernel::KernelError> {
    let state = kernel.dump().await?;
    let usage = kernel.sa_counters().await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut status = Status::from_kernel(&state)
        .with_counters(&usage, now)
        .with_xfrm_stat(&crate::kernel::counters::xfrm_stat());
    status.kernel_changing = kernel.read_was_unsettled().await;
    Ok((status, usage))
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.agent {
            Some(a) => {
                writeln!(
                    f,
                    "Agent: node {} of cluster {}, up {}s, {}",
                    a.node,
                    a.cluster,
                    a.uptime_secs,
                    if let Some(b) = &a.busy {
                        format!(
                            "busy with {} for {}s (its peers and keys below as of the start)",
                            b.what, b.secs
                        )
                    } else if a.in_sync {
                        "kernel in sync".to_owned()
                    } else {
                        format!(
                            "NOT in sync: {}",
                            a.last_error.as_deref().unwrap_or("pending")
                        )
                    }
                )?;
            }
            None => writeln!(f, "Agent: not running (kernel view only)")?,
        }
        if self.kernel_changing {
            writeln!(
                f,
                "Note: the kernel kept changing while it was read (a change is being carried \
                 out); what follows may be off by what changed meanwhile."
            )?;
        }
        if self.networks.is_empty() && self.policies.is_empty() && self.sas.is_empty() {
            return writeln!(f, "No overlay networks on this node.");
        }
        writeln!(
            f,
            "NETWORK          VNI       MTU    STATE     ENC  ADDRESS              PEERS"
        )?;
        for n in &self.networks {
            writeln!(
                f,
                "{:<16} {:<9} {:<6} {:<9} {:<4} {:<20} {}",
                n.name,
                n.vni.map_or("-".into(), |v| v.to_string()),
                n.mtu.map_or("-".into(), |v| v.to_string()),
                if n.up && n.problems.is_empty() {
                    "up"
                } else {
                    "DEGRADED"
                },
                if n.encrypted_port.is_some() {
                    "yes"
                } else {
                    "no"
                },
                n.addresses.first().map_or("-", |s| s.as_str()),
                if n.peers.is_empty() {
                    "-".into()
                } else {
                    n.peers.join(",")
                },
            )?;
            for p in &n.problems {
                writeln!(f, "  ! {p}")?;
            }
        }
        if !self.policies.is_empty() {
            let blocks = self.policies.iter().filter(|p| p.action == "block").count();
            let pairs_out = self
                .policies
                .iter()
                .filter(|p| p.action == "esp" && p.dir == Direction::Out.to_string())
                .count();
            writeln!(
                f,
                "\nEnforcement: {} policies ({} catch-all block, {} peers with ESP out)",
                self.policies.len(),
                blocks,
                pairs_out
            )?;
        }
        if let Some(a) = &self.agent {
            if !a.peers.is_empty() {
                writeln!(
                    f,
                    "\nPEER             ADDRESS              SESSION    DIR  GEN   SPI         AGE    STATE     PACKETS    BYTES"
                )?;
            }
            for p in &a.peers {
                let session = match p.connected_secs {
                    Some(s) => format!("up {s}s"),
                    None => "DOWN".to_owned(),
                };
                let rows: Vec<(&str, &KeyStatus)> = p
                    .inbound
                    .iter()
                    .map(|k| ("in", k))
                    .chain(p.outbound.iter().map(|k| ("out", k)))
                    .collect();
                if rows.is_empty() {
                    writeln!(
                        f,
                        "{:<16} {:<20} {:<10} -    no keys yet",
                        p.name, p.address, session
                    )?;
                }
                for (i, (dir, k)) in rows.iter().enumerate() {
                    let (name, addr, sess) = if i == 0 {
                        (p.name.as_str(), p.address.as_str(), session.as_str())
                    } else {
                        ("", "", "")
                    };
                    writeln!(
                        f,
                        "{name:<16} {addr:<20} {sess:<10} {dir:<4} {:<5} {:<11} {:<6} {:<9} {:<10} {}",
                        k.generation,
                        k.spi,
                        format!("{}s", k.age_secs),
                        k.state,
                        k.packets,
                        k.bytes
                    )?;
                }
                if let Some(next) = p.next_rotation_secs {
                    writeln!(f, "{:<16} next rotation in {next}s", "")?;
                }
            }
        }
        if !self.sas.is_empty() {
            writeln!(
                f,
                "\nSECURITY ASSOCIATIONS (ESP, aes-256-gcm, icv 128, esn)"
            )?;
            for sa in &self.sas {
                writeln!(
                    f,
                    "  {} -> {}  spi {}  replay {}  {} packets  {} bytes  age {}s",
                    sa.src, sa.dst, sa.spi, sa.replay_window, sa.packets, sa.bytes, sa.age_secs
                )?;
            }
        }
        if !self.xfrm_errors.is_empty() {
            writeln!(f, "\nKERNEL XFRM ERRORS (/proc/net/xfrm_stat)")?;
            for e in &self.xfrm_errors {
                writeln!(f, "  {:<24} {:>10}  {}", e.counter, e.value, e.hint)?;
            }
        }
        Ok(())
    }
}
