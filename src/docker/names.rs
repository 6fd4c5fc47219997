//! From one `docker inspect` to the record groups of that container: pure
//! functions, tested without an engine.
//!
//! Invariant: every name in a returned [`Group`] is a lowercase, valid single
//! DNS label, the container name (when valid) comes first, no name repeats,
//! and a container that is not running or opted out has no groups.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};

use bollard::models::{ContainerInspectResponse, EndpointSettings};
use compact_str::CompactString;

use crate::table::{Group, Health, MAX_NAMES_PER_GROUP, MAX_SRV_PORTS, Names, Scope, SrvPort};

/// Label holding extra names, comma-separated.
pub const LABEL_NAMES: &str = "glued.names";
/// Label that hides a container when set to a false value.
pub const LABEL_ENABLE: &str = "glued.enable";
/// Label Compose sets to the service name.
pub const LABEL_COMPOSE_SERVICE: &str = "com.docker.compose.service";
/// Label Compose sets to the project name.
pub const LABEL_COMPOSE_PROJECT: &str = "com.docker.compose.project";
/// Label publishing SRV records: `<service>=<port>[/tcp|/udp],…`.
pub const LABEL_SRV: &str = "glued.srv";
/// Hex digits of the short container id.
pub const SHORT_ID_LEN: usize = 12;

/// What Glued needs of one container, taken from an inspect response.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerInfo {
    /// Full id (64 hex digits).
    pub id: String,
    /// Name without the leading `/`.
    pub name: String,
    pub running: bool,
    /// Docker's health status (`none` without a health check).
    pub health: Health,
    pub labels: HashMap<String, String>,
    /// Network name → the container's endpoint on it.
    pub networks: HashMap<String, Endpoint>,
}

/// One container's endpoint on one network.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub aliases: Vec<String>,
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl ContainerInfo {
    /// Extracts the fields Glued uses; `None` when the response has no id.
    pub fn from_inspect(c: ContainerInspectResponse) -> Option<ContainerInfo> {
        let id = c.id?;
        let name = c
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned();
        let running = c.state.as_ref().and_then(|s| s.running).unwrap_or(false);
        let health = c
            .state
            .and_then(|s| s.health)
            .and_then(|h| h.status)
            .map(|status| {
                use bollard::models::HealthStatusEnum as H;
                match status {
                    H::STARTING => Health::Starting,
                    H::HEALTHY => Health::Healthy,
                    H::UNHEALTHY => Health::Unhealthy,
                    H::EMPTY | H::NONE => Health::None,
                }
            })
            .unwrap_or_default();
        let labels = c.config.and_then(|c| c.labels).unwrap_or_default();
        let networks = c
            .network_settings
            .and_then(|n| n.networks)
            .unwrap_or_default()
            .into_iter()
            .map(|(net, ep)| (net, Endpoint::from_settings(ep)))
            .collect();
        Some(ContainerInfo {
            id,
            name,
            running,
            health,
            labels,
            networks,
        })
    }

    /// The 12-hex-digit short id (shorter, never split inside a character,
    /// when the engine gives an odd id).
    pub fn short_id(&self) -> &str {
        let mut end = self.id.len().min(SHORT_ID_LEN);
        while !self.id.is_char_boundary(end) {
            end -= 1;
        }
        &self.id[..end]
    }

    /// False when the `glued.enable` label opts the container out.
    pub fn enabled(&self) -> bool {
        match self.labels.get(LABEL_ENABLE) {
            None => true,
            Some(v) => !matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "false" | "0" | "no" | "off"
            ),
        }
    }

    /// One group per watched network the container is attached to (keyed
    /// by network name). Empty when the container is stopped or opted out.
    pub fn groups(&self, watched: &[String]) -> BTreeMap<String, Group> {
        let mut out = BTreeMap::new();
        if !self.running || !self.enabled() {
            return out;
        }
        // The container's own facts: read, and their bad labels logged,
        // once whatever the number of networks.
        let mut facts: Option<(Option<Scope>, Vec<SrvPort>)> = None;
        for net in watched {
            let Some(ep) = self.networks.get(net) else {
                continue;
            };
            let (scope, srv) = facts
                .get_or_insert_with(|| (self.scope(), self.srv_ports()))
                .clone();
            let group = Group {
                names: self.names(ep),
                v4: ep.v4.into_iter().collect(),
                v6: ep.v6.into_iter().collect(),
                scope: scope.map(Box::new),
                health: self.health,
                srv,
            };
            let has_addr = !group.v4.is_empty() || !group.v6.is_empty();
            if !group.names.is_empty() && has_addr {
                out.insert(net.clone(), group);
            }
        }
        out
    }

    /// The Compose project and service, when both labels are valid names;
    /// one warning when both are set and one is not.
    fn scope(&self) -> Option<Scope> {
        let project = self.labels.get(LABEL_COMPOSE_PROJECT)?;
        let service = self.labels.get(LABEL_COMPOSE_SERVICE)?;
        let name = |v: &str| crate::table::record_name(v.trim());
        match (name(project), name(service)) {
            (Some(project), Some(service)) => Some(Scope { project, service }),
            _ => {
                log::warn!(
                    "container {}: Compose project {:?} or service {:?} is not a DNS label; \
                     no <service>.<project> name",
                    self.short_id(),
                    shown(project),
                    shown(service)
                );
                None
            }
        }
    }

    /// The ports of the `glued.srv` label (at most [`MAX_SRV_PORTS`],
    /// without duplicates); one warning for every item left out.
    fn srv_ports(&self) -> Vec<SrvPort> {
        let Some(value) = self.labels.get(LABEL_SRV) else {
            return Vec::new();
        };
        let mut out: Vec<SrvPort> = Vec::new();
        let (mut bad, mut over, mut first_bad) = (0usize, 0usize, None);
        for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match parse_srv(item) {
                Some(p) if out.contains(&p) => {}
                Some(p) if out.len() < MAX_SRV_PORTS => out.push(p),
                Some(_) => over += 1,
                None => {
                    bad += 1;
                    first_bad.get_or_insert(item);
                }
            }
        }
        if bad + over > 0 {
            log::warn!(
                "container {}: {LABEL_SRV}: {bad} item(s) not <service>=<port>[/tcp|/udp] \
                 (first: {:?}), {over} over {MAX_SRV_PORTS} ports; ignored",
                self.short_id(),
                shown(first_bad.unwrap_or_default())
            );
        }
        out
    }

    /// Names on one network, in SPEC §3 order: container name (the PTR
    /// primary), aliases, Compose service, short id, `glued.names`.
    fn names(&self, ep: &Endpoint) -> Names {
        let mut names = Names::new();
        let candidates = std::iter::once(self.name.as_str())
            .chain(ep.aliases.iter().map(String::as_str))
            .chain(self.labels.get(LABEL_COMPOSE_SERVICE).map(String::as_str))
            .chain(std::iter::once(self.short_id()))
            .chain(
                self.labels
                    .get(LABEL_NAMES)
                    .into_iter()
                    .flat_map(|v| v.split(',')),
            );
        for raw in candidates {
            let mut name = CompactString::new(raw.trim());
            name.make_ascii_lowercase();
            if name.is_empty() {
                continue;
            }
            if !crate::table::is_valid_name(&name) {
                log::debug!(
                    "container {}: name {name:?} is not a single DNS label or is reserved, skipped",
                    self.short_id()
                );
                continue;
            }
            if names.len() == MAX_NAMES_PER_GROUP {
                log::warn!(
                    "container {}: more than {MAX_NAMES_PER_GROUP} names; {name:?} and the rest ignored",
                    self.short_id()
                );
                break;
            }
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }
}

impl Endpoint {
    fn from_settings(ep: EndpointSettings) -> Endpoint {
        Endpoint {
            aliases: ep.aliases.unwrap_or_default(),
            v4: ep.ip_address.and_then(|s| s.parse().ok()),
            v6: ep.global_ipv6_address.and_then(|s| s.parse().ok()),
        }
    }
}

pub use crate::table::is_valid_label;

/// Longest part of a label value a log line shows.
const SHOWN_LEN: usize = 64;

/// `value` as a log line shows it: at most [`SHOWN_LEN`] bytes (the line
/// escapes it with `{:?}`).
fn shown(value: &str) -> &str {
    let mut end = value.len().min(SHOWN_LEN);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

pub use crate::table::parse_srv;

/// The log lines of one container's change, one per name added, removed or
/// given other addresses, from its groups (by network) before and after.
pub fn change_lines(
    id: &str,
    old: &BTreeMap<String, Group>,
    new: &BTreeMap<String, Group>,
) -> Vec<String> {
    let short = &id[..id.len().min(SHORT_ID_LEN)];
    let addresses = |g: &Group| {
        let all: Vec<String> =
            g.v4.iter()
                .map(|a| a.to_string())
                .chain(g.v6.iter().map(|a| a.to_string()))
                .collect();
        if all.is_empty() {
            "no address".to_string()
        } else {
            all.join(", ")
        }
    };
    let empty = Group::default();
    let mut lines = Vec::new();
    let networks: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for net in networks {
        let (before, after) = (
            old.get(net).unwrap_or(&empty),
            new.get(net).unwrap_or(&empty),
        );
        let at = format!("(container {short} on {net})");
        for name in &after.names {
            if !before.names.contains(name) {
                lines.push(format!("Added {name} → {} {at}", addresses(after)));
            } else if (&before.v4, &before.v6) != (&after.v4, &after.v6) {
                lines.push(format!(
                    "Readdressed {name}: {} → {} {at}",
                    addresses(before),
                    addresses(after)
                ));
            }
        }
        for name in before.names.iter().filter(|n| !after.names.contains(n)) {
            lines.push(format!("Removed {name} ({}) {at}", addresses(before)));
        }
    }
    // Health is the container's: one line, whatever its networks.
    if let (Some(before), Some(after)) = (old.values().next(), new.values().next())
        && before.health != after.health
        && let Some(name) = after.names.first()
    {
        lines.push(format!(
            "Health of {name}: {} → {} (container {short})",
            before.health.label(),
            after.health.label()
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::Proto;
    use smallvec::smallvec;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn a_change_logs_one_line_per_name_added_removed_or_readdressed() {
        let group = |names: &[&str], v4: &str| Group {
            names: names.iter().map(|n| (*n).into()).collect(),
            v4: smallvec![v4.parse().unwrap()],
            ..Group::default()
        };
        let old = BTreeMap::from([
            (
                "net-a".to_string(),
                group(&["web", "old-alias"], "172.20.0.5"),
            ),
            ("net-b".to_string(), group(&["web"], "172.21.0.5")),
        ]);
        let new = BTreeMap::from([
            ("net-a".to_string(), group(&["web", "api"], "172.20.0.5")),
            ("net-b".to_string(), group(&["web"], "172.21.0.9")),
        ]);
        assert_eq!(
            change_lines(ID, &old, &new),
            [
                "Added api → 172.20.0.5 (container 0123456789ab on net-a)",
                "Removed old-alias (172.20.0.5) (container 0123456789ab on net-a)",
                "Readdressed web: 172.21.0.5 → 172.21.0.9 (container 0123456789ab on net-b)",
            ]
        );
        assert_eq!(
            change_lines(ID, &new, &BTreeMap::new()),
            [
                "Removed web (172.20.0.5) (container 0123456789ab on net-a)",
                "Removed api (172.20.0.5) (container 0123456789ab on net-a)",
                "Removed web (172.21.0.9) (container 0123456789ab on net-b)",
            ]
        );
        assert!(change_lines(ID, &new, &new).is_empty());
    }

    fn info(labels: &[(&str, &str)]) -> ContainerInfo {
        let mut networks = HashMap::new();
        networks.insert(
            "glued_net".to_owned(),
            Endpoint {
                aliases: vec!["Web".into(), "0123456789ab".into(), "bad.alias".into()],
                v4: Some("172.20.0.5".parse().unwrap()),
                v6: Some("fd00::5".parse().unwrap()),
            },
        );
        networks.insert(
            "other".to_owned(),
            Endpoint {
                aliases: vec![],
                v4: Some("172.21.0.5".parse().unwrap()),
                v6: None,
            },
        );
        ContainerInfo {
            id: ID.into(),
            name: "My_App".into(),
            running: true,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            networks,
            ..Default::default()
        }
    }

    #[test]
    fn names_follow_the_spec_order_lowercased_and_deduplicated() {
        let c = info(&[
            (LABEL_COMPOSE_SERVICE, "web"),
            (LABEL_NAMES, " api , API,-bad,x.y,extra"),
        ]);
        let groups = c.groups(&["glued_net".into()]);
        let g = &groups["glued_net"];
        assert_eq!(
            g.names[..],
            ["my_app", "web", "0123456789ab", "api", "extra"]
        );
        assert_eq!(g.v4[..], ["172.20.0.5".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(g.v6[..], ["fd00::5".parse::<Ipv6Addr>().unwrap()]);
    }

    #[test]
    fn only_watched_networks_give_groups() {
        let c = info(&[]);
        let groups = c.groups(&["other".into(), "absent".into()]);
        assert_eq!(groups.keys().collect::<Vec<_>>(), ["other"]);
        assert_eq!(groups["other"].names[..], ["my_app", "0123456789ab"]);
    }

    #[test]
    fn stopped_or_opted_out_containers_have_no_groups() {
        let mut c = info(&[]);
        c.running = false;
        assert!(c.groups(&["glued_net".into()]).is_empty());
        for v in ["false", "FALSE", "0", "no", "off"] {
            assert!(
                info(&[(LABEL_ENABLE, v)])
                    .groups(&["glued_net".into()])
                    .is_empty()
            );
        }
        assert_eq!(
            info(&[(LABEL_ENABLE, "true")])
                .groups(&["glued_net".into()])
                .len(),
            1
        );
    }

    #[test]
    fn an_endpoint_without_addresses_gives_no_group() {
        let mut c = info(&[]);
        let ep = c.networks.get_mut("other").unwrap();
        ep.v4 = None;
        assert!(c.groups(&["other".into()]).is_empty());
    }

    #[test]
    fn label_validity() {
        for ok in ["a", "api", "my_app", "web-1", &"a".repeat(63)] {
            assert!(is_valid_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "a.b", "A", "a b", "é", &"a".repeat(64)] {
            assert!(!is_valid_label(bad), "{bad}");
        }
    }

    #[test]
    fn compose_labels_give_the_scope_and_glued_srv_the_ports() {
        let c = info(&[
            (LABEL_COMPOSE_SERVICE, "DB"),
            (LABEL_COMPOSE_PROJECT, "shop"),
            (
                LABEL_SRV,
                "http=8080, _dns=53/UDP,x=0,y=70000,z=1/sctp,http=8080,-bad=1,api=9000/tcp",
            ),
        ]);
        let g = &c.groups(&["glued_net".into()])["glued_net"];
        assert_eq!(
            g.scope.as_deref(),
            Some(&Scope {
                project: "shop".into(),
                service: "db".into()
            })
        );
        let ports: Vec<(&str, Proto, u16)> = g
            .srv
            .iter()
            .map(|p| (p.service.as_str(), p.proto, p.port))
            .collect();
        assert_eq!(
            ports,
            [
                ("http", Proto::Tcp, 8080),
                ("dns", Proto::Udp, 53),
                ("api", Proto::Tcp, 9000)
            ]
        );
        // A service without a project (or the reverse) has no scope.
        let c = info(&[(LABEL_COMPOSE_SERVICE, "db")]);
        assert_eq!(c.groups(&["glued_net".into()])["glued_net"].scope, None);
        let c = info(&[
            (LABEL_COMPOSE_PROJECT, "shop"),
            (LABEL_COMPOSE_SERVICE, "a.b"),
        ]);
        assert_eq!(c.groups(&["glued_net".into()])["glued_net"].scope, None);
    }

    /// Warnings of the process, captured by a logger this test binary
    /// installs once.
    struct Warnings(std::sync::Mutex<Vec<String>>);

    impl log::Log for Warnings {
        fn enabled(&self, metadata: &log::Metadata) -> bool {
            metadata.level() <= log::Level::Warn
        }
        fn log(&self, record: &log::Record) {
            if self.enabled(record.metadata()) {
                let mut lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
                lines.push(record.args().to_string());
            }
        }
        fn flush(&self) {}
    }

    static WARNINGS: Warnings = Warnings(std::sync::Mutex::new(Vec::new()));

    /// The warnings logged so far that contain `needle`.
    fn warnings_with(needle: &str) -> Vec<String> {
        static INSTALLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let installed = *INSTALLED.get_or_init(|| {
            let ok = log::set_logger(&WARNINGS).is_ok();
            log::set_max_level(log::max_level().max(log::LevelFilter::Warn));
            ok
        });
        assert!(installed, "another logger is installed in this test binary");
        let lines = WARNINGS.0.lock().unwrap_or_else(|e| e.into_inner());
        lines
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// Bad Compose and `glued.srv` labels are ignored with one line each
    /// per inspect, however many items are bad and however many watched
    /// networks the container is on (it was one line per bad item per
    /// network, and none for a bad Compose scope).
    #[test]
    fn bad_compose_and_srv_labels_are_ignored_with_one_line_each() {
        let srv: Vec<String> = (0..40)
            .map(|i| format!("bad {i}"))
            .chain((1..=20).map(|p| format!("p{p}={p}")))
            .collect();
        let mut c = info(&[
            (LABEL_COMPOSE_PROJECT, "shop.eu"),
            (LABEL_COMPOSE_SERVICE, "db"),
            (LABEL_SRV, &srv.join(",")),
        ]);
        c.id = format!("5ca1ab1e0042{}", &ID[12..]);
        warnings_with("");
        let groups = c.groups(&["glued_net".into(), "other".into()]);
        assert_eq!(groups.len(), 2);
        for g in groups.values() {
            assert_eq!((&g.scope, g.srv.len()), (&None, MAX_SRV_PORTS));
        }
        let lines = warnings_with("5ca1ab1e0042");
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(lines[0].contains("\"shop.eu\""), "{lines:#?}");
        assert!(
            lines[1].contains("40 item(s)") && lines[1].contains("4 over 16"),
            "{lines:#?}"
        );
    }

    #[test]
    fn a_container_holds_at_most_the_capped_names() {
        let many: Vec<String> = (0..200).map(|i| format!("x{i}")).collect();
        let c = info(&[("glued.names", &many.join(","))]);
        let g = &c.groups(&["glued_net".into()])["glued_net"];
        assert_eq!(g.names.len(), MAX_NAMES_PER_GROUP);
        assert_eq!(g.names[0], "my_app");
    }

    #[test]
    fn a_health_change_logs_one_line() {
        let mut c = info(&[]);
        c.health = Health::Healthy;
        let old = c.groups(&["glued_net".into(), "other".into()]);
        c.health = Health::Unhealthy;
        let new = c.groups(&["glued_net".into(), "other".into()]);
        assert_eq!(
            change_lines(ID, &old, &new),
            ["Health of my_app: healthy → unhealthy (container 0123456789ab)"]
        );
    }

    #[test]
    fn from_inspect_reads_the_engine_json() {
        let json = serde_json::json!({
            "Id": ID,
            "Name": "/db",
            "State": {"Running": true, "Health": {"Status": "unhealthy", "FailingStreak": 3}},
            "Config": {"Labels": {"glued.names": "postgres"}},
            "NetworkSettings": {"Networks": {"glued_net": {
                "Aliases": ["database"],
                "IPAddress": "10.1.0.2",
                "GlobalIPv6Address": ""
            }}}
        });
        let c: ContainerInspectResponse = serde_json::from_value(json).unwrap();
        let c = ContainerInfo::from_inspect(c).unwrap();
        let g = &c.groups(&["glued_net".into()])["glued_net"];
        assert_eq!(g.names[..], ["db", "database", "0123456789ab", "postgres"]);
        assert_eq!(g.health, Health::Unhealthy);
        assert_eq!(g.v4[..], ["10.1.0.2".parse::<Ipv4Addr>().unwrap()]);
        assert!(g.v6.is_empty());
    }

    #[test]
    fn an_id_that_is_not_hex_does_not_panic() {
        // The engine's answer is input: a multi-byte character across the
        // short-id cut must not panic.
        let mut c = info(&[]);
        c.id = format!("a{}", "é".repeat(40));
        let groups = c.groups(&["glued_net".to_owned()]);
        let g = &groups["glued_net"];
        assert_eq!(g.names[0], "my_app");
        assert!(c.short_id().len() <= SHORT_ID_LEN);
    }
}
