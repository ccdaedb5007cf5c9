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
    sys::ioctl(c.fd, libc::TIOCSCTTY, 0).map_err(|e| format!("fd {}: making it the controlling terminal: {e}", c.fd))?;
    if c.foreground != 0 {
        let pg: i32 = c.foreground;
        sys::ioctl(c.fd, libc::TIOCSPGRP, &pg as *const i32 as usize)
            .map_err(|e| format!("fd {}: setting the foreground group {}: {e}", c.fd, c.foreground))?;
    }
    Ok(())
}

/// What the process must do itself once its fds are in place: epoll registrations (the kernel keys them by fd
/// number), pidfds, POSIX record locks (they belong to the process).
pub fn fixups(fixups: &[vos::image::FdFixup]) -> Result<(), String> {
    use vos::image::FdFixup;
    for f in fixups {
        match f {
            FdFixup::Epoll { epfd, items } => {
                for it in items {
                    let ev = libc::epoll_event { events: it.events, u64: it.data };
                    // SAFETY: ev is a valid epoll_event.
                    let r = unsafe { sys::syscall6(libc::SYS_epoll_ctl, *epfd as usize, libc::EPOLL_CTL_ADD as usize, it.fd as usize, &ev as *const libc::epoll_event as usize, 0, 0) };
                    if r < 0 {
                        return Err(format!("epoll fd {epfd}: watching fd {} again: {}", it.fd, sys::Errno(-r as i32)));
                    }
                }
            }
            FdFixup::PidFd { fd, pid, flags, cloexec } => {
                // SAFETY: pidfd_open has no memory effects.
                let r = unsafe { sys::syscall6(libc::SYS_pidfd_open, *pid as usize, *flags as usize, 0, 0, 0, 0) };
                if r < 0 {
                    return Err(format!("fd {fd}: pidfd of pid {pid}: {}", sys::Errno(-r as i32)));
                }
                let flags = if *cloexec { libc::O_CLOEXEC } else { 0 };
                sys::dup3(r as i32, *fd, flags).map_err(|e| format!("fd {fd}: {e}"))?;
                let _ = sys::close(r as i32);
            }
            FdFixup::RecordLock { fd, write, start, len } => {
                // SAFETY: flock is plain data.
                let mut fl: libc::flock = unsafe { core::mem::zeroed() };
                fl.l_type = if *write { libc::F_WRLCK } else { libc::F_RDLCK } as i16;
                fl.l_whence = libc::SEEK_SET as i16;
                fl.l_start = *start as i64;
                fl.l_len = *len as i64;
                sys::fcntl(*fd, libc::F_SETLK, &fl as *const libc::flock as usize)
                    .map_err(|e| format!("fd {fd}: taking its record lock again: {e} (held by another process now?)"))?;
            }
        }
    }
    Ok(())
}
