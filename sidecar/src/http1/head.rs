//! HTTP/1.1 message heads as the proxy reads and forwards them: parsed by `httparse`, checked
//! for how their body is delimited (RFC 9112 §6), and rewritten for the next hop into a
//! reusable buffer, so a request costs no allocation and no header map.
//!
//! What the next hop never sees (RFC 9110 §7.6.1): the hop-by-hop fields in [`HOP_BY_HOP`] and
//! every field the `Connection` header names. The proxy adds `X-Forwarded-For` (the client's
//! address appended to any earlier list), `Host` for an absolute-form request without one, and
//! `Transfer-Encoding` / `Connection` as its own framing of each hop needs.
//!
//! Protocol upgrades (RFC 9110 §7.8, WebSocket's handshake, RFC 6455 §4): an HTTP/1.1 request
//! without a body whose `Connection` names `upgrade` keeps its `Upgrade` field and is sent with
//! `Connection: upgrade`; the instance's `101 Switching Protocols` to it is relayed the same
//! way, and the proxy then tunnels the connection ([`crate::tunnel`]). Any other `Upgrade` is
//! dropped like every hop-by-hop field, so the instance answers an ordinary request.

use std::borrow::Cow;

use httparse::{Header, Status, EMPTY_HEADER};
use smallvec::SmallVec;
use thiserror::Error;

use crate::route::{request_host, RouteError};

/// Header fields a head may have; one more is answered `431` (hyper's and nginx's order of
/// magnitude).
pub const MAX_HEADERS: usize = 100;

/// Fields that describe one hop, never forwarded (RFC 9110 §7.6.1).
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// How a message's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the sender closes the connection (responses only).
    UntilClose,
}

/// Why a head was refused; each maps to a status ([`HeadError::status`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HeadError {
    #[error("request head larger than {0} bytes")]
    TooLarge(usize),
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("malformed head: {0}")]
    Malformed(httparse::Error),
    #[error("both Content-Length and Transfer-Encoding (refused: request smuggling)")]
    AmbiguousLength,
    #[error("invalid Content-Length {0:?}")]
    BadContentLength(String),
    #[error("Transfer-Encoding {0:?} does not end with chunked, so the body has no end")]
    BadTransferEncoding(String),
    #[error(
        "request target {0:?} is neither origin form (/path) nor absolute form (http://host/path)"
    )]
    BadTarget(String),
    #[error("CONNECT is not supported: the sidecar proxies HTTP requests, not tunnels")]
    Connect,
    #[error("more than one Host field")]
    DuplicateHost,
    #[error("101 Switching Protocols without an Upgrade field")]
    SwitchWithoutUpgrade,
}

impl HeadError {
    /// `431` for a head over the limits, `501` for `CONNECT`, `400` for the rest (RFC 9112
    /// §6.3: a request whose last transfer coding is not `chunked` is a `400`).
    pub fn status(&self) -> u16 {
        match self {
            HeadError::TooLarge(_) | HeadError::TooManyHeaders => 431,
            HeadError::Connect => 501,
            _ => 400,
        }
    }
}

impl From<httparse::Error> for HeadError {
    fn from(e: httparse::Error) -> Self {
        match e {
            httparse::Error::TooManyHeaders => HeadError::TooManyHeaders,
            e => HeadError::Malformed(e),
        }
    }
}

/// What the proxy keeps of a client's request head once it has been rewritten.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead {
    /// Bytes of the head (line, fields, empty line) at the start of the buffer.
    pub len: usize,
    /// `GET`, `HEAD` or `OPTIONS`: safe to send again to another instance when it has no body.
    pub idempotent: bool,
    /// `HEAD`: the response has no body whatever its fields say.
    pub head_method: bool,
    /// HTTP/1.0 (no chunked responses; keep-alive only when asked for).
    pub http10: bool,
    /// The client wants the connection kept after this exchange.
    pub keep_alive: bool,
    pub framing: Framing,
    /// The request asks to switch protocols (an HTTP/1.1 request without a body, `Upgrade`
    /// named in `Connection`) and is forwarded with its `Upgrade` field.
    pub upgrade: bool,
}

/// A request head read from the client, its rewrite for the instance already in the output
/// buffer; `host` borrows the client's buffer (see [`parse_request`]).
pub struct ParsedRequest<'a> {
    pub head: RequestHead,
    pub host: Result<Cow<'a, str>, RouteError>,
}

/// Parses the request head at the start of `input` and, if it is complete, writes the head the
/// instance gets into `out` (cleared first): origin-form target, `HTTP/1.1`, hop-by-hop fields
/// removed (but an upgrade's `Upgrade`, see the module), `client_ip` appended to
/// `X-Forwarded-For`.
///
/// `Ok(None)`: the head is not complete yet (the caller enforces the size limit). Errors: a
/// malformed head, more than [`MAX_HEADERS`] fields, an ambiguous or invalid body length
/// (both `Content-Length` and `Transfer-Encoding`, differing or non-numeric lengths), a
/// last transfer coding other than `chunked`, two `Host` fields, `CONNECT`, an authority- or
/// unknown-form target.
pub fn parse_request<'a>(
    input: &'a [u8],
    client_ip: &[u8],
    out: &mut Vec<u8>,
) -> Result<Option<ParsedRequest<'a>>, HeadError> {
    let mut fields = [EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut fields);
    let len = match request.parse(input)? {
        Status::Complete(len) => len,
        Status::Partial => return Ok(None),
    };
    let (Some(method), Some(target), Some(version)) =
        (request.method, request.path, request.version)
    else {
        return Ok(None);
    };
    if method == "CONNECT" {
        return Err(HeadError::Connect);
    }
    let fields = &*request.headers;
    let connection = Connection::of(fields);
    let (framing, coding) = request_framing(fields)?;
    let http10 = version == 0;
    let keep_alive = if http10 {
        connection.keep_alive
    } else {
        !connection.close
    };
    // RFC 9110 §7.8: HTTP/1.0 cannot upgrade; a body would have to be read before the switch.
    let upgrade = !http10
        && framing == Framing::Empty
        && connection.names(b"upgrade")
        && fields
            .iter()
            .any(|f| f.name.eq_ignore_ascii_case("upgrade"));

    // The target as the instance gets it, and the host the request names.
    let (path, authority) = split_target(target)?;
    // RFC 9112 §3.2: two Host fields are a 400 (each hop could route by another one).
    let mut hosts = fields
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case("host"));
    let host_field = hosts.next().map(|f| f.value);
    if hosts.next().is_some() {
        return Err(HeadError::DuplicateHost);
    }
    let host = request_host(authority, host_field);

    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_ref().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut forwarded_for: SmallVec<[&[u8]; 2]> = SmallVec::new();
    for field in fields {
        if connection.strips(field.name) {
            continue;
        }
        // An absolute-form target's authority replaces any Host (RFC 9112 §3.2.2).
        if authority.is_some() && field.name.eq_ignore_ascii_case("host") {
            continue;
        }
        if field.name.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded_for.push(field.value);
            continue;
        }
        write_field(out, field.name.as_bytes(), field.value);
    }
    if let Some(authority) = authority {
        // Without any `user@`.
        let host = authority.rsplit('@').next().unwrap_or(authority);
        write_field(out, b"host", host.as_bytes());
    }
    if let Some(coding) = coding {
        // Relayed as it came: the chunks are framing, other codings are the instance's.
        write_field(out, b"transfer-encoding", coding);
    }
    if upgrade {
        write_upgrade(out, fields);
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    for earlier in forwarded_for {
        out.extend_from_slice(earlier);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(client_ip);
    out.extend_from_slice(b"\r\n\r\n");

    Ok(Some(ParsedRequest {
        head: RequestHead {
            len,
            idempotent: matches!(method, "GET" | "HEAD" | "OPTIONS"),
            head_method: method == "HEAD",
            http10,
            keep_alive,
            framing,
            upgrade,
        },
        host,
    }))
}

/// An instance's response head, its rewrite for the client already in the output buffer.
#[derive(Debug, Clone, Copy)]
pub struct ResponseHead {
    /// Bytes of the head at the start of the instance's buffer.
    pub len: usize,
    pub status: u16,
    /// How the instance delimits the body.
    pub framing: Framing,
    /// The instance keeps the connection open after this response.
    pub keep_alive: bool,
    /// The body is sent to the client as the instance sent it (`false`: chunks decoded for an
    /// HTTP/1.0 client, which then sees the end of the body as the end of the connection).
    pub pass_through: bool,
    /// The client connection stays open after this response.
    pub client_keep_alive: bool,
}

/// How the client side of an exchange stands when a response head is rewritten for it.
#[derive(Debug, Clone, Copy)]
pub struct ClientSide {
    pub http10: bool,
    /// The client asked to keep the connection, and the proxy is willing (not shutting down,
    /// the request body read to its end).
    pub keep_alive: bool,
    /// The request was `HEAD`.
    pub head_method: bool,
    /// The request asked to switch protocols ([`RequestHead::upgrade`]): a `101` is the
    /// switch, relayed with its `Upgrade` field.
    pub upgrade: bool,
}

/// Parses the response head at the start of `input` and, if complete, writes the head the
/// client gets into `out` (cleared first). An interim (`1xx`) response is returned as it is:
/// the caller forwards it to an HTTP/1.1 client and reads the next head.
///
/// A `101` to a request that asked to switch ([`ClientSide::upgrade`]) keeps its `Upgrade`
/// field and gets `Connection: upgrade`.
///
/// `Ok(None)`: not complete yet. Errors: a malformed head, more than [`MAX_HEADERS`] fields, an
/// invalid `Content-Length`, a `101` to an upgrade without an `Upgrade` field.
pub fn parse_response(
    input: &[u8],
    client: ClientSide,
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, HeadError> {
    let mut fields = [EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut fields);
    let len = match response.parse(input)? {
        Status::Complete(len) => len,
        Status::Partial => return Ok(None),
    };
    let (Some(version), Some(status)) = (response.version, response.code) else {
        return Ok(None);
    };
    let fields = &*response.headers;
    let connection = Connection::of(fields);
    let mut keep_alive = if version == 0 {
        connection.keep_alive
    } else {
        !connection.close
    };
    let bodiless =
        client.head_method || (100..200).contains(&status) || matches!(status, 204 | 304);
    let mut transfer_encoding = None;
    let mut length = None;
    for field in fields {
        if field.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = Some(field.value);
        } else if field.name.eq_ignore_ascii_case("content-length") {
            length = Some(merge_length(length, field.value)?);
        }
    }
    let framing = match (bodiless, transfer_encoding, length) {
        (true, _, _) => Framing::Empty,
        (false, Some(coding), length) => {
            // With both, the coding wins and the connection is not reused (RFC 9112 §6.3).
            if length.is_some() {
                keep_alive = false;
            }
            if last_coding_is_chunked(coding) {
                Framing::Chunked
            } else {
                Framing::UntilClose
            }
        }
        (false, None, Some(length)) => Framing::Length(length),
        (false, None, None) => Framing::UntilClose,
    };
    if framing == Framing::UntilClose {
        keep_alive = false;
    }
    // An HTTP/1.0 client cannot read chunks: it gets the data, delimited by the close.
    let pass_through = !(client.http10 && framing == Framing::Chunked);
    let client_keep_alive = client.keep_alive && pass_through && framing != Framing::UntilClose;

    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    push_status(out, status);
    out.extend_from_slice(response.reason.unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    for field in fields {
        if !connection.strips(field.name) {
            write_field(out, field.name.as_bytes(), field.value);
        }
    }
    let switching = status == 101 && client.upgrade;
    if switching {
        if !fields
            .iter()
            .any(|f| f.name.eq_ignore_ascii_case("upgrade"))
        {
            return Err(HeadError::SwitchWithoutUpgrade);
        }
        write_upgrade(out, fields);
    }
    // An interim head is forwarded as it is; the final one says how this hop is framed.
    if !(100..200).contains(&status) {
        if let (Some(coding), Framing::Chunked, true) = (transfer_encoding, framing, pass_through) {
            write_field(out, b"transfer-encoding", coding);
        }
        if !client_keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        } else if client.http10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(ResponseHead {
        len,
        status,
        framing,
        keep_alive,
        pass_through,
        client_keep_alive,
    }))
}

/// A `text/plain` response of one line, written into `out` (cleared first), from the proxy
/// itself: `message` and a newline (no body to a `HEAD`). `retry_after`: seconds for
/// `Retry-After` (`503`). `client.keep_alive`: the connection stays open (said explicitly to
/// an HTTP/1.0 client); otherwise `connection: close`.
pub fn write_error(
    out: &mut Vec<u8>,
    status: u16,
    message: &str,
    retry_after: Option<u32>,
    client: ClientSide,
) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    push_status(out, status);
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: ");
    out.extend_from_slice((message.len() + 1).to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(seconds) = retry_after {
        out.extend_from_slice(b"retry-after: ");
        out.extend_from_slice(seconds.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !client.keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if client.http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !client.head_method {
        out.extend_from_slice(message.as_bytes());
        out.push(b'\n');
    }
}

/// The reason phrase of a status the proxy answers itself.
fn reason(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("")
}

/// A status as three digits and a space (httparse reads only three-digit codes).
fn push_status(out: &mut Vec<u8>, status: u16) {
    let status = status % 1000;
    out.extend_from_slice(&[
        b'0' + (status / 100) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
        b' ',
    ]);
}

/// The `Upgrade` fields of `fields` as they came, and `Connection: upgrade`.
fn write_upgrade(out: &mut Vec<u8>, fields: &[Header<'_>]) {
    for field in fields {
        if field.name.eq_ignore_ascii_case("upgrade") {
            write_field(out, b"upgrade", field.value);
        }
    }
    out.extend_from_slice(b"connection: upgrade\r\n");
}

fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// What a head's `Connection` fields say: the options it names (never forwarded), `close`,
/// `keep-alive`.
struct Connection<'a> {
    named: SmallVec<[&'a [u8]; 4]>,
    close: bool,
    keep_alive: bool,
}

impl<'a> Connection<'a> {
    fn of(fields: &'a [Header<'a>]) -> Self {
        let mut connection = Connection {
            named: SmallVec::new(),
            close: false,
            keep_alive: false,
        };
        for field in fields {
            if !field.name.eq_ignore_ascii_case("connection") {
                continue;
            }
            for option in field.value.split(|&b| b == b',') {
                let option = option.trim_ascii();
                if option.eq_ignore_ascii_case(b"close") {
                    connection.close = true;
                } else if option.eq_ignore_ascii_case(b"keep-alive") {
                    connection.keep_alive = true;
                } else if !option.is_empty() {
                    connection.named.push(option);
                }
            }
        }
        connection
    }

    /// Whether `Connection` names `option` (`upgrade`, say).
    fn names(&self, option: &[u8]) -> bool {
        self.named
            .iter()
            .any(|named| named.eq_ignore_ascii_case(option))
    }

    /// Whether the field `name` describes this hop only.
    fn strips(&self, name: &str) -> bool {
        HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name)) || self.names(name.as_bytes())
    }
}

/// How a request's body is delimited, and its `Transfer-Encoding` if chunked: a request has a
/// body only when it says so; both fields, two `Transfer-Encoding` fields, or a last coding
/// other than `chunked` are refused (RFC 9112 §6.3: smuggling needs exactly such ambiguity).
fn request_framing<'a>(fields: &[Header<'a>]) -> Result<(Framing, Option<&'a [u8]>), HeadError> {
    let mut transfer_encoding = None;
    let mut length = None;
    for field in fields {
        if field.name.eq_ignore_ascii_case("transfer-encoding") {
            if transfer_encoding.is_some() {
                return Err(HeadError::BadTransferEncoding(
                    String::from_utf8_lossy(field.value).into(),
                ));
            }
            transfer_encoding = Some(field.value);
        } else if field.name.eq_ignore_ascii_case("content-length") {
            length = Some(merge_length(length, field.value)?);
        }
    }
    match (transfer_encoding, length) {
        (Some(_), Some(_)) => Err(HeadError::AmbiguousLength),
        (Some(coding), None) if last_coding_is_chunked(coding) => {
            Ok((Framing::Chunked, Some(coding)))
        }
        (Some(coding), None) => Err(HeadError::BadTransferEncoding(
            String::from_utf8_lossy(coding).into(),
        )),
        (None, Some(0)) | (None, None) => Ok((Framing::Empty, None)),
        (None, Some(length)) => Ok((Framing::Length(length), None)),
    }
}

/// A `Content-Length` value (digits only, at most 18 of them) merged with an earlier one,
/// which it must equal.
fn merge_length(earlier: Option<u64>, value: &[u8]) -> Result<u64, HeadError> {
    let bad = || HeadError::BadContentLength(String::from_utf8_lossy(value).into());
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let length = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    match earlier {
        Some(earlier) if earlier != length => Err(bad()),
        _ => Ok(length),
    }
}

fn last_coding_is_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// The path the instance gets and, for an absolute-form target (`http://web:8080/x?y`), its
/// authority (`web:8080`).
fn split_target(target: &str) -> Result<(Cow<'_, str>, Option<&str>), HeadError> {
    if target.starts_with('/') || target == "*" {
        return Ok((Cow::Borrowed(target), None));
    }
    let bad = || HeadError::BadTarget(target.into());
    let rest = target
        .get(..7)
        .filter(|scheme| scheme.eq_ignore_ascii_case("http://"))
        .map(|_| &target[7..])
        .ok_or_else(bad)?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.is_empty() {
        return Err(bad());
    }
    let path = match path.as_bytes().first() {
        Some(b'/') => Cow::Borrowed(path),
        // `http://web?x=1` is `/?x=1`; a fragment is never sent.
        Some(b'?') => Cow::Owned(format!("/{}", path.split('#').next().unwrap_or(path))),
        _ => Cow::Borrowed("/"),
    };
    Ok((path, Some(authority)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(raw: &str) -> Result<(RequestHead, String, String), HeadError> {
        let mut out = Vec::new();
        let parsed = parse_request(raw.as_bytes(), b"127.0.0.1", &mut out)?.expect("complete");
        let host = match parsed.host {
            Ok(host) => host.into_owned(),
            Err(e) => format!("error: {e}"),
        };
        Ok((parsed.head, host, String::from_utf8(out).unwrap()))
    }

    fn client(http10: bool, keep_alive: bool) -> ClientSide {
        ClientSide {
            http10,
            keep_alive,
            head_method: false,
            upgrade: false,
        }
    }

    fn response(raw: &str, client: ClientSide) -> Result<(ResponseHead, String), HeadError> {
        let mut out = Vec::new();
        let head = parse_response(raw.as_bytes(), client, &mut out)?.expect("complete");
        Ok((head, String::from_utf8(out).unwrap()))
    }

    #[test]
    fn hop_by_hop_fields_are_removed_and_the_client_appended() {
        let (head, host, out) = request(
            "GET /a?b=1 HTTP/1.1\r\nHost: Web:8080\r\nConnection: keep-alive, x-secret\r\n\
             X-Secret: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic x\r\n\
             TE: trailers\r\nUpgrade: h2c\r\nX-Forwarded-For: 10.0.0.1\r\n\
             X-Forwarded-For: 10.0.0.2\r\nAccept: */*\r\n\r\n",
        )
        .unwrap();
        assert_eq!(host, "web");
        assert!(head.keep_alive && head.idempotent && !head.http10);
        assert_eq!(head.framing, Framing::Empty);
        assert_eq!(
            out,
            "GET /a?b=1 HTTP/1.1\r\nHost: Web:8080\r\nAccept: */*\r\n\
             x-forwarded-for: 10.0.0.1, 10.0.0.2, 127.0.0.1\r\n\r\n"
        );
    }

    #[test]
    fn absolute_form_becomes_origin_form_with_a_host() {
        let (_, host, out) = request("GET http://web:8080/x?y=1 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(host, "web");
        assert!(
            out.starts_with("GET /x?y=1 HTTP/1.1\r\nhost: web:8080\r\n"),
            "{out}"
        );
        let (_, host, out) = request("GET HTTP://web HTTP/1.1\r\nHost: other\r\n\r\n").unwrap();
        assert_eq!(host, "web");
        assert!(out.starts_with("GET / HTTP/1.1\r\nhost: web\r\n"), "{out}");
        assert!(!out.contains("other"), "{out}");
        let (_, _, out) = request("GET http://web?q=1 HTTP/1.1\r\n\r\n").unwrap();
        assert!(out.starts_with("GET /?q=1 HTTP/1.1\r\n"), "{out}");
        for bad in [
            "GET web:80 HTTP/1.1\r\n\r\n",
            "GET http:/// HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(request(bad), Err(HeadError::BadTarget(_))),
                "{bad}"
            );
        }
        assert_eq!(
            request("CONNECT web:443 HTTP/1.1\r\n\r\n").unwrap_err(),
            HeadError::Connect
        );
        let twice = "GET / HTTP/1.1\r\nHost: web\r\nHost: other\r\n\r\n";
        assert_eq!(request(twice).unwrap_err(), HeadError::DuplicateHost);
        assert_eq!(HeadError::DuplicateHost.status(), 400);
    }

    #[test]
    fn request_bodies_are_delimited_unambiguously() {
        let framing = |fields: &str| {
            request(&format!("POST / HTTP/1.1\r\nHost: web\r\n{fields}\r\n")).map(|r| r.0.framing)
        };
        assert_eq!(framing(""), Ok(Framing::Empty));
        assert_eq!(framing("Content-Length: 0\r\n"), Ok(Framing::Empty));
        assert_eq!(framing("Content-Length: 12\r\n"), Ok(Framing::Length(12)));
        assert_eq!(
            framing("Content-Length: 12\r\nContent-Length: 12\r\n"),
            Ok(Framing::Length(12))
        );
        assert_eq!(
            framing("Transfer-Encoding: Chunked\r\n"),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            framing("Transfer-Encoding: gzip, chunked\r\n"),
            Ok(Framing::Chunked)
        );
        for bad in [
            "Content-Length: 12\r\nContent-Length: 13\r\n",
            "Content-Length: -1\r\n",
            "Content-Length: 1e3\r\n",
            "Content-Length: 12, 12\r\n",
            "Content-Length: 99999999999999999999\r\n",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: gzip\r\n",
            "Transfer-Encoding: chunked, gzip\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        ] {
            let e = framing(bad).unwrap_err();
            assert_eq!(e.status(), 400, "{bad}: {e}");
        }
        let raw = "POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        let (_, _, out) = request(raw).unwrap();
        assert!(
            out.contains("transfer-encoding: gzip, chunked\r\n"),
            "{out}"
        );
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        let keep = |raw: &str| request(raw).unwrap().0.keep_alive;
        assert!(keep("GET / HTTP/1.1\r\nHost: web\r\n\r\n"));
        assert!(!keep(
            "GET / HTTP/1.1\r\nHost: web\r\nConnection: Close\r\n\r\n"
        ));
        assert!(!keep("GET / HTTP/1.0\r\nHost: web\r\n\r\n"));
        assert!(keep(
            "GET / HTTP/1.0\r\nHost: web\r\nConnection: keep-alive\r\n\r\n"
        ));
    }

    #[test]
    fn incomplete_and_oversized_heads() {
        let mut out = Vec::new();
        assert!(
            parse_request(b"GET / HTTP/1.1\r\nHost: w", b"::1", &mut out)
                .unwrap()
                .is_none()
        );
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\n{many}\r\n");
        let e = parse_request(raw.as_bytes(), b"::1", &mut out)
            .err()
            .unwrap();
        assert_eq!(e.status(), 431);
        let e = parse_request(b"GET / HTTP/1.1\r\nbad header\r\n\r\n", b"::1", &mut out)
            .err()
            .unwrap();
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn responses_keep_their_framing_or_are_decoded_for_http10() {
        let (head, out) = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: x-resp\r\nX-Resp: 1\r\n\
             Keep-Alive: timeout=5\r\nServer: nginx\r\n\r\nhello",
            client(false, true),
        )
        .unwrap();
        assert_eq!(head.framing, Framing::Length(5));
        assert!(head.keep_alive && head.client_keep_alive && head.pass_through);
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: nginx\r\n\r\n"
        );

        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let (head, out) = response(chunked, client(false, true)).unwrap();
        assert_eq!(head.framing, Framing::Chunked);
        assert_eq!(out, "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
        let (head, out) = response(chunked, client(true, true)).unwrap();
        assert!(!head.pass_through && !head.client_keep_alive);
        assert_eq!(out, "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n");

        let (head, out) = response("HTTP/1.0 200 OK\r\n\r\n", client(true, true)).unwrap();
        assert_eq!(head.framing, Framing::UntilClose);
        assert!(!head.keep_alive && !head.client_keep_alive);
        assert!(out.ends_with("connection: close\r\n\r\n"));

        let (head, out) = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
            client(true, true),
        )
        .unwrap();
        assert!(head.client_keep_alive);
        assert!(out.ends_with("connection: keep-alive\r\n\r\n"));
    }

    #[test]
    fn bodiless_responses() {
        let head_request = ClientSide {
            head_method: true,
            ..client(false, true)
        };
        let (head, _) =
            response("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", head_request).unwrap();
        assert_eq!(head.framing, Framing::Empty);
        for status in ["204 No Content", "304 Not Modified", "100 Continue"] {
            let (head, _) =
                response(&format!("HTTP/1.1 {status}\r\n\r\n"), client(false, true)).unwrap();
            assert_eq!(head.framing, Framing::Empty, "{status}");
            assert!(head.keep_alive, "{status}");
        }
        let both = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        let (head, _) = response(both, client(false, true)).unwrap();
        assert_eq!(head.framing, Framing::Chunked);
        assert!(
            !head.keep_alive,
            "the instance connection is not reused after both"
        );
        let bad = "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n";
        assert!(response(bad, client(false, true)).is_err());
    }

    #[test]
    fn an_upgrade_keeps_its_upgrade_field_and_only_that() {
        let handshake = "GET /chat HTTP/1.1\r\nHost: web\r\nConnection: keep-alive, Upgrade\r\n\
                         Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                         Sec-WebSocket-Version: 13\r\n\r\n";
        let (head, _, out) = request(handshake).unwrap();
        assert!(head.upgrade);
        assert_eq!(
            out,
            "GET /chat HTTP/1.1\r\nHost: web\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
             x-forwarded-for: 127.0.0.1\r\n\r\n"
        );
        // Not an upgrade: `Upgrade` not named in `Connection`, HTTP/1.0, or a body to read
        // first. The field is dropped like any hop-by-hop one.
        for raw in [
            "GET / HTTP/1.1\r\nHost: web\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: web\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: web\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\
             Content-Length: 2\r\n\r\nhi",
            "GET / HTTP/1.1\r\nHost: web\r\nConnection: upgrade\r\n\r\n",
        ] {
            let (head, _, out) = request(raw).unwrap();
            assert!(!head.upgrade, "{raw}");
            assert!(!out.to_ascii_lowercase().contains("upgrade"), "{out}");
        }

        let switching = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                         Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        let upgrading = ClientSide {
            upgrade: true,
            ..client(false, true)
        };
        let (head, out) = response(switching, upgrading).unwrap();
        assert_eq!((head.status, head.framing), (101, Framing::Empty));
        assert_eq!(
            out,
            "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
             upgrade: websocket\r\nconnection: upgrade\r\n\r\n"
        );
        let e = response("HTTP/1.1 101 Switching Protocols\r\n\r\n", upgrading)
            .err()
            .unwrap();
        assert_eq!(e, HeadError::SwitchWithoutUpgrade);
        // To a request that asked no upgrade, a 101 is an interim head the proxy refuses.
        let (_, out) = response(switching, client(false, true)).unwrap();
        assert!(!out.to_ascii_lowercase().contains("upgrade"), "{out}");
    }

    #[test]
    fn errors_are_one_line_of_text() {
        let mut out = Vec::new();
        write_error(&mut out, 503, "queue full", Some(1), client(false, false));
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
             content-length: 11\r\nretry-after: 1\r\nconnection: close\r\n\r\nqueue full\n"
        );
        let mut out = Vec::new();
        let head_request = ClientSide {
            head_method: true,
            ..client(true, true)
        };
        write_error(&mut out, 404, "unknown service", None, head_request);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.ends_with("content-length: 16\r\nconnection: keep-alive\r\n\r\n"),
            "no body to a HEAD, keep-alive said to HTTP/1.0: {text}"
        );
    }
}
