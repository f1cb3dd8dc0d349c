//! The `usher-directory` binary: parse flags and the config file, install logging, bind the
//! QUIC and admin sockets, run until SIGTERM/SIGINT, and map the outcome to an exit code
//! (0 after a signal, 1 on a startup error, 2 on bad configuration).

use std::process::ExitCode;

use anyhow::{anyhow, Context};
use clap::Parser;
use tokio::net::TcpListener;
use tracing::error;
use usher_directory::config::{Args, Config};
use usher_directory::Listeners;
use usher_shared::{signals, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::load(Args::parse()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("usher-directory: error: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init();
    match serve(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %format!("{e:#}"), "usher-directory failed");
            eprintln!("usher-directory: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let quic = std::net::UdpSocket::bind(config.listen)
        .with_context(|| format!("cannot bind the QUIC address {} (--listen)", config.listen))?;
    let admin = TcpListener::bind(config.admin).await.map_err(|e| {
        anyhow!(
            "cannot bind the admin address {} (--admin): {e}",
            config.admin
        )
    })?;
    let shutdown = signals::shutdown_token();
    usher_directory::run(config, Listeners { quic, admin }, shutdown).await?;
    Ok(())
}
