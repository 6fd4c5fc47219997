//! Heap bytes per remote record held by the registry and its tables
//! (issue 9 item 6), counted by a global allocator: one peer's full state of
//! N static names (one address each, as `bench/remote-rss.sh` and
//! `bench/cluster.sh` publish) goes through the real [`Registry`] thread as
//! one `Replace` (as the gossip driver sends it), then one more burst (the
//! published table a patched clone of the first, sharing its shards).
//!
//! ```sh
//! cargo run --release --example remote_mem -- 10000
//! ```
//!
//! Prints live heap bytes per record after each step, the peak during the
//! first publish, and the parts: the registry's state alone (its groups,
//! shared with every table, and the changes it holds until the next
//! publish) and one table built from it (`State::build`: the name and PTR
//! maps, which also hold the registry's indexes).

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use compact_str::CompactString;
use glued::registry::{Registry, RegistryMsg, RegistryStats, State};
use glued::table::{self, Group, Origin, Source};
use smallvec::smallvec;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator, only counting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let n = LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed) + layout.size() as isize;
        PEAK.fetch_max(n, Ordering::Relaxed);
        // SAFETY: the caller's layout is passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        let n = LIVE.fetch_add(new as isize - layout.size() as isize, Ordering::Relaxed)
            + new as isize
            - layout.size() as isize;
        PEAK.fetch_max(n, Ordering::Relaxed);
        // SAFETY: as for `GlobalAlloc::realloc`.
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

fn origin(i: u32) -> Origin {
    Origin {
        id: format!("{i:064x}").into(),
        node_name: format!("node-{i}").into(),
    }
}

/// The full state of a peer with `n` static names.
fn full_state(n: u32) -> RegistryMsg {
    RegistryMsg::Replace {
        origin: origin(1),
        kind: None,
        groups: (0..n)
            .map(|i| {
                let name = CompactString::from(format!("host{i}"));
                let group = Group {
                    names: smallvec![name.clone()],
                    v4: smallvec![Ipv4Addr::new(10, 1, (i / 250) as u8, (i % 250 + 1) as u8)],
                    ..Default::default()
                };
                (Source::Static { name }, group)
            })
            .collect(),
    }
}

fn wait_for(table: &table::SharedTable, key: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while table.load().lookup(key).is_none() {
        assert!(Instant::now() < deadline, "not published");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .map_or(10_000, |a| a.parse().expect("records"));
    let per = |bytes: isize| bytes as f64 / n as f64;

    let base = live();
    let mut state = State::for_local(&origin(0).id);
    let msg = full_state(n);
    let with_msg = live();
    state.apply(msg);
    let state_bytes = live() - base;
    let table = state.build("glued.internal", 5, 1);
    let table_bytes = live() - base - state_bytes;
    println!(
        "parts: message {:.0} B/record (freed once applied), state (groups and pending changes) {:.0}, one table {:.0}",
        per(with_msg - base),
        per(state_bytes),
        per(table_bytes)
    );
    drop(table);
    drop(state);

    let base = live();
    let shared = table::shared("glued.internal", 5);
    let reg = Registry::spawn(
        shared.clone(),
        std::sync::Arc::default(),
        origin(0).id,
        None,
    );
    let msg = full_state(n);
    PEAK.store(live(), Ordering::Relaxed);
    reg.tx.send(msg).expect("registry");
    wait_for(&shared, format!("host{}", n - 1).as_bytes());
    std::thread::sleep(Duration::from_millis(50));
    let one = live() - base;
    let peak = PEAK.load(Ordering::Relaxed) - base;
    reg.tx
        .send(RegistryMsg::Upsert {
            origin: origin(2),
            source: Source::Static {
                name: "other".into(),
            },
            group: Group {
                names: smallvec!["other".into()],
                v4: smallvec![Ipv4Addr::new(10, 9, 0, 1)],
                ..Default::default()
            },
        })
        .expect("registry");
    wait_for(&shared, b"other");
    std::thread::sleep(Duration::from_millis(50));
    let two = live() - base;
    println!(
        "registry thread: after the full state {:.0} B/record (peak {:.0}), after one more burst {:.0}",
        per(one),
        per(peak),
        per(two)
    );
    reg.stop();
    let _ = RegistryStats::default();
}
