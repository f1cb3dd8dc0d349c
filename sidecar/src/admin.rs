//! The sidecar's admin endpoints: `GET /healthz` and `GET /v1/routes`.
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

/// Answers one admin request: `/healthz` 200 `ok`, `/v1/routes` JSON, other methods on those
/// paths 405, anything else 404.
pub fn respond(replica: &Replica, method: &Method, path: &str) -> AdminResponse {
    if let Some(refusal) = refuse(method, path, &["/healthz", "/v1/routes"]) {
        return refusal;
    }
    match path {
        "/healthz" => AdminResponse::text(StatusCode::OK, "ok\n"),
        _ => AdminResponse::json(&routes(replica)),
    }
}

/// The handler given to [`usher_shared::admin::serve`].
pub fn handler(replica: Arc<Replica>) -> AdminHandler {
    Arc::new(move |req| respond(&replica, req.method, req.path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let replica = Replica::new(Arc::default());
        let ok = respond(&replica, &Method::GET, "/healthz");
        assert_eq!(ok.status, StatusCode::OK);
        let doc: serde_json::Value =
            serde_json::from_slice(&respond(&replica, &Method::GET, "/v1/routes").body).unwrap();
        assert_eq!(doc["epoch"], serde_json::Value::Null);
        assert_eq!(doc["source"], "none");
        assert_eq!(doc["connected"], false);
        assert_eq!(
            respond(&replica, &Method::DELETE, "/v1/routes").status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            respond(&replica, &Method::GET, "/x").status,
            StatusCode::NOT_FOUND
        );
    }
}
