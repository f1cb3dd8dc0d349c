//! The load sidecars report: per sidecar, its latest in-flight and queued requests per service
//! version; summed, the outstanding requests the autoscaler scales on (WSO2: requests in
//! flight; Waiter: outstanding = in-flight + queued).
//!
//! A report replaces the sidecar's previous one. A sidecar that stops reporting stops counting
//! after [`REPORT_MAX_AGE`], and at once when its stream ends. Time is a parameter.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;
use usher_shared::protocol::{check_load_report, VersionLoad};

use crate::registry::SessionId;

/// How often sidecars report (they are told nothing: it is the protocol's period).
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// A report older than this no longer counts (one missed report is tolerated).
pub const REPORT_MAX_AGE: Duration = Duration::from_secs(2);

/// The summed load of one service version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VersionTotals {
    pub in_flight: u64,
    pub queued: u64,
    /// Sidecars whose current report names this version.
    pub sidecars: u32,
    /// In-flight requests per instance id, for instances that have any (an instance left out
    /// is idle); scale down stops the idlest instances first.
    pub busy: BTreeMap<String, u64>,
}

impl VersionTotals {
    /// In-flight plus queued requests (Waiter: outstanding).
    pub fn outstanding(&self) -> u64 {
        self.in_flight + self.queued
    }
}

#[derive(Debug)]
struct Report {
    at: Instant,
    versions: Vec<VersionLoad>,
}

/// Every sidecar's latest report.
#[derive(Debug, Default)]
pub struct LoadBoard {
    reports: Mutex<HashMap<SessionId, Report>>,
    /// Reports recorded since the directory started (`GET /metrics` `load_reports_total`).
    recorded: AtomicU64,
    /// Told when a report shows queued requests, so a version at zero starts at once.
    demand: tokio::sync::Notify,
}

impl LoadBoard {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Report>> {
        self.reports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `versions` as the load of sidecar `session` at `now`. Errors (and keeps the
    /// previous report) when the report is larger than the protocol allows
    /// ([`check_load_report`]).
    pub fn report(
        &self,
        session: SessionId,
        now: Instant,
        versions: Vec<VersionLoad>,
    ) -> Result<(), String> {
        check_load_report(&versions)?;
        let queued = versions.iter().any(|v| v.queued > 0);
        self.lock().insert(session, Report { at: now, versions });
        self.recorded.fetch_add(1, Ordering::Relaxed);
        if queued {
            self.demand.notify_one();
        }
        Ok(())
    }

    /// Reports recorded since the directory started. Sidecars report every
    /// [`REPORT_INTERVAL`] while they have requests in flight or queued, once more when they
    /// have none left, and not at all while idle.
    pub fn recorded(&self) -> u64 {
        self.recorded.load(Ordering::Relaxed)
    }

    /// Resolves when a report shows queued requests (cold-start demand).
    pub async fn demand(&self) {
        self.demand.notified().await
    }

    /// Forgets sidecar `session` (its stream ended).
    pub fn forget(&self, session: SessionId) {
        self.lock().remove(&session);
    }

    /// The load per (service, version), summed over sidecars whose report is fresh at `now`.
    pub fn totals(&self, now: Instant) -> BTreeMap<(String, String), VersionTotals> {
        let mut totals: BTreeMap<(String, String), VersionTotals> = BTreeMap::new();
        for report in self.lock().values() {
            if now.saturating_duration_since(report.at) > REPORT_MAX_AGE {
                continue;
            }
            for v in &report.versions {
                let t = totals
                    .entry((v.service.clone(), v.version.clone()))
                    .or_default();
                t.in_flight += u64::from(v.in_flight);
                t.queued += u64::from(v.queued);
                t.sidecars += 1;
                for i in &v.instances {
                    *t.busy.entry(i.id.clone()).or_default() += u64::from(i.in_flight);
                }
            }
        }
        totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(service: &str, in_flight: u32, queued: u32) -> VersionLoad {
        VersionLoad {
            service: service.into(),
            version: "v1".into(),
            in_flight,
            queued,
            instances: vec![],
        }
    }

    fn busy(service: &str, instances: &[(&str, u32)]) -> VersionLoad {
        VersionLoad {
            instances: instances
                .iter()
                .map(|(id, in_flight)| usher_shared::protocol::InstanceLoad {
                    id: id.to_string(),
                    in_flight: *in_flight,
                })
                .collect(),
            ..load(service, instances.iter().map(|i| i.1).sum(), 0)
        }
    }

    fn key(service: &str) -> (String, String) {
        (service.into(), "v1".into())
    }

    #[test]
    fn reports_are_summed_replaced_and_expire() {
        let t0 = Instant::now();
        let board = LoadBoard::default();
        board
            .report(1, t0, vec![load("web", 3, 1), load("api", 1, 0)])
            .unwrap();
        board.report(2, t0, vec![load("web", 2, 4)]).unwrap();
        let totals = board.totals(t0);
        assert_eq!(
            totals[&key("web")],
            VersionTotals {
                in_flight: 5,
                queued: 5,
                sidecars: 2,
                busy: BTreeMap::new(),
            }
        );
        assert_eq!(totals[&key("web")].outstanding(), 10);
        assert_eq!(totals[&key("api")].outstanding(), 1);

        // A new report replaces the old one: api is no longer loaded by sidecar 1.
        board
            .report(1, t0 + REPORT_INTERVAL, vec![load("web", 1, 0)])
            .unwrap();
        let totals = board.totals(t0 + REPORT_INTERVAL);
        assert!(!totals.contains_key(&key("api")));
        assert_eq!(totals[&key("web")].outstanding(), 7);

        // Sidecar 2 stopped reporting: after the maximum age it no longer counts.
        let later = t0 + REPORT_MAX_AGE + Duration::from_millis(1);
        assert_eq!(board.totals(later)[&key("web")].outstanding(), 1);
        // A sidecar whose stream ended stops counting at once.
        board.forget(1);
        assert!(board.totals(t0 + REPORT_INTERVAL).contains_key(&key("web")));
        assert!(board.totals(later).is_empty());
        assert_eq!(board.recorded(), 3);
    }

    #[test]
    fn per_instance_in_flight_is_summed_over_sidecars() {
        let t0 = Instant::now();
        let board = LoadBoard::default();
        board
            .report(1, t0, vec![busy("web", &[("a", 2), ("b", 1)])])
            .unwrap();
        board.report(2, t0, vec![busy("web", &[("a", 1)])]).unwrap();
        let totals = board.totals(t0);
        let web = &totals[&key("web")];
        assert_eq!(web.in_flight, 4);
        assert_eq!(
            web.busy,
            BTreeMap::from([("a".to_string(), 3), ("b".to_string(), 1)])
        );
    }

    #[test]
    fn oversized_reports_are_refused_and_change_nothing() {
        let t0 = Instant::now();
        let board = LoadBoard::default();
        board.report(1, t0, vec![load("web", 1, 0)]).unwrap();
        let huge = (0..=usher_shared::protocol::MAX_REPORTED_VERSIONS)
            .map(|_| load("web", 1, 0))
            .collect();
        assert!(board.report(1, t0, huge).is_err());
        assert_eq!(board.totals(t0)[&key("web")].outstanding(), 1);
        assert_eq!(board.recorded(), 1, "a refused report is not counted");
    }
}
