//! The directory's admin endpoints: `GET /healthz`, `GET /v1/routes` and `GET /v1/services`.
//!
//! `/v1/services` answers `{"services":[{"service","version","instances","up","in_flight",
//! "queued","outstanding","sidecars","scaling"}]}`: per service version its instances, the
//! load the sidecars report (outstanding = in-flight + queued, the autoscaler's signal) and,
//! for versions the directory scales, `scaling`: `{"target","ideal","started","scheduler",
//! "decisions":[{"at_ms","from","to","outstanding","reasons"}]}`.
//!
//! `/v1/routes` answers `{"epoch","revision","in_grace_period","heartbeat_interval_ms",
//! "ttl_ms","instances":[{"service","version","id","address","capacity","weight","state",
//! "age_ms","last_heartbeat_ms_ago","labels"}]}`.

use std::sync::Arc;

use std::collections::BTreeMap;

use http::{Method, StatusCode};
use serde::Serialize;
use tokio::time::Instant;
use usher_shared::admin::{refuse, AdminHandler, AdminResponse};

use crate::autoscaler::{PinError, VersionStatus};
use crate::registry::Registry;

/// Answers one admin request: `/healthz` 200 `ok`, `/v1/routes` JSON, other methods on those
/// paths 405, anything else 404.
pub fn respond(registry: &Registry, method: &Method, path: &str) -> AdminResponse {
    if let Some(pin) = path.strip_prefix("/v1/pins/") {
        return pins(registry, method, pin);
    }
    if let Some(refusal) = refuse(method, path, &["/healthz", "/v1/routes", "/v1/services"]) {
        return refusal;
    }
    match path {
        "/healthz" => AdminResponse::text(StatusCode::OK, "ok\n"),
        "/v1/services" => AdminResponse::json(&services(registry, Instant::now())),
        _ => AdminResponse::json(&registry.report(Instant::now(), usher_shared::unix_millis())),
    }
}

/// `PUT /v1/pins/SERVICE[.VERSION]/N` pins a managed version's target at N instances;
/// `DELETE /v1/pins/SERVICE[.VERSION]` hands it back to the autoscaler.
fn pins(registry: &Registry, method: &Method, rest: &str) -> AdminResponse {
    let status = registry.autoscale();
    let result = match (method, rest.split_once('/')) {
        (&Method::PUT, Some((target, count))) => match count.parse::<u32>() {
            Ok(n) => status
                .pin(target, n)
                .map(|(s, v)| format!("{s}/{v} pinned at {n} instances\n")),
            Err(_) => {
                return AdminResponse::text(
                    StatusCode::BAD_REQUEST,
                    format!("{count:?} is not a number of instances\n"),
                )
            }
        },
        (&Method::DELETE, None) => status
            .unpin(rest)
            .map(|(s, v)| format!("{s}/{v} is scaled by the autoscaler again\n")),
        _ => {
            return AdminResponse::text(
                StatusCode::METHOD_NOT_ALLOWED,
                "PUT /v1/pins/SERVICE[.VERSION]/N or DELETE /v1/pins/SERVICE[.VERSION]\n",
            )
        }
    };
    match result {
        Ok(text) => AdminResponse::text(StatusCode::OK, text),
        Err(e @ PinError::NotManaged(_)) => {
            AdminResponse::text(StatusCode::NOT_FOUND, format!("{e}\n"))
        }
        Err(e) => AdminResponse::text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

/// One service version in `GET /v1/services`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServiceReport {
    pub service: String,
    pub version: String,
    /// Instances in the route table, and how many of them are `up`.
    pub instances: u32,
    pub up: u32,
    pub in_flight: u64,
    pub queued: u64,
    pub outstanding: u64,
    /// Sidecars whose current load report names this version.
    pub sidecars: u32,
    /// In-flight requests per instance id, summed over sidecars (idle instances left out).
    pub busy: BTreeMap<String, u64>,
    /// For a version the directory scales: its target, ideal, started instances, scheduler
    /// and latest decisions with their reasons; `null` otherwise.
    pub scaling: Option<VersionStatus>,
}

/// The body of `GET /v1/services`.
#[derive(Debug, Clone, Serialize)]
pub struct ServicesReport {
    pub services: Vec<ServiceReport>,
}

/// Every service version in the table or in a load report, with its instances and load.
pub fn services(registry: &Registry, now: Instant) -> ServicesReport {
    let mut by_version: BTreeMap<(String, String), ServiceReport> = BTreeMap::new();
    for instance in registry.table().instances() {
        let r = version_entry(&mut by_version, &instance.service, &instance.version);
        r.instances += 1;
        r.up += u32::from(instance.state.routable());
    }
    for ((service, version), totals) in registry.load().totals(now) {
        let r = version_entry(&mut by_version, &service, &version);
        r.in_flight = totals.in_flight;
        r.queued = totals.queued;
        r.outstanding = totals.outstanding();
        r.sidecars = totals.sidecars;
        r.busy = totals.busy;
    }
    for (service, version) in registry.autoscale().managed() {
        let status = registry.autoscale().get(&service, &version);
        version_entry(&mut by_version, &service, &version).scaling = status;
    }
    ServicesReport {
        services: by_version.into_values().collect(),
    }
}

fn version_entry<'a>(
    map: &'a mut BTreeMap<(String, String), ServiceReport>,
    service: &str,
    version: &str,
) -> &'a mut ServiceReport {
    map.entry((service.to_string(), version.to_string()))
        .or_insert_with(|| ServiceReport {
            service: service.to_string(),
            version: version.to_string(),
            ..ServiceReport::default()
        })
}
/// The handler given to [`usher_shared::admin::serve`].
pub fn handler(registry: Arc<Registry>) -> AdminHandler {
    Arc::new(move |method, path| respond(&registry, method, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Settings;
    use std::time::Duration;

    #[test]
    fn endpoints() {
        let registry = Registry::new(Settings {
            epoch: 5,
            heartbeat_interval: Duration::from_secs(1),
            ttl: Duration::from_secs(3),
            grace_period: Duration::from_secs(6),
            started: Instant::now(),
        });
        let ok = respond(&registry, &Method::GET, "/healthz");
        assert_eq!((ok.status, &ok.body[..]), (StatusCode::OK, &b"ok\n"[..]));
        let routes = respond(&registry, &Method::GET, "/v1/routes");
        let doc: serde_json::Value = serde_json::from_slice(&routes.body).unwrap();
        assert_eq!(doc["epoch"], 5);
        assert_eq!(doc["in_grace_period"], true);
        assert!(doc["instances"].as_array().unwrap().is_empty());
        assert_eq!(
            respond(&registry, &Method::POST, "/v1/routes").status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            respond(&registry, &Method::GET, "/nope").status,
            StatusCode::NOT_FOUND
        );
    }
}
