//! The restorer's address window: reserved (an inaccessible mapping) in every process of a job, so every image
//! leaves it free and the restorer can run there.

use core::sync::atomic::{AtomicBool, Ordering};
use vos::plan;
use vos::sys;

/// Set when the constructor reserved the window (a checkpoint then leaves it out of the image; otherwise it checks
/// the window is free).
pub static WINDOW_RESERVED: AtomicBool = AtomicBool::new(false);

/// Keep the restorer's window free: it must be unused in every image so the restorer can run there.
pub fn reserve() {
    match map(libc::MAP_FIXED_NOREPLACE) {
        Ok(a) if a as u64 == plan::WINDOW_START => {
            const PR_SET_VMA: i32 = 0x53564d41;
            let _ = sys::prctl(PR_SET_VMA, 0, a, plan::WINDOW_LEN as usize, c"vos-window".as_ptr() as usize);
            WINDOW_RESERVED.store(true, Ordering::Relaxed)
        }
        Ok(a) => {
            // An old kernel ignoring MAP_FIXED_NOREPLACE put it elsewhere: give it back.
            // SAFETY: the mapping we just made.
            let _ = unsafe { sys::munmap(a, plan::WINDOW_LEN as usize) };
            crate::log::line(format_args!("cannot reserve the restorer window; checkpoints will check it is free"));
        }
        Err(e) => crate::log::line(format_args!("cannot reserve the restorer window ({e}); checkpoints will check it is free")),
    }
}

/// Map the window as an inaccessible reservation; `how` is MAP_FIXED_NOREPLACE, or MAP_FIXED to replace the
/// restorer once a restore is done.
pub fn map(how: i32) -> Result<usize, sys::Errno> {
    // SAFETY: PROT_NONE memory costs nothing; with MAP_FIXED the caller guarantees nothing runs there any more.
    unsafe {
        sys::mmap(
            plan::WINDOW_START as usize,
            plan::WINDOW_LEN as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | how,
            -1,
            0,
        )
    }
}
