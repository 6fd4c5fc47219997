//! Shared helpers for the integration tests.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use glued::config::{Config, Secret};

/// A unique suffix for names of things a test creates (networks, dirs).
pub fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fresh, empty data directory under the system temp dir.
pub fn data_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(unique("glued-test"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A configuration that binds only loopback ports chosen by the kernel,
/// contacts no upstream, watches a network that does not exist, and has
/// mDNS off: safe to run many at once.
pub fn test_config() -> Config {
    Config {
        dns_bind: "127.0.0.1:0".parse().unwrap(),
        dns_threads: 1,
        http_bind: "127.0.0.1:0".parse().unwrap(),
        domain: "glued.internal".into(),
        node_name: "node-a".into(),
        ttl_secs: 5,
        upstreams: vec![],
        allow_nets: ["127.0.0.0/8", "::1/128"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect(),
        networks: vec![unique("glued-absent-net")],
        docker_host: "unix:///var/run/docker.sock".into(),
        data_dir: data_dir(),
        gossip_bind: "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
        mdns: false,
        lease_secs: 15,
        bootstrap_peers: vec![],
        topic_id: None,
        cluster_secret: Secret::new("test-secret".into()),
        records: vec![],
        log: "info".into(),
    }
}

/// True when tests that need something absent must fail instead of skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}
