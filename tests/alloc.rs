//! Zero heap allocations per local answer, after warm-up, and none owned
//! by a peer's usual group.
//!
//! A counting global allocator must own its test binary, so this is not in
//! `tests/it`. Allocations are counted per thread, so only the code under
//! test (run on the test's own thread) is measured: the pure answer
//! function, one real `recvmmsg`/`sendmmsg` pass of the UDP loop, and a
//! group taken from the wire as the gossip thread takes it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};

use glued::dns::acl::Acl;
use glued::dns::answer::{self, Context, MAX_MESSAGE_LEN, Outcome, Transport};
use glued::dns::cache::{Cache, CacheConfig, Lookup};
use glued::dns::forward::{ForwardStats, Forwarder};
use glued::dns::stats::DnsStats;
use glued::dns::udp::{self, UdpWorker};
use glued::gossip::wire::{WireGroup, WireSource};
use glued::table::{Group, Health, Origin, Source, Table, parse_srv};
use smallvec::smallvec;

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

fn allocations() -> u64 {
    ALLOCS.with(|c| c.get())
}

// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn table() -> Table {
    let mut groups = BTreeMap::new();
    // `db`: held on this host (node-a, unhealthy: left out) and on two
    // peers (healthy, no check), with SRV ports: a health-filtered,
    // nearest-first name with SRV records and additional addresses.
    for (node, name, v4, v6, health, srv) in [
        (
            "node-a",
            "api",
            vec!["10.0.0.1"],
            vec!["fd00::1"],
            Health::None,
            "",
        ),
        ("node-b", "api", vec!["10.0.0.2"], vec![], Health::None, ""),
        ("node-a", "web", vec!["10.0.0.3"], vec![], Health::None, ""),
        (
            "node-a",
            "db",
            vec!["10.0.1.1"],
            vec![],
            Health::Unhealthy,
            "pg=5432",
        ),
        (
            "node-a",
            "db",
            vec!["10.0.1.2"],
            vec!["fd00::12"],
            Health::Healthy,
            "pg=5432",
        ),
        (
            "node-b",
            "db",
            vec!["10.0.1.3"],
            vec![],
            Health::Healthy,
            "pg=5432",
        ),
        (
            "node-c",
            "db",
            vec!["10.0.1.4"],
            vec![],
            Health::None,
            "pg=5432",
        ),
    ] {
        let n = groups.len();
        groups.insert(
            (
                Origin {
                    id: node.into(),
                    node_name: node.into(),
                },
                Source::Container {
                    id: format!("c{n}").into(),
                    network: "net".into(),
                },
            ),
            Group {
                names: smallvec![format!("{name}-{n}").into(), name.into()],
                v4: v4.iter().map(|a| a.parse().unwrap()).collect(),
                v6: v6.iter().map(|a| a.parse().unwrap()).collect(),
                health,
                srv: srv.split(',').filter_map(parse_srv).collect(),
                ..Default::default()
            },
        );
    }
    Table::build_for("glued.internal", 5, 1, Arc::new(groups), "node-a")
}

/// Local queries of every kind, with the rcode each must get.
fn queries() -> Vec<(Vec<u8>, ResponseCode)> {
    [
        ("API.glued.internal.", RecordType::A, ResponseCode::NoError),
        (
            "api.node-a.glued.internal.",
            RecordType::AAAA,
            ResponseCode::NoError,
        ),
        // Pinned keys held by one node have no slot of their own: answered
        // from their base's, a second lookup (a miss too).
        (
            "web.node-a.glued.internal.",
            RecordType::A,
            ResponseCode::NoError,
        ),
        (
            "_pg._tcp.db-6.node-c.glued.internal.",
            RecordType::SRV,
            ResponseCode::NoError,
        ),
        (
            "nope.node-a.glued.internal.",
            RecordType::A,
            ResponseCode::NXDomain,
        ),
        (
            "nope.glued.internal.",
            RecordType::A,
            ResponseCode::NXDomain,
        ),
        ("x.invalid.", RecordType::AAAA, ResponseCode::NXDomain),
        ("localhost.", RecordType::A, ResponseCode::NoError),
        (
            "node-a.glued.internal.",
            RecordType::A,
            ResponseCode::NoError,
        ),
        ("ns.glued.internal.", RecordType::A, ResponseCode::NoError),
        (
            "0.0.10.in-addr.arpa.",
            RecordType::TXT,
            ResponseCode::NoError,
        ),
        ("web.", RecordType::AAAA, ResponseCode::NoError),
        (
            "3.0.0.10.in-addr.arpa.",
            RecordType::PTR,
            ResponseCode::NoError,
        ),
        ("glued.internal.", RecordType::SOA, ResponseCode::NoError),
        ("DB.glued.internal.", RecordType::A, ResponseCode::NoError),
        ("db.", RecordType::ANY, ResponseCode::NoError),
        (
            "_PG._tcp.db.glued.internal.",
            RecordType::SRV,
            ResponseCode::NoError,
        ),
        (
            "_pg._tcp.db.node-b.glued.internal.",
            RecordType::SRV,
            ResponseCode::NoError,
        ),
        (
            "_tcp.db.glued.internal.",
            RecordType::SRV,
            ResponseCode::NoError,
        ),
    ]
    .into_iter()
    .map(|(name, rtype, rcode)| {
        let mut m = Message::new(42, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        (m.to_vec().unwrap(), rcode)
    })
    .collect()
}

fn context(rotation: usize) -> Context {
    Context {
        transport: Transport::Udp,
        local: "127.0.0.1".parse().unwrap(),
        rotation,
        recursion: true,
    }
}

#[test]
fn the_answer_function_allocates_nothing_per_local_answer() {
    let table = table();
    assert!(table.n_name_slots() < table.n_names(), "no implied key");
    let queries = queries();
    let mut out = Vec::with_capacity(MAX_MESSAGE_LEN);
    for (q, rcode) in &queries {
        let o = answer::answer(q, &table, &context(0), &mut out);
        assert!(matches!(o, Outcome::Answered { .. }), "{o:?}");
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.metadata.response_code, *rcode);
        if m.queries[0].query_type() == RecordType::SRV && !m.answers.is_empty() {
            // SRV answers carry their targets' addresses.
            assert!(!m.additionals.is_empty(), "{m:?}");
        }
    }
    // The health filter and this host first: node-a's healthy holder
    // leads, its unhealthy one is left out.
    let (db_a, _) = &queries[queries.len() - 5];
    for rotation in 0..3 {
        answer::answer(db_a, &table, &context(rotation), &mut out);
        let m = Message::from_vec(&out).unwrap();
        let got: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0], "10.0.1.2", "{got:?}");
    }
    let before = allocations();
    for round in 0..1000 {
        for (q, _) in &queries {
            let o = answer::answer(q, &table, &context(round), &mut out);
            assert!(matches!(o, Outcome::Answered { .. }));
        }
    }
    let n = allocations() - before;
    assert_eq!(
        n,
        0,
        "{n} allocations for {} local answers",
        1000 * queries.len()
    );
}

#[test]
fn the_udp_loop_allocates_nothing_per_local_answer() {
    udp_loop_allocates_nothing("127.0.0.1:0");
}

/// On a wildcard bind every datagram carries its destination in a control
/// message and every answer is sent from it: still no allocation.
#[test]
fn the_udp_loop_on_a_wildcard_bind_allocates_nothing_per_local_answer() {
    udp_loop_allocates_nothing("0.0.0.0:0");
}

fn udp_loop_allocates_nothing(bind: &str) {
    let config = glued::config::Config::loopback(std::env::temp_dir());
    let forwarder = Forwarder::start(&config, Arc::new(ForwardStats::default())).unwrap();
    let stats = DnsStats::default();
    let shared = Arc::new(arc_swap::ArcSwap::from_pointee(table()));
    let socket = Arc::new(udp::bind(bind.parse().unwrap()).unwrap());
    let server = SocketAddr::from(([127, 0, 0, 1], socket.local_addr().unwrap().port()));
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
    let queries = queries();
    let mut buf = vec![0u8; 4096];
    let mut measured = 0;
    let mut n_answers = 0;
    for round in 0..50 {
        for (q, _) in &queries {
            client.send_to(q, server).unwrap();
        }
        let mut received = 0;
        while received < queries.len() {
            let before = allocations();
            received += worker.serve_batch().unwrap();
            if round >= 5 {
                measured += allocations() - before;
            }
        }
        for (_, rcode) in &queries {
            let n = client.recv(&mut buf).unwrap();
            let m = Message::from_vec(&buf[..n]).unwrap();
            assert_eq!(m.metadata.response_code, *rcode);
            if round >= 5 {
                n_answers += 1;
            }
        }
    }
    forwarder.stop();
    assert!(n_answers >= 300);
    assert_eq!(
        measured, 0,
        "{measured} allocations for {n_answers} UDP answers"
    );
}

/// Forwardable queries (RD, EDNS, mixed case) for names outside the zone.
fn external_queries() -> Vec<Vec<u8>> {
    ["www.Example.com.", "api.example.ORG.", "mail.example.net."]
        .into_iter()
        .map(|name| {
            let mut m = Message::new(7, MessageType::Query, OpCode::Query);
            m.metadata.recursion_desired = true;
            m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
            m.edns = Some(hickory_proto::op::Edns::new());
            m.to_vec().unwrap()
        })
        .collect()
}

/// An upstream's answer to `query`: one A record, TTL one hour.
fn upstream_answer(query: &[u8]) -> Vec<u8> {
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{RData, Record};
    let q = Message::from_vec(query).unwrap();
    let mut m = Message::response(q.metadata.id, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.metadata.recursion_available = true;
    m.queries = q.queries.clone();
    m.edns = q.edns.clone();
    m.answers.push(Record::from_rdata(
        q.queries[0].name().clone(),
        3600,
        RData::A(A::new(192, 0, 2, 1)),
    ));
    m.to_vec().unwrap()
}

#[test]
fn a_cache_hit_allocates_nothing() {
    let (cache, mut writer) = Cache::new(CacheConfig::default(), Arc::default()).unwrap();
    let queries = external_queries();
    for q in &queries {
        assert!(writer.insert(q, &upstream_answer(q), Instant::now()));
    }
    let reader = cache.reader();
    let mut out = Vec::with_capacity(udp::SEND_BUF_LEN);
    let hit = |out: &mut Vec<u8>, q: &[u8]| {
        let l = reader.answer(q, Transport::Udp, Instant::now(), out);
        assert!(matches!(l, Lookup::Hit { stale: false, .. }), "{l:?}");
    };
    for q in &queries {
        hit(&mut out, q);
        assert_eq!(Message::from_vec(&out).unwrap().answers.len(), 1);
    }
    let before = allocations();
    for _ in 0..1000 {
        for q in &queries {
            hit(&mut out, q);
        }
    }
    let n = allocations() - before;
    assert_eq!(
        n,
        0,
        "{n} allocations for {} cache hits",
        1000 * queries.len()
    );
}

/// A cache hit through the real UDP loop: the queries go upstream once (a
/// stub on loopback), then every answer is a hit built in the batch.
#[test]
fn the_udp_loop_allocates_nothing_per_cache_hit() {
    let upstream = UdpSocket::bind("127.0.0.1:0").unwrap();
    upstream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stub = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut buf = [0u8; 4096];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((n, from)) = upstream.recv_from(&mut buf) {
                    let _ = upstream.send_to(&upstream_answer(&buf[..n]), from);
                }
            }
        }
    });
    let config = glued::config::Config {
        upstreams: vec![upstream_addr],
        ..glued::config::Config::loopback(std::env::temp_dir())
    };
    let forwarder = Forwarder::start_with_cache(
        &config,
        Arc::new(ForwardStats::default()),
        Some(Arc::default()),
    )
    .unwrap();
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
    let queries = external_queries();
    let mut buf = vec![0u8; 4096];
    let mut measured = 0;
    let mut n_answers = 0;
    for round in 0..50 {
        for q in &queries {
            client.send_to(q, server).unwrap();
        }
        let mut received = 0;
        while received < queries.len() {
            let before = allocations();
            received += worker.serve_batch().unwrap();
            if round >= 5 {
                measured += allocations() - before;
            }
        }
        for _ in &queries {
            let n = client.recv(&mut buf).unwrap();
            let m = Message::from_vec(&buf[..n]).unwrap();
            assert_eq!(m.metadata.response_code, ResponseCode::NoError);
            assert_eq!(m.answers.len(), 1);
            if round >= 5 {
                n_answers += 1;
            }
        }
    }
    forwarder.stop();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    stub.join().unwrap();
    assert!(n_answers >= 135);
    assert_eq!(
        measured, 0,
        "{measured} allocations for {n_answers} UDP cache hits"
    );
}

/// Issue 9: most remote records are a static group of one short name and
/// one IPv4 address. Taken from the wire as the gossip thread takes it
/// (`WireSource` → `Source`, `WireGroup` → `Group`), such a group owns no
/// allocation: the registry keeps it inside its one shared `Held`, and
/// nothing of it is left in the gossip thread's allocator arena. A value
/// that owns heap memory allocates to clone, so a clone without allocation
/// shows that it owns none.
#[test]
fn a_remote_static_group_of_one_short_name_owns_no_allocation() {
    let ip = |i: u8| Ipv4Addr::new(10, 1, 4, i);
    // A name of up to 24 bytes is inline (lowercased on the way), and so
    // are up to 4 IPv4 and 1 IPv6 addresses.
    let short: [(&str, Vec<Ipv4Addr>, Vec<Ipv6Addr>); 3] = [
        ("host1234", vec![ip(1)], vec![]),
        ("Host-Of-Exactly-24-Bytes", vec![ip(1)], vec![]),
        ("web", (1..=4).map(ip).collect(), vec![Ipv6Addr::LOCALHOST]),
    ];
    for (name, v4, v6) in short {
        assert!(name.len() <= 24);
        let wire = (
            WireSource::Static(name.into()),
            WireGroup {
                names: vec![name.into()],
                v4: v4.clone(),
                v6: v6.clone(),
                ..WireGroup::default()
            },
        );
        let before = allocations();
        let source = Source::from(wire.0);
        let group = Group::from(wire.1);
        let copies = std::hint::black_box((source.clone(), group.clone()));
        let n = allocations() - before;
        assert_eq!(n, 0, "{n} allocations for {name:?} {v4:?} {v6:?}");
        assert_eq!(source, Source::Static { name: name.into() });
        assert_eq!(group.names[..], [name.to_ascii_lowercase()]);
        assert_eq!((&group.v4[..], &group.v6[..]), (&v4[..], &v6[..]));
        assert_eq!(copies, (source, group));
    }
    // The count sees a longer name's allocation (and its copy's).
    let long = "a-name-of-exactly-25-byte";
    assert_eq!(long.len(), 25);
    let wire = WireGroup {
        names: vec![long.into()],
        v4: vec![ip(1)],
        ..WireGroup::default()
    };
    let before = allocations();
    let group = Group::from(wire);
    drop(std::hint::black_box(group.clone()));
    assert_eq!(allocations() - before, 2);
}

#[test]
fn the_counter_sees_allocations_on_this_thread() {
    let before = allocations();
    drop(std::hint::black_box(vec![1u8; 10]));
    assert_eq!(allocations() - before, 1);
}
