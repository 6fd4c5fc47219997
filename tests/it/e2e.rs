//! End to end on the real Docker engine: the image built offline from the
//! Dockerfile, the Compose files, and three Glued "hosts" on one engine.
//!
//! Each host is a Docker network of its own (non-overlapping subnets) with
//! one Glued serving DNS on a fixed IP there and watching it; the three Glued
//! containers gossip over a shared "backbone" network. Clients on a host
//! network use their own host's Glued as DNS (`--dns`), through Docker's
//! embedded resolver, exactly as an operator's containers would.
//!
//! Invariant: everything a test creates (containers, networks, volumes,
//! images) is removed by a [`Cleanup`] guard, also when it fails; the engine
//! itself is never touched. The shared `glued-test-busybox` image is built if
//! absent (by `tests/images/build-busybox.sh`) and left in place.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::{in_ci, unique};

/// The shared client image (static busybox), see `tests/images/`.
const BUSYBOX: &str = "glued-test-busybox";
/// The Dockerfile stage that takes a root file system built on the host.
const OFFLINE_STAGE: &str = "offline";
/// Lease of the test cluster: short, so the partition phase is quick, and
/// longer than a Glued restart, so the restart phase means something.
const LEASE_SECS: u64 = 5;
/// How long a change (start, stop, move) may take to show on another host.
const PROPAGATE: Duration = Duration::from_secs(20);
/// How long the cluster may take to form, or to heal after a partition.
const CONVERGE: Duration = Duration::from_secs(45);
/// Pause between polls of a client's lookup.
const POLL: Duration = Duration::from_millis(250);
/// `docker stop` of a Glued must finish within this (SIGTERM as PID 1).
const STOP_LIMIT: Duration = Duration::from_secs(2);
/// Third octet of the first host subnet tried (10.213.X.0/24); on overlap
/// with some other network of the engine the next ones are tried.
const SUBNET_OCTET_SPAN: usize = 250;
const SUBNET_ATTEMPTS: usize = 60;
/// Lines of each Glued's log printed when a test fails.
const LOG_LINES_ON_FAILURE: usize = 80;
/// The gossip port inside the Glued containers (the default).
const GOSSIP_PORT: u16 = 9254;

// ---- skipping ------------------------------------------------------------

/// `Some(reason)` when the Docker engine cannot be used. With CI=true this
/// panics instead: nothing may skip there.
fn docker_missing() -> Option<String> {
    let reason = match Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
    {
        Err(e) => format!("cannot run docker: {e}"),
        Ok(out) if !out.status.success() => format!(
            "docker engine unavailable: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Ok(_) => return None,
    };
    if in_ci() {
        panic!("CI=true and {reason}");
    }
    Some(reason)
}

// ---- docker command helpers ----------------------------------------------

/// Runs `docker ARGS`; stdout (trimmed) or an error naming the command and
/// its stderr.
fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("docker {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "`docker {}` failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ))
    }
}

/// [`docker`], panicking on failure.
fn must(args: &[&str]) -> String {
    docker(args).unwrap_or_else(|e| panic!("{e}"))
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Container,
    Network,
    Volume,
    Image,
}

/// Removes everything registered, last created first, when dropped; on a
/// failing test it first prints the logs of the Glued containers.
struct Cleanup {
    created: Vec<(Kind, String)>,
    log_on_failure: Vec<String>,
}

impl Cleanup {
    fn new() -> Cleanup {
        Cleanup {
            created: Vec::new(),
            log_on_failure: Vec::new(),
        }
    }
    fn add(&mut self, kind: Kind, name: &str) {
        self.created.push((kind, name.to_string()));
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for name in &self.log_on_failure {
                // Glued's own lines and warnings, not iroh's per-packet tracing.
                let text = logs(name);
                let lines: Vec<&str> = text
                    .lines()
                    .filter(|l| !l.contains("iroh::socket") && !l.contains("tracing::span"))
                    .collect();
                let tail = &lines[lines.len().saturating_sub(LOG_LINES_ON_FAILURE)..];
                eprintln!(
                    "---- docker logs {name} (filtered) ----\n{}",
                    tail.join("\n")
                );
            }
        }
        for (kind, name) in self.created.iter().rev() {
            let args: &[&str] = match kind {
                Kind::Container => &["rm", "-f", "-v"],
                Kind::Network => &["network", "rm"],
                Kind::Volume => &["volume", "rm", "-f"],
                Kind::Image => &["rmi", "-f"],
            };
            let mut all = args.to_vec();
            all.push(name);
            // Already gone (a container re-created under the same name) is fine.
            let _ = docker(&all);
        }
    }
}

// ---- image ---------------------------------------------------------------

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the offline stage of the repository's Dockerfile from the glued
/// binary cargo built for these tests, under a unique tag, in a temporary
/// context (Dockerfile + dist/rootfs made by docker/make-rootfs.sh).
fn build_image(cleanup: &mut Cleanup) -> String {
    let context = tempfile::tempdir().expect("temp dir");
    std::fs::copy(repo().join("Dockerfile"), context.path().join("Dockerfile"))
        .expect("copy Dockerfile");
    let rootfs = context.path().join("dist/rootfs");
    let made = Command::new(repo().join("docker/make-rootfs.sh"))
        .arg(env!("CARGO_BIN_EXE_glued"))
        .arg(&rootfs)
        .output()
        .expect("run docker/make-rootfs.sh");
    assert!(
        made.status.success(),
        "docker/make-rootfs.sh failed: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let tag = format!("glued-e2e:{}", unique("t"));
    cleanup.add(Kind::Image, &tag);
    must(&[
        "build",
        "-q",
        "--target",
        OFFLINE_STAGE,
        "-t",
        &tag,
        &context.path().to_string_lossy(),
    ]);
    tag
}

/// Builds the shared busybox client image when it is absent.
fn ensure_busybox() {
    if docker(&["image", "inspect", BUSYBOX]).is_ok() {
        return;
    }
    let out = Command::new(repo().join("tests/images/build-busybox.sh"))
        .output()
        .expect("run tests/images/build-busybox.sh");
    assert!(
        out.status.success(),
        "tests/images/build-busybox.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- the three-host cluster ------------------------------------------------

/// One simulated host: its network, its Glued and a client using it.
struct Host {
    /// 1, 2, 3.
    n: usize,
    network: String,
    /// First three octets of the /24, e.g. "10.213.7".
    prefix: String,
    glued: String,
    glued_ip: String,
    volume: String,
    client: String,
    /// Endpoint id from `glued id` on this host's volume.
    id: String,
}

/// Creates a host network on a free 10.213.X.0/24 (static addresses below
/// .128, Docker's own from .128 up); returns the prefix "10.213.X".
fn create_host_network(cleanup: &mut Cleanup, name: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let base = std::process::id() as usize * 7;
    for _ in 0..SUBNET_ATTEMPTS {
        let octet = (base + NEXT.fetch_add(1, Ordering::Relaxed)) % SUBNET_OCTET_SPAN + 1;
        let prefix = format!("10.213.{octet}");
        let subnet = format!("{prefix}.0/24");
        let range = format!("{prefix}.128/25");
        match docker(&[
            "network",
            "create",
            "--subnet",
            &subnet,
            "--ip-range",
            &range,
            name,
        ]) {
            Ok(_) => {
                cleanup.add(Kind::Network, name);
                return prefix;
            }
            Err(e) if e.contains("overlap") => continue,
            Err(e) => panic!("{e}"),
        }
    }
    panic!("no free 10.213.X.0/24 subnet for {name} after {SUBNET_ATTEMPTS} attempts");
}

/// The endpoint id `glued id` prints (first line) for a data volume.
fn glued_id(image: &str, volume: &str) -> String {
    let mount = format!("{volume}:/var/lib/glued");
    let out = must(&[
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        &mount,
        image,
        "id",
    ]);
    let id = out.lines().next().unwrap_or("").trim().to_string();
    assert!(
        id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "`glued id` first line is not a 64-hex endpoint id: {out:?}"
    );
    id
}

/// Creates and starts the Glued of `host`: on the backbone for gossip, on
/// its host network at .2 for DNS, the docker socket read-only, its volume
/// for the node key, bootstrapping to the other hosts by `ID@name:port`.
fn start_glued(image: &str, backbone: &str, secret: &str, host: &Host, peers: &[&Host]) {
    let bootstrap: Vec<String> = peers
        .iter()
        .map(|p| format!("{}@{}:{GOSSIP_PORT}", p.id, p.glued))
        .collect();
    let env = [
        format!("GLUED_NETWORK={}", host.network),
        format!("GLUED_DNS_BIND={}:53", host.glued_ip),
        format!("GLUED_NODE_NAME=h{}", host.n),
        format!("GLUED_CLUSTER_SECRET={secret}"),
        format!("GLUED_BOOTSTRAP_PEERS={}", bootstrap.join(",")),
        format!("GLUED_LEASE_SECS={LEASE_SECS}"),
        "GLUED_MDNS=false".to_string(),
        "RUST_LOG=info".to_string(),
    ];
    let mount = format!("{}:/var/lib/glued", host.volume);
    let mut args = vec![
        "create",
        "--name",
        &host.glued,
        "--network",
        backbone,
        "-v",
        "/var/run/docker.sock:/var/run/docker.sock:ro",
        "-v",
        &mount,
    ];
    for e in &env {
        args.push("-e");
        args.push(e);
    }
    args.push(image);
    must(&args);
    must(&[
        "network",
        "connect",
        "--ip",
        &host.glued_ip,
        &host.network,
        &host.glued,
    ]);
    must(&["start", &host.glued]);
}

/// Starts a busybox container that sleeps; `dns` makes it a client.
fn start_busybox(cleanup: &mut Cleanup, name: &str, network: &str, dns: Option<&str>) {
    cleanup.add(Kind::Container, name);
    let mut args = vec!["run", "-d", "--name", name, "--network", network];
    if let Some(dns) = dns {
        args.extend(["--dns", dns]);
    }
    args.extend([BUSYBOX, "sleep", "3600"]);
    must(&args);
}

/// The IPv4 addresses `nslookup -type=a NAME` gives inside `client`
/// (through Docker's embedded DNS, which forwards to the client's `--dns`).
/// Empty when the name does not resolve.
fn lookup(client: &str, name: &str) -> Vec<Ipv4Addr> {
    let out = Command::new("docker")
        .args(["exec", client, "nslookup", "-type=a", name])
        .output()
        .expect("docker exec nslookup");
    parse_nslookup(&String::from_utf8_lossy(&out.stdout))
}

/// The addresses after the first `Name:` line of busybox nslookup output
/// (the lines before it are the server's own address).
fn parse_nslookup(text: &str) -> Vec<Ipv4Addr> {
    let mut answers = Vec::new();
    let mut in_answer = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("Name:") {
            in_answer = true;
        } else if in_answer && line.starts_with("Address") {
            // "Address: 10.1.2.3" or "Address 1: 10.1.2.3 name"
            if let Some(ip) = line
                .split_once(':')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .and_then(|ip| ip.parse().ok())
            {
                answers.push(ip);
            }
        }
    }
    answers.sort();
    answers.dedup();
    answers
}

/// Polls `client`'s lookup of `name` until `ok` holds; panics with what it
/// last saw after `timeout`. Returns the answer and how long it took.
fn wait_lookup(
    client: &str,
    name: &str,
    timeout: Duration,
    what: &str,
    ok: impl Fn(&[Ipv4Addr]) -> bool,
) -> (Vec<Ipv4Addr>, Duration) {
    let start = Instant::now();
    loop {
        let answer = lookup(client, name);
        if ok(&answer) {
            return (answer, start.elapsed());
        }
        if start.elapsed() > timeout {
            panic!(
                "{what}: `nslookup {name}` in {client} still gives {answer:?} after {timeout:?}"
            );
        }
        std::thread::sleep(POLL);
    }
}

fn in_subnet(answer: &[Ipv4Addr], prefix: &str) -> bool {
    !answer.is_empty()
        && answer
            .iter()
            .all(|ip| ip.to_string().starts_with(&format!("{prefix}.")))
}

/// stdout and stderr of `docker logs NAME` (Glued logs to stderr).
fn logs(name: &str) -> String {
    match Command::new("docker").args(["logs", name]).output() {
        Ok(out) => format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => format!("docker logs {name}: {e}"),
    }
}

/// The IPv4 address of `container` on `network`.
fn ip_on(container: &str, network: &str) -> Ipv4Addr {
    let format = format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
    let ip = must(&["inspect", "-f", &format, container]);
    ip.parse()
        .unwrap_or_else(|_| panic!("{container} has no address on {network}: {ip:?}"))
}

// ---- tests -----------------------------------------------------------------

#[test]
fn parse_nslookup_reads_only_the_answer_addresses() {
    let text = "Server:\t\t127.0.0.11\nAddress:\t127.0.0.11:53\n\nNon-authoritative answer:\n\
                Name:\tweb\nAddress: 10.213.4.130\nName:\tweb\nAddress: 10.213.5.131\n";
    assert_eq!(
        parse_nslookup(text),
        vec![
            "10.213.4.130".parse::<Ipv4Addr>().unwrap(),
            "10.213.5.131".parse().unwrap()
        ]
    );
    let nx =
        "Server:\t\t127.0.0.11\nAddress:\t127.0.0.11:53\n\n** server can't find web: NXDOMAIN\n";
    assert!(parse_nslookup(nx).is_empty());
}

/// `docker-compose config -q` accepts both Compose files.
#[test]
fn compose_files_are_accepted_by_docker_compose() {
    if let Err(e) = Command::new("docker-compose").arg("version").output() {
        let reason = format!("docker-compose not runnable: {e}");
        if in_ci() {
            panic!("CI=true and {reason}");
        }
        println!("skipped: {reason}");
        return;
    }
    for file in [
        "docker-compose.yml",
        "docker/compose.host.yml",
        "docker/compose.projects.yml",
    ] {
        let out = Command::new("docker-compose")
            .args(["-f", &repo().join(file).to_string_lossy(), "config", "-q"])
            .output()
            .expect("run docker-compose");
        assert!(
            out.status.success(),
            "docker-compose config rejects {file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The offline Dockerfile stage builds from the test binary, prints the
/// version, and a running Glued (PID 1) stops on `docker stop` quickly
/// and cleanly.
#[test]
fn image_builds_offline_runs_and_stops_on_sigterm() {
    if let Some(reason) = docker_missing() {
        println!("skipped: {reason}");
        return;
    }
    let mut cleanup = Cleanup::new();
    let image = build_image(&mut cleanup);

    let version = must(&["run", "--rm", "--network", "none", &image, "--version"]);
    assert!(
        version.contains(env!("CARGO_PKG_VERSION")),
        "`glued --version` in the image printed {version:?}"
    );

    // The daemon with no Docker socket and no peers still runs (DNS on the
    // container's own port 53): then SIGTERM must end it within the limit.
    let name = unique("ge2e-stop");
    cleanup.add(Kind::Container, &name);
    cleanup.log_on_failure.push(name.clone());
    must(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "none",
        "-e",
        "GLUED_MDNS=false",
        "-e",
        &format!(
            "GLUED_CLUSTER_SECRET={}",
            crate::support::key_b64("stop-test")
        ),
        &image,
    ]);
    let start = Instant::now();
    while !logs(&name).contains("DNS listening") && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(POLL);
    }
    assert_eq!(
        must(&["inspect", "-f", "{{.State.Running}}", &name]),
        "true",
        "glued run exited on its own"
    );
    let stopping = Instant::now();
    must(&["stop", &name]);
    let took = stopping.elapsed();
    assert!(
        took < STOP_LIMIT,
        "`docker stop` took {took:?} (limit {STOP_LIMIT:?}): SIGTERM not handled as PID 1?"
    );
    assert_eq!(
        must(&["inspect", "-f", "{{.State.ExitCode}}", &name]),
        "0",
        "glued did not exit 0 on SIGTERM"
    );
}

/// Issue 5 item 4: three hosts, one engine. See the module comment.
#[test]
fn three_hosts_resolve_each_other_and_survive_partition_and_restart() {
    if let Some(reason) = docker_missing() {
        println!("skipped: {reason}");
        return;
    }
    let t0 = Instant::now();
    let step = |what: &str| println!("[e2e {:>6.1?}] {what}", t0.elapsed());
    let mut cleanup = Cleanup::new();
    ensure_busybox();
    let image = build_image(&mut cleanup);
    let tag = unique("ge2e");
    let secret = glued::config::ClusterKey::generate().unwrap().to_base64();

    step("networks, volumes, ids");
    let backbone = format!("{tag}-backbone");
    must(&["network", "create", &backbone]);
    cleanup.add(Kind::Network, &backbone);
    let mut hosts = Vec::new();
    for n in 1..=3 {
        let network = format!("{tag}-host{n}");
        let prefix = create_host_network(&mut cleanup, &network);
        let volume = format!("{tag}-data{n}");
        must(&["volume", "create", &volume]);
        cleanup.add(Kind::Volume, &volume);
        let id = glued_id(&image, &volume);
        hosts.push(Host {
            n,
            glued_ip: format!("{prefix}.2"),
            prefix,
            network,
            glued: format!("{tag}-glued{n}"),
            volume,
            client: format!("{tag}-client{n}"),
            id,
        });
    }
    assert_ne!(hosts[0].id, hosts[1].id, "two volumes gave one endpoint id");

    step("three Glued, three clients");
    for (i, host) in hosts.iter().enumerate() {
        let peers: Vec<&Host> = hosts
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, h)| h)
            .collect();
        cleanup.add(Kind::Container, &host.glued);
        cleanup.log_on_failure.push(host.glued.clone());
        start_glued(&image, &backbone, &secret, host, &peers);
    }
    for host in &hosts {
        start_busybox(
            &mut cleanup,
            &host.client,
            &host.network,
            Some(&host.glued_ip),
        );
    }
    let [h1, h2, h3] = [&hosts[0], &hosts[1], &hosts[2]];
    let web = |n: usize| format!("{tag}-web{n}");
    for host in &hosts {
        start_busybox(&mut cleanup, &web(host.n), &host.network, None);
    }

    step("local names: each client resolves its own host's container under the domain");
    for host in &hosts {
        // Under the domain, so Docker's embedded DNS forwards it to Glued
        // (a bare name on the client's own network Docker answers itself).
        let name = format!("{}.glued.internal", web(host.n));
        let expected = ip_on(&web(host.n), &host.network);
        wait_lookup(&host.client, &name, CONVERGE, "local name", |a| {
            a == [expected]
        });
    }

    step("cross-host: the client on host 1 resolves containers of hosts 2 and 3");
    for host in [h2, h3] {
        let expected = ip_on(&web(host.n), &host.network);
        let (_, took) = wait_lookup(&h1.client, &web(host.n), CONVERGE, "cross-host name", |a| {
            a == [expected]
        });
        println!("    {} resolved on host 1 after {took:?}", web(host.n));
        // And under the name of the host it runs on.
        let per_host = format!("{}.h{}.glued.internal", web(host.n), host.n);
        wait_lookup(&h1.client, &per_host, PROPAGATE, "per-host name", |a| {
            a == [expected]
        });
    }
    // The log line the README's procedure relies on (h2 and h3 start after
    // h1, so their bootstrap peer h1 is there to authenticate with).
    for host in [h2, h3] {
        let text = logs(&host.glued);
        assert!(
            text.contains(&format!("Authenticated with bootstrap peer {}", h1.id)),
            "{} does not log `Authenticated with bootstrap peer {}`",
            host.glued,
            h1.id
        );
    }
    // A name under another host's node name is not answered for this one.
    let wrong_host = format!("{}.h3.glued.internal", web(2));
    assert!(
        lookup(&h1.client, &wrong_host).is_empty(),
        "{wrong_host} resolved though web2 runs on h2"
    );

    step("start and stop on host 2 follow on host 1");
    let late = format!("{tag}-late2");
    start_busybox(&mut cleanup, &late, &h2.network, None);
    let late_ip = ip_on(&late, &h2.network);
    let (_, took) = wait_lookup(
        &h1.client,
        &late,
        PROPAGATE,
        "container started on host 2",
        |a| a == [late_ip],
    );
    println!("    started container resolved on host 1 after {took:?}");
    must(&["stop", "-t", "0", &late]);
    let (_, took) = wait_lookup(
        &h1.client,
        &late,
        PROPAGATE,
        "container stopped on host 2",
        |a| a.is_empty(),
    );
    println!("    stopped container gone on host 1 after {took:?}");
    must(&["start", &late]);
    let late_ip = ip_on(&late, &h2.network);
    wait_lookup(
        &h1.client,
        &late,
        PROPAGATE,
        "container restarted on host 2",
        |a| a == [late_ip],
    );

    step("move: a container leaves host 2's network and joins host 3's");
    must(&["network", "disconnect", &h2.network, &late]);
    must(&["network", "connect", &h3.network, &late]);
    let moved_ip = ip_on(&late, &h3.network);
    let (_, took) = wait_lookup(&h1.client, &late, PROPAGATE, "moved container", |a| {
        a == [moved_ip]
    });
    println!("    moved container resolved at its new address after {took:?}");
    let per_host = format!("{late}.h2.glued.internal");
    wait_lookup(
        &h1.client,
        &per_host,
        PROPAGATE,
        "moved away from h2",
        |a| a.is_empty(),
    );

    step("partition: host 3's Glued leaves the backbone");
    let web3_ip = ip_on(&web(3), &h3.network);
    let web1_ip = ip_on(&web(1), &h1.network);
    must(&["network", "disconnect", &backbone, &h3.glued]);
    let cut = Instant::now();
    let local3 = format!("{}.glued.internal", web(3));
    // Host 1 drops host 3's records after the lease; meanwhile and after,
    // host 3 keeps answering its own names.
    let (_, took) = wait_lookup(
        &h1.client,
        &web(3),
        Duration::from_secs(LEASE_SECS * 4),
        "records of the partitioned host after the lease",
        |a| a.is_empty(),
    );
    println!("    host 3's records dropped on host 1 after {took:?} (lease {LEASE_SECS} s)");
    // Dropped by the lease (counted from the last heartbeat, so up to a
    // heartbeat early), not at once on the cut.
    assert!(
        cut.elapsed() >= Duration::from_secs(LEASE_SECS) / 2,
        "host 3's records vanished on host 1 after {took:?}, before the lease of {LEASE_SECS} s"
    );
    assert_eq!(
        lookup(&h3.client, &local3),
        vec![web3_ip],
        "partitioned host 3 stopped answering its local name"
    );
    step("heal: host 3 rejoins the backbone and everything converges");
    must(&["network", "connect", &backbone, &h3.glued]);
    let (_, took) = wait_lookup(
        &h1.client,
        &web(3),
        CONVERGE,
        "host 3 back on host 1",
        |a| a == [web3_ip],
    );
    println!("    host 3's records back on host 1 after {took:?}");
    let (_, took) = wait_lookup(
        &h3.client,
        &web(1),
        CONVERGE,
        "host 1 back on host 3",
        |a| a == [web1_ip],
    );
    println!("    host 1's records back on host 3 after {took:?}");
    wait_lookup(
        &h3.client,
        &web(2),
        CONVERGE,
        "host 2 back on host 3",
        |a| in_subnet(a, &h2.prefix),
    );

    step("restart: host 2's Glued killed and re-created on the same volume");
    let web2_ip = ip_on(&web(2), &h2.network);
    let backbone_ip_before = ip_on(&h2.glued, &backbone);
    must(&["kill", &h2.glued]);
    let killed = Instant::now();
    must(&["rm", "-f", &h2.glued]);
    let peers: Vec<&Host> = vec![h1, h3];
    start_glued(&image, &backbone, &secret, h2, &peers);
    println!(
        "    host 2's Glued on the backbone at {backbone_ip_before}, after the restart at {}",
        ip_on(&h2.glued, &backbone)
    );
    // Poll host 1 through the restart and well past it: host 2's names
    // must never vanish there.
    let window = Duration::from_secs(LEASE_SECS + 5);
    let mut misses = Vec::new();
    let mut n_polls = 0;
    while killed.elapsed() < window {
        let answer = lookup(&h1.client, &web(2));
        n_polls += 1;
        if answer != [web2_ip] {
            misses.push((killed.elapsed(), answer));
        }
        std::thread::sleep(POLL);
    }
    assert!(
        misses.is_empty(),
        "host 2's name vanished on host 1 during its Glued's restart ({} of {n_polls} polls): {misses:?}",
        misses.len()
    );
    let restarted_logs = logs(&h2.glued);
    assert!(
        restarted_logs
            .lines()
            .any(|l| l.contains("Gossip endpoint created") && l.contains(&h2.id)),
        "restarted Glued does not log `Gossip endpoint created` with its old id {}",
        h2.id
    );
    assert_eq!(
        glued_id(&image, &h2.volume),
        h2.id,
        "endpoint id changed across the restart"
    );
    // The restarted node's new announcements are accepted (not taken for
    // replays of its previous life).
    let after = format!("{tag}-after2");
    start_busybox(&mut cleanup, &after, &h2.network, None);
    let after_ip = ip_on(&after, &h2.network);
    wait_lookup(
        &h1.client,
        &after,
        PROPAGATE,
        "container started after the restart",
        |a| a == [after_ip],
    );

    step("the cluster secret appears in no log");
    for host in &hosts {
        assert!(
            !logs(&host.glued).contains(&secret),
            "{} logged the cluster secret",
            host.glued
        );
    }

    step("done");
}
