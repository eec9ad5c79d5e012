//! The `ecs` backend: every task is an Amazon ECS task of one fixed task
//! definition, started by `RunTask` with per-task container overrides only
//! (gateway URL, task id, mode, credential), so one warm pool serves every
//! user and no user secret ever reaches ECS.
//!
//! Statuses come from one refresher per backend: it describes every task
//! this gateway launched or adopted with `DescribeTasks`, up to
//! [`MAX_DESCRIBE`] per call, once per [`EcsBackendConfig::refresh_interval`]
//! (and at once after a launch or a stop). `status`, `watch` and `stop` read
//! what it saw; no call polls ECS per task. Tasks carry `startedBy` = this
//! gateway's instance id and tags naming the task, its mode and session, so
//! a restarted gateway finds them again with `ListTasks(startedBy)` and
//! `DescribeTasks(include TAGS)`. See ARCHITECTURE.md, "Backends".

pub mod status;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aishell_backend::{
    Backend, BackendError, Capabilities, Isolation, LaunchSpec, StatusChange, TaskId, TaskInfo,
    TaskMode, TaskStatus, WorkspaceAccess,
};
use async_trait::async_trait;
use aws_sdk_ecs::Client;
use aws_sdk_ecs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ecs::types::{
    AssignPublicIp, AwsVpcConfiguration, CapacityProviderStrategyItem, ContainerOverride,
    DesiredStatus, KeyValuePair, LaunchType, NetworkConfiguration, Tag, Task, TaskField,
    TaskOverride,
};
use tokio::sync::{broadcast, mpsc, watch};

pub use status::{EcsLastStatus, TaskFacts};

const NAME: &str = "ecs";

/// Most tasks one `DescribeTasks` call accepts.
pub const MAX_DESCRIBE: usize = 100;
/// Tag naming the aishell task an ECS task runs.
pub const TAG_TASK: &str = "aishell.task";
/// Tag naming the task's mode (`warm` or `cold`).
pub const TAG_MODE: &str = "aishell.mode";
/// Tag naming the session of a cold task.
pub const TAG_SESSION: &str = "aishell.session";
/// Tag naming the gateway instance (also in `startedBy`).
pub const TAG_INSTANCE: &str = "aishell.instance";
/// Where the task definition mounts the shared workspaces volume (EFS).
pub const DEFAULT_WORKSPACES_MOUNT: &str = "/workspaces";

/// Every ECS action this backend calls, each with the SDK operation that
/// calls it (the Terraform test checks the IAM policy grants exactly these).
pub const REQUIRED_ACTIONS: [&str; 5] = [
    "ecs:RunTask",
    "ecs:DescribeTasks",
    "ecs:StopTask",
    "ecs:ListTasks",
    // RunTask with tags is authorised as TagResource too.
    "ecs:TagResource",
];

/// How tasks are placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// The cluster's default capacity provider strategy.
    ClusterDefault,
    LaunchType(EcsLaunchType),
    CapacityProviders(Vec<CapacityProviderShare>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EcsLaunchType {
    Fargate,
    Ec2,
}

impl EcsLaunchType {
    pub fn parse(word: &str) -> Option<Self> {
        match word.to_ascii_uppercase().as_str() {
            "FARGATE" => Some(Self::Fargate),
            "EC2" => Some(Self::Ec2),
            _ => None,
        }
    }
}

/// One entry of a capacity provider strategy (`name[:weight[:base]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacityProviderShare {
    pub name: String,
    pub weight: i32,
    pub base: i32,
}

impl CapacityProviderShare {
    /// `FARGATE_SPOT:3` or `my-asg:1:2`.
    pub fn parse(spec: &str) -> Option<Self> {
        let mut parts = spec.split(':');
        let name = parts.next().filter(|n| !n.is_empty())?.to_string();
        let weight = parts.next().map(str::parse).transpose().ok()?.unwrap_or(1);
        let base = parts.next().map(str::parse).transpose().ok()?.unwrap_or(0);
        if parts.next().is_some() {
            return None;
        }
        Some(Self { name, weight, base })
    }
}

/// `awsvpc` networking of the tasks (required by Fargate).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AwsVpc {
    pub subnets: Vec<String>,
    pub security_groups: Vec<String>,
    pub assign_public_ip: bool,
}

/// Settings of an [`EcsBackend`]. Credentials, region and `AWS_ENDPOINT_URL`
/// come from the usual AWS chain (environment, profile, task role).
#[derive(Debug, Clone)]
pub struct EcsBackendConfig {
    /// Cluster name or ARN.
    pub cluster: String,
    /// Task definition (`family`, `family:revision` or ARN) every task runs.
    pub task_definition: String,
    /// The runner's container in that task definition (the overrides' target).
    pub container_name: String,
    pub placement: Placement,
    /// `None` for task definitions in `bridge` or `host` network mode.
    pub network: Option<AwsVpc>,
    /// This gateway's identity (`startedBy`, at most 36 characters).
    pub instance_id: String,
    /// Where the task definition mounts the workspaces volume.
    pub workspaces_mount: String,
    /// Deadline of one ECS API call (retries included).
    pub api_timeout: Duration,
    /// How long `stop` waits for STOPPED.
    pub stop_timeout: Duration,
    /// Time between two `DescribeTasks` rounds.
    pub refresh_interval: Duration,
    /// How long a good permission check is trusted (`ping`, `launch`).
    pub permission_ttl: Duration,
}

impl EcsBackendConfig {
    pub fn new(
        cluster: impl Into<String>,
        task_definition: impl Into<String>,
        instance_id: impl Into<String>,
    ) -> Self {
        Self {
            cluster: cluster.into(),
            task_definition: task_definition.into(),
            container_name: "runner".into(),
            placement: Placement::LaunchType(EcsLaunchType::Fargate),
            network: None,
            instance_id: instance_id.into(),
            workspaces_mount: DEFAULT_WORKSPACES_MOUNT.into(),
            api_timeout: Duration::from_secs(15),
            stop_timeout: Duration::from_secs(60),
            refresh_interval: Duration::from_secs(1),
            permission_ttl: Duration::from_secs(60),
        }
    }

    /// Fargate runs each task in a micro-VM of its own; EC2 capacity shares
    /// the instance's kernel.
    pub fn isolation(&self) -> Isolation {
        let fargate = |name: &str| name.starts_with("FARGATE");
        match &self.placement {
            Placement::LaunchType(EcsLaunchType::Fargate) => Isolation::MicroVm,
            Placement::CapacityProviders(shares) if shares.iter().all(|s| fargate(&s.name)) => {
                Isolation::MicroVm
            }
            _ => Isolation::Container,
        }
    }
}

/// An HTTPS client on rustls with ring, the one crypto provider of this
/// workspace (the SDK's default would add aws-lc).
fn http_client() -> aws_sdk_ecs::config::SharedHttpClient {
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
    aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

/// What the backend knows of one task.
#[derive(Debug, Clone)]
struct Tracked {
    arn: String,
    mode: TaskMode,
    session_id: Option<String>,
    started_at: SystemTime,
    facts: TaskFacts,
}

impl Tracked {
    fn stopped(&self) -> bool {
        self.facts.last_status() == Some(EcsLastStatus::Stopped)
    }
}

/// The last permission check and when it ran.
#[derive(Debug, Clone)]
struct PermissionCheck {
    at: Instant,
    missing: Option<String>,
}

struct Shared {
    client: Client,
    cfg: EcsBackendConfig,
    tasks: Mutex<HashMap<TaskId, Tracked>>,
    changes: broadcast::Sender<StatusChange>,
    /// Counts finished refresh rounds (waiters see every round).
    rounds: watch::Sender<u64>,
    /// Wakes the refresher before its interval (after a launch or a stop).
    kick: Arc<tokio::sync::Notify>,
    /// A refused `DescribeTasks` (a missing permission): reported by
    /// `status` for tasks ECS has not been seen to run.
    describe_refused: Mutex<Option<String>>,
    permission: Mutex<Option<PermissionCheck>>,
}

/// Runs each task as an ECS task. See the crate docs.
pub struct EcsBackend {
    shared: Arc<Shared>,
}

impl EcsBackend {
    /// A backend with a client from the usual AWS chain. Starts its
    /// refresher (call inside a Tokio runtime).
    pub async fn connect(cfg: EcsBackendConfig) -> Result<Self, BackendError> {
        if cfg.instance_id.len() > 36 {
            return Err(refused(
                "configure",
                format!(
                    "instance id {:?} is longer than the 36 characters ECS allows in startedBy",
                    cfg.instance_id
                ),
            ));
        }
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .operation_timeout(cfg.api_timeout)
            .connect_timeout(Duration::from_secs(5))
            .build();
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http_client())
            .timeout_config(timeouts)
            .load()
            .await;
        if sdk.region().is_none() {
            return Err(refused(
                "configure",
                "no AWS region: set AWS_REGION (or a profile's region)".into(),
            ));
        }
        Ok(Self::with_client(Client::new(&sdk), cfg))
    }

    /// A backend over a given client (tests point it anywhere).
    pub fn with_client(client: Client, cfg: EcsBackendConfig) -> Self {
        let (changes, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            client,
            cfg,
            tasks: Mutex::new(HashMap::new()),
            changes,
            rounds: watch::channel(0).0,
            kick: Arc::new(tokio::sync::Notify::new()),
            describe_refused: Mutex::new(None),
            permission: Mutex::new(None),
        });
        tokio::spawn(refresher(Arc::downgrade(&shared)));
        Self { shared }
    }

    pub fn config(&self) -> &EcsBackendConfig {
        &self.shared.cfg
    }

    /// Check that this gateway may call every ECS action it needs, with
    /// calls that change nothing. `Err` names the first missing action in
    /// one line. The result is kept for `permission_ttl` when good.
    pub async fn check_permissions(&self) -> Result<(), BackendError> {
        let fresh = self
            .shared
            .permission
            .lock()
            .unwrap()
            .clone()
            .filter(|c| c.missing.is_none() && c.at.elapsed() < self.shared.cfg.permission_ttl);
        if fresh.is_some() {
            return Ok(());
        }
        let result = self.probe_permissions().await;
        let missing = match &result {
            Err(BackendError::Refused { reason, .. }) => Some(reason.clone()),
            _ => None,
        };
        if result.is_ok() || missing.is_some() {
            *self.shared.permission.lock().unwrap() = Some(PermissionCheck {
                at: Instant::now(),
                missing,
            });
        }
        result
    }

    async fn probe_permissions(&self) -> Result<(), BackendError> {
        let s = &self.shared;
        let op = "permission check";
        // A task id no task has: allowed calls answer "not found".
        const NO_TASK: &str = "00000000000000000000000000000000";
        permitted(
            op,
            "ecs:ListTasks",
            s.client
                .list_tasks()
                .cluster(&s.cfg.cluster)
                .started_by(&s.cfg.instance_id)
                .max_results(1)
                .send()
                .await,
        )?;
        permitted(
            op,
            "ecs:DescribeTasks",
            s.client
                .describe_tasks()
                .cluster(&s.cfg.cluster)
                .tasks(NO_TASK)
                .send()
                .await,
        )?;
        permitted(
            op,
            "ecs:StopTask",
            s.client
                .stop_task()
                .cluster(&s.cfg.cluster)
                .task(NO_TASK)
                .reason("aishell permission check")
                .send()
                .await,
        )?;
        // Zero tasks: authorised (RunTask, TagResource, iam:PassRole) like a
        // real launch, then refused as invalid or run as nothing.
        let mut probe = self.run_task_request(None);
        probe = probe.count(0).client_token(format!(
            "aishell-permission-check-{}",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis()
        ));
        permitted(op, "ecs:RunTask", probe.send().await)?;
        Ok(())
    }

    /// RunTask of the fixed task definition, placed and networked as
    /// configured; with a launch spec, its overrides, token and tags.
    fn run_task_request(
        &self,
        spec: Option<&LaunchSpec>,
    ) -> aws_sdk_ecs::operation::run_task::builders::RunTaskFluentBuilder {
        let cfg = &self.shared.cfg;
        let mut req = self
            .shared
            .client
            .run_task()
            .cluster(&cfg.cluster)
            .task_definition(&cfg.task_definition)
            .count(1)
            .started_by(&cfg.instance_id)
            .tags(tag(TAG_INSTANCE, &cfg.instance_id));
        req = match &cfg.placement {
            Placement::ClusterDefault => req,
            Placement::LaunchType(EcsLaunchType::Fargate) => req.launch_type(LaunchType::Fargate),
            Placement::LaunchType(EcsLaunchType::Ec2) => req.launch_type(LaunchType::Ec2),
            Placement::CapacityProviders(shares) => shares.iter().fold(req, |req, s| {
                match CapacityProviderStrategyItem::builder()
                    .capacity_provider(&s.name)
                    .weight(s.weight)
                    .base(s.base)
                    .build()
                {
                    Ok(item) => req.capacity_provider_strategy(item),
                    Err(_) => req,
                }
            }),
        };
        if let Some(net) = &cfg.network
            && let Ok(vpc) = AwsVpcConfiguration::builder()
                .set_subnets(Some(net.subnets.clone()))
                .set_security_groups(Some(net.security_groups.clone()))
                .assign_public_ip(if net.assign_public_ip {
                    AssignPublicIp::Enabled
                } else {
                    AssignPublicIp::Disabled
                })
                .build()
        {
            req = req.network_configuration(
                NetworkConfiguration::builder()
                    .awsvpc_configuration(vpc)
                    .build(),
            );
        }
        if let Some(spec) = spec {
            req = req
                .client_token(&spec.task_id)
                .tags(tag(TAG_TASK, &spec.task_id))
                .tags(tag(TAG_MODE, &spec.mode.to_string()))
                .overrides(
                    TaskOverride::builder()
                        .container_overrides(
                            ContainerOverride::builder()
                                .name(&cfg.container_name)
                                .set_environment(Some(
                                    task_environment(spec)
                                        .into_iter()
                                        .map(|(k, v)| {
                                            KeyValuePair::builder().name(k).value(v).build()
                                        })
                                        .collect(),
                                ))
                                .build(),
                        )
                        .build(),
                );
            if let Some(session) = &spec.session_id {
                req = req.tags(tag(TAG_SESSION, session));
            }
        }
        req
    }

    /// The ECS task of an aishell task: known, or found among this
    /// gateway's tasks (adopting them).
    async fn arn_of(&self, task_id: &str) -> Result<Option<String>, BackendError> {
        if let Some(t) = self.shared.tasks.lock().unwrap().get(task_id) {
            return Ok(Some(t.arn.clone()));
        }
        self.list().await?;
        Ok(self
            .shared
            .tasks
            .lock()
            .unwrap()
            .get(task_id)
            .map(|t| t.arn.clone()))
    }

    /// Wait (bounded) until the refresher has seen the task STOPPED or gone.
    async fn wait_stopped(&self, task_id: &str) -> Result<(), BackendError> {
        let mut rounds = self.shared.rounds.subscribe();
        let deadline = tokio::time::Instant::now() + self.shared.cfg.stop_timeout;
        loop {
            let done = self
                .shared
                .tasks
                .lock()
                .unwrap()
                .get(task_id)
                .is_none_or(Tracked::stopped);
            if done {
                return Ok(());
            }
            self.shared.kick.notify_one();
            match tokio::time::timeout_at(deadline, rounds.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    return Err(BackendError::Unavailable {
                        backend: NAME,
                        op: "stop",
                        reason: format!(
                            "ECS task of {task_id} not STOPPED within {:?}",
                            self.shared.cfg.stop_timeout
                        ),
                    });
                }
            }
        }
    }
}

/// The runner's environment: per-task settings only. Per-task extras first,
/// so they can never override the task's identity.
fn task_environment(spec: &LaunchSpec) -> BTreeMap<String, String> {
    let mut env = spec.env.clone();
    env.insert("AISHELL_GATEWAY_URL".into(), spec.gateway_url.clone());
    env.insert("AISHELL_TASK_ID".into(), spec.task_id.clone());
    env.insert("AISHELL_TASK_MODE".into(), spec.mode.to_string());
    env.insert("AISHELL_TASK_CREDENTIAL".into(), spec.credential.clone());
    if let Some(sid) = &spec.session_id {
        env.insert("AISHELL_SESSION_ID".into(), sid.clone());
    }
    env
}

fn tag(key: &str, value: &str) -> Tag {
    Tag::builder().key(key).value(value).build()
}

fn refused(op: &'static str, reason: String) -> BackendError {
    BackendError::Refused {
        backend: NAME,
        op,
        reason,
    }
}

/// Error codes AWS answers a call the caller may not make with.
fn is_access_denied(code: Option<&str>) -> bool {
    matches!(
        code,
        Some("AccessDeniedException" | "AccessDenied" | "UnauthorizedOperation")
    )
}

/// An SDK error in the backend's terms. A denial names the action (AWS's
/// message names it when it is another one, e.g. iam:PassRole).
fn sdk_error<E, R>(op: &'static str, action: &'static str, err: SdkError<E, R>) -> BackendError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    let code = err.code().map(str::to_string);
    let message = err.message().unwrap_or_default().to_string();
    match &err {
        SdkError::ServiceError(_) => {
            let code = code.unwrap_or_else(|| "error".into());
            if is_access_denied(Some(&code)) {
                let named = message
                    .split("perform: ")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .unwrap_or(action);
                refused(
                    op,
                    format!(
                        "missing permission {named}: this gateway's AWS identity may not call it ({code}: {message}); grant it to the gateway's task role"
                    ),
                )
            } else {
                refused(op, format!("{action} failed: {code}: {message}"))
            }
        }
        _ => BackendError::Unavailable {
            backend: NAME,
            op,
            reason: format!(
                "{action}: {}",
                aws_sdk_ecs::error::DisplayErrorContext(&err)
            ),
        },
    }
}

/// A probe's answer: permitted unless AWS denied it (or the cluster is missing).
fn permitted<T, E, R>(
    op: &'static str,
    action: &'static str,
    result: Result<T, SdkError<E, R>>,
) -> Result<(), BackendError>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    match result {
        Ok(_) => Ok(()),
        Err(e) if matches!(e, SdkError::ServiceError(_)) => {
            let code = e.code().map(str::to_string);
            if is_access_denied(code.as_deref())
                || code.as_deref() == Some("ClusterNotFoundException")
            {
                Err(sdk_error(op, action, e))
            } else {
                Ok(())
            }
        }
        Err(e) => Err(sdk_error(op, action, e)),
    }
}

fn tag_value<'a>(task: &'a Task, key: &str) -> Option<&'a str> {
    task.tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

fn created_at(task: &Task) -> SystemTime {
    task.created_at()
        .and_then(|t| u64::try_from(t.secs()).ok())
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
        .unwrap_or(UNIX_EPOCH)
}

/// Tasks split into `DescribeTasks` calls of at most [`MAX_DESCRIBE`].
pub fn describe_batches(arns: &[String]) -> Vec<&[String]> {
    arns.chunks(MAX_DESCRIBE).collect()
}

/// One `DescribeTasks` answer: the tasks, and the ARNs ECS does not know.
#[derive(Debug, Default)]
pub struct Described {
    pub tasks: Vec<Task>,
    pub missing: Vec<String>,
}

async fn describe(shared: &Shared, arns: &[String]) -> Result<Described, BackendError> {
    let out = shared
        .client
        .describe_tasks()
        .cluster(&shared.cfg.cluster)
        .set_tasks(Some(arns.to_vec()))
        .include(TaskField::Tags)
        .send()
        .await
        .map_err(|e| sdk_error("status", "ecs:DescribeTasks", e))?;
    Ok(Described {
        tasks: out.tasks().to_vec(),
        missing: out
            .failures()
            .iter()
            .filter(|f| f.reason() == Some("MISSING"))
            .filter_map(|f| f.arn().map(str::to_string))
            .collect(),
    })
}

/// One refresh round over the tasks not yet seen STOPPED, in batches of at
/// most [`MAX_DESCRIBE`]; applies what `describe` answers and returns the
/// status changes. Generic over `describe` for the unit tests.
async fn refresh_round<F, Fut>(shared: &Shared, describe: F) -> Vec<StatusChange>
where
    F: Fn(Vec<String>) -> Fut,
    Fut: Future<Output = Result<Described, BackendError>>,
{
    let arns: Vec<String> = shared
        .tasks
        .lock()
        .unwrap()
        .values()
        .filter(|t| !t.stopped())
        .map(|t| t.arn.clone())
        .collect();
    let mut changes = Vec::new();
    for batch in describe_batches(&arns) {
        match describe(batch.to_vec()).await {
            Ok(described) => {
                *shared.describe_refused.lock().unwrap() = None;
                changes.extend(apply(shared, described));
            }
            Err(e) => {
                if let BackendError::Refused { .. } = &e {
                    *shared.describe_refused.lock().unwrap() = Some(e.to_string());
                }
                tracing::warn!(event = "ecs_describe_failed", error = %e, "could not describe ECS tasks");
                break;
            }
        }
    }
    changes
}

/// Record described tasks; the changes of their statuses.
fn apply(shared: &Shared, described: Described) -> Vec<StatusChange> {
    let mut tasks = shared.tasks.lock().unwrap();
    let mut by_arn: HashMap<String, TaskId> = tasks
        .iter()
        .map(|(id, t)| (t.arn.clone(), id.clone()))
        .collect();
    let mut changes = Vec::new();
    for task in described.tasks {
        let Some(id) = task.task_arn().and_then(|a| by_arn.get(a)) else {
            continue;
        };
        let Some(tracked) = tasks.get_mut(id) else {
            continue;
        };
        let facts = TaskFacts::from_task(&task, &shared.cfg.container_name);
        let before = tracked.facts.status();
        tracked.facts = facts;
        let after = tracked.facts.status();
        if before != after {
            changes.push(StatusChange {
                task_id: id.clone(),
                status: after,
            });
        }
    }
    for arn in described.missing {
        if let Some(id) = by_arn.remove(&arn) {
            tasks.remove(&id);
            changes.push(StatusChange {
                task_id: id,
                status: TaskStatus::NotFound,
            });
        }
    }
    changes
}

/// The one watcher of a backend: a refresh round per interval, or at once
/// when kicked; ends with the backend.
async fn refresher(shared: Weak<Shared>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        let changes = refresh_round(&s, |arns| {
            let s = s.clone();
            async move { describe(&s, &arns).await }
        })
        .await;
        for change in changes {
            if matches!(change.status, TaskStatus::Exited { .. }) {
                tracing::info!(event = "ecs_task_ended", taskId = %change.task_id, status = ?change.status, "ECS task ended");
            }
            let _ = s.changes.send(change);
        }
        s.rounds.send_modify(|n| *n += 1);
        let interval = s.cfg.refresh_interval;
        let kick = s.kick.clone();
        drop(s);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = kick.notified() => {}
        }
    }
}

#[async_trait]
impl Backend for EcsBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn launch(&self, spec: LaunchSpec) -> Result<(), BackendError> {
        if spec.task_id.is_empty() {
            return Err(refused("launch", "empty task id".into()));
        }
        // While a permission is known to be missing, each start checks
        // again and fails at once in its words (and works once it is granted).
        let known_missing = self
            .shared
            .permission
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|c| c.missing.is_some());
        if known_missing && let Err(e) = self.check_permissions().await {
            return Err(match e {
                BackendError::Refused { reason, .. } => refused("launch", reason),
                other => other,
            });
        }
        let started = Instant::now();
        let out = self
            .run_task_request(Some(&spec))
            .send()
            .await
            .map_err(|e| sdk_error("launch", "ecs:RunTask", e))?;
        let Some(task) = out.tasks().first() else {
            let why = out
                .failures()
                .iter()
                .map(|f| {
                    format!(
                        "{}{}",
                        f.reason().unwrap_or("unknown failure"),
                        f.detail().map(|d| format!(" ({d})")).unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
            return Err(refused(
                "launch",
                format!(
                    "ECS did not start a task of {}: {why}",
                    self.shared.cfg.task_definition
                ),
            ));
        };
        let arn = task.task_arn().unwrap_or_default().to_string();
        self.shared.tasks.lock().unwrap().insert(
            spec.task_id.clone(),
            Tracked {
                arn: arn.clone(),
                mode: spec.mode,
                session_id: spec.session_id.clone(),
                started_at: SystemTime::now(),
                facts: TaskFacts::from_task(task, &self.shared.cfg.container_name),
            },
        );
        self.shared.kick.notify_one();
        tracing::info!(
            event = "task_launch",
            taskId = %spec.task_id,
            sessionId = spec.session_id.as_deref(),
            mode = %spec.mode,
            taskArn = %arn,
            duration_ms = started.elapsed().as_millis() as u64,
            "launched runner ECS task"
        );
        Ok(())
    }

    async fn status(&self, task_id: &str) -> Result<TaskStatus, BackendError> {
        let known = self
            .shared
            .tasks
            .lock()
            .unwrap()
            .get(task_id)
            .map(|t| t.facts.status());
        match known {
            None => Ok(TaskStatus::NotFound),
            Some(TaskStatus::Pending) => match self.shared.describe_refused.lock().unwrap().clone()
            {
                Some(e) => Err(BackendError::Refused {
                    backend: NAME,
                    op: "status",
                    reason: e,
                }),
                None => Ok(TaskStatus::Pending),
            },
            Some(status) => Ok(status),
        }
    }

    async fn stop(&self, task_id: &str) -> Result<(), BackendError> {
        let Some(arn) = self.arn_of(task_id).await? else {
            return Ok(());
        };
        let started = Instant::now();
        let stopped_already = self
            .shared
            .tasks
            .lock()
            .unwrap()
            .get(task_id)
            .is_some_and(Tracked::stopped);
        if !stopped_already {
            let sent = self
                .shared
                .client
                .stop_task()
                .cluster(&self.shared.cfg.cluster)
                .task(&arn)
                .reason("stopped by the aishell gateway")
                .send()
                .await;
            match sent {
                Ok(_) => {}
                // Already gone from ECS.
                Err(e) if e.code() == Some("InvalidParameterException") => {
                    self.shared.tasks.lock().unwrap().remove(task_id);
                    return Ok(());
                }
                Err(e) => return Err(sdk_error("stop", "ecs:StopTask", e)),
            }
            self.wait_stopped(task_id).await?;
        }
        self.shared.tasks.lock().unwrap().remove(task_id);
        tracing::info!(
            event = "task_stop",
            taskId = %task_id,
            taskArn = %arn,
            duration_ms = started.elapsed().as_millis() as u64,
            "stopped ECS task"
        );
        Ok(())
    }

    async fn list(&self) -> Result<Vec<TaskInfo>, BackendError> {
        let s = &self.shared;
        let mut arns: Vec<String> = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let page = s
                .client
                .list_tasks()
                .cluster(&s.cfg.cluster)
                .started_by(&s.cfg.instance_id)
                .desired_status(DesiredStatus::Running)
                .set_next_token(next.clone())
                .send()
                .await
                .map_err(|e| sdk_error("list", "ecs:ListTasks", e))?;
            arns.extend(page.task_arns().iter().cloned());
            match page.next_token() {
                Some(t) if !t.is_empty() => next = Some(t.to_string()),
                _ => break,
            }
        }
        // Tasks already known whose desired status is no longer RUNNING
        // (ended on their own) are still ours until stopped.
        for t in s.tasks.lock().unwrap().values() {
            if !arns.contains(&t.arn) {
                arns.push(t.arn.clone());
            }
        }
        let mut out = Vec::new();
        for batch in describe_batches(&arns) {
            let described = describe(s, batch).await.map_err(|e| match e {
                BackendError::Refused { reason, .. } => refused("list", reason),
                other => other,
            })?;
            let mut tasks = s.tasks.lock().unwrap();
            for task in &described.tasks {
                // A task without our tags is not one of ours.
                let Some(task_id) = tag_value(task, TAG_TASK) else {
                    continue;
                };
                let Some(mode) = tag_value(task, TAG_MODE).and_then(TaskMode::parse) else {
                    continue;
                };
                let facts = TaskFacts::from_task(task, &s.cfg.container_name);
                let tracked = tasks.entry(task_id.to_string()).or_insert_with(|| Tracked {
                    arn: task.task_arn().unwrap_or_default().to_string(),
                    mode,
                    session_id: tag_value(task, TAG_SESSION).map(str::to_string),
                    started_at: created_at(task),
                    facts: facts.clone(),
                });
                tracked.facts = facts;
                out.push(TaskInfo {
                    task_id: task_id.to_string(),
                    mode: tracked.mode,
                    session_id: tracked.session_id.clone(),
                    status: tracked.facts.status(),
                    started_at: tracked.started_at,
                });
            }
            for arn in &described.missing {
                tasks.retain(|_, t| &t.arn != arn);
            }
        }
        out.sort_by(|a, b| {
            a.started_at
                .cmp(&b.started_at)
                .then_with(|| a.task_id.cmp(&b.task_id))
        });
        Ok(out)
    }

    fn workspace_path(&self, user_id: &str) -> String {
        format!("{}/{user_id}", self.shared.cfg.workspaces_mount)
    }

    /// The permission check (kept while good): `/ready` fails, in one line,
    /// when an action is missing.
    async fn ping(&self) -> Result<(), BackendError> {
        self.check_permissions().await
    }

    fn capabilities(&self) -> Capabilities {
        let isolation = self.shared.cfg.isolation();
        Capabilities {
            // Fargate pulls the image and attaches an ENI for every task.
            typical_cold_start: match isolation {
                Isolation::MicroVm => Duration::from_secs(40),
                _ => Duration::from_secs(10),
            },
            workspaces: WorkspaceAccess::SharedVolume,
            isolation,
        }
    }

    /// The refresher's changes: every known task's status first, then each
    /// change as it is seen (no extra calls to ECS per subscriber).
    fn watch(self: Arc<Self>) -> mpsc::Receiver<StatusChange> {
        let (tx, rx) = mpsc::channel(256);
        let mut changes = self.shared.changes.subscribe();
        let shared = Arc::downgrade(&self.shared);
        tokio::spawn(async move {
            let snapshot = |shared: &Weak<Shared>| -> Vec<StatusChange> {
                shared
                    .upgrade()
                    .map(|s| {
                        s.tasks
                            .lock()
                            .unwrap()
                            .iter()
                            .map(|(id, t)| StatusChange {
                                task_id: id.clone(),
                                status: t.facts.status(),
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            };
            for change in snapshot(&shared) {
                if tx.send(change).await.is_err() {
                    return;
                }
            }
            loop {
                let next = tokio::select! {
                    c = changes.recv() => c,
                    _ = tx.closed() => return,
                };
                let batch = match next {
                    Ok(change) => vec![change],
                    // Fell behind: the current state says it all.
                    Err(broadcast::error::RecvError::Lagged(_)) => snapshot(&shared),
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                for change in batch {
                    if tx.send(change).await.is_err() {
                        return;
                    }
                }
            }
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn offline_backend() -> EcsBackend {
        let conf = aws_sdk_ecs::Config::builder()
            .behavior_version(aws_sdk_ecs::config::BehaviorVersion::latest())
            .region(aws_sdk_ecs::config::Region::new("us-east-1"))
            .build();
        let mut cfg = EcsBackendConfig::new("c", "td", "gw-1");
        cfg.refresh_interval = Duration::from_secs(3600);
        EcsBackend::with_client(Client::from_conf(conf), cfg)
    }

    fn running_task(arn: &str) -> Task {
        Task::builder().task_arn(arn).last_status("RUNNING").build()
    }

    #[tokio::test]
    async fn one_round_describes_every_live_task_in_batches_of_at_most_100() {
        let backend = offline_backend();
        {
            let mut tasks = backend.shared.tasks.lock().unwrap();
            for i in 0..250 {
                tasks.insert(
                    format!("t{i}"),
                    Tracked {
                        arn: format!("arn:t{i}"),
                        mode: TaskMode::Warm,
                        session_id: None,
                        started_at: UNIX_EPOCH,
                        facts: TaskFacts {
                            last_status: Some(if i == 0 { "STOPPED" } else { "PENDING" }.into()),
                            ..Default::default()
                        },
                    },
                );
            }
        }
        let calls = AtomicUsize::new(0);
        let sizes = Mutex::new(Vec::new());
        let changes = refresh_round(&backend.shared, |arns: Vec<String>| {
            calls.fetch_add(1, Ordering::SeqCst);
            sizes.lock().unwrap().push(arns.len());
            async move {
                // The last of each batch is unknown to ECS.
                let (last, rest) = arns.split_last().unwrap();
                Ok(Described {
                    tasks: rest.iter().map(|a| running_task(a)).collect(),
                    missing: vec![last.clone()],
                })
            }
        })
        .await;
        let sizes = sizes.into_inner().unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert!(sizes.iter().all(|n| *n <= MAX_DESCRIBE), "{sizes:?}");
        assert_eq!(
            sizes.iter().sum::<usize>(),
            249,
            "the stopped task is not described"
        );
        let running = changes
            .iter()
            .filter(|c| c.status == TaskStatus::Running)
            .count();
        let gone = changes
            .iter()
            .filter(|c| c.status == TaskStatus::NotFound)
            .count();
        assert_eq!((running, gone), (246, 3));
        assert_eq!(backend.shared.tasks.lock().unwrap().len(), 247);
        assert_eq!(
            backend.status("t0").await.unwrap(),
            TaskStatus::Exited {
                code: None,
                reason: "ECS task stopped".into()
            }
        );
        // A second round with nothing new reports nothing.
        let again = refresh_round(&backend.shared, |arns: Vec<String>| async move {
            Ok(Described {
                tasks: arns.iter().map(|a| running_task(a)).collect(),
                missing: vec![],
            })
        })
        .await;
        assert!(again.is_empty(), "{again:?}");
    }

    #[tokio::test]
    async fn watch_reports_known_tasks_then_each_change_of_the_one_refresher() {
        let backend = Arc::new(offline_backend());
        backend.shared.tasks.lock().unwrap().insert(
            "t1".into(),
            Tracked {
                arn: "arn:t1".into(),
                mode: TaskMode::Warm,
                session_id: None,
                started_at: UNIX_EPOCH,
                facts: TaskFacts {
                    last_status: Some("RUNNING".into()),
                    ..Default::default()
                },
            },
        );
        let shared = backend.shared.clone();
        let mut a = backend.clone().watch();
        let mut b = backend.watch();
        for rx in [&mut a, &mut b] {
            let first = rx.recv().await.unwrap();
            assert_eq!(
                (first.task_id.as_str(), first.status),
                ("t1", TaskStatus::Running)
            );
        }
        // Give both forwarders time to subscribe-and-snapshot before the change.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let gone = StatusChange {
            task_id: "t1".into(),
            status: TaskStatus::NotFound,
        };
        shared.changes.send(gone.clone()).unwrap();
        for rx in [&mut a, &mut b] {
            assert_eq!(rx.recv().await.unwrap(), gone);
        }
    }

    #[tokio::test]
    async fn a_refused_describe_is_the_status_of_a_starting_task() {
        let backend = offline_backend();
        backend.shared.tasks.lock().unwrap().insert(
            "t1".into(),
            Tracked {
                arn: "arn:t1".into(),
                mode: TaskMode::Cold,
                session_id: None,
                started_at: UNIX_EPOCH,
                facts: TaskFacts {
                    last_status: Some("PROVISIONING".into()),
                    ..Default::default()
                },
            },
        );
        refresh_round(&backend.shared, |_| async {
            Err(refused(
                "status",
                "missing permission ecs:DescribeTasks: denied".into(),
            ))
        })
        .await;
        let err = backend.status("t1").await.unwrap_err().to_string();
        assert!(
            err.contains("missing permission ecs:DescribeTasks"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn launches_carry_overrides_token_tags_and_placement() {
        let mut backend = offline_backend();
        let mut cfg = backend.shared.cfg.clone();
        cfg.placement = Placement::CapacityProviders(vec![
            CapacityProviderShare::parse("FARGATE_SPOT:3").unwrap(),
            CapacityProviderShare::parse("FARGATE:1:1").unwrap(),
        ]);
        cfg.network = Some(AwsVpc {
            subnets: vec!["subnet-1".into()],
            security_groups: vec!["sg-1".into()],
            assign_public_ip: false,
        });
        assert_eq!(cfg.isolation(), Isolation::MicroVm);
        backend = EcsBackend::with_client(backend.shared.client.clone(), cfg);
        let spec = LaunchSpec {
            task_id: "t-1".into(),
            mode: TaskMode::Cold,
            session_id: Some("s-1".into()),
            gateway_url: "wss://gw.example".into(),
            credential: "cred".into(),
            env: BTreeMap::from([("AISHELL_TASK_ID".into(), "spoofed".into())]),
        };
        let req = backend.run_task_request(Some(&spec));
        assert_eq!(req.get_client_token().as_deref(), Some("t-1"));
        assert_eq!(req.get_started_by().as_deref(), Some("gw-1"));
        let tags: BTreeMap<_, _> = req
            .get_tags()
            .clone()
            .unwrap()
            .iter()
            .map(|t| (t.key().unwrap().to_string(), t.value().unwrap().to_string()))
            .collect();
        assert_eq!(tags[TAG_TASK], "t-1");
        assert_eq!(tags[TAG_MODE], "cold");
        assert_eq!(tags[TAG_SESSION], "s-1");
        assert_eq!(tags[TAG_INSTANCE], "gw-1");
        let strategy = req.get_capacity_provider_strategy().clone().unwrap();
        assert_eq!(strategy.len(), 2);
        assert_eq!((strategy[0].weight(), strategy[1].base()), (3, 1));
        let vpc = req
            .get_network_configuration()
            .clone()
            .unwrap()
            .awsvpc_configuration
            .unwrap();
        assert_eq!(vpc.subnets(), ["subnet-1"]);
        let overrides = req.get_overrides().clone().unwrap();
        let env: BTreeMap<_, _> = overrides.container_overrides()[0]
            .environment()
            .iter()
            .map(|kv| {
                (
                    kv.name().unwrap().to_string(),
                    kv.value().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            env["AISHELL_TASK_ID"], "t-1",
            "identity cannot be overridden"
        );
        assert_eq!(env["AISHELL_TASK_CREDENTIAL"], "cred");
        assert_eq!(env["AISHELL_SESSION_ID"], "s-1");
        assert_eq!(env.len(), 5);
    }

    #[test]
    fn capacity_provider_specs_parse() {
        assert_eq!(
            CapacityProviderShare::parse("x"),
            Some(CapacityProviderShare {
                name: "x".into(),
                weight: 1,
                base: 0
            })
        );
        assert_eq!(CapacityProviderShare::parse("x:a"), None);
        assert_eq!(CapacityProviderShare::parse(":1"), None);
        assert_eq!(CapacityProviderShare::parse("x:1:2:3"), None);
        let mut cfg = EcsBackendConfig::new("c", "t", "i");
        cfg.placement = Placement::LaunchType(EcsLaunchType::Ec2);
        assert_eq!(cfg.isolation(), Isolation::Container);
    }
}
