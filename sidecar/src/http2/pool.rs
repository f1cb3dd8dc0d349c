//! h2c connections to instances, shared by every stream to the same instance.
//!
//! - A stream goes on the first open connection to its instance that has room for it: fewer
//!   streams open on it than the instance's `SETTINGS_MAX_CONCURRENT_STREAMS` (RFC 9113
//!   §5.1.2). When every connection is full, another is opened, as Envoy's HTTP/2 pool does,
//!   so an instance that allows, say, 100 streams per connection but was given 256 slots gets
//!   all 256 at once rather than 156 of them waiting in the sidecar, and a long-lived gRPC
//!   stream never holds a short call behind it. The reservation already bounds the streams to
//!   an instance, so it bounds the connections too.
//! - One connection attempt per instance at a time: the streams that find no room while it is
//!   under way wait for it and share its outcome, so a burst to an instance without a
//!   connection opens one, not one per stream, and an unreachable instance costs one connect
//!   timeout, not one per waiting stream. A new connection that can take no stream at all
//!   (the instance allows none, or closed it at once) makes the instance unreachable rather
//!   than making way for another connection.
//! - A connection no new stream used for [`IDLE_TIMEOUT`] is let go at the next sweep (it
//!   closes once its open streams end), so instances that left the table, and connections a
//!   burst needed, keep nothing open.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use h2::client::SendRequest;
use smallvec::SmallVec;
use tracing::debug;
use usher_shared::FastHash;

use crate::pool::IDLE_TIMEOUT;

/// Flow-control window of a connection to an instance, bytes (hyper's default for clients).
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
/// Flow-control window of a stream to an instance, bytes (hyper's default for clients).
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// Largest response header list taken from an instance, bytes (hyper's default).
const MAX_RESPONSE_HEADER_LIST: u32 = 16 * 1024;
/// Bytes of a stream's request body buffered for an instance beyond its window (hyper's
/// default for clients).
const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// Streams assumed allowed on a new connection until the instance's SETTINGS say how many
/// (RFC 9113 §6.5.2 recommends no fewer than 100; h2 would otherwise assume no limit, and a
/// burst on a new connection would queue in it beyond what the instance then allows).
const STREAMS_BEFORE_SETTINGS: usize = 100;

/// h2c connections by instance address (see the module).
#[derive(Debug, Default)]
pub struct Pool {
    instances: Arc<Mutex<HashMap<SocketAddr, Instance, FastHash>>>,
}

/// One instance's open connections, oldest first, and the attempt to open another, if one is
/// under way.
#[derive(Default)]
struct Instance {
    open: SmallVec<[Pooled; 1]>,
    connecting: Option<Connecting>,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("open", &self.open.len())
            .field("connecting", &self.connecting.is_some())
            .finish()
    }
}

/// A connection attempt, awaited by every stream that needs it.
type Connecting = Shared<BoxFuture<'static, Result<Connection, NoConnection>>>;

/// Why no connection to an instance could be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoConnection {
    /// The TCP connect failed or timed out, or the instance answered nothing to the first
    /// PING within the connect timeout: the instance is unreachable, and nothing was sent.
    Unreachable(String),
    /// The connection ended before the instance answered the first PING: it does not speak
    /// HTTP/2 (an HTTP/1 server answers the preface with an error and closes).
    NotHttp2(String),
}

/// An open connection and when a stream last started on it.
#[derive(Debug)]
struct Pooled {
    connection: Connection,
    used: Instant,
}

/// A connection's sender and what its streams share.
#[derive(Debug, Clone)]
struct Connection {
    sender: SendRequest<Bytes>,
    state: Arc<ConnectionState>,
}

#[derive(Debug, Default)]
struct ConnectionState {
    /// Set when the connection's task ends (the instance closed it, or it failed), or when a
    /// stream found it refusing new streams ([`Pool::forget`]).
    closed: AtomicBool,
    /// Streams started on it and not yet ended ([`OpenStream`]s alive).
    streams: AtomicUsize,
}

impl Connection {
    fn is_closed(&self) -> bool {
        self.state.closed.load(Ordering::Relaxed)
    }

    /// Why this connection can take no stream whatever the others on it do, if so: it closed
    /// (the instance sent `GOAWAY` as soon as it answered the PING), or the instance's
    /// SETTINGS allow no streams (`SETTINGS_MAX_CONCURRENT_STREAMS` 0, RFC 9113 §6.5.2).
    fn takes_no_stream(&self) -> Option<&'static str> {
        if self.is_closed() {
            Some("it closed as soon as it opened")
        } else if self.sender.current_max_send_streams() == 0 {
            Some("the instance allows no streams (SETTINGS_MAX_CONCURRENT_STREAMS 0)")
        } else {
            None
        }
    }

    /// One more stream on this connection, if it is open and the instance allows one more.
    fn open_stream(&self, fresh: bool) -> Option<Stream> {
        if self.is_closed() {
            return None;
        }
        let allowed = self.sender.current_max_send_streams();
        self.state
            .streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < allowed).then_some(n + 1)
            })
            .ok()?;
        Some(Stream {
            sender: self.sender.clone(),
            open: OpenStream(self.state.clone()),
            fresh,
        })
    }
}

/// A stream's place on a connection: the sender to start it with, and the count it holds.
#[derive(Debug)]
pub struct Stream {
    pub sender: SendRequest<Bytes>,
    /// Keep it as long as the stream is open (until its response ends or it is reset).
    pub open: OpenStream,
    /// Whether the connection was opened for this stream (or the burst it came in): one that
    /// then refuses the stream says the instance is unreachable, not that a pooled connection
    /// went stale.
    pub fresh: bool,
}

/// Counts a stream as open on its connection until dropped.
#[derive(Debug)]
pub struct OpenStream(Arc<ConnectionState>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pool {
    /// A place for one stream to `address`: on an open connection with room for it, or else on
    /// a new one ([`connect`]), shared with the streams that need one at the same time.
    pub async fn stream(
        &self,
        address: SocketAddr,
        connect_timeout: Duration,
    ) -> Result<Stream, NoConnection> {
        loop {
            let attempt = {
                let mut instances = self.lock();
                let instance = instances.entry(address).or_default();
                instance
                    .open
                    .retain(|pooled| !pooled.connection.is_closed());
                for pooled in &mut instance.open {
                    if let Some(stream) = pooled.connection.open_stream(false) {
                        pooled.used = Instant::now();
                        return Ok(stream);
                    }
                }
                instance
                    .connecting
                    .get_or_insert_with(|| self.connect(address, connect_timeout))
                    .clone()
            };
            // Boxed inside `connect`: a new connection is rare, and its state would otherwise
            // make every stream's future larger.
            let connection = attempt.await?;
            if let Some(stream) = connection.open_stream(true) {
                return Ok(stream);
            }
            // Full already (the burst that waited for it took its room): open another, unless
            // it can take no stream at all, which another would not either; looping on it
            // would open connections without end.
            if let Some(why) = connection.takes_no_stream() {
                self.drop_connection(address, &connection.state);
                return Err(NoConnection::Unreachable(format!(
                    "HTTP/2 connection to {address}: {why}"
                )));
            }
        }
    }

    /// Starts a connection attempt to `address` in a task of its own, which puts the
    /// connection in the pool when it opens and ends the attempt either way; so it completes
    /// even if every stream that waited for it is gone.
    fn connect(&self, address: SocketAddr, connect_timeout: Duration) -> Connecting {
        let instances = self.instances.clone();
        let task = tokio::spawn(async move {
            let connected = connect(address, connect_timeout).await;
            let mut instances = instances.lock().unwrap_or_else(|p| p.into_inner());
            let instance = instances.entry(address).or_default();
            instance.connecting = None;
            if let Ok(connection) = &connected {
                instance.open.push(Pooled {
                    connection: connection.clone(),
                    used: Instant::now(),
                });
            }
            connected
        });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(NoConnection::Unreachable(format!(
                    "connecting to {address}: {e}"
                )))
            })
        }
        .boxed()
        .shared()
    }

    /// Drops the connection `stream` went on (it refused the stream); the connections opened
    /// after it stay.
    pub fn forget(&self, address: SocketAddr, stream: &OpenStream) {
        self.drop_connection(address, &stream.0);
    }

    /// Marks the connection whose state is `state` closed and takes it out of the pool (the
    /// others to `address` stay); it closes once its open streams end.
    fn drop_connection(&self, address: SocketAddr, state: &Arc<ConnectionState>) {
        state.closed.store(true, Ordering::Relaxed);
        if let Some(instance) = self.lock().get_mut(&address) {
            instance
                .open
                .retain(|pooled| !Arc::ptr_eq(&pooled.connection.state, state));
        }
    }

    /// Drops the connections that closed, or that no new stream used for [`IDLE_TIMEOUT`]
    /// before `now`; returns how many stay.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut instances = self.lock();
        let mut open = 0;
        instances.retain(|_, instance| {
            instance.open.retain(|pooled| {
                !pooled.connection.is_closed()
                    && now.saturating_duration_since(pooled.used) < IDLE_TIMEOUT
            });
            open += instance.open.len();
            !instance.open.is_empty() || instance.connecting.is_some()
        });
        open
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Instance, FastHash>> {
        self.instances.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A new h2c connection to `address` (TCP connect within `connect_timeout`, the HTTP/2
/// preface, then a PING answered within `connect_timeout` again), driven by a task of its own
/// that marks it closed when it ends. The instance's SETTINGS come before its answer to the
/// PING (RFC 9113 §3.4), so a stream placed on the connection afterwards sees the instance's
/// stream limit, not a guess. The windows are hyper's defaults for clients (5 MB per
/// connection, 2 MB per stream), so a stream's body is not held to HTTP/2's initial 64 KB.
async fn connect(
    address: SocketAddr,
    connect_timeout: Duration,
) -> Result<Connection, NoConnection> {
    let unreachable = |e: String| NoConnection::Unreachable(e);
    let upstream = crate::pool::Pool::connect(address, connect_timeout)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let (sender, mut connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .initial_max_send_streams(STREAMS_BEFORE_SETTINGS)
        .max_header_list_size(MAX_RESPONSE_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .enable_push(false)
        .handshake::<_, Bytes>(upstream.stream)
        .await
        .map_err(|e| unreachable(format!("HTTP/2 handshake with {address}: {e}")))?;
    let mut ping = connection.ping_pong();
    let state = Arc::new(ConnectionState::default());
    let ended = state.clone();
    let (end_tx, end_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let result = connection.await;
        if let Err(e) = &result {
            debug!(%address, error = %e, "HTTP/2 connection to an instance ended");
        }
        ended.closed.store(true, Ordering::Relaxed);
        let _ = end_tx.send(result);
    });
    let Some(ping) = ping.as_mut() else {
        return Ok(Connection { sender, state });
    };
    match tokio::time::timeout(connect_timeout, ping.ping(h2::Ping::opaque())).await {
        Ok(Ok(_)) => Ok(Connection { sender, state }),
        Ok(Err(_)) => {
            let why = match end_rx.await {
                Ok(Err(e)) => e.to_string(),
                _ => "it closed".to_string(),
            };
            Err(NoConnection::NotHttp2(format!(
                "HTTP/2 connection to {address} ended before its first PING was answered: {why}"
            )))
        }
        Err(_) => Err(unreachable(format!(
            "HTTP/2 connection to {address}: no answer to a PING within {connect_timeout:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_no_stream_used_for_the_idle_timeout_is_let_go() {
        let instance = usher_tests::instance::spawn("a").await;
        let pool = Pool::default();
        let second = Duration::from_secs(1);
        let first = pool.stream(instance, second).await.unwrap();
        assert!(first.fresh);
        let again = pool.stream(instance, second).await.unwrap();
        assert!(!again.fresh, "the same connection again");
        drop((first, again));
        let now = Instant::now();
        assert_eq!(pool.sweep(now), 1);
        assert_eq!(pool.sweep(now + IDLE_TIMEOUT + second), 0);
        let after = pool.stream(instance, second).await.unwrap();
        assert!(after.fresh, "a new connection after the sweep");
        // An unreachable instance is an error that says why.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let nobody = closed.local_addr().unwrap();
        drop(closed);
        match pool.stream(nobody, second).await.unwrap_err() {
            NoConnection::Unreachable(e) => assert!(e.contains(&nobody.to_string()), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn forgetting_a_refused_connection_keeps_the_one_opened_after_it() {
        let instance = usher_tests::instance::spawn("a").await;
        let pool = Pool::default();
        let second = Duration::from_secs(1);
        let old = pool.stream(instance, second).await.unwrap();
        // Another stream found the old connection refusing and opened a new one...
        old.open.0.closed.store(true, Ordering::Relaxed);
        let new = pool.stream(instance, second).await.unwrap();
        assert!(new.fresh);
        // ...before this one, which was sent on the old connection too, forgets it.
        pool.forget(instance, &old.open);
        let next = pool.stream(instance, second).await.unwrap();
        assert!(!next.fresh, "the new connection stays pooled");
        assert_eq!(pool.sweep(Instant::now()), 1);
    }

    #[tokio::test]
    async fn an_instance_that_allows_no_streams_is_unreachable_after_one_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let instance = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let Ok(mut connection) = h2::server::Builder::new()
                        .max_concurrent_streams(0)
                        .handshake::<_, Bytes>(socket)
                        .await
                    else {
                        return;
                    };
                    while let Some(Ok(_)) = connection.accept().await {}
                });
            }
        });
        let pool = Pool::default();
        let second = Duration::from_secs(1);
        let refused = tokio::time::timeout(5 * second, pool.stream(instance, second)).await;
        match refused.expect("an answer, not connections opened without end") {
            Err(NoConnection::Unreachable(e)) => assert!(e.contains("allows no streams"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            accepted.load(Ordering::Relaxed),
            1,
            "one connection, not a loop"
        );
        assert_eq!(pool.sweep(Instant::now()), 0, "and it is not kept");
    }

    #[tokio::test]
    async fn streams_that_find_no_connection_at_once_share_one_attempt() {
        let instance = usher_tests::instance::spawn("a").await;
        let pool = Arc::new(Pool::default());
        let second = Duration::from_secs(1);
        let streams =
            futures_util::future::join_all((0..16).map(|_| pool.stream(instance, second))).await;
        assert!(streams.iter().all(|s| s.as_ref().is_ok_and(|s| s.fresh)));
        assert_eq!(
            pool.sweep(Instant::now()),
            1,
            "one connection for the burst"
        );
    }
}
