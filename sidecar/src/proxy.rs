//! The HTTP/1.1 proxy (Waiter's router): determine the service version, reserve an instance,
//! send the request, stream the response back, release the instance when the body ends or the
//! client goes away. No directory round trip is on this path.
//!
//! One task per client connection does everything: it parses each request head, forwards it
//! over a pooled connection to the instance, relays the body both ways and returns the
//! connection to the pool ([`crate::http1`] has the wire format, [`crate::pool`] the pool).
//!
//! A connection failure is retried on another instance and the instance is ejected; a
//! `GET`/`HEAD`/`OPTIONS` without a body whose instance fails before answering (it died
//! mid-request) is retried too. Errors a client can read, one line of text each: unknown
//! service `404`, no instance in time or queue full `503` (with `Retry-After`), instance
//! failure `502`, instance timeout `504`, a head over [`ClientLimits::max_header_size`] or with
//! more than [`MAX_HEADERS`] fields `431`, a malformed request or one whose body length is
//! ambiguous `400` (then the connection is closed), `CONNECT` `501`. A
//! connection that does not send a complete head within [`ClientLimits::header_read_timeout`]
//! (counted from the end of the previous response) is closed.
//!
//! A connection that opens with HTTP/2's preface is handed to [`crate::http2`] (h2c, gRPC).
//!
//! A request that asks to switch protocols (a WebSocket handshake) is forwarded with its
//! `Upgrade`; when the instance answers `101`, the connection becomes a tunnel
//! ([`crate::tunnel`]) that keeps the request's reservation until it closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use smallvec::SmallVec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, debug_span, warn, Instrument};

use crate::http1::body::{self, RelayError};
pub use crate::http1::head::MAX_HEADERS;
use crate::http1::head::{
    parse_request, parse_response, write_error, ClientSide, Framing, HeadError, RequestHead,
    ResponseHead,
};
use crate::http2::{self, Preface};
use crate::metrics::{Outcome, ProxyCounters};
use crate::pool::{Pool, Upstream};
use crate::replica::Replica;
use crate::reserver::{Reservation, ReserveError, Reserver};
use crate::slots::InstanceId;
use crate::tunnel;

/// Instances one request may try.
pub const MAX_ATTEMPTS: usize = 3;

/// Largest response head accepted from an instance, bytes; a larger one is an instance
/// failure (`502`).
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Seconds a `503` asks the client to wait before trying again (`Retry-After`): queues drain
/// and instances start within seconds.
pub const RETRY_AFTER_SECS: u32 = 1;

/// How often idle instance connections are swept ([`Pool::sweep`]).
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// How long a refused client's further input is read and discarded before closing.
const LINGER: Duration = Duration::from_secs(1);
/// Most bytes of a refused client's further input read and discarded.
const LINGER_BYTES: usize = 256 * 1024;

/// Room made in a client's read buffer before each read, bytes.
const READ_SIZE: usize = 8 * 1024;

/// Timeouts and limits of the request path.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long a request waits for a free instance before `503`.
    pub queue_timeout: Duration,
    /// Requests that may wait per service version; beyond it `503` at once.
    pub max_queued: usize,
    /// Time from sending a request to the instance's response head before `504`.
    pub instance_timeout: Duration,
    pub connect_timeout: Duration,
    /// How long a tunnel (after a `101`, a WebSocket say) may carry no byte either way before
    /// both its connections are closed.
    pub tunnel_idle_timeout: Duration,
}

/// Limits on client connections.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// Time to send a request head (line and headers), counted from the connection's start or
    /// the end of the previous response; then the connection is closed.
    pub header_read_timeout: Duration,
    /// Largest request head in bytes; a larger one is answered `431` and the connection
    /// closed. More than [`MAX_HEADERS`] fields is answered `431` too.
    pub max_header_size: usize,
    /// Connections served at once; beyond it a new connection is closed at once.
    pub max_connections: usize,
}

/// The proxy's shared state.
pub struct Proxy {
    replica: Arc<Replica>,
    pool: Pool,
    /// HTTP/2 connections to instances, for clients that speak HTTP/2 ([`crate::http2`]).
    h2c: http2::Pool,
    limits: Limits,
    counters: ProxyCounters,
}

/// One client connection: its halves, the bytes read from it and not yet used, and buffers
/// reused by every request on it.
struct Client<'s> {
    rd: ReadHalf<'s>,
    wr: WriteHalf<'s>,
    buf: BytesMut,
    /// The current request's head as the instance gets it (kept to send it again).
    request: Vec<u8>,
    /// Bytes for the client not yet written (a response head).
    out: Vec<u8>,
    /// Bytes for the instance not yet written (the request's body).
    scratch: Vec<u8>,
    /// The client's address as an `X-Forwarded-For` entry.
    ip: Vec<u8>,
}

/// How one attempt on one instance ended.
enum Attempt {
    /// The response was relayed (or its relay failed, which no retry can mend); `true`: the
    /// client connection stays open.
    Done(bool),
    /// Nothing was sent (the instance is unreachable); the body is still unread.
    NotSent(String),
    /// The request was sent and the instance failed before answering.
    Failed(String),
    /// No response head within the instance timeout.
    Timeout,
    /// The client failed while sending its body (closed, or broke the chunked framing).
    ClientFailed(RelayError),
}

/// How waiting for a response head failed.
enum HeadFailure {
    /// The instance closed or failed; `answered`: after some bytes of a response.
    Instance {
        reason: String,
        answered: bool,
    },
    Timeout,
    Client(RelayError),
}

/// Where the request body stands while the response is awaited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    Sending,
    Sent,
    /// The instance stopped reading it (it answered early, or failed).
    Abandoned,
}

impl Proxy {
    pub fn new(replica: Arc<Replica>, limits: Limits) -> Self {
        Self {
            replica,
            pool: Pool::default(),
            h2c: http2::Pool::default(),
            limits,
            counters: ProxyCounters::default(),
        }
    }

    /// What the proxy counts outside any service version (`GET /metrics`).
    pub fn counters(&self) -> &ProxyCounters {
        &self.counters
    }

    pub(crate) fn replica(&self) -> &Replica {
        &self.replica
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    pub(crate) fn h2c(&self) -> &http2::Pool {
        &self.h2c
    }

    /// Serves one client connection: HTTP/2 if it opens with HTTP/2's preface, else HTTP/1.
    async fn connection(
        self: &Arc<Self>,
        mut stream: TcpStream,
        client: SocketAddr,
        limits: ClientLimits,
        shutdown: CancellationToken,
    ) {
        if let Some(read) = self.http1(&mut stream, client, limits, &shutdown).await {
            // Boxed: the HTTP/1 connection's future stays as small as it was without it.
            Box::pin(http2::serve(
                self.clone(),
                stream,
                read,
                client,
                limits,
                shutdown,
            ))
            .await;
        }
    }

    /// Serves an HTTP/1 client connection until it closes, fails, times out or `shutdown`
    /// fires between requests. Returns the bytes read if the connection opened with HTTP/2's
    /// preface instead.
    async fn http1(
        &self,
        stream: &mut TcpStream,
        client: SocketAddr,
        limits: ClientLimits,
        shutdown: &CancellationToken,
    ) -> Option<BytesMut> {
        let (rd, wr) = stream.split();
        let mut c = Client {
            rd,
            wr,
            buf: BytesMut::with_capacity(READ_SIZE),
            request: Vec::with_capacity(512),
            out: Vec::with_capacity(512),
            scratch: Vec::new(),
            ip: client.ip().to_string().into_bytes(),
        };
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        // Until the first bytes tell HTTP/1 from HTTP/2.
        let mut opening = true;
        loop {
            let deadline = Instant::now() + limits.header_read_timeout;
            let (head, route) = loop {
                if opening {
                    match http2::preface(&c.buf) {
                        Preface::Complete => return Some(std::mem::take(&mut c.buf)),
                        Preface::Partial => {}
                        Preface::No => opening = false,
                    }
                }
                if !opening && !c.buf.is_empty() {
                    match parse_request(&c.buf, &c.ip, &mut c.request) {
                        Ok(Some(p)) if p.head.len <= limits.max_header_size => {
                            let route = p.host.and_then(|host| self.replica.route(&host));
                            break (p.head, route);
                        }
                        Ok(None) if c.buf.len() < limits.max_header_size => {}
                        Ok(_) => {
                            let e = HeadError::TooLarge(limits.max_header_size);
                            self.counters.unrouted(e.status());
                            refuse(&mut c, e.status(), &e.to_string()).await;
                            return None;
                        }
                        Err(e) => {
                            self.counters.unrouted(e.status());
                            refuse(&mut c, e.status(), &e.to_string()).await;
                            return None;
                        }
                    }
                }
                c.buf.reserve(READ_SIZE);
                let read = tokio::select! {
                    biased;
                    _ = &mut cancelled, if c.buf.is_empty() => return None,
                    read = tokio::time::timeout_at(deadline, c.rd.read_buf(&mut c.buf)) => read,
                };
                match read {
                    Ok(Ok(0)) => return None,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        debug!(error = %e, "client connection failed");
                        return None;
                    }
                    Err(_) => {
                        debug!(after = ?limits.header_read_timeout, partial = !c.buf.is_empty(),
                               "no request head in time; closing");
                        return None;
                    }
                }
            };
            c.buf.advance(head.len);
            let keep = match route {
                Ok(reserver) => self.exchange(&mut c, head, &reserver, shutdown).await,
                Err(e) => {
                    let status = e.status().as_u16();
                    self.counters.unrouted(status);
                    answer_error(&mut c, head, status, &e.to_string(), None).await
                }
            };
            if !keep || shutdown.is_cancelled() {
                return None;
            }
        }
    }

    /// Proxies one request whose head is parsed (and rewritten in `c.request`); returns
    /// whether the client connection stays open.
    async fn exchange(
        &self,
        c: &mut Client<'_>,
        head: RequestHead,
        reserver: &Arc<Reserver>,
        shutdown: &CancellationToken,
    ) -> bool {
        // A body that is already whole in the buffer goes with the head and can be sent again.
        let buffered = match head.framing {
            Framing::Empty => Some(0),
            Framing::Length(n) if n <= c.buf.len() as u64 => Some(n as usize),
            _ => None,
        };
        let replayable = head.idempotent && head.framing == Framing::Empty;
        let mut tried: SmallVec<[InstanceId; MAX_ATTEMPTS]> = SmallVec::new();
        let mut last_failure: Option<String> = None;
        let counters = reserver.counters();
        for _ in 0..MAX_ATTEMPTS {
            let mut reservation = match reserver
                .reserve(&tried, self.limits.queue_timeout, self.limits.max_queued)
                .await
            {
                Ok(reservation) => reservation,
                Err(ReserveError::NoOtherInstance { .. }) => break,
                Err(e) => {
                    counters.ended(Outcome::Unavailable);
                    let retry = Some(RETRY_AFTER_SECS);
                    return answer_error(c, head, 503, &e.to_string(), retry).await;
                }
            };
            tried.push(reservation.id().clone());
            match self
                .attempt(c, head, buffered, &mut reservation, shutdown)
                .await
            {
                Attempt::Done(keep) => {
                    counters.ended(Outcome::Answered);
                    if let Some(n) = buffered {
                        c.buf.advance(n);
                    }
                    return keep;
                }
                Attempt::NotSent(reason) => {
                    counters.instance_failed();
                    let period = reservation.failed();
                    warn!(instance = &**reservation.id(), address = %reservation.address(), reason = %reason,
                          ejected_for = ?period, "instance unreachable; retrying elsewhere");
                    last_failure = Some(reason);
                }
                Attempt::Failed(reason) => {
                    counters.instance_failed();
                    let period = reservation.failed();
                    warn!(instance = &**reservation.id(), address = %reservation.address(), reason = %reason,
                          ejected_for = ?period, replayable, "instance failed mid-request");
                    last_failure = Some(reason);
                    if !replayable {
                        break;
                    }
                }
                Attempt::Timeout => {
                    counters.ended(Outcome::InstanceTimeout);
                    let message = timeout_message(&reservation, self.limits.instance_timeout);
                    drop(reservation);
                    return answer_error(c, head, 504, &message, None).await;
                }
                Attempt::ClientFailed(e) => {
                    counters.ended(Outcome::ClientFailed);
                    debug!(error = %e, "client failed while sending its body");
                    if matches!(e, RelayError::Chunk(_)) {
                        refuse(c, 400, &e.to_string()).await;
                    }
                    return false;
                }
            }
        }
        counters.ended(Outcome::InstanceFailure);
        let message = failure_message(reserver, last_failure.as_deref());
        answer_error(c, head, 502, &message, None).await
    }

    /// Sends the request to the reserved instance over a pooled connection (or a new one if
    /// none is idle, or the pooled one turns out closed before answering an idempotent
    /// request), then relays the response, or tunnels after a `101` to an upgrade.
    async fn attempt(
        &self,
        c: &mut Client<'_>,
        head: RequestHead,
        buffered: Option<usize>,
        reservation: &mut Reservation,
        shutdown: &CancellationToken,
    ) -> Attempt {
        let closing = shutdown.is_cancelled();
        let address = reservation.address();
        let mut pooled = self.pool.checkout(address);
        loop {
            let fresh = pooled.is_none();
            let mut upstream = match pooled.take() {
                Some(upstream) => upstream,
                None => match Pool::connect(address, self.limits.connect_timeout).await {
                    Ok(upstream) => upstream,
                    Err(e) => return Attempt::NotSent(e.to_string()),
                },
            };
            let written = match buffered {
                Some(n) if n > 0 => {
                    c.scratch.clear();
                    c.scratch.extend_from_slice(&c.request);
                    c.scratch.extend_from_slice(&c.buf[..n]);
                    let sent = upstream.stream.write_all(&c.scratch).await;
                    c.scratch.clear();
                    sent
                }
                _ => upstream.stream.write_all(&c.request).await,
            };
            if let Err(e) = written {
                if fresh {
                    return Attempt::NotSent(format!("sending the request: {e}"));
                }
                continue; // the pooled connection was closed: a new one
            }
            let client_side = ClientSide {
                http10: head.http10,
                keep_alive: head.keep_alive && !closing,
                head_method: head.head_method,
                upgrade: head.upgrade,
            };
            let (response, body) = match self
                .response_head(c, &mut upstream, head, buffered.is_none(), client_side)
                .await
            {
                Ok(got) => got,
                Err(HeadFailure::Timeout) => return Attempt::Timeout,
                Err(HeadFailure::Client(e)) => return Attempt::ClientFailed(e),
                Err(HeadFailure::Instance {
                    answered: false, ..
                }) if !fresh && buffered == Some(0) && head.idempotent => {
                    continue; // a pooled connection the instance had closed: a new one
                }
                Err(HeadFailure::Instance { reason, .. }) => return Attempt::Failed(reason),
            };
            reservation.succeeded();
            if response.status == 101 {
                // Boxed: every request's future stays as small as it was without tunnels.
                Box::pin(self.tunnel(c, upstream, reservation, shutdown)).await;
                return Attempt::Done(false);
            }
            return Attempt::Done(
                self.relay_response(c, upstream, address, response, body)
                    .await,
            );
        }
    }

    /// Waits for the instance's final response head, streaming the request body meanwhile
    /// (`streaming`: it was not sent with the head) and forwarding interim (`1xx`) responses
    /// to an HTTP/1.1 client. On success the head for the client is in `c.out`.
    async fn response_head(
        &self,
        c: &mut Client<'_>,
        upstream: &mut Upstream,
        head: RequestHead,
        streaming: bool,
        client_side: ClientSide,
    ) -> Result<(ResponseHead, BodyState), HeadFailure> {
        let Client {
            rd,
            wr,
            buf,
            out,
            scratch,
            ..
        } = c;
        let Upstream {
            stream,
            buf: upstream_buf,
        } = upstream;
        let (mut up_rd, mut up_wr) = stream.split();
        let mut body = if streaming {
            BodyState::Sending
        } else {
            BodyState::Sent
        };
        let waited = tokio::time::timeout(self.limits.instance_timeout, async {
            let sending = body::relay(head.framing, false, rd, buf, &mut up_wr, scratch);
            tokio::pin!(sending);
            let response = final_head(&mut up_rd, upstream_buf, wr, out, client_side);
            tokio::pin!(response);
            loop {
                tokio::select! {
                    biased;
                    response = &mut response => return response,
                    sent = &mut sending, if body == BodyState::Sending => match sent {
                        Ok(()) => body = BodyState::Sent,
                        // The instance stopped reading: its answer may still come.
                        Err(e) if e.on_write() => body = BodyState::Abandoned,
                        Err(e) => return Err(HeadFailure::Client(e)),
                    },
                }
            }
        })
        .await;
        let mut response = match waited {
            Ok(Ok(response)) => response,
            Ok(Err(failure)) => return Err(failure),
            Err(_) => return Err(HeadFailure::Timeout),
        };
        if body != BodyState::Sent && client_side.keep_alive {
            // Answered before the whole body came: the rest of it is never read, so the
            // client connection closes after this response (the head must say so).
            let closing = ClientSide {
                keep_alive: false,
                ..client_side
            };
            if let Ok(Some(rewritten)) = parse_response(upstream_buf, closing, out) {
                response = rewritten;
            }
        }
        upstream_buf.advance(response.len);
        Ok((response, body))
    }

    /// Relays the response body after the head in `c.out`; returns the instance connection to
    /// the pool when it can carry another request. Returns whether the client connection
    /// stays open.
    async fn relay_response(
        &self,
        c: &mut Client<'_>,
        mut upstream: Upstream,
        address: SocketAddr,
        response: ResponseHead,
        body: BodyState,
    ) -> bool {
        let relayed = {
            let Upstream { stream, buf } = &mut upstream;
            body::relay(
                response.framing,
                !response.pass_through,
                stream,
                buf,
                &mut c.wr,
                &mut c.out,
            )
            .await
        };
        match relayed {
            Ok(()) => {
                let sent = body == BodyState::Sent;
                if response.keep_alive && sent && upstream.buf.is_empty() {
                    self.pool.put(address, upstream);
                }
                response.client_keep_alive && sent
            }
            Err(e) if e.on_write() => {
                debug!(error = %e, "the client went away during the response");
                false
            }
            Err(e) => {
                warn!(%address, status = response.status, error = %e,
                      "instance failed during the response body; closing the client connection");
                false
            }
        }
    }

    /// Relays the `101` head in `c.out`, then carries the connection's new protocol both ways
    /// until the tunnel ends; the client connection then closes.
    async fn tunnel(
        &self,
        c: &mut Client<'_>,
        mut upstream: Upstream,
        reservation: &Reservation,
        shutdown: &CancellationToken,
    ) {
        if let Err(e) = c.wr.write_all(&c.out).await {
            debug!(error = %e, "the client went away before the switch");
            return;
        }
        let _open = self.counters.tunnel_opened();
        let Upstream { stream, buf } = &mut upstream;
        let (mut up_rd, mut up_wr) = stream.split();
        let client = tunnel::Side {
            rd: &mut c.rd,
            wr: &mut c.wr,
            pending: &c.buf,
        };
        let instance = tunnel::Side {
            rd: &mut up_rd,
            wr: &mut up_wr,
            pending: buf,
        };
        debug!(
            instance = &**reservation.id(),
            "switched protocols; tunnelling"
        );
        let timeouts = tunnel::Timeouts {
            idle: self.limits.tunnel_idle_timeout,
            half_closed: tunnel::HALF_CLOSED_TIMEOUT,
        };
        let tunneled = tunnel::run(client, instance, timeouts, shutdown).await;
        debug!(instance = &**reservation.id(), ended = %tunneled.ended,
               to_instance = tunneled.to_instance, to_client = tunneled.to_client, "tunnel closed");
    }

    /// Drops idle instance connections that are closed or too old, and closed HTTP/2 ones.
    fn sweep(&self) {
        let idle = self.pool.sweep();
        let http2 = self.h2c.sweep(std::time::Instant::now());
        debug!(idle, http2, "swept instance connections");
    }
}

/// The `502` text: no attempt got an answer from `reserver`'s instances; `reason`: the last
/// attempt's failure.
pub(crate) fn failure_message(reserver: &Reserver, reason: Option<&str>) -> String {
    format!(
        "instance failure for {}/{}: {}",
        reserver.service(),
        reserver.version(),
        reason.unwrap_or("no instance answered")
    )
}

/// The `504` text: the reserved instance did not answer within `after`.
pub(crate) fn timeout_message(reservation: &Reservation, after: Duration) -> String {
    let reserver = reservation.reserver();
    format!(
        "instance {} of {}/{} did not answer within {after:?}",
        reservation.id(),
        reserver.service(),
        reserver.version(),
    )
}

/// Reads the instance's response until its final head, forwarding interim ones to an
/// HTTP/1.1 client (an HTTP/1.0 client never asked for them).
async fn final_head(
    up_rd: &mut ReadHalf<'_>,
    up_buf: &mut BytesMut,
    wr: &mut WriteHalf<'_>,
    out: &mut Vec<u8>,
    client_side: ClientSide,
) -> Result<ResponseHead, HeadFailure> {
    let mut answered = false;
    loop {
        if !up_buf.is_empty() {
            answered = true;
            let parsed =
                parse_response(up_buf, client_side, out).map_err(|e| HeadFailure::Instance {
                    reason: format!("bad response: {e}"),
                    answered,
                })?;
            match parsed {
                Some(response) if response.status == 101 && client_side.upgrade => {
                    return Ok(response)
                }
                Some(response) if response.status == 101 => {
                    return Err(HeadFailure::Instance {
                        reason: "101 Switching Protocols to a request that asked no upgrade".into(),
                        answered,
                    })
                }
                Some(response) if response.status < 200 => {
                    up_buf.advance(response.len);
                    if !client_side.http10 {
                        wr.write_all(out)
                            .await
                            .map_err(|e| HeadFailure::Client(RelayError::Write(e)))?;
                    }
                    continue;
                }
                Some(response) => return Ok(response),
                None if up_buf.len() >= MAX_RESPONSE_HEAD => {
                    return Err(HeadFailure::Instance {
                        reason: format!("response head larger than {MAX_RESPONSE_HEAD} bytes"),
                        answered,
                    })
                }
                None => {}
            }
        }
        up_buf.reserve(READ_SIZE);
        match up_rd.read_buf(up_buf).await {
            Ok(0) => {
                return Err(HeadFailure::Instance {
                    reason: "the instance closed the connection without a response".into(),
                    answered,
                })
            }
            Ok(_) => {}
            Err(e) => {
                return Err(HeadFailure::Instance {
                    reason: e.to_string(),
                    answered,
                })
            }
        }
    }
}

/// Answers a request with a one-line error. The connection stays open when the client wants
/// it and the request's body is not left unread (a body not wholly buffered is never read, so
/// the connection closes). Returns whether it stays open.
async fn answer_error(
    c: &mut Client<'_>,
    head: RequestHead,
    status: u16,
    message: &str,
    retry_after: Option<u32>,
) -> bool {
    debug!(status, reason = message, "refusing the request");
    let body_read = match head.framing {
        Framing::Empty => true,
        Framing::Length(n) if n <= c.buf.len() as u64 => {
            c.buf.advance(n as usize);
            true
        }
        _ => false,
    };
    let keep = head.keep_alive && body_read;
    let client = ClientSide {
        http10: head.http10,
        keep_alive: keep,
        head_method: head.head_method,
        upgrade: false,
    };
    write_error(&mut c.out, status, message, retry_after, client);
    let written = c.wr.write_all(&c.out).await;
    c.out.clear();
    keep && written.is_ok()
}

/// Answers a request the proxy cannot read further (bad head, bad body) and closes: its
/// side first, then, after reading what the client still sends (at most [`LINGER_BYTES`]
/// within [`LINGER`]), the connection, so that unread input does not make the kernel reset
/// the connection and discard the answer before the client reads it.
async fn refuse(c: &mut Client<'_>, status: u16, message: &str) {
    debug!(status, reason = message, "refusing the request and closing");
    let closing = ClientSide {
        http10: false,
        keep_alive: false,
        head_method: false,
        upgrade: false,
    };
    write_error(&mut c.out, status, message, None, closing);
    if c.wr.write_all(&c.out).await.is_err() || c.wr.shutdown().await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(LINGER, async {
        let mut drained = 0;
        while drained < LINGER_BYTES {
            c.buf.clear();
            match c.rd.read_buf(&mut c.buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

/// Accepts client connections until `shutdown`; then each connection finishes its in-flight
/// request and closes (graceful shutdown). Connections are tracked by `tracker`.
///
/// At most `limits.max_connections` connections are served at once: one more is accepted and
/// closed at once (the client sees the connection end without a response), so a flood neither
/// piles up in the kernel's backlog nor spins this loop.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    limits: ClientLimits,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (stream, client) = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = sweep.tick() => {
                proxy.sweep();
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, usually: back off instead of spinning.
                    warn!(error = %e, "cannot accept a client connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            proxy.counters.refused();
            debug!(%client, limit = limits.max_connections, "too many client connections; closing");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(
            async move {
                let _slot = slot;
                let _open = proxy.counters.accepted();
                proxy.connection(stream, client, limits, shutdown).await;
            }
            .instrument(debug_span!("client", %client)),
        );
    }
}
