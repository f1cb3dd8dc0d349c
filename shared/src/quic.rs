//! QUIC and TLS settings both ends must agree on: ALPN, server name, idle timeout, keep-alive.
//!
//! The directory's certificate always names [`SERVER_NAME`], whatever address it listens on,
//! so nodes verify it against the cluster CA (`ca.pem`) and may dial it by any address.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

/// ALPN protocol id of the usher control plane.
pub const ALPN: &[u8] = b"usher/1";

/// The DNS name in the directory's certificate; nodes verify the directory against it.
pub const SERVER_NAME: &str = "usher-directory";

/// A connection with no packets for this long is dead (both ends; the smaller wins).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Nodes send a keep-alive this often, so a silent directory is noticed within the idle timeout.
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);

/// Streams one peer may have open at once: a node needs one or two.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 8;

/// Why TLS material could not be used.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("no certificate found in the PEM data")]
    NoCertificate,
    #[error("bad PEM data: {0}")]
    Pem(#[from] rustls::pki_types::pem::Error),
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("QUIC cannot use this TLS configuration: {0}")]
    Quic(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport(keep_alive: bool) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .expect("IDLE_TIMEOUT is a small constant"),
    ));
    if keep_alive {
        t.keep_alive_interval(Some(KEEP_ALIVE));
    }
    t.max_concurrent_bidi_streams(MAX_STREAMS_PER_CONNECTION.into());
    t.max_concurrent_uni_streams(0u32.into());
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

/// A node's QUIC client configuration: trusts only the CA in `ca_pem`, speaks ALPN `usher/1`,
/// TLS 1.3 with the `ring` provider, keep-alive every second.
pub fn client_config(ca_pem: &[u8]) -> Result<quinn::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in parse_certificates(ca_pem)? {
        roots.add(cert)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport(true));
    Ok(config)
}

/// The directory's QUIC server configuration from its certificate chain and private key (PEM).
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<quinn::ServerConfig, TlsError> {
    let certs = parse_certificates(cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport(false));
    Ok(config)
}
