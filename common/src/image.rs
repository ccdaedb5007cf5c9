//! The image's metadata: named-field MessagePack structures, so later versions can add fields.
//!
//! One place for each fact: the shim fills these at checkpoint, the launcher checks and plans from them, the
//! shim's restart code reads them back, `vrun inspect` prints them.

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// The first chunk: what made the image and on what host.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct ImageHeader {
    pub vrun_version: String,
    pub created_unix_ns: u64,
    pub host: HostInfo,
    pub job: JobInfo,
    /// "request", "signal", "interval".
    pub reason: String,
    pub processes: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct HostInfo {
    pub hostname: String,
    pub arch: String,
    pub kernel: String,
    pub glibc: String,
    pub cpu: CpuInfo,
    pub vdso: VdsoInfo,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuInfo {
    pub vendor: String,
    /// XCR0: the XSAVE features the OS enabled, hence what a thread's saved FPU state may contain.
    pub xcr0: u64,
    /// Bytes of XSAVE state for those features (CPUID 0xD.0 EBX).
    pub xsave_size: u32,
}

/// Identity of the kernel's vDSO and the layout of the special mappings around it.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct VdsoInfo {
    /// xxh3 of the vDSO's bytes.
    pub hash: u64,
    pub build_id: String,
    pub vdso_len: u64,
    pub vvar_len: u64,
    pub vvar_vclock_len: u64,
    /// The vDSO itself: a restore under another kernel keeps a copy where the job's libc points, its entry points
    /// redirected to the new vDSO.
    pub image: ByteBuf,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct JobInfo {
    pub name: String,
    pub argv: Vec<String>,
    pub started_unix_ns: u64,
    /// How the job was supervised, for a restore to go on the same way (absent from older images): where images
    /// go, the periodic checkpoints and how many are kept, and the trigger signals (checkpoint, exit) its shims
    /// answer to.
    #[serde(default)]
    pub dir: Option<String>,
    #[serde(default)]
    pub interval_ms: Option<u64>,
    #[serde(default)]
    pub keep: Option<u32>,
    #[serde(default)]
    pub signals: Option<(i32, i32)>,
}

/// Identity of a file a job uses, checked again before restore.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct FileId {
    pub path: String,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    /// GNU build-id of an ELF file (hex), when it has one: the file's identity on any host.
    pub build_id: Option<String>,
    /// Otherwise, for code and data the job maps privately: xxh3 of its contents (0: not taken).
    pub hash: u64,
}

/// Everything about the job but page contents: its processes and the kernel objects they share.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct JobImage {
    /// Live processes, in the order their page data follows in the image.
    pub processes: Vec<ProcessImage>,
    /// Children that exited and were not waited for yet.
    pub zombies: Vec<ZombieImage>,
    /// Open file descriptions; fds of every process point into this list (several may share one).
    pub files: Vec<OpenFile>,
    pub pipes: Vec<PipeImage>,
    pub sockets: Vec<SocketImage>,
    /// TCP and UDP sockets, IPv4 and IPv6.
    pub inet: Vec<InetSocket>,
    /// Memory shared between processes (or with nothing but itself: deleted files, memfd, MAP_SHARED|MAP_ANONYMOUS).
    pub shared_memory: Vec<SharedMemory>,
    /// The job's controlling terminal, when it had one.
    pub terminal: Option<TerminalImage>,
    pub ptys: Vec<PtyImage>,
    /// Objects whose contents follow in Data chunks, in this order.
    pub data: Vec<DataImage>,
    /// System V IPC objects of the job's IPC namespace.
    pub sysv: SysvImage,
    /// Files whose bytes travel in the image: with `checkpoint --bundle` every program and library the job maps;
    /// always a program file that was deleted or is a memfd.
    pub bundle: Vec<BundledFile>,
}

/// A file carried in the image; a restore maps it from there instead of from the host's file system.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct BundledFile {
    /// As the checkpoint host knew it (FileId's dev and ino find it).
    pub dev: u64,
    pub ino: u64,
    pub path: String,
    /// Its contents: an entry of `JobImage::data`.
    pub data: u32,
}

/// Whether a path /proc shows for a mapped or open file names a file no restore will find by that path: a memfd,
/// or a file deleted since.
pub fn is_detached(path: &str) -> bool {
    path.starts_with("/memfd:") || path.ends_with(" (deleted)")
}

impl JobImage {
    /// Visit every path the job is bound to (open files, mapped files, working directories, inotify watches, named
    /// FIFOs and sockets), so a restore can re-bind them all in one place (`vrun restore --map`).
    pub fn paths_mut(&mut self, f: &mut dyn FnMut(&mut String)) {
        for p in &mut self.processes {
            f(&mut p.exe.path);
            f(&mut p.attrs.cwd);
            for r in &mut p.regions {
                if let Some(id) = &mut r.file {
                    f(&mut id.path);
                }
                if r.name.starts_with('/') {
                    f(&mut r.name);
                }
            }
            for w in &mut p.watches {
                f(&mut w.path);
            }
        }
        for o in &mut self.files {
            match &mut o.kind {
                FileKind::Regular { file } => f(&mut file.path),
                FileKind::Dir { path } => f(path),
                FileKind::Memory { deleted_from: Some(dir), .. } => f(dir),
                FileKind::Inotify { watches } => watches.iter_mut().for_each(|w| f(&mut w.path)),
                _ => {}
            }
        }
        for p in &mut self.pipes {
            if let Some(path) = &mut p.fifo {
                f(path);
            }
        }
        for s in &mut self.sockets {
            if let SockAddr::Path(path) = &mut s.local {
                f(path);
            }
        }
    }
}

/// The job's System V IPC objects, under the ids the job knows them by (its IPC namespace is its own).
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct SysvImage {
    pub shm: Vec<SysvShm>,
    pub sem: Vec<SysvSem>,
    pub msg: Vec<SysvMsgQueue>,
}

/// The ipc_perm part every System V object has.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IpcPerm {
    pub id: i32,
    pub key: i32,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits (and, for shared memory, SHM_DEST / SHM_LOCKED).
    pub mode: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct SysvShm {
    pub perm: IpcPerm,
    pub size: u64,
    /// Its contents: an entry of `JobImage::data`.
    pub data: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct SysvSem {
    pub perm: IpcPerm,
    pub values: Vec<u16>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct SysvMsgQueue {
    pub perm: IpcPerm,
    /// Its byte limit (msg_qbytes).
    pub qbytes: u64,
    /// Queued messages in order: (mtype, text).
    pub messages: Vec<(i64, ByteBuf)>,
}

/// Process ids as the job's pid namespace numbers them. A pgid or sid of 0 means a group or session outside the
/// job (the supervisor's): a restored job joins the restoring supervisor's.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ids {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct ZombieImage {
    pub ids: Ids,
    pub comm: String,
    /// The wait status its parent will see.
    pub status: i32,
}

/// One process of the job.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct ProcessImage {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    pub comm: String,
    pub argv: Vec<String>,
    pub exe: FileId,
    pub threads: Vec<ThreadImage>,
    pub regions: Vec<Region>,
    pub fds: Vec<FdImage>,
    /// Set for a session leader whose controlling terminal is a pseudo-terminal of the job.
    pub ctty: Option<Ctty>,
    /// Paths of inotify watches, as the program gave them (the kernel only knows inodes).
    pub watches: Vec<WatchPath>,
    /// What only the process itself can do once its fds are in place (set by the supervisor).
    pub fixups: Vec<FdFixup>,
    pub timers: TimersImage,
    pub signals: SignalImage,
    pub attrs: ProcessAttrs,
    pub mm: MmImage,
    pub shim: ShimImage,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct ThreadImage {
    pub tid: i32,
    pub comm: String,
    /// TLS pointer (FS base).
    pub fs_base: u64,
    /// Stack pointer of the shim's saved frame: the thread resumes there at restore.
    pub park_rsp: u64,
    /// glibc's CLONE_CHILD_CLEARTID word (pthread_join waits on it).
    pub clear_child_tid: u64,
    pub robust_list: u64,
    pub robust_len: u64,
    pub rseq: Option<Rseq>,
    /// Registers of the interrupted code (for `inspect`; the full state is in the signal frame on its stack).
    pub rip: u64,
    pub rsp: u64,
    pub sigmask: u64,
    pub altstack: Option<AltStack>,
    /// Signals queued for this thread only (raw 128-byte siginfo).
    pub pending: Vec<ByteBuf>,
    pub xfeatures: u64,
    /// CPU time the thread had used (its CPU-time clock goes on from there).
    pub cpu_ns: u64,
}

/// A process's timers: interval timers (alarm, setitimer) and POSIX timers, with the time left.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct TimersImage {
    /// ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF: (value, interval) in microseconds.
    pub itimers: [(u64, u64); 3],
    pub posix: Vec<PosixTimer>,
    /// CPU time the process had used (CLOCK_PROCESS_CPUTIME_ID goes on from there).
    pub cpu_ns: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PosixTimer {
    pub id: i32,
    pub clock: i32,
    /// SIGEV_SIGNAL, SIGEV_NONE or SIGEV_THREAD_ID (with `tid`).
    pub notify: i32,
    pub signo: i32,
    pub tid: i32,
    /// sigev_value.
    pub value: u64,
    pub value_ns: u64,
    pub interval_ns: u64,
    /// A timer on CLOCK_MONOTONIC or CLOCK_BOOTTIME: its next expiry on that clock, read with `value_ns`. The
    /// job's clocks go on from the checkpoint instant, so the timer is armed again at this very time, in phase
    /// however long the restore takes. 0 for other clocks (armed with the time left).
    #[serde(default)]
    pub deadline_ns: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rseq {
    pub area: u64,
    pub len: u32,
    pub sig: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AltStack {
    pub sp: u64,
    pub size: u64,
    pub flags: i32,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RegionKind {
    #[default]
    Anon,
    Heap,
    Stack,
    File,
    /// Shared memory no file keeps: MAP_SHARED|MAP_ANONYMOUS, memfd, deleted files (see `SharedMemory`).
    SharedAnon,
    /// A private mapping of a file a restore will not find (deleted, memfd): every page travels and it comes back
    /// as anonymous memory.
    Detached,
    /// An attachment of System V shared memory (`ino` is its id, `offset` the place in the segment).
    SysvShm,
    Vdso,
    Vvar,
    VvarVclock,
}

/// How a region's contents travel.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub enum Contents {
    /// Touched pages follow in Pages chunks (private memory, COW copies of file pages).
    #[default]
    Pages,
    /// Everything comes from the mapped file (shared file mappings).
    File,
    /// Nothing to store: the kernel provides it (vDSO) or it is never readable (guard).
    Nothing,
    /// Shared memory whose pages another process of the job stores.
    Elsewhere,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    /// PROT_* bits.
    pub prot: u32,
    pub shared: bool,
    pub kind: RegionKind,
    /// The name /proc/PID/maps shows (a path, "[heap]", "[anon:NAME]", ...).
    pub name: String,
    pub offset: u64,
    pub file: Option<FileId>,
    /// VmFlags of /proc/PID/smaps that restore must reproduce (see `VMF_*`).
    pub vmflags: u32,
    pub contents: Contents,
    /// For shared memory: the object in `JobImage::shared_memory` (set by the supervisor).
    pub shared_memory: Option<u32>,
    /// Device and inode of the mapped object (shared memory is told apart by them).
    pub dev: u64,
    pub ino: u64,
    /// Guard pages in it (madvise MADV_GUARD_INSTALL), [start, end) each: never read, installed again at restore.
    #[serde(default)]
    pub guards: Vec<(u64, u64)>,
}

pub const VMF_GROWSDOWN: u32 = 1;
pub const VMF_DONTFORK: u32 = 2;
pub const VMF_WIPEONFORK: u32 = 4;
pub const VMF_DONTDUMP: u32 = 8;
pub const VMF_HUGEPAGE: u32 = 16;
pub const VMF_NOHUGEPAGE: u32 = 32;
pub const VMF_MERGEABLE: u32 = 64;
pub const VMF_LOCKED: u32 = 128;
/// The mapping may be made writable (a System V attachment without SHM_RDONLY).
pub const VMF_MAYWRITE: u32 = 256;

/// What was stored of each region (written after the pages, so the writer can count).
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct ProcessSummary {
    pub regions: Vec<RegionSummary>,
    pub bytes: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default)]
pub struct RegionSummary {
    /// Pages stored in the image.
    pub stored: u64,
    /// Touched pages found to hold only zeros: not stored, restored as zero.
    pub zero: u64,
}

/// One fd of a process: a number pointing at one of the job's open files.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct FdImage {
    pub fd: i32,
    pub cloexec: bool,
    /// Index into `JobImage::files`.
    pub file: u32,
}

/// An open file description: what fds point at. Offset and status flags belong here, shared by every fd (of
/// any process) that points at it.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct OpenFile {
    /// Access mode and status flags (O_RDWR, O_APPEND, O_NONBLOCK...).
    pub flags: i32,
    pub pos: u64,
    pub kind: FileKind,
    /// flock() and open file description locks held through it.
    pub locks: Vec<FileLock>,
    /// The credentials a restore opens it with (absent from older images, and for kinds no path names): those of
    /// a process of the job that holds it and could open it at the checkpoint, or root's when none could (it
    /// came from a more privileged process: a daemon that dropped privileges after opening it).
    #[serde(default)]
    pub open_as: Option<FsCreds>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileLock {
    /// flock() (whole file) rather than an open file description record lock.
    pub flock: bool,
    pub write: bool,
    pub start: u64,
    /// 0: to the end of the file.
    pub len: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub enum FileKind {
    #[default]
    Unknown,
    /// A regular file, reopened by path at its offset.
    Regular { file: FileId },
    Dir { path: String },
    /// /dev/null, /dev/zero, /dev/urandom...: reopened by path.
    Device { path: String },
    /// A terminal outside the job: re-bound at restore to `vrun restore`'s terminal (`stream` 0, 1 or 2).
    Terminal { path: String, stream: u8 },
    /// A pipe or socket to a process outside the job on a standard stream: re-bound to `vrun restore`'s own.
    Outside { what: String, stream: u8 },
    /// One end of a pipe or FIFO of the job (`JobImage::pipes`).
    Pipe { pipe: u32, write: bool },
    /// A unix socket of the job (`JobImage::sockets`).
    Socket { socket: u32 },
    /// A TCP or UDP socket (`JobImage::inet`).
    Inet { socket: u32 },
    /// The master side of a pseudo-terminal made inside the job (`JobImage::ptys`).
    PtyMaster { pty: u32 },
    /// The terminal side of a pseudo-terminal made inside the job.
    PtySlave { pty: u32 },
    /// A signalfd and the signals it takes.
    SignalFd { mask: u64 },
    EventFd { count: u64, semaphore: bool },
    /// A timerfd: `value_ns` left until it fires (relative; absolute for CLOCK_REALTIME with TFD_TIMER_ABSTIME),
    /// `ticks` expirations not yet read.
    TimerFd { clock: i32, settime_flags: i32, value_ns: u64, interval_ns: u64, ticks: u64 },
    /// An epoll instance; the process `owner` (index in `JobImage::processes`) registers `items` again with its own
    /// fd numbers (the kernel identifies entries by fd number).
    Epoll { items: Vec<EpollItem>, owner: u32 },
    /// An inotify instance and its watches, with their watch descriptors.
    Inotify { watches: Vec<InotifyWatch> },
    /// A pidfd of a process of the job (reopened in the restored process that holds it).
    PidFd { pid: i32 },
    /// A memfd, or a file deleted while open (O_TMPFILE included): its contents follow the job's metadata in Data
    /// chunks (`JobImage::data`).
    Memory { data: u32, name: String, seals: i32, deleted_from: Option<String>, dev: u64, ino: u64 },
}

/// The character devices an image may hold open (`FileKind::Device`), with their device numbers: the checkpoint
/// takes only these, and a restore opens only these, and checks it got them.
pub const DEVICES: [(&str, u32, u32); 5] =
    [("/dev/null", 1, 3), ("/dev/zero", 1, 5), ("/dev/full", 1, 7), ("/dev/random", 1, 8), ("/dev/urandom", 1, 9)];

/// The path of the device with these numbers, if an image may hold it.
pub fn device_path(major: u32, minor: u32) -> Option<&'static str> {
    DEVICES.iter().find(|d| (d.1, d.2) == (major, minor)).map(|d| d.0)
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EpollItem {
    pub fd: i32,
    pub events: u32,
    pub data: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct InotifyWatch {
    pub wd: i32,
    pub mask: u32,
    pub path: String,
}

/// Contents the image carries for an object (a memfd, a deleted file): `size` bytes, of which the ranges in Data
/// chunks hold data (the rest are holes).
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct DataImage {
    pub size: u64,
    /// Bytes stored in Data chunks.
    pub stored: u64,
}

/// A pseudo-terminal pair made inside the job, with what waits in it in both directions.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct PtyImage {
    /// Its number (/dev/pts/N) then; a restore gets whatever number is free.
    pub index: u32,
    pub termios: ByteBuf,
    pub rows: u16,
    pub cols: u16,
    /// Typed on the master side, not yet read on the terminal side.
    pub input: ByteBuf,
    /// Written on the terminal side, not yet read on the master side.
    pub output: ByteBuf,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchPath {
    pub fd: i32,
    pub wd: i32,
    pub path: String,
}

/// A session leader's controlling terminal, when it is one of the job's pseudo-terminals: made its controlling
/// terminal again through `fd` (an fd of the leader pointing at it), with `foreground` the foreground group.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default)]
pub struct Ctty {
    pub fd: i32,
    pub foreground: i32,
}

/// A pipe (or named FIFO) whose ends are all held inside the job, with the bytes in flight.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct PipeImage {
    pub capacity: u32,
    pub data: ByteBuf,
    /// Path of a named FIFO.
    pub fifo: Option<String>,
}

/// A unix socket of the job.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct SocketImage {
    /// SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
    pub kind: i32,
    /// The address it is bound to.
    pub local: SockAddr,
    /// The socket it is connected to (`JobImage::sockets`).
    pub peer: Option<u32>,
    pub listening: bool,
    /// What waits in its receive queue: bytes (stream) or one entry per message.
    pub queue: Vec<ByteBuf>,
    pub sndbuf: u32,
    pub rcvbuf: u32,
    /// SHUT_RD / SHUT_WR already done (bit 0: no more reading, bit 1: no more writing).
    pub shutdown: u8,
}

/// A TCP or UDP socket. Addresses are written as `1.2.3.4:80` or `[::1]:80`.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct InetSocket {
    /// AF_INET or AF_INET6.
    pub family: i32,
    /// SOCK_STREAM (TCP) or SOCK_DGRAM (UDP).
    pub kind: i32,
    pub local: Option<String>,
    pub peer: Option<String>,
    pub state: InetState,
    /// Options set on it that differ from a fresh socket's: (level, name, value).
    pub options: Vec<(i32, i32, i32)>,
}

/// Options kept across a restore when the app changed them from a fresh socket's.
pub const INET_OPTIONS: &[(i32, i32)] = &[
    (libc::SOL_SOCKET, libc::SO_REUSEADDR),
    (libc::SOL_SOCKET, libc::SO_REUSEPORT),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    (libc::SOL_SOCKET, libc::SO_BROADCAST),
    (libc::SOL_SOCKET, libc::SO_OOBINLINE),
    (libc::SOL_SOCKET, libc::SO_PRIORITY),
    (libc::SOL_SOCKET, libc::SO_RCVLOWAT),
    (libc::SOL_SOCKET, libc::SO_MARK),
    (libc::SOL_SOCKET, libc::SO_LINGER),
    (libc::SOL_SOCKET, libc::SO_SNDBUF),
    (libc::SOL_SOCKET, libc::SO_RCVBUF),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY),
    (libc::IPPROTO_TCP, libc::TCP_CORK),
    (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
    (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
    (libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
    (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
    (libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT),
    (libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT),
    (libc::IPPROTO_IP, libc::IP_TOS),
    (libc::IPPROTO_IP, libc::IP_TTL),
    (libc::IPPROTO_IP, libc::IP_FREEBIND),
    (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
    (libc::IPPROTO_IPV6, libc::IPV6_TCLASS),
    (libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS),
];

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub enum InetState {
    /// Made, perhaps bound, not connected (a UDP socket may be connected: `peer`).
    #[default]
    Open,
    Listening { backlog: u32 },
    /// An established TCP connection, with what TCP_REPAIR needs to make it again.
    Connected(TcpConnection),
    /// A TCP connection to a peer outside the job, not kept (no `--tcp-established`): the app sees it reset.
    Reset,
}

/// An established TCP connection as TCP_REPAIR reads it.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct TcpConnection {
    /// The sequence number after the last byte queued to send, and after the last byte received.
    pub send_seq: u32,
    pub recv_seq: u32,
    /// Bytes sent and not acknowledged yet, then bytes not sent yet (the last `unsent` of them).
    pub send_queue: ByteBuf,
    pub unsent: u32,
    /// Bytes received and not read yet.
    pub recv_queue: ByteBuf,
    pub mss: u32,
    /// TCP_INFO's tcpi_options (timestamps, SACK, window scaling) and the window scales.
    pub tcp_options: u8,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    pub timestamp: u32,
    /// struct tcp_repair_window: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup.
    pub window: [u32; 5],
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub enum SockAddr {
    #[default]
    Unnamed,
    Path(String),
    Abstract(ByteBuf),
}

/// Memory several mappings share that no file on disk keeps: anonymous shared memory, memfd, deleted files.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct SharedMemory {
    pub name: String,
    pub size: u64,
    /// The process (index in `JobImage::processes`) whose page data holds the contents.
    pub writer: u32,
    /// When the job also has it open as a file (a memfd, a deleted file): that open file, whose contents travel
    /// in Data chunks; then no process stores its pages.
    pub file: Option<u32>,
}

/// The job's controlling terminal as the job had it.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct TerminalImage {
    /// struct termios, raw.
    pub termios: ByteBuf,
    pub rows: u16,
    pub cols: u16,
    /// The foreground process group (the job's pid namespace numbers it; 0: a group outside the job).
    pub foreground: i32,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct SignalImage {
    /// Kernel dispositions of signals 1..=64, index = signal - 1.
    pub actions: Vec<SigAction>,
    /// Signals queued for the whole process (raw 128-byte siginfo).
    pub pending: Vec<ByteBuf>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SigAction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct ProcessAttrs {
    pub cwd: String,
    pub umask: u32,
    pub rlimits: Vec<Rlimit>,
    pub hostname: String,
    pub domainname: String,
    /// The pid namespace's last allocated pid, so new pids continue where they would have.
    pub ns_last_pid: i32,
    /// CLOCK_MONOTONIC and CLOCK_BOOTTIME as the job saw them at the checkpoint instant.
    pub monotonic_ns: u64,
    pub boottime_ns: u64,
    pub dumpable: i32,
    pub pdeath_sig: i32,
    /// Capability sets (effective, permitted, inheritable): restored exactly, whatever vOS needed meanwhile.
    pub caps: Caps,
    /// Who the process is and what confines it (absent from older images): read by the supervisor from outside
    /// (the kernel's view, not the process's word), but for the securebits, which only a thread can read.
    #[serde(default)]
    pub creds: Option<Creds>,
}

/// A process's principal and sandbox, the same for each of its threads (a checkpoint refuses a process whose
/// threads differ). Applied to every thread at restore, after everything that needs privilege.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Creds {
    /// Real, effective, saved and filesystem uids.
    pub uid: [u32; 4],
    /// Real, effective, saved and filesystem gids.
    pub gid: [u32; 4],
    /// Supplementary groups, as the kernel lists them.
    pub groups: Vec<u32>,
    pub caps: CapSets,
    /// SECBIT_* flags and their locks (prctl PR_GET_SECUREBITS).
    pub securebits: u32,
    pub no_new_privs: bool,
    pub seccomp: Seccomp,
    /// The ids and capabilities are those of the user namespace vrun makes for a job launched without root (the
    /// job's ids map 1:1 to the launching user's; capabilities there are worth nothing outside it).
    pub user_ns: bool,
    /// The working directory is one the process's own credentials cannot reach (a daemon that dropped privileges
    /// there): a restore enters it before the process drops to them, which only an image root owns may ask.
    pub privileged_cwd: bool,
}

/// Capability sets as bit masks (bit n: capability n).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapSets {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
    pub bounding: u64,
}

/// Seccomp as a process had it: mode 0 (none) or 2 (filters; strict mode 1 is refused at checkpoint).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Seccomp {
    pub mode: u32,
    /// Filters the process had from the supervising vrun itself (a container's, the environment's): not carried.
    /// A restored process has those of the vrun that restores it, then `filters` on top.
    pub inherited: u32,
    /// The filters the job installed, oldest first: each a classic BPF program.
    pub filters: Vec<SeccompFilter>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct SeccompFilter {
    /// struct sock_filter[], 8 bytes each, as PTRACE_SECCOMP_GET_FILTER gives it.
    pub prog: ByteBuf,
    /// Installed with SECCOMP_FILTER_FLAG_LOG.
    pub log: bool,
}

/// The filesystem credentials a restore opens a file with.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct FsCreds {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Creds {
    /// The credentials this process opens files with.
    pub fn fs(&self) -> FsCreds {
        FsCreds { uid: self.uid[3], gid: self.gid[3], groups: self.groups.clone() }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: u32,
    pub cur: u64,
    pub max: u64,
}

/// The mm fields the kernel keeps per process (PR_SET_MM_MAP restores them).
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct MmImage {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: ByteBuf,
}

/// Where the shim's restart code is (the shim is mapped at the same address after restore).
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct ShimImage {
    pub restart_entry: u64,
    pub restart_stack_top: u64,
}

/// What the launcher hands the shim's restart code (through the plan's blob).
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct RestartSpec {
    pub process: ProcessImage,
    /// For each of the process's fds, the inherited fd holding its open file (same order as `process.fds`).
    pub fd_sources: Vec<i32>,
    /// Control socket to the launcher.
    pub ctl_fd: i32,
    /// The restoring launcher's control socket name, log file and shim (for later checkpoints, messages and
    /// execs): this host's, not the checkpoint host's.
    pub sock: String,
    pub log: String,
    pub shim: String,
}

/// Restore steps that depend on the process's own fd numbers or identity.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum FdFixup {
    /// Register these fds again in the epoll instance at `epfd`.
    Epoll { epfd: i32, items: Vec<EpollItem> },
    /// Open a pidfd for `pid` at `fd`.
    PidFd { fd: i32, pid: i32, flags: i32, cloexec: bool },
    /// Take a POSIX record lock through `fd` (l_type F_RDLCK or F_WRLCK, from `start`, `len` bytes; 0 = to EOF).
    RecordLock { fd: i32, write: bool, start: u64, len: u64 },
}

#[cfg(test)]
mod tests;
