//! Instance reservation (Waiter): one [`Reserver`] per service version, holding per instance
//! its slots (the instance's capacity) and how many are in use.
//!
//! A request reserves a slot before it is sent and releases it when its [`Reservation`] is
//! dropped (the response body ended, or the client went away), so a slot cannot leak. With no
//! free slot the request waits in a bounded queue up to the queue timeout. An instance whose
//! connection fails is ejected locally with backoff (Waiter: 10 s doubling to 300 s), cleared
//! by a success. If every routable instance is ejected, they are used anyway ("panic mode"),
//! so a blip never black-holes a service.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::Rng;
use thiserror::Error;
use tokio::sync::Notify;
use tokio::time::Instant;
use usher_shared::protocol::{fit_load_report, InstanceLoad, VersionLoad};
use usher_shared::routes::{Instance, InstanceKey, RouteTable, ServiceVersion};

/// First ejection after a connection failure (Waiter).
pub const EJECTION_BASE: Duration = Duration::from_secs(10);
/// Longest ejection (Waiter).
pub const EJECTION_MAX: Duration = Duration::from_secs(300);

/// An instance's id as the reserver keeps it: shared, so a reservation holds it without a copy.
pub type InstanceId = Arc<str>;

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

/// Consecutive connection failures and the resulting ejection deadline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ejection {
    failures: u32,
    until: Option<Instant>,
}

impl Ejection {
    /// Records a failure at `now`: ejected for 10 s, doubling per consecutive failure, at most
    /// 300 s.
    pub fn fail(&mut self, now: Instant) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let factor = 1u32 << (self.failures - 1).min(16);
        let period = (EJECTION_BASE * factor).min(EJECTION_MAX);
        self.until = Some(now + period);
        period
    }

    /// A success clears the ejection and the failure count.
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    pub fn active(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }
}

#[derive(Debug, Clone)]
struct Slot {
    address: SocketAddr,
    capacity: u32,
    in_use: u32,
    routable: bool,
    /// Still in the route table; a withdrawn slot lingers until its last reservation ends.
    present: bool,
    ejection: Ejection,
}

#[derive(Debug, Default)]
struct State {
    slots: HashMap<InstanceId, Slot, usher_shared::FastHash>,
}

impl State {
    /// Picks an instance for a request that already tried `exclude`, without allocating (this
    /// runs on every request). `Err(true)` when no routable instance outside `exclude` exists
    /// at all, `Err(false)` when all are busy.
    fn pick(&self, exclude: &[InstanceId], now: Instant) -> Result<InstanceId, bool> {
        let candidate =
            |id: &InstanceId, s: &Slot| s.present && s.routable && !exclude.contains(id);
        let (mut routable, mut healthy, mut healthy_free, mut free) =
            (0usize, 0usize, 0usize, 0usize);
        for (id, s) in &self.slots {
            if !candidate(id, s) {
                continue;
            }
            routable += 1;
            let is_free = s.in_use < s.capacity;
            free += usize::from(is_free);
            if !s.ejection.active(now) {
                healthy += 1;
                healthy_free += usize::from(is_free);
            }
        }
        if routable == 0 {
            return Err(true);
        }
        // Panic mode: when every routable instance is ejected, use them all.
        let panic = healthy == 0;
        let eligible = self.slots.iter().filter(|(id, s)| {
            candidate(id, s) && s.in_use < s.capacity && (panic || !s.ejection.active(now))
        });
        choose(eligible, if panic { free } else { healthy_free })
            .cloned()
            .ok_or(false)
    }
}

/// `a` is less loaded than `b` (in-use slots over capacity, compared without division).
fn less_loaded(a: &Slot, b: &Slot) -> bool {
    (a.in_use as u64) * (b.capacity as u64) < (b.in_use as u64) * (a.capacity as u64)
}

/// Power of two random choices over the `n` items of `eligible`: the less loaded of two
/// distinct random candidates, so with two candidates the least loaded always wins, and ties
/// go either way (sequential traffic still spreads).
fn choose<'a>(
    eligible: impl Iterator<Item = (&'a InstanceId, &'a Slot)>,
    n: usize,
) -> Option<&'a InstanceId> {
    let (a, b) = match n {
        0 => return None,
        1 => (0, 0),
        n => {
            let mut rng = rand::rng();
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            (a, b)
        }
    };
    let (mut first, mut second) = (None, None);
    for (i, candidate) in eligible.enumerate() {
        if i == a {
            first = Some(candidate);
        }
        if i == b {
            second = Some(candidate);
        }
        if first.is_some() && second.is_some() {
            break;
        }
    }
    let (first, second) = (first?, second?);
    Some(if less_loaded(second.1, first.1) {
        second.0
    } else {
        first.0
    })
}

/// The instance reserver of one service version.
#[derive(Debug)]
pub struct Reserver {
    service: String,
    version: String,
    state: Mutex<State>,
    /// Woken when a slot is released or the instances change.
    freed: Notify,
    queued: AtomicUsize,
    /// Told when a request starts waiting for a version with no routable instance (cold
    /// start), so the load report goes out at once.
    demand: Arc<Notify>,
}

impl Reserver {
    /// A reserver that signals cold-start demand on `demand`.
    pub fn new(service: &str, version: &str, demand: Arc<Notify>) -> Self {
        Self {
            service: service.into(),
            version: version.into(),
            state: Mutex::new(State::default()),
            freed: Notify::new(),
            queued: AtomicUsize::new(0),
            demand,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the known instances with `instances` (this version's entries of the route
    /// table). In-use counts survive; withdrawn instances linger until released.
    pub fn sync<'a>(&self, instances: impl IntoIterator<Item = &'a Instance>) {
        let mut state = self.lock();
        for slot in state.slots.values_mut() {
            slot.present = false;
        }
        for i in instances {
            let slot = state.slots.entry(i.id.as_str().into()).or_insert(Slot {
                address: i.address,
                capacity: i.capacity,
                in_use: 0,
                routable: false,
                present: true,
                ejection: Ejection::default(),
            });
            if slot.address != i.address {
                slot.ejection.clear();
            }
            slot.address = i.address;
            slot.capacity = i.capacity;
            slot.routable = i.state.routable();
            slot.present = true;
        }
        state.slots.retain(|_, s| s.present || s.in_use > 0);
        drop(state);
        self.freed.notify_waiters();
    }

    /// Reserves a slot on an instance not in `exclude`, waiting up to `timeout` for one.
    ///
    /// Errors: the queue already holds `max_queued` requests, nothing was free in time, or
    /// (with a non-empty `exclude`, i.e. a retry) no other routable instance exists.
    pub async fn reserve(
        self: &Arc<Self>,
        exclude: &[InstanceId],
        timeout: Duration,
        max_queued: usize,
    ) -> Result<Reservation, ReserveError> {
        // The fast path: a free slot, no waiter registered, no timer.
        let no_instance = match self.try_reserve(exclude)? {
            Ok(reservation) => return Ok(reservation),
            Err(no_instance) => no_instance,
        };
        // Counted as queued before it looks again, so a release that sees no request queued
        // cannot have missed this one (see `release`).
        let now_queued = self.queued.fetch_add(1, Ordering::SeqCst);
        let _ticket = QueueTicket(&self.queued);
        if now_queued >= max_queued {
            return Err(ReserveError::QueueFull {
                service: self.service.clone(),
                version: self.version.clone(),
                queued: now_queued,
            });
        }
        if no_instance {
            self.demand.notify_one();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            // Looked at again once registered, so a release in between is not missed.
            if let Ok(reservation) = self.try_reserve(exclude)? {
                return Ok(reservation);
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                // One last look: a slot may have been freed just at the deadline.
                if let Ok(reservation) = self.try_reserve(exclude)? {
                    return Ok(reservation);
                }
                return Err(ReserveError::Timeout {
                    service: self.service.clone(),
                    version: self.version.clone(),
                    waited: timeout,
                });
            }
        }
    }

    /// Reserves at once if a slot is free: `Ok(Ok(_))`; `Ok(Err(no_instance))` when the
    /// request must wait (`no_instance`: no routable instance at all, so not just busy).
    fn try_reserve(
        self: &Arc<Self>,
        exclude: &[InstanceId],
    ) -> Result<Result<Reservation, bool>, ReserveError> {
        let mut state = self.lock();
        match state.pick(exclude, Instant::now()) {
            Ok(id) => {
                let slot = state.slots.get_mut(&id).expect("picked from the map");
                slot.in_use += 1;
                let address = slot.address;
                Ok(Ok(Reservation {
                    reserver: self.clone(),
                    id,
                    address,
                    succeeded: false,
                }))
            }
            Err(true) if !exclude.is_empty() => Err(ReserveError::NoOtherInstance {
                service: self.service.clone(),
                version: self.version.clone(),
            }),
            Err(no_instance) => Ok(Err(no_instance)),
        }
    }

    /// Returns a slot; `succeeded` also clears the instance's ejection (one lock for both).
    fn release(&self, id: &str, succeeded: bool) {
        let mut state = self.lock();
        if let Some(slot) = state.slots.get_mut(id) {
            slot.in_use = slot.in_use.saturating_sub(1);
            if succeeded {
                slot.ejection.clear();
            }
            if !slot.present && slot.in_use == 0 {
                state.slots.remove(id);
            }
        }
        drop(state);
        // A waiter counts itself queued before it takes the lock to look, so either it saw
        // this slot free or it is counted here (the lock orders the two).
        if self.queued.load(Ordering::SeqCst) > 0 {
            self.freed.notify_waiters();
        }
    }

    fn with_slot(&self, id: &str, f: impl FnOnce(&mut Slot)) {
        if let Some(slot) = self.lock().slots.get_mut(id) {
            f(slot);
        }
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

    /// Nothing in use and nothing waiting: the reserver can be forgotten.
    pub fn idle(&self) -> bool {
        self.queued() == 0 && self.lock().slots.values().all(|s| s.in_use == 0)
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// Requests waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// In-flight and queued requests of this version, for the load report.
    /// Instances with requests in flight come busiest first.
    pub fn load(&self) -> VersionLoad {
        let mut instances: Vec<InstanceLoad> = self
            .lock()
            .slots
            .iter()
            .filter(|(_, s)| s.in_use > 0)
            .map(|(id, s)| InstanceLoad {
                id: id.to_string(),
                in_flight: s.in_use,
            })
            .collect();
        instances.sort_by_key(|i| std::cmp::Reverse(i.in_flight));
        VersionLoad {
            service: self.service.clone(),
            version: self.version.clone(),
            in_flight: instances.iter().map(|i| i.in_flight).sum(),
            queued: u32::try_from(self.queued()).unwrap_or(u32::MAX),
            instances,
        }
    }
}

/// Counts a waiting request while it lives.
struct QueueTicket<'a>(&'a AtomicUsize);

impl Drop for QueueTicket<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
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

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The instance answered: its ejection, if any, is cleared when the slot is released.
    pub fn succeeded(&mut self) {
        self.succeeded = true;
    }

    /// The connection to the instance failed: eject it; returns for how long.
    pub fn failed(&self) -> Duration {
        let mut period = Duration::ZERO;
        self.reserver
            .with_slot(&self.id, |s| period = s.ejection.fail(Instant::now()));
        period
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.reserver.release(&self.id, self.succeeded);
    }
}

/// Every service version's reserver: one per version the route table names, kept in step with
/// the table, and kept after the version leaves the table while requests still hold it.
#[derive(Debug, Default)]
pub struct Reservers {
    by_version: Mutex<HashMap<ServiceVersion, Arc<Reserver>>>,
    demand: Arc<Notify>,
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

impl Reservers {
    fn lock(&self) -> MutexGuard<'_, HashMap<ServiceVersion, Arc<Reserver>>> {
        self.by_version.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves when a request starts waiting for a version with no routable instance.
    pub async fn demand(&self) {
        self.demand.notified().await
    }

    /// The load of every version with requests in flight or queued, busiest first, cut to what
    /// one report carries ([`fit_load_report`]) (Waiter/WSO2: the autoscaler's signal).
    pub fn loads(&self) -> Vec<VersionLoad> {
        let reservers: Vec<_> = self.lock().values().cloned().collect();
        let mut loads: Vec<VersionLoad> = reservers
            .iter()
            .map(|r| r.load())
            .filter(|l| l.in_flight > 0 || l.queued > 0)
            .collect();
        loads.sort_by_key(|l| std::cmp::Reverse(u64::from(l.in_flight) + u64::from(l.queued)));
        fit_load_report(&mut loads);
        loads
    }

    /// Brings the reservers in step with `table` in one pass over its instances: a reserver
    /// for every version it names (declared or with instances), synced with that version's
    /// instances; a version gone from the table keeps its reserver only while requests use or
    /// wait on it. Returns the table's versions (for [`crate::route::RouteIndex`]).
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
        let mut synced = Vec::with_capacity(grouped.len());
        let mut kept = HashSet::with_capacity(grouped.len());
        for ((service, version), instances) in grouped {
            let key = ServiceVersion {
                service: service.to_string(),
                version: version.to_string(),
            };
            let reserver = map
                .entry(key.clone())
                .or_insert_with(|| Arc::new(Reserver::new(service, version, self.demand.clone())))
                .clone();
            reserver.sync(instances.iter().copied());
            synced.push(SyncedVersion {
                service: key.service.clone(),
                version: key.version.clone(),
                reserver,
                routable: instances.iter().any(|i| i.state.routable()),
            });
            kept.insert(key);
        }
        map.retain(|key, reserver| {
            if kept.contains(key) {
                return true;
            }
            reserver.sync(std::iter::empty());
            !reserver.idle()
        });
        synced
    }

    /// In-use slots and ejection of one instance, for the admin API.
    pub fn load_of(&self, key: &InstanceKey) -> (u32, bool) {
        let reserver = self
            .lock()
            .get(&ServiceVersion {
                service: key.service.clone(),
                version: key.version.clone(),
            })
            .cloned();
        reserver.map_or((0, false), |r| (r.in_use(&key.id), r.ejected(&key.id)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    #[test]
    fn ejection_backs_off_to_the_cap() {
        let t0 = Instant::now();
        let mut e = Ejection::default();
        let periods: Vec<u64> = (0..8).map(|_| e.fail(t0).as_secs()).collect();
        assert_eq!(periods, vec![10, 20, 40, 80, 160, 300, 300, 300]);
        assert!(e.active(t0 + Duration::from_secs(299)));
        assert!(!e.active(t0 + Duration::from_secs(300)));
        e.clear();
        assert!(!e.active(t0));
        assert_eq!(e.fail(t0), EJECTION_BASE);
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

    #[test]
    fn power_of_two_choices_prefers_the_less_loaded() {
        let mut state = State::default();
        for (i, in_use) in [9u32, 9, 9, 0].iter().enumerate() {
            state.slots.insert(
                format!("i{i}").into(),
                Slot {
                    address: SocketAddr::from(([127, 0, 0, 1], 1)),
                    capacity: 10,
                    in_use: *in_use,
                    routable: true,
                    present: true,
                    ejection: Ejection::default(),
                },
            );
        }
        let now = Instant::now();
        let idle = (0..400)
            .filter(|_| &*state.pick(&[], now).unwrap() == "i3")
            .count();
        // i3 wins whenever it is one of the two choices: half the draws.
        assert!(idle > 120, "idle instance chosen {idle} times of 400");
    }
}
