//! HTTP status: `/metrics`, `/healthz`, `/records`, `/peers`, and
//! `POST /cache/flush` (empties the forward cache).
//!
//! A deliberately small HTTP/1.1 server on one thread: it accepts one
//! connection at a time, reads one `GET` request of bounded size under a
//! short deadline, answers with `Connection: close`, and moves on.
//!
//! Invariants: a slow, stuck or hostile client holds the thread for at most
//! [`REQUEST_DEADLINE`] plus [`ANSWER_DEADLINE`] (plus [`DRAIN_TIMEOUT`] for
//! a refused request); no request makes it allocate
//! more than [`MAX_REQUEST_BYTES`] for input; nothing here panics on input;
//! the thread only reads the table, the metrics and the peer list (a cache
//! flush only bumps the cache's generation; the forwarder frees it).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use compact_str::CompactString;

use crate::dns::cache::Cache;
use crate::gossip::Peers;
use crate::metrics::Metrics;
use crate::table::{SharedTable, Source};

/// Largest request head (request line and headers) read; larger gets 431.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time a client has to send its whole request head.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Time a client has to take each chunk of the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a client has to take the whole answer, however slowly it reads.
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(5);
/// Longest time spent discarding the rest of a refused request.
pub const DRAIN_TIMEOUT: Duration = Duration::from_millis(200);
/// Most bytes discarded from a refused request.
pub const MAX_DRAIN_BYTES: usize = 64 * 1024;
/// At most one `accept failed` warning per this long (clients can make
/// accepts fail, e.g. by exhausting descriptors); the rest go to debug.
pub const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(60);
/// How often the idle accept loop looks at the stop flag.
pub const STOP_POLL: Duration = Duration::from_millis(100);
/// Prometheus text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Timeout of each step (connect, write, each read) of a status request
/// made by `glued health`, `glued peers`, `glued records` and `glued cache
/// flush`.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest answer those commands read.
pub const MAX_CLIENT_ANSWER_BYTES: u64 = 64 << 20;
/// `POST` here empties the forward cache (`glued cache flush`).
pub const CACHE_FLUSH_PATH: &str = "/cache/flush";
const JSON_CONTENT_TYPE: &str = "application/json";
const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// What the status thread reads to answer.
struct State {
    table: SharedTable,
    metrics: Arc<Metrics>,
    peers: Peers,
    /// The forward cache, when there is one (`POST /cache/flush`).
    cache: Option<Arc<Cache>>,
}

/// The running status thread.
pub struct HttpServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Binds `bind` and starts the status thread.
    pub fn start(
        bind: SocketAddr,
        table: SharedTable,
        metrics: Arc<Metrics>,
        peers: Peers,
        cache: Option<Arc<Cache>>,
    ) -> io::Result<HttpServer> {
        let listener = TcpListener::bind(bind)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let state = State {
            table,
            metrics,
            peers,
            cache,
        };
        let thread = std::thread::Builder::new()
            .name("glued-http".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    let alive = state.metrics.http.enter();
                    serve(listener, &state, &stop);
                    alive.retire();
                }
            })?;
        Ok(HttpServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and joins it (within [`STOP_POLL`] when idle).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: TcpListener, state: &State, stop: &AtomicBool) {
    let mut warnings = LogLimit::new(ACCEPT_WARN_EVERY);
    while !stop.load(Ordering::Relaxed) {
        state.metrics.http.beat();
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Err(e) = handle(stream, state) {
                    log::debug!("http: client {peer}: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_readable(&listener),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                if warnings.allow(Instant::now()) {
                    log::warn!(
                        "http: accept failed: {e} (repeats within {ACCEPT_WARN_EVERY:?} at debug level)"
                    );
                } else {
                    log::debug!("http: accept failed: {e}");
                }
                std::thread::sleep(STOP_POLL);
            }
        }
    }
}

/// Lets one line through per period: a failure others can cause is logged
/// at warn at a rate no one outside controls.
struct LogLimit {
    every: Duration,
    last: Option<Instant>,
}

impl LogLimit {
    fn new(every: Duration) -> LogLimit {
        LogLimit { every, last: None }
    }

    fn allow(&mut self, now: Instant) -> bool {
        let allowed = self
            .last
            .is_none_or(|t| now.saturating_duration_since(t) >= self.every);
        if allowed {
            self.last = Some(now);
        }
        allowed
    }
}

/// Sleeps until the listener has a connection or [`STOP_POLL`] passes.
fn wait_readable(listener: &TcpListener) {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut fd, 1, STOP_POLL.as_millis() as libc::c_int) };
}

/// An answer: status line, content type, body.
struct Response {
    status: &'static str,
    content_type: &'static str,
    body: String,
    allow_get: bool,
}

impl Response {
    fn text(status: &'static str, body: &str) -> Response {
        Response {
            status,
            content_type: TEXT_CONTENT_TYPE,
            body: format!("{body}\n"),
            allow_get: false,
        }
    }
}

fn handle(mut stream: TcpStream, state: &State) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let (response, head_only) = match read_head(&mut stream)? {
        Head::Complete(head) => route(&head, state),
        Head::TooLarge => {
            let r = Response::text("431 Request Header Fields Too Large", "request too large");
            write_response(&mut stream, &r, false)?;
            // Read (a bounded amount of) what the client is still sending, so
            // that closing does not reset the connection before it reads the
            // answer.
            drain(&mut stream);
            return Ok(());
        }
        Head::Closed => return Ok(()),
    };
    write_response(&mut stream, &response, head_only)
}

fn write_response(stream: &mut TcpStream, response: &Response, head_only: bool) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    if response.allow_get {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(&response.body);
    }
    write_by(stream, out.as_bytes(), Instant::now() + ANSWER_DEADLINE)?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

/// Writes all of `bytes` before `deadline`, each write waiting at most
/// [`WRITE_TIMEOUT`]: a client that takes the answer a trickle at a time
/// cannot hold the thread past the deadline.
fn write_by(stream: &mut TcpStream, mut bytes: &[u8], deadline: Instant) -> io::Result<()> {
    while !bytes.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "answer too slow"));
        }
        stream.set_write_timeout(Some(left.min(WRITE_TIMEOUT)))?;
        match stream.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Discards input for at most [`DRAIN_TIMEOUT`] or [`MAX_DRAIN_BYTES`].
fn drain(stream: &mut TcpStream) {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let mut buf = [0u8; 4096];
    let mut total = 0;
    while total < MAX_DRAIN_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
    }
}

enum Head {
    Complete(Vec<u8>),
    TooLarge,
    /// The client went away (or never finished) before the end of the head.
    Closed,
}

/// Reads up to the blank line that ends the request head, within
/// [`REQUEST_DEADLINE`] and [`MAX_REQUEST_BYTES`].
fn read_head(stream: &mut TcpStream) -> io::Result<Head> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut buf = vec![0u8; MAX_REQUEST_BYTES];
    let mut len = 0;
    loop {
        if find_head_end(&buf[..len]).is_some() {
            buf.truncate(len);
            return Ok(Head::Complete(buf));
        }
        if len == buf.len() {
            return Ok(Head::TooLarge);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "request too slow"));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[len..]) {
            Ok(0) => return Ok(Head::Closed),
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").or_else(|| {
        // Be lenient with bare-LF clients (netcat, hand-typed requests).
        buf.windows(2).position(|w| w == b"\n\n")
    })
}

/// Picks the answer for a request head; the flag is true for `HEAD`.
fn route(head: &[u8], state: &State) -> (Response, bool) {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (words.next(), words.next(), words.next())
    else {
        return (Response::text("400 Bad Request", "bad request"), false);
    };
    if !version.starts_with("HTTP/1.") {
        return (Response::text("400 Bad Request", "bad request"), false);
    }
    let head_only = method == "HEAD";
    let path = target.split(['?', '#']).next().unwrap_or_default();
    if path == CACHE_FLUSH_PATH {
        return (cache_flush(method, state), false);
    }
    if method != "GET" && !head_only {
        let mut r = Response::text("405 Method Not Allowed", "method not allowed");
        r.allow_get = true;
        return (r, false);
    }
    let response = match path {
        "/metrics" => Response {
            status: "200 OK",
            content_type: METRICS_CONTENT_TYPE,
            body: state.metrics.render(&state.table.load()),
            allow_get: false,
        },
        "/healthz" => healthz(state),
        "/records" => json(records_json(state)),
        "/peers" => {
            let peers = state.peers.lock().unwrap_or_else(|e| e.into_inner());
            json(serde_json::to_string(&*peers))
        }
        _ => Response::text("404 Not Found", "not found"),
    };
    (response, head_only)
}

/// 200 `ok`, or 503 with every reason, one per line.
fn healthz(state: &State) -> Response {
    let problems = state.metrics.problems();
    if problems.is_empty() {
        Response::text("200 OK", "ok")
    } else {
        Response::text("503 Service Unavailable", &problems.join("\n"))
    }
}

/// `POST /cache/flush`: empties the forward cache (404 without one).
fn cache_flush(method: &str, state: &State) -> Response {
    if method != "POST" {
        return Response::text("405 Method Not Allowed", "use POST");
    }
    match &state.cache {
        Some(cache) => {
            cache.flush();
            log::info!("forward cache flushed (status API)");
            Response::text("200 OK", "flushed")
        }
        None => Response::text(
            "404 Not Found",
            "no forward cache (cache_size = 0 or no upstream)",
        ),
    }
}

fn json(body: serde_json::Result<String>) -> Response {
    match body {
        Ok(mut body) => {
            body.push('\n');
            Response {
                status: "200 OK",
                content_type: JSON_CONTENT_TYPE,
                body,
                allow_get: false,
            }
        }
        Err(e) => Response::text("500 Internal Server Error", &e.to_string()),
    }
}

/// One entry of `/records`.
#[derive(serde::Serialize)]
struct RecordJson<'a> {
    origin: &'a str,
    node_name: &'a str,
    source: &'a Source,
    names: &'a [CompactString],
    addresses: Vec<String>,
    /// Compose project and service, when the container has them.
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a crate::table::Scope>,
    health: crate::table::Health,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    srv: &'a [crate::table::SrvPort],
    /// Names of this group that are conflicts (SPEC §3).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    conflicts: Vec<&'a str>,
}

/// Every record group of the table as a JSON array.
fn records_json(state: &State) -> serde_json::Result<String> {
    let table = state.table.load();
    let records: Vec<RecordJson> = table
        .groups
        .iter()
        .map(|((origin, source), group)| RecordJson {
            origin: &origin.id,
            node_name: &origin.node_name,
            source,
            names: &group.names,
            addresses: group
                .v4
                .iter()
                .map(|ip| ip.to_string())
                .chain(group.v6.iter().map(|ip| ip.to_string()))
                .collect(),
            scope: group.scope.as_deref(),
            health: group.health,
            srv: &group.srv,
            conflicts: group
                .names
                .iter()
                .map(CompactString::as_str)
                .filter(|n| table.conflicts.contains(*n))
                .collect(),
        })
        .collect();
    serde_json::to_string(&records)
}

/// Where a local client reaches a status server bound to `bind`: a
/// wildcard bind is reached on loopback.
pub fn client_addr(bind: SocketAddr) -> SocketAddr {
    let ip = match bind.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    SocketAddr::new(ip, bind.port())
}

/// `GET path` from a status server: its status code and body.
pub fn get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    request(addr, "GET", path)
}

/// `POST path` with an empty body (`glued cache flush`).
pub fn post(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    request(addr, "POST", path)
}

fn request(addr: SocketAddr, method: &str, path: &str) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: glued\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream
        .take(MAX_CLIENT_ANSWER_BYTES)
        .read_to_end(&mut answer)?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "not an HTTP answer");
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_accept_failure_is_warned_once_per_period() {
        let mut limit = LogLimit::new(ACCEPT_WARN_EVERY);
        let t0 = Instant::now();
        assert!(limit.allow(t0));
        assert!(!limit.allow(t0 + Duration::from_millis(100)));
        assert!(!limit.allow(t0 + ACCEPT_WARN_EVERY - Duration::from_millis(1)));
        assert!(limit.allow(t0 + ACCEPT_WARN_EVERY));
    }

    #[test]
    fn head_end() {
        assert_eq!(
            find_head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(23)
        );
        assert_eq!(find_head_end(b"GET / HTTP/1.0\n\n"), Some(14));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
    }

    fn state() -> State {
        State {
            table: crate::table::shared("glued.internal", 5),
            metrics: Arc::new(Metrics::default()),
            peers: Peers::default(),
            cache: None,
        }
    }

    #[test]
    fn routes() {
        let s = state();
        let status = |head: &str| route(head.as_bytes(), &s).0.status;
        assert_eq!(status("GET /healthz HTTP/1.1\r\n\r\n"), "200 OK");
        assert_eq!(status("GET /metrics?x=1 HTTP/1.1\r\n\r\n"), "200 OK");
        assert_eq!(status("GET /records HTTP/1.1\r\n\r\n"), "200 OK");
        assert_eq!(status("GET /peers HTTP/1.1\r\n\r\n"), "200 OK");
        assert_eq!(status("GET /nope HTTP/1.1\r\n\r\n"), "404 Not Found");
        assert_eq!(
            status("POST /healthz HTTP/1.1\r\n\r\n"),
            "405 Method Not Allowed"
        );
        assert_eq!(status("garbage\r\n\r\n"), "400 Bad Request");
        assert_eq!(status("GET / SPDY/3\r\n\r\n"), "400 Bad Request");
        assert!(route(b"HEAD /healthz HTTP/1.1\r\n\r\n", &s).1);
        assert_eq!(route(b"GET /records HTTP/1.1\r\n\r\n", &s).0.body, "[]\n");
    }
}
