//! Warm pool: tasks launched for nobody whose
//! runners dial `/internal/warm/{task_id}` and wait. A claim atomically takes
//! one ready task out of the pool for exactly one session (never returned).
//!
//! Refill: after every claim and on a timer, up to the target, never past the
//! maximum (launching tasks count), never more launches at once than the
//! backend's launch slots allow. Failures back off exponentially with jitter
//! and open a circuit breaker, so a failing backend is neither hammered nor
//! made to launch without bound. Ready tasks past their TTL, or whose socket
//! dropped, are evicted and replaced.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aishell_backend::{Backend, LaunchSpec, TaskMode};
use aishell_protocol::GatewayToRunner;
use serde::Serialize;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::time::Instant;

use crate::credential::CredentialSigner;
use crate::session::SessionHandle;

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub enabled: bool,
    /// Ready (plus launching) tasks to keep.
    pub target: usize,
    /// Hard cap on pool tasks, launching ones included.
    pub max: usize,
    /// Ready tasks older than this are replaced.
    pub ready_ttl: Duration,
    /// A launched task must dial back within this.
    pub launch_deadline: Duration,
    /// Consecutive failures that open the circuit breaker.
    pub breaker_threshold: u32,
    /// How long the breaker stays open.
    pub breaker_cooldown: Duration,
    /// Ask warm runners to start the agent before the claim (`prepare`).
    pub prestart_agents: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            enabled: false,
            target: 3,
            max: 10,
            ready_ttl: Duration::from_secs(3600),
            launch_deadline: Duration::from_secs(90),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(30),
            prestart_agents: true,
        }
    }
}

/// Where a warm runner's socket sends its frames once claimed.
pub type Route = watch::Receiver<Option<SessionHandle>>;

/// A ready task handed to a session.
pub struct Claimed {
    pub task_id: String,
    pub generation: u64,
    pub tx: mpsc::UnboundedSender<GatewayToRunner>,
    pub took: Duration,
}

struct ReadyLink {
    generation: u64,
    tx: mpsc::UnboundedSender<GatewayToRunner>,
    route: watch::Sender<Option<SessionHandle>>,
}

enum Entry {
    Launching { since: Instant },
    Ready { since: Instant, link: ReadyLink },
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// Ready task ids, oldest first (claims take the oldest).
    ready: VecDeque<String>,
    consecutive_failures: u32,
    next_launch_at: Option<Instant>,
    breaker_until: Option<Instant>,
    /// Refills wait for a burst of claims to quiet down (launching runners
    /// competes with the claimed sessions' agents for CPU) ...
    refill_quiet_until: Option<Instant>,
    /// ... but no longer than [`REFILL_MAX_DEFER`] after the burst began.
    refill_deferred_since: Option<Instant>,
    /// Evicted task ids: a runner of one that re-dials is refused, not re-added.
    evicted: std::collections::HashSet<String>,
}

/// Quiet time after the last claim before the pool refills.
const REFILL_QUIET: Duration = Duration::from_millis(150);
/// Longest a stream of claims can hold a refill back.
const REFILL_MAX_DEFER: Duration = Duration::from_secs(1);

impl State {
    fn tombstone(&mut self, task_id: &str) {
        if self.evicted.len() > 10_000 {
            self.evicted.clear();
        }
        self.evicted.insert(task_id.to_string());
    }

    /// Remove an entry, telling its runner to shut down if it is connected.
    fn remove(&mut self, task_id: &str) -> Option<Entry> {
        self.ready.retain(|t| t != task_id);
        self.tombstone(task_id);
        let entry = self.entries.remove(task_id);
        if let Some(Entry::Ready { link, .. }) = &entry {
            let _ = link.tx.send(GatewayToRunner::Shutdown {
                reason: "evicted from the warm pool".into(),
            });
        }
        entry
    }
}

#[derive(Default)]
struct Counters {
    claim_hit: AtomicU64,
    claim_miss: AtomicU64,
    launch: AtomicU64,
    ready: AtomicU64,
    evict: AtomicU64,
    fail: AtomicU64,
    /// Launch calls not yet returned (a drain waits for them).
    launches_in_flight: AtomicU64,
}

#[derive(Debug, Serialize)]
pub struct PoolSnapshot {
    pub enabled: bool,
    pub target: usize,
    pub max: usize,
    pub ready: usize,
    pub launching: usize,
    pub breaker_open: bool,
    pub consecutive_failures: u32,
    pub claim_hit: u64,
    pub claim_miss: u64,
    pub launched: u64,
    pub became_ready: u64,
    pub evicted: u64,
    pub failed: u64,
}

pub struct WarmPool {
    cfg: PoolConfig,
    target: AtomicU64,
    backend: Arc<dyn Backend>,
    credentials: CredentialSigner,
    credential_ttl: Duration,
    runner_url: String,
    /// Extra environment of every runner (`cluster::runner_env`).
    runner_env: std::collections::BTreeMap<String, String>,
    launch_slots: Arc<Semaphore>,
    state: Mutex<State>,
    wake: Notify,
    counters: Counters,
}

impl WarmPool {
    pub fn new(
        cfg: PoolConfig,
        backend: Arc<dyn Backend>,
        credentials: CredentialSigner,
        credential_ttl: Duration,
        runner_url: String,
        runner_env: std::collections::BTreeMap<String, String>,
        launch_slots: Arc<Semaphore>,
    ) -> Arc<Self> {
        Arc::new(WarmPool {
            target: AtomicU64::new(cfg.target as u64),
            cfg,
            backend,
            credentials,
            credential_ttl,
            runner_url,
            runner_env,
            launch_slots,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            counters: Counters::default(),
        })
    }

    pub fn enabled(&self) -> bool {
        self.cfg.enabled
    }

    /// Take the oldest ready task for `session`, atomically; None when empty.
    pub fn claim(&self, session: SessionHandle) -> Option<Claimed> {
        let started = Instant::now();
        let claimed = {
            let mut st = self.state.lock().expect("pool state");
            st.refill_quiet_until = Some(started + REFILL_QUIET);
            st.refill_deferred_since.get_or_insert(started);
            let mut found = None;
            while let Some(task_id) = st.ready.pop_front() {
                if let Some(Entry::Ready { link, .. }) = st.entries.remove(&task_id) {
                    // Frames from now on go to the session.
                    if link.route.send(Some(session.clone())).is_ok() {
                        found = Some((task_id, link));
                        break;
                    }
                }
            }
            found
        };
        self.wake.notify_one();
        match claimed {
            Some((task_id, link)) => {
                self.counters.claim_hit.fetch_add(1, Ordering::Relaxed);
                Some(Claimed {
                    task_id,
                    generation: link.generation,
                    tx: link.tx,
                    took: started.elapsed(),
                })
            }
            None => {
                self.counters.claim_miss.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// A warm runner said hello. Registers it as ready and returns where its
    /// frames go. Only tasks the pool launched (or adopted after a restart,
    /// [`adopt`](Self::adopt)) are accepted, so registrations never grow the
    /// pool past its target.
    pub fn register(
        &self,
        task_id: &str,
        generation: u64,
        tx: mpsc::UnboundedSender<GatewayToRunner>,
    ) -> Result<Route, String> {
        let (route_tx, route_rx) = watch::channel(None);
        let mut st = self.state.lock().expect("pool state");
        let known = st.entries.contains_key(task_id);
        if st.evicted.contains(task_id) {
            return Err("this warm task was evicted".into());
        }
        if !known {
            return Err("this gateway's warm pool did not launch this task".into());
        }
        let link = ReadyLink {
            generation,
            tx,
            route: route_tx,
        };
        let since = match st.entries.get(task_id) {
            Some(Entry::Ready { since, .. }) => *since,
            _ => Instant::now(),
        };
        let was_ready = matches!(st.entries.get(task_id), Some(Entry::Ready { .. }));
        st.entries
            .insert(task_id.to_string(), Entry::Ready { since, link });
        if !was_ready {
            st.ready.push_back(task_id.to_string());
            st.consecutive_failures = 0;
            st.next_launch_at = None;
            self.counters.ready.fetch_add(1, Ordering::Relaxed);
            tracing::info!(event = "task_lifecycle", phase = "warm_pool", action = "ready", taskId = %task_id, "warm task ready");
        }
        Ok(route_rx)
    }

    /// An unclaimed warm runner's socket closed. Only the socket that is
    /// still current (same generation) evicts the entry.
    pub fn disconnected(&self, task_id: &str, generation: u64) {
        let removed = {
            let mut st = self.state.lock().expect("pool state");
            let current = matches!(st.entries.get(task_id), Some(Entry::Ready { link, .. }) if link.generation == generation);
            if current {
                st.remove(task_id);
            }
            current
        };
        if removed {
            self.evict(task_id.to_string(), "runner disconnected");
        }
    }

    /// After a restart: unclaimed warm tasks a previous gateway launched
    /// (listed by the backend) count as launching, up to the target, so their
    /// runners are registered when they re-dial and the pool launches no
    /// replacements meanwhile. One that does not re-dial within the launch
    /// deadline is evicted and stopped. Returns the ids adopted.
    pub fn adopt(&self, task_ids: impl IntoIterator<Item = String>) -> Vec<String> {
        if !self.cfg.enabled {
            return Vec::new();
        }
        let target = self.target.load(Ordering::Relaxed) as usize;
        let mut st = self.state.lock().expect("pool state");
        let now = Instant::now();
        let mut adopted = Vec::new();
        for task_id in task_ids {
            if st.entries.len() >= target {
                break;
            }
            st.entries
                .insert(task_id.clone(), Entry::Launching { since: now });
            adopted.push(task_id);
        }
        adopted
    }

    /// A warm task turned out to belong to a session (a runner claimed before
    /// a restart re-dialled naming its session): leave it to the session,
    /// without stopping it.
    pub fn forget(&self, task_id: &str) {
        let removed = {
            let mut st = self.state.lock().expect("pool state");
            st.ready.retain(|t| t != task_id);
            st.entries.remove(task_id).is_some()
        };
        if removed {
            self.wake.notify_one();
        }
    }

    pub fn contains(&self, task_id: &str) -> bool {
        self.state
            .lock()
            .expect("pool state")
            .entries
            .contains_key(task_id)
    }

    pub fn set_target(&self, target: usize) {
        self.target
            .store(target.min(self.cfg.max) as u64, Ordering::Relaxed);
        self.wake.notify_one();
    }

    pub fn snapshot(&self) -> PoolSnapshot {
        let st = self.state.lock().expect("pool state");
        let ready = st.ready.len();
        let c = &self.counters;
        PoolSnapshot {
            enabled: self.cfg.enabled,
            target: self.target.load(Ordering::Relaxed) as usize,
            max: self.cfg.max,
            ready,
            launching: st.entries.len() - ready,
            breaker_open: st.breaker_until.is_some_and(|t| t > Instant::now()),
            consecutive_failures: st.consecutive_failures,
            claim_hit: c.claim_hit.load(Ordering::Relaxed),
            claim_miss: c.claim_miss.load(Ordering::Relaxed),
            launched: c.launch.load(Ordering::Relaxed),
            became_ready: c.ready.load(Ordering::Relaxed),
            evicted: c.evict.load(Ordering::Relaxed),
            failed: c.fail.load(Ordering::Relaxed),
        }
    }

    /// Refill and evict until the gateway stops.
    pub async fn run(self: Arc<Self>) {
        if !self.cfg.enabled {
            return;
        }
        loop {
            let next = self.tick();
            let wait = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep_until(wait) => {}
            }
        }
    }

    /// One maintenance pass; returns when it wants to run again.
    fn tick(self: &Arc<Self>) -> Option<Instant> {
        let now = Instant::now();
        let mut to_evict = Vec::new();
        let mut to_launch = 0;
        let mut next: Option<Instant> = None;
        {
            let mut st = self.state.lock().expect("pool state");
            // Evict stale entries.
            let ttl = self.cfg.ready_ttl;
            let deadline = self.cfg.launch_deadline;
            let expired: Vec<(String, &'static str)> = st
                .entries
                .iter()
                .filter_map(|(id, e)| match e {
                    Entry::Ready { since, .. } if now >= *since + ttl => {
                        Some((id.clone(), "ready TTL expired"))
                    }
                    Entry::Launching { since } if now >= *since + deadline => {
                        Some((id.clone(), "did not dial back in time"))
                    }
                    _ => None,
                })
                .collect();
            for (id, why) in expired {
                if let Some(Entry::Launching { .. }) = st.remove(&id) {
                    self.note_failure(&mut st, now);
                }
                to_evict.push((id, why));
            }
            for e in st.entries.values() {
                let at = match e {
                    Entry::Ready { since, .. } => *since + ttl,
                    Entry::Launching { since } => *since + deadline,
                };
                next = Some(next.map_or(at, |n| n.min(at)));
            }
            // Refill, unless backing off or a burst of claims is under way.
            let quiet_until = st
                .refill_quiet_until
                .zip(st.refill_deferred_since)
                .map(|(quiet, since)| quiet.min(since + REFILL_MAX_DEFER));
            let blocked_until = [st.breaker_until, st.next_launch_at, quiet_until]
                .into_iter()
                .flatten()
                .filter(|t| *t > now)
                .max();
            if let Some(until) = blocked_until {
                next = Some(next.map_or(until, |n| n.min(until)));
            } else {
                st.refill_quiet_until = None;
                st.refill_deferred_since = None;
                let target = self.target.load(Ordering::Relaxed) as usize;
                let have = st.entries.len();
                to_launch = target
                    .saturating_sub(have)
                    .min(self.cfg.max.saturating_sub(have));
                for _ in 0..to_launch {
                    let task_id = format!("w-{}", uuid::Uuid::new_v4().simple());
                    st.entries
                        .insert(task_id.clone(), Entry::Launching { since: now });
                    self.spawn_launch(task_id);
                }
            }
        }
        for (id, why) in to_evict {
            self.evict(id, why);
        }
        if to_launch > 0 {
            tracing::debug!(
                event = "warm_pool_refill",
                launching = to_launch,
                "refilling warm pool"
            );
        }
        next
    }

    fn note_failure(&self, st: &mut State, now: Instant) {
        st.consecutive_failures += 1;
        self.counters.fail.fetch_add(1, Ordering::Relaxed);
        let exp = st.consecutive_failures.saturating_sub(1).min(6);
        let base = Duration::from_millis(500) * 2u32.pow(exp);
        let jitter = 0.5 + rand::random::<f64>();
        st.next_launch_at = Some(now + base.min(Duration::from_secs(30)).mul_f64(jitter));
        if st.consecutive_failures >= self.cfg.breaker_threshold {
            st.breaker_until = Some(now + self.cfg.breaker_cooldown);
            tracing::error!(
                event = "warm_pool_breaker_open",
                failures = st.consecutive_failures,
                cooldown_s = self.cfg.breaker_cooldown.as_secs(),
                "warm pool launches keep failing; pausing refills"
            );
        }
    }

    fn spawn_launch(self: &Arc<Self>, task_id: String) {
        let pool = self.clone();
        pool.counters
            .launches_in_flight
            .fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            pool.launch_and_settle(task_id).await;
            pool.counters
                .launches_in_flight
                .fetch_sub(1, Ordering::SeqCst);
        });
    }

    async fn launch_and_settle(self: &Arc<Self>, task_id: String) {
        {
            let _slot = self.launch_slots.clone().acquire_owned().await;
            let spec = LaunchSpec {
                credential: self.credentials.mint(
                    &task_id,
                    TaskMode::Warm,
                    None,
                    self.credential_ttl,
                ),
                task_id: task_id.clone(),
                mode: TaskMode::Warm,
                session_id: None,
                gateway_url: self.runner_url.clone(),
                env: self.runner_env.clone(),
            };
            self.counters.launch.fetch_add(1, Ordering::Relaxed);
            tracing::info!(event = "task_lifecycle", phase = "warm_pool", action = "launch", taskId = %task_id, "launching warm task");
            if let Err(e) = self.backend.launch(spec).await {
                tracing::error!(event = "task_lifecycle", phase = "warm_pool", action = "fail", taskId = %task_id, reason = %e, "warm launch failed");
                let mut st = self.state.lock().expect("pool state");
                st.remove(&task_id);
                self.note_failure(&mut st, Instant::now());
                drop(st);
                self.wake.notify_one();
                return;
            }
        }
        // Drained or evicted while the launch call ran: the stop issued then
        // found nothing to stop, so stop the task now that it exists.
        let removed = self
            .state
            .lock()
            .expect("pool state")
            .evicted
            .contains(&task_id);
        if removed && let Err(e) = self.backend.stop(&task_id).await {
            tracing::error!(event = "task_stop_failed", taskId = %task_id, error = %e, "could not stop a warm task removed while launching");
        }
    }

    fn evict(&self, task_id: String, why: &'static str) {
        self.counters.evict.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(event = "task_lifecycle", phase = "warm_pool", action = "evict", taskId = %task_id, reason = why, "evicting warm task");
        let backend = self.backend.clone();
        tokio::spawn(async move {
            if let Err(e) = backend.stop(&task_id).await {
                tracing::error!(event = "task_stop_failed", taskId = %task_id, error = %e, "could not stop evicted warm task");
            }
        });
        self.wake.notify_one();
    }

    /// Shut down every unclaimed task (drain).
    pub async fn drain(&self) {
        self.set_target(0);
        let ids: Vec<String> = {
            let mut st = self.state.lock().expect("pool state");
            let ids: Vec<String> = st.entries.keys().cloned().collect();
            for id in &ids {
                st.remove(id);
            }
            ids
        };
        let stops = ids.iter().map(|id| self.backend.stop(id));
        futures_util::future::join_all(stops).await;
        // Launches still running stop their task when they return.
        let deadline = Instant::now() + self.cfg.launch_deadline;
        while self.counters.launches_in_flight.load(Ordering::SeqCst) > 0
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
