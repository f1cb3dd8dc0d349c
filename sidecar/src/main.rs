//! The `usher-sidecar` binary: parse flags, install logging, bind the proxy and admin ports,
//! run until SIGTERM/SIGINT, and map the outcome to an exit code (0 after a signal, 1 on a
//! startup error, 2 on bad flags, 3 when the directory refused the join token). `--threads`
//! sizes the tokio runtime built here: `1` is a current-thread runtime (the proxy, the
//! directory link and the admin port share one thread), more is a multi-thread runtime with
//! that many workers.

use std::process::ExitCode;

use anyhow::anyhow;
use clap::{CommandFactory, FromArgMatches};
use tokio::net::TcpListener;
use tracing::error;
use usher_shared::{signals, telemetry};
use usher_sidecar::config::{Args, Config};
use usher_sidecar::Listeners;

fn main() -> ExitCode {
    let config = match Config::from_args(args()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("usher-sidecar: error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match usher_shared::runtime::build(config.threads) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("usher-sidecar: error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    telemetry::init();
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %format!("{e:#}"), "usher-sidecar failed");
            eprintln!("usher-sidecar: error: {e:#}");
            let refused = e.downcast_ref::<usher_sidecar::SidecarError>().is_some_and(
                |e| matches!(e, usher_sidecar::SidecarError::Enrol(e) if e.is_refusal()),
            );
            ExitCode::from(if refused { 3 } else { 1 })
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let proxy = TcpListener::bind(config.listen).await.map_err(|e| {
        anyhow!(
            "cannot bind the proxy address {} (--listen): {e}",
            config.listen
        )
    })?;
    let admin = TcpListener::bind(config.admin).await.map_err(|e| {
        anyhow!(
            "cannot bind the admin address {} (--admin): {e}",
            config.admin
        )
    })?;
    let shutdown = signals::shutdown_token();
    usher_sidecar::run(config, Listeners { proxy, admin }, shutdown).await?;
    Ok(())
}

/// The flags (and environment), with the TLS flags' environment variables `USHER_SIDECAR_*`; a
/// flag clap refuses exits here with code 2 and clap's message.
fn args() -> Args {
    let command = usher_shared::enrolment::tls_env(Args::command(), "USHER_SIDECAR");
    Args::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit())
}
