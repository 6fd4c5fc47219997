//! The name table: an immutable snapshot of every record Glued answers for.
//!
//! The registry thread is the only writer: it publishes tables through
//! [`SharedTable`] (an `ArcSwap`), and the DNS threads read them with one
//! `load()` per query. [`Table::build`] makes a table from every group (at
//! start-up, in tests); otherwise the registry brings its spare copy up to
//! date entry by entry (the `pub(crate)` setters) while no reader holds it,
//! and swaps it in (see `registry.rs`).
//!
//! Invariants: every lookup here runs without allocating; a published table
//! is never mutated; an incrementally updated table answers exactly what
//! `Table::build` of the same groups answers. Keys are lowercase
//! ASCII names *relative to the cluster domain* (`api`, `api.node-1`);
//! callers lowercase the query name into a stack buffer before looking it up.
//! The maps hash with a per-map random seed: names come from containers, so
//! nobody can choose names that collide.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use arc_swap::ArcSwap;

/// Longest DNS name in wire format (RFC 1035 §2.3.4).
pub const MAX_NAME_WIRE_LEN: usize = 255;

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

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

/// Addresses answered for one name: sorted, without duplicates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub v4: Box<[Ipv4Addr]>,
    pub v6: Box<[Ipv6Addr]>,
}

impl Entry {
    /// Sorts and dedups the union of addresses collected for one name.
    fn from_union(mut v4: Vec<Ipv4Addr>, mut v6: Vec<Ipv6Addr>) -> Entry {
        v4.sort_unstable();
        v4.dedup();
        v6.sort_unstable();
        v6.dedup();
        Entry {
            v4: v4.into_boxed_slice(),
            v6: v6.into_boxed_slice(),
        }
    }
}

/// The immutable snapshot the DNS threads answer from.
///
/// Only the registry changes a table, and only one that no reader holds
/// (its spare copy, see `registry.rs`); once published it is never mutated.
#[derive(Debug)]
pub struct Table {
    /// Lowercase domain without trailing dot, e.g. `glued.internal`.
    pub domain: String,
    /// Domain in wire format, lowercase (`\x05glued\x08internal\x00`).
    pub domain_wire: Box<[u8]>,
    pub ttl_secs: u32,
    /// Bumped on every publish; used as the SOA serial.
    pub serial: u32,
    names: FastMap<Box<[u8]>, Entry>,
    /// Node label → number of pinned keys (`name.node`) under it: the
    /// empty non-terminals `<node>.<domain>.`.
    nodes: FastMap<Box<[u8]>, u32>,
    /// Address → primary name under the domain, wire format.
    reverse: FastMap<IpAddr, Box<[u8]>>,
    /// The keys of `reverse`, sorted: which reverse names lie above an
    /// address of the table.
    reverse_v4: Vec<u32>,
    reverse_v6: Vec<u128>,
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
    ///
    /// A name `n` of a group owned by node `node` answers under two keys,
    /// `n` and `n.node` (both lowercase); replicas of a key are merged
    /// (sorted union). An address points back (PTR) to the primary name of
    /// the first group holding it, in `groups` order.
    pub fn build(
        domain: &str,
        ttl_secs: u32,
        serial: u32,
        groups: Arc<BTreeMap<(Origin, Source), Group>>,
    ) -> Table {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let domain_wire = name_to_wire(&domain);
        let n_keys: usize = groups.values().map(|g| 2 * g.names.len()).sum();
        let n_addrs: usize = groups.values().map(|g| g.v4.len() + g.v6.len()).sum();
        // Name key → union of the addresses of every group answering it.
        type Union = FastMap<Box<[u8]>, (Vec<Ipv4Addr>, Vec<Ipv6Addr>)>;
        let mut union = Union::with_capacity_and_hasher(n_keys, Default::default());
        let mut reverse: FastMap<IpAddr, Box<[u8]>> =
            FastMap::with_capacity_and_hasher(n_addrs, Default::default());
        let mut key = Vec::with_capacity(MAX_NAME_WIRE_LEN);
        let mut target = Vec::with_capacity(MAX_NAME_WIRE_LEN);
        for ((origin, _source), group) in groups.iter() {
            for name in &group.names {
                for node in [None, Some(origin.node_name.as_str())] {
                    write_key(&mut key, name, node);
                    match union.get_mut(&key[..]) {
                        Some((v4, v6)) => {
                            v4.extend_from_slice(&group.v4);
                            v6.extend_from_slice(&group.v6);
                        }
                        None => {
                            union.insert(Box::from(&key[..]), (group.v4.clone(), group.v6.clone()));
                        }
                    }
                }
            }
            if let Some(primary) = group.names.first() {
                write_target(&mut target, primary, &domain_wire);
                let ips = group.v4.iter().map(|ip| IpAddr::V4(*ip));
                for ip in ips.chain(group.v6.iter().map(|ip| IpAddr::V6(*ip))) {
                    reverse.entry(ip).or_insert_with(|| Box::from(&target[..]));
                }
            }
        }
        let names: FastMap<Box<[u8]>, Entry> = union
            .into_iter()
            .map(|(key, (v4, v6))| (key, Entry::from_union(v4, v6)))
            .collect();
        let mut nodes = FastMap::default();
        for key in names.keys() {
            if let Some(node) = node_of(key) {
                *nodes.entry(Box::from(node)).or_insert(0) += 1;
            }
        }
        let (mut reverse_v4, mut reverse_v6) = (Vec::new(), Vec::new());
        for ip in reverse.keys() {
            match ip {
                IpAddr::V4(a) => reverse_v4.push(u32::from(*a)),
                IpAddr::V6(a) => reverse_v6.push(u128::from(*a)),
            }
        }
        reverse_v4.sort_unstable();
        reverse_v6.sort_unstable();
        Table {
            domain,
            domain_wire,
            ttl_secs,
            serial,
            names,
            nodes,
            reverse,
            reverse_v4,
            reverse_v6,
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

    /// Whether `label` (lowercase) is a node with pinned names: the empty
    /// non-terminal `<node>.<domain>.`. Never allocates.
    #[inline]
    pub fn is_node(&self, label: &[u8]) -> bool {
        self.nodes.contains_key(label)
    }

    /// Whether an address of the table starts with the first `bits` bits
    /// of `prefix` (its reverse name lies at or below the reverse name of
    /// that prefix). Never allocates.
    pub fn has_address_in(&self, prefix: IpAddr, bits: u32) -> bool {
        /// Whether a value of `sorted` has the high bits of `low` under `mask`.
        fn any_in<T: Copy + Ord + std::ops::BitAnd<Output = T>>(
            sorted: &[T],
            low: T,
            mask: T,
        ) -> bool {
            let at = sorted.partition_point(|&a| a < low);
            sorted.get(at).is_some_and(|&a| a & mask == low)
        }
        match prefix {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - bits.min(32)).unwrap_or(0);
                any_in(&self.reverse_v4, u32::from(a) & mask, mask)
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - bits.min(128)).unwrap_or(0);
                any_in(&self.reverse_v6, u128::from(a) & mask, mask)
            }
        }
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

    /// Every answered name (key relative to the domain) with its addresses,
    /// in no particular order.
    pub fn names(&self) -> impl Iterator<Item = (&[u8], &Entry)> {
        self.names.iter().map(|(k, e)| (&**k, e))
    }

    /// Every address with a PTR answer and its target (wire format), in no
    /// particular order.
    pub fn addresses(&self) -> impl Iterator<Item = (&IpAddr, &[u8])> {
        self.reverse.iter().map(|(ip, t)| (ip, &**t))
    }

    /// Sets the addresses of one name key (`v4`, `v6` sorted and deduped by
    /// the caller). Reuses the entry's storage when the counts are unchanged.
    pub(crate) fn set_name(&mut self, key: &[u8], v4: &[Ipv4Addr], v6: &[Ipv6Addr]) {
        match self.names.get_mut(key) {
            Some(entry) => {
                copy_into(&mut entry.v4, v4);
                copy_into(&mut entry.v6, v6);
            }
            None => {
                let entry = Entry {
                    v4: Box::from(v4),
                    v6: Box::from(v6),
                };
                self.names.insert(Box::from(key), entry);
                if let Some(node) = node_of(key) {
                    match self.nodes.get_mut(node) {
                        Some(n) => *n += 1,
                        None => {
                            self.nodes.insert(Box::from(node), 1);
                        }
                    }
                }
            }
        }
    }

    /// Forgets one name key.
    pub(crate) fn remove_name(&mut self, key: &[u8]) {
        if self.names.remove(key).is_some()
            && let Some(node) = node_of(key)
            && let Some(n) = self.nodes.get_mut(node)
        {
            *n -= 1;
            if *n == 0 {
                self.nodes.remove(node);
            }
        }
    }

    /// Points `ip` back to `target` (wire format, under the domain).
    pub(crate) fn set_reverse(&mut self, ip: IpAddr, target: &[u8]) {
        match self.reverse.get_mut(&ip) {
            Some(old) if **old == *target => {}
            Some(old) => *old = Box::from(target),
            None => {
                self.reverse.insert(ip, Box::from(target));
                match ip {
                    IpAddr::V4(a) => sorted_insert(&mut self.reverse_v4, u32::from(a)),
                    IpAddr::V6(a) => sorted_insert(&mut self.reverse_v6, u128::from(a)),
                }
            }
        }
    }

    /// Forgets the PTR answer of `ip`.
    pub(crate) fn remove_reverse(&mut self, ip: &IpAddr) {
        if self.reverse.remove(ip).is_some() {
            match ip {
                IpAddr::V4(a) => sorted_remove(&mut self.reverse_v4, u32::from(*a)),
                IpAddr::V6(a) => sorted_remove(&mut self.reverse_v6, u128::from(*a)),
            }
        }
    }

    /// Sets (or with `None` removes) one group of [`Table::groups`]. Clones
    /// the map only when someone else holds it.
    pub(crate) fn set_group(&mut self, key: &(Origin, Source), group: Option<&Group>) {
        let groups = Arc::make_mut(&mut self.groups);
        match (group, groups.get_mut(key)) {
            (Some(group), Some(slot)) => slot.clone_from(group),
            (Some(group), None) => {
                groups.insert(key.clone(), group.clone());
            }
            (None, _) => {
                groups.remove(key);
            }
        }
    }
}

/// The node of a pinned key (`node` of `name.node`).
fn node_of(key: &[u8]) -> Option<&[u8]> {
    let dot = key.iter().position(|&b| b == b'.')?;
    Some(&key[dot + 1..])
}

fn sorted_insert<T: Ord>(sorted: &mut Vec<T>, value: T) {
    if let Err(at) = sorted.binary_search(&value) {
        sorted.insert(at, value);
    }
}

fn sorted_remove<T: Ord>(sorted: &mut Vec<T>, value: T) {
    if let Ok(at) = sorted.binary_search(&value) {
        sorted.remove(at);
    }
}

/// Overwrites `slot` with `from`, in place when the lengths match.
fn copy_into<T: Copy>(slot: &mut Box<[T]>, from: &[T]) {
    if slot.len() == from.len() {
        slot.copy_from_slice(from);
    } else {
        *slot = Box::from(from);
    }
}

/// Writes the lookup key of `name` into `key`: the lowercase name, then
/// `.node` (lowercase) when `node` is given.
pub fn write_key(key: &mut Vec<u8>, name: &str, node: Option<&str>) {
    key.clear();
    key.extend(name.bytes().map(|b| b.to_ascii_lowercase()));
    if let Some(node) = node {
        key.push(b'.');
        key.extend(node.bytes().map(|b| b.to_ascii_lowercase()));
    }
}

/// Writes the PTR target of `primary` into `out`: the lowercase name in wire
/// format followed by `domain_wire`; the same bytes as
/// `name_to_wire("{primary}.{domain}")`.
pub fn write_target(out: &mut Vec<u8>, primary: &str, domain_wire: &[u8]) {
    out.clear();
    for label in primary.split('.').filter(|l| !l.is_empty()) {
        let label = &label.as_bytes()[..label.len().min(63)];
        out.push(label.len() as u8);
        out.extend(label.iter().map(|b| b.to_ascii_lowercase()));
    }
    out.extend_from_slice(domain_wire);
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

/// Longest DNS label (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;

/// True for a name Glued answers: one lowercase DNS label of 1 to 63 of
/// `a-z 0-9 - _`, not starting or ending with `-`. Underscores are kept
/// because Docker and Compose v1 names use them and DNS carries them fine.
pub fn is_valid_label(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_LABEL_LEN
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// `name` lowercased, when that is a valid label ([`is_valid_label`]).
pub fn label(name: &str) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    is_valid_label(&lower).then_some(lower)
}

/// Labels no container or record may take as a name: `ns` is the target of
/// the apex NS record, `ns.<domain>.`, answered with the server's own
/// address.
pub const RESERVED_NAMES: [&str; 1] = ["ns"];

/// True for a name a container or record may have: a valid label
/// ([`is_valid_label`]) that is not reserved ([`RESERVED_NAMES`]).
pub fn is_valid_name(name: &str) -> bool {
    is_valid_label(name) && !RESERVED_NAMES.contains(&name)
}

/// `name` lowercased, when that is a valid name ([`is_valid_name`]).
pub fn record_name(name: &str) -> Option<String> {
    label(name).filter(|n| !RESERVED_NAMES.contains(&n.as_str()))
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

    fn groups(names: &[(&str, &str, &str)]) -> Arc<BTreeMap<(Origin, Source), Group>> {
        let mut groups = BTreeMap::new();
        for (node, name, ip) in names {
            groups.insert(
                (
                    origin(node, node),
                    Source::Static {
                        name: (*name).into(),
                    },
                ),
                Group {
                    names: vec![(*name).into()],
                    v4: vec![ip.parse().unwrap()],
                    v6: vec![],
                },
            );
        }
        Arc::new(groups)
    }

    /// Names come from containers: two tables of the same names must not
    /// hash them alike (a fixed seed lets anyone pick colliding names).
    #[test]
    fn each_table_hashes_names_with_its_own_random_seed() {
        let names: Vec<(String, String)> = (0..64)
            .map(|i| (format!("name-{i}"), format!("10.1.0.{i}")))
            .collect();
        let list: Vec<(&str, &str, &str)> = names
            .iter()
            .map(|(n, ip)| ("host", n.as_str(), ip.as_str()))
            .collect();
        let order = |t: &Table| t.names().map(|(k, _)| k.to_vec()).collect::<Vec<_>>();
        let a = Table::build("glued.internal", 5, 1, groups(&list));
        let b = Table::build("glued.internal", 5, 1, groups(&list));
        assert_ne!(order(&a), order(&b), "same hash order twice");
    }

    #[test]
    fn nodes_and_reverse_prefixes_follow_incremental_updates() {
        let mut t = Table::build(
            "glued.internal",
            5,
            1,
            groups(&[("host-a", "api", "10.0.0.1"), ("host-b", "web", "10.0.1.2")]),
        );
        assert!(t.is_node(b"host-a") && t.is_node(b"host-b") && !t.is_node(b"api"));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(t.has_address_in(ip("10.0.0.0"), 24));
        assert!(t.has_address_in(ip("10.0.1.2"), 32));
        assert!(t.has_address_in(ip("10.0.0.0"), 8));
        assert!(!t.has_address_in(ip("10.0.2.0"), 24));
        assert!(!t.has_address_in(ip("fd00::"), 8));
        t.remove_name(b"web.host-b");
        assert!(!t.is_node(b"host-b"));
        t.set_name(b"db.host-c", &[], &[]);
        assert!(t.is_node(b"host-c"));
        t.remove_reverse(&ip("10.0.1.2"));
        assert!(!t.has_address_in(ip("10.0.1.0"), 24));
        t.set_reverse(ip("fd00::5"), b"\x02db\x00");
        assert!(t.has_address_in(ip("fd00::"), 16));
        assert!(t.has_address_in(ip("fd00::5"), 128));
        assert!(!t.has_address_in(ip("fd00::6"), 128));
    }
}
