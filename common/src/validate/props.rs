//! Properties of `validate`: every job built by `build` (a valid job made from any numbers, so proptest can
//! shrink a failure to a small job) validates; an index moved out of its list is refused by the field that holds
//! it, and nothing a hostile image can hold makes validation panic.

extern crate std;

use super::*;
use alloc::string::ToString;
use alloc::vec;
use proptest::collection::vec as vec_of;
use proptest::prelude::*;
use proptest::sample::Index;
use serde_bytes::ByteBuf;

/// Choices drawn from proptest's numbers: past their end every draw is 0, the simplest choice.
struct Draw<'a> {
    e: &'a [u64],
    at: usize,
}

impl Draw<'_> {
    fn u64(&mut self) -> u64 {
        let v = self.e.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        v
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.u64() % n }
    }
    fn upto(&mut self, n: usize) -> usize {
        self.below(n as u64 + 1) as usize
    }
    fn bool(&mut self) -> bool {
        self.u64() & 1 == 1
    }
    fn pick<T: Clone>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize].clone()
    }
    /// A name: any characters but NUL, control characters included, up to `max` of them.
    fn text(&mut self, max: usize) -> String {
        const CHARS: [char; 12] = ['a', 'z', '0', '_', '-', '.', ' ', '/', '\t', '\u{7f}', 'é', '\u{1F600}'];
        let n = self.upto(max);
        self.bytes(n).iter().map(|b| CHARS[*b as usize % CHARS.len()]).collect()
    }
    /// An absolute path.
    fn path(&mut self) -> String {
        const PARTS: [&str; 7] = ["usr", "lib", "tmp", "x y", "é", "..", "a.so"];
        let n = 1 + self.upto(3);
        self.bytes(n).iter().map(|b| format!("/{}", PARTS[*b as usize % PARTS.len()])).collect()
    }
    /// `n` bytes from one draw (so that long buffers leave choices for the rest of the job).
    fn bytes(&mut self, n: usize) -> ByteBuf {
        let mut x = self.u64() | 1;
        ByteBuf::from(
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect::<Vec<u8>>(),
        )
    }
    fn some_bytes(&mut self, max: usize) -> ByteBuf {
        let n = self.upto(max);
        self.bytes(n)
    }
    fn opt<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> Option<T> {
        if self.bool() { Some(f(self)) } else { None }
    }
}

const PAGE_U: u64 = 4096;
const RW: u32 = (libc::PROT_READ | libc::PROT_WRITE) as u32;
const RX: u32 = (libc::PROT_READ | libc::PROT_EXEC) as u32;

fn file_id(d: &mut Draw) -> FileId {
    let build_id = d.opt(|d| {
        let n = d.upto(40);
        (0..n).map(|_| d.pick(&['0', '9', 'a', 'f', 'A', 'F'])).collect()
    });
    FileId { path: d.path(), dev: d.u64(), ino: d.u64(), size: d.u64(), mtime_ns: d.u64() as i64, build_id, hash: d.u64() }
}

fn siginfo(d: &mut Draw) -> ByteBuf {
    d.bytes(128)
}

fn creds(d: &mut Draw) -> Creds {
    const CAPS: u64 = (1 << 48) - 1;
    let id = |d: &mut Draw| d.below(u32::MAX as u64) as u32;
    let (permitted, inheritable) = (d.u64() & CAPS, d.u64() & CAPS);
    let caps = CapSets {
        effective: d.u64() & permitted,
        permitted,
        inheritable,
        ambient: d.u64() & permitted & inheritable,
        bounding: d.u64() & CAPS,
    };
    let allow: Vec<u8> = [0x06u16.to_ne_bytes().to_vec(), vec![0, 0], crate::seccomp::RET_ALLOW.to_ne_bytes().to_vec()].concat();
    let seccomp = match d.below(3) {
        0 => Seccomp::default(),
        1 => Seccomp { mode: 2, inherited: 1 + d.below(3) as u32, filters: vec![] },
        _ => Seccomp {
            mode: 2,
            inherited: d.below(3) as u32,
            filters: vec![SeccompFilter { prog: ByteBuf::from(allow), log: d.bool() }; 1 + d.upto(2)],
        },
    };
    let groups = (0..d.upto(3)).map(|_| id(d)).collect();
    Creds {
        uid: [id(d), id(d), id(d), id(d)],
        gid: [id(d), id(d), id(d), id(d)],
        groups,
        caps,
        securebits: d.below(0x1000) as u32,
        no_new_privs: d.bool(),
        seccomp,
        user_ns: d.bool(),
        privileged_cwd: d.bool(),
    }
}

fn inet(d: &mut Draw) -> InetSocket {
    let v6 = d.bool();
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    let tcp = d.bool();
    let kind = if tcp { libc::SOCK_STREAM } else { libc::SOCK_DGRAM };
    let addr = |d: &mut Draw| {
        let port = d.below(65536);
        if v6 { format!("[::{:x}]:{port}", d.below(65536)) } else { format!("10.0.{}.{}:{port}", d.below(256), d.below(256)) }
    };
    let mut local = d.opt(addr);
    let mut peer = d.opt(addr);
    let state = match d.below(4) {
        0 => InetState::Open,
        1 => InetState::Reset,
        2 if tcp => {
            local.get_or_insert_with(|| addr(d));
            InetState::Listening { backlog: d.u64() as u32 }
        }
        3 if tcp => {
            local.get_or_insert_with(|| addr(d));
            peer.get_or_insert_with(|| addr(d));
            let send_queue = d.some_bytes(16);
            let unsent = d.upto(send_queue.len()) as u32;
            let window = [d.u64() as u32, d.u64() as u32, d.u64() as u32, d.u64() as u32, d.u64() as u32];
            InetState::Connected(TcpConnection { send_queue, unsent, recv_queue: d.some_bytes(16), window, ..Default::default() })
        }
        _ => InetState::Open,
    };
    let options = (0..d.upto(3)).map(|_| {
        let (level, name) = d.pick(INET_OPTIONS);
        (level, name, d.u64() as i32)
    });
    InetSocket { family, kind, local, peer, state, options: options.collect() }
}

/// A valid job and its header, made from any numbers.
fn build(e: &[u64]) -> (ImageHeader, JobImage) {
    let d = &mut Draw { e, at: 0 };
    let mut j = JobImage::default();

    // Pids, then zombies' pids, then other threads' tids: increasing, hence unique.
    let nproc = 1 + d.upto(3);
    let nzomb = d.upto(2);
    let mut next = 2 + d.below(1 << 16) as i32;
    let mut fresh = |d: &mut Draw| {
        let v = next;
        next += 1 + d.below(20) as i32;
        v
    };
    // The tree: each process's parent is init or an earlier live process; its session and group are outside the
    // job, its own, or its parent's.
    let mut ids: Vec<Ids> = vec![];
    for i in 0..nproc + nzomb {
        let pid = fresh(d);
        let live = i.min(nproc);
        let parent = if i == 0 || d.bool() { None } else { Some(ids[d.below(live as u64) as usize]) };
        let (psid, ppgid, ppid) = parent.map_or((0, 0, 1), |p| (p.sid, p.pgid, p.pid));
        let (sid, pgid) = match d.below(3) {
            0 => (psid, ppgid),
            1 => (pid, pid),
            _ => (psid, pid),
        };
        ids.push(Ids { pid, ppid, pgid, sid });
    }
    j.zombies = ids[nproc..].iter().map(|&ids| ZombieImage { ids, comm: d.text(16), status: d.u64() as i32 }).collect();

    // Objects the processes refer to, each list built before what points into it.
    j.pipes = (0..d.upto(2))
        .map(|_| {
            let capacity = 4096 << d.below(9);
            PipeImage { capacity: capacity as u32, data: d.some_bytes(8), fifo: d.opt(|d| d.path()) }
        })
        .collect();
    let unix_kinds = [libc::SOCK_STREAM, libc::SOCK_DGRAM, libc::SOCK_SEQPACKET];
    for _ in 0..d.upto(3) {
        let kind = d.pick(&unix_kinds);
        let local = match d.below(3) {
            0 => SockAddr::Unnamed,
            1 => SockAddr::Path(d.path()),
            _ => SockAddr::Abstract(d.some_bytes(20)),
        };
        let base = j.sockets.len() as u32;
        let sndbuf = d.u64() as u32;
        if d.bool() {
            // A connected pair, data queued both ways.
            for (me, peer) in [(base, base + 1), (base + 1, base)] {
                let queue = (0..d.upto(2)).map(|_| d.some_bytes(8)).collect();
                let local = if me == base { local.clone() } else { SockAddr::Unnamed };
                let shutdown = d.below(4) as u8;
                j.sockets.push(SocketImage { kind, local, peer: Some(peer), listening: false, queue, sndbuf, rcvbuf: 0, shutdown });
            }
        } else {
            let listening = d.bool();
            j.sockets.push(SocketImage { kind, local, listening, sndbuf, ..Default::default() });
        }
    }
    j.inet = (0..d.upto(2)).map(|_| inet(d)).collect();
    let termios = |d: &mut Draw| d.bytes(core::mem::size_of::<libc::termios>());
    j.ptys = (0..d.upto(2))
        .map(|_| PtyImage {
            index: d.u64() as u32,
            termios: termios(d),
            rows: d.u64() as u16,
            cols: d.u64() as u16,
            input: d.some_bytes(16),
            output: d.some_bytes(16),
        })
        .collect();
    if d.bool() {
        j.terminal = Some(TerminalImage { termios: termios(d), rows: 24, cols: 80, foreground: d.u64() as i32 });
    }
    let all_pids: Vec<i32> = ids.iter().map(|i| i.pid).collect();

    // Open files; memfds take their contents' places in `data` in file order.
    for _ in 0..d.upto(8) {
        let idx = |d: &mut Draw, n: usize| d.below(n as u64) as u32;
        let kind = match d.below(17) {
            0 => FileKind::Regular { file: file_id(d) },
            1 => FileKind::Dir { path: d.path() },
            2 => FileKind::Device { path: d.pick(&DEVICES).0.into() },
            3 => FileKind::Terminal { path: d.path(), stream: d.below(3) as u8 },
            4 => FileKind::Outside { what: d.text(20), stream: d.below(3) as u8 },
            5 if !j.pipes.is_empty() => FileKind::Pipe { pipe: idx(d, j.pipes.len()), write: d.bool() },
            6 if !j.sockets.is_empty() => FileKind::Socket { socket: idx(d, j.sockets.len()) },
            7 if !j.inet.is_empty() => FileKind::Inet { socket: idx(d, j.inet.len()) },
            8 if !j.ptys.is_empty() => FileKind::PtyMaster { pty: idx(d, j.ptys.len()) },
            9 if !j.ptys.is_empty() => FileKind::PtySlave { pty: idx(d, j.ptys.len()) },
            10 => FileKind::SignalFd { mask: d.u64() },
            12 => FileKind::TimerFd {
                clock: d.below(12) as i32,
                settime_flags: d.below(2) as i32,
                value_ns: d.u64(),
                interval_ns: d.u64(),
                ticks: d.u64(),
            },
            13 => {
                let items = (0..d.upto(3)).map(|_| EpollItem { fd: d.below(64) as i32, events: d.u64() as u32, data: d.u64() }).collect();
                FileKind::Epoll { items, owner: idx(d, nproc) }
            }
            14 => {
                let mut wd = 0;
                let watches = (0..d.upto(3))
                    .map(|_| {
                        wd += 1 + d.below(5) as i32;
                        InotifyWatch { wd, mask: d.u64() as u32, path: d.text(30) }
                    })
                    .collect();
                FileKind::Inotify { watches }
            }
            15 => FileKind::PidFd { pid: d.pick(&all_pids) },
            16 => {
                let data = j.data.len() as u32;
                let size = d.below(1 << 20);
                j.data.push(DataImage { size, stored: d.below(size + 1) });
                let deleted_from = d.opt(|d| d.path());
                FileKind::Memory { data, name: d.text(20), seals: d.below(16) as i32, deleted_from, dev: d.u64(), ino: d.u64() }
            }
            _ => FileKind::EventFd { count: d.u64(), semaphore: d.bool() },
        };
        let flags = d.below(3) as i32 | d.pick(&[0, libc::O_APPEND, libc::O_NONBLOCK, libc::O_APPEND | libc::O_NONBLOCK]);
        let open_as = d.opt(|d| {
            let c = creds(d);
            c.fs()
        });
        let locks = (0..d.upto(2)).map(|_| FileLock { flock: d.bool(), write: d.bool(), start: d.u64(), len: d.u64() }).collect();
        j.files.push(OpenFile { flags, pos: d.u64(), kind, locks, open_as });
    }
    let memfds: Vec<u32> = (0..j.files.len() as u32).filter(|&f| matches!(j.files[f as usize].kind, FileKind::Memory { .. })).collect();

    // System V objects (ids unique per kind); shared memory segments' contents follow the memfds' in `data`.
    let mut id = d.below(100) as i32;
    let mut next_id = |d: &mut Draw| {
        id += 1 + d.below(1000) as i32;
        id
    };
    let perm = |d: &mut Draw, id: i32| IpcPerm { id, key: d.u64() as i32, uid: d.u64() as u32, gid: d.u64() as u32, mode: d.below(0o1000) as u32 };
    for _ in 0..d.upto(2) {
        let size = 1 + d.below(16 * PAGE_U);
        let data = j.data.len() as u32;
        let stored = d.below(size + 1);
        j.data.push(DataImage { size, stored });
        let id = next_id(d);
        let p = perm(d, id);
        j.sysv.shm.push(SysvShm { perm: p, size, data });
    }
    for _ in 0..d.upto(2) {
        let id = next_id(d);
        let p = perm(d, id);
        let values = (0..1 + d.upto(3)).map(|_| d.u64() as u16).collect();
        j.sysv.sem.push(SysvSem { perm: p, values });
    }
    for _ in 0..d.upto(2) {
        let id = next_id(d);
        let p = perm(d, id);
        let messages = (0..d.upto(2)).map(|_| (d.u64() as i64, d.some_bytes(8))).collect();
        j.sysv.msg.push(SysvMsgQueue { perm: p, qbytes: d.u64(), messages });
    }

    // Shared memory objects: a memfd's, or pages one live process stores.
    for _ in 0..d.upto(2) {
        let file = if !memfds.is_empty() && d.bool() { Some(d.pick(&memfds)) } else { None };
        j.shared_memory.push(SharedMemory { name: d.text(20), size: d.below(1 << 30), writer: d.below(nproc as u64) as u32, file });
    }

    // The processes.
    let mut tids = vec![];
    for (n, i) in ids[..nproc].iter().enumerate() {
        let mut p = ProcessImage { pid: i.pid, ppid: i.ppid, pgid: i.pgid, sid: i.sid, comm: d.text(16), exe: file_id(d), ..Default::default() };
        p.argv = (0..d.upto(3)).map(|_| d.text(10)).collect();

        // Regions, in order and apart, some above the restorer's window: code, writable memory, then others.
        let mut at = 0x40_0000 + d.below(64) * PAGE_U;
        let mut specials = vec![RegionKind::Vdso, RegionKind::Vvar, RegionKind::VvarVclock];
        for k in 0..2 + d.upto(5) {
            if d.below(4) == 0 && at < WINDOW_END {
                at = WINDOW_END + d.below(4) * PAGE_U;
            }
            let len = (1 + d.below(8)) * PAGE_U;
            let mut r = Region { start: at, end: at + len, prot: d.below(8) as u32, name: d.text(12), dev: d.u64(), ino: d.u64(), ..Default::default() };
            r.vmflags = d.below(512) as u32;
            let choice = match k {
                0 => 100,
                1 => 101,
                _ => d.below(8),
            };
            match choice {
                100 => {
                    (r.kind, r.prot, r.file, r.contents) = (RegionKind::File, RX, Some(file_id(d)), Contents::Pages);
                    r.offset = d.below(16) * PAGE_U;
                }
                101 => (r.kind, r.prot, r.contents) = (d.pick(&[RegionKind::Heap, RegionKind::Anon, RegionKind::Stack]), RW, Contents::Pages),
                1 => {
                    r.shared = d.bool();
                    (r.kind, r.file, r.offset) = (RegionKind::File, Some(file_id(d)), d.below(16) * PAGE_U);
                    r.contents = if r.shared { Contents::File } else { Contents::Pages };
                }
                2 if !j.shared_memory.is_empty() => {
                    (r.kind, r.shared) = (RegionKind::SharedAnon, true);
                    r.shared_memory = Some(d.below(j.shared_memory.len() as u64) as u32);
                    r.contents = d.pick(&[Contents::Pages, Contents::Elsewhere, Contents::Nothing]);
                }
                3 if !specials.is_empty() => {
                    let s = specials.remove(d.below(specials.len() as u64) as usize);
                    (r.kind, r.contents) = (s, Contents::Nothing);
                }
                4 if !j.sysv.shm.is_empty() => {
                    let s = &j.sysv.shm[d.below(j.sysv.shm.len() as u64) as usize];
                    let room = s.size.next_multiple_of(PAGE_U);
                    r.end = r.start + len.min(room);
                    (r.kind, r.shared, r.contents, r.ino) = (RegionKind::SysvShm, true, Contents::Elsewhere, s.perm.id as u64);
                    r.offset = d.below((room - (r.end - r.start)) / PAGE_U + 1) * PAGE_U;
                }
                _ => {
                    r.kind = d.pick(&[RegionKind::Anon, RegionKind::Heap, RegionKind::Stack, RegionKind::Detached]);
                    r.contents = d.pick(&[Contents::Pages, Contents::Nothing]);
                }
            }
            if d.bool() {
                let pages = (r.end - r.start) / PAGE_U;
                let g = r.start + d.below(pages) * PAGE_U;
                r.guards = vec![(g, g + PAGE_U)];
            }
            at = r.end + d.below(4) * PAGE_U;
            p.regions.push(r);
        }
        let (code, data) = (&p.regions[0], &p.regions[1]);
        p.shim = ShimImage { restart_entry: code.start + d.below(code.end - code.start), restart_stack_top: data.end };
        let rsp = |d: &mut Draw| data.start + d.below(data.end - data.start);

        // Threads: the main one and perhaps others.
        let thread = |d: &mut Draw, tid| ThreadImage {
            tid,
            comm: d.text(16),
            park_rsp: rsp(d),
            pending: (0..d.upto(1)).map(|_| siginfo(d)).collect(),
            rseq: d.opt(|d| Rseq { area: d.u64(), len: 32, sig: d.u64() as u32 }),
            altstack: d.opt(|d| AltStack { sp: d.u64(), size: d.u64(), flags: d.below(3) as i32 }),
            fs_base: d.u64(),
            sigmask: d.u64(),
            ..Default::default()
        };
        p.threads.push(thread(d, p.pid));
        tids.push((n, d.upto(2)));

        // Fds at distinct numbers, with what their files need of the process.
        if !j.files.is_empty() {
            let mut fd = d.below(3) as i32;
            for _ in 0..d.upto(5) {
                p.fds.push(FdImage { fd, cloexec: d.bool(), file: d.below(j.files.len() as u64) as u32 });
                fd += 1 + d.below(200) as i32;
            }
        }
        for f in &p.fds {
            let fixup = match &j.files[f.file as usize].kind {
                FileKind::Epoll { items, .. } => FdFixup::Epoll { epfd: f.fd, items: items.clone() },
                FileKind::PidFd { pid } => FdFixup::PidFd { fd: f.fd, pid: *pid, flags: 0, cloexec: f.cloexec },
                FileKind::Regular { .. } | FileKind::Memory { .. } => {
                    FdFixup::RecordLock { fd: f.fd, write: d.bool(), start: d.u64() >> 1, len: d.u64() >> 1 }
                }
                FileKind::PtySlave { .. } | FileKind::PtyMaster { .. } if p.ctty.is_none() && d.bool() => {
                    p.ctty = Some(Ctty { fd: f.fd, foreground: d.u64() as i32 });
                    continue;
                }
                _ => continue,
            };
            if d.bool() {
                p.fixups.push(fixup);
            }
        }
        p.watches = (0..d.upto(2)).map(|_| WatchPath { fd: d.below(64) as i32, wd: d.u64() as i32, path: d.text(30) }).collect();

        p.signals.actions = (0..d.upto(4)).map(|_| SigAction { handler: d.u64(), flags: d.u64(), restorer: d.u64(), mask: d.u64() }).collect();
        p.signals.pending = (0..d.upto(1)).map(|_| siginfo(d)).collect();
        let chosen = d.u64();
        let mut resources: Vec<u32> = (0..16).filter(|r| chosen >> r & 1 == 1).collect();
        resources.truncate(4);
        p.attrs = ProcessAttrs {
            cwd: d.path(),
            umask: d.below(0o1000) as u32,
            rlimits: resources.into_iter().map(|resource| Rlimit { resource, cur: d.u64(), max: d.u64() }).collect(),
            hostname: d.text(20),
            domainname: d.text(20),
            ns_last_pid: d.u64() as i32,
            pdeath_sig: d.below(65) as i32,
            creds: d.opt(creds),
            ..Default::default()
        };
        let words = d.upto(8);
        p.mm.auxv = d.bytes(16 * words);
        p.timers.itimers = [(d.u64(), d.u64()), (0, 0), (d.u64(), 0)];
        j.processes.push(p);
    }
    // Other threads: fresh tids, after every pid.
    for (n, extra) in tids {
        for _ in 0..extra {
            let tid = fresh(d);
            let t = ThreadImage { tid, park_rsp: j.processes[n].threads[0].park_rsp, comm: d.text(8), ..Default::default() };
            j.processes[n].threads.push(t);
        }
        let p = &mut j.processes[n];
        let tids: Vec<i32> = p.threads.iter().map(|t| t.tid).collect();
        p.timers.posix = (0..d.upto(2))
            .map(|_| {
                let notify = d.below(7) as i32;
                let tid = if notify & 4 != 0 { d.pick(&tids) } else { d.u64() as i32 };
                PosixTimer { id: d.u64() as i32, clock: d.below(12) as i32, notify, signo: d.below(65) as i32, tid, ..Default::default() }
            })
            .collect();
    }

    // Carried files: unique by device and inode, their contents last in `data`.
    for b in 0..d.upto(2) as u64 {
        let data = j.data.len() as u32;
        j.data.push(DataImage { size: 8192, stored: 8192 });
        j.bundle.push(BundledFile { dev: b, ino: d.u64(), path: d.path(), data });
    }

    let name_chars = ['a', 'z', '0', '9', '_', '-', '.', ' ', 'é'];
    let name = core::iter::once('j').chain((0..d.upto(20)).map(|_| d.pick(&name_chars))).collect();
    let mut h = ImageHeader { processes: nproc as u32, ..Default::default() };
    h.job.name = name;
    (h, j)
}

/// Where a job holds an index into one of its lists (or a process id), with the field validation must name when
/// it points nowhere.
#[derive(Debug, Clone, Copy)]
enum Site {
    Fd(usize, usize),
    Region(usize, usize),
    File(usize),
    SharedFile(usize),
    SharedWriter(usize),
    Peer(usize),
    Shm(usize),
    Bundle(usize),
    HeaderCount,
}

fn sites(j: &JobImage) -> Vec<Site> {
    let mut s = vec![Site::HeaderCount];
    for (p, proc_) in j.processes.iter().enumerate() {
        s.extend((0..proc_.fds.len()).map(|k| Site::Fd(p, k)));
        s.extend(proc_.regions.iter().enumerate().filter(|r| r.1.shared_memory.is_some()).map(|(r, _)| Site::Region(p, r)));
    }
    for (i, f) in j.files.iter().enumerate() {
        let indexed = matches!(
            f.kind,
            FileKind::Pipe { .. }
                | FileKind::Socket { .. }
                | FileKind::Inet { .. }
                | FileKind::PtyMaster { .. }
                | FileKind::PtySlave { .. }
                | FileKind::Epoll { .. }
                | FileKind::Memory { .. }
                | FileKind::PidFd { .. }
        );
        if indexed {
            s.push(Site::File(i));
        }
    }
    for (i, m) in j.shared_memory.iter().enumerate() {
        s.push(if m.file.is_some() { Site::SharedFile(i) } else { Site::SharedWriter(i) });
    }
    s.extend(j.sockets.iter().enumerate().filter(|x| x.1.peer.is_some()).map(|(i, _)| Site::Peer(i)));
    s.extend((0..j.sysv.shm.len()).map(Site::Shm));
    s.extend((0..j.bundle.len()).map(Site::Bundle));
    s
}

/// Point `site` past the end of its list by `by` (or at a pid no process has), and return the field validation
/// must name.
fn break_site(h: &mut ImageHeader, j: &mut JobImage, site: Site, by: u32) -> String {
    let past = |len: usize| (len as u32).saturating_add(by);
    let (nfiles, nproc, nshared, ndata) = (j.files.len(), j.processes.len(), j.shared_memory.len(), j.data.len());
    match site {
        Site::HeaderCount => {
            h.processes = past(nproc).max(nproc as u32 + 1);
            "header.processes".into()
        }
        Site::Fd(p, k) => {
            j.processes[p].fds[k].file = past(nfiles);
            format!("processes[{p}].fds[{k}].file")
        }
        Site::Region(p, r) => {
            j.processes[p].regions[r].shared_memory = Some(past(nshared));
            format!("processes[{p}].regions[{r}].shared_memory")
        }
        Site::File(i) => {
            let (np, ns, ni, nt) = (j.pipes.len(), j.sockets.len(), j.inet.len(), j.ptys.len());
            let unused_pid = j.processes.iter().map(|p| p.pid).chain(j.zombies.iter().map(|z| z.ids.pid)).max().unwrap() + 1;
            let at = format!("files[{i}].kind");
            match &mut j.files[i].kind {
                FileKind::Pipe { pipe, .. } => *pipe = past(np),
                FileKind::Socket { socket } => *socket = past(ns),
                FileKind::Inet { socket } => *socket = past(ni),
                FileKind::PtyMaster { pty } | FileKind::PtySlave { pty } => *pty = past(nt),
                FileKind::Epoll { owner, .. } => *owner = past(nproc),
                FileKind::Memory { data, .. } => *data = past(ndata),
                FileKind::PidFd { pid } => *pid = unused_pid,
                _ => unreachable!(),
            }
            at
        }
        Site::SharedFile(i) => {
            j.shared_memory[i].file = Some(past(nfiles));
            format!("shared_memory[{i}].file")
        }
        Site::SharedWriter(i) => {
            j.shared_memory[i].writer = past(nproc);
            format!("shared_memory[{i}].writer")
        }
        Site::Peer(i) => {
            j.sockets[i].peer = Some(past(j.sockets.len()));
            format!("sockets[{i}].peer")
        }
        Site::Shm(i) => {
            j.sysv.shm[i].data = past(ndata);
            format!("sysv.shm[{i}].data")
        }
        Site::Bundle(i) => {
            j.bundle[i].data = past(ndata);
            format!("bundle[{i}].data")
        }
    }
}

fn entropy() -> impl Strategy<Value = Vec<u64>> {
    vec_of(any::<u64>(), 0..2000)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_built_job_validates(e in entropy()) {
        let (h, j) = build(&e);
        if let Err(err) = j.validate(&h) {
            prop_assert!(false, "{}\n{:#?}", err, j);
        }
    }

    /// Any index moved past the end of its list (or a pid no process has), each in turn, is refused by the field
    /// that holds it; validation never panics on one.
    #[test]
    fn an_index_out_of_range_is_refused_by_its_field(e in entropy(), by in prop_oneof![0..3u32, Just(u32::MAX)]) {
        let (h, j) = build(&e);
        for site in sites(&j) {
            let (mut h, mut j) = (h.clone(), j.clone());
            let field = break_site(&mut h, &mut j, site, by);
            match j.validate(&h) {
                Ok(()) => prop_assert!(false, "{:?} -> {}: accepted", site, field),
                Err(err) => prop_assert!(err.field.starts_with(&field), "{:?}: expected {}, got {}", site, field, err),
            }
        }
    }

    /// Whatever a hostile image's bytes decode to, validation answers without panicking.
    #[test]
    fn corrupt_jobs_never_panic_validation(e in entropy(), flips in vec_of((any::<Index>(), 1..=255u8), 1..6)) {
        let (h, j) = build(&e);
        let mut b = rmp_serde::to_vec_named(&j).unwrap();
        for (at, x) in flips {
            let i = at.index(b.len());
            b[i] ^= x;
        }
        if let Ok(j) = rmp_serde::from_slice::<JobImage>(&b) {
            let _ = j.validate(&h);
        }
    }

    /// Re-binding every path a restore binds (`vrun restore --map`) visits each once and keeps the job valid.
    #[test]
    fn paths_mut_visits_every_bound_path_once(e in entropy()) {
        let (h, mut j) = build(&e);
        let before = j.clone();
        let mut visits = 0;
        j.paths_mut(&mut |p| {
            visits += 1;
            p.insert_str(0, "/new");
        });
        prop_assert!(j.validate(&h).is_ok());
        let moved = |a: &str, b: &str| b.strip_prefix("/new") == Some(a);
        let mut bound = 0;
        for (p, q) in before.processes.iter().zip(&j.processes) {
            prop_assert!(moved(&p.exe.path, &q.exe.path) && moved(&p.attrs.cwd, &q.attrs.cwd));
            bound += 2;
            for (r, s) in p.regions.iter().zip(&q.regions) {
                if let (Some(f), Some(g)) = (&r.file, &s.file) {
                    prop_assert!(moved(&f.path, &g.path));
                    bound += 1;
                }
                if r.name.starts_with('/') {
                    prop_assert!(moved(&r.name, &s.name));
                    bound += 1;
                } else {
                    prop_assert_eq!(&r.name, &s.name);
                }
            }
            bound += p.watches.len();
        }
        for (f, g) in before.files.iter().zip(&j.files) {
            match (&f.kind, &g.kind) {
                (FileKind::Regular { file: a }, FileKind::Regular { file: b }) => { prop_assert!(moved(&a.path, &b.path)); bound += 1; }
                (FileKind::Dir { path: a }, FileKind::Dir { path: b }) => { prop_assert!(moved(a, b)); bound += 1; }
                (FileKind::Memory { deleted_from: Some(a), .. }, FileKind::Memory { deleted_from: Some(b), .. }) => { prop_assert!(moved(a, b)); bound += 1; }
                (FileKind::Inotify { watches }, _) => bound += watches.len(),
                _ => {}
            }
        }
        for (p, q) in before.pipes.iter().zip(&j.pipes) {
            if let (Some(a), Some(b)) = (&p.fifo, &q.fifo) {
                prop_assert!(moved(a, b));
                bound += 1;
            }
        }
        for (s, t) in before.sockets.iter().zip(&j.sockets) {
            if let (SockAddr::Path(a), SockAddr::Path(b)) = (&s.local, &t.local) {
                prop_assert!(moved(a, b));
                bound += 1;
            }
        }
        prop_assert_eq!(visits, bound);
    }

    /// A path is accepted exactly when it is absolute, has no NUL and fits PATH_MAX; a job name exactly when it is
    /// 1 to 128 bytes of no control character, '/' or '\\', not starting with '.'.
    #[test]
    fn paths_and_names(s in prop_oneof![".{0,12}", "/[^\0]{0,12}", "[a-z.\\\\/\0]{0,6}"], long in 4000..4200usize) {
        let path_ok = s.starts_with('/') && !s.contains('\0') && s.len() <= MAX_PATH;
        prop_assert_eq!(check_path("f", &s).is_ok(), path_ok);
        let name_ok = !s.is_empty() && s.len() <= 128 && !s.starts_with('.') && !s.chars().any(|c| c.is_control() || c == '/' || c == '\\');
        prop_assert_eq!(check_job_name("f", &s).is_ok(), name_ok);
        let p = format!("/{}", "a".repeat(long - 1));
        prop_assert_eq!(check_path("f", &p).is_ok(), long <= MAX_PATH);
    }
}

/// The generator is no trivial one: over a few hundred jobs it makes every kind of open file and region, zombies,
/// fixups, controlling terminals, credentials and System V objects.
#[test]
fn built_jobs_cover_every_kind() {
    let mut seen = BTreeSet::new();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..400 {
        let e: Vec<u64> = (0..2000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            })
            .collect();
        let (h, j) = build(&e);
        j.validate(&h).unwrap();
        for f in &j.files {
            seen.insert(format!("{:?}", f.kind).split([' ', '(']).next().unwrap().to_string());
        }
        for p in &j.processes {
            seen.extend(p.regions.iter().map(|r| format!("{:?}", r.kind)));
            seen.extend(p.fixups.iter().map(|f| format!("fixup {}", format!("{f:?}").split(' ').next().unwrap())));
            if p.ctty.is_some() {
                seen.insert("ctty".into());
            }
            if p.attrs.creds.as_ref().is_some_and(|c| !c.seccomp.filters.is_empty()) {
                seen.insert("seccomp".into());
            }
        }
        for (what, n) in [("zombie", j.zombies.len()), ("shm", j.sysv.shm.len()), ("sem", j.sysv.sem.len()), ("msg", j.sysv.msg.len()), ("bundle", j.bundle.len()), ("shared", j.shared_memory.len())] {
            if n > 0 {
                seen.insert(what.into());
            }
        }
    }
    let want = [
        "Regular", "Dir", "Device", "Terminal", "Outside", "Pipe", "Socket", "Inet", "PtyMaster", "PtySlave", "SignalFd", "EventFd",
        "TimerFd", "Epoll", "Inotify", "PidFd", "Memory", "Anon", "Heap", "Stack", "File", "SharedAnon", "Detached", "SysvShm", "Vdso",
        "Vvar", "VvarVclock", "fixup Epoll", "fixup PidFd", "fixup RecordLock", "ctty", "seccomp", "zombie", "shm", "sem", "msg", "bundle",
        "shared",
    ];
    let missing: Vec<&str> = want.iter().copied().filter(|w| !seen.contains(*w)).collect();
    assert!(missing.is_empty(), "never built: {missing:?}");
}


