//! Write tracking for live migration. This kernel has no soft-dirty bits; instead the process registers its
//! private memory with a userfaultfd in write-protect *async* mode: a write to a protected page just clears
//! the protection (no fault reaches anyone), and the supervisor's PAGEMAP_SCAN on /proc/PID/pagemap reads
//! which pages were written and protects them again, round after round. Only the process itself can register
//! its memory, so it does it here, once, while its threads are parked. The userfaultfd is the shim's own fd.

use crate::memory::read_vmas;
use core::sync::atomic::{AtomicI32, Ordering};
use vos::sys;

/// The tracking userfaultfd, or -1.
static TRACKER: AtomicI32 = AtomicI32::new(-1);

/// The shim's tracking fd, if any (the checkpoint must not take it for one of the app's).
pub fn fd() -> Option<i32> {
    let fd = TRACKER.load(Ordering::Acquire);
    (fd >= 0).then_some(fd)
}

/// Stop tracking (the migration is over, one way or the other).
pub fn stop() {
    let fd = TRACKER.swap(-1, Ordering::AcqRel);
    if fd >= 0 {
        let _ = sys::close(fd);
    }
}

/// Register every private mapping for async write-protect tracking. Mappings the kernel will not track are
/// left out: the supervisor treats their pages as always written.
pub fn start(high: impl Fn(i32) -> i32) -> Result<(), String> {
    stop();
    let fd = match sys::userfaultfd(libc::O_NONBLOCK, sys::UFFD_FEATURE_WP_ASYNC) {
        Ok(fd) => high(fd),
        Err(e) if e.0 == libc::EINVAL => return Err(format!("userfaultfd write-protect in async mode: {e} (needs Linux 6.7)")),
        Err(e) => return Err(format!("userfaultfd: {e} (write tracking needs root or vm.unprivileged_userfaultfd=1)")),
    };
    let vmas = match read_vmas() {
        Ok(v) => v,
        Err(e) => {
            let _ = sys::close(fd);
            return Err(e);
        }
    };
    for v in vmas.iter().filter(|v| !v.shared && (!v.name.starts_with('[') || v.name == "[heap]" || v.name == "[stack]")) {
        let _ = sys::uffd_register(fd, v.start, v.end - v.start, sys::UFFDIO_REGISTER_MODE_WP);
    }
    TRACKER.store(fd, Ordering::Release);
    Ok(())
}
