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

#[derive(Debug, Serialize)]
struct InstanceReport {
    service: String,
    version: String,
    id: String,
    address: SocketAddr,
    capacity: u32,
    state: &'static str,
    in_flight: u32,
    ejected: bool,
}

#[derive(Debug, Serialize)]
struct RoutesReport {
    epoch: Option<u64>,
    revision: u64,
    source: &'static str,
    connected: bool,
    instances: Vec<InstanceReport>,
}

fn routes(replica: &Replica) -> RoutesReport {
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
        let second = std::time::Duration::from_secs(1);
        let limits = crate::proxy::Limits {
            queue_timeout: second,
            max_queued: 10,
            instance_timeout: second,
            connect_timeout: second,
            tunnel_idle_timeout: second,
        };
        let proxy = Proxy::new(replica.clone(), limits);
        let respond = |method: &Method, path: &str| super::respond(&replica, &proxy, method, path);
        let ok = respond(&Method::GET, "/healthz");
        assert_eq!(ok.status, StatusCode::OK);
        let doc: serde_json::Value =
            serde_json::from_slice(&respond(&Method::GET, "/v1/routes").body).unwrap();
        assert_eq!(doc["epoch"], serde_json::Value::Null);
        assert_eq!(doc["source"], "none");
        assert_eq!(doc["connected"], false);
        let m = respond(&Method::GET, "/metrics");
        assert_eq!(m.status, StatusCode::OK);
        assert!(std::str::from_utf8(&m.body)
            .unwrap()
            .contains("\nusher_sidecar_directory_connected 0\n"));
        assert_eq!(
            respond(&Method::DELETE, "/v1/routes").status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(respond(&Method::GET, "/x").status, StatusCode::NOT_FOUND);
    }
}
