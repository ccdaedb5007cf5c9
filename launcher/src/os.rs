//! Small helpers over kernel interfaces that modules of every layer share: taking a job process's fd, a file's
//! data extents, an anonymous file, owning a raw fd, a socket's receive timeout. They import nothing of vrun.

use anyhow::{Result, bail};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// A dup of fd `fd` of process `pid` (pidfd_getfd), to look at what it points to.
pub fn grab(pid: i32, fd: i32) -> Result<OwnedFd> {
    // SAFETY: plain syscalls; the returned fds are owned here.
    unsafe {
        let mut pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if pidfd < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
            // A thread, not a process (see `Member::task`): PIDFD_THREAD.
            pidfd = libc::syscall(libc::SYS_pidfd_open, pid, libc::O_EXCL);
        }
        if pidfd < 0 {
            bail!("pidfd_open({pid}): {}", std::io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let f = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        if f < 0 {
            bail!("pidfd_getfd({pid}, {fd}): {}", std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(f as i32))
    }
}

/// The parts of a file holding data (not holes), by SEEK_DATA/SEEK_HOLE.
pub fn data_ranges(fd: RawFd, size: u64) -> Vec<(u64, u64)> {
    let mut out = vec![];
    let mut off = 0i64;
    while (off as u64) < size {
        // SAFETY: lseek on a file we hold (it moves the offset of our own dup, not the job's... nor theirs:
        // pidfd_getfd dups share it, so the caller restores nothing relies on: only pread follows).
        let d = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if d < 0 {
            break;
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        let h = if h < 0 { size as i64 } else { h };
        out.push((d as u64, (h as u64).min(size)));
        off = h;
    }
    out
}

pub fn memfd(name: &str, size: u64) -> Result<OwnedFd> {
    let n = CString::new(format!("vos:{}", name.trim_start_matches('/')).replace(" (deleted)", "")).unwrap_or_default();
    let fd = nix::sys::memfd::memfd_create(n.as_c_str(), nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
    nix::unistd::ftruncate(&fd, size as i64)?;
    Ok(fd)
}

/// Make an OwnedFd from a raw fd we own.
pub fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller passes an fd it owns and does not use otherwise.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A receive timeout on a control socket (SO_RCVTIMEO): whoever talks on one must not hang on a silent peer.
pub fn set_timeout(fd: i32, d: Duration) {
    let tv = libc::timeval { tv_sec: d.as_secs() as i64, tv_usec: 0 };
    // SAFETY: tv is a valid timeval.
    unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv as *const _ as *const libc::c_void, std::mem::size_of::<libc::timeval>() as u32);
    }
}
