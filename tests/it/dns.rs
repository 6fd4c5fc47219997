//! Integration tests: dns. A real registry, table, forwarder (no upstreams)
//! and DNS server on 127.0.0.1:0, queried over real UDP and TCP sockets.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

use glued::config::Config;
use glued::dns::DnsServer;
use glued::dns::TcpLimits;
use glued::dns::forward::{ForwardStats, Forwarder};
use glued::dns::stats::DnsStats;
use glued::dns::tcp::TCP_PER_CLIENT;
use glued::registry::{Registry, RegistryMsg, RegistryStats};
use glued::table::{self, Group, Origin, Source};
use smallvec::smallvec;

use crate::support::test_config;

/// How long a test waits for an answer that must come.
const ANSWER_WAIT: Duration = Duration::from_secs(2);
/// How long a test waits to be sure that no answer comes.
const SILENCE_WAIT: Duration = Duration::from_millis(300);

struct Server {
    dns: Option<DnsServer>,
    registry: Option<Registry>,
    forwarder: Forwarder,
    stats: Arc<DnsStats>,
    udp: SocketAddr,
    tcp: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(d) = self.dns.take() {
            d.stop();
        }
        self.forwarder.stop();
        if let Some(r) = self.registry.take() {
            r.stop();
        }
    }
}

fn origin(node: &str) -> Origin {
    Origin {
        id: format!("id-{node}").into(),
        node_name: node.into(),
    }
}

fn upsert(node: &str, name: &str, ips: &[IpAddr]) -> RegistryMsg {
    RegistryMsg::Upsert {
        origin: origin(node),
        source: Source::Static { name: name.into() },
        group: Group {
            names: smallvec![name.into()],
            v4: ips
                .iter()
                .filter_map(|i| match i {
                    IpAddr::V4(a) => Some(*a),
                    _ => None,
                })
                .collect(),
            v6: ips
                .iter()
                .filter_map(|i| match i {
                    IpAddr::V6(a) => Some(*a),
                    _ => None,
                })
                .collect(),
            ..Default::default()
        },
    }
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

/// `n` IPv4 addresses 10.9.x.y.
fn many(n: u16) -> Vec<IpAddr> {
    (0..n)
        .map(|i| IpAddr::V4(Ipv4Addr::new(10, 9, (i / 250) as u8, (i % 250) as u8 + 1)))
        .collect()
}

fn start() -> Server {
    start_with(test_config(), TcpLimits::default())
}

/// Starts registry, forwarder and DNS server, loads the test records and
/// waits until the table holds them.
fn start_with(config: Config, limits: TcpLimits) -> Server {
    let table = table::shared(&config.domain, config.ttl_secs);
    let registry = Registry::spawn(
        table.clone(),
        Arc::new(RegistryStats::default()),
        "id-node-a",
        None,
    );
    for msg in [
        upsert("node-a", "api", &ips(&["10.0.0.1", "fd00::1"])),
        upsert("node-b", "api", &ips(&["10.0.0.2"])),
        upsert("node-a", "web", &ips(&["10.0.0.3"])),
        upsert("node-a", "mid", &many(50)),
        upsert("node-a", "big", &many(100)),
    ] {
        registry.tx.send(msg).unwrap();
    }
    let deadline = Instant::now() + ANSWER_WAIT;
    while table.load().lookup(b"big").is_none() {
        assert!(Instant::now() < deadline, "registry never published");
        std::thread::sleep(Duration::from_millis(5));
    }
    let forwarder = Forwarder::start(&config, Arc::new(ForwardStats::default())).unwrap();
    let stats = Arc::new(DnsStats::default());
    let dns =
        DnsServer::start_with(&config, table, forwarder.clone(), stats.clone(), limits).unwrap();
    Server {
        udp: dns.udp_addr,
        tcp: dns.tcp_addr,
        dns: Some(dns),
        registry: Some(registry),
        forwarder,
        stats,
    }
}

fn query_bytes(name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new(fastrand::u16(..), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if let Some(p) = edns {
        let mut e = Edns::new();
        e.set_max_payload(p);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

/// Sends raw bytes over UDP; the reply, or None after `wait`.
fn udp_raw(server: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(wait)).unwrap();
    sock.send_to(bytes, server).unwrap();
    let mut buf = vec![0; 65535];
    match sock.recv(&mut buf) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(_) => None,
    }
}

fn udp_ask(server: SocketAddr, name: &str, rtype: RecordType, edns: Option<u16>) -> Message {
    let q = query_bytes(name, rtype, edns);
    let reply = udp_raw(server, &q, ANSWER_WAIT).expect("no UDP answer");
    let m = Message::from_vec(&reply).unwrap();
    assert_eq!(&reply[..2], &q[..2], "id not echoed");
    m
}

fn tcp_connect(server: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(server).unwrap();
    s.set_read_timeout(Some(ANSWER_WAIT)).unwrap();
    s
}

fn tcp_send(s: &mut TcpStream, bytes: &[u8]) {
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    s.write_all(&framed).unwrap();
}

/// Reads one framed message; None on close or timeout.
fn tcp_recv(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0; 2];
    s.read_exact(&mut len).ok()?;
    let mut buf = vec![0; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).ok()?;
    Some(buf)
}

fn tcp_ask(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
    let mut s = tcp_connect(server);
    tcp_send(&mut s, &query_bytes(name, rtype, None));
    Message::from_vec(&tcp_recv(&mut s).expect("no TCP answer")).unwrap()
}

fn addresses(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

/// Proof the server still answers, over UDP and TCP.
fn assert_alive(s: &Server) {
    let m = udp_ask(s.udp, "web.", RecordType::A, None);
    assert_eq!(addresses(&m), ["10.0.0.3"]);
    let m = tcp_ask(s.tcp, "web.", RecordType::A);
    assert_eq!(addresses(&m), ["10.0.0.3"]);
}

fn rcode_of(reply: &[u8]) -> ResponseCode {
    Message::from_vec(reply).unwrap().metadata.response_code
}

fn soa_in_authority(m: &Message) -> bool {
    m.authorities.len() == 1
        && matches!(&m.authorities[0].data, RData::SOA(soa) if soa.minimum == 5)
        && m.authorities[0].name.to_ascii() == "glued.internal."
}

#[test]
fn a_and_aaaa_from_the_table() {
    let s = start();
    let m = udp_ask(s.udp, "web.glued.internal.", RecordType::A, None);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(addresses(&m), ["10.0.0.3"]);
    assert_eq!(m.answers[0].ttl, 5);
    let m = udp_ask(s.udp, "api.node-a.glued.internal.", RecordType::AAAA, None);
    assert_eq!(addresses(&m), ["fd00::1"]);
    let t = s.stats.totals();
    assert_eq!(t.qtype("A"), 1);
    assert_eq!(t.qtype("AAAA"), 1);
    assert_eq!(t.rcode("NOERROR"), 2);
}

#[test]
fn nodata_and_nxdomain_both_carry_the_soa() {
    let s = start();
    let nodata = udp_ask(s.udp, "web.glued.internal.", RecordType::AAAA, None);
    assert_eq!(nodata.metadata.response_code, ResponseCode::NoError);
    assert!(nodata.answers.is_empty());
    assert!(soa_in_authority(&nodata), "{nodata:?}");
    let other_type = udp_ask(s.udp, "web.", RecordType::MX, None);
    assert_eq!(other_type.metadata.response_code, ResponseCode::NoError);
    assert!(soa_in_authority(&other_type));
    for name in ["nope.glued.internal.", "web.node-b.glued.internal."] {
        let m = udp_ask(s.udp, name, RecordType::A, None);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert!(m.metadata.authoritative);
        assert!(soa_in_authority(&m), "{name}: {m:?}");
    }
    // Never forwarded: the forwarder saw nothing.
    assert_eq!(s.stats.totals().forwarded, 0);
}

#[test]
fn ptr_for_v4_and_v6_addresses() {
    let s = start();
    let m = udp_ask(s.udp, "3.0.0.10.in-addr.arpa.", RecordType::PTR, None);
    let RData::PTR(ptr) = &m.answers[0].data else {
        panic!("{m:?}")
    };
    assert_eq!(ptr.0.to_ascii(), "web.glued.internal.");
    let v6 = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.";
    let m = udp_ask(s.udp, v6, RecordType::PTR, None);
    let RData::PTR(ptr) = &m.answers[0].data else {
        panic!("{m:?}")
    };
    assert_eq!(ptr.0.to_ascii(), "api.glued.internal.");
    assert!(m.metadata.authoritative);
}

#[test]
fn apex_soa_and_ns_and_any() {
    let s = start();
    let m = udp_ask(s.udp, "glued.internal.", RecordType::SOA, None);
    let RData::SOA(soa) = &m.answers[0].data else {
        panic!("{m:?}")
    };
    assert_eq!(soa.mname.to_ascii(), "ns.glued.internal.");
    assert_eq!(soa.minimum, 5);
    let m = udp_ask(s.udp, "glued.internal.", RecordType::NS, None);
    let RData::NS(ns) = &m.answers[0].data else {
        panic!("{m:?}")
    };
    assert_eq!(ns.0.to_ascii(), "ns.glued.internal.");
    let m = udp_ask(s.udp, "api.node-a.glued.internal.", RecordType::ANY, None);
    let mut got = addresses(&m);
    got.sort();
    assert_eq!(got, ["10.0.0.1", "fd00::1"]);
}

#[test]
fn the_query_case_is_echoed() {
    let s = start();
    let m = udp_ask(s.udp, "WeB.GlUeD.InTeRnAl.", RecordType::A, None);
    assert_eq!(m.queries[0].name().to_ascii(), "WeB.GlUeD.InTeRnAl.");
    assert_eq!(m.answers[0].name.to_ascii(), "WeB.GlUeD.InTeRnAl.");
    assert_eq!(addresses(&m), ["10.0.0.3"]);
}

#[test]
fn multi_address_answers_rotate_this_nodes_addresses_first() {
    let s = start();
    // The registry runs as node-a: its holder of `api` always comes first.
    for _ in 0..6 {
        let m = udp_ask(s.udp, "api.", RecordType::A, None);
        let mut all = addresses(&m);
        assert_eq!(all[0], "10.0.0.1", "{all:?}");
        all.sort();
        assert_eq!(all, ["10.0.0.1", "10.0.0.2"]);
    }
    // Among this node's addresses, the first one rotates.
    let mut firsts = std::collections::HashSet::new();
    for _ in 0..6 {
        let m = udp_ask(s.udp, "mid.", RecordType::A, Some(1232));
        let all = addresses(&m);
        assert_eq!(all.len(), 50);
        firsts.insert(all[0].clone());
    }
    assert!(firsts.len() > 1, "the first address never changed");
}

#[test]
fn single_label_domain_and_node_pinned_names() {
    let s = start();
    let mut both = addresses(&udp_ask(s.udp, "api.", RecordType::A, None));
    both.sort();
    assert_eq!(both, ["10.0.0.1", "10.0.0.2"]);
    let mut under = addresses(&udp_ask(s.udp, "api.glued.internal.", RecordType::A, None));
    under.sort();
    assert_eq!(under, both);
    let a = udp_ask(s.udp, "api.node-a.glued.internal.", RecordType::A, None);
    assert_eq!(addresses(&a), ["10.0.0.1"]);
    let b = udp_ask(s.udp, "api.node-b.glued.internal.", RecordType::A, None);
    assert_eq!(addresses(&b), ["10.0.0.2"]);
}

#[test]
fn large_answer_truncated_over_udp_and_whole_over_tcp() {
    let s = start();
    for edns in [None, Some(1232), Some(4096)] {
        let m = udp_ask(s.udp, "big.", RecordType::A, edns);
        assert!(m.metadata.truncation, "{edns:?}");
        assert!(m.answers.is_empty());
        assert_eq!(m.queries.len(), 1);
        assert_eq!(m.edns.is_some(), edns.is_some());
    }
    let m = tcp_ask(s.tcp, "big.", RecordType::A);
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 100);
    assert!(s.stats.totals().truncated >= 3);
}

#[test]
fn edns_payload_size_is_honoured() {
    let s = start();
    // 50 A records: ~850 bytes.
    let plain = udp_ask(s.udp, "mid.", RecordType::A, None);
    assert!(plain.metadata.truncation);
    let small = udp_ask(s.udp, "mid.", RecordType::A, Some(700));
    assert!(small.metadata.truncation);
    let fits = udp_ask(s.udp, "mid.", RecordType::A, Some(1232));
    assert!(!fits.metadata.truncation);
    assert_eq!(fits.answers.len(), 50);
    assert_eq!(fits.edns.as_ref().unwrap().max_payload(), 1232);
}

#[test]
fn pipelined_tcp_queries_are_all_answered() {
    let s = start();
    let mut conn = tcp_connect(s.tcp);
    let names = [
        "web.",
        "api.node-a.glued.internal.",
        "nope.",
        "big.",
        "web.",
    ];
    let mut ids = Vec::new();
    let mut batch = Vec::new();
    for name in names {
        let q = query_bytes(name, RecordType::A, None);
        ids.push(u16::from_be_bytes([q[0], q[1]]));
        batch.extend_from_slice(&(q.len() as u16).to_be_bytes());
        batch.extend_from_slice(&q);
    }
    conn.write_all(&batch).unwrap();
    for (i, id) in ids.iter().enumerate() {
        let m = Message::from_vec(&tcp_recv(&mut conn).expect("answer")).unwrap();
        assert_eq!(m.metadata.id, *id, "answer {i} out of order");
    }
}

#[test]
fn idle_tcp_client_is_dropped_while_others_are_served() {
    let limits = TcpLimits {
        idle_timeout: Duration::from_millis(400),
        ..TcpLimits::default()
    };
    let s = start_with(test_config(), limits);
    let mut idle = tcp_connect(s.tcp);
    let started = Instant::now();
    // Others are served meanwhile.
    for _ in 0..3 {
        assert_eq!(
            addresses(&tcp_ask(s.tcp, "web.", RecordType::A)),
            ["10.0.0.3"]
        );
    }
    let mut buf = [0; 1];
    idle.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let n = idle.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "idle connection got data instead of a close");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(350),
        "closed too early: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(2),
        "closed too late: {waited:?}"
    );
    assert_eq!(s.stats.totals().tcp_idle_closed, 1);
    assert_alive(&s);
}

#[test]
fn clients_outside_allow_nets_get_refused() {
    let mut config = test_config();
    config.allow_nets = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
    let s = start_with(config, TcpLimits::default());
    let m = udp_ask(s.udp, "web.", RecordType::A, None);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(m.answers.is_empty());
    let m = udp_ask(s.udp, "example.com.", RecordType::A, None);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    // Over TCP the connection is closed at accept.
    let mut c = tcp_connect(s.tcp);
    tcp_send(&mut c, &query_bytes("web.", RecordType::A, None));
    assert_eq!(tcp_recv(&mut c), None);
    let t = s.stats.totals();
    assert_eq!(t.acl_refused, 3);
    assert_eq!(t.forwarded, 0);
}

#[test]
fn a_packet_shorter_than_a_header_is_dropped() {
    let s = start();
    let q = query_bytes("web.", RecordType::A, None);
    assert_eq!(udp_raw(s.udp, &q[..11], SILENCE_WAIT), None);
    assert_eq!(udp_raw(s.udp, &[], SILENCE_WAIT), None);
    assert!(s.stats.totals().dropped >= 2);
    assert_alive(&s);
}

#[test]
fn bad_label_lengths_get_formerr() {
    let s = start();
    let q = query_bytes("web.", RecordType::A, None);
    for bad in [
        // length runs past the end of the packet
        &[0x3F, b'a', b'b', 0, 0, 1, 0, 1][..],
        // reserved label types 0x40 and 0x80
        &[0x41, b'a', 0, 0, 1, 0, 1][..],
        &[0x81, b'a', 0, 0, 1, 0, 1][..],
        // truncated question: no type/class
        &[0x03, b'w', b'e', b'b', 0][..],
    ] {
        let mut p = q[..12].to_vec();
        p.extend_from_slice(bad);
        let reply = udp_raw(s.udp, &p, ANSWER_WAIT).expect("FORMERR expected");
        assert_eq!(rcode_of(&reply), ResponseCode::FormErr, "{bad:?}");
    }
    assert_alive(&s);
}

#[test]
fn a_compression_pointer_loop_gets_formerr() {
    let s = start();
    let q = query_bytes("web.", RecordType::A, None);
    let mut p = q[..12].to_vec();
    // A label, then a pointer back to the label: an endless name.
    p.extend_from_slice(&[0x01, b'a', 0xC0, 12, 0, 1, 0, 1]);
    let reply = udp_raw(s.udp, &p, ANSWER_WAIT).expect("FORMERR expected");
    assert_eq!(rcode_of(&reply), ResponseCode::FormErr);
    let mut p = q[..12].to_vec();
    p.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
    let reply = udp_raw(s.udp, &p, ANSWER_WAIT).expect("FORMERR expected");
    assert_eq!(rcode_of(&reply), ResponseCode::FormErr);
    assert_alive(&s);
}

#[test]
fn qdcount_zero_and_two_get_formerr() {
    let s = start();
    let mut zero = query_bytes("web.", RecordType::A, None)[..12].to_vec();
    zero[5] = 0;
    let reply = udp_raw(s.udp, &zero, ANSWER_WAIT).expect("FORMERR expected");
    assert_eq!(rcode_of(&reply), ResponseCode::FormErr);
    let mut m = Message::new(7, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(
        Name::from_ascii("web.").unwrap(),
        RecordType::A,
    ));
    m.add_query(Query::query(
        Name::from_ascii("api.").unwrap(),
        RecordType::A,
    ));
    let reply = udp_raw(s.udp, &m.to_vec().unwrap(), ANSWER_WAIT).expect("FORMERR expected");
    let r = Message::from_vec(&reply).unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(r.metadata.id, 7);
    assert_alive(&s);
}

#[test]
fn a_packet_with_qr_set_is_dropped() {
    let s = start();
    let mut q = query_bytes("web.", RecordType::A, None);
    q[2] |= 0x80;
    assert_eq!(udp_raw(s.udp, &q, SILENCE_WAIT), None);
    assert_alive(&s);
}

#[test]
fn update_and_notify_get_notimp() {
    let s = start();
    for op in [OpCode::Update, OpCode::Notify] {
        let mut m = Message::new(9, MessageType::Query, op);
        m.add_query(Query::query(
            Name::from_ascii("glued.internal.").unwrap(),
            RecordType::SOA,
        ));
        let reply = udp_raw(s.udp, &m.to_vec().unwrap(), ANSWER_WAIT).expect("NOTIMP expected");
        let r = Message::from_vec(&reply).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NotImp, "{op:?}");
        assert_eq!(r.metadata.op_code, op);
    }
    assert_eq!(s.stats.totals().rcode("NOTIMP"), 2);
    assert_alive(&s);
}

#[test]
fn a_tcp_frame_of_length_zero_closes_the_connection() {
    let s = start();
    let mut conn = tcp_connect(s.tcp);
    conn.write_all(&[0, 0]).unwrap();
    let mut buf = [0; 16];
    assert_eq!(conn.read(&mut buf).unwrap_or(0), 0);
    assert_alive(&s);
}

#[test]
fn a_tcp_frame_of_65535_bytes_of_garbage_gets_formerr() {
    let s = start();
    let mut conn = tcp_connect(s.tcp);
    // Zeros: a QUERY header with QDCOUNT 0, then garbage.
    let mut garbage = vec![0u8; 65535];
    for (i, b) in garbage.iter_mut().enumerate().skip(12) {
        *b = (i * 7) as u8;
    }
    tcp_send(&mut conn, &garbage);
    let reply = tcp_recv(&mut conn).expect("FORMERR expected");
    assert_eq!(rcode_of(&reply), ResponseCode::FormErr);
    // And random bytes with QDCOUNT 1: answered or closed, never a hang.
    garbage[4..6].copy_from_slice(&[0, 1]);
    garbage[12] = 0xC0;
    tcp_send(&mut conn, &garbage);
    let reply = tcp_recv(&mut conn).expect("FORMERR expected");
    assert_eq!(rcode_of(&reply), ResponseCode::FormErr);
    // The connection still works.
    tcp_send(&mut conn, &query_bytes("web.", RecordType::A, None));
    let m = Message::from_vec(&tcp_recv(&mut conn).unwrap()).unwrap();
    assert_eq!(addresses(&m), ["10.0.0.3"]);
    assert_alive(&s);
}

#[test]
fn a_stalled_half_frame_does_not_hold_the_server() {
    let limits = TcpLimits {
        idle_timeout: Duration::from_millis(500),
        ..TcpLimits::default()
    };
    let s = start_with(test_config(), limits);
    let mut stalled = tcp_connect(s.tcp);
    let q = query_bytes("web.", RecordType::A, None);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    stalled.write_all(&framed[..framed.len() / 2]).unwrap();
    // Another client is answered at once.
    let t = Instant::now();
    assert_alive(&s);
    assert!(t.elapsed() < Duration::from_millis(400));
    // The stalled one is closed after the idle timeout.
    let mut buf = [0; 16];
    stalled
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    assert_eq!(stalled.read(&mut buf).unwrap_or(0), 0);
}

#[test]
fn a_thousand_tcp_connections_at_once_do_not_stop_the_server() {
    let limits = TcpLimits {
        idle_timeout: Duration::from_secs(5),
        max_connections: 256,
        ..TcpLimits::default()
    };
    let s = start_with(test_config(), limits);
    let mut conns = Vec::new();
    for _ in 0..1000 {
        match TcpStream::connect_timeout(&s.tcp, Duration::from_secs(2)) {
            Ok(c) => conns.push(c),
            Err(e) => panic!("connect {} failed: {e}", conns.len()),
        }
    }
    // UDP is unaffected while they are open.
    let m = udp_ask(s.udp, "web.", RecordType::A, None);
    assert_eq!(addresses(&m), ["10.0.0.3"]);
    let deadline = Instant::now() + ANSWER_WAIT;
    loop {
        let t = s.stats.totals();
        if t.tcp_accepted + t.tcp_rejected >= 1000 {
            assert!(t.tcp_open <= 256, "cap not enforced: {}", t.tcp_open);
            assert!(t.tcp_rejected >= 744);
            break;
        }
        assert!(Instant::now() < deadline, "not all accepted: {t:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(conns);
    // Once they are gone, TCP answers again.
    let deadline = Instant::now() + ANSWER_WAIT;
    loop {
        let mut c = tcp_connect(s.tcp);
        tcp_send(&mut c, &query_bytes("web.", RecordType::A, None));
        if let Some(r) = tcp_recv(&mut c) {
            assert_eq!(addresses(&Message::from_vec(&r).unwrap()), ["10.0.0.3"]);
            break;
        }
        assert!(Instant::now() < deadline, "TCP never recovered");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_alive(&s);
}

#[test]
fn several_udp_threads_share_one_port_and_stop_promptly() {
    let mut config = test_config();
    config.dns_threads = 3;
    let mut s = start_with(config, TcpLimits::default());
    assert_eq!(s.udp.port(), s.tcp.port());
    for _ in 0..20 {
        assert_eq!(
            addresses(&udp_ask(s.udp, "web.", RecordType::A, None)),
            ["10.0.0.3"]
        );
    }
    let _held = tcp_connect(s.tcp);
    let t = Instant::now();
    s.dns.take().unwrap().stop();
    assert!(
        t.elapsed() < Duration::from_millis(600),
        "stop took {:?}",
        t.elapsed()
    );
}

#[test]
fn ipv6_bind_is_accepted() {
    let mut config = test_config();
    config.dns_bind = "[::1]:0".parse().unwrap();
    if UdpSocket::bind("[::1]:0").is_err() {
        assert!(!crate::support::in_ci(), "no IPv6 loopback in CI");
        eprintln!("skipped: no IPv6 loopback on this machine");
        return;
    }
    let s = start_with(config, TcpLimits::default());
    let sock = UdpSocket::bind("[::1]:0").unwrap();
    sock.set_read_timeout(Some(ANSWER_WAIT)).unwrap();
    sock.send_to(&query_bytes("web.", RecordType::A, None), s.udp)
        .unwrap();
    let mut buf = [0; 512];
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(
        addresses(&Message::from_vec(&buf[..n]).unwrap()),
        ["10.0.0.3"]
    );
}

#[test]
fn metrics_text_counts_queries_by_type_and_rcode() {
    let s = start();
    udp_ask(s.udp, "web.", RecordType::A, None);
    udp_ask(s.udp, "nope.glued.internal.", RecordType::AAAA, None);
    // Forwarded, refused by the forwarder (no upstream): counted once.
    udp_ask(s.udp, "example.com.", RecordType::AAAA, None);
    let mut out = String::new();
    s.stats.render(&mut out);
    assert!(
        out.contains("glued_dns_queries_total{qtype=\"A\"} 1\n"),
        "{out}"
    );
    assert!(
        out.contains("glued_dns_queries_total{qtype=\"AAAA\"} 2\n"),
        "{out}"
    );
    assert!(out.contains("glued_dns_responses_total{rcode=\"NXDOMAIN\"} 1\n"));
    assert!(out.contains("glued_dns_local_answers_total 3\n"), "{out}");
}

/// A stub upstream on loopback: answers every query with its own question
/// and one TXT record; stops after `IDLE` without queries.
fn stub_upstream() -> SocketAddr {
    const IDLE: Duration = Duration::from_secs(5);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(IDLE)).unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, peer)) = sock.recv_from(&mut buf) {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut r = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
            r.metadata.recursion_available = true;
            r.add_queries(q.queries.clone());
            let txt = hickory_proto::rr::rdata::TXT::new(vec!["from-stub".into()]);
            r.add_answer(hickory_proto::rr::Record::from_rdata(
                q.queries[0].name().clone(),
                60,
                RData::TXT(txt),
            ));
            let _ = sock.send_to(&r.to_vec().unwrap(), peer);
        }
    });
    addr
}

fn is_stub_answer(m: &Message) -> bool {
    m.answers.len() == 1
        && matches!(&m.answers[0].data, RData::TXT(t) if t.to_string().contains("from-stub"))
}

#[test]
fn other_names_are_forwarded_over_udp_and_tcp() {
    let mut config = test_config();
    config.upstreams = vec![stub_upstream()];
    let s = start_with(config, TcpLimits::default());
    let m = udp_ask(s.udp, "Example.COM.", RecordType::TXT, None);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(is_stub_answer(&m), "{m:?}");
    // Over TCP, pipelined with a local name: both answered on the one
    // connection.
    let mut conn = tcp_connect(s.tcp);
    let fwd = query_bytes("example.com.", RecordType::TXT, None);
    let local = query_bytes("web.", RecordType::A, None);
    tcp_send(&mut conn, &fwd);
    tcp_send(&mut conn, &local);
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(Message::from_vec(&tcp_recv(&mut conn).expect("answer")).unwrap());
    }
    got.sort_by_key(|m| m.metadata.id != u16::from_be_bytes([fwd[0], fwd[1]]));
    assert!(is_stub_answer(&got[0]), "{:?}", got[0]);
    assert_eq!(addresses(&got[1]), ["10.0.0.3"]);
    let t = s.stats.totals();
    assert_eq!(t.forwarded, 2);
    // Names of the zone never reach the upstream.
    let m = udp_ask(s.udp, "nope.glued.internal.", RecordType::TXT, None);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(s.stats.totals().forwarded, 2);
}

#[test]
fn without_upstreams_other_names_get_servfail_at_once() {
    let s = start();
    let t = Instant::now();
    let m = udp_ask(s.udp, "example.com.", RecordType::A, None);
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(m.queries.len(), 1);
    let m = tcp_ask(s.tcp, "example.com.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(t.elapsed() < Duration::from_millis(500));
    assert_eq!(s.stats.totals().forward_rejected, 2);
}

/// Asks `name` over a UDP socket connected to `server` (as glibc and musl
/// stubs do): a reply from any other address is dropped by the kernel.
fn connected_ask(server: SocketAddr, name: &str, rtype: RecordType) -> Option<Message> {
    let any: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let sock = UdpSocket::bind(any).unwrap();
    sock.connect(server).unwrap();
    sock.set_read_timeout(Some(ANSWER_WAIT)).unwrap();
    let q = query_bytes(name, rtype, None);
    sock.send(&q).unwrap();
    let mut buf = vec![0; 65535];
    let n = sock.recv(&mut buf).ok()?;
    assert_eq!(&buf[..2], &q[..2], "id not echoed");
    Some(Message::from_vec(&buf[..n]).unwrap())
}

#[test]
fn a_wildcard_bind_replies_from_the_address_the_query_was_sent_to() {
    let mut config = test_config();
    config.dns_bind = "0.0.0.0:0".parse().unwrap();
    config.upstreams = vec![stub_upstream()];
    let s = start_with(config, TcpLimits::default());
    // 127.0.0.2 is not the address the route to a loopback client picks
    // as a source (127.0.0.1).
    let at = SocketAddr::new("127.0.0.2".parse().unwrap(), s.udp.port());
    let m = connected_ask(at, "web.", RecordType::A).expect("local answer from 127.0.0.2");
    assert_eq!(addresses(&m), ["10.0.0.3"]);
    let m = connected_ask(at, "example.com.", RecordType::TXT)
        .expect("forwarded answer from 127.0.0.2");
    assert!(is_stub_answer(&m), "{m:?}");
    let t = s.stats.totals();
    assert_eq!((t.local, t.forwarded), (1, 1));
}

#[test]
fn a_dual_stack_wildcard_bind_replies_to_ipv4_from_the_right_address() {
    if UdpSocket::bind("[::]:0").is_err() {
        assert!(!crate::support::in_ci(), "no IPv6 in CI");
        eprintln!("skipped: no IPv6 on this machine");
        return;
    }
    let mut config = test_config();
    config.dns_bind = "[::]:0".parse().unwrap();
    config.upstreams = vec![stub_upstream()];
    let s = start_with(config, TcpLimits::default());
    let at = SocketAddr::new("127.0.0.2".parse().unwrap(), s.udp.port());
    let m = connected_ask(at, "web.", RecordType::A).expect("local answer from 127.0.0.2");
    assert_eq!(addresses(&m), ["10.0.0.3"]);
    let m = connected_ask(at, "example.com.", RecordType::TXT)
        .expect("forwarded answer from 127.0.0.2");
    assert!(is_stub_answer(&m), "{m:?}");
    let at6 = SocketAddr::new("::1".parse().unwrap(), s.udp.port());
    let m = connected_ask(at6, "web.", RecordType::A).expect("local answer from ::1");
    assert_eq!(addresses(&m), ["10.0.0.3"]);
}

/// A server forwarding to a stub upstream (optionally on another bind).
fn start_forwarding(bind: Option<&str>) -> Server {
    let mut config = test_config();
    config.upstreams = vec![stub_upstream()];
    if let Some(bind) = bind {
        config.dns_bind = bind.parse().unwrap();
    }
    start_with(config, TcpLimits::default())
}

/// Waits until `n` queries were counted as forwarded (the count may trail
/// the answer: the forwarder can reply before the serving thread counts).
fn forwarded_eventually(s: &Server, n: u64) {
    let deadline = Instant::now() + ANSWER_WAIT;
    while s.stats.totals().forwarded != n {
        assert!(
            Instant::now() < deadline,
            "forwarded {:?}",
            s.stats.totals()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `query_bytes` with another class than IN.
fn query_class(name: &str, rtype: RecordType, class: u16) -> Vec<u8> {
    let mut q = query_bytes(name, rtype, None);
    let n = q.len();
    q[n - 2..].copy_from_slice(&class.to_be_bytes());
    q
}

fn udp_rcode(server: SocketAddr, q: &[u8]) -> ResponseCode {
    rcode_of(&udp_raw(server, q, ANSWER_WAIT).expect("no UDP answer"))
}

#[test]
fn single_labels_that_are_not_names_are_forwarded() {
    let s = start_forwarding(None);
    for (name, rtype) in [
        ("com.", RecordType::DS),
        ("org.", RecordType::DNSKEY),
        ("internal.", RecordType::SOA),
        ("foo.", RecordType::A),
    ] {
        let m = udp_ask(s.udp, name, rtype, None);
        assert!(is_stub_answer(&m), "{name} {rtype}: {m:?}");
    }
    forwarded_eventually(&s, 4);
    // Single labels that are names stay local.
    let m = udp_ask(s.udp, "web.", RecordType::A, None);
    assert_eq!(addresses(&m), ["10.0.0.3"]);
    let m = udp_ask(s.udp, "web.", RecordType::DS, None);
    assert!(m.answers.is_empty() && soa_in_authority(&m), "{m:?}");
    assert_eq!(s.stats.totals().forwarded, 4);
}

#[test]
fn special_use_names_are_answered_here_and_never_forwarded() {
    let s = start_forwarding(None);
    let m = udp_ask(s.udp, "localhost.", RecordType::A, None);
    assert_eq!(addresses(&m), ["127.0.0.1"]);
    let m = udp_ask(s.udp, "api.LOCALHOST.", RecordType::AAAA, None);
    assert_eq!(addresses(&m), ["::1"]);
    let m = tcp_ask(s.tcp, "localhost.", RecordType::A);
    assert_eq!(addresses(&m), ["127.0.0.1"]);
    for name in ["x.invalid.", "invalid.", "abc.onion.", "a.b.onion."] {
        let m = udp_ask(s.udp, name, RecordType::A, None);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
    }
    for name in ["version.bind.", "id.server."] {
        let q = query_class(name, RecordType::TXT, 3);
        assert_eq!(udp_rcode(s.udp, &q), ResponseCode::Refused, "{name}");
    }
    assert_eq!(s.stats.totals().forwarded, 0);
}

#[test]
fn a_node_name_under_the_domain_is_an_empty_non_terminal() {
    let s = start();
    for name in ["node-a.glued.internal.", "Node-B.glued.internal."] {
        let m = udp_ask(s.udp, name, RecordType::A, None);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
        assert!(
            m.answers.is_empty() && soa_in_authority(&m),
            "{name}: {m:?}"
        );
    }
    let m = udp_ask(s.udp, "node-z.glued.internal.", RecordType::A, None);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
}

#[test]
fn the_ns_target_resolves_to_the_address_the_query_arrived_on() {
    let s = start_forwarding(Some("0.0.0.0:0"));
    for at in ["127.0.0.1", "127.0.0.2"] {
        let server = SocketAddr::new(at.parse().unwrap(), s.udp.port());
        let m = connected_ask(server, "ns.glued.internal.", RecordType::A).expect("answer");
        assert_eq!(addresses(&m), [at]);
        assert!(m.metadata.authoritative);
    }
    let tcp = SocketAddr::new("127.0.0.3".parse().unwrap(), s.tcp.port());
    assert_eq!(
        addresses(&tcp_ask(tcp, "NS.glued.internal.", RecordType::A)),
        ["127.0.0.3"]
    );
    let m = udp_ask(s.udp, "ns.glued.internal.", RecordType::AAAA, None);
    assert!(m.answers.is_empty() && soa_in_authority(&m), "{m:?}");
    // The apex NS points at it.
    let m = udp_ask(s.udp, "glued.internal.", RecordType::NS, None);
    assert!(matches!(&m.answers[0].data, RData::NS(ns) if ns.0.to_ascii() == "ns.glued.internal."));
}

#[test]
fn every_type_at_and_above_a_known_reverse_name_is_answered_here() {
    let s = start_forwarding(None);
    let v6 = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.";
    for (name, rtype) in [
        ("3.0.0.10.in-addr.arpa.", RecordType::TXT),
        ("0.0.10.in-addr.arpa.", RecordType::PTR),
        ("0.10.in-addr.arpa.", RecordType::NS),
        (v6, RecordType::TXT),
        ("d.f.ip6.arpa.", RecordType::PTR),
    ] {
        let m = udp_ask(s.udp, name, rtype, None);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
        assert!(
            m.answers.is_empty() && m.metadata.authoritative,
            "{name}: {m:?}"
        );
    }
    assert_eq!(s.stats.totals().forwarded, 0);
    // Not above any address of the table: forwarded.
    let m = udp_ask(s.udp, "1.168.192.in-addr.arpa.", RecordType::PTR, None);
    assert!(is_stub_answer(&m), "{m:?}");
}

/// The OPT record of a reply, parsed by hand (ARCOUNT and the last 11
/// bytes), so that header-only replies can be checked too.
fn has_opt(reply: &[u8]) -> bool {
    let arcount = u16::from_be_bytes([reply[10], reply[11]]);
    arcount >= 1 && reply.len() >= 12 + 11 && reply[reply.len() - 11..reply.len() - 8] == [0, 0, 41]
}

#[test]
fn every_error_reply_to_a_query_with_opt_carries_one() {
    let s = start();
    let mut notify = query_bytes("web.", RecordType::SOA, Some(1232));
    notify[2] |= 4 << 3;
    let mut formerr = query_bytes("web.", RecordType::A, Some(1232));
    let end = 12 + b"\x03web\x00".len() + 4;
    formerr.splice(end..end, *b"\x03api\x00\x00\x01\x00\x01");
    formerr[5] = 2;
    let axfr = query_bytes("glued.internal.", RecordType::AXFR, Some(1232));
    let servfail = query_bytes("example.com.", RecordType::A, Some(1232));
    for (what, q, rcode) in [
        ("NOTIMP", &notify, ResponseCode::NotImp),
        ("FORMERR", &formerr, ResponseCode::FormErr),
        ("REFUSED", &axfr, ResponseCode::Refused),
        ("SERVFAIL", &servfail, ResponseCode::ServFail),
    ] {
        let reply = udp_raw(s.udp, q, ANSWER_WAIT).expect(what);
        assert_eq!(reply[3] & 0xF, rcode.low(), "{what}");
        assert!(has_opt(&reply), "{what}: no OPT in {reply:?}");
    }
    // Refused by the access list, over UDP and TCP.
    let mut config = test_config();
    config.allow_nets = vec!["10.0.0.0/8".parse().unwrap()];
    let refusing = start_with(config, TcpLimits::default());
    let q = query_bytes("web.", RecordType::A, Some(1232));
    let reply = udp_raw(refusing.udp, &q, ANSWER_WAIT).expect("ACL");
    assert!(has_opt(&reply) && rcode_of(&reply) == ResponseCode::Refused);
}

#[test]
fn zone_transfers_are_refused_for_every_name_over_udp_and_tcp() {
    let s = start_forwarding(None);
    for (name, rtype) in [
        ("example.com.", RecordType::AXFR),
        ("example.com.", RecordType::IXFR),
        ("glued.internal.", RecordType::AXFR),
        ("com.", RecordType::AXFR),
    ] {
        let m = udp_ask(s.udp, name, rtype, None);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{name}");
        let m = tcp_ask(s.tcp, name, rtype);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{name}");
    }
    assert_eq!(s.stats.totals().forwarded, 0);
}

#[test]
fn ra_is_set_only_on_query_replies_and_only_when_forwarding() {
    let local_only = start();
    let m = udp_ask(local_only.udp, "web.", RecordType::A, None);
    assert!(!m.metadata.recursion_available);
    let forwarding = start_forwarding(None);
    let m = udp_ask(forwarding.udp, "web.", RecordType::A, None);
    assert!(m.metadata.recursion_available);
    let mut notify = query_bytes("web.", RecordType::SOA, None);
    notify[2] |= 4 << 3;
    let reply = udp_raw(forwarding.udp, &notify, ANSWER_WAIT).expect("NOTIMP");
    assert_eq!(rcode_of(&reply), ResponseCode::NotImp);
    assert_eq!(reply[3] & 0x80, 0, "RA on a NOTIMP reply");
}

/// `q` signed with a TSIG record (key `k.`, hmac-sha256, a 32-byte MAC).
fn tsig_signed(mut q: Vec<u8>) -> Vec<u8> {
    let ar = u16::from_be_bytes([q[10], q[11]]) + 1;
    q[10..12].copy_from_slice(&ar.to_be_bytes());
    let mut rdata = b"\x0bhmac-sha256\x00".to_vec();
    rdata.extend_from_slice(&[0, 0, 0x65, 0x43, 0x21, 0x00, 1, 44, 0, 32]);
    rdata.extend_from_slice(&[0xAB; 32]);
    rdata.extend_from_slice(&[q[0], q[1], 0, 0, 0, 0]);
    q.extend_from_slice(b"\x01k\x00\x00\xfa\x00\xff\x00\x00\x00\x00");
    q.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    q.extend_from_slice(&rdata);
    q
}

#[test]
fn a_tsig_signed_query_for_the_zone_gets_notauth_badkey() {
    let s = start();
    for name in ["web.glued.internal.", "web."] {
        let q = tsig_signed(query_bytes(name, RecordType::A, None));
        let reply = udp_raw(s.udp, &q, ANSWER_WAIT).expect("answer");
        assert_eq!(reply[3] & 0xF, 9, "{name}: NOTAUTH");
        assert_eq!(&reply[6..8], &[0, 0], "{name}: no answer records");
        // The TSIG echoed last, unsigned, error BADKEY.
        assert_eq!(&reply[reply.len() - 8..], &[0, 0, q[0], q[1], 0, 17, 0, 0]);
    }
}

/// A TCP connection to `server` from `source` (any 127/8 address: all are
/// loopback on Linux).
fn tcp_connect_from(source: &str, server: SocketAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let from = SocketAddr::new(source.parse().unwrap(), 0);
    sock.bind(&from.into()).unwrap();
    sock.connect_timeout(&server.into(), ANSWER_WAIT).unwrap();
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(ANSWER_WAIT)).unwrap();
    s
}

/// Asks `web.` on `c`; true when the right answer came.
fn tcp_web_answered(c: &mut TcpStream) -> bool {
    tcp_send(c, &query_bytes("web.", RecordType::A, None));
    tcp_recv(c).is_some_and(|r| addresses(&Message::from_vec(&r).unwrap()) == ["10.0.0.3"])
}

/// Waits until the server's totals satisfy `done`.
fn totals_eventually(s: &Server, done: impl Fn(&glued::dns::stats::Totals) -> bool) {
    let deadline = Instant::now() + ANSWER_WAIT;
    loop {
        let t = s.stats.totals();
        if done(&t) {
            return;
        }
        assert!(Instant::now() < deadline, "{t:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether the server closed `c` (end of stream or reset), as opposed to
/// keeping it open past the read timeout.
fn closed_by_server(c: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1];
    match c.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
fn refused_tcp_clients_are_closed_at_accept_and_hold_no_slot() {
    let mut config = test_config();
    config.allow_nets = vec!["127.0.0.1/32".parse().unwrap()];
    let s = start_with(config, TcpLimits::default());
    let mut refused: Vec<TcpStream> = (0..300)
        .map(|_| tcp_connect_from("127.0.0.2", s.tcp))
        .collect();
    totals_eventually(&s, |t| t.acl_refused >= 300);
    assert_eq!(s.stats.totals().tcp_accepted, 0);
    assert!(closed_by_server(&mut refused[0]));
    let mut allowed = tcp_connect_from("127.0.0.1", s.tcp);
    assert!(
        tcp_web_answered(&mut allowed),
        "the allowed client is locked out"
    );
}

#[test]
fn one_client_address_cannot_take_every_tcp_slot() {
    let s = start();
    let _hog: Vec<TcpStream> = (0..300)
        .map(|_| tcp_connect_from("127.0.0.2", s.tcp))
        .collect();
    totals_eventually(&s, |t| t.tcp_accepted + t.tcp_rejected >= 300);
    let t = s.stats.totals();
    assert_eq!(t.tcp_accepted as usize, TCP_PER_CLIENT, "{t:?}");
    assert_eq!(t.tcp_evicted, 0);
    let mut other = tcp_connect_from("127.0.0.3", s.tcp);
    assert!(tcp_web_answered(&mut other));
}

#[test]
fn a_full_tcp_table_closes_the_oldest_idle_connection() {
    let limits = TcpLimits {
        max_connections: 4,
        ..TcpLimits::default()
    };
    let s = start_with(test_config(), limits);
    let mut held = Vec::new();
    for i in 2..6 {
        held.push(tcp_connect_from(&format!("127.0.0.{i}"), s.tcp));
        totals_eventually(&s, |t| t.tcp_open as usize == held.len());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The newest of them is busy answering: not the one to go.
    assert!(tcp_web_answered(&mut held[3]));
    let mut newcomer = tcp_connect_from("127.0.0.6", s.tcp);
    assert!(
        tcp_web_answered(&mut newcomer),
        "the newcomer was turned away"
    );
    assert!(
        closed_by_server(&mut held[0]),
        "the oldest idle one is still open"
    );
    assert_eq!(s.stats.totals().tcp_evicted, 1);
    assert!(tcp_web_answered(&mut held[1]));
}
