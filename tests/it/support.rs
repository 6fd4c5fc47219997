//! Shared helpers for the integration tests.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use glued::config::{Config, Keyring};

/// A unique suffix for names of things a test creates (networks, dirs).
pub fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// This test process's parent of every [`data_dir`]:
/// `<tmp>/glued-test-<pid>`, removed when the process exits.
fn data_root() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        extern "C" fn remove_root() {
            let root = std::env::temp_dir().join(format!("glued-test-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(root);
        }
        // The test harness leaves through `exit`, which runs this.
        // SAFETY: registers a plain `extern "C" fn` without arguments.
        unsafe { libc::atexit(remove_root) };
        std::env::temp_dir().join(format!("glued-test-{}", std::process::id()))
    })
    .clone()
}

/// A fresh, empty data directory (node keys, incarnations) under this
/// process's [`data_root`], so that no run leaves keys behind in `/tmp`.
pub fn data_dir() -> PathBuf {
    let dir = data_root().join(unique("d"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A configuration that binds only loopback ports chosen by the kernel,
/// contacts no upstream, watches a network that does not exist, and has
/// mDNS off: safe to run many at once.
pub fn test_config() -> Config {
    Config {
        networks: vec![unique("glued-absent-net")],
        cluster_keys: Keyring::for_tests("test-secret"),
        ..Config::loopback(data_dir())
    }
}

/// True when tests that need something absent must fail instead of skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A cluster key as `glued keygen` prints it, fixed by `label`.
pub fn key_b64(label: &str) -> String {
    Keyring::for_tests(label).primary().unwrap().to_base64()
}

/// Held by tests that load the machine (connection floods) and by tests
/// that time leases of a few seconds, so that those never overlap.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
