//! A node's side of the handshake with the directory, used identically by agents and sidecars:
//! resolve the directory's address, connect over QUIC, open a stream, say hello, read welcome.

use std::net::SocketAddr;

use thiserror::Error;

use crate::codec::{read_frame, write_frame, FrameError, MAX_DIRECTORY_FRAME, MAX_NODE_FRAME};
use crate::protocol::{DirectoryMessage, Hello, NodeMessage, Role, PROTOCOL_VERSION};
use crate::quic::{Liveness, SERVER_NAME};

/// Why a session with the directory could not be opened or went away.
#[derive(Debug, Error)]
pub enum SessionError {
    #[error("cannot resolve directory address {addr}: {reason}")]
    Resolve { addr: String, reason: String },
    #[error("cannot connect to the directory: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection to the directory failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("connection to the directory lost: {0}")]
    Lost(quinn::ConnectionError),
    #[error("directory stream failed: {0}")]
    Frame(#[from] FrameError),
    #[error("directory closed the stream")]
    Closed,
    #[error("directory refused: {0}")]
    Refused(String),
    #[error("directory sent {got} where {expected} was expected")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
}

impl SessionError {
    /// A stream that failed because its connection ended says why the connection ended
    /// (`Lost`: reset by peer, timed out, closed by peer and its reason) instead of quinn's
    /// "connection lost"; every other error is kept.
    pub fn with_cause(self, connection: &quinn::Connection) -> Self {
        match (self, connection.close_reason()) {
            (SessionError::Frame(_), Some(reason)) => SessionError::Lost(reason),
            (error, _) => error,
        }
    }
}

/// Reads the directory's next frame from a session's receive stream (for a caller that took
/// the [`Session`] apart to send and receive at once); `Closed` at end of stream, `Refused`
/// for an error frame.
pub async fn recv_message(recv: &mut quinn::RecvStream) -> Result<DirectoryMessage, SessionError> {
    directory_message(read_frame(recv, MAX_DIRECTORY_FRAME).await)
}

/// What a frame read from the directory says: its message; `Closed` at end of stream,
/// `Refused` for an error frame, `Frame` for a frame that could not be read.
pub fn directory_message(
    frame: Result<Option<DirectoryMessage>, FrameError>,
) -> Result<DirectoryMessage, SessionError> {
    match frame? {
        None => Err(SessionError::Closed),
        Some(DirectoryMessage::Error { code, message }) => {
            Err(SessionError::Refused(format!("{code:?}: {message}")))
        }
        Some(msg) => Ok(msg),
    }
}

/// An open conversation with the directory: one QUIC connection and one bidirectional stream.
pub struct Session {
    pub connection: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    /// The directory run's epoch, from its welcome.
    pub epoch: u64,
}

impl Session {
    /// Sends one frame to the directory.
    pub async fn send(&mut self, msg: &NodeMessage) -> Result<(), SessionError> {
        write_frame(&mut self.send, msg, MAX_NODE_FRAME).await?;
        Ok(())
    }

    /// Reads the directory's next frame, as [`recv_message`].
    pub async fn recv(&mut self) -> Result<DirectoryMessage, SessionError> {
        recv_message(&mut self.recv).await
    }

    /// Closes the connection with a reason the directory logs.
    pub fn close(&self, reason: &str) {
        self.connection.close(0u32.into(), reason.as_bytes());
    }
}

/// Resolves `host:port` (a name or an IP literal) to its first socket address.
pub async fn resolve(addr: &str) -> Result<SocketAddr, SessionError> {
    let err = |reason: String| SessionError::Resolve {
        addr: addr.to_string(),
        reason,
    };
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("no address found".into()))
}

/// Connects to the directory at `addr`, opens a stream and exchanges hello/welcome.
pub async fn open(
    endpoint: &quinn::Endpoint,
    addr: &str,
    role: Role,
    node: &str,
) -> Result<Session, SessionError> {
    let target = resolve(addr).await?;
    let connection = endpoint.connect(target, SERVER_NAME)?.await?;
    open_on(connection, role, node).await
}

/// Opens a stream on an established `connection` and exchanges hello/welcome: a new
/// conversation without a new handshake (SwarmKit: a node whose session ended registers again
/// over the connection it has).
pub async fn open_on(
    connection: quinn::Connection,
    role: Role,
    node: &str,
) -> Result<Session, SessionError> {
    let (send, recv) = connection.open_bi().await?;
    let mut session = Session {
        connection,
        send,
        recv,
        epoch: 0,
    };
    session
        .send(&NodeMessage::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            role,
            node: node.to_string(),
        }))
        .await?;
    match session.recv().await? {
        DirectoryMessage::Welcome { epoch, .. } => {
            session.epoch = epoch;
            Ok(session)
        }
        other => Err(SessionError::Unexpected {
            expected: "welcome",
            got: other.kind(),
        }),
    }
}

/// A node name for logs: `<hostname>/<pid>`.
pub fn node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}/{}", std::process::id())
}

/// Why a node cannot open its QUIC endpoint.
#[derive(Debug, Error)]
pub enum EndpointError {
    #[error("cannot use the node's TLS material: {0}")]
    Tls(#[from] crate::quic::TlsError),
    #[error("cannot open a QUIC endpoint: {0}")]
    Socket(#[source] std::io::Error),
}

/// A node's client endpoint on an ephemeral UDP port: trusts the CA of `creds` and presents
/// its certificate (swapped in place when it is renewed); its connections stay alive as
/// `liveness` says (an agent: [`Liveness::Heartbeats`], a sidecar: [`Liveness::KeepAlive`]).
pub fn node_endpoint(
    creds: &crate::enrolment::Credentials,
    liveness: Liveness,
) -> Result<quinn::Endpoint, EndpointError> {
    client_endpoint(crate::quic::client_config(
        &creds.ca_pem,
        creds.cert.clone(),
        liveness,
    )?)
}

/// A client endpoint bound to an ephemeral UDP port with `config` as its default, with
/// [`crate::quic::UDP_BUFFER`]-sized socket buffers (best effort).
pub fn client_endpoint(config: quinn::ClientConfig) -> Result<quinn::Endpoint, EndpointError> {
    let socket = std::net::UdpSocket::bind(std::net::SocketAddr::from(([0, 0, 0, 0], 0)))
        .map_err(EndpointError::Socket)?;
    if let Err(e) = crate::quic::size_udp_buffers(&socket) {
        tracing::debug!(error = %e, "cannot size the UDP socket buffers; keeping the defaults");
    }
    let runtime = quinn::default_runtime()
        .ok_or_else(|| EndpointError::Socket(std::io::Error::other("no async runtime for QUIC")))?;
    let mut endpoint =
        quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
            .map_err(EndpointError::Socket)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}
