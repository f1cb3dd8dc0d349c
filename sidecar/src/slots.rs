//! One service version's instances as its reserver holds them (Waiter: an instance's
//! capacity is its slots), laid out for the request path and for deltas at fleet scale:
//!
//! - the *candidates* (instances present in the route table and `up`) come first in one
//!   vector, so a request draws its two power-of-two choices in O(1) however many instances
//!   the version has, and only scans them when random draws find no two free ones;
//! - a change to one instance (a delta) is O(1): one hash lookup and at most one swap.
//!
//! Not thread-safe on its own: [`crate::reserver::Reserver`] holds it under its lock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use usher_shared::routes::Instance;
use usher_shared::FastHash;

/// First ejection after a connection failure (Waiter).
pub const EJECTION_BASE: Duration = Duration::from_secs(10);
/// Longest ejection (Waiter).
pub const EJECTION_MAX: Duration = Duration::from_secs(300);

/// Random draws a request makes among the candidates before it scans them all, and the most
/// candidates a version has for a request to scan them at once ([`Slots::pick`]): with half
/// the candidates busy, 16 draws find two free ones but for one request in about 4,000.
pub const MAX_DRAWS: u32 = 16;

/// An instance's id as the reserver keeps it: shared, so a reservation holds it without a copy.
pub type InstanceId = Arc<str>;

/// Consecutive ejections of an instance after connection failures, and when the current one
/// ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ejection {
    failures: u32,
    until: Option<Instant>,
}

impl Ejection {
    /// Records a failure at `now`; returns how long the instance stays ejected from `now`.
    /// Ejected for 10 s, doubling with each failure after an ejection has ended, at most 300 s
    /// (Waiter). A failure while the instance is ejected (a request sent before the ejection,
    /// or in panic mode) is the same incident: it neither doubles nor extends the ejection, so
    /// an instance that dies with many requests in flight is ejected for 10 s, not 300 s.
    pub fn fail(&mut self, now: Instant) -> Duration {
        if let Some(until) = self.until.filter(|&until| now < until) {
            return until - now;
        }
        self.failures = self.failures.saturating_add(1);
        let factor = 1u32 << (self.failures - 1).min(16);
        let period = (EJECTION_BASE * factor).min(EJECTION_MAX);
        self.until = Some(now + period);
        period
    }

    /// A success clears the ejection and the failure count.
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    pub fn active(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }
}

/// One instance: where it listens, its slots and how many are in use.
#[derive(Debug, Clone)]
pub struct Slot {
    pub id: InstanceId,
    pub address: SocketAddr,
    /// Requests the instance takes at once (the route table's `capacity`).
    pub capacity: u32,
    pub in_use: u32,
    pub ejection: Ejection,
    /// The route table says `up`.
    routable: bool,
    /// Still in the route table; a withdrawn slot lingers until its last reservation ends.
    present: bool,
}

impl Slot {
    fn candidate(&self) -> bool {
        self.present && self.routable
    }

    fn free(&self) -> bool {
        self.in_use < self.capacity
    }
}

/// The slots of one service version, candidates first (see the module docs).
#[derive(Debug, Default)]
pub struct Slots {
    /// `slots[..candidates]` are present and routable; the rest are not.
    slots: Vec<Slot>,
    /// Where each instance's slot is in `slots`.
    positions: HashMap<InstanceId, usize, FastHash>,
    candidates: usize,
}

impl Slots {
    pub fn get(&self, id: &str) -> Option<&Slot> {
        self.positions.get(id).map(|&at| &self.slots[at])
    }

    /// The slot of `id`, to change its use or ejection.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Slot> {
        self.positions.get(id).map(|&at| &mut self.slots[at])
    }

    /// Every slot, withdrawn ones still in use included.
    pub fn iter(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The earliest end of an ejection after `now` among the candidates, if any is ejected.
    pub fn next_ejection_end(&self, now: Instant) -> Option<Instant> {
        self.slots[..self.candidates]
            .iter()
            .filter_map(|s| s.ejection.until.filter(|&until| until > now))
            .min()
    }

    /// Whether any instance is present and `up` (ejected or busy ones count).
    pub fn any_routable(&self) -> bool {
        self.candidates > 0
    }

    /// The ids of the instances a request may be sent to (present and `up`).
    pub fn candidate_ids(&self) -> impl Iterator<Item = &str> {
        self.slots[..self.candidates].iter().map(|s| &*s.id)
    }

    /// Adds the instance, or updates its slot (present again if it was withdrawn). In-use
    /// counts survive; a new address clears the ejection.
    pub fn upsert(&mut self, instance: &Instance) {
        let at = match self.positions.get(instance.id.as_str()) {
            Some(&at) => at,
            None => {
                let id = InstanceId::from(instance.id.as_str());
                self.slots.push(Slot {
                    id: id.clone(),
                    address: instance.address,
                    capacity: instance.capacity,
                    in_use: 0,
                    ejection: Ejection::default(),
                    routable: false,
                    present: false,
                });
                self.positions.insert(id, self.slots.len() - 1);
                self.slots.len() - 1
            }
        };
        let slot = &mut self.slots[at];
        if slot.address != instance.address {
            slot.ejection.clear();
        }
        slot.address = instance.address;
        slot.capacity = instance.capacity;
        slot.routable = instance.state.routable();
        slot.present = true;
        self.place(at);
    }

    /// Withdraws the instance: its slot goes now if nothing is in use, else at its last release.
    pub fn withdraw(&mut self, id: &str) {
        let Some(&at) = self.positions.get(id) else {
            return;
        };
        self.slots[at].present = false;
        let at = self.place(at);
        if self.slots[at].in_use == 0 {
            self.remove(at);
        }
    }

    /// Makes `instances` the version's instances (a full table): the others are withdrawn.
    pub fn replace<'a>(&mut self, instances: impl IntoIterator<Item = &'a Instance>) {
        for slot in &mut self.slots {
            slot.present = false;
        }
        // No slot is a candidate now, so the layout holds with an empty prefix.
        self.candidates = 0;
        for instance in instances {
            self.upsert(instance);
        }
        let mut at = self.candidates;
        while at < self.slots.len() {
            if !self.slots[at].present && self.slots[at].in_use == 0 {
                self.remove(at);
            } else {
                at += 1;
            }
        }
    }

    /// Returns one slot of `id`; `succeeded` also clears its ejection. A withdrawn slot goes
    /// with its last release.
    pub fn release(&mut self, id: &str, succeeded: bool) {
        let Some(&at) = self.positions.get(id) else {
            return;
        };
        let slot = &mut self.slots[at];
        slot.in_use = slot.in_use.saturating_sub(1);
        if succeeded {
            slot.ejection.clear();
        }
        if !slot.present && slot.in_use == 0 {
            self.remove(at);
        }
    }

    /// Reserves a slot on an instance not in `exclude` (a retry's tried instances), without
    /// allocating: the less loaded of two random free, non-ejected candidates (power of two
    /// choices; with every candidate ejected, "panic mode" uses them anyway). `Err(true)`
    /// when no candidate outside `exclude` exists at all, `Err(false)` when all are busy.
    pub fn reserve(
        &mut self,
        exclude: &[InstanceId],
        now: Instant,
    ) -> Result<(InstanceId, SocketAddr), bool> {
        let at = self.pick(exclude, now)?;
        let slot = &mut self.slots[at];
        slot.in_use += 1;
        Ok((slot.id.clone(), slot.address))
    }

    /// Moves the slot at `at` into or out of the candidates as its state says; returns where
    /// it is now.
    fn place(&mut self, at: usize) -> usize {
        let in_prefix = at < self.candidates;
        if self.slots[at].candidate() && !in_prefix {
            self.swap(at, self.candidates);
            self.candidates += 1;
            self.candidates - 1
        } else if !self.slots[at].candidate() && in_prefix {
            self.candidates -= 1;
            self.swap(at, self.candidates);
            self.candidates
        } else {
            at
        }
    }

    fn swap(&mut self, a: usize, b: usize) {
        if a == b {
            return;
        }
        self.slots.swap(a, b);
        for at in [a, b] {
            if let Some(position) = self.positions.get_mut(&self.slots[at].id) {
                *position = at;
            }
        }
    }

    /// Drops the slot at `at`, which is not a candidate: the last slot (not one either) takes
    /// its place, so the layout holds.
    fn remove(&mut self, at: usize) {
        let removed = self.slots.swap_remove(at);
        self.positions.remove(&removed.id);
        if let Some(moved) = self.slots.get(at) {
            if let Some(position) = self.positions.get_mut(&moved.id) {
                *position = at;
            }
        }
    }

    /// The position of the slot to reserve (see [`Slots::reserve`]).
    ///
    /// A version of at most [`MAX_DRAWS`] candidates is scanned. Beyond that, candidates are
    /// drawn at random until two distinct eligible ones (free, not ejected, not excluded) are
    /// found, at most [`MAX_DRAWS`] draws: each found one is uniform among the
    /// eligible, so the pair is what power of two choices needs, in O(1) while most
    /// candidates are eligible. When the draws run out (most are busy or ejected, or only one
    /// is eligible) the candidates are scanned and the pair drawn among the eligible ones: the
    /// same distribution either way.
    fn pick(&self, exclude: &[InstanceId], now: Instant) -> Result<usize, bool> {
        let candidates = &self.slots[..self.candidates];
        let mut rng = rand::rng();
        if candidates.len() <= MAX_DRAWS as usize {
            // As cheap as the draws, and exact when one or none is eligible.
            return self.scan(exclude, now, &mut rng);
        }
        let eligible = |s: &Slot| s.free() && !s.ejection.active(now) && !exclude.contains(&s.id);
        let mut draws = 0;
        let mut draw = |other: Option<usize>| {
            while draws < MAX_DRAWS {
                draws += 1;
                let at = rng.random_range(0..candidates.len());
                if Some(at) != other && eligible(&candidates[at]) {
                    return Some(at);
                }
            }
            None
        };
        if let Some(a) = draw(None) {
            if let Some(b) = draw(Some(a)) {
                return Ok(if less_loaded(&candidates[b], &candidates[a]) {
                    b
                } else {
                    a
                });
            }
        }
        self.scan(exclude, now, &mut rng)
    }

    /// [`Slots::pick`] when the draw found nothing: counts the eligible candidates (panic mode
    /// when every routable one is ejected) and draws the pair among them.
    fn scan(
        &self,
        exclude: &[InstanceId],
        now: Instant,
        rng: &mut impl Rng,
    ) -> Result<usize, bool> {
        let candidates = &self.slots[..self.candidates];
        let allowed = |s: &Slot| !exclude.contains(&s.id);
        let (mut routable, mut healthy, mut healthy_free, mut free) =
            (0usize, 0usize, 0usize, 0usize);
        for s in candidates.iter().filter(|s| allowed(s)) {
            routable += 1;
            free += usize::from(s.free());
            if !s.ejection.active(now) {
                healthy += 1;
                healthy_free += usize::from(s.free());
            }
        }
        if routable == 0 {
            return Err(true);
        }
        let panic = healthy == 0;
        let n = if panic { free } else { healthy_free };
        let (a, b) = match n {
            0 => return Err(false),
            1 => (0, 0),
            n => two_of(rng, n),
        };
        let mut eligible = candidates
            .iter()
            .enumerate()
            .filter(|(_, s)| allowed(s) && s.free() && (panic || !s.ejection.active(now)));
        let (lo, hi) = (a.min(b), a.max(b));
        let low = eligible.nth(lo).ok_or(false)?;
        let high = match hi - lo {
            0 => low,
            gap => eligible.nth(gap - 1).ok_or(false)?,
        };
        // Ties go to the first draw, `a`, so they do not favour either end of the vector.
        let (first, second) = if a <= b { (low, high) } else { (high, low) };
        Ok(if less_loaded(second.1, first.1) {
            second.0
        } else {
            first.0
        })
    }
}

/// Two distinct uniform indices below `n` (n ≥ 2).
fn two_of(rng: &mut impl Rng, n: usize) -> (usize, usize) {
    let a = rng.random_range(0..n);
    let mut b = rng.random_range(0..n - 1);
    if b >= a {
        b += 1;
    }
    (a, b)
}

/// `a` is less loaded than `b` (in-use slots over capacity, compared without division).
fn less_loaded(a: &Slot, b: &Slot) -> bool {
    (a.in_use as u64) * (b.capacity as u64) < (b.in_use as u64) * (a.capacity as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use usher_shared::routes::InstanceState;

    fn instance(id: &str, state: InstanceState) -> Instance {
        Instance {
            service: "web".into(),
            version: "v1".into(),
            id: id.into(),
            address: SocketAddr::from(([127, 0, 0, 1], 1)),
            capacity: 10,
            weight: 1,
            state,
            started_at_ms: 0,
            labels: BTreeMap::new(),
        }
    }

    /// `n` instances `i0`.. `up`, of capacity 10, with `in_use` slots of each in use.
    fn up(n: usize, in_use: u32) -> Slots {
        let mut slots = Slots::default();
        for i in 0..n {
            let instance = instance(&format!("i{i}"), InstanceState::Up);
            slots.upsert(&instance);
            slots.get_mut(&instance.id).unwrap().in_use = in_use;
        }
        slots
    }

    /// The layout invariant: candidates first, positions right.
    fn check(slots: &Slots) {
        for (at, slot) in slots.slots.iter().enumerate() {
            assert_eq!(slot.candidate(), at < slots.candidates, "{}", slot.id);
            assert_eq!(slots.positions.get(&slot.id), Some(&at), "{}", slot.id);
        }
        assert_eq!(slots.positions.len(), slots.slots.len());
    }

    #[test]
    fn ejection_backs_off_to_the_cap() {
        let t0 = Instant::now();
        let mut e = Ejection::default();
        // Each failure comes as the previous ejection ends (a retry after it fails again).
        let mut now = t0;
        let periods: Vec<u64> = (0..8)
            .map(|_| {
                let period = e.fail(now);
                now += period;
                period.as_secs()
            })
            .collect();
        assert_eq!(periods, vec![10, 20, 40, 80, 160, 300, 300, 300]);
        let last = now - EJECTION_MAX;
        assert!(e.active(last + Duration::from_secs(299)));
        assert!(!e.active(now));
        e.clear();
        assert!(!e.active(last));
        assert_eq!(e.fail(now), EJECTION_BASE);
    }

    #[test]
    fn failures_while_ejected_are_one_incident() {
        let t0 = Instant::now();
        let mut e = Ejection::default();
        assert_eq!(e.fail(t0), EJECTION_BASE);
        // The requests in flight when the instance died fail too: the ejection stands.
        let later = t0 + Duration::from_secs(1);
        for _ in 0..10 {
            assert_eq!(e.fail(later), EJECTION_BASE - Duration::from_secs(1));
        }
        assert!(!e.active(t0 + EJECTION_BASE));
        // A failure after the ejection ended is the next one: doubled.
        assert_eq!(e.fail(t0 + EJECTION_BASE), EJECTION_BASE * 2);
    }

    /// Sizes that take each path of [`Slots::pick`]: the scan, and the draws.
    const SIZES: [usize; 2] = [4, 4 * MAX_DRAWS as usize];

    #[test]
    fn power_of_two_choices_prefers_the_less_loaded() {
        for n in SIZES {
            let mut slots = up(n, 9);
            slots.get_mut("i0").unwrap().in_use = 0;
            let now = Instant::now();
            let draws = 100 * n;
            let idle = (0..draws)
                .filter(|_| &*slots.slots[slots.pick(&[], now).unwrap()].id == "i0")
                .count();
            // i0 wins whenever it is one of the two choices: 2 draws in n, 200 here.
            assert!(
                (140..260).contains(&idle),
                "{n} instances: the idle one chosen {idle} times of {draws}"
            );
        }
    }

    #[test]
    fn the_only_free_instance_among_many_busy_ones_is_found() {
        let mut slots = up(1000, 10);
        slots.get_mut("i500").unwrap().in_use = 9;
        let now = Instant::now();
        let (id, _) = slots.reserve(&[], now).unwrap();
        assert_eq!(&*id, "i500");
        assert_eq!(slots.reserve(&[], now), Err(false), "all busy now");
        assert_eq!(slots.reserve(&["i500".into()], now), Err(false));
    }

    #[test]
    fn deltas_keep_candidates_first() {
        let mut slots = Slots::default();
        let states = [
            InstanceState::Up,
            InstanceState::Starting,
            InstanceState::Up,
            InstanceState::Draining,
            InstanceState::Up,
        ];
        for (i, state) in states.iter().enumerate() {
            slots.upsert(&instance(&format!("i{i}"), *state));
            check(&slots);
        }
        assert_eq!(slots.candidates, 3);
        // A reserved instance that leaves lingers, out of the candidates, until released.
        slots.get_mut("i0").unwrap().in_use = 1;
        slots.withdraw("i0");
        check(&slots);
        assert_eq!(slots.candidates, 2);
        assert!(slots.get("i0").is_some());
        slots.upsert(&instance("i1", InstanceState::Up));
        slots.upsert(&instance("i2", InstanceState::Unknown));
        slots.withdraw("i3");
        slots.withdraw("nobody");
        check(&slots);
        assert!(slots.get("i3").is_none(), "idle and withdrawn: gone");
        slots.release("i0", true);
        check(&slots);
        assert!(slots.get("i0").is_none(), "gone with its last release");
        let mut ids: Vec<_> = slots.slots[..slots.candidates]
            .iter()
            .map(|s| s.id.to_string())
            .collect();
        ids.sort();
        assert_eq!(ids, ["i1", "i4"]);
        // A full table replaces it all; the busy withdrawn one lingers.
        slots.get_mut("i4").unwrap().in_use = 2;
        slots.replace(&[instance("i9", InstanceState::Up)]);
        check(&slots);
        assert_eq!(slots.candidates, 1);
        assert!(slots.get("i4").is_some() && slots.get("i1").is_none());
        slots.upsert(&instance("i4", InstanceState::Up));
        check(&slots);
        assert_eq!(
            slots.candidates, 2,
            "a lingering instance that comes back is routable"
        );
    }

    #[test]
    fn draws_are_uniform_over_the_eligible() {
        // All idle but one excluded and one busy: the others are each picked about as often.
        for n in SIZES {
            let mut slots = up(n, 0);
            slots.get_mut("i3").unwrap().in_use = 10;
            let now = Instant::now();
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            let eligible = n - 2;
            for _ in 0..1000 * eligible {
                let at = slots.pick(&["i0".into()], now).unwrap();
                *counts.entry(slots.slots[at].id.to_string()).or_default() += 1;
            }
            assert_eq!(counts.len(), eligible, "{counts:?}");
            assert!(
                counts.values().all(|&c| (800..1200).contains(&c)),
                "{n} instances: {counts:?}"
            );
        }
    }
}
