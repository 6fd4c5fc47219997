//! Every component's counters, gathered for `/metrics`, and the health
//! verdict for `/healthz`.
//!
//! Each component owns its stats struct (atomics, written on its own
//! thread, and the thread's [`Heartbeat`]); this module only holds them
//! together, renders Prometheus text on demand from the status thread, and
//! lists what is unhealthy.
//!
//! Invariant: every family rendered has one `# HELP` and one `# TYPE` line,
//! and each concept has one name (`promtool check metrics` passes; a test
//! runs it on a live daemon).

use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;

use crate::dns::cache::CacheStats;
use crate::dns::forward::ForwardStats;
use crate::dns::stats::DnsStats;
use crate::docker::DockerStats;
use crate::gossip::GossipStats;
use crate::health::{self, Heartbeat};
use crate::registry::RegistryStats;
use crate::table::Table;

/// What `/healthz` checks about the Docker engine.
#[derive(Clone, Debug)]
pub struct DockerCheck {
    /// The engine's address, for the reason line.
    pub host: String,
    /// The engine must have answered within this long.
    pub window: Duration,
}

#[derive(Default)]
pub struct Metrics {
    pub dns: Arc<DnsStats>,
    pub forward: Arc<ForwardStats>,
    pub registry: Arc<RegistryStats>,
    pub docker: Arc<DockerStats>,
    pub gossip: Arc<GossipStats>,
    /// Liveness of the HTTP status thread.
    pub http: Arc<Heartbeat>,
    /// `None`: the engine is not checked (no Docker watcher).
    pub docker_check: Option<DockerCheck>,
    pub cache: Arc<CacheStats>,
}

impl Metrics {
    /// Prometheus text exposition of every counter.
    pub fn render(&self, table: &Table) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(8192);
        self.dns.render(&mut out);
        self.forward.render(&mut out);
        self.registry.render(&mut out);
        self.docker.render(&mut out);
        self.gossip.render(&mut out);
        self.cache.render(&mut out);
        let _ = writeln!(
            out,
            "# HELP glued_records Addresses in the name table (every origin).\n\
             # TYPE glued_records gauge\nglued_records {}\n\
             # HELP glued_names Names in the name table (every origin).\n\
             # TYPE glued_names gauge\nglued_names {}\n\
             # HELP glued_name_conflicts Names published by containers of different Compose projects, or by static records and containers.\n\
             # TYPE glued_name_conflicts gauge\nglued_name_conflicts {}",
            table.n_records(),
            table.n_names(),
            table.conflicts.len()
        );
        let _ = writeln!(
            out,
            "# HELP glued_build_info The running Glued's version (always 1).\n\
             # TYPE glued_build_info gauge\nglued_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        if let Some(start) = process_start_time_seconds() {
            let _ = writeln!(
                out,
                "# HELP process_start_time_seconds Start time of the process since the Unix epoch in seconds.\n\
                 # TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {start}"
            );
        }
        out
    }

    /// Every reason the daemon is unhealthy now, one line each; empty when
    /// healthy.
    pub fn problems(&self) -> Vec<String> {
        let now = health::now_ms();
        let mut out = self.silent_threads(health::BEAT_STALE);
        if let Some(check) = &self.docker_check {
            out.extend(self.docker.engine.problem(&check.host, check.window, now));
        }
        out
    }
}

impl Metrics {
    /// Component threads that have not beaten for longer than `stale`, or
    /// have died, one line each.
    pub fn silent_threads(&self, stale: Duration) -> Vec<String> {
        let now = health::now_ms();
        let single = [
            &self.registry.heartbeat,
            &self.forward.heartbeat,
            &self.docker.heartbeat,
            &self.gossip.heartbeat,
            &self.http,
        ];
        let mut out = self.dns.problems(now, stale);
        out.extend(single.iter().filter_map(|h| h.silent_for(now, stale)));
        out
    }
}

/// When this process started, in seconds since the Unix epoch (from
/// `/proc`, as Prometheus client libraries do); read once.
pub fn process_start_time_seconds() -> Option<f64> {
    static START: OnceLock<Option<f64>> = OnceLock::new();
    *START.get_or_init(|| {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Field 22 (starttime, in clock ticks after boot), counted after the
        // parenthesised command name, which may hold spaces.
        let after = &stat[stat.rfind(')')? + 1..];
        let ticks: f64 = after.split_whitespace().nth(19)?.parse().ok()?;
        let boot: f64 = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        (hz > 0).then(|| boot + ticks / hz as f64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_help_and_type() {
        let m = Metrics::default();
        m.forward.set_upstreams(&["192.0.2.1:53".parse().unwrap()]);
        m.dns.register();
        let text = m.render(&crate::table::Table::empty("glued.internal", 5));
        let mut help = std::collections::BTreeSet::new();
        let mut typ = std::collections::BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                assert!(
                    help.insert(rest.split(' ').next().unwrap().to_string()),
                    "{line}"
                );
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                assert!(
                    typ.insert(rest.split(' ').next().unwrap().to_string()),
                    "{line}"
                );
            }
        }
        assert_eq!(help, typ);
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| typ.contains(*f)))
                .unwrap_or(name);
            assert!(typ.contains(family), "no TYPE for {line}");
        }
        assert!(text.contains("glued_build_info{version=\""));
        assert!(text.contains("\nprocess_start_time_seconds "));
    }

    #[test]
    fn process_start_time_is_in_the_past_and_recent() {
        let start = process_start_time_seconds().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            start <= now + 1.0 && start > now - 86_400.0,
            "{start} vs {now}"
        );
    }
}
