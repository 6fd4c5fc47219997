//! Unit tests of the replication core's hygiene rules (issue 9 item 6 and
//! item 5's "a late pull does not revive"), driving one [`Core`] by hand
//! with messages as the driver would hand them over.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

/// Seals nothing: the tests only read the core's decisions.
struct NoSeal;

impl Seal for NoSeal {
    fn seal(&mut self, _: &Body) -> Arc<[u8]> {
        Arc::from(&b"sealed"[..])
    }
}

const LEASE: Duration = Duration::from_secs(6);
const ME: NodeId = [1; 32];
const B: NodeId = [2; 32];
const C: NodeId = [3; 32];

fn core(now: Instant) -> Core<NoSeal> {
    let mut core = Core::new(ME, "me", 1, Params::new(LEASE), NoSeal, 7, now);
    core.handle(now, Input::Start { bootstrap: vec![] });
    core.handle(now, Input::Ready);
    core.drain();
    core
}

fn signed(origin: NodeId, name: &str, incarnation: u64, body: Body) -> Signed {
    Signed {
        origin,
        node_name: name.into(),
        incarnation,
        body,
        raw: Arc::from(&b"raw"[..]),
    }
}

fn alive(origin: NodeId, name: &str, beat: u64, version: u64) -> Signed {
    let body = Body::Alive {
        beat,
        version,
        addrs: vec![],
    };
    signed(origin, name, 1, body)
}

fn full(origin: NodeId, name: &str, version: u64, n_groups: usize) -> Signed {
    let groups = (0..n_groups)
        .map(|i| {
            let group = WireGroup {
                names: vec![format!("web{i}")],
                v4: vec![std::net::Ipv4Addr::new(
                    10,
                    0,
                    (i / 250) as u8,
                    (i % 250) as u8,
                )],
                ..WireGroup::default()
            };
            (WireSource::Static(format!("web{i}")), group)
        })
        .collect();
    signed(origin, name, 1, Body::FullState { version, groups })
}

/// The registry operations among the outputs produced so far.
fn registry_ops(core: &mut Core<NoSeal>) -> Vec<RegistryOp> {
    core.drain()
        .filter_map(|o| match o {
            Output::Registry(op) => Some(op),
            _ => None,
        })
        .collect()
}

/// B announces itself and C relays B's full state: the core holds B.
fn holding_b(now: Instant) -> Core<NoSeal> {
    let mut core = core(now);
    core.handle(now, Input::NeighborUp(C));
    let msg = alive(B, "b", 1, 1);
    core.handle(now, Input::Gossip { from: C, msg });
    let msg = full(B, "b", 1, 1);
    core.handle(now, Input::Gossip { from: C, msg });
    let ops = registry_ops(&mut core);
    assert!(
        matches!(&ops[..], [RegistryOp::Replace { origin, .. }] if *origin == B),
        "{ops:?}"
    );
    core
}

/// Ticks every 100 ms for `d` without answering anything; returns the
/// registry operations produced.
fn silence(core: &mut Core<NoSeal>, now: &mut Instant, d: Duration) -> Vec<RegistryOp> {
    let end = *now + d;
    let mut ops = Vec::new();
    while *now < end {
        *now += Duration::from_millis(100);
        core.handle(*now, Input::Tick);
        ops.extend(registry_ops(core));
    }
    ops
}

#[test]
fn an_origin_silent_past_its_lease_is_dropped_and_a_late_pull_does_not_revive_it() {
    let mut now = Instant::now();
    let mut core = holding_b(now);
    // B answers no probe: suspected, then dead a lease later.
    let ops = silence(&mut core, &mut now, 3 * LEASE);
    assert!(
        ops.iter()
            .any(|op| matches!(op, RegistryOp::Drop { origin } if *origin == B)),
        "B was not dropped: {ops:?}"
    );
    assert!(!core.origin(&B).unwrap().status.is_live());
    // A pull from C that started before and completes now brings B's
    // same alive and full state.
    let msgs = vec![alive(B, "b", 1, 1), full(B, "b", 1, 1)];
    core.handle(
        now,
        Input::Transfer {
            from: C,
            msgs: Some(msgs),
        },
    );
    let ops = registry_ops(&mut core);
    assert!(ops.is_empty(), "a late pull revived B: {ops:?}");
    assert!(!core.origin(&B).unwrap().status.is_live());
    // B's own newer alive (it was alive after all) does revive it.
    core.handle(
        now,
        Input::Gossip {
            from: C,
            msg: alive(B, "b", 2, 1),
        },
    );
    assert!(core.origin(&B).unwrap().status.is_live());
}

#[test]
fn a_pull_after_a_leave_does_not_revive_the_origin() {
    let now = Instant::now();
    let mut core = holding_b(now);
    let msg = signed(B, "b", 1, Body::Leave);
    core.handle(now, Input::Gossip { from: C, msg });
    let ops = registry_ops(&mut core);
    assert!(
        matches!(&ops[..], [RegistryOp::Drop { origin }] if *origin == B),
        "{ops:?}"
    );
    // Even an alive of a higher beat from that incarnation stays out.
    let msgs = vec![alive(B, "b", 5, 1), full(B, "b", 1, 1)];
    core.handle(
        now,
        Input::Transfer {
            from: C,
            msgs: Some(msgs),
        },
    );
    assert!(registry_ops(&mut core).is_empty());
    assert!(!core.origin(&B).unwrap().status.is_live());
}

#[test]
fn origins_gone_for_several_leases_are_forgotten() {
    let mut now = Instant::now();
    let mut core = holding_b(now);
    let msg = signed(B, "b", 1, Body::Leave);
    core.handle(now, Input::Gossip { from: C, msg });
    silence(&mut core, &mut now, LEASE * (FORGET_LEASES - 1));
    assert!(core.origin(&B).is_some(), "forgotten too early");
    silence(&mut core, &mut now, LEASE + SWEEP_EVERY * 2);
    assert!(core.origin(&B).is_none(), "B is never forgotten");
}

#[test]
fn a_full_state_of_too_many_groups_is_ignored() {
    let now = Instant::now();
    let mut core = core(now);
    core.handle(now, Input::NeighborUp(C));
    let msg = alive(B, "b", 1, 1);
    core.handle(now, Input::Gossip { from: C, msg });
    let msg = full(B, "b", 1, MAX_GROUPS_PER_ORIGIN + 1);
    core.handle(now, Input::Gossip { from: C, msg });
    assert!(registry_ops(&mut core).is_empty());
    let msg = full(B, "b", 1, MAX_GROUPS_PER_ORIGIN);
    core.handle(now, Input::Gossip { from: C, msg });
    assert_eq!(registry_ops(&mut core).len(), 1);
}

#[test]
fn another_process_with_this_nodes_key_is_detected() {
    let now = Instant::now();
    let mut core = core(now);
    // An older life of ours relayed back is not a duplicate.
    let msg = signed(ME, "me", 0, Body::Leave);
    core.handle(now, Input::Gossip { from: C, msg });
    assert_eq!(core.stats.duplicate_keys, 0);
    // A process with our key in a later incarnation is.
    let body = Body::Alive {
        beat: 1,
        version: 1,
        addrs: vec![],
    };
    let msg = signed(ME, "me", 2, body);
    core.handle(now, Input::Gossip { from: C, msg });
    assert_eq!(core.stats.duplicate_keys, 1);
    assert!(registry_ops(&mut core).is_empty());
}

#[test]
fn two_live_origins_with_one_node_name_are_reported_once() {
    let now = Instant::now();
    let mut core = core(now);
    let msg = alive(B, "twin", 1, 1);
    core.handle(now, Input::Gossip { from: C, msg });
    assert_eq!(core.stats.duplicate_names, 0);
    let msg = alive(C, "twin", 1, 1);
    core.handle(now, Input::Gossip { from: C, msg });
    assert_eq!(core.stats.duplicate_names, 1);
    let msg = alive(C, "twin", 2, 1);
    core.handle(now, Input::Gossip { from: C, msg });
    assert_eq!(core.stats.duplicate_names, 1, "reported again");
    // This node's own name too.
    let msg = alive([4; 32], "me", 1, 1);
    core.handle(now, Input::Gossip { from: C, msg });
    assert_eq!(core.stats.duplicate_names, 2);
}

#[test]
fn a_peer_digest_showing_a_held_origin_dead_makes_it_suspect_not_dropped() {
    let now = Instant::now();
    let mut core = holding_b(now);
    let gone = Entry {
        origin: B,
        incarnation: 1,
        version: 0,
        beat: 1,
        gone: true,
    };
    let msg = Direct::DigestFull {
        entries: vec![gone],
        answer: false,
    };
    core.handle(now, Input::Direct { from: C, msg });
    let out: Vec<Output> = core.drain().collect();
    assert!(
        !out.iter()
            .any(|o| matches!(o, Output::Registry(RegistryOp::Drop { .. }))),
        "B dropped on a peer's word: {out:?}"
    );
    assert!(
        out.iter().any(|o| matches!(o, Output::Broadcast(_))),
        "a Suspect goes out so that B can refute: {out:?}"
    );
    let b = core.origin(&B).unwrap();
    assert!(matches!(b.status, Status::Suspect { .. }), "{:?}", b.status);
    assert_eq!(b.known, Some(1), "records kept");
}
