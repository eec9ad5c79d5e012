//! The agent's seccomp filter: a classic BPF program, written out here
//! instead of compiled by a library, small enough to read whole (see
//! ARCHITECTURE.md, "Agent sandbox").
//!
//! Everything is allowed except the calls that reach past the sandbox or
//! the kernel's attack surface an agent never needs: file handles
//! (`open_by_handle_at` walks from a handle to any inode of the file
//! system), packet and raw sockets, device nodes, keyrings, BPF, perf,
//! userfaultfd, ptrace and cross-process memory, mounts and namespaces,
//! io_uring (its operations skip these checks), modules, kexec, swap,
//! reboot, accounting and the kernel log. Refused calls fail with `EPERM`;
//! `clone3` fails with `ENOSYS`, because its flags sit in a struct a filter
//! cannot read, and libc then falls back to `clone`, whose namespace flags
//! are checked. A foreign architecture (32-bit x86 through `int 0x80`) or
//! the x32 ABI kills the process.

/// One classic BPF instruction, laid out as the kernel's `sock_filter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Instruction {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const JGE_K: u16 = 0x35;
const JSET_K: u16 = 0x45;
const AND_K: u16 = 0x54;
const JA: u16 = 0x05;
const RET_K: u16 = 0x06;

const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;

/// Offsets into `struct seccomp_data`.
const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;
/// Low 32 bits of argument `i` (little-endian targets).
const fn offset_arg(i: u32) -> u32 {
    16 + 8 * i
}

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;
/// Syscall numbers at or above this are the x32 ABI's.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// Calls refused with `EPERM` whatever their arguments.
fn refused() -> Vec<libc::c_long> {
    let mut calls = vec![
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_setns,
        libc::SYS_unshare,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_mount_setattr,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_reboot,
        libc::SYS_acct,
        libc::SYS_syslog,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([libc::SYS_iopl, libc::SYS_ioperm]);
    calls
}

/// Namespace flags `clone` may not carry (`CLONE_NEWTIME` shares its bit
/// with the exit signal in `clone`'s flags and only works through
/// `clone3`/`unshare`, both refused).
const CLONE_NAMESPACE_FLAGS: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u32;

/// Where a jump goes: the next instruction or a named block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Target {
    Next,
    Allow,
    Deny,
    NoSys,
    Kill,
    Socket,
    Mknod,
    Mknodat,
    CheckMode,
    Clone,
}

enum Step {
    Op(Instruction),
    Jump {
        code: u16,
        k: u32,
        yes: Target,
        no: Target,
    },
    Label(Target),
}

fn op(code: u16, k: u32) -> Step {
    Step::Op(Instruction {
        code,
        jt: 0,
        jf: 0,
        k,
    })
}

fn jump(code: u16, k: u32, yes: Target, no: Target) -> Step {
    Step::Jump { code, k, yes, no }
}

/// The filter for this machine's architecture.
pub fn agent_filter() -> Vec<Instruction> {
    use Target::*;
    let mut steps = vec![
        op(LD_W_ABS, OFFSET_ARCH),
        jump(JEQ_K, AUDIT_ARCH, Next, Kill),
        op(LD_W_ABS, OFFSET_NR),
    ];
    #[cfg(target_arch = "x86_64")]
    steps.push(jump(JGE_K, X32_SYSCALL_BIT, Kill, Next));
    for nr in refused() {
        steps.push(jump(JEQ_K, nr as u32, Deny, Next));
    }
    steps.push(jump(JEQ_K, libc::SYS_clone3 as u32, NoSys, Next));
    steps.push(jump(JEQ_K, libc::SYS_socket as u32, Socket, Next));
    #[cfg(target_arch = "x86_64")]
    steps.push(jump(JEQ_K, libc::SYS_mknod as u32, Mknod, Next));
    steps.push(jump(JEQ_K, libc::SYS_mknodat as u32, Mknodat, Next));
    steps.push(jump(JEQ_K, libc::SYS_clone as u32, Clone, Allow));

    // socket(domain, type, protocol): no packet sockets; no raw sockets
    // except netlink's (glibc's address lookups open those).
    steps.push(Step::Label(Socket));
    steps.push(op(LD_W_ABS, offset_arg(0)));
    steps.push(jump(JEQ_K, libc::AF_PACKET as u32, Deny, Next));
    steps.push(jump(JEQ_K, libc::AF_NETLINK as u32, Allow, Next));
    steps.push(op(LD_W_ABS, offset_arg(1)));
    steps.push(op(AND_K, 0xf)); // SOCK_TYPE_MASK: without NONBLOCK/CLOEXEC
    steps.push(jump(JEQ_K, libc::SOCK_RAW as u32, Deny, Allow));

    // mknod(path, mode, dev) / mknodat(dirfd, path, mode, dev): files and
    // FIFOs yes, character and block devices no.
    steps.push(Step::Label(Mknod));
    steps.push(op(LD_W_ABS, offset_arg(1)));
    steps.push(jump(JEQ_K, 0, CheckMode, CheckMode));
    steps.push(Step::Label(Mknodat));
    steps.push(op(LD_W_ABS, offset_arg(2)));
    steps.push(Step::Label(CheckMode));
    steps.push(op(AND_K, libc::S_IFMT));
    steps.push(jump(JEQ_K, libc::S_IFCHR, Deny, Next));
    steps.push(jump(JEQ_K, libc::S_IFBLK, Deny, Allow));

    // clone(flags, ...): threads and processes, no new namespaces.
    steps.push(Step::Label(Clone));
    steps.push(op(LD_W_ABS, offset_arg(0)));
    steps.push(jump(JSET_K, CLONE_NAMESPACE_FLAGS, Deny, Allow));

    steps.push(Step::Label(Allow));
    steps.push(op(RET_K, RET_ALLOW));
    steps.push(Step::Label(Deny));
    steps.push(op(RET_K, RET_ERRNO | libc::EPERM as u32));
    steps.push(Step::Label(NoSys));
    steps.push(op(RET_K, RET_ERRNO | libc::ENOSYS as u32));
    steps.push(Step::Label(Kill));
    steps.push(op(RET_K, RET_KILL_PROCESS));
    assemble(&steps)
}

/// Resolve labels into relative jump offsets.
fn assemble(steps: &[Step]) -> Vec<Instruction> {
    let mut labels = std::collections::HashMap::new();
    let mut n = 0usize;
    for step in steps {
        match step {
            Step::Label(t) => {
                labels.insert(*t, n);
            }
            _ => n += 1,
        }
    }
    let mut out = Vec::with_capacity(n);
    for step in steps {
        match step {
            Step::Label(_) => {}
            Step::Op(i) => out.push(*i),
            Step::Jump { code, k, yes, no } => {
                let here = out.len();
                let offset = |t: &Target| -> u8 {
                    let to = match t {
                        Target::Next => here + 1,
                        t => labels[t],
                    };
                    u8::try_from(to - here - 1).expect("seccomp jump fits in 8 bits")
                };
                if *code == JEQ_K && *k == 0 && yes == no && *yes != Target::Next {
                    // An unconditional jump.
                    out.push(Instruction {
                        code: JA,
                        jt: 0,
                        jf: 0,
                        k: offset(yes) as u32,
                    });
                } else {
                    out.push(Instruction {
                        code: *code,
                        jt: offset(yes),
                        jf: offset(no),
                        k: *k,
                    });
                }
            }
        }
    }
    out
}

/// The program as bubblewrap's `--seccomp FD` reads it: `sock_filter`s in
/// native byte order.
pub fn to_bytes(program: &[Instruction]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(program.len() * 8);
    for i in program {
        bytes.extend_from_slice(&i.code.to_ne_bytes());
        bytes.push(i.jt);
        bytes.push(i.jf);
        bytes.extend_from_slice(&i.k.to_ne_bytes());
    }
    bytes
}

/// Install `program` on the calling thread (and its future children).
/// Needs `PR_SET_NO_NEW_PRIVS` first (or CAP_SYS_ADMIN). Async-signal-safe:
/// callable between fork and exec.
pub fn install(program: &[Instruction]) -> std::io::Result<()> {
    #[repr(C)]
    struct SockFprog {
        len: libc::c_ushort,
        filter: *const Instruction,
    }
    let prog = SockFprog {
        len: program.len() as libc::c_ushort,
        filter: program.as_ptr(),
    };
    // SAFETY: `Instruction` has `sock_filter`'s layout (repr(C) u16, u8,
    // u8, u32) and `prog` outlives the call.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const SockFprog,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run `f` in a forked child under the filter; its exit code comes back.
    fn in_filtered_child(f: impl FnOnce() -> i32) -> i32 {
        let program = agent_filter();
        // SAFETY: the child only makes syscalls and exits.
        unsafe {
            match libc::fork() {
                0 => {
                    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                        || install(&program).is_err()
                    {
                        libc::_exit(100);
                    }
                    libc::_exit(f());
                }
                pid => {
                    let mut status = 0;
                    libc::waitpid(pid, &mut status, 0);
                    assert!(libc::WIFEXITED(status), "child died: {status:#x}");
                    libc::WEXITSTATUS(status)
                }
            }
        }
    }

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    #[test]
    fn refused_calls_fail_with_eperm_and_ordinary_ones_work() {
        let code = in_filtered_child(|| unsafe {
            if libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) != -1 || errno() != libc::EPERM {
                return 1;
            }
            if libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 1) != -1
                || errno() != libc::EPERM
            {
                return 2;
            }
            if libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) < 0 {
                return 3;
            }
            if libc::syscall(libc::SYS_open_by_handle_at, -1, 0, 0) != -1 || errno() != libc::EPERM
            {
                return 4;
            }
            if libc::unshare(libc::CLONE_NEWUSER) != -1 || errno() != libc::EPERM {
                return 5;
            }
            if libc::syscall(libc::SYS_clone3, 0, 0) != -1 || errno() != libc::ENOSYS {
                return 6;
            }
            let dev = c"/nonexistent-dir/dev";
            if libc::mknod(dev.as_ptr(), libc::S_IFBLK | 0o600, 0) != -1 || errno() != libc::EPERM {
                return 7;
            }
            // A FIFO passes the filter (and fails on the path instead).
            if libc::mknod(dev.as_ptr(), libc::S_IFIFO | 0o600, 0) != -1 || errno() != libc::ENOENT
            {
                return 8;
            }
            if libc::getpid() <= 0 {
                return 9;
            }
            match libc::fork() {
                0 => libc::_exit(0),
                pid if pid > 0 => {
                    let mut st = 0;
                    libc::waitpid(pid, &mut st, 0);
                }
                _ => return 10,
            }
            0
        });
        assert_eq!(code, 0, "check {code} failed under the filter");
    }

    #[test]
    fn every_jump_lands_inside_the_program() {
        let program = agent_filter();
        for (i, ins) in program.iter().enumerate() {
            if ins.code & 0x07 == 0x05 {
                let last = i + 1 + ins.jt.max(ins.jf) as usize;
                let last = if ins.code == JA {
                    i + 1 + ins.k as usize
                } else {
                    last
                };
                assert!(last < program.len(), "instruction {i} jumps out");
            }
        }
        assert_eq!(program.last().unwrap().code, RET_K);
        assert_eq!(to_bytes(&program).len(), program.len() * 8);
    }
}
