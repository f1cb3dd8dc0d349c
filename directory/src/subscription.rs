//! A sidecar's conversation: `Subscribe` with the (epoch, revision) it holds, then the missed
//! deltas or a full snapshot (Baker: catch up, then updates), then each published batch
//! (SwarmKit: 100 changes or 100 ms).
//!
//! A sidecar that holds another epoch's table and subscribes during the grace period after a
//! directory start gets nothing until the grace period ends: it keeps routing with the table it
//! has while agents rejoin, so a directory restart withdraws nothing (SwarmKit's grace period
//! after a leader change).

use std::pin::pin;
use std::sync::Arc;

use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};
use usher_shared::codec::{
    encode_frame, read_frame_owned, FrameError, MAX_DIRECTORY_FRAME, MAX_NODE_FRAME,
};
use usher_shared::protocol::{DirectoryMessage, ErrorCode, NodeMessage};

use crate::registry::{Registry, SessionId, Update};
use crate::server::{read_first, NodeStream};

/// Most entries in one snapshot chunk or delta frame.
pub const MAX_ITEMS_PER_FRAME: usize = 1000;

/// Bytes of entries per frame: half the frame limit leaves room for the envelope.
pub const FRAME_BUDGET: usize = MAX_DIRECTORY_FRAME / 2;

/// Runs a sidecar's subscription until the stream ends, the sidecar misbehaves or `shutdown`
/// fires.
pub(crate) async fn run(
    mut stream: NodeStream,
    session: SessionId,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) {
    let (epoch, revision) = match read_first(&mut stream.recv).await {
        Ok(Some(NodeMessage::Subscribe { epoch, revision })) => (epoch, revision),
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
    // The sidecar's load counts while its stream lives.
    let _reporting = Reporting {
        registry: &registry,
        session,
    };

    if epoch.is_some_and(|e| e != current) && registry.in_grace_period(Instant::now()) {
        info!(held_epoch = ?epoch, "sidecar holds an earlier table; it keeps it until the grace period ends");
        let grace_end = tokio::time::sleep_until(registry.grace_period_end());
        tokio::pin!(grace_end);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = &mut grace_end => break,
                (recv, frame) = &mut reader => {
                    if let Err(ended) = on_frame(&registry, session, frame) {
                        return finish(&mut send, ended).await;
                    }
                    reader.set(read_frame_owned(recv, MAX_NODE_FRAME));
                }
            }
        }
    }

    let mut published = registry.subscribe();
    let mut held = (epoch, revision);
    let mut first = true;
    loop {
        published.borrow_and_update();
        let update = registry.catch_up(held.0, held.1);
        let (frames, reached) = frames_for(update, first);
        first = false;
        for frame in frames {
            match frame {
                Ok(frame) => {
                    if let Err(e) = crate::server::write_encoded(&mut send, &frame).await {
                        debug!(error = %e, "sidecar stream failed");
                        return;
                    }
                }
                Err(e) => {
                    // Only a bug can get here (every entry came through a 64 KiB node frame).
                    tracing::error!(error = %e, "cannot encode an update for a sidecar");
                    return send_error(&mut send, e).await;
                }
            }
        }
        held = reached;
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

/// Forgets the sidecar's load when its subscription ends, however it ends.
struct Reporting<'a> {
    registry: &'a Registry,
    session: SessionId,
}

impl Drop for Reporting<'_> {
    fn drop(&mut self) {
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

type Frames = Vec<Result<Vec<u8>, FrameError>>;

/// Encodes `update` as frames below the frame limit, and the (epoch, revision) the sidecar
/// holds after applying them. An empty delta is sent only as the first answer, so the sidecar
/// learns it is current.
fn frames_for(update: Update, first: bool) -> (Frames, (Option<u64>, u64)) {
    match update {
        Update::Snapshot {
            epoch,
            revision,
            instances,
            declared,
        } => {
            let chunks = chunks(instances);
            let mut declared = Some(declared);
            let count = chunks.len();
            let frames = chunks
                .into_iter()
                .enumerate()
                .map(|(i, instances)| {
                    let last = i + 1 == count;
                    encode(&DirectoryMessage::SnapshotChunk {
                        epoch,
                        revision,
                        instances,
                        declared: if last {
                            declared.take().unwrap_or_default()
                        } else {
                            Vec::new()
                        },
                        last,
                    })
                })
                .collect();
            (frames, (Some(epoch), revision))
        }
        Update::Deltas {
            epoch,
            from,
            to,
            changes,
        } => {
            if changes.is_empty() && !first {
                return (Vec::new(), (Some(epoch), to));
            }
            let mut frames = Vec::new();
            let mut at = from;
            let chunks = if changes.is_empty() {
                vec![Vec::new()]
            } else {
                chunks(changes)
            };
            for changes in chunks {
                let next = at + changes.len() as u64;
                frames.push(encode(&DirectoryMessage::Deltas {
                    epoch,
                    from_revision: at,
                    to_revision: next,
                    changes,
                }));
                at = next;
            }
            debug_assert_eq!(at, to);
            (frames, (Some(epoch), to))
        }
    }
}

fn encode(msg: &DirectoryMessage) -> Result<Vec<u8>, FrameError> {
    encode_frame(msg, MAX_DIRECTORY_FRAME)
}

/// Splits `items` into runs of at most [`MAX_ITEMS_PER_FRAME`] entries and about
/// [`FRAME_BUDGET`] encoded bytes; always at least one (possibly empty) run.
fn chunks<T: Serialize>(items: Vec<T>) -> Vec<Vec<T>> {
    let mut out = vec![Vec::new()];
    let mut bytes = 0;
    for item in items {
        let size = rmp_serde::encode::to_vec_named(&item)
            .map(|v| v.len())
            .unwrap_or(FRAME_BUDGET);
        let current = out.last_mut().expect("out is never empty");
        if !current.is_empty()
            && (current.len() == MAX_ITEMS_PER_FRAME || bytes + size > FRAME_BUDGET)
        {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        out.last_mut().expect("out is never empty").push(item);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use std::collections::BTreeMap;
    use usher_shared::codec::decode_frame;
    use usher_shared::routes::{Change, Instance, InstanceState, RouteTable};

    fn instance(id: usize, label_bytes: usize) -> Instance {
        let mut labels = BTreeMap::new();
        labels.insert("blob".to_string(), "x".repeat(label_bytes));
        Instance {
            service: "web".into(),
            version: "v1".into(),
            id: format!("i-{id}"),
            address: "127.0.0.1:8080".parse().unwrap(),
            capacity: 4,
            weight: 1,
            state: InstanceState::Up,
            started_at_ms: 1,
            labels,
        }
    }

    fn decode(frames: Frames) -> Vec<DirectoryMessage> {
        frames
            .into_iter()
            .map(|f| {
                let mut buf = BytesMut::from(&f.unwrap()[..]);
                decode_frame(&mut buf, MAX_DIRECTORY_FRAME)
                    .unwrap()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn big_snapshots_are_chunked_below_the_frame_limit_and_rebuild_the_table() {
        let instances: Vec<_> = (0..2500).map(|i| instance(i, 1000)).collect();
        let (frames, held) = frames_for(
            Update::Snapshot {
                epoch: 9,
                revision: 2500,
                instances: instances.clone(),
                declared: vec![],
            },
            true,
        );
        assert_eq!(held, (Some(9), 2500));
        let messages = decode(frames);
        assert!(messages.len() >= 5, "{} chunks", messages.len());
        let mut all = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            let DirectoryMessage::SnapshotChunk {
                instances, last, ..
            } = m
            else {
                panic!("not a chunk");
            };
            assert_eq!(*last, i + 1 == messages.len());
            all.extend(instances.iter().cloned());
        }
        assert_eq!(
            RouteTable::from_snapshot(9, 2500, all),
            RouteTable::from_snapshot(9, 2500, instances)
        );
    }

    #[test]
    fn an_empty_snapshot_is_one_last_chunk() {
        let (frames, _) = frames_for(
            Update::Snapshot {
                epoch: 1,
                revision: 0,
                instances: vec![],
                declared: vec![],
            },
            true,
        );
        let messages = decode(frames);
        assert!(
            matches!(&messages[..], [DirectoryMessage::SnapshotChunk { last: true, instances, .. }] if instances.is_empty())
        );
    }

    #[test]
    fn chunked_deltas_apply_in_order() {
        let changes: Vec<_> = (0..2500).map(|i| Change::Upsert(instance(i, 10))).collect();
        let (frames, held) = frames_for(
            Update::Deltas {
                epoch: 3,
                from: 10,
                to: 2510,
                changes,
            },
            false,
        );
        assert_eq!(held, (Some(3), 2510));
        let mut replica = RouteTable::from_snapshot(3, 10, vec![]);
        for m in decode(frames) {
            let DirectoryMessage::Deltas {
                epoch,
                from_revision,
                to_revision,
                changes,
            } = m
            else {
                panic!("not deltas");
            };
            replica
                .apply_deltas(epoch, from_revision, to_revision, changes)
                .unwrap();
        }
        assert_eq!(replica.revision, 2510);
        assert_eq!(replica.len(), 2500);
    }

    #[test]
    fn empty_deltas_only_confirm_the_first_answer() {
        let update = || Update::Deltas {
            epoch: 3,
            from: 5,
            to: 5,
            changes: vec![],
        };
        assert_eq!(frames_for(update(), true).0.len(), 1);
        assert!(frames_for(update(), false).0.is_empty());
    }
}
