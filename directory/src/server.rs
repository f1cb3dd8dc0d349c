//! The QUIC side of the directory: accept connections, accept streams, check the hello, and
//! hand each stream to the agent (`registration`) or sidecar
//! (`subscription`) conversation.
//!
//! Every connection is mutual TLS: the handshake already refused peers without a certificate
//! from the cluster CA, and the identity its certificate carries (role, an agent's service) is
//! read here once per connection. Every stream starts with a hello carrying the protocol
//! version and role; a version this directory does not speak, a role the certificate does not
//! grant, a missing hello, or anything malformed gets an error frame and the stream is closed.
//! Nothing a peer sends can change state before it is validated and authorised
//! ([`crate::authz`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};
use usher_shared::codec::{
    encode_frame, read_frame, write_frame, FrameError, MAX_DIRECTORY_FRAME, MAX_NODE_FRAME,
};
use usher_shared::protocol::{DirectoryMessage, ErrorCode, NodeMessage, Role, PROTOCOL_VERSION};

use usher_shared::identity::NodeIdentity;

use crate::authz::Security;
use crate::registry::{Registry, SessionId};

/// A stream must say hello (and then register or subscribe) within this time.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on writing one frame to a node; a node that does not read is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// QUIC application close code for a clean close.
pub const CLOSE_OK: u32 = 0;

/// QUIC application close code for a peer whose certificate grants nothing.
pub const CLOSE_REFUSED: u32 = 1;

/// Least time between two stateless resets the directory sends: 100 µs, at most 10,000 a
/// second. quinn's default (20 ms, 50 a second) would take minutes to tell a fleet of 10,000
/// agents that the directory restarted; every reset is smaller than the packet that caused it,
/// so resets cannot amplify or loop.
pub const MIN_RESET_INTERVAL: Duration = Duration::from_micros(100);

/// The QUIC endpoint configuration of the directory, the same after every restart: the
/// stateless reset key and the key that signs connection IDs both come from `reset_secret`
/// (derived from the CA key, [`crate::pki`]). After a crash and restart, a packet on a
/// connection of the previous process carries a connection ID this one recognises as its
/// own, so it answers with a stateless reset that closes the connection at once (RFC 9000
/// §10.3): agents and sidecars reconnect within one heartbeat or keep-alive instead of
/// waiting for their timeouts. quinn's default signs IDs with a random key per process and
/// silently drops the packets of an earlier one.
pub fn endpoint_config(reset_secret: &[u8; 32]) -> quinn::EndpointConfig {
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_secret);
    let tag = ring::hmac::sign(&reset_key, b"usher connection id key");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&tag.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
    config
        .cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        })
        .min_reset_interval(MIN_RESET_INTERVAL);
    config
}

/// Hands out a distinct id per stream (the owner of a registration).
static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Accepts connections until `shutdown` fires; each connection and stream runs in a task
/// tracked by `tracker`.
pub async fn serve(
    endpoint: quinn::Endpoint,
    registry: Arc<Registry>,
    security: Arc<Security>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    while let Some(incoming) = next_incoming(&endpoint, &shutdown).await {
        let peer = incoming.remote_address();
        tracker.spawn(
            connection(
                incoming,
                registry.clone(),
                security.clone(),
                shutdown.clone(),
                tracker.clone(),
            )
            .instrument(info_span!("connection", %peer)),
        );
    }
}

/// The next incoming connection on `endpoint`; `None` once `shutdown` fires or the endpoint
/// is closed.
pub(crate) async fn next_incoming(
    endpoint: &quinn::Endpoint,
    shutdown: &CancellationToken,
) -> Option<quinn::Incoming> {
    tokio::select! {
        _ = shutdown.cancelled() => None,
        incoming = endpoint.accept() => incoming,
    }
}

/// The node identity on a connection, with the address it came from.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub address: std::net::SocketAddr,
    pub identity: NodeIdentity,
}

/// Completes the handshake and reads the node identity from the peer's certificate; `None`
/// (the connection closed, the refusal counted and logged) if either fails.
async fn handshake(
    incoming: quinn::Incoming,
    security: &Security,
) -> Option<(quinn::Connection, NodeIdentity)> {
    let address = incoming.remote_address();
    let connection = match incoming.await {
        Ok(connection) => {
            security
                .handshakes_completed
                .fetch_add(1, Ordering::Relaxed);
            connection
        }
        Err(e) => {
            security.handshake_refused(address, &e);
            return None;
        }
    };
    let certs = usher_shared::quic::peer_certificates(&connection);
    let refusal = match certs
        .first()
        .map(|c| usher_shared::identity::inspect(c.as_ref()))
    {
        Some(Ok(info)) => return Some((connection, info.identity)),
        Some(Err(e)) => {
            warn!(peer = %address, error = %e, "refused: the certificate names no usher identity");
            "the certificate names no usher identity"
        }
        None => {
            warn!(peer = %address, "refused: no client certificate");
            "no client certificate"
        }
    };
    security.identities_refused.fetch_add(1, Ordering::Relaxed);
    connection.close(CLOSE_REFUSED.into(), refusal.as_bytes());
    None
}

/// One connection: the handshake, then a conversation task per stream the node opens.
async fn connection(
    incoming: quinn::Incoming,
    registry: Arc<Registry>,
    security: Arc<Security>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    // Boxed: the handshake's state is freed once it ends instead of sizing a task that lives
    // as long as the connection.
    let Some((connection, identity)) = Box::pin(handshake(incoming, &security)).await else {
        return;
    };
    let address = connection.remote_address();
    debug!(%identity, "connection established");
    let peer = Peer { address, identity };
    loop {
        let (send, recv) = tokio::select! {
            _ = shutdown.cancelled() => {
                connection.close(CLOSE_OK.into(), b"directory shutting down");
                return;
            }
            stream = connection.accept_bi() => match stream {
                Ok(stream) => stream,
                Err(e) => {
                    debug!(reason = %e, "connection closed");
                    return;
                }
            },
        };
        // The conversation logs in the connection's span (the peer), then in the node's; a
        // span of its own for the stream would hold nothing more (a node opens one) and cost
        // memory per agent.
        tracker.spawn(
            conversation(
                send,
                recv,
                peer.clone(),
                registry.clone(),
                security.clone(),
                shutdown.clone(),
            )
            .in_current_span(),
        );
    }
}

/// One stream: hello, welcome, then the role's conversation.
///
/// The task lives as long as the node's stream (at fleet scale, one per agent), and a task is
/// as large as its largest state: the greeting runs boxed, so its state is freed once the
/// conversation starts instead of sizing every agent's task for its whole life.
async fn conversation(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    peer: Peer,
    registry: Arc<Registry>,
    security: Arc<Security>,
    shutdown: CancellationToken,
) {
    let Some((stream, session, span)) =
        Box::pin(greet(send, recv, &peer, &registry, &security)).await
    else {
        return;
    };
    match peer.identity.role() {
        Role::Agent => {
            crate::registration::run(stream, session, &peer, registry, &security, shutdown)
                .instrument(span)
                .await
        }
        // Boxed: a subscription's state is larger than a registration's, and there are
        // fewer sidecars than agents; unboxed it would size every agent's task.
        Role::Sidecar => {
            Box::pin(crate::subscription::run(
                stream, session, registry, shutdown,
            ))
            .instrument(span)
            .await
        }
    }
}

/// Reads the hello, checks the protocol version and the role, and sends the welcome; the
/// stream, a new session id and the node's span for the conversation, or `None` if the node
/// was refused or went away.
async fn greet(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    peer: &Peer,
    registry: &Registry,
    security: &Security,
) -> Option<(NodeStream, SessionId, tracing::Span)> {
    let hello = match read_first(&mut recv).await {
        Ok(Some(NodeMessage::Hello(hello))) => hello,
        Ok(Some(other)) => {
            let message = format!("expected hello first, got {}", other.kind());
            refuse(&mut send, ErrorCode::UnexpectedMessage, message).await;
            return None;
        }
        Ok(None) => return None,
        Err(refusal) => {
            refuse(&mut send, refusal.0, refusal.1).await;
            return None;
        }
    };
    if hello.protocol != PROTOCOL_VERSION {
        let message = format!(
            "this directory speaks protocol {PROTOCOL_VERSION}; the node speaks {}",
            hello.protocol
        );
        refuse(&mut send, ErrorCode::UnsupportedProtocol, message).await;
        return None;
    }
    if let Err(message) = crate::authz::check_hello(&peer.identity, hello.role) {
        security.refused(peer.address, &peer.identity, &message);
        refuse(&mut send, ErrorCode::InvalidRequest, message).await;
        return None;
    }
    let welcome = DirectoryMessage::Welcome {
        protocol: PROTOCOL_VERSION,
        epoch: registry.settings().epoch,
    };
    if let Err(e) = write_bounded(&mut send, &welcome).await {
        debug!(error = %e, "cannot send welcome");
        return None;
    }
    let session = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("node", role = %hello.role, node = %hello.node, session);
    Some((NodeStream { send, recv }, session, span))
}

/// A refusal: the error code and a sentence for the node's log.
pub(crate) struct Refusal(pub ErrorCode, pub String);

impl From<FrameError> for Refusal {
    fn from(e: FrameError) -> Self {
        Refusal(ErrorCode::InvalidRequest, e.to_string())
    }
}

/// Reads the first frame of a conversation step, bounded by [`HELLO_TIMEOUT`].
pub(crate) async fn read_first(
    recv: &mut quinn::RecvStream,
) -> Result<Option<NodeMessage>, Refusal> {
    match tokio::time::timeout(HELLO_TIMEOUT, read_frame(recv, MAX_NODE_FRAME)).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(Refusal(
            ErrorCode::UnexpectedMessage,
            format!("nothing received within {HELLO_TIMEOUT:?}"),
        )),
    }
}

/// The two halves of a node's stream after the welcome.
pub(crate) struct NodeStream {
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

impl NodeStream {
    pub async fn write(&mut self, msg: &DirectoryMessage) -> Result<(), FrameError> {
        write_bounded(&mut self.send, msg).await
    }

    pub async fn refuse(&mut self, code: ErrorCode, message: impl Into<String>) {
        refuse(&mut self.send, code, message).await
    }
}

/// Writes one frame, bounded by [`WRITE_TIMEOUT`].
pub(crate) async fn write_bounded(
    send: &mut quinn::SendStream,
    msg: &DirectoryMessage,
) -> Result<(), FrameError> {
    write_encoded(send, &encode_frame(msg, MAX_DIRECTORY_FRAME)?).await
}

/// Writes one already encoded frame, bounded by [`WRITE_TIMEOUT`].
pub(crate) async fn write_encoded(
    send: &mut quinn::SendStream,
    frame: &[u8],
) -> Result<(), FrameError> {
    bounded(AsyncWriteExt::write_all(send, frame)).await
}

/// Writes already encoded frames without copying them (the same bytes go to every
/// subscriber), bounded by [`WRITE_TIMEOUT`].
pub(crate) async fn write_frames(
    send: &mut quinn::SendStream,
    mut frames: Vec<bytes::Bytes>,
) -> Result<(), FrameError> {
    if frames.is_empty() {
        return Ok(());
    }
    bounded(async {
        send.write_all_chunks(&mut frames)
            .await
            .map_err(std::io::Error::from)
    })
    .await
}

async fn bounded(
    write: impl std::future::Future<Output = std::io::Result<()>>,
) -> Result<(), FrameError> {
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(FrameError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the node read nothing for {WRITE_TIMEOUT:?}"),
        ))),
    }
}

/// Sends an error frame and finishes the stream (best effort: the node may be gone).
///
/// Boxed: refusing is rare, and its state (a timer, the frame) would otherwise size every
/// conversation task for as long as it lives.
pub(crate) async fn refuse(
    send: &mut quinn::SendStream,
    code: ErrorCode,
    message: impl Into<String>,
) {
    Box::pin(send_refusal(send, code, message.into())).await
}

async fn send_refusal(send: &mut quinn::SendStream, code: ErrorCode, message: String) {
    info!(code = ?code, reason = %message, "refusing the node");
    let frame = DirectoryMessage::Error { code, message };
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        write_frame(send, &frame, MAX_DIRECTORY_FRAME),
    )
    .await;
    let _ = send.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Size in bytes of the future `f` returns for these argument types (nothing is called).
    macro_rules! future_size {
        ($f:expr, $($arg:ty),*) => {{
            fn size<F: Fn($($arg),*) -> Fut, Fut>(_: F) -> usize {
                std::mem::size_of::<Fut>()
            }
            size($f)
        }};
    }

    /// The connection and conversation tasks live as long as an agent (10,000 of them at
    /// fleet scale), so their one-off phases run boxed; unboxed, these futures were 1,192
    /// and 2,576 bytes (docs/BENCHMARKS.md, control plane).
    #[test]
    fn the_tasks_that_live_as_long_as_an_agent_stay_small() {
        let connection = future_size!(
            connection,
            quinn::Incoming,
            Arc<Registry>,
            Arc<Security>,
            CancellationToken,
            TaskTracker
        );
        let conversation = future_size!(
            conversation,
            quinn::SendStream,
            quinn::RecvStream,
            Peer,
            Arc<Registry>,
            Arc<Security>,
            CancellationToken
        );
        eprintln!("connection {connection} B, conversation {conversation} B");
        assert!(connection <= 1_000, "connection future {connection} B");
        assert!(
            conversation <= 2_000,
            "conversation future {conversation} B"
        );
    }
}
