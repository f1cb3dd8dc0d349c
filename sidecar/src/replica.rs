//! The sidecar's replica of the route table (Baker: clients replicate the routes).
//!
//! The request path never reads the table: it asks the [`RouteIndex`] (swapped atomically, read
//! without a lock) for a version's reserver. The table itself is copy-on-write behind a lock,
//! so a batch of deltas changes it in place, and the reservers with it, in O(changes) (issue
//! 5: a sidecar following 10,000 instances copied the whole table per batch). It comes from
//! the directory (snapshot, then deltas), or at startup from
//! `routes.json` in the state directory when the directory is unreachable; the tables from
//! the directory are persisted there (temp file + rename, at most every
//! [`PERSIST_INTERVAL`]), off the request path.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use usher_shared::routes::{Change, DeltaError, Instance, RouteTable, ServiceVersion};

use crate::reserver::{Reserver, Reservers};
use crate::route::{RouteError, RouteIndex};

/// File name of the persisted table in the state directory.
pub const ROUTES_FILE: &str = "routes.json";

/// Where the table the sidecar routes with came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// No table yet.
    None = 0,
    /// Loaded from `routes.json` at startup.
    Disk = 1,
    /// Received from the directory.
    Directory = 2,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::None => "none",
            Source::Disk => "disk",
            Source::Directory => "directory",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Source::Disk,
            2 => Source::Directory,
            _ => Source::None,
        }
    }
}

/// Why the persisted table could not be read or written.
#[derive(Debug, Error)]
pub enum PersistError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a route table: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `routes.json`: the table as a list (JSON keys must be strings, table keys are not).
#[derive(Debug, Serialize, Deserialize)]
struct Persisted {
    epoch: u64,
    revision: u64,
    instances: Vec<Instance>,
    #[serde(default)]
    declared: Vec<ServiceVersion>,
}

/// Reads `routes.json` from `dir`; `Ok(None)` if there is none.
pub fn load(dir: &Path) -> Result<Option<RouteTable>, PersistError> {
    let path = dir.join(ROUTES_FILE);
    let data = match std::fs::read(&path) {
        Ok(data) => data,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(PersistError::Read { path, source }),
    };
    let persisted: Persisted =
        serde_json::from_slice(&data).map_err(|source| PersistError::Parse { path, source })?;
    Ok(Some(
        RouteTable::from_snapshot(persisted.epoch, persisted.revision, persisted.instances)
            .with_declared(persisted.declared),
    ))
}

/// Writes `table` to `routes.json` in `dir` atomically: a temp file, fsync, rename.
pub fn save(dir: &Path, table: &RouteTable) -> Result<(), PersistError> {
    use std::io::Write;
    let path = dir.join(ROUTES_FILE);
    let tmp = dir.join(format!("{ROUTES_FILE}.tmp"));
    let err = |at: &Path| {
        let path = at.to_path_buf();
        move |source| PersistError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(err(dir))?;
    let persisted = Persisted {
        epoch: table.epoch,
        revision: table.revision,
        instances: table.instances().cloned().collect(),
        declared: table.declared().cloned().collect(),
    };
    let data = serde_json::to_vec(&persisted).map_err(|e| err(&path)(e.into()))?;
    let mut file = std::fs::File::create(&tmp).map_err(err(&tmp))?;
    file.write_all(&data).map_err(err(&tmp))?;
    file.sync_all().map_err(err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(err(&path))
}

/// The current table, where it came from, and whether the directory is connected.
#[derive(Debug)]
pub struct Replica {
    /// Shared with readers (admin, persistence) only while they look; changed in place.
    table: Mutex<Arc<RouteTable>>,
    /// The routing decisions of `table`, rebuilt when they change (a version comes or goes, or
    /// gains its first or loses its last routable instance).
    index: ArcSwap<RouteIndex>,
    source: AtomicU8,
    connected: AtomicBool,
    reservers: Arc<Reservers>,
    /// Bumped on every table from the directory; the persister follows it.
    received: watch::Sender<u64>,
}

impl Replica {
    /// An empty replica (source `none`) whose changes are pushed to `reservers`.
    pub fn new(reservers: Arc<Reservers>) -> Self {
        Self {
            table: Mutex::default(),
            index: ArcSwap::from_pointee(RouteIndex::default()),
            source: AtomicU8::new(Source::None as u8),
            connected: AtomicBool::new(false),
            reservers,
            received: watch::channel(0).0,
        }
    }

    /// The table held now (a snapshot: later changes do not show in it).
    pub fn table(&self) -> Arc<RouteTable> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Arc<RouteTable>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reserver of the service version `host` names (lock-free, no allocation); see
    /// [`RouteIndex::decide`] for the errors.
    pub fn route(&self, host: &str) -> Result<Arc<Reserver>, RouteError> {
        self.index.load().decide(host).cloned()
    }

    pub fn source(&self) -> Source {
        Source::from_u8(self.source.load(Ordering::Acquire))
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Release);
    }

    pub fn reservers(&self) -> &Arc<Reservers> {
        &self.reservers
    }

    /// What to send in `Subscribe`: the held epoch (`None` without a table) and revision.
    pub fn held(&self) -> (Option<u64>, u64) {
        let table = self.table();
        match self.source() {
            Source::None => (None, 0),
            _ => (Some(table.epoch), table.revision),
        }
    }

    /// Routes with `table` from now on.
    pub fn set(&self, table: RouteTable, source: Source) {
        let mut held = self.lock();
        let index = RouteIndex::new(self.reservers.sync(&table));
        *held = Arc::new(table);
        self.index.store(Arc::new(index));
        drop(held);
        self.updated(source);
    }

    /// Applies a batch of deltas from the directory (see [`RouteTable::apply_deltas`]) to the
    /// table and the reservers in place, O(changes); the index is rebuilt only when a version
    /// comes, goes, or gains or loses its last routable instance.
    ///
    /// Errors (and changes nothing) on another epoch or a gap: the caller must resubscribe.
    pub fn apply_deltas(
        &self,
        epoch: u64,
        from: u64,
        to: u64,
        changes: &[Change],
    ) -> Result<(), DeltaError> {
        let mut held = self.lock();
        let table = Arc::make_mut(&mut held);
        table.apply_deltas(epoch, from, to, changes)?;
        if let Some(versions) = self.reservers.apply(changes, table) {
            self.index.store(Arc::new(RouteIndex::new(versions)));
        }
        drop(held);
        self.updated(Source::Directory);
        Ok(())
    }

    /// Adds (or replaces) the instances and managed versions of `changes` in the table held,
    /// which keeps its epoch and revision: a restarted directory's instances during its grace
    /// period ([`usher_shared::protocol::DirectoryMessage::GraceUpserts`]), before the
    /// snapshot that replaces the table when the grace period ends. The caller passes only
    /// `Upsert` and `Declare` changes.
    pub fn merge(&self, changes: &[Change]) {
        let mut held = self.lock();
        let table = Arc::make_mut(&mut held);
        for change in changes {
            table.apply(change.clone());
        }
        if let Some(versions) = self.reservers.apply(changes, table) {
            self.index.store(Arc::new(RouteIndex::new(versions)));
        }
        drop(held);
        self.updated(Source::Directory);
    }

    fn updated(&self, source: Source) {
        self.source.store(source as u8, Ordering::Release);
        if source == Source::Directory {
            self.received.send_modify(|n| *n += 1);
        }
    }

    /// Loads `routes.json` from `dir` into an empty replica. A missing or unreadable file is
    /// not an error: the sidecar then waits for the directory.
    pub fn load_from_disk(&self, dir: &Path) {
        match load(dir) {
            Ok(Some(table)) => {
                info!(
                    instances = table.len(),
                    epoch = table.epoch,
                    revision = table.revision,
                    "loaded the persisted route table"
                );
                self.set(table, Source::Disk);
            }
            Ok(None) => debug!("no persisted route table"),
            Err(e) => warn!(error = %e, "ignoring the persisted route table"),
        }
    }
}

/// Least time between two writes of `routes.json`: 5 s. The file only serves a sidecar that
/// starts while the directory is unreachable, so a table a few seconds old is as good there;
/// writing every table as it came cost a sidecar following 3,000 instances at 100 changes/s
/// several megabytes of writes and fsyncs a second (`docs/BENCHMARKS.md`).
pub const PERSIST_INTERVAL: Duration = Duration::from_secs(5);

/// Persists the tables received from the directory to `dir` until `shutdown`: the first at
/// once, then the latest at most once per [`PERSIST_INTERVAL`], and the last one at shutdown.
pub async fn persist(replica: Arc<Replica>, dir: PathBuf, shutdown: CancellationToken) {
    let mut received = replica.received.subscribe();
    let mut saved = 0u64;
    let mut last_write: Option<Instant> = None;
    let mut stop = false;
    loop {
        let current = *received.borrow_and_update();
        if current != saved {
            saved = current;
            let table = replica.table();
            let dir = dir.clone();
            match tokio::task::spawn_blocking(move || save(&dir, &table)).await {
                Ok(Ok(())) => debug!("persisted the route table"),
                Ok(Err(e)) => warn!(error = %e, "cannot persist the route table"),
                Err(e) => warn!(error = %e, "the persisting task failed"),
            }
            last_write = Some(Instant::now());
        }
        if stop {
            return;
        }
        stop = tokio::select! {
            _ = shutdown.cancelled() => true,
            changed = received.changed() => changed.is_err(),
        };
        if let (false, Some(at)) = (stop, last_write) {
            // Later tables coalesce until the interval has passed (or the sidecar stops).
            stop = tokio::select! {
                _ = shutdown.cancelled() => true,
                _ = tokio::time::sleep_until(at + PERSIST_INTERVAL) => false,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use usher_shared::routes::{Change, InstanceState};

    fn table() -> RouteTable {
        let mut t = RouteTable::new(77);
        t.apply(Change::Upsert(Instance {
            service: "web".into(),
            version: "v1".into(),
            id: "a".into(),
            address: "127.0.0.1:9".parse().unwrap(),
            capacity: 2,
            weight: 1,
            state: InstanceState::Up,
            started_at_ms: 5,
            labels: BTreeMap::new(),
        }));
        t.revision = 3;
        t
    }

    #[test]
    fn the_table_round_trips_through_disk() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        assert!(load(&state).unwrap().is_none());
        save(&state, &table()).unwrap();
        assert_eq!(load(&state).unwrap(), Some(table()));
        assert!(!state.join("routes.json.tmp").exists());

        let replica = Replica::new(Arc::default());
        assert_eq!(replica.held(), (None, 0));
        replica.load_from_disk(&state);
        assert_eq!(replica.source(), Source::Disk);
        assert_eq!(replica.held(), (Some(77), 3));
        assert_eq!(replica.table().len(), 1);
    }

    #[test]
    fn a_corrupt_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(ROUTES_FILE), b"{ not json").unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("routes.json"), "{e}");
        let replica = Replica::new(Arc::default());
        replica.load_from_disk(dir.path());
        assert_eq!(replica.source(), Source::None);
        assert!(replica.table().is_empty());
    }

    #[tokio::test]
    async fn tables_from_the_directory_are_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let replica = Arc::new(Replica::new(Arc::default()));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(persist(
            replica.clone(),
            dir.path().to_path_buf(),
            shutdown.clone(),
        ));
        replica.set(table(), Source::Directory);
        for _ in 0..100 {
            if load(dir.path()).unwrap().is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(load(dir.path()).unwrap(), Some(table()));

        // The next table waits for the interval; the last one is written at shutdown.
        let mut next = table();
        next.revision = 4;
        replica.set(next.clone(), Source::Directory);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(load(dir.path()).unwrap(), Some(table()), "coalesced");
        shutdown.cancel();
        task.await.unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(next));
    }
}
