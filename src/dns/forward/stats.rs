//! Counters of the forwarder, rendered as Prometheus text.
//!
//! Invariant: written only with relaxed atomics (never a lock) on the
//! forwarding and TCP threads; the per-upstream list is set once at start
//! and read by the status thread.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds (seconds) of the forward latency histogram buckets.
pub const LATENCY_BUCKETS_SECS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Counters of one upstream.
#[derive(Debug)]
pub struct UpstreamStats {
    pub addr: SocketAddr,
    /// Queries (and probes) sent to it over UDP.
    pub queries: AtomicU64,
    /// Replies accepted from it (any rcode but SERVFAIL/REFUSED).
    pub answers: AtomicU64,
    /// SERVFAIL or REFUSED replies (the query moves on; not a health
    /// failure).
    pub failures: AtomicU64,
    /// Replies with a query's id from its address that could not be read
    /// (a health failure).
    pub malformed: AtomicU64,
    /// Attempts that got no reply in time.
    pub timeouts: AtomicU64,
    /// Queries retried over TCP after a truncated UDP answer.
    pub tcp_queries: AtomicU64,
    /// TCP retries that failed (the truncated answer was passed on).
    pub tcp_failures: AtomicU64,
    pub up: AtomicBool,
}

impl UpstreamStats {
    pub fn new(addr: SocketAddr) -> UpstreamStats {
        UpstreamStats {
            addr,
            queries: AtomicU64::new(0),
            answers: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            tcp_queries: AtomicU64::new(0),
            tcp_failures: AtomicU64::new(0),
            up: AtomicBool::new(true),
        }
    }
}

#[derive(Debug, Default)]
pub struct ForwardStats {
    // Queries accepted or refused by `submit` are counted per serving thread
    // (`glued_dns_forwarded_total`, `glued_dns_forward_rejected_total`).
    /// Upstream answers delivered to clients.
    pub answered: AtomicU64,
    /// SERVFAIL sent by the forwarder (every upstream failed, budget spent,
    /// too many queries in flight).
    pub servfail: AtomicU64,
    /// Replies dropped: unknown id, wrong source address or port, another
    /// question (letter case included), not a response.
    pub unmatched_replies: AtomicU64,
    /// Client queries that joined an identical query already in flight
    /// instead of going upstream.
    pub merged: AtomicU64,
    /// Queries waiting for an upstream right now.
    pub in_flight: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS_SECS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    upstreams: Mutex<Vec<Arc<UpstreamStats>>>,
    /// Liveness of the forwarding thread.
    pub heartbeat: Arc<crate::health::Heartbeat>,
}

impl ForwardStats {
    /// Registers the upstreams (replacing any earlier list) and returns
    /// their counters in the same order.
    pub fn set_upstreams(&self, addrs: &[SocketAddr]) -> Vec<Arc<UpstreamStats>> {
        let list: Vec<_> = addrs
            .iter()
            .map(|a| Arc::new(UpstreamStats::new(*a)))
            .collect();
        *self.upstreams.lock().unwrap_or_else(|e| e.into_inner()) = list.clone();
        list
    }

    /// Records the time from submit to the answer delivered to the client.
    pub fn observe_latency(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS_SECS.iter().position(|b| secs <= *b) {
            self.latency_buckets[i].fetch_add(1, Relaxed);
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_micros
            .fetch_add(elapsed.as_micros().min(u64::MAX as u128) as u64, Relaxed);
    }

    pub fn render(&self, out: &mut String) {
        let counters: [(&str, &str, &AtomicU64); 4] = [
            (
                "glued_forward_answered_total",
                "Upstream answers relayed to clients.",
                &self.answered,
            ),
            (
                "glued_forward_servfail_total",
                "SERVFAIL sent because every upstream failed or the time budget ran out.",
                &self.servfail,
            ),
            (
                "glued_forward_unmatched_replies_total",
                "Upstream replies dropped: unknown id, not from the address and port the query went to, or another question (letter case included).",
                &self.unmatched_replies,
            ),
            (
                "glued_forward_merged_total",
                "Client queries that joined an identical query already in flight instead of going upstream.",
                &self.merged,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP glued_forward_in_flight Queries sent upstream and waiting for a reply (merged client queries share one; probes included).\n\
             # TYPE glued_forward_in_flight gauge\nglued_forward_in_flight {}",
            self.in_flight.load(Relaxed)
        );
        let name = "glued_forward_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from a query's arrival at the forwarder to its upstream answer sent.\n# TYPE {name} histogram"
        );
        let mut cumulative = 0;
        for (bound, count) in LATENCY_BUCKETS_SECS.iter().zip(&self.latency_buckets) {
            cumulative += count.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.latency_count.load(Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {}\n{name}_count {count}",
            self.latency_sum_micros.load(Relaxed) as f64 / 1e6
        );

        let upstreams = self
            .upstreams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        type Field = fn(&UpstreamStats) -> u64;
        let per_upstream: [(&str, &str, &str, Field); 8] = [
            (
                "glued_upstream_up",
                "gauge",
                "1 when the upstream is considered healthy.",
                |u| u.up.load(Relaxed).into(),
            ),
            (
                "glued_upstream_queries_total",
                "counter",
                "Queries and probes sent over UDP.",
                |u| u.queries.load(Relaxed),
            ),
            (
                "glued_upstream_answers_total",
                "counter",
                "Replies relayed to clients (rcode other than SERVFAIL/REFUSED, question-less FORMERR/NOTIMP/NOTAUTH included).",
                |u| u.answers.load(Relaxed),
            ),
            (
                "glued_upstream_failures_total",
                "counter",
                "SERVFAIL or REFUSED replies: the query moved to the next upstream; not counted against health.",
                |u| u.failures.load(Relaxed),
            ),
            (
                "glued_upstream_malformed_total",
                "counter",
                "Replies with a query's id from the upstream that could not be read; counted against health.",
                |u| u.malformed.load(Relaxed),
            ),
            (
                "glued_upstream_timeouts_total",
                "counter",
                "Attempts without a reply in time.",
                |u| u.timeouts.load(Relaxed),
            ),
            (
                "glued_upstream_tcp_queries_total",
                "counter",
                "Truncated answers retried over TCP.",
                |u| u.tcp_queries.load(Relaxed),
            ),
            (
                "glued_upstream_tcp_failures_total",
                "counter",
                "TCP retries that failed.",
                |u| u.tcp_failures.load(Relaxed),
            ),
        ];
        for (name, kind, help, field) in per_upstream {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for u in &upstreams {
                let _ = writeln!(out, "{name}{{upstream=\"{}\"}} {}", u.addr, field(u));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_upstreams_are_labelled() {
        let stats = ForwardStats::default();
        let ups = stats.set_upstreams(&["192.0.2.1:53".parse().unwrap()]);
        ups[0].timeouts.fetch_add(2, Relaxed);
        ups[0].up.store(false, Relaxed);
        stats.observe_latency(Duration::from_micros(300));
        stats.observe_latency(Duration::from_millis(20));
        stats.observe_latency(Duration::from_secs(9));
        let mut out = String::new();
        stats.render(&mut out);
        assert!(out.contains("glued_forward_latency_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(out.contains("glued_forward_latency_seconds_bucket{le=\"0.025\"} 2\n"));
        assert!(out.contains("glued_forward_latency_seconds_bucket{le=\"2.5\"} 2\n"));
        assert!(out.contains("glued_forward_latency_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(out.contains("glued_forward_latency_seconds_count 3\n"));
        assert!(out.contains("glued_upstream_timeouts_total{upstream=\"192.0.2.1:53\"} 2\n"));
        assert!(out.contains("glued_upstream_up{upstream=\"192.0.2.1:53\"} 0\n"));
    }
}
