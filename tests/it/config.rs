//! Integration tests: configuration and process lifecycle, through the real
//! `glued` binary (`check`, `run`, `--help`, `--version`).
//!
//! Every child runs with a cleared environment in a fresh temporary
//! directory, so neither the developer's `GLUED_*` variables nor a
//! `./glued.toml` can leak in.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::support;

const GLUED: &str = env!("CARGO_BIN_EXE_glued");
/// How long a `glued run` may take to print its listening addresses.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// SPEC §8: a clean stop within a second of SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(1);
/// A valid cluster key (32 bytes, base64) that must never be printed.
const SECRET: &str = "VmVyeS1TZWNyZXQtVmFsdWUtNGYxYzllLTAxMjM0NTY=";

/// Output of one finished `glued` invocation.
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `glued ARGS` in `dir` with only `env` set.
fn glued(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Out {
    let out = Command::new(GLUED)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("spawn glued");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A fresh directory holding `files` (name, contents).
fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

/// `glued check` that must succeed; returns its stdout.
fn check_ok(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    let out = glued(dir, &all, env);
    assert_eq!(out.code, 0, "glued {all:?} failed: {}", out.stderr);
    out.stdout
}

/// `glued check` that must fail with exit 2 and one stderr line containing
/// every one of `needles`; returns that line.
fn check_err(dir: &Path, args: &[&str], env: &[(&str, &str)], needles: &[&str]) -> String {
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    let out = glued(dir, &all, env);
    assert_eq!(
        out.code, 2,
        "glued {all:?} env {env:?}: {}{}",
        out.stdout, out.stderr
    );
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {:?}", out.stderr);
    for needle in needles {
        assert!(
            lines[0].contains(needle),
            "{needle:?} missing in {:?}",
            lines[0]
        );
    }
    lines[0].to_string()
}

fn line<'a>(stdout: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key} = ");
    stdout
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {key} in {stdout}"))
}

#[test]
fn precedence_is_file_then_env_then_flag() {
    let dir = dir_with(&[(
        "glued.toml",
        "ttl = 7\nlease_secs = 20\ndomain = \"file.test\"\nmdns = false\n",
    )]);
    let env = [("GLUED_TTL", "8"), ("GLUED_LEASE_SECS", "30")];
    let out = check_ok(dir.path(), &["--ttl", "9"], &env);
    assert_eq!(line(&out, "ttl"), "ttl = 9", "flag beats env and file");
    assert_eq!(
        line(&out, "lease_secs"),
        "lease_secs = 30",
        "env beats file"
    );
    assert_eq!(
        line(&out, "domain"),
        "domain = file.test",
        "file beats default"
    );
    assert_eq!(line(&out, "mdns"), "mdns = false");
    assert_eq!(
        line(&out, "http_bind"),
        "http_bind = 127.0.0.1:9253",
        "default"
    );
    assert!(out.contains("# config file: glued.toml"), "{out}");
}

#[test]
fn every_bad_value_exits_2_naming_key_and_value() {
    let dir = dir_with(&[]);
    let env_cases: &[(&str, &str)] = &[
        ("GLUED_DNS_BIND", "not-an-address"),
        ("GLUED_BIND_IP", "300.1.1.1"),
        ("GLUED_DNS_THREADS", "0"),
        ("GLUED_DNS_THREADS", "many"),
        ("GLUED_HTTP_BIND", "127.0.0.1:http"),
        ("GLUED_DOMAIN", "bad..domain"),
        ("GLUED_NODE_NAME", "two.labels"),
        ("GLUED_TTL", "abc"),
        ("GLUED_TTL", "86401"),
        ("GLUED_UPSTREAMS", "1.1.1.1,not-an-ip"),
        ("GLUED_ALLOW_NETS", "10.0.0.0/33"),
        ("GLUED_NETWORK_NAME", "bad net"),
        ("GLUED_NETWORK", "-bad"),
        ("GLUED_DOCKER_HOST", "ftp://docker"),
        ("DOCKER_HOST", "nowhere"),
        ("GLUED_GOSSIP_BIND", "0.0.0.0:70000"),
        ("GLUED_MDNS", "perhaps"),
        ("GLUED_LEASE_SECS", "0"),
        ("GLUED_BOOTSTRAP_PEERS", "not-hex@host:1"),
        ("GLUED_TOPIC_ID", "abcd"),
        ("GLUED_CLUSTER_SECRET_FILE", "/nonexistent/glued-secret"),
    ];
    for (key, value) in env_cases {
        check_err(dir.path(), &[], &[(key, value)], &[key, value]);
    }
    let line = check_err(dir.path(), &[], &[("GLUED_TTL", "abc")], &[]);
    assert_eq!(
        line,
        "error: invalid GLUED_TTL=\"abc\": expected a number of seconds between 0 and 86400"
    );
    // Flags are named as flags.
    for (flag, value) in [
        ("--ttl", "-1"),
        ("--dns-bind", "x"),
        ("--node-name", "Bad_Label-"),
    ] {
        check_err(dir.path(), &[flag, value], &[], &[flag, value]);
    }
    // File keys are named as file keys, with the file.
    for (key, text, value) in [
        ("ttl", "ttl = \"soon\"", "soon"),
        ("lease_secs", "lease_secs = -3", "-3"),
        ("mdns", "mdns = \"sometimes\"", "sometimes"),
        ("upstreams", "upstreams = [\"1.1.1.1\", \"x\"]", "x"),
        (
            "records[0].ip",
            "[[records]]\nname = \"db\"\nip = \"10.0.0.999\"",
            "10.0.0.999",
        ),
        (
            "records[1].name",
            "[[records]]\nname = \"db\"\nip = \"10.0.0.1\"\n[[records]]\nname = \"a.b\"\nip = \"10.0.0.2\"",
            "a.b",
        ),
    ] {
        let dir = dir_with(&[("glued.toml", text)]);
        check_err(dir.path(), &[], &[], &[key, value, "glued.toml"]);
    }
    // Command-line mistakes are configuration errors too.
    check_err(
        dir.path(),
        &["--no-such-flag", "1"],
        &[],
        &["--no-such-flag"],
    );
    check_err(dir.path(), &["--ttl"], &[], &["--ttl"]);
    let out = glued(
        dir.path(),
        &["check", "--config", "/nonexistent/glued.toml"],
        &[],
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("/nonexistent/glued.toml"),
        "{}",
        out.stderr
    );
}

#[test]
fn unknown_file_key_is_an_error() {
    let dir = dir_with(&[("glued.toml", "ttl = 5\ndns_bnid = \"0.0.0.0:53\"\n")]);
    check_err(dir.path(), &[], &[], &["dns_bnid", "line 2"]);
    let dir = dir_with(&[("glued.json", r#"{"ttl": 5, "colour": "blue"}"#)]);
    check_err(dir.path(), &[], &[], &["colour"]);
    let dir = dir_with(&[(
        "glued.toml",
        "[[records]]\nname = \"db\"\nip = \"10.0.0.5\"\nttl = 9\n",
    )]);
    check_err(dir.path(), &[], &[], &["ttl", "line"]);
}

#[test]
fn network_alias_and_comma_lists_from_env() {
    let dir = dir_with(&[]);
    let id = "0123456789abcdef".repeat(4);
    let peers = format!(
        "{id}, {}@10.0.0.9:9254,{id}@[fd00::9]:9254",
        id.to_uppercase()
    );
    let out = check_ok(
        dir.path(),
        &[],
        &[
            ("GLUED_NETWORK", "front,back"),
            (
                "GLUED_UPSTREAMS",
                "1.1.1.1, 9.9.9.9:5353,[2606:4700::1111]:53",
            ),
            ("GLUED_ALLOW_NETS", "10.0.0.0/8,fd00::/8"),
            ("GLUED_BOOTSTRAP_PEERS", &peers),
        ],
    );
    assert_eq!(line(&out, "network_name"), "network_name = front,back");
    assert_eq!(
        line(&out, "upstreams"),
        "upstreams = 1.1.1.1:53,9.9.9.9:5353,[2606:4700::1111]:53"
    );
    assert_eq!(line(&out, "allow_nets"), "allow_nets = 10.0.0.0/8,fd00::/8");
    assert_eq!(
        line(&out, "bootstrap_peers"),
        format!("bootstrap_peers = {id},{id}@10.0.0.9:9254,{id}@[fd00::9]:9254")
    );
    // The canonical name wins over the alias.
    let out = check_ok(
        dir.path(),
        &[],
        &[
            ("GLUED_NETWORK", "alias"),
            ("GLUED_NETWORK_NAME", "canonical"),
        ],
    );
    assert_eq!(line(&out, "network_name"), "network_name = canonical");
}

#[test]
fn bind_ip_replaces_only_the_ip() {
    let dir = dir_with(&[("glued.toml", "dns_bind = \"0.0.0.0:5353\"\n")]);
    let out = check_ok(dir.path(), &[], &[("GLUED_BIND_IP", "10.1.2.3")]);
    assert_eq!(line(&out, "dns_bind"), "dns_bind = 10.1.2.3:5353");
    let out = check_ok(dir.path(), &[], &[("GLUED_BIND_IP", "::1")]);
    assert_eq!(line(&out, "dns_bind"), "dns_bind = [::1]:5353");
    let out = check_ok(
        dir_with(&[]).path(),
        &[],
        &[("GLUED_BIND_IP", "192.168.7.7")],
    );
    assert_eq!(line(&out, "dns_bind"), "dns_bind = 192.168.7.7:53");
}

#[test]
fn json_file_and_discovery_order() {
    let json = r#"{"ttl": 12, "mdns": false, "network_name": ["a", "b"],
                  "records": [{"name": "DB", "ip": "10.0.0.5"}, {"name": "db", "ip": "fd00::5"}]}"#;
    let dir = dir_with(&[("glued.json", json)]);
    let out = check_ok(dir.path(), &[], &[]);
    assert_eq!(line(&out, "ttl"), "ttl = 12");
    assert_eq!(line(&out, "network_name"), "network_name = a,b");
    assert_eq!(line(&out, "records"), "records = db=10.0.0.5,db=fd00::5");
    // ./glued.toml comes before ./glued.json.
    std::fs::write(dir.path().join("glued.toml"), "ttl = 13\n").unwrap();
    assert_eq!(line(&check_ok(dir.path(), &[], &[]), "ttl"), "ttl = 13");
}

#[test]
fn config_flag_before_and_after_the_subcommand() {
    let dir = dir_with(&[("other.toml", "ttl = 21\n"), ("glued.toml", "ttl = 1\n")]);
    for args in [
        vec!["--config", "other.toml", "check"],
        vec!["check", "--config", "other.toml"],
        vec!["check", "--config=other.toml"],
    ] {
        let out = glued(dir.path(), &args, &[]);
        assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
        assert_eq!(line(&out.stdout, "ttl"), "ttl = 21", "{args:?}");
    }
}

#[test]
fn example_config_checks() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("glued.toml.example");
    let out = glued(
        dir_with(&[]).path(),
        &["check", "--config", example.to_str().unwrap()],
        &[],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(line(&out.stdout, "domain"), "domain = glued.internal");
}

#[test]
fn help_and_version() {
    let dir = dir_with(&[]);
    let out = glued(dir.path(), &["--help"], &[("GLUED_TTL", "bad")]);
    assert_eq!(out.code, 0, "help needs no valid config: {}", out.stderr);
    for flag in [
        "--dns-bind",
        "--cluster-secret-file",
        "GLUED_NETWORK_NAME",
        "--config",
    ] {
        assert!(out.stdout.contains(flag), "{flag} not in help");
    }
    let out = glued(dir.path(), &["--version"], &[]);
    assert_eq!(out.code, 0);
    assert_eq!(
        out.stdout.trim(),
        format!("glued {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn secret_never_in_check_output_or_errors() {
    let secret_file = dir_with(&[("secret", &format!("{SECRET}\n"))]);
    let secret_path = secret_file.path().join("secret");
    let file_with_secret = format!("cluster_secret = \"{SECRET}\"\n");
    let runs = [
        (vec![], vec![("GLUED_CLUSTER_SECRET", SECRET)], ""),
        (vec!["--cluster-secret", SECRET], vec![], ""),
        (vec![], vec![], file_with_secret.as_str()),
        (
            vec![],
            vec![("GLUED_CLUSTER_SECRET_FILE", secret_path.to_str().unwrap())],
            "",
        ),
    ];
    for (args, env, file) in &runs {
        let dir = dir_with(&[("glued.toml", file)]);
        let out = check_ok(dir.path(), args, env);
        assert!(!out.contains(SECRET), "secret shown: {out}");
        let id = glued::config::ClusterKey::parse(SECRET).unwrap().id();
        assert_eq!(
            line(&out, "cluster_secret"),
            format!("cluster_secret = <redacted> (keys primary {id})")
        );
    }
    let out = check_ok(dir_with(&[]).path(), &[], &[]);
    assert_eq!(
        line(&out, "cluster_secret"),
        "cluster_secret = none (single host: gossip and mDNS off)"
    );
    assert_eq!(line(&out, "mdns"), "mdns = false");
    // Errors about the secret never echo it.
    let dir = dir_with(&[(
        "glued.toml",
        &format!("cluster_secret = \"{SECRET}\"\ncluster_secret_file = \"/x\"\n"),
    )]);
    let err = check_err(
        dir.path(),
        &[],
        &[],
        &["cluster_secret", "cluster_secret_file"],
    );
    assert!(!err.contains(SECRET), "{err}");
    let dir = dir_with(&[(
        "glued.toml",
        &format!("cluster_secret = [\"{SECRET}\", \"x\"]\n"),
    )]);
    let err = check_err(dir.path(), &[], &[], &["cluster_secret", "<redacted>"]);
    assert!(!err.contains(SECRET), "{err}");
    check_err(
        dir_with(&[]).path(),
        &["--cluster-secret", ""],
        &[],
        &["--cluster-secret=<redacted>"],
    );
}

// ---------------------------------------------------------------------------
// `glued run`

/// A running `glued run` whose stderr (the log) is collected line by line.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Running {
    /// Starts `glued run` on loopback ports chosen by the kernel, with mDNS
    /// off, no upstreams, a fresh data dir and a unique watched network.
    fn start(extra_env: &[(&str, &str)]) -> Running {
        let dir = dir_with(&[]);
        let data_dir: PathBuf = dir.path().join("data");
        let network = support::unique("glued-cfg-net");
        let mut env: Vec<(&str, &str)> = vec![
            ("GLUED_DNS_BIND", "127.0.0.1:0"),
            ("GLUED_HTTP_BIND", "127.0.0.1:0"),
            ("GLUED_GOSSIP_BIND", "127.0.0.1:0"),
            ("GLUED_MDNS", "false"),
            ("GLUED_UPSTREAMS", "none"),
            ("GLUED_DATA_DIR", data_dir.to_str().unwrap()),
            ("GLUED_NETWORK_NAME", &network),
            ("GLUED_NODE_NAME", "cfg-test"),
            ("RUST_LOG", "debug"),
        ];
        env.extend_from_slice(extra_env);
        let mut child = Command::new(GLUED)
            .arg("run")
            .env_clear()
            .envs(env)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn glued run");
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Running {
            child,
            lines,
            log: Vec::new(),
            _dir: dir,
        }
    }

    /// Waits for a log line containing `needle`; panics with the log so far
    /// if it does not come.
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        if let Some(l) = self.log.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no log line with {needle:?} within {timeout:?}; log:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    /// Sends `signal` and waits for the exit; returns (exit code, time taken).
    fn signal_and_wait(&mut self, signal: i32) -> (Option<i32>, Duration) {
        let pid = self.child.id() as i32;
        let start = Instant::now();
        // SAFETY: plain kill(2) of the child we spawned and still own.
        unsafe { libc::kill(pid, signal) };
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), start.elapsed());
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("glued did not stop within 10 s of signal {signal}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything logged, after the process ended.
    fn rest_of_log(&mut self) -> String {
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(500)) {
            self.log.push(line);
        }
        self.log.join("\n")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The address after `prefix` in a log line like `HTTP status on 127.0.0.1:4321`.
fn addr_after(line: &str, prefix: &str) -> std::net::SocketAddr {
    let rest = &line[line.find(prefix).expect("prefix") + prefix.len()..];
    rest.split_whitespace()
        .next()
        .unwrap()
        .parse()
        .expect("address")
}

#[test]
fn sigterm_stops_run_within_a_second_with_exit_0() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut glued = Running::start(&[("GLUED_CLUSTER_SECRET", SECRET)]);
        glued.wait_for("DNS listening on udp", START_TIMEOUT);
        let http = glued.wait_for("HTTP status on", START_TIMEOUT);
        let http = addr_after(&http, "HTTP status on ");
        assert!(
            std::net::TcpStream::connect(http).is_ok(),
            "status port not open"
        );
        let (code, took) = glued.signal_and_wait(signal);
        assert_eq!(
            code,
            Some(0),
            "signal {signal}: log:\n{}",
            glued.rest_of_log()
        );
        assert!(took < STOP_LIMIT, "signal {signal}: stop took {took:?}");
    }
}

#[test]
fn secret_never_in_run_log() {
    let mut glued = Running::start(&[("GLUED_CLUSTER_SECRET", SECRET)]);
    glued.wait_for("HTTP status on", START_TIMEOUT);
    // Give the components a moment to log what they log at start.
    std::thread::sleep(Duration::from_millis(500));
    let (code, _) = glued.signal_and_wait(libc::SIGTERM);
    let log = glued.rest_of_log();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("cluster_secret = <redacted>"), "{log}");
    assert!(
        log.contains("DEBUG") || log.contains("debug"),
        "RUST_LOG=debug not applied: {log}"
    );
    assert!(!log.contains(SECRET), "secret in the log:\n{log}");
    let id = glued::config::ClusterKey::parse(SECRET).unwrap().id();
    assert!(
        log.contains(&format!("cluster keys primary {id}")),
        "key id not logged: {log}"
    );
}

#[test]
fn a_weak_or_malformed_secret_exits_2_naming_the_key_and_glued_keygen() {
    let weak_file = dir_with(&[("keys", "# the README of old\nmy_secure_cluster_secret\n")]);
    let weak_path = weak_file.path().join("keys");
    let cases: [(&str, &str); 5] = [
        ("GLUED_CLUSTER_SECRET", "my_secure_cluster_secret"),
        ("GLUED_CLUSTER_SECRET", "a long random secret"),
        // Base64, but only 12 bytes.
        ("GLUED_CLUSTER_SECRET", "c2hvcnQta2V5LTEy"),
        ("GLUED_CLUSTER_SECRET", "Zm9vYmFyYmF6cXV4cXV1eGNvcmdl,nope"),
        ("GLUED_CLUSTER_SECRET_FILE", weak_path.to_str().unwrap()),
    ];
    for (key, value) in cases {
        for command in ["check", "run"] {
            let dir = dir_with(&[]);
            let out = glued(
                dir.path(),
                &[command],
                &[
                    (key, value),
                    ("GLUED_DNS_BIND", "127.0.0.1:0"),
                    ("GLUED_HTTP_BIND", "127.0.0.1:0"),
                    ("GLUED_GOSSIP_BIND", "127.0.0.1:0"),
                ],
            );
            assert_eq!(out.code, 2, "{command} {key}={value}: {}", out.stderr);
            let lines: Vec<&str> = out.stderr.lines().collect();
            assert_eq!(lines.len(), 1, "not one line: {:?}", out.stderr);
            assert!(
                lines[0].starts_with(&format!("error: invalid {key}="))
                    && lines[0].contains("run `glued keygen` to make a key"),
                "{}",
                lines[0]
            );
            if key == "GLUED_CLUSTER_SECRET" {
                assert!(!lines[0].contains(value), "secret echoed: {}", lines[0]);
            }
        }
    }
}

#[test]
fn keygen_prints_a_new_key_that_the_config_accepts() {
    let dir = dir_with(&[]);
    let a = glued(dir.path(), &["keygen"], &[]);
    let b = glued(dir.path(), &["keygen"], &[]);
    assert_eq!(a.code, 0, "{}", a.stderr);
    let key = a.stdout.trim();
    assert_eq!(key.len(), 44, "32 bytes in base64: {key:?}");
    assert_ne!(key, b.stdout.trim(), "two keys alike");
    let k = glued::config::ClusterKey::parse(key).expect("a valid key");
    assert_eq!(k.expose().len(), 32);
    let out = check_ok(dir.path(), &[], &[("GLUED_CLUSTER_SECRET", key)]);
    assert!(
        line(&out, "cluster_secret").contains(&k.id().to_string()),
        "{out}"
    );
    assert!(!out.contains(key));
    assert_eq!(
        line(&out, "mdns"),
        "mdns = true",
        "mDNS on by default with a key"
    );
}

#[test]
fn no_secret_runs_a_single_host_with_no_gossip_socket() {
    // A port free now, named as the gossip bind: nothing may take it.
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let gossip = probe.local_addr().unwrap();
    drop(probe);
    let gossip_bind = gossip.to_string();
    let mut glued = Running::start(&[("GLUED_GOSSIP_BIND", gossip_bind.as_str())]);
    let line = glued.wait_for("running as a single host", START_TIMEOUT);
    assert!(line.contains("glued keygen"), "{line}");
    glued.wait_for("DNS listening on udp", START_TIMEOUT);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        std::net::UdpSocket::bind(gossip).is_ok(),
        "something bound the gossip port {gossip} in single-host mode"
    );
    let (code, _) = glued.signal_and_wait(libc::SIGTERM);
    let log = glued.rest_of_log();
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(
        log.matches("running as a single host").count(),
        1,
        "logged once: {log}"
    );
    assert!(!log.contains("Gossip endpoint created"), "{log}");
    assert!(!log.contains("mDNS local discovery started"), "{log}");
}

#[test]
fn dns_port_in_use_exits_1_with_one_line() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let _tcp = std::net::TcpListener::bind(&addr);
    let dir = dir_with(&[]);
    let data = dir.path().join("data");
    let out = glued(
        dir.path(),
        &["run"],
        &[
            ("GLUED_DNS_BIND", &addr),
            ("GLUED_HTTP_BIND", "127.0.0.1:0"),
            ("GLUED_GOSSIP_BIND", "127.0.0.1:0"),
            ("GLUED_MDNS", "false"),
            ("GLUED_UPSTREAMS", "none"),
            ("GLUED_DATA_DIR", data.to_str().unwrap()),
            ("GLUED_NETWORK_NAME", &support::unique("glued-cfg-net")),
            ("RUST_LOG", "off"),
        ],
    );
    assert_eq!(out.code, 1, "{}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{:?}", out.stderr);
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(&addr),
        "{}",
        lines[0]
    );
}

#[test]
fn id_lines_are_accepted_as_bootstrap_peers() {
    let dir = dir_with(&[]);
    let data = dir.path().join("data");
    let env = [
        ("GLUED_DATA_DIR", data.to_str().unwrap()),
        ("GLUED_GOSSIP_BIND", "0.0.0.0:9254"),
    ];
    let first = glued(dir.path(), &["id"], &env);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let lines: Vec<&str> = first.stdout.lines().collect();
    let id = lines.first().copied().unwrap_or_default();
    assert!(
        id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "first line is not an endpoint id: {:?}",
        first.stdout
    );
    let again = glued(dir.path(), &["id"], &env);
    assert_eq!(again.stdout.lines().next(), Some(id), "id not stable");
    let peers = lines.join(",");
    let out = check_ok(dir.path(), &[], &[("GLUED_BOOTSTRAP_PEERS", &peers)]);
    assert_eq!(
        line(&out, "bootstrap_peers"),
        format!("bootstrap_peers = {peers}")
    );
}

/// SPEC §8: binding port 53 without privilege fails with an error that says
/// how to fix it. As root, the child drops to `nobody` with `setpriv`.
#[test]
fn port_53_without_privilege_says_how_to_fix_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = dir_with(&[]);
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for d in [dir.path(), data.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let mut cmd = if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", GLUED]);
        c
    } else {
        Command::new(GLUED)
    };
    let out = cmd
        .arg("run")
        .env_clear()
        .envs([
            ("GLUED_DNS_BIND", "127.0.0.1:53"),
            ("GLUED_HTTP_BIND", "127.0.0.1:0"),
            ("GLUED_GOSSIP_BIND", "127.0.0.1:0"),
            ("GLUED_MDNS", "false"),
            ("GLUED_UPSTREAMS", "none"),
            ("GLUED_DATA_DIR", data.to_str().unwrap()),
            ("GLUED_NETWORK_NAME", &support::unique("glued-cfg-net")),
            ("RUST_LOG", "off"),
        ])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("spawn glued (setpriv from util-linux when root)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    for needle in [
        "permission denied",
        "root",
        "CAP_NET_BIND_SERVICE",
        "GLUED_DNS_BIND",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in {stderr}");
    }
}
