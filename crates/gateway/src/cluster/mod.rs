//! Several gateways on one database (docs/cluster.md): this gateway's
//! registration, the leases of the sessions it owns, and the fence its
//! session writes carry.
//!
//! One owner per session: a gateway runs a session's actor only while it
//! holds the session's lease (`Store::claim_lease`). The keeper renews all of
//! them in one statement every third of the lease's life; a session whose
//! lease was not renewed (the database says another gateway has it, or the
//! database could not be reached for a whole lease) steps down here: its
//! clients are told to reconnect and its runner socket is dropped, and its
//! task keeps running for the new owner. Every session write carries the
//! epoch as a fence, so a gateway that lost a lease can no longer write.

pub mod relay;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use aishell_store::{Fence, LeaseClaim, Store, StoreError};
use tokio::time::Instant;

use crate::Shared;
use crate::session::SessionCmd;

/// Settings of a gateway that is one of several.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This gateway's name among the others (unique; stable across restarts
    /// of the same instance is fine, not required).
    pub gateway_id: String,
    /// The address in front of every gateway (a load balancer): runners
    /// re-dial it when their own gateway is gone.
    pub shared_url: Option<String>,
    /// How long a session lease lasts unless renewed; a dead gateway's
    /// sessions move after at most this long.
    pub lease_ttl: Duration,
}

/// The runner's environment variable naming the shared address.
pub const FALLBACK_URL_ENV: &str = "AISHELL_GATEWAY_FALLBACK_URL";

/// What every runner of this gateway is told beyond its own gateway's URL:
/// where to re-dial when that gateway is gone.
pub fn runner_env(cfg: &crate::GatewayConfig) -> std::collections::BTreeMap<String, String> {
    cfg.cluster
        .as_ref()
        .and_then(|c| c.shared_url.clone())
        .map(|url| (FALLBACK_URL_ENV.to_string(), url))
        .into_iter()
        .collect()
}

/// Who runs a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// This gateway, with this epoch.
    Here { epoch: u64 },
    /// Another live gateway; reach it at `internal_url`.
    Elsewhere {
        gateway_id: String,
        internal_url: Option<String>,
    },
}

/// This gateway as one of several.
pub struct Cluster {
    pub cfg: ClusterConfig,
    /// Where other gateways reach this one (and its runners dial).
    pub internal_url: String,
    store: Arc<dyn Store>,
    /// Sessions whose lease this gateway holds → (epoch, when claimed).
    held: Mutex<HashMap<String, (u64, Instant)>>,
    relay: relay::RelaySigner,
}

impl Cluster {
    /// Register this gateway and load the secrets every gateway shares.
    /// Returns the cluster and the runner-credential key all gateways sign
    /// with (so a runner can be adopted by whichever gateway takes its
    /// session over).
    pub async fn join(
        cfg: ClusterConfig,
        store: Arc<dyn Store>,
        internal_url: String,
        local_runner_key: &[u8],
    ) -> Result<(Arc<Self>, Vec<u8>), StoreError> {
        let relay_key = store
            .shared_secret("relay", &rand::random::<[u8; 32]>())
            .await?;
        let runner_key = store
            .shared_secret("runner-credential", local_runner_key)
            .await?;
        store
            .register_gateway(&cfg.gateway_id, &internal_url)
            .await?;
        tracing::info!(event = "gateway_registered", gatewayId = %cfg.gateway_id, internalUrl = %internal_url, leaseTtlMs = cfg.lease_ttl.as_millis() as u64, "joined the gateways sharing this database");
        let cluster = Arc::new(Cluster {
            relay: relay::RelaySigner::new(relay_key),
            cfg,
            internal_url,
            store,
            held: Mutex::default(),
        });
        Ok((cluster, runner_key))
    }

    pub fn id(&self) -> &str {
        &self.cfg.gateway_id
    }

    pub fn relay_signer(&self) -> &relay::RelaySigner {
        &self.relay
    }

    /// Take (or keep) a session's lease.
    pub async fn claim(&self, session_id: &str) -> Result<Owner, StoreError> {
        let claim = self
            .store
            .claim_lease(session_id, self.id(), self.cfg.lease_ttl)
            .await?;
        Ok(match claim {
            LeaseClaim::Acquired { epoch } => {
                let previous = self
                    .held
                    .lock()
                    .expect("leases")
                    .insert(session_id.to_string(), (epoch, Instant::now()));
                if previous.map(|(e, _)| e) != Some(epoch) {
                    tracing::info!(event = "lease_acquired", sessionId = %session_id, epoch, "this gateway owns the session now");
                }
                Owner::Here { epoch }
            }
            LeaseClaim::HeldBy {
                gateway_id,
                internal_url,
                ..
            } => {
                self.held.lock().expect("leases").remove(session_id);
                Owner::Elsewhere {
                    gateway_id,
                    internal_url,
                }
            }
        })
    }

    /// The fence for a session write, or `None` when this gateway does not
    /// hold the session's lease (the write must not happen).
    pub fn fence(&self, session_id: &str) -> Option<u64> {
        self.held
            .lock()
            .expect("leases")
            .get(session_id)
            .map(|(epoch, _)| *epoch)
    }

    pub fn fence_of<'a>(&'a self, epoch: u64) -> Fence<'a> {
        Fence::new(self.id(), epoch)
    }

    /// The session's actor left memory: give its lease up so any gateway
    /// can take it at once.
    pub fn release(self: &Arc<Self>, session_id: &str) {
        let Some((epoch, _)) = self.held.lock().expect("leases").remove(session_id) else {
            return;
        };
        let (cluster, sid) = (self.clone(), session_id.to_string());
        tokio::spawn(async move {
            if let Err(e) = cluster.store.release_lease(&sid, cluster.id(), epoch).await {
                // It expires on its own.
                tracing::warn!(event = "lease_release_failed", sessionId = %sid, error = %e, "could not release a session lease");
            }
        });
    }

    /// Leaving cleanly: registration and every lease go.
    pub async fn leave(&self) {
        self.held.lock().expect("leases").clear();
        if let Err(e) = self.store.remove_gateway(self.id()).await {
            tracing::warn!(event = "gateway_leave_failed", error = %e, "could not deregister; its leases expire on their own");
        }
    }

    /// Renew this gateway's registration and leases until the gateway goes;
    /// sessions whose lease is gone step down.
    pub async fn keep(self: Arc<Self>, shared: Weak<Shared>) {
        let every = (self.cfg.lease_ttl / 3).max(Duration::from_millis(100));
        let mut last_renewed = Instant::now();
        loop {
            tokio::time::sleep(every).await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let started = Instant::now();
            let ttl = self.cfg.lease_ttl;
            // A lease is known to last until TTL after it was last
            // confirmed: claimed, or renewed (by a renewal that started
            // before the database ran it).
            let confirmed = |claimed: Instant| claimed.max(last_renewed);
            // A renewal that outlasts the leases renews nothing: an
            // unreachable database is retried by the store until its pool
            // gives up (10 s), long after the leases expired and another
            // gateway may have taken them. Give up when the first of them
            // would have, and step down from those (below).
            let first_expiry = self
                .held
                .lock()
                .expect("leases")
                .values()
                .map(|(_, claimed)| confirmed(*claimed) + ttl)
                .min();
            let left = first_expiry
                .map_or(ttl, |at| at.saturating_duration_since(started))
                .max(Duration::from_millis(100));
            let renewed = tokio::time::timeout(left, async {
                self.store.heartbeat_gateway(self.id()).await?;
                self.store.renew_leases(self.id(), ttl).await
            })
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(format!(
                    "no answer within {} ms",
                    left.as_millis()
                )))
            });
            let lost: Vec<String> = match renewed {
                Ok(still) => {
                    last_renewed = started;
                    let still: HashMap<String, u64> = still.into_iter().collect();
                    let mut held = self.held.lock().expect("leases");
                    // A lease claimed while the renewal ran may be missing
                    // from its answer and is still ours.
                    let lost: Vec<String> = held
                        .iter()
                        .filter(|(sid, (epoch, claimed))| {
                            *claimed < started && still.get(*sid) != Some(epoch)
                        })
                        .map(|(sid, _)| sid.clone())
                        .collect();
                    for sid in &lost {
                        held.remove(sid);
                    }
                    lost
                }
                Err(e) => {
                    // Cut off from the database for a whole lease: another
                    // gateway may own those sessions now. Leases claimed
                    // since (the database came back) are still good.
                    let now = Instant::now();
                    let mut held = self.held.lock().expect("leases");
                    let expired: Vec<String> = held
                        .iter()
                        .filter(|(_, (_, claimed))| now >= confirmed(*claimed) + ttl)
                        .map(|(sid, _)| sid.clone())
                        .collect();
                    if expired.is_empty() {
                        tracing::warn!(event = "lease_renew_failed", error = %e, "could not renew session leases; retrying");
                        continue;
                    }
                    tracing::error!(event = "leases_expired", error = %e, sessions = expired.len(), "could not renew session leases for a whole lease; stepping down from those sessions");
                    for sid in &expired {
                        held.remove(sid);
                    }
                    expired
                }
            };
            for sid in lost {
                tracing::warn!(event = "lease_lost", sessionId = %sid, "session lease lost; stepping down");
                if let Some(handle) = shared.sessions.get(&sid) {
                    handle.send(SessionCmd::StepDown).await;
                }
            }
        }
    }
}
