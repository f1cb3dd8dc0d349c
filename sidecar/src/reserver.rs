//! Instance reservation (Waiter): one [`Reserver`] per service version, holding per instance
//! its slots (the instance's capacity) and how many are in use.
//!
//! A request reserves a slot before it is sent and releases it when its [`Reservation`] is
//! dropped (the response body ended, or the client went away), so a slot cannot leak. With no
//! free slot the request waits in a bounded queue up to the queue timeout, served oldest
//! first: a freed slot is handed to the oldest waiting request that may take it, so a release
//! wakes one request however many wait (until 2026-12-02 it woke them all: O(queue) per
//! release, `docs/BENCHMARKS.md`). An instance whose connection fails is ejected locally with
//! backoff (Waiter: 10 s doubling to 300 s), cleared by a success. If every routable instance
//! is ejected, they are used anyway ("panic mode"), so a blip never black-holes a service.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use usher_shared::protocol::{fit_load_report, InstanceLoad, VersionLoad};
use usher_shared::routes::{Change, Instance, InstanceKey, RouteTable, ServiceVersion};

use crate::metrics::{VersionCounters, VersionGauges};
use crate::slots::{InstanceId, Slots};

/// Why no instance was reserved.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReserveError {
    #[error("no instance of {service}/{version} available within {waited:?}")]
    Timeout {
        service: String,
        version: String,
        waited: Duration,
    },
    #[error("queue full: {queued} requests already wait for {service}/{version}")]
    QueueFull {
        service: String,
        version: String,
        queued: usize,
    },
    #[error("no other instance of {service}/{version} to retry on")]
    NoOtherInstance { service: String, version: String },
}

/// The instance reserver of one service version.
#[derive(Debug)]
pub struct Reserver {
    service: String,
    version: String,
    inner: Mutex<Inner>,
    /// Told when a request starts waiting for a version with no routable instance (cold
    /// start), so the load report goes out at once.
    demand: Arc<Notify>,
    /// How this version's requests ended (`GET /metrics`).
    counters: VersionCounters,
}

/// What a reserver holds under its lock: its instances' slots and the requests waiting, oldest
/// first.
#[derive(Debug, Default)]
struct Inner {
    slots: Slots,
    waiting: VecDeque<Waiter>,
    /// When the pending wake-up for an ejection's end fires ([`Reserver::hand_off_at`]).
    wake_at: Option<Instant>,
}

/// A request waiting for a slot: the instances it must not be sent to (a retry's tried ones)
/// and where its slot is handed.
#[derive(Debug)]
struct Waiter {
    exclude: Vec<InstanceId>,
    handoff: oneshot::Sender<Handoff>,
}

/// What a waiting request is handed.
#[derive(Debug)]
enum Handoff {
    /// A slot, already counted in use.
    Slot(InstanceId, SocketAddr),
    /// A retry: no routable instance outside the ones it tried remains.
    NoOtherInstance,
}

impl Inner {
    /// Hands free slots to the waiting requests, oldest first, each to the first one that may
    /// take it, and tells a waiting retry when no other instance remains. Runs under the lock
    /// whenever a slot is freed or the instances change, so a free slot never sits idle while
    /// a request that may take it waits, and no request is woken for nothing: a release wakes
    /// one request, not every waiting one.
    ///
    /// An ejection ending frees slots without any release or change, so the reserver also
    /// runs it then ([`Reserver::hand_off_at`]), and when an ejection leaves every instance
    /// ejected (panic mode makes them all eligible again).
    fn hand_off(&mut self, now: Instant) {
        let mut at = 0;
        while let Some(waiter) = self.waiting.get(at) {
            if waiter.handoff.is_closed() {
                // Timed out or gone.
                self.waiting.remove(at);
                continue;
            }
            let handoff = match self.slots.reserve(&waiter.exclude, now) {
                Ok((id, address)) => Handoff::Slot(id, address),
                Err(true) if !waiter.exclude.is_empty() => Handoff::NoOtherInstance,
                // Nothing is free for a request that excludes nothing: nor for any other.
                Err(_) if waiter.exclude.is_empty() => return,
                Err(_) => {
                    at += 1;
                    continue;
                }
            };
            let Some(waiter) = self.waiting.remove(at) else {
                return;
            };
            if let Err(Handoff::Slot(id, _)) = waiter.handoff.send(handoff) {
                // The request went away in the meantime: the slot is free again.
                self.slots.release(&id, false);
            }
        }
    }

    /// Requests waiting now (the ones that went away are dropped from the queue).
    fn waiting(&mut self) -> usize {
        self.waiting.retain(|w| !w.handoff.is_closed());
        self.waiting.len()
    }
}

impl Reserver {
    /// A reserver that signals cold-start demand on `demand`.
    pub fn new(service: &str, version: &str, demand: Arc<Notify>) -> Self {
        Self {
            service: service.into(),
            version: version.into(),
            inner: Mutex::default(),
            demand,
            counters: VersionCounters::default(),
        }
    }

    /// This version's request counters.
    pub fn counters(&self) -> &VersionCounters {
        &self.counters
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the instances with `change`, then hands what it freed to waiting requests.
    fn change(&self, change: impl FnOnce(&mut Slots)) {
        let mut inner = self.lock();
        change(&mut inner.slots);
        inner.hand_off(Instant::now());
    }

    /// Replaces the known instances with `instances` (this version's entries of the route
    /// table). In-use counts survive; withdrawn instances linger until released.
    pub fn sync<'a>(&self, instances: impl IntoIterator<Item = &'a Instance>) {
        self.change(|slots| slots.replace(instances));
    }

    /// Adds or updates one instance of this version (a delta), O(1).
    pub fn upsert(&self, instance: &Instance) {
        self.change(|slots| slots.upsert(instance));
    }

    /// Withdraws one instance (a delta), O(1); it lingers until its last release.
    pub fn withdraw(&self, id: &str) {
        self.change(|slots| slots.withdraw(id));
    }

    /// Whether any instance is present and `up` (the router's fallback needs it).
    pub fn routable(&self) -> bool {
        self.lock().slots.any_routable()
    }

    /// Reserves a slot on an instance not in `exclude`, waiting up to `timeout` for one.
    /// Waiting requests are served in order of arrival (a freed slot is handed to the oldest
    /// that may take it).
    ///
    /// Errors: the queue already holds `max_queued` requests, nothing was free in time, or
    /// (with a non-empty `exclude`, i.e. a retry) no other routable instance exists.
    pub async fn reserve(
        self: &Arc<Self>,
        exclude: &[InstanceId],
        timeout: Duration,
        max_queued: usize,
    ) -> Result<Reservation, ReserveError> {
        let receiver = {
            let mut inner = self.lock();
            // The fast path: a free slot (no waiting request may take it, or it would have
            // been handed over), no timer.
            let no_instance = match inner.slots.reserve(exclude, Instant::now()) {
                Ok((id, address)) => return Ok(self.reservation(id, address)),
                Err(true) if !exclude.is_empty() => return Err(self.no_other_instance()),
                Err(no_instance) => no_instance,
            };
            // Counted without the requests that went away only when it matters.
            if inner.waiting.len() >= max_queued {
                let queued = inner.waiting();
                if queued >= max_queued {
                    return Err(ReserveError::QueueFull {
                        service: self.service.clone(),
                        version: self.version.clone(),
                        queued,
                    });
                }
            }
            let (handoff, receiver) = oneshot::channel();
            inner.waiting.push_back(Waiter {
                exclude: exclude.to_vec(),
                handoff,
            });
            if no_instance {
                self.demand.notify_one();
            }
            receiver
        };
        let mut pending = Pending {
            reserver: self,
            receiver,
        };
        let handoff = match tokio::time::timeout(timeout, &mut pending.receiver).await {
            Ok(handoff) => handoff.ok(),
            // One last look: a slot may have been handed over just at the deadline.
            Err(_) => pending.take(),
        };
        match handoff {
            Some(Handoff::Slot(id, address)) => Ok(self.reservation(id, address)),
            Some(Handoff::NoOtherInstance) => Err(self.no_other_instance()),
            None => Err(ReserveError::Timeout {
                service: self.service.clone(),
                version: self.version.clone(),
                waited: timeout,
            }),
        }
    }

    fn reservation(self: &Arc<Self>, id: InstanceId, address: SocketAddr) -> Reservation {
        Reservation {
            reserver: self.clone(),
            id,
            address,
            succeeded: false,
        }
    }

    fn no_other_instance(&self) -> ReserveError {
        ReserveError::NoOtherInstance {
            service: self.service.clone(),
            version: self.version.clone(),
        }
    }

    /// Returns a slot; `succeeded` also clears the instance's ejection (one lock for both).
    /// The slot goes to the oldest waiting request that may take it.
    fn release(&self, id: &str, succeeded: bool) {
        let mut inner = self.lock();
        inner.slots.release(id, succeeded);
        inner.hand_off(Instant::now());
    }

    /// Ejects instance `id` after a failed connection (Waiter: 10 s doubling to 300 s);
    /// returns for how long. What the ejection changes is handed to waiting requests at once
    /// (the last instance ejected puts the version in panic mode) and again when it ends.
    fn eject(self: &Arc<Self>, id: &str) -> Duration {
        let now = Instant::now();
        let period = {
            let mut inner = self.lock();
            let Some(slot) = inner.slots.get_mut(id) else {
                return Duration::ZERO;
            };
            let period = slot.ejection.fail(now);
            inner.hand_off(now);
            period
        };
        self.hand_off_at(now + period);
        period
    }

    /// Hands free slots to waiting requests at `at`, when an ejection ends. One wake-up per
    /// reserver is pending at a time, for the earliest end: it then looks for the next end
    /// (O(instances), once per ejection that ends). Without a runtime (never in the sidecar)
    /// nothing is scheduled, and the next release or change hands the slots over instead.
    fn hand_off_at(self: &Arc<Self>, at: Instant) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        {
            let mut inner = self.lock();
            if inner.wake_at.is_some_and(|pending| pending <= at) {
                return;
            }
            inner.wake_at = Some(at);
        }
        let reserver = Arc::downgrade(self);
        runtime.spawn(async move {
            tokio::time::sleep_until(at).await;
            let Some(reserver) = reserver.upgrade() else {
                return;
            };
            let next = {
                let mut inner = reserver.lock();
                if inner.wake_at != Some(at) {
                    return; // an earlier wake-up took over, and looks for the next end
                }
                inner.wake_at = None;
                let now = Instant::now();
                inner.hand_off(now);
                inner.slots.next_ejection_end(now)
            };
            if let Some(next) = next {
                reserver.hand_off_at(next);
            }
        });
    }

    /// Slots in use on instance `id` (0 if unknown).
    pub fn in_use(&self, id: &str) -> u32 {
        self.lock().slots.get(id).map_or(0, |s| s.in_use)
    }

    /// Whether instance `id` is ejected now.
    pub fn ejected(&self, id: &str) -> bool {
        self.lock()
            .slots
            .get(id)
            .is_some_and(|s| s.ejection.active(Instant::now()))
    }

    /// This version's requests in flight and waiting, and its instances ejected now, in one
    /// lock (`GET /metrics`).
    pub fn gauges(&self) -> VersionGauges {
        let now = Instant::now();
        let mut inner = self.lock();
        let (mut in_flight, mut ejected) = (0, 0);
        for slot in inner.slots.iter() {
            in_flight += u64::from(slot.in_use);
            ejected += u64::from(slot.ejection.active(now));
        }
        VersionGauges {
            in_flight,
            queued: inner.waiting() as u64,
            ejected,
        }
    }

    /// Nothing in use and nothing waiting: the reserver can be forgotten.
    pub fn idle(&self) -> bool {
        let mut inner = self.lock();
        inner.waiting() == 0 && inner.slots.iter().all(|s| s.in_use == 0)
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// Requests waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.lock().waiting()
    }

    /// In-flight and queued requests of this version, for the load report.
    /// Instances with requests in flight come busiest first.
    pub fn load(&self) -> VersionLoad {
        let (mut instances, queued) = {
            let mut inner = self.lock();
            let instances: Vec<InstanceLoad> = inner
                .slots
                .iter()
                .filter(|s| s.in_use > 0)
                .map(|s| InstanceLoad {
                    id: s.id.to_string(),
                    in_flight: s.in_use,
                })
                .collect();
            (instances, inner.waiting())
        };
        instances.sort_by_key(|i| std::cmp::Reverse(i.in_flight));
        VersionLoad {
            service: self.service.clone(),
            version: self.version.clone(),
            in_flight: instances.iter().map(|i| i.in_flight).sum(),
            queued: u32::try_from(queued).unwrap_or(u32::MAX),
            instances,
        }
    }
}

/// A waiting request's end of its handoff. However the request ends (answered, timed out,
/// or dropped because its client went away), a slot handed to it is used or released, never
/// lost.
struct Pending<'a> {
    reserver: &'a Reserver,
    receiver: oneshot::Receiver<Handoff>,
}

impl Pending<'_> {
    /// Closes the handoff (no slot is handed after this) and takes what was handed before.
    fn take(&mut self) -> Option<Handoff> {
        self.receiver.close();
        self.receiver.try_recv().ok()
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(Handoff::Slot(id, _)) = self.take() {
            self.reserver.release(&id, false);
        }
    }
}

/// One reserved slot; dropping it releases the slot and wakes a waiting request.
#[derive(Debug)]
pub struct Reservation {
    reserver: Arc<Reserver>,
    id: InstanceId,
    address: SocketAddr,
    /// The instance answered; its ejection is cleared on release.
    succeeded: bool,
}

impl Reservation {
    pub fn id(&self) -> &InstanceId {
        &self.id
    }

    /// The service version's reserver the slot is from.
    pub fn reserver(&self) -> &Reserver {
        &self.reserver
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The instance answered: its ejection, if any, is cleared when the slot is released.
    pub fn succeeded(&mut self) {
        self.succeeded = true;
    }

    /// The connection to the instance failed: eject it; returns for how long.
    pub fn failed(&self) -> Duration {
        self.reserver.eject(&self.id)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.reserver.release(&self.id, self.succeeded);
    }
}

/// Every service version's reserver: one per version the route table names, kept in step with
/// the table (a full table in one pass over it, a batch of deltas in O(changes)), and kept
/// after the version leaves the table while requests still hold it.
#[derive(Debug, Default)]
pub struct Reservers {
    by_version: Mutex<HashMap<ServiceVersion, Entry>>,
    demand: Arc<Notify>,
}

#[derive(Debug)]
struct Entry {
    reserver: Arc<Reserver>,
    /// The route table names the version (declared, or with instances). A version that left
    /// it stays only while requests use or wait on its reserver.
    listed: bool,
}

/// One version of the table, as [`Reservers::sync`] leaves it: its reserver and whether it
/// has a routable instance (the router's fallback needs it).
#[derive(Debug, Clone)]
pub struct SyncedVersion {
    pub service: String,
    pub version: String,
    pub reserver: Arc<Reserver>,
    pub routable: bool,
}

type VersionMap = HashMap<ServiceVersion, Entry>;

impl Reservers {
    fn lock(&self) -> MutexGuard<'_, VersionMap> {
        self.by_version.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves when a request starts waiting for a version with no routable instance.
    pub async fn demand(&self) {
        self.demand.notified().await
    }

    /// The load of every version with requests in flight or queued, busiest first, cut to what
    /// one report carries ([`fit_load_report`]) (Waiter/WSO2: the autoscaler's signal).
    pub fn loads(&self) -> Vec<VersionLoad> {
        let mut loads: Vec<VersionLoad> = self
            .all()
            .iter()
            .map(|r| r.load())
            .filter(|l| l.in_flight > 0 || l.queued > 0)
            .collect();
        loads.sort_by_key(|l| std::cmp::Reverse(u64::from(l.in_flight) + u64::from(l.queued)));
        fit_load_report(&mut loads);
        loads
    }

    /// Every reserver: the table's versions, and versions gone from it that requests still
    /// use or wait on.
    pub fn all(&self) -> Vec<Arc<Reserver>> {
        self.lock().values().map(|e| e.reserver.clone()).collect()
    }

    /// Brings the reservers in step with a full `table` in one pass over its instances: a
    /// reserver for every version it names (declared or with instances), synced with that
    /// version's instances; a version gone from the table keeps its reserver only while
    /// requests use or wait on it. Returns the table's versions (for
    /// [`crate::route::RouteIndex`]).
    pub fn sync(&self, table: &RouteTable) -> Vec<SyncedVersion> {
        let mut grouped: BTreeMap<(&str, &str), Vec<&Instance>> = BTreeMap::new();
        for declared in table.declared() {
            grouped
                .entry((&declared.service, &declared.version))
                .or_default();
        }
        for instance in table.instances() {
            grouped
                .entry((&instance.service, &instance.version))
                .or_default()
                .push(instance);
        }
        let mut map = self.lock();
        for entry in map.values_mut() {
            entry.listed = false;
        }
        for ((service, version), instances) in grouped {
            let entry = self.entry(&mut map, service, version);
            entry.listed = true;
            entry.reserver.sync(instances);
        }
        forget_unlisted(&mut map);
        listed(&map)
    }

    /// Applies a batch of deltas to the reservers of the versions it names, O(changes):
    /// `table` is the route table with the batch already applied. Returns the table's versions
    /// when the router's index must change (a version came or went, or gained its first or
    /// lost its last routable instance), `None` when the index stands.
    pub fn apply(&self, changes: &[Change], table: &RouteTable) -> Option<Vec<SyncedVersion>> {
        let mut map = self.lock();
        // Each named version's (listed, routable) before the batch.
        let mut before: HashMap<ServiceVersion, (bool, bool)> = HashMap::new();
        for change in changes {
            let (service, version) = match change {
                Change::Upsert(i) => (&i.service, &i.version),
                Change::Remove(key) => (&key.service, &key.version),
                Change::Declare(v) | Change::Undeclare(v) => (&v.service, &v.version),
            };
            let entry = self.entry(&mut map, service, version);
            before
                .entry(ServiceVersion {
                    service: service.clone(),
                    version: version.clone(),
                })
                .or_insert_with(|| (entry.listed, entry.reserver.routable()));
            match change {
                Change::Upsert(instance) => entry.reserver.upsert(instance),
                Change::Remove(key) => entry.reserver.withdraw(&key.id),
                Change::Declare(_) | Change::Undeclare(_) => {}
            }
        }
        let mut reindex = false;
        for (key, state) in before {
            if let Some(entry) = map.get_mut(&key) {
                entry.listed = table.names_version(&key.service, &key.version);
                reindex |= (entry.listed, entry.reserver.routable()) != state;
            }
        }
        forget_unlisted(&mut map);
        reindex.then(|| listed(&map))
    }

    /// The entry of a version, created (unlisted) if it has none.
    fn entry<'m>(&self, map: &'m mut VersionMap, service: &str, version: &str) -> &'m mut Entry {
        map.entry(ServiceVersion {
            service: service.to_string(),
            version: version.to_string(),
        })
        .or_insert_with(|| Entry {
            reserver: Arc::new(Reserver::new(service, version, self.demand.clone())),
            listed: false,
        })
    }

    /// In-use slots and ejection of one instance, for the admin API.
    pub fn load_of(&self, key: &InstanceKey) -> (u32, bool) {
        let reserver = self
            .lock()
            .get(&ServiceVersion {
                service: key.service.clone(),
                version: key.version.clone(),
            })
            .map(|e| e.reserver.clone());
        reserver.map_or((0, false), |r| (r.in_use(&key.id), r.ejected(&key.id)))
    }
}

/// Withdraws every instance of the versions the table no longer names, and forgets those
/// nobody uses or waits on.
fn forget_unlisted(map: &mut VersionMap) {
    map.retain(|_, entry| {
        if entry.listed {
            return true;
        }
        entry.reserver.sync(std::iter::empty());
        !entry.reserver.idle()
    });
}

/// The versions the table names, for [`crate::route::RouteIndex`].
fn listed(map: &VersionMap) -> Vec<SyncedVersion> {
    map.iter()
        .filter(|(_, entry)| entry.listed)
        .map(|(key, entry)| SyncedVersion {
            service: key.service.clone(),
            version: key.version.clone(),
            reserver: entry.reserver.clone(),
            routable: entry.reserver.routable(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slots::EJECTION_BASE;
    use std::collections::BTreeMap;
    use usher_shared::routes::InstanceState;

    fn instance(id: &str, port: u16, capacity: u32, state: InstanceState) -> Instance {
        Instance {
            service: "web".into(),
            version: "v1".into(),
            id: id.into(),
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            capacity,
            weight: 1,
            state,
            started_at_ms: 0,
            labels: BTreeMap::new(),
        }
    }

    fn reserver(instances: &[Instance]) -> Arc<Reserver> {
        let r = Arc::new(Reserver::new("web", "v1", Arc::default()));
        r.sync(instances);
        r
    }

    const SHORT: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn least_loaded_first_and_no_slot_leaks() {
        let r = reserver(&[
            instance("a", 1, 2, InstanceState::Up),
            instance("b", 2, 2, InstanceState::Up),
        ]);
        let first = r.reserve(&[], SHORT, 10).await.unwrap();
        let second = r.reserve(&[], SHORT, 10).await.unwrap();
        assert_ne!(first.id(), second.id(), "the idle instance wins");
        let third = r.reserve(&[], SHORT, 10).await.unwrap();
        let fourth = r.reserve(&[], SHORT, 10).await.unwrap();
        assert!(matches!(
            r.reserve(&[], SHORT, 10).await,
            Err(ReserveError::Timeout { .. })
        ));
        drop((first, second, third, fourth));
        assert_eq!(r.in_use("a") + r.in_use("b"), 0);
        assert_eq!(r.queued(), 0);
    }

    #[tokio::test]
    async fn only_up_instances_are_reserved() {
        let r = reserver(&[
            instance("a", 1, 5, InstanceState::Starting),
            instance("b", 2, 5, InstanceState::Draining),
            instance("c", 3, 5, InstanceState::Up),
        ]);
        for _ in 0..5 {
            assert_eq!(r.reserve(&[], SHORT, 10).await.unwrap().id().as_ref(), "c");
        }
    }

    #[tokio::test]
    async fn a_waiter_gets_the_released_slot() {
        let r = reserver(&[instance("a", 1, 1, InstanceState::Up)]);
        let held = r.reserve(&[], SHORT, 10).await.unwrap();
        let waiter = {
            let r = r.clone();
            tokio::spawn(async move {
                r.reserve(&[], Duration::from_secs(5), 10)
                    .await
                    .map(|g| g.id().to_string())
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(r.queued(), 1);
        drop(held);
        assert_eq!(waiter.await.unwrap().unwrap(), "a");
        assert_eq!(r.in_use("a"), 0);
        assert_eq!(r.queued(), 0);
    }

    /// Polls `future` once: it must be waiting.
    async fn waiting<F: std::future::Future + Unpin>(future: &mut F) {
        tokio::select! {
            biased;
            _ = future => panic!("expected it to wait"),
            _ = std::future::ready(()) => {}
        }
    }

    #[tokio::test]
    async fn waiting_requests_get_freed_slots_oldest_first_one_each() {
        let r = reserver(&[instance("a", 1, 1, InstanceState::Up)]);
        let held = r.reserve(&[], SHORT, 10).await.unwrap();
        let mut waiters: Vec<_> = (0..100)
            .map(|_| Box::pin(r.reserve(&[], Duration::from_secs(5), 100)))
            .collect();
        for waiter in &mut waiters {
            waiting(waiter).await;
        }
        assert_eq!(r.queued(), 100);
        drop(held);
        // The slot went to the oldest request, and only to it: the others still wait.
        assert_eq!(r.in_use("a"), 1);
        assert_eq!(r.queued(), 99);
        let mut waiters = waiters.into_iter();
        let first = waiters.next().unwrap().await.unwrap();
        let mut second = waiters.next().unwrap();
        waiting(&mut second).await;
        drop(first);
        let second = second.await.unwrap();
        assert_eq!(r.queued(), 98);
        // A new request does not overtake the waiting ones.
        let mut late = Box::pin(r.reserve(&[], Duration::from_secs(5), 100));
        waiting(&mut late).await;
        drop(second);
        let mut third = waiters.next().unwrap();
        tokio::time::timeout(SHORT, &mut third)
            .await
            .unwrap()
            .unwrap();
        waiting(&mut late).await;
    }

    #[tokio::test]
    async fn a_waiting_request_that_goes_away_takes_no_slot_with_it() {
        let r = reserver(&[instance("a", 1, 1, InstanceState::Up)]);
        let held = r.reserve(&[], SHORT, 10).await.unwrap();
        // Gone before a slot is freed.
        let mut gone = Box::pin(r.reserve(&[], Duration::from_secs(5), 10));
        waiting(&mut gone).await;
        drop(gone);
        // Handed the freed slot, then gone before it looks.
        let mut handed = Box::pin(r.reserve(&[], Duration::from_secs(5), 10));
        waiting(&mut handed).await;
        drop(held);
        assert_eq!(r.in_use("a"), 1, "handed to the second request");
        drop(handed);
        assert_eq!(r.in_use("a"), 0, "released when it went away");
        assert_eq!(r.queued(), 0);
        assert!(r.idle());
        r.reserve(&[], SHORT, 10).await.unwrap();
    }

    #[tokio::test]
    async fn a_waiting_retry_learns_at_once_when_no_other_instance_remains() {
        let r = reserver(&[
            instance("a", 1, 1, InstanceState::Up),
            instance("b", 2, 1, InstanceState::Up),
        ]);
        let tried: [InstanceId; 1] = ["a".into()];
        let _b = r.reserve(&tried, SHORT, 10).await.unwrap();
        let mut retry = Box::pin(r.reserve(&tried, Duration::from_secs(5), 10));
        waiting(&mut retry).await;
        r.withdraw("b");
        let started = Instant::now();
        assert!(matches!(
            retry.await,
            Err(ReserveError::NoOtherInstance { .. })
        ));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_new_instance_wakes_waiters() {
        let r = reserver(&[]);
        let waiter = {
            let r = r.clone();
            tokio::spawn(async move { r.reserve(&[], Duration::from_secs(5), 10).await.is_ok() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        r.sync(&[instance("a", 1, 1, InstanceState::Up)]);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test]
    async fn the_queue_is_bounded() {
        let r = reserver(&[instance("a", 1, 1, InstanceState::Up)]);
        let _held = r.reserve(&[], SHORT, 1).await.unwrap();
        let waiter = {
            let r = r.clone();
            tokio::spawn(async move { r.reserve(&[], Duration::from_millis(300), 1).await.is_ok() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(matches!(
            r.reserve(&[], SHORT, 1).await,
            Err(ReserveError::QueueFull { .. })
        ));
        assert!(!waiter.await.unwrap());
        assert_eq!(r.queued(), 0);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let r = reserver(&[instance("a", 1, 1, InstanceState::Up)]);
        let _held = r.reserve(&[], SHORT, 1).await.unwrap();
        let _waiter = {
            let r = r.clone();
            tokio::spawn(async move { r.reserve(&[], Duration::from_secs(5), 1).await.is_ok() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = Instant::now();
        assert!(matches!(
            r.reserve(&[], Duration::from_secs(5), 1).await,
            Err(ReserveError::QueueFull { .. })
        ));
        assert!(started.elapsed() < Duration::from_secs(1), "no waiting");
    }

    #[tokio::test]
    async fn capacity_changes_apply_to_held_slots() {
        let r = reserver(&[instance("a", 1, 1, InstanceState::Up)]);
        let first = r.reserve(&[], SHORT, 10).await.unwrap();
        let waiter = {
            let r = r.clone();
            tokio::spawn(async move { r.reserve(&[], Duration::from_secs(5), 10).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        // More slots: the waiter gets one at once, without a release.
        r.sync(&[instance("a", 1, 2, InstanceState::Up)]);
        let second = waiter.await.unwrap().unwrap();
        assert_eq!(r.in_use("a"), 2);
        // Fewer slots than in use: nothing new until both end, and no underflow after.
        r.sync(&[instance("a", 1, 1, InstanceState::Up)]);
        drop(first);
        assert!(
            r.reserve(&[], SHORT, 10).await.is_err(),
            "still at capacity"
        );
        drop(second);
        assert_eq!(r.in_use("a"), 0);
        let again = r.reserve(&[], SHORT, 10).await.unwrap();
        assert_eq!(again.id().as_ref(), "a");
    }

    #[tokio::test]
    async fn withdrawn_instances_release_without_underflow() {
        let r = reserver(&[instance("a", 1, 1, InstanceState::Up)]);
        let held = r.reserve(&[], SHORT, 10).await.unwrap();
        r.sync(&[]);
        assert_eq!(r.in_use("a"), 1, "lingers while reserved");
        assert!(
            r.reserve(&[], SHORT, 10).await.is_err(),
            "but takes no new requests"
        );
        drop(held);
        assert_eq!(r.in_use("a"), 0);
        assert!(r.lock().slots.is_empty());
    }

    #[tokio::test]
    async fn ejected_instances_are_avoided_then_used_in_panic_mode() {
        let r = reserver(&[
            instance("a", 1, 5, InstanceState::Up),
            instance("b", 2, 5, InstanceState::Up),
        ]);
        let g = r.reserve(&["b".into()], SHORT, 10).await.unwrap();
        assert_eq!(g.id().as_ref(), "a");
        assert_eq!(g.failed(), EJECTION_BASE);
        drop(g);
        assert!(r.ejected("a"));
        for _ in 0..5 {
            assert_eq!(r.reserve(&[], SHORT, 10).await.unwrap().id().as_ref(), "b");
        }
        // b fails too: both are ejected, so both are used rather than nothing.
        let g = r.reserve(&[], SHORT, 10).await.unwrap();
        g.failed();
        drop(g);
        assert!(r.reserve(&[], SHORT, 10).await.is_ok(), "panic mode");
        // A success clears the ejection.
        let mut g = r.reserve(&["b".into()], SHORT, 10).await.unwrap();
        g.succeeded();
        assert!(r.ejected("a"), "cleared when the slot is released");
        drop(g);
        assert!(!r.ejected("a"));
    }

    /// Instances `a` and `b` of one slot each, `a` free but ejected (its first failure).
    async fn a_ejected_b_free() -> Arc<Reserver> {
        let r = reserver(&[
            instance("a", 1, 1, InstanceState::Up),
            instance("b", 2, 1, InstanceState::Up),
        ]);
        let a = r.reserve(&["b".into()], SHORT, 10).await.unwrap();
        assert_eq!(a.failed(), EJECTION_BASE);
        drop(a);
        r
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_request_gets_an_ejected_instance_when_its_ejection_ends() {
        let r = a_ejected_b_free().await;
        let b = r.reserve(&[], SHORT, 10).await.unwrap();
        assert_eq!(b.id().as_ref(), "b");
        // b stays busy: no release or change comes, only the end of a's ejection.
        let started = Instant::now();
        let waited = r.reserve(&[], EJECTION_BASE * 3, 10).await;
        assert_eq!(waited.unwrap().id().as_ref(), "a");
        assert_eq!(started.elapsed(), EJECTION_BASE);
        drop(b);
    }

    #[tokio::test]
    async fn ejecting_the_last_instance_hands_its_slots_to_waiting_requests() {
        let r = a_ejected_b_free().await;
        let b = r.reserve(&[], SHORT, 10).await.unwrap();
        let mut queued = Box::pin(r.reserve(&[], Duration::from_secs(5), 10));
        waiting(&mut queued).await;
        // b fails too: every instance is ejected, so a's free slot is usable (panic mode).
        b.failed();
        let got = tokio::time::timeout(SHORT, queued).await;
        assert_eq!(got.expect("handed at once").unwrap().id().as_ref(), "a");
        drop(b);
    }

    #[tokio::test]
    async fn a_retry_with_no_other_instance_fails_at_once() {
        let r = reserver(&[instance("a", 1, 5, InstanceState::Up)]);
        let started = Instant::now();
        assert!(matches!(
            r.reserve(&["a".into()], Duration::from_secs(5), 10).await,
            Err(ReserveError::NoOtherInstance { .. })
        ));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn waiting_for_a_version_without_instances_signals_demand_and_load() {
        let reservers = Arc::new(Reservers::default());
        let web = ServiceVersion {
            service: "web".into(),
            version: "v1".into(),
        };
        let synced = reservers.sync(&RouteTable::new(1).with_declared(vec![web]));
        assert_eq!(synced.len(), 1, "a declared version gets a reserver");
        assert!(!synced[0].routable);
        let r = synced[0].reserver.clone();
        let waiter =
            tokio::spawn(
                async move { r.reserve(&[], Duration::from_millis(500), 10).await.is_ok() },
            );
        tokio::time::timeout(Duration::from_secs(1), reservers.demand())
            .await
            .expect("cold-start demand is signalled");
        let expected = VersionLoad {
            service: "web".into(),
            version: "v1".into(),
            in_flight: 0,
            queued: 1,
            instances: vec![],
        };
        assert_eq!(reservers.loads(), vec![expected]);
        assert!(!waiter.await.unwrap(), "times out with no instance");
        assert!(
            reservers.loads().is_empty(),
            "idle versions are not reported"
        );
        assert!(reservers.sync(&RouteTable::new(1)).is_empty());
        assert!(
            reservers.lock().is_empty(),
            "an idle version gone from the table is dropped"
        );
    }

    #[tokio::test]
    async fn the_load_names_busy_instances_busiest_first() {
        let r = reserver(&[
            instance("a", 1, 5, InstanceState::Up),
            instance("b", 2, 5, InstanceState::Up),
            instance("c", 3, 5, InstanceState::Up),
        ]);
        let a1 = r
            .reserve(&["b".into(), "c".into()], SHORT, 10)
            .await
            .unwrap();
        let a2 = r
            .reserve(&["b".into(), "c".into()], SHORT, 10)
            .await
            .unwrap();
        let b1 = r
            .reserve(&["a".into(), "c".into()], SHORT, 10)
            .await
            .unwrap();
        let load = r.load();
        assert_eq!(load.in_flight, 3);
        let busy: Vec<_> = load
            .instances
            .iter()
            .map(|i| (i.id.as_str(), i.in_flight))
            .collect();
        assert_eq!(busy, vec![("a", 2), ("b", 1)], "idle c is left out");
        drop((a1, a2, b1));
        assert!(r.load().instances.is_empty());
    }

    #[tokio::test]
    async fn sequential_requests_spread_over_idle_instances() {
        let r = reserver(&[
            instance("a", 1, 2, InstanceState::Up),
            instance("b", 2, 2, InstanceState::Up),
        ]);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            seen.insert(r.reserve(&[], SHORT, 10).await.unwrap().id().to_string());
        }
        assert_eq!(seen.len(), 2);
    }

    /// What a sidecar's reservers route with: per listed version whether it is routable, and
    /// its slots (id, port, capacity, routable).
    type Summary = BTreeMap<(String, String), (bool, Vec<(String, u16, u32, bool)>)>;

    fn summary(reservers: &Reservers) -> Summary {
        listed(&reservers.lock())
            .into_iter()
            .map(|v| {
                let inner = v.reserver.lock();
                let slots = &inner.slots;
                let mut instances: Vec<_> = slots
                    .iter()
                    .map(|s| {
                        let routable = slots.candidate_ids().any(|c| c == &*s.id);
                        (s.id.to_string(), s.address.port(), s.capacity, routable)
                    })
                    .collect();
                instances.sort();
                ((v.service, v.version), (v.routable, instances))
            })
            .collect()
    }

    #[test]
    fn deltas_leave_the_reservers_as_the_full_table_would() {
        // One sidecar follows deltas, the other syncs every full table; random batches over
        // two services, two versions and four ids per version (a fixed seed: reproducible).
        let (incremental, full) = (Reservers::default(), Reservers::default());
        let mut table = RouteTable::new(1);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let states = [
            InstanceState::Starting,
            InstanceState::Up,
            InstanceState::Draining,
            InstanceState::Unknown,
        ];
        let mut indexed = summary(&incremental);
        for _ in 0..500 {
            let changes: Vec<Change> = (0..1 + next(4))
                .map(|_| {
                    let service = ["web", "api"][next(2) as usize].to_string();
                    let version = ["v1", "v2"][next(2) as usize].to_string();
                    let id = format!("i{}", next(4));
                    match next(8) {
                        0 => Change::Declare(ServiceVersion { service, version }),
                        1 => Change::Undeclare(ServiceVersion { service, version }),
                        2..=4 => Change::Remove(InstanceKey {
                            service,
                            version,
                            id,
                        }),
                        _ => Change::Upsert(Instance {
                            service,
                            version,
                            ..instance(
                                &id,
                                1 + next(3) as u16,
                                1 + next(3) as u32,
                                states[next(4) as usize],
                            )
                        }),
                    }
                })
                .collect();
            let revision = table.revision;
            table
                .apply_deltas(1, revision, revision + 1, &changes)
                .unwrap();
            let reindexed = incremental.apply(&changes, &table);
            full.sync(&table);
            let now = summary(&incremental);
            assert_eq!(now, summary(&full), "after {changes:?}");
            // The index is rebuilt exactly when what it holds changed.
            let routes = |s: &Summary| -> Vec<_> {
                s.iter()
                    .map(|(k, (routable, _))| (k.clone(), *routable))
                    .collect()
            };
            assert_eq!(
                reindexed.is_some(),
                routes(&now) != routes(&indexed),
                "after {changes:?}"
            );
            if reindexed.is_some() {
                indexed = now;
            }
        }
        assert!(!incremental.lock().is_empty());
    }
}
