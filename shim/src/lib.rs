//! libvos_shim.so: loaded into every process of a job with LD_PRELOAD.
//!
//! It stays out of the app's way: no thread, no fd, no hook on a hot path (open, read, write and malloc run
//! untouched; clock_gettime only gains a load and a branch, see `timers`). What it does:
//! - reserves the restorer's address window, so every image leaves it free (`window`);
//! - owns two signals (checkpoint, checkpoint-and-exit), virtualizing the app's own use of them (`signals`), and
//!   handles them (`handler`);
//! - keeps sleeping calls transparent across a checkpoint (`interrupts`);
//! - on a trigger, runs a checkpoint from inside (`checkpoint`): parks every thread in a signal handler
//!   (`threads`), captures memory, files, signals and process state (one module each) and writes the image;
//! - after a restore, its restart code (`restart`) rebuilds what the restorer left to it and resumes the threads.
//!
//! Standards: panic = abort; raw syscalls for its own I/O (`vos::sys`); its own allocator (`arena`); errno
//! preserved by every hook; nothing printed on the app's fds (`log` writes to the job's log file).

extern crate alloc;

// The modules in layers, top to bottom: each uses only modules listed after it, never one above it;
// `tests/modcycles.py shim/src` checks that no two modules use each other.
//
// The two flows, and the signal handler that starts the first:
mod handler; // the shim's one signal handler: a park request, a trigger, or the app's own signal
mod checkpoint; // the coordinator
mod restart; // the second stage of a restore, in the restored process
// What only one flow uses: the checkpoint's write tracking, address space and chunk writer; the restart's fds.
mod tracking;
mod memory;
mod writer;
mod files;
// Threads: the park handshake at a checkpoint, their recreation at a restore.
mod threads;
// One module per kind of state the shim keeps, captures or restores itself, with the libc hooks that keep it:
mod inotify;
mod interrupts; // sleeping calls kept transparent across a checkpoint
mod process;
mod processes; // exec and spawn keep the job's environment and the shim
mod timers;
mod signals; // the app's view of the shim's signals; dispositions and pending signals
mod creds;
// The base every part uses:
mod arena; // the shim's allocator
mod state; // the large state mapping: the thread table, the coordinator's and the restart code's stacks
mod window; // the restorer's address window
mod real; // the real libc functions behind the hooks
mod log;
mod global; // configuration, the shim's signal numbers, job-wide flags
mod errno;
mod procfs;

#[global_allocator]
static ALLOC: arena::ShimAlloc = arena::ShimAlloc;

use core::sync::atomic::Ordering;

/// Runs in every process that loads the shim, before the program's main.
#[ctor::ctor]
unsafe fn init() {
    state::map();
    global::load_config();
    real::resolve();
    window::reserve();
    handler::install();
    threads::init_rseq_info();
    threads::remember_main();
    // SAFETY: registering a plain function for fork's child (the forking thread is its main thread).
    unsafe { libc::pthread_atfork(None, None, Some(threads::remember_main)) };
    global::READY.store(true, Ordering::Release);
    signals::open();
}
