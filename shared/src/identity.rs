//! Who a node is, as both ends read it: the identity a node certificate carries, the CA
//! fingerprint, the join token's text and when a certificate is due for renewal.
//!
//! - A node certificate names its role (and, for an agent, its service) in one subject
//!   alternative name URI: `usher://agent/<service>` or `usher://sidecar` (SwarmKit: the
//!   certificate carries the node's role). The directory reads it with `x509-parser`; what a
//!   node says in its hello is only checked against it.
//! - A join token is `USHER1-<64 hex: SHA-256 of the CA certificate's DER>-<16 hex: token
//!   id>-<32 hex: secret>` (SwarmKit: `SWMTKN-1-<CA digest>-<secret>`). The digest lets a
//!   joining node pin the directory's CA before it trusts anything; the id names the token in
//!   `token list`/`token revoke`; the directory stores only the SHA-256 of the secret.
//! - Certificates are renewed when two thirds of their validity has passed; a stored
//!   certificate with less than a third left is not reused at start.

use std::fmt;

use thiserror::Error;
use x509_parser::extensions::GeneralName;

use crate::names::validate_label;
use crate::protocol::Role;

/// Scheme and authority prefix of the identity URI in a node certificate.
pub const URI_PREFIX: &str = "usher://";

/// First field of a join token: the format version.
pub const TOKEN_PREFIX: &str = "USHER1";

/// Hex digits of a token id (8 random bytes).
pub const TOKEN_ID_LEN: usize = 16;

/// Hex digits of a token secret (16 random bytes: 128 bits).
pub const TOKEN_SECRET_LEN: usize = 32;

/// Hex digits of a SHA-256 digest.
pub const DIGEST_LEN: usize = 64;

/// What a node is allowed to be: the role its certificate grants, and an agent's service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NodeIdentity {
    /// May register instances of `service` only.
    Agent { service: String },
    /// May subscribe to the route table and report load.
    Sidecar,
}

impl NodeIdentity {
    /// The role this identity grants.
    pub fn role(&self) -> Role {
        match self {
            NodeIdentity::Agent { .. } => Role::Agent,
            NodeIdentity::Sidecar => Role::Sidecar,
        }
    }

    /// The service of an agent; `None` for a sidecar.
    pub fn service(&self) -> Option<&str> {
        match self {
            NodeIdentity::Agent { service } => Some(service),
            NodeIdentity::Sidecar => None,
        }
    }

    /// The subject alternative name URI: `usher://agent/<service>` or `usher://sidecar`.
    pub fn uri(&self) -> String {
        match self {
            NodeIdentity::Agent { service } => format!("{URI_PREFIX}agent/{service}"),
            NodeIdentity::Sidecar => format!("{URI_PREFIX}sidecar"),
        }
    }

    /// Builds an identity from a role and an optional service; an agent needs a service
    /// (a DNS label), a sidecar must have none.
    pub fn new(role: Role, service: Option<&str>) -> Result<Self, IdentityError> {
        match (role, service) {
            (Role::Agent, Some(service)) => {
                validate_label(service)
                    .map_err(|e| IdentityError::BadService(service.to_string(), e.to_string()))?;
                Ok(NodeIdentity::Agent {
                    service: service.to_string(),
                })
            }
            (Role::Agent, None) => Err(IdentityError::AgentWithoutService),
            (Role::Sidecar, None) => Ok(NodeIdentity::Sidecar),
            (Role::Sidecar, Some(_)) => Err(IdentityError::SidecarWithService),
        }
    }

    /// Parses an identity URI (the inverse of [`NodeIdentity::uri`]).
    pub fn from_uri(uri: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::BadUri(uri.to_string());
        let rest = uri.strip_prefix(URI_PREFIX).ok_or_else(bad)?;
        match rest.split_once('/') {
            None if rest == "sidecar" => Ok(NodeIdentity::Sidecar),
            Some(("agent", service)) => NodeIdentity::new(Role::Agent, Some(service)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeIdentity::Agent { service } => write!(f, "agent of {service}"),
            NodeIdentity::Sidecar => f.write_str("sidecar"),
        }
    }
}

/// Why an identity, certificate or token could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdentityError {
    #[error("{0:?} is not an usher identity (usher://agent/SERVICE or usher://sidecar)")]
    BadUri(String),
    #[error("service {0:?}: {1}")]
    BadService(String, String),
    #[error("an agent identity needs a service")]
    AgentWithoutService,
    #[error("a sidecar identity has no service")]
    SidecarWithService,
    #[error("the certificate cannot be parsed: {0}")]
    BadCertificate(String),
    #[error("the certificate carries no usher:// identity URI")]
    NoIdentity,
    #[error("the certificate carries {0} usher:// identity URIs; exactly one is allowed")]
    ManyIdentities(usize),
}

/// What the directory and a node read from a node certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub identity: NodeIdentity,
    /// Start of validity, seconds since the Unix epoch.
    pub not_before: i64,
    /// End of validity, seconds since the Unix epoch.
    pub not_after: i64,
}

impl CertInfo {
    /// Whether two thirds of the validity have passed at `now` (Unix seconds): time to renew,
    /// and too old to reuse at a start with a join token.
    pub fn renewal_due(&self, now: i64) -> bool {
        now >= self.renew_at()
    }

    /// When two thirds of the validity have passed (Unix seconds).
    pub fn renew_at(&self) -> i64 {
        let life = (self.not_after - self.not_before).max(0);
        self.not_before + life * 2 / 3
    }

    /// Whether the certificate is valid at `now` (Unix seconds).
    pub fn valid_at(&self, now: i64) -> bool {
        (self.not_before..self.not_after).contains(&now)
    }
}

/// Reads the identity URI and validity of a DER certificate.
///
/// Errors: not a certificate, no `usher://` URI, or more than one.
pub fn inspect(cert_der: &[u8]) -> Result<CertInfo, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let uris: Vec<&str> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) if uri.starts_with(URI_PREFIX) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let identity = match uris.as_slice() {
        [] => return Err(IdentityError::NoIdentity),
        [uri] => NodeIdentity::from_uri(uri)?,
        many => return Err(IdentityError::ManyIdentities(many.len())),
    };
    let validity = cert.validity();
    Ok(CertInfo {
        identity,
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
    })
}

/// Lowercase hex SHA-256 of `data` (for a certificate: its fingerprint over the DER).
pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// Whether two secrets are equal, compared through their SHA-256 digests so that the time the
/// comparison takes tells nothing usable about the expected secret.
pub fn secrets_equal(given: &[u8], expected: &[u8]) -> bool {
    let digest = |d: &[u8]| ring::digest::digest(&ring::digest::SHA256, d);
    digest(given).as_ref() == digest(expected).as_ref()
}

/// The CA fingerprint a join token carries: hex SHA-256 of the first certificate's DER in
/// the PEM document `ca_pem`.
pub fn ca_fingerprint(ca_pem: &[u8]) -> Result<String, crate::quic::TlsError> {
    let certs = crate::quic::parse_certificates(ca_pem)?;
    Ok(sha256_hex(certs[0].as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn random_hex(bytes: usize) -> String {
    let buf: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    hex(&buf)
}

/// A join token: the CA digest to pin, the token's id and its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Hex SHA-256 of the CA certificate's DER.
    pub ca_digest: String,
    /// 16 hex digits; names the token in `token list` and `token revoke`.
    pub id: String,
    /// 32 hex digits; the directory stores only its SHA-256.
    pub secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never log the secret.
        f.debug_struct("JoinToken")
            .field("ca_digest", &self.ca_digest)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{TOKEN_PREFIX}-{}-{}-{}",
            self.ca_digest, self.id, self.secret
        )
    }
}

/// Why a join token's text is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("not a join token ({0}); expected USHER1-<64 hex CA digest>-<16 hex id>-<32 hex secret>")]
pub struct TokenFormatError(pub &'static str);

impl JoinToken {
    /// A fresh token for the CA with fingerprint `ca_digest` (random id and secret).
    pub fn generate(ca_digest: &str) -> Self {
        Self {
            ca_digest: ca_digest.to_string(),
            id: random_hex(TOKEN_ID_LEN / 2),
            secret: random_hex(TOKEN_SECRET_LEN / 2),
        }
    }

    /// Parses `USHER1-<digest>-<id>-<secret>`; surrounding whitespace is ignored.
    pub fn parse(text: &str) -> Result<Self, TokenFormatError> {
        let mut parts = text.trim().split('-');
        let (Some(prefix), Some(digest), Some(id), Some(secret), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenFormatError("wrong number of fields"));
        };
        if prefix != TOKEN_PREFIX {
            return Err(TokenFormatError("unknown prefix"));
        }
        let hex_of = |s: &str, len: usize| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        if !hex_of(digest, DIGEST_LEN) {
            return Err(TokenFormatError("bad CA digest"));
        }
        if !hex_of(id, TOKEN_ID_LEN) {
            return Err(TokenFormatError("bad token id"));
        }
        if !hex_of(secret, TOKEN_SECRET_LEN) {
            return Err(TokenFormatError("bad secret"));
        }
        Ok(Self {
            ca_digest: digest.to_string(),
            id: id.to_string(),
            secret: secret.to_string(),
        })
    }

    /// Hex SHA-256 of the secret: what the directory stores and compares.
    pub fn secret_digest(&self) -> String {
        sha256_hex(self.secret.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_uris_round_trip_and_hostile_ones_are_refused() {
        for id in [
            NodeIdentity::Sidecar,
            NodeIdentity::Agent {
                service: "web".into(),
            },
        ] {
            assert_eq!(NodeIdentity::from_uri(&id.uri()).unwrap(), id);
        }
        for bad in [
            "usher://agent/",
            "usher://agent/Web",
            "usher://agent/a/b",
            "usher://sidecar/x",
            "usher://admin",
            "http://sidecar",
            "",
        ] {
            assert!(NodeIdentity::from_uri(bad).is_err(), "{bad}");
        }
        assert!(NodeIdentity::new(Role::Sidecar, Some("web")).is_err());
        assert!(NodeIdentity::new(Role::Agent, None).is_err());
    }

    #[test]
    fn tokens_round_trip_and_malformed_ones_are_refused() {
        let t = JoinToken::generate(&sha256_hex(b"ca"));
        let text = t.to_string();
        assert!(text.starts_with("USHER1-"), "{text}");
        assert_eq!(JoinToken::parse(&format!(" {text}\n")).unwrap(), t);
        assert!(
            !format!("{t:?}").contains(&t.secret),
            "Debug hides the secret"
        );
        let good = text.clone();
        for bad in [
            "".to_string(),
            "USHER1".to_string(),
            good.replace("USHER1", "USHER2"),
            format!("{good}-x"),
            good.to_uppercase(),
            good[..good.len() - 1].to_string(),
        ] {
            assert!(JoinToken::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn renewal_is_due_after_two_thirds_of_the_validity() {
        let info = CertInfo {
            identity: NodeIdentity::Sidecar,
            not_before: 1000,
            not_after: 1300,
        };
        assert!(!info.renewal_due(1199));
        assert!(info.renewal_due(1200));
        assert!(info.valid_at(1299));
        assert!(!info.valid_at(1300));
        assert!(!info.valid_at(999));
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(matches!(
            inspect(b"\x30\x03\x02\x01\x00"),
            Err(IdentityError::BadCertificate(_))
        ));
        assert!(inspect(&[]).is_err());
    }
}
