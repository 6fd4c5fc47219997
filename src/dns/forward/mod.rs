//! The forwarder: relays the queries that are not ours to the upstreams and
//! sends their answers back to the clients.
//!
//! One forwarding thread owns a pool of non-blocking UDP sockets toward the
//! upstreams ([`PORTS_PER_FAMILY`] per address family, each on a port the
//! kernel picked at random), a table of queries in flight keyed by a fresh
//! id from a ChaCha generator seeded by the OS, their deadlines, and each
//! upstream's health. Serving threads hand queries over with
//! [`Forwarder::submit`]; answers go straight back to the client through
//! the [`Reply`] that came with the query. Truncated answers are retried
//! over TCP by a small worker pool ([`tcp`]).
//!
//! Invariants:
//! - `submit` never blocks: a bounded channel and `try_send`; a dead or slow
//!   upstream can never delay a local answer.
//! - The client's bytes are relayed unchanged but for the id, which is
//!   restored in the answer.
//! - Spoofing resistance (RFC 5452): each query goes out on a socket drawn
//!   at random from the pool, with an unpredictable id; a reply is accepted
//!   only from the address and port the query went to, on the socket it
//!   went out on, with the query's id and its question byte for byte
//!   (letter case included). Anything else is dropped and changes nothing.
//! - Identical queries in flight ([`wire::merge_key`]) are sent upstream
//!   once; the answer goes to every waiting client with its own id.
//! - Only timeouts, unreachability and malformed replies count against an
//!   upstream's health ([`health::Outcome`]).
//! - Every client gets exactly one answer: the upstream's, or SERVFAIL
//!   within [`QUERY_BUDGET`].
//! - Queries, waiting clients and timers are bounded: [`MAX_IN_FLIGHT`],
//!   [`MAX_TIMERS`].

mod health;
mod stats;
mod tcp;
pub(crate) mod wire;

use std::collections::{BinaryHeap, HashMap};
use std::hash::BuildHasher;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use std::{cmp::Reverse, ops::Range};

use arc_swap::ArcSwapOption;
use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError, bounded};
use mio::{Events, Interest, Poll, Token, Waker};
use rand::rngs::{StdRng, SysRng};
use rand::{RngExt, SeedableRng};

use crate::config::Config;
use crate::dns::cache::{CLIENT_RESPONSE_TIMER, Cache, CacheStats, CacheWriter};
use crate::dns::udp::{LocalAddr, send_from};
use health::{Change, Health, Outcome};
pub use health::{DOWN_AFTER_FAILURES, PROBE_INTERVAL};
pub use stats::{ForwardStats, LATENCY_BUCKETS_SECS, UpstreamStats};
pub use tcp::{TCP_CONNECT_TIMEOUT, TCP_EXCHANGE_TIMEOUT, TCP_QUEUE_CAPACITY, TCP_WORKERS};
use wire::Verdict;

/// Queries waiting in the forwarder's inbox; beyond, `submit` says no.
pub const INBOX_CAPACITY: usize = 1024;
/// Clients waiting for an upstream at once (those that share a merged
/// query included), and queries in flight upstream; beyond, SERVFAIL.
pub const MAX_IN_FLIGHT: usize = 4096;
/// How long one upstream gets to answer before the next is tried.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(700);
/// How long a query may take in all before the client gets SERVFAIL: well
/// under the usual stub resolver retry timer (glibc `timeout:5`).
pub const QUERY_BUDGET: Duration = Duration::from_secs(2);
/// Upstreams tried for one query at most.
pub const MAX_ATTEMPTS: usize = 4;
/// UDP sockets toward the upstreams per address family, each bound to a
/// port the kernel picks at random; every query goes out on one drawn at
/// random, so a spoofer must guess the port (10 bits) besides the id (16)
/// (RFC 5452 §9.2). A fixed pool costs no system call per query, unlike a
/// socket opened per query.
pub const PORTS_PER_FAMILY: usize = 1024;
/// File descriptors left for the rest of the daemon (client TCP
/// connections, gossip, Docker, HTTP) when the open-file limit sets the
/// size of the port pool.
pub const FD_RESERVE: usize = 1024;
/// Smallest port pool per family, opened (with a warning) when even the
/// hard open-file limit leaves less than [`PORTS_PER_FAMILY`].
pub const MIN_PORTS_PER_FAMILY: usize = 16;
/// Timers held at most: when the heap is full, the stale timers of queries
/// already answered are dropped, so its size follows the queries in flight
/// ([`MAX_IN_FLIGHT`]), never the query rate.
pub const MAX_TIMERS: usize = 2 * MAX_IN_FLIGHT;
/// Largest DNS message.
const MAX_MESSAGE_LEN: usize = 65_535;
/// Readiness events handled per poll (one per socket with replies).
const EVENTS_CAPACITY: usize = 256;
/// Datagrams read from one upstream socket before the thread turns to its
/// timers and inbox (a flood cannot hold it in one socket's read loop).
pub const MAX_DATAGRAMS_PER_DRAIN: usize = 256;
const WAKER: Token = Token(usize::MAX);

/// Where the forwarder sends the upstream's answer.
pub enum Reply {
    /// Straight back on the serving thread's UDP socket.
    Udp {
        socket: Arc<UdpSocket>,
        peer: SocketAddr,
        /// The address the client sent its query to (on a wildcard bind):
        /// the answer leaves from it.
        local: Option<LocalAddr>,
        /// Largest answer the client accepts over UDP.
        max_len: usize,
    },
    /// To the TCP connection's writer.
    Tcp(crossbeam_channel::Sender<Vec<u8>>),
    /// To the TCP connection's writer, then wakes its `mio` loop (so that
    /// loop needs no polling interval for forwarded answers).
    TcpWake {
        tx: crossbeam_channel::Sender<Vec<u8>>,
        waker: Arc<Waker>,
    },
}

impl Reply {
    /// Sends `answer` (id already restored) to the client: over UDP cut to
    /// header, question and OPT with TC=1 when it exceeds `max_len`.
    /// Never blocks for long; a client that went away is not an error.
    fn deliver(&self, answer: &[u8], scratch: &mut Vec<u8>) {
        match self {
            Reply::Udp {
                socket,
                peer,
                local,
                max_len,
            } => {
                let bytes = if answer.len() > *max_len && wire::truncate(answer, *max_len, scratch)
                {
                    &scratch[..]
                } else {
                    answer
                };
                if let Err(e) = send_from(socket, bytes, *peer, *local) {
                    log::debug!("forwarded answer to {peer} not sent: {e}");
                }
            }
            Reply::Tcp(tx) => {
                let _ = tx.try_send(answer.to_vec());
            }
            Reply::TcpWake { tx, waker } => {
                if tx.try_send(answer.to_vec()).is_ok() {
                    let _ = waker.wake();
                }
            }
        }
    }
}

impl Forwarder {
    /// Whether queries are forwarded at all (some upstream is configured):
    /// replies advertise recursion (RA) only then. One lock-free load: a
    /// reload may change it ([`Forwarder::set_upstreams`]).
    #[inline]
    pub fn forwards(&self) -> bool {
        self.link.load().is_some()
    }
}

/// A query handed over by a serving thread; no reply for a cache refresh.
struct Job {
    query: Vec<u8>,
    reply: Option<Reply>,
    received: Instant,
}

/// A client waiting for the answer to a query in flight.
struct Waiter {
    /// The id of the client's query, restored in its answer.
    original_id: u16,
    reply: Reply,
    /// When its query reached the forwarder.
    received: Instant,
}

/// Sends `answer` (any id) to each waiting client with its own id, and
/// counts it: the one place where an upstream answer reaches clients (the
/// forwarding thread for UDP answers, the TCP pool for retried ones).
fn deliver_answer(
    stats: &ForwardStats,
    answer: &mut [u8],
    waiters: &[Waiter],
    scratch: &mut Vec<u8>,
) {
    for w in waiters {
        wire::set_id(answer, w.original_id);
        // Counted first: whoever sees the answer sees the count.
        stats.answered.fetch_add(1, Ordering::Relaxed);
        stats.observe_latency(w.received.elapsed());
        w.reply.deliver(answer, scratch);
    }
}

/// What the serving threads and the forwarding thread share.
struct Shared {
    stopping: Arc<AtomicBool>,
    /// Set by the forwarding thread just before it sleeps in `poll`, so that
    /// `submit` wakes it only then (no system call per query under load).
    asleep: AtomicBool,
    waker: Waker,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }
}

/// The sending half; when the last [`Forwarder`] goes away the threads
/// stop on their own.
struct Link {
    tx: Sender<Job>,
    shared: Arc<Shared>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shared.stop();
    }
}

/// Cheap-to-clone handle to the forwarding thread(s).
#[derive(Clone)]
pub struct Forwarder {
    /// `None` when there is no upstream: every query is refused at once.
    /// Shared by every clone and replaced whole when the upstreams change
    /// ([`Forwarder::set_upstreams`]); `submit` loads it lock-free.
    link: Arc<ArcSwapOption<Link>>,
    /// The forward cache the forwarding thread writes (none with
    /// `cache_size = 0`). It outlives upstream changes: the serving
    /// threads keep reading the one they were given.
    cache: Option<Arc<Cache>>,
    /// The cache's one writer while no forwarding thread holds it (no
    /// upstream, or between two upstream sets): a forwarding thread takes
    /// it when it starts and puts it back when it ends.
    parked_writer: Arc<Mutex<Option<CacheWriter>>>,
}

impl Forwarder {
    /// Starts the forwarding thread and the TCP retry pool for
    /// `config.upstreams`. With no upstream, starts nothing and `submit`
    /// always returns false (the caller answers SERVFAIL at once).
    pub fn start(config: &Config, stats: Arc<ForwardStats>) -> io::Result<Forwarder> {
        Forwarder::start_with_cache(config, stats, None)
    }

    /// [`Forwarder::start`] with the forward cache of `config.cache`
    /// (counted in `cache_stats`), written by the forwarding thread only.
    pub fn start_with_cache(
        config: &Config,
        stats: Arc<ForwardStats>,
        cache_stats: Option<Arc<CacheStats>>,
    ) -> io::Result<Forwarder> {
        let (cache, writer) = match cache_stats.and_then(|s| Cache::new(config.cache, s)) {
            Some((cache, writer)) => (Some(cache), Some(writer)),
            None => (None, None),
        };
        let forwarder = Forwarder {
            link: Arc::new(ArcSwapOption::empty()),
            cache,
            parked_writer: Arc::new(Mutex::new(writer)),
        };
        forwarder.link.store(forwarder.start_link(config, stats)?);
        if let Some(cache) = &forwarder.cache {
            // A flush wakes the forwarding thread, which frees the entries.
            let links = Arc::downgrade(&forwarder.link);
            cache.set_flush_hook(move || {
                if let Some(links) = links.upgrade()
                    && let Some(link) = &*links.load()
                {
                    let _ = link.shared.waker.wake();
                }
            });
        }
        Ok(forwarder)
    }

    /// Starts a forwarding thread (and its TCP pool) for
    /// `config.upstreams`, holding the parked cache writer; `None` without
    /// upstreams.
    fn start_link(
        &self,
        config: &Config,
        stats: Arc<ForwardStats>,
    ) -> io::Result<Option<Arc<Link>>> {
        let upstreams = stats.set_upstreams(&config.upstreams);
        if upstreams.is_empty() {
            log::warn!("no upstream resolver: names that are not ours get SERVFAIL");
            return Ok(None);
        }
        let rng = StdRng::try_from_rng(&mut SysRng)
            .map_err(|e| io::Error::other(format!("no randomness from the OS: {e}")))?;
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        let unspecified = [
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ];
        let wanted =
            unspecified.map(|u| config.upstreams.iter().any(|a| a.is_ipv4() == u.is_ipv4()));
        let per_family = ports_per_family(wanted.iter().filter(|w| **w).count());
        let mut sockets = Vec::new();
        let mut families = [0..0, 0..0];
        for (family, unspecified) in unspecified.into_iter().enumerate() {
            if !wanted[family] {
                continue;
            }
            let start = sockets.len();
            for _ in 0..per_family {
                match upstream_socket(unspecified) {
                    Ok(mut socket) => {
                        poll.registry().register(
                            &mut socket,
                            Token(sockets.len()),
                            Interest::READABLE,
                        )?;
                        sockets.push(socket);
                    }
                    // E.g. IPv6 disabled on the host: its upstreams fail
                    // over to the others. Or no port left: a smaller pool.
                    Err(e) => {
                        log::warn!(
                            "{} UDP sockets toward {unspecified} upstreams (of {per_family}): {e}",
                            sockets.len() - start
                        );
                        break;
                    }
                }
            }
            families[family] = start..sockets.len();
        }
        if sockets.is_empty() {
            return Err(io::Error::other("no UDP socket toward any upstream"));
        }
        let stopping = Arc::new(AtomicBool::new(false));
        let (tcp_tx, mut threads) = tcp::spawn(stats.clone(), stopping.clone())?;
        let (tx, rx) = bounded(INBOX_CAPACITY);
        let shared = Arc::new(Shared {
            stopping,
            asleep: AtomicBool::new(false),
            waker,
            threads: Mutex::new(Vec::new()),
        });
        let mut forwarding = Forwarding::new(
            poll,
            sockets,
            families,
            upstreams,
            rng,
            rx,
            tcp_tx,
            stats.clone(),
            shared.clone(),
        );
        let parked = self.parked_writer.clone();
        forwarding.cache = lock(&parked).take();
        let handle = std::thread::Builder::new()
            .name("glued-forward".into())
            .spawn(move || {
                let alive = forwarding.stats.heartbeat.clone().enter();
                forwarding.run();
                // The next forwarding thread (an upstream change) writes on.
                *lock(&parked) = forwarding.cache.take();
                // Only a requested stop is a clean end.
                if forwarding.shared.stopping.load(Ordering::SeqCst) {
                    alive.retire();
                }
            });
        match handle {
            Ok(h) => threads.insert(0, h),
            Err(e) => {
                // The closure (and the writer in it) is gone: start over
                // without a cache rather than with two writers.
                shared.stop();
                return Err(e);
            }
        }
        *shared.threads.lock().unwrap_or_else(|e| e.into_inner()) = threads;
        log::info!("forwarding to {:?}", config.upstreams);
        Ok(Some(Arc::new(Link { tx, shared })))
    }

    /// The forward cache, for the serving threads' lookups.
    pub fn cache(&self) -> Option<&Arc<Cache>> {
        self.cache.as_ref()
    }

    /// Sends `query` (a client's, any id) upstream to refresh its cache
    /// entry; nobody waits for the answer. False when the forwarder cannot
    /// take it now (the entry asks again later).
    pub fn refresh(&self, query: &[u8]) -> bool {
        let sent = self.hand_over(query, None);
        if sent && let Some(cache) = &self.cache {
            cache.count_prefetch();
        }
        sent
    }

    /// Hands a client's query over without blocking. Returns false when the
    /// forwarder is saturated, has no upstream, is stopped, or the query
    /// has not exactly one question (the caller answers SERVFAIL).
    pub fn submit(&self, query: &[u8], reply: Reply) -> bool {
        self.hand_over(query, Some(reply))
    }

    fn hand_over(&self, query: &[u8], reply: Option<Reply>) -> bool {
        match &*self.link.load() {
            Some(link)
                if wire::question(query).is_some()
                    && !link.shared.stopping.load(Ordering::Relaxed) =>
            {
                let job = Job {
                    query: query.to_vec(),
                    reply,
                    received: Instant::now(),
                };
                match link.tx.try_send(job) {
                    Ok(()) => {
                        // Pairs with the fence in `Forwarding::run`: either
                        // it sees the job, or we see it asleep and wake it.
                        fence(Ordering::SeqCst);
                        if link.shared.asleep.swap(false, Ordering::SeqCst) {
                            let _ = link.shared.waker.wake();
                        }
                        true
                    }
                    Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
                }
            }
            _ => false,
        }
    }

    /// Stops the forwarding thread and the TCP pool and joins them (queries
    /// in flight get SERVFAIL). Idempotent; any clone may call it.
    pub fn stop(&self) {
        if let Some(link) = self.link.swap(None) {
            stop_link(&link);
        }
    }

    /// Forwards to `config.upstreams` from now on, for every clone, with
    /// a fresh forwarding thread. Without a cache the old thread retires
    /// after [`QUERY_BUDGET`], when every query it holds was answered. With
    /// one, the cache's single writer must move: the old thread is stopped
    /// first (its queries in flight get SERVFAIL, or a stale answer), and
    /// queries arriving meanwhile get SERVFAIL. `stats` (the same as at
    /// start) gets the new per-upstream counters.
    pub fn set_upstreams(&self, config: &Config, stats: Arc<ForwardStats>) -> io::Result<()> {
        if self.cache.is_some()
            && let Some(old) = self.link.swap(None)
        {
            stop_link(&old);
        }
        let fresh = self.start_link(config, stats)?;
        if let Some(old) = self.link.swap(fresh) {
            std::thread::Builder::new()
                .name("glued-forward-retire".into())
                .spawn(move || {
                    std::thread::sleep(QUERY_BUDGET + RETIRE_MARGIN);
                    stop_link(&old);
                })?;
        }
        Ok(())
    }
}

/// How long a replaced forwarding thread outlives [`QUERY_BUDGET`] before
/// it is stopped (its last SERVFAILs are sent by then).
pub const RETIRE_MARGIN: Duration = Duration::from_millis(200);

/// Locks a mutex off the hot path, whatever a panicking holder left.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Stops one forwarding thread set and joins it.
fn stop_link(link: &Link) {
    link.shared.stop();
    let threads = std::mem::take(
        &mut *link
            .shared
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner()),
    );
    for t in threads {
        let _ = t.join();
    }
}

/// How many sockets each address family's port pool gets for
/// `n_families` families: [`PORTS_PER_FAMILY`], the soft open-file limit
/// raised toward the hard one as needed so that [`FD_RESERVE`] remain
/// besides; fewer (at least [`MIN_PORTS_PER_FAMILY`], with a warning) when
/// even the hard limit is too low.
fn ports_per_family(n_families: usize) -> usize {
    let n_families = n_families.max(1);
    let wanted = (PORTS_PER_FAMILY * n_families + FD_RESERVE) as u64;
    let limit = raise_open_file_limit(wanted);
    let fit = limit.saturating_sub(FD_RESERVE as u64) / n_families as u64;
    let n = usize::try_from(fit)
        .unwrap_or(usize::MAX)
        .clamp(MIN_PORTS_PER_FAMILY, PORTS_PER_FAMILY);
    if n < PORTS_PER_FAMILY {
        log::warn!(
            "open-file limit {limit}: {n} upstream ports per address family instead of \
             {PORTS_PER_FAMILY} (weaker spoofing resistance); raise it (LimitNOFILE, ulimit -n) to {wanted}"
        );
    }
    n
}

/// Raises the soft `RLIMIT_NOFILE` to `wanted` (at most the hard limit)
/// when it is lower; returns the soft limit now in force.
fn raise_open_file_limit(wanted: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return wanted;
    }
    let (current, hard) = (limit.rlim_cur, limit.rlim_max);
    if current >= wanted || current >= hard {
        return current;
    }
    let raised = libc::rlimit {
        rlim_cur: wanted.min(hard) as libc::rlim_t,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        log::debug!(
            "open-file limit raised from {current} to {}",
            raised.rlim_cur
        );
        raised.rlim_cur
    } else {
        current
    }
}

/// A non-blocking UDP socket on an ephemeral port, which the kernel picks
/// at random in its local port range.
fn upstream_socket(unspecified: IpAddr) -> io::Result<mio::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let addr = SocketAddr::new(unspecified, 0);
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Dual-stack, so that an IPv4-mapped upstream address works too.
        let _ = socket.set_only_v6(false);
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(mio::net::UdpSocket::from_std(socket.into()))
}

/// A query in flight, keyed by the id it carries upstream.
struct Pending {
    /// The query as sent upstream: the first client's bytes with the
    /// forwarder's id.
    query: Vec<u8>,
    /// Who waits for the answer, the first client first; nobody for a
    /// health probe or a cache refresh.
    waiters: Vec<Waiter>,
    /// A cache refresh (or clients already given a stale answer): the
    /// answer goes into the cache, to whoever joined meanwhile.
    refresh: bool,
    /// Hash of its [`wire::merge_key`] while identical queries may join it.
    merge_hash: Option<u64>,
    /// When the first client's query arrived: the budget counts from there.
    received: Instant,
    /// Upstream of each attempt so far, oldest first.
    tried: [u16; MAX_ATTEMPTS],
    /// Socket each attempt went out on.
    sockets: [u16; MAX_ATTEMPTS],
    n_attempts: usize,
    /// Generation of the live timer; older timers are ignored.
    timer_seq: u32,
}

impl Pending {
    fn tried(&self) -> &[u16] {
        &self.tried[..self.n_attempts]
    }
    fn current_upstream(&self) -> Option<usize> {
        self.tried().last().map(|u| *u as usize)
    }
    fn is_probe(&self) -> bool {
        self.waiters.is_empty() && !self.refresh
    }
    /// Whether a reply from `from` on `socket` answers one of our attempts;
    /// the upstream's index if so.
    fn attempt_from(
        &self,
        upstreams: &[Arc<UpstreamStats>],
        from: SocketAddr,
        socket: usize,
    ) -> Option<usize> {
        (0..self.n_attempts)
            .find(|i| {
                self.sockets[*i] as usize == socket
                    && upstreams[self.tried[*i] as usize].addr == from
            })
            .map(|i| self.tried[i] as usize)
    }
}

/// The forwarding thread's state.
struct Forwarding {
    poll: Poll,
    /// The port pool: IPv4 sockets, then IPv6 ones.
    sockets: Vec<mio::net::UdpSocket>,
    /// Socket index ranges for IPv4 and IPv6 upstreams.
    families: [Range<usize>; 2],
    /// Per upstream, in configuration order.
    upstreams: Vec<Arc<UpstreamStats>>,
    healths: Vec<Health>,
    pending: HashMap<u16, Pending, foldhash::fast::RandomState>,
    /// Merge-key hash → id of the query in flight that identical queries
    /// join.
    merging: HashMap<u64, u16, foldhash::fast::RandomState>,
    merge_hasher: foldhash::fast::RandomState,
    /// Clients waiting in `pending`.
    n_waiting: usize,
    /// (deadline, id, timer generation), earliest first; at most
    /// [`MAX_TIMERS`].
    timers: BinaryHeap<Reverse<(Instant, u16, u32)>>,
    next_seq: u32,
    /// Ids and socket draws: ChaCha12 seeded from the OS.
    rng: StdRng,
    recv_buf: Vec<u8>,
    /// `. NS` query sent to down upstreams, id set per probe.
    probe: Vec<u8>,
    scratch: Vec<u8>,
    /// The cache's one writer.
    cache: Option<CacheWriter>,
    /// (client-response deadline, id, the query's `received`): waiters
    /// whose question has a stale cache entry get it then if no answer
    /// came (RFC 8767 §5).
    stale_timers: BinaryHeap<Reverse<(Instant, u16, Instant)>>,
    rx: Receiver<Job>,
    tcp_tx: Sender<tcp::TcpJob>,
    stats: Arc<ForwardStats>,
    shared: Arc<Shared>,
}

impl Forwarding {
    #[allow(clippy::too_many_arguments)]
    fn new(
        poll: Poll,
        sockets: Vec<mio::net::UdpSocket>,
        families: [Range<usize>; 2],
        upstreams: Vec<Arc<UpstreamStats>>,
        rng: StdRng,
        rx: Receiver<Job>,
        tcp_tx: Sender<tcp::TcpJob>,
        stats: Arc<ForwardStats>,
        shared: Arc<Shared>,
    ) -> Forwarding {
        Forwarding {
            poll,
            sockets,
            families,
            healths: vec![Health::new(); upstreams.len()],
            upstreams,
            pending: HashMap::with_capacity_and_hasher(MAX_IN_FLIGHT, Default::default()),
            merging: HashMap::with_capacity_and_hasher(MAX_IN_FLIGHT, Default::default()),
            merge_hasher: Default::default(),
            n_waiting: 0,
            timers: BinaryHeap::with_capacity(MAX_TIMERS),
            next_seq: 0,
            rng,
            recv_buf: vec![0; MAX_MESSAGE_LEN],
            probe: wire::probe_query(),
            scratch: Vec::with_capacity(MAX_MESSAGE_LEN),
            cache: None,
            stale_timers: BinaryHeap::new(),
            rx,
            tcp_tx,
            stats,
            shared,
        }
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        // Sockets whose last drain stopped at its budget: read again on the
        // next turn (readiness is edge-triggered, no new event comes).
        let mut undrained: Vec<usize> = Vec::with_capacity(self.sockets.len());
        // Whether each socket is in `undrained`.
        let mut queued = vec![false; self.sockets.len()];
        loop {
            self.stats.heartbeat.beat();
            let now = Instant::now();
            if let Some(cache) = &mut self.cache {
                cache.maintain();
            }
            self.fire_timers(now);
            self.fire_stale_timers(now);
            self.send_probes(now);
            // Wakes at least every BEAT_INTERVAL, so an idle thread beats.
            let timeout = Some(
                self.next_deadline()
                    .map_or(crate::health::BEAT_INTERVAL, |d| {
                        d.saturating_duration_since(now)
                            .min(crate::health::BEAT_INTERVAL)
                    }),
            );
            // Announce the sleep, then look at the inbox once more (pairs
            // with the fence in `submit`).
            self.shared.asleep.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            let timeout = if self.rx.is_empty() && undrained.is_empty() {
                timeout
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout)
                && e.kind() != io::ErrorKind::Interrupted
            {
                log::error!("forwarder poll failed, forwarding stops: {e}");
                break;
            }
            self.shared.asleep.store(false, Ordering::SeqCst);
            if self.shared.stopping.load(Ordering::SeqCst) {
                break;
            }
            for event in events.iter() {
                let index = event.token().0;
                if event.token() != WAKER && !queued[index] {
                    queued[index] = true;
                    undrained.push(index);
                }
            }
            undrained.retain(|&index| {
                let more = self.drain_socket(index);
                queued[index] = more;
                more
            });
            if !self.drain_inbox() {
                break;
            }
        }
        self.shutdown();
    }

    /// Takes every queued job; false when every sender is gone.
    fn drain_inbox(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(job) => self.start_query(job),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let stale = self.stale_timers.peek().map(|Reverse((at, _, _))| *at);
        let timer = self.timers.peek().map(|Reverse((at, _, _))| *at);
        let timer = match (timer, stale) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let probe = self.healths.iter().filter_map(Health::next_probe).min();
        match (timer, probe) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn update_in_flight(&self) {
        self.stats
            .in_flight
            .store(self.pending.len() as u64, Ordering::Relaxed);
    }

    /// A free unpredictable id for a new query in flight.
    fn fresh_id(&mut self) -> u16 {
        loop {
            let id: u16 = self.rng.random();
            if !self.pending.contains_key(&id) {
                return id;
            }
        }
    }

    /// A client's query: joins an identical query in flight, or goes
    /// upstream under a fresh id.
    fn start_query(&mut self, job: Job) {
        let now = Instant::now();
        let Some(original_id) = wire::id(&job.query) else {
            return;
        };
        let Some(reply) = job.reply else {
            self.start_refresh(job.query, job.received, now);
            return;
        };
        let waiter = Waiter {
            original_id,
            reply,
            received: job.received,
        };
        // A client whose question has an expired cache entry gets it when
        // the client-response timer runs out.
        let stale_candidate = self
            .cache
            .as_ref()
            .is_some_and(|c| c.cache().has_stale(&job.query, now));
        if self.n_waiting >= MAX_IN_FLIGHT {
            log::debug!("{MAX_IN_FLIGHT} clients waiting: SERVFAIL");
            self.servfail(&job.query, std::slice::from_ref(&waiter), None);
            return;
        }
        let key = wire::merge_key(&job.query);
        let merge_hash = key.map(|k| self.merge_hasher.hash_one(k));
        if let Some(hash) = merge_hash
            && let Some(id) = self.merging.get(&hash)
            && let Some(p) = self.pending.get_mut(id)
            && wire::merge_key(&p.query) == key
        {
            p.waiters.push(waiter);
            let (id, first_received) = (*id, p.received);
            self.n_waiting += 1;
            self.stats.merged.fetch_add(1, Ordering::Relaxed);
            if stale_candidate {
                self.push_stale_timer(job.received, id, first_received);
            }
            return;
        }
        if self.pending.len() >= MAX_IN_FLIGHT {
            log::debug!("{MAX_IN_FLIGHT} queries in flight: SERVFAIL");
            self.servfail(&job.query, std::slice::from_ref(&waiter), None);
            return;
        }
        let id = self.fresh_id();
        let mut query = job.query;
        wire::set_id(&mut query, id);
        self.insert(id, query, vec![waiter], job.received, merge_hash);
        if stale_candidate {
            self.push_stale_timer(job.received, id, job.received);
        }
        self.next_attempt(id, now);
    }

    /// A cache refresh: goes upstream with nobody waiting, unless the same
    /// question is already in flight (its answer refreshes the entry).
    fn start_refresh(&mut self, mut query: Vec<u8>, received: Instant, now: Instant) {
        if self.pending.len() >= MAX_IN_FLIGHT {
            return;
        }
        let key = wire::merge_key(&query);
        let merge_hash = key.map(|k| self.merge_hasher.hash_one(k));
        if let Some(hash) = merge_hash
            && let Some(id) = self.merging.get(&hash)
            && let Some(p) = self.pending.get(id)
            && wire::merge_key(&p.query) == key
        {
            return;
        }
        let id = self.fresh_id();
        wire::set_id(&mut query, id);
        self.insert(id, query, Vec::new(), received, merge_hash);
        if let Some(p) = self.pending.get_mut(&id) {
            p.refresh = true;
        }
        self.next_attempt(id, now);
    }

    /// The client-response timer of a client that arrived at `received`,
    /// for query `id` (first received at `first_received`). When the heap
    /// is full, the timers of queries already answered are dropped first;
    /// if it is still full the client goes without one (it still gets the
    /// stale entry if every upstream fails), so the heap stays within
    /// [`MAX_TIMERS`] like the attempt timers.
    fn push_stale_timer(&mut self, received: Instant, id: u16, first_received: Instant) {
        if self.stale_timers.len() >= MAX_TIMERS {
            let pending = &self.pending;
            self.stale_timers.retain(|Reverse((_, id, received))| {
                pending
                    .get(id)
                    .is_some_and(|p| p.received == *received && !p.waiters.is_empty())
            });
            if self.stale_timers.len() >= MAX_TIMERS {
                return;
            }
        }
        self.stale_timers.push(Reverse((
            received + CLIENT_RESPONSE_TIMER,
            id,
            first_received,
        )));
    }

    /// Gives the waiters of a query whose client-response timer ran out
    /// their stale answer; the query goes on upstream as a refresh.
    fn fire_stale_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, id, received))) = self.stale_timers.peek().copied() {
            if at > now {
                return;
            }
            self.stale_timers.pop();
            let Some(p) = self.pending.get_mut(&id) else {
                continue;
            };
            if p.received != received || p.waiters.is_empty() {
                continue;
            }
            let waiters = std::mem::take(&mut p.waiters);
            let query = p.query.clone();
            if self.answer_stale(&query, &waiters, now) {
                self.n_waiting -= waiters.len();
                if let Some(p) = self.pending.get_mut(&id) {
                    p.refresh = true;
                }
            } else if let Some(p) = self.pending.get_mut(&id) {
                // The entry went away meanwhile: they keep waiting.
                p.waiters = waiters;
            }
        }
    }

    /// Sends `query`'s stale cache entry (TTL 30) to each waiter with its
    /// own id; false when the cache has none to give.
    fn answer_stale(&mut self, query: &[u8], waiters: &[Waiter], now: Instant) -> bool {
        let Some(cache) = &self.cache else {
            return false;
        };
        let mut out = std::mem::take(&mut self.scratch);
        let answered = cache.cache().answer_stale(query, now, &mut out);
        if answered {
            let mut unused = Vec::new();
            deliver_answer(&self.stats, &mut out, waiters, &mut unused);
        }
        self.scratch = out;
        answered
    }

    fn insert(
        &mut self,
        id: u16,
        query: Vec<u8>,
        waiters: Vec<Waiter>,
        received: Instant,
        merge_hash: Option<u64>,
    ) {
        if let Some(hash) = merge_hash {
            self.merging.insert(hash, id);
        }
        self.n_waiting += waiters.len();
        self.pending.insert(
            id,
            Pending {
                query,
                waiters,
                refresh: false,
                merge_hash,
                received,
                tried: [0; MAX_ATTEMPTS],
                sockets: [0; MAX_ATTEMPTS],
                n_attempts: 0,
                timer_seq: 0,
            },
        );
        self.update_in_flight();
    }

    /// Removes query `id` from the tables (its waiters are the caller's
    /// to answer).
    fn take(&mut self, id: u16) -> Option<Pending> {
        let p = self.pending.remove(&id)?;
        if let Some(hash) = p.merge_hash
            && self.merging.get(&hash) == Some(&id)
        {
            self.merging.remove(&hash);
        }
        self.n_waiting -= p.waiters.len();
        self.update_in_flight();
        Some(p)
    }

    /// Sends query `id` to its next upstream, or answers SERVFAIL when none
    /// is left or the budget is spent.
    fn next_attempt(&mut self, id: u16, now: Instant) {
        loop {
            let Some(p) = self.pending.get(&id) else {
                return;
            };
            let choice = if p.n_attempts >= MAX_ATTEMPTS || now >= p.received + QUERY_BUDGET {
                None
            } else {
                health::choose(&self.healths, p.tried())
            };
            let Some(upstream) = choice else {
                self.fail(id);
                return;
            };
            if self.send(id, upstream, now) {
                return;
            }
        }
    }

    /// One attempt of query `id` to `upstream`, on a socket of the pool
    /// drawn at random, with its timer. False when the send failed
    /// (counted against that upstream).
    fn send(&mut self, id: u16, upstream: usize, now: Instant) -> bool {
        let addr = self.upstreams[upstream].addr;
        let family = self.families[usize::from(addr.is_ipv6())].clone();
        // No socket for this family (it could not be opened): the attempt is
        // recorded and fails below.
        let socket = if family.is_empty() {
            usize::from(u16::MAX)
        } else {
            family.start + self.rng.random_range(..family.len())
        };
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        let Some(p) = self.pending.get_mut(&id) else {
            return true;
        };
        let i = p.n_attempts;
        p.tried[i] = upstream as u16;
        p.sockets[i] = socket as u16;
        p.n_attempts += 1;
        p.timer_seq = seq;
        let deadline = (now + ATTEMPT_TIMEOUT).min(p.received + QUERY_BUDGET);
        self.upstreams[upstream]
            .queries
            .fetch_add(1, Ordering::Relaxed);
        match self.sockets.get(socket).map(|s| s.send_to(&p.query, addr)) {
            Some(Ok(_)) => {
                self.push_timer(deadline, id, seq);
                true
            }
            Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                // Socket buffer full: let the timer decide.
                self.push_timer(deadline, id, seq);
                true
            }
            other => {
                log::debug!("sending to upstream {addr} failed: {other:?}");
                self.record(upstream, Outcome::Unreachable, now);
                false
            }
        }
    }

    /// Adds a timer; when the heap is full, first drops the timers that no
    /// longer belong to a query in flight (at most one per query is live,
    /// so at most [`MAX_IN_FLIGHT`] remain: amortised O(1) per push).
    fn push_timer(&mut self, deadline: Instant, id: u16, seq: u32) {
        if self.timers.len() >= MAX_TIMERS {
            let pending = &self.pending;
            self.timers.retain(|Reverse((_, id, seq))| {
                pending.get(id).is_some_and(|p| p.timer_seq == *seq)
            });
        }
        self.timers.push(Reverse((deadline, id, seq)));
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, id, seq))) = self.timers.peek().copied() {
            if at > now {
                return;
            }
            self.timers.pop();
            let Some(p) = self.pending.get(&id) else {
                continue;
            };
            if p.timer_seq != seq {
                continue;
            }
            let (upstream, probe) = (p.current_upstream(), p.is_probe());
            if let Some(u) = upstream {
                self.upstreams[u].timeouts.fetch_add(1, Ordering::Relaxed);
                self.record(u, Outcome::TimedOut, now);
            }
            if probe {
                self.take(id);
            } else {
                self.next_attempt(id, now);
            }
        }
    }

    /// Sends a `. NS` probe to each down upstream whose probe is due.
    fn send_probes(&mut self, now: Instant) {
        for upstream in 0..self.healths.len() {
            if !self.healths[upstream].take_probe(now) || self.pending.len() >= MAX_IN_FLIGHT {
                continue;
            }
            let id = self.fresh_id();
            let mut probe = self.probe.clone();
            wire::set_id(&mut probe, id);
            self.insert(id, probe, Vec::new(), now, None);
            log::debug!("probing upstream {}", self.upstreams[upstream].addr);
            if !self.send(id, upstream, now) {
                self.take(id);
            }
        }
    }

    /// Feeds the outcome of an attempt to `upstream`'s health.
    fn record(&mut self, upstream: usize, outcome: Outcome, now: Instant) {
        let u = &self.upstreams[upstream];
        match self.healths[upstream].record(outcome, now) {
            Change::WentDown => {
                u.up.store(false, Ordering::Relaxed);
                log::warn!(
                    "upstream {} is down after {DOWN_AFTER_FAILURES} failures in a row \
                     (timeouts, unreachable, malformed replies); probing it every {}s",
                    u.addr,
                    PROBE_INTERVAL.as_secs()
                );
            }
            Change::CameBack => {
                u.up.store(true, Ordering::Relaxed);
                log::info!("upstream {} is back up", u.addr);
            }
            Change::None => {}
        }
    }

    /// Reads the datagrams waiting on socket `index`, at most
    /// [`MAX_DATAGRAMS_PER_DRAIN`]; true when it stopped at that budget
    /// (more may be waiting).
    fn drain_socket(&mut self, index: usize) -> bool {
        let mut buf = std::mem::take(&mut self.recv_buf);
        let mut more = false;
        let mut budget = MAX_DATAGRAMS_PER_DRAIN;
        while let Some(socket) = self.sockets.get(index) {
            if budget == 0 {
                more = true;
                break;
            }
            budget -= 1;
            match socket.recv_from(&mut buf) {
                Ok((len, from)) => self.on_reply(&mut buf[..len], from, index),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // ICMP errors surface here; the timer handles them.
                Err(e) => log::debug!("upstream socket: {e}"),
            }
        }
        self.recv_buf = buf;
        more
    }

    /// A datagram from `from` on socket `socket`. It is a reply only if it
    /// carries the id of a query in flight and comes from an upstream that
    /// query was sent to, on the socket it went out on; then
    /// [`wire::judge_reply`] says what it is. Anything else is dropped and
    /// changes nothing (the query's timer still runs).
    fn on_reply(&mut self, msg: &mut [u8], from: SocketAddr, socket: usize) {
        let now = Instant::now();
        let matched = wire::id(msg).and_then(|id| {
            let p = self.pending.get(&id)?;
            let upstream = p.attempt_from(&self.upstreams, from, socket)?;
            Some((id, upstream, wire::judge_reply(&p.query, msg)))
        });
        let Some((id, upstream, verdict)) = matched else {
            self.stats.unmatched_replies.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let counters = &self.upstreams[upstream];
        match verdict {
            Verdict::Foreign => {
                self.stats.unmatched_replies.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::Malformed => {
                counters.malformed.fetch_add(1, Ordering::Relaxed);
                self.record(upstream, Outcome::Malformed, now);
                self.move_on(id, upstream, now);
            }
            Verdict::TryNext => {
                counters.failures.fetch_add(1, Ordering::Relaxed);
                self.record(upstream, Outcome::Replied, now);
                self.move_on(id, upstream, now);
            }
            Verdict::Answer => {
                counters.answers.fetch_add(1, Ordering::Relaxed);
                self.record(upstream, Outcome::Replied, now);
                if let Some(p) = self.take(id) {
                    self.accept_answer(p, upstream, msg);
                }
            }
        }
    }

    /// Query `id` got no usable reply from `upstream`: a probe ends; a
    /// query waiting for that upstream goes to the next one (a late reply
    /// from an earlier upstream changes nothing).
    fn move_on(&mut self, id: u16, upstream: usize, now: Instant) {
        let Some(p) = self.pending.get(&id) else {
            return;
        };
        if p.is_probe() {
            self.take(id);
        } else if p.current_upstream() == Some(upstream) {
            self.next_attempt(id, now);
        }
    }

    /// An accepted upstream answer (`msg`, any id) to query `p`, already
    /// out of the tables: retried over TCP when truncated, else sent to
    /// every client waiting for it. The one place where an upstream answer
    /// is accepted for delivery.
    fn accept_answer(&mut self, p: Pending, upstream: usize, msg: &mut [u8]) {
        if p.is_probe() {
            return;
        }
        if !wire::is_truncated(msg)
            && let Some(cache) = &mut self.cache
        {
            cache.insert(&p.query, msg, Instant::now());
        }
        if p.waiters.is_empty() {
            return;
        }
        if wire::is_truncated(msg) {
            let job = tcp::TcpJob {
                upstream: self.upstreams[upstream].clone(),
                query: p.query,
                waiters: p.waiters,
                truncated: msg.to_vec(),
            };
            if let Some(job) = tcp::try_submit(&self.tcp_tx, job) {
                log::debug!("TCP retry pool saturated: passing TC=1 on");
                deliver_answer(&self.stats, msg, &job.waiters, &mut self.scratch);
            }
        } else {
            deliver_answer(&self.stats, msg, &p.waiters, &mut self.scratch);
        }
    }

    /// Every upstream failed query `id`: its clients get the stale cache
    /// entry if there is one, else SERVFAIL (cached a few seconds, RFC
    /// 9520). A refresh just ends: the stale entry stays.
    fn fail(&mut self, id: u16) {
        let Some(p) = self.take(id) else {
            return;
        };
        if p.waiters.is_empty() {
            return;
        }
        let now = Instant::now();
        if self.answer_stale(&p.query, &p.waiters, now) {
            return;
        }
        self.servfail(&p.query, &p.waiters, Some(now));
    }

    /// Sends SERVFAIL for `query` (any id) to each waiting client with its
    /// own id. With `cache_at`, the failure is cached (a few seconds) before
    /// any client sees it, so a client that asks again at once is answered
    /// from the cache instead of sending the query upstream again.
    fn servfail(&mut self, query: &[u8], waiters: &[Waiter], cache_at: Option<Instant>) {
        let mut out = std::mem::take(&mut self.scratch);
        if wire::servfail(query, &mut out) {
            if let (Some(now), Some(cache)) = (cache_at, &mut self.cache) {
                cache.insert(query, &out, now);
            }
            let mut unused = Vec::new();
            for w in waiters {
                wire::set_id(&mut out, w.original_id);
                // Counted first: whoever sees the answer sees the count.
                self.stats.servfail.fetch_add(1, Ordering::Relaxed);
                w.reply.deliver(&out, &mut unused);
            }
        }
        self.scratch = out;
    }

    /// Answers every query still in flight SERVFAIL.
    fn shutdown(&mut self) {
        while let Ok(job) = self.rx.try_recv() {
            let Some(reply) = job.reply else {
                continue;
            };
            let waiter = Waiter {
                original_id: wire::id(&job.query).unwrap_or(0),
                reply,
                received: job.received,
            };
            self.servfail(&job.query, std::slice::from_ref(&waiter), None);
        }
        let ids: Vec<u16> = self.pending.keys().copied().collect();
        for id in ids {
            self.fail(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A forwarding thread's state with one loopback socket toward one
    /// upstream, not running.
    fn forwarding(upstream: SocketAddr) -> Forwarding {
        let stats = Arc::new(ForwardStats::default());
        let upstreams = stats.set_upstreams(&[upstream]);
        let poll = Poll::new().unwrap();
        let waker = Waker::new(poll.registry(), WAKER).unwrap();
        let mut socket = upstream_socket(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        poll.registry()
            .register(&mut socket, Token(0), Interest::READABLE)
            .unwrap();
        let (tcp_tx, _) = bounded(1);
        let (_, rx) = bounded(1);
        let shared = Arc::new(Shared {
            stopping: Arc::new(AtomicBool::new(false)),
            asleep: AtomicBool::new(false),
            waker,
            threads: Mutex::new(Vec::new()),
        });
        let rng = StdRng::try_from_rng(&mut SysRng).unwrap();
        Forwarding::new(
            poll,
            vec![socket],
            [0..1, 0..0],
            upstreams,
            rng,
            rx,
            tcp_tx,
            stats,
            shared,
        )
    }

    /// A flood of datagrams on an upstream socket cannot keep the
    /// forwarding thread reading forever: one drain takes at most
    /// [`MAX_DATAGRAMS_PER_DRAIN`] and says there may be more.
    #[test]
    fn a_drain_reads_a_bounded_number_of_datagrams() {
        let mut f = forwarding("127.0.0.1:9".parse().unwrap());
        let to = f.sockets[0].local_addr().unwrap();
        let flood = UdpSocket::bind("127.0.0.1:0").unwrap();
        let n = MAX_DATAGRAMS_PER_DRAIN + 10;
        for i in 0..n {
            flood.send_to(&[i as u8; 20], to).unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        let unmatched = |f: &Forwarding| f.stats.unmatched_replies.load(Ordering::Relaxed);
        assert!(f.drain_socket(0), "budget spent: more may wait");
        assert_eq!(unmatched(&f), MAX_DATAGRAMS_PER_DRAIN as u64);
        // The next drain goes on where this one stopped.
        for _ in 0..5 {
            flood.send_to(&[0; 20], to).unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        assert!(!f.drain_socket(0), "the socket is empty now");
        assert!(unmatched(&f) >= MAX_DATAGRAMS_PER_DRAIN as u64 + 5);
    }

    /// Queries answered long before their deadline leave their timers
    /// behind; however many go through, the heap stays within
    /// [`MAX_TIMERS`] (it grew by one per query before).
    #[test]
    fn timer_heap_stays_bounded_by_the_in_flight_cap() {
        let upstream = UdpSocket::bind("127.0.0.1:0").unwrap();
        upstream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut f = forwarding(upstream.local_addr().unwrap());
        let client = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        let peer = client.local_addr().unwrap();
        // A query for `a.` type A, answered with the question echoed.
        let mut query = vec![0, 7, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 0, 0, 1, 0, 1];
        let mut buf = [0u8; 512];
        let mut largest = 0;
        for i in 0..3 * MAX_IN_FLIGHT {
            query[0..2].copy_from_slice(&(i as u16).to_be_bytes());
            let job = Job {
                query: query.clone(),
                reply: Some(Reply::Udp {
                    socket: client.clone(),
                    peer,
                    local: None,
                    max_len: 512,
                }),
                received: Instant::now(),
            };
            f.start_query(job);
            let (len, from) = upstream.recv_from(&mut buf).unwrap();
            buf[2] |= 0x80;
            upstream.send_to(&buf[..len], from).unwrap();
            while f.pending.len() == 1 {
                f.drain_socket(0);
            }
            largest = largest.max(f.timers.len());
        }
        assert_eq!(
            f.stats.answered.load(Ordering::Relaxed),
            3 * MAX_IN_FLIGHT as u64
        );
        assert!(largest <= MAX_TIMERS, "{largest} timers held");
        assert!(f.timers.capacity() <= MAX_TIMERS + 1, "never grew");
    }
}
