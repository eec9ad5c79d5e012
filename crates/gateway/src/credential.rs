//! Per-task runner credentials: an HMAC-SHA256-signed claim naming the task,
//! its mode and (cold) its session, with an expiry. The key lives in the data
//! dir so a restarted gateway still recognises its runners.
//!
//! A valid signature is not enough (ARCHITECTURE.md "Runner credentials"):
//! [`CredentialSigner::accept`] also requires the task to be one this gateway
//! launched (or adopted from `Backend::list` at start-up) and has not stopped.
//! [`TrackingBackend`] keeps that record: every launch and stop goes through it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aishell_backend::{Backend, BackendError, LaunchSpec, TaskInfo, TaskMode, TaskStatus};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerClaims {
    pub task_id: String,
    /// `cold` or `warm`.
    pub mode: TaskMode,
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
    #[error("credential names a task this gateway did not launch or already stopped")]
    NotLaunched,
}

/// Sentinel expiry for tasks adopted after a restart (their credential's own
/// expiry still applies).
const EXP_UNKNOWN: u64 = u64::MAX;

#[derive(Clone)]
pub struct CredentialSigner {
    key: Vec<u8>,
    /// Live tasks this gateway launched or adopted: task id → credential expiry.
    live: Arc<Mutex<HashMap<String, u64>>>,
}

impl CredentialSigner {
    pub fn new(key: Vec<u8>) -> Self {
        CredentialSigner {
            key,
            live: Default::default(),
        }
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
        mode: TaskMode,
        session_id: Option<&str>,
        ttl: Duration,
    ) -> String {
        let claims = RunnerClaims {
            task_id: task_id.to_string(),
            mode,
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

    /// Verify a runner's credential and that its task is live here.
    pub fn accept(&self, token: &str) -> Result<RunnerClaims, CredentialError> {
        let claims = self.verify(token)?;
        if !self.is_live(&claims.task_id) {
            return Err(CredentialError::NotLaunched);
        }
        Ok(claims)
    }

    /// Whether this gateway launched (or adopted) `task_id` and has not stopped it.
    pub fn is_live(&self, task_id: &str) -> bool {
        self.live.lock().expect("live tasks").contains_key(task_id)
    }

    /// Record a task this gateway is launching; its credential expires at `exp`.
    fn launched(&self, task_id: &str, exp: u64) {
        self.live
            .lock()
            .expect("live tasks")
            .insert(task_id.to_string(), exp);
    }

    /// Record a task a previous gateway launched and the backend still lists
    /// as this instance's own.
    pub fn adopt(&self, task_id: &str) {
        self.launched(task_id, EXP_UNKNOWN);
    }

    /// Credentials of a stopped task are refused from now on.
    fn stopped(&self, task_id: &str) {
        self.live.lock().expect("live tasks").remove(task_id);
    }

    /// Live tasks whose credential has expired: they outlived the longest a
    /// task may live.
    pub fn expired_tasks(&self) -> Vec<String> {
        let now = now_secs();
        let live = self.live.lock().expect("live tasks");
        live.iter()
            .filter(|(_, exp)| **exp != EXP_UNKNOWN && **exp <= now)
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn sign(&self, data: &[u8]) -> Vec<u8> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("hmac accepts any key length");
        mac.update(data);
        mac.finalize().into_bytes().to_vec()
    }
}

/// The gateway's backend, recording which tasks it launched and stopped so
/// that only their credentials are accepted.
pub struct TrackingBackend {
    inner: Arc<dyn Backend>,
    credentials: CredentialSigner,
}

impl TrackingBackend {
    pub fn wrap(inner: Arc<dyn Backend>, credentials: CredentialSigner) -> Arc<dyn Backend> {
        Arc::new(TrackingBackend { inner, credentials })
    }
}

#[async_trait::async_trait]
impl Backend for TrackingBackend {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn launch(&self, spec: LaunchSpec) -> Result<(), BackendError> {
        // Recorded before the call: a runner may dial back before it returns.
        match self.credentials.verify(&spec.credential) {
            Ok(claims) if claims.task_id == spec.task_id => {
                self.credentials.launched(&spec.task_id, claims.exp)
            }
            _ => {
                tracing::error!(event = "runner_credential_invalid", taskId = %spec.task_id, "launching a task whose credential this gateway will refuse")
            }
        }
        self.inner.launch(spec).await
    }

    async fn status(&self, task_id: &str) -> Result<TaskStatus, BackendError> {
        self.inner.status(task_id).await
    }

    async fn stop(&self, task_id: &str) -> Result<(), BackendError> {
        self.credentials.stopped(task_id);
        self.inner.stop(task_id).await
    }

    async fn list(&self) -> Result<Vec<TaskInfo>, BackendError> {
        self.inner.list().await
    }

    fn workspace_path(&self, user_id: &str) -> String {
        self.inner.workspace_path(user_id)
    }

    fn prepare_workspace(&self, user_id: &str) -> Result<(), BackendError> {
        self.inner.prepare_workspace(user_id)
    }

    async fn ping(&self) -> Result<(), BackendError> {
        self.inner.ping().await
    }

    fn capabilities(&self) -> aishell_backend::Capabilities {
        self.inner.capabilities()
    }

    fn watch(self: Arc<Self>) -> tokio::sync::mpsc::Receiver<aishell_backend::StatusChange> {
        self.inner.clone().watch()
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
        let t = s.mint("t1", TaskMode::Cold, Some("s1"), Duration::from_secs(60));
        let c = s.verify(&t).unwrap();
        assert_eq!(
            (c.task_id.as_str(), c.mode, c.session_id.as_deref()),
            ("t1", TaskMode::Cold, Some("s1"))
        );
    }

    #[test]
    fn forged_and_foreign_credentials_are_refused() {
        let s = CredentialSigner::new(vec![7; 32]);
        let other = CredentialSigner::new(vec![8; 32]);
        let t = other.mint("t1", TaskMode::Cold, Some("s1"), Duration::from_secs(60));
        assert_eq!(s.verify(&t), Err(CredentialError::BadSignature));
        // Same signature, edited claims.
        let good = s.mint("t1", TaskMode::Cold, Some("s1"), Duration::from_secs(60));
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
    fn a_valid_credential_of_a_task_not_launched_or_stopped_is_refused() {
        let s = CredentialSigner::new(vec![7; 32]);
        let t = s.mint("t1", TaskMode::Warm, None, Duration::from_secs(60));
        assert_eq!(s.accept(&t), Err(CredentialError::NotLaunched));
        let exp = s.verify(&t).unwrap().exp;
        s.launched("t1", exp);
        assert_eq!(s.accept(&t).unwrap().task_id, "t1");
        s.stopped("t1");
        assert_eq!(s.accept(&t), Err(CredentialError::NotLaunched));
        s.adopt("t1");
        assert!(s.accept(&t).is_ok());
        assert!(
            s.expired_tasks().is_empty(),
            "adopted tasks have no known expiry"
        );
        s.launched("t2", 1);
        assert_eq!(s.expired_tasks(), ["t2"]);
    }

    #[test]
    fn expired_credential_is_refused() {
        let s = CredentialSigner::new(vec![7; 32]);
        let t = s.mint("t1", TaskMode::Warm, None, Duration::ZERO);
        assert_eq!(s.verify(&t), Err(CredentialError::Expired));
    }
}
