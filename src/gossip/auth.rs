//! Admission: a mutual challenge–response on Glued's own ALPN.
//!
//! Before any gossip or state connection to or from a peer, both sides prove
//! that they know the cluster secret:
//!
//! ```text
//! client → server: version (1) ‖ client nonce (32) ‖ client incarnation (8, BE)
//! server → client: server nonce (32) ‖ server incarnation (8) ‖ HMAC(k_auth, "server" ‖ bound)
//! client → server: HMAC(k_auth, "client" ‖ bound)
//! server → client: 1 (admitted) or 0 (refused)
//!   where bound = cn ‖ sn ‖ client id ‖ server id ‖ client inc ‖ server inc
//! ```
//!
//! The endpoint ids are those proven by the QUIC/TLS handshake, so a proof
//! cannot be replayed to or reflected at another node.
//!
//! A peer admitted again with a new incarnation restarted: its old process
//! is gone (maybe without a goodbye, `kill -9`), but our QUIC connections to
//! it live on until they idle out, and iroh-gossip keeps it in its active
//! view over them, so it would not answer the new process's joins. Those
//! connections are closed at once, before the new process is let in.
//!
//! Invariant: [`Hooks`] let a gossip or state connection through (either
//! direction) only when its remote is in the authenticated set; a remote
//! gets there only through a successful exchange.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iroh::endpoint::{
    AfterHandshakeOutcome, BeforeConnectOutcome, Connection, EndpointHooks, WeakConnectionHandle,
};
use iroh::protocol::{AcceptError, ProtocolHandler};
use iroh::{Endpoint, EndpointAddr, EndpointId, SecretKey, TransportAddr};

use super::GossipStats;
use super::wire::{Keys, hmac};

/// ALPN of the admission exchange.
pub const AUTH_ALPN: &[u8] = b"glued/auth/1";
/// ALPN of the direct full-state stream.
pub const STATE_ALPN: &[u8] = b"glued/state/1";
/// Version byte of the admission exchange (2: incarnations exchanged).
pub const AUTH_VERSION: u8 = 2;
/// Longest an admission exchange may take.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// A peer that failed admission is not tried again for this long (the
/// re-join loop would otherwise retry, and log, every few seconds).
pub const REFUSED_BACKOFF: Duration = Duration::from_secs(30);
/// Most refused peers remembered for [`REFUSED_BACKOFF`]: refusals come
/// from hosts that need no secret and can use a new key each time.
pub const MAX_REFUSED: usize = 1024;
/// Most admission exchanges served at once (each lasts at most
/// [`AUTH_TIMEOUT`]); anyone may open one, so more are closed at once.
pub const MAX_ADMISSIONS: usize = 32;
/// QUIC application close code of an admission refused for lack of a slot.
pub const BUSY_CODE: u32 = 503;
/// QUIC application close code of a refused admission.
pub const REFUSED_CODE: u32 = 403;
/// QUIC application close code of a connection to a peer's previous
/// incarnation.
pub const RESTARTED_CODE: u32 = 410;
/// After closing a restarted peer's old connections, wait this long before
/// letting the new process in, so iroh-gossip has dropped the old
/// neighbour before the new one's join arrives.
pub const STALE_CLOSE_GRACE: Duration = Duration::from_millis(200);

/// Who is admitted, shared by the hooks, the handlers and the gossip loop.
#[derive(Debug)]
pub struct AuthState {
    keys: Keys,
    /// This node's incarnation, told to every peer at admission.
    incarnation: u64,
    /// Set once the endpoint exists (the hooks are built before it), and
    /// cleared at stop: the endpoint holds the hooks, which hold this.
    endpoint: Mutex<Option<Endpoint>>,
    bootstrap: HashSet<EndpointId>,
    admitted: Mutex<HashMap<EndpointId, Admitted>>,
    stats: Arc<GossipStats>,
    /// Peers whose traffic is refused at the endpoint (a simulated partition).
    blocked: Mutex<HashSet<EndpointId>>,
    /// Peers that failed admission, and when.
    refused: Mutex<HashMap<EndpointId, Instant>>,
    /// Every gated connection, so a block or a restart can close it.
    conns: Mutex<Vec<(EndpointId, WeakConnectionHandle)>>,
    /// Admission exchanges started by a remote (served, or dialed back),
    /// at most [`MAX_ADMISSIONS`] at once.
    admissions: Arc<tokio::sync::Semaphore>,
}

/// One admitted peer.
#[derive(Clone, Debug)]
pub struct Admitted {
    pub since: Instant,
    pub addr: Option<SocketAddr>,
    /// The incarnation it proved at its last admission.
    pub incarnation: u64,
}

impl AuthState {
    pub fn new(
        keys: Keys,
        incarnation: u64,
        bootstrap: HashSet<EndpointId>,
        stats: Arc<GossipStats>,
    ) -> AuthState {
        AuthState {
            keys,
            incarnation,
            endpoint: Mutex::new(None),
            bootstrap,
            admitted: Mutex::new(HashMap::new()),
            stats,
            blocked: Mutex::new(HashSet::new()),
            refused: Mutex::new(HashMap::new()),
            conns: Mutex::new(Vec::new()),
            admissions: Arc::new(tokio::sync::Semaphore::new(MAX_ADMISSIONS)),
        }
    }

    /// Sets (or, at stop, clears) the endpoint used to dial peers.
    pub fn set_endpoint(&self, endpoint: Option<Endpoint>) {
        *self.endpoint.lock().expect("auth lock") = endpoint;
    }

    fn endpoint(&self) -> Option<Endpoint> {
        self.endpoint.lock().expect("auth lock").clone()
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
            let mut conns = self.conns.lock().expect("auth lock");
            conns.retain(|(id, weak)| {
                let Some(conn) = weak.upgrade() else {
                    return false;
                };
                if peers.contains(id) {
                    conn.close(REFUSED_CODE.into(), b"blocked");
                    return false;
                }
                true
            });
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

    /// Admits `id`; true when it was admitted before with another
    /// incarnation, and its old connections were closed.
    fn admit(&self, id: EndpointId, addr: Option<SocketAddr>, incarnation: u64) -> bool {
        self.refused.lock().expect("auth lock").remove(&id);
        let previous = self.admitted.lock().expect("auth lock").insert(
            id,
            Admitted {
                since: Instant::now(),
                addr,
                incarnation,
            },
        );
        self.stats.auth_ok.fetch_add(1, Ordering::Relaxed);
        match previous {
            None => {
                if self.bootstrap.contains(&id) {
                    log::info!("Authenticated with bootstrap peer {id}");
                } else {
                    log::info!("Authenticated with peer {id}");
                }
                false
            }
            Some(p) if p.incarnation != incarnation => {
                let n = self.close_all(&id, RESTARTED_CODE, b"restarted");
                log::info!(
                    "Authenticated with peer {id} again: it restarted; closed {n} connections to its previous incarnation"
                );
                true
            }
            Some(_) => false,
        }
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

    fn refuse(&self, id: EndpointId, why: &str) {
        {
            let now = Instant::now();
            let mut refused = self.refused.lock().expect("auth lock");
            if refused.len() >= MAX_REFUSED && !refused.contains_key(&id) {
                refused.retain(|_, t| now.saturating_duration_since(*t) < REFUSED_BACKOFF);
            }
            // Full of recent refusals: this one is not remembered (only our
            // own re-dials of it lose their back-off).
            if refused.len() < MAX_REFUSED || refused.contains_key(&id) {
                refused.insert(id, now);
            }
        }
        self.stats.auth_refused.fetch_add(1, Ordering::Relaxed);
        let what = if self.bootstrap.contains(&id) {
            "bootstrap peer"
        } else {
            "peer"
        };
        log::warn!("Refused {what} {id}: {why}");
    }

    fn proof(&self, role: &[u8], b: &Transcript) -> [u8; 32] {
        hmac(
            &self.keys.auth,
            &[
                role,
                &b.cn,
                &b.sn,
                b.client.as_bytes(),
                b.server.as_bytes(),
                &b.client_incarnation.to_be_bytes(),
                &b.server_incarnation.to_be_bytes(),
            ],
        )
    }

    /// Runs the client side against `addr`, admitting it on success.
    pub async fn authenticate(&self, addr: EndpointAddr) -> Result<(), String> {
        let id = addr.id;
        let Some(endpoint) = self.endpoint() else {
            return Err("endpoint not ready".into());
        };
        if self
            .refused
            .lock()
            .expect("auth lock")
            .get(&id)
            .is_some_and(|t| t.elapsed() < REFUSED_BACKOFF)
        {
            return Err("refused recently".into());
        }
        match tokio::time::timeout(AUTH_TIMEOUT, self.client(&endpoint, addr)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Failure::Refused(why))) => {
                self.refuse(id, &why);
                Err(why)
            }
            Ok(Err(Failure::Io(why))) => {
                log::debug!("admission with {id} failed: {why}");
                Err(why)
            }
            Err(_) => {
                log::debug!("admission with {id} timed out");
                Err("timed out".into())
            }
        }
    }

    async fn client(&self, endpoint: &Endpoint, addr: EndpointAddr) -> Result<(), Failure> {
        let conn = endpoint.connect(addr, AUTH_ALPN).await.map_err(io)?;
        let me = endpoint.id();
        let peer = conn.remote_id();
        let (mut send, mut recv) = conn.open_bi().await.map_err(io)?;
        let cn = nonce();
        let mut hello = [0u8; HELLO_LEN];
        hello[0] = AUTH_VERSION;
        hello[1..33].copy_from_slice(&cn);
        hello[33..].copy_from_slice(&self.incarnation.to_be_bytes());
        send.write_all(&hello).await.map_err(io)?;
        let mut reply = [0u8; REPLY_LEN];
        recv.read_exact(&mut reply).await.map_err(io)?;
        let bound = Transcript {
            cn,
            sn: reply[..32].try_into().expect("32"),
            client: me,
            server: peer,
            client_incarnation: self.incarnation,
            server_incarnation: u64::from_be_bytes(reply[32..40].try_into().expect("8")),
        };
        let expected = self.proof(b"server", &bound);
        if !constant_eq(&expected, &reply[40..]) {
            // Send a proof that cannot verify, so the server records the
            // refusal too, and wait for its verdict before closing.
            let _ = send.write_all(&[0u8; 32]).await;
            let mut verdict = [0u8; 1];
            let _ = recv.read_exact(&mut verdict).await;
            conn.close(REFUSED_CODE.into(), b"bad proof");
            return Err(Failure::Refused(
                "it does not know the cluster secret".into(),
            ));
        }
        let proof = self.proof(b"client", &bound);
        send.write_all(&proof).await.map_err(io)?;
        let mut verdict = [0u8; 1];
        recv.read_exact(&mut verdict).await.map_err(io)?;
        let _ = send.finish();
        if verdict[0] != 1 {
            return Err(Failure::Refused(
                "it refused our proof (another cluster secret)".into(),
            ));
        }
        if self.admit(peer, selected_addr(&conn), bound.server_incarnation) {
            tokio::time::sleep(STALE_CLOSE_GRACE).await;
        }
        conn.close(0u32.into(), b"done");
        Ok(())
    }

    async fn server(&self, conn: &Connection) -> Result<(), Failure> {
        let Some(endpoint) = self.endpoint() else {
            return Err(Failure::Io("endpoint not ready".into()));
        };
        let me = endpoint.id();
        let peer = conn.remote_id();
        let (mut send, mut recv) = conn.accept_bi().await.map_err(io)?;
        let mut hello = [0u8; HELLO_LEN];
        // The version first: an older client sends a shorter hello.
        recv.read_exact(&mut hello[..1]).await.map_err(io)?;
        if hello[0] != AUTH_VERSION {
            return Err(Failure::Refused(format!(
                "unknown admission version {} (this node speaks {AUTH_VERSION})",
                hello[0]
            )));
        }
        recv.read_exact(&mut hello[1..]).await.map_err(io)?;
        let bound = Transcript {
            cn: hello[1..33].try_into().expect("32"),
            sn: nonce(),
            client: peer,
            server: me,
            client_incarnation: u64::from_be_bytes(hello[33..].try_into().expect("8")),
            server_incarnation: self.incarnation,
        };
        let mut reply = [0u8; REPLY_LEN];
        reply[..32].copy_from_slice(&bound.sn);
        reply[32..40].copy_from_slice(&self.incarnation.to_be_bytes());
        reply[40..].copy_from_slice(&self.proof(b"server", &bound));
        send.write_all(&reply).await.map_err(io)?;
        let mut proof = [0u8; 32];
        recv.read_exact(&mut proof).await.map_err(io)?;
        let expected = self.proof(b"client", &bound);
        if !constant_eq(&expected, &proof) {
            let _ = send.write_all(&[0]).await;
            let _ = send.finish();
            return Err(Failure::Refused(
                "it does not know the cluster secret".into(),
            ));
        }
        if self.admit(peer, selected_addr(conn), bound.client_incarnation) {
            // Let iroh-gossip drop the old neighbour before the new
            // process, once admitted, dials and joins.
            tokio::time::sleep(STALE_CLOSE_GRACE).await;
        }
        send.write_all(&[1]).await.map_err(io)?;
        let _ = send.finish();
        // Wait for the client to read the verdict and close.
        let _ = tokio::time::timeout(AUTH_TIMEOUT, conn.closed()).await;
        Ok(())
    }
}

/// Length of the client's hello: version, nonce, incarnation.
const HELLO_LEN: usize = 1 + 32 + 8;
/// Length of the server's reply: nonce, incarnation, proof.
const REPLY_LEN: usize = 32 + 8 + 32;

/// What both proofs of one exchange are bound to.
struct Transcript {
    cn: [u8; 32],
    sn: [u8; 32],
    client: EndpointId,
    server: EndpointId,
    client_incarnation: u64,
    server_incarnation: u64,
}

enum Failure {
    Refused(String),
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
        let Ok(_slot) = self.0.admissions.clone().try_acquire_owned() else {
            log::debug!("admission from {peer} refused: {MAX_ADMISSIONS} already running");
            conn.close(BUSY_CODE.into(), b"busy");
            return Ok(());
        };
        match tokio::time::timeout(AUTH_TIMEOUT, self.0.server(&conn)).await {
            Ok(Ok(())) => {}
            Ok(Err(Failure::Refused(why))) => {
                self.0.refuse(peer, &why);
                conn.close(REFUSED_CODE.into(), b"refused");
            }
            Ok(Err(Failure::Io(why))) => log::debug!("admission from {peer} failed: {why}"),
            Err(_) => log::debug!("admission from {peer} timed out"),
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
        alpn == self.gossip_alpn || alpn == STATE_ALPN
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
        // (re)started: prove ourselves again, and check it, by dialing back.
        let Ok(_slot) = self.state.admissions.clone().try_acquire_owned() else {
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

    #[test]
    fn refusals_of_ever_new_peers_stay_bounded() {
        // Any host can make a fresh key per attempt and fail admission:
        // the memory of refusals must not grow with them.
        let state = AuthState::new(
            Keys::derive(b"s"),
            1,
            HashSet::new(),
            Arc::new(GossipStats::default()),
        );
        for _ in 0..MAX_REFUSED * 3 {
            state.refuse(SecretKey::generate().public(), "test");
        }
        let n = state.refused.lock().unwrap().len();
        assert!(n <= MAX_REFUSED, "{n} refusals remembered");
    }
}
