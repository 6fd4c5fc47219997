//! Integration test: a restarted node announces its own state only after
//! its first Docker resynchronisation (SPEC §7, issue 9 item 5), so its
//! peers never see its containers' names blink while the engine is slow to
//! answer.
//!
//! The engine is the real one, reached through a proxy in this test that
//! holds every connection until [`ENGINE_DELAY`] after its own start before
//! passing it on: an engine busy for a while, as on a loaded host.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::cluster::{dns_has, spawn_glued_at, wait_until};
use crate::docker::{Ctr, Net, docker_ready};
use crate::support;

/// How long after its start the proxy begins to pass connections on; below
/// the Docker thread's request timeout (5 s), well above the gossip
/// thread's shortest settle time (0.5 s).
const ENGINE_DELAY: Duration = Duration::from_secs(3);
/// The engine socket the proxy forwards to.
const ENGINE: &str = "/var/run/docker.sock";

/// A Unix socket that forwards to the engine once `delay` has passed since
/// its start; stops accepting on drop.
struct SlowEngine {
    path: String,
    stop: Arc<AtomicBool>,
}

impl SlowEngine {
    fn start(path: &str, delay: Duration) -> SlowEngine {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind the proxy socket");
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let opens = Instant::now() + delay;
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        std::thread::spawn(move || forward_from(client, opens));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        SlowEngine {
            path: path.to_owned(),
            stop,
        }
    }
}

impl Drop for SlowEngine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Waits until `opens`, then copies bytes both ways between `client` and
/// the engine until either side closes.
fn forward_from(client: UnixStream, opens: Instant) {
    client.set_nonblocking(false).unwrap();
    std::thread::sleep(opens.saturating_duration_since(Instant::now()));
    let Ok(engine) = UnixStream::connect(ENGINE) else {
        return;
    };
    let (mut c_read, mut e_write) = (client.try_clone().unwrap(), engine.try_clone().unwrap());
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_read, &mut e_write);
        let _ = e_write.shutdown(std::net::Shutdown::Write);
    });
    let (mut e_read, mut c_write) = (engine, client);
    let _ = std::io::copy(&mut e_read, &mut c_write);
    let _ = c_write.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}

#[test]
fn a_restart_behind_a_slow_engine_never_drops_its_containers_at_the_peers() {
    if !docker_ready() {
        return;
    }
    let _serial = support::serial();
    let net = Net::create(&[]);
    let ctr = Ctr::run("ready", &["--network", &net.name]);
    let dirs = [support::data_dir(), support::data_dir()];
    let ids: Vec<String> = dirs
        .iter()
        .map(|d| glued::gossip::local_id(d).unwrap())
        .collect();
    let addrs: Vec<std::net::SocketAddr> = (0..2)
        .map(|_| ([127, 0, 0, 1], crate::cluster::free_port()).into())
        .collect();
    let slow = format!("{}/engine.sock", dirs[1].display());
    // A long lease: B's old records stay at A while B restarts. Only B
    // watches the engine (A watches a network that does not exist).
    let env = |i: usize, docker_host: Option<&str>| {
        let mut env = vec![
            ("GLUED_LEASE_SECS", "15".to_string()),
            (
                "GLUED_BOOTSTRAP_PEERS",
                format!("{}@{}", ids[1 - i], addrs[1 - i]),
            ),
        ];
        if let Some(host) = docker_host {
            env.push(("GLUED_NETWORK_NAME", net.name.clone()));
            env.push(("DOCKER_HOST", host.to_string()));
        }
        env
    };
    let direct = format!("unix://{ENGINE}");
    let a = spawn_glued_at("ready-a", &dirs[0], &env(0, None), "from-a", addrs[0]);
    let mut b = spawn_glued_at(
        "ready-b",
        &dirs[1],
        &env(1, Some(&direct)),
        "from-b",
        addrs[1],
    );
    let log = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(15), || dns_has(a.dns, &ctr.name)
            == Some(true)
            && dns_has(a.dns, "from-b") == Some(true)),
        "A never answered B's container; A's log:\n{}\nB's log:\n{}",
        log(&a.log),
        log(&b.log)
    );

    // B crashes and comes back behind an engine that answers after 3 s.
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    let _engine = SlowEngine::start(&slow, ENGINE_DELAY);
    let restarted = Instant::now();
    b = spawn_glued_at(
        "ready-b",
        &dirs[1],
        &env(1, Some(&format!("unix://{slow}"))),
        "from-b-again",
        addrs[1],
    );
    // Until B's new state reached A (its new static record) and a while
    // after, A answers B's container without a gap.
    let mut checks = 0;
    let mut arrived: Option<Instant> = None;
    let mut arrived_after = Duration::ZERO;
    while arrived.is_none_or(|t| t.elapsed() < Duration::from_secs(1)) {
        assert!(
            restarted.elapsed() < Duration::from_secs(20),
            "B's new state never reached A; A's log:\n{}\nB's log:\n{}",
            log(&a.log),
            log(&b.log)
        );
        assert_eq!(
            dns_has(a.dns, &ctr.name),
            Some(true),
            "A lost B's container name {:?} after B's restart; A's log:\n{}\nB's log:\n{}",
            restarted.elapsed(),
            log(&a.log),
            log(&b.log)
        );
        if arrived.is_none() && dns_has(a.dns, "from-b-again") == Some(true) {
            arrived = Some(Instant::now());
            arrived_after = restarted.elapsed();
        }
        checks += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(checks > 100, "only {checks} checks");
    // B's state waited for the slow engine, and B found its container
    // through it.
    assert!(
        arrived_after >= ENGINE_DELAY,
        "B's new state reached A {arrived_after:?} after its restart, before its engine answered"
    );
    assert_eq!(dns_has(b.dns, &ctr.name), Some(true));
}
