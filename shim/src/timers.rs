//! Timers and CPU-time clocks: interval timers (alarm, setitimer) and POSIX timers come back with the time they
//! had left and with the same timer ids; CLOCK_PROCESS_CPUTIME_ID and CLOCK_THREAD_CPUTIME_ID go on from the CPU
//! time used before the checkpoint (a restored process starts from zero, so the shim adds the difference).

use crate::procfs;
use crate::real;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use libc::{c_int, timespec};
use vos::image::{PosixTimer, TimersImage};
use vos::sys;

fn ns(ts: &timespec) -> u64 {
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn ts(ns: u64) -> timespec {
    timespec { tv_sec: (ns / 1_000_000_000) as i64, tv_nsec: (ns % 1_000_000_000) as i64 }
}

/// CPU time of the calling thread as the app sees it (with the offset of earlier restores).
pub fn thread_cpu_ns() -> u64 {
    // SAFETY: reads the calling thread's own TLS word.
    (sys::now_ns(libc::CLOCK_THREAD_CPUTIME_ID) as i64 + unsafe { vos_thread_cpu_offset() }) as u64
}

/// CPU time of the process as the app sees it.
fn process_cpu_ns() -> u64 {
    (sys::now_ns(libc::CLOCK_PROCESS_CPUTIME_ID) as i64 + PROCESS_OFFSET.load(Ordering::Relaxed)) as u64
}

pub fn capture() -> Result<TimersImage, String> {
    let mut t = TimersImage { cpu_ns: process_cpu_ns(), ..Default::default() };
    for which in 0..3 {
        // SAFETY: itimerval is plain data; getitimer fills it.
        let mut v: libc::itimerval = unsafe { core::mem::zeroed() };
        // SAFETY: a valid out-parameter.
        unsafe { sys::syscall6(libc::SYS_getitimer, which, &mut v as *mut libc::itimerval as usize, 0, 0, 0, 0) };
        let us = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000 + tv.tv_usec as u64;
        t.itimers[which] = (us(v.it_value), us(v.it_interval));
    }
    // /proc/self/timers: "ID: n", "signal: SIG/VALUE", "notify: signal|none/pid|tid.N", "ClockID: c" per timer.
    let text = procfs::read_string("/proc/self/timers").map_err(|e| format!("/proc/self/timers: {e}"))?;
    let mut cur: Option<PosixTimer> = None;
    for line in text.lines().chain(core::iter::once("ID: end")) {
        let (k, v) = line.split_once(':').map(|(k, v)| (k.trim(), v.trim())).unwrap_or(("", ""));
        match k {
            "ID" => {
                if let Some(mut p) = cur.take() {
                    // SAFETY: itimerspec is plain data; timer_gettime fills it.
                    let mut its: libc::itimerspec = unsafe { core::mem::zeroed() };
                    // SAFETY: a valid out-parameter for one of this process's timers.
                    unsafe { sys::syscall6(libc::SYS_timer_gettime, p.id as usize, &mut its as *mut libc::itimerspec as usize, 0, 0, 0, 0) };
                    p.value_ns = ns(&its.it_value);
                    p.interval_ns = ns(&its.it_interval);
                    if p.value_ns != 0 && matches!(p.clock, libc::CLOCK_MONOTONIC | libc::CLOCK_BOOTTIME) {
                        p.deadline_ns = sys::now_ns(p.clock) + p.value_ns;
                    }
                    t.posix.push(p);
                }
                if let Ok(id) = v.parse() {
                    cur = Some(PosixTimer { id, ..Default::default() });
                }
            }
            "signal" => {
                if let (Some(p), Some((sig, val))) = (cur.as_mut(), v.split_once('/')) {
                    p.signo = sig.parse().unwrap_or(0);
                    p.value = u64::from_str_radix(val, 16).unwrap_or(0);
                }
            }
            "notify" => {
                if let Some(p) = cur.as_mut() {
                    let (kind, who) = v.split_once('/').unwrap_or((v, ""));
                    let tid = who.contains("tid");
                    p.notify = match kind {
                        "none" => libc::SIGEV_NONE,
                        "thread" => libc::SIGEV_THREAD,
                        _ => libc::SIGEV_SIGNAL,
                    } | if tid { libc::SIGEV_THREAD_ID } else { 0 };
                    p.tid = who.rsplit('.').next().and_then(|n| n.parse().ok()).unwrap_or(0);
                }
            }
            "ClockID" => {
                if let Some(p) = cur.as_mut() {
                    p.clock = v.parse().unwrap_or(0);
                }
            }
            _ => {}
        }
    }
    Ok(t)
}

/// The kernel's struct sigevent.
#[repr(C)]
struct KSigevent {
    value: u64,
    signo: i32,
    notify: i32,
    tid: i32,
    pad: [i32; 11],
}

/// Arm the timers again with the time they had left, and start the process's CPU-time clock from where it was
/// (after the restore's go: a timer must not fire while the process is still being rebuilt).
pub fn arm(t: &TimersImage) {
    set_process_offset(t.cpu_ns);
    for p in t.posix.iter().filter(|p| p.value_ns != 0) {
        let (flags, value) = if p.deadline_ns != 0 { (libc::TIMER_ABSTIME, p.deadline_ns) } else { (0, p.value_ns) };
        let its = libc::itimerspec { it_interval: ts(p.interval_ns), it_value: ts(value) };
        // SAFETY: a valid itimerspec for a timer `create` made.
        unsafe { sys::syscall6(libc::SYS_timer_settime, p.id as usize, flags as usize, &its as *const libc::itimerspec as usize, 0, 0, 0) };
    }
    for (which, &(value, interval)) in t.itimers.iter().enumerate() {
        if value == 0 {
            continue;
        }
        let tv = |us: u64| libc::timeval { tv_sec: (us / 1_000_000) as i64, tv_usec: (us % 1_000_000) as i64 };
        let v = libc::itimerval { it_value: tv(value), it_interval: tv(interval) };
        // SAFETY: a valid itimerval.
        unsafe { sys::syscall6(libc::SYS_setitimer, which, &v as *const libc::itimerval as usize, 0, 0, 0, 0) };
    }
}

/// Recreate the POSIX timers, disarmed, with their ids (Linux 6.16+ lets a process ask for the ids it gives).
pub fn create(t: &TimersImage) -> Result<(), String> {
    if t.posix.is_empty() {
        return Ok(());
    }
    // Ask for the timer ids we give (Linux 6.16+); without it ids are handed out in turn from 0.
    const PR_TIMER_CREATE_RESTORE_IDS: i32 = 77;
    let exact = sys::prctl(PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0).is_ok();
    let mut timers: Vec<PosixTimer> = t.posix.clone();
    timers.sort_by_key(|p| p.id);
    let mut r = Ok(());
    for p in &timers {
        let sev = KSigevent { value: p.value, signo: p.signo, notify: p.notify, tid: p.tid, pad: [0; 11] };
        let mut id: i32 = p.id;
        // SAFETY: a valid sigevent and an id in/out parameter.
        let rc = unsafe { sys::syscall6(libc::SYS_timer_create, p.clock as usize, &sev as *const KSigevent as usize, &mut id as *mut i32 as usize, 0, 0, 0) };
        if rc < 0 || id != p.id {
            r = Err(format!("POSIX timer {}: recreated as {id} ({}){}", p.id, sys::Errno((-rc).max(0) as i32), if exact { "" } else { " (this kernel cannot give timer ids back)" }));
            break;
        }
    }
    if exact {
        let _ = sys::prctl(PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0);
    }
    r
}

// ---- CPU-time clocks ---------------------------------------------------------------------------------------------

/// Set once a process has been restored: only then can CPU-time clocks need an offset.
static RESTORED: AtomicBool = AtomicBool::new(false);
/// Process CPU time before the restore minus the new process's at restart.
static PROCESS_OFFSET: AtomicI64 = AtomicI64::new(0);

unsafe extern "C" {
    /// This thread's CPU-time offset (c/tls.c: initial-exec TLS, so a new thread starts at 0).
    fn vos_thread_cpu_offset() -> i64;
    fn vos_set_thread_cpu_offset(v: i64);
}

fn set_process_offset(before_ns: u64) {
    PROCESS_OFFSET.store(before_ns as i64 - sys::now_ns(libc::CLOCK_PROCESS_CPUTIME_ID) as i64, Ordering::Relaxed);
    RESTORED.store(true, Ordering::Release);
}

/// After a restore, in each recreated thread (and the main one): its CPU-time offset.
pub fn set_thread_offset(before_ns: u64) {
    // SAFETY: writes the calling thread's own TLS word; its TLS block is in place (fs_base is set).
    unsafe { vos_set_thread_cpu_offset(before_ns as i64 - sys::now_ns(libc::CLOCK_THREAD_CPUTIME_ID) as i64) };
}

fn add(tp: *mut timespec, off: i64) {
    if off == 0 || tp.is_null() {
        return;
    }
    // SAFETY: the caller's timespec, just filled by the real call.
    let t = unsafe { &mut *tp };
    let v = (t.tv_sec * 1_000_000_000 + t.tv_nsec + off).max(0);
    t.tv_sec = v / 1_000_000_000;
    t.tv_nsec = v % 1_000_000_000;
}

/// clock_gettime(2): CPU-time clocks go on across restores; every other clock is untouched.
///
/// # Safety
/// As clock_gettime(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn clock_gettime(clock: libc::clockid_t, tp: *mut timespec) -> c_int {
    // SAFETY: forwarded.
    let r = unsafe { real::clock_gettime()(clock, tp) };
    if RESTORED.load(Ordering::Relaxed) && r == 0 {
        match clock {
            libc::CLOCK_PROCESS_CPUTIME_ID => add(tp, PROCESS_OFFSET.load(Ordering::Relaxed)),
            // SAFETY: reads the calling thread's own TLS word.
            libc::CLOCK_THREAD_CPUTIME_ID => add(tp, unsafe { vos_thread_cpu_offset() }),
            _ => {}
        }
    }
    r
}

/// clock(3), which glibc computes from the process CPU-time clock without going through the hook.
///
/// # Safety
/// None.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn clock() -> libc::clock_t {
    let mut t = timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-parameter.
    if unsafe { clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) } != 0 {
        return -1;
    }
    (t.tv_sec * 1_000_000 + t.tv_nsec / 1000) as libc::clock_t
}

// ---- Timers that start a thread (SIGEV_THREAD) -------------------------------------------------------------------
//
// glibc runs them through a hidden helper thread that blocks every signal, which no checkpoint can park. The shim
// runs them itself, the same way, on a helper thread of its own that parks like any other: the kernel timer signals
// that thread (SIGEV_THREAD_ID with signal 32, which glibc keeps from apps), and for each expiry it starts a
// detached thread that calls the app's function with no signal blocked. The timer id the app gets is the kernel's,
// so the other timer_* calls go straight to it. A restore brings the helper back as the thread it is, with the
// same tid, and its timers aimed at it.

use crate::errno;
use core::sync::atomic::{AtomicI32 as HelperTid, AtomicUsize};

const SIGTIMER: c_int = 32;
const SI_TIMER: c_int = -2;
const MAX_THREAD_TIMERS: usize = 256;

/// One SIGEV_THREAD timer: what to call, and how to start its threads (malloc'd; the kernel's sigval points here).
#[repr(C)]
struct ThreadTimer {
    func: extern "C" fn(libc::sigval),
    value: libc::sigval,
    attr: libc::pthread_attr_t,
    ktimer: c_int,
}

/// The live ThreadTimers (0 = free): a signal whose sigval is not one of them (its timer was deleted) is dropped.
static LIVE: [AtomicUsize; MAX_THREAD_TIMERS] = [const { AtomicUsize::new(0) }; MAX_THREAD_TIMERS];
/// The helper's tid: 0 none yet (or after a fork: threads do not survive one), -1 starting.
static HELPER: HelperTid = HelperTid::new(0);

extern "C" fn after_fork_in_child() {
    HELPER.store(0, Ordering::Relaxed);
    for l in &LIVE {
        l.store(0, Ordering::Relaxed);
    }
}

extern "C" fn helper(_: *mut libc::c_void) -> *mut libc::c_void {
    // Only the shim's own signals reach this thread (the app's go to its threads); signal 32 is taken by waiting.
    sys::sigprocmask(libc::SIG_SETMASK, Some(!crate::signals::own_mask()));
    HELPER.store(sys::gettid(), Ordering::Release);
    let set = sys::sigbit(SIGTIMER);
    loop {
        let mut si: sys::SigInfo = [0; 128];
        // SAFETY: valid set and siginfo buffers; no timeout. A checkpoint interrupts it (EINTR): wait again.
        let r = unsafe { sys::syscall6(libc::SYS_rt_sigtimedwait, &set as *const u64 as usize, si.as_mut_ptr() as usize, 0, 8, 0, 0) };
        let code = c_int::from_le_bytes([si[8], si[9], si[10], si[11]]);
        if r != SIGTIMER as isize || code != SI_TIMER {
            continue;
        }
        let t = usize::from_le_bytes(si[24..32].try_into().unwrap());
        if t == 0 || !LIVE.iter().any(|l| l.load(Ordering::Acquire) == t) {
            continue;
        }
        // SAFETY: t is a live ThreadTimer (timer_create made it; timer_delete frees it only after taking it out).
        let tt = unsafe { &*(t as *const ThreadTimer) };
        // SAFETY: malloc of plain data, freed by the thread it is handed to.
        let call = unsafe { libc::malloc(core::mem::size_of::<(usize, libc::sigval)>()) } as *mut (usize, libc::sigval);
        if call.is_null() {
            continue;
        }
        // SAFETY: call points to room for the pair.
        unsafe { call.write((tt.func as usize, tt.value)) };
        let mut th: libc::pthread_t = 0;
        // SAFETY: a valid attr (initialised by timer_create) and start routine; `call` goes to the new thread.
        if unsafe { libc::pthread_create(&mut th, &tt.attr, expiry, call as *mut libc::c_void) } != 0 {
            // SAFETY: not handed over.
            unsafe { libc::free(call as *mut libc::c_void) };
        }
    }
}

extern "C" fn expiry(call: *mut libc::c_void) -> *mut libc::c_void {
    sys::sigprocmask(libc::SIG_SETMASK, Some(0));
    // SAFETY: the pair the helper wrote for this thread alone.
    let (func, value) = unsafe { (call as *const (usize, libc::sigval)).read() };
    // SAFETY: malloc'd by the helper for us.
    unsafe { libc::free(call) };
    // SAFETY: the app's notify function, as it gave it.
    let f: extern "C" fn(libc::sigval) = unsafe { core::mem::transmute(func) };
    f(value);
    core::ptr::null_mut()
}

/// The helper's tid, started on first use; an errno when it cannot be.
fn helper_tid() -> Result<c_int, c_int> {
    loop {
        match HELPER.load(Ordering::Acquire) {
            0 => {
                if HELPER.compare_exchange(0, -1, Ordering::AcqRel, Ordering::Acquire).is_err() {
                    continue;
                }
                static ATFORK: AtomicBool = AtomicBool::new(false);
                if !ATFORK.swap(true, Ordering::AcqRel) {
                    // SAFETY: registering a child handler that only resets atomics.
                    unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
                }
                let mut th: libc::pthread_t = 0;
                // SAFETY: default attributes, a start routine that never returns.
                let rc = unsafe { libc::pthread_create(&mut th, core::ptr::null(), helper, core::ptr::null_mut()) };
                if rc != 0 {
                    HELPER.store(0, Ordering::Release);
                    return Err(rc);
                }
                // SAFETY: th is the thread just made; nobody joins it.
                unsafe { libc::pthread_detach(th) };
            }
            // SAFETY: sched_yield has no preconditions.
            -1 => unsafe {
                libc::sched_yield();
            },
            t => return Ok(t),
        }
    }
}

/// timer_create(2): SIGEV_THREAD timers run on the shim's helper (above); the others are glibc's.
///
/// # Safety
/// As timer_create(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn timer_create(clock: libc::clockid_t, sev: *mut libc::sigevent, id: *mut libc::timer_t) -> c_int {
    // SAFETY: the app's sigevent, if any.
    if sev.is_null() || unsafe { (*sev).sigev_notify } != libc::SIGEV_THREAD {
        // SAFETY: forwarded.
        return unsafe { real::timer_create()(clock, sev, id) };
    }
    let saved = errno::get();
    let fail = |e: c_int| {
        errno::set(e);
        -1
    };
    let tid = match helper_tid() {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    // glibc's sigevent: value at 0, signo at 8, notify at 12, then the function and its attributes.
    // SAFETY: sev is a SIGEV_THREAD sigevent, whose union holds the function and attributes.
    let (func, attrs) = unsafe {
        let raw = sev as *const u8;
        ((raw.add(16) as *const usize).read(), (raw.add(24) as *const *const libc::pthread_attr_t).read())
    };
    // SAFETY: malloc of plain data, initialised below before anyone sees it.
    let tt = unsafe { libc::malloc(core::mem::size_of::<ThreadTimer>()) } as *mut ThreadTimer;
    if tt.is_null() || func == 0 {
        // SAFETY: free(NULL) is a no-op.
        unsafe { libc::free(tt as *mut libc::c_void) };
        return fail(if func == 0 { libc::EINVAL } else { libc::ENOMEM });
    }
    // SAFETY: tt is ours; its attr is initialised, then given the app's stack size and guard, detached.
    unsafe {
        (&raw mut (*tt).func).write(core::mem::transmute::<usize, extern "C" fn(libc::sigval)>(func));
        (&raw mut (*tt).value).write((*sev).sigev_value);
        libc::pthread_attr_init(&raw mut (*tt).attr);
        if !attrs.is_null() {
            let mut n: libc::size_t = 0;
            if libc::pthread_attr_getstacksize(attrs, &mut n) == 0 {
                libc::pthread_attr_setstacksize(&raw mut (*tt).attr, n);
            }
            if libc::pthread_attr_getguardsize(attrs, &mut n) == 0 {
                libc::pthread_attr_setguardsize(&raw mut (*tt).attr, n);
            }
        }
        libc::pthread_attr_setdetachstate(&raw mut (*tt).attr, libc::PTHREAD_CREATE_DETACHED);
    }
    let Some(slot) = LIVE.iter().find(|l| l.compare_exchange(0, tt as usize, Ordering::AcqRel, Ordering::Relaxed).is_ok()) else {
        // SAFETY: tt is ours and seen by nobody.
        unsafe { libc::free(tt as *mut libc::c_void) };
        return fail(libc::EAGAIN);
    };
    // As glibc: the CPU-time clocks of the calling process and thread by their kernel numbers.
    let kclock = match clock {
        libc::CLOCK_PROCESS_CPUTIME_ID => -6,
        libc::CLOCK_THREAD_CPUTIME_ID => -2,
        c => c,
    };
    let ksev = KSigevent { value: tt as u64, signo: SIGTIMER, notify: libc::SIGEV_SIGNAL | libc::SIGEV_THREAD_ID, tid, pad: [0; 11] };
    let mut kid: c_int = 0;
    // SAFETY: a valid sigevent and out-parameter.
    let rc = unsafe { sys::syscall6(libc::SYS_timer_create, kclock as usize, &ksev as *const KSigevent as usize, &mut kid as *mut c_int as usize, 0, 0, 0) };
    if rc < 0 {
        slot.store(0, Ordering::Release);
        // SAFETY: tt is ours; the kernel never got it.
        unsafe { libc::free(tt as *mut libc::c_void) };
        return fail(-rc as c_int);
    }
    // SAFETY: tt is ours; id is the app's out-parameter.
    unsafe {
        (*tt).ktimer = kid;
        *id = kid as usize as libc::timer_t;
    }
    errno::set(saved);
    0
}

/// timer_delete(2): a SIGEV_THREAD timer of the shim's is forgotten too.
///
/// # Safety
/// As timer_delete(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn timer_delete(id: libc::timer_t) -> c_int {
    // SAFETY: forwarded.
    let r = unsafe { real::timer_delete()(id) };
    if r == 0 {
        for l in &LIVE {
            let t = l.load(Ordering::Acquire);
            // SAFETY: a live ThreadTimer; only this call frees it, after taking it out.
            if t != 0 && unsafe { (*(t as *const ThreadTimer)).ktimer } as usize == id as usize && l.compare_exchange(t, 0, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                // SAFETY: as above.
                unsafe { libc::free(t as *mut libc::c_void) };
            }
        }
    }
    r
}
