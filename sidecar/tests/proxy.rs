//! In-process tests of the proxy: `run()` on loopback port 0 with a route table fed from disk
//! (no directory), real HTTP/1.1 instances on loopback, real requests.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use usher_shared::routes::{Instance, InstanceState, RouteTable};
use usher_sidecar::{Config, Listeners};

/// How long `GET /slow` takes to answer.
const SLOW: Duration = Duration::from_millis(600);

/// A tiny HTTP/1.1 instance: `GET /` answers its name and the `X-Forwarded-For` it got
/// (keep-alive); `GET /slow` the same after [`SLOW`]; `GET /stream` sends a chunk every 50 ms
/// for 10 s.
async fn instance(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 1024];
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        buf.drain(..end + 4);
                        if head.starts_with("GET /stream") {
                            let _ = stream
                                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                                .await;
                            for _ in 0..200 {
                                if stream.write_all(b"5\r\nchunk\r\n").await.is_err() {
                                    return;
                                }
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            return;
                        }
                        if head.starts_with("GET /slow") {
                            tokio::time::sleep(SLOW).await;
                        }
                        let xff = head
                            .lines()
                            .find_map(|l| l.strip_prefix("x-forwarded-for: "))
                            .unwrap_or("-")
                            .to_string();
                        let body = format!("{name} {xff}");
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if stream.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

fn entry(id: &str, address: SocketAddr, capacity: u32) -> Instance {
    Instance {
        service: "web".into(),
        version: "v1".into(),
        id: id.into(),
        address,
        capacity,
        weight: 1,
        state: InstanceState::Up,
        started_at_ms: 0,
        labels: BTreeMap::new(),
    }
}

struct Sidecar {
    proxy: SocketAddr,
    admin: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _state: tempfile::TempDir,
}

/// Starts a sidecar whose directory is unreachable and whose table is `instances` (on disk).
async fn sidecar(instances: Vec<Instance>, queue_timeout: Duration) -> Sidecar {
    sidecar_with(instances, queue_timeout, Duration::from_secs(5)).await
}

/// [`sidecar`] with an `--instance-timeout`.
async fn sidecar_with(
    instances: Vec<Instance>,
    queue_timeout: Duration,
    instance_timeout: Duration,
) -> Sidecar {
    let state = tempfile::tempdir().unwrap();
    usher_sidecar::replica::save(state.path(), &RouteTable::from_snapshot(1, 1, instances))
        .unwrap();
    // Any valid CA will do: nothing listens at the directory address.
    let ca_dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = operator_pki(ca_dir.path());
    let config = Config {
        directory: "127.0.0.1:9".into(),
        tls: usher_shared::enrolment::TlsSettings {
            ca: Some(ca),
            cert: Some((cert, key)),
            join_token: None,
            join_address: "127.0.0.1:10".into(),
        },
        listen: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        state_dir: state.path().to_path_buf(),
        queue_timeout,
        max_queued: 100,
        instance_timeout,
        connect_timeout: Duration::from_secs(1),
        threads: 1,
    };
    let proxy_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = proxy_listener.local_addr().unwrap();
    let admin = admin_listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        usher_sidecar::run(
            config,
            Listeners {
                proxy: proxy_listener,
                admin: admin_listener,
            },
            token,
        )
        .await
        .unwrap();
        drop(ca_dir);
    });
    Sidecar {
        proxy,
        admin,
        shutdown,
        task,
        _state: state,
    }
}

/// An operator's PKI standing in for the cluster CA: `(ca.pem, node.pem, node-key.pem)`, the
/// node certificate naming a sidecar.
fn operator_pki(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI("usher://sidecar".try_into().unwrap())];
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("node.pem"),
        dir.join("node-key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// Sends `GET path` with `Host: host` on a new connection; returns status and body.
async fn get(proxy: SocketAddr, host: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

async fn routes(admin: SocketAddr) -> serde_json::Value {
    let (status, body) = get(admin, "localhost", "/v1/routes").await;
    assert_eq!(status, 200);
    serde_json::from_str(&body).unwrap()
}

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
