//! What the replication core knows of each remote origin: its incarnation,
//! liveness (alive, suspected, dead, left), the version of its records we
//! hold, the owner-signed messages that prove them (so any holder can serve
//! them: a full state plus the consecutive deltas after it), and deltas that
//! arrived out of order.
//!
//! Invariant: an origin's records change only through messages signed by
//! that origin (the core never builds them), in version order; a dead or
//! left origin is revived only by a signed `Alive` with a higher beat or a
//! newer incarnation, never by a late state transfer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::wire::Change;

/// Most out-of-order deltas kept per origin while waiting for the missing
/// ones; beyond it the origin is pulled whole.
pub const MAX_PENDING: usize = 256;
/// Most signed deltas kept after an origin's signed full state (what a
/// holder serves); beyond it the holder stops serving that origin until it
/// pulls a fresh full state from the owner.
pub const MAX_TAIL: usize = 256;
/// Most groups accepted from one origin (a full state with more is refused).
pub const MAX_GROUPS_PER_ORIGIN: usize = 16_384;

/// Where an origin stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Alive,
    /// A probe of it failed at `beat`; dead at `since + lease` unless it
    /// refutes with a higher beat.
    Suspect {
        since: Instant,
    },
    /// Suspected for a whole lease (records dropped) since `since`.
    Dead {
        since: Instant,
    },
    /// Said goodbye (records dropped) at `since`.
    Left {
        since: Instant,
    },
}

impl Status {
    pub fn is_live(self) -> bool {
        matches!(self, Status::Alive | Status::Suspect { .. })
    }

    /// When it stopped being live.
    pub fn gone_since(self) -> Option<Instant> {
        match self {
            Status::Dead { since } | Status::Left { since } => Some(since),
            _ => None,
        }
    }
}

/// One remote origin.
#[derive(Debug)]
pub struct OriginState {
    pub node_name: Arc<str>,
    pub incarnation: u64,
    /// Highest `Alive` beat seen in this incarnation, and its signed bytes.
    pub beat: u64,
    pub alive_raw: Option<Arc<[u8]>>,
    pub addrs: Vec<SocketAddr>,
    pub status: Status,
    /// Version of the records we hold for this incarnation; `None` until a
    /// full state of this incarnation arrived.
    pub known: Option<u64>,
    /// Highest version heard of in this incarnation.
    pub advertised: u64,
    /// The registry holds records of this origin (perhaps of an older
    /// incarnation: kept until the new one's full state replaces them).
    pub holds: bool,
    /// Signed full state at `known`'s base and the signed deltas after it.
    pub snapshot: Option<Arc<[u8]>>,
    pub tail: Vec<Arc<[u8]>>,
    pub pending: BTreeMap<u64, (Vec<Change>, Arc<[u8]>)>,
    pub gap_since: Option<Instant>,
    pub last_heard: Instant,
}

/// What applying a delta did.
#[derive(Debug, PartialEq, Eq)]
pub enum DeltaOutcome {
    /// Applied, with any pending ones that followed: the change lists in order.
    Applied(Vec<Vec<Change>>),
    /// Older than what we hold.
    Stale,
    /// Kept for later (a gap before it), or dropped because no full state
    /// is held yet.
    Held,
}

impl OriginState {
    pub fn new(node_name: Arc<str>, incarnation: u64, now: Instant) -> OriginState {
        OriginState {
            node_name,
            incarnation,
            beat: 0,
            alive_raw: None,
            addrs: Vec::new(),
            status: Status::Alive,
            known: None,
            advertised: 0,
            holds: false,
            snapshot: None,
            tail: Vec::new(),
            pending: BTreeMap::new(),
            gap_since: None,
            last_heard: now,
        }
    }

    /// A newer incarnation (a restart): what we hold stays in the registry
    /// until its full state arrives; everything about versions restarts.
    pub fn restart(&mut self, incarnation: u64) {
        self.incarnation = incarnation;
        self.beat = 0;
        self.alive_raw = None;
        self.known = None;
        self.advertised = 0;
        self.snapshot = None;
        self.tail.clear();
        self.pending.clear();
        self.gap_since = None;
    }

    /// Forgets what we hold (lease over, or it left).
    pub fn clear_records(&mut self) {
        self.known = None;
        self.snapshot = None;
        self.tail.clear();
        self.pending.clear();
        self.gap_since = None;
        self.holds = false;
    }

    /// Notes that `version` exists.
    pub fn advertise(&mut self, version: u64, now: Instant) {
        self.advertised = self.advertised.max(version);
        if let Some(k) = self.known
            && self.advertised > k
        {
            self.gap_since.get_or_insert(now);
        }
    }

    /// True when we lack its records, or a gap has lasted `grace`.
    pub fn wants_state(&self, now: Instant, grace: std::time::Duration) -> bool {
        if !self.status.is_live() {
            return false;
        }
        match self.known {
            None => self.beat > 0 || self.advertised > 0,
            Some(k) => {
                self.advertised > k
                    && self
                        .gap_since
                        .is_some_and(|t| now.saturating_duration_since(t) >= grace)
            }
        }
    }

    /// A delta of the current incarnation.
    pub fn delta(
        &mut self,
        version: u64,
        changes: Vec<Change>,
        raw: Arc<[u8]>,
        now: Instant,
    ) -> DeltaOutcome {
        self.advertised = self.advertised.max(version);
        match self.known {
            Some(k) if version <= k => DeltaOutcome::Stale,
            Some(k) if k.checked_add(1) == Some(version) => {
                let mut out = vec![changes];
                self.push_tail(raw);
                let mut next = version;
                while let Some((c, raw)) = take_next(&mut self.pending, next) {
                    out.push(c);
                    self.push_tail(raw);
                    next += 1;
                }
                self.known = Some(next);
                self.gap_since = (self.advertised > next).then_some(now);
                self.holds = true;
                DeltaOutcome::Applied(out)
            }
            _ => {
                if self.pending.len() >= MAX_PENDING {
                    // Too far behind: the next full state replaces it all.
                    self.pending.clear();
                }
                self.pending.insert(version, (changes, raw));
                self.gap_since.get_or_insert(now);
                DeltaOutcome::Held
            }
        }
    }

    /// A full state of the current incarnation at `version`: returns the
    /// change lists of the pending deltas that follow it, or `None` when it
    /// is older than what we hold.
    pub fn full_state(
        &mut self,
        version: u64,
        raw: Arc<[u8]>,
        now: Instant,
    ) -> Option<Vec<Vec<Change>>> {
        if self.known.is_some_and(|k| version < k) {
            return None;
        }
        self.snapshot = Some(raw);
        self.tail.clear();
        self.holds = true;
        self.advertised = self.advertised.max(version);
        self.pending = match version.checked_add(1) {
            Some(after) => self.pending.split_off(&after),
            None => BTreeMap::new(),
        };
        let mut out = Vec::new();
        let mut next = version;
        while let Some((c, raw)) = take_next(&mut self.pending, next) {
            out.push(c);
            self.push_tail(raw);
            next += 1;
        }
        self.known = Some(next);
        self.gap_since = (self.advertised > next).then_some(now);
        Some(out)
    }

    fn push_tail(&mut self, raw: Arc<[u8]>) {
        if self.snapshot.is_none() {
            return;
        }
        if self.tail.len() >= MAX_TAIL {
            // Cannot serve it any more; a pull from the owner refreshes it.
            self.snapshot = None;
            self.tail.clear();
            return;
        }
        self.tail.push(raw);
    }

    /// The signed messages that give a peer this origin's records, or none
    /// when we cannot prove them.
    pub fn proof(&self) -> Vec<Arc<[u8]>> {
        let (Some(alive), Some(snap)) = (&self.alive_raw, &self.snapshot) else {
            return Vec::new();
        };
        if !self.status.is_live() {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(2 + self.tail.len());
        out.push(alive.clone());
        out.push(snap.clone());
        out.extend(self.tail.iter().cloned());
        out
    }
}

/// Takes the pending delta that follows `version`, if any.
fn take_next<T>(pending: &mut BTreeMap<u64, T>, version: u64) -> Option<T> {
    pending.remove(&version.checked_add(1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(n: u8) -> Arc<[u8]> {
        Arc::from(vec![n])
    }

    #[test]
    fn deltas_apply_in_order_after_a_full_state() {
        let now = Instant::now();
        let mut o = OriginState::new("a".into(), 1, now);
        assert_eq!(o.delta(2, vec![], raw(2), now), DeltaOutcome::Held);
        assert!(o.gap_since.is_some());
        let after = o.full_state(1, raw(1), now).unwrap();
        assert_eq!(after.len(), 1, "the pending delta 2 follows");
        assert_eq!(o.known, Some(2));
        assert_eq!(o.delta(2, vec![], raw(2), now), DeltaOutcome::Stale);
        assert!(matches!(
            o.delta(3, vec![], raw(3), now),
            DeltaOutcome::Applied(v) if v.len() == 1
        ));
        o.alive_raw = Some(raw(0));
        assert_eq!(o.proof().len(), 4, "alive, snapshot, two deltas");
        assert!(o.full_state(2, raw(9), now).is_none(), "older than held");
    }

    #[test]
    fn a_gap_waits_for_the_grace_then_wants_state() {
        let now = Instant::now();
        let g = std::time::Duration::from_millis(300);
        let mut o = OriginState::new("a".into(), 1, now);
        assert!(!o.wants_state(now, g), "nothing heard of yet");
        o.beat = 1;
        assert!(o.wants_state(now, g), "alive, no state");
        o.full_state(1, raw(1), now);
        o.advertise(3, now);
        assert!(!o.wants_state(now, g));
        assert!(o.wants_state(now + g, g));
        o.status = Status::Dead { since: now };
        assert!(!o.wants_state(now + g, g), "never for a dead origin");
    }

    #[test]
    fn a_long_tail_stops_serving_until_a_fresh_full_state() {
        let now = Instant::now();
        let mut o = OriginState::new("a".into(), 1, now);
        o.alive_raw = Some(raw(0));
        o.full_state(0, raw(0), now);
        for v in 1..=MAX_TAIL as u64 + 1 {
            o.delta(v, vec![], raw(1), now);
        }
        assert!(o.proof().is_empty());
        assert_eq!(o.known, Some(MAX_TAIL as u64 + 1), "records still held");
    }
}
