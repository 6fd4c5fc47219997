//! Command line: `glued [run|id|check] [--config PATH] [flags]`, and one
//! function per mode.
//!
//! Invariant: a configuration error prints exactly one line on stderr and
//! exits [`EXIT_CONFIG`]; the cluster secret is printed nowhere.

use std::time::Duration;

use signal_hook::consts::signal::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::config::{self, Command, Config, ConfigError, KEYS};
use crate::daemon::Daemon;

/// Exit code of a clean run.
pub const EXIT_OK: i32 = 0;
/// Exit code when a component cannot start or `glued id` fails.
pub const EXIT_FAILURE: i32 = 1;
/// Exit code of a bad command line or configuration.
pub const EXIT_CONFIG: i32 = 2;
/// After SIGTERM/SIGINT, the process exits after this long even if a
/// component is still joining (it is PID 1 in its container, and Docker
/// waits 10 s before SIGKILL; we promise under a second).
pub const STOP_GRACE: Duration = Duration::from_millis(800);

/// Runs the mode the command line names; returns the process exit code.
pub fn main() -> i32 {
    let mut args = Vec::new();
    for arg in std::env::args_os().skip(1) {
        match arg.into_string() {
            Ok(a) => args.push(a),
            Err(a) => {
                eprintln!("error: argument {a:?} is not valid UTF-8");
                return EXIT_CONFIG;
            }
        }
    }
    let args = match config::parse_args(&args) {
        Ok(a) => a,
        Err(e) => return config_error(&e),
    };
    match args.command {
        Command::Help => {
            print!("{}", help());
            return EXIT_OK;
        }
        Command::Version => {
            println!("glued {}", env!("CARGO_PKG_VERSION"));
            return EXIT_OK;
        }
        _ => {}
    }
    let env = |name: &str| std::env::var(name).ok();
    let config = match Config::from_args(&args, &env, &config::Host::current()) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    match args.command {
        Command::Check => check(&config, args.config.as_deref()),
        Command::Id => id(&config),
        _ => run(&config),
    }
}

fn config_error(e: &ConfigError) -> i32 {
    eprintln!("error: {e}");
    EXIT_CONFIG
}

/// `glued check`: the effective configuration, one key per line.
fn check(config: &Config, explicit: Option<&std::path::Path>) -> i32 {
    match config::find_config_file(explicit) {
        Some(path) => println!("# config file: {}", path.display()),
        None => println!("# config file: none (defaults, environment and flags only)"),
    }
    for line in config.effective_lines() {
        println!("{line}");
    }
    EXIT_OK
}

/// `glued id`: this node's endpoint id, then its `id@ip:port` addresses.
fn id(config: &Config) -> i32 {
    match crate::gossip::id_lines(config) {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            EXIT_OK
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            EXIT_FAILURE
        }
    }
}

/// Log filter applied before `RUST_LOG`: iroh and its QUIC stack log every
/// packet at info and pass tracing span names through `log` (a bare
/// `ERROR iroh_gossip::net` line at start). Glued logs what matters about
/// the cluster itself; name a module in `RUST_LOG` (`iroh=debug`) to see
/// more, since a module-specific directive beats these.
pub const QUIET_DEPENDENCIES: &str = "iroh=warn,iroh_gossip=off,iroh_relay=warn,noq=warn,\
     noq_proto=warn,noq_udp=warn,netwatch=warn,swarm_discovery=warn,\
     iroh_mdns_address_lookup=warn,tracing::span=off,bollard=warn,hyper_util=warn,mio=warn";

/// `glued run`: start every component, wait for SIGTERM or SIGINT, stop.
fn run(config: &Config) -> i32 {
    env_logger::Builder::new()
        .parse_filters(QUIET_DEPENDENCIES)
        .parse_filters(&config.log)
        .format_timestamp_millis()
        .init();
    // Registered before anything starts, so an early signal is not lost.
    let mut signals = match Signals::new([SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return EXIT_FAILURE;
        }
    };
    log::info!("glued {} starting", env!("CARGO_PKG_VERSION"));
    log::debug!("log filter: {}", config.log);
    for line in config.effective_lines() {
        log::info!("config: {line}");
    }
    if config.cluster_secret.is_default() {
        log::warn!(
            "USING THE DEFAULT CLUSTER SECRET: ANY HOST THAT KNOWS IT CAN JOIN THIS CLUSTER \
             AND PUBLISH NAMES. Set GLUED_CLUSTER_SECRET or GLUED_CLUSTER_SECRET_FILE."
        );
    }
    let daemon = match Daemon::start(config) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            return EXIT_FAILURE;
        }
    };
    log::info!(
        "DNS listening on udp {} tcp {}",
        daemon.dns_udp_addr,
        daemon.dns_tcp_addr
    );
    log::info!("HTTP status on {}", daemon.http_addr);
    let signal = signals.forever().next().unwrap_or(SIGTERM);
    log::info!(
        "{} received, stopping",
        if signal == SIGINT {
            "SIGINT"
        } else {
            "SIGTERM"
        }
    );
    // Whatever a component does while joining, the process ends in time.
    std::thread::Builder::new()
        .name("glued-stop-watchdog".into())
        .spawn(|| {
            std::thread::sleep(STOP_GRACE);
            log::warn!("components slow to stop; exiting anyway");
            std::process::exit(EXIT_OK);
        })
        .ok();
    daemon.stop();
    log::info!("stopped");
    EXIT_OK
}

/// The `--help` text, generated from [`KEYS`].
pub fn help() -> String {
    use std::fmt::Write;
    let mut out = format!(
        "glued {} - cluster-wide DNS names for Docker containers\n\n\
         Usage: glued [run|id|check] [--config PATH] [--KEY VALUE]...\n\n\
         Commands:\n  \
         run      run the daemon (the default)\n  \
         id       print this node's endpoint id, then its ID@ip:port addresses\n  \
         check    validate the configuration and print the effective values\n\n\
         Options:\n  \
         --config PATH   config file (TOML, or JSON if it ends in .json); default: the\n                  \
         first of ./glued.toml, ./glued.json, /etc/glued/glued.toml\n  \
         -h, --help      print this help\n  \
         -V, --version   print the version\n\n\
         Keys (default in brackets; precedence: defaults < file < environment < flags;\n\
         lists are comma-separated):\n",
        env!("CARGO_PKG_VERSION")
    );
    for spec in KEYS {
        let _ = writeln!(
            out,
            "  {} {}\n      {} [{}]\n      file: {}   env: {}",
            spec.flag,
            spec.value,
            spec.help,
            spec.default,
            spec.file,
            spec.env.join(", ")
        );
    }
    out.push_str(
        "\nStatic records exist in the file only:\n  \
         [[records]]\n  name = \"db\"\n  ip = \"10.0.0.5\"\n\n\
         Exit codes: 0 ok, 1 a component could not start, 2 bad configuration.\n",
    );
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn help_names_every_key() {
        let help = super::help();
        for spec in super::KEYS {
            assert!(help.contains(spec.flag), "{}", spec.flag);
            assert!(help.contains(spec.env[0]), "{}", spec.env[0]);
        }
    }
}
