//! Integration tests of issue 12 through real `glued run` processes on
//! 127.0.0.1 and the real Docker engine: Compose project scopes and name
//! conflicts, health-aware answers, nearest-first answers, SRV records.
//!
//! Every network, container and Compose project a test creates is removed
//! by a Drop guard, also when it fails. Without Docker (or Compose) a test
//! prints why and skips, except with CI=true, where it fails.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use hickory_proto::rr::{RData, RecordType};

use crate::docker::{Ctr, Net, docker, docker_quiet, docker_ready, wait_until};
use crate::process::{self, Glued, START_TIMEOUT, addr_after, udp_ask};
use crate::support::{self, in_ci, unique};

/// How long a container change may take to reach the answers (generous:
/// the engine and a loaded 2-core CI machine).
const FOLLOW: Duration = Duration::from_secs(10);
/// How long Docker may take to report a health status.
const HEALTH_WAIT: Duration = Duration::from_secs(60);
/// Issue 12: a holder that turned unhealthy leaves the answers within this.
const UNHEALTHY_DROP: Duration = Duration::from_secs(3);
/// How long two nodes may take to see each other's records.
const CONVERGE: Duration = Duration::from_secs(45);
/// The local test image.
const IMAGE: &str = "glued-test-busybox";
/// Answers asked of each node in the nearest-first test.
const NEAREST_ROUNDS: usize = 20;

/// One `glued run` with its DNS and HTTP addresses.
struct Node {
    glued: Glued,
    dns: SocketAddr,
    http: SocketAddr,
    gossip: Option<SocketAddr>,
}

impl Node {
    /// Starts `glued run` as node `name` watching Docker network
    /// `network`, with `toml` as its configuration file; in a cluster (key
    /// derived from `secret`) when `cluster` is given, bootstrapping from
    /// the nodes listed there.
    fn start(name: &str, network: &str, toml: &str, cluster: Option<(&str, &[&Node])>) -> Node {
        let mut env: Vec<(&str, String)> = vec![
            ("GLUED_DNS_BIND", "127.0.0.1:0".into()),
            ("GLUED_DNS_THREADS", "1".into()),
            ("GLUED_HTTP_BIND", "127.0.0.1:0".into()),
            ("GLUED_NODE_NAME", name.into()),
            ("GLUED_UPSTREAMS", "none".into()),
            ("GLUED_NETWORK_NAME", network.into()),
            ("GLUED_MDNS", "false".into()),
            (
                "RUST_LOG",
                "info,iroh=warn,iroh_gossip=warn,noq=warn,noq_proto=warn".into(),
            ),
        ];
        let mut gossip = None;
        if let Some((secret, peers)) = cluster {
            let addr = free_udp_port();
            gossip = Some(addr);
            env.push(("GLUED_GOSSIP_BIND", addr.to_string()));
            env.push(("GLUED_CLUSTER_SECRET", support::key_b64(secret)));
            let boot: Vec<String> = peers
                .iter()
                .map(|p| format!("{}@{}", p.id(), p.gossip.unwrap()))
                .collect();
            if !boot.is_empty() {
                env.push(("GLUED_BOOTSTRAP_PEERS", boot.join(",")));
            }
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut glued = Glued::start(&[], toml, &env);
        let dns = glued.dns_addr();
        let line = glued.wait_for("HTTP status on ", START_TIMEOUT);
        let http = addr_after(&line, "HTTP status on ");
        if cluster.is_some() {
            glued.wait_for("Gossip endpoint created", START_TIMEOUT);
        }
        Node {
            glued,
            dns,
            http,
            gossip,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.glued.dir.path().join("data")
    }

    /// The node's endpoint id (its key exists once gossip started).
    fn id(&self) -> String {
        glued::gossip::local_id(&self.data_dir()).unwrap()
    }

    /// The A answer for `name`, in the order given; None without an answer.
    fn a(&self, name: &str) -> Option<Vec<String>> {
        udp_ask(self.dns, name, RecordType::A).map(|m| process::addresses(&m))
    }

    fn get(&self, path: &str) -> String {
        let (status, body) = glued::http::get(self.http, path).expect("HTTP get");
        assert_eq!(status, 200, "{path}: {body}");
        body
    }

    /// The value of an unlabelled metric.
    fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
    }

    fn records(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.get("/records")).unwrap()
    }
}

/// A UDP port free on 127.0.0.1 right now.
fn free_udp_port() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// The IPv4 address of container `id` on `net`.
fn ip_on(id: &str, net: &Net) -> String {
    let f = format!(
        "{{{{with index .NetworkSettings.Networks \"{}\"}}}}{{{{.IPAddress}}}}{{{{end}}}}",
        net.name
    );
    docker(&["inspect", "-f", &f, id])
}

/// Docker's health status of a container.
fn health_of(id: &str) -> String {
    docker(&["inspect", "-f", "{{.State.Health.Status}}", id])
}

/// Waits until Docker says container `id` is `status`.
fn wait_health(id: &str, status: &str) {
    assert!(
        wait_until(HEALTH_WAIT, || health_of(id) == status),
        "container {id} not {status} after {HEALTH_WAIT:?}: {}",
        health_of(id)
    );
}

/// The Compose command line (`docker compose` or `docker-compose`), or why
/// there is none.
fn compose_command() -> Result<Vec<&'static str>, String> {
    for cmd in [&["docker", "compose"][..], &["docker-compose"][..]] {
        let ok = Command::new(cmd[0])
            .args(&cmd[1..])
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(cmd.to_vec());
        }
    }
    Err("neither `docker compose` nor `docker-compose` runs".into())
}

/// A Compose project brought up from `file`; brought down on drop.
struct Project {
    cmd: Vec<&'static str>,
    file: PathBuf,
    name: String,
}

impl Project {
    fn up(cmd: &[&'static str], file: &Path, name: &str) -> Project {
        let project = Project {
            cmd: cmd.to_vec(),
            file: file.to_owned(),
            name: name.to_owned(),
        };
        let out = project.run(&["up", "-d"]);
        assert!(
            out.status.success(),
            "compose up {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        project
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        let file = self.file.to_string_lossy();
        Command::new(self.cmd[0])
            .args(&self.cmd[1..])
            .args(["-p", &self.name, "-f", &file])
            .args(args)
            .output()
            .expect("run compose")
    }

    /// The id of the container of `service`.
    fn container(&self, service: &str) -> String {
        docker(&[
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.name),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
        ])
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = self.run(&["down", "-t", "0"]);
        let id = self.container("db");
        if !id.is_empty() {
            docker_quiet(&["rm", "-f", "-v", &id]);
        }
    }
}

#[test]
fn two_compose_projects_scope_their_db_and_the_shared_name_is_a_conflict() {
    if !docker_ready() {
        return;
    }
    let compose = match compose_command() {
        Ok(c) => c,
        Err(why) if in_ci() => panic!("CI=true and {why}"),
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let net = Net::create(&[]);
    let mut node = Node::start("node-a", &net.name, "", None);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("compose.yml");
    std::fs::write(
        &file,
        format!(
            "version: \"2.4\"\nservices:\n  db:\n    image: {IMAGE}\n    command: [\"sleep\", \"3600\"]\n    \
             networks: [shared]\nnetworks:\n  shared:\n    external: true\n    name: {}\n",
            net.name
        ),
    )
    .unwrap();
    let (p1, p2) = (unique("gtp1"), unique("gtp2"));
    let one = Project::up(&compose, &file, &p1);
    let two = Project::up(&compose, &file, &p2);
    let ip1 = ip_on(&one.container("db"), &net);
    let ip2 = ip_on(&two.container("db"), &net);
    assert_ne!(ip1, ip2);

    let scoped1 = format!("db.{p1}.glued.internal.");
    let scoped2 = format!("db.{p2}.node-a.glued.internal.");
    let ok = wait_until(FOLLOW, || {
        node.a(&scoped1) == Some(vec![ip1.clone()])
            && node.a(&scoped2) == Some(vec![ip2.clone()])
            && node.a("db.glued.internal.").map(sorted)
                == Some(sorted(vec![ip1.clone(), ip2.clone()]))
    });
    assert!(
        ok,
        "{scoped1} {:?}, {scoped2} {:?}, db {:?}; want {ip1} and {ip2}",
        node.a(&scoped1),
        node.a(&scoped2),
        node.a("db.glued.internal.")
    );
    assert_eq!(
        node.a("db.").map(sorted),
        Some(sorted(vec![ip1.clone(), ip2.clone()])),
        "the single label is the union"
    );
    // The project is an empty non-terminal: NODATA, not NXDOMAIN.
    let m = udp_ask(node.dns, &format!("{p1}.glued.internal."), RecordType::A).unwrap();
    assert_eq!(process::rcode(&m), hickory_proto::op::ResponseCode::NoError);
    assert!(m.answers.is_empty() && !m.authorities.is_empty());

    // The conflict: in /records, in the metric, in one log line.
    let records = node.records();
    let dbs: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["scope"]["service"] == "db")
        .collect();
    assert_eq!(dbs.len(), 2, "{records:?}");
    for r in &dbs {
        assert_eq!(r["conflicts"], serde_json::json!(["db"]), "{r}");
    }
    assert_eq!(node.metric("glued_name_conflicts"), 1.0);
    let line = node
        .glued
        .wait_for("Name conflict: db is published by", FOLLOW);
    assert!(line.contains(&p1) && line.contains(&p2), "{line}");

    // One project left: no conflict any more.
    drop(two);
    assert!(
        wait_until(FOLLOW, || node.a("db.glued.internal.")
            == Some(vec![ip1.clone()])),
        "db: {:?}",
        node.a("db.glued.internal.")
    );
    assert_eq!(node.metric("glued_name_conflicts"), 0.0);
    assert!(node.records().iter().all(|r| r.get("conflicts").is_none()));
    drop(one);
}

#[test]
fn an_unhealthy_holder_leaves_the_answers_unless_every_holder_is_unhealthy() {
    if !docker_ready() {
        return;
    }
    let net = Net::create(&[]);
    let node = Node::start("node-a", &net.name, "", None);
    let web = unique("web");
    let label = format!("glued.names={web}");
    let sick = Ctr::run(
        "gt-sick",
        &[
            "--network",
            &net.name,
            "--label",
            &label,
            "--health-cmd",
            "exit 1",
            "--health-interval",
            "1s",
        ],
    );
    let well = Ctr::run(
        "gt-well",
        &[
            "--network",
            &net.name,
            "--label",
            &label,
            "--health-cmd",
            "test ! -e /tmp/bad",
            "--health-interval",
            "1s",
        ],
    );
    let (sick_ip, well_ip) = (ip_on(&sick.id, &net), ip_on(&well.id, &net));
    let name = format!("{web}.glued.internal.");
    wait_health(&well.id, "healthy");
    wait_health(&sick.id, "unhealthy");
    let since = Instant::now();
    assert!(
        wait_until(UNHEALTHY_DROP, || node.a(&name)
            == Some(vec![well_ip.clone()])),
        "{name}: {:?} {:?} after {web} turned unhealthy; want only {well_ip}",
        node.a(&name),
        since.elapsed()
    );
    // It stays out while the healthy replica is there.
    for _ in 0..5 {
        assert_eq!(node.a(&name), Some(vec![well_ip.clone()]));
        std::thread::sleep(Duration::from_millis(200));
    }
    let records = node.records();
    let health: Vec<&str> = records
        .iter()
        .filter(|r| r["names"].as_array().unwrap().iter().any(|n| n == &*web))
        .map(|r| r["health"].as_str().unwrap())
        .collect();
    assert_eq!(
        sorted(health.iter().map(|h| h.to_string()).collect()),
        ["healthy", "unhealthy"]
    );

    // Every holder unhealthy: fail open, all are answered.
    docker(&["exec", &well.id, "touch", "/tmp/bad"]);
    wait_health(&well.id, "unhealthy");
    let both = sorted(vec![sick_ip.clone(), well_ip.clone()]);
    assert!(
        wait_until(UNHEALTHY_DROP, || node.a(&name).map(sorted)
            == Some(both.clone())),
        "{name}: {:?} with every holder unhealthy; want {both:?}",
        node.a(&name)
    );
    assert!(
        node.glued.log().contains("→ unhealthy"),
        "no health change line:\n{}",
        node.glued.log()
    );
}

#[test]
fn each_node_lists_its_own_holder_first() {
    let _serial = support::serial();
    let secret = "scopes-nearest";
    let absent = unique("glued-absent-net");
    let a = Node::start(
        "node-a",
        &absent,
        "[[records]]\nname = \"web\"\nip = \"10.77.0.1\"\n",
        Some((secret, &[])),
    );
    let b = Node::start(
        "node-b",
        &absent,
        "[[records]]\nname = \"web\"\nip = \"10.77.0.2\"\n",
        Some((secret, &[&a])),
    );
    let both = vec!["10.77.0.1".to_string(), "10.77.0.2".to_string()];
    for n in [&a, &b] {
        assert!(
            wait_until(CONVERGE, || n.a("web.glued.internal.").map(sorted)
                == Some(both.clone())),
            "web at {}: {:?}; log:\n{}",
            n.dns,
            n.a("web.glued.internal."),
            n.glued.log()
        );
    }
    for (n, own, other) in [
        (&a, "10.77.0.1", "10.77.0.2"),
        (&b, "10.77.0.2", "10.77.0.1"),
    ] {
        for round in 0..NEAREST_ROUNDS {
            let got = n.a("web.glued.internal.").unwrap();
            assert_eq!(
                got.first().map(String::as_str),
                Some(own),
                "round {round}: {got:?}"
            );
            assert!(got.iter().any(|ip| ip == other), "round {round}: {got:?}");
        }
    }
}

/// The SRV records of `name` at `server`, as `port target`, and the
/// additional section's A records as `owner address`.
fn srv_at(server: SocketAddr, name: &str) -> Option<(Vec<String>, Vec<String>)> {
    let m: Message = udp_ask(server, name, RecordType::SRV)?;
    let srv = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some(format!(
                "{} {} {} {}",
                s.priority, s.weight, s.port, s.target
            )),
            _ => None,
        })
        .collect();
    let extra = m
        .additionals
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(format!("{} {}", r.name, a.0)),
            _ => None,
        })
        .collect();
    Some((srv, extra))
}

#[test]
fn glued_srv_gives_srv_records_with_their_addresses_here_and_at_a_peer() {
    if !docker_ready() {
        return;
    }
    let _serial = support::serial();
    let secret = "scopes-srv";
    let net = Net::create(&[]);
    let a = Node::start("node-a", &net.name, "", Some((secret, &[])));
    let b = Node::start(
        "node-b",
        &unique("glued-absent-net"),
        "",
        Some((secret, &[&a])),
    );
    let ctr = Ctr::run(
        "gt-srv",
        &["--network", &net.name, "--label", "glued.srv=http=8080"],
    );
    let ip: IpAddr = ip_on(&ctr.id, &net).parse().unwrap();
    let name = format!("_http._tcp.{}.glued.internal.", ctr.name);
    let target = format!("{}.node-a.glued.internal.", ctr.name);
    let want = (
        vec![format!("0 0 8080 {target}")],
        vec![format!("{target} {ip}")],
    );
    for (node, label) in [(&a, "node-a"), (&b, "its peer node-b")] {
        assert!(
            wait_until(CONVERGE, || srv_at(node.dns, &name).as_ref() == Some(&want)),
            "{label}: SRV {name} is {:?}, want {want:?}; log:\n{}",
            srv_at(node.dns, &name),
            node.glued.log()
        );
    }
    // Other types at the SRV name: NODATA.
    let m = udp_ask(b.dns, &name, RecordType::A).unwrap();
    assert_eq!(process::rcode(&m), hickory_proto::op::ResponseCode::NoError);
    assert!(m.answers.is_empty());
    // UDP is not published.
    let udp = format!("_http._udp.{}.glued.internal.", ctr.name);
    let m = udp_ask(a.dns, &udp, RecordType::SRV).unwrap();
    assert_eq!(
        process::rcode(&m),
        hickory_proto::op::ResponseCode::NXDomain
    );
    drop(ctr);
}
