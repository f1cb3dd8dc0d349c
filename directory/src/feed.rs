//! The route-table feed as sidecars receive it: every published batch encoded once, into the
//! frames each subscriber that holds the batch's start revision is sent (the same bytes for
//! all of them), and the latest snapshot, encoded once and reused while it is recent.
//!
//! Encoding per subscriber costs O(changes × sidecars); at 10,000 instances and 1,000
//! sidecars that was most of the directory's CPU and kept it from acknowledging heartbeats in
//! time (docs/BENCHMARKS.md, issue 5). Here a batch costs one encoding however many sidecars
//! receive it; only a sidecar that holds a revision inside a batch (after a snapshot) or older
//! than the retained batches gets frames of its own, once.
//!
//! Each batch is kept in both encodings (named fields, and compact for sidecars of this
//! build's [`usher_shared::protocol::FEED_FORMAT`]); the two share revision boundaries, so a
//! subscriber's position does not depend on its encoding. Snapshots are cached per encoding.
//!
//! Pure: [`crate::registry::Registry`] holds a [`Feed`] behind its lock and decides when to
//! publish.

use std::collections::VecDeque;

use bytes::Bytes;
use serde::Serialize;
use usher_shared::codec::{encode_frame_as, Encoding, FrameError, MAX_DIRECTORY_FRAME};
use usher_shared::protocol::DirectoryMessage;
use usher_shared::routes::{Change, Instance, ServiceVersion};

/// Most entries in one snapshot chunk or delta frame.
pub const MAX_ITEMS_PER_FRAME: usize = 1000;

/// Bytes of entries per frame: half the frame limit leaves room for the envelope.
pub const FRAME_BUDGET: usize = MAX_DIRECTORY_FRAME / 2;

/// Changes the retained batches hold at most (older batches are dropped first); a sidecar
/// further behind is caught up from the route log, or with a snapshot.
pub const RETAINED_CHANGES: usize = 10_000;

/// How many changes a cached snapshot may be behind the table and still be sent (the sidecar
/// then receives the changes since, as deltas).
pub const MAX_SNAPSHOT_LAG: u64 = 1_000;

/// Encoded frames, ready to write; cloning one shares its bytes.
pub type Frames = Vec<Bytes>;

/// One value per [`Encoding`] (as JSON: `{"named": .., "compact": ..}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ByEncoding<T> {
    pub named: T,
    pub compact: T,
}

impl<T> ByEncoding<T> {
    pub fn get(&self, encoding: Encoding) -> &T {
        match encoding {
            Encoding::Named => &self.named,
            Encoding::Compact => &self.compact,
        }
    }

    pub fn get_mut(&mut self, encoding: Encoding) -> &mut T {
        match encoding {
            Encoding::Named => &mut self.named,
            Encoding::Compact => &mut self.compact,
        }
    }
}

/// The same frames in each encoding: the same messages, the same revision boundaries.
pub type Encoded = ByEncoding<Frames>;

/// One published batch: the frames that take a sidecar from revision `from` to `to`.
#[derive(Debug)]
struct Batch {
    from: u64,
    to: u64,
    frames: Encoded,
}

/// An encoded snapshot of the table at `revision` of `epoch`.
#[derive(Debug)]
struct Snapshot {
    epoch: u64,
    revision: u64,
    frames: Frames,
}

/// Where a revision stands in the retained batches.
#[derive(Debug, PartialEq, Eq)]
pub enum Position {
    /// It starts a retained batch: these frames (of that batch and every later one) reach
    /// revision `to`.
    Start { frames: Frames, to: u64 },
    /// It is inside the retained batch that ends at `boundary`: the sidecar needs the changes
    /// up to `boundary` encoded for it, then the batches from there.
    Inside { boundary: u64 },
    /// It is older than every retained batch, or no batch is retained.
    NotRetained,
}

/// The published batches, oldest first and contiguous, and the latest encoded snapshot in
/// each encoding (named, compact).
#[derive(Debug, Default)]
pub struct Feed {
    batches: VecDeque<Batch>,
    retained: usize,
    snapshots: ByEncoding<Option<Snapshot>>,
}

impl Feed {
    /// Appends the batch from `from` to `to`. A batch that does not follow the last one
    /// (the changes between could not be encoded) starts the feed again.
    pub fn push(&mut self, from: u64, to: u64, frames: Encoded) {
        if self.batches.back().is_some_and(|last| last.to != from) {
            self.batches.clear();
            self.retained = 0;
        }
        self.retained += (to - from) as usize;
        self.batches.push_back(Batch { from, to, frames });
        while self.retained > RETAINED_CHANGES && self.batches.len() > 1 {
            if let Some(old) = self.batches.pop_front() {
                self.retained -= (old.to - old.from) as usize;
            }
        }
    }

    /// Forgets every batch (the changes since the last one were not all kept).
    pub fn reset(&mut self) {
        self.batches.clear();
        self.retained = 0;
    }

    /// Where `revision` stands among the retained batches (see [`Position`]); the frames are
    /// those of `encoding`.
    pub fn position(&self, revision: u64, encoding: Encoding) -> Position {
        let first = self.batches.partition_point(|b| b.to <= revision);
        let Some(batch) = self.batches.get(first) else {
            return Position::NotRetained;
        };
        if batch.from > revision {
            return Position::NotRetained;
        }
        if batch.from < revision {
            return Position::Inside { boundary: batch.to };
        }
        let later = self.batches.range(first..);
        let frames = later
            .clone()
            .flat_map(|b| b.frames.get(encoding).iter().cloned())
            .collect();
        let to = later.last().map_or(revision, |b| b.to);
        Position::Start { frames, to }
    }

    /// The cached snapshot's frames in `encoding` and its revision, if it is of `epoch` and at
    /// most [`MAX_SNAPSHOT_LAG`] changes behind `current`.
    pub fn snapshot(&self, epoch: u64, current: u64, encoding: Encoding) -> Option<(Frames, u64)> {
        self.snapshots
            .get(encoding)
            .as_ref()
            .filter(|s| s.epoch == epoch && s.revision <= current)
            .filter(|s| current - s.revision <= MAX_SNAPSHOT_LAG)
            .map(|s| (s.frames.clone(), s.revision))
    }

    /// Caches `frames` as the snapshot in `encoding` at `revision` of `epoch`, unless a newer
    /// one is cached.
    pub fn cache_snapshot(
        &mut self,
        epoch: u64,
        revision: u64,
        encoding: Encoding,
        frames: Frames,
    ) {
        let cached = self.snapshots.get_mut(encoding);
        if cached
            .as_ref()
            .is_some_and(|s| s.epoch == epoch && s.revision > revision)
        {
            return;
        }
        *cached = Some(Snapshot {
            epoch,
            revision,
            frames,
        });
    }
}

/// Encodes the changes after revision `from` of `epoch` (`changes[i]` is revision
/// `from + i + 1`) as delta frames below the frame limit, in `encoding`; no changes is one
/// empty frame (it tells a new subscriber it is current).
///
/// Errors only if one change alone exceeds the frame limit (every change came through a
/// 64 KiB node frame, so only a bug can).
pub fn encode_deltas(
    epoch: u64,
    from: u64,
    changes: Vec<Change>,
    encoding: Encoding,
) -> Result<Frames, FrameError> {
    deltas(epoch, from, changes)
        .iter()
        .map(|m| encode(m, encoding))
        .collect()
}

/// [`encode_deltas`] in both encodings, for a published batch. Errors as [`encode_deltas`].
pub fn encode_batch(epoch: u64, from: u64, changes: Vec<Change>) -> Result<Encoded, FrameError> {
    let messages = deltas(epoch, from, changes);
    let all = |encoding| -> Result<Frames, FrameError> {
        messages.iter().map(|m| encode(m, encoding)).collect()
    };
    Ok(Encoded {
        named: all(Encoding::Named)?,
        compact: all(Encoding::Compact)?,
    })
}

/// The `Deltas` messages that carry `changes` after revision `from`, each below the frame
/// limit; at least one.
fn deltas(epoch: u64, from: u64, changes: Vec<Change>) -> Vec<DirectoryMessage> {
    let mut at = from;
    chunks(changes)
        .into_iter()
        .map(|changes| {
            let next = at + changes.len() as u64;
            let message = DirectoryMessage::Deltas {
                epoch,
                from_revision: at,
                to_revision: next,
                changes,
            };
            at = next;
            message
        })
        .collect()
}

/// Encodes the table at `revision` of `epoch` as snapshot chunks below the frame limit, the
/// declared versions in the last one (Baker: the full table for a new or lost subscriber), in
/// `encoding`.
///
/// Errors as [`encode_deltas`].
pub fn encode_snapshot(
    epoch: u64,
    revision: u64,
    instances: Vec<Instance>,
    declared: Vec<ServiceVersion>,
    encoding: Encoding,
) -> Result<Frames, FrameError> {
    let chunks = chunks(instances);
    let count = chunks.len();
    let mut declared = Some(declared);
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, instances)| {
            let last = i + 1 == count;
            encode(
                &DirectoryMessage::SnapshotChunk {
                    epoch,
                    revision,
                    instances,
                    declared: if last {
                        declared.take().unwrap_or_default()
                    } else {
                        Vec::new()
                    },
                    last,
                },
                encoding,
            )
        })
        .collect()
}

/// Encodes `changes` (upserts and declarations of this run, `epoch`) as `GraceUpserts`
/// messages below the frame limit, for a sidecar that holds a table of the previous run during
/// the grace period; named fields (a grace period is rare and short). None for no changes.
///
/// Errors as [`encode_deltas`].
pub fn encode_grace_upserts(epoch: u64, changes: Vec<Change>) -> Result<Frames, FrameError> {
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    chunks(changes)
        .into_iter()
        .map(|changes| {
            encode(
                &DirectoryMessage::GraceUpserts { epoch, changes },
                Encoding::Named,
            )
        })
        .collect()
}

fn encode(msg: &DirectoryMessage, encoding: Encoding) -> Result<Bytes, FrameError> {
    encode_frame_as(msg, MAX_DIRECTORY_FRAME, encoding).map(Bytes::from)
}

/// Splits `items` into runs of at most [`MAX_ITEMS_PER_FRAME`] entries and about
/// [`FRAME_BUDGET`] encoded bytes with named fields (compact is smaller, so the same runs fit
/// either encoding); always at least one (possibly empty) run.
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
    use usher_shared::routes::{InstanceState, RouteTable};

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

    fn decode(frames: &Frames) -> Vec<DirectoryMessage> {
        frames
            .iter()
            .map(|f| {
                let mut buf = BytesMut::from(&f[..]);
                decode_frame(&mut buf, MAX_DIRECTORY_FRAME)
                    .unwrap()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn big_snapshots_are_chunked_below_the_frame_limit_and_rebuild_the_table() {
        let instances: Vec<_> = (0..2500).map(|i| instance(i, 1000)).collect();
        let frames = encode_snapshot(9, 2500, instances.clone(), vec![], Encoding::Named).unwrap();
        let messages = decode(&frames);
        assert!(messages.len() >= 5, "{} chunks", messages.len());
        let mut all = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            let DirectoryMessage::SnapshotChunk {
                instances,
                last,
                revision,
                ..
            } = m
            else {
                panic!("not a chunk");
            };
            assert_eq!(*revision, 2500);
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
        let messages = decode(&encode_snapshot(1, 0, vec![], vec![], Encoding::Compact).unwrap());
        assert!(
            matches!(&messages[..], [DirectoryMessage::SnapshotChunk { last: true, instances, .. }] if instances.is_empty())
        );
    }

    #[test]
    fn chunked_deltas_apply_in_order() {
        let changes: Vec<_> = (0..2500).map(|i| Change::Upsert(instance(i, 10))).collect();
        let frames = encode_deltas(3, 10, changes, Encoding::Compact).unwrap();
        assert!(frames.len() >= 3);
        let mut replica = RouteTable::from_snapshot(3, 10, vec![]);
        for m in decode(&frames) {
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
                .apply_deltas(epoch, from_revision, to_revision, &changes)
                .unwrap();
        }
        assert_eq!(replica.revision, 2510);
        assert_eq!(replica.len(), 2500);
    }

    #[test]
    fn no_changes_is_one_empty_frame() {
        let messages = decode(&encode_deltas(3, 5, vec![], Encoding::Named).unwrap());
        assert!(matches!(
            &messages[..],
            [DirectoryMessage::Deltas { from_revision: 5, to_revision: 5, changes, .. }] if changes.is_empty()
        ));
    }

    fn frame(tag: u8) -> Frames {
        vec![Bytes::from(vec![tag])]
    }

    /// A batch whose named frame is `tag` and compact frame `tag + 100`.
    fn batch(tag: u8) -> Encoded {
        Encoded {
            named: frame(tag),
            compact: frame(tag + 100),
        }
    }

    #[test]
    fn a_batch_is_the_same_messages_in_both_encodings_and_compact_is_smaller() {
        let changes: Vec<_> = (0..2500)
            .map(|i| Change::Upsert(instance(i, 10)))
            .chain([Change::Remove(instance(7, 0).key())])
            .collect();
        let batch = encode_batch(3, 10, changes).unwrap();
        assert!(batch.named.len() >= 3, "chunked");
        assert_eq!(
            decode(&batch.named),
            decode(&batch.compact),
            "same messages, same boundaries"
        );
        let size = |frames: &Frames| frames.iter().map(Bytes::len).sum::<usize>();
        assert!(
            size(&batch.compact) * 2 < size(&batch.named),
            "{} compact bytes against {} named",
            size(&batch.compact),
            size(&batch.named)
        );
    }

    #[test]
    fn a_revision_at_a_batch_start_gets_the_shared_frames_of_every_later_batch() {
        let mut feed = Feed::default();
        assert_eq!(feed.position(0, Encoding::Named), Position::NotRetained);
        feed.push(0, 3, batch(1));
        feed.push(3, 5, batch(2));
        feed.push(5, 9, batch(3));
        assert_eq!(
            feed.position(3, Encoding::Named),
            Position::Start {
                frames: vec![Bytes::from(vec![2]), Bytes::from(vec![3])],
                to: 9
            }
        );
        assert_eq!(
            feed.position(0, Encoding::Named),
            Position::Start {
                frames: [frame(1), frame(2), frame(3)].concat(),
                to: 9
            }
        );
        assert_eq!(
            feed.position(3, Encoding::Compact),
            Position::Start {
                frames: [frame(102), frame(103)].concat(),
                to: 9
            },
            "each subscriber gets its encoding's frames"
        );
        for encoding in [Encoding::Named, Encoding::Compact] {
            assert_eq!(feed.position(4, encoding), Position::Inside { boundary: 5 });
            assert_eq!(feed.position(1, encoding), Position::Inside { boundary: 3 });
            assert_eq!(
                feed.position(9, encoding),
                Position::NotRetained,
                "nothing after it"
            );
        }
        // The frames are shared, not copied.
        let Position::Start { frames, .. } = feed.position(5, Encoding::Compact) else {
            panic!()
        };
        assert_eq!(
            frames[0].as_ptr(),
            feed.batches[2].frames.compact[0].as_ptr()
        );
    }

    #[test]
    fn old_batches_are_dropped_and_a_gap_starts_again() {
        let mut feed = Feed::default();
        let step = RETAINED_CHANGES as u64 / 2;
        feed.push(0, step, batch(1));
        feed.push(step, 2 * step, batch(2));
        feed.push(2 * step, 3 * step, batch(3));
        assert_eq!(
            feed.position(0, Encoding::Named),
            Position::NotRetained,
            "dropped"
        );
        assert!(
            matches!(feed.position(step, Encoding::Named), Position::Start { to, .. } if to == 3 * step)
        );
        feed.push(3 * step + 7, 3 * step + 9, batch(4));
        assert_eq!(feed.position(step, Encoding::Named), Position::NotRetained);
        assert!(matches!(
            feed.position(3 * step + 7, Encoding::Named),
            Position::Start { .. }
        ));
        feed.reset();
        assert_eq!(
            feed.position(3 * step + 7, Encoding::Named),
            Position::NotRetained
        );
    }

    #[test]
    fn a_cached_snapshot_is_reused_while_recent() {
        let mut feed = Feed::default();
        let named = Encoding::Named;
        assert_eq!(feed.snapshot(1, 0, named), None);
        feed.cache_snapshot(1, 100, named, frame(1));
        assert_eq!(feed.snapshot(1, 100, named), Some((frame(1), 100)));
        assert_eq!(
            feed.snapshot(1, 100, Encoding::Compact),
            None,
            "cached per encoding"
        );
        assert_eq!(
            feed.snapshot(1, 100 + MAX_SNAPSHOT_LAG, named),
            Some((frame(1), 100))
        );
        assert_eq!(
            feed.snapshot(1, 101 + MAX_SNAPSHOT_LAG, named),
            None,
            "too old"
        );
        assert_eq!(feed.snapshot(2, 100, named), None, "another epoch");
        assert_eq!(feed.snapshot(1, 99, named), None, "ahead of the table");
        feed.cache_snapshot(1, 50, named, frame(2));
        assert_eq!(
            feed.snapshot(1, 100, named),
            Some((frame(1), 100)),
            "kept the newer"
        );
        feed.cache_snapshot(1, 150, named, frame(3));
        assert_eq!(feed.snapshot(1, 150, named), Some((frame(3), 150)));
        feed.cache_snapshot(1, 150, Encoding::Compact, frame(4));
        assert_eq!(
            feed.snapshot(1, 150, Encoding::Compact),
            Some((frame(4), 150))
        );
        assert_eq!(feed.snapshot(1, 150, named), Some((frame(3), 150)));
    }
}
