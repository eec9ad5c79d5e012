//! A warm runner starts at the lowest CPU priority (`SCHED_IDLE`), it and
//! everything it starts (bwrap, the pre-started agent), and goes back to
//! normal once it is ready to be claimed.
//!
//! Why: the pool refills right behind a burst of claims, and each refill
//! costs several milliseconds of CPU (exec, bwrap, namespaces, the agent's
//! start). On a small machine those starts competed with the very sessions
//! that had just been claimed. Under `SCHED_IDLE` they run only on CPU that
//! nothing else wants, so a claim never waits behind a refill, and a pool
//! still fills as fast as the machine is otherwise idle. Once ready, a warm
//! runner has nothing left to do until its claim, so normal priority costs
//! nothing then; kept idle, its claim would wait for a CPU nothing else
//! wants, which in a burst means behind every other session.
//!
//! Only where it can be undone: going back from `SCHED_IDLE` needs
//! `CAP_SYS_NICE` (a root runner on the host has it; one in a container
//! usually does not, and then stays at normal priority throughout).

use std::sync::atomic::{AtomicBool, Ordering};

static IDLED: AtomicBool = AtomicBool::new(false);

/// `CAP_SYS_NICE` in the effective set.
fn can_raise_priority() -> bool {
    const CAP_SYS_NICE: u32 = 23;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_NICE) != 0)
}

fn set_policy(tid: libc::pid_t, policy: libc::c_int) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a plain syscall with a valid parameter block.
    unsafe { libc::sched_setscheduler(tid, policy, &param) == 0 }
}

/// Lower this process to `SCHED_IDLE`. Call on the main thread before any
/// other starts, so every thread and child inherits it. Returns whether it
/// did (only when [`ready`] can undo it).
pub fn idle_until_ready() -> bool {
    if !can_raise_priority() || !set_policy(0, libc::SCHED_IDLE) {
        return false;
    }
    IDLED.store(true, Ordering::SeqCst);
    true
}

/// Ready (or claimed first): this process's threads and all its
/// descendants' back to `SCHED_OTHER`. Does nothing unless
/// [`idle_until_ready`] lowered them, so only the first call walks.
pub fn ready() {
    if !IDLED.swap(false, Ordering::SeqCst) {
        return;
    }
    restore_tree(std::process::id() as libc::pid_t, 0);
}

fn restore_tree(pid: libc::pid_t, depth: usize) {
    // bwrap, its sandbox's init, the agent and what the agent started
    // before the claim: a shallow tree; the bound guards against a loop.
    if depth > 16 {
        return;
    }
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        set_policy(tid, libc::SCHED_OTHER);
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")).unwrap_or_default();
        for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
            restore_tree(child, depth + 1);
        }
    }
}

/// The scheduling policy of `tid` (tests).
pub fn policy_of(tid: libc::pid_t) -> libc::c_int {
    // SAFETY: a plain syscall.
    unsafe { libc::sched_getscheduler(tid) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A forked child lowers itself and starts a grandchild, then is
    /// ready: both end at `SCHED_OTHER` again (root only: needs CAP_SYS_NICE).
    #[test]
    fn readiness_restores_the_whole_tree() {
        if !can_raise_priority() {
            eprintln!("no CAP_SYS_NICE: skipped");
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "priority::tests::tree_child", "--nocapture"])
            .env("AISHELL_PRIORITY_TREE_CHILD", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("idle-before idle-grandchild other-after other-grandchild"),
            "{text}"
        );
    }

    /// Runs in its own process (see above).
    #[test]
    fn tree_child() {
        if std::env::var("AISHELL_PRIORITY_TREE_CHILD").is_err() {
            return;
        }
        assert!(idle_until_ready());
        let mut grandchild = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let gpid = grandchild.id() as libc::pid_t;
        let name = |p| {
            if p == libc::SCHED_IDLE {
                "idle"
            } else {
                "other"
            }
        };
        let before = name(policy_of(0));
        let gbefore = name(policy_of(gpid));
        ready();
        println!(
            "{before}-before {gbefore}-grandchild {}-after {}-grandchild",
            name(policy_of(0)),
            name(policy_of(gpid))
        );
        let _ = grandchild.kill();
        let _ = grandchild.wait();
    }
}
