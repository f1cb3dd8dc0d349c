//! Transparent huge pages for the directory's heap.
//!
//! At thousands of agents the directory's work is quinn's, per datagram, over hundreds of MB of
//! connection state (about 43 KB per agent), and each datagram touches a cold connection, so
//! translating its addresses through 4 KiB pages is part of the cost. Backing the heap with
//! 2 MiB pages took 10–16% less CPU (11% in the median) at 1,000 and 3,000 agents
//! (docs/BENCHMARKS.md). Where the kernel's transparent huge pages are in `madvise` mode (as
//! on this project's reference machine; distributions differ), glibc's allocator asks for them
//! only when told to, with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`:
//! `deploy/systemd/usher-directory.service` sets it, and the directory says at start when it
//! runs without it where it would help. In `always` mode every process gets them; in `never`
//! none does.

use std::path::Path;

/// Where the kernel says its transparent-huge-page mode, as `always [madvise] never`.
const THP_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";

/// The glibc tunable that makes `malloc` ask for transparent huge pages (glibc 2.35 and later).
pub const TUNABLE: &str = "glibc.malloc.hugetlb";

/// Logs, at info level, how to back the heap with huge pages when the kernel would grant them
/// on request and the process did not ask. Reads [`THP_ENABLED`] and `GLIBC_TUNABLES`; says
/// nothing when either cannot be read or huge pages are on or off for every process.
pub fn advise() {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return;
    }
    let Ok(enabled) = std::fs::read_to_string(Path::new(THP_ENABLED)) else {
        return;
    };
    let tunables = std::env::var("GLIBC_TUNABLES").ok();
    if needs_advice(&enabled, tunables.as_deref()) {
        tracing::info!(
            "the kernel grants transparent huge pages on request, and this process does not \
             ask: set GLIBC_TUNABLES={TUNABLE}=1 (deploy/systemd/usher-directory.service does) \
             for less CPU per heartbeat at thousands of agents"
        );
    }
}

/// Whether a process whose kernel reports `enabled` (the contents of [`THP_ENABLED`]) and
/// whose `GLIBC_TUNABLES` is `tunables` would get huge pages only by asking, and does not ask.
fn needs_advice(enabled: &str, tunables: Option<&str>) -> bool {
    let madvise = enabled.split_whitespace().any(|mode| mode == "[madvise]");
    madvise && !asks_for_huge_pages(tunables.unwrap_or_default())
}

/// Whether `GLIBC_TUNABLES` (`name=value` pairs separated by `:`) sets [`TUNABLE`] to 1 (madvise)
/// or 2 (hugetlbfs pages).
fn asks_for_huge_pages(tunables: &str) -> bool {
    tunables
        .split(':')
        .filter_map(|pair| pair.split_once('='))
        .any(|(name, value)| name == TUNABLE && matches!(value, "1" | "2"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_only_where_huge_pages_come_on_request_and_none_are_asked_for() {
        let madvise = "always [madvise] never\n";
        assert!(needs_advice(madvise, None));
        assert!(needs_advice(madvise, Some("")));
        assert!(needs_advice(madvise, Some("glibc.malloc.hugetlb=0")));
        assert!(needs_advice(madvise, Some("glibc.malloc.arena_max=2")));
        assert!(!needs_advice(madvise, Some("glibc.malloc.hugetlb=1")));
        assert!(!needs_advice(
            madvise,
            Some("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2")
        ));
        assert!(!needs_advice("[always] madvise never\n", None));
        assert!(!needs_advice("always madvise [never]\n", None));
        assert!(!needs_advice("", None));
    }
}
