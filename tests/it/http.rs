//! Integration tests: the HTTP status server over real TCP, alone and inside
//! a whole daemon.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glued::config::StaticRecord;
use glued::daemon::Daemon;
use glued::gossip::{PeerStatus, Peers};
use glued::http::{ANSWER_DEADLINE, HttpServer, MAX_REQUEST_BYTES, REQUEST_DEADLINE};
use glued::metrics::Metrics;
use glued::table::{self, Group, Origin, SharedTable, Source, Table};
use smallvec::smallvec;

use crate::support;

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A parsed HTTP answer.
struct Reply {
    status: u16,
    head: String,
    body: String,
}

/// Sends `request` as is and reads the whole answer.
fn raw(addr: SocketAddr, request: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(request).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    Reply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

fn get(addr: SocketAddr, path: &str) -> Reply {
    raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: glued\r\n\r\n").as_bytes(),
    )
}

struct Server {
    http: HttpServer,
    table: SharedTable,
    peers: Peers,
}

fn server() -> Server {
    let table = table::shared("glued.internal", 5);
    let peers = Peers::default();
    let http = HttpServer::start(
        "127.0.0.1:0".parse().unwrap(),
        table.clone(),
        Arc::new(Metrics::default()),
        peers.clone(),
        None,
    )
    .unwrap();
    Server { http, table, peers }
}

#[test]
fn healthz_answers_ok() {
    let s = server();
    let r = get(s.http.addr, "/healthz");
    assert_eq!(r.status, 200);
    assert_eq!(r.body.trim(), "ok");
    assert!(r.head.contains("Content-Length: 3"), "{}", r.head);
    s.http.stop();
}

#[test]
fn unknown_path_is_404_and_post_is_405() {
    let s = server();
    assert_eq!(get(s.http.addr, "/nope").status, 404);
    assert_eq!(get(s.http.addr, "/").status, 404);
    let r = raw(
        s.http.addr,
        b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(r.status, 405);
    assert!(r.head.contains("Allow: GET"), "{}", r.head);
    assert_eq!(raw(s.http.addr, b"nonsense\r\n\r\n").status, 400);
    s.http.stop();
}

#[test]
fn records_lists_every_group_as_json() {
    let s = server();
    let origin = Origin {
        id: "ab".repeat(32).into(),
        node_name: "node-a".into(),
    };
    let mut groups = BTreeMap::new();
    groups.insert(
        (origin.clone(), Source::Static { name: "db".into() }),
        Group {
            names: smallvec!["db".into()],
            v4: smallvec!["10.0.0.5".parse().unwrap()],
            v6: smallvec!["fd00::5".parse().unwrap()],
            ..Default::default()
        },
    );
    groups.insert(
        (
            origin,
            Source::Container {
                id: "c0ffee".into(),
                network: "net".into(),
            },
        ),
        Group {
            names: smallvec!["api".into(), "web".into()],
            v4: smallvec!["172.18.0.2".parse().unwrap()],
            v6: smallvec![],
            ..Default::default()
        },
    );
    s.table.store(Arc::new(Table::build(
        "glued.internal",
        5,
        1,
        Arc::new(groups),
    )));
    let r = get(s.http.addr, "/records");
    assert_eq!(r.status, 200);
    assert!(r.head.contains("application/json"), "{}", r.head);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let records = v.as_array().expect("an array");
    assert_eq!(records.len(), 2, "{v}");
    let db = records
        .iter()
        .find(|r| r["names"][0] == "db")
        .expect("db listed");
    assert_eq!(db["origin"], "ab".repeat(32));
    assert_eq!(db["node_name"], "node-a");
    assert_eq!(db["source"]["kind"], "static");
    assert_eq!(db["addresses"], serde_json::json!(["10.0.0.5", "fd00::5"]));
    let api = records
        .iter()
        .find(|r| r["names"][0] == "api")
        .expect("api listed");
    assert_eq!(api["source"]["kind"], "container");
    assert_eq!(api["source"]["id"], "c0ffee");
    s.http.stop();
}

#[test]
fn peers_is_json() {
    let s = server();
    let r = get(s.http.addr, "/peers");
    assert_eq!(r.status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&r.body).unwrap(),
        serde_json::json!([])
    );
    s.peers.lock().unwrap().push(PeerStatus {
        id: "cd".repeat(32),
        node_name: "node-b".into(),
        addr: Some("127.0.0.1:9254".into()),
        last_heard_ms_ago: 12,
        records: 3,
        authenticated: true,
        key_id: Some("1a2b3c4d".into()),
        protocol_version: Some(3),
    });
    let r = get(s.http.addr, "/peers");
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v[0]["id"], "cd".repeat(32));
    assert_eq!(v[0]["authenticated"], true);
    assert_eq!(v[0]["key_id"], "1a2b3c4d");
    assert_eq!(v[0]["protocol_version"], 3);
    assert_eq!(v[0]["records"], 3);
    s.http.stop();
}

#[test]
fn metrics_is_prometheus_text() {
    let s = server();
    let r = get(s.http.addr, "/metrics");
    assert_eq!(r.status, 200);
    assert!(r.head.contains("text/plain; version=0.0.4"), "{}", r.head);
    assert!(r.body.contains("glued_records 0"), "{}", r.body);
    s.http.stop();
}

#[test]
fn stuck_or_huge_clients_do_not_hold_the_server() {
    let s = server();
    // A client that connects and sends half a request, then nothing.
    let mut stuck = TcpStream::connect(s.http.addr).unwrap();
    stuck.write_all(b"GET /heal").unwrap();
    let start = Instant::now();
    assert_eq!(get(s.http.addr, "/healthz").status, 200);
    assert!(
        start.elapsed() < REQUEST_DEADLINE + Duration::from_secs(1),
        "took {:?}",
        start.elapsed()
    );
    // A request head larger than the cap.
    let mut huge = b"GET /healthz HTTP/1.1\r\nX-Fill: ".to_vec();
    huge.resize(MAX_REQUEST_BYTES + 100, b'a');
    let mut s2 = TcpStream::connect(s.http.addr).unwrap();
    s2.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let _ = s2.write_all(&huge);
    let mut buf = Vec::new();
    let _ = s2.read_to_end(&mut buf);
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    assert_eq!(get(s.http.addr, "/healthz").status, 200);
    drop(stuck);
    let start = Instant::now();
    s.http.stop();
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "stop took {:?}",
        start.elapsed()
    );
}

/// A DNS query for `name` of type A, id 0x1234, RD set.
fn a_query(name: &str) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

#[test]
fn daemon_metrics_count_queries_and_records_show_static_records() {
    let mut config = support::test_config();
    config.records = vec![StaticRecord {
        name: "db".into(),
        ip: "10.0.0.5".parse().unwrap(),
    }];
    let daemon = Daemon::start(&config).expect("daemon starts");
    let http = daemon.http_addr;
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    // The registry publishes the static records shortly after start.
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        sock.send_to(&a_query("db.glued.internal"), daemon.dns_udp_addr)
            .unwrap();
        let mut buf = [0u8; 512];
        let (n, _) = sock.recv_from(&mut buf).expect("a DNS answer");
        let ancount = u16::from_be_bytes([buf[6], buf[7]]);
        if n > 12 && ancount == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "db never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    let metrics = get(http, "/metrics").body;
    let a_queries: u64 = metrics
        .lines()
        .find(|l| l.starts_with("glued_dns_queries_total{qtype=\"A\"}"))
        .unwrap_or_else(|| panic!("no A query counter in:\n{metrics}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(a_queries >= 1, "{metrics}");
    let records: serde_json::Value = serde_json::from_str(&get(http, "/records").body).unwrap();
    let db = records
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["names"][0] == "db")
        .unwrap_or_else(|| panic!("db not in {records}"));
    assert_eq!(db["addresses"], serde_json::json!(["10.0.0.5"]));
    assert_eq!(db["node_name"], "node-a");
    assert_eq!(db["source"]["kind"], "static");
    // Every thread is alive; the only possible complaint is a Docker engine
    // that is absent or not connected yet.
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut health = get(http, "/healthz");
    while health.status != 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        health = get(http, "/healthz");
    }
    if health.status != 200 {
        assert_eq!(health.status, 503);
        assert!(
            health
                .body
                .lines()
                .all(|l| l.starts_with("Docker engine at ")),
            "{}",
            health.body
        );
    }
    daemon.stop();
}

#[test]
fn a_client_reading_a_large_answer_slowly_does_not_hold_the_server() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let s = server();
    // `/records` of several MB: more than the kernel buffers of both ends.
    let origin = Origin {
        id: "ab".repeat(32).into(),
        node_name: "node-a".into(),
    };
    let v6 = (0..600_000u32)
        .map(|i| std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0x1234, (i >> 16) as u16, i as u16))
        .collect();
    let mut groups = BTreeMap::new();
    groups.insert(
        (origin, Source::Static { name: "big".into() }),
        Group {
            names: smallvec!["big".into()],
            v4: smallvec![],
            v6,
            ..Default::default()
        },
    );
    s.table.store(Arc::new(Table::build(
        "glued.internal",
        5,
        1,
        Arc::new(groups),
    )));
    // A client with a tiny receive buffer that takes the answer a little at
    // a time, always before the per-write timeout runs out.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&s.http.addr.into()).unwrap();
    let mut slow: TcpStream = sock.into();
    slow.write_all(b"GET /records HTTP/1.1\r\n\r\n").unwrap();
    // The clock starts when the server starts writing: building a body of
    // several MB takes a while in a debug build on a loaded machine, and the
    // deadline bounds the writing.
    let mut first = [0u8; 1];
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    assert_eq!(slow.read(&mut first).unwrap(), 1);
    let writing = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut buf = [0u8; 1024];
            slow.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                match slow.read(&mut buf) {
                    Ok(0) => return,
                    Ok(_) | Err(_) => std::thread::sleep(Duration::from_millis(300)),
                }
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let mut other = TcpStream::connect(s.http.addr).unwrap();
    other
        .set_read_timeout(Some(ANSWER_DEADLINE + Duration::from_secs(3)))
        .unwrap();
    other.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let got = other.read_to_end(&mut buf);
    let waited = writing.elapsed();
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    assert!(got.is_ok(), "no answer after {waited:?}: {got:?}");
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    assert!(
        waited < ANSWER_DEADLINE + Duration::from_secs(2),
        "{waited:?}"
    );
    s.http.stop();
}
