//! The autoscaler loop: every cycle (1 s), and at once when a sidecar reports a request waiting
//! for a version at zero (cold start), it decides each managed version's target with
//! [`crate::autoscale::decide`] from the outstanding requests the sidecars report, logs each
//! change with its reasons, and hands the target to the version's scheduler backend.
//!
//! What it decided is kept in [`AutoscaleStatus`] for `GET /v1/services`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::autoscale::{decide, Reason, ScaleState};
use crate::registry::Registry;
use crate::scheduler::{AgentContext, Backend, Scheduler};
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
    /// The latest target changes, newest last.
    pub decisions: VecDeque<DecisionRecord>,
}

/// Every managed version's status, shared with the admin API.
#[derive(Debug, Default)]
pub struct AutoscaleStatus {
    versions: Mutex<BTreeMap<(String, String), VersionStatus>>,
}

impl AutoscaleStatus {
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
    shutdown: CancellationToken,
) {
    let status = registry.autoscale();
    let now = Instant::now();
    let mut managed: Vec<Managed> = specs
        .into_iter()
        .map(|spec| Managed {
            backend: Backend::new(&spec, &agents),
            spec,
            state: ScaleState::default(),
            last: now,
        })
        .collect();
    if managed.is_empty() {
        shutdown.cancelled().await;
        return;
    }
    for m in &managed {
        status.lock().insert(
            (m.spec.name.clone(), m.spec.version.clone()),
            VersionStatus {
                scheduler: scheduler_name(&m.backend),
                ..VersionStatus::default()
            },
        );
    }
    let mut tick = tokio::time::interval(CYCLE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
            _ = registry.load().demand() => {}
        }
        cycle(&mut managed, &registry, status).await;
    }
    info!("stopping the instances the directory started");
    for m in &mut managed {
        m.backend.shutdown().await;
    }
}

fn scheduler_name(backend: &Backend) -> &'static str {
    match backend {
        Backend::Process(_) => "process",
        Backend::Command(_) => "command",
    }
}

async fn cycle(managed: &mut [Managed], registry: &Registry, status: &AutoscaleStatus) {
    let now = Instant::now();
    let totals = registry.load().totals(now);
    for m in managed.iter_mut() {
        let key = (m.spec.name.clone(), m.spec.version.clone());
        let outstanding = totals.get(&key).map_or(0, |t| t.outstanding());
        let decision = decide(outstanding, &m.spec.scale, &m.state, now - m.last);
        m.last = now;
        let from = m.state.target;
        m.state = decision.state;
        if decision.state.target != from {
            info!(service = %m.spec.name, version = %m.spec.version, from, to = decision.state.target,
                  ideal = decision.ideal, outstanding, reasons = ?decision.reasons, "scaling");
        }
        if let Err(e) = m.backend.scale(decision.state.target).await {
            warn!(service = %m.spec.name, version = %m.spec.version, error = %e, "cannot scale");
        }
        let mut versions = status.lock();
        let entry = versions.entry(key).or_default();
        entry.target = decision.state.target;
        entry.ideal = decision.ideal;
        entry.started = m.backend.started();
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
