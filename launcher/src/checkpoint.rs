//! A checkpoint of the whole job at one instant, run by its supervisor.
//!
//! 1. Every process of the job is sent the trigger signal; its shim connects and says hello; each is told to
//!    begin, parks its threads and sends its own metadata. Processes forked meanwhile are asked too, until the
//!    set no longer changes. If any process cannot be checkpointed, all are told to go on: nothing is written.
//! 2. With every process quiesced, the supervisor captures what the processes share (open files, pipes,
//!    sockets, the terminal, shared memory), then writes the image head: the header and the job's metadata.
//! 3. Each process in turn writes its page chunks on the same stream; the supervisor writes the end chunk.
//! 4. A file image is synced and renamed into place. Jobs that go on are released as soon as the image is
//!    complete; a job that ends (--kill) only once the image is safe.

use crate::image::file::{self, EXT};
use crate::job::members::{self, Member};
use crate::job::supervisor::{Supervisor, ask_checkpoint};
use crate::output::time::{nanos, timestamp};
use crate::image::sign::Key;
use crate::job::members::Gone;
use crate::os::set_timeout;
use crate::resources::{bundle, events, files, host, identity, inet, sysv, terminal};
use anyhow::{Context, Result, anyhow, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vos::chunk::Kind;
use vos::image::{Contents, ImageHeader, JobImage, ProcessImage, RegionKind, SharedMemory};
use vos::proto::{self, Msg, Pages, Trigger};

/// A checkpoint someone asked for.
pub struct Request {
    pub kill: bool,
    pub dest: Dest,
    pub reason: &'static str,
    /// Carry the bytes of the programs and libraries the job maps (`bundle`).
    pub bundle: bool,
    /// Keep TCP connections to peers outside the job (`--tcp-established`).
    pub tcp_established: bool,
    /// A migration's connection: once the image is written, the job waits for its `Handoff` to end or go on.
    pub handoff: Option<OwnedFd>,
    /// What of the memory goes into the image (a migration's may leave some to the destination).
    pub pages: Pages,
    /// The requester, told how far the image is while it is written (`Msg::Progress`).
    pub progress: Option<OwnedFd>,
    /// Sign the image with this key (`vrun checkpoint --image-key`); otherwise with the job's, if it has one.
    pub sign: Option<Key>,
}

impl Request {
    /// A checkpoint to the job's directory, nothing more (an interval, a trigger signal).
    pub fn to_dir(kill: bool, reason: &'static str) -> Request {
        Request { kill, dest: Dest::Dir, reason, bundle: false, tcp_established: false, handoff: None, pages: Pages::All, progress: None, sign: None }
    }
}

pub enum Dest {
    /// A new file in the job's directory.
    Dir,
    /// A regular file (or a new path), written atomically: a temporary file beside it, renamed over it once the
    /// image is complete and durable.
    Path(PathBuf),
    /// Written in place, as a stream: an fd handed over by the client (`--to -`), or a FIFO, character device
    /// or socket named by `--to` (`name`).
    Stream { fd: OwnedFd, name: Option<PathBuf> },
}

impl Dest {
    /// Where `--to PATH` writes: a regular file or a new path gets the image atomically; a character device,
    /// FIFO or socket gets it in place, as a stream; a symbolic link's target is what gets written (the link
    /// stays); anything else (a directory, a block device) is refused. Checked before the job is disturbed. A link
    /// is followed only if it is ours or root's: another user's link in a shared directory could otherwise aim
    /// the image (renamed over its target) at any file we may write.
    pub fn to_path(path: &Path) -> Result<Dest> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let mut p = path.to_path_buf();
        for _ in 0..40 {
            let m = match std::fs::symlink_metadata(&p) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Dest::Path(p)),
                Err(e) => bail!("--to {}: {e}", p.display()),
                Ok(m) => m,
            };
            let t = m.file_type();
            if t.is_symlink() {
                if m.uid() != nix::unistd::geteuid().as_raw() && m.uid() != 0 {
                    bail!("--to {}: a symbolic link of user {}: name the file itself", crate::output::escape::escape(&p.display().to_string()), m.uid());
                }
                let target = std::fs::read_link(&p).with_context(|| format!("--to {}", p.display()))?;
                p = p.parent().unwrap_or(Path::new("/")).join(target);
                continue;
            }
            if t.is_file() {
                return Ok(Dest::Path(p));
            }
            let fd = if t.is_char_device() || t.is_fifo() {
                open_stream(&p)?
            } else if t.is_socket() {
                connect_stream(&p)?
            } else {
                let what = if t.is_dir() { "a directory" } else if t.is_block_device() { "a block device" } else { "this kind of file" };
                bail!("--to {}: {what} cannot take an image (name a regular file, a new path, a FIFO, a character device or a socket)", p.display());
            };
            return Ok(Dest::Stream { fd, name: Some(p) });
        }
        bail!("--to {}: too many levels of symbolic links", path.display())
    }

    /// Whether something of the image may already have gone out (it cannot be taken back and written again).
    fn is_stream(&self) -> bool {
        matches!(self, Dest::Stream { .. })
    }
}

/// A FIFO or character device opened for writing in place; never blocks (a FIFO nobody reads is refused).
fn open_stream(p: &Path) -> Result<OwnedFd> {
    use nix::fcntl::{OFlag, open};
    let flags = OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let fd = match open(p, flags, nix::sys::stat::Mode::empty()) {
        Err(nix::errno::Errno::ENXIO) => bail!("--to {}: nothing reads this FIFO", p.display()),
        r => r.with_context(|| format!("--to {}", p.display()))?,
    };
    let kind = nix::sys::stat::fstat(&fd)?.st_mode & libc::S_IFMT;
    if kind != libc::S_IFIFO && kind != libc::S_IFCHR {
        bail!("--to {}: the file changed while it was opened", p.display());
    }
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()))?;
    Ok(fd)
}

/// A connection to the unix stream socket at `p`, to write the image to.
fn connect_stream(p: &Path) -> Result<OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    connect(fd.as_raw_fd(), &UnixAddr::new(p)?).with_context(|| format!("--to {}: connecting to the socket", p.display()))?;
    Ok(fd)
}

/// The shim of one process, connected.
pub(crate) struct Shim {
    pub(crate) pid: i32,
    conn: OwnedFd,
    image: Option<ProcessImage>,
    own_fds: Vec<i32>,
}

impl Shim {
    fn failed(&self, e: vos::sys::Errno) -> anyhow::Error {
        match e.0 {
            libc::EPIPE | libc::ECONNRESET => Gone(self.pid).into(),
            _ => anyhow!("talking to pid {}: {e}", self.pid),
        }
    }
    pub(crate) fn send(&self, m: &Msg, fd: Option<i32>) -> Result<()> {
        proto::send(self.conn.as_raw_fd(), m, fd).map_err(|e| self.failed(e))
    }
    pub(crate) fn recv(&self) -> Result<(Msg, Option<i32>)> {
        match proto::recv(self.conn.as_raw_fd()) {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(Gone(self.pid).into()),
            Err(e) => Err(self.failed(e)),
        }
    }
}

/// Tell every shim to go on (the checkpoint is abandoned).
pub(crate) fn cancel(shims: &[Shim], why: &str) {
    for s in shims {
        let _ = s.send(&Msg::Cancel { why: why.into() }, None);
    }
}

impl Supervisor {
    /// Run one checkpoint. `first` is a shim that already said hello (a trigger from outside). Returns the
    /// image's path (None when it went to a client's fd).
    pub(crate) fn checkpoint(&mut self, req: Request, first: Option<(OwnedFd, i32)>) -> Result<Option<String>> {
        // Taken again when a process ended meanwhile, unless something of it already went to a stream.
        let again = first.is_none() && req.handoff.is_none() && !req.dest.is_stream();
        let mut r = self.checkpoint_once(&req, first);
        for _ in 0..3 {
            match &r {
                Err(e) if again && e.chain().any(|c| c.downcast_ref::<Gone>().is_some()) => r = self.checkpoint_once(&req, None),
                _ => break,
            }
        }
        r
    }

    fn checkpoint_once(&mut self, req: &Request, first: Option<(OwnedFd, i32)>) -> Result<Option<String>> {
        let t0 = Instant::now();
        let timing = std::env::var_os("VOS_TIMING").is_some();
        let mark = |what: &str| {
            if timing {
                eprintln!("vrun: checkpoint: {what} at {:.1} ms", t0.elapsed().as_secs_f64() * 1000.0);
            }
        };
        self.await_filled();
        mark("memory in place");
        let mut shims: Vec<Shim> = first.map(|(conn, pid)| Shim { pid, conn, image: None, own_fds: vec![] }).into_iter().collect();
        let members = match self.quiesce(&mut shims, req.kill) {
            Ok(m) => m,
            Err(e) => {
                cancel(&shims, &format!("{e:#}"));
                return Err(e);
            }
        };
        mark("quiesced and captured");
        let r = self.write_and_commit(&mut shims, &members, req, &mark);
        if let Err(e) = &r {
            cancel(&shims, &format!("{e:#}"));
        }
        r
    }

    /// /proc/PID/mem of each parked process, for a post-copy migration to serve pages from until the handoff.
    fn memory_of(&self, shims: &[Shim]) -> Result<Vec<(i32, File)>> {
        let members = members::members(self.job.init)?;
        shims
            .iter()
            .map(|s| {
                let host = members.iter().find(|m| m.ids.pid == s.pid).ok_or_else(|| anyhow!("pid {} went away", s.pid))?.task;
                let f = File::open(format!("/proc/{host}/mem")).with_context(|| format!("opening the memory of pid {}", s.pid))?;
                Ok((s.pid, f))
            })
            .collect()
    }

    /// Memory a migration left to fill (see `fill`) must be in place before it is read or tracked.
    pub(crate) fn await_filled(&mut self) {
        if let Some(f) = self.filling.take() {
            let mut b = [0u8; 64];
            while nix::sys::socket::recv(f.as_raw_fd(), &mut b, nix::sys::socket::MsgFlags::empty()).is_ok_and(|n| n > 0) {}
        }
    }

    /// Ask every process of the job to park, until every process is parked. Returns the job's processes.
    pub(crate) fn quiesce(&mut self, shims: &mut Vec<Shim>, kill: bool) -> Result<Vec<Member>> {
        loop {
            let members = self.members_with_shims()?;
            let todo: Vec<&Member> = members.iter().filter(|m| !m.zombie && !shims.iter().any(|s| s.pid == m.ids.pid)).collect();
            let begun = shims.iter().all(|s| s.image.is_some());
            if todo.is_empty() && begun {
                return Ok(members);
            }
            // Before any process is asked to stop (its threads are signalled and run the shim's handler), none may
            // have a thread that this would end.
            for m in members.iter().filter(|m| !m.zombie && !shims.iter().any(|s| s.pid == m.ids.pid && s.image.is_some())) {
                if let Some(t) = members::strict_seccomp_thread(m.host) {
                    bail!("pid {} thread {t} is in seccomp strict mode: it cannot be checkpointed", m.ids.pid);
                }
                crate::resources::creds::precheck(m, self.job.init)?;
            }
            for m in &todo {
                refuse_stopped(m)?;
            }
            for m in &todo {
                // Already parked processes cannot fork; only those asked now can have made new ones.
                let _ = ask_checkpoint(m.host, self.opts.signals.0);
            }
            self.await_shims(shims, todo.iter().map(|m| m.ids.pid).collect())?;
            // A process may exit on its own before it parks (it was already on its way out): it then no longer
            // counts, and shows up again as a zombie or not at all.
            let mut gone = vec![];
            let now = members::members(self.job.init)?;
            for s in shims.iter().filter(|s| s.image.is_none()) {
                // A process whose own /proc files are root's gets the supervisor's (a daemon that switched users).
                if let Some(m) = now.iter().find(|m| m.ids.pid == s.pid && !m.zombie) {
                    for (name, fd) in crate::resources::creds::proc_files(m)? {
                        let _ = s.send(&Msg::ProcFile { name: name.into() }, Some(fd.as_raw_fd()));
                    }
                }
                if s.send(&Msg::Begin { kill }, None).is_err() {
                    gone.push(s.pid);
                }
            }
            let begun = gone.clone();
            for s in shims.iter_mut().filter(|s| s.image.is_none() && !begun.contains(&s.pid)) {
                match s.recv() {
                    Ok((Msg::Quiesced { error: None, own_fds }, Some(fd))) => {
                        let mut f = File::from(crate::os::owned(fd));
                        let mut meta = vec![];
                        f.read_to_end(&mut meta)?;
                        s.image = Some(rmp_serde::from_slice(&meta).map_err(|e| anyhow!("pid {}: bad metadata: {e}", s.pid))?);
                        s.own_fds = own_fds;
                    }
                    Ok((Msg::Quiesced { error: Some(e), .. }, _)) => bail!("pid {}: {e}", s.pid),
                    Ok((m, _)) => bail!("unexpected message from pid {}: {m:?}", s.pid),
                    Err(_) if !self.alive(s.pid) => gone.push(s.pid),
                    Err(e) => return Err(e),
                }
            }
            shims.retain(|s| !gone.contains(&s.pid));
        }
    }

    /// Whether job process `pid` still lives (not a zombie).
    fn alive(&self, pid: i32) -> bool {
        std::thread::sleep(Duration::from_millis(20));
        members::members(self.job.init).is_ok_and(|m| m.iter().any(|m| m.ids.pid == pid && !m.zombie))
    }

    /// The job's processes, once every live one has the shim mapped. A process that has just exec'd gets it a
    /// moment later (the dynamic loader maps it); one that never does cannot be checkpointed.
    fn members_with_shims(&self) -> Result<Vec<Member>> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let members = members::members(self.job.init)?;
            match members.iter().find(|m| !m.zombie && !m.has_shim) {
                None => return Ok(members),
                Some(m) if Instant::now() > deadline => bail!(
                    "pid {} ({}) runs without the vOS shim (a statically linked or setuid program?): it cannot be checkpointed",
                    m.ids.pid,
                    m.comm
                ),
                Some(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// Accept the shims of `want` (namespace pids) as they say hello; give up on ones that exited meanwhile.
    fn await_shims(&mut self, shims: &mut Vec<Shim>, mut want: Vec<i32>) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !want.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let members = members::members(self.job.init).unwrap_or_default();
                want.retain(|p| members.iter().any(|m| m.ids.pid == *p && !m.zombie));
                if want.is_empty() {
                    return Ok(());
                }
                bail!("pid {want:?} did not answer the checkpoint signal within 10 s");
            }
            // A process stopped meanwhile would answer only once continued: say so now.
            if let Ok(members) = members::members(self.job.init) {
                for m in members.iter().filter(|m| want.contains(&m.ids.pid)) {
                    refuse_stopped(m)?;
                }
            }
            let mut fds = [PollFd::new(self.listener.fd.as_fd(), PollFlags::POLLIN), PollFd::new(self.job.status.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::try_from(left.min(Duration::from_millis(200))).unwrap_or(PollTimeout::MAX)) {
                Ok(0) => {
                    // Someone we wait for may have exited instead.
                    let members = members::members(self.job.init)?;
                    want.retain(|p| members.iter().any(|m| m.ids.pid == *p && !m.zombie));
                    continue;
                }
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => bail!("poll: {e}"),
            }
            if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                bail!("the job ended");
            }
            match self.accept() {
                Some((conn, Msg::Hello { pid, trigger }, _)) => {
                    // A trigger from outside that came while this checkpoint runs: its process joins this one,
                    // and the request is not lost: another checkpoint follows (`Supervisor::run`).
                    if let Trigger::Signal { sig } = trigger {
                        self.pending_trigger = Some(if self.pending_trigger == Some(self.opts.signals.1) { self.opts.signals.1 } else { sig });
                    }
                    set_timeout(conn.as_raw_fd(), Duration::from_secs(3600));
                    want.retain(|p| *p != pid);
                    if !shims.iter().any(|s| s.pid == pid) {
                        shims.push(Shim { pid, conn, image: None, own_fds: vec![] });
                    }
                }
                Some((conn, Msg::Checkpoint { .. }, _)) => {
                    let _ = proto::send(conn.as_raw_fd(), &Msg::CheckpointFailed { why: "another checkpoint is running".into() }, None);
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn write_and_commit(&mut self, shims: &mut [Shim], members: &[Member], req: &Request, mark: &dyn Fn(&str)) -> Result<Option<String>> {
        shims.sort_by_key(|s| s.pid);
        let mut job = JobImage {
            processes: shims.iter_mut().map(|s| s.image.take().unwrap()).collect(),
            zombies: members.iter().filter(|m| m.zombie).map(members::zombie_image).collect(),
            ..Default::default()
        };
        check_tree(&job)?;
        // Who each process is, from outside (the shim's word only for what nothing else shows).
        crate::resources::creds::capture(&mut job, members)?;
        identity::capture(&mut job, members)?;
        let own: HashMap<i32, Vec<i32>> = shims.iter().map(|s| (s.pid, s.own_fds.clone())).collect();
        let files::Captured { mut data, held } = files::capture(&mut job, members, &own, req.tcp_established)?;
        crate::resources::creds::open_as(&mut job, members)?;
        let (needed, (_, hard)) = (crate::restore::planning::fds_needed(&job), nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?);
        if needed > hard {
            bail!("the job has {} open files: restoring it needs room for {needed} fds, above this host's hard open-file limit ({hard})", job.files.len());
        }
        let plan = crate::restore::planning::plan_size(&job);
        if plan > vos::plan::MAX_PLAN as u64 {
            let maps: usize = job.processes.iter().map(|p| p.regions.len()).sum();
            bail!("the job has {maps} memory mappings: their restore plan ({} MiB) exceeds what a restore takes ({} MiB)", plan >> 20, vos::plan::MAX_PLAN >> 20);
        }
        events::date_timers(&mut job, self.job.init.as_raw());
        data.extend(sysv::capture(self.job.init.as_raw(), &mut job)?);
        data.extend(bundle::capture(&mut job, members, req.bundle)?);
        job.terminal = terminal::capture(&job, members)?;
        terminal::controlling_ptys(&mut job, members)?;
        let skips = share_memory(&mut job);
        object_sizes(&mut job, members);
        mark("job captured");
        // Pages pre-copy sent and nobody changed since: the destination has them. Post-copy: the destination
        // fetches the anonymous memory itself.
        let precopied = self.precopied.take().filter(|_| req.pages == Pages::Precopied);
        let reuse: Vec<Vec<(u64, u64)>> = shims
            .iter()
            .zip(&job.processes)
            .map(|(s, p)| {
                let host = members.iter().find(|m| m.ids.pid == s.pid).map(|m| m.task.as_raw());
                match (&precopied, host) {
                    (Some(sent), Some(host)) => sent.unchanged(s.pid, host),
                    _ if req.pages == Pages::Lazy => Ok(lazy_ranges(p)),
                    _ => Ok(vec![]),
                }
            })
            .collect::<Result<_>>()?;
        if precopied.is_some() {
            mark("unchanged pages found");
        }

        let (out, tmp, fin) = self.open_dest(&req.dest)?;
        let r = self.write_image(shims, &job, &skips, &reuse, &data, held, out, req, tmp.as_deref(), fin.as_deref(), mark);
        if r.is_err()
            && let Some(t) = &tmp {
                let _ = std::fs::remove_file(t);
            }
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn write_image(
        &mut self,
        shims: &[Shim],
        job: &JobImage,
        skips: &[Vec<(u64, u64)>],
        reuse: &[Vec<(u64, u64)>],
        data: &[OwnedFd],
        held: inet::Held,
        out: OwnedFd,
        req: &Request,
        tmp: Option<&Path>,
        fin: Option<&Path>,
        mark: &dyn Fn(&str),
    ) -> Result<Option<String>> {
        let mut w = file::Writer::new(out.try_clone()?);
        let header = ImageHeader {
            vrun_version: env!("CARGO_PKG_VERSION").into(),
            created_unix_ns: nanos(),
            host: host::current(),
            job: self.job_info(),
            reason: req.reason.into(),
            processes: job.processes.len() as u32,
        };
        let mut seq = w.start(&header).context("writing the image")?;
        w.chunk(Kind::Job, seq, &rmp_serde::to_vec_named(job)?).context("writing the image")?;
        seq += 1;
        for (i, src) in data.iter().enumerate() {
            seq = w.data(seq, i as u32, src.as_raw_fd(), job.data[i].size).context("writing the image")?;
        }
        // How far the image is, for a requester that watches: the size of its file, of about the job's anonymous
        // memory (zero pages are left out, file pages counted in: an estimate). A stream's progress is unknown
        // (0 of 0), but the requester still hears four times a second that the checkpoint goes on.
        let is_file = nix::sys::stat::fstat(&out).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG);
        let progress = req.progress.as_ref();
        let total: u64 = match progress {
            Some(_) if is_file => members::members(self.job.init)?.iter().map(|m| anonymous_bytes(m.task.as_raw())).sum(),
            _ => 0,
        };
        for ((s, skip), reuse) in shims.iter().zip(skips).zip(reuse) {
            s.send(&Msg::Dump { first_seq: seq, skip: skip.clone(), reuse: reuse.clone(), lazy: req.pages == Pages::Lazy }, Some(out.as_raw_fd()))?;
            if let Some(p) = progress {
                let mut fds = [PollFd::new(s.conn.as_fd(), PollFlags::POLLIN)];
                while poll(&mut fds, PollTimeout::from(250u16)).is_ok_and(|n| n == 0) {
                    let bytes = if is_file { nix::sys::stat::fstat(&out).map_or(0, |st| st.st_size as u64) } else { 0 };
                    let _ = proto::send(p.as_raw_fd(), &Msg::Progress { bytes, total }, None);
                }
            }
            seq = match s.recv()?.0 {
                Msg::Dumped { error: None, next_seq, .. } => next_seq,
                Msg::Dumped { error: Some(e), .. } => bail!("pid {}: {e}", s.pid),
                m => bail!("unexpected message from pid {}: {m:?}", s.pid),
            };
        }
        drop(out);
        mark("written");
        w.end(seq).context("writing the image")?;
        let kill = match &req.handoff {
            Some(conn) => {
                let memory = if req.pages == Pages::Lazy { self.memory_of(shims)? } else { vec![] };
                handoff(conn, memory)?
            }
            None => req.kill,
        };
        // A job that goes on may do so now: its image is complete, and a failure to make it durable below
        // loses nothing (the image is not put in place). A job that ends waits until its image is safe.
        // Connections read in repair mode go back to normal before a job that goes on runs again; a job that
        // ends keeps them in repair mode, so closing them sends its peers nothing.
        let mut held = Some(held);
        if !kill {
            held = None;
            for s in shims {
                s.send(&Msg::Finish { exit: false }, None)?;
            }
        }
        // A file is signed once whole, read back from the page cache; a stream is not (it is never read back).
        self.last_signed = None;
        let path = match (tmp, fin) {
            (Some(t), Some(f)) => {
                if let Some(key) = req.sign.as_ref().or(self.opts.sign.as_ref()) {
                    w.sign(seq, key)?;
                    mark("signed");
                    self.last_signed = Some(key.id_hex());
                }
                commit(&w.file, t, f)?;
                Some(f.display().to_string())
            }
            _ => match &req.dest {
                Dest::Stream { name: Some(n), .. } => Some(n.display().to_string()),
                _ => None,
            },
        };
        drop(w);
        mark("synced and renamed");
        if let Some(h) = held.as_mut() {
            h.keep();
        }
        if kill {
            // The image is safe: a process already gone (the namespace's init ending takes the rest with it)
            // changes nothing, and must not turn a done checkpoint into a failed one.
            for s in shims {
                let _ = s.send(&Msg::Finish { exit: true }, None);
            }
            self.checkpointed_and_stopped = Some(path.clone().unwrap_or_else(|| "the requester's output".into()));
        } else {
            for s in shims {
                match s.recv()?.0 {
                    Msg::Resumed => {}
                    m => bail!("unexpected message from pid {}: {m:?}", s.pid),
                }
            }
        }
        mark("done");
        Ok(path)
    }

    /// The fd to write to, and for files the temporary and final paths.
    fn open_dest(&mut self, d: &Dest) -> Result<(OwnedFd, Option<PathBuf>, Option<PathBuf>)> {
        let fin = match d {
            Dest::Stream { fd, .. } => return Ok((fd.try_clone()?, None, None)),
            Dest::Path(p) => p.clone(),
            Dest::Dir => {
                // A directory vrun makes for images is private (0700): images hold the job's memory.
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&self.opts.dir)
                    .with_context(|| format!("creating {}", self.opts.dir.display()))?;
                let stamp = timestamp();
                let mut n = 0;
                loop {
                    let suffix = if n == 0 { String::new() } else { format!("-{n}") };
                    let p = self.opts.dir.join(format!("{}-{stamp}{suffix}.{EXT}", self.opts.name));
                    if !p.exists() {
                        break p;
                    }
                    n += 1;
                }
            }
        };
        let dir = fin.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        file::sweep_temporaries(dir);
        // An unpredictable name: another user cannot make it first (in a shared directory) to stop our checkpoints.
        let stem = fin.file_stem().and_then(|n| n.to_str()).unwrap_or("image");
        let mut tries = 0;
        loop {
            let tmp = dir.join(format!(".{stem}.{EXT}.tmp-{}-{:016x}", std::process::id(), random_u64()));
            match file::create_temporary(&tmp) {
                Ok(f) => return Ok((OwnedFd::from(f), Some(tmp), Some(fin))),
                Err(e) if tries < 8 && e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::AlreadyExists) => tries += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Keep the newest `keep` images of this job in its directory. Only our own regular files count: in a shared
    /// directory another user's files named like ours must neither push ours out nor be removed (by root).
    pub(crate) fn prune(&self) {
        use std::os::unix::fs::MetadataExt;
        file::sweep_temporaries(&self.opts.dir);
        let prefix = format!("{}-", self.opts.name);
        let me = nix::unistd::geteuid().as_raw();
        let Ok(rd) = std::fs::read_dir(&self.opts.dir) else { return };
        let mut imgs: Vec<(std::time::SystemTime, PathBuf)> = rd
            .flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with(&prefix) && n.ends_with(&format!(".{EXT}"))
            })
            // DirEntry::metadata does not follow links.
            .filter_map(|e| Some((e.metadata().ok()?, e.path())))
            .filter(|(m, _)| m.file_type().is_file() && m.uid() == me)
            .filter_map(|(m, p)| Some((m.modified().ok()?, p)))
            .collect();
        imgs.sort();
        let n = imgs.len().saturating_sub(self.opts.keep);
        for (_, p) in imgs.into_iter().take(n) {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Tell a migration the image is written and wait for its word: whether the job ends (it runs elsewhere now).
/// Anything but a clear "end" (the client gone, a broken connection) means the job goes on.
fn handoff(conn: &OwnedFd, memory: Vec<(i32, File)>) -> Result<bool> {
    if proto::send(conn.as_raw_fd(), &Msg::Written, None).is_err() {
        bail!("the migration went away");
    }
    let n = memory.len();
    for (i, (pid, mem)) in memory.into_iter().enumerate() {
        if proto::send(conn.as_raw_fd(), &Msg::MemoryOf { pid, more: i + 1 < n }, Some(mem.as_raw_fd())).is_err() {
            bail!("the migration went away");
        }
    }
    set_timeout(conn.as_raw_fd(), Duration::from_secs(600));
    match proto::recv(conn.as_raw_fd()) {
        Ok(Some((Msg::Handoff { exit }, _))) => Ok(exit),
        _ => bail!("the migration went away before the handoff"),
    }
}

/// Process `host`'s anonymous memory (heap, stacks, pages copied on write), from /proc/PID/smaps_rollup.
fn anonymous_bytes(host: i32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{host}/smaps_rollup")).unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix("Anonymous:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()).unwrap_or(0) * 1024
}

/// The memory a post-copy destination fetches after the job resumes: readable private anonymous regions
/// (what a restorer can leave missing under a userfaultfd); file-backed pages travel in the image.
fn lazy_ranges(p: &ProcessImage) -> Vec<(u64, u64)> {
    p.regions
        .iter()
        .filter(|r| matches!(r.kind, RegionKind::Anon | RegionKind::Heap | RegionKind::Stack | RegionKind::Detached))
        .filter(|r| r.contents == Contents::Pages && r.prot & libc::PROT_READ as u32 != 0)
        .map(|r| (r.start, r.end))
        .collect()
}

/// A stopped process (Ctrl-Z, SIGSTOP) or one held by a tracer cannot park its threads until it runs again: the
/// checkpoint is refused at once, by name, rather than waiting (and writing the image whenever it is continued).
fn refuse_stopped(m: &Member) -> Result<()> {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", m.host)).map(|d| d.flatten().collect::<Vec<_>>()).unwrap_or_default();
    for t in tasks {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        match stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()) {
            Some("T") => bail!(
                "pid {} ({}) is stopped (Ctrl-Z or SIGSTOP): continue it (`kill -CONT`, or `fg`/`bg` in its shell) and checkpoint again",
                m.ids.pid,
                m.comm
            ),
            Some("t") => bail!("pid {} ({}) is held by a tracer (a debugger or strace): detach it and checkpoint again", m.ids.pid, m.comm),
            _ => {}
        }
    }
    Ok(())
}

/// Sessions and process groups a restore can rebuild (`vos::validate::check_tree`: a restore refuses the rest).
fn check_tree(job: &JobImage) -> Result<()> {
    let ids: Vec<vos::image::Ids> = job
        .processes
        .iter()
        .map(|p| vos::image::Ids { pid: p.pid, ppid: p.ppid, pgid: p.pgid, sid: p.sid })
        .chain(job.zombies.iter().map(|z| z.ids))
        .collect();
    vos::validate::check_tree(&ids, job.processes.len()).map_err(|e| anyhow!("{e}: not supported"))
}

/// Memory several processes share: one process (the first that maps it) stores its pages; the others skip
/// them when their range lies within the writer's. Returns, per process, the ranges it skips.
fn share_memory(job: &mut JobImage) -> Vec<Vec<(u64, u64)>> {
    let mut objects: HashMap<(u64, u64), (u32, u64, u64)> = HashMap::new(); // -> (index, offset start, offset end) of the writer
    let mut skips = vec![vec![]; job.processes.len()];
    // Memory the job also has open as a file travels as that file's contents: no process stores its pages.
    let files: HashMap<(u64, u64), u32> = job
        .files
        .iter()
        .enumerate()
        .filter_map(|(i, f)| match f.kind {
            vos::image::FileKind::Memory { dev, ino, .. } => Some(((dev, ino), i as u32)),
            _ => None,
        })
        .collect();
    for (pi, p) in job.processes.iter_mut().enumerate() {
        for r in p.regions.iter_mut().filter(|r| r.kind == RegionKind::SharedAnon) {
            let (lo, hi) = (r.offset, r.offset + (r.end - r.start));
            if let Some(&file) = files.get(&(r.dev, r.ino)) {
                let i = match objects.get(&(r.dev, r.ino)) {
                    Some(&(i, _, _)) => i,
                    None => {
                        job.shared_memory.push(SharedMemory { name: r.name.clone(), size: hi, writer: u32::MAX, file: Some(file) });
                        let i = (job.shared_memory.len() - 1) as u32;
                        objects.insert((r.dev, r.ino), (i, 0, u64::MAX));
                        i
                    }
                };
                r.shared_memory = Some(i);
                r.contents = Contents::Elsewhere;
                skips[pi].push((r.start, r.end));
                continue;
            }
            match objects.get(&(r.dev, r.ino)) {
                Some(&(i, wlo, whi)) => {
                    let shm = &mut job.shared_memory[i as usize];
                    shm.size = shm.size.max(hi);
                    r.shared_memory = Some(i);
                    if shm.writer != pi as u32 && lo >= wlo && hi <= whi {
                        r.contents = Contents::Elsewhere;
                        skips[pi].push((r.start, r.end));
                    }
                }
                None => {
                    job.shared_memory.push(SharedMemory { name: r.name.clone(), size: hi, writer: pi as u32, file: None });
                    let i = (job.shared_memory.len() - 1) as u32;
                    objects.insert((r.dev, r.ino), (i, lo, hi));
                    r.shared_memory = Some(i);
                }
            }
        }
    }
    skips
}

/// Shared memory that no fd of the job holds is made again as large as its object was, not only as far as its
/// mappings reach: pages of a mapping wholly past the object's end fault with SIGBUS, and must again. The size is
/// the mapped file's (/proc/PID/map_files); where it cannot be read, the mappings' reach stays.
fn object_sizes(job: &mut JobImage, members: &[Member]) {
    for i in 0..job.shared_memory.len() {
        if job.shared_memory[i].file.is_some() {
            continue;
        }
        let mapped = job.processes.iter().find_map(|p| Some((p.pid, p.regions.iter().find(|r| r.shared_memory == Some(i as u32))?)));
        let Some((pid, r)) = mapped else { continue };
        let Some(task) = members::task_of(members, pid) else { continue };
        if let Ok(md) = std::fs::metadata(format!("/proc/{task}/map_files/{:x}-{:x}", r.start, r.end)) {
            job.shared_memory[i].size = md.len();
        }
    }
}

/// 64 random bits from the kernel (or the clock, if it has none to give).
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom fills the buffer it is given.
    let n = unsafe { libc::getrandom(b.as_mut_ptr() as *mut libc::c_void, b.len(), libc::GRND_NONBLOCK) };
    if n == 8 { u64::from_le_bytes(b) } else { crate::output::time::nanos() }
}

/// Make a written image durable, then give it its name: a reader never sees a partial image under it.
fn commit(f: &File, tmp: &Path, fin: &Path) -> Result<()> {
    f.sync_all().context("syncing the image")?;
    std::fs::rename(tmp, fin).with_context(|| format!("renaming the image to {}", fin.display()))?;
    if let Some(dir) = fin.parent().filter(|p| !p.as_os_str().is_empty())
        && let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    Ok(())
}
