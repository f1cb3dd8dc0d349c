//! A node's certificate: where it comes from at start, and its renewal while the node runs.
//! Used identically by agents and sidecars.
//!
//! At start, [`obtain`] picks the first that applies:
//!
//! 1. `--ca`, `--cert` and `--key` (an operator's own PKI): used as given, never renewed.
//! 2. `node.pem`, `node-key.pem` and `ca.pem` in the state directory, for this node's identity
//!    (and, with a join token, the token's CA), still valid: reused while more than a third of
//!    their validity is left, else renewed with themselves as proof (SwarmKit: renew with the
//!    current certificate); if renewal fails, a join token is tried, and failing that they are
//!    used as they are (the renewal loop keeps trying).
//! 3. `--join-token`: enrol over the join endpoint (pin the CA by the token's fingerprint,
//!    send a CSR with the token, store what comes back; SwarmKit's join).
//! 4. Otherwise: an error saying what to pass (or that the stored certificate expired).
//!
//! While the node runs, [`renew`] replaces the certificate when two thirds of its validity
//! have passed; live connections keep theirs, the next handshake uses the new one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, DnType, KeyPair};
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::codec::{read_frame, write_frame, FrameError};
use crate::files::{write_file, Durability};
use crate::identity::{ca_fingerprint, inspect, CertInfo, JoinToken, NodeIdentity};
use crate::join::{JoinRefusal, JoinRequest, JoinResponse, MAX_JOIN_FRAME};
use crate::quic::{NodeCert, TlsError, SERVER_NAME};

/// The node's certificate in its state directory.
pub const NODE_CERT_FILE: &str = "node.pem";
/// The node's private key in its state directory (mode 0600).
pub const NODE_KEY_FILE: &str = "node-key.pem";
/// The cluster CA certificate in the node's state directory.
pub const CA_FILE: &str = "ca.pem";

/// Bound on one exchange with the join endpoint (connect, request, answer).
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a failed renewal waits before trying again.
pub const RENEW_RETRY: Duration = Duration::from_secs(30);

/// How a node gets its certificate (from its flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTls {
    /// What this node runs as: its certificate must carry exactly this identity.
    pub identity: NodeIdentity,
    /// `--ca`: the CA to trust (an operator's PKI, or the directory's `ca.pem`).
    pub ca: Option<PathBuf>,
    /// `--cert` and `--key`: an operator-issued certificate and key (PEM).
    pub cert: Option<(PathBuf, PathBuf)>,
    /// `--join-token`.
    pub join_token: Option<JoinToken>,
    /// `--join-address`: the directory's join endpoint, `host:port`.
    pub join_address: String,
    /// Where `node.pem`, `node-key.pem` and `ca.pem` are kept.
    pub state_dir: PathBuf,
}

/// Where the certificate in use came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `--cert`/`--key`: not renewed by usher.
    Operator,
    /// Issued by the directory (enrolled, reused from the state directory or renewed).
    Directory,
}

/// The certificate a node presents, the CA it trusts, and what they say.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub ca_pem: Vec<u8>,
    pub cert: Arc<NodeCert>,
    pub info: CertInfo,
    pub source: Source,
}

/// Why a node has no usable certificate.
#[derive(Debug, Error)]
pub enum EnrolError {
    #[error("no node certificate: pass --join-token TOKEN (from `usher-directory token create`), or --ca, --cert and --key")]
    NoCredentials,
    #[error("--cert and --key need --ca (the CA that issued them)")]
    OperatorWithoutCa,
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Write(#[from] crate::files::WriteError),
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("the stored certificate {path} expired; pass --join-token to enrol again")]
    Expired { path: PathBuf },
    #[error("cannot create a key or CSR: {0}")]
    Csr(#[from] rcgen::Error),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot reach the directory's join endpoint {address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("the directory refused to issue a certificate ({reason:?}): {message}")]
    Refused {
        reason: JoinRefusal,
        message: String,
    },
    #[error("the join endpoint {address} answered badly: {reason}")]
    Protocol { address: String, reason: String },
}

impl EnrolError {
    /// Whether the directory refused (the token or certificate, not the network): a node
    /// exits with code 3 on it.
    pub fn is_refusal(&self) -> bool {
        matches!(self, EnrolError::Refused { .. })
    }
}

fn now_unix() -> i64 {
    (crate::unix_millis() / 1000) as i64
}

fn read(path: &Path) -> Result<Vec<u8>, EnrolError> {
    std::fs::read(path).map_err(|source| EnrolError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn bad(path: &Path, reason: impl ToString) -> EnrolError {
    EnrolError::BadFile {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Reads and checks a certificate/key/CA triple: they parse, and the certificate's identity
/// is read (not yet compared with what the node wants).
fn load(ca: &Path, cert: &Path, key: &Path, source: Source) -> Result<Credentials, EnrolError> {
    let ca_pem = read(ca)?;
    crate::quic::parse_certificates(&ca_pem).map_err(|e| bad(ca, e))?;
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let certs = crate::quic::parse_certificates(&cert_pem).map_err(|e| bad(cert, e))?;
    let info = inspect(certs[0].as_ref()).map_err(|e| bad(cert, e))?;
    let node_cert = NodeCert::from_pem(&cert_pem, &key_pem).map_err(|e| bad(key, e))?;
    Ok(Credentials {
        ca_pem,
        cert: Arc::new(node_cert),
        info,
        source,
    })
}

/// The node's certificate at start (see the module docs for the order). Errors name the
/// file or say what to pass; [`EnrolError::is_refusal`] tells a refusal by the directory.
pub async fn obtain(tls: &NodeTls) -> Result<Credentials, EnrolError> {
    if let Some((cert, key)) = &tls.cert {
        let ca = tls.ca.as_ref().ok_or(EnrolError::OperatorWithoutCa)?;
        let creds = load(ca, cert, key, Source::Operator)?;
        if creds.info.identity != tls.identity {
            warn!(certificate = %creds.info.identity, node = %tls.identity,
                  "the certificate's identity is not this node's; the directory will refuse what it may not do");
        }
        return Ok(creds);
    }
    let now = now_unix();
    let stored = match load_stored(tls) {
        Ok(Some(creds)) => Some(creds),
        Ok(None) => None,
        Err(e) => {
            warn!(error = %e, "ignoring the stored certificate");
            None
        }
    };
    // A stored certificate for this identity (and the token's CA, with a token) that is still
    // valid: reused, or renewed with itself as proof when due. A token is spent only when
    // there is no such certificate, or renewal failed (the token may have expired meanwhile:
    // then the stored certificate is used as it is until the renewal loop succeeds).
    let usable = stored.filter(|creds| {
        let same_ca = match &tls.join_token {
            Some(token) => ca_fingerprint(&creds.ca_pem).ok().as_deref() == Some(&token.ca_digest),
            None => true,
        };
        creds.info.identity == tls.identity && same_ca
    });
    match (usable, &tls.join_token) {
        (Some(creds), token) if creds.info.valid_at(now) => {
            if !creds.info.renewal_due(now) {
                info!(identity = %creds.info.identity, "using the stored node certificate");
                return Ok(creds);
            }
            let e = match renew_once(tls, &creds).await {
                Ok(renewed) => return Ok(renewed),
                Err(e) => e,
            };
            if let Some(token) = token {
                match enrol(tls, token).await {
                    Ok(enrolled) => return Ok(enrolled),
                    Err(e) => warn!(error = %e, "cannot enrol again with the join token"),
                }
            }
            warn!(error = %e, "cannot renew the stored certificate yet; using it as it is");
            Ok(creds)
        }
        (_, Some(token)) => enrol(tls, token).await,
        (Some(_), None) => Err(EnrolError::Expired {
            path: tls.state_dir.join(NODE_CERT_FILE),
        }),
        (None, None) => Err(EnrolError::NoCredentials),
    }
}

/// The stored triple, if all three files exist.
fn load_stored(tls: &NodeTls) -> Result<Option<Credentials>, EnrolError> {
    let dir = &tls.state_dir;
    let (ca, cert, key) = (
        dir.join(CA_FILE),
        dir.join(NODE_CERT_FILE),
        dir.join(NODE_KEY_FILE),
    );
    if !(cert.exists() && key.exists()) {
        return Ok(None);
    }
    // `--ca` (for example the directory's own ca.pem for the agents it starts) wins.
    let ca = tls.ca.clone().unwrap_or(ca);
    load(&ca, &cert, &key, Source::Directory).map(Some)
}

/// A fresh P-256 key and a CSR for it (rcgen); the directory sets the identity itself.
fn key_and_csr(identity: &NodeIdentity) -> Result<(KeyPair, String), EnrolError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, identity.uri());
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

/// Enrols with `token`: see [`exchange`].
async fn enrol(tls: &NodeTls, token: &JoinToken) -> Result<Credentials, EnrolError> {
    let (key, csr_pem) = key_and_csr(&tls.identity)?;
    let config = crate::quic::join_client_config(&token.ca_digest)?;
    let request = JoinRequest::Enrol {
        token: token.to_string(),
        role: tls.identity.role(),
        service: tls.identity.service().map(String::from),
        csr_pem,
    };
    let creds = exchange(tls, config, &request, &key, Some(&token.ca_digest)).await?;
    info!(identity = %creds.info.identity, join = %tls.join_address,
          "enrolled with the join token; certificate stored");
    Ok(creds)
}

/// Renews `current` with itself as proof: see [`exchange`].
async fn renew_once(tls: &NodeTls, current: &Credentials) -> Result<Credentials, EnrolError> {
    let (key, csr_pem) = key_and_csr(&tls.identity)?;
    let config = crate::quic::renew_client_config(&current.ca_pem, current.cert.clone())?;
    let digest = ca_fingerprint(&current.ca_pem)?;
    exchange(
        tls,
        config,
        &JoinRequest::Renew { csr_pem },
        &key,
        Some(&digest),
    )
    .await
}

/// One request to the join endpoint; on `Issued`, checks the CA against `ca_digest` and the
/// certificate's identity against the node's, stores the three files and returns them.
async fn exchange(
    tls: &NodeTls,
    config: quinn::ClientConfig,
    request: &JoinRequest,
    key: &KeyPair,
    ca_digest: Option<&str>,
) -> Result<Credentials, EnrolError> {
    let address = tls.join_address.clone();
    let unreachable = |reason: String| EnrolError::Unreachable {
        address: address.clone(),
        reason,
    };
    let protocol = |reason: String| EnrolError::Protocol {
        address: address.clone(),
        reason,
    };
    let target = crate::session::resolve(&address)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let mut endpoint = quinn::Endpoint::client(std::net::SocketAddr::from(([0, 0, 0, 0], 0)))
        .map_err(|e| unreachable(e.to_string()))?;
    endpoint.set_default_client_config(config);
    let answer = tokio::time::timeout(JOIN_TIMEOUT, async {
        let connection = endpoint
            .connect(target, SERVER_NAME)
            .map_err(|e| unreachable(e.to_string()))?
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut send, mut recv) = connection
            .open_bi()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        write_frame(&mut send, request, MAX_JOIN_FRAME)
            .await
            .map_err(|e: FrameError| unreachable(e.to_string()))?;
        let _ = send.finish();
        let answer: Option<JoinResponse> =
            read_frame(&mut recv, MAX_JOIN_FRAME)
                .await
                .map_err(|e| match e {
                    FrameError::Io(_) => unreachable(e.to_string()),
                    other => protocol(other.to_string()),
                })?;
        connection.close(0u32.into(), b"done");
        answer.ok_or_else(|| protocol("closed without an answer".into()))
    })
    .await;
    endpoint.close(0u32.into(), b"done");
    let answer =
        answer.map_err(|_| unreachable(format!("no answer within {JOIN_TIMEOUT:?}")))??;
    let (cert_pem, ca_pem) = match answer {
        JoinResponse::Issued { cert_pem, ca_pem } => (cert_pem, ca_pem),
        JoinResponse::Refused { reason, message } => {
            return Err(EnrolError::Refused { reason, message })
        }
    };
    let got_digest = ca_fingerprint(ca_pem.as_bytes()).map_err(|e| protocol(e.to_string()))?;
    if ca_digest.is_some_and(|d| d != got_digest) {
        return Err(protocol(
            "the CA it sent does not match the join token's fingerprint".into(),
        ));
    }
    let certs = crate::quic::parse_certificates(cert_pem.as_bytes())
        .map_err(|e| protocol(e.to_string()))?;
    let info = inspect(certs[0].as_ref()).map_err(|e| protocol(e.to_string()))?;
    if info.identity != tls.identity {
        return Err(protocol(format!(
            "it issued a certificate for {}, not for {}",
            info.identity, tls.identity
        )));
    }
    let key_pem = key.serialize_pem();
    let cert = NodeCert::from_pem(cert_pem.as_bytes(), key_pem.as_bytes())?;
    store(
        &tls.state_dir,
        &cert_pem,
        &key_pem,
        &ca_pem,
        Durability::Durable,
    )?;
    Ok(Credentials {
        ca_pem: ca_pem.into_bytes(),
        cert: Arc::new(cert),
        info,
        source: Source::Directory,
    })
}

/// Writes `ca.pem`, `node-key.pem` (0600) and `node.pem` into `dir` (created if missing),
/// each atomically; the certificate last, so a crash never pairs a new certificate with an
/// old key. `durability` says whether they must survive a crash of the host: a node's own
/// enrolment must; the credentials the directory writes for an agent it is about to start
/// need not (a crash takes the agent too, and its replacement gets new ones). Errors name the
/// file.
pub fn store(
    dir: &Path,
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
    durability: Durability,
) -> Result<(), EnrolError> {
    std::fs::create_dir_all(dir).map_err(|source| EnrolError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    write_file(&dir.join(CA_FILE), ca_pem.as_bytes(), 0o644, durability)?;
    // The old certificate is unusable with the new key: move it away first.
    let _ = std::fs::remove_file(dir.join(NODE_CERT_FILE));
    write_file(
        &dir.join(NODE_KEY_FILE),
        key_pem.as_bytes(),
        0o600,
        durability,
    )?;
    write_file(
        &dir.join(NODE_CERT_FILE),
        cert_pem.as_bytes(),
        0o644,
        durability,
    )?;
    Ok(())
}

/// Renews the node's certificate, forever, each time two thirds of its validity have passed
/// (retrying every [`RENEW_RETRY`] on failure), swapping it into `creds.cert` for the next
/// handshakes. Returns at once for an operator's certificate, and when `shutdown` fires.
pub async fn renew(tls: NodeTls, mut creds: Credentials, shutdown: CancellationToken) {
    if creds.source == Source::Operator {
        return;
    }
    let cert = creds.cert.clone();
    loop {
        let wait = Duration::from_secs((creds.info.renew_at() - now_unix()).max(0) as u64);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match renew_once(&tls, &creds).await {
            Ok(renewed) => {
                // Keep one swappable certificate: the endpoint's TLS configuration holds it.
                cert.adopt(&renewed.cert);
                info!(
                    not_after = renewed.info.not_after,
                    "renewed the node certificate"
                );
                creds = Credentials {
                    cert: cert.clone(),
                    ..renewed
                };
            }
            Err(e) => {
                warn!(error = %e, retry_in = ?RENEW_RETRY, "cannot renew the node certificate");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RENEW_RETRY) => {}
                }
            }
        }
    }
}

/// The TLS flags agents and sidecars share: flattened into their `Args`
/// (`#[command(flatten)]`), with each binary's environment variables added by [`tls_env`].
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsFlags {
    /// The CA to trust (PEM): an operator's own CA with --cert/--key, or the directory's
    /// `ca.pem`. Not needed with --join-token (the token pins the CA).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,

    /// This node's certificate (PEM) from an operator's PKI; needs --key and --ca.
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,

    /// The private key of --cert (PEM).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,

    /// A join token from `usher-directory token create` for this node's role (and an agent's
    /// service): used to get a certificate when the state directory holds no usable one.
    #[arg(long, value_name = "TOKEN")]
    pub join_token: Option<String>,

    /// The directory's join endpoint, `host:port` [default: --directory's port + 1].
    #[arg(long, value_name = "ADDR")]
    pub join_address: Option<String>,
}

/// The ids of the [`TlsFlags`] arguments.
const TLS_FLAG_IDS: [&str; 5] = ["ca", "cert", "key", "join_token", "join_address"];

/// Gives the [`TlsFlags`] flattened into `command` their environment variables:
/// `<prefix>_CA`, `<prefix>_CERT`, `<prefix>_KEY`, `<prefix>_JOIN_TOKEN` (its value never
/// shown in `--help`) and `<prefix>_JOIN_ADDRESS`, for example `prefix = "USHER_AGENT"`.
pub fn tls_env(command: clap::Command, prefix: &str) -> clap::Command {
    TLS_FLAG_IDS.into_iter().fold(command, |command, id| {
        let name = format!("{prefix}_{}", id.to_uppercase());
        command.mut_arg(id, |arg| arg.env(name).hide_env_values(id == "join_token"))
    })
}

/// The validated TLS settings of a node (see [`TlsFlags::validate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub ca: Option<PathBuf>,
    pub cert: Option<(PathBuf, PathBuf)>,
    pub join_token: Option<JoinToken>,
    pub join_address: String,
}

/// A TLS flag the node refuses: the flag's name (without `--`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagError {
    pub flag: &'static str,
    pub reason: String,
}

impl TlsFlags {
    /// Checks the flags: `--cert` and `--key` go together and need `--ca`; a join token must
    /// parse (its text is never echoed); the join address is `host:port`, by default the
    /// directory's with the port plus one. Whether a certificate exists is checked at start,
    /// not here.
    pub fn validate(self, directory: &str) -> Result<TlsSettings, FlagError> {
        let err = |flag, reason: &str| FlagError {
            flag,
            reason: reason.to_string(),
        };
        let cert = match (self.cert, self.key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => return Err(err("cert", "needs --key")),
            (None, Some(_)) => return Err(err("key", "needs --cert")),
        };
        if cert.is_some() && self.ca.is_none() {
            return Err(err("cert", "needs --ca (the CA that issued it)"));
        }
        let join_token = match self.join_token {
            Some(text) => {
                Some(JoinToken::parse(&text).map_err(|e| err("join-token", &e.to_string()))?)
            }
            None => None,
        };
        let join_address = match self.join_address {
            Some(addr) => {
                crate::names::validate_host_port(&addr).map_err(|r| err("join-address", &r))?;
                addr
            }
            None => default_join_address(directory).ok_or_else(|| {
                err(
                    "join-address",
                    "cannot default to the directory's port + 1; set it",
                )
            })?,
        };
        Ok(TlsSettings {
            ca: self.ca,
            cert,
            join_token,
            join_address,
        })
    }
}

impl TlsSettings {
    /// The node's [`NodeTls`] for `identity`, storing its files in `state_dir`.
    pub fn for_node(&self, identity: NodeIdentity, state_dir: &Path) -> NodeTls {
        NodeTls {
            identity,
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            join_token: self.join_token.clone(),
            join_address: self.join_address.clone(),
            state_dir: state_dir.to_path_buf(),
        }
    }
}

/// The join endpoint by default: the directory's host with its port plus one.
pub fn default_join_address(directory: &str) -> Option<String> {
    let (host, port) = directory.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    Some(format!("{host}:{}", port.checked_add(1)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_address_defaults_to_the_next_port() {
        assert_eq!(
            default_join_address("127.0.0.1:7400").as_deref(),
            Some("127.0.0.1:7401")
        );
        assert_eq!(
            default_join_address("[::1]:7400").as_deref(),
            Some("[::1]:7401")
        );
        assert_eq!(default_join_address("dir:65535"), None);
        assert_eq!(default_join_address("dir"), None);
    }

    #[test]
    fn tls_flags_are_checked_together() {
        let flags = |ca: bool, cert: bool, key: bool, token: Option<&str>| TlsFlags {
            ca: ca.then(|| "ca.pem".into()),
            cert: cert.then(|| "node.pem".into()),
            key: key.then(|| "node-key.pem".into()),
            join_token: token.map(String::from),
            join_address: None,
        };
        let ok = flags(true, true, true, None).validate("d:7400").unwrap();
        assert_eq!(ok.join_address, "d:7401");
        for (f, flag) in [
            (flags(true, true, false, None), "cert"),
            (flags(true, false, true, None), "key"),
            (flags(false, true, true, None), "cert"),
            (
                flags(false, false, false, Some("USHER1-secret-ish")),
                "join-token",
            ),
        ] {
            let e = f.validate("d:7400").unwrap_err();
            assert_eq!(e.flag, flag);
            assert!(!e.reason.contains("secret-ish"), "the token is not echoed");
        }
        assert_eq!(
            flags(false, false, false, None)
                .validate("d:65535")
                .unwrap_err()
                .flag,
            "join-address"
        );
    }

    #[tokio::test]
    async fn without_a_token_or_files_the_error_says_what_to_pass() {
        let dir = tempfile::tempdir().unwrap();
        let tls = NodeTls {
            identity: NodeIdentity::Sidecar,
            ca: None,
            cert: None,
            join_token: None,
            join_address: "127.0.0.1:1".into(),
            state_dir: dir.path().to_path_buf(),
        };
        let e = obtain(&tls).await.unwrap_err().to_string();
        assert!(e.contains("--join-token"), "{e}");
        let tls = NodeTls {
            cert: Some((dir.path().join("c"), dir.path().join("k"))),
            ..tls
        };
        let e = obtain(&tls).await.unwrap_err().to_string();
        assert!(e.contains("--ca"), "{e}");
    }
}
