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
/// `tracker` so the caller can wait for them.
pub async fn serve(
    listener: TcpListener,
    handler: AdminHandler,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
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
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let reply = handler(&AdminRequest {
                        method: req.method(),
                        path: req.uri().path(),
                        query: req.uri().query().unwrap_or(""),
                        authorization: req
                            .headers()
                            .get(http::header::AUTHORIZATION)
                            .and_then(|v| v.to_str().ok()),
                    });
                    async move {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(reply.status)
                                .header(http::header::CONTENT_TYPE, reply.content_type)
                                .body(Full::new(reply.body))
                                .unwrap_or_default(),
                        )
                    }
                });
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
