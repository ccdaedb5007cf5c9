//! Threads: parking every thread of the process at a checkpoint, and recreating them at restore.
//!
//! To park a thread, the coordinator queues the shim's signal to it with its slot number. The thread's handler
//! records what only the thread itself can read (TLS pointer, robust list, clear-tid address, its own pending
//! signals), then calls `sys::save_and_call`, which pushes the callee-saved registers and records the stack
//! pointer before it waits. The kernel's signal frame, on the thread's own stack, already holds everything
//! else: all registers, FPU/AVX state, signal mask, alternate stack. At restore a thread is recreated with
//! clone3 (same tid, same TLS, same clear-tid word), re-registers its robust list and rseq area, and continues
//! that saved frame with `sys::resume_and_call`; when released it returns from the handler and the kernel's
//! sigreturn puts the interrupted state back. No register format of our own, no glibc internals patched.

use crate::state::{self, ASKED, FREE, MAX_THREADS, PARKED, slot};
use crate::{procfs, signals};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicIsize, AtomicU32, AtomicUsize, Ordering};
use libc::c_void;
use serde_bytes::ByteBuf;
use vos::image::{AltStack, Rseq, ThreadImage};
use vos::sys::{self, SigInfo};

/// High half of the si_value of a park request; the low half is the thread's slot.
pub const PARK_TAG: u64 = vos::signals::PARK_MAGIC & 0xffff_ffff_0000_0000;

/// Number of threads parked (futex word the coordinator waits on).
static PARKED_COUNT: AtomicU32 = AtomicU32::new(0);
/// Release generation (futex word parked threads wait on).
static RELEASE: AtomicU32 = AtomicU32::new(0);
/// Recreated threads that have moved onto their own stacks (restore).
static ON_STACK: AtomicU32 = AtomicU32::new(0);
/// glibc's rseq registration: offset from the thread pointer and size (0: glibc did not register).
static RSEQ_OFFSET: AtomicIsize = AtomicIsize::new(0);
static RSEQ_SIZE: AtomicUsize = AtomicUsize::new(0);
const RSEQ_SIG: u32 = 0x5305_3053;

/// Learn where glibc keeps each thread's rseq area (constructor).
pub fn init_rseq_info() {
    // SAFETY: dlsym with NUL-terminated names; the symbols are glibc's exported variables (2.35+).
    unsafe {
        let off = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr()) as *const isize;
        let size = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr()) as *const u32;
        if !off.is_null() && !size.is_null() && *size > 0 {
            RSEQ_OFFSET.store(*off, Ordering::Relaxed);
            RSEQ_SIZE.store(*size as usize, Ordering::Relaxed);
        }
    }
}

// ---- parking (in each thread's signal handler) ---------------------------------------------------------------

/// Called from the signal handler of a thread asked to park. Returns when the coordinator (or the restart
/// code, after a restore) releases the thread.
pub fn park(i: usize, uc: *mut c_void) {
    if i >= MAX_THREADS || state::addr(state::THREAD_TABLE).is_none() {
        return;
    }
    // This very handler interrupted whatever call the thread was in: the hook around it must see the
    // checkpoint's generation move *after* it read it, or it passes the EINTR on to the app.
    crate::interrupts::GEN.fetch_add(1, Ordering::AcqRel);
    let s = slot(i);
    if s.tid.load(Ordering::Acquire) != sys::gettid() || s.state.load(Ordering::Acquire) != ASKED {
        return; // a stale request
    }
    s.uc = uc as usize;
    s.fs_base = sys::get_fs_base();
    let mut ctid: usize = 0;
    const PR_GET_TID_ADDRESS: i32 = 40;
    let _ = sys::prctl(PR_GET_TID_ADDRESS, &mut ctid as *mut usize as usize, 0, 0, 0);
    s.clear_child_tid = ctid;
    (s.robust, s.robust_len) = sys::get_robust_list().unwrap_or((0, 0));
    s.npending = signals::drain_private(&mut s.pending);
    s.cpu_ns = crate::timers::thread_cpu_ns();
    const PR_GET_SECUREBITS: i32 = 27;
    s.securebits = sys::prctl(PR_GET_SECUREBITS, 0, 0, 0, 0).unwrap_or(0) as u32;
    s.release_at.store(RELEASE.load(Ordering::Acquire), Ordering::Release);
    // SAFETY: park_rsp belongs to this slot; park_wait does not unwind.
    unsafe { sys::save_and_call(&mut s.park_rsp, park_wait, i) };
    // Released (here, or in a restored process): the thread's own signals go back in its queue.
    let n = s.npending;
    s.npending = 0;
    signals::requeue_private(&s.pending[..n]);
}

extern "C" fn park_wait(i: usize) {
    let s = slot(i);
    s.state.store(PARKED, Ordering::Release);
    PARKED_COUNT.fetch_add(1, Ordering::AcqRel);
    let _ = sys::futex_wake(&PARKED_COUNT, 1);
    wait_release(s.release_at.load(Ordering::Acquire));
}

fn wait_release(at: u32) {
    while RELEASE.load(Ordering::Acquire) == at {
        let _ = sys::futex_wait(&RELEASE, at, None);
    }
}

// ---- the coordinator's side ------------------------------------------------------------------------------------

/// The threads parked by `park_all`, by slot.
pub struct Parked {
    pub slots: Vec<usize>,
}

fn ask(i: usize, tid: i32) -> bool {
    let s = slot(i);
    s.tid.store(tid, Ordering::Release);
    s.state.store(ASKED, Ordering::Release);
    let mut info: SigInfo = [0; 128];
    let sig = crate::global::SIG_CHECKPOINT.load(Ordering::Relaxed);
    info[0..4].copy_from_slice(&sig.to_ne_bytes());
    info[8..12].copy_from_slice(&libc::SI_QUEUE.to_ne_bytes());
    info[16..20].copy_from_slice(&sys::getpid().to_ne_bytes());
    // SAFETY: getuid has no preconditions.
    info[20..24].copy_from_slice(&unsafe { libc::getuid() }.to_ne_bytes());
    info[24..32].copy_from_slice(&(PARK_TAG | i as u64).to_ne_bytes());
    match sys::rt_tgsigqueueinfo(sys::getpid(), tid, sig, &info) {
        Ok(_) => true,
        Err(_) => {
            s.state.store(FREE, Ordering::Release);
            false
        }
    }
}

/// Park every thread of the process except the caller. On failure every thread is released again.
pub fn park_all(timeout_ns: u64) -> Result<Parked, String> {
    if state::addr(state::THREAD_TABLE).is_none() {
        return Err("the shim could not map its thread table at start-up".into());
    }
    let me = sys::gettid();
    let pid = sys::getpid();
    PARKED_COUNT.store(0, Ordering::Release);
    let mut asked: Vec<(i32, usize)> = Vec::new();
    let start = sys::now_ns(libc::CLOCK_MONOTONIC);
    loop {
        let mut tids = procfs::list_numbers("/proc/self/task").map_err(|e| format!("listing threads: {e}"))?;
        // A main thread that has exited (pthread_exit from main, perhaps just now) stays listed, a zombie, while
        // the others run: it will never park.
        let leader_gone = main_exited();
        if leader_gone {
            tids.retain(|&t| t != pid);
        }
        // Threads that exited before parking are dropped; new ones (created meanwhile) are asked too.
        asked.retain(|(tid, i)| {
            let alive = tids.contains(tid);
            if !alive && slot(*i).state.load(Ordering::Acquire) == ASKED {
                slot(*i).state.store(FREE, Ordering::Release);
            }
            alive || slot(*i).state.load(Ordering::Acquire) == PARKED
        });
        for &tid in tids.iter().filter(|&&t| t != me) {
            if asked.iter().any(|(t, _)| *t == tid) {
                continue;
            }
            let i = asked.len();
            if i >= MAX_THREADS {
                release_all();
                return Err(format!("more than {MAX_THREADS} threads"));
            }
            if ask(i, tid) {
                asked.push((tid, i));
            }
        }
        let parked = asked.iter().filter(|(_, i)| slot(*i).state.load(Ordering::Acquire) == PARKED).count();
        if parked == asked.len() && asked.iter().all(|(t, _)| tids.contains(t)) {
            let mut again = procfs::list_numbers("/proc/self/task").map_err(|e| format!("listing threads: {e}"))?;
            if leader_gone {
                again.retain(|&t| t != pid);
            }
            if again == tids {
                return Ok(Parked { slots: asked.iter().map(|&(_, i)| i).collect() });
            }
            continue;
        }
        // A thread that blocks the checkpoint signal in its real mask (the app's own masks are virtualized, so
        // glibc-internal or raw-syscall code) never parks: say so at once, by name.
        if sys::now_ns(libc::CLOCK_MONOTONIC) - start > 200_000_000 {
            let sig = crate::global::SIG_CHECKPOINT.load(Ordering::Relaxed);
            if let Some((t, _)) = asked.iter().find(|(t, i)| slot(*i).state.load(Ordering::Acquire) != PARKED && blocks(*t, sig)) {
                let t = *t;
                release_all();
                let waits = procfs::read_string(&format!("/proc/self/task/{t}/syscall")).is_ok_and(|s| s.starts_with("128 "));
                let what = if waits { ", waiting in sigtimedwait (a library's helper thread, such as glibc's for mq_notify with SIGEV_THREAD)" } else { "" };
                return Err(format!("thread {t} ({}) blocks every signal{what}: such a thread is not supported yet", comm(t)));
            }
        }
        if sys::now_ns(libc::CLOCK_MONOTONIC) - start > timeout_ns {
            let stuck: Vec<String> = asked
                .iter()
                .filter(|(_, i)| slot(*i).state.load(Ordering::Acquire) != PARKED)
                .map(|(t, _)| format!("{t} ({})", comm(*t)))
                .collect();
            release_all();
            return Err(format!(
                "thread {} did not stop within {} s (it may be stopped, stuck in the kernel, or blocking signal {} with a raw syscall)",
                stuck.join(", "),
                timeout_ns / 1_000_000_000,
                crate::global::SIG_CHECKPOINT.load(Ordering::Relaxed)
            ));
        }
        let seen = PARKED_COUNT.load(Ordering::Acquire);
        let _ = sys::futex_wait(&PARKED_COUNT, seen, Some(10_000_000));
    }
}

/// Let every parked thread go on.
pub fn release_all() {
    RELEASE.fetch_add(1, Ordering::AcqRel);
    let _ = sys::futex_wake(&RELEASE, i32::MAX as u32);
}

/// Whether the process's main thread has exited (pthread_exit from main) while others run: /proc shows it a
/// zombie. Its thread-local storage and clear-tid word stay where they were (`MAIN_FS`, `MAIN_CTID`).
pub fn main_exited() -> bool {
    let stat = procfs::read_string(&format!("/proc/self/task/{}/stat", sys::getpid())).unwrap_or_default();
    stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()).is_some_and(|s| s == "Z" || s == "X")
}

/// The main thread's TLS pointer and clear-tid address (glibc's `tid` word of its thread descriptor), as the shim's
/// constructor (or, in a forked child, the fork) found them: a restored process whose main thread had exited runs
/// its restart code with them, and ends that thread as glibc's did.
static MAIN_FS: AtomicUsize = AtomicUsize::new(0);
static MAIN_CTID: AtomicUsize = AtomicUsize::new(0);

/// Remember the calling thread as the process's main thread (constructor; a fork's child).
pub extern "C" fn remember_main() {
    let mut ctid: usize = 0;
    const PR_GET_TID_ADDRESS: i32 = 40;
    let _ = sys::prctl(PR_GET_TID_ADDRESS, &mut ctid as *mut usize as usize, 0, 0, 0);
    MAIN_FS.store(sys::get_fs_base(), Ordering::Relaxed);
    MAIN_CTID.store(ctid, Ordering::Relaxed);
}

/// The main thread's TLS pointer, for the restart code of a process whose main thread had exited.
pub fn exited_main_fs() -> usize {
    MAIN_FS.load(Ordering::Relaxed)
}

/// End the calling thread (the restart code, as the process's first thread) as the main thread ended: its
/// clear-tid word cleared and woken (pthread_join on it returns), the process going on in its other threads.
pub fn exit_as_main() -> ! {
    let _ = sys::set_tid_address(MAIN_CTID.load(Ordering::Relaxed));
    sys::exit_thread(0)
}

/// A minimal thread control block for the releaser (as the coordinator's: fs:0 points to itself).
static RELEASER_TCB: crate::global::Global<[u64; 64]> = crate::global::Global::new([0; 64]);

/// After a restore whose main thread had exited: release the other threads only once the main thread (the restart
/// code, about to exit) is a zombie again, from a thread of the shim's own that then ends. It runs on the
/// coordinator's stack, free during a restart, and holds `COORDINATOR` (no checkpoint starts) until it ends.
pub fn release_once_main_exited() {
    let stack = state::addr(state::COORDINATOR_STACK);
    // SAFETY: the restart code is the only thread of the shim running; the TCB is the releaser's alone.
    let tcb = unsafe { RELEASER_TCB.get() };
    let tcb_addr = tcb.as_ptr() as u64;
    tcb[0] = tcb_addr;
    tcb[2] = tcb_addr;
    let coordinator = crate::global::COORDINATOR.as_ptr() as u64;
    let args = sys::CloneArgs {
        flags: sys::THREAD_FLAGS | libc::CLONE_PARENT_SETTID as u64,
        parent_tid: coordinator,
        child_tid: coordinator,
        stack: stack.unwrap_or(0) as u64,
        stack_size: state::COORDINATOR_STACK.1 as u64,
        tls: tcb_addr,
        ..Default::default()
    };
    // SAFETY: the stack and TCB are reserved for this thread, which runs only `releaser`; it inherits the restart
    // code's mask (every signal blocked).
    if stack.is_none() || unsafe { sys::clone3_thread(&args, releaser, sys::getpid() as usize) }.is_err() {
        // The threads go on now; they may see the main thread for a moment.
        release_all();
        crate::global::COORDINATOR.store(0, Ordering::Release);
    }
}

extern "C" fn releaser(pid: usize) -> ! {
    for _ in 0..10_000 {
        if main_gone(pid as i32) {
            break;
        }
        sys::nanosleep_ns(1_000_000);
    }
    release_all();
    sys::exit_thread(0)
}

/// Whether /proc shows thread `pid` (the main one) a zombie, without allocating.
fn main_gone(pid: i32) -> bool {
    let mut digits = [0u8; 12];
    let (mut d, mut v) = (digits.len(), pid.max(0) as u32);
    loop {
        d -= 1;
        digits[d] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let mut path = [0u8; 48];
    let mut n = 0;
    for part in [&b"/proc/self/task/"[..], &digits[d..], b"/stat\0"] {
        path[n..n + part.len()].copy_from_slice(part);
        n += part.len();
    }
    let Ok(fd) = sys::open(&path[..n], libc::O_RDONLY, 0) else { return true };
    let mut buf = [0u8; 512];
    let got = sys::read(fd, &mut buf).unwrap_or(0);
    let _ = sys::close(fd);
    let text = &buf[..got];
    let state = text.iter().rposition(|&c| c == b')').and_then(|i| text.get(i + 2));
    matches!(state, Some(b'Z') | Some(b'X'))
}

/// Whether thread `tid` has `sig` blocked in its real signal mask.
fn blocks(tid: i32, sig: i32) -> bool {
    let status = procfs::read_string(&format!("/proc/self/task/{tid}/status")).unwrap_or_default();
    let mask = status.lines().find_map(|l| l.strip_prefix("SigBlk:")).and_then(|m| u64::from_str_radix(m.trim(), 16).ok());
    mask.is_some_and(|m| m & (1u64 << (sig - 1)) != 0)
}

fn comm(tid: i32) -> String {
    procfs::read_string(&format!("/proc/self/task/{tid}/comm")).map(|s| s.trim_end().into()).unwrap_or_default()
}

/// Describe the parked threads; refuse threads the shim cannot recreate.
pub fn capture(p: &Parked) -> Result<Vec<ThreadImage>, String> {
    let pid = sys::getpid();
    let rseq_size = RSEQ_SIZE.load(Ordering::Relaxed);
    let mut out: Vec<ThreadImage> = Vec::new();
    for &i in &p.slots {
        let s = slot(i);
        let tid = s.tid.load(Ordering::Acquire);
        if s.fs_base == 0 || out.iter().any(|t| t.fs_base == s.fs_base as u64) {
            return Err(format!(
                "thread {tid} ({}) was made by a raw clone() without its own TLS, not by pthread_create: not supported",
                comm(tid)
            ));
        }
        // SAFETY: uc points at the kernel's ucontext on the parked thread's stack, which stays put while parked.
        let uc = unsafe { &*(s.uc as *const libc::ucontext_t) };
        let mask = {
            // SAFETY: the first 8 bytes of the kernel sigset are signals 1..64.
            unsafe { *(&uc.uc_sigmask as *const libc::sigset_t as *const u64) }
        };
        let xfeatures = if uc.uc_mcontext.fpregs.is_null() {
            0
        } else {
            // SAFETY: fpregs points at the 512-byte FXSAVE area of the frame; bytes 464..512 are the software
            // reserved words, with the XSAVE feature mask at offset 472.
            unsafe { core::ptr::read_unaligned((uc.uc_mcontext.fpregs as *const u8).add(472) as *const u64) }
        };
        let st = uc.uc_stack;
        out.push(ThreadImage {
            tid,
            comm: comm(tid),
            fs_base: s.fs_base as u64,
            park_rsp: s.park_rsp as u64,
            clear_child_tid: s.clear_child_tid as u64,
            robust_list: s.robust as u64,
            robust_len: s.robust_len as u64,
            rseq: (rseq_size > 0).then(|| Rseq {
                area: (s.fs_base as isize + RSEQ_OFFSET.load(Ordering::Relaxed)) as u64,
                len: rseq_size.max(32) as u32,
                sig: RSEQ_SIG,
            }),
            rip: uc.uc_mcontext.gregs[libc::REG_RIP as usize] as u64,
            rsp: uc.uc_mcontext.gregs[libc::REG_RSP as usize] as u64,
            sigmask: mask,
            altstack: (st.ss_flags & libc::SS_DISABLE == 0)
                .then_some(AltStack { sp: st.ss_sp as u64, size: st.ss_size as u64, flags: st.ss_flags }),
            pending: s.pending[..s.npending].iter().map(|p| ByteBuf::from(p.to_vec())).collect(),
            xfeatures,
            cpu_ns: s.cpu_ns,
        });
    }
    if !out.iter().any(|t| t.tid == pid) && !main_exited() {
        return Err(format!("main thread {pid} was not parked"));
    }
    if out.is_empty() {
        return Err("no thread of the process is left to capture".into());
    }
    Ok(out)
}

/// The securebits of the parked threads, which must all have the same (each restored thread gets them).
pub fn securebits(p: &Parked) -> Result<u32, String> {
    let mut first: Option<(i32, u32)> = None;
    for &i in &p.slots {
        let s = slot(i);
        let tid = s.tid.load(Ordering::Acquire);
        match first {
            None => first = Some((tid, s.securebits)),
            Some((t, b)) if b != s.securebits => {
                return Err(format!("threads {t} and {tid} have different securebits ({b:#x}, {:#x}): not supported", s.securebits));
            }
            _ => {}
        }
    }
    Ok(first.map_or(0, |f| f.1))
}

// ---- restore ---------------------------------------------------------------------------------------------------

fn slot_of(tid: i32) -> Option<usize> {
    state::addr(state::THREAD_TABLE)?;
    (0..MAX_THREADS).find(|&i| slot(i).tid.load(Ordering::Relaxed) == tid && slot(i).state.load(Ordering::Relaxed) == PARKED)
}

/// Per-thread kernel state that clone3 does not set (robust list, rseq area, name), in plain data so the main
/// thread can carry it past the end of the restart session.
#[derive(Clone, Copy)]
pub struct KernelState {
    robust: usize,
    robust_len: usize,
    rseq: Option<Rseq>,
    comm: [u8; 16],
    clear_child_tid: usize,
    park_rsp: usize,
    slot: usize,
    cpu_ns: u64,
    creds: Privilege,
}

/// What a thread gives back of the privilege its restore had.
#[derive(Clone, Copy)]
pub enum Privilege {
    /// An image without credentials (an older vOS): only its capability sets, exactly.
    Caps(vos::image::Caps),
    /// Become what these credentials say (`creds::apply`); they stay allocated until every recreated thread is on
    /// its own stack.
    Creds(*const vos::image::Creds),
    /// Already done (the main thread, at the end of its restart).
    Done,
}

/// A recreated thread that could not take its credentials (it ends, the restart fails with this).
static CREDS_FAILED: crate::global::Global<Option<(i32, crate::creds::Failed)>> = crate::global::Global::new(None);
static CREDS_FAILED_FLAG: AtomicU32 = AtomicU32::new(0);

impl KernelState {
    fn of(t: &ThreadImage, slot: usize, creds: Privilege) -> KernelState {
        let mut comm = [0u8; 16];
        let n = t.comm.len().min(15);
        comm[..n].copy_from_slice(&t.comm.as_bytes()[..n]);
        KernelState {
            robust: t.robust_list as usize,
            robust_len: t.robust_len as usize,
            rseq: t.rseq,
            comm,
            clear_child_tid: t.clear_child_tid as usize,
            park_rsp: t.park_rsp as usize,
            slot,
            cpu_ns: t.cpu_ns,
            creds,
        }
    }

    /// Take the thread's credentials; a recreated thread that cannot leaves its failure for `recreate` and ends.
    fn take_credentials(&self) {
        match self.creds {
            Privilege::Caps(c) => {
                if crate::process::set_caps(&c).is_err() {
                    // Never run the app with more privilege than it had.
                    sys::exit_group(126);
                }
            }
            // SAFETY: the credentials stay allocated until `recreate` returns, after every thread took them.
            Privilege::Creds(c) => match crate::creds::apply(unsafe { &*c }, None) {
                Ok(()) => {}
                Err(e) => {
                    if CREDS_FAILED_FLAG.swap(1, Ordering::AcqRel) == 0 {
                        // SAFETY: only the first failing thread writes it (the flag), and `recreate` reads it after.
                        unsafe { *CREDS_FAILED.get() = Some((sys::gettid(), e)) };
                    }
                    ON_STACK.fetch_add(1, Ordering::AcqRel);
                    let _ = sys::futex_wake(&ON_STACK, 1);
                    sys::exit_thread(0)
                }
            },
            Privilege::Done => {}
        }
    }

    fn apply(&self) {
        if self.robust != 0 {
            let _ = sys::set_robust_list(self.robust, self.robust_len);
        }
        if let Some(r) = self.rseq {
            let _ = sys::rseq(r.area as usize, r.len, 0, r.sig);
        }
        let _ = sys::prctl(libc::PR_SET_NAME, self.comm.as_ptr() as usize, 0, 0, 0);
        crate::timers::set_thread_offset(self.cpu_ns);
        self.take_credentials();
    }
}

extern "C" fn reborn(arg: usize) -> ! {
    // SAFETY: arg is the KernelState the restart code allocated for this thread; it stays allocated until the
    // thread is on its own stack.
    let k = unsafe { *(arg as *const KernelState) };
    k.apply();
    // SAFETY: park_rsp is the frame this thread saved when it parked; its stack is restored and unused.
    unsafe { sys::resume_and_call(k.park_rsp, reborn_on_stack, k.slot) }
}

extern "C" fn reborn_on_stack(i: usize) {
    ON_STACK.fetch_add(1, Ordering::AcqRel);
    let _ = sys::futex_wake(&ON_STACK, 1);
    wait_release(slot(i).release_at.load(Ordering::Acquire));
}

/// Recreate every thread except the main one (the caller is the process's first thread, tid = pid); each
/// waits, parked again, for `release_all`. Returns when all are on their own stacks.
pub fn recreate(threads: &[ThreadImage], creds: Privilege) -> Result<(), String> {
    let pid = sys::getpid();
    ON_STACK.store(0, Ordering::Release);
    CREDS_FAILED_FLAG.store(0, Ordering::Release);
    let mut n = 0;
    for t in threads.iter().filter(|t| t.tid != pid) {
        let i = slot_of(t.tid).ok_or_else(|| format!("thread {}: no parked frame in the image", t.tid))?;
        const SCRATCH: usize = 32 << 10;
        let stack = alloc::vec![0u8; SCRATCH].leak();
        let k = alloc::boxed::Box::leak(alloc::boxed::Box::new(KernelState::of(t, i, creds)));
        let tid = t.tid as u64;
        let args = sys::CloneArgs {
            flags: sys::THREAD_FLAGS,
            child_tid: t.clear_child_tid,
            stack: stack.as_mut_ptr() as u64,
            stack_size: SCRATCH as u64,
            tls: t.fs_base,
            set_tid: &tid as *const u64 as u64,
            set_tid_size: 1,
            ..Default::default()
        };
        // SAFETY: the stack and KernelState stay allocated until ON_STACK shows the thread left them.
        unsafe { sys::clone3_thread(&args, reborn, k as *const KernelState as usize) }
            .map_err(|e| format!("recreating thread {}: clone3: {e}", t.tid))?;
        n += 1;
    }
    let start = sys::now_ns(libc::CLOCK_MONOTONIC);
    loop {
        let seen = ON_STACK.load(Ordering::Acquire);
        if seen == n {
            if CREDS_FAILED_FLAG.load(Ordering::Acquire) != 0 {
                // SAFETY: written once by the failing thread before it counted itself on ON_STACK.
                if let Some((tid, e)) = unsafe { *CREDS_FAILED.get() } {
                    return Err(format!("thread {tid}: {e}"));
                }
            }
            return Ok(());
        }
        if sys::now_ns(libc::CLOCK_MONOTONIC) - start > 10_000_000_000 {
            return Err(format!("only {seen} of {n} recreated threads started"));
        }
        let _ = sys::futex_wait(&ON_STACK, seen, Some(10_000_000));
    }
}

/// The main thread's state, to be carried past the end of the restart session.
pub fn main_state(main: &ThreadImage, creds: Privilege) -> Result<KernelState, String> {
    let i = slot_of(main.tid).ok_or_else(|| format!("main thread {}: no parked frame in the image", main.tid))?;
    Ok(KernelState::of(main, i, creds))
}

/// Become the main thread again: its kernel state, then its saved frame.
pub fn resume_main(k: KernelState) -> ! {
    let _ = sys::set_tid_address(k.clear_child_tid);
    k.apply();
    // SAFETY: the main thread's saved frame, intact in the restored stack.
    unsafe { sys::resume_and_call(k.park_rsp, main_on_stack, k.slot) }
}

extern "C" fn main_on_stack(i: usize) {
    wait_release(slot(i).release_at.load(Ordering::Acquire));
}
