//! Liveness of the component threads and of the Docker engine, for
//! `/healthz` and `glued health`.
//!
//! Each component thread owns one [`Heartbeat`] (kept in its stats struct,
//! so no constructor changes): it takes an [`Alive`] guard when it starts
//! and calls [`Heartbeat::beat`] once per loop turn, a relaxed store of a
//! coarse monotonic clock. Every loop wakes at least every
//! [`BEAT_INTERVAL`], so an idle thread still beats. A thread whose last
//! beat is older than [`BEAT_STALE`] is stuck; one whose guard was dropped
//! without [`Alive::retire`] (it returned or panicked) is dead.
//!
//! Invariant: beating never allocates, locks or blocks; only the status
//! thread reads the heartbeats.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Longest sleep of any component loop: every loop turns (and beats) at
/// least this often, busy or idle.
pub const BEAT_INTERVAL: Duration = Duration::from_secs(1);
/// A thread that has not beaten for this long is reported stuck.
pub const BEAT_STALE: Duration = Duration::from_secs(10);
/// Default window within which the Docker engine must have answered
/// (`docker_health_secs`).
pub const DEFAULT_DOCKER_WINDOW: Duration = Duration::from_secs(30);
/// Debug builds only: a thread whose name equals this variable panics when
/// it starts (the test that a panicking component takes the process down).
pub const DEBUG_PANIC_ENV: &str = "GLUED_DEBUG_PANIC_THREAD";

const NOT_STARTED: u64 = 0;
const RETIRED: u64 = u64::MAX - 1;
const EXITED: u64 = u64::MAX;

/// Milliseconds of a coarse monotonic clock (a few ms resolution, a few ns
/// to read); never 0 and below the reserved states.
#[inline]
pub fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    let ms = (ts.tv_sec as u64)
        .wrapping_mul(1000)
        .wrapping_add(ts.tv_nsec as u64 / 1_000_000);
    ms.clamp(1, RETIRED - 1)
}

/// The last sign of life of one component thread.
#[derive(Debug, Default)]
pub struct Heartbeat {
    last_ms: AtomicU64,
    thread: OnceLock<String>,
}

impl Heartbeat {
    /// Records a loop turn of the owning thread.
    #[inline]
    pub fn beat(&self) {
        self.last_ms.store(now_ms(), Relaxed);
    }

    /// Called once by the owning thread when it starts: names the heartbeat
    /// after the thread, beats, and returns the guard that marks the thread
    /// dead when dropped.
    pub fn enter(self: &Arc<Self>) -> Alive {
        let name = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        #[cfg(debug_assertions)]
        if std::env::var(DEBUG_PANIC_ENV).is_ok_and(|t| t == name) {
            panic!("{DEBUG_PANIC_ENV}={name}");
        }
        let _ = self.thread.set(name);
        self.beat();
        Alive {
            beat: self.clone(),
            retired: false,
        }
    }

    /// The owning thread's name, once it has entered.
    pub fn thread(&self) -> Option<&str> {
        self.thread.get().map(String::as_str)
    }

    /// What is wrong with this thread at `now` (from [`now_ms`]), if
    /// anything. A heartbeat never entered belongs to a thread that is not
    /// part of this process's components (or not started yet): no problem.
    pub fn problem(&self, now: u64) -> Option<String> {
        self.silent_for(now, BEAT_STALE)
    }

    /// Like [`Heartbeat::problem`], with `stale` as the longest silence.
    pub fn silent_for(&self, now: u64, stale: Duration) -> Option<String> {
        let name = self.thread.get().map_or("unnamed", String::as_str);
        match self.last_ms.load(Relaxed) {
            NOT_STARTED | RETIRED => None,
            EXITED => Some(format!("thread {name} exited")),
            last => {
                let silent = now.saturating_sub(last);
                (silent > stale.as_millis() as u64).then(|| {
                    format!(
                        "thread {name} stuck: no heartbeat for {:.1} s",
                        silent as f64 / 1000.0
                    )
                })
            }
        }
    }
}

/// Held by a running component thread; dropping it (the thread returned or
/// is unwinding from a panic) marks the thread dead.
pub struct Alive {
    beat: Arc<Heartbeat>,
    retired: bool,
}

impl Alive {
    /// The thread ends on purpose (its component was told to stop): it is no
    /// longer expected to beat.
    pub fn retire(mut self) {
        self.retired = true;
        self.beat.last_ms.store(RETIRED, Relaxed);
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        if !self.retired {
            self.beat.last_ms.store(EXITED, Relaxed);
        }
    }
}

/// When the Docker engine last answered anything (a connection, a list, an
/// inspect, an event, a ping), written by the Docker thread.
#[derive(Debug, Default)]
pub struct EngineContact {
    last_ms: AtomicU64,
}

impl EngineContact {
    /// The engine just answered.
    pub fn answered(&self) {
        self.last_ms.store(now_ms(), Relaxed);
    }

    /// The problem when the engine has not answered within `window`.
    pub fn problem(&self, host: &str, window: Duration, now: u64) -> Option<String> {
        match self.last_ms.load(Relaxed) {
            NOT_STARTED => Some(format!("Docker engine at {host} has not answered yet")),
            last => {
                let silent = now.saturating_sub(last);
                (silent > window.as_millis() as u64).then(|| {
                    format!(
                        "Docker engine at {host} has not answered for {:.1} s (window {} s)",
                        silent as f64 / 1000.0,
                        window.as_secs()
                    )
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_is_stale_after_the_limit_and_dead_after_its_guard() {
        let hb = Arc::new(Heartbeat::default());
        assert_eq!(hb.problem(now_ms()), None, "never entered: not a component");
        let alive = std::thread::Builder::new()
            .name("worker-x".into())
            .spawn({
                let hb = hb.clone();
                move || std::mem::forget(hb.enter())
            })
            .unwrap()
            .join();
        assert!(alive.is_ok());
        let now = now_ms();
        assert_eq!(hb.problem(now), None);
        let later = now + BEAT_STALE.as_millis() as u64 + 1;
        let p = hb.problem(later).unwrap();
        assert!(p.starts_with("thread worker-x stuck"), "{p}");

        let hb = Arc::new(Heartbeat::default());
        let dead = std::thread::Builder::new()
            .name("worker-y".into())
            .spawn({
                let hb = hb.clone();
                move || {
                    let _alive = hb.enter();
                }
            })
            .unwrap();
        dead.join().unwrap();
        assert_eq!(hb.problem(now_ms()).unwrap(), "thread worker-y exited");
    }

    #[test]
    fn a_retired_thread_is_not_a_problem() {
        let hb = Arc::new(Heartbeat::default());
        hb.enter().retire();
        assert_eq!(hb.problem(now_ms() + 3_600_000), None);
    }

    #[test]
    fn the_engine_must_have_answered_within_the_window() {
        let e = EngineContact::default();
        let w = Duration::from_secs(30);
        assert!(
            e.problem("unix:///x", w, now_ms())
                .unwrap()
                .contains("not answered yet")
        );
        e.answered();
        let now = now_ms();
        assert_eq!(e.problem("unix:///x", w, now), None);
        let p = e.problem("unix:///x", w, now + 31_000).unwrap();
        assert!(p.contains("has not answered for 31"), "{p}");
    }
}
