//! The name table: an immutable snapshot of every record Glued answers for.
//!
//! The registry thread is the only writer: it publishes tables through
//! [`SharedTable`] (an `ArcSwap`), and the DNS threads read them with one
//! `load()` per query. [`Table::build`] makes a table from every group (at
//! start-up, in tests); otherwise the registry clones the published table
//! (which shares its shards) and brings the clone up to date entry by entry
//! (the `pub(crate)` setters copy the shards they touch), then swaps it in
//! (see `registry.rs`).
//!
//! Invariants: every lookup here runs without allocating; a published table
//! is never mutated (a shard is copied before a shared one is written); an
//! incrementally updated table answers exactly what `Table::build` of the
//! same groups answers. Keys are lowercase
//! ASCII names *relative to the cluster domain* (`api`, `api.node-1`);
//! callers lowercase the query name into a stack buffer before looking it up.
//! A key's hash under a random seed per built table picks its shard and
//! probes the shard's map (the address maps likewise): names come from
//! containers, so nobody can choose names that collide.
//!
//! A pinned key `name.node` held by exactly the holders of `name`, all of
//! `node` (the common case: a name held by one node), has no slot: a lookup
//! that misses a key with a dot looks its base up and answers the base's
//! entry when the base implies the key ([`implied_node`]). Unpinned keys
//! cost one hash lookup as before; such pinned keys two. The writer gives
//! an implied key a slot (a copy) before it or its base changes, and drops
//! it again once implied ([`Table::compact`]), so a change never alters
//! what another key answers, and the slots stay those of a fresh build.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use compact_str::CompactString;
use smallvec::SmallVec;

/// Longest DNS name in wire format (RFC 1035 §2.3.4).
pub const MAX_NAME_WIRE_LEN: usize = 255;

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Who published a group of records: a node of the cluster.
///
/// Shared strings: every group of an origin holds the same two (the
/// registry hands a new group the strings of the origin's other groups), so
/// a peer's 10 000 groups do not carry 10 000 copies of its 64-hex id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Origin {
    /// Endpoint id (hex) of the node that owns the records.
    pub id: Arc<str>,
    /// The node's `GLUED_NODE_NAME`, used for `name.<node>.<domain>`.
    pub node_name: Arc<str>,
}

/// A group's owner and producer: the key of every group.
pub type GroupKey = (Origin, Source);

/// One group with its key, in one allocation that the registry, every
/// table it publishes and their readers share.
#[derive(Debug, PartialEq, Eq)]
pub struct Held {
    pub key: GroupKey,
    pub group: Group,
}

/// A [`Held`] group ordered by its key alone.
#[derive(Clone, Debug)]
struct ByKey(Arc<Held>);

impl PartialEq for ByKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.key == other.0.key
    }
}

impl Eq for ByKey {}

impl PartialOrd for ByKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ByKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.key.cmp(&other.0.key)
    }
}

impl std::borrow::Borrow<GroupKey> for ByKey {
    fn borrow(&self) -> &GroupKey {
        &self.0.key
    }
}

/// Every group, in key order: a persistent B-tree of shared [`Held`]
/// groups. A clone costs one pointer and a change copies one path of
/// nodes, so the registry and each table it publishes hold the same groups
/// instead of a copy each.
#[derive(Clone, Default)]
pub struct Groups(imbl::OrdSet<ByKey>);

impl Groups {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every group with its key, in key order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&GroupKey, &Group)> + '_ {
        self.0.iter().map(|h| (&h.0.key, &h.0.group))
    }

    /// The groups from `lo` (included) on, in key order.
    pub fn range_from<'a>(
        &'a self,
        lo: &GroupKey,
    ) -> impl Iterator<Item = (&'a GroupKey, &'a Group)> + use<'a> {
        use std::ops::Bound;
        self.0
            .range::<_, GroupKey>((Bound::Included(lo), Bound::Unbounded))
            .map(|h| (&h.0.key, &h.0.group))
    }

    /// Every shared group, in key order.
    pub(crate) fn held_iter(&self) -> impl Iterator<Item = &Arc<Held>> + '_ {
        self.0.iter().map(|h| &h.0)
    }

    /// The shared groups from `lo` (included) on, in key order.
    pub(crate) fn held_from<'a>(
        &'a self,
        lo: &GroupKey,
    ) -> impl Iterator<Item = &'a Arc<Held>> + use<'a> {
        use std::ops::Bound;
        self.0
            .range::<_, GroupKey>((Bound::Included(lo), Bound::Unbounded))
            .map(|h| &h.0)
    }

    pub fn get(&self, key: &GroupKey) -> Option<&Group> {
        self.0.get(key).map(|h| &h.0.group)
    }

    pub(crate) fn held(&self, key: &GroupKey) -> Option<&Arc<Held>> {
        self.0.get(key).map(|h| &h.0)
    }

    /// Inserts or replaces the group of `held.key`.
    pub(crate) fn insert(&mut self, held: Arc<Held>) -> Option<Arc<Held>> {
        self.0.insert(ByKey(held)).map(|h| h.0)
    }

    pub(crate) fn remove(&mut self, key: &GroupKey) -> Option<Arc<Held>> {
        self.0.remove(key).map(|h| h.0)
    }

    /// Whether both are the same version (one is a clone of the other,
    /// unchanged since): equal without comparing a group.
    pub fn ptr_eq(&self, other: &Groups) -> bool {
        self.0.ptr_eq(&other.0)
    }
}

impl PartialEq for Groups {
    fn eq(&self, other: &Self) -> bool {
        self.ptr_eq(other) || (self.len() == other.len() && self.iter().eq(other.iter()))
    }
}

impl Eq for Groups {}

impl std::fmt::Debug for Groups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl FromIterator<(GroupKey, Group)> for Groups {
    fn from_iter<I: IntoIterator<Item = (GroupKey, Group)>>(iter: I) -> Groups {
        Groups(
            iter.into_iter()
                .map(|(key, group)| ByKey(Arc::new(Held { key, group })))
                .collect(),
        )
    }
}

impl From<BTreeMap<GroupKey, Group>> for Groups {
    fn from(map: BTreeMap<GroupKey, Group>) -> Groups {
        map.into_iter().collect()
    }
}

impl From<Arc<BTreeMap<GroupKey, Group>>> for Groups {
    fn from(map: Arc<BTreeMap<GroupKey, Group>>) -> Groups {
        Arc::unwrap_or_clone(map).into()
    }
}

/// What produced a group, inside one origin.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// One `[[records]]` name of the configuration file.
    Static { name: CompactString },
    /// One container on one watched network.
    Container {
        id: CompactString,
        network: CompactString,
    },
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

/// A group's names: one name of up to 24 bytes is kept inline, without an
/// allocation of its own.
pub type Names = SmallVec<[CompactString; 1]>;
/// A group's IPv4 addresses: up to 4 kept inline (as big as a `Vec`).
pub type V4Addrs = SmallVec<[Ipv4Addr; 4]>;
/// A group's IPv6 addresses: one kept inline (as big as a `Vec`).
pub type V6Addrs = SmallVec<[Ipv6Addr; 1]>;

/// A set of names that all resolve to the same addresses: one container on
/// one network, or one static name.
///
/// A group of one short name (up to 24 bytes) and a few addresses, with no
/// scope and no SRV port, owns no allocation: a peer's 10 000 static names
/// cost the registry one shared [`Held`] each, nothing more (issue 9).
/// Serialized as if its lists were `Vec`s and its strings `String`s.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Group {
    /// Names relative to the domain, lowercase, single labels. The first one
    /// is the primary name, the target of PTR and SRV answers.
    pub names: Names,
    pub v4: V4Addrs,
    pub v6: V6Addrs,
    /// Compose project and service (both valid labels, or neither): the
    /// group also answers `service.project` (SPEC §3). Boxed: 8 bytes in
    /// every group held, 48 more only in those with a scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Box<Scope>>,
    /// Docker's health status of the container.
    #[serde(default)]
    pub health: Health,
    /// Ports published as SRV records (label `glued.srv`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub srv: Vec<SrvPort>,
}

/// A Compose project and service: `service.project.<domain>.`.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Scope {
    pub project: CompactString,
    pub service: CompactString,
}

/// Docker's health status of a container (`none`: no health check).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    #[default]
    None,
    Starting,
    Healthy,
    Unhealthy,
}

impl Health {
    /// Answered while any holder of the name is: healthy or without a check.
    pub fn is_good(self) -> bool {
        matches!(self, Health::None | Health::Healthy)
    }

    pub fn label(self) -> &'static str {
        match self {
            Health::None => "none",
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// Transport of an SRV record.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
}

impl Proto {
    /// The SRV label, `_tcp` or `_udp`.
    pub fn label(self) -> &'static str {
        match self {
            Proto::Tcp => "_tcp",
            Proto::Udp => "_udp",
        }
    }
}

/// One `<service>=<port>[/tcp|/udp]` of the `glued.srv` label:
/// `_<service>._<proto>.<name>.<domain>. SRV 0 0 <port> <primary>.<node>.<domain>.`
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct SrvPort {
    /// Service label without the underscore, a valid label.
    pub service: CompactString,
    pub proto: Proto,
    pub port: u16,
}

/// Most SRV ports one group publishes (the rest of the label is ignored).
pub const MAX_SRV_PORTS: usize = 16;
/// Most names one group holds (a container's name, aliases, service, short
/// id and `glued.names`; a peer's group): every name is several keys of the
/// table, up to 1 + [`MAX_SRV_PORTS`] per scope, so one member must not be
/// able to make every node hold an unbounded number of them.
pub const MAX_NAMES_PER_GROUP: usize = 64;
/// Most addresses of each family a peer's group brings (more than any DNS
/// answer carries over UDP).
pub const MAX_ADDRS_PER_GROUP: usize = 256;

/// Which records a key of a group answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// The group's addresses (A/AAAA).
    Addr,
    /// The SRV record of `srv[i]`.
    Srv(usize),
}

impl KeyKind {
    /// The kind as one bit of a [`Holds`] set.
    pub fn bit(self) -> Holds {
        match self {
            KeyKind::Addr => 1,
            KeyKind::Srv(i) => 1 << (i + 1).min(63),
        }
    }
}

/// The kinds under which a group holds one key, as a set of
/// [`KeyKind::bit`]s: bit 0 its addresses, bit `1 + i` its SRV port `i`.
/// Recorded with each holder when its keys are enumerated, so an entry is
/// built from its holders without enumerating their keys again.
pub type Holds = u64;

/// SRV ports of a group that get keys: the bits of a [`Holds`] set.
const MAX_KEYED_SRV_PORTS: usize = 63;

#[cfg(test)]
thread_local! {
    /// Keys written by [`Group::for_each_key`] on this thread.
    pub(crate) static KEYS_WRITTEN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

impl Group {
    /// Calls `f` with every lookup key of this group (owned by node
    /// `node`) and what the key answers: each name and `name.node`;
    /// `service.project` and `service.project.node`; for each SRV port,
    /// `_service._proto.` before each of those. `key` is scratch space.
    pub fn for_each_key(&self, node: &str, key: &mut Vec<u8>, mut f: impl FnMut(&[u8], KeyKind)) {
        let scoped = self
            .scope
            .as_ref()
            .map(|s| (s.service.as_str(), s.project.as_str()));
        let bases = self
            .names
            .iter()
            .map(|n| (n.as_str(), None))
            .chain(scoped.map(|(s, p)| (s, Some(p))));
        for (name, project) in bases {
            for pinned in [None, Some(node)] {
                let ports = self.srv.len().min(MAX_KEYED_SRV_PORTS);
                for kind in std::iter::once(KeyKind::Addr).chain((0..ports).map(KeyKind::Srv)) {
                    key.clear();
                    if let KeyKind::Srv(i) = kind {
                        let srv = &self.srv[i];
                        key.push(b'_');
                        key.extend(srv.service.bytes().map(|b| b.to_ascii_lowercase()));
                        key.push(b'.');
                        key.extend_from_slice(srv.proto.label().as_bytes());
                        key.push(b'.');
                    }
                    key.extend(name.bytes().map(|b| b.to_ascii_lowercase()));
                    for label in project.into_iter().chain(pinned) {
                        key.push(b'.');
                        key.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
                    }
                    #[cfg(test)]
                    KEYS_WRITTEN.with(|n| n.set(n.get() + 1));
                    f(key, kind);
                }
            }
        }
    }
}

/// Builds the [`Entry`] of one key from its holders: the health filter
/// (fail open), this host's addresses first. Keeps its buffers between
/// keys.
#[derive(Default)]
pub(crate) struct EntryBuilder {
    v4: Vec<Ipv4Addr>,
    v6: Vec<Ipv6Addr>,
    v4_local: Vec<Ipv4Addr>,
    v6_local: Vec<Ipv6Addr>,
    srv: Vec<Srv>,
    srv_local: Vec<Srv>,
    key: Vec<u8>,
    target: Vec<u8>,
}

impl EntryBuilder {
    /// The entry of one key from every group that has it among its keys
    /// (`holders`: owner, group, and how the group holds the key). Holders
    /// that are `starting` or `unhealthy` are left out while one holder is
    /// healthy or has no health check. Work in the number of holders only.
    pub(crate) fn build<'a>(
        &mut self,
        holders: impl Iterator<Item = (&'a Origin, &'a Group, Holds)> + Clone,
        local_id: &str,
        domain_wire: &[u8],
    ) -> Entry {
        self.v4.clear();
        self.v6.clear();
        self.v4_local.clear();
        self.v6_local.clear();
        self.srv.clear();
        self.srv_local.clear();
        let any_good = holders.clone().any(|(_, g, _)| g.health.is_good());
        for (origin, group, holds) in holders {
            if any_good && !group.health.is_good() {
                continue;
            }
            let local = !local_id.is_empty() && *origin.id == *local_id;
            if holds & KeyKind::Addr.bit() != 0 {
                if local {
                    self.v4_local.extend_from_slice(&group.v4);
                    self.v6_local.extend_from_slice(&group.v6);
                } else {
                    self.v4.extend_from_slice(&group.v4);
                    self.v6.extend_from_slice(&group.v6);
                }
            }
            if holds & !KeyKind::Addr.bit() != 0
                && let Some(primary) = group.names.first()
            {
                write_key(&mut self.key, primary, Some(&origin.node_name));
                write_target(
                    &mut self.target,
                    std::str::from_utf8(&self.key).unwrap_or_default(),
                    domain_wire,
                );
                // A target longer than a DNS name (long names under a long
                // domain) cannot be answered: no SRV record for it.
                if self.target.len() > MAX_NAME_WIRE_LEN {
                    continue;
                }
                let list = if local {
                    &mut self.srv_local
                } else {
                    &mut self.srv
                };
                for (i, p) in group.srv.iter().enumerate().take(MAX_KEYED_SRV_PORTS) {
                    if holds & KeyKind::Srv(i).bit() != 0 {
                        list.push(Srv {
                            port: p.port,
                            target: Box::from(&self.target[..]),
                            target_key: Box::from(&self.key[..]),
                        });
                    }
                }
            }
        }
        let (v4, v4_local) = local_first(&mut self.v4_local, &mut self.v4);
        let (v6, v6_local) = local_first(&mut self.v6_local, &mut self.v6);
        let (srv, srv_local) = local_first_owned(&mut self.srv_local, &mut self.srv);
        Entry::new(Records {
            v4,
            v6,
            v4_local,
            v6_local,
            srv,
            srv_local,
        })
    }
}

/// `local` sorted and deduped, then the addresses of `rest` not in it
/// (sorted, deduped), and the length of the local part.
fn local_first<T: Copy + Ord>(local: &mut Vec<T>, rest: &mut Vec<T>) -> (Box<[T]>, u32) {
    local.sort_unstable();
    local.dedup();
    rest.sort_unstable();
    rest.dedup();
    rest.retain(|a| local.binary_search(a).is_err());
    let n = local.len() as u32;
    local.extend_from_slice(rest);
    (local.as_slice().into(), n)
}

/// [`local_first`] for records that are not `Copy` (moved out of both).
fn local_first_owned<T: Ord>(local: &mut Vec<T>, rest: &mut Vec<T>) -> (Box<[T]>, u32) {
    local.sort_unstable();
    local.dedup();
    rest.sort_unstable();
    rest.dedup();
    rest.retain(|a| local.binary_search(a).is_err());
    let n = local.len() as u32;
    (local.drain(..).chain(rest.drain(..)).collect(), n)
}

/// One SRV record of a name: `SRV 0 0 port target`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Srv {
    pub port: u16,
    /// `<primary>.<node>.<domain>.` in wire format, lowercase.
    pub target: Box<[u8]>,
    /// The key of the target (`primary.node`), for the additional section.
    pub target_key: Box<[u8]>,
}

/// What one name answers: its addresses, this host's first (sorted among
/// themselves, then the others sorted, no duplicates), after the health
/// filter; and its SRV records, in the same order (this host's first).
///
/// 16 bytes in the table's map: most names answer one IPv4 address and
/// nothing else, kept inline; any other entry is one boxed [`Records`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry(Repr);

/// The forms of an [`Entry`]; each entry has exactly one ([`Entry::new`]),
/// so equal entries are equal values.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Repr {
    /// One IPv4 address (this host's when `local`), no other record.
    V4 {
        ip: Ipv4Addr,
        local: bool,
    },
    Records(Box<Records>),
}

/// Every record of an [`Entry`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Records {
    pub v4: Box<[Ipv4Addr]>,
    pub v6: Box<[Ipv6Addr]>,
    /// How many of `v4` (`v6`), from the start, are this host's.
    pub v4_local: u32,
    pub v6_local: u32,
    pub srv: Box<[Srv]>,
    /// How many of `srv`, from the start, are this host's.
    pub srv_local: u32,
}

impl Default for Entry {
    fn default() -> Entry {
        Entry::new(Records::default())
    }
}

impl Entry {
    /// The entry of these records, in its compact form when it has one.
    pub fn new(records: Records) -> Entry {
        match (&*records.v4, &*records.v6, &*records.srv) {
            (&[ip], [], []) => Entry(Repr::V4 {
                ip,
                local: records.v4_local == 1,
            }),
            _ => Entry(Repr::Records(Box::new(records))),
        }
    }

    /// The IPv4 addresses, this host's first.
    #[inline]
    pub fn v4(&self) -> &[Ipv4Addr] {
        match &self.0 {
            Repr::V4 { ip, .. } => std::slice::from_ref(ip),
            Repr::Records(r) => &r.v4,
        }
    }

    /// How many of [`Entry::v4`], from the start, are this host's.
    #[inline]
    pub fn v4_local(&self) -> u32 {
        match &self.0 {
            Repr::V4 { local, .. } => u32::from(*local),
            Repr::Records(r) => r.v4_local,
        }
    }

    /// The IPv6 addresses, this host's first.
    #[inline]
    pub fn v6(&self) -> &[Ipv6Addr] {
        match &self.0 {
            Repr::V4 { .. } => &[],
            Repr::Records(r) => &r.v6,
        }
    }

    /// How many of [`Entry::v6`], from the start, are this host's.
    #[inline]
    pub fn v6_local(&self) -> u32 {
        match &self.0 {
            Repr::V4 { .. } => 0,
            Repr::Records(r) => r.v6_local,
        }
    }

    /// The SRV records, this host's first.
    #[inline]
    pub fn srv(&self) -> &[Srv] {
        match &self.0 {
            Repr::V4 { .. } => &[],
            Repr::Records(r) => &r.srv,
        }
    }

    /// How many of [`Entry::srv`], from the start, are this host's.
    #[inline]
    pub fn srv_local(&self) -> u32 {
        match &self.0 {
            Repr::V4 { .. } => 0,
            Repr::Records(r) => r.srv_local,
        }
    }

    /// Whether the entry holds no record at all.
    pub fn is_empty(&self) -> bool {
        self.v4().is_empty() && self.v6().is_empty() && self.srv().is_empty()
    }
}

/// Fewest shards of a table's maps. A power of two.
pub const MIN_SHARDS: usize = 16;
/// Most shards of a table. A power of two.
pub const MAX_SHARDS: usize = 1 << 16;
/// Entries per shard a built table aims at: name slots (about one per name:
/// a pinned key its base implies has none) and addresses. A change copies a
/// shard of about that many.
pub const ENTRIES_PER_SHARD: usize = 32;
/// A table whose shards hold on average more than this many entries is no
/// longer patched but built again with more shards (amortised: the table
/// grew 4× since it was built).
pub const MAX_ENTRIES_PER_SHARD: usize = 4 * ENTRIES_PER_SHARD;

/// The immutable snapshot the DNS threads answer from.
///
/// Its name, empty non-terminal and PTR maps are split by key hash into
/// shards (about [`ENTRIES_PER_SHARD`] entries each when built), each
/// behind an `Arc`: a clone of a table shares every
/// shard, and a change to the clone copies the shards it touches and no
/// other. The registry publishes each burst as such a clone of the table
/// before it, so the published tables share all they have in common and a
/// publish costs what the burst changed (see `registry.rs`). Only the
/// registry changes a table, and only its own clone before publishing it;
/// once published a table is never mutated.
///
/// A pinned key `name.node` whose base `name` is held by groups of `node`
/// alone and by nothing else answers what the base answers: it has no slot
/// of its own ([`implied_node`]), and a lookup that misses a key with a dot
/// looks its base up instead. A key keeps a slot when it answers anything
/// else (its base held on several nodes, a static name or a Compose scope
/// equal to a pinned key).
#[derive(Clone, Debug)]
pub struct Table {
    /// Lowercase domain without trailing dot, e.g. `glued.internal`.
    pub domain: String,
    /// Domain in wire format, lowercase (`\x05glued\x08internal\x00`).
    pub domain_wire: Box<[u8]>,
    pub ttl_secs: u32,
    /// Bumped on every publish; used as the SOA serial.
    pub serial: u32,
    /// The maps, by [`shard_of`] the hash of their keys.
    shards: Box<[Arc<Shard>]>,
    /// Picks a key's shard: random per built table (and kept by its clones).
    pick: foldhash::fast::RandomState,
    /// Name keys answered, implied pinned keys included.
    n_names: usize,
    /// Name keys with a slot of their own: `n_names` less the implied ones.
    n_slots: usize,
    /// Addresses with a PTR answer.
    n_addrs: usize,
    /// Endpoint id of this node: its holders are answered first.
    pub local_id: Box<str>,
    /// Single-label names published by containers of different Compose
    /// projects, or by static records and containers (SPEC §3).
    pub conflicts: Arc<std::collections::BTreeSet<String>>,
    /// The addresses with a PTR answer, sorted: which reverse names lie
    /// above an address of the table.
    reverse_v4: Sorted<u32>,
    reverse_v6: Sorted<u128>,
    /// Every group, by owner, for `/records` and gossip full state: the
    /// registry's own groups (shared, not copied).
    pub groups: Groups,
}

/// One shard of a table's maps.
#[derive(Clone, Debug, Default)]
struct Shard {
    /// Name key → its entry and holders; no slot for a pinned key its base
    /// implies.
    names: Keyed<Name>,
    /// Proper suffix of a key (`node` of `name.node`, `project` of
    /// `service.project`, `_tcp.name` of `_http._tcp.name`) → number of
    /// keys below it (implied pinned keys included): the empty
    /// non-terminals.
    nodes: Keyed<u32>,
    /// IPv4 address → the groups holding it, in key order: the first one's
    /// primary name is the PTR answer ([`Target`]).
    ptr_v4: Ptrs<Ipv4Addr>,
    /// The same for IPv6 addresses.
    ptr_v6: Ptrs<Ipv6Addr>,
}

/// A map from name keys hashed with the table's `pick`, the hash that also
/// picks the key's shard: one hash per lookup.
#[derive(Clone, Debug)]
struct Keyed<V>(hashbrown::HashTable<(Key, V)>);

/// Longest name key kept inline in a [`Key`].
const KEY_INLINE: usize = 22;

/// A name key: up to [`KEY_INLINE`] bytes inline (`name` and `name.node`
/// for most names: no allocation of their own, so copying a shard copies
/// no key), longer ones boxed. 24 bytes.
#[derive(Clone, Debug)]
enum Key {
    Inline { len: u8, bytes: [u8; KEY_INLINE] },
    Boxed(Box<[u8]>),
}

impl Key {
    #[inline]
    fn as_bytes(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Key::Boxed(b) => b,
        }
    }
}

impl From<&[u8]> for Key {
    fn from(key: &[u8]) -> Key {
        match key.len() {
            len @ 0..=KEY_INLINE => {
                let mut bytes = [0; KEY_INLINE];
                bytes[..len].copy_from_slice(key);
                Key::Inline {
                    len: len as u8,
                    bytes,
                }
            }
            _ => Key::Boxed(Box::from(key)),
        }
    }
}

impl From<Box<[u8]>> for Key {
    fn from(key: Box<[u8]>) -> Key {
        match key.len() {
            0..=KEY_INLINE => Key::from(&*key),
            _ => Key::Boxed(key),
        }
    }
}

impl<V> Default for Keyed<V> {
    fn default() -> Keyed<V> {
        Keyed(hashbrown::HashTable::new())
    }
}

impl<V> Keyed<V> {
    #[inline]
    fn get(&self, hash: u64, key: &[u8]) -> Option<&V> {
        self.0
            .find(hash, |(k, _)| k.as_bytes() == key)
            .map(|(_, v)| v)
    }

    fn get_mut(&mut self, hash: u64, key: &[u8]) -> Option<&mut V> {
        let found = self.0.find_mut(hash, |(k, _)| k.as_bytes() == key);
        found.map(|(_, v)| v)
    }

    /// Inserts a key that is not in the map.
    fn insert(&mut self, pick: &foldhash::fast::RandomState, hash: u64, key: Key, value: V) {
        let rehash = |(k, _): &(Key, V)| key_hash(pick, k.as_bytes());
        self.0.insert_unique(hash, (key, value), rehash);
    }

    fn remove(&mut self, hash: u64, key: &[u8]) -> Option<V> {
        let found = self.0.find_entry(hash, |(k, _)| k.as_bytes() == key).ok()?;
        Some(found.remove().0.1)
    }

    fn iter(&self) -> impl Iterator<Item = (&[u8], &V)> {
        self.0.iter().map(|(k, v)| (k.as_bytes(), v))
    }

    fn shrink_to_fit(&mut self, pick: &foldhash::fast::RandomState) {
        self.0.shrink_to_fit(|(k, _)| key_hash(pick, k.as_bytes()));
    }
}

/// The hash of a name key under `pick`.
#[inline]
fn key_hash(pick: &foldhash::fast::RandomState, key: &[u8]) -> u64 {
    use std::hash::BuildHasher;
    pick.hash_one(key)
}

/// The shard of a hash: bits that neither the bucket (low bits) nor the
/// tag (top 7 bits) of a shard's own table depend on.
#[inline]
fn shard_of(hash: u64, shards: usize) -> usize {
    (hash >> 32) as usize & (shards - 1)
}

/// The groups answering one name key, and how each holds it: most keys
/// have one, kept inline.
pub(crate) type NameHolders = SmallVec<[(Arc<Held>, Holds); 1]>;

/// What a name key answers and the groups it is built from: the registry's
/// name index lives here, once, not in a map of its own beside the table.
#[derive(Clone, Debug)]
struct Name {
    entry: Entry,
    holders: NameHolders,
}

/// The node whose pinned key `key.<node>` answers exactly what `key`
/// answers when no other group holds that pinned key: the one node of every
/// holder of `key` (node names compared ASCII-case-insensitively, as keys
/// are lowercase), a label, when `key` is not itself pinned to it (the
/// holders of `name.node` need not hold `name.node.node`). A group holds
/// each of its keys `k` pinned to its node too ([`Group::for_each_key`]),
/// under the same kinds, so every holder of `key` holds `key.<node>`;
/// whether another group holds it as well (a collision) is the writer's to
/// check: the pinned key then keeps a slot of its own.
fn implied_node<'a>(key: &[u8], holders: &'a [(Arc<Held>, Holds)]) -> Option<&'a str> {
    let ((first, _), rest) = holders.split_first()?;
    let node: &'a Arc<str> = &first.key.0.node_name;
    let same = |(h, _): &(Arc<Held>, Holds)| {
        Arc::ptr_eq(&h.key.0.node_name, node) || h.key.0.node_name.eq_ignore_ascii_case(node)
    };
    let pinned_to_it = key.len() > node.len()
        && key[key.len() - node.len() - 1] == b'.'
        && key[key.len() - node.len()..].eq_ignore_ascii_case(node.as_bytes());
    let label = !node.is_empty() && !node.contains('.');
    (label && !pinned_to_it && rest.iter().all(same)).then_some(&**node)
}

/// A pinned key: most fit on the stack.
type PinnedKey = SmallVec<[u8; 96]>;

/// Writes `base.node` (the node lowercase, as [`Group::for_each_key`]
/// writes it) into `out`.
fn write_pinned(out: &mut PinnedKey, base: &[u8], node: &str) {
    out.clear();
    out.extend_from_slice(base);
    out.push(b'.');
    out.extend(node.bytes().map(|b| b.to_ascii_lowercase()));
}

/// Whether both lists hold the same groups, each the same way, in any
/// order (a list holds a group once).
fn same_holders(a: &[(Arc<Held>, Holds)], b: &[(Arc<Held>, Holds)]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    // A copy and its original changed alike stay in the same order.
    let same =
        |(h, x): &(Arc<Held>, Holds), (g, y): &(Arc<Held>, Holds)| Arc::ptr_eq(h, g) && x == y;
    if a.iter().zip(b).all(|(x, y)| same(x, y)) {
        return true;
    }
    if a.len() <= 16 {
        let has = |(h, holds): &(Arc<Held>, Holds)| {
            b.iter().any(|(g, gh)| Arc::ptr_eq(h, g) && holds == gh)
        };
        return a.iter().all(has);
    }
    let sorted = |list: &[(Arc<Held>, Holds)]| {
        let mut v: Vec<(*const Held, Holds)> =
            list.iter().map(|(h, x)| (Arc::as_ptr(h), *x)).collect();
        v.sort_unstable();
        v
    };
    sorted(a) == sorted(b)
}

/// An address of a PTR map, hashed with the table's `pick` (which also
/// picks its shard: one hash per lookup), and its map in a shard.
trait PtrAddr: Copy + Eq + 'static {
    fn hash(self, pick: &foldhash::fast::RandomState) -> u64;
    fn map(shard: &Shard) -> &Ptrs<Self>;
    fn map_mut(shard: &mut Shard) -> &mut Ptrs<Self>;
}

impl PtrAddr for Ipv4Addr {
    #[inline]
    fn hash(self, pick: &foldhash::fast::RandomState) -> u64 {
        use std::hash::BuildHasher;
        pick.hash_one(u32::from(self))
    }
    #[inline]
    fn map(shard: &Shard) -> &Ptrs<Ipv4Addr> {
        &shard.ptr_v4
    }
    fn map_mut(shard: &mut Shard) -> &mut Ptrs<Ipv4Addr> {
        &mut shard.ptr_v4
    }
}

impl PtrAddr for Ipv6Addr {
    #[inline]
    fn hash(self, pick: &foldhash::fast::RandomState) -> u64 {
        use std::hash::BuildHasher;
        pick.hash_one(u128::from(self))
    }
    #[inline]
    fn map(shard: &Shard) -> &Ptrs<Ipv6Addr> {
        &shard.ptr_v6
    }
    fn map_mut(shard: &mut Shard) -> &mut Ptrs<Ipv6Addr> {
        &mut shard.ptr_v6
    }
}

/// One address of a PTR map and the groups holding it, in key order. Most
/// addresses have one holder, kept inline: an IPv4 slot is 16 bytes (an
/// `IpAddr` and a list took 48).
#[derive(Clone, Debug)]
enum Ptr<A> {
    One(A, Arc<Held>),
    /// Any other number of holders (none until [`Table::forget_addr`]).
    /// A thin pointer to the list: a `Vec` (24 bytes) or a boxed slice (16)
    /// would make every slot bigger for the rare address held twice.
    #[allow(clippy::box_collection)]
    Many(A, Box<Vec<Arc<Held>>>),
}

impl<A: Copy> Ptr<A> {
    #[inline]
    fn addr(&self) -> A {
        match self {
            Ptr::One(a, _) | Ptr::Many(a, _) => *a,
        }
    }

    #[inline]
    fn holders(&self) -> &[Arc<Held>] {
        match self {
            Ptr::One(_, h) => std::slice::from_ref(h),
            Ptr::Many(_, list) => list,
        }
    }

    /// Inserts `held` at `at` among the holders.
    fn insert(&mut self, at: usize, held: Arc<Held>) {
        match self {
            Ptr::Many(_, list) => list.insert(at, held),
            Ptr::One(a, first) => {
                let mut list = vec![first.clone()];
                list.insert(at, held);
                let a = *a;
                *self = Ptr::Many(a, Box::new(list));
            }
        }
    }

    /// Removes the holder at `at`.
    fn remove(&mut self, at: usize) {
        match self {
            Ptr::One(a, _) => {
                let a = *a;
                *self = Ptr::Many(a, Box::default());
            }
            Ptr::Many(a, list) => {
                list.remove(at);
                if let [one] = list.as_slice() {
                    let (a, one) = (*a, one.clone());
                    *self = Ptr::One(a, one);
                }
            }
        }
    }
}

/// A PTR map: addresses hashed with the table's `pick`.
#[derive(Clone, Debug)]
struct Ptrs<A>(hashbrown::HashTable<Ptr<A>>);

impl<A> Default for Ptrs<A> {
    fn default() -> Ptrs<A> {
        Ptrs(hashbrown::HashTable::new())
    }
}

impl<A: PtrAddr> Ptrs<A> {
    #[inline]
    fn get(&self, hash: u64, addr: A) -> Option<&Ptr<A>> {
        self.0.find(hash, |p| p.addr() == addr)
    }

    fn get_mut(&mut self, hash: u64, addr: A) -> Option<&mut Ptr<A>> {
        self.0.find_mut(hash, |p| p.addr() == addr)
    }

    /// Inserts an address that is not in the map.
    fn insert(&mut self, pick: &foldhash::fast::RandomState, hash: u64, slot: Ptr<A>) {
        self.0.insert_unique(hash, slot, |p| p.addr().hash(pick));
    }

    fn remove(&mut self, hash: u64, addr: A) {
        if let Ok(found) = self.0.find_entry(hash, |p| p.addr() == addr) {
            found.remove();
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Ptr<A>> {
        self.0.iter()
    }

    fn shrink_to_fit(&mut self, pick: &foldhash::fast::RandomState) {
        self.0.shrink_to_fit(|p| p.addr().hash(pick));
    }
}

/// Adds `held` to the holders of `addr` in a table being built (groups
/// come in key order: holders stay in key order); true when the address is
/// new.
fn build_ptr<A: PtrAddr>(
    shards: &mut [Shard],
    pick: &foldhash::fast::RandomState,
    addr: A,
    held: &Arc<Held>,
) -> bool {
    let hash = addr.hash(pick);
    let n_shards = shards.len();
    let map = A::map_mut(&mut shards[shard_of(hash, n_shards)]);
    match map.get_mut(hash, addr) {
        Some(slot) => {
            let n = slot.holders().len();
            if !slot.holders().iter().any(|h| Arc::ptr_eq(h, held)) {
                slot.insert(n, held.clone());
            }
            false
        }
        None => {
            map.insert(pick, hash, Ptr::One(addr, held.clone()));
            true
        }
    }
}

/// The PTR answer of an address: the primary name of its first holder (in
/// key order), under the domain. Written into the answer from the group
/// itself (no copy of the name per address).
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    primary: &'a str,
    domain_wire: &'a [u8],
}

impl Target<'_> {
    /// Labels of the primary name, as [`write_target`] writes them.
    fn labels(&self) -> impl Iterator<Item = &[u8]> {
        let labels = self.primary.split('.').filter(|l| !l.is_empty());
        labels.map(|l| &l.as_bytes()[..l.len().min(MAX_LABEL_LEN)])
    }

    /// Length in wire format.
    pub fn wire_len(&self) -> usize {
        self.labels().map(|l| 1 + l.len()).sum::<usize>() + self.domain_wire.len()
    }

    /// Appends the name in wire format, lowercase, to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        for label in self.labels() {
            out.push(label.len() as u8);
            out.extend(label.iter().map(|b| b.to_ascii_lowercase()));
        }
        out.extend_from_slice(self.domain_wire);
    }

    /// The name in wire format.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.wire_len());
        self.write_to(&mut out);
        out
    }
}

impl PartialEq for Target<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.to_vec() == other.to_vec()
    }
}
impl Table {
    /// An empty table for `domain` (lowercase, no trailing dot).
    pub fn empty(domain: &str, ttl_secs: u32) -> Table {
        Table::build(domain, ttl_secs, 0, Groups::default())
    }

    /// Builds the lookup maps from every group, with no node as this host.
    pub fn build(domain: &str, ttl_secs: u32, serial: u32, groups: impl Into<Groups>) -> Table {
        Table::build_for(domain, ttl_secs, serial, groups.into(), "")
    }

    /// Builds the lookup maps from every group. `serial` should grow with
    /// every rebuild; `local_id` is this node's endpoint id.
    ///
    /// Every key of a group ([`Group::for_each_key`]: `n` and `n.node` for
    /// each name `n` of a group owned by node `node`, the Compose scope and
    /// the SRV names) answers the records of its holders merged by
    /// [`EntryBuilder`]. An address points back (PTR) to the primary name of
    /// the first group holding it, in `groups` order. A pinned key that its
    /// base implies ([`implied_node`]) gets no slot.
    pub fn build_for(
        domain: &str,
        ttl_secs: u32,
        serial: u32,
        groups: impl Into<Groups>,
        local_id: &str,
    ) -> Table {
        let groups = groups.into();
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let domain_wire = name_to_wire(&domain);
        // About one slot per name: its pinned key is mostly implied.
        let n_bases: usize = groups.iter().map(|(_, g)| g.names.len()).sum();
        // Name key → every group answering it, and whether its base
        // implies it.
        let mut holders: FastMap<Box<[u8]>, (NameHolders, std::cell::Cell<bool>)> =
            FastMap::with_capacity_and_hasher(2 * n_bases, Default::default());
        let pick = foldhash::fast::RandomState::default();
        let n_addrs: usize = groups
            .iter()
            .filter(|(_, g)| !g.names.is_empty())
            .map(|(_, g)| g.v4.len() + g.v6.len())
            .sum();
        let n_shards = ((n_bases + n_addrs) / ENTRIES_PER_SHARD)
            .next_power_of_two()
            .clamp(MIN_SHARDS, MAX_SHARDS);
        let mut shards: Vec<Shard> = (0..n_shards).map(|_| Shard::default()).collect();
        let (mut reverse_v4, mut reverse_v6) = (Vec::new(), Vec::new());
        let mut key = Vec::with_capacity(MAX_NAME_WIRE_LEN);
        for held in groups.held_iter() {
            let group = &held.group;
            group.for_each_key(&held.key.0.node_name, &mut key, |key, kind| {
                match holders.get_mut(key) {
                    // A group's keys come together: a repeat is its last holder.
                    Some((list, _)) => match list.last_mut() {
                        Some((h, holds)) if Arc::ptr_eq(h, held) => *holds |= kind.bit(),
                        _ => list.push((held.clone(), kind.bit())),
                    },
                    None => {
                        let one = smallvec::smallvec![(held.clone(), kind.bit())];
                        holders.insert(Box::from(key), (one, Default::default()));
                    }
                }
            });
            if !group.names.is_empty() {
                for &ip in group.v4.iter() {
                    if build_ptr(&mut shards, &pick, ip, held) {
                        reverse_v4.push(u32::from(ip));
                    }
                }
                for &ip in group.v6.iter() {
                    if build_ptr(&mut shards, &pick, ip, held) {
                        reverse_v6.push(u128::from(ip));
                    }
                }
            }
        }
        // A pinned key its base implies, held by no other group, gets no
        // slot.
        let mut pinned = PinnedKey::new();
        for (key, (list, _)) in &holders {
            let Some(node) = implied_node(key, list) else {
                continue;
            };
            write_pinned(&mut pinned, key, node);
            if let Some((pinned_list, implied)) = holders.get(&pinned[..])
                && same_holders(list, pinned_list)
            {
                implied.set(true);
            }
        }
        let mut builder = EntryBuilder::default();
        let mut conflicts = std::collections::BTreeSet::new();
        let n_names = holders.len();
        let mut n_slots = 0;
        for (key, (list, implied)) in holders {
            for_each_suffix(&key, |suffix| {
                let hash = key_hash(&pick, suffix);
                let nodes = &mut shards[shard_of(hash, n_shards)].nodes;
                match nodes.get_mut(hash, suffix) {
                    Some(n) => *n += 1,
                    None => nodes.insert(&pick, hash, Key::from(suffix), 1),
                }
            });
            if implied.get() {
                continue;
            }
            let entry = builder.build(
                list.iter().map(|(h, holds)| (&h.key.0, &h.group, *holds)),
                local_id,
                &domain_wire,
            );
            if is_conflict(&key, list.iter().map(|(h, _)| (&h.key.1, &h.group))) {
                conflicts.insert(String::from_utf8_lossy(&key).into_owned());
            }
            let name = Name {
                entry,
                holders: list,
            };
            let hash = key_hash(&pick, &key);
            shards[shard_of(hash, n_shards)]
                .names
                .insert(&pick, hash, Key::from(key), name);
            n_slots += 1;
        }
        for s in &mut shards {
            s.names.shrink_to_fit(&pick);
            s.ptr_v4.shrink_to_fit(&pick);
            s.ptr_v6.shrink_to_fit(&pick);
        }
        reverse_v4.sort_unstable();
        reverse_v6.sort_unstable();
        Table {
            domain,
            domain_wire,
            ttl_secs,
            serial,
            shards: shards.into_iter().map(Arc::new).collect(),
            pick,
            n_names,
            n_slots,
            n_addrs: reverse_v4.len() + reverse_v6.len(),
            local_id: local_id.into(),
            conflicts: Arc::new(conflicts),
            reverse_v4: Sorted::from_sorted(&reverse_v4),
            reverse_v6: Sorted::from_sorted(&reverse_v6),
            groups,
        }
    }

    /// The hash of a name key and its shard.
    #[inline]
    fn keyed(&self, key: &[u8]) -> (u64, &Shard) {
        let hash = key_hash(&self.pick, key);
        (hash, &self.shards[shard_of(hash, self.shards.len())])
    }

    /// The shard of a key's hash, copied first if another table shares it.
    fn keyed_mut(&mut self, hash: u64) -> &mut Shard {
        let at = shard_of(hash, self.shards.len());
        Arc::make_mut(&mut self.shards[at])
    }

    /// What the table holds for a name key: its slot or, for a pinned key
    /// without one, its base's ([`Table::implied`]). Never allocates.
    #[inline]
    fn name(&self, key: &[u8]) -> Option<&Name> {
        match self.stored(key) {
            Some(name) => Some(name),
            None => self.implied(key),
        }
    }

    /// The slot of a name key. One hash lookup.
    #[inline]
    fn stored(&self, key: &[u8]) -> Option<&Name> {
        let (hash, shard) = self.keyed(key);
        shard.names.get(hash, key)
    }

    /// What a key `base.node` with no slot answers: what `base` answers,
    /// if `base` implies it ([`implied_node`]). A second hash lookup, on a
    /// miss of a key with a dot only. Never allocates.
    fn implied(&self, key: &[u8]) -> Option<&Name> {
        let dot = key.iter().rposition(|&b| b == b'.')?;
        let (base, node) = (&key[..dot], &key[dot + 1..]);
        let name = self.stored(base)?;
        let (first, _) = name.holders.first()?;
        if !first.key.0.node_name.as_bytes().eq_ignore_ascii_case(node) {
            return None;
        }
        implied_node(base, &name.holders).map(|_| name)
    }

    /// The pinned key `key` implies (written into `out`) when it has no
    /// slot of its own.
    fn implies_unstored(&self, key: &[u8], out: &mut PinnedKey) -> bool {
        let Some(name) = self.stored(key) else {
            return false;
        };
        let Some(node) = implied_node(key, &name.holders) else {
            return false;
        };
        write_pinned(out, key, node);
        self.stored(out).is_none()
    }

    /// Looks up a lowercase name relative to the domain (`api` or
    /// `api.node-1`). Never allocates. A key without a dot costs one hash
    /// lookup; a key with one that has no slot (an implied pinned key, or
    /// no such name) costs a second, of its base.
    #[inline]
    pub fn lookup(&self, key: &[u8]) -> Option<&Entry> {
        self.name(key).map(|n| &n.entry)
    }

    /// The groups holding an address, in key order. Never allocates.
    #[inline]
    fn ptr<A: PtrAddr>(&self, addr: A) -> Option<&[Arc<Held>]> {
        let hash = addr.hash(&self.pick);
        let shard = &self.shards[shard_of(hash, self.shards.len())];
        A::map(shard).get(hash, addr).map(Ptr::holders)
    }

    /// The PTR slot of an address, its shard copied first if another table
    /// shares it.
    fn ptr_mut<A: PtrAddr>(&mut self, addr: A) -> Option<&mut Ptr<A>> {
        let hash = addr.hash(&self.pick);
        A::map_mut(self.keyed_mut(hash)).get_mut(hash, addr)
    }

    /// The groups holding `ip`, in key order.
    #[inline]
    fn addr_holders(&self, ip: &IpAddr) -> Option<&[Arc<Held>]> {
        match *ip {
            IpAddr::V4(a) => self.ptr(a),
            IpAddr::V6(a) => self.ptr(a),
        }
    }

    /// The primary name (wire format, under the domain) of an address.
    #[inline]
    pub fn reverse(&self, ip: &IpAddr) -> Option<Target<'_>> {
        let first = self.addr_holders(ip)?.first()?;
        Some(Target {
            primary: first.group.names.first()?.as_str(),
            domain_wire: &self.domain_wire,
        })
    }

    /// Whether `key` (lowercase, relative to the domain) is an empty
    /// non-terminal: a node with pinned names (`<node>.<domain>.`), a
    /// Compose project, the `_tcp.name` of an SRV name. Never allocates.
    #[inline]
    pub fn is_node(&self, label: &[u8]) -> bool {
        let (hash, shard) = self.keyed(label);
        shard.nodes.get(hash, label).is_some()
    }

    /// Whether an address of the table starts with the first `bits` bits
    /// of `prefix` (its reverse name lies at or below the reverse name of
    /// that prefix). Never allocates.
    pub fn has_address_in(&self, prefix: IpAddr, bits: u32) -> bool {
        match prefix {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - bits.min(32)).unwrap_or(0);
                let low = u32::from(a) & mask;
                self.reverse_v4
                    .first_from(low)
                    .is_some_and(|a| a & mask == low)
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - bits.min(128)).unwrap_or(0);
                let low = u128::from(a) & mask;
                self.reverse_v6
                    .first_from(low)
                    .is_some_and(|a| a & mask == low)
            }
        }
    }

    /// Number of distinct names answered (pinned names included).
    pub fn n_names(&self) -> usize {
        self.n_names
    }

    /// Number of names with a slot of their own: [`Table::n_names`] less
    /// the pinned keys their base implies.
    pub fn n_name_slots(&self) -> usize {
        self.n_slots
    }

    /// Number of (name, address) records across all groups.
    pub fn n_records(&self) -> usize {
        self.groups
            .iter()
            .map(|(_, g)| g.names.len() * (g.v4.len() + g.v6.len()))
            .sum()
    }

    /// Every answered name (key relative to the domain) with its records,
    /// in no particular order: implied pinned keys too, written out (an
    /// allocation each: for tests and diagnostics).
    pub fn names(&self) -> impl Iterator<Item = (std::borrow::Cow<'_, [u8]>, &Entry)> {
        let stored = self.shards.iter().flat_map(|s| s.names.iter());
        stored.flat_map(move |(key, name)| {
            let mut pinned = PinnedKey::new();
            let implied = self
                .implies_unstored(key, &mut pinned)
                .then(|| (std::borrow::Cow::Owned(pinned.to_vec()), &name.entry));
            std::iter::once((std::borrow::Cow::Borrowed(key), &name.entry)).chain(implied)
        })
    }

    /// Every address with a PTR answer and its target (wire format), in no
    /// particular order.
    pub fn addresses(&self) -> impl Iterator<Item = (IpAddr, Target<'_>)> {
        let v4 = self.shards.iter().flat_map(|s| s.ptr_v4.iter());
        let v4 = v4.map(|p| IpAddr::V4(p.addr()));
        let v6 = self.shards.iter().flat_map(|s| s.ptr_v6.iter());
        let v6 = v6.map(|p| IpAddr::V6(p.addr()));
        v4.chain(v6).filter_map(|ip| Some((ip, self.reverse(&ip)?)))
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Whether the table grew past [`MAX_ENTRIES_PER_SHARD`] name slots
    /// and addresses per shard on average: the next one should be built
    /// with more shards.
    pub fn overfull(&self) -> bool {
        let n_entries = self.n_slots + self.n_addrs;
        n_entries > MAX_ENTRIES_PER_SHARD * self.shards.len() && self.shards.len() < MAX_SHARDS
    }

    /// How many shards `self` holds that `other` does not share: what a
    /// change made `self` copy (for tests and measurements).
    pub fn shards_not_shared_with(&self, other: &Table) -> usize {
        self.shards
            .iter()
            .zip(other.shards.iter())
            .filter(|(a, b)| !Arc::ptr_eq(a, b))
            .count()
    }

    /// The groups answering `key`, and how each holds it.
    pub(crate) fn holders(&self, key: &[u8]) -> Option<&NameHolders> {
        self.name(key).map(|n| &n.holders)
    }

    /// Whether `key` has no slot and is answered by its base's.
    pub(crate) fn is_implied(&self, key: &[u8]) -> bool {
        self.stored(key).is_none() && self.implied(key).is_some()
    }

    /// Gives `key` a slot: `name`, a copy of what it answers already.
    fn insert_slot(&mut self, key: &[u8], name: Name) {
        let hash = key_hash(&self.pick, key);
        let pick = self.pick.clone();
        self.keyed_mut(hash)
            .names
            .insert(&pick, hash, Key::from(key), name);
        self.n_slots += 1;
    }

    /// Adds a name key that was not answered: a slot of its own, counted
    /// in [`Table::n_names`] and the empty non-terminals above it.
    fn insert_name(&mut self, key: &[u8], name: Name) {
        self.insert_slot(key, name);
        self.n_names += 1;
        self.count_below(key, true);
    }

    /// Counts one name key more (`true`) or less below each empty
    /// non-terminal above `key`.
    fn count_below(&mut self, key: &[u8], more: bool) {
        let pick = self.pick.clone();
        for_each_suffix(key, |suffix| {
            let hash = key_hash(&pick, suffix);
            let nodes = &mut self.keyed_mut(hash).nodes;
            match (nodes.get_mut(hash, suffix), more) {
                (Some(n), true) => *n += 1,
                (None, true) => nodes.insert(&pick, hash, Key::from(suffix), 1),
                (Some(n), false) => {
                    *n -= 1;
                    if *n == 0 {
                        nodes.remove(hash, suffix);
                    }
                }
                (None, false) => {}
            }
        });
    }

    /// Gives the pinned key `key` implies a slot (a copy of `key`'s), and
    /// passes it to `noted`; `new` when no group held it before (a name
    /// the table did not answer).
    fn slot_implied_pinned(&mut self, key: &[u8], new: bool, noted: &mut impl FnMut(&[u8])) {
        let mut pinned = PinnedKey::new();
        if self.implies_unstored(key, &mut pinned) {
            let name = self.stored(key).expect("implies").clone();
            match new {
                true => self.insert_name(&pinned, name),
                false => self.insert_slot(&pinned, name),
            }
            noted(&pinned);
        }
    }

    /// Before the holders of `key` change: gives `key` a slot if its base
    /// implies it (a copy of the base's), and so the pinned key `key`
    /// implies (a copy of `key`'s), so that the change reaches `key` alone.
    /// `noted` gets that pinned key.
    fn keep_implied(&mut self, key: &[u8], noted: &mut impl FnMut(&[u8])) {
        if self.stored(key).is_none()
            && let Some(name) = self.implied(key).cloned()
        {
            self.insert_slot(key, name);
        }
        self.slot_implied_pinned(key, false, noted);
    }

    /// Records that `held` holds `key` as `holds` (added to how it already
    /// does). A new key answers nothing until [`Table::set_entry`].
    ///
    /// An implied pinned key, or one `key` implies, is given a slot first
    /// (see [`Table::keep_implied`]); a key this call gives a slot to other
    /// than `key` is passed to `noted`: the caller sets its entry and
    /// compacts it ([`Table::compact`]) with the keys it changed.
    pub(crate) fn add_holder(
        &mut self,
        key: &[u8],
        held: &Arc<Held>,
        holds: Holds,
        mut noted: impl FnMut(&[u8]),
    ) {
        let has = |n: &Name| {
            n.holders
                .iter()
                .any(|(h, old)| Arc::ptr_eq(h, held) && old & holds == holds)
        };
        if self.name(key).is_some_and(has) {
            return;
        }
        self.keep_implied(key, &mut noted);
        let hash = key_hash(&self.pick, key);
        if self.stored(key).is_some() {
            let name = self.keyed_mut(hash).names.get_mut(hash, key);
            let name = name.expect("present");
            match name.holders.iter_mut().find(|(h, _)| Arc::ptr_eq(h, held)) {
                Some((_, old)) => *old |= holds,
                None => name.holders.push((held.clone(), holds)),
            }
        } else {
            let name = Name {
                entry: Entry::default(),
                holders: smallvec::smallvec![(held.clone(), holds)],
            };
            self.insert_name(key, name);
        }
        // `key` now implies a pinned key it did not before (one it implied
        // has a slot: `keep_implied`), which no group held: the pinned key
        // of `held` itself, which it writes after `key`. It is a new name
        // from now on, with a slot.
        self.slot_implied_pinned(key, true, &mut noted);
    }

    /// Records that `held` no longer holds `key` (a key left with no
    /// holder stays until [`Table::forget_name`]: a change often gives it
    /// back). Implied keys and `noted` as for [`Table::add_holder`].
    pub(crate) fn remove_holder(
        &mut self,
        key: &[u8],
        held: &Arc<Held>,
        mut noted: impl FnMut(&[u8]),
    ) {
        let holds = |n: &Name| n.holders.iter().position(|(h, _)| Arc::ptr_eq(h, held));
        if self.name(key).and_then(holds).is_none() {
            return;
        }
        self.keep_implied(key, &mut noted);
        let at = self.stored(key).and_then(holds).expect("present");
        let hash = key_hash(&self.pick, key);
        let name = self.keyed_mut(hash).names.get_mut(hash, key);
        name.expect("present").holders.swap_remove(at);
    }

    /// Forgets `key` if no group holds it.
    pub(crate) fn forget_name(&mut self, key: &[u8]) {
        if !self.stored(key).is_some_and(|n| n.holders.is_empty()) {
            return;
        }
        let hash = key_hash(&self.pick, key);
        self.keyed_mut(hash).names.remove(hash, key);
        self.n_names -= 1;
        self.n_slots -= 1;
        self.count_below(key, false);
    }

    /// Sets the records of a key that has holders (given a slot if it
    /// answered others).
    pub(crate) fn set_entry(&mut self, key: &[u8], entry: Entry) {
        if self.lookup(key).is_none_or(|old| *old == entry) {
            return;
        }
        if self.stored(key).is_none() {
            let name = self.implied(key).expect("present").clone();
            self.insert_slot(key, name);
        }
        let hash = key_hash(&self.pick, key);
        let name = self.keyed_mut(hash).names.get_mut(hash, key);
        name.expect("present").entry = entry;
    }

    /// Drops the slot of `key`, and of the pinned key `key` implies, where
    /// its base implies exactly what it holds (a slot a change gave it and
    /// that is implied again): the table keeps the slots of a fresh build
    /// as it changes. Its answers are then its base's: call it once the
    /// holders are set, before the entries (a key it dropped needs none).
    pub(crate) fn compact(&mut self, key: &[u8]) {
        self.drop_if_implied(key);
        let mut pinned = PinnedKey::new();
        if let Some(name) = self.stored(key)
            && let Some(node) = implied_node(key, &name.holders)
        {
            write_pinned(&mut pinned, key, node);
            self.drop_if_implied(&pinned);
        }
    }

    /// Drops the slot of `key` if its base implies what it answers.
    fn drop_if_implied(&mut self, key: &[u8]) {
        let Some(dot) = key.iter().rposition(|&b| b == b'.') else {
            return;
        };
        let (base, node) = (&key[..dot], &key[dot + 1..]);
        let (Some(name), Some(of_base)) = (self.stored(key), self.stored(base)) else {
            return;
        };
        let implied = implied_node(base, &of_base.holders)
            .is_some_and(|n| n.as_bytes().eq_ignore_ascii_case(node));
        if implied && same_holders(&name.holders, &of_base.holders) {
            let hash = key_hash(&self.pick, key);
            self.keyed_mut(hash).names.remove(hash, key);
            self.n_slots -= 1;
        }
    }

    /// Marks (or clears) `name` as a conflict.
    pub(crate) fn set_conflict(&mut self, name: &[u8], conflict: bool) {
        let name = String::from_utf8_lossy(name);
        if conflict != self.conflicts.contains(&*name) {
            let set = Arc::make_mut(&mut self.conflicts);
            if conflict {
                set.insert(name.into_owned());
            } else {
                set.remove(&*name);
            }
        }
    }

    /// Records that `held` holds `ip` (in key order among its holders).
    pub(crate) fn add_addr_holder(&mut self, ip: IpAddr, held: &Arc<Held>) {
        match ip {
            IpAddr::V4(a) if self.add_ptr(a, held) => self.reverse_v4.insert(u32::from(a)),
            IpAddr::V6(a) if self.add_ptr(a, held) => self.reverse_v6.insert(u128::from(a)),
            _ => return,
        }
        self.n_addrs += 1;
    }

    /// Adds `held` to the holders of `addr`; true when the address is new.
    fn add_ptr<A: PtrAddr>(&mut self, addr: A, held: &Arc<Held>) -> bool {
        let at = |holders: &[Arc<Held>]| holders.binary_search_by(|h| h.key.cmp(&held.key));
        match self.ptr(addr).map(at) {
            Some(Ok(_)) => false,
            Some(Err(at)) => {
                let slot = self.ptr_mut(addr).expect("present");
                slot.insert(at, held.clone());
                false
            }
            None => {
                let hash = addr.hash(&self.pick);
                let pick = self.pick.clone();
                let map = A::map_mut(self.keyed_mut(hash));
                map.insert(&pick, hash, Ptr::One(addr, held.clone()));
                true
            }
        }
    }

    /// Records that `held` no longer holds `ip` (kept with no holder until
    /// [`Table::forget_addr`]).
    pub(crate) fn remove_addr_holder(&mut self, ip: &IpAddr, held: &Arc<Held>) {
        match *ip {
            IpAddr::V4(a) => self.remove_ptr(a, held),
            IpAddr::V6(a) => self.remove_ptr(a, held),
        }
    }

    fn remove_ptr<A: PtrAddr>(&mut self, addr: A, held: &Arc<Held>) {
        let holds = |h: &[Arc<Held>]| h.iter().position(|h| Arc::ptr_eq(h, held));
        if let Some(at) = self.ptr(addr).and_then(holds) {
            self.ptr_mut(addr).expect("present").remove(at);
        }
    }

    /// Forgets `ip` if no group holds it.
    pub(crate) fn forget_addr(&mut self, ip: &IpAddr) {
        if !self.addr_holders(ip).is_some_and(|h| h.is_empty()) {
            return;
        }
        self.n_addrs -= 1;
        match *ip {
            IpAddr::V4(a) => {
                self.forget_ptr(a);
                self.reverse_v4.remove(u32::from(a));
            }
            IpAddr::V6(a) => {
                self.forget_ptr(a);
                self.reverse_v6.remove(u128::from(a));
            }
        }
    }

    fn forget_ptr<A: PtrAddr>(&mut self, addr: A) {
        let hash = addr.hash(&self.pick);
        A::map_mut(self.keyed_mut(hash)).remove(hash, addr);
    }
}

/// Values of a sorted set most in a chunk before it is split.
const CHUNK: usize = 512;

/// A sorted set in chunks shared between tables: a change copies the chunk
/// it touches and the list of chunk pointers, not the set.
#[derive(Clone, Debug, Default)]
struct Sorted<T> {
    /// Sorted, not overlapping, none empty.
    chunks: Vec<Arc<Vec<T>>>,
}

impl<T: Copy + Ord> Sorted<T> {
    fn from_sorted(values: &[T]) -> Sorted<T> {
        Sorted {
            chunks: values
                .chunks(CHUNK / 2)
                .map(|c| Arc::new(c.to_vec()))
                .collect(),
        }
    }

    /// The chunk that holds `value` or would: the last one starting at or
    /// before it, or the first one.
    fn chunk_of(&self, value: T) -> usize {
        self.chunks
            .partition_point(|c| c[0] <= value)
            .saturating_sub(1)
    }

    fn insert(&mut self, value: T) {
        if self.chunks.is_empty() {
            self.chunks.push(Arc::new(vec![value]));
            return;
        }
        let i = self.chunk_of(value);
        if let Err(at) = self.chunks[i].binary_search(&value) {
            let chunk = Arc::make_mut(&mut self.chunks[i]);
            chunk.insert(at, value);
            if chunk.len() > CHUNK {
                let tail = chunk.split_off(CHUNK / 2);
                self.chunks.insert(i + 1, Arc::new(tail));
            }
        }
    }

    fn remove(&mut self, value: T) {
        if self.chunks.is_empty() {
            return;
        }
        let i = self.chunk_of(value);
        if let Ok(at) = self.chunks[i].binary_search(&value) {
            let chunk = Arc::make_mut(&mut self.chunks[i]);
            chunk.remove(at);
            if chunk.is_empty() {
                self.chunks.remove(i);
            }
        }
    }

    /// The smallest value at or above `low`. Never allocates.
    fn first_from(&self, low: T) -> Option<T> {
        let i = self.chunk_of(low);
        let chunk = self.chunks.get(i)?;
        match chunk.get(chunk.partition_point(|&a| a < low)) {
            Some(&a) => Some(a),
            None => self.chunks.get(i + 1).map(|c| c[0]),
        }
    }
}

/// Calls `f` with every proper suffix of `key` after a dot (`b.c` and `c`
/// of `a.b.c`): the empty non-terminals above it.
fn for_each_suffix(key: &[u8], mut f: impl FnMut(&[u8])) {
    for (at, _) in key.iter().enumerate().filter(|(_, b)| **b == b'.') {
        f(&key[at + 1..]);
    }
}

/// Whether the holders of `key` make it a conflict: a single label
/// published by containers of different Compose projects (no project
/// counts as one), or by static records and containers.
pub fn is_conflict<'a>(key: &[u8], holders: impl Iterator<Item = (&'a Source, &'a Group)>) -> bool {
    if key.contains(&b'.') {
        return false;
    }
    let (mut statics, mut containers) = (false, false);
    let mut project: Option<Option<&str>> = None;
    for (source, group) in holders {
        match source {
            Source::Static { .. } => statics = true,
            Source::Container { .. } => {
                containers = true;
                let p = group.scope.as_ref().map(|s| s.project.as_str());
                match project {
                    None => project = Some(p),
                    Some(first) if first != p => return true,
                    Some(_) => {}
                }
            }
        }
        if statics && containers {
            return true;
        }
    }
    false
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
pub fn label(name: &str) -> Option<CompactString> {
    // Lowercasing keeps the length: a longer input is no label, not copied.
    if name.len() > MAX_LABEL_LEN {
        return None;
    }
    let mut lower = CompactString::new(name);
    lower.make_ascii_lowercase();
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
pub fn record_name(name: &str) -> Option<CompactString> {
    label(name).filter(|n| !RESERVED_NAMES.contains(&n.as_str()))
}

/// One `<service>=<port>[/tcp|/udp]` of the `glued.srv` label (tcp when no
/// protocol is given); the service is a label without leading underscore.
pub fn parse_srv(item: &str) -> Option<SrvPort> {
    let (service, rest) = item.split_once('=')?;
    let service = service.trim().trim_start_matches('_').to_ascii_lowercase();
    let (port, proto) = match rest.trim().split_once('/') {
        Some((port, proto)) => (port, proto.trim().to_ascii_lowercase()),
        None => (rest, "tcp".to_string()),
    };
    let proto = match proto.as_str() {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        _ => return None,
    };
    let port: u16 = port.trim().parse().ok().filter(|p| *p > 0)?;
    // `_service` must stay a label of at most 63 bytes.
    if !is_valid_label(&service) || service.len() >= MAX_LABEL_LEN {
        return None;
    }
    Some(SrvPort {
        service: service.into(),
        proto,
        port,
    })
}

/// The table shared between the registry (writer) and the DNS threads.
pub type SharedTable = Arc<ArcSwap<Table>>;

/// A new shared table holding an empty snapshot.
pub fn shared(domain: &str, ttl_secs: u32) -> SharedTable {
    Arc::new(ArcSwap::from_pointee(Table::empty(domain, ttl_secs)))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use smallvec::smallvec;

    /// `n` replicas on node-a sharing 49 names, a Compose scope and 4 SRV
    /// ports, each with its own primary name: (50 names + the scope) ×
    /// (unpinned, pinned) × (addresses + 4 ports) = 510 keys each.
    pub(crate) fn replicas(n: u8) -> Vec<((Origin, Source), Group)> {
        (0..n)
            .map(|i| {
                let owner = (
                    Origin {
                        id: "a".into(),
                        node_name: "node-a".into(),
                    },
                    Source::Container {
                        id: format!("c{i}").into(),
                        network: "net".into(),
                    },
                );
                let group = Group {
                    names: std::iter::once(format!("c{i}"))
                        .chain((0..49).map(|n| format!("name-{n}")))
                        .map(CompactString::from)
                        .collect(),
                    v4: smallvec![Ipv4Addr::new(10, 0, 0, i)],
                    scope: Some(Box::new(Scope {
                        project: "p".into(),
                        service: "svc".into(),
                    })),
                    srv: (1..=4)
                        .map(|port| SrvPort {
                            service: format!("s{port}").into(),
                            proto: Proto::Tcp,
                            port,
                        })
                        .collect(),
                    ..Default::default()
                };
                (owner, group)
            })
            .collect()
    }

    pub(crate) const REPLICA_KEYS: u64 = 510;

    /// An entry is built from what its holders' keys recorded, not by
    /// enumerating every key of every holder again: a build writes each
    /// key of each group once. (It wrote holders × keys per group for each
    /// key: 5 million keys for these 20 replicas, a stalled registry for a
    /// few hundred.)
    #[test]
    fn a_build_writes_each_key_of_each_group_once() {
        KEYS_WRITTEN.with(|n| n.set(0));
        let t = Table::build_for(
            "glued.internal",
            5,
            1,
            replicas(20).into_iter().collect::<Groups>(),
            "a",
        );
        assert_eq!(KEYS_WRITTEN.with(|n| n.get()), 20 * REPLICA_KEYS);
        let e = t.lookup(b"_s3._tcp.name-7.node-a").unwrap();
        assert_eq!((e.srv().len(), e.srv_local()), (20, 20));
        assert!(e.srv().iter().all(|s| s.port == 3) && e.v4().is_empty());
        let e = t.lookup(b"svc.p").unwrap();
        assert_eq!((e.v4().len(), e.v4_local()), (20, 20));
        assert!(e.srv().is_empty());
        assert_eq!(t.lookup(b"_s1._tcp.c3").unwrap().srv().len(), 1);
        assert!(t.is_node(b"_tcp.svc.p.node-a"));
    }

    /// Most names answer one IPv4 address: their entry is 16 bytes in the
    /// map and no allocation of its own; the same records always make the
    /// same form, so entries compare by value. Most keys (`name`,
    /// `name.node`) are short: kept inline too.
    #[test]
    fn an_entry_of_one_ipv4_address_and_a_short_key_are_kept_inline() {
        assert_eq!(std::mem::size_of::<Entry>(), 16);
        assert_eq!(std::mem::size_of::<Key>(), 24);
        let short: &[u8] = b"host1234.node-1";
        assert!(matches!(Key::from(short), Key::Inline { .. }));
        assert_eq!(Key::from(short).as_bytes(), short);
        let long = [b'a'; KEY_INLINE + 1];
        assert!(matches!(Key::from(&long[..]), Key::Boxed(_)));
        assert_eq!(Key::from(Box::from(&long[..])).as_bytes(), long);
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let one = Entry::new(Records {
            v4: Box::new([ip("10.0.0.1")]),
            v4_local: 1,
            ..Default::default()
        });
        assert!(matches!(one.0, Repr::V4 { local: true, .. }));
        assert_eq!((one.v4(), one.v4_local()), (&[ip("10.0.0.1")][..], 1));
        assert!(one.v6().is_empty() && one.srv().is_empty() && !one.is_empty());
        let two = Entry::new(Records {
            v4: Box::new([ip("10.0.0.1"), ip("10.0.0.2")]),
            ..Default::default()
        });
        assert!(matches!(two.0, Repr::Records(_)));
        assert_eq!((two.v4().len(), two.v4_local()), (2, 0));
        assert!(Entry::default().is_empty());
    }

    /// Most addresses have one holder: an IPv4 PTR slot is 16 bytes (a map
    /// keyed by `IpAddr` with a list of holders took 48).
    #[test]
    fn a_ptr_slot_of_one_ipv4_address_is_16_bytes() {
        assert_eq!(std::mem::size_of::<Ptr<Ipv4Addr>>(), 16);
        assert_eq!(std::mem::size_of::<Ptr<Ipv6Addr>>(), 32);
    }

    /// Issue 9: a remote record costs one shared [`Held`], and its lists
    /// kept inline must not make it bigger: an `Arc<Held>` (with its two
    /// counts) stays one 224-byte chunk of glibc's malloc, as it was with
    /// `Vec`s (`Held` was 192 bytes then).
    #[test]
    fn a_held_group_stays_one_allocation_of_the_same_size() {
        assert!(size_of::<Held>() <= 208, "{}", size_of::<Held>());
        // The inline lists are as big as the `Vec`s they replace, the names
        // one word more (a whole `CompactString` inline).
        assert_eq!(size_of::<V4Addrs>(), size_of::<Vec<Ipv4Addr>>());
        assert_eq!(size_of::<V6Addrs>(), size_of::<Vec<Ipv6Addr>>());
        assert_eq!(size_of::<Names>(), size_of::<Vec<String>>() + 8);
        assert_eq!(size_of::<Source>(), 2 * size_of::<String>());
    }

    /// `/records`, `glued records` and anything else that shows groups as
    /// JSON see what they saw when names and addresses were `Vec`s and
    /// strings `String`s.
    #[test]
    fn groups_and_sources_keep_their_json() {
        let group = Group {
            names: smallvec!["db".into(), "a-name-longer-than-24-bytes".into()],
            v4: smallvec!["10.0.0.5".parse().unwrap()],
            v6: smallvec!["fd00::5".parse().unwrap()],
            scope: Some(Box::new(Scope {
                project: "p".into(),
                service: "svc".into(),
            })),
            health: Health::Healthy,
            srv: vec![SrvPort {
                service: "http".into(),
                proto: Proto::Udp,
                port: 8080,
            }],
        };
        let json = r#"{"names":["db","a-name-longer-than-24-bytes"],"v4":["10.0.0.5"],"v6":["fd00::5"],"scope":{"project":"p","service":"svc"},"health":"healthy","srv":[{"service":"http","proto":"udp","port":8080}]}"#;
        assert_eq!(serde_json::to_string(&group).unwrap(), json);
        assert_eq!(serde_json::from_str::<Group>(json).unwrap(), group);
        let plain = r#"{"names":["web"],"v4":[],"v6":[],"health":"none"}"#;
        let web = Group {
            names: smallvec!["web".into()],
            ..Group::default()
        };
        assert_eq!(serde_json::to_string(&web).unwrap(), plain);
        let sources = [
            Source::Static { name: "db".into() },
            Source::Container {
                id: "c0ffee".into(),
                network: "net".into(),
            },
        ];
        assert_eq!(
            serde_json::to_string(&sources).unwrap(),
            r#"[{"kind":"static","name":"db"},{"kind":"container","id":"c0ffee","network":"net"}]"#
        );
    }

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
                names: smallvec!["API".into()],
                v4: smallvec!["10.0.0.1".parse().unwrap()],
                v6: smallvec![],
                ..Default::default()
            },
        );
        groups.insert(
            (origin("b", "host-b"), Source::Static { name: "api".into() }),
            Group {
                names: smallvec!["api".into()],
                v4: smallvec!["10.0.0.2".parse().unwrap()],
                v6: smallvec!["fd00::2".parse().unwrap()],
                ..Default::default()
            },
        );
        let table = Table::build("Glued.Internal.", 5, 1, Arc::new(groups));
        assert_eq!(table.domain, "glued.internal");
        let all = table.lookup(b"api").unwrap();
        assert_eq!(all.v4().len(), 2);
        assert_eq!(all.v6().len(), 1);
        let pinned = table.lookup(b"api.host-a").unwrap();
        assert_eq!(pinned.v4(), &["10.0.0.1".parse::<Ipv4Addr>().unwrap()]);
        assert!(pinned.v6().is_empty());
        assert!(table.lookup(b"nope").is_none());
        let ptr = table.reverse(&"fd00::2".parse().unwrap()).unwrap();
        assert_eq!(ptr.to_vec(), &*name_to_wire("api.glued.internal"));
    }

    /// A name held by one node answers its pinned key from the name's own
    /// slot: a table of one-holder names keeps one slot per name (it kept
    /// two), answers every pinned key, and no other.
    #[test]
    fn one_holder_names_keep_no_pinned_slot_yet_answer_it() {
        let list: Vec<(CompactString, Ipv4Addr)> = (0..100u8)
            .map(|i| {
                (
                    compact_str::format_compact!("host{i}"),
                    Ipv4Addr::new(10, 1, 0, i),
                )
            })
            .collect();
        let mut groups = BTreeMap::new();
        for (name, ip) in &list {
            groups.insert(
                (origin("b", "Node-B"), Source::Static { name: name.clone() }),
                Group {
                    names: smallvec![name.clone()],
                    v4: smallvec![*ip],
                    ..Default::default()
                },
            );
        }
        let t = Table::build("glued.internal", 5, 1, Arc::new(groups));
        assert_eq!((t.n_names(), t.n_name_slots()), (200, 100));
        for (name, ip) in &list {
            let pinned = format!("{name}.node-b");
            assert_eq!(t.lookup(pinned.as_bytes()).unwrap().v4(), &[*ip]);
            assert!(t.lookup(format!("{name}.node-c").as_bytes()).is_none());
            assert!(t.lookup(format!("{pinned}.node-b").as_bytes()).is_none());
        }
        assert!(t.is_node(b"node-b") && !t.is_node(b"host1"));
        assert_eq!(t.names().count(), 200);
    }

    /// The pinned keys of a Compose scope and of SRV names are implied the
    /// same way, and answered.
    #[test]
    fn pinned_scope_and_srv_keys_are_answered_without_slots() {
        let mut groups = BTreeMap::new();
        groups.insert(
            (
                origin("b", "node-b"),
                Source::Container {
                    id: "c1".into(),
                    network: "net".into(),
                },
            ),
            Group {
                names: smallvec!["web".into()],
                v4: smallvec![Ipv4Addr::new(10, 0, 0, 1)],
                scope: Some(Box::new(Scope {
                    project: "proj".into(),
                    service: "svc".into(),
                })),
                srv: vec![parse_srv("http=80").unwrap()],
                ..Default::default()
            },
        );
        let t = Table::build("glued.internal", 5, 1, Arc::new(groups));
        // `web`, `svc.proj` and the SRV name of each, each pinned too.
        assert_eq!((t.n_names(), t.n_name_slots()), (8, 4));
        for base in ["web", "svc.proj", "_http._tcp.web", "_http._tcp.svc.proj"] {
            let pinned = format!("{base}.node-b");
            let entry = t.lookup(pinned.as_bytes());
            assert!(
                entry.is_some() && entry == t.lookup(base.as_bytes()),
                "{pinned}"
            );
        }
        let srv = t.lookup(b"_http._tcp.svc.proj.node-b").unwrap().srv();
        assert_eq!((srv.len(), srv[0].port), (1, 80));
        assert!(t.is_node(b"_tcp.svc.proj.node-b") && t.is_node(b"proj.node-b"));
        assert!(t.lookup(b"svc.proj.node-a").is_none());
    }

    /// A static name equal to the pinned key of another node's name (or a
    /// scope key equal to one) is held by both: that key keeps a slot
    /// answering both.
    #[test]
    fn a_name_equal_to_a_pinned_key_keeps_a_slot() {
        let t = Table::build(
            "glued.internal",
            5,
            1,
            groups(&[
                ("node-b", "api", "10.0.0.1"),
                ("node-a", "api.node-b", "10.0.0.2"),
            ]),
        );
        assert_eq!(t.lookup(b"api.node-b").unwrap().v4().len(), 2);
        assert_eq!(t.lookup(b"api").unwrap().v4().len(), 1);
        // `api`, `api.node-b`, `api.node-b.node-a` (two holders: no base
        // implies it).
        assert_eq!((t.n_names(), t.n_name_slots()), (3, 3));
        assert_eq!(t.lookup(b"api.node-b.node-a").unwrap().v4().len(), 1);
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
                    names: smallvec![(*name).into()],
                    v4: smallvec![ip.parse().unwrap()],
                    v6: smallvec![],
                    ..Default::default()
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
        let web = t.holders(b"web.host-b").unwrap()[0].0.clone();
        t.remove_holder(b"web.host-b", &web, |_| {});
        assert!(t.is_node(b"host-b"), "kept until forgotten");
        t.forget_name(b"web.host-b");
        assert!(!t.is_node(b"host-b"));
        let db = Arc::new(Held {
            key: (
                origin("host-c", "host-c"),
                Source::Static { name: "db".into() },
            ),
            group: Group::default(),
        });
        t.add_holder(b"db.host-c", &db, KeyKind::Addr.bit(), |_| {});
        assert!(t.is_node(b"host-c"));
        t.remove_addr_holder(&ip("10.0.1.2"), &web);
        t.forget_addr(&ip("10.0.1.2"));
        assert!(!t.has_address_in(ip("10.0.1.0"), 24));
        t.add_addr_holder(ip("fd00::5"), &db);
        assert!(t.has_address_in(ip("fd00::"), 16));
        assert!(t.has_address_in(ip("fd00::5"), 128));
        assert!(!t.has_address_in(ip("fd00::6"), 128));
    }
}
