//! inotify: the kernel keeps a watch's inode, not the path it was added with, so the shim remembers the paths
//! (the supervisor finds everything else in the fd's fdinfo and recreates the watches with the same numbers).

use crate::arena;
use crate::global::Global;
use crate::real;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};
use libc::{c_char, c_int};
use vos::image::WatchPath;

static WATCHES: Global<Vec<WatchPath>> = Global::new(Vec::new());
static LOCK: AtomicBool = AtomicBool::new(false);

fn with<R>(f: impl FnOnce(&mut Vec<WatchPath>) -> R) -> R {
    while LOCK.swap(true, Ordering::Acquire) {
        core::hint::spin_loop();
    }
    // SAFETY: LOCK is held; allocations go to the permanent arena.
    let r = arena::permanent(|| f(unsafe { WATCHES.get() }));
    LOCK.store(false, Ordering::Release);
    r
}

/// The watches' paths, for the process's image (in the checkpoint's own arena).
pub fn capture() -> Vec<WatchPath> {
    while LOCK.swap(true, Ordering::Acquire) {
        core::hint::spin_loop();
    }
    // SAFETY: LOCK is held.
    let v = unsafe { WATCHES.get() }.clone();
    LOCK.store(false, Ordering::Release);
    v
}

/// After a restore: the watches as the image has them (their paths possibly re-bound).
pub fn restore(watches: &[WatchPath]) {
    with(|w| *w = watches.to_vec());
}

fn absolute(path: *const c_char) -> String {
    // SAFETY: the app passed a C string.
    let p = unsafe { core::ffi::CStr::from_ptr(path) }.to_string_lossy().into_owned();
    if p.starts_with('/') {
        return p;
    }
    let cwd = crate::procfs::readlink("/proc/thread-self/cwd").unwrap_or_default();
    alloc::format!("{cwd}/{p}")
}

/// inotify_add_watch(2), remembering the path.
///
/// # Safety
/// As inotify_add_watch(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn inotify_add_watch(fd: c_int, path: *const c_char, mask: u32) -> c_int {
    // SAFETY: forwarded.
    let wd = unsafe { real::inotify_add_watch()(fd, path, mask) };
    if wd >= 0 {
        crate::errno::keep(|| {
            let p = absolute(path);
            with(|w| {
                w.retain(|x| !(x.fd == fd && x.wd == wd));
                w.push(WatchPath { fd, wd, path: p });
            });
        });
    }
    wd
}

/// inotify_rm_watch(2).
///
/// # Safety
/// As inotify_rm_watch(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn inotify_rm_watch(fd: c_int, wd: c_int) -> c_int {
    // SAFETY: forwarded.
    let r = unsafe { real::inotify_rm_watch()(fd, wd) };
    if r == 0 {
        with(|w| w.retain(|x| !(x.fd == fd && x.wd == wd)));
    }
    r
}
