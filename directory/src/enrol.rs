//! The join endpoint: a second QUIC listener (ALPN `usher-join/1`, server authentication only)
//! where nodes trade a join token and a CSR for a certificate, and renew it with their current
//! certificate as proof (SwarmKit: join with a token, renew with the certificate).
//!
//! One stream per connection: the node sends a [`JoinRequest`], the directory answers one
//! [`JoinResponse`] and closes. Every refusal is logged with the peer's address and counted.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};
use usher_shared::codec::{read_frame, write_frame};
use usher_shared::identity::{inspect, CertInfo, NodeIdentity};
use usher_shared::join::{JoinRefusal, JoinRequest, JoinResponse, MAX_JOIN_FRAME};

use crate::authz::Security;
use crate::pki::CertAuthority;
use crate::tokens::TokenStore;

/// Bound on a join connection: open a stream, send the request, read the answer.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What the join endpoint needs.
#[derive(Debug)]
pub struct JoinContext {
    pub authority: Arc<CertAuthority>,
    pub tokens: Arc<TokenStore>,
    pub security: Arc<Security>,
    /// Validity of the certificates it issues.
    pub validity: Duration,
}

/// Accepts join connections until `shutdown` fires.
pub async fn serve(
    endpoint: quinn::Endpoint,
    ctx: Arc<JoinContext>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    while let Some(incoming) = crate::server::next_incoming(&endpoint, &shutdown).await {
        let peer = incoming.remote_address();
        tracker
            .spawn(connection(incoming, peer, ctx.clone()).instrument(info_span!("join", %peer)));
    }
}

async fn connection(incoming: quinn::Incoming, peer: SocketAddr, ctx: Arc<JoinContext>) {
    let exchange = async {
        let connection = match incoming.await {
            Ok(connection) => connection,
            Err(e) => return ctx.security.handshake_refused(peer, &e),
        };
        // The handshake verified a presented certificate against the CA; read who it is.
        let presented = usher_shared::quic::peer_certificates(&connection)
            .first()
            .map(|c| inspect(c.as_ref()));
        let Ok((mut send, mut recv)) = connection.accept_bi().await else {
            return;
        };
        let answer = match read_frame::<_, JoinRequest>(&mut recv, MAX_JOIN_FRAME).await {
            Ok(Some(request)) => decide(&ctx, request, presented, SystemTime::now()),
            Ok(None) => return,
            Err(e) => JoinResponse::Refused {
                reason: JoinRefusal::BadRequest,
                message: format!("bad join request: {e}"),
            },
        };
        match &answer {
            JoinResponse::Issued { .. } => {
                ctx.security
                    .certificates_issued
                    .fetch_add(1, Ordering::Relaxed);
            }
            JoinResponse::Refused { reason, message } => {
                ctx.security.joins_refused.fetch_add(1, Ordering::Relaxed);
                warn!(%peer, ?reason, message, "join refused");
            }
        }
        if let Err(e) = write_frame(&mut send, &answer, MAX_JOIN_FRAME).await {
            debug!(error = %e, "cannot answer a join request");
            return;
        }
        let _ = send.finish();
        // The node closes once it has read the answer.
        connection.closed().await;
    };
    if tokio::time::timeout(JOIN_TIMEOUT, exchange).await.is_err() {
        debug!(%peer, "join connection timed out");
    }
}

fn refused(reason: JoinRefusal, message: impl Into<String>) -> JoinResponse {
    JoinResponse::Refused {
        reason,
        message: message.into(),
    }
}

/// The answer to one join request. `presented` is the identity of the client certificate the
/// handshake verified, if the node presented one. Pure apart from the token store.
pub fn decide(
    ctx: &JoinContext,
    request: JoinRequest,
    presented: Option<Result<CertInfo, usher_shared::identity::IdentityError>>,
    now: SystemTime,
) -> JoinResponse {
    let now_ms = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let (identity, csr_pem): (NodeIdentity, String) = match request {
        JoinRequest::Enrol {
            token,
            role,
            service,
            csr_pem,
        } => match ctx.tokens.redeem(&token, role, service.as_deref(), now_ms) {
            Ok(identity) => (identity, csr_pem),
            Err((reason, message)) => return refused(reason, message),
        },
        JoinRequest::Renew { csr_pem } => match presented {
            Some(Ok(info)) => (info.identity, csr_pem),
            Some(Err(e)) => {
                return refused(
                    JoinRefusal::NotAuthenticated,
                    format!("renewal refused: {e}"),
                )
            }
            None => {
                return refused(
                    JoinRefusal::NotAuthenticated,
                    "renewal needs the current certificate presented on the connection",
                )
            }
        },
    };
    match ctx
        .authority
        .sign_csr(&csr_pem, &identity, ctx.validity, now)
    {
        Ok(cert_pem) => {
            info!(%identity, validity = ?ctx.validity, "issued a node certificate");
            JoinResponse::Issued {
                cert_pem,
                ca_pem: ctx.authority.ca_pem.clone(),
            }
        }
        Err(e) => refused(JoinRefusal::BadRequest, e.to_string()),
    }
}
