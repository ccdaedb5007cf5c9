//! Process-wide state of the shim: configuration from the launcher and a few flags.

use alloc::string::String;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use vos::signals;

/// A value shared between the shim's threads whose access is serialized by the shim's own protocol (written at
/// start-up or by the single coordinator while app threads are parked).
pub struct Global<T>(UnsafeCell<T>);

// SAFETY: every use documents why no two threads touch the value at once.
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    pub const fn new(v: T) -> Global<T> {
        Global(UnsafeCell::new(v))
    }
    /// # Safety
    /// No other thread may access the value for the lifetime of the reference.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get(&self) -> &mut T {
        // SAFETY: forwarded contract.
        unsafe { &mut *self.0.get() }
    }
}

/// Set once the constructor has run.
pub static READY: AtomicBool = AtomicBool::new(false);
pub static WINDOW_RESERVED: AtomicBool = AtomicBool::new(false);
/// The signal that asks for a checkpoint, and the one that asks for checkpoint-and-exit.
pub static SIG_CHECKPOINT: AtomicI32 = AtomicI32::new(signals::CHECKPOINT);
pub static SIG_CHECKPOINT_EXIT: AtomicI32 = AtomicI32::new(signals::CHECKPOINT_EXIT);

pub struct Config {
    /// The supervisor's abstract socket name.
    pub sock: String,
    /// The job's log file (the shim's messages never go to the app's fds).
    pub log: String,
    /// The shim's own path (put back into LD_PRELOAD at every exec).
    pub shim: String,
}

/// Written by the constructor and by the restart code, each before any other shim code runs in the process.
pub static CONFIG: Global<Config> = Global::new(Config { sock: String::new(), log: String::new(), shim: String::new() });

/// Read the launcher's settings from the environment (constructor only: getenv is fine there).
pub fn load_config() {
    let get = |k: &str| std::env::var(k).unwrap_or_default();
    // SAFETY: the constructor runs before any other shim code.
    let c = unsafe { CONFIG.get() };
    c.sock = get(vos::env::SOCK);
    c.log = get(vos::env::LOG);
    c.shim = get(vos::env::SHIM);
    let sigs = get(vos::env::SIGNALS);
    let mut it = sigs.split(',').filter_map(|s| s.trim().parse::<i32>().ok());
    if let (Some(a), Some(b)) = (it.next(), it.next()) {
        SIG_CHECKPOINT.store(a, core::sync::atomic::Ordering::Relaxed);
        SIG_CHECKPOINT_EXIT.store(b, core::sync::atomic::Ordering::Relaxed);
    }
}

pub fn is_vos_signal(sig: i32) -> bool {
    sig == SIG_CHECKPOINT.load(core::sync::atomic::Ordering::Relaxed)
        || sig == SIG_CHECKPOINT_EXIT.load(core::sync::atomic::Ordering::Relaxed)
}

/// The mask bits of the shim's signals.
pub fn vos_sigmask() -> u64 {
    vos::sys::sigbit(SIG_CHECKPOINT.load(core::sync::atomic::Ordering::Relaxed))
        | vos::sys::sigbit(SIG_CHECKPOINT_EXIT.load(core::sync::atomic::Ordering::Relaxed))
}

// ---- the shim's large state ----------------------------------------------------------------------------------

/// The shim's large state (the thread table, the coordinator's and the restart code's stacks) lives in one mapping
/// the constructor makes, not in the library's bss. A library over 2 MiB is mapped 2 MiB-aligned by the kernel,
/// which leaves a hole above it; a small mapping of the app lands there, right above the shim's bss, and a stack the
/// app grows down there (MAP_GROWSDOWN) meets that bss within the kernel's stack guard gap and faults. A mapping
/// whose length is not a multiple of 2 MiB goes at the top of a free range: it leaves no hole above it.
static STATE: AtomicUsize = AtomicUsize::new(0);

/// The parts of the state mapping: (offset, length).
pub const THREAD_TABLE: (usize, usize) = (0, page_up(crate::threads::TABLE_BYTES));
pub const COORDINATOR_STACK: (usize, usize) = (THREAD_TABLE.0 + THREAD_TABLE.1, 1 << 20);
pub const RESTART_STACK: (usize, usize) = (COORDINATOR_STACK.0 + COORDINATOR_STACK.1, 256 << 10);
const STATE_LEN: usize = no_huge_multiple(RESTART_STACK.0 + RESTART_STACK.1);

const fn page_up(n: usize) -> usize {
    (n + 4095) & !4095
}

/// `n`, or a page more when it is a multiple of 2 MiB (the kernel aligns such anonymous mappings, leaving a hole).
pub const fn no_huge_multiple(n: usize) -> usize {
    if n % (2 << 20) == 0 { n + 4096 } else { n }
}

/// Make the state mapping (constructor; zeroed memory is every part's initial state).
pub fn map_state() {
    // SAFETY: a fresh private anonymous mapping at an address the kernel picks.
    match unsafe {
        vos::sys::mmap(0, STATE_LEN, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0)
    } {
        Ok(a) => STATE.store(a, Ordering::Release),
        Err(e) => crate::log::line(format_args!("cannot map the shim's state ({e}): checkpoints will fail")),
    }
}

/// The address of a part of the state mapping (`THREAD_TABLE`...), or None when the constructor could not map it.
pub fn state(part: (usize, usize)) -> Option<usize> {
    match STATE.load(Ordering::Acquire) {
        0 => None,
        a => Some(a + part.0),
    }
}
