//! Integration tests: `dns_bind = "auto"` (the default) in a network
//! namespace the test creates, next to a process holding systemd-resolved's
//! 127.0.0.53:53, with the real Docker engine: the built binary runs
//! inside the namespace (`ip netns exec`), serves 127.0.0.1:53 and the
//! gateway of each watched Docker network, and follows networks created
//! and removed after it started.
//!
//! Its /etc/resolv.conf (through /etc/netns/NAME) lists only the stub, so
//! the upstreams must come from systemd-resolved's own file, and the log
//! says so.
//!
//! The Docker bridges live in the host's namespace; the test puts each
//! gateway address on the loopback interface of its namespace, so queries to
//! it take the real path there. Without `ip`, namespaces or Docker the test
//! prints why and skips, except with CI=true, where it fails.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;

use crate::process::{Glued, START_TIMEOUT, addresses, tcp_ask, udp_ask_from};
use crate::support::{in_ci, unique};

/// The bound for a listener to follow a network.
const FOLLOW_BOUND: Duration = Duration::from_secs(2);
/// The static record every listener must answer.
const PROBE: &str = "probe.glued.internal.";
const PROBE_IP: &str = "10.9.8.7";

/// Runs a command; Err with its stderr when it fails.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace with loopback up, which also takes the Docker
/// gateway addresses; deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Result<Netns, String> {
        let ns = Netns {
            name: unique("glb"),
        };
        run("ip", &["netns", "add", &ns.name])?;
        // From here on, dropping `ns` deletes it.
        run("ip", &["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Makes `ip netns exec` show `text` as /etc/resolv.conf inside the
    /// namespace (it bind-mounts /etc/netns/NAME/resolv.conf there).
    fn set_resolv_conf(&self, text: &str) {
        let dir = self.etc_dir();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), text).unwrap();
    }

    fn etc_dir(&self) -> std::path::PathBuf {
        std::path::Path::new("/etc/netns").join(&self.name)
    }

    fn add_address(&self, ip: Ipv4Addr) {
        let addr = format!("{ip}/32");
        run("ip", &["-n", &self.name, "addr", "add", &addr, "dev", "lo"]).unwrap();
    }

    /// Runs `f` on a thread inside the namespace (sockets it creates live
    /// there).
    fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let file = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on a valid namespace fd; affects this thread only.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }

    /// Whether `server` answers the probe over UDP and over TCP, asked
    /// from inside the namespace.
    fn answers(&self, server: SocketAddr) -> (bool, bool) {
        self.run_in(move || {
            let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
            let udp = udp_ask_from(any, server, PROBE, RecordType::A)
                .is_some_and(|m| addresses(&m) == [PROBE_IP]);
            let tcp = matches!(tcp_ask(server, PROBE, RecordType::A),
                Ok(Some(m)) if addresses(&m) == [PROBE_IP]);
            (udp, tcp)
        })
    }

    /// Waits up to `bound` until `server` answers over both (`want`) or
    /// over neither (`!want`); the time it took.
    fn wait_answers(&self, server: SocketAddr, want: bool, bound: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let got = self.answers(server);
            if got == (want, want) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < bound,
                "{server}: UDP/TCP answering {got:?} after {bound:?}, wanted {want}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
        let _ = std::fs::remove_dir_all(self.etc_dir());
    }
}

/// A Docker network removed on drop (unless already removed).
struct Net {
    name: String,
    gateway: Ipv4Addr,
}

impl Net {
    fn create(name: String) -> Result<Net, String> {
        run("docker", &["network", "create", &name])?;
        let gateway = run(
            "docker",
            &[
                "network",
                "inspect",
                "-f",
                "{{range .IPAM.Config}}{{.Gateway}} {{end}}",
                &name,
            ],
        )
        .and_then(|out| {
            out.split_whitespace()
                .find_map(|w| w.parse::<Ipv4Addr>().ok())
                .ok_or(format!("network {name} has no IPv4 gateway: {out:?}"))
        });
        match gateway {
            Ok(gateway) => Ok(Net { name, gateway }),
            Err(e) => {
                let _ = run("docker", &["network", "rm", &name]);
                Err(e)
            }
        }
    }

    fn remove(&self) {
        run("docker", &["network", "rm", &self.name]).unwrap();
    }

    fn dns(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.gateway), 53)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["network", "rm", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The namespace and a first watched network, or why they cannot be had.
fn setup() -> Result<(Netns, Net), String> {
    run("docker", &["info", "-f", "{{.ServerVersion}}"])?;
    let ns = Netns::create()?;
    let net = Net::create(unique("glued-bind-net"))?;
    Ok((ns, net))
}

#[test]
fn auto_bind_serves_loopback_and_follows_docker_gateways_next_to_resolved() {
    let (ns, first) = match setup() {
        Ok(s) => s,
        Err(e) if !in_ci() => {
            eprintln!("skipped: {e}");
            return;
        }
        Err(e) => panic!("auto bind test cannot run in CI: {e}"),
    };
    ns.add_address(first.gateway);
    // systemd-resolved's stub, alone in resolv.conf, and its address held
    // over UDP and TCP.
    ns.set_resolv_conf("nameserver 127.0.0.53\noptions edns0 trust-ad\n");
    let stub: SocketAddr = "127.0.0.53:53".parse().unwrap();
    let (_stub_udp, _stub_tcp) = ns.run_in(move || {
        (
            UdpSocket::bind(stub).expect("hold 127.0.0.53:53/udp"),
            TcpListener::bind(stub).expect("hold 127.0.0.53:53/tcp"),
        )
    });
    // Watched: the first network, and one that does not exist yet.
    let later_name = unique("glued-bind-net");
    let networks = format!("{},{later_name}", first.name);
    let docker_host = std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| h.starts_with("unix://"))
        .unwrap_or_else(|| "unix:///var/run/docker.sock".into());
    let toml = format!("[[records]]\nname = \"probe\"\nip = \"{PROBE_IP}\"\n");
    let key = crate::support::key_b64("bind-test-secret");
    let mut glued = Glued::start(
        &["ip", "netns", "exec", &ns.name],
        &toml,
        &[
            // No GLUED_DNS_BIND: `auto` is the default.
            ("DOCKER_HOST", &docker_host),
            ("GLUED_NETWORK_NAME", &networks),
            ("GLUED_HTTP_BIND", "127.0.0.1:0"),
            ("GLUED_GOSSIP_BIND", "127.0.0.1:0"),
            ("GLUED_MDNS", "false"),
            // The gateway's clients may have any address.
            ("GLUED_ALLOW_NETS", "0.0.0.0/0"),
            ("GLUED_CLUSTER_SECRET", &key),
            ("GLUED_NODE_NAME", "bind-test"),
        ],
    );
    let line = glued.wait_for("DNS listening on udp ", START_TIMEOUT);
    glued.wait_for(
        "upstreams from /run/systemd/resolve/resolv.conf",
        Duration::ZERO,
    );
    assert!(line.contains("udp 127.0.0.1:53 tcp 127.0.0.1:53"), "{line}");
    assert_eq!(ns.answers("127.0.0.1:53".parse().unwrap()), (true, true));
    ns.wait_answers(first.dns(), true, START_TIMEOUT);

    // A watched network created after start: a listener within the bound.
    let later = Net::create(later_name).unwrap();
    let created = Instant::now();
    ns.add_address(later.gateway);
    ns.wait_answers(
        later.dns(),
        true,
        FOLLOW_BOUND.saturating_sub(created.elapsed()),
    );

    // Removed: its listener goes (the address stays, so the port is
    // simply closed), the others stay.
    later.remove();
    ns.wait_answers(later.dns(), false, FOLLOW_BOUND);
    glued.wait_for(
        &format!("DNS stopped serving on {}", later.dns()),
        Duration::from_secs(1),
    );
    assert_eq!(ns.answers(first.dns()), (true, true));
    assert_eq!(ns.answers("127.0.0.1:53".parse().unwrap()), (true, true));
}

#[test]
fn an_explicit_address_list_is_served_as_given() {
    let toml = format!("[[records]]\nname = \"probe\"\nip = \"{PROBE_IP}\"\n");
    let network = unique("glued-bind-absent");
    let key = crate::support::key_b64("bind-test-secret");
    let mut glued = Glued::start(
        &[],
        &toml,
        &[
            ("GLUED_DNS_BIND", "127.0.0.1:0, 127.0.0.2:0"),
            ("GLUED_HTTP_BIND", "127.0.0.1:0"),
            ("GLUED_GOSSIP_BIND", "127.0.0.1:0"),
            ("GLUED_MDNS", "false"),
            ("GLUED_UPSTREAMS", "none"),
            ("GLUED_NETWORK_NAME", &network),
            (
                "GLUED_DOCKER_HOST",
                "unix:///nonexistent/glued-bind-test.sock",
            ),
            ("GLUED_CLUSTER_SECRET", &key),
        ],
    );
    glued.wait_for("DNS listening on udp ", START_TIMEOUT);
    let log = glued.log();
    let served: Vec<SocketAddr> = log
        .lines()
        .filter(|l| l.contains("DNS serving on "))
        .map(|l| crate::process::addr_after(l, "DNS serving on "))
        .collect();
    assert_eq!(served.len(), 2, "{log}");
    for (server, ip) in served.iter().zip(["127.0.0.1", "127.0.0.2"]) {
        assert_eq!(server.ip().to_string(), ip);
        let from = server.ip();
        let udp = udp_ask_from(from, *server, PROBE, RecordType::A).expect("UDP answer");
        assert_eq!(addresses(&udp), [PROBE_IP]);
        let tcp = tcp_ask(*server, PROBE, RecordType::A)
            .unwrap()
            .expect("TCP answer");
        assert_eq!(addresses(&tcp), [PROBE_IP]);
    }
}
