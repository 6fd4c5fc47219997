//! Wiring: starts every component thread for one [`Config`] and stops them.
//!
//! Start order follows the data flow: table → registry → forwarder → DNS →
//! HTTP → Docker → gossip. Stop order is the reverse.
//!
//! [`Daemon::reload`] is the one entry point of a configuration reload
//! (`SIGHUP`): it applies the keys of [`RELOADABLE_KEYS`] to the running
//! components and reports the others, which need a restart.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use crossbeam_channel::bounded;

use crate::config::{Config, RELOADABLE_KEYS};
use crate::dns::acl::{Acl, LiveAcl};
use crate::dns::forward::Forwarder;
use crate::dns::{Listeners, Serving, TcpLimits};
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
    /// The configuration running now: the start's, with every reload's
    /// reloadable keys applied.
    config: Config,
    registry: Registry,
    forwarder: Forwarder,
    acl: LiveAcl,
    dns: Listeners,
    http: HttpServer,
    docker: Option<Docker>,
    gossip: Option<Gossip>,
}

impl Daemon {
    /// Starts every component. Errors name what could not start.
    pub fn start(config: &Config) -> anyhow::Result<Daemon> {
        let origin = Origin {
            id: crate::gossip::local_id(&config.data_dir)?.into(),
            node_name: config.node_name.as_str().into(),
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
        // No cluster key: a single host, nothing to publish to.
        let single_host = config.cluster_keys.is_empty();
        let registry = Registry::spawn(
            table.clone(),
            metrics.registry.clone(),
            origin.id.clone(),
            (!single_host).then_some(local_changed_tx),
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
        let acl = LiveAcl::new(Acl::new(&config.allow_nets));
        let serving = Serving {
            table: table.clone(),
            forwarder: forwarder.clone(),
            stats: metrics.dns.clone(),
            acl: acl.clone(),
            limits: TcpLimits::default(),
            n_udp_threads: config.dns_threads,
        };
        let (dns, gateways) = Listeners::start(
            config.dns_bind,
            &config.dns_bind_more,
            serving,
            config.dns_bind_auto,
        )
        .map_err(|(addr, e)| bind_error(e, addr))?;
        let peers = Peers::default();
        let http = HttpServer::start(
            config.http_bind,
            table.clone(),
            metrics.clone(),
            peers.clone(),
            forwarder.cache().cloned(),
        )
        .with_context(|| format!("binding HTTP status on {}", config.http_bind))?;
        let docker = Docker::start_with_gateways(
            config,
            origin.clone(),
            registry.tx.clone(),
            metrics.docker.clone(),
            gateways,
        )?;
        let gossip = if single_host {
            log::info!(
                "No cluster key (GLUED_CLUSTER_SECRET or GLUED_CLUSTER_SECRET_FILE): running as a \
                 single host, DNS and Docker only; gossip and mDNS are off. Make a key with \
                 `glued keygen` to join a cluster"
            );
            None
        } else {
            Some(Gossip::start_after_docker(
                config,
                origin.clone(),
                table.clone(),
                registry.tx.clone(),
                local_changed_rx,
                metrics.gossip.clone(),
                peers,
                Some(metrics.docker.clone()),
            )?)
        };
        Ok(Daemon {
            origin,
            table,
            metrics,
            dns_udp_addr: dns.udp_addr(),
            dns_tcp_addr: dns.tcp_addr(),
            http_addr: http.addr,
            config: config.clone(),
            registry,
            forwarder,
            acl,
            dns,
            http,
            docker: Some(docker),
            gossip,
        })
    }

    /// Empties the forward cache (`SIGHUP`, `glued cache flush`).
    pub fn flush_cache(&self) {
        if let Some(cache) = self.forwarder.cache() {
            cache.flush();
            log::info!("forward cache flushed");
        }
    }

    /// The configuration running now.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Applies a new configuration to the running daemon: the keys of
    /// [`RELOADABLE_KEYS`] that changed take effect at once; the other
    /// changed keys are left as they were and reported in
    /// [`Reloaded::needs_restart`]. A key whose component cannot take it
    /// (upstream sockets) keeps its old value and is reported in
    /// [`Reloaded::failed`]. Every reload also empties the forward cache.
    pub fn reload(&mut self, new: Config) -> Reloaded {
        self.flush_cache();
        let mut out = Reloaded::default();
        for key in self.config.changed_keys(&new) {
            if !RELOADABLE_KEYS.contains(&key.as_str()) {
                out.needs_restart.push(key);
                continue;
            }
            match self.apply(&key, &new) {
                Ok(()) => out.applied.push(key),
                Err(reason) => out.failed.push(format!("{key}: {reason}")),
            }
        }
        out
    }

    /// Applies one reloadable key of `new` to the components, then to the
    /// running configuration.
    fn apply(&mut self, key: &str, new: &Config) -> Result<(), String> {
        let running = &mut self.config;
        match key {
            "records" => {
                let msg = static_records(&self.origin, new);
                self.registry
                    .tx
                    .send(msg)
                    .map_err(|_| "the registry stopped".to_string())?;
                running.records = new.records.clone();
            }
            "ttl" => {
                self.registry
                    .tx
                    .send(RegistryMsg::SetTtl(new.ttl_secs))
                    .map_err(|_| "the registry stopped".to_string())?;
                running.ttl_secs = new.ttl_secs;
            }
            "allow_nets" => {
                self.acl.store(Acl::new(&new.allow_nets));
                running.allow_nets = new.allow_nets.clone();
            }
            "upstreams" => {
                let stats = self.metrics.forward.clone();
                if let Err(e) = self.forwarder.set_upstreams(new, stats.clone()) {
                    // The old forwarding thread may be gone already: back
                    // to the upstreams that ran.
                    if let Err(again) = self.forwarder.set_upstreams(running, stats) {
                        log::error!(
                            "cannot restart forwarding to {:?}: {again}",
                            running.upstreams
                        );
                    }
                    return Err(e.to_string());
                }
                running.upstreams = new.upstreams.clone();
                running.upstreams_file = new.upstreams_file.clone();
            }
            "log" => {
                crate::logging::set_filter(&new.log);
                running.log = new.log.clone();
            }
            "cluster_secret" => {
                set_keyring(self.gossip.as_ref(), new.cluster_keys.clone())?;
                running.cluster_keys = new.cluster_keys.clone();
            }
            _ => return Err("not reloadable".into()),
        }
        Ok(())
    }

    /// Installs a reloaded cluster keyring (`SIGHUP`, through
    /// [`Daemon::reload`]).
    pub fn set_keyring(&self, keyring: crate::config::Keyring) -> Result<(), String> {
        set_keyring(self.gossip.as_ref(), keyring)
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

/// What [`Daemon::reload`] did, by key (file names).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Changed and applied.
    pub applied: Vec<String>,
    /// Changed, but only a restart applies them: left as they were.
    pub needs_restart: Vec<String>,
    /// Changed and reloadable, but a component refused: `key: reason`.
    pub failed: Vec<String>,
}

impl Reloaded {
    /// Logs the outcome: one info line, and one warning line naming every
    /// key that needs a restart.
    pub fn log(&self) {
        if self.applied.is_empty() {
            log::info!("configuration reloaded: nothing to apply");
        } else {
            log::info!(
                "configuration reloaded: applied {}",
                self.applied.join(", ")
            );
        }
        if !self.needs_restart.is_empty() {
            log::warn!(
                "configuration reload: {} changed but need a restart; left as they were",
                self.needs_restart.join(", ")
            );
        }
        for failure in &self.failed {
            log::error!("configuration reload: {failure}; left as it was");
        }
    }
}

/// Hands a reloaded keyring to the gossip thread. A node started as a
/// single host stays one, and a cluster node cannot become one: both need
/// a restart (an empty keyring is refused by the gossip thread).
fn set_keyring(gossip: Option<&Gossip>, keyring: crate::config::Keyring) -> Result<(), String> {
    match gossip {
        Some(g) => g.set_keyring(keyring),
        None if keyring.is_empty() => Ok(()),
        None => Err(
            "a cluster key was added, but this node started as a single host: \
                     restart it to join a cluster"
                .into(),
        ),
    }
}

/// The `[[records]]` of the configuration as one replace message: one group
/// per name, holding every address given for it.
fn static_records(origin: &Origin, config: &Config) -> RegistryMsg {
    let mut by_name: BTreeMap<&str, Group> = BTreeMap::new();
    for r in &config.records {
        let g = by_name.entry(&r.name).or_insert_with(|| Group {
            names: smallvec::smallvec![r.name.as_str().into()],
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
