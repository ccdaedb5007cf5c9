//! `vrun inspect`: what an image holds, as a report or as JSON. Reads (and so verifies) the whole image. Every
//! string of the image is the job's (or whoever wrote the file): the report escapes each one it prints, so none
//! can move the cursor, clear the screen or hide text (JSON is escaped by serde).

use crate::output::escape::{escape as e, escape_bytes};
use crate::image::file::{Reader, Trust};
use anyhow::{Result, anyhow};
use serde::Serialize;
use vos::image::{Contents, FileKind, ImageHeader, JobImage, OpenFile, ProcessSummary, RegionKind};

#[derive(Serialize)]
struct Report {
    source: String,
    format: u32,
    /// The uid owning the image file (or standard input): whoever could have written it.
    owner: u32,
    /// The signature: None, or the id of the key that made it and whether that key checked it.
    signature: Option<Signature>,
    header: ImageHeader,
    job: JobImage,
    /// Per process (in the order of `job.processes`): what was stored.
    summaries: Vec<ProcessSummary>,
}

#[derive(Serialize)]
struct Signature {
    key_id: String,
    verified: bool,
}

/// `mappings`: list every mapping of every process (the report otherwise gives their totals). With a key (named,
/// or the host's), only an image it signed is read, unless `trust_unsigned`.
pub fn run(src: &str, json: bool, mappings: bool, image_key: Option<&std::path::Path>, trust_unsigned: bool) -> Result<()> {
    let key = crate::image::sign::resolve(image_key)?;
    let mut r = Reader::open(src, Trust { key: key.as_ref(), unsigned_ok: trust_unsigned, channel: false })?;
    let header = r.header()?;
    let job = r.job()?;
    // The report indexes and sizes by the metadata: it must hold together first.
    job.validate(&header).map_err(|e| anyhow!("{}: {e}", r.name))?;
    for (i, d) in job.data.iter().enumerate() {
        r.data(i as u32, d, &mut |_, _| Ok(()))?;
    }
    let mut summaries = Vec::new();
    for p in &job.processes {
        summaries.push(r.skip_pages(p)?.0);
    }
    r.end()?;
    let signature = r.signature.map(|s| Signature { key_id: crate::image::sign::hex(&s.key_id), verified: r.verified });
    let rep = Report { source: r.name.clone(), format: vos::chunk::FORMAT_VERSION, owner: r.owner(), signature, header, job, summaries };
    if json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        print_report(&rep, mappings);
    }
    Ok(())
}

fn size(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn prot(p: u32) -> String {
    let f = |bit: i32, c: char| if p & bit as u32 != 0 { c } else { '-' };
    format!("{}{}{}", f(libc::PROT_READ, 'r'), f(libc::PROT_WRITE, 'w'), f(libc::PROT_EXEC, 'x'))
}

/// What a process's memory came to in the image.
#[derive(Default)]
struct Memory {
    stored: u64,
    from_files: u64,
    untouched: u64,
    zero_pages: u64,
}

impl Memory {
    fn line(&self) -> String {
        format!(
            "{} stored, {} mapped from files at restore, {} never touched, {} zero pages skipped",
            size(self.stored),
            size(self.from_files),
            size(self.untouched),
            self.zero_pages
        )
    }
}

/// One mapping: how it travels, and what it adds to the totals.
fn mapping(r: &vos::image::Region, s: vos::image::RegionSummary, m: &mut Memory) -> String {
    let len = r.end - r.start;
    let stored = s.stored.saturating_mul(4096);
    m.stored = m.stored.saturating_add(stored);
    m.zero_pages = m.zero_pages.saturating_add(s.zero);
    match (&r.contents, r.kind) {
        (_, RegionKind::Vdso | RegionKind::Vvar | RegionKind::VvarVclock) => "kernel's, not stored".to_string(),
        (Contents::File, _) => "shared file, data stays in the file".to_string(),
        (Contents::Nothing, RegionKind::Detached) => "past the end of its file (SIGBUS), nothing to store".to_string(),
        (Contents::Nothing, _) => "nothing to store".to_string(),
        (Contents::Elsewhere, _) => "shared memory, stored with another process".to_string(),
        (Contents::Pages, RegionKind::File) => {
            m.from_files += len.saturating_sub(stored);
            format!("{} stored (copied on write), rest from the file", size(stored))
        }
        (Contents::Pages, _) => {
            let untouched = len.saturating_sub(s.stored.saturating_add(s.zero).saturating_mul(4096));
            m.untouched += untouched;
            if r.prot == 0 && s.stored == 0 {
                "guard, nothing stored".to_string()
            } else {
                let guards: u64 = r.guards.iter().map(|(a, b)| b - a).sum();
                let guards = if guards > 0 { format!(", {} of guard pages", size(guards)) } else { String::new() };
                format!("{} stored, {} zero pages skipped, {} never touched{guards}", size(stored), s.zero, size(untouched))
            }
        }
    }
}

/// A kind of open file, as the report counts them.
fn kind_name(k: &FileKind) -> &'static str {
    match k {
        FileKind::Regular { .. } => "file",
        FileKind::Dir { .. } => "directory",
        FileKind::Device { .. } => "device",
        FileKind::Terminal { .. } => "terminal",
        FileKind::Outside { .. } => "stdio from outside",
        FileKind::Pipe { .. } => "pipe",
        FileKind::Socket { .. } => "unix socket",
        FileKind::Inet { .. } => "TCP/UDP socket",
        FileKind::PtyMaster { .. } | FileKind::PtySlave { .. } => "pseudo-terminal",
        FileKind::SignalFd { .. } => "signalfd",
        FileKind::EventFd { .. } => "eventfd",
        FileKind::TimerFd { .. } => "timerfd",
        FileKind::Epoll { .. } => "epoll",
        FileKind::Inotify { .. } => "inotify",
        FileKind::PidFd { .. } => "pidfd",
        FileKind::Memory { .. } => "memfd or deleted file",
        FileKind::Unknown => "unknown",
    }
}

fn print_report(rep: &Report, mappings: bool) {
    let h = &rep.header;
    let when = crate::output::time::timestamp_of(h.created_unix_ns / 1_000_000_000);
    println!("image      {} (format {}, owned by uid {})", rep.source, rep.format, rep.owner);
    match &rep.signature {
        Some(s) if s.verified => println!("signature  keyed BLAKE3 by key {}, checked", s.key_id),
        Some(s) => println!("signature  keyed BLAKE3 by key {}, not checked (no key given)", s.key_id),
        None => println!("signature  none"),
    }
    println!("taken      {when} UTC, reason: {}", e(&h.reason));
    println!(
        "host       {} ({}, kernel {}, glibc {}, {} CPU, XCR0 {:#x}, XSAVE {} bytes)",
        e(&h.host.hostname),
        e(&h.host.arch),
        e(&h.host.kernel),
        e(&h.host.glibc),
        e(&h.host.cpu.vendor),
        h.host.cpu.xcr0,
        h.host.cpu.xsave_size
    );
    println!("vdso       build-id {}, {} bytes", e(&h.host.vdso.build_id), h.host.vdso.vdso_len);
    println!("job        {}: {}", e(&h.job.name), argv(&h.job.argv));
    let job = &rep.job;
    println!("tree       {} processes, {} zombies", job.processes.len(), job.zombies.len());
    print_tree(job, 1, 1);
    if let Some(t) = &job.terminal {
        println!("terminal   {}x{}, foreground group {}", t.cols, t.rows, if t.foreground == 0 { "outside the job".into() } else { t.foreground.to_string() });
    }
    let mut all = Memory::default();
    for (p, sum) in job.processes.iter().zip(&rep.summaries) {
        for (i, r) in p.regions.iter().enumerate() {
            mapping(r, sum.regions.get(i).copied().unwrap_or_default(), &mut all);
        }
    }
    println!("memory     {}", all.line());
    let mut kinds: Vec<(&str, usize)> = vec![];
    for f in job.processes.iter().flat_map(|p| &p.fds) {
        let k = kind_name(&job.files[f.file as usize].kind);
        match kinds.iter_mut().find(|(n, _)| *n == k) {
            Some(e) => e.1 += 1,
            None => kinds.push((k, 1)),
        }
    }
    let by_kind: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
    println!("fds        {} ({} open files): {}", kinds.iter().map(|k| k.1).sum::<usize>(), job.files.len(), by_kind.join(", "));
    let pages: u64 = rep.summaries.iter().map(|s| s.bytes).sum();
    let data: u64 = job.data.iter().map(|d| d.stored).sum();
    println!("size       {} of memory pages, {} of file contents", size(pages), size(data));
    if !job.pipes.is_empty() || !job.sockets.is_empty() || !job.shared_memory.is_empty() {
        println!(
            "shared     {} pipes ({} bytes in flight), {} sockets ({} queued), {} shared memory objects",
            job.pipes.len(),
            job.pipes.iter().map(|p| p.data.len()).sum::<usize>(),
            job.sockets.len(),
            job.sockets.iter().map(|s| s.queue.iter().map(|q| q.len()).sum::<usize>()).sum::<usize>(),
            job.shared_memory.len()
        );
    }
    let s = &job.sysv;
    if !(s.shm.is_empty() && s.sem.is_empty() && s.msg.is_empty()) {
        let queued: usize = s.msg.iter().map(|q| q.messages.len()).sum();
        println!("System V   {} shared memory segments, {} semaphore sets, {} message queues ({queued} messages)", s.shm.len(), s.sem.len(), s.msg.len());
    }
    if !job.bundle.is_empty() {
        let bytes: u64 = job.bundle.iter().map(|b| job.data[b.data as usize].size).sum();
        println!("carried    {} files, {:.1} MiB (mapped from the image at restore)", job.bundle.len(), bytes as f64 / (1 << 20) as f64);
        for b in &job.bundle {
            println!("  {}", e(&b.path));
        }
    }
    for (p, sum) in job.processes.iter().zip(&rep.summaries) {
        println!();
        println!("process    pid {} (parent {}, group {}, session {}) {}: {}", p.pid, p.ppid, p.pgid, p.sid, e(&p.comm), argv(&p.argv));
        println!("program    {}", e(&p.exe.path));
        println!("cwd        {}", e(&p.attrs.cwd));
        print_creds(&p.attrs);
        println!("threads    {}", p.threads.len());
        for t in &p.threads {
            println!(
                "  tid {:<7} {:<16} rip {:#014x} rsp {:#014x} sigmask {:#x}{}{}",
                t.tid,
                e(&t.comm),
                t.rip,
                t.rsp,
                t.sigmask,
                if t.altstack.is_some() { " altstack" } else { "" },
                if t.pending.is_empty() { String::new() } else { format!(" {} pending", t.pending.len()) }
            );
        }
        let mut m = Memory::default();
        let lines: Vec<String> = p
            .regions
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let how = mapping(r, sum.regions.get(i).copied().unwrap_or_default(), &mut m);
                format!("  {:#014x}-{:#014x} {:>9} {} {:<28} {how}", r.start, r.end, size(r.end - r.start), prot(r.prot), trim(&e(&r.name), 28))
            })
            .collect();
        println!("memory     {} mappings: {}", p.regions.len(), m.line());
        if mappings {
            lines.iter().for_each(|l| println!("{l}"));
        }
        println!("fds        {}", p.fds.len());
        for f in &p.fds {
            let o = &job.files[f.file as usize];
            let sharers: Vec<String> = job
                .processes
                .iter()
                .flat_map(|q| q.fds.iter().filter(|g| g.file == f.file && !(q.pid == p.pid && g.fd == f.fd)).map(move |g| format!("{}:{}", q.pid, g.fd)))
                .collect();
            let shared = if sharers.is_empty() { String::new() } else { format!(", shared with {}", sharers.join(" ")) };
            let opener = match &o.open_as {
                Some(c) if p.attrs.creds.as_ref().is_none_or(|own| own.fs() != *c) => format!(", reopened as uid {} gid {}", c.uid, c.gid),
                _ => String::new(),
            };
            println!("  {:<4} {}, flags {:#o}{}{shared}{opener}", f.fd, describe(job, o), o.flags, if f.cloexec { ", cloexec" } else { "" });
        }
        let handled = p.signals.actions.iter().filter(|a| a.handler > 1).count();
        println!("signals    {handled} handlers, {} pending for the process", p.signals.pending.len());
        println!("image data {} in page chunks", size(sum.bytes));
    }
}

/// SECBIT_* names, bit by bit.
const SECUREBITS: [&str; 12] = [
    "noroot",
    "noroot_locked",
    "no_setuid_fixup",
    "no_setuid_fixup_locked",
    "keep_caps",
    "keep_caps_locked",
    "no_cap_ambient_raise",
    "no_cap_ambient_raise_locked",
    "exec_restrict_file",
    "exec_restrict_file_locked",
    "exec_deny_interactive",
    "exec_deny_interactive_locked",
];

/// Who a process is and what confines it.
fn print_creds(a: &vos::image::ProcessAttrs) {
    let Some(c) = &a.creds else {
        println!("user       (not recorded: an older image) capabilities effective {:#x} permitted {:#x} inheritable {:#x}", a.caps.effective, a.caps.permitted, a.caps.inheritable);
        return;
    };
    let ids = |v: &[u32; 4]| format!("{}/{}/{}/{}", v[0], v[1], v[2], v[3]);
    let groups: Vec<String> = c.groups.iter().map(|g| g.to_string()).collect();
    let ns = if c.user_ns { ", in vrun's user namespace" } else { "" };
    println!("user       uid {} gid {} (real/effective/saved/fs), groups [{}]{ns}", ids(&c.uid), ids(&c.gid), groups.join(" "));
    let k = &c.caps;
    println!(
        "caps       effective {:#x} permitted {:#x} inheritable {:#x} ambient {:#x} bounding {:#x}",
        k.effective, k.permitted, k.inheritable, k.ambient, k.bounding
    );
    let bits: Vec<&str> = SECUREBITS.iter().enumerate().filter(|(i, _)| c.securebits & (1 << i) != 0).map(|(_, n)| *n).collect();
    let bits = if bits.is_empty() { "none".to_string() } else { bits.join(",") };
    let seccomp = match (c.seccomp.mode, c.seccomp.filters.len(), c.seccomp.inherited) {
        (0, _, _) => "no seccomp".to_string(),
        (_, n, 0) => format!("seccomp: {n} filters"),
        (_, n, i) => format!("seccomp: {n} filters (and {i} of the supervising vrun's own)"),
    };
    let logged = c.seccomp.filters.iter().filter(|f| f.log).count();
    let logged = if logged > 0 { format!(", {logged} logging") } else { String::new() };
    let cwd = if c.privileged_cwd { ", working directory only root reaches" } else { "" };
    println!(
        "sandbox    securebits {bits}, no_new_privs {}, {seccomp}{logged}, dumpable {}{cwd}",
        c.no_new_privs as u8, a.dumpable
    );
    for (i, f) in c.seccomp.filters.iter().enumerate() {
        println!("  filter {i}: {} instructions", f.prog.len() / 8);
    }
}

fn print_tree(job: &JobImage, parent: i32, depth: usize) {
    for p in job.processes.iter().filter(|p| p.ppid == parent) {
        println!("{}{} {} ({} threads)", "  ".repeat(depth), p.pid, e(&p.comm), p.threads.len());
        print_tree(job, p.pid, depth + 1);
    }
    for z in job.zombies.iter().filter(|z| z.ids.ppid == parent) {
        println!("{}{} {} (zombie, status {:#x})", "  ".repeat(depth), z.ids.pid, e(&z.comm), z.status);
    }
}

fn describe(job: &JobImage, o: &OpenFile) -> String {
    match &o.kind {
        FileKind::Regular { file } => format!("file {} at offset {}", e(&file.path), o.pos),
        FileKind::Dir { path } => format!("directory {}", e(path)),
        FileKind::Device { path } => format!("device {}", e(path)),
        FileKind::Terminal { path, stream } => format!("terminal {} (re-bound to restore's {})", e(path), stream_name(*stream)),
        FileKind::Outside { what, stream } => format!("{} (re-bound to restore's {})", e(what), stream_name(*stream)),
        FileKind::Pipe { pipe, write } => {
            let p = &job.pipes[*pipe as usize];
            format!("{} end of pipe {pipe}{} ({} bytes in flight)", if *write { "write" } else { "read" }, p.fifo.as_ref().map(|f| format!(" (FIFO {})", e(f))).unwrap_or_default(), p.data.len())
        }
        FileKind::Socket { socket } => {
            let s = &job.sockets[*socket as usize];
            let kind = match s.kind {
                libc::SOCK_STREAM => "stream",
                libc::SOCK_DGRAM => "datagram",
                _ => "seqpacket",
            };
            format!(
                "unix {kind} socket {socket}{}{}{}",
                match &s.local {
                    vos::image::SockAddr::Unnamed => String::new(),
                    vos::image::SockAddr::Path(p) => format!(" at {}", e(p)),
                    vos::image::SockAddr::Abstract(n) => format!(" at @{}", escape_bytes(n)),
                },
                if s.listening { ", listening".to_string() } else { s.peer.map(|p| format!(", connected to socket {p}")).unwrap_or_default() },
                if s.queue.is_empty() { String::new() } else { format!(", {} queued", s.queue.iter().map(|q| q.len()).sum::<usize>()) }
            )
        }
        FileKind::Inet { socket } => {
            let s = &job.inet[*socket as usize];
            let proto = if s.kind == libc::SOCK_STREAM { "TCP" } else { "UDP" };
            let at = e(s.local.as_deref().unwrap_or("(unbound)"));
            let peer = e(s.peer.as_deref().unwrap_or("?"));
            match &s.state {
                vos::image::InetState::Open if s.peer.is_some() => format!("{proto} socket {at}, connected to {peer}"),
                vos::image::InetState::Open => format!("{proto} socket {at}"),
                vos::image::InetState::Listening { backlog } => format!("{proto} listener {at} (backlog {backlog})"),
                vos::image::InetState::Connected(c) => format!(
                    "{proto} connection {at} -> {peer}, kept ({} bytes to send, {} received unread)",
                    c.send_queue.len(),
                    c.recv_queue.len()
                ),
                vos::image::InetState::Reset => format!("{proto} connection {at} -> {peer} (outside the job: restored reset)"),
            }
        }
        FileKind::PtyMaster { pty } => format!("master of pseudo-terminal /dev/pts/{} ({} bytes in flight)", job.ptys[*pty as usize].index, job.ptys[*pty as usize].input.len() + job.ptys[*pty as usize].output.len()),
        FileKind::PtySlave { pty } => format!("pseudo-terminal /dev/pts/{} (made in the job)", job.ptys[*pty as usize].index),
        FileKind::SignalFd { mask } => format!("signalfd for signals {mask:#x}"),
        FileKind::EventFd { count, semaphore } => format!("eventfd, count {count}{}", if *semaphore { ", semaphore" } else { "" }),
        FileKind::TimerFd { clock, value_ns, interval_ns, ticks, .. } => {
            format!("timerfd on clock {clock}, next in {value_ns} ns, every {interval_ns} ns, {ticks} expirations unread")
        }
        FileKind::Epoll { items, owner } => format!("epoll watching fds {:?} (registered again by process {})", items.iter().map(|i| i.fd).collect::<Vec<_>>(), job.processes.get(*owner as usize).map_or(0, |p| p.pid)),
        FileKind::Inotify { watches } => format!("inotify watching {}", watches.iter().map(|w| format!("{}={}", w.wd, e(&w.path))).collect::<Vec<_>>().join(" ")),
        FileKind::PidFd { pid } => format!("pidfd of pid {pid}"),
        FileKind::Memory { name, data, seals, deleted_from, .. } => format!(
            "{} {}, {} bytes carried in the image{}",
            if deleted_from.is_some() { "deleted file" } else { "memfd" },
            e(name),
            job.data[*data as usize].stored,
            if *seals != 0 { format!(", seals {seals:#x}") } else { String::new() }
        ),
        FileKind::Unknown => "unknown".into(),
    }
}

fn stream_name(s: u8) -> &'static str {
    ["stdin", "stdout", "stderr"].get(s as usize).copied().unwrap_or("stdio")
}

/// An argv as one line, each word escaped.
fn argv(a: &[String]) -> String {
    a.iter().map(|w| e(w)).collect::<Vec<_>>().join(" ")
}

fn trim(s: &str, n: usize) -> String {
    if s.chars().count() <= n { s.into() } else { format!("…{}", s.chars().rev().take(n - 1).collect::<Vec<_>>().into_iter().rev().collect::<String>()) }
}
