//! Shared by every part of vOS: raw syscalls (`sys`), the image framing (`chunk`) and the restorer's plan
//! (`plan`) are freestanding, for the restorer; the image metadata (`image`) and the control protocol (`proto`)
//! need an allocator (feature `std`).
#![no_std]

#[cfg(feature = "std")]
extern crate alloc;

pub mod chunk;
pub mod pagemap;
pub mod hashring;
pub mod plan;
pub mod sys;

#[cfg(feature = "std")]
pub mod image;
#[cfg(feature = "std")]
pub mod proto;
#[cfg(feature = "std")]
pub mod validate;
#[cfg(feature = "std")]
pub mod seccomp;

/// Signal numbers vOS takes for itself by default (the app's use of them is virtualized by the shim).
pub mod signals {
    /// SIGRTMAX-1: checkpoint and go on.
    pub const CHECKPOINT: i32 = 63;
    /// SIGRTMAX-2: checkpoint and exit.
    pub const CHECKPOINT_EXIT: i32 = 62;
    /// si_value magic the shim's coordinator puts on the signals that park threads.
    pub const PARK_MAGIC: u64 = 0x766f_735f_7061_726b;
    /// si_value the job's supervisor puts on the trigger signal it sends (sigqueue), so a shim tells a checkpoint
    /// its supervisor runs from a trigger someone else sent (`kill -s RTMAX-1`).
    pub const SUPERVISOR_MAGIC: u64 = 0x766f_735f_7375_7076;
}

/// Environment variables the launcher gives the shim.
pub mod env {
    /// Abstract socket name of the job's supervisor.
    pub const SOCK: &str = "VOS_SOCK";
    /// "SIG_CHECKPOINT,SIG_CHECKPOINT_EXIT" when changed from the defaults.
    pub const SIGNALS: &str = "VOS_SIGNALS";
    /// Path of the shim itself (re-injected into exec'd programs).
    pub const SHIM: &str = "VOS_SHIM";
    /// The job's log file, where the shim writes what it cannot tell the supervisor.
    pub const LOG: &str = "VOS_LOG";
}
