//! The forwarder: relays the queries that are not ours to the upstreams and
//! sends their answers back to the clients.
//!
//! One forwarding thread owns a few non-blocking UDP sockets toward the
//! upstreams (random source ports), a table of queries in flight keyed by a
//! fresh random id, their deadlines, and each upstream's health. Serving
//! threads hand queries over with [`Forwarder::submit`]; answers go straight
//! back to the client through the [`Reply`] that came with the query.
//! Truncated answers are retried over TCP by a small worker pool
//! ([`tcp`]).
//!
//! Invariants:
//! - `submit` never blocks: a bounded channel and `try_send`; a dead or slow
//!   upstream can never delay a local answer.
//! - The client's bytes are relayed unchanged but for the id, which is
//!   restored in the answer.
//! - An upstream reply is accepted only from the address and socket the
//!   query went out on, with the query's id and question.
//! - Every query gets exactly one answer: the upstream's, or SERVFAIL within
//!   [`QUERY_BUDGET`].

mod health;
mod stats;
mod tcp;
pub(crate) mod wire;

use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use std::{cmp::Reverse, ops::Range};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError, bounded};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::config::Config;
use crate::dns::udp::{LocalAddr, send_from};
use health::Health;
pub use health::{DOWN_AFTER_FAILURES, PROBE_INTERVAL};
pub use stats::{ForwardStats, LATENCY_BUCKETS_SECS, UpstreamStats};
pub use tcp::{TCP_CONNECT_TIMEOUT, TCP_EXCHANGE_TIMEOUT, TCP_QUEUE_CAPACITY, TCP_WORKERS};

/// Queries waiting in the forwarder's inbox; beyond, `submit` says no.
pub const INBOX_CAPACITY: usize = 1024;
/// Queries waiting for an upstream at once; beyond, SERVFAIL.
pub const MAX_IN_FLIGHT: usize = 4096;
/// How long one upstream gets to answer before the next is tried.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(700);
/// How long a query may take in all before the client gets SERVFAIL: well
/// under the usual stub resolver retry timer (glibc `timeout:5`).
pub const QUERY_BUDGET: Duration = Duration::from_secs(2);
/// Upstreams tried for one query at most.
pub const MAX_ATTEMPTS: usize = 4;
/// UDP sockets (each with its own random source port) per address family.
pub const SOCKETS_PER_FAMILY: usize = 4;
/// Kernel receive buffer asked for each upstream socket.
pub const SOCKET_BUFFER_BYTES: usize = 1 << 20;
/// Largest DNS message.
const MAX_MESSAGE_LEN: usize = 65_535;
/// Readiness events handled per poll.
const EVENTS_CAPACITY: usize = 64;
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

/// A query handed over by a serving thread.
struct Job {
    query: Vec<u8>,
    reply: Reply,
    received: Instant,
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
    stats: Arc<ForwardStats>,
    /// `None` when there is no upstream: every query is refused at once.
    link: Option<Arc<Link>>,
}

impl Forwarder {
    /// Starts the forwarding thread and the TCP retry pool for
    /// `config.upstreams`. With no upstream, starts nothing and `submit`
    /// always returns false (the caller answers SERVFAIL at once).
    pub fn start(config: &Config, stats: Arc<ForwardStats>) -> io::Result<Forwarder> {
        let upstreams = stats.set_upstreams(&config.upstreams);
        if upstreams.is_empty() {
            log::warn!("no upstream resolver: names that are not ours get SERVFAIL");
            return Ok(Forwarder { stats, link: None });
        }
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        let mut sockets = Vec::new();
        let mut families = [0..0, 0..0];
        for (family, unspecified) in [
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ]
        .into_iter()
        .enumerate()
        {
            if !config
                .upstreams
                .iter()
                .any(|u| u.is_ipv4() == unspecified.is_ipv4())
            {
                continue;
            }
            let start = sockets.len();
            for _ in 0..SOCKETS_PER_FAMILY {
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
                    // over to the others.
                    Err(e) => {
                        log::warn!("no UDP socket toward {unspecified} upstreams: {e}");
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
        let mut forwarding = Forwarding {
            poll,
            sockets,
            families,
            healths: vec![Health::new(); upstreams.len()],
            upstreams,
            pending: HashMap::with_capacity_and_hasher(MAX_IN_FLIGHT, Default::default()),
            timers: BinaryHeap::with_capacity(MAX_IN_FLIGHT),
            next_seq: 0,
            recv_buf: vec![0; MAX_MESSAGE_LEN],
            probe: wire::probe_query(),
            scratch: Vec::with_capacity(MAX_MESSAGE_LEN),
            rx,
            tcp_tx,
            stats: stats.clone(),
            shared: shared.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("glued-forward".into())
            .spawn(move || forwarding.run());
        match handle {
            Ok(h) => threads.insert(0, h),
            Err(e) => {
                shared.stop();
                return Err(e);
            }
        }
        *shared.threads.lock().unwrap_or_else(|e| e.into_inner()) = threads;
        log::info!("forwarding to {:?}", config.upstreams);
        Ok(Forwarder {
            stats,
            link: Some(Arc::new(Link { tx, shared })),
        })
    }

    /// Hands a client's query over without blocking. Returns false when the
    /// forwarder is saturated, has no upstream, is stopped, or the query
    /// has not exactly one question (the caller answers SERVFAIL).
    pub fn submit(&self, query: &[u8], reply: Reply) -> bool {
        let accepted = match &self.link {
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
        };
        let counter = if accepted {
            &self.stats.submitted
        } else {
            &self.stats.rejected
        };
        counter.fetch_add(1, Ordering::Relaxed);
        accepted
    }

    /// Stops the forwarding thread and the TCP pool and joins them (queries
    /// in flight get SERVFAIL). Idempotent; any clone may call it.
    pub fn stop(&self) {
        let Some(link) = &self.link else {
            return;
        };
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
}

/// A non-blocking UDP socket on an ephemeral (kernel-randomised) port.
fn upstream_socket(unspecified: IpAddr) -> io::Result<mio::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let addr = SocketAddr::new(unspecified, 0);
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Dual-stack, so that an IPv4-mapped upstream address works too.
        let _ = socket.set_only_v6(false);
    }
    // A smaller buffer than asked for is not fatal.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(mio::net::UdpSocket::from_std(socket.into()))
}

/// Who waits for a query in flight.
enum Client {
    Reply(Reply),
    /// A health probe of a down upstream: nobody waits.
    Probe,
}

/// A query in flight, keyed by the id it carries upstream.
struct Pending {
    original_id: u16,
    /// The client's query with the forwarder's id.
    query: Vec<u8>,
    client: Client,
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
    sockets: Vec<mio::net::UdpSocket>,
    /// Socket index ranges for IPv4 and IPv6 upstreams.
    families: [Range<usize>; 2],
    /// Per upstream, in configuration order.
    upstreams: Vec<Arc<UpstreamStats>>,
    healths: Vec<Health>,
    pending: HashMap<u16, Pending, foldhash::fast::RandomState>,
    /// (deadline, id, timer generation), earliest first.
    timers: BinaryHeap<Reverse<(Instant, u16, u32)>>,
    next_seq: u32,
    recv_buf: Vec<u8>,
    /// `. NS` query sent to down upstreams, id set per probe.
    probe: Vec<u8>,
    scratch: Vec<u8>,
    rx: Receiver<Job>,
    tcp_tx: Sender<tcp::TcpJob>,
    stats: Arc<ForwardStats>,
    shared: Arc<Shared>,
}

impl Forwarding {
    fn run(&mut self) {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        // Sockets whose last drain stopped at its budget: read again on the
        // next turn (readiness is edge-triggered, no new event comes).
        let mut undrained: Vec<usize> = Vec::with_capacity(self.sockets.len());
        loop {
            let now = Instant::now();
            self.fire_timers(now);
            self.send_probes(now);
            let timeout = self
                .next_deadline()
                .map(|d| d.saturating_duration_since(now));
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
                if event.token() != WAKER && !undrained.contains(&index) {
                    undrained.push(index);
                }
            }
            undrained.retain(|&index| self.drain_socket(index));
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
        let timer = self.timers.peek().map(|Reverse((at, _, _))| *at);
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

    /// A free random id for a new query in flight.
    fn fresh_id(&self) -> u16 {
        loop {
            let id = fastrand::u16(..);
            if !self.pending.contains_key(&id) {
                return id;
            }
        }
    }

    fn start_query(&mut self, job: Job) {
        let now = Instant::now();
        let Some(original_id) = wire::id(&job.query) else {
            return;
        };
        if self.pending.len() >= MAX_IN_FLIGHT {
            log::debug!("{MAX_IN_FLIGHT} queries in flight: SERVFAIL");
            self.answer_servfail(&job.query, &job.reply);
            return;
        }
        let id = self.fresh_id();
        let mut query = job.query;
        wire::set_id(&mut query, id);
        self.insert(
            id,
            original_id,
            query,
            Client::Reply(job.reply),
            job.received,
        );
        self.next_attempt(id, now);
    }

    fn insert(
        &mut self,
        id: u16,
        original_id: u16,
        query: Vec<u8>,
        client: Client,
        received: Instant,
    ) {
        self.pending.insert(
            id,
            Pending {
                original_id,
                query,
                client,
                received,
                tried: [0; MAX_ATTEMPTS],
                sockets: [0; MAX_ATTEMPTS],
                n_attempts: 0,
                timer_seq: 0,
            },
        );
        self.update_in_flight();
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

    /// One attempt of query `id` to `upstream`, with its timer. False when
    /// the send failed (counted as a failure of that upstream).
    fn send(&mut self, id: u16, upstream: usize, now: Instant) -> bool {
        let addr = self.upstreams[upstream].addr;
        let family = &self.families[usize::from(addr.is_ipv6())];
        // No socket for this family (it could not be opened): the attempt is
        // recorded and fails below.
        let socket = if family.is_empty() {
            usize::from(u16::MAX)
        } else {
            family.start + fastrand::usize(..family.len())
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
                self.timers.push(Reverse((deadline, id, seq)));
                true
            }
            Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                // Socket buffer full: let the timer decide.
                self.timers.push(Reverse((deadline, id, seq)));
                true
            }
            other => {
                log::debug!("sending to upstream {addr} failed: {other:?}");
                self.on_failure(upstream, now);
                false
            }
        }
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
            let (upstream, probe) = (p.current_upstream(), matches!(p.client, Client::Probe));
            if let Some(u) = upstream {
                self.upstreams[u].timeouts.fetch_add(1, Ordering::Relaxed);
                self.on_failure(u, now);
            }
            if probe {
                self.pending.remove(&id);
                self.update_in_flight();
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
            self.insert(id, id, probe, Client::Probe, now);
            log::debug!("probing upstream {}", self.upstreams[upstream].addr);
            if !self.send(id, upstream, now) {
                self.pending.remove(&id);
                self.update_in_flight();
            }
        }
    }

    fn on_failure(&mut self, upstream: usize, now: Instant) {
        if self.healths[upstream].on_failure(now) {
            let u = &self.upstreams[upstream];
            u.up.store(false, Ordering::Relaxed);
            log::warn!(
                "upstream {} is down after {DOWN_AFTER_FAILURES} failures in a row; probing it every {}s",
                u.addr,
                PROBE_INTERVAL.as_secs()
            );
        }
    }

    fn on_success(&mut self, upstream: usize) {
        if self.healths[upstream].on_success() {
            let u = &self.upstreams[upstream];
            u.up.store(true, Ordering::Relaxed);
            log::info!("upstream {} is back up", u.addr);
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

    fn on_reply(&mut self, msg: &mut [u8], from: SocketAddr, socket: usize) {
        let now = Instant::now();
        let matched = wire::id(msg)
            .filter(|_| wire::is_response(msg))
            .and_then(|id| {
                let p = self.pending.get(&id)?;
                let upstream = p.attempt_from(&self.upstreams, from, socket)?;
                wire::same_question(&p.query, msg).then_some((id, upstream))
            });
        let Some((id, upstream)) = matched else {
            self.stats.unmatched_replies.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let rcode = wire::rcode(msg);
        if rcode == wire::RCODE_SERVFAIL || rcode == wire::RCODE_REFUSED {
            self.upstreams[upstream]
                .failures
                .fetch_add(1, Ordering::Relaxed);
            self.on_failure(upstream, now);
            let Some(p) = self.pending.get(&id) else {
                return;
            };
            if matches!(p.client, Client::Probe) {
                self.pending.remove(&id);
                self.update_in_flight();
            } else if p.current_upstream() == Some(upstream) {
                self.next_attempt(id, now);
            }
            // A late failure from an earlier upstream changes nothing.
            return;
        }
        self.upstreams[upstream]
            .answers
            .fetch_add(1, Ordering::Relaxed);
        self.on_success(upstream);
        let Some(p) = self.pending.remove(&id) else {
            return;
        };
        self.update_in_flight();
        let Client::Reply(reply) = p.client else {
            return;
        };
        if wire::is_truncated(msg) {
            let job = tcp::TcpJob {
                upstream: self.upstreams[upstream].clone(),
                query: p.query,
                original_id: p.original_id,
                reply,
                truncated: msg.to_vec(),
                received: p.received,
            };
            if let Some(job) = tcp::try_submit(&self.tcp_tx, job) {
                log::debug!("TCP retry pool saturated: passing TC=1 on");
                self.relay(msg, p.original_id, p.received, &job.reply);
            }
        } else {
            self.relay(msg, p.original_id, p.received, &reply);
        }
    }

    /// Sends an upstream answer to its client with the client's id.
    fn relay(&mut self, msg: &mut [u8], original_id: u16, received: Instant, reply: &Reply) {
        wire::set_id(msg, original_id);
        // Counted first: whoever sees the answer sees the count.
        self.stats.answered.fetch_add(1, Ordering::Relaxed);
        self.stats.observe_latency(received.elapsed());
        reply.deliver(msg, &mut self.scratch);
    }

    /// Answers query `id` SERVFAIL and forgets it.
    fn fail(&mut self, id: u16) {
        let Some(mut p) = self.pending.remove(&id) else {
            return;
        };
        self.update_in_flight();
        if let Client::Reply(reply) = &p.client {
            wire::set_id(&mut p.query, p.original_id);
            self.answer_servfail(&p.query, reply);
        }
    }

    /// Sends SERVFAIL for `query` (carrying the client's id) to `reply`.
    fn answer_servfail(&mut self, query: &[u8], reply: &Reply) {
        let mut out = std::mem::take(&mut self.scratch);
        if wire::servfail(query, &mut out) {
            // Counted first: whoever sees the answer sees the count.
            self.stats.servfail.fetch_add(1, Ordering::Relaxed);
            let mut unused = Vec::new();
            reply.deliver(&out, &mut unused);
        }
        self.scratch = out;
    }

    /// Answers every query still in flight SERVFAIL.
    fn shutdown(&mut self) {
        while let Ok(job) = self.rx.try_recv() {
            self.answer_servfail(&job.query, &job.reply);
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
        Forwarding {
            poll,
            sockets: vec![socket],
            families: [0..1, 0..0],
            healths: vec![Health::new()],
            upstreams,
            pending: HashMap::default(),
            timers: BinaryHeap::new(),
            next_seq: 0,
            recv_buf: vec![0; MAX_MESSAGE_LEN],
            probe: wire::probe_query(),
            scratch: Vec::new(),
            rx,
            tcp_tx,
            stats,
            shared: Arc::new(Shared {
                stopping: Arc::new(AtomicBool::new(false)),
                asleep: AtomicBool::new(false),
                waker,
                threads: Mutex::new(Vec::new()),
            }),
        }
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
}
