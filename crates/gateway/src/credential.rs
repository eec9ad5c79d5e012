//! Per-task runner credentials (SPEC §6): an HMAC-SHA256-signed claim naming
//! the task, its mode and (cold) its session, with an expiry. The key lives in
//! the data dir so a restarted gateway still recognises its runners.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerClaims {
    pub task_id: String,
    /// `cold` or `warm`.
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Expiry, unix seconds.
    pub exp: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialError {
    #[error("credential is malformed")]
    Malformed,
    #[error("credential signature is invalid")]
    BadSignature,
    #[error("credential expired")]
    Expired,
}

#[derive(Clone)]
pub struct CredentialSigner {
    key: Vec<u8>,
}

impl CredentialSigner {
    pub fn new(key: Vec<u8>) -> Self {
        CredentialSigner { key }
    }

    /// Load the signing key from `path`, creating a random one (mode 0600) if absent.
    pub fn load_or_create(path: &std::path::Path) -> std::io::Result<Self> {
        match std::fs::read(path) {
            Ok(key) if key.len() >= 32 => Ok(Self::new(key)),
            _ => {
                let key: [u8; 32] = rand::random();
                write_private(path, &key)?;
                Ok(Self::new(key.to_vec()))
            }
        }
    }

    pub fn mint(
        &self,
        task_id: &str,
        mode: &str,
        session_id: Option<&str>,
        ttl: Duration,
    ) -> String {
        let claims = RunnerClaims {
            task_id: task_id.to_string(),
            mode: mode.to_string(),
            session_id: session_id.map(str::to_string),
            exp: now_secs() + ttl.as_secs(),
        };
        let payload = B64.encode(serde_json::to_vec(&claims).expect("claims serialise"));
        let sig = B64.encode(self.sign(payload.as_bytes()));
        format!("{payload}.{sig}")
    }

    pub fn verify(&self, token: &str) -> Result<RunnerClaims, CredentialError> {
        let (payload, sig) = token.split_once('.').ok_or(CredentialError::Malformed)?;
        let sig = B64.decode(sig).map_err(|_| CredentialError::Malformed)?;
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("hmac accepts any key length");
        mac.update(payload.as_bytes());
        mac.verify_slice(&sig)
            .map_err(|_| CredentialError::BadSignature)?;
        let claims: RunnerClaims = B64
            .decode(payload)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(CredentialError::Malformed)?;
        if claims.exp <= now_secs() {
            return Err(CredentialError::Expired);
        }
        Ok(claims)
    }

    fn sign(&self, data: &[u8]) -> Vec<u8> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("hmac accepts any key length");
        mac.update(data);
        mac.finalize().into_bytes().to_vec()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Write a secret file readable only by its owner.
pub fn write_private(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_verify_round_trip() {
        let s = CredentialSigner::new(vec![7; 32]);
        let t = s.mint("t1", "cold", Some("s1"), Duration::from_secs(60));
        let c = s.verify(&t).unwrap();
        assert_eq!(
            (c.task_id.as_str(), c.mode.as_str(), c.session_id.as_deref()),
            ("t1", "cold", Some("s1"))
        );
    }

    #[test]
    fn forged_and_foreign_credentials_are_refused() {
        let s = CredentialSigner::new(vec![7; 32]);
        let other = CredentialSigner::new(vec![8; 32]);
        let t = other.mint("t1", "cold", Some("s1"), Duration::from_secs(60));
        assert_eq!(s.verify(&t), Err(CredentialError::BadSignature));
        // Same signature, edited claims.
        let good = s.mint("t1", "cold", Some("s1"), Duration::from_secs(60));
        let (_, sig) = good.split_once('.').unwrap();
        let forged_payload =
            B64.encode(br#"{"task_id":"t2","mode":"cold","session_id":"s2","exp":99999999999}"#);
        assert_eq!(
            s.verify(&format!("{forged_payload}.{sig}")),
            Err(CredentialError::BadSignature)
        );
        assert_eq!(s.verify("garbage"), Err(CredentialError::Malformed));
    }

    #[test]
    fn expired_credential_is_refused() {
        let s = CredentialSigner::new(vec![7; 32]);
        let t = s.mint("t1", "warm", None, Duration::ZERO);
        assert_eq!(s.verify(&t), Err(CredentialError::Expired));
    }
}
