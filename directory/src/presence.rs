//! Registration TTLs: when each instance was last heard from and when it expires.
//!
//! A timer heap in memory, never on disk (DESIGN.md: the directory holds only state it can
//! rebuild). Time is a parameter, so the TTL logic is tested without sleeping.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;

use tokio::time::Instant;
use usher_shared::routes::InstanceKey;
use usher_shared::FastHash;

#[derive(Debug, Clone, Copy)]
struct Entry {
    last_seen: Instant,
    deadline: Instant,
    /// The deadline this key's heap entry was filed under (at most `deadline`).
    filed: Instant,
}

/// Deadlines of live registrations.
///
/// A heartbeat only moves its key's deadline in the map: O(1), no allocation. Each key has one
/// heap entry, filed under an earlier deadline; when that comes due and the key was heard from
/// since, the entry is filed again under the current deadline (about once per TTL per key,
/// not once per heartbeat). Entries of removed keys are dropped when they come due, so the
/// heap holds at most the live keys plus those removed within the last TTL.
///
/// A key that lapsed ([`Self::expire`]) is no longer tracked, but when it was last heard from
/// is kept until it is heard from again or removed: self-preservation may hold its withdrawal
/// (`crate::preservation`), and `GET /v1/routes` still shows its last heartbeat.
#[derive(Debug, Default)]
pub struct Presence {
    entries: HashMap<InstanceKey, Entry, FastHash>,
    heap: BinaryHeap<Reverse<(Instant, InstanceKey)>>,
    /// Keys that lapsed and were neither heard from again nor removed since: when each was
    /// last heard from.
    lapsed: HashMap<InstanceKey, Instant, FastHash>,
}

impl Presence {
    /// Records that `key` was heard from at `now`; it expires at `now + ttl` unless heard
    /// from again.
    pub fn touch(&mut self, key: &InstanceKey, now: Instant, ttl: Duration) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.last_seen = now;
            entry.deadline = now + ttl;
            return;
        }
        self.lapsed.remove(key);
        self.track(key, now, now + ttl);
    }

    /// Tracks every lapsed key again without its having been heard from: each expires at
    /// `now + ttl` unless heard from by then, and keeps when it was last heard from (the grace
    /// period after a hold of self-preservation). Returns how many.
    pub fn renew_lapsed(&mut self, now: Instant, ttl: Duration) -> usize {
        let lapsed = std::mem::take(&mut self.lapsed);
        let renewed = lapsed.len();
        for (key, last_seen) in lapsed {
            self.track(&key, last_seen, now + ttl);
        }
        renewed
    }

    fn track(&mut self, key: &InstanceKey, last_seen: Instant, deadline: Instant) {
        let entry = Entry {
            last_seen,
            deadline,
            filed: deadline,
        };
        self.entries.insert(key.clone(), entry);
        self.heap.push(Reverse((deadline, key.clone())));
    }

    /// Forgets `key` (deregistered or withdrawn); returns whether it was tracked.
    pub fn remove(&mut self, key: &InstanceKey) -> bool {
        self.lapsed.remove(key);
        self.entries.remove(key).is_some()
    }

    /// When `key` was last heard from, tracked or lapsed.
    pub fn last_seen(&self, key: &InstanceKey) -> Option<Instant> {
        self.entries
            .get(key)
            .map(|e| e.last_seen)
            .or_else(|| self.lapsed.get(key).copied())
    }

    /// Whether `key` lapsed and was neither heard from again nor removed since.
    pub fn is_lapsed(&self, key: &InstanceKey) -> bool {
        self.lapsed.contains_key(key)
    }

    /// How many keys lapsed and were neither heard from again nor removed since: the
    /// instances whose withdrawal self-preservation holds (`crate::preservation`).
    pub fn lapsed(&self) -> usize {
        self.lapsed.len()
    }

    /// Forgets every lapsed key and returns them (they are being withdrawn), in no order.
    pub fn take_lapsed(&mut self) -> Vec<InstanceKey> {
        self.lapsed.drain().map(|(key, _)| key).collect()
    }

    /// Whether `key` is tracked: registered and not lapsed (or heard from since it lapsed).
    #[cfg(test)]
    fn contains(&self, key: &InstanceKey) -> bool {
        self.entries.contains_key(key)
    }

    /// How many tracked keys were last heard from before `before`. O(keys): called only when
    /// an instance lapses or withdrawals are held (`crate::preservation`).
    pub fn silent_since(&self, before: Instant) -> usize {
        self.entries
            .values()
            .filter(|e| e.last_seen < before)
            .count()
    }

    /// Stops tracking and returns every key whose deadline is at or before `now` (each is
    /// lapsed until heard from again or removed).
    pub fn expire(&mut self, now: Instant) -> Vec<InstanceKey> {
        let mut expired = Vec::new();
        while self
            .heap
            .peek()
            .is_some_and(|Reverse((due, _))| *due <= now)
        {
            let Some(Reverse((due, key))) = self.heap.pop() else {
                break;
            };
            let Some(entry) = self.entries.get_mut(&key) else {
                continue; // removed since it was filed
            };
            if entry.filed != due {
                continue; // an entry of an earlier registration of the same key
            }
            if entry.deadline <= now {
                let last_seen = entry.last_seen;
                self.entries.remove(&key);
                self.lapsed.insert(key.clone(), last_seen);
                expired.push(key);
            } else {
                // Heard from since it was filed: file it again under its current deadline.
                entry.filed = entry.deadline;
                self.heap.push(Reverse((entry.deadline, key)));
            }
        }
        expired
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> InstanceKey {
        InstanceKey {
            service: "web".into(),
            version: "v1".into(),
            id: id.into(),
        }
    }

    const TTL: Duration = Duration::from_secs(3);

    #[test]
    fn silent_instances_expire_after_the_ttl() {
        let t0 = Instant::now();
        let mut p = Presence::default();
        p.touch(&key("a"), t0, TTL);
        p.touch(&key("b"), t0 + Duration::from_secs(1), TTL);
        assert!(p.expire(t0 + Duration::from_millis(2999)).is_empty());
        assert_eq!(p.expire(t0 + TTL), vec![key("a")]);
        assert_eq!(p.len(), 1);
        assert_eq!(p.expire(t0 + Duration::from_secs(10)), vec![key("b")]);
        assert!(p.is_empty());
    }

    #[test]
    fn heartbeats_push_the_deadline_back() {
        let t0 = Instant::now();
        let mut p = Presence::default();
        for s in 0..10 {
            p.touch(&key("a"), t0 + Duration::from_secs(s), TTL);
        }
        assert!(p.expire(t0 + Duration::from_secs(11)).is_empty());
        assert_eq!(p.last_seen(&key("a")), Some(t0 + Duration::from_secs(9)));
        assert_eq!(p.expire(t0 + Duration::from_secs(12)), vec![key("a")]);
    }

    #[test]
    fn silent_keys_are_counted_by_when_they_were_last_heard_from() {
        let mut p = Presence::default();
        let t0 = Instant::now();
        p.touch(&key("a"), t0, TTL);
        p.touch(&key("b"), t0 + Duration::from_secs(1), TTL);
        p.touch(&key("c"), t0 + Duration::from_secs(2), TTL);
        assert_eq!(p.silent_since(t0), 0);
        assert_eq!(p.silent_since(t0 + Duration::from_millis(1500)), 2);
        assert!(p.contains(&key("a")));
        assert_eq!(p.expire(t0 + TTL), vec![key("a")]);
        assert!(!p.contains(&key("a")), "a lapsed key is no longer tracked");
        assert_eq!(p.silent_since(t0 + Duration::from_secs(3)), 2);
    }

    #[test]
    fn a_lapsed_key_keeps_when_it_was_last_heard_from_until_heard_again_or_removed() {
        let t0 = Instant::now();
        let mut p = Presence::default();
        for id in ["a", "b", "c"] {
            p.touch(&key(id), t0, TTL);
        }
        assert_eq!(p.expire(t0 + TTL).len(), 3);
        for id in ["a", "b", "c"] {
            assert!(p.is_lapsed(&key(id)) && !p.contains(&key(id)));
            assert_eq!(p.last_seen(&key(id)), Some(t0));
        }
        assert_eq!(p.lapsed(), 3);
        // Heard from again: tracked, last heard now.
        p.touch(&key("a"), t0 + TTL * 2, TTL);
        assert!(!p.is_lapsed(&key("a")) && p.contains(&key("a")));
        assert_eq!(p.last_seen(&key("a")), Some(t0 + TTL * 2));
        // Removed: forgotten.
        assert!(!p.remove(&key("c")), "a lapsed key is not tracked");
        assert!(!p.is_lapsed(&key("c")));
        assert_eq!(p.last_seen(&key("c")), None);
        assert_eq!(p.lapsed(), 1);
        // Renewed (a grace period): tracked again, still last heard at t0, expiring at the
        // end of the grace period.
        assert_eq!(p.renew_lapsed(t0 + TTL * 2, TTL * 2), 1);
        assert!(!p.is_lapsed(&key("b")) && p.contains(&key("b")));
        assert_eq!((p.lapsed(), p.len()), (0, 2));
        assert_eq!(p.last_seen(&key("b")), Some(t0));
        assert_eq!(p.silent_since(t0 + TTL), 1, "b is still silent");
        assert_eq!(
            p.expire(t0 + TTL * 4 - Duration::from_millis(1)),
            vec![key("a")],
            "a, heard from at 6 s, lapses at 9 s; b not before the end of its grace at 12 s"
        );
        assert_eq!(p.expire(t0 + TTL * 4), vec![key("b")]);
        // Taken (withdrawn): forgotten.
        let mut taken = p.take_lapsed();
        taken.sort();
        assert_eq!(taken, vec![key("a"), key("b")]);
        assert_eq!(p.lapsed(), 0);
        assert_eq!(p.last_seen(&key("a")), None);
    }

    #[test]
    fn removed_instances_never_expire() {
        let t0 = Instant::now();
        let mut p = Presence::default();
        p.touch(&key("a"), t0, TTL);
        assert!(p.remove(&key("a")));
        assert!(!p.remove(&key("a")));
        assert!(p.expire(t0 + Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn the_heap_holds_one_entry_per_key_under_many_heartbeats() {
        let t0 = Instant::now();
        let mut p = Presence::default();
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_millis(i);
            p.touch(&key("a"), now, TTL);
            p.touch(&key("b"), now, TTL);
            assert!(p.expire(now).is_empty());
            assert!(p.heap.len() <= 2, "heap has {} entries", p.heap.len());
        }
    }

    #[test]
    fn a_key_registered_again_expires_once_at_its_new_deadline() {
        let t0 = Instant::now();
        let mut p = Presence::default();
        p.touch(&key("a"), t0, TTL);
        assert!(p.remove(&key("a")));
        p.touch(&key("a"), t0 + Duration::from_secs(2), TTL);
        // The first registration's heap entry comes due and is dropped, not expired.
        assert!(p.expire(t0 + TTL).is_empty());
        assert_eq!(p.expire(t0 + Duration::from_secs(5)), vec![key("a")]);
        assert!(p.expire(t0 + Duration::from_secs(60)).is_empty());
        assert!(p.heap.is_empty());
    }
}
