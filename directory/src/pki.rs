//! The cluster CA and the directory's server certificate (rcgen).
//!
//! On first start the directory creates a CA in its state directory: `ca.pem` (what nodes pass
//! as `--ca`) and `ca-key.pem` (mode 0600). Later starts reuse them, so nodes keep trusting the
//! directory across restarts. The server certificate (name [`SERVER_NAME`]) is issued afresh
//! from the CA key at every start and never written to disk.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use thiserror::Error;
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
    // The CA certificate is rebuilt from fixed parameters and the persisted key: it has the
    // same subject and key as `ca.pem`, so what it signs verifies against `ca.pem`.
    let ca_cert = ca_params().self_signed(&ca_key)?;
    if created_ca {
        write_private(&key_path, ca_key.serialize_pem().as_bytes())?;
        write_file(&cert_path, ca_cert.pem().as_bytes())?;
    }
    let ca_pem = read(&cert_path)?;

    let server_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, SERVER_NAME);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let server_cert = params.signed_by(&server_key, &ca_cert, &ca_key)?;
    let mut seed = b"usher stateless reset\0".to_vec();
    seed.extend_from_slice(ca_key.serialize_der().as_slice());
    let mut reset_secret = [0u8; 32];
    reset_secret.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &seed).as_ref());
    Ok(Credentials {
        reset_secret,
        chain_pem: format!("{}{}", server_cert.pem(), ca_pem),
        ca_pem,
        key_pem: server_key.serialize_pem(),
        created_ca,
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
        usher_shared::quic::server_config(second.chain_pem.as_bytes(), second.key_pem.as_bytes())
            .unwrap();
        usher_shared::quic::client_config(first.ca_pem.as_bytes()).unwrap();
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
