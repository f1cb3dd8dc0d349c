//! What the sidecar counts, and `GET /metrics` on its admin port (Prometheus text, prefix
//! `usher_sidecar_`).
//!
//! The request path counts with one relaxed atomic add per request into counters it already
//! holds: a version's [`VersionCounters`] live in its [`Reserver`], the proxy's
//! [`ProxyCounters`] in the proxy. Everything else is read at scrape time from the replica
//! and the reservers:
//!
//! - `route_table_revision`, `route_table_epoch`, `route_table_source{source}` (1 for
//!   `directory`|`disk`|`none`), `directory_connected` (0/1);
//! - per `{service,version}`: `requests_total{outcome}` with outcome `answered` (the instance
//!   answered, whatever its status; a body cut short afterwards counts here too),
//!   `unavailable` (`503`: no instance in time, or the queue was full), `instance_failure`
//!   (`502`), `instance_timeout` (`504`), `client_failed` (the client went away or broke its
//!   body's framing before the answer); `instance_failures_total` (attempts that
//!   failed and ejected their instance, whether or not a retry then answered);
//!   `in_flight_requests`, `queued_requests`, `ejected_instances` (Waiter: ejected after a
//!   failure, 10 s doubling to 300 s). Per version, not per instance: every sidecar of a fleet
//!   exports these, and `GET /v1/routes` has the per-instance detail;
//! - for the whole proxy: `unrouted_requests_total{code}` (answered by the sidecar before a
//!   version was chosen: `400` bad head or host, `404` unknown service or version, `431`,
//!   `501`), `client_connections` open now, `client_connections_accepted_total` and
//!   `client_connections_refused_total` (over `--max-connections`), `tunnels` open now and
//!   `tunnels_opened_total` (WebSockets and other protocols switched to by a `101`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use usher_shared::admin::AdminResponse;
use usher_shared::metrics::{flag, gauge_value, one, Labels, Scrape};

use crate::replica::{Replica, Source};
use crate::reserver::Reserver;

/// How a request routed to a service version ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The instance's response head came and was relayed, whatever its status (a body cut
    /// short afterwards by either side counts here too).
    Answered,
    /// `503`: no instance free within the queue timeout, or the queue was full.
    Unavailable,
    /// `502`: every attempt failed.
    InstanceFailure,
    /// `504`: no response head within the instance timeout.
    InstanceTimeout,
    /// The client closed, or broke its body's chunked framing, before the response.
    ClientFailed,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Answered,
        Outcome::Unavailable,
        Outcome::InstanceFailure,
        Outcome::InstanceTimeout,
        Outcome::ClientFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Unavailable => "unavailable",
            Outcome::InstanceFailure => "instance_failure",
            Outcome::InstanceTimeout => "instance_timeout",
            Outcome::ClientFailed => "client_failed",
        }
    }
}

/// One service version's request counters, since its reserver was created.
#[derive(Debug, Default)]
pub struct VersionCounters {
    outcomes: [AtomicU64; Outcome::ALL.len()],
    instance_failures: AtomicU64,
}

impl VersionCounters {
    /// Counts a request that ended with `outcome`.
    pub fn ended(&self, outcome: Outcome) {
        self.outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an attempt that failed and ejected its instance.
    pub fn instance_failed(&self) {
        self.instance_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests that ended with `outcome`.
    pub fn outcome(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome as usize].load(Ordering::Relaxed)
    }

    pub fn instance_failures(&self) -> u64 {
        self.instance_failures.load(Ordering::Relaxed)
    }
}

/// One version's load now, from its reserver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionGauges {
    /// Slots in use over its instances.
    pub in_flight: u64,
    /// Requests waiting for a free slot.
    pub queued: u64,
    /// Instances ejected now.
    pub ejected: u64,
}

/// What the proxy counts outside any service version.
#[derive(Debug, Default)]
pub struct ProxyCounters {
    /// Requests answered by the sidecar before a version was chosen, by status code.
    unrouted: Mutex<BTreeMap<u16, u64>>,
    accepted: AtomicU64,
    closed: AtomicU64,
    refused: AtomicU64,
    tunnels_opened: AtomicU64,
    tunnels_closed: AtomicU64,
}

impl ProxyCounters {
    /// Counts a request answered `status` by the sidecar itself (a bad head or host, an
    /// unknown service): never on a request that reaches an instance.
    pub fn unrouted(&self, status: u16) {
        let mut unrouted = self.unrouted.lock().unwrap_or_else(|p| p.into_inner());
        *unrouted.entry(status).or_default() += 1;
    }

    /// Counts an accepted client connection; it counts as open until the guard drops.
    pub fn accepted(&self) -> Open<'_> {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        Open(&self.closed)
    }

    /// Counts a tunnel opened by a `101` (a WebSocket); it counts as open until the guard
    /// drops.
    pub fn tunnel_opened(&self) -> Open<'_> {
        self.tunnels_opened.fetch_add(1, Ordering::Relaxed);
        Open(&self.tunnels_closed)
    }

    /// Counts a client connection closed at once for `--max-connections`.
    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }
}

/// Something counted open (a client connection, a tunnel): dropping it counts it closed.
pub struct Open<'a>(&'a AtomicU64);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// How many are open now of those opened and closed (read apart, so never below zero).
fn open_now(opened: &AtomicU64, closed: &AtomicU64) -> (u64, i64) {
    let opened = opened.load(Ordering::Relaxed);
    let closed = closed.load(Ordering::Relaxed);
    (opened, gauge_value(opened.saturating_sub(closed)))
}

fn version_labels(r: &Reserver) -> Labels {
    vec![
        ("service", r.service().to_string()),
        ("version", r.version().to_string()),
    ]
}

/// The body of `GET /metrics`.
pub fn scrape(replica: &Replica, proxy: &ProxyCounters) -> AdminResponse {
    let (epoch, revision) = replica.held();
    let source = replica.source();
    let mut m = Scrape::new("usher_sidecar");
    m.gauge(
        "route_table_revision",
        "The revision of the route table this sidecar routes with",
        one(gauge_value(revision)),
    );
    m.gauge(
        "route_table_epoch",
        "The epoch of that table (0 before the first table)",
        one(gauge_value(epoch.unwrap_or(0))),
    );
    m.gauge(
        "route_table_source",
        "1 for where the table came from: directory, disk (persisted, directory not reached yet) or none",
        [Source::Directory, Source::Disk, Source::None].map(|s| {
            (
                vec![("source", s.as_str().to_string())],
                flag(s == source),
            )
        }),
    );
    m.gauge(
        "directory_connected",
        "1 while the sidecar follows the directory's feed",
        one(flag(replica.connected())),
    );

    let reservers = replica.reservers().all();
    m.counter(
        "requests",
        "Requests routed to a service version, by how they ended",
        reservers.iter().flat_map(|r| {
            Outcome::ALL.map(|o| {
                let mut labels = version_labels(r);
                labels.push(("outcome", o.as_str().to_string()));
                (labels, r.counters().outcome(o))
            })
        }),
    );
    m.counter(
        "instance_failures",
        "Attempts that failed and ejected their instance (a retry may still have answered)",
        reservers
            .iter()
            .map(|r| (version_labels(r), r.counters().instance_failures())),
    );
    let gauges: Vec<(Labels, VersionGauges)> = reservers
        .iter()
        .map(|r| (version_labels(r), r.gauges()))
        .collect();
    let per_version = |value: fn(&VersionGauges) -> u64| {
        gauges
            .iter()
            .map(move |(labels, g)| (labels.clone(), gauge_value(value(g))))
    };
    m.gauge(
        "in_flight_requests",
        "Requests in flight at the version's instances (their reserved slots)",
        per_version(|g| g.in_flight),
    );
    m.gauge(
        "queued_requests",
        "Requests waiting for a free instance",
        per_version(|g| g.queued),
    );
    m.gauge(
        "ejected_instances",
        "Instances ejected now after a failure (Waiter: 10 s doubling to 300 s)",
        per_version(|g| g.ejected),
    );

    let unrouted = proxy
        .unrouted
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    m.counter(
        "unrouted_requests",
        "Requests the sidecar answered itself before choosing a version (bad head or host, unknown service), by status code",
        unrouted
            .into_iter()
            .map(|(code, n)| (vec![("code", code.to_string())], n)),
    );
    let (accepted, open) = open_now(&proxy.accepted, &proxy.closed);
    m.gauge(
        "client_connections",
        "Client connections open now",
        one(open),
    );
    m.counter(
        "client_connections_accepted",
        "Client connections accepted",
        one(accepted),
    );
    m.counter(
        "client_connections_refused",
        "Client connections closed at once because --max-connections were open",
        one(proxy.refused.load(Ordering::Relaxed)),
    );
    let (opened, open) = open_now(&proxy.tunnels_opened, &proxy.tunnels_closed);
    m.gauge(
        "tunnels",
        "Tunnels open now (connections switched to another protocol by a 101, WebSockets)",
        one(open),
    );
    m.counter(
        "tunnels_opened",
        "Tunnels opened (a 101 relayed)",
        one(opened),
    );
    m.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn connections_and_unrouted_requests() {
        let replica = Replica::new(Arc::default());
        let counters = ProxyCounters::default();
        let first = counters.accepted();
        {
            let _second = counters.accepted();
        }
        counters.refused();
        counters.unrouted(404);
        counters.unrouted(404);
        counters.unrouted(431);
        let body = scrape(&replica, &counters).body;
        let text = std::str::from_utf8(&body).unwrap();
        for line in [
            "usher_sidecar_client_connections 1",
            "usher_sidecar_client_connections_accepted_total 2",
            "usher_sidecar_client_connections_refused_total 1",
            r#"usher_sidecar_unrouted_requests_total{code="404"} 2"#,
            r#"usher_sidecar_unrouted_requests_total{code="431"} 1"#,
            r#"usher_sidecar_route_table_source{source="none"} 1"#,
            "usher_sidecar_route_table_epoch 0",
        ] {
            assert!(
                text.contains(&format!("\n{line}\n")),
                "{line} not in\n{text}"
            );
        }
        drop(first);
        let body = scrape(&replica, &counters).body;
        let text = std::str::from_utf8(&body).unwrap();
        assert!(
            text.contains("\nusher_sidecar_client_connections 0\n"),
            "{text}"
        );
    }

    #[test]
    fn version_outcomes() {
        let counters = VersionCounters::default();
        counters.ended(Outcome::Answered);
        counters.ended(Outcome::Answered);
        counters.ended(Outcome::InstanceTimeout);
        counters.instance_failed();
        let got: Vec<u64> = Outcome::ALL.iter().map(|&o| counters.outcome(o)).collect();
        assert_eq!(got, [2, 0, 0, 1, 0]);
        assert_eq!(counters.instance_failures(), 1);
    }
}
