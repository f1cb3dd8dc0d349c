//! The directory's admin endpoints: `GET /healthz`, `GET /v1/routes`, `GET /v1/services`,
//! `GET /v1/security`, `GET /metrics` (Prometheus text, [`crate::metrics`]), the pins, the
//! join tokens, and the dashboard (`GET /`, [`crate::dashboard`]).
//!
//! Authorisation: every request that changes something (`PUT`/`DELETE /v1/pins/...`) and every
//! `/v1/tokens` request needs `Authorization: Bearer <admin token>` (the content of the admin
//! token file, `admin-token` in the state directory by default); when the admin port is bound
//! to a non-loopback address, every request but `GET /healthz` and the dashboard's assets
//! (which hold no data) needs it. A missing or wrong token gets `401`,
//! is logged and counted (`admin_refused` in `/v1/security`).
//!
//! Tokens: `POST /v1/tokens?role=agent&service=NAME&ttl=24h` (or `role=sidecar`) answers
//! `{"token","id","role","service","created_ms","expires_ms",...}`; `GET /v1/tokens` answers
//! `{"tokens":[{"id","role","service","created_ms","expires_ms","revoked","expired","uses"}]}`;
//! `DELETE /v1/tokens/ID` revokes and answers the token's entry.
//!
//! `/v1/security` answers the counters of [`crate::authz::SecurityReport`].
//!
//! `/v1/services` answers `{"services":[{"service","version","instances","up","in_flight",
//! "queued","outstanding","sidecars","scaling"}]}`: per service version its instances, the
//! load the sidecars report (outstanding = in-flight + queued, the autoscaler's signal) and,
//! for versions the directory scales, `scaling`: `{"target","ideal","started","scheduler",
//! "decisions":[{"at_ms","from","to","outstanding","reasons"}]}`.
//!
//! `/v1/routes` answers `{"epoch","revision","in_grace_period","heartbeat_interval_ms",
//! "ttl_ms","instances":[{"service","version","id","address","capacity","weight","state",
//! "age_ms","last_heartbeat_ms_ago","withdrawal_held","labels"}]}`: `withdrawal_held` marks an
//! instance whose TTL lapsed while self-preservation holds withdrawals.

use std::sync::Arc;

use std::collections::BTreeMap;

use http::{Method, StatusCode};
use serde::Serialize;
use tokio::time::Instant;
use usher_shared::admin::{refuse, AdminHandler, AdminResponse};

use usher_shared::admin::AdminRequest;
use usher_shared::identity::NodeIdentity;
use usher_shared::protocol::Role;

use crate::authz::Security;
use crate::autoscaler::{PinError, VersionStatus};
use crate::registry::Registry;
use crate::tokens::{TokenError, TokenStore, TokenView, DEFAULT_TTL};

/// What the admin API needs besides the registry.
#[derive(Debug)]
pub struct AdminContext {
    pub registry: Arc<Registry>,
    pub security: Arc<Security>,
    pub tokens: Arc<TokenStore>,
    /// The bearer token mutations need (the admin token file's content, trimmed).
    pub admin_token: String,
    /// Whether reads need the token too (the admin port is not on loopback).
    pub protect_reads: bool,
}

impl AdminContext {
    fn authorized(&self, req: &AdminRequest<'_>) -> bool {
        req.bearer().is_some_and(|t| {
            usher_shared::identity::secrets_equal(t.as_bytes(), self.admin_token.as_bytes())
        })
    }
}

/// Answers one admin request, checking the bearer token first (see the module docs).
pub fn respond_secured(ctx: &AdminContext, req: &AdminRequest<'_>) -> AdminResponse {
    let read = req.method == Method::GET || req.method == Method::HEAD;
    let tokens = req.path == "/v1/tokens" || req.path.starts_with("/v1/tokens/");
    // A health check tells nothing worth protecting, and load balancers cannot send tokens;
    // the dashboard's page and assets hold no data (its script sends the token for the data).
    let public = read && (req.path == "/healthz" || crate::dashboard::is_asset(req.path));
    if ((ctx.protect_reads && !public) || !read || tokens) && !ctx.authorized(req) {
        ctx.security
            .admin_refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(method = %req.method, path = req.path, "admin request refused: no valid bearer token");
        return AdminResponse::text(
            StatusCode::UNAUTHORIZED,
            "this request needs `Authorization: Bearer <admin token>` (the directory's admin token file)\n",
        );
    }
    if tokens {
        return token_request(ctx, req);
    }
    if req.path == "/v1/security" || req.path == "/metrics" {
        if let Some(refusal) = refuse(req.method, req.path, &[req.path]) {
            return refusal;
        }
        return match req.path {
            "/metrics" => crate::metrics::scrape(ctx, Instant::now()),
            _ => AdminResponse::json(&ctx.security.report()),
        };
    }
    respond(&ctx.registry, req.method, req.path)
}

/// The body of `POST /v1/tokens`: the token text (shown once) and its entry.
#[derive(Debug, Serialize)]
pub struct CreatedToken {
    pub token: String,
    #[serde(flatten)]
    pub entry: TokenView,
}

fn token_request(ctx: &AdminContext, req: &AdminRequest<'_>) -> AdminResponse {
    let now = usher_shared::unix_millis();
    let bad = |message: String| AdminResponse::text(StatusCode::BAD_REQUEST, message + "\n");
    match (req.method, req.path.strip_prefix("/v1/tokens/")) {
        (&Method::GET, None) => {
            AdminResponse::json(&serde_json::json!({ "tokens": ctx.tokens.list(now) }))
        }
        (&Method::POST, None) => {
            let role = match req.query_value("role") {
                Some("agent") => Role::Agent,
                Some("sidecar") => Role::Sidecar,
                other => return bad(format!("role {other:?}: must be agent or sidecar")),
            };
            let identity = match NodeIdentity::new(role, req.query_value("service")) {
                Ok(identity) => identity,
                Err(e) => return bad(format!("{e} (service: --service NAME for agents only)")),
            };
            let ttl = match req.query_value("ttl") {
                None => DEFAULT_TTL,
                Some(ttl) => match humantime::parse_duration(ttl) {
                    Ok(ttl) => ttl,
                    Err(e) => return bad(format!("ttl {ttl:?}: {e}")),
                },
            };
            match ctx.tokens.create(&identity, ttl, now) {
                Ok((entry, token)) => {
                    tracing::info!(id = %entry.id, %identity, ttl = ?ttl, "join token created");
                    AdminResponse::json(&CreatedToken {
                        token: token.to_string(),
                        entry,
                    })
                }
                Err(e @ TokenError::Invalid(_)) => bad(e.to_string()),
                Err(e) => AdminResponse::text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        (&Method::DELETE, Some(id)) => match ctx.tokens.revoke(id, now) {
            Ok(entry) => {
                tracing::info!(id, "join token revoked");
                AdminResponse::json(&entry)
            }
            Err(e @ TokenError::NotFound(_)) => {
                AdminResponse::text(StatusCode::NOT_FOUND, format!("{e}\n"))
            }
            Err(e) => AdminResponse::text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        _ => AdminResponse::text(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET /v1/tokens, POST /v1/tokens?role=..., DELETE /v1/tokens/ID\n",
        ),
    }
}

/// Answers one admin request: `/healthz` 200 `ok`, `/v1/routes` and `/v1/services` JSON, the
/// dashboard's assets ([`crate::dashboard`]), the pins; other methods on those paths 405,
/// anything else 404.
pub fn respond(registry: &Registry, method: &Method, path: &str) -> AdminResponse {
    if let Some(pin) = path.strip_prefix("/v1/pins/") {
        return pins(registry, method, pin);
    }
    const ENDPOINTS: [&str; 3] = ["/healthz", "/v1/routes", "/v1/services"];
    if !ENDPOINTS.contains(&path) && !crate::dashboard::is_asset(path) {
        return AdminResponse::not_found(path);
    }
    if let Some(refusal) = refuse(method, path, &[path]) {
        return refusal;
    }
    match path {
        "/healthz" => AdminResponse::text(StatusCode::OK, "ok\n"),
        "/v1/services" => AdminResponse::json(&services(registry, Instant::now())),
        "/v1/routes" => {
            AdminResponse::json(&registry.report(Instant::now(), usher_shared::unix_millis()))
        }
        _ => crate::dashboard::asset(path).unwrap_or_else(|| AdminResponse::not_found(path)),
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
    for count in registry.version_counts() {
        let r = version_entry(&mut by_version, &count.service, &count.version);
        r.instances = count.instances;
        r.up = count.routable;
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
pub fn handler(ctx: Arc<AdminContext>) -> AdminHandler {
    Arc::new(move |req| respond_secured(&ctx, req))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preservation::PreservationSettings;
    use crate::registry::Settings;
    use std::time::Duration;

    /// A registry of epoch 5 in its grace period, heartbeat 1 s.
    fn registry() -> Registry {
        let interval = Duration::from_secs(1);
        Registry::new(Settings {
            epoch: 5,
            heartbeat_interval: interval,
            ttl: interval * 3,
            silent_stream_timeout: interval * 6,
            grace_period: interval * 6,
            started: Instant::now(),
            preservation: PreservationSettings::off(),
        })
    }

    #[test]
    fn endpoints() {
        let registry = registry();
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

    fn context(dir: &std::path::Path, protect_reads: bool) -> AdminContext {
        AdminContext {
            registry: Arc::new(registry()),
            security: Arc::default(),
            tokens: Arc::new(TokenStore::open(dir, &"a".repeat(64)).unwrap()),
            admin_token: "s3cret".into(),
            protect_reads,
        }
    }

    fn req<'a>(
        method: &'a Method,
        path: &'a str,
        query: &'a str,
        authorization: Option<&'a str>,
    ) -> AdminRequest<'a> {
        AdminRequest {
            method,
            path,
            query,
            authorization,
        }
    }

    /// Off loopback every read needs the token, but the health check and the dashboard's
    /// assets (no data in them) do not; the data the dashboard's script reads does.
    #[test]
    fn protected_reads_leave_health_and_dashboard_assets_open() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path(), true);
        let status = |path, auth| respond_secured(&ctx, &req(&Method::GET, path, "", auth)).status;
        for open in [
            "/healthz",
            "/",
            "/dashboard",
            "/dashboard.js",
            "/dashboard.css",
        ] {
            assert_eq!(status(open, None), StatusCode::OK, "{open}");
        }
        for data in ["/v1/routes", "/v1/services", "/v1/security", "/metrics"] {
            assert_eq!(status(data, None), StatusCode::UNAUTHORIZED, "{data}");
            assert_eq!(
                status(data, Some("Bearer s3cret")),
                StatusCode::OK,
                "{data}"
            );
        }
        let page = respond_secured(&ctx, &req(&Method::GET, "/", "", None));
        assert!(page.content_type.starts_with("text/html"));
        // The page's assets answer GET only, and a write still needs the token first.
        let post = |auth| respond_secured(&ctx, &req(&Method::POST, "/", "", auth)).status;
        assert_eq!(post(None), StatusCode::UNAUTHORIZED);
        assert_eq!(post(Some("Bearer s3cret")), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[test]
    fn mutations_and_tokens_need_the_bearer_token() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path(), false);
        let status = |r: AdminRequest<'_>| respond_secured(&ctx, &r).status;
        assert_eq!(
            status(req(&Method::GET, "/healthz", "", None)),
            StatusCode::OK
        );
        assert_eq!(
            status(req(&Method::PUT, "/v1/pins/web/2", "", None)),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status(req(&Method::GET, "/v1/tokens", "", Some("Bearer wrong"))),
            StatusCode::UNAUTHORIZED
        );
        let auth = Some("Bearer s3cret");
        assert_eq!(
            status(req(
                &Method::POST,
                "/v1/tokens",
                "role=sidecar&service=web",
                auth
            )),
            StatusCode::BAD_REQUEST
        );
        let created = respond_secured(
            &ctx,
            &req(
                &Method::POST,
                "/v1/tokens",
                "role=agent&service=web&ttl=1h",
                auth,
            ),
        );
        assert_eq!(created.status, StatusCode::OK);
        let doc: serde_json::Value = serde_json::from_slice(&created.body).unwrap();
        assert!(doc["token"].as_str().unwrap().starts_with("USHER1-"));
        let security = respond_secured(&ctx, &req(&Method::GET, "/v1/security", "", None));
        let doc: serde_json::Value = serde_json::from_slice(&security.body).unwrap();
        assert_eq!(doc["admin_refused"], 2);
    }
}
