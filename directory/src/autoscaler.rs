//! The autoscaler loop: every cycle (1 s), and at once when a sidecar reports a request waiting
//! for a version at zero (cold start), it decides each managed version's target with
//! [`crate::autoscale::decide`] from the outstanding requests the sidecars report, logs each
//! change with its reasons, and hands the target to the version's scheduler backend.
//!
//! What it decided is kept in [`AutoscaleStatus`] for `GET /v1/services`.
//!
//! New `[[services]]` arrive on a channel (SIGHUP reloads the file): added versions are declared
//! and scaled, removed ones are drained to zero and undeclared, changed ones keep their
//! instances when only scaling settings changed, else get a new backend whose instances start
//! before the old ones drain.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use usher_shared::routes::{compare_versions, ServiceVersion};

use crate::autoscale::{decide, Reason, ScaleState};
use crate::registry::Registry;
use crate::scheduler::{AgentContext, Backend, Observed, Scheduler};
use crate::services::ServiceSpec;

/// Time between autoscaler cycles (DESIGN.md: default 1 s).
pub const CYCLE: Duration = Duration::from_secs(1);

/// Decisions kept per version for the admin API.
pub const KEPT_DECISIONS: usize = 10;

/// One target change, as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecord {
    /// Unix milliseconds.
    pub at_ms: u64,
    pub from: u32,
    pub to: u32,
    pub outstanding: u64,
    pub reasons: Vec<Reason>,
}

/// A managed version's scaling, as the admin API shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VersionStatus {
    pub target: u32,
    pub ideal: u32,
    /// Instances the scheduler has started and not stopped.
    pub started: u32,
    pub scheduler: &'static str,
    /// The target an operator pinned, if any (`usher-directory scale`).
    pub pinned: Option<u32>,
    /// The latest target changes, newest last.
    pub decisions: VecDeque<DecisionRecord>,
    /// Target changes up and down since the directory started.
    pub scaled_up: u64,
    pub scaled_down: u64,
    /// Cycles whose call to the scheduler failed since the directory started.
    pub scheduler_errors: u64,
}

/// Every managed version's status, shared with the admin API.
#[derive(Debug, Default)]
pub struct AutoscaleStatus {
    versions: Mutex<BTreeMap<(String, String), VersionStatus>>,
}

/// Most instances an operator may pin.
pub const MAX_PIN: u32 = 1000;

/// Why a pin is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    #[error("{0} is not a service the directory scales")]
    NotManaged(String),
    #[error("{0} has several versions: name one, as SERVICE.VERSION")]
    Ambiguous(String),
    #[error("at most {MAX_PIN} instances may be pinned")]
    TooMany,
}

impl AutoscaleStatus {
    /// Resolves `SERVICE` or `SERVICE.VERSION` to a managed version.
    pub fn resolve(&self, target: &str) -> Result<(String, String), PinError> {
        let managed = self.managed();
        let matches: Vec<_> = match target.split_once('.') {
            Some((service, version)) => managed
                .into_iter()
                .filter(|(s, v)| s == service && v == version)
                .collect(),
            None => managed.into_iter().filter(|(s, _)| s == target).collect(),
        };
        match matches.len() {
            0 => Err(PinError::NotManaged(target.to_string())),
            1 => Ok(matches.into_iter().next().expect("one match")),
            _ => Err(PinError::Ambiguous(target.to_string())),
        }
    }

    /// Pins `target`'s instance count until [`AutoscaleStatus::unpin`]; returns the version.
    pub fn pin(&self, target: &str, instances: u32) -> Result<(String, String), PinError> {
        if instances > MAX_PIN {
            return Err(PinError::TooMany);
        }
        let key = self.resolve(target)?;
        if let Some(status) = self.lock().get_mut(&key) {
            status.pinned = Some(instances);
        }
        Ok(key)
    }

    /// Hands `target` back to the autoscaler; returns the version.
    pub fn unpin(&self, target: &str) -> Result<(String, String), PinError> {
        let key = self.resolve(target)?;
        if let Some(status) = self.lock().get_mut(&key) {
            status.pinned = None;
        }
        Ok(key)
    }

    /// A copy of one version's status, if the directory manages it.
    pub fn get(&self, service: &str, version: &str) -> Option<VersionStatus> {
        self.lock()
            .get(&(service.to_string(), version.to_string()))
            .cloned()
    }

    /// Every managed (service, version).
    pub fn managed(&self) -> Vec<(String, String)> {
        self.lock().keys().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), VersionStatus>> {
        self.versions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Managed {
    spec: ServiceSpec,
    state: ScaleState,
    last: Instant,
    backend: Backend,
}

/// Runs cycles until `shutdown`, then stops every instance the backends started.
pub async fn run(
    specs: Vec<ServiceSpec>,
    agents: AgentContext,
    registry: Arc<Registry>,
    mut reloads: mpsc::Receiver<Vec<ServiceSpec>>,
    shutdown: CancellationToken,
) {
    let status = registry.autoscale();
    let mut managed: Vec<Managed> = Vec::new();
    // Backends being drained after a reload, so the cycles go on meanwhile.
    let mut draining = tokio::task::JoinSet::new();
    reconcile(&mut managed, specs, &agents, &registry, &mut draining).await;
    let mut tick = tokio::time::interval(CYCLE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // A cycle woken by waiting requests steps as far as a full cycle would: requests that
        // wait for capacity should not wait for the clock.
        let mut at_least = Duration::ZERO;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
            _ = registry.load().demand() => at_least = CYCLE,
            Some(specs) = reloads.recv() => {
                reconcile(&mut managed, specs, &agents, &registry, &mut draining).await;
            }
            Some(_) = draining.join_next(), if !draining.is_empty() => continue,
        }
        cycle(&mut managed, &registry, status, at_least).await;
    }
    info!("stopping the instances the directory started");
    for m in &mut managed {
        m.backend.shutdown().await;
    }
    while draining.join_next().await.is_some() {}
}

/// Makes `managed` follow `specs`: adds, removes and changes service versions. Backends that
/// go away are drained in `draining`, not waited for.
async fn reconcile(
    managed: &mut Vec<Managed>,
    specs: Vec<ServiceSpec>,
    agents: &AgentContext,
    registry: &Registry,
    draining: &mut tokio::task::JoinSet<()>,
) {
    let key = |s: &ServiceSpec| ServiceVersion {
        service: s.name.clone(),
        version: s.version.clone(),
    };
    let now = Instant::now();
    let (kept, removed): (Vec<Managed>, Vec<Managed>) = std::mem::take(managed)
        .into_iter()
        .partition(|m| specs.iter().any(|s| key(s) == key(&m.spec)));
    *managed = kept;
    for spec in specs {
        match managed.iter_mut().find(|m| key(&m.spec) == key(&spec)) {
            Some(m) if m.spec == spec => {}
            Some(m) if same_instances(&m.spec, &spec) => {
                info!(service = %spec.name, version = %spec.version, "scaling settings changed");
                m.spec = spec;
            }
            Some(m) => {
                info!(service = %spec.name, version = %spec.version,
                      "instance settings changed: starting new instances, then draining the old");
                let mut backend = Backend::new(&spec, agents);
                if let Err(e) = backend.scale(m.state.target, &Observed::default()).await {
                    warn!(service = %spec.name, version = %spec.version, error = %e, "cannot scale");
                }
                let mut old = std::mem::replace(&mut m.backend, backend);
                draining.spawn(async move { old.shutdown().await });
                m.spec = spec;
            }
            None => {
                info!(service = %spec.name, version = %spec.version, scheduler = ?spec.scheduler,
                      "managing a service version");
                registry.declare([key(&spec)], now);
                let backend = Backend::new(&spec, agents);
                registry.autoscale().lock().insert(
                    (spec.name.clone(), spec.version.clone()),
                    VersionStatus {
                        scheduler: backend.name(),
                        ..VersionStatus::default()
                    },
                );
                managed.push(Managed {
                    spec,
                    state: ScaleState::default(),
                    last: now,
                    backend,
                });
            }
        }
    }
    for mut m in removed {
        info!(service = %m.spec.name, version = %m.spec.version, "no longer managed: stopping its instances");
        registry.undeclare([key(&m.spec)], now);
        registry
            .autoscale()
            .lock()
            .remove(&(m.spec.name.clone(), m.spec.version.clone()));
        draining.spawn(async move { m.backend.shutdown().await });
    }
}

/// Whether two specs of a version run the same instances (only scaling settings differ).
fn same_instances(a: &ServiceSpec, b: &ServiceSpec) -> bool {
    a.scheduler == b.scheduler
        && a.health == b.health
        && a.drain_time == b.drain_time
        && a.scale.concurrency == b.scale.concurrency
}

/// Whether another managed version of `spec`'s service is newer (compared as the route table
/// does). An old version is scaled to zero once idle whatever its `min_instances`, so its
/// routes are withdrawn (Waiter kept old versions running; usher does not).
fn superseded(spec: &ServiceSpec, managed: &[Managed]) -> bool {
    managed.iter().any(|m| {
        m.spec.name == spec.name
            && compare_versions(&m.spec.version, &spec.version) == std::cmp::Ordering::Greater
    })
}

async fn cycle(
    managed: &mut [Managed],
    registry: &Registry,
    status: &AutoscaleStatus,
    at_least: Duration,
) {
    let now = Instant::now();
    let mut totals = registry.load().totals(now);
    let old: Vec<bool> = managed
        .iter()
        .map(|m| superseded(&m.spec, managed))
        .collect();
    for (m, old) in managed.iter_mut().zip(old) {
        let key = (m.spec.name.clone(), m.spec.version.clone());
        let load = totals.remove(&key).unwrap_or_default();
        let outstanding = load.outstanding();
        let observed = Observed {
            registered: registry.instance_ids(&m.spec.name, &m.spec.version),
            busy: load.busy,
        };
        let mut settings = m.spec.scale;
        if old {
            settings.min_instances = 0;
        }
        // Only versions with waiting requests take the demand cycle as a full one.
        let elapsed = if load.queued > 0 {
            (now - m.last).max(at_least)
        } else {
            now - m.last
        };
        let mut decision = decide(outstanding, &settings, &m.state, elapsed);
        let pinned = status.lock().get(&key).and_then(|s| s.pinned);
        if let Some(instances) = pinned {
            decision.state.target = instances;
            decision.state.exact = f64::from(instances);
            decision.reasons = vec![Reason::Pinned { instances }];
        }
        m.last = now;
        let from = m.state.target;
        m.state = decision.state;
        if decision.state.target != from {
            info!(service = %m.spec.name, version = %m.spec.version, from, to = decision.state.target,
                  ideal = decision.ideal, outstanding, reasons = ?decision.reasons, "scaling");
        }
        let scaled = m.backend.scale(decision.state.target, &observed).await;
        if let Err(e) = &scaled {
            warn!(service = %m.spec.name, version = %m.spec.version, error = %e, "cannot scale");
        }
        let mut versions = status.lock();
        let entry = versions.entry(key).or_default();
        entry.target = decision.state.target;
        entry.ideal = decision.ideal;
        entry.started = m.backend.started();
        entry.scheduler_errors += u64::from(scaled.is_err());
        if decision.state.target > from {
            entry.scaled_up += 1;
        } else if decision.state.target < from {
            entry.scaled_down += 1;
        }
        if decision.state.target != from {
            entry.decisions.push_back(DecisionRecord {
                at_ms: usher_shared::unix_millis(),
                from,
                to: decision.state.target,
                outstanding,
                reasons: decision.reasons,
            });
            while entry.decisions.len() > KEPT_DECISIONS {
                entry.decisions.pop_front();
            }
        }
    }
}
