//! Fault in this program's code before a warm task is claimed.
//!
//! A pre-started runner or agent has run only its start-up code; the claim
//! then touches the rest (binding, identity change, the agent's first
//! reply), page-faulting it in from the executable in the middle of the
//! user's wait. Where containers' root filesystems are FUSE mounts (Docker
//! with fuse-overlayfs, as on hosts without native overlayfs), each
//! container's copy of the binary has a page cache of its own, so those
//! faults are reads through a user-space file system: at 20 claims at once
//! they were about a fifth of the burst's CPU. Populating the mapped code
//! and read-only data while the task waits in the pool moves that cost
//! off the claim.

/// `madvise(MADV_POPULATE_READ)` every read-only or executable mapping of
/// this process's own executable. Best effort: a kernel without it (before
/// 5.14) or an unreadable `/proc` just leaves the faults to the claim.
pub fn populate_executable() {
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
        return;
    };
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    let exe = exe.to_string_lossy();
    for (start, end) in code_ranges(&maps, &exe) {
        // SAFETY: the range is a mapping of this process (from its own
        // maps); POPULATE_READ only faults pages in, it changes nothing.
        unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                end - start,
                libc::MADV_POPULATE_READ,
            );
        }
    }
}

/// Address ranges of `exe`'s mappings that are readable and not writable.
fn code_ranges(maps: &str, exe: &str) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next()?;
            let perms = fields.next()?;
            let path = fields.nth(3)?;
            if path != exe || !perms.starts_with('r') || perms.as_bytes().get(1) == Some(&b'w') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some((
                usize::from_str_radix(start, 16).ok()?,
                usize::from_str_radix(end, 16).ok()?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_executables_read_only_mappings_are_populated() {
        let maps = "\
55d0c0000000-55d0c0200000 r--p 00000000 fd:01 1234 /usr/local/bin/aishell
55d0c0200000-55d0c1400000 r-xp 00200000 fd:01 1234 /usr/local/bin/aishell
55d0c1400000-55d0c1500000 rw-p 01400000 fd:01 1234 /usr/local/bin/aishell
7f0000000000-7f0000100000 r-xp 00000000 fd:01 99 /usr/lib/libc.so.6
7f0000200000-7f0000300000 rw-p 00000000 00:00 0 
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]";
        assert_eq!(
            code_ranges(maps, "/usr/local/bin/aishell"),
            [
                (0x55d0c0000000, 0x55d0c0200000),
                (0x55d0c0200000, 0x55d0c1400000)
            ]
        );
    }

    /// Pages of `ranges` not in memory.
    fn missing_pages(ranges: &[(usize, usize)]) -> usize {
        let page = 4096;
        let mut missing = 0;
        for &(start, end) in ranges {
            let mut resident = vec![0u8; (end - start).div_ceil(page)];
            // SAFETY: a mapping of this process and a vector of one byte per page.
            let rc = unsafe {
                libc::mincore(
                    start as *mut libc::c_void,
                    end - start,
                    resident.as_mut_ptr(),
                )
            };
            assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
            missing += resident.iter().filter(|b| **b & 1 == 0).count();
        }
        missing
    }

    #[test]
    fn after_populating_the_code_is_resident() {
        use std::os::fd::AsRawFd;
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let ranges = code_ranges(&maps, &exe.to_string_lossy());
        assert!(!ranges.is_empty());
        // Drop the binary's pages that nothing maps from the page cache, as
        // if it had never been read (a fresh container's copy).
        let file = std::fs::File::open(&exe).unwrap();
        // A binary the linker has just written is still dirty in the page
        // cache, and dirty pages cannot be dropped: write it back first.
        file.sync_all().unwrap();
        // SAFETY: an advice call on a descriptor we own.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert!(
            missing_pages(&ranges) > 0,
            "the test starts with code not in memory"
        );
        populate_executable();
        assert_eq!(missing_pages(&ranges), 0, "every code page is resident");
    }
}
