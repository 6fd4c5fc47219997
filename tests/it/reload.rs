//! Integration tests: `SIGHUP` reloads the configuration of a running
//! `glued run` (the real binary): records, TTL, access list and upstreams
//! change the answers (RA follows the upstreams); a bad file changes nothing and logs the line
//! `glued check` prints; keys that need a restart are named in one warning.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::process::{self, Glued, addresses, rcode, tcp_ask, udp_ask};

/// The bound: a reload changes the answers within a second.
const RELOAD_BOUND: Duration = Duration::from_secs(1);
/// How long a test waits for a reload's log line.
const LOG_WAIT: Duration = Duration::from_secs(5);

/// Everything but the file: loopback ports, no gossip peers, no Docker
/// network that exists.
fn env() -> Vec<(&'static str, String)> {
    vec![
        ("GLUED_DNS_BIND", "127.0.0.1:0".into()),
        ("GLUED_HTTP_BIND", "127.0.0.1:0".into()),
        ("GLUED_GOSSIP_BIND", "127.0.0.1:0".into()),
        ("GLUED_MDNS", "false".into()),
        (
            "GLUED_NETWORK_NAME",
            crate::support::unique("glued-reload-net"),
        ),
        ("GLUED_NODE_NAME", "reload-test".into()),
        (
            "GLUED_CLUSTER_SECRET",
            crate::support::key_b64("reload-test-secret"),
        ),
        (
            "GLUED_DOCKER_HOST",
            "unix:///nonexistent/glued-reload-test.sock".into(),
        ),
    ]
}

fn start(toml: &str) -> (Glued, SocketAddr) {
    let env = env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut glued = Glued::start(&[], toml, &env);
    let dns = glued.dns_addr();
    (glued, dns)
}

/// A config file: `extra` keys, upstreams none unless `extra` sets them,
/// and the record `db` at `ip`.
fn file(ip: &str, extra: &str) -> String {
    let upstreams = if extra.contains("upstreams") {
        ""
    } else {
        "upstreams = \"none\"\n"
    };
    format!("{upstreams}{extra}\n[[records]]\nname = \"db\"\nip = \"{ip}\"\n")
}

/// Sends SIGHUP and waits for the reload's outcome line.
fn reload(glued: &mut Glued, needle: &str) -> String {
    let after = glued.n_lines();
    glued.signal(libc::SIGHUP);
    glued.wait_for_after(after, needle, LOG_WAIT)
}

#[test]
fn sighup_changes_records_within_a_second_without_dropping_a_query() {
    let (mut glued, dns) = start(&file("10.0.0.5", ""));
    let first = udp_ask(dns, "db.glued.internal.", RecordType::A).expect("answer");
    assert_eq!(addresses(&first), ["10.0.0.5"]);

    // A client asks in a loop through the reload, one query at a time.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, answered) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let switched = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let client = {
        let (stop, sent, answered, switched) = (
            stop.clone(),
            sent.clone(),
            answered.clone(),
            switched.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                sent.fetch_add(1, Ordering::Relaxed);
                let Some(m) = udp_ask(dns, "db.glued.internal.", RecordType::A) else {
                    continue;
                };
                answered.fetch_add(1, Ordering::Relaxed);
                let ips = addresses(&m);
                if ips == ["10.0.0.6"] {
                    switched.lock().unwrap().get_or_insert_with(Instant::now);
                } else {
                    assert_eq!(ips, ["10.0.0.5"], "neither the old nor the new answer");
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    glued.write_config(&file("10.0.0.6", ""));
    let hup = Instant::now();
    glued.signal(libc::SIGHUP);
    let deadline = hup + RELOAD_BOUND + Duration::from_secs(2);
    while switched.lock().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    client.join().expect("client thread");
    let switched = switched
        .lock()
        .unwrap()
        .expect("the new record was never answered");
    assert!(
        switched - hup <= RELOAD_BOUND,
        "answers changed {:?} after SIGHUP",
        switched - hup
    );
    let (sent, answered) = (
        sent.load(Ordering::Relaxed),
        answered.load(Ordering::Relaxed),
    );
    assert!(sent > 10, "the client asked only {sent} times");
    assert_eq!(
        answered, sent,
        "queries without an answer during the reload"
    );
    glued.wait_for("configuration reloaded: applied records", LOG_WAIT);

    // A bad edit: nothing changes, and the log has `glued check`'s line.
    glued.write_config(&file("10.0.0.7", "ttl = \"soon\""));
    let check = process::check_error(glued.dir.path());
    let message = check
        .strip_prefix("error: ")
        .expect("glued check's error line");
    let line = reload(&mut glued, "reload refused");
    assert!(line.contains(message), "{line:?} lacks {message:?}");
    let m = udp_ask(dns, "db.glued.internal.", RecordType::A).expect("answer");
    assert_eq!(addresses(&m), ["10.0.0.6"]);
    assert_eq!(m.answers[0].ttl, 5, "the TTL changed with a refused file");
}

/// An upstream on loopback answering every A question with 192.0.2.99.
struct Upstream {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Queries received.
    asked: Arc<AtomicUsize>,
}

impl Upstream {
    fn start() -> Upstream {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let asked = Arc::new(AtomicUsize::new(0));
        let counted = asked.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0; 4096];
            while !stopping.load(Ordering::Relaxed) {
                let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut m = Message::response(q.metadata.id, OpCode::Query);
                m.metadata.recursion_desired = q.metadata.recursion_desired;
                m.metadata.recursion_available = true;
                m.queries = q.queries.clone();
                m.answers.push(Record::from_rdata(
                    Name::from_str(&q.queries[0].name().to_ascii()).unwrap(),
                    60,
                    RData::A(A(Ipv4Addr::new(192, 0, 2, 99))),
                ));
                counted.fetch_add(1, Ordering::Relaxed);
                let _ = socket.send_to(&m.to_vec().unwrap(), peer);
            }
        });
        Upstream { addr, stop, asked }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn sighup_applies_ttl_access_list_and_upstreams_and_names_keys_needing_a_restart() {
    let (mut glued, dns) = start(&file("10.0.0.5", ""));
    let m = udp_ask(dns, "elsewhere.example.", RecordType::A).expect("answer");
    assert_eq!(
        rcode(&m),
        ResponseCode::ServFail,
        "forwarded with no upstream"
    );
    let m = udp_ask(dns, "db.glued.internal.", RecordType::A).expect("answer");
    assert!(!m.metadata.recursion_available, "RA without upstreams");

    // TTL and upstreams.
    let upstream = Upstream::start();
    let extra = format!("ttl = 42\nupstreams = \"{}\"", upstream.addr);
    glued.write_config(&file("10.0.0.5", &extra));
    let line = reload(&mut glued, "configuration reloaded");
    assert!(line.contains("ttl") && line.contains("upstreams"), "{line}");
    let m = udp_ask(dns, "db.glued.internal.", RecordType::A).expect("answer");
    assert_eq!(m.answers[0].ttl, 42);
    assert!(m.metadata.recursion_available, "no RA with an upstream");
    let m = tcp_ask(dns, "db.glued.internal.", RecordType::A)
        .expect("TCP connect")
        .expect("TCP answer");
    assert!(
        m.metadata.recursion_available,
        "no RA over TCP with an upstream"
    );
    let m = udp_ask(dns, "elsewhere.example.", RecordType::A).expect("answer");
    assert_eq!(
        addresses(&m),
        ["192.0.2.99"],
        "not forwarded to the new upstream"
    );
    // The forward cache kept working across the change (its one writer
    // moved to the new forwarding thread): asked again, the answer comes
    // from the cache.
    let m = udp_ask(dns, "elsewhere.example.", RecordType::A).expect("answer");
    assert_eq!(addresses(&m), ["192.0.2.99"]);
    assert_eq!(upstream.asked.load(Ordering::Relaxed), 1, "not cached");

    // Access list: loopback is no longer allowed, over UDP and TCP.
    let extra = format!(
        "ttl = 42\nallow_nets = [\"10.0.0.0/8\"]\nupstreams = \"{}\"",
        upstream.addr
    );
    glued.write_config(&file("10.0.0.5", &extra));
    let line = reload(&mut glued, "configuration reloaded");
    assert!(line.contains("allow_nets"), "{line}");
    let m = udp_ask(dns, "db.glued.internal.", RecordType::A).expect("answer");
    assert_eq!(rcode(&m), ResponseCode::Refused);
    // Over TCP a refused peer is closed at accept, without an answer.
    let m = tcp_ask(dns, "db.glued.internal.", RecordType::A);
    assert!(
        !matches!(m, Ok(Some(_))),
        "TCP answered a client outside allow_nets"
    );

    // Keys that need a restart: one warning naming them, the rest applied.
    let extra = "dns_threads = 3\nlease_secs = 20\nttl = 7";
    glued.write_config(&file("10.0.0.5", extra));
    let after = glued.n_lines();
    glued.signal(libc::SIGHUP);
    let warning = glued.wait_for_after(after, "need a restart", LOG_WAIT);
    assert!(
        warning.contains("dns_threads") && warning.contains("lease_secs"),
        "{warning}"
    );
    assert!(!warning.contains("ttl"), "{warning}");
    glued.wait_for_after(after, "configuration reloaded: applied", LOG_WAIT);
    // allow_nets is back to the default (loopback allowed), ttl applied,
    // forwarding off again.
    let m = udp_ask(dns, "db.glued.internal.", RecordType::A).expect("answer");
    assert_eq!(m.answers[0].ttl, 7);
    let m = udp_ask(dns, "elsewhere.example.", RecordType::A).expect("answer");
    assert_eq!(rcode(&m), ResponseCode::ServFail);

    // Log level: at warn, the reload's info line is gone, its warning not.
    let extra = "dns_threads = 3\nlease_secs = 21\nttl = 7\nlog = \"warn\"";
    glued.write_config(&file("10.0.0.5", extra));
    let after = glued.n_lines();
    glued.signal(libc::SIGHUP);
    glued.wait_for_after(after, "lease_secs changed but need a restart", LOG_WAIT);
    let log = glued.log();
    let since: Vec<&str> = log.lines().skip(after).collect();
    assert!(
        !since.iter().any(|l| l.contains("configuration reloaded")),
        "info lines after log = warn: {since:?}"
    );
}
