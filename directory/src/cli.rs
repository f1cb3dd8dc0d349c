//! The client side of `usher-directory scale`: one HTTP request to a running directory's
//! admin port.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Bound on the whole exchange.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `method path` to the admin port at `admin`; returns the status and body text.
/// Errors name the address (nothing listening, timeout, broken reply).
pub async fn admin_request(
    admin: SocketAddr,
    method: Method,
    path: &str,
) -> Result<(http::StatusCode, String), String> {
    let exchange = async {
        let stream = TcpStream::connect(admin)
            .await
            .map_err(|e| format!("cannot reach the directory's admin port {admin}: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("admin port {admin}: {e}"))?;
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, admin.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("admin port {admin}: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("admin port {admin}: {e}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| format!("admin port {admin}: no answer within {TIMEOUT:?}"))?
}

/// The request `usher-directory scale TARGET INSTANCES` sends.
pub fn scale_request(target: &str, instances: &str) -> Result<(Method, String), String> {
    if instances == "release" {
        return Ok((Method::DELETE, format!("/v1/pins/{target}")));
    }
    let n: u32 = instances
        .parse()
        .map_err(|_| format!("{instances:?} is not a number of instances or `release`"))?;
    Ok((Method::PUT, format!("/v1/pins/{target}/{n}")))
}
