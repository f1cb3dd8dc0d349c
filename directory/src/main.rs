//! The `usher-directory` binary: parse flags and the config file, install logging, bind the
//! QUIC and admin sockets, run until SIGTERM/SIGINT (SIGHUP reloads `[[services]]` from the
//! config file), and map the outcome to an exit code (0 after a signal, 1 on a startup error,
//! 2 on bad configuration). `usher-directory scale` talks to a running directory instead.

use std::process::ExitCode;

use anyhow::{anyhow, Context};
use clap::Parser;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tracing::{error, info};
use usher_directory::cli;
use usher_directory::config::{Args, Command, Config};
use usher_directory::services::ServiceSpec;
use usher_directory::Listeners;
use usher_shared::{signals, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = Args::parse();
    let command = args.command.take();
    let config = match Config::load(args.clone()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("usher-directory: error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Scale { target, instances }) = command {
        return scale(config.admin, &target, &instances).await;
    }
    telemetry::init();
    match serve(args, config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %format!("{e:#}"), "usher-directory failed");
            eprintln!("usher-directory: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `usher-directory scale TARGET N|release`: prints the directory's answer; exit 0 on success,
/// 1 if the directory refused or could not be reached, 2 on a bad argument.
async fn scale(admin: std::net::SocketAddr, target: &str, instances: &str) -> ExitCode {
    let (method, path) = match cli::scale_request(target, instances) {
        Ok(request) => request,
        Err(e) => {
            eprintln!("usher-directory scale: error: {e}");
            return ExitCode::from(2);
        }
    };
    match cli::admin_request(admin, method, &path).await {
        Ok((status, body)) if status.is_success() => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Ok((_, body)) => {
            eprint!("usher-directory scale: {body}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("usher-directory scale: error: {e}");
            ExitCode::from(1)
        }
    }
}

async fn serve(args: Args, config: Config) -> anyhow::Result<()> {
    let quic = std::net::UdpSocket::bind(config.listen)
        .with_context(|| format!("cannot bind the QUIC address {} (--listen)", config.listen))?;
    let admin = TcpListener::bind(config.admin).await.map_err(|e| {
        anyhow!(
            "cannot bind the admin address {} (--admin): {e}",
            config.admin
        )
    })?;
    let shutdown = signals::shutdown_token();
    let (reload, reloads) = mpsc::channel(4);
    let hangups = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    tokio::spawn(reload_on_hangup(args, hangups, reload));
    usher_directory::run_with_reloads(config, Listeners { quic, admin }, reloads, shutdown).await?;
    Ok(())
}

/// On each SIGHUP, reads the configuration again and hands its `[[services]]` over; a bad file
/// is logged and changes nothing. Other settings need a restart.
async fn reload_on_hangup(
    args: Args,
    mut hangups: tokio::signal::unix::Signal,
    reload: mpsc::Sender<Vec<ServiceSpec>>,
) {
    while hangups.recv().await.is_some() {
        match Config::load(args.clone()) {
            Ok(config) => {
                info!(
                    services = config.services.len(),
                    "SIGHUP: reloading [[services]]"
                );
                if reload.send(config.services).await.is_err() {
                    return;
                }
            }
            Err(e) => error!(error = %e, "SIGHUP: the configuration is refused; nothing changed"),
        }
    }
}
