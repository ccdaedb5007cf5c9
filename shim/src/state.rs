//! The shim's large state: one mapping, made by the constructor, that holds the thread table (a slot per thread
//! for the park handshake, `threads`), the coordinator's stack (`checkpoint`) and the restart code's stack
//! (`restart`).
//!
//! It lives in a mapping of its own, not in the library's bss. A library over 2 MiB is mapped 2 MiB-aligned by the
//! kernel, which leaves a hole above it; a small mapping of the app lands there, right above the shim's bss, and a
//! stack the app grows down there (MAP_GROWSDOWN) meets that bss within the kernel's stack guard gap and faults. A
//! mapping whose length is not a multiple of 2 MiB goes at the top of a free range: it leaves no hole above it.

use core::sync::atomic::{AtomicI32, AtomicU32, AtomicUsize, Ordering};
use vos::sys::SigInfo;

// ---- the thread table --------------------------------------------------------------------------------------------

pub const MAX_THREADS: usize = 2048;
const MAX_PENDING: usize = 16;

/// A slot's `state`.
pub const FREE: u32 = 0;
pub const ASKED: u32 = 1;
pub const PARKED: u32 = 2;

/// What a parked thread leaves for the coordinator and for its own resumption.
#[repr(C)]
pub struct Slot {
    pub tid: AtomicI32,
    pub state: AtomicU32,
    /// RELEASE's value when the thread parked; it waits until RELEASE moves on.
    pub release_at: AtomicU32,
    pub park_rsp: usize,
    pub fs_base: usize,
    pub uc: usize,
    pub clear_child_tid: usize,
    pub robust: usize,
    pub robust_len: usize,
    pub cpu_ns: u64,
    /// The thread's securebits: only the thread itself can read them (the kernel shows them nowhere else).
    pub securebits: u32,
    pub npending: usize,
    pub pending: [SigInfo; MAX_PENDING],
}

/// Slot i belongs to the thread the coordinator asked with index i; only that thread writes its fields
/// (other than tid/state, set by the coordinator before asking). The table is the state mapping's first part
/// (`THREAD_TABLE`; all zeros is every slot empty).
pub const TABLE_BYTES: usize = MAX_THREADS * core::mem::size_of::<Slot>();

/// Slot `i` of the thread table (mapped: callers check `addr(THREAD_TABLE)` before any use).
pub fn slot(i: usize) -> &'static mut Slot {
    let table = addr(THREAD_TABLE).expect("the thread table is mapped (checked before any use)");
    // SAFETY: the table holds MAX_THREADS slots (i < MAX_THREADS at every caller), zeroed by mmap (all zeros is a
    // FREE slot, a valid Slot); slots are partitioned by index between the coordinator (before asking) and the
    // owning thread.
    unsafe { &mut *(table as *mut Slot).add(i) }
}

// ---- the mapping -------------------------------------------------------------------------------------------------

/// The mapping's address (0: not mapped).
static STATE: AtomicUsize = AtomicUsize::new(0);

/// The parts of the state mapping: (offset, length).
pub const THREAD_TABLE: (usize, usize) = (0, page_up(TABLE_BYTES));
pub const COORDINATOR_STACK: (usize, usize) = (THREAD_TABLE.0 + THREAD_TABLE.1, 1 << 20);
pub const RESTART_STACK: (usize, usize) = (COORDINATOR_STACK.0 + COORDINATOR_STACK.1, 256 << 10);
const STATE_LEN: usize = no_huge_multiple(RESTART_STACK.0 + RESTART_STACK.1);

const fn page_up(n: usize) -> usize {
    (n + 4095) & !4095
}

/// `n`, or a page more when it is a multiple of 2 MiB (the kernel aligns such anonymous mappings, leaving a hole).
pub const fn no_huge_multiple(n: usize) -> usize {
    if n.is_multiple_of(2 << 20) { n + 4096 } else { n }
}

/// Make the state mapping (constructor; zeroed memory is every part's initial state).
pub fn map() {
    // SAFETY: a fresh private anonymous mapping at an address the kernel picks.
    match unsafe {
        vos::sys::mmap(0, STATE_LEN, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0)
    } {
        Ok(a) => STATE.store(a, Ordering::Release),
        Err(e) => crate::log::line(format_args!("cannot map the shim's state ({e}): checkpoints will fail")),
    }
}

/// The address of a part of the state mapping (`THREAD_TABLE`...), or None when the constructor could not map it.
pub fn addr(part: (usize, usize)) -> Option<usize> {
    match STATE.load(Ordering::Acquire) {
        0 => None,
        a => Some(a + part.0),
    }
}
