//! The name table: an immutable snapshot of every record Glued answers for.
//!
//! The registry thread is the only writer: it builds a new [`Table`] from its
//! record groups and publishes it through [`SharedTable`] (an `ArcSwap`). The
//! DNS threads read it with one `load()` per query.
//!
//! Invariant: every lookup here runs without allocating. Keys are lowercase
//! ASCII names *relative to the cluster domain* (`api`, `api.node-1`);
//! callers lowercase the query name into a stack buffer before looking it up.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use arc_swap::ArcSwap;

/// Longest DNS name in wire format (RFC 1035 §2.3.4).
pub const MAX_NAME_WIRE_LEN: usize = 255;

type FastMap<K, V> = HashMap<K, V, foldhash::fast::FixedState>;

/// Who published a group of records: a node of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Origin {
    /// Endpoint id (hex) of the node that owns the records.
    pub id: String,
    /// The node's `GLUED_NODE_NAME`, used for `name.<node>.<domain>`.
    pub node_name: String,
}

/// What produced a group, inside one origin.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// One `[[records]]` name of the configuration file.
    Static { name: String },
    /// One container on one watched network.
    Container { id: String, network: String },
}

impl Source {
    /// The family of the source, used to replace all groups of one kind at once.
    pub fn kind(&self) -> SourceKind {
        match self {
            Source::Static { .. } => SourceKind::Static,
            Source::Container { .. } => SourceKind::Container,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceKind {
    Static,
    Container,
}

/// A set of names that all resolve to the same addresses: one container on
/// one network, or one static name.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Group {
    /// Names relative to the domain, lowercase, single labels. The first one
    /// is the primary name, the target of PTR answers.
    pub names: Vec<String>,
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

/// Addresses answered for one name.
#[derive(Debug, Default)]
pub struct Entry {
    pub v4: Box<[Ipv4Addr]>,
    pub v6: Box<[Ipv6Addr]>,
}

/// The immutable snapshot the DNS threads answer from.
#[derive(Debug)]
pub struct Table {
    /// Lowercase domain without trailing dot, e.g. `glued.internal`.
    pub domain: String,
    /// Domain in wire format, lowercase (`\x05glued\x08internal\x00`).
    pub domain_wire: Box<[u8]>,
    pub ttl_secs: u32,
    /// Bumped on every rebuild; used as the SOA serial.
    pub serial: u32,
    names: FastMap<Box<[u8]>, Entry>,
    /// Address → primary name under the domain, wire format.
    reverse: FastMap<IpAddr, Box<[u8]>>,
    /// Every group, by owner, for `/records` and gossip full state.
    pub groups: Arc<BTreeMap<(Origin, Source), Group>>,
}

impl Table {
    /// An empty table for `domain` (lowercase, no trailing dot).
    pub fn empty(domain: &str, ttl_secs: u32) -> Table {
        Table::build(domain, ttl_secs, 0, Arc::new(BTreeMap::new()))
    }

    /// Builds the lookup maps from every group. `serial` should grow with
    /// every rebuild.
    pub fn build(
        domain: &str,
        ttl_secs: u32,
        serial: u32,
        groups: Arc<BTreeMap<(Origin, Source), Group>>,
    ) -> Table {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let domain_wire = name_to_wire(&domain);
        let mut v4: HashMap<String, Vec<Ipv4Addr>> = HashMap::new();
        let mut v6: HashMap<String, Vec<Ipv6Addr>> = HashMap::new();
        let mut reverse = FastMap::default();
        for ((origin, _source), group) in groups.iter() {
            let node = origin.node_name.to_ascii_lowercase();
            for name in &group.names {
                let name = name.to_ascii_lowercase();
                let pinned = format!("{name}.{node}");
                for key in [name, pinned] {
                    let a = v4.entry(key.clone()).or_default();
                    a.extend(&group.v4);
                    let b = v6.entry(key).or_default();
                    b.extend(&group.v6);
                }
            }
            if let Some(primary) = group.names.first() {
                let target = name_to_wire(&format!("{}.{domain}", primary.to_ascii_lowercase()));
                let target: Box<[u8]> = target;
                for ip in &group.v4 {
                    reverse
                        .entry(IpAddr::V4(*ip))
                        .or_insert_with(|| target.clone());
                }
                for ip in &group.v6 {
                    reverse
                        .entry(IpAddr::V6(*ip))
                        .or_insert_with(|| target.clone());
                }
            }
        }
        let mut names = FastMap::default();
        for (key, mut a) in v4 {
            a.sort_unstable();
            a.dedup();
            let mut b = v6.remove(&key).unwrap_or_default();
            b.sort_unstable();
            b.dedup();
            names.insert(
                key.into_bytes().into_boxed_slice(),
                Entry {
                    v4: a.into_boxed_slice(),
                    v6: b.into_boxed_slice(),
                },
            );
        }
        Table {
            domain,
            domain_wire,
            ttl_secs,
            serial,
            names,
            reverse,
            groups,
        }
    }

    /// Looks up a lowercase name relative to the domain (`api` or
    /// `api.node-1`). Never allocates.
    #[inline]
    pub fn lookup(&self, key: &[u8]) -> Option<&Entry> {
        self.names.get(key)
    }

    /// The primary name (wire format, under the domain) of an address.
    #[inline]
    pub fn reverse(&self, ip: &IpAddr) -> Option<&[u8]> {
        self.reverse.get(ip).map(|b| &**b)
    }

    /// Number of distinct names answered (pinned names included).
    pub fn n_names(&self) -> usize {
        self.names.len()
    }

    /// Number of (name, address) records across all groups.
    pub fn n_records(&self) -> usize {
        self.groups
            .values()
            .map(|g| g.names.len() * (g.v4.len() + g.v6.len()))
            .sum()
    }
}

/// Encodes a dotted name (no trailing dot needed) in DNS wire format.
/// Labels longer than 63 bytes are truncated; config validation rejects them
/// before they get here.
pub fn name_to_wire(name: &str) -> Box<[u8]> {
    let mut out = Vec::with_capacity(name.len() + 2);
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() {
            continue;
        }
        let label = &label.as_bytes()[..label.len().min(63)];
        out.push(label.len() as u8);
        out.extend_from_slice(label);
    }
    out.push(0);
    out.into_boxed_slice()
}

/// The table shared between the registry (writer) and the DNS threads.
pub type SharedTable = Arc<ArcSwap<Table>>;

/// A new shared table holding an empty snapshot.
pub fn shared(domain: &str, ttl_secs: u32) -> SharedTable {
    Arc::new(ArcSwap::from_pointee(Table::empty(domain, ttl_secs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(id: &str, node: &str) -> Origin {
        Origin {
            id: id.into(),
            node_name: node.into(),
        }
    }

    #[test]
    fn build_merges_replicas_and_pins_names_to_their_node() {
        let mut groups = BTreeMap::new();
        groups.insert(
            (origin("a", "host-a"), Source::Static { name: "api".into() }),
            Group {
                names: vec!["API".into()],
                v4: vec!["10.0.0.1".parse().unwrap()],
                v6: vec![],
            },
        );
        groups.insert(
            (origin("b", "host-b"), Source::Static { name: "api".into() }),
            Group {
                names: vec!["api".into()],
                v4: vec!["10.0.0.2".parse().unwrap()],
                v6: vec!["fd00::2".parse().unwrap()],
            },
        );
        let table = Table::build("Glued.Internal.", 5, 1, Arc::new(groups));
        assert_eq!(table.domain, "glued.internal");
        let all = table.lookup(b"api").unwrap();
        assert_eq!(all.v4.len(), 2);
        assert_eq!(all.v6.len(), 1);
        let pinned = table.lookup(b"api.host-a").unwrap();
        assert_eq!(&*pinned.v4, &["10.0.0.1".parse::<Ipv4Addr>().unwrap()]);
        assert!(pinned.v6.is_empty());
        assert!(table.lookup(b"nope").is_none());
        let ptr = table.reverse(&"fd00::2".parse().unwrap()).unwrap();
        assert_eq!(ptr, &*name_to_wire("api.glued.internal"));
    }
}
