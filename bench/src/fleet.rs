//! A fleet of fake instances for benchmarks: registers `COUNT` instances of one service with a
//! directory, each over its own QUIC connection and heartbeating at the dictated interval,
//! exactly as that many `usher-agent`s would (it runs the agent's own session code), but in one
//! process and without health checks: every instance is `up` and points at `--address`.
//!
//! ```text
//! usher-bench-fleet --directory ADDR --service NAME --address IP:PORT --count N
//!                   --state-dir DIR [--join-token TOKEN | --ca FILE --cert FILE --key FILE]
//! ```
//!
//! Every instance presents the same agent certificate for `--service`, obtained as an agent
//! does (`usher_shared::enrolment::obtain`): a join token from
//! `usher-directory token create --role agent --service NAME`, or an operator's certificate.
//!
//! Runs until SIGTERM/SIGINT, then deregisters every instance. `bench/proxy` uses it to measure
//! the sidecar's memory with 1,000 instances in its route table.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::sync::{oneshot, watch};
use usher_agent::session::{self, SessionContext};
use usher_shared::enrolment::TlsFlags;
use usher_shared::identity::NodeIdentity;
use usher_shared::quic::Liveness;
use usher_shared::routes::{Instance, InstanceState};
use usher_shared::session::{node_endpoint, node_name};

/// Most fake instances one process registers.
const MAX_COUNT: usize = 100_000;

#[derive(Debug, Parser)]
#[command(
    name = "usher-bench-fleet",
    about = "Registers N fake, always-up instances of a service (one QUIC session each)"
)]
struct Args {
    /// The directory's QUIC address, `host:port`.
    #[arg(long, value_name = "ADDR")]
    directory: String,
    /// An agent certificate for `--service`: `--join-token`, or `--ca/--cert/--key`.
    #[command(flatten)]
    tls: TlsFlags,
    /// Where the enrolled certificate is kept.
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// Service name of every instance.
    #[arg(long, value_name = "NAME")]
    service: String,
    /// Service version of every instance.
    #[arg(long, value_name = "V", default_value = "v1")]
    version: String,
    /// Where every instance claims to serve.
    #[arg(long, value_name = "IP:PORT")]
    address: SocketAddr,
    /// How many instances.
    #[arg(long, value_name = "N")]
    count: usize,
    /// Concurrency slots of each instance.
    #[arg(long, value_name = "N", default_value_t = 8)]
    concurrency: u32,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("usher-bench-fleet: error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("usher-bench-fleet: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> Result<()> {
    if args.count == 0 || args.count > MAX_COUNT {
        bail!("--count {}: must be between 1 and {MAX_COUNT}", args.count);
    }
    usher_shared::telemetry::init();
    let tls = args
        .tls
        .clone()
        .validate(&args.directory)
        .map_err(|e| anyhow::anyhow!("--{}: {}", e.flag, e.reason))?
        .for_node(
            NodeIdentity::Agent {
                service: args.service.clone(),
            },
            &args.state_dir,
        );
    let credentials = usher_shared::enrolment::obtain(&tls)
        .await
        .context("no agent certificate")?;
    let endpoint = node_endpoint(&credentials, Liveness::Heartbeats)
        .context("cannot open the QUIC endpoint")?;
    let shutdown = usher_shared::signals::shutdown_token();
    let node = node_name();
    let started_at_ms = usher_shared::unix_millis();
    let (_state_tx, state_rx) = watch::channel(InstanceState::Up);
    let mut sessions = Vec::with_capacity(args.count);
    for n in 0..args.count {
        let (stop, stop_rx) = oneshot::channel();
        let ctx = SessionContext {
            endpoint: endpoint.clone(),
            directory: args.directory.clone(),
            node: node.clone(),
            instance: Instance {
                service: args.service.clone(),
                version: args.version.clone(),
                id: format!("fleet-{n:05}"),
                address: args.address,
                capacity: args.concurrency,
                weight: 1,
                state: InstanceState::Up,
                started_at_ms,
                labels: BTreeMap::new(),
            },
            state: state_rx.clone(),
            connected: Arc::new(AtomicBool::new(false)),
        };
        sessions.push((stop, tokio::spawn(session::run(ctx, stop_rx))));
        // Spread the handshakes a little so the directory sees a fleet, not a stampede.
        if n % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    eprintln!(
        "usher-bench-fleet: {} instances of {} registering",
        args.count, args.service
    );
    shutdown.cancelled().await;
    let tasks: Vec<_> = sessions
        .into_iter()
        .map(|(stop, task)| {
            let _ = stop.send("benchmark over");
            task
        })
        .collect();
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    endpoint.close(0u32.into(), b"benchmark over");
    Ok(())
}
