//! Health of one upstream: a small state machine driven by the outcomes of
//! the queries sent to it, with time passed in as an argument.
//!
//! Invariant: only timeouts, unreachability and malformed replies count
//! against an upstream ([`Outcome`]); any reply that matches its query —
//! SERVFAIL, REFUSED and question-less errors included — proves it
//! reachable. An upstream that is down receives at most one probe per
//! [`PROBE_INTERVAL`]; any reply it gives (to a probe or to a real query)
//! brings it back up at once.

use std::time::{Duration, Instant};

/// Consecutive failures (timeouts, unreachability, malformed replies) that
/// mark an upstream down.
pub const DOWN_AFTER_FAILURES: u32 = 3;

/// What one attempt sent to an upstream came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A reply that matches the query (address, port, id, question), with
    /// any rcode: SERVFAIL or REFUSED for one name moves that query on but
    /// says nothing bad about the upstream, and a question-less error is
    /// what a server says to a query it cannot take (anyone may send one).
    Replied,
    /// No reply within the attempt's time.
    TimedOut,
    /// The query could not be sent to it.
    Unreachable,
    /// A reply with the query's id from its address that cannot be read.
    Malformed,
}

/// A change of an upstream's state that [`Health::record`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    None,
    WentDown,
    CameBack,
}
/// How often an upstream that is down is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct Health {
    consecutive_failures: u32,
    /// Set while down: when the next probe may be sent.
    next_probe: Option<Instant>,
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

impl Health {
    pub fn new() -> Health {
        Health {
            consecutive_failures: 0,
            next_probe: None,
        }
    }

    pub fn is_up(&self) -> bool {
        self.next_probe.is_none()
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Takes the outcome of one attempt into account.
    pub fn record(&mut self, outcome: Outcome, now: Instant) -> Change {
        match outcome {
            Outcome::Replied if self.on_success() => Change::CameBack,
            Outcome::Replied => Change::None,
            Outcome::TimedOut | Outcome::Unreachable | Outcome::Malformed
                if self.on_failure(now) =>
            {
                Change::WentDown
            }
            Outcome::TimedOut | Outcome::Unreachable | Outcome::Malformed => Change::None,
        }
    }

    /// The upstream replied. Returns true when it was down.
    pub fn on_success(&mut self) -> bool {
        self.consecutive_failures = 0;
        self.next_probe.take().is_some()
    }

    /// The upstream timed out, was unreachable or replied malformed.
    /// Returns true when this failure marked it down.
    pub fn on_failure(&mut self, now: Instant) -> bool {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        if self.is_up() && self.consecutive_failures >= DOWN_AFTER_FAILURES {
            self.next_probe = Some(now + PROBE_INTERVAL);
            return true;
        }
        false
    }

    /// When the next probe is due, if the upstream is down.
    pub fn next_probe(&self) -> Option<Instant> {
        self.next_probe
    }

    /// True (once per interval) when a probe should be sent now; the caller
    /// sends it.
    pub fn take_probe(&mut self, now: Instant) -> bool {
        match self.next_probe {
            Some(at) if now >= at => {
                self.next_probe = Some(now + PROBE_INTERVAL);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goes_down_after_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut h = Health::new();
        for _ in 0..DOWN_AFTER_FAILURES - 1 {
            assert!(!h.on_failure(t0));
        }
        assert!(!h.on_success(), "was up");
        for _ in 0..DOWN_AFTER_FAILURES - 1 {
            assert!(!h.on_failure(t0));
        }
        assert!(h.is_up());
        assert!(h.on_failure(t0), "the Nth failure in a row marks it down");
        assert!(!h.is_up());
        assert!(!h.on_failure(t0), "already down");
        assert_eq!(h.consecutive_failures(), DOWN_AFTER_FAILURES + 1);
    }

    #[test]
    fn down_upstream_is_probed_once_per_interval() {
        let t0 = Instant::now();
        let mut h = Health::new();
        for _ in 0..DOWN_AFTER_FAILURES {
            h.on_failure(t0);
        }
        assert_eq!(h.next_probe(), Some(t0 + PROBE_INTERVAL));
        assert!(!h.take_probe(t0));
        assert!(!h.take_probe(t0 + PROBE_INTERVAL / 2));
        let t1 = t0 + PROBE_INTERVAL;
        assert!(h.take_probe(t1));
        assert!(!h.take_probe(t1), "one probe per interval");
        assert!(!h.take_probe(t1 + PROBE_INTERVAL - Duration::from_millis(1)));
        assert!(h.take_probe(t1 + PROBE_INTERVAL));
        // A failed probe keeps it down without moving the schedule earlier.
        assert!(!h.on_failure(t1 + PROBE_INTERVAL));
        assert!(!h.is_up());
    }

    /// Replies of any rcode never mark an upstream down, even between
    /// failures: only timeouts, unreachability and malformed replies do.
    #[test]
    fn only_timeouts_unreachability_and_malformed_replies_count() {
        let t0 = Instant::now();
        let mut h = Health::new();
        for _ in 0..10 {
            assert_eq!(h.record(Outcome::Replied, t0), Change::None);
        }
        assert!(h.is_up());
        assert_eq!(h.record(Outcome::TimedOut, t0), Change::None);
        assert_eq!(h.record(Outcome::Unreachable, t0), Change::None);
        assert_eq!(h.record(Outcome::Replied, t0), Change::None);
        assert_eq!(h.consecutive_failures(), 0, "a reply resets the count");
        assert_eq!(h.record(Outcome::Malformed, t0), Change::None);
        assert_eq!(h.record(Outcome::TimedOut, t0), Change::None);
        assert_eq!(h.record(Outcome::Unreachable, t0), Change::WentDown);
        assert_eq!(h.record(Outcome::Replied, t0), Change::CameBack);
    }

    #[test]
    fn any_success_brings_it_back() {
        let t0 = Instant::now();
        let mut h = Health::new();
        for _ in 0..DOWN_AFTER_FAILURES {
            h.on_failure(t0);
        }
        assert!(h.on_success(), "reports the recovery");
        assert!(h.is_up());
        assert_eq!(h.next_probe(), None);
        assert!(!h.take_probe(t0 + PROBE_INTERVAL * 10), "up: no probes");
        assert_eq!(h.consecutive_failures(), 0);
    }
}

/// Picks the upstream for the next attempt of a query that already tried
/// `tried` (indexes into `upstreams`): the first healthy one not yet tried,
/// in configuration order. When none is healthy and nothing was tried yet,
/// the down upstream with the fewest consecutive failures (the first one on
/// a tie), so that a total outage still gets one attempt per query.
pub fn choose(upstreams: &[Health], tried: &[u16]) -> Option<usize> {
    let untried = |i: &usize| !tried.contains(&(*i as u16));
    if let Some(i) = (0..upstreams.len())
        .filter(untried)
        .find(|i| upstreams[*i].is_up())
    {
        return Some(i);
    }
    if !tried.is_empty() || upstreams.iter().any(Health::is_up) {
        return None;
    }
    (0..upstreams.len()).min_by_key(|i| upstreams[*i].consecutive_failures())
}

#[cfg(test)]
mod choose_tests {
    use super::*;

    fn down(failures: u32) -> Health {
        let mut h = Health::new();
        for _ in 0..failures {
            h.on_failure(Instant::now());
        }
        assert!(!h.is_up());
        h
    }

    #[test]
    fn healthy_upstreams_in_order_then_nothing() {
        let ups = [Health::new(), down(3), Health::new()];
        assert_eq!(choose(&ups, &[]), Some(0));
        assert_eq!(choose(&ups, &[0]), Some(2), "down one skipped");
        assert_eq!(
            choose(&ups, &[0, 2]),
            None,
            "down one not tried as a fallback"
        );
        assert_eq!(choose(&[], &[]), None);
    }

    #[test]
    fn total_outage_tries_the_best_down_upstream_once() {
        let ups = [down(5), down(3), down(4)];
        assert_eq!(choose(&ups, &[]), Some(1));
        assert_eq!(choose(&ups, &[1]), None);
        let tie = [down(3), down(3)];
        assert_eq!(choose(&tie, &[]), Some(0));
    }
}
