//! Keep-alive HTTP/1.1 connections to instances: one idle list per instance address.
//!
//! A connection goes back to the pool only after its response body was read to the end, so an
//! idle connection is always free for the next request. Connect failures are reported apart
//! from request failures: the proxy retries them on another instance (the request was not
//! sent).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::TcpStream;
use tracing::debug;

use crate::proxy::Body;
use usher_shared::FastHash;

/// Idle connections kept per instance.
pub const MAX_IDLE_PER_INSTANCE: usize = 64;

/// Why a new connection to an instance could not be made.
#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("cannot connect to {address}: {source}")]
    Io {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {address}: no answer within {after:?}")]
    Timeout {
        address: SocketAddr,
        after: Duration,
    },
    #[error("HTTP handshake with {address} failed: {source}")]
    Handshake {
        address: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

/// Idle connections by instance address.
#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<SendRequest<Body>>, FastHash>>,
}

impl Pool {
    /// An idle connection to `address` that is still open, if any.
    pub async fn checkout(&self, address: SocketAddr) -> Option<SendRequest<Body>> {
        loop {
            let mut sender = {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                idle.get_mut(&address)?.pop()?
            };
            if sender.is_closed() {
                continue;
            }
            if sender.is_ready() {
                return Some(sender);
            }
            // It was returned after its response ended; its dispatcher may need a moment.
            if let Ok(Ok(())) =
                tokio::time::timeout(Duration::from_millis(50), sender.ready()).await
            {
                return Some(sender);
            }
        }
    }

    /// Returns a connection whose response was read to the end.
    pub fn put(&self, address: SocketAddr, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(address).or_default();
        if list.len() >= MAX_IDLE_PER_INSTANCE {
            list.retain(|s| !s.is_closed());
        }
        if list.len() < MAX_IDLE_PER_INSTANCE {
            list.push(sender);
        }
    }

    /// Opens a new connection to `address` within `timeout`.
    pub async fn connect(
        address: SocketAddr,
        timeout: Duration,
    ) -> Result<SendRequest<Body>, ConnectError> {
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
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ConnectError::Handshake { address, source })?;
        // The connection task ends when the sender is dropped or the instance closes it.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%address, error = %e, "instance connection ended");
            }
        });
        Ok(sender)
    }
}
