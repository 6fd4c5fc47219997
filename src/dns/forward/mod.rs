//! The forwarder: relays queries that are not ours to the upstreams.
//!
//! Invariant: `submit` never blocks; a dead or slow upstream never delays a
//! local answer.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

use crate::config::Config;

/// Where the forwarder sends the upstream's answer.
pub enum Reply {
    /// Straight back on the serving thread's UDP socket.
    Udp {
        socket: Arc<UdpSocket>,
        peer: SocketAddr,
        /// Largest answer the client accepts over UDP.
        max_len: usize,
    },
    /// To the TCP connection's writer.
    Tcp(crossbeam_channel::Sender<Vec<u8>>),
}

#[derive(Debug, Default)]
pub struct ForwardStats {}

impl ForwardStats {
    pub fn render(&self, _out: &mut String) {}
}

/// Cheap-to-clone handle to the forwarding thread(s).
#[derive(Clone)]
pub struct Forwarder {}

impl Forwarder {
    pub fn start(_config: &Config, _stats: Arc<ForwardStats>) -> io::Result<Forwarder> {
        Ok(Forwarder {})
    }

    /// Hands a client's query over without blocking. Returns false when the
    /// forwarder is saturated (the caller answers SERVFAIL).
    pub fn submit(&self, _query: &[u8], _reply: Reply) -> bool {
        false
    }

    pub fn stop(&self) {}
}
