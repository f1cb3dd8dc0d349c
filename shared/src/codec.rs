//! Length-prefixed MessagePack frames.
//!
//! A frame is a 4-byte big-endian payload length followed by that many bytes of MessagePack
//! (rmp-serde, enum variants by name). Structs are written with named fields, so a peer of
//! another build skips fields it does not know and defaults those it misses; the route-table
//! feed to a sidecar that asks for it is written compact (see [`Encoding`]). Decoding reads
//! both. The length is checked against a maximum *before* anything is
//! allocated, so a hostile peer cannot make a reader reserve memory it never sends.
//!
//! [`decode_frame`] is the pure parser (tested on hostile byte strings); [`read_frame`] and
//! [`write_frame`] drive it over any tokio stream.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Largest frame the directory accepts from a node (64 KiB): nodes send small messages.
pub const MAX_NODE_FRAME: usize = 64 * 1024;

/// Largest frame a node accepts from the directory (1 MiB): snapshots are chunked below it.
pub const MAX_DIRECTORY_FRAME: usize = 1024 * 1024;

/// Once the first byte of a frame has arrived, the rest of it (header and payload) must arrive
/// within this time or [`read_frame`] fails with [`FrameError::Stalled`]: 10 s carries the
/// largest frame ([`MAX_DIRECTORY_FRAME`]) at 100 KiB/s. A peer that starts a frame and stops
/// would otherwise hold its task and the frame's buffer forever while QUIC keep-alives keep
/// the connection up. The wait *between* frames is not bounded here: a subscription is quiet
/// for long stretches, and callers bound it where it matters (the hello, heartbeats).
pub const FRAME_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What can go wrong reading or writing a frame.
#[derive(Debug, Error)]
pub enum FrameError {
    /// The header announced more than the reader accepts; nothing was allocated.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The payload is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
    /// The message could not be encoded (a bug, never caused by a peer).
    #[error("cannot encode frame: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({got} of {expected} bytes)")]
    Truncated { got: usize, expected: usize },
    /// A frame was started but not finished within the allowed time.
    #[error("the peer started a frame and sent no more of it for {after:?}")]
    Stalled { after: Duration },
    /// The stream failed.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

/// How a frame's structs are written; [`decode_frame`] reads either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Structs as maps of field names to values: a reader of another build skips unknown
    /// fields and defaults missing ones (`#[serde(default)]`).
    Named,
    /// Structs as arrays of values in declaration order: about 40% of the named size for
    /// route entries, but a reader must know exactly the writer's fields (an extra one is an
    /// error). Only for a reader that asked for this layout by number
    /// ([`crate::protocol::FEED_FORMAT`]).
    Compact,
}

/// Encodes `msg` as one frame (header and payload) with named fields.
///
/// Errors: [`FrameError::TooLarge`] if the payload exceeds `max`, [`FrameError::Encode`].
pub fn encode_frame<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    encode_frame_as(msg, max, Encoding::Named)
}

/// Encodes `msg` as one frame written as `encoding` says. Errors as [`encode_frame`].
pub fn encode_frame_as<T: Serialize>(
    msg: &T,
    max: usize,
    encoding: Encoding,
) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; HEADER_LEN];
    match encoding {
        Encoding::Named => rmp_serde::encode::write_named(&mut buf, msg)?,
        Encoding::Compact => rmp_serde::encode::write(&mut buf, msg)?,
    }
    let len = buf.len() - HEADER_LEN;
    if len > max || len > u32::MAX as usize {
        return Err(FrameError::TooLarge { len, max });
    }
    buf[..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

/// Parses one frame from the front of `buf`, consuming it.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame (nothing is consumed), and an
/// error for an oversized header (checked before waiting for the payload) or a malformed
/// payload (the frame is consumed, so a caller may answer and go on).
pub fn decode_frame<T: DeserializeOwned>(
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<T>, FrameError> {
    let Some(len) = frame_len(buf, max)? else {
        return Ok(None);
    };
    if buf.len() < HEADER_LEN + len {
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    let payload = buf.split_to(len);
    Ok(Some(rmp_serde::from_slice(&payload)?))
}

/// The payload length announced by the header at the front of `buf`, if the header is there.
fn frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(Some(len))
}

/// Reads one frame from `reader`.
///
/// Returns `Ok(None)` on a clean end of stream between frames. Errors: the header announces
/// more than `max` bytes (nothing is allocated), the stream ends inside a frame, the rest of a
/// started frame does not arrive within [`FRAME_READ_TIMEOUT`], the payload is malformed
/// (an unknown message type included), or the stream fails.
pub async fn read_frame<R, T>(reader: &mut R, max: usize) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_frame_within(reader, max, FRAME_READ_TIMEOUT).await
}

/// [`read_frame`] with `stall` instead of [`FRAME_READ_TIMEOUT`] as the time a started frame
/// has to arrive whole.
pub async fn read_frame_within<R, T>(
    reader: &mut R,
    max: usize,
    stall: Duration,
) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut header = [0u8; HEADER_LEN];
    let first = reader.read(&mut header).await?;
    if first == 0 {
        return Ok(None);
    }
    match tokio::time::timeout(stall, read_rest(reader, header, first, max)).await {
        Ok(result) => result.map(Some),
        Err(_) => Err(FrameError::Stalled { after: stall }),
    }
}

/// The rest of a frame whose first `got` header bytes are in `header`.
async fn read_rest<R, T>(
    reader: &mut R,
    mut header: [u8; HEADER_LEN],
    mut got: usize,
    max: usize,
) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    while got < HEADER_LEN {
        let n = reader.read(&mut header[got..]).await?;
        if n == 0 {
            return Err(FrameError::Truncated {
                got,
                expected: HEADER_LEN,
            });
        }
        got += n;
    }
    let len = frame_len(&header, max)?.unwrap_or(0);
    let mut payload = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = reader.read(&mut payload[got..]).await?;
        if n == 0 {
            return Err(FrameError::Truncated { got, expected: len });
        }
        got += n;
    }
    Ok(rmp_serde::from_slice(&payload)?)
}

/// Reads one frame from an owned `reader` and hands the reader back with the result, so a
/// pending read can be kept across `select!` iterations instead of being cancelled mid-frame.
pub async fn read_frame_owned<R, T>(mut reader: R, max: usize) -> (R, Result<Option<T>, FrameError>)
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let result = read_frame(&mut reader, max).await;
    (reader, result)
}

/// Writes `msg` as one frame to `writer`. Errors as [`encode_frame`], or the stream fails.
pub async fn write_frame<W, T>(writer: &mut W, msg: &T, max: usize) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let frame = encode_frame(msg, max)?;
    writer.write_all(&frame).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Hello, NodeMessage, Role, PROTOCOL_VERSION};
    use crate::routes::InstanceState;
    use tokio::io::AsyncWriteExt;

    fn hello() -> NodeMessage {
        NodeMessage::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            role: Role::Agent,
            node: "host-1".into(),
        })
    }

    #[test]
    fn round_trips_a_message() {
        let frame = encode_frame(&hello(), MAX_NODE_FRAME).unwrap();
        let mut buf = BytesMut::from(&frame[..]);
        let got: Option<NodeMessage> = decode_frame(&mut buf, MAX_NODE_FRAME).unwrap();
        assert_eq!(got, Some(hello()));
        assert!(buf.is_empty());
    }

    #[test]
    fn truncated_frames_wait_for_more_bytes() {
        let frame = encode_frame(&hello(), MAX_NODE_FRAME).unwrap();
        for cut in 0..frame.len() {
            let mut buf = BytesMut::from(&frame[..cut]);
            let got: Option<NodeMessage> = decode_frame(&mut buf, MAX_NODE_FRAME).unwrap();
            assert!(got.is_none(), "cut at {cut}");
            assert_eq!(buf.len(), cut, "nothing consumed at {cut}");
        }
    }

    #[test]
    fn oversized_header_is_refused_before_the_payload_arrives() {
        let mut buf = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        let err = decode_frame::<NodeMessage>(&mut buf, MAX_NODE_FRAME).unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { len, max } if len == u32::MAX as usize && max == MAX_NODE_FRAME)
        );
    }

    #[test]
    fn oversized_message_is_not_encoded() {
        let big = NodeMessage::Hello(Hello {
            protocol: 1,
            role: Role::Sidecar,
            node: "x".repeat(100),
        });
        assert!(matches!(
            encode_frame(&big, 16),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn garbage_payloads_are_errors_not_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in 0..300usize {
            let mut frame = (len as u32).to_be_bytes().to_vec();
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                frame.push(seed as u8);
            }
            let mut buf = BytesMut::from(&frame[..]);
            // Any outcome but a panic is fine; most are Malformed.
            let _ = decode_frame::<NodeMessage>(&mut buf, MAX_NODE_FRAME);
        }
        let mut buf = BytesMut::from(&[0, 0, 0, 3, 0xc1, 0xc1, 0xc1][..]);
        assert!(matches!(
            decode_frame::<NodeMessage>(&mut buf, MAX_NODE_FRAME),
            Err(FrameError::Malformed(_))
        ));
        assert!(buf.is_empty(), "a malformed frame is consumed");
    }

    #[test]
    fn unknown_message_type_is_malformed() {
        #[derive(serde::Serialize)]
        enum Other {
            LaunchMissiles { now: bool },
        }
        let frame = encode_frame(&Other::LaunchMissiles { now: true }, MAX_NODE_FRAME).unwrap();
        let mut buf = BytesMut::from(&frame[..]);
        let err = decode_frame::<NodeMessage>(&mut buf, MAX_NODE_FRAME).unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)), "{err}");
        // The error names what was sent, for the refusal the directory sends back.
        assert!(err.to_string().contains("LaunchMissiles"), "{err}");
    }

    /// A connected pair of TCP sockets on loopback: `(writer, reader)`.
    async fn loopback() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let writer = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (reader, _) = listener.accept().await.unwrap();
        (writer, reader)
    }

    #[tokio::test]
    async fn a_started_frame_that_stalls_is_an_error_but_a_quiet_peer_is_not() {
        let stall = Duration::from_millis(200);
        let frame = encode_frame(&hello(), MAX_NODE_FRAME).unwrap();
        // Stops inside the header, then inside the payload.
        for cut in [2, HEADER_LEN + 3] {
            let (mut writer, mut reader) = loopback().await;
            writer.write_all(&frame[..cut]).await.unwrap();
            let started = std::time::Instant::now();
            let err = read_frame_within::<_, NodeMessage>(&mut reader, MAX_NODE_FRAME, stall)
                .await
                .unwrap_err();
            assert!(
                matches!(err, FrameError::Stalled { after } if after == stall),
                "{err}"
            );
            assert!(started.elapsed() >= stall);
            drop(writer);
        }
        // Quiet for longer than `stall` between frames, then a whole frame: fine.
        let (mut writer, mut reader) = loopback().await;
        let sending = tokio::spawn(async move {
            tokio::time::sleep(stall * 2).await;
            writer.write_all(&frame).await.unwrap();
            writer
        });
        let got: Option<NodeMessage> = read_frame_within(&mut reader, MAX_NODE_FRAME, stall)
            .await
            .unwrap();
        assert_eq!(got, Some(hello()));
        drop(sending.await.unwrap());
        let end: Option<NodeMessage> = read_frame_within(&mut reader, MAX_NODE_FRAME, stall)
            .await
            .unwrap();
        assert_eq!(end, None);
    }

    #[tokio::test]
    async fn read_frame_over_a_stream() {
        let mut bytes = encode_frame(&hello(), MAX_NODE_FRAME).unwrap();
        bytes.extend(
            encode_frame(
                &NodeMessage::Heartbeat {
                    state: InstanceState::Up,
                    ack: false,
                },
                MAX_NODE_FRAME,
            )
            .unwrap(),
        );
        let mut reader = &bytes[..];
        let a: Option<NodeMessage> = read_frame(&mut reader, MAX_NODE_FRAME).await.unwrap();
        let b: Option<NodeMessage> = read_frame(&mut reader, MAX_NODE_FRAME).await.unwrap();
        let c: Option<NodeMessage> = read_frame(&mut reader, MAX_NODE_FRAME).await.unwrap();
        assert_eq!(a, Some(hello()));
        assert_eq!(
            b,
            Some(NodeMessage::Heartbeat {
                state: InstanceState::Up,
                ack: false,
            })
        );
        assert_eq!(c, None, "clean end of stream");
    }

    #[tokio::test]
    async fn read_frame_reports_truncation_and_size() {
        let bytes = encode_frame(&hello(), MAX_NODE_FRAME).unwrap();
        let mut reader = &bytes[..bytes.len() - 1];
        let err = read_frame::<_, NodeMessage>(&mut reader, MAX_NODE_FRAME)
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::Truncated { .. }));
        let mut reader = &[0u8, 0][..];
        assert!(matches!(
            read_frame::<_, NodeMessage>(&mut reader, MAX_NODE_FRAME).await,
            Err(FrameError::Truncated {
                got: 2,
                expected: 4
            })
        ));
        let huge = [0xffu8, 0xff, 0xff, 0xff];
        let mut reader = &huge[..];
        assert!(matches!(
            read_frame::<_, NodeMessage>(&mut reader, MAX_NODE_FRAME).await,
            Err(FrameError::TooLarge { .. })
        ));
    }
}
