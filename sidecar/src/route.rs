//! Which service version a request is for: plain code over the request's target and the route
//! table, tested without sockets (Waiter: the router determines the service, then reserves).
//!
//! The host comes from an absolute-form request URI (`http_proxy=http://127.0.0.1:7410`) or
//! else the `Host` header; a port is ignored. `web` is the newest version of `web` that has
//! `up` instances (natural order, `v2 < v10`); `v2.web` is version `v2`. The decision is
//! precomputed per route table ([`RouteIndex`]), not per request.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use thiserror::Error;
use usher_shared::names::validate_label;
use usher_shared::routes::compare_versions;

use crate::reserver::{Reserver, SyncedVersion};
use usher_shared::FastHash;

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

/// The host a request names, lowercased and without port or trailing dot; borrowed from the
/// request unless it had to be lowercased. `authority` is an absolute-form target's authority
/// (`web:8080` of `http://web:8080/x`, which wins over the header, RFC 9112 §3.2.2), else
/// `host_header` is the `Host` field's value.
pub fn request_host<'a>(
    authority: Option<&'a str>,
    host_header: Option<&'a [u8]>,
) -> Result<Cow<'a, str>, RouteError> {
    let raw = match authority {
        // `user@host:port`: the host is after the last `@`.
        Some(authority) => strip_port(authority.rsplit('@').next().unwrap_or(authority)),
        None => {
            let value = host_header.ok_or(RouteError::MissingHost)?;
            let value = std::str::from_utf8(value)
                .map_err(|_| RouteError::BadHost(String::from_utf8_lossy(value).into()))?;
            strip_port(value.trim())
        }
    };
    let host = raw.trim_end_matches('.');
    if host.is_empty() {
        return Err(RouteError::MissingHost);
    }
    Ok(if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    })
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

/// The routing decision precomputed for one route table, so a request costs one hash lookup
/// and no allocation: per service, its versions newest first (natural order, see
/// [`compare_versions`]) with their reservers, and the version plain `Host: <service>` goes
/// to (Waiter's fallback: the newest version with a routable instance, else the newest).
/// Rebuilt by the replica whenever the table changes.
#[derive(Debug, Default)]
pub struct RouteIndex {
    services: HashMap<String, ServiceRoutes, FastHash>,
}

#[derive(Debug)]
struct ServiceRoutes {
    /// Newest first; never empty.
    versions: Vec<(String, Arc<Reserver>)>,
    /// Index into `versions` of the version plain `<service>` routes to.
    default: usize,
}

impl RouteIndex {
    /// The index of the versions [`crate::reserver::Reservers::sync`] returned for a table.
    pub fn new(synced: Vec<SyncedVersion>) -> Self {
        let mut by_service: HashMap<String, Vec<SyncedVersion>> = HashMap::new();
        for version in synced {
            by_service
                .entry(version.service.clone())
                .or_default()
                .push(version);
        }
        let services = by_service
            .into_iter()
            .map(|(service, mut versions)| {
                versions.sort_by(|a, b| compare_versions(&b.version, &a.version));
                let default = versions.iter().position(|v| v.routable).unwrap_or(0);
                let versions = versions
                    .into_iter()
                    .map(|v| (v.version, v.reserver))
                    .collect();
                (service, ServiceRoutes { versions, default })
            })
            .collect();
        Self { services }
    }

    /// The reserver of the service version `host` names: `<service>` or
    /// `<version>.<service>`. Errors: a host that is not DNS labels (400), an unknown service
    /// or version (404).
    pub fn decide(&self, host: &str) -> Result<&Arc<Reserver>, RouteError> {
        let (version, service) = match host.split_once('.') {
            None => (None, host),
            Some((version, service)) => (Some(version), service),
        };
        let bad = || RouteError::BadHost(host.to_string());
        validate_label(service).map_err(|_| bad())?;
        if let Some(version) = version {
            validate_label(version).map_err(|_| bad())?;
        }
        let routes = self
            .services
            .get(service)
            .ok_or_else(|| RouteError::UnknownService(service.to_string()))?;
        match version {
            None => Ok(&routes.versions[routes.default].1),
            Some(version) => routes
                .versions
                .iter()
                .find(|(v, _)| v == version)
                .map(|(_, reserver)| reserver)
                .ok_or_else(|| RouteError::UnknownVersion {
                    service: service.to_string(),
                    version: version.to_string(),
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reserver::Reservers;
    use std::collections::BTreeMap;
    use usher_shared::routes::{Change, Instance, InstanceState, RouteTable, ServiceVersion};

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

    fn host(authority: Option<&str>, host: Option<&str>) -> Result<String, RouteError> {
        request_host(authority, host.map(str::as_bytes)).map(|h| h.into_owned())
    }

    /// The service version `host` routes to over `table`.
    fn decide(host: &str, t: &RouteTable) -> Result<ServiceVersion, RouteError> {
        let index = RouteIndex::new(Reservers::default().sync(t));
        index.decide(host).map(|r| ServiceVersion {
            service: r.service().into(),
            version: r.version().into(),
        })
    }

    #[test]
    fn host_comes_from_the_absolute_uri_or_the_header() {
        assert_eq!(host(None, Some("web")).unwrap(), "web");
        assert_eq!(host(None, Some("Web:7410")).unwrap(), "web");
        assert_eq!(host(None, Some("v2.web.")).unwrap(), "v2.web");
        assert_eq!(host(Some("web"), Some("other")).unwrap(), "web");
        assert_eq!(host(Some("web:8080"), None).unwrap(), "web");
        assert_eq!(host(Some("user@web:8080"), None).unwrap(), "web");
        assert_eq!(host(None, None), Err(RouteError::MissingHost));
        assert_eq!(host(None, Some("")), Err(RouteError::MissingHost));
        assert!(matches!(
            request_host(None, Some(b"\xffweb")),
            Err(RouteError::BadHost(_))
        ));
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
