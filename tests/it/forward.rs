//! Integration tests: forward. A stub upstream on loopback (UDP and TCP on
//! one port, answers built with hickory-proto) and the forwarder driven
//! through `submit`, then end to end through `DnsServer` with real client
//! sockets.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use glued::config::Config;
use glued::dns::DnsServer;
use glued::dns::forward::{
    ATTEMPT_TIMEOUT, DOWN_AFTER_FAILURES, ForwardStats, Forwarder, PROBE_INTERVAL, Reply,
};
use glued::dns::stats::DnsStats;
use hickory_proto::op::{Edns, Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME, MX, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::support::test_config;

// ---------------------------------------------------------------- stub ---

/// How the stub upstream behaves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Mode {
    /// Answers every query (see [`answer_for`]).
    Answer = 0,
    ServFail = 1,
    Refused = 2,
    /// Reads queries and says nothing.
    Silent = 3,
    /// Over UDP: header and question with TC=1; over TCP: the whole answer.
    Truncated = 4,
    /// Before the real answer, sends a forged one (same id and question)
    /// from another port, and one with the right port and id but another
    /// question.
    Spoofed = 5,
    /// Before the real answer, sends from the right port with the right id
    /// a forged one whose question differs only in letter case.
    CaseFlipped = 6,
    /// Answers after [`STUB_DELAY`].
    Delayed = 7,
    /// A header-only reply (QDCOUNT=0) with the stub's `questionless`
    /// rcode, as a server sends to a query it cannot parse or verify.
    Questionless = 8,
}

/// How long the stub waits in [`Mode::Delayed`].
const STUB_DELAY: Duration = Duration::from_millis(300);

impl Mode {
    fn from_u8(v: u8) -> Mode {
        [
            Mode::Answer,
            Mode::ServFail,
            Mode::Refused,
            Mode::Silent,
            Mode::Truncated,
            Mode::Spoofed,
            Mode::CaseFlipped,
            Mode::Delayed,
            Mode::Questionless,
        ][v as usize]
    }
}

/// Messages by lowercase query name (without the final dot).
type ByName = Arc<Mutex<HashMap<String, Vec<u8>>>>;

/// A fake upstream resolver on 127.0.0.1 (same port for UDP and TCP).
struct Stub {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    udp_queries: Arc<AtomicUsize>,
    tcp_queries: Arc<AtomicUsize>,
    /// Last answer bytes sent, by lowercase query name (without the dot).
    sent: ByName,
    /// Last query bytes received over UDP, by the same key.
    received: ByName,
    /// Source port of every UDP query, in arrival order.
    ports: Arc<Mutex<Vec<u16>>>,
    /// The rcode of [`Mode::Questionless`] replies.
    questionless: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Stub {
    fn start(mode: Mode) -> Stub {
        let (udp, tcp) = bind_pair();
        let addr = udp.local_addr().unwrap();
        let mut stub = Stub {
            addr,
            mode: Arc::new(AtomicU8::new(mode as u8)),
            udp_queries: Arc::default(),
            tcp_queries: Arc::default(),
            sent: Arc::default(),
            received: Arc::default(),
            ports: Arc::default(),
            questionless: Arc::new(AtomicU8::new(1)),
            stop: Arc::default(),
            threads: Vec::new(),
        };
        let (m, n, sent, stop) = (
            stub.mode.clone(),
            stub.udp_queries.clone(),
            stub.sent.clone(),
            stub.stop.clone(),
        );
        let received = stub.received.clone();
        let (ports, questionless) = (stub.ports.clone(), stub.questionless.clone());
        let udp_thread = std::thread::spawn(move || {
            serve_udp(udp, (m, questionless), n, (sent, received, ports), stop)
        });
        let (n, sent, stop) = (
            stub.tcp_queries.clone(),
            stub.sent.clone(),
            stub.stop.clone(),
        );
        let tcp_thread = std::thread::spawn(move || serve_tcp(tcp, n, sent, stop));
        stub.threads = vec![udp_thread, tcp_thread];
        stub
    }

    fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, SeqCst);
    }

    fn set_questionless_rcode(&self, rcode: ResponseCode) {
        self.questionless.store(u16::from(rcode) as u8, SeqCst);
    }

    fn udp_count(&self) -> usize {
        self.udp_queries.load(SeqCst)
    }

    fn sent_for(&self, name: &str) -> Vec<u8> {
        self.sent.lock().unwrap()[name].clone()
    }

    fn received_for(&self, name: &str) -> Vec<u8> {
        self.received.lock().unwrap()[name].clone()
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A UDP socket and a TCP listener on the same loopback port.
fn bind_pair() -> (UdpSocket, TcpListener) {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()) {
            return (udp, tcp);
        }
    }
    panic!("no loopback port free for both UDP and TCP");
}

fn serve_udp(
    socket: UdpSocket,
    (mode, questionless): (Arc<AtomicU8>, Arc<AtomicU8>),
    count: Arc<AtomicUsize>,
    (sent, received, ports): (ByName, ByName, Arc<Mutex<Vec<u16>>>),
    stop: Arc<AtomicBool>,
) {
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let forger = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut buf = [0u8; 4096];
    while !stop.load(SeqCst) {
        let Ok((len, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        count.fetch_add(1, SeqCst);
        ports.lock().unwrap().push(from.port());
        let Ok(query) = Message::from_vec(&buf[..len]) else {
            continue;
        };
        received
            .lock()
            .unwrap()
            .insert(key(&query), buf[..len].to_vec());
        let mode = Mode::from_u8(mode.load(SeqCst));
        let reply = match mode {
            Mode::Silent => continue,
            Mode::ServFail => error(&query, ResponseCode::ServFail),
            Mode::Refused => error(&query, ResponseCode::Refused),
            Mode::Truncated => {
                let mut m = answer_for(&query);
                m.answers.clear();
                m.authorities.clear();
                m.additionals.clear();
                m.metadata.truncation = true;
                m
            }
            Mode::Answer => answer_for(&query),
            Mode::Delayed => {
                std::thread::sleep(STUB_DELAY);
                answer_for(&query)
            }
            Mode::Questionless => {
                let mut header = buf[..12].to_vec();
                header[2] |= 0x80;
                header[3] = (header[3] & 0xF0) | questionless.load(SeqCst);
                header[4..12].fill(0);
                let _ = socket.send_to(&header, from);
                continue;
            }
            Mode::CaseFlipped => {
                let mut forged = answer_for(&query);
                forged.answers = vec![Record::from_rdata(
                    query.queries[0].name().clone(),
                    60,
                    RData::A(A(Ipv4Addr::new(6, 6, 6, 6))),
                )];
                let flipped: String = query.queries[0]
                    .name()
                    .to_ascii()
                    .chars()
                    .map(|c| match c {
                        'a'..='z' => c.to_ascii_uppercase(),
                        _ => c.to_ascii_lowercase(),
                    })
                    .collect();
                forged.queries[0].set_name(Name::from_ascii(flipped).unwrap());
                let _ = socket.send_to(&forged.to_vec().unwrap(), from);
                std::thread::sleep(Duration::from_millis(30));
                answer_for(&query)
            }
            Mode::Spoofed => {
                let mut forged = answer_for(&query);
                forged.answers = vec![Record::from_rdata(
                    query.queries[0].name().clone(),
                    60,
                    RData::A(A(Ipv4Addr::new(6, 6, 6, 6))),
                )];
                let _ = forger.send_to(&forged.to_vec().unwrap(), from);
                let mut wrong_question = forged.clone();
                wrong_question.queries[0].set_name(Name::from_str("other.example.").unwrap());
                let _ = socket.send_to(&wrong_question.to_vec().unwrap(), from);
                std::thread::sleep(Duration::from_millis(30));
                answer_for(&query)
            }
        };
        let bytes = reply.to_vec().unwrap();
        if mode != Mode::Truncated {
            sent.lock().unwrap().insert(key(&query), bytes.clone());
        }
        let _ = socket.send_to(&bytes, from);
    }
}

fn serve_tcp(listener: TcpListener, count: Arc<AtomicUsize>, sent: ByName, stop: Arc<AtomicBool>) {
    listener.set_nonblocking(true).unwrap();
    while !stop.load(SeqCst) {
        let Ok((mut stream, _)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let Some(query) = read_frame(&mut stream) else {
            continue;
        };
        count.fetch_add(1, SeqCst);
        let Ok(query) = Message::from_vec(&query) else {
            continue;
        };
        let bytes = answer_for(&query).to_vec().unwrap();
        sent.lock().unwrap().insert(key(&query), bytes.clone());
        let _ = write_frame(&mut stream, &bytes);
    }
}

fn key(query: &Message) -> String {
    let name = query.queries[0].name().to_ascii().to_lowercase();
    name.trim_end_matches('.').to_string()
}

fn response_to(query: &Message) -> Message {
    let mut m = Message::response(query.metadata.id, OpCode::Query);
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.queries = query.queries.clone();
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        m.edns = Some(edns);
    }
    m
}

fn error(query: &Message, rcode: ResponseCode) -> Message {
    let mut m = response_to(query);
    m.metadata.response_code = rcode;
    m
}

fn name(s: &str) -> Name {
    Name::from_str(s).unwrap()
}

/// The stub's answers, chosen by the first label of the query name.
fn answer_for(query: &Message) -> Message {
    let mut m = response_to(query);
    let q = &query.queries[0];
    let owner = q.name().clone();
    let first = key(query).split('.').next().unwrap_or("").to_string();
    let rr = |rdata| Record::from_rdata(owner.clone(), 3600, rdata);
    match first.as_str() {
        "mx" => m
            .answers
            .push(rr(RData::MX(MX::new(10, name("mail.example."))))),
        "txt" => m.answers.push(rr(RData::TXT(TXT::new(vec![
            "v=spf1 -all".into(),
            "second string".into(),
        ])))),
        "srv" => m.answers.push(rr(RData::SRV(SRV::new(
            1,
            2,
            5353,
            name("target.example."),
        )))),
        "cname" => {
            m.answers
                .push(rr(RData::CNAME(CNAME(name("target.example.")))));
            m.answers.push(Record::from_rdata(
                name("target.example."),
                123,
                RData::A(A(Ipv4Addr::new(192, 0, 2, 7))),
            ));
        }
        "nx" => {
            m.metadata.response_code = ResponseCode::NXDomain;
            m.authorities.push(Record::from_rdata(
                name("example."),
                900,
                RData::SOA(SOA::new(
                    name("ns.example."),
                    name("hostmaster.example."),
                    2024010101,
                    7200,
                    900,
                    1209600,
                    300,
                )),
            ));
        }
        "big" => {
            for i in 0..120u8 {
                m.answers.push(rr(RData::A(A(Ipv4Addr::new(10, 1, 0, i)))));
            }
        }
        _ => m.answers.push(rr(RData::A(A(Ipv4Addr::new(192, 0, 2, 1))))),
    }
    m
}

fn read_frame(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).ok()?;
    Some(body)
}

fn write_frame(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(msg);
    stream.write_all(&framed)
}

// ------------------------------------------------------------- helpers ---

fn query(id: u16, qname: &str, qtype: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name(qname), qtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        e.set_dnssec_ok(true);
        m.edns = Some(e);
    }
    m.to_vec().unwrap()
}

fn config_with(upstreams: &[&Stub]) -> Config {
    let mut config = test_config();
    config.upstreams = upstreams.iter().map(|s| s.addr).collect();
    config
}

fn start(upstreams: &[&Stub]) -> (Forwarder, Arc<ForwardStats>) {
    let stats = Arc::new(ForwardStats::default());
    let fwd = Forwarder::start(&config_with(upstreams), stats.clone()).unwrap();
    (fwd, stats)
}

/// A client socket on loopback that receives the forwarder's answers.
struct Client {
    socket: Arc<UdpSocket>,
}

impl Client {
    fn new() -> Client {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(4)))
            .unwrap();
        Client {
            socket: Arc::new(socket),
        }
    }

    fn reply(&self, max_len: usize) -> Reply {
        Reply::Udp {
            socket: self.socket.clone(),
            peer: self.socket.local_addr().unwrap(),
            local: None,
            max_len,
        }
    }

    fn recv(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 65535];
        let (len, _) = self.socket.recv_from(&mut buf).expect("no answer");
        buf.truncate(len);
        buf
    }

    /// Submits `q` and waits for its answer.
    fn ask(&self, fwd: &Forwarder, q: &[u8]) -> Vec<u8> {
        assert!(fwd.submit(q, self.reply(1232)), "submit refused");
        self.recv()
    }
}

fn rcode(msg: &[u8]) -> ResponseCode {
    Message::from_vec(msg).unwrap().metadata.response_code
}

fn id(msg: &[u8]) -> u16 {
    u16::from_be_bytes([msg[0], msg[1]])
}

fn metrics(stats: &ForwardStats) -> String {
    let mut out = String::new();
    stats.render(&mut out);
    out
}

/// The value of the metric line starting with `prefix`.
fn metric(stats: &ForwardStats, prefix: &str) -> f64 {
    let text = metrics(stats);
    let line = text
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no metric {prefix} in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

// --------------------------------------------------- through `submit` ---

#[test]
fn mx_txt_srv_cname_come_back_byte_identical_but_for_the_id() {
    let stub = Stub::start(Mode::Answer);
    let (fwd, stats) = start(&[&stub]);
    let client = Client::new();
    for (i, (qname, qtype)) in [
        ("mx.example.", RecordType::MX),
        ("TXT.Example.", RecordType::TXT),
        ("srv.example.", RecordType::SRV),
        ("cname.example.", RecordType::CNAME),
    ]
    .into_iter()
    .enumerate()
    {
        let client_id = 0x4000 + i as u16;
        let q = query(client_id, qname, qtype, true);
        let answer = client.ask(&fwd, &q);
        let upstream_saw = stub.sent_for(&qname.to_lowercase()[..qname.len() - 1]);
        assert_eq!(id(&answer), client_id, "{qname}: the client's id restored");
        assert_ne!(
            id(&upstream_saw),
            client_id,
            "{qname}: the upstream saw a fresh id"
        );
        assert_eq!(
            answer[2..],
            upstream_saw[2..],
            "{qname}: bytes relayed unchanged"
        );
        let m = Message::from_vec(&answer).unwrap();
        assert_eq!(m.answers[0].record_type(), qtype, "{qname}");
        let upstream_got = stub.received_for(&qname.to_lowercase()[..qname.len() - 1]);
        assert_eq!(
            upstream_got[2..],
            q[2..],
            "{qname}: query relayed as is (case, EDNS, DO bit)"
        );
        assert_eq!(id(&upstream_got), id(&upstream_saw));
    }
    assert_eq!(metric(&stats, "glued_forward_answered_total"), 4.0);
    assert_eq!(
        metric(&stats, "glued_forward_latency_seconds_count"),
        4.0,
        "latency observed"
    );
    fwd.stop();
}

#[test]
fn fresh_ids_differ_between_queries() {
    let stub = Stub::start(Mode::Answer);
    let (fwd, _) = start(&[&stub]);
    let client = Client::new();
    let mut upstream_ids = std::collections::HashSet::new();
    for i in 0..20 {
        let qname = format!("a{i}.example.");
        client.ask(&fwd, &query(7, &qname, RecordType::A, false));
        upstream_ids.insert(id(&stub.sent_for(&qname[..qname.len() - 1])));
    }
    assert!(
        upstream_ids.len() >= 18,
        "the same client id must not give the same upstream id: {upstream_ids:?}"
    );
    fwd.stop();
}

#[test]
fn upstream_nxdomain_passes_with_its_soa() {
    let stub = Stub::start(Mode::Answer);
    let (fwd, _) = start(&[&stub]);
    let client = Client::new();
    let answer = client.ask(&fwd, &query(99, "nx.example.", RecordType::A, false));
    let m = Message::from_vec(&answer).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(m.authorities.len(), 1);
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
    assert_eq!(m.authorities[0].ttl, 900);
    assert_eq!(answer[2..], stub.sent_for("nx.example")[2..]);
    fwd.stop();
}

#[test]
fn servfail_and_refused_upstreams_are_skipped_for_the_next() {
    let servfail = Stub::start(Mode::ServFail);
    let refused = Stub::start(Mode::Refused);
    let good = Stub::start(Mode::Answer);
    let (fwd, stats) = start(&[&servfail, &refused, &good]);
    let client = Client::new();
    let t0 = Instant::now();
    let answer = client.ask(&fwd, &query(5, "www.example.", RecordType::A, false));
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "no timeout involved"
    );
    assert_eq!(rcode(&answer), ResponseCode::NoError);
    assert_eq!(id(&answer), 5);
    assert_eq!(answer[2..], good.sent_for("www.example")[2..]);
    assert_eq!((servfail.udp_count(), refused.udp_count()), (1, 1));
    let failures = format!(
        "glued_upstream_failures_total{{upstream=\"{}\"}}",
        servfail.addr
    );
    assert_eq!(metric(&stats, &failures), 1.0);
    fwd.stop();
}

#[test]
fn every_upstream_failing_gives_servfail_quickly() {
    let servfail = Stub::start(Mode::ServFail);
    let refused = Stub::start(Mode::Refused);
    let (fwd, stats) = start(&[&servfail, &refused]);
    let client = Client::new();
    let t0 = Instant::now();
    let answer = client.ask(&fwd, &query(6, "www.example.", RecordType::A, true));
    assert!(t0.elapsed() < Duration::from_millis(500));
    let m = Message::from_vec(&answer).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(m.metadata.id, 6);
    assert_eq!(m.queries[0].name().to_ascii(), "www.example.");
    assert!(m.edns.is_some(), "an EDNS query gets an EDNS SERVFAIL");
    assert_eq!(metric(&stats, "glued_forward_servfail_total"), 1.0);
    fwd.stop();
}

#[test]
fn silent_upstreams_give_servfail_within_the_budget() {
    let a = Stub::start(Mode::Silent);
    let b = Stub::start(Mode::Silent);
    let (fwd, _) = start(&[&a, &b]);
    let client = Client::new();
    let t0 = Instant::now();
    let answer = client.ask(&fwd, &query(8, "www.example.", RecordType::A, false));
    let elapsed = t0.elapsed();
    assert_eq!(rcode(&answer), ResponseCode::ServFail);
    assert!(
        elapsed >= ATTEMPT_TIMEOUT * 2 - Duration::from_millis(50),
        "both upstreams were given their time: {elapsed:?}"
    );
    assert!(elapsed < Duration::from_millis(2500), "{elapsed:?}");
    assert_eq!((a.udp_count(), b.udp_count()), (1, 1));
    fwd.stop();
}

#[test]
fn spoofed_replies_are_ignored() {
    let stub = Stub::start(Mode::Spoofed);
    let (fwd, stats) = start(&[&stub]);
    let client = Client::new();
    let answer = client.ask(&fwd, &query(9, "www.example.", RecordType::A, false));
    let m = Message::from_vec(&answer).unwrap();
    assert_eq!(
        m.answers[0].data,
        RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
        "the forged answer from another port must not win"
    );
    assert_eq!(m.queries[0].name().to_ascii(), "www.example.");
    // The forged reply (other port) and the wrong-question one.
    let deadline = Instant::now() + Duration::from_secs(1);
    while metric(&stats, "glued_forward_unmatched_replies_total") < 2.0 && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(metric(&stats, "glued_forward_unmatched_replies_total"), 2.0);
    fwd.stop();
}

/// RFC 5452 §9.2: the upstream sees the queries come from many ports, not
/// from a handful (it was 4 fixed ones).
#[test]
fn queries_leave_from_ports_drawn_at_random_from_a_large_pool() {
    let stub = Stub::start(Mode::Answer);
    let (fwd, _) = start(&[&stub]);
    let client = Client::new();
    for i in 0..300u16 {
        let answer = client.ask(
            &fwd,
            &query(i, &format!("p{i}.example."), RecordType::A, false),
        );
        assert_eq!(id(&answer), i);
    }
    let ports = stub.ports.lock().unwrap().clone();
    assert_eq!(ports.len(), 300);
    let distinct: std::collections::HashSet<_> = ports.iter().collect();
    assert!(
        distinct.len() >= 200,
        "{} distinct source ports over 300 queries",
        distinct.len()
    );
    fwd.stop();
}

/// A reply from the right address, port and id whose question differs only
/// in letter case (0x20) is not the answer: the client gets the real one.
#[test]
fn case_flipped_upstream_reply_is_rejected() {
    let stub = Stub::start(Mode::CaseFlipped);
    let (fwd, stats) = start(&[&stub]);
    let client = Client::new();
    let q = query(21, "wWw.ExAmple.", RecordType::A, true);
    let answer = client.ask(&fwd, &q);
    let m = Message::from_vec(&answer).unwrap();
    assert_eq!(m.metadata.id, 21);
    assert_eq!(
        answer[12..q.len() - 11],
        q[12..q.len() - 11],
        "the question exactly as asked"
    );
    assert!(
        m.answers
            .iter()
            .all(|r| r.data != RData::A(A(Ipv4Addr::new(6, 6, 6, 6)))),
        "the case-flipped forgery must not win: {m:?}"
    );
    if m.metadata.response_code != ResponseCode::ServFail {
        assert_eq!(answer[2..], stub.sent_for("www.example")[2..]);
    }
    assert_eq!(metric(&stats, "glued_forward_unmatched_replies_total"), 1.0);
    fwd.stop();
}

/// Identical queries in flight go upstream once; every client gets the
/// answer with its own id.
#[test]
fn identical_queries_in_flight_are_sent_upstream_once() {
    let stub = Stub::start(Mode::Delayed);
    let (fwd, stats) = start(&[&stub]);
    let clients: Vec<Client> = (0..20).map(|_| Client::new()).collect();
    for (i, client) in clients.iter().enumerate() {
        let q = query(0x500 + i as u16, "Same.Example.", RecordType::A, true);
        assert!(fwd.submit(&q, client.reply(1232)));
    }
    for (i, client) in clients.iter().enumerate() {
        let answer = client.recv();
        assert_eq!(id(&answer), 0x500 + i as u16, "client {i}: its own id");
        assert_eq!(
            answer[2..],
            stub.sent_for("same.example")[2..],
            "client {i}"
        );
    }
    assert!(
        stub.udp_count() <= 2,
        "{} upstream queries for 20 identical ones",
        stub.udp_count()
    );
    assert!(metric(&stats, "glued_forward_merged_total") >= 18.0);
    assert_eq!(metric(&stats, "glued_forward_answered_total"), 20.0);
    for client in &clients {
        client
            .socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut buf = [0u8; 512];
        assert!(client.socket.recv(&mut buf).is_err(), "one answer each");
    }
    fwd.stop();
}

/// Many SERVFAILs (or REFUSEDs) for broken names move each query on to the
/// next upstream but leave the failing one up: the next query still goes
/// to it first.
#[test]
fn servfail_and_refused_leave_the_upstream_up() {
    for mode in [Mode::ServFail, Mode::Refused] {
        let failing = Stub::start(mode);
        let good = Stub::start(Mode::Answer);
        let (fwd, stats) = start(&[&failing, &good]);
        let client = Client::new();
        let n = 2 * DOWN_AFTER_FAILURES as usize;
        for i in 0..n {
            let qname = format!("broken{i}.example.");
            let answer = client.ask(&fwd, &query(i as u16, &qname, RecordType::A, false));
            assert_eq!(rcode(&answer), ResponseCode::NoError, "{mode:?}");
            assert_eq!(answer[2..], good.sent_for(&qname[..qname.len() - 1])[2..]);
        }
        assert_eq!(failing.udp_count(), n, "{mode:?}: asked first every time");
        let up = format!("glued_upstream_up{{upstream=\"{}\"}}", failing.addr);
        assert_eq!(metric(&stats, &up), 1.0, "{mode:?}");
        let failures = format!(
            "glued_upstream_failures_total{{upstream=\"{}\"}}",
            failing.addr
        );
        assert_eq!(metric(&stats, &failures), n as f64);
        failing.set_mode(Mode::Answer);
        let answer = client.ask(&fwd, &query(99, "fixed.example.", RecordType::A, false));
        assert_eq!(failing.udp_count(), n + 1, "{mode:?}: still first in line");
        assert_eq!(answer[2..], failing.sent_for("fixed.example")[2..]);
        assert_eq!(good.udp_count(), n);
        fwd.stop();
    }
}

/// A question-less FORMERR (or NOTIMP, NOTAUTH: a TSIG-signed query the
/// upstream cannot verify) is the upstream's answer: relayed to the client
/// at once with its id, and no mark against the upstream.
#[test]
fn questionless_upstream_error_is_relayed_at_once_and_leaves_the_upstream_up() {
    let strict = Stub::start(Mode::Questionless);
    let other = Stub::start(Mode::Answer);
    let (fwd, stats) = start(&[&strict, &other]);
    let client = Client::new();
    let rcodes = [
        ResponseCode::FormErr,
        ResponseCode::NotImp,
        ResponseCode::NotAuth,
        ResponseCode::FormErr,
        ResponseCode::FormErr,
    ];
    for (i, expected) in rcodes.into_iter().enumerate() {
        strict.set_questionless_rcode(expected);
        let client_id = 0x600 + i as u16;
        let qname = format!("tsig{i}.example.");
        let t0 = Instant::now();
        let answer = client.ask(&fwd, &query(client_id, &qname, RecordType::A, true));
        assert!(
            t0.elapsed() < ATTEMPT_TIMEOUT,
            "relayed at once, not after a timeout: {:?}",
            t0.elapsed()
        );
        assert_eq!(id(&answer), client_id);
        assert_eq!(rcode(&answer), expected);
        assert_eq!(answer[4..12], [0; 8], "relayed as sent: no question");
    }
    assert_eq!(other.udp_count(), 0, "never moved to the next upstream");
    assert_eq!(strict.udp_count(), rcodes.len());
    let up = format!("glued_upstream_up{{upstream=\"{}\"}}", strict.addr);
    assert_eq!(metric(&stats, &up), 1.0);
    let timeouts = format!(
        "glued_upstream_timeouts_total{{upstream=\"{}\"}}",
        strict.addr
    );
    assert_eq!(metric(&stats, &timeouts), 0.0);
    fwd.stop();
}

#[test]
fn truncated_answer_is_retried_over_tcp_for_a_tcp_client() {
    let stub = Stub::start(Mode::Truncated);
    let (fwd, stats) = start(&[&stub]);
    let (tx, rx) = crossbeam_channel::bounded(4);
    assert!(fwd.submit(
        &query(11, "big.example.", RecordType::A, true),
        Reply::Tcp(tx)
    ));
    let answer = rx.recv_timeout(Duration::from_secs(3)).expect("no answer");
    let m = Message::from_vec(&answer).unwrap();
    assert!(!m.metadata.truncation, "whole answer");
    assert_eq!(m.answers.len(), 120);
    assert!(answer.len() > 1232);
    assert_eq!(id(&answer), 11);
    assert_eq!(answer[2..], stub.sent_for("big.example")[2..]);
    assert_eq!((stub.udp_count(), stub.tcp_queries.load(SeqCst)), (1, 1));
    let tcp = format!(
        "glued_upstream_tcp_queries_total{{upstream=\"{}\"}}",
        stub.addr
    );
    assert_eq!(metric(&stats, &tcp), 1.0);
    fwd.stop();
}

#[test]
fn tcp_wake_reply_wakes_the_connection_loop() {
    let stub = Stub::start(Mode::Answer);
    let (fwd, _) = start(&[&stub]);
    let mut poll = mio::Poll::new().unwrap();
    let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(7)).unwrap());
    let (tx, rx) = crossbeam_channel::bounded(4);
    let q = query(14, "mx.example.", RecordType::MX, false);
    // The connection loop keeps its waker (a dropped one closes its fd).
    let reply = Reply::TcpWake {
        tx,
        waker: waker.clone(),
    };
    assert!(fwd.submit(&q, reply));
    let mut events = mio::Events::with_capacity(4);
    poll.poll(&mut events, Some(Duration::from_secs(3)))
        .unwrap();
    assert!(events.iter().any(|e| e.token() == mio::Token(7)), "woken");
    let answer = rx.try_recv().expect("answer queued before the wake");
    assert_eq!(id(&answer), 14);
    assert_eq!(answer[2..], stub.sent_for("mx.example")[2..]);
    fwd.stop();
}

#[test]
fn answer_too_big_for_a_udp_client_is_truncated_with_tc() {
    let stub = Stub::start(Mode::Answer);
    let (fwd, _) = start(&[&stub]);
    let client = Client::new();
    let q = query(12, "big.example.", RecordType::A, true);
    assert!(fwd.submit(&q, client.reply(512)));
    let answer = client.recv();
    assert!(answer.len() <= 512);
    let m = Message::from_vec(&answer).unwrap();
    assert!(m.metadata.truncation);
    assert_eq!(m.metadata.id, 12);
    assert!(m.answers.is_empty());
    assert_eq!(m.queries[0].name().to_ascii(), "big.example.");
    assert!(m.edns.is_some(), "OPT kept");
    fwd.stop();
}

#[test]
fn tcp_retry_failure_passes_the_truncated_answer_on() {
    let stub = Stub::start(Mode::Truncated);
    // A UDP-only upstream: the TCP side of its port is closed.
    let udp_only = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_only_addr = udp_only.local_addr().unwrap();
    let relay = std::thread::spawn(move || {
        // Forwards one query to the truncating stub and its answer back.
        let mut buf = [0u8; 4096];
        udp_only
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let (len, from) = udp_only.recv_from(&mut buf).unwrap();
        let inner = UdpSocket::bind("127.0.0.1:0").unwrap();
        inner.send_to(&buf[..len], stub.addr).unwrap();
        inner
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let (len, _) = inner.recv_from(&mut buf).unwrap();
        udp_only.send_to(&buf[..len], from).unwrap();
    });
    let mut config = test_config();
    config.upstreams = vec![udp_only_addr];
    let fwd = Forwarder::start(&config, Arc::default()).unwrap();
    let (tx, rx) = crossbeam_channel::bounded(4);
    assert!(fwd.submit(
        &query(13, "big.example.", RecordType::A, false),
        Reply::Tcp(tx)
    ));
    let answer = rx.recv_timeout(Duration::from_secs(3)).expect("no answer");
    let m = Message::from_vec(&answer).unwrap();
    assert!(m.metadata.truncation, "TC=1 passed on");
    assert_eq!(m.metadata.id, 13);
    relay.join().unwrap();
    fwd.stop();
}

#[test]
fn down_upstream_is_not_tried_on_every_query_and_is_probed_back() {
    let flaky = Stub::start(Mode::Silent);
    let good = Stub::start(Mode::Answer);
    let (fwd, stats) = start(&[&flaky, &good]);
    let client = Client::new();
    let up = format!("glued_upstream_up{{upstream=\"{}\"}}", flaky.addr);
    // Enough failures at once to mark it down.
    for i in 0..DOWN_AFTER_FAILURES as u16 {
        assert!(fwd.submit(
            &query(i, &format!("d{i}.example."), RecordType::A, false),
            client.reply(1232)
        ));
    }
    for _ in 0..DOWN_AFTER_FAILURES {
        assert_eq!(
            rcode(&client.recv()),
            ResponseCode::NoError,
            "the next upstream answers"
        );
    }
    assert_eq!(metric(&stats, &up), 0.0);
    let tried = flaky.udp_count();
    assert_eq!(tried, DOWN_AFTER_FAILURES as usize);
    for i in 0..50 {
        let t = Instant::now();
        let answer = client.ask(
            &fwd,
            &query(i, &format!("e{i}.example."), RecordType::A, false),
        );
        assert_eq!(rcode(&answer), ResponseCode::NoError);
        assert!(
            t.elapsed() < ATTEMPT_TIMEOUT,
            "query {i} waited for the down upstream: {:?}",
            t.elapsed()
        );
    }
    assert_eq!(flaky.udp_count(), tried, "the down upstream is skipped");

    // It comes back: one probe per interval finds it.
    flaky.set_mode(Mode::Answer);
    let deadline = Instant::now() + PROBE_INTERVAL + Duration::from_secs(3);
    while metric(&stats, &up) == 0.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(metric(&stats, &up), 1.0, "probed back up");
    assert_eq!(flaky.udp_count(), tried + 1, "exactly one probe");
    let answer = client.ask(&fwd, &query(77, "back.example.", RecordType::A, false));
    assert_eq!(rcode(&answer), ResponseCode::NoError);
    assert_eq!(flaky.udp_count(), tried + 2, "first upstream used again");
    fwd.stop();
}

#[test]
fn all_down_still_tries_the_best_upstream() {
    let only = Stub::start(Mode::Silent);
    let (fwd, _) = start(&[&only]);
    let client = Client::new();
    for i in 0..DOWN_AFTER_FAILURES as u16 {
        assert!(fwd.submit(
            &query(i, &format!("x{i}.example."), RecordType::A, false),
            client.reply(1232)
        ));
    }
    for _ in 0..DOWN_AFTER_FAILURES {
        assert_eq!(rcode(&client.recv()), ResponseCode::ServFail);
    }
    only.set_mode(Mode::Answer);
    let answer = client.ask(&fwd, &query(50, "y.example.", RecordType::A, false));
    assert_eq!(
        rcode(&answer),
        ResponseCode::NoError,
        "tried despite being down"
    );
    fwd.stop();
}

#[test]
fn no_upstream_refuses_at_once() {
    let fwd = Forwarder::start(&test_config(), Arc::default()).unwrap();
    let client = Client::new();
    assert!(!fwd.submit(
        &query(1, "www.example.", RecordType::A, false),
        client.reply(512)
    ));
    fwd.stop();
    fwd.stop();
}

#[test]
fn submit_never_blocks_and_stop_is_quick() {
    let stub = Stub::start(Mode::Silent);
    let (fwd, stats) = start(&[&stub]);
    let client = Client::new();
    let q = query(1, "www.example.", RecordType::A, false);
    let mut slowest = Duration::ZERO;
    let mut accepted = 0;
    for _ in 0..10_000 {
        let t = Instant::now();
        accepted += usize::from(fwd.submit(&q, client.reply(512)));
        slowest = slowest.max(t.elapsed());
    }
    // A blocking submit would wait for the forwarder to drain a full inbox
    // (seconds against a silent upstream); 500 ms leaves room for the
    // scheduler of a busy 2-core machine without hiding that.
    assert!(
        slowest < Duration::from_millis(500),
        "submit blocked for {slowest:?}"
    );
    assert!(
        accepted >= 1024,
        "at least a full inbox accepted: {accepted}"
    );
    assert!(
        metric(&stats, "glued_forward_in_flight") <= 4096.0,
        "in-flight table bounded"
    );
    assert!(
        !fwd.submit(&q[..5], client.reply(512)),
        "no question: refused"
    );
    let t = Instant::now();
    let clone = fwd.clone();
    clone.stop();
    fwd.stop();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "stop took {:?}",
        t.elapsed()
    );
    assert!(!fwd.submit(&q, client.reply(512)), "stopped");
    assert_eq!(
        metric(&stats, "glued_forward_in_flight"),
        0.0,
        "queries in flight answered"
    );
}

// ---------------------------------------------- end to end: DnsServer ---

struct Server {
    dns: Option<DnsServer>,
    fwd: Forwarder,
}

impl Server {
    fn start(upstreams: &[&Stub]) -> Server {
        let config = config_with(upstreams);
        let fwd = Forwarder::start(&config, Arc::default()).unwrap();
        let table = glued::table::shared(&config.domain, config.ttl_secs);
        let dns =
            DnsServer::start(&config, table, fwd.clone(), Arc::new(DnsStats::default())).unwrap();
        Server {
            dns: Some(dns),
            fwd,
        }
    }
    fn udp(&self) -> SocketAddr {
        self.dns.as_ref().unwrap().udp_addr
    }
    fn tcp(&self) -> SocketAddr {
        self.dns.as_ref().unwrap().tcp_addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(dns) = self.dns.take() {
            dns.stop();
        }
        self.fwd.stop();
    }
}

fn udp_exchange(server: SocketAddr, q: &[u8]) -> Vec<u8> {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(4)))
        .unwrap();
    socket.send_to(q, server).unwrap();
    let mut buf = vec![0u8; 65535];
    let len = socket.recv(&mut buf).expect("no answer from the server");
    buf.truncate(len);
    buf
}

fn tcp_exchange(server: SocketAddr, q: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(server).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(4)))
        .unwrap();
    write_frame(&mut stream, q).unwrap();
    read_frame(&mut stream).expect("no answer from the server")
}

#[test]
fn end_to_end_records_come_back_byte_identical_but_for_the_id() {
    let stub = Stub::start(Mode::Answer);
    let server = Server::start(&[&stub]);
    for (i, (qname, qtype)) in [
        ("mx.example.", RecordType::MX),
        ("txt.example.", RecordType::TXT),
        ("srv.example.", RecordType::SRV),
        ("cname.example.", RecordType::CNAME),
        ("nx.example.", RecordType::A),
    ]
    .into_iter()
    .enumerate()
    {
        let q = query(0x100 + i as u16, qname, qtype, true);
        let answer = udp_exchange(server.udp(), &q);
        assert_eq!(id(&answer), 0x100 + i as u16, "{qname}");
        assert_eq!(
            answer[2..],
            stub.sent_for(&qname[..qname.len() - 1])[2..],
            "{qname} over UDP"
        );
        let answer = tcp_exchange(server.tcp(), &q);
        assert_eq!(id(&answer), 0x100 + i as u16);
        assert_eq!(
            answer[2..],
            stub.sent_for(&qname[..qname.len() - 1])[2..],
            "{qname} over TCP"
        );
    }
    let nx = Message::from_vec(&udp_exchange(
        server.udp(),
        &query(1, "nx.example.", RecordType::A, false),
    ))
    .unwrap();
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(nx.authorities[0].record_type(), RecordType::SOA);
}

#[test]
fn end_to_end_truncated_upstream_answer_reaches_a_tcp_client_whole() {
    let stub = Stub::start(Mode::Truncated);
    let server = Server::start(&[&stub]);
    let answer = tcp_exchange(
        server.tcp(),
        &query(21, "big.example.", RecordType::A, true),
    );
    let m = Message::from_vec(&answer).unwrap();
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 120);
    assert_eq!(answer[2..], stub.sent_for("big.example")[2..]);
    assert_eq!(
        stub.tcp_queries.load(SeqCst),
        1,
        "retried over TCP upstream"
    );
}

#[test]
fn end_to_end_failing_upstreams_fall_through_to_the_next() {
    let servfail = Stub::start(Mode::ServFail);
    let refused = Stub::start(Mode::Refused);
    let good = Stub::start(Mode::Answer);
    let server = Server::start(&[&servfail, &refused, &good]);
    let answer = udp_exchange(
        server.udp(),
        &query(31, "www.example.", RecordType::A, false),
    );
    assert_eq!(rcode(&answer), ResponseCode::NoError);
    assert_eq!(answer[2..], good.sent_for("www.example")[2..]);
}

/// Local names keep answering at full speed while every upstream is silent
/// and the forwarded query waits for its SERVFAIL.
#[test]
fn end_to_end_silent_upstreams_never_slow_local_answers() {
    let a = Stub::start(Mode::Silent);
    let b = Stub::start(Mode::Silent);
    let server = Server::start(&[&a, &b]);
    let forwarded = {
        let addr = server.udp();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let answer = udp_exchange(addr, &query(41, "www.example.", RecordType::A, false));
            (t0.elapsed(), answer)
        })
    };
    // Also keep the forwarder busy with many more forwarded queries.
    let flood = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u16 {
        let q = query(i, &format!("f{i}.example."), RecordType::A, false);
        flood.send_to(&q, server.udp()).unwrap();
    }
    let local = UdpSocket::bind("127.0.0.1:0").unwrap();
    local
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut buf = [0u8; 1500];
    let mut slowest = Duration::ZERO;
    let t0 = Instant::now();
    for i in 0..2000u16 {
        let q = if i % 2 == 0 {
            query(i, "glued.internal.", RecordType::SOA, false)
        } else {
            query(i, "nope.glued.internal.", RecordType::A, false)
        };
        let t = Instant::now();
        local.send_to(&q, server.udp()).unwrap();
        let len = local.recv(&mut buf).expect("local answer lost");
        slowest = slowest.max(t.elapsed());
        assert_eq!(id(&buf[..len]), i);
        let expected = if i % 2 == 0 {
            ResponseCode::NoError
        } else {
            ResponseCode::NXDomain
        };
        assert_eq!(rcode(&buf[..len]), expected);
    }
    let all_local = t0.elapsed();
    let (elapsed, answer) = forwarded.join().unwrap();
    assert_eq!(rcode(&answer), ResponseCode::ServFail);
    assert!(
        elapsed < Duration::from_millis(2500),
        "SERVFAIL after {elapsed:?}"
    );
    assert!(
        all_local < Duration::from_secs(2),
        "2000 local answers took {all_local:?}, i.e. they waited for the upstreams"
    );
    assert!(
        slowest < Duration::from_millis(250),
        "slowest local answer {slowest:?}; one that waited for an upstream takes {ATTEMPT_TIMEOUT:?}"
    );
}
