//! The directory's admin endpoints: `GET /healthz` and `GET /v1/routes`.
//!
//! `/v1/routes` answers `{"epoch","revision","in_grace_period","heartbeat_interval_ms",
//! "ttl_ms","instances":[{"service","version","id","address","capacity","weight","state",
//! "age_ms","last_heartbeat_ms_ago","labels"}]}`.

use std::sync::Arc;

use http::{Method, StatusCode};
use tokio::time::Instant;
use usher_shared::admin::{refuse, AdminHandler, AdminResponse};

use crate::registry::Registry;

/// Answers one admin request: `/healthz` 200 `ok`, `/v1/routes` JSON, other methods on those
/// paths 405, anything else 404.
pub fn respond(registry: &Registry, method: &Method, path: &str) -> AdminResponse {
    if let Some(refusal) = refuse(method, path, &["/healthz", "/v1/routes"]) {
        return refusal;
    }
    match path {
        "/healthz" => AdminResponse::text(StatusCode::OK, "ok\n"),
        _ => AdminResponse::json(&registry.report(Instant::now(), usher_shared::unix_millis())),
    }
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
