//! When to publish route-table changes to sidecars (SwarmKit: 100 changes or 100 ms, whichever
//! comes first), and at once for an urgent change: the first `up` instance of a version that
//! requests may be waiting for (a cold start should not wait out the batch). Pure: the caller
//! passes the time.

use std::time::Duration;

use tokio::time::Instant;

/// Publish once this many changes are pending (SwarmKit).
pub const MAX_BATCH_CHANGES: usize = 100;
/// Publish at most this long after the first pending change (SwarmKit).
pub const MAX_BATCH_DELAY: Duration = Duration::from_millis(100);

/// Counts unpublished changes and says when they are due.
#[derive(Debug, Default, Clone)]
pub struct Batcher {
    pending: usize,
    first_at: Option<Instant>,
    urgent: bool,
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

    /// When the pending changes must be published, or `None` when nothing is pending.
    pub fn due_at(&self) -> Option<Instant> {
        let first = self.first_at?;
        Some(if self.urgent || self.pending >= MAX_BATCH_CHANGES {
            first
        } else {
            first + MAX_BATCH_DELAY
        })
    }

    /// If the batch is due at `now`, empties it and returns true.
    pub fn take_if_due(&mut self, now: Instant) -> bool {
        match self.due_at() {
            Some(at) if at <= now => {
                *self = Self::default();
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

    #[test]
    fn a_lone_change_waits_for_the_batch_period() {
        let t0 = Instant::now();
        let mut b = Batcher::default();
        assert_eq!(b.due_at(), None);
        assert!(!b.take_if_due(t0));
        b.record(t0);
        b.record(t0 + Duration::from_millis(60));
        assert_eq!(
            b.due_at(),
            Some(t0 + MAX_BATCH_DELAY),
            "timed from the first change"
        );
        assert!(!b.take_if_due(t0 + Duration::from_millis(99)));
        assert!(b.take_if_due(t0 + MAX_BATCH_DELAY));
        assert_eq!(b.pending(), 0);
        assert_eq!(b.due_at(), None);
    }

    #[test]
    fn a_full_batch_is_due_at_once() {
        let t0 = Instant::now();
        let mut b = Batcher::default();
        let later = t0 + Duration::from_millis(10);
        for i in 1..MAX_BATCH_CHANGES {
            b.record(t0);
            assert!(!b.take_if_due(later), "change {i} does not fill the batch");
        }
        b.record(t0);
        assert!(b.take_if_due(later));
    }

    #[test]
    fn an_urgent_change_makes_the_batch_due_at_once() {
        let t0 = Instant::now();
        let mut b = Batcher::default();
        b.record(t0);
        b.record_urgent(t0 + Duration::from_millis(5));
        assert_eq!(b.due_at(), Some(t0), "with the changes before it");
        assert!(b.take_if_due(t0 + Duration::from_millis(5)));
        b.record(t0 + Duration::from_millis(6));
        assert_eq!(
            b.due_at(),
            Some(t0 + Duration::from_millis(6) + MAX_BATCH_DELAY),
            "the next batch waits again"
        );
    }
}
