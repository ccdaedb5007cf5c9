//! glibc's thread-local errno, which every hook leaves as the app's call left it.

use libc::c_int;

pub fn get() -> c_int {
    // SAFETY: glibc's thread-local errno, always readable.
    unsafe { *libc::__errno_location() }
}

pub fn set(e: c_int) {
    // SAFETY: as above, always writable.
    unsafe { *libc::__errno_location() = e };
}

/// Run `f` (the shim's own work after a call), leaving errno as it was before.
pub fn keep<T>(f: impl FnOnce() -> T) -> T {
    let e = get();
    let r = f();
    set(e);
    r
}
