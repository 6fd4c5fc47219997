//! HTTP status: `/metrics`, `/healthz`, `/records`, `/peers`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::gossip::Peers;
use crate::metrics::Metrics;
use crate::table::SharedTable;

pub struct HttpServer {
    pub addr: SocketAddr,
}

impl HttpServer {
    pub fn start(
        _bind: SocketAddr,
        _table: SharedTable,
        _metrics: Arc<Metrics>,
        _peers: Peers,
    ) -> io::Result<HttpServer> {
        todo!("http")
    }

    pub fn stop(self) {}
}
