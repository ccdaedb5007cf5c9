//! Keep a checkpoint invisible to sleeping calls.
//!
//! Parking a thread runs a signal handler on it; a sleep or wait it was in then returns EINTR (SA_RESTART does
//! not restart nanosleep, poll, epoll_wait, select, sigsuspend...). These hooks retry such calls when the EINTR
//! came from a checkpoint (the checkpoint generation moved while the call ran), with the time that was left:
//! the kernel's remainder for nanosleep, a CLOCK_MONOTONIC deadline otherwise. After a restore the job's
//! monotonic clock goes on from the checkpoint instant (time namespace), so the deadline still holds.
//! The hooks also keep the shim's signals out of the masks these calls install.
//!
//! Not retried: a wait that installs a signal mask of the app's (pselect, ppoll, epoll_pwait with a mask, and
//! sigsuspend). That is how an app waits *for* signals (make for SIGCHLD, event loops for their wake-ups), and it
//! takes EINTR as the way out; a signal it waits for may come in the same moment as the checkpoint, and a retry
//! would hide it (its handler only set a flag, read after the call returns), leaving the app waiting for good.

use crate::real;
use crate::signals::strip;
use core::sync::atomic::{AtomicU32, Ordering};
use libc::{c_int, c_uint, timespec};

/// Moved on by every checkpoint before it parks threads.
pub static GEN: AtomicU32 = AtomicU32::new(0);

fn epoch() -> u32 {
    GEN.load(Ordering::Acquire)
}


/// The call failed with EINTR because a checkpoint parked the thread.
fn checkpointed(rc: c_int, g: u32) -> bool {
    rc == -1 && crate::errno::get() == libc::EINTR && epoch() != g
}

fn now_ns() -> i128 {
    let mut ts = timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid out-parameter; the vDSO call does not touch errno on success.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

fn ts_ns(ts: &timespec) -> i128 {
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

fn ns_ts(ns: i128) -> timespec {
    let ns = ns.max(0);
    timespec { tv_sec: (ns / 1_000_000_000) as i64, tv_nsec: (ns % 1_000_000_000) as i64 }
}

/// Milliseconds left until `deadline` (rounded up), for poll-like timeouts.
fn ms_left(deadline: i128) -> c_int {
    ((deadline - now_ns()).max(0) + 999_999).div_euclid(1_000_000).min(c_int::MAX as i128) as c_int
}

fn ptr<T>(v: &Option<T>) -> *const T {
    v.as_ref().map_or(core::ptr::null(), |v| v as *const T)
}

/// nanosleep(2) that sleeps on for the remainder after a checkpoint.
///
/// # Safety
/// As nanosleep(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nanosleep(req: *const timespec, rem: *mut timespec) -> c_int {
    if req.is_null() {
        // SAFETY: forwarded (the kernel reports EFAULT).
        return unsafe { real::nanosleep()(req, rem) };
    }
    // SAFETY: req is readable per contract.
    let mut cur = unsafe { *req };
    let mut left = timespec { tv_sec: 0, tv_nsec: 0 };
    loop {
        let g = epoch();
        // SAFETY: cur and left are valid.
        let rc = unsafe { real::nanosleep()(&cur, &mut left) };
        if checkpointed(rc, g) {
            cur = left;
            continue;
        }
        if rc == -1 && !rem.is_null() {
            // SAFETY: rem is writable per contract.
            unsafe { *rem = left };
        }
        return rc;
    }
}

/// clock_nanosleep(2): absolute sleeps simply start again; relative ones go on with the remainder.
///
/// # Safety
/// As clock_nanosleep(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn clock_nanosleep(clock: libc::clockid_t, flags: c_int, req: *const timespec, rem: *mut timespec) -> c_int {
    if req.is_null() {
        // SAFETY: forwarded.
        return unsafe { real::clock_nanosleep()(clock, flags, req, rem) };
    }
    // SAFETY: req is readable per contract.
    let mut cur = unsafe { *req };
    let mut left = timespec { tv_sec: 0, tv_nsec: 0 };
    loop {
        let g = epoch();
        // SAFETY: cur and left are valid.
        let rc = unsafe { real::clock_nanosleep()(clock, flags, &cur, &mut left) };
        if rc == libc::EINTR && epoch() != g {
            if flags & libc::TIMER_ABSTIME == 0 {
                cur = left;
            }
            continue;
        }
        if rc == libc::EINTR && !rem.is_null() && flags & libc::TIMER_ABSTIME == 0 {
            // SAFETY: rem is writable per contract.
            unsafe { *rem = left };
        }
        return rc;
    }
}

/// sleep(3); glibc's calls nanosleep internally, out of the hook's reach.
///
/// # Safety
/// None beyond sleep(3)'s.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sleep(secs: c_uint) -> c_uint {
    let req = timespec { tv_sec: secs as i64, tv_nsec: 0 };
    let mut rem = timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointers.
    if unsafe { nanosleep(&req, &mut rem) } == 0 {
        return 0;
    }
    // glibc rounds the remainder to the nearest second.
    rem.tv_sec as c_uint + (rem.tv_nsec >= 500_000_000) as c_uint
}

/// usleep(3).
///
/// # Safety
/// None beyond usleep(3)'s.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn usleep(usec: libc::useconds_t) -> c_int {
    let req = timespec { tv_sec: (usec / 1_000_000) as i64, tv_nsec: (usec % 1_000_000) as i64 * 1000 };
    // SAFETY: valid pointer; no remainder wanted.
    unsafe { nanosleep(&req, core::ptr::null_mut()) }
}

/// Retry `call(timeout_ms)` while a checkpoint interrupts it, with the milliseconds left.
fn retry_ms(timeout: c_int, mut call: impl FnMut(c_int) -> c_int) -> c_int {
    if timeout == 0 {
        return call(0);
    }
    let deadline = now_ns() + timeout as i128 * 1_000_000;
    let mut t = timeout;
    loop {
        let g = epoch();
        let rc = call(t);
        if !checkpointed(rc, g) {
            return rc;
        }
        if timeout > 0 {
            t = ms_left(deadline);
        }
    }
}

/// Retry `call(timeout)` while a checkpoint interrupts it, with the time left (None: no timeout).
fn retry_ts(timeout: *const timespec, mut call: impl FnMut(*const timespec) -> c_int) -> c_int {
    // SAFETY: a non-null timeout is readable per the calls' contracts.
    let deadline = (!timeout.is_null()).then(|| now_ns() + ts_ns(unsafe { &*timeout }));
    let mut cur = timeout;
    let mut left;
    loop {
        let g = epoch();
        let rc = call(cur);
        if !checkpointed(rc, g) {
            return rc;
        }
        if let Some(d) = deadline {
            left = ns_ts(d - now_ns());
            cur = &left;
        }
    }
}

/// poll(2).
///
/// # Safety
/// As poll(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn poll(fds: *mut libc::pollfd, n: libc::nfds_t, timeout: c_int) -> c_int {
    // SAFETY: forwarded.
    retry_ms(timeout, |t| unsafe { real::poll()(fds, n, t) })
}

/// ppoll(2).
///
/// # Safety
/// As ppoll(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ppoll(fds: *mut libc::pollfd, n: libc::nfds_t, tmo: *const timespec, mask: *const libc::sigset_t) -> c_int {
    let m = strip(mask);
    // SAFETY: forwarded with the shim's signals left unblocked.
    let call = |t| unsafe { real::ppoll()(fds, n, t, ptr(&m)) };
    if mask.is_null() { retry_ts(tmo, call) } else { call(tmo) }
}

/// select(2); Linux leaves the time not slept in `tv`, so a retry simply goes on with it.
///
/// # Safety
/// As select(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn select(n: c_int, r: *mut libc::fd_set, w: *mut libc::fd_set, e: *mut libc::fd_set, tv: *mut libc::timeval) -> c_int {
    loop {
        let g = epoch();
        // SAFETY: forwarded.
        let rc = unsafe { real::select()(n, r, w, e, tv) };
        if !checkpointed(rc, g) {
            return rc;
        }
    }
}

/// pselect(2).
///
/// # Safety
/// As pselect(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pselect(n: c_int, r: *mut libc::fd_set, w: *mut libc::fd_set, e: *mut libc::fd_set, ts: *const timespec, mask: *const libc::sigset_t) -> c_int {
    let m = strip(mask);
    // SAFETY: forwarded; on EINTR the fd sets are left unmodified, so a retry sees what the app asked.
    let call = |t| unsafe { real::pselect()(n, r, w, e, t, ptr(&m)) };
    if mask.is_null() { retry_ts(ts, call) } else { call(ts) }
}

/// epoll_wait(2).
///
/// # Safety
/// As epoll_wait(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_wait(ep: c_int, ev: *mut libc::epoll_event, max: c_int, timeout: c_int) -> c_int {
    // SAFETY: forwarded.
    retry_ms(timeout, |t| unsafe { real::epoll_wait()(ep, ev, max, t) })
}

/// epoll_pwait(2).
///
/// # Safety
/// As epoll_pwait(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_pwait(ep: c_int, ev: *mut libc::epoll_event, max: c_int, timeout: c_int, mask: *const libc::sigset_t) -> c_int {
    let m = strip(mask);
    // SAFETY: forwarded with the shim's signals left unblocked.
    let call = |t| unsafe { real::epoll_pwait()(ep, ev, max, t, ptr(&m)) };
    if mask.is_null() { retry_ms(timeout, call) } else { call(timeout) }
}

/// pause(2): only the app's own signals end it.
///
/// # Safety
/// None.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pause() -> c_int {
    loop {
        let g = epoch();
        // SAFETY: no arguments.
        let rc = unsafe { real::pause()() };
        if !checkpointed(rc, g) {
            return rc;
        }
    }
}

/// sigsuspend(2): never with the shim's signals blocked (a checkpoint ends it too: see the module's note).
///
/// # Safety
/// As sigsuspend(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigsuspend(mask: *const libc::sigset_t) -> c_int {
    let m = strip(mask);
    // SAFETY: forwarded with the shim's signals left unblocked.
    unsafe { real::sigsuspend()(ptr(&m)) }
}

/// sigwaitinfo(2): the app cannot wait for (and so consume) the shim's signals.
///
/// # Safety
/// As sigwaitinfo(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigwaitinfo(set: *const libc::sigset_t, info: *mut libc::siginfo_t) -> c_int {
    let s = strip(set);
    loop {
        let g = epoch();
        // SAFETY: forwarded without the shim's signals in the set.
        let rc = unsafe { real::sigwaitinfo()(ptr(&s), info) };
        if !checkpointed(rc, g) {
            return rc;
        }
    }
}

/// sigtimedwait(2).
///
/// # Safety
/// As sigtimedwait(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigtimedwait(set: *const libc::sigset_t, info: *mut libc::siginfo_t, ts: *const timespec) -> c_int {
    let s = strip(set);
    // SAFETY: forwarded without the shim's signals in the set.
    retry_ts(ts, |t| unsafe { real::sigtimedwait()(ptr(&s), info, t) })
}

/// sigwait(3) (retries EINTR itself).
///
/// # Safety
/// As sigwait(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigwait(set: *const libc::sigset_t, sig: *mut c_int) -> c_int {
    let s = strip(set);
    // SAFETY: forwarded without the shim's signals in the set.
    unsafe { real::sigwait()(ptr(&s), sig) }
}
