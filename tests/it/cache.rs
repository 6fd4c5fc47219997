//! Integration tests: the forward cache, through a whole daemon (serving
//! threads, forwarder, status server) and a stub upstream on loopback that
//! counts the queries it gets. TTLs are a few seconds so each test takes
//! seconds.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use glued::daemon::Daemon;
use glued::dns::cache::{CLIENT_RESPONSE_TIMER, CacheConfig, STALE_TTL_SECS};
use glued::dns::forward::QUERY_BUDGET;
use hickory_proto::op::{Edns, Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::support;

/// How long a client waits for one answer.
const IO_TIMEOUT: Duration = Duration::from_secs(4);

// ---------------------------------------------------------------- stub ---

/// What the stub upstream answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// One A record with this TTL.
    Answer {
        ttl: u32,
    },
    /// NXDOMAIN with an SOA of this TTL and MINIMUM.
    NxDomain {
        soa_ttl: u32,
        minimum: u32,
    },
    ServFail,
    /// Reads queries and says nothing (a dead upstream).
    Silent,
}

/// A fake upstream resolver on 127.0.0.1 over UDP.
struct Upstream {
    addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    queries: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    fn start(mode: Mode) -> Upstream {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let mode = Arc::new(Mutex::new(mode));
        let queries = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (mode, queries, stop) = (mode.clone(), queries.clone(), stop.clone());
            move || {
                let mut buf = [0u8; 4096];
                while !stop.load(SeqCst) {
                    let Ok((len, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let Ok(query) = Message::from_vec(&buf[..len]) else {
                        continue;
                    };
                    queries.fetch_add(1, SeqCst);
                    let mode = *mode.lock().unwrap();
                    if let Some(reply) = reply(&query, mode) {
                        let _ = socket.send_to(&reply.to_vec().unwrap(), from);
                    }
                }
            }
        });
        Upstream {
            addr,
            mode,
            queries,
            stop,
            thread: Some(thread),
        }
    }

    fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn queries(&self) -> usize {
        self.queries.load(SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn reply(query: &Message, mode: Mode) -> Option<Message> {
    let mut m = Message::response(query.metadata.id, OpCode::Query);
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.checking_disabled = query.metadata.checking_disabled;
    m.queries = query.queries.clone();
    if let Some(e) = &query.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        edns.set_dnssec_ok(e.flags().dnssec_ok);
        m.edns = Some(edns);
    }
    let owner = query.queries[0].name().clone();
    match mode {
        Mode::Answer { ttl } => m.answers.push(Record::from_rdata(
            owner,
            ttl,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
        )),
        Mode::NxDomain { soa_ttl, minimum } => {
            let zone = Name::from_ascii("example.").unwrap();
            m.metadata.response_code = ResponseCode::NXDomain;
            m.authorities.push(Record::from_rdata(
                zone.clone(),
                soa_ttl,
                RData::SOA(SOA::new(zone.clone(), zone, 1, 7200, 900, 86400, minimum)),
            ));
        }
        Mode::ServFail => m.metadata.response_code = ResponseCode::ServFail,
        Mode::Silent => return None,
    }
    Some(m)
}

// ------------------------------------------------------------- helpers ---

fn start(upstream: &Upstream, cache: CacheConfig) -> Daemon {
    let mut config = support::test_config();
    config.upstreams = vec![upstream.addr];
    config.cache = cache;
    Daemon::start(&config).expect("daemon starts")
}

fn cache(size: usize, stale_secs: u32) -> CacheConfig {
    CacheConfig {
        size,
        stale_secs,
        ..CacheConfig::default()
    }
}

/// A query with RD; `edns`: Some(DO bit); `ecs`: with a Client Subnet option.
fn query(id: u16, name: &str, edns: Option<bool>, ecs: bool) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let mut bytes = m.to_vec().unwrap();
    if let Some(dnssec_ok) = edns {
        let options: &[u8] = if ecs {
            &[0, 8, 0, 7, 0, 1, 24, 0, 198, 51, 100]
        } else {
            &[]
        };
        bytes[11] = 1;
        bytes.extend_from_slice(&[0, 0, 41, 0x04, 0xD0, 0, 0]);
        bytes.extend_from_slice(&[if dnssec_ok { 0x80 } else { 0 }, 0]);
        bytes.extend_from_slice(&(options.len() as u16).to_be_bytes());
        bytes.extend_from_slice(options);
    }
    bytes
}

/// Sends `q` over UDP and returns the answer's bytes.
fn ask(to: SocketAddr, q: &[u8]) -> Vec<u8> {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    socket.send_to(q, to).unwrap();
    let mut buf = vec![0u8; 65535];
    let n = socket.recv(&mut buf).expect("an answer");
    buf.truncate(n);
    buf
}

/// Sends `q` over TCP and returns the answer's bytes.
fn ask_tcp(to: SocketAddr, q: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(to).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(q);
    stream.write_all(&framed).unwrap();
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).unwrap();
    let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
    stream.read_exact(&mut answer).unwrap();
    answer
}

fn parse(bytes: &[u8]) -> Message {
    Message::from_vec(bytes).unwrap()
}

/// TTLs of the answer and authority records.
fn ttls(bytes: &[u8]) -> Vec<u32> {
    let m = parse(bytes);
    m.answers
        .iter()
        .chain(&m.authorities)
        .map(|r| r.ttl)
        .collect()
}

/// One HTTP request to the status server: status code and body.
fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: glued\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

/// The value of metric `name` on the status server at `addr`.
fn metric(addr: SocketAddr, name: &str) -> u64 {
    let (_, body) = http(addr, "GET", "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no metric {name}"))
        .parse()
        .unwrap()
}

// --------------------------------------------------------------- tests ---

#[test]
fn a_repeated_query_goes_upstream_once_and_the_hit_has_the_clients_id_case_and_aged_ttl() {
    let upstream = Upstream::start(Mode::Answer { ttl: 60 });
    let d = start(&upstream, cache(100, 60));
    let first = ask(d.dns_udp_addr, &query(1, "www.example.com.", None, false));
    assert_eq!(ttls(&first), [60]);
    assert_eq!(upstream.queries(), 1);
    std::thread::sleep(Duration::from_millis(2_100));
    let q = query(0xBEEF, "WwW.eXaMpLe.CoM.", None, false);
    let hit = ask(d.dns_udp_addr, &q);
    assert_eq!(upstream.queries(), 1, "answered from the cache");
    assert_eq!(hit[..2], [0xBE, 0xEF], "the client's id");
    assert_eq!(
        hit[12..q.len()],
        q[12..],
        "the client's question, letter case included"
    );
    let ttl = ttls(&hit)[0];
    assert!(
        (57..=58).contains(&ttl),
        "TTL lowered by the elapsed seconds: {ttl}"
    );
    assert_eq!(
        parse(&hit).answers[0].data,
        RData::A(A(Ipv4Addr::new(192, 0, 2, 1)))
    );
    // Over TCP too.
    let tcp = ask_tcp(d.dns_tcp_addr, &query(7, "www.example.com.", None, false));
    assert_eq!(tcp[..2], [0, 7]);
    assert_eq!(upstream.queries(), 1);
    // DO and no DO are separate entries (and so is a query with EDNS).
    for (n, edns) in [(2, Some(true)), (3, Some(false))] {
        let a = ask(d.dns_udp_addr, &query(2, "www.example.com.", edns, false));
        assert_eq!(
            parse(&a).edns.unwrap().flags().dnssec_ok,
            edns == Some(true)
        );
        assert_eq!(upstream.queries(), n);
        ask(d.dns_udp_addr, &query(3, "www.example.com.", edns, false));
        assert_eq!(upstream.queries(), n, "{edns:?} cached apart");
    }
    // A query with a Client Subnet option is never cached.
    for n in [4, 5] {
        ask(
            d.dns_udp_addr,
            &query(4, "ecs.example.com.", Some(false), true),
        );
        assert_eq!(upstream.queries(), n);
    }
    assert!(metric(d.http_addr, "glued_cache_hits_total") >= 4);
    assert_eq!(metric(d.http_addr, "glued_cache_entries"), 3);
    d.stop();
}

#[test]
fn nxdomain_is_cached_for_the_soa_minimum() {
    let upstream = Upstream::start(Mode::NxDomain {
        soa_ttl: 3600,
        minimum: 2,
    });
    let d = start(&upstream, cache(100, 60));
    let q = query(1, "nx.example.", None, false);
    assert_eq!(
        parse(&ask(d.dns_udp_addr, &q)).metadata.response_code,
        ResponseCode::NXDomain
    );
    let hit = ask(d.dns_udp_addr, &q);
    assert_eq!(parse(&hit).metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(upstream.queries(), 1);
    assert!(
        ttls(&hit)[0] <= 2,
        "the SOA shows the negative TTL: {:?}",
        ttls(&hit)
    );
    std::thread::sleep(Duration::from_millis(2_100));
    ask(d.dns_udp_addr, &q);
    assert_eq!(upstream.queries(), 2, "expired after the SOA minimum");
    d.stop();
}

#[test]
fn servfail_is_cached_for_at_most_5s() {
    let upstream = Upstream::start(Mode::ServFail);
    let d = start(&upstream, cache(100, 60));
    let q = query(1, "fail.example.", None, false);
    assert_eq!(
        parse(&ask(d.dns_udp_addr, &q)).metadata.response_code,
        ResponseCode::ServFail
    );
    let failed_at = Instant::now();
    let n = upstream.queries();
    assert!(n >= 1);
    assert_eq!(
        parse(&ask(d.dns_udp_addr, &q)).metadata.response_code,
        ResponseCode::ServFail
    );
    assert_eq!(upstream.queries(), n, "the failure is cached a while");
    upstream.set_mode(Mode::Answer { ttl: 60 });
    loop {
        let a = ask(d.dns_udp_addr, &q);
        if parse(&a).metadata.response_code == ResponseCode::NoError {
            break;
        }
        assert!(
            failed_at.elapsed() < Duration::from_millis(5_500),
            "SERVFAIL still served after {:?}",
            failed_at.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    d.stop();
}

#[test]
fn a_dead_upstream_gets_stale_answers_until_the_stale_window_ends() {
    let upstream = Upstream::start(Mode::Answer { ttl: 1 });
    let stale_secs = 3;
    let d = start(&upstream, cache(100, stale_secs));
    let q = query(1, "stale.example.", None, false);
    ask(d.dns_udp_addr, &q);
    let stored = Instant::now();
    std::thread::sleep(Duration::from_millis(1_100));
    upstream.set_mode(Mode::Silent);
    let asked = Instant::now();
    let stale = ask(d.dns_udp_addr, &query(2, "stale.example.", None, false));
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "stale answer after {:?}",
        asked.elapsed()
    );
    assert_eq!(stale[..2], [0, 2]);
    assert_eq!(parse(&stale).metadata.response_code, ResponseCode::NoError);
    assert_eq!(ttls(&stale), [STALE_TTL_SECS]);
    // Then straight from the serving threads while the refresh keeps trying.
    let asked = Instant::now();
    assert_eq!(ttls(&ask(d.dns_udp_addr, &q)), [STALE_TTL_SECS]);
    assert!(asked.elapsed() < Duration::from_millis(500));
    assert!(metric(d.http_addr, "glued_cache_stale_answers_total") >= 2);
    // Past the stale window: SERVFAIL.
    let end = stored + Duration::from_secs(1 + u64::from(stale_secs));
    std::thread::sleep(end.saturating_duration_since(Instant::now()) + Duration::from_millis(200));
    assert_eq!(
        parse(&ask(d.dns_udp_addr, &q)).metadata.response_code,
        ResponseCode::ServFail
    );
    d.stop();
}

/// With three silent upstreams no attempt fails before the query's whole
/// budget (2 s): the stale answer comes from the client-response timer.
#[test]
fn the_client_response_timer_answers_stale_before_the_upstreams_give_up() {
    let upstreams: Vec<Upstream> = (0..3)
        .map(|_| Upstream::start(Mode::Answer { ttl: 1 }))
        .collect();
    let mut config = support::test_config();
    config.upstreams = upstreams.iter().map(|u| u.addr).collect();
    config.cache = cache(100, 60);
    let d = Daemon::start(&config).expect("daemon starts");
    let q = query(1, "timer.example.", None, false);
    ask(d.dns_udp_addr, &q);
    for u in &upstreams {
        u.set_mode(Mode::Silent);
    }
    std::thread::sleep(Duration::from_millis(1_100));
    let asked = Instant::now();
    let stale = ask(d.dns_udp_addr, &q);
    let took = asked.elapsed();
    assert_eq!(ttls(&stale), [STALE_TTL_SECS]);
    assert!(
        took >= CLIENT_RESPONSE_TIMER - Duration::from_millis(100) && took < QUERY_BUDGET,
        "stale answer after {took:?}: not the client-response timer"
    );
    d.stop();
}

#[test]
fn prefetch_refreshes_a_name_in_use_before_it_expires() {
    let upstream = Upstream::start(Mode::Answer { ttl: 3 });
    let d = start(&upstream, cache(100, 60));
    let q = query(1, "hot.example.", None, false);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(4_500) {
        let a = ask(d.dns_udp_addr, &q);
        assert_eq!(parse(&a).metadata.response_code, ResponseCode::NoError);
        assert!(ttls(&a)[0] >= 1);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        upstream.queries(),
        2,
        "the first query and one refresh near 2.7 s"
    );
    assert_eq!(
        metric(d.http_addr, "glued_cache_misses_total"),
        1,
        "no client missed"
    );
    assert_eq!(metric(d.http_addr, "glued_cache_prefetches_total"), 1);
    d.stop();
}

#[test]
fn the_cache_holds_at_most_its_size() {
    let upstream = Upstream::start(Mode::Answer { ttl: 300 });
    let d = start(&upstream, cache(100, 60));
    for i in 0..1000 {
        ask(
            d.dns_udp_addr,
            &query(1, &format!("n{i}.example."), None, false),
        );
        if i % 100 == 99 {
            let entries = metric(d.http_addr, "glued_cache_entries");
            assert!(entries <= 100, "{entries} entries after {} names", i + 1);
        }
    }
    assert!(metric(d.http_addr, "glued_cache_entries") >= 90);
    assert!(metric(d.http_addr, "glued_cache_evictions_total") >= 900);
    d.stop();
}

#[test]
fn size_zero_sends_every_query_upstream() {
    let upstream = Upstream::start(Mode::Answer { ttl: 300 });
    let d = start(&upstream, cache(0, 60));
    let q = query(1, "off.example.", None, false);
    for n in 1..=5 {
        ask(d.dns_udp_addr, &q);
        assert_eq!(upstream.queries(), n);
    }
    assert_eq!(metric(d.http_addr, "glued_cache_hits_total"), 0);
    d.stop();
}

#[test]
fn a_flush_through_the_status_api_empties_the_cache() {
    let upstream = Upstream::start(Mode::Answer { ttl: 300 });
    let d = start(&upstream, cache(100, 60));
    let q = query(1, "flush.example.", None, false);
    ask(d.dns_udp_addr, &q);
    ask(d.dns_udp_addr, &q);
    assert_eq!(upstream.queries(), 1);
    assert_eq!(http(d.http_addr, "GET", "/cache/flush").0, 405);
    assert_eq!(http(d.http_addr, "POST", "/cache/flush").0, 200);
    ask(d.dns_udp_addr, &q);
    assert_eq!(upstream.queries(), 2, "flushed");
    d.stop();
}

// ------------------------------------------------- the real binary ---

/// `glued run` with the cache in front of `upstream`, and its addresses.
struct Running {
    child: Child,
    dns: SocketAddr,
    http: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Running {
    fn start(upstream: &Upstream) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let upstreams = upstream.addr.to_string();
        let network = support::unique("glued-cache-net");
        let key = support::key_b64("cache-test-secret");
        let mut child = Command::new(env!("CARGO_BIN_EXE_glued"))
            .arg("run")
            .env_clear()
            .envs([
                ("GLUED_DNS_BIND", "127.0.0.1:0"),
                ("GLUED_HTTP_BIND", "127.0.0.1:0"),
                ("GLUED_GOSSIP_BIND", "127.0.0.1:0"),
                ("GLUED_MDNS", "false"),
                ("GLUED_UPSTREAMS", upstreams.as_str()),
                ("GLUED_DATA_DIR", data.to_str().unwrap()),
                ("GLUED_NETWORK_NAME", network.as_str()),
                ("GLUED_CLUSTER_SECRET", key.as_str()),
                ("RUST_LOG", "info"),
            ])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn glued run");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut dns, mut http) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(10);
        while dns.is_none() || http.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).expect("glued logs its addresses");
            let word_after = |needle: &str| -> Option<SocketAddr> {
                line.split(needle)
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            };
            dns = dns.or(word_after("DNS listening on udp "));
            http = http.or(word_after("HTTP status on "));
        }
        Running {
            child,
            dns: dns.unwrap(),
            http: http.unwrap(),
            _dir: dir,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sighup_and_glued_cache_flush_empty_the_cache() {
    let upstream = Upstream::start(Mode::Answer { ttl: 300 });
    let glued = Running::start(&upstream);
    let q = query(1, "hup.example.", None, false);
    ask(glued.dns, &q);
    ask(glued.dns, &q);
    assert_eq!(upstream.queries(), 1);
    // SAFETY: a plain kill(2) of our own child.
    assert_eq!(
        unsafe { libc::kill(glued.child.id() as i32, libc::SIGHUP) },
        0
    );
    let deadline = Instant::now() + IO_TIMEOUT;
    while metric(glued.http, "glued_cache_entries") != 0 {
        assert!(Instant::now() < deadline, "SIGHUP did not flush the cache");
        std::thread::sleep(Duration::from_millis(20));
    }
    ask(glued.dns, &q);
    assert_eq!(upstream.queries(), 2);
    ask(glued.dns, &q);
    assert_eq!(upstream.queries(), 2);
    let out = Command::new(env!("CARGO_BIN_EXE_glued"))
        .args(["cache", "flush", "--http-bind", &glued.http.to_string()])
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ask(glued.dns, &q);
    assert_eq!(upstream.queries(), 3, "glued cache flush emptied it");
}
