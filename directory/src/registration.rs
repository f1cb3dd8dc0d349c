//! An agent's conversation: `Register`, then `Heartbeat`s (each answered with the next
//! jittered interval, SwarmKit), and `Deregister` on a clean shutdown.
//!
//! A stream that ends without `Deregister` leaves the instance in the table until its TTL
//! lapses: the agent may be reconnecting, and a directory cannot tell a network blip from a
//! dead host (Baker: presence is a lease).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use usher_shared::codec::{read_frame, MAX_NODE_FRAME};
use usher_shared::protocol::{DirectoryMessage, ErrorCode, NodeMessage};
use usher_shared::routes::InstanceKey;

use crate::authz::{check_register, Security};
use crate::registry::{Registry, SessionId};
use crate::server::{read_first, NodeStream, Peer};

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

/// Runs an agent's conversation until it deregisters, the stream ends or `shutdown` fires.
///
/// Only an agent whose certificate names the instance's service may register it
/// ([`crate::authz::check_register`]).
pub(crate) async fn run(
    mut stream: NodeStream,
    session: SessionId,
    peer: &Peer,
    registry: Arc<Registry>,
    security: &Security,
    shutdown: CancellationToken,
) {
    let registration = match read_first(&mut stream.recv).await {
        Ok(Some(NodeMessage::Register(registration))) => registration,
        Ok(Some(other)) => {
            let message = format!("an agent must register first, not send {}", other.kind());
            return stream.refuse(ErrorCode::UnexpectedMessage, message).await;
        }
        Ok(None) => return,
        Err(refusal) => return stream.refuse(refusal.0, refusal.1).await,
    };
    if let Err(message) = check_register(&peer.identity, &registration.instance.service) {
        security.refused(peer.address, &peer.identity, &message);
        return stream.refuse(ErrorCode::InvalidRequest, message).await;
    }
    let key = registration.instance.key();
    if let Err(e) = registry.register(session, registration.instance, Instant::now()) {
        return stream
            .refuse(ErrorCode::InvalidRequest, e.to_string())
            .await;
    }
    let ttl = registry.settings().ttl;
    let registered = DirectoryMessage::Registered {
        next_heartbeat_ms: millis(registry.next_heartbeat()),
        ttl_ms: millis(ttl),
    };
    if let Err(e) = stream.write(&registered).await {
        debug!(error = %e, "cannot confirm the registration");
        return;
    }
    heartbeats(stream, session, &key, &registry, ttl, shutdown).await
}

async fn heartbeats(
    mut stream: NodeStream,
    session: SessionId,
    key: &InstanceKey,
    registry: &Registry,
    ttl: Duration,
    shutdown: CancellationToken,
) {
    loop {
        // A silent agent's instance expires after one TTL; its stream is dropped after two.
        let frame = tokio::select! {
            _ = shutdown.cancelled() => return,
            frame = tokio::time::timeout(ttl * 2, read_frame(&mut stream.recv, MAX_NODE_FRAME)) => frame,
        };
        let message = match frame {
            Err(_) => {
                debug!(after = ?ttl * 2, "agent silent; dropping its stream");
                return;
            }
            Ok(Ok(Some(message))) => message,
            Ok(Ok(None)) => {
                debug!("agent closed its stream without deregistering; the TTL decides");
                return;
            }
            Ok(Err(e)) => {
                warn!(error = %e, "bad frame from an agent");
                return stream
                    .refuse(ErrorCode::InvalidRequest, e.to_string())
                    .await;
            }
        };
        let now = Instant::now();
        match message {
            NodeMessage::Heartbeat { state, ack } => {
                if let Err(e) = registry.heartbeat(session, key, state, now) {
                    return stream
                        .refuse(ErrorCode::InvalidRequest, e.to_string())
                        .await;
                }
                if !ack {
                    continue; // the agent keeps its interval (HEARTBEATS_PER_ACK)
                }
                let ack = DirectoryMessage::HeartbeatAck {
                    next_heartbeat_ms: millis(registry.next_heartbeat()),
                };
                if let Err(e) = stream.write(&ack).await {
                    debug!(error = %e, "cannot acknowledge a heartbeat");
                    return;
                }
            }
            NodeMessage::Deregister => {
                if let Err(e) = registry.deregister(session, key, now) {
                    debug!(error = %e, "deregistration of a superseded session ignored");
                }
                let _ = stream.send.finish();
                return;
            }
            other => {
                let message = format!(
                    "a registered agent sends heartbeat or deregister, not {}",
                    other.kind()
                );
                return stream.refuse(ErrorCode::UnexpectedMessage, message).await;
            }
        }
    }
}
