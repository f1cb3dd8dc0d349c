//! Cold-start and burst benchmark of usher's autoscaler, on loopback with the real binaries.
//!
//! - Cold start: the time from a client's first request through the sidecar (service at zero
//!   instances) to its response, against the baseline measured in the same run: the time the
//!   instance's own process needs from spawn to its first answer. The difference is what usher
//!   adds (load report, autoscaler cycle, agent start, health check, registration, batch).
//! - Burst: 16 concurrent requests of 500 ms to a service at zero with concurrency 1 and at most
//!   8 instances, against the ideal of 8 warm instances (2 rounds: 1 s).
//!
//! Runs alternate baseline and usher. Figures are printed and written between the
//! `autoscale` markers of `docs/BENCHMARKS.md` (or of the file `BENCH_DOCS` names). Build with `cargo build --release` first;
//! run `target/release/usher-bench-autoscale [ROUNDS]` from the repository root.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use usher_bench::docs;
use usher_tests::{admin_json, bin, free_tcp_port, http, wait_until, Mesh, Process};

const BURST: usize = 16;
const BURST_MS: u64 = 500;
const BURST_MAX: u32 = 8;

fn config() -> String {
    let server = bin("usher-test-server").display().to_string();
    format!(
        r#"
[[services]]
name = "cold"
command = ["{server}", "--port", "{{port}}", "--name", "cold"]
health = "http:/health"
concurrency = 1
max_instances = 1
idle_timeout = "1s"
drain_time = "500ms"

[[services]]
name = "burst"
command = ["{server}", "--port", "{{port}}", "--name", "burst"]
health = "http:/health"
concurrency = 1
max_instances = {BURST_MAX}
idle_timeout = "1s"
scale_down_delay = "1s"
scale_down_factor = 1.0
drain_time = "500ms"
"#
    )
}

/// Spawn to first answer of the instance process alone.
async fn baseline(dir: &std::path::Path, round: usize) -> Result<Duration> {
    let port = free_tcp_port();
    let started = Instant::now();
    let server = Process::start(
        &format!("baseline-{round}"),
        dir,
        &bin("usher-test-server"),
        &[
            "--port".into(),
            port.to_string(),
            "--name".into(),
            "baseline".into(),
        ],
    )?;
    let addr = format!("127.0.0.1:{port}");
    loop {
        if let Ok(r) = http::get(&addr, "baseline", "/").await {
            if r.status == 200 {
                break;
            }
        }
        if started.elapsed() > Duration::from_secs(10) {
            bail!("the baseline server did not answer");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = started.elapsed();
    drop(server);
    Ok(took)
}

/// Waits until `service` has no instance and a zero target.
async fn at_zero(admin: &str, service: &str) -> Result<()> {
    wait_until(
        Duration::from_secs(30),
        &format!("{service} at zero"),
        || async {
            let Ok(doc) = admin_json(admin, "/v1/services").await else {
                return false;
            };
            doc["services"].as_array().is_some_and(|all| {
                all.iter().any(|s| {
                    s["service"] == service && s["instances"] == 0 && s["scaling"]["target"] == 0
                })
            })
        },
    )
    .await?;
    Ok(())
}

fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|r| r.parse())
        .transpose()
        .context("ROUNDS must be a number")?
        .unwrap_or(10);
    let mesh = Mesh::new()?;
    let _directory = mesh
        .start_directory_with_config("directory", &config())
        .await?;
    let addrs = mesh.sidecar_addrs("bench");
    let _sidecar = mesh.start_sidecar("sidecar", &addrs).await?;
    let admin = mesh.directory.admin();
    let proxy = addrs.proxy();

    let (mut base, mut cold) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        base.push(baseline(mesh.dir(), round).await?);
        at_zero(&admin, "cold").await?;
        let started = Instant::now();
        let r = http::get(&proxy, "cold", "/").await?;
        if r.status != 200 {
            bail!("cold start answered {}: {}", r.status, r.text());
        }
        cold.push(started.elapsed());
        eprintln!(
            "round {round}: baseline {:.1} ms, usher cold start {:.1} ms",
            ms(base[round]),
            ms(cold[round])
        );
    }
    let (base_median, cold_median) = (median(&mut base), median(&mut cold));

    let mut bursts = Vec::new();
    for round in 0..3.min(rounds) {
        at_zero(&admin, "burst").await?;
        let started = Instant::now();
        let requests: Vec<_> = (0..BURST)
            .map(|_| {
                let proxy = proxy.clone();
                tokio::spawn(async move {
                    http::get(&proxy, "burst", &format!("/slow?ms={BURST_MS}")).await
                })
            })
            .collect();
        for request in requests {
            let r = request.await??;
            if r.status != 200 {
                bail!("burst request answered {}: {}", r.status, r.text());
            }
        }
        bursts.push(started.elapsed());
        eprintln!("burst round {round}: {:.0} ms", ms(bursts[round]));
    }
    let burst_median = median(&mut bursts);
    let ideal = Duration::from_millis(BURST_MS * (BURST as u64).div_ceil(u64::from(BURST_MAX)));

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let report = format!(
        "Measured {} on {cpus} CPUs (shared with whatever else runs). Cold start, median of \
         {rounds} rounds (loopback, release build):\n\n\
         | | ms |\n|---|---|\n\
         | instance alone: spawn to first answer (baseline) | {:.1} |\n\
         | through usher: first request to response, service at zero | {:.1} |\n\
         | added by usher | {:.1} |\n\
         | ratio usher / baseline | {:.2} |\n\n\
         Burst: {BURST} concurrent {BURST_MS} ms requests, service at zero, concurrency 1, at most \
         {BURST_MAX} instances; median of {} rounds: {:.0} ms, {:.2} × the {:.0} ms of {BURST_MAX} \
         warm instances. No request failed.\n",
        docs::today(),
        ms(base_median),
        ms(cold_median),
        ms(cold_median.saturating_sub(base_median)),
        cold_median.as_secs_f64() / base_median.as_secs_f64(),
        bursts.len(),
        ms(burst_median),
        burst_median.as_secs_f64() / ideal.as_secs_f64(),
        ms(ideal),
    );
    println!("{report}");
    docs::write_section(&docs::path(), "autoscale", &report)?;
    Ok(())
}
