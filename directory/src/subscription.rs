//! A sidecar's conversation: `Subscribe` with the (epoch, revision) it holds, then the missed
//! deltas or a full snapshot (Baker: catch up, then updates), then each published batch
//! (SwarmKit: 100 changes or 100 ms).
//!
//! A sidecar that holds another epoch's table and subscribes during the grace period after a
//! directory start gets no snapshot and no removal until the grace period ends: it keeps
//! routing with the table it has while agents rejoin, so a directory restart withdraws nothing
//! (SwarmKit's grace period after a leader change). A sidecar that asks for them
//! (`Subscribe.grace_upserts`) gets this run's instances as they register meanwhile, as
//! upserts into the table it holds ([`Registry::grace_upserts`]): a cold start or a drain in
//! the grace period reaches it at once.

use std::pin::pin;
use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};
use usher_shared::codec::{read_frame_owned, Encoding, FrameError, MAX_NODE_FRAME};
use usher_shared::protocol::{feed_encoding, ErrorCode, NodeMessage};

use crate::registry::{Registry, SessionId};
use crate::server::{read_first, NodeStream};

/// Runs a sidecar's subscription until the stream ends, the sidecar misbehaves or `shutdown`
/// fires.
pub(crate) async fn run(
    mut stream: NodeStream,
    session: SessionId,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) {
    let (epoch, revision, encoding, grace_upserts) = match read_first(&mut stream.recv).await {
        Ok(Some(NodeMessage::Subscribe {
            epoch,
            revision,
            feed_format,
            grace_upserts,
        })) => (epoch, revision, feed_encoding(feed_format), grace_upserts),
        Ok(Some(other)) => {
            let message = format!("a sidecar must subscribe, not send {}", other.kind());
            return stream.refuse(ErrorCode::UnexpectedMessage, message).await;
        }
        Ok(None) => return,
        Err(refusal) => return stream.refuse(refusal.0, refusal.1).await,
    };
    let NodeStream { mut send, recv } = stream;
    let mut reader = pin!(read_frame_owned(recv, MAX_NODE_FRAME));
    let current = registry.settings().epoch;
    // The subscription and the sidecar's load count while its stream lives.
    let _subscribed = Subscribed::new(&registry, session, encoding);
    let mut published = registry.subscribe();

    if epoch.is_some_and(|e| e != current) && registry.in_grace_period(Instant::now()) {
        info!(held_epoch = ?epoch, grace_upserts,
              "sidecar holds an earlier table; it keeps it until the grace period ends");
        let grace_end = tokio::time::sleep_until(registry.grace_period_end());
        tokio::pin!(grace_end);
        // This run's revision the upserts sent so far reflect; `None` before the first.
        let mut upserted: Option<u64> = None;
        // Upserts are due at once, then after each published batch (not on load reports).
        let mut due = grace_upserts;
        loop {
            if due {
                due = false;
                published.borrow_and_update();
                let frames = match registry.grace_upserts(upserted) {
                    Ok((frames, reached)) => {
                        upserted = Some(reached);
                        frames
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot encode grace-period upserts for a sidecar");
                        return send_error(&mut send, e).await;
                    }
                };
                if let Err(e) = crate::server::write_frames(&mut send, frames).await {
                    debug!(error = %e, "sidecar stream failed");
                    return;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = &mut grace_end => break,
                changed = published.changed(), if grace_upserts => {
                    if changed.is_err() {
                        return;
                    }
                    due = true;
                }
                (recv, frame) = &mut reader => {
                    if let Err(ended) = on_frame(&registry, session, frame) {
                        return finish(&mut send, ended).await;
                    }
                    reader.set(read_frame_owned(recv, MAX_NODE_FRAME));
                }
            }
        }
    }

    let mut held = (epoch, revision);
    let mut first = true;
    loop {
        published.borrow_and_update();
        let frames = match registry.next_frames(held, first, encoding) {
            Ok((frames, reached)) => {
                held = reached;
                frames
            }
            Err(e) => {
                // Only a bug can get here (every entry came through a 64 KiB node frame).
                tracing::error!(error = %e, "cannot encode an update for a sidecar");
                return send_error(&mut send, e).await;
            }
        };
        first = false;
        if let Err(e) = crate::server::write_frames(&mut send, frames).await {
            debug!(error = %e, "sidecar stream failed");
            return;
        }
        // Behind the last batch still (caught up to a batch boundary first): go on at once.
        if held.1 < registry.published() {
            continue;
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = published.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                (recv, frame) = &mut reader => {
                    if let Err(ended) = on_frame(&registry, session, frame) {
                        return finish(&mut send, ended).await;
                    }
                    reader.set(read_frame_owned(recv, MAX_NODE_FRAME));
                }
            }
        }
    }
}

/// Counts the subscription (`GET /v1/routes` `subscribers`) while it lives; uncounts it and
/// forgets the sidecar's load when it ends, however it ends.
struct Subscribed<'a> {
    registry: &'a Registry,
    session: SessionId,
    encoding: Encoding,
}

impl<'a> Subscribed<'a> {
    fn new(registry: &'a Registry, session: SessionId, encoding: Encoding) -> Self {
        registry.subscription_opened(encoding);
        Self {
            registry,
            session,
            encoding,
        }
    }
}

impl Drop for Subscribed<'_> {
    fn drop(&mut self) {
        self.registry.subscription_closed(self.encoding);
        self.registry.load().forget(self.session);
    }
}

/// How a subscription ends because of what the sidecar sent.
enum Ended {
    /// The sidecar closed its stream.
    Closed,
    /// Refused with an error frame.
    Refused(ErrorCode, String),
}

/// Handles a frame from a subscribed sidecar: a load report is recorded; anything else ends
/// the subscription.
fn on_frame(
    registry: &Registry,
    session: SessionId,
    frame: Result<Option<NodeMessage>, FrameError>,
) -> Result<(), Ended> {
    match frame {
        Ok(Some(NodeMessage::LoadReport { versions })) => registry
            .load()
            .report(session, Instant::now(), versions)
            .map_err(|reason| Ended::Refused(ErrorCode::InvalidRequest, reason)),
        Ok(Some(message)) => Err(Ended::Refused(
            ErrorCode::UnexpectedMessage,
            format!(
                "a subscribed sidecar sends load reports only, got {}",
                message.kind()
            ),
        )),
        Ok(None) => Err(Ended::Closed),
        Err(e) => Err(Ended::Refused(ErrorCode::InvalidRequest, e.to_string())),
    }
}

async fn finish(send: &mut quinn::SendStream, ended: Ended) {
    match ended {
        Ended::Closed => debug!("sidecar closed its stream"),
        Ended::Refused(code, reason) => crate::server::refuse(send, code, reason).await,
    }
}

async fn send_error(send: &mut quinn::SendStream, e: FrameError) {
    crate::server::refuse(send, ErrorCode::InvalidRequest, e.to_string()).await
}
