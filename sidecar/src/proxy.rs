//! The HTTP/1.1 proxy (Waiter's router): determine the service version, reserve an instance,
//! send the request, stream the response back, release the instance when the body ends or the
//! client goes away. No directory round trip is on this path.
//!
//! A connection failure is retried on another instance and the instance is ejected; a
//! `GET`/`HEAD`/`OPTIONS` without a body whose instance fails before answering (it died
//! mid-request) is retried too. Errors a client can read, one line of text each: unknown
//! service `404`, no instance in time or queue full `503` (with `Retry-After`), instance
//! failure `502`, instance timeout `504`. Hyper itself answers a request head over
//! [`ClientLimits::max_header_size`] with `431` and closes a connection that does not send a
//! head within [`ClientLimits::header_read_timeout`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE, HOST, RETRY_AFTER};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use smallvec::SmallVec;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, debug_span, warn, Instrument};

use crate::pool::Pool;
use crate::replica::Replica;
use crate::reserver::{InstanceId, Reservation, ReserveError};
use crate::route::request_host;

/// The body type on both sides of the proxy: streamed, never buffered whole.
pub type Body = BoxBody<Bytes, hyper::Error>;

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
    /// How long a request waits for a free instance before `503`.
    pub queue_timeout: Duration,
    /// Requests that may wait per service version; beyond it `503` at once.
    pub max_queued: usize,
    pub instance_timeout: Duration,
    pub connect_timeout: Duration,
}

/// Limits on client connections, applied by [`serve`] with hyper's own knobs.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// Time to send a request head (line and headers); then the connection is closed.
    pub header_read_timeout: Duration,
    /// Largest request head in bytes; a larger one is answered `431` and the connection
    /// closed. More than 100 header fields is answered `431` too (hyper's default).
    pub max_header_size: usize,
    /// Connections served at once; beyond it a new connection is closed at once.
    pub max_connections: usize,
}

/// Seconds a `503` asks the client to wait before trying again (`Retry-After`): queues drain
/// and instances start within seconds.
pub const RETRY_AFTER_SECS: u32 = 1;

/// The proxy's shared state.
pub struct Proxy {
    replica: Arc<Replica>,
    pool: Arc<Pool>,
    limits: Limits,
}

/// What the proxy keeps of a request to send it again.
#[derive(Clone)]
struct Head {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Head {
    fn into_request(self, body: Body) -> Request<Body> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = self.headers;
        request
    }

    /// A copy of the request, for the first attempt or a replay.
    fn request(&self, body: Body) -> Request<Body> {
        self.clone().into_request(body)
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

    /// Proxies one request from the client whose address is `client_ip` (for
    /// `X-Forwarded-For`, formatted once per connection).
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        client_ip: &HeaderValue,
    ) -> Response<Body> {
        let routed = request_host(request.uri(), request.headers())
            .and_then(|host| self.replica.route(&host));
        let reserver = match routed {
            Ok(reserver) => reserver,
            Err(e) => return error(e.status(), &e.to_string()),
        };

        let (parts, body) = request.into_parts();
        let head = forwarded_head(parts.method, parts.uri, parts.headers, client_ip);
        let replayable = matches!(head.method, Method::GET | Method::HEAD | Method::OPTIONS)
            && body.is_end_stream();
        // A copy of the head is kept only for a request that may be sent again after its
        // instance failed; any other request comes back whole only when it was not sent.
        let (mut pending, replay) = if replayable {
            (Some(head.request(body.boxed())), Some(head))
        } else {
            (Some(head.into_request(body.boxed())), None)
        };
        let mut tried: SmallVec<[InstanceId; MAX_ATTEMPTS]> = SmallVec::new();
        let mut last_failure: Option<String> = None;
        for _ in 0..MAX_ATTEMPTS {
            let Some(request) = pending.take() else { break };
            let mut reservation = match reserver
                .reserve(&tried, self.limits.queue_timeout, self.limits.max_queued)
                .await
            {
                Ok(reservation) => reservation,
                Err(ReserveError::NoOtherInstance { .. }) => break,
                Err(e) => return unavailable(&e.to_string()),
            };
            tried.push(reservation.id().clone());
            match self.attempt(&reservation, request).await {
                Ok((response, sender)) => {
                    reservation.succeeded();
                    return self.respond(response, reservation, sender);
                }
                Err(Failure::NotSent { request, reason }) => {
                    let period = reservation.failed();
                    warn!(instance = &**reservation.id(), address = %reservation.address(), reason = %reason,
                          ejected_for = ?period, "instance unreachable; retrying elsewhere");
                    last_failure = Some(reason);
                    pending = Some(*request);
                }
                Err(Failure::Failed(reason)) => {
                    let period = reservation.failed();
                    warn!(instance = &**reservation.id(), address = %reservation.address(), reason = %reason,
                          ejected_for = ?period, replayable, "instance failed mid-request");
                    last_failure = Some(reason);
                    pending = replay.as_ref().map(|head| head.request(empty()));
                }
                Err(Failure::Timeout) => {
                    let message = format!(
                        "instance {} of {}/{} did not answer within {:?}",
                        reservation.id(),
                        reserver.service(),
                        reserver.version(),
                        self.limits.instance_timeout
                    );
                    return error(StatusCode::GATEWAY_TIMEOUT, &message);
                }
            }
        }
        error(
            StatusCode::BAD_GATEWAY,
            &format!(
                "instance failure for {}/{}: {}",
                reserver.service(),
                reserver.version(),
                last_failure.as_deref().unwrap_or("no instance answered")
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
fn forwarded_head(
    method: Method,
    uri: Uri,
    mut headers: HeaderMap,
    client_ip: &HeaderValue,
) -> Head {
    strip_hop_by_hop(&mut headers);
    let uri = match uri.authority() {
        // Origin form already, as clients send it when not using the sidecar as a proxy.
        None => uri,
        Some(authority) => {
            if !headers.contains_key(HOST) {
                if let Ok(value) = HeaderValue::from_str(authority.as_str()) {
                    headers.insert(HOST, value);
                }
            }
            uri.path_and_query()
                .map(|pq| pq.as_str())
                .unwrap_or("/")
                .parse::<Uri>()
                .unwrap_or_else(|_| Uri::from_static("/"))
        }
    };
    let forwarded_for = HeaderName::from_static("x-forwarded-for");
    let value = match headers.get(&forwarded_for).map(HeaderValue::to_str) {
        None => Some(client_ip.clone()),
        Some(Ok(earlier)) => {
            let client_ip = client_ip.to_str().unwrap_or_default();
            HeaderValue::from_str(&format!("{earlier}, {client_ip}")).ok()
        }
        // Not text: replaced by what this hop knows.
        Some(Err(_)) => Some(client_ip.clone()),
    };
    if let Some(value) = value {
        headers.insert(forwarded_for, value);
    }
    Head {
        method,
        uri,
        headers,
    }
}

/// Whether `name` (lowercase, as [`HeaderName`] keeps it) describes one hop only.
fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.contains(&name)
}

/// Removes hop-by-hop headers, including those named in `Connection`. One pass over the
/// names, and a removal only for those present (it runs twice per request).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut remove: SmallVec<[HeaderName; 4]> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name.as_str()))
        .cloned()
        .collect();
    if remove.is_empty() {
        return;
    }
    for value in headers.get_all(CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        for listed in value.split(',').map(str::trim) {
            if listed.is_empty() || HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(listed)) {
                continue; // empty, or a hop-by-hop name already in `remove` if present
            }
            if let Ok(name) = HeaderName::from_bytes(listed.as_bytes()) {
                remove.push(name);
            }
        }
    }
    for name in remove {
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

/// A `503` for a full queue or no instance in time, with `Retry-After`
/// ([`RETRY_AFTER_SECS`]).
pub fn unavailable(message: &str) -> Response<Body> {
    let mut response = error(StatusCode::SERVICE_UNAVAILABLE, message);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
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

/// The client's IP address as an `X-Forwarded-For` entry.
fn client_ip_header(client: SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&client.ip().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%client, limit = limits.max_connections, "too many client connections; closing");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let client_ip = client_ip_header(client);
        let shutdown = shutdown.clone();
        tracker.spawn(
            async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let proxy = proxy.clone();
                    let client_ip = client_ip.clone();
                    let span =
                        debug_span!("request", method = %request.method(), uri = %request.uri());
                    async move { Ok::<_, Infallible>(proxy.handle(request, &client_ip).await) }
                        .instrument(span)
                });
                let _slot = slot;
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(limits.header_read_timeout)
                    .max_header_size(limits.max_header_size)
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
            &client_ip_header("127.0.0.1:5555".parse().unwrap()),
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
