//! Write tracking for live migration. This kernel has no soft-dirty bits; instead the process registers its
//! private memory with a userfaultfd in write-protect *async* mode: a write to a protected page just clears
//! the protection (no fault reaches anyone), and the supervisor's PAGEMAP_SCAN on /proc/PID/pagemap reads
//! which pages were written and protects them again, round after round. Only the process itself can register
//! its memory, so it does it here, once, while its threads are parked. The userfaultfd is the shim's own fd.

use crate::memory::read_vmas;
use core::sync::atomic::{AtomicI32, Ordering};
use vos::sys;

const UFFD_API: u64 = 0xAA;
const UFFDIO_API: u64 = 0xc018_aa3f;
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

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
    // SAFETY: userfaultfd(2) takes flags only.
    let fd = unsafe { sys::syscall6(libc::SYS_userfaultfd, (libc::O_CLOEXEC | libc::O_NONBLOCK) as usize, 0, 0, 0, 0, 0) };
    if fd < 0 {
        return Err(format!("userfaultfd: {} (write tracking needs root or vm.unprivileged_userfaultfd=1)", sys::Errno(-fd as i32)));
    }
    let fd = high(fd as i32);
    let mut api = UffdioApi { api: UFFD_API, features: UFFD_FEATURE_WP_ASYNC, ioctls: 0 };
    if let Err(e) = sys::ioctl(fd, UFFDIO_API, &mut api as *mut UffdioApi as usize) {
        let _ = sys::close(fd);
        return Err(format!("userfaultfd write-protect in async mode: {e} (needs Linux 6.7)"));
    }
    let vmas = match read_vmas() {
        Ok(v) => v,
        Err(e) => {
            let _ = sys::close(fd);
            return Err(e);
        }
    };
    for v in vmas.iter().filter(|v| !v.shared && (!v.name.starts_with('[') || v.name == "[heap]" || v.name == "[stack]")) {
        let mut reg = UffdioRegister { start: v.start, len: v.end - v.start, mode: UFFDIO_REGISTER_MODE_WP, ioctls: 0 };
        let _ = sys::ioctl(fd, UFFDIO_REGISTER, &mut reg as *mut UffdioRegister as usize);
    }
    TRACKER.store(fd, Ordering::Release);
    Ok(())
}
