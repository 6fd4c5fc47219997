//! Command line: `glued [run|id|check|health|peers|records] [--config PATH]
//! [flags]`, and one function per mode.
//!
//! Invariant: a configuration error prints exactly one line on stderr and
//! exits [`EXIT_CONFIG`]; the cluster secret is printed nowhere.

use std::time::Duration;

use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::config::{self, Args, ClusterKey, Command, Config, ConfigError, KEYS};
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
        Command::Keygen => return keygen(),
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
        Command::Health => health(&config),
        Command::Peers => peers(&config, args.json),
        Command::Records => records(&config, args.json),
        Command::CacheFlush => cache_flush(&config),
        _ => run(&config, &args),
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

/// `glued keygen`: a new cluster key (32 random bytes, base64) on stdout.
fn keygen() -> i32 {
    match ClusterKey::generate() {
        Ok(k) => {
            println!("{}", k.to_base64());
            EXIT_OK
        }
        Err(e) => {
            eprintln!("error: no random bytes from the OS: {e}");
            EXIT_FAILURE
        }
    }
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

/// `GET path` from the local daemon's status server (`http_bind`); the
/// error is one line saying the daemon is not reachable.
fn ask_daemon(config: &Config, path: &str) -> Result<(u16, String), String> {
    let addr = crate::http::client_addr(config.http_bind);
    crate::http::get(addr, path).map_err(|e| {
        format!(
            "error: no glued daemon answers at {addr} ({e}); is it running, and is http_bind \
             (GLUED_HTTP_BIND) the same for this command?"
        )
    })
}

/// `glued health`: exit 0 when the local daemon is healthy, else 1 with
/// every reason, one per line.
fn health(config: &Config) -> i32 {
    match ask_daemon(config, "/healthz") {
        Ok((200, body)) => {
            println!("{}", body.trim_end());
            EXIT_OK
        }
        Ok((code, body)) => {
            let body = body.trim_end();
            if body.is_empty() {
                eprintln!("unhealthy: HTTP {code}");
            }
            for reason in body.lines() {
                eprintln!("unhealthy: {reason}");
            }
            EXIT_FAILURE
        }
        Err(e) => {
            eprintln!("{e}");
            EXIT_FAILURE
        }
    }
}

/// `glued peers`: the peers this daemon knows, as a table or JSON.
fn peers(config: &Config, json: bool) -> i32 {
    show(config, "/peers", json, peers_table)
}

/// `glued records`: every record group of the name table, as a table or
/// JSON.
fn records(config: &Config, json: bool) -> i32 {
    show(config, "/records", json, records_table)
}

/// `glued cache flush`: asks the local daemon to empty its forward cache.
fn cache_flush(config: &Config) -> i32 {
    let addr = crate::http::client_addr(config.http_bind);
    match crate::http::post(addr, crate::http::CACHE_FLUSH_PATH) {
        Ok((200, _)) => {
            println!("forward cache flushed");
            EXIT_OK
        }
        Ok((code, body)) => {
            eprintln!("error: {addr} answered HTTP {code}: {}", body.trim_end());
            EXIT_FAILURE
        }
        Err(e) => {
            eprintln!(
                "error: no glued daemon answers at {addr} ({e}); is it running, and is http_bind \
                 (GLUED_HTTP_BIND) the same for this command?"
            );
            EXIT_FAILURE
        }
    }
}

fn show(
    config: &Config,
    path: &str,
    json: bool,
    table: fn(&[serde_json::Value]) -> Vec<Vec<String>>,
) -> i32 {
    let body = match ask_daemon(config, path) {
        Ok((200, body)) => body,
        Ok((code, body)) => {
            eprintln!("error: {path} answered HTTP {code}: {}", body.trim_end());
            return EXIT_FAILURE;
        }
        Err(e) => {
            eprintln!("{e}");
            return EXIT_FAILURE;
        }
    };
    if json {
        return print_out(&body);
    }
    match serde_json::from_str::<Vec<serde_json::Value>>(&body) {
        Ok(items) => print_out(&aligned(&table(&items))),
        Err(e) => {
            eprintln!("error: {path} answered something that is not a JSON list: {e}");
            EXIT_FAILURE
        }
    }
}

/// Writes `text` to stdout; a reader that went away (`glued peers | head`)
/// is not an error.
fn print_out(text: &str) -> i32 {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => EXIT_OK,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => EXIT_OK,
        Err(e) => {
            eprintln!("error: writing to stdout: {e}");
            EXIT_FAILURE
        }
    }
}

/// Characters of an endpoint id shown in tables (`glued id` prints it whole).
pub const ID_PREFIX_LEN: usize = 12;

/// A JSON field as table text: strings bare, absent or null as `-`.
fn field(v: &serde_json::Value, key: &str) -> String {
    match v.get(key) {
        None | Some(serde_json::Value::Null) => "-".into(),
        Some(serde_json::Value::String(s)) if s.is_empty() => "-".into(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

fn prefix(id: &str) -> String {
    id.chars().take(ID_PREFIX_LEN).collect()
}

/// Rows of `glued peers`: the header, then one row per peer. Key id and
/// protocol version show `-` when the daemon does not report them.
fn peers_table(peers: &[serde_json::Value]) -> Vec<Vec<String>> {
    let mut rows = vec![
        [
            "ID",
            "NODE",
            "ADDRESS",
            "LAST HEARD",
            "RECORDS",
            "KEY ID",
            "VERSION",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for p in peers {
        let heard = match p.get("last_heard_ms_ago").and_then(|v| v.as_u64()) {
            Some(ms) => format!("{:.1}s ago", ms as f64 / 1000.0),
            None => "-".into(),
        };
        let version = ["protocol_version", "version"]
            .iter()
            .map(|k| field(p, k))
            .find(|v| v != "-")
            .unwrap_or_else(|| "-".into());
        rows.push(vec![
            prefix(&field(p, "id")),
            field(p, "node_name"),
            field(p, "addr"),
            heard,
            field(p, "records"),
            field(p, "key_id"),
            version,
        ]);
    }
    rows
}

/// Rows of `glued records`: the header, then one row per record group.
fn records_table(groups: &[serde_json::Value]) -> Vec<Vec<String>> {
    let mut rows = vec![
        ["NAME", "ADDRESSES", "ORIGIN", "SOURCE", "NOTES"]
            .map(String::from)
            .to_vec(),
    ];
    let list = |v: &serde_json::Value, key: &str| -> String {
        let items: Vec<String> = v
            .get(key)
            .and_then(|l| l.as_array())
            .map(|l| {
                l.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if items.is_empty() {
            "-".into()
        } else {
            items.join(",")
        }
    };
    for g in groups {
        let source = g.get("source").cloned().unwrap_or_default();
        let source = match field(&source, "kind").as_str() {
            "static" => "static".to_string(),
            "container" => format!(
                "container {} on {}",
                prefix(&field(&source, "id")),
                field(&source, "network")
            ),
            other => other.to_string(),
        };
        rows.push(vec![
            list(g, "names"),
            list(g, "addresses"),
            format!(
                "{} ({})",
                field(g, "node_name"),
                prefix(&field(g, "origin"))
            ),
            source,
            notes(g),
        ]);
    }
    rows
}

/// The NOTES cell of `glued records`: Compose scope, health (when
/// checked), SRV ports, conflicts; `-` when there is nothing to say.
fn notes(g: &serde_json::Value) -> String {
    let mut notes = Vec::new();
    if let Some(scope) = g.get("scope") {
        notes.push(format!(
            "{}.{}",
            field(scope, "service"),
            field(scope, "project")
        ));
    }
    let health = field(g, "health");
    if !health.is_empty() && health != "none" {
        notes.push(health);
    }
    for p in g
        .get("srv")
        .and_then(|l| l.as_array())
        .into_iter()
        .flatten()
    {
        notes.push(format!(
            "srv {}={}/{}",
            field(p, "service"),
            p.get("port").and_then(|v| v.as_u64()).unwrap_or_default(),
            field(p, "proto")
        ));
    }
    for name in g
        .get("conflicts")
        .and_then(|l| l.as_array())
        .into_iter()
        .flatten()
    {
        notes.push(format!("conflict {}", name.as_str().unwrap_or_default()));
    }
    if notes.is_empty() {
        "-".into()
    } else {
        notes.join(", ")
    }
}

/// Rows as text: columns padded to their widest cell, two spaces apart,
/// no trailing spaces.
fn aligned(rows: &[Vec<String>]) -> String {
    let n_columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n_columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let pad = widths[c].saturating_sub(cell.chars().count());
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Installs the panic hook of `glued run`: the panic is logged with the
/// thread's name, then the process aborts (as the release profile's
/// `panic = "abort"` does), so a component thread never dies alone while
/// the process looks healthy; the supervisor restarts it.
fn abort_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let message = info.payload_as_str().unwrap_or("(no message)");
        let at = info
            .location()
            .map_or_else(String::new, |l| format!(" at {}:{}", l.file(), l.line()));
        log::error!("thread {name} panicked{at}: {message}; aborting");
        // Also on stderr in case logging is filtered off.
        eprintln!("glued: thread {name} panicked{at}: {message}; aborting");
        std::process::abort();
    }));
}

/// Most glibc malloc arenas of `glued run` (glibc's default is 8 per
/// core). Each thread otherwise allocates from an arena of its own, and
/// memory one thread frees stays in that thread's arena: a peer's full
/// state decoded on a gossip thread leaves its freed pages there while the
/// registry grows its own, so with 10 000 remote records each costs ~930
/// bytes of RSS against ~670 with two arenas (`bench/remote-rss.sh`). The
/// hot paths do not pay for the sharing: local answers do not allocate,
/// and glibc's per-thread cache serves most other small allocations
/// without taking an arena's lock.
pub const MALLOC_ARENAS: i32 = 2;

/// Caps glibc's malloc arenas at [`MALLOC_ARENAS`] before any thread
/// starts, unless the operator set `MALLOC_ARENA_MAX` (glibc's own knob,
/// which then wins). Does nothing with another libc.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before
        // the daemon's threads start.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
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

/// `glued run`: start every component, reload on SIGHUP, stop on SIGTERM
/// or SIGINT.
fn run(config: &Config, args: &Args) -> i32 {
    limit_malloc_arenas();
    crate::logging::init(&config.log);
    abort_on_panic();
    // Registered before anything starts, so an early signal is not lost.
    let mut signals = match Signals::new([SIGTERM, SIGINT, SIGHUP]) {
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
    if let Some(file) = &config.upstreams_file {
        log::info!(
            "upstreams from {}: {}",
            file.display(),
            if config.upstreams.is_empty() {
                "none".to_string()
            } else {
                format!("{:?}", config.upstreams)
            }
        );
    }
    let mut daemon = match Daemon::start(config) {
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
    // SIGHUP reloads the configuration (and empties the forward cache);
    // SIGTERM and SIGINT stop.
    let signal = loop {
        match signals.forever().next() {
            Some(SIGHUP) => reload(&mut daemon, args),
            Some(signal) => break signal,
            None => break SIGTERM,
        }
    };
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

/// SIGHUP: reads the configuration again (same command line, environment
/// and config file path) and applies it. A bad configuration changes
/// nothing and is logged as the one line `glued check` prints.
fn reload(daemon: &mut Daemon, args: &Args) {
    log::info!("SIGHUP received, reloading the configuration");
    let env = |name: &str| std::env::var(name).ok();
    match Config::from_args(args, &env, &config::Host::current()) {
        Ok(new) => {
            if let Some(file) = &new.upstreams_file
                && new.upstreams != daemon.config().upstreams
            {
                log::info!("upstreams from {}", file.display());
            }
            daemon.reload(new).log();
        }
        Err(e) => log::error!("error: {e} (reload refused; configuration unchanged)"),
    }
}

/// The `--help` text, generated from [`KEYS`].
pub fn help() -> String {
    use std::fmt::Write;
    let mut out = format!(
        "glued {} - cluster-wide DNS names for Docker containers\n\n\
         Usage: glued [COMMAND] [--config PATH] [--KEY VALUE]...\n\n\
         Commands:\n  \
         run      run the daemon (the default)\n  \
         id       print this node's endpoint id, then its ID@ip:port addresses\n  \
         check    validate the configuration and print the effective values\n  \
         keygen   print a new cluster key (32 random bytes, base64)\n  \
         health   ask the local daemon (http_bind) whether it is healthy: exit 0, or 1\n           \
         with the reasons\n  \
         peers    the local daemon's peers as a table (--json: the raw JSON)\n  \
         records  the local daemon's records as a table (--json: the raw JSON)\n  \
         cache flush  empty the local daemon's forward cache (also: SIGHUP)\n\n\
         Options:\n  \
         --config PATH   config file (TOML, or JSON if it ends in .json); default: the\n                  \
         first of ./glued.toml, ./glued.json, /etc/glued/glued.toml\n  \
         -h, --help      print this help\n  \
         -V, --version   print the version\n  \
         --json          with peers or records: print the status API's JSON\n\n\
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
         Signals: SIGHUP reloads the configuration (ttl, upstreams, allow_nets, records,\n\
         log; other changed keys are reported and need a restart); SIGTERM/SIGINT stop.\n\n\
         Exit codes: 0 ok, 1 a component could not start (or, for health, peers and\n\
         records: the daemon is unhealthy or unreachable), 2 bad configuration.\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn tables_are_aligned_and_missing_fields_show_a_dash() {
        let peers = [
            json!({"id": "0123456789abcdef0123", "node_name": "web-1", "addr": "10.0.0.1:9254",
                   "last_heard_ms_ago": 1500, "records": 3, "key_id": "k1", "protocol_version": 2}),
            json!({"id": "fedcba9876543210", "node_name": "db", "addr": null,
                   "last_heard_ms_ago": 20, "records": 12}),
        ];
        let text = super::aligned(&super::peers_table(&peers));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "ID            NODE   ADDRESS        LAST HEARD  RECORDS  KEY ID  VERSION"
        );
        assert_eq!(
            lines[1],
            "0123456789ab  web-1  10.0.0.1:9254  1.5s ago    3        k1      2"
        );
        assert_eq!(
            lines[2],
            "fedcba987654  db     -              0.0s ago    12       -       -"
        );
        let records = [json!({"origin": "abcdef0123456789", "node_name": "web-1",
            "source": {"kind": "container", "id": "c0ffee0123456789", "network": "glued_net"},
            "names": ["api", "api-1"], "addresses": ["172.18.0.2", "fd00::2"]})];
        let text = super::aligned(&super::records_table(&records));
        assert_eq!(
            text.lines().nth(1).unwrap(),
            "api,api-1  172.18.0.2,fd00::2  web-1 (abcdef012345)  container c0ffee012345 on glued_net  -"
        );
        let records = [json!({"origin": "abcdef0123456789", "node_name": "web-1",
            "source": {"kind": "container", "id": "c0ffee0123456789", "network": "glued_net"},
            "names": ["db"], "addresses": ["172.18.0.3"], "health": "unhealthy",
            "scope": {"project": "shop", "service": "db"},
            "srv": [{"service": "redis", "proto": "tcp", "port": 6379}], "conflicts": ["db"]})];
        let text = super::aligned(&super::records_table(&records));
        assert!(
            text.lines()
                .nth(1)
                .unwrap()
                .ends_with("  db.shop, unhealthy, srv redis=6379/tcp, conflict db"),
            "{text}"
        );
    }

    #[test]
    fn help_names_every_key() {
        let help = super::help();
        for spec in super::KEYS {
            assert!(help.contains(spec.flag), "{}", spec.flag);
            assert!(help.contains(spec.env[0]), "{}", spec.env[0]);
        }
    }
}
