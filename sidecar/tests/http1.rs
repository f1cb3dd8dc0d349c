//! HTTP/1.1 semantics of the proxy against a real sidecar on loopback, with raw bytes on both
//! sides: a client that writes requests by hand and reads responses the way RFC 9112 says a
//! client must, and [`echo_instance`], a raw-TCP instance that records what reached it. Bodies
//! arrive exactly (Content-Length, chunked, close-delimited), connections stay usable after each
//! kind of response, pipelined requests are answered in order, smuggling attempts are refused
//! before they reach an instance, hop-by-hop headers stay on their hop. After each test the
//! sidecar still serves and holds no reservation.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a client waits for the sidecar's next bytes before the test fails.
const WAIT: Duration = Duration::from_secs(5);

/// How a response's body was delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body by rule: a `HEAD` response, `204`, `304`.
    None,
    Length,
    Chunked,
    /// Read until the sidecar closed the connection.
    Close,
}

/// A final response as a client decodes it.
struct Reply {
    /// The minor version: `1` for HTTP/1.1.
    version: u8,
    status: u16,
    /// Names lowercased, in order, repeats kept.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    framing: Framing,
    /// The interim (1xx) responses that came before it.
    interim: Vec<u16>,
}

impl Reply {
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn header(&self, name: &str) -> Option<&str> {
        let all = self.all(name);
        assert!(all.len() <= 1, "{name} came {} times: {self:?}", all.len());
        all.first().copied()
    }

    /// Whether a `Connection` field lists `token`.
    fn connection_lists(&self, token: &str) -> bool {
        self.all("connection").iter().any(|v| lists(v, token))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

impl std::fmt::Debug for Reply {
    /// The body as text, cut at 300 bytes, so a failure reads at a glance.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = &self.body[..self.body.len().min(300)];
        f.debug_struct("Reply")
            .field("version", &self.version)
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("framing", &self.framing)
            .field("interim", &self.interim)
            .field("body_len", &self.body.len())
            .field("body", &String::from_utf8_lossy(shown))
            .finish()
    }
}

/// A client connection to the sidecar.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(proxy: SocketAddr) -> Self {
        let stream = TcpStream::connect(proxy).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream.write_all(bytes.as_ref()).await.unwrap();
    }

    /// Sends `bytes` and reads the response.
    async fn request(&mut self, bytes: impl AsRef<[u8]>) -> Reply {
        self.send(bytes).await;
        self.reply(false).await
    }

    /// Reads more bytes within [`WAIT`]; `false` when the sidecar closed the connection.
    async fn fill(&mut self) -> bool {
        self.buf.reserve(64 * 1024);
        match tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.buf)).await {
            Err(_) => panic!(
                "nothing from the sidecar within {WAIT:?}; unparsed so far: {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(_)) => true,
        }
    }

    /// Reads one response head, or `None` if the connection ended before one began.
    async fn head(&mut self) -> Option<(u8, u16, Vec<(String, String)>)> {
        loop {
            let mut fields = [httparse::EMPTY_HEADER; 100];
            let mut parsed = httparse::Response::new(&mut fields);
            match parsed.parse(&self.buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let head = (
                        parsed.version.unwrap(),
                        parsed.code.unwrap(),
                        lowercase_fields(parsed.headers),
                    );
                    self.buf.drain(..len);
                    return Some(head);
                }
                Ok(httparse::Status::Partial) => {
                    if !self.fill().await {
                        assert!(
                            self.buf.is_empty(),
                            "the connection ended inside a response head: {:?}",
                            String::from_utf8_lossy(&self.buf)
                        );
                        return None;
                    }
                }
                Err(e) => panic!(
                    "not an HTTP/1.1 response ({e}): {:?}",
                    String::from_utf8_lossy(&self.buf[..self.buf.len().min(500)])
                ),
            }
        }
    }

    /// Takes one line (without CRLF) from the front of the buffer.
    async fn line(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8(self.buf[..end].to_vec()).unwrap();
                self.buf.drain(..end + 2);
                return line;
            }
            assert!(
                self.fill().await,
                "the connection ended inside a chunked body"
            );
        }
    }

    async fn exactly(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(
                self.fill().await,
                "the connection ended {} bytes into a body of {n}",
                self.buf.len()
            );
        }
        self.buf.drain(..n).collect()
    }

    /// Reads the next final response, skipping (and noting) interim ones, and decodes its
    /// body; `head_request` says the request was `HEAD`. Asserts the framing rules a server
    /// must follow (RFC 9112 §6.1-6.3).
    async fn reply(&mut self, head_request: bool) -> Reply {
        let mut interim = Vec::new();
        let (version, status, headers) = loop {
            let head = self.head().await;
            let (version, status, headers) = head.expect("the sidecar closed without a response");
            if (100..200).contains(&status) && status != 101 {
                interim.push(status);
                continue;
            }
            break (version, status, headers);
        };
        let mut reply = Reply {
            version,
            status,
            headers,
            body: Vec::new(),
            framing: Framing::None,
            interim,
        };
        let codings: Vec<String> = reply
            .all("transfer-encoding")
            .iter()
            .flat_map(|v| v.split(','))
            .map(|c| c.trim().to_ascii_lowercase())
            .filter(|c| !c.is_empty())
            .collect();
        let lengths: Vec<String> = reply
            .all("content-length")
            .iter()
            .map(|v| v.to_string())
            .collect();
        if !codings.is_empty() {
            assert!(
                lengths.is_empty(),
                "Content-Length and Transfer-Encoding together: {reply:?}"
            );
            assert!(
                status != 204 && status != 304,
                "Transfer-Encoding in a {status}: {reply:?}"
            );
        }
        if status == 204 {
            assert!(lengths.is_empty(), "Content-Length in a 204: {reply:?}");
        }
        if head_request || status == 204 || status == 304 {
            return reply;
        }
        if !codings.is_empty() {
            assert_eq!(
                codings.last().map(String::as_str),
                Some("chunked"),
                "{reply:?}"
            );
            reply.framing = Framing::Chunked;
            loop {
                let line = self.line().await;
                let size = line.split(';').next().unwrap().trim();
                let size = usize::from_str_radix(size, 16)
                    .unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
                if size == 0 {
                    while !self.line().await.is_empty() {}
                    break;
                }
                let data = self.exactly(size + 2).await;
                assert_eq!(&data[size..], b"\r\n", "a chunk not ended by CRLF");
                reply.body.extend_from_slice(&data[..size]);
            }
        } else if let Some(first) = lengths.first() {
            assert!(
                lengths.iter().all(|l| l == first),
                "Content-Length values differ: {reply:?}"
            );
            assert!(
                !first.is_empty() && first.bytes().all(|b| b.is_ascii_digit()),
                "{reply:?}"
            );
            reply.framing = Framing::Length;
            reply.body = self.exactly(first.parse().unwrap()).await;
        } else {
            reply.framing = Framing::Close;
            while self.fill().await {}
            reply.body = std::mem::take(&mut self.buf);
        }
        reply
    }

    /// Asserts the sidecar closes the connection within [`WAIT`] without sending more.
    async fn closed(&mut self) {
        while self.fill().await {}
        assert!(
            self.buf.is_empty(),
            "bytes after the response: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
    }
}

/// A sidecar in front of one [`echo_instance`] of `web` with 4 slots.
async fn setup() -> (Sidecar, Log) {
    let (address, log) = echo_instance().await;
    let s = sidecar(vec![entry("a", address, 4)], Duration::from_secs(2)).await;
    (s, log)
}

/// The last request the instance received.
fn last(log: &Log) -> Received {
    log.lock()
        .unwrap()
        .last()
        .cloned()
        .expect("the instance received nothing")
}

/// Asserts the sidecar still proxies, then that no reservation is left (allowing the release
/// up to 2 s after the response ended), and shuts it down.
async fn finish(s: Sidecar) {
    let (status, body) = get(s.proxy, "web", "/").await;
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let doc = routes(s.admin).await;
        if doc["instances"][0]["in_flight"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "a reservation was left: {doc}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), s.task)
        .await
        .expect("run() returns after shutdown")
        .unwrap();
}

/// `len` bytes that show any loss, duplication or reordering.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[tokio::test]
async fn content_length_bodies_arrive_exactly_and_the_connection_is_kept() {
    let (s, log) = setup().await;
    let mut c = Client::connect(s.proxy).await;

    let reply = c
        .request(b"POST /echo?small HTTP/1.1\r\nHost: web\r\nContent-Length: 11\r\n\r\nhello world")
        .await;
    assert_eq!((reply.version, reply.status), (1, 200), "{reply:?}");
    assert_eq!(reply.text(), "hello world");
    let got = last(&log);
    assert_eq!(
        (got.method.as_str(), got.target.as_str()),
        ("POST", "/echo?small")
    );
    assert_eq!(got.body, b"hello world");
    assert!(
        got.all("content-length").is_empty() || got.all("transfer-encoding").is_empty(),
        "{got:?}"
    );

    // 1 MiB in 64 KiB writes, on the same connection.
    let big = pattern(1 << 20);
    c.send(format!(
        "POST /echo?big HTTP/1.1\r\nHost: web\r\nContent-Length: {}\r\n\r\n",
        big.len()
    ))
    .await;
    for piece in big.chunks(64 * 1024) {
        c.send(piece).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let reply = c.reply(false).await;
    assert_eq!(reply.status, 200, "{:?}", reply.headers);
    assert_eq!(reply.body.len(), big.len());
    assert!(reply.body == big, "the echoed body differs");
    let got = last(&log);
    assert_eq!(got.target, "/echo?big");
    assert_eq!(got.body.len(), big.len());
    assert!(got.body == big, "the instance received a different body");

    // And a third request on the same connection.
    let reply = c
        .request(b"GET /echo?third HTTP/1.1\r\nHost: web\r\n\r\n")
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("x-target"), Some("/echo?third"));
    assert_eq!(log.lock().unwrap().len(), 3);
    drop(c);
    finish(s).await;
}

#[tokio::test]
async fn a_chunked_request_body_is_decoded_intact() {
    let (s, log) = setup().await;
    let mut c = Client::connect(s.proxy).await;
    c.send(b"POST /echo?chunked HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await;
    // Chunk boundaries, size lines and an extension split across writes.
    for piece in [
        "5\r\nhel",
        "lo\r\n",
        "1",
        "A;name=value\r\n",
        "abcdefghijklm",
        "nopqrstuvwxyz",
        "\r",
        "\n3\r\n, !\r\n",
        "0\r\n",
        "\r\n",
    ] {
        c.send(piece).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let expected = "helloabcdefghijklmnopqrstuvwxyz, !";
    let reply = c.reply(false).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.text(), expected);
    let got = last(&log);
    assert_eq!(got.target, "/echo?chunked");
    assert_eq!(String::from_utf8_lossy(&got.body), expected);

    // A chunked body ended by a trailer section, on the same connection.
    let reply = c
        .request(
            b"POST /echo?trailer HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n\
              4\r\nwxyz\r\n0\r\nx-checksum: 1\r\n\r\n",
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.text(), "wxyz");
    assert_eq!(last(&log).body, b"wxyz");

    let reply = c
        .request(b"GET /echo?after HTTP/1.1\r\nHost: web\r\n\r\n")
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("x-target"), Some("/echo?after"));
    assert_eq!(log.lock().unwrap().len(), 3);
    drop(c);
    finish(s).await;
}

#[tokio::test]
async fn a_chunked_response_is_relayed_and_the_connection_is_kept() {
    let (s, log) = setup().await;
    let mut c = Client::connect(s.proxy).await;
    let reply = c
        .request(b"GET /chunked HTTP/1.1\r\nHost: web\r\n\r\n")
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.text(), CHUNKS.concat());
    assert_ne!(
        reply.framing,
        Framing::Close,
        "a keep-alive client lost its connection: {reply:?}"
    );
    assert!(!reply.connection_lists("close"), "{reply:?}");

    let reply = c
        .request(b"GET /echo?after HTTP/1.1\r\nHost: web\r\n\r\n")
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("x-target"), Some("/echo?after"));
    assert_eq!(log.lock().unwrap().len(), 2);
    drop(c);
    finish(s).await;
}

#[tokio::test]
async fn head_204_and_304_responses_carry_no_body() {
    let (s, _log) = setup().await;
    let mut c = Client::connect(s.proxy).await;

    c.send(b"HEAD /head HTTP/1.1\r\nHost: web\r\n\r\n").await;
    let reply = c.reply(true).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.header("content-length"),
        Some(HEAD_LENGTH.to_string().as_str()),
        "the instance's Content-Length"
    );
    // Any body bytes after the head would break the next response's parse.
    let reply = c
        .request(b"GET /echo?after-head HTTP/1.1\r\nHost: web\r\n\r\n")
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("x-target"), Some("/echo?after-head"));

    let reply = c.request(b"GET /204 HTTP/1.1\r\nHost: web\r\n\r\n").await;
    assert_eq!(reply.status, 204, "{reply:?}");
    assert_eq!(reply.header("x-status"), Some("204"));

    let reply = c.request(b"GET /304 HTTP/1.1\r\nHost: web\r\n\r\n").await;
    assert_eq!(reply.status, 304, "{reply:?}");
    assert_eq!(reply.header("etag"), Some("\"v1\""));

    // The sidecar's own error to a HEAD has no body either.
    c.send(b"HEAD / HTTP/1.1\r\nHost: nope\r\n\r\n").await;
    let reply = c.reply(true).await;
    assert_eq!(reply.status, 404, "{reply:?}");

    let reply = c
        .request(b"GET /echo?last HTTP/1.1\r\nHost: web\r\n\r\n")
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("x-target"), Some("/echo?last"));
    drop(c);
    finish(s).await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let (s, log) = setup().await;
    let mut c = Client::connect(s.proxy).await;
    // The first is the slowest to answer.
    c.send(
        b"POST /echo?n=1&delay=300 HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\n\r\none\
          GET /echo?n=2 HTTP/1.1\r\nHost: web\r\n\r\n\
          POST /echo?n=3 HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nthree",
    )
    .await;
    let mut answers = Vec::new();
    for _ in 0..3 {
        let reply = c.reply(false).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        answers.push((reply.header("x-target").unwrap().to_string(), reply.text()));
    }
    assert_eq!(
        answers,
        [
            ("/echo?n=1&delay=300".to_string(), "one".to_string()),
            ("/echo?n=2".to_string(), String::new()),
            ("/echo?n=3".to_string(), "three".to_string()),
        ]
    );
    let mut seen: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.target.clone())
        .collect();
    seen.sort();
    assert_eq!(seen, ["/echo?n=1&delay=300", "/echo?n=2", "/echo?n=3"]);
    drop(c);
    finish(s).await;
}

#[tokio::test]
async fn http10_clients_get_unchunked_responses_and_keep_alive_only_when_told() {
    let (s, log) = setup().await;

    // No keep-alive: one response, then the sidecar closes.
    let mut c = Client::connect(s.proxy).await;
    let reply = c
        .request(b"POST /echo?v10 HTTP/1.0\r\nHost: web\r\nContent-Length: 4\r\n\r\nv1.0")
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.text(), "v1.0");
    assert_eq!(last(&log).body, b"v1.0");
    c.closed().await;

    // A chunked instance response is not sent chunked to an HTTP/1.0 client (RFC 9112 §6.1).
    let mut c = Client::connect(s.proxy).await;
    let reply = c
        .request(b"GET /chunked HTTP/1.0\r\nHost: web\r\n\r\n")
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_ne!(reply.framing, Framing::Chunked, "{reply:?}");
    assert_eq!(reply.text(), CHUNKS.concat());
    c.closed().await;

    // Keep-alive asked for: the connection persists only if the response says so.
    let mut c = Client::connect(s.proxy).await;
    let reply = c
        .request(
            b"POST /echo?ka HTTP/1.0\r\nHost: web\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nka",
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.text(), "ka");
    // A length-delimited response keeps the connection the client asked to keep.
    assert!(reply.connection_lists("keep-alive"), "{reply:?}");
    assert_eq!(reply.framing, Framing::Length, "{reply:?}");
    let reply = c
        .request(b"GET /echo?ka2 HTTP/1.0\r\nHost: web\r\nConnection: keep-alive\r\n\r\n")
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("x-target"), Some("/echo?ka2"));
    drop(c);
    finish(s).await;
}

#[tokio::test]
async fn expect_100_continue_gets_the_body_through() {
    let (s, log) = setup().await;
    let mut c = Client::connect(s.proxy).await;
    c.send(
        b"POST /echo?expect HTTP/1.1\r\nHost: web\r\nExpect: 100-continue\r\nContent-Length: 13\r\n\r\n",
    )
    .await;
    // Up to 1 s for the interim response; then the body goes anyway (RFC 9110 §10.1.1).
    let mut early = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut chunk = [0u8; 1024];
    while let Ok(read) = tokio::time::timeout_at(deadline, c.stream.read(&mut chunk)).await {
        let n = read.unwrap();
        assert!(n > 0, "the sidecar closed before the body was sent");
        early.extend_from_slice(&chunk[..n]);
        if early.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let got_100 = !early.is_empty();
    if got_100 {
        let text = String::from_utf8_lossy(&early);
        assert!(
            text.starts_with("HTTP/1.1 100"),
            "a final response before the body: {text:?}"
        );
    } else {
        eprintln!("no 100 Continue within 1 s; sending the body anyway");
    }
    c.buf.extend_from_slice(&early);
    c.send(b"body expected").await;
    let reply = c.reply(false).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.interim.iter().all(|&s| s == 100), "{reply:?}");
    assert!(!got_100 || !reply.interim.is_empty());
    assert_eq!(reply.text(), "body expected");
    assert_eq!(last(&log).body, b"body expected");

    let reply = c
        .request(b"GET /echo?after HTTP/1.1\r\nHost: web\r\n\r\n")
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("x-target"), Some("/echo?after"));
    drop(c);
    finish(s).await;
}

#[tokio::test]
async fn smuggling_attempts_get_400_and_never_reach_the_instance() {
    let (s, log) = setup().await;
    let attempts: [&[u8]; 10] = [
        // CL.TE / TE.CL: both framings (RFC 9112 §6.3: reject, or use chunked, and close).
        b"POST /smuggle/cl-te HTTP/1.1\r\nHost: web\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n\
          0\r\n\r\nGET /smuggle/inner HTTP/1.1\r\nHost: web\r\n\r\n",
        b"POST /smuggle/te-cl HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n\
          0\r\n\r\nGET /smuggle/inner HTTP/1.1\r\nHost: web\r\n\r\n",
        // Two different lengths, as two fields and as a list (§6.3: unrecoverable).
        b"POST /smuggle/two-lengths HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"POST /smuggle/length-list HTTP/1.1\r\nHost: web\r\nContent-Length: 5, 6\r\n\r\nhello!",
        // Not 1*DIGIT (RFC 9110 §8.6).
        b"POST /smuggle/alpha HTTP/1.1\r\nHost: web\r\nContent-Length: abc\r\n\r\nhello",
        b"POST /smuggle/plus HTTP/1.1\r\nHost: web\r\nContent-Length: +5\r\n\r\nhello",
        b"POST /smuggle/minus HTTP/1.1\r\nHost: web\r\nContent-Length: -1\r\n\r\nhello",
        // Chunked not the final coding (§6.3: 400 and close).
        b"POST /smuggle/gzip HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        // Two Host fields: each hop could route by another one (RFC 9112 §3.2: 400).
        b"GET /smuggle/two-hosts HTTP/1.1\r\nHost: web\r\nHost: other\r\n\r\n",
        // Whitespace between field name and colon (§5.1: 400).
        b"POST /smuggle/space HTTP/1.1\r\nHost: web\r\nTransfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\n\
          0\r\n\r\nGET /smuggle/inner HTTP/1.1\r\nHost: web\r\n\r\n",
    ];
    // Each attempt is checked on its own task so one failure does not hide the others.
    let mut failures = Vec::new();
    for raw in attempts {
        let request_line =
            String::from_utf8_lossy(raw.split(|&b| b == b'\r').next().unwrap()).to_string();
        let (proxy, log) = (s.proxy, log.clone());
        let checked = tokio::spawn(async move {
            let mut c = Client::connect(proxy).await;
            c.send(raw).await;
            let reply = c.reply(false).await;
            let seen: Vec<String> = log.lock().unwrap().drain(..).map(|r| r.target).collect();
            assert!(seen.is_empty(), "the instance received {seen:?}");
            assert_eq!(reply.status, 400, "{reply:?}");
            c.closed().await;
        })
        .await;
        if let Err(e) = checked {
            let panic = e.into_panic();
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|m| m.to_string()))
                .unwrap_or_default();
            failures.push(format!("{request_line}: {message}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    finish(s).await;
}

#[tokio::test]
async fn hop_by_hop_headers_stay_on_their_hop() {
    let (s, log) = setup().await;
    let mut c = Client::connect(s.proxy).await;
    let reply = c
        .request(
            b"GET /hop HTTP/1.1\r\nHost: web\r\n\
              Connection: x-secret\r\nConnection: x-other\r\nX-Secret: 1\r\nX-Other: 1\r\n\
              Keep-Alive: timeout=5\r\nProxy-Authorization: Basic dXNlcjpwYXNz\r\nTE: gzip\r\n\
              Upgrade: websocket\r\nX-Forwarded-For: 10.0.0.1\r\nX-End: 1\r\nAccept: text/plain\r\n\r\n",
        )
        .await;
    let got = last(&log);
    for gone in [
        "x-secret",
        "x-other",
        "keep-alive",
        "proxy-authorization",
        "upgrade",
    ] {
        assert!(
            got.all(gone).is_empty(),
            "{gone} reached the instance: {got:?}"
        );
    }
    assert!(
        !got.all("te").iter().any(|v| v.contains("gzip")),
        "the client's TE reached the instance: {got:?}"
    );
    assert!(
        !got.all("connection")
            .iter()
            .any(|v| lists(v, "x-secret") || lists(v, "x-other")),
        "{got:?}"
    );
    assert_eq!(got.header("x-end"), Some("1"), "{got:?}");
    assert_eq!(got.header("accept"), Some("text/plain"), "{got:?}");
    assert_eq!(got.header("host"), Some("web"), "{got:?}");
    assert_eq!(
        got.header("x-forwarded-for"),
        Some("10.0.0.1, 127.0.0.1"),
        "{got:?}"
    );

    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.text(), "ok");
    assert!(reply.all("x-resp").is_empty(), "{reply:?}");
    assert!(reply.all("keep-alive").is_empty(), "{reply:?}");
    assert!(!reply.connection_lists("x-resp"), "{reply:?}");
    assert_eq!(reply.header("x-end-resp"), Some("1"), "{reply:?}");

    let reply = c
        .request(b"GET /echo?after HTTP/1.1\r\nHost: web\r\n\r\n")
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        last(&log).header("x-forwarded-for"),
        Some("127.0.0.1"),
        "a fresh X-Forwarded-For per request"
    );
    drop(c);
    finish(s).await;
}

#[tokio::test]
async fn a_close_delimited_response_arrives_whole() {
    let (s, _log) = setup().await;
    let mut c = Client::connect(s.proxy).await;
    let reply = c
        .request(b"GET /close-delimited HTTP/1.1\r\nHost: web\r\n\r\n")
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.headers);
    let expected = close_delimited_pieces().concat();
    assert_eq!(reply.body.len(), expected.len(), "{:?}", reply.headers);
    assert!(reply.body == expected, "the body differs");
    // Relayed as it came: the end of the connection ends the body.
    assert_eq!(reply.framing, Framing::Close, "{:?}", reply.headers);
    assert!(reply.connection_lists("close"), "{:?}", reply.headers);
    drop(c);
    finish(s).await;
}

#[tokio::test]
async fn an_absolute_form_target_is_sent_in_origin_form() {
    let (s, log) = setup().await;
    let mut c = Client::connect(s.proxy).await;
    let reply = c.request(b"GET http://web/path?q=1 HTTP/1.1\r\n\r\n").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let got = last(&log);
    assert_eq!(got.target, "/path?q=1", "{got:?}");
    assert_eq!(got.header("host"), Some("web"), "{got:?}");

    let reply = c
        .request(b"GET http://web:8080/other HTTP/1.1\r\n\r\n")
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let got = last(&log);
    assert_eq!(got.target, "/other", "{got:?}");
    assert_eq!(got.header("host"), Some("web:8080"), "{got:?}");
    drop(c);
    finish(s).await;
}

#[tokio::test]
async fn an_absolute_form_target_overrides_the_host_header() {
    // RFC 9112 §3.2.2: the Host field is ignored and replaced by the target's authority.
    let (s, log) = setup().await;
    let mut c = Client::connect(s.proxy).await;
    let reply = c
        .request(b"GET http://web/x HTTP/1.1\r\nHost: other\r\n\r\n")
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let got = last(&log);
    assert_eq!(got.target, "/x", "{got:?}");
    assert_eq!(got.header("host"), Some("web"), "{got:?}");
    drop(c);
    finish(s).await;
}

#[tokio::test]
async fn a_request_head_in_tiny_writes_works() {
    let (s, log) = setup().await;
    let mut c = Client::connect(s.proxy).await;
    let raw = b"POST /echo?split HTTP/1.1\r\nHost: web\r\nContent-Length: 10\r\n\r\nsplit body";
    for byte in &raw[..20] {
        c.send([*byte]).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for piece in raw[20..].chunks(7) {
        c.send(piece).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let reply = c.reply(false).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.text(), "split body");
    let got = last(&log);
    assert_eq!(got.target, "/echo?split");
    assert_eq!(got.body, b"split body");
    drop(c);
    finish(s).await;
}
