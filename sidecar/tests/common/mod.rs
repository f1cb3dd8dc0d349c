//! Shared by the sidecar's integration tests: a real sidecar (`run()` on loopback port 0 with a
//! route table fed from disk, no directory), real HTTP/1.1 instances on loopback, real requests.
#![allow(dead_code)] // each test binary uses a part

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use usher_shared::routes::{Instance, InstanceState, RouteTable};
use usher_sidecar::{Config, Listeners};

/// How long `GET /slow` takes to answer.
pub const SLOW: Duration = Duration::from_millis(600);

/// A tiny HTTP/1.1 instance: `GET /` answers its name and the `X-Forwarded-For` it got
/// (keep-alive); `GET /slow` the same after [`SLOW`]; `GET /stream` sends a chunk every 50 ms
/// for 10 s.
pub async fn instance(name: &'static str) -> SocketAddr {
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

pub fn entry(id: &str, address: SocketAddr, capacity: u32) -> Instance {
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

pub struct Sidecar {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    _state: tempfile::TempDir,
}

/// Starts a sidecar whose directory is unreachable and whose table is `instances` (on disk).
pub async fn sidecar(instances: Vec<Instance>, queue_timeout: Duration) -> Sidecar {
    sidecar_with(instances, queue_timeout, Duration::from_secs(5)).await
}

/// [`sidecar`] with an `--instance-timeout`.
pub async fn sidecar_with(
    instances: Vec<Instance>,
    queue_timeout: Duration,
    instance_timeout: Duration,
) -> Sidecar {
    sidecar_configured(instances, |c| {
        c.queue_timeout = queue_timeout;
        c.instance_timeout = instance_timeout;
    })
    .await
}

/// Starts a sidecar whose directory is unreachable and whose table is `instances` (on disk),
/// with the defaults of these tests changed by `configure`.
pub async fn sidecar_configured(
    instances: Vec<Instance>,
    configure: impl FnOnce(&mut Config),
) -> Sidecar {
    let state = tempfile::tempdir().unwrap();
    usher_sidecar::replica::save(state.path(), &RouteTable::from_snapshot(1, 1, instances))
        .unwrap();
    // Any valid CA will do: nothing listens at the directory address.
    let ca_dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = operator_pki(ca_dir.path());
    let mut config = Config {
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
        queue_timeout: Duration::from_secs(2),
        max_queued: 100,
        instance_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(1),
        header_read_timeout: Duration::from_secs(30),
        max_header_size: 64 * 1024,
        max_connections: 512,
        threads: 1,
    };
    configure(&mut config);
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
pub fn operator_pki(
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
pub async fn get(proxy: SocketAddr, host: &str, path: &str) -> (u16, String) {
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

pub async fn routes(admin: SocketAddr) -> serde_json::Value {
    let (status, body) = get(admin, "localhost", "/v1/routes").await;
    assert_eq!(status, 200);
    serde_json::from_str(&body).unwrap()
}
