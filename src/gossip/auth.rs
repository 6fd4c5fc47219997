//! Admission: a challenge–response on Glued's own ALPN in which the
//! initiator proves the cluster key first.
//!
//! Before any gossip or state connection to or from a peer, both sides
//! prove that they hold a key of the cluster keyring:
//!
//! ```text
//! client → server  HELLO     min (1) ‖ max (1) ‖ client nonce (32) ‖ client incarnation (8, BE)
//! server → client  CHALLENGE status (1) ‖ min (1) ‖ max (1) ‖ server nonce (32) ‖ server incarnation (8)
//!                            status 0: go on; 1: no version in common (then the server closes)
//! client → server  PROOF     key id (4) ‖ HMAC(k_auth(key), "glued/auth/client" ‖ transcript)
//! server → client  VERDICT   1 ‖ HMAC(k_auth(key), "glued/auth/server" ‖ transcript)   admitted
//!                            0 (bad proof) or 2 (key not in the ring), and nothing more
//!   transcript = client range ‖ server range ‖ cn ‖ sn ‖ client id ‖ server id ‖ client inc ‖ server inc
//! ```
//!
//! The server answers with a proof only to a valid proof: an outsider who
//! dials in gets a nonce, never a value to test guesses of the key against
//! offline. The endpoint ids are those proven by the QUIC/TLS handshake,
//! so a proof cannot be replayed to or reflected at another node. Both
//! sides use the highest protocol version they share (each speaks its own
//! and the previous one); none in common is refused, and logged with both
//! ranges.
//!
//! An admission is bound to the peer's incarnation and to the key it was
//! proven with, and ends with either: a new incarnation seen in the peer's
//! messages, or its key removed from the ring (`SIGHUP`), ends it, closes
//! the peer's connections, and (for a key) starts a new admission with the
//! primary key. A peer admitted again with a new incarnation restarted: its
//! old process's connections are closed before the new one is let in, so
//! iroh-gossip drops the dead neighbour and answers the new process's join.
//!
//! Abuse bounds: anyone may dial the admission ALPN. Per source address
//! (an IPv6 /64 counts as one) a token bucket and a cap on exchanges at
//! once; the first bytes must come within [`FIRST_BYTE_DEADLINE`] and the
//! whole exchange within [`AUTH_TIMEOUT`]; [`RESERVED_ADMISSIONS`] of the
//! [`MAX_ADMISSIONS`] slots are kept for bootstrap and previously admitted
//! peers (ids proven by TLS); before any TLS handshake, an address that is
//! no admitted peer's may open at most [`HANDSHAKE_RATE_PER_ADDR`] QUIC
//! connections a second; admissions we start are capped
//! ([`MAX_OUTBOUND_ADMISSIONS`]) and a peer that failed (refused, I/O error
//! or timeout) is not tried again before a back-off. Refusals are counted
//! in `/metrics` always and logged at most [`REFUSAL_LOG_BURST`] at once,
//! then [`REFUSAL_LOG_PER_SEC`] a second.
//!
//! Invariant: [`Hooks`] let a gossip or state connection through (either
//! direction) only when its remote is in the admitted set; a remote gets
//! there only through a successful exchange, and leaves it when its
//! admission ends.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use iroh::endpoint::{
    AfterHandshakeOutcome, BeforeConnectOutcome, Connection, EndpointHooks, Incoming, IncomingAddr,
    WeakConnectionHandle,
};
use iroh::protocol::{AcceptError, IncomingFilterOutcome, ProtocolHandler};
use iroh::{Endpoint, EndpointAddr, EndpointId, SecretKey, TransportAddr};

use super::GossipStats;
use super::wire::{Ring, Versions, hmac};
use crate::config::{KEY_ID_LEN, KeyId};

/// ALPN of the admission exchange (2: initiator proves first, versions).
pub const AUTH_ALPN: &[u8] = b"glued/auth/2";
/// ALPN of the direct full-state stream.
pub const STATE_ALPN: &[u8] = b"glued/state/1";
/// ALPN of the replication core's direct messages and transfers (v4).
pub const CORE_ALPN: &[u8] = b"glued/core/1";
/// Longest a whole admission exchange may take.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(3);
/// A client that dialed the admission ALPN must have sent its whole hello
/// within this long, or its connection is closed and its slot freed.
pub const FIRST_BYTE_DEADLINE: Duration = Duration::from_secs(1);
/// A peer that refused us (or that we refused) is not tried again for this
/// long (the re-join loop would otherwise retry, and log, every few
/// seconds). A keyring reload forgets every back-off.
pub const REFUSED_BACKOFF: Duration = Duration::from_secs(30);
/// First back-off after an admission we started failed on I/O or timed
/// out; it doubles with each failure in a row...
pub const IO_BACKOFF_MIN: Duration = Duration::from_millis(500);
/// ...up to this.
pub const IO_BACKOFF_MAX: Duration = Duration::from_secs(8);
/// Most peers with a back-off remembered: refusals come from hosts that
/// need no key and can use a new endpoint id each time.
pub const MAX_REFUSED: usize = 1024;
/// Most admission exchanges served at once (each lasts at most
/// [`AUTH_TIMEOUT`]); more are closed at once.
pub const MAX_ADMISSIONS: usize = 32;
/// Of [`MAX_ADMISSIONS`], the slots only bootstrap peers and peers admitted
/// before may take.
pub const RESERVED_ADMISSIONS: usize = 8;
/// Most admission exchanges this node starts at once (dials, and dial-backs
/// of peers that connect without an admission); more wait for a slot.
pub const MAX_OUTBOUND_ADMISSIONS: usize = 16;
/// Admission exchanges one unknown source address may start per second...
pub const ADMISSION_RATE_PER_ADDR: f64 = 5.0;
/// ...in bursts of at most this many...
pub const ADMISSION_BURST_PER_ADDR: f64 = 10.0;
/// ...and run at once.
pub const MAX_ADMISSIONS_PER_ADDR: usize = 4;
/// New QUIC connections (any ALPN) one source address that is no admitted
/// peer's may start per second, checked before the TLS handshake (the
/// costly part); more are ignored...
pub const HANDSHAKE_RATE_PER_ADDR: f64 = 20.0;
/// ...beyond a burst of this many.
pub const HANDSHAKE_BURST_PER_ADDR: f64 = 40.0;
/// Most source addresses whose rate is tracked; when full, idle ones are
/// forgotten first, then new unknown addresses are refused.
pub const MAX_TRACKED_ADDRS: usize = 4096;
/// Most peer ids remembered as "admitted before" (for reserved slots).
pub const MAX_KNOWN_PEERS: usize = 4096;
/// Refusal lines logged at once at most...
pub const REFUSAL_LOG_BURST: f64 = 10.0;
/// ...then this many per second; the others are counted, and the next line
/// says how many were left out.
pub const REFUSAL_LOG_PER_SEC: f64 = 1.0;
/// QUIC application close code of an admission refused for lack of a slot
/// or over the address's rate.
pub const BUSY_CODE: u32 = 503;
/// QUIC application close code of a refused admission.
pub const REFUSED_CODE: u32 = 403;
/// QUIC application close code of an admission that took too long.
pub const TIMEOUT_CODE: u32 = 408;
/// QUIC application close code of a connection to a peer's previous
/// incarnation.
pub const RESTARTED_CODE: u32 = 410;
/// QUIC application close code of a connection whose admission ended (its
/// key left the keyring).
pub const ENDED_CODE: u32 = 401;
/// After closing a restarted peer's old connections, wait this long before
/// letting the new process in, so iroh-gossip has dropped the old
/// neighbour before the new one's join arrives.
pub const STALE_CLOSE_GRACE: Duration = Duration::from_millis(200);

/// Length of the client's hello: range, nonce, incarnation.
pub const HELLO_LEN: usize = 2 + 32 + 8;
/// Length of the server's challenge: status, range, nonce, incarnation.
pub const CHALLENGE_LEN: usize = 1 + 2 + 32 + 8;
/// Length of the client's proof: key id, HMAC.
pub const PROOF_LEN: usize = KEY_ID_LEN + 32;
/// Challenge status: go on.
const STATUS_GO_ON: u8 = 0;
/// Challenge status: no version in common.
const STATUS_NO_VERSION: u8 = 1;
/// Verdicts.
const VERDICT_ADMITTED: u8 = 1;
const VERDICT_BAD_PROOF: u8 = 0;
const VERDICT_UNKNOWN_KEY: u8 = 2;

/// Why an admission did not happen; each has a counter in `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The proof did not verify (another key, or an attacker).
    BadProof,
    /// The proof named a key id not in the ring.
    UnknownKey,
    /// No protocol version in common.
    Version,
    /// Bytes that are no admission message.
    Malformed,
    /// No slot free.
    Busy,
    /// The source address is over its rate or its exchanges at once.
    RateLimited,
    /// The client did not finish in time.
    Timeout,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::BadProof,
        Refusal::UnknownKey,
        Refusal::Version,
        Refusal::Malformed,
        Refusal::Busy,
        Refusal::RateLimited,
        Refusal::Timeout,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::BadProof => "bad_proof",
            Refusal::UnknownKey => "unknown_key",
            Refusal::Version => "version",
            Refusal::Malformed => "malformed",
            Refusal::Busy => "busy",
            Refusal::RateLimited => "rate_limited",
            Refusal::Timeout => "timeout",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Who is admitted, shared by the hooks, the handlers and the gossip loop.
#[derive(Debug)]
pub struct AuthState {
    ring: Arc<ArcSwap<Ring>>,
    versions: Versions,
    /// This node's incarnation, told to every peer at admission.
    incarnation: u64,
    /// Set once the endpoint exists (the hooks are built before it), and
    /// cleared at stop: the endpoint holds the hooks, which hold this.
    endpoint: Mutex<Option<Endpoint>>,
    bootstrap: HashSet<EndpointId>,
    admitted: Mutex<HashMap<EndpointId, Admitted>>,
    /// Peers admitted at some point (they may take reserved slots).
    known: Mutex<HashSet<EndpointId>>,
    stats: Arc<GossipStats>,
    /// Peers whose traffic is refused at the endpoint (a simulated partition).
    blocked: Mutex<HashSet<EndpointId>>,
    /// Peers not to dial before the instant (and the last I/O delay).
    backoff: Mutex<HashMap<EndpointId, (Instant, Duration)>>,
    /// Every gated connection, so a block, a restart or an ended admission
    /// can close it.
    conns: Mutex<Vec<(EndpointId, WeakConnectionHandle)>>,
    general: Arc<tokio::sync::Semaphore>,
    reserved: Arc<tokio::sync::Semaphore>,
    outbound: Arc<tokio::sync::Semaphore>,
    addrs: Mutex<AddrLimiter>,
    handshakes: Mutex<AddrLimiter>,
    refusal_log: Mutex<LogLimiter>,
}

/// One admitted peer.
#[derive(Clone, Debug)]
pub struct Admitted {
    pub since: Instant,
    pub addr: Option<SocketAddr>,
    /// The incarnation it proved at this admission.
    pub incarnation: u64,
    /// The key the proofs were made with.
    pub key_id: KeyId,
    /// The protocol version both use (the highest they share).
    pub version: u8,
}

impl AuthState {
    pub fn new(
        ring: Arc<ArcSwap<Ring>>,
        versions: Versions,
        incarnation: u64,
        bootstrap: HashSet<EndpointId>,
        stats: Arc<GossipStats>,
    ) -> AuthState {
        AuthState {
            ring,
            versions,
            incarnation,
            endpoint: Mutex::new(None),
            bootstrap,
            admitted: Mutex::new(HashMap::new()),
            known: Mutex::new(HashSet::new()),
            stats,
            blocked: Mutex::new(HashSet::new()),
            backoff: Mutex::new(HashMap::new()),
            conns: Mutex::new(Vec::new()),
            general: Arc::new(tokio::sync::Semaphore::new(
                MAX_ADMISSIONS - RESERVED_ADMISSIONS,
            )),
            reserved: Arc::new(tokio::sync::Semaphore::new(RESERVED_ADMISSIONS)),
            outbound: Arc::new(tokio::sync::Semaphore::new(MAX_OUTBOUND_ADMISSIONS)),
            addrs: Mutex::new(AddrLimiter::new(
                ADMISSION_RATE_PER_ADDR,
                ADMISSION_BURST_PER_ADDR,
                MAX_ADMISSIONS_PER_ADDR,
            )),
            handshakes: Mutex::new(AddrLimiter::new(
                HANDSHAKE_RATE_PER_ADDR,
                HANDSHAKE_BURST_PER_ADDR,
                usize::MAX,
            )),
            refusal_log: Mutex::new(LogLimiter::new(Instant::now())),
        }
    }

    /// Sets (or, at stop, clears) the endpoint used to dial peers.
    pub fn set_endpoint(&self, endpoint: Option<Endpoint>) {
        *self.endpoint.lock().expect("auth lock") = endpoint;
    }

    fn endpoint(&self) -> Option<Endpoint> {
        self.endpoint.lock().expect("auth lock").clone()
    }

    pub fn versions(&self) -> Versions {
        self.versions
    }

    pub fn is_blocked(&self, id: &EndpointId) -> bool {
        self.blocked.lock().expect("auth lock").contains(id)
    }

    /// Refuses (or allows again) every connection with `peers`, closing
    /// the open ones.
    pub fn block(&self, peers: &[EndpointId], blocked: bool) {
        let mut set = self.blocked.lock().expect("auth lock");
        for p in peers {
            if blocked {
                set.insert(*p);
            } else {
                set.remove(p);
            }
        }
        drop(set);
        if blocked {
            for p in peers {
                self.close_all(p, REFUSED_CODE, b"blocked");
            }
        }
    }

    fn track(&self, conn: &Connection) {
        let mut conns = self.conns.lock().expect("auth lock");
        conns.retain(|(_, weak)| weak.upgrade().is_some());
        conns.push((conn.remote_id(), conn.weak_handle()));
    }

    pub fn is_admitted(&self, id: &EndpointId) -> bool {
        self.admitted.lock().expect("auth lock").contains_key(id)
    }

    /// Every admitted peer.
    pub fn admitted(&self) -> HashMap<EndpointId, Admitted> {
        self.admitted.lock().expect("auth lock").clone()
    }

    /// The protocol version used with `id`, when admitted.
    pub fn version_with(&self, id: &EndpointId) -> Option<u8> {
        self.admitted
            .lock()
            .expect("auth lock")
            .get(id)
            .map(|a| a.version)
    }

    /// A bootstrap peer or one admitted before: may take reserved slots and
    /// is not rate-limited by address.
    fn is_known(&self, id: &EndpointId) -> bool {
        self.bootstrap.contains(id) || self.known.lock().expect("auth lock").contains(id)
    }

    /// Admits `id`; true when it was admitted before with another
    /// incarnation, and its old connections were closed.
    fn admit(&self, id: EndpointId, addr: Option<SocketAddr>, a: Admitted) -> bool {
        let incarnation = a.incarnation;
        let (key_id, version) = (a.key_id, a.version);
        self.backoff.lock().expect("auth lock").remove(&id);
        {
            let mut known = self.known.lock().expect("auth lock");
            if known.len() < MAX_KNOWN_PEERS {
                known.insert(id);
            }
        }
        let previous = self
            .admitted
            .lock()
            .expect("auth lock")
            .insert(id, Admitted { addr, ..a });
        self.stats.auth_ok.fetch_add(1, Ordering::Relaxed);
        let what = if self.bootstrap.contains(&id) {
            "bootstrap peer"
        } else {
            "peer"
        };
        let at = addr.map(|a| format!(" at {a}")).unwrap_or_default();
        match previous {
            None => {
                log::info!(
                    "Authenticated with {what} {id}{at} (key {key_id}, protocol version {version})"
                );
                false
            }
            Some(p) if p.incarnation != incarnation => {
                let n = self.close_all(&id, RESTARTED_CODE, b"restarted");
                log::info!(
                    "Authenticated with {what} {id}{at} again (key {key_id}, protocol version {version}): \
                     it restarted; closed {n} connections to its previous incarnation"
                );
                true
            }
            Some(p) => {
                if p.key_id != key_id {
                    log::info!("Authenticated with {what} {id}{at} again, now with key {key_id}");
                }
                false
            }
        }
    }

    /// Ends the admission of `id` (it leaves the admitted set and its
    /// connections are closed); false when it was not admitted.
    pub fn end(&self, id: &EndpointId, why: &str) -> bool {
        let Some(_) = self.admitted.lock().expect("auth lock").remove(id) else {
            return false;
        };
        self.stats.admissions_ended.fetch_add(1, Ordering::Relaxed);
        let n = self.close_all(id, ENDED_CODE, b"admission ended");
        log::info!("Admission of peer {id} ended: {why}; closed {n} connections");
        true
    }

    /// Ends the admission of `id` when it was proven by an incarnation
    /// older than `incarnation` (its messages say it restarted).
    pub fn end_if_older(&self, id: &EndpointId, incarnation: u64) -> bool {
        let older = self
            .admitted
            .lock()
            .expect("auth lock")
            .get(id)
            .is_some_and(|a| a.incarnation < incarnation);
        older && self.end(id, "it restarted (a new incarnation)")
    }

    /// Installs a new ring: admissions proven with a key no longer in it
    /// end (returned, to be admitted again with the primary key), and every
    /// back-off is forgotten (peers refused for their key may hold the new
    /// one now).
    pub fn set_ring(&self, ring: Ring) -> Vec<EndpointId> {
        let stale: Vec<(EndpointId, KeyId)> = self
            .admitted
            .lock()
            .expect("auth lock")
            .iter()
            .filter(|(_, a)| !ring.contains(a.key_id))
            .map(|(id, a)| (*id, a.key_id))
            .collect();
        self.ring.store(Arc::new(ring));
        self.backoff.lock().expect("auth lock").clear();
        stale
            .into_iter()
            .filter(|(id, key)| {
                self.end(
                    id,
                    &format!("its key {key} was removed from the keyring; admitting it again"),
                )
            })
            .map(|(id, _)| id)
            .collect()
    }

    /// Closes every tracked connection with `id`; returns how many.
    fn close_all(&self, id: &EndpointId, code: u32, reason: &[u8]) -> usize {
        let mut n = 0;
        let mut conns = self.conns.lock().expect("auth lock");
        conns.retain(|(peer, weak)| {
            let Some(conn) = weak.upgrade() else {
                return false;
            };
            if peer == id {
                conn.close(code.into(), reason);
                n += 1;
                return false;
            }
            true
        });
        n
    }

    /// Counts a refusal, and logs it unless refusals come too fast.
    fn refused(&self, reason: Refusal, id: &EndpointId, why: &str) {
        self.stats.admission_refusals[reason.index()].fetch_add(1, Ordering::Relaxed);
        if matches!(
            reason,
            Refusal::BadProof | Refusal::UnknownKey | Refusal::Version
        ) {
            self.stats.auth_refused.fetch_add(1, Ordering::Relaxed);
        }
        let what = if self.bootstrap.contains(id) {
            "bootstrap peer"
        } else {
            "peer"
        };
        let allowed = self
            .refusal_log
            .lock()
            .expect("auth lock")
            .allow(Instant::now());
        match allowed {
            Some(0) => log::warn!("Refused {what} {id}: {why}"),
            Some(n) => log::warn!(
                "Refused {what} {id}: {why} ({n} more refusals not logged, see glued_gossip_admission_refusals_total)"
            ),
            None => log::debug!("Refused {what} {id}: {why}"),
        }
    }

    /// Remembers that `id` is not to be dialed for a while.
    fn back_off(&self, id: EndpointId, refused: bool) {
        let now = Instant::now();
        let mut map = self.backoff.lock().expect("auth lock");
        if map.len() >= MAX_REFUSED && !map.contains_key(&id) {
            map.retain(|_, (until, _)| *until > now);
        }
        // Full of current back-offs: this one is not remembered (only our
        // own re-dials of it lose their back-off).
        if map.len() >= MAX_REFUSED && !map.contains_key(&id) {
            return;
        }
        let delay = if refused {
            REFUSED_BACKOFF
        } else {
            match map.get(&id) {
                Some((_, d)) if *d < REFUSED_BACKOFF => (*d * 2).min(IO_BACKOFF_MAX),
                _ => IO_BACKOFF_MIN,
            }
        };
        map.insert(id, (now + delay, delay));
    }

    /// Runs the client side against `addr`, admitting it on success.
    pub async fn authenticate(&self, addr: EndpointAddr) -> Result<(), String> {
        let id = addr.id;
        let Some(endpoint) = self.endpoint() else {
            return Err("endpoint not ready".into());
        };
        if self
            .backoff
            .lock()
            .expect("auth lock")
            .get(&id)
            .is_some_and(|(until, _)| Instant::now() < *until)
        {
            return Err("failed recently; backing off".into());
        }
        let Ok(Ok(_permit)) =
            tokio::time::timeout(AUTH_TIMEOUT, self.outbound.clone().acquire_owned()).await
        else {
            return Err("too many admissions running".into());
        };
        match tokio::time::timeout(AUTH_TIMEOUT, self.client(&endpoint, addr)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Failure::Refused(reason, why))) => {
                self.back_off(id, true);
                self.refused(reason, &id, &why);
                Err(why)
            }
            Ok(Err(Failure::Io(why))) => {
                self.back_off(id, false);
                log::debug!("admission with {id} failed: {why}");
                Err(why)
            }
            Err(_) => {
                self.back_off(id, false);
                log::debug!("admission with {id} timed out");
                Err("timed out".into())
            }
        }
    }

    async fn client(&self, endpoint: &Endpoint, addr: EndpointAddr) -> Result<(), Failure> {
        let conn = endpoint.connect(addr, AUTH_ALPN).await.map_err(io)?;
        let result = self.client_exchange(endpoint.id(), &conn).await;
        match &result {
            Ok(()) => conn.close(0u32.into(), b"done"),
            Err(_) => conn.close(REFUSED_CODE.into(), b"refused"),
        }
        result
    }

    async fn client_exchange(&self, me: EndpointId, conn: &Connection) -> Result<(), Failure> {
        let peer = conn.remote_id();
        let (mut send, mut recv) = conn.open_bi().await.map_err(io)?;
        let cn = nonce();
        send.write_all(&hello(self.versions, &cn, self.incarnation))
            .await
            .map_err(io)?;
        let mut challenge = [0u8; CHALLENGE_LEN];
        recv.read_exact(&mut challenge).await.map_err(io)?;
        let theirs = Versions {
            min: challenge[1],
            max: challenge[2],
        };
        let Some(version) = self.versions.highest_shared(theirs) else {
            return Err(version_refusal(theirs, self.versions));
        };
        if challenge[0] != STATUS_GO_ON {
            return Err(version_refusal(theirs, self.versions));
        }
        let t = Transcript {
            client_versions: self.versions,
            server_versions: theirs,
            cn,
            sn: challenge[3..35].try_into().expect("32"),
            client: me,
            server: peer,
            client_incarnation: self.incarnation,
            server_incarnation: u64::from_be_bytes(challenge[35..43].try_into().expect("8")),
        };
        let ring = self.ring.load_full();
        let (key_id, keys) = ring.primary();
        let mut proof = [0u8; PROOF_LEN];
        proof[..KEY_ID_LEN].copy_from_slice(&key_id.0);
        proof[KEY_ID_LEN..].copy_from_slice(&t.proof(&keys.auth, CLIENT_ROLE));
        send.write_all(&proof).await.map_err(io)?;
        let mut verdict = [0u8; 1];
        recv.read_exact(&mut verdict).await.map_err(io)?;
        match verdict[0] {
            VERDICT_ADMITTED => {}
            VERDICT_UNKNOWN_KEY => {
                return Err(Failure::Refused(
                    Refusal::UnknownKey,
                    format!("it does not hold our primary key {key_id}"),
                ));
            }
            _ => {
                return Err(Failure::Refused(
                    Refusal::BadProof,
                    format!("it refused our proof with key {key_id}"),
                ));
            }
        }
        let mut theirs_proof = [0u8; 32];
        recv.read_exact(&mut theirs_proof).await.map_err(io)?;
        let _ = send.finish();
        if !constant_eq(&t.proof(&keys.auth, SERVER_ROLE), &theirs_proof) {
            return Err(Failure::Refused(
                Refusal::BadProof,
                format!("its proof with key {key_id} is wrong"),
            ));
        }
        let admitted = Admitted {
            since: Instant::now(),
            addr: None,
            incarnation: t.server_incarnation,
            key_id,
            version,
        };
        if self.admit(peer, selected_addr(conn), admitted) {
            tokio::time::sleep(STALE_CLOSE_GRACE).await;
        }
        Ok(())
    }

    async fn server(&self, conn: &Connection) -> Result<(), Failure> {
        let Some(endpoint) = self.endpoint() else {
            return Err(Failure::Io("endpoint not ready".into()));
        };
        let me = endpoint.id();
        let peer = conn.remote_id();
        let mut hello = [0u8; HELLO_LEN];
        let first = async {
            let (send, mut recv) = conn.accept_bi().await.map_err(io)?;
            recv.read_exact(&mut hello).await.map_err(io)?;
            Ok::<_, Failure>((send, recv))
        };
        let (mut send, mut recv) = match tokio::time::timeout(FIRST_BYTE_DEADLINE, first).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(Failure::Refused(
                    Refusal::Timeout,
                    format!("no hello within {FIRST_BYTE_DEADLINE:?}"),
                ));
            }
        };
        let theirs = Versions {
            min: hello[0],
            max: hello[1],
        };
        if theirs.min > theirs.max || theirs.max == 0 {
            return Err(Failure::Refused(
                Refusal::Malformed,
                "it sent no admission hello".into(),
            ));
        }
        let t = Transcript {
            client_versions: theirs,
            server_versions: self.versions,
            cn: hello[2..34].try_into().expect("32"),
            sn: nonce(),
            client: peer,
            server: me,
            client_incarnation: u64::from_be_bytes(hello[34..42].try_into().expect("8")),
            server_incarnation: self.incarnation,
        };
        let version = self.versions.highest_shared(theirs);
        let mut challenge = [0u8; CHALLENGE_LEN];
        challenge[0] = if version.is_some() {
            STATUS_GO_ON
        } else {
            STATUS_NO_VERSION
        };
        challenge[1] = self.versions.min;
        challenge[2] = self.versions.max;
        challenge[3..35].copy_from_slice(&t.sn);
        challenge[35..43].copy_from_slice(&self.incarnation.to_be_bytes());
        send.write_all(&challenge).await.map_err(io)?;
        let Some(version) = version else {
            let _ = send.finish();
            // Let the client read why before the connection closes.
            let _ = tokio::time::timeout(FIRST_BYTE_DEADLINE, conn.closed()).await;
            return Err(version_refusal(theirs, self.versions));
        };
        let mut proof = [0u8; PROOF_LEN];
        recv.read_exact(&mut proof).await.map_err(io)?;
        let key_id = KeyId(proof[..KEY_ID_LEN].try_into().expect("4"));
        let ring = self.ring.load_full();
        let Some(keys) = ring.get(key_id) else {
            let _ = send.write_all(&[VERDICT_UNKNOWN_KEY]).await;
            let _ = send.finish();
            // Let the client read the verdict before the connection closes.
            let _ = tokio::time::timeout(FIRST_BYTE_DEADLINE, conn.closed()).await;
            return Err(Failure::Refused(
                Refusal::UnknownKey,
                format!("it proved key {key_id}, which is not in this node's keyring"),
            ));
        };
        if !constant_eq(&t.proof(&keys.auth, CLIENT_ROLE), &proof[KEY_ID_LEN..]) {
            let _ = send.write_all(&[VERDICT_BAD_PROOF]).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(FIRST_BYTE_DEADLINE, conn.closed()).await;
            return Err(Failure::Refused(
                Refusal::BadProof,
                format!("its proof for key {key_id} is wrong (it does not hold the key)"),
            ));
        }
        let admitted = Admitted {
            since: Instant::now(),
            addr: None,
            incarnation: t.client_incarnation,
            key_id,
            version,
        };
        if self.admit(peer, selected_addr(conn), admitted) {
            // Let iroh-gossip drop the old neighbour before the new
            // process, once admitted, dials and joins.
            tokio::time::sleep(STALE_CLOSE_GRACE).await;
        }
        let mut verdict = [0u8; 33];
        verdict[0] = VERDICT_ADMITTED;
        verdict[1..].copy_from_slice(&t.proof(&keys.auth, SERVER_ROLE));
        send.write_all(&verdict).await.map_err(io)?;
        let _ = send.finish();
        // Wait for the client to read the verdict and close.
        let _ = tokio::time::timeout(AUTH_TIMEOUT, conn.closed()).await;
        Ok(())
    }

    /// The filter of incoming QUIC connections, before their TLS handshake:
    /// an address that is no admitted peer's may start at most
    /// [`HANDSHAKE_RATE_PER_ADDR`] a second; more are ignored (and counted).
    pub fn filter_incoming(&self, incoming: &Incoming) -> IncomingFilterOutcome {
        let IncomingAddr::Ip(sa) = incoming.remote_addr() else {
            return IncomingFilterOutcome::Accept;
        };
        let admitted = self
            .admitted
            .lock()
            .expect("auth lock")
            .values()
            .any(|a| a.addr == Some(sa));
        if admitted
            || self
                .handshakes
                .lock()
                .expect("auth lock")
                .try_take(addr_key(sa.ip()), Instant::now())
        {
            return IncomingFilterOutcome::Accept;
        }
        self.stats.admission_refusals[Refusal::RateLimited.index()].fetch_add(1, Ordering::Relaxed);
        IncomingFilterOutcome::Ignore
    }

    /// Takes a slot for an admission from `id` at `ip`, or says why not.
    fn slot(self: &Arc<Self>, id: &EndpointId, ip: Option<IpAddr>) -> Result<Slot, Refusal> {
        let known = self.is_known(id);
        let addr = match ip {
            Some(ip) if !known => {
                let key = addr_key(ip);
                if !self
                    .addrs
                    .lock()
                    .expect("auth lock")
                    .try_start(key, Instant::now())
                {
                    return Err(Refusal::RateLimited);
                }
                Some(key)
            }
            _ => None,
        };
        let permit = match self.general.clone().try_acquire_owned() {
            Ok(p) => Ok(p),
            Err(_) if known => self.reserved.clone().try_acquire_owned(),
            Err(e) => Err(e),
        };
        match permit {
            Ok(p) => {
                self.stats
                    .admissions_in_progress
                    .fetch_add(1, Ordering::Relaxed);
                Ok(Slot {
                    state: self.clone(),
                    addr,
                    permit: Some(p),
                })
            }
            Err(_) => {
                // Give the address its exchange back.
                drop(Slot {
                    state: self.clone(),
                    addr,
                    permit: None,
                });
                Err(Refusal::Busy)
            }
        }
    }
}

/// One served admission: its slot, its address's count, the gauge.
struct Slot {
    state: Arc<AuthState>,
    addr: Option<IpAddr>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(addr) = self.addr {
            self.state.addrs.lock().expect("auth lock").finish(addr);
        }
        if self.permit.take().is_some() {
            self.state
                .stats
                .admissions_in_progress
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The client's hello.
pub fn hello(versions: Versions, cn: &[u8; 32], incarnation: u64) -> [u8; HELLO_LEN] {
    let mut out = [0u8; HELLO_LEN];
    out[0] = versions.min;
    out[1] = versions.max;
    out[2..34].copy_from_slice(cn);
    out[34..].copy_from_slice(&incarnation.to_be_bytes());
    out
}

fn version_refusal(theirs: Versions, ours: Versions) -> Failure {
    Failure::Refused(
        Refusal::Version,
        format!(
            "no protocol version in common: it speaks version {theirs}, this node speaks {ours}"
        ),
    )
}

const CLIENT_ROLE: &[u8] = b"glued/auth/client";
const SERVER_ROLE: &[u8] = b"glued/auth/server";

/// What both proofs of one exchange are bound to.
struct Transcript {
    client_versions: Versions,
    server_versions: Versions,
    cn: [u8; 32],
    sn: [u8; 32],
    client: EndpointId,
    server: EndpointId,
    client_incarnation: u64,
    server_incarnation: u64,
}

impl Transcript {
    fn proof(&self, key: &[u8], role: &[u8]) -> [u8; 32] {
        hmac(
            key,
            &[
                role,
                &[
                    self.client_versions.min,
                    self.client_versions.max,
                    self.server_versions.min,
                    self.server_versions.max,
                ],
                &self.cn,
                &self.sn,
                self.client.as_bytes(),
                self.server.as_bytes(),
                &self.client_incarnation.to_be_bytes(),
                &self.server_incarnation.to_be_bytes(),
            ],
        )
    }
}

enum Failure {
    Refused(Refusal, String),
    Io(String),
}

fn io(e: impl std::fmt::Display) -> Failure {
    Failure::Io(e.to_string())
}

/// 32 unpredictable bytes from the OS random source.
fn nonce() -> [u8; 32] {
    SecretKey::generate().to_bytes()
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The unit of the per-address limit: an IPv4 address, or an IPv6 /64.
fn addr_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::from(o)
        }
    }
}

/// Token buckets and exchanges at once per source address (pure: time is
/// passed in).
#[derive(Debug)]
struct AddrLimiter {
    map: HashMap<IpAddr, AddrState>,
    rate: f64,
    burst: f64,
    max_active: usize,
}

#[derive(Debug)]
struct AddrState {
    tokens: f64,
    last: Instant,
    active: usize,
}

impl AddrLimiter {
    fn new(rate: f64, burst: f64, max_active: usize) -> AddrLimiter {
        AddrLimiter {
            map: HashMap::new(),
            rate,
            burst,
            max_active,
        }
    }

    /// Takes a token only (nothing to finish).
    fn try_take(&mut self, addr: IpAddr, now: Instant) -> bool {
        let ok = self.try_start(addr, now);
        if ok {
            self.finish(addr);
        }
        ok
    }

    /// Takes a token and an exchange for `addr`; false when over its rate,
    /// its exchanges at once, or when the table is full.
    fn try_start(&mut self, addr: IpAddr, now: Instant) -> bool {
        let (rate, burst) = (self.rate, self.burst);
        if !self.map.contains_key(&addr) && self.map.len() >= MAX_TRACKED_ADDRS {
            self.map.retain(|_, s| {
                s.active > 0
                    || now.saturating_duration_since(s.last).as_secs_f64() * rate + s.tokens < burst
            });
            if self.map.len() >= MAX_TRACKED_ADDRS {
                return false;
            }
        }
        let s = self.map.entry(addr).or_insert(AddrState {
            tokens: burst,
            last: now,
            active: 0,
        });
        let elapsed = now.saturating_duration_since(s.last).as_secs_f64();
        s.tokens = (s.tokens + elapsed * rate).min(burst);
        s.last = now;
        if s.tokens < 1.0 || s.active >= self.max_active {
            return false;
        }
        s.tokens -= 1.0;
        s.active += 1;
        true
    }

    fn finish(&mut self, addr: IpAddr) {
        if let Some(s) = self.map.get_mut(&addr) {
            s.active = s.active.saturating_sub(1);
        }
    }
}

/// A token bucket of log lines; counts the lines it leaves out.
#[derive(Debug)]
struct LogLimiter {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

impl LogLimiter {
    fn new(now: Instant) -> LogLimiter {
        LogLimiter {
            tokens: REFUSAL_LOG_BURST,
            last: now,
            suppressed: 0,
        }
    }

    /// `Some(n)`: log this line, `n` were left out since the last one.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * REFUSAL_LOG_PER_SEC).min(REFUSAL_LOG_BURST);
        self.last = now;
        if self.tokens < 1.0 {
            self.suppressed += 1;
            return None;
        }
        self.tokens -= 1.0;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The IP address a connection currently uses, if any.
pub fn selected_addr(conn: &Connection) -> Option<SocketAddr> {
    let paths = conn.paths();
    let mut best = None;
    for p in paths.iter() {
        if let TransportAddr::Ip(sa) = p.remote_addr() {
            if p.is_selected() {
                return Some(*sa);
            }
            best = Some(*sa);
        }
    }
    best
}

/// Server side of the admission ALPN.
#[derive(Debug, Clone)]
pub struct AuthHandler(pub Arc<AuthState>);

impl ProtocolHandler for AuthHandler {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let peer = conn.remote_id();
        let ip = selected_addr(&conn).map(|a| a.ip());
        let _slot = match self.0.slot(&peer, ip) {
            Ok(s) => s,
            Err(reason) => {
                self.0.refused(
                    reason,
                    &peer,
                    &format!(
                        "admission not served ({}{})",
                        reason.label(),
                        ip.map(|ip| format!(", from {ip}")).unwrap_or_default()
                    ),
                );
                conn.close(BUSY_CODE.into(), b"busy");
                return Ok(());
            }
        };
        match tokio::time::timeout(AUTH_TIMEOUT, self.0.server(&conn)).await {
            Ok(Ok(())) => {}
            Ok(Err(Failure::Refused(reason, why))) => {
                self.0.back_off(peer, true);
                self.0.refused(reason, &peer, &why);
                let code = if reason == Refusal::Timeout {
                    TIMEOUT_CODE
                } else {
                    REFUSED_CODE
                };
                conn.close(code.into(), b"refused");
            }
            Ok(Err(Failure::Io(why))) => log::debug!("admission from {peer} failed: {why}"),
            Err(_) => {
                self.0.refused(
                    Refusal::Timeout,
                    &peer,
                    &format!("admission not finished within {AUTH_TIMEOUT:?}"),
                );
                conn.close(TIMEOUT_CODE.into(), b"too slow");
            }
        }
        Ok(())
    }
}

/// Endpoint hooks that gate the gossip and state ALPNs on admission.
#[derive(Debug)]
pub struct Hooks {
    pub state: Arc<AuthState>,
    pub gossip_alpn: &'static [u8],
}

impl Hooks {
    fn gated(&self, alpn: &[u8]) -> bool {
        alpn == self.gossip_alpn || alpn == STATE_ALPN || alpn == CORE_ALPN
    }
}

impl EndpointHooks for Hooks {
    async fn before_connect<'a>(
        &'a self,
        remote_addr: &'a EndpointAddr,
        alpn: &'a [u8],
    ) -> BeforeConnectOutcome {
        if self.state.is_blocked(&remote_addr.id) {
            return BeforeConnectOutcome::Reject;
        }
        if !self.gated(alpn) || self.state.is_admitted(&remote_addr.id) {
            return BeforeConnectOutcome::Accept;
        }
        match self.state.authenticate(remote_addr.clone()).await {
            Ok(()) => BeforeConnectOutcome::Accept,
            Err(_) => BeforeConnectOutcome::Reject,
        }
    }

    async fn after_handshake<'a>(&'a self, conn: &'a Connection) -> AfterHandshakeOutcome {
        let id = conn.remote_id();
        if self.state.is_blocked(&id) {
            return AfterHandshakeOutcome::Reject {
                error_code: REFUSED_CODE.into(),
                reason: b"blocked".to_vec(),
            };
        }
        if !self.gated(conn.alpn()) {
            return AfterHandshakeOutcome::Accept;
        }
        self.state.track(conn);
        if self.state.is_admitted(&id) {
            return AfterHandshakeOutcome::Accept;
        }
        // An incoming connection from a peer that admitted us before we
        // (re)started, or before its admission here ended: prove ourselves
        // again, and check it, by dialing back. Unknown peers pay their
        // address's rate, like a dial-in on the admission ALPN.
        let ip = selected_addr(conn).map(|a| a.ip());
        let slot = self.state.slot(&id, ip);
        let Ok(_slot) = slot else {
            return AfterHandshakeOutcome::Reject {
                error_code: BUSY_CODE.into(),
                reason: b"busy".to_vec(),
            };
        };
        match self.state.authenticate(EndpointAddr::new(id)).await {
            Ok(()) => AfterHandshakeOutcome::Accept,
            Err(_) => AfterHandshakeOutcome::Reject {
                error_code: REFUSED_CODE.into(),
                reason: b"not admitted".to_vec(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> AuthState {
        AuthState::new(
            Arc::new(ArcSwap::from_pointee(Ring::for_tests("s"))),
            Versions::speaking(super::super::wire::PROTOCOL_VERSION),
            1,
            HashSet::new(),
            Arc::new(GossipStats::default()),
        )
    }

    #[test]
    fn back_offs_of_ever_new_peers_stay_bounded() {
        // Any host can make a fresh key per attempt and fail admission:
        // the memory of refusals must not grow with them.
        let state = state();
        for i in 0..MAX_REFUSED * 3 {
            state.back_off(SecretKey::generate().public(), i % 2 == 0);
        }
        let n = state.backoff.lock().unwrap().len();
        assert!(n <= MAX_REFUSED, "{n} back-offs remembered");
    }

    #[test]
    fn io_failures_back_off_doubling_up_to_the_cap() {
        let state = state();
        let id = SecretKey::generate().public();
        let mut delays = Vec::new();
        for _ in 0..8 {
            state.back_off(id, false);
            delays.push(state.backoff.lock().unwrap()[&id].1);
        }
        assert_eq!(delays[0], IO_BACKOFF_MIN);
        assert_eq!(delays[1], IO_BACKOFF_MIN * 2);
        assert_eq!(*delays.last().unwrap(), IO_BACKOFF_MAX);
    }

    #[test]
    fn one_address_gets_its_burst_then_its_rate_and_few_at_once() {
        let t0 = Instant::now();
        let mut l = AddrLimiter::new(
            ADMISSION_RATE_PER_ADDR,
            ADMISSION_BURST_PER_ADDR,
            MAX_ADMISSIONS_PER_ADDR,
        );
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let mut started = 0;
        for _ in 0..100 {
            if l.try_start(a, t0) {
                started += 1;
            }
        }
        assert_eq!(started, MAX_ADMISSIONS_PER_ADDR, "capped at once");
        for _ in 0..started {
            l.finish(a);
        }
        let mut more = 0;
        for _ in 0..100 {
            if l.try_start(a, t0) {
                more += 1;
                l.finish(a);
            }
        }
        assert_eq!(
            started + more,
            ADMISSION_BURST_PER_ADDR as usize,
            "burst spent"
        );
        let later = t0 + Duration::from_secs(1);
        let mut refill = 0;
        for _ in 0..100 {
            if l.try_start(a, later) {
                refill += 1;
                l.finish(a);
            }
        }
        assert_eq!(refill, ADMISSION_RATE_PER_ADDR as usize);
        // Another address is not affected; an IPv6 /64 is one address.
        assert!(l.try_start("192.0.2.2".parse().unwrap(), later));
        assert_eq!(
            addr_key("2001:db8::1".parse().unwrap()),
            addr_key("2001:db8::ffff:1".parse().unwrap())
        );
    }

    #[test]
    fn the_address_table_stays_bounded() {
        let t0 = Instant::now();
        let mut l = AddrLimiter::new(
            ADMISSION_RATE_PER_ADDR,
            ADMISSION_BURST_PER_ADDR,
            MAX_ADMISSIONS_PER_ADDR,
        );
        for i in 0..(MAX_TRACKED_ADDRS as u32 * 2) {
            let ip = IpAddr::from((0x0a00_0000u32 + i).to_be_bytes());
            if l.try_start(ip, t0) {
                l.finish(ip);
            }
        }
        assert!(l.map.len() <= MAX_TRACKED_ADDRS);
    }

    #[test]
    fn refusal_lines_are_rate_limited_and_say_how_many_were_left_out() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(t0);
        let logged = (0..1000).filter(|_| l.allow(t0).is_some()).count();
        assert_eq!(logged, REFUSAL_LOG_BURST as usize);
        assert_eq!(
            l.allow(t0 + Duration::from_secs(1)),
            Some(1000 - logged as u64)
        );
    }

    #[test]
    fn proofs_bind_the_key_the_roles_and_both_version_ranges() {
        let t = Transcript {
            client_versions: Versions::speaking(3),
            server_versions: Versions::speaking(3),
            cn: [1; 32],
            sn: [2; 32],
            client: SecretKey::from_bytes(&[3; 32]).public(),
            server: SecretKey::from_bytes(&[4; 32]).public(),
            client_incarnation: 5,
            server_incarnation: 6,
        };
        let k = Ring::for_tests("a");
        let other = Ring::for_tests("b");
        let p = t.proof(&k.primary().1.auth, CLIENT_ROLE);
        assert_ne!(p, t.proof(&k.primary().1.auth, SERVER_ROLE));
        assert_ne!(p, t.proof(&other.primary().1.auth, CLIENT_ROLE));
        let downgraded = Transcript {
            server_versions: Versions::speaking(2),
            ..t
        };
        assert_ne!(p, downgraded.proof(&k.primary().1.auth, CLIENT_ROLE));
    }
}
