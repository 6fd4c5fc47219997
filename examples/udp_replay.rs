//! A deterministic load for measuring the UDP serving loop's cost per query
//! (instructions, not time): the bench zone of `bench/dns.sh` (1 000 names
//! `hostN` under `glued.internal`), one [`UdpWorker`] on 127.0.0.1, and a
//! client on the same thread that sends bursts of queries (90 % existing A
//! names, 10 % NXDOMAIN) and reads the answers back.
//!
//! Run it under callgrind, counting only the serving loop:
//!
//! ```sh
//! cargo build --release --example udp_replay
//! valgrind --tool=callgrind --toggle-collect='*UdpWorker*serve_batch*' \
//!     target/release/examples/udp_replay 2000 64
//! ```
//!
//! and divide the total by the number of queries it prints. Arguments:
//! rounds (default 2000) and burst size (default 64).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};

use glued::dns::acl::Acl;
use glued::dns::forward::{ForwardStats, Forwarder};
use glued::dns::stats::DnsStats;
use glued::dns::udp::{self, UdpWorker};
use glued::table::{Group, Origin, Source, Table};
use smallvec::smallvec;

/// Names in the zone, as in `bench/lib.sh`.
const ZONE_NAMES: u32 = 1000;

fn table() -> Table {
    let mut groups = BTreeMap::new();
    for i in 0..ZONE_NAMES {
        let name = compact_str::format_compact!("host{i}");
        groups.insert(
            (
                Origin {
                    id: "bench".into(),
                    node_name: "bench".into(),
                },
                Source::Static { name: name.clone() },
            ),
            Group {
                names: smallvec![name],
                v4: smallvec![Ipv4Addr::new(10, 1, (i / 250) as u8, (i % 250 + 1) as u8)],
                v6: smallvec![],
                ..Default::default()
            },
        );
    }
    Table::build("glued.internal", 5, 1, Arc::new(groups))
}

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map_or(2000, |a| a.parse().unwrap());
    let burst: usize = args.next().map_or(64, |a| a.parse().unwrap());
    let config = glued::config::Config {
        node_name: "bench".into(),
        ..glued::config::Config::loopback(std::env::temp_dir())
    };
    let forwarder = Forwarder::start(&config, Arc::new(ForwardStats::default())).unwrap();
    let stats = DnsStats::default();
    let shared = Arc::new(arc_swap::ArcSwap::from_pointee(table()));
    let socket = Arc::new(udp::bind("127.0.0.1:0".parse().unwrap()).unwrap());
    let server = socket.local_addr().unwrap();
    let mut worker = UdpWorker::new(
        socket,
        shared,
        forwarder.clone(),
        stats.register(),
        Acl::new(&config.allow_nets),
    );
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    // A fixed pseudo-random sequence: every tenth query is NXDOMAIN.
    let mut rng = fastrand::Rng::with_seed(20240601);
    let queries: Vec<Vec<u8>> = (0..burst * 16)
        .map(|i| {
            let name = if i % 10 == 9 {
                format!("nx{i}-host.glued.internal.")
            } else {
                format!("host{}.glued.internal.", rng.u32(0..ZONE_NAMES))
            };
            query(i as u16, &name)
        })
        .collect();
    let mut buf = [0u8; 4096];
    let mut answered = 0usize;
    let mut bytes = 0usize;
    for round in 0..rounds {
        let chunk = &queries[(round % 16) * burst..][..burst];
        for q in chunk {
            client.send_to(q, server).unwrap();
        }
        let mut received = 0;
        while received < burst {
            received += worker.serve_batch().unwrap();
        }
        for _ in 0..burst {
            bytes += client.recv(&mut buf).unwrap();
            answered += 1;
        }
    }
    forwarder.stop();
    let totals = stats.totals();
    println!(
        "queries {} answered {answered} bytes {bytes} NXDOMAIN {}",
        rounds * burst,
        totals.rcode("NXDOMAIN")
    );
}
