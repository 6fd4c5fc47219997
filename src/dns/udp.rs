//! The UDP serving loop: one [`UdpWorker`] per thread, each on its own
//! `SO_REUSEPORT` socket, receiving and sending up to [`BATCH`] datagrams
//! per system call (`recvmmsg`/`sendmmsg`).
//!
//! Invariants: after the first batch a local answer (or a cache hit)
//! allocates nothing (all buffers belong to the worker and are reused); no
//! system call but the one `recvmmsg` and the `sendmmsg` of a batch; one
//! `table.load()` per batch (held for microseconds: an old table's copied
//! shards are freed when its last reader lets go); the access check runs before anything else that
//! costs; forwarded queries are handed over without blocking and the
//! forwarder replies on the same socket.
//!
//! The `msghdr`s point into the worker's own boxed buffers once, at
//! construction (boxed slices do not move when the worker does); a batch
//! only resets what the kernel wrote into the slots the last batch used.
//!
//! On a wildcard bind (`0.0.0.0`, `[::]`) the kernel tells each datagram's
//! destination address (`IP_PKTINFO` / `IPV6_RECVPKTINFO`, in the
//! `recvmmsg` control buffers) and every reply leaves from that address
//! (the same control message on `sendmmsg`, or [`send_from`] for answers
//! sent from other threads): clients on connected sockets drop a reply from
//! any other address.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::table::{SharedTable, Table};

use super::acl::{Acl, LiveAcl};
use super::answer::{self, Context, Outcome, Transport, UDP_PAYLOAD_ADVERTISED};
use super::cache::{CacheReader, Lookup};
use super::forward::{Forwarder, Reply};
use super::stats::Counters;
use super::wire::{RCODE_REFUSED, RCODE_SERVFAIL};

/// Datagrams per `recvmmsg`/`sendmmsg` call.
pub const BATCH: usize = 64;
/// Receive buffer per datagram; larger queries are dropped (a DNS query
/// worth answering is far smaller).
pub const RECV_BUF_LEN: usize = 4096;
/// Send buffer per datagram: a local UDP answer never exceeds the size we
/// advertise (1232); the margin is for the question of error replies.
pub const SEND_BUF_LEN: usize = UDP_PAYLOAD_ADVERTISED as usize + 512;
/// How long a serving thread blocks in `recvmmsg` before it looks at the
/// stop flag.
pub const READ_TIMEOUT: Duration = Duration::from_millis(100);
/// `SO_RCVBUF` asked for each socket (the kernel caps it at rmem_max).
pub const SOCKET_RECV_BUFFER_BYTES: usize = 4 << 20;
/// Control-message room per datagram: one `in6_pktinfo` with its header
/// takes 40 bytes (`CMSG_SPACE(20)`), an `in_pktinfo` 32.
pub const CONTROL_LEN: usize = 64;

/// Binds one UDP serving socket with `SO_REUSEPORT`, so every serving
/// thread can bind its own socket to the same address. On a wildcard
/// address the socket also reports each datagram's destination
/// ([`LocalAddr`]).
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    bind_with(addr, false)
}

/// [`bind`]; with `freebind` the address need not be up yet
/// ([`super::set_freebind`]).
pub fn bind_with(addr: SocketAddr, freebind: bool) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if freebind {
        super::set_freebind(&socket, addr)?;
    }
    socket.set_reuse_port(true)?;
    let _ = socket.set_recv_buffer_size(SOCKET_RECV_BUFFER_BYTES);
    socket.set_read_timeout(Some(READ_TIMEOUT))?;
    if addr.ip().is_unspecified() {
        let (level, option) = match addr {
            SocketAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_PKTINFO),
            SocketAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO),
        };
        let on: libc::c_int = 1;
        // SAFETY: a valid socket, option and `c_int` value of the right size.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                level,
                option,
                (&on as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The address a datagram was sent to and the interface it arrived on
/// (from `IP_PKTINFO` / `IPV6_PKTINFO`): where its reply must leave from.
/// On a dual-stack `[::]` socket an IPv4 destination is IPv4-mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalAddr {
    pub ip: IpAddr,
    pub ifindex: u32,
}

/// A control-message buffer, aligned for `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Control([u8; CONTROL_LEN]);

const ZERO_CONTROL: Control = Control([0; CONTROL_LEN]);

/// The destination of a received datagram, from the control messages
/// `recvmmsg` wrote into `hdr`.
fn read_pktinfo(hdr: &libc::msghdr) -> Option<LocalAddr> {
    if hdr.msg_control.is_null() {
        return None;
    }
    // SAFETY: `hdr` describes a control buffer the kernel filled; the CMSG
    // macros stay within `msg_controllen`, and the data is read unaligned.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let info = std::ptr::read_unaligned(data as *const libc::in_pktinfo);
                    return Some(LocalAddr {
                        ip: IpAddr::V4(Ipv4Addr::from(u32::from_be(info.ipi_spec_dst.s_addr))),
                        ifindex: info.ipi_ifindex as u32,
                    });
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let info = std::ptr::read_unaligned(data as *const libc::in6_pktinfo);
                    return Some(LocalAddr {
                        ip: IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)),
                        ifindex: info.ipi6_ifindex,
                    });
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(hdr, c);
        }
    }
    None
}

/// Writes the control message that makes a datagram leave from `local`
/// into `control`; returns its length (`msg_controllen`).
fn write_pktinfo(control: &mut Control, local: LocalAddr) -> usize {
    // SAFETY: all-zero is a valid msghdr; it only frames `control`.
    let mut hdr: libc::msghdr = unsafe { zeroed() };
    hdr.msg_control = control.0.as_mut_ptr().cast();
    hdr.msg_controllen = CONTROL_LEN as _;
    // SAFETY: `control` is aligned and large enough for one pktinfo
    // message (CONTROL_LEN ≥ CMSG_SPACE of either); data written unaligned.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&hdr);
        match local.ip {
            IpAddr::V4(ip) => {
                let len = size_of::<libc::in_pktinfo>() as libc::c_uint;
                (*c).cmsg_level = libc::IPPROTO_IP;
                (*c).cmsg_type = libc::IP_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(len) as _;
                // The route picks the interface; only the source is fixed.
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(ip).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut libc::in_pktinfo, info);
                libc::CMSG_SPACE(len) as usize
            }
            IpAddr::V6(ip) => {
                let len = size_of::<libc::in6_pktinfo>() as libc::c_uint;
                (*c).cmsg_level = libc::IPPROTO_IPV6;
                (*c).cmsg_type = libc::IPV6_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(len) as _;
                // The interface matters for link-local sources only; an
                // IPv4-mapped source goes out as IPv4 and is routed.
                let ifindex = if ip.to_ipv4_mapped().is_some() {
                    0
                } else {
                    local.ifindex
                };
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: ip.octets(),
                    },
                    ipi6_ifindex: ifindex,
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut libc::in6_pktinfo, info);
                libc::CMSG_SPACE(len) as usize
            }
        }
    }
}

/// `peer` as a C socket address; returns its length.
fn write_sockaddr(peer: SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match peer {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any
            // socket address.
            let sin = unsafe { &mut *(out as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above.
            let sin6 = unsafe { &mut *(out as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Sends one datagram to `peer` from `local` (the address the client's
/// query was sent to; `None` on a socket bound to one address). Never
/// blocks (a full socket buffer drops the datagram) and never allocates:
/// the forwarder and cache hits send replies this way.
pub fn send_from(
    socket: &UdpSocket,
    bytes: &[u8],
    peer: SocketAddr,
    local: Option<LocalAddr>,
) -> io::Result<usize> {
    // SAFETY: all-zero is a valid value of these C structs.
    let mut name: libc::sockaddr_storage = unsafe { zeroed() };
    let mut hdr: libc::msghdr = unsafe { zeroed() };
    let mut control = ZERO_CONTROL;
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    hdr.msg_namelen = write_sockaddr(peer, &mut name);
    hdr.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    if let Some(local) = local {
        hdr.msg_controllen = write_pktinfo(&mut control, local) as _;
        hdr.msg_control = control.0.as_mut_ptr().cast();
    }
    // SAFETY: `hdr` points at locals that outlive the call, with their
    // true lengths.
    let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &hdr, libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Length of a `sockaddr_storage`, what `recvmmsg` may write per peer.
const NAME_LEN: libc::socklen_t = size_of::<libc::sockaddr_storage>() as libc::socklen_t;

/// One serving thread's socket and buffers.
pub struct UdpWorker {
    socket: Arc<UdpSocket>,
    table: SharedTable,
    forwarder: Forwarder,
    /// The forwarder's cache: hits are answered in the batch.
    cache: Option<CacheReader>,
    counters: Arc<Counters>,
    /// The access list a reload may replace, and this thread's snapshot of
    /// it, refreshed at the start of each batch.
    live_acl: LiveAcl,
    acl: Arc<Acl>,
    /// What [`answer::answer`] is told besides the query; `local` is the
    /// bound address, replaced per datagram on a wildcard bind.
    context: Context,
    /// The socket is bound to a wildcard address: each datagram's
    /// destination comes in a control message, and its reply leaves from
    /// it.
    pktinfo: bool,
    /// The last IPv4 client checked against `acl`, and the decision.
    last_v4: Option<(u32, bool)>,
    /// Receive slots the last batch filled (their headers need a reset).
    used: usize,
    /// [`BATCH`] receive slots of [`RECV_BUF_LEN`] bytes.
    recv: Box<[u8]>,
    /// One answer buffer per slot.
    out: Box<[Vec<u8>]>,
    names: Box<[libc::sockaddr_storage]>,
    /// Read only by the kernel, through `recv_hdrs`.
    #[allow(dead_code)]
    recv_iov: Box<[libc::iovec]>,
    /// Slot `i` receives into `recv_iov[i]` (slot `i` of `recv`) and
    /// `names[i]`.
    recv_hdrs: Box<[libc::mmsghdr]>,
    /// Per receive slot (with `pktinfo`): the control messages the kernel
    /// wrote, read only through `recv_hdrs`.
    #[allow(dead_code)]
    recv_control: Box<[Control]>,
    /// The destination of the datagram in slot `i` (with `pktinfo`).
    locals: Box<[Option<LocalAddr>]>,
    send_iov: Box<[libc::iovec]>,
    /// Answer `k` of a batch leaves from the address in `send_control[k]`.
    send_control: Box<[Control]>,
    /// Answer `k` of a batch is sent from `send_iov[k]`.
    send_hdrs: Box<[libc::mmsghdr]>,
}

impl UdpWorker {
    /// Allocates every buffer the worker will ever use.
    pub fn new(
        socket: Arc<UdpSocket>,
        table: SharedTable,
        forwarder: Forwarder,
        counters: Arc<Counters>,
        acl: impl Into<LiveAcl>,
    ) -> UdpWorker {
        let live_acl = acl.into();
        let acl = Arc::clone(&live_acl.load());
        // SAFETY: these are plain C structs for which all-zero is valid.
        let zero_iov = || unsafe { zeroed::<libc::iovec>() };
        let zero_hdr = || unsafe { zeroed::<libc::mmsghdr>() };
        let mut recv = vec![0; BATCH * RECV_BUF_LEN].into_boxed_slice();
        let mut names: Box<[libc::sockaddr_storage]> = (0..BATCH)
            .map(|_| unsafe { zeroed::<libc::sockaddr_storage>() })
            .collect();
        let mut recv_iov: Box<[libc::iovec]> = (0..BATCH).map(|_| zero_iov()).collect();
        let mut recv_hdrs: Box<[libc::mmsghdr]> = (0..BATCH).map(|_| zero_hdr()).collect();
        let mut send_iov: Box<[libc::iovec]> = (0..BATCH).map(|_| zero_iov()).collect();
        let mut send_hdrs: Box<[libc::mmsghdr]> = (0..BATCH).map(|_| zero_hdr()).collect();
        let mut recv_control: Box<[Control]> = (0..BATCH).map(|_| ZERO_CONTROL).collect();
        let bound = socket
            .local_addr()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
        let pktinfo = bound.is_unspecified();
        let context = Context {
            transport: Transport::Udp,
            local: bound,
            rotation: 0,
            recursion: forwarder.forwards(),
        };
        for (i, slot) in recv.chunks_exact_mut(RECV_BUF_LEN).enumerate() {
            recv_iov[i] = libc::iovec {
                iov_base: slot.as_mut_ptr().cast(),
                iov_len: RECV_BUF_LEN,
            };
            let h = &mut recv_hdrs[i].msg_hdr;
            h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = NAME_LEN;
            h.msg_iov = &mut recv_iov[i];
            h.msg_iovlen = 1;
            if pktinfo {
                h.msg_control = recv_control[i].0.as_mut_ptr().cast();
                h.msg_controllen = CONTROL_LEN as _;
            }
            send_hdrs[i].msg_hdr.msg_iov = &mut send_iov[i];
            send_hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        UdpWorker {
            socket,
            table,
            cache: forwarder.cache().map(|c| c.reader()),
            forwarder,
            counters,
            live_acl,
            acl,
            context,
            pktinfo,
            last_v4: None,
            used: 0,
            recv,
            out: (0..BATCH)
                .map(|_| Vec::with_capacity(SEND_BUF_LEN))
                .collect(),
            names,
            recv_iov,
            recv_hdrs,
            recv_control,
            locals: vec![None; BATCH].into_boxed_slice(),
            send_iov,
            send_control: (0..BATCH).map(|_| ZERO_CONTROL).collect(),
            send_hdrs,
        }
    }

    /// Waits (up to [`READ_TIMEOUT`]) for at least one datagram, answers
    /// every datagram that arrived, and sends the answers. Returns the
    /// number of datagrams received; a timeout is `WouldBlock`.
    pub fn serve_batch(&mut self) -> io::Result<usize> {
        let n = self.receive()?;
        self.refresh_live();
        let table = self.table.load();
        let mut n_send = 0;
        for i in 0..n {
            if self.handle(i, &table) {
                let out = &self.out[i];
                self.send_iov[n_send] = libc::iovec {
                    iov_base: out.as_ptr() as *mut libc::c_void,
                    iov_len: out.len(),
                };
                let from = &self.recv_hdrs[i].msg_hdr;
                let to = &mut self.send_hdrs[n_send].msg_hdr;
                to.msg_name = from.msg_name;
                to.msg_namelen = from.msg_namelen;
                if let Some(local) = self.locals[i] {
                    let control = &mut self.send_control[n_send];
                    to.msg_controllen = write_pktinfo(control, local) as _;
                    to.msg_control = control.0.as_mut_ptr().cast();
                } else {
                    to.msg_control = std::ptr::null_mut();
                    to.msg_controllen = 0;
                }
                n_send += 1;
            }
        }
        self.send(n_send);
        Ok(n)
    }

    fn receive(&mut self) -> io::Result<usize> {
        // The kernel wrote each used slot's peer length; give back the room.
        for h in &mut self.recv_hdrs[..self.used] {
            h.msg_hdr.msg_namelen = NAME_LEN;
            if self.pktinfo {
                h.msg_hdr.msg_controllen = CONTROL_LEN as _;
            }
        }
        self.used = 0;
        // SAFETY: every header points into buffers owned by `self` (set up
        // in `new`, boxed so they never move) with their true lengths.
        let n = unsafe {
            libc::recvmmsg(
                self.socket.as_raw_fd(),
                self.recv_hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.used = n as usize;
        Ok(self.used)
    }

    /// Takes what a reload may have changed, once per batch: the access
    /// list (one lock-free load; the remembered decision goes with the old
    /// list) and whether forwarding is configured (RA).
    #[inline]
    fn refresh_live(&mut self) {
        self.context.recursion = self.forwarder.forwards();
        let live = self.live_acl.load();
        if !Arc::ptr_eq(&live, &self.acl) {
            self.acl = Arc::clone(&live);
            self.last_v4 = None;
        }
    }

    /// Whether `ip` may be answered; the decision for the last IPv4 client
    /// is remembered (until the list is replaced).
    #[inline]
    fn allowed(&mut self, ip: IpAddr) -> bool {
        let IpAddr::V4(v4) = ip else {
            return self.acl.allows(ip);
        };
        let bits = u32::from(v4);
        match self.last_v4 {
            Some((last, ok)) if last == bits => ok,
            _ => {
                let ok = self.acl.allows(ip);
                self.last_v4 = Some((bits, ok));
                ok
            }
        }
    }

    /// Answers datagram `i` into `out[i]`; true when there is something to
    /// send back on this socket.
    fn handle(&mut self, i: usize, table: &Table) -> bool {
        let hdr = &self.recv_hdrs[i];
        self.locals[i] = if self.pktinfo {
            read_pktinfo(&hdr.msg_hdr)
        } else {
            None
        };
        let len = (hdr.msg_len as usize).min(RECV_BUF_LEN);
        if hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            self.counters.dropped();
            return false;
        }
        let Some(ip) = peer_ip(&self.names[i]) else {
            self.counters.dropped();
            return false;
        };
        let allowed = self.allowed(ip);
        let query = &self.recv[i * RECV_BUF_LEN..i * RECV_BUF_LEN + len];
        let out = &mut self.out[i];
        if !allowed {
            self.counters.acl_refused();
            return count(
                &self.counters,
                answer::error_reply(query, RCODE_REFUSED, self.context.recursion, out),
            );
        }
        let mut context = self.context;
        context.rotation = context.rotation.wrapping_add(1);
        self.context.rotation = context.rotation;
        if let Some(local) = self.locals[i] {
            context.local = local.ip;
        }
        match answer::answer(query, table, &context, out) {
            Outcome::Forward { qtype, max_len } => {
                if let Some(cache) = &self.cache
                    && let Lookup::Hit { refresh, .. } =
                        cache.answer(query, Transport::Udp, Instant::now(), out)
                {
                    self.counters.query(qtype);
                    if refresh {
                        self.forwarder.refresh(query);
                    }
                    return true;
                }
                let Some(peer) = to_socket_addr(&self.names[i]) else {
                    return false; // unreachable: peer_ip parsed it
                };
                let reply = Reply::Udp {
                    socket: self.socket.clone(),
                    peer,
                    local: self.locals[i],
                    max_len,
                };
                if self.forwarder.submit(query, reply) {
                    self.counters.query(qtype);
                    self.counters.forwarded();
                    false
                } else {
                    self.counters.forward_rejected();
                    count(
                        &self.counters,
                        answer::error_reply(query, RCODE_SERVFAIL, context.recursion, out),
                    )
                }
            }
            outcome => count(&self.counters, outcome),
        }
    }

    fn send(&mut self, n_send: usize) {
        let mut sent = 0;
        while sent < n_send {
            // SAFETY: headers `sent..n_send` point at answer buffers and
            // peer addresses owned by `self`.
            let r = unsafe {
                libc::sendmmsg(
                    self.socket.as_raw_fd(),
                    self.send_hdrs[sent..].as_mut_ptr(),
                    (n_send - sent) as libc::c_uint,
                    0,
                )
            };
            if r > 0 {
                sent += r as usize;
            } else if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                // The first datagram cannot be sent (peer unreachable, bad
                // address): skip it, keep the others.
                sent += 1;
            }
        }
    }
}

/// Counts a local outcome; true when there is an answer to send.
fn count(counters: &Counters, outcome: Outcome) -> bool {
    match outcome {
        Outcome::Answered {
            rcode,
            qtype,
            truncated,
        } => {
            if let Some(q) = qtype {
                counters.query(q);
            }
            counters.local(rcode, truncated);
            true
        }
        Outcome::Forward { .. } | Outcome::Drop => {
            counters.dropped();
            false
        }
    }
}

/// The address of a received datagram's peer.
#[inline]
fn peer_ip(ss: &libc::sockaddr_storage) -> Option<IpAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                sin.sin_addr.s_addr,
            ))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

/// The peer of a received datagram.
fn to_socket_addr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}
