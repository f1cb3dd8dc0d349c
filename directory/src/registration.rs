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
use usher_shared::codec::{read_frame, FrameError, MAX_NODE_FRAME};
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
/// ([`crate::authz::check_register`]). The registration runs boxed, so the task that lives
/// as long as the agent holds only the heartbeat loop's state.
pub(crate) async fn run(
    mut stream: NodeStream,
    session: SessionId,
    peer: &Peer,
    registry: Arc<Registry>,
    security: &Security,
    shutdown: CancellationToken,
) {
    let registered = Box::pin(register(&mut stream, session, peer, &registry, security)).await;
    if let Some(key) = registered {
        let silent_after = registry.settings().silent_stream_timeout;
        heartbeats(stream, session, &key, &registry, silent_after, shutdown).await
    }
}

/// Reads the `Register`, checks it, records the instance and confirms; the instance's key,
/// or `None` if the agent was refused or went away.
async fn register(
    stream: &mut NodeStream,
    session: SessionId,
    peer: &Peer,
    registry: &Registry,
    security: &Security,
) -> Option<InstanceKey> {
    let registration = match read_first(&mut stream.recv).await {
        Ok(Some(NodeMessage::Register(registration))) => registration,
        Ok(Some(other)) => {
            let message = format!("an agent must register first, not send {}", other.kind());
            stream.refuse(ErrorCode::UnexpectedMessage, message).await;
            return None;
        }
        Ok(None) => return None,
        Err(refusal) => {
            stream.refuse(refusal.0, refusal.1).await;
            return None;
        }
    };
    if let Err(message) = check_register(&peer.identity, &registration.instance.service) {
        security.refused(peer.address, &peer.identity, &message);
        stream.refuse(ErrorCode::InvalidRequest, message).await;
        return None;
    }
    let key = registration.instance.key();
    if let Err(e) = registry.register(session, registration.instance, Instant::now()) {
        stream
            .refuse(ErrorCode::InvalidRequest, e.to_string())
            .await;
        return None;
    }
    let registered = DirectoryMessage::Registered {
        next_heartbeat_ms: millis(registry.next_heartbeat()),
        ttl_ms: millis(registry.settings().ttl),
    };
    if let Err(e) = stream.write(&registered).await {
        debug!(error = %e, "cannot confirm the registration");
        return None;
    }
    Some(key)
}

/// The heartbeat loop: the state of the task that lives as long as the agent's stream, so
/// nothing large is held across its awaits (a frame is handled by [`on_frame`], which
/// returns only what to do next).
async fn heartbeats(
    mut stream: NodeStream,
    session: SessionId,
    key: &InstanceKey,
    registry: &Registry,
    silent_after: Duration,
    shutdown: CancellationToken,
) {
    loop {
        // A silent agent's instance expires after one TTL; its stream is dropped after
        // `silent_after` (`Config::silent_stream_timeout`).
        let frame = tokio::select! {
            _ = shutdown.cancelled() => return,
            frame = tokio::time::timeout(silent_after, read_frame(&mut stream.recv, MAX_NODE_FRAME)) => frame,
        };
        let frame = match frame {
            Ok(frame) => frame,
            Err(_) => {
                debug!(after = ?silent_after, "agent silent; dropping its stream");
                return;
            }
        };
        match on_frame(frame, session, key, registry) {
            Next::Wait => {}
            Next::Acknowledge => {
                let ack = DirectoryMessage::HeartbeatAck {
                    next_heartbeat_ms: millis(registry.next_heartbeat()),
                };
                if let Err(e) = stream.write(&ack).await {
                    debug!(error = %e, "cannot acknowledge a heartbeat");
                    return;
                }
            }
            Next::Finish => {
                let _ = stream.send.finish();
                return;
            }
            Next::Stop => return,
            Next::Refuse(code, reason) => return stream.refuse(code, reason).await,
        }
    }
}

/// What the heartbeat loop does after a frame from a registered agent.
enum Next {
    /// Wait for the next frame (a heartbeat without `ack`, see `HEARTBEATS_PER_ACK`).
    Wait,
    /// Answer with the next heartbeat interval.
    Acknowledge,
    /// The agent deregistered: finish the stream.
    Finish,
    /// The agent closed its stream: end without a word.
    Stop,
    /// Refuse the agent with an error frame.
    Refuse(ErrorCode, String),
}

/// Handles one frame of a registered agent: `Heartbeat` renews the instance (and records a
/// state change), `Deregister` removes it; anything else is refused.
fn on_frame(
    frame: Result<Option<NodeMessage>, FrameError>,
    session: SessionId,
    key: &InstanceKey,
    registry: &Registry,
) -> Next {
    let message = match frame {
        Ok(Some(message)) => message,
        Ok(None) => {
            debug!("agent closed its stream without deregistering; the TTL decides");
            return Next::Stop;
        }
        Err(e) => {
            warn!(error = %e, "bad frame from an agent");
            return Next::Refuse(ErrorCode::InvalidRequest, e.to_string());
        }
    };
    let now = Instant::now();
    match message {
        NodeMessage::Heartbeat { state, ack } => {
            match registry.heartbeat(session, key, state, now) {
                Err(e) => Next::Refuse(ErrorCode::InvalidRequest, e.to_string()),
                Ok(()) if ack => Next::Acknowledge,
                Ok(()) => Next::Wait,
            }
        }
        NodeMessage::Deregister => {
            if let Err(e) = registry.deregister(session, key, now) {
                debug!(error = %e, "deregistration of a superseded session ignored");
            }
            Next::Finish
        }
        other => Next::Refuse(
            ErrorCode::UnexpectedMessage,
            format!(
                "a registered agent sends heartbeat or deregister, not {}",
                other.kind()
            ),
        ),
    }
}
