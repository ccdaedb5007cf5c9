//! Process-wide state: cwd, umask, rlimits, names, clocks, and the kernel's mm fields (brk, argv/env bounds,
//! auxv) that the restorer puts back with PR_SET_MM_MAP.

use crate::procfs;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use serde_bytes::ByteBuf;
use vos::image::{Caps, MmImage, ProcessAttrs, Rlimit};
use vos::sys;

pub fn capture() -> Result<ProcessAttrs, String> {
    let status = procfs::read_string("/proc/thread-self/status").map_err(|e| format!("/proc/thread-self/status: {e}"))?;
    let umask = procfs::field(&status, "Umask").and_then(|u| u32::from_str_radix(u, 8).ok()).unwrap_or(0o022);
    let mut rlimits = Vec::new();
    // RLIMIT_CPU (0) .. RLIMIT_RTTIME (15).
    for resource in 0..16u32 {
        if let Ok(l) = sys::prlimit(resource, None) {
            rlimits.push(Rlimit { resource, cur: l.rlim_cur, max: l.rlim_max });
        }
    }
    // SAFETY: utsname is plain data filled by the kernel.
    let mut uts: libc::utsname = unsafe { core::mem::zeroed() };
    // SAFETY: uts is a valid out-parameter.
    unsafe { sys::syscall6(libc::SYS_uname, &mut uts as *mut libc::utsname as usize, 0, 0, 0, 0, 0) };
    let cstr = |b: &[libc::c_char]| {
        let v: Vec<u8> = b.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        String::from_utf8_lossy(&v).into_owned()
    };
    let hex = |k: &str| procfs::field(&status, k).and_then(|v| u64::from_str_radix(v, 16).ok()).unwrap_or(0);
    let caps = Caps { effective: hex("CapEff"), permitted: hex("CapPrm"), inheritable: hex("CapInh") };
    let ns_last_pid = procfs::read_string("/proc/sys/kernel/ns_last_pid").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    Ok(ProcessAttrs {
        cwd: procfs::readlink("/proc/thread-self/cwd").map_err(|e| format!("cwd: {e}"))?,
        umask,
        rlimits,
        hostname: cstr(&uts.nodename),
        domainname: cstr(&uts.domainname),
        ns_last_pid,
        monotonic_ns: sys::now_ns(libc::CLOCK_MONOTONIC),
        boottime_ns: sys::now_ns(libc::CLOCK_BOOTTIME),
        dumpable: sys::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0).unwrap_or(1) as i32,
        pdeath_sig: {
            let mut s: i32 = 0;
            let _ = sys::prctl(libc::PR_GET_PDEATHSIG, &mut s as *mut i32 as usize, 0, 0, 0);
            s
        },
        caps,
        creds: None,
    })
}

/// The mm fields from /proc/self/stat (fields 26-28 and 45-51), the current brk and the auxv.
pub fn capture_mm() -> Result<MmImage, String> {
    let stat = procfs::read_string("/proc/thread-self/stat").map_err(|e| format!("/proc/thread-self/stat: {e}"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')').ok_or("bad /proc/self/stat")? + 2..];
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    // Field n (1-based, counting pid and comm) is f[n - 3].
    let at = |n: usize| f.get(n - 3).copied().unwrap_or(0);
    let auxv = procfs::open_own("auxv")
        .and_then(|fd| {
            let mut v = Vec::new();
            let r = procfs::read_to_end(fd, &mut v);
            let _ = sys::close(fd);
            r.map(|_| v)
        })
        .map_err(|e| format!("/proc/thread-self/auxv: {e}"))?;
    Ok(MmImage {
        start_code: at(26),
        end_code: at(27),
        start_stack: at(28),
        start_data: at(45),
        end_data: at(46),
        start_brk: at(47),
        brk: sys::brk(0) as u64,
        arg_start: at(48),
        arg_end: at(49),
        env_start: at(50),
        env_end: at(51),
        auxv: ByteBuf::from(auxv),
    })
}

/// cwd, umask, dumpable, parent-death signal. Resource limits come last (`restore_limits`): lowering
/// RLIMIT_NOFILE first could make the fd table impossible to rebuild. With credentials to take, the working
/// directory is entered as the job (`creds::apply`) unless the image says the job's own credentials cannot reach
/// it; dumpable and the parent-death signal come after them (a change of ids resets both).
pub fn restore(a: &ProcessAttrs) -> Result<(), String> {
    if a.creds.as_ref().is_none_or(|c| c.privileged_cwd) {
        sys::chdir(&procfs::cpath(&a.cwd)).map_err(|e| format!("changing to the working directory {}: {e}", a.cwd))?;
    }
    sys::umask(a.umask);
    if a.creds.is_none() {
        after_credentials(a);
    }
    Ok(())
}

/// Take the process's credentials on the calling thread (the last one to, so the process-wide dumpable flag, which
/// every change of ids resets, ends as the image says).
pub fn take_credentials(a: &ProcessAttrs) -> Result<(), String> {
    let Some(c) = &a.creds else { return Ok(()) };
    let cwd = (!c.privileged_cwd).then(|| procfs::cpath(&a.cwd));
    crate::creds::apply(c, cwd.as_deref()).map_err(|e| format!("taking the job's credentials: {e} (working directory {})", a.cwd))?;
    after_credentials(a);
    Ok(())
}

fn after_credentials(a: &ProcessAttrs) {
    let _ = sys::prctl(libc::PR_SET_DUMPABLE, a.dumpable as usize, 0, 0, 0);
    if a.pdeath_sig != 0 {
        let _ = sys::prctl(libc::PR_SET_PDEATHSIG, a.pdeath_sig as usize, 0, 0, 0);
    }
}

pub fn restore_limits(a: &ProcessAttrs) -> Result<(), String> {
    for l in &a.rlimits {
        let want = libc::rlimit64 { rlim_cur: l.cur, rlim_max: l.max };
        if sys::prlimit(l.resource, None).is_ok_and(|c| c.rlim_cur == l.cur && c.rlim_max == l.max) {
            continue;
        }
        sys::prlimit(l.resource, Some(&want))
            .map_err(|e| format!("resource limit {} = {}/{}: {e} (raising a hard limit needs privilege)", l.resource, l.cur, l.max))?;
    }
    Ok(())
}

/// Make new pids of the namespace continue where the original's would have (best effort: needs privilege in
/// the job's namespaces; ids would merely differ otherwise).
pub fn restore_last_pid(a: &ProcessAttrs) {
    if a.ns_last_pid <= 0 {
        return;
    }
    if let Ok(fd) = sys::open(b"/proc/sys/kernel/ns_last_pid\0", libc::O_WRONLY, 0) {
        let s = format!("{}", a.ns_last_pid);
        let _ = sys::write(fd, s.as_bytes());
        let _ = sys::close(fd);
    }
}

/// Set the calling thread's capabilities (each thread has its own: every restored thread calls this).
pub fn set_caps(c: &Caps) -> Result<(), sys::Errno> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let h = Header { version: VERSION_3, pid: 0 };
    let lo = |v: u64| v as u32;
    let hi = |v: u64| (v >> 32) as u32;
    let d = [
        Data { effective: lo(c.effective), permitted: lo(c.permitted), inheritable: lo(c.inheritable) },
        Data { effective: hi(c.effective), permitted: hi(c.permitted), inheritable: hi(c.inheritable) },
    ];
    // SAFETY: header and two data words, as capset(2) version 3 expects.
    let r = unsafe { sys::syscall6(libc::SYS_capset, &h as *const Header as usize, d.as_ptr() as usize, 0, 0, 0, 0) };
    if r < 0 { Err(sys::Errno(-r as i32)) } else { Ok(()) }
}
