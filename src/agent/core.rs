//! The agent's state-owning task.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use super::api::{self, Request, Response};
use super::net::{self, Allowed};
use super::{AgentConfig, Event};
use crate::control::Message;
use crate::desired::{Keyring, PeerKeys};
use crate::identity::{Identity, IdentityError};
use crate::kernel::monitor::{self, SaExpired};
use crate::kernel::{Kernel, KernelError};
use crate::keys::schedule::{Action, Schedule};
use crate::progress::Progress;
use crate::reconcile::{self, Keys, ReconcileError};
use crate::spec::{self, Node, NodeName, PublicKey, Spec};
use crate::state::SaId;
use crate::status::{AgentStatus, Busy, KeyStatus, PeerStatus, SaUsage, Status};

/// Backstop reconcile: drift that no kernel event reported (an FDB entry or an XFRM
/// object removed by hand) is repaired within this period.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(20);

/// How long a stopping agent waits for the answers of local requests to be written.
const STOP_ANSWER_WAIT: Duration = Duration::from_secs(3);
/// Kernel events come in bursts (our own changes too); wait this long for the burst to
/// end before reconciling.
pub const EVENT_DEBOUNCE: Duration = Duration::from_millis(300);
/// After a failed reconcile, try again this soon ...
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// ... and after failures in a row, at most this late.
pub const MAX_RETRY_AFTER_FAILURE: Duration = Duration::from_secs(60);
/// A peer's `DialMe` is heeded at most this often.
const DIAL_ME_MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Events already waiting that are handled before the kernel is reconciled once for all
/// of them (a rotation with many peers, a burst of key messages).
const MAX_COALESCED_EVENTS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Reconcile(#[from] ReconcileError),
    #[error("the key file's public key {found} is not node {node}'s publicKey in the spec")]
    KeyMismatch { node: String, found: String },
    #[error(transparent)]
    StateDir(#[from] super::StateDirError),
    #[error(transparent)]
    Api(#[from] api::ApiError),
    #[error("cannot listen for control connections on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("the system's random number source failed")]
    Random,
}

impl AgentError {
    /// Errors caused by the operator's input (exit code 2).
    pub fn is_input_error(&self) -> bool {
        match self {
            AgentError::KeyMismatch { .. } => true,
            AgentError::Identity(
                IdentityError::Permissions { .. }
                | IdentityError::Owner { .. }
                | IdentityError::Format { .. },
            ) => true,
            // A --key that names no file is a mistake in the invocation, as a missing
            // -f file is.
            AgentError::Identity(IdentityError::Io { source, .. }) => {
                source.kind() == std::io::ErrorKind::NotFound
            }
            AgentError::Reconcile(e) => e.is_input_error(),
            AgentError::StateDir(e) => e.is_input_error(),
            _ => false,
        }
    }
}

struct PendingRotation {
    /// The peers still to switch to new keys.
    peers: Vec<NodeName>,
    /// How many peers were asked to switch.
    total: usize,
    failed: Vec<String>,
    since: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Response>,
    progress: mpsc::UnboundedSender<Progress>,
    /// How many peers have switched, as last reported.
    reported: Option<usize>,
}

struct Session {
    id: u64,
    outbox: mpsc::Sender<Message>,
    since: Instant,
    /// The peer's address and key in the spec when the session came up: a spec change
    /// of either closes the session (its keys must not go to the old holder).
    reach: Option<Reach>,
}

/// Where a peer's control plane listens and the key it must prove.
type Reach = (SocketAddr, PublicKey);

fn reach_of(node: &Node, control_port: u16) -> Option<Reach> {
    let address = SocketAddr::new(node.address, control_port);
    node.public_key.map(|key| (address, key))
}

/// The task that keeps a session to a peer we dial, and how to cut its wait short.
struct Dialer {
    task: tokio::task::JoinHandle<()>,
    wake: Arc<tokio::sync::Notify>,
    /// Where it dials, with which key: a spec change of either restarts it.
    reach: Reach,
    /// When the peer last said it is up (`DialMe`).
    told_up_at: Option<Instant>,
}

pub(crate) struct Agent {
    spec: Spec,
    me: NodeName,
    identity: Arc<Identity>,
    kernel: Kernel,
    schedule: Schedule,
    sessions: BTreeMap<NodeName, Session>,
    dialers: BTreeMap<NodeName, Dialer>,
    /// Peers that dial us and were told we are up (once per agent start, and again when
    /// the spec changes their address or key), with the address and key used.
    told_up: BTreeMap<NodeName, Reach>,
    /// Bounds the "dial me" sessions in flight (a node that sorts late in a large
    /// cluster has one for almost every peer when it starts).
    dial_me_slots: Arc<tokio::sync::Semaphore>,
    /// Shared by all dialers: spaces the dials of long-silent peers.
    idle_pacer: Arc<net::IdlePacer>,
    allowed: Allowed,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    link_events: mpsc::UnboundedReceiver<()>,
    expiry: mpsc::UnboundedReceiver<SaExpired>,
    /// SAs this agent saw installed; one that vanishes from the kernel is never
    /// re-added with the same key (that would reuse AES-GCM nonces): it is rekeyed.
    installed: BTreeSet<SaId>,
    vanished: BTreeSet<SaId>,
    /// Messages to send after the current reconcile pass succeeds.
    deferred: Vec<Action>,
    /// The schedule's actions of the events handled since the last flush
    /// ([`Agent::flush_actions`]).
    queued: Vec<Action>,
    in_sync: bool,
    reconcile_due: Option<Instant>,
    next_periodic: Instant,
    rotations: Vec<PendingRotation>,
    last_error: Option<String>,
    /// Failed passes in a row: retries back off (a kernel without ESP stays so).
    failures_in_a_row: u32,
    /// After a failed pass, kernel events do not bring the next one before this.
    retry_not_before: Instant,
    /// Why the last pass left the encrypted networks down, if it did.
    encrypted_down: Option<String>,
    /// The local API's socket, removed when the agent stops.
    socket: std::path::PathBuf,
    /// SAs of ours whose parameters no longer match the spec: the next pass rekeys
    /// their directions.
    stale: BTreeSet<SaId>,
    started: Instant,
    /// What the agent is carrying out, for `status` meanwhile (see [`BusyWith`]).
    busy: SharedBusy,
    boot_id: u64,
    reconciles: u64,
    reconcile_failures: u64,
    kernel_changes: u64,
    /// Held while the agent runs (see `take_apply_lock`).
    _apply_lock: nix::fcntl::Flock<std::fs::File>,
    /// Local requests read and not answered yet (see `spawn_api_server`).
    api_unanswered: Arc<tokio::sync::Semaphore>,
    /// Control messages of authenticated peers that were refused: logged at a bounded
    /// rate (a compromised peer could send them without end).
    refused_messages: net::RefusalLog,
}

/// A random boot id; `None` when the system's random source fails (then nothing of
/// the agent's keys could be trusted either).
fn random_u64() -> Option<u64> {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 8];
    ring::rand::SystemRandom::new().fill(&mut b).ok()?;
    Some(u64::from_be_bytes(b))
}

/// Nodes that share an encrypted network with `me`: the peers that need keys.
pub(crate) fn encrypted_peers<'s>(spec: &'s Spec, me: &NodeName) -> BTreeMap<NodeName, &'s Node> {
    // Indexed once: a lookup by name per member would be quadratic at 1000+ peers.
    let by_name: std::collections::HashMap<&NodeName, &'s Node> =
        spec.nodes.iter().map(|n| (&n.name, n)).collect();
    let mut peers = BTreeMap::new();
    for net in spec
        .networks
        .iter()
        .filter(|n| n.encrypted && n.has_member(me))
    {
        for name in net.nodes.iter().filter(|n| *n != me) {
            if let Some(node) = by_name.get(name) {
                peers.insert(name.clone(), *node);
            }
        }
    }
    peers
}

impl Agent {
    pub(crate) async fn start(config: AgentConfig) -> Result<Agent, AgentError> {
        // The agent holds key material for its whole life: no core dump of it, and no
        // ptrace or /proc/PID/mem by anything without CAP_SYS_PTRACE.
        if let Err(e) = nix::sys::prctl::set_dumpable(false) {
            tracing::warn!(error = %e, "cannot turn off core dumps of the agent");
        }
        let kernel = Kernel::connect_watched()?;
        let spec = config.spec;
        let node = reconcile::identify_node(&spec, config.node.as_deref(), &kernel)
            .await?
            .clone();
        let identity = Arc::new(load_identity(&config.key, &node)?);

        // The control port first: a start that fails leaves the API socket (perhaps a
        // running agent's) alone.
        let control_addr = SocketAddr::new(node.address, spec.cluster.control_port);
        let tcp = bind_control(control_addr, ADDRESS_WAIT).await?;
        let api_listener = api::bind(&config.socket)?;
        // Before the kernel is read and adopted, and before the first pass (in `run`): a
        // run of apply or delete without an agent that holds the lock finishes first.
        // Our socket is bound already, so runs that start from now on come to us (and
        // wait for us).
        let apply_lock = take_apply_lock(&config.state_dir).await?;

        let boot_id = random_u64().ok_or(AgentError::Random)?;
        let mut schedule = Schedule::new(boot_id, spec.cluster.rotation);
        // Adopt what the kernel holds, so a restart keeps every working SA.
        let observed = kernel.dump().await?;
        let peers = encrypted_peers(&spec, &node.name);
        let names: Vec<NodeName> = peers.keys().cloned().collect();
        let now = Instant::now();
        let _ = schedule.set_peers(&names, now);
        let mut installed = BTreeSet::new();
        for (name, peer) in &peers {
            let inbound: Vec<_> = observed
                .sas
                .values()
                .filter(|sa| sa.id.src == peer.address && sa.id.dst == node.address)
                .map(|sa| crate::desired::DirectionKey {
                    spi: sa.id.spi,
                    key: sa.key.clone(),
                })
                .collect();
            let outbound: Vec<_> = observed
                .sas
                .values()
                .filter(|sa| sa.id.src == node.address && sa.id.dst == peer.address)
                .map(|sa| crate::desired::DirectionKey {
                    spi: sa.id.spi,
                    key: sa.key.clone(),
                })
                .collect();
            if !inbound.is_empty() || !outbound.is_empty() {
                tracing::info!(peer = %name, inbound = inbound.len(), outbound = outbound.len(), "adopting SAs from the kernel");
            }
            schedule.adopt(name, inbound, outbound);
        }
        for sa in observed.sas.keys() {
            installed.insert(*sa);
        }

        let link_events = monitor::change_events()?;
        monitor::spawn_learned_move_guard()?;
        let expiry = monitor::sa_expiry_events()?;
        let (events_tx, events) = mpsc::unbounded_channel();
        let allowed: Allowed = Arc::new(RwLock::new(BTreeMap::new()));
        net::spawn_listener(
            tcp,
            identity.clone(),
            spec.cluster.name.to_string(),
            allowed.clone(),
            events_tx.clone(),
        );
        let busy = SharedBusy::default();
        let api_unanswered = spawn_api_server(api_listener, events_tx.clone(), busy.clone());
        if let Some(addr) = config.metrics {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::Listen {
                    address: addr,
                    source,
                })?;
            if !addr.ip().is_loopback() {
                tracing::warn!(%addr, "metrics served on a non-loopback address");
            }
            super::metrics::spawn(listener, events_tx.clone());
            tracing::info!(%addr, "serving metrics");
        }
        tracing::info!(node = %node.name, %control_addr, socket = %config.socket.display(), spec = %config.spec_source, "agent started");

        let mut agent = Agent {
            me: node.name.clone(),
            spec,
            identity,
            kernel,
            schedule,
            sessions: BTreeMap::new(),
            dialers: BTreeMap::new(),
            told_up: BTreeMap::new(),
            dial_me_slots: Arc::new(tokio::sync::Semaphore::new(net::DIAL_ME_IN_FLIGHT)),
            idle_pacer: Arc::new(net::IdlePacer::new(net::IdlePacer::DEFAULT_INTERVAL)),
            allowed,
            events_tx,
            events,
            link_events,
            expiry,
            installed,
            vanished: BTreeSet::new(),
            deferred: Vec::new(),
            queued: Vec::new(),
            in_sync: false,
            reconcile_due: None,
            next_periodic: now + RECONCILE_INTERVAL,
            rotations: Vec::new(),
            last_error: None,
            failures_in_a_row: 0,
            retry_not_before: now,
            encrypted_down: None,
            socket: config.socket.clone(),
            stale: BTreeSet::new(),
            started: now,
            busy,
            api_unanswered,
            _apply_lock: apply_lock,
            refused_messages: net::RefusalLog::new(
                "control message refused",
                "more control messages refused",
            ),
            boot_id,
            reconciles: 0,
            reconcile_failures: 0,
            kernel_changes: 0,
        };
        agent.update_peers();
        // A failure is logged by the pass and retried.
        let _ = agent.reconcile().await;
        Ok(agent)
    }

    pub(crate) async fn run(mut self) -> Result<(), AgentError> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
        let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;
        loop {
            let wake = self.next_wakeup();
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                Some(event) = self.events.recv() => {
                    self.on_event(event).await;
                    for _ in 0..MAX_COALESCED_EVENTS {
                        let Ok(event) = self.events.try_recv() else { break };
                        self.on_event(event).await;
                    }
                }
                Some(()) = self.link_events.recv() => {
                    // Soon, but never before a failed pass's back-off is over: a pass
                    // that keeps failing rewrites what it planned, and the kernel's
                    // notifications of that would otherwise bring it back at once.
                    let due = (Instant::now() + EVENT_DEBOUNCE).max(self.retry_not_before);
                    self.reconcile_due = Some(self.reconcile_due.map_or(due, |d| d.min(due)));
                }
                Some(expired) = self.expiry.recv() => self.on_expired(expired).await,
                _ = tokio::time::sleep_until(wake.into()) => self.on_timer().await,
            }
            self.flush_actions().await;
            self.check_rotations();
        }
        tracing::info!("agent stopping; the kernel keeps forwarding with the installed SAs");
        // Nobody answers there any more: the CLI then works without an agent at once.
        if let Err(e) = std::fs::remove_file(&self.socket) {
            tracing::warn!(socket = %self.socket.display(), error = %e, "cannot remove the API socket");
        }
        // Local requests: those handled get their answers out, rotations in progress say
        // how far they got, and those not handled yet are told so (their events are
        // dropped here), within a few seconds.
        for r in std::mem::take(&mut self.rotations) {
            let switched = r.total.saturating_sub(r.peers.len());
            let _ = r.reply.send(Response::fail(
                1,
                String::new(),
                format!(
                    "the agent stopped during the rotation: {switched} of {} peers had switched \
                     to new keys",
                    r.total
                ),
            ));
        }
        self.events.close();
        while self.events.try_recv().is_ok() {}
        let deadline = Instant::now() + STOP_ANSWER_WAIT;
        while self.api_unanswered.available_permits() < api::MAX_API_QUEUED
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn next_wakeup(&self) -> Instant {
        let mut t = self.next_periodic;
        if let Some(d) = self.reconcile_due {
            t = t.min(d);
        }
        if let Some(d) = self.schedule.next_wakeup() {
            t = t.min(d);
        }
        for r in &self.rotations {
            t = t.min(r.deadline);
        }
        t
    }

    /// Publishes (or withdraws) what the agent is carrying out, for `status` requests
    /// that come meanwhile.
    fn set_busy(&self, what: Option<&'static str>) {
        let busy = what.map(|what| BusyWith {
            what,
            since: Instant::now(),
            view: self.agent_view(),
        });
        if let Ok(mut slot) = self.busy.lock() {
            *slot = busy;
        }
    }

    fn node(&self) -> Option<&Node> {
        self.spec.node(&self.me)
    }

    /// Starts dialers for new peers (we dial peers whose name sorts after ours), tells
    /// new peers that dial us that we are up, stops the dialers of peers that left, and
    /// updates who may connect.
    fn update_peers(&mut self) {
        let peers = encrypted_peers(&self.spec, &self.me);
        if let Ok(mut allowed) = self.allowed.write() {
            allowed.clear();
            for (name, node) in &peers {
                if let Some(key) = node.public_key {
                    allowed.insert(key.0, (name.clone(), node.address));
                }
            }
        }
        let port = self.spec.cluster.control_port;
        let reach = |name: &NodeName| peers.get(name).and_then(|n| reach_of(n, port));
        // Peers still in the spec at another address or with another key: each had a
        // dialer or was told we are up, with the old address and key.
        let mut moved = BTreeSet::new();
        let mut still = |name: &NodeName, was: Option<Reach>| {
            let keep = reach(name) == was;
            if !keep && peers.contains_key(name) {
                moved.insert(name.clone());
            }
            keep
        };
        self.dialers.retain(|name, dialer| {
            let keep = still(name, Some(dialer.reach));
            if !keep {
                dialer.task.abort();
            }
            keep
        });
        self.told_up.retain(|name, told| still(name, Some(*told)));
        self.sessions
            .retain(|name, session| still(name, session.reach));
        // Their keys belong to the old address (the kernel would even refuse their
        // inbound SPIs, taken by the old SAs until those go): they start over.
        let mut dropped = Vec::new();
        for name in moved {
            tracing::info!(peer = %name, "the peer's address or key changed; its session is closed and its keys dropped");
            dropped.extend(self.schedule.forget(&name));
        }
        for name in peers.keys() {
            if *name == self.me
                || self.dialers.contains_key(name)
                || self.told_up.contains_key(name)
            {
                continue;
            }
            let Some((address, key)) = reach(name) else {
                continue;
            };
            let Some(local) = self.node().map(|n| n.address) else {
                continue;
            };
            let contact = net::PeerContact {
                peer: name.clone(),
                address,
                local,
                key,
                identity: self.identity.clone(),
                cluster: self.spec.cluster.name.to_string(),
            };
            if *name < self.me {
                net::spawn_dial_me(contact, self.dial_me_slots.clone());
                self.told_up.insert(name.clone(), (address, key));
            } else {
                let wake = Arc::new(tokio::sync::Notify::new());
                let task = net::spawn_dialer(
                    contact,
                    net::DialBackoff::DEFAULT,
                    self.idle_pacer.clone(),
                    wake.clone(),
                    self.events_tx.clone(),
                );
                let reach = (address, key);
                self.dialers.insert(
                    name.clone(),
                    Dialer {
                        task,
                        wake,
                        reach,
                        told_up_at: None,
                    },
                );
            }
        }
        self.queue_actions(dropped);
    }

    /// SPIs not to choose for a new inbound SA: those of the SAs we installed, and those
    /// of other software's SAs towards this node (the kernel refuses a second SA in a
    /// slot, and a failed add would hold every pass back).
    fn taken_spis(&self) -> impl Fn(u32) -> bool + 'static {
        let mut taken: BTreeSet<u32> = self.installed.iter().map(|id| id.spi).collect();
        if let Some(me) = self.node().map(|n| n.address) {
            taken.extend(self.kernel.foreign_spis_towards(me));
        }
        move |spi| taken.contains(&spi)
    }

    /// Whether a key the peer offers for the direction towards it has an SPI that
    /// another program's SA towards it holds here: installing it would fail, and with
    /// it every pass, for all peers. Such an offer is answered with a request for
    /// another key instead (the peer chose the SPI: by chance, or on purpose).
    fn offer_into_foreign_slot(&self, peer: &NodeName, msg: &Message) -> bool {
        let Message::KeyOffer { spi, .. } = msg else {
            return false;
        };
        self.spec
            .node(peer)
            .is_some_and(|p| self.kernel.foreign_spis_towards(p.address).contains(spi))
    }

    async fn on_event(&mut self, event: Event) {
        let now = Instant::now();
        match event {
            Event::Connected {
                peer,
                session,
                outbox,
            } => {
                let reach = self
                    .spec
                    .node(&peer)
                    .and_then(|n| reach_of(n, self.spec.cluster.control_port));
                self.sessions.insert(
                    peer.clone(),
                    Session {
                        id: session,
                        outbox,
                        since: now,
                        reach,
                    },
                );
                let taken = self.taken_spis();
                let actions = self.schedule.on_connected(&peer, now, &taken);
                self.queue_actions(actions);
            }
            Event::Disconnected { peer, session } => {
                if self.sessions.get(&peer).is_some_and(|s| s.id == session) {
                    self.sessions.remove(&peer);
                    self.schedule.on_disconnected(&peer, now);
                }
            }
            Event::Received { peer, session, msg } => {
                if self.sessions.get(&peer).is_none_or(|s| s.id != session) {
                    return; // a message of a session that was replaced
                }
                if self.offer_into_foreign_slot(&peer, &msg) {
                    self.refused_messages.refused(
                        now,
                        &peer,
                        &"its key offer has an SPI that another program's SA towards it \
                          holds here; asking it for another key",
                    );
                    self.queue_actions(vec![Action::Send {
                        peer,
                        msg: Message::RekeyRequest,
                    }]);
                    return;
                }
                let taken = self.taken_spis();
                match self.schedule.on_message(&peer, msg, now, &taken) {
                    Ok(actions) => self.queue_actions(actions),
                    Err(e) => self.refused_messages.refused(now, &peer, &e),
                }
            }
            Event::Metrics { reply } => {
                let status = self.status().await;
                let text = match status {
                    Ok(st) => super::metrics::render(
                        &st,
                        self.reconciles,
                        self.reconcile_failures,
                        self.kernel_changes,
                        self.kernel.watch_stats().unwrap_or_default(),
                    ),
                    Err(e) => format!("# status unavailable: {e}\novl_agent_up 1\n"),
                };
                let _ = reply.send(text);
            }
            Event::DialMe { peer } => match self.dialers.get_mut(&peer) {
                Some(dialer) if heed_dial_me(dialer.told_up_at, Instant::now()) => {
                    tracing::info!(%peer, "peer says it is up; dialing it");
                    dialer.told_up_at = Some(Instant::now());
                    dialer.wake.notify_one();
                }
                Some(_) => {
                    tracing::debug!(%peer, "peer said again within a second that it is up; ignored");
                }
                None => tracing::debug!(%peer, "a peer we do not dial asked to be dialed"),
            },
            Event::Api {
                request,
                reply,
                progress,
            } => {
                let response = self.on_api(request, reply, progress).await;
                if let Some((reply, response)) = response {
                    let _ = reply.send(response);
                }
            }
        }
    }

    async fn on_timer(&mut self) {
        let now = Instant::now();
        self.refused_messages.tick(now);
        let taken = self.taken_spis();
        let actions = self.schedule.poll(now, &taken);
        self.queue_actions(actions);
        let periodic = now >= self.next_periodic;
        if periodic || self.reconcile_due.is_some_and(|d| now >= d) {
            self.reconcile_due = None;
            if periodic {
                self.next_periodic = now + RECONCILE_INTERVAL;
            }
            // A failure is logged by the pass and retried.
            let _ = self.reconcile().await;
        }
    }

    async fn on_expired(&mut self, e: SaExpired) {
        let Some(me) = self.node().map(|n| n.address) else {
            return;
        };
        let peer_of = |addr: IpAddr| {
            encrypted_peers(&self.spec, &self.me)
                .into_iter()
                .find(|(_, n)| n.address == addr)
                .map(|(k, _)| k)
        };
        let now = Instant::now();
        let taken = self.taken_spis();
        if e.dst == me {
            if let Some(peer) = peer_of(e.src) {
                tracing::info!(%peer, spi = format_args!("0x{:08x}", e.spi), hard = e.hard, "inbound SA reached its lifetime; rekeying");
                let actions = self.schedule.rekey_inbound(&peer, now, &taken);
                self.queue_actions(actions);
            }
        } else if e.src == me
            && let Some(peer) = peer_of(e.dst)
        {
            {
                tracing::info!(%peer, spi = format_args!("0x{:08x}", e.spi), hard = e.hard, "outbound SA reached its lifetime; asking the peer to rekey");
                self.send(&peer, Message::RekeyRequest);
            }
        }
        if e.hard {
            // The kernel removed it: never put the same key back.
            self.vanished.insert(SaId {
                src: e.src,
                dst: e.dst,
                spi: e.spi,
            });
        }
    }

    fn send(&self, peer: &NodeName, msg: Message) {
        match self.sessions.get(peer) {
            Some(s) => {
                if s.outbox.try_send(msg).is_err() {
                    tracing::warn!(%peer, "control session outbox full or closed; message dropped");
                }
            }
            None => tracing::debug!(%peer, "not connected; message dropped"),
        }
    }

    /// Queues the schedule's actions; the run loop performs them after the events at
    /// hand ([`Agent::flush_actions`]).
    fn queue_actions(&mut self, actions: Vec<Action>) {
        self.queued.extend(actions);
    }

    /// Performs the queued actions: one reconcile if any of them asked for one, then
    /// the messages in order. A key offer or acknowledgement goes out only for an SA the
    /// kernel holds after that reconcile (one superseded meanwhile is dropped: the
    /// schedule announces its successor); a failed reconcile holds all of them back.
    async fn flush_actions(&mut self) {
        let actions = std::mem::take(&mut self.queued);
        if actions.is_empty() {
            return;
        }
        // A failed pass holds back key messages only: a Hello (or a rekey request) not
        // sent would get the new session dropped by the peer as silent, over and over.
        let kernel_failed = actions.contains(&Action::KernelChanged)
            && match self.reconcile().await {
                Ok(_) => false,
                Err(e) => {
                    tracing::debug!(error = %e, "reconcile after a key change failed; not announcing keys");
                    true
                }
            };
        let Some(me) = self.node().map(|n| n.address) else {
            return;
        };
        let addresses: BTreeMap<NodeName, IpAddr> = encrypted_peers(&self.spec, &self.me)
            .into_iter()
            .map(|(name, node)| (name, node.address))
            .collect();
        for action in actions {
            let Action::Send { peer, msg } = action else {
                continue;
            };
            let announced = match &msg {
                Message::KeyOffer { spi, .. } => addresses.get(&peer).map(|a| SaId {
                    src: *a,
                    dst: me,
                    spi: *spi,
                }),
                Message::KeyAck { spi, .. } => addresses.get(&peer).map(|a| SaId {
                    src: me,
                    dst: *a,
                    spi: *spi,
                }),
                _ => None,
            };
            let key_message = matches!(msg, Message::KeyOffer { .. } | Message::KeyAck { .. });
            if key_message && kernel_failed {
                continue;
            }
            if let Some(id) = announced {
                if !self.in_sync {
                    tracing::warn!(%peer, "kernel not in sync; key message held back");
                    continue;
                }
                if !self.installed.contains(&id) {
                    tracing::debug!(%peer, spi = format_args!("0x{:08x}", id.spi), "key message for an SA the kernel does not hold (superseded); dropped");
                    continue;
                }
            }
            match &msg {
                Message::KeyOffer {
                    generation, spi, ..
                } => tracing::info!(
                    %peer,
                    generation = generation & 0xffff_ffff,
                    spi = format_args!("0x{spi:08x}"),
                    "new inbound key installed; offering it"
                ),
                Message::KeyAck { generation, spi } => tracing::info!(
                    %peer,
                    generation = generation & 0xffff_ffff,
                    spi = format_args!("0x{spi:08x}"),
                    "switched to the peer's new key"
                ),
                _ => {}
            }
            self.send(&peer, msg);
        }
    }

    /// The keys the kernel must hold now, by peer address (without vanished SAs).
    fn keyring(&self) -> Keyring {
        let Some(me) = self.node().map(|n| n.address) else {
            return Keyring::new();
        };
        let mut ring = Keyring::new();
        for (name, node) in encrypted_peers(&self.spec, &self.me) {
            let mut keys: PeerKeys = self.schedule.peer_keys(&name);
            keys.inbound.retain(|k| {
                !self.vanished.contains(&SaId {
                    src: node.address,
                    dst: me,
                    spi: k.spi,
                })
            });
            keys.outbound.retain(|k| {
                !self.vanished.contains(&SaId {
                    src: me,
                    dst: node.address,
                    spi: k.spi,
                })
            });
            ring.insert(node.address, keys);
        }
        ring
    }

    /// One reconcile pass with the current spec and keys. SAs we installed that have
    /// disappeared from the kernel are not re-added (same key = nonce reuse): their
    /// direction is rekeyed instead.
    async fn reconcile(&mut self) -> Result<crate::plan::Plan, ReconcileError> {
        self.reconcile_pass()
            .await
            .and_then(reconcile::Outcome::into_result)
    }

    /// [`Agent::reconcile`], keeping the plan carried out when encrypted networks could
    /// not come up (their plaintext neighbours still did).
    async fn reconcile_pass(&mut self) -> Result<reconcile::Outcome, ReconcileError> {
        let result = self.reconcile_inner(false).await;
        self.reconciles += 1;
        let failure = match &result {
            Ok(outcome) => {
                self.kernel_changes += outcome.plan.changes.len() as u64;
                // One event per kernel change (it names the network or the peer's
                // addresses and SPI; never a key).
                for change in &outcome.plan.changes {
                    tracing::info!(%change, "kernel changed");
                }
                self.encrypted_down = outcome.encrypted_not_up.as_ref().map(ToString::to_string);
                self.encrypted_down.clone()
            }
            Err(e) => Some(e.to_string()),
        };
        match failure {
            None => {
                self.in_sync = true;
                self.last_error = None;
                self.failures_in_a_row = 0;
                self.retry_not_before = Instant::now();
                // Announcements prepared during the pass (rekeys of vanished SAs); the
                // kernel now holds their SAs.
                for action in std::mem::take(&mut self.deferred) {
                    if let Action::Send { peer, msg } = action {
                        self.send(&peer, msg);
                    }
                }
            }
            Some(why) => {
                self.reconcile_failures += 1;
                self.in_sync = false;
                // The same failure again is logged once, at its first occurrence.
                if self.last_error.as_deref() == Some(why.as_str()) {
                    tracing::debug!(error = %why, "reconcile failed again");
                } else {
                    tracing::error!(error = %why, "reconcile failed");
                }
                self.last_error = Some(why);
                self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
                self.retry_not_before = Instant::now() + retry_delay(self.failures_in_a_row);
                self.reconcile_due = Some(self.retry_not_before);
            }
        }
        result
    }

    async fn reconcile_inner(
        &mut self,
        dry_run: bool,
    ) -> Result<reconcile::Outcome, ReconcileError> {
        let observed = self.kernel.dump().await?;
        let node = self
            .node()
            .cloned()
            .ok_or_else(|| ReconcileError::UnknownNode(self.me.to_string()))?;
        if !dry_run {
            self.rekey_vanished(&node, &observed);
        }
        let ring = self.keyring();
        let outcome = reconcile::apply_observed(
            &self.spec,
            &node,
            &self.kernel,
            Keys::Ring(&ring),
            dry_run,
            observed,
        )
        .await?;
        // Only a pass that handled encrypted networks installed the ring's SAs.
        if !dry_run && outcome.encrypted_not_up.is_none() {
            for keys in ring.iter() {
                let (peer, k) = keys;
                for d in &k.inbound {
                    self.installed.insert(SaId {
                        src: *peer,
                        dst: node.address,
                        spi: d.spi,
                    });
                }
                for d in &k.outbound {
                    self.installed.insert(SaId {
                        src: node.address,
                        dst: *peer,
                        spi: d.spi,
                    });
                }
            }
            // Forget what is no longer wanted (deleted by the plan).
            let wanted: BTreeSet<SaId> = ring
                .iter()
                .flat_map(|(peer, k)| {
                    let a = k.inbound.iter().map(|d| SaId {
                        src: *peer,
                        dst: node.address,
                        spi: d.spi,
                    });
                    let b = k.outbound.iter().map(|d| SaId {
                        src: node.address,
                        dst: *peer,
                        spi: d.spi,
                    });
                    a.chain(b).collect::<Vec<_>>()
                })
                .collect();
            self.installed.retain(|id| wanted.contains(id));
            let still: BTreeSet<SaId> = self
                .vanished
                .iter()
                .filter(|id| self.schedule_holds(id, &node))
                .copied()
                .collect();
            self.vanished = still;
            // SAs whose parameters changed keep their old form until the next pass,
            // which rekeys their directions (a key is never installed twice).
            if !outcome.plan.needs_new_keys.is_empty() {
                self.stale
                    .extend(outcome.plan.needs_new_keys.iter().copied());
                self.reconcile_due = Some(Instant::now());
            }
        }
        Ok(outcome)
    }

    /// Whether the schedule still lists this SA (a vanished one stays filtered until the
    /// schedule has replaced it).
    fn schedule_holds(&self, id: &SaId, node: &Node) -> bool {
        encrypted_peers(&self.spec, &self.me)
            .iter()
            .any(|(name, peer)| {
                let k = self.schedule.peer_keys(name);
                (id.src == peer.address
                    && id.dst == node.address
                    && k.inbound.iter().any(|d| d.spi == id.spi))
                    || (id.src == node.address
                        && id.dst == peer.address
                        && k.outbound.iter().any(|d| d.spi == id.spi))
            })
    }

    fn rekey_vanished(&mut self, node: &Node, observed: &crate::state::KernelState) {
        let stale = std::mem::take(&mut self.stale);
        let gone: Vec<SaId> = self
            .installed
            .iter()
            .filter(|id| !observed.sas.contains_key(id) || stale.contains(id))
            .filter(|id| !self.vanished.contains(id))
            .copied()
            .collect();
        for id in gone {
            if stale.contains(&id) {
                tracing::info!(spi = format_args!("0x{:08x}", id.spi), src = %id.src, dst = %id.dst, "an SA of ours has other parameters now; rekeying that direction");
            } else {
                tracing::warn!(spi = format_args!("0x{:08x}", id.spi), src = %id.src, dst = %id.dst, "an SA of ours vanished from the kernel; rekeying that direction");
            }
            self.vanished.insert(id);
            let peers = encrypted_peers(&self.spec, &self.me);
            let now = Instant::now();
            if id.dst == node.address {
                if let Some((peer, _)) = peers.iter().find(|(_, n)| n.address == id.src) {
                    let peer = peer.clone();
                    let taken = self.taken_spis();
                    // This pass installs the new inbound SA; the offer goes out after it.
                    let actions = self.schedule.rekey_inbound(&peer, now, &taken);
                    self.deferred.extend(actions);
                }
            } else if let Some((peer, _)) = peers.iter().find(|(_, n)| n.address == id.dst) {
                self.send(peer, Message::RekeyRequest);
            }
        }
    }

    async fn on_api(
        &mut self,
        request: Request,
        reply: oneshot::Sender<Response>,
        progress: mpsc::UnboundedSender<Progress>,
    ) -> Option<(oneshot::Sender<Response>, Response)> {
        let deleting = matches!(request, Request::Delete { .. });
        match request {
            Request::Apply {
                spec,
                source,
                dry_run,
                node,
            }
            | Request::Delete {
                spec,
                source,
                dry_run,
                node,
            } => {
                let sink: crate::progress::Sink = Arc::new(move |p: &Progress| {
                    let _ = progress.send(p.clone());
                });
                self.kernel.set_progress(Some(sink));
                self.set_busy(match (deleting, dry_run) {
                    (false, false) => Some("apply"),
                    (false, true) => Some("apply (dry run)"),
                    (true, false) => Some("delete"),
                    (true, true) => Some("delete (dry run)"),
                });
                let response = self
                    .api_change(&spec, &source, dry_run, node.as_deref(), deleting)
                    .await;
                self.set_busy(None);
                self.kernel.set_progress(None);
                Some((reply, response))
            }
            // Answered meanwhile without the agent (see `answer_status`).
            Request::Status if reply.is_closed() => None,
            Request::Status => Some((reply, self.api_status().await)),
            Request::Rotate {
                node: Some(node), ..
            } if node != self.me.as_str() => Some((
                reply,
                Response::fail(
                    2,
                    String::new(),
                    format!("this agent runs node {}, not {node}", self.me),
                ),
            )),
            Request::Rotate {
                network,
                peer,
                timeout_secs,
                ..
            } => {
                self.api_rotate(
                    network,
                    peer,
                    Duration::from_secs(timeout_secs.clamp(1, 3600)),
                    reply,
                    progress,
                )
                .await
            }
        }
    }

    /// `apply` (the given spec becomes the agent's) or `delete` (the given spec's
    /// networks leave the agent's spec, so its passes no longer bring them back).
    async fn api_change(
        &mut self,
        text: &str,
        source: &str,
        dry_run: bool,
        node: Option<&str>,
        deleting: bool,
    ) -> Response {
        let given = match spec::parse(text.as_bytes(), source) {
            Ok(s) => s,
            Err(e) => return Response::fail(2, String::new(), e),
        };
        if let Some(n) = node
            && n != self.me.as_str()
        {
            return Response::fail(
                2,
                String::new(),
                format!("this agent runs node {}, not {n}", self.me),
            );
        }
        let new = if deleting {
            spec_without_networks_of(&self.spec, &given)
        } else {
            if let Err(why) = compatible(&self.spec, &given, &self.me, &self.identity.public) {
                return Response::fail(2, String::new(), why);
            }
            given
        };
        let old = std::mem::replace(&mut self.spec, new);
        if dry_run {
            let pass = self.reconcile_inner(true).await;
            self.spec = old;
            let header = format!("Dry run for node {}: nothing is changed.\n", self.me);
            return answer(pass, header, None, deleting);
        }
        // A spec that this node's kernel side refuses as input (an MTU its underlay
        // cannot carry), or whose plan could not even start (a foreign link in the
        // way), is not taken: the agent keeps the spec it had, and keeps it true.
        if let Err(e) = self.reconcile_inner(true).await
            && e.refuses_spec()
        {
            self.spec = old;
            let mut response = answer(Err(e), String::new(), None, deleting);
            response
                .output
                .push_str("The agent keeps the spec it had.\n");
            return response;
        }
        self.update_peers();
        let names: Vec<NodeName> = encrypted_peers(&self.spec, &self.me)
            .keys()
            .cloned()
            .collect();
        let actions = self.schedule.set_peers(&names, Instant::now());
        let pass = self.reconcile_pass().await;
        self.queue_actions(actions);
        answer(pass, String::new(), Some(&self.me), deleting)
    }

    async fn api_status(&mut self) -> Response {
        match self.status().await {
            Ok(status) => status_response(&status),
            Err(e) => Response::fail(1, String::new(), e),
        }
    }

    async fn status(&mut self) -> Result<Status, KernelError> {
        let (status, usage) = crate::status::read_kernel(&self.kernel).await?;
        let mut view = self.agent_view();
        fill_usage(&mut view.agent.peers, &view.key_sas, &usage);
        Ok(status.with_agent(view.agent))
    }

    /// The agent's own part of its status: who it is, how its last pass went, and per
    /// encrypted peer its session and keys (usage not filled in: see [`fill_usage`]).
    fn agent_view(&self) -> AgentView {
        let me = self.node().map(|n| n.address);
        let now = Instant::now();
        let mut peers = Vec::new();
        let mut key_sas = Vec::new();
        for (name, node) in encrypted_peers(&self.spec, &self.me) {
            let session = self
                .sessions
                .get(&name)
                .map(|s| now.duration_since(s.since));
            let keys = self.schedule.status(&name);
            // Each shown key's SA, matched by SPI from the schedule (not from the text).
            let mut sas: [Vec<SaId>; 2] = Default::default();
            if let (Some(me), Some(keys)) = (me, &keys) {
                let ids = |held: &[crate::keys::schedule::KeyInfo], src, dst| {
                    held.iter()
                        .map(|k| SaId {
                            src,
                            dst,
                            spi: k.spi,
                        })
                        .collect()
                };
                sas = [
                    ids(&keys.inbound, node.address, me),
                    ids(&keys.outbound, me, node.address),
                ];
            }
            peers.push(peer_status(&name, node.address, session, keys, now));
            key_sas.push(sas);
        }
        AgentView {
            agent: AgentStatus {
                node: self.me.to_string(),
                cluster: self.spec.cluster.name.to_string(),
                uptime_secs: now.duration_since(self.started).as_secs(),
                in_sync: self.in_sync,
                last_error: self.last_error.clone(),
                boot_id: format!("{:016x}", self.boot_id),
                peers,
                busy: None,
            },
            key_sas,
        }
    }

    async fn api_rotate(
        &mut self,
        network: Option<String>,
        peer: Option<String>,
        timeout: Duration,
        reply: oneshot::Sender<Response>,
        progress: mpsc::UnboundedSender<Progress>,
    ) -> Option<(oneshot::Sender<Response>, Response)> {
        let mut peers: Vec<NodeName> = encrypted_peers(&self.spec, &self.me)
            .keys()
            .cloned()
            .collect();
        if let Some(net) = &network {
            let Some(n) = self.spec.networks.iter().find(|n| n.name.as_str() == net) else {
                return Some((
                    reply,
                    Response::fail(2, String::new(), format!("no network {net} in the spec")),
                ));
            };
            if !n.encrypted || !n.has_member(&self.me) {
                return Some((
                    reply,
                    Response::fail(
                        2,
                        String::new(),
                        format!(
                            "network {net} is not an encrypted network of node {}",
                            self.me
                        ),
                    ),
                ));
            }
            peers.retain(|p| n.has_member(p));
        }
        if let Some(p) = &peer {
            if !peers.iter().any(|x| x.as_str() == p) {
                return Some((
                    reply,
                    Response::fail(
                        2,
                        String::new(),
                        format!("{p} is not an encrypted peer of node {}", self.me),
                    ),
                ));
            }
            peers.retain(|x| x.as_str() == p);
        }
        if peers.is_empty() {
            let out = format!(
                "Nothing to rotate: node {} has no encrypted peers.\n",
                self.me
            );
            return Some((reply, Response::ok(out)));
        }
        // New keys cannot be installed where the encrypted networks are down: say why
        // now rather than at the timeout.
        if let Some(reason) = &self.encrypted_down {
            return Some((
                reply,
                Response::fail(1, String::new(), format!("cannot rotate: {reason}")),
            ));
        }
        let now = Instant::now();
        let mut failed = Vec::new();
        let mut waiting = Vec::new();
        for p in peers {
            if !self.sessions.contains_key(&p) {
                failed.push(format!("{p}: not connected (its agent is down or unreachable); its current keys stay in use"));
                continue;
            }
            let taken = self.taken_spis();
            let actions = self.schedule.rotate(&p, now, &taken);
            self.queue_actions(actions);
            waiting.push(p);
        }
        self.rotations.push(PendingRotation {
            total: waiting.len(),
            peers: waiting,
            failed,
            since: now,
            deadline: now + timeout,
            reply,
            progress,
            reported: None,
        });
        self.check_rotations();
        None
    }

    /// Answers `rotate` requests whose peers have all switched to new keys, or whose
    /// time is up.
    fn check_rotations(&mut self) {
        let now = Instant::now();
        let mut still = Vec::new();
        for mut r in std::mem::take(&mut self.rotations) {
            r.peers.retain(|p| !self.schedule.rotated_since(p, r.since));
            let switched = r.total - r.peers.len();
            if r.reported != Some(switched) {
                r.reported = Some(switched);
                let _ = r.progress.send(Progress {
                    what: "peers switched to new keys".into(),
                    done: switched as u64,
                    total: r.total as u64,
                });
            }
            if r.peers.is_empty() || now >= r.deadline {
                for p in &r.peers {
                    r.failed
                        .push(format!("{p}: no new keys in use within the timeout"));
                }
                let response = if r.failed.is_empty() {
                    Response::ok("Rotated: new keys in use with every peer.\n".into())
                } else {
                    Response::fail(
                        1,
                        String::new(),
                        format!("not rotated: {}", r.failed.join("; ")),
                    )
                };
                let _ = r.reply.send(response);
            } else {
                still.push(r);
            }
        }
        self.rotations = still;
    }
}

/// The agent's part of a status, with each shown key's SA (per peer: inbound,
/// outbound; in the order of the peer's keys).
#[derive(Clone)]
struct AgentView {
    agent: AgentStatus,
    key_sas: Vec<[Vec<SaId>; 2]>,
}

/// Fills in each shown key's usage from the kernel's counters.
fn fill_usage(peers: &mut [PeerStatus], key_sas: &[[Vec<SaId>; 2]], usage: &SaUsage) {
    for (peer, [inbound, outbound]) in peers.iter_mut().zip(key_sas) {
        let pairs = [(&mut peer.inbound, inbound), (&mut peer.outbound, outbound)];
        for (shown, sas) in pairs {
            for (k, id) in shown.iter_mut().zip(sas) {
                if let Some(c) = usage.get(id) {
                    k.packets = c.packets;
                    k.bytes = c.bytes;
                }
            }
        }
    }
}

/// What the agent is carrying out (an apply or delete), published for `status`
/// requests that come meanwhile: they are answered from the kernel, read on a
/// connection of their own, and this view, instead of waiting for the change's end.
struct BusyWith {
    what: &'static str,
    since: Instant,
    view: AgentView,
}

type SharedBusy = Arc<std::sync::Mutex<Option<BusyWith>>>;

/// How long a `status` request waits for the agent before it looks whether the agent
/// is busy with a change (then it is answered without the agent).
const STATUS_WAIT_FOR_AGENT: Duration = Duration::from_millis(500);

/// Answers a `status` request: by the agent when it answers soon, or else, while the
/// agent is busy with a change, from the kernel and the view published at the change's
/// start.
async fn answer_status(answer: &mut oneshot::Receiver<Response>, busy: &SharedBusy) -> Response {
    loop {
        match tokio::time::timeout(STATUS_WAIT_FOR_AGENT, &mut *answer).await {
            Ok(Ok(response)) => return response,
            Ok(Err(_)) => {
                return Response::fail(1, String::new(), "the agent stopped before it answered");
            }
            Err(_) => {}
        }
        let snapshot = busy.lock().ok().and_then(|b| {
            b.as_ref()
                .map(|b| (b.what, b.since.elapsed().as_secs(), b.view.clone()))
        });
        let Some((what, secs, view)) = snapshot else {
            continue;
        };
        let read = async {
            let kernel = Kernel::connect_for_display()?;
            crate::status::read_kernel(&kernel).await
        };
        let (status, usage) = match read.await {
            Ok(read) => read,
            Err(e) => return Response::fail(1, String::new(), e),
        };
        let AgentView { mut agent, key_sas } = view;
        fill_usage(&mut agent.peers, &key_sas, &usage);
        age_by(&mut agent, secs);
        // The kernel is in the middle of a change: not in sync, whatever the last pass.
        agent.in_sync = false;
        agent.busy = Some(Busy {
            what: what.to_owned(),
            secs,
        });
        return status_response(&status.with_agent(agent));
    }
}

/// Moves the times of a view taken `secs` ago to now: uptime and ages grow, the time
/// to the next rotation shrinks.
fn age_by(agent: &mut AgentStatus, secs: u64) {
    agent.uptime_secs += secs;
    for p in &mut agent.peers {
        if let Some(s) = &mut p.connected_secs {
            *s += secs;
        }
        for k in p.inbound.iter_mut().chain(p.outbound.iter_mut()) {
            k.age_secs += secs;
        }
        p.next_rotation_secs = p.next_rotation_secs.map(|t| t.saturating_sub(secs));
    }
}

fn status_response(status: &Status) -> Response {
    match serde_json::to_string(status) {
        Ok(json) => Response::ok(json),
        Err(e) => Response::fail(1, String::new(), format!("cannot encode status: {e}")),
    }
}

fn peer_status(
    name: &NodeName,
    address: IpAddr,
    session: Option<Duration>,
    keys: Option<crate::keys::schedule::PeerKeyStatus>,
    now: Instant,
) -> PeerStatus {
    let key = |k: &crate::keys::schedule::KeyInfo| KeyStatus {
        // The low half counts keys; the high half is the receiver's epoch (boot).
        generation: k.generation & 0xffff_ffff,
        spi: format!("0x{:08x}", k.spi),
        age_secs: k
            .installed_at
            .map_or(0, |t| now.saturating_duration_since(t).as_secs()),
        state: k.state.to_string(),
        bytes: 0,
        packets: 0,
    };
    PeerStatus {
        name: name.to_string(),
        address: address.to_string(),
        connected: session.is_some(),
        connected_secs: session.map(|d| d.as_secs()),
        inbound: keys
            .as_ref()
            .map(|k| k.inbound.iter().map(key).collect())
            .unwrap_or_default(),
        outbound: keys
            .as_ref()
            .map(|k| k.outbound.iter().map(key).collect())
            .unwrap_or_default(),
        next_rotation_secs: keys
            .as_ref()
            .and_then(|k| k.next_rotation)
            .map(|t| t.saturating_duration_since(now).as_secs()),
    }
}

/// The agent's control-plane identity: the key file's, which must be the node's
/// publicKey. A node without a publicKey is in no encrypted network (the spec's
/// validation sees to that) and may run without a key file: no peer ever dials it, so a
/// throwaway key serves.
fn load_identity(path: &std::path::Path, node: &Node) -> Result<Identity, AgentError> {
    match Identity::load(path) {
        Ok(identity) => {
            check_identity(node, &identity)?;
            Ok(identity)
        }
        Err(IdentityError::Io { source, .. })
            if node.public_key.is_none() && source.kind() == std::io::ErrorKind::NotFound =>
        {
            tracing::info!(
                key = %path.display(),
                "no key file, and this node has no publicKey (it is in no encrypted network): \
                 running with a throwaway control-plane key"
            );
            Ok(Identity::generate()?)
        }
        Err(e) => Err(e.into()),
    }
}

/// A node's publicKey, when the spec gives one, must be the key file's.
fn check_identity(node: &Node, identity: &Identity) -> Result<(), AgentError> {
    match node.public_key {
        Some(key) if key != identity.public => Err(AgentError::KeyMismatch {
            node: node.name.to_string(),
            found: identity.public.to_base64(),
        }),
        _ => Ok(()),
    }
}

/// How long after the `n`th failed pass in a row the next one runs: 1 s, doubling up to
/// a minute.
fn retry_delay(n: u32) -> Duration {
    RETRY_AFTER_FAILURE
        .saturating_mul(1 << n.saturating_sub(1).min(6))
        .min(MAX_RETRY_AFTER_FAILURE)
}

/// Whether a peer's `DialMe` wakes its dialer: a peer comes up once per start, so one
/// within [`DIAL_ME_MIN_INTERVAL`] of the last is a bug or a peer pushing us to dial it
/// over and over, and is ignored.
fn heed_dial_me(last: Option<Instant>, now: Instant) -> bool {
    last.is_none_or(|t| now.saturating_duration_since(t) >= DIAL_ME_MIN_INTERVAL)
}

/// The API's answer to an `apply` or `delete` pass: the plan carried out (also when
/// encrypted networks could not come up afterwards), then the error, if any. Encrypted
/// networks that stay down are not what a `delete` was asked about (the deletion went
/// through): a note then, not a failure.
fn answer(
    pass: Result<reconcile::Outcome, ReconcileError>,
    mut out: String,
    applied_on: Option<&NodeName>,
    deleting: bool,
) -> Response {
    let code = |e: &ReconcileError| if e.is_input_error() { 2 } else { 1 };
    let mut outcome = match pass {
        Ok(o) => o,
        Err(e) => {
            out.push_str(&e.plan_report().unwrap_or_default());
            return Response::fail(code(&e), out, e);
        }
    };
    let note = if deleting {
        outcome.encrypted_not_up.take()
    } else {
        None
    };
    out.push_str(&outcome.plan_text());
    if let Some(me) = applied_on
        && !outcome.plan.is_empty()
    {
        out.push_str(&format!(
            "Applied {} changes on node {me}.\n",
            outcome.plan.changes.len()
        ));
    }
    if let Some(e) = note {
        out.push_str(&format!("Note: {e}\n"));
    }
    match outcome.encrypted_not_up {
        Some(e) => Response::fail(code(&e), out, e),
        None => Response::ok(out),
    }
}

/// `spec` without the networks `gone` has, matched by VNI (the VNI names their devices).
fn spec_without_networks_of(spec: &Spec, gone: &Spec) -> Spec {
    let vnis: BTreeSet<spec::Vni> = gone.networks.iter().map(|n| n.vni).collect();
    let mut rest = spec.clone();
    rest.networks.retain(|n| !vnis.contains(&n.vni));
    rest
}

/// A new spec may change networks and peers, not who this agent is or where it listens.
fn compatible(old: &Spec, new: &Spec, me: &NodeName, key: &PublicKey) -> Result<(), String> {
    let Some(node) = new.node(me) else {
        return Err(format!("node {me} (this agent) is not in the new spec"));
    };
    let old_node = old.node(me);
    if old_node.map(|n| n.address) != Some(node.address) {
        return Err(format!(
            "node {me}'s address changed: restart the agent to apply that"
        ));
    }
    if node.public_key.is_some_and(|k| k != *key) {
        return Err(format!(
            "node {me}'s publicKey in the new spec is not this agent's key: restart the \
             agent (with that key's file) to apply that"
        ));
    }
    if old.cluster.name != new.cluster.name || old.cluster.control_port != new.cluster.control_port
    {
        return Err(
            "the cluster name or controlPort changed: restart the agent to apply that".into(),
        );
    }
    Ok(())
}

/// How often an agent that waits for the apply lock says so at warning level.
const LOCK_WAIT_WARNING: Duration = Duration::from_secs(30);

/// Takes the node's apply lock for the agent's whole run, waiting while a run of
/// `apply` or `delete` without an agent holds it (it started before us; its plan and
/// ours would trip over each other). Such a run that starts later finds our socket, or
/// sees us take the lock, and goes through us.
async fn take_apply_lock(
    dir: &std::path::Path,
) -> Result<nix::fcntl::Flock<std::fs::File>, AgentError> {
    let lock = dir.join("apply.lock");
    let started = Instant::now();
    let mut next_warning = started + LOCK_WAIT_WARNING;
    let waited = super::wait_for_apply_lock(dir, async |first| {
        if first {
            tracing::info!(
                lock = %lock.display(),
                "waiting for a run of apply or delete without an agent to finish"
            );
        }
        // Runs without an agent end within seconds; a lock held for long is most
        // likely another agent with the same --state-dir (its own --socket).
        if Instant::now() >= next_warning {
            next_warning += LOCK_WAIT_WARNING;
            tracing::warn!(
                lock = %lock.display(),
                waited_secs = started.elapsed().as_secs(),
                "still waiting for the node's apply lock: is another agent running with \
                 this --state-dir? Each agent needs its own"
            );
        }
        None::<std::convert::Infallible>
    })
    .await?;
    match waited {
        Ok(lock) => Ok(lock),
        Err(never) => match never {},
    }
}

/// How long a starting agent waits for its own address to become usable (an IPv6
/// address still in duplicate address detection, or one being configured as the agent
/// starts at boot).
const ADDRESS_WAIT: Duration = Duration::from_secs(60);

/// Binds the control port on the node's address, waiting (up to `wait`) while the
/// address is not usable yet.
async fn bind_control(address: SocketAddr, wait: Duration) -> Result<TcpListener, AgentError> {
    let started = Instant::now();
    let mut said = false;
    loop {
        match TcpListener::bind(address).await {
            Ok(listener) => return Ok(listener),
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) && started.elapsed() < wait => {
                if !said {
                    tracing::warn!(%address, "this node's address is not usable yet (not configured, or still tentative); waiting for it");
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(source) => return Err(AgentError::Listen { address, source }),
        }
    }
}

/// Serves the local API; returns the count of requests read and not yet answered (as
/// permits taken from [`api::MAX_API_QUEUED`]), so that a stopping agent can let their
/// answers out first.
fn spawn_api_server(
    listener: tokio::net::UnixListener,
    events: mpsc::UnboundedSender<Event>,
    changing: SharedBusy,
) -> Arc<tokio::sync::Semaphore> {
    // Requests being read (each up to MAX_API_MESSAGE in memory), and requests read
    // and waiting for or running in the agent (a rotate may take an hour).
    let reading = Arc::new(tokio::sync::Semaphore::new(api::MAX_API_CLIENTS));
    let queued = Arc::new(tokio::sync::Semaphore::new(api::MAX_API_QUEUED));
    let unanswered = queued.clone();
    let busy = |what: &str, max: usize| {
        Response::fail(
            1,
            String::new(),
            format!("the agent is busy: {max} local requests {what}; try again"),
        )
    };
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let Ok(permit) = reading.clone().try_acquire_owned() else {
                let answer = busy("being read", api::MAX_API_CLIENTS);
                tokio::spawn(async move { api::write_response(&mut stream, &answer).await });
                continue;
            };
            let events = events.clone();
            let changing = changing.clone();
            let queued = queued.clone();
            let full = busy("in progress", api::MAX_API_QUEUED);
            tokio::spawn(async move {
                let read = api::read_request(&mut stream).await;
                drop(permit);
                let slot = queued.try_acquire_owned();
                // The slot is held until the answer is written (see the agent's stop).
                let (response, _slot) = match (read, slot) {
                    (Err(e), _) => {
                        tracing::warn!(error = %e, "local API request refused");
                        (Response::fail(2, String::new(), e), None)
                    }
                    (Ok(_), Err(_)) => (full, None),
                    (Ok(request), Ok(slot)) => {
                        let is_status = matches!(request, Request::Status);
                        let (reply, mut answer) = oneshot::channel();
                        let (progress, mut progress_rx) = mpsc::unbounded_channel();
                        let event = Event::Api {
                            request,
                            reply,
                            progress,
                        };
                        if events.send(event).is_err() {
                            let stopping = Response::fail(
                                1,
                                String::new(),
                                "the agent is stopping; nothing of the request was carried out",
                            );
                            api::write_response(&mut stream, &stopping).await;
                            return;
                        }
                        if is_status {
                            let response = answer_status(&mut answer, &changing).await;
                            api::write_response(&mut stream, &response).await;
                            return;
                        }
                        // Progress lines until the answer (a client that has gone
                        // stops them; the request itself runs to its end).
                        let mut client_here = true;
                        let response = loop {
                            tokio::select! {
                                biased;
                                Some(p) = progress_rx.recv(), if client_here => {
                                    client_here = api::write_progress(&mut stream, p).await;
                                }
                                r = &mut answer => break match r {
                                    Ok(r) => r,
                                    Err(_) => Response::fail(
                                        1,
                                        String::new(),
                                        "the agent stopped before it handled the request; \
                                         nothing of it was carried out",
                                    ),
                                },
                            }
                        };
                        (response, Some(slot))
                    }
                };
                api::write_response(&mut stream, &response).await;
            });
        }
    });
    unanswered
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Name;

    /// An address that is not (yet) the node's is waited for, then reported; one that
    /// is usable is bound at once.
    #[tokio::test]
    async fn the_control_port_waits_for_its_address_then_says_why() {
        let started = Instant::now();
        let absent: SocketAddr = "192.0.2.123:7946".parse().unwrap();
        let err = bind_control(absent, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(started.elapsed() >= Duration::from_secs(1), "did not wait");
        assert!(
            err.to_string()
                .contains("cannot listen for control connections on 192.0.2.123:7946"),
            "{err}"
        );
        let here: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert!(bind_control(here, Duration::from_secs(1)).await.is_ok());
    }

    /// A local API socket in a fresh directory (kept while the first part lives), or
    /// `None`, said why, when not root: the local API answers root only.
    fn api_socket_as_root() -> Option<(
        tempfile::TempDir,
        std::path::PathBuf,
        tokio::net::UnixListener,
    )> {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: the local API answers root only, and this test is not root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = api::bind(&socket).unwrap();
        Some((dir, socket, listener))
    }

    /// A `status` request while the agent carries out a change is answered without
    /// waiting for it: the kernel's view now, the agent's view published at the start.
    #[tokio::test]
    async fn status_is_answered_while_the_agent_is_busy_with_a_change() {
        let Some((_dir, socket, listener)) = api_socket_as_root() else {
            return;
        };
        // The agent's loop: takes requests and never answers (it is busy).
        let (tx, mut rx) = mpsc::unbounded_channel();
        let held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(event) = rx.recv().await {
                held.push(event);
            }
        });
        let changing = SharedBusy::default();
        let _ = spawn_api_server(listener, tx, changing.clone());
        let call = || async {
            let mut ignore = |_: &Progress| {};
            api::call(&socket, &api::Request::Status, &mut ignore).await
        };
        // Not busy with a change: the request waits for the agent.
        assert!(
            tokio::time::timeout(Duration::from_secs(2), call())
                .await
                .is_err()
        );
        let agent = AgentStatus {
            node: "node-a".into(),
            cluster: "c".into(),
            uptime_secs: 7,
            in_sync: true,
            last_error: None,
            boot_id: "0".into(),
            peers: vec![],
            busy: None,
        };
        *changing.lock().unwrap() = Some(BusyWith {
            what: "apply",
            since: Instant::now() - Duration::from_secs(3),
            view: AgentView {
                agent,
                key_sas: vec![],
            },
        });
        let answer = tokio::time::timeout(Duration::from_secs(10), call())
            .await
            .expect("answered while the agent is busy")
            .unwrap()
            .expect("a response");
        assert_eq!(answer.error, None);
        let status: Status = serde_json::from_str(&answer.output).unwrap();
        let agent = status.agent.expect("the agent's part");
        assert_eq!(agent.node, "node-a");
        let busy = agent.busy.expect("marked busy");
        assert_eq!(busy.what, "apply");
        assert!(busy.secs >= 3, "{busy:?}");
        // Times as of now, not of the change's start; mid-change is not in sync.
        assert!(agent.uptime_secs >= 7 + 3, "{}", agent.uptime_secs);
        assert!(!agent.in_sync);
        held.abort();
    }

    /// Local clients that hold their connection without finishing a request take at
    /// most [`api::MAX_API_CLIENTS`] slots; the next client is told the agent is busy at
    /// once instead of being read into memory.
    #[tokio::test]
    async fn local_clients_are_bounded() {
        let Some((_dir, socket, listener)) = api_socket_as_root() else {
            return;
        };
        let (tx, _rx) = mpsc::unbounded_channel();
        let _ = spawn_api_server(listener, tx, SharedBusy::default());
        let mut idle = Vec::new();
        for _ in 0..api::MAX_API_CLIENTS {
            let mut s = tokio::net::UnixStream::connect(&socket).await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut s, b"{")
                .await
                .unwrap();
            idle.push(s);
        }
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            api::call(&socket, &api::Request::Status, &mut |_| {}),
        )
        .await
        .expect("answered at once")
        .unwrap()
        .expect("a response");
        assert!(
            answer.error.as_deref().is_some_and(|e| e.contains("busy")),
            "{:?}",
            answer.error
        );
        // A slot given back (its client gone) serves the next client.
        drop(idle.pop());
        let mut text = String::new();
        for _ in 0..100 {
            let mut s = tokio::net::UnixStream::connect(&socket).await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut s, b"not json")
                .await
                .unwrap();
            tokio::io::AsyncWriteExt::shutdown(&mut s).await.unwrap();
            text.clear();
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::io::AsyncReadExt::read_to_string(&mut s, &mut text),
            )
            .await;
            if !text.contains("busy") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(text.contains("malformed request"), "{text}");
    }

    const SPEC: &str = "apiVersion: ovl/v1\ncluster:\n  name: t\nnodes:\n  - name: a\n    \
                        address: 192.0.2.1\n  - name: b\n    address: 192.0.2.2\nnetworks:\n  \
                        - name: blue\n    vni: 100\n  - name: green\n    vni: 101\n  \
                        - name: red\n    vni: 102\n";

    fn spec(text: &str) -> Spec {
        spec::parse(text.as_bytes(), "t.yaml").unwrap()
    }

    #[test]
    fn failed_passes_are_retried_ever_later_up_to_a_minute() {
        let delays: Vec<u64> = (1..=9).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(retry_delay(u32::MAX), MAX_RETRY_AFTER_FAILURE);
    }

    #[test]
    fn dial_me_is_heeded_at_most_once_a_second() {
        let t = Instant::now();
        assert!(heed_dial_me(None, t));
        assert!(!heed_dial_me(Some(t), t));
        assert!(!heed_dial_me(Some(t), t + Duration::from_millis(999)));
        assert!(heed_dial_me(Some(t), t + DIAL_ME_MIN_INTERVAL));
    }

    #[test]
    fn a_deleted_network_leaves_the_agents_spec_by_vni() {
        let kept = spec(SPEC);
        // Another file naming vni 101 differently still deletes it; unknown VNIs are
        // ignored.
        let gone = spec(&SPEC.replace("name: green", "name: other").replace(
            "  - name: red\n    vni: 102\n",
            "  - name: red\n    vni: 999\n",
        ));
        let gone = Spec {
            networks: gone
                .networks
                .into_iter()
                .filter(|n| n.vni != kept.networks[0].vni)
                .collect(),
            ..gone
        };
        let rest = spec_without_networks_of(&kept, &gone);
        let names: Vec<&str> = rest.networks.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["blue", "red"]);
        assert_eq!(rest.nodes, kept.nodes);
        assert_eq!(rest.cluster, kept.cluster);
    }

    #[test]
    fn a_keyless_node_runs_with_a_throwaway_key_only_without_a_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("node.key");
        let keyless = spec(SPEC);
        let node = keyless.node(&Name::new("a").unwrap()).unwrap();
        let first = load_identity(&missing, node).unwrap();
        let second = load_identity(&missing, node).unwrap();
        assert_ne!(
            first.public, second.public,
            "a throwaway key is fresh each time"
        );
        assert!(!missing.exists(), "a throwaway key is never written");

        // With a key file, its key is used; a publicKey in the spec must be that one.
        let written = Identity::generate().unwrap();
        written.write(&missing).unwrap();
        assert_eq!(
            load_identity(&missing, node).unwrap().public,
            written.public
        );
        let other = Identity::generate().unwrap();
        let keyed = |key: &PublicKey| Node {
            public_key: Some(*key),
            ..node.clone()
        };
        assert!(load_identity(&missing, &keyed(&written.public)).is_ok());
        assert!(matches!(
            load_identity(&missing, &keyed(&other.public)),
            Err(AgentError::KeyMismatch { .. })
        ));
        // A node with a publicKey never gets a throwaway key.
        let absent = dir.path().join("absent.key");
        assert!(matches!(
            load_identity(&absent, &keyed(&written.public)),
            Err(AgentError::Identity(IdentityError::Io { .. }))
        ));
    }

    #[test]
    fn an_apply_may_leave_out_a_keyless_nodes_key_but_not_change_it() {
        let old = spec(SPEC);
        let me = Name::new("a").unwrap();
        let key = Identity::generate().unwrap().public;
        assert_eq!(compatible(&old, &old, &me, &key), Ok(()));
        let other = Identity::generate().unwrap().public;
        let mut keyed = old.clone();
        keyed.nodes[0].public_key = Some(other);
        assert!(
            compatible(&old, &keyed, &me, &key)
                .unwrap_err()
                .contains("publicKey")
        );
        keyed.nodes[0].public_key = Some(key);
        assert_eq!(compatible(&old, &keyed, &me, &key), Ok(()));
    }

    #[test]
    fn the_api_answer_keeps_the_plan_when_encrypted_networks_stay_down() {
        let down = reconcile::Outcome {
            plan: crate::plan::Plan::default(),
            encrypted_not_up: Some(ReconcileError::EncryptedNotUp {
                networks: "sec".into(),
                reason: "no ESP".into(),
            }),
        };
        let me = Name::new("a").unwrap();
        let r = answer(Ok(down), "head\n".into(), Some(&me), false);
        assert_eq!(r.code, 1);
        assert!(r.output.starts_with("head\n"), "{}", r.output);
        assert!(r.error.is_some());
        let fine = reconcile::Outcome {
            plan: crate::plan::Plan::default(),
            encrypted_not_up: None,
        };
        let r = answer(Ok(fine), String::new(), Some(&me), false);
        assert_eq!((r.code, r.error), (0, None));
    }
}
