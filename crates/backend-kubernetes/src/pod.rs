//! The task Pod (labels, security, resources, volumes) and what a Pod's
//! status means for its task, in the cluster's own words.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use aishell_backend::{LaunchSpec, TaskInfo, TaskMode, TaskStatus};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerStatus, EmptyDirVolumeSource, EnvVar,
    PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, ResourceRequirements,
    SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::{KubernetesBackendConfig, WORKSPACES_MOUNT};

/// The recommended label naming the tool that manages a resource.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Its value on every pod aishell creates.
pub const MANAGED_BY: &str = "aishell";
/// Label naming the gateway instance that owns a pod.
pub const LABEL_INSTANCE: &str = "aishell.dev/instance";
/// Label naming the task a pod runs.
pub const LABEL_TASK: &str = "aishell.dev/task";
/// Label naming the task's mode (`warm` or `cold`).
pub const LABEL_MODE: &str = "aishell.dev/mode";
/// Label naming the session of a cold task.
pub const LABEL_SESSION: &str = "aishell.dev/session";
/// Annotations keeping the task and session ids whole (label values are
/// limited to 63 characters of a small alphabet).
const ANNOTATION_TASK: &str = "aishell.dev/task-id";
const ANNOTATION_SESSION: &str = "aishell.dev/session-id";

/// Name of the runner container in every task pod.
pub const RUNNER_CONTAINER: &str = "runner";

/// Capabilities the runner keeps, as in the docker backend: prepare a
/// workspace (chown/chmod), empty the agent's bounding set (SETPCAP), drop
/// to the user's UID, signal its agent.
pub const RUNNER_CAPABILITIES: [&str; 7] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "SETUID",
    "SETGID",
    "SETPCAP",
    "KILL",
];

/// Pod name of a task: a DNS-1123 subdomain (lower-case alphanumerics and
/// `-`), at most 63 characters so it is also a valid host name.
pub fn pod_name(task_id: &str) -> String {
    let clean: String = task_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let mut name = format!("aishell-{clean}");
    name.truncate(63);
    name.trim_end_matches('-').to_string()
}

/// A value that fits a label: at most 63 of `[A-Za-z0-9._-]`, starting and
/// ending with an alphanumeric.
pub fn label_value(value: &str) -> String {
    let clean: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    clean
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

/// The pod of one task. See `docs`-level summary in ARCHITECTURE.md
/// (Backends): hardened as the docker backend's containers are.
pub fn task_pod(cfg: &KubernetesBackendConfig, spec: &LaunchSpec) -> Pod {
    let mut labels = BTreeMap::from([
        (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
        (LABEL_INSTANCE.to_string(), label_value(&cfg.instance_id)),
        (LABEL_TASK.to_string(), label_value(&spec.task_id)),
        (LABEL_MODE.to_string(), spec.mode.to_string()),
    ]);
    let mut annotations = BTreeMap::from([(ANNOTATION_TASK.to_string(), spec.task_id.clone())]);
    if let Some(sid) = &spec.session_id {
        labels.insert(LABEL_SESSION.to_string(), label_value(sid));
        annotations.insert(ANNOTATION_SESSION.to_string(), sid.clone());
    }
    // Per-task extras first, so they can never override the task's identity.
    let mut env: Vec<EnvVar> = spec
        .env
        .iter()
        .filter(|(k, _)| !k.starts_with("AISHELL_TASK_") && k.as_str() != "AISHELL_GATEWAY_URL")
        .map(|(k, v)| env_var(k, v))
        .collect();
    env.push(env_var("AISHELL_GATEWAY_URL", &spec.gateway_url));
    env.push(env_var("AISHELL_TASK_ID", &spec.task_id));
    env.push(env_var("AISHELL_TASK_MODE", &spec.mode.to_string()));
    env.push(env_var("AISHELL_TASK_CREDENTIAL", &spec.credential));
    if let Some(sid) = &spec.session_id {
        env.push(env_var("AISHELL_SESSION_ID", sid));
    }
    let quantities = |pairs: [(&str, &Option<String>); 2]| {
        let map: BTreeMap<String, Quantity> = pairs
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_string(), Quantity(v.clone()?))))
            .collect();
        (!map.is_empty()).then_some(map)
    };
    let runtime_default = || SeccompProfile {
        type_: "RuntimeDefault".into(),
        localhost_profile: None,
    };
    let container = Container {
        name: RUNNER_CONTAINER.into(),
        image: Some(cfg.image.clone()),
        image_pull_policy: cfg.image_pull_policy.clone(),
        env: Some(env),
        resources: Some(ResourceRequirements {
            requests: quantities([("cpu", &cfg.cpu_request), ("memory", &cfg.memory_request)]),
            limits: quantities([("cpu", &cfg.cpu_limit), ("memory", &cfg.memory_limit)]),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: Some(RUNNER_CAPABILITIES.map(String::from).to_vec()),
            }),
            seccomp_profile: Some(runtime_default()),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "workspaces".into(),
                mount_path: WORKSPACES_MOUNT.into(),
                ..Default::default()
            },
            VolumeMount {
                name: "tmp".into(),
                mount_path: "/tmp".into(),
                ..Default::default()
            },
        ]),
        ..Default::default()
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(&spec.task_id)),
            labels: Some(labels),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            // The pod's pause process as PID 1 (as docker-init in the docker
            // backend): it reaps the agents' orphans, and the runner, not
            // being PID 1, gets the kubelet's SIGTERM with its default action.
            share_process_namespace: Some(true),
            termination_grace_period_seconds: Some(cfg.stop_grace_secs.max(0)),
            security_context: Some(PodSecurityContext {
                seccomp_profile: Some(runtime_default()),
                ..Default::default()
            }),
            containers: vec![container],
            volumes: Some(vec![
                Volume {
                    name: "workspaces".into(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: cfg.workspaces_claim.clone(),
                        read_only: Some(false),
                    }),
                    ..Default::default()
                },
                Volume {
                    name: "tmp".into(),
                    empty_dir: Some(EmptyDirVolumeSource {
                        medium: Some("Memory".into()),
                        size_limit: Some(Quantity(cfg.tmp_size.clone())),
                    }),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        status: None,
    }
}

fn env_var(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

/// Waiting reasons after which the container will not start by itself: the
/// task is reported ended at once, with the cluster's message.
const FATAL_WAITING_REASONS: [&str; 6] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// A task's status from its pod: phase, container statuses and conditions.
pub fn pod_status(pod: &Pod, cfg: &KubernetesBackendConfig) -> TaskStatus {
    let Some(status) = &pod.status else {
        return TaskStatus::Pending;
    };
    let runner = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == RUNNER_CONTAINER);
    let pod_reason = status.reason.as_deref().unwrap_or("");
    let pod_message = status.message.as_deref().unwrap_or("");
    // Evicted (node pressure) or a lost node: the pod's own reason.
    if pod_reason == "Evicted" {
        return exited(runner, format!("evicted: {}", or_default(pod_message)));
    }
    if pod_reason == "NodeLost" || status.phase.as_deref() == Some("Unknown") {
        return exited(
            runner,
            format!(
                "node lost: the pod's node stopped reporting{}",
                suffix(pod_message)
            ),
        );
    }
    if let Some(disruption) = status.conditions.iter().flatten().find(|c| {
        c.type_ == "DisruptionTarget"
            && c.status == "True"
            && c.reason.as_deref() != Some("PreemptionByScheduler")
    }) && matches!(
        disruption.reason.as_deref(),
        Some("DeletionByTaintManager" | "TerminationByKubelet")
    ) && status.phase.as_deref() != Some("Running")
    {
        return exited(
            runner,
            format!(
                "node lost: {}{}",
                disruption.reason.as_deref().unwrap_or(""),
                suffix(disruption.message.as_deref().unwrap_or(""))
            ),
        );
    }
    match status.phase.as_deref() {
        Some("Succeeded" | "Failed") => {
            let terminated = runner.and_then(|c| c.state.as_ref()?.terminated.as_ref());
            let reason = match terminated {
                Some(t) if t.reason.as_deref() == Some("OOMKilled") => match &cfg.memory_limit {
                    Some(limit) => format!("killed: out of memory (OOMKilled, pod limit {limit})"),
                    None => "killed: out of memory (OOMKilled)".to_string(),
                },
                Some(t) => {
                    let mut r = match t.exit_code {
                        c if c > 128 && c < 160 => {
                            format!("exited with code {c} (killed by signal {})", c - 128)
                        }
                        c => format!("exited with code {c}"),
                    };
                    if let Some(why) = t.reason.as_deref().filter(|r| *r != "Completed") {
                        r.push_str(&format!(" ({why})"));
                    }
                    if let Some(m) = t.message.as_deref().filter(|m| !m.is_empty()) {
                        r.push_str(&format!(": {m}"));
                    }
                    r
                }
                None if !pod_reason.is_empty() => {
                    format!("{pod_reason}{}", suffix(pod_message))
                }
                None => "exited".to_string(),
            };
            exited(runner, reason)
        }
        Some("Running") => TaskStatus::Running,
        _ => {
            if let Some(waiting) = runner.and_then(|c| c.state.as_ref()?.waiting.as_ref())
                && let Some(reason) = waiting.reason.as_deref()
                && FATAL_WAITING_REASONS.contains(&reason)
            {
                let message = waiting.message.as_deref().unwrap_or("");
                let what = if reason.contains("Image") {
                    format!("image {}: ", cfg.image)
                } else {
                    String::new()
                };
                return TaskStatus::Exited {
                    code: None,
                    reason: format!("{what}{reason}{}", suffix(message)),
                };
            }
            if let Some(unschedulable) = status.conditions.iter().flatten().find(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            }) {
                return TaskStatus::Exited {
                    code: None,
                    reason: format!(
                        "Unschedulable{}",
                        suffix(unschedulable.message.as_deref().unwrap_or(""))
                    ),
                };
            }
            TaskStatus::Pending
        }
    }
}

fn exited(runner: Option<&ContainerStatus>, reason: String) -> TaskStatus {
    let code = runner
        .and_then(|c| c.state.as_ref()?.terminated.as_ref())
        .map(|t| t.exit_code);
    TaskStatus::Exited { code, reason }
}

fn suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

fn or_default(message: &str) -> &str {
    if message.is_empty() {
        "the node ran short of resources"
    } else {
        message
    }
}

/// One of this gateway's tasks from its pod (`None` for a pod that is not
/// an aishell task pod).
pub fn task_info(pod: &Pod, cfg: &KubernetesBackendConfig) -> Option<TaskInfo> {
    let labels = pod.metadata.labels.as_ref()?;
    if labels.get(LABEL_MANAGED_BY).map(String::as_str) != Some(MANAGED_BY) {
        return None;
    }
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let task_id = annotations
        .get(ANNOTATION_TASK)
        .or_else(|| labels.get(LABEL_TASK))?
        .clone();
    let mode = TaskMode::parse(labels.get(LABEL_MODE)?)?;
    let started_at = pod
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| {
            let secs = t.0.as_second();
            if secs > 0 {
                UNIX_EPOCH + std::time::Duration::from_secs(secs as u64)
            } else {
                UNIX_EPOCH
            }
        })
        .unwrap_or(UNIX_EPOCH);
    Some(TaskInfo {
        task_id,
        mode,
        session_id: annotations
            .get(ANNOTATION_SESSION)
            .or_else(|| labels.get(LABEL_SESSION))
            .cloned(),
        status: pod_status(pod, cfg),
        started_at: started_at.max(UNIX_EPOCH).min(SystemTime::now()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_label_values_fit_the_apis_alphabets() {
        assert_eq!(pod_name("t-ABC_1.2"), "aishell-t-abc-1-2");
        assert!(pod_name(&"x".repeat(100)).len() <= 63);
        assert_eq!(pod_name(&format!("{}-", "a".repeat(54))).len(), 62);
        assert_eq!(label_value("gw-1"), "gw-1");
        assert_eq!(label_value("-a b/c-"), "a-b-c");
        assert_eq!(label_value(&"y".repeat(80)).len(), 63);
    }
}
