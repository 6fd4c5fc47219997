//! The fleet simulation: many replication cores over iroh-gossip's own
//! HyParView/PlumTree state machines on a seeded simulated network
//! (`glued::gossip::sim`).
//!
//! `cargo run --release --example sim -- --nodes N --seed S [--scenario S]`
//! prints one line of `key=value` figures. Scenarios: `form`, `change`,
//! `partition`, `restart`, `coldstart`, or `all` (the default: form, a
//! minute of steady traffic, changes, a half/half partition of two leases,
//! a restart after ten minutes of quiet). `-` marks a figure the scenario
//! does not measure.

use std::time::Duration;

use glued::gossip::sim::{self, Figures, Sim, SimConfig};

fn main() {
    let mut nodes = 100;
    let mut seed = 1;
    let mut scenario = "all".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next().unwrap_or_else(|| {
                eprintln!("{name} needs a value");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--nodes" => nodes = parse(&value("--nodes"), "--nodes"),
            "--seed" => seed = parse(&value("--seed"), "--seed"),
            "--scenario" => scenario = value("--scenario"),
            other => {
                eprintln!(
                    "unknown argument {other}; expected --nodes N --seed S [--scenario form|change|partition|restart|coldstart|all]"
                );
                std::process::exit(2);
            }
        }
    }
    let wall = std::time::Instant::now();
    let config = SimConfig::new(nodes, seed);
    let lease = config.lease;
    let mut s = Sim::new(config);
    let mut f = Figures::default();
    match scenario.as_str() {
        "coldstart" => {
            let (t, msgs) = sim::coldstart(&mut s);
            f.form_s = t;
            f.join_msgs_total = Some(msgs);
        }
        "form" | "change" | "partition" | "restart" | "all" => {
            let before = s.total().msgs;
            f.form_s = sim::form(&mut s);
            f.join_msgs_total = Some(s.total().msgs - before);
            let all = scenario == "all";
            if all || scenario == "form" || scenario == "change" {
                let (m, b) = sim::steady(&mut s, Duration::from_secs(60));
                eprintln!(
                    "steady minute after forming: msgs_per_node_s={m:.2} bytes_per_node_s={b:.0}"
                );
                f.msgs_per_node_s = Some(m);
                f.bytes_per_node_s = Some(b);
            }
            if (all || scenario == "change")
                && let Some((p50, p99)) = sim::changes(&mut s, 20)
            {
                f.change_p50_ms = Some(p50);
                f.change_p99_ms = Some(p99);
            }
            if all || scenario == "partition" {
                f.heal_s = sim::partition(&mut s, lease * 2).0;
            }
            if all || scenario == "restart" {
                // Quiet: ten minutes of nothing (these figures replace the
                // minute after forming).
                let (m, b) = sim::steady(&mut s, Duration::from_secs(600));
                f.msgs_per_node_s = Some(m);
                f.bytes_per_node_s = Some(b);
                let (t, used) = sim::restart(&mut s, nodes / 3, Duration::ZERO);
                f.restart_s = t;
                f.join_one_msgs = Some(used.msgs);
                f.join_one_bytes = Some(used.bytes);
            }
        }
        other => {
            eprintln!(
                "unknown scenario {other}; expected form|change|partition|restart|coldstart|all"
            );
            std::process::exit(2);
        }
    }
    let st = s.core_stats();
    eprintln!(
        "nodes={nodes} seed={seed} sim_s={:.1} wall_s={:.1} suspects={} refutes={} deaths={} pulls={} dup_keys={} dup_names={}",
        s.elapsed().as_secs_f64(),
        wall.elapsed().as_secs_f64(),
        st.suspects,
        st.refutes,
        st.deaths,
        st.pulls,
        st.duplicate_keys,
        st.duplicate_names
    );
    println!("{f}");
}

fn parse<T: std::str::FromStr>(v: &str, name: &str) -> T {
    v.parse().unwrap_or_else(|_| {
        eprintln!("{name}: {v:?} is not a number");
        std::process::exit(2)
    })
}
