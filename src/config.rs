//! Configuration: built-in defaults < config file < `GLUED_*` environment <
//! command-line flags, parsed in two steps (raw layers → validated
//! [`Config`]).
//!
//! Every key is described once, in [`KEYS`]: its file name (`dns_bind`), its
//! environment names (`GLUED_DNS_BIND`) and its flag (`--dns-bind`). Each
//! layer yields raw [`Setting`]s that remember how the user wrote the key;
//! the last setting of a key wins, and only then is it validated.
//!
//! Invariant: a [`Config`] that exists is valid; every bad value is caught
//! here and reported as one line naming the key (as the user wrote it), the
//! value and what was expected. The cluster secret is never part of an error
//! or of [`Config::effective_lines`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use crate::dns::cache::{CacheConfig, MAX_CACHE_SECS, MAX_CACHE_SIZE};

/// Default DNS listen address: [`AUTO_BIND`].
pub const DEFAULT_DNS_BIND: &str = "auto";
/// `dns_bind = "auto"`: [`AUTO_FIXED_BIND`] plus port 53 on the gateway of
/// each watched Docker network, followed as networks come and go.
pub const AUTO_BIND: &str = "auto";
/// The fixed address of `auto` (not 0.0.0.0, so that it coexists with
/// systemd-resolved on 127.0.0.53:53).
pub const AUTO_FIXED_BIND: &str = "127.0.0.1:53";
/// Default gossip (iroh QUIC) port.
pub const DEFAULT_GOSSIP_PORT: u16 = 9254;
/// Default HTTP status address.
pub const DEFAULT_HTTP_BIND: &str = "127.0.0.1:9253";
/// Default cluster domain.
pub const DEFAULT_DOMAIN: &str = "glued.internal";
/// Default TTL of container records and of negative answers.
pub const DEFAULT_TTL_SECS: u32 = 5;
/// Largest accepted TTL: one day.
pub const MAX_TTL_SECS: u32 = 86_400;
/// Default lease of a silent peer's records.
pub const DEFAULT_LEASE_SECS: u64 = 15;
/// Smallest accepted lease.
pub const MIN_LEASE_SECS: u64 = 1;
/// Largest accepted lease: one day.
pub const MAX_LEASE_SECS: u64 = 86_400;
/// Most DNS serving threads accepted.
pub const MAX_DNS_THREADS: usize = 256;
/// Default Docker engine address.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";
/// Default watched Docker network.
pub const DEFAULT_NETWORK: &str = "glued_net";
/// Default data directory (node key).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/glued";
/// Default log filter (`RUST_LOG` syntax).
pub const DEFAULT_LOG: &str = "info";
/// `/healthz` fails when the Docker engine has not answered for this long.
pub const DEFAULT_DOCKER_HEALTH_SECS: u64 = 30;
/// Largest `docker_health_secs`.
pub const MAX_DOCKER_HEALTH_SECS: u64 = 3_600;
/// Port of upstreams given without one.
pub const DNS_PORT: u16 = 53;
/// Clients allowed by default: loopback, RFC 1918, CGNAT, link-local, ULA.
pub const DEFAULT_ALLOW_NETS: &[&str] = &[
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
];
/// Config files looked for, in order, when `--config` is not given.
pub const CONFIG_CANDIDATES: &[&str] = &["glued.toml", "glued.json", "/etc/glued/glued.toml"];
/// Largest config file read.
pub const MAX_CONFIG_FILE_BYTES: u64 = 1 << 20;
/// Largest cluster secret file read.
pub const MAX_SECRET_FILE_BYTES: u64 = 64 << 10;
/// Where the default upstreams come from.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// systemd-resolved's stub listener: a resolv.conf that lists only it says
/// nothing about the real upstreams.
pub const RESOLVED_STUB: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 53);
/// Where systemd-resolved lists the real upstreams (Docker reads it too).
pub const RESOLVED_CONF: &str = "/run/systemd/resolve/resolv.conf";
/// Docker's embedded resolver: a loopback address that is never Glued itself
/// (Docker redirects its port 53 elsewhere), so it stays a valid upstream.
pub const DOCKER_EMBEDDED_DNS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);
pub use crate::table::MAX_LABEL_LEN;
/// Longest domain in text form without the trailing dot (RFC 1035 §2.3.4).
pub const MAX_DOMAIN_LEN: usize = 253;
/// Cluster protocol version of this release; a node also speaks the one
/// before it (see `gossip::auth`).
pub const PROTOCOL_VERSION: u8 = 4;
/// Shown instead of the cluster secret.
pub const REDACTED: &str = "<redacted>";

// ---------------------------------------------------------------------------
// Cluster keys

/// Fewest bytes of key material a cluster key may have.
pub const MIN_KEY_BYTES: usize = 16;
/// Most bytes of key material a cluster key may have.
pub const MAX_KEY_BYTES: usize = 64;
/// Bytes of key material `glued keygen` makes.
pub const KEYGEN_BYTES: usize = 32;
/// Most keys in a keyring (a rotation needs two).
pub const MAX_KEYRING_KEYS: usize = 16;
/// Bytes of a key id (shown as twice as many hex digits).
pub const KEY_ID_LEN: usize = 4;
/// What a cluster key must look like, for error lines.
pub const EXPECT_KEY: &str =
    "standard base64 of at least 16 bytes (run `glued keygen` to make a key)";

/// A short fingerprint of a cluster key: the first bytes of a
/// domain-separated SHA-256 of it. Safe to log and to send; it names a key
/// without revealing it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// One cluster key: its bytes (never printed) and its id.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey {
    bytes: Vec<u8>,
    id: KeyId,
}

impl ClusterKey {
    /// A key from raw bytes; `None` when shorter than [`MIN_KEY_BYTES`] or
    /// longer than [`MAX_KEY_BYTES`].
    pub fn from_bytes(bytes: &[u8]) -> Option<ClusterKey> {
        use sha2::Digest;
        if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&bytes.len()) {
            return None;
        }
        let digest = sha2::Sha256::new()
            .chain_update(b"glued/key-id/v1\0")
            .chain_update(bytes)
            .finalize();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        Some(ClusterKey {
            bytes: bytes.to_vec(),
            id: KeyId(id),
        })
    }

    /// Parses a key as `glued keygen` prints it: standard base64 (RFC 4648
    /// alphabet, canonical padding) of at least [`MIN_KEY_BYTES`]. A
    /// passphrase is never one: `_`, `-`, spaces and a length that is not a
    /// multiple of 4 are refused.
    pub fn parse(text: &str) -> Option<ClusterKey> {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .ok()?;
        ClusterKey::from_bytes(&bytes)
    }

    /// A new random key of [`KEYGEN_BYTES`] from the OS random source.
    pub fn generate() -> std::io::Result<ClusterKey> {
        let mut bytes = [0u8; KEYGEN_BYTES];
        getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(ClusterKey::from_bytes(&bytes).expect("KEYGEN_BYTES is a valid length"))
    }

    /// The key in base64, for `glued keygen` only. Never log it.
    pub fn to_base64(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(&self.bytes)
    }

    /// The raw key, for key derivation only. Never log it.
    pub fn expose(&self) -> &[u8] {
        &self.bytes
    }

    pub fn id(&self) -> KeyId {
        self.id
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey({})", self.id)
    }
}

/// The cluster keyring: the primary key (first, used to send and to prove
/// admission) and older or newer keys still accepted. Empty: single host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Keyring {
    keys: Vec<ClusterKey>,
}

impl Keyring {
    /// A keyring of `keys`, primary first; a key given twice is kept once.
    pub fn new(keys: Vec<ClusterKey>) -> Keyring {
        let mut out: Vec<ClusterKey> = Vec::with_capacity(keys.len());
        for k in keys {
            if !out.iter().any(|o| o.id == k.id && o.bytes == k.bytes) {
                out.push(k);
            }
        }
        Keyring { keys: out }
    }

    /// A one-key keyring of a fixed key made from `label` (tests and
    /// examples; never a default of the daemon).
    pub fn for_tests(label: &str) -> Keyring {
        use sha2::Digest;
        let bytes = sha2::Sha256::digest(label.as_bytes());
        Keyring::new(vec![ClusterKey::from_bytes(&bytes).expect("32 bytes")])
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key used to send; `None` for an empty keyring.
    pub fn primary(&self) -> Option<&ClusterKey> {
        self.keys.first()
    }

    /// Every key, primary first.
    pub fn keys(&self) -> &[ClusterKey] {
        &self.keys
    }

    /// `primary 1a2b3c4d, also accepted 5e6f7a8b`: ids only.
    pub fn describe(&self) -> String {
        match self.keys.split_first() {
            None => "none".to_string(),
            Some((p, [])) => format!("primary {}", p.id),
            Some((p, rest)) => format!(
                "primary {}, also accepted {}",
                p.id,
                rest.iter()
                    .map(|k| k.id.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        }
    }
}

/// A peer to join at start: an endpoint id, optionally with an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootstrapPeer {
    /// Endpoint id, 64 lowercase hex digits.
    pub id: String,
    /// `host:port` as given (host may be a name, resolved at join time).
    pub addr: Option<String>,
}

/// A `[[records]]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticRecord {
    /// Single label, lowercase.
    pub name: String,
    pub ip: IpAddr,
}

/// The validated configuration of one Glued.
#[derive(Clone, Debug)]
pub struct Config {
    /// The fixed DNS address (in `auto` mode [`AUTO_FIXED_BIND`]).
    pub dns_bind: SocketAddr,
    /// `auto`: also serve port `dns_bind.port()` on the gateway of each
    /// watched Docker network, as networks come and go.
    pub dns_bind_auto: bool,
    /// Further fixed addresses (`dns_bind` given as a list).
    pub dns_bind_more: Vec<SocketAddr>,
    pub dns_threads: usize,
    pub http_bind: SocketAddr,
    /// Lowercase, no trailing dot.
    pub domain: String,
    /// Single lowercase label.
    pub node_name: String,
    pub ttl_secs: u32,
    pub upstreams: Vec<SocketAddr>,
    /// The resolver file the default upstreams were read from; `None` when
    /// `upstreams` was set.
    pub upstreams_file: Option<PathBuf>,
    pub allow_nets: Vec<IpNet>,
    pub networks: Vec<String>,
    pub docker_host: String,
    pub data_dir: PathBuf,
    pub gossip_bind: SocketAddr,
    pub mdns: bool,
    pub lease_secs: u64,
    pub bootstrap_peers: Vec<BootstrapPeer>,
    pub topic_id: Option<[u8; 32]>,
    /// Empty: single host (no gossip, no mDNS).
    pub cluster_keys: Keyring,
    /// Highest cluster protocol version spoken (the one below is spoken too).
    pub protocol_version: u8,
    pub records: Vec<StaticRecord>,
    pub log: String,
    /// The forward cache (`cache_*` keys).
    pub cache: CacheConfig,
    // Health (ops).
    /// `/healthz` window for the Docker engine's last answer.
    pub docker_health_secs: u64,
}

// ---------------------------------------------------------------------------
// Keys

/// Every configuration key (except `records`, which only the file has).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    DnsBind,
    BindIp,
    DnsThreads,
    HttpBind,
    Domain,
    NodeName,
    Ttl,
    Upstreams,
    AllowNets,
    NetworkName,
    DockerHost,
    DataDir,
    GossipBind,
    Mdns,
    LeaseSecs,
    BootstrapPeers,
    TopicId,
    ClusterSecret,
    ClusterSecretFile,
    ProtocolVersion,
    Log,
    // The forward cache.
    CacheSize,
    CacheMaxTtl,
    CacheStaleSecs,
    // Health (ops).
    DockerHealthSecs,
}

/// How one key is spelled in each layer, for parsing, `--help` and docs.
#[derive(Debug)]
pub struct KeySpec {
    pub key: Key,
    /// Name in the config file.
    pub file: &'static str,
    /// Environment names, most preferred first.
    pub env: &'static [&'static str],
    /// Flag, with its leading `--`.
    pub flag: &'static str,
    /// Placeholder of the value in `--help`.
    pub value: &'static str,
    /// The default, in words.
    pub default: &'static str,
    /// One-line description.
    pub help: &'static str,
}

/// Every key, in [`Key`] order.
pub const KEYS: &[KeySpec] = &[
    KeySpec {
        key: Key::DnsBind,
        file: "dns_bind",
        env: &["GLUED_DNS_BIND"],
        flag: "--dns-bind",
        value: "ADDR",
        default: "auto",
        help: "UDP and TCP addresses of the DNS server (ip:port, comma-separated), or auto: \
               127.0.0.1:53 plus port 53 on the gateway of each watched Docker network",
    },
    KeySpec {
        key: Key::BindIp,
        file: "bind_ip",
        env: &["GLUED_BIND_IP"],
        flag: "--bind-ip",
        value: "IP",
        default: "unset",
        help: "replaces only the IP of dns_bind, keeping its port",
    },
    KeySpec {
        key: Key::DnsThreads,
        file: "dns_threads",
        env: &["GLUED_DNS_THREADS"],
        flag: "--dns-threads",
        value: "N",
        default: "number of cores",
        help: "UDP serving threads",
    },
    KeySpec {
        key: Key::HttpBind,
        file: "http_bind",
        env: &["GLUED_HTTP_BIND"],
        flag: "--http-bind",
        value: "ADDR",
        default: "127.0.0.1:9253",
        help: "address of the HTTP status server (/metrics /healthz /records /peers)",
    },
    KeySpec {
        key: Key::Domain,
        file: "domain",
        env: &["GLUED_DOMAIN"],
        flag: "--domain",
        value: "DOMAIN",
        default: "glued.internal",
        help: "cluster domain: names answer as NAME and NAME.DOMAIN",
    },
    KeySpec {
        key: Key::NodeName,
        file: "node_name",
        env: &["GLUED_NODE_NAME"],
        flag: "--node-name",
        value: "LABEL",
        default: "host name",
        help: "this host's name: NAME.NODE.DOMAIN answers with its containers only",
    },
    KeySpec {
        key: Key::Ttl,
        file: "ttl",
        env: &["GLUED_TTL"],
        flag: "--ttl",
        value: "SECS",
        default: "5",
        help: "TTL of local answers and of negative answers",
    },
    KeySpec {
        key: Key::Upstreams,
        file: "upstreams",
        env: &["GLUED_UPSTREAMS"],
        flag: "--upstreams",
        value: "LIST",
        default: "nameservers of /etc/resolv.conf (of /run/systemd/resolve/resolv.conf when \
                  it lists only 127.0.0.53), minus Glued's own addresses",
        help: "resolvers for every other name: ip or ip:port, comma-separated; none to disable",
    },
    KeySpec {
        key: Key::AllowNets,
        file: "allow_nets",
        env: &["GLUED_ALLOW_NETS"],
        flag: "--allow-nets",
        value: "LIST",
        default: "loopback, RFC 1918, 100.64/10, link-local, ULA",
        help: "client networks that get answers (others get REFUSED), comma-separated CIDRs",
    },
    KeySpec {
        key: Key::NetworkName,
        file: "network_name",
        env: &["GLUED_NETWORK_NAME", "GLUED_NETWORK"],
        flag: "--network-name",
        value: "LIST",
        default: "glued_net",
        help: "watched Docker networks, comma-separated",
    },
    KeySpec {
        key: Key::DockerHost,
        file: "docker_host",
        env: &["GLUED_DOCKER_HOST", "DOCKER_HOST"],
        flag: "--docker-host",
        value: "URL",
        default: "unix:///var/run/docker.sock",
        help: "Docker engine address",
    },
    KeySpec {
        key: Key::DataDir,
        file: "data_dir",
        env: &["GLUED_DATA_DIR"],
        flag: "--data-dir",
        value: "DIR",
        default: "/var/lib/glued",
        help: "directory of the node key (node.key)",
    },
    KeySpec {
        key: Key::GossipBind,
        file: "gossip_bind",
        env: &["GLUED_GOSSIP_BIND"],
        flag: "--gossip-bind",
        value: "ADDR",
        default: "0.0.0.0:9254",
        help: "UDP address of the gossip (iroh QUIC) endpoint",
    },
    KeySpec {
        key: Key::Mdns,
        file: "mdns",
        env: &["GLUED_MDNS"],
        flag: "--mdns",
        value: "BOOL",
        default: "true",
        help: "discover peers on the local network",
    },
    KeySpec {
        key: Key::LeaseSecs,
        file: "lease_secs",
        env: &["GLUED_LEASE_SECS"],
        flag: "--lease-secs",
        value: "SECS",
        default: "15",
        help: "a silent peer's records are dropped after this long",
    },
    KeySpec {
        key: Key::BootstrapPeers,
        file: "bootstrap_peers",
        env: &["GLUED_BOOTSTRAP_PEERS"],
        flag: "--bootstrap-peers",
        value: "LIST",
        default: "none",
        help: "peers to join: ENDPOINT_ID or ENDPOINT_ID@host:port, comma-separated",
    },
    KeySpec {
        key: Key::TopicId,
        file: "topic_id",
        env: &["GLUED_TOPIC_ID"],
        flag: "--topic-id",
        value: "HEX",
        default: "a fixed topic",
        help: "gossip topic, 64 hex digits",
    },
    KeySpec {
        key: Key::ClusterSecret,
        file: "cluster_secret",
        env: &["GLUED_CLUSTER_SECRET", "GLUED_CLUSTER_KEYS"],
        flag: "--cluster-secret",
        value: "KEYS",
        default: "none: single host, no gossip",
        help: "cluster keyring: keys from glued keygen, comma-separated, primary first \
               (prefer cluster_secret_file)",
    },
    KeySpec {
        key: Key::ClusterSecretFile,
        file: "cluster_secret_file",
        env: &["GLUED_CLUSTER_SECRET_FILE"],
        flag: "--cluster-secret-file",
        value: "PATH",
        default: "unset",
        help: "file of cluster keys, one per line, primary first, # comments; re-read on SIGHUP",
    },
    KeySpec {
        key: Key::ProtocolVersion,
        file: "protocol_version",
        env: &["GLUED_PROTOCOL_VERSION"],
        flag: "--protocol-version",
        value: "N",
        default: "3 (this release)",
        help: "highest cluster protocol version spoken (2: the previous release's; for tests)",
    },
    KeySpec {
        key: Key::Log,
        file: "log",
        env: &["RUST_LOG"],
        flag: "--log",
        value: "FILTER",
        default: "info",
        help: "log filter, RUST_LOG syntax",
    },
    // The forward cache.
    KeySpec {
        key: Key::CacheSize,
        file: "cache_size",
        env: &["GLUED_CACHE_SIZE"],
        flag: "--cache-size",
        value: "N",
        default: "10000",
        help: "forwarded answers kept in the cache; 0 turns the cache off",
    },
    KeySpec {
        key: Key::CacheMaxTtl,
        file: "cache_max_ttl",
        env: &["GLUED_CACHE_MAX_TTL"],
        flag: "--cache-max-ttl",
        value: "SECS",
        default: "86400",
        help: "longest time a forwarded answer (or negative answer) is cached",
    },
    KeySpec {
        key: Key::CacheStaleSecs,
        file: "cache_stale_secs",
        env: &["GLUED_CACHE_STALE_SECS"],
        flag: "--cache-stale-secs",
        value: "SECS",
        default: "86400",
        help: "how long after expiry a cached answer is served stale while the upstreams fail; 0: never",
    },
    // Health (ops).
    KeySpec {
        key: Key::DockerHealthSecs,
        file: "docker_health_secs",
        env: &["GLUED_DOCKER_HEALTH_SECS"],
        flag: "--docker-health-secs",
        value: "SECS",
        default: "30",
        help: "/healthz fails when the Docker engine has not answered for this long",
    },
];

impl Key {
    pub fn spec(self) -> &'static KeySpec {
        &KEYS[self as usize]
    }
    fn is_secret(self) -> bool {
        self == Key::ClusterSecret
    }
}

// ---------------------------------------------------------------------------
// Errors

/// Why no [`Config`] could be made. `Display` is always one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// A key has a value that cannot be used.
    Invalid {
        /// The key as the user wrote it: file key, environment name or flag.
        key: String,
        /// The value as given, quoted (or `<redacted>` for the secret).
        value: String,
        /// ` in PATH` for file keys, empty otherwise.
        place: String,
        expected: String,
    },
    /// Two keys that exclude each other are set in one layer.
    Conflict { first: String, second: String },
    /// The config file cannot be read or parsed.
    File {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    /// The command line cannot be parsed.
    Usage(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            ConfigError::Invalid {
                key,
                value,
                place,
                expected,
            } => format!("invalid {key}={value}{place}: expected {expected}"),
            ConfigError::Conflict { first, second } => {
                format!("{first} and {second} are both set: set only one of them")
            }
            ConfigError::File {
                path,
                line: Some(line),
                message,
            } => format!("config file {} line {line}: {message}", path.display()),
            ConfigError::File {
                path,
                line: None,
                message,
            } => format!("config file {}: {message}", path.display()),
            ConfigError::Usage(message) => format!("{message} (see glued --help)"),
        };
        f.write_str(&text.replace(['\r', '\n'], " "))
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------
// Raw layers

/// Where a setting came from; later layers win.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Layer {
    File(PathBuf),
    Env,
    Flag,
}

impl Layer {
    fn rank(&self) -> u8 {
        match self {
            Layer::File(_) => 1,
            Layer::Env => 2,
            Layer::Flag => 3,
        }
    }
}

/// A value before validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawValue {
    /// A string (or a number or boolean from a file, in text form).
    Text(String),
    /// An array from a file.
    List(Vec<String>),
    /// A file value of a shape no key takes (a table, a nested array…).
    Shape(&'static str),
}

/// One key as one layer gave it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    pub key: Key,
    /// The key as the user wrote it (`ttl`, `GLUED_TTL`, `--ttl`).
    pub written: String,
    pub value: RawValue,
    pub layer: Layer,
}

impl Setting {
    fn invalid(&self, expected: impl Into<String>) -> ConfigError {
        let value = if self.key.is_secret() {
            REDACTED.to_string()
        } else {
            match &self.value {
                RawValue::Text(s) => format!("{s:?}"),
                RawValue::List(v) => format!("{v:?}"),
                RawValue::Shape(shape) => (*shape).to_string(),
            }
        };
        let place = match &self.layer {
            Layer::File(path) => format!(" in {}", path.display()),
            _ => String::new(),
        };
        ConfigError::Invalid {
            key: self.written.clone(),
            value,
            place,
            expected: expected.into(),
        }
    }

    /// The value of a single-valued key, trimmed.
    fn text(&self, expected: &str) -> Result<&str, ConfigError> {
        match &self.value {
            RawValue::Text(s) => Ok(s.trim()),
            _ => Err(self.invalid(expected)),
        }
    }

    /// The items of a list key: a comma-separated string or an array.
    /// Empty items are dropped.
    fn items(&self, expected: &str) -> Result<Vec<&str>, ConfigError> {
        let items: Vec<&str> = match &self.value {
            RawValue::Text(s) => s.split(',').collect(),
            RawValue::List(v) => v.iter().map(String::as_str).collect(),
            RawValue::Shape(_) => return Err(self.invalid(expected)),
        };
        Ok(items
            .into_iter()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect())
    }

    /// Parses every item with `parse`; the first bad item fails the key.
    fn list<T>(
        &self,
        expected: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Vec<T>, ConfigError> {
        let mut out = Vec::new();
        for item in self.items(expected)? {
            match parse(item) {
                Some(v) => out.push(v),
                None => return Err(self.invalid(format!("{expected} ({item:?} is not one)"))),
            }
        }
        Ok(out)
    }

    /// Parses a single value with `parse`.
    fn one<T>(&self, expected: &str, parse: impl Fn(&str) -> Option<T>) -> Result<T, ConfigError> {
        parse(self.text(expected)?).ok_or_else(|| self.invalid(expected))
    }
}

/// What the command line asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Run,
    Id,
    Check,
    /// Print a new cluster key.
    Keygen,
    Help,
    Version,
    // Status views (ops): ask the local daemon's HTTP status.
    Health,
    Peers,
    Records,
    /// `glued cache flush`: empties the running daemon's forward cache.
    CacheFlush,
}

/// The command line, split but not validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Args {
    pub command: Command,
    /// `--config PATH`.
    pub config: Option<PathBuf>,
    /// Every key flag, in command-line order.
    pub flags: Vec<Setting>,
    /// `--json`: `glued peers` and `glued records` print the raw JSON.
    pub json: bool,
}

/// Splits the command line (without the program name): one optional
/// subcommand, `--config PATH`, and `--KEY VALUE` or `--KEY=VALUE` for every
/// key, in any order.
pub fn parse_args(args: &[String]) -> Result<Args, ConfigError> {
    let mut command = None;
    let mut help = false;
    let mut version = false;
    let mut config = None;
    let mut flags = Vec::new();
    let mut json = false;
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg == "-h" || arg == "--help" {
            help = true;
            continue;
        }
        if arg == "-V" || arg == "--version" {
            version = true;
            continue;
        }
        if arg == "--json" {
            json = true;
            continue;
        }
        if !arg.starts_with('-') {
            let c = match arg.as_str() {
                "run" => Command::Run,
                "id" => Command::Id,
                "check" => Command::Check,
                "keygen" => Command::Keygen,
                "help" => Command::Help,
                "version" => Command::Version,
                "health" => Command::Health,
                "peers" => Command::Peers,
                "records" => Command::Records,
                "cache" => match args.get(i).map(String::as_str) {
                    Some("flush") => {
                        i += 1;
                        Command::CacheFlush
                    }
                    _ => {
                        return Err(ConfigError::Usage(
                            "glued cache needs a subcommand: flush".into(),
                        ));
                    }
                },
                _ => return Err(ConfigError::Usage(format!("unknown command {arg:?}"))),
            };
            if command.is_some() {
                return Err(ConfigError::Usage(format!("unexpected argument {arg:?}")));
            }
            command = Some(c);
            continue;
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (arg.as_str(), None),
        };
        let spec = KEYS.iter().find(|s| s.flag == name);
        if spec.is_none() && name != "--config" {
            return Err(ConfigError::Usage(format!("unknown flag {name}")));
        }
        let value = match inline {
            Some(v) => v,
            None if i < args.len() => {
                i += 1;
                args[i - 1].clone()
            }
            None => return Err(ConfigError::Usage(format!("{name} needs a value"))),
        };
        match spec {
            Some(spec) => flags.push(Setting {
                key: spec.key,
                written: spec.flag.to_string(),
                value: RawValue::Text(value),
                layer: Layer::Flag,
            }),
            None => config = Some(PathBuf::from(value)),
        }
    }
    let command = if help {
        Command::Help
    } else if version {
        Command::Version
    } else {
        command.unwrap_or(Command::Run)
    };
    if json
        && !matches!(
            command,
            Command::Peers | Command::Records | Command::Help | Command::Version
        )
    {
        return Err(ConfigError::Usage(
            "--json goes with glued peers or glued records".into(),
        ));
    }
    Ok(Args {
        command,
        config,
        flags,
        json,
    })
}

/// Settings from the environment. Empty variables count as unset (so that
/// `KEY=${KEY:-}` in a Compose file means "default"). For keys with several
/// names, the first one set wins (`GLUED_NETWORK_NAME` over `GLUED_NETWORK`,
/// `GLUED_DOCKER_HOST` over `DOCKER_HOST`).
pub fn env_settings(env: &dyn Fn(&str) -> Option<String>) -> Vec<Setting> {
    let mut out = Vec::new();
    for spec in KEYS {
        let found = spec
            .env
            .iter()
            .find_map(|name| env(name).filter(|v| !v.is_empty()).map(|v| (name, v)));
        if let Some((name, value)) = found {
            out.push(Setting {
                key: spec.key,
                written: (*name).to_string(),
                value: RawValue::Text(value),
                layer: Layer::Env,
            });
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Config file

/// A file value of any shape; validation happens later, with the key's name.
#[derive(Clone, Debug, PartialEq)]
struct FileValue(RawValue);

impl<'de> Deserialize<'de> for FileValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FileValueVisitor { nested: false })
    }
}

struct FileValueVisitor {
    nested: bool,
}

impl<'de> serde::de::Visitor<'de> for FileValueVisitor {
    type Value = FileValue;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string, number, boolean or array")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FileValue, E> {
        Ok(FileValue(RawValue::Text(v.to_string())))
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<FileValue, E> {
        Ok(FileValue(RawValue::Text(v.to_string())))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<FileValue, E> {
        Ok(FileValue(RawValue::Text(v.to_string())))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<FileValue, E> {
        Ok(FileValue(RawValue::Text(v.to_string())))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<FileValue, E> {
        Ok(FileValue(RawValue::Text(v.to_string())))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<FileValue, E> {
        Ok(FileValue(RawValue::Shape("null")))
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<FileValue, E> {
        Ok(FileValue(RawValue::Shape("null")))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<FileValue, A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
            .is_some()
        {}
        Ok(FileValue(RawValue::Shape("a table")))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<FileValue, A::Error> {
        if self.nested {
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            return Ok(FileValue(RawValue::Shape("an array")));
        }
        let mut items = Vec::new();
        let mut bad = false;
        while let Some(item) = seq.next_element_seed(NestedSeed)? {
            match item.0 {
                RawValue::Text(s) => items.push(s),
                _ => bad = true,
            }
        }
        Ok(FileValue(if bad {
            RawValue::Shape("an array of non-scalar values")
        } else {
            RawValue::List(items)
        }))
    }
}

struct NestedSeed;

impl<'de> serde::de::DeserializeSeed<'de> for NestedSeed {
    type Value = FileValue;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<FileValue, D::Error> {
        d.deserialize_any(FileValueVisitor { nested: true })
    }
}

/// One `[[records]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRecord {
    name: FileValue,
    ip: FileValue,
}

/// The config file: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLayer {
    dns_bind: Option<FileValue>,
    bind_ip: Option<FileValue>,
    dns_threads: Option<FileValue>,
    http_bind: Option<FileValue>,
    domain: Option<FileValue>,
    node_name: Option<FileValue>,
    ttl: Option<FileValue>,
    upstreams: Option<FileValue>,
    allow_nets: Option<FileValue>,
    network_name: Option<FileValue>,
    docker_host: Option<FileValue>,
    data_dir: Option<FileValue>,
    gossip_bind: Option<FileValue>,
    mdns: Option<FileValue>,
    lease_secs: Option<FileValue>,
    bootstrap_peers: Option<FileValue>,
    topic_id: Option<FileValue>,
    cluster_secret: Option<FileValue>,
    cluster_secret_file: Option<FileValue>,
    protocol_version: Option<FileValue>,
    log: Option<FileValue>,
    records: Option<Vec<FileRecord>>,
    // The forward cache.
    cache_size: Option<FileValue>,
    cache_max_ttl: Option<FileValue>,
    cache_stale_secs: Option<FileValue>,
    // Health (ops).
    docker_health_secs: Option<FileValue>,
}

/// A parsed config file: its key settings and its records, unvalidated.
#[derive(Debug, Default)]
pub struct FileSettings {
    pub settings: Vec<Setting>,
    records: Vec<(usize, FileRecord)>,
    path: PathBuf,
}

impl FileLayer {
    fn into_settings(self, path: &Path) -> FileSettings {
        let values = [
            (Key::DnsBind, self.dns_bind),
            (Key::BindIp, self.bind_ip),
            (Key::DnsThreads, self.dns_threads),
            (Key::HttpBind, self.http_bind),
            (Key::Domain, self.domain),
            (Key::NodeName, self.node_name),
            (Key::Ttl, self.ttl),
            (Key::Upstreams, self.upstreams),
            (Key::AllowNets, self.allow_nets),
            (Key::NetworkName, self.network_name),
            (Key::DockerHost, self.docker_host),
            (Key::DataDir, self.data_dir),
            (Key::GossipBind, self.gossip_bind),
            (Key::Mdns, self.mdns),
            (Key::LeaseSecs, self.lease_secs),
            (Key::BootstrapPeers, self.bootstrap_peers),
            (Key::TopicId, self.topic_id),
            (Key::ClusterSecret, self.cluster_secret),
            (Key::ClusterSecretFile, self.cluster_secret_file),
            (Key::ProtocolVersion, self.protocol_version),
            (Key::Log, self.log),
            // The forward cache.
            (Key::CacheSize, self.cache_size),
            (Key::CacheMaxTtl, self.cache_max_ttl),
            (Key::CacheStaleSecs, self.cache_stale_secs),
            (Key::DockerHealthSecs, self.docker_health_secs),
        ];
        let settings = values
            .into_iter()
            .filter_map(|(key, v)| {
                v.map(|v| Setting {
                    key,
                    written: key.spec().file.to_string(),
                    value: v.0,
                    layer: Layer::File(path.to_path_buf()),
                })
            })
            .collect();
        FileSettings {
            settings,
            records: self
                .records
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .collect(),
            path: path.to_path_buf(),
        }
    }
}

/// Parses the text of a config file: JSON when the path ends in `.json`,
/// TOML otherwise.
pub fn parse_file(path: &Path, text: &str) -> Result<FileSettings, ConfigError> {
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let parsed: Result<FileLayer, (Option<usize>, String)> = if is_json {
        serde_json::from_str(text).map_err(|e| {
            let line = (e.line() > 0).then_some(e.line());
            // serde_json appends " at line L column C"; the line is shown apart.
            let msg = e.to_string();
            let msg = match msg.rfind(" at line ") {
                Some(at) => msg[..at].to_string(),
                None => msg,
            };
            (line, msg)
        })
    } else {
        toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            (line, e.message().trim().to_string())
        })
    };
    match parsed {
        Ok(layer) => Ok(layer.into_settings(path)),
        Err((line, message)) => Err(ConfigError::File {
            path: path.to_path_buf(),
            line,
            message: friendly_file_message(&message),
        }),
    }
}

/// serde's "unknown field `x`, expected one of …" becomes "unknown key `x`".
fn friendly_file_message(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((key, _)) = rest.split_once('`')
    {
        return format!("unknown key `{key}` (glued.toml.example lists every key)");
    }
    message.to_string()
}

/// The config file to read: `--config PATH`, else the first of
/// [`CONFIG_CANDIDATES`] that exists (relative ones from the current
/// directory), else none.
pub fn find_config_file(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = explicit {
        return Some(path.to_path_buf());
    }
    CONFIG_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Reads and parses a config file.
pub fn read_file(path: &Path) -> Result<FileSettings, ConfigError> {
    let text = read_small(path, MAX_CONFIG_FILE_BYTES).map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        line: None,
        message: format!("cannot read it: {e}"),
    })?;
    parse_file(path, &text)
}

/// Reads a UTF-8 file of at most `max` bytes.
fn read_small(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut text = String::new();
    file.take(max + 1).read_to_string(&mut text)?;
    if text.len() as u64 > max {
        return Err(std::io::Error::other(format!("larger than {max} bytes")));
    }
    Ok(text)
}

// ---------------------------------------------------------------------------
// Host facts

/// Facts about the host that defaults derive from; injectable for tests.
#[derive(Clone, Debug, Default)]
pub struct Host {
    pub hostname: String,
    /// Text of `/etc/resolv.conf` (empty when unreadable).
    pub resolv_conf: String,
    /// Where `resolv_conf` was read from.
    pub resolv_conf_path: PathBuf,
    /// Text of systemd-resolved's upstream list, read only when
    /// `resolv_conf` names nothing but its stub (empty otherwise).
    pub resolved_conf: String,
    /// Where `resolved_conf` was (or would be) read from.
    pub resolved_conf_path: PathBuf,
    /// Addresses of this host's interfaces.
    pub local_ips: Vec<IpAddr>,
    pub n_cores: usize,
}

impl Host {
    /// The facts of the machine this runs on.
    pub fn current() -> Host {
        Host::with_resolver_files(Path::new(RESOLV_CONF), Path::new(RESOLVED_CONF))
    }

    /// [`Host::current`] with the resolver files read from other paths.
    pub fn with_resolver_files(resolv_conf: &Path, resolved_conf: &Path) -> Host {
        let read = |path: &Path| read_small(path, MAX_CONFIG_FILE_BYTES).unwrap_or_default();
        let resolv_text = read(resolv_conf);
        let resolved_text = if only_resolved_stub(&resolv_text) {
            read(resolved_conf)
        } else {
            String::new()
        };
        Host {
            hostname: hostname(),
            resolv_conf: resolv_text,
            resolv_conf_path: resolv_conf.to_path_buf(),
            resolved_conf: resolved_text,
            resolved_conf_path: resolved_conf.to_path_buf(),
            local_ips: local_ips(),
            n_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// The default upstreams and the file they come from: the nameservers
    /// of `resolv_conf`, or of `resolved_conf` when the first lists only
    /// systemd-resolved's stub (127.0.0.53), minus Glued's own addresses.
    pub fn default_upstreams(&self, binds: &[SocketAddr]) -> (Vec<SocketAddr>, PathBuf) {
        let (text, path) = if only_resolved_stub(&self.resolv_conf) {
            (&self.resolved_conf, &self.resolved_conf_path)
        } else {
            (&self.resolv_conf, &self.resolv_conf_path)
        };
        let mut list = Vec::new();
        for (i, bind) in binds.iter().enumerate() {
            let own = default_upstreams(text, *bind, &self.local_ips);
            if i == 0 {
                list = own;
            } else {
                list.retain(|u| own.contains(u));
            }
        }
        (list, path.clone())
    }
}

/// True when the nameservers of a resolv.conf are systemd-resolved's stub
/// and nothing else.
fn only_resolved_stub(resolv_conf: &str) -> bool {
    let stub = IpAddr::V4(RESOLVED_STUB);
    let mut servers = nameservers(resolv_conf).peekable();
    servers.peek().is_some() && servers.all(|ip| ip == stub)
}

/// The nameserver addresses of a resolv.conf, in order. A scoped address
/// (`fe80::1%eth0`) cannot be kept in an IpAddr and is left out.
fn nameservers(resolv_conf: &str) -> impl Iterator<Item = IpAddr> + '_ {
    resolv_conf.lines().filter_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some("nameserver"))
            .then(|| words.next()?.parse::<IpAddr>().ok())
            .flatten()
    })
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // or truncates, and we stop at the first NUL or the end.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Addresses of every interface (empty when they cannot be listed).
fn local_ips() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we walk read-only and free
    // once with freeifaddrs.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        out.push(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}

/// The default node name: the host name's first label, lowercased, with
/// characters a DNS label cannot hold replaced by `-`.
pub fn default_node_name(hostname: &str) -> String {
    let first = hostname.split('.').next().unwrap_or("");
    let mut name: String = first
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(MAX_LABEL_LEN)
        .collect();
    name = name.trim_matches('-').to_string();
    if name.is_empty() {
        "glued".to_string()
    } else {
        name
    }
}

/// The default upstreams: the nameservers of `resolv_conf`, minus every
/// address Glued itself answers on (no loops). When `dns_bind` is a wildcard,
/// that is loopback and every local address on the same port — except
/// Docker's embedded resolver 127.0.0.11, whose port 53 Docker redirects.
pub fn default_upstreams(
    resolv_conf: &str,
    dns_bind: SocketAddr,
    local_ips: &[IpAddr],
) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for ip in nameservers(resolv_conf) {
        let upstream = SocketAddr::new(ip, DNS_PORT);
        if !is_own_address(upstream, dns_bind, local_ips) && !out.contains(&upstream) {
            out.push(upstream);
        }
    }
    out
}

/// True when `upstream` would reach Glued itself.
fn is_own_address(upstream: SocketAddr, dns_bind: SocketAddr, local_ips: &[IpAddr]) -> bool {
    if upstream.port() != dns_bind.port() {
        return false;
    }
    let ip = upstream.ip();
    if ip == dns_bind.ip() {
        return true;
    }
    if !dns_bind.ip().is_unspecified() {
        return false;
    }
    if ip == IpAddr::V4(DOCKER_EMBEDDED_DNS) {
        return false;
    }
    ip.is_loopback() || local_ips.contains(&ip)
}

// ---------------------------------------------------------------------------
// Value parsers (None = invalid)

fn parse_bind(s: &str, default_port: u16) -> Option<SocketAddr> {
    s.parse::<SocketAddr>()
        .ok()
        .or_else(|| parse_ip(s).map(|ip| SocketAddr::new(ip, default_port)))
}

/// An IP address, IPv6 optionally in brackets.
fn parse_ip(s: &str) -> Option<IpAddr> {
    let s = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    s.parse().ok()
}

fn parse_upstream(s: &str) -> Option<SocketAddr> {
    let addr = parse_bind(s, DNS_PORT)?;
    (addr.port() != 0 && !addr.ip().is_unspecified()).then_some(addr)
}

fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| parse_ip(s).map(IpNet::from))
        .map(|n| n.trunc())
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Some(true),
        "false" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

fn parse_in_range<T: std::str::FromStr + PartialOrd>(s: &str, min: T, max: T) -> Option<T> {
    s.parse::<T>().ok().filter(|v| *v >= min && *v <= max)
}

/// A single DNS label of letters, digits, `-` and `_`, not starting or
/// ending with `-`, lowercased ([`crate::table::label`]).
pub fn parse_label(s: &str) -> Option<String> {
    crate::table::label(s).map(String::from)
}

fn parse_domain(s: &str) -> Option<String> {
    let s = s.strip_suffix('.').unwrap_or(s);
    if s.is_empty() || s.len() > MAX_DOMAIN_LEN {
        return None;
    }
    let labels: Option<Vec<String>> = s.split('.').map(parse_label).collect();
    labels.map(|l| l.join("."))
}

fn parse_network(s: &str) -> Option<String> {
    let mut bytes = s.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
    let ok = first_ok
        && s.len() <= 255
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    ok.then(|| s.to_string())
}

fn parse_docker_host(s: &str) -> Option<String> {
    let (scheme, rest) = s.split_once("://")?;
    let ok = matches!(scheme, "unix" | "tcp" | "http" | "https") && !rest.is_empty();
    ok.then(|| s.to_string())
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// `ENDPOINT_ID` or `ENDPOINT_ID@host:port` (IPv6 hosts in brackets).
fn parse_peer(s: &str) -> Option<BootstrapPeer> {
    let (id, addr) = match s.split_once('@') {
        Some((id, addr)) => (id, Some(addr)),
        None => (s, None),
    };
    parse_hex32(id)?;
    let addr = match addr {
        None => None,
        Some(addr) => {
            let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
                let (ip, port) = rest.split_once("]:")?;
                ip.parse::<std::net::Ipv6Addr>().ok()?;
                (ip, port)
            } else {
                addr.rsplit_once(':')?
            };
            let host_ok = !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
            let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
            if !host_ok || !port_ok {
                return None;
            }
            Some(addr.to_string())
        }
    };
    Some(BootstrapPeer {
        id: id.to_ascii_lowercase(),
        addr,
    })
}

// ---------------------------------------------------------------------------
// Validation

const EXPECT_BIND: &str = "an address ip:port (IPv6 as [::1]:53)";
const EXPECT_DNS_BIND: &str =
    "auto, or a comma-separated list of addresses ip:port (IPv6 as [::1]:53)";

impl Config {
    /// A configuration for tests, examples and benchmarks, not the daemon's
    /// defaults: every socket on a loopback port the kernel chooses, no
    /// upstream, no watched network, mDNS off, loopback clients allowed, the
    /// node key in `data_dir`. Change fields with struct update syntax.
    pub fn loopback(data_dir: PathBuf) -> Config {
        let any_port: SocketAddr = "127.0.0.1:0".parse().expect("a socket address");
        Config {
            dns_bind: any_port,
            dns_bind_auto: false,
            dns_bind_more: vec![],
            dns_threads: 1,
            http_bind: any_port,
            domain: "glued.internal".into(),
            node_name: "node-a".into(),
            ttl_secs: 5,
            upstreams: vec![],
            upstreams_file: None,
            allow_nets: ["127.0.0.0/8", "::1/128"]
                .iter()
                .map(|n| n.parse().expect("a network"))
                .collect(),
            networks: vec![],
            docker_host: "unix:///var/run/docker.sock".into(),
            data_dir,
            gossip_bind: any_port,
            mdns: false,
            lease_secs: 15,
            bootstrap_peers: vec![],
            topic_id: None,
            cluster_keys: Keyring::for_tests("loopback-test-key"),
            protocol_version: PROTOCOL_VERSION,
            records: vec![],
            log: "info".into(),
            cache: CacheConfig::default(),
            docker_health_secs: DEFAULT_DOCKER_HEALTH_SECS,
        }
    }

    /// Parses the command line (without the program name), reads the config
    /// file and the environment through `env`, and validates everything.
    pub fn load(
        args: &[String],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(Command, Config), ConfigError> {
        let args = parse_args(args)?;
        let config = Config::from_args(&args, env, &Host::current())?;
        Ok((args.command, config))
    }

    /// Builds the configuration from parsed arguments: finds and reads the
    /// config file, then layers file < environment < flags.
    pub fn from_args(
        args: &Args,
        env: &dyn Fn(&str) -> Option<String>,
        host: &Host,
    ) -> Result<Config, ConfigError> {
        let file = match find_config_file(args.config.as_deref()) {
            Some(path) => read_file(&path)?,
            None => FileSettings::default(),
        };
        Config::from_layers(file, env_settings(env), args.flags.clone(), host)
    }

    /// Validates layered settings; later settings of a key win.
    pub fn from_layers(
        file: FileSettings,
        env: Vec<Setting>,
        flags: Vec<Setting>,
        host: &Host,
    ) -> Result<Config, ConfigError> {
        let FileSettings {
            settings: file_settings,
            records: file_records,
            path: file_path,
        } = file;
        let all: Vec<Setting> = file_settings.into_iter().chain(env).chain(flags).collect();
        let get = |key: Key| all.iter().rev().find(|s| s.key == key);

        let auto: SocketAddr = AUTO_FIXED_BIND.parse().expect("valid default");
        let (mut dns_bind, mut dns_bind_more, mut dns_bind_auto) = match get(Key::DnsBind) {
            Some(s) if matches!(&s.value, RawValue::Text(t) if t.trim().eq_ignore_ascii_case(AUTO_BIND)) => {
                (auto, Vec::new(), true)
            }
            Some(s) => {
                let mut list = s.list(EXPECT_DNS_BIND, |v| parse_bind(v, DNS_PORT))?;
                let mut seen = Vec::new();
                list.retain(|a| !seen.contains(a) && (seen.push(*a), true).1);
                if list.is_empty() {
                    return Err(s.invalid(EXPECT_DNS_BIND));
                }
                let first = list.remove(0);
                (first, list, false)
            }
            None => (auto, Vec::new(), true),
        };
        if let Some(s) = get(Key::BindIp) {
            let ip = s.one("an IP address (IPv4 or IPv6)", parse_ip)?;
            let dns_rank = get(Key::DnsBind).map_or(0, |d| d.layer.rank());
            if s.layer.rank() >= dns_rank {
                // One address: the (first) port with this IP.
                dns_bind.set_ip(ip);
                dns_bind_more.clear();
                dns_bind_auto = false;
            }
        }
        let dns_threads = match get(Key::DnsThreads) {
            Some(s) => s.one(
                &format!("a number of threads between 1 and {MAX_DNS_THREADS}"),
                |v| parse_in_range(v, 1, MAX_DNS_THREADS),
            )?,
            None => host.n_cores.clamp(1, MAX_DNS_THREADS),
        };
        let http_bind = match get(Key::HttpBind) {
            Some(s) => s.one(EXPECT_BIND, |v| parse_bind(v, 9253))?,
            None => DEFAULT_HTTP_BIND.parse().expect("valid default"),
        };
        let domain = match get(Key::Domain) {
            Some(s) => s.one(
                "a domain name of letters, digits and hyphens (like glued.internal)",
                parse_domain,
            )?,
            None => DEFAULT_DOMAIN.to_string(),
        };
        let node_name = match get(Key::NodeName) {
            Some(s) => s.one(
                "a single DNS label of letters, digits, - and _ (at most 63)",
                parse_label,
            )?,
            None => default_node_name(&host.hostname),
        };
        let ttl_secs = match get(Key::Ttl) {
            Some(s) => s.one(
                &format!("a number of seconds between 0 and {MAX_TTL_SECS}"),
                |v| parse_in_range(v, 0, MAX_TTL_SECS),
            )?,
            None => DEFAULT_TTL_SECS,
        };
        let (upstreams, upstreams_file) = match get(Key::Upstreams) {
            Some(s) if matches!(&s.value, RawValue::Text(t) if t.trim().eq_ignore_ascii_case("none")) => {
                (Vec::new(), None)
            }
            Some(s) => (
                s.list(
                    "a comma-separated list of ip or ip:port (IPv6 as [::1]:53), or none",
                    parse_upstream,
                )?,
                None,
            ),
            None => {
                let binds: Vec<SocketAddr> = std::iter::once(dns_bind)
                    .chain(dns_bind_more.iter().copied())
                    .collect();
                let (list, file) = host.default_upstreams(&binds);
                (list, Some(file))
            }
        };
        let allow_nets = match get(Key::AllowNets) {
            Some(s) => {
                let expected = "a comma-separated list of networks like 10.0.0.0/8 or fd00::/8";
                let nets = s.list(expected, parse_net)?;
                if nets.is_empty() {
                    return Err(s.invalid(format!("{expected}, at least one")));
                }
                nets
            }
            None => DEFAULT_ALLOW_NETS
                .iter()
                .map(|n| n.parse().expect("valid default"))
                .collect(),
        };
        let networks = match get(Key::NetworkName) {
            Some(s) => {
                let expected = "a comma-separated list of Docker network names";
                let nets = s.list(expected, parse_network)?;
                if nets.is_empty() {
                    return Err(s.invalid(format!("{expected}, at least one")));
                }
                nets
            }
            None => vec![DEFAULT_NETWORK.to_string()],
        };
        let docker_host = match get(Key::DockerHost) {
            Some(s) => s.one(
                "a Docker engine URL like unix:///var/run/docker.sock or tcp://host:2375",
                parse_docker_host,
            )?,
            None => DEFAULT_DOCKER_HOST.to_string(),
        };
        let data_dir = match get(Key::DataDir) {
            Some(s) => s.one("a directory path", |v| {
                (!v.is_empty()).then(|| PathBuf::from(v))
            })?,
            None => PathBuf::from(DEFAULT_DATA_DIR),
        };
        let gossip_bind = match get(Key::GossipBind) {
            Some(s) => s.one(EXPECT_BIND, |v| parse_bind(v, DEFAULT_GOSSIP_PORT))?,
            None => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), DEFAULT_GOSSIP_PORT),
        };
        let cluster_keys = cluster_keys(&all)?;
        // mDNS finds peers only for a cluster: on by default with a key.
        let mdns = match get(Key::Mdns) {
            Some(s) => s.one("true or false", parse_bool)?,
            None => !cluster_keys.is_empty(),
        };
        let lease_secs = match get(Key::LeaseSecs) {
            Some(s) => s.one(
                &format!("a number of seconds between {MIN_LEASE_SECS} and {MAX_LEASE_SECS}"),
                |v| parse_in_range(v, MIN_LEASE_SECS, MAX_LEASE_SECS),
            )?,
            None => DEFAULT_LEASE_SECS,
        };
        let bootstrap_peers = match get(Key::BootstrapPeers) {
            Some(s) => s.list(
                "a comma-separated list of ENDPOINT_ID or ENDPOINT_ID@host:port \
                 (ENDPOINT_ID is 64 hex digits, as printed by glued id)",
                parse_peer,
            )?,
            None => Vec::new(),
        };
        let topic_id = match get(Key::TopicId) {
            Some(s) => Some(s.one("64 hex digits", parse_hex32)?),
            None => None,
        };
        let protocol_version = match get(Key::ProtocolVersion) {
            Some(s) => s.one(
                &format!(
                    "a protocol version between {} and {PROTOCOL_VERSION}",
                    PROTOCOL_VERSION - 1
                ),
                |v| parse_in_range(v, PROTOCOL_VERSION - 1, PROTOCOL_VERSION),
            )?,
            None => PROTOCOL_VERSION,
        };
        let log = match get(Key::Log) {
            Some(s) => s.one("a log filter like info or glued=debug", |v| {
                (!v.is_empty()).then(|| v.to_string())
            })?,
            None => DEFAULT_LOG.to_string(),
        };
        let records = static_records(&file_path, file_records)?;
        let cache = cache_config(&get)?;
        let docker_health_secs = match get(Key::DockerHealthSecs) {
            Some(s) => s.one(
                &format!("a number of seconds between 1 and {MAX_DOCKER_HEALTH_SECS}"),
                |v| parse_in_range(v, 1, MAX_DOCKER_HEALTH_SECS),
            )?,
            None => DEFAULT_DOCKER_HEALTH_SECS,
        };
        Ok(Config {
            dns_bind,
            dns_bind_auto,
            dns_bind_more,
            dns_threads,
            http_bind,
            domain,
            node_name,
            ttl_secs,
            upstreams,
            upstreams_file,
            allow_nets,
            networks,
            docker_host,
            data_dir,
            gossip_bind,
            mdns,
            lease_secs,
            bootstrap_peers,
            topic_id,
            cluster_keys,
            protocol_version,
            records,
            log,
            cache,
            docker_health_secs,
        })
    }

    /// The effective values, one `key = value` line per key, in [`KEYS`]
    /// order; the secret shows as `<redacted>`.
    pub fn effective_lines(&self) -> Vec<String> {
        fn join<T: fmt::Display>(items: &[T]) -> String {
            if items.is_empty() {
                "none".to_string()
            } else {
                items.iter().map(T::to_string).collect::<Vec<_>>().join(",")
            }
        }
        let peers: Vec<String> = self
            .bootstrap_peers
            .iter()
            .map(|p| match &p.addr {
                Some(a) => format!("{}@{a}", p.id),
                None => p.id.clone(),
            })
            .collect();
        let records: Vec<String> = self
            .records
            .iter()
            .map(|r| format!("{}={}", r.name, r.ip))
            .collect();
        let topic = match &self.topic_id {
            Some(t) => t.iter().map(|b| format!("{b:02x}")).collect(),
            None => "the fixed default".to_string(),
        };
        let secret = if self.cluster_keys.is_empty() {
            "none (single host: gossip and mDNS off)".to_string()
        } else {
            format!("{REDACTED} (keys {})", self.cluster_keys.describe())
        };
        vec![
            if self.dns_bind_auto {
                format!(
                    "dns_bind = {AUTO_BIND} ({} and port {} on each watched network's gateway)",
                    self.dns_bind,
                    self.dns_bind.port()
                )
            } else {
                let more: String = self.dns_bind_more.iter().map(|a| format!(",{a}")).collect();
                format!("dns_bind = {}{more}", self.dns_bind)
            },
            format!("dns_threads = {}", self.dns_threads),
            format!("http_bind = {}", self.http_bind),
            format!("domain = {}", self.domain),
            format!("node_name = {}", self.node_name),
            format!("ttl = {}", self.ttl_secs),
            format!("upstreams = {}", join(&self.upstreams)),
            format!("allow_nets = {}", join(&self.allow_nets)),
            format!("network_name = {}", join(&self.networks)),
            format!("docker_host = {}", self.docker_host),
            format!("data_dir = {}", self.data_dir.display()),
            format!("gossip_bind = {}", self.gossip_bind),
            format!("mdns = {}", self.mdns),
            format!("lease_secs = {}", self.lease_secs),
            format!("bootstrap_peers = {}", join(&peers)),
            format!("topic_id = {topic}"),
            format!("cluster_secret = {secret}"),
            format!("protocol_version = {}", self.protocol_version),
            format!("records = {}", join(&records)),
            format!("log = {}", self.log),
            // The forward cache.
            format!("cache_size = {}", self.cache.size),
            format!("cache_max_ttl = {}", self.cache.max_ttl_secs),
            format!("cache_stale_secs = {}", self.cache.stale_secs),
            format!("docker_health_secs = {}", self.docker_health_secs),
        ]
    }
}

/// The forward cache's keys.
fn cache_config<'a>(get: &impl Fn(Key) -> Option<&'a Setting>) -> Result<CacheConfig, ConfigError> {
    let mut cache = CacheConfig::default();
    if let Some(s) = get(Key::CacheSize) {
        cache.size = s.one(
            &format!("a number of entries between 0 (off) and {MAX_CACHE_SIZE}"),
            |v| parse_in_range(v, 0, MAX_CACHE_SIZE),
        )?;
    }
    if let Some(s) = get(Key::CacheMaxTtl) {
        cache.max_ttl_secs = s.one(
            &format!("a number of seconds between 1 and {MAX_CACHE_SECS}"),
            |v| parse_in_range(v, 1, MAX_CACHE_SECS),
        )?;
    }
    if let Some(s) = get(Key::CacheStaleSecs) {
        cache.stale_secs = s.one(
            &format!("a number of seconds between 0 (never stale) and {MAX_CACHE_SECS}"),
            |v| parse_in_range(v, 0, MAX_CACHE_SECS),
        )?;
    }
    Ok(cache)
}

/// Keys a reload (`SIGHUP`) applies to the running daemon, by file name;
/// a change to any other key needs a restart. A component joins the reload
/// by adding its keys here and applying them in `Daemon::reload`.
pub const RELOADABLE_KEYS: &[&str] = &[
    "ttl",
    "upstreams",
    "allow_nets",
    "records",
    "log",
    "cluster_secret",
];

impl Config {
    /// The keys (file names, in [`Config::effective_lines`] order) whose
    /// effective value differs in `other`.
    pub fn changed_keys(&self, other: &Config) -> Vec<String> {
        let mut changed: Vec<String> = self
            .effective_lines()
            .iter()
            .zip(other.effective_lines().iter())
            .filter(|(a, b)| a != b)
            .filter_map(|(a, _)| a.split_once(" = ").map(|(key, _)| key.to_string()))
            .collect();
        // Shown redacted in the lines, so compared here.
        if self.cluster_keys != other.cluster_keys && !changed.iter().any(|k| k == "cluster_secret")
        {
            changed.push("cluster_secret".into());
        }
        changed
    }
}

/// The cluster keyring: from the last layer that sets `cluster_secret` or
/// `cluster_secret_file`; one layer setting both is an error; neither is
/// an empty keyring (single host).
fn cluster_keys(all: &[Setting]) -> Result<Keyring, ConfigError> {
    let is_secret = |s: &&Setting| matches!(s.key, Key::ClusterSecret | Key::ClusterSecretFile);
    let Some(last) = all.iter().rev().find(is_secret) else {
        return Ok(Keyring::default());
    };
    if let Some(other) = all
        .iter()
        .filter(is_secret)
        .find(|s| s.layer == last.layer && s.key != last.key)
    {
        return Err(ConfigError::Conflict {
            first: other.written.clone(),
            second: last.written.clone(),
        });
    }
    let mut keys = Vec::new();
    match last.key {
        Key::ClusterSecret => {
            let expected =
                format!("comma-separated cluster keys, primary first, each {EXPECT_KEY}");
            let items = last.items(&expected)?;
            for (i, item) in items.iter().enumerate() {
                match ClusterKey::parse(item) {
                    Some(k) => keys.push(k),
                    None if items.len() == 1 => {
                        return Err(last.invalid(format!("a cluster key: {EXPECT_KEY}")));
                    }
                    None => {
                        return Err(last.invalid(format!("{expected} (key {} is not one)", i + 1)));
                    }
                }
            }
        }
        _ => {
            let expected =
                format!("a file of cluster keys, one per line, primary first, each {EXPECT_KEY}");
            let path = last.text(&expected)?;
            let text = read_small(Path::new(path), MAX_SECRET_FILE_BYTES)
                .map_err(|e| last.invalid(format!("{expected} (cannot read it: {e})")))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                match ClusterKey::parse(line) {
                    Some(k) => keys.push(k),
                    None => {
                        return Err(last.invalid(format!("{expected} (line {} is not one)", n + 1)));
                    }
                }
            }
        }
    }
    if keys.is_empty() {
        return Err(last.invalid(format!("at least one cluster key, {EXPECT_KEY}")));
    }
    if keys.len() > MAX_KEYRING_KEYS {
        return Err(last.invalid(format!("at most {MAX_KEYRING_KEYS} cluster keys")));
    }
    Ok(Keyring::new(keys))
}

fn static_records(
    path: &Path,
    records: Vec<(usize, FileRecord)>,
) -> Result<Vec<StaticRecord>, ConfigError> {
    let mut out = Vec::with_capacity(records.len());
    for (i, record) in records {
        let setting = |field: &str, value: RawValue| Setting {
            key: Key::Domain, // any non-secret key: only used to format errors
            written: format!("records[{i}].{field}"),
            value,
            layer: Layer::File(path.to_path_buf()),
        };
        let name = setting("name", record.name.0).one(
            "a single DNS label of letters, digits, - and _ (at most 63), not ns",
            crate::table::record_name,
        )?;
        let ip = setting("ip", record.ip.0).one("an IPv4 or IPv6 address", parse_ip)?;
        out.push(StaticRecord {
            name: name.into(),
            ip,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn host() -> Host {
        Host {
            hostname: "Web-1.example.com".into(),
            resolv_conf: "nameserver 10.0.0.2\n".into(),
            local_ips: vec![],
            n_cores: 4,
            ..Host::default()
        }
    }

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    /// Loads from a TOML text, env pairs and flags.
    fn load(toml: &str, env: &[(&str, &str)], flags: &[&str]) -> Result<Config, ConfigError> {
        let file = parse_file(Path::new("glued.toml"), toml)?;
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let args = parse_args(&strings(flags))?;
        Config::from_layers(
            file,
            env_settings(&|k| env.get(k).cloned()),
            args.flags,
            &host(),
        )
    }

    fn err(toml: &str, env: &[(&str, &str)], flags: &[&str]) -> String {
        load(toml, env, flags).unwrap_err().to_string()
    }

    #[test]
    fn keys_are_in_enum_order() {
        for (i, spec) in KEYS.iter().enumerate() {
            assert_eq!(spec.key as usize, i, "{}", spec.file);
            assert_eq!(spec.flag, format!("--{}", spec.file.replace('_', "-")));
        }
    }

    #[test]
    fn defaults() {
        let c = load("", &[], &[]).unwrap();
        assert_eq!(c.dns_bind, "127.0.0.1:53".parse().unwrap());
        assert!(c.dns_bind_auto);
        assert_eq!(c.dns_threads, 4);
        assert_eq!(c.http_bind, "127.0.0.1:9253".parse().unwrap());
        assert_eq!(c.domain, "glued.internal");
        assert_eq!(c.node_name, "web-1");
        assert_eq!(c.ttl_secs, 5);
        assert_eq!(c.upstreams, vec!["10.0.0.2:53".parse().unwrap()]);
        assert_eq!(c.allow_nets.len(), DEFAULT_ALLOW_NETS.len());
        assert_eq!(c.networks, vec!["glued_net"]);
        assert_eq!(c.docker_host, DEFAULT_DOCKER_HOST);
        assert_eq!(c.gossip_bind.port(), DEFAULT_GOSSIP_PORT);
        assert!(!c.mdns, "no key: single host, mDNS off");
        assert_eq!(c.lease_secs, 15);
        assert!(c.cluster_keys.is_empty());
        assert_eq!(c.protocol_version, PROTOCOL_VERSION);
        assert_eq!(c.topic_id, None);
        assert_eq!(c.log, "info");
    }

    /// The forward cache keys: defaults, every layer, bounds.
    #[test]
    fn cache_keys_in_file_env_and_flags() {
        assert_eq!(load("", &[], &[]).unwrap().cache, CacheConfig::default());
        let c = load(
            "cache_size = 100\ncache_max_ttl = 60\ncache_stale_secs = 5",
            &[("GLUED_CACHE_MAX_TTL", "30")],
            &["--cache-stale-secs", "0"],
        )
        .unwrap();
        assert_eq!(
            c.cache,
            CacheConfig {
                size: 100,
                max_ttl_secs: 30,
                stale_secs: 0,
            }
        );
        assert_eq!(
            load("", &[("GLUED_CACHE_SIZE", "0")], &[])
                .unwrap()
                .cache
                .size,
            0
        );
        assert_eq!(
            err("", &[("GLUED_CACHE_SIZE", "-1")], &[]),
            "invalid GLUED_CACHE_SIZE=\"-1\": expected a number of entries between 0 (off) and 1000000"
        );
        assert_eq!(
            err("cache_max_ttl = 0", &[], &[]),
            "invalid cache_max_ttl=\"0\" in glued.toml: expected a number of seconds between 1 and 604800"
        );
        assert!(
            err("", &[], &["--cache-stale-secs=1y"]).starts_with("invalid --cache-stale-secs=")
        );
    }

    #[test]
    fn precedence_file_env_flag() {
        let c = load(
            "ttl = 7\ndomain = \"file.test\"\nlease_secs = 20",
            &[("GLUED_TTL", "8"), ("GLUED_LEASE_SECS", "30")],
            &["--ttl", "9"],
        )
        .unwrap();
        assert_eq!(c.ttl_secs, 9);
        assert_eq!(c.lease_secs, 30);
        assert_eq!(c.domain, "file.test");
        let c = load("", &[], &["--ttl=11"]).unwrap();
        assert_eq!(c.ttl_secs, 11);
    }

    #[test]
    fn bind_ip_keeps_port() {
        let c = load("", &[("GLUED_BIND_IP", "10.1.2.3")], &[]).unwrap();
        assert_eq!(c.dns_bind, "10.1.2.3:53".parse().unwrap());
        let c = load(
            "dns_bind = \"0.0.0.0:5353\"",
            &[("GLUED_BIND_IP", "::1")],
            &[],
        )
        .unwrap();
        assert_eq!(c.dns_bind, "[::1]:5353".parse().unwrap());
        // A flag's dns_bind outranks an environment bind_ip.
        let c = load(
            "",
            &[("GLUED_BIND_IP", "10.1.2.3")],
            &["--dns-bind", "127.0.0.1:99"],
        )
        .unwrap();
        assert_eq!(c.dns_bind, "127.0.0.1:99".parse().unwrap());
    }

    #[test]
    fn lists_from_env_and_file() {
        let c = load(
            "upstreams = [\"1.1.1.1\", \"[2606:4700::1111]:5353\"]",
            &[
                ("GLUED_ALLOW_NETS", "10.0.0.0/8, fd00::/8,192.168.1.7"),
                ("GLUED_NETWORK", "a,b"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(
            c.upstreams,
            vec![
                "1.1.1.1:53".parse().unwrap(),
                "[2606:4700::1111]:5353".parse().unwrap()
            ]
        );
        assert_eq!(c.allow_nets.len(), 3);
        assert_eq!(c.allow_nets[2].to_string(), "192.168.1.7/32");
        assert_eq!(c.networks, vec!["a", "b"]);
        let c = load(
            "upstreams = \"8.8.8.8:53,9.9.9.9\"",
            &[("GLUED_NETWORK", "x"), ("GLUED_NETWORK_NAME", "y")],
            &[],
        )
        .unwrap();
        assert_eq!(c.upstreams.len(), 2);
        assert_eq!(c.networks, vec!["y"]);
        let c = load("", &[("GLUED_UPSTREAMS", "none")], &[]).unwrap();
        assert!(c.upstreams.is_empty());
    }

    #[test]
    fn records_and_peers() {
        let id = "AB".repeat(32);
        let c = load(
            &format!(
                "bootstrap_peers = [\"{id}\", \"{id}@host-b:9254\", \"{id}@[fd00::1]:9254\"]\n\
                 [[records]]\nname = \"DB\"\nip = \"10.0.0.5\"\n\
                 [[records]]\nname = \"db\"\nip = \"fd00::5\"\n"
            ),
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(c.records.len(), 2);
        assert_eq!(c.records[0].name, "db");
        assert_eq!(c.records[1].ip, "fd00::5".parse::<IpAddr>().unwrap());
        assert_eq!(c.bootstrap_peers.len(), 3);
        assert_eq!(c.bootstrap_peers[0].id, "ab".repeat(32));
        assert_eq!(c.bootstrap_peers[1].addr.as_deref(), Some("host-b:9254"));
        assert_eq!(c.bootstrap_peers[2].addr.as_deref(), Some("[fd00::1]:9254"));
    }

    #[test]
    fn errors_name_key_and_value() {
        assert_eq!(
            err("", &[("GLUED_TTL", "abc")], &[]),
            "invalid GLUED_TTL=\"abc\": expected a number of seconds between 0 and 86400"
        );
        let e = err("ttl = \"x\"", &[], &[]);
        assert!(
            e.starts_with("invalid ttl=\"x\" in glued.toml: expected"),
            "{e}"
        );
        let e = err("", &[], &["--dns-threads", "0"]);
        assert!(e.starts_with("invalid --dns-threads=\"0\""), "{e}");
        let cases: &[(&str, &str)] = &[
            ("GLUED_DNS_BIND", "nope"),
            ("GLUED_BIND_IP", "1.2.3"),
            ("GLUED_HTTP_BIND", "x:y"),
            ("GLUED_DOMAIN", "bad..domain"),
            ("GLUED_NODE_NAME", "a.b"),
            ("GLUED_UPSTREAMS", "1.1.1.1,zz"),
            ("GLUED_ALLOW_NETS", "10.0.0.0/33"),
            ("GLUED_NETWORK_NAME", "-x"),
            ("GLUED_DOCKER_HOST", "ftp://x"),
            ("GLUED_GOSSIP_BIND", "1.2.3.4:99999"),
            ("GLUED_MDNS", "maybe"),
            ("GLUED_LEASE_SECS", "0"),
            ("GLUED_BOOTSTRAP_PEERS", "abc"),
            ("GLUED_TOPIC_ID", "12"),
        ];
        for (key, value) in cases {
            let e = err("", &[(key, value)], &[]);
            assert!(
                e.contains(key) && e.contains(value) && !e.contains('\n'),
                "{e}"
            );
        }
    }

    const KEY_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const KEY_B: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

    #[test]
    fn secret_never_in_errors() {
        let e = err("cluster_secret = \"\"", &[], &[]);
        assert!(
            e.starts_with("invalid cluster_secret=<redacted> in glued.toml: expected ")
                && e.contains("glued keygen"),
            "{e}"
        );
        let e = err("cluster_secret = [\"hunter2\"]", &[], &[]);
        assert!(!e.contains("hunter2"), "{e}");
        let e = err(
            "",
            &[
                ("GLUED_CLUSTER_SECRET", "s3cret"),
                ("GLUED_CLUSTER_SECRET_FILE", "/x"),
            ],
            &[],
        );
        assert!(
            e.contains("GLUED_CLUSTER_SECRET and GLUED_CLUSTER_SECRET_FILE")
                && !e.contains("s3cret"),
            "{e}"
        );
        let e = err(
            "",
            &[("GLUED_CLUSTER_SECRET_FILE", "/nonexistent/glued-secret")],
            &[],
        );
        assert!(
            e.contains("GLUED_CLUSTER_SECRET_FILE=\"/nonexistent/glued-secret\""),
            "{e}"
        );
    }

    #[test]
    fn only_base64_keys_of_16_bytes_or_more_are_keys() {
        for bad in [
            "my_secure_cluster_secret",
            "a long random secret",
            "hunter2",
            // Valid base64, but only 15 bytes.
            "AAECAwQFBgcICQoLDA0O",
            // Unpadded, URL-safe alphabet, trailing bits.
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh-=",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh9=",
        ] {
            assert!(ClusterKey::parse(bad).is_none(), "{bad}");
            let e = err("", &[("GLUED_CLUSTER_SECRET", bad)], &[]);
            assert!(
                e.starts_with("invalid GLUED_CLUSTER_SECRET=<redacted>: expected a cluster key")
                    && e.contains("run `glued keygen`")
                    && !e.contains(bad),
                "{e}"
            );
        }
        let k = ClusterKey::generate().unwrap();
        assert_eq!(k.expose().len(), KEYGEN_BYTES);
        assert_eq!(ClusterKey::parse(&k.to_base64()), Some(k.clone()));
        assert_ne!(ClusterKey::generate().unwrap(), k);
        let e = err(
            "",
            &[("GLUED_CLUSTER_SECRET", &format!("{KEY_A},nope"))],
            &[],
        );
        assert!(e.contains("key 2 is not one"), "{e}");
    }

    #[test]
    fn a_keyring_from_a_list_or_a_file_has_its_primary_first() {
        let c = load(
            "",
            &[("GLUED_CLUSTER_SECRET", &format!("{KEY_B}, {KEY_A}"))],
            &[],
        )
        .unwrap();
        let ids: Vec<KeyId> = c.cluster_keys.keys().iter().map(ClusterKey::id).collect();
        let a = ClusterKey::parse(KEY_A).unwrap();
        let b = ClusterKey::parse(KEY_B).unwrap();
        assert_eq!(ids, [b.id(), a.id()]);
        assert!(c.mdns, "a key turns mDNS on by default");
        let line = c
            .effective_lines()
            .into_iter()
            .find(|l| l.starts_with("cluster_secret"))
            .unwrap();
        assert_eq!(
            line,
            format!(
                "cluster_secret = <redacted> (keys primary {}, also accepted {})",
                b.id(),
                a.id()
            )
        );
        assert_eq!(b.id().to_string().len(), 2 * KEY_ID_LEN);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(
            &path,
            format!("# rotated in on 2026-11-26\n{KEY_A}\n\n  {KEY_B}  \n"),
        )
        .unwrap();
        let c = load(
            &format!("cluster_secret = \"{KEY_B}\""),
            &[("GLUED_CLUSTER_SECRET_FILE", path.to_str().unwrap())],
            &[],
        )
        .unwrap();
        assert_eq!(c.cluster_keys.primary(), Some(&a));
        assert_eq!(c.cluster_keys.keys().len(), 2);
        std::fs::write(&path, format!("{KEY_A}\nmy_secure_cluster_secret\n")).unwrap();
        let e = err(
            "",
            &[("GLUED_CLUSTER_SECRET_FILE", path.to_str().unwrap())],
            &[],
        );
        assert!(
            e.contains("line 2 is not one")
                && e.contains("glued keygen")
                && !e.contains("my_secure"),
            "{e}"
        );
        std::fs::write(&path, "# nothing yet\n").unwrap();
        let e = err(
            "",
            &[("GLUED_CLUSTER_SECRET_FILE", path.to_str().unwrap())],
            &[],
        );
        assert!(e.contains("at least one cluster key"), "{e}");
        let c = load(
            "",
            &[("GLUED_CLUSTER_SECRET", KEY_A)],
            &["--cluster-secret", KEY_B],
        )
        .unwrap();
        assert_eq!(c.cluster_keys.primary(), Some(&b));
        assert!(!format!("{c:?}").contains(KEY_B));
        let c = load("mdns = false", &[("GLUED_CLUSTER_SECRET", KEY_A)], &[]).unwrap();
        assert!(!c.mdns);
        // SPEC §7's name for the keyring is an alias of GLUED_CLUSTER_SECRET.
        let c = load(
            "",
            &[("GLUED_CLUSTER_KEYS", &format!("{KEY_B},{KEY_A}"))],
            &[],
        )
        .unwrap();
        assert_eq!(c.cluster_keys.primary(), Some(&b));
        assert_eq!(c.cluster_keys.keys().len(), 2);
    }

    #[test]
    fn file_errors() {
        let e = err("ttl = 5\nbogus = 1\n", &[], &[]);
        assert!(
            e.contains("unknown key `bogus`") && e.contains("line 2"),
            "{e}"
        );
        let e = err(
            "[[records]]\nname = \"db\"\nip = \"10.0.0.300\"\n",
            &[],
            &[],
        );
        assert!(e.contains("records[0].ip=\"10.0.0.300\""), "{e}");
        let e = err(
            "[[records]]\nname = \"db\"\nip = \"1.2.3.4\"\nport = 5\n",
            &[],
            &[],
        );
        assert!(e.contains("unknown key `port`"), "{e}");
        let e = err("ttl = { a = 1 }", &[], &[]);
        assert!(e.contains("invalid ttl=a table"), "{e}");
        let e = err("ttl = ", &[], &[]);
        assert!(
            e.starts_with("config file glued.toml line 1:") && !e.contains('\n'),
            "{e}"
        );
    }

    #[test]
    fn json_file() {
        let file = parse_file(
            Path::new("glued.json"),
            r#"{"ttl": 9, "mdns": false, "upstreams": ["1.1.1.1"], "records": [{"name": "db", "ip": "10.0.0.5"}]}"#,
        )
        .unwrap();
        let c = Config::from_layers(file, vec![], vec![], &host()).unwrap();
        assert_eq!(c.ttl_secs, 9);
        assert!(!c.mdns);
        assert_eq!(c.records.len(), 1);
        let e = parse_file(Path::new("glued.json"), r#"{"nope": 1}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown key `nope`") && e.contains("line 1"),
            "{e}"
        );
    }

    #[test]
    fn command_line() {
        let a = parse_args(&strings(&["--config", "a.toml", "check"])).unwrap();
        assert_eq!(
            (a.command, a.config.as_deref()),
            (Command::Check, Some(Path::new("a.toml")))
        );
        let a = parse_args(&strings(&["check", "--config=b.toml", "--ttl", "3"])).unwrap();
        assert_eq!(
            (a.command, a.config.as_deref()),
            (Command::Check, Some(Path::new("b.toml")))
        );
        assert_eq!(a.flags.len(), 1);
        assert_eq!(parse_args(&[]).unwrap().command, Command::Run);
        assert_eq!(
            parse_args(&strings(&["id", "--help"])).unwrap().command,
            Command::Help
        );
        assert_eq!(
            parse_args(&strings(&["-V"])).unwrap().command,
            Command::Version
        );
        assert!(
            parse_args(&strings(&["--bogus", "1"]))
                .unwrap_err()
                .to_string()
                .contains("--bogus")
        );
        assert!(
            parse_args(&strings(&["--ttl"]))
                .unwrap_err()
                .to_string()
                .contains("--ttl needs a value")
        );
        assert!(parse_args(&strings(&["run", "check"])).is_err());
        assert!(parse_args(&strings(&["frobnicate"])).is_err());
    }

    #[test]
    fn upstreams_skip_own_addresses() {
        let resolv = "# comment\nnameserver 127.0.0.1\nnameserver 127.0.0.11\nnameserver 192.168.1.10\n\
                      nameserver ::1\nnameserver fe80::1%eth0\nnameserver 10.0.0.2\nsearch x\n";
        let local = ["192.168.1.10".parse().unwrap()];
        let any: SocketAddr = "0.0.0.0:53".parse().unwrap();
        let ups: Vec<String> = default_upstreams(resolv, any, &local)
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(ups, ["127.0.0.11:53", "10.0.0.2:53"]);
        let specific: SocketAddr = "192.168.1.10:53".parse().unwrap();
        let ups = default_upstreams(resolv, specific, &local);
        assert_eq!(ups.len(), 4, "{ups:?}");
        let other_port: SocketAddr = "0.0.0.0:5353".parse().unwrap();
        assert_eq!(default_upstreams(resolv, other_port, &local).len(), 5);
    }

    #[test]
    fn dns_bind_auto_is_the_default_and_bind_ip_makes_it_one_address() {
        let c = load("dns_bind = \"AUTO\"", &[], &[]).unwrap();
        assert!(c.dns_bind_auto);
        assert_eq!(c.dns_bind, "127.0.0.1:53".parse().unwrap());
        assert!(c.effective_lines()[0].starts_with("dns_bind = auto"));
        let c = load("", &[("GLUED_BIND_IP", "10.1.2.3")], &[]).unwrap();
        assert!(!c.dns_bind_auto);
        assert_eq!(c.dns_bind, "10.1.2.3:53".parse().unwrap());
        let c = load("", &[], &["--dns-bind", "[::]:53"]).unwrap();
        assert!(!c.dns_bind_auto);
        assert_eq!(c.dns_bind, "[::]:53".parse().unwrap());
        let c = load(
            "dns_bind = [\"127.0.0.1:53\", \"10.0.0.1\", \"127.0.0.1:53\"]",
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(c.dns_bind, "127.0.0.1:53".parse().unwrap());
        assert_eq!(c.dns_bind_more, ["10.0.0.1:53".parse().unwrap()]);
        assert!(!c.dns_bind_auto);
        assert_eq!(
            c.effective_lines()[0],
            "dns_bind = 127.0.0.1:53,10.0.0.1:53"
        );
        let c = load("", &[("GLUED_DNS_BIND", "127.0.0.1:5353, [::1]:5353")], &[]).unwrap();
        assert_eq!(c.dns_bind_more, ["[::1]:5353".parse().unwrap()]);
        let c = load(
            "",
            &[
                ("GLUED_DNS_BIND", "127.0.0.1:5353,[::1]:5353"),
                ("GLUED_BIND_IP", "10.1.2.3"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.dns_bind, "10.1.2.3:5353".parse().unwrap());
        assert!(c.dns_bind_more.is_empty());
        let e = err("dns_bind = \"automatic\"", &[], &[]);
        assert!(
            e.contains("dns_bind") && e.contains("expected auto, or"),
            "{e}"
        );
    }

    #[test]
    fn upstreams_come_from_resolved_when_resolv_conf_lists_only_its_stub() {
        let dir = tempfile::tempdir().unwrap();
        let resolv = dir.path().join("resolv.conf");
        let resolved = dir.path().join("resolved.conf");
        std::fs::write(&resolved, "nameserver 192.0.2.7\nnameserver 2001:db8::7\n").unwrap();
        let auto: SocketAddr = AUTO_FIXED_BIND.parse().unwrap();
        std::fs::write(&resolv, "# stub\nnameserver 127.0.0.53\noptions edns0\n").unwrap();
        let host = Host::with_resolver_files(&resolv, &resolved);
        let (ups, file) = host.default_upstreams(&[auto]);
        assert_eq!(file, resolved);
        let ups: Vec<String> = ups.iter().map(|a| a.to_string()).collect();
        assert_eq!(ups, ["192.0.2.7:53", "[2001:db8::7]:53"]);
        // Another nameserver beside the stub: resolv.conf is used as it is.
        std::fs::write(&resolv, "nameserver 127.0.0.53\nnameserver 10.0.0.2\n").unwrap();
        let host = Host::with_resolver_files(&resolv, &resolved);
        let (ups, file) = host.default_upstreams(&[auto]);
        assert_eq!(file, resolv);
        assert_eq!(ups.len(), 2, "{ups:?}");
        // Through the whole configuration, the file is remembered.
        let c = Config::from_layers(FileSettings::default(), vec![], vec![], &host).unwrap();
        assert_eq!(c.upstreams_file.as_deref(), Some(resolv.as_path()));
        let c = load("upstreams = \"1.1.1.1\"", &[], &[]).unwrap();
        assert_eq!(c.upstreams_file, None);
    }

    #[test]
    fn changed_keys_name_what_differs() {
        let a = load(
            &format!("ttl = 5\ncluster_secret = \"{KEY_A}\"\n[[records]]\nname = \"db\"\nip = \"10.0.0.5\""),
            &[],
            &[],
        )
        .unwrap();
        let b = load(
            &format!(
                "ttl = 9\ndata_dir = \"/elsewhere\"\ncluster_secret = \"{KEY_B}\"\n\
                 [[records]]\nname = \"db\"\nip = \"10.0.0.6\""
            ),
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(a.changed_keys(&a.clone()), Vec::<String>::new());
        assert_eq!(
            a.changed_keys(&b),
            ["ttl", "data_dir", "cluster_secret", "records"]
        );
    }

    /// glued.toml.example documents every key, and its example values,
    /// uncommented, are valid.
    #[test]
    fn example_file_is_complete_and_valid() {
        let example = include_str!("../glued.toml.example");
        for spec in KEYS {
            assert!(
                example.contains(&format!("\n# {} = ", spec.file)),
                "{}",
                spec.file
            );
        }
        let is_setting = |rest: &str| {
            rest.starts_with("[[records]]")
                || (rest.starts_with(' ') && rest.trim_start().starts_with('"'))
                || rest
                    .split_once(" = ")
                    .is_some_and(|(k, _)| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        };
        let uncommented: String = example
            .lines()
            .filter(|l| !l.starts_with("# cluster_secret_file"))
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if is_setting(rest) => rest,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let file = parse_file(Path::new("glued.toml"), &uncommented).unwrap();
        assert!(file.settings.len() >= KEYS.len() - 1, "{uncommented}");
        let c = Config::from_layers(file, vec![], vec![], &host()).unwrap();
        assert_eq!(c.records.len(), 2);
        assert_eq!(c.dns_bind, "192.168.1.10:53".parse().unwrap());
    }

    #[test]
    fn node_name_default_is_a_label() {
        assert_eq!(default_node_name("Web-1.example.com"), "web-1");
        assert_eq!(default_node_name("my host!"), "my-host");
        assert_eq!(default_node_name(""), "glued");
        assert!(parse_label(&default_node_name(&"x".repeat(100))).is_some());
    }
}
