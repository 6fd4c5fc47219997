//! DNS serving: hand-rolled UDP and TCP loops around a pure answer builder,
//! plus the forwarder for names that are not ours.

pub mod answer;
pub mod forward;
pub mod stats;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::Config;
use crate::table::SharedTable;
use forward::Forwarder;
use stats::DnsStats;

/// The running DNS listeners (UDP threads and the TCP thread).
pub struct DnsServer {
    pub udp_addr: SocketAddr,
    pub tcp_addr: SocketAddr,
}

impl DnsServer {
    /// Binds UDP and TCP on `config.dns_bind` and starts the serving threads.
    pub fn start(
        _config: &Config,
        _table: SharedTable,
        _forwarder: Forwarder,
        _stats: Arc<DnsStats>,
    ) -> io::Result<DnsServer> {
        todo!("dns server")
    }

    /// Stops the serving threads and joins them.
    pub fn stop(self) {}
}
