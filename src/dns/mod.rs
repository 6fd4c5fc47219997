//! DNS serving: hand-rolled UDP and TCP loops around a pure answer builder,
//! plus the forwarder for names that are not ours.
//!
//! Threads: per served address, `config.dns_threads` UDP threads
//! (`dns-udp-N`), each on its own `SO_REUSEPORT` socket bound to that
//! address, and one TCP thread (`dns-tcp`) running a `mio` event loop: one
//! [`DnsServer`]. They read the name table with one `load()` per query and
//! hand what is not ours to the [`Forwarder`]. [`Listeners`] holds the
//! fixed server and, with `dns_bind = "auto"`, one more per Docker gateway,
//! started and stopped by its own thread as networks come and go; a serving
//! thread never learns about sockets other than its own.
//!
//! Invariants: the serving threads never block on anything but their own
//! sockets (forwarding is a non-blocking hand-over); names of the zone are
//! never forwarded; [`DnsServer::stop`] returns within a few hundred
//! milliseconds.

pub mod acl;
pub mod answer;
pub mod cache;
pub mod forward;
pub mod listeners;
pub mod stats;
pub mod tcp;
pub mod udp;
pub mod wire;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use crate::config::Config;
use crate::health::Heartbeat;
use crate::table::SharedTable;
use acl::{Acl, LiveAcl};
use forward::Forwarder;
pub use listeners::Listeners;
use stats::DnsStats;
pub use tcp::TcpLimits;

/// Attempts at finding a port free for both UDP and TCP when the
/// configuration asks for port 0.
const BIND_ATTEMPTS: usize = 16;

/// What every serving thread of every listener shares; cheap to clone.
#[derive(Clone)]
pub struct Serving {
    pub table: SharedTable,
    pub forwarder: Forwarder,
    pub stats: Arc<DnsStats>,
    /// Replaced whole by a reload.
    pub acl: LiveAcl,
    pub limits: TcpLimits,
    /// UDP threads per served address.
    pub n_udp_threads: usize,
}

/// Lets a socket bind an address that is not (yet) configured on any
/// interface (`IP_FREEBIND` / `IPV6_FREEBIND`): a Docker gateway listener
/// then binds before its bridge is up, and serves once the address is.
pub fn set_freebind(socket: &socket2::Socket, addr: SocketAddr) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (level, name) = if addr.is_ipv4() {
        (libc::SOL_IP, libc::IP_FREEBIND)
    } else {
        (libc::SOL_IPV6, libc::IPV6_FREEBIND)
    };
    let on: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option of its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The serving threads of one address (UDP threads and the TCP thread).
pub struct DnsServer {
    pub udp_addr: SocketAddr,
    pub tcp_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    waker: Arc<mio::Waker>,
    threads: Vec<JoinHandle<()>>,
}

impl DnsServer {
    /// Binds UDP and TCP on `config.dns_bind` and starts the serving threads.
    pub fn start(
        config: &Config,
        table: SharedTable,
        forwarder: Forwarder,
        stats: Arc<DnsStats>,
    ) -> io::Result<DnsServer> {
        DnsServer::start_with(config, table, forwarder, stats, TcpLimits::default())
    }

    /// [`DnsServer::start`] with explicit TCP limits.
    pub fn start_with(
        config: &Config,
        table: SharedTable,
        forwarder: Forwarder,
        stats: Arc<DnsStats>,
        limits: TcpLimits,
    ) -> io::Result<DnsServer> {
        let serving = Serving {
            table,
            forwarder,
            stats,
            acl: LiveAcl::new(Acl::new(&config.allow_nets)),
            limits,
            n_udp_threads: config.dns_threads,
        };
        DnsServer::bind(config.dns_bind, &serving, false)
    }

    /// Binds UDP and TCP on `addr` (with `freebind`, whether or not the
    /// address is up yet) and starts its serving threads.
    pub fn bind(addr: SocketAddr, serving: &Serving, freebind: bool) -> io::Result<DnsServer> {
        let n_udp = serving.n_udp_threads.max(1);
        let (udp_sockets, listener) = bind_all(addr, n_udp, freebind)?;
        let udp_addr = udp_sockets[0].local_addr()?;
        let tcp_addr = listener.local_addr()?;
        let Serving {
            table,
            forwarder,
            stats,
            acl,
            limits,
            ..
        } = serving.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let poll = mio::Poll::new()?;
        let waker = Arc::new(mio::Waker::new(poll.registry(), tcp::WAKER)?);
        let mut threads = Vec::new();
        let server =
            |threads: &mut Vec<JoinHandle<()>>| -> io::Result<()> {
                for (i, socket) in udp_sockets.into_iter().enumerate() {
                    let socket = Arc::new(socket);
                    let (table, forwarder, acl, stop) =
                        (table.clone(), forwarder.clone(), acl.clone(), stop.clone());
                    let counters = stats.register();
                    threads.push(
                        std::thread::Builder::new()
                            .name(format!("dns-udp-{i}"))
                            .spawn(move || {
                                let heartbeat = counters.heartbeat.clone();
                                let alive = heartbeat.enter();
                                let mut worker =
                                    udp::UdpWorker::new(socket, table, forwarder, counters, acl);
                                serve_udp(&mut worker, &stop, &heartbeat);
                                alive.retire();
                            })?,
                    );
                }
                let listener = mio::net::TcpListener::from_std(listener);
                let (table, forwarder, stop) = (table.clone(), forwarder.clone(), stop.clone());
                let tcp_waker = waker.clone();
                let counters = stats.register();
                threads.push(std::thread::Builder::new().name("dns-tcp".into()).spawn(
                    move || {
                        let alive = counters.heartbeat.clone().enter();
                        let stopped = stop.clone();
                        tcp::run(
                            poll, tcp_waker, listener, stop, table, forwarder, counters, acl,
                            limits,
                        );
                        // Only a requested stop is a clean end.
                        if stopped.load(Ordering::Relaxed) {
                            alive.retire();
                        }
                    },
                )?);
                Ok(())
            };
        let started = server(&mut threads);
        let mut dns = DnsServer {
            udp_addr,
            tcp_addr,
            stop,
            waker,
            threads,
        };
        if let Err(e) = started {
            dns.shutdown();
            return Err(e);
        }
        log::info!("DNS serving on {udp_addr} (UDP, {n_udp} threads) and {tcp_addr} (TCP)");
        Ok(dns)
    }

    /// Stops the serving threads and joins them.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.waker.wake();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Serves until `stop`; each batch (or [`udp::READ_TIMEOUT`] of silence)
/// is a heartbeat, written only when the coarse clock moved: the heartbeat
/// is read by the status thread, and a store per batch would make its cache
/// line bounce between cores (under load a batch is a handful of queries).
fn serve_udp(worker: &mut udp::UdpWorker, stop: &AtomicBool, heartbeat: &Heartbeat) {
    let mut last_beat = 0;
    while !stop.load(Ordering::Relaxed) {
        let now = crate::health::now_ms();
        if now != last_beat {
            heartbeat.beat();
            last_beat = now;
        }
        match worker.serve_batch() {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                log::debug!("DNS UDP: receive failed: {e}");
                std::thread::sleep(udp::READ_TIMEOUT / 10);
            }
        }
    }
}

/// Binds the UDP sockets (one per thread) and the TCP listener on one
/// port. With port 0 the first UDP socket picks the port; if TCP cannot
/// have it, another is tried.
fn bind_all(
    addr: SocketAddr,
    n_udp: usize,
    freebind: bool,
) -> io::Result<(Vec<std::net::UdpSocket>, std::net::TcpListener)> {
    let attempts = if addr.port() == 0 { BIND_ATTEMPTS } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let first = udp::bind_with(addr, freebind)?;
        let local = first.local_addr()?;
        let mut sockets = vec![first];
        for _ in 1..n_udp {
            sockets.push(udp::bind_with(local, freebind)?);
        }
        match tcp::bind_with(local, freebind) {
            Ok(listener) => return Ok((sockets, listener)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse)))
}
