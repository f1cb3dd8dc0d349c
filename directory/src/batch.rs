//! When to publish route-table changes to sidecars (SwarmKit: "sent in batches of 100 or every
//! 100 ms, whichever occurs first"), and at once for an urgent change: the first `up` instance
//! of a version that requests may be waiting for (a cold start should not wait out the batch).
//! Pure: the caller passes the time.
//!
//! The period runs from the previous publication, as SwarmKit's batch timer is reset at each
//! send: a change waits at most 100 ms, and changes made while the previous batch was being
//! delivered wait only for the rest of its period. (Timing it from the first pending change
//! instead added the time the directory spent delivering a batch to the next one's wait:
//! batches came every ~134 ms, not 100, at 1,000 sidecars; docs/BENCHMARKS.md.) A change
//! after a quiet period of at least 100 ms is due at once, since the period has already run.

use std::time::Duration;

use tokio::time::Instant;

/// Publish once this many changes are pending (SwarmKit).
pub const MAX_BATCH_CHANGES: usize = 100;
/// Publish at most this long after the previous publication (SwarmKit).
pub const MAX_BATCH_DELAY: Duration = Duration::from_millis(100);

/// Counts unpublished changes and says when they are due.
#[derive(Debug, Default, Clone)]
pub struct Batcher {
    pending: usize,
    first_at: Option<Instant>,
    urgent: bool,
    /// When the previous batch was taken (`None` before the first).
    published_at: Option<Instant>,
}

impl Batcher {
    /// Records one change made at `now`; a full batch is due at once (see [`Batcher::due_at`]).
    pub fn record(&mut self, now: Instant) {
        self.pending += 1;
        self.first_at.get_or_insert(now);
    }

    /// Records one change made at `now` that must not wait: the batch is due at once.
    pub fn record_urgent(&mut self, now: Instant) {
        self.record(now);
        self.urgent = true;
    }

    /// When the pending changes must be published, or `None` when nothing is pending: at once
    /// (the first change's time) for a full or urgent batch or when the previous batch is at
    /// least [`MAX_BATCH_DELAY`] old, else [`MAX_BATCH_DELAY`] after the previous batch.
    pub fn due_at(&self) -> Option<Instant> {
        let first = self.first_at?;
        if self.urgent || self.pending >= MAX_BATCH_CHANGES {
            return Some(first);
        }
        Some(match self.published_at {
            Some(published) => first.max(published + MAX_BATCH_DELAY),
            None => first,
        })
    }

    /// If the batch is due at `now`, empties it, starts the next period at `now` and returns
    /// true.
    pub fn take_if_due(&mut self, now: Instant) -> bool {
        match self.due_at() {
            Some(at) if at <= now => {
                *self = Self {
                    published_at: Some(now),
                    ..Self::default()
                };
                true
            }
            _ => false,
        }
    }

    pub fn pending(&self) -> usize {
        self.pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A batcher whose previous batch was taken at `at`.
    fn published_at(at: Instant) -> Batcher {
        let mut b = Batcher::default();
        b.record(at);
        assert!(b.take_if_due(at));
        b
    }

    #[test]
    fn a_change_after_a_quiet_period_is_due_at_once() {
        let t0 = Instant::now();
        let mut b = Batcher::default();
        assert_eq!(b.due_at(), None);
        assert!(!b.take_if_due(t0));
        b.record(t0);
        assert_eq!(b.due_at(), Some(t0), "nothing was published yet");
        assert!(b.take_if_due(t0));
        assert_eq!(b.pending(), 0);
        assert_eq!(b.due_at(), None);

        let quiet = t0 + MAX_BATCH_DELAY + 30 * MS;
        b.record(quiet);
        assert_eq!(b.due_at(), Some(quiet), "the period ran out meanwhile");
    }

    #[test]
    fn changes_within_the_period_wait_for_its_end_not_100_ms_more() {
        let t0 = Instant::now();
        let mut b = published_at(t0);
        b.record(t0 + 40 * MS);
        b.record(t0 + 60 * MS);
        assert_eq!(
            b.due_at(),
            Some(t0 + MAX_BATCH_DELAY),
            "timed from the previous batch, not from the first change"
        );
        assert!(!b.take_if_due(t0 + 99 * MS));
        assert!(b.take_if_due(t0 + MAX_BATCH_DELAY));
        b.record(t0 + 101 * MS);
        assert_eq!(
            b.due_at(),
            Some(t0 + 2 * MAX_BATCH_DELAY),
            "the next period starts when the batch was taken"
        );
    }

    #[test]
    fn a_late_publication_starts_the_next_period_when_it_happened() {
        let t0 = Instant::now();
        let mut b = published_at(t0);
        b.record(t0 + 10 * MS);
        let late = t0 + 130 * MS;
        assert!(b.take_if_due(late));
        b.record(late + MS);
        assert_eq!(b.due_at(), Some(late + MAX_BATCH_DELAY));
    }

    #[test]
    fn a_full_batch_is_due_at_once() {
        let t0 = Instant::now();
        let mut b = published_at(t0);
        let later = t0 + 10 * MS;
        for i in 1..MAX_BATCH_CHANGES {
            b.record(later);
            assert!(!b.take_if_due(later), "change {i} does not fill the batch");
        }
        b.record(later);
        assert!(b.take_if_due(later));
        b.record(later + MS);
        assert_eq!(
            b.due_at(),
            Some(later + MAX_BATCH_DELAY),
            "the batch after a full one waits its period (SwarmKit: 340, 360, then 460 ms)"
        );
    }

    #[test]
    fn an_urgent_change_makes_the_batch_due_at_once() {
        let t0 = Instant::now();
        let mut b = published_at(t0);
        b.record(t0 + MS);
        b.record_urgent(t0 + 5 * MS);
        assert_eq!(b.due_at(), Some(t0 + MS), "with the changes before it");
        assert!(b.take_if_due(t0 + 5 * MS));
        b.record(t0 + 6 * MS);
        assert_eq!(
            b.due_at(),
            Some(t0 + 5 * MS + MAX_BATCH_DELAY),
            "the next batch waits again"
        );
    }
}
