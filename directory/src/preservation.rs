//! Self-preservation: withdrawals by TTL are held while too much of the fleet is silent at once.
//!
//! An instance whose TTL lapses is withdrawn from every sidecar's table (DESIGN.md: Presence).
//! That is right when a host dies, and wrong when the directory itself fell behind (its one
//! thread starved, heartbeats dropped in its socket) or lost its network: then a whole fleet's
//! TTLs lapse together, every sidecar loses its instances, and every agent registers again,
//! each change fanned out to every sidecar while the directory is already behind. So when, at a
//! withdrawal, more than a threshold share of the registered instances has been silent for
//! 1.5 heartbeat intervals ([`silent_after`]), the directory suspects itself and holds the
//! withdrawals: the instances stay in the table, and each comes back to life when its agent's
//! next heartbeat arrives. The hold ends when every held instance was heard from again, when
//! the silent share falls back under the threshold (the held instances still silent then get
//! the grace period of a directory start, 2 TTLs by default: their agents may be reconnecting
//! to a directory that just caught up), or after at most `max_hold`, when the silence is taken
//! for real (Eureka's self-preservation: renewals under 85% of those expected stop expiries;
//! Kubernetes' node lifecycle controller stops evictions in a fully disrupted zone). Meanwhile a sidecar that cannot connect to a held instance ejects it and retries the
//! request elsewhere, as for any instance failure.
//!
//! Fleets under `min_instances` are never held: there one dead host is a large share.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

/// How long unheard an instance counts as silent: one and a half heartbeat intervals, so it
/// missed a heartbeat (they come every interval, ±10%); its TTL lapses at three. Instances
/// that stopped together (their last heartbeats up to an interval apart) all count as silent
/// when the first of them lapses.
pub fn silent_after(interval: Duration) -> Duration {
    interval * 3 / 2
}

/// Default share of silent instances above which withdrawals are held, in percent (Eureka:
/// renewals under 85% of those expected).
pub const DEFAULT_THRESHOLD_PERCENT: u8 = 15;

/// Default fleet size under which withdrawals are never held (Kubernetes'
/// `--large-cluster-size-threshold`).
pub const DEFAULT_MIN_INSTANCES: usize = 50;

/// A hold lasts at most this many TTLs (30 s at the default 1 s heartbeat interval).
pub const MAX_HOLD_TTLS: u32 = 10;

/// How self-preservation is configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreservationSettings {
    /// Share of registered instances, 0.0..=1.0, that must be silent for withdrawals to be
    /// held; 0 turns self-preservation off.
    pub threshold: f64,
    /// Fleets smaller than this are never held.
    pub min_instances: usize,
    /// How long since it was last heard from an instance counts as silent.
    pub silent_after: Duration,
    /// The longest a hold lasts.
    pub max_hold: Duration,
}

impl PreservationSettings {
    /// The defaults for a heartbeat interval and its TTL.
    pub fn new(
        threshold_percent: u8,
        min_instances: usize,
        interval: Duration,
        ttl: Duration,
    ) -> Self {
        Self {
            threshold: f64::from(threshold_percent.min(100)) / 100.0,
            min_instances,
            silent_after: silent_after(interval),
            max_hold: ttl * MAX_HOLD_TTLS,
        }
    }

    /// Self-preservation off: every lapsed instance is withdrawn at once.
    pub fn off() -> Self {
        Self {
            threshold: 0.0,
            min_instances: usize::MAX,
            silent_after: Duration::MAX,
            max_hold: Duration::ZERO,
        }
    }
}

/// Whether a hold is on, and since when. The held instances themselves are the lapsed keys of
/// [`crate::presence::Presence`]: a held instance heard from again, or withdrawn some other way
/// (deregistered, registered by another session), leaves the hold by leaving that set.
#[derive(Debug)]
pub struct SelfPreservation {
    settings: PreservationSettings,
    /// When the current hold began, while the silent share is above the threshold (also after
    /// `max_hold`, when withdrawals go on regardless, until the share falls back).
    since: Option<Instant>,
    /// The current hold has lasted `max_hold`: withdrawals go on regardless.
    exhausted: bool,
    /// Holds begun since the directory started.
    holds: u64,
}

impl SelfPreservation {
    pub fn new(settings: PreservationSettings) -> Self {
        Self {
            settings,
            since: None,
            exhausted: false,
            holds: 0,
        }
    }

    /// Whether a hold is on (it ends at a later [`Self::decide`], even with nothing lapsing).
    pub fn holding(&self) -> bool {
        self.since.is_some() && !self.exhausted
    }

    /// Holds begun since the directory started.
    pub fn holds(&self) -> u64 {
        self.holds
    }

    /// Decides, at `now`, on the `lapsed` instances: every instance whose TTL lapsed and that
    /// was neither heard from again nor withdrawn since, those that lapsed just now and those
    /// already held alike. `registered` counts every instance not withdrawn (the lapsed ones
    /// included); `silent_elsewhere` counts the registered ones, not lapsed, last heard from
    /// before `now - silent_after` (called only when the fleet is large enough to hold).
    pub fn decide(
        &mut self,
        now: Instant,
        lapsed: usize,
        registered: usize,
        silent_elsewhere: impl FnOnce(Instant) -> usize,
    ) -> Verdict {
        if lapsed == 0 {
            if !self.exhausted {
                if let Some(since) = self.since.take() {
                    info!(
                        held_for = ?now.saturating_duration_since(since),
                        "self-preservation ended: every held instance was heard from again"
                    );
                }
            }
            return Verdict::Withdraw;
        }
        let s = self.settings;
        let eligible = s.threshold > 0.0 && registered >= s.min_instances.max(1);
        let silent = if eligible {
            let before = now.checked_sub(s.silent_after).unwrap_or(now);
            lapsed + silent_elsewhere(before)
        } else {
            0
        };
        let share = silent as f64 / registered.max(1) as f64;
        if !eligible || share <= s.threshold {
            let exhausted = std::mem::take(&mut self.exhausted);
            return match self.since.take() {
                Some(since) if !exhausted => {
                    info!(
                        held_for = ?now.saturating_duration_since(since),
                        still_silent = lapsed,
                        silent_percent = format!("{:.1}", share * 100.0),
                        "self-preservation ended: the silent share is back under the threshold; the instances still silent have the grace period to be heard from"
                    );
                    Verdict::Renew
                }
                _ => Verdict::Withdraw,
            };
        }
        let since = *self.since.get_or_insert_with(|| {
            self.holds += 1;
            warn!(
                silent,
                registered,
                silent_percent = format!("{:.1}", share * 100.0),
                threshold_percent = format!("{:.0}", s.threshold * 100.0),
                max_hold = ?s.max_hold,
                "self-preservation: too many instances are silent at once, so the directory or its network is likely at fault; holding TTL withdrawals"
            );
            now
        });
        let held_for = now.saturating_duration_since(since);
        if held_for < s.max_hold {
            return Verdict::Hold;
        }
        if !self.exhausted {
            self.exhausted = true;
            warn!(
                withdrawn = lapsed,
                held_for = ?held_for,
                "self-preservation: the longest hold is over; the silent instances are withdrawn, and those that lapse next too, until the silent share falls back under the threshold"
            );
        }
        Verdict::Withdraw
    }
}

/// What to do with every lapsed instance ([`SelfPreservation::decide`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Withdraw them now.
    Withdraw,
    /// Hold their withdrawal: they stay in the table, lapsed, until a later decision or until
    /// each is heard from again.
    Hold,
    /// A hold just ended: they get the directory's grace period from now, so agents cut off
    /// by what held them (reconnecting after the directory caught up) have time to be heard
    /// from, as after a directory start (SwarmKit's grace period after a leader change).
    Renew,
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(1);
    const TTL: Duration = Duration::from_secs(3);

    fn guard() -> SelfPreservation {
        SelfPreservation::new(PreservationSettings::new(15, 50, INTERVAL, TTL))
    }

    #[test]
    fn one_silent_instance_in_a_large_fleet_is_withdrawn_at_once() {
        let mut g = guard();
        let t0 = Instant::now();
        assert_eq!(g.decide(t0, 1, 1_000, |_| 3), Verdict::Withdraw);
        assert!(!g.holding());
        assert_eq!(g.holds(), 0);
    }

    #[test]
    fn a_small_fleet_is_never_held() {
        let mut g = guard();
        let verdict = g.decide(Instant::now(), 10, 20, |_| 10);
        assert_eq!(
            verdict,
            Verdict::Withdraw,
            "half of 20 silent, but under 50 instances"
        );
        assert!(!g.holding());
    }

    #[test]
    fn off_withdraws_everything_at_once() {
        let mut g = SelfPreservation::new(PreservationSettings::off());
        assert_eq!(
            g.decide(Instant::now(), 900, 1_000, |_| 100),
            Verdict::Withdraw
        );
    }

    #[test]
    fn a_silent_share_above_the_threshold_holds_until_heard_from_again() {
        let mut g = guard();
        let t0 = Instant::now();
        // 100 lapse now, 100 more are silent: 20% of 1,000.
        let mut asked = None;
        let verdict = g.decide(t0, 100, 1_000, |before| {
            asked = Some(before);
            100
        });
        assert_eq!(verdict, Verdict::Hold);
        assert_eq!(asked, Some(t0 - Duration::from_millis(1500)));
        assert_eq!(g.holds(), 1);
        assert!(g.holding());
        // 100 more lapse: still held, still one hold.
        assert_eq!(g.decide(t0 + INTERVAL, 200, 1_000, |_| 0), Verdict::Hold);
        assert_eq!(g.holds(), 1);
        // The agents' heartbeats arrive: all but 5 of the held are heard from again, and
        // the silent share is under the threshold: the still silent get the grace period.
        assert_eq!(g.decide(t0 + INTERVAL * 2, 5, 1_000, |_| 0), Verdict::Renew);
        assert!(!g.holding());
        // A hold whose instances are all heard from again ends with nothing lapsing.
        assert_eq!(g.decide(t0, 200, 1_000, |_| 0), Verdict::Hold);
        assert!(g.holding());
        assert_eq!(g.decide(t0, 0, 1_000, |_| 0), Verdict::Withdraw);
        assert!(!g.holding());
        assert_eq!(g.holds(), 2);
        // A later single death is withdrawn at once, and a new mass silence is a new hold.
        assert_eq!(
            g.decide(t0 + INTERVAL * 3, 1, 1_000, |_| 0),
            Verdict::Withdraw
        );
        assert_eq!(
            g.decide(t0 + INTERVAL * 4, 300, 1_000, |_| 0),
            Verdict::Hold
        );
        assert_eq!(g.holds(), 3);
    }

    #[test]
    fn a_hold_ends_after_the_longest_hold() {
        let mut g = guard();
        let t0 = Instant::now();
        assert_eq!(g.decide(t0, 500, 1_000, |_| 0), Verdict::Hold);
        let just_before = t0 + TTL * MAX_HOLD_TTLS - Duration::from_millis(1);
        assert_eq!(g.decide(just_before, 500, 1_000, |_| 0), Verdict::Hold);
        assert_eq!(
            g.decide(t0 + TTL * MAX_HOLD_TTLS, 500, 1_000, |_| 0),
            Verdict::Withdraw
        );
        assert!(!g.holding());
        // Still above the threshold: later lapses go at once, no new hold begins.
        assert_eq!(g.decide(t0 + TTL * 11, 10, 500, |_| 200), Verdict::Withdraw);
        assert_eq!(g.holds(), 1);
        // Back under it: withdrawn, not renewed (the hold was over), and a new hold may begin.
        assert_eq!(g.decide(t0 + TTL * 12, 1, 500, |_| 0), Verdict::Withdraw);
        assert_eq!(g.decide(t0 + TTL * 13, 100, 500, |_| 0), Verdict::Hold);
        assert_eq!(g.holds(), 2);
    }
}
