//! The cluster CA, the directory's server certificate and node certificates (rcgen).
//!
//! On first start the directory creates a CA in its state directory: `ca.pem` (what nodes
//! trust) and `ca-key.pem` (mode 0600). Later starts reuse them, so nodes keep trusting the
//! directory across restarts. The server certificate (name [`SERVER_NAME`]) is issued afresh
//! from the CA key at every start and never written to disk.
//!
//! Node certificates ([`CertAuthority::sign_csr`], [`CertAuthority::issue_node`]) are ECDSA
//! P-256, valid from 5 minutes ago (clock skew; at most a tenth of the validity) for the
//! configured validity, with extended
//! key usage `clientAuth` and one subject alternative name URI that carries the node's role
//! and service (`usher://agent/web`, `usher://sidecar`; SwarmKit: the certificate carries
//! the role). Only the public key of a CSR is used: the directory decides the rest.

use std::io::Write;
use std::path::{Path, PathBuf};

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertificateSigningRequestParams,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    PublicKeyData, SanType, SerialNumber,
};
use thiserror::Error;
use usher_shared::identity::NodeIdentity;
use usher_shared::quic::SERVER_NAME;

/// File name of the CA certificate in the state directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key in the state directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";

const CA_COMMON_NAME: &str = "usher cluster CA";

/// Why the certificates could not be loaded or created.
#[derive(Debug, Error)]
pub enum PkiError {
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} exists but {missing} does not; restore it or remove both to create a new CA")]
    HalfCa { path: PathBuf, missing: PathBuf },
    #[error("cannot use the CA key {path}: {source}")]
    BadKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot create a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the certificate signing request is refused: {0}")]
    BadCsr(rcgen::Error),
}

/// Clock skew allowed for: node certificates are valid from this long before their issue (at
/// most a tenth of their validity).
pub const BACKDATE: Duration = Duration::from_secs(300);

/// The cluster CA's certificate and key: issues the directory's and the nodes' certificates.
pub struct CertAuthority {
    cert: Certificate,
    key: KeyPair,
    /// The content of `ca.pem`.
    pub ca_pem: String,
    /// Hex SHA-256 of `ca.pem`'s DER: what join tokens carry.
    pub fingerprint: String,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl CertAuthority {
    /// A node certificate (PEM) for `public_key` with `identity`, valid for `validity` from
    /// `now` (backdated by [`BACKDATE`]).
    pub fn issue_for_key(
        &self,
        identity: &NodeIdentity,
        public_key: &impl PublicKeyData,
        validity: Duration,
        now: SystemTime,
    ) -> Result<String, PkiError> {
        let params = node_params(identity, validity, now)?;
        Ok(params.signed_by(public_key, &self.cert, &self.key)?.pem())
    }

    /// Signs the PEM CSR `csr_pem` (its self-signature is checked) as a node certificate
    /// with `identity`; of the CSR only the public key is used.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &NodeIdentity,
        validity: Duration,
        now: SystemTime,
    ) -> Result<String, PkiError> {
        let mut csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(PkiError::BadCsr)?;
        csr.params = node_params(identity, validity, now)?;
        Ok(csr.signed_by(&self.cert, &self.key)?.pem())
    }

    /// A fresh key and a node certificate for it: `(cert_pem, key_pem)`. For the agents the
    /// directory starts itself, and for tests.
    pub fn issue_node(
        &self,
        identity: &NodeIdentity,
        validity: Duration,
    ) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate()?;
        let cert = self.issue_for_key(identity, &key, validity, SystemTime::now())?;
        Ok((cert, key.serialize_pem()))
    }

    /// Loads the CA of an existing state directory (`ca.pem`, `ca-key.pem`).
    pub fn load(state_dir: &Path) -> Result<Self, PkiError> {
        let key_path = state_dir.join(CA_KEY_FILE);
        let key = KeyPair::from_pem(&read(&key_path)?).map_err(|source| PkiError::BadKey {
            path: key_path.clone(),
            source,
        })?;
        let ca_pem = read(&state_dir.join(CA_CERT_FILE))?;
        Self::from_parts(key, ca_pem, &state_dir.join(CA_CERT_FILE))
    }

    fn from_parts(key: KeyPair, ca_pem: String, ca_path: &Path) -> Result<Self, PkiError> {
        // The CA certificate is rebuilt from fixed parameters and the persisted key: it has
        // the same subject and key as `ca.pem`, so what it signs verifies against `ca.pem`.
        let cert = ca_params().self_signed(&key)?;
        let fingerprint =
            usher_shared::identity::ca_fingerprint(ca_pem.as_bytes()).map_err(|e| {
                PkiError::Read {
                    path: ca_path.to_path_buf(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
                }
            })?;
        Ok(Self {
            cert,
            key,
            ca_pem,
            fingerprint,
        })
    }
}

/// The parameters of a node certificate (see the module docs).
fn node_params(
    identity: &NodeIdentity,
    validity: Duration,
    now: SystemTime,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let uri = identity.uri();
    params.subject_alt_names = vec![SanType::URI(uri.clone().try_into()?)];
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, uri);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let unix = |t: SystemTime| {
        let secs = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        time::OffsetDateTime::from_unix_timestamp(secs).map_err(|_| {
            PkiError::Generate(rcgen::Error::InvalidAsn1String(
                rcgen::InvalidAsn1String::PrintableString("validity out of range".into()),
            ))
        })
    };
    // A short validity is backdated less, so that renewal (at two thirds of the validity,
    // counted from `not_before`) still falls after the issue.
    let backdate = BACKDATE.min(validity / 10);
    params.not_before = unix(now.checked_sub(backdate).unwrap_or(now))?;
    params.not_after = unix(now + validity)?;
    Ok(params)
}

/// PEM material the directory serves with.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The CA certificate (the content of `ca.pem`).
    pub ca_pem: String,
    /// The server certificate followed by the CA certificate.
    pub chain_pem: String,
    /// The server certificate's private key.
    pub key_pem: String,
    /// Whether the CA was created by this call.
    pub created_ca: bool,
    /// The CA, to issue node certificates.
    pub authority: std::sync::Arc<CertAuthority>,
    /// A secret that is the same on every start with this CA: the QUIC stateless-reset key
    /// derives from it, so after a restart the directory's resets for its previous run's
    /// connections are believed and nodes reconnect at once instead of after an idle timeout.
    pub reset_secret: [u8; 32],
}

/// Loads the CA from `state_dir` (creating it, and the directory, on first start) and issues a
/// server certificate for [`SERVER_NAME`].
pub fn load_or_create(state_dir: &Path) -> Result<Credentials, PkiError> {
    std::fs::create_dir_all(state_dir).map_err(|source| PkiError::StateDir {
        path: state_dir.to_path_buf(),
        source,
    })?;
    let cert_path = state_dir.join(CA_CERT_FILE);
    let key_path = state_dir.join(CA_KEY_FILE);
    let (ca_key, created_ca) = match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            let pem = read(&key_path)?;
            let key = KeyPair::from_pem(&pem).map_err(|source| PkiError::BadKey {
                path: key_path.clone(),
                source,
            })?;
            (key, false)
        }
        (false, false) => (KeyPair::generate()?, true),
        (true, false) => {
            return Err(PkiError::HalfCa {
                path: cert_path,
                missing: key_path,
            })
        }
        (false, true) => {
            return Err(PkiError::HalfCa {
                path: key_path,
                missing: cert_path,
            })
        }
    };
    if created_ca {
        let ca_cert = ca_params().self_signed(&ca_key)?;
        write_private(&key_path, ca_key.serialize_pem().as_bytes())?;
        write_file(&cert_path, ca_cert.pem().as_bytes())?;
    }
    let ca_pem = read(&cert_path)?;
    let mut seed = b"usher stateless reset\0".to_vec();
    seed.extend_from_slice(ca_key.serialize_der().as_slice());
    let authority = CertAuthority::from_parts(ca_key, ca_pem.clone(), &cert_path)?;
    let (ca_cert, ca_key) = (&authority.cert, &authority.key);

    let server_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, SERVER_NAME);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let server_cert = params.signed_by(&server_key, ca_cert, ca_key)?;
    let mut reset_secret = [0u8; 32];
    reset_secret.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &seed).as_ref());
    Ok(Credentials {
        reset_secret,
        chain_pem: format!("{}{}", server_cert.pem(), ca_pem),
        ca_pem,
        key_pem: server_key.serialize_pem(),
        created_ca,
        authority: std::sync::Arc::new(authority),
    })
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), PkiError> {
    std::fs::write(path, data).map_err(|source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a secret readable by the owner only (created with mode 0600, never wider).
fn write_private(path: &Path, data: &[u8]) -> Result<(), PkiError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    file.write_all(data).map_err(err)?;
    file.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path()).unwrap();
        assert!(first.created_ca);
        let second = load_or_create(dir.path()).unwrap();
        assert!(!second.created_ca);
        assert_eq!(first.ca_pem, second.ca_pem);
        assert_ne!(
            first.key_pem, second.key_pem,
            "server key is fresh per start"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Both server configurations are accepted by rustls.
        usher_shared::quic::server_config(
            second.chain_pem.as_bytes(),
            second.key_pem.as_bytes(),
            second.ca_pem.as_bytes(),
            usher_shared::quic::IDLE_TIMEOUT,
        )
        .unwrap();
        assert_eq!(first.authority.fingerprint, second.authority.fingerprint);
    }

    #[test]
    fn node_certificates_carry_the_identity_the_directory_chose() {
        let dir = tempfile::tempdir().unwrap();
        let ca = load_or_create(dir.path()).unwrap().authority;
        let web = NodeIdentity::Agent {
            service: "web".into(),
        };
        // The CSR asks for a sidecar; the directory issues what it was told.
        let key = KeyPair::generate().unwrap();
        let mut asked = CertificateParams::new(vec!["usher-directory".into()]).unwrap();
        asked.subject_alt_names = vec![SanType::URI("usher://sidecar".try_into().unwrap())];
        let csr = asked.serialize_request(&key).unwrap().pem().unwrap();
        let now = SystemTime::now();
        let pem = ca
            .sign_csr(&csr, &web, Duration::from_secs(3600), now)
            .unwrap();
        let der = usher_shared::quic::parse_certificates(pem.as_bytes()).unwrap();
        let info = usher_shared::identity::inspect(der[0].as_ref()).unwrap();
        assert_eq!(info.identity, web);
        assert_eq!(info.not_after - info.not_before, 3600 + 300);
        // A certificate for the key the node holds works as its client certificate.
        usher_shared::quic::NodeCert::from_pem(pem.as_bytes(), key.serialize_pem().as_bytes())
            .unwrap();
        // A tampered CSR is refused.
        let mut bad = csr.into_bytes();
        let n = bad.len() / 2;
        bad[n] = if bad[n] == b'A' { b'B' } else { b'A' };
        let bad = String::from_utf8(bad).unwrap();
        assert!(ca
            .sign_csr(&bad, &web, Duration::from_secs(60), now)
            .is_err());
        assert!(ca
            .sign_csr("garbage", &web, Duration::from_secs(60), now)
            .is_err());
    }

    #[test]
    fn half_a_ca_is_an_error_not_a_new_ca() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
        let e = load_or_create(dir.path()).unwrap_err().to_string();
        assert!(e.contains("ca-key.pem"), "{e}");
    }

    #[test]
    fn a_corrupt_key_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path()).unwrap();
        std::fs::write(dir.path().join(CA_KEY_FILE), "garbage").unwrap();
        let e = load_or_create(dir.path()).unwrap_err().to_string();
        assert!(e.contains("ca-key.pem"), "{e}");
    }
}
