//! Checking a job's metadata as a whole before a restore acts on any of it.
//!
//! An image is hostile input: its checksums prove it is whole, not who made it (anyone can recompute them). So
//! `vrun restore` and `vrun inspect` check every index, count, address range, path and number of the job's
//! description here, before the first file is created, opened or bound; the code that acts on the image may then
//! index and size by it. Pure: no system calls.

use crate::image::*;
use crate::plan::{USER_END, WINDOW_END, WINDOW_START};
use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// What is wrong with a job's metadata: the field (as a path, `processes[0].fds[3].file`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: String,
    pub why: String,
}

impl core::fmt::Display for Invalid {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "the job's metadata is invalid: {}: {}", self.field, self.why)
    }
}

type R = Result<(), Invalid>;

fn bad(field: impl Into<String>, why: impl Into<String>) -> Invalid {
    Invalid { field: field.into(), why: why.into() }
}

/// Highest fd number an image may use (the kernel's default limit, fs.nr_open, less one).
pub const MAX_FD: i32 = (1 << 20) - 1;
/// Pids and tids lie below the kernel's PID_MAX_LIMIT; pid 1 of a job is vOS's own init.
pub const MAX_PID: i32 = 1 << 22;
/// Longest path (PATH_MAX, its NUL included).
pub const MAX_PATH: usize = 4095;
/// Largest object whose contents an image carries, or size of a shared memory object.
pub const MAX_OBJECT: u64 = 1 << 46;
/// Highest inotify watch number a restore gives back (it counts up to it, one watch at a time).
pub const MAX_WATCH: i32 = 1 << 20;
/// Kernel-provided regions (vDSO, vvar) are a few pages.
const MAX_SPECIAL: u64 = 1 << 20;
/// Signal numbers: 1..=64.
const NSIG: i32 = 64;
/// RLIM_NLIMITS.
const NLIMITS: u32 = 16;
const SIGINFO_LEN: usize = 128;
/// A unix socket path fits sun_path with its NUL.
const SUN_PATH: usize = 107;
const PAGE: u64 = 4096;
/// A pseudo-terminal's input queue (N_TTY_BUF_SIZE) and its buffer towards the master (tty_buffer's limit).
const PTY_INPUT: usize = 4096;
const PTY_OUTPUT: usize = 65536;

/// A path the restore may open or create: absolute, no NUL, not too long.
pub fn check_path(field: &str, p: &str) -> R {
    if !p.starts_with('/') {
        return Err(bad(field, format!("{p:?} is not an absolute path")));
    }
    if p.len() > MAX_PATH {
        return Err(bad(field, format!("a path of {} bytes is too long", p.len())));
    }
    if p.contains('\0') {
        return Err(bad(field, "a path with a NUL byte"));
    }
    Ok(())
}

/// A name that is no path: the job's name, which names files of the restore's own (its log, its registry entry).
pub fn check_job_name(field: &str, n: &str) -> R {
    let ok = !n.is_empty()
        && n.len() <= 128
        && !n.starts_with('.')
        && n.chars().all(|c| !c.is_control() && c != '/' && c != '\\');
    if !ok {
        return Err(bad(field, format!("{n:?} is not a job name (1 to 128 characters, no '/', no leading '.')")));
    }
    Ok(())
}

fn check_text(field: &str, s: &str, max: usize) -> R {
    if s.len() > max || s.contains('\0') {
        return Err(bad(field, format!("{} bytes or a NUL byte: not a name", s.len())));
    }
    Ok(())
}

fn check_index(field: &str, i: u32, len: usize, of: &str) -> R {
    if (i as usize) < len {
        Ok(())
    } else {
        Err(bad(field, format!("{i} is out of range ({len} {of})")))
    }
}

fn check_signal(field: &str, sig: i32, zero_ok: bool) -> R {
    if (1..=NSIG).contains(&sig) || (zero_ok && sig == 0) {
        Ok(())
    } else {
        Err(bad(field, format!("{sig} is not a signal number")))
    }
}

fn check_file_id(field: &str, f: &FileId) -> R {
    check_path(&format!("{field}.path"), &f.path)?;
    if let Some(b) = &f.build_id
        && (b.len() > 128 || !b.chars().all(|c| c.is_ascii_hexdigit()))
    {
        return Err(bad(format!("{field}.build_id"), "not a hex build-id"));
    }
    Ok(())
}

/// Most supplementary groups a process may have (NGROUPS_MAX).
pub const MAX_GROUPS: usize = 65536;
/// Capabilities as bits: CAP_LAST_CAP is 40 on kernel 6.18; room for some more.
const CAP_BITS: u64 = (1 << 48) - 1;
/// SECBIT_* flags and their locks known up to kernel 6.18 (noroot, no_setuid_fixup, keep_caps,
/// no_cap_ambient_raise, exec_restrict_file, exec_deny_interactive, each with its lock).
const SECUREBITS: u32 = 0xfff;
/// The kernel's limit on the instructions of all of a thread's filters (MAX_INSNS_PER_PATH, with its penalty of 4
/// per filter).
const MAX_FILTER_INSNS: usize = 32768;

/// Ids a restore may give a process or open a file with: (uid_t)-1 means "no change" to the kernel, not an id.
fn check_ids(field: &str, uids: &[u32], gids: &[u32], groups: &[u32]) -> R {
    if uids.iter().chain(gids).chain(groups).any(|&i| i == u32::MAX) {
        return Err(bad(field, "-1 is not an id"));
    }
    if groups.len() > MAX_GROUPS {
        return Err(bad(format!("{field}.groups"), format!("{} supplementary groups", groups.len())));
    }
    Ok(())
}

/// A process's credentials and sandbox: sets the kernel could hold, filters it would install and that leave the
/// shim's own system calls alone (a restored process must be able to checkpoint again).
pub fn check_creds(at: &str, c: &Creds) -> R {
    check_ids(at, &c.uid, &c.gid, &c.groups)?;
    let k = &c.caps;
    let sets = [k.effective, k.permitted, k.inheritable, k.ambient, k.bounding];
    if sets.iter().any(|&s| s & !CAP_BITS != 0) {
        return Err(bad(format!("{at}.caps"), "capabilities the kernel does not have"));
    }
    if k.effective & !k.permitted != 0 || k.ambient & !(k.permitted & k.inheritable) != 0 {
        return Err(bad(format!("{at}.caps"), "an effective capability not permitted, or an ambient one not permitted and inheritable"));
    }
    if c.securebits & !SECUREBITS != 0 {
        return Err(bad(format!("{at}.securebits"), format!("{:#x} has unknown bits", c.securebits)));
    }
    let s = &c.seccomp;
    let at = format!("{at}.seccomp");
    match s.mode {
        0 if s.filters.is_empty() && s.inherited == 0 => {}
        2 if !s.filters.is_empty() || s.inherited > 0 => {}
        m => return Err(bad(format!("{at}.mode"), format!("mode {m} with {} filters and {} inherited", s.filters.len(), s.inherited))),
    }
    let mut insns = 0;
    for (i, f) in s.filters.iter().enumerate() {
        let fat = format!("{at}.filters[{i}]");
        let prog = crate::seccomp::parse(&f.prog).map_err(|e| bad(&fat, e))?;
        insns += prog.len() + 4;
        if crate::seccomp::notifies(&prog) {
            return Err(bad(&fat, "hands calls to a user-space notifier"));
        }
        match crate::seccomp::blocks_shim(&prog) {
            Ok(None) => {}
            Ok(Some((call, what))) => return Err(bad(&fat, format!("would {} for {call}, which vOS needs", crate::seccomp::describe(what)))),
            Err(e) => return Err(bad(&fat, e)),
        }
    }
    if insns > MAX_FILTER_INSNS {
        return Err(bad(format!("{at}.filters"), format!("{insns} instructions in all: more than the kernel takes")));
    }
    Ok(())
}

/// Process ids of the job as a tree a restore can rebuild: every parent is a live process of the job (or the
/// job's init, pid 1), no cycles; a session is the process's own, its parent's, or the one outside the job (0); a
/// group is its own, one whose leader is in the job, or the outside one along with its parent. `ids` lists the
/// live processes first, then zombies. The checkpoint refuses a job whose tree fails this.
pub fn check_tree(ids: &[Ids], live: usize) -> Result<(), String> {
    let get = |pid: i32| ids.iter().find(|i| i.pid == pid);
    for i in ids {
        if i.ppid != 1 && !ids[..live].iter().any(|p| p.pid == i.ppid) {
            return Err(format!("pid {}: its parent {} is not a live process of the job", i.pid, i.ppid));
        }
        // Each step goes up to a live parent; more steps than processes is a cycle.
        let mut at = i.ppid;
        for _ in 0..=ids.len() {
            if at == 1 {
                break;
            }
            at = get(at).map_or(1, |p| p.ppid);
        }
        if at != 1 {
            return Err(format!("pid {}: its parents form a cycle", i.pid));
        }
        let parent = get(i.ppid);
        let (psid, ppgid) = parent.map_or((0, 0), |p| (p.sid, p.pgid));
        if i.sid != 0 && i.sid != i.pid && i.sid != psid {
            return Err(format!("pid {}: its session {} is neither its own nor its parent's", i.pid, i.sid));
        }
        if i.sid == 0 && psid != 0 {
            return Err(format!("pid {}: its session is outside the job but its parent's is not", i.pid));
        }
        if i.pgid == 0 && ppgid != 0 {
            return Err(format!("pid {}: its process group is outside the job but its parent's is not", i.pid));
        }
        if i.pgid != 0 && get(i.pgid).is_none() {
            return Err(format!("pid {}: the leader of its process group {} is not in the job", i.pid, i.pgid));
        }
    }
    Ok(())
}

impl JobImage {
    /// Check the whole description against itself and `header`: see the module's documentation.
    pub fn validate(&self, header: &ImageHeader) -> R {
        check_job_name("header.job.name", &header.job.name)?;
        if self.processes.is_empty() {
            return Err(bad("processes", "the job has no process"));
        }
        if header.processes as usize != self.processes.len() {
            return Err(bad("header.processes", format!("{} processes, but the job lists {}", header.processes, self.processes.len())));
        }
        self.check_ids()?;
        for (i, p) in self.processes.iter().enumerate() {
            self.check_process(&format!("processes[{i}]"), p)?;
        }
        for (i, f) in self.files.iter().enumerate() {
            self.check_file(&format!("files[{i}]"), f)?;
        }
        for (i, p) in self.pipes.iter().enumerate() {
            let at = format!("pipes[{i}]");
            if p.data.len() as u64 > p.capacity as u64 || p.capacity > 1 << 30 {
                return Err(bad(format!("{at}.capacity"), format!("{} bytes in a pipe of {}", p.data.len(), p.capacity)));
            }
            if let Some(path) = &p.fifo {
                check_path(&format!("{at}.fifo"), path)?;
            }
        }
        for (i, s) in self.sockets.iter().enumerate() {
            self.check_socket(&format!("sockets[{i}]"), i, s)?;
        }
        for (i, s) in self.inet.iter().enumerate() {
            check_inet(&format!("inet[{i}]"), s)?;
        }
        for (i, m) in self.shared_memory.iter().enumerate() {
            let at = format!("shared_memory[{i}]");
            check_text(&format!("{at}.name"), &m.name, MAX_PATH)?;
            if m.size > MAX_OBJECT {
                return Err(bad(format!("{at}.size"), format!("{} bytes is too large", m.size)));
            }
            match m.file {
                Some(f) => {
                    check_index(&format!("{at}.file"), f, self.files.len(), "open files")?;
                    if !matches!(self.files[f as usize].kind, FileKind::Memory { .. }) {
                        return Err(bad(format!("{at}.file"), "not a memfd or deleted file"));
                    }
                }
                None => check_index(&format!("{at}.writer"), m.writer, self.processes.len(), "processes")?,
            }
        }
        if let Some(t) = &self.terminal {
            check_termios("terminal.termios", &t.termios)?;
        }
        for (i, p) in self.ptys.iter().enumerate() {
            check_termios(&format!("ptys[{i}].termios"), &p.termios)?;
            // What a pseudo-terminal can hold in flight (the restore writes it back, and would wait for room).
            if p.input.len() > PTY_INPUT || p.output.len() > PTY_OUTPUT {
                return Err(bad(format!("ptys[{i}]"), format!("{} and {} bytes in flight: more than a pseudo-terminal holds", p.input.len(), p.output.len())));
            }
        }
        for (i, d) in self.data.iter().enumerate() {
            if d.size > MAX_OBJECT || d.stored > d.size {
                return Err(bad(format!("data[{i}]"), format!("{} bytes stored of {}", d.stored, d.size)));
            }
        }
        self.check_data_order()?;
        self.check_sysv()?;
        for (i, b) in self.bundle.iter().enumerate() {
            check_path(&format!("bundle[{i}].path"), &b.path)?;
            if self.bundle[..i].iter().any(|o| (o.dev, o.ino) == (b.dev, b.ino)) {
                return Err(bad(format!("bundle[{i}]"), "carried twice"));
            }
        }
        Ok(())
    }

    /// Pids and tids: in range, unique in the job, a tree a restore can rebuild.
    fn check_ids(&self) -> R {
        let ids: Vec<Ids> = self
            .processes
            .iter()
            .map(|p| Ids { pid: p.pid, ppid: p.ppid, pgid: p.pgid, sid: p.sid })
            .chain(self.zombies.iter().map(|z| z.ids))
            .collect();
        let mut seen = BTreeSet::new();
        for (n, i) in ids.iter().enumerate() {
            let at = if n < self.processes.len() { format!("processes[{n}]") } else { format!("zombies[{}]", n - self.processes.len()) };
            for (what, v) in [("pid", i.pid), ("ppid", i.ppid), ("pgid", i.pgid), ("sid", i.sid)] {
                let ok = match what {
                    "pid" => (2..MAX_PID).contains(&v),
                    "ppid" => (1..MAX_PID).contains(&v),
                    _ => v == 0 || (2..MAX_PID).contains(&v),
                };
                if !ok {
                    return Err(bad(format!("{at}.{what}"), format!("{v} is not a process id a job can have")));
                }
            }
            if !seen.insert(i.pid) {
                return Err(bad(format!("{at}.pid"), format!("pid {} appears twice", i.pid)));
            }
        }
        check_tree(&ids, self.processes.len()).map_err(|e| bad("processes", e))?;
        for (n, p) in self.processes.iter().enumerate() {
            // The main thread may have left with pthread_exit; the others go on.
            if p.threads.is_empty() {
                return Err(bad(format!("processes[{n}].threads"), "no thread"));
            }
            for (k, t) in p.threads.iter().enumerate() {
                if t.tid == p.pid {
                    continue;
                }
                if !(2..MAX_PID).contains(&t.tid) || !seen.insert(t.tid) {
                    return Err(bad(format!("processes[{n}].threads[{k}].tid"), format!("{} is out of range or not unique", t.tid)));
                }
            }
        }
        Ok(())
    }

    fn check_process(&self, at: &str, p: &ProcessImage) -> R {
        check_text(&format!("{at}.comm"), &p.comm, 64)?;
        check_file_id(&format!("{at}.exe"), &p.exe)?;
        for (k, t) in p.threads.iter().enumerate() {
            let tat = format!("{at}.threads[{k}]");
            check_text(&format!("{tat}.comm"), &t.comm, 64)?;
            if t.pending.iter().any(|s| s.len() != SIGINFO_LEN) {
                return Err(bad(format!("{tat}.pending"), "a siginfo that is not 128 bytes"));
            }
        }
        self.check_regions(at, p)?;
        let mut fds = BTreeSet::new();
        for (k, f) in p.fds.iter().enumerate() {
            let fat = format!("{at}.fds[{k}]");
            if !(0..=MAX_FD).contains(&f.fd) || !fds.insert(f.fd) {
                return Err(bad(format!("{fat}.fd"), format!("{} is out of range or not unique", f.fd)));
            }
            check_index(&format!("{fat}.file"), f.file, self.files.len(), "open files")?;
        }
        let file_at = |fd: i32| p.fds.iter().find(|f| f.fd == fd).map(|f| &self.files[f.file as usize].kind);
        if let Some(c) = &p.ctty
            && !matches!(file_at(c.fd), Some(FileKind::PtySlave { .. } | FileKind::PtyMaster { .. }))
        {
            return Err(bad(format!("{at}.ctty.fd"), format!("fd {} is not a pseudo-terminal of the job", c.fd)));
        }
        // Watch paths as the program gave them (perhaps relative): only names for the shim's table.
        for (k, w) in p.watches.iter().enumerate() {
            check_text(&format!("{at}.watches[{k}].path"), &w.path, MAX_PATH)?;
        }
        for (k, x) in p.fixups.iter().enumerate() {
            let (fd, ok) = match x {
                FdFixup::Epoll { epfd, .. } => (*epfd, matches!(file_at(*epfd), Some(FileKind::Epoll { .. }))),
                FdFixup::PidFd { fd, pid, .. } => (*fd, matches!(file_at(*fd), Some(FileKind::PidFd { .. })) && self.has_pid(*pid)),
                FdFixup::RecordLock { fd, .. } => (*fd, matches!(file_at(*fd), Some(FileKind::Regular { .. } | FileKind::Memory { .. }))),
            };
            if !ok {
                return Err(bad(format!("{at}.fixups[{k}]"), format!("fd {fd} is not what the fixup needs")));
            }
        }
        let tids = |tid: i32| p.threads.iter().any(|t| t.tid == tid);
        for (k, t) in p.timers.posix.iter().enumerate() {
            let tat = format!("{at}.timers.posix[{k}]");
            check_signal(&format!("{tat}.signo"), t.signo, true)?;
            if !(0..=6).contains(&t.notify) || (t.notify & 4 != 0 && !tids(t.tid)) {
                return Err(bad(format!("{tat}.notify"), format!("notify {} to thread {} of the process", t.notify, t.tid)));
            }
        }
        if p.signals.actions.len() > NSIG as usize {
            return Err(bad(format!("{at}.signals.actions"), format!("{} actions for {NSIG} signals", p.signals.actions.len())));
        }
        if p.signals.pending.iter().any(|s| s.len() != SIGINFO_LEN) {
            return Err(bad(format!("{at}.signals.pending"), "a siginfo that is not 128 bytes"));
        }
        let a = &p.attrs;
        check_path(&format!("{at}.attrs.cwd"), &a.cwd)?;
        check_text(&format!("{at}.attrs.hostname"), &a.hostname, 64)?;
        check_text(&format!("{at}.attrs.domainname"), &a.domainname, 64)?;
        check_signal(&format!("{at}.attrs.pdeath_sig"), a.pdeath_sig, true)?;
        if a.umask > 0o777 {
            return Err(bad(format!("{at}.attrs.umask"), format!("{:#o} is not a umask", a.umask)));
        }
        let mut res = BTreeSet::new();
        for (k, l) in a.rlimits.iter().enumerate() {
            if l.resource >= NLIMITS || !res.insert(l.resource) {
                return Err(bad(format!("{at}.attrs.rlimits[{k}].resource"), format!("{} is not a resource, or twice", l.resource)));
            }
        }
        if let Some(c) = &a.creds {
            check_creds(&format!("{at}.attrs.creds"), c)?;
        }
        if p.mm.auxv.len() > 4096 || !p.mm.auxv.len().is_multiple_of(16) {
            return Err(bad(format!("{at}.mm.auxv"), format!("{} bytes is no auxiliary vector", p.mm.auxv.len())));
        }
        // The restorer jumps into the shim's restart code, on the shim's restart stack.
        let inside = |addr: u64, prot: i32, top: bool| {
            p.regions.iter().any(|r| {
                let within = if top { r.start < addr && addr <= r.end } else { r.start <= addr && addr < r.end };
                within && r.prot & prot as u32 == prot as u32 && matches!(r.contents, Contents::Pages | Contents::File)
            })
        };
        if !inside(p.shim.restart_entry, libc::PROT_EXEC, false) {
            return Err(bad(format!("{at}.shim.restart_entry"), format!("{:#x} is not in the process's code", p.shim.restart_entry)));
        }
        if !p.shim.restart_stack_top.is_multiple_of(16) || !inside(p.shim.restart_stack_top, libc::PROT_READ | libc::PROT_WRITE, true) {
            return Err(bad(format!("{at}.shim.restart_stack_top"), format!("{:#x} is not in the process's writable memory", p.shim.restart_stack_top)));
        }
        // Each thread resumes from the frame the shim saved on its stack.
        for (k, t) in p.threads.iter().enumerate() {
            if !inside(t.park_rsp, libc::PROT_READ | libc::PROT_WRITE, false) {
                return Err(bad(format!("{at}.threads[{k}].park_rsp"), format!("{:#x} is not in the process's writable memory", t.park_rsp)));
            }
        }
        Ok(())
    }

    /// Regions: page aligned, sorted, apart, in user space outside the restorer's window, and their contents
    /// what their kind allows (a shared file mapping keeps its data in its file: no pages).
    fn check_regions(&self, at: &str, p: &ProcessImage) -> R {
        let mut prev_end = 0u64;
        let mut specials = [0u32; 3];
        for (k, r) in p.regions.iter().enumerate() {
            let rat = format!("{at}.regions[{k}]");
            let aligned = r.start % PAGE == 0 && r.end % PAGE == 0;
            if !aligned || r.start >= r.end || r.end > USER_END {
                return Err(bad(&rat, format!("{:#x}-{:#x} is not a range of pages in user space", r.start, r.end)));
            }
            if r.start < prev_end {
                return Err(bad(&rat, format!("{:#x}-{:#x} is out of order or overlaps the region before", r.start, r.end)));
            }
            prev_end = r.end;
            if r.start < WINDOW_END && r.end > WINDOW_START {
                return Err(bad(&rat, format!("{:#x}-{:#x} overlaps the restorer's window", r.start, r.end)));
            }
            if r.prot & !((libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u32) != 0 {
                return Err(bad(format!("{rat}.prot"), format!("{:#x} is not a protection", r.prot)));
            }
            check_text(&format!("{rat}.name"), &r.name, MAX_PATH)?;
            if let Some(f) = &r.file {
                check_file_id(&format!("{rat}.file"), f)?;
            }
            if let Some(m) = r.shared_memory {
                check_index(&format!("{rat}.shared_memory"), m, self.shared_memory.len(), "shared memory objects")?;
            }
            let mut guard_end = r.start;
            for (g, &(a, b)) in r.guards.iter().enumerate() {
                if a % PAGE != 0 || b % PAGE != 0 || a < guard_end || a >= b || b > r.end {
                    return Err(bad(format!("{rat}.guards[{g}]"), format!("{a:#x}-{b:#x} is not a range of pages of the region, in order")));
                }
                guard_end = b;
            }
            let len = r.end - r.start;
            let contents_ok = match r.kind {
                RegionKind::Vdso | RegionKind::Vvar | RegionKind::VvarVclock => {
                    let n = &mut specials[r.kind as usize - RegionKind::Vdso as usize];
                    *n += 1;
                    if *n > 1 || len > MAX_SPECIAL {
                        return Err(bad(&rat, "a second or oversized vDSO region"));
                    }
                    r.contents == Contents::Nothing
                }
                RegionKind::File => {
                    if r.file.is_none() || r.offset % PAGE != 0 {
                        return Err(bad(&rat, "a file mapping without its file, or at an unaligned offset"));
                    }
                    r.contents == if r.shared { Contents::File } else { Contents::Pages }
                }
                RegionKind::SharedAnon => {
                    let Some(m) = r.shared_memory.map(|m| &self.shared_memory[m as usize]) else {
                        return Err(bad(format!("{rat}.shared_memory"), "shared memory without its object"));
                    };
                    // The object's own fields are checked after the processes: look, do not index.
                    let size = match m.file {
                        Some(f) => match self.files.get(f as usize).map(|o| &o.kind) {
                            Some(FileKind::Memory { data, .. }) => self.data.get(*data as usize).map_or(0, |d| d.size),
                            _ => 0,
                        },
                        None => m.size,
                    };
                    // Mapped past the object's end is allowed (those pages fault, as they did); page data can land
                    // only within it (the restore maps the rest apart).
                    if r.offset % PAGE != 0 || (r.contents == Contents::Pages && r.offset > size) {
                        return Err(bad(&rat, "shared memory mapped from beyond its object's end, or at an unaligned offset"));
                    }
                    r.shared && matches!(r.contents, Contents::Pages | Contents::Elsewhere | Contents::Nothing)
                }
                RegionKind::SysvShm => {
                    if !self.sysv.shm.iter().any(|s| s.perm.id as i64 == r.ino as i64 && r.offset.checked_add(len).is_some_and(|e| e <= s.size.next_multiple_of(PAGE))) {
                        return Err(bad(format!("{rat}.ino"), format!("no System V shared memory segment {} holds it", r.ino)));
                    }
                    r.contents == Contents::Elsewhere
                }
                RegionKind::Anon | RegionKind::Heap | RegionKind::Stack | RegionKind::Detached => {
                    !r.shared && matches!(r.contents, Contents::Pages | Contents::Nothing)
                }
            };
            if !contents_ok {
                return Err(bad(
                    format!("{rat}.contents"),
                    format!("{:?} contents for a{} {:?} region", r.contents, if r.shared { " shared" } else { " private" }, r.kind),
                ));
            }
        }
        Ok(())
    }

    fn has_pid(&self, pid: i32) -> bool {
        self.processes.iter().any(|p| p.pid == pid) || self.zombies.iter().any(|z| z.ids.pid == pid)
    }

    fn check_file(&self, at: &str, f: &OpenFile) -> R {
        if f.flags & libc::O_ACCMODE == libc::O_ACCMODE {
            return Err(bad(format!("{at}.flags"), format!("{:#o} is no access mode", f.flags)));
        }
        if let Some(o) = &f.open_as {
            check_ids(&format!("{at}.open_as"), &[o.uid], &[o.gid], &o.groups)?;
        }
        let k = format!("{at}.kind");
        match &f.kind {
            FileKind::Unknown => return Err(bad(k, "an open file of no known kind")),
            FileKind::Regular { file } => check_file_id(&format!("{k}.file"), file)?,
            FileKind::Dir { path } => check_path(&k, path)?,
            FileKind::Device { path } => {
                if !DEVICES.iter().any(|d| d.0 == path) {
                    return Err(bad(k, format!("{path:?} is not a device an image may hold open")));
                }
            }
            FileKind::Terminal { stream, .. } | FileKind::Outside { stream, .. } => {
                if *stream > 2 {
                    return Err(bad(k, format!("stream {stream} is not stdin, stdout or stderr")));
                }
            }
            FileKind::Pipe { pipe, .. } => check_index(&k, *pipe, self.pipes.len(), "pipes")?,
            FileKind::Socket { socket } => check_index(&k, *socket, self.sockets.len(), "unix sockets")?,
            FileKind::Inet { socket } => check_index(&k, *socket, self.inet.len(), "TCP/UDP sockets")?,
            FileKind::PtyMaster { pty } | FileKind::PtySlave { pty } => check_index(&k, *pty, self.ptys.len(), "pseudo-terminals")?,
            FileKind::SignalFd { .. } | FileKind::EventFd { .. } | FileKind::TimerFd { .. } => {}
            FileKind::Epoll { owner, .. } => check_index(&format!("{k}.owner"), *owner, self.processes.len(), "processes")?,
            FileKind::Inotify { watches } => {
                let mut last = 0;
                for (i, w) in watches.iter().enumerate() {
                    // Watched again by name (inotify_add_watch creates and opens nothing).
                    check_text(&format!("{k}.watches[{i}].path"), &w.path, MAX_PATH)?;
                    if w.wd <= last || w.wd > MAX_WATCH {
                        return Err(bad(format!("{k}.watches[{i}].wd"), format!("{} is out of order or range", w.wd)));
                    }
                    last = w.wd;
                }
            }
            FileKind::PidFd { pid } => {
                if !self.has_pid(*pid) {
                    return Err(bad(k, format!("pid {pid} is not in the job")));
                }
            }
            FileKind::Memory { data, name, deleted_from, .. } => {
                check_index(&format!("{k}.data"), *data, self.data.len(), "objects with contents")?;
                check_text(&format!("{k}.name"), name, MAX_PATH)?;
                if let Some(d) = deleted_from {
                    check_path(&format!("{k}.deleted_from"), d)?;
                }
            }
        }
        Ok(())
    }

    fn check_socket(&self, at: &str, i: usize, s: &SocketImage) -> R {
        if ![libc::SOCK_STREAM, libc::SOCK_DGRAM, libc::SOCK_SEQPACKET].contains(&s.kind) {
            return Err(bad(format!("{at}.kind"), format!("{} is not a unix socket type", s.kind)));
        }
        match &s.local {
            SockAddr::Unnamed => {}
            SockAddr::Path(p) => {
                check_path(&format!("{at}.local"), p)?;
                if p.len() > SUN_PATH {
                    return Err(bad(format!("{at}.local"), "too long for a unix socket address"));
                }
            }
            SockAddr::Abstract(n) => {
                if n.len() >= SUN_PATH {
                    return Err(bad(format!("{at}.local"), "too long for a unix socket address"));
                }
            }
        }
        if let Some(p) = s.peer {
            check_index(&format!("{at}.peer"), p, self.sockets.len(), "unix sockets")?;
            let peer = &self.sockets[p as usize];
            if p as usize == i || peer.kind != s.kind || (s.listening || peer.listening) {
                return Err(bad(format!("{at}.peer"), "connected to itself, a listener, or a socket of another type"));
            }
        }
        if s.shutdown > 3 {
            return Err(bad(format!("{at}.shutdown"), format!("{} is no shutdown state", s.shutdown)));
        }
        if !s.queue.is_empty() && s.peer.is_none() {
            return Err(bad(format!("{at}.queue"), "data queued on a socket with no peer to send it"));
        }
        Ok(())
    }

    /// Contents follow the job's metadata in the order the restore takes them: memfds and deleted files (in
    /// open file order), System V shared memory, carried files; each object once.
    fn check_data_order(&self) -> R {
        let files = self.files.iter().enumerate().filter_map(|(i, f)| match f.kind {
            FileKind::Memory { data, .. } => Some((format!("files[{i}].kind.data"), data)),
            _ => None,
        });
        let shm = self.sysv.shm.iter().enumerate().map(|(i, s)| (format!("sysv.shm[{i}].data"), s.data));
        let bundle = self.bundle.iter().enumerate().map(|(i, b)| (format!("bundle[{i}].data"), b.data));
        let mut n = 0u32;
        for (field, d) in files.chain(shm).chain(bundle) {
            if d != n {
                return Err(bad(field, format!("object {d} where object {n} comes (each once, in order)")));
            }
            n += 1;
        }
        if n as usize != self.data.len() {
            return Err(bad("data", format!("{} objects with contents, {n} used", self.data.len())));
        }
        Ok(())
    }

    fn check_sysv(&self) -> R {
        let s = &self.sysv;
        let mut ids = BTreeSet::new();
        let perms = s.shm.iter().map(|x| ("shm", x.perm)).chain(s.sem.iter().map(|x| ("sem", x.perm))).chain(s.msg.iter().map(|x| ("msg", x.perm)));
        for (n, (kind, p)) in perms.enumerate() {
            if p.id < 0 || !ids.insert((kind, p.id)) {
                return Err(bad(format!("sysv.{kind}"), format!("id {} is negative or twice (object {n})", p.id)));
            }
        }
        for (i, x) in s.shm.iter().enumerate() {
            check_index(&format!("sysv.shm[{i}].data"), x.data, self.data.len(), "objects with contents")?;
            if x.size == 0 || x.size > MAX_OBJECT || self.data[x.data as usize].size > x.size {
                return Err(bad(format!("sysv.shm[{i}].size"), format!("{} bytes", x.size)));
            }
        }
        for (i, x) in s.sem.iter().enumerate() {
            if x.values.is_empty() || x.values.len() > 32000 {
                return Err(bad(format!("sysv.sem[{i}].values"), format!("{} semaphores in a set", x.values.len())));
            }
        }
        Ok(())
    }
}

fn check_termios(field: &str, t: &[u8]) -> R {
    if t.len() != core::mem::size_of::<libc::termios>() {
        return Err(bad(field, format!("{} bytes is no termios", t.len())));
    }
    Ok(())
}

fn check_inet(at: &str, s: &InetSocket) -> R {
    let v6 = match s.family {
        libc::AF_INET => false,
        libc::AF_INET6 => true,
        f => return Err(bad(format!("{at}.family"), format!("{f} is not AF_INET or AF_INET6"))),
    };
    if s.kind != libc::SOCK_STREAM && s.kind != libc::SOCK_DGRAM {
        return Err(bad(format!("{at}.kind"), format!("{} is not TCP or UDP", s.kind)));
    }
    for (what, a) in [("local", &s.local), ("peer", &s.peer)] {
        if let Some(a) = a {
            match a.parse::<core::net::SocketAddr>() {
                Ok(sa) if sa.is_ipv6() == v6 => {}
                _ => return Err(bad(format!("{at}.{what}"), format!("{a:?} is not an address of the socket's family"))),
            }
        }
    }
    for (i, o) in s.options.iter().enumerate() {
        if !INET_OPTIONS.contains(&(o.0, o.1)) {
            return Err(bad(format!("{at}.options[{i}]"), format!("option {}/{} is not one a restore sets", o.0, o.1)));
        }
    }
    match &s.state {
        InetState::Open | InetState::Reset => {}
        InetState::Listening { .. } if s.local.is_some() && s.kind == libc::SOCK_STREAM => {}
        InetState::Connected(c) if s.local.is_some() && s.peer.is_some() && s.kind == libc::SOCK_STREAM => {
            if c.unsent as usize > c.send_queue.len() {
                return Err(bad(format!("{at}.state.unsent"), format!("{} unsent of {} queued", c.unsent, c.send_queue.len())));
            }
        }
        _ => return Err(bad(format!("{at}.state"), "a listener or connection without its addresses")),
    }
    Ok(())
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use alloc::vec;

    fn file(path: &str) -> FileId {
        FileId { path: path.into(), ..Default::default() }
    }

    /// A small job that passes: one process with code, a heap and a stack, three fds.
    fn job() -> (ImageHeader, JobImage) {
        let mut h = ImageHeader { processes: 1, ..Default::default() };
        h.job.name = "calc".into();
        let code = Region {
            start: 0x40_0000,
            end: 0x40_2000,
            prot: (libc::PROT_READ | libc::PROT_EXEC) as u32,
            kind: RegionKind::File,
            file: Some(file("/usr/bin/calc")),
            ..Default::default()
        };
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u32;
        let heap = Region { start: 0x60_0000, end: 0x70_0000, prot: rw, kind: RegionKind::Heap, ..Default::default() };
        let stack = Region { start: 0x7ffd_0000_0000, end: 0x7ffd_0002_0000, prot: rw, kind: RegionKind::Stack, ..Default::default() };
        let p = ProcessImage {
            pid: 2,
            ppid: 1,
            pgid: 2,
            sid: 2,
            exe: file("/usr/bin/calc"),
            threads: vec![ThreadImage { tid: 2, park_rsp: 0x7ffd_0001_0000, ..Default::default() }],
            regions: vec![code, heap, stack],
            fds: vec![FdImage { fd: 0, cloexec: false, file: 0 }, FdImage { fd: 1, cloexec: false, file: 1 }, FdImage { fd: 5, cloexec: true, file: 2 }],
            attrs: ProcessAttrs { cwd: "/tmp".into(), ..Default::default() },
            shim: ShimImage { restart_entry: 0x40_1000, restart_stack_top: 0x70_0000 },
            ..Default::default()
        };
        let j = JobImage {
            processes: vec![p],
            files: vec![
                OpenFile { kind: FileKind::Device { path: "/dev/null".into() }, ..Default::default() },
                OpenFile { kind: FileKind::Pipe { pipe: 0, write: true }, flags: libc::O_WRONLY, ..Default::default() },
                OpenFile { kind: FileKind::Memory { data: 0, name: "buf".into(), seals: 0, deleted_from: None, dev: 0, ino: 0 }, ..Default::default() },
            ],
            pipes: vec![PipeImage { capacity: 65536, ..Default::default() }],
            data: vec![DataImage { size: 8192, stored: 4096 }],
            ..Default::default()
        };
        (h, j)
    }

    /// `f` breaks the good job; validation must name `field`.
    fn refused(field: &str, f: impl FnOnce(&mut ImageHeader, &mut JobImage)) {
        let (mut h, mut j) = job();
        f(&mut h, &mut j);
        match j.validate(&h) {
            Ok(()) => panic!("{field}: accepted"),
            Err(e) => assert!(e.field.starts_with(field), "expected {field}, got {e}"),
        }
    }

    #[test]
    fn a_good_job_passes() {
        let (h, j) = job();
        j.validate(&h).unwrap();
    }

    #[test]
    fn indices_out_of_range() {
        refused("processes[0].fds[2].file", |_, j| j.processes[0].fds[2].file = 3);
        refused("processes[0].fds[2].file", |_, j| j.processes[0].fds[2].file = u32::MAX);
        refused("files[1].kind", |_, j| j.files[1].kind = FileKind::Pipe { pipe: 1, write: true });
        refused("files[1].kind", |_, j| j.files[1].kind = FileKind::Socket { socket: 0 });
        refused("files[1].kind", |_, j| j.files[1].kind = FileKind::Inet { socket: 0 });
        refused("files[1].kind", |_, j| j.files[1].kind = FileKind::PtySlave { pty: 0 });
        refused("files[1].kind.owner", |_, j| j.files[1].kind = FileKind::Epoll { items: vec![], owner: 1 });
        refused("files[2].kind.data", |_, j| j.files[2].kind = FileKind::Memory { data: 9, name: "x".into(), seals: 0, deleted_from: None, dev: 0, ino: 0 });
        refused("bundle[0].data", |_, j| {
            j.bundle.push(BundledFile { path: "/lib/x.so".into(), data: 7, ..Default::default() });
        });
        refused("shared_memory[0].writer", |_, j| j.shared_memory.push(SharedMemory { writer: 1, ..Default::default() }));
        refused("shared_memory[0].file", |_, j| j.shared_memory.push(SharedMemory { file: Some(1), ..Default::default() }));
        // A region that maps the object is checked first: it must look the file up, not index by it.
        refused("shared_memory[0].file", |_, j| {
            j.shared_memory.push(SharedMemory { file: Some(7), ..Default::default() });
            let r = &mut j.processes[0].regions[1];
            (r.kind, r.shared, r.shared_memory) = (RegionKind::SharedAnon, true, Some(0));
        });
        refused("sysv.shm[0].data", |_, j| j.sysv.shm.push(SysvShm { size: 4096, data: 3, ..Default::default() }));
        refused("files[1].kind", |_, j| j.files[1].kind = FileKind::PidFd { pid: 77 });
        refused("sockets[0].peer", |_, j| {
            j.sockets.push(SocketImage { kind: libc::SOCK_STREAM, peer: Some(4), ..Default::default() });
        });
    }

    #[test]
    fn counts_and_ids() {
        refused("header.processes", |h, _| h.processes = 2);
        refused("processes", |h, j| {
            j.processes.clear();
            h.processes = 0;
        });
        refused("processes[0].pid", |_, j| j.processes[0].pid = 1);
        refused("processes[0].ppid", |_, j| j.processes[0].ppid = -5);
        refused("processes", |_, j| j.processes[0].ppid = 3);
        refused("processes[0].threads", |_, j| j.processes[0].threads.clear());
        refused("zombies[0].pid", |_, j| j.zombies.push(ZombieImage { ids: Ids { pid: 2, ppid: 2, pgid: 2, sid: 2 }, ..Default::default() }));
        refused("processes[0].threads[1].tid", |_, j| j.processes[0].threads.push(ThreadImage { tid: i32::MAX, ..Default::default() }));
        refused("processes[0].threads[0].park_rsp", |_, j| j.processes[0].threads[0].park_rsp = 0);
        refused("header.job.name", |h, _| h.job.name = "../../etc/cron.d/x".into());
        refused("header.job.name", |h, _| h.job.name = String::new());
    }

    #[test]
    fn process_cycles_are_refused() {
        refused("processes", |h, j| {
            let mut q = j.processes[0].clone();
            q.pid = 3;
            q.threads[0].tid = 3;
            q.ppid = 2;
            j.processes[0].ppid = 3;
            j.processes.push(q);
            h.processes = 2;
        });
    }

    #[test]
    fn regions() {
        refused("processes[0].regions[1]", |_, j| j.processes[0].regions[1].start = 0x60_0001);
        refused("processes[0].regions[1]", |_, j| j.processes[0].regions[1].end = j.processes[0].regions[1].start);
        refused("processes[0].regions[2]", |_, j| j.processes[0].regions[2].end = !0xfff);
        refused("processes[0].regions[1]", |_, j| j.processes[0].regions[1].start = 0x40_1000);
        refused("processes[0].regions[1]", |_, j| {
            let r = &mut j.processes[0].regions[1];
            (r.start, r.end) = (WINDOW_START + 4096, WINDOW_START + 8192);
            j.processes[0].regions.swap(1, 2);
            j.processes[0].regions.swap(1, 2);
        });
        // A private file mapping marked shared still carries pages: the restore would write them into the file.
        refused("processes[0].regions[0].contents", |_, j| j.processes[0].regions[0].shared = true);
        refused("processes[0].regions[0].contents", |_, j| j.processes[0].regions[0].contents = Contents::File);
        refused("processes[0].regions[1].contents", |_, j| j.processes[0].regions[1].contents = Contents::File);
        refused("processes[0].regions[1].contents", |_, j| j.processes[0].regions[1].shared = true);
        refused("processes[0].regions[0]", |_, j| j.processes[0].regions[0].file = None);
        refused("processes[0].regions[1].shared_memory", |_, j| {
            let r = &mut j.processes[0].regions[1];
            (r.kind, r.shared) = (RegionKind::SharedAnon, true);
        });
        refused("processes[0].regions[1]", |_, j| {
            j.shared_memory.push(SharedMemory { size: 4096, ..Default::default() });
            let r = &mut j.processes[0].regions[1];
            (r.kind, r.shared, r.shared_memory, r.offset) = (RegionKind::SharedAnon, true, Some(0), 8192);
        });
        refused("processes[0].regions[1].ino", |_, j| {
            let r = &mut j.processes[0].regions[1];
            (r.kind, r.shared, r.contents) = (RegionKind::SysvShm, true, Contents::Elsewhere);
        });
        refused("processes[0].shim.restart_entry", |_, j| j.processes[0].shim.restart_entry = 0x60_0000);
        refused("processes[0].shim.restart_stack_top", |_, j| j.processes[0].shim.restart_stack_top = 0x40_2000);
    }

    #[test]
    fn credentials() {
        let creds = |f: &dyn Fn(&mut Creds)| {
            let mut c = Creds { uid: [1000; 4], gid: [1000; 4], ..Default::default() };
            c.caps.bounding = (1 << 41) - 1;
            f(&mut c);
            c
        };
        let with = |c: Creds| move |_: &mut ImageHeader, j: &mut JobImage| j.processes[0].attrs.creds = Some(c);
        let (h, mut j) = job();
        j.processes[0].attrs.creds = Some(creds(&|_| {}));
        j.validate(&h).unwrap();
        refused("processes[0].attrs.creds", with(creds(&|c| c.uid[1] = u32::MAX)));
        refused("processes[0].attrs.creds.groups", with(creds(&|c| c.groups = vec![5; MAX_GROUPS + 1])));
        refused("processes[0].attrs.creds.caps", with(creds(&|c| c.caps.effective = 1)));
        refused("processes[0].attrs.creds.caps", with(creds(&|c| (c.caps.permitted, c.caps.ambient) = (2, 2))));
        refused("processes[0].attrs.creds.caps", with(creds(&|c| c.caps.bounding = u64::MAX)));
        refused("processes[0].attrs.creds.securebits", with(creds(&|c| c.securebits = 0x1000)));
        refused("processes[0].attrs.creds.seccomp.mode", with(creds(&|c| c.seccomp.mode = 1)));
        refused("processes[0].attrs.creds.seccomp.mode", with(creds(&|c| c.seccomp.mode = 2)));
        let filter = |words: &[(u16, u32)]| SeccompFilter {
            prog: serde_bytes::ByteBuf::from(words.iter().flat_map(|&(code, k)| [code.to_ne_bytes().to_vec(), vec![0, 0], k.to_ne_bytes().to_vec()].concat()).collect::<Vec<u8>>()),
            log: false,
        };
        let allow = filter(&[(0x06, crate::seccomp::RET_ALLOW)]);
        j.processes[0].attrs.creds = Some(creds(&|c| (c.seccomp.mode, c.seccomp.filters) = (2, vec![allow.clone()])));
        j.validate(&h).unwrap();
        let kill_all = filter(&[(0x06, crate::seccomp::RET_KILL_PROCESS)]);
        refused("processes[0].attrs.creds.seccomp.filters[1]", with(creds(&|c| (c.seccomp.mode, c.seccomp.filters) = (2, vec![allow.clone(), kill_all.clone()]))));
        let notify = filter(&[(0x06, crate::seccomp::RET_USER_NOTIF)]);
        refused("processes[0].attrs.creds.seccomp.filters[0]", with(creds(&|c| (c.seccomp.mode, c.seccomp.filters) = (2, vec![notify.clone()]))));
        let broken = SeccompFilter { prog: serde_bytes::ByteBuf::from(vec![0u8; 5]), log: false };
        refused("processes[0].attrs.creds.seccomp.filters[0]", with(creds(&|c| (c.seccomp.mode, c.seccomp.filters) = (2, vec![broken.clone()]))));
        refused("files[0].open_as", |_, j| j.files[0].open_as = Some(FsCreds { uid: u32::MAX, gid: 0, groups: vec![] }));
    }

    #[test]
    fn names_paths_and_numbers() {
        refused("processes[0].attrs.cwd", |_, j| j.processes[0].attrs.cwd = "../".into());
        refused("processes[0].exe.path", |_, j| j.processes[0].exe.path = "/bin/\0sh".into());
        refused("processes[0].exe.path", |_, j| j.processes[0].exe.path = alloc::format!("/{}", "a".repeat(5000)));
        refused("files[0].kind", |_, j| j.files[0].kind = FileKind::Device { path: "/dev/sda".into() });
        refused("files[0].kind", |_, j| j.files[0].kind = FileKind::Dir { path: "tmp".into() });
        refused("files[0].kind", |_, j| j.files[0].kind = FileKind::Unknown);
        refused("files[0].kind", |_, j| j.files[0].kind = FileKind::Terminal { path: "/dev/tty".into(), stream: 3 });
        refused("files[0].flags", |_, j| j.files[0].flags = 3);
        refused("pipes[0].fifo", |_, j| j.pipes[0].fifo = Some("../x".into()));
        refused("pipes[0].capacity", |_, j| j.pipes[0].data = serde_bytes::ByteBuf::from(vec![0; 70000]));
        refused("processes[0].fds[1].fd", |_, j| j.processes[0].fds[1].fd = 0);
        refused("processes[0].fds[1].fd", |_, j| j.processes[0].fds[1].fd = -1);
        refused("processes[0].fds[1].fd", |_, j| j.processes[0].fds[1].fd = i32::MAX);
        refused("processes[0].attrs.rlimits[0].resource", |_, j| j.processes[0].attrs.rlimits.push(Rlimit { resource: 99, cur: 0, max: 0 }));
        refused("processes[0].attrs.pdeath_sig", |_, j| j.processes[0].attrs.pdeath_sig = 65);
        refused("processes[0].timers.posix[0].signo", |_, j| j.processes[0].timers.posix.push(PosixTimer { signo: -1, ..Default::default() }));
        refused("processes[0].timers.posix[0].notify", |_, j| {
            j.processes[0].timers.posix.push(PosixTimer { signo: 14, notify: 4, tid: 99, ..Default::default() })
        });
        refused("processes[0].signals.pending", |_, j| j.processes[0].signals.pending.push(serde_bytes::ByteBuf::from(vec![0; 3])));
        refused("processes[0].mm.auxv", |_, j| j.processes[0].mm.auxv = serde_bytes::ByteBuf::from(vec![0; 1 << 20]));
        refused("sockets[0].local", |_, j| {
            j.sockets.push(SocketImage { kind: libc::SOCK_STREAM, local: SockAddr::Path(alloc::format!("/{}", "s".repeat(200))), ..Default::default() })
        });
        refused("sockets[0].kind", |_, j| j.sockets.push(SocketImage { kind: 77, ..Default::default() }));
        refused("inet[0].local", |_, j| {
            j.inet.push(InetSocket { family: libc::AF_INET, kind: libc::SOCK_STREAM, local: Some("[::1]:80".into()), ..Default::default() })
        });
        refused("inet[0].options[0]", |_, j| {
            j.inet.push(InetSocket { family: libc::AF_INET, kind: libc::SOCK_STREAM, options: vec![(1, 25, 0)], ..Default::default() })
        });
        refused("inet[0].state.unsent", |_, j| {
            let c = TcpConnection { unsent: 5, ..Default::default() };
            j.inet.push(InetSocket {
                family: libc::AF_INET,
                kind: libc::SOCK_STREAM,
                local: Some("1.2.3.4:5".into()),
                peer: Some("1.2.3.4:6".into()),
                state: InetState::Connected(c),
                ..Default::default()
            })
        });
        refused("files[1].kind.watches[1].wd", |_, j| {
            let w = |wd| InotifyWatch { wd, mask: 0, path: "/tmp".into() };
            j.files[1].kind = FileKind::Inotify { watches: vec![w(3), w(2)] };
        });
        refused("ptys[0].termios", |_, j| j.ptys.push(PtyImage::default()));
        refused("ptys[0]", |_, j| {
            let termios = serde_bytes::ByteBuf::from(vec![0; core::mem::size_of::<libc::termios>()]);
            j.ptys.push(PtyImage { termios, input: serde_bytes::ByteBuf::from(vec![b'x'; 1 << 20]), ..Default::default() })
        });
    }

    #[test]
    fn data_objects_come_once_in_order() {
        refused("data", |_, j| j.data.push(DataImage::default()));
        refused("bundle[0].data", |_, j| {
            j.data.push(DataImage::default());
            j.bundle.push(BundledFile { path: "/lib/x.so".into(), data: 0, ..Default::default() });
        });
        refused("data[0]", |_, j| j.data[0].stored = 9000);
    }

    #[test]
    fn tree_rules() {
        let ids = |v: &[(i32, i32, i32, i32)]| v.iter().map(|&(pid, ppid, pgid, sid)| Ids { pid, ppid, pgid, sid }).collect::<Vec<_>>();
        assert!(check_tree(&ids(&[(2, 1, 2, 2), (3, 2, 2, 2), (4, 3, 4, 2)]), 3).is_ok());
        assert!(check_tree(&ids(&[(2, 1, 0, 0), (3, 2, 0, 0)]), 2).is_ok());
        assert!(check_tree(&ids(&[(2, 1, 2, 2), (3, 2, 2, 5)]), 2).is_err());
        assert!(check_tree(&ids(&[(2, 1, 2, 2), (3, 2, 0, 2)]), 2).is_err());
        assert!(check_tree(&ids(&[(2, 1, 2, 2), (3, 4, 3, 2), (4, 3, 4, 2)]), 3).is_err());
        // A zombie parents nobody.
        assert!(check_tree(&ids(&[(2, 1, 2, 2), (4, 3, 2, 2), (3, 2, 2, 2)]), 2).is_err());
    }
}
