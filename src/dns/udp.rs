//! The UDP serving loop: one [`UdpWorker`] per thread, each on its own
//! `SO_REUSEPORT` socket, receiving and sending up to [`BATCH`] datagrams
//! per system call (`recvmmsg`/`sendmmsg`).
//!
//! Invariants: after the first batch a local answer allocates nothing (all
//! buffers belong to the worker and are reused); no system call but the one
//! `recvmmsg` and the `sendmmsg` of a batch; one `table.load()` per query;
//! the access check runs before anything else that costs; forwarded
//! queries are handed over without blocking and the forwarder replies on
//! the same socket.
//!
//! The `msghdr`s point into the worker's own boxed buffers once, at
//! construction (boxed slices do not move when the worker does); a batch
//! only resets what the kernel wrote into the slots the last batch used.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use crate::table::SharedTable;

use super::acl::Acl;
use super::answer::{self, Outcome, Transport, UDP_PAYLOAD_ADVERTISED};
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

/// Binds one UDP serving socket with `SO_REUSEPORT`, so every serving
/// thread can bind its own socket to the same address.
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    let _ = socket.set_recv_buffer_size(SOCKET_RECV_BUFFER_BYTES);
    socket.set_read_timeout(Some(READ_TIMEOUT))?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Length of a `sockaddr_storage`, what `recvmmsg` may write per peer.
const NAME_LEN: libc::socklen_t = size_of::<libc::sockaddr_storage>() as libc::socklen_t;

/// One serving thread's socket and buffers.
pub struct UdpWorker {
    socket: Arc<UdpSocket>,
    table: SharedTable,
    forwarder: Forwarder,
    counters: Arc<Counters>,
    acl: Acl,
    /// The last IPv4 client checked against `acl`, and the decision.
    last_v4: Option<(u32, bool)>,
    rotation: usize,
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
    send_iov: Box<[libc::iovec]>,
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
        acl: Acl,
    ) -> UdpWorker {
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
            send_hdrs[i].msg_hdr.msg_iov = &mut send_iov[i];
            send_hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        UdpWorker {
            socket,
            table,
            forwarder,
            counters,
            acl,
            last_v4: None,
            rotation: 0,
            used: 0,
            recv,
            out: (0..BATCH)
                .map(|_| Vec::with_capacity(SEND_BUF_LEN))
                .collect(),
            names,
            recv_iov,
            recv_hdrs,
            send_iov,
            send_hdrs,
        }
    }

    /// Waits (up to [`READ_TIMEOUT`]) for at least one datagram, answers
    /// every datagram that arrived, and sends the answers. Returns the
    /// number of datagrams received; a timeout is `WouldBlock`.
    pub fn serve_batch(&mut self) -> io::Result<usize> {
        let n = self.receive()?;
        let mut n_send = 0;
        for i in 0..n {
            if self.handle(i) {
                let out = &self.out[i];
                self.send_iov[n_send] = libc::iovec {
                    iov_base: out.as_ptr() as *mut libc::c_void,
                    iov_len: out.len(),
                };
                let from = &self.recv_hdrs[i].msg_hdr;
                let to = &mut self.send_hdrs[n_send].msg_hdr;
                to.msg_name = from.msg_name;
                to.msg_namelen = from.msg_namelen;
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

    /// Whether `ip` may be answered; the decision for the last IPv4 client
    /// is remembered (the list never changes).
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
    fn handle(&mut self, i: usize) -> bool {
        let hdr = &self.recv_hdrs[i];
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
                answer::error_reply(query, RCODE_REFUSED, out),
            );
        }
        let table = self.table.load();
        self.rotation = self.rotation.wrapping_add(1);
        match answer::answer(query, &table, self.rotation, Transport::Udp, out) {
            Outcome::Forward { qtype, max_len } => {
                self.counters.query(qtype);
                let Some(peer) = to_socket_addr(&self.names[i]) else {
                    return false; // unreachable: peer_ip parsed it
                };
                let reply = Reply::Udp {
                    socket: self.socket.clone(),
                    peer,
                    max_len,
                };
                if self.forwarder.submit(query, reply) {
                    self.counters.forwarded();
                    false
                } else {
                    self.counters.forward_rejected();
                    count(
                        &self.counters,
                        answer::error_reply(query, RCODE_SERVFAIL, out),
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
