//! The join endpoint's messages (ALPN `usher-join/1`): one stream per request, one
//! [`JoinRequest`] from the node, one [`JoinResponse`] from the directory, then both close.
//!
//! A node without a certificate sends [`JoinRequest::Enrol`] with its join token and a CSR;
//! a node with a certificate from this CA presents it on the connection and sends
//! [`JoinRequest::Renew`] (SwarmKit: nodes renew with their current certificate as proof).
//! The directory decides the certificate's identity (from the token or the presented
//! certificate) and validity; of the CSR it uses only the public key.

use serde::{Deserialize, Serialize};

use crate::protocol::Role;

/// Largest join frame either way (a CSR or a certificate plus the CA certificate).
pub const MAX_JOIN_FRAME: usize = 16 * 1024;

/// What a node asks the join endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinRequest {
    /// First certificate: the full join token text, the role and service the node runs as
    /// (they must match the token's), and a PEM CSR (PKCS#10) for the node's new key.
    Enrol {
        token: String,
        role: Role,
        service: Option<String>,
        csr_pem: String,
    },
    /// A new certificate with the identity of the one presented on this connection.
    Renew { csr_pem: String },
}

/// Why the directory refused a join request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinRefusal {
    /// No token with this id, or the secret does not match.
    UnknownToken,
    /// The token's time to live has passed.
    ExpiredToken,
    /// The token was revoked (`usher-directory token revoke`).
    RevokedToken,
    /// The token was created for the other role.
    WrongRole,
    /// The agent's service is not the token's.
    WrongService,
    /// The token names another CA.
    WrongCluster,
    /// Renewal without a certificate from this CA.
    NotAuthenticated,
    /// Malformed token or CSR, or a message out of place.
    BadRequest,
}

/// The directory's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinResponse {
    /// The node's certificate (PEM) and the cluster CA certificate (PEM).
    Issued { cert_pem: String, ca_pem: String },
    /// Refused, with a sentence for the node's operator.
    Refused {
        reason: JoinRefusal,
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_frame, encode_frame};

    #[test]
    fn requests_round_trip_and_oversized_frames_are_refused() {
        let req = JoinRequest::Enrol {
            token: "t".into(),
            role: Role::Agent,
            service: Some("web".into()),
            csr_pem: "csr".into(),
        };
        let mut frame = bytes::BytesMut::from(&encode_frame(&req, MAX_JOIN_FRAME).unwrap()[..]);
        let back: JoinRequest = decode_frame(&mut frame, MAX_JOIN_FRAME).unwrap().unwrap();
        assert_eq!(back, req);
        let big = JoinRequest::Renew {
            csr_pem: "x".repeat(MAX_JOIN_FRAME),
        };
        assert!(encode_frame(&big, MAX_JOIN_FRAME).is_err());
    }
}
