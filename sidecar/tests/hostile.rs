//! Hostile clients against a real sidecar on loopback: an oversized request head (`431`), a
//! slow-loris client and an idle one (closed after `--header-read-timeout`), more connections
//! than `--max-connections` (closed at once), a flood beyond `--max-queued` (`503` with
//! `Retry-After`). After each, ordinary requests still work and no slot is left reserved.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `raw` on a new connection and reads until the sidecar closes it (at most 5 s):
/// what came back, lossily as text (empty if nothing did).
async fn exchange(proxy: SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(raw).await.unwrap();
    read_until_closed(&mut s).await
}

/// Reads until the peer closes (a reset counts as closed), at most 5 s.
async fn read_until_closed(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the sidecar kept the connection open");
    String::from_utf8_lossy(&out).to_string()
}

/// Asserts the sidecar still proxies and holds no reservation.
async fn still_serves(s: &Sidecar) {
    let (status, body) = get(s.proxy, "web", "/").await;
    assert_eq!(status, 200, "{body}");
    let doc = routes(s.admin).await;
    assert_eq!(doc["instances"][0]["in_flight"], 0, "{doc}");
}

#[tokio::test]
async fn an_oversized_request_head_gets_431() {
    let a = instance("a").await;
    let s = sidecar_configured(vec![entry("a", a, 4)], |c| c.max_header_size = 4096).await;

    let big_header = format!(
        "GET / HTTP/1.1\r\nHost: web\r\nx-big: {}\r\n\r\n",
        "a".repeat(6000)
    );
    let reply = exchange(s.proxy, big_header.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 431 "), "{reply}");

    let long_line = format!("GET /{} HTTP/1.1\r\nHost: web\r\n\r\n", "p".repeat(6000));
    let reply = exchange(s.proxy, long_line.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 431 "), "{reply}");

    let many: String = (0..120).map(|i| format!("x-h{i}: 1\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\nHost: web\r\n{many}\r\n");
    assert!(many.len() < 4096);
    let reply = exchange(s.proxy, many.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 431 "), "{reply}");

    // Just under the limit is fine.
    let fits = format!(
        "GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\nx-big: {}\r\n\r\n",
        "a".repeat(3500)
    );
    let reply = exchange(s.proxy, fits.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 200 "), "{reply}");
    still_serves(&s).await;
    s.shutdown.cancel();
    s.task.await.unwrap();
}

#[tokio::test]
async fn slow_and_idle_clients_are_closed_after_the_header_read_timeout() {
    let a = instance("a").await;
    let timeout = Duration::from_millis(400);
    let s = sidecar_configured(vec![entry("a", a, 4)], |c| c.header_read_timeout = timeout).await;

    // Slow loris: a byte every 50 ms, never the end of the head.
    let started = Instant::now();
    let mut loris = TcpStream::connect(s.proxy).await.unwrap();
    loris
        .write_all(b"GET / HTTP/1.1\r\nHost: web\r\n")
        .await
        .unwrap();
    let closed = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if loris.write_all(b"x").await.is_err() || started.elapsed() > Duration::from_secs(5) {
            break started.elapsed();
        }
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(1), loris.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            _ => {}
        }
    };
    assert!(closed >= timeout, "closed after {closed:?}");
    assert!(closed < Duration::from_secs(3), "closed after {closed:?}");

    // Idle: connects and sends nothing.
    let started = Instant::now();
    let mut idle = TcpStream::connect(s.proxy).await.unwrap();
    let reply = read_until_closed(&mut idle).await;
    assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
    assert!(!reply.contains(" 200 "), "{reply}");
    still_serves(&s).await;
    s.shutdown.cancel();
    s.task.await.unwrap();
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_at_once() {
    let a = instance("a").await;
    let s = sidecar_configured(vec![entry("a", a, 4)], |c| c.max_connections = 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(s.proxy).await.unwrap());
    }
    let started = Instant::now();
    let reply = exchange(s.proxy, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n").await;
    assert_eq!(reply, "", "a connection over the limit gets no answer");
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(held);
    // The slots come back once the sidecar sees the held connections end.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reply = exchange(
            s.proxy,
            b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
        )
        .await;
        if reply.starts_with("HTTP/1.1 200 ") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slots never came back: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    still_serves(&s).await;
    s.shutdown.cancel();
    s.task.await.unwrap();
}

#[tokio::test]
async fn a_flood_beyond_the_queue_limit_gets_503_with_retry_after() {
    let a = instance("a").await;
    let s = sidecar_configured(vec![entry("a", a, 1)], |c| {
        c.max_queued = 2;
        c.queue_timeout = Duration::from_secs(10);
    })
    .await;
    let flood: Vec<_> = (0..12)
        .map(|_| {
            tokio::spawn(exchange(
                s.proxy,
                b"GET /slow HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
            ))
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for reply in flood {
        let reply = reply.await.unwrap().to_ascii_lowercase();
        if reply.starts_with("http/1.1 200 ") {
            ok += 1;
        } else {
            assert!(reply.starts_with("http/1.1 503 "), "{reply}");
            assert!(reply.contains("\r\nretry-after: 1\r\n"), "{reply}");
            assert!(reply.contains("queue full"), "{reply}");
            refused += 1;
        }
    }
    // One in flight and two queued at a time; the rest refused at once.
    assert!(ok >= 3, "{ok} served");
    assert!(refused >= 6, "{refused} refused");
    still_serves(&s).await;
    s.shutdown.cancel();
    s.task.await.unwrap();
}
