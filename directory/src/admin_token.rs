//! The admin bearer token: a random secret in a file (`admin-token` in the state directory by
//! default, mode 0600), created at the directory's first start. The directory requires it for
//! admin mutations; `usher-directory scale` and `token` read it from the same file.

use std::path::{Path, PathBuf};

use thiserror::Error;
use usher_shared::files::write_atomic;

/// The admin token file's name in the state directory.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// Why the admin token cannot be read or created.
#[derive(Debug, Error)]
pub enum AdminTokenError {
    #[error("cannot read the admin token file {path} (admin_token_file): {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the admin token file {path} (admin_token_file) is empty or not one line of text")]
    Empty { path: PathBuf },
    #[error("cannot create the admin token file: {0}")]
    Write(#[from] usher_shared::files::WriteError),
}

/// Reads the token in `path` (trimmed); errors name the file.
pub fn read(path: &Path) -> Result<String, AdminTokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| AdminTokenError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err(AdminTokenError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(token.to_string())
}

/// Reads the token in `path`, creating the file (mode 0600, 32 random bytes in hex) if it
/// does not exist. Returns the token and whether it was created.
pub fn load_or_create(path: &Path) -> Result<(String, bool), AdminTokenError> {
    if path.exists() {
        return Ok((read(path)?, false));
    }
    let token = usher_shared::identity::sha256_hex(&rand::random::<[u8; 32]>());
    write_atomic(path, format!("{token}\n").as_bytes(), 0o600)?;
    Ok((token, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ADMIN_TOKEN_FILE);
        let (first, created) = load_or_create(&path).unwrap();
        assert!(created);
        let (second, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(first, second);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, "\n").unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("admin-token"));
    }
}
