//! The record registry: the single writer of the name table.
//!
//! Every record source (static config, Docker, gossip from peers) sends
//! [`RegistryMsg`]s to one thread. The thread owns every [`Group`] by
//! `(Origin, Source)`, drains its inbox in bursts, and publishes one new
//! [`Table`] per burst through the shared `ArcSwap`.
//!
//! A publish costs what the burst changed, not the size of the table. The
//! next table starts as a clone of the published one, which shares all of
//! its shards (`table.rs`). The name and address indexes (key → the groups
//! holding it) live in the table, each entry with its holders; [`State`]
//! records which groups a burst gained and lost, and the publish enumerates
//! their keys once, updates the holders and recomputes those entries alone
//! in the clone, copying the shards they fall in, before it is swapped in. Tables at rest share every shard that did not change
//! between them: one copy of the maps, whoever holds an older table. A table
//! stored by someone else, a burst that changed most of the table, or a
//! table that grew to 4× the entries per shard it was built for, is replaced
//! by one built from every group (counted in [`RegistryStats::full_builds`]).
//!
//! Invariants: only this thread stores into the [`SharedTable`] (a table
//! stored by anyone else is never written to: the registry notices the
//! foreign pointer and rebuilds); a published table is never mutated; after
//! every burst the published table equals `Table::build` of the registry's
//! groups; a burst of changes produces one publish; a group with no names or
//! no addresses is the same as no group.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
#[cfg(test)]
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError, bounded};

use crate::table::{
    EntryBuilder, Group, GroupKey, Groups, Held, Origin, SharedTable, Source, SourceKind, Table,
    is_conflict,
};

/// Capacity of the registry inbox. Senders block when it is full, which
/// paces a burst instead of dropping it.
pub const INBOX_CAPACITY: usize = 4096;
/// Most messages applied before one table publish.
pub const MAX_BATCH: usize = 4096;
/// Entries a cleared change set keeps room for; a bigger one (a peer's full
/// state of thousands of groups) gives its memory back.
const CHANGES_KEEP: usize = 1024;
/// A burst that changed at least this many groups, and at least half of
/// the table's, is published as a table built from scratch (about what
/// patching that many costs; its maps come out sized to fit), and the
/// allocator's free memory is given back after it.
const BIG_BURST: usize = 2048;
/// A table with at least this many names built from scratch is followed by
/// giving the allocator's free memory back.
const BIG_TABLE: usize = 4096;

type FastSet<K> = HashSet<K, foldhash::fast::FixedState>;

/// One change to the record set.
#[derive(Debug)]
pub enum RegistryMsg {
    /// Create or replace one group.
    Upsert {
        origin: Origin,
        source: Source,
        group: Group,
    },
    /// Remove one group.
    Remove { origin: Origin, source: Source },
    /// Replace every group of `origin` (of `kind` only, when given) by
    /// `groups`: a Docker resynchronisation or a peer's full state.
    Replace {
        origin: Origin,
        kind: Option<SourceKind>,
        groups: Vec<(Source, Group)>,
    },
    /// Forget every group of the origin with this id (lease expired).
    DropOrigin { id: String },
    /// Publish every answer with this TTL from now on (a reload).
    SetTtl(u32),
    /// Apply what is queued, then stop.
    Stop,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct RegistryStats {
    pub updates: AtomicU64,
    /// Tables published (one per burst that changed something).
    pub rebuilds: AtomicU64,
    /// Tables built from every group instead of patched: after a burst that
    /// changed most of the table, or a table stored by someone else.
    pub full_builds: AtomicU64,
    pub groups: AtomicU64,
    /// Liveness of the registry thread.
    pub heartbeat: Arc<crate::health::Heartbeat>,
}

impl RegistryStats {
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(
            out,
            "# HELP glued_registry_updates_total Changes applied by the registry.\n\
             # TYPE glued_registry_updates_total counter\nglued_registry_updates_total {}",
            self.updates.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP glued_registry_rebuilds_total Name tables published.\n\
             # TYPE glued_registry_rebuilds_total counter\nglued_registry_rebuilds_total {}",
            self.rebuilds.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP glued_registry_full_builds_total Name tables built from every group instead of patched.\n\
             # TYPE glued_registry_full_builds_total counter\nglued_registry_full_builds_total {}",
            self.full_builds.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP glued_registry_groups Record groups held (one per container and network, or static name).\n\
             # TYPE glued_registry_groups gauge\nglued_registry_groups {}",
            self.groups.load(Ordering::Relaxed)
        );
    }
}

/// Handle to the running registry thread.
pub struct Registry {
    pub tx: Sender<RegistryMsg>,
    thread: Option<JoinHandle<()>>,
}

impl Registry {
    /// Starts the registry thread. `local_changed` (if any) gets a token
    /// after every publish that changed a group of `local_id`; it is bounded
    /// to one and never blocks the registry.
    pub fn spawn(
        table: SharedTable,
        stats: Arc<RegistryStats>,
        local_id: impl AsRef<str>,
        local_changed: Option<Sender<()>>,
    ) -> Registry {
        let local_id = local_id.as_ref().to_owned();
        let (tx, rx) = bounded(INBOX_CAPACITY);
        let thread = std::thread::Builder::new()
            .name("registry".into())
            .spawn(move || {
                let alive = stats.heartbeat.enter();
                run(rx, table, stats, local_id, local_changed);
                alive.retire();
            })
            .expect("spawn registry thread");
        Registry {
            tx,
            thread: Some(thread),
        }
    }

    /// Applies what is queued and joins the thread.
    pub fn stop(mut self) {
        let _ = self.tx.send(RegistryMsg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    rx: Receiver<RegistryMsg>,
    table: SharedTable,
    stats: Arc<RegistryStats>,
    local_id: String,
    local_changed: Option<Sender<()>>,
) {
    let mut state = State::for_local(&local_id);
    let mut writer = Writer::new(table);
    loop {
        stats.heartbeat.beat();
        let first = match rx.recv_timeout(crate::health::BEAT_INTERVAL) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut stop = false;
        let mut local = false;
        let mut changed = false;
        let mut msg = Some(first);
        let mut n = 0;
        while let Some(m) = msg.take() {
            if matches!(m, RegistryMsg::Stop) {
                stop = true;
                break;
            }
            stats.updates.fetch_add(1, Ordering::Relaxed);
            if let RegistryMsg::SetTtl(ttl_secs) = m {
                changed |= writer.set_ttl(ttl_secs);
            } else if let Some(origin_id) = state.apply(m) {
                changed = true;
                local |= origin_id == local_id;
            }
            n += 1;
            if n < MAX_BATCH {
                msg = rx.try_recv().ok();
            }
        }
        if changed {
            writer.publish(&mut state, &stats);
            stats.rebuilds.fetch_add(1, Ordering::Relaxed);
            stats
                .groups
                .store(state.n_groups() as u64, Ordering::Relaxed);
            if local && let Some(tx) = &local_changed {
                match tx.try_send(()) {
                    Ok(()) | Err(TrySendError::Full(())) => {}
                    Err(TrySendError::Disconnected(())) => {}
                }
            }
        }
        if stop {
            return;
        }
    }
}

/// The publishing half of the registry: the shared table and the table it
/// published last.
struct Writer {
    table: SharedTable,
    domain: String,
    ttl_secs: u32,
    serial: u32,
    /// The table published last: the next one is a clone of it. `None`
    /// until the first publish (unless the shared table is an empty one to
    /// adopt).
    last: Option<Arc<Table>>,
    scratch: Scratch,
}

/// Buffers reused for every publish.
#[derive(Default)]
struct Scratch {
    entry: EntryBuilder,
    key: Vec<u8>,
    /// Name keys (as in [`Table::lookup`]) whose entries may have changed.
    names: FastSet<Box<[u8]>>,
    /// Addresses whose PTR answer may have changed.
    addrs: FastSet<IpAddr>,
}

impl Writer {
    fn new(table: SharedTable) -> Writer {
        let current = table.load_full();
        // An empty table is in step with the registry's empty state: the
        // first publish patches a clone of it.
        let adopt = current.n_names() == 0
            && current.groups.is_empty()
            && current.addresses().next().is_none();
        let (domain, ttl_secs, serial) = (current.domain.clone(), current.ttl_secs, current.serial);
        Writer {
            table,
            domain,
            ttl_secs,
            serial,
            last: adopt.then_some(current),
            scratch: Scratch::default(),
        }
    }

    /// Changes the TTL of the tables published from now on; true when it
    /// differs.
    fn set_ttl(&mut self, ttl_secs: u32) -> bool {
        if ttl_secs == self.ttl_secs {
            return false;
        }
        self.ttl_secs = ttl_secs;
        true
    }

    /// Publishes the registry's groups as they are now, with the changes
    /// `state` recorded since the last publish.
    fn publish(&mut self, state: &mut State, stats: &RegistryStats) {
        self.serial = self.serial.wrapping_add(1);
        let current = self.table.load_full();
        let changed = state.index.changes.groups.len();
        let base = self.last.take().filter(|last| {
            Arc::ptr_eq(last, &current)
                && changed < BIG_BURST.max(last.groups.len() / 2)
                && !last.overfull()
        });
        drop(current);
        let mut trim = false;
        let mut next = match base {
            Some(last) => {
                let mut next = (*last).clone();
                drop(last);
                apply_changes(&mut next, state, &mut self.scratch);
                next
            }
            None => {
                stats.full_builds.fetch_add(1, Ordering::Relaxed);
                let table = state.build(&self.domain, self.ttl_secs, self.serial);
                // Its scratch maps (every key with its holders) are freed:
                // given back once the table is out.
                trim = table.n_names() >= BIG_TABLE;
                table
            }
        };
        next.serial = self.serial;
        next.ttl_secs = self.ttl_secs;
        state.note_conflicts(&next);
        let next = Arc::new(next);
        self.table.store(next.clone());
        self.last = Some(next);
        state.index.changes.clear();
        if trim {
            give_back_free_memory();
        }
    }
}

/// Returns the allocator's free pages to the system after a full build of
/// a big table: the peer's full state, its decoded copies and the build's
/// scratch maps are freed by then, but glibc keeps freed memory inside its
/// heaps (resident) unless asked. Walks every arena: milliseconds, as rare
/// as full builds.
fn give_back_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Brings `table` (a clone of the last published table) up to date with
/// the changes `state` recorded: the name keys and addresses each gained or
/// lost group holds (enumerated here, once), then the entries and PTR
/// answers they touched, and hands it the registry's groups (shared, not
/// copied). The keys touched, and the pinned keys the table gave a slot so
/// that they keep their answer (`Table::add_holder`), are compacted first
/// (`Table::compact`: a pinned key its base implies again gives its slot
/// back), then have their entries recomputed.
fn apply_changes(table: &mut Table, state: &State, scratch: &mut Scratch) {
    // Both sets were left empty by the last call.
    for (held, gained) in &state.index.changes.groups {
        let (names, addrs) = (&mut scratch.names, &mut scratch.addrs);
        held.group
            .for_each_key(&held.key.0.node_name, &mut scratch.key, |key, kind| {
                // A pinned key given a slot so that it keeps its answer.
                let noted = |pinned: &[u8]| {
                    if !names.contains(pinned) {
                        names.insert(Box::from(pinned));
                    }
                };
                match gained {
                    true => table.add_holder(key, held, kind.bit(), noted),
                    // A key held under several kinds is lost at the first.
                    false => table.remove_holder(key, held, noted),
                }
                if !names.contains(key) {
                    names.insert(Box::from(key));
                }
            });
        for ip in addrs_of(&held.group) {
            match gained {
                true => table.add_addr_holder(ip, held),
                false => table.remove_addr_holder(&ip, held),
            }
            addrs.insert(ip);
        }
    }
    // Holders are set: a pinned key its base implies again gives its slot
    // back, and needs no entry of its own (its base's is set here if it
    // changed).
    for key in &scratch.names {
        table.compact(key);
    }
    for key in &scratch.names {
        if table.is_implied(key) {
            continue;
        }
        let Some(holders) = table.holders(key).filter(|h| !h.is_empty()) else {
            table.forget_name(key);
            table.set_conflict(key, false);
            continue;
        };
        let entry = scratch.entry.build(
            holders
                .iter()
                .map(|(h, holds)| (&h.key.0, &h.group, *holds)),
            &state.local,
            &table.domain_wire,
        );
        let conflict = (!key.contains(&b'.'))
            .then(|| is_conflict(key, holders.iter().map(|(h, _)| (&h.key.1, &h.group))));
        table.set_entry(key, entry);
        if let Some(conflict) = conflict {
            table.set_conflict(key, conflict);
        }
    }
    for ip in &scratch.addrs {
        table.forget_addr(ip);
    }
    scratch.names.clear();
    scratch.addrs.clear();
    scratch.names.shrink_to(CHANGES_KEEP);
    scratch.addrs.shrink_to(CHANGES_KEEP);
    table.groups = state.groups.clone();
}

/// What changed since the last publish: the groups gained (`true`) and
/// lost, in order (a changed group is its old one lost and its new one
/// gained).
#[derive(Default)]
struct Changes {
    groups: Vec<(Arc<Held>, bool)>,
}

impl Changes {
    fn clear(&mut self) {
        self.groups.clear();
        self.groups.shrink_to(CHANGES_KEEP);
    }
}

/// The registry's own record set: pure, so it is tested without threads.
///
/// Each group is one shared [`Held`] in [`Groups`] (the map every table
/// shares). The indexes, name key → groups answering it and address →
/// groups holding it, live in the table itself (each entry with its
/// holders): the state records which holders a change gains and loses, and
/// the next publish applies them, so that one changed group recomputes only
/// its own names and addresses, whatever the size of the table.
#[derive(Default)]
pub struct State {
    /// Endpoint id of this node: its holders are answered first.
    local: String,
    /// Names in conflict at the last publish (for the log line when one
    /// appears).
    conflicts: Arc<std::collections::BTreeSet<String>>,
    groups: Groups,
    index: Index,
}

/// The changes recorded since the last publish. A holder is the group's
/// [`Held`] (compared by address).
#[derive(Default)]
struct Index {
    changes: Changes,
}

impl State {
    /// An empty state of the node with endpoint id `local`.
    pub fn for_local(local: &str) -> State {
        State {
            local: local.to_owned(),
            ..State::default()
        }
    }

    /// Logs one info line for each name that became a conflict (SPEC §3)
    /// in `table` (the table about to be published) since the last one.
    fn note_conflicts(&mut self, table: &Table) {
        for name in table.conflicts.iter() {
            if self.conflicts.contains(name) {
                continue;
            }
            let holders = table.holders(name.as_bytes());
            let mut who: Vec<String> = holders
                .into_iter()
                .flatten()
                .map(|(h, _)| {
                    let what = match (&h.key.1, &h.group.scope) {
                        (Source::Static { .. }, _) => "static record".to_string(),
                        (Source::Container { .. }, Some(scope)) => {
                            format!("project {}", scope.project)
                        }
                        (Source::Container { .. }, None) => "container".to_string(),
                    };
                    format!("{what} on {}", h.key.0.node_name)
                })
                .collect();
            who.sort();
            who.dedup();
            log::info!("Name conflict: {name} is published by {}", who.join(", "));
        }
        self.conflicts = table.conflicts.clone();
    }

    /// Applies one message; returns the id of the origin whose records
    /// changed, or `None` when nothing changed.
    pub fn apply(&mut self, msg: RegistryMsg) -> Option<String> {
        match msg {
            RegistryMsg::Upsert {
                origin,
                source,
                group,
            } => {
                let id = origin.id.to_string();
                self.put((origin, source), group).then_some(id)
            }
            RegistryMsg::Remove { origin, source } => {
                let id = origin.id.to_string();
                self.delete(&(origin, source)).then_some(id)
            }
            RegistryMsg::Replace {
                origin,
                kind,
                groups,
            } => {
                let id = origin.id.to_string();
                // Later duplicates of a source win, as in a map.
                let mut fresh: BTreeMap<Source, Group> = groups
                    .into_iter()
                    .filter(|(s, g)| !is_empty(g) && kind.is_none_or(|k| s.kind() == k))
                    .collect();
                let before: Vec<Arc<Held>> = self
                    .held_of(&id)
                    .filter(|h| kind.is_none_or(|kind| h.key.1.kind() == kind))
                    .cloned()
                    .collect();
                let mut changed = false;
                for held in before {
                    let kept = if held.key.0 == origin {
                        fresh.remove(&held.key.1)
                    } else {
                        None
                    };
                    changed |= match kept {
                        Some(group) => self.replace(&held, group),
                        None => self.delete(&held.key),
                    };
                }
                for (source, group) in fresh {
                    changed |= self.put((origin.clone(), source), group);
                }
                changed.then_some(id)
            }
            RegistryMsg::DropOrigin { id } => {
                let gone: Vec<Arc<Held>> = self.held_of(&id).cloned().collect();
                let mut changed = false;
                for held in gone {
                    changed |= self.delete(&held.key);
                }
                changed.then_some(id)
            }
            RegistryMsg::Stop | RegistryMsg::SetTtl(_) => None,
        }
    }

    /// Number of groups held.
    pub fn n_groups(&self) -> usize {
        self.groups.len()
    }

    /// Every group, in key order.
    pub fn groups(&self) -> impl Iterator<Item = (&GroupKey, &Group)> {
        self.groups.iter()
    }

    /// The group of one key.
    pub fn get(&self, key: &GroupKey) -> Option<&Group> {
        self.groups.get(key)
    }

    /// A table built from scratch from every group.
    pub fn build(&self, domain: &str, ttl_secs: u32, serial: u32) -> Table {
        Table::build_for(domain, ttl_secs, serial, self.groups.clone(), &self.local)
    }

    /// Every group of the origin with this id, in key order.
    fn held_of<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a Arc<Held>> + 'a {
        let first: GroupKey = (
            Origin {
                id: id.into(),
                node_name: "".into(),
            },
            Source::Static {
                name: Default::default(),
            },
        );
        self.groups
            .held_from(&first)
            .take_while(move |h| &*h.key.0.id == id)
    }

    /// `origin` with the strings of the origin's first group held, where
    /// they are equal, so that every group of an origin shares them.
    fn interned(&self, origin: Origin) -> Origin {
        let first = self.held_of(&origin.id).next().map(|h| h.key.0.clone());
        match first {
            Some(h) => Origin {
                id: h.id,
                node_name: if h.node_name == origin.node_name {
                    h.node_name
                } else {
                    origin.node_name
                },
            },
            None => origin,
        }
    }

    /// Creates or replaces one group; `false` when nothing changed.
    ///
    /// What is kept (here and in [`State::replace`]) is a copy made by this
    /// thread, sized to fit. A peer's groups are decoded on a gossip runtime
    /// thread. The usual one, one short name and a few addresses, owns no
    /// allocation ([`Group`]), so its copy is a plain copy; one with heap
    /// parts (several or long names, a container's id, a scope, SRV ports)
    /// kept as it came would pin that thread's allocator arena, its small
    /// allocations interleaved with the freed message (about 230 bytes of
    /// resident memory per remote record, measured before groups were kept
    /// inline).
    fn put(&mut self, key: GroupKey, group: Group) -> bool {
        if let Some(held) = self.groups.held(&key) {
            let held = held.clone();
            return self.replace(&held, group);
        }
        if is_empty(&group) {
            return false;
        }
        let (origin, source) = key;
        let key = (self.interned(origin), source.clone());
        let held = Arc::new(Held {
            key,
            group: group.clone(),
        });
        self.index.add(&held);
        self.groups.insert(held);
        true
    }

    /// Replaces the group of `held`, which is in use.
    fn replace(&mut self, held: &Arc<Held>, group: Group) -> bool {
        if is_empty(&group) {
            return self.delete(&held.key);
        }
        if held.group == group {
            return false;
        }
        let new = Arc::new(Held {
            key: held.key.clone(),
            group: group.clone(),
        });
        self.index.remove(held);
        self.index.add(&new);
        self.groups.insert(new);
        true
    }

    /// Removes one group; `false` when there was none.
    fn delete(&mut self, key: &GroupKey) -> bool {
        let Some(held) = self.groups.remove(key) else {
            return false;
        };
        self.index.remove(&held);
        true
    }
}

impl Index {
    /// Records that `held`'s names and addresses are gained.
    fn add(&mut self, held: &Arc<Held>) {
        self.changes.groups.push((held.clone(), true));
    }

    /// Records that `held`'s names and addresses are lost.
    fn remove(&mut self, held: &Arc<Held>) {
        self.changes.groups.push((held.clone(), false));
    }
}

fn addrs_of(group: &Group) -> impl Iterator<Item = IpAddr> + '_ {
    let v4 = group.v4.iter().map(|ip| IpAddr::V4(*ip));
    v4.chain(group.v6.iter().map(|ip| IpAddr::V6(*ip)))
}

fn is_empty(group: &Group) -> bool {
    group.names.is_empty() || (group.v4.is_empty() && group.v6.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use smallvec::smallvec;
    use std::time::Duration;

    fn origin(id: &str) -> Origin {
        Origin {
            id: id.into(),
            node_name: format!("node-{id}").into(),
        }
    }

    fn group(name: &str, ip: &str) -> Group {
        Group {
            names: smallvec![name.into()],
            v4: smallvec![ip.parse().unwrap()],
            v6: smallvec![],
            ..Default::default()
        }
    }

    fn container(id: &str) -> Source {
        Source::Container {
            id: id.into(),
            network: "net".into(),
        }
    }

    #[test]
    fn upsert_of_an_identical_group_changes_nothing() {
        let mut s = State::default();
        let m = || RegistryMsg::Upsert {
            origin: origin("a"),
            source: Source::Static { name: "db".into() },
            group: group("db", "10.0.0.5"),
        };
        assert_eq!(s.apply(m()), Some("a".into()));
        assert_eq!(s.apply(m()), None);
    }

    #[test]
    fn replace_of_one_kind_keeps_the_other_kinds() {
        let mut s = State::default();
        s.apply(RegistryMsg::Upsert {
            origin: origin("a"),
            source: Source::Static { name: "db".into() },
            group: group("db", "10.0.0.5"),
        });
        s.apply(RegistryMsg::Upsert {
            origin: origin("a"),
            source: container("c1"),
            group: group("web", "10.0.0.6"),
        });
        let changed = s.apply(RegistryMsg::Replace {
            origin: origin("a"),
            kind: Some(SourceKind::Container),
            groups: vec![(container("c2"), group("api", "10.0.0.7"))],
        });
        assert_eq!(changed, Some("a".into()));
        let keys: Vec<_> = s.groups().map(|((_, s), _)| s.clone()).collect();
        assert_eq!(
            keys,
            vec![Source::Static { name: "db".into() }, container("c2")]
        );
    }

    /// A peer's groups arrive with an origin of their own each (one per
    /// message, copied per group of a full state): the registry keeps one
    /// copy of its strings, not one per group.
    #[test]
    fn every_group_of_an_origin_shares_its_strings() {
        let mut s = State::default();
        s.apply(RegistryMsg::Replace {
            origin: origin("a"),
            kind: None,
            groups: vec![
                (container("c1"), group("web", "10.0.0.6")),
                (container("c2"), group("api", "10.0.0.7")),
            ],
        });
        s.apply(RegistryMsg::Upsert {
            origin: origin("a"),
            source: container("c3"),
            group: group("db", "10.0.0.8"),
        });
        s.apply(RegistryMsg::Upsert {
            origin: origin("b"),
            source: container("c1"),
            group: group("db", "10.0.0.9"),
        });
        let origins: Vec<&Origin> = s.groups().map(|((o, _), _)| o).collect();
        assert_eq!(origins.len(), 4);
        let (a, b) = (origins[0], origins[3]);
        for o in &origins[1..3] {
            assert!(Arc::ptr_eq(&o.id, &a.id) && Arc::ptr_eq(&o.node_name, &a.node_name));
        }
        assert!(!Arc::ptr_eq(&a.id, &b.id));
    }

    #[test]
    fn drop_origin_removes_only_that_origin() {
        let mut s = State::default();
        for id in ["a", "b"] {
            s.apply(RegistryMsg::Upsert {
                origin: origin(id),
                source: Source::Static { name: "db".into() },
                group: group("db", "10.0.0.5"),
            });
        }
        assert_eq!(
            s.apply(RegistryMsg::DropOrigin { id: "a".into() }),
            Some("a".into())
        );
        assert_eq!(s.n_groups(), 1);
        assert_eq!(s.apply(RegistryMsg::DropOrigin { id: "a".into() }), None);
    }

    /// Patching the table after a change rebuilds the changed keys from
    /// what the index recorded of their holders: the work is the changed
    /// group's keys (removed, added), not holders × keys per group for
    /// each of them.
    #[test]
    fn a_change_of_one_replica_writes_its_keys_and_no_other() {
        use crate::table::tests::{REPLICA_KEYS, replicas};
        use crate::table::{Health, KEYS_WRITTEN};
        let (table, stats, mut state, mut writer) = empty_writer();
        let mut all = replicas(20);
        KEYS_WRITTEN.with(|n| n.set(0));
        for ((origin, source), group) in all.clone() {
            state.apply(RegistryMsg::Upsert {
                origin,
                source,
                group,
            });
        }
        writer.publish(&mut state, &stats);
        let ((origin, source), group) = &mut all[0];
        group.health = Health::Unhealthy;
        state.apply(RegistryMsg::Upsert {
            origin: origin.clone(),
            source: source.clone(),
            group: group.clone(),
        });
        writer.publish(&mut state, &stats);
        // Both publishes patch (the first one the empty table it adopted).
        assert_eq!(stats.full_builds.load(Ordering::Relaxed), 0);
        // Index: 20 groups added, then one removed and added again; the
        // patches: none.
        assert_eq!(KEYS_WRITTEN.with(|n| n.get()), (20 + 2) * REPLICA_KEYS);
        let published = table.load();
        assert_eq!(published.lookup(b"name-3").unwrap().v4().len(), 19);
        assert_same_as_build(&published, &state);
    }

    /// A name held by one node has one slot, its pinned key implied. A
    /// second node taking the name gives each node's pinned key a slot of
    /// its own, and the first node's still answers its own address alone;
    /// once either lets go, the table answers as a fresh build and gives
    /// the slots back.
    #[test]
    fn a_second_node_taking_a_name_keeps_each_pinned_key_to_its_node() {
        let (table, stats, mut state, mut writer) = empty_writer();
        let api = || Source::Static { name: "api".into() };
        let upsert = |id: &str, ip: &str| RegistryMsg::Upsert {
            origin: origin(id),
            source: api(),
            group: group("api", ip),
        };
        let v4 = |t: &Table, key: &str| -> Vec<String> {
            let e = t.lookup(key.as_bytes());
            e.map(|e| e.v4().iter().map(|ip| ip.to_string()).collect())
                .unwrap_or_default()
        };
        state.apply(upsert("b", "10.0.0.2"));
        writer.publish(&mut state, &stats);
        let t = table.load_full();
        assert_eq!((t.n_names(), t.n_name_slots()), (2, 1));
        assert_eq!(v4(&t, "api.node-b"), ["10.0.0.2"]);

        state.apply(upsert("c", "10.0.0.3"));
        writer.publish(&mut state, &stats);
        let t = table.load_full();
        assert_eq!(v4(&t, "api"), ["10.0.0.2", "10.0.0.3"]);
        assert_eq!(v4(&t, "api.node-b"), ["10.0.0.2"]);
        assert_eq!(v4(&t, "api.node-c"), ["10.0.0.3"]);
        assert!(t.lookup(b"api.node-b.node-b").is_none());
        assert_eq!((t.n_names(), t.n_name_slots()), (3, 3));
        assert_same_as_build(&t, &state);

        state.apply(RegistryMsg::Remove {
            origin: origin("c"),
            source: api(),
        });
        writer.publish(&mut state, &stats);
        let t = table.load_full();
        assert_eq!(v4(&t, "api"), ["10.0.0.2"]);
        assert!(t.lookup(b"api.node-c").is_none());
        assert_eq!((t.n_names(), t.n_name_slots()), (2, 1));
        assert_same_as_build(&t, &state);

        // The other way round: the first node lets go.
        state.apply(upsert("c", "10.0.0.3"));
        writer.publish(&mut state, &stats);
        state.apply(RegistryMsg::DropOrigin { id: "b".into() });
        writer.publish(&mut state, &stats);
        let t = table.load_full();
        assert_eq!(v4(&t, "api.node-c"), ["10.0.0.3"]);
        assert!(t.lookup(b"api.node-b").is_none());
        assert_eq!((t.n_names(), t.n_name_slots()), (2, 1));
        assert_same_as_build(&t, &state);
        assert_eq!(stats.full_builds.load(Ordering::Relaxed), 0);
    }

    /// An empty published table, the state of node "a" and its writer.
    fn empty_writer() -> (SharedTable, RegistryStats, State, Writer) {
        let table = crate::table::shared("glued.internal", 5);
        let writer = Writer::new(table.clone());
        (
            table,
            RegistryStats::default(),
            State::for_local("a"),
            writer,
        )
    }

    /// Asserts that `published` answers exactly what a table built from
    /// scratch from `state` answers.
    fn assert_same_as_build(published: &Table, state: &State) {
        let fresh = state.build(&published.domain, published.ttl_secs, published.serial);
        assert_same(published, &fresh);
    }

    /// Asserts that `published` answers exactly what `fresh` answers: every
    /// name either holds (implied pinned keys included), the same name
    /// pinned to each node of either, every empty non-terminal above them,
    /// every PTR.
    fn assert_same(published: &Table, fresh: &Table) {
        let mut nodes: Vec<String> = (fresh.groups.iter().chain(published.groups.iter()))
            .map(|((o, _), _)| o.node_name.to_ascii_lowercase())
            .collect();
        nodes.sort();
        nodes.dedup();
        let keys: Vec<Vec<u8>> = (fresh.names().chain(published.names()))
            .map(|(k, _)| k.into_owned())
            .collect();
        for key in &keys {
            let name = String::from_utf8_lossy(key);
            assert_eq!(published.lookup(key), fresh.lookup(key), "name {name}");
            for node in &nodes {
                let mut pinned = key.clone();
                pinned.push(b'.');
                pinned.extend_from_slice(node.as_bytes());
                let what = format!("name {name}.{node}");
                assert_eq!(published.lookup(&pinned), fresh.lookup(&pinned), "{what}");
            }
            for (at, _) in key.iter().enumerate().filter(|(_, b)| **b == b'.') {
                let suffix = &key[at + 1..];
                let what = format!("node {}", String::from_utf8_lossy(suffix));
                assert_eq!(published.is_node(suffix), fresh.is_node(suffix), "{what}");
            }
        }
        assert_eq!(published.n_names(), fresh.n_names());
        // A slot given to a pinned key by a change is given back once its
        // base implies it again: no more slots than a fresh build.
        assert_eq!(published.n_name_slots(), fresh.n_name_slots(), "slots");
        for (ip, target) in fresh.addresses() {
            assert_eq!(published.reverse(&ip), Some(target), "PTR of {ip}");
        }
        for (ip, _) in published.addresses() {
            assert!(fresh.reverse(&ip).is_some(), "stale PTR of {ip}");
        }
        assert_eq!(published.groups, fresh.groups);
        assert_eq!(published.conflicts, fresh.conflicts);
        assert_eq!(published.n_records(), fresh.n_records());
    }

    fn random_origin(rng: &mut fastrand::Rng) -> Origin {
        // Origin "a" is also seen under a second node name (a rename).
        // Origin "b" is also seen as node `P1`: its name `db` pinned is
        // `db.p1`, the scoped key of service `db` of project `p1`.
        let (id, node) = [
            ("a", "Node-A"),
            ("a", "node-a2"),
            ("b", "node-b"),
            ("c", "NODE-C"),
            ("b", "P1"),
        ][rng.usize(..5)];
        Origin {
            id: id.into(),
            node_name: node.into(),
        }
    }

    fn random_source(rng: &mut fastrand::Rng) -> Source {
        if rng.bool() {
            Source::Static {
                name: ["api", "db", "web"][rng.usize(..3)].into(),
            }
        } else {
            Source::Container {
                id: format!("c{}", rng.usize(..4)).into(),
                network: ["n1", "n2"][rng.usize(..2)].into(),
            }
        }
    }

    fn random_group(rng: &mut fastrand::Rng) -> Group {
        use crate::table::{Health, Proto, Scope, SrvPort};
        // `api.node-b` collides with the pinned key of `api` on node-b;
        // `db.p1` with the scoped key of service `db` of project `p1`.
        const NAMES: [&str; 8] = ["api", "API", "web", "db", "x", "api.node-b", "Web", "db.p1"];
        Group {
            names: (0..rng.usize(..3))
                .map(|_| NAMES[rng.usize(..NAMES.len())].into())
                .collect(),
            v4: (0..rng.usize(..3))
                .map(|_| Ipv4Addr::new(10, 0, 0, rng.u8(1..7)))
                .collect(),
            v6: (0..rng.usize(..2))
                .map(|_| Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, rng.u16(1..4)))
                .collect(),
            scope: match rng.u8(..3) {
                0 => None,
                p => Some(Box::new(Scope {
                    project: format!("p{p}").into(),
                    service: ["db", "web"][rng.usize(..2)].into(),
                })),
            },
            health: [
                Health::None,
                Health::Starting,
                Health::Healthy,
                Health::Unhealthy,
            ][rng.usize(..4)],
            srv: (0..rng.usize(..3))
                .map(|_| SrvPort {
                    service: ["http", "db"][rng.usize(..2)].into(),
                    proto: [Proto::Tcp, Proto::Udp][rng.usize(..2)],
                    port: [80, 8080][rng.usize(..2)],
                })
                .collect(),
        }
    }

    fn random_msg(rng: &mut fastrand::Rng) -> RegistryMsg {
        match rng.u8(..20) {
            0..11 => RegistryMsg::Upsert {
                origin: random_origin(rng),
                source: random_source(rng),
                group: random_group(rng),
            },
            11..15 => RegistryMsg::Remove {
                origin: random_origin(rng),
                source: random_source(rng),
            },
            15..18 => RegistryMsg::Replace {
                origin: random_origin(rng),
                kind: [None, Some(SourceKind::Static), Some(SourceKind::Container)][rng.usize(..3)],
                groups: (0..rng.usize(..5))
                    .map(|_| (random_source(rng), random_group(rng)))
                    .collect(),
            },
            _ => RegistryMsg::DropOrigin {
                id: ["a", "b", "c"][rng.usize(..3)].into(),
            },
        }
    }

    /// One changed group of a peer's 10 000 copies the few shards its keys
    /// and addresses fall in, not the table; the table published before
    /// it is left as it was.
    #[test]
    fn a_small_change_to_a_big_table_copies_only_the_shards_it_touches() {
        let (table, stats, mut state, mut writer) = empty_writer();
        let name = |i: u32| format!("host{i}");
        let ip = |i: u32| format!("10.1.{}.{}", i / 250, i % 250 + 1);
        state.apply(RegistryMsg::Replace {
            origin: origin("b"),
            kind: None,
            groups: (0..10_000)
                .map(|i| {
                    (
                        Source::Static {
                            name: name(i).into(),
                        },
                        group(&name(i), &ip(i)),
                    )
                })
                .collect(),
        });
        writer.publish(&mut state, &stats);
        let before = table.load_full();
        let fresh_before = state.build("glued.internal", 5, before.serial);
        state.apply(RegistryMsg::Upsert {
            origin: origin("b"),
            source: Source::Static {
                name: name(7).into(),
            },
            group: group(&name(7), "10.9.0.1"),
        });
        writer.publish(&mut state, &stats);
        let after = table.load_full();
        // `host7` and `host7.node-b`; the PTR of the old and the new address.
        let copied = after.shards_not_shared_with(&before);
        assert!((1..=4).contains(&copied), "{copied} shards copied");
        assert_eq!(stats.full_builds.load(Ordering::Relaxed), 1);
        assert_same_as_build(&after, &state);
        assert_same(&before, &fresh_before);
    }

    /// A table that grows by small bursts keeps its shards' size bounded:
    /// once it holds 4× the entries per shard it was built for, the next
    /// publish builds it again with more shards (amortised, as a hash
    /// table grows), so a change never copies shards of the whole table.
    #[test]
    fn a_table_grown_by_small_bursts_is_rebuilt_with_more_shards() {
        use crate::table::{MAX_ENTRIES_PER_SHARD, MIN_SHARDS};
        let (table, stats, mut state, mut writer) = empty_writer();
        assert_eq!(table.load().shard_count(), MIN_SHARDS);
        // A name slot and an address a group (its pinned key is implied):
        // past the bound after half as many groups.
        let n = (MAX_ENTRIES_PER_SHARD * MIN_SHARDS / 2 + 8) as u32;
        for i in 0..n {
            state.apply(RegistryMsg::Upsert {
                origin: origin("b"),
                source: container(&i.to_string()),
                group: group(&format!("c{i}"), &format!("10.{}.{}.1", i / 250, i % 250)),
            });
            writer.publish(&mut state, &stats);
        }
        assert_eq!(stats.full_builds.load(Ordering::Relaxed), 1);
        assert!(table.load().shard_count() > MIN_SHARDS);
        assert_same_as_build(&table.load(), &state);
    }

    #[test]
    fn incremental_publishes_equal_a_full_build_after_random_bursts() {
        const BURSTS: usize = 3000;
        let table = crate::table::shared("Glued.Internal.", 5);
        let stats = RegistryStats::default();
        // Origin "b" is this node: its holders come first.
        let mut state = State::for_local("b");
        let mut writer = Writer::new(table.clone());
        let mut rng = fastrand::Rng::with_seed(0x91ed);
        let (mut n_messages, mut n_publishes) = (0, 0);
        let (mut n_conflicts, mut n_srv, mut n_local) = (0, 0, 0);
        // The table published before, held by a reader, with what it
        // answered then: the next publish must leave it as it was.
        let mut held: Option<(Arc<Table>, Table)> = None;
        let mut serial = table.load().serial;
        for burst in 0..BURSTS {
            let mut changed = false;
            for _ in 0..rng.usize(1..7) {
                changed |= state.apply(random_msg(&mut rng)).is_some();
                n_messages += 1;
            }
            if burst == BURSTS / 2 {
                // A table stored by someone else is never written to.
                table.store(Arc::new(state.build("glued.internal", 5, 0)));
                assert!(state.build("glued.internal", 5, 0).local_id.as_ref() == "b");
                changed = true;
            }
            if !changed {
                continue;
            }
            writer.publish(&mut state, &stats);
            n_publishes += 1;
            serial = serial.wrapping_add(1);
            let published = table.load();
            assert_eq!(published.serial, serial);
            assert_same_as_build(&published, &state);
            if let Some((old, then)) = held.take() {
                assert_same(&old, &then);
            }
            n_conflicts += usize::from(!published.conflicts.is_empty());
            n_srv += usize::from(published.names().any(|(_, e)| !e.srv().is_empty()));
            n_local += usize::from(
                published
                    .names()
                    .any(|(_, e)| e.v4_local() > 0 && e.v4().len() > e.v4_local() as usize),
            );
            if burst != BURSTS / 2 - 1 {
                let then = state.build(&published.domain, published.ttl_secs, published.serial);
                held = Some((table.load_full(), then));
            }
        }
        assert!(n_messages > 10_000 && n_publishes > 2000, "{n_publishes}");
        // Conflicts, SRV names and local-first entries were all exercised.
        assert!(
            n_conflicts > 100 && n_srv > 100 && n_local > 100,
            "{n_conflicts} {n_srv} {n_local}"
        );
        // The foreign table alone: the first publish patches the empty
        // table it adopted, and a reader holding a table costs nothing.
        assert_eq!(stats.full_builds.load(Ordering::Relaxed), 1, "full builds");
    }

    #[test]
    fn a_new_ttl_is_published_and_kept_by_later_bursts() {
        let table = crate::table::shared("glued.internal", 5);
        let reg = Registry::spawn(table.clone(), Arc::default(), "a", None);
        let upsert = |i: u8| RegistryMsg::Upsert {
            origin: origin("a"),
            source: container(&i.to_string()),
            group: group(&format!("c{i}"), &format!("10.0.1.{i}")),
        };
        reg.tx.send(upsert(1)).unwrap();
        reg.tx.send(RegistryMsg::SetTtl(30)).unwrap();
        let wait = |want: &dyn Fn(&Table) -> bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while !want(&table.load()) {
                assert!(std::time::Instant::now() < deadline, "not published");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        wait(&|t| t.ttl_secs == 30 && t.lookup(b"c1").is_some());
        // Later bursts patch a clone of the last table: it must keep the new TTL.
        for i in 2..6u8 {
            reg.tx.send(upsert(i)).unwrap();
            wait(&|t| t.lookup(format!("c{i}").as_bytes()).is_some());
            assert_eq!(table.load().ttl_secs, 30, "after burst {i}");
        }
        reg.stop();
        assert_eq!(table.load().ttl_secs, 30);
    }

    #[test]
    fn the_thread_publishes_one_table_per_burst() {
        let table = crate::table::shared("glued.internal", 5);
        let stats = Arc::new(RegistryStats::default());
        let reg = Registry::spawn(table.clone(), stats.clone(), "a", None);
        for i in 0..100u8 {
            reg.tx
                .send(RegistryMsg::Upsert {
                    origin: origin("a"),
                    source: container(&i.to_string()),
                    group: group(&format!("c{i}"), &format!("10.0.1.{i}")),
                })
                .unwrap();
        }
        reg.stop();
        let t = table.load();
        assert!(t.lookup(b"c99").is_some());
        assert!(stats.rebuilds.load(Ordering::Relaxed) <= 100);
        assert_eq!(stats.groups.load(Ordering::Relaxed), 100);
    }
}
