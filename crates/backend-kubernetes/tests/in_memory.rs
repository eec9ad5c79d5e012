//! The backend against the stand-in API server in memory (its router as the
//! client's tower service: no socket, no containers): the pod it creates,
//! launch retries, stop, adoption by label selector, and the cluster's words
//! through `watch`.

use std::sync::Arc;
use std::time::Duration;

use aishell_backend::{Backend, LaunchSpec, StatusChange, TaskMode, TaskStatus};
use aishell_backend_kubernetes::stand_in::StandIn;
use aishell_backend_kubernetes::{
    KubernetesBackend, KubernetesBackendConfig, LABEL_INSTANCE, LABEL_MANAGED_BY, LABEL_MODE,
    LABEL_TASK, pod_name,
};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, Pod,
    PodCondition, PodStatus,
};
use tokio::sync::mpsc;

const NAMESPACE: &str = "aishell-test";

fn backend(stand_in: &StandIn, instance: &str) -> Arc<KubernetesBackend> {
    let client = kube::Client::new(stand_in.router(), NAMESPACE);
    let mut cfg = KubernetesBackendConfig::new(instance);
    cfg.stop_timeout = Duration::from_secs(5);
    Arc::new(KubernetesBackend::with_client(cfg, client))
}

fn spec(task: &str, mode: TaskMode, session: Option<&str>) -> LaunchSpec {
    LaunchSpec {
        task_id: task.into(),
        mode,
        session_id: session.map(String::from),
        gateway_url: "ws://127.0.0.1:1".into(),
        credential: "cred-1".into(),
        env: [
            ("AISHELL_EXTRA".to_string(), "x".to_string()),
            ("AISHELL_TASK_ID".to_string(), "forged".to_string()),
        ]
        .into(),
    }
}

fn pod(stand_in: &StandIn, task: &str) -> Pod {
    stand_in
        .pods()
        .into_iter()
        .find(|p| p.metadata.name.as_deref() == Some(pod_name(task).as_str()))
        .expect("the pod exists")
}

#[tokio::test]
async fn the_task_pod_is_labelled_hardened_and_carries_only_task_settings() {
    let stand_in = StandIn::new(NAMESPACE, None);
    let b = backend(&stand_in, "gw-1");
    b.launch(spec("t-abc", TaskMode::Cold, Some("s-1")))
        .await
        .unwrap();
    let p = pod(&stand_in, "t-abc");
    let labels = p.metadata.labels.clone().unwrap();
    assert_eq!(labels[LABEL_MANAGED_BY], "aishell");
    assert_eq!(labels[LABEL_INSTANCE], "gw-1");
    assert_eq!(labels[LABEL_TASK], "t-abc");
    assert_eq!(labels[LABEL_MODE], "cold");
    let spec = p.spec.unwrap();
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(spec.share_process_namespace, Some(true), "pause is PID 1");
    let c = &spec.containers[0];
    let env: Vec<(String, String)> = c
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect();
    assert!(env.contains(&("AISHELL_TASK_CREDENTIAL".into(), "cred-1".into())));
    assert!(env.contains(&("AISHELL_SESSION_ID".into(), "s-1".into())));
    assert!(env.contains(&("AISHELL_EXTRA".into(), "x".into())));
    assert_eq!(
        env.iter().filter(|(k, _)| k == "AISHELL_TASK_ID").count(),
        1,
        "a per-task extra cannot override the task's identity: {env:?}"
    );
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.seccomp_profile.unwrap().type_, "RuntimeDefault");
    let caps = sc.capabilities.unwrap();
    assert_eq!(caps.drop.unwrap(), vec!["ALL"]);
    assert!(!caps.add.unwrap().iter().any(|c| c == "SYS_ADMIN"));
    let res = c.resources.clone().unwrap();
    assert_eq!(res.limits.unwrap()["memory"].0, "2Gi");
    assert_eq!(res.requests.unwrap()["cpu"].0, "250m");
    let volumes = spec.volumes.unwrap();
    assert_eq!(
        volumes[0]
            .persistent_volume_claim
            .as_ref()
            .unwrap()
            .claim_name,
        "aishell-workspaces"
    );
    assert_eq!(
        volumes[1].empty_dir.as_ref().unwrap().medium.as_deref(),
        Some("Memory")
    );
    assert_eq!(b.status("t-abc").await.unwrap(), TaskStatus::Pending);
}

#[tokio::test]
async fn a_retried_launch_succeeds_and_stop_waits_until_the_pod_is_gone() {
    let stand_in = StandIn::new(NAMESPACE, None);
    let b = backend(&stand_in, "gw-1");
    b.launch(spec("t-1", TaskMode::Warm, None)).await.unwrap();
    b.launch(spec("t-1", TaskMode::Warm, None))
        .await
        .expect("409 AlreadyExists on a retry is success");
    assert_eq!(stand_in.pods().len(), 1);
    b.stop("t-1").await.unwrap();
    assert!(stand_in.pods().is_empty());
    assert_eq!(b.status("t-1").await.unwrap(), TaskStatus::NotFound);
    b.stop("t-1")
        .await
        .expect("stopping a gone task is no error");
}

#[tokio::test]
async fn a_restarted_gateway_lists_its_own_pods_only() {
    let stand_in = StandIn::new(NAMESPACE, None);
    let first = backend(&stand_in, "gw-1");
    first
        .launch(spec("t-cold", TaskMode::Cold, Some("s-9")))
        .await
        .unwrap();
    first
        .launch(spec("t-warm", TaskMode::Warm, None))
        .await
        .unwrap();
    backend(&stand_in, "gw-other")
        .launch(spec("t-foreign", TaskMode::Warm, None))
        .await
        .unwrap();
    drop(first);
    let restarted = backend(&stand_in, "gw-1");
    let mut tasks = restarted.list().await.unwrap();
    tasks.sort_by(|a, b| a.task_id.cmp(&b.task_id));
    let ids: Vec<&str> = tasks.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(ids, ["t-cold", "t-warm"]);
    assert_eq!(tasks[0].mode, TaskMode::Cold);
    assert_eq!(tasks[0].session_id.as_deref(), Some("s-9"));
    assert_eq!(tasks[1].mode, TaskMode::Warm);
}

async fn next_change(rx: &mut mpsc::Receiver<StatusChange>) -> StatusChange {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a status change within 10 s")
        .expect("the watch is open")
}

fn waiting(reason: &str, message: &str) -> PodStatus {
    PodStatus {
        phase: Some("Pending".into()),
        container_statuses: Some(vec![ContainerStatus {
            name: "runner".into(),
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.into()),
                    message: Some(message.into()),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

fn terminated(reason: &str, code: i32) -> PodStatus {
    PodStatus {
        phase: Some("Failed".into()),
        container_statuses: Some(vec![ContainerStatus {
            name: "runner".into(),
            state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: code,
                    reason: Some(reason.into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

/// Launch a task, set its pod's status as the cluster would, and return
/// what the watch reports for it.
async fn watched_status(status: PodStatus) -> TaskStatus {
    let stand_in = StandIn::new(NAMESPACE, None);
    let b = backend(&stand_in, "gw-1");
    let mut rx = b.clone().watch();
    b.launch(spec("t-1", TaskMode::Cold, Some("s-1")))
        .await
        .unwrap();
    assert_eq!(next_change(&mut rx).await.status, TaskStatus::Pending);
    assert!(stand_in.set_status(&pod_name("t-1"), status));
    let change = next_change(&mut rx).await;
    assert_eq!(change.task_id, "t-1");
    assert_eq!(
        b.status("t-1").await.unwrap(),
        change.status,
        "status() and the watch agree"
    );
    change.status
}

fn reason_of(status: TaskStatus) -> String {
    match status {
        TaskStatus::Exited { reason, .. } => reason,
        other => panic!("expected an exit, got {other:?}"),
    }
}

#[tokio::test]
async fn the_clusters_words_reach_the_watch_at_once() {
    let reason = reason_of(
        watched_status(waiting(
            "ErrImagePull",
            "failed to pull image \"aishell:local\": not found",
        ))
        .await,
    );
    assert!(
        reason.contains("ErrImagePull") && reason.contains("not found"),
        "{reason}"
    );
    let reason = reason_of(watched_status(waiting("ImagePullBackOff", "Back-off pulling")).await);
    assert!(reason.contains("ImagePullBackOff"), "{reason}");
    let reason = reason_of(
        watched_status(waiting(
            "CreateContainerConfigError",
            "secret \"x\" not found",
        ))
        .await,
    );
    assert!(
        reason.contains("CreateContainerConfigError: secret"),
        "{reason}"
    );

    let unschedulable = PodStatus {
        phase: Some("Pending".into()),
        conditions: Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            message: Some("0/3 nodes are available: 3 Insufficient memory.".into()),
            ..Default::default()
        }]),
        ..Default::default()
    };
    let reason = reason_of(watched_status(unschedulable).await);
    assert!(
        reason.starts_with("Unschedulable") && reason.contains("Insufficient memory"),
        "{reason}"
    );

    match watched_status(terminated("OOMKilled", 137)).await {
        TaskStatus::Exited { code, reason } => {
            assert_eq!(code, Some(137));
            assert!(
                reason.contains("out of memory") && reason.contains("2Gi"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    let reason = reason_of(watched_status(terminated("Error", 3)).await);
    assert!(reason.contains("exited with code 3"), "{reason}");

    let evicted = PodStatus {
        phase: Some("Failed".into()),
        reason: Some("Evicted".into()),
        message: Some("The node was low on resource: ephemeral-storage.".into()),
        ..Default::default()
    };
    let reason = reason_of(watched_status(evicted).await);
    assert!(
        reason.starts_with("evicted") && reason.contains("ephemeral-storage"),
        "{reason}"
    );

    let lost = PodStatus {
        phase: Some("Unknown".into()),
        ..Default::default()
    };
    assert!(reason_of(watched_status(lost).await).starts_with("node lost"));

    let running = PodStatus {
        phase: Some("Running".into()),
        ..Default::default()
    };
    assert_eq!(watched_status(running).await, TaskStatus::Running);
}

#[tokio::test]
async fn a_deleted_pod_is_reported_not_found_once() {
    let stand_in = StandIn::new(NAMESPACE, None);
    let b = backend(&stand_in, "gw-1");
    b.launch(spec("t-1", TaskMode::Warm, None)).await.unwrap();
    let mut rx = b.clone().watch();
    // The pod that existed before the watch started: reported from the list.
    assert_eq!(
        next_change(&mut rx).await,
        StatusChange {
            task_id: "t-1".into(),
            status: TaskStatus::Pending
        }
    );
    b.stop("t-1").await.unwrap();
    // Deletion marks the pod (unchanged status: not reported), then removes it.
    assert_eq!(next_change(&mut rx).await.status, TaskStatus::NotFound);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "nothing more"
    );
}
