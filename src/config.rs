//! Configuration: built-in defaults < config file < `GLUED_*` environment <
//! command-line flags, parsed in two steps (raw layers → validated
//! [`Config`]).
//!
//! Invariant: a [`Config`] that exists is valid; every bad value is caught
//! here and reported as one line naming the key, the value and what was
//! expected.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use ipnet::IpNet;

/// Default DNS listen address.
pub const DEFAULT_DNS_BIND: &str = "0.0.0.0:53";
/// Default gossip (iroh QUIC) port.
pub const DEFAULT_GOSSIP_PORT: u16 = 9254;
/// Default HTTP status address.
pub const DEFAULT_HTTP_BIND: &str = "127.0.0.1:9253";
/// Default cluster secret: works, but start-up warns loudly.
pub const DEFAULT_CLUSTER_SECRET: &str = "glued-default-insecure-secret";

/// A secret whose `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }
    /// The raw secret, for key derivation only. Never log it.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
    pub fn is_default(&self) -> bool {
        self.0 == DEFAULT_CLUSTER_SECRET
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A peer to join at start: an endpoint id, optionally with an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootstrapPeer {
    /// Endpoint id, 64 lowercase hex digits.
    pub id: String,
    /// `host:port` as given (host may be a name, resolved at join time).
    pub addr: Option<String>,
}

/// A `[[records]]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticRecord {
    /// Single label, lowercase.
    pub name: String,
    pub ip: IpAddr,
}

/// The validated configuration of one Glued.
#[derive(Clone, Debug)]
pub struct Config {
    pub dns_bind: SocketAddr,
    pub dns_threads: usize,
    pub http_bind: SocketAddr,
    /// Lowercase, no trailing dot.
    pub domain: String,
    /// Single lowercase label.
    pub node_name: String,
    pub ttl_secs: u32,
    pub upstreams: Vec<SocketAddr>,
    pub allow_nets: Vec<IpNet>,
    pub networks: Vec<String>,
    pub docker_host: String,
    pub data_dir: PathBuf,
    pub gossip_bind: SocketAddr,
    pub mdns: bool,
    pub lease_secs: u64,
    pub bootstrap_peers: Vec<BootstrapPeer>,
    pub topic_id: Option<[u8; 32]>,
    pub cluster_secret: Secret,
    pub records: Vec<StaticRecord>,
    pub log: String,
}
