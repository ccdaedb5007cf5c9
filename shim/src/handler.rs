//! The shim's signal handler, for its two signals (`signals`). One handler serves three purposes, told apart by
//! siginfo: the coordinator's park requests (SI_QUEUE from this process with a magic value: the thread parks,
//! `threads`), triggers from outside the job (sender not in the job: a checkpoint starts, `checkpoint`), and the
//! app's own signals (delivered to its handler, `signals`).

use crate::{checkpoint, real, signals, threads};
use libc::{c_int, c_void};
use vos::sys;

/// Install the shim's handler for its two signals (constructor).
pub fn install() {
    for sig in signals::own() {
        // SAFETY: sigaction is plain data; we fill handler, flags and a full mask (nothing interrupts a parked
        // thread); glibc's real sigaction adds its own sa_restorer.
        unsafe {
            let mut sa: libc::sigaction = core::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigfillset(&mut sa.sa_mask);
            real::sigaction()(sig, &sa, core::ptr::null_mut());
        }
    }
}

extern "C" fn on_signal(sig: c_int, info: *mut libc::siginfo_t, uc: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let (code, pid, value) = unsafe { ((*info).si_code, (*info).si_pid(), (*info).si_value().sival_ptr as u64) };
    let me = sys::getpid();
    if code == libc::SI_QUEUE && pid == me && value & 0xffff_ffff_0000_0000 == threads::PARK_TAG {
        threads::park((value & 0xffff_ffff) as usize, uc);
    } else if matches!(code, libc::SI_USER | libc::SI_QUEUE | libc::SI_TKILL) && pid != me {
        // From outside the job (seen from inside a pid namespace, an outside sender's pid reads as 0).
        checkpoint::trigger(sig, code == libc::SI_QUEUE && value == vos::signals::SUPERVISOR_MAGIC);
    } else {
        signals::deliver_to_app(sig, info, uc);
    }
}
