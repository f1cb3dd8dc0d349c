//! The admin HTTP server every usher process runs (`/healthz`, `/v1/...`).
//!
//! Each binary supplies a handler from (method, path) to an [`AdminResponse`]; this module
//! owns the hyper plumbing, so the three admin ports behave the same way.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, Instrument};

/// A client must send a request's headers within this time.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Headers on every admin reply, whatever its content: nothing is cached (a `POST /v1/tokens`
/// reply holds a secret, every other reply is live state), no browser guesses a type, and a
/// page (the directory's dashboard) may run only its own script and style, fetch only from
/// its own origin, and not be framed or framed into.
pub const SECURITY_HEADERS: [(&str, &str); 4] = [
    ("cache-control", "no-store"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
         img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
];

/// An admin reply: status, content type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminResponse {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Bytes,
}

impl AdminResponse {
    /// `200` with `value` as pretty JSON.
    pub fn json<T: serde::Serialize>(value: &T) -> Self {
        match serde_json::to_vec_pretty(value) {
            Ok(mut body) => {
                body.push(b'\n');
                Self {
                    status: StatusCode::OK,
                    content_type: "application/json",
                    body: body.into(),
                }
            }
            Err(e) => Self::text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        }
    }

    /// A plain-text reply.
    pub fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: Bytes::from(body.into()),
        }
    }

    /// `404` naming the path.
    pub fn not_found(path: &str) -> Self {
        Self::text(StatusCode::NOT_FOUND, format!("no admin endpoint {path}\n"))
    }
}

/// Whether a `Host` header value names the machine by an IP address or as `localhost` (with or
/// without a port). A loopback admin port answers only such requests, so a web page whose
/// DNS name an attacker rebinds to 127.0.0.1 cannot read it from an operator's browser (DNS
/// rebinding); `curl`, Prometheus, load balancers and the `usher-directory` commands send the
/// address they dial.
pub fn host_is_address_or_localhost(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((ip, rest)) if rest.is_empty() || rest.starts_with(':') => ip,
            _ => return false,
        },
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// The reply to a request for a loopback admin port whose `Host` names something else; the
/// refusal is logged, since a browser sends it when a page tries DNS rebinding.
fn foreign_host(host: &str) -> AdminResponse {
    tracing::warn!(
        host,
        "admin request refused: its Host is neither localhost nor an IP address (a web page \
         trying DNS rebinding?)"
    );
    AdminResponse::text(
        StatusCode::MISDIRECTED_REQUEST,
        format!(
            "Host {host:?}: this admin port listens on loopback and answers requests for \
             localhost or an IP address only\n"
        ),
    )
}

/// The 404 or 405 for a request outside `known` paths or not a `GET`/`HEAD`; `None` when the
/// request may be answered.
pub fn refuse(method: &Method, path: &str, known: &[&str]) -> Option<AdminResponse> {
    if !known.contains(&path) {
        return Some(AdminResponse::not_found(path));
    }
    if method != Method::GET && method != Method::HEAD {
        return Some(AdminResponse::text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{path} answers GET only\n"),
        ));
    }
    None
}

/// What an admin handler sees of a request: no body (every admin endpoint takes its
/// arguments in the path or query).
#[derive(Debug, Clone, Copy)]
pub struct AdminRequest<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    /// The query string without `?` (empty if none).
    pub query: &'a str,
    /// The `Authorization` header, if present and valid UTF-8.
    pub authorization: Option<&'a str>,
}

impl AdminRequest<'_> {
    /// The token of an `Authorization: Bearer <token>` header.
    pub fn bearer(&self) -> Option<&str> {
        let value = self.authorization?.trim();
        let (scheme, token) = value.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then_some(token.trim())
    }

    /// The value of `key` in the query (`a=1&b=2`), if present; no percent-decoding.
    pub fn query_value(&self, key: &str) -> Option<&str> {
        self.query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }
}

/// What answers admin requests.
pub type AdminHandler = Arc<dyn Fn(&AdminRequest<'_>) -> AdminResponse + Send + Sync>;

/// Serves `handler` on `listener` until `shutdown` fires; connections are tracked by
/// `tracker` so the caller can wait for them. Every reply carries [`SECURITY_HEADERS`]; on a
/// loopback listener a request whose `Host` fails [`host_is_address_or_localhost`] gets `421` and never
/// reaches `handler`.
pub async fn serve(
    listener: TcpListener,
    handler: AdminHandler,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let loopback = listener
        .local_addr()
        .is_ok_and(|addr| addr.ip().is_loopback());
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, usually: back off instead of spinning.
                    debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(
            async move {
                let service = service_fn(move |req| answer(handler.clone(), loopback, req));
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                tokio::select! {
                    res = conn.as_mut() => if let Err(e) = res { debug!(error = %e, "admin connection error") },
                    _ = shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.as_mut().await;
                    }
                }
            }
            .instrument(tracing::debug_span!("admin", %peer)),
        );
    }
}

/// One admin request's answer: `421` for a loopback port asked for another host (see
/// [`serve`]), else the handler's reply, with [`SECURITY_HEADERS`].
///
/// The handler runs on the connection's task. Tried and dropped: running it on tokio's
/// blocking pool, so that the directory's `/v1/routes` of 10,000 instances (about 10 ms to
/// build and encode) would not hold up its runtime thread; on two CPUs that thread then
/// waited for the CPU instead (`docs/BENCHMARKS.md`, control plane, 2026-12-03 evening).
async fn answer(
    handler: AdminHandler,
    loopback: bool,
    req: http::Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |name| req.headers().get(name).map(|v| v.to_str().ok());
    let reply = match header(http::header::HOST) {
        Some(host) if loopback && !host.is_some_and(host_is_address_or_localhost) => {
            foreign_host(host.unwrap_or("(not text)"))
        }
        _ => handler(&AdminRequest {
            method: req.method(),
            path: req.uri().path(),
            query: req.uri().query().unwrap_or(""),
            authorization: header(http::header::AUTHORIZATION).flatten(),
        }),
    };
    let mut response = Response::builder()
        .status(reply.status)
        .header(http::header::CONTENT_TYPE, reply.content_type);
    for (name, value) in SECURITY_HEADERS {
        response = response.header(name, value);
    }
    Ok(response.body(Full::new(reply.body)).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn local_hosts_are_addresses_and_localhost() {
        for local in [
            "localhost",
            "LOCALHOST:7401",
            "127.0.0.1",
            "127.0.0.1:7401",
            "10.1.2.3:80",
            "[::1]",
            "[::1]:7401",
        ] {
            assert!(host_is_address_or_localhost(local), "{local}");
        }
        for foreign in [
            "evil.example",
            "evil.example:7401",
            "localhost.evil.example",
            "127.0.0.1.nip.io:7401",
            "[::1",
            "[::1]x",
            "",
        ] {
            assert!(!host_is_address_or_localhost(foreign), "{foreign}");
        }
    }

    /// One raw HTTP/1.1 request to `addr` with `Host: host`; the whole response as text.
    async fn raw_get(addr: std::net::SocketAddr, host: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    /// A loopback admin port refuses a request for another host name (a page whose DNS name
    /// was rebound to 127.0.0.1) before its handler sees it, and every reply carries the
    /// security headers.
    #[tokio::test]
    async fn a_loopback_port_answers_local_hosts_only() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = calls.clone();
        let handler: AdminHandler = Arc::new(move |_req| {
            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            AdminResponse::text(StatusCode::OK, "ok\n")
        });
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let server = tokio::spawn(serve(listener, handler, shutdown.clone(), tracker.clone()));

        let ok = raw_get(addr, &format!("127.0.0.1:{}", addr.port())).await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        let ok = raw_get(addr, "localhost").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        let refused = raw_get(addr, "rebound.evil.example:7401").await;
        assert!(refused.starts_with("HTTP/1.1 421"), "{refused}");
        assert!(
            refused.contains("answers requests for localhost"),
            "{refused}"
        );
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 2);
        for response in [&ok, &refused] {
            for (name, value) in SECURITY_HEADERS {
                assert!(
                    response.contains(&format!("{name}: {value}\r\n")),
                    "{response}"
                );
            }
        }
        shutdown.cancel();
        server.await.unwrap();
    }
}
