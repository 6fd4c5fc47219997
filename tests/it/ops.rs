//! Operating Glued: `/healthz` and `glued health`, a panicking component,
//! `glued peers|records` on a two-node cluster, `promtool check metrics`
//! and the Grafana dashboard against a live `/metrics`. Every test runs the
//! built binary (`glued run` processes on loopback).

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support;

/// How long a process may take to start, or a cluster to converge.
const CONVERGE: Duration = Duration::from_secs(15);

/// One `glued run` process on loopback, killed on drop.
struct Glued {
    child: Child,
    log: PathBuf,
    dir: PathBuf,
    gossip: SocketAddr,
}

impl Drop for Glued {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Glued {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address after `prefix` in the log, once it is there.
    fn logged_addr(&self, prefix: &str) -> SocketAddr {
        let mut found = None;
        wait_until(CONVERGE, || {
            found = self.log().lines().find_map(|l| {
                let rest = &l[l.find(prefix)? + prefix.len()..];
                rest.split_whitespace().next()?.parse().ok()
            });
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("no {prefix:?} in the log:\n{}", self.log()))
    }

    fn http(&self) -> SocketAddr {
        self.logged_addr("HTTP status on ")
    }

    fn dns(&self) -> SocketAddr {
        self.logged_addr("DNS listening on udp ")
    }

    fn id(&self) -> String {
        wait_until(CONVERGE, || self.dir.join("node.key").exists());
        glued::gossip::local_id(&self.dir).unwrap()
    }
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts of a daemon whose gossip port was taken meanwhile.
const GOSSIP_BIND_TRIES: usize = 5;

/// A free loopback port for UDP (gossip binds it).
fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `glued run` named `name` with one static record `record`, more
/// environment in `extra`.
fn spawn(name: &str, record: &str, extra: &[(&str, String)]) -> Glued {
    let dir = support::data_dir();
    let config = dir.join("glued.toml");
    std::fs::write(
        &config,
        format!("[[records]]\nname = \"{record}\"\nip = \"10.9.9.9\"\n"),
    )
    .unwrap();
    let log = dir.join("glued.log");
    // The free port can be taken by a parallel test before the daemon binds
    // it: start again on another one.
    for _ in 0..GOSSIP_BIND_TRIES {
        let gossip: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut g = spawn_at(name, &dir, &config, &log, gossip, extra);
        let lost_port =
            || std::fs::read_to_string(&log).is_ok_and(|l| l.contains("binding gossip on"));
        // Until the endpoint is up, or the daemon stopped.
        wait_until(CONVERGE, || {
            g.log().contains("Gossip endpoint created")
                || g.child.try_wait().is_ok_and(|exit| exit.is_some())
        });
        if !lost_port() {
            return g;
        }
    }
    panic!("{name}: no free gossip port in {GOSSIP_BIND_TRIES} tries");
}

/// Starts `glued run` once, its gossip endpoint bound to `gossip`.
fn spawn_at(
    name: &str,
    dir: &Path,
    config: &Path,
    log: &Path,
    gossip: SocketAddr,
    extra: &[(&str, String)],
) -> Glued {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_glued"));
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .env_clear()
        .env("GLUED_DNS_BIND", "127.0.0.1:0")
        .env("GLUED_DNS_THREADS", "1")
        .env("GLUED_HTTP_BIND", "127.0.0.1:0")
        .env("GLUED_NODE_NAME", name)
        .env("GLUED_UPSTREAMS", "none")
        .env("GLUED_NETWORK_NAME", support::unique("glued-absent-net"))
        .env("GLUED_DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .env("GLUED_DATA_DIR", dir)
        .env("GLUED_GOSSIP_BIND", gossip.to_string())
        .env("GLUED_MDNS", "false")
        .env("GLUED_CLUSTER_SECRET", support::key_b64("ops-test-secret"))
        .env("RUST_LOG", "info,iroh=warn,iroh_gossip=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    Glued {
        child: cmd.spawn().unwrap(),
        log: log.to_owned(),
        dir: dir.to_owned(),
        gossip,
    }
}

/// Runs `glued args…` as a client of the daemon whose status is at `http`
/// (with an empty config file, so no host file is read).
fn client(args: &[&str], http: SocketAddr) -> Output {
    let dir = support::data_dir();
    let config = dir.join("empty.toml");
    std::fs::write(&config, "").unwrap();
    Command::new(env!("CARGO_BIN_EXE_glued"))
        .args(args)
        .arg("--config")
        .arg(&config)
        .env_clear()
        .env("GLUED_HTTP_BIND", http.to_string())
        .env("GLUED_DATA_DIR", &dir)
        .current_dir(&dir)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// True when `program` runs; otherwise prints why and skips, or panics in CI.
fn have(program: &str, install: &str) -> bool {
    let ok = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        assert!(
            !support::in_ci(),
            "{program} is missing in CI (.ci/install-test-deps installs {install})"
        );
        eprintln!("skipped: {program} not installed (Debian package {install})");
    }
    ok
}

// ------------------------------------------------------------------ health

/// `socat` relaying a unix socket to the real Docker engine, in its own
/// process group so that stopping it also ends the relayed connections.
struct EngineProxy {
    child: Child,
}

impl EngineProxy {
    fn start(path: &Path) -> EngineProxy {
        use std::os::unix::process::CommandExt;
        let child = Command::new("socat")
            .arg(format!("UNIX-LISTEN:{},fork,unlink-early", path.display()))
            .arg("UNIX-CONNECT:/var/run/docker.sock")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || path.exists()),
            "socat did not listen on {}",
            path.display()
        );
        EngineProxy { child }
    }

    /// Ends socat and every connection it relays (its process group).
    fn stop(mut self) {
        // SAFETY: signals only the process group this test created.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for EngineProxy {
    fn drop(&mut self) {
        // SAFETY: as in `stop`; harmless when already gone.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

fn docker_engine_missing() -> Option<String> {
    let ok = Command::new("docker")
        .args(["info", "-f", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        return Some("no Docker engine".into());
    }
    if !Path::new("/var/run/docker.sock").exists() {
        return Some("no /var/run/docker.sock".into());
    }
    None
}

#[test]
fn healthz_and_glued_health_follow_the_docker_engine_going_and_coming_back() {
    if let Some(why) = docker_engine_missing() {
        assert!(!support::in_ci(), "Docker test cannot run in CI: {why}");
        eprintln!("skipped: {why}");
        return;
    }
    if !have("socat", "socat") {
        return;
    }
    let dir = support::data_dir();
    let socket = dir.join("engine.sock");
    let proxy = EngineProxy::start(&socket);
    let window_secs = 2;
    let g = spawn(
        "health-a",
        "svc",
        &[
            ("GLUED_DOCKER_HOST", format!("unix://{}", socket.display())),
            ("GLUED_DOCKER_HEALTH_SECS", window_secs.to_string()),
        ],
    );
    let http = g.http();
    let healthz = || glued::http::get(http, "/healthz").unwrap();
    assert!(
        wait_until(CONVERGE, || healthz().0 == 200),
        "never healthy: {:?}\n{}",
        healthz(),
        g.log()
    );
    assert_eq!(healthz().1, "ok\n");
    let ok = client(&["health"], http);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stderr));
    assert_eq!(text(&ok.stdout), "ok\n");

    // The engine becomes unreachable: unhealthy once the window has passed.
    proxy.stop();
    let lost = Instant::now();
    assert!(
        wait_until(CONVERGE, || healthz().0 == 503),
        "still healthy without the engine\n{}",
        g.log()
    );
    let (_, body) = healthz();
    let silent: f64 = body
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix("Docker engine at unix://")?;
            let secs = rest.split("has not answered for ").nth(1)?;
            secs.split(' ').next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no Docker reason in {body:?}"));
    // Shown to a tenth of a second: 2.04 s reads "2.0".
    assert!(silent >= window_secs as f64, "{body}");
    assert!(
        silent <= lost.elapsed().as_secs_f64() + window_secs as f64,
        "{body}"
    );
    let bad = client(&["health"], http);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stderr).starts_with("unhealthy: Docker engine at unix://"),
        "{}",
        text(&bad.stderr)
    );

    // Back: healthy again after the reconnection (capped backoff).
    let _proxy = EngineProxy::start(&socket);
    assert!(
        wait_until(CONVERGE, || healthz().0 == 200),
        "not healthy after the engine came back: {:?}\n{}",
        healthz(),
        g.log()
    );
    assert_eq!(client(&["health"], http).status.code(), Some(0));
}

#[test]
fn a_panicking_component_thread_takes_the_process_down_after_logging_it() {
    if !cfg!(debug_assertions) {
        eprintln!("skipped: the panic trigger exists in debug builds only");
        return;
    }
    let mut g = spawn(
        "panics",
        "svc",
        &[(glued::health::DEBUG_PANIC_ENV, "registry".to_string())],
    );
    let mut status = None;
    assert!(
        wait_until(CONVERGE, || {
            status = g.child.try_wait().unwrap();
            status.is_some()
        }),
        "the process survived its registry thread's panic\n{}",
        g.log()
    );
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.unwrap().signal(), Some(libc::SIGABRT), "{}", g.log());
    let log = g.log();
    let line = log
        .lines()
        .find(|l| l.contains("thread registry panicked"))
        .unwrap_or_else(|| panic!("no panic line naming the thread:\n{log}"));
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains(glued::health::DEBUG_PANIC_ENV), "{line}");
}

#[test]
fn glued_health_says_in_one_line_that_no_daemon_runs() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // The listener is closed here: nothing answers on that port.
    for args in [&["health"][..], &["peers"], &["records", "--json"]] {
        let out = client(args, port);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = text(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with(&format!("error: no glued daemon answers at {port}")),
            "{err}"
        );
        assert!(out.stdout.is_empty());
    }
}

// --------------------------------------------------------- a real cluster

/// Two processes, `a` bootstrapped to `b`; returns once `a` holds b's
/// record and lists `b` as a peer.
fn two_nodes(a_extra: &[(&str, String)]) -> (Glued, Glued) {
    let b = spawn("node-b", "from-b", &[]);
    let b_id = b.id();
    let mut extra = a_extra.to_vec();
    extra.push(("GLUED_BOOTSTRAP_PEERS", format!("{b_id}@{}", b.gossip)));
    let a = spawn("node-a", "from-a", &extra);
    let http = a.http();
    let has_b = || {
        glued::http::get(http, "/peers").is_ok_and(|(_, body)| {
            serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|v| {
                v.as_array().is_some_and(|peers| {
                    peers
                        .iter()
                        .any(|p| p["id"] == b_id.as_str() && p["records"].as_u64() >= Some(1))
                })
            })
        })
    };
    assert!(
        wait_until(CONVERGE, has_b),
        "A never listed B with its record\nA:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );
    (a, b)
}

#[test]
fn glued_peers_and_records_show_a_two_node_cluster_as_tables_and_json() {
    let (a, b) = two_nodes(&[]);
    let http = a.http();
    let b_id = b.id();

    let out = client(&["peers", "--json"], http);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let peers: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let peer = peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == b_id.as_str())
        .unwrap();
    assert_eq!(peer["node_name"], "node-b");
    assert_eq!(peer["addr"], b.gossip.to_string());

    let out = client(&["peers"], http);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("ID  "), "{table}");
    for column in [
        "NODE",
        "ADDRESS",
        "LAST HEARD",
        "RECORDS",
        "KEY ID",
        "VERSION",
    ] {
        assert!(lines[0].contains(column), "{table}");
    }
    let row = lines
        .iter()
        .find(|l| l.starts_with(&b_id[..12]))
        .unwrap_or_else(|| panic!("no row for B:\n{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1], "node-b", "{row}");
    assert_eq!(cells[2], b.gossip.to_string(), "{row}");
    // Aligned: every column starts at the same offset as its header.
    let node_col = lines[0].find("NODE").unwrap();
    assert_eq!(row.find("node-b"), Some(node_col), "{table}");
    // Key id and protocol version come from the admission.
    let key_col = lines[0].find("KEY ID").unwrap();
    let version_col = lines[0].find("VERSION").unwrap();
    let key_id = peer["key_id"].as_str().unwrap();
    assert_eq!(row.find(key_id), Some(key_col), "{table}");
    assert_eq!(
        row[version_col..].trim(),
        peer["protocol_version"].to_string(),
        "{table}"
    );

    let out = client(&["records", "--json"], http);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let records: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = records
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["names"].as_array().unwrap())
        .filter_map(|n| n.as_str())
        .collect();
    assert!(
        names.contains(&"from-a") && names.contains(&"from-b"),
        "{records}"
    );

    let out = client(&["records"], http);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let header = table.lines().next().unwrap();
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        ["NAME", "ADDRESSES", "ORIGIN", "SOURCE", "NOTES"]
    );
    let row_b = table
        .lines()
        .find(|l| l.starts_with("from-b "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row_b.contains("10.9.9.9"), "{row_b}");
    assert!(
        row_b.contains(&format!("node-b ({})", &b_id[..12])),
        "{row_b}"
    );
    assert_eq!(
        row_b.split_whitespace().rev().take(2).collect::<Vec<_>>(),
        ["-", "static"],
        "{row_b}"
    );
    assert_eq!(row_b.find("10.9.9.9"), header.find("ADDRESSES"), "{table}");

    // A reader that went away (`glued records | head -0`) is not an error.
    let mut fds = [0; 2];
    // SAFETY: a two-element array for pipe(2).
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors were just created and are owned here.
    let (reader, writer) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    drop(reader);
    let empty = support::data_dir().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_glued"))
        .args(["records", "--config"])
        .arg(&empty)
        .env_clear()
        .env("GLUED_HTTP_BIND", http.to_string())
        .stdout(Stdio::from(writer))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));

    // Peer log lines name the node and its address.
    let line = format!(
        "gossip: first message from peer {b_id} (node-b) at {}",
        b.gossip
    );
    assert!(a.log().contains(&line), "no {line:?} in:\n{}", a.log());
    let a_id = a.id();
    let line = format!("gossip: first message from peer {a_id} (node-a) at 127.0.0.1:");
    assert!(
        wait_until(CONVERGE, || b.log().contains(&line)),
        "no {line:?} in:\n{}",
        b.log()
    );
}

// ---------------------------------------------------------------- metrics

/// A stand-in upstream resolver on loopback: answers every query with
/// NOERROR and no records (QR and RA set, the question echoed).
fn upstream() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if n < 12 {
                continue;
            }
            buf[2] |= 0x80; // QR
            buf[3] = 0x80; // RA, NOERROR
            let _ = sock.send_to(&buf[..n], from);
        }
    });
    addr
}

/// Sends one A query for `name` to `server`; true when answered.
fn query(server: SocketAddr, name: &str) -> bool {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    sock.send_to(&q, server).unwrap();
    let mut buf = [0u8; 512];
    sock.recv(&mut buf)
        .is_ok_and(|n| n >= 12 && buf[2] & 0x80 != 0)
}

/// A live `/metrics` of a daemon that has forwarded, answered, and has a
/// peer (A of a two-node cluster with one upstream).
fn live_metrics() -> String {
    let (a, _b) = two_nodes(&[("GLUED_UPSTREAMS", upstream().to_string())]);
    let dns = a.dns();
    assert!(query(dns, "from-b.glued.internal"), "no local answer");
    assert!(query(dns, "forwarded.example"), "no forwarded answer");
    // Counters are bumped after the answer leaves: read until they show it.
    let done = |m: &str| {
        [
            "glued_dns_forwarded_total",
            "glued_forward_answered_total",
            "glued_dns_local_answers_total",
            "glued_gossip_origins",
        ]
        .iter()
        .all(|name| sample(m, name) >= 1.0)
    };
    let mut metrics = String::new();
    let counted = wait_until(CONVERGE, || {
        let (status, text) = glued::http::get(a.http(), "/metrics").unwrap();
        assert_eq!(status, 200);
        metrics = text;
        done(&metrics)
    });
    assert!(counted, "not every counter moved:\n{metrics}");
    metrics
}

/// The value of the first sample line of `name` (with any labels).
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name}"))
}

#[test]
fn promtool_accepts_the_live_metrics_and_the_dashboard_uses_only_them() {
    let metrics = live_metrics();
    assert_eq!(sample(&metrics, "glued_build_info"), 1.0);
    assert!(metrics.contains(&format!(
        "glued_build_info{{version=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    )));
    assert!(sample(&metrics, "process_start_time_seconds") > 1.6e9);

    // The dashboard: valid JSON whose every query names metrics that exist.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/grafana/glued.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 6, "{exprs:?}");
    let mut used = std::collections::BTreeSet::new();
    for expr in &exprs {
        used.extend(metric_names(expr));
    }
    for name in &used {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(name.as_str()) && l[name.len()..].starts_with([' ', '{'])),
            "the dashboard uses {name}, which /metrics does not have"
        );
    }
    for concept in [
        "glued_dns_responses_total",
        "glued_forward_latency_seconds_bucket",
        "glued_upstream_up",
        "glued_records",
        "glued_name_conflicts",
        "glued_gossip_origins",
        "glued_gossip_dropped_total",
    ] {
        assert!(used.contains(concept), "no panel uses {concept}");
    }

    if !have("promtool", "prometheus") {
        return;
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n---\n{metrics}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Every `"expr"` string of a Grafana dashboard.
fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match v {
                    serde_json::Value::String(s) if k == "expr" => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| collect_exprs(i, out)),
        _ => {}
    }
}

/// Metric names (`glued_…`, `process_…`) in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
        if word(bytes[i]) && (i == 0 || !word(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && word(bytes[i]) {
                i += 1;
            }
            let w = &expr[start..i];
            // Inside a label matcher ({upstream="…"}) words are values.
            let in_quotes = expr[..start].matches('"').count() % 2 == 1;
            if !in_quotes && (w.starts_with("glued_") || w.starts_with("process_")) {
                names.push(w.to_string());
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn metric_names_are_read_from_promql() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.99, sum by (le) (rate(glued_forward_latency_seconds_bucket[5m]))) \
             / on() glued_build_info{version=\"glued_x\"}"
        ),
        ["glued_forward_latency_seconds_bucket", "glued_build_info"]
    );
}

// --------------------------------------------------------------- packaging

#[test]
fn the_deb_holds_the_binary_a_hardened_unit_the_resolved_drop_in_and_the_config() {
    if !have("dpkg-deb", "dpkg") {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = support::data_dir();
    // The debug binary the tests already built: no release build in CI.
    let built = Command::new(repo.join("dist/deb/build.sh"))
        .arg(env!("CARGO_BIN_EXE_glued"))
        .arg(&out)
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", text(&built.stderr));
    let deb = PathBuf::from(text(&built.stdout).trim());
    assert!(deb.starts_with(&out) && deb.exists(), "{deb:?}");

    let dpkg = |args: &[&str]| {
        let o = Command::new("dpkg-deb")
            .args(args)
            .arg(&deb)
            .output()
            .unwrap();
        assert!(o.status.success(), "dpkg-deb {args:?}: {}", text(&o.stderr));
        text(&o.stdout)
    };
    let listing = dpkg(&["-c"]);
    for path in [
        "./usr/bin/glued",
        "./lib/systemd/system/glued.service",
        "./usr/lib/systemd/resolved.conf.d/glued.conf",
        "./etc/glued/glued.toml",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(&format!(" {path}"))),
            "{path} missing:\n{listing}"
        );
    }
    assert_eq!(dpkg(&["-f"]).lines().next(), Some("Package: glued"));
    assert!(dpkg(&["-f"]).contains(&format!("Version: {}\n", env!("CARGO_PKG_VERSION"))));

    let root = out.join("root");
    dpkg_extract(&deb, &root);
    let control = out.join("control");
    let o = Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(&control)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(control.join("conffiles")).unwrap(),
        "/etc/glued/glued.toml\n"
    );
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains("adduser --system --group"), "{postinst}");
    assert!(postinst.contains("adduser glued docker"), "{postinst}");

    // The packaged binary runs and accepts the packaged configuration.
    let bin = root.join("usr/bin/glued");
    let version = Command::new(&bin).arg("--version").output().unwrap();
    assert_eq!(
        text(&version.stdout),
        format!("glued {}\n", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/glued/glued.toml")).unwrap(),
        std::fs::read_to_string(repo.join("glued.toml.example")).unwrap()
    );
    let check = Command::new(&bin)
        .args(["check", "--config"])
        .arg(root.join("etc/glued/glued.toml"))
        .env_clear()
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check.stderr));

    // The drop-in routes the default domain to Glued on loopback.
    let dropin =
        std::fs::read_to_string(root.join("usr/lib/systemd/resolved.conf.d/glued.conf")).unwrap();
    let settings: Vec<&str> = dropin
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    assert_eq!(
        settings,
        [
            "[Resolve]".to_string(),
            "DNS=127.0.0.1".to_string(),
            format!("Domains=~{}", glued::config::DEFAULT_DOMAIN),
        ]
    );

    // The unit: hardened, and accepted by systemd-analyze.
    let unit_path = root.join("lib/systemd/system/glued.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    for directive in [
        "ExecStart=/usr/bin/glued run --config /etc/glued/glued.toml",
        "User=glued",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "StateDirectory=glued",
        "ProtectSystem=strict",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.lines().any(|l| l == directive), "no {directive}");
    }
    if !have("systemd-analyze", "systemd") {
        return;
    }
    // Verified as shipped, except that ExecStart names the extracted binary
    // (systemd-analyze checks that the command exists and is executable).
    let verify_dir = out.join("verify");
    std::fs::create_dir_all(&verify_dir).unwrap();
    let unit_here = verify_dir.join("glued.service");
    std::fs::write(
        &unit_here,
        unit.replace(
            "ExecStart=/usr/bin/glued ",
            &format!("ExecStart={} ", bin.display()),
        ),
    )
    .unwrap();
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit_here)
        .output()
        .unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty() && verify.stdout.is_empty(),
        "systemd-analyze verify: {}{}",
        text(&verify.stdout),
        text(&verify.stderr)
    );
    let _ = std::fs::remove_dir_all(&out);
}

fn dpkg_extract(deb: &Path, root: &Path) {
    let o = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(root)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
}

// -------------------------------------------------------------------- logs

/// Docker objects a test created, removed on drop.
#[derive(Default)]
struct DockerCleanup {
    containers: Vec<String>,
    networks: Vec<String>,
}

impl Drop for DockerCleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = Command::new("docker").args(["rm", "-f", c]).output();
        }
        for n in &self.networks {
            let _ = Command::new("docker").args(["network", "rm", n]).output();
        }
    }
}

fn docker(args: &[&str]) -> String {
    let o = Command::new("docker").args(args).output().unwrap();
    assert!(o.status.success(), "docker {args:?}: {}", text(&o.stderr));
    text(&o.stdout).trim().to_string()
}

#[test]
fn one_info_line_per_container_name_added_or_removed() {
    const IMAGE: &str = "glued-test-busybox";
    let missing = docker_engine_missing().or_else(|| {
        let has = Command::new("docker")
            .args(["image", "inspect", IMAGE])
            .output()
            .is_ok_and(|o| o.status.success());
        (!has).then(|| format!("image {IMAGE} missing: run tests/images/build-busybox.sh"))
    });
    if let Some(why) = missing {
        assert!(!support::in_ci(), "Docker test cannot run in CI: {why}");
        eprintln!("skipped: {why}");
        return;
    }
    let mut cleanup = DockerCleanup::default();
    let net = support::unique("glued-ops-net");
    docker(&["network", "create", &net]);
    cleanup.networks.push(net.clone());
    let g = spawn(
        "logs",
        "svc",
        &[
            ("GLUED_DOCKER_HOST", "unix:///var/run/docker.sock".into()),
            ("GLUED_NETWORK_NAME", net.clone()),
        ],
    );
    assert!(
        wait_until(CONVERGE, || g
            .log()
            .contains("Connected to the Docker engine")),
        "{}",
        g.log()
    );
    let name = support::unique("glued-ops-c");
    cleanup.containers.push(name.clone());
    let id = docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        &net,
        IMAGE,
        "sleep",
        "3600",
    ]);
    let ip = docker(&[
        "inspect",
        "-f",
        &format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}"),
        &name,
    ]);
    let at = format!("(container {} on {net})", &id[..12]);
    let added = format!("Added {name} → {ip} {at}");
    assert!(
        wait_until(CONVERGE, || g.log().contains(&added)),
        "no {added:?} in:\n{}",
        g.log()
    );
    docker(&["rm", "-f", &name]);
    let removed = format!("Removed {name} ({ip}) {at}");
    assert!(
        wait_until(CONVERGE, || g.log().contains(&removed)),
        "no {removed:?} in:\n{}",
        g.log()
    );
    let log = g.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(&name)).collect();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(lines.iter().all(|l| l.contains(" INFO ")), "{lines:#?}");
}

#[test]
fn every_component_thread_of_an_idle_daemon_beats_every_interval() {
    use glued::health::BEAT_INTERVAL;
    // A silent upstream, so that the forwarding thread runs.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut config = support::test_config();
    config.upstreams = vec![silent.local_addr().unwrap()];
    let daemon = glued::daemon::Daemon::start(&config).unwrap();
    let m = daemon.metrics.clone();
    // Idle for several intervals: no query, no change, no peer.
    std::thread::sleep(3 * BEAT_INTERVAL);
    for (heartbeat, name) in [
        (&m.registry.heartbeat, "registry"),
        (&m.forward.heartbeat, "glued-forward"),
        (&m.docker.heartbeat, "docker"),
        (&m.gossip.heartbeat, "gossip"),
        (&m.http, "glued-http"),
    ] {
        assert_eq!(heartbeat.thread(), Some(name));
    }
    // Generous for a loaded machine, yet under the 3 intervals of idleness.
    let silent_threads = m.silent_threads(2 * BEAT_INTERVAL);
    assert!(silent_threads.is_empty(), "{silent_threads:?}");
    daemon.stop();
    let after: Vec<String> = m.silent_threads(Duration::ZERO);
    assert!(after.is_empty(), "stopped threads retire: {after:?}");
}

#[test]
fn both_image_stages_check_health_with_the_binary_they_run() {
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).unwrap();
    let stages: Vec<&str> = dockerfile.split("\nFROM ").skip(1).collect();
    let runnable: Vec<&&str> = stages
        .iter()
        .filter(|s| s.lines().any(|l| l.starts_with("ENTRYPOINT")))
        .collect();
    assert_eq!(runnable.len(), 2, "the offline and final stages");
    for stage in runnable {
        let entrypoint = stage
            .lines()
            .find_map(|l| l.strip_prefix("ENTRYPOINT "))
            .unwrap();
        let binary: Vec<String> = serde_json::from_str(entrypoint).unwrap();
        // HEALTHCHECK [options] \ CMD [...] may span lines.
        let joined = stage.replace("\\\n", " ");
        let check = joined
            .lines()
            .find(|l| l.starts_with("HEALTHCHECK "))
            .unwrap_or_else(|| panic!("no HEALTHCHECK in stage {stage}"));
        let cmd: Vec<String> =
            serde_json::from_str(check.split(" CMD ").nth(1).unwrap().trim()).unwrap();
        assert_eq!(cmd, [binary[0].as_str(), "health"], "{check}");
    }
}
