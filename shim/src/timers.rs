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
        let its = libc::itimerspec { it_interval: ts(p.interval_ns), it_value: ts(p.value_ns) };
        // SAFETY: a valid itimerspec for a timer `create` made.
        unsafe { sys::syscall6(libc::SYS_timer_settime, p.id as usize, 0, &its as *const libc::itimerspec as usize, 0, 0, 0) };
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
    let v = (t.tv_sec as i64 * 1_000_000_000 + t.tv_nsec as i64 + off).max(0);
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
