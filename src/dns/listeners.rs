//! Every address the DNS serves: the fixed ones (`dns_bind`) and, with
//! `dns_bind = "auto"`, port `dns_bind.port()` on the gateway of each
//! watched Docker network.
//!
//! The Docker watcher sends the whole set of gateway addresses whenever it
//! changes ([`GatewaySender`]); the `dns-listeners` thread turns each set
//! into one [`DnsServer`] per address, binding new ones (`IP_FREEBIND`, so a
//! gateway whose bridge is not up yet binds anyway) and stopping the ones
//! whose network went away.
//!
//! Invariants: serving threads never look at this set (each owns its
//! sockets for its whole life, so the hot path has no lock and no check);
//! a failed bind is logged and retried with the next set, never fatal; the
//! fixed listener lives as long as the [`Listeners`].

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded, select};

use super::{DnsServer, Serving};
use crate::health::BEAT_INTERVAL;

/// Gateway sets waiting for the listeners thread (each one replaces the
/// last, so a short queue suffices; the sender waits while it is full).
pub const GATEWAY_INBOX: usize = 8;

/// Where the Docker watcher sends the current set of gateway addresses.
pub type GatewaySender = Sender<BTreeSet<IpAddr>>;

/// The fixed DNS servers and, in `auto` mode, the thread that follows the
/// gateways.
pub struct Listeners {
    fixed: DnsServer,
    /// Further fixed addresses (`dns_bind` given as a list).
    more: Vec<DnsServer>,
    follower: Option<Follower>,
}

struct Follower {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Listeners {
    /// Binds the fixed addresses (`fixed`, then `more`). With
    /// `follow_gateways`, also returns the sender on which gateway sets are
    /// served on `fixed`'s port. An error names the address that failed.
    pub fn start(
        fixed: SocketAddr,
        more: &[SocketAddr],
        serving: Serving,
        follow_gateways: bool,
    ) -> Result<(Listeners, Option<GatewaySender>), (SocketAddr, io::Error)> {
        let server = DnsServer::bind(fixed, &serving, false).map_err(|e| (fixed, e))?;
        let mut others = Vec::with_capacity(more.len());
        for &addr in more {
            others.push(DnsServer::bind(addr, &serving, false).map_err(|e| (addr, e))?);
        }
        if !follow_gateways {
            return Ok((
                Listeners {
                    fixed: server,
                    more: others,
                    follower: None,
                },
                None,
            ));
        }
        let port = server.udp_addr.port();
        let skip = server.udp_addr.ip();
        let (tx, rx) = bounded(GATEWAY_INBOX);
        let (stop_tx, stop_rx) = bounded(1);
        let thread = std::thread::Builder::new()
            .name("dns-listeners".into())
            .spawn(move || follow(rx, stop_rx, serving, port, skip))
            .map_err(|e| (fixed, e))?;
        Ok((
            Listeners {
                fixed: server,
                more: others,
                follower: Some(Follower {
                    stop: stop_tx,
                    thread,
                }),
            },
            Some(tx),
        ))
    }

    /// The fixed server's UDP address.
    pub fn udp_addr(&self) -> SocketAddr {
        self.fixed.udp_addr
    }

    /// The fixed server's TCP address.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.fixed.tcp_addr
    }

    /// Stops every server and the follower thread.
    pub fn stop(self) {
        if let Some(f) = self.follower {
            let _ = f.stop.send(());
            let _ = f.thread.join();
        }
        for server in self.more {
            server.stop();
        }
        self.fixed.stop();
    }
}

/// The `dns-listeners` loop: applies the latest gateway set until stopped.
fn follow(
    sets: Receiver<BTreeSet<IpAddr>>,
    stop: Receiver<()>,
    serving: Serving,
    port: u16,
    skip: IpAddr,
) {
    let mut servers: BTreeMap<IpAddr, DnsServer> = BTreeMap::new();
    // Its own heartbeat, like every component thread (for /healthz).
    let heartbeat = serving.stats.register().heartbeat.clone();
    let alive = heartbeat.enter();
    loop {
        heartbeat.beat();
        select! {
            recv(sets) -> set => match set {
                Ok(mut set) => {
                    // Only the newest set matters.
                    while let Ok(newer) = sets.try_recv() {
                        set = newer;
                    }
                    set.remove(&skip);
                    apply(&mut servers, &set, &serving, port);
                }
                // The watcher is gone: keep serving until stopped.
                Err(_) => {
                    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(BEAT_INTERVAL) {
                        heartbeat.beat();
                    }
                    break;
                }
            },
            recv(stop) -> _ => break,
            default(BEAT_INTERVAL) => {}
        }
    }
    for (_, server) in std::mem::take(&mut servers) {
        server.stop();
    }
    alive.retire();
}

/// Stops the servers of addresses not in `wanted`, binds the missing ones.
fn apply(
    servers: &mut BTreeMap<IpAddr, DnsServer>,
    wanted: &BTreeSet<IpAddr>,
    serving: &Serving,
    port: u16,
) {
    let gone: Vec<IpAddr> = servers
        .keys()
        .filter(|ip| !wanted.contains(ip))
        .copied()
        .collect();
    for ip in gone {
        if let Some(server) = servers.remove(&ip) {
            server.stop();
            log::info!(
                "DNS stopped serving on {} (its Docker network is gone)",
                SocketAddr::new(ip, port)
            );
        }
    }
    for &ip in wanted {
        if servers.contains_key(&ip) {
            continue;
        }
        let addr = SocketAddr::new(ip, port);
        match DnsServer::bind(addr, serving, true) {
            // DnsServer::bind logs the address.
            Ok(server) => {
                servers.insert(ip, server);
            }
            Err(e) => log::warn!(
                "cannot serve DNS on Docker gateway {addr}: {e}; retried when the networks change"
            ),
        }
    }
}
