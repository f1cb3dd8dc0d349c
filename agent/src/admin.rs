//! The agent's admin endpoints: `GET /healthz`, `GET /v1/instance` and `GET /metrics`.
//!
//! `/v1/instance` answers
//! `{"service","version","id","address","state","connected","child_pid"}` where `state` is
//! `starting|up|draining|unknown`, `connected` says whether the instance is registered with
//! the directory right now, and `child_pid` is the supervised process id or `null`.
//!
//! `/metrics` (Prometheus text): `usher_agent_instance_state{service,version,instance,state}`
//! (1 for the current state, 0 for the others) and `usher_agent_directory_connected` (0/1).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{Method, StatusCode};
use serde::Serialize;
use tokio::sync::watch;
use usher_shared::admin::{refuse, AdminHandler, AdminResponse};
use usher_shared::metrics::{flag, one, Scrape};
use usher_shared::routes::InstanceState;

/// What the admin endpoints report, shared with the running agent.
#[derive(Debug, Clone)]
pub struct InstanceStatus {
    pub service: String,
    pub version: String,
    pub id: String,
    pub address: SocketAddr,
    pub state: watch::Receiver<InstanceState>,
    pub connected: Arc<AtomicBool>,
    pub child_pid: Option<u32>,
}

/// The JSON body of `GET /v1/instance`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceReport {
    pub service: String,
    pub version: String,
    pub id: String,
    pub address: SocketAddr,
    pub state: &'static str,
    pub connected: bool,
    pub child_pid: Option<u32>,
}

impl InstanceStatus {
    /// A snapshot for `GET /v1/instance`.
    pub fn report(&self) -> InstanceReport {
        InstanceReport {
            service: self.service.clone(),
            version: self.version.clone(),
            id: self.id.clone(),
            address: self.address,
            state: self.state.borrow().as_str(),
            connected: self.connected.load(Ordering::Relaxed),
            child_pid: self.child_pid,
        }
    }
}

/// `GET /metrics`: the instance's state and whether it is registered.
fn metrics(status: &InstanceStatus) -> AdminResponse {
    let current = *status.state.borrow();
    let mut scrape = Scrape::new("usher_agent");
    scrape.gauge(
        "instance_state",
        "1 for the instance's current state (starting, up, draining, unknown), 0 for the others",
        InstanceState::ALL.map(|state| {
            let labels = vec![
                ("service", status.service.clone()),
                ("version", status.version.clone()),
                ("instance", status.id.clone()),
                ("state", state.as_str().to_string()),
            ];
            (labels, flag(state == current))
        }),
    );
    scrape.gauge(
        "directory_connected",
        "1 while the instance is registered with the directory",
        one(flag(status.connected.load(Ordering::Relaxed))),
    );
    scrape.into_response()
}

/// Answers one admin request: `/healthz` 200 `ok`, `/v1/instance` JSON, `/metrics`
/// Prometheus text, other methods on those paths 405, anything else 404.
pub fn respond(status: &InstanceStatus, method: &Method, path: &str) -> AdminResponse {
    if let Some(refusal) = refuse(method, path, &["/healthz", "/v1/instance", "/metrics"]) {
        return refusal;
    }
    match path {
        "/healthz" => AdminResponse::text(StatusCode::OK, "ok\n"),
        "/metrics" => metrics(status),
        _ => AdminResponse::json(&status.report()),
    }
}

/// The handler for [`usher_shared::admin::serve`].
pub fn handler(status: InstanceStatus) -> AdminHandler {
    Arc::new(move |req| respond(&status, req.method, req.path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let (tx, rx) = watch::channel(InstanceState::Starting);
        let status = InstanceStatus {
            service: "web".into(),
            version: "v1".into(),
            id: "h-web-v1-00000001".into(),
            address: "127.0.0.1:8080".parse().unwrap(),
            state: rx,
            connected: Arc::new(AtomicBool::new(true)),
            child_pid: None,
        };
        let ok = respond(&status, &Method::GET, "/healthz");
        assert_eq!((ok.status, &ok.body[..]), (StatusCode::OK, &b"ok\n"[..]));
        tx.send_replace(InstanceState::Up);
        let r = respond(&status, &Method::GET, "/v1/instance");
        assert_eq!(r.status, StatusCode::OK);
        let json: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "service": "web", "version": "v1", "id": "h-web-v1-00000001",
                "address": "127.0.0.1:8080", "state": "up", "connected": true, "child_pid": null
            })
        );
        let m = respond(&status, &Method::GET, "/metrics");
        assert_eq!(m.status, StatusCode::OK);
        let text = std::str::from_utf8(&m.body).unwrap();
        let labels = r#"service="web",version="v1",instance="h-web-v1-00000001""#;
        assert!(
            text.contains(&format!(
                "usher_agent_instance_state{{{labels},state=\"up\"}} 1\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "usher_agent_instance_state{{{labels},state=\"starting\"}} 0\n"
            )),
            "{text}"
        );
        assert!(
            text.contains("usher_agent_directory_connected 1\n"),
            "{text}"
        );
        assert_eq!(
            respond(&status, &Method::GET, "/nope").status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            respond(&status, &Method::POST, "/v1/instance").status,
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
