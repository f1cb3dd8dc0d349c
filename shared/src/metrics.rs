//! Prometheus metrics on the admin ports: `GET /metrics` in the Prometheus text format 0.0.4,
//! encoded by `prometheus-client` (DESIGN: "Prometheus metrics on every admin port").
//!
//! A binary builds a fresh [`Scrape`] for each request from the same state its JSON endpoints
//! report (route table, reservers, load reports, counters), so a metric and its JSON twin
//! come from one place and cannot disagree, and nothing on the request path pays for a scrape.
//! Counters are the process's own since it started (Prometheus's `rate()` handles restarts).

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Metric, Registry};

use crate::admin::AdminResponse;

/// A sample's labels, `(name, value)` pairs; empty for an unlabelled metric.
pub type Labels = Vec<(&'static str, String)>;

/// The metrics of one scrape, all under one prefix (`usher_directory`, `usher_sidecar`,
/// `usher_agent`).
pub struct Scrape {
    registry: Registry,
}

impl Scrape {
    pub fn new(prefix: &str) -> Self {
        Self {
            registry: Registry::with_prefix(prefix),
        }
    }

    /// Adds gauge `prefix_name` with one sample per label set. `help` is one sentence without
    /// its full stop (the encoder adds it).
    pub fn gauge(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, i64)>,
    ) {
        self.family(name, help, samples, |gauge: &Gauge, value| {
            gauge.set(value);
        });
    }

    /// Adds counter `prefix_name_total` with one sample per label set.
    pub fn counter(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, u64)>,
    ) {
        self.family(name, help, samples, |counter: &Counter, value| {
            counter.inc_by(value);
        });
    }

    /// Registers a family of `M` with one metric per sample, given its value by `set`.
    fn family<M, V>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, V)>,
        set: impl Fn(&M, V),
    ) where
        M: Default,
        Family<Labels, M>: Metric,
    {
        let family = Family::<Labels, M>::default();
        for (labels, value) in samples {
            set(&family.get_or_create(&labels), value);
        }
        self.registry.register(name, help, family);
    }

    /// The scrape as the body of `GET /metrics` (`text/plain; version=0.0.4`).
    pub fn into_response(self) -> AdminResponse {
        let mut body = String::new();
        match prometheus_text::encode(&mut body, &self.registry) {
            Ok(()) => AdminResponse {
                status: http::StatusCode::OK,
                content_type: prometheus_text::CONTENT_TYPE,
                body: body.into(),
            },
            Err(e) => AdminResponse::text(
                http::StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding metrics: {e}\n"),
            ),
        }
    }
}

/// An unlabelled sample.
pub fn one<T>(value: T) -> [(Labels, T); 1] {
    [(Labels::new(), value)]
}

/// A count as a gauge value (saturating: no count here comes near `i64::MAX`).
pub fn gauge_value(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// `1` for true, `0` for false.
pub fn flag(b: bool) -> i64 {
    i64::from(b)
}

/// The value of sample `series` (its name and labels, exactly as the text format writes
/// them: `usher_sidecar_requests_total{service="web",...}`) in a `/metrics` text, if present:
/// for tests and tools that read a scrape.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_with_and_without_labels() {
        let mut scrape = Scrape::new("usher_test");
        scrape.gauge("revision", "The route table's revision", one(7));
        scrape.counter(
            "requests",
            "Requests by outcome",
            [
                (vec![("outcome", "answered".to_string())], 3),
                (vec![("outcome", "failed \"x\"".to_string())], 1),
            ],
        );
        let response = scrape.into_response();
        assert_eq!(response.status, http::StatusCode::OK);
        assert_eq!(
            response.content_type,
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let text = std::str::from_utf8(&response.body).unwrap();
        assert!(
            text.contains("# HELP usher_test_revision The route table's revision.\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE usher_test_revision gauge\n"),
            "{text}"
        );
        assert!(text.contains("\nusher_test_revision 7\n"), "{text}");
        assert!(
            text.contains("# TYPE usher_test_requests_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("usher_test_requests_total{outcome=\"answered\"} 3\n"),
            "{text}"
        );
        // Label values are escaped, so a name from the network cannot break the format.
        assert!(
            text.contains("usher_test_requests_total{outcome=\"failed \\\"x\\\"\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn values() {
        assert_eq!(gauge_value(u64::MAX), i64::MAX);
        assert_eq!(gauge_value(5u32), 5);
        assert_eq!((flag(true), flag(false)), (1, 0));
    }
}
