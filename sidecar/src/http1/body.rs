//! Message bodies on the proxy path: relayed from one connection to the other as they arrive,
//! never buffered whole. A chunked body is forwarded as it came (or decoded, for an HTTP/1.0
//! client), its chunk-size lines parsed by `httparse` to find where it ends (RFC 9112 §7.1).

use std::io;

use bytes::{Buf, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::head::Framing;

/// Longest chunk-size line (size and extensions) accepted, bytes.
pub const MAX_CHUNK_LINE: usize = 4096;
/// Largest trailer section accepted after the last chunk, bytes.
pub const MAX_TRAILERS: usize = 16 * 1024;
/// Bytes gathered into one write: the head and what follows it in the buffer go out together.
const GATHER: usize = 64 * 1024;
/// Room made in a read buffer before each read.
const READ_SIZE: usize = 16 * 1024;

/// How relaying a body failed.
#[derive(Debug, Error)]
pub enum RelayError {
    /// The sending side failed or closed before the body's end.
    #[error("reading the body: {0}")]
    Read(io::Error),
    #[error("the body ended early: the connection closed after {0} more bytes were expected")]
    Truncated(u64),
    #[error("malformed chunked body: {0}")]
    Chunk(&'static str),
    /// The receiving side failed (went away).
    #[error("writing the body: {0}")]
    Write(io::Error),
}

impl RelayError {
    /// Whether the receiving side failed (rather than the sender or its framing).
    pub fn on_write(&self) -> bool {
        matches!(self, RelayError::Write(_))
    }
}

/// One piece of a chunked body at the start of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    /// Framing bytes: a size line, the CRLF after data, a trailer line.
    Framing(usize),
    /// Data bytes.
    Data(usize),
    /// More input is needed to see the next piece.
    Incomplete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size,
    Data(u64),
    DataEnd,
    Trailers(usize),
    Done,
}

/// Where a chunked body's parser stands.
#[derive(Debug, Clone, Copy)]
pub struct Chunked(State);

impl Default for Chunked {
    fn default() -> Self {
        Chunked(State::Size)
    }
}

impl Chunked {
    pub fn done(&self) -> bool {
        self.0 == State::Done
    }

    /// The next piece at the start of `input`, consuming it from the parser's view.
    fn next(&mut self, input: &[u8]) -> Result<Piece, RelayError> {
        match self.0 {
            State::Done => Ok(Piece::Incomplete),
            State::Size => match httparse::parse_chunk_size(input) {
                Ok(httparse::Status::Complete((used, 0))) => {
                    self.0 = State::Trailers(0);
                    Ok(Piece::Framing(used))
                }
                Ok(httparse::Status::Complete((used, size))) => {
                    self.0 = State::Data(size);
                    Ok(Piece::Framing(used))
                }
                Ok(httparse::Status::Partial) if input.len() >= MAX_CHUNK_LINE => {
                    Err(RelayError::Chunk("chunk-size line too long"))
                }
                Ok(httparse::Status::Partial) => Ok(Piece::Incomplete),
                Err(_) => Err(RelayError::Chunk("invalid chunk size")),
            },
            State::Data(left) => {
                if input.is_empty() {
                    return Ok(Piece::Incomplete);
                }
                let n = left.min(input.len() as u64);
                self.0 = if n == left {
                    State::DataEnd
                } else {
                    State::Data(left - n)
                };
                Ok(Piece::Data(n as usize))
            }
            State::DataEnd => match input {
                [b'\r', b'\n', ..] => {
                    self.0 = State::Size;
                    Ok(Piece::Framing(2))
                }
                [] | [b'\r'] => Ok(Piece::Incomplete),
                _ => Err(RelayError::Chunk("chunk data not followed by CRLF")),
            },
            State::Trailers(seen) => {
                let Some(end) = input.windows(2).position(|w| w == b"\r\n") else {
                    if seen + input.len() > MAX_TRAILERS {
                        return Err(RelayError::Chunk("trailer section too large"));
                    }
                    return Ok(Piece::Incomplete);
                };
                let line = end + 2;
                if seen + line > MAX_TRAILERS {
                    return Err(RelayError::Chunk("trailer section too large"));
                }
                // An empty line ends the trailers and the body.
                self.0 = if end == 0 {
                    State::Done
                } else {
                    State::Trailers(seen + line)
                };
                Ok(Piece::Framing(line))
            }
        }
    }
}

/// Relays a body delimited by `framing` from `src` to `dst`. `buf` holds bytes already read
/// from `src` (the body starts at its beginning; what follows the body stays in it); `pending`
/// holds bytes not yet written to `dst` (a head), sent together with the first body bytes.
/// `decode`: a chunked body is written as its data only.
///
/// Returns when the body has ended and everything is written. Errors: the sender failed,
/// closed early or framed its chunks badly; the receiver failed.
pub async fn relay<R, W>(
    framing: Framing,
    decode: bool,
    src: &mut R,
    buf: &mut BytesMut,
    dst: &mut W,
    pending: &mut Vec<u8>,
) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match framing {
        Framing::Empty => {}
        Framing::Length(length) => {
            let mut left = length;
            while left > 0 {
                if buf.is_empty() {
                    flush(dst, pending).await?;
                    if read(src, buf).await? == 0 {
                        return Err(RelayError::Truncated(left));
                    }
                }
                let n = left.min(buf.len() as u64) as usize;
                send(dst, pending, &buf[..n]).await?;
                buf.advance(n);
                left -= n as u64;
            }
        }
        Framing::Chunked => {
            let mut chunked = Chunked::default();
            while !chunked.done() {
                // The body bytes at the front of the buffer, forwarded in one piece.
                let mut whole = 0;
                loop {
                    match chunked.next(&buf[whole..])? {
                        Piece::Incomplete => break,
                        Piece::Framing(n) => whole += n,
                        Piece::Data(n) if decode => {
                            pending.extend_from_slice(&buf[whole..whole + n]);
                            whole += n;
                        }
                        Piece::Data(n) => whole += n,
                    }
                    if chunked.done() {
                        break;
                    }
                }
                if decode {
                    buf.advance(whole);
                } else if whole > 0 {
                    send(dst, pending, &buf[..whole]).await?;
                    buf.advance(whole);
                }
                if !chunked.done() {
                    flush(dst, pending).await?;
                    if read(src, buf).await? == 0 {
                        return Err(RelayError::Chunk("the connection closed inside the body"));
                    }
                }
            }
        }
        Framing::UntilClose => loop {
            if !buf.is_empty() {
                send(dst, pending, buf).await?;
                buf.clear();
            }
            flush(dst, pending).await?;
            if read(src, buf).await? == 0 {
                break;
            }
        },
    }
    flush(dst, pending).await
}

async fn read<R: AsyncRead + Unpin>(src: &mut R, buf: &mut BytesMut) -> Result<usize, RelayError> {
    buf.reserve(READ_SIZE);
    src.read_buf(buf).await.map_err(RelayError::Read)
}

/// Writes `bytes` after what is pending: gathered into one write while small.
async fn send<W: AsyncWrite + Unpin>(
    dst: &mut W,
    pending: &mut Vec<u8>,
    bytes: &[u8],
) -> Result<(), RelayError> {
    if pending.len() + bytes.len() <= GATHER {
        pending.extend_from_slice(bytes);
        return Ok(());
    }
    flush(dst, pending).await?;
    dst.write_all(bytes).await.map_err(RelayError::Write)
}

/// Writes what is pending.
pub async fn flush<W: AsyncWrite + Unpin>(
    dst: &mut W,
    pending: &mut Vec<u8>,
) -> Result<(), RelayError> {
    if !pending.is_empty() {
        let written = dst.write_all(pending).await;
        pending.clear();
        written.map_err(RelayError::Write)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relays `input` (arriving in pieces of `step` bytes) and returns what was written and
    /// what stayed in the buffer.
    async fn run(framing: Framing, decode: bool, input: &[u8], step: usize) -> (Vec<u8>, Vec<u8>) {
        let (mut tx, mut rx) = tokio::io::duplex(1 << 20);
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            for piece in input.chunks(step) {
                tx.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut pending = b"HEAD|".to_vec();
        relay(framing, decode, &mut rx, &mut buf, &mut out, &mut pending)
            .await
            .unwrap();
        writer.await.unwrap();
        // What the sender wrote after the body is either in the buffer or still unread.
        let mut rest = buf.to_vec();
        let _ = tokio::time::timeout(std::time::Duration::from_millis(50), rx.read_buf(&mut rest))
            .await;
        (out, rest)
    }

    const CHUNKED: &[u8] = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";

    #[tokio::test]
    async fn chunked_bodies_end_where_their_last_chunk_says_in_any_pieces() {
        for step in [1, 2, 3, 7, 64] {
            let (out, rest) = run(Framing::Chunked, false, CHUNKED, step).await;
            let body = &CHUNKED[..CHUNKED.len() - 4];
            assert_eq!(out, [b"HEAD|".as_slice(), body].concat(), "step {step}");
            assert_eq!(rest, b"NEXT", "step {step}");
            let (out, rest) = run(Framing::Chunked, true, CHUNKED, step).await;
            assert_eq!(out, b"HEAD|hello, world", "step {step}");
            assert_eq!(rest, b"NEXT", "step {step}");
        }
    }

    #[tokio::test]
    async fn lengths_stop_at_their_end_and_until_close_reads_all() {
        let (out, rest) = run(Framing::Length(5), false, b"helloNEXT", 2).await;
        assert_eq!(out, b"HEAD|hello");
        assert_eq!(rest, b"NEXT");
        let (out, _) = run(Framing::UntilClose, false, b"all of it", 4).await;
        assert_eq!(out, b"HEAD|all of it");
        let (out, rest) = run(Framing::Empty, false, b"NEXT", 4).await;
        assert_eq!(out, b"HEAD|");
        assert_eq!(rest, b"NEXT");
    }

    #[tokio::test]
    async fn bad_and_truncated_bodies_are_errors() {
        async fn fails(framing: Framing, input: &'static [u8]) -> RelayError {
            let (mut tx, mut rx) = tokio::io::duplex(1024);
            tx.write_all(input).await.unwrap();
            drop(tx);
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            relay(framing, false, &mut rx, &mut buf, &mut out, &mut Vec::new())
                .await
                .unwrap_err()
        }
        assert!(matches!(
            fails(Framing::Length(10), b"short").await,
            RelayError::Truncated(5)
        ));
        for bad in [
            b"zz\r\nhello\r\n0\r\n\r\n".as_slice(),
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\r\nhel",
            b"5\r\nhello\r\n",
        ] {
            assert!(
                matches!(fails(Framing::Chunked, bad).await, RelayError::Chunk(_)),
                "{bad:?}"
            );
        }
        let long_line = [b"1;".as_slice(), &[b'x'; MAX_CHUNK_LINE]].concat();
        let mut chunked = Chunked::default();
        assert!(chunked.next(&long_line).is_err());
    }
}
