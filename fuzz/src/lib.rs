//! The fuzz targets' bodies (the `fuzz_targets/` files only call them) and the seed messages
//! the checked-in corpus was made from (`cargo run --example seeds` in `fuzz/`).
//!
//! Neither body may panic on any input: a panic is a bug the fuzzer reports.

use std::time::Duration;

use tokio::time::Instant;

use bytes::BytesMut;
use usher_directory::authz::{check_hello, check_register};
use usher_directory::preservation::{
    PreservationSettings, DEFAULT_MIN_INSTANCES, DEFAULT_THRESHOLD_PERCENT,
};
use usher_directory::registry::{Registry, Settings};
use usher_shared::codec::{decode_frame, encode_frame, Encoding, FrameError};
use usher_shared::codec::{MAX_DIRECTORY_FRAME, MAX_NODE_FRAME};
use usher_shared::identity::NodeIdentity;
use usher_shared::join::{JoinRequest, MAX_JOIN_FRAME};
use usher_shared::protocol::{
    check_load_report, feed_encoding, fit_load_report, DirectoryMessage, NodeMessage,
};
use usher_shared::routes::InstanceKey;

/// `frame_decode`: `data` as a stream of frames of each message type the codec carries.
/// Every message that decodes must encode and decode back to itself.
pub fn frame_decode(data: &[u8]) {
    decode_all::<NodeMessage>(data, MAX_NODE_FRAME);
    decode_all::<DirectoryMessage>(data, MAX_DIRECTORY_FRAME);
    decode_all::<JoinRequest>(data, MAX_JOIN_FRAME);
}

fn decode_all<T>(data: &[u8], max: usize)
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    for message in frames::<T>(data, max) {
        let again = encode_frame(&message, usize::MAX).expect("a decoded message encodes");
        let back: T = decode_frame(&mut BytesMut::from(&again[..]), usize::MAX)
            .expect("a re-encoded message decodes")
            .expect("a whole frame");
        assert_eq!(back, message, "decode(encode(m)) == m");
    }
}

/// The messages `data` holds as frames of at most `max` bytes, skipping malformed frames (as
/// the codec consumes them) and stopping at an oversized header or an incomplete frame.
fn frames<T: serde::de::DeserializeOwned>(data: &[u8], max: usize) -> Vec<T> {
    let mut buf = BytesMut::from(data);
    let mut out = Vec::new();
    loop {
        match decode_frame::<T>(&mut buf, max) {
            Ok(Some(message)) => out.push(message),
            Ok(None) | Err(FrameError::TooLarge { .. }) => return out,
            Err(_) => continue,
        }
    }
}

/// The identity a fuzz input speaks as, chosen by its first byte.
fn identity(selector: u8) -> NodeIdentity {
    match selector % 3 {
        0 => NodeIdentity::Sidecar,
        1 => NodeIdentity::Agent {
            service: "web".into(),
        },
        _ => NodeIdentity::Agent {
            service: "api".into(),
        },
    }
}

/// `directory_message`: the first byte picks the peer's identity and session, the rest is a
/// stream of frames the directory receives; each message goes through the directory's checks
/// and its registry and load board (in memory, half a second apart). Afterwards the registry
/// must still be consistent: a snapshot from scratch holds what the table holds.
pub fn directory_message(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let identity = identity(selector);
    let session = u64::from(selector >> 4);
    let start = Instant::now();
    let registry = Registry::new(Settings {
        epoch: 7,
        heartbeat_interval: Duration::from_secs(1),
        ttl: Duration::from_secs(3),
        silent_stream_timeout: Duration::from_secs(6),
        grace_period: Duration::ZERO,
        started: start,
        // Held withdrawals take over 50 instances; one session registers one.
        preservation: PreservationSettings::new(
            DEFAULT_THRESHOLD_PERCENT,
            DEFAULT_MIN_INSTANCES,
            Duration::from_secs(1),
            Duration::from_secs(3),
        ),
    });
    let mut registered: Option<InstanceKey> = None;
    let mut now = start;
    for message in frames::<NodeMessage>(rest, MAX_NODE_FRAME) {
        now += Duration::from_millis(500);
        apply(&registry, &identity, session, &mut registered, message, now);
        registry.expire(now);
        registry.publish_due(now);
    }
    let table = registry.table();
    for encoding in [Encoding::Named, Encoding::Compact] {
        let (frames, _) = registry
            .next_frames((None, 0), true, encoding)
            .expect("every entry fits a frame");
        let mut instances = 0;
        for frame in frames {
            let mut buf = BytesMut::from(&frame[..]);
            match decode_frame::<DirectoryMessage>(&mut buf, MAX_DIRECTORY_FRAME) {
                Ok(Some(DirectoryMessage::SnapshotChunk { instances: i, .. })) => {
                    instances += i.len()
                }
                other => panic!("a snapshot decodes to chunks, got {other:?}"),
            }
        }
        assert_eq!(instances, table.instances().count(), "{encoding:?}");
    }
    // What a sidecar of the previous run gets during a grace period: every instance, as an
    // upsert.
    let (frames, _) = registry
        .grace_upserts(None)
        .expect("every entry fits a frame");
    let mut upserts = 0;
    for frame in frames {
        let mut buf = BytesMut::from(&frame[..]);
        match decode_frame::<DirectoryMessage>(&mut buf, MAX_DIRECTORY_FRAME) {
            Ok(Some(DirectoryMessage::GraceUpserts { changes, .. })) => {
                upserts += changes
                    .iter()
                    .filter(|c| matches!(c, usher_shared::routes::Change::Upsert(_)))
                    .count()
            }
            other => panic!("grace upserts decode as such, got {other:?}"),
        }
    }
    assert_eq!(upserts, table.instances().count());
    let _ = registry.report(now, 0);
}

/// One message as the directory's conversation handles it, without the network.
fn apply(
    registry: &Registry,
    identity: &NodeIdentity,
    session: u64,
    registered: &mut Option<InstanceKey>,
    message: NodeMessage,
    now: Instant,
) {
    match message {
        NodeMessage::Hello(hello) => {
            let _ = check_hello(identity, hello.role);
        }
        NodeMessage::Register(registration) => {
            if check_register(identity, &registration.instance.service).is_ok() {
                let key = registration.instance.key();
                if registry
                    .register(session, registration.instance, now)
                    .is_ok()
                {
                    *registered = Some(key);
                }
            }
        }
        NodeMessage::Heartbeat { state, .. } => {
            if let Some(key) = registered {
                let _ = registry.heartbeat(session, key, state, now);
            }
        }
        NodeMessage::Deregister => {
            if let Some(key) = registered.take() {
                let _ = registry.deregister(session, &key, now);
            }
        }
        NodeMessage::Subscribe {
            epoch,
            revision,
            feed_format,
            ..
        } => {
            let _ = registry.next_frames((epoch, revision), true, feed_encoding(feed_format));
        }
        NodeMessage::LoadReport { mut versions } => {
            let _ = registry.load().report(session, now, versions.clone());
            let _ = registry.load().totals(now);
            fit_load_report(&mut versions);
            assert!(
                check_load_report(&versions).is_ok(),
                "a fitted report passes"
            );
        }
    }
}

/// `http1_message`: `data` as what a sidecar reads from a client and from an instance. The
/// request head parser must not panic, and a head it accepts must be rewritten into one that
/// parses again with the same body framing and no hop-by-hop field; the response head parser
/// likewise; a chunked body relayed as it came must be exactly the bytes it spans, and decoded
/// no longer than them.
pub fn http1_message(data: &[u8]) {
    use usher_sidecar::http1::body::relay;
    use usher_sidecar::http1::head::{
        parse_request, parse_response, ClientSide, Framing, HOP_BY_HOP, MAX_HEADERS,
    };

    let mut out = Vec::new();
    if let Ok(Some(parsed)) = parse_request(data, b"127.0.0.1", &mut out) {
        let framing = parsed.head.framing;
        // The proxy adds up to three fields (Host, Transfer-Encoding, X-Forwarded-For).
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS + 3];
        let mut request = httparse::Request::new(&mut fields);
        let status = request.parse(&out).expect("a rewritten head parses");
        assert_eq!(status, httparse::Status::Complete(out.len()));
        for field in request.headers.iter() {
            let hop = HOP_BY_HOP
                .iter()
                .any(|h| h.eq_ignore_ascii_case(field.name));
            let chunked =
                field.name.eq_ignore_ascii_case("transfer-encoding") && framing == Framing::Chunked;
            // An upgrade keeps `Upgrade` and says `Connection: upgrade`, nothing else.
            let upgrade = parsed.head.upgrade
                && (field.name.eq_ignore_ascii_case("upgrade")
                    || (field.name.eq_ignore_ascii_case("connection")
                        && field.value.eq_ignore_ascii_case(b"upgrade")));
            assert!(!hop || chunked || upgrade, "{} forwarded", field.name);
        }
        if request.headers.len() <= MAX_HEADERS {
            let mut again = Vec::new();
            let reparsed = parse_request(&out, b"127.0.0.1", &mut again)
                .expect("a rewritten head parses")
                .expect("a rewritten head is complete");
            assert_eq!(reparsed.head.framing, framing);
        }
    }
    for (http10, keep_alive, head_method, upgrade) in
        [(false, true, false, true), (true, true, true, false)]
    {
        let client = ClientSide {
            http10,
            keep_alive,
            head_method,
            upgrade,
        };
        if let Ok(Some(response)) = parse_response(data, client, &mut out) {
            assert!(response.len <= data.len());
            // The proxy adds up to two fields (Transfer-Encoding, Connection), or for a `101`
            // to an upgrade the Upgrade fields it had and Connection.
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS + 2];
            let status = httparse::Response::new(&mut fields)
                .parse(&out)
                .expect("a rewritten response head parses");
            assert_eq!(status, httparse::Status::Complete(out.len()));
        }
    }
    for decode in [false, true] {
        let mut src = data;
        let mut buf = bytes::BytesMut::new();
        let mut written = Vec::new();
        let mut pending = Vec::new();
        let relayed = poll_ready(relay(
            Framing::Chunked,
            decode,
            &mut src,
            &mut buf,
            &mut written,
            &mut pending,
        ));
        if relayed.is_ok() {
            let spanned = data.len() - src.len() - buf.len();
            if decode {
                assert!(written.len() <= spanned);
            } else {
                assert_eq!(written, data[..spanned]);
            }
        }
    }
}

/// Runs a future whose I/O is all in memory (always ready) to its end.
fn poll_ready<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
    }
}
