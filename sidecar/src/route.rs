//! Which service version a request is for: plain code over the request's target and the route
//! table, tested without sockets (Waiter: the router determines the service, then reserves).
//!
//! The host comes from an absolute-form request URI (`http_proxy=http://127.0.0.1:7410`) or
//! else the `Host` header; a port is ignored. `web` is the newest version of `web` that has
//! `up` instances (natural order, `v2 < v10`); `v2.web` is version `v2`.

use http::header::HOST;
use http::{HeaderMap, Uri};
use thiserror::Error;
use usher_shared::names::validate_label;
use usher_shared::routes::{RouteTable, ServiceVersion};

/// Why a request cannot be routed; each maps to a status and a one-line reason.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RouteError {
    #[error("the request names no host: send Host: <service> or use the sidecar as http_proxy")]
    MissingHost,
    #[error("host {0:?} is not <service> or <version>.<service> (DNS labels)")]
    BadHost(String),
    #[error("unknown service {0:?}")]
    UnknownService(String),
    #[error("unknown version {version:?} of service {service:?}")]
    UnknownVersion { service: String, version: String },
}

impl RouteError {
    /// `400` for a request that names no valid host, `404` for an unknown service or version.
    pub fn status(&self) -> http::StatusCode {
        match self {
            RouteError::MissingHost | RouteError::BadHost(_) => http::StatusCode::BAD_REQUEST,
            _ => http::StatusCode::NOT_FOUND,
        }
    }
}

/// The host a request names, lowercased and without port or trailing dot.
pub fn request_host(uri: &Uri, headers: &HeaderMap) -> Result<String, RouteError> {
    let raw = match uri.authority() {
        Some(authority) => authority.host().to_string(),
        None => {
            let value = headers.get(HOST).ok_or(RouteError::MissingHost)?;
            let value = value.to_str().map_err(|_| {
                RouteError::BadHost(String::from_utf8_lossy(value.as_bytes()).into())
            })?;
            strip_port(value).to_string()
        }
    };
    let host = raw.trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() {
        return Err(RouteError::MissingHost);
    }
    Ok(host)
}

/// `web:7410` → `web`; IPv6 literals (`[::1]:80`) keep their brackets and are refused later.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host;
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Decides the service version for `host` over `table`.
pub fn decide(host: &str, table: &RouteTable) -> Result<ServiceVersion, RouteError> {
    let (version, service) = match host.split_once('.') {
        None => (None, host),
        Some((version, service)) => (Some(version), service),
    };
    let bad = || RouteError::BadHost(host.to_string());
    validate_label(service).map_err(|_| bad())?;
    if let Some(version) = version {
        validate_label(version).map_err(|_| bad())?;
    }
    let versions = table.versions_of(service);
    if versions.is_empty() {
        return Err(RouteError::UnknownService(service.to_string()));
    }
    let chosen = match version {
        Some(version) => versions
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(v, _)| *v)
            .ok_or_else(|| RouteError::UnknownVersion {
                service: service.to_string(),
                version: version.to_string(),
            })?,
        // Newest version with an `up` instance, else the newest (its requests then queue).
        None => {
            versions
                .iter()
                .find(|(_, instances)| instances.iter().any(|i| i.state.routable()))
                .unwrap_or(&versions[0])
                .0
        }
    };
    Ok(ServiceVersion {
        service: service.to_string(),
        version: chosen.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use usher_shared::routes::{Change, Instance, InstanceState};

    fn table(entries: &[(&str, &str, InstanceState)]) -> RouteTable {
        let mut t = RouteTable::new(1);
        for (n, (service, version, state)) in entries.iter().enumerate() {
            t.apply(Change::Upsert(Instance {
                service: service.to_string(),
                version: version.to_string(),
                id: format!("i{n}"),
                address: "127.0.0.1:1".parse().unwrap(),
                capacity: 1,
                weight: 1,
                state: *state,
                started_at_ms: 0,
                labels: BTreeMap::new(),
            }));
        }
        t
    }

    fn host(uri: &str, host: Option<&str>) -> Result<String, RouteError> {
        let mut headers = HeaderMap::new();
        if let Some(h) = host {
            headers.insert(HOST, h.parse().unwrap());
        }
        request_host(&uri.parse().unwrap(), &headers)
    }

    #[test]
    fn host_comes_from_the_absolute_uri_or_the_header() {
        assert_eq!(host("/", Some("web")).unwrap(), "web");
        assert_eq!(host("/", Some("Web:7410")).unwrap(), "web");
        assert_eq!(host("/", Some("v2.web.")).unwrap(), "v2.web");
        assert_eq!(host("http://web/x", Some("other")).unwrap(), "web");
        assert_eq!(host("http://web:8080/x", None).unwrap(), "web");
        assert_eq!(host("/", None), Err(RouteError::MissingHost));
        assert_eq!(host("/", Some("")), Err(RouteError::MissingHost));
    }

    #[test]
    fn plain_service_goes_to_the_newest_version_with_up_instances() {
        use InstanceState::*;
        let t = table(&[
            ("web", "v2", Up),
            ("web", "v10", Starting),
            ("web", "v1", Up),
        ]);
        assert_eq!(decide("web", &t).unwrap().version, "v2");
        let t = table(&[("web", "v2", Up), ("web", "v10", Up)]);
        assert_eq!(decide("web", &t).unwrap().version, "v10");
        let t = table(&[("web", "v2", Starting), ("web", "v10", Draining)]);
        assert_eq!(decide("web", &t).unwrap().version, "v10", "none up: newest");
    }

    #[test]
    fn versions_are_addressable() {
        use InstanceState::*;
        let t = table(&[("web", "v1", Up), ("web", "v2", Up)]);
        assert_eq!(
            decide("v1.web", &t).unwrap(),
            ServiceVersion {
                service: "web".into(),
                version: "v1".into()
            }
        );
        assert!(matches!(
            decide("v9.web", &t),
            Err(RouteError::UnknownVersion { .. })
        ));
    }

    #[test]
    fn unknown_and_bad_hosts() {
        let t = table(&[("web", "v1", InstanceState::Up)]);
        let e = decide("nope", &t).unwrap_err();
        assert_eq!(e.status(), http::StatusCode::NOT_FOUND);
        assert!(e.to_string().contains("nope"));
        for bad in ["bad_host!", "a.b.c", "[::1]", "-web", ".web"] {
            let e = decide(bad, &t).unwrap_err();
            assert_eq!(e.status(), http::StatusCode::BAD_REQUEST, "{bad}: {e}");
        }
    }
}
