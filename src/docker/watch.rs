//! The async side of the Docker thread: one session per engine connection
//! (connect → resync → follow events), retried with capped backoff.
//!
//! Invariant: `sent` always equals what the registry holds for this node's
//! containers, so each event sends only the difference.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::errors::Error as BollardError;
use bollard::models::{EventMessage, EventMessageTypeEnum};
use bollard::query_parameters::{EventsOptions, ListContainersOptions, ListNetworksOptions};
use crossbeam_channel::{SendTimeoutError, Sender};
use futures_lite::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::names::ContainerInfo;
use super::{
    BACKOFF_MAX, BACKOFF_MIN, DockerStats, EVENTS_REPLAY_SECS, PING_INTERVAL, REQUEST_TIMEOUT,
    RESYNC_CONCURRENCY, STOP_POLL,
};
use crate::config::Config;
use crate::dns::listeners::GatewaySender;
use crate::registry::RegistryMsg;
use crate::table::{Group, Origin, Source, SourceKind};

/// Why a session ended.
#[derive(Debug)]
enum Lost {
    /// Connecting or a request failed.
    Engine(String),
    /// The registry is gone or we are stopping: end the thread.
    Stopped,
}

impl From<BollardError> for Lost {
    fn from(e: BollardError) -> Lost {
        Lost::Engine(e.to_string())
    }
}

/// What we last knew of the engine, to log transitions once.
#[derive(Clone, Copy, PartialEq, Eq)]
enum EngineState {
    Unknown,
    Up,
    Down,
}

pub(super) struct Watcher {
    host: String,
    /// `docker_health_secs`: the engine must answer within it.
    health_window: Duration,
    networks: Arc<[String]>,
    origin: Origin,
    registry: Sender<RegistryMsg>,
    stats: Arc<DockerStats>,
    stop: watch::Receiver<bool>,
    /// Container id → its groups by network, as the registry has them.
    sent: HashMap<String, BTreeMap<String, Group>>,
    engine: EngineState,
    /// Watched networks known not to exist (logged once each).
    missing: BTreeSet<String>,
    /// Where the gateway addresses of the watched networks go (`auto` bind).
    gateways: Option<GatewaySender>,
    /// The gateway set sent last.
    gateways_sent: Option<BTreeSet<IpAddr>>,
}

/// Runs sessions until stopped.
pub(super) async fn run(mut watcher: Watcher, mut stop: watch::Receiver<bool>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let lost = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            lost = watcher.session() => lost,
        };
        let reason = match lost {
            Lost::Stopped => return,
            Lost::Engine(reason) => reason,
        };
        if watcher.engine == EngineState::Up {
            backoff = BACKOFF_MIN;
        }
        watcher.on_lost(&reason, backoff);
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

impl Watcher {
    pub(super) fn new(
        config: &Config,
        origin: Origin,
        registry: Sender<RegistryMsg>,
        stats: Arc<DockerStats>,
        gateways: Option<GatewaySender>,
        stop: watch::Receiver<bool>,
    ) -> Watcher {
        Watcher {
            host: config.docker_host.clone(),
            health_window: Duration::from_secs(config.docker_health_secs),
            networks: config.networks.clone().into(),
            origin,
            registry,
            stats,
            stop,
            sent: HashMap::new(),
            engine: EngineState::Unknown,
            missing: BTreeSet::new(),
            gateways,
            gateways_sent: None,
        }
    }

    /// One connection: connect, subscribe, resync, follow events. Returns
    /// only when the engine is lost or the thread must stop.
    async fn session(&mut self) -> Lost {
        match self.follow().await {
            Ok(()) => Lost::Engine("event stream ended".into()),
            Err(lost) => lost,
        }
    }

    async fn follow(&mut self) -> Result<(), Lost> {
        let docker = connect(&self.host)?;
        let docker = timed(docker.negotiate_version()).await?;
        self.stats.engine.answered();
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            .saturating_sub(EVENTS_REPLAY_SECS);
        let filters = HashMap::from([
            (
                "type".to_owned(),
                vec!["container".into(), "network".into()],
            ),
            (
                "event".to_owned(),
                [
                    "start",
                    "die",
                    "destroy",
                    "rename",
                    "kill",
                    "health_status",
                    "connect",
                    "disconnect",
                    "create",
                ]
                .map(String::from)
                .to_vec(),
            ),
        ]);
        let events = docker.events(Some(EventsOptions {
            since: Some(since.to_string()),
            until: None,
            filters: Some(filters),
        }));
        let mut events = std::pin::pin!(events);
        self.check_networks(&docker).await?;
        let n = self.resync(&docker).await?;
        self.on_connected(n);
        // Pinged often enough that a healthy idle engine never looks silent
        // for the whole `/healthz` window.
        let mut ping = tokio::time::interval(PING_INTERVAL.min(self.health_window / 3));
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        loop {
            tokio::select! {
                ev = events.next() => match ev {
                    Some(Ok(ev)) => {
                        self.stats.engine.answered();
                        self.handle(&docker, ev).await?
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => return Ok(()),
                },
                _ = ping.tick() => {
                    timed(docker.ping()).await?;
                    self.stats.engine.answered();
                }
            }
        }
    }

    fn on_connected(&mut self, n_containers: usize) {
        self.stats.engine.answered();
        self.stats.connected.store(1, Ordering::Relaxed);
        match self.engine {
            EngineState::Unknown => log::info!(
                "Connected to the Docker engine at {}; watching networks {:?}: {n_containers} containers",
                self.host,
                self.networks
            ),
            EngineState::Down => {
                self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                log::info!(
                    "Docker engine at {} is back; resynchronised {n_containers} containers",
                    self.host
                );
            }
            EngineState::Up => {
                self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                log::debug!("Docker event stream re-established");
            }
        }
        self.engine = EngineState::Up;
    }

    fn on_lost(&mut self, reason: &str, retry_in: Duration) {
        self.stats.connected.store(0, Ordering::Relaxed);
        self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
        match self.engine {
            EngineState::Down => log::debug!("Docker engine still unreachable: {reason}"),
            EngineState::Unknown => {
                log::warn!(
                    "Docker engine at {} unreachable ({reason}); waiting for it (retry every \
                     {BACKOFF_MIN:?} to {BACKOFF_MAX:?})",
                    self.host
                )
            }
            EngineState::Up => log::warn!(
                "Lost the Docker engine at {} ({reason}); DNS keeps the {} known containers, \
                 reconnecting in {retry_in:?}",
                self.host,
                self.sent.len()
            ),
        }
        self.engine = EngineState::Down;
    }

    /// Notes which watched networks exist (logs each change once) and
    /// sends their gateways to the DNS listeners when those changed.
    async fn check_networks(&mut self, docker: &bollard::Docker) -> Result<(), Lost> {
        let nets = timed(docker.list_networks(None::<ListNetworksOptions>)).await?;
        let present: BTreeSet<&str> = nets.iter().filter_map(|n| n.name.as_deref()).collect();
        let gateways: BTreeSet<IpAddr> = nets
            .iter()
            .filter(|n| {
                n.name
                    .as_ref()
                    .is_some_and(|name| self.networks.contains(name))
            })
            .filter_map(|n| n.ipam.as_ref()?.config.as_ref())
            .flatten()
            .filter_map(|c| c.gateway.as_deref()?.parse().ok())
            .collect();
        if self.gateways.is_some() && self.gateways_sent.as_ref() != Some(&gateways) {
            self.send_gateways(gateways.clone())?;
            self.gateways_sent = Some(gateways);
        }
        for net in self.networks.iter() {
            if present.contains(net.as_str()) {
                if self.missing.remove(net) {
                    log::info!("Watched Docker network {net} exists now");
                }
            } else if self.missing.insert(net.clone()) {
                log::info!("Watched Docker network {net} does not exist yet; waiting for it");
            }
        }
        Ok(())
    }

    /// Lists and inspects every running container on a watched network and
    /// replaces this node's container records with the result.
    async fn resync(&mut self, docker: &bollard::Docker) -> Result<usize, Lost> {
        let mut fresh: HashMap<String, BTreeMap<String, Group>> = HashMap::new();
        if !self.networks.is_empty() {
            let list = timed(docker.list_containers(Some(ListContainersOptions {
                all: false,
                filters: Some(HashMap::from([(
                    "network".to_owned(),
                    self.networks.to_vec(),
                )])),
                ..Default::default()
            })))
            .await?;
            let mut ids = list.into_iter().filter_map(|c| c.id);
            let mut running = JoinSet::new();
            loop {
                while running.len() < RESYNC_CONCURRENCY {
                    let Some(id) = ids.next() else { break };
                    running.spawn(inspect(docker.clone(), id, self.networks.clone()));
                }
                match running.join_next().await {
                    None => break,
                    Some(Ok(Ok((id, groups)))) => {
                        if !groups.is_empty() {
                            fresh.insert(id, groups);
                        }
                    }
                    Some(Ok(Err(lost))) => return Err(lost),
                    Some(Err(e)) => return Err(Lost::Engine(format!("inspect task: {e}"))),
                }
            }
        }
        let groups = fresh
            .iter()
            .flat_map(|(id, by_net)| by_net.iter().map(|(net, g)| (source(id, net), g.clone())))
            .collect();
        self.send(RegistryMsg::Replace {
            origin: self.origin.clone(),
            kind: Some(SourceKind::Container),
            groups,
        })?;
        let none = BTreeMap::new();
        let ids: BTreeSet<&String> = self.sent.keys().chain(fresh.keys()).collect();
        for id in ids {
            let (old, new) = (
                self.sent.get(id).unwrap_or(&none),
                fresh.get(id).unwrap_or(&none),
            );
            for line in super::names::change_lines(id, old, new) {
                log::info!("{line}");
            }
        }
        self.sent = fresh;
        self.stats.resyncs.fetch_add(1, Ordering::Relaxed);
        self.stats
            .containers
            .store(self.sent.len() as u64, Ordering::Relaxed);
        Ok(self.sent.len())
    }

    async fn handle(&mut self, docker: &bollard::Docker, ev: EventMessage) -> Result<(), Lost> {
        let action = ev.action.unwrap_or_default();
        let actor = ev.actor.unwrap_or_default();
        let attributes = actor.attributes.unwrap_or_default();
        match ev.typ {
            Some(EventMessageTypeEnum::CONTAINER) => {
                // `health_status: healthy` and the like: the status follows
                // the colon, and is read again by the inspect.
                let action = match action.split_once(':') {
                    Some((verb, _)) => verb.trim().to_owned(),
                    None => action,
                };
                self.stats.count_event("container", &action);
                let Some(id) = actor.id else { return Ok(()) };
                match action.as_str() {
                    "start" => self.refresh(docker, &id).await,
                    "health_status" if self.sent.contains_key(&id) => {
                        self.refresh(docker, &id).await
                    }
                    // Only a container with records can lose or change them.
                    "die" | "destroy" | "rename" if self.sent.contains_key(&id) => {
                        self.refresh(docker, &id).await
                    }
                    // A signal (`docker kill -s HUP`), not a stop: a real stop
                    // follows as `die`.
                    _ => Ok(()),
                }
            }
            Some(EventMessageTypeEnum::NETWORK) => {
                self.stats.count_event("network", &action);
                let Some(net) = attributes.get("name") else {
                    return Ok(());
                };
                if !self.networks.contains(net) {
                    return Ok(());
                }
                match action.as_str() {
                    "connect" | "disconnect" => match attributes.get("container") {
                        Some(id) => self.refresh(docker, id).await,
                        None => Ok(()),
                    },
                    "create" => {
                        if self.missing.remove(net) {
                            log::info!("Watched Docker network {net} created; watching it");
                        }
                        self.check_networks(docker).await
                    }
                    "destroy" => {
                        if self.missing.insert(net.clone()) {
                            log::info!("Watched Docker network {net} removed; waiting for it");
                        }
                        self.check_networks(docker).await
                    }
                    _ => Ok(()),
                }
            }
            _ => {
                self.stats.count_event("other", "other");
                Ok(())
            }
        }
    }

    /// Re-inspects one container and sends what changed for it.
    async fn refresh(&mut self, docker: &bollard::Docker, id: &str) -> Result<(), Lost> {
        let (_, new) = inspect(docker.clone(), id.to_owned(), self.networks.clone()).await?;
        let old = self.sent.remove(id).unwrap_or_default();
        let lines = super::names::change_lines(id, &old, &new);
        for (net, group) in &new {
            if old.get(net) != Some(group) {
                self.send(RegistryMsg::Upsert {
                    origin: self.origin.clone(),
                    source: source(id, net),
                    group: group.clone(),
                })?;
            }
        }
        for net in old.keys().filter(|net| !new.contains_key(*net)) {
            self.send(RegistryMsg::Remove {
                origin: self.origin.clone(),
                source: source(id, net),
            })?;
        }
        if !new.is_empty() {
            self.sent.insert(id.to_owned(), new);
        }
        for line in lines {
            log::info!("{line}");
        }
        self.stats
            .containers
            .store(self.sent.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Sends the gateway set to the DNS listeners, waiting while their
    /// inbox is full but never past a stop request.
    fn send_gateways(&self, mut set: BTreeSet<IpAddr>) -> Result<(), Lost> {
        let Some(tx) = &self.gateways else {
            return Ok(());
        };
        loop {
            match tx.send_timeout(set, STOP_POLL) {
                // Gone listeners (stopping) are not the engine's fault.
                Ok(()) | Err(SendTimeoutError::Disconnected(_)) => return Ok(()),
                Err(SendTimeoutError::Timeout(s)) => {
                    if *self.stop.borrow() {
                        return Err(Lost::Stopped);
                    }
                    set = s;
                }
            }
        }
    }

    /// Sends to the registry, blocking while its inbox is full but never
    /// past a stop request.
    fn send(&self, mut msg: RegistryMsg) -> Result<(), Lost> {
        loop {
            match self.registry.send_timeout(msg, STOP_POLL) {
                Ok(()) => return Ok(()),
                Err(SendTimeoutError::Timeout(m)) => {
                    if *self.stop.borrow() {
                        return Err(Lost::Stopped);
                    }
                    msg = m;
                }
                Err(SendTimeoutError::Disconnected(_)) => return Err(Lost::Stopped),
            }
        }
    }
}

/// The current groups of one container: empty when it is gone, stopped or
/// opted out.
async fn inspect(
    docker: bollard::Docker,
    id: String,
    networks: Arc<[String]>,
) -> Result<(String, BTreeMap<String, Group>), Lost> {
    let request = docker.inspect_container(&id, None);
    let groups = match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(Ok(c)) => ContainerInfo::from_inspect(c)
            .map(|c| c.groups(&networks))
            .unwrap_or_default(),
        // Removed between the event (or list) and the inspect.
        Ok(Err(BollardError::DockerResponseServerError {
            status_code: 404, ..
        })) => BTreeMap::new(),
        Ok(Err(e @ BollardError::JsonDataError { .. })) => {
            log::warn!("container {id}: unreadable inspect answer ({e}); skipped");
            BTreeMap::new()
        }
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => return Err(timed_out()),
    };
    Ok((id, groups))
}

fn source(id: &str, network: &str) -> Source {
    Source::Container {
        id: id.into(),
        network: network.into(),
    }
}

/// A bollard client for `DOCKER_HOST`: `unix://path` (or a bare path),
/// `tcp://host:port` or `http://host:port`.
fn connect(host: &str) -> Result<bollard::Docker, Lost> {
    let secs = REQUEST_TIMEOUT.as_secs();
    let version = bollard::API_DEFAULT_VERSION;
    let docker = if host.starts_with("unix://") || host.starts_with('/') {
        bollard::Docker::connect_with_unix(host, secs, version)?
    } else if host.starts_with("tcp://") || host.starts_with("http://") {
        bollard::Docker::connect_with_http(host, secs, version)?
    } else if host.starts_with("https://") {
        return Err(Lost::Engine(
            "DOCKER_HOST https:// (TLS) is not supported; use unix:// or tcp:// (behind a \
             TLS-terminating proxy)"
                .into(),
        ));
    } else {
        return Err(Lost::Engine(format!(
            "unsupported DOCKER_HOST {host:?} (expected unix://, tcp:// or http://)"
        )));
    };
    Ok(docker)
}

/// One engine request, bounded by [`REQUEST_TIMEOUT`].
async fn timed<T>(
    request: impl std::future::Future<Output = Result<T, BollardError>>,
) -> Result<T, Lost> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(timed_out()),
    }
}

fn timed_out() -> Lost {
    Lost::Engine(format!("no answer within {REQUEST_TIMEOUT:?}"))
}
