//! Process-wide state of the shim: configuration from the launcher, the numbers of its two signals, and a few
//! flags every part reads (the large state, thread table and stacks, is in `state`).

use alloc::string::String;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicI32};
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
    #[allow(clippy::mut_from_ref, reason = "an UnsafeCell behind an unsafe fn whose caller guarantees exclusive access")]
    pub unsafe fn get(&self) -> &mut T {
        // SAFETY: forwarded contract.
        unsafe { &mut *self.0.get() }
    }
}

/// Set once the constructor has run.
pub static READY: AtomicBool = AtomicBool::new(false);
/// The signal that asks for a checkpoint, and the one that asks for checkpoint-and-exit.
pub static SIG_CHECKPOINT: AtomicI32 = AtomicI32::new(signals::CHECKPOINT);
pub static SIG_CHECKPOINT_EXIT: AtomicI32 = AtomicI32::new(signals::CHECKPOINT_EXIT);
/// Non-zero while a coordinator (or a restart) runs: its tid, cleared by the kernel when the thread exits.
pub static COORDINATOR: AtomicI32 = AtomicI32::new(0);

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
