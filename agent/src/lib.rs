//! `usher-agent`: runs beside one service instance. It health-checks the instance over
//! localhost, registers it with the directory and heartbeats at the rate the directory
//! dictates, sends health changes at once, and drains the instance on shutdown (Baker: the
//! service node's agent; SwarmKit: manager-set heartbeat rate). It can also start and
//! supervise the instance process itself (`-- COMMAND ARGS...`).
//!
//! Shutdown (SIGTERM/SIGINT): mark the instance `draining` and tell the directory at once,
//! wait `--drain-time` so sidecars stop sending (longer than the directory's 100 ms batch),
//! stop the child (SIGTERM, then SIGKILL after `--stop-timeout`), deregister, close the QUIC
//! connection, exit 0. If the child exits on its own, the instance is deregistered at once and
//! the agent exits with the child's status. Every wait on the directory is bounded, so an
//! unreachable directory never holds up shutdown.
//!
//! # Layout
//!
//! - [`config`]: flags (`USHER_AGENT_*`) and the validated [`Config`].
//! - [`health`]: `http:PATH`/`grpc[:SERVICE]`/`tcp`/`none` checks and the rise/fall state
//!   machine; [`grpc_health`]: gRPC's standard health call.
//! - [`session`]: connect, register, heartbeat, reconnect forever, deregister.
//! - [`child`]: start, watch and stop the instance process.
//! - [`admin`]: `GET /healthz` and `GET /v1/instance`.
//! - [`run`]: wires them together; `main.rs` only parses, binds and maps the exit code.
#![forbid(unsafe_code)]

pub mod admin;
pub mod child;
pub mod config;
pub mod grpc_health;
pub mod health;
pub mod session;

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, info_span, warn, Instrument};
use usher_shared::enrolment::EnrolError;
use usher_shared::identity::NodeIdentity;
use usher_shared::quic::Liveness;
use usher_shared::routes::{Instance, InstanceState};
use usher_shared::session::{node_endpoint, EndpointError};

pub use crate::child::ChildError;
use crate::child::Supervised;
use crate::config::AddressSpec;
pub use crate::config::{Config, ConfigError};
use crate::health::Thresholds;
use crate::session::{SessionContext, DEREGISTER_TIMEOUT};

/// How long `run` waits for the QUIC endpoint to finish closing, and for its tasks, at exit.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why the agent could not start.
#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error(transparent)]
    Enrol(#[from] EnrolError),
    #[error(transparent)]
    Child(#[from] ChildError),
}

/// How the agent ended, and so which exit code the process should use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Shut down on request (signal): exit 0.
    Shutdown,
    /// The supervised instance exited on its own; the agent exits with its status.
    ChildExited {
        /// The child's exit code, or 128 + the signal number that ended it.
        code: u8,
    },
}

impl Exit {
    /// The process exit code: 0 after a requested shutdown, else the child's.
    pub fn code(self) -> u8 {
        match self {
            Exit::Shutdown => 0,
            Exit::ChildExited { code } => code,
        }
    }
}

/// Runs the agent until `shutdown` fires (then drains and returns [`Exit::Shutdown`]) or the
/// supervised child exits (then deregisters and returns [`Exit::ChildExited`]).
///
/// `admin_listener` is the bound admin HTTP socket. Errors only at startup: no usable
/// certificate (none stored and no join token, or the directory refused the token: see
/// [`EnrolError::is_refusal`]), no UDP socket, no free port, or the child cannot be started.
pub async fn run(
    config: Config,
    admin_listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<Exit, AgentError> {
    let started_at_ms = usher_shared::unix_millis();
    prepare_state_dir(&config.state_dir);

    let tls = config.tls.for_node(
        NodeIdentity::Agent {
            service: config.service.clone(),
        },
        &config.state_dir,
    );
    let credentials = usher_shared::enrolment::obtain(&tls).await?;
    let endpoint = node_endpoint(&credentials, Liveness::Heartbeats)?;

    let address: SocketAddr = match config.address {
        AddressSpec::Fixed(address) => address,
        AddressSpec::PickLoopbackPort => child::pick_loopback_port()?,
    };
    // From here on the child runs: every path below stops it (and the handle kills it on drop).
    let mut child = match &config.command {
        Some(command) => Some(Supervised::spawn(command, address.port())?),
        None => None,
    };
    info!(
        service = %config.service,
        version = %config.version,
        id = %config.id,
        %address,
        health = %config.health,
        directory = %config.directory,
        "usher-agent starting"
    );

    let (state_tx, state_rx) = watch::channel(InstanceState::Starting);
    let connected = Arc::new(AtomicBool::new(false));
    let tracker = TaskTracker::new();
    let tasks = CancellationToken::new();
    tracker.spawn(
        usher_shared::enrolment::renew(tls, credentials, tasks.clone())
            .instrument(info_span!("renewal")),
    );

    let status = admin::InstanceStatus {
        service: config.service.clone(),
        version: config.version.clone(),
        id: config.id.clone(),
        address,
        state: state_rx.clone(),
        connected: connected.clone(),
        child_pid: child.as_ref().and_then(Supervised::pid),
    };
    tracker.spawn(
        usher_shared::admin::serve(
            admin_listener,
            admin::handler(status),
            tasks.clone(),
            tracker.clone(),
        )
        .instrument(info_span!("admin")),
    );

    tracker.spawn(
        health::monitor(
            config.health.clone(),
            address,
            config.health_interval,
            config.health_timeout,
            Thresholds {
                rise: config.rise,
                fall: config.fall,
            },
            state_tx.clone(),
            tasks.clone(),
        )
        .instrument(info_span!("health", check = %config.health, %address)),
    );

    let (stop_session, stop_rx) = oneshot::channel();
    let session_task = tracker.spawn(
        session::run(
            SessionContext {
                endpoint: endpoint.clone(),
                directory: config.directory.clone(),
                node: usher_shared::session::node_name(),
                instance: Instance {
                    service: config.service.clone(),
                    version: config.version.clone(),
                    id: config.id.clone(),
                    address,
                    capacity: config.concurrency,
                    weight: 1,
                    state: InstanceState::Starting,
                    started_at_ms,
                    labels: config.labels.clone(),
                },
                state: state_rx,
                connected,
            },
            stop_rx,
        )
        .instrument(info_span!("directory", directory = %config.directory, id = %config.id)),
    );

    let child_exit = tokio::select! {
        _ = shutdown.cancelled() => None,
        status = wait_child(&mut child) => Some(status),
    };

    let exit = match child_exit {
        Some(status) => {
            let code = match status {
                Ok(status) => {
                    warn!(%status, "the instance process exited; withdrawing the instance");
                    child::exit_code(status)
                }
                Err(e) => {
                    error!(error = %e, "lost track of the instance process; withdrawing the instance");
                    1
                }
            };
            state_tx.send_replace(InstanceState::Unknown);
            withdraw(stop_session, session_task, "instance exited").await;
            Exit::ChildExited { code }
        }
        None => {
            info!(drain_time = ?config.drain_time, "shutting down: the instance is draining");
            state_tx.send_replace(InstanceState::Draining);
            tokio::select! {
                _ = tokio::time::sleep(config.drain_time) => {}
                status = wait_child(&mut child) => {
                    if let Ok(status) = status {
                        info!(%status, "the instance process exited while draining");
                    }
                }
            }
            if let Some(child) = child.as_mut() {
                if let Err(e) = child.stop(config.stop_timeout).await {
                    error!(error = %e, "cannot stop the instance process");
                }
            }
            withdraw(stop_session, session_task, "agent shutting down").await;
            Exit::Shutdown
        }
    };

    tasks.cancel();
    endpoint.close(0u32.into(), b"agent shutting down");
    if tokio::time::timeout(CLOSE_TIMEOUT, endpoint.wait_idle())
        .await
        .is_err()
    {
        warn!("the QUIC endpoint did not close in time");
    }
    tracker.close();
    if tokio::time::timeout(CLOSE_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        warn!("some agent tasks did not finish in time");
    }
    drop(child);
    info!(exit_code = exit.code(), "usher-agent stopped");
    Ok(exit)
}

/// Waits for the child to exit; never resolves without one.
async fn wait_child(child: &mut Option<Supervised>) -> Result<ExitStatus, ChildError> {
    match child {
        Some(child) => child.wait().await,
        None => std::future::pending().await,
    }
}

/// Asks the session to deregister and waits a bounded time for it; returns whether the
/// directory got the `Deregister`.
async fn withdraw(
    stop: oneshot::Sender<&'static str>,
    mut session: JoinHandle<bool>,
    reason: &'static str,
) -> bool {
    let _ = stop.send(reason);
    let deregistered = match tokio::time::timeout(
        DEREGISTER_TIMEOUT + Duration::from_millis(500),
        &mut session,
    )
    .await
    {
        Ok(Ok(deregistered)) => deregistered,
        Ok(Err(e)) => {
            error!(error = %e, "the directory session task failed");
            false
        }
        Err(_) => {
            session.abort();
            false
        }
    };
    if deregistered {
        info!("deregistered from the directory");
    } else {
        warn!("could not deregister (directory unreachable); the instance leaves the table when its TTL lapses");
    }
    deregistered
}

/// Creates the state directory if missing (it holds the node certificate); failure is a
/// warning here, and an error naming the file when the certificate is stored.
fn prepare_state_dir(dir: &Path) {
    if let Err(e) = std::fs::create_dir_all(dir) {
        warn!(state_dir = %dir.display(), error = %e, "cannot create the state directory");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(Exit::Shutdown.code(), 0);
        assert_eq!(Exit::ChildExited { code: 3 }.code(), 3);
    }
}
