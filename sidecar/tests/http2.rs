//! HTTP/2 without TLS (h2c, as gRPC clients speak it) through a real sidecar on loopback: a
//! real hyper HTTP/2 client, real instances that speak HTTP/1.1 and h2c on one port
//! (`usher_tests::instance`). The streams of one connection are routed and reserved one by
//! one, bodies and trailers stream both ways, a reset stream releases its slot, errors are
//! answered per stream, and HTTP/1 clients of the same port are unaffected.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use usher_sidecar::http2::PREFACE;

/// How long a test waits for the next answer or state before it fails.
const WAIT: Duration = Duration::from_secs(5);

type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// One HTTP/2 client connection to the sidecar (prior knowledge, no TLS).
async fn client(proxy: SocketAddr) -> SendRequest<Body> {
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

fn empty() -> Body {
    Full::new(Bytes::new()).boxed()
}

async fn send(
    sender: &SendRequest<Body>,
    method: &str,
    uri: &str,
    body: Body,
) -> Response<Incoming> {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .body(body)
        .unwrap();
    let mut sender = sender.clone();
    tokio::time::timeout(WAIT, sender.send_request(request))
        .await
        .expect("a response in time")
        .expect("a response")
}

/// A response's whole body as text, and its trailers.
async fn read(response: Response<Incoming>) -> (StatusCode, String, Option<HeaderMap>) {
    let status = response.status();
    let collected = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .expect("the body in time")
        .expect("the body");
    let trailers = collected.trailers().cloned();
    let text = String::from_utf8_lossy(&collected.to_bytes()).to_string();
    (status, text, trailers)
}

/// The instances' reserved slots, summed, from the sidecar's `GET /v1/routes`.
async fn in_flight(admin: SocketAddr) -> u64 {
    let doc = routes(admin).await;
    doc["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["in_flight"].as_u64().unwrap_or(0))
        .sum()
}

async fn wait_in_flight(admin: SocketAddr, n: u64) {
    let deadline = Instant::now() + WAIT;
    while in_flight(admin).await != n {
        assert!(
            Instant::now() < deadline,
            "in_flight never {n}: {}",
            routes(admin).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_streams_of_one_connection_are_spread_over_instances_with_their_trailers() {
    let a = usher_tests::instance::spawn("a").await;
    let b = usher_tests::instance::spawn("b").await;
    let s = sidecar(vec![entry("a", a, 8), entry("b", b, 8)], WAIT).await;
    let h2 = client(s.proxy).await;

    // 24 streams at once on one connection, each reserved on its own.
    let answers =
        futures_util::future::join_all((0..24).map(|_| async {
            read(send(&h2, "GET", "http://web/slow?ms=100", empty()).await).await
        }))
        .await;
    let mut by = std::collections::BTreeMap::<String, usize>::new();
    for (status, text, _) in answers {
        assert_eq!(status, 200, "{text}");
        *by.entry(text.trim().to_string()).or_default() += 1;
    }
    assert_eq!(by.keys().collect::<Vec<_>>(), ["a", "b"], "{by:?}");

    // The instance is spoken to in HTTP/2, with the client appended to X-Forwarded-For.
    let (status, text, _) = read(send(&h2, "GET", "http://web/headers", empty()).await).await;
    assert_eq!(status, 200);
    assert!(text.starts_with("HTTP/2.0\n"), "{text}");
    assert!(text.contains("x-forwarded-for: 127.0.0.1\n"), "{text}");

    // gRPC's shape: a streamed body echoed, then trailers. 6 MB is more than every HTTP/2
    // window on the way (64 KB initially, the instance's 1 MB per stream, the sidecar's 2 MB
    // per stream and 5 MB per connection to the instance), so it crosses only if each side
    // gives its window back as the body moves.
    let data: Vec<u8> = (0..6_000_000).map(|i| (i % 251) as u8).collect();
    let response = send(
        &h2,
        "POST",
        "http://web/grpc",
        Full::new(Bytes::from(data.clone())).boxed(),
    )
    .await;
    assert_eq!(response.headers()["content-type"], "application/grpc");
    let collected = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .expect("the body in time: a window not given back stalls it")
        .unwrap();
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(collected.to_bytes(), data);

    wait_in_flight(s.admin, 0).await;
    let m = metrics(s.admin).await;
    let answered =
        r#"usher_sidecar_requests_total{service="web",version="v1",outcome="answered"} 26"#;
    assert!(m.contains(answered), "{m}");
    s.shutdown.cancel();
    tokio::time::timeout(WAIT, s.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn bodies_stream_both_ways_as_they_come() {
    let a = usher_tests::instance::spawn("a").await;
    let s = sidecar(vec![entry("a", a, 2)], WAIT).await;
    let h2 = client(s.proxy).await;
    // A bidirectional stream: each message is echoed before the next is sent, so nothing
    // waits for a whole body on either side.
    let (mut tx, body) = Channel::<Bytes>::new(1);
    let response = send(&h2, "POST", "http://web/grpc", body.boxed()).await;
    let mut body = response.into_body();
    for i in 0..5 {
        let message = Bytes::from(format!("message {i}"));
        tx.send_data(message.clone()).await.unwrap();
        let frame = tokio::time::timeout(WAIT, body.frame())
            .await
            .expect("the echo before the request ends")
            .unwrap()
            .unwrap();
        assert_eq!(frame.into_data().unwrap(), message);
    }
    assert_eq!(in_flight(s.admin).await, 1, "the open stream holds a slot");
    drop(tx);
    let rest = body.collect().await.unwrap();
    assert_eq!(rest.trailers().unwrap()["grpc-status"], "0");
    wait_in_flight(s.admin, 0).await;
    s.shutdown.cancel();
    tokio::time::timeout(WAIT, s.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_reset_stream_releases_its_slot_and_the_others_go_on() {
    let a = usher_tests::instance::spawn("a").await;
    let s = sidecar(vec![entry("a", a, 4)], WAIT).await;
    let h2 = client(s.proxy).await;
    // Three long streaming responses (a chunk every 50 ms for 10 s).
    let mut streams = Vec::new();
    for _ in 0..3 {
        let response = send(&h2, "GET", "http://web/stream?chunks=200&ms=50", empty()).await;
        let mut body = response.into_body();
        let first = tokio::time::timeout(WAIT, body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(first.into_data().unwrap(), "a\n");
        streams.push(body);
    }
    wait_in_flight(s.admin, 3).await;
    // Dropping a response body resets its stream: its slot comes back, the others stay.
    drop(streams.pop());
    wait_in_flight(s.admin, 2).await;
    let next = tokio::time::timeout(WAIT, streams[0].frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.into_data().unwrap(), "a\n");
    drop(streams);
    wait_in_flight(s.admin, 0).await;
    // The connection still carries new streams.
    let (status, text, _) = read(send(&h2, "GET", "http://web/", empty()).await).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "a\n"));
    s.shutdown.cancel();
    tokio::time::timeout(WAIT, s.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn errors_are_answered_per_stream_and_unreachable_instances_are_retried() {
    let good = usher_tests::instance::spawn("good").await;
    // A port nothing listens on.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let s = sidecar(vec![entry("dead", dead, 4), entry("good", good, 4)], WAIT).await;
    let h2 = client(s.proxy).await;

    let (status, text, _) = read(send(&h2, "GET", "http://nope/", empty()).await).await;
    assert_eq!(status, 404);
    assert_eq!(text, "unknown service \"nope\"\n");
    let (status, _, _) = read(send(&h2, "GET", "http://v9.web/", empty()).await).await;
    assert_eq!(status, 404);
    // To a gRPC call, the same refusal is gRPC's status: trailers only, with the reason.
    let call = Request::post("http://nope/pkg.Service/Method")
        .header("content-type", "application/grpc")
        .body(empty())
        .unwrap();
    let answer = tokio::time::timeout(WAIT, h2.clone().send_request(call))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["grpc-status"], "12");
    assert_eq!(answer.headers()["grpc-message"], "unknown service \"nope\"");
    assert!(answer
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .is_empty());
    // Every request is answered by the good instance; the dead one is tried at most once
    // (then ejected) and never fails a request.
    for _ in 0..10 {
        let (status, text, _) = read(send(&h2, "GET", "http://web/", empty()).await).await;
        assert_eq!((status, text.as_str()), (StatusCode::OK, "good\n"));
    }
    let m = metrics(s.admin).await;
    assert!(
        m.contains(r#"usher_sidecar_ejected_instances{service="web",version="v1"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"usher_sidecar_unrouted_requests_total{code="404"} 3"#),
        "{m}"
    );
    s.shutdown.cancel();
    tokio::time::timeout(WAIT, s.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn an_instance_that_speaks_only_http1_is_a_502_not_an_ejection() {
    let plain = instance("plain").await;
    let s = sidecar(vec![entry("plain", plain, 4)], WAIT).await;
    let h2 = client(s.proxy).await;
    let (status, text, _) = read(send(&h2, "GET", "http://web/", empty()).await).await;
    assert_eq!(status, 502, "{text}");
    assert!(text.starts_with("instance failure for web/v1"), "{text}");
    // HTTP/1 clients of the same instance are not affected.
    let (status, body) = get(s.proxy, "web", "/").await;
    assert_eq!(status, 200, "{body}");
    let m = metrics(s.admin).await;
    assert!(
        m.contains(r#"usher_sidecar_ejected_instances{service="web",version="v1"} 0"#),
        "{m}"
    );
    s.shutdown.cancel();
    tokio::time::timeout(WAIT, s.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_lets_open_streams_finish_and_refuses_new_ones() {
    let a = usher_tests::instance::spawn("a").await;
    let s = sidecar(vec![entry("a", a, 4)], WAIT).await;
    let h2 = client(s.proxy).await;
    let slow = tokio::spawn({
        let h2 = h2.clone();
        async move { read(send(&h2, "GET", "http://web/slow?ms=600", empty()).await).await }
    });
    wait_in_flight(s.admin, 1).await;
    s.shutdown.cancel();
    // The GOAWAY reaches the client: a new stream on the connection is refused.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let request = Request::get("http://web/").body(empty()).unwrap();
    let refused = tokio::time::timeout(WAIT, h2.clone().send_request(request)).await;
    assert!(matches!(refused, Ok(Err(_))), "{refused:?}");
    let (status, text, _) = slow.await.unwrap();
    assert_eq!((status, text.as_str()), (StatusCode::OK, "a\n"));
    tokio::time::timeout(WAIT, s.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn http1_clients_are_told_apart_from_the_preface_however_it_arrives() {
    let a = usher_tests::instance::spawn("a").await;
    let s = sidecar(vec![entry("a", a, 4)], WAIT).await;
    // `POST` shares its first byte with the preface; `PRI` from an HTTP/1 client is not one.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = TcpStream::connect(s.proxy).await.unwrap();
    c.write_all(b"P").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.write_all(
        b"OST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    )
    .await
    .unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(reply.ends_with("hi"), "{reply}");

    // The preface in pieces is still HTTP/2.
    let mut c = TcpStream::connect(s.proxy).await.unwrap();
    for piece in PREFACE.chunks(5) {
        c.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The server's first frame is its SETTINGS (type 4).
    let mut frame = [0u8; 9];
    tokio::time::timeout(WAIT, c.read_exact(&mut frame))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(frame[3], 4, "{frame:?}");
    // (A client that answers no PING would hold a graceful shutdown up to the drain timeout.)
    drop(c);
    s.shutdown.cancel();
    tokio::time::timeout(WAIT, s.task).await.unwrap().unwrap();
}

/// An h2c instance that closes each connection (`GOAWAY`) after its first request.
async fn one_request_per_connection() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (served, mut first) = tokio::sync::mpsc::channel::<()>(1);
                let service = hyper::service::service_fn(move |_request| {
                    let served = served.clone();
                    async move {
                        let _ = served.try_send(());
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"once\n"),
                        )))
                    }
                });
                let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service);
                tokio::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => return,
                    _ = first.recv() => connection.as_mut().graceful_shutdown(),
                }
                let _ = connection.await;
            });
        }
    });
    address
}

/// An h2c instance that allows `streams` open streams per connection and answers each request
/// only when `answer` is notified; it counts the connections it accepted and the requests it
/// holds.
struct Gated {
    address: SocketAddr,
    connections: Arc<AtomicUsize>,
    holding: Arc<AtomicUsize>,
    answer: Arc<tokio::sync::Notify>,
}

async fn gated(streams: u32) -> Gated {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gated = Gated {
        address: listener.local_addr().unwrap(),
        connections: Arc::default(),
        holding: Arc::default(),
        answer: Arc::default(),
    };
    let (connections, holding, answer) = (
        gated.connections.clone(),
        gated.holding.clone(),
        gated.answer.clone(),
    );
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            connections.fetch_add(1, Ordering::SeqCst);
            let (holding, answer) = (holding.clone(), answer.clone());
            let service = hyper::service::service_fn(move |_request| {
                let (holding, answer) = (holding.clone(), answer.clone());
                async move {
                    let notified = answer.notified();
                    holding.fetch_add(1, Ordering::SeqCst);
                    notified.await;
                    holding.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"answered\n",
                    ))))
                }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .max_concurrent_streams(streams)
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    gated
}

#[tokio::test]
async fn an_instance_that_allows_fewer_streams_per_connection_than_slots_gets_more_connections() {
    let instance = gated(2).await;
    let s = sidecar(vec![entry("a", instance.address, 8)], WAIT).await;
    let h2 = client(s.proxy).await;
    // A first stream opens the connection and learns the instance's limit.
    let first = tokio::spawn({
        let h2 = h2.clone();
        async move { read(send(&h2, "GET", "http://web/", empty()).await).await }
    });
    wait_for(|| instance.holding.load(Ordering::SeqCst) == 1).await;
    instance.answer.notify_waiters();
    assert_eq!(first.await.unwrap().0, StatusCode::OK);
    // Six at once, with 8 slots: all six reach the instance, on three connections of two
    // streams each, rather than four of them waiting in the sidecar for the first two.
    let six: Vec<_> = (0..6)
        .map(|_| {
            let h2 = h2.clone();
            tokio::spawn(async move { read(send(&h2, "GET", "http://web/", empty()).await).await })
        })
        .collect();
    wait_for(|| instance.holding.load(Ordering::SeqCst) == 6).await;
    assert_eq!(instance.connections.load(Ordering::SeqCst), 3);
    instance.answer.notify_waiters();
    for answer in six {
        let (status, text, _) = answer.await.unwrap();
        assert_eq!((status, text.as_str()), (StatusCode::OK, "answered\n"));
    }
    s.shutdown.cancel();
    tokio::time::timeout(WAIT, s.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_burst_to_an_instance_without_a_connection_opens_one() {
    let instance = gated(100).await;
    let s = sidecar(vec![entry("a", instance.address, 16)], WAIT).await;
    let h2 = client(s.proxy).await;
    let burst: Vec<_> = (0..16)
        .map(|_| {
            let h2 = h2.clone();
            tokio::spawn(async move { read(send(&h2, "GET", "http://web/", empty()).await).await })
        })
        .collect();
    wait_for(|| instance.holding.load(Ordering::SeqCst) == 16).await;
    assert_eq!(instance.connections.load(Ordering::SeqCst), 1);
    instance.answer.notify_waiters();
    for answer in burst {
        assert_eq!(answer.await.unwrap().0, StatusCode::OK);
    }
    s.shutdown.cancel();
    tokio::time::timeout(WAIT, s.task).await.unwrap().unwrap();
}

/// Waits until `done` holds, or fails the test after [`WAIT`].
async fn wait_for(done: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "never came to pass");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_instance_that_closes_its_connection_gets_a_new_one_without_a_failure() {
    let address = one_request_per_connection().await;
    let s = sidecar(vec![entry("a", address, 4)], WAIT).await;
    let h2 = client(s.proxy).await;
    // Each request finds the connection of the one before closing or closed: a race the
    // sidecar must win every time (a send on a closing connection comes back unsent).
    for _ in 0..40 {
        let (status, text, _) = read(send(&h2, "GET", "http://web/", empty()).await).await;
        assert_eq!((status, text.as_str()), (StatusCode::OK, "once\n"));
    }
    let m = metrics(s.admin).await;
    assert!(
        m.contains(r#"usher_sidecar_instance_failures_total{service="web",version="v1"} 0"#),
        "{m}"
    );
    s.shutdown.cancel();
    tokio::time::timeout(WAIT, s.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_client_that_answers_no_ping_is_closed_and_an_idle_one_stays() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = usher_tests::instance::spawn("a").await;
    let s = sidecar_configured(vec![entry("a", a, 4)], |c| {
        c.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    // The preface and an empty SETTINGS frame, then silence: PINGs go unanswered.
    let mut silent = TcpStream::connect(s.proxy).await.unwrap();
    silent.write_all(PREFACE).await.unwrap();
    silent
        .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    let started = Instant::now();
    let mut sink = Vec::new();
    tokio::time::timeout(WAIT, silent.read_to_end(&mut sink))
        .await
        .expect("the sidecar closes a connection whose PINGs go unanswered")
        .ok();
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "closed after {:?}, before a PING could be answered",
        started.elapsed()
    );
    // A real client answers by itself: idle for several PING rounds, still usable.
    let h2 = client(s.proxy).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, text, _) = read(send(&h2, "GET", "http://web/", empty()).await).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "a\n"));
    s.shutdown.cancel();
    tokio::time::timeout(WAIT, s.task).await.unwrap().unwrap();
}
