//! WebSockets (and any protocol an instance switches to with `101`) through a real sidecar on
//! loopback: a real WebSocket client (tokio-tungstenite) talks to a real WebSocket instance
//! through the proxy's tunnel; the tunnel holds its request's reservation until it closes, is
//! closed when idle or when the sidecar shuts down, and an instance that declines the upgrade
//! answers an ordinary request on a connection that stays usable, and one that switches a
//! request that asked for no switch is a `502`.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use usher_shared::metrics::sample;

/// How long a test waits for the next message or state before it fails.
const WAIT: Duration = Duration::from_secs(5);

/// The handshake heads a WebSocket instance received: each header as `name: value`,
/// lowercased names.
type Handshakes = Arc<Mutex<Vec<Vec<String>>>>;

/// A WebSocket instance named `name`: it answers every handshake and echoes each text message
/// as `name: text` and each binary message as it came.
async fn websocket_instance(name: &'static str) -> (SocketAddr, Handshakes) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = Handshakes::default();
    let seen = handshakes.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                // tungstenite's callback type: its error is a whole HTTP response.
                #[allow(clippy::result_large_err)]
                let record = |request: &Request, response: Response| {
                    let head = request
                        .headers()
                        .iter()
                        .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap_or("?")))
                        .collect();
                    seen.lock().unwrap().push(head);
                    Ok(response)
                };
                if let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, record).await {
                    usher_tests::websocket::echo(ws, name).await;
                }
            });
        }
    });
    (addr, handshakes)
}

/// A WebSocket client connected through the sidecar to `ws://web/chat`.
async fn connect(proxy: SocketAddr) -> WebSocketStream<TcpStream> {
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let (ws, response) =
        tokio::time::timeout(WAIT, tokio_tungstenite::client_async("ws://web/chat", tcp))
            .await
            .expect("the handshake through the sidecar")
            .expect("the handshake through the sidecar");
    assert_eq!(response.status(), 101);
    ws
}

async fn next(ws: &mut WebSocketStream<TcpStream>) -> Message {
    tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("a message in time")
        .expect("the tunnel is open")
        .expect("a message")
}

/// Waits until the instance `a` has `in_flight` reserved slots in the sidecar's table.
async fn wait_in_flight(admin: SocketAddr, in_flight: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let doc = routes(admin).await;
        if doc["instances"][0]["in_flight"] == in_flight {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "in_flight never {in_flight}: {doc}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_websocket_is_tunnelled_and_holds_its_reservation_until_it_closes() {
    let (address, handshakes) = websocket_instance("a").await;
    let s = sidecar(vec![entry("a", address, 2)], Duration::from_secs(2)).await;
    let mut ws = connect(s.proxy).await;

    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text("a: hello"));
    // Larger than one read of the tunnel (16 KiB), so it crosses in pieces.
    let data: Vec<u8> = (0..200_000).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(data.clone())).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::binary(data));

    let heads = handshakes.lock().unwrap().clone();
    assert_eq!(heads.len(), 1);
    let head = &heads[0];
    for field in [
        "upgrade: websocket",
        "connection: upgrade",
        "host: web",
        "x-forwarded-for: 127.0.0.1",
        "sec-websocket-version: 13",
    ] {
        assert!(head.iter().any(|h| h == field), "{field} not in {head:?}");
    }

    // Open: one slot of the instance reserved, one tunnel.
    wait_in_flight(s.admin, 1).await;
    let m = metrics(s.admin).await;
    assert_eq!(sample(&m, "usher_sidecar_tunnels"), Some(1.0));

    ws.close(None).await.unwrap();
    while let Some(Ok(message)) = tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
        assert!(message.is_close(), "{message:?}");
    }
    drop(ws);
    wait_in_flight(s.admin, 0).await;
    let m = metrics(s.admin).await;
    assert_eq!(sample(&m, "usher_sidecar_tunnels"), Some(0.0));
    assert_eq!(sample(&m, "usher_sidecar_tunnels_opened_total"), Some(1.0));
    // Counted when it ended, like every request.
    let answered =
        r#"usher_sidecar_requests_total{service="web",version="v1",outcome="answered"} 1"#;
    assert!(m.contains(answered), "{m}");

    s.shutdown.cancel();
    tokio::time::timeout(WAIT, s.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn an_instance_that_declines_the_upgrade_answers_as_usual() {
    let address = instance("plain").await;
    let s = sidecar(vec![entry("a", address, 2)], Duration::from_secs(2)).await;
    let mut c = TcpStream::connect(s.proxy).await.unwrap();
    let handshake = "GET /chat HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let expected = "HTTP/1.1 200 OK\r\ncontent-length: 15\r\n\r\nplain 127.0.0.1";
    for _ in 0..2 {
        // The same connection serves the next request: nothing was switched.
        c.write_all(handshake.as_bytes()).await.unwrap();
        let mut reply = vec![0; expected.len()];
        tokio::time::timeout(WAIT, c.read_exact(&mut reply))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&reply), expected);
    }
    let m = metrics(s.admin).await;
    assert_eq!(sample(&m, "usher_sidecar_tunnels_opened_total"), Some(0.0));
    s.shutdown.cancel();
    tokio::time::timeout(WAIT, s.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_and_its_slot_released() {
    let (address, _) = websocket_instance("a").await;
    let s = sidecar_configured(vec![entry("a", address, 1)], |c| {
        c.tunnel_idle_timeout = Duration::from_millis(400);
    })
    .await;
    let mut ws = connect(s.proxy).await;
    // Messages every 150 ms keep it open past the idle timeout.
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        ws.send(Message::text(format!("{i}"))).await.unwrap();
        assert_eq!(next(&mut ws).await, Message::text(format!("a: {i}")));
    }
    let quiet = Instant::now();
    let end = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    assert!(
        !matches!(end, Some(Ok(Message::Text(_)))),
        "the tunnel ended, not a message: {end:?}"
    );
    assert!(
        quiet.elapsed() >= Duration::from_millis(300),
        "{:?}",
        quiet.elapsed()
    );
    wait_in_flight(s.admin, 0).await;
    // The instance's one slot is free again.
    let mut again = connect(s.proxy).await;
    again.send(Message::text("back")).await.unwrap();
    assert_eq!(next(&mut again).await, Message::text("a: back"));
    s.shutdown.cancel();
    tokio::time::timeout(WAIT, s.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_closes_open_tunnels_at_once() {
    let (address, _) = websocket_instance("a").await;
    let s = sidecar(vec![entry("a", address, 2)], Duration::from_secs(2)).await;
    let mut ws = connect(s.proxy).await;
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text("a: hi"));

    let started = Instant::now();
    s.shutdown.cancel();
    // Well within the drain timeout that requests in flight get (10 s).
    tokio::time::timeout(Duration::from_secs(5), s.task)
        .await
        .expect("run() returns without waiting out the drain timeout for the tunnel")
        .unwrap();
    assert!(started.elapsed() < usher_sidecar::DRAIN_TIMEOUT / 2);
    let end = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    assert!(
        !matches!(end, Some(Ok(Message::Text(_)))),
        "the tunnel ended: {end:?}"
    );
}

#[tokio::test]
async fn a_switch_no_request_asked_for_is_an_instance_failure() {
    // An instance that answers every request `101`, asked or not.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = [0; 1024];
                let _ = stream.read(&mut head).await;
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                          Connection: upgrade\r\n\r\nsecret bytes",
                    )
                    .await;
                let _ = stream.read(&mut head).await;
            });
        }
    });
    let s = sidecar(vec![entry("a", address, 2)], Duration::from_secs(2)).await;
    let (status, body) = get(s.proxy, "web", "/").await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("asked no upgrade"), "{body}");
    assert!(!body.contains("secret"), "{body}");
    let m = metrics(s.admin).await;
    assert_eq!(sample(&m, "usher_sidecar_tunnels_opened_total"), Some(0.0));
    s.shutdown.cancel();
    tokio::time::timeout(WAIT, s.task).await.unwrap().unwrap();
}
