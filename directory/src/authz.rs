//! Who may do what on the control plane, and the counters of what was refused.
//!
//! A node's rights come from its certificate, never from what it says: the directory reads
//! the identity URI of the client certificate the QUIC handshake verified
//! ([`usher_shared::identity::inspect`]). An agent may register instances of its own service
//! only; a sidecar may subscribe and report load; a hello that claims another role than the
//! certificate's is refused (SwarmKit: the certificate carries the role). Every refusal is
//! logged with the peer's address and counted in [`Security`], shown at `GET /v1/security`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use tracing::warn;
use usher_shared::identity::NodeIdentity;
use usher_shared::protocol::Role;

/// Counters of security decisions since the directory started (`GET /v1/security`).
#[derive(Debug, Default)]
pub struct Security {
    /// QUIC handshakes completed: node connections opened. A count that climbs with a
    /// steady fleet means nodes reconnecting, each a mutual-TLS handshake.
    pub handshakes_completed: AtomicU64,
    /// QUIC handshakes that failed: no client certificate, one from another CA, expired...
    pub handshakes_refused: AtomicU64,
    /// Connections whose verified certificate carries no usable `usher://` identity.
    pub identities_refused: AtomicU64,
    /// Streams refused because the certificate does not allow what the node asked.
    pub messages_refused: AtomicU64,
    /// Certificates issued by the join endpoint (enrolments and renewals).
    pub certificates_issued: AtomicU64,
    /// Join requests refused (bad, expired, revoked or mismatched tokens, bad CSRs...).
    pub joins_refused: AtomicU64,
    /// Admin requests refused for a missing or wrong bearer token.
    pub admin_refused: AtomicU64,
}

/// The JSON body of `GET /v1/security`.
#[derive(Debug, Clone, Serialize)]
pub struct SecurityReport {
    pub handshakes_completed: u64,
    pub handshakes_refused: u64,
    pub identities_refused: u64,
    pub messages_refused: u64,
    pub certificates_issued: u64,
    pub joins_refused: u64,
    pub admin_refused: u64,
}

impl Security {
    /// A snapshot of the counters.
    pub fn report(&self) -> SecurityReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SecurityReport {
            handshakes_completed: get(&self.handshakes_completed),
            handshakes_refused: get(&self.handshakes_refused),
            identities_refused: get(&self.identities_refused),
            messages_refused: get(&self.messages_refused),
            certificates_issued: get(&self.certificates_issued),
            joins_refused: get(&self.joins_refused),
            admin_refused: get(&self.admin_refused),
        }
    }

    /// Counts and logs a failed QUIC handshake from `peer` (no certificate, another CA...).
    pub fn handshake_refused(&self, peer: SocketAddr, error: &quinn::ConnectionError) {
        self.handshakes_refused.fetch_add(1, Ordering::Relaxed);
        warn!(%peer, error = %error, "handshake refused");
    }

    /// Counts and logs a refused message from `peer`.
    pub fn refused(&self, peer: SocketAddr, identity: &NodeIdentity, reason: &str) {
        self.messages_refused.fetch_add(1, Ordering::Relaxed);
        warn!(%peer, %identity, reason, "refused: not authorised");
    }
}

/// Checks a hello's role against the certificate's; the error is the refusal's sentence.
pub fn check_hello(identity: &NodeIdentity, role: Role) -> Result<(), String> {
    if identity.role() == role {
        Ok(())
    } else {
        Err(format!(
            "not authorised: the certificate is for a {}, the hello says {role}",
            identity.role()
        ))
    }
}

/// Checks that `identity` may register an instance of `service`.
pub fn check_register(identity: &NodeIdentity, service: &str) -> Result<(), String> {
    match identity {
        NodeIdentity::Agent { service: own } if own == service => Ok(()),
        NodeIdentity::Agent { service: own } => Err(format!(
            "not authorised: this agent's certificate is for service {own:?}, not {service:?}"
        )),
        NodeIdentity::Sidecar => Err("not authorised: a sidecar cannot register instances".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_services_come_from_the_certificate() {
        let web = NodeIdentity::Agent {
            service: "web".into(),
        };
        assert!(check_hello(&web, Role::Agent).is_ok());
        assert!(check_hello(&web, Role::Sidecar).is_err());
        assert!(check_hello(&NodeIdentity::Sidecar, Role::Agent).is_err());
        assert!(check_register(&web, "web").is_ok());
        let e = check_register(&web, "db").unwrap_err();
        assert!(e.contains("\"db\""), "{e}");
        assert!(check_register(&NodeIdentity::Sidecar, "web").is_err());
    }
}
