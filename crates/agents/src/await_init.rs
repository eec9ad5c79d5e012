//! `aishell agent KIND --await-init`: an agent started before its claim.
//!
//! Starting the agent's process (exec, dynamic linking, runtime, sandbox) is
//! most of a warm claim's cost, so the runner starts it ahead of the claim
//! with nothing to work on. The process blocks reading its stdin until
//! `init`, which names the user's workspace: under bubblewrap the fixed
//! `/workspace`, onto which the runner has just mounted the user's directory
//! (entering it again makes the cwd the mounted one); under per-user UID
//! isolation (docker), where it started as root, the user's own directory
//! and the UID the runner gave that user. Only then does it drop to that
//! identity for good (no supplementary groups, real = effective = saved
//! IDs, no new privileges), enter the workspace and start the agent proper,
//! which sees every line read so far. Nothing of any user is touched while
//! it is root, and the runner checks the agent's credentials in `/proc`
//! before it reports the agent ready.
//!
//! All of this runs before the async runtime exists: one thread, so the
//! credential change and the environment are the process's own, with no
//! other thread to race.

use std::io::Read;
use std::os::fd::{FromRawFd, IntoRawFd};

use aishell_protocol::AgentInput;
use aishell_protocol::agent::RunAs;

/// Most input buffered while waiting for `init` (the runner sends `init`
/// first; anything this large before it is not a runner talking).
const MAX_BEFORE_INIT: usize = 1 << 20;

/// Read stdin until the `init` line, take the identity and workspace it
/// names, and return every byte read (the agent replays them). `None` at end
/// of input: the task was stopped unclaimed.
pub fn await_init() -> anyhow::Result<Option<Vec<u8>>> {
    // Raw reads on fd 0: std's stdin would keep bytes read past `init` in
    // a buffer the agent's own reader never sees.
    // SAFETY: fd 0 stays open for the process's life; `into_raw_fd` below
    // gives it back without closing it.
    let mut stdin = unsafe { std::fs::File::from_raw_fd(0) };
    let result = read_until_init(&mut stdin);
    let _ = stdin.into_raw_fd();
    let (bytes, init) = match result? {
        Some(found) => found,
        None => return Ok(None),
    };
    if let AgentInput::Init {
        workspace, run_as, ..
    } = init
    {
        take_identity(run_as, workspace.as_deref())?;
    }
    Ok(Some(bytes))
}

/// The bytes read up to and including the first `init` line, and that line.
fn read_until_init(input: &mut impl Read) -> anyhow::Result<Option<(Vec<u8>, AgentInput)>> {
    let mut bytes = Vec::with_capacity(4096);
    let mut scanned = 0;
    let mut chunk = [0u8; 4096];
    loop {
        let n = match input.read(&mut chunk) {
            Ok(0) => return Ok(None),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => anyhow::bail!("cannot read stdin while waiting for init: {e}"),
        };
        bytes.extend_from_slice(&chunk[..n]);
        while let Some(end) = bytes[scanned..].iter().position(|&b| b == b'\n') {
            let line = &bytes[scanned..scanned + end];
            scanned += end + 1;
            let Ok(text) = std::str::from_utf8(line) else {
                continue;
            };
            // Anything else before `init` (malformed lines included) is left
            // for the agent, which answers it in order after `init`.
            if let Ok(init @ AgentInput::Init { .. }) = AgentInput::decode_line(text.trim()) {
                return Ok(Some((bytes, init)));
            }
        }
        if bytes.len() > MAX_BEFORE_INIT {
            anyhow::bail!("no init within the first {MAX_BEFORE_INIT} bytes of input");
        }
    }
}

/// Become `run_as` (when given) and enter `workspace` (when given).
fn take_identity(run_as: Option<RunAs>, workspace: Option<&str>) -> anyhow::Result<()> {
    if let Some(RunAs { uid, gid }) = run_as {
        drop_privileges(uid, gid)?;
    }
    if let Some(ws) = workspace {
        std::env::set_current_dir(ws)
            .map_err(|e| anyhow::anyhow!("cannot enter the workspace {ws}: {e}"))?;
        // SAFETY: single-threaded (no runtime yet); see the module comment.
        unsafe { std::env::set_var("HOME", ws) };
    }
    Ok(())
}

fn drop_privileges(uid: u32, gid: u32) -> anyhow::Result<()> {
    let fail = |what: &str| {
        anyhow::anyhow!(
            "cannot run as uid {uid}: {what}: {}",
            std::io::Error::last_os_error()
        )
    };
    if uid == 0 || gid == 0 {
        anyhow::bail!("refusing to run a user's agent as root (uid {uid}, gid {gid})");
    }
    // SAFETY: plain credential syscalls on this single-threaded process.
    unsafe {
        empty_bounding_and_ambient_sets()?;
        if libc::getuid() != uid {
            // Groups first: only root may change them.
            if libc::setgroups(0, std::ptr::null()) != 0 {
                return Err(fail("setgroups"));
            }
            if libc::setresgid(gid, gid, gid) != 0 {
                return Err(fail("setresgid"));
            }
            if libc::setresuid(uid, uid, uid) != 0 {
                return Err(fail("setresuid"));
            }
        }
        // The UID change emptied the permitted and effective sets; the
        // inheritable one stays unless emptied too.
        clear_inheritable()?;
        // Irrevocable: no way back to root, not even through a set-uid file.
        if libc::setuid(0) == 0 {
            anyhow::bail!("cannot run as uid {uid}: root could be regained");
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(fail("no_new_privs"));
        }
        // The credential change made the process undumpable (its /proc files
        // root's); an agent started as the user is dumpable, so is this one.
        if libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) != 0 {
            return Err(fail("dumpable"));
        }
    }
    Ok(())
}

/// Empty the bounding set (needs CAP_SETPCAP, which a root agent or one
/// pre-started under bubblewrap holds) and the ambient set, while still
/// privileged: after the UID change nothing could be gained back anyway,
/// and the agent's `/proc/self/status` shows every set empty.
fn empty_bounding_and_ambient_sets() -> anyhow::Result<()> {
    // SAFETY: prctl on this process only.
    unsafe {
        for cap in 0..64 {
            match libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) {
                // Past the kernel's last capability.
                -1 => break,
                0 => continue,
                _ => {}
            }
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                anyhow::bail!(
                    "cannot empty the capability bounding set: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ) != 0
        {
            anyhow::bail!(
                "cannot empty the ambient capability set: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

fn clear_inheritable() -> anyhow::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    // _LINUX_CAPABILITY_VERSION_3: two 32-bit halves.
    let mut header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset with a valid header and two data structs.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        anyhow::bail!(
            "cannot empty the inheritable capability set: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_at_the_first_init_and_keeps_everything_read() {
        let input = b"{\"type\":\"ping\",\"id\":1}\nnot json\n{\"type\":\"init\",\"workspace\":\"/w\",\"run_as\":{\"uid\":100001,\"gid\":100001}}\n{\"type\":\"message\",\"conversation_id\":\"c\",\"content\":\"x\"}\n";
        let (bytes, init) = read_until_init(&mut &input[..]).unwrap().unwrap();
        assert_eq!(bytes, input, "bytes past init are kept for the agent");
        match init {
            AgentInput::Init {
                workspace, run_as, ..
            } => {
                assert_eq!(workspace.as_deref(), Some("/w"));
                assert_eq!(
                    run_as,
                    Some(RunAs {
                        uid: 100001,
                        gid: 100001
                    })
                );
            }
            other => panic!("not init: {other:?}"),
        }
    }

    #[test]
    fn end_of_input_before_init_is_none_and_a_flood_is_refused() {
        assert!(
            read_until_init(&mut &b"{\"type\":\"ping\",\"id\":1}\n"[..])
                .unwrap()
                .is_none()
        );
        let flood = vec![b'x'; MAX_BEFORE_INIT + 10];
        let err = read_until_init(&mut &flood[..]).unwrap_err().to_string();
        assert!(err.contains("no init"), "{err}");
    }

    #[test]
    fn a_root_identity_is_refused() {
        let err = drop_privileges(0, 0).unwrap_err().to_string();
        assert!(err.contains("refusing"), "{err}");
    }
}
