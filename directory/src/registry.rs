//! The directory's state: the route table with its change log, registration TTLs, which
//! session owns each instance, and the batch of changes not yet published to sidecars.
//!
//! All mutation goes through [`Registry`], behind one `std::sync::Mutex` that is never held
//! across an `.await`. Time is a parameter of every method that needs it, so the TTL, batching
//! and grace-period logic is tested without sleeping. Publication to sidecars is a
//! `watch` of the published revision: each subscriber wakes on it and asks
//! [`Registry::next_frames`] for what it misses, so a slow subscriber skips intermediate wakeups
//! instead of queueing them. Each batch is encoded once, at publication, into the [`Feed`]
//! whose frames every subscriber shares.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use serde::Serialize;
use thiserror::Error;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::info;
use usher_shared::codec::{Encoding, FrameError};
use usher_shared::names::{validate_instance_id, validate_label};
use usher_shared::routes::{
    CatchUp, Change, Instance, InstanceKey, InstanceState, RouteLog, RouteTable, ServiceVersion,
};
use usher_shared::FastHash;

use crate::autoscaler::AutoscaleStatus;
use crate::batch::Batcher;
use crate::feed::{
    encode_batch, encode_deltas, encode_grace_upserts, encode_snapshot, ByEncoding, Feed, Frames,
    Position,
};
use crate::load::LoadBoard;
use crate::presence::Presence;
use crate::preservation::{PreservationSettings, SelfPreservation, Verdict};

/// Changes the log remembers, so a sidecar that reconnects within this many changes gets only
/// deltas (Baker: catch up, then updates).
pub const HISTORY_LIMIT: usize = 10_000;

// A cached snapshot is sent only while the log still holds every change since.
const _: () = assert!(crate::feed::MAX_SNAPSHOT_LAG < HISTORY_LIMIT as u64);

/// Most slots one instance may announce.
pub const MAX_CAPACITY: u32 = 1_000_000;

/// Identifies one agent stream; the newest registration of an instance owns it.
pub type SessionId = u64;

/// Why an agent's request is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RegistryError {
    #[error("invalid registration: {0}")]
    Invalid(String),
    #[error("instance {service}/{version}/{id} is not registered (its TTL lapsed or it was withdrawn); register again")]
    NotRegistered {
        service: String,
        version: String,
        id: String,
    },
    #[error("instance {service}/{version}/{id} was registered again by another session")]
    Superseded {
        service: String,
        version: String,
        id: String,
    },
}

/// The (epoch, revision) a sidecar holds; no epoch when it holds no table.
pub type Held = (Option<u64>, u64);

/// Fixed settings of one directory run.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Random per start; a revision only means something within one epoch.
    pub epoch: u64,
    pub heartbeat_interval: Duration,
    pub ttl: Duration,
    /// When a registered agent's silent stream is dropped (`Config::silent_stream_timeout`).
    pub silent_stream_timeout: Duration,
    pub grace_period: Duration,
    /// When this run started (the grace period counts from here).
    pub started: Instant,
    /// When withdrawals by TTL are held ([`crate::preservation`]).
    pub preservation: PreservationSettings,
}

/// The session that registered an instance and the state its agent last reported (the state
/// in the route table, kept here so a heartbeat that changes nothing needs one lookup).
#[derive(Debug, Clone, Copy)]
struct Owner {
    session: SessionId,
    state: InstanceState,
}

#[derive(Debug)]
struct Inner {
    log: RouteLog,
    presence: Presence,
    /// Who registered each instance, and the state it last reported.
    owners: HashMap<InstanceKey, Owner, FastHash>,
    batch: Batcher,
    /// The revision of the last published batch.
    published: u64,
    /// The published batches, encoded.
    feed: Feed,
    /// Sidecar subscriptions open now, by the encoding of their feed.
    subscribers: ByEncoding<u64>,
    /// Instances withdrawn because their TTL lapsed, since the directory started.
    expired: u64,
    /// Lapsed instances whose withdrawal is held while too many are silent at once.
    preservation: SelfPreservation,
}

/// The directory's shared state.
#[derive(Debug)]
pub struct Registry {
    settings: Settings,
    inner: Mutex<Inner>,
    /// The revision most recently published to subscribers.
    published: watch::Sender<u64>,
    /// Wakes the publisher when a change is recorded.
    changed: Notify,
    /// What sidecars report of their load.
    load: LoadBoard,
    /// What the autoscaler decided per managed version.
    autoscale: AutoscaleStatus,
}

/// One instance as `GET /v1/routes` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceReport {
    pub service: String,
    pub version: String,
    pub id: String,
    pub address: std::net::SocketAddr,
    pub capacity: u32,
    pub weight: u32,
    pub state: &'static str,
    /// Milliseconds since the instance registered (its `started_at_ms`).
    pub age_ms: u64,
    /// Milliseconds since its last heartbeat (also while its withdrawal is held).
    pub last_heartbeat_ms_ago: Option<u64>,
    /// Its TTL lapsed and self-preservation holds its withdrawal ([`crate::preservation`]):
    /// it stays in the table until its agent is heard from again or the hold ends.
    pub withdrawal_held: bool,
    pub labels: std::collections::BTreeMap<String, String>,
}

/// What `GET /metrics` reads of the registry besides the table and the load reports.
#[derive(Debug, Clone)]
pub struct RegistryCounts {
    pub epoch: u64,
    /// The route table's revision: changes recorded in this epoch.
    pub revision: u64,
    /// The revision of the last batch published to sidecars.
    pub published: u64,
    /// Sidecar subscriptions open now, by feed encoding.
    pub subscribers: ByEncoding<u64>,
    /// Instances withdrawn because their TTL lapsed, since the directory started.
    pub expired: u64,
    /// Instances whose TTL lapsed and whose withdrawal is held now (self-preservation).
    pub held: u64,
    /// Times self-preservation began holding withdrawals, since the directory started.
    pub preservation_holds: u64,
}

/// One service version's instances in the table ([`Registry::version_counts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionCount {
    pub service: String,
    pub version: String,
    pub instances: u32,
    /// Instances whose state is routable (`up`).
    pub routable: u32,
}

/// The body of `GET /v1/routes`.
#[derive(Debug, Clone, Serialize)]
pub struct RoutesReport {
    pub epoch: u64,
    pub revision: u64,
    pub in_grace_period: bool,
    pub heartbeat_interval_ms: u64,
    pub ttl_ms: u64,
    /// Sidecar subscriptions open now, by feed encoding: `named` ones come from sidecars of a
    /// build before the compact feed (or of another feed layout), which still read every change.
    pub subscribers: ByEncoding<u64>,
    pub instances: Vec<InstanceReport>,
}

impl Registry {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            inner: Mutex::new(Inner {
                log: RouteLog::new(settings.epoch, HISTORY_LIMIT),
                presence: Presence::default(),
                owners: HashMap::default(),
                batch: Batcher::default(),
                published: 0,
                feed: Feed::default(),
                subscribers: ByEncoding::default(),
                expired: 0,
                preservation: SelfPreservation::new(settings.preservation),
            }),
            published: watch::channel(0).0,
            changed: Notify::new(),
            load: LoadBoard::default(),
            autoscale: AutoscaleStatus::default(),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The sidecars' load reports.
    pub fn load(&self) -> &LoadBoard {
        &self.load
    }

    /// The autoscaler's decisions.
    pub fn autoscale(&self) -> &AutoscaleStatus {
        &self.autoscale
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every update is one call),
        // so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `change`; if it changed the table, records it for the next batch and wakes the
    /// publisher (which publishes a full batch at once, else after the batch delay).
    fn update(&self, inner: &mut Inner, change: Change, now: Instant) {
        let urgent = first_up_of_declared(inner.log.table(), &change);
        if inner.log.update(change).is_some() {
            if urgent {
                inner.batch.record_urgent(now);
            } else {
                inner.batch.record(now);
            }
            self.changed.notify_one();
        }
    }

    /// Adds (or replaces) `instance`, owned by `session`, heard from at `now`.
    ///
    /// Errors when the instance is invalid: service or version not a DNS label, a bad id,
    /// zero or huge capacity, port 0 or an unspecified address.
    pub fn register(
        &self,
        session: SessionId,
        instance: Instance,
        now: Instant,
    ) -> Result<(), RegistryError> {
        validate_instance(&instance)?;
        let key = instance.key();
        let mut inner = self.lock();
        inner.presence.touch(&key, now, self.settings.ttl);
        let owner = Owner {
            session,
            state: instance.state,
        };
        if inner.owners.insert(key.clone(), owner).map(|o| o.session) != Some(session) {
            info!(service = %key.service, version = %key.version, id = %key.id,
                  address = %instance.address, state = instance.state.as_str(), "instance registered");
        }
        self.update(&mut inner, Change::Upsert(instance), now);
        Ok(())
    }

    /// Records a heartbeat from `session` for `key` with the instance's current `state`.
    ///
    /// Errors when the instance is no longer registered (TTL lapsed) or another session
    /// registered it since: the agent must register again.
    pub fn heartbeat(
        &self,
        session: SessionId,
        key: &InstanceKey,
        state: InstanceState,
        now: Instant,
    ) -> Result<(), RegistryError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let owner = Self::check_owner(&mut inner.owners, session, key)?;
        inner.presence.touch(key, now, self.settings.ttl);
        // Most heartbeats change nothing: the instance is copied only when its state changed.
        if owner.state == state {
            return Ok(());
        }
        owner.state = state;
        if let Some(mut instance) = inner.log.table().get(key).cloned() {
            info!(service = %key.service, version = %key.version, id = %key.id,
                  from = instance.state.as_str(), to = state.as_str(), "instance state changed");
            instance.state = state;
            self.update(inner, Change::Upsert(instance), now);
        }
        Ok(())
    }

    /// Withdraws `key` at its agent's request. A deregistration from a superseded session
    /// changes nothing.
    pub fn deregister(
        &self,
        session: SessionId,
        key: &InstanceKey,
        now: Instant,
    ) -> Result<(), RegistryError> {
        let mut inner = self.lock();
        Self::check_owner(&mut inner.owners, session, key)?;
        info!(service = %key.service, version = %key.version, id = %key.id, "instance deregistered");
        self.withdraw(&mut inner, key, now);
        Ok(())
    }

    /// Declares the service versions the directory manages: sidecars route requests for them
    /// (and queue them for a cold start) even while they have no instance.
    pub fn declare(&self, versions: impl IntoIterator<Item = ServiceVersion>, now: Instant) {
        let mut inner = self.lock();
        for version in versions {
            self.update(&mut inner, Change::Declare(version), now);
        }
    }

    /// Forgets declared service versions (no longer managed); their instances, if any, stay
    /// until they deregister.
    pub fn undeclare(&self, versions: impl IntoIterator<Item = ServiceVersion>, now: Instant) {
        let mut inner = self.lock();
        for version in versions {
            self.update(&mut inner, Change::Undeclare(version), now);
        }
    }

    /// Withdraws every instance whose TTL lapsed by `now`, unless self-preservation holds
    /// them ([`crate::preservation`]: too many silent at once; those still silent when a hold
    /// ends get the grace period a directory start gives); returns the withdrawn keys.
    pub fn expire(&self, now: Instant) -> Vec<InstanceKey> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        if inner.presence.expire(now).is_empty() && !inner.preservation.holding() {
            return Vec::new();
        }
        // The lapsed instances are those that lapsed now and those held: a held instance
        // heard from again, or withdrawn meanwhile, is no longer lapsed.
        let (presence, registered) = (&inner.presence, inner.owners.len());
        let verdict = inner
            .preservation
            .decide(now, presence.lapsed(), registered, |before| {
                presence.silent_since(before)
            });
        match verdict {
            Verdict::Hold => Vec::new(),
            Verdict::Renew => {
                inner.presence.renew_lapsed(now, self.settings.grace_period);
                Vec::new()
            }
            Verdict::Withdraw => {
                let mut expired = inner.presence.take_lapsed();
                expired.sort_unstable();
                inner.expired += expired.len() as u64;
                for key in &expired {
                    info!(service = %key.service, version = %key.version, id = %key.id,
                          ttl = ?self.settings.ttl, "instance TTL lapsed; withdrawn");
                    self.withdraw(inner, key, now);
                }
                expired
            }
        }
    }

    fn withdraw(&self, inner: &mut Inner, key: &InstanceKey, now: Instant) {
        inner.presence.remove(key);
        inner.owners.remove(key);
        self.update(inner, Change::Remove(key.clone()), now);
    }

    /// `key`'s owner, if `session` is it.
    fn check_owner<'a>(
        owners: &'a mut HashMap<InstanceKey, Owner, FastHash>,
        session: SessionId,
        key: &InstanceKey,
    ) -> Result<&'a mut Owner, RegistryError> {
        match owners.get_mut(key) {
            Some(owner) if owner.session == session => Ok(owner),
            Some(_) => Err(RegistryError::Superseded {
                service: key.service.clone(),
                version: key.version.clone(),
                id: key.id.clone(),
            }),
            None => Err(RegistryError::NotRegistered {
                service: key.service.clone(),
                version: key.version.clone(),
                id: key.id.clone(),
            }),
        }
    }

    /// Publishes the pending batch if it is due at `now`: the changes since the last batch are
    /// encoded once into the feed (outside the lock, so heartbeats do not wait for it) and
    /// subscribers are woken. Returns when the next batch is due (`None` when nothing is
    /// pending).
    pub fn publish_due(&self, now: Instant) -> Option<Instant> {
        let (epoch, from, to, changes) = {
            let mut inner = self.lock();
            if !inner.batch.take_if_due(now) {
                return inner.batch.due_at();
            }
            let table = inner.log.table();
            let (epoch, to, from) = (table.epoch, table.revision, inner.published);
            (epoch, from, to, inner.log.catch_up(Some(epoch), from))
        };
        let frames = match changes {
            CatchUp::Deltas(changes) => encode_batch(epoch, from, changes)
                .inspect_err(|e| tracing::error!(error = %e, "cannot encode a batch"))
                .ok(),
            // More changes than the log keeps since the last batch: subscribers behind get
            // snapshots.
            CatchUp::Snapshot => None,
        };
        let mut inner = self.lock();
        if inner.published == from {
            match frames {
                Some(frames) => inner.feed.push(from, to, frames),
                None => inner.feed.reset(),
            }
            inner.published = to;
            self.published.send_replace(to);
        }
        inner.batch.due_at()
    }

    /// Resolves when a change has been recorded since the last call (or before it).
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Counts a sidecar subscription whose feed is written in `encoding`, until
    /// [`Registry::subscription_closed`].
    pub fn subscription_opened(&self, encoding: Encoding) {
        *self.lock().subscribers.get_mut(encoding) += 1;
    }

    /// Stops counting a subscription counted by [`Registry::subscription_opened`].
    pub fn subscription_closed(&self, encoding: Encoding) {
        let mut inner = self.lock();
        let count = inner.subscribers.get_mut(encoding);
        *count = count.saturating_sub(1);
    }

    /// A receiver that changes whenever a batch is published.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// Whether `now` is within the grace period after this directory started.
    pub fn in_grace_period(&self, now: Instant) -> bool {
        now < self.grace_period_end()
    }

    /// When the grace period ends.
    pub fn grace_period_end(&self) -> Instant {
        self.settings.started + self.settings.grace_period
    }

    /// The table's position and the counters of [`RegistryCounts`], in one lock.
    pub fn counts(&self) -> RegistryCounts {
        let inner = self.lock();
        let table = inner.log.table();
        RegistryCounts {
            epoch: table.epoch,
            revision: table.revision,
            published: inner.published,
            subscribers: inner.subscribers.clone(),
            expired: inner.expired,
            held: inner.presence.lapsed() as u64,
            preservation_holds: inner.preservation.holds(),
        }
    }

    /// The revision of the last published batch.
    pub fn published(&self) -> u64 {
        self.lock().published
    }

    /// What a sidecar that holds the previous run's table is sent during the grace period
    /// ([`usher_shared::protocol::DirectoryMessage::GraceUpserts`]), and the revision of this
    /// run's table it then reflects: the upserts and declarations since `since` (a revision an
    /// earlier call returned) while the log still holds them, else every instance and declared
    /// version of the table. Removals are left out: nothing is withdrawn before the grace
    /// period ends. No frames when nothing was added.
    ///
    /// Errors as [`Registry::next_frames`].
    pub fn grace_upserts(&self, since: Option<u64>) -> Result<(Frames, u64), FrameError> {
        let inner = self.lock();
        let table = inner.log.table();
        let (epoch, current) = (table.epoch, table.revision);
        let caught_up = since.map(|revision| inner.log.catch_up(Some(epoch), revision));
        let changes: Vec<Change> = match caught_up {
            Some(CatchUp::Deltas(changes)) => changes
                .into_iter()
                .filter(|c| matches!(c, Change::Upsert(_) | Change::Declare(_)))
                .collect(),
            _ => table
                .declared()
                .cloned()
                .map(Change::Declare)
                .chain(table.instances().cloned().map(Change::Upsert))
                .collect(),
        };
        drop(inner);
        Ok((encode_grace_upserts(epoch, changes)?, current))
    }

    /// The frames a sidecar holding `held` is sent next, and what it holds after them (Baker:
    /// the missed deltas, or the full table):
    /// - at a batch start: the shared frames of that batch and every later one;
    /// - inside a batch (after a snapshot) or behind the retained batches: the changes up to
    ///   the next batch (or the last published revision), encoded for it alone;
    /// - another epoch, or further behind than the log reaches: a snapshot of the table,
    ///   cached and shared while it is recent ([`crate::feed::MAX_SNAPSHOT_LAG`]);
    /// - at (or past) the last published revision: nothing, or one empty delta frame when
    ///   `first` so a new subscriber learns it is current.
    ///
    /// The frames are in `encoding`, the one the sidecar reads.
    ///
    /// Errors only if an entry exceeds the frame limit (a bug: every entry came through a
    /// 64 KiB node frame).
    pub fn next_frames(
        &self,
        held: Held,
        first: bool,
        encoding: Encoding,
    ) -> Result<(Frames, Held), FrameError> {
        let inner = self.lock();
        let table = inner.log.table();
        let (epoch, current, published) = (table.epoch, table.revision, inner.published);
        let revision = held.1;
        if held.0 == Some(epoch) && revision <= current {
            if revision >= published {
                let frames = match first {
                    true => encode_deltas(epoch, revision, Vec::new(), encoding)?,
                    false => Vec::new(),
                };
                return Ok((frames, held));
            }
            let boundary = match inner.feed.position(revision, encoding) {
                Position::Start { frames, to } => return Ok((frames, (Some(epoch), to))),
                Position::Inside { boundary } => boundary,
                Position::NotRetained => published,
            };
            if let CatchUp::Deltas(mut changes) = inner.log.catch_up(held.0, revision) {
                drop(inner);
                changes.truncate((boundary - revision) as usize);
                let frames = encode_deltas(epoch, revision, changes, encoding)?;
                return Ok((frames, (Some(epoch), boundary)));
            }
        }
        if let Some((frames, revision)) = inner.feed.snapshot(epoch, current, encoding) {
            return Ok((frames, (Some(epoch), revision)));
        }
        let instances = table.instances().cloned().collect();
        let declared = table.declared().cloned().collect();
        drop(inner);
        let frames = encode_snapshot(epoch, current, instances, declared, encoding)?;
        self.lock()
            .feed
            .cache_snapshot(epoch, current, encoding, frames.clone());
        Ok((frames, (Some(epoch), current)))
    }

    /// The ids of one service version's instances in the table, in id order: O(log n + k)
    /// under the lock, however large the rest of the table.
    pub fn instance_ids(&self, service: &str, version: &str) -> Vec<String> {
        let inner = self.lock();
        inner
            .log
            .table()
            .instances_of(service, version)
            .map(|i| i.id.clone())
            .collect()
    }

    /// Per service version in the table, in table order: its instances and how many of them
    /// are routable. One pass under the lock that copies only the names, not the table
    /// (`GET /v1/services`, `GET /metrics` and the dashboard read it every few seconds; a copy
    /// of a 10,000-instance table took the directory's thread about 5 ms).
    pub fn version_counts(&self) -> Vec<VersionCount> {
        let inner = self.lock();
        let mut counts: Vec<VersionCount> = Vec::new();
        for i in inner.log.table().instances() {
            let same = counts
                .last()
                .is_some_and(|c| c.service == i.service && c.version == i.version);
            if !same {
                counts.push(VersionCount {
                    service: i.service.clone(),
                    version: i.version.clone(),
                    instances: 0,
                    routable: 0,
                });
            }
            if let Some(c) = counts.last_mut() {
                c.instances += 1;
                c.routable += u32::from(i.state.routable());
            }
        }
        counts
    }

    /// A copy of the current table.
    pub fn table(&self) -> RouteTable {
        self.lock().log.table().clone()
    }

    /// The table for `GET /v1/routes`, with ages relative to `now` / `now_ms` (Unix ms).
    pub fn report(&self, now: Instant, now_ms: u64) -> RoutesReport {
        let inner = self.lock();
        let table = inner.log.table();
        RoutesReport {
            epoch: table.epoch,
            revision: table.revision,
            in_grace_period: self.in_grace_period(now),
            heartbeat_interval_ms: self.settings.heartbeat_interval.as_millis() as u64,
            ttl_ms: self.settings.ttl.as_millis() as u64,
            subscribers: inner.subscribers.clone(),
            instances: table
                .instances()
                .map(|i| {
                    let key = i.key();
                    InstanceReport {
                        service: i.service.clone(),
                        version: i.version.clone(),
                        id: i.id.clone(),
                        address: i.address,
                        capacity: i.capacity,
                        weight: i.weight,
                        state: i.state.as_str(),
                        age_ms: now_ms.saturating_sub(i.started_at_ms),
                        last_heartbeat_ms_ago: inner
                            .presence
                            .last_seen(&key)
                            .map(|seen| now.saturating_duration_since(seen).as_millis() as u64),
                        withdrawal_held: inner.presence.is_lapsed(&key),
                        labels: i.labels.clone(),
                    }
                })
                .collect(),
        }
    }

    /// The next heartbeat interval to tell an agent: the configured interval ±10% (SwarmKit:
    /// jitter spreads heartbeats out).
    pub fn next_heartbeat(&self) -> Duration {
        jitter(
            self.settings.heartbeat_interval,
            rand::rng().random_range(-1.0..=1.0),
        )
    }
}

/// `interval` moved by `unit` (in -1..=1) times 10%.
pub fn jitter(interval: Duration, unit: f64) -> Duration {
    interval.mul_f64(1.0 + 0.1 * unit.clamp(-1.0, 1.0))
}

/// Whether `change` brings the first `up` instance of a declared (managed) version: requests
/// may be queued in sidecars for it (a cold start), so it is published without the batch delay.
fn first_up_of_declared(table: &RouteTable, change: &Change) -> bool {
    let Change::Upsert(new) = change else {
        return false;
    };
    new.state.routable()
        && table
            .declared()
            .any(|d| d.service == new.service && d.version == new.version)
        && !table
            .instances_of(&new.service, &new.version)
            .any(|i| i.state.routable())
}

fn validate_instance(i: &Instance) -> Result<(), RegistryError> {
    let bad = |what: String| Err(RegistryError::Invalid(what));
    if let Err(e) = validate_label(&i.service) {
        return bad(format!("service {:?} {e}", i.service));
    }
    if let Err(e) = validate_label(&i.version) {
        return bad(format!("version {:?} {e}", i.version));
    }
    if let Err(e) = validate_instance_id(&i.id) {
        return bad(format!("instance id {:?} {e}", i.id));
    }
    if i.capacity == 0 || i.capacity > MAX_CAPACITY {
        return bad(format!(
            "capacity {} must be between 1 and {MAX_CAPACITY}",
            i.capacity
        ));
    }
    if i.address.port() == 0 || i.address.ip().is_unspecified() {
        return bad(format!(
            "address {} is not one sidecars can connect to",
            i.address
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use usher_shared::codec::{decode_frame, MAX_DIRECTORY_FRAME};
    use usher_shared::protocol::DirectoryMessage;

    pub(crate) const HB: Duration = Duration::from_secs(1);

    /// A registry started at `t0`: epoch 42, heartbeat [`HB`], TTL 3 HB, grace period 6 HB.
    pub(crate) fn registry(t0: Instant) -> Registry {
        Registry::new(Settings {
            epoch: 42,
            heartbeat_interval: HB,
            ttl: HB * 3,
            silent_stream_timeout: HB * 6,
            grace_period: HB * 6,
            started: t0,
            preservation: PreservationSettings::new(
                crate::preservation::DEFAULT_THRESHOLD_PERCENT,
                crate::preservation::DEFAULT_MIN_INSTANCES,
                HB,
                HB * 3,
            ),
        })
    }

    /// Instance `id` of web/v1 at 127.0.0.1:8080, capacity 4.
    pub(crate) fn instance(id: &str, state: InstanceState) -> Instance {
        Instance {
            service: "web".into(),
            version: "v1".into(),
            id: id.into(),
            address: "127.0.0.1:8080".parse().unwrap(),
            capacity: 4,
            weight: 1,
            state,
            started_at_ms: 1_000,
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn version_counts_group_the_table_by_version() {
        let t0 = Instant::now();
        let r = registry(t0);
        assert!(r.version_counts().is_empty());
        let mut session = 0;
        let mut add = |service: &str, version: &str, id: &str, state| {
            session += 1;
            let mut i = instance(id, state);
            (i.service, i.version) = (service.into(), version.into());
            r.register(session, i, t0).unwrap();
        };
        add("web", "v2", "c", InstanceState::Up);
        add("api", "v1", "a", InstanceState::Draining);
        add("web", "v1", "b", InstanceState::Starting);
        add("web", "v1", "a", InstanceState::Up);
        add("web", "v2", "a", InstanceState::Up);
        let counts: Vec<_> = r
            .version_counts()
            .into_iter()
            .map(|c| (c.service, c.version, c.instances, c.routable))
            .collect();
        let expect = |s: &str, v: &str, n, up| (s.to_string(), v.to_string(), n, up);
        assert_eq!(
            counts,
            [
                expect("api", "v1", 1, 0),
                expect("web", "v1", 2, 1),
                expect("web", "v2", 2, 2),
            ]
        );
    }

    #[test]
    fn register_heartbeat_and_ttl() {
        let t0 = Instant::now();
        let r = registry(t0);
        let a = instance("a", InstanceState::Starting);
        r.register(1, a.clone(), t0).unwrap();
        r.heartbeat(1, &a.key(), InstanceState::Up, t0 + HB)
            .unwrap();
        assert_eq!(
            r.table().get(&a.key()).unwrap().state,
            InstanceState::Up,
            "a health change is applied at once"
        );
        assert!(r
            .expire(t0 + HB * 3 + Duration::from_millis(999))
            .is_empty());
        assert_eq!(r.expire(t0 + HB * 4), vec![a.key()]);
        assert!(r.table().is_empty());
        assert!(matches!(
            r.heartbeat(1, &a.key(), InstanceState::Up, t0 + HB * 5),
            Err(RegistryError::NotRegistered { .. })
        ));
    }

    /// A registry with 60 `up` instances `i0`..`i59` of web/v1 registered at `t0`, instance
    /// `i` by session `i`, and their keys: a fleet large enough for self-preservation.
    fn fleet_of_60(t0: Instant) -> (Registry, Vec<InstanceKey>) {
        let r = registry(t0);
        let keys = (0..60)
            .map(|i| {
                let a = instance(&format!("i{i}"), InstanceState::Up);
                r.register(i, a.clone(), t0).unwrap();
                a.key()
            })
            .collect();
        (r, keys)
    }

    /// Heartbeats at `at` from the instances of [`fleet_of_60`] in `range`.
    fn beat(r: &Registry, keys: &[InstanceKey], range: std::ops::Range<usize>, at: Instant) {
        for i in range {
            r.heartbeat(i as u64, &keys[i], InstanceState::Up, at)
                .unwrap();
        }
    }

    #[test]
    fn a_fleet_falling_silent_at_once_is_held_not_withdrawn() {
        let t0 = Instant::now();
        let (r, keys) = fleet_of_60(t0);
        let beat = |range: std::ops::Range<usize>, at: Instant| beat(&r, &keys, range, at);
        // One falls silent among 60: withdrawn at its TTL as ever.
        beat(1..60, t0 + HB * 2);
        assert_eq!(r.expire(t0 + HB * 3), vec![keys[0].clone()]);
        // 20 of the other 59 fall silent at once (a third): their TTLs lapse, nothing goes.
        beat(21..60, t0 + HB * 4);
        assert!(r.expire(t0 + HB * 5).is_empty());
        assert_eq!(r.table().len(), 59);
        let counts = r.counts();
        assert_eq!(
            (counts.held, counts.preservation_holds, counts.expired),
            (20, 1, 1)
        );
        // `GET /v1/routes` shows which are held, and when each was last heard from.
        let report = r.report(t0 + HB * 5, 0);
        let shown = |id: &str| {
            let i = report.instances.iter().find(|i| i.id == id).unwrap();
            (i.withdrawal_held, i.last_heartbeat_ms_ago)
        };
        assert_eq!(shown("i1"), (true, Some(3_000)));
        assert_eq!(shown("i21"), (false, Some(1_000)));
        // A held instance's heartbeat is accepted: it never left.
        beat(1..3, t0 + HB * 5);
        r.deregister(3, &keys[3], t0 + HB * 5).unwrap();
        beat(21..60, t0 + HB * 5);
        assert!(r
            .expire(t0 + HB * 5 + Duration::from_millis(100))
            .is_empty());
        assert_eq!(
            r.counts().held,
            17,
            "heard from again or deregistered: no longer held"
        );
        // The other 17 stay silent (29%): they go after the longest hold, 10 TTLs from t0 + 5 s.
        let mut at = t0 + HB * 5;
        while at < t0 + HB * 34 {
            at += HB;
            beat(1..3, at);
            beat(21..60, at);
            assert!(r.expire(at).is_empty(), "held at {:?}", at - t0);
        }
        at += HB;
        beat(1..3, at);
        beat(21..60, at);
        assert_eq!(r.expire(at).len(), 17);
        assert_eq!(r.table().len(), 41);
        assert_eq!(r.counts().expired, 18);
    }

    #[test]
    fn instances_still_silent_when_a_hold_ends_get_the_grace_period() {
        let t0 = Instant::now();
        let (r, keys) = fleet_of_60(t0);
        let beat = |range: std::ops::Range<usize>, at: Instant| beat(&r, &keys, range, at);
        // 20 fall silent at once: held.
        beat(20..60, t0 + HB * 2);
        assert!(r.expire(t0 + HB * 3).is_empty());
        assert_eq!(r.counts().held, 20);
        // 15 are heard from again; the silent 5 (8%) are under the threshold: the hold ends
        // and they get the grace period (6 s) instead of being withdrawn.
        beat(5..60, t0 + HB * 3);
        let ended = t0 + HB * 3 + Duration::from_millis(100);
        assert!(r.expire(ended).is_empty());
        assert_eq!((r.counts().held, r.table().len()), (0, 60));
        for at in [5, 7, 9] {
            beat(5..60, t0 + HB * at);
        }
        assert!(r
            .expire(ended + HB * 6 - Duration::from_millis(1))
            .is_empty());
        // Still silent at its end: withdrawn, as any silent instance.
        let mut withdrawn = r.expire(ended + HB * 6);
        withdrawn.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(withdrawn, keys[..5].to_vec());
        assert_eq!(r.counts().expired, 5);
    }

    #[test]
    fn a_newer_session_owns_the_instance() {
        let t0 = Instant::now();
        let r = registry(t0);
        let a = instance("a", InstanceState::Up);
        r.register(1, a.clone(), t0).unwrap();
        r.register(2, a.clone(), t0).unwrap();
        assert!(matches!(
            r.deregister(1, &a.key(), t0),
            Err(RegistryError::Superseded { .. })
        ));
        assert_eq!(r.table().len(), 1, "the old session cannot withdraw it");
        r.deregister(2, &a.key(), t0).unwrap();
        assert!(r.table().is_empty());
    }

    #[test]
    fn invalid_registrations_change_nothing() {
        let t0 = Instant::now();
        let r = registry(t0);
        let mut bad = vec![];
        let mut i = instance("a", InstanceState::Up);
        i.service = "Web".into();
        bad.push(i);
        let mut i = instance("a", InstanceState::Up);
        i.version = "v1.2".into();
        bad.push(i);
        bad.push(instance("has space", InstanceState::Up));
        let mut i = instance("a", InstanceState::Up);
        i.capacity = 0;
        bad.push(i);
        let mut i = instance("a", InstanceState::Up);
        i.address = "0.0.0.0:80".parse().unwrap();
        bad.push(i);
        for i in bad {
            let e = r.register(1, i.clone(), t0).unwrap_err();
            assert!(matches!(e, RegistryError::Invalid(_)), "{i:?}: {e}");
        }
        assert!(r.table().is_empty());
        assert_eq!(r.table().revision, 0);
    }

    /// Decodes `frames` into the messages they hold.
    fn decode(frames: &Frames) -> Vec<DirectoryMessage> {
        frames
            .iter()
            .map(|f| {
                let mut buf = bytes::BytesMut::from(&f[..]);
                decode_frame(&mut buf, MAX_DIRECTORY_FRAME)
                    .unwrap()
                    .unwrap()
            })
            .collect()
    }

    fn deltas(frames: &Frames) -> Vec<(u64, u64, usize)> {
        decode(frames)
            .into_iter()
            .map(|m| match m {
                DirectoryMessage::Deltas {
                    from_revision,
                    to_revision,
                    changes,
                    ..
                } => (from_revision, to_revision, changes.len()),
                other => panic!("expected deltas, got {other:?}"),
            })
            .collect()
    }

    #[test]
    fn subscribers_share_published_batches_or_get_what_they_miss() {
        for encoding in [Encoding::Named, Encoding::Compact] {
            subscribers_share_published_batches_in(encoding);
        }
    }

    fn subscribers_share_published_batches_in(encoding: Encoding) {
        let t0 = Instant::now();
        let r = registry(t0);
        let batch = Duration::from_millis(100);
        // A new subscriber of an empty directory learns it is current.
        let (frames, held) = r.next_frames((Some(42), 0), true, encoding).unwrap();
        assert_eq!((deltas(&frames), held), (vec![(0, 0, 0)], (Some(42), 0)));
        assert!(r.next_frames(held, false, encoding).unwrap().0.is_empty());

        r.register(1, instance("a", InstanceState::Up), t0).unwrap();
        r.register(2, instance("b", InstanceState::Up), t0).unwrap();
        assert!(
            r.next_frames(held, false, encoding).unwrap().0.is_empty(),
            "nothing before the batch is published"
        );
        r.publish_due(t0 + batch);
        r.register(3, instance("c", InstanceState::Up), t0 + batch)
            .unwrap();
        r.publish_due(t0 + batch * 2);
        assert_eq!(r.published(), 3);

        // At a batch start: the shared frames of every batch from there.
        let (first, held_a) = r.next_frames((Some(42), 0), false, encoding).unwrap();
        let (second, held_b) = r.next_frames((Some(42), 0), false, encoding).unwrap();
        assert_eq!(deltas(&first), vec![(0, 2, 2), (2, 3, 1)]);
        assert_eq!((held_a, held_b), ((Some(42), 3), (Some(42), 3)));
        assert_eq!(first[0].as_ptr(), second[0].as_ptr(), "the same bytes");

        // Inside a batch: the rest of that batch, encoded for it; then the shared frames.
        let (frames, held) = r.next_frames((Some(42), 1), false, encoding).unwrap();
        assert_eq!((deltas(&frames), held), (vec![(1, 2, 1)], (Some(42), 2)));
        let (frames, held) = r.next_frames(held, false, encoding).unwrap();
        assert_eq!((deltas(&frames), held), (vec![(2, 3, 1)], (Some(42), 3)));

        // Another epoch, no table or a revision from the future: a snapshot, encoded once.
        for held in [(Some(7), 1), (None, 0), (Some(42), 9)] {
            let (frames, reached) = r.next_frames(held, true, encoding).unwrap();
            assert_eq!(reached, (Some(42), 3));
            assert!(matches!(
                &decode(&frames)[..],
                [DirectoryMessage::SnapshotChunk { revision: 3, instances, last: true, .. }] if instances.len() == 3
            ));
        }
        let (a, _) = r.next_frames((None, 0), true, encoding).unwrap();
        let (b, _) = r.next_frames((None, 0), true, encoding).unwrap();
        assert_eq!(a[0].as_ptr(), b[0].as_ptr(), "the cached snapshot");

        // A snapshot taken between batches is caught up to the next batch, then shares it.
        r.register(4, instance("d", InstanceState::Up), t0 + batch * 2)
            .unwrap();
        r.register(5, instance("e", InstanceState::Up), t0 + batch * 2)
            .unwrap();
        let (_, held) = r.next_frames((None, 0), true, encoding).unwrap();
        assert_eq!(held, (Some(42), 3), "the cached snapshot is recent enough");
        r.publish_due(t0 + batch * 3);
        r.register(6, instance("f", InstanceState::Up), t0 + batch * 3)
            .unwrap();
        r.publish_due(t0 + batch * 4);
        let (frames, held) = r.next_frames(held, false, encoding).unwrap();
        assert_eq!(
            (deltas(&frames), held),
            (vec![(3, 5, 2), (5, 6, 1)], (Some(42), 6))
        );
    }

    #[test]
    fn a_sidecar_gets_the_feed_in_the_encoding_it_reads() {
        let t0 = Instant::now();
        let r = registry(t0);
        for id in ["a", "b", "c"] {
            r.register(1, instance(id, InstanceState::Up), t0).unwrap();
        }
        r.publish_due(t0 + Duration::from_millis(100));
        // The shared batch, the rest of a batch, a snapshot.
        for held in [(Some(42), 0), (Some(42), 2), (None, 0)] {
            let (named, reached) = r.next_frames(held, true, Encoding::Named).unwrap();
            let (compact, same) = r.next_frames(held, true, Encoding::Compact).unwrap();
            assert_eq!(reached, same);
            assert_eq!(decode(&named), decode(&compact), "the same messages");
            let size = |frames: &Frames| frames.iter().map(|f| f.len()).sum::<usize>();
            assert!(
                size(&compact) * 2 < size(&named),
                "{held:?}: {} compact bytes against {} named",
                size(&compact),
                size(&named)
            );
        }
    }

    #[test]
    fn changes_are_published_in_batches() {
        let t0 = Instant::now();
        let r = registry(t0);
        let rx = r.subscribe();
        r.register(1, instance("a", InstanceState::Up), t0).unwrap();
        assert_eq!(r.publish_due(t0), None, "no batch yet: at once");
        assert_eq!(*rx.borrow(), 1);
        let later = t0 + Duration::from_millis(10);
        r.register(2, instance("b", InstanceState::Up), later)
            .unwrap();
        assert_eq!(
            r.publish_due(later),
            Some(t0 + Duration::from_millis(100)),
            "100 ms after the previous batch"
        );
        assert_eq!(*rx.borrow(), 1, "not yet published");
        assert_eq!(r.publish_due(t0 + Duration::from_millis(100)), None);
        assert_eq!(*rx.borrow(), 2);
        // A heartbeat without a state change is not a change.
        r.heartbeat(
            1,
            &instance("a", InstanceState::Up).key(),
            InstanceState::Up,
            t0,
        )
        .unwrap();
        assert_eq!(r.publish_due(t0), None);
    }

    #[test]
    fn the_first_up_instance_of_a_declared_version_is_published_at_once() {
        let t0 = Instant::now();
        let r = registry(t0);
        let web = ServiceVersion {
            service: "web".into(),
            version: "v1".into(),
        };
        r.declare([web], t0);
        assert_eq!(r.publish_due(t0), None);
        // Starting is not routable: it waits for the batch.
        let starting = t0 + Duration::from_millis(10);
        r.register(1, instance("a", InstanceState::Starting), starting)
            .unwrap();
        assert_eq!(
            r.publish_due(starting),
            Some(t0 + Duration::from_millis(100))
        );
        // Up, and the first of its version: at once.
        let at = t0 + Duration::from_millis(20);
        r.heartbeat(
            1,
            &instance("a", InstanceState::Up).key(),
            InstanceState::Up,
            at,
        )
        .unwrap();
        assert_eq!(r.publish_due(at), None, "published");
        // A second up instance waits for the batch again.
        r.register(2, instance("b", InstanceState::Up), at).unwrap();
        assert_eq!(r.publish_due(at), Some(at + Duration::from_millis(100)));
    }

    #[test]
    fn grace_period_and_jitter() {
        let t0 = Instant::now();
        let r = registry(t0);
        assert!(r.in_grace_period(t0 + HB * 5));
        assert!(!r.in_grace_period(t0 + HB * 6));
        assert_eq!(jitter(HB, -1.0), Duration::from_millis(900));
        assert_eq!(jitter(HB, 1.0), Duration::from_millis(1100));
        assert_eq!(jitter(HB, 7.0), Duration::from_millis(1100));
        for _ in 0..100 {
            let d = r.next_heartbeat();
            assert!(d >= Duration::from_millis(900) && d <= Duration::from_millis(1100));
        }
    }

    #[test]
    fn report_shows_ages() {
        let t0 = Instant::now();
        let r = registry(t0);
        r.register(1, instance("a", InstanceState::Up), t0).unwrap();
        let report = r.report(t0 + Duration::from_millis(500), 3_000);
        assert_eq!(report.instances.len(), 1);
        assert_eq!(report.instances[0].age_ms, 2_000);
        assert_eq!(report.instances[0].last_heartbeat_ms_ago, Some(500));
        assert!(report.in_grace_period);
    }
}
