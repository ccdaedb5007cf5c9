//! The second stage of a restore, in the restored process itself.
//!
//! The restorer (restore/) has rebuilt memory, the vDSO and the mm fields, then jumps to `entry` on a stack of the
//! shim's own. Now the shim's code and data are back, and this code rebuilds the rest with each resource
//! module's `restore`: fds, process attributes, signal dispositions, threads, timers. It reports to the launcher and
//! waits for its go (the launcher first checks the end of the image), then releases the threads and becomes
//! the main thread again.

use crate::global::{CONFIG, COORDINATOR};
use crate::{arena, files, process, signals, state, threads, timers};
use alloc::format;
use alloc::string::String;
use core::sync::atomic::Ordering;
use vos::image::RestartSpec;
use vos::proto::{self, Msg};
use vos::sys;

/// The restart code's stack (`state::RESTART_STACK`): in the image (the restorer maps it back), its contents not.
const STACK: (usize, usize) = state::RESTART_STACK;

pub fn stack_range() -> (u64, u64) {
    let s = state::addr(STACK).unwrap_or(0) as u64;
    (s, s + STACK.1 as u64)
}

pub fn stack_top() -> u64 {
    stack_range().1
}

fn fail(ctl: i32, why: String) -> ! {
    let _ = proto::send(ctl, &Msg::RestoreFailed { why }, None);
    sys::exit_group(1)
}

/// Entered from the restorer, on STACK, with every signal blocked and no other thread.
///
/// # Safety
/// Only the restorer calls this, with `blob` pointing at `len` bytes of a MessagePack RestartSpec.
pub unsafe extern "C" fn entry(blob: *const u8, len: usize, ctl: i32) -> ! {
    // The image was taken mid-checkpoint: forget that session's arena (its memory did not travel), and the fds
    // the supervisor had given it.
    arena::forget_session();
    crate::procfs::drop_given_numbers();
    arena::begin_session(false);
    // SAFETY: the restorer passes `len` readable bytes at `blob` (this function's contract).
    let bytes = unsafe { core::slice::from_raw_parts(blob, len) };
    let spec: RestartSpec = match rmp_serde::from_slice(bytes) {
        Ok(s) => s,
        Err(e) => fail(ctl, format!("decoding the restart spec: {e}")),
    };
    let pid = sys::getpid();
    // The restart code runs as the main thread: give it the main thread's TLS first. A main thread that had exited
    // (pthread_exit from main) left its TLS in place, unused: the restart code runs on it, then exits again.
    let main = spec.process.threads.iter().find(|t| t.tid == pid);
    let fs = match main {
        Some(m) => m.fs_base as usize,
        None => threads::exited_main_fs(),
    };
    if fs == 0 {
        fail(ctl, format!("no main thread {pid} in the image, nor its thread-local storage"));
    }
    let _ = sys::arch_prctl(sys::ARCH_SET_FS, fs);
    let main_state = match (rebuild(&spec), main) {
        (Ok(()), Some(main)) => {
            // With credentials, the restart code took them already (`rebuild`); an older image's capabilities are
            // given back as the main thread becomes itself again.
            let privilege = match spec.process.attrs.creds {
                Some(_) => threads::Privilege::Done,
                None => threads::Privilege::Caps(spec.process.attrs.caps),
            };
            Some(threads::main_state(main, privilege).unwrap_or_else(|e| fail(ctl, e)))
        }
        (Ok(()), None) => None,
        (Err(e), _) => fail(ctl, e),
    };
    if proto::send(ctl, &Msg::Ready, None).is_err() {
        sys::exit_group(1);
    }
    match proto::recv(ctl) {
        Ok(Some((Msg::Go, _))) => {}
        _ => sys::exit_group(1),
    }
    signals::discard_pending();
    signals::requeue_shared(&spec.process.signals.pending);
    timers::arm(&spec.process.timers);
    // The session's memory goes before any app thread runs: none of it may be in the app's way (just below a stack
    // it grows down, say). The spec lies in it: never used (nor dropped) again. What follows allocates from the
    // permanent arena.
    core::mem::forget(spec);
    arena::end_session();
    match main_state {
        Some(k) => {
            threads::release_all();
            done(ctl);
            COORDINATOR.store(0, Ordering::Release);
            threads::resume_main(k)
        }
        None => {
            // The main thread had exited: it is gone again before any other thread runs (they may look).
            done(ctl);
            threads::release_once_main_exited();
            threads::exit_as_main()
        }
    }
}

/// Tell the launcher the process runs; the restorer is done (this is the shim's stack; the spec was copied out):
/// its window goes back to being a reservation.
fn done(ctl: i32) {
    let _ = proto::send(ctl, &Msg::Running, None);
    let _ = sys::close(ctl);
    let _ = crate::window::map(libc::MAP_FIXED);
}

fn rebuild(spec: &RestartSpec) -> Result<(), String> {
    let p = &spec.process;
    arena::permanent(|| {
        // SAFETY: nothing else of the shim runs in this process yet.
        let c = unsafe { CONFIG.get() };
        c.sock = String::from(spec.sock.as_str());
        c.log = String::from(spec.log.as_str());
        c.shim = String::from(spec.shim.as_str());
    });
    files::restore(&p.fds, &spec.fd_sources, spec.ctl_fd)?;
    if let Some(c) = p.ctty {
        files::take_terminal(&c)?;
    }
    files::fixups(&p.fixups)?;
    crate::inotify::restore(&p.watches);
    process::restore(&p.attrs)?;
    signals::restore(&p.signals)?;
    let privilege = match &p.attrs.creds {
        Some(c) => threads::Privilege::Creds(c),
        None => threads::Privilege::Caps(p.attrs.caps),
    };
    threads::recreate(&p.threads, privilege)?;
    timers::create(&p.timers)?;
    process::restore_limits(&p.attrs)?;
    process::restore_last_pid(&p.attrs);
    // Last, after everything that needs privilege, and before any thread of the app may run: from here on this
    // thread is who the process was, and makes only calls its filters allow.
    process::take_credentials(&p.attrs)
}
