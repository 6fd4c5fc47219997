//! Docker watcher: feeds the registry with this host's container records.
//!
//! One OS thread runs a small current-thread tokio runtime for bollard. It
//! lists and inspects the containers on the watched networks, sends the full
//! set to the registry (`Replace`), then follows the engine's event stream and
//! sends one `Upsert`/`Remove` per (container, network) that changed. When
//! the engine is unreachable it retries with capped backoff and resyncs.
//!
//! With `dns_bind = "auto"` it also tells the DNS listeners the gateway
//! addresses of the watched networks that exist ([`GatewaySender`]), each
//! time that set changes.
//!
//! Invariants: this thread never writes the table itself, only sends to the
//! registry; the DNS never waits on it; a lost engine removes nothing until
//! the resync after reconnection says what vanished; `stop` returns within
//! [`STOP_POLL`] plus the join.

mod names;
mod watch;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use crossbeam_channel::Sender;

use crate::config::Config;
use crate::dns::listeners::GatewaySender;
use crate::registry::RegistryMsg;
use crate::table::Origin;

pub use names::{ContainerInfo, Endpoint, is_valid_label};

/// First delay before reconnecting to a lost engine.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest delay between reconnection attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Timeout of one engine request (inspect, list, ping; the event stream's
/// headers).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an idle event stream is checked with a ping, to notice a
/// half-open connection to the engine.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
/// Container inspections in flight during a resynchronisation.
pub const RESYNC_CONCURRENCY: usize = 8;
/// How often a blocked registry send checks for stop.
pub const STOP_POLL: Duration = Duration::from_millis(50);
/// Events replayed from before the resync, so none falls in the gap
/// between the list and the subscription.
pub const EVENTS_REPLAY_SECS: u64 = 2;

/// Events counted for `/metrics`, as (type, action).
pub const COUNTED_EVENTS: [(&str, &str); 12] = [
    ("container", "create"),
    ("container", "health_status"),
    ("container", "start"),
    ("container", "die"),
    ("container", "destroy"),
    ("container", "rename"),
    ("container", "kill"),
    ("network", "connect"),
    ("network", "disconnect"),
    ("network", "create"),
    ("network", "destroy"),
    ("other", "other"),
];

/// Counters of the Docker thread, for `/metrics`.
#[derive(Debug, Default)]
pub struct DockerStats {
    /// Indexed like [`COUNTED_EVENTS`].
    pub events: [AtomicU64; COUNTED_EVENTS.len()],
    /// Full resynchronisations (the first one at start included).
    pub resyncs: AtomicU64,
    /// Connections re-established after the engine was lost.
    pub reconnects: AtomicU64,
    /// Failed connection attempts and lost sessions.
    pub connect_failures: AtomicU64,
    /// 1 while the event stream is followed, else 0.
    pub connected: AtomicU64,
    /// Containers that currently have at least one record.
    pub containers: AtomicU64,
    /// Liveness of the Docker thread.
    pub heartbeat: Arc<crate::health::Heartbeat>,
    /// When the engine last answered (for `/healthz`).
    pub engine: crate::health::EngineContact,
}

impl DockerStats {
    /// Counts one event; unknown pairs go to `other`.
    pub fn count_event(&self, typ: &str, action: &str) {
        let i = COUNTED_EVENTS
            .iter()
            .position(|&(t, a)| t == typ && a == action)
            .unwrap_or(COUNTED_EVENTS.len() - 1);
        self.events[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text of every counter.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(
            out,
            "# HELP glued_docker_events_total Docker engine events received, by type and action.\n\
             # TYPE glued_docker_events_total counter"
        );
        for (i, (typ, action)) in COUNTED_EVENTS.iter().enumerate() {
            let _ = writeln!(
                out,
                "glued_docker_events_total{{type=\"{typ}\",action=\"{action}\"}} {}",
                self.events[i].load(Ordering::Relaxed)
            );
        }
        for (name, kind, help, value) in [
            (
                "glued_docker_resyncs_total",
                "counter",
                "Full resynchronisations with the engine.",
                &self.resyncs,
            ),
            (
                "glued_docker_reconnects_total",
                "counter",
                "Connections re-established after the engine was lost.",
                &self.reconnects,
            ),
            (
                "glued_docker_connect_failures_total",
                "counter",
                "Failed connection attempts and lost sessions.",
                &self.connect_failures,
            ),
            (
                "glued_docker_engine_connected",
                "gauge",
                "1 while the engine's event stream is followed.",
                &self.connected,
            ),
            (
                "glued_docker_containers_watched",
                "gauge",
                "Containers with at least one record.",
                &self.containers,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
    }
}

/// Beats every [`crate::health::BEAT_INTERVAL`], forever.
async fn beat(heartbeat: &crate::health::Heartbeat) {
    let mut tick = tokio::time::interval(crate::health::BEAT_INTERVAL);
    loop {
        tick.tick().await;
        heartbeat.beat();
    }
}

/// Handle to the Docker thread.
pub struct Docker {
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl Docker {
    /// Starts the Docker thread. Returns at once: an absent engine is not an
    /// error, the thread waits for it.
    pub fn start(
        config: &Config,
        origin: Origin,
        registry: Sender<RegistryMsg>,
        stats: Arc<DockerStats>,
    ) -> anyhow::Result<Docker> {
        Docker::start_with_gateways(config, origin, registry, stats, None)
    }

    /// [`Docker::start`], also sending the watched networks' gateway
    /// addresses to `gateways` whenever they change.
    pub fn start_with_gateways(
        config: &Config,
        origin: Origin,
        registry: Sender<RegistryMsg>,
        stats: Arc<DockerStats>,
        gateways: Option<GatewaySender>,
    ) -> anyhow::Result<Docker> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the Docker thread's runtime")?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let heartbeat = stats.heartbeat.clone();
        let watcher =
            watch::Watcher::new(config, origin, registry, stats, gateways, stop_rx.clone());
        let thread = std::thread::Builder::new()
            .name("docker".into())
            .spawn(move || {
                let alive = heartbeat.enter();
                // The beat runs on the same single-threaded runtime as the
                // watcher: a blocked thread stops both.
                runtime.block_on(async {
                    tokio::select! {
                        _ = watch::run(watcher, stop_rx) => {}
                        _ = beat(&heartbeat) => {}
                    }
                });
                alive.retire();
            })
            .context("spawning the Docker thread")?;
        Ok(Docker {
            stop: stop_tx,
            thread: Some(thread),
        })
    }

    /// Stops the thread and joins it.
    pub fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_every_counter() {
        let stats = DockerStats::default();
        stats.count_event("container", "start");
        stats.count_event("container", "pause");
        let mut out = String::new();
        stats.render(&mut out);
        assert!(out.contains("glued_docker_events_total{type=\"container\",action=\"start\"} 1"));
        assert!(out.contains("glued_docker_events_total{type=\"other\",action=\"other\"} 1"));
        assert!(out.contains("glued_docker_engine_connected 0"));
        assert!(out.contains("glued_docker_resyncs_total 0"));
    }

    #[test]
    fn start_and_stop_without_an_engine_is_quick() {
        let mut config = test_config();
        config.docker_host = "unix:///nonexistent/docker.sock".into();
        let (tx, _rx) = crossbeam_channel::bounded(4);
        let stats = Arc::new(DockerStats::default());
        let t0 = std::time::Instant::now();
        let d = Docker::start(
            &config,
            Origin {
                id: "a".into(),
                node_name: "a".into(),
            },
            tx,
            stats.clone(),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        d.stop();
        assert!(t0.elapsed() < Duration::from_millis(800));
        assert!(stats.connect_failures.load(Ordering::Relaxed) >= 1);
        assert_eq!(stats.connected.load(Ordering::Relaxed), 0);
    }

    fn test_config() -> Config {
        Config {
            node_name: "a".into(),
            allow_nets: vec![],
            networks: vec!["glued_net".into()],
            ..Config::loopback(std::env::temp_dir())
        }
    }
}
