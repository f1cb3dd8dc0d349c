//! `usher-sidecar`: runs beside each client process. It keeps a replica of the directory's
//! route table (persisted, so a directory outage never stops traffic) and proxies the client's
//! plain HTTP to a reserved, healthy instance (Baker: clients replicate the routes; Waiter:
//! determine the service, reserve an instance, send, release).
//!
//! Shutdown (SIGTERM/SIGINT): stop accepting, let in-flight requests finish (up to
//! [`DRAIN_TIMEOUT`]), close the directory connection with a reason, persist, exit 0.
//!
//! # Layout
//!
//! - [`config`]: flags (`USHER_SIDECAR_*`) and the validated [`Config`].
//! - [`replica`]: the table snapshot, where it came from, `routes.json` persistence.
//! - [`subscription`]: follow the directory forever (snapshot, deltas, reconnect), reporting
//!   load when [`load_report`] says.
//! - [`route`]: which service version a request is for (pure).
//! - [`reserver`]: per service version reservation, queueing and ejection (Waiter), over
//!   [`slots`]: one version's instances, laid out so picking and deltas are O(1).
//! - [`http1`]: HTTP/1.1 heads (parsed by httparse, rewritten per hop) and bodies;
//!   [`http2`]: clients that speak HTTP/2 without TLS (gRPC), served by hyper, each stream
//!   reserved and forwarded over h2c.
//! - [`pool`] and [`proxy`]: keep-alive connections to instances and the HTTP proxy;
//!   [`tunnel`]: the bytes of a switched protocol (WebSocket) after a `101`.
//! - [`admin`]: `GET /healthz`, `GET /v1/routes`, `GET /metrics`; [`metrics`]: what the proxy
//!   counts per service version and for itself.
//! - [`run`]: wires them together; `main.rs` only parses, binds and maps the exit code.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod http1;
pub mod http2;
pub mod load_report;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod replica;
pub mod reserver;
pub mod route;
pub mod slots;
pub mod subscription;
pub mod tunnel;

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, info_span, warn, Instrument};
use usher_shared::enrolment::EnrolError;
use usher_shared::identity::NodeIdentity;
use usher_shared::quic::Liveness;
use usher_shared::session::{node_endpoint, EndpointError};

pub use crate::config::{Config, ConfigError};
use crate::proxy::{ClientLimits, Limits, Proxy};
use crate::replica::Replica;

/// How long in-flight requests get to finish at shutdown.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the sidecar could not start.
#[derive(Debug, Error)]
pub enum SidecarError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error(transparent)]
    Enrol(#[from] EnrolError),
}

/// Sockets the caller bound (tests bind port 0 and read the real ports back).
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

/// Runs the sidecar until `shutdown` fires, then drains and returns. Errors only at startup:
/// no usable certificate (none stored and no join token, or the directory refused the token:
/// see [`EnrolError::is_refusal`]), no UDP socket.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), SidecarError> {
    let tls = config
        .tls
        .for_node(NodeIdentity::Sidecar, &config.state_dir);
    let credentials = usher_shared::enrolment::obtain(&tls).await?;
    let endpoint = node_endpoint(&credentials, Liveness::KeepAlive)?;
    let replica = Arc::new(Replica::new(Arc::default()));
    replica.load_from_disk(&config.state_dir);
    let proxy = Arc::new(Proxy::new(
        replica.clone(),
        Limits {
            queue_timeout: config.queue_timeout,
            max_queued: config.max_queued,
            instance_timeout: config.instance_timeout,
            connect_timeout: config.connect_timeout,
            tunnel_idle_timeout: config.tunnel_idle_timeout,
        },
    ));
    let renewal = CancellationToken::new();
    let renewing = tokio::spawn(
        usher_shared::enrolment::renew(tls, credentials, renewal.clone())
            .instrument(info_span!("renewal")),
    );
    serve(config, listeners, shutdown, endpoint, replica, proxy).await;
    renewal.cancel();
    let _ = renewing.await;
    Ok(())
}

/// Runs every task of a started sidecar until `shutdown`.
async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
    endpoint: quinn::Endpoint,
    replica: Arc<Replica>,
    proxy: Arc<Proxy>,
) {
    let tracker = TaskTracker::new();
    let background = CancellationToken::new();
    let proxy_addr = listeners.proxy.local_addr().ok();
    let admin_addr = listeners.admin.local_addr().ok();
    let requests = TaskTracker::new();
    tracker.spawn(
        proxy::serve(
            listeners.proxy,
            proxy.clone(),
            ClientLimits {
                header_read_timeout: config.header_read_timeout,
                max_header_size: config.max_header_size,
                max_connections: config.max_connections,
            },
            shutdown.clone(),
            requests.clone(),
        )
        .instrument(info_span!("proxy")),
    );
    tracker.spawn(
        usher_shared::admin::serve(
            listeners.admin,
            admin::handler(replica.clone(), proxy.clone()),
            background.clone(),
            tracker.clone(),
        )
        .instrument(info_span!("admin")),
    );
    tracker.spawn(
        subscription::run(
            endpoint.clone(),
            config.directory.clone(),
            replica.clone(),
            background.clone(),
        )
        .instrument(info_span!("directory", directory = %config.directory)),
    );
    tracker.spawn(
        replica::persist(
            replica.clone(),
            config.state_dir.clone(),
            background.clone(),
        )
        .instrument(info_span!("persist")),
    );
    info!(proxy = ?proxy_addr, admin = ?admin_addr, directory = %config.directory,
          source = replica.source().as_str(), "usher-sidecar serving");

    shutdown.cancelled().await;
    info!("shutting down: finishing in-flight requests");
    requests.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, requests.wait())
        .await
        .is_err()
    {
        warn!(after = ?DRAIN_TIMEOUT, "some requests did not finish in time");
    }
    background.cancel();
    endpoint.close(0u32.into(), b"sidecar shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(3), tracker.wait())
        .await
        .is_err()
    {
        warn!("some tasks did not finish in time");
    }
    info!("usher-sidecar stopped");
}
