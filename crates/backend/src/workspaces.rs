//! Users' workspaces as the gateway reaches them: prepared before a
//! session's task starts, opened by the files API. One interface whatever
//! the runtime (ARCHITECTURE.md "Backends"): a directory on the gateway
//! (the tasks' own disk for process and docker, a shared volume mounted on
//! the gateway for ECS/EFS or a Kubernetes ReadWriteMany volume: the same
//! code with another root), or nothing the gateway can open (the files live
//! only inside the tasks).

use std::path::PathBuf;
use std::sync::Arc;

use crate::{Backend, BackendError, WorkspaceAccess};

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// The gateway has no way to this workspace's files.
    #[error("{0}")]
    NotOnGateway(String),
    /// The backend could not prepare it (a quota's file system, say).
    #[error(transparent)]
    Prepare(#[from] BackendError),
    #[error("cannot open the workspace at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Preparation of, and access to, users' workspaces. Both calls block
/// (they may format and mount a file system): run them off the async
/// workers.
pub trait Workspaces: Send + Sync + 'static {
    /// Make a user's workspace ready before anything uses it.
    fn prepare(&self, user_id: &str) -> Result<(), WorkspaceError>;

    /// The root directory of a user's workspace on the gateway, prepared
    /// and created if new. Callers resolve paths beneath it themselves.
    fn open(&self, user_id: &str) -> Result<std::fs::File, WorkspaceError>;
}

/// Workspaces as directories `<root>/<user>` on the gateway's file system.
pub struct Directories {
    root: PathBuf,
    backend: Arc<dyn Backend>,
}

impl Directories {
    pub fn new(root: impl Into<PathBuf>, backend: Arc<dyn Backend>) -> Self {
        Directories {
            root: root.into(),
            backend,
        }
    }
}

impl Workspaces for Directories {
    fn prepare(&self, user_id: &str) -> Result<(), WorkspaceError> {
        Ok(self.backend.prepare_workspace(user_id)?)
    }

    fn open(&self, user_id: &str) -> Result<std::fs::File, WorkspaceError> {
        self.prepare(user_id)?;
        let path = self.root.join(user_id);
        let io = |source| WorkspaceError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&path).map_err(io)?;
        std::fs::File::open(&path).map_err(io)
    }
}

/// Workspaces the gateway cannot open: prepared by the backend, their
/// files reachable only inside the tasks.
pub struct InsideTasks {
    backend: Arc<dyn Backend>,
    why: String,
}

impl Workspaces for InsideTasks {
    fn prepare(&self, user_id: &str) -> Result<(), WorkspaceError> {
        Ok(self.backend.prepare_workspace(user_id)?)
    }

    fn open(&self, _user_id: &str) -> Result<std::fs::File, WorkspaceError> {
        Err(WorkspaceError::NotOnGateway(self.why.clone()))
    }
}

/// The workspaces of `backend` as its capabilities say the gateway reaches
/// them: `Local` under `local_root`; `SharedVolume` under `shared_mount`,
/// the volume's mount path on the gateway (without one, not at all);
/// `ThroughRunner` not at all.
pub fn for_backend(
    backend: Arc<dyn Backend>,
    local_root: PathBuf,
    shared_mount: Option<PathBuf>,
) -> Arc<dyn Workspaces> {
    let name = backend.name();
    match (backend.capabilities().workspaces, shared_mount) {
        (WorkspaceAccess::Local, _) => Arc::new(Directories::new(local_root, backend)),
        (WorkspaceAccess::SharedVolume, Some(mount)) => Arc::new(Directories::new(mount, backend)),
        (WorkspaceAccess::SharedVolume, None) => Arc::new(InsideTasks {
            why: format!(
                "files are reachable only while the {name} backend's shared workspace volume is mounted on the gateway, and this gateway has none configured (--workspaces-mount)"
            ),
            backend,
        }),
        (WorkspaceAccess::ThroughRunner, _) => Arc::new(InsideTasks {
            why: format!(
                "files are reachable only inside your sandbox: the {name} backend keeps workspaces where this gateway cannot open them"
            ),
            backend,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use async_trait::async_trait;

    use super::*;
    use crate::{Capabilities, Isolation, LaunchSpec, TaskInfo, TaskStatus};

    struct Stub {
        access: WorkspaceAccess,
        prepared: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Backend for Stub {
        fn name(&self) -> &'static str {
            "stub"
        }
        async fn launch(&self, _: LaunchSpec) -> Result<(), BackendError> {
            Ok(())
        }
        async fn status(&self, _: &str) -> Result<TaskStatus, BackendError> {
            Ok(TaskStatus::NotFound)
        }
        async fn stop(&self, _: &str) -> Result<(), BackendError> {
            Ok(())
        }
        async fn list(&self) -> Result<Vec<TaskInfo>, BackendError> {
            Ok(Vec::new())
        }
        fn workspace_path(&self, user_id: &str) -> String {
            format!("/workspaces/{user_id}")
        }
        fn prepare_workspace(&self, user_id: &str) -> Result<(), BackendError> {
            self.prepared.lock().unwrap().push(user_id.to_string());
            Ok(())
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                typical_cold_start: Duration::ZERO,
                workspaces: self.access,
                isolation: Isolation::Container,
            }
        }
    }

    fn stub(access: WorkspaceAccess) -> Arc<Stub> {
        Arc::new(Stub {
            access,
            prepared: Mutex::default(),
        })
    }

    #[test]
    fn a_shared_volume_is_the_same_directories_under_its_mount() {
        let local = tempfile::tempdir().unwrap();
        let mount = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(mount.path().join("alice")).unwrap();
        let backend = stub(WorkspaceAccess::SharedVolume);
        let workspaces = for_backend(
            backend.clone(),
            local.path().into(),
            Some(mount.path().into()),
        );
        let root = workspaces.open("alice").unwrap();
        use std::os::unix::fs::MetadataExt;
        let volume = std::fs::metadata(mount.path().join("alice")).unwrap();
        assert_eq!(root.metadata().unwrap().ino(), volume.ino());
        assert!(!local.path().join("alice").exists());
        assert_eq!(*backend.prepared.lock().unwrap(), vec!["alice"]);
    }

    #[test]
    fn a_local_workspace_is_created_under_the_gateways_root() {
        let local = tempfile::tempdir().unwrap();
        let backend = stub(WorkspaceAccess::Local);
        let workspaces = for_backend(backend, local.path().into(), None);
        workspaces.open("bob").unwrap();
        assert!(local.path().join("bob").is_dir());
    }

    #[test]
    fn workspaces_the_gateway_cannot_reach_say_so_but_are_still_prepared() {
        let local = tempfile::tempdir().unwrap();
        for (access, words) in [
            (
                WorkspaceAccess::ThroughRunner,
                "reachable only inside your sandbox",
            ),
            (WorkspaceAccess::SharedVolume, "--workspaces-mount"),
        ] {
            let backend = stub(access);
            let workspaces = for_backend(backend.clone(), local.path().into(), None);
            workspaces.prepare("carol").unwrap();
            assert_eq!(*backend.prepared.lock().unwrap(), vec!["carol"]);
            match workspaces.open("carol") {
                Err(WorkspaceError::NotOnGateway(why)) => assert!(why.contains(words), "{why}"),
                other => panic!("expected NotOnGateway, got {other:?}"),
            }
            assert!(!local.path().join("carol").exists());
        }
    }
}
