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
        tunnel_idle_timeout: Duration::from_secs(3600),
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

/// The sidecar's `GET /metrics` text.
pub async fn metrics(admin: SocketAddr) -> String {
    let (status, body) = get(admin, "localhost", "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// One request as [`echo_instance`] received it: the head as sent (header names lowercased,
/// in order, repeats kept) and the body after chunked decoding.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub target: String,
    /// The minor version: `1` for HTTP/1.1.
    pub version: u8,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether the body came chunked (else by `Content-Length`, or there was none).
    pub chunked: bool,
}

impl Received {
    /// The values of every field named `name` (lowercase).
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The value of the one field named `name` (lowercase); panics if it came more than once.
    pub fn header(&self, name: &str) -> Option<&str> {
        let all = self.all(name);
        assert!(all.len() <= 1, "{name} came {} times: {self:?}", all.len());
        all.first().copied()
    }
}

/// What [`echo_instance`] received, in order.
pub type Log = std::sync::Arc<std::sync::Mutex<Vec<Received>>>;

/// The pieces of `GET /chunked`'s body, each sent as one chunk ([`echo_instance`]).
pub const CHUNKS: [&str; 4] = ["first chunk;", " a second, longer chunk;", "x", " the end"];

/// The pieces of `GET /close-delimited`'s body, the connection closed after the last.
pub fn close_delimited_pieces() -> Vec<Vec<u8>> {
    (0..4u8)
        .map(|i| {
            (0..20_000u32)
                .map(|j| b'a' + ((j + u32::from(i)) % 26) as u8)
                .collect()
        })
        .collect()
}

/// The length `GET /head` and `HEAD /head` announce.
pub const HEAD_LENGTH: usize = 1234;

/// A raw-TCP HTTP/1.1 instance that parses requests the way a server must (httparse for the
/// head; `Transfer-Encoding: chunked` decoded, else `Content-Length`; `100 Continue` for
/// `Expect: 100-continue`; keep-alive unless the request says otherwise), records each request
/// in the returned [`Log`] and answers by path:
///
/// - `/chunked`: `200` with [`CHUNKS`] as chunks 20 ms apart (one with a chunk extension);
/// - `/head`: `200` with `Content-Length: HEAD_LENGTH` (and that many bytes unless `HEAD`);
/// - `/204`, `/304`: that status and no body (the `304` with the `Content-Length` of the
///   representation, as RFC 9110 §8.6 allows);
/// - `/close-delimited`: `200` without framing, [`close_delimited_pieces`] 20 ms apart, then
///   the connection closed;
/// - `/hop`: `200` `ok` with hop-by-hop headers (`Connection: x-resp`, `X-Resp`, `Keep-Alive`)
///   and an end-to-end `X-End-Resp: 1`;
/// - anything else (`/echo`, `/`): `200` with the request body as the body and
///   `X-Target: <target>`.
///
/// `?delay=<ms>` in the target waits that long before answering.
pub async fn echo_instance() -> (SocketAddr, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Log::default();
    let out = log.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(echo_connection(stream, log.clone()));
        }
    });
    (addr, out)
}

/// Reads more bytes into `buf`; `false` at the end of the stream or on an error.
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    buf.reserve(16 * 1024);
    !matches!(stream.read_buf(buf).await, Ok(0) | Err(_))
}

/// Whether a comma-separated field value lists `token` (case-insensitively).
/// Parsed header fields as (lowercased name, value as text) pairs.
pub fn lowercase_fields(fields: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    fields
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).to_string(),
            )
        })
        .collect()
}

pub fn lists(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Takes one line (without its CRLF) from the front of `buf`, reading more as needed.
async fn take_line(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = buf[..end].to_vec();
            buf.drain(..end + 2);
            return Some(line);
        }
        if !fill(stream, buf).await {
            return None;
        }
    }
}

/// Decodes a chunked body from the front of `buf` (trailer fields skipped).
pub async fn read_chunked(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = take_line(stream, buf).await?;
        let line = String::from_utf8(line).ok()?;
        let size = line.split(';').next()?.trim();
        let size = usize::from_str_radix(size, 16).ok()?;
        if size == 0 {
            // Trailer section: lines until an empty one.
            while !take_line(stream, buf).await?.is_empty() {}
            return Some(body);
        }
        while buf.len() < size + 2 {
            if !fill(stream, buf).await {
                return None;
            }
        }
        if &buf[size..size + 2] != b"\r\n" {
            return None;
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

async fn echo_connection(mut stream: TcpStream, log: Log) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        // The head.
        let (mut request, head_len) = loop {
            let mut fields = [httparse::EMPTY_HEADER; 100];
            let mut parsed = httparse::Request::new(&mut fields);
            match parsed.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let request = Received {
                        method: parsed.method.unwrap_or_default().to_string(),
                        target: parsed.path.unwrap_or_default().to_string(),
                        version: parsed.version.unwrap_or_default(),
                        headers: lowercase_fields(parsed.headers),
                        body: Vec::new(),
                        chunked: false,
                    };
                    break (request, len);
                }
                Ok(httparse::Status::Partial) => {
                    if !fill(&mut stream, &mut buf).await {
                        return;
                    }
                }
                Err(_) => {
                    let _ = stream
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    return;
                }
            }
        };
        buf.drain(..head_len);

        // The body: chunked wins over Content-Length (RFC 9112 §6.3).
        let chunked = request
            .all("transfer-encoding")
            .iter()
            .any(|v| lists(v, "chunked"));
        let length = request
            .all("content-length")
            .first()
            .map(|v| v.trim().parse::<usize>());
        let body_follows = chunked || matches!(length, Some(Ok(n)) if n > 0);
        let expects_100 = request
            .all("expect")
            .iter()
            .any(|v| lists(v, "100-continue"));
        if body_follows
            && buf.is_empty()
            && expects_100
            && stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
        {
            return;
        }
        if chunked {
            let Some(body) = read_chunked(&mut stream, &mut buf).await else {
                return;
            };
            request.body = body;
            request.chunked = true;
        } else {
            match length {
                None => {}
                Some(Ok(n)) => {
                    while buf.len() < n {
                        if !fill(&mut stream, &mut buf).await {
                            log.lock().unwrap().push(request);
                            return;
                        }
                    }
                    request.body = buf.drain(..n).collect();
                }
                Some(Err(_)) => {
                    log.lock().unwrap().push(request);
                    let _ = stream
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    return;
                }
            }
        }
        let connection: Vec<String> = request
            .all("connection")
            .iter()
            .map(|v| v.to_string())
            .collect();
        let keep_alive = if request.version == 0 {
            connection.iter().any(|v| lists(v, "keep-alive"))
        } else {
            !connection.iter().any(|v| lists(v, "close"))
        };
        log.lock().unwrap().push(request.clone());

        let (path, query) = request
            .target
            .split_once('?')
            .unwrap_or((request.target.as_str(), ""));
        if let Some(ms) = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("delay="))
            .and_then(|ms| ms.parse().ok())
        {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let connection_header = if keep_alive {
            if request.version == 0 {
                "connection: keep-alive\r\n"
            } else {
                ""
            }
        } else {
            "connection: close\r\n"
        };
        let written = match path {
            "/chunked" => {
                let mut ok = stream
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n{connection_header}transfer-encoding: chunked\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await
                    .is_ok();
                for (i, piece) in CHUNKS.iter().enumerate() {
                    let ext = if i == 1 { ";name=value" } else { "" };
                    let chunk = format!("{:x}{ext}\r\n{piece}\r\n", piece.len());
                    ok = ok && stream.write_all(chunk.as_bytes()).await.is_ok();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                ok && stream.write_all(b"0\r\n\r\n").await.is_ok()
            }
            "/head" => {
                let mut reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n{connection_header}content-length: {HEAD_LENGTH}\r\n\r\n"
                )
                .into_bytes();
                if request.method != "HEAD" {
                    reply.extend(std::iter::repeat_n(b'h', HEAD_LENGTH));
                }
                stream.write_all(&reply).await.is_ok()
            }
            "/204" => stream
                .write_all(format!("HTTP/1.1 204 No Content\r\nx-status: 204\r\n{connection_header}\r\n").as_bytes())
                .await
                .is_ok(),
            "/304" => stream
                .write_all(
                    format!("HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\n{connection_header}content-length: {HEAD_LENGTH}\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .is_ok(),
            "/close-delimited" => {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n")
                    .await;
                for piece in close_delimited_pieces() {
                    if stream.write_all(&piece).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let _ = stream.shutdown().await;
                return;
            }
            "/hop" => stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\nConnection: x-resp\r\nX-Resp: 1\r\nKeep-Alive: timeout=5\r\nX-End-Resp: 1\r\ncontent-length: 2\r\n\r\nok",
                )
                .await
                .is_ok(),
            _ => {
                let mut reply = format!(
                    "HTTP/1.1 200 OK\r\nx-target: {}\r\n{connection_header}content-length: {}\r\n\r\n",
                    request.target,
                    request.body.len()
                )
                .into_bytes();
                reply.extend_from_slice(&request.body);
                stream.write_all(&reply).await.is_ok()
            }
        };
        if !written || !keep_alive {
            let _ = stream.shutdown().await;
            return;
        }
    }
}
