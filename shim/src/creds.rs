//! A restored thread becomes who it was: ids, groups, capability sets, securebits, no_new_privs and seccomp
//! filters, in the one order the kernel's rules allow.
//!
//! Every thread of a restored process runs this for itself (the kernel keeps all of it per thread), after
//! everything that needs privilege is done. It starts privileged (root, or a non-root restore's lent
//! capabilities in its user namespace) and ends with exactly the image's sets:
//!
//! 1. the inheritable set, while the bounding set still allows it;
//! 2. the bounding set drops what the thread did not have;
//! 3. groups and gids;
//! 4. uids, with SECBIT_NO_SETUID_FIXUP so the capabilities the next steps need survive the change;
//! 5. the image's capability sets plus CAP_SETPCAP and CAP_SYS_ADMIN (for securebits and filters);
//! 6. the ambient set (before securebits that may forbid raising it);
//! 7. the image's securebits, locks included; then, as the job, its working directory;
//! 8. no_new_privs; 9. the seccomp filters, oldest first (CAP_SYS_ADMIN allows them without no_new_privs, as the
//!    process may have installed them before dropping it);
//! 10. the exact capability sets: CAP_SETPCAP and CAP_SYS_ADMIN go if the thread did not have them.
//!
//! After step 9 the thread makes only calls the filters allow (the checkpoint refused filters that deny any
//! call the shim makes, `vos::seccomp::SHIM_SYSCALLS`).

use alloc::vec::Vec;
use vos::image::{CapSets, Creds};
use vos::sys::{self, Errno};

const CAP_SETPCAP: u32 = 8;
const CAP_SYS_ADMIN: u32 = 21;
const PR_CAPBSET_READ: i32 = 23;
const PR_CAPBSET_DROP: i32 = 24;
const PR_GET_SECUREBITS: i32 = 27;
const PR_SET_SECUREBITS: i32 = 28;
const PR_SET_NO_NEW_PRIVS: i32 = 38;
const PR_CAP_AMBIENT: i32 = 47;
const PR_CAP_AMBIENT_RAISE: usize = 2;
const PR_CAP_AMBIENT_CLEAR_ALL: usize = 4;
const PR_SET_SECCOMP: i32 = 22;
const SECCOMP_MODE_FILTER: usize = 2;
const SECCOMP_SET_MODE_FILTER: usize = 1;
const SECBIT_NO_SETUID_FIXUP: u32 = 1 << 2;

/// Which step failed, and how: the restart code reports it by name.
#[derive(Clone, Copy, Debug)]
pub struct Failed {
    pub step: &'static str,
    pub errno: Errno,
    /// A capability or filter number, where the step concerns one.
    pub which: i64,
}

impl core::fmt::Display for Failed {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.which >= 0 {
            write!(f, "{} {}: {}", self.step, self.which, self.errno)
        } else {
            write!(f, "{}: {}", self.step, self.errno)
        }
    }
}

fn fail(step: &'static str, errno: Errno) -> Failed {
    Failed { step, errno, which: -1 }
}

fn call(nr: i64, a: usize, b: usize, c: usize) -> Result<usize, Errno> {
    // SAFETY: every caller passes the plain integers or valid pointers its system call documents.
    let r = unsafe { sys::syscall6(nr, a, b, c, 0, 0, 0) };
    if (-4095..0).contains(&r) { Err(Errno(-r as i32)) } else { Ok(r as usize) }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

/// The calling thread's effective, permitted and inheritable sets.
fn capget() -> Result<(u64, u64, u64), Errno> {
    let h = CapHeader { version: CAP_VERSION_3, pid: 0 };
    let mut d = [CapData::default(); 2];
    call(libc::SYS_capget, &h as *const CapHeader as usize, d.as_mut_ptr() as usize, 0)?;
    let join = |lo: u32, hi: u32| lo as u64 | (hi as u64) << 32;
    Ok((join(d[0].effective, d[1].effective), join(d[0].permitted, d[1].permitted), join(d[0].inheritable, d[1].inheritable)))
}

/// Set the calling thread's effective, permitted and inheritable sets.
pub fn capset(effective: u64, permitted: u64, inheritable: u64) -> Result<(), Errno> {
    let h = CapHeader { version: CAP_VERSION_3, pid: 0 };
    let lo = |v: u64| v as u32;
    let hi = |v: u64| (v >> 32) as u32;
    let d = [
        CapData { effective: lo(effective), permitted: lo(permitted), inheritable: lo(inheritable) },
        CapData { effective: hi(effective), permitted: hi(permitted), inheritable: hi(inheritable) },
    ];
    call(libc::SYS_capset, &h as *const CapHeader as usize, d.as_ptr() as usize, 0).map(|_| ())
}

fn prctl(op: i32, a: usize) -> Result<usize, Errno> {
    sys::prctl(op, a, 0, 0, 0)
}

/// Whether the calling thread's supplementary groups are `want`, in the kernel's order.
fn groups_are(want: &[u32]) -> bool {
    let Ok(n) = call(libc::SYS_getgroups, 0, 0, 0) else { return false };
    if n != want.len() {
        return false;
    }
    let mut have: Vec<u32> = alloc::vec![0; n];
    call(libc::SYS_getgroups, n, have.as_mut_ptr() as usize, 0).is_ok_and(|m| m == n && have == want)
}

/// setfsuid/setfsgid report the old id, never an error: ask again with an invalid id to learn the current one.
fn set_fs_id(nr: i64, id: u32, step: &'static str) -> Result<(), Failed> {
    let _ = call(nr, id as usize, 0, 0);
    match call(nr, u32::MAX as usize, 0, 0) {
        Ok(now) if now as u32 == id => Ok(()),
        _ => Err(fail(step, Errno(libc::EPERM))),
    }
}

/// Make the calling thread what `t` says (see the module's documentation). `cwd`: enter it as the job, once its
/// ids are in place (the main thread, when the image asks for it so).
pub fn apply(t: &Creds, cwd: Option<&[u8]>) -> Result<(), Failed> {
    let c: &CapSets = &t.caps;
    let (eff, prm, _) = capget().map_err(|e| fail("reading the capability sets", e))?;
    // 1. The inheritable set may hold capabilities outside the bounding set only if they are set first.
    capset(eff, prm, c.inheritable).map_err(|e| fail("setting the inheritable capabilities", e))?;
    // 2. The bounding set: drop what it did not hold; one it held that this restore lacks is refused.
    for cap in 0..64u32 {
        let has = match prctl(PR_CAPBSET_READ, cap as usize) {
            Ok(v) => v == 1,
            Err(_) => {
                if c.bounding >> cap != 0 {
                    return Err(Failed { step: "the bounding set holds a capability this kernel lacks", errno: Errno(libc::EINVAL), which: cap as i64 });
                }
                break;
            }
        };
        let want = c.bounding & (1 << cap) != 0;
        if want && !has {
            return Err(Failed { step: "the job's bounding set holds a capability this restore lacks", errno: Errno(libc::EPERM), which: cap as i64 });
        }
        if has && !want {
            prctl(PR_CAPBSET_DROP, cap as usize).map_err(|e| Failed { step: "dropping from the bounding set capability", errno: e, which: cap as i64 })?;
        }
    }
    // 3. Groups, then gids (an unprivileged restore cannot set groups: its own must already be the job's).
    if !groups_are(&t.groups) {
        call(libc::SYS_setgroups, t.groups.len(), t.groups.as_ptr() as usize, 0).map_err(|e| fail("setting the supplementary groups", e))?;
    }
    call(libc::SYS_setresgid, t.gid[0] as usize, t.gid[1] as usize, t.gid[2] as usize).map_err(|e| fail("setting the gids", e))?;
    set_fs_id(libc::SYS_setfsgid, t.gid[3], "setting the filesystem gid")?;
    // 4. Uids, keeping every capability across the change.
    let (mut r, mut e, mut s) = (0u32, 0u32, 0u32);
    call(libc::SYS_getresuid, &mut r as *mut u32 as usize, &mut e as *mut u32 as usize, &mut s as *mut u32 as usize)
        .map_err(|e| fail("reading the uids", e))?;
    if [r, e, s] != [t.uid[0], t.uid[1], t.uid[2]] {
        let bits = prctl(PR_GET_SECUREBITS, 0).map_err(|e| fail("reading the securebits", e))? as u32;
        prctl(PR_SET_SECUREBITS, (bits | SECBIT_NO_SETUID_FIXUP) as usize).map_err(|e| fail("keeping capabilities across the uid change", e))?;
        call(libc::SYS_setresuid, t.uid[0] as usize, t.uid[1] as usize, t.uid[2] as usize).map_err(|e| fail("setting the uids", e))?;
    }
    set_fs_id(libc::SYS_setfsuid, t.uid[3], "setting the filesystem uid")?;
    // 5. The image's sets, plus what the remaining steps need (if this restore has it).
    let keep = ((1u64 << CAP_SETPCAP) | (1u64 << CAP_SYS_ADMIN)) & prm;
    capset(c.effective | keep, c.permitted | keep, c.inheritable).map_err(|e| fail("setting the capability sets (does this restore have every capability the job had?)", e))?;
    // 6. Ambient capabilities.
    sys::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0).map_err(|e| fail("clearing the ambient capabilities", e))?;
    for cap in (0..64u32).filter(|&cap| c.ambient & (1 << cap) != 0) {
        sys::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap as usize, 0, 0)
            .map_err(|e| Failed { step: "raising the ambient capability", errno: e, which: cap as i64 })?;
    }
    // 7. Securebits, as the job had them (locks included).
    if prctl(PR_GET_SECUREBITS, 0).map_err(|e| fail("reading the securebits", e))? as u32 != t.securebits {
        prctl(PR_SET_SECUREBITS, t.securebits as usize).map_err(|e| fail("setting the securebits", e))?;
    }
    if let Some(dir) = cwd {
        sys::chdir(dir).map_err(|e| fail("entering the working directory with the job's credentials", e))?;
    }
    // 8, 9. No new privileges, then the filters.
    if t.no_new_privs {
        prctl(PR_SET_NO_NEW_PRIVS, 1).map_err(|e| fail("setting no_new_privs", e))?;
    }
    for (i, f) in t.seccomp.filters.iter().enumerate() {
        let prog = libc::sock_fprog { len: (f.prog.len() / 8) as u16, filter: f.prog.as_ptr() as *mut libc::sock_filter };
        let flags = if f.log { vos::seccomp::FLAG_LOG as usize } else { 0 };
        let r = call(libc::SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog as *const libc::sock_fprog as usize);
        // A filter installed earlier may deny seccomp() itself but not prctl(), as the process's may have.
        let r = match r {
            Err(_) if !f.log => sys::prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog as *const libc::sock_fprog as usize, 0, 0),
            r => r,
        };
        r.map_err(|e| Failed { step: "installing seccomp filter", errno: e, which: i as i64 })?;
    }
    // 10. Exactly the image's sets.
    capset(c.effective, c.permitted, c.inheritable).map_err(|e| fail("setting the final capability sets", e))?;
    Ok(())
}
