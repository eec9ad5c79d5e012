//! What the scale benchmarks read from the machine: the gateway's process
//! tree and what each process costs (`/proc`), the descriptor limit, and a
//! one-line description of the machine for the report.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

/// What a process under the gateway is, by its command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProcessKind {
    Gateway,
    Runner,
    Agent,
    /// bubblewrap: the sandbox's setup process and its pid 1.
    Bwrap,
    /// The sandbox's network (`pasta`).
    Pasta,
    Other,
}

impl ProcessKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessKind::Gateway => "gateway",
            ProcessKind::Runner => "runner",
            ProcessKind::Agent => "agent",
            ProcessKind::Bwrap => "bwrap",
            ProcessKind::Pasta => "pasta",
            ProcessKind::Other => "other",
        }
    }
}

/// One live process of the gateway's tree.
#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: u32,
    pub kind: ProcessKind,
}

/// `(pid, ppid, comm)` of every process on the machine.
fn all_processes() -> Vec<(u32, u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // comm may hold spaces and parentheses: the fields follow the last ')'.
            let open = stat.find('(')?;
            let close = stat.rfind(')')?;
            let comm = stat[open + 1..close].to_string();
            let ppid = stat[close + 1..].split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid, comm))
        })
        .collect()
}

fn classify(pid: u32, comm: &str, root: u32) -> ProcessKind {
    if pid == root {
        return ProcessKind::Gateway;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut args = cmdline.split(|b| *b == 0).map(String::from_utf8_lossy);
    let program = args.next().unwrap_or_default();
    let first = args.next().unwrap_or_default();
    // Runners and agents run this very binary, whatever it is called (a
    // renamed copy too); comm is its name cut to 15 bytes.
    let own = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "aishell".into());
    let own_comm: String = own.chars().take(15).collect();
    // The process backend runs `aishell-sandbox` (the sandbox roles
    // alone) beside this binary when it is there.
    const SANDBOX: &str = "aishell-sandbox";
    let sandbox_comm: String = SANDBOX.chars().take(15).collect();
    let is_aishell = program.rsplit('/').next() == Some(own.as_str())
        || comm == own_comm
        || program.ends_with("aishell")
        || program.ends_with(SANDBOX)
        || comm == sandbox_comm;
    match (is_aishell, first.as_ref(), comm) {
        (true, "runner", _) => ProcessKind::Runner,
        (true, "agent", _) => ProcessKind::Agent,
        (_, _, "bwrap") => ProcessKind::Bwrap,
        // `pasta` is a name of `passt`, whose binary may be `passt.avx2`.
        _ if comm.starts_with("passt") || comm.starts_with("pasta") => ProcessKind::Pasta,
        _ => ProcessKind::Other,
    }
}

/// The gateway and all its descendants.
pub fn process_tree(root: u32) -> Vec<Proc> {
    let all = all_processes();
    let mut children: HashMap<u32, Vec<(u32, &str)>> = HashMap::new();
    let mut root_comm = "";
    for (pid, ppid, comm) in &all {
        children.entry(*ppid).or_default().push((*pid, comm));
        if *pid == root {
            root_comm = comm;
        }
    }
    let mut out = vec![Proc {
        pid: root,
        kind: classify(root, root_comm, root),
    }];
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        for (child, comm) in children.get(&p).into_iter().flatten() {
            out.push(Proc {
                pid: *child,
                kind: classify(*child, comm, root),
            });
            stack.push(*child);
        }
    }
    out
}

/// Pids of processes of `kind` under the gateway.
pub fn pids_of(root: u32, kind: ProcessKind) -> Vec<u32> {
    process_tree(root)
        .into_iter()
        .filter(|p| p.kind == kind)
        .map(|p| p.pid)
        .collect()
}

/// Processes per kind under the gateway.
pub fn count_by_kind(root: u32) -> BTreeMap<ProcessKind, usize> {
    let mut out = BTreeMap::new();
    for p in process_tree(root) {
        *out.entry(p.kind).or_default() += 1;
    }
    out
}

/// A `/proc/PID/<file>` field in kB, e.g. `Pss:` of `smaps_rollup`.
fn kib_field(pid: u32, file: &str, name: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines()
        .find(|l| l.starts_with(name))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub fn rss_kib(pid: u32) -> Option<u64> {
    kib_field(pid, "status", "VmRSS:")
}

/// Proportional set size: shared pages split among the processes sharing them.
pub fn pss_kib(pid: u32) -> Option<u64> {
    kib_field(pid, "smaps_rollup", "Pss:")
}

pub fn fd_count(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// How many of `pid`'s open descriptors are the SQLite store's files (the
/// database, its WAL and SHM: three per pooled connection).
pub fn database_fd_count(pid: u32) -> Option<usize> {
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(
        entries
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter(|target| {
                target
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("aishell.db"))
            })
            .count(),
    )
}

/// PSS and process count per kind over the gateway's tree.
pub fn memory_by_kind(root: u32) -> BTreeMap<ProcessKind, (usize, u64)> {
    let mut out: BTreeMap<ProcessKind, (usize, u64)> = BTreeMap::new();
    for p in process_tree(root) {
        // A process that exited since the listing counts as nothing.
        let Some(pss) = pss_kib(p.pid) else { continue };
        let e = out.entry(p.kind).or_default();
        e.0 += 1;
        e.1 += pss;
    }
    out
}

/// Raise this process's descriptor limit to at least `want` (children,
/// such as the spawned gateway, inherit it). Returns `(before, after)` soft
/// limits; raising the hard limit needs CAP_SYS_RESOURCE, so without it the
/// soft limit stops at the hard one.
pub fn raise_nofile(want: u64) -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit for the call to fill.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let before = lim.rlim_cur;
    if before >= want {
        return (before, before);
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(lim.rlim_max);
    let raised = libc::rlimit {
        rlim_cur: want.min(nr_open),
        rlim_max: lim.rlim_max.max(want.min(nr_open)),
    };
    // SAFETY: plain values.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        let capped = libc::rlimit {
            rlim_cur: want.min(lim.rlim_max),
            rlim_max: lim.rlim_max,
        };
        // SAFETY: plain values.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &capped) };
    }
    // SAFETY: as above.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (before, lim.rlim_cur)
}

/// Date, command line and machine, printed with every scale report.
pub fn provenance() -> Value {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kib| (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    json!({
        "date": date,
        "command": command,
        "machine": format!("{} · {cores} cores ({cpu}) · {} GiB · Linux {}", read("/proc/sys/kernel/hostname"), mem_gib.unwrap_or(0.0), read("/proc/sys/kernel/osrelease")),
    })
}

/// One line on the descriptor limit, as `raise_nofile` left it.
pub fn describe_nofile(limit: &Value) -> String {
    if limit["before"] == limit["after"] {
        format!("descriptor limit {} (enough, not raised)", limit["after"])
    } else {
        format!(
            "descriptor limit raised from {} to {} (this process and the gateway it starts)",
            limit["before"], limit["after"]
        )
    }
}

pub fn print_provenance(p: &Value) {
    println!("date:    {}", p["date"].as_str().unwrap_or(""));
    println!("command: {}", p["command"].as_str().unwrap_or(""));
    println!("machine: {}", p["machine"].as_str().unwrap_or(""));
}

/// A uniformly random number below `n` (n > 0); the bench's churn needs no
/// better randomness than a v4 UUID's.
pub fn random_below(n: u64) -> u64 {
    (uuid::Uuid::new_v4().as_u128() % u128::from(n.max(1))) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tree_of_a_process_holds_its_children_and_their_memory() {
        let me = std::process::id();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let tree = process_tree(me);
        assert_eq!(tree[0].kind, ProcessKind::Gateway);
        assert!(
            tree.iter()
                .any(|p| p.pid == child.id() && p.kind == ProcessKind::Other),
            "{tree:?}"
        );
        assert!(pss_kib(me).unwrap() > 0);
        assert!(fd_count(me).unwrap() >= 3);
        let _ = child.kill();
        let _ = child.wait();
        assert!(!process_tree(me).iter().any(|p| p.pid == child.id()));
    }
}
