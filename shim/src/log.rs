//! The shim's log: the job's log file, opened for each line with raw syscalls. Never the app's fds.

use vos::sys;

struct Buf {
    b: [u8; 1024],
    n: usize,
}

impl core::fmt::Write for Buf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let k = s.len().min(self.b.len() - self.n);
        self.b[self.n..self.n + k].copy_from_slice(&s.as_bytes()[..k]);
        self.n += k;
        Ok(())
    }
}

/// Append one line "vos-shim[PID]: ..." to the log file. No allocation: usable anywhere, signal handlers
/// included.
pub fn line(args: core::fmt::Arguments) {
    let mut buf = Buf { b: [0; 1024], n: 0 };
    let _ = core::fmt::write(&mut buf, format_args!("vos-shim[{}]: {}\n", sys::getpid(), args));
    // SAFETY: CONFIG.log is written only before other shim code runs (constructor, restart).
    let path = unsafe { &crate::global::CONFIG.get().log };
    if path.is_empty() || path.len() >= 512 {
        return;
    }
    let mut p = [0u8; 512];
    p[..path.len()].copy_from_slice(path.as_bytes());
    if let Ok(fd) = sys::open(&p[..=path.len()], libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT, 0o600) {
        let _ = sys::write(fd, &buf.b[..buf.n]);
        let _ = sys::close(fd);
    }
}
