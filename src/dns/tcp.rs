//! The TCP serving loop (RFC 7766): one thread, non-blocking sockets and a
//! `mio` event loop. Each message is framed by a 2-byte length; several
//! queries per connection are answered in order (forwarded ones whenever
//! the upstream replies).
//!
//! Invariants: no socket operation blocks; a client outside the access
//! list is closed at accept and never holds a slot; at most
//! [`TcpLimits::per_client`] connections per client address; at most
//! [`TcpLimits::max_connections`] connections are open (when full, the
//! oldest idle connection is closed to make room, or the new one when none
//! is idle); a connection that completes no query and
//! receives no answer for [`TcpLimits::idle_timeout`] is closed, so a
//! client sending half a frame, or nothing, cannot hold a slot; a
//! connection's unsent answers are bounded by [`MAX_UNSENT_BYTES`] (it is
//! not read while over), and one busy client cannot starve the others
//! ([`MAX_FRAMES_PER_TURN`]).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, bounded};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::table::SharedTable;

use super::acl::LiveAcl;
use super::answer::{self, Context, MAX_MESSAGE_LEN, Outcome, Transport};
use super::cache::{CacheReader, Lookup};
use super::forward::{Forwarder, Reply};
use super::stats::Counters;
use super::wire::RCODE_SERVFAIL;

/// Default idle timeout of a TCP connection (RFC 7766 §6.2.3 suggests
/// seconds, not minutes).
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap on open TCP connections.
pub const TCP_MAX_CONNECTIONS: usize = 256;
/// Default cap on open TCP connections from one client address (a quarter
/// of the table: one address cannot fill it).
pub const TCP_PER_CLIENT: usize = 64;
/// Backlog of the listening socket.
pub const LISTEN_BACKLOG: i32 = 1024;
/// Unsent answer bytes above which a connection is not read any more.
pub const MAX_UNSENT_BYTES: usize = 256 * 1024;
/// Queries of one connection handed to the forwarder and not answered yet;
/// beyond this the query is answered SERVFAIL.
pub const MAX_PENDING_FORWARDS: usize = 32;
/// Frames handled for one connection before the loop turns to the others.
pub const MAX_FRAMES_PER_TURN: usize = 64;
/// Poll interval: the resolution of the idle timeout. Forwarded answers do
/// not wait for it: the forwarder wakes the loop ([`Reply::TcpWake`]).
pub const IDLE_POLL: Duration = Duration::from_millis(100);
/// Connections accepted (or accepted and closed over the cap) per loop turn,
/// so a connection flood cannot keep the loop from serving the others.
pub const MAX_ACCEPTS_PER_TURN: usize = 64;
/// Retry interval after `accept` failed (e.g. out of file descriptors).
pub const ACCEPT_RETRY: Duration = Duration::from_millis(20);
/// Read buffer handed to `read` (a full frame plus its prefix).
const READ_CHUNK: usize = MAX_MESSAGE_LEN + 2;

const LISTENER: Token = Token(0);
pub(crate) const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;

/// Limits of the TCP loop (tests shorten the timeout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpLimits {
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub per_client: usize,
}

impl Default for TcpLimits {
    fn default() -> TcpLimits {
        TcpLimits {
            idle_timeout: TCP_IDLE_TIMEOUT,
            max_connections: TCP_MAX_CONNECTIONS,
            per_client: TCP_PER_CLIENT,
        }
    }
}

/// Binds the non-blocking listening socket.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    bind_with(addr, false)
}

/// [`bind`]; with `freebind` the address need not be up yet
/// ([`super::set_freebind`]).
pub fn bind_with(addr: SocketAddr, freebind: bool) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if freebind {
        super::set_freebind(&socket, addr)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    // Accepted connections inherit it: answers leave at once, not after
    // Nagle's delay.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

struct Conn {
    stream: TcpStream,
    /// The client's address (IPv4-mapped addresses as IPv4).
    peer: IpAddr,
    /// The address the client connected to (`ns.<domain>.`).
    local: IpAddr,
    /// Received bytes; `rpos` is where the next frame starts.
    rbuf: Vec<u8>,
    rpos: usize,
    /// Framed answers; `wpos` is how much is already written.
    wbuf: Vec<u8>,
    wpos: usize,
    last_active: Instant,
    read_closed: bool,
    pending: usize,
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
}

enum Drive {
    /// Wait for the next readiness event.
    Wait,
    /// More to do: come back on the next turn.
    Again,
    Close,
}

/// Everything the loop owns besides the connections.
struct Ctx {
    table: SharedTable,
    forwarder: Forwarder,
    /// The forwarder's cache: hits are answered here.
    cache: Option<CacheReader>,
    counters: Arc<Counters>,
    /// Checked once per accepted connection.
    acl: LiveAcl,
    limits: TcpLimits,
    /// Handed to the forwarder with each forwarded query: it wakes this
    /// loop when the answer is queued.
    waker: Arc<Waker>,
    rotation: usize,
    /// Forwarding is configured (RA).
    recursion: bool,
    scratch: Box<[u8]>,
    answer: Vec<u8>,
}

/// The TCP serving thread's loop; returns when `stop` is set and the
/// waker fires.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    mut poll: Poll,
    waker: Arc<Waker>,
    mut listener: TcpListener,
    stop: Arc<AtomicBool>,
    table: SharedTable,
    forwarder: Forwarder,
    counters: Arc<Counters>,
    acl: LiveAcl,
    limits: TcpLimits,
) {
    if let Err(e) = poll
        .registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
    {
        log::error!("DNS TCP: cannot register the listener: {e}");
        return;
    }
    let mut ctx = Ctx {
        recursion: forwarder.forwards(),
        table,
        cache: forwarder.cache().map(|c| c.reader()),
        forwarder,
        counters,
        acl,
        limits,
        waker,
        rotation: 0,
        scratch: vec![0; READ_CHUNK].into_boxed_slice(),
        answer: Vec::with_capacity(MAX_MESSAGE_LEN),
    };
    let mut conns = Conns::default();
    let mut again: Vec<usize> = Vec::new();
    let mut ready: Vec<usize> = Vec::new();
    let mut accept_retry = false;
    // The last turn stopped accepting at MAX_ACCEPTS_PER_TURN: more may
    // wait, and mio's edge-triggered readiness will not say so again.
    let mut accept_more = false;
    let mut events = Events::with_capacity(1024);
    let mut last_sweep = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        ctx.counters.heartbeat.beat();
        let pending = conns.slots.iter().flatten().any(|c| c.pending > 0);
        let timeout = if !again.is_empty() || accept_more {
            Duration::ZERO
        } else if accept_retry {
            ACCEPT_RETRY
        } else {
            IDLE_POLL
        };
        if let Err(e) = poll.poll(&mut events, Some(timeout))
            && e.kind() != io::ErrorKind::Interrupted
        {
            log::error!("DNS TCP: poll failed: {e}");
            return;
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        // A reload may start or stop forwarding (RA): one load per turn,
        // after the wait.
        ctx.recursion = ctx.forwarder.forwards();
        ready.clear();
        ready.append(&mut again);
        if accept_retry || accept_more || events.iter().any(|e| e.token() == LISTENER) {
            accept_retry = false;
            accept_more = false;
            for n_accepted in 0.. {
                if n_accepted == MAX_ACCEPTS_PER_TURN {
                    accept_more = true;
                    break;
                }
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        let peer = peer.ip().to_canonical();
                        if !ctx.acl.load().allows(peer) {
                            ctx.counters.acl_refused();
                            drop(stream);
                            continue;
                        }
                        if conns.of_client(peer) >= ctx.limits.per_client {
                            ctx.counters.tcp_rejected();
                            drop(stream);
                            continue;
                        }
                        if conns.n_open >= ctx.limits.max_connections {
                            let Some(slot) = conns.oldest_idle() else {
                                ctx.counters.tcp_rejected();
                                drop(stream);
                                continue;
                            };
                            ctx.counters.tcp_evicted();
                            conns.close(&poll, slot);
                            again.retain(|&s| s != slot);
                        }
                        // The listener's TCP_NODELAY is inherited; set it
                        // again where it is not.
                        let _ = stream.set_nodelay(true);
                        let slot = conns.free.pop().unwrap_or_else(|| {
                            conns.slots.push(None);
                            conns.slots.len() - 1
                        });
                        if poll
                            .registry()
                            .register(
                                &mut stream,
                                Token(slot + FIRST_CONN),
                                Interest::READABLE | Interest::WRITABLE,
                            )
                            .is_err()
                        {
                            conns.free.push(slot);
                            continue;
                        }
                        let (tx, rx) = bounded(MAX_PENDING_FORWARDS);
                        let local = stream
                            .local_addr()
                            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
                        conns.open(
                            slot,
                            Conn {
                                stream,
                                peer,
                                local,
                                rbuf: Vec::new(),
                                rpos: 0,
                                wbuf: Vec::new(),
                                wpos: 0,
                                last_active: Instant::now(),
                                read_closed: false,
                                pending: 0,
                                tx,
                                rx,
                            },
                        );
                        ctx.counters.tcp_accepted();
                        ready.push(slot);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        log::debug!("DNS TCP: accept failed: {e}");
                        accept_retry = true;
                        break;
                    }
                }
            }
        }
        for e in events.iter() {
            if e.token().0 >= FIRST_CONN {
                ready.push(e.token().0 - FIRST_CONN);
            }
        }
        if pending {
            for (slot, c) in conns.slots.iter_mut().enumerate() {
                if let Some(c) = c
                    && c.pending > 0
                    && collect_forwarded(c)
                {
                    ready.push(slot);
                }
            }
        }
        ready.sort_unstable();
        ready.dedup();
        for &slot in &ready {
            let Some(Some(conn)) = conns.slots.get_mut(slot) else {
                continue;
            };
            match drive(&mut ctx, conn) {
                Drive::Wait => {}
                Drive::Again => again.push(slot),
                Drive::Close => conns.close(&poll, slot),
            }
        }
        let now = Instant::now();
        if now.duration_since(last_sweep) >= IDLE_POLL {
            last_sweep = now;
            for slot in 0..conns.slots.len() {
                if let Some(c) = &conns.slots[slot]
                    && now.duration_since(c.last_active) >= ctx.limits.idle_timeout
                {
                    ctx.counters.tcp_idle_closed();
                    conns.close(&poll, slot);
                    again.retain(|&s| s != slot);
                }
            }
        }
        ctx.counters.set_tcp_open(conns.n_open);
    }
    ctx.counters.set_tcp_open(0);
}

/// The open connections: slots (a slot's index is its token), the free
/// slots, and the count per client address.
#[derive(Default)]
struct Conns {
    slots: Vec<Option<Conn>>,
    free: Vec<usize>,
    n_open: usize,
    per_client: HashMap<IpAddr, usize>,
}

impl Conns {
    fn of_client(&self, ip: IpAddr) -> usize {
        self.per_client.get(&ip).copied().unwrap_or(0)
    }

    fn open(&mut self, slot: usize, conn: Conn) {
        *self.per_client.entry(conn.peer).or_insert(0) += 1;
        self.slots[slot] = Some(conn);
        self.n_open += 1;
    }

    fn close(&mut self, poll: &Poll, slot: usize) {
        let Some(mut c) = self.slots.get_mut(slot).and_then(Option::take) else {
            return;
        };
        let _ = poll.registry().deregister(&mut c.stream);
        self.free.push(slot);
        self.n_open -= 1;
        if let Some(n) = self.per_client.get_mut(&c.peer) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&c.peer);
            }
        }
    }

    /// The connection that has been idle longest: nothing unsent, no
    /// forwarded query outstanding.
    fn oldest_idle(&self) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(slot, c)| Some((slot, c.as_ref()?)))
            .filter(|(_, c)| c.pending == 0 && c.wpos == c.wbuf.len())
            .min_by_key(|(_, c)| c.last_active)
            .map(|(slot, _)| slot)
    }
}

/// Moves the forwarder's answers into the write buffer; true if any.
fn collect_forwarded(c: &mut Conn) -> bool {
    let mut got = false;
    loop {
        match c.rx.try_recv() {
            Ok(msg) => {
                c.pending = c.pending.saturating_sub(1);
                if msg.len() <= MAX_MESSAGE_LEN {
                    c.wbuf.extend_from_slice(&(msg.len() as u16).to_be_bytes());
                    c.wbuf.extend_from_slice(&msg);
                    c.last_active = Instant::now();
                }
                got = true;
            }
            Err(TryRecvError::Empty) => return got,
            Err(TryRecvError::Disconnected) => {
                c.pending = 0;
                return got;
            }
        }
    }
}

/// Writes what is unsent, answers complete frames, reads what arrived,
/// until the socket would block.
fn drive(ctx: &mut Ctx, c: &mut Conn) -> Drive {
    let mut frames = 0;
    loop {
        while c.wpos < c.wbuf.len() {
            match c.stream.write(&c.wbuf[c.wpos..]) {
                Ok(0) => return Drive::Close,
                Ok(n) => {
                    c.wpos += n;
                    c.last_active = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Drive::Close,
            }
        }
        if c.wpos == c.wbuf.len() {
            c.wbuf.clear();
            c.wpos = 0;
        }
        if c.wbuf.len() - c.wpos >= MAX_UNSENT_BYTES {
            // Resume on the next writable event.
            return Drive::Wait;
        }
        // Answer every complete frame.
        let mut answered = false;
        while c.rbuf.len() - c.rpos >= 2 {
            let len = u16::from_be_bytes([c.rbuf[c.rpos], c.rbuf[c.rpos + 1]]) as usize;
            if len == 0 {
                return Drive::Close;
            }
            if c.rbuf.len() - c.rpos < 2 + len {
                break;
            }
            if frames == MAX_FRAMES_PER_TURN {
                return Drive::Again;
            }
            let start = c.rpos + 2;
            handle_frame(ctx, c, start, len);
            c.rpos = start + len;
            c.last_active = Instant::now();
            frames += 1;
            answered = true;
            if c.wbuf.len() - c.wpos >= MAX_UNSENT_BYTES {
                break;
            }
        }
        if c.rpos == c.rbuf.len() {
            c.rbuf.clear();
            c.rpos = 0;
        } else if c.rpos > 0 && answered {
            c.rbuf.drain(..c.rpos);
            c.rpos = 0;
        }
        if answered {
            continue;
        }
        if c.read_closed {
            return if c.wpos == c.wbuf.len() && c.pending == 0 {
                Drive::Close
            } else {
                Drive::Wait
            };
        }
        match c.stream.read(&mut ctx.scratch) {
            Ok(0) => c.read_closed = true,
            Ok(n) => c.rbuf.extend_from_slice(&ctx.scratch[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Drive::Wait,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Drive::Close,
        }
    }
}

/// Answers the frame at `rbuf[start..start + len]` into the write buffer,
/// or hands it to the forwarder.
fn handle_frame(ctx: &mut Ctx, c: &mut Conn, start: usize, len: usize) {
    let query = &c.rbuf[start..start + len];
    let out = &mut ctx.answer;
    let outcome = {
        let table = ctx.table.load();
        ctx.rotation = ctx.rotation.wrapping_add(1);
        let context = Context {
            transport: Transport::Tcp,
            local: c.local,
            rotation: ctx.rotation,
            recursion: ctx.recursion,
        };
        match answer::answer(query, &table, &context, out) {
            Outcome::Forward { qtype, .. } => {
                if let Some(cache) = &ctx.cache
                    && let Lookup::Hit { refresh, .. } =
                        cache.answer(query, Transport::Tcp, Instant::now(), out)
                {
                    ctx.counters.query(qtype);
                    if refresh {
                        ctx.forwarder.refresh(query);
                    }
                    c.wbuf.extend_from_slice(&(out.len() as u16).to_be_bytes());
                    c.wbuf.extend_from_slice(out);
                    return;
                }
                if c.pending < MAX_PENDING_FORWARDS
                    && ctx.forwarder.submit(
                        query,
                        Reply::TcpWake {
                            tx: c.tx.clone(),
                            waker: ctx.waker.clone(),
                        },
                    )
                {
                    ctx.counters.query(qtype);
                    ctx.counters.forwarded();
                    c.pending += 1;
                    return;
                }
                ctx.counters.forward_rejected();
                answer::error_reply(query, RCODE_SERVFAIL, ctx.recursion, out)
            }
            outcome => outcome,
        }
    };
    match outcome {
        Outcome::Answered {
            rcode,
            qtype,
            truncated,
        } => {
            if let Some(q) = qtype {
                ctx.counters.query(q);
            }
            ctx.counters.local(rcode, truncated);
            c.wbuf.extend_from_slice(&(out.len() as u16).to_be_bytes());
            c.wbuf.extend_from_slice(out);
        }
        Outcome::Forward { .. } | Outcome::Drop => ctx.counters.dropped(),
    }
}
