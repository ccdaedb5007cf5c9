//! Opening files by a path an image names. The image is hostile and a restore may run as root, so such a path
//! never leads through a symlink at its end, and the file is checked to be of the kind the image says before it is
//! opened at all: opening a FIFO can block, opening a device can act (a tape rewinds, a watchdog arms), and a
//! regular file opened for writing where a FIFO was expected would take the pipe's bytes.
//!
//! How: an O_PATH|O_NOFOLLOW handle pins the inode without opening it; fstat says what it is; only then is that
//! very inode opened, through its /proc/self/fd link (so nothing can be swapped in between), and checked again.

use anyhow::{Result, anyhow, bail};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// What the path must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    Regular,
    Dir,
    Fifo,
    /// A character device with these numbers.
    Device(u32, u32),
}

impl Want {
    fn name(self) -> &'static str {
        match self {
            Want::Regular => "a regular file",
            Want::Dir => "a directory",
            Want::Fifo => "a FIFO",
            Want::Device(..) => "the character device it should be",
        }
    }

    fn matches(self, st: &libc::stat) -> bool {
        let fmt = st.st_mode & libc::S_IFMT;
        match self {
            Want::Regular => fmt == libc::S_IFREG,
            Want::Dir => fmt == libc::S_IFDIR,
            Want::Fifo => fmt == libc::S_IFIFO,
            Want::Device(ma, mi) => fmt == libc::S_IFCHR && libc::major(st.st_rdev) == ma && libc::minor(st.st_rdev) == mi,
        }
    }
}

fn fstat(fd: &OwnedFd) -> Result<libc::stat> {
    // SAFETY: stat is plain data, filled by the kernel.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and out-parameter.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        bail!("fstat: {}", std::io::Error::last_os_error());
    }
    Ok(st)
}

fn open_raw(path: &CString, flags: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: open with a NUL-terminated path; the fd is owned from here on.
    let fd = unsafe { libc::open(path.as_ptr(), flags, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd of ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Open `path` with `flags` (never creating or truncating) if it is what `want` says; otherwise refuse, having
/// opened nothing. Returns the fd and its stat.
pub fn open(path: &str, flags: i32, want: Want) -> Result<(OwnedFd, libc::stat)> {
    let c = CString::new(path).map_err(|_| anyhow!("{path:?}: a path with a NUL byte"))?;
    let handle = open_raw(&c, libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC).map_err(|e| anyhow!("{path}: {e}"))?;
    let st = fstat(&handle)?;
    if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
        bail!("{path} is a symbolic link; the restore does not follow it (the image needs {} there)", want.name());
    }
    if !want.matches(&st) {
        bail!("{path} is not {}", want.name());
    }
    // O_NOFOLLOW would stop at the /proc link itself; the path's end was checked above.
    let mut flags = (flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOFOLLOW)) | libc::O_CLOEXEC | libc::O_NOCTTY;
    match want {
        Want::Dir => flags |= libc::O_DIRECTORY,
        Want::Fifo | Want::Device(..) => flags |= libc::O_NONBLOCK,
        Want::Regular => {}
    }
    let link = CString::new(format!("/proc/self/fd/{}", handle.as_raw_fd()))?;
    let fd = open_raw(&link, flags).map_err(|e| anyhow!("opening {path}: {e}"))?;
    let got = fstat(&fd)?;
    if (got.st_dev, got.st_ino) != (st.st_dev, st.st_ino) {
        bail!("{path} changed while it was opened");
    }
    Ok((fd, got))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_links() {
        let d = std::env::temp_dir().join(format!("vos-pathopen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        let f = d.join("f");
        std::fs::write(&f, b"data").unwrap();
        let l = d.join("l");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
        assert!(open(&s(&f), libc::O_RDONLY, Want::Regular).is_ok());
        assert!(open(&s(&l), libc::O_RDWR, Want::Regular).unwrap_err().to_string().contains("symbolic link"));
        assert!(open(&s(&f), libc::O_WRONLY, Want::Fifo).unwrap_err().to_string().contains("not a FIFO"));
        assert!(open(&s(&d), libc::O_RDONLY, Want::Dir).is_ok());
        assert!(open("/dev/null", libc::O_RDWR, Want::Device(1, 3)).is_ok());
        assert!(open("/dev/null", libc::O_RDWR, Want::Device(1, 5)).is_err());
        assert!(open(&s(&f), libc::O_RDWR | libc::O_TRUNC, Want::Regular).is_ok());
        assert_eq!(std::fs::read(&f).unwrap(), b"data", "O_TRUNC must never reach the file");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
