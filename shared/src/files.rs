//! Small state files written so a reader never sees half a file: a temp file beside the
//! target, created with the final mode from the start, renamed over it; fsynced (and the
//! folder too) when the file must also survive a crash ([`Durability`]).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why a state file could not be written.
#[derive(Debug, Error)]
#[error("cannot write {path}: {source}")]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Whether a written file must survive a crash of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync the file, then its folder: state a restart reads back (a node's certificate,
    /// the directory's tokens).
    Durable,
    /// No fsync: a file made for a process about to start, remade if lost with it (the
    /// credentials the directory writes for an agent it starts). A durable write's two fsyncs
    /// took about 0.8 ms on a virtual disk (`docs/BENCHMARKS.md`, Autoscaling), and the
    /// writer's thread waits for them.
    Transient,
}

/// Writes `data` to `path` atomically and durably with permission bits `mode` (for example
/// `0o600` for a key): `<path>.tmp` is created with `mode`, written, fsynced and renamed over
/// `path`, and the folder fsynced.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), WriteError> {
    write_file(path, data, mode, Durability::Durable)
}

/// [`write_atomic`], fsynced only if `durability` is [`Durability::Durable`].
pub fn write_file(
    path: &Path,
    data: &[u8],
    mode: u32,
    durability: Durability,
) -> Result<(), WriteError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| WriteError { path, source }
    };
    // A stale temp file from a crash may have other bits: start afresh.
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err(&tmp))?;
    file.write_all(data).map_err(err(&tmp))?;
    let durable = durability == Durability::Durable;
    if durable {
        file.sync_all().map_err(err(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(err(path))?;
    if let (true, Some(dir)) = (durable, path.parent()) {
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_replace_with_the_given_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        write_file(&path, b"three", 0o600, Durability::Transient).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"three");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let e = write_atomic(&dir.path().join("no/such/dir"), b"x", 0o600).unwrap_err();
        assert!(e.to_string().contains("no/such/dir"), "{e}");
    }
}
