//! The gossip thread's event loop: endpoint set-up, publishing this node's
//! records, tracking every remote origin, state pulls and leases.
//!
//! Invariant: only this loop sends remote records to the registry, and it
//! keeps one [`OriginState`] per remote origin; the records of an origin are
//! held from a full state plus the consecutive deltas that follow it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_channel::{Sender, TrySendError};
use futures_lite::StreamExt;
use iroh::address_lookup::memory::MemoryLookup;
use iroh::endpoint::{Connection, PortmapperConfig, QuicTransportConfig, presets};
use iroh::protocol::{AcceptError, ProtocolHandler, Router};
use iroh::{Endpoint, EndpointAddr, EndpointId, RelayMode, SecretKey};
use iroh_gossip::api::{Event, GossipReceiver, GossipSender, JoinOptions};
use iroh_gossip::proto::TopicId;

use super::auth::{AuthHandler, AuthState, CORE_ALPN, Hooks, STATE_ALPN};
use super::core::{Body, Core, Direct, Input, Output, Params, Seal, Signed};
use super::driver::{self, CoreHandler, ServeRequest};
use super::wire::{
    self, Change, DropReason, Encoding, Fresh, Opened, Payload, ReplayWindow, Ring, Versions,
};
use super::{Bound, Command, GossipStats, PeerStatus, Peers};
use crate::config::{Config, KeyId, Keyring};
use crate::registry::RegistryMsg;
use crate::table::{Group, Groups, Origin, SharedTable, Source, Table};

/// Period of the housekeeping tick (leases, pulls, heartbeats, re-joins).
pub const TICK: Duration = Duration::from_millis(100);
/// Shortest heartbeat period (the period is a third of the lease).
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(200);
/// A start is "settled" (ready to announce and serve its full state) once
/// the Docker thread made its first attempt (resynchronised, or found the
/// engine unreachable), this long has passed, and no local change came for
/// [`SETTLE_QUIET`] (since that attempt too)...
pub const SETTLE_MIN: Duration = Duration::from_millis(500);
pub const SETTLE_QUIET: Duration = Duration::from_millis(250);
/// ...or at the latest after this long (an engine that neither answers
/// nor refuses).
pub const SETTLE_MAX: Duration = Duration::from_secs(10);
/// How long a version gap may last before a full-state pull.
pub const GAP_GRACE: Duration = Duration::from_millis(300);
/// Wait before retrying a failed state pull.
pub const PULL_RETRY: Duration = Duration::from_secs(1);
/// Longest a state pull may take.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(10);
/// Most state pulls running at once.
pub const MAX_PULLS: usize = 8;
/// Out-of-order deltas kept per origin while waiting for the missing ones.
pub const MAX_PENDING: usize = 4096;
/// Re-join known peers this often while the neighbour set is small.
pub const REJOIN_EVERY: Duration = Duration::from_secs(2);
/// The neighbour set is "small" below this many (or below the number of
/// known peers, when fewer).
pub const WANTED_NEIGHBORS: usize = 3;
/// Shortest interval between two heartbeats sent in answer to `Hello`s.
pub const HELLO_ANSWER_EVERY: Duration = Duration::from_millis(200);
/// Period of the `/peers` refresh.
pub const PEERS_EVERY: Duration = Duration::from_millis(500);
/// QUIC idle timeout of every connection (iroh's default is 30 s): a peer
/// that vanished (`kill -9`, a cut link) leaves the neighbour set sooner, so
/// re-joins start sooner. Records still rest on the lease only.
pub const QUIC_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// `/peers` forgets a peer silent for this many leases.
pub const PEER_FORGET_LEASES: u32 = 40;
/// Most peers found by mDNS remembered (announcements are not
/// authenticated; those never admitted make room first).
pub const MAX_DISCOVERED: usize = 256;
/// Capacity of the queue of peers found by mDNS.
pub const DISCOVERED_CAPACITY: usize = 64;
/// Capacity of the event subscription (the buffer before `Lagged`).
pub const SUBSCRIPTION_CAPACITY: usize = 4096;
/// Most peers one heartbeat is pushed to directly (see [`Node::push_direct`]).
pub const MAX_DIRECT_PEERS: usize = 16;
/// Capacity of the queue of heartbeats pushed to us directly; a full queue
/// drops (the next one comes a third of a lease later).
pub const DIRECT_CAPACITY: usize = 64;
/// Longest a direct push may take.
pub const PUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest an admitted peer connected on [`STATE_ALPN`] may take to open
/// its stream and say what it wants, and to send a pushed heartbeat.
pub const STATE_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// QUIC application close code of a state connection that timed out.
pub const STATE_TIMEOUT_CODE: u32 = 408;
/// First byte of a [`STATE_ALPN`] stream: send me your full state...
pub const REQUEST_PULL: u8 = 1;
/// ...or: here is a sealed heartbeat of mine (then the message, then EOF).
pub const REQUEST_PUSH: u8 = 2;

/// Everything the thread needs, moved into it.
pub(super) struct Setup {
    pub config: Config,
    pub key: SecretKey,
    pub incarnation: u64,
    pub origin: Origin,
    pub table: SharedTable,
    pub registry: Sender<RegistryMsg>,
    pub stats: Arc<GossipStats>,
    pub peers: Peers,
    /// The Docker thread's counters: this node announces itself after its
    /// first resync (or failed connection). `None`: static records only.
    pub docker: Option<Arc<crate::docker::DockerStats>>,
}

/// What this node has published, shared with the state server.
#[derive(Default)]
struct Published {
    version: u64,
    /// This node's groups as of `version`; updated in place, one changed
    /// group at a time.
    groups: BTreeMap<Source, Group>,
    ready: bool,
    /// Sealed full state of `version` at a protocol version, reused until
    /// the next change.
    cache: Option<(u64, u8, Arc<Vec<u8>>)>,
}

/// This node's signing identity, shared with the state server.
struct Me {
    /// The keyring (swapped on `SIGHUP`), shared with admission.
    ring: Arc<ArcSwap<Ring>>,
    /// Versions this node speaks.
    versions: Versions,
    /// Version of broadcasts: the highest every live peer speaks.
    send_version: AtomicU8,
    key: SecretKey,
    node_name: String,
    incarnation: u64,
    seq: AtomicU64,
    published: Mutex<Published>,
    stats: Arc<GossipStats>,
}

impl Me {
    /// Seals at the broadcast version.
    fn seal(&self, payload: Payload) -> Vec<u8> {
        self.seal_at(self.send_version.load(Ordering::Relaxed), payload)
    }

    /// Seals at `version` (one peer's, for a direct stream).
    fn seal_at(&self, version: u8, payload: Payload) -> Vec<u8> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        wire::seal_own(
            &self.ring.load(),
            Encoding {
                version,
                speaks: self.versions.max,
            },
            &self.key,
            &self.node_name,
            self.incarnation,
            seq,
            payload,
        )
    }

    /// Opens a message with the current ring, at a version this node speaks.
    fn open(&self, bytes: &[u8], max_len: usize) -> Result<Opened, DropReason> {
        wire::open(&self.ring.load(), self.versions, bytes, max_len)
    }

    /// The sealed full state at protocol `at`, or a not-ready heartbeat.
    fn full_state(&self, at: u8) -> Arc<Vec<u8>> {
        let mut p = self.published.lock().expect("published lock");
        if !p.ready {
            let hb = Payload::Heartbeat {
                version: p.version,
                n_groups: p.groups.len() as u64,
                ready: false,
            };
            return Arc::new(self.seal_at(at, hb));
        }
        if let Some((v, a, bytes)) = &p.cache
            && *v == p.version
            && *a == at
        {
            return bytes.clone();
        }
        let payload = Payload::FullState {
            version: p.version,
            groups: p.groups.iter().map(|(s, g)| (s.into(), g.into())).collect(),
        };
        let bytes = Arc::new(self.seal_at(at, payload));
        p.cache = Some((p.version, at, bytes.clone()));
        bytes
    }
}

/// Seals the replication core's messages at the current version (v4)
/// with this node's key, under the keyring's primary key.
struct CoreSeal(Arc<Me>);

impl Seal for CoreSeal {
    fn seal(&mut self, body: &Body) -> Arc<[u8]> {
        self.0
            .seal_at(wire::PROTOCOL_VERSION, Payload::Core(body.clone()))
            .into()
    }
}

/// Result of a core transfer task: the verified messages, or `None`.
type Transferred = (EndpointId, Option<Vec<Signed>>);

/// Serves this node's full state on [`STATE_ALPN`], and takes heartbeats
/// pushed there by peers that are not our gossip neighbours (admitted peers
/// only: the hooks gate the connection).
#[derive(Clone)]
struct StateHandler {
    me: Arc<Me>,
    auth: Arc<AuthState>,
    direct: tokio::sync::mpsc::Sender<(EndpointId, Vec<u8>)>,
}

impl std::fmt::Debug for StateHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateHandler")
    }
}

impl ProtocolHandler for StateHandler {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        // Keep-alives hold an idle connection open: every wait on the peer
        // has a deadline, after which the connection is closed.
        let request = async {
            let (send, mut recv) = conn.accept_bi().await?;
            let mut req = [0u8; 1];
            recv.read_exact(&mut req)
                .await
                .map_err(AcceptError::from_err)?;
            if req[0] != REQUEST_PUSH {
                return Ok((send, None));
            }
            let bytes = recv
                .read_to_end(wire::MAX_GOSSIP_BYTES)
                .await
                .map_err(AcceptError::from_err)?;
            Ok::<_, AcceptError>((send, Some(bytes)))
        };
        let Ok(request) = tokio::time::timeout(STATE_REQUEST_TIMEOUT, request).await else {
            conn.close(STATE_TIMEOUT_CODE.into(), b"too slow");
            return Ok(());
        };
        let (mut send, pushed) = request?;
        if let Some(bytes) = pushed {
            // Verified by the gossip loop, like any gossip message.
            let _ = self.direct.try_send((conn.remote_id(), bytes));
            send.write_all(&[1]).await.map_err(AcceptError::from_err)?;
            send.finish()?;
            let _ = tokio::time::timeout(PUSH_TIMEOUT, conn.closed()).await;
            return Ok(());
        }
        let at = self
            .auth
            .version_with(&conn.remote_id())
            .unwrap_or(self.me.versions.min);
        let bytes = self.me.full_state(at);
        let Ok(written) = tokio::time::timeout(PULL_TIMEOUT, send.write_all(&bytes)).await else {
            conn.close(STATE_TIMEOUT_CODE.into(), b"too slow");
            return Ok(());
        };
        written.map_err(AcceptError::from_err)?;
        send.finish()?;
        self.me.stats.state_served.fetch_add(1, Ordering::Relaxed);
        let _ = tokio::time::timeout(PULL_TIMEOUT, conn.closed()).await;
        Ok(())
    }
}

/// What the loop knows of one remote origin.
struct OriginState {
    node_name: String,
    /// Highest protocol version it speaks, version and key of its last
    /// message.
    speaks: u8,
    version: u8,
    key_id: Option<KeyId>,
    window: ReplayWindow,
    last_heard: Instant,
    /// Version of the records we hold for the current incarnation; `None`
    /// until a full state of this incarnation arrived.
    known: Option<u64>,
    /// Highest version heard of in this incarnation.
    advertised: u64,
    ready: bool,
    /// The registry holds records of this origin.
    holds: bool,
    pending: BTreeMap<u64, Vec<Change>>,
    gap_since: Option<Instant>,
    pulling: bool,
    next_pull: Instant,
    expired: bool,
}

impl OriginState {
    fn new(now: Instant) -> OriginState {
        OriginState {
            node_name: String::new(),
            speaks: wire::PROTOCOL_VERSION,
            version: 0,
            key_id: None,
            window: ReplayWindow::default(),
            last_heard: now,
            known: None,
            advertised: 0,
            ready: false,
            holds: false,
            pending: BTreeMap::new(),
            gap_since: None,
            pulling: false,
            next_pull: now,
            expired: false,
        }
    }

    /// True when the origin has been silent for longer than the lease.
    fn lease_expired(&self, now: Instant, lease: Duration) -> bool {
        !self.expired && now.saturating_duration_since(self.last_heard) > lease
    }

    /// True when a full-state pull is due.
    fn wants_pull(&self, now: Instant) -> bool {
        if self.pulling || self.expired || !self.ready || now < self.next_pull {
            return false;
        }
        match self.known {
            None => true,
            Some(k) => {
                self.advertised > k
                    && self
                        .gap_since
                        .is_some_and(|t| now.duration_since(t) >= GAP_GRACE)
            }
        }
    }
}

/// Result of a state pull task.
struct Pulled {
    id: EndpointId,
    result: Result<Opened, String>,
}

struct Node {
    me: Arc<Me>,
    my_id: EndpointId,
    table: SharedTable,
    registry: Sender<RegistryMsg>,
    stats: Arc<GossipStats>,
    peers: Peers,
    endpoint: Endpoint,
    auth: Arc<AuthState>,
    memory: MemoryLookup,
    router: Router,
    gossip: iroh_gossip::net::Gossip,
    topic: TopicId,
    sender: GossipSender,
    lease: Duration,
    heartbeat_every: Duration,
    started: Instant,
    last_local_change: Instant,
    /// Smallest key of this node's groups in the table (the table is sorted
    /// by origin, then source): where the range over them starts.
    local_lo: (Origin, Source),
    /// The table `me.published.groups` was last brought up to date with (a
    /// weak pointer: compared, never read, and it keeps no group alive).
    last_seen: Weak<Table>,
    next_heartbeat: Instant,
    last_hello_answer: Option<Instant>,
    next_rejoin: Instant,
    next_peers: Instant,
    neighbors: HashSet<EndpointId>,
    bootstrap: Vec<(EndpointId, Option<String>)>,
    origins: HashMap<EndpointId, OriginState>,
    n_pulls: usize,
    pulled_tx: tokio::sync::mpsc::Sender<Pulled>,
    discovered_rx: tokio::sync::mpsc::Receiver<EndpointId>,
    /// Heartbeats pushed to us directly, with the peer that pushed them.
    direct_rx: tokio::sync::mpsc::Receiver<(EndpointId, Vec<u8>)>,
    /// Peers found by mDNS.
    discovered: HashSet<EndpointId>,
    /// The replication core (protocol v4). `None` on a node held at v3
    /// (`protocol_version = 3`), which runs the v3 protocol alone.
    core: Option<Core<CoreSeal>>,
    core_direct_rx: tokio::sync::mpsc::Receiver<(EndpointId, Direct)>,
    serve_rx: tokio::sync::mpsc::Receiver<ServeRequest>,
    transfer_tx: tokio::sync::mpsc::Sender<Transferred>,
    transfer_rx: tokio::sync::mpsc::Receiver<Transferred>,
    /// Bounds the core's direct messages in flight.
    sends: Arc<tokio::sync::Semaphore>,
    next_addrs: Instant,
    next_save: Instant,
    data_dir: std::path::PathBuf,
    /// What the last save wrote (the same `Arc`s: nothing new to write);
    /// `None` until the first save, which always writes.
    saved: Option<Vec<Arc<[u8]>>>,
    /// Known peers pinged by the healing timer, joined when they ack.
    heal_pings: HashSet<EndpointId>,
    /// Connections kept for the core's requests.
    conns: driver::Conns,
    docker: Option<Arc<crate::docker::DockerStats>>,
    /// When the Docker thread's first attempt was seen done.
    docker_settled: Option<Instant>,
}

/// Nonce of the healing timer's pings (the core's probes count from 1 and
/// ignore an ack that is not their probe's).
pub const HEAL_PING_NONCE: u64 = 0;

/// Time given to the gossip actor to send the signed leave before the
/// router shuts down (well within `STOP_GRACE`).
pub const LEAVE_LINGER: Duration = Duration::from_millis(150);
/// Longest a stop waits for the remote states to be written.
pub const SAVE_WAIT: Duration = Duration::from_millis(200);
/// Period of the check of this node's own direct addresses (carried in
/// its signed `Alive`, so peers can dial it after their caches expired).
pub const ADDRS_EVERY: Duration = Duration::from_secs(2);
/// Room in the channel of finished core transfers (more than the core's
/// pulls in flight, `transfer::MAX_PULLS`).
pub const TRANSFER_CAPACITY: usize = 16;

/// How long a stopping gossip loop has to leave on its own before the
/// halt signal ends it (longer than its own bounded leave, `STOP_TIMEOUT`).
const STOP_GRACE: Duration = Duration::from_millis(700);

/// Entry point of the gossip thread.
pub(super) fn run_thread(
    setup: Setup,
    mut inbox: tokio::sync::mpsc::Receiver<Command>,
    mut halt: tokio::sync::watch::Receiver<super::Halt>,
    bound: std::sync::mpsc::Sender<anyhow::Result<Bound>>,
) {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(super::RUNTIME_WORKERS)
        .thread_name("gossip-rt")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = bound.send(Err(anyhow::anyhow!("gossip runtime: {e}")));
            return;
        }
    };
    let kill = rt.block_on(async move {
        let (mut node, receiver, mut pulled_rx) = match Node::start(setup).await {
            Ok(n) => n,
            Err(e) => {
                let _ = bound.send(Err(e));
                return false;
            }
        };
        let _ = bound.send(Ok(Bound {
            id: node.my_id,
            addrs: node.endpoint.bound_sockets(),
            incarnation: node.me.incarnation,
        }));
        // A handler that awaits the network forever (a stuck broadcast or
        // subscribe) must not hold a stop. The loop normally takes the stop
        // from its inbox and leaves cleanly; the halt signal ends it only
        // when it has not done so within `STOP_GRACE` (or at once for a
        // kill), so a healthy loop's shutdown is never cut short.
        let killed = tokio::select! {
            biased;
            killed = node.run(receiver, &mut inbox, &mut pulled_rx) => killed,
            kill = async {
                let kill = match halt.wait_for(|h| *h != super::Halt::Run).await {
                    Ok(h) => *h == super::Halt::Kill,
                    Err(_) => std::future::pending().await,
                };
                if !kill {
                    tokio::time::sleep(STOP_GRACE).await;
                }
                kill
            } => {
                if !kill {
                    log::warn!("the gossip loop did not stop within {STOP_GRACE:?}; leaving anyway");
                    let _ = tokio::time::timeout(super::STOP_TIMEOUT, node.router.shutdown()).await;
                }
                kill
            }
        };
        // Break the endpoint → hooks → auth state → endpoint cycle.
        node.auth.set_endpoint(None);
        killed
    });
    if kill {
        rt.shutdown_background();
    } else {
        rt.shutdown_timeout(Duration::from_millis(100));
    }
}

impl Node {
    async fn start(
        setup: Setup,
    ) -> anyhow::Result<(Node, GossipReceiver, tokio::sync::mpsc::Receiver<Pulled>)> {
        let Setup {
            config,
            key,
            incarnation,
            origin,
            table,
            registry,
            stats,
            peers,
            docker,
        } = setup;
        let ring = Arc::new(ArcSwap::from_pointee(Ring::new(&config.cluster_keys)));
        let versions = Versions::speaking(config.protocol_version);
        let topic = TopicId::from_bytes(config.topic_id.unwrap_or(super::DEFAULT_TOPIC));
        let mut bootstrap = Vec::new();
        for p in &config.bootstrap_peers {
            match p.id.parse::<EndpointId>() {
                Ok(id) => bootstrap.push((id, p.addr.clone())),
                Err(e) => log::warn!("ignoring bootstrap peer {}: bad id: {e}", p.id),
            }
        }
        let auth = Arc::new(AuthState::new(
            ring.clone(),
            versions,
            incarnation,
            bootstrap.iter().map(|(id, _)| *id).collect(),
            stats.clone(),
        ));
        let memory = MemoryLookup::new();
        let transport = QuicTransportConfig::builder()
            .max_idle_timeout(Some(
                QUIC_IDLE_TIMEOUT
                    .try_into()
                    .expect("idle timeout within QUIC bounds"),
            ))
            .build();
        let endpoint = Endpoint::builder(presets::Minimal)
            .secret_key(key.clone())
            .relay_mode(RelayMode::Disabled)
            .portmapper_config(PortmapperConfig::Disabled)
            .transport_config(transport)
            .address_lookup(memory.clone())
            .addr_filter(bridge_filter())
            .hooks(Hooks {
                state: auth.clone(),
                gossip_alpn: iroh_gossip::ALPN,
            })
            .clear_ip_transports()
            .bind_addr(config.gossip_bind)
            .map_err(|e| anyhow::anyhow!("gossip bind address {}: {e}", config.gossip_bind))?
            .bind()
            .await
            .map_err(|e| anyhow::anyhow!("binding gossip on {}: {e}", config.gossip_bind))?;
        auth.set_endpoint(Some(endpoint.clone()));
        let my_id = endpoint.id();
        log::info!(
            "Gossip endpoint created: id {my_id}, bound {:?}, cluster keys {}, protocol versions {versions}",
            endpoint.bound_sockets(),
            config.cluster_keys.describe()
        );
        let (discovered_tx, discovered_rx) = tokio::sync::mpsc::channel(DISCOVERED_CAPACITY);
        let (direct_tx, direct_rx) = tokio::sync::mpsc::channel(DIRECT_CAPACITY);
        if config.mdns
            && let Some(mdns) = start_mdns(&endpoint)
        {
            tokio::spawn(async move {
                let mut events = mdns.subscribe().await;
                while let Some(event) = events.next().await {
                    if let iroh_mdns_address_lookup::DiscoveryEvent::Discovered {
                        endpoint_info,
                        ..
                    } = event
                        && discovered_tx.send(endpoint_info.endpoint_id).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
        let gossip = iroh_gossip::net::Gossip::builder()
            .max_message_size(wire::GOSSIP_MAX_MESSAGE_SIZE)
            .spawn(endpoint.clone());
        let me = Arc::new(Me {
            ring,
            versions,
            send_version: AtomicU8::new(versions.max),
            key,
            node_name: config.node_name.clone(),
            incarnation,
            seq: AtomicU64::new(0),
            published: Mutex::new(Published::default()),
            stats: stats.clone(),
        });
        let filter_auth = auth.clone();
        let core_on = versions.max >= wire::PROTOCOL_VERSION;
        let (core_direct_tx, core_direct_rx) = tokio::sync::mpsc::channel(driver::DIRECT_INBOX);
        let (serve_tx, serve_rx) = tokio::sync::mpsc::channel(driver::SERVE_INBOX);
        let mut router = Router::builder(endpoint.clone())
            .incoming_filter(Arc::new(move |incoming| {
                filter_auth.filter_incoming(incoming)
            }))
            .accept(iroh_gossip::ALPN, gossip.clone())
            .accept(super::auth::AUTH_ALPN, AuthHandler(auth.clone()))
            .accept(
                STATE_ALPN,
                StateHandler {
                    me: me.clone(),
                    auth: auth.clone(),
                    direct: direct_tx,
                },
            );
        if core_on {
            router = router.accept(
                CORE_ALPN,
                CoreHandler {
                    direct: core_direct_tx,
                    serve: serve_tx,
                },
            );
        }
        let router = router.spawn();
        let unresolved = resolve_bootstrap(&memory, &bootstrap, true).await;
        let topic_handle = gossip
            .subscribe_with_opts(
                topic,
                join_options(
                    bootstrap
                        .iter()
                        .map(|(id, _)| *id)
                        .filter(|id| !unresolved.contains(id)),
                ),
            )
            .await
            .map_err(|e| {
                auth.set_endpoint(None);
                anyhow::anyhow!("joining the gossip topic: {e}")
            })?;
        let (sender, receiver) = topic_handle.split();
        let lease = Duration::from_secs(config.lease_secs.max(1));
        let now = Instant::now();
        let (pulled_tx, pulled_rx) = tokio::sync::mpsc::channel(MAX_PULLS * 2);
        let (transfer_tx, transfer_rx) = tokio::sync::mpsc::channel(TRANSFER_CAPACITY);
        let core = core_on.then(|| {
            let mut core = Core::new(
                *my_id.as_bytes(),
                &config.node_name,
                incarnation,
                Params::new(lease),
                CoreSeal(me.clone()),
                fastrand::u64(..),
                now,
            );
            core.handle(
                now,
                Input::Start {
                    bootstrap: bootstrap.iter().map(|(id, _)| *id.as_bytes()).collect(),
                },
            );
            // The remote states held before the restart, verified like
            // messages from the network: served until fresher ones arrive.
            let held: Vec<Signed> = super::persist::load(&config.data_dir)
                .into_iter()
                .filter_map(|raw| {
                    let o = me.open(&raw, wire::MAX_STREAM_BYTES).ok()?;
                    (o.version >= wire::PROTOCOL_VERSION && o.header.origin != *my_id.as_bytes())
                        .then(|| driver::signed(o, &raw))?
                })
                .collect();
            if !held.is_empty() {
                log::info!(
                    "gossip: serving {} verified messages of remote origins kept from before the restart",
                    held.len()
                );
                core.handle(
                    now,
                    Input::Transfer {
                        from: *my_id.as_bytes(),
                        msgs: Some(held),
                    },
                );
            }
            core
        });
        let local_lo = (
            Origin {
                id: origin.id.clone(),
                node_name: "".into(),
            },
            Source::Static {
                name: Default::default(),
            },
        );
        let node = Node {
            me,
            my_id,
            table,
            registry,
            stats,
            peers,
            endpoint,
            auth,
            memory,
            router,
            gossip,
            topic,
            sender,
            lease,
            heartbeat_every: (lease / 3).max(MIN_HEARTBEAT),
            started: now,
            last_local_change: now,
            local_lo,
            last_seen: Weak::new(),
            next_heartbeat: now,
            last_hello_answer: None,
            next_rejoin: now + REJOIN_EVERY,
            next_peers: now,
            neighbors: HashSet::new(),
            bootstrap,
            origins: HashMap::new(),
            n_pulls: 0,
            pulled_tx,
            discovered_rx,
            direct_rx,
            discovered: HashSet::new(),
            core,
            core_direct_rx,
            serve_rx,
            transfer_tx,
            transfer_rx,
            sends: Arc::new(tokio::sync::Semaphore::new(driver::MAX_SENDS)),
            next_addrs: now,
            next_save: now + super::persist::SAVE_EVERY,
            data_dir: config.data_dir.clone(),
            saved: None,
            heal_pings: HashSet::new(),
            conns: driver::Conns::default(),
            docker,
            docker_settled: None,
        };
        Ok((node, receiver, pulled_rx))
    }

    /// The loop; returns true when killed (no clean leave).
    async fn run(
        &mut self,
        mut receiver: GossipReceiver,
        inbox: &mut tokio::sync::mpsc::Receiver<Command>,
        pulled_rx: &mut tokio::sync::mpsc::Receiver<Pulled>,
    ) -> bool {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        self.run_outputs().await;
        loop {
            // TICK (100 ms) keeps an idle loop beating.
            self.stats.heartbeat.beat();
            tokio::select! {
                cmd = inbox.recv() => match cmd {
                    None | Some(Command::Stop) => {
                        // The signed leave, within the stop's grace: the
                        // gossip actor needs a moment to send it before the
                        // router shuts down.
                        let leaving = self.core.as_ref().is_some_and(|c| c.is_ready());
                        self.core_input(Input::Stop).await;
                        self.save_states(true).await;
                        if leaving {
                            tokio::time::sleep(LEAVE_LINGER).await;
                        }
                        break;
                    }
                    Some(Command::Kill) => return true,
                    Some(Command::LocalChanged) => {
                        self.last_local_change = Instant::now();
                        self.publish().await;
                    }
                    Some(Command::BroadcastRaw(bytes)) => self.broadcast(bytes).await,
                    Some(Command::Block(ids, blocked)) => self.auth.block(&ids, blocked),
                    Some(Command::SetKeyring(keyring)) => self.set_keyring(keyring),
                },
                event = receiver.next() => match event {
                    Some(Ok(event)) => self.on_event(event).await,
                    Some(Err(e)) => {
                        log::debug!("gossip event stream error: {e}");
                        receiver = self.resubscribe().await;
                    }
                    None => receiver = self.resubscribe().await,
                },
                Some(p) = pulled_rx.recv() => self.on_pulled(p),
                Some(id) = self.discovered_rx.recv() => self.on_discovered(id).await,
                Some((from, bytes)) = self.direct_rx.recv() => self.on_direct(from, bytes).await,
                Some((from, msg)) = self.core_direct_rx.recv() => {
                    if matches!(msg, Direct::Ack { .. })
                        && self.heal_pings.remove(&from)
                        && !self.neighbors.contains(&from)
                    {
                        log::debug!("gossip: re-joining {from}");
                        let _ = self.sender.join_peers(vec![from]).await;
                    }
                    if !self.auth.is_blocked(&from) {
                        let from = *from.as_bytes();
                        self.core_input(Input::Direct { from, msg }).await;
                    }
                }
                Some((want, answer)) = self.serve_rx.recv() => {
                    if let Some(core) = self.core.as_mut() {
                        let _ = answer.send(core.serve(&want));
                    }
                }
                Some((from, msgs)) = self.transfer_rx.recv() => {
                    let from = *from.as_bytes();
                    self.core_input(Input::Transfer { from, msgs }).await;
                }
                _ = tick.tick() => self.on_tick().await,
            }
        }
        let _ = tokio::time::timeout(super::STOP_TIMEOUT, self.router.shutdown()).await;
        false
    }

    async fn resubscribe(&mut self) -> GossipReceiver {
        loop {
            let peers = self.known_peers();
            match self
                .gossip
                .subscribe_with_opts(self.topic, join_options(peers))
                .await
            {
                Ok(t) => {
                    let (sender, receiver) = t.split();
                    self.sender = sender;
                    self.neighbors.clear();
                    return receiver;
                }
                Err(e) => {
                    log::warn!("re-subscribing to the gossip topic: {e}");
                    tokio::time::sleep(REJOIN_EVERY).await;
                }
            }
        }
    }

    /// True while the v3 protocol must run beside the core: on a node held
    /// at v3, and on a v4 node while a live peer speaks only v3 (the
    /// broadcast version is then 3).
    fn legacy(&self) -> bool {
        self.core.is_none() || self.me.send_version.load(Ordering::Relaxed) < wire::PROTOCOL_VERSION
    }

    /// Writes the signed states this node holds of remote origins to the
    /// data dir (off the loop's thread; waited for at a stop).
    async fn save_states(&mut self, wait: bool) {
        let Some(core) = self.core.as_mut() else {
            return;
        };
        let msgs = core.held();
        let unchanged = self.saved.as_ref().is_some_and(|saved| {
            saved.len() == msgs.len() && saved.iter().zip(&msgs).all(|(a, b)| Arc::ptr_eq(a, b))
        });
        if unchanged {
            return;
        }
        self.saved = Some(msgs.clone());
        let dir = self.data_dir.clone();
        let task = tokio::task::spawn_blocking(move || {
            if let Err(e) = super::persist::save(&dir, msgs.iter().map(|m| &m[..])) {
                log::warn!("gossip: keeping remote states in {}: {e}", dir.display());
            }
        });
        if wait {
            let _ = tokio::time::timeout(SAVE_WAIT, task).await;
        }
    }

    /// Hands one input to the core and carries out what it decided.
    async fn core_input(&mut self, input: Input) {
        let Some(core) = self.core.as_mut() else {
            return;
        };
        let oversize = core.stats.oversize_changes;
        core.handle(Instant::now(), input);
        let more = core.stats.oversize_changes - oversize;
        if more > 0 {
            self.stats
                .oversize_changes
                .fetch_add(more, Ordering::Relaxed);
        }
        self.run_outputs().await;
    }

    /// Carries out the core's outputs.
    async fn run_outputs(&mut self) {
        let Some(core) = self.core.as_mut() else {
            return;
        };
        let outputs: Vec<Output> = core.drain().collect();
        for output in outputs {
            match output {
                Output::Broadcast(raw) => self.broadcast(raw.to_vec()).await,
                Output::Send(to, msg) => {
                    log::trace!("gossip: sending {msg:?} to {}", driver::origin_id(&to));
                    self.send_core(to, msg)
                }
                Output::Pull { from, want } => {
                    log::debug!(
                        "gossip: pulling {} from {}",
                        match &want {
                            super::transfer::Want::All => "everything".to_string(),
                            super::transfer::Want::Some(ids) => format!("{} origins", ids.len()),
                        },
                        driver::origin_id(&from)
                    );
                    self.pull_core(from, want)
                }
                Output::Join(ids) => {
                    let ids: Vec<EndpointId> = ids
                        .iter()
                        .filter_map(|id| EndpointId::from_bytes(id).ok())
                        .filter(|id| *id != self.my_id && !self.auth.is_blocked(id))
                        .collect();
                    if !ids.is_empty() {
                        log::debug!("gossip: joining {} peers", ids.len());
                        let _ = self.sender.join_peers(ids).await;
                    }
                }
                Output::Registry(op) => {
                    log::trace!("gossip: registry {op:?}");
                    driver::registry_msgs(op, |m| send_registry(&self.registry, m));
                }
                Output::Addrs(id, addrs) => {
                    if let Ok(id) = EndpointId::from_bytes(&id) {
                        let mut ea = EndpointAddr::new(id);
                        for sa in addrs {
                            ea = ea.with_ip_addr(sa);
                        }
                        self.memory.add_endpoint_info(ea);
                    }
                }
            }
        }
    }

    /// Sends one of the core's direct messages (dropped when
    /// [`driver::MAX_SENDS`] are in flight: the core retries on its timers).
    fn send_core(&self, to: [u8; 32], msg: Direct) {
        let Ok(id) = EndpointId::from_bytes(&to) else {
            return;
        };
        if self.auth.is_blocked(&id) {
            return;
        }
        let Ok(permit) = self.sends.clone().try_acquire_owned() else {
            log::debug!("gossip: too many direct messages in flight, one to {id} dropped");
            return;
        };
        let endpoint = self.endpoint.clone();
        let conns = self.conns.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(
                driver::SEND_TIMEOUT,
                driver::send_direct(&conns, &endpoint, id, &msg),
            )
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::debug!("gossip: direct message to {id}: {e}"),
                Err(_) => log::debug!("gossip: direct message to {id}: timed out"),
            }
        });
    }

    /// Starts one of the core's pulls; the verified messages come back on
    /// `transfer_rx` (always, failed or not: the core waits for it).
    fn pull_core(&self, from: [u8; 32], want: super::transfer::Want) {
        let endpoint = self.endpoint.clone();
        let me = self.me.clone();
        let tx = self.transfer_tx.clone();
        let stats = self.stats.clone();
        let conns = self.conns.clone();
        let Ok(id) = EndpointId::from_bytes(&from) else {
            return;
        };
        tokio::spawn(async move {
            let result = tokio::time::timeout(
                driver::TRANSFER_TIMEOUT,
                driver::pull(&conns, &endpoint, id, &want),
            )
            .await;
            let bytes = match result {
                Ok(Ok(bytes)) => Some(bytes),
                Ok(Err(e)) => {
                    log::debug!("gossip: transfer from {id} failed: {e}");
                    None
                }
                Err(_) => {
                    log::debug!("gossip: transfer from {id} timed out");
                    None
                }
            };
            let msgs = bytes.and_then(|bytes| {
                let frames = driver::unframe(&bytes)?;
                let mut msgs = Vec::with_capacity(frames.len());
                for f in frames {
                    match me.open(f, wire::MAX_STREAM_BYTES) {
                        Ok(o) if o.version >= wire::PROTOCOL_VERSION => {
                            msgs.extend(driver::signed(o, f));
                        }
                        Ok(_) => {}
                        Err(reason) => {
                            stats.dropped[reason.index()].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Some(msgs)
            });
            if let Some(msgs) = &msgs {
                log::debug!("gossip: transfer from {id}: {} messages", msgs.len());
                stats.state_pulls.fetch_add(1, Ordering::Relaxed);
            } else {
                stats.state_pull_failures.fetch_add(1, Ordering::Relaxed);
            }
            let _ = tx.send((id, msgs)).await;
        });
    }

    async fn broadcast(&mut self, bytes: Vec<u8>) {
        if bytes.len() > wire::MAX_GOSSIP_BYTES {
            // Never sent: an oversize message silently breaks links.
            log::warn!(
                "not broadcasting an oversize message ({} bytes)",
                bytes.len()
            );
            return;
        }
        self.stats.sent.fetch_add(1, Ordering::Relaxed);
        self.stats
            .sent_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if let Err(e) = self.sender.broadcast(bytes.into()).await {
            log::debug!("gossip broadcast failed: {e}");
        }
    }

    async fn send_heartbeat(&mut self) {
        if !self.legacy() {
            return;
        }
        let payload = {
            let p = self.me.published.lock().expect("published lock");
            Payload::Heartbeat {
                version: p.version,
                n_groups: p.groups.len() as u64,
                ready: p.ready,
            }
        };
        let bytes = self.me.seal(payload.clone());
        self.broadcast(bytes).await;
        self.push_direct(payload);
        self.next_heartbeat = Instant::now() + self.heartbeat_every;
    }

    /// While the neighbour set is small, pushes the heartbeat straight to
    /// admitted peers that are not neighbours, so our lease never rests on
    /// the gossip overlay alone: e.g. just after a restart, peers may still
    /// hold our previous process as a neighbour and leave our joins
    /// unanswered. A receiver treats the heartbeat like one from gossip (a
    /// new incarnation or version makes it pull our full state).
    fn push_direct(&self, payload: Payload) {
        let n_known = self.known_peers().len();
        if self.neighbors.len() >= WANTED_NEIGHBORS.min(n_known) {
            return;
        }
        let now = Instant::now();
        // Not to peers that have gone silent (lease expired) since their
        // last admission: they are likely gone for good.
        let gone = |id: &EndpointId, since: Instant| {
            self.origins.get(id).is_some_and(|o| o.expired)
                && now.saturating_duration_since(since) > self.lease
        };
        let targets: Vec<(EndpointId, u8)> = self
            .auth
            .admitted()
            .into_iter()
            .filter(|(id, a)| {
                *id != self.my_id
                    && !self.neighbors.contains(id)
                    && !self.auth.is_blocked(id)
                    && !gone(id, a.since)
            })
            .map(|(id, a)| (id, a.version))
            .take(MAX_DIRECT_PEERS)
            .collect();
        if targets.is_empty() {
            return;
        }
        // One sealed copy per version in use (one sequence number each).
        let mut sealed: HashMap<u8, Arc<Vec<u8>>> = HashMap::new();
        for (id, version) in targets {
            let endpoint = self.endpoint.clone();
            let bytes = sealed
                .entry(version)
                .or_insert_with(|| Arc::new(self.me.seal_at(version, payload.clone())))
                .clone();
            tokio::spawn(async move {
                match tokio::time::timeout(PUSH_TIMEOUT, push(&endpoint, id, &bytes)).await {
                    Ok(Ok(())) => log::trace!("gossip: pushed a heartbeat to {id}"),
                    Ok(Err(e)) => log::debug!("gossip: pushing a heartbeat to {id}: {e}"),
                    Err(_) => log::debug!("gossip: pushing a heartbeat to {id}: timed out"),
                }
            });
        }
    }

    /// A heartbeat pushed by `from` over [`STATE_ALPN`]: accepted only when
    /// `from` is its origin, then verified and applied like gossip.
    async fn on_direct(&mut self, from: EndpointId, bytes: Vec<u8>) {
        if self.auth.is_blocked(&from) {
            return;
        }
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        self.stats
            .received_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        match self.me.open(&bytes, wire::MAX_GOSSIP_BYTES) {
            Ok(o) if o.header.origin != *from.as_bytes() => {
                return self.drop_msg(DropReason::Malformed, "pushed by another node");
            }
            Ok(o) if !matches!(o.header.payload, Payload::Heartbeat { .. }) => {
                return self.drop_msg(DropReason::Malformed, "pushed a non-heartbeat");
            }
            Ok(_) => {}
            Err(reason) => return self.drop_msg(reason, "pushed"),
        }
        self.on_message(&bytes, Instant::now(), None).await;
    }

    /// Brings `me.published.groups` up to date with the table, cloning only
    /// the groups that changed. Returns the changes as wire messages when
    /// `wire` (and there are any), and whether anything changed.
    fn sync_published(&mut self, p: &mut Published, wire: bool) -> (Vec<Change>, bool) {
        let table = self.table.load_full();
        if Weak::ptr_eq(&self.last_seen, &Arc::downgrade(&table)) {
            return (Vec::new(), false);
        }
        self.last_seen = Arc::downgrade(&table);
        let groups = &table.groups;
        let d = diff(&p.groups, local_range(groups, &self.local_lo));
        if d.is_empty() {
            return (Vec::new(), false);
        }
        let mut changes = Vec::new();
        if wire {
            changes.reserve(d.upserts.len() + d.removes.len());
            changes.extend(
                d.upserts
                    .iter()
                    .map(|(s, g)| Change::Upsert((*s).into(), (*g).into())),
            );
            changes.extend(d.removes.iter().map(|s| Change::Remove(s.into())));
        }
        for s in &d.removes {
            p.groups.remove(s);
        }
        for (s, g) in d.upserts {
            match p.groups.get_mut(s) {
                Some(old) => old.clone_from(g),
                None => {
                    p.groups.insert(s.clone(), g.clone());
                }
            }
        }
        (changes, true)
    }

    /// Diffs this node's groups against what was published and broadcasts
    /// the changes as deltas. With no neighbour, nobody would receive a
    /// delta: the version still moves on (one step) and no message is
    /// built; peers that come later see the version in a heartbeat and pull
    /// the full state.
    async fn publish(&mut self) {
        let me = self.me.clone();
        let core_on = self.core.is_some();
        let wire = !self.neighbors.is_empty() && self.legacy();
        let mut messages = Vec::new();
        let mut oversize = false;
        let mut for_core = None;
        {
            let mut p = me.published.lock().expect("published lock");
            let ready = p.ready;
            let (changes, changed) = self.sync_published(&mut p, core_on || (ready && wire));
            if core_on && changed {
                for_core = Some(changes.clone());
            }
            if ready && changed {
                p.cache = None;
                if !wire {
                    p.version += 1;
                } else {
                    let (chunks, skipped) =
                        wire::chunk_changes(changes, wire::MAX_GOSSIP_BYTES, wire::HEADER_BUDGET);
                    for changes in chunks {
                        p.version += 1;
                        messages.push(Payload::Delta {
                            version: p.version,
                            changes,
                        });
                    }
                    if skipped > 0 {
                        // Peers see the version jump and pull the full state.
                        self.stats
                            .oversize_changes
                            .fetch_add(skipped as u64, Ordering::Relaxed);
                        p.version += 1;
                        oversize = true;
                    }
                }
            }
        }
        if let Some(changes) = for_core {
            self.core_input(Input::Local(changes)).await;
        }
        for payload in messages {
            let bytes = self.me.seal(payload);
            self.broadcast(bytes).await;
        }
        if oversize {
            // Announce the version at once so peers pull the full state.
            self.send_heartbeat().await;
        }
    }

    /// Marks this start as settled: peers may now replace the previous
    /// incarnation's records with this one's full state.
    async fn become_ready(&mut self) {
        {
            let me = self.me.clone();
            let mut p = me.published.lock().expect("published lock");
            self.sync_published(&mut p, false);
            p.version = 1;
            p.ready = true;
            p.cache = None;
        }
        log::debug!("gossip: local records settled, serving full state");
        if let Some(core) = self.core.as_mut() {
            // The core holds the same groups (fed by `publish`).
            core.handle(Instant::now(), Input::Ready);
            self.run_outputs().await;
        }
        self.send_heartbeat().await;
    }

    async fn on_event(&mut self, event: Event) {
        match event {
            Event::Received(msg) => {
                self.stats.received.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .received_bytes
                    .fetch_add(msg.content.len() as u64, Ordering::Relaxed);
                if self.auth.is_blocked(&msg.delivered_from) {
                    return;
                }
                self.on_message(&msg.content, Instant::now(), Some(msg.delivered_from))
                    .await;
            }
            Event::NeighborUp(id) => {
                log::debug!("gossip neighbour up: {id}");
                let first = self.neighbors.is_empty();
                self.neighbors.insert(id);
                self.core_input(Input::NeighborUp(*id.as_bytes())).await;
                if first && self.legacy() {
                    // Joined (or re-joined after a partition): ask every
                    // holder to announce itself.
                    let hello = self.me.seal(Payload::Hello);
                    self.broadcast(hello).await;
                }
                self.send_heartbeat().await;
            }
            Event::NeighborDown(id) => {
                log::debug!("gossip neighbour down: {id}");
                self.neighbors.remove(&id);
                self.core_input(Input::NeighborDown(*id.as_bytes())).await;
            }
            Event::Lagged => {
                self.stats.lagged.fetch_add(1, Ordering::Relaxed);
                self.core_input(Input::Lagged).await;
                log::debug!("gossip: lagged, resynchronising every origin");
                for o in self.origins.values_mut() {
                    o.known = None;
                    o.pending.clear();
                }
            }
        }
        self.stats
            .neighbors
            .store(self.neighbors.len() as u64, Ordering::Relaxed);
    }

    fn drop_msg(&self, reason: DropReason, detail: &str) {
        self.stats.dropped[reason.index()].fetch_add(1, Ordering::Relaxed);
        log::debug!("gossip: dropped a message: {reason} {detail}");
    }

    /// A sealed message relayed by gossip neighbour `from` (or pushed, with
    /// `from` `None`): core messages go to the core, v3 ones to the v3
    /// protocol (on a v4 node, only those of origins that speak v3 alone).
    async fn on_message(&mut self, bytes: &[u8], now: Instant, from: Option<EndpointId>) {
        let opened = match self.me.open(bytes, wire::MAX_GOSSIP_BYTES) {
            Ok(o) => o,
            Err(reason) => return self.drop_msg(reason, ""),
        };
        let Ok(id) = EndpointId::from_bytes(&opened.header.origin) else {
            return self.drop_msg(DropReason::Malformed, "origin key");
        };
        if let Payload::Core(_) = &opened.header.payload {
            let (Some(from), true, true) = (
                from,
                self.core.is_some(),
                opened.version >= wire::PROTOCOL_VERSION,
            ) else {
                return self.drop_msg(DropReason::Malformed, "core message out of place");
            };
            if id != self.my_id
                && self
                    .core
                    .as_ref()
                    .is_some_and(|c| c.origin(&opened.header.origin).is_none())
            {
                log::info!(
                    "gossip: first message from peer {id} ({}) at {}",
                    opened.header.node_name.escape_debug(),
                    peer_addr(&self.auth, &self.bootstrap, &id)
                );
            }
            if id != self.my_id {
                // The core holds this origin now (it may have been a v3
                // origin before its upgrade: its records stay until the
                // core replaces them).
                self.origins.remove(&id);
                if self.auth.end_if_older(&id, opened.header.incarnation) {
                    self.next_peers = now;
                }
            }
            if let Some(o) = self
                .core
                .as_ref()
                .and_then(|c| c.origin(&opened.header.origin))
            {
                // What the core would ignore as old news, counted as such.
                let stale = opened.header.incarnation < o.incarnation
                    || (opened.header.incarnation == o.incarnation
                        && matches!(&opened.header.payload,
                            Payload::Core(Body::Delta { version, .. })
                                if o.known.is_some_and(|k| *version <= k)));
                if stale {
                    return self.drop_msg(DropReason::Replay, &format!("old news from {id}"));
                }
            }
            if let Some(msg) = driver::signed(opened, bytes) {
                log::trace!(
                    "gossip: {} from {id} ({}) relayed by {from}",
                    msg.body.kind(),
                    msg.node_name.escape_debug()
                );
                let from = *from.as_bytes();
                self.core_input(Input::Gossip { from, msg }).await;
            }
            return;
        }
        if self.core.is_some() && opened.speaks >= wire::PROTOCOL_VERSION {
            // A v4 node's v3 messages are for v3 peers; the core holds it.
            return;
        }
        let Opened {
            header,
            version,
            speaks,
            key_id,
        } = opened;
        if id == self.my_id {
            return;
        }
        if !self.origins.contains_key(&id) {
            log::info!(
                "gossip: first message from peer {id} ({}) at {}",
                header.node_name.escape_debug(),
                peer_addr(&self.auth, &self.bootstrap, &id)
            );
        }
        let o = self
            .origins
            .entry(id)
            .or_insert_with(|| OriginState::new(now));
        match o.window.check(header.incarnation, header.seq) {
            Fresh::No => {
                return self.drop_msg(
                    DropReason::Replay,
                    &format!("from {id} ({}, {})", header.incarnation, header.seq),
                );
            }
            Fresh::NewIncarnation => {
                log::info!(
                    "gossip: {id} ({}) at {} restarted; keeping its records until its full state arrives",
                    header.node_name.escape_debug(),
                    peer_addr(&self.auth, &self.bootstrap, &id)
                );
                // Its admission was bound to the old incarnation.
                if self.auth.end_if_older(&id, header.incarnation) {
                    self.next_peers = now;
                }
                o.known = None;
                o.advertised = 0;
                o.ready = false;
                o.pending.clear();
                o.gap_since = None;
            }
            Fresh::Yes => {}
        }
        o.last_heard = now;
        o.expired = false;
        o.node_name = header.node_name;
        o.speaks = speaks;
        o.version = version;
        o.key_id = Some(key_id);
        let mut answer_hello = false;
        let mut apply = Vec::new();
        let mut stale = false;
        match header.payload {
            Payload::Hello => answer_hello = true,
            Payload::Heartbeat { version, ready, .. } => {
                o.ready = ready;
                o.advertised = o.advertised.max(version);
                if let Some(k) = o.known
                    && version > k
                {
                    o.gap_since.get_or_insert(now);
                }
            }
            Payload::Delta { version, changes } => {
                o.ready = true;
                o.advertised = o.advertised.max(version);
                match o.known {
                    Some(k) if version <= k => stale = true,
                    Some(k) if k.checked_add(1) == Some(version) => {
                        apply.push(changes);
                        let mut next = version;
                        while let Some(c) = next_pending(&mut o.pending, next) {
                            apply.push(c);
                            next += 1;
                        }
                        o.known = Some(next);
                        o.gap_since = if o.advertised > next { Some(now) } else { None };
                    }
                    _ => {
                        if o.pending.len() >= MAX_PENDING {
                            o.pending.clear();
                            o.known = None;
                        }
                        o.pending.insert(version, changes);
                        o.gap_since.get_or_insert(now);
                    }
                }
            }
            Payload::FullState { .. } | Payload::Core(_) => {
                return self.drop_msg(DropReason::Malformed, "full state over gossip");
            }
        }
        if stale {
            return self.drop_msg(DropReason::Replay, &format!("stale delta from {id}"));
        }
        let origin = Origin {
            id: id.to_string().into(),
            node_name: o.node_name.as_str().into(),
        };
        if !apply.is_empty() {
            o.holds = true;
        }
        for changes in apply {
            for c in changes {
                send_registry(&self.registry, change_msg(&origin, c));
            }
        }
        if answer_hello
            && self
                .last_hello_answer
                .is_none_or(|t| now.duration_since(t) >= HELLO_ANSWER_EVERY)
        {
            self.last_hello_answer = Some(now);
            self.send_heartbeat().await;
        }
    }

    fn on_pulled(&mut self, p: Pulled) {
        self.n_pulls = self.n_pulls.saturating_sub(1);
        let now = Instant::now();
        let Some(o) = self.origins.get_mut(&p.id) else {
            return;
        };
        o.pulling = false;
        let header = match p.result {
            Ok(opened) => {
                o.speaks = opened.speaks;
                o.version = opened.version;
                o.key_id = Some(opened.key_id);
                opened.header
            }
            Err(e) => {
                self.stats
                    .state_pull_failures
                    .fetch_add(1, Ordering::Relaxed);
                log::debug!("gossip: state pull from {} failed: {e}", p.id);
                o.next_pull = now + PULL_RETRY;
                return;
            }
        };
        if header.incarnation < o.window.incarnation() {
            return;
        }
        if header.incarnation > o.window.incarnation() {
            o.window.check(header.incarnation, header.seq);
            o.known = None;
            o.pending.clear();
        }
        let (version, groups) = match header.payload {
            Payload::FullState { version, groups } => (version, groups),
            Payload::Heartbeat { .. } => {
                // Not settled yet: try again later.
                o.ready = false;
                o.next_pull = now + PULL_RETRY;
                return;
            }
            _ => return,
        };
        if o.known.is_some_and(|k| version < k) {
            return;
        }
        self.stats.state_pulls.fetch_add(1, Ordering::Relaxed);
        o.last_heard = now;
        o.node_name = header.node_name;
        o.ready = true;
        o.holds = true;
        o.advertised = o.advertised.max(version);
        let origin = Origin {
            id: p.id.to_string().into(),
            node_name: o.node_name.as_str().into(),
        };
        send_registry(
            &self.registry,
            RegistryMsg::Replace {
                origin: origin.clone(),
                kind: None,
                groups: groups
                    .into_iter()
                    .map(|(s, g)| (s.into(), g.into()))
                    .collect(),
            },
        );
        let mut next = version;
        o.pending = match version.checked_add(1) {
            Some(after) => o.pending.split_off(&after),
            None => BTreeMap::new(),
        };
        while let Some(changes) = next_pending(&mut o.pending, next) {
            for c in changes {
                send_registry(&self.registry, change_msg(&origin, c));
            }
            next += 1;
        }
        o.known = Some(next);
        o.gap_since = (o.advertised > next).then_some(now);
        log::debug!("gossip: full state of {} at version {next}", p.id);
    }

    async fn on_tick(&mut self) {
        let now = Instant::now();
        if self.core.is_some() {
            if now >= self.next_addrs {
                self.next_addrs = now + ADDRS_EVERY;
                let addrs = own_addrs(&self.endpoint);
                self.core_input(Input::Addrs(addrs)).await;
            }
            self.core_input(Input::Tick).await;
            if now >= self.next_save {
                self.next_save = now + super::persist::SAVE_EVERY;
                self.save_states(false).await;
            }
        }
        let ready = self.me.published.lock().expect("published lock").ready;
        if !ready {
            let since_start = now.duration_since(self.started);
            let docker_done = self.docker.as_ref().is_none_or(|d| {
                d.resyncs.load(Ordering::Relaxed) + d.connect_failures.load(Ordering::Relaxed) > 0
            });
            if docker_done && self.docker_settled.is_none() {
                self.docker_settled = Some(now);
            }
            // Quiet since the last local change and since Docker's records
            // were handed to the registry (they reach the table after).
            let quiet_since = self
                .docker_settled
                .map_or(self.last_local_change, |t| t.max(self.last_local_change));
            if since_start >= SETTLE_MAX
                || (docker_done
                    && since_start >= SETTLE_MIN
                    && now.duration_since(quiet_since) >= SETTLE_QUIET)
            {
                self.become_ready().await;
            }
        }
        if now >= self.next_heartbeat {
            self.send_heartbeat().await;
        }
        // Leases.
        for (id, o) in self.origins.iter_mut() {
            if o.lease_expired(now, self.lease) {
                o.expired = true;
                o.known = None;
                o.pending.clear();
                self.stats.leases_expired.fetch_add(1, Ordering::Relaxed);
                if o.holds {
                    o.holds = false;
                    log::info!(
                        "gossip: lease of {id} ({}) at {} expired, dropping its records",
                        o.node_name.escape_debug(),
                        peer_addr(&self.auth, &self.bootstrap, id)
                    );
                    send_registry(
                        &self.registry,
                        RegistryMsg::DropOrigin { id: id.to_string() },
                    );
                }
            }
        }
        let core_live = self.core.as_ref().map_or(0, |c| c.live_origins().count());
        self.stats.origins.store(
            (self.origins.values().filter(|o| !o.expired).count() + core_live) as u64,
            Ordering::Relaxed,
        );
        self.update_send_version();
        // State pulls.
        let due: Vec<EndpointId> = self
            .origins
            .iter()
            .filter(|(_, o)| o.wants_pull(now))
            .map(|(id, _)| *id)
            .take(MAX_PULLS.saturating_sub(self.n_pulls))
            .collect();
        for id in due {
            if let Some(o) = self.origins.get_mut(&id) {
                o.pulling = true;
            }
            self.n_pulls += 1;
            let endpoint = self.endpoint.clone();
            let me = self.me.clone();
            let tx = self.pulled_tx.clone();
            tokio::spawn(async move {
                let result =
                    match tokio::time::timeout(PULL_TIMEOUT, pull(&endpoint, &me, id)).await {
                        Ok(r) => r,
                        Err(_) => Err("timed out".into()),
                    };
                let _ = tx.send(Pulled { id, result }).await;
            });
        }
        // Healing.
        if now >= self.next_rejoin {
            self.next_rejoin = now + REJOIN_EVERY;
            let known = self.known_peers();
            if self.neighbors.len() < WANTED_NEIGHBORS.min(known.len()) {
                let unresolved = resolve_bootstrap(&self.memory, &self.bootstrap, false).await;
                let want: Vec<EndpointId> = known
                    .into_iter()
                    .filter(|id| {
                        !self.neighbors.contains(id)
                            && !self.auth.is_blocked(id)
                            && !unresolved.contains(id)
                    })
                    .collect();
                if !want.is_empty() && self.core.is_some() {
                    // Ping first, join on the ack: a peer that restarted is
                    // admitted again on the ping's connection, so the
                    // gossip connection is never the one that re-admission
                    // closes (which leaves iroh-gossip's link to the peer
                    // dead for good).
                    self.heal_pings.clear();
                    for id in want {
                        self.heal_pings.insert(id);
                        self.send_core(
                            *id.as_bytes(),
                            Direct::Ping {
                                nonce: HEAL_PING_NONCE,
                            },
                        );
                    }
                } else if !want.is_empty() {
                    log::debug!("gossip: re-joining {} known peers", want.len());
                    let _ = self.sender.join_peers(want).await;
                }
            }
        }
        if now >= self.next_peers {
            self.next_peers = now + PEERS_EVERY;
            self.refresh_peers(now);
        }
    }

    /// Installs a reloaded keyring: sends with its primary from now on,
    /// ends the admissions proven with a key it lost and admits those peers
    /// again with the primary (a peer that holds only removed keys stays
    /// out, and its records lapse with its lease).
    fn set_keyring(&mut self, keyring: Keyring) {
        let ring = Ring::new(&keyring);
        let ended = self.auth.set_ring(ring);
        // `/peers` shows no ended admission as authenticated, not even
        // until its next refresh.
        self.refresh_peers(Instant::now());
        self.stats.keyring_reloads.fetch_add(1, Ordering::Relaxed);
        // The cached full state was sealed with the previous primary.
        self.me.published.lock().expect("published lock").cache = None;
        if let Some(core) = self.core.as_mut() {
            core.reseal();
        }
        log::info!(
            "Cluster keyring reloaded: keys {}; {} admissions ended by it",
            keyring.describe(),
            ended.len()
        );
        for id in ended {
            let auth = self.auth.clone();
            tokio::spawn(async move {
                if let Err(e) = auth.authenticate(EndpointAddr::new(id)).await {
                    log::debug!("admitting {id} again after the keyring reload: {e}");
                }
            });
        }
    }

    /// Broadcasts go at the highest version every live peer speaks: the
    /// lowest of what admitted peers use with us and what live origins say
    /// they speak (a node one version behind may receive them relayed).
    fn update_send_version(&self) {
        let versions = self.me.versions;
        let lowest_admitted = self.auth.admitted().values().map(|a| a.version).min();
        let lowest_origin = self
            .origins
            .values()
            .filter(|o| !o.expired)
            .map(|o| o.speaks)
            .min();
        let v = [Some(versions.max), lowest_admitted, lowest_origin]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(versions.max)
            .clamp(versions.min, versions.max);
        let old = self.me.send_version.swap(v, Ordering::Relaxed);
        if old != v {
            log::info!("gossip: broadcasting at protocol version {v} (was {old})");
        }
    }

    /// A peer found on the local network: joined (admission first, by the
    /// hooks) unless already a neighbour.
    async fn on_discovered(&mut self, id: EndpointId) {
        if id == self.my_id
            || self.neighbors.contains(&id)
            || !remember_discovered(&mut self.discovered, id, |p| self.auth.is_admitted(p))
        {
            return;
        }
        log::debug!("gossip: discovered {id} on the local network");
        let _ = self.sender.join_peers(vec![id]).await;
    }

    /// Every peer worth joining: bootstrap peers, admitted and discovered
    /// peers, live origins.
    fn known_peers(&self) -> Vec<EndpointId> {
        let mut set: HashSet<EndpointId> = self.bootstrap.iter().map(|(id, _)| *id).collect();
        set.extend(self.discovered.iter().copied());
        set.extend(self.auth.admitted().into_keys());
        set.extend(
            self.origins
                .iter()
                .filter(|(_, o)| !o.expired)
                .map(|(id, _)| *id),
        );
        set.remove(&self.my_id);
        set.into_iter().collect()
    }

    fn refresh_peers(&self, now: Instant) {
        let admitted = self.auth.admitted();
        let mut records: HashMap<&str, usize> = HashMap::new();
        let table = self.table.load();
        for ((o, _), _) in table.groups.iter() {
            *records.entry(&*o.id).or_default() += 1;
        }
        let forget = self.lease * PEER_FORGET_LEASES;
        let mut ids: HashSet<EndpointId> = admitted
            .iter()
            .filter(|(_, a)| now.duration_since(a.since) < forget)
            .map(|(id, _)| *id)
            .collect();
        ids.extend(
            self.origins
                .iter()
                .filter(|(_, o)| now.duration_since(o.last_heard) < forget)
                .map(|(id, _)| *id),
        );
        // Origins the core holds (v4 peers).
        let core_origin = |id: &EndpointId| {
            self.core
                .as_ref()
                .and_then(|c| c.origin(id.as_bytes()))
                .filter(|o| o.status.is_live())
        };
        if let Some(core) = self.core.as_ref() {
            ids.extend(
                core.live_origins()
                    .filter(|(_, o)| now.saturating_duration_since(o.last_heard) < forget)
                    .filter_map(|(id, _)| EndpointId::from_bytes(id).ok()),
            );
        }
        let mut list: Vec<PeerStatus> = ids
            .into_iter()
            .map(|id| {
                let o = self.origins.get(&id);
                let c = core_origin(&id);
                let a = admitted.get(&id);
                PeerStatus {
                    id: id.to_string(),
                    node_name: o
                        .map(|o| o.node_name.clone())
                        .or(c.map(|c| c.node_name.to_string()))
                        .unwrap_or_default(),
                    addr: a.and_then(|a| a.addr).map(|s| s.to_string()).or_else(|| {
                        self.bootstrap
                            .iter()
                            .find(|(b, _)| *b == id)
                            .and_then(|(_, addr)| addr.clone())
                    }),
                    last_heard_ms_ago: o
                        .map(|o| o.last_heard)
                        .or(c.map(|c| c.last_heard))
                        .or(a.map(|a| a.since))
                        .map(|t| now.duration_since(t).as_millis() as u64)
                        .unwrap_or_default(),
                    records: records.get(id.to_string().as_str()).copied().unwrap_or(0),
                    authenticated: a.is_some(),
                    key_id: a
                        .map(|a| a.key_id)
                        .or(o.and_then(|o| o.key_id))
                        .map(|k| k.to_string()),
                    protocol_version: a
                        .map(|a| a.version)
                        .or(o.filter(|o| o.version > 0).map(|o| o.version)),
                }
            })
            .collect();
        list.sort_by(|a, b| a.node_name.cmp(&b.node_name).then(a.id.cmp(&b.id)));
        *self.peers.lock().expect("peers lock") = list;
    }
}

/// A peer's address for log lines: where it was admitted from, else its
/// bootstrap address, else `an unknown address` (heard through others).
/// This node's direct addresses as peers may dial them: the endpoint's
/// IP addresses less those of Docker bridges.
fn own_addrs(endpoint: &Endpoint) -> Vec<SocketAddr> {
    let hidden = super::bridge_ips();
    let mut addrs: Vec<SocketAddr> = endpoint
        .addr()
        .ip_addrs()
        .copied()
        .filter(|sa| !hidden.contains(&sa.ip()))
        .collect();
    addrs.sort_unstable();
    addrs
}

fn peer_addr(
    auth: &AuthState,
    bootstrap: &[(EndpointId, Option<String>)],
    id: &EndpointId,
) -> String {
    auth.admitted()
        .get(id)
        .and_then(|a| a.addr)
        .map(|a| a.to_string())
        .or_else(|| {
            bootstrap
                .iter()
                .find(|(b, _)| b == id)
                .and_then(|(_, addr)| addr.clone())
        })
        .unwrap_or_else(|| "an unknown address".into())
}

/// Sends to the registry without stalling the runtime for long: the
/// registry inbox is bounded and paces bursts.
/// The registry message that applies one change of `origin`'s records.
fn change_msg(origin: &Origin, change: Change) -> RegistryMsg {
    match change {
        Change::Upsert(s, g) => RegistryMsg::Upsert {
            origin: origin.clone(),
            source: s.into(),
            group: g.into(),
        },
        Change::Remove(s) => RegistryMsg::Remove {
            origin: origin.clone(),
            source: s.into(),
        },
    }
}

/// Remembers a peer found by mDNS; false when it was known already (or
/// the set is full of admitted peers). At most [`MAX_DISCOVERED`] are kept:
/// when full, the peers never admitted are forgotten (a real one announces
/// itself again and is tried again).
fn remember_discovered(
    set: &mut HashSet<EndpointId>,
    id: EndpointId,
    admitted: impl Fn(&EndpointId) -> bool,
) -> bool {
    if set.contains(&id) {
        return false;
    }
    if set.len() >= MAX_DISCOVERED {
        set.retain(|p| admitted(p));
    }
    set.len() < MAX_DISCOVERED && set.insert(id)
}

/// Takes the pending delta that follows `version`, if any (none after the
/// last version number: versions come from the network).
fn next_pending(pending: &mut BTreeMap<u64, Vec<Change>>, version: u64) -> Option<Vec<Change>> {
    pending.remove(&version.checked_add(1)?)
}

fn send_registry(registry: &Sender<RegistryMsg>, msg: RegistryMsg) {
    match registry.try_send(msg) {
        Ok(()) | Err(TrySendError::Disconnected(_)) => {}
        Err(TrySendError::Full(msg)) => {
            tokio::task::block_in_place(|| {
                let _ = registry.send(msg);
            });
        }
    }
}

fn join_options(peers: impl IntoIterator<Item = EndpointId>) -> JoinOptions {
    let mut opts = JoinOptions::with_bootstrap(peers);
    opts.subscription_capacity = SUBSCRIPTION_CAPACITY;
    opts
}

/// Adds the addresses of bootstrap peers given as `id@host:port` to the
/// memory lookup, resolving host names. A name that does not resolve is a
/// warning at start (`first`), and at debug level on each retry.
async fn resolve_bootstrap(
    memory: &MemoryLookup,
    bootstrap: &[(EndpointId, Option<String>)],
    first: bool,
) -> HashSet<EndpointId> {
    let mut unresolved = HashSet::new();
    for (id, addr) in bootstrap {
        let Some(addr) = addr else { continue };
        let addrs: Vec<SocketAddr> = match addr.parse::<SocketAddr>() {
            Ok(sa) => vec![sa],
            Err(_) => match tokio::net::lookup_host(addr.as_str()).await {
                Ok(it) => it.collect(),
                Err(e) => {
                    if first {
                        log::warn!("cannot resolve bootstrap peer {id}@{addr} yet: {e}");
                    } else {
                        log::debug!("cannot resolve bootstrap peer {id}@{addr}: {e}");
                    }
                    unresolved.insert(*id);
                    continue;
                }
            },
        };
        let mut ea = EndpointAddr::new(*id);
        for sa in addrs {
            ea = ea.with_ip_addr(sa);
        }
        memory.add_endpoint_info(ea);
    }
    unresolved
}

/// Publishes IP addresses only, never those of Docker bridges (`docker0`,
/// `br-*`, `veth*`).
fn bridge_filter() -> iroh::address_lookup::AddrFilter {
    use iroh::TransportAddr;
    let hidden = super::bridge_ips();
    iroh::address_lookup::AddrFilter::new(move |addrs: &Vec<TransportAddr>| {
        std::borrow::Cow::Owned(
            addrs
                .iter()
                .filter(|a| match a {
                    TransportAddr::Ip(sa) => !hidden.contains(&sa.ip()),
                    _ => false,
                })
                .cloned()
                .collect(),
        )
    })
}

/// Starts mDNS local discovery, never advertising Docker bridge addresses.
/// A failure is a warning: bootstrap peers still work.
fn start_mdns(endpoint: &Endpoint) -> Option<iroh_mdns_address_lookup::MdnsAddressLookup> {
    match iroh_mdns_address_lookup::MdnsAddressLookup::builder()
        .service_name("glued")
        .addr_filter(bridge_filter())
        .build(endpoint.id())
    {
        Ok(mdns) => match endpoint.address_lookup() {
            Ok(lookup) => {
                lookup.add(mdns.clone());
                log::info!("mDNS local discovery started");
                Some(mdns)
            }
            Err(e) => {
                log::warn!("mDNS local discovery not started: {e}");
                None
            }
        },
        Err(e) => {
            log::warn!("mDNS local discovery not started: {e}");
            None
        }
    }
}

/// Fetches the full state of `id` over a direct stream.
async fn pull(endpoint: &Endpoint, me: &Me, id: EndpointId) -> Result<Opened, String> {
    let conn = endpoint
        .connect(EndpointAddr::new(id), STATE_ALPN)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(&[REQUEST_PULL])
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    let bytes = recv
        .read_to_end(wire::MAX_STREAM_BYTES)
        .await
        .map_err(|e| e.to_string())?;
    conn.close(0u32.into(), b"done");
    let opened = me
        .open(&bytes, wire::MAX_STREAM_BYTES)
        .map_err(|r| r.to_string())?;
    if opened.header.origin != *id.as_bytes() {
        return Err("state of another origin".into());
    }
    Ok(opened)
}

/// Pushes one sealed heartbeat to `id` over a direct stream.
async fn push(endpoint: &Endpoint, id: EndpointId, bytes: &[u8]) -> Result<(), String> {
    let conn = endpoint
        .connect(EndpointAddr::new(id), STATE_ALPN)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(&[REQUEST_PUSH])
        .await
        .map_err(|e| e.to_string())?;
    send.write_all(bytes).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    // Wait for the receipt, so closing does not cut the message short.
    let mut receipt = [0u8; 1];
    let result = recv
        .read_exact(&mut receipt)
        .await
        .map_err(|e| e.to_string());
    conn.close(0u32.into(), b"done");
    result
}

/// This node's groups in a table, in source order: the range of keys that
/// start with its id (`lo` is the smallest such key). The local origin has
/// one node name; groups filed under another one (never made by the
/// registry) are left out.
fn local_range<'a>(
    groups: &'a Groups,
    lo: &'a (Origin, Source),
) -> impl Iterator<Item = (&'a Source, &'a Group)> + 'a {
    let mut node_name: Option<&'a str> = None;
    groups
        .range_from(lo)
        .take_while(move |((o, _), _)| o.id == lo.0.id)
        .filter(move |((o, _), _)| *node_name.get_or_insert(&o.node_name) == &*o.node_name)
        .map(|((_, s), g)| (s, g))
}

/// What turns one sorted set of groups into another, borrowing the new
/// groups: nothing is cloned but the removed sources.
#[derive(Debug, Default)]
struct Diff<'a> {
    upserts: Vec<(&'a Source, &'a Group)>,
    removes: Vec<Source>,
}

impl Diff<'_> {
    fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removes.is_empty()
    }
}

/// The changes that turn `old` into `new` (sorted by source, as a
/// `BTreeMap` range is), found by walking both in lockstep.
fn diff<'a>(
    old: &BTreeMap<Source, Group>,
    new: impl Iterator<Item = (&'a Source, &'a Group)>,
) -> Diff<'a> {
    use std::cmp::Ordering as Ord;
    let mut out = Diff::default();
    let mut old = old.iter().peekable();
    let mut new = new.peekable();
    loop {
        match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some((os, _)), None) => {
                out.removes.push((*os).clone());
                old.next();
            }
            (None, Some(&(ns, ng))) => {
                out.upserts.push((ns, ng));
                new.next();
            }
            (Some(&(os, og)), Some(&(ns, ng))) => match os.cmp(ns) {
                Ord::Less => {
                    out.removes.push(os.clone());
                    old.next();
                }
                Ord::Greater => {
                    out.upserts.push((ns, ng));
                    new.next();
                }
                Ord::Equal => {
                    if og != ng {
                        out.upserts.push((ns, ng));
                    }
                    old.next();
                    new.next();
                }
            },
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use smallvec::smallvec;

    fn g(ip: &str) -> Group {
        Group {
            names: smallvec!["x".into()],
            v4: smallvec![ip.parse().unwrap()],
            v6: smallvec![],
            ..Default::default()
        }
    }

    fn s(n: &str) -> Source {
        Source::Static { name: n.into() }
    }

    fn origin(id: &str) -> Origin {
        Origin {
            id: id.into(),
            node_name: format!("node-{id}").into(),
        }
    }

    #[test]
    fn diff_lists_upserts_and_removes() {
        let old: BTreeMap<_, _> = [(s("a"), g("10.0.0.1")), (s("b"), g("10.0.0.2"))].into();
        let new: BTreeMap<_, _> = [
            (s("a"), g("10.0.0.9")),
            (s("c"), g("10.0.0.3")),
            (s("d"), g("10.0.0.4")),
        ]
        .into();
        let d = diff(&old, new.iter());
        let up: Vec<&Source> = d.upserts.iter().map(|(s, _)| *s).collect();
        assert_eq!(up, [&s("a"), &s("c"), &s("d")]);
        assert_eq!(d.upserts[0].1, &g("10.0.0.9"));
        assert_eq!(d.removes, [s("b")]);
        assert!(diff(&new, new.iter()).is_empty());
        let d = diff(&new, old.iter());
        assert_eq!(d.removes, [s("c"), s("d")]);
        assert_eq!(d.upserts.len(), 2, "a changed back, b added");
        let d = diff(&BTreeMap::new(), std::iter::empty());
        assert!(d.is_empty());
    }

    #[test]
    fn the_local_range_holds_exactly_this_nodes_groups() {
        let mut table = BTreeMap::new();
        for id in ["a", "b", "bb", "c"] {
            for n in ["x", "y"] {
                table.insert((origin(id), s(n)), g("10.0.0.1"));
            }
        }
        table.insert(
            (
                origin("b"),
                Source::Container {
                    id: "c1".into(),
                    network: "n".into(),
                },
            ),
            g("10.0.0.2"),
        );
        let table = Groups::from(table);
        let lo = (
            Origin {
                id: "b".into(),
                node_name: "".into(),
            },
            s(""),
        );
        let got: Vec<&Source> = local_range(&table, &lo).map(|(s, _)| s).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got[..2], [&s("x"), &s("y")]);
        assert!(matches!(got[2], Source::Container { .. }));
        let published: BTreeMap<Source, Group> = local_range(&table, &lo)
            .map(|(s, g)| (s.clone(), g.clone()))
            .collect();
        assert!(diff(&published, local_range(&table, &lo)).is_empty());
        let none = (origin("zz"), s(""));
        assert_eq!(local_range(&table, &none).count(), 0);
    }

    #[test]
    fn peers_announced_on_the_local_network_are_remembered_within_a_bound() {
        // mDNS is unauthenticated: anyone on the LAN can announce ids.
        let admitted: HashSet<EndpointId> =
            (0..3).map(|_| SecretKey::generate().public()).collect();
        let mut set = HashSet::new();
        for id in &admitted {
            assert!(remember_discovered(&mut set, *id, |p| admitted.contains(p)));
        }
        for _ in 0..MAX_DISCOVERED * 3 {
            let id = SecretKey::generate().public();
            remember_discovered(&mut set, id, |p| admitted.contains(p));
        }
        assert!(set.len() <= MAX_DISCOVERED, "{} remembered", set.len());
        assert!(
            admitted.iter().all(|id| set.contains(id)),
            "admitted ones kept"
        );
        // A new announcement still gets a try.
        let id = SecretKey::generate().public();
        assert!(remember_discovered(&mut set, id, |p| admitted.contains(p)));
        assert!(!remember_discovered(&mut set, id, |p| admitted.contains(p)));
    }

    #[test]
    fn the_lease_ends_after_the_silence_not_before() {
        let t0 = Instant::now();
        let lease = Duration::from_secs(3);
        let mut o = OriginState::new(t0);
        assert!(!o.lease_expired(t0 + lease, lease));
        assert!(o.lease_expired(t0 + lease + Duration::from_millis(1), lease));
        o.last_heard = t0 + Duration::from_secs(2);
        assert!(!o.lease_expired(t0 + Duration::from_secs(4), lease));
        o.expired = true;
        assert!(
            !o.lease_expired(t0 + Duration::from_secs(60), lease),
            "once"
        );
    }

    #[test]
    fn a_pull_waits_for_readiness_and_the_gap_grace() {
        let now = Instant::now();
        let mut o = OriginState::new(now);
        assert!(!o.wants_pull(now), "not ready");
        o.ready = true;
        assert!(o.wants_pull(now), "no state yet");
        o.known = Some(3);
        o.advertised = 5;
        assert!(!o.wants_pull(now), "no gap seen");
        o.gap_since = Some(now);
        assert!(!o.wants_pull(now + GAP_GRACE / 2));
        assert!(o.wants_pull(now + GAP_GRACE));
        o.pulling = true;
        assert!(!o.wants_pull(now + GAP_GRACE));
    }
}
