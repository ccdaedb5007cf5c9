//! Files: the supervisor captures every process's fd table from outside (it sees the whole job, so it can tell
//! which open files processes share and where each pipe and socket leads). At restore it recreates each open
//! file once and hands them all to the job's processes; here each process puts its own fds at their numbers and
//! closes everything else.

use crate::procfs;
use alloc::format;
use alloc::string::String;
use vos::image::FdImage;
use vos::sys;

/// Put every fd in place: `sources[i]` is the inherited fd holding the open file of `fds[i]`. Then close every
/// other fd but `keep`.
pub fn restore(fds: &[FdImage], sources: &[i32], keep: i32) -> Result<(), String> {
    if fds.len() != sources.len() {
        return Err("fd table and its sources differ in length".into());
    }
    for (f, &src) in fds.iter().zip(sources) {
        if src == f.fd {
            return Err(format!("fd {}: collides with the inherited fd holding it", f.fd));
        }
        let cloexec = if f.cloexec { libc::O_CLOEXEC } else { 0 };
        sys::dup3(src, f.fd, cloexec).map_err(|e| format!("fd {}: dup3: {e}", f.fd))?;
    }
    let open = procfs::list_numbers("/proc/self/fd").map_err(|e| format!("listing fds: {e}"))?;
    for fd in open {
        if fd != keep && !fds.iter().any(|f| f.fd == fd) {
            let _ = sys::close(fd);
        }
    }
    Ok(())
}

/// A session leader makes a pseudo-terminal of the job its controlling terminal again and gives it its
/// foreground group.
pub fn take_terminal(c: &vos::image::Ctty) -> Result<(), String> {
    sys::ioctl(c.fd, libc::TIOCSCTTY as u64, 0).map_err(|e| format!("fd {}: making it the controlling terminal: {e}", c.fd))?;
    if c.foreground != 0 {
        let pg: i32 = c.foreground;
        sys::ioctl(c.fd, libc::TIOCSPGRP as u64, &pg as *const i32 as usize)
            .map_err(|e| format!("fd {}: setting the foreground group {}: {e}", c.fd, c.foreground))?;
    }
    Ok(())
}
