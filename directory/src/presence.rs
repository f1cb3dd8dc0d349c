//! Registration TTLs: when each instance was last heard from and when it expires.
//!
//! A timer heap in memory, never on disk (DESIGN.md: the directory holds only state it can
//! rebuild). Time is a parameter, so the TTL logic is tested without sleeping.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;

use tokio::time::Instant;
use usher_shared::routes::InstanceKey;

#[derive(Debug, Clone, Copy)]
struct Entry {
    last_seen: Instant,
    deadline: Instant,
}

/// Deadlines of live registrations. Stale heap entries (refreshed or removed keys) are
/// skipped lazily, so a heartbeat costs O(log n).
#[derive(Debug, Default)]
pub struct Presence {
    entries: HashMap<InstanceKey, Entry>,
    heap: BinaryHeap<Reverse<(Instant, InstanceKey)>>,
}

impl Presence {
    /// Records that `key` was heard from at `now`; it expires at `now + ttl` unless heard
    /// from again.
    pub fn touch(&mut self, key: &InstanceKey, now: Instant, ttl: Duration) {
        let deadline = now + ttl;
        self.entries.insert(
            key.clone(),
            Entry {
                last_seen: now,
                deadline,
            },
        );
        self.heap.push(Reverse((deadline, key.clone())));
        // Bound the heap: rebuild when stale entries dominate.
        if self.heap.len() > 64 && self.heap.len() > 4 * self.entries.len() {
            self.heap = self
                .entries
                .iter()
                .map(|(k, e)| Reverse((e.deadline, k.clone())))
                .collect();
        }
    }

    /// Forgets `key` (deregistered); returns whether it was tracked.
    pub fn remove(&mut self, key: &InstanceKey) -> bool {
        self.entries.remove(key).is_some()
    }

    /// When `key` was last heard from.
    pub fn last_seen(&self, key: &InstanceKey) -> Option<Instant> {
        self.entries.get(key).map(|e| e.last_seen)
    }

    /// Removes and returns every key whose deadline is at or before `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<InstanceKey> {
        let mut expired = Vec::new();
        while let Some(Reverse((deadline, _))) = self.heap.peek() {
            if *deadline > now {
                break;
            }
            let Some(Reverse((deadline, key))) = self.heap.pop() else {
                break;
            };
            // Only the entry's current deadline counts; older heap entries are stale.
            if self
                .entries
                .get(&key)
                .is_some_and(|e| e.deadline == deadline)
            {
                self.entries.remove(&key);
                expired.push(key);
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
    fn removed_instances_never_expire() {
        let t0 = Instant::now();
        let mut p = Presence::default();
        p.touch(&key("a"), t0, TTL);
        assert!(p.remove(&key("a")));
        assert!(!p.remove(&key("a")));
        assert!(p.expire(t0 + Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn the_heap_stays_bounded_under_many_heartbeats() {
        let t0 = Instant::now();
        let mut p = Presence::default();
        for i in 0..10_000u64 {
            p.touch(&key("a"), t0 + Duration::from_millis(i), TTL);
        }
        assert!(p.heap.len() <= 65, "heap has {} entries", p.heap.len());
    }
}
