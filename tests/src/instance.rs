//! The service instance of the tests and the quickstart (`usher-test-server`, and in process
//! for the sidecar's tests): HTTP/1.1 and HTTP/2 without TLS (h2c with prior knowledge, as gRPC
//! servers speak it) on one port (hyper-util's `auto` server). Every response carries
//! `X-Instance: NAME`.
//!
//! - `GET /` -> `NAME\n`
//! - `GET /slow?ms=N` -> waits N ms, then `NAME\n`
//! - `GET /stream?chunks=N&ms=M` -> N chunks of `NAME\n`, M ms apart (a streaming body)
//! - `POST /echo` -> the request body, streamed back
//! - `GET /health` -> `ok\n`
//! - `GET /headers` -> the request's HTTP version, then each header field as `name: value`
//! - `POST /grpc` -> gRPC's shape: the request body streamed back with `content-type:
//!   application/grpc`, then the trailers `grpc-status: 0` and `x-instance: NAME`
//! - `GET /ws` with a WebSocket handshake (RFC 6455) -> `101`, then each text message is
//!   answered `NAME: text` and each binary message echoed

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

type Body = BoxBody<Bytes, hyper::Error>;

fn full(text: String) -> Body {
    Full::new(Bytes::from(text))
        .map_err(|never| match never {})
        .boxed()
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

/// Answers a WebSocket handshake `101` (hyper hands over the connection once it is sent) and
/// serves the socket in its own task; `None` for a request that is not a handshake.
fn websocket(req: &mut Request<Incoming>, name: &str) -> Option<Response<Body>> {
    let headers = req.headers();
    let asks = |field: &str, token: &str| {
        headers.get_all(field).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !(asks("connection", "upgrade") && asks("upgrade", "websocket")) {
        return None;
    }
    let key = headers.get("sec-websocket-key")?;
    let accept = derive_accept_key(key.as_bytes());
    let upgrading = hyper::upgrade::on(req);
    let name = name.to_string();
    tokio::spawn(async move {
        let Ok(upgraded) = upgrading.await else {
            return;
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        crate::websocket::echo(ws, &name).await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", accept)
        .body(full(String::new()))
        .ok()
}

async fn handle(mut req: Request<Incoming>, name: String) -> Result<Response<Body>, Infallible> {
    if req.uri().path() == "/ws" {
        if let Some(switching) = websocket(&mut req, &name) {
            return Ok(switching);
        }
    }
    let body = match (req.method().as_str(), req.uri().path()) {
        ("GET", "/health") => full("ok\n".into()),
        ("GET", "/headers") => {
            let mut text = format!("{:?}\n", req.version());
            for (field, value) in req.headers() {
                text.push_str(&format!("{field}: {}\n", value.to_str().unwrap_or("?")));
            }
            full(text)
        }
        ("GET", "/slow") => {
            let ms = query(&req, "ms").unwrap_or(100);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            full(format!("{name}\n"))
        }
        ("GET", "/stream") => {
            let chunks = query(&req, "chunks").unwrap_or(10);
            let ms = query(&req, "ms").unwrap_or(100);
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(1);
            let line = Bytes::from(format!("{name}\n"));
            tokio::spawn(async move {
                for _ in 0..chunks {
                    if tx.send(Ok(Frame::data(line.clone()))).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            });
            ChannelBody(rx).boxed()
        }
        ("POST", "/echo") => req.into_body().boxed(),
        ("POST", "/grpc") => {
            return Ok(Response::builder()
                .header("x-instance", name.clone())
                .header("content-type", "application/grpc")
                .body(
                    req.into_body()
                        .with_trailers(async move { Some(Ok(grpc_trailers(&name))) })
                        .boxed(),
                )
                .unwrap_or_default())
        }
        ("GET", _) => full(format!("{name}\n")),
        _ => {
            return Ok(Response::builder()
                .status(StatusCode::METHOD_NOT_ALLOWED)
                .header("x-instance", name)
                .body(full("method not allowed\n".into()))
                .unwrap_or_default())
        }
    };
    Ok(Response::builder()
        .header("x-instance", name)
        .body(body)
        .unwrap_or_default())
}

/// A response body fed chunk by chunk from a channel.
struct ChannelBody(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, hyper::Error>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.0.poll_recv(cx)
    }
}

/// gRPC's trailers for a call that succeeded, from instance `name`.
fn grpc_trailers(name: &str) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    if let Ok(name) = http::HeaderValue::from_str(name) {
        trailers.insert("x-instance", name);
    }
    trailers
}

/// Serves instance `name` on `listener` until the task is dropped: every connection in its
/// own task, HTTP/1.1 (with upgrades) or HTTP/2 as the client opens it.
pub async fn serve(listener: TcpListener, name: String) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let name = name.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, name.clone()));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Starts instance `name` on a free loopback port in a task of the current runtime.
pub async fn spawn(name: &str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let address = listener.local_addr().expect("a bound address");
    tokio::spawn(serve(listener, name.to_string()));
    address
}
