//! Wiring: starts every component thread for one [`Config`] and stops them.
//!
//! Start order follows the data flow: table → registry → forwarder → DNS →
//! HTTP → Docker → gossip. Stop order is the reverse.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use crossbeam_channel::bounded;

use crate::config::Config;
use crate::dns::DnsServer;
use crate::dns::forward::Forwarder;
use crate::docker::Docker;
use crate::gossip::{Gossip, Peers};
use crate::http::HttpServer;
use crate::metrics::{DockerCheck, Metrics};
use crate::registry::{Registry, RegistryMsg};
use crate::table::{self, Group, Origin, SharedTable, Source, SourceKind};

/// Every running component of one Glued.
pub struct Daemon {
    pub origin: Origin,
    pub table: SharedTable,
    pub metrics: Arc<Metrics>,
    pub dns_udp_addr: SocketAddr,
    pub dns_tcp_addr: SocketAddr,
    pub http_addr: SocketAddr,
    registry: Registry,
    forwarder: Forwarder,
    dns: DnsServer,
    http: HttpServer,
    docker: Option<Docker>,
    gossip: Option<Gossip>,
}

impl Daemon {
    /// Starts every component. Errors name what could not start.
    pub fn start(config: &Config) -> anyhow::Result<Daemon> {
        let origin = Origin {
            id: crate::gossip::local_id(&config.data_dir)?,
            node_name: config.node_name.clone(),
        };
        let table = table::shared(&config.domain, config.ttl_secs);
        let metrics = Arc::new(Metrics {
            docker_check: Some(DockerCheck {
                host: config.docker_host.clone(),
                window: Duration::from_secs(config.docker_health_secs),
            }),
            ..Metrics::default()
        });
        let (local_changed_tx, local_changed_rx) = bounded(1);
        let registry = Registry::spawn(
            table.clone(),
            metrics.registry.clone(),
            origin.id.clone(),
            Some(local_changed_tx),
        );
        registry
            .tx
            .send(static_records(&origin, config))
            .context("registry stopped at start")?;
        let forwarder = Forwarder::start_with_cache(
            config,
            metrics.forward.clone(),
            Some(metrics.cache.clone()),
        )
        .context("starting the forwarder")?;
        let dns = DnsServer::start(
            config,
            table.clone(),
            forwarder.clone(),
            metrics.dns.clone(),
        )
        .map_err(|e| bind_error(e, config.dns_bind))?;
        let peers = Peers::default();
        let http = HttpServer::start(
            config.http_bind,
            table.clone(),
            metrics.clone(),
            peers.clone(),
            forwarder.cache().cloned(),
        )
        .with_context(|| format!("binding HTTP status on {}", config.http_bind))?;
        let docker = Docker::start(
            config,
            origin.clone(),
            registry.tx.clone(),
            metrics.docker.clone(),
        )?;
        let gossip = Gossip::start(
            config,
            origin.clone(),
            table.clone(),
            registry.tx.clone(),
            local_changed_rx,
            metrics.gossip.clone(),
            peers,
        )?;
        Ok(Daemon {
            origin,
            table,
            metrics,
            dns_udp_addr: dns.udp_addr,
            dns_tcp_addr: dns.tcp_addr,
            http_addr: http.addr,
            registry,
            forwarder,
            dns,
            http,
            docker: Some(docker),
            gossip: Some(gossip),
        })
    }

    /// Empties the forward cache (`SIGHUP`, `glued cache flush`).
    pub fn flush_cache(&self) {
        if let Some(cache) = self.forwarder.cache() {
            cache.flush();
            log::info!("forward cache flushed");
        }
    }

    /// Stops every component, last started first.
    pub fn stop(mut self) {
        if let Some(g) = self.gossip.take() {
            g.stop();
        }
        if let Some(d) = self.docker.take() {
            d.stop();
        }
        self.http.stop();
        self.dns.stop();
        self.forwarder.stop();
        self.registry.stop();
    }
}

/// The `[[records]]` of the configuration as one replace message: one group
/// per name, holding every address given for it.
fn static_records(origin: &Origin, config: &Config) -> RegistryMsg {
    let mut by_name: BTreeMap<&str, Group> = BTreeMap::new();
    for r in &config.records {
        let g = by_name.entry(&r.name).or_insert_with(|| Group {
            names: vec![r.name.clone()],
            ..Group::default()
        });
        match r.ip {
            IpAddr::V4(ip) => g.v4.push(ip),
            IpAddr::V6(ip) => g.v6.push(ip),
        }
    }
    RegistryMsg::Replace {
        origin: origin.clone(),
        kind: Some(SourceKind::Static),
        groups: by_name
            .into_iter()
            .map(|(name, g)| (Source::Static { name: name.into() }, g))
            .collect(),
    }
}

/// Turns a bind failure into an error that says how to fix it.
fn bind_error(e: std::io::Error, addr: SocketAddr) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::PermissionDenied && addr.port() < 1024 {
        anyhow::anyhow!(
            "cannot bind DNS on {addr}: permission denied; run as root, grant \
             CAP_NET_BIND_SERVICE (setcap cap_net_bind_service=+ep $(which glued)), \
             or set GLUED_DNS_BIND to a port above 1023"
        )
    } else if e.kind() == std::io::ErrorKind::AddrInUse {
        anyhow::anyhow!(
            "cannot bind DNS on {addr}: address in use (another resolver such as \
             systemd-resolved or dnsmasq holds it); stop it or set GLUED_DNS_BIND"
        )
    } else {
        anyhow::anyhow!("cannot bind DNS on {addr}: {e}")
    }
}
