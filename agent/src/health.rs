//! Health checks of the instance over localhost (Baker: the service node's agent checks its
//! instance locally), and the rise/fall state machine that keeps one flaky check from
//! flapping the route table.
//!
//! [`check`] runs one probe; [`HealthTracker`] is the pure state machine; [`monitor`] drives
//! both at the configured interval and publishes the instance state on a `watch` channel.

use std::net::SocketAddr;
use std::pin::pin;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use usher_shared::routes::InstanceState;

use crate::config::HealthSpec;

/// Why one health check failed.
#[derive(Debug, Error)]
pub enum CheckError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the health request: {0}")]
    Request(#[from] http::Error),
    #[error("HTTP exchange with {addr} failed: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("GET {path} answered {status}")]
    Status {
        path: String,
        status: http::StatusCode,
    },
    #[error(transparent)]
    Grpc(#[from] crate::grpc_health::GrpcCheckError),
}

/// Runs one check of the instance at `addr`, bounded by `timeout` as a whole.
///
/// `http:PATH`: an HTTP/1.1 `GET PATH` with `Host: <addr>` passes on a 2xx status (the body is
/// not read). `grpc[:SERVICE]`: gRPC's `Health/Check` passes on `SERVING`
/// ([`crate::grpc_health`]). `tcp`: a TCP connect passes. `none`: always passes.
pub async fn check(
    spec: &HealthSpec,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(), CheckError> {
    let probe = async {
        match spec {
            HealthSpec::None => Ok(()),
            HealthSpec::Tcp => TcpStream::connect(addr)
                .await
                .map(drop)
                .map_err(|source| CheckError::Connect { addr, source }),
            HealthSpec::Http { path } => http_check(addr, path.as_str()).await,
            HealthSpec::Grpc { service } => crate::grpc_health::check(addr, service).await,
        }
    };
    tokio::time::timeout(timeout, probe)
        .await
        .map_err(|_| CheckError::Timeout(timeout))?
}

async fn http_check(addr: SocketAddr, path: &str) -> Result<(), CheckError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| CheckError::Connect { addr, source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| CheckError::Http { addr, source })?;
    let request = Request::get(path)
        .header(header::HOST, addr.to_string())
        .header(
            header::USER_AGENT,
            concat!("usher-agent/", env!("CARGO_PKG_VERSION")),
        )
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())?;
    // The connection future runs beside the request and is dropped (closing the socket) once
    // the response head arrived. With `Connection: close` it may finish first, right after
    // handing over the response, so the response is still awaited then.
    let mut response_fut = pin!(sender.send_request(request));
    let response = tokio::select! {
        response = &mut response_fut => response,
        closed = conn => match closed {
            Ok(()) => response_fut.await,
            Err(source) => return Err(CheckError::Http { addr, source }),
        },
    }
    .map_err(|source| CheckError::Http { addr, source })?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(CheckError::Status {
            path: path.to_string(),
            status,
        })
    }
}

/// Consecutive-result thresholds against flapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Consecutive passes that make a `starting` or `unknown` instance `up` (at least 1).
    pub rise: u32,
    /// Consecutive failures that make an `up` instance `unknown` (at least 1).
    pub fall: u32,
}

/// The rise/fall state machine: `starting` until `rise` consecutive passes, then `up`; `fall`
/// consecutive failures take it to `unknown`, and `rise` passes bring it back to `up`.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    thresholds: Thresholds,
    state: InstanceState,
    passes: u32,
    failures: u32,
}

impl HealthTracker {
    /// A tracker in state `starting`. Thresholds of 0 are treated as 1.
    pub fn new(thresholds: Thresholds) -> Self {
        Self {
            thresholds: Thresholds {
                rise: thresholds.rise.max(1),
                fall: thresholds.fall.max(1),
            },
            state: InstanceState::Starting,
            passes: 0,
            failures: 0,
        }
    }

    /// The current state: `starting`, `up` or `unknown`.
    pub fn state(&self) -> InstanceState {
        self.state
    }

    /// Records one check result; returns the new state if it changed.
    pub fn observe(&mut self, passed: bool) -> Option<InstanceState> {
        if passed {
            self.failures = 0;
            self.passes = self.passes.saturating_add(1);
        } else {
            self.passes = 0;
            self.failures = self.failures.saturating_add(1);
        }
        let next = match self.state {
            InstanceState::Up if self.failures >= self.thresholds.fall => InstanceState::Unknown,
            InstanceState::Up => InstanceState::Up,
            _ if self.passes >= self.thresholds.rise => InstanceState::Up,
            other => other,
        };
        if next == self.state {
            return None;
        }
        self.state = next;
        Some(next)
    }
}

/// The wait before a `starting` instance's second check; each later wait doubles, up to
/// [`STARTUP_PROBE_INTERVAL`].
pub const STARTUP_FIRST_WAIT: Duration = Duration::from_millis(2);

/// The longest wait between two checks of a `starting` instance (cold starts wait on its
/// first pass).
pub const STARTUP_PROBE_INTERVAL: Duration = Duration::from_millis(20);

/// How long a `starting` instance is checked at most [`STARTUP_PROBE_INTERVAL`] apart.
pub const STARTUP_PROBING: Duration = Duration::from_secs(10);

/// The wait before a `starting` instance's check that follows `checks` checks: 2, 4, 8 and
/// 16 ms, then [`STARTUP_PROBE_INTERVAL`] (20 ms), and never more than the configured
/// `interval`. An instance that answers a few milliseconds after it was spawned (a cold
/// start's whole baseline on loopback) is found up within about as long again, rather than
/// at the next 20 ms tick; one that takes seconds is checked every 20 ms as before.
pub fn startup_wait(checks: u32, interval: Duration) -> Duration {
    let doubled = STARTUP_FIRST_WAIT.saturating_mul(1u32 << checks.saturating_sub(1).min(8));
    doubled.min(STARTUP_PROBE_INTERVAL).min(interval)
}

/// Checks the instance at once, then every `interval` (while it is `starting`, for up to
/// [`STARTUP_PROBING`], at the shorter waits of [`startup_wait`]) until `shutdown` fires,
/// publishing state changes on `state`. A `draining` state is never overwritten: once the
/// agent drains, the monitor stops.
pub async fn monitor(
    spec: HealthSpec,
    addr: SocketAddr,
    interval: Duration,
    timeout: Duration,
    thresholds: Thresholds,
    state: watch::Sender<InstanceState>,
    shutdown: CancellationToken,
) {
    let mut tracker = HealthTracker::new(thresholds);
    let mut failure_reported = false;
    let started = tokio::time::Instant::now();
    let mut checks = 0u32;
    loop {
        // A starting instance is probed often, so a cold start is not held up by a whole
        // interval; after STARTUP_PROBING the normal interval applies.
        let wait = if checks == 0 {
            Duration::ZERO
        } else if tracker.state() == InstanceState::Starting && started.elapsed() < STARTUP_PROBING
        {
            startup_wait(checks, interval)
        } else {
            interval
        };
        checks = checks.saturating_add(1);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = check(&spec, addr, timeout) => result,
        };
        let Some(next) = tracker.observe(result.is_ok()) else {
            // Say once that checks started failing (or fail from the start); the rest is debug.
            match &result {
                Ok(()) => failure_reported = false,
                Err(e) if !failure_reported => {
                    failure_reported = true;
                    info!(state = tracker.state().as_str(), check = %spec, error = %e, "health check failed");
                }
                Err(e) => debug!(check = %spec, error = %e, "health check failed"),
            }
            continue;
        };
        failure_reported = result.is_err();
        let mut draining = false;
        state.send_if_modified(|current| {
            if *current == InstanceState::Draining {
                draining = true;
                return false;
            }
            let changed = *current != next;
            *current = next;
            changed
        });
        if draining {
            return;
        }
        match &result {
            Ok(()) => info!(state = next.as_str(), check = %spec, "instance is healthy"),
            Err(e) => warn!(
                state = next.as_str(),
                check = %spec,
                error = %e,
                "instance is failing its health check"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::{Response, StatusCode};
    use http_body_util::Full;
    use hyper::service::service_fn;
    use tokio::net::TcpListener;

    use super::*;

    use InstanceState::{Starting, Unknown, Up};

    fn run(t: &mut HealthTracker, results: &[bool]) -> Vec<InstanceState> {
        results
            .iter()
            .map(|&r| {
                t.observe(r);
                t.state()
            })
            .collect()
    }

    #[test]
    fn rise_and_fall() {
        let mut t = HealthTracker::new(Thresholds { rise: 2, fall: 2 });
        assert_eq!(t.state(), Starting);
        // A failure in between resets the count of passes.
        assert_eq!(
            run(&mut t, &[true, false, true, true]),
            vec![Starting, Starting, Starting, Up]
        );
        // One failure is not enough to leave up; a pass resets the failures.
        assert_eq!(
            run(&mut t, &[false, true, false, false]),
            vec![Up, Up, Up, Unknown]
        );
        assert_eq!(
            run(&mut t, &[true, false, true, true]),
            vec![Unknown, Unknown, Unknown, Up]
        );
    }

    #[test]
    fn observe_reports_changes_only() {
        let mut t = HealthTracker::new(Thresholds { rise: 1, fall: 1 });
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(true), Some(Up));
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(false), Some(Unknown));
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(true), Some(Up));
    }

    #[test]
    fn zero_thresholds_act_as_one() {
        let mut t = HealthTracker::new(Thresholds { rise: 0, fall: 0 });
        assert_eq!(t.observe(true), Some(Up));
        assert_eq!(t.observe(false), Some(Unknown));
    }

    /// A tiny HTTP server: `/ok` answers 200, anything else 503.
    async fn server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let service = service_fn(|req: Request<hyper::body::Incoming>| async move {
                        assert!(req.headers().contains_key(header::HOST));
                        let status = if req.uri().path() == "/ok" {
                            StatusCode::OK
                        } else {
                            StatusCode::SERVICE_UNAVAILABLE
                        };
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from_static(b"hi\n")))
                                .unwrap(),
                        )
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }

    /// An address nothing listens on.
    async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        addr
    }

    const T: Duration = Duration::from_secs(2);

    #[tokio::test]
    async fn http_check_passes_on_2xx_only() {
        let addr = server().await;
        let ok = HealthSpec::parse("http:/ok").unwrap();
        let bad = HealthSpec::parse("http:/down").unwrap();
        check(&ok, addr, T).await.unwrap();
        let e = check(&bad, addr, T).await.unwrap_err();
        assert!(
            matches!(e, CheckError::Status { status, .. } if status == 503),
            "{e}"
        );
        let e = check(&ok, closed_port().await, T).await.unwrap_err();
        assert!(matches!(e, CheckError::Connect { .. }), "{e}");
    }

    #[tokio::test]
    async fn http_check_times_out_on_a_silent_server() {
        // Accepts connections but never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spec = HealthSpec::parse("http:/ok").unwrap();
        let started = std::time::Instant::now();
        let e = check(&spec, addr, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, CheckError::Timeout(_)), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(listener);
    }

    #[tokio::test]
    async fn tcp_and_none_checks() {
        let addr = server().await;
        check(&HealthSpec::Tcp, addr, T).await.unwrap();
        let closed = closed_port().await;
        assert!(check(&HealthSpec::Tcp, closed, T).await.is_err());
        check(&HealthSpec::None, closed, T).await.unwrap();
    }

    #[test]
    fn a_starting_instance_is_checked_sooner_at_first() {
        let ms = Duration::from_millis;
        let waits: Vec<_> = (1..=7).map(|n| startup_wait(n, ms(1000))).collect();
        assert_eq!(waits, [2, 4, 8, 16, 20, 20, 20].map(ms));
        assert_eq!(startup_wait(u32::MAX, ms(1000)), STARTUP_PROBE_INTERVAL);
        // Never longer than the configured interval.
        assert_eq!(startup_wait(3, ms(5)), ms(5));
        assert_eq!(startup_wait(1, ms(1)), ms(1));
    }

    #[tokio::test]
    async fn monitor_publishes_up_and_respects_draining() {
        let addr = server().await;
        let (tx, mut rx) = watch::channel(Starting);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(monitor(
            HealthSpec::parse("http:/ok").unwrap(),
            addr,
            Duration::from_millis(20),
            T,
            Thresholds { rise: 2, fall: 1 },
            tx.clone(),
            shutdown.clone(),
        ));
        tokio::time::timeout(T, rx.wait_for(|s| *s == Up))
            .await
            .unwrap()
            .unwrap();
        tx.send_replace(InstanceState::Draining);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(*rx.borrow(), InstanceState::Draining);
        shutdown.cancel();
        tokio::time::timeout(T, task).await.unwrap().unwrap();
    }
}
