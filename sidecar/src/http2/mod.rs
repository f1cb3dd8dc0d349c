//! HTTP/2 without TLS (h2c with prior knowledge, RFC 9113 §3.3), as gRPC clients speak it to a
//! proxy on loopback. A client connection that opens with HTTP/2's connection preface is served
//! by hyper's HTTP/2 server; each stream is one request, routed like an HTTP/1 one (Waiter:
//! determine the service version, reserve an instance, send, release):
//!
//! - the service comes from `:authority` (or `Host`), as [`crate::route`] decides for HTTP/1;
//! - each stream reserves its own slot, so the streams of one connection spread over the
//!   version's instances and each counts as a request in flight;
//! - it goes to the instance over h2c, multiplexed on a connection shared by every stream to
//!   it, and on more only when the instance allows fewer streams per connection than it has
//!   slots ([`Pool`]); an instance addressed over HTTP/2 must speak it (gRPC servers do).
//!   The stream is sent with the `h2` crate from the stream's own task (hyper's client would
//!   hand each request to its connection task over a channel and spawn a task per response:
//!   `docs/BENCHMARKS.md` measured that at 12% of the instructions per request);
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

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use http::header::{HeaderName, HeaderValue, HOST, RETRY_AFTER};
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use smallvec::SmallVec;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::http1::head::HeadError;
use crate::metrics::Outcome;
use crate::proxy::{
    failure_message, timeout_message, ClientLimits, Limits, Proxy, MAX_ATTEMPTS, RETRY_AFTER_SECS,
};
use crate::reserver::{Reservation, ReserveError};
use crate::route::request_host;
use crate::slots::InstanceId;

mod pool;

pub use pool::Pool;
use pool::{NoConnection, OpenStream};

/// The first bytes of every HTTP/2 connection (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Streams a client may have open at once on one connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

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
    // The client's address as `X-Forwarded-For` wants it, written once per connection.
    let client_ip = HeaderValue::from_str(&client.ip().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
    // hyper runs each stream as a task holding this future, and moves the task's state whole
    // when it spawns it and when the future completes: boxed, that is a pointer, not the
    // whole routing and forwarding state (about 4 KB).
    let service = service_fn(move |request| {
        let proxy = proxy.clone();
        let ip = client_ip.clone();
        Box::pin(async move { Ok::<_, Infallible>(forward(&proxy, request, ip).await) })
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
async fn forward(proxy: &Proxy, request: Request<Incoming>, ip: HeaderValue) -> Response<Reply> {
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
    ip: HeaderValue,
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
    let routed = request_host(
        head.uri.authority().map(|a| a.as_str()),
        head.headers.get(HOST).map(|v| v.as_bytes()),
    )
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
    // `X-Forwarded-For`. A request target that is already `http://authority/path` (what h2c
    // clients send) goes as it is.
    if head.uri.scheme_str() != Some("http") || head.uri.authority().is_none() {
        head.uri = match instance_uri(&head) {
            Ok(uri) => uri,
            Err(e) => {
                proxy.counters().unrouted(400);
                let message = format!("bad request target: {e}");
                return Err(Refusal::new(StatusCode::BAD_REQUEST, message));
            }
        };
    }
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
            Sent::Answered(response, open) => {
                reservation.succeeded();
                counters.ended(Outcome::Answered);
                return Ok(response.map(|body| Reply::Relayed(Held::new(body, reservation, open))));
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

/// `http://AUTHORITY/PATH` for a request whose target lacks the scheme or the authority: the
/// authority from `:authority` or else `Host`, the path as the client sent it.
fn instance_uri(head: &http::request::Parts) -> Result<Uri, http::Error> {
    let authority = match head.uri.authority() {
        Some(authority) => authority.as_str().to_owned(),
        None => head
            .headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
    };
    let target = head.uri.path_and_query().map_or("/", |p| p.as_str());
    Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(target)
        .build()
}

/// How sending a stream to one instance ended.
enum Sent {
    /// The instance's response head, and the stream's count on its connection.
    Answered(Response<RecvStream>, OpenStream),
    /// Nothing reached the instance (no connection, or a new one closed at once): why, and
    /// the request, to send elsewhere.
    Unreachable(String, Request<Incoming>),
    /// The request went out and the instance failed before answering.
    Failed(String),
    /// No response head within the instance timeout.
    Timeout,
}

/// Sends `request` to `address` on a pooled connection, or on a new one if that turns out
/// closed before the request went out. The request's body, if any, is relayed by a task of its
/// own ([`relay_request_body`]) while the response is awaited, so a stream can go both ways at
/// once (gRPC's bidirectional streaming); that task is cancelled unless a response comes.
async fn send(
    pool: &Pool,
    address: SocketAddr,
    limits: &Limits,
    request: Request<Incoming>,
) -> Sent {
    let (mut sender, open) = loop {
        let stream = match pool.stream(address, limits.connect_timeout).await {
            Ok(stream) => stream,
            Err(NoConnection::Unreachable(reason)) => return Sent::Unreachable(reason, request),
            Err(NoConnection::NotHttp2(reason)) => return Sent::Failed(reason),
        };
        // Ready fails when the connection closed or got a GOAWAY: nothing was sent on it.
        match stream.sender.ready().await {
            Ok(sender) => break (sender, stream.open),
            Err(e) if !stream.fresh => {
                debug!(%address, error = %e, "pooled HTTP/2 connection closed; a new one");
                pool.forget(address, &stream.open);
            }
            Err(e) => {
                return Sent::Unreachable(format!("HTTP/2 connection to {address}: {e}"), request)
            }
        }
    };
    let (head, body) = request.into_parts();
    let end_of_stream = body.is_end_stream();
    let (response, to_instance) =
        match sender.send_request(Request::from_parts(head, ()), end_of_stream) {
            Ok(sent) => sent,
            Err(e) => return Sent::Failed(e.to_string()),
        };
    let relay =
        (!end_of_stream).then(|| AbortOnDrop(tokio::spawn(relay_request_body(body, to_instance))));
    match tokio::time::timeout(limits.instance_timeout, response).await {
        Ok(Ok(response)) => {
            if let Some(relay) = relay {
                relay.detach();
            }
            Sent::Answered(response, open)
        }
        Ok(Err(e)) => Sent::Failed(e.to_string()),
        Err(_) => Sent::Timeout,
    }
}

/// A task aborted when this is dropped, unless [`AbortOnDrop::detach`]ed.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    fn detach(self) {
        std::mem::forget(self);
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Relays a client's request body (data, then trailers) to the instance's stream, as the
/// instance's flow-control window allows: each chunk waits for send capacity before the next
/// is read, so a slow instance slows the client rather than filling the sidecar's memory. A
/// client that resets its stream, or an instance that resets its own, ends the relay; the
/// other side's stream is reset.
async fn relay_request_body(mut body: Incoming, mut to: SendStream<Bytes>) {
    loop {
        let frame = std::future::poll_fn(|cx| {
            if to.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            Pin::new(&mut body).poll_frame(cx).map(Some)
        })
        .await;
        let frame = match frame {
            // The instance reset its stream: it wants no more.
            None => return,
            Some(Some(Ok(frame))) => frame,
            Some(Some(Err(e))) => {
                debug!(error = %e, "client request body failed; resetting the instance's stream");
                to.send_reset(h2::Reason::CANCEL);
                return;
            }
            Some(None) => {
                let _ = to.send_data(Bytes::new(), true);
                return;
            }
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                let end_of_stream = body.is_end_stream();
                if !send_when_capacity(&mut to, data, end_of_stream).await || end_of_stream {
                    return;
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(trailers) = frame.into_trailers() {
            let _ = to.send_trailers(trailers);
            return;
        }
    }
}

/// Sends `data` on `to` once the peer's window has room for some of it (h2 sends the rest as
/// the window opens); `false` when the stream can take no more (reset or closed).
async fn send_when_capacity(to: &mut SendStream<Bytes>, data: Bytes, end_of_stream: bool) -> bool {
    if !data.is_empty() {
        // A claim of one byte, not the whole chunk: h2 raises it to what is buffered, and a
        // large claim would hold the connection's window against other streams.
        to.reserve_capacity(1);
        loop {
            match std::future::poll_fn(|cx| to.poll_capacity(cx)).await {
                Some(Ok(0)) => continue,
                Some(Ok(_)) => break,
                Some(Err(_)) | None => return false,
            }
        }
    }
    to.send_data(data, end_of_stream).is_ok()
}

/// Appends `ip` (the client's address) to the request's `X-Forwarded-For` list: one field,
/// earlier entries first. Without earlier entries (the usual case) the field is `ip` itself,
/// shared, not copied.
fn append_forwarded_for(headers: &mut http::HeaderMap, ip: HeaderValue) {
    if !headers.contains_key(&X_FORWARDED_FOR) {
        headers.insert(X_FORWARDED_FOR, ip);
        return;
    }
    let mut list = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(", ");
    if !list.is_empty() {
        list.push_str(", ");
    }
    list.push_str(ip.to_str().unwrap_or("unknown"));
    if let Ok(value) = HeaderValue::from_str(&list) {
        headers.insert(X_FORWARDED_FOR, value);
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
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
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
            Reply::Relayed(_) => SizeHint::default(),
        }
    }
}

/// An instance's response body (data, then trailers) that holds its request's reservation and
/// its stream's count on the connection: both released when the body ends or fails, or when
/// hyper drops it because the client reset the stream. Each chunk's flow-control capacity is given back to the instance as the chunk is
/// handed on; hyper then waits for the client's window before it asks for the next.
pub struct Held {
    body: RecvStream,
    data_done: bool,
    open: Option<(Reservation, OpenStream)>,
}

impl Held {
    fn new(body: RecvStream, reservation: Reservation, open: OpenStream) -> Self {
        let mut held = Self {
            body,
            data_done: false,
            open: Some((reservation, open)),
        };
        if held.body.is_end_stream() {
            held.open = None;
        }
        held
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
}

impl Body for Held {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.body.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.body.flow_control().release_capacity(data.len());
                    if this.body.is_end_stream() {
                        this.open = None;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    this.open = None;
                    return Poll::Ready(Some(Err(e)));
                }
                None => this.data_done = true,
            }
        }
        let trailers = ready!(this.body.poll_trailers(cx));
        this.open = None;
        Poll::Ready(trailers.transpose().map(|t| t.map(Frame::trailers)))
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
    fn a_target_without_scheme_or_authority_gets_them_for_the_instance() {
        let parts = |request: Request<()>| request.into_parts().0;
        let head = parts(
            Request::get("/a?b=1")
                .header(HOST, "web:80")
                .body(())
                .unwrap(),
        );
        assert_eq!(instance_uri(&head).unwrap(), "http://web:80/a?b=1");
        let head = parts(Request::get("https://v2.web/x").body(()).unwrap());
        assert_eq!(instance_uri(&head).unwrap(), "http://v2.web/x");
        let head = parts(Request::get("/").body(()).unwrap());
        assert!(instance_uri(&head).is_err(), "no authority at all");
    }

    #[test]
    fn forwarded_for_is_one_field_with_the_client_last() {
        let mut headers = http::HeaderMap::new();
        append_forwarded_for(&mut headers, HeaderValue::from_static("127.0.0.1"));
        assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
        headers.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        append_forwarded_for(&mut headers, HeaderValue::from_static("::1"));
        assert_eq!(
            headers
                .get_all("x-forwarded-for")
                .iter()
                .collect::<Vec<_>>(),
            ["127.0.0.1, 10.0.0.2, ::1"]
        );
    }
}
