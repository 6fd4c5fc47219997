//! Integration tests: the Docker watcher against the real engine.
//!
//! Every test creates its own uniquely named network(s) and containers from
//! the offline image `glued-test-busybox` (tests/images/build-busybox.sh),
//! removes them through Drop guards even when it fails, and never touches
//! the engine itself. Without Docker they print why and skip, except when
//! CI=true, where they fail.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use glued::config::{Config, StaticRecord};
use glued::dns::DnsServer;
use glued::dns::forward::Forwarder;
use glued::docker::{Docker, DockerStats};
use glued::registry::{Registry, RegistryMsg, RegistryStats};
use glued::table::{self, Group, Origin, SharedTable, Source, SourceKind};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use smallvec::smallvec;

use crate::support::{in_ci, test_config, unique};

/// The local test image.
const IMAGE: &str = "glued-test-busybox";
/// How long a change may take to reach the table (the bound).
const FOLLOW: Duration = Duration::from_secs(1);
/// How long a resync after an engine outage may take (backoff included).
const CONVERGE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- helpers

/// True when the engine and the test image are usable; otherwise prints why
/// (or panics in CI).
pub(crate) fn docker_ready() -> bool {
    static WHY: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let why = WHY.get_or_init(|| {
        match Command::new("docker")
            .args(["info", "-f", "{{.ServerVersion}}"])
            .output()
        {
            Err(e) => Some(format!("docker CLI not runnable: {e}")),
            Ok(o) if !o.status.success() => Some(format!(
                "docker engine not reachable: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Ok(_) => {
                let has_image = Command::new("docker")
                    .args(["image", "inspect", IMAGE])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                let built = has_image
                    || Command::new(concat!(
                        env!("CARGO_MANIFEST_DIR"),
                        "/tests/images/build-busybox.sh"
                    ))
                    .status()
                    .is_ok_and(|s| s.success());
                (!built)
                    .then(|| format!("image {IMAGE} missing: run tests/images/build-busybox.sh"))
            }
        }
    });
    match why.clone() {
        None => true,
        Some(why) if in_ci() => panic!("Docker test cannot run in CI: {why}"),
        Some(why) => {
            eprintln!("skipped: {why}");
            false
        }
    }
}

/// Runs `docker args…`, panics on failure, returns trimmed stdout.
pub(crate) fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("run docker");
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Runs `docker args…` ignoring the outcome (cleanup).
pub(crate) fn docker_quiet(args: &[&str]) {
    let _ = Command::new("docker")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A network removed on drop (declare it before its containers).
pub(crate) struct Net {
    pub(crate) name: String,
}

impl Net {
    pub(crate) fn create(extra: &[&str]) -> Net {
        let name = unique("gt-net");
        let mut args = vec!["network", "create"];
        args.extend_from_slice(extra);
        args.push(&name);
        docker(&args);
        Net { name }
    }

    /// A network with an IPv4 subnet from Docker and a unique ULA /64.
    fn create_dual_stack() -> Net {
        let subnet = format!(
            "fd67:{:x}:{:x}::/64",
            std::process::id() & 0xffff,
            fastrand::u16(..)
        );
        Net::create(&["--ipv6", "--subnet", &subnet])
    }

    fn gateway_v4(&self) -> Ipv4Addr {
        docker(&[
            "network",
            "inspect",
            "-f",
            "{{range .IPAM.Config}}{{.Gateway}} {{end}}",
            &self.name,
        ])
        .split_whitespace()
        .find_map(|s| s.parse().ok())
        .expect("IPv4 gateway")
    }

    fn subnet_v4(&self) -> String {
        docker(&[
            "network",
            "inspect",
            "-f",
            "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
            &self.name,
        ])
        .split_whitespace()
        .find(|s| s.contains('.'))
        .expect("IPv4 subnet")
        .to_owned()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        docker_quiet(&["network", "rm", &self.name]);
    }
}

/// A container removed on drop.
pub(crate) struct Ctr {
    pub(crate) name: String,
    pub(crate) id: String,
}

impl Ctr {
    /// `docker run -d --name NAME extra… IMAGE sleep 3600`.
    pub(crate) fn run(prefix: &str, extra: &[&str]) -> Ctr {
        let name = unique(prefix);
        let mut args = vec!["run", "-d", "--name", &name];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[IMAGE, "sleep", "3600"]);
        let id = docker(&args);
        Ctr { name, id }
    }

    fn short_id(&self) -> &str {
        &self.id[..12]
    }

    /// The addresses `docker inspect` reports on `net`.
    pub(crate) fn addrs(&self, net: &Net) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
        let f = format!(
            "{{{{with index .NetworkSettings.Networks \"{}\"}}}}{{{{.IPAddress}}}} {{{{.GlobalIPv6Address}}}}{{{{end}}}}",
            net.name
        );
        let out = docker(&["inspect", "-f", &f, &self.id]);
        let mut v4 = vec![];
        let mut v6 = vec![];
        for word in out.split_whitespace() {
            match word.parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) => v4.push(ip),
                Ok(IpAddr::V6(ip)) => v6.push(ip),
                Err(_) => {}
            }
        }
        (v4, v6)
    }
}

impl Drop for Ctr {
    fn drop(&mut self) {
        docker_quiet(&["rm", "-f", "-v", &self.id]);
    }
}

/// A `socat` proxy in front of the engine socket, in its own process group
/// so that killing it also ends the connections it forked.
struct Proxy {
    path: String,
    child: Option<Child>,
}

impl Proxy {
    fn start(path: &str) -> Proxy {
        use std::os::unix::process::CommandExt;
        let _ = std::fs::remove_file(path);
        let child = Command::new("socat")
            .arg(format!("UNIX-LISTEN:{path},fork"))
            .arg("UNIX-CONNECT:/var/run/docker.sock")
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat (apt-get install socat)");
        assert!(
            wait_until(Duration::from_secs(5), || std::path::Path::new(path)
                .exists()),
            "socat did not create {path}"
        );
        Proxy {
            path: path.to_owned(),
            child: Some(child),
        }
    }

    /// Kills the proxy and every connection it forked (its process group).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pgid = child.id() as libc::pid_t;
            // SAFETY: plain syscall on the process group we created.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` until it holds or `timeout` passes.
pub(crate) fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    loop {
        if f() {
            return true;
        }
        if t0.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Registry + table + Docker watcher (+ optionally the DNS server), in
/// process; stopped on drop.
struct Glued {
    table: SharedTable,
    stats: Arc<DockerStats>,
    origin: Origin,
    registry: Option<Registry>,
    docker: Option<Docker>,
    dns: Option<(DnsServer, Forwarder)>,
    dns_addr: Option<SocketAddr>,
}

impl Glued {
    fn start(config: &Config, with_dns: bool) -> Glued {
        let _ = env_logger::builder().is_test(true).try_init();
        let table = table::shared(&config.domain, config.ttl_secs);
        let origin = Origin {
            id: "test-node".into(),
            node_name: config.node_name.as_str().into(),
        };
        let registry = Registry::spawn(
            table.clone(),
            Arc::new(RegistryStats::default()),
            origin.id.clone(),
            None,
        );
        let statics = config
            .records
            .iter()
            .map(|r| {
                let mut g = Group {
                    names: smallvec![r.name.as_str().into()],
                    ..Group::default()
                };
                match r.ip {
                    IpAddr::V4(ip) => g.v4.push(ip),
                    IpAddr::V6(ip) => g.v6.push(ip),
                }
                (
                    Source::Static {
                        name: r.name.as_str().into(),
                    },
                    g,
                )
            })
            .collect();
        registry
            .tx
            .send(RegistryMsg::Replace {
                origin: origin.clone(),
                kind: Some(SourceKind::Static),
                groups: statics,
            })
            .unwrap();
        let (dns, dns_addr) = if with_dns {
            let forwarder = Forwarder::start(config, Default::default()).unwrap();
            let dns =
                DnsServer::start(config, table.clone(), forwarder.clone(), Default::default())
                    .unwrap();
            let addr = dns.udp_addr;
            (Some((dns, forwarder)), Some(addr))
        } else {
            (None, None)
        };
        let stats = Arc::new(DockerStats::default());
        let docker =
            Docker::start(config, origin.clone(), registry.tx.clone(), stats.clone()).unwrap();
        Glued {
            table,
            stats,
            origin,
            registry: Some(registry),
            docker: Some(docker),
            dns,
            dns_addr,
        }
    }

    /// Stops the Docker thread alone; returns how long it took.
    fn stop_docker(&mut self) -> Duration {
        let t0 = Instant::now();
        if let Some(d) = self.docker.take() {
            d.stop();
        }
        t0.elapsed()
    }

    fn wait_connected(&self) {
        assert!(
            wait_until(CONVERGE, || self.stats.connected.load(Ordering::Relaxed)
                == 1),
            "the Docker watcher did not connect"
        );
    }

    /// (v4, v6) the table answers for a name relative to the domain.
    fn lookup(&self, name: &str) -> Option<(Vec<Ipv4Addr>, Vec<Ipv6Addr>)> {
        let t = self.table.load();
        t.lookup(name.as_bytes())
            .map(|e| (e.v4().to_vec(), e.v6().to_vec()))
    }

    /// Waits until `name` answers exactly `want` (None: unknown).
    fn expect(&self, name: &str, want: Option<&(Vec<Ipv4Addr>, Vec<Ipv6Addr>)>, within: Duration) {
        let want = want.map(|(a, b)| (sorted(a), sorted(b)));
        let ok = wait_until(within, || {
            self.lookup(name).map(|(a, b)| (sorted(&a), sorted(&b))) == want
        });
        assert!(
            ok,
            "{name}: table has {:?} after {within:?}, want {want:?}",
            self.lookup(name)
        );
    }

    /// The names of this node's group for one container on one network.
    fn group_names(&self, id: &str, network: &str) -> Option<Vec<String>> {
        let t = self.table.load();
        t.groups
            .get(&(
                self.origin.clone(),
                Source::Container {
                    id: id.into(),
                    network: network.into(),
                },
            ))
            .map(|g| g.names.iter().map(|n| n.to_string()).collect())
    }
}

impl Drop for Glued {
    fn drop(&mut self) {
        if let Some(d) = self.docker.take() {
            d.stop();
        }
        if let Some((dns, fwd)) = self.dns.take() {
            dns.stop();
            fwd.stop();
        }
        if let Some(r) = self.registry.take() {
            r.stop();
        }
    }
}

fn sorted<T: Ord + Clone>(v: &[T]) -> Vec<T> {
    let mut v = v.to_vec();
    v.sort();
    v
}

fn config_watching(networks: &[&str]) -> Config {
    let mut c = test_config();
    c.networks = networks.iter().map(|s| s.to_string()).collect();
    c
}

/// One UDP query; returns the answer's addresses (A/AAAA) and PTR targets.
fn query(server: SocketAddr, name: &str, rtype: RecordType) -> Option<(Vec<IpAddr>, Vec<String>)> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut msg = Message::query();
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    sock.send_to(&msg.to_vec().unwrap(), server).unwrap();
    let mut buf = [0u8; 1500];
    let n = sock.recv(&mut buf).ok()?;
    let reply = Message::from_vec(&buf[..n]).ok()?;
    let mut ips = vec![];
    let mut ptrs = vec![];
    for r in &reply.answers {
        match &r.data {
            RData::A(a) => ips.push(IpAddr::V4(a.0)),
            RData::AAAA(a) => ips.push(IpAddr::V6(a.0)),
            RData::PTR(p) => ptrs.push(p.0.to_ascii()),
            _ => {}
        }
    }
    Some((ips, ptrs))
}

// ------------------------------------------------------------------ tests

#[test]
fn every_name_of_a_container_answers_its_inspected_addresses() {
    if !docker_ready() {
        return;
    }
    let net = Net::create_dual_stack();
    let glued = Glued::start(&config_watching(&[&net.name]), true);
    glued.wait_connected();
    let alias = unique("alias");
    let service = unique("svc");
    let (extra1, extra2) = (unique("extra"), unique("extra"));
    let names_label = format!("glued.names={extra1},{}", extra2.to_uppercase());
    let compose = format!("com.docker.compose.service={service}");
    let web = Ctr::run(
        "web",
        &[
            "--network",
            &net.name,
            "--network-alias",
            &alias,
            "--label",
            &compose,
            "--label",
            &names_label,
        ],
    );
    let hidden = Ctr::run(
        "hidden",
        &["--network", &net.name, "--label", "glued.enable=false"],
    );
    let want = web.addrs(&net);
    assert_eq!(
        (want.0.len(), want.1.len()),
        (1, 1),
        "dual-stack endpoint: {want:?}"
    );
    for name in [
        &web.name,
        &alias,
        &service,
        web.short_id(),
        &extra1,
        &extra2,
    ] {
        glued.expect(name, Some(&want), FOLLOW);
    }
    // Pinned to the node, too.
    glued.expect(&format!("{}.node-a", web.name), Some(&want), FOLLOW);
    // The container name is the primary (PTR target).
    let names = glued.group_names(&web.id, &net.name).unwrap();
    assert_eq!(names[0], web.name);
    let t = glued.table.load();
    for ip in want
        .0
        .iter()
        .map(|ip| IpAddr::V4(*ip))
        .chain(want.1.iter().map(|ip| IpAddr::V6(*ip)))
    {
        assert_eq!(
            t.reverse(&ip).map(|t| t.to_vec()),
            Some(table::name_to_wire(&format!("{}.glued.internal", web.name)).to_vec()),
            "PTR of {ip}"
        );
    }
    // Over DNS: every name, as a single label and under the domain.
    let dns = glued.dns_addr.unwrap();
    let want_ips: Vec<IpAddr> =
        sorted(&want.0.iter().map(|ip| IpAddr::V4(*ip)).collect::<Vec<_>>());
    let want_ips6: Vec<IpAddr> = want.1.iter().map(|ip| IpAddr::V6(*ip)).collect();
    for name in [
        &web.name,
        &alias,
        &service,
        web.short_id(),
        &extra1,
        &extra2,
    ] {
        for fqdn in [
            format!("{name}."),
            format!("{}.glued.internal.", name.to_uppercase()),
        ] {
            let (ips, _) = query(dns, &fqdn, RecordType::A).expect("DNS answer");
            assert_eq!(sorted(&ips), want_ips, "A {fqdn}");
            let (ips, _) = query(dns, &fqdn, RecordType::AAAA).expect("DNS answer");
            assert_eq!(ips, want_ips6, "AAAA {fqdn}");
        }
    }
    let [a, b, c, d] = want.0[0].octets();
    let (_, ptrs) = query(
        dns,
        &format!("{d}.{c}.{b}.{a}.in-addr.arpa."),
        RecordType::PTR,
    )
    .unwrap();
    assert_eq!(ptrs, [format!("{}.glued.internal.", web.name)]);

    // A second container sharing a name: the name answers both.
    let shared = format!("glued.names={extra1}");
    let twin = Ctr::run("twin", &["--network", &net.name, "--label", &shared]);
    let twin_addrs = twin.addrs(&net);
    let both = (
        [want.0.clone(), twin_addrs.0.clone()].concat(),
        [want.1.clone(), twin_addrs.1.clone()].concat(),
    );
    glued.expect(&extra1, Some(&both), FOLLOW);
    let (ips, _) = query(dns, &format!("{extra1}."), RecordType::A).unwrap();
    assert_eq!(
        sorted(&ips),
        sorted(&both.0.iter().map(|ip| IpAddr::V4(*ip)).collect::<Vec<_>>())
    );
    glued.expect(&extra2, Some(&want), FOLLOW);

    // Opted out: no name at all, not even the short id.
    assert!(glued.lookup(&hidden.name).is_none());
    assert!(glued.lookup(hidden.short_id()).is_none());
    assert!(glued.group_names(&hidden.id, &net.name).is_none());
    let (ips, _) = query(
        dns,
        &format!("{}.glued.internal.", hidden.name),
        RecordType::A,
    )
    .unwrap();
    assert!(ips.is_empty());

    let mut metrics = String::new();
    glued.stats.render(&mut metrics);
    assert!(
        metrics.contains("glued_docker_engine_connected 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("glued_docker_containers_watched 2"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("glued_docker_events_total{type=\"container\",action=\"start\"} 0"),
        "{metrics}"
    );
}

#[test]
fn containers_already_running_are_found_at_start() {
    if !docker_ready() {
        return;
    }
    let net = Net::create(&[]);
    let other = Net::create(&[]);
    let early: Vec<Ctr> = (0..4)
        .map(|_| Ctr::run("early", &["--network", &net.name]))
        .collect();
    let b = Ctr::run("elsewhere", &["--network", &other.name]);
    let glued = Glued::start(&config_watching(&[&net.name]), false);
    glued.wait_connected();
    for c in &early {
        glued.expect(&c.name, Some(&c.addrs(&net)), FOLLOW);
    }
    let a = &early[0];
    assert!(glued.lookup(&b.name).is_none(), "unwatched network leaked");
    assert_eq!(glued.stats.resyncs.load(Ordering::Relaxed), 1);
    assert_eq!(glued.stats.containers.load(Ordering::Relaxed), 4);
    let mut glued = glued;
    let took = glued.stop_docker();
    assert!(took < Duration::from_millis(500), "stop took {took:?}");
    // Stopping the watcher keeps the records: the engine did not say they went.
    assert!(glued.lookup(&a.name).is_some());
}

#[test]
fn answers_follow_stop_kill_rename_disconnect_connect_and_remove() {
    if !docker_ready() {
        return;
    }
    let net = Net::create(&[]);
    let glued = Glued::start(&config_watching(&[&net.name]), false);
    glued.wait_connected();
    let mut c = Ctr::run("life", &["--network", &net.name]);
    let addrs = c.addrs(&net);
    glued.expect(&c.name, Some(&addrs), FOLLOW);

    // A signal is not a stop: the name stays.
    docker(&["kill", "-s", "HUP", &c.id]);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(500) {
        assert_eq!(glued.lookup(&c.name).map(|(a, _)| a), Some(addrs.0.clone()));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.Running}}", &c.id]),
        "true"
    );

    let new_name = unique("renamed");
    docker(&["rename", &c.name, &new_name]);
    let old_name = std::mem::replace(&mut c.name, new_name);
    glued.expect(&c.name, Some(&addrs), FOLLOW);
    glued.expect(&old_name, None, FOLLOW);

    docker(&["network", "disconnect", &net.name, &c.id]);
    glued.expect(&c.name, None, FOLLOW);
    glued.expect(c.short_id(), None, FOLLOW);

    docker(&["network", "connect", &net.name, &c.id]);
    let addrs = c.addrs(&net);
    glued.expect(&c.name, Some(&addrs), FOLLOW);

    docker(&["stop", "-t", "0", &c.id]);
    glued.expect(&c.name, None, FOLLOW);

    docker(&["start", &c.id]);
    let addrs = c.addrs(&net);
    glued.expect(&c.name, Some(&addrs), FOLLOW);

    docker(&["rm", "-f", &c.id]);
    glued.expect(&c.name, None, FOLLOW);
    glued.expect(c.short_id(), None, FOLLOW);
    assert_eq!(glued.stats.containers.load(Ordering::Relaxed), 0);
}

#[test]
fn a_watched_network_created_after_start_is_picked_up() {
    if !docker_ready() {
        return;
    }
    let name = unique("gt-late");
    let glued = Glued::start(&config_watching(&[&name]), false);
    glued.wait_connected();
    docker(&["network", "create", &name]);
    let net = Net { name };
    let c = Ctr::run("late", &["--network", &net.name]);
    glued.expect(&c.name, Some(&c.addrs(&net)), FOLLOW);
}

#[test]
fn the_table_converges_after_the_engine_comes_back() {
    if !docker_ready() {
        return;
    }
    if Command::new("socat").arg("-V").output().is_err() {
        assert!(
            !in_ci(),
            "socat missing in CI (.ci/install-test-deps installs it)"
        );
        eprintln!("skipped: socat missing (apt-get install socat)");
        return;
    }
    let net = Net::create(&[]);
    let sock = format!("/tmp/{}.sock", unique("glued-docker-proxy"));
    let mut proxy = Proxy::start(&sock);
    let mut config = config_watching(&[&net.name]);
    config.docker_host = format!("unix://{sock}");
    let static_name = unique("static");
    config.records = vec![StaticRecord {
        name: static_name.clone(),
        ip: "10.9.8.7".parse().unwrap(),
    }];
    let glued = Glued::start(&config, true);
    let dns = glued.dns_addr.unwrap();
    let static_fqdn = format!("{static_name}.glued.internal.");
    let static_ip: Vec<IpAddr> = vec!["10.9.8.7".parse().unwrap()];
    glued.wait_connected();
    let gone = Ctr::run("gone", &["--network", &net.name]);
    let stays = Ctr::run("stays", &["--network", &net.name]);
    glued.expect(&gone.name, Some(&gone.addrs(&net)), FOLLOW);
    glued.expect(&stays.name, Some(&stays.addrs(&net)), FOLLOW);

    proxy.kill();
    assert!(
        wait_until(CONVERGE, || glued.stats.connected.load(Ordering::Relaxed)
            == 0),
        "the watcher did not notice the lost engine"
    );
    // Changes while the engine is unreachable.
    docker(&["rm", "-f", &gone.id]);
    let born = Ctr::run("born", &["--network", &net.name]);
    // Meanwhile the known names are still answered over DNS.
    for _ in 0..10 {
        let (ips, _) =
            query(dns, &static_fqdn, RecordType::A).expect("DNS answers during the outage");
        assert_eq!(ips, static_ip);
        let (ips, _) = query(dns, &format!("{}.", stays.name), RecordType::A).expect("DNS answer");
        assert_eq!(ips.len(), 1);
        std::thread::sleep(Duration::from_millis(30));
    }

    let _proxy = Proxy::start(&sock);
    glued.expect(&born.name, Some(&born.addrs(&net)), CONVERGE);
    glued.expect(&gone.name, None, FOLLOW);
    glued.expect(&stays.name, Some(&stays.addrs(&net)), FOLLOW);
    let (ips, _) = query(dns, &static_fqdn, RecordType::A).expect("DNS answer");
    assert_eq!(ips, static_ip);
    let (ips, _) = query(dns, &format!("{}.", gone.name), RecordType::A).expect("DNS answer");
    assert!(
        ips.is_empty(),
        "removed during the outage, still answered: {ips:?}"
    );
    assert!(glued.stats.reconnects.load(Ordering::Relaxed) >= 1);
    assert!(glued.stats.resyncs.load(Ordering::Relaxed) >= 2);
}

#[test]
fn a_container_resolves_names_through_busybox_nslookup() {
    if !docker_ready() {
        return;
    }
    let net = Net::create(&[]);
    let gateway = net.gateway_v4();
    let mut config = config_watching(&[&net.name]);
    // busybox nslookup only talks to port 53.
    config.dns_bind = SocketAddr::new(IpAddr::V4(gateway), 53);
    config.allow_nets = vec![net.subnet_v4().parse().unwrap()];
    let glued = Glued::start(&config, true);
    glued.wait_connected();
    let target = Ctr::run("target", &["--network", &net.name]);
    let (v4, _) = target.addrs(&net);
    glued.expect(&target.name, Some(&(v4.clone(), vec![])), FOLLOW);
    let client = unique("client");
    for name in [
        target.name.clone(),
        format!("{}.glued.internal", target.short_id()),
    ] {
        let out = docker(&[
            "run",
            "--rm",
            "--name",
            &client,
            "--network",
            &net.name,
            IMAGE,
            "nslookup",
            "-type=a",
            &name,
            &gateway.to_string(),
        ]);
        let want = v4[0].to_string();
        assert!(
            out.lines()
                .any(|l| l.strip_prefix("Address:").map(str::trim) == Some(want.as_str())),
            "nslookup {name} via {gateway}:\n{out}"
        );
    }
}
