//! Files: every process's fd table, captured from outside (the supervisor sees the whole job), and the open
//! files behind them recreated once at restore.
//!
//! An open file description is shared by every fd that points at it, in one process or several (dup, fork):
//! offset and status flags live there. At checkpoint the fds of all processes are grouped into open files
//! (kcmp tells when two fds share one); pipes keep the bytes in flight (read without consuming them, with
//! tee); sockets are `sockets`' business. At restore each open file is opened or created once by the
//! supervisor and handed to every restored process, which puts it at its fd numbers (shim/src/files.rs).

use crate::os::{data_ranges, grab};
use crate::job::members::Member;
use crate::resources::pathopen::{self, Want};
use crate::resources::{events, inet, sockets};
use anyhow::{Result, anyhow, bail};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use vos::image::{DataImage, FdFixup, FdImage, FileId, FileKind, FileLock, JobImage, OpenFile, PipeImage};

/// One fd as found in /proc.
struct Found {
    fd: i32,
    target: String,
    flags: i32,
    cloexec: bool,
    pos: u64,
    dev: u64,
    ino: u64,
    mode: u32,
    rdev: u64,
    tty_index: Option<u32>,
    /// The whole fdinfo text.
    info: String,
}

fn found(pid: i32, fd: i32) -> Result<Found> {
    let target = crate::job::members::as_seen_by(pid, std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))?.to_string_lossy().into_owned());
    let md = std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))?;
    if target == "anon_inode:[timerfd]" {
        events::settle_timerfd(&grab(pid, fd)?);
    }
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))?;
    let get = |k: &str| info.lines().find_map(|l| l.strip_prefix(k)?.strip_prefix(':').map(str::trim));
    let mut flags = get("flags").and_then(|f| i64::from_str_radix(f, 8).ok()).unwrap_or(0) as i32;
    let cloexec = flags & libc::O_CLOEXEC != 0;
    flags &= !libc::O_CLOEXEC;
    Ok(Found {
        fd,
        target,
        flags,
        cloexec,
        pos: get("pos").and_then(|p| p.parse().ok()).unwrap_or(0),
        dev: md.dev(),
        ino: md.ino(),
        mode: md.mode(),
        rdev: md.rdev(),
        tty_index: get("tty-index").and_then(|t| t.parse().ok()),
        info: info.clone(),
    })
}

/// Fill `job.files`, `job.pipes`, `job.sockets` and every process's `fds`. `own` lists, per process (by
/// namespace pid), fds of the shim's coordinator that are not the app's.
/// Returns the fds whose contents the image carries in Data chunks (one per `job.data` entry).
/// `established`: keep TCP connections to peers outside the job (`--tcp-established`); the connections read in
/// repair mode come back in `Captured::held`.
pub fn capture(job: &mut JobImage, members: &[Member], own: &HashMap<i32, Vec<i32>>, established: bool) -> Result<Captured> {
    let mut all: Vec<Fd> = vec![];
    for (pi, p) in job.processes.iter().enumerate() {
        let host = host_of(members, p.pid)?;
        let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{host}/fd"))?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|fd| !own.get(&p.pid).is_some_and(|o| o.contains(fd)))
            .collect();
        fds.sort();
        for fd in fds {
            let f = found(host, fd).map_err(|e| anyhow!("pid {} fd {fd}: {e}", p.pid))?;
            all.push(Fd { process: pi, host, found: f, file: u32::MAX });
        }
    }
    group_open_files(job, &mut all);
    // Now that every fd of the job is known, say what each open file is.
    let mut ctx = Ctx {
        pipes: HashMap::new(),
        ptys: HashMap::new(),
        data: vec![],
        sockets: sockets::Capture::new()?,
        socket_inodes: all.iter().filter(|f| f.found.mode & S_IFMT == libc::S_IFSOCK).map(|f| f.found.ino).collect(),
        inet: inet::Capture::new(
            &all.iter().filter(|f| f.found.mode & S_IFMT == libc::S_IFSOCK).map(|f| (f.host, f.found.fd)).collect::<Vec<_>>(),
            established,
        ),
    };
    for f in &all {
        if !matches!(job.files[f.file as usize].kind, FileKind::Unknown) {
            continue;
        }
        let kind = ctx.classify(job, &all, f).map_err(|e| anyhow!("pid {} fd {}: {e}", job.processes[f.process].pid, f.found.fd))?;
        job.files[f.file as usize].kind = kind;
    }
    ctx.sockets.link(job);
    for f in &all {
        let file = &mut job.files[f.file as usize];
        for (kind, l) in locks(&f.found.info) {
            if (kind == "FLOCK" || kind == "OFDLCK") && !file.locks.contains(&l) {
                file.locks.push(l);
            }
        }
    }
    for f in &all {
        job.processes[f.process].fds.push(FdImage { fd: f.found.fd, cloexec: f.found.cloexec, file: f.file });
    }
    fixups(job, &all)?;
    Ok(Captured { data: ctx.data, held: ctx.inet.held })
}

/// Group the fds into open files (`job.files`), in the order of their first fd: fds share one when kcmp says so.
/// Only fds on the same inode can; among those, kcmp's ordering sorts them, so thousands of fds on one file
/// (a job with 7,000 fds of /dev/null) cost n log n comparisons, not n².
fn group_open_files(job: &mut JobImage, all: &mut [Fd]) {
    let mut by_inode: HashMap<(u64, u64), Vec<usize>> = HashMap::new();
    for (i, f) in all.iter().enumerate() {
        by_inode.entry((f.found.dev, f.found.ino)).or_default().push(i);
    }
    // Per fd, the first fd (index in `all`) of its open file.
    let mut first: Vec<usize> = (0..all.len()).collect();
    for idx in by_inode.values_mut().filter(|v| v.len() > 1) {
        let cmp = |a: &usize, b: &usize| kcmp_order(all[*a].host, all[*a].found.fd, all[*b].host, all[*b].found.fd);
        idx.sort_by(cmp);
        let mut start = 0;
        for k in 1..=idx.len() {
            if k == idx.len() || cmp(&idx[start], &idx[k]) != std::cmp::Ordering::Equal {
                let lead = *idx[start..k].iter().min().unwrap();
                idx[start..k].iter().for_each(|&i| first[i] = lead);
                start = k;
            }
        }
    }
    for i in 0..all.len() {
        if first[i] == i {
            let f = &all[i].found;
            job.files.push(OpenFile { flags: f.flags, pos: f.pos, kind: FileKind::Unknown, locks: vec![], open_as: None });
            all[i].file = (job.files.len() - 1) as u32;
        } else {
            all[i].file = all[first[i]].file;
        }
    }
}

/// kcmp's order of two open files (equal when they are the same one).
fn kcmp_order(pid1: i32, fd1: i32, pid2: i32, fd2: i32) -> std::cmp::Ordering {
    const KCMP_FILE: i32 = 0;
    // SAFETY: kcmp only compares kernel objects.
    match unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, KCMP_FILE, fd1, fd2) } {
        0 => std::cmp::Ordering::Equal,
        1 => std::cmp::Ordering::Less,
        _ => std::cmp::Ordering::Greater,
    }
}

/// What each process must redo itself: epoll registrations, pidfds, its POSIX record locks.
fn fixups(job: &mut JobImage, all: &[Fd]) -> Result<()> {
    let inode_of = |pi: usize, fd: i32| all.iter().find(|f| f.process == pi && f.found.fd == fd).map(|f| f.found.ino);
    for file in 0..job.files.len() {
        let FileKind::Epoll { items, .. } = &job.files[file].kind else { continue };
        let items = items.clone();
        let info = &all.iter().find(|f| f.file as usize == file).unwrap().found.info;
        let owner = events::epoll_owner(job, file as u32, &items, &inode_of, info)?;
        job.files[file].kind = FileKind::Epoll { items: items.clone(), owner };
        let p = &mut job.processes[owner as usize];
        let epfd = p.fds.iter().find(|f| f.file as usize == file).unwrap().fd;
        p.fixups.push(FdFixup::Epoll { epfd, items });
    }
    for f in all {
        let p = &mut job.processes[f.process];
        if let FileKind::PidFd { pid } = job.files[f.file as usize].kind {
            let flags = f.found.flags & libc::O_NONBLOCK;
            p.fixups.push(FdFixup::PidFd { fd: f.found.fd, pid, flags, cloexec: f.found.cloexec });
        }
        for l in locks(&f.found.info).into_iter().filter(|l| l.0 == "POSIX") {
            let fix = FdFixup::RecordLock { fd: f.found.fd, write: l.1.write, start: l.1.start, len: l.1.len };
            let dup = p.fixups.iter().any(|x| matches!(x, FdFixup::RecordLock { write, start, len, .. } if *write == l.1.write && *start == l.1.start && *len == l.1.len));
            if !dup {
                p.fixups.push(fix);
            }
        }
    }
    Ok(())
}

/// Locks listed in an fdinfo ("lock:" lines): the kind (FLOCK, OFDLCK, POSIX...) and the lock.
fn locks(info: &str) -> Vec<(String, FileLock)> {
    info.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.strip_prefix("lock:")?.split_whitespace().collect();
            // "1: POSIX  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
            let (kind, write, start, end) = (w.get(1)?, *w.get(3)? == "WRITE", w.get(6)?.parse::<u64>().ok()?, w.get(7)?);
            let len = if *end == "EOF" { 0 } else { end.parse::<u64>().ok()? - start + 1 };
            Some((kind.to_string(), FileLock { flock: *kind == "FLOCK", write, start, len }))
        })
        .collect()
}

fn host_of(members: &[Member], pid: i32) -> Result<i32> {
    crate::job::members::task_of(members, pid).map(|p| p.as_raw()).ok_or_else(|| anyhow!("process {pid} vanished"))
}

/// One fd of the job.
struct Fd {
    process: usize,
    host: i32,
    found: Found,
    file: u32,
}

struct Ctx {
    /// Pipes by (dev, ino).
    pipes: HashMap<(u64, u64), u32>,
    /// Sources of the contents the image carries (memfds, deleted files), one per `job.data` entry.
    data: Vec<OwnedFd>,
    /// The job's pseudo-terminals by their number.
    ptys: HashMap<u32, u32>,
    sockets: sockets::Capture,
    socket_inodes: Vec<u64>,
    inet: inet::Capture,
}

/// What a capture leaves open until the checkpoint ends.
pub struct Captured {
    /// Sources of the contents the image carries (memfds, deleted files), one per `job.data` entry.
    pub data: Vec<OwnedFd>,
    /// TCP connections held in repair mode.
    pub held: inet::Held,
}

const S_IFMT: u32 = libc::S_IFMT;

impl Ctx {
    fn classify(&mut self, job: &mut JobImage, all: &[Fd], fd: &Fd) -> Result<FileKind> {
        let f = &fd.found;
        let stream = (0..=2).contains(&f.fd).then_some(f.fd as u8);
        match f.mode & S_IFMT {
            libc::S_IFREG if vos::image::is_detached(&f.target) => self.memory(job, fd),
            libc::S_IFREG => Ok(FileKind::Regular { file: file_id(fd.host, &f.target, f.dev, f.ino)? }),
            libc::S_IFDIR => Ok(FileKind::Dir { path: f.target.clone() }),
            libc::S_IFCHR => {
                let (major, minor) = (libc::major(f.rdev), libc::minor(f.rdev));
                match (major, minor) {
                    _ if vos::image::device_path(major, minor).is_some() => {
                        // Recorded by its standard name: a restore opens no other (vos::image::DEVICES).
                        Ok(FileKind::Device { path: vos::image::device_path(major, minor).unwrap_or_default().into() })
                    }
                    (5, 2) => {
                        let index = f.tty_index.ok_or_else(|| anyhow!("{}: no pseudo-terminal number", f.target))?;
                        Ok(FileKind::PtyMaster { pty: self.pty(job, all, index)? })
                    }
                    (136..=143, _) if all.iter().any(|o| o.found.tty_index == Some(pts_index(f.rdev))) => {
                        Ok(FileKind::PtySlave { pty: self.pty(job, all, pts_index(f.rdev))? })
                    }
                    (136..=143, _) | (4, _) | (5, 0) | (5, 1) => {
                        let stream = stream.unwrap_or(if f.flags & libc::O_ACCMODE == libc::O_WRONLY { 1 } else { 0 });
                        Ok(FileKind::Terminal { path: f.target.clone(), stream })
                    }
                    _ => bail!("character device {} is not supported", f.target),
                }
            }
            libc::S_IFIFO => {
                let ends: Vec<&Fd> = all.iter().filter(|o| o.found.dev == f.dev && o.found.ino == f.ino).collect();
                let reader = ends.iter().find(|e| e.found.flags & libc::O_ACCMODE != libc::O_WRONLY);
                let writer = ends.iter().find(|e| e.found.flags & libc::O_ACCMODE != libc::O_RDONLY);
                // A pipe is the job's when the job holds both ends, or one end and nobody holds the other.
                let inside = match (reader, writer) {
                    (Some(_), Some(_)) => true,
                    (Some(r), None) => poll_says(r, libc::POLLHUP),
                    (None, Some(w)) => poll_says(w, libc::POLLERR),
                    (None, None) => false,
                };
                if !inside {
                    return match stream {
                        Some(s) => Ok(FileKind::Outside { what: f.target.clone(), stream: s }),
                        None => bail!("{} leads to a process outside the job: not supported", f.target),
                    };
                }
                let pipe = match self.pipes.get(&(f.dev, f.ino)) {
                    Some(&p) => p,
                    None => {
                        let (capacity, data) = match reader {
                            Some(r) => peek_pipe(grab(r.host, r.found.fd)?.as_raw_fd())?,
                            None => (pipe_size(grab(writer.unwrap().host, writer.unwrap().found.fd)?.as_raw_fd())?, vec![]),
                        };
                        let fifo = (!f.target.starts_with("pipe:")).then(|| f.target.clone());
                        job.pipes.push(PipeImage { capacity, data: serde_bytes::ByteBuf::from(data), fifo });
                        let p = (job.pipes.len() - 1) as u32;
                        self.pipes.insert((f.dev, f.ino), p);
                        p
                    }
                };
                Ok(FileKind::Pipe { pipe, write: f.flags & libc::O_ACCMODE == libc::O_WRONLY })
            }
            libc::S_IFSOCK => {
                if let Some(socket) = self.inet.socket(job, fd.host, f.fd, f.ino)? {
                    return Ok(FileKind::Inet { socket });
                }
                match self.sockets.socket(job, &self.socket_inodes, fd.host, f.fd, f.ino)? {
                    Some(socket) => Ok(FileKind::Socket { socket }),
                    None => match stream {
                        Some(s) => Ok(FileKind::Outside { what: f.target.clone(), stream: s }),
                        None => bail!("{} is connected to a process outside the job: not supported", f.target),
                    },
                }
            }
            _ if f.target.starts_with("anon_inode:") && events::capture(&f.target, &f.info)?.is_some() => {
                match events::capture(&f.target, &f.info)?.unwrap() {
                    FileKind::Inotify { .. } => {
                        events::inotify_unread(&grab(fd.host, f.fd)?)?;
                        Ok(FileKind::Inotify { watches: events::inotify_watches(job, fd.file, &f.info)? })
                    }
                    k => Ok(k),
                }
            }
            _ if f.target.starts_with("anon_inode:") => {
                let kind = f.target.trim_start_matches("anon_inode:").trim_matches(|c| c == '[' || c == ']');
                bail!("{kind} ({}) is not supported yet", f.target)
            }
            _ => bail!("{} is not supported", f.target),
        }
    }
}

/// The number N of /dev/pts/N from its device number.
pub fn pts_index(rdev: u64) -> u32 {
    (libc::major(rdev) - 136) * 256 + libc::minor(rdev)
}

impl Ctx {
    /// A memfd or a file deleted while open: its contents travel in the image.
    fn memory(&mut self, job: &mut JobImage, fd: &Fd) -> Result<FileKind> {
        let f = &fd.found;
        let src = grab(fd.host, f.fd)?;
        let size = nix::sys::stat::fstat(&src)?.st_size as u64;
        let stored = data_ranges(src.as_raw_fd(), size).iter().map(|(a, b)| b - a).sum();
        // SAFETY: F_GET_SEALS on a file we hold; -1 for files that cannot be sealed.
        let seals = unsafe { libc::fcntl(src.as_raw_fd(), libc::F_GET_SEALS) }.max(0);
        let (name, deleted_from) = match f.target.strip_prefix("/memfd:") {
            Some(n) => (n.trim_end_matches(" (deleted)").to_string(), None),
            None => {
                let path = f.target.trim_end_matches(" (deleted)");
                let dir = std::path::Path::new(path).parent().map(|d| d.display().to_string());
                (path.to_string(), dir)
            }
        };
        job.data.push(DataImage { size, stored });
        self.data.push(src);
        Ok(FileKind::Memory { data: (job.data.len() - 1) as u32, name, seals, deleted_from, dev: f.dev, ino: f.ino })
    }

    /// The job's pseudo-terminal number `index`, captured the first time (with its bytes in flight).
    fn pty(&mut self, job: &mut JobImage, all: &[Fd], index: u32) -> Result<u32> {
        if let Some(&p) = self.ptys.get(&index) {
            return Ok(p);
        }
        let master = all.iter().find(|o| o.found.tty_index == Some(index)).unwrap();
        let m = grab(master.host, master.found.fd)?;
        let slave = match all.iter().find(|o| libc::major(o.found.rdev) >= 136 && o.found.mode & S_IFMT == libc::S_IFCHR && pts_index(o.found.rdev) == index) {
            Some(o) => grab(o.host, o.found.fd)?,
            None => reopen(&format!("/dev/pts/{index}"), libc::O_RDWR)?,
        };
        job.ptys.push(crate::resources::terminal::capture_pty(index, m.as_raw_fd(), slave.as_raw_fd())?);
        let p = (job.ptys.len() - 1) as u32;
        self.ptys.insert(index, p);
        Ok(p)
    }
}

/// Whether poll reports `event` on a pipe end: POLLHUP on a read end means nobody can write any more,
/// POLLERR on a write end that nobody can read.
fn poll_says(end: &Fd, event: i16) -> bool {
    let Ok(fd) = grab(end.host, end.found.fd) else { return false };
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: 0, revents: 0 };
    // SAFETY: poll on one valid pollfd, without waiting.
    unsafe { libc::poll(&mut p, 1, 0) };
    p.revents & event != 0
}

fn pipe_size(fd: RawFd) -> Result<u32> {
    // SAFETY: fcntl on an fd we own.
    let capacity = unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) };
    if capacity <= 0 {
        bail!("F_GETPIPE_SZ: {}", std::io::Error::last_os_error());
    }
    Ok(capacity as u32)
}

/// The bytes waiting in a pipe, without taking them: tee() them into a pipe of our own.
fn peek_pipe(fd: RawFd) -> Result<(u32, Vec<u8>)> {
    let capacity = pipe_size(fd)? as i32;
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
    // SAFETY: fcntl on our own pipe.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, capacity) };
    // SAFETY: tee between two pipes; SPLICE_F_NONBLOCK so an empty pipe returns at once.
    let n = unsafe { libc::tee(fd, w.as_raw_fd(), capacity as usize, libc::SPLICE_F_NONBLOCK) };
    let mut data = vec![];
    if n > 0 {
        drop(w);
        File::from(r).read_to_end(&mut data)?;
    } else if n < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN) {
        bail!("tee: {}", std::io::Error::last_os_error());
    }
    Ok((capacity as u32, data))
}

/// Identify a file process `host` has open at `path`, checking that the path still names that very file.
fn file_id(host: i32, path: &str, dev: u64, ino: u64) -> Result<FileId> {
    let md = std::fs::metadata(crate::job::members::seen_by(host, path)).map_err(|e| anyhow!("{path}: {e}"))?;
    if md.dev() != dev || md.ino() != ino {
        bail!("{path} was replaced by another file since it was opened");
    }
    Ok(FileId { path: path.into(), dev, ino, size: md.size(), mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(), build_id: None, hash: 0 })
}

// ---- restore ---------------------------------------------------------------------------------------------------

/// The job's open files, recreated; `stdio` are the restoring supervisor's stdin, stdout, stderr (stdin may be
/// /dev/null when the image came on stdin); `fill(data, fd)` writes the contents of a memfd or deleted file
/// from the image. Returns one fd per `job.files` entry.
/// Each file a path names is opened (a FIFO, a unix socket bound, an inotify watch added) with the credentials
/// `auth` gives it (`creds::Authority::for_file`): a root restore opens nothing for a job the job could not.
pub fn restore(job: &JobImage, stdio: &[RawFd; 3], fill: &mut dyn FnMut(u32, RawFd) -> Result<()>, auth: &crate::resources::creds::Authority) -> Result<Vec<OwnedFd>> {
    let mut pipes: Vec<Option<(OwnedFd, OwnedFd)>> = (0..job.pipes.len()).map(|_| None).collect();
    let ptys: Vec<(OwnedFd, OwnedFd)> = job.ptys.iter().map(crate::resources::terminal::make_pty).collect::<Result<_>>()?;
    let sockets = sockets::restore(job, &crate::resources::creds::socket_openers(job, auth))?;
    let inet = inet::restore(job)?;
    let mut out = Vec::with_capacity(job.files.len());
    // Pipe ends and terminal sides already given to an open file: another open file of the same one is another
    // open of it.
    let mut given: std::collections::HashSet<(bool, u32, bool)> = std::collections::HashSet::new();
    for (i, f) in job.files.iter().enumerate() {
        let who = auth.for_file(f);
        let fd: OwnedFd = crate::resources::creds::as_user(who.as_ref(), || Ok(match &f.kind {
            FileKind::Regular { file } => {
                let fd = open_by_path(&file.path, f.flags, Want::Regular)?;
                nix::unistd::lseek(&fd, f.pos as i64, nix::unistd::Whence::SeekSet)?;
                fd
            }
            FileKind::Dir { path } => {
                let fd = open_by_path(path, f.flags, Want::Dir)?;
                let _ = nix::unistd::lseek(&fd, f.pos as i64, nix::unistd::Whence::SeekSet);
                fd
            }
            FileKind::Device { path } => {
                let &(_, major, minor) = vos::image::DEVICES.iter().find(|d| d.0 == path).ok_or_else(|| anyhow!("{path}: not a device an image may hold"))?;
                open_by_path(path, f.flags, Want::Device(major, minor))?
            }
            FileKind::Terminal { stream, .. } | FileKind::Outside { stream, .. } => {
                nix::unistd::dup(unsafe_borrow(stdio[*stream as usize]))?
            }
            FileKind::Pipe { pipe, write } => {
                let p = *pipe as usize;
                if pipes[p].is_none() {
                    pipes[p] = Some(make_pipe(&job.pipes[p])?);
                }
                let (r, w) = pipes[p].as_ref().unwrap();
                let end = if *write { w } else { r };
                // The first open file of each end takes the end itself; another open file of the same end (a
                // FIFO opened twice) gets a new description of it through /proc.
                if !given.insert((false, *pipe, *write)) {
                    reopen(&format!("/proc/self/fd/{}", end.as_raw_fd()), f.flags)?
                } else {
                    end.try_clone()?
                }
            }
            FileKind::Socket { socket } => sockets[*socket as usize].try_clone()?,
            FileKind::Inet { socket } => inet[*socket as usize].try_clone()?,
            FileKind::PtyMaster { pty } => ptys[*pty as usize].0.try_clone()?,
            FileKind::PtySlave { pty } => {
                let (m, sl) = &ptys[*pty as usize];
                // A second open file of the same terminal side is another open of it.
                if !given.insert((true, *pty, false)) {
                    // SAFETY: TIOCGPTPEER opens the pair's terminal side; the fd is owned here.
                    let fd = unsafe { libc::ioctl(m.as_raw_fd(), libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
                    if fd < 0 {
                        bail!("reopening a pseudo-terminal: {}", std::io::Error::last_os_error());
                    }
                    // SAFETY: fresh fd.
                    unsafe { OwnedFd::from_raw_fd(fd) }
                } else {
                    sl.try_clone()?
                }
            }
            FileKind::SignalFd { mask } => {
                // SAFETY: the kernel's signal set is 64 bits; signalfd takes its size.
                let fd = unsafe { libc::syscall(libc::SYS_signalfd4, -1, mask as *const u64, 8usize, libc::SFD_CLOEXEC) };
                if fd < 0 {
                    bail!("signalfd: {}", std::io::Error::last_os_error());
                }
                // SAFETY: fresh fd.
                unsafe { OwnedFd::from_raw_fd(fd as i32) }
            }
            FileKind::Memory { data, name, seals, deleted_from, .. } => {
                let fd = memory_file(name, deleted_from.as_deref())?;
                nix::unistd::ftruncate(&fd, job.data[*data as usize].size as i64)?;
                fill(*data, fd.as_raw_fd())?;
                // The job may have it open read-only, say: another open of the same file.
                let fd = if f.flags & libc::O_ACCMODE == libc::O_RDWR { fd } else { reopen(&format!("/proc/self/fd/{}", fd.as_raw_fd()), f.flags)? };
                let _ = nix::unistd::lseek(&fd, f.pos as i64, nix::unistd::Whence::SeekSet);
                if *seals != 0 {
                    // SAFETY: F_ADD_SEALS on our file.
                    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, *seals) };
                }
                fd
            }
            k => match events::restore(k)? {
                Some(fd) => fd,
                None => bail!("open file {i} of the image has no kind"),
            },
        }))?;
        set_status_flags(&fd, f.flags)?;
        take_locks(&fd, &f.locks)?;
        out.push(fd);
    }
    Ok(out)
}

/// Fds 0, 1 and 2 of the job that led outside it (a terminal, a pipe or socket to another process) are bound to
/// `vrun restore`'s own fd of the same number: a shell gives all three one terminal (one open file), and the job
/// restored with `> log`, in a pipe or by migration must still write its output to fd 1 and its errors to fd 2.
/// Returns restore's three fds, each with the status flags the job's open file had (as it shared them before).
pub fn stdio_bindings(job: &JobImage, stdio: &[RawFd; 3]) -> Result<Vec<OwnedFd>> {
    let mut out = Vec::with_capacity(3);
    for (n, &fd) in stdio.iter().enumerate() {
        let bound = nix::unistd::dup(unsafe_borrow(fd))?;
        let flags = job.processes.iter().flat_map(|p| &p.fds).filter(|f| f.fd == n as i32).find_map(|f| match job.files.get(f.file as usize) {
            Some(o @ OpenFile { kind: FileKind::Terminal { .. } | FileKind::Outside { .. }, .. }) => Some(o.flags),
            _ => None,
        });
        if let Some(flags) = flags {
            set_status_flags(&bound, flags)?;
        }
        out.push(bound);
    }
    Ok(out)
}

/// The inherited fd (of `object_at`, one per open file, or `stdio_at`, see `stdio_bindings`) that fd `f` of a
/// restored process is made from.
pub fn source_of(job: &JobImage, f: &FdImage, object_at: &[i32], stdio_at: &[i32]) -> i32 {
    let outside = matches!(job.files.get(f.file as usize).map(|o| &o.kind), Some(FileKind::Terminal { .. } | FileKind::Outside { .. }));
    match usize::try_from(f.fd) {
        Ok(n) if n < 3 && outside => stdio_at[n],
        _ => object_at[f.file as usize],
    }
}

/// Where a memfd or deleted file is made again: an unnamed file in the directory the deleted file was in (the
/// same filesystem, as before), else a memfd. Unnamed: it replaces nothing, and the directory is no symlink.
fn memory_file(name: &str, dir: Option<&str>) -> Result<OwnedFd> {
    if let Some(d) = dir
        && let Ok(c) = std::ffi::CString::new(d) {
            // SAFETY: open with a NUL-terminated directory path.
            let fd = unsafe { libc::open(c.as_ptr(), libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC | libc::O_NOFOLLOW, 0o600) };
            if fd >= 0 {
                // SAFETY: fresh fd.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    let n = std::ffi::CString::new(name.rsplit('/').next().unwrap_or("vos"))?;
    Ok(nix::sys::memfd::memfd_create(n.as_c_str(), nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING)?)
}

/// flock() and open file description locks are the open file's: take them again on it.
fn take_locks(fd: &OwnedFd, locks: &[FileLock]) -> Result<()> {
    for l in locks {
        // SAFETY: flock/fcntl on our fd with a plain struct.
        let r = unsafe {
            if l.flock {
                libc::flock(fd.as_raw_fd(), if l.write { libc::LOCK_EX } else { libc::LOCK_SH } | libc::LOCK_NB)
            } else {
                let mut fl: libc::flock = std::mem::zeroed();
                fl.l_type = if l.write { libc::F_WRLCK } else { libc::F_RDLCK } as i16;
                fl.l_whence = libc::SEEK_SET as i16;
                fl.l_start = l.start as i64;
                fl.l_len = l.len as i64;
                libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl)
            }
        };
        if r < 0 {
            bail!("taking a lock again: {} (does another process hold it now?)", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn unsafe_borrow(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: the supervisor's stdio fds stay open for its whole life.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}


fn reopen(path: &str, flags: i32) -> Result<OwnedFd> {
    let flags = (flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC)) | libc::O_CLOEXEC | libc::O_NOCTTY;
    let c = std::ffi::CString::new(path)?;
    // SAFETY: open with a NUL-terminated path.
    let fd = unsafe { libc::open(c.as_ptr(), flags, 0) };
    if fd < 0 {
        bail!("reopening {path}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Status flags fcntl(F_SETFL) can change.
const SETFL_MASK: i32 = libc::O_APPEND | libc::O_ASYNC | libc::O_DIRECT | libc::O_NOATIME | libc::O_NONBLOCK;

fn set_status_flags(fd: &OwnedFd, flags: i32) -> Result<()> {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let cur = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        let want = (cur & !SETFL_MASK) | (flags & SETFL_MASK);
        if cur >= 0 && want != cur && libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, want) < 0 {
            bail!("F_SETFL: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A file the job had open by path, opened again only if it is still of that kind (`pathopen`).
fn open_by_path(path: &str, flags: i32, want: Want) -> Result<OwnedFd> {
    Ok(pathopen::open(path, flags, want).map_err(|e| anyhow!("reopening {e}"))?.0)
}

/// A pipe again, with its bytes in flight. A named FIFO is opened at its path only if that is a FIFO (a regular
/// file there would take the bytes), both ends of the very same one.
fn make_pipe(p: &PipeImage) -> Result<(OwnedFd, OwnedFd)> {
    let (r, w) = match &p.fifo {
        Some(path) => {
            let r = open_by_path(path, libc::O_RDONLY, Want::Fifo)?;
            let w = reopen(&format!("/proc/self/fd/{}", r.as_raw_fd()), libc::O_WRONLY | libc::O_NONBLOCK)?;
            (r, w)
        }
        None => nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?,
    };
    // SAFETY: fcntl on our own pipe.
    if unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, p.capacity as libc::c_int) } < 0 && p.data.len() > 65536 {
        bail!("cannot make a pipe of {} bytes: {}", p.capacity, std::io::Error::last_os_error());
    }
    File::from(w.try_clone()?).write_all(&p.data)?;
    Ok((r, w))
}
