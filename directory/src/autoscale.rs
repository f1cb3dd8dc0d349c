//! The autoscaler's decision for one service version, as a pure function of (observation,
//! settings, previous state, elapsed time), so it is tested on recorded load traces without
//! processes or clocks.
//!
//! Each cycle (Waiter: generate the ideal count, compute the step toward it, scale):
//!
//! 1. `ideal = ceil(outstanding * scale_factor / concurrency)`, where outstanding is in-flight
//!    plus queued requests summed over the sidecars (WSO2: requests in flight), clamped to
//!    `[min_instances, max_instances]`.
//! 2. The target moves toward `ideal` by a time-adjusted fraction of the gap (Waiter:
//!    `f' = 1 - (1 - f)^elapsed_s`): fast up, slow down. A continuous target is kept between
//!    cycles so slow steps accumulate instead of rounding away.
//! 3. Down only when the load fits in one instance fewer (WSO2: scale down below the capacity of
//!    n-1); to zero only after `idle_timeout` with nothing outstanding; from zero at once when a
//!    request waits (cold start).

use std::time::Duration;

use serde::Serialize;

/// How one service version scales. Defaults: see [`ScaleSettings::default`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaleSettings {
    /// Requests one instance serves at once (Waiter: concurrency level); at least 1.
    pub concurrency: u32,
    pub min_instances: u32,
    pub max_instances: u32,
    /// Multiplies the outstanding requests before dividing by concurrency (>1 keeps headroom).
    pub scale_factor: f64,
    /// Fraction of the gap to `ideal` closed per second when scaling up, in (0, 1].
    pub scale_up_factor: f64,
    /// Fraction of the gap to `ideal` closed per second when scaling down, in (0, 1].
    pub scale_down_factor: f64,
    /// Nothing outstanding for this long scales to `min_instances` (zero by default).
    pub idle_timeout: Duration,
    /// The ideal count must stay below the target this long before a step down, so a load
    /// that dips between peaks does not stop and restart instances (Knative: scale-down delay).
    pub scale_down_delay: Duration,
}

impl Default for ScaleSettings {
    /// Concurrency 1, 0 to 4 instances, scale factor 1, up 0.9/s (a burst is covered within
    /// ~2 cycles), down 0.1/s (halves the excess in ~7 s) after a 5 s scale-down delay, idle
    /// timeout 60 s.
    fn default() -> Self {
        Self {
            concurrency: 1,
            min_instances: 0,
            max_instances: 4,
            scale_factor: 1.0,
            scale_up_factor: 0.9,
            scale_down_factor: 0.1,
            idle_timeout: Duration::from_secs(60),
            scale_down_delay: Duration::from_secs(5),
        }
    }
}

/// What the autoscaler remembers between cycles.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct ScaleState {
    /// Instances wanted.
    pub target: u32,
    /// The continuous target the steps move (`target` is its ceiling, within bounds).
    pub exact: f64,
    /// How long nothing has been outstanding.
    #[serde(with = "humantime_serde")]
    pub idle_for: Duration,
    /// How long the ideal count has been below the target.
    #[serde(with = "humantime_serde")]
    pub below_for: Duration,
}

/// Why the target is what it is; each decision is logged with its reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum Reason {
    /// A request waits for a version with no instance: start one at once.
    ColdStart,
    /// Moving up toward `ideal`.
    ScaleUp { ideal: u32 },
    /// Moving down toward `ideal`.
    ScaleDown { ideal: u32 },
    /// The load does not fit in one instance fewer (WSO2): no scale down.
    LoadNeedsAll { outstanding: u64 },
    /// The ideal count was above `max_instances`.
    AtMax { wanted: u32 },
    /// Held at `min_instances`.
    AtMin,
    /// Idle for at least the idle timeout: down to `min_instances`.
    Idle,
    /// Nothing outstanding, but not for the idle timeout yet: keep one instance.
    IdleGrace,
    /// The ideal count is lower, but not yet for the scale-down delay.
    DownDelayed { ideal: u32 },
    /// An operator pinned the target (`usher-directory scale`).
    Pinned { instances: u32 },
    /// Target equals ideal.
    Steady,
}

/// The outcome of one cycle.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub state: ScaleState,
    pub ideal: u32,
    pub reasons: Vec<Reason>,
}

/// `1 - (1 - f)^elapsed_s`: the fraction of the gap a per-second factor `f` closes over
/// `elapsed` (Waiter's time adjustment, so the cycle length does not change the speed).
pub fn time_adjusted(factor: f64, elapsed: Duration) -> f64 {
    let factor = factor.clamp(0.0, 1.0);
    1.0 - (1.0 - factor).powf(elapsed.as_secs_f64())
}

/// One autoscaler cycle for one service version. Pure.
///
/// `outstanding` is in-flight + queued requests summed over sidecars; `elapsed` is the time
/// since the previous cycle.
pub fn decide(
    outstanding: u64,
    settings: &ScaleSettings,
    previous: &ScaleState,
    elapsed: Duration,
) -> Decision {
    let concurrency = u64::from(settings.concurrency.max(1));
    let max = settings.max_instances.max(settings.min_instances);
    let min = settings.min_instances;
    let mut reasons = Vec::new();

    let wanted =
        ((outstanding as f64) * settings.scale_factor.max(0.0) / concurrency as f64).ceil();
    let wanted = if wanted.is_finite() {
        wanted.min(u32::MAX as f64) as u32
    } else {
        u32::MAX
    };
    let idle_for = if outstanding == 0 {
        previous.idle_for.saturating_add(elapsed)
    } else {
        Duration::ZERO
    };
    // While idle but not yet for the idle timeout, a running version keeps one instance.
    let floor = if outstanding == 0 && previous.target > 0 && idle_for < settings.idle_timeout {
        min.max(1)
    } else {
        min
    };
    let mut ideal = wanted.clamp(floor, max);
    if wanted > max {
        reasons.push(Reason::AtMax { wanted });
    }

    let below_for = if ideal < previous.target {
        previous.below_for.saturating_add(elapsed)
    } else {
        Duration::ZERO
    };
    let current = previous.exact.max(0.0);
    let mut exact = if f64::from(ideal) > current {
        current + (f64::from(ideal) - current) * time_adjusted(settings.scale_up_factor, elapsed)
    } else {
        current - (current - f64::from(ideal)) * time_adjusted(settings.scale_down_factor, elapsed)
    };
    // Steps are taken in whole instances: up rounds up (a positive gap always adds one), down
    // rounds to nearest, so the exact value, which only approaches `ideal`, still lands on it.
    let mut target = if ideal > previous.target {
        ((exact - 1e-9).ceil().max(0.0) as u32)
            .max(previous.target + 1)
            .min(ideal)
    } else if ideal < previous.target && below_for < settings.scale_down_delay {
        reasons.push(Reason::DownDelayed { ideal });
        exact = current;
        previous.target
    } else {
        (exact.round().max(0.0) as u32).clamp(ideal, previous.target)
    };

    if previous.target == 0 && outstanding > 0 {
        // Cold start: at least one instance now, whatever the step says.
        target = target.max(1).min(max.max(1));
        ideal = ideal.max(1);
        reasons.push(Reason::ColdStart);
    }
    // WSO2: scale down only when the load fits in one instance fewer.
    if target < previous.target && outstanding > 0 {
        let fits = (outstanding as f64) * settings.scale_factor
            <= f64::from(previous.target - 1) * concurrency as f64;
        if !fits {
            target = previous.target;
            reasons.push(Reason::LoadNeedsAll { outstanding });
        }
    }
    if outstanding == 0 && idle_for >= settings.idle_timeout {
        reasons.retain(|r| !matches!(r, Reason::DownDelayed { .. }));
        if previous.target > min {
            reasons.push(Reason::Idle);
        }
        target = min;
    } else if outstanding == 0 && floor > min {
        reasons.push(Reason::IdleGrace);
    }
    target = target.clamp(min, max);
    if target == min && ideal == min && min > 0 && outstanding > 0 {
        reasons.push(Reason::AtMin);
    }
    match target.cmp(&previous.target) {
        std::cmp::Ordering::Greater if !reasons.contains(&Reason::ColdStart) => {
            reasons.push(Reason::ScaleUp { ideal })
        }
        std::cmp::Ordering::Less if !reasons.contains(&Reason::Idle) => {
            reasons.push(Reason::ScaleDown { ideal })
        }
        _ => {}
    }
    if reasons.is_empty() {
        reasons.push(Reason::Steady);
    }
    // Keep the exact value consistent with the whole-instance target it produced.
    if (exact - f64::from(target)).abs() >= 1.0 || target == 0 {
        exact = f64::from(target);
    }
    Decision {
        state: ScaleState {
            target,
            exact,
            idle_for,
            below_for,
        },
        ideal,
        reasons,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CYCLE: Duration = Duration::from_secs(1);

    /// Runs `trace` (outstanding per 1 s cycle) from `start`; returns the target after each.
    fn run(trace: &[u64], settings: &ScaleSettings, start: ScaleState) -> Vec<Decision> {
        let mut state = start;
        trace
            .iter()
            .map(|&outstanding| {
                let d = decide(outstanding, settings, &state, CYCLE);
                state = d.state;
                d
            })
            .collect()
    }

    fn targets(decisions: &[Decision]) -> Vec<u32> {
        decisions.iter().map(|d| d.state.target).collect()
    }

    fn running(n: u32) -> ScaleState {
        ScaleState {
            target: n,
            exact: f64::from(n),
            ..ScaleState::default()
        }
    }

    fn settings(min: u32, max: u32) -> ScaleSettings {
        ScaleSettings {
            min_instances: min,
            max_instances: max,
            ..ScaleSettings::default()
        }
    }

    #[test]
    fn time_adjustment_follows_waiter() {
        assert!((time_adjusted(0.5, Duration::from_secs(1)) - 0.5).abs() < 1e-12);
        assert!((time_adjusted(0.5, Duration::from_secs(2)) - 0.75).abs() < 1e-12);
        assert!(
            (time_adjusted(0.5, Duration::from_millis(500)) - (1.0 - 0.5f64.sqrt())).abs() < 1e-12
        );
        assert_eq!(time_adjusted(1.0, Duration::from_millis(1)), 1.0);
        assert_eq!(time_adjusted(0.3, Duration::ZERO), 0.0);
    }

    #[test]
    fn cold_start_starts_one_instance_in_the_first_cycle() {
        let d = decide(1, &settings(0, 4), &ScaleState::default(), CYCLE);
        assert_eq!(d.state.target, 1);
        assert!(d.reasons.contains(&Reason::ColdStart));
        // Even with a tiny elapsed time.
        let d = decide(
            1,
            &settings(0, 4),
            &ScaleState::default(),
            Duration::from_millis(1),
        );
        assert_eq!(d.state.target, 1);
    }

    #[test]
    fn a_step_burst_reaches_ideal_within_three_cycles() {
        let trace = [10u64; 6];
        let t = targets(&run(&trace, &settings(0, 10), ScaleState::default()));
        assert!(t[2] == 10, "targets {t:?}");
        assert!(t.windows(2).all(|w| w[0] <= w[1]), "monotonic up: {t:?}");
        // From a running base too.
        let t = targets(&run(&trace, &settings(0, 10), running(2)));
        assert!(t[2] == 10, "targets {t:?}");
    }

    #[test]
    fn a_flash_crowd_is_capped_at_max() {
        let trace = [0u64, 1000, 1000, 1000, 1000];
        let d = run(&trace, &settings(0, 4), running(1));
        assert!(targets(&d).iter().all(|&t| t <= 4), "{:?}", targets(&d));
        assert_eq!(d[3].state.target, 4);
        assert!(d[2].reasons.contains(&Reason::AtMax { wanted: 1000 }));
    }

    #[test]
    fn a_ramp_is_followed_up_and_down() {
        let trace: Vec<u64> = (0..=8).chain((0..=8).rev()).collect();
        let t = targets(&run(&trace, &settings(0, 10), running(1)));
        for i in 1..trace.len() {
            // Going up, at most one cycle behind; going down, never below the load (WSO2).
            assert!(
                u64::from(t[i]) >= trace[i - 1].min(trace[i]),
                "cycle {i}: {t:?}"
            );
            assert!(
                u64::from(t[i]) >= trace[i].min(u64::from(t[i - 1])),
                "cycle {i}: {t:?}"
            );
        }
        assert_eq!(t[8], 8);
        assert!(t[16] < 8, "comes down: {t:?}");
    }

    #[test]
    fn a_steady_load_does_not_oscillate() {
        let trace = [5u64; 30];
        let t = targets(&run(&trace, &settings(0, 10), ScaleState::default()));
        let settled = &t[3..];
        assert!(settled.iter().all(|&x| x == 5), "{t:?}");
    }

    #[test]
    fn a_sawtooth_keeps_capacity_for_the_peaks_instead_of_flapping() {
        let trace: Vec<u64> = (0..40).map(|i| if i % 4 == 0 { 8 } else { 2 }).collect();
        let t = targets(&run(&trace, &settings(0, 10), running(1)));
        // Peaks every 4 s, within the 5 s scale-down delay: capacity stays for the peaks.
        assert!(t[1..].iter().all(|&x| x == 8), "{t:?}");
    }

    #[test]
    fn scale_down_waits_until_the_load_fits_in_one_instance_fewer() {
        let s = ScaleSettings {
            concurrency: 2,
            ..settings(0, 10)
        };
        // 7 outstanding on 4 instances of 2 slots: fits in 4 (8 slots), not in 3 (6 slots).
        let d = decide(7, &s, &running(4), Duration::from_secs(100));
        assert_eq!(d.state.target, 4);
        // 6 outstanding fits in 3 instances: allowed down to 3.
        let d = decide(6, &s, &running(4), Duration::from_secs(100));
        assert_eq!(d.state.target, 3);
    }

    #[test]
    fn scale_down_is_slow_and_never_below_min() {
        let trace = [0u64; 200];
        let s = ScaleSettings {
            idle_timeout: Duration::from_secs(1000),
            ..settings(2, 10)
        };
        let t = targets(&run(&trace, &s, running(10)));
        assert!(t[0] >= 9, "slow: {t:?}");
        assert!(t.windows(2).all(|w| w[0] >= w[1]), "monotonic down: {t:?}");
        assert!(t.iter().all(|&x| x >= 2));
        assert_eq!(*t.last().unwrap(), 2);
    }

    #[test]
    fn zero_only_after_the_idle_timeout() {
        let s = ScaleSettings {
            idle_timeout: Duration::from_secs(60),
            ..settings(0, 4)
        };
        let trace = [0u64; 70];
        let d = run(&trace, &s, running(3));
        let t = targets(&d);
        for (i, &target) in t.iter().enumerate() {
            let idle = i as u64 + 1;
            if idle < 60 {
                assert!(
                    target >= 1,
                    "cycle {i}: zero before the idle timeout: {t:?}"
                );
            } else {
                assert_eq!(target, 0, "cycle {i}: {t:?}");
            }
        }
        assert!(d[59].reasons.contains(&Reason::Idle));
        // One request in the middle restarts the idle clock.
        let mut trace = vec![0u64; 50];
        trace.push(1);
        trace.extend([0u64; 50]);
        let t = targets(&run(&trace, &s, running(1)));
        assert!(t[..100].iter().all(|&x| x >= 1), "{t:?}");
    }

    #[test]
    fn long_idle_then_traffic_cold_starts() {
        let s = settings(0, 4);
        let mut trace = vec![0u64; 100];
        trace.extend([3u64; 5]);
        let d = run(&trace, &s, running(2));
        assert_eq!(d[99].state.target, 0);
        assert!(d[100].reasons.contains(&Reason::ColdStart));
        assert!(d[100].state.target >= 1);
        assert_eq!(d[103].state.target, 3);
    }

    #[test]
    fn min_above_zero_is_kept_even_when_idle() {
        let s = ScaleSettings {
            idle_timeout: Duration::from_secs(5),
            ..settings(1, 4)
        };
        let t = targets(&run(&[0u64; 20], &s, running(1)));
        assert!(t.iter().all(|&x| x == 1), "{t:?}");
    }
}
