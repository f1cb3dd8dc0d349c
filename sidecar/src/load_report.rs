//! When the sidecar reports its load to the directory (the autoscaler's signal; WSO2: requests
//! in flight, Waiter: outstanding = in flight + queued).
//!
//! A sidecar with requests in flight or queued reports once every [`REPORT_INTERVAL`], and once
//! more, empty, when it has none left, so that the directory stops counting them at once rather
//! than when the last report ages out. An idle sidecar sends nothing: the directory counts a
//! sidecar without a current report as no load, so an empty report every second would only
//! cost it a datagram in and, mostly, an ACK out per sidecar (1,600 to 2,000 datagrams a
//! second for 1,000 sidecars in `bench/directory`).
//!
//! A periodic report goes up to [`REPORT_EARLY`] before its time when a frame from the
//! directory has just been read: QUIC acknowledges a lone packet only after its delayed-ACK
//! timer (25 ms in quinn), so the report sent right away carries that acknowledgement, where
//! otherwise the ACK and the report would each be a datagram. While the route table changes
//! the directory sends a batch every 100 ms (SwarmKit), so nearly every report leaves with one.
//! Cold-start demand is reported at once, outside the period.

use std::time::Duration;

use tokio::time::Instant;
use usher_shared::protocol::VersionLoad;

/// How often a busy sidecar reports its load. The directory counts a report for 2 intervals
/// (`usher_directory::load::REPORT_MAX_AGE`).
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// How much before its time a periodic report may leave, to ride with the acknowledgement of a
/// frame just read from the directory: one batch period of the directory (100 ms, SwarmKit), so
/// that a table in flux always offers one. A report goes 0 to 100 ms early, and the next is due
/// a period after the one before was due: one report a period, 0.9 to 1.1 s apart while the
/// sidecar's thread keeps up.
pub const REPORT_EARLY: Duration = Duration::from_millis(100);

/// Which load reports are worth sending, and when the periodic one is due.
#[derive(Debug)]
pub struct LoadReporting {
    /// The last report sent named some load (false before the first on this subscription:
    /// the directory holds no report for it yet).
    last_had_load: bool,
    /// When the current period's report is due at the latest.
    due_at: Instant,
}

impl LoadReporting {
    /// The first period's report is due at `first`.
    pub fn new(first: Instant) -> Self {
        Self {
            last_had_load: false,
            due_at: first,
        }
    }

    /// When the current period's report is due, if no frame from the directory comes first.
    pub fn due_at(&self) -> Instant {
        self.due_at
    }

    /// Whether the period's report may go now, at `now`, with a frame from the directory just
    /// read: it is due within [`REPORT_EARLY`].
    pub fn may_ride_along(&self, now: Instant) -> bool {
        now + REPORT_EARLY >= self.due_at
    }

    /// The period's report is decided at `now`: whether a report of `versions` (the versions
    /// with load, as [`crate::reserver::Reservers::loads`] gives them) is worth sending, taking
    /// it as sent. The next period's report is due [`REPORT_INTERVAL`] after this one was due,
    /// so reports sent early keep the rate at one a period; after a report that went late
    /// (a busy thread), the next is due at least `REPORT_INTERVAL - REPORT_EARLY` later.
    pub fn periodic(&mut self, versions: &[VersionLoad], now: Instant) -> bool {
        self.due_at = (self.due_at + REPORT_INTERVAL).max(now + REPORT_INTERVAL - REPORT_EARLY);
        self.record(versions)
    }

    /// A report of `versions` sent out of period (cold-start demand); returns whether it would
    /// have been worth sending in period.
    pub fn record(&mut self, versions: &[VersionLoad]) -> bool {
        let has_load = !versions.is_empty();
        let worth = has_load || self.last_had_load;
        self.last_had_load = has_load;
        worth
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy() -> Vec<VersionLoad> {
        vec![VersionLoad {
            service: "web".into(),
            version: "v1".into(),
            in_flight: 1,
            queued: 0,
            instances: vec![],
        }]
    }

    #[test]
    fn load_is_reported_while_there_is_some_and_once_more_when_it_ends() {
        let busy = busy();
        let t0 = Instant::now();
        let mut reporting = LoadReporting::new(t0);
        let sent: Vec<bool> = [&[][..], &[], &busy, &busy, &[], &[], &busy, &[]]
            .into_iter()
            .map(|versions| reporting.periodic(versions, t0))
            .collect();
        assert_eq!(
            sent,
            [false, false, true, true, true, false, true, true],
            "idle: nothing; busy: every period; the first idle period after load: one empty report"
        );
    }

    #[test]
    fn a_report_rides_with_a_frame_read_at_most_one_batch_period_early() {
        let t0 = Instant::now();
        let mut reporting = LoadReporting::new(t0 + REPORT_INTERVAL);
        assert_eq!(reporting.due_at(), t0 + REPORT_INTERVAL);
        // A frame read 101 ms before the report is due: the report waits.
        let early = t0 + REPORT_INTERVAL - REPORT_EARLY - Duration::from_millis(1);
        assert!(!reporting.may_ride_along(early));
        // One read 100 ms before: the report goes with it, and the next is due a period after
        // this one was due, not after it went: one report a period.
        let with_frame = early + Duration::from_millis(1);
        assert!(reporting.may_ride_along(with_frame));
        assert!(reporting.periodic(&busy(), with_frame));
        assert_eq!(reporting.due_at(), t0 + REPORT_INTERVAL * 2);
        assert!(!reporting.may_ride_along(with_frame + Duration::from_millis(500)));
        // No frame comes: the report goes when due.
        assert!(reporting.periodic(&busy(), t0 + REPORT_INTERVAL * 2));
        assert_eq!(reporting.due_at(), t0 + REPORT_INTERVAL * 3);
        // A report that went late (a busy thread) does not make the next one hurry.
        let late = t0 + REPORT_INTERVAL * 3 + Duration::from_millis(700);
        assert!(reporting.periodic(&busy(), late));
        assert_eq!(reporting.due_at(), late + REPORT_INTERVAL - REPORT_EARLY);
    }

    #[test]
    fn a_report_out_of_period_does_not_move_the_period() {
        let t0 = Instant::now();
        let mut reporting = LoadReporting::new(t0 + REPORT_INTERVAL);
        assert!(reporting.record(&busy()), "cold-start demand");
        assert_eq!(reporting.due_at(), t0 + REPORT_INTERVAL);
        assert!(
            reporting.periodic(&[], t0 + REPORT_INTERVAL),
            "the load is gone: one empty report"
        );
    }
}
