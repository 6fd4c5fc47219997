//! State transfer: which origins this node lacks, which peer to pull them
//! from (a holder first — the neighbour that relayed the news or the peer
//! whose digest showed it — then the owner), batching (one pull carries
//! every origin wanted from that peer), retries, and the digests compared
//! with a random peer (origin → incarnation, version, beat) that reveal
//! what differs.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::core::NodeId;

/// Most pulls in flight at once.
pub const MAX_PULLS: usize = 4;
/// A wanted origin waits this long so that others wanted at the same time
/// travel in the same pull.
pub const PULL_BATCH: Duration = Duration::from_millis(100);
/// Wait before asking the next source after a failed or empty pull.
pub const PULL_RETRY: Duration = Duration::from_millis(500);
/// Longest a pull may take before it counts as failed.
pub const PULL_DEADLINE: Duration = Duration::from_secs(10);
/// Most origins named in one pull.
pub const MAX_PULL_ORIGINS: usize = 4096;
/// Most holders remembered per wanted origin (the oldest go first).
pub const MAX_HINTS: usize = 16;

/// What a pull asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Want {
    /// Every origin the peer holds (a join).
    All,
    Some(Vec<NodeId>),
}

/// One line of a digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Entry {
    pub origin: NodeId,
    pub incarnation: u64,
    pub version: u64,
    pub beat: u64,
    /// The sender holds it as dead or left.
    pub gone: bool,
}

/// Order-independent checksum of a digest.
pub fn digest_sum<'a>(entries: impl Iterator<Item = &'a Entry>) -> u64 {
    entries.fold(0u64, |acc, e| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        e.hash(&mut h);
        acc.wrapping_add(h.finish())
    })
}

/// One origin this node lacks.
#[derive(Clone, Debug)]
struct Wanted {
    since: Instant,
    /// Holders to ask first (most recent last), then the owner.
    hints: Vec<NodeId>,
    /// Sources asked (or skipped) since the last fresh hint: the next is
    /// the newest hint not yet asked, then the owner, again and again.
    tries: u32,
    next_try: Instant,
    in_flight: bool,
}

/// A pull in flight.
#[derive(Clone, Debug)]
struct InFlight {
    origins: Option<Vec<NodeId>>,
    deadline: Instant,
}

/// The pull scheduler.
#[derive(Debug, Default)]
pub struct Transfers {
    wanted: HashMap<NodeId, Wanted>,
    in_flight: HashMap<NodeId, InFlight>,
    /// A bulk pull of everything is wanted (joined, or re-joined).
    pub bulk_done: bool,
    pub pulls_started: u64,
}

impl Transfers {
    /// Wants `origin`, perhaps from `holder`. A holder named again (fresh
    /// news from it) moves to the front: it is the next source asked, even
    /// after every source was tried.
    pub fn want(&mut self, origin: NodeId, holder: Option<NodeId>, now: Instant) {
        let w = self.wanted.entry(origin).or_insert_with(|| Wanted {
            since: now,
            hints: Vec::new(),
            tries: 0,
            next_try: now + PULL_BATCH,
            in_flight: false,
        });
        if let Some(h) = holder
            && h != origin
        {
            w.hints.retain(|x| *x != h);
            if w.hints.len() >= MAX_HINTS {
                w.hints.remove(0);
            }
            w.hints.push(h);
            w.tries = 0;
        }
    }

    pub fn is_wanted(&self, origin: &NodeId) -> bool {
        self.wanted.contains_key(origin)
    }

    /// Satisfied (or no longer wanted).
    pub fn done(&mut self, origin: &NodeId) {
        self.wanted.remove(origin);
    }

    /// The pull in flight from `peer` asks for everything.
    pub fn is_bulk(&self, peer: &NodeId) -> bool {
        self.in_flight
            .get(peer)
            .is_some_and(|f| f.origins.is_none())
    }

    pub fn busy(&self, peer: &NodeId) -> bool {
        self.in_flight.contains_key(peer)
    }

    /// Notes a bulk pull started from `peer`.
    pub fn start_bulk(&mut self, peer: NodeId, now: Instant) {
        self.pulls_started += 1;
        self.in_flight.insert(
            peer,
            InFlight {
                origins: None,
                deadline: now + PULL_DEADLINE,
            },
        );
    }

    /// The pulls due now: (peer, origins). `usable(peer, origin)` says
    /// whether a peer may be asked for an origin (live, not this node).
    pub fn due(
        &mut self,
        now: Instant,
        usable: impl Fn(&NodeId, &NodeId) -> bool,
    ) -> Vec<(NodeId, Vec<NodeId>)> {
        let mut by_peer: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
        let mut ready: Vec<(&NodeId, &mut Wanted)> = self
            .wanted
            .iter_mut()
            .filter(|(_, w)| !w.in_flight && now >= w.next_try)
            .collect();
        ready.sort_unstable_by_key(|(o, w)| (w.since, **o));
        for (origin, w) in ready {
            // Holders first (newest hint first), then the owner. A source
            // that may not be asked is skipped, but the count never runs
            // past the owner: a hint that comes later is still asked.
            let n = w.hints.len() as u32;
            let k = w.tries.min(n);
            let source = if k < n {
                w.hints[(n - 1 - k) as usize]
            } else {
                *origin
            };
            if !usable(&source, origin) {
                w.tries = (k + 1).min(n);
                continue;
            }
            let busy = self.in_flight.contains_key(&source);
            let open = self.in_flight.len() + by_peer.len() < MAX_PULLS;
            let list = match by_peer.get_mut(&source) {
                Some(l) if l.len() < MAX_PULL_ORIGINS => l,
                Some(_) => continue,
                None if !busy && open => by_peer.entry(source).or_default(),
                None => continue,
            };
            list.push(*origin);
            w.in_flight = true;
            w.tries = k.saturating_add(1);
        }
        let mut out: Vec<(NodeId, Vec<NodeId>)> = by_peer.into_iter().collect();
        out.sort_unstable();
        for (peer, origins) in &out {
            self.pulls_started += 1;
            self.in_flight.insert(
                *peer,
                InFlight {
                    origins: Some(origins.clone()),
                    deadline: now + PULL_DEADLINE,
                },
            );
        }
        out
    }

    /// A pull from `peer` ended (the origins it brought were marked done
    /// before): what is still wanted is asked of the next source.
    pub fn finished(&mut self, peer: &NodeId, now: Instant) {
        let Some(f) = self.in_flight.remove(peer) else {
            return;
        };
        for origin in f.origins.unwrap_or_default() {
            if let Some(w) = self.wanted.get_mut(&origin) {
                w.in_flight = false;
                w.next_try = now + PULL_RETRY;
            }
        }
    }

    /// Pulls past their deadline count as failed.
    pub fn expire(&mut self, now: Instant) {
        let late: Vec<NodeId> = self
            .in_flight
            .iter()
            .filter(|(_, f)| now >= f.deadline)
            .map(|(p, _)| *p)
            .collect();
        for p in late {
            self.finished(&p, now);
        }
    }

    /// Forgets wants that no source could satisfy for `after`, and those
    /// `keep` rejects.
    pub fn prune(&mut self, now: Instant, after: Duration, keep: impl Fn(&NodeId) -> bool) {
        self.wanted
            .retain(|o, w| keep(o) && now.saturating_duration_since(w.since) < after);
    }

    /// How `origin` is wanted (tracing).
    pub fn describe(&self, origin: &NodeId) -> String {
        match self.wanted.get(origin) {
            None => "not wanted".into(),
            Some(w) => format!(
                "wanted: {} hints, {} tries, in flight {}",
                w.hints.len(),
                w.tries,
                w.in_flight
            ),
        }
    }

    pub fn n_wanted(&self) -> usize {
        self.wanted.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        let mut a = [0u8; 32];
        a[0] = n;
        a
    }

    #[test]
    fn wanted_origins_are_batched_per_holder_then_fall_back_to_the_owner() {
        let t = Instant::now();
        let mut x = Transfers::default();
        x.want(id(1), Some(id(9)), t);
        x.want(id(2), Some(id(9)), t);
        assert!(x.due(t, |_, _| true).is_empty(), "batch wait");
        let t = t + PULL_BATCH;
        let due = x.due(t, |_, _| true);
        assert_eq!(
            due,
            vec![(id(9), vec![id(1), id(2)])],
            "one pull from the holder"
        );
        // The holder had only origin 1.
        x.done(&id(1));
        x.finished(&id(9), t);
        let t = t + PULL_RETRY;
        let due = x.due(t, |_, _| true);
        assert_eq!(due, vec![(id(2), vec![id(2)])], "then the owner");
    }

    #[test]
    fn a_holder_that_shows_the_origin_after_every_source_failed_is_asked() {
        let t = Instant::now();
        let mut x = Transfers::default();
        x.want(id(1), Some(id(9)), t);
        let t = t + PULL_BATCH;
        assert_eq!(x.due(t, |_, _| true), vec![(id(9), vec![id(1)])]);
        x.finished(&id(9), t);
        // The owner may not be asked, for many ticks.
        let mut t = t;
        for _ in 0..50 {
            t += PULL_RETRY;
            assert!(x.due(t, |p, _| *p != id(1)).is_empty());
        }
        // A peer's digest shows the origin: that peer is asked next.
        x.want(id(1), Some(id(8)), t);
        assert_eq!(x.due(t, |p, _| *p != id(1)), vec![(id(8), vec![id(1)])]);
        x.finished(&id(8), t);
        // And a holder named again is asked again.
        x.want(id(1), Some(id(9)), t);
        let t = t + PULL_RETRY;
        assert_eq!(x.due(t, |p, _| *p != id(1)), vec![(id(9), vec![id(1)])]);
    }

    #[test]
    fn the_digest_sum_ignores_order() {
        let e = |n| Entry {
            origin: id(n),
            incarnation: 1,
            version: n as u64,
            beat: 1,
            gone: false,
        };
        let a = [e(1), e(2), e(3)];
        let b = [e(3), e(1), e(2)];
        assert_eq!(digest_sum(a.iter()), digest_sum(b.iter()));
        assert_ne!(digest_sum(a.iter()), digest_sum(a[..2].iter()));
    }
}
