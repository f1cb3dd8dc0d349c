//! The sidecar's subscription to the directory: connect, `Subscribe` with the (epoch,
//! revision) held, apply the snapshot or deltas that come back, forever. Reconnects with
//! [`Backoff::reconnect`] (Baker: retry indefinitely; SwarmKit: backoff with full jitter) and
//! logs link changes once, not once per try.
//!
//! After a directory restart the directory sends no new table for its grace period: the
//! sidecar keeps routing with the table it holds, connected, until the new table arrives,
//! adding the instances that register with the new directory meanwhile (`GraceUpserts`).

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use usher_shared::backoff::Backoff;
use usher_shared::codec::{read_frame_owned, write_frame, MAX_DIRECTORY_FRAME, MAX_NODE_FRAME};
use usher_shared::protocol::{DirectoryMessage, NodeMessage, Role, VersionLoad, FEED_FORMAT};
use usher_shared::routes::{Change, DeltaError, Instance, RouteTable, ServiceVersion};
use usher_shared::session::{directory_message, open, Session, SessionError};

use crate::load_report::{LoadReporting, REPORT_INTERVAL};
use crate::replica::{Replica, Source};

/// Bound on connecting and saying hello.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on writing one frame to the directory.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a subscription ended.
#[derive(Debug, Error)]
pub enum LinkError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("the directory did not answer or read within {0:?}")]
    Timeout(Duration),
    #[error("the directory's deltas do not apply: {0}")]
    Delta(#[from] DeltaError),
    #[error("the directory sent {0} on a subscription")]
    Unexpected(&'static str),
}

/// Follows the directory until `shutdown` fires.
pub async fn run(
    endpoint: quinn::Endpoint,
    directory: String,
    replica: Arc<Replica>,
    shutdown: CancellationToken,
) {
    let node = usher_shared::session::node_name();
    let mut backoff = Backoff::reconnect();
    // `None` before the first attempt, then whether the last attempt got connected.
    let mut was_connected: Option<bool> = None;
    loop {
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return,
            attempt = tokio::time::timeout(CONNECT_TIMEOUT, open(&endpoint, &directory, Role::Sidecar, &node)) => attempt,
        };
        let error = match attempt {
            Ok(Ok(session)) => {
                info!(epoch = session.epoch, "subscribed to the directory");
                backoff.reset();
                replica.set_connected(true);
                was_connected = Some(true);
                let connection = session.connection.clone();
                let result = tokio::select! {
                    _ = shutdown.cancelled() => {
                        connection.close(0u32.into(), b"sidecar shutting down");
                        replica.set_connected(false);
                        return;
                    }
                    result = follow(session, &replica) => result,
                };
                replica.set_connected(false);
                let result = match result {
                    LinkError::Session(e) => LinkError::Session(e.with_cause(&connection)),
                    e => e,
                };
                connection.close(0u32.into(), b"sidecar resubscribing");
                result
            }
            Ok(Err(e)) => e.into(),
            Err(_) => LinkError::Timeout(CONNECT_TIMEOUT),
        };
        match was_connected {
            Some(true) => {
                warn!(error = %error, "lost the directory; routing with the table held, reconnecting")
            }
            None => {
                warn!(error = %error, "cannot reach the directory; routing with the table held, retrying")
            }
            Some(false) => debug!(error = %error, "directory still unreachable"),
        }
        // The first retry after a lost connection comes within 100 ms (the backoff was reset).
        was_connected = Some(false);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// Subscribes, applies what the directory sends and reports this sidecar's load (every
/// [`REPORT_INTERVAL`] while busy, with a frame from the directory when one comes in the
/// period's last [`crate::load_report::REPORT_EARLY`], and at once on cold-start demand) until
/// the session fails.
async fn follow(session: Session, replica: &Replica) -> LinkError {
    let Session { mut send, recv, .. } = session;
    let (epoch, revision) = replica.held();
    if let Err(e) = write_frame(
        &mut send,
        &NodeMessage::Subscribe {
            epoch,
            revision,
            feed_format: FEED_FORMAT,
            grace_upserts: true,
        },
        MAX_NODE_FRAME,
    )
    .await
    {
        return SessionError::from(e).into();
    }
    let mut reader = pin!(read_frame_owned(recv, MAX_DIRECTORY_FRAME));
    let mut reporting = LoadReporting::new(Instant::now() + REPORT_INTERVAL);
    let mut snapshot = SnapshotBuilder::default();
    loop {
        let report_due = tokio::select! {
            (recv, frame) = &mut reader => {
                let message = match directory_message(frame) {
                    Ok(message) => message,
                    Err(e) => return e.into(),
                };
                if let Err(e) = apply(message, replica, &mut snapshot) {
                    return e;
                }
                reader.set(read_frame_owned(recv, MAX_DIRECTORY_FRAME));
                // The period's report, if nearly due, leaves with this frame's acknowledgement.
                reporting.may_ride_along(Instant::now())
            }
            _ = tokio::time::sleep_until(reporting.due_at()) => true,
            _ = replica.reservers().demand() => {
                debug!("a request waits for a version with no instance; reporting at once");
                let versions = replica.reservers().loads();
                reporting.record(&versions);
                if let Err(e) = send_load(&mut send, versions).await {
                    return e;
                }
                false
            }
        };
        if report_due {
            let versions = replica.reservers().loads();
            if reporting.periodic(&versions, Instant::now()) {
                if let Err(e) = send_load(&mut send, versions).await {
                    return e;
                }
            }
        }
    }
}

/// Sends a load report of `versions`, bounded by [`WRITE_TIMEOUT`].
async fn send_load(
    send: &mut quinn::SendStream,
    versions: Vec<VersionLoad>,
) -> Result<(), LinkError> {
    let report = NodeMessage::LoadReport { versions };
    match tokio::time::timeout(WRITE_TIMEOUT, write_frame(send, &report, MAX_NODE_FRAME)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(SessionError::from(e).into()),
        Err(_) => Err(LinkError::Timeout(WRITE_TIMEOUT)),
    }
}

/// Assembles a snapshot from its chunks.
#[derive(Debug, Default)]
struct SnapshotBuilder {
    at: Option<(u64, u64)>,
    instances: Vec<Instance>,
    declared: Vec<ServiceVersion>,
}

fn apply(
    message: DirectoryMessage,
    replica: &Replica,
    snapshot: &mut SnapshotBuilder,
) -> Result<(), LinkError> {
    match message {
        DirectoryMessage::SnapshotChunk {
            epoch,
            revision,
            instances,
            declared,
            last,
        } => {
            if snapshot.at != Some((epoch, revision)) {
                *snapshot = SnapshotBuilder {
                    at: Some((epoch, revision)),
                    ..SnapshotBuilder::default()
                };
            }
            snapshot.instances.extend(instances);
            snapshot.declared.extend(declared);
            if last {
                let SnapshotBuilder {
                    instances,
                    declared,
                    ..
                } = std::mem::take(snapshot);
                info!(
                    epoch,
                    revision,
                    instances = instances.len(),
                    "received the route table"
                );
                replica.set(
                    RouteTable::from_snapshot(epoch, revision, instances).with_declared(declared),
                    Source::Directory,
                );
            }
            Ok(())
        }
        DirectoryMessage::Deltas {
            epoch,
            from_revision,
            to_revision,
            changes,
        } => {
            replica.apply_deltas(epoch, from_revision, to_revision, &changes)?;
            debug!(
                from_revision,
                to_revision,
                changes = changes.len(),
                "applied deltas"
            );
            Ok(())
        }
        DirectoryMessage::GraceUpserts { epoch, changes } => {
            if changes
                .iter()
                .any(|c| !matches!(c, Change::Upsert(_) | Change::Declare(_)))
            {
                return Err(LinkError::Unexpected("a removal in grace-period upserts"));
            }
            replica.merge(&changes);
            debug!(
                epoch,
                changes = changes.len(),
                "added the restarted directory's instances to the table held (grace period)"
            );
            Ok(())
        }
        other => Err(LinkError::Unexpected(other.kind())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use usher_shared::routes::{Change, InstanceState};

    fn instance(id: &str) -> Instance {
        Instance {
            service: "web".into(),
            version: "v1".into(),
            id: id.into(),
            address: "127.0.0.1:9".parse().unwrap(),
            capacity: 2,
            weight: 1,
            state: InstanceState::Up,
            started_at_ms: 5,
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn chunks_then_deltas_build_the_table() {
        let replica = Replica::new(Arc::default());
        let mut snapshot = SnapshotBuilder::default();
        let chunk = |ids: &[&str], last| DirectoryMessage::SnapshotChunk {
            epoch: 5,
            revision: 2,
            instances: ids.iter().map(|i| instance(i)).collect(),
            declared: vec![],
            last,
        };
        apply(chunk(&["a"], false), &replica, &mut snapshot).unwrap();
        assert_eq!(
            replica.source(),
            Source::None,
            "not applied before the last chunk"
        );
        apply(chunk(&["b"], true), &replica, &mut snapshot).unwrap();
        assert_eq!(replica.source(), Source::Directory);
        assert_eq!(replica.table().len(), 2);
        apply(
            DirectoryMessage::Deltas {
                epoch: 5,
                from_revision: 2,
                to_revision: 3,
                changes: vec![Change::Remove(instance("a").key())],
            },
            &replica,
            &mut snapshot,
        )
        .unwrap();
        assert_eq!(replica.held(), (Some(5), 3));
        // A gap is refused and leaves the table alone.
        let gap = DirectoryMessage::Deltas {
            epoch: 5,
            from_revision: 7,
            to_revision: 8,
            changes: vec![],
        };
        assert!(matches!(
            apply(gap, &replica, &mut snapshot),
            Err(LinkError::Delta(_))
        ));
        assert_eq!(replica.held(), (Some(5), 3));
        assert_eq!(replica.table().len(), 1);
    }

    #[test]
    fn grace_upserts_join_the_table_held_which_keeps_its_revision() {
        let replica = Replica::new(Arc::default());
        let mut snapshot = SnapshotBuilder::default();
        let old = DirectoryMessage::SnapshotChunk {
            epoch: 5,
            revision: 9,
            instances: vec![instance("a")],
            declared: vec![],
            last: true,
        };
        apply(old, &replica, &mut snapshot).unwrap();
        let mut draining = instance("a");
        draining.state = InstanceState::Draining;
        let upserts = DirectoryMessage::GraceUpserts {
            epoch: 6,
            changes: vec![Change::Upsert(instance("b")), Change::Upsert(draining)],
        };
        apply(upserts, &replica, &mut snapshot).unwrap();
        let table = replica.table();
        assert_eq!(table.len(), 2);
        assert_eq!(
            table.instances().find(|i| i.id == "a").unwrap().state,
            InstanceState::Draining
        );
        assert_eq!(replica.held(), (Some(5), 9), "still the old run's revision");
        assert!(replica.route("web").is_ok());

        // A removal is not an upsert: refused, nothing changes.
        let removal = DirectoryMessage::GraceUpserts {
            epoch: 6,
            changes: vec![Change::Remove(instance("b").key())],
        };
        assert!(matches!(
            apply(removal, &replica, &mut snapshot),
            Err(LinkError::Unexpected(_))
        ));
        assert_eq!(replica.table().len(), 2);
    }
}
