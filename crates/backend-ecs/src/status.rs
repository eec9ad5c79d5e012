//! ECS's words for a task, turned into a [`TaskStatus`] a user can read.

use aishell_backend::TaskStatus;

/// The lifecycle of an ECS task (`lastStatus`), as a type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EcsLastStatus {
    Provisioning,
    Pending,
    Activating,
    Running,
    Deactivating,
    Stopping,
    Deprovisioning,
    Stopped,
}

impl EcsLastStatus {
    /// `None` for a word ECS may add later: such a task is treated as still
    /// starting (the launch deadline bounds it).
    pub fn parse(word: &str) -> Option<Self> {
        Some(match word {
            "PROVISIONING" => Self::Provisioning,
            "PENDING" => Self::Pending,
            "ACTIVATING" => Self::Activating,
            "RUNNING" => Self::Running,
            "DEACTIVATING" => Self::Deactivating,
            "STOPPING" => Self::Stopping,
            "DEPROVISIONING" => Self::Deprovisioning,
            "STOPPED" => Self::Stopped,
            _ => return None,
        })
    }
}

/// What ECS says about one container of a stopped task.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerEnd {
    pub name: String,
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
}

/// The parts of a described task the status is made of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskFacts {
    pub last_status: Option<String>,
    pub stop_code: Option<String>,
    pub stopped_reason: Option<String>,
    /// The runner's container (the task definition may have sidecars).
    pub container: Option<ContainerEnd>,
}

impl TaskFacts {
    pub fn from_task(task: &aws_sdk_ecs::types::Task, container_name: &str) -> Self {
        let container = task
            .containers()
            .iter()
            .find(|c| c.name() == Some(container_name))
            .or_else(|| task.containers().first())
            .map(|c| ContainerEnd {
                name: c.name().unwrap_or_default().to_string(),
                exit_code: c.exit_code(),
                reason: c.reason().map(str::to_string),
            });
        TaskFacts {
            last_status: task.last_status().map(str::to_string),
            stop_code: task.stop_code().map(|c| c.as_str().to_string()),
            stopped_reason: task.stopped_reason().map(str::to_string),
            container,
        }
    }

    pub fn last_status(&self) -> Option<EcsLastStatus> {
        self.last_status.as_deref().and_then(EcsLastStatus::parse)
    }

    /// PROVISIONING/PENDING/ACTIVATING: pending; RUNNING: running; from
    /// DEACTIVATING on the task is on its way out, whatever comes next, so
    /// it is reported ended at once with every reason ECS gave so far.
    pub fn status(&self) -> TaskStatus {
        use EcsLastStatus::*;
        match self.last_status() {
            None | Some(Provisioning | Pending | Activating) => TaskStatus::Pending,
            Some(Running) => TaskStatus::Running,
            Some(Deactivating | Stopping | Deprovisioning | Stopped) => TaskStatus::Exited {
                code: self.container.as_ref().and_then(|c| c.exit_code),
                reason: self.exit_reason(),
            },
        }
    }

    /// `stopCode: stoppedReason; container NAME exit code N (killed by signal S): reason`.
    pub fn exit_reason(&self) -> String {
        let mut parts = Vec::new();
        let task = match (
            non_empty(self.stop_code.as_deref()),
            non_empty(self.stopped_reason.as_deref()),
        ) {
            (Some(code), Some(reason)) if reason.starts_with(code) => reason.to_string(),
            (Some(code), Some(reason)) => format!("{code}: {reason}"),
            (Some(code), None) => code.to_string(),
            (None, Some(reason)) => reason.to_string(),
            (None, None) => format!(
                "ECS task {}",
                self.last_status
                    .as_deref()
                    .unwrap_or("stopped")
                    .to_lowercase()
            ),
        };
        parts.push(task);
        if let Some(c) = &self.container {
            let mut words = format!("container {}", c.name);
            match c.exit_code {
                Some(code) if code > 128 && code < 160 => words.push_str(&format!(
                    " exited with code {code} (killed by signal {})",
                    code - 128
                )),
                Some(code) => words.push_str(&format!(" exited with code {code}")),
                None => {}
            }
            if let Some(reason) = non_empty(c.reason.as_deref()) {
                words.push_str(&format!(": {reason}"));
            }
            if c.exit_code.is_some() || non_empty(c.reason.as_deref()).is_some() {
                parts.push(words);
            }
        }
        parts.join("; ")
    }
}

fn non_empty(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(last: &str) -> TaskFacts {
        TaskFacts {
            last_status: Some(last.into()),
            ..Default::default()
        }
    }

    #[test]
    fn starting_states_are_pending_and_running_is_running() {
        for s in ["PROVISIONING", "PENDING", "ACTIVATING"] {
            assert_eq!(facts(s).status(), TaskStatus::Pending, "{s}");
        }
        assert_eq!(facts("RUNNING").status(), TaskStatus::Running);
        // A word ECS may add later is not an end.
        assert_eq!(facts("WARMING").status(), TaskStatus::Pending);
    }

    #[test]
    fn every_state_from_deactivating_on_is_an_end_with_ecs_reasons() {
        for s in ["DEACTIVATING", "STOPPING", "DEPROVISIONING", "STOPPED"] {
            assert!(
                matches!(facts(s).status(), TaskStatus::Exited { .. }),
                "{s}"
            );
        }
        let pull = TaskFacts {
            last_status: Some("STOPPED".into()),
            stop_code: Some("TaskFailedToStart".into()),
            stopped_reason: Some(
                "CannotPullContainerError: pull access denied for nope:latest".into(),
            ),
            container: Some(ContainerEnd {
                name: "runner".into(),
                exit_code: None,
                reason: Some("CannotPullContainerError: pull access denied".into()),
            }),
        };
        assert_eq!(
            pull.status(),
            TaskStatus::Exited {
                code: None,
                reason: "TaskFailedToStart: CannotPullContainerError: pull access denied for nope:latest; container runner: CannotPullContainerError: pull access denied".into()
            }
        );
        let killed = TaskFacts {
            last_status: Some("STOPPED".into()),
            stop_code: Some("EssentialContainerExited".into()),
            stopped_reason: Some("Essential container in task exited".into()),
            container: Some(ContainerEnd {
                name: "runner".into(),
                exit_code: Some(137),
                reason: Some("OutOfMemoryError: Container killed due to memory usage".into()),
            }),
        };
        assert_eq!(
            killed.status(),
            TaskStatus::Exited {
                code: Some(137),
                reason: "EssentialContainerExited: Essential container in task exited; container runner exited with code 137 (killed by signal 9): OutOfMemoryError: Container killed due to memory usage".into()
            }
        );
        let init = TaskFacts {
            last_status: Some("DEPROVISIONING".into()),
            stop_code: Some("TaskFailedToStart".into()),
            stopped_reason: Some("ResourceInitializationError: unable to pull secrets".into()),
            container: None,
        };
        let TaskStatus::Exited { reason, .. } = init.status() else {
            panic!("ended")
        };
        assert!(reason.contains("ResourceInitializationError"), "{reason}");
        assert_eq!(facts("STOPPED").exit_reason(), "ECS task stopped");
    }
}
