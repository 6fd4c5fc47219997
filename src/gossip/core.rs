//! The replication core: every decision of the cluster protocol as a pure
//! state machine, with no I/O and no clock of its own. The iroh thread (and
//! the simulator in `examples/sim.rs` and the `sim` tests) feed it
//! [`Input`]s with the current time and carry out its [`Output`]s.
//!
//! Protocol in short (SPEC §7):
//! - **Announce.** Once its own records settled, a node broadcasts a signed
//!   `Alive{beat, version, addrs}` and, when it fits one gossip message,
//!   its `FullState`; then one `Delta` per change batch.
//! - **Liveness, SWIM-style.** Each node probes one live member per
//!   [`Params::probe_every`] directly (`Ping`/`Ack`); a probe without an ack
//!   makes it broadcast a signed `Suspect`. A suspected node that hears of it
//!   refutes with an `Alive` of a higher beat; one suspected for a whole
//!   lease is dead (records dropped). Steady traffic per node is one probe
//!   per period and one digest per [`Params::digest_every`], whatever the
//!   fleet's size: nothing is flooded periodically.
//! - **Anti-entropy from any holder.** A holder keeps each origin's signed
//!   `Alive`, `FullState` and the deltas after it, and serves them to any
//!   peer ([`Core::serve`]). A joining node pulls everything from its first
//!   neighbour in one transfer; a missing origin is pulled from the holder
//!   that showed it (relaying neighbour, digest peer), then from the owner.
//!   Every [`Params::digest_every`] a node sends a checksum of
//!   (origin → incarnation, version, beat) to a random member; when it
//!   differs the full digests are exchanged and each side pulls what it
//!   lacks.
//! - **Healing.** A jittered timer dials a random known non-neighbour
//!   (joins it on the topic and exchanges digests), whatever the neighbour
//!   count. A graceful stop broadcasts a signed `Leave`.
//!
//! Invariants: a remote record reaches the registry only from a message
//! signed by its origin (verified by the driver), in the origin's version
//! order; the core never creates an origin from another node's word; a dead
//! origin is revived only by its own signed `Alive` with a higher beat or a
//! new incarnation.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::membership::{Membership, jitter, join_sample};
use super::origins::{DeltaOutcome, MAX_GROUPS_PER_ORIGIN, OriginState, Status};
use super::transfer::{Entry, Transfers, Want, digest_sum};
use super::wire::{self, Change, WireGroup, WireSource};

/// A node's identity: its ed25519 public key.
pub type NodeId = [u8; 32];

/// Period of a direct probe of one member.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A probe not acked within this long makes its target suspect.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// Mean period of the digest exchange with a random member (jittered).
pub const DIGEST_EVERY: Duration = Duration::from_secs(2);
/// One digest exchange in this many goes to any live member rather than
/// to a neighbour.
pub const DIGEST_ANY_ONE_IN: u32 = 4;
/// Period of the digest exchange while exchanges still bring news.
pub const DIGEST_FAST: Duration = Duration::from_millis(250);
/// Mean period of the reconnect to a random known non-neighbour (jittered).
pub const RECONNECT_EVERY: Duration = Duration::from_secs(10);
/// Mean period of a join of known peers while this node has no neighbour
/// (jittered): iroh-gossip does not retry a join that failed (IROH.md
/// trap 5), and the reconnect timer alone left a node alone for up to
/// 1.5 × [`RECONNECT_EVERY`].
pub const REJOIN_EVERY: Duration = Duration::from_secs(2);
/// How long a version gap may last before a pull.
pub const GAP_GRACE: Duration = Duration::from_millis(300);
/// Period of the sweep over every origin (leases, gaps, forgetting).
pub const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// Shortest time a node this node suspects itself has to refute.
pub const SUSPECT_MIN: Duration = Duration::from_millis(500);
/// Dead or left origins are forgotten after this many leases.
pub const FORGET_LEASES: u32 = 4;
/// Peers silent for this many leases are no longer dialled.
pub const PEER_FORGET_LEASES: u32 = 40;

/// What a signed message says. Encoded by the driver (`wire` on the
/// network, a plain envelope in the simulator).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// The origin is alive at `beat` (grows on each refutation or address
    /// change), its records are at `version`, it listens on `addrs`.
    Alive {
        beat: u64,
        version: u64,
        addrs: Vec<SocketAddr>,
    },
    /// The changes that take the origin's records from `version - 1` to
    /// `version`.
    Delta { version: u64, changes: Vec<Change> },
    /// Every group of the origin at `version`.
    FullState {
        version: u64,
        groups: Vec<(WireSource, WireGroup)>,
    },
    /// The signer's probe of `target` (in `incarnation`, at `beat`) failed.
    Suspect {
        target: NodeId,
        incarnation: u64,
        beat: u64,
    },
    /// The origin stops (gracefully): drop its records now.
    Leave,
}

impl Body {
    /// The variant's name, for log lines.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Alive { .. } => "alive",
            Body::Delta { .. } => "delta",
            Body::FullState { .. } => "full state",
            Body::Suspect { .. } => "suspect",
            Body::Leave => "leave",
        }
    }
}

/// A message whose signature and origin the driver verified.
#[derive(Clone, Debug)]
pub struct Signed {
    pub origin: NodeId,
    pub node_name: Arc<str>,
    pub incarnation: u64,
    pub body: Body,
    /// The sealed bytes, kept to serve to other peers.
    pub raw: Arc<[u8]>,
}

/// A message between two admitted peers over a direct connection (the
/// connection authenticates the sender; nothing here is relayed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direct {
    Ping { nonce: u64 },
    Ack { nonce: u64 },
    DigestSum { sum: u64 },
    DigestFull { entries: Vec<Entry>, answer: bool },
}

/// Seals this node's messages (the driver holds the keys).
pub trait Seal {
    fn seal(&mut self, body: &Body) -> Arc<[u8]>;
}

/// What changes in the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryOp {
    Replace {
        origin: NodeId,
        node_name: Arc<str>,
        groups: Vec<(WireSource, WireGroup)>,
    },
    Apply {
        origin: NodeId,
        node_name: Arc<str>,
        changes: Vec<Change>,
    },
    Drop {
        origin: NodeId,
    },
}

/// What happened.
#[derive(Debug)]
pub enum Input {
    /// The node starts; `bootstrap` are the configured peers.
    Start {
        bootstrap: Vec<NodeId>,
    },
    /// A verified broadcast, relayed by neighbour `from`.
    Gossip {
        from: NodeId,
        msg: Signed,
    },
    Direct {
        from: NodeId,
        msg: Direct,
    },
    NeighborUp(NodeId),
    NeighborDown(NodeId),
    /// The gossip subscription lost events.
    Lagged,
    /// A pull from `from` ended: the verified messages, or `None` (failed).
    Transfer {
        from: NodeId,
        msgs: Option<Vec<Signed>>,
    },
    /// This node's own records changed.
    Local(Vec<Change>),
    /// This node's own records settled (first Docker resync done): announce.
    Ready,
    /// This node's direct addresses.
    Addrs(Vec<SocketAddr>),
    Tick,
    /// Graceful stop.
    Stop,
}

/// What to do.
#[derive(Clone, Debug)]
pub enum Output {
    Broadcast(Arc<[u8]>),
    Send(NodeId, Direct),
    Pull {
        from: NodeId,
        want: Want,
    },
    /// Join these peers on the gossip topic.
    Join(Vec<NodeId>),
    Registry(RegistryOp),
    /// Feed these addresses of a peer to the address lookup.
    Addrs(NodeId, Vec<SocketAddr>),
}

/// Timers of the core.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    pub lease: Duration,
    pub probe_every: Duration,
    pub probe_timeout: Duration,
    pub digest_every: Duration,
    pub digest_fast: Duration,
    pub reconnect_every: Duration,
}

impl Params {
    pub fn new(lease: Duration) -> Params {
        Params {
            lease,
            probe_every: PROBE_EVERY,
            probe_timeout: PROBE_TIMEOUT,
            digest_every: DIGEST_EVERY,
            digest_fast: DIGEST_FAST,
            reconnect_every: RECONNECT_EVERY,
        }
    }
}

/// Counters (the simulator reports them).
#[derive(Clone, Copy, Debug, Default)]
pub struct CoreStats {
    pub broadcasts: u64,
    pub sends: u64,
    pub pulls: u64,
    pub suspects: u64,
    pub refutes: u64,
    pub deaths: u64,
    pub duplicate_keys: u64,
    pub duplicate_names: u64,
    /// Changes too large for one gossip message (sent as a version jump).
    pub oversize_changes: u64,
}

/// The replication state machine of one node.
pub struct Core<S: Seal> {
    me: NodeId,
    node_name: Arc<str>,
    incarnation: u64,
    params: Params,
    sealer: S,
    rng: fastrand::Rng,
    ready: bool,
    version: u64,
    beat: u64,
    addrs: Vec<SocketAddr>,
    groups: BTreeMap<WireSource, WireGroup>,
    own_alive: Option<Arc<[u8]>>,
    own_full: Option<(u64, Arc<[u8]>)>,
    origins: HashMap<NodeId, OriginState>,
    members: Membership,
    transfers: Transfers,
    next_digest: Instant,
    next_sweep: Instant,
    dup_names: HashSet<(NodeId, NodeId)>,
    out: Vec<Output>,
    pub stats: CoreStats,
}

impl<S: Seal> Core<S> {
    pub fn new(
        me: NodeId,
        node_name: &str,
        incarnation: u64,
        params: Params,
        sealer: S,
        seed: u64,
        now: Instant,
    ) -> Core<S> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let next_digest = now + jitter(&mut rng, params.digest_every);
        let mut members = Membership::new(now);
        members.next_reconnect = now + jitter(&mut rng, params.reconnect_every);
        members.next_rejoin = now + REJOIN_EVERY;
        Core {
            me,
            node_name: node_name.into(),
            incarnation,
            params,
            sealer,
            rng,
            ready: false,
            version: 0,
            beat: 0,
            addrs: Vec::new(),
            groups: BTreeMap::new(),
            own_alive: None,
            own_full: None,
            origins: HashMap::new(),
            members,
            transfers: Transfers::default(),
            next_digest,
            next_sweep: now,
            dup_names: HashSet::new(),
            out: Vec::new(),
            stats: CoreStats::default(),
        }
    }

    pub fn id(&self) -> NodeId {
        self.me
    }

    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// This node's own `Alive` beat.
    pub fn beat(&self) -> u64 {
        self.beat
    }

    /// The version of this node's records once announced.
    pub fn published_version(&self) -> Option<u64> {
        self.ready.then_some(self.version)
    }

    /// Takes the outputs produced so far.
    pub fn drain(&mut self) -> std::vec::Drain<'_, Output> {
        self.out.drain(..)
    }

    /// This node's own records (as published).
    pub fn own_groups(&self) -> &BTreeMap<WireSource, WireGroup> {
        &self.groups
    }

    pub fn neighbors(&self) -> &HashSet<NodeId> {
        &self.members.neighbors
    }

    /// Remote origins that are live, with the version held.
    pub fn live_origins(&self) -> impl Iterator<Item = (&NodeId, &OriginState)> {
        self.origins.iter().filter(|(_, o)| o.status.is_live())
    }

    pub fn origin(&self, id: &NodeId) -> Option<&OriginState> {
        self.origins.get(id)
    }

    /// How `origin` is wanted (tracing).
    pub fn describe_want(&self, origin: &NodeId) -> String {
        self.transfers.describe(origin)
    }

    pub fn n_wanted(&self) -> usize {
        self.transfers.n_wanted()
    }

    pub fn handle(&mut self, now: Instant, input: Input) {
        match input {
            Input::Start { bootstrap } => {
                for id in &bootstrap {
                    self.members.heard(*id, None, now);
                }
                let sample = join_sample(&mut self.rng, &bootstrap);
                if !sample.is_empty() {
                    self.out.push(Output::Join(sample));
                }
            }
            Input::Gossip { from, msg } => {
                self.members.heard(from, None, now);
                self.on_signed(now, msg, Some(from), false);
            }
            Input::Direct { from, msg } => self.on_direct(now, from, msg),
            Input::NeighborUp(id) => {
                let first = self.members.neighbors.is_empty();
                self.members.neighbors.insert(id);
                self.members.heard(id, None, now);
                if first && self.ready {
                    // What was announced with no neighbour reached nobody
                    // (a start or restart that nobody dialled yet): once
                    // more, in new bytes (iroh-gossip drops repeated ones),
                    // the full state too so that peers need no pull.
                    self.beat += 1;
                    self.broadcast_alive();
                    self.own_full = None;
                    let full = self.own_full();
                    if full.len() <= wire::MAX_GOSSIP_BYTES {
                        self.broadcast(full);
                    }
                }
                if !self.transfers.bulk_done && !self.transfers.busy(&id) {
                    self.pull_all(id, now);
                }
            }
            Input::NeighborDown(id) => {
                self.members.neighbors.remove(&id);
            }
            Input::Lagged => self.next_digest = now,
            Input::Transfer { from, msgs } => self.on_transfer(now, from, msgs),
            Input::Local(changes) => self.on_local(changes),
            Input::Ready => self.on_ready(),
            Input::Addrs(addrs) => {
                if addrs != self.addrs {
                    self.addrs = addrs;
                    if self.ready {
                        self.beat += 1;
                        self.broadcast_alive();
                    }
                }
            }
            Input::Tick => self.on_tick(now),
            Input::Stop => {
                if self.ready {
                    let raw = self.sealer.seal(&Body::Leave);
                    self.broadcast(raw);
                }
            }
        }
    }

    /// Seals this node's own messages again (the keyring's primary key
    /// changed: peers may drop the old key). Moves the version on by one
    /// so that every holder fetches the state sealed under the new key.
    pub fn reseal(&mut self) {
        self.own_alive = None;
        self.own_full = None;
        if !self.ready {
            return;
        }
        self.version += 1;
        self.beat += 1;
        self.broadcast_alive();
        let full = self.own_full();
        if full.len() <= wire::MAX_GOSSIP_BYTES {
            self.broadcast(full);
        }
    }

    fn broadcast(&mut self, raw: Arc<[u8]>) {
        self.stats.broadcasts += 1;
        self.out.push(Output::Broadcast(raw));
    }

    fn send(&mut self, to: NodeId, msg: Direct) {
        self.stats.sends += 1;
        self.out.push(Output::Send(to, msg));
    }

    fn pull_all(&mut self, from: NodeId, now: Instant) {
        self.stats.pulls += 1;
        self.transfers.start_bulk(from, now);
        self.out.push(Output::Pull {
            from,
            want: Want::All,
        });
    }

    fn alive_body(&self) -> Body {
        Body::Alive {
            beat: self.beat,
            version: self.version,
            addrs: self.addrs.clone(),
        }
    }

    fn broadcast_alive(&mut self) {
        let raw = self.sealer.seal(&self.alive_body());
        self.own_alive = Some(raw.clone());
        self.broadcast(raw);
    }

    /// The sealed full state of this node at its current version.
    fn own_full(&mut self) -> Arc<[u8]> {
        if let Some((v, raw)) = &self.own_full
            && *v == self.version
        {
            return raw.clone();
        }
        let body = Body::FullState {
            version: self.version,
            groups: self
                .groups
                .iter()
                .map(|(s, g)| (s.clone(), g.clone()))
                .collect(),
        };
        let raw = self.sealer.seal(&body);
        self.own_full = Some((self.version, raw.clone()));
        raw
    }

    fn on_ready(&mut self) {
        if self.ready {
            return;
        }
        self.ready = true;
        self.version = 1;
        self.beat = 1;
        self.broadcast_alive();
        let full = self.own_full();
        if full.len() <= wire::MAX_GOSSIP_BYTES {
            self.broadcast(full);
        }
    }

    fn on_local(&mut self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        for c in &changes {
            match c {
                Change::Upsert(s, g) => {
                    self.groups.insert(s.clone(), g.clone());
                }
                Change::Remove(s) => {
                    self.groups.remove(s);
                }
            }
        }
        if !self.ready {
            return;
        }
        if self.members.neighbors.is_empty() {
            // Nobody would hear a delta: peers see the version in digests
            // and pull the full state.
            self.version += 1;
            return;
        }
        let (chunks, skipped) =
            wire::chunk_changes(changes, wire::MAX_GOSSIP_BYTES, wire::HEADER_BUDGET);
        for changes in chunks {
            self.version += 1;
            let raw = self.sealer.seal(&Body::Delta {
                version: self.version,
                changes,
            });
            self.broadcast(raw);
        }
        if skipped > 0 {
            // Peers see the version jump and pull the full state.
            self.stats.oversize_changes += skipped as u64;
            self.version += 1;
            self.broadcast_alive();
        }
    }

    /// The signed messages this node holds of remote origins (what is kept
    /// in the data dir across a restart).
    pub fn held(&self) -> Vec<Arc<[u8]>> {
        let mut ids: Vec<&NodeId> = self.origins.keys().collect();
        ids.sort_unstable();
        ids.into_iter()
            .flat_map(|id| self.origins[id].proof())
            .collect()
    }

    /// Everything `want` names that this node can prove: its own state and
    /// the signed states it holds of others.
    pub fn serve(&mut self, want: &Want) -> Vec<Arc<[u8]>> {
        let mut out = Vec::new();
        let mine = match want {
            Want::All => true,
            Want::Some(ids) => ids.contains(&self.me),
        };
        if mine && self.ready {
            if let Some(a) = self.own_alive.clone() {
                out.push(a);
            }
            out.push(self.own_full());
        }
        match want {
            Want::All => out.extend(self.held()),
            Want::Some(ids) => {
                for id in ids {
                    if let Some(o) = self.origins.get(id) {
                        out.extend(o.proof());
                    }
                }
            }
        }
        out
    }

    fn on_transfer(&mut self, now: Instant, from: NodeId, msgs: Option<Vec<Signed>>) {
        let bulk = self.transfers.is_bulk(&from);
        let Some(msgs) = msgs else {
            self.transfers.finished(&from, now);
            return;
        };
        let mut brought = HashSet::new();
        for msg in msgs {
            brought.insert(msg.origin);
            self.on_signed(now, msg, Some(from), true);
        }
        for o in brought {
            let still = self
                .origins
                .get(&o)
                .is_some_and(|s| s.known.is_none() && s.status.is_live());
            if !still {
                self.transfers.done(&o);
            }
        }
        self.transfers.finished(&from, now);
        if bulk {
            self.transfers.bulk_done = true;
            // What was announced while the bulk was on its way: compare
            // with another member soon.
            self.next_digest = self.next_digest.min(now + GAP_GRACE);
        }
    }

    fn on_signed(&mut self, now: Instant, msg: Signed, via: Option<NodeId>, transfer: bool) {
        if msg.origin == self.me {
            self.check_own(&msg);
            return;
        }
        if let Body::Suspect {
            target,
            incarnation,
            beat,
        } = msg.body
        {
            return self.on_suspect(now, target, incarnation, beat);
        }
        let id = msg.origin;
        let o = self
            .origins
            .entry(id)
            .or_insert_with(|| OriginState::new(msg.node_name.clone(), msg.incarnation, now));
        if msg.incarnation < o.incarnation {
            return;
        }
        if msg.incarnation > o.incarnation {
            log::info!(
                "gossip: {} ({}) restarted; keeping its records until its full state arrives",
                hex(&id),
                msg.node_name
            );
            o.restart(msg.incarnation);
            if !o.status.is_live() {
                o.status = Status::Alive;
            }
        }
        if !transfer {
            o.last_heard = now;
        }
        o.node_name = msg.node_name.clone();
        let mut new_name = false;
        match msg.body {
            Body::Alive {
                beat,
                version,
                addrs,
            } => {
                // A leave is final for its incarnation: no alive of it
                // (relayed late, or pulled from a holder) brings it back.
                let left = matches!(o.status, Status::Left { .. });
                if beat > o.beat && !left {
                    new_name = o.beat == 0;
                    o.beat = beat;
                    o.alive_raw = Some(msg.raw.clone());
                    if o.status != Status::Alive {
                        o.status = Status::Alive;
                    }
                    if self.members.heard(id, Some(&addrs), now) && !addrs.is_empty() {
                        self.out.push(Output::Addrs(id, addrs));
                    }
                }
                if o.status.is_live() {
                    o.advertise(version, now);
                    if o.known.is_none() || o.advertised > o.known.unwrap_or(0) {
                        self.transfers.want(id, via, now);
                    }
                }
            }
            Body::Delta { version, changes } => {
                if !o.status.is_live() {
                    return;
                }
                match o.delta(version, changes, msg.raw.clone(), now) {
                    DeltaOutcome::Applied(lists) => {
                        let node_name = o.node_name.clone();
                        for changes in lists {
                            self.out.push(Output::Registry(RegistryOp::Apply {
                                origin: id,
                                node_name: node_name.clone(),
                                changes,
                            }));
                        }
                    }
                    DeltaOutcome::Stale => {}
                    DeltaOutcome::Held => self.transfers.want(id, via, now),
                }
            }
            Body::FullState { version, groups } => {
                if !o.status.is_live() {
                    return;
                }
                if groups.len() > MAX_GROUPS_PER_ORIGIN {
                    log::warn!(
                        "gossip: {} ({}) publishes {} groups, more than {MAX_GROUPS_PER_ORIGIN}: ignored",
                        hex(&id),
                        o.node_name,
                        groups.len()
                    );
                    return;
                }
                if let Some(after) = o.full_state(version, msg.raw.clone(), now) {
                    let node_name = o.node_name.clone();
                    self.out.push(Output::Registry(RegistryOp::Replace {
                        origin: id,
                        node_name: node_name.clone(),
                        groups,
                    }));
                    for changes in after {
                        self.out.push(Output::Registry(RegistryOp::Apply {
                            origin: id,
                            node_name: node_name.clone(),
                            changes,
                        }));
                    }
                    if o.known >= Some(o.advertised) {
                        self.transfers.done(&id);
                    }
                }
            }
            Body::Leave => {
                if o.status.is_live() {
                    log::info!("gossip: {} ({}) left", hex(&id), o.node_name);
                    o.status = Status::Left { since: now };
                    if o.holds {
                        self.out
                            .push(Output::Registry(RegistryOp::Drop { origin: id }));
                    }
                    o.clear_records();
                    self.transfers.done(&id);
                }
            }
            Body::Suspect { .. } => {}
        }
        if new_name {
            self.members.add_to_ring(&mut self.rng, id);
            self.check_names(id);
        }
    }

    /// A message signed with this node's key that this node did not send
    /// now: an older life of ours relayed back, or another process using
    /// the same key.
    fn check_own(&mut self, msg: &Signed) {
        let theirs = match &msg.body {
            Body::Alive { beat, .. } => Some(*beat),
            _ => None,
        };
        if msg.incarnation > self.incarnation
            || (msg.incarnation == self.incarnation && theirs.is_some_and(|b| b > self.beat))
        {
            self.stats.duplicate_keys += 1;
            log::error!(
                "gossip: another node uses this node's key (incarnation {} seen, ours is {}): give each node its own {}",
                msg.incarnation,
                self.incarnation,
                super::KEY_FILE
            );
        }
    }

    /// Logs two live origins that share a node name.
    fn check_names(&mut self, id: NodeId) {
        let Some(name) = self.origins.get(&id).map(|o| o.node_name.clone()) else {
            return;
        };
        let mut clash: Vec<NodeId> = self
            .origins
            .iter()
            .filter(|(o, s)| **o != id && s.status.is_live() && s.node_name == name)
            .map(|(o, _)| *o)
            .collect();
        if *name == *self.node_name {
            clash.push(self.me);
        }
        for other in clash {
            let pair = if id < other { (id, other) } else { (other, id) };
            if self.dup_names.insert(pair) {
                self.stats.duplicate_names += 1;
                log::error!(
                    "gossip: node name {name} is used by {} and {}: names under <node>.<domain> clash",
                    hex(&pair.0),
                    hex(&pair.1)
                );
            }
        }
    }

    fn on_suspect(&mut self, now: Instant, target: NodeId, incarnation: u64, beat: u64) {
        if target == self.me {
            if incarnation == self.incarnation && beat >= self.beat && self.ready {
                self.refute(beat);
            }
            return;
        }
        if let Some(o) = self.origins.get_mut(&target)
            && incarnation == o.incarnation
            && beat >= o.beat
            && o.status == Status::Alive
        {
            o.status = Status::Suspect { since: now };
        }
    }

    /// A member's digest shows `e.origin` dead or left. As memberlist does
    /// when it merges a peer's state, this is taken as a suspicion, not a
    /// death: this node suspects it (a signed `Suspect` goes out, so the
    /// origin refutes if it lives) and drops it only when the suspicion
    /// runs out. After a partition each side holds the other dead; taking
    /// that word as a death made nodes drop peers of their own side that
    /// nobody had told to refute.
    fn suspect_from_digest(&mut self, now: Instant, e: &Entry) {
        let Some(o) = self.origins.get(&e.origin) else {
            return;
        };
        if o.status != Status::Alive || e.incarnation != o.incarnation || e.beat < o.beat {
            return;
        }
        self.suspect(now, e.origin);
    }

    fn refute(&mut self, beat: u64) {
        self.beat = self.beat.max(beat) + 1;
        self.stats.refutes += 1;
        self.broadcast_alive();
    }

    fn on_direct(&mut self, now: Instant, from: NodeId, msg: Direct) {
        self.members.heard(from, None, now);
        // Any direct message proves its (authenticated) sender alive.
        if let Some(o) = self.origins.get_mut(&from)
            && o.status == Status::Alive
        {
            o.last_heard = now;
        }
        match msg {
            Direct::Ping { nonce } => self.send(from, Direct::Ack { nonce }),
            Direct::Ack { nonce } => {
                if let Some(p) = self.members.probe
                    && p.target == from
                    && p.nonce == nonce
                {
                    self.members.probe = None;
                }
                if let Some(o) = self.origins.get_mut(&from) {
                    o.last_heard = now;
                }
            }
            Direct::DigestSum { sum } => {
                let entries = self.digest();
                if digest_sum(entries.iter()) != sum {
                    self.send(
                        from,
                        Direct::DigestFull {
                            entries,
                            answer: true,
                        },
                    );
                }
            }
            Direct::DigestFull { entries, answer } => self.on_digest(now, from, entries, answer),
        }
    }

    /// This node's digest: itself (once announced) and every origin it
    /// knows.
    fn digest(&self) -> Vec<Entry> {
        let mut out = Vec::with_capacity(self.origins.len() + 1);
        if self.ready {
            out.push(Entry {
                origin: self.me,
                incarnation: self.incarnation,
                version: self.version,
                beat: self.beat,
                gone: false,
            });
        }
        out.extend(self.origins.iter().map(|(id, o)| Entry {
            origin: *id,
            incarnation: o.incarnation,
            version: o.known.unwrap_or(0),
            beat: o.beat,
            gone: !o.status.is_live(),
        }));
        out.sort_unstable_by_key(|e| e.origin);
        out
    }

    fn on_digest(&mut self, now: Instant, from: NodeId, entries: Vec<Entry>, answer: bool) {
        let mut theirs: HashMap<NodeId, Entry> = HashMap::with_capacity(entries.len());
        let mut learned = false;
        for e in entries {
            if e.origin == self.me {
                if e.incarnation > self.incarnation
                    || (e.incarnation == self.incarnation && e.beat > self.beat && !e.gone)
                {
                    self.stats.duplicate_keys += 1;
                    log::error!(
                        "gossip: a peer holds this node's key at incarnation {}, beat {} (ours: {}, {}): another node uses the same {}",
                        e.incarnation,
                        e.beat,
                        self.incarnation,
                        self.beat,
                        super::KEY_FILE
                    );
                } else if e.gone
                    && e.incarnation == self.incarnation
                    && e.beat >= self.beat
                    && self.ready
                {
                    self.refute(e.beat);
                }
            } else if e.gone {
                // A member saw it die (suspected for a whole lease, or
                // left): suspect it; if it is in fact alive it refutes
                // with a higher beat.
                self.suspect_from_digest(now, &e);
            } else {
                let want = match self.origins.get(&e.origin) {
                    None => e.beat > 0,
                    Some(o) => {
                        e.incarnation > o.incarnation
                            || (e.incarnation == o.incarnation
                                && !matches!(o.status, Status::Left { .. })
                                && (e.beat > o.beat
                                    || (o.status.is_live() && e.version > o.known.unwrap_or(0))))
                    }
                };
                if want {
                    learned = true;
                    self.transfers.want(e.origin, Some(from), now);
                }
            }
            theirs.insert(e.origin, e);
        }
        if learned {
            // Still converging (a cold start, a heal): the next exchange
            // comes soon, so news spreads in rounds of DIGEST_FAST.
            self.next_digest = self.next_digest.min(now + self.params.digest_fast);
        }
        if !answer {
            return;
        }
        let mine = self.digest();
        let they_lack = mine.iter().any(|m| {
            !m.gone
                && theirs.get(&m.origin).is_none_or(|t| {
                    m.incarnation > t.incarnation
                        || (m.incarnation == t.incarnation
                            && (m.beat > t.beat || m.version > t.version))
                })
        });
        if they_lack {
            self.send(
                from,
                Direct::DigestFull {
                    entries: mine,
                    answer: false,
                },
            );
        }
    }

    fn on_tick(&mut self, now: Instant) {
        // Probes.
        if let Some(p) = self.members.probe
            && now >= p.deadline
        {
            if p.retried {
                self.members.probe = None;
                self.suspect(now, p.target);
            } else {
                // One lost datagram is not a failure: ask once more.
                self.members.probe = Some(super::membership::Probe {
                    deadline: now + self.params.probe_timeout,
                    retried: true,
                    ..p
                });
                self.send(p.target, Direct::Ping { nonce: p.nonce });
            }
        }
        if self.members.probe.is_none() && now >= self.members.next_probe {
            self.members.next_probe = now + self.params.probe_every;
            let origins = &self.origins;
            let live = |id: &NodeId| origins.get(id).is_some_and(|o| o.status == Status::Alive);
            if let Some((target, nonce)) =
                self.members
                    .next_probe_target(&mut self.rng, live, origins.keys().copied())
            {
                self.members.probe = Some(super::membership::Probe {
                    target,
                    nonce,
                    deadline: now + self.params.probe_timeout,
                    retried: false,
                });
                self.send(target, Direct::Ping { nonce });
            }
        }
        // Digest exchange with a random live member.
        if now >= self.next_digest {
            self.next_digest = now + jitter(&mut self.rng, self.params.digest_every);
            if let Some(peer) = self.digest_peer() {
                let sum = digest_sum(self.digest().iter());
                self.send(peer, Direct::DigestSum { sum });
            }
        }
        // Reconnect to a random known non-neighbour.
        if now >= self.members.next_reconnect {
            self.members.next_reconnect = now + jitter(&mut self.rng, self.params.reconnect_every);
            if let Some(peer) = self.members.reconnect_target(&mut self.rng, &self.me) {
                self.out.push(Output::Join(vec![peer]));
                let sum = digest_sum(self.digest().iter());
                self.send(peer, Direct::DigestSum { sum });
            }
        }
        // Alone: join a sample of known peers again.
        if self.members.neighbors.is_empty() && now >= self.members.next_rejoin {
            self.members.next_rejoin = now + jitter(&mut self.rng, REJOIN_EVERY);
            let mut known: Vec<NodeId> = self
                .members
                .known
                .keys()
                .filter(|id| **id != self.me)
                .copied()
                .collect();
            known.sort_unstable();
            let sample = join_sample(&mut self.rng, &known);
            if let Some(first) = sample.first().copied() {
                self.out.push(Output::Join(sample));
                let sum = digest_sum(self.digest().iter());
                self.send(first, Direct::DigestSum { sum });
            }
        }
        // A join whose bulk pull failed tries another neighbour.
        if !self.transfers.bulk_done && !self.members.neighbors.is_empty() {
            let mut n: Vec<NodeId> = self.members.neighbors.iter().copied().collect();
            n.sort_unstable();
            if !n.iter().any(|p| self.transfers.busy(p)) {
                let p = n[self.rng.usize(..n.len())];
                self.pull_all(p, now);
            }
        }
        if now >= self.next_sweep {
            self.next_sweep = now + SWEEP_EVERY;
            self.sweep(now);
        }
        // Pulls.
        self.transfers.expire(now);
        let origins = &self.origins;
        let me = self.me;
        let neighbors = &self.members.neighbors;
        // A neighbour is up, whatever we last heard of its origin (a
        // restarted node that left in its previous life). So is the owner
        // of a wanted origin: a dead one is wanted only when a peer showed
        // it alive again (a higher beat or incarnation), and its refutation
        // may not have reached this node yet.
        let due = self.transfers.due(now, |p, wanted| {
            *p != me
                && (p == wanted
                    || neighbors.contains(p)
                    || origins.get(p).is_none_or(|o| o.status.is_live()))
        });
        for (from, ids) in due {
            self.stats.pulls += 1;
            self.out.push(Output::Pull {
                from,
                want: Want::Some(ids),
            });
        }
    }

    fn suspect(&mut self, now: Instant, target: NodeId) {
        let Some(o) = self.origins.get_mut(&target) else {
            return;
        };
        if o.status != Status::Alive {
            return;
        }
        // The lease runs from the last word heard (SPEC §7), leaving the
        // suspect at least half the lease (`SUSPECT_MIN` or more) to
        // refute.
        let window = SUSPECT_MIN.max(self.params.lease / 2);
        let since = (now + window)
            .checked_sub(self.params.lease)
            .map_or(now, |t| t.max(o.last_heard).min(now));
        o.status = Status::Suspect { since };
        self.stats.suspects += 1;
        let body = Body::Suspect {
            target,
            incarnation: o.incarnation,
            beat: o.beat,
        };
        let raw = self.sealer.seal(&body);
        self.broadcast(raw);
    }

    /// Leases of suspects, gaps, forgetting.
    fn sweep(&mut self, now: Instant) {
        let lease = self.params.lease;
        let forget = lease * FORGET_LEASES;
        let mut drops = Vec::new();
        let mut dead = Vec::new();
        let mut wants = Vec::new();
        self.origins.retain(|id, o| {
            match o.status {
                Status::Suspect { since } if now.saturating_duration_since(since) >= lease => {
                    log::info!(
                        "gossip: {} ({}) silent for the lease, dropping its records",
                        hex(id),
                        o.node_name
                    );
                    o.status = Status::Dead { since: now };
                    if o.holds {
                        drops.push(*id);
                    }
                    dead.push(*id);
                    o.clear_records();
                }
                Status::Dead { since } | Status::Left { since }
                    if now.saturating_duration_since(since) >= forget =>
                {
                    return false;
                }
                _ => {}
            }
            if o.wants_state(now, GAP_GRACE) {
                wants.push(*id);
            }
            true
        });
        self.stats.deaths += drops.len() as u64;
        for id in &dead {
            // Only news that it lives again makes it wanted again.
            self.transfers.done(id);
        }
        for id in drops {
            self.out
                .push(Output::Registry(RegistryOp::Drop { origin: id }));
        }
        for id in wants {
            if !self.transfers.is_wanted(&id) {
                self.transfers.want(id, None, now);
            }
        }
        let origins = &self.origins;
        self.transfers.prune(now, forget, |id| {
            origins
                .get(id)
                .is_none_or(|o| o.status.is_live() || o.beat > 0)
        });
        self.members.forget_silent(now, lease * PEER_FORGET_LEASES);
    }

    /// The peer of the next digest exchange: mostly a neighbour (connected
    /// and admitted already, so news spreads without new connections, which
    /// matters on a cold start), one time in [`DIGEST_ANY_ONE_IN`] any live
    /// member.
    fn digest_peer(&mut self) -> Option<NodeId> {
        if !self.members.neighbors.is_empty() && self.rng.u32(..DIGEST_ANY_ONE_IN) != 0 {
            let mut n: Vec<NodeId> = self.members.neighbors.iter().copied().collect();
            n.sort_unstable();
            return Some(n[self.rng.usize(..n.len())]);
        }
        self.random_live()
    }

    fn random_live(&mut self) -> Option<NodeId> {
        let mut live: Vec<NodeId> = self
            .origins
            .iter()
            .filter(|(_, o)| o.status == Status::Alive)
            .map(|(id, _)| *id)
            .collect();
        if live.is_empty() {
            live = self.members.neighbors.iter().copied().collect();
        }
        if live.is_empty() {
            return None;
        }
        live.sort_unstable();
        Some(live[self.rng.usize(..live.len())])
    }
}

/// Lowercase hex of an id (as iroh prints endpoint ids).
pub fn hex(id: &NodeId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
