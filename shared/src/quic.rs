//! QUIC and TLS settings both ends must agree on: ALPN, server name, idle timeout, keep-alive,
//! and who verifies whom.
//!
//! The directory's certificate always names [`SERVER_NAME`], whatever address it listens on,
//! so nodes verify it against the cluster CA (`ca.pem`) and may dial it by any address. The
//! control plane (ALPN `usher/1`) is mutual TLS: a node presents its node certificate
//! ([`NodeCert`]), which must chain to the same CA. The join endpoint (ALPN `usher-join/1`)
//! takes nodes without a certificate; a joining node pins the CA by the fingerprint in its
//! join token instead of trusting a CA file.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use thiserror::Error;

/// ALPN protocol id of the usher control plane.
pub const ALPN: &[u8] = b"usher/1";

/// ALPN protocol id of the directory's join endpoint (enrolment and renewal).
pub const JOIN_ALPN: &[u8] = b"usher-join/1";

/// The DNS name in the directory's certificate; nodes verify the directory against it.
pub const SERVER_NAME: &str = "usher-directory";

/// A connection with no packets for this long is dead (both ends; the smaller of the two
/// advertised wins, RFC 9000 §10.1). Sidecars and joining nodes advertise it; agents advertise
/// none, so the directory's [`server_config`] idle timeout, sized to its heartbeat interval,
/// is the one their connections keep.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Sidecars send a keep-alive after this long without a packet from the directory, so a
/// silent directory is noticed within the idle timeout (a quiet route table sends nothing);
/// below half the idle timeout, so one lost keep-alive does not end a connection. Agents send
/// none: their heartbeats, at the interval the directory dictates, keep the connection alive.
/// (With a keep-alive, an agent told to heartbeat every 3 s sent a PING 2 s after each
/// heartbeat, and the PING and its ACK doubled the directory's datagrams: 42,384 a second at
/// 30,000 agents in `bench/directory`, where the heartbeats and their acknowledgements make
/// about 22,000.)
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);

/// UDP socket buffers (receive and send, bytes) the directory and nodes ask for. A burst of
/// heartbeats from 10,000 agents, or a batch to 1,000 sidecars, overflows Linux's default
/// 208 KiB: the kernel drops datagrams (28% of them in the fleet benchmark), QUIC retransmits
/// and slows down, and heartbeats miss their deadline. The kernel caps the request at
/// `net.core.rmem_max` / `net.core.wmem_max` (deploy/systemd/README.md raises them).
pub const UDP_BUFFER: usize = 4 * 1024 * 1024;

/// Asks for [`UDP_BUFFER`]-sized receive and send buffers on `socket`; returns the receive
/// buffer the kernel granted, in bytes (Linux reports twice what it grants for data, counting
/// its bookkeeping). Errors if the socket refuses the options.
pub fn size_udp_buffers(socket: &std::net::UdpSocket) -> std::io::Result<usize> {
    let socket = socket2::SockRef::from(socket);
    socket.set_recv_buffer_size(UDP_BUFFER)?;
    socket.set_send_buffer_size(UDP_BUFFER)?;
    socket.recv_buffer_size()
}

/// Streams one peer may have open at once: a node needs one or two. A peer that opens more
/// waits (QUIC flow control) until one ends; uni-directional streams are not accepted at all.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 8;

/// Bytes a node may send on one stream beyond what the directory has read (QUIC stream flow
/// control window): 256 KiB, four of the largest frames a node may send
/// ([`MAX_NODE_FRAME`](crate::codec::MAX_NODE_FRAME)). A node that floods waits for the
/// directory to read instead of filling its memory.
pub const DIRECTORY_STREAM_WINDOW: u32 = 4 * crate::codec::MAX_NODE_FRAME as u32;

/// Bytes a node may send beyond what the directory has read, over all its streams on one
/// connection: 1 MiB. With [`DIRECTORY_STREAM_WINDOW`], a connection costs the directory at
/// most this much buffered input.
pub const DIRECTORY_CONNECTION_WINDOW: u32 = 1024 * 1024;

/// Bytes the directory may send on one stream beyond what a node has read: 2 MiB, two of the
/// largest frames the directory sends
/// ([`MAX_DIRECTORY_FRAME`](crate::codec::MAX_DIRECTORY_FRAME)), so a snapshot streams without
/// waiting on every frame.
pub const NODE_STREAM_WINDOW: u32 = 2 * crate::codec::MAX_DIRECTORY_FRAME as u32;

/// Bytes the directory may send beyond what a node has read, over the whole connection: 4 MiB.
pub const NODE_CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;

/// Why TLS material could not be used.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("no certificate found in the PEM data")]
    NoCertificate,
    #[error("bad PEM data: {0}")]
    Pem(#[from] rustls::pki_types::pem::Error),
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("cannot build the certificate verifier: {0}")]
    Verifier(String),
    #[error("QUIC cannot use this TLS configuration: {0}")]
    Quic(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How a node's connection to the directory stays alive while it has nothing to say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// A keep-alive after [`KEEP_ALIVE`] of silence, and [`IDLE_TIMEOUT`]: a sidecar, whose
    /// subscription may carry nothing for a long time.
    KeepAlive,
    /// Its own messages at the interval the directory dictates: an agent's heartbeats. No
    /// keep-alive and no idle timeout of its own, so the directory's applies (see
    /// [`server_config`]).
    Heartbeats,
    /// Neither: a short exchange (joining, renewing), ended by [`IDLE_TIMEOUT`] if the
    /// directory falls silent.
    Exchange,
}

/// Which end a transport configuration is for: its receive windows and liveness differ.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    /// A node: receives route tables.
    Node(Liveness),
    /// The directory (control plane and join endpoint): receives small node messages; a
    /// connection silent for `idle_timeout` is dead.
    Directory { idle_timeout: Duration },
}

fn transport(end: End) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    let idle_timeout = match end {
        End::Node(Liveness::Heartbeats) => None,
        End::Node(_) => Some(IDLE_TIMEOUT),
        End::Directory { idle_timeout } => Some(idle_timeout),
    };
    // QUIC's limit is 2^62 ms; a longer timeout (none asked for here) would mean none.
    t.max_idle_timeout(idle_timeout.and_then(|d| d.try_into().ok()));
    let (stream_window, connection_window) = match end {
        End::Node(liveness) => {
            if liveness == Liveness::KeepAlive {
                t.keep_alive_interval(Some(KEEP_ALIVE));
            }
            // No path MTU discovery: what a node sends (hello, registration, heartbeats,
            // subscription, load reports) is small, so probing for larger datagrams gains
            // nothing, and it cost every connection 4 probes and their 4 acknowledgements
            // after its handshake, then one more every 10 minutes, at the directory.
            t.mtu_discovery_config(None);
            (NODE_STREAM_WINDOW, NODE_CONNECTION_WINDOW)
        }
        End::Directory { .. } => {
            // One datagram per send: with segmentation offload every connection keeps a
            // transmit buffer of ten datagrams (13 KiB; 130 MB at 10,000 agents), which
            // heartbeat acknowledgements and batches of deltas never fill.
            t.enable_segmentation_offload(false);
            // Datagrams of the minimum QUIC size (1,200 bytes): path MTU discovery's first
            // larger probe doubles every connection's transmit buffer (1.2 → 2.4 KB; 13 MB
            // at 11,000 connections), and what the directory sends is heartbeat
            // acknowledgements and batches of deltas that fit one minimum datagram. Only a
            // full snapshot to a sidecar takes more datagrams (about a fifth more).
            t.mtu_discovery_config(None);
            (DIRECTORY_STREAM_WINDOW, DIRECTORY_CONNECTION_WINDOW)
        }
    };
    t.stream_receive_window(stream_window.into());
    t.receive_window(connection_window.into());
    t.max_concurrent_bidi_streams(MAX_STREAMS_PER_CONNECTION.into());
    t.max_concurrent_uni_streams(0u32.into());
    // usher sends no datagrams; refuse to buffer any.
    t.datagram_receive_buffer_size(None);
    Arc::new(t)
}

/// Parses every certificate in a PEM document.
pub fn parse_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(certs)
}

/// A node's certificate and key, swappable while connections live: a renewed certificate is
/// used from the next handshake on, the live session keeps the one it was opened with.
#[derive(Debug)]
pub struct NodeCert {
    current: std::sync::RwLock<Arc<CertifiedKey>>,
}

impl NodeCert {
    /// Parses a certificate chain and its private key (PEM).
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        Ok(Self {
            current: std::sync::RwLock::new(certified_key(cert_pem, key_pem)?),
        })
    }

    /// Uses `other`'s certificate and key for the next handshakes (a renewal).
    pub fn adopt(&self, other: &NodeCert) {
        let key = other.get();
        match self.current.write() {
            Ok(mut current) => *current = key,
            Err(poisoned) => *poisoned.into_inner() = key,
        }
    }

    fn get(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl rustls::client::ResolvesClientCert for NodeCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = parse_certificates(cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)?;
    Ok(Arc::new(CertifiedKey::new(certs, signer)))
}

fn roots(ca_pem: &[u8]) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in parse_certificates(ca_pem)? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}

fn quic_client(
    mut tls: rustls::ClientConfig,
    alpn: &[u8],
    liveness: Liveness,
) -> Result<quinn::ClientConfig, TlsError> {
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport(End::Node(liveness)));
    Ok(config)
}

/// A node's QUIC client configuration: trusts only the CA in `ca_pem`, presents `cert`
/// (mutual TLS), speaks ALPN `usher/1`, TLS 1.3 with the `ring` provider, and stays alive as
/// `liveness` says (a sidecar [`Liveness::KeepAlive`], an agent [`Liveness::Heartbeats`]).
pub fn client_config(
    ca_pem: &[u8],
    cert: Arc<NodeCert>,
    liveness: Liveness,
) -> Result<quinn::ClientConfig, TlsError> {
    node_client(ca_pem, cert, ALPN, liveness)
}

/// A node's configuration for renewing over the join endpoint: trusts the CA in `ca_pem`,
/// presents its current certificate `cert` as proof, ALPN `usher-join/1`.
pub fn renew_client_config(
    ca_pem: &[u8],
    cert: Arc<NodeCert>,
) -> Result<quinn::ClientConfig, TlsError> {
    node_client(ca_pem, cert, JOIN_ALPN, Liveness::Exchange)
}

fn node_client(
    ca_pem: &[u8],
    cert: Arc<NodeCert>,
    alpn: &[u8],
    liveness: Liveness,
) -> Result<quinn::ClientConfig, TlsError> {
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_cert_resolver(cert);
    quic_client(tls, alpn, liveness)
}

/// A joining node's configuration: it has no CA yet, so it accepts the directory's
/// certificate only if it chains (webpki) to a CA certificate in the presented chain whose
/// SHA-256 equals `ca_digest`, the digest in its join token (SwarmKit: the token pins the CA).
/// No client certificate; ALPN `usher-join/1`.
pub fn join_client_config(ca_digest: &str) -> Result<quinn::ClientConfig, TlsError> {
    let verifier = Arc::new(PinnedCa {
        digest: ca_digest.to_string(),
        provider: provider(),
    });
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    quic_client(tls, JOIN_ALPN, Liveness::Exchange)
}

/// Verifies a server against the CA in its own chain whose fingerprint is pinned.
#[derive(Debug)]
struct PinnedCa {
    digest: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| crate::identity::sha256_hex(c.as_ref()) == self.digest)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the directory's CA does not match the join token's CA fingerprint".into(),
                )
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Whether a server requires a client certificate (it always verifies a presented one).
#[derive(Clone, Copy, PartialEq, Eq)]
enum ClientAuth {
    Required,
    Optional,
}

fn quic_server(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: &[u8],
    client_auth: ClientAuth,
    alpn: &[u8],
    idle_timeout: Duration,
) -> Result<quinn::ServerConfig, TlsError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots(client_ca_pem)?,
        provider(),
    );
    let verifier = match client_auth {
        ClientAuth::Required => verifier,
        ClientAuth::Optional => verifier.allow_unauthenticated(),
    }
    .build()
    .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            parse_certificates(cert_pem)?,
            PrivateKeyDer::from_pem_slice(key_pem)?,
        )?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.max_early_data_size = 0;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport(End::Directory { idle_timeout }));
    Ok(config)
}

/// The directory's QUIC server configuration from its certificate chain and private key
/// (PEM): ALPN `usher/1`, and every client must present a certificate chaining to the CA in
/// `client_ca_pem` (rustls `WebPkiClientVerifier`), or the handshake fails. A connection
/// silent for `idle_timeout` is dead: agents advertise no idle timeout of their own, so theirs
/// is this one, which must exceed the longest gap between two heartbeats (see
/// `usher-directory`'s `Config::connection_idle_timeout`); sidecars advertise
/// [`IDLE_TIMEOUT`], and the smaller wins.
pub fn server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: &[u8],
    idle_timeout: Duration,
) -> Result<quinn::ServerConfig, TlsError> {
    quic_server(
        cert_pem,
        key_pem,
        client_ca_pem,
        ClientAuth::Required,
        ALPN,
        idle_timeout,
    )
}

/// The directory's join endpoint: ALPN `usher-join/1`; a client certificate is optional
/// (joining nodes have none) but, when presented, must chain to `client_ca_pem` (renewal).
pub fn join_server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: &[u8],
) -> Result<quinn::ServerConfig, TlsError> {
    quic_server(
        cert_pem,
        key_pem,
        client_ca_pem,
        ClientAuth::Optional,
        JOIN_ALPN,
        IDLE_TIMEOUT,
    )
}

/// The certificate chain a peer presented on `connection`, leaf first (empty if none).
pub fn peer_certificates(connection: &quinn::Connection) -> Vec<CertificateDer<'static>> {
    connection
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|certs| *certs)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA and a directory certificate from it: `(ca_pem, chain_pem, key_pem)`.
    fn cluster() -> (String, String, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(vec![]).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let server = rcgen::CertificateParams::new(vec![SERVER_NAME.into()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let chain = format!("{}{}", server.pem(), ca.pem());
        (ca.pem(), chain, key.serialize_pem())
    }

    /// A server on loopback with the directory's transport settings that accepts connections
    /// and never reads: `(endpoint, address, ca_pem)`.
    fn silent_directory() -> (quinn::Endpoint, std::net::SocketAddr, String) {
        let (ca, chain, key) = cluster();
        let server = join_server_config(chain.as_bytes(), key.as_bytes(), ca.as_bytes()).unwrap();
        let endpoint =
            quinn::Endpoint::server(server, std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
                .unwrap();
        let addr = endpoint.local_addr().unwrap();
        let accepting = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                tokio::spawn(async move {
                    if let Ok(connection) = incoming.await {
                        connection.closed().await;
                    }
                });
            }
        });
        (endpoint, addr, ca)
    }

    async fn connect_to(addr: std::net::SocketAddr, ca: &str) -> quinn::Connection {
        let mut client =
            quinn::Endpoint::client(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let digest = crate::identity::ca_fingerprint(ca.as_bytes()).unwrap();
        client.set_default_client_config(join_client_config(&digest).unwrap());
        client.connect(addr, SERVER_NAME).unwrap().await.unwrap()
    }

    /// A node that floods one stream the directory does not read is stopped by flow control
    /// after [`DIRECTORY_STREAM_WINDOW`] bytes; one that opens more than
    /// [`MAX_STREAMS_PER_CONNECTION`] streams waits; a uni-directional stream is never granted.
    #[tokio::test]
    async fn a_flooding_node_is_held_by_the_directory_windows_and_stream_limit() {
        let (endpoint, addr, ca) = silent_directory();
        let connection = connect_to(addr, &ca).await;
        let (mut send, _recv) = connection.open_bi().await.unwrap();
        let chunk = vec![7u8; 16 * 1024];
        let mut sent = 0usize;
        loop {
            let wrote = tokio::time::timeout(Duration::from_millis(300), send.write(&chunk)).await;
            match wrote {
                Ok(Ok(n)) => sent += n,
                Ok(Err(e)) => panic!("write failed: {e}"),
                Err(_) => break, // blocked: no more credit
            }
            assert!(
                sent <= 4 * DIRECTORY_STREAM_WINDOW as usize,
                "{sent} bytes accepted"
            );
        }
        assert!(
            sent <= DIRECTORY_STREAM_WINDOW as usize,
            "{sent} bytes accepted"
        );
        assert!(
            sent >= DIRECTORY_STREAM_WINDOW as usize / 2,
            "{sent} bytes accepted"
        );

        let mut streams = Vec::new();
        for _ in 1..MAX_STREAMS_PER_CONNECTION {
            let (mut send, recv) = connection.open_bi().await.unwrap();
            send.write_all(b"x").await.unwrap();
            streams.push((send, recv));
        }
        let one_more = tokio::time::timeout(Duration::from_millis(300), connection.open_bi()).await;
        assert!(one_more.is_err(), "a stream beyond the limit was granted");
        let uni = tokio::time::timeout(Duration::from_millis(300), connection.open_uni()).await;
        assert!(uni.is_err(), "a uni-directional stream was granted");
        endpoint.close(0u32.into(), b"done");
    }

    /// A joining node accepts the join endpoint only if its CA has the token's fingerprint:
    /// a directory of another cluster (or a man in the middle) fails the handshake.
    #[tokio::test]
    async fn a_joining_node_pins_the_ca_by_the_token_digest() {
        let (endpoint, addr, ca) = silent_directory();
        let connect = |digest: String| async move {
            let mut client =
                quinn::Endpoint::client(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
            client.set_default_client_config(join_client_config(&digest).unwrap());
            client.connect(addr, SERVER_NAME).unwrap().await
        };
        let digest = crate::identity::ca_fingerprint(ca.as_bytes()).unwrap();
        assert!(connect(digest).await.is_ok());
        let (other_ca, _, _) = cluster();
        let other = crate::identity::ca_fingerprint(other_ca.as_bytes()).unwrap();
        let e = connect(other).await.unwrap_err().to_string();
        assert!(e.contains("fingerprint"), "{e}");
        endpoint.close(0u32.into(), b"done");
    }
}
