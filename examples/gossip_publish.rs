//! Measures the gossip threads' CPU time per local record change: one node
//! (in-process [`Gossip`] on 127.0.0.1:0, mDNS off, no peers), a registry
//! holding 1 000 static names of this node, then single-group changes sent
//! to the registry one by one at a steady rate.
//!
//! ```sh
//! cargo run --release --example gossip_publish [changes] [per_second]
//! ```
//!
//! Defaults: 2 000 changes at 500/s. It prints the CPU time of the threads
//! named `gossip` or `gossip-*` (the loop thread, the runtime workers and
//! the bridge), read from `/proc/self/task/*/schedstat`, over an idle window
//! and over the change window of the same length, and the difference per
//! change.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;

use glued::config::{Config, Keyring};
use glued::gossip::{Gossip, GossipStats, Peers};
use glued::registry::{Registry, RegistryMsg, RegistryStats};
use glued::table::{self, Group, Origin, Source};
use smallvec::smallvec;

/// Static names of the node.
const NAMES: u32 = 1_000;

/// Total on-CPU nanoseconds of this process's threads named `prefix` or
/// `prefix-*`, with the number of such threads.
fn threads_cpu_ns(prefix: &str) -> (u64, usize) {
    let per = per_thread_cpu_ns(prefix);
    (per.values().sum(), per.len())
}

/// On-CPU nanoseconds of each thread named `prefix` or `prefix-*`, by
/// name and tid.
fn per_thread_cpu_ns(prefix: &str) -> BTreeMap<(String, String), u64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in dir.flatten() {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let name = comm.trim_end();
        if name != prefix && !name.starts_with(&format!("{prefix}-")) {
            continue;
        }
        let key = (
            comm.trim_end().to_string(),
            task.file_name().to_string_lossy().into_owned(),
        );
        let mut total = 0;
        // schedstat: ns on CPU, ns waiting, timeslices; stat (ticks) as a
        // fallback when the kernel has no schedstat.
        if let Some(ns) = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        {
            total += ns;
        } else if let Ok(stat) = std::fs::read_to_string(path.join("stat")) {
            let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let f: Vec<&str> = after.split_whitespace().collect();
            // Fields 14 and 15 of stat are the 12th and 13th after `)`.
            let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
            // SAFETY: sysconf has no preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
            total += ticks * 1_000_000_000 / hz;
        }
        out.insert(key, total);
    }
    out
}

fn config() -> Config {
    let data_dir =
        std::env::temp_dir().join(format!("glued-gossip-publish-{}", std::process::id()));
    std::fs::create_dir_all(&data_dir).expect("data dir");
    Config {
        node_name: "bench".into(),
        cluster_keys: Keyring::for_tests("bench-key"),
        log: "warn".into(),
        ..Config::loopback(data_dir)
    }
}

fn group(i: u32, generation: u32) -> Group {
    Group {
        names: smallvec![format!("host{i}").into()],
        v4: smallvec![Ipv4Addr::from(0x0a00_0000 + (generation << 12) + i)],
        v6: smallvec![],
        ..Default::default()
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let changes: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2_000);
    let rate: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(500);
    let config = config();
    let origin = Origin {
        id: glued::gossip::local_id(&config.data_dir)?.into(),
        node_name: config.node_name.as_str().into(),
    };
    let table = table::shared(&config.domain, config.ttl_secs);
    let (changed_tx, changed_rx) = bounded(1);
    let registry = Registry::spawn(
        table.clone(),
        Arc::new(RegistryStats::default()),
        origin.id.clone(),
        Some(changed_tx),
    );
    let groups: Vec<(Source, Group)> = (0..NAMES)
        .map(|i| {
            (
                Source::Static {
                    name: format!("host{i}").into(),
                },
                group(i, 0),
            )
        })
        .collect();
    registry.tx.send(RegistryMsg::Replace {
        origin: origin.clone(),
        kind: None,
        groups,
    })?;
    let stats = Arc::new(GossipStats::default());
    let gossip = Gossip::start(
        &config,
        origin.clone(),
        table.clone(),
        registry.tx.clone(),
        changed_rx,
        stats,
        Peers::default(),
    )?;
    // Let the start settle (the node serves its full state from then on).
    std::thread::sleep(Duration::from_millis(1_500));

    let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let window = period * changes;
    let (idle0, n_threads) = threads_cpu_ns("gossip");
    std::thread::sleep(window);
    let (idle1, _) = threads_cpu_ns("gossip");

    let start = Instant::now();
    let per0 = per_thread_cpu_ns("gossip");
    let (busy0, _) = threads_cpu_ns("gossip");
    for k in 0..changes {
        let i = k % NAMES;
        registry.tx.send(RegistryMsg::Upsert {
            origin: origin.clone(),
            source: Source::Static {
                name: format!("host{i}").into(),
            },
            group: group(i, 1 + k / NAMES),
        })?;
        let next = start + period * (k + 1);
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    let elapsed = start.elapsed();
    let (busy1, _) = threads_cpu_ns("gossip");
    let per1 = per_thread_cpu_ns("gossip");
    // Let the trailing publish run before stopping.
    std::thread::sleep(Duration::from_millis(100));

    let idle = idle1 - idle0;
    let busy = busy1 - busy0;
    let idle_scaled = idle as f64 * elapsed.as_secs_f64() / window.as_secs_f64();
    println!("names {NAMES}, changes {changes} at {rate}/s, gossip threads {n_threads}");
    println!(
        "idle window  {:>8.1} ms CPU over {:.2} s",
        idle as f64 / 1e6,
        window.as_secs_f64()
    );
    println!(
        "change window {:>8.1} ms CPU over {:.2} s",
        busy as f64 / 1e6,
        elapsed.as_secs_f64()
    );
    println!(
        "per change: {:.1} us raw, {:.1} us above idle",
        busy as f64 / 1e3 / f64::from(changes),
        (busy as f64 - idle_scaled) / 1e3 / f64::from(changes)
    );
    for ((name, tid), ns) in &per1 {
        let before = per0.get(&(name.clone(), tid.clone())).copied().unwrap_or(0);
        println!(
            "  {name:<14} tid {tid:<8} {:>8.1} ms",
            ns.saturating_sub(before) as f64 / 1e6
        );
    }
    gossip.stop();
    registry.stop();
    let _ = std::fs::remove_dir_all(&config.data_dir);
    Ok(())
}
