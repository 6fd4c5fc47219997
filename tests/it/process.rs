//! A real `glued run` process for tests that need signals or a network
//! namespace: started with a cleared environment in its own directory
//! (optionally behind a prefix such as `ip netns exec NS`), its log
//! collected line by line, and DNS helpers to query it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

pub const GLUED: &str = env!("CARGO_BIN_EXE_glued");
/// How long a `glued run` may take to say where it listens.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one test query waits for its answer.
pub const ANSWER_WAIT: Duration = Duration::from_secs(1);

/// A running `glued run`; killed on drop.
pub struct Glued {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    pub dir: tempfile::TempDir,
}

impl Glued {
    /// Runs `PREFIX… glued run` in a fresh directory holding `glued.toml`
    /// (`toml`), with only `env` set (plus `GLUED_DATA_DIR` there).
    pub fn start(prefix: &[&str], toml: &str, env: &[(&str, &str)]) -> Glued {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("glued.toml"), toml).unwrap();
        let data_dir = dir.path().join("data");
        let mut argv: Vec<&str> = prefix.to_vec();
        argv.extend([GLUED, "run"]);
        let mut child = Command::new(argv[0])
            .args(&argv[1..])
            .env_clear()
            .env("GLUED_DATA_DIR", &data_dir)
            .envs(env.iter().copied())
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn glued run");
        let log = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    log.lock().unwrap().push(line);
                }
            });
        }
        Glued { child, log, dir }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("glued.toml")
    }

    /// Replaces `glued.toml` (written whole, then renamed into place).
    pub fn write_config(&self, toml: &str) {
        let tmp = self.dir.path().join("glued.toml.new");
        std::fs::write(&tmp, toml).unwrap();
        std::fs::rename(&tmp, self.config_path()).unwrap();
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) of the child we spawned and still own.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Number of log lines so far (to wait for lines after a point).
    pub fn n_lines(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Waits for a log line (after the first `after` lines) containing
    /// `needle`; panics with the log if none comes within `timeout`, or if
    /// the process exits.
    pub fn wait_for_after(&mut self, after: usize, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .log
                .lock()
                .unwrap()
                .iter()
                .skip(after)
                .find(|l| l.contains(needle))
            {
                return line.clone();
            }
            let exited = self.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "no log line with {needle:?} within {timeout:?} (exit: {exited:?}); log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        self.wait_for_after(0, needle, timeout)
    }

    /// The fixed DNS address, from the start-up log.
    pub fn dns_addr(&mut self) -> SocketAddr {
        let line = self.wait_for("DNS listening on udp ", START_TIMEOUT);
        addr_after(&line, "DNS listening on udp ")
    }
}

impl Drop for Glued {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal(libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The address after `prefix` in a log line.
pub fn addr_after(line: &str, prefix: &str) -> SocketAddr {
    let rest = &line[line.find(prefix).expect("prefix") + prefix.len()..];
    rest.split_whitespace()
        .next()
        .unwrap()
        .parse()
        .expect("address")
}

/// A query for `name`/`rtype`, RD set.
pub fn query_bytes(name: &str, rtype: RecordType) -> Vec<u8> {
    let mut m = Message::new(fastrand::u16(..), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    m.to_vec().unwrap()
}

/// Asks `server` over UDP from `from` (any port); None without an answer
/// within [`ANSWER_WAIT`].
pub fn udp_ask_from(
    from: IpAddr,
    server: SocketAddr,
    name: &str,
    rtype: RecordType,
) -> Option<Message> {
    let sock = UdpSocket::bind(SocketAddr::new(from, 0)).ok()?;
    sock.set_read_timeout(Some(ANSWER_WAIT)).unwrap();
    let q = query_bytes(name, rtype);
    sock.send_to(&q, server).ok()?;
    let mut buf = vec![0; 65535];
    let (n, peer) = sock.recv_from(&mut buf).ok()?;
    assert_eq!(peer, server, "answer from another address");
    let m = Message::from_vec(&buf[..n]).ok()?;
    (buf[..2] == q[..2]).then_some(m)
}

/// [`udp_ask_from`] from loopback.
pub fn udp_ask(server: SocketAddr, name: &str, rtype: RecordType) -> Option<Message> {
    udp_ask_from("127.0.0.1".parse().unwrap(), server, name, rtype)
}

/// Asks `server` over TCP; Err(kind) when it cannot connect, Ok(None)
/// when it connected but got no answer.
pub fn tcp_ask(
    server: SocketAddr,
    name: &str,
    rtype: RecordType,
) -> std::io::Result<Option<Message>> {
    let mut s = TcpStream::connect_timeout(&server, ANSWER_WAIT)?;
    s.set_read_timeout(Some(ANSWER_WAIT))?;
    let q = query_bytes(name, rtype);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    s.write_all(&framed)?;
    let mut len = [0; 2];
    if s.read_exact(&mut len).is_err() {
        return Ok(None);
    }
    let mut buf = vec![0; u16::from_be_bytes(len) as usize];
    if s.read_exact(&mut buf).is_err() {
        return Ok(None);
    }
    Ok(Message::from_vec(&buf).ok())
}

/// The A/AAAA addresses of an answer.
pub fn addresses(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

pub fn rcode(m: &Message) -> ResponseCode {
    m.metadata.response_code
}

/// What `glued check` run in `dir` (so it reads the same `glued.toml`)
/// prints on stderr: its one error line.
pub fn check_error(dir: &Path) -> String {
    let out = Command::new(GLUED)
        .arg("check")
        .env_clear()
        .current_dir(dir)
        .output()
        .expect("spawn glued check");
    assert_eq!(out.status.code(), Some(2), "glued check accepted it");
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}
