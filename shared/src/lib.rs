//! What every usher process must agree on: the wire messages, the frame codec, the route
//! table and how deltas apply to it, name rules, reconnect backoff and the QUIC/TLS settings.
//!
//! The protocol modules spawn nothing and bind nothing, so they are tested on byte slices and
//! plain values. Three small runtime helpers (admin HTTP, logging, signals) live here too,
//! because all three binaries need them identically and a fourth crate for them would be noise.
//!
//! # Layout
//!
//! - [`names`]: service and version names are DNS labels.
//! - [`protocol`]: the messages of the control plane (Baker's discovery protocol over QUIC).
//! - [`codec`]: length-prefixed MessagePack frames with a hard maximum length.
//! - [`routes`]: the route table (epoch, revision, instances), snapshots, deltas and the
//!   directory's change log that lets a subscriber resume.
//! - [`backoff`]: exponential backoff with full jitter (Baker: retry forever; SwarmKit: jitter).
//! - [`quic`]: ALPN, transport limits and TLS configuration for both ends of a QUIC connection.
//! - [`session`]: the node side of connecting to the directory (hello, welcome).
//! - [`identity`]: the role and service a node certificate carries, CA fingerprints, the join
//!   token's text, when a certificate is due for renewal (SwarmKit's join tokens).
//! - [`join`]: the join endpoint's messages (enrol with a token and a CSR, renew).
//! - [`enrolment`]: the node side of getting, storing and renewing its certificate.
//! - [`files`]: atomic state-file writes (temp, fsync, rename) with a given mode.
//! - [`health`]: the health checks an agent can run (`http:PATH`, `grpc[:SERVICE]`, `tcp`,
//!   `none`), parsed in one place for the agent and the directory.
//! - [`admin`], [`metrics`], [`telemetry`], [`signals`], [`runtime`]: the admin HTTP server,
//!   its Prometheus `/metrics`, logging setup, shutdown signals and the `--threads`-sized tokio
//!   runtime every binary uses.
#![forbid(unsafe_code)]

pub mod admin;
pub mod backoff;
pub mod codec;
pub mod enrolment;
pub mod files;
pub mod health;
pub mod identity;
pub mod join;
pub mod metrics;
pub mod names;
pub mod protocol;
pub mod quic;
pub mod routes;
pub mod runtime;
pub mod session;
pub mod signals;
pub mod telemetry;

/// The hasher of maps on hot paths (the sidecar's request path, the directory's heartbeats):
/// foldhash, seeded per process, several times faster than the standard SipHash on short
/// keys. Their keys come from the route table or from authenticated agents, not from
/// anonymous clients.
pub type FastHash = foldhash::fast::RandomState;

/// Current wall-clock time in milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
