//! The tokio runtime a binary runs on, sized by its `--threads` flag.
//!
//! One thread is a current-thread runtime: every task shares it and a wake-up never crosses
//! threads. More is a multi-thread runtime, whose idle workers search (spin, steal) for work
//! at every wake-up from another thread. With thousands of small events a second (heartbeats,
//! proxied requests) that search costs more than the work: at 3,000 agents the directory took
//! 0.20–0.28 core on one thread and 0.44–0.49 core on two workers (docs/BENCHMARKS.md).

/// Most worker threads `--threads` accepts.
pub const MAX_THREADS: usize = 1024;

/// One worker thread per CPU the process may use (1 if that cannot be read).
pub fn threads_per_cpu() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Checks a `--threads` value: 1..=[`MAX_THREADS`]. The error is the reason, for the flag's
/// error message.
pub fn check_threads(threads: usize) -> Result<usize, String> {
    if (1..=MAX_THREADS).contains(&threads) {
        Ok(threads)
    } else {
        Err(format!("must be between 1 and {MAX_THREADS}"))
    }
}

/// Builds the runtime: current-thread for 1, multi-thread with `threads` workers otherwise;
/// I/O and time drivers enabled. Errors when the operating system refuses the threads or the
/// I/O driver.
pub fn build(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    match threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_checked() {
        assert_eq!(check_threads(1), Ok(1));
        assert_eq!(check_threads(MAX_THREADS), Ok(MAX_THREADS));
        assert!(check_threads(0).is_err());
        assert!(check_threads(MAX_THREADS + 1).is_err());
        assert!(threads_per_cpu() >= 1);
    }

    #[test]
    fn both_kinds_of_runtime_run_tasks() {
        for threads in [1, 2] {
            let runtime = build(threads).unwrap();
            let answer = runtime.block_on(async { tokio::spawn(async { 42 }).await.unwrap() });
            assert_eq!(answer, 42);
        }
    }
}
