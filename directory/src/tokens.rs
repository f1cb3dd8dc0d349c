//! Join tokens: created and revoked through the admin API (`usher-directory token ...`),
//! redeemed by nodes at the join endpoint, kept in `tokens.json` in the state directory.
//!
//! A token grants one identity: an agent of one service, or a sidecar. It can be used by any
//! number of nodes until it expires or is revoked (SwarmKit: a join token is shared by the
//! nodes of a role and rotated by the operator). The file holds only the SHA-256 of each
//! secret, so reading it does not let anyone join; it is written atomically (temp, fsync,
//! rename) with mode 0600.
//!
//! File shape: `{"tokens":[{"id","role","service","secret_sha256","created_ms","expires_ms",
//! "revoked","uses"}]}` (times in Unix milliseconds).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use usher_shared::files::write_atomic;
use usher_shared::identity::{JoinToken, NodeIdentity};
use usher_shared::join::JoinRefusal;
use usher_shared::protocol::Role;

/// The tokens file in the state directory.
pub const TOKENS_FILE: &str = "tokens.json";

/// Default time to live of a token (`--ttl`).
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Longest time to live a token may have.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Tokens expired longer than this are dropped from the file when a token is created.
pub const KEEP_EXPIRED: Duration = Duration::from_secs(7 * 24 * 3600);

/// One token as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub role: Role,
    /// The agent's service; `None` for a sidecar token.
    pub service: Option<String>,
    /// Hex SHA-256 of the secret.
    pub secret_sha256: String,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub revoked: bool,
    /// Certificates issued with it.
    pub uses: u64,
}

/// A token as `token list` shows it (no secret, no digest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenView {
    pub id: String,
    pub role: Role,
    pub service: Option<String>,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub revoked: bool,
    pub expired: bool,
    pub uses: u64,
}

impl TokenRecord {
    fn view(&self, now_ms: u64) -> TokenView {
        TokenView {
            id: self.id.clone(),
            role: self.role,
            service: self.service.clone(),
            created_ms: self.created_ms,
            expires_ms: self.expires_ms,
            revoked: self.revoked,
            expired: now_ms >= self.expires_ms,
            uses: self.uses,
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    tokens: Vec<TokenRecord>,
}

/// Why a token operation failed.
#[derive(Debug, Error)]
pub enum TokenError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a tokens file: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Write(#[from] usher_shared::files::WriteError),
    #[error("{0}")]
    Invalid(String),
    #[error("no token with id {0:?}")]
    NotFound(String),
}

/// The directory's join tokens, in memory and in `tokens.json`.
#[derive(Debug)]
pub struct TokenStore {
    path: PathBuf,
    /// Hex SHA-256 of the CA certificate: what tokens for this cluster carry.
    fingerprint: String,
    tokens: Mutex<Vec<TokenRecord>>,
}

impl TokenStore {
    /// Opens the tokens of `state_dir` (none if the file does not exist yet). Errors name the
    /// file: unreadable or not a tokens file.
    pub fn open(state_dir: &Path, fingerprint: &str) -> Result<Self, TokenError> {
        let path = state_dir.join(TOKENS_FILE);
        let tokens = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice::<TokenFile>(&bytes)
                    .map_err(|source| TokenError::Parse {
                        path: path.clone(),
                        source,
                    })?
                    .tokens
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(TokenError::Read { path, source }),
        };
        Ok(Self {
            path,
            fingerprint: fingerprint.to_string(),
            tokens: Mutex::new(tokens),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<TokenRecord>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, tokens: &[TokenRecord]) -> Result<(), TokenError> {
        let file = TokenFile {
            tokens: tokens.to_vec(),
        };
        let mut json = serde_json::to_vec_pretty(&file).map_err(|source| TokenError::Parse {
            path: self.path.clone(),
            source,
        })?;
        json.push(b'\n');
        write_atomic(&self.path, &json, 0o600)?;
        Ok(())
    }

    /// Creates a token for `identity` that expires `ttl` after `now_ms`; returns what `token
    /// list` shows and the token text (shown once, never stored).
    ///
    /// Errors: a TTL of zero or above [`MAX_TTL`], or the file cannot be written (then no token
    /// exists).
    pub fn create(
        &self,
        identity: &NodeIdentity,
        ttl: Duration,
        now_ms: u64,
    ) -> Result<(TokenView, JoinToken), TokenError> {
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(TokenError::Invalid(format!(
                "ttl {}: must be more than zero and at most 365 days",
                humantime::format_duration(ttl)
            )));
        }
        let token = JoinToken::generate(&self.fingerprint);
        let record = TokenRecord {
            id: token.id.clone(),
            role: identity.role(),
            service: identity.service().map(String::from),
            secret_sha256: token.secret_digest(),
            created_ms: now_ms,
            expires_ms: now_ms.saturating_add(ttl.as_millis() as u64),
            revoked: false,
            uses: 0,
        };
        let mut tokens = self.lock();
        let mut next = tokens.clone();
        let keep = KEEP_EXPIRED.as_millis() as u64;
        next.retain(|t| t.expires_ms.saturating_add(keep) > now_ms);
        next.push(record.clone());
        self.save(&next)?;
        *tokens = next;
        Ok((record.view(now_ms), token))
    }

    /// Every token, oldest first.
    pub fn list(&self, now_ms: u64) -> Vec<TokenView> {
        self.lock().iter().map(|t| t.view(now_ms)).collect()
    }

    /// Revokes the token `id`: nodes can no longer join with it (certificates already issued
    /// stay valid until they expire).
    pub fn revoke(&self, id: &str, now_ms: u64) -> Result<TokenView, TokenError> {
        let mut tokens = self.lock();
        let mut next = tokens.clone();
        let record = next
            .iter_mut()
            .find(|t| t.id == id)
            .ok_or_else(|| TokenError::NotFound(id.to_string()))?;
        record.revoked = true;
        let view = record.view(now_ms);
        self.save(&next)?;
        *tokens = next;
        Ok(view)
    }

    /// Checks `text` for a node that runs as `role` (and `service`, for an agent) and counts
    /// the use; returns the identity to certify. The refusal carries a sentence the node
    /// prints.
    pub fn redeem(
        &self,
        text: &str,
        role: Role,
        service: Option<&str>,
        now_ms: u64,
    ) -> Result<NodeIdentity, (JoinRefusal, String)> {
        let token = JoinToken::parse(text).map_err(|e| (JoinRefusal::BadRequest, e.to_string()))?;
        if token.ca_digest != self.fingerprint {
            return Err((
                JoinRefusal::WrongCluster,
                "the token was made for another directory (its CA fingerprint differs)".into(),
            ));
        }
        let unknown = || {
            (
                JoinRefusal::UnknownToken,
                format!("unknown join token {}", token.id),
            )
        };
        let mut tokens = self.lock();
        let record = tokens
            .iter_mut()
            .find(|t| t.id == token.id)
            .ok_or_else(unknown)?;
        // Digests are compared, so timing says nothing usable about the secret.
        if token.secret_digest() != record.secret_sha256 {
            return Err(unknown());
        }
        if record.revoked {
            return Err((
                JoinRefusal::RevokedToken,
                format!("join token {} was revoked", token.id),
            ));
        }
        if now_ms >= record.expires_ms {
            return Err((
                JoinRefusal::ExpiredToken,
                format!("join token {} expired", token.id),
            ));
        }
        if record.role != role {
            return Err((
                JoinRefusal::WrongRole,
                format!(
                    "join token {} was made for {}s; a node running as {role} cannot join with it",
                    token.id, record.role
                ),
            ));
        }
        if record.service.as_deref() != service {
            return Err((
                JoinRefusal::WrongService,
                format!(
                    "join token {} is for service {:?}, not {:?}",
                    token.id,
                    record.service.as_deref().unwrap_or(""),
                    service.unwrap_or("")
                ),
            ));
        }
        let identity = NodeIdentity::new(record.role, record.service.as_deref())
            .map_err(|e| (JoinRefusal::BadRequest, e.to_string()))?;
        record.uses += 1;
        let snapshot = tokens.clone();
        if let Err(e) = self.save(&snapshot) {
            tracing::warn!(error = %e, "cannot record a token use");
        }
        Ok(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const FP: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn web() -> NodeIdentity {
        NodeIdentity::Agent {
            service: "web".into(),
        }
    }

    #[test]
    fn a_token_joins_as_what_it_was_made_for_until_it_expires_or_is_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(dir.path(), FP).unwrap();
        let (view, token) = store
            .create(&web(), Duration::from_secs(10), 1_000)
            .unwrap();
        let text = token.to_string();
        assert_eq!(
            store.redeem(&text, Role::Agent, Some("web"), 2_000),
            Ok(web())
        );
        let refusal = |r: Result<NodeIdentity, (JoinRefusal, String)>| r.unwrap_err().0;
        assert_eq!(
            refusal(store.redeem(&text, Role::Sidecar, None, 2_000)),
            JoinRefusal::WrongRole
        );
        assert_eq!(
            refusal(store.redeem(&text, Role::Agent, Some("db"), 2_000)),
            JoinRefusal::WrongService
        );
        assert_eq!(
            refusal(store.redeem(&text, Role::Agent, Some("web"), 11_000)),
            JoinRefusal::ExpiredToken
        );
        let mut forged = token.clone();
        forged.secret = "0".repeat(32);
        assert_eq!(
            refusal(store.redeem(&forged.to_string(), Role::Agent, Some("web"), 2_000)),
            JoinRefusal::UnknownToken
        );
        let mut other = token.clone();
        other.ca_digest = "b".repeat(64);
        assert_eq!(
            refusal(store.redeem(&other.to_string(), Role::Agent, Some("web"), 2_000)),
            JoinRefusal::WrongCluster
        );
        assert_eq!(
            refusal(store.redeem("USHER1-nonsense", Role::Agent, Some("web"), 2_000)),
            JoinRefusal::BadRequest
        );
        store.revoke(&view.id, 3_000).unwrap();
        assert_eq!(
            refusal(store.redeem(&text, Role::Agent, Some("web"), 3_000)),
            JoinRefusal::RevokedToken
        );
        assert!(matches!(
            store.revoke("nope", 3_000),
            Err(TokenError::NotFound(_))
        ));

        // The file survives a restart, holds no secret and is private.
        let reopened = TokenStore::open(dir.path(), FP).unwrap();
        let list = reopened.list(3_000);
        assert_eq!(list.len(), 1);
        assert!(list[0].revoked);
        assert_eq!(list[0].uses, 1);
        let raw = std::fs::read_to_string(dir.path().join(TOKENS_FILE)).unwrap();
        assert!(!raw.contains(&token.secret));
        let mode = std::fs::metadata(dir.path().join(TOKENS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn bad_ttls_and_bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(dir.path(), FP).unwrap();
        assert!(store.create(&web(), Duration::ZERO, 0).is_err());
        assert!(store
            .create(&web(), MAX_TTL + Duration::from_secs(1), 0)
            .is_err());
        std::fs::write(dir.path().join(TOKENS_FILE), "{not json").unwrap();
        let e = TokenStore::open(dir.path(), FP).unwrap_err().to_string();
        assert!(e.contains("tokens.json"), "{e}");
    }
}
