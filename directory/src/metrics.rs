//! `GET /metrics` on the directory's admin port (Prometheus text, prefix `usher_directory_`),
//! read from what the JSON endpoints report:
//!
//! - the route table: `epoch`, `route_table_revision`, `published_revision` (the last batch
//!   sent to sidecars), `in_grace_period` (0/1), `subscriptions{encoding}` (open sidecar
//!   subscriptions by feed encoding, `named`|`compact`), `instances_expired_total` (withdrawn
//!   because their TTL lapsed: hosts that died, or agents cut off), `withdrawals_held`
//!   (lapsed instances self-preservation keeps in the table now) and
//!   `self_preservation_holds_total` (times it began holding), `load_reports_total`
//!   (load reports received from sidecars);
//! - per `{service,version}`, as `GET /v1/services`: `instances`, `routable_instances`
//!   (`up`), the sidecars' load reports `in_flight_requests`, `queued_requests`,
//!   `outstanding_requests` (in flight + queued, the autoscaler's signal; WSO2) and
//!   `reporting_sidecars`, and for versions the directory scales `target_instances`,
//!   `ideal_instances`, `started_instances`, `scale_ups_total`, `scale_downs_total` (target
//!   changes) and `scheduler_errors_total` (cycles whose scheduler call failed);
//! - the handshakes, refusals and issuances of `GET /v1/security`:
//!   `handshakes_completed_total`, `handshakes_refused_total`,
//!   `identities_refused_total`, `messages_refused_total`, `certificates_issued_total`,
//!   `joins_refused_total`, `admin_refused_total`.

use tokio::time::Instant;
use usher_shared::admin::AdminResponse;
use usher_shared::codec::Encoding;
use usher_shared::metrics::{flag, gauge_value, one, Labels, Scrape};

use crate::admin::{services, AdminContext, ServiceReport};
use crate::autoscaler::VersionStatus;

fn version_labels(r: &ServiceReport) -> Labels {
    vec![
        ("service", r.service.clone()),
        ("version", r.version.clone()),
    ]
}

/// One sample per version in `versions` that `value` gives a figure for.
fn per_version<'a, T>(
    versions: &'a [ServiceReport],
    value: impl Fn(&ServiceReport) -> Option<T> + 'a,
) -> impl Iterator<Item = (Labels, T)> + 'a {
    versions
        .iter()
        .filter_map(move |r| value(r).map(|v| (version_labels(r), v)))
}

/// One sample per version the directory scales.
fn per_scaled_version<'a, T>(
    versions: &'a [ServiceReport],
    value: impl Fn(&VersionStatus) -> T + 'a,
) -> impl Iterator<Item = (Labels, T)> + 'a {
    per_version(versions, move |r| r.scaling.as_ref().map(&value))
}

/// The body of `GET /metrics`.
pub fn scrape(ctx: &AdminContext, now: Instant) -> AdminResponse {
    let registry = &ctx.registry;
    let counts = registry.counts();
    let mut m = Scrape::new("usher_directory");
    m.gauge(
        "epoch",
        "The route table's epoch (changes when the directory starts with a fresh table)",
        one(gauge_value(counts.epoch)),
    );
    m.gauge(
        "route_table_revision",
        "The route table's revision: changes recorded in this epoch",
        one(gauge_value(counts.revision)),
    );
    m.gauge(
        "published_revision",
        "The revision of the last batch published to sidecars",
        one(gauge_value(counts.published)),
    );
    m.gauge(
        "in_grace_period",
        "1 while the directory is within its grace period after starting (sidecars holding an earlier table keep it while agents register again)",
        one(flag(registry.in_grace_period(now))),
    );
    m.gauge(
        "subscriptions",
        "Sidecar subscriptions open now, by feed encoding (named: sidecars of a build before the compact feed)",
        [("named", Encoding::Named), ("compact", Encoding::Compact)].map(|(name, e)| {
            (
                vec![("encoding", name.to_string())],
                gauge_value(*counts.subscribers.get(e)),
            )
        }),
    );
    m.counter(
        "instances_expired",
        "Instances withdrawn because their TTL lapsed",
        one(counts.expired),
    );
    m.gauge(
        "withdrawals_held",
        "Instances whose TTL lapsed but which self-preservation keeps in the table, because too many instances fell silent at once",
        one(gauge_value(counts.held)),
    );
    m.counter(
        "self_preservation_holds",
        "Times self-preservation began holding withdrawals by TTL",
        one(counts.preservation_holds),
    );
    m.counter(
        "load_reports",
        "Load reports received from sidecars (every second from each sidecar with requests in flight or queued, one more when it has none left)",
        one(registry.load().recorded()),
    );

    let versions = services(registry, now).services;
    let count = |n: u64| Some(gauge_value(n));
    m.gauge(
        "instances",
        "Instances in the route table",
        per_version(&versions, |r| count(r.instances.into())),
    );
    m.gauge(
        "routable_instances",
        "Instances in the route table that are up (routed to)",
        per_version(&versions, |r| count(r.up.into())),
    );
    m.gauge(
        "in_flight_requests",
        "Requests in flight at instances, summed over the sidecars' load reports",
        per_version(&versions, |r| count(r.in_flight)),
    );
    m.gauge(
        "queued_requests",
        "Requests waiting at sidecars for a free instance, summed over their load reports",
        per_version(&versions, |r| count(r.queued)),
    );
    m.gauge(
        "outstanding_requests",
        "In-flight plus queued requests: the autoscaler's signal (WSO2)",
        per_version(&versions, |r| count(r.outstanding)),
    );
    m.gauge(
        "reporting_sidecars",
        "Sidecars whose current load report names the version",
        per_version(&versions, |r| count(r.sidecars.into())),
    );
    m.gauge(
        "target_instances",
        "The instances the autoscaler (or a pin) wants, for versions the directory scales",
        per_scaled_version(&versions, |s| s.target.into()),
    );
    m.gauge(
        "ideal_instances",
        "The instances the load asks for (outstanding requests over concurrency, within the version's limits), which the target moves toward",
        per_scaled_version(&versions, |s| s.ideal.into()),
    );
    m.gauge(
        "started_instances",
        "Instances the scheduler has started and not stopped",
        per_scaled_version(&versions, |s| s.started.into()),
    );

    m.counter(
        "scale_ups",
        "Times the autoscaler (or a pin) raised the target",
        per_scaled_version(&versions, |s| s.scaled_up),
    );
    m.counter(
        "scale_downs",
        "Times the autoscaler (or a pin) lowered the target",
        per_scaled_version(&versions, |s| s.scaled_down),
    );
    m.counter(
        "scheduler_errors",
        "Autoscaler cycles whose call to the scheduler failed (logged as `cannot scale`)",
        per_scaled_version(&versions, |s| s.scheduler_errors),
    );

    let security = ctx.security.report();
    for (name, help, value) in [
        (
            "handshakes_completed",
            "QUIC handshakes completed (node connections opened; a climb with a steady fleet is nodes reconnecting)",
            security.handshakes_completed,
        ),
        (
            "handshakes_refused",
            "QUIC handshakes refused (no client certificate, another CA, expired)",
            security.handshakes_refused,
        ),
        (
            "identities_refused",
            "Connections whose certificate carries no usable usher identity",
            security.identities_refused,
        ),
        (
            "messages_refused",
            "Streams refused because the certificate does not allow what the node asked",
            security.messages_refused,
        ),
        (
            "certificates_issued",
            "Node certificates issued (enrolments and renewals)",
            security.certificates_issued,
        ),
        (
            "joins_refused",
            "Join requests refused (bad, expired, revoked or mismatched tokens, bad CSRs)",
            security.joins_refused,
        ),
        (
            "admin_refused",
            "Admin requests refused for a missing or wrong bearer token",
            security.admin_refused,
        ),
    ] {
        m.counter(name, help, one(value));
    }
    m.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use usher_shared::routes::InstanceState;

    use crate::registry::tests::{instance, registry, HB};
    use crate::tokens::TokenStore;

    #[test]
    fn table_subscriptions_expiry_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let ctx = AdminContext {
            registry: Arc::new(registry(t0)),
            security: Arc::default(),
            tokens: Arc::new(TokenStore::open(dir.path(), &"a".repeat(64)).unwrap()),
            admin_token: "s3cret".into(),
            protect_reads: false,
        };
        let registry = &ctx.registry;
        registry
            .register(1, instance("a", InstanceState::Up), t0)
            .unwrap();
        registry
            .register(2, instance("b", InstanceState::Starting), t0)
            .unwrap();
        registry
            .register(3, instance("c", InstanceState::Up), t0)
            .unwrap();
        for (session, id) in [(1, "a"), (2, "b")] {
            let key = instance(id, InstanceState::Up).key();
            let state = registry.table().get(&key).unwrap().state;
            registry
                .heartbeat(session, &key, state, t0 + HB * 3)
                .unwrap();
        }
        assert_eq!(registry.expire(t0 + HB * 4).len(), 1, "c fell silent");
        registry.subscription_opened(Encoding::Compact);
        ctx.security.joins_refused.fetch_add(2, Ordering::Relaxed);

        registry.publish_due(t0 + HB * 10);
        let response = scrape(&ctx, t0 + HB * 10);
        assert_eq!(response.status, http::StatusCode::OK);
        let text = std::str::from_utf8(&response.body).unwrap();
        let web = r#"{service="web",version="v1"}"#;
        for line in [
            "usher_directory_epoch 42".to_string(),
            "usher_directory_route_table_revision 4".to_string(),
            "usher_directory_published_revision 4".to_string(),
            "usher_directory_in_grace_period 0".to_string(),
            r#"usher_directory_subscriptions{encoding="compact"} 1"#.to_string(),
            r#"usher_directory_subscriptions{encoding="named"} 0"#.to_string(),
            "usher_directory_instances_expired_total 1".to_string(),
            "usher_directory_withdrawals_held 0".to_string(),
            "usher_directory_self_preservation_holds_total 0".to_string(),
            "usher_directory_load_reports_total 0".to_string(),
            format!("usher_directory_instances{web} 2"),
            format!("usher_directory_routable_instances{web} 1"),
            format!("usher_directory_outstanding_requests{web} 0"),
            "usher_directory_joins_refused_total 2".to_string(),
            "usher_directory_admin_refused_total 0".to_string(),
        ] {
            assert!(
                text.contains(&format!("\n{line}\n")),
                "{line} not in\n{text}"
            );
        }
        // Only versions the directory scales have a target.
        assert!(
            !text.contains("usher_directory_target_instances{"),
            "{text}"
        );
    }
}
