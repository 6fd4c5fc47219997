//! The cost of one record change in the registry thread: a table of 1 000
//! static names and 32 containers, then single-container changes sent one per
//! burst through the real [`Registry`] thread (each waits for the registry's
//! `local_changed` token, so every change is its own publish).
//!
//! ```sh
//! cargo run --release --example registry_churn -- 10000 1000
//! ```
//!
//! Arguments: changes (default 10 000), static names (default 1 000) and
//! reader threads (default 0) that look names up in a loop as DNS threads
//! do. It prints wall-clock and process CPU µs per change (without readers
//! the main thread only sends and waits, so the CPU is the registry's), and
//! how many tables were built from scratch (none expected: readers holding a
//! table no longer force one).

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;

use glued::registry::{Registry, RegistryMsg, RegistryStats};
use glued::table::{self, Group, Origin, Source, SourceKind};
use smallvec::smallvec;

/// Containers that churn.
const CONTAINERS: u32 = 32;

fn process_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn container(origin: &Origin, i: u32, round: u32) -> RegistryMsg {
    RegistryMsg::Upsert {
        origin: origin.clone(),
        source: Source::Container {
            id: format!("{i:064x}").into(),
            network: "glued_net".into(),
        },
        group: Group {
            names: smallvec![format!("web-{i}").into(), "web".into()],
            v4: smallvec![Ipv4Addr::new(172, 18, (round % 200) as u8, i as u8 + 2)],
            v6: smallvec![],
            ..Default::default()
        },
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n_changes: u32 = args.next().map_or(10_000, |a| a.parse().expect("changes"));
    let n_static: u32 = args.next().map_or(1_000, |a| a.parse().expect("names"));
    let n_readers: u32 = args.next().map_or(0, |a| a.parse().expect("readers"));
    let origin = Origin {
        id: "a".repeat(64).into(),
        node_name: "bench".into(),
    };
    let table = table::shared("glued.internal", 5);
    let stats = Arc::new(RegistryStats::default());
    let (changed_tx, changed_rx) = bounded(1);
    let registry = Registry::spawn(
        table.clone(),
        stats.clone(),
        origin.id.clone(),
        Some(changed_tx),
    );
    let statics = (0..n_static)
        .map(|i| {
            let name = compact_str::format_compact!("host{i}");
            let group = Group {
                names: smallvec![name.clone()],
                v4: smallvec![Ipv4Addr::new(10, 1, (i / 250) as u8, (i % 250 + 1) as u8)],
                v6: smallvec![],
                ..Default::default()
            };
            (Source::Static { name }, group)
        })
        .collect();
    let send = |m| registry.tx.send(m).expect("registry alive");
    send(RegistryMsg::Replace {
        origin: origin.clone(),
        kind: Some(SourceKind::Static),
        groups: statics,
    });
    changed_rx.recv().expect("first publish");
    for i in 0..CONTAINERS {
        send(container(&origin, i, 0));
        changed_rx.recv().expect("publish");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let n_lookups = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..n_readers)
        .map(|_| {
            let (table, stop, n_lookups) = (table.clone(), stop.clone(), n_lookups.clone());
            std::thread::spawn(move || {
                let mut key = Vec::with_capacity(16);
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    key.clear();
                    key.extend_from_slice(b"host");
                    key.extend_from_slice((i % n_static.max(1)).to_string().as_bytes());
                    let t = table.load();
                    std::hint::black_box(t.lookup(&key));
                    i = i.wrapping_add(1);
                    n_lookups.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let rebuilds_before = stats.rebuilds.load(Ordering::Relaxed);
    let full_before = stats.full_builds.load(Ordering::Relaxed);
    let cpu = process_cpu();
    let start = Instant::now();
    for round in 1..=n_changes {
        send(container(&origin, round % CONTAINERS, round));
        changed_rx.recv().expect("publish");
    }
    let wall = start.elapsed();
    let cpu = process_cpu() - cpu;
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().expect("reader");
    }
    let full_builds = stats.full_builds.load(Ordering::Relaxed) - full_before;
    let rebuilds = stats.rebuilds.load(Ordering::Relaxed) - rebuilds_before;
    let t = table.load();
    assert!(t.lookup(b"web-1").is_some() && t.lookup(b"host0").is_some());
    println!(
        "{n_changes} changes, {} names in the table ({} slots, {} shards), \
         {rebuilds} publishes, {full_builds} built from scratch",
        t.n_names(),
        t.n_name_slots(),
        t.shard_count()
    );
    println!(
        "wall {:.1} µs/change, process CPU {:.1} µs/change",
        wall.as_secs_f64() * 1e6 / f64::from(n_changes),
        cpu.as_secs_f64() * 1e6 / f64::from(n_changes)
    );
    if n_readers > 0 {
        println!(
            "{n_readers} readers: {:.0} lookups/s",
            n_lookups.load(Ordering::Relaxed) as f64 / wall.as_secs_f64()
        );
    }
    drop(t);
    registry.stop();
}
