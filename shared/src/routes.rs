//! The route table: which instances serve which service version, at which revision.
//!
//! The directory owns the table and bumps its `revision` (u64) on every change; `epoch` is
//! random per directory start, so a revision is only meaningful within one epoch. Sidecars
//! hold a replica: they apply full snapshots and deltas with the same code as the directory
//! (Baker: catch up with the full table, then updates).
//!
//! [`RouteLog`] is the directory's side: the table plus a bounded history of changes, so a
//! subscriber that holds (epoch, revision) gets only what it missed when the history still
//! reaches back that far, and a full snapshot otherwise.

use std::cmp::Ordering;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The state of an instance as its agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Registered, health check not yet passing: receives no traffic.
    Starting,
    /// Passing its health check: receives traffic.
    Up,
    /// Shutting down: receives no new requests; in-flight ones finish.
    Draining,
    /// Failing its health check (or its process exited): receives no traffic.
    Unknown,
}

impl InstanceState {
    /// Every state, in the order of their life.
    pub const ALL: [InstanceState; 4] = [
        InstanceState::Starting,
        InstanceState::Up,
        InstanceState::Draining,
        InstanceState::Unknown,
    ];

    /// Only `up` instances are routed to.
    pub fn routable(self) -> bool {
        self == InstanceState::Up
    }

    /// The lowercase name used in JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::Up => "up",
            InstanceState::Draining => "draining",
            InstanceState::Unknown => "unknown",
        }
    }
}

/// Identifies one instance: service name, version and the id its agent chose.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct InstanceKey {
    pub service: String,
    pub version: String,
    pub id: String,
}

/// One route: an instance of a service version and where it listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub service: String,
    pub version: String,
    /// Unique per instance; stable across agent reconnects so a directory restart changes
    /// nothing a sidecar can see.
    pub id: String,
    /// Where the instance serves plain HTTP.
    pub address: SocketAddr,
    /// Requests the instance serves at once (Waiter: concurrency level; reserver slots).
    pub capacity: u32,
    /// Relative share of traffic (reserved for weighted routing; 1 by default).
    pub weight: u32,
    pub state: InstanceState,
    /// When the instance registered, in milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    pub labels: BTreeMap<String, String>,
}

impl Instance {
    pub fn key(&self) -> InstanceKey {
        InstanceKey {
            service: self.service.clone(),
            version: self.version.clone(),
            id: self.id.clone(),
        }
    }
}

/// A service version the directory manages: routable by name even with no instance, so a
/// request for it waits for a cold start instead of getting `404` (Waiter: scale to zero).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceVersion {
    pub service: String,
    pub version: String,
}

/// One change to the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Add the instance, or replace the entry with the same key.
    Upsert(Instance),
    /// Withdraw the instance.
    Remove(InstanceKey),
    /// Declare a managed service version (known even with no instance).
    Declare(ServiceVersion),
    /// Forget a declared service version.
    Undeclare(ServiceVersion),
}

/// Why a batch of deltas cannot be applied to a replica.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DeltaError {
    #[error("deltas are for epoch {got:x}, the table is at epoch {held:x}")]
    WrongEpoch { held: u64, got: u64 },
    #[error("deltas start at revision {from}, the table is at revision {held}")]
    Gap { held: u64, from: u64 },
}

/// A route table at one (epoch, revision).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteTable {
    pub epoch: u64,
    pub revision: u64,
    instances: BTreeMap<InstanceKey, Instance>,
    #[serde(default)]
    declared: std::collections::BTreeSet<ServiceVersion>,
}

impl RouteTable {
    /// An empty table at revision 0 of `epoch`.
    pub fn new(epoch: u64) -> Self {
        Self {
            epoch,
            revision: 0,
            instances: BTreeMap::new(),
            declared: Default::default(),
        }
    }

    /// A table holding exactly `instances` at (epoch, revision): a full snapshot.
    pub fn from_snapshot(epoch: u64, revision: u64, instances: Vec<Instance>) -> Self {
        Self {
            epoch,
            revision,
            instances: instances.into_iter().map(|i| (i.key(), i)).collect(),
            declared: Default::default(),
        }
    }

    /// The same table with `declared` as its managed service versions.
    pub fn with_declared(mut self, declared: impl IntoIterator<Item = ServiceVersion>) -> Self {
        self.declared = declared.into_iter().collect();
        self
    }

    /// The declared (managed) service versions.
    pub fn declared(&self) -> impl Iterator<Item = &ServiceVersion> {
        self.declared.iter()
    }

    /// Applies one change without touching the revision. Returns whether anything changed.
    pub fn apply(&mut self, change: Change) -> bool {
        match change {
            Change::Upsert(instance) => {
                let key = instance.key();
                if self.instances.get(&key) == Some(&instance) {
                    return false;
                }
                self.instances.insert(key, instance);
                true
            }
            Change::Remove(key) => self.instances.remove(&key).is_some(),
            Change::Declare(version) => self.declared.insert(version),
            Change::Undeclare(version) => self.declared.remove(&version),
        }
    }

    /// Applies a batch of deltas that takes the table from `from` to `to` within `epoch`.
    ///
    /// Errors (and leaves the table untouched) when the epoch differs or `from` is not the
    /// revision held: the caller must then ask for a snapshot.
    pub fn apply_deltas(
        &mut self,
        epoch: u64,
        from: u64,
        to: u64,
        changes: &[Change],
    ) -> Result<(), DeltaError> {
        if epoch != self.epoch {
            return Err(DeltaError::WrongEpoch {
                held: self.epoch,
                got: epoch,
            });
        }
        if from != self.revision {
            return Err(DeltaError::Gap {
                held: self.revision,
                from,
            });
        }
        for change in changes {
            self.apply(change.clone());
        }
        self.revision = to;
        Ok(())
    }

    /// Whether the table names the service version: declared, or with at least one instance
    /// (O(log n)).
    pub fn names_version(&self, service: &str, version: &str) -> bool {
        self.instances_of(service, version).next().is_some()
            || self.declared.contains(&ServiceVersion {
                service: service.to_string(),
                version: version.to_string(),
            })
    }

    /// The instances of one service version, ordered by id: O(log n) to the first, then one
    /// step per instance of the version (the table is ordered by (service, version, id)).
    pub fn instances_of<'a>(
        &'a self,
        service: &'a str,
        version: &'a str,
    ) -> impl Iterator<Item = &'a Instance> + 'a {
        let first = InstanceKey {
            service: service.to_string(),
            version: version.to_string(),
            id: String::new(),
        };
        self.instances
            .range(first..)
            .take_while(move |(key, _)| key.service == service && key.version == version)
            .map(|(_, instance)| instance)
    }

    pub fn get(&self, key: &InstanceKey) -> Option<&Instance> {
        self.instances.get(key)
    }

    /// Every instance, ordered by (service, version, id).
    pub fn instances(&self) -> impl Iterator<Item = &Instance> {
        self.instances.values()
    }

    pub fn len(&self) -> usize {
        self.instances.len()
    }

    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// The instances of one service, grouped by version, newest version first
    /// (see [`compare_versions`]); a declared version without instances has an empty list.
    pub fn versions_of(&self, service: &str) -> Vec<(&str, Vec<&Instance>)> {
        let mut versions: BTreeMap<&str, Vec<&Instance>> = BTreeMap::new();
        for declared in self.declared.iter().filter(|d| d.service == service) {
            versions.entry(declared.version.as_str()).or_default();
        }
        for instance in self.instances.values().filter(|i| i.service == service) {
            versions
                .entry(instance.version.as_str())
                .or_default()
                .push(instance);
        }
        let mut versions: Vec<_> = versions.into_iter().collect();
        versions.sort_by(|a, b| compare_versions(b.0, a.0));
        versions
    }
}

/// Orders version names naturally: runs of digits compare as numbers, so `v2 < v10` and
/// `2024-05-01 < 2024-12-01`. The greatest version is the newest.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (trim_zeros(&a[..da]), trim_zeros(&b[..db]));
                let ord = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let zeros = digits.iter().take_while(|c| **c == b'0').count();
    &digits[zeros..]
}

/// What a subscriber holding some (epoch, revision) needs to catch up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatchUp {
    /// The changes after its revision, oldest first (empty when it is up to date).
    Deltas(Vec<Change>),
    /// Its epoch is another directory run's, or the history no longer reaches back: it needs
    /// the whole table.
    Snapshot,
}

/// The directory's table plus a bounded history of recent changes.
#[derive(Debug, Clone)]
pub struct RouteLog {
    table: RouteTable,
    /// `(revision, change)` for the most recent changes, oldest first.
    history: VecDeque<(u64, Change)>,
    history_limit: usize,
}

impl RouteLog {
    /// An empty table of `epoch` that remembers the last `history_limit` changes.
    pub fn new(epoch: u64, history_limit: usize) -> Self {
        Self {
            table: RouteTable::new(epoch),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
        }
    }

    pub fn table(&self) -> &RouteTable {
        &self.table
    }

    /// Applies `change`; if it changed the table, bumps the revision, records the change and
    /// returns the new revision.
    pub fn update(&mut self, change: Change) -> Option<u64> {
        if !self.table.apply(change.clone()) {
            return None;
        }
        self.table.revision += 1;
        if self.history.len() == self.history_limit {
            self.history.pop_front();
        }
        self.history.push_back((self.table.revision, change));
        Some(self.table.revision)
    }

    /// What a subscriber holding (`epoch`, `revision`) needs to reach the current revision.
    pub fn catch_up(&self, epoch: Option<u64>, revision: u64) -> CatchUp {
        if epoch != Some(self.table.epoch) || revision > self.table.revision {
            return CatchUp::Snapshot;
        }
        if revision == self.table.revision {
            return CatchUp::Deltas(Vec::new());
        }
        match self.history.front() {
            Some((oldest, _)) if *oldest <= revision + 1 => CatchUp::Deltas(
                self.history
                    .iter()
                    .filter(|(rev, _)| *rev > revision)
                    .map(|(_, c)| c.clone())
                    .collect(),
            ),
            _ => CatchUp::Snapshot,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn instance(service: &str, version: &str, id: &str, state: InstanceState) -> Instance {
        Instance {
            service: service.into(),
            version: version.into(),
            id: id.into(),
            address: "127.0.0.1:8080".parse().unwrap(),
            capacity: 4,
            weight: 1,
            state,
            started_at_ms: 1,
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn update_bumps_revision_only_on_real_changes() {
        let mut log = RouteLog::new(7, 100);
        let a = instance("web", "v1", "a", InstanceState::Up);
        assert_eq!(log.update(Change::Upsert(a.clone())), Some(1));
        assert_eq!(log.update(Change::Upsert(a.clone())), None, "same entry");
        assert_eq!(log.update(Change::Remove(a.key())), Some(2));
        assert_eq!(log.update(Change::Remove(a.key())), None, "already gone");
        assert_eq!(log.table().revision, 2);
    }

    #[test]
    fn snapshot_then_deltas_reproduce_the_directory_table() {
        let mut log = RouteLog::new(7, 100);
        log.update(Change::Upsert(instance(
            "web",
            "v1",
            "a",
            InstanceState::Up,
        )));
        let snap = log.table().clone();
        let mut replica = RouteTable::from_snapshot(
            snap.epoch,
            snap.revision,
            snap.instances().cloned().collect(),
        );
        log.update(Change::Upsert(instance(
            "web",
            "v1",
            "b",
            InstanceState::Up,
        )));
        log.update(Change::Upsert(instance(
            "web",
            "v1",
            "a",
            InstanceState::Draining,
        )));
        let CatchUp::Deltas(changes) = log.catch_up(Some(7), replica.revision) else {
            panic!("expected deltas");
        };
        assert_eq!(changes.len(), 2);
        replica
            .apply_deltas(7, snap.revision, log.table().revision, &changes)
            .unwrap();
        assert_eq!(&replica, log.table());
    }

    #[test]
    fn resume_needs_a_snapshot_for_another_epoch_or_a_trimmed_history() {
        let mut log = RouteLog::new(7, 2);
        for id in ["a", "b", "c", "d"] {
            log.update(Change::Upsert(instance("web", "v1", id, InstanceState::Up)));
        }
        assert_eq!(log.catch_up(Some(7), 4), CatchUp::Deltas(vec![]));
        assert!(matches!(log.catch_up(Some(7), 2), CatchUp::Deltas(c) if c.len() == 2));
        assert_eq!(
            log.catch_up(Some(7), 1),
            CatchUp::Snapshot,
            "history trimmed"
        );
        assert_eq!(log.catch_up(Some(8), 4), CatchUp::Snapshot, "other epoch");
        assert_eq!(log.catch_up(None, 0), CatchUp::Snapshot, "empty replica");
        assert_eq!(
            log.catch_up(Some(7), 9),
            CatchUp::Snapshot,
            "from the future"
        );
    }

    #[test]
    fn a_version_is_named_while_declared_or_with_an_instance() {
        let mut table = RouteTable::new(7);
        let v2 = ServiceVersion {
            service: "web".into(),
            version: "v2".into(),
        };
        table.apply(Change::Upsert(instance(
            "web",
            "v1",
            "a",
            InstanceState::Starting,
        )));
        table.apply(Change::Upsert(instance(
            "webx",
            "v1",
            "b",
            InstanceState::Up,
        )));
        table.apply(Change::Declare(v2.clone()));
        assert!(table.names_version("web", "v1"));
        assert!(table.names_version("web", "v2"), "declared, no instance");
        assert!(
            !table.names_version("web", "v"),
            "a prefix is not a version"
        );
        assert!(!table.names_version("we", "v1"));
        table.apply(Change::Remove(
            instance("web", "v1", "a", InstanceState::Up).key(),
        ));
        table.apply(Change::Undeclare(v2));
        assert!(
            !table.names_version("web", "v1"),
            "webx's instance is not web's"
        );
        assert!(!table.names_version("web", "v2"));
        assert!(table.names_version("webx", "v1"));
    }

    #[test]
    fn instances_of_a_version_are_its_own_and_no_neighbours() {
        let mut table = RouteTable::new(7);
        for (service, version, id) in [
            ("web", "v1", "b"),
            ("web", "v1", "a"),
            ("web", "v10", "c"),
            ("web", "v", "d"),
            ("webx", "v1", "e"),
            ("we", "bv1", "f"),
        ] {
            table.apply(Change::Upsert(instance(
                service,
                version,
                id,
                InstanceState::Up,
            )));
        }
        let ids = |service, version| -> Vec<String> {
            table
                .instances_of(service, version)
                .map(|i| i.id.clone())
                .collect()
        };
        assert_eq!(ids("web", "v1"), ["a", "b"], "in id order");
        assert_eq!(ids("web", "v10"), ["c"]);
        assert_eq!(ids("web", "v"), ["d"]);
        assert_eq!(ids("webx", "v1"), ["e"]);
        assert!(ids("web", "v2").is_empty());
        assert!(ids("", "").is_empty());
    }

    #[test]
    fn deltas_with_a_gap_or_wrong_epoch_are_refused_untouched() {
        let mut replica = RouteTable::new(7);
        let change = vec![Change::Upsert(instance(
            "web",
            "v1",
            "a",
            InstanceState::Up,
        ))];
        assert_eq!(
            replica.apply_deltas(8, 0, 1, &change),
            Err(DeltaError::WrongEpoch { held: 7, got: 8 })
        );
        assert_eq!(
            replica.apply_deltas(7, 3, 4, &change),
            Err(DeltaError::Gap { held: 0, from: 3 })
        );
        assert!(replica.is_empty());
        replica.apply_deltas(7, 0, 1, &change).unwrap();
        assert_eq!(replica.len(), 1);
    }

    #[test]
    fn versions_are_grouped_newest_first() {
        let mut t = RouteTable::new(1);
        for (v, id) in [("v2", "a"), ("v10", "b"), ("v1", "c"), ("v10", "d")] {
            t.apply(Change::Upsert(instance("web", v, id, InstanceState::Up)));
        }
        t.apply(Change::Upsert(instance(
            "api",
            "v9",
            "e",
            InstanceState::Up,
        )));
        let versions: Vec<_> = t
            .versions_of("web")
            .into_iter()
            .map(|(v, i)| (v, i.len()))
            .collect();
        assert_eq!(versions, vec![("v10", 2), ("v2", 1), ("v1", 1)]);
        assert!(t.versions_of("nope").is_empty());
    }

    #[test]
    fn declared_versions_are_routable_names_without_instances() {
        let mut log = RouteLog::new(1, 10);
        let v2 = ServiceVersion {
            service: "web".into(),
            version: "v2".into(),
        };
        assert_eq!(log.update(Change::Declare(v2.clone())), Some(1));
        assert_eq!(log.update(Change::Declare(v2.clone())), None);
        log.update(Change::Upsert(instance(
            "web",
            "v1",
            "a",
            InstanceState::Up,
        )));
        let versions: Vec<_> = log
            .table()
            .versions_of("web")
            .into_iter()
            .map(|(v, i)| (v, i.len()))
            .collect();
        assert_eq!(versions, vec![("v2", 0), ("v1", 1)]);
        let copy = RouteTable::from_snapshot(1, 2, log.table().instances().cloned().collect())
            .with_declared(log.table().declared().cloned());
        assert_eq!(&copy, log.table());
        log.update(Change::Undeclare(v2));
        assert_eq!(log.table().declared().count(), 0);
    }

    #[test]
    fn natural_version_order() {
        use Ordering::*;
        assert_eq!(compare_versions("v2", "v10"), Less);
        assert_eq!(compare_versions("v010", "v10"), Equal);
        assert_eq!(compare_versions("2024-05-01", "2024-12-01"), Less);
        assert_eq!(compare_versions("v1", "v1-rc"), Less);
        assert_eq!(compare_versions("b", "a"), Greater);
        assert_eq!(compare_versions("", "a"), Less);
    }
}
