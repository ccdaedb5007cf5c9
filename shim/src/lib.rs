//! libvos_shim.so: loaded into every process of a job with LD_PRELOAD.
//!
//! It stays out of the app's way: no thread, no fd, no hook on a hot path (open, read, write and malloc run
//! untouched; clock_gettime only gains a load and a branch, see `timers`). What it does:
//! - reserves the restorer's address window, so every image leaves it free;
//! - owns two signals (checkpoint, checkpoint-and-exit), virtualizing the app's own use of them (`signals`);
//! - keeps sleeping calls transparent across a checkpoint (`interrupts`);
//! - on a trigger, runs a checkpoint from inside (`checkpoint`): parks every thread in a signal handler
//!   (`threads`), captures memory, files, signals and process state (one module each) and writes the image;
//! - after a restore, its restart code (`restart`) rebuilds what the restorer left to it and resumes the threads.
//!
//! Standards: panic = abort; raw syscalls for its own I/O (`vos::sys`); its own allocator (`arena`); errno
//! preserved by every hook; nothing printed on the app's fds (`log` writes to the job's log file).

extern crate alloc;

mod checkpoint;
mod creds;
mod errno;
mod files;
mod global;
mod inotify;
mod interrupts;
mod log;
mod memory;
mod process;
mod processes;
mod procfs;
mod real;
mod restart;
mod signals;
mod threads;
mod timers;
mod tracking;
mod writer;

mod arena;

#[global_allocator]
static ALLOC: arena::ShimAlloc = arena::ShimAlloc;

use core::sync::atomic::Ordering;
use vos::plan;
use vos::sys;

/// Runs in every process that loads the shim, before the program's main.
#[ctor::ctor]
unsafe fn init() {
    global::map_state();
    global::load_config();
    real::resolve();
    reserve_window();
    signals::install();
    threads::init_rseq_info();
    threads::remember_main();
    // SAFETY: registering a plain function for fork's child (the forking thread is its main thread).
    unsafe { libc::pthread_atfork(None, None, Some(threads::remember_main)) };
    global::READY.store(true, Ordering::Release);
    signals::open();
}

/// Keep the restorer's window free: it must be unused in every image so the restorer can run there.
fn reserve_window() {
    match map_window(libc::MAP_FIXED_NOREPLACE) {
        Ok(a) if a as u64 == plan::WINDOW_START => {
            const PR_SET_VMA: i32 = 0x53564d41;
            let _ = sys::prctl(PR_SET_VMA, 0, a, plan::WINDOW_LEN as usize, c"vos-window".as_ptr() as usize);
            global::WINDOW_RESERVED.store(true, Ordering::Relaxed)
        }
        Ok(a) => {
            // An old kernel ignoring MAP_FIXED_NOREPLACE put it elsewhere: give it back.
            // SAFETY: the mapping we just made.
            let _ = unsafe { sys::munmap(a, plan::WINDOW_LEN as usize) };
            log::line(format_args!("cannot reserve the restorer window; checkpoints will check it is free"));
        }
        Err(e) => log::line(format_args!("cannot reserve the restorer window ({e}); checkpoints will check it is free")),
    }
}

/// Map the window as an inaccessible reservation; `how` is MAP_FIXED_NOREPLACE, or MAP_FIXED to replace the
/// restorer once a restore is done.
pub(crate) fn map_window(how: i32) -> Result<usize, sys::Errno> {
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
