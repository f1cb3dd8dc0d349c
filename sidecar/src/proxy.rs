//! The HTTP/1.1 proxy (Waiter's router): determine the service version, reserve an instance,
//! send the request, stream the response back, release the instance when the body ends or the
//! client goes away. No directory round trip is on this path.
//!
//! A connection failure is retried on another instance and the instance is ejected; a
//! `GET`/`HEAD`/`OPTIONS` without a body whose instance fails before answering (it died
//! mid-request) is retried too. Errors a client can read, one line of text each: unknown
//! service `404`, no instance in time `503`, instance failure `502`, instance timeout `504`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE, HOST};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, debug_span, warn, Instrument};

use crate::pool::Pool;
use crate::replica::Replica;
use crate::reserver::{Reservation, ReserveError};
use crate::route::{decide, request_host};

/// The body type on both sides of the proxy: streamed, never buffered whole.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// A client must send a request's headers within this time (slow-loris defence).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Instances one request may try.
pub const MAX_ATTEMPTS: usize = 3;

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Timeouts and limits of the request path.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub queue_timeout: Duration,
    pub max_queued: usize,
    pub instance_timeout: Duration,
    pub connect_timeout: Duration,
}

/// The proxy's shared state.
pub struct Proxy {
    replica: Arc<Replica>,
    pool: Arc<Pool>,
    limits: Limits,
}

/// What the proxy keeps of a request to send it again.
struct Head {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Head {
    fn request(&self, body: Body) -> Request<Body> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// How one attempt on one instance failed.
enum Failure {
    /// Nothing was sent (the instance is unreachable): the request, body included, comes
    /// back for the next instance.
    NotSent {
        request: Box<Request<Body>>,
        reason: String,
    },
    /// The request was sent and the instance failed before answering.
    Failed(String),
    /// No response headers within the instance timeout.
    Timeout,
}

impl Proxy {
    pub fn new(replica: Arc<Replica>, limits: Limits) -> Self {
        Self {
            replica,
            pool: Arc::default(),
            limits,
        }
    }

    /// Proxies one request from `client`.
    pub async fn handle(&self, request: Request<Incoming>, client: SocketAddr) -> Response<Body> {
        let table = self.replica.table();
        let target =
            match request_host(request.uri(), request.headers()).and_then(|h| decide(&h, &table)) {
                Ok(target) => target,
                Err(e) => return error(e.status(), &e.to_string()),
            };
        let reserver = self.replica.reservers().get(&target, &table);
        drop(table);

        let (parts, body) = request.into_parts();
        let head = forwarded_head(parts.method, parts.uri, parts.headers, client);
        let replayable = matches!(head.method, Method::GET | Method::HEAD | Method::OPTIONS)
            && body.is_end_stream();
        let mut pending = Some(head.request(body.boxed()));
        let mut tried: Vec<String> = Vec::new();
        let mut last_failure = String::from("no instance answered");
        for _ in 0..MAX_ATTEMPTS {
            let mut reservation = match reserver
                .reserve(&tried, self.limits.queue_timeout, self.limits.max_queued)
                .await
            {
                Ok(reservation) => reservation,
                Err(ReserveError::NoOtherInstance { .. }) => break,
                Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
            };
            tried.push(reservation.id().to_string());
            let request = match pending.take() {
                Some(request) => request,
                None => head.request(empty()),
            };
            match self.attempt(&reservation, request).await {
                Ok((response, sender)) => {
                    reservation.succeeded();
                    return self.respond(response, reservation, sender);
                }
                Err(Failure::NotSent { request, reason }) => {
                    let period = reservation.failed();
                    warn!(instance = reservation.id(), address = %reservation.address(), reason = %reason,
                          ejected_for = ?period, "instance unreachable; retrying elsewhere");
                    last_failure = reason;
                    pending = Some(*request);
                }
                Err(Failure::Failed(reason)) => {
                    let period = reservation.failed();
                    warn!(instance = reservation.id(), address = %reservation.address(), reason = %reason,
                          ejected_for = ?period, replayable, "instance failed mid-request");
                    last_failure = reason;
                    if !replayable {
                        break;
                    }
                }
                Err(Failure::Timeout) => {
                    let message = format!(
                        "instance {} of {}/{} did not answer within {:?}",
                        reservation.id(),
                        target.service,
                        target.version,
                        self.limits.instance_timeout
                    );
                    return error(StatusCode::GATEWAY_TIMEOUT, &message);
                }
            }
        }
        error(
            StatusCode::BAD_GATEWAY,
            &format!(
                "instance failure for {}/{}: {last_failure}",
                target.service, target.version
            ),
        )
    }

    /// Sends `request` to the reserved instance over a pooled connection, or a new one if none
    /// is idle or the pooled one turns out closed.
    async fn attempt(
        &self,
        reservation: &Reservation,
        mut request: Request<Body>,
    ) -> Result<(Response<Incoming>, SendRequest<Body>), Failure> {
        let address = reservation.address();
        let mut pooled = self.pool.checkout(address).await;
        loop {
            let fresh = pooled.is_none();
            let mut sender = match pooled.take() {
                Some(sender) => sender,
                None => match Pool::connect(address, self.limits.connect_timeout).await {
                    Ok(sender) => sender,
                    Err(e) => {
                        return Err(Failure::NotSent {
                            request: Box::new(request),
                            reason: e.to_string(),
                        })
                    }
                },
            };
            let sent = tokio::time::timeout(
                self.limits.instance_timeout,
                sender.try_send_request(request),
            )
            .await;
            match sent {
                Err(_) => return Err(Failure::Timeout),
                Ok(Ok(response)) => return Ok((response, sender)),
                Ok(Err(mut e)) => match e.take_message() {
                    // A pooled connection the instance had closed: once more on a new one.
                    Some(unsent) if !fresh => request = unsent,
                    Some(unsent) => {
                        return Err(Failure::NotSent {
                            request: Box::new(unsent),
                            reason: e.into_error().to_string(),
                        })
                    }
                    None => return Err(Failure::Failed(e.into_error().to_string())),
                },
            }
        }
    }

    /// The instance's response, with hop-by-hop headers removed and a body that releases the
    /// reservation (and returns the connection to the pool) when it ends.
    fn respond(
        &self,
        response: Response<Incoming>,
        reservation: Reservation,
        sender: SendRequest<Body>,
    ) -> Response<Body> {
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let address = reservation.address();
        let body = Released::new(
            body,
            reservation,
            Some((self.pool.clone(), address, sender)),
        );
        Response::from_parts(parts, body.boxed())
    }
}

/// The request head as the instance gets it: origin-form URI, `Host` kept (or taken from an
/// absolute-form URI), hop-by-hop headers removed, the client appended to `X-Forwarded-For`.
fn forwarded_head(method: Method, uri: Uri, mut headers: HeaderMap, client: SocketAddr) -> Head {
    strip_hop_by_hop(&mut headers);
    if let Some(authority) = uri.authority() {
        if !headers.contains_key(HOST) {
            if let Ok(value) = HeaderValue::from_str(authority.as_str()) {
                headers.insert(HOST, value);
            }
        }
    }
    let origin = uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/")
        .parse::<Uri>()
        .unwrap_or_else(|_| Uri::from_static("/"));
    let forwarded_for = HeaderName::from_static("x-forwarded-for");
    let client_ip = client.ip().to_string();
    let value = match headers.get(&forwarded_for).and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {client_ip}"),
        None => client_ip,
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(forwarded_for, value);
    }
    Head {
        method,
        uri: origin,
        headers,
    }
}

/// Removes hop-by-hop headers, including those named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A one-line `text/plain` error reply.
pub fn error(status: StatusCode, message: &str) -> Response<Body> {
    debug!(
        status = status.as_u16(),
        reason = message,
        "refusing the request"
    );
    let body = Full::new(Bytes::from(format!("{message}\n")))
        .map_err(|never| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

type Pooled = (Arc<Pool>, SocketAddr, SendRequest<Body>);

/// A response body that holds the request's reservation: released when the body ends, fails,
/// or is dropped (the client went away). At a clean end the connection returns to the pool.
struct Released {
    inner: Incoming,
    reservation: Option<Reservation>,
    pooled: Option<Pooled>,
}

impl Released {
    fn new(inner: Incoming, reservation: Reservation, pooled: Option<Pooled>) -> Self {
        let mut body = Self {
            inner,
            reservation: Some(reservation),
            pooled,
        };
        if body.inner.is_end_stream() {
            body.finish(true);
        }
        body
    }

    fn finish(&mut self, reusable: bool) {
        self.reservation.take();
        if let Some((pool, address, sender)) = self.pooled.take() {
            if reusable {
                pool.put(address, sender);
            }
        }
    }
}

impl hyper::body::Body for Released {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            None => this.finish(true),
            Some(Err(_)) => this.finish(false),
            Some(Ok(_)) if this.inner.is_end_stream() => this.finish(true),
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Accepts client connections until `shutdown`; then each connection finishes its in-flight
/// request and closes (graceful shutdown). Connections are tracked by `tracker`.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (stream, client) = tokio::select! {
            _ = shutdown.cancelled() => return,
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
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(
            async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let proxy = proxy.clone();
                    let span =
                        debug_span!("request", method = %request.method(), uri = %request.uri());
                    async move { Ok::<_, Infallible>(proxy.handle(request, client).await) }
                        .instrument(span)
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::pin!(connection);
                let result = tokio::select! {
                    result = connection.as_mut() => result,
                    _ = shutdown.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        connection.as_mut().await
                    }
                };
                if let Err(e) = result {
                    debug!(error = %e, "client connection ended with an error");
                }
            }
            .instrument(debug_span!("client", %client)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_and_xff_appended() {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, "keep-alive, x-secret".parse().unwrap());
        headers.insert("x-secret", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert("transfer-encoding", "chunked".parse().unwrap());
        headers.insert("proxy-authorization", "Basic x".parse().unwrap());
        headers.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        headers.insert("accept", "*/*".parse().unwrap());
        let head = forwarded_head(
            Method::GET,
            "http://web:8080/a?b=1".parse().unwrap(),
            headers,
            "127.0.0.1:5555".parse().unwrap(),
        );
        assert_eq!(head.uri, "/a?b=1");
        assert_eq!(head.headers["host"], "web:8080");
        assert_eq!(head.headers["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(head.headers["accept"], "*/*");
        for gone in [
            "connection",
            "x-secret",
            "keep-alive",
            "transfer-encoding",
            "proxy-authorization",
        ] {
            assert!(!head.headers.contains_key(gone), "{gone}");
        }
    }

    #[test]
    fn errors_are_one_line_of_text() {
        let r = error(StatusCode::NOT_FOUND, "unknown service \"nope\"");
        assert_eq!(r.status(), 404);
        assert_eq!(r.headers()[CONTENT_TYPE], "text/plain; charset=utf-8");
    }
}
