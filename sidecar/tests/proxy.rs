//! In-process tests of the proxy: `run()` on loopback port 0 with a route table fed from disk
//! (no directory), real HTTP/1.1 instances on loopback, real requests.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use usher_shared::metrics::sample;

#[tokio::test]
async fn spreads_requests_retries_unreachable_instances_and_ejects_them() {
    let a = instance("a").await;
    let b = instance("b").await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let s = sidecar(
        vec![entry("a", a, 4), entry("b", b, 4), entry("dead", dead, 4)],
        Duration::from_secs(2),
    )
    .await;
    let doc = routes(s.admin).await;
    assert_eq!(doc["source"], "disk");
    assert_eq!(doc["connected"], false);

    let mut seen = BTreeSet::new();
    for _ in 0..30 {
        let (status, body) = get(s.proxy, "web", "/").await;
        assert_eq!(status, 200, "{body}");
        let (name, xff) = body.split_once(' ').unwrap();
        assert_eq!(xff, "127.0.0.1", "X-Forwarded-For names the client");
        seen.insert(name.to_string());
    }
    assert_eq!(seen, BTreeSet::from(["a".to_string(), "b".to_string()]));
    let doc = routes(s.admin).await;
    let dead_entry = doc["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "dead")
        .unwrap();
    assert_eq!(dead_entry["ejected"], true);

    let (status, body) = get(s.proxy, "nope", "/").await;
    assert_eq!(status, 404);
    assert!(body.contains("nope"), "{body}");
    let (status, _) = get(s.proxy, "bad_host", "/").await;
    assert_eq!(status, 400);

    // GET /metrics counts the same requests.
    let text = metrics(s.admin).await;
    let web = r#"service="web",version="v1""#;
    let value = |series: String| {
        sample(&text, &series).unwrap_or_else(|| panic!("{series} not in\n{text}"))
    };
    assert_eq!(
        value(format!(
            r#"usher_sidecar_requests_total{{{web},outcome="answered"}}"#
        )),
        30.0
    );
    assert_eq!(
        value(format!(
            r#"usher_sidecar_requests_total{{{web},outcome="instance_failure"}}"#
        )),
        0.0
    );
    assert_eq!(
        value(format!("usher_sidecar_instance_failures_total{{{web}}}")),
        1.0,
        "the dead instance, once: then ejected"
    );
    assert_eq!(
        value(format!("usher_sidecar_ejected_instances{{{web}}}")),
        1.0,
        "the dead one"
    );
    assert_eq!(
        value(format!("usher_sidecar_in_flight_requests{{{web}}}")),
        0.0
    );
    assert_eq!(
        value(r#"usher_sidecar_unrouted_requests_total{code="404"}"#.into()),
        1.0
    );
    assert_eq!(
        value(r#"usher_sidecar_unrouted_requests_total{code="400"}"#.into()),
        1.0
    );
    assert_eq!(
        value("usher_sidecar_client_connections_accepted_total".into()),
        32.0
    );
    assert_eq!(
        value(r#"usher_sidecar_route_table_source{source="disk"}"#.into()),
        1.0
    );
    assert_eq!(value("usher_sidecar_directory_connected".into()), 0.0);
    s.shutdown.cancel();
    s.task.await.unwrap();
}

#[tokio::test]
async fn an_abandoned_streaming_response_releases_its_slot() {
    let a = instance("a").await;
    let s = sidecar(vec![entry("a", a, 1)], Duration::from_millis(300)).await;
    let in_flight = |doc: serde_json::Value| doc["instances"][0]["in_flight"].as_u64().unwrap();

    let mut client = TcpStream::connect(s.proxy).await.unwrap();
    client
        .write_all(b"GET /stream HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = client.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    assert_eq!(in_flight(routes(s.admin).await), 1);
    // The only slot is taken: another request waits, then gets 503.
    let (status, body) = get(s.proxy, "web", "/").await;
    assert_eq!(status, 503, "{body}");
    let text = metrics(s.admin).await;
    let web = r#"service="web",version="v1""#;
    for (series, expected) in [
        (
            format!(r#"usher_sidecar_requests_total{{{web},outcome="unavailable"}}"#),
            1.0,
        ),
        (format!("usher_sidecar_in_flight_requests{{{web}}}"), 1.0),
        (format!("usher_sidecar_queued_requests{{{web}}}"), 0.0),
    ] {
        assert_eq!(
            sample(&text, &series),
            Some(expected),
            "{series} in\n{text}"
        );
    }

    drop(client);
    let mut released = false;
    for _ in 0..100 {
        if in_flight(routes(s.admin).await) == 0 {
            released = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(released, "the slot leaked");
    assert_eq!(get(s.proxy, "web", "/").await.0, 200);
    s.shutdown.cancel();
    s.task.await.unwrap();
}

#[tokio::test]
async fn an_instance_that_dies_mid_request_is_retried_for_get() {
    // An instance that accepts and then closes every connection without answering.
    let rude = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rude_addr = rude.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = rude.accept().await {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
        }
    });
    let good = instance("good").await;
    let s = sidecar(
        vec![entry("rude", rude_addr, 8), entry("good", good, 8)],
        Duration::from_secs(2),
    )
    .await;
    for _ in 0..10 {
        let (status, body) = get(s.proxy, "web", "/").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("good"));
    }
    s.shutdown.cancel();
    s.task.await.unwrap();
}

#[tokio::test]
async fn shutdown_lets_the_request_in_flight_finish() {
    let a = instance("a").await;
    let s = sidecar(vec![entry("a", a, 4)], Duration::from_secs(2)).await;
    let proxy = s.proxy;
    let slow = tokio::spawn(async move { get(proxy, "web", "/slow").await });
    tokio::time::sleep(SLOW / 3).await;
    s.shutdown.cancel();
    let (status, body) = slow.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("a "), "{body}");
    tokio::time::timeout(Duration::from_secs(5), s.task)
        .await
        .expect("run() returns after the drain")
        .unwrap();
    assert!(
        TcpStream::connect(proxy).await.is_err(),
        "no new connections after shutdown"
    );
}

#[tokio::test]
async fn a_slow_instance_gets_504_naming_the_timeout() {
    let a = instance("a").await;
    let s = sidecar_with(
        vec![entry("a", a, 4)],
        Duration::from_secs(2),
        Duration::from_millis(200),
    )
    .await;
    let (status, body) = get(s.proxy, "web", "/slow").await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("did not answer within 200ms"), "{body}");
    assert_eq!(body.lines().count(), 1, "{body}");
    // The slot is back: a fast request still gets through.
    let (status, body) = get(s.proxy, "web", "/").await;
    assert_eq!(status, 200, "{body}");
    let doc = routes(s.admin).await;
    assert_eq!(doc["instances"][0]["in_flight"], 0);
    assert_eq!(
        doc["instances"][0]["ejected"], false,
        "a timeout is no ejection"
    );
    s.shutdown.cancel();
    s.task.await.unwrap();
}
