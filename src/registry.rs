//! The record registry: the single writer of the name table.
//!
//! Every record source (static config, Docker, gossip from peers) sends
//! [`RegistryMsg`]s to one thread. The thread owns every [`Group`] by
//! `(Origin, Source)`, drains its inbox in bursts, and publishes one new
//! [`Table`] per burst through the shared `ArcSwap`.
//!
//! Invariants: only this thread stores into the [`SharedTable`]; a burst of
//! changes produces one rebuild; a group with no names or no addresses is
//! the same as no group.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};

use crate::table::{Group, Origin, SharedTable, Source, SourceKind, Table};

/// Capacity of the registry inbox. Senders block when it is full, which
/// paces a burst instead of dropping it.
pub const INBOX_CAPACITY: usize = 4096;
/// Most messages applied before one table rebuild.
pub const MAX_BATCH: usize = 4096;

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
    /// Apply what is queued, then stop.
    Stop,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct RegistryStats {
    pub updates: AtomicU64,
    pub rebuilds: AtomicU64,
    pub groups: AtomicU64,
}

impl RegistryStats {
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(
            out,
            "# TYPE glued_registry_updates_total counter\nglued_registry_updates_total {}",
            self.updates.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE glued_registry_rebuilds_total counter\nglued_registry_rebuilds_total {}",
            self.rebuilds.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE glued_registry_groups gauge\nglued_registry_groups {}",
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
    /// after every rebuild that changed a group of `local_id`; it is bounded
    /// to one and never blocks the registry.
    pub fn spawn(
        table: SharedTable,
        stats: Arc<RegistryStats>,
        local_id: String,
        local_changed: Option<Sender<()>>,
    ) -> Registry {
        let (tx, rx) = bounded(INBOX_CAPACITY);
        let thread = std::thread::Builder::new()
            .name("registry".into())
            .spawn(move || run(rx, table, stats, local_id, local_changed))
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
    let mut state = State::default();
    let mut serial = table.load().serial;
    loop {
        let Ok(first) = rx.recv() else { return };
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
            if let Some(origin_id) = state.apply(m) {
                changed = true;
                local |= origin_id == local_id;
            }
            n += 1;
            if n < MAX_BATCH {
                msg = rx.try_recv().ok();
            }
        }
        if changed {
            serial = serial.wrapping_add(1);
            let old = table.load();
            let next = Table::build(
                &old.domain,
                old.ttl_secs,
                serial,
                Arc::new(state.groups.clone()),
            );
            table.store(Arc::new(next));
            stats.rebuilds.fetch_add(1, Ordering::Relaxed);
            stats
                .groups
                .store(state.groups.len() as u64, Ordering::Relaxed);
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

/// The registry's own record set: pure, so it is tested without threads.
#[derive(Default)]
pub struct State {
    pub groups: BTreeMap<(Origin, Source), Group>,
}

impl State {
    /// Applies one message; returns the id of the origin whose records
    /// changed, or `None` when nothing changed.
    pub fn apply(&mut self, msg: RegistryMsg) -> Option<String> {
        match msg {
            RegistryMsg::Upsert {
                origin,
                source,
                group,
            } => {
                let id = origin.id.clone();
                let key = (origin, source);
                if is_empty(&group) {
                    return self.groups.remove(&key).map(|_| id);
                }
                if self.groups.get(&key) == Some(&group) {
                    return None;
                }
                self.groups.insert(key, group);
                Some(id)
            }
            RegistryMsg::Remove { origin, source } => {
                let id = origin.id.clone();
                self.groups.remove(&(origin, source)).map(|_| id)
            }
            RegistryMsg::Replace {
                origin,
                kind,
                groups,
            } => {
                let id = origin.id.clone();
                let mut fresh: BTreeMap<(Origin, Source), Group> = groups
                    .into_iter()
                    .filter(|(s, g)| !is_empty(g) && kind.is_none_or(|k| s.kind() == k))
                    .map(|(s, g)| ((origin.clone(), s), g))
                    .collect();
                let before: Vec<_> = self
                    .groups
                    .iter()
                    .filter(|((o, s), _)| o.id == id && kind.is_none_or(|k| s.kind() == k))
                    .map(|(k, _)| k.clone())
                    .collect();
                let mut changed = false;
                for key in before {
                    match fresh.remove(&key) {
                        Some(g) => {
                            let slot = self.groups.get_mut(&key).expect("present");
                            if *slot != g {
                                *slot = g;
                                changed = true;
                            }
                        }
                        None => {
                            self.groups.remove(&key);
                            changed = true;
                        }
                    }
                }
                if !fresh.is_empty() {
                    changed = true;
                    self.groups.append(&mut fresh);
                }
                changed.then_some(id)
            }
            RegistryMsg::DropOrigin { id } => {
                let before = self.groups.len();
                self.groups.retain(|(o, _), _| o.id != id);
                (self.groups.len() != before).then_some(id)
            }
            RegistryMsg::Stop => None,
        }
    }
}

fn is_empty(group: &Group) -> bool {
    group.names.is_empty() || (group.v4.is_empty() && group.v6.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(id: &str) -> Origin {
        Origin {
            id: id.into(),
            node_name: format!("node-{id}"),
        }
    }

    fn group(name: &str, ip: &str) -> Group {
        Group {
            names: vec![name.into()],
            v4: vec![ip.parse().unwrap()],
            v6: vec![],
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
        let keys: Vec<_> = s.groups.keys().map(|(_, s)| s.clone()).collect();
        assert_eq!(keys, vec![Source::Static { name: "db".into() }, container("c2")]);
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
        assert_eq!(s.groups.len(), 1);
        assert_eq!(s.apply(RegistryMsg::DropOrigin { id: "a".into() }), None);
    }

    #[test]
    fn the_thread_publishes_one_table_per_burst() {
        let table = crate::table::shared("glued.internal", 5);
        let stats = Arc::new(RegistryStats::default());
        let reg = Registry::spawn(table.clone(), stats.clone(), "a".into(), None);
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
