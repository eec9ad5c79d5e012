//! TCP listeners that live in a sandbox's network namespace but are served
//! by the runner: how the agent reaches its model endpoint and the egress
//! proxy without the namespace having any route out.
//!
//! A socket belongs to the namespace it was created in, whoever uses it
//! later. So a short-lived child of the runner joins the sandbox's network
//! namespace (`setns`; first its user namespace when the runner is not root,
//! which only a single-threaded process may join — hence a forked child, not
//! a thread), creates and binds the listeners there, hands them back over a
//! socket pair (`SCM_RIGHTS`) and exits. The listeners bind the wildcard
//! address: the namespace has only a loopback interface, so that is its
//! loopback, and the wildcard binds even before bwrap has brought `lo` up.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

/// At most this many listeners per call (the model endpoint and the egress
/// proxy); fixed so the child needs no allocation after `fork`.
pub const MAX_LISTENERS: usize = 2;

/// Listen on `0.0.0.0:<port>` for each of `ports` inside the network
/// namespace of process `pid`. Blocking (a fork and a few syscalls, well
/// under a millisecond): call it off the async workers.
pub fn listen_in(pid: u32, ports: &[u16]) -> io::Result<Vec<std::net::TcpListener>> {
    if ports.is_empty() || ports.len() > MAX_LISTENERS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("between 1 and {MAX_LISTENERS} ports"),
        ));
    }
    let net = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    let user = std::fs::File::open(format!("/proc/{pid}/ns/user"))?;
    // Root may enter any namespace from here; anyone else must first enter
    // the user namespace that owns it (bwrap's, which is theirs).
    // SAFETY: geteuid has no preconditions.
    let join_user = unsafe { libc::geteuid() } != 0
        && user.metadata()?.ino() != std::fs::metadata("/proc/self/ns/user")?.ino();
    let (ours, theirs) = socket_pair()?;

    let mut addrs = [zero_sockaddr(); MAX_LISTENERS];
    for (addr, &port) in addrs.iter_mut().zip(ports) {
        addr.sin_port = port.to_be();
    }
    let count = ports.len();
    let (net_fd, user_fd, theirs_fd) = (net.as_raw_fd(), user.as_raw_fd(), theirs.as_raw_fd());

    // SAFETY: the child runs only async-signal-safe syscalls on memory
    // prepared above and leaves with `_exit`.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(io::Error::last_os_error());
    }
    if child == 0 {
        // SAFETY: see above; `child_listen` never returns.
        unsafe { child_listen(join_user, user_fd, net_fd, theirs_fd, &addrs[..count]) }
    }
    drop(theirs);
    let received = receive_fds(&ours, count);
    let status = wait_child(child);
    let fds = received?;
    if fds.len() != count {
        return Err(io::Error::other(match status {
            Ok(code) if code != 0 => format!(
                "cannot listen in the sandbox's network namespace ({}: {})",
                child_step(code),
                io::Error::from_raw_os_error(code >> 8)
            ),
            _ => "cannot listen in the sandbox's network namespace".to_string(),
        }));
    }
    Ok(fds
        .into_iter()
        .map(|fd| {
            let listener = std::net::TcpListener::from(fd);
            let _ = listener.set_nonblocking(true);
            listener
        })
        .collect())
}

fn zero_sockaddr() -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    }
}

fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair fills two descriptors we then own.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The step a child's exit code names (the low byte; errno is above it).
fn child_step(code: i32) -> &'static str {
    match code & 0xff {
        1 => "joining its user namespace",
        2 => "joining its network namespace",
        3 => "creating a socket",
        4 => "binding",
        5 => "listening",
        _ => "handing the sockets back",
    }
}

/// The forked child: join, listen, send, exit. Exit code: 0, or the step
/// that failed with errno in the bits above it (read by the parent only to
/// word its error).
///
/// # Safety
/// Only in a freshly forked child.
unsafe fn child_listen(
    join_user: bool,
    user_fd: RawFd,
    net_fd: RawFd,
    send_fd: RawFd,
    addrs: &[libc::sockaddr_in],
) -> ! {
    unsafe fn fail(step: i32) -> ! {
        // SAFETY: errno location and _exit are async-signal-safe.
        unsafe {
            let errno = *libc::__errno_location() & 0x7f;
            libc::_exit(step | (errno << 8))
        }
    }
    // SAFETY: raw syscalls on descriptors and memory this process owns.
    unsafe {
        if join_user && libc::setns(user_fd, libc::CLONE_NEWUSER) != 0 {
            fail(1);
        }
        if libc::setns(net_fd, libc::CLONE_NEWNET) != 0 {
            fail(2);
        }
        let mut fds = [-1 as RawFd; MAX_LISTENERS];
        for (slot, addr) in fds.iter_mut().zip(addrs) {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                fail(3);
            }
            let one: libc::c_int = 1;
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
            if libc::bind(
                fd,
                (addr as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ) != 0
            {
                fail(4);
            }
            if libc::listen(fd, 128) != 0 {
                fail(5);
            }
            *slot = fd;
        }
        let count = addrs.len();
        let mut control = Control([0; 64]);
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE((count * size_of::<RawFd>()) as u32) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN((count * size_of::<RawFd>()) as u32) as _;
        std::ptr::copy_nonoverlapping(
            fds.as_ptr().cast::<u8>(),
            libc::CMSG_DATA(cmsg),
            count * size_of::<RawFd>(),
        );
        if libc::sendmsg(send_fd, &msg, 0) != 1 {
            fail(6);
        }
        libc::_exit(0)
    }
}

/// Room for one `SCM_RIGHTS` message of up to [`MAX_LISTENERS`]
/// descriptors, aligned as `cmsghdr` must be.
#[repr(C, align(8))]
struct Control([u8; 64]);

/// Up to `count` descriptors from one message (none if the child failed).
fn receive_fds(sock: &OwnedFd, count: usize) -> io::Result<Vec<OwnedFd>> {
    let mut control = Control([0; 64]);
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: a zeroed msghdr is valid; its pointers are set to live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len() as _;
    // SAFETY: recvmsg writes into the buffers msg points to. It returns 0
    // when the child exits without sending (its end closes).
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages recvmsg filled in.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if fds.len() > count {
        return Err(io::Error::other("unexpected descriptors from the child"));
    }
    Ok(fds)
}

/// The child's exit code.
fn wait_child(pid: libc::pid_t) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Ok(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                -1
            });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A process in a network namespace of its own (root only), whose
    /// namespace the listeners must land in.
    #[test]
    fn listeners_live_in_the_namespace_of_the_given_process() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: cannot make a network namespace; skipped");
            return;
        }
        let mut holder = std::process::Command::new("unshare")
            .args(["--net", "sh", "-c", "ip link set lo up; exec sleep 30"])
            .spawn()
            .unwrap();
        let pid = holder.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        // `unshare` execs into its command once the namespace exists.
        while std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap()
            == std::fs::read_link("/proc/self/ns/net").unwrap()
            || !std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .starts_with("sleep")
        {
            assert!(std::time::Instant::now() < deadline, "no namespace");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = host.local_addr().unwrap().port();
        drop(host);
        let listeners = listen_in(pid, &[port]).unwrap();
        assert_eq!(listeners.len(), 1);
        // Not on the host's loopback.
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
        // In the namespace, it answers.
        listeners[0].set_nonblocking(false).unwrap();
        let mut client = std::process::Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-n", "python3", "-c"])
            .arg(format!(
                "import socket; s = socket.create_connection(('127.0.0.1', {port})); print(s.recv(5).decode())"
            ))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (mut conn, _) = listeners[0].accept().unwrap();
        conn.write_all(b"HELLO").unwrap();
        let mut out = String::new();
        client
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        client.wait().unwrap();
        assert_eq!(out.trim(), "HELLO");
        let _ = holder.kill();
        let _ = holder.wait();
    }

    #[test]
    fn a_process_that_does_not_exist_is_an_error() {
        assert!(listen_in(u32::MAX - 1, &[1234]).is_err());
        assert!(listen_in(std::process::id(), &[]).is_err());
    }
}
