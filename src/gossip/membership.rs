//! Membership as the replication core sees it: gossip neighbours, every
//! peer ever heard of with its last signed addresses, the SWIM-style probe
//! ring (one direct probe per period, so liveness costs each node the same
//! whatever the fleet's size), and the jittered reconnect timer that dials a
//! random known peer that is not a neighbour whatever the neighbour count
//! (Serf's reconnect), so partitions of any shape heal.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::core::NodeId;

/// Most peers remembered for reconnects (the least recently heard go first).
pub const MAX_KNOWN: usize = 16 * 1024;
/// Bootstrap peers contacted at a join: a random sample, never all.
pub const JOIN_SAMPLE: usize = 3;

/// One peer we know of.
#[derive(Clone, Debug)]
pub struct Known {
    pub addrs: Vec<SocketAddr>,
    pub last_heard: Instant,
}

/// A probe waiting for its ack.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub target: NodeId,
    pub nonce: u64,
    pub deadline: Instant,
    /// Already asked twice.
    pub retried: bool,
}

/// Neighbours, known peers, probes, reconnects.
#[derive(Debug)]
pub struct Membership {
    pub neighbors: HashSet<NodeId>,
    pub known: HashMap<NodeId, Known>,
    /// Shuffled probe order; refilled from the live members when empty.
    ring: Vec<NodeId>,
    pub probe: Option<Probe>,
    pub next_probe: Instant,
    pub next_reconnect: Instant,
    /// Next join of known peers while there is no neighbour.
    pub next_rejoin: Instant,
    nonce: u64,
}

impl Membership {
    pub fn new(now: Instant) -> Membership {
        Membership {
            neighbors: HashSet::new(),
            known: HashMap::new(),
            ring: Vec::new(),
            probe: None,
            next_probe: now,
            next_reconnect: now,
            next_rejoin: now,
            nonce: 0,
        }
    }

    /// Remembers `id` (and its addresses, when given); returns true when the
    /// addresses changed.
    pub fn heard(&mut self, id: NodeId, addrs: Option<&[SocketAddr]>, now: Instant) -> bool {
        if self.known.len() >= MAX_KNOWN && !self.known.contains_key(&id) {
            self.forget_oldest();
        }
        let k = self.known.entry(id).or_insert_with(|| Known {
            addrs: Vec::new(),
            last_heard: now,
        });
        k.last_heard = now;
        match addrs {
            Some(a) if a != k.addrs.as_slice() => {
                k.addrs = a.to_vec();
                true
            }
            _ => false,
        }
    }

    fn forget_oldest(&mut self) {
        if let Some(id) = self
            .known
            .iter()
            .filter(|(id, _)| !self.neighbors.contains(*id))
            .min_by_key(|(_, k)| k.last_heard)
            .map(|(id, _)| *id)
        {
            self.known.remove(&id);
        }
    }

    /// Forgets peers silent for longer than `after`.
    pub fn forget_silent(&mut self, now: Instant, after: Duration) {
        let neighbors = &self.neighbors;
        self.known.retain(|id, k| {
            neighbors.contains(id) || now.saturating_duration_since(k.last_heard) < after
        });
    }

    /// The next peer to probe among `live` (round robin over a shuffled
    /// list, so every member is probed within one round), with a fresh
    /// nonce.
    pub fn next_probe_target(
        &mut self,
        rng: &mut fastrand::Rng,
        live: impl Fn(&NodeId) -> bool,
        members: impl Iterator<Item = NodeId>,
    ) -> Option<(NodeId, u64)> {
        while let Some(id) = self.ring.pop() {
            if live(&id) {
                self.nonce += 1;
                return Some((id, self.nonce));
            }
        }
        self.ring = members.filter(|id| live(id)).collect();
        self.ring.sort_unstable();
        rng.shuffle(&mut self.ring);
        let id = self.ring.pop()?;
        self.nonce += 1;
        Some((id, self.nonce))
    }

    /// A new member joins the current probe round at a random place (as
    /// memberlist does), so it is probed within this round, not the next.
    pub fn add_to_ring(&mut self, rng: &mut fastrand::Rng, id: NodeId) {
        let at = rng.usize(..=self.ring.len());
        self.ring.insert(at, id);
    }

    /// A random known peer that is not a neighbour (nor `me`).
    pub fn reconnect_target(&self, rng: &mut fastrand::Rng, me: &NodeId) -> Option<NodeId> {
        let mut candidates: Vec<NodeId> = self
            .known
            .keys()
            .filter(|id| *id != me && !self.neighbors.contains(*id))
            .copied()
            .collect();
        if candidates.is_empty() {
            return None;
        }
        candidates.sort_unstable();
        Some(candidates[rng.usize(..candidates.len())])
    }
}

/// `base` scaled by a random factor in [0.5, 1.5).
pub fn jitter(rng: &mut fastrand::Rng, base: Duration) -> Duration {
    base.mul_f64(0.5 + rng.f64())
}

/// A random sample of at most [`JOIN_SAMPLE`] of `peers`.
pub fn join_sample(rng: &mut fastrand::Rng, peers: &[NodeId]) -> Vec<NodeId> {
    let mut v = peers.to_vec();
    rng.shuffle(&mut v);
    v.truncate(JOIN_SAMPLE);
    v
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
    fn every_live_member_is_probed_once_per_round() {
        let now = Instant::now();
        let mut m = Membership::new(now);
        let mut rng = fastrand::Rng::with_seed(1);
        let members: Vec<NodeId> = (1..=10).map(id).collect();
        let mut seen = HashSet::new();
        for _ in 0..10 {
            let (t, _) = m
                .next_probe_target(&mut rng, |i| i[0] != 3, members.iter().copied())
                .unwrap();
            seen.insert(t);
        }
        assert_eq!(seen.len(), 9, "all live ones once, never the dead one");
        assert!(!seen.contains(&id(3)));
    }

    #[test]
    fn reconnects_pick_known_peers_that_are_not_neighbors() {
        let now = Instant::now();
        let mut m = Membership::new(now);
        let mut rng = fastrand::Rng::with_seed(2);
        for n in 1..=5 {
            m.heard(id(n), None, now);
        }
        m.neighbors.extend([id(1), id(2), id(3)]);
        for _ in 0..50 {
            let t = m.reconnect_target(&mut rng, &id(5)).unwrap();
            assert_eq!(t, id(4));
        }
        assert_eq!(
            join_sample(&mut rng, &(1..=9).map(id).collect::<Vec<_>>()).len(),
            3
        );
    }
}
