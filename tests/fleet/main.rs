//! Fleet: real `glued run` processes, each in a network namespace this test
//! creates, at 12 nodes. mDNS is off and every node is given only the seed
//! (node 0) as bootstrap peer; each node serves one static record of its
//! own, so no Docker engine is needed. Convergence is judged on every node's
//! `/records`: it must hold every live origin with exactly that origin's
//! current records.
//!
//! The wiring: a "switch" namespace holds two Linux bridges joined by a
//! trunk veth; the first half of the nodes hang off one bridge, the second
//! half off the other, by one veth each (`eth0`, one IPv4 address). Cutting
//! the trunk (`ip link set down` on both of its ends) is a real cut into two
//! halves that still reach each other inside: no packet crosses, nothing is
//! filtered by port. Nothing is configured in the host's own namespace (its
//! firewall and `br_netfilter` do not see this traffic). The test talks to
//! each node's HTTP status on the node's loopback from a thread that entered
//! the node's namespace (`setns`).
//!
//! A test binary of its own: cargo runs test binaries one at a time, so
//! the fleet's timing bounds are not shared with 150 other tests. Tests run one
//! at a time (a lock) so that their timing bounds are not
//! eaten by each other on a 2-core machine. Needs root and `ip` (iproute2);
//! without them the tests print why and pass, or fail with `CI=true`.
//!
//! `GLUED_FLEET_QUIET_SECS` sets how long the cluster stays quiet before a
//! node restarts (600 goes beyond every cache); `GLUED_FLEET_BIN` runs
//! another glued binary (a release build) in the nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[path = "../it/support.rs"]
mod support;

/// Nodes of every fleet test (half on each side of the trunk).
const NODES: usize = 12;
/// `lease_secs` of every node: short, so a partition outlives it quickly.
const LEASE_SECS: u64 = 6;
/// Every node holds every origin this long after the last node started.
const FORM_WITHIN: Duration = Duration::from_secs(10);
/// After the trunk is back, every node holds every origin within this.
const HEAL_WITHIN: Duration = Duration::from_secs(30);
/// A cut lasts this long: longer than the lease, so each half drops the
/// other half's origins (checked) before the halves meet again.
const PARTITION: Duration = Duration::from_secs(2 * LEASE_SECS + 2);
/// Each half has dropped the other's origins this long after the cut.
const DROPPED_WITHIN: Duration = Duration::from_secs(LEASE_SECS + 10);
/// A restarted node and every other node agree on its new records within
/// this (and it holds every origin).
const RESTART_WITHIN: Duration = Duration::from_secs(15);
/// Default quiet before the restart: longer than iroh's idle time of a
/// peer's state (`ACTOR_MAX_IDLE_TIMEOUT`, 60 s in iroh 1.4, a constant
/// Glued cannot shorten), after which iroh forgets every address of a peer
/// it has no connection with. iroh-gossip's own address cache keeps peers
/// for 5 minutes: `GLUED_FLEET_QUIET_SECS=600` waits that out too (so does
/// bench/fleet.sh at 32 nodes, `QUIET=600`), too long for CI.
const QUIET_DEFAULT: Duration = Duration::from_secs(65);
/// Environment variable overriding [`QUIET_DEFAULT`], in seconds.
const QUIET_ENV: &str = "GLUED_FLEET_QUIET_SECS";
/// How often convergence is polled.
const POLL: Duration = Duration::from_millis(200);
/// A node's `/records` must answer within this.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);
/// A node started by the harness answers HTTP within this.
const UP_WITHIN: Duration = Duration::from_secs(20);
/// HTTP status port on each node's loopback.
const HTTP_PORT: u16 = 9253;
/// Gossip port on each node's address.
const GOSSIP_PORT: u16 = 9254;
/// Prefix of every namespace name (then the test process id).
const PREFIX: &str = "gfleet";
/// Lines of a lagging node's log quoted in a failure report.
const LOG_TAIL: usize = 6;

/// Environment variable naming another glued binary for the nodes.
const BIN_ENV: &str = "GLUED_FLEET_BIN";
/// One fleet test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// One `glued run` in its own namespace.
struct Node {
    name: String,
    ns: String,
    ip: Ipv4Addr,
    dir: PathBuf,
    id: String,
    /// The static records it is configured with now: (name, address).
    records: BTreeSet<(String, String)>,
    child: Option<Child>,
}

/// The namespaces, bridges and processes of one test; all removed on drop,
/// also when the test panics.
struct Fleet {
    switch: String,
    nodes: Vec<Node>,
    key: String,
    /// False while the trunk is cut.
    joined: bool,
}

/// What one node's `/records` holds: origin id → its (name, address) pairs.
type View = BTreeMap<String, BTreeSet<(String, String)>>;

/// The glued binary the nodes run: this build's, or `GLUED_FLEET_BIN`
/// (e.g. a release build, to tell slowness of the debug build apart).
fn binary() -> String {
    std::env::var(BIN_ENV).unwrap_or_else(|_| env!("CARGO_BIN_EXE_glued").to_string())
}

/// Runs `ip args…`; the error names the command and what it printed.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Removes namespaces of earlier runs of this harness whose process is gone
/// (a test process killed before its drop ran).
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(PREFIX).and_then(|r| r.strip_prefix('-')) else {
            continue;
        };
        let Some(pid) = rest.split('-').next() else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// Why this machine cannot run the fleet, if it cannot.
fn missing() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (network namespaces need it)".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("`ip` (iproute2) is not installed".into());
    }
    None
}

/// 32 random bytes as base64: a cluster key in the form `glued keygen`
/// prints (any string was accepted before keys existed).
fn random_key() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Runs `f` in a thread that entered namespace `ns`: sockets it makes
/// belong to that namespace and keep working from any thread.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, String> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        // SAFETY: setns on a valid namespace fd; it changes only this
        // thread's network namespace, and the thread ends right after.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
        }
        f().map_err(|e| format!("in {path}: {e}"))
    })
    .join()
    .map_err(|_| "setns thread panicked".to_string())?
}

/// A TCP connection made from inside namespace `ns`.
fn connect_in(ns: &str, addr: SocketAddr) -> Result<TcpStream, String> {
    in_netns(ns, move || TcpStream::connect_timeout(&addr, HTTP_TIMEOUT))
}

/// The body of `GET path` from a node's HTTP status.
fn http_get(ns: &str, path: &str) -> Result<String, String> {
    let mut s = connect_in(ns, SocketAddr::from(([127, 0, 0, 1], HTTP_PORT)))?;
    s.set_read_timeout(Some(HTTP_TIMEOUT)).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.contains(" 200 ") => Ok(body.to_string()),
        _ => Err(format!("bad answer: {text:.200}")),
    }
}

/// Parses `/records` into a [`View`].
fn parse_view(body: &str) -> Result<View, String> {
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let mut view = View::new();
    for r in v.as_array().ok_or("not an array")? {
        let origin = r["origin"].as_str().ok_or("no origin")?;
        let set = view.entry(origin.to_string()).or_default();
        for name in r["names"].as_array().ok_or("no names")? {
            for a in r["addresses"].as_array().ok_or("no addresses")? {
                set.insert((
                    name.as_str().unwrap_or("").to_string(),
                    a.as_str().unwrap_or("").to_string(),
                ));
            }
        }
    }
    Ok(view)
}

impl Fleet {
    /// Creates the switch and `n` node namespaces (nothing runs yet).
    fn new(n: usize) -> Result<Fleet, String> {
        static K: AtomicUsize = AtomicUsize::new(0);
        sweep_stale();
        let tag = format!(
            "{PREFIX}-{}-{}",
            std::process::id(),
            K.fetch_add(1, Ordering::Relaxed)
        );
        let mut fleet = Fleet {
            switch: format!("{tag}-sw"),
            nodes: Vec::new(),
            key: random_key(),
            joined: true,
        };
        let sw = fleet.switch.clone();
        ip(&["netns", "add", &sw])?;
        for args in [
            "link set lo up",
            "link add ba type bridge",
            "link add bb type bridge",
            "link add ta type veth peer name tb",
            "link set ta master ba",
            "link set tb master bb",
            "link set ba up",
            "link set bb up",
            "link set ta up",
            "link set tb up",
        ] {
            let mut a = vec!["-n", &sw];
            a.extend(args.split(' '));
            ip(&a)?;
        }
        for i in 0..n {
            let ns = format!("{tag}-n{i}");
            let node_ip = Ipv4Addr::new(10, 77, 0, 1 + i as u8);
            // Registered before anything can fail, so drop removes it.
            fleet.nodes.push(Node {
                name: format!("n{i}"),
                ns: ns.clone(),
                ip: node_ip,
                dir: support::data_dir(),
                id: String::new(),
                records: [(
                    format!("n{i}"),
                    format!("10.99.{}.{}", i / 250, 1 + i % 250),
                )]
                .into(),
                child: None,
            });
            ip(&["netns", "add", &ns])?;
            let port = format!("p{i}");
            ip(&[
                "link", "add", &port, "netns", &sw, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ])?;
            let bridge = if i < n / 2 { "ba" } else { "bb" };
            ip(&["-n", &sw, "link", "set", &port, "master", bridge, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{node_ip}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            let node = fleet.nodes.last_mut().unwrap();
            node.id = glued::gossip::local_id(&node.dir).map_err(|e| e.to_string())?;
        }
        Ok(fleet)
    }

    /// `ID@ip:port` of the seed (node 0).
    fn seed(&self) -> String {
        let s = &self.nodes[0];
        format!("{}@{}:{GOSSIP_PORT}", s.id, s.ip)
    }

    /// Starts node `i` with its current records (appending to its log).
    fn start(&mut self, i: usize) {
        let seed = self.seed();
        let key = self.key.clone();
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "{} already runs", node.name);
        let config = node.dir.join("glued.toml");
        let mut toml = String::new();
        for (name, addr) in &node.records {
            toml.push_str(&format!(
                "[[records]]\nname = \"{name}\"\nip = \"{addr}\"\n"
            ));
        }
        std::fs::write(&config, toml).unwrap();
        let log_path = node.dir.join("glued.log");
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        writeln!(
            log,
            "==== harness: start {} records {:?}",
            node.name, node.records
        )
        .unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.ns])
            .arg(binary())
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("GLUED_DNS_BIND", format!("{}:53", node.ip))
            .env("GLUED_DNS_THREADS", "1")
            .env("GLUED_HTTP_BIND", format!("127.0.0.1:{HTTP_PORT}"))
            .env("GLUED_GOSSIP_BIND", format!("{}:{GOSSIP_PORT}", node.ip))
            .env("GLUED_NODE_NAME", &node.name)
            .env("GLUED_UPSTREAMS", "none")
            .env("GLUED_NETWORK_NAME", support::unique("glued-absent-net"))
            .env("GLUED_DOCKER_HOST", "unix:///nonexistent/docker.sock")
            .env("GLUED_DATA_DIR", &node.dir)
            .env("GLUED_MDNS", "false")
            .env("GLUED_LEASE_SECS", LEASE_SECS.to_string())
            .env("GLUED_CLUSTER_SECRET", key)
            .env("RUST_LOG", "info,iroh=warn,iroh_gossip=warn")
            .stdout(Stdio::null())
            .stderr(log);
        if i != 0 {
            cmd.env("GLUED_BOOTSTRAP_PEERS", seed);
        }
        // SAFETY: prctl is async-signal-safe. `ip netns exec` execs glued
        // in this process, so glued dies with the test thread that
        // started it even when the test process is killed.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        node.child = Some(cmd.spawn().expect("spawning ip netns exec glued"));
    }

    /// Waits until node `i` answers HTTP.
    fn wait_up(&self, i: usize) {
        let end = Instant::now() + UP_WITHIN;
        while http_get(&self.nodes[i].ns, "/records").is_err() {
            assert!(
                Instant::now() < end,
                "{} does not answer HTTP after {UP_WITHIN:?}:\n{}",
                self.nodes[i].name,
                self.log_tail(i, 30)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops node `i` with SIGTERM (a graceful stop) and reaps it.
    fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            // SAFETY: kill on the pid of our own child, not yet reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let end = Instant::now() + Duration::from_secs(5);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the seed, waits until it answers, then every other node back
    /// to back. Returns the instant the last one was started.
    fn start_all(&mut self) -> Instant {
        self.start(0);
        self.wait_up(0);
        for i in 1..self.nodes.len() {
            self.start(i);
        }
        Instant::now()
    }

    /// Cuts (`false`) or restores (`true`) the trunk between the halves.
    fn set_trunk(&mut self, up: bool) {
        let state = if up { "up" } else { "down" };
        for end in ["ta", "tb"] {
            ip(&["-n", &self.switch, "link", "set", end, state]).unwrap();
        }
        self.joined = up;
    }

    fn running(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].child.is_some())
    }

    fn side(&self, i: usize) -> usize {
        usize::from(i >= self.nodes.len() / 2)
    }

    /// The running nodes that node `i` can reach now.
    fn reachable(&self, i: usize) -> Vec<usize> {
        self.running()
            .filter(|&j| self.joined || self.side(j) == self.side(i))
            .collect()
    }

    /// What each running node holds now (an error string for a node that
    /// does not answer).
    fn views(&self) -> BTreeMap<usize, Result<View, String>> {
        self.running()
            .map(|i| {
                let v = http_get(&self.nodes[i].ns, "/records").and_then(|b| parse_view(&b));
                (i, v)
            })
            .collect()
    }

    /// What is wrong with node `i`'s view when it should hold exactly the
    /// records of the nodes in `expected`; empty when nothing is.
    fn faults(&self, view: &Result<View, String>, expected: &[usize]) -> Vec<String> {
        let view = match view {
            Ok(v) => v,
            Err(e) => return vec![format!("no /records ({e})")],
        };
        let mut out = Vec::new();
        for &j in expected {
            let n = &self.nodes[j];
            match view.get(&n.id) {
                None => out.push(format!("lacks {}", n.name)),
                Some(r) if *r != n.records => {
                    out.push(format!("stale {} {:?}", n.name, r));
                }
                Some(_) => {}
            }
        }
        for (id, _) in view.iter() {
            let known = expected.iter().any(|&j| self.nodes[j].id == *id);
            if !known {
                let name = self.nodes.iter().find(|n| n.id == *id);
                out.push(format!(
                    "holds {}",
                    name.map_or(&id[..8.min(id.len())], |n| n.name.as_str())
                ));
            }
        }
        out
    }

    /// Polls until every running node holds exactly the records of every
    /// node it can reach, or `within` has passed since `from`. Ok: when it
    /// converged (since `from`); Err: a report of what each lagging node
    /// lacks, with the end of its log.
    fn converge(&self, from: Instant, within: Duration) -> Result<Duration, String> {
        loop {
            let views = self.views();
            let mut bad = BTreeMap::new();
            for (i, v) in &views {
                let f = self.faults(v, &self.reachable(*i));
                if !f.is_empty() {
                    bad.insert(*i, f);
                }
            }
            if bad.is_empty() {
                return Ok(from.elapsed());
            }
            if from.elapsed() >= within {
                return Err(self.report(&bad, within));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Polls until, on each side of the cut, no node holds an origin of the
    /// other side (their leases ended), within `within`.
    fn dropped_across(&self, within: Duration) -> Result<Duration, String> {
        let from = Instant::now();
        loop {
            let views = self.views();
            let mut bad = BTreeMap::new();
            for (i, v) in &views {
                if let Ok(v) = v {
                    let across: Vec<String> = self
                        .running()
                        .filter(|&j| {
                            self.side(j) != self.side(*i) && v.contains_key(&self.nodes[j].id)
                        })
                        .map(|j| format!("still holds {}", self.nodes[j].name))
                        .collect();
                    if !across.is_empty() {
                        bad.insert(*i, across);
                    }
                }
            }
            if bad.is_empty() {
                return Ok(from.elapsed());
            }
            if from.elapsed() >= within {
                return Err(self.report(&bad, within));
            }
            std::thread::sleep(POLL);
        }
    }

    fn report(&self, bad: &BTreeMap<usize, Vec<String>>, within: Duration) -> String {
        let mut s = format!(
            "{} of {} nodes wrong after {within:?} (data dirs and logs kept):\n",
            bad.len(),
            self.running().count()
        );
        for (i, faults) in bad {
            let n = &self.nodes[*i];
            s.push_str(&format!(
                "  {} ({}): {}\n{}",
                n.name,
                n.dir.display(),
                faults.join(", "),
                self.log_tail(*i, LOG_TAIL)
            ));
        }
        s
    }

    /// The last `lines` warning/error lines of node `i`'s log, indented,
    /// with how many there were.
    fn log_tail(&self, i: usize, lines: usize) -> String {
        let log = std::fs::read_to_string(self.nodes[i].dir.join("glued.log")).unwrap_or_default();
        let warn: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("harness"))
            .collect();
        let mut s = format!("    ({} warning/error lines)\n", warn.len());
        for l in &warn[warn.len().saturating_sub(lines)..] {
            s.push_str(&format!("    {l:.300}\n"));
        }
        s
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let keep = std::thread::panicking();
        for n in &self.nodes {
            let _ = ip(&["netns", "del", &n.ns]);
            if !keep {
                let _ = std::fs::remove_dir_all(&n.dir);
            }
        }
        let _ = ip(&["netns", "del", &self.switch]);
    }
}

/// A fleet of `n` nodes and the lock that keeps fleet tests apart, or None
/// (the reason printed) where this machine cannot build one outside CI.
fn fleet(n: usize) -> Option<(std::sync::MutexGuard<'static, ()>, Fleet)> {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let made = match missing() {
        Some(why) => Err(why),
        None => Fleet::new(n),
    };
    match made {
        Ok(f) => Some((serial, f)),
        Err(why) if support::in_ci() => panic!("fleet test cannot run: {why}"),
        Err(why) => {
            eprintln!("skipping fleet test: {why}");
            None
        }
    }
}

/// Starts every node and waits until each holds every origin.
fn form(f: &mut Fleet) -> Duration {
    let last = f.start_all();
    let took = f
        .converge(last, FORM_WITHIN)
        .unwrap_or_else(|r| panic!("the fleet did not form:\n{r}"));
    eprintln!(
        "fleet: {} nodes formed {took:?} after the last start",
        f.nodes.len()
    );
    took
}

#[test]
fn fleet_every_node_holds_every_origin_within_10_s_of_the_last_start() {
    let Some((_serial, mut f)) = fleet(NODES) else {
        return;
    };
    form(&mut f);
}

#[test]
fn fleet_half_half_partition_longer_than_the_lease_heals_after_reconnection() {
    let Some((_serial, mut f)) = fleet(NODES) else {
        return;
    };
    form(&mut f);
    let cut = Instant::now();
    f.set_trunk(false);
    // The cut is real and outlives the lease: each half forgets the other.
    let dropped = f
        .dropped_across(DROPPED_WITHIN)
        .unwrap_or_else(|r| panic!("the halves did not drop each other's origins:\n{r}"));
    eprintln!("fleet: halves dropped each other {dropped:?} after the cut");
    // ...and still hold their own half in full.
    f.converge(Instant::now(), Duration::ZERO)
        .unwrap_or_else(|r| panic!("a half lost its own origins:\n{r}"));
    std::thread::sleep(PARTITION.saturating_sub(cut.elapsed()));
    let healed = Instant::now();
    f.set_trunk(true);
    let took = f
        .converge(healed, HEAL_WITHIN)
        .unwrap_or_else(|r| panic!("the partition did not heal:\n{r}"));
    eprintln!("fleet: healed {took:?} after the trunk came back");
}

#[test]
fn fleet_node_restarted_with_changed_records_after_the_address_caches_expired_converges() {
    let Some((_serial, mut f)) = fleet(NODES) else {
        return;
    };
    let quiet = std::env::var(QUIET_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(QUIET_DEFAULT, Duration::from_secs);
    form(&mut f);
    // A non-seed node on the seed's far side of the trunk.
    let x = NODES - 1;
    f.stop(x);
    let stopped = Instant::now();
    // Everyone drops it (its lease ends): nothing stale can pass for new.
    f.converge(stopped, DROPPED_WITHIN)
        .unwrap_or_else(|r| panic!("the stopped node's origin stayed:\n{r}"));
    std::thread::sleep(quiet.saturating_sub(stopped.elapsed()));
    let name = f.nodes[x].name.clone();
    f.nodes[x].records = [
        (name.clone(), "10.98.0.1".to_string()),
        (format!("{name}-new"), "10.98.0.2".to_string()),
    ]
    .into();
    f.start(x);
    let restarted = Instant::now();
    let took = f
        .converge(restarted, RESTART_WITHIN)
        .unwrap_or_else(|r| panic!("the restarted node did not converge:\n{r}"));
    eprintln!("fleet: {name} restarted after {quiet:?} of quiet converged in {took:?}");
}

/// Whether a datagram from node `from` reaches node `to` (port 9999).
fn udp_reaches(f: &Fleet, from: usize, to: usize) -> bool {
    let dst = SocketAddr::from((f.nodes[to].ip, 9999));
    let rx = in_netns(&f.nodes[to].ns, move || UdpSocket::bind(dst)).unwrap();
    let tx = in_netns(&f.nodes[from].ns, || UdpSocket::bind("0.0.0.0:0")).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    tx.send_to(b"ping", dst).unwrap();
    let mut buf = [0u8; 8];
    matches!(rx.recv_from(&mut buf), Ok((4, _)))
}

#[test]
fn fleet_trunk_cut_separates_the_halves_and_nothing_else() {
    let Some((_serial, mut f)) = fleet(4) else {
        return;
    };
    // Nodes 0, 1 on one side, 2, 3 on the other.
    assert!(udp_reaches(&f, 0, 1) && udp_reaches(&f, 0, 2) && udp_reaches(&f, 3, 1));
    f.set_trunk(false);
    assert!(udp_reaches(&f, 0, 1), "a half is cut inside");
    assert!(udp_reaches(&f, 2, 3), "a half is cut inside");
    assert!(!udp_reaches(&f, 0, 2), "a datagram crossed the cut");
    assert!(!udp_reaches(&f, 3, 1), "a datagram crossed the cut");
    f.set_trunk(true);
    assert!(
        udp_reaches(&f, 0, 2) && udp_reaches(&f, 3, 1),
        "the trunk did not come back"
    );
}

#[test]
fn random_key_is_44_characters_of_base64() {
    let k = random_key();
    assert_eq!(k.len(), 44, "{k}");
    assert!(k.ends_with('=') && !k.ends_with("=="), "{k}");
    assert!(
        k[..43]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/'),
        "{k}"
    );
}
