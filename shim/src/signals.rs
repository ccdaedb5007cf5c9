//! Signals: the shim's own two signals, the app's view of them, and the capture and restore of dispositions and
//! pending signals.
//!
//! The shim owns SIG_CHECKPOINT and SIG_CHECKPOINT_EXIT (SIGRTMAX-1, SIGRTMAX-2 by default). The app may use them
//! too: its sigaction() of them is recorded in a virtual table and never reaches the kernel; its attempts to
//! block them are dropped (a thread that blocked them could not be parked). The shim's handler for them is in
//! `handler`; what it hands to the app is delivered here (`deliver_to_app`).

use crate::global::{self, Global};
use crate::real;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};
use libc::{c_int, c_void};
use serde_bytes::ByteBuf;
use vos::image::{SigAction, SignalImage};
use vos::sys::{self, KSigaction, SigInfo};

/// The app's virtual dispositions of the shim's two signals; guarded by VIRTUAL_LOCK.
static VIRTUAL: Global<[Option<libc::sigaction>; 2]> = Global::new([None, None]);
static VIRTUAL_LOCK: AtomicBool = AtomicBool::new(false);

fn with_virtual<R>(f: impl FnOnce(&mut [Option<libc::sigaction>; 2]) -> R) -> R {
    while VIRTUAL_LOCK.swap(true, Ordering::Acquire) {
        core::hint::spin_loop();
    }
    // SAFETY: VIRTUAL_LOCK is held.
    let r = f(unsafe { VIRTUAL.get() });
    VIRTUAL_LOCK.store(false, Ordering::Release);
    r
}

fn vos_index(sig: c_int) -> usize {
    if sig == global::SIG_CHECKPOINT.load(Ordering::Relaxed) { 0 } else { 1 }
}

/// The shim is whole (the constructor's last step): its signals, blocked by the exec that started this program
/// (see `around_exec`), may come; a request that came meanwhile is pending, and is handled now.
pub fn open() {
    sys::sigprocmask(libc::SIG_UNBLOCK, Some(own_mask()));
}

/// The shim's own signals: the checkpoint trigger (also used to park threads) and checkpoint-and-exit.
pub fn own() -> [c_int; 2] {
    [global::SIG_CHECKPOINT.load(Ordering::Relaxed), global::SIG_CHECKPOINT_EXIT.load(Ordering::Relaxed)]
}

/// `own` as a mask of signals 1..64.
pub fn own_mask() -> u64 {
    own().iter().fold(0, |m, &s| m | sys::sigbit(s))
}

/// Run an exec, or a spawn whose child execs, with the shim's signals blocked. From the exec until the new
/// program's shim has its handlers in, one of them would meet the default action, which ends the process (a
/// checkpoint asking every process to stop just then killed a compiler under make). The mask survives exec, and
/// the new shim unblocks them once it is whole (`open`); here the caller's mask and errno are as before once `f` returns.
pub fn around_exec<T>(f: impl FnOnce() -> T) -> T {
    let old = sys::sigprocmask(libc::SIG_BLOCK, Some(own_mask()));
    let r = f();
    crate::errno::keep(|| sys::sigprocmask(libc::SIG_SETMASK, Some(old)));
    r
}

/// The app sent itself (or a timer raised) one of the shim's signals: act as its own disposition says.
pub fn deliver_to_app(sig: c_int, info: *mut libc::siginfo_t, uc: *mut c_void) {
    let Some(act) = with_virtual(|v| {
        let a = v[vos_index(sig)];
        if let Some(a) = a
            && a.sa_flags & libc::SA_RESETHAND != 0
        {
            v[vos_index(sig)] = None;
        }
        a
    }) else {
        return default_action(sig);
    };
    match act.sa_sigaction {
        libc::SIG_IGN => {}
        libc::SIG_DFL => default_action(sig),
        h => {
            // Run the app's handler with the mask it asked for.
            // SAFETY: uc is the kernel's ucontext; its uc_sigmask is the interrupted code's mask.
            let base = unsafe { *((&(*(uc as *const libc::ucontext_t)).uc_sigmask) as *const libc::sigset_t as *const u64) };
            // SAFETY: sigset_t's first 8 bytes are signals 1..64.
            let extra = unsafe { *(&act.sa_mask as *const libc::sigset_t as *const u64) };
            let own = if act.sa_flags & libc::SA_NODEFER != 0 { 0 } else { sys::sigbit(sig) };
            let old = sys::sigprocmask(libc::SIG_SETMASK, Some(base | extra | own));
            // SAFETY: calling the app's handler as the kernel would, with the arguments it expects.
            unsafe {
                if act.sa_flags & libc::SA_SIGINFO != 0 {
                    let f: extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) = core::mem::transmute(h);
                    f(sig, info, uc);
                } else {
                    let f: extern "C" fn(c_int) = core::mem::transmute(h);
                    f(sig);
                }
            }
            sys::sigprocmask(libc::SIG_SETMASK, Some(old));
        }
    }
}

/// Real-time signals terminate by default.
fn default_action(sig: c_int) {
    let dfl = KSigaction { handler: libc::SIG_DFL, ..Default::default() };
    let _ = sys::rt_sigaction(sig, Some(&dfl));
    let _ = sys::tgkill(sys::getpid(), sys::gettid(), sig);
    // Delivered when the handler returns and the mask is restored.
}

/// A signal set without the shim's signals (the app may not block or wait for them).
pub fn strip(set: *const libc::sigset_t) -> Option<libc::sigset_t> {
    if set.is_null() {
        return None;
    }
    // SAFETY: the app passed a valid sigset_t.
    let mut s = unsafe { *set };
    for sig in own() {
        // SAFETY: s is a valid sigset_t.
        unsafe { libc::sigdelset(&mut s, sig) };
    }
    Some(s)
}

fn ptr_or_null(s: &Option<libc::sigset_t>) -> *const libc::sigset_t {
    s.as_ref().map_or(core::ptr::null(), |s| s as *const libc::sigset_t)
}

// ---- hooks ---------------------------------------------------------------------------------------------------

/// sigaction(2): the shim's signals are virtual, the rest pass through.
///
/// # Safety
/// Called by the app with sigaction's contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigaction(sig: c_int, act: *const libc::sigaction, old: *mut libc::sigaction) -> c_int {
    if !global::is_vos_signal(sig) {
        // SAFETY: forwarded.
        return unsafe { real::sigaction()(sig, act, old) };
    }
    with_virtual(|v| {
        let i = vos_index(sig);
        if !old.is_null() {
            // SAFETY: old is writable per contract; zeroed is SIG_DFL with an empty mask.
            unsafe { *old = v[i].unwrap_or(core::mem::zeroed()) };
        }
        if !act.is_null() {
            // SAFETY: act is readable per contract.
            v[i] = Some(unsafe { *act });
        }
    });
    0
}

fn simple_signal(sig: c_int, handler: libc::sighandler_t, flags: c_int) -> libc::sighandler_t {
    // SAFETY: a zeroed sigaction is valid; filled as glibc's signal()/sysv_signal() would.
    let mut sa: libc::sigaction = unsafe { core::mem::zeroed() };
    sa.sa_sigaction = handler;
    sa.sa_flags = flags;
    // SAFETY: sa.sa_mask is a valid sigset_t.
    unsafe { libc::sigaddset(&mut sa.sa_mask, sig) };
    // SAFETY: a zeroed sigaction is valid.
    let mut old: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: both point to valid sigactions; goes through our own hook so the shim's signals stay virtual.
    if unsafe { sigaction(sig, &sa, &mut old) } < 0 {
        return libc::SIG_ERR;
    }
    old.sa_sigaction
}

/// signal(3) (BSD semantics, like glibc's). glibc's own calls sigaction internally, bypassing the hook.
///
/// # Safety
/// As signal(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    simple_signal(sig, handler, libc::SA_RESTART)
}

/// bsd_signal(3), the same as signal().
///
/// # Safety
/// As signal(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bsd_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    simple_signal(sig, handler, libc::SA_RESTART)
}

/// sysv_signal(3): one-shot, not deferred.
///
/// # Safety
/// As sysv_signal(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sysv_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    simple_signal(sig, handler, libc::SA_RESETHAND | libc::SA_NODEFER)
}

/// sigprocmask(2): never block the shim's signals.
///
/// # Safety
/// As sigprocmask(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigprocmask(how: c_int, set: *const libc::sigset_t, old: *mut libc::sigset_t) -> c_int {
    let s = if how == libc::SIG_UNBLOCK { None } else { strip(set) };
    let p = if how == libc::SIG_UNBLOCK { set } else { ptr_or_null(&s) };
    // SAFETY: forwarded with a filtered copy of the set.
    unsafe { real::sigprocmask()(how, p, old) }
}

/// pthread_sigmask(3): never block the shim's signals.
///
/// # Safety
/// As pthread_sigmask(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_sigmask(how: c_int, set: *const libc::sigset_t, old: *mut libc::sigset_t) -> c_int {
    let s = if how == libc::SIG_UNBLOCK { None } else { strip(set) };
    let p = if how == libc::SIG_UNBLOCK { set } else { ptr_or_null(&s) };
    // SAFETY: forwarded with a filtered copy of the set.
    unsafe { real::pthread_sigmask()(how, p, old) }
}

// ---- capture and restore -------------------------------------------------------------------------------------

/// Dispositions of every signal (the shim's own included: its handler is at the same address after restore).
pub fn capture() -> SignalImage {
    let mut actions = Vec::with_capacity(64);
    for sig in 1..=64 {
        let a = sys::rt_sigaction(sig, None).unwrap_or_default();
        actions.push(SigAction { handler: a.handler as u64, flags: a.flags, restorer: a.restorer as u64, mask: a.mask });
    }
    SignalImage { actions, pending: Vec::new() }
}

pub fn restore(img: &SignalImage) -> Result<(), alloc::string::String> {
    for (i, a) in img.actions.iter().enumerate() {
        let sig = i as i32 + 1;
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let k = KSigaction { handler: a.handler as usize, flags: a.flags, restorer: a.restorer as usize, mask: a.mask };
        sys::rt_sigaction(sig, Some(&k)).map_err(|e| alloc::format!("restoring the action of signal {sig}: {e}"))?;
    }
    Ok(())
}

/// Every signal except those that cannot be caught and the shim's own.
fn drainable() -> u64 {
    !(sys::sigbit(libc::SIGKILL) | sys::sigbit(libc::SIGSTOP) | global::vos_sigmask())
}

/// Dequeue the signals pending for the whole process (all threads are parked with everything blocked).
pub fn drain_shared() -> Vec<ByteBuf> {
    let mut out = Vec::new();
    let mut info: SigInfo = [0; 128];
    while sys::sigtimedwait_now(drainable(), &mut info).is_ok() {
        out.push(ByteBuf::from(info.to_vec()));
    }
    out
}

/// Drop every signal pending now (after a restore: SIGCHLDs of recreated zombies, say), before the job's own
/// pending signals are queued again.
pub fn discard_pending() {
    let mut info: SigInfo = [0; 128];
    while sys::sigtimedwait_now(drainable(), &mut info).is_ok() {}
}

/// Queue process-wide signals again, with their original siginfo.
pub fn requeue_shared(pending: &[ByteBuf]) {
    let me = sys::getpid();
    for p in pending {
        if let Some(info) = as_siginfo(p) {
            let _ = sys::rt_sigqueueinfo(me, signo(&info), &info);
        }
    }
}

/// Dequeue the signals pending for the calling thread only (in a parked thread's handler; no allocation).
/// Returns how many were stored in `out`.
pub fn drain_private(out: &mut [SigInfo]) -> usize {
    let mut n = 0;
    let mut set = private_pending() & drainable();
    while set != 0 && n < out.len() {
        let sig = set.trailing_zeros() as i32 + 1;
        if sys::sigtimedwait_now(sys::sigbit(sig), &mut out[n]).is_ok() {
            n += 1;
        }
        // A signal pending both for the thread and the process is dequeued from the thread first; stop when
        // the thread's own queue no longer has it.
        set = private_pending() & drainable();
    }
    n
}

/// Queue the calling thread's own signals again.
pub fn requeue_private(pending: &[SigInfo]) {
    let (me, tid) = (sys::getpid(), sys::gettid());
    for info in pending {
        let _ = sys::rt_tgsigqueueinfo(me, tid, signo(info), info);
    }
}

fn signo(info: &SigInfo) -> i32 {
    i32::from_ne_bytes([info[0], info[1], info[2], info[3]])
}

pub fn as_siginfo(b: &[u8]) -> Option<SigInfo> {
    b.try_into().ok()
}

/// The calling thread's private pending set, from /proc/thread-self/status (no allocation).
fn private_pending() -> u64 {
    let mut buf = [0u8; 4096];
    let Ok(fd) = sys::open(b"/proc/thread-self/status\0", libc::O_RDONLY, 0) else { return 0 };
    let mut n = 0;
    while n < buf.len() {
        match sys::read(fd, &mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    let _ = sys::close(fd);
    let text = &buf[..n];
    let key = b"\nSigPnd:\t";
    text.windows(key.len())
        .position(|w| w == key)
        .and_then(|i| crate::procfs::parse_hex(&text[i + key.len()..i + key.len() + 16]))
        .unwrap_or(0)
}
