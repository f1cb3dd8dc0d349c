//! What the size of a service version costs a sidecar, in one process with the sidecar's own
//! code (issue 5: sidecars at fleet scale). For each size N:
//!
//! - **reserve**: one reservation and its release (`Reserver::reserve`, power of two choices)
//!   on a version of N instances of capacity 1, all idle, and with half of them busy (held by
//!   other requests). The baseline is the same on a version of one instance (for the half-busy
//!   case: two instances, one busy), measured just before.
//! - **deltas**: one batch of 10 changes (instances turning `draining` and back) applied to a
//!   replica holding N instances, in place (`Replica::apply_deltas`), against the full-table
//!   resync a sidecar did until 2026-12-02 (a copy of the table with the batch applied, then
//!   `Replica::set`), in the same run.
//!
//! And for each queue length Q (`--queued`):
//!
//! - **queue**: Q + 1 requests share one instance of capacity 1, so Q of them wait in its queue
//!   at any time; each holds its slot for one turn of the runtime, releases it and reserves
//!   again. The figure is the time per reservation, against the same with 1 waiting, measured
//!   just before.
//!
//! Each figure is the median of 5 timed runs of at least 200 ms. Figures are printed and
//! written between the `sidecar-scale` markers of `docs/BENCHMARKS.md` (or of the file
//! `BENCH_DOCS` names). Run `target/release/usher-bench-sidecar-scale [--sizes 1,100,10000]`
//! from the repository root after `cargo build --release`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use usher_bench::docs;
use usher_shared::routes::{Change, Instance, InstanceState, RouteTable};
use usher_sidecar::replica::{Replica, Source};
use usher_sidecar::reserver::Reserver;

#[derive(Debug, Parser)]
#[command(about = "What a service version's size costs a sidecar per request and per batch")]
struct Args {
    /// Instances in the version, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,1000,10000")]
    sizes: Vec<usize>,
    /// Requests waiting in the queue, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,1000")]
    queued: Vec<usize>,
}

/// Reservations per queue measurement, split among the requests.
const QUEUE_RESERVATIONS: usize = 5_000;

/// Changes per batch of deltas (a directory batches up to 100; 100 changes/s over a 100 ms
/// batch is 10).
const BATCH: usize = 10;
const RUNS: usize = 5;
const RUN_AT_LEAST: Duration = Duration::from_millis(200);
const QUEUE_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_QUEUED: usize = 1024;

fn instance(i: usize, state: InstanceState) -> Instance {
    Instance {
        service: "fleet".into(),
        version: "v1".into(),
        id: format!("i{i}"),
        address: SocketAddr::from(([127, 0, 0, 1], 10_000 + (i % 50_000) as u16)),
        capacity: 1,
        weight: 1,
        state,
        started_at_ms: 0,
        labels: BTreeMap::new(),
    }
}

/// The median over [`RUNS`] runs of `op`'s time per call, each run calling it until
/// [`RUN_AT_LEAST`] has passed.
async fn per_call<F: AsyncFnMut() -> Result<()>>(mut op: F) -> Result<Duration> {
    let mut runs = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let (started, mut calls) = (Instant::now(), 0u32);
        while started.elapsed() < RUN_AT_LEAST {
            op().await?;
            calls += 1;
        }
        runs.push(started.elapsed() / calls);
    }
    runs.sort();
    Ok(runs[RUNS / 2])
}

/// One reservation and its release on a version of `n` instances of capacity 1, `busy` of
/// them held by other requests.
async fn reserve(n: usize, busy: usize) -> Result<Duration> {
    let reserver = Arc::new(Reserver::new("fleet", "v1", Arc::default()));
    let instances: Vec<_> = (0..n).map(|i| instance(i, InstanceState::Up)).collect();
    reserver.sync(&instances);
    let mut held = Vec::with_capacity(busy);
    for _ in 0..busy {
        held.push(reserver.reserve(&[], QUEUE_TIMEOUT, MAX_QUEUED).await?);
    }
    let time = per_call(async || {
        reserver.reserve(&[], QUEUE_TIMEOUT, MAX_QUEUED).await?;
        Ok(())
    })
    .await?;
    drop(held);
    Ok(time)
}

/// The time per reservation when `waiting` + 1 requests share one slot (see the module docs):
/// the median of [`RUNS`] runs of [`QUEUE_RESERVATIONS`] reservations.
async fn queue(waiting: usize) -> Result<Duration> {
    let reserver = Arc::new(Reserver::new("fleet", "v1", Arc::default()));
    reserver.sync(&[instance(0, InstanceState::Up)]);
    let requests = waiting + 1;
    let rounds = QUEUE_RESERVATIONS.div_ceil(requests);
    let mut runs = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let started = Instant::now();
        let tasks: Vec<_> = (0..requests)
            .map(|_| {
                let reserver = reserver.clone();
                tokio::spawn(async move {
                    for _ in 0..rounds {
                        let held = reserver
                            .reserve(&[], Duration::from_secs(600), requests)
                            .await?;
                        tokio::task::yield_now().await;
                        drop(held);
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        runs.push(started.elapsed() / (rounds * requests) as u32);
    }
    runs.sort();
    Ok(runs[RUNS / 2])
}

/// One batch of [`BATCH`] changes to a replica of `n` instances: (in place, full resync).
async fn deltas(n: usize) -> Result<(Duration, Duration)> {
    let table = RouteTable::from_snapshot(
        1,
        1,
        (0..n).map(|i| instance(i, InstanceState::Up)).collect(),
    );
    let replica = Replica::new(Arc::default());
    replica.set(table, Source::Directory);
    // Each batch turns BATCH instances `draining` or back `up`, walking through the table.
    let mut next = 0usize;
    let mut batch = || -> Vec<Change> {
        (0..BATCH)
            .map(|_| {
                let i = next % n;
                let state = if (next / n).is_multiple_of(2) {
                    InstanceState::Draining
                } else {
                    InstanceState::Up
                };
                next += 1;
                Change::Upsert(instance(i, state))
            })
            .collect()
    };
    let in_place = per_call(async || {
        let changes = batch();
        let revision = replica.table().revision;
        replica.apply_deltas(1, revision, revision + 1, &changes)?;
        Ok(())
    })
    .await?;
    let full = per_call(async || {
        let changes = batch();
        let mut table = RouteTable::clone(&replica.table());
        let revision = table.revision;
        table.apply_deltas(1, revision, revision + 1, &changes)?;
        replica.set(table, Source::Directory);
        Ok(())
    })
    .await?;
    Ok((in_place, full))
}

struct Row {
    n: usize,
    idle: Duration,
    /// The same on one instance, measured just before.
    base_idle: Duration,
    half_busy: Duration,
    /// The same on two instances, one busy, measured just before.
    base_busy: Duration,
    in_place: Duration,
    full: Duration,
}

fn ns(d: Duration) -> String {
    format!("{}", d.as_nanos())
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

fn ratio(a: Duration, b: Duration) -> String {
    format!("{:.2}", a.as_secs_f64() / b.as_secs_f64())
}

fn report(rows: &[Row], queues: &[QueueRow], args: &str) -> String {
    let mut out = format!(
        "Measured {} on {} CPUs, one thread.\n\n```sh\ntarget/release/usher-bench-sidecar-scale {args}\n```\n\n",
        docs::today(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    out.push_str(
        "| instances in the version | reserve + release, all idle, ns | ÷ 1 instance | half busy, ns | ÷ 2 instances, 1 busy | batch of 10 deltas in place, µs | full resync, µs | full ÷ in place |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.n,
            ns(r.idle),
            ratio(r.idle, r.base_idle),
            ns(r.half_busy),
            ratio(r.half_busy, r.base_busy),
            us(r.in_place),
            us(r.full),
            ratio(r.full, r.in_place),
        ));
    }
    out.push_str(
        "\nEach ratio's baseline (reserve + release on 1 idle instance; on 2 instances with 1 busy) is measured just before its row. \
         Full resync: what a sidecar did per batch until 2026-12-02 (copy the table, apply the batch, re-sync every reserver, rebuild the index).\n",
    );
    out.push_str(
        "\n| requests waiting | per reservation through the queue, ns | ÷ 1 waiting |\n|---|---|---|\n",
    );
    for q in queues {
        out.push_str(&format!(
            "| {} | {} | {} |\n",
            q.waiting,
            ns(q.per_reservation),
            ratio(q.per_reservation, q.base),
        ));
    }
    out
}

struct QueueRow {
    waiting: usize,
    per_reservation: Duration,
    /// The same with 1 waiting, measured just before.
    base: Duration,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.sizes.is_empty() || args.sizes.contains(&0) || args.queued.contains(&0) {
        bail!("--sizes and --queued must be positive");
    }
    let mut rows = Vec::new();
    for &n in &args.sizes {
        let base_idle = reserve(1, 0).await?;
        let idle = reserve(n, 0).await?;
        let base_busy = reserve(2, 1).await?;
        let half_busy = reserve(n.max(2), n.max(2) / 2).await?;
        let (in_place, full) = deltas(n).await?;
        let row = Row {
            n,
            idle,
            base_idle,
            half_busy,
            base_busy,
            in_place,
            full,
        };
        eprintln!(
            "usher-bench-sidecar-scale: {n} instances: reserve {} ns idle, {} ns half busy; batch {} µs in place, {} µs full",
            ns(row.idle),
            ns(row.half_busy),
            us(row.in_place),
            us(row.full)
        );
        rows.push(row);
    }
    let mut queues = Vec::new();
    for &waiting in &args.queued {
        let base = queue(1).await?;
        let per_reservation = queue(waiting).await?;
        eprintln!(
            "usher-bench-sidecar-scale: {waiting} waiting: {} ns per reservation ({} ns with 1)",
            ns(per_reservation),
            ns(base)
        );
        queues.push(QueueRow {
            waiting,
            per_reservation,
            base,
        });
    }
    let list = |v: &[usize]| {
        v.iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let report = report(
        &rows,
        &queues,
        &format!(
            "--sizes {} --queued {}",
            list(&args.sizes),
            list(&args.queued)
        ),
    );
    println!("{report}");
    docs::write_section(&docs::path(), "sidecar-scale", &report)
}
