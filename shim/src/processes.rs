//! Processes: every process the job starts stays in the job and keeps the shim.
//!
//! A fork keeps the shim (the child is a copy). An exec keeps it only if LD_PRELOAD and the shim's settings
//! are in the new environment, so every exec function (and system, popen, posix_spawn, which exec internally)
//! puts them back, even when the program cleared its environment. The supervisor's socket is the current one
//! (after a restore, not the one the environment remembers). vfork runs as fork: a vfork child shares its
//! parent's memory and would keep it from being checkpointed until it execs.

use crate::global::CONFIG;
use crate::{arena, real};
use alloc::ffi::CString;
use alloc::string::String;
use alloc::vec::Vec;
use core::arch::naked_asm;
use libc::{c_char, c_int};

/// The job's settings every exec'd program must see.
fn job_env() -> Vec<(&'static str, String)> {
    // SAFETY: CONFIG is written only before other shim code runs (constructor, restart).
    let c = unsafe { CONFIG.get() };
    let sigs = alloc::format!(
        "{},{}",
        crate::global::SIG_CHECKPOINT.load(core::sync::atomic::Ordering::Relaxed),
        crate::global::SIG_CHECKPOINT_EXIT.load(core::sync::atomic::Ordering::Relaxed)
    );
    alloc::vec![(vos::env::SOCK, c.sock.clone()), (vos::env::LOG, c.log.clone()), (vos::env::SIGNALS, sigs), (vos::env::SHIM, c.shim.clone())]
}

/// `envp` with the job's settings in it and the shim first in LD_PRELOAD. The new array and strings are never
/// freed: exec either replaces the process or fails, and a failed exec is rare.
///
/// # Safety
/// `envp` is a NULL-terminated array of C strings, or NULL.
unsafe fn with_job_env(envp: *const *const c_char) -> *const *const c_char {
    arena::permanent(|| {
        // SAFETY: CONFIG is written only before other shim code runs.
        let shim = unsafe { CONFIG.get().shim.clone() };
        let ours = job_env();
        let mut out: Vec<*const c_char> = Vec::new();
        let mut preload: Option<String> = None;
        let mut i = 0;
        while !envp.is_null() {
            // SAFETY: per contract, the array ends with NULL.
            let e = unsafe { *envp.add(i) };
            if e.is_null() {
                break;
            }
            i += 1;
            // SAFETY: a C string per contract.
            let s = unsafe { core::ffi::CStr::from_ptr(e) }.to_string_lossy();
            // An entry may lack its '=' (the app passes what it likes): it is a key without a value.
            let (key, value) = s.split_once('=').unwrap_or((&s, ""));
            if key == "LD_PRELOAD" {
                preload = Some(value.into());
            } else if !ours.iter().any(|(k, _)| *k == key) {
                out.push(e);
            }
        }
        let rest: Vec<&str> = preload.as_deref().unwrap_or("").split([':', ' ']).filter(|p| !p.is_empty() && *p != shim).collect();
        let mut pre = shim.clone();
        for r in rest {
            pre.push(':');
            pre.push_str(r);
        }
        let mut add = |k: &str, v: &str| {
            if let Ok(c) = CString::new(alloc::format!("{k}={v}")) {
                out.push(c.into_raw());
            }
        };
        if !shim.is_empty() {
            add("LD_PRELOAD", &pre);
        }
        for (k, v) in &ours {
            if !v.is_empty() {
                add(k, v);
            }
        }
        out.push(core::ptr::null());
        out.leak().as_ptr()
    })
}

unsafe extern "C" {
    static mut environ: *const *const c_char;
    fn vos_c_execl();
    fn vos_c_execlp();
    fn vos_c_execle();
}

/// Make `environ` carry the job's settings (for functions that exec with it implicitly).
fn fix_environ() {
    // SAFETY: environ is the process's environment array; the app's own thread is the one about to exec.
    unsafe { environ = with_job_env(environ) };
}

/// execve(2) with the job's settings.
///
/// # Safety
/// As execve(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execve(path: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
    // SAFETY: forwarded with an environment that keeps the shim.
    crate::signals::around_exec(|| unsafe { real::execve()(path, argv, with_job_env(envp)) })
}

/// Called by the C execl/execle.
///
/// # Safety
/// As execve(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vos_execve(path: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
    // SAFETY: as execve.
    unsafe { execve(path, argv, envp) }
}

/// execv(3).
///
/// # Safety
/// As execv(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execv(path: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: as execve, with the current environment.
    unsafe { execve(path, argv, environ) }
}

/// execvpe(3).
///
/// # Safety
/// As execvpe(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execvpe(file: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
    // SAFETY: forwarded with an environment that keeps the shim.
    crate::signals::around_exec(|| unsafe { real::execvpe()(file, argv, with_job_env(envp)) })
}

/// Called by the C execlp.
///
/// # Safety
/// As execvpe(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vos_execvpe(file: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
    // SAFETY: as execvpe.
    unsafe { execvpe(file, argv, envp) }
}

/// execvp(3).
///
/// # Safety
/// As execvp(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: as execvpe, with the current environment.
    unsafe { execvpe(file, argv, environ) }
}

/// fexecve(3).
///
/// # Safety
/// As fexecve(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fexecve(fd: c_int, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
    // SAFETY: forwarded with an environment that keeps the shim.
    crate::signals::around_exec(|| unsafe { real::fexecve()(fd, argv, with_job_env(envp)) })
}

/// execveat(2).
///
/// # Safety
/// As execveat(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execveat(dirfd: c_int, path: *const c_char, argv: *const *const c_char, envp: *const *const c_char, flags: c_int) -> c_int {
    // SAFETY: forwarded with an environment that keeps the shim.
    crate::signals::around_exec(|| unsafe { real::execveat()(dirfd, path, argv, with_job_env(envp), flags) })
}

/// posix_spawn(3).
///
/// # Safety
/// As posix_spawn(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_spawn(
    pid: *mut libc::pid_t,
    path: *const c_char,
    fa: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    // SAFETY: forwarded with an environment that keeps the shim.
    crate::signals::around_exec(|| unsafe { real::posix_spawn()(pid, path, fa, attr, argv, with_job_env(envp)) })
}

/// posix_spawnp(3).
///
/// # Safety
/// As posix_spawnp(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_spawnp(
    pid: *mut libc::pid_t,
    file: *const c_char,
    fa: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    // SAFETY: forwarded with an environment that keeps the shim.
    crate::signals::around_exec(|| unsafe { real::posix_spawnp()(pid, file, fa, attr, argv, with_job_env(envp)) })
}

/// system(3): runs the shell with `environ`.
///
/// # Safety
/// As system(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn system(cmd: *const c_char) -> c_int {
    fix_environ();
    // SAFETY: forwarded.
    unsafe { real::system()(cmd) }
}

/// popen(3): runs the shell with `environ`.
///
/// # Safety
/// As popen(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn popen(cmd: *const c_char, mode: *const c_char) -> *mut libc::FILE {
    fix_environ();
    // SAFETY: forwarded.
    crate::signals::around_exec(|| unsafe { real::popen()(cmd, mode) })
}

/// vfork(2), run as fork(2).
///
/// # Safety
/// As fork(2); callers written for vfork only do less.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfork() -> libc::pid_t {
    // SAFETY: fork has no preconditions.
    unsafe { real::fork()() }
}

// execl, execlp and execle are C-variadic: naked trampolines keep the caller's registers and stack exactly as
// they are for the C implementations in c/execl.c.

/// execl(3).
///
/// # Safety
/// As execl(3).
#[unsafe(no_mangle)]
#[unsafe(naked)]
pub unsafe extern "C" fn execl() {
    naked_asm!("jmp {}", sym vos_c_execl)
}

/// execlp(3).
///
/// # Safety
/// As execlp(3).
#[unsafe(no_mangle)]
#[unsafe(naked)]
pub unsafe extern "C" fn execlp() {
    naked_asm!("jmp {}", sym vos_c_execlp)
}

/// execle(3).
///
/// # Safety
/// As execle(3).
#[unsafe(no_mangle)]
#[unsafe(naked)]
pub unsafe extern "C" fn execle() {
    naked_asm!("jmp {}", sym vos_c_execle)
}
