//! The control plane at fleet scale (issue 5): one real `usher-directory` process and, in this
//! process, N agents heartbeating at the dictated interval (the agent's own session code, one
//! QUIC connection each), M subscribed sidecars (one QUIC connection each, reading the route
//! table stream and, by default, reporting load every second as a sidecar with requests in
//! flight does) and K instance changes per second (instances flipping between `up` and
//! `draining`, sent at once by their agent as a real agent does).
//!
//! Per size it reports the directory's CPU (share of one core, `/proc/PID/stat` utime+stime over
//! the steady window), its RSS (VmRSS at the end, VmHWM), this generator's own CPU share (it
//! competes with the directory for the same cores), the propagation delay of every change to
//! every sidecar (p50, p99, max; both ends are in this process, so one clock), the time for
//! a silent agent (connection open, heartbeats stopped) to be withdrawn at every sidecar, and
//! what following the fleet costs one real `usher-sidecar` process (CPU, writes, RSS), and
//! what the admin reads behind the dashboard cost at that size (`GET /v1/services` and
//! `GET /v1/routes` against `GET /healthz`, timed after the window). With
//! `--restarts` it instead kills and restarts the directory under the connected fleet and times
//! the fleet's return.
//!
//! ```text
//! usher-bench-directory [--sizes 1000,10000,30000] [--sidecars 1000] [--heartbeats 1s]
//!                       [--changes 100] [--seconds 20] [--arrivals 200] [--restarts]
//!                       [--load-reports busy|idle] [--stall DURATION]
//! ```
//!
//! With `--stall` the directory is paused (SIGSTOP) for that long in the middle of the steady
//! window and resumed (SIGCONT), as a host that froze it would, and the figures go to the
//! `directory-stall` section: what a directory that fell behind does to its fleet.
//!
//! `--heartbeats` is the interval the directory dictates, one for every run or one per size
//! (the targets of issue 5 are at 1 s; a longer one lets a fleet that does not fit beside
//! this generator at 1 s be measured at all, its rows saying so).
//!
//! Run from the repository root after `cargo build --release` (it starts
//! `target/release/usher-directory`); `bench/directory` does both. The figures are printed and
//! written between the `directory` markers of `docs/BENCHMARKS.md` (or of `$BENCH_DOCS`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use usher_agent::session::{self as agent_session, SessionContext};
use usher_bench::docs;
use usher_shared::backoff::Backoff;
use usher_shared::codec::{read_frame_owned, write_frame, MAX_DIRECTORY_FRAME, MAX_NODE_FRAME};
use usher_shared::enrolment::{self, Credentials, TlsFlags};
use usher_shared::identity::NodeIdentity;
use usher_shared::protocol::{
    DirectoryMessage, InstanceLoad, NodeMessage, Registration, Role, VersionLoad, FEED_FORMAT,
};
use usher_shared::quic::Liveness;
use usher_shared::routes::{Change, Instance, InstanceState};
use usher_shared::session::{directory_message, node_endpoint, open, Session};
use usher_sidecar::load_report::{LoadReporting, REPORT_INTERVAL};
use usher_tests::{admin_json, admin_metric, wait_until, Mesh};

/// The service every simulated instance belongs to.
const SERVICE: &str = "fleet";
/// The instance that goes silent at the end of a run.
const SILENT: &str = "silent";
/// Connections per QUIC endpoint (one UDP socket and one driver task each).
const CONNECTIONS_PER_ENDPOINT: usize = 500;
/// Most instances that take turns changing: each changes every `CHURNED / K` seconds, so its
/// arrivals are never confused with its previous change's.
const CHURNED: usize = 1_000;

#[derive(Debug, Parser)]
#[command(name = "usher-bench-directory", about = "The directory at fleet scale")]
struct Args {
    /// Instances (agents) per run, comma-separated: one run each.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000usize, 10_000, 30_000])]
    sizes: Vec<usize>,
    /// Subscribed sidecars: one number for every run, or one per size.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000usize])]
    sidecars: Vec<usize>,
    /// The heartbeat interval the directory dictates (`--heartbeat-interval`), such as `1s`:
    /// one for every run, or one per size.
    #[arg(long, value_delimiter = ',', default_value = "1s", value_parser = humantime::parse_duration)]
    heartbeats: Vec<Duration>,
    /// Instance changes per second during the steady window.
    #[arg(long, default_value_t = 100)]
    changes: u32,
    /// Length of the steady window, in seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Agents that connect per second while the fleet arrives (each is a mutual-TLS
    /// handshake; setup is not measured, only the steady window after it).
    #[arg(long, default_value_t = 200)]
    arrivals: u32,
    /// Instead of the steady window: once the fleet is up, kill the directory and start it
    /// again, twice, and time the fleet's return each time; written to the
    /// `directory-restart` section.
    #[arg(long)]
    restarts: bool,
    /// What the simulated sidecars report about their load: `busy`, a report every second
    /// naming one request in flight (a sidecar serving traffic; the heavier case for the
    /// directory), or `idle`, none (a sidecar without requests sends none).
    #[arg(long, value_enum, default_value_t = LoadReports::Busy)]
    load_reports: LoadReports,
    /// Pause the directory (SIGSTOP) for this long in the middle of the steady window, then
    /// resume it; written to the `directory-stall` section.
    #[arg(long, value_parser = humantime::parse_duration)]
    stall: Option<Duration>,
}

/// What the simulated sidecars report about their load (`--load-reports`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LoadReports {
    Busy,
    Idle,
}

/// One run's figures.
struct Figures {
    instances: usize,
    sidecars: usize,
    heartbeat: Duration,
    changes_per_s: u32,
    setup: Duration,
    directory_cpu: f64,
    generator_cpu: f64,
    /// UDP datagrams received per second on this host in the window (loopback: every
    /// datagram between the directory and the generator, counted once).
    datagrams_per_s: f64,
    /// Datagrams the kernel dropped for a full socket receive buffer in the setup and in
    /// the window: QUIC sends them again, and many mean a side fell behind.
    dropped_setup: Dropped,
    dropped_window: Dropped,
    rss_mb: f64,
    hwm_mb: f64,
    changes: usize,
    deliveries: usize,
    /// Changes read again at a sidecar after their first arrival, not in `deliveries`.
    sent_again: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    silent_withdrawn: Option<Duration>,
    /// Instances in the directory's table when the window started (all N, unless the
    /// machine could not bring them up in time).
    registered: usize,
    /// Instances the directory withdrew because their TTL lapsed during the window
    /// (`usher_directory_instances_expired_total` of its `/metrics`): none, unless agents'
    /// heartbeats stopped arriving in time (the directory or the generator fell behind).
    expired: u64,
    /// Times the directory's self-preservation began holding withdrawals in the window
    /// (`usher_directory_self_preservation_holds_total`): too many instances silent at once.
    holds: u64,
    /// QUIC handshakes the directory completed in the window
    /// (`usher_directory_handshakes_completed_total`): nodes reconnecting; none in a steady
    /// fleet.
    handshakes: u64,
    /// Load reports the directory recorded per second in the window
    /// (`usher_directory_load_reports_total`).
    load_reports_per_s: f64,
    /// Sidecars subscribed when the window started, and subscriptions made again in the run.
    subscribed: usize,
    resubscribed: usize,
    /// The real `usher-sidecar` that followed the fleet during the window.
    sidecar: RealSidecar,
    /// The admin reads timed after the window.
    admin: AdminReads,
}

/// Round trips to the directory's admin port after the window, under the fleet's load: the
/// median of [`ADMIN_READS`] of each path, one connection per read.
#[derive(Debug, Clone, Copy)]
struct AdminReads {
    /// `GET /healthz`: the baseline, an admin round trip with no data.
    healthz_ms: f64,
    /// `GET /v1/services`: the load and scaling the dashboard reads every 2 s.
    services_ms: f64,
    /// `GET /v1/routes`: every instance, which the dashboard reads less often on big tables.
    routes_ms: f64,
    routes_bytes: usize,
}

/// Reads of each admin path per [`AdminReads`] figure.
const ADMIN_READS: usize = 7;

impl AdminReads {
    async fn measure(admin: &str) -> Result<Self> {
        let healthz = median_read(admin, "/healthz").await?;
        let services = median_read(admin, "/v1/services").await?;
        let routes = median_read(admin, "/v1/routes").await?;
        Ok(Self {
            healthz_ms: healthz.0,
            services_ms: services.0,
            routes_ms: routes.0,
            routes_bytes: routes.1,
        })
    }
}

/// The median time in ms of [`ADMIN_READS`] `GET path` from `admin`, and the body's size.
async fn median_read(admin: &str, path: &str) -> Result<(f64, usize)> {
    let mut times = Vec::with_capacity(ADMIN_READS);
    let mut bytes = 0;
    for _ in 0..ADMIN_READS {
        let started = Instant::now();
        let reply = usher_tests::http::get(admin, "localhost", path).await?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        if reply.status != 200 {
            bail!("GET {path} on {admin}: status {}", reply.status);
        }
        bytes = reply.body.len();
    }
    times.sort_by(f64::total_cmp);
    Ok((times[ADMIN_READS / 2], bytes))
}

/// Datagrams dropped by the kernel over a span of the run, by whose socket's receive buffer
/// was full.
#[derive(Debug, Clone, Copy, Default)]
struct Dropped {
    /// At the directory's QUIC socket (the `drops` column of `/proc/net/udp`).
    directory: u64,
    /// Anywhere else on the host: the generator's sockets and the real sidecar's (the host's
    /// `Udp RcvbufErrors` less the directory's).
    generator: u64,
}

/// The drop counters at one moment: (the directory socket's, the host's).
#[derive(Debug, Clone, Copy)]
struct DropCounters {
    directory: u64,
    host: u64,
}

impl DropCounters {
    fn read(directory_port: u16) -> Result<Self> {
        Ok(Self {
            directory: socket_drops(directory_port)?,
            host: udp_counter("RcvbufErrors")?,
        })
    }

    /// What was dropped from `self` until `later`.
    fn until(self, later: DropCounters) -> Dropped {
        let directory = later.directory.saturating_sub(self.directory);
        let host = later.host.saturating_sub(self.host);
        Dropped {
            directory,
            generator: host.saturating_sub(directory),
        }
    }
}

/// What following the fleet cost one real `usher-sidecar` over the window.
struct RealSidecar {
    /// CPU, in cores.
    cpu: f64,
    /// Bytes written to storage (`/proc/PID/io` `write_bytes`), MB per second.
    writes_mb_per_s: f64,
    /// VmRSS at the end of the window, MB.
    rss_mb: f64,
}

/// What one run measured: the steady window, or the fleet's return after restarts.
enum Measured {
    Steady(Box<Figures>),
    Restarts {
        instances: usize,
        sidecars: usize,
        returns: Vec<Return>,
    },
}

/// How the fleet came back after the directory was killed and started again.
struct Return {
    /// Which restart of the run (1, 2, ...).
    nth: usize,
    /// Until the table held every agent's instance again.
    instances: Option<Duration>,
    /// Until every sidecar had read a full table from the new directory.
    sidecars: Option<Duration>,
    /// Instances in the table at the end of the wait.
    registered: usize,
    /// The new directory's CPU from its start to the end of the wait, in cores.
    directory_cpu: f64,
}

/// Restarts per run, one after the other (each a sample).
const RESTARTS: usize = 2;

/// The latest change of each churned instance, by instance id.
type Changes = Arc<RwLock<HashMap<String, Made>>>;

/// A change the generator made to a churned instance.
#[derive(Debug, Clone, Copy)]
struct Made {
    /// When it was made.
    at: Instant,
    /// The state it set.
    state: InstanceState,
    /// The instance's place among the churned ones, `0..CHURNED`.
    slot: usize,
    /// The change's number in the window, from 1: a sidecar that reads the same change twice
    /// (an instance withdrawn and registered again is sent again) counts it once.
    number: u64,
}

/// The changes one sidecar has read: the number of the last one counted for each churned
/// instance (0 for none), so each change's delay is counted once, at its first arrival.
struct Arrivals {
    last: Vec<u64>,
}

impl Default for Arrivals {
    fn default() -> Self {
        Self {
            last: vec![0; CHURNED],
        }
    }
}

/// What an upsert of a churned instance is to the sidecar that reads it.
#[derive(Debug, PartialEq, Eq)]
enum Arrival {
    /// The first arrival of the instance's latest change: its delay counts.
    First,
    /// That change again (its instance withdrawn and registered again).
    Again,
    /// Another state than the latest change's: an older change, or none of the generator's.
    Other,
}

impl Arrivals {
    /// What an upsert that sets `state` is, `change` being its instance's latest; records a
    /// first arrival.
    fn read(&mut self, change: &Made, state: InstanceState) -> Arrival {
        match self.last.get_mut(change.slot) {
            Some(last) if state == change.state => {
                if *last < change.number {
                    *last = change.number;
                    Arrival::First
                } else {
                    Arrival::Again
                }
            }
            _ => Arrival::Other,
        }
    }
}

/// What the simulated sidecars observe.
#[derive(Default)]
struct Observed {
    /// Change-to-arrival delays, in microseconds, one per change per sidecar: its first
    /// arrival there ([`Arrivals`]).
    delays_us: Mutex<Vec<u64>>,
    /// Changes a sidecar read again after their first arrival ([`Arrival::Again`]).
    sent_again: AtomicUsize,
    /// Sidecars subscribed (their first table has arrived).
    subscribed: AtomicUsize,
    /// Subscriptions that failed and were made again.
    resubscribed: AtomicUsize,
    /// Set when the silent agent stops heartbeating: a withdrawal seen before (the run
    /// collapsed and its registration lapsed with the others') does not count.
    silenced: AtomicBool,
    /// Sidecars that have seen the silent instance withdrawn since it was silenced.
    silent_withdrawn: AtomicUsize,
    /// Full tables received, first subscriptions and later ones alike.
    tables: AtomicUsize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.sizes.is_empty() || args.sizes.contains(&0) || args.sidecars.contains(&0) {
        bail!("--sizes and --sidecars must be positive");
    }
    if args.sidecars.len() != 1 && args.sidecars.len() != args.sizes.len() {
        bail!("--sidecars takes one number, or one per size");
    }
    if args.heartbeats.len() != 1 && args.heartbeats.len() != args.sizes.len() {
        bail!("--heartbeats takes one interval, or one per size");
    }
    if args.heartbeats.iter().any(|h| h.is_zero()) {
        bail!("--heartbeats must be positive");
    }
    if args.changes == 0 || args.seconds == 0 || args.arrivals == 0 {
        bail!("--changes, --seconds and --arrivals must be positive");
    }
    // The simulated agents log as usher-agent does (USHER_LOG, default warnings only here).
    if std::env::var_os("USHER_LOG").is_none() {
        std::env::set_var("USHER_LOG", "warn");
    }
    usher_shared::telemetry::init();
    if receive_buffer_cap().is_some_and(|cap| cap < usher_shared::quic::UDP_BUFFER) {
        eprintln!("usher-bench-directory: warning: {}", buffer_note());
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
    runtime.block_on(async {
        let mut all = Vec::new();
        for (i, &n) in args.sizes.iter().enumerate() {
            let m = args.sidecars[i.min(args.sidecars.len() - 1)];
            let heartbeat = args.heartbeats[i.min(args.heartbeats.len() - 1)];
            eprintln!(
                "usher-bench-directory: {n} instances, {m} sidecars, {} changes/s, heartbeat {}",
                args.changes,
                humantime::format_duration(heartbeat)
            );
            let measured = run(n, m, heartbeat, &args).await?;
            match &measured {
                Measured::Steady(figures) => eprintln!("{}", row(figures)),
                Measured::Restarts { returns, .. } => {
                    for back in returns {
                        eprintln!("{}", return_row(back));
                    }
                }
            }
            all.push(measured);
        }
        if args.restarts && args.stall.is_some() {
            bail!("--restarts and --stall are separate runs");
        }
        if args.restarts {
            let report = restart_report(&all, &args);
            println!("{report}");
            docs::write_section(&docs::path(), "directory-restart", &report)
        } else {
            let figures: Vec<Figures> = all
                .into_iter()
                .filter_map(|m| match m {
                    Measured::Steady(figures) => Some(*figures),
                    Measured::Restarts { .. } => None,
                })
                .collect();
            let report = report(&figures, &args);
            println!("{report}");
            let section = match args.stall {
                Some(_) => "directory-stall",
                None => "directory",
            };
            docs::write_section(&docs::path(), section, &report)
        }
    })
}

async fn run(n: usize, m: usize, heartbeat: Duration, args: &Args) -> Result<Measured> {
    let (k, seconds) = (args.changes, args.seconds);
    let setup_started = Instant::now();
    let mesh = Mesh::new()?;
    let drops_at_start = DropCounters::read(mesh.directory.quic_port)?;
    let mut directory = start_directory(&mesh, "directory", heartbeat).await?;
    let agent = credentials(&mesh, "agent", Some(SERVICE)).await?;
    let sidecar = credentials(&mesh, "sidecar", None).await?;
    let addr = mesh.directory.quic();
    let admin = mesh.directory.admin();

    // Sidecars first: they then also carry the fleet's arrival, as in a real start.
    let changes: Changes = Arc::default();
    let observed = Arc::new(Observed::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let sidecar_endpoints = endpoints(&sidecar, m, Liveness::KeepAlive)?;
    let mut sidecars = Vec::with_capacity(m);
    for i in 0..m {
        let endpoint = sidecar_endpoints[i / CONNECTIONS_PER_ENDPOINT].clone();
        let load = (args.load_reports == LoadReports::Busy).then(|| busy_sidecar(i, n));
        sidecars.push(tokio::spawn(subscribe(
            endpoint,
            addr.clone(),
            load,
            changes.clone(),
            observed.clone(),
            stop_rx.clone(),
        )));
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    let agent_endpoints = endpoints(&agent, n + 1, Liveness::Heartbeats)?;
    // The silent agent first, before the fleet's handshakes crowd the directory.
    let silent = silent_agent(&agent_endpoints[n / CONNECTIONS_PER_ENDPOINT], &addr).await?;
    let mut states = Vec::with_capacity(CHURNED.min(n));
    // Every agent's state sender lives as long as the run: a session whose sender is dropped
    // takes it as the end of its instance.
    let mut steady = Vec::with_capacity(n);
    let mut agents = Vec::with_capacity(n);
    let started_at_ms = usher_shared::unix_millis();
    for i in 0..n {
        let (state_tx, state_rx) = watch::channel(InstanceState::Up);
        if states.len() < CHURNED {
            states.push((format!("i-{i:05}"), state_tx));
        } else {
            steady.push(state_tx);
        }
        let (stop, stop_rx) = oneshot::channel();
        let ctx = SessionContext {
            endpoint: agent_endpoints[i / CONNECTIONS_PER_ENDPOINT].clone(),
            directory: addr.clone(),
            node: format!("bench/{i}"),
            instance: instance(&format!("i-{i:05}"), started_at_ms),
            state: state_rx,
            connected: Arc::new(AtomicBool::new(false)),
        };
        agents.push((stop, tokio::spawn(agent_session::run(ctx, stop_rx))));
        // A fleet arriving at `arrivals` a second, not a stampede.
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_secs_f64(100.0 / f64::from(args.arrivals))).await;
        }
    }
    let in_table = || instances_in_table(&admin);
    if let Err(e) = wait_until(
        Duration::from_secs(60 + n as u64 / 100),
        "every instance in the directory's table",
        || async { in_table().await == n + 1 },
    )
    .await
    {
        eprintln!("usher-bench-directory: going on with what registered: {e}");
    }
    let registered = in_table().await.saturating_sub(1);
    if let Err(e) = wait_until(
        Duration::from_secs(120),
        "every sidecar subscribed",
        || async { observed.subscribed.load(Ordering::Acquire) >= m },
    )
    .await
    {
        eprintln!("usher-bench-directory: going on without them: {e}");
    }
    // The last batches reach the sidecars.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let setup = setup_started.elapsed();

    if args.restarts {
        // A crash: the directory is killed and started again on the same addresses and state.
        let mut returns = Vec::new();
        for nth in 1..=RESTARTS {
            let back;
            (directory, back) = restart(&mesh, directory, heartbeat, nth, n, m, &observed).await?;
            returns.push(back);
        }
        stop_fleet(&stop_tx, sidecars, agents).await;
        return Ok(Measured::Restarts {
            instances: n,
            sidecars: m,
            returns,
        });
    }

    // One real sidecar beside the simulated ones: what following the fleet costs it.
    let real_addrs = mesh.sidecar_addrs("real");
    let real = mesh.start_sidecar("sidecar", &real_addrs).await?;
    let real_admin = real_addrs.admin();
    if let Err(e) = wait_until(
        Duration::from_secs(60),
        "the real sidecar holding every instance",
        || async { instances_in_table(&real_admin).await > registered },
    )
    .await
    {
        eprintln!("usher-bench-directory: going on without its full table: {e}");
    }

    // The steady window: K changes per second, round robin over the churned instances.
    let window_subscribed = observed.subscribed.load(Ordering::Acquire);
    let pid = directory.pid();
    let drops_at_window = DropCounters::read(mesh.directory.quic_port)?;
    let counters = || async {
        Ok::<_, anyhow::Error>((
            directory_counter(&admin, "usher_directory_instances_expired_total").await?,
            directory_counter(&admin, "usher_directory_self_preservation_holds_total").await?,
            directory_counter(&admin, "usher_directory_load_reports_total").await?,
            directory_counter(&admin, "usher_directory_handshakes_completed_total").await?,
        ))
    };
    let (expired_at_window, holds_at_window, reports_at_window, handshakes_at_window) =
        counters().await?;
    let (dir_before, own_before, udp_before, window_started) = (
        cpu_ticks(pid)?,
        cpu_ticks_self()?,
        udp_counter("InDatagrams")?,
        Instant::now(),
    );
    let (real_cpu_before, real_writes_before) =
        (cpu_ticks(real.pid())?, bytes_written(real.pid())?);
    let stall = args.stall.map(|pause| {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        tokio::spawn(async move {
            use nix::sys::signal::{kill, Signal};
            tokio::time::sleep(Duration::from_secs(seconds) / 2).await;
            eprintln!("usher-bench-directory: pausing the directory for {pause:?}");
            let _ = kill(pid, Signal::SIGSTOP);
            tokio::time::sleep(pause).await;
            let _ = kill(pid, Signal::SIGCONT);
        })
    });
    let mut made = 0usize;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(k)));
    while window_started.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        let slot = made % states.len();
        let (id, state_tx) = &states[slot];
        let next = match *state_tx.borrow() {
            InstanceState::Up => InstanceState::Draining,
            _ => InstanceState::Up,
        };
        made += 1;
        let change = Made {
            at: Instant::now(),
            state: next,
            slot,
            number: made as u64,
        };
        changes
            .write()
            .map_err(|_| anyhow::anyhow!("change log poisoned"))?
            .insert(id.clone(), change);
        let _ = state_tx.send(next);
    }
    if let Some(stall) = stall {
        stall.await.context("the stall task")?;
    }
    // The last changes arrive.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let window = window_started.elapsed().as_secs_f64();
    let clk_tck = clock_ticks_per_second();
    let directory_cpu = (cpu_ticks(pid)? - dir_before) as f64 / clk_tck / window;
    let generator_cpu = (cpu_ticks_self()? - own_before) as f64 / clk_tck / window;
    let datagrams_per_s = udp_counter("InDatagrams")?.saturating_sub(udp_before) as f64 / window;
    let drops_at_end = DropCounters::read(mesh.directory.quic_port)?;
    let (expired_at_end, holds_at_end, reports_at_end, handshakes_at_end) = counters().await?;
    let expired = expired_at_end.saturating_sub(expired_at_window);
    let holds = holds_at_end.saturating_sub(holds_at_window);
    let handshakes = handshakes_at_end.saturating_sub(handshakes_at_window);
    let load_reports_per_s = reports_at_end.saturating_sub(reports_at_window) as f64 / window;
    let (rss_mb, hwm_mb) = memory_mb(pid)?;
    let sidecar = RealSidecar {
        cpu: (cpu_ticks(real.pid())? - real_cpu_before) as f64 / clk_tck / window,
        writes_mb_per_s: bytes_written(real.pid())?.saturating_sub(real_writes_before) as f64
            / 1e6
            / window,
        rss_mb: memory_mb(real.pid())?.0,
    };
    drop(real);
    let admin_reads = AdminReads::measure(&admin).await?;

    // A silent agent: its connection stays open, its heartbeats stop.
    let silenced = Instant::now();
    observed.silenced.store(true, Ordering::Release);
    let _ = silent.send(());
    let silent_withdrawn = wait_until(
        silent_wait(heartbeat),
        "the silent instance withdrawn at every sidecar",
        || async {
            observed.silent_withdrawn.load(Ordering::Acquire)
                >= observed.subscribed.load(Ordering::Acquire)
        },
    )
    .await
    .ok()
    .map(|_| silenced.elapsed());

    stop_fleet(&stop_tx, sidecars, agents).await;
    drop(directory);
    drop(steady);

    let mut delays = std::mem::take(
        &mut *observed
            .delays_us
            .lock()
            .map_err(|_| anyhow::anyhow!("delays poisoned"))?,
    );
    delays.sort_unstable();
    let pct = |p: f64| -> f64 {
        if delays.is_empty() {
            return f64::NAN;
        }
        let i = ((delays.len() as f64 * p).ceil() as usize).clamp(1, delays.len()) - 1;
        delays[i] as f64 / 1000.0
    };
    Ok(Measured::Steady(Box::new(Figures {
        instances: n,
        sidecars: m,
        heartbeat,
        changes_per_s: k,
        setup,
        directory_cpu,
        generator_cpu,
        datagrams_per_s,
        dropped_setup: drops_at_start.until(drops_at_window),
        dropped_window: drops_at_window.until(drops_at_end),
        rss_mb,
        hwm_mb,
        changes: made,
        deliveries: delays.len(),
        sent_again: observed.sent_again.load(Ordering::Acquire),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
        silent_withdrawn,
        registered,
        expired,
        holds,
        handshakes,
        load_reports_per_s,
        subscribed: window_subscribed,
        sidecar,
        resubscribed: observed.resubscribed.load(Ordering::Acquire),
        admin: admin_reads,
    })))
}

/// `write_bytes` of `/proc/PID/io`: bytes process `pid` caused to be written to storage.
fn bytes_written(pid: u32) -> Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).context("read /proc/PID/io")?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no write_bytes in /proc/PID/io")
}

/// A counter of the directory's `/metrics`, such as `usher_directory_instances_expired_total`.
async fn directory_counter(admin: &str, name: &str) -> Result<u64> {
    Ok(admin_metric(admin, name).await? as u64)
}

/// Instances in the table at admin port `admin` (a directory's or a sidecar's; 0 if it does
/// not answer).
async fn instances_in_table(admin: &str) -> usize {
    admin_json(admin, "/v1/routes")
        .await
        .ok()
        .and_then(|doc| doc["instances"].as_array().map(Vec::len))
        .unwrap_or(0)
}

/// Stops the simulated sidecars and agents (the agents close without deregistering: the
/// directory is stopped next anyway).
async fn stop_fleet(
    stop: &watch::Sender<bool>,
    sidecars: Vec<JoinHandle<()>>,
    agents: Vec<(oneshot::Sender<&'static str>, JoinHandle<bool>)>,
) {
    let _ = stop.send(true);
    for sidecar in sidecars {
        let _ = tokio::time::timeout(Duration::from_secs(5), sidecar).await;
    }
    for (stop, task) in agents {
        drop(stop);
        task.abort();
    }
}

/// How long to wait for the silent agent's withdrawal at every sidecar: 20 s, or two TTLs
/// (6 intervals) when that is longer.
fn silent_wait(heartbeat: Duration) -> Duration {
    Duration::from_secs(20).max(heartbeat * 6)
}

/// Starts `mesh`'s directory dictating a heartbeat every `heartbeat`.
async fn start_directory(
    mesh: &Mesh,
    name: &str,
    heartbeat: Duration,
) -> Result<usher_tests::Process> {
    let interval = humantime::format_duration(heartbeat).to_string();
    mesh.start_directory_heartbeating(name, &interval).await
}

/// Kills `directory`, starts it again and waits for the `n` agents to register and the `m`
/// sidecars to read a full table again; returns the new directory and how the fleet came
/// back (restart number `nth`).
async fn restart(
    mesh: &Mesh,
    mut directory: usher_tests::Process,
    heartbeat: Duration,
    nth: usize,
    n: usize,
    m: usize,
    observed: &Observed,
) -> Result<(usher_tests::Process, Return)> {
    let tables_before = observed.tables.load(Ordering::Acquire);
    directory.kill();
    let killed = Instant::now();
    let directory = start_directory(mesh, &format!("directory-restart-{nth}"), heartbeat).await?;
    let (cpu_before, started) = (cpu_ticks(directory.pid())?, Instant::now());
    let admin = mesh.directory.admin();
    let timeout = Duration::from_secs(60 + n as u64 / 100);
    let in_table = || instances_in_table(&admin);
    let (mut instances, mut sidecars) = (None, None);
    while killed.elapsed() < timeout && (instances.is_none() || sidecars.is_none()) {
        if instances.is_none() && in_table().await >= n {
            instances = Some(killed.elapsed());
        }
        if sidecars.is_none() && observed.tables.load(Ordering::Acquire) >= tables_before + m {
            sidecars = Some(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Its CPU from its start, over the time since its start.
    let directory_cpu = (cpu_ticks(directory.pid())? - cpu_before) as f64
        / clock_ticks_per_second()
        / started.elapsed().as_secs_f64();
    let back = Return {
        nth,
        instances,
        sidecars,
        registered: in_table().await,
        directory_cpu,
    };
    Ok((directory, back))
}

fn instance(id: &str, started_at_ms: u64) -> Instance {
    Instance {
        service: SERVICE.into(),
        version: "v1".into(),
        id: id.into(),
        address: "127.0.0.1:9".parse().expect("a literal address"),
        capacity: 8,
        weight: 1,
        state: InstanceState::Up,
        started_at_ms,
        labels: BTreeMap::new(),
    }
}

/// A certificate for `role` through the real join flow (a token made by the CLI).
async fn credentials(mesh: &Mesh, role: &str, service: Option<&str>) -> Result<Credentials> {
    let token = mesh.create_token(role, service, None)?;
    let identity = match service {
        Some(service) => NodeIdentity::Agent {
            service: service.into(),
        },
        None => NodeIdentity::Sidecar,
    };
    let flags = TlsFlags {
        join_token: Some(token),
        join_address: Some(mesh.directory.join()),
        ..TlsFlags::default()
    };
    let tls = flags
        .validate(&mesh.directory.quic())
        .map_err(|e| anyhow::anyhow!("--{}: {}", e.flag, e.reason))?
        .for_node(identity, &mesh.dir().join(format!("{role}-state")));
    enrolment::obtain(&tls)
        .await
        .with_context(|| format!("no {role} certificate"))
}

/// Enough QUIC endpoints for `connections`, [`CONNECTIONS_PER_ENDPOINT`] each, whose
/// connections stay alive as a real node's of that role do (`liveness`).
fn endpoints(
    credentials: &Credentials,
    connections: usize,
    liveness: Liveness,
) -> Result<Vec<quinn::Endpoint>> {
    (0..connections.div_ceil(CONNECTIONS_PER_ENDPOINT))
        .map(|_| node_endpoint(credentials, liveness).context("cannot open a QUIC endpoint"))
        .collect()
}

/// What the `index`th of the simulated sidecars reports while busy: one request in flight on
/// one of the `instances` (each sidecar on another, as a fleet's clients spread), and when its
/// first report is due, spread evenly over a [`REPORT_INTERVAL`] for a thousand sidecars so
/// that the fleet's reports arrive as a steady stream, as independent sidecars' do.
fn busy_sidecar(index: usize, instances: usize) -> BusySidecar {
    let id = format!("i-{:05}", index % instances.max(1));
    BusySidecar {
        versions: vec![VersionLoad {
            service: SERVICE.into(),
            version: "v1".into(),
            in_flight: 1,
            queued: 0,
            instances: vec![InstanceLoad { id, in_flight: 1 }],
        }],
        offset: REPORT_INTERVAL.mul_f64((index % 1000) as f64 / 1000.0),
    }
}

/// A simulated sidecar's load and its place in the reporting period.
#[derive(Clone)]
struct BusySidecar {
    versions: Vec<VersionLoad>,
    offset: Duration,
}

/// A busy simulated sidecar's reports: when each is due, by the real sidecar's rule
/// ([`LoadReporting`]: every [`REPORT_INTERVAL`], early with a frame just read), and sent.
struct Reporter {
    load: BusySidecar,
    reporting: LoadReporting,
}

impl Reporter {
    fn new(load: BusySidecar) -> Self {
        let reporting = LoadReporting::new(tokio::time::Instant::now() + load.offset);
        Self { load, reporting }
    }

    /// Decides the period's report at `now` and sends it if it is worth sending; false when
    /// the stream failed.
    async fn report(&mut self, send: &mut quinn::SendStream, now: tokio::time::Instant) -> bool {
        if !self.reporting.periodic(&self.load.versions, now) {
            return true;
        }
        let report = NodeMessage::LoadReport {
            versions: self.load.versions.clone(),
        };
        write_frame(send, &report, MAX_NODE_FRAME).await.is_ok()
    }
}

/// Sleeps until `reporter`'s next report is due, or forever without one (an idle sidecar).
async fn report_due(reporter: Option<&Reporter>) {
    match reporter {
        Some(r) => tokio::time::sleep_until(r.reporting.due_at()).await,
        None => std::future::pending().await,
    }
}

/// One sidecar: subscribes, reports `load` (see [`Reporter`]) and records, for every change
/// of a churned instance, the delay since the change was made; counts the silent instance's
/// withdrawal. Like a real sidecar it subscribes again after its connection fails (a fleet
/// starting at once overruns the directory's handshakes for a moment).
async fn subscribe(
    endpoint: quinn::Endpoint,
    addr: String,
    load: Option<BusySidecar>,
    changes: Changes,
    observed: Arc<Observed>,
    mut stop: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    let mut counted = false;
    let mut silent_seen = false;
    let mut delays = Vec::new();
    let mut arrivals = Arrivals::default();
    let mut sent_again = 0usize;
    'connect: loop {
        let opened = async {
            let mut session = open(&endpoint, &addr, Role::Sidecar, "bench/sidecar").await?;
            let subscribe = NodeMessage::Subscribe {
                epoch: None,
                revision: 0,
                feed_format: FEED_FORMAT,
                grace_upserts: false,
            };
            session.send(&subscribe).await?;
            Ok::<_, usher_shared::session::SessionError>(session)
        };
        let session = match opened.await {
            Ok(session) => session,
            Err(e) => {
                failures += 1;
                if failures.is_multiple_of(10) {
                    eprintln!("usher-bench-directory: a sidecar cannot subscribe yet: {e}");
                }
                let pause = Duration::from_millis(200 + u64::from(failures % 7) * 50);
                tokio::select! {
                    _ = stop.changed() => break 'connect,
                    _ = tokio::time::sleep(pause) => continue 'connect,
                }
            }
        };
        let Session {
            connection,
            mut send,
            recv,
            ..
        } = session;
        // Like a real sidecar, one task reads the feed and reports the load.
        let mut reporter = load.clone().map(Reporter::new);
        let mut reader = pin!(read_frame_owned(recv, MAX_DIRECTORY_FRAME));
        loop {
            let frame = tokio::select! {
                _ = stop.changed() => {
                    connection.close(0u32.into(), b"benchmark over");
                    break 'connect;
                }
                _ = report_due(reporter.as_ref()) => {
                    if let Some(r) = reporter.as_mut() {
                        if !r.report(&mut send, tokio::time::Instant::now()).await {
                            reporter = None; // the stream failed; the next read says why
                        }
                    }
                    continue;
                }
                (recv, frame) = &mut reader => {
                    reader.set(read_frame_owned(recv, MAX_DIRECTORY_FRAME));
                    frame
                }
            };
            let arrived = Instant::now();
            if let Some(r) = reporter.as_mut() {
                let now = tokio::time::Instant::now();
                if r.reporting.may_ride_along(now) && !r.report(&mut send, now).await {
                    reporter = None;
                }
            }
            let batch = match directory_message(frame) {
                Ok(DirectoryMessage::Deltas { changes, .. }) => changes,
                Ok(DirectoryMessage::SnapshotChunk { last, .. }) => {
                    if last {
                        observed.tables.fetch_add(1, Ordering::AcqRel);
                    }
                    if last && !counted {
                        counted = true;
                        observed.subscribed.fetch_add(1, Ordering::AcqRel);
                    }
                    continue;
                }
                Ok(_) => continue,
                Err(e) => {
                    failures += 1;
                    observed.resubscribed.fetch_add(1, Ordering::AcqRel);
                    eprintln!("usher-bench-directory: a sidecar subscribes again: {e}");
                    continue 'connect;
                }
            };
            let Ok(made) = changes.read() else {
                break 'connect;
            };
            for change in &batch {
                match change {
                    Change::Upsert(i) => {
                        let Some(change) = made.get(&i.id) else {
                            continue;
                        };
                        match arrivals.read(change, i.state) {
                            Arrival::First => {
                                delays.push(arrived.duration_since(change.at).as_micros() as u64)
                            }
                            Arrival::Again => sent_again += 1,
                            Arrival::Other => {}
                        }
                    }
                    Change::Remove(key)
                        if key.id == SILENT
                            && !silent_seen
                            && observed.silenced.load(Ordering::Acquire) =>
                    {
                        silent_seen = true;
                        observed.silent_withdrawn.fetch_add(1, Ordering::AcqRel);
                    }
                    _ => {}
                }
            }
        }
    }
    if let Ok(mut all) = observed.delays_us.lock() {
        all.extend(delays);
    }
    observed.sent_again.fetch_add(sent_again, Ordering::AcqRel);
}

/// An agent that registers and heartbeats until told to go silent; then it keeps its
/// connection open and sends nothing (a hung process, not a crashed one). Like a real node it
/// connects again after its backoff while its handshake fails (the sidecars' arrival may
/// crowd the directory), for up to a minute.
async fn silent_agent(endpoint: &quinn::Endpoint, addr: &str) -> Result<oneshot::Sender<()>> {
    let mut backoff = Backoff::reconnect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut session = loop {
        match open(endpoint, addr, Role::Agent, "bench/silent").await {
            Ok(session) => break session,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(backoff.next_delay()).await,
            Err(e) => return Err(e.into()),
        }
    };
    session
        .send(&NodeMessage::Register(Registration {
            instance: instance(SILENT, usher_shared::unix_millis()),
        }))
        .await?;
    let DirectoryMessage::Registered {
        next_heartbeat_ms, ..
    } = session.recv().await?
    else {
        bail!("the silent agent was not registered");
    };
    let (silence, mut silenced) = oneshot::channel::<()>();
    let task: JoinHandle<()> = tokio::spawn(async move {
        let mut next = Duration::from_millis(next_heartbeat_ms);
        loop {
            tokio::select! {
                _ = &mut silenced => break,
                _ = tokio::time::sleep(next) => {}
            }
            let heartbeat = NodeMessage::Heartbeat {
                state: InstanceState::Up,
                ack: true,
            };
            if session.send(&heartbeat).await.is_err() {
                return;
            }
            match session.recv().await {
                Ok(DirectoryMessage::HeartbeatAck { next_heartbeat_ms }) => {
                    next = Duration::from_millis(next_heartbeat_ms)
                }
                _ => return,
            }
        }
        // Silent from here on, with the connection open until the run ends.
        std::future::pending::<()>().await;
    });
    drop(task);
    Ok(silence)
}

/// Datagrams dropped so far at the UDP socket bound to 127.0.0.1:`port` (the `drops` column
/// of `/proc/net/udp`; 0 while no socket is bound there).
fn socket_drops(port: u16) -> Result<u64> {
    let table = std::fs::read_to_string("/proc/net/udp").context("read /proc/net/udp")?;
    let local = format!("0100007F:{port:04X}");
    Ok(table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let drops = fields.last()?.parse::<u64>().ok()?;
            (fields.get(1) == Some(&local.as_str())).then_some(drops)
        })
        .sum())
}

/// One of this host's UDP counters in `/proc/net/snmp` (`InDatagrams`: datagrams received;
/// `RcvbufErrors`: datagrams dropped because the socket's receive buffer was full).
fn udp_counter(counter: &str) -> Result<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").context("read /proc/net/snmp")?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = udp
        .next()
        .zip(udp.next())
        .context("no Udp lines in /proc/net/snmp")?;
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == counter)
        .with_context(|| format!("no Udp {counter} in /proc/net/snmp"))?
        .1
        .parse()
        .with_context(|| format!("Udp {counter}"))
}

/// utime + stime of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    stat_ticks(&Path::new("/proc").join(pid.to_string()).join("stat"))
}

fn cpu_ticks_self() -> Result<u64> {
    stat_ticks(Path::new("/proc/self/stat"))
}

fn stat_ticks(path: &Path) -> Result<u64> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    // Field 2 (the command) may hold spaces: count from its closing parenthesis.
    let after = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest)
        .context("malformed stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .context("short stat")?
            .parse()
            .context("stat field")
    };
    // utime and stime are fields 14 and 15, the 12th and 13th after the command.
    Ok(field(11)? + field(12)?)
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

/// VmRSS and VmHWM of process `pid`, in MB (10⁶ bytes).
fn memory_mb(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = |name: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    Ok((kb("VmRSS:") * 1024.0 / 1e6, kb("VmHWM:") * 1024.0 / 1e6))
}

fn row(f: &Figures) -> String {
    let within = humantime::format_duration(silent_wait(f.heartbeat));
    let silent = f
        .silent_withdrawn
        .map_or(format!("not within {within}"), |d| {
            format!("{:.2}", d.as_secs_f64())
        });
    format!(
        "| {} ({} registered, {} expired, {} holds, {} handshakes) | {} ({} subscribed, {} again, {} load reports/s) | {} | {} | {:.2} | {:.2} | {}; dropped {} + {} (setup {} + {}) | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {} of {}{} | {} | {:.3} | {:.2} | {:.1} | {:.0} |",
        fmt_int(f.instances),
        fmt_int(f.registered),
        fmt_int(f.expired as usize),
        fmt_int(f.holds as usize),
        fmt_int(f.handshakes as usize),
        fmt_int(f.sidecars),
        fmt_int(f.subscribed),
        fmt_int(f.resubscribed),
        fmt_int(f.load_reports_per_s.round() as usize),
        humantime::format_duration(f.heartbeat),
        f.changes_per_s,
        f.directory_cpu,
        f.generator_cpu,
        fmt_int(f.datagrams_per_s.round() as usize),
        fmt_int(f.dropped_window.directory as usize),
        fmt_int(f.dropped_window.generator as usize),
        fmt_int(f.dropped_setup.directory as usize),
        fmt_int(f.dropped_setup.generator as usize),
        f.rss_mb,
        f.hwm_mb,
        f.p50_ms,
        f.p99_ms,
        f.max_ms,
        fmt_int(f.deliveries),
        fmt_int(f.changes * f.subscribed),
        match f.sent_again {
            0 => String::new(),
            n => format!("; {} sent again", fmt_int(n)),
        },
        silent,
        f.sidecar.cpu,
        f.sidecar.writes_mb_per_s,
        f.sidecar.rss_mb,
        f.setup.as_secs_f64(),
    )
}

/// The restart columns of a [`Return`], from the restart's number on.
fn return_row(back: &Return) -> String {
    let secs =
        |d: Option<Duration>| d.map_or("not in time".into(), |d| format!("{:.1}", d.as_secs_f64()));
    format!(
        "| {} | {} | {} | {} | {:.2} |",
        back.nth,
        secs(back.instances),
        secs(back.sidecars),
        fmt_int(back.registered),
        back.directory_cpu,
    )
}

fn fmt_int(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "**met**"
    } else {
        "**missed**"
    }
}

/// The kernel's cap on a socket's receive buffer (`net.core.rmem_max`, bytes), if readable.
fn receive_buffer_cap() -> Option<usize> {
    std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// What the report says of the UDP buffers: the kernel's cap against what usher asks for.
fn buffer_note() -> String {
    let asked = usher_shared::quic::UDP_BUFFER;
    match receive_buffer_cap() {
        Some(cap) if cap >= asked => format!(
            "UDP receive buffers of {} bytes, as usher asks (`net.core.rmem_max` {}).",
            fmt_int(asked),
            fmt_int(cap)
        ),
        Some(cap) => format!(
            "UDP receive buffers capped at {} bytes by `net.core.rmem_max`, below the {} usher \
             asks for (`deploy/sysctl/90-usher.conf` raises it): expect drops at thousands of \
             agents.",
            fmt_int(cap),
            fmt_int(asked)
        ),
        None => "`net.core.rmem_max` unreadable.".into(),
    }
}

fn report(all: &[Figures], args: &Args) -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = docs::today();
    let sizes: Vec<String> = args.sizes.iter().map(usize::to_string).collect();
    let sidecars: Vec<String> = args.sidecars.iter().map(usize::to_string).collect();
    let mut out = format!(
        "Measured {} on {cpus} CPUs shared by the directory and this generator (and whatever \
         else runs), so CPU shares compete: the generator's own share is shown beside the \
         directory's. {}{}\n\n```sh\n{}SIZES={} SIDECARS={}{} CHANGES={} SECONDS_={} ARRIVALS={} \
         LOAD_REPORTS={}{} bench/directory\n```\n\n",
        date.trim(),
        buffer_note(),
        stall_note(args),
        preservation_env(),
        sizes.join(","),
        sidecars.join(","),
        heartbeats_env(args),
        args.changes,
        args.seconds,
        args.arrivals,
        load_reports_env(args.load_reports),
        args.stall
            .map(|d| format!(" STALL={}", humantime::format_duration(d)))
            .unwrap_or_default(),
    );
    out.push_str(
        "| instances | sidecars | heartbeat | changes/s | directory CPU (cores) | generator CPU (cores) \
         | UDP datagrams/s | directory RSS MB | RSS high-water MB | propagation p50 ms | p99 ms | max ms \
         | deliveries | silent agent withdrawn everywhere, s | real sidecar CPU (cores) \
         | its disk writes MB/s | its RSS MB | setup s |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for f in all {
        out.push_str(&row(f));
        out.push('\n');
    }
    out.push_str(
        "\nPropagation: from the moment the generator tells an agent its instance changed to the \
         moment each sidecar reads the batch holding it, one figure per change per sidecar, \
         the first time it reads it (`deliveries` counts them against changes × sidecars \
         subscribed when the window started; a sidecar whose connection failed subscribes \
         again, as a real one does, and `again` counts those; an instance withdrawn and \
         registered again is sent again, and `sent again` counts the changes a sidecar so \
         read more than once, each counted once in `deliveries`). `expired`: instances the \
         directory withdrew in the window because their TTL lapsed (its `/metrics`), none unless heartbeats fell behind; \
         each comes back at its agent's next registration (over its open connection, or \
         after a new handshake if that connection was lost). `holds`: times the directory's \
         self-preservation began holding withdrawals in the window because more of the \
         instances than its threshold (15% by default) were silent at once (its `/metrics`); \
         an instance it held counts as expired only if it stayed silent past the hold (10 \
         TTLs at most, then the grace period for those still silent when it ended). \
         `handshakes`: QUIC handshakes \
         the directory completed in the window (its `/metrics`), none unless nodes \
         reconnected. `heartbeat`: the interval the \
         directory dictates (1 s, the default, is the interval of issue 5's targets); the \
         silent agent is due to be withdrawn after its TTL of 3 intervals, and heartbeats \
         arrive N ÷ interval a second, so a row with a longer interval carries its N \
         instances' memory and table at fewer heartbeats a second. UDP datagrams/s: \
         the host's `Udp InDatagrams` (`/proc/net/snmp`) over the window, so every datagram \
         between the directory and the generator once, in either direction; unlike CPU it does \
         not depend on the machine's speed. `dropped D + G (setup D + G)`: datagrams the kernel \
         dropped because a socket's receive buffer was full, at the directory's socket \
         (`/proc/net/udp`) + at the generator's (the rest of the host's `Udp RcvbufErrors`), \
         in the window and in the setup before it; QUIC sends them again, and many mean that \
         side fell behind. Load reports: with `LOAD_REPORTS=busy` (the default) every simulated \
         sidecar reports one request in flight every second, as a sidecar serving traffic \
         does and by its rule (up to 100 ms early, with a batch just read), the first reports \
         spread evenly over the second; with `idle` they send none, as idle \
         sidecars do; `load reports/s` is what the directory recorded in the window (its \
         `usher_directory_load_reports_total`). Real sidecar: one `usher-sidecar` process \
         subscribed beside the simulated ones, following every change; its CPU and the bytes \
         it wrote to storage (`/proc/PID/io`, its persisted `routes.json`) over the window, \
         its RSS at the end.\n",
    );
    out.push_str(&format!(
        "\nAdmin reads (the dashboard's), timed after the window while the fleet still \
         heartbeats and churns: the median of {ADMIN_READS} `GET`s of each path, one \
         connection each, against `GET /healthz` (a round trip with no data) in the same \
         run. The dashboard reads `/v1/services` every 2 s and `/v1/routes` every 2 s up to \
         1,000 instances, then 2 ms per instance (20 s at 10,000).\n\n\
         | instances | `/healthz` ms | `/v1/services` ms | × `/healthz` | `/v1/routes` ms | × `/healthz` | `/v1/routes` MB |\n\
         |---|---|---|---|---|---|---|\n"
    ));
    for f in all {
        let a = &f.admin;
        out.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.2} |\n",
            fmt_int(f.instances),
            a.healthz_ms,
            a.services_ms,
            a.services_ms / a.healthz_ms,
            a.routes_ms,
            a.routes_ms / a.healthz_ms,
            a.routes_bytes as f64 / 1e6,
        ));
    }
    let at_target = |f: &&Figures| f.instances == 10_000 && f.heartbeat == Duration::from_secs(1);
    if let Some(f) = all.iter().find(at_target) {
        out.push_str("\nTargets of issue 5 at 10,000 instances:\n\n");
        out.push_str(&format!(
            "- directory CPU {:.2} cores, target ≤ 0.5 — {}\n",
            f.directory_cpu,
            verdict(f.directory_cpu <= 0.5)
        ));
        out.push_str(&format!(
            "- directory RSS {:.0} MB (high-water {:.0} MB), target ≤ 512 MB — {}\n",
            f.rss_mb,
            f.hwm_mb,
            verdict(f.hwm_mb <= 512.0)
        ));
        out.push_str(&format!(
            "- propagation p99 {:.1} ms, target ≤ 150 ms — {}\n",
            f.p99_ms,
            verdict(f.p99_ms <= 150.0 && f.deliveries > 0)
        ));
        let silent_ok = f
            .silent_withdrawn
            .is_some_and(|d| d <= Duration::from_millis(3500));
        out.push_str(&format!(
            "- silent agent withdrawn everywhere in {}, target ≤ 3.5 s — {}\n",
            f.silent_withdrawn.map_or(
                format!(
                    "more than {}",
                    humantime::format_duration(silent_wait(f.heartbeat))
                ),
                |d| format!("{:.2} s", d.as_secs_f64())
            ),
            verdict(silent_ok)
        ));
    }
    out
}

/// `--load-reports` as `bench/directory`'s `LOAD_REPORTS` takes it (clap's value name).
fn load_reports_env(load_reports: LoadReports) -> String {
    load_reports
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

/// ` HEARTBEATS=…` for the command line of a report, or nothing at the default (1 s).
/// What `--stall` did, for the report.
fn stall_note(args: &Args) -> String {
    args.stall.map_or(String::new(), |d| {
        format!(
            " In the middle of the window the directory was paused (SIGSTOP) for {} and then \
             resumed, as a host that froze it would; its CPU share counts the pause as idle. \
             The silent agent's column does not apply: this generator's silent agent does not \
             reconnect, so a pause that cuts its session silences it before its turn.",
            humantime::format_duration(d)
        )
    })
}

/// `USHER_DIRECTORY_SELF_PRESERVATION=…` when set (the directory reads it), for the command.
fn preservation_env() -> String {
    std::env::var("USHER_DIRECTORY_SELF_PRESERVATION")
        .map(|v| format!("USHER_DIRECTORY_SELF_PRESERVATION={v} "))
        .unwrap_or_default()
}

fn heartbeats_env(args: &Args) -> String {
    if args.heartbeats == [Duration::from_secs(1)] {
        return String::new();
    }
    let intervals: Vec<String> = args
        .heartbeats
        .iter()
        .map(|h| humantime::format_duration(*h).to_string())
        .collect();
    format!(" HEARTBEATS={}", intervals.join(","))
}

/// The `directory-restart` section: how the fleet came back after each restart.
fn restart_report(all: &[Measured], args: &Args) -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let sizes: Vec<String> = args.sizes.iter().map(usize::to_string).collect();
    let sidecars: Vec<String> = args.sidecars.iter().map(usize::to_string).collect();
    let mut out = format!(
        "Measured {} on {cpus} CPUs shared by the directory and this generator. {}\n\n```sh\n\
         RESTARTS=1 SIZES={} SIDECARS={}{} ARRIVALS={} bench/directory\n```\n\n\
         Once the fleet is up, the directory is killed (SIGKILL) and started again on the same \
         addresses and state, {RESTARTS} times in a row; every agent and sidecar reconnects \
         after its jittered backoff. Times from the kill; CPU is the new directory's from its start \
         to the end of the wait.\n\n\
         | instances | sidecars | restart | every instance back, s | every sidecar has a \
         table again, s | instances at the end | directory CPU (cores) |\n\
         |---|---|---|---|---|---|---|\n",
        docs::today(),
        buffer_note(),
        sizes.join(","),
        sidecars.join(","),
        heartbeats_env(args),
        args.arrivals,
    );
    for measured in all {
        if let Measured::Restarts {
            instances,
            sidecars,
            returns,
        } = measured
        {
            for back in returns {
                out.push_str(&format!(
                    "| {} | {} {}\n",
                    fmt_int(*instances),
                    fmt_int(*sidecars),
                    return_row(back)
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that is never read drops what its receive buffer cannot hold, and
    /// `socket_drops` finds those drops by the socket's port.
    #[test]
    fn socket_drops_counts_a_full_receive_buffer() {
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = receiver.local_addr().unwrap().port();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(socket_drops(port).unwrap(), 0);
        // Until the receive buffer, whatever its size, overflows.
        let datagram = [0u8; 1200];
        let mut sent = 0;
        while socket_drops(port).unwrap() == 0 {
            assert!(sent < 200_000, "no drop counted after {sent} datagrams");
            for _ in 0..1_000 {
                sender.send_to(&datagram, ("127.0.0.1", port)).unwrap();
            }
            sent += 1_000;
        }
        let before = DropCounters::read(port).unwrap();
        sender.send_to(&datagram, ("127.0.0.1", port)).unwrap();
        let dropped = before.until(DropCounters::read(port).unwrap());
        assert_eq!(dropped.directory, 1, "{dropped:?}");
    }

    /// A change counts at its first arrival only: sent again (its instance withdrawn and
    /// registered again) it does not count twice, nor does an upsert of an older state.
    #[test]
    fn a_change_counts_once_per_sidecar() {
        let change = |slot, number, state| Made {
            at: Instant::now(),
            state,
            slot,
            number,
        };
        let mut arrivals = Arrivals::default();
        let first = change(7, 1, InstanceState::Draining);
        assert_eq!(
            arrivals.read(&first, InstanceState::Draining),
            Arrival::First
        );
        assert_eq!(
            arrivals.read(&first, InstanceState::Draining),
            Arrival::Again
        );
        assert_eq!(arrivals.read(&first, InstanceState::Up), Arrival::Other);
        // The instance's next change, and another instance's, count.
        let next = change(7, 9, InstanceState::Up);
        assert_eq!(arrivals.read(&next, InstanceState::Up), Arrival::First);
        let other = change(8, 2, InstanceState::Up);
        assert_eq!(arrivals.read(&other, InstanceState::Up), Arrival::First);
        // Another sidecar counts its own arrivals.
        let mut elsewhere = Arrivals::default();
        assert_eq!(
            elsewhere.read(&first, InstanceState::Draining),
            Arrival::First
        );
        // A slot outside the churned instances is never counted (nor a panic).
        let outside = change(CHURNED, 3, InstanceState::Up);
        assert_eq!(arrivals.read(&outside, InstanceState::Up), Arrival::Other);
    }
}
