//! Who each process of a job is and what confines it, and who may bring back what.
//!
//! At a checkpoint the supervisor reads every thread's ids, groups, capability sets, no_new_privs and seccomp
//! state from /proc (the kernel's view: the shim inside the process reports only its securebits, which nothing
//! else shows), and the seccomp filters themselves from the kernel as a tracer (PTRACE_SECCOMP_GET_FILTER, as root).
//! A process whose threads differ, whose filters cannot be read or would stop the shim, is refused by name. Each
//! open file gets the credentials a restore opens it with (`open_as`).
//!
//! At a restore, `Authority` says what the image may bring back: root restores a job as the users it belonged to,
//! but an image someone else owns (a file, or the pipe on stdin) only with that owner's ids and no capability in
//! the initial user namespace; a restore without root only a job whose credentials are the restoring user's own.
//! Files are opened with the credentials of the process that had them (`as_user`): a root restore never opens
//! for a job what the job could not open itself, unless an image root vouches for says a process of the job got it
//! from a more privileged one.

use crate::job::members::{self, Member};
use anyhow::{Result, anyhow, bail};
use std::collections::{BTreeSet, HashMap};
use std::os::fd::RawFd;
use std::sync::Mutex;
use vos::image::{CapSets, Creds, FileKind, FsCreds, JobImage, OpenFile, ProcessImage, Seccomp, SeccompFilter, SockAddr};
use vos::seccomp;

fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':').map(str::trim))
}

/// The identity map of the initial user namespace, as /proc/PID/uid_map shows it there.
fn is_initial_map(map: &str) -> bool {
    map.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"]
}

/// Whether this process is root in the initial user namespace (a root supervisor that made a user namespace for
/// a job is root only there).
pub fn real_root() -> bool {
    nix::unistd::geteuid().is_root() && std::fs::read_to_string("/proc/self/uid_map").is_ok_and(|m| is_initial_map(&m))
}

/// The seccomp filters this supervisor itself runs under: every process of its job has them from it.
fn own_filters() -> u32 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    field(&s, "Seccomp_filters").and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn current_groups() -> Vec<u32> {
    nix::unistd::getgroups().map(|g| g.into_iter().map(|g| g.as_raw()).collect()).unwrap_or_default()
}

// ---- a thread as /proc shows it ----------------------------------------------------------------------------

/// A thread's credentials (securebits aside), its seccomp mode and number of filters.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    creds: Creds,
    filters: u32,
}

fn seen(status: &str) -> Result<Seen> {
    let nums = |k: &str| -> Result<Vec<u32>> {
        field(status, k).ok_or_else(|| anyhow!("no {k} line"))?.split_whitespace().map(|v| v.parse().map_err(|_| anyhow!("{k}: {v:?}"))).collect()
    };
    let hex = |k: &str| -> Result<u64> { u64::from_str_radix(field(status, k).ok_or_else(|| anyhow!("no {k} line"))?, 16).map_err(|_| anyhow!("{k}")) };
    let four = |k: &str| -> Result<[u32; 4]> { nums(k)?.try_into().map_err(|_| anyhow!("{k}: not four ids")) };
    let mode: u32 = field(status, "Seccomp").and_then(|v| v.parse().ok()).unwrap_or(0);
    let filters: u32 = field(status, "Seccomp_filters").and_then(|v| v.parse().ok()).unwrap_or(0);
    let creds = Creds {
        uid: four("Uid")?,
        gid: four("Gid")?,
        groups: nums("Groups")?,
        caps: CapSets { effective: hex("CapEff")?, permitted: hex("CapPrm")?, inheritable: hex("CapInh")?, ambient: hex("CapAmb")?, bounding: hex("CapBnd")? },
        no_new_privs: field(status, "NoNewPrivs") == Some("1"),
        seccomp: Seccomp { mode, ..Default::default() },
        ..Default::default()
    };
    Ok(Seen { creds, filters })
}

/// Host tids of process `host`'s threads, with the ids the job's namespace gives them.
/// An error reading a job process's /proc files: `Gone` (the checkpoint starts over) when the process has ended
/// since it was listed (a short-lived process in a build, a daemon's intermediate parent).
fn vanished(pid: i32, e: std::io::Error) -> anyhow::Error {
    match e.raw_os_error() {
        Some(libc::ENOENT | libc::ESRCH) => crate::job::members::Gone(pid).into(),
        _ => anyhow::Error::from(e).context(format!("pid {pid}: reading /proc")),
    }
}

fn threads_of(host: i32) -> Result<Vec<(i32, i32, String)>> {
    let mut out = vec![];
    for e in std::fs::read_dir(format!("/proc/{host}/task"))?.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else { continue };
        let ns = field(&status, "NSpid").and_then(|v| v.split_whitespace().last()?.parse().ok()).unwrap_or(tid);
        out.push((tid, ns, status));
    }
    Ok(out)
}

// ---- seccomp filters, read as a tracer -----------------------------------------------------------------------

const PTRACE_SEIZE: libc::c_uint = 0x4206;
const PTRACE_INTERRUPT: libc::c_uint = 0x4207;
const PTRACE_DETACH: libc::c_uint = 17;
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
const PTRACE_SECCOMP_GET_METADATA: libc::c_uint = 0x420d;
const PTRACE_EVENT_STOP: i32 = 128;

/// Filters `from..to` of thread `tid` (index 0 is the oldest), read while it is held in a ptrace stop: seized,
/// interrupted, read, detached (a signal that stopped it first is handed back). A parked thread waits on a futex
/// in a loop and does not notice; a running one goes on where it was, its system call restarted.
fn read_filters(tid: i32, from: u32, to: u32) -> Result<Vec<SeccompFilter>> {
    // SAFETY: ptrace and waitpid with plain arguments and buffers of the sizes the kernel writes.
    unsafe {
        if libc::ptrace(PTRACE_SEIZE, tid, 0usize, 0usize) < 0 {
            bail!("PTRACE_SEIZE: {} (is it traced by another process?)", std::io::Error::last_os_error());
        }
        let mut pass = 0;
        let stopped = (|| -> Result<()> {
            if libc::ptrace(PTRACE_INTERRUPT, tid, 0usize, 0usize) < 0 {
                bail!("PTRACE_INTERRUPT: {}", std::io::Error::last_os_error());
            }
            let mut st = 0;
            loop {
                let r = libc::waitpid(tid, &mut st, libc::__WALL);
                if r == tid {
                    break;
                }
                if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    bail!("waiting for it to stop: {}", std::io::Error::last_os_error());
                }
            }
            if !libc::WIFSTOPPED(st) {
                return Err(crate::job::members::Gone(tid).into());
            }
            if st >> 16 != PTRACE_EVENT_STOP {
                // A signal reached it first: it is in a signal-delivery stop; the signal goes on at the detach.
                pass = libc::WSTOPSIG(st);
            }
            Ok(())
        })();
        let read = stopped.and_then(|()| {
            let mut out = vec![];
            for i in from..to {
                let n = libc::ptrace(PTRACE_SECCOMP_GET_FILTER, tid, i as usize, 0usize);
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    let why = match e.raw_os_error() {
                        Some(libc::EACCES) => " (the kernel shows filters only to root outside any seccomp filter)",
                        Some(libc::EMEDIUMTYPE) => " (an eBPF filter, not a classic one)",
                        _ => "",
                    };
                    bail!("reading its seccomp filter {i}: {e}{why}");
                }
                let mut prog = vec![0u8; n as usize * 8];
                if libc::ptrace(PTRACE_SECCOMP_GET_FILTER, tid, i as usize, prog.as_mut_ptr()) != n {
                    bail!("reading its seccomp filter {i}: {}", std::io::Error::last_os_error());
                }
                #[repr(C)]
                struct Meta {
                    filter_off: u64,
                    flags: u64,
                }
                let mut m = Meta { filter_off: i as u64, flags: 0 };
                if libc::ptrace(PTRACE_SECCOMP_GET_METADATA, tid, std::mem::size_of::<Meta>(), &mut m as *mut Meta) < 0 {
                    bail!("reading the flags of its seccomp filter {i}: {}", std::io::Error::last_os_error());
                }
                out.push(SeccompFilter { prog: serde_bytes::ByteBuf::from(prog), log: m.flags & seccomp::FLAG_LOG as u64 != 0 });
            }
            Ok(out)
        });
        libc::ptrace(PTRACE_DETACH, tid, 0usize, pass as usize);
        read
    }
}

/// Refuse a filter a restore could not install again, or that would stop the shim at a checkpoint.
fn check_filter(pid: i32, i: usize, f: &SeccompFilter) -> Result<()> {
    let prog = seccomp::parse(&f.prog).map_err(|e| anyhow!("pid {pid}: seccomp filter {i}: {e}"))?;
    if seccomp::notifies(&prog) {
        bail!("pid {pid}: seccomp filter {i} hands system calls to a user-space notifier (its listener is not the job's to capture): not supported");
    }
    match seccomp::blocks_shim(&prog) {
        Ok(None) => Ok(()),
        Ok(Some((call, what))) => bail!(
            "pid {pid}: its seccomp filter {i} would {} for {call}, a system call vOS makes in the process at a checkpoint: not supported",
            seccomp::describe(what)
        ),
        Err(e) => bail!("pid {pid}: seccomp filter {i}: {e}"),
    }
}

/// System calls that fail with EINTR, not restarted, when a ptrace stop interrupts them (as after SIGSTOP and
/// SIGCONT): a thread blocked in one is not the one to read filters from, when another will do.
const EINTR_PRONE: [i64; 12] = [7, 23, 43, 44, 45, 46, 47, 65, 128, 208, 232, 281];

/// Processes already checked, with their threads' filter counts: filters only ever get added, so the same counts
/// mean the same filters (keyed by host pid and start time, so a reused pid is checked again).
static CHECKED: Mutex<Vec<Checked>> = Mutex::new(Vec::new());

/// A process (host pid, start time) and its threads' filter counts (tid, filters).
type Checked = ((i32, u64), Vec<(i32, u32)>);

fn start_time(host: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{host}/stat")).unwrap_or_default();
    stat.rfind(')').and_then(|i| stat[i + 2..].split_whitespace().nth(19)?.parse().ok()).unwrap_or(0)
}

/// Before process `m` is asked to checkpoint (its threads run the shim's handler, and its checkpoint thread
/// talks to the supervisor, all under its seccomp filters): refuse it, by name, if its filters would kill or
/// fail one of the shim's system calls, or cannot be read or installed again; or if it lives in a user namespace
/// of its own (ids and capabilities there are not restored). `init` is the job's init.
pub fn precheck(m: &Member, init: nix::unistd::Pid) -> Result<()> {
    let host = m.task.as_raw();
    let userns = |p: i32| std::fs::read_link(format!("/proc/{p}/ns/user")).ok();
    // A process that ended since it was listed (a short-lived compiler in a build) has no namespace links left:
    // the checkpoint starts over without it.
    let Some(own) = userns(host) else { return Err(crate::job::members::Gone(m.ids.pid).into()) };
    if Some(own) != userns(init.as_raw()) {
        bail!("pid {} ({}) is in a user namespace of its own: not supported", m.ids.pid, m.comm);
    }
    let inherited = own_filters();
    let threads = threads_of(host).map_err(|e| match e.downcast::<std::io::Error>() {
        Ok(io) => vanished(m.ids.pid, io),
        Err(e) => e,
    })?;
    let counts: Vec<(i32, u32)> = threads
        .iter()
        .filter_map(|(tid, _, status)| {
            let s = seen(status).ok()?;
            (s.creds.seccomp.mode == 2).then_some((*tid, s.filters))
        })
        .collect();
    let own: Vec<&(i32, u32)> = counts.iter().filter(|c| c.1 > inherited).collect();
    if own.is_empty() {
        return Ok(());
    }
    if !real_root() {
        bail!(
            "pid {} ({}) has a seccomp filter of its own: the kernel shows filters only to root, so only a checkpoint by root can keep it",
            m.ids.pid,
            m.comm
        );
    }
    let key = (host, start_time(host));
    if CHECKED.lock().unwrap().iter().any(|(k, c)| *k == key && *c == counts) {
        return Ok(());
    }
    if let Some(w) = counts.windows(2).find(|w| w[0].1 != w[1].1) {
        bail!("pid {}: its threads have different seccomp filters ({} and {} filters): not supported", m.ids.pid, w[0].1, w[1].1);
    }
    // Any thread will do (they have as many filters: the same ones, as the capture checks): one not in a wait
    // that a stop would end with EINTR, if there is one.
    let quiet = own.iter().find(|(tid, _)| {
        let sc = std::fs::read_to_string(format!("/proc/{host}/task/{tid}/syscall")).unwrap_or_default();
        match sc.split_whitespace().next() {
            Some("running") => true,
            Some(n) => n.parse::<i64>().is_ok_and(|n| n >= 0 && !EINTR_PRONE.contains(&n)),
            None => false,
        }
    });
    let &&(tid, n) = quiet.unwrap_or(&own[0]);
    let filters = read_filters(tid, inherited, n).map_err(|e| anyhow!("pid {} ({}): {e:#}", m.ids.pid, m.comm))?;
    for (i, f) in filters.iter().enumerate() {
        check_filter(m.ids.pid, i, f)?;
    }
    let mut checked = CHECKED.lock().unwrap();
    checked.retain(|(k, _)| k.0 != host);
    checked.push((key, counts));
    Ok(())
}

/// Fill each process's credentials from outside, once every thread is parked: its ids, groups and capability sets,
/// the same for every thread (the shim reported the securebits), its seccomp filters, its working directory as
/// the kernel has it, and whether its own credentials can reach that directory.
pub fn capture(job: &mut JobImage, members: &[Member]) -> Result<()> {
    let root = real_root();
    let inherited = own_filters();
    for p in &mut job.processes {
        let host = members::task_of(members, p.pid).ok_or_else(|| anyhow!("process {} vanished", p.pid))?.as_raw();
        let mut seen_threads: Vec<(i32, i32, Seen)> = vec![];
        for (tid, ns, status) in threads_of(host)? {
            if p.threads.iter().any(|t| t.tid == ns) {
                seen_threads.push((tid, ns, seen(&status).map_err(|e| anyhow!("pid {} thread {ns}: /proc status: {e}", p.pid))?));
            }
        }
        let Some((_, first_ns, first)) = seen_threads.first() else { bail!("pid {}: none of its threads is in /proc", p.pid) };
        for (_, ns, s) in &seen_threads[1..] {
            if s != first {
                bail!("pid {}: threads {first_ns} and {ns} have different credentials or seccomp filters: not supported", p.pid);
            }
        }
        let mut c = first.creds.clone();
        c.securebits = p.attrs.creds.as_ref().map_or(0, |s| s.securebits);
        let map = std::fs::read_to_string(format!("/proc/{host}/uid_map")).unwrap_or_default();
        c.user_ns = !is_initial_map(&map);
        if !root && c.user_ns {
            // Seen from inside the job's user namespace, groups it does not map read as the overflow gid: they are
            // the ones vrun had when it made the namespace (a process there cannot change them).
            if let Some(g) = crate::job::ns::host_groups() {
                c.groups = g.clone();
            }
        }
        if c.seccomp.mode == 2 && first.filters > inherited {
            let mut filters: Option<Vec<SeccompFilter>> = None;
            for (tid, ns, _) in &seen_threads {
                let f = read_filters(*tid, inherited, first.filters).map_err(|e| anyhow!("pid {} thread {ns}: {e:#}", p.pid))?;
                match &filters {
                    Some(prev) if *prev != f => bail!("pid {}: threads {first_ns} and {ns} have different seccomp filters: not supported", p.pid),
                    Some(_) => {}
                    None => filters = Some(f),
                }
            }
            c.seccomp.filters = filters.unwrap_or_default();
            for (i, f) in c.seccomp.filters.iter().enumerate() {
                check_filter(p.pid, i, f)?;
            }
        }
        c.seccomp.inherited = if c.seccomp.mode == 2 { first.filters.min(inherited) } else { 0 };
        // The working directory as the kernel has it (not as the process says).
        if let Ok(cwd) = std::fs::read_link(format!("/proc/{host}/cwd")) {
            p.attrs.cwd = members::as_seen_by(host, cwd.to_string_lossy().into_owned());
        }
        c.privileged_cwd = root && !can_access(host, &p.attrs.cwd, libc::X_OK, &c.fs());
        p.attrs.caps = vos::image::Caps { effective: c.caps.effective, permitted: c.caps.permitted, inheritable: c.caps.inheritable };
        p.attrs.creds = Some(c);
    }
    Ok(())
}

// ---- a process's own /proc files, for a shim that may not open them --------------------------------------------

/// The /proc files process `m`'s shim reads at a checkpoint that its own credentials may not open: with its
/// dumpable flag off (a daemon that switched users), its /proc/PID files are root's. Opened by this supervisor (root)
/// read-only for it (`Msg::ProcFile`); pagemap without CAP_SYS_ADMIN in effect, so it shows no physical addresses.
pub fn proc_files(m: &Member) -> Result<Vec<(&'static str, std::os::fd::OwnedFd)>> {
    use std::os::unix::fs::MetadataExt;
    let host = m.task.as_raw();
    let status = std::fs::read_to_string(format!("/proc/{host}/status")).map_err(|e| vanished(m.ids.pid, e))?;
    let fsuid: u32 = field(&status, "Uid").and_then(|v| v.split_whitespace().nth(3)?.parse().ok()).unwrap_or(0);
    let owner = std::fs::metadata(format!("/proc/{host}/pagemap")).map_err(|e| vanished(m.ids.pid, e))?.uid();
    if owner == fsuid || fsuid == 0 || !real_root() {
        return Ok(vec![]);
    }
    let mut out = vec![];
    for name in ["pagemap", "mem", "auxv"] {
        let path = format!("/proc/{host}/{name}");
        let f = without_sys_admin(|| std::fs::File::open(&path).map_err(|e| anyhow!("opening {path} for pid {}: {e}", m.ids.pid)))?;
        out.push((name, std::os::fd::OwnedFd::from(f)));
    }
    Ok(out)
}

/// Run `f` with CAP_SYS_ADMIN out of this thread's effective set.
fn without_sys_admin<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let h = Header { version: 0x2008_0522, pid: 0 };
    let mut d = [Data::default(); 2];
    // SAFETY: capget/capset on this thread with a version 3 header and two data words.
    unsafe {
        if libc::syscall(libc::SYS_capget, &h as *const Header, d.as_mut_ptr()) < 0 {
            bail!("capget: {}", std::io::Error::last_os_error());
        }
        let mut less = d;
        less[0].effective &= !(1 << 21);
        if libc::syscall(libc::SYS_capset, &h as *const Header, less.as_ptr()) < 0 {
            bail!("capset: {}", std::io::Error::last_os_error());
        }
        let r = f();
        if libc::syscall(libc::SYS_capset, &h as *const Header, d.as_ptr()) < 0 {
            eprintln!("vrun: cannot take CAP_SYS_ADMIN back: stopping");
            std::process::abort();
        }
        r
    }
}

// ---- filesystem credentials of the calling thread ----------------------------------------------------------

/// The calling thread's filesystem ids and groups, switched until dropped. setfsuid, setfsgid and setgroups as raw
/// system calls act on this thread alone. Switching from root to another fsuid also takes the filesystem
/// capabilities (CAP_DAC_OVERRIDE, ...) out of the effective set; switching back puts them back.
struct Switched {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    /// Every change of fsuid resets the process's dumpable flag (a supervisor that is not dumpable could not read
    /// its own job's /proc from inside a user namespace): it is set back as it was.
    dumpable: i32,
}

fn raw(nr: i64, a: usize, b: usize) -> i64 {
    // SAFETY: setfsuid/setfsgid take an id; setgroups a count and a buffer of that many gids.
    unsafe { libc::syscall(nr, a, b) }
}

fn switch_to(who: &FsCreds) -> Result<Switched> {
    // SAFETY: prctl with plain integers.
    let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
    let back = Switched {
        uid: raw(libc::SYS_setfsuid, u32::MAX as usize, 0) as u32,
        gid: raw(libc::SYS_setfsgid, u32::MAX as usize, 0) as u32,
        groups: current_groups(),
        dumpable,
    };
    if raw(libc::SYS_setgroups, who.groups.len(), who.groups.as_ptr() as usize) < 0 {
        bail!("taking the groups {:?}: {}", who.groups, std::io::Error::last_os_error());
    }
    raw(libc::SYS_setfsgid, who.gid as usize, 0);
    raw(libc::SYS_setfsuid, who.uid as usize, 0);
    if raw(libc::SYS_setfsuid, u32::MAX as usize, 0) as u32 != who.uid || raw(libc::SYS_setfsgid, u32::MAX as usize, 0) as u32 != who.gid {
        drop(back);
        bail!("taking uid {} and gid {} to open files with", who.uid, who.gid);
    }
    Ok(back)
}

impl Drop for Switched {
    fn drop(&mut self) {
        raw(libc::SYS_setfsuid, self.uid as usize, 0);
        raw(libc::SYS_setfsgid, self.gid as usize, 0);
        let ok = raw(libc::SYS_setgroups, self.groups.len(), self.groups.as_ptr() as usize) == 0
            && raw(libc::SYS_setfsuid, u32::MAX as usize, 0) as u32 == self.uid
            && raw(libc::SYS_setfsgid, u32::MAX as usize, 0) as u32 == self.gid;
        if !ok {
            // Going on with another user's credentials would be worse than stopping.
            eprintln!("vrun: cannot take back its own credentials after opening a file as the job: stopping");
            std::process::abort();
        }
        if self.dumpable >= 0 {
            // SAFETY: prctl with plain integers.
            unsafe { libc::prctl(libc::PR_SET_DUMPABLE, self.dumpable as libc::c_ulong, 0, 0, 0) };
        }
    }
}

/// Run `f` with the filesystem credentials `who` (None: our own). Only root in the initial user namespace
/// switches: a restore without root opens everything as the restoring user, who is the job's; a supervisor in the
/// job's user namespace is the job's user to the host already (and could not set its groups back: the ones the
/// namespace does not map show as the overflow gid).
pub fn as_user<T>(who: Option<&FsCreds>, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match who {
        Some(w) if real_root() => {
            let same = raw(libc::SYS_setfsuid, u32::MAX as usize, 0) as u32 == w.uid
                && raw(libc::SYS_setfsgid, u32::MAX as usize, 0) as u32 == w.gid
                && current_groups() == w.groups;
            if same {
                return f();
            }
            let back = switch_to(w)?;
            let r = f();
            drop(back);
            r.map_err(|e| e.context(format!("as uid {} (the job's credentials)", w.uid)))
        }
        _ => f(),
    }
}

/// Whether `who` could reach `path` (as process `host` sees it) with `mode` (R_OK, W_OK, X_OK, F_OK).
fn can_access(host: i32, path: &str, mode: i32, who: &FsCreds) -> bool {
    let Ok(c) = std::ffi::CString::new(members::seen_by(host, path)) else { return false };
    as_user(Some(who), || {
        // SAFETY: faccessat2 with a NUL-terminated path; AT_EACCESS checks with the filesystem ids just taken.
        let r = unsafe { libc::syscall(libc::SYS_faccessat2, libc::AT_FDCWD, c.as_ptr(), mode, libc::AT_EACCESS | libc::AT_SYMLINK_NOFOLLOW) };
        Ok(r == 0)
    })
    .unwrap_or(false)
}

/// The access a restore needs to the paths behind open file `f` (as it reopens, binds or watches them).
fn needs(job: &JobImage, f: &OpenFile) -> Option<Vec<(String, i32)>> {
    let by_mode = |flags: i32| {
        if flags & libc::O_PATH != 0 {
            return libc::F_OK;
        }
        match flags & libc::O_ACCMODE {
            libc::O_WRONLY => libc::W_OK,
            libc::O_RDWR => libc::R_OK | libc::W_OK,
            _ => libc::R_OK,
        }
    };
    let parent = |p: &str| std::path::Path::new(p).parent().map(|d| d.display().to_string()).unwrap_or_else(|| "/".into());
    Some(match &f.kind {
        FileKind::Regular { file } => vec![(file.path.clone(), by_mode(f.flags))],
        FileKind::Dir { path } => vec![(path.clone(), if f.flags & libc::O_PATH != 0 { libc::F_OK } else { libc::R_OK })],
        FileKind::Device { path } => vec![(path.clone(), by_mode(f.flags))],
        FileKind::Pipe { pipe, .. } => vec![(job.pipes.get(*pipe as usize)?.fifo.clone()?, libc::R_OK | libc::W_OK)],
        FileKind::Memory { deleted_from: Some(d), .. } => vec![(d.clone(), libc::W_OK | libc::X_OK)],
        FileKind::Socket { socket } => match &job.sockets.get(*socket as usize)?.local {
            SockAddr::Path(p) => vec![(parent(p), libc::W_OK | libc::X_OK)],
            _ => return None,
        },
        FileKind::Inotify { watches } => watches.iter().map(|w| (w.path.clone(), libc::R_OK)).collect(),
        _ => return None,
    })
}

/// Give each open file a restore reopens, binds or watches by path the credentials to do it with: those of the
/// first process of the job holding it that could do it now; if none could (it came from a more privileged process:
/// a daemon that opened it as root, then dropped privileges), root's. Without root, the supervisor can only open as
/// the job's user, the holders' own.
pub fn open_as(job: &mut JobImage, members: &[Member]) -> Result<()> {
    let root = real_root();
    let mut holders: Vec<Vec<usize>> = vec![vec![]; job.files.len()];
    for (pi, p) in job.processes.iter().enumerate() {
        for fd in &p.fds {
            let h = &mut holders[fd.file as usize];
            if !h.contains(&pi) {
                h.push(pi);
            }
        }
    }
    for (i, holding) in holders.iter().enumerate() {
        let Some(need) = needs(job, &job.files[i]) else { continue };
        let candidates: Vec<(i32, FsCreds)> = holding
            .iter()
            .filter_map(|&pi| {
                let p = &job.processes[pi];
                Some((members::task_of(members, p.pid)?.as_raw(), p.attrs.creds.as_ref()?.fs()))
            })
            .collect();
        let Some(first) = candidates.first() else { continue };
        let who = if !root {
            first.1.clone()
        } else {
            match candidates.iter().find(|(host, fs)| need.iter().all(|(path, mode)| can_access(*host, path, *mode, fs))) {
                Some((_, fs)) => fs.clone(),
                None => FsCreds { uid: 0, gid: 0, groups: vec![] },
            }
        };
        job.files[i].open_as = Some(who);
    }
    Ok(())
}

// ---- restore: who may bring back what --------------------------------------------------------------------------

/// The user whose ids bound a restore.
struct Bound {
    uid: u32,
    /// The gids the user may take: its passwd entry's, and every group that lists it.
    gids: BTreeSet<u32>,
    /// A restore without root: the groups its processes will have (it cannot set them).
    groups: Option<Vec<u32>>,
    /// For messages: "the image's owner (uid 65534)", "you (uid 1000)".
    who: String,
}

/// What a restore may bring back, and how it runs the job.
pub struct Authority {
    root: bool,
    /// None: root restores an image root vouches for (its file, or the pipe on stdin, is root's): the job comes back
    /// as the users it belonged to.
    bound: Option<Bound>,
    /// A root restore of a job that ran in the user namespace vrun makes without root: it runs in one again (its
    /// uid, gid and groups), which keeps its capability sets and bounding set what they were there.
    pub userns: Option<(u32, u32, Vec<u32>)>,
}

/// The gids user `uid` may take, and its name.
fn user_gids(uid: u32) -> Result<(String, BTreeSet<u32>)> {
    let pw = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .map_err(|e| anyhow!("looking up uid {uid}: {e}"))?
        .ok_or_else(|| anyhow!("uid {uid} has no passwd entry: the gids it may take are unknown"))?;
    let name = std::ffi::CString::new(pw.name.as_str())?;
    let groups = nix::unistd::getgrouplist(&name, pw.gid).map_err(|e| anyhow!("the groups of {}: {e}", pw.name))?;
    Ok((pw.name, groups.into_iter().map(|g| g.as_raw()).chain([pw.gid.as_raw()]).collect()))
}

fn caps_in_initial_ns(c: &Creds) -> u64 {
    c.caps.effective | c.caps.permitted | c.caps.inheritable | c.caps.ambient
}

impl Authority {
    /// Who restores, and who owns the image's source (`fd`: the image file, or what is on stdin).
    pub fn of(fd: RawFd, job: &JobImage) -> Result<Authority> {
        // SAFETY: fstat into a plain struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a valid fd and out-parameter.
        if unsafe { libc::fstat(fd, &mut st) } < 0 {
            bail!("who owns the image: {}", std::io::Error::last_os_error());
        }
        let root = real_root();
        let bound = if root {
            match st.st_uid {
                0 => None,
                owner => {
                    let (name, gids) = user_gids(owner).map_err(|e| anyhow!("the image belongs to uid {owner}: {e}"))?;
                    Some(Bound { uid: owner, gids, groups: None, who: format!("an image owned by {name} (uid {owner})") })
                }
            }
        } else {
            let (uid, gid) = (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw());
            Some(Bound { uid, gids: BTreeSet::from([gid]), groups: Some(current_groups()), who: format!("a restore by uid {uid} (not root)") })
        };
        // A job that ran in vrun's own user namespace runs in one again when root restores it.
        let in_ns: Vec<&Creds> = job.processes.iter().filter_map(|p| p.attrs.creds.as_ref()).filter(|c| c.user_ns).collect();
        let userns = match (root, in_ns.first()) {
            (true, Some(c)) => Some((c.uid[0], c.gid[0], c.groups.clone())),
            _ => None,
        };
        Ok(Authority { root, bound, userns })
    }

    /// Refuse, by name and before anything is made, a job this restore may not bring back.
    pub fn check(&self, job: &JobImage) -> Result<()> {
        for p in &job.processes {
            self.check_process(p)?;
        }
        if let Some(b) = &self.bound {
            for (i, f) in job.files.iter().enumerate() {
                let Some(o) = &f.open_as else { continue };
                let path = describe_file(job, f);
                if o.uid != b.uid || !b.gids.contains(&o.gid) || !o.groups.iter().all(|g| b.gids.contains(g) || b.groups.as_ref().is_some_and(|own| own.contains(g))) {
                    bail!(
                        "open file {i} ({path}) was opened with uid {} and gid {}: {} cannot bring it back (only with uid {})",
                        o.uid,
                        o.gid,
                        b.who,
                        b.uid
                    );
                }
            }
        }
        Ok(())
    }

    fn check_process(&self, p: &ProcessImage) -> Result<()> {
        let pid = p.pid;
        let Some(c) = &p.attrs.creds else {
            // An image of an older vrun: its processes come back as whoever restores them (with the capability sets
            // it lists), which only root vouching for the image may allow.
            if self.root && self.bound.is_some() {
                bail!(
                    "pid {pid}: the image records no credentials (an older vrun made it); {} cannot tell whose they were",
                    self.bound.as_ref().map_or("", |b| b.who.as_str())
                );
            }
            return Ok(());
        };
        if let Some((uid, gid, groups)) = &self.userns
            && (!c.user_ns || c.uid.iter().any(|u| u != uid) || c.gid.iter().any(|g| g != gid) || c.groups != *groups || *uid == 0) {
                bail!("pid {pid}: its credentials are not those of the user namespace its job ran in (uid {uid}, gid {gid}): not supported");
            }
        let Some(b) = &self.bound else {
            if c.user_ns && self.userns.is_none() && caps_in_initial_ns(c) != 0 {
                bail!("pid {pid} held capabilities in a user namespace: restored without one, they would be real ones");
            }
            return Ok(());
        };
        if let Some(u) = c.uid.iter().find(|&&u| u != b.uid) {
            bail!("pid {pid} ran as uid {u} (uids {:?}): {} brings back only uid {}", c.uid, b.who, b.uid);
        }
        let allowed = |g: &u32| b.gids.contains(g) || b.groups.as_ref().is_some_and(|own| own.contains(g));
        if let Some(g) = c.gid.iter().find(|g| !allowed(g)) {
            bail!("pid {pid} ran as gid {g} (gids {:?}): {} brings back only the gids of uid {} ({:?})", c.gid, b.who, b.uid, b.gids);
        }
        match &b.groups {
            // Without root, groups cannot be set: the job's must be the restoring user's.
            Some(own) if *own != c.groups => {
                bail!("pid {pid} had the supplementary groups {:?}: a restore without root keeps its own ({own:?}) and cannot set others", c.groups)
            }
            None => {
                if let Some(g) = c.groups.iter().find(|g| !allowed(g)) {
                    bail!("pid {pid} had the supplementary group {g}: {} brings back only the groups of uid {} ({:?})", b.who, b.uid, b.gids);
                }
            }
            _ => {}
        }
        // Capabilities: none in the initial user namespace (in the one a root restore makes for a job that ran in
        // one, they are that namespace's alone).
        let in_ns = self.userns.is_some();
        if caps_in_initial_ns(c) != 0 && !in_ns {
            bail!(
                "pid {pid} held capabilities (effective {:#x}, permitted {:#x}, inheritable {:#x}, ambient {:#x}): {} brings back none",
                c.caps.effective,
                c.caps.permitted,
                c.caps.inheritable,
                c.caps.ambient,
                b.who
            );
        }
        if c.privileged_cwd {
            bail!("pid {pid}: its working directory {} is one its own credentials cannot reach: {} cannot bring it back", p.attrs.cwd, b.who);
        }
        Ok(())
    }

    /// Credentials for files the image names without saying whose they are (older images): the bound user's
    /// own, or ours.
    fn default_fs(&self) -> Option<FsCreds> {
        let b = self.bound.as_ref()?;
        let gid = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(b.uid)).ok().flatten().map_or(b.uid, |u| u.gid.as_raw());
        Some(FsCreds { uid: b.uid, gid, groups: vec![] })
    }

    /// The credentials the files process `p` maps, and its program, are opened with: its own (what it says it maps
    /// is its word).
    pub fn for_process(&self, p: &ProcessImage) -> Option<FsCreds> {
        match &p.attrs.creds {
            Some(c) => Some(c.fs()),
            None => self.default_fs(),
        }
    }

    /// The credentials open file `f` is opened, bound or watched with (checked by `check`).
    pub fn for_file(&self, f: &OpenFile) -> Option<FsCreds> {
        match &f.open_as {
            Some(o) => Some(o.clone()),
            None => self.default_fs(),
        }
    }

    /// The groups each process's threads will find they have, as their own user namespace shows them: a restore
    /// in one (without root, or of a job that ran in one) cannot set them; they are the restoring vrun's, and
    /// groups the namespace does not map read as the overflow gid.
    pub fn adapt(&self, p: &mut ProcessImage) {
        let mapped: Option<Vec<u32>> = match (&self.userns, self.root) {
            (Some((_, gid, _)), true) => Some(vec![0, *gid]),
            (_, false) => Some(vec![nix::unistd::getgid().as_raw()]),
            _ => None,
        };
        let Some(mapped) = mapped else { return };
        let overflow: u32 = std::fs::read_to_string("/proc/sys/kernel/overflowgid").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(65534);
        if let Some(c) = p.attrs.creds.as_mut() {
            for g in c.groups.iter_mut() {
                if !mapped.contains(g) {
                    *g = overflow;
                }
            }
        }
    }
}

/// An open file, named for a message.
fn describe_file(job: &JobImage, f: &OpenFile) -> String {
    match &f.kind {
        FileKind::Regular { file } => file.path.clone(),
        FileKind::Dir { path } | FileKind::Device { path } => path.clone(),
        FileKind::Pipe { pipe, .. } => job.pipes.get(*pipe as usize).and_then(|p| p.fifo.clone()).unwrap_or_else(|| "a pipe".into()),
        FileKind::Socket { .. } => "a unix socket".into(),
        FileKind::Inotify { .. } => "an inotify instance".into(),
        FileKind::Memory { name, .. } => name.clone(),
        _ => "an open file".into(),
    }
}

/// The credentials each unix socket of the job is bound with: its open file's.
pub fn socket_openers(job: &JobImage, auth: &Authority) -> HashMap<u32, Option<FsCreds>> {
    job.files
        .iter()
        .filter_map(|f| match f.kind {
            FileKind::Socket { socket } => Some((socket, auth.for_file(f))),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_status_lines() {
        let s = "Name:\tx\nUid:\t0\t65534\t0\t65534\nGid:\t1\t2\t3\t4\nGroups:\t5 6 \nCapInh:\t0000000000000000\n\
                 CapPrm:\t000001ffffffffff\nCapEff:\t0000000000000400\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n\
                 NoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t3\n";
        let v = seen(s).unwrap();
        assert_eq!(v.creds.uid, [0, 65534, 0, 65534]);
        assert_eq!(v.creds.gid, [1, 2, 3, 4]);
        assert_eq!(v.creds.groups, [5, 6]);
        assert_eq!(v.creds.caps.effective, 0x400);
        assert_eq!(v.creds.caps.bounding, 0x1ff_ffff_ffff);
        assert!(v.creds.no_new_privs);
        assert_eq!((v.creds.seccomp.mode, v.filters), (2, 3));
        let empty = s.replace("Groups:\t5 6 ", "Groups:\t");
        assert!(seen(&empty).unwrap().creds.groups.is_empty());
        assert!(is_initial_map("         0          0 4294967295\n"));
        assert!(!is_initial_map("     65534      65534          1\n"));
    }
}
