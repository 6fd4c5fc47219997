//! Query counters of the serving threads.
//!
//! Each serving thread registers its own [`Counters`] block (one cache line
//! pair, written by that thread only, so the hot path never contends on a
//! shared line) and bumps it with plain relaxed loads and stores. The status
//! thread sums every block when it renders Prometheus text.
//!
//! Invariant: counting never allocates, locks or blocks; only
//! [`DnsStats::register`] (once per thread) takes the lock.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use super::wire;

/// Query types counted by name; everything else is `other`.
pub const QTYPE_LABELS: [&str; 7] = ["A", "AAAA", "PTR", "SOA", "NS", "ANY", "other"];
/// Response codes counted by name; everything else (BADVERS) is `other`.
pub const RCODE_LABELS: [&str; 7] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "other",
];

fn qtype_index(qtype: u16) -> usize {
    match qtype {
        wire::TYPE_A => 0,
        wire::TYPE_AAAA => 1,
        wire::TYPE_PTR => 2,
        wire::TYPE_SOA => 3,
        wire::TYPE_NS => 4,
        wire::TYPE_ANY => 5,
        _ => 6,
    }
}

fn rcode_index(rcode: u16) -> usize {
    match rcode {
        0..=5 => rcode as usize,
        _ => 6,
    }
}

/// One serving thread's counters. Single writer: the owning thread.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Counters {
    /// Queries with a parseable question, by type.
    qtype: [AtomicU64; 7],
    /// Responses built by this server (not the forwarder's), by rcode.
    rcode: [AtomicU64; 7],
    /// Answers built locally (any rcode).
    local: AtomicU64,
    /// Queries handed to the forwarder.
    forwarded: AtomicU64,
    /// Queries the forwarder could not take (answered SERVFAIL).
    forward_rejected: AtomicU64,
    /// Packets dropped unanswered (short, QR=1, oversized).
    dropped: AtomicU64,
    /// Answers sent with TC=1.
    truncated: AtomicU64,
    /// Clients outside the allowed networks (answered REFUSED).
    acl_refused: AtomicU64,
    tcp_accepted: AtomicU64,
    /// Connections closed at once because the cap was reached.
    tcp_rejected: AtomicU64,
    /// Connections closed by the idle timeout.
    tcp_idle_closed: AtomicU64,
    /// Idle connections closed to make room for a new one.
    tcp_evicted: AtomicU64,
    /// Connections open now (gauge).
    tcp_open: AtomicU64,
    /// Liveness of the owning thread.
    pub heartbeat: Arc<crate::health::Heartbeat>,
}

#[inline]
fn bump(c: &AtomicU64) {
    c.store(c.load(Relaxed).wrapping_add(1), Relaxed);
}

impl Counters {
    #[inline]
    pub fn query(&self, qtype: u16) {
        bump(&self.qtype[qtype_index(qtype)]);
    }
    /// A response this server built itself.
    #[inline]
    pub fn local(&self, rcode: u16, truncated: bool) {
        bump(&self.local);
        bump(&self.rcode[rcode_index(rcode)]);
        if truncated {
            bump(&self.truncated);
        }
    }
    #[inline]
    pub fn forwarded(&self) {
        bump(&self.forwarded);
    }
    #[inline]
    pub fn forward_rejected(&self) {
        bump(&self.forward_rejected);
    }
    #[inline]
    pub fn dropped(&self) {
        bump(&self.dropped);
    }
    #[inline]
    pub fn acl_refused(&self) {
        bump(&self.acl_refused);
    }
    pub fn tcp_accepted(&self) {
        bump(&self.tcp_accepted);
    }
    pub fn tcp_rejected(&self) {
        bump(&self.tcp_rejected);
    }
    pub fn tcp_idle_closed(&self) {
        bump(&self.tcp_idle_closed);
    }
    pub fn tcp_evicted(&self) {
        bump(&self.tcp_evicted);
    }
    pub fn set_tcp_open(&self, n: usize) {
        self.tcp_open.store(n as u64, Relaxed);
    }
}

/// Sums of every thread's counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub qtype: [u64; 7],
    pub rcode: [u64; 7],
    pub local: u64,
    pub forwarded: u64,
    pub forward_rejected: u64,
    pub dropped: u64,
    pub truncated: u64,
    pub acl_refused: u64,
    pub tcp_accepted: u64,
    pub tcp_rejected: u64,
    pub tcp_idle_closed: u64,
    pub tcp_evicted: u64,
    pub tcp_open: u64,
}

impl Totals {
    /// Responses counted under `rcode` (by label, e.g. `"NXDOMAIN"`).
    pub fn rcode(&self, label: &str) -> u64 {
        RCODE_LABELS
            .iter()
            .position(|l| *l == label)
            .map_or(0, |i| self.rcode[i])
    }
    /// Queries counted under `qtype` (by label, e.g. `"AAAA"`).
    pub fn qtype(&self, label: &str) -> u64 {
        QTYPE_LABELS
            .iter()
            .position(|l| *l == label)
            .map_or(0, |i| self.qtype[i])
    }
}

/// Every serving thread's counters.
#[derive(Debug, Default)]
pub struct DnsStats {
    threads: Mutex<Vec<Arc<Counters>>>,
}

impl DnsStats {
    /// A fresh counter block for one serving thread. Blocks outlive their
    /// thread, so totals never go backwards.
    pub fn register(&self) -> Arc<Counters> {
        let c = Arc::new(Counters::default());
        self.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(c.clone());
        c
    }

    /// What is wrong with any serving thread at `now` (see
    /// [`crate::health::Heartbeat::silent_for`]).
    pub fn problems(&self, now: u64, stale: std::time::Duration) -> Vec<String> {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        threads
            .iter()
            .filter_map(|c| c.heartbeat.silent_for(now, stale))
            .collect()
    }

    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for c in threads.iter() {
            for i in 0..7 {
                t.qtype[i] += c.qtype[i].load(Relaxed);
                t.rcode[i] += c.rcode[i].load(Relaxed);
            }
            t.local += c.local.load(Relaxed);
            t.forwarded += c.forwarded.load(Relaxed);
            t.forward_rejected += c.forward_rejected.load(Relaxed);
            t.dropped += c.dropped.load(Relaxed);
            t.truncated += c.truncated.load(Relaxed);
            t.acl_refused += c.acl_refused.load(Relaxed);
            t.tcp_accepted += c.tcp_accepted.load(Relaxed);
            t.tcp_rejected += c.tcp_rejected.load(Relaxed);
            t.tcp_idle_closed += c.tcp_idle_closed.load(Relaxed);
            t.tcp_evicted += c.tcp_evicted.load(Relaxed);
            t.tcp_open += c.tcp_open.load(Relaxed);
        }
        t
    }

    /// Prometheus text exposition.
    pub fn render(&self, out: &mut String) {
        let t = self.totals();
        let _ = writeln!(
            out,
            "# HELP glued_dns_queries_total DNS queries received, by question type.\n\
             # TYPE glued_dns_queries_total counter"
        );
        for (label, v) in QTYPE_LABELS.iter().zip(t.qtype) {
            let _ = writeln!(out, "glued_dns_queries_total{{qtype=\"{label}\"}} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP glued_dns_responses_total Responses built by the DNS server itself, by rcode.\n\
             # TYPE glued_dns_responses_total counter"
        );
        for (label, v) in RCODE_LABELS.iter().zip(t.rcode) {
            let _ = writeln!(out, "glued_dns_responses_total{{rcode=\"{label}\"}} {v}");
        }
        let counters = [
            (
                "glued_dns_local_answers_total",
                "Answers built from the name table or as errors.",
                t.local,
            ),
            (
                "glued_dns_forwarded_total",
                "Queries handed to the forwarder.",
                t.forwarded,
            ),
            (
                "glued_dns_forward_rejected_total",
                "Queries the saturated forwarder refused (answered SERVFAIL).",
                t.forward_rejected,
            ),
            (
                "glued_dns_dropped_total",
                "Packets dropped unanswered (short, QR=1, oversized).",
                t.dropped,
            ),
            (
                "glued_dns_truncated_total",
                "Answers sent with TC=1.",
                t.truncated,
            ),
            (
                "glued_dns_acl_refused_total",
                "UDP queries and TCP connections from clients outside the allowed networks.",
                t.acl_refused,
            ),
            (
                "glued_dns_tcp_connections_total",
                "TCP connections accepted.",
                t.tcp_accepted,
            ),
            (
                "glued_dns_tcp_rejected_total",
                "TCP connections closed at once because the cap (in all or per client) was reached.",
                t.tcp_rejected,
            ),
            (
                "glued_dns_tcp_idle_closed_total",
                "TCP connections closed by the idle timeout.",
                t.tcp_idle_closed,
            ),
            (
                "glued_dns_tcp_evicted_total",
                "Idle TCP connections closed to make room for a new one.",
                t.tcp_evicted,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP glued_dns_tcp_open TCP connections open now.\n\
             # TYPE glued_dns_tcp_open gauge\nglued_dns_tcp_open {}",
            t.tcp_open
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_summed_in_the_rendered_text() {
        let stats = DnsStats::default();
        let a = stats.register();
        let b = stats.register();
        a.query(wire::TYPE_A);
        b.query(wire::TYPE_A);
        b.query(99);
        a.local(wire::RCODE_NXDOMAIN, false);
        b.local(wire::RCODE_BADVERS, true);
        let t = stats.totals();
        assert_eq!(t.qtype("A"), 2);
        assert_eq!(t.qtype("other"), 1);
        assert_eq!(t.rcode("NXDOMAIN"), 1);
        assert_eq!(t.truncated, 1);
        let mut out = String::new();
        stats.render(&mut out);
        assert!(
            out.contains("glued_dns_queries_total{qtype=\"A\"} 2\n"),
            "{out}"
        );
        assert!(out.contains("glued_dns_responses_total{rcode=\"other\"} 1\n"));
        assert!(out.contains("glued_dns_local_answers_total 2\n"));
    }
}
