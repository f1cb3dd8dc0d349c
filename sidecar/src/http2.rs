//! HTTP/2 without TLS (h2c with prior knowledge, RFC 9113 §3.3), as gRPC clients speak it to a
//! proxy on loopback. A client connection that opens with HTTP/2's connection preface is served
//! by hyper's HTTP/2 server; each stream is one request, routed like an HTTP/1 one (Waiter:
//! determine the service version, reserve an instance, send, release):
//!
//! - the service comes from `:authority` (or `Host`), as [`crate::route`] decides for HTTP/1;
//! - each stream reserves its own slot, so the streams of one connection spread over the
//!   version's instances and each counts as a request in flight;
//! - it goes to the instance over h2c: one multiplexed connection per instance, shared by every
//!   stream to it ([`Pool`]); an instance addressed over HTTP/2 must speak it (gRPC servers do);
//! - bodies and trailers (gRPC's `grpc-status`) are relayed both ways as they come; the slot
//!   is released when the response body ends, fails, or the client resets the stream;
//! - an instance that cannot be reached is ejected and another tried (the request was not
//!   sent), as for HTTP/1; a request that reached a connection and failed there is a `502`
//!   (its body may be gone);
//! - the errors are HTTP/1's, with the same one-line reasons: `400`, `404`, `503` with
//!   `Retry-After`, `502`, `504`, `501` for `CONNECT`; to a gRPC call (`content-type:
//!   application/grpc`) as gRPC's status instead (`grpc-status` with the reason in
//!   `grpc-message`: `UNIMPLEMENTED` for `404`, `INTERNAL` for `400`, `UNAVAILABLE` else).
//!
//! At shutdown the connection gets a `GOAWAY`: streams already open finish (within the
//! sidecar's drain), no new one starts.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderValue, HOST, RETRY_AFTER};
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use smallvec::SmallVec;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use usher_shared::FastHash;

use crate::pool::IDLE_TIMEOUT;

use crate::http1::head::HeadError;
use crate::metrics::Outcome;
use crate::proxy::{
    failure_message, timeout_message, ClientLimits, Limits, Proxy, MAX_ATTEMPTS, RETRY_AFTER_SECS,
};
use crate::reserver::{Reservation, ReserveError};
use crate::route::request_host;
use crate::slots::InstanceId;

/// The first bytes of every HTTP/2 connection (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Streams a client may have open at once on one connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// Whether a connection's first bytes are HTTP/2's preface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preface {
    /// All of it.
    Complete,
    /// A start of it (or nothing yet): read more to tell.
    Partial,
    /// Not HTTP/2: an HTTP/1 request.
    No,
}

/// What `first` (a connection's first bytes) says about its protocol.
pub fn preface(first: &[u8]) -> Preface {
    let n = first.len().min(PREFACE.len());
    if first[..n] != PREFACE[..n] {
        Preface::No
    } else if n == PREFACE.len() {
        Preface::Complete
    } else {
        Preface::Partial
    }
}

/// Serves a client connection that opened with the HTTP/2 preface (`read`: its bytes read so
/// far, the preface and maybe more) until it closes, or `shutdown` fires and its open streams
/// finish.
pub async fn serve(
    proxy: Arc<Proxy>,
    stream: TcpStream,
    read: BytesMut,
    client: SocketAddr,
    limits: ClientLimits,
    shutdown: CancellationToken,
) {
    let ip = client.ip();
    let service = service_fn(move |request| {
        let proxy = proxy.clone();
        async move { Ok::<_, Infallible>(forward(&proxy, request, ip).await) }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        // A client silent for the header read timeout gets a PING and as long again to answer
        // it, or its connection is closed. Every HTTP/2 stack answers PINGs by itself, so an
        // idle gRPC channel stays open, while a peer that sent the preface and then nothing
        // does not hold one of the connection slots for ever.
        .keep_alive_interval(Some(limits.header_read_timeout))
        .keep_alive_timeout(limits.header_read_timeout)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_header_list_size(u32::try_from(limits.max_header_size).unwrap_or(u32::MAX));
    let connection = builder.serve_connection(TokioIo::new(Prefixed { read, stream }), service);
    tokio::pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => served,
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = served {
        debug!(error = %e, "HTTP/2 client connection failed");
    }
}

/// One stream: the instance's response, or the sidecar's own refusal, written as gRPC's
/// status to a gRPC call and as text to anything else.
async fn forward(proxy: &Proxy, request: Request<Incoming>, ip: IpAddr) -> Response<Reply> {
    let grpc = is_grpc(request.headers());
    match route_and_send(proxy, request, ip).await {
        Ok(response) => response,
        Err(refusal) if grpc => refusal.grpc(),
        Err(refusal) => refusal.text(),
    }
}

/// Routes, reserves and forwards one stream (see the module).
async fn route_and_send(
    proxy: &Proxy,
    request: Request<Incoming>,
    ip: IpAddr,
) -> Result<Response<Reply>, Refusal> {
    if request.method() == http::Method::CONNECT {
        let refused = HeadError::Connect;
        proxy.counters().unrouted(refused.status());
        return Err(Refusal::new(
            StatusCode::NOT_IMPLEMENTED,
            refused.to_string(),
        ));
    }
    let (mut head, body) = request.into_parts();
    let authority = head.uri.authority().map(|a| a.as_str().to_owned());
    let host_field = head.headers.get(HOST).map(|v| v.as_bytes().to_vec());
    let routed = request_host(authority.as_deref(), host_field.as_deref())
        .and_then(|host| proxy.replica().route(&host));
    let reserver = match routed {
        Ok(reserver) => reserver,
        Err(e) => {
            let status = e.status();
            proxy.counters().unrouted(status.as_u16());
            return Err(Refusal::new(status, e.to_string()));
        }
    };
    // The instance gets the client's authority (or Host) and path, and the client appended to
    // `X-Forwarded-For`.
    let authority = authority.or_else(|| host_field.and_then(|h| String::from_utf8(h).ok()));
    let target = head
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    head.uri = match Uri::builder()
        .scheme("http")
        .authority(authority.unwrap_or_default())
        .path_and_query(target)
        .build()
    {
        Ok(uri) => uri,
        Err(e) => {
            proxy.counters().unrouted(400);
            let message = format!("bad request target: {e}");
            return Err(Refusal::new(StatusCode::BAD_REQUEST, message));
        }
    };
    append_forwarded_for(&mut head.headers, ip);

    let limits = proxy.limits();
    let counters = reserver.counters();
    let mut request = Request::from_parts(head, body);
    let mut tried: SmallVec<[InstanceId; MAX_ATTEMPTS]> = SmallVec::new();
    let mut last_failure: Option<String> = None;
    for _ in 0..MAX_ATTEMPTS {
        let mut reservation = match reserver
            .reserve(&tried, limits.queue_timeout, limits.max_queued)
            .await
        {
            Ok(reservation) => reservation,
            Err(ReserveError::NoOtherInstance { .. }) => break,
            Err(e) => {
                counters.ended(Outcome::Unavailable);
                let refusal = Refusal::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
                return Err(refusal.retry_after(RETRY_AFTER_SECS));
            }
        };
        tried.push(reservation.id().clone());
        let address = reservation.address();
        match send(proxy.h2c(), address, limits, request).await {
            Sent::Answered(response) => {
                reservation.succeeded();
                counters.ended(Outcome::Answered);
                return Ok(response.map(|body| Reply::Relayed(Held::new(body, reservation))));
            }
            Sent::Unreachable(reason, unsent) => {
                counters.instance_failed();
                let period = reservation.failed();
                warn!(instance = &**reservation.id(), %address, %reason, ejected_for = ?period,
                      "instance unreachable; retrying elsewhere");
                last_failure = Some(reason);
                request = unsent;
            }
            Sent::Failed(reason) => {
                counters.ended(Outcome::InstanceFailure);
                warn!(instance = &**reservation.id(), %address, %reason, "instance failed mid-request");
                let message = failure_message(&reserver, Some(&reason));
                return Err(Refusal::new(StatusCode::BAD_GATEWAY, message));
            }
            Sent::Timeout => {
                counters.ended(Outcome::InstanceTimeout);
                let message = timeout_message(&reservation, limits.instance_timeout);
                return Err(Refusal::new(StatusCode::GATEWAY_TIMEOUT, message));
            }
        }
    }
    counters.ended(Outcome::InstanceFailure);
    let message = failure_message(&reserver, last_failure.as_deref());
    Err(Refusal::new(StatusCode::BAD_GATEWAY, message))
}

/// How sending a stream to one instance ended.
enum Sent {
    /// The instance's response head.
    Answered(Response<Incoming>),
    /// Nothing reached the instance (no connection, or a new one closed at once): why, and
    /// the request, to send elsewhere.
    Unreachable(String, Request<Incoming>),
    /// The request went out and the instance failed before answering.
    Failed(String),
    /// No response head within the instance timeout.
    Timeout,
}

/// Sends `request` to `address` on its pooled connection, or on a new one if that turns out
/// closed before the request went out.
async fn send(
    pool: &Pool,
    address: SocketAddr,
    limits: &Limits,
    mut request: Request<Incoming>,
) -> Sent {
    loop {
        let (mut sender, fresh) = match pool.sender(address, limits.connect_timeout).await {
            Ok(sender) => sender,
            Err(reason) => return Sent::Unreachable(reason, request),
        };
        let sent = tokio::time::timeout(limits.instance_timeout, sender.try_send_request(request));
        match sent.await {
            Ok(Ok(response)) => return Sent::Answered(response),
            Ok(Err(mut e)) => match e.take_message() {
                Some(unsent) if !fresh => {
                    debug!(%address, error = %e.error(), "pooled HTTP/2 connection closed; a new one");
                    pool.forget(address);
                    request = unsent;
                }
                Some(unsent) => return Sent::Unreachable(e.into_error().to_string(), unsent),
                None => return Sent::Failed(e.into_error().to_string()),
            },
            Err(_) => return Sent::Timeout,
        }
    }
}

/// Appends `ip` to the request's `X-Forwarded-For` list (one field, earlier entries first).
fn append_forwarded_for(headers: &mut http::HeaderMap, ip: IpAddr) {
    let mut list = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(", ");
    if !list.is_empty() {
        list.push_str(", ");
    }
    list.push_str(&ip.to_string());
    if let Ok(value) = HeaderValue::from_str(&list) {
        headers.insert("x-forwarded-for", value);
    }
}

/// Whether a request is a gRPC call (`content-type: application/grpc`, `+proto` and the like).
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The sidecar's own answer to a stream it could not forward: an HTTP status and one line
/// that says why (and `Retry-After` for a `503`).
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    message: String,
    retry_after: Option<u32>,
}

impl Refusal {
    fn new(status: StatusCode, message: String) -> Self {
        debug!(status = status.as_u16(), reason = %message, "refusing the HTTP/2 request");
        Self {
            status,
            message,
            retry_after: None,
        }
    }

    fn retry_after(self, seconds: u32) -> Self {
        Self {
            retry_after: Some(seconds),
            ..self
        }
    }

    /// As text: the status and the line, as HTTP/1 gets it.
    fn text(self) -> Response<Reply> {
        let line = Bytes::from(format!("{}\n", self.message));
        let mut response = Response::new(Reply::Text(Some(line)));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let Some(seconds) = self.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }

    /// As a gRPC call's status: a trailers-only response (`200`, then `grpc-status` and the
    /// percent-encoded line in `grpc-message`, and no body), so a gRPC client reports the
    /// sidecar's reason with the code gRPC maps the HTTP status to (gRPC's
    /// `http-grpc-status-mapping.md`: `404` is `UNIMPLEMENTED`, `400` `INTERNAL`, the rest
    /// here `UNAVAILABLE`).
    fn grpc(self) -> Response<Reply> {
        let code: u16 = match self.status {
            StatusCode::NOT_FOUND => 12,
            StatusCode::BAD_REQUEST => 13,
            _ => 14,
        };
        let mut response = Response::new(Reply::Text(None));
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(code));
        if let Ok(message) = HeaderValue::from_str(&percent_encode(&self.message)) {
            headers.insert("grpc-message", message);
        }
        response
    }
}

/// `grpc-message`'s encoding: bytes outside printable ASCII, and `%`, as `%XX`.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A response body to an HTTP/2 client: the sidecar's own text, or the instance's body.
pub enum Reply {
    Text(Option<Bytes>),
    Relayed(Held),
}

impl Body for Reply {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Reply::Text(text) => Poll::Ready(text.take().map(|t| Ok(Frame::data(t)))),
            Reply::Relayed(held) => Pin::new(held).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Reply::Text(text) => text.is_none(),
            Reply::Relayed(held) => held.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Reply::Text(Some(text)) => SizeHint::with_exact(text.len() as u64),
            Reply::Text(None) => SizeHint::with_exact(0),
            Reply::Relayed(held) => held.body.size_hint(),
        }
    }
}

/// An instance's response body that holds its request's reservation: released when the body
/// ends or fails, or when hyper drops it because the client reset the stream.
pub struct Held {
    body: Incoming,
    reservation: Option<Reservation>,
}

impl Held {
    fn new(body: Incoming, reservation: Reservation) -> Self {
        let mut held = Self {
            body,
            reservation: Some(reservation),
        };
        if held.body.is_end_stream() {
            held.reservation = None;
        }
        held
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
}

impl Body for Held {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) || self.body.is_end_stream() {
            self.reservation = None;
        }
        Poll::Ready(frame)
    }
}

/// h2c connections to instances, one per address, shared by every stream to it. One that no
/// new stream used for [`IDLE_TIMEOUT`] is let go at the next sweep (it closes once its open
/// streams end), so instances that left the table keep no connection open.
#[derive(Debug, Default)]
pub struct Pool {
    senders: Mutex<HashMap<SocketAddr, Pooled, FastHash>>,
}

/// A connection's sender and when a stream last started on it.
#[derive(Debug)]
struct Pooled {
    sender: SendRequest<Incoming>,
    used: Instant,
}

impl Pool {
    /// A sender on the open connection to `address`, or on a new one (TCP connect within
    /// `connect_timeout`, then the HTTP/2 preface); `true` with a new one. Errors: why the
    /// instance is unreachable.
    pub async fn sender(
        &self,
        address: SocketAddr,
        connect_timeout: Duration,
    ) -> Result<(SendRequest<Incoming>, bool), String> {
        if let Some(pooled) = self.lock().get_mut(&address) {
            if !pooled.sender.is_closed() {
                pooled.used = Instant::now();
                return Ok((pooled.sender.clone(), false));
            }
        }
        let upstream = crate::pool::Pool::connect(address, connect_timeout)
            .await
            .map_err(|e| e.to_string())?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(upstream.stream))
            .await
            .map_err(|e| format!("HTTP/2 handshake with {address}: {e}"))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%address, error = %e, "HTTP/2 connection to an instance ended");
            }
        });
        let pooled = Pooled {
            sender: sender.clone(),
            used: Instant::now(),
        };
        self.lock().insert(address, pooled);
        Ok((sender, true))
    }

    /// Drops the connection to `address` (it closed); the next stream opens another.
    pub fn forget(&self, address: SocketAddr) {
        self.lock().remove(&address);
    }

    /// Drops the connections that closed, or that no stream used for [`IDLE_TIMEOUT`] before
    /// `now`; returns how many stay.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut senders = self.lock();
        senders.retain(|_, pooled| {
            !pooled.sender.is_closed() && now.saturating_duration_since(pooled.used) < IDLE_TIMEOUT
        });
        senders.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Pooled, FastHash>> {
        self.senders.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A client connection with the bytes already read from it put back in front.
struct Prefixed {
    read: BytesMut,
    stream: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.read.has_remaining() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read[..n]);
            this.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preface_is_told_from_http1_by_its_first_bytes() {
        assert_eq!(preface(b""), Preface::Partial);
        assert_eq!(preface(b"P"), Preface::Partial);
        assert_eq!(preface(b"PRI * HTTP/2.0\r\n"), Preface::Partial);
        assert_eq!(preface(PREFACE), Preface::Complete);
        let mut more = PREFACE.to_vec();
        more.extend_from_slice(b"\x00\x00\x12\x04");
        assert_eq!(preface(&more), Preface::Complete);
        assert_eq!(preface(b"POST / HTTP/1.1\r\n"), Preface::No);
        assert_eq!(preface(b"GET / HTTP/1.1\r\n"), Preface::No);
        assert_eq!(preface(b"PRI * HTTP/1.1\r\n"), Preface::No);
    }

    #[tokio::test]
    async fn a_connection_no_stream_used_for_the_idle_timeout_is_let_go() {
        let instance = usher_tests::instance::spawn("a").await;
        let pool = Pool::default();
        let second = Duration::from_secs(1);
        let (_, fresh) = pool.sender(instance, second).await.unwrap();
        assert!(fresh);
        let (_, fresh) = pool.sender(instance, second).await.unwrap();
        assert!(!fresh, "the same connection again");
        let now = Instant::now();
        assert_eq!(pool.sweep(now), 1);
        assert_eq!(pool.sweep(now + IDLE_TIMEOUT + second), 0);
        let (_, fresh) = pool.sender(instance, second).await.unwrap();
        assert!(fresh, "a new connection after the sweep");
        // An unreachable instance is an error that says why.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let nobody = closed.local_addr().unwrap();
        drop(closed);
        let e = pool.sender(nobody, second).await.unwrap_err();
        assert!(e.contains(&nobody.to_string()), "{e}");
    }

    #[test]
    fn refusals_are_text_or_a_grpc_status() {
        let refusal = || {
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "queue full: 100% of \u{e9}t\u{e9}".into(),
            )
            .retry_after(1)
        };
        let text = refusal().text();
        assert_eq!(text.status(), 503);
        assert_eq!(text.headers()["retry-after"], "1");
        let grpc = refusal().grpc();
        assert_eq!(grpc.status(), 200);
        assert!(grpc.body().is_end_stream(), "trailers only");
        assert_eq!(grpc.headers()["grpc-status"], "14");
        assert_eq!(
            grpc.headers()["grpc-message"],
            "queue full: 100%25 of %C3%A9t%C3%A9"
        );
        let unknown = Refusal::new(StatusCode::NOT_FOUND, "unknown service".into()).grpc();
        assert_eq!(unknown.headers()["grpc-status"], "12");
        let mut headers = http::HeaderMap::new();
        assert!(!is_grpc(&headers));
        headers.insert("content-type", "application/grpc+proto".parse().unwrap());
        assert!(is_grpc(&headers));
    }

    #[test]
    fn forwarded_for_is_one_field_with_the_client_last() {
        let mut headers = http::HeaderMap::new();
        append_forwarded_for(&mut headers, "127.0.0.1".parse().unwrap());
        assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
        headers.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        append_forwarded_for(&mut headers, "::1".parse().unwrap());
        assert_eq!(
            headers
                .get_all("x-forwarded-for")
                .iter()
                .collect::<Vec<_>>(),
            ["127.0.0.1, 10.0.0.2, ::1"]
        );
    }
}
