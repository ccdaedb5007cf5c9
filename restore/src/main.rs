//! vos-restore: the freestanding first stage of a restore.
//!
//! The launcher's init starts this program (static, no libc, linked inside `plan::WINDOW_*`, a range the shim
//! keeps reserved in every job) as each top-level process of the job, with the job's plan on an fd. Each makes
//! its children with their original pids (`tree`), so the whole process tree exists with its sessions and
//! groups; then each clears every mapping outside its window, rebuilds its image's address space at the
//! original addresses from the plan and its page chunks (verifying every checksum; processes take turns on the
//! stream), puts the vDSO and the kernel's mm fields back, and jumps into the shim's restart code, which rebuilds
//! fds, signals and threads. Nothing of the app runs before the launcher says go.
#![no_std]
#![no_main]

// The freestanding parts of vos-common, compiled in directly: as a dependency, Cargo would unify its features
// with the std-using crates of the workspace and link std into this binary.
#[path = "../../common/src/chunk.rs"]
#[allow(dead_code)]
mod chunk;
#[path = "../../common/src/hashring.rs"]
#[allow(dead_code)]
mod hashring;
#[path = "../../common/src/plan.rs"]
#[allow(dead_code)]
mod plan;
#[path = "../../common/src/sys.rs"]
#[allow(dead_code, unused_imports)]
mod sys;

mod memory;
mod out;
mod tree;

use core::sync::atomic::Ordering;
use out::{Msg, fail};
use plan::{JobPlanHead, MapOp, PlanHead, ProcEntry};

const STACK_SIZE: usize = 256 << 10;

#[repr(C, align(16))]
struct Aligned<const N: usize>([u8; N]);

static mut STACK: Aligned<STACK_SIZE> = Aligned([0; STACK_SIZE]);

unsafe extern "C" {
    /// The linker's end of this program's memory (bss included).
    static _end: u8;
}

freestanding_start!(STACK, STACK_SIZE, rmain);

fn report(status: u32, next_seq: u64, pages: u64, text: &str) {
    let lazy_runs = if status == plan::REPORT_OK { memory::lazy_runs() as u32 } else { 0 };
    if let Some(ctl) = out::report(status, next_seq, pages, lazy_runs, text)
        && lazy_runs > 0
    {
        memory::hand_over_lazy(ctl);
    }
}

extern "C" fn rmain(sp: *const usize) -> ! {
    // Nothing may interrupt us: the app's handlers are not in place yet.
    sys::sigprocmask(libc::SIG_SETMASK, Some(!0));
    // SAFETY: the kernel put argc, then argv pointers, at the initial stack pointer.
    let (plan_fd, index) = unsafe {
        let argc = *sp;
        if argc < 3 {
            fail(&Msg::new("vos-restore: usage: vos-restore PLAN_FD INDEX (started by vrun restore only)"));
        }
        (parse_num(*(sp.add(2)) as *const u8), parse_num(*(sp.add(3)) as *const u8) as usize)
    };
    let buf = map_plan(plan_fd);
    let len = buf.len();
    if len < core::mem::size_of::<JobPlanHead>() {
        fail(&Msg::new("vos-restore: plan too short"));
    }
    // SAFETY: length checked; plain data; read_unaligned copies.
    let head: JobPlanHead = unsafe { core::ptr::read_unaligned(buf.as_ptr() as *const JobPlanHead) };
    if head.magic != plan::JOB_PLAN_MAGIC || head.total_len as usize != len {
        fail(&Msg::new("vos-restore: bad plan"));
    }
    let end = (head.procs_off as usize).checked_add(head.nproc as usize * core::mem::size_of::<ProcEntry>());
    if end.is_none_or(|e| e > len) || index >= head.nproc as usize || (head.sync_off as usize).checked_add(4096).is_none_or(|e| e > len) || !head.procs_off.is_multiple_of(8) {
        fail(&Msg::new("vos-restore: plan out of bounds"));
    }
    // The counters every restorer of the job shares.
    // SAFETY: a shared mapping of the plan's sync page at a fixed address in our own window.
    if unsafe { sys::mmap(plan::SYNC_ADDR as usize, 4096, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED | libc::MAP_FIXED, plan_fd, head.sync_off) }.is_err() {
        fail(&Msg::new("vos-restore: cannot map the plan's sync page"));
    }
    PROCS.store(head.procs_off as usize, Ordering::Relaxed);
    NPROCS.store(head.nproc as usize, Ordering::Relaxed);
    tree::become_process(buf, &head, index, restore_process)
}

/// Where the job's process entries are in the plan.
static PROCS: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);
static NPROCS: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// Restore the address space of the process described by `entry`, then hand over to the shim's restart code.
fn restore_process(buf: &[u8], entry: &ProcEntry) -> ! {
    let off = entry.plan_off as usize;
    if off.checked_add(core::mem::size_of::<PlanHead>()).is_none_or(|e| e > buf.len()) {
        fail(&Msg::new("vos-restore: plan out of bounds"));
    }
    // SAFETY: bounds checked; plain data; read_unaligned copies.
    let head: PlanHead = unsafe { core::ptr::read_unaligned(buf.as_ptr().add(off) as *const PlanHead) };
    if head.magic != plan::PLAN_MAGIC {
        fail(&Msg::new("vos-restore: bad process plan"));
    }
    out::set_ctl(head.ctl_fd);
    let ops_len = head.nmaps as u64 * core::mem::size_of::<MapOp>() as u64;
    let within = |off: u64, len: u64| off.checked_add(len).is_some_and(|e| e <= buf.len() as u64);
    if !within(head.ops_off, ops_len) || !within(head.blob_off, head.blob_len) || !within(head.auxv_off, head.auxv_len) || !head.ops_off.is_multiple_of(8)
        || !within(head.guards_off, head.nguards.saturating_mul(16)) || !head.guards_off.is_multiple_of(8)
    {
        fail(&Msg::new("vos-restore: plan out of bounds"));
    }
    // SAFETY: bounds and alignment checked; MapOp is plain data and the plan is mapped page-aligned.
    let ops: &[MapOp] = unsafe { core::slice::from_raw_parts(buf.as_ptr().add(head.ops_off as usize) as *const MapOp, head.nmaps as usize) };

    memory::check_regions(ops);
    memory::make_self_anonymous();
    memory::clear_address_space();
    memory::map_regions(ops, buf);
    let first_seq = tree::wait_turn(entry.order, head.first_seq);
    let (next_seq, pages) = memory::read_pages(head.image_fd, first_seq, ops, head.base_fd);
    tree::pass_turn(next_seq);
    memory::protect_regions(ops);
    // SAFETY: bounds and alignment checked above; pairs of u64 are plain data and PLAN is 16-aligned.
    let guards: &[[u64; 2]] = unsafe { core::slice::from_raw_parts(buf.as_ptr().add(head.guards_off as usize) as *const [u64; 2], head.nguards as usize) };
    memory::install_guards(guards);
    if head.vdso_addr != 0 {
        memory::map_vdso(head.vdso_addr, head.vdso_text);
    }
    let mut mm = head.mm;
    mm.auxv = buf.as_ptr() as u64 + head.auxv_off;
    mm.auxv_size = head.auxv_len as u32;
    memory::set_mm(&mut mm);

    tree::await_zombie_children(buf, (PROCS.load(Ordering::Relaxed), NPROCS.load(Ordering::Relaxed)), entry.pid);
    report(plan::REPORT_OK, next_seq, pages, "");
    let blob = buf.as_ptr() as usize + head.blob_off as usize;
    // SAFETY: the shim is mapped back at the address recorded at checkpoint; restart_entry is its
    // `extern "C" fn(blob, len, ctl) -> !` and restart_stack_top the top of its dedicated restart stack.
    unsafe { sys::jump(head.restart_entry as usize, head.restart_stack_top as usize, blob, head.blob_len as usize, head.ctl_fd as usize) }
}

fn parse_num(mut p: *const u8) -> i32 {
    let mut v: i32 = 0;
    // SAFETY: argv strings are NUL-terminated.
    unsafe {
        while *p != 0 {
            if !(*p).is_ascii_digit() {
                fail(&Msg::new("vos-restore: bad number argument"));
            }
            v = v * 10 + (*p - b'0') as i32;
            p = p.add(1);
        }
    }
    v
}

/// Map the whole plan at `plan::PLAN_ADDR`, privately (a forked child gets its own copy): its size is the
/// plan's, up to the room left in the window. Its blob stays there until the shim has copied it.
fn map_plan(fd: i32) -> &'static [u8] {
    // SAFETY: only the address of the linker symbol is taken.
    let end = core::ptr::addr_of!(_end) as u64;
    if end > plan::PLAN_ADDR {
        fail(&Msg::new("vos-restore: the restorer overlaps its plan's place (built wrong)"));
    }
    let len = match sys::fstat(fd) {
        Ok(st) if st.st_size > 0 && st.st_size as u64 <= plan::MAX_PLAN as u64 => st.st_size as usize,
        Ok(_) => fail(&Msg::new("vos-restore: the plan is empty or too large")),
        Err(e) => fail(Msg::new("vos-restore: the plan: ").errno(e)),
    };
    let flags = libc::MAP_PRIVATE | libc::MAP_FIXED_NOREPLACE;
    // SAFETY: a fresh private mapping of the plan in our own window, where nothing else lies (checked above).
    match unsafe { sys::mmap(plan::PLAN_ADDR as usize, len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, 0) } {
        // SAFETY: `len` readable bytes were just mapped there; they stay mapped until the window is given back.
        Ok(a) if a as u64 == plan::PLAN_ADDR => unsafe { core::slice::from_raw_parts(a as *const u8, len) },
        Ok(_) => fail(&Msg::new("vos-restore: the plan landed elsewhere")),
        Err(e) => fail(Msg::new("vos-restore: mapping the plan: ").errno(e)),
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    fail(&Msg::new("vos-restore: internal error (panic)"))
}

/// The precompiled libcore refers to the unwinder's personality routine; with panic=abort it is never called.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

// The freestanding binary needs its own memory primitives; `rep movsb/stosb` is fast on every CPU with ERMS.

/// # Safety
/// `s` must be readable and `d` writable for `n` bytes. The copy goes forward a byte at a time, so the ranges may
/// overlap when `d` does not start inside `s` (`memmove` relies on this); C's memcpy asks for no overlap at all.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the ranges (see above); `rep movsb` touches exactly those n bytes of each.
    unsafe { core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") d => _, inout("rsi") s => _, options(nostack)) };
    d
}
/// # Safety
/// `s` must be readable and `d` writable for `n` bytes; they may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if (d as usize) <= (s as usize) || (d as usize) >= (s as usize) + n {
        // SAFETY: the caller's ranges; a forward copy is right when the destination does not start inside the
        // source, which is memcpy's contract.
        return unsafe { memcpy(d, s, n) };
    }
    let mut i = n;
    while i > 0 {
        i -= 1;
        // SAFETY: within the caller's ranges.
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i))) };
    }
    d
}
/// # Safety
/// `d` must be writable for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees a valid range.
    unsafe { core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") d => _, in("al") c as u8, options(nostack)) };
    d
}
/// # Safety
/// `a` and `b` must be readable for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: within the caller's ranges.
        let (x, y) = unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}
/// # Safety
/// `a` and `b` must be readable for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the same contract as memcmp's, forwarded.
    unsafe { memcmp(a, b, n) }
}
