//! The process logger: `env_logger` behind an `ArcSwap`, so that a reload
//! changes the filter (`log` / `RUST_LOG`) of a running process.
//!
//! Invariant: a log call takes one lock-free load; [`set_filter`] replaces
//! the whole logger at once, never half of it.

use std::sync::OnceLock;

use arc_swap::ArcSwap;
use log::{Log, Metadata, Record};

/// The logger installed by [`init`].
static LOGGER: OnceLock<Reloadable> = OnceLock::new();

struct Reloadable(ArcSwap<env_logger::Logger>);

impl Log for Reloadable {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.0.load().enabled(metadata)
    }
    fn log(&self, record: &Record) {
        self.0.load().log(record);
    }
    fn flush(&self) {
        self.0.load().flush();
    }
}

/// An `env_logger` for `filter`, after the dependency quieting of
/// [`crate::cli::QUIET_DEPENDENCIES`].
fn build(filter: &str) -> env_logger::Logger {
    env_logger::Builder::new()
        .parse_filters(crate::cli::QUIET_DEPENDENCIES)
        .parse_filters(filter)
        .format_timestamp_millis()
        .build()
}

/// Installs the process logger with `filter` (`RUST_LOG` syntax). Once per
/// process; later calls change nothing and return false.
pub fn init(filter: &str) -> bool {
    let logger = build(filter);
    let max = logger.filter();
    if LOGGER
        .set(Reloadable(ArcSwap::from_pointee(logger)))
        .is_err()
    {
        return false;
    }
    let installed = LOGGER.get().is_some_and(|l| log::set_logger(l).is_ok());
    if installed {
        log::set_max_level(max);
    }
    installed
}

/// Replaces the filter of the logger [`init`] installed; false (nothing
/// done) when there is none, e.g. in tests.
pub fn set_filter(filter: &str) -> bool {
    let Some(current) = LOGGER.get() else {
        return false;
    };
    let logger = build(filter);
    let max = logger.filter();
    current.0.store(std::sync::Arc::new(logger));
    log::set_max_level(max);
    true
}
