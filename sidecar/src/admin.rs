//! The sidecar's admin endpoints: `GET /healthz`, `GET /v1/routes` and `GET /metrics`
//! (Prometheus text, [`crate::metrics`]).
//!
//! `/v1/routes` answers `{"epoch": u64 | null, "revision", "source": "directory"|"disk"|"none",
//! "connected", "instances": [{"service","version","id","address","capacity","state",
//! "in_flight","ejected"}]}`: the replica this sidecar routes with, where it came from, and
//! per instance the slots in use and whether it is ejected.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, StatusCode};
use serde::Serialize;
use usher_shared::admin::{refuse, AdminHandler, AdminResponse};

use crate::metrics;
use crate::proxy::Proxy;
use crate::replica::{Replica, Source};

/// One instance in `GET /v1/routes`.
#[derive(Debug, Serialize)]
pub struct InstanceReport {
    pub service: String,
    pub version: String,
    pub id: String,
    pub address: SocketAddr,
    pub capacity: u32,
    pub state: &'static str,
    pub in_flight: u32,
    pub ejected: bool,
}

/// The body of `GET /v1/routes`.
#[derive(Debug, Serialize)]
pub struct RoutesReport {
    pub epoch: Option<u64>,
    pub revision: u64,
    pub source: &'static str,
    pub connected: bool,
    pub instances: Vec<InstanceReport>,
}

/// The replica as `GET /v1/routes` shows it.
pub fn routes(replica: &Replica) -> RoutesReport {
    let table = replica.table();
    let source = replica.source();
    RoutesReport {
        epoch: (source != Source::None).then_some(table.epoch),
        revision: table.revision,
        source: source.as_str(),
        connected: replica.connected(),
        instances: table
            .instances()
            .map(|i| {
                let (in_flight, ejected) = replica.reservers().load_of(&i.key());
                InstanceReport {
                    service: i.service.clone(),
                    version: i.version.clone(),
                    id: i.id.clone(),
                    address: i.address,
                    capacity: i.capacity,
                    state: i.state.as_str(),
                    in_flight,
                    ejected,
                }
            })
            .collect(),
    }
}

/// Answers one admin request: `/healthz` 200 `ok`, `/v1/routes` JSON, `/metrics`
/// Prometheus text, other methods on those paths 405, anything else 404.
pub fn respond(replica: &Replica, proxy: &Proxy, method: &Method, path: &str) -> AdminResponse {
    if let Some(refusal) = refuse(method, path, &["/healthz", "/v1/routes", "/metrics"]) {
        return refusal;
    }
    match path {
        "/healthz" => AdminResponse::text(StatusCode::OK, "ok\n"),
        "/metrics" => metrics::scrape(replica, proxy.counters()),
        _ => AdminResponse::json(&routes(replica)),
    }
}

/// The handler given to [`usher_shared::admin::serve`].
pub fn handler(replica: Arc<Replica>, proxy: Arc<Proxy>) -> AdminHandler {
    Arc::new(move |req| respond(&replica, &proxy, req.method, req.path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let replica = Arc::new(Replica::new(Arc::default()));
        let proxy = Proxy::new(
            replica.clone(),
            crate::proxy::Limits {
                queue_timeout: std::time::Duration::from_secs(1),
                max_queued: 10,
                instance_timeout: std::time::Duration::from_secs(1),
                connect_timeout: std::time::Duration::from_secs(1),
            },
        );
        let respond = |method: &Method, path: &str| super::respond(&replica, &proxy, method, path);
        let ok = respond(&Method::GET, "/healthz");
        assert_eq!(ok.status, StatusCode::OK);
        let doc: serde_json::Value =
            serde_json::from_slice(&respond(&Method::GET, "/v1/routes").body).unwrap();
        assert_eq!(doc["epoch"], serde_json::Value::Null);
        assert_eq!(doc["source"], "none");
        assert_eq!(doc["connected"], false);
        assert_eq!(
            respond(&Method::DELETE, "/v1/routes").status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(respond(&Method::GET, "/x").status, StatusCode::NOT_FOUND);
    }
}
