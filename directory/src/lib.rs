//! `usher-directory`: the one directory node of an usher mesh. It collects agent heartbeats,
//! owns the route table (epoch + revision), streams it to sidecars over QUIC (the deltas a
//! sidecar missed, or a full snapshot, then batched deltas), and scales the services it manages
//! from the load sidecars report (Baker's directory and discovery protocol; Waiter and WSO2
//! autoscaling; SwarmKit's heartbeat rate control, batching and grace period).
//!
//! # Layout
//!
//! - [`config`]: flags (`USHER_DIRECTORY_*`) over a TOML file, validated into [`Config`].
//! - [`pki`]: the cluster CA in the state directory, the server and node certificates.
//! - [`authz`]: who may do what (from the client certificate) and the refusal counters.
//! - [`tokens`]: join tokens in `tokens.json`; [`enrol`]: the join endpoint that trades a
//!   token (or the current certificate) and a CSR for a node certificate (SwarmKit's join).
//! - [`admin_token`]: the admin bearer token file.
//! - [`registry`]: the route table, registrations and their owners, TTLs, batches.
//! - [`presence`]: the TTL timer heap; [`batch`]: when a batch is due.
//!   [`feed`]: each published batch encoded once, the frames every sidecar shares.
//! - [`server`]: QUIC accept loops and the hello; `registration` (agents) and
//!   `subscription` (sidecars) are the two conversations.
//! - [`admin`]: `GET /healthz`, `GET /v1/routes`, `GET /v1/services`, `GET /v1/security`,
//!   pins and tokens (mutations need the admin bearer token); [`metrics`]: `GET /metrics`;
//!   [`dashboard`]: the page at `GET /` that shows the table, load and scaling.
//! - [`autoscale`]: the autoscaler's pure decision per service version; [`autoscaler`]
//!   runs it every cycle; [`scheduler`] starts and stops instances; [`services`] and [`load`]
//!   are the managed services and the sidecars' load reports.
//! - [`run`]: wires them together; `main.rs` only parses, binds and maps the exit code.
#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_token;
pub mod authz;
pub mod autoscale;
pub mod autoscaler;
pub mod batch;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod enrol;
pub mod feed;
pub mod huge_pages;
pub mod load;
pub mod metrics;
pub mod pki;
pub mod presence;
pub mod preservation;
mod registration;
pub mod registry;
pub mod scheduler;
pub mod server;
pub mod services;
mod subscription;
pub mod tokens;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, info_span, warn, Instrument};

pub use crate::config::{Config, ConfigError};
use crate::pki::PkiError;
use crate::registry::{Registry, Settings};
use crate::scheduler::AgentContext;

/// How long shutdown waits for connections to close and tasks to finish.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the directory could not start.
#[derive(Debug, Error)]
pub enum DirectoryError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("cannot use the certificates in {state_dir}: {source}")]
    Tls {
        state_dir: PathBuf,
        #[source]
        source: usher_shared::quic::TlsError,
    },
    #[error("cannot start the QUIC endpoint: {0}")]
    Endpoint(#[source] std::io::Error),
    #[error(transparent)]
    Tokens(#[from] tokens::TokenError),
    #[error(transparent)]
    AdminToken(#[from] admin_token::AdminTokenError),
}

/// Sockets the caller bound (tests bind port 0 and read the real ports back).
pub struct Listeners {
    pub quic: std::net::UdpSocket,
    /// The join endpoint (enrolment and renewal).
    pub join: std::net::UdpSocket,
    pub admin: TcpListener,
}

/// Runs the directory until `shutdown` fires, then closes every connection with a reason and
/// returns. Errors only at startup (certificates, QUIC endpoint).
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), DirectoryError> {
    let (_keep, reloads) = mpsc::channel(1);
    run_with_reloads(config, listeners, reloads, shutdown).await
}

/// As [`run`], and each `[[services]]` list received on `reloads` replaces the managed
/// services (what SIGHUP does).
pub async fn run_with_reloads(
    config: Config,
    listeners: Listeners,
    reloads: mpsc::Receiver<Vec<services::ServiceSpec>>,
    shutdown: CancellationToken,
) -> Result<(), DirectoryError> {
    let credentials = pki::load_or_create(&config.state_dir)?;
    if credentials.created_ca {
        info!(ca = %config.state_dir.join(pki::CA_CERT_FILE).display(), "created the cluster CA");
    }
    let tls_error = |source| DirectoryError::Tls {
        state_dir: config.state_dir.clone(),
        source,
    };
    let server_config = usher_shared::quic::server_config(
        credentials.chain_pem.as_bytes(),
        credentials.key_pem.as_bytes(),
        credentials.ca_pem.as_bytes(),
        config.connection_idle_timeout(),
    )
    .map_err(tls_error)?;
    let join_config = usher_shared::quic::join_server_config(
        credentials.chain_pem.as_bytes(),
        credentials.key_pem.as_bytes(),
        credentials.ca_pem.as_bytes(),
    )
    .map_err(tls_error)?;
    let quic_addr = listeners
        .quic
        .local_addr()
        .map_err(DirectoryError::Endpoint)?;
    let join_addr = listeners
        .join
        .local_addr()
        .map_err(DirectoryError::Endpoint)?;
    for (name, socket) in [("QUIC", &listeners.quic), ("join", &listeners.join)] {
        match usher_shared::quic::size_udp_buffers(socket) {
            Ok(granted) if granted < usher_shared::quic::UDP_BUFFER => warn!(
                socket = name,
                granted,
                wanted = usher_shared::quic::UDP_BUFFER,
                "the kernel grants a small UDP receive buffer, so bursts of heartbeats may be \
                 dropped; raise net.core.rmem_max and net.core.wmem_max (deploy/sysctl/90-usher.conf)"
            ),
            Ok(_) => {}
            Err(e) => warn!(socket = name, error = %e, "cannot size the UDP socket buffers"),
        }
    }
    huge_pages::advise();
    let endpoint = quinn::Endpoint::new(
        server::endpoint_config(&credentials.reset_secret),
        Some(server_config),
        listeners.quic,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(DirectoryError::Endpoint)?;
    let join_endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(join_config),
        listeners.join,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(DirectoryError::Endpoint)?;
    let authority = credentials.authority.clone();
    let tokens = Arc::new(tokens::TokenStore::open(
        &config.state_dir,
        &authority.fingerprint,
    )?);
    let (admin_token, created_token) = admin_token::load_or_create(&config.admin_token_file)?;
    if created_token {
        info!(file = %config.admin_token_file.display(), "created the admin token");
    }
    let security = Arc::new(authz::Security::default());

    // 53 bits, so the epoch survives JSON tools that read numbers as doubles.
    let epoch: u64 = rand::random::<u64>() >> 11;
    let registry = Arc::new(Registry::new(Settings {
        epoch,
        heartbeat_interval: config.heartbeat_interval,
        ttl: config.ttl(),
        silent_stream_timeout: config.silent_stream_timeout(),
        grace_period: config.grace_period,
        started: Instant::now(),
        preservation: config.preservation(),
    }));
    let tracker = TaskTracker::new();
    let tasks = CancellationToken::new();

    tracker.spawn(
        server::serve(
            endpoint.clone(),
            registry.clone(),
            security.clone(),
            tasks.clone(),
            tracker.clone(),
        )
        .instrument(info_span!("quic", listen = %quic_addr)),
    );
    tracker.spawn(
        enrol::serve(
            join_endpoint.clone(),
            Arc::new(enrol::JoinContext {
                authority: authority.clone(),
                tokens: tokens.clone(),
                security: security.clone(),
                validity: config.node_cert_validity,
            }),
            tasks.clone(),
            tracker.clone(),
        )
        .instrument(info_span!("join", listen = %join_addr)),
    );
    tracker.spawn(publisher(registry.clone(), tasks.clone()).instrument(info_span!("publisher")));
    tracker.spawn(expiry(registry.clone(), tasks.clone()).instrument(info_span!("ttl")));
    let scaling = CancellationToken::new();
    let agents = AgentContext {
        agent: AgentContext::find_agent(config.agent_binary.as_deref()),
        directory: dialable(quic_addr),
        ca: config.state_dir.join(pki::CA_CERT_FILE),
        state_dir: config.state_dir.join("instances"),
        identity: Some(scheduler::AgentIdentity {
            authority: authority.clone(),
            validity: config.node_cert_validity,
            join: dialable(join_addr),
        }),
    };
    let autoscaler = tokio::spawn(
        autoscaler::run(
            config.services.clone(),
            agents,
            registry.clone(),
            reloads,
            scaling.clone(),
        )
        .instrument(info_span!("autoscaler")),
    );
    let admin_addr = listeners.admin.local_addr().ok();
    tracker.spawn(
        usher_shared::admin::serve(
            listeners.admin,
            admin::handler(Arc::new(admin::AdminContext {
                registry: registry.clone(),
                security: security.clone(),
                tokens,
                admin_token,
                protect_reads: !config.admin.ip().is_loopback(),
            })),
            tasks.clone(),
            tracker.clone(),
        )
        .instrument(info_span!("admin")),
    );
    info!(
        epoch = %format!("{epoch:016x}"),
        listen = %quic_addr,
        join = %join_addr,
        ca_fingerprint = %authority.fingerprint,
        admin = ?admin_addr,
        heartbeat_interval = ?config.heartbeat_interval,
        ttl = ?config.ttl(),
        grace_period = ?config.grace_period,
        self_preservation_percent = config.self_preservation_percent,
        "usher-directory serving"
    );
    notify_systemd(sd_notify::NotifyState::Ready);

    shutdown.cancelled().await;
    info!("shutting down");
    notify_systemd(sd_notify::NotifyState::Stopping);
    // Instances the directory started drain and deregister while it still serves.
    scaling.cancel();
    // Bounded by the longest drain a (possibly reloaded) service may ask for.
    if tokio::time::timeout(
        services::MAX_DRAIN_TIME + scheduler::SHUTDOWN_GRACE + Duration::from_secs(1),
        autoscaler,
    )
    .await
    .is_err()
    {
        warn!("the instances the directory started did not all stop in time");
    }
    tasks.cancel();
    endpoint.close(server::CLOSE_OK.into(), b"directory shutting down");
    join_endpoint.close(server::CLOSE_OK.into(), b"directory shutting down");
    if tokio::time::timeout(SHUTDOWN_TIMEOUT, endpoint.wait_idle())
        .await
        .is_err()
    {
        warn!("some QUIC connections did not close in time");
    }
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        warn!("some tasks did not finish in time");
    }
    info!("usher-directory stopped");
    Ok(())
}

/// Publishes batches of changes when they are due (SwarmKit: 100 changes or 100 ms).
async fn publisher(registry: Arc<Registry>, shutdown: CancellationToken) {
    loop {
        let changed = registry.changed();
        let due = registry.publish_due(Instant::now());
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = changed => {}
            _ = sleep_until_opt(due) => {}
        }
    }
}

/// Withdraws instances whose TTL lapsed, checking a few times per heartbeat interval.
async fn expiry(registry: Arc<Registry>, shutdown: CancellationToken) {
    let period = (registry.settings().heartbeat_interval / 10)
        .clamp(Duration::from_millis(10), Duration::from_millis(100));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => { registry.expire(Instant::now()); }
        }
    }
}

/// The address agents on this host dial: the QUIC address, with loopback for "any".
fn dialable(listen: std::net::SocketAddr) -> std::net::SocketAddr {
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    addr
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Tells systemd our state (`Type=notify`); a no-op outside systemd.
fn notify_systemd(state: sd_notify::NotifyState) {
    if let Err(e) = sd_notify::notify(false, &[state]) {
        warn!(error = %e, "cannot notify systemd");
    }
}
