//! The gRPC health check (`--health grpc[:SERVICE]`): one call of gRPC's standard health
//! service, `grpc.health.v1.Health/Check` (gRPC's `health-checking.md`; what Kubernetes'
//! `grpc` probes and `grpc_health_probe` call), over HTTP/2 without TLS, as a gRPC server on
//! localhost serves it.
//!
//! The messages are two protobuf fields, so they are written and read here rather than with
//! generated code: the request is `HealthCheckRequest { string service = 1; }`, the answer
//! `HealthCheckResponse { ServingStatus status = 1; }` with `SERVING = 1`. Each travels in
//! gRPC's length-prefixed framing (a compression flag byte, a 4-byte big-endian length).
//! The call passes only with HTTP status 200, `grpc-status: 0` and `SERVING`; anything else is
//! a failure that names what came instead (`NOT_SERVING`, gRPC's `NOT_FOUND` for a service
//! the server does not know, `UNIMPLEMENTED` for a server without the health service).

use std::net::SocketAddr;
use std::pin::pin;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use thiserror::Error;
use tokio::net::TcpStream;

/// The method called.
pub const CHECK_PATH: &str = "/grpc.health.v1.Health/Check";

/// Largest answer read, bytes (a `HealthCheckResponse` is 2).
const MAX_RESPONSE: usize = 64 * 1024;

/// `HealthCheckResponse.ServingStatus` as the server sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServingStatus {
    Unknown,
    Serving,
    NotServing,
    ServiceUnknown,
    /// A value this version of the protocol does not define.
    Other(u64),
}

impl ServingStatus {
    fn from_wire(value: u64) -> Self {
        match value {
            0 => ServingStatus::Unknown,
            1 => ServingStatus::Serving,
            2 => ServingStatus::NotServing,
            3 => ServingStatus::ServiceUnknown,
            other => ServingStatus::Other(other),
        }
    }
}

impl std::fmt::Display for ServingStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServingStatus::Unknown => f.write_str("UNKNOWN"),
            ServingStatus::Serving => f.write_str("SERVING"),
            ServingStatus::NotServing => f.write_str("NOT_SERVING"),
            ServingStatus::ServiceUnknown => f.write_str("SERVICE_UNKNOWN"),
            ServingStatus::Other(n) => write!(f, "status {n}"),
        }
    }
}

/// Why a gRPC health check failed (besides connecting and timing out, which
/// [`crate::health::CheckError`] names).
#[derive(Debug, Error)]
pub enum GrpcCheckError {
    #[error("HTTP/2 exchange failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("cannot build the health request: {0}")]
    Request(#[from] http::Error),
    #[error("{CHECK_PATH} answered HTTP status {0}")]
    Status(http::StatusCode),
    #[error("{CHECK_PATH} failed: grpc-status {code} {message:?}")]
    Call { code: String, message: String },
    #[error("{CHECK_PATH} answered no grpc-status")]
    NoStatus,
    #[error("the health response is malformed: {0}")]
    Malformed(&'static str),
    #[error("the service reports {0}")]
    NotServing(ServingStatus),
}

/// Calls `Health/Check` for `service` ("" for the server as a whole) at `addr`; passes on
/// `SERVING`. Not bounded in time: the caller bounds it.
pub async fn check(addr: SocketAddr, service: &str) -> Result<(), crate::health::CheckError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| crate::health::CheckError::Connect { addr, source })?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(GrpcCheckError::from)?;
    let request = Request::post(format!("http://{addr}{CHECK_PATH}"))
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .header(
            header::USER_AGENT,
            concat!("usher-agent/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(frame(&encode_request(service))))
        .map_err(GrpcCheckError::from)?;
    // The connection runs beside the call and is dropped (closing the socket) when it ends.
    let call = pin!(async move {
        let response = sender.send_request(request).await?;
        if response.status() != http::StatusCode::OK {
            return Err(GrpcCheckError::Status(response.status()));
        }
        let headers = response.headers().clone();
        let body = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|_| GrpcCheckError::Malformed("the body failed or exceeded 64 KiB"))?;
        // A call that fails at once may answer with its status in the headers only.
        let trailers = body.trailers().cloned().unwrap_or(headers);
        call_status(&trailers)?;
        let status = decode_response(body.to_bytes())?;
        if status == ServingStatus::Serving {
            Ok(())
        } else {
            Err(GrpcCheckError::NotServing(status))
        }
    });
    tokio::select! {
        called = call => called.map_err(Into::into),
        closed = connection => {
            let reason = match closed {
                Ok(()) => GrpcCheckError::Malformed("the connection closed before the answer"),
                Err(e) => GrpcCheckError::Http(e),
            };
            Err(reason.into())
        }
    }
}

/// `HealthCheckRequest { service }`: field 1, length-delimited, left out when empty.
fn encode_request(service: &str) -> Vec<u8> {
    let mut message = Vec::new();
    if !service.is_empty() {
        message.push(0x0a);
        put_varint(&mut message, service.len() as u64);
        message.extend_from_slice(service.as_bytes());
    }
    message
}

/// One gRPC message: uncompressed flag, 4-byte big-endian length, the message.
fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

/// The call's `grpc-status` (and `grpc-message`): `Ok` for `0`.
fn call_status(trailers: &HeaderMap) -> Result<(), GrpcCheckError> {
    let code = trailers
        .get("grpc-status")
        .ok_or(GrpcCheckError::NoStatus)?
        .to_str()
        .unwrap_or("?");
    if code == "0" {
        return Ok(());
    }
    let message = trailers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or_default();
    Err(GrpcCheckError::Call {
        code: code_name(code),
        message: message.to_string(),
    })
}

/// `5` → `5 NOT_FOUND` (gRPC's status codes), for the log.
fn code_name(code: &str) -> String {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    match code.parse::<usize>().ok().and_then(|n| NAMES.get(n)) {
        Some(name) => format!("{code} {name}"),
        None => code.to_string(),
    }
}

/// The status in the one `HealthCheckResponse` framed in `body`.
fn decode_response(mut body: Bytes) -> Result<ServingStatus, GrpcCheckError> {
    if body.len() < 5 {
        return Err(GrpcCheckError::Malformed("no message"));
    }
    if body.get_u8() != 0 {
        return Err(GrpcCheckError::Malformed(
            "the message is compressed, which the request did not allow",
        ));
    }
    let len = body.get_u32() as usize;
    if body.len() < len {
        return Err(GrpcCheckError::Malformed("the message is cut short"));
    }
    let mut message = body.split_to(len);
    // Fields in any order, unknown ones skipped; a missing status is its default, UNKNOWN.
    let mut status = 0;
    while message.has_remaining() {
        let key = get_varint(&mut message)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = get_varint(&mut message)?,
            (_, 0) => {
                get_varint(&mut message)?;
            }
            (_, 1) => skip(&mut message, 8)?,
            (_, 2) => {
                let len = get_varint(&mut message)?;
                skip(&mut message, usize::try_from(len).unwrap_or(usize::MAX))?;
            }
            (_, 5) => skip(&mut message, 4)?,
            _ => return Err(GrpcCheckError::Malformed("a field of an unknown wire type")),
        }
    }
    Ok(ServingStatus::from_wire(status))
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn get_varint(buf: &mut Bytes) -> Result<u64, GrpcCheckError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        if !buf.has_remaining() {
            return Err(GrpcCheckError::Malformed("a varint is cut short"));
        }
        let byte = buf.get_u8();
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(GrpcCheckError::Malformed("a varint longer than 10 bytes"))
}

fn skip(buf: &mut Bytes, n: usize) -> Result<(), GrpcCheckError> {
    if buf.len() < n {
        return Err(GrpcCheckError::Malformed("a field is cut short"));
    }
    buf.advance(n);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_framed_protobuf() {
        assert_eq!(&frame(&encode_request(""))[..], [0, 0, 0, 0, 0]);
        assert_eq!(
            &frame(&encode_request("echo"))[..],
            [0, 0, 0, 0, 6, 0x0a, 4, b'e', b'c', b'h', b'o']
        );
        let long = "s".repeat(200);
        let encoded = encode_request(&long);
        assert_eq!(&encoded[..3], [0x0a, 0xc8, 0x01]);
        assert_eq!(encoded.len(), 203);
    }

    #[test]
    fn responses_are_read_and_hostile_ones_refused() {
        let framed = |message: &[u8]| frame(message);
        assert_eq!(
            decode_response(framed(&[0x08, 0x01])).unwrap(),
            ServingStatus::Serving
        );
        assert_eq!(
            decode_response(framed(&[0x08, 0x02])).unwrap(),
            ServingStatus::NotServing
        );
        // Absent: the default, UNKNOWN; unknown fields of every wire type are skipped.
        assert_eq!(
            decode_response(framed(&[])).unwrap(),
            ServingStatus::Unknown
        );
        let noisy = [
            0x10, 0x05, 0x1a, 0x02, b'h', b'i', 0x25, 1, 2, 3, 4, 0x08, 0x01,
        ];
        assert_eq!(
            decode_response(framed(&noisy)).unwrap(),
            ServingStatus::Serving
        );
        for bad in [
            Bytes::from_static(&[0, 0, 0]),
            Bytes::from_static(&[1, 0, 0, 0, 2, 0x08, 0x01]),
            Bytes::from_static(&[0, 0, 0, 0, 9, 0x08, 0x01]),
            framed(&[0x08]),
            framed(&[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ]),
            framed(&[0x1a, 0x7f, 0x00]),
            framed(&[0x0b]),
        ] {
            assert!(decode_response(bad.clone()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn call_statuses_name_the_code() {
        let mut trailers = HeaderMap::new();
        assert!(matches!(
            call_status(&trailers),
            Err(GrpcCheckError::NoStatus)
        ));
        trailers.insert("grpc-status", "0".parse().unwrap());
        assert!(call_status(&trailers).is_ok());
        trailers.insert("grpc-status", "5".parse().unwrap());
        trailers.insert("grpc-message", "unknown service".parse().unwrap());
        let e = call_status(&trailers).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/grpc.health.v1.Health/Check failed: grpc-status 5 NOT_FOUND \"unknown service\""
        );
    }

    /// A gRPC health server over h2c (hyper, the messages written by hand): `""` is
    /// `SERVING`, `down` is `NOT_SERVING`, any other service gets gRPC's `NOT_FOUND` in a
    /// headers-only answer.
    async fn health_server() -> SocketAddr {
        use http::Response;
        use http_body_util::{combinators::BoxBody, Empty, StreamBody};
        use hyper::body::Frame;

        type Body = BoxBody<Bytes, std::convert::Infallible>;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper::service::service_fn(
                    |request: Request<hyper::body::Incoming>| async move {
                        assert_eq!(request.uri().path(), CHECK_PATH);
                        assert_eq!(request.headers()["content-type"], "application/grpc");
                        let asked = request.into_body().collect().await.unwrap().to_bytes();
                        let status: &[u8] = if asked == frame(&encode_request("")) {
                            &[0x08, 0x01]
                        } else if asked == frame(&encode_request("down")) {
                            &[0x08, 0x02]
                        } else {
                            let response = Response::builder()
                                .header("content-type", "application/grpc")
                                .header("grpc-status", "5")
                                .header("grpc-message", "unknown service")
                                .body(Empty::new().boxed())
                                .unwrap();
                            return Ok::<Response<Body>, std::convert::Infallible>(response);
                        };
                        let mut trailers = HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        let frames = [
                            Ok(Frame::data(frame(status))),
                            Ok(Frame::trailers(trailers)),
                        ];
                        let body = StreamBody::new(futures_util::stream::iter(frames));
                        Ok(Response::builder()
                            .header("content-type", "application/grpc")
                            .body(body.boxed())
                            .unwrap())
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_grpc_server_is_healthy_only_when_serving() {
        let addr = health_server().await;
        check(addr, "").await.unwrap();
        let e = check(addr, "down").await.unwrap_err().to_string();
        assert_eq!(e, "the service reports NOT_SERVING");
        let e = check(addr, "nope").await.unwrap_err().to_string();
        assert_eq!(
            e,
            "/grpc.health.v1.Health/Check failed: grpc-status 5 NOT_FOUND \"unknown service\""
        );
        // An HTTP/1 server is no gRPC server.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plain = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        assert!(check(plain, "").await.is_err());
    }
}
