//! Keep-alive TCP connections to instances: one idle list per instance address.
//!
//! A connection goes back to the pool only after its response was read to the end with
//! nothing after it, so an idle connection is always free for the next request. One the
//! instance closed while idle is noticed at checkout (its end of stream is already known to the
//! reactor, so the check costs no system call) and dropped; [`Pool::sweep`] drops idle ones
//! older than [`IDLE_TIMEOUT`], so instances that left the table keep no descriptor open.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use thiserror::Error;
use tokio::net::TcpStream;

use usher_shared::FastHash;

/// Idle connections kept per instance.
pub const MAX_IDLE_PER_INSTANCE: usize = 64;
/// How long a connection may stay idle in the pool (instances commonly close idle keep-alive
/// connections after 60–75 s; closing first avoids the race).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// Bytes of read buffer a new connection starts with.
const BUFFER: usize = 8 * 1024;

/// Why a new connection to an instance could not be made.
#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("cannot connect to {address}: {source}")]
    Io {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to {address}: no answer within {after:?}")]
    Timeout {
        address: SocketAddr,
        after: Duration,
    },
}

/// A connection to an instance and the bytes read from it but not yet relayed.
#[derive(Debug)]
pub struct Upstream {
    pub stream: TcpStream,
    pub buf: BytesMut,
}

#[derive(Debug)]
struct Idle {
    upstream: Upstream,
    since: Instant,
}

/// Idle connections by instance address.
#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>, FastHash>>,
}

impl Pool {
    /// An idle connection to `address` that is still open, if any (newest first: the least
    /// likely to have been closed by the instance).
    pub fn checkout(&self, address: SocketAddr) -> Option<Upstream> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(&address)?;
        while let Some(Idle { upstream, .. }) = list.pop() {
            if open(&upstream.stream) {
                return Some(upstream);
            }
        }
        None
    }

    /// Returns a connection whose response was read to the end.
    pub fn put(&self, address: SocketAddr, upstream: Upstream) {
        debug_assert!(upstream.buf.is_empty());
        let since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(address).or_default();
        if list.len() >= MAX_IDLE_PER_INSTANCE {
            list.retain(|i| open(&i.upstream.stream));
        }
        if list.len() < MAX_IDLE_PER_INSTANCE {
            list.push(Idle { upstream, since });
        }
    }

    /// Drops idle connections that are closed or older than [`IDLE_TIMEOUT`]; returns how many
    /// stay.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|_, list| {
            list.retain(|i| now.duration_since(i.since) < IDLE_TIMEOUT && open(&i.upstream.stream));
            !list.is_empty()
        });
        idle.values().map(Vec::len).sum()
    }

    /// Opens a new connection to `address` within `timeout`.
    pub async fn connect(address: SocketAddr, timeout: Duration) -> Result<Upstream, ConnectError> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => return Err(ConnectError::Io { address, source }),
            Err(_) => {
                return Err(ConnectError::Timeout {
                    address,
                    after: timeout,
                })
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(Upstream {
            stream,
            buf: BytesMut::with_capacity(BUFFER),
        })
    }
}

/// Whether an idle connection is still open: nothing to read (any byte or the end of stream
/// means the instance closed it or broke the protocol).
fn open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn closed_idle_connections_are_not_checked_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let pool = Pool::default();
        let first = Pool::connect(address, Duration::from_secs(1))
            .await
            .unwrap();
        let (mut accepted_first, _) = listener.accept().await.unwrap();
        let second = Pool::connect(address, Duration::from_secs(1))
            .await
            .unwrap();
        let (accepted_second, _) = listener.accept().await.unwrap();
        pool.put(address, first);
        pool.put(address, second);
        // The instance closes the second one and writes stray bytes on the first.
        drop(accepted_second);
        accepted_first.write_all(b"stray").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(pool.checkout(address).is_none());
        assert_eq!(pool.sweep(), 0);

        let third = Pool::connect(address, Duration::from_secs(1))
            .await
            .unwrap();
        let _accepted_third = listener.accept().await.unwrap();
        pool.put(address, third);
        assert_eq!(pool.sweep(), 1);
        assert!(pool.checkout(address).is_some());
    }
}
