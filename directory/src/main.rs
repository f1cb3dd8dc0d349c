//! The `usher-directory` binary: parse flags and the config file, build the runtime
//! (`--threads`, one thread by default), install logging, bind the QUIC and admin sockets, run
//! until SIGTERM/SIGINT (SIGHUP reloads `[[services]]` from the config file), and map the
//! outcome to an exit code (0 after a signal, 1 on a startup error, 2 on bad configuration).
//! `usher-directory scale` and `usher-directory token` talk to a running directory instead,
//! with the admin token from `--admin-token-file`.

use std::process::ExitCode;

use anyhow::{anyhow, Context};
use clap::Parser;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tracing::{error, info};
use usher_directory::cli;
use usher_directory::config::{Args, Command, Config, TokenCommand};
use usher_directory::services::ServiceSpec;
use usher_directory::Listeners;
use usher_shared::{signals, telemetry};

fn main() -> ExitCode {
    let mut args = Args::parse();
    let command = args.command.take();
    let config = match Config::load(args.clone()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("usher-directory: error: {e}");
            return ExitCode::from(2);
        }
    };
    // Commands only send one admin request: one thread is plenty.
    let threads = if command.is_some() { 1 } else { config.threads };
    match usher_shared::runtime::build(threads) {
        Ok(runtime) => runtime.block_on(run(args, command, config)),
        Err(e) => {
            eprintln!("usher-directory: error: cannot start the runtime: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args, command: Option<Command>, config: Config) -> ExitCode {
    match command {
        Some(Command::Scale { target, instances }) => {
            let request = cli::scale_request(&target, &instances);
            return admin_command("scale", &config, request, |body| body.to_string()).await;
        }
        Some(Command::Token(token)) => return token_command(&config, token).await,
        None => {}
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

/// `usher-directory token ...`: `create` prints the token text alone (for scripts), `list`
/// a table, `revoke` the revoked entry's id. Exit codes as [`admin_command`].
async fn token_command(config: &Config, command: TokenCommand) -> ExitCode {
    match command {
        TokenCommand::Create { role, service, ttl } => {
            let request = cli::token_create_request(&role, service.as_deref(), ttl.as_deref());
            admin_command("token create", config, request, |body| {
                serde_json::from_str::<serde_json::Value>(body)
                    .ok()
                    .and_then(|doc| doc["token"].as_str().map(|t| format!("{t}\n")))
                    .unwrap_or_else(|| body.to_string())
            })
            .await
        }
        TokenCommand::List => {
            let request = Ok((http::Method::GET, "/v1/tokens".to_string()));
            admin_command("token list", config, request, |body| {
                cli::token_table(body, usher_shared::unix_millis())
                    .unwrap_or_else(|| body.to_string())
            })
            .await
        }
        TokenCommand::Revoke { id } => {
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                eprintln!("usher-directory token revoke: error: {id:?} is not a token id");
                return ExitCode::from(2);
            }
            let request = Ok((http::Method::DELETE, format!("/v1/tokens/{id}")));
            admin_command("token revoke", config, request, |_| {
                format!("revoked {id}\n")
            })
            .await
        }
    }
}

/// Sends one admin request with the admin token and prints `show(body)` on success. Exit 0 on
/// success, 1 if the directory refused or could not be reached (or the token file cannot be
/// read), 2 on a bad argument.
async fn admin_command(
    name: &str,
    config: &Config,
    request: Result<(http::Method, String), String>,
    show: impl Fn(&str) -> String,
) -> ExitCode {
    let (method, path) = match request {
        Ok(request) => request,
        Err(e) => {
            eprintln!("usher-directory {name}: error: {e}");
            return ExitCode::from(2);
        }
    };
    let token = match usher_directory::admin_token::read(&config.admin_token_file) {
        Ok(token) => token,
        Err(e) => {
            eprintln!("usher-directory {name}: error: {e} (pass --admin-token-file)");
            return ExitCode::from(1);
        }
    };
    match cli::admin_request(config.admin, method, &path, Some(&token)).await {
        Ok((status, body)) if status.is_success() => {
            print!("{}", show(&body));
            ExitCode::SUCCESS
        }
        Ok((_, body)) => {
            eprint!("usher-directory {name}: {body}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("usher-directory {name}: error: {e}");
            ExitCode::from(1)
        }
    }
}

async fn serve(args: Args, config: Config) -> anyhow::Result<()> {
    let quic = std::net::UdpSocket::bind(config.listen)
        .with_context(|| format!("cannot bind the QUIC address {} (--listen)", config.listen))?;
    let join = std::net::UdpSocket::bind(config.join_listen).with_context(|| {
        format!(
            "cannot bind the join address {} (--join-listen)",
            config.join_listen
        )
    })?;
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
    usher_directory::run_with_reloads(config, Listeners { quic, join, admin }, reloads, shutdown)
        .await?;
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
