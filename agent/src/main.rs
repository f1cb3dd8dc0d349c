//! The `usher-agent` binary: parse flags, install logging, bind the admin port, run, and map
//! the outcome to an exit code (0 after a signal, the child's status if it exited, 1 on a
//! startup error, 2 on bad flags, 3 when the directory refused the join token).

use std::process::ExitCode;

use anyhow::anyhow;
use clap::{CommandFactory, FromArgMatches};
use tokio::net::TcpListener;
use tracing::error;
use usher_agent::config::{hostname, Args, Config};
use usher_shared::{signals, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::from_args(args(), &hostname()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("usher-agent: error: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init();
    match serve(config).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Library errors already carry their cause in their message.
            error!(error = %format!("{e:#}"), "usher-agent failed");
            eprintln!("usher-agent: error: {e:#}");
            let refused = e
                .downcast_ref::<usher_agent::AgentError>()
                .is_some_and(|e| matches!(e, usher_agent::AgentError::Enrol(e) if e.is_refusal()));
            ExitCode::from(if refused { 3 } else { 1 })
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<u8> {
    let admin = TcpListener::bind(config.admin)
        .await
        .map_err(|e| anyhow!("cannot bind the admin address {}: {e}", config.admin))?;
    let shutdown = signals::shutdown_token();
    let exit = usher_agent::run(config, admin, shutdown).await?;
    Ok(exit.code())
}

/// The flags (and environment), with the TLS flags' environment variables `USHER_AGENT_*`; a
/// flag clap refuses exits here with code 2 and clap's message.
fn args() -> Args {
    let command = usher_shared::enrolment::tls_env(Args::command(), "USHER_AGENT");
    Args::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit())
}
