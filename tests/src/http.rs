//! A minimal HTTP/1.1 client for the tests: one connection per request, the request target
//! sent exactly as given (origin-form `/x` or absolute-form `http://web/x`).

use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A whole response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `X-Instance` header the test server sets.
    pub fn instance(&self) -> Option<String> {
        self.headers
            .get("x-instance")
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    }
}

/// GET `target` from `addr` with `Host: host`, within 30 s.
pub async fn get(addr: &str, host: &str, target: &str) -> Result<Response> {
    request(addr, "GET", host, target).await
}

/// Sends one bodiless request and reads the whole response, within 30 s.
pub async fn request(addr: &str, method: &str, host: &str, target: &str) -> Result<Response> {
    request_with(addr, method, host, target, &[]).await
}

/// As [`request`], with extra `(name, value)` headers (for example `Authorization`).
pub async fn request_with(
    addr: &str,
    method: &str,
    host: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> Result<Response> {
    tokio::time::timeout(Duration::from_secs(30), async {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let mut req = http::Request::builder()
            .method(method)
            .uri(target)
            .header(http::header::HOST, host);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req.body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Response {
            status,
            headers,
            body,
        })
    })
    .await
    .context("request timed out")?
}
