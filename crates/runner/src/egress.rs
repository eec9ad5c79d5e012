//! The agent's own network: a network namespace per sandbox (bwrap's
//! `--unshare-net`) with no route out of it, and one of two ways to the
//! outside (ARCHITECTURE.md "Agent sandbox", Network):
//!
//! * **proxy** (the default): the runner listens *inside* the namespace
//!   (`crate::netns`) on the egress proxy's port (`crate::egress_proxy`) and
//!   on the model endpoint's port, and serves both itself. No other
//!   process, no route, no interface but loopback: what the agent reaches
//!   is what those two listeners carry, by name, under the proxy's policy.
//! * **full**: `pasta` (user-mode networking, package passt) connects the
//!   namespace to the outside for any TCP/UDP destination.
//!
//! Either way bwrap reports its child's pid on `--info-fd` and holds the
//! agent on `--block-fd` until the runner has set the namespace up.
//!
//! For `pasta`, the runner opens the namespace files itself and hands them
//! to it as `/proc/self/fd/N`: `pasta` drops its capabilities before it
//! joins, and bwrap's child is not dumpable, so `pasta` could not open
//! `/proc/<pid>/ns/*` itself. This works for a bwrap run by root (the
//! namespace belongs to the host's user namespace: `--netns-only`) and for a
//! bwrap in a user namespace of its own (`pasta` joins that one too).
//! What `pasta` forwards: nothing into the namespace (`-t none -u none`),
//! and from the namespace's loopback to the host's only the runner's model
//! proxy port (`-T <port>`; `-U none`). Its defaults (`auto`) would forward
//! every port bound on the host, the gateway's included. `--no-map-gw`
//! keeps the namespace's gateway address from reaching the host's loopback.
//! Connections to any other address leave through the host's sockets, like
//! any process of the runner's user would make them.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use aishell_protocol::runner::{EgressMode, SandboxSettings};

use tokio::io::AsyncReadExt;

/// How long bwrap may take to report its child, and `pasta` to configure
/// the namespace.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of `pasta`'s stderr kept for the error when it fails.
const PASTA_STDERR_BYTES: usize = 2048;

/// The pipes bwrap gets before it starts (see the module comment); turned
/// into a running [`Egress`] by [`Plan::connect`] once bwrap runs.
#[derive(Debug)]
pub struct Plan {
    info_read: OwnedFd,
    block_write: OwnedFd,
    mode: EgressMode,
    policy: Arc<crate::egress_proxy::EgressPolicy>,
}

/// One sandbox's way out; ends (with its connections) when dropped, with
/// the agent.
#[derive(Debug)]
pub struct Egress {
    link: Link,
}

#[derive(Debug)]
enum Link {
    Pasta(tokio::process::Child),
    /// The tasks serving the namespace's listeners.
    Served(Vec<tokio::task::AbortHandle>),
}

impl Drop for Egress {
    fn drop(&mut self) {
        match &mut self.link {
            // tokio reaps the killed child in the background.
            Link::Pasta(pasta) => {
                let _ = pasta.start_kill();
            }
            Link::Served(tasks) => tasks.iter().for_each(|t| t.abort()),
        }
    }
}

impl Egress {
    /// The `pasta` process id, in `full` mode (tests and logs).
    pub fn pasta_pid(&self) -> Option<u32> {
        match &self.link {
            Link::Pasta(pasta) => pasta.id(),
            Link::Served(_) => None,
        }
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Let `cmd`'s child keep `fds` across exec (they are close-on-exec here,
/// so no other child inherits them).
fn keep_across_exec(cmd: &mut tokio::process::Command, fds: Vec<RawFd>) {
    // SAFETY: fcntl is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Is `pasta` installed? The error says what to install.
pub fn pasta_available() -> Result<(), String> {
    match std::process::Command::new("pasta")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
    {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "pasta is not installed ({e}); the sandbox network needs it: install the passt package, or run with --sandbox-network false"
        )),
    }
}

/// The agent's environment for a way out (the proxy's address for its
/// clients, in proxy mode).
pub fn agent_env(mode: EgressMode) -> Vec<(String, String)> {
    match mode {
        EgressMode::Proxy => crate::egress_proxy::agent_env().collect(),
        EgressMode::Full => Vec::new(),
    }
}

impl Plan {
    /// Give `bwrap` the options (and its ends of the pipes) that report the
    /// sandbox's pid and hold the agent until its network is up; the
    /// namespace itself comes from `--unshare-net`, which
    /// [`crate::sandbox::wrap`] always passes.
    pub fn new(
        settings: &SandboxSettings,
        bwrap: &mut crate::sandbox::BwrapCommand,
    ) -> Result<Self, String> {
        let policy = crate::egress_proxy::EgressPolicy::new(&settings.egress_allow)
            .map_err(|e| format!("the sandbox's egress allow list: {e}"))?;
        let io = |e: std::io::Error| format!("cannot prepare the sandbox's network: {e}");
        let (info_read, info_write) = pipe().map_err(io)?;
        let (block_read, block_write) = pipe().map_err(io)?;
        bwrap.pass_fd("--info-fd", info_write);
        bwrap.pass_fd("--block-fd", block_read);
        Ok(Plan {
            info_read,
            block_write,
            mode: settings.egress,
            policy: Arc::new(policy),
        })
    }

    /// bwrap runs: set its namespace up (the listeners, or `pasta`), then
    /// let the agent start. `model` is the runner's model endpoint, served
    /// at its own port number on the namespace's loopback.
    pub async fn connect(
        self,
        model: Option<&crate::model_proxy::ModelProxy>,
    ) -> Result<Egress, String> {
        // bwrap's ends of the pipes were closed here once it was spawned.
        let Plan {
            info_read,
            block_write,
            mode,
            policy,
        } = self;
        let started = std::time::Instant::now();
        let pid = tokio::time::timeout(SETUP_TIMEOUT, sandbox_pid(info_read))
            .await
            .map_err(|_| "bubblewrap did not report its sandbox in time".to_string())??;
        let egress = match mode {
            EgressMode::Proxy => serve_in_namespace(pid, model, policy).await?,
            EgressMode::Full => attach_pasta(pid, model.map(|m| m.port())).await?,
        };
        // One byte releases bwrap; the pipe is empty, so this cannot block.
        // SAFETY: writing one byte from a live buffer to a descriptor we own.
        if unsafe { libc::write(block_write.as_raw_fd(), b"x".as_ptr().cast(), 1) } != 1 {
            return Err(format!(
                "cannot release the sandbox: {}",
                std::io::Error::last_os_error()
            ));
        }
        tracing::debug!(
            event = "sandbox_network_ready",
            pid = pid,
            mode = ?mode,
            ms = started.elapsed().as_millis() as u64,
            "agent network namespace set up"
        );
        Ok(egress)
    }
}

/// Proxy mode: the egress proxy and the model endpoint listen inside the
/// namespace, served by this runner.
async fn serve_in_namespace(
    pid: u32,
    model: Option<&crate::model_proxy::ModelProxy>,
    policy: Arc<crate::egress_proxy::EgressPolicy>,
) -> Result<Egress, String> {
    let mut ports = vec![crate::egress_proxy::PROXY_PORT];
    ports.extend(model.map(|m| m.port()));
    let listeners = tokio::task::spawn_blocking(move || crate::netns::listen_in(pid, &ports))
        .await
        .map_err(|e| format!("cannot set up the sandbox's network: {e}"))?
        .map_err(|e| format!("cannot set up the sandbox's network: {e}"))?;
    let mut listeners = listeners.into_iter().map(tokio::net::TcpListener::from_std);
    let io = |e: std::io::Error| format!("cannot set up the sandbox's network: {e}");
    let proxy = listeners
        .next()
        .expect("one listener per port")
        .map_err(io)?;
    let mut tasks = vec![tokio::spawn(crate::egress_proxy::serve(proxy, policy)).abort_handle()];
    if let (Some(model), Some(listener)) = (model, listeners.next()) {
        tasks.push(model.serve_on(listener.map_err(io)?));
    }
    Ok(Egress {
        link: Link::Served(tasks),
    })
}

/// Full mode: `pasta` attached to the namespace and seen configured.
async fn attach_pasta(pid: u32, model_port: Option<u16>) -> Result<Egress, String> {
    // bwrap brings the namespace's loopback up before it blocks; pasta
    // brings it up too, and bwrap fails if pasta got there first.
    tokio::time::timeout(SETUP_TIMEOUT, async {
        while !loopback_up(pid) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .map_err(|_| "bubblewrap did not set up the sandbox's loopback in time".to_string())?;
    // Should pasta still exit before it configured anything, a second
    // attempt a little later costs little next to a failed start.
    let mut failed = String::new();
    for attempt in 1..=PASTA_ATTEMPTS {
        let mut egress = start_pasta(pid, model_port)?;
        match tokio::time::timeout(SETUP_TIMEOUT, wait_configured(pid, model_port, &mut egress))
            .await
        {
            Ok(Ok(())) => return Ok(egress),
            Ok(Err(why)) => {
                tracing::warn!(event = "sandbox_network_retry", attempt, reason = %why, "pasta failed; trying again");
                failed = why;
                // bubblewrap may still be setting the sandbox up.
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            }
            Err(_) => return Err("pasta did not configure the sandbox's network in time".into()),
        }
    }
    Err(failed)
}

/// How many times `pasta` is started before the sandbox's start fails.
const PASTA_ATTEMPTS: u32 = 3;

/// The pid of bwrap's sandbox child, from `--info-fd` (`{"child-pid": N}`).
async fn sandbox_pid(info: OwnedFd) -> Result<u32, String> {
    let mut reader = tokio::net::unix::pipe::Receiver::from_owned_fd(info)
        .map_err(|e| format!("cannot read bubblewrap's report: {e}"))?;
    let mut text = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let n = reader
            .read(&mut buf)
            .await
            .map_err(|e| format!("cannot read bubblewrap's report: {e}"))?;
        if n == 0 {
            return Err("bubblewrap exited before starting the sandbox".into());
        }
        text.extend_from_slice(&buf[..n]);
        if let Ok(info) = serde_json::from_slice::<serde_json::Value>(&text) {
            return info["child-pid"]
                .as_u64()
                .map(|p| p as u32)
                .ok_or_else(|| format!("bubblewrap's report has no child-pid: {info}"));
        }
    }
}

fn start_pasta(pid: u32, model_port: Option<u16>) -> Result<Egress, String> {
    let open = |ns: &str| {
        std::fs::File::open(format!("/proc/{pid}/ns/{ns}"))
            .map(OwnedFd::from)
            .map_err(|e| format!("cannot open the sandbox's {ns} namespace: {e}"))
    };
    let net = open("net")?;
    // The user namespace that owns the network namespace, asked of the
    // namespace itself: the sandbox process may be in another one by now
    // (bubblewrap can unshare a further user namespace after it set the
    // network up), and pasta joined to that one could not enter the
    // network namespace ("Couldn't switch to pasta namespaces").
    // SAFETY: NS_GET_USERNS on a namespace fd returns a new fd or -1.
    let owner = unsafe { libc::ioctl(net.as_raw_fd(), libc::NS_GET_USERNS) };
    if owner < 0 {
        return Err(format!(
            "cannot find the owner of the sandbox's network namespace: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a fresh descriptor the ioctl just returned, owned here only.
    let user = unsafe { OwnedFd::from_raw_fd(owner) };
    let inode = |fd: &OwnedFd| {
        std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .ok()
    };
    let own_user_ns = inode(&user)
        == std::fs::metadata("/proc/self/ns/user")
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .ok();
    let forward = model_port.map_or("none".to_string(), |p| p.to_string());
    let mut cmd = tokio::process::Command::new("pasta");
    cmd.args(["--foreground", "--quiet", "--config-net", "--no-map-gw"])
        // Stays uid 0 without capabilities (it would switch to `nobody`,
        // which cannot use the namespace files handed to it).
        .args(["--runas", "0:0"])
        .args(["-t", "none", "-u", "none", "-U", "none", "-T", &forward])
        .args(["--netns", &format!("/proc/self/fd/{}", net.as_raw_fd())]);
    if own_user_ns {
        cmd.arg("--netns-only");
    } else {
        cmd.args(["--userns", &format!("/proc/self/fd/{}", user.as_raw_fd())]);
    }
    keep_across_exec(&mut cmd, vec![net.as_raw_fd(), user.as_raw_fd()]);
    // SAFETY: prctl is async-signal-safe; pasta dies with the runner.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let pasta = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => pasta_available()
                .err()
                .unwrap_or_else(|| format!("cannot start pasta: {e}")),
            _ => format!("cannot start pasta: {e}"),
        })?;
    Ok(Egress {
        link: Link::Pasta(pasta),
    })
}

/// Until the namespace has a route (pasta configured its interface) and,
/// with a model proxy, pasta listens on its port there.
async fn wait_configured(
    pid: u32,
    model_port: Option<u16>,
    egress: &mut Egress,
) -> Result<(), String> {
    let Link::Pasta(pasta) = &mut egress.link else {
        return Ok(());
    };
    loop {
        if let Some(status) = pasta.try_wait().map_err(|e| e.to_string())? {
            let mut stderr = Vec::new();
            if let Some(mut err) = pasta.stderr.take() {
                let _ = tokio::time::timeout(
                    Duration::from_millis(200),
                    (&mut err)
                        .take(PASTA_STDERR_BYTES as u64)
                        .read_to_end(&mut stderr),
                )
                .await;
            }
            let stderr = String::from_utf8_lossy(&stderr);
            let why: Vec<&str> = stderr
                .lines()
                .filter(|l| !l.starts_with("Failed to send") && !l.trim().is_empty())
                .collect();
            return Err(format!(
                "pasta could not connect the sandbox's network ({status}): {}",
                why.join("; ")
            ));
        }
        if namespace_configured(pid, model_port) {
            // Drained, so that pasta's logging never blocks on a full pipe.
            if let Some(mut err) = pasta.stderr.take() {
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut err, &mut tokio::io::sink()).await;
                });
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Is the loopback of `pid`'s namespace up (its local routes exist)?
fn loopback_up(pid: u32) -> bool {
    let read =
        |file: &str| std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
    read("if_inet6").lines().any(|l| l.ends_with(" lo")) || read("fib_trie").contains("127.0.0.1")
}

fn namespace_configured(pid: u32, model_port: Option<u16>) -> bool {
    let read =
        |file: &str| std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
    let routed = read("route").lines().count() > 1;
    routed
        && model_port
            .is_none_or(|port| listens_on(&read("tcp"), port) || listens_on(&read("tcp6"), port))
}

/// Does a `/proc/net/tcp`-style table have a listening socket on `port`?
fn listens_on(table: &str, port: u16) -> bool {
    let port = format!(":{port:04X}");
    table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1).unwrap_or("");
        let state = fields.nth(1).unwrap_or("");
        local.ends_with(&port) && state == "0A"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_port_is_found_in_a_tcp_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:A1B2 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:1234 0100007F:A1B2 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0\n";
        assert!(listens_on(table, 0xA1B2));
        // Established, not listening.
        assert!(!listens_on(table, 0x1234));
        assert!(!listens_on(table, 80));
    }

    #[test]
    fn bwrap_gets_its_ends_of_the_pipes() {
        let mut bwrap = crate::sandbox::BwrapCommand::default();
        let plan = Plan::new(&SandboxSettings::default(), &mut bwrap).unwrap();
        assert_eq!(bwrap.options.len(), 4);
        assert_eq!(bwrap.options[0], "--info-fd");
        assert_eq!(bwrap.options[1], bwrap.fds[0].as_raw_fd().to_string());
        assert_eq!(bwrap.options[2], "--block-fd");
        assert_eq!(bwrap.options[3], bwrap.fds[1].as_raw_fd().to_string());
        // The runner keeps the other ends, distinct from bwrap's.
        let ours = [plan.info_read.as_raw_fd(), plan.block_write.as_raw_fd()];
        assert!(bwrap.fds.iter().all(|fd| !ours.contains(&fd.as_raw_fd())));
    }
}
