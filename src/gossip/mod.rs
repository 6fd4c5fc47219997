//! Cluster membership and record replication over iroh-gossip.
//!
//! The gossip thread owns an iroh endpoint (relays off, no public discovery,
//! no port mapping) and a small tokio runtime. It publishes this node's
//! records as signed deltas and heartbeats on the cluster topic, serves its
//! full state over a direct QUIC stream ([`auth::STATE_ALPN`]), and turns
//! what peers publish into [`RegistryMsg`]s.
//!
//! Protocol in short: every node broadcasts `Hello` when it gains its first
//! neighbour, a `Heartbeat` (its records' version) every lease/3 and on each
//! new neighbour, and one `Delta` per change batch (consecutive versions).
//! A receiver holds an origin's records from a full state pulled from the
//! owner over [`auth::STATE_ALPN`] plus the consecutive deltas after it; it
//! pulls again on a new incarnation, a version gap older than
//! [`node::GAP_GRACE`], or `Lagged`. While a node has fewer gossip
//! neighbours than it wants, it also pushes each heartbeat straight to its
//! admitted non-neighbours over [`auth::STATE_ALPN`] (the receiver checks it
//! like gossip), so its lease never rests on the overlay alone. Peers are
//! admitted by [`auth`] before any gossip or state connection; a peer
//! admitted again with a new incarnation (it restarted, maybe by `kill -9`)
//! has its previous process's connections closed first, so iroh-gossip
//! drops the dead neighbour and answers the new process's join. Limits: [`wire::MAX_GOSSIP_BYTES`] per
//! broadcast (iroh-gossip `max_message_size` [`wire::GOSSIP_MAX_MESSAGE_SIZE`]
//! on every node), [`wire::MAX_STREAM_BYTES`] per full state.
//!
//! Invariants: a remote record reaches the registry only from a message that
//! passed [`wire::open`] (version, HMAC, signature, origin = signer), the
//! replay window and the version order of its origin; an origin's records
//! are dropped only when it has been silent for the lease; a new incarnation
//! of an origin replaces the old one's records only with its full state.

pub mod auth;
pub mod core;
pub mod driver;
pub mod membership;
pub mod node;
pub mod origins;
pub mod persist;
pub mod sim;
pub mod transfer;
pub mod wire;

use std::collections::HashSet;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use iroh::{EndpointId, SecretKey};

use crate::config::{Config, Keyring};
use crate::registry::RegistryMsg;
use crate::table::{Origin, SharedTable};

pub use auth::Refusal;
pub use wire::{DropReason, Keys, Ring, Versions};

/// Capacity of the gossip thread's command inbox.
pub const COMMAND_CAPACITY: usize = 256;
/// Worker threads of the gossip runtime: one worker lost bursts (IROH.md
/// trap 1), two did not.
pub const RUNTIME_WORKERS: usize = 2;
/// Shortest interval between two publishes of local changes. The bridge
/// forwards a change token at once, then waits this long before it takes
/// the next one: the tokens of a burst fold into the registry's one-slot
/// channel meanwhile, and the last one is forwarded at the end of the wait,
/// so the last change is never lost and an isolated change is published
/// without delay.
pub const PUBLISH_MIN_INTERVAL: Duration = Duration::from_millis(20);
/// Longest [`Gossip::stop`] waits for the topic to be left cleanly.
pub const STOP_TIMEOUT: Duration = Duration::from_millis(500);
/// Longest the start waits for the endpoint to bind.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// File of the node's secret key inside the data dir.
pub const KEY_FILE: &str = "node.key";
/// Gossip topic when none is configured: fixed, so that rotating the key
/// never moves the cluster to another topic (admission keeps others out).
pub const DEFAULT_TOPIC: [u8; 32] = *b"glued/cluster-topic/v1\0\0\0\0\0\0\0\0\0\0";
/// File of the last incarnation number inside the data dir.
pub const INCARNATION_FILE: &str = "incarnation";

/// Counters of the gossip thread, for `/metrics`.
#[derive(Debug, Default)]
pub struct GossipStats {
    pub sent: AtomicU64,
    pub sent_bytes: AtomicU64,
    pub received: AtomicU64,
    pub received_bytes: AtomicU64,
    /// Dropped messages by [`DropReason::index`].
    pub dropped: [AtomicU64; 7],
    pub auth_ok: AtomicU64,
    /// Admissions refused for the peer's proof, key or version.
    pub auth_refused: AtomicU64,
    /// Admissions not made, by [`Refusal::index`] (every reason, including
    /// rate limits and timeouts of unauthenticated clients).
    pub admission_refusals: [AtomicU64; 7],
    /// Admission exchanges being served now.
    pub admissions_in_progress: AtomicU64,
    /// Admissions ended (a key left the ring, the peer restarted).
    pub admissions_ended: AtomicU64,
    /// Keyring reloads installed.
    pub keyring_reloads: AtomicU64,
    pub lagged: AtomicU64,
    pub state_pulls: AtomicU64,
    pub state_pull_failures: AtomicU64,
    pub state_served: AtomicU64,
    pub leases_expired: AtomicU64,
    pub oversize_changes: AtomicU64,
    pub neighbors: AtomicU64,
    pub origins: AtomicU64,
    /// Liveness of the gossip thread's loop.
    pub heartbeat: Arc<crate::health::Heartbeat>,
}

impl GossipStats {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()].load(Ordering::Relaxed)
    }

    pub fn refusals(&self, reason: Refusal) -> u64 {
        self.admission_refusals[reason.index()].load(Ordering::Relaxed)
    }

    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let counters = [
            (
                "glued_gossip_messages_sent_total",
                "Gossip messages sent.",
                &self.sent,
            ),
            (
                "glued_gossip_bytes_sent_total",
                "Bytes of gossip messages sent.",
                &self.sent_bytes,
            ),
            (
                "glued_gossip_messages_received_total",
                "Gossip messages received (before checks).",
                &self.received,
            ),
            (
                "glued_gossip_bytes_received_total",
                "Bytes of gossip messages received.",
                &self.received_bytes,
            ),
            (
                "glued_gossip_auth_ok_total",
                "Successful admissions (either side).",
                &self.auth_ok,
            ),
            (
                "glued_gossip_auth_refused_total",
                "Admissions refused for the peer's proof, key or protocol version.",
                &self.auth_refused,
            ),
            (
                "glued_gossip_admissions_ended_total",
                "Admissions ended because the peer restarted or its key left the keyring.",
                &self.admissions_ended,
            ),
            (
                "glued_gossip_keyring_reloads_total",
                "Keyrings installed by SIGHUP.",
                &self.keyring_reloads,
            ),
            (
                "glued_gossip_lagged_total",
                "Times the gossip event stream lagged (a resynchronisation).",
                &self.lagged,
            ),
            (
                "glued_gossip_state_pulls_total",
                "Full states pulled from peers.",
                &self.state_pulls,
            ),
            (
                "glued_gossip_state_pull_failures_total",
                "Full-state pulls that failed.",
                &self.state_pull_failures,
            ),
            (
                "glued_gossip_state_served_total",
                "Full states served to peers.",
                &self.state_served,
            ),
            (
                "glued_gossip_leases_expired_total",
                "Peers whose lease expired.",
                &self.leases_expired,
            ),
            (
                "glued_gossip_oversize_changes_total",
                "Changes too large for one message (sent as full state).",
                &self.oversize_changes,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP glued_gossip_dropped_total Gossip messages dropped, by reason.\n\
             # TYPE glued_gossip_dropped_total counter"
        );
        for r in DropReason::ALL {
            let _ = writeln!(
                out,
                "glued_gossip_dropped_total{{reason=\"{}\"}} {}",
                r.label(),
                self.dropped(r)
            );
        }
        let _ = writeln!(
            out,
            "# HELP glued_gossip_admission_refusals_total Admissions not made, by reason \
             (counted always; log lines are rate-limited).\n\
             # TYPE glued_gossip_admission_refusals_total counter"
        );
        for r in Refusal::ALL {
            let _ = writeln!(
                out,
                "glued_gossip_admission_refusals_total{{reason=\"{}\"}} {}",
                r.label(),
                self.refusals(r)
            );
        }
        for (name, help, v) in [
            (
                "glued_gossip_neighbors",
                "Gossip neighbours now.",
                &self.neighbors,
            ),
            (
                "glued_gossip_origins",
                "Live remote origins.",
                &self.origins,
            ),
            (
                "glued_gossip_admissions_in_progress",
                "Admission exchanges being served now.",
                &self.admissions_in_progress,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
}

/// One peer, as shown by `/peers`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PeerStatus {
    pub id: String,
    pub node_name: String,
    pub addr: Option<String>,
    pub last_heard_ms_ago: u64,
    pub records: usize,
    /// Admitted now (its admission has not ended).
    pub authenticated: bool,
    /// Id of the key its admission was proven with, else of the key that
    /// verified its last message.
    pub key_id: Option<String>,
    /// Protocol version used with it (admission), else of its last message.
    pub protocol_version: Option<u8>,
}

/// Peers known to the gossip thread, read by the status thread.
pub type Peers = Arc<Mutex<Vec<PeerStatus>>>;

/// Loads the node's secret key from `<data_dir>/node.key`, creating the
/// directory and the key (mode 0600) when absent. Two processes creating
/// it at once agree: the first key written wins.
pub fn load_key(data_dir: &Path) -> anyhow::Result<SecretKey> {
    load_key_at(data_dir, true)
}

fn load_key_at(data_dir: &Path, create: bool) -> anyhow::Result<SecretKey> {
    let path = data_dir.join(KEY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let raw: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                anyhow::anyhow!(
                    "{}: expected 32 bytes, found {}; delete it to create a new identity",
                    path.display(),
                    bytes.len()
                )
            })?;
            Ok(SecretKey::from_bytes(&raw))
        }
        Err(e) if create && e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir)
                .with_context(|| format!("creating data dir {}", data_dir.display()))?;
            let key = SecretKey::generate();
            if write_private_new(&path, &key.to_bytes())? {
                Ok(key)
            } else {
                // Another process created it meanwhile: use that one.
                load_key_at(data_dir, false)
            }
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes `bytes` to a new file readable by the owner only, complete or
/// not at all; returns false (writing nothing) when `path` already exists.
fn write_private_new(path: &Path, bytes: &[u8]) -> anyhow::Result<bool> {
    use std::os::unix::fs::OpenOptionsExt;
    static N: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_extension(format!(
        "tmp.{}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    // A hard link never replaces an existing file, unlike a rename.
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

/// This node's identity: the endpoint id, hex.
pub fn local_id(data_dir: &Path) -> anyhow::Result<String> {
    Ok(load_key(data_dir)?.public().to_string())
}

/// The next incarnation of this node: greater than the last one stored in
/// the data dir and than the clock in milliseconds, so it grows across
/// restarts even when the clock steps back or the file is lost.
pub fn next_incarnation(data_dir: &Path) -> u64 {
    let path = data_dir.join(INCARNATION_FILE);
    let last = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let next = last.saturating_add(1).max(now_ms);
    if let Err(e) = std::fs::write(&path, next.to_string()) {
        log::warn!("cannot store the incarnation in {}: {e}", path.display());
    }
    next
}

/// Commands to the gossip thread.
enum Command {
    LocalChanged,
    /// Broadcast these bytes as they are (tests and tools).
    BroadcastRaw(Vec<u8>),
    /// Block (or unblock) all traffic with these peers at the endpoint
    /// (tests: a simulated partition).
    Block(Vec<EndpointId>, bool),
    /// Install a reloaded keyring (never empty).
    SetKeyring(Keyring),
    /// Leave the topic cleanly and stop.
    Stop,
    /// Stop without leaving (tests: like `kill -9`).
    Kill,
}

/// What the thread reports once the endpoint is bound.
struct Bound {
    id: EndpointId,
    addrs: Vec<SocketAddr>,
    incarnation: u64,
}

/// Handle to the gossip thread.
pub struct Gossip {
    /// This node's endpoint id.
    pub id: EndpointId,
    /// Addresses the endpoint is bound to.
    pub addrs: Vec<SocketAddr>,
    pub incarnation: u64,
    commands: tokio::sync::mpsc::Sender<Command>,
    /// How the thread must end: set by `stop`/`kill`, never lost to a full
    /// command queue and acted on even while a handler awaits the network.
    halt: tokio::sync::watch::Sender<Halt>,
    thread: Option<JoinHandle<()>>,
    bridge: Option<JoinHandle<()>>,
}

/// The gossip thread's run state, outside the bounded command queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Halt {
    Run,
    /// Leave the topic (bounded by [`STOP_TIMEOUT`]) and end.
    Stop,
    /// End at once without telling anyone.
    Kill,
}

impl Gossip {
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        config: &Config,
        origin: Origin,
        table: SharedTable,
        registry: Sender<RegistryMsg>,
        local_changed: Receiver<()>,
        stats: Arc<GossipStats>,
        peers: Peers,
    ) -> anyhow::Result<Gossip> {
        Gossip::start_after_docker(
            config,
            origin,
            table,
            registry,
            local_changed,
            stats,
            peers,
            None,
        )
    }

    /// Like [`Gossip::start`], announcing this node's records only once the
    /// Docker thread of `docker` made its first attempt (resynchronised, or
    /// found the engine unreachable), so a restart never announces a state
    /// without its containers (SPEC §7).
    #[allow(clippy::too_many_arguments)]
    pub fn start_after_docker(
        config: &Config,
        origin: Origin,
        table: SharedTable,
        registry: Sender<RegistryMsg>,
        local_changed: Receiver<()>,
        stats: Arc<GossipStats>,
        peers: Peers,
        docker: Option<Arc<crate::docker::DockerStats>>,
    ) -> anyhow::Result<Gossip> {
        anyhow::ensure!(
            !config.cluster_keys.is_empty(),
            "gossip needs a cluster key (single host mode has none)"
        );
        let key = load_key(&config.data_dir)?;
        anyhow::ensure!(
            key.public().to_string() == *origin.id,
            "origin id does not match {}",
            config.data_dir.join(KEY_FILE).display()
        );
        let incarnation = next_incarnation(&config.data_dir);
        let (commands, inbox) = tokio::sync::mpsc::channel(COMMAND_CAPACITY);
        let (halt, halt_rx) = tokio::sync::watch::channel(Halt::Run);
        let (bound_tx, bound_rx) = std::sync::mpsc::channel::<anyhow::Result<Bound>>();
        let heartbeat = stats.heartbeat.clone();
        let setup = node::Setup {
            config: config.clone(),
            key,
            incarnation,
            origin,
            table,
            registry,
            stats,
            peers,
            docker,
        };
        let thread = std::thread::Builder::new()
            .name("gossip".into())
            .spawn(move || {
                let alive = heartbeat.enter();
                node::run_thread(setup, inbox, halt_rx, bound_tx);
                alive.retire();
            })
            .context("spawning the gossip thread")?;
        let bound = match bound_rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => anyhow::bail!("the gossip endpoint did not start"),
        };
        let bridge_tx = commands.clone();
        let bridge = std::thread::Builder::new()
            .name("gossip-bridge".into())
            .spawn(move || bridge(local_changed, bridge_tx))
            .context("spawning the gossip bridge thread")?;
        Ok(Gossip {
            id: bound.id,
            addrs: bound.addrs,
            incarnation: bound.incarnation,
            commands,
            halt,
            thread: Some(thread),
            bridge: Some(bridge),
        })
    }

    /// `id@addr` for the first bound address: what a peer bootstraps from.
    pub fn bootstrap_string(&self) -> String {
        match self.addrs.first() {
            Some(a) => format!("{}@{a}", self.id),
            None => self.id.to_string(),
        }
    }

    /// Broadcasts raw bytes on the topic, unchecked (tests and tools).
    pub fn broadcast_raw(&self, bytes: Vec<u8>) {
        let _ = self.commands.try_send(Command::BroadcastRaw(bytes));
    }

    /// Drops all traffic with `peers` at the endpoint until unblocked
    /// (tests: a partition).
    pub fn block(&self, peers: Vec<EndpointId>, blocked: bool) {
        let _ = self.commands.try_send(Command::Block(peers, blocked));
    }

    /// Installs a reloaded keyring (`SIGHUP`): messages are sent and
    /// admissions proven with its primary key, any of its keys is accepted,
    /// and admissions proven with a key no longer in it end. An empty
    /// keyring is refused (leaving the cluster needs a restart) and the
    /// current one kept.
    pub fn set_keyring(&self, keyring: Keyring) -> Result<(), String> {
        if keyring.is_empty() {
            return Err(
                "the reloaded configuration has no cluster key; keeping the current \
                        keyring (restart to run as a single host)"
                    .into(),
            );
        }
        self.commands
            .try_send(Command::SetKeyring(keyring))
            .map_err(|e| format!("the gossip thread did not take the keyring: {e}"))
    }

    /// Leaves the topic (peers see `NeighborDown`) and stops the thread.
    pub fn stop(mut self) {
        self.finish(Command::Stop);
    }

    /// Stops without leaving the topic or telling anyone (tests: the
    /// equivalent of `kill -9` for the peers).
    pub fn kill(mut self) {
        self.finish(Command::Kill);
    }

    fn finish(&mut self, how: Command) {
        let halt = match how {
            Command::Kill => Halt::Kill,
            _ => Halt::Stop,
        };
        // The watch always takes the value; the command is only the fast path.
        self.halt.send_replace(halt);
        let _ = self.commands.try_send(how);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(t) = self.bridge.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Gossip {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.finish(Command::Stop);
        }
    }
}

/// Forwards the registry's change tokens into the async inbox, at most one
/// per [`PUBLISH_MIN_INTERVAL`] (see there).
fn bridge(local_changed: Receiver<()>, commands: tokio::sync::mpsc::Sender<Command>) {
    loop {
        match local_changed.recv_timeout(Duration::from_millis(100)) {
            Ok(()) => {
                if commands.blocking_send(Command::LocalChanged).is_err() {
                    return;
                }
                std::thread::sleep(PUBLISH_MIN_INTERVAL);
            }
            Err(RecvTimeoutError::Timeout) => {
                if commands.is_closed() {
                    return;
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Lines printed by `glued id`: the endpoint id first (creating the key in
/// the data dir when there is none), then `id@ip:port` addresses.
pub fn id_lines(config: &Config) -> anyhow::Result<Vec<String>> {
    let id = local_id(&config.data_dir)?;
    let mut lines = vec![id.clone()];
    let port = config.gossip_bind.port();
    let ips: Vec<IpAddr> = if config.gossip_bind.ip().is_unspecified() {
        interface_ips()
            .into_iter()
            .filter(|ip| ip.is_ipv4() == config.gossip_bind.is_ipv4() || ip.is_ipv4())
            .collect()
    } else {
        vec![config.gossip_bind.ip()]
    };
    for ip in ips {
        lines.push(format!("{id}@{}", SocketAddr::new(ip, port)));
    }
    Ok(lines)
}

/// True for interfaces whose addresses must not be advertised: loopback
/// and Docker bridges.
fn is_hidden_interface(name: &str) -> bool {
    name == "lo" || name == "docker0" || name.starts_with("br-") || name.starts_with("veth")
}

/// Non-loopback addresses of this host's interfaces, without Docker bridge
/// addresses and IPv6 link-local ones.
pub fn interface_ips() -> Vec<IpAddr> {
    let mut out = Vec::new();
    for (name, ip) in all_interface_ips() {
        if is_hidden_interface(&name) || ip.is_loopback() || ip.is_unspecified() {
            continue;
        }
        if let IpAddr::V6(v6) = ip
            && v6.is_unicast_link_local()
        {
            continue;
        }
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// Addresses of Docker bridge interfaces (never advertised by mDNS).
pub fn bridge_ips() -> HashSet<IpAddr> {
    all_interface_ips()
        .into_iter()
        .filter(|(name, _)| name != "lo" && is_hidden_interface(name))
        .map(|(_, ip)| ip)
        .collect()
}

/// Every (interface, address) pair, from `getifaddrs`.
fn all_interface_ips() -> Vec<(String, IpAddr)> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list returned by getifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr points to a sockaddr whose family says its type.
        let ip = unsafe {
            match (*ifa.ifa_addr).sa_family as i32 {
                libc::AF_INET => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    Some(IpAddr::from(u32::from_be(sa.sin_addr.s_addr).to_be_bytes()))
                }
                libc::AF_INET6 => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    Some(IpAddr::from(sa.sin6_addr.s6_addr))
                }
                _ => None,
            }
        };
        if let Some(ip) = ip {
            out.push((name, ip));
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_created_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("glued-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = local_id(&dir).unwrap();
        let b = local_id(&dir).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
        let mode = std::fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let i1 = next_incarnation(&dir);
        let i2 = next_incarnation(&dir);
        assert!(i2 > i1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn processes_creating_the_key_at_once_agree_on_it() {
        let dir = std::env::temp_dir().join(format!("glued-key-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ids: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| local_id(&dir).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
        assert_eq!(local_id(&dir).unwrap(), ids[0]);
        let files = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(files, 1, "no temporary file left");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn stats_render_every_drop_reason() {
        let s = GossipStats::default();
        s.dropped[DropReason::BadMac.index()].fetch_add(2, Ordering::Relaxed);
        s.admission_refusals[Refusal::RateLimited.index()].fetch_add(3, Ordering::Relaxed);
        let mut out = String::new();
        s.render(&mut out);
        assert!(out.contains("glued_gossip_dropped_total{reason=\"bad_hmac\"} 2"));
        assert!(out.contains("reason=\"replay\"} 0"));
        assert!(out.contains("glued_gossip_admission_refusals_total{reason=\"rate_limited\"} 3"));
        // Every metric family has HELP and TYPE.
        for line in out.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(out.contains(&format!("# HELP {name} ")), "{name}");
            assert!(out.contains(&format!("# TYPE {name} ")), "{name}");
        }
    }
}
