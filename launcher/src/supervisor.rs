//! The supervisor: the `vrun` process that stays in the foreground while a job runs (started or restored).
//!
//! It forwards signals sent to it, answers `vrun checkpoint`, runs periodic checkpoints, reacts to the trigger
//! signals the shim reports, and exits as the job's main process did. One thread, one poll loop.
//!
//! A checkpoint, from here: the shim of the job's process connects (it was sent the trigger signal) and says
//! hello; the supervisor opens the destination, writes the file head and the header chunk, hands the fd over;
//! the shim parks its threads and says so; the supervisor says dump; the shim writes its chunks and says how
//! many; the supervisor writes the end chunk, syncs and renames the file into place, and only then tells the
//! shim to resume (or end) the app. Any failure before that resumes the app and leaves earlier images intact.

use crate::imagefile::{self, EXT};
use crate::ns::Started;
use crate::{host, runtime};
use anyhow::{Context, Result, anyhow, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vos::image::{ImageHeader, JobInfo};
use vos::proto::{self, Msg, Trigger};

/// Exit status of `vrun` when the job was checkpointed and stopped (EX_TEMPFAIL: restore it to go on).
pub const EXIT_CHECKPOINTED: i32 = 75;

pub struct Options {
    pub name: String,
    pub dir: PathBuf,
    pub interval: Option<Duration>,
    pub keep: usize,
    pub signals: (i32, i32),
    pub quiet: bool,
}

/// The listening socket, made before the job starts so its name can be given to the job.
pub struct Listener {
    pub fd: OwnedFd,
    pub name: String,
}

pub fn listen(job: &str) -> Result<Listener> {
    let name = format!("vos/{}/{job}/{}/{:x}", nix::unistd::getuid(), std::process::id(), nanos() & 0xffff_ffff);
    let fd = socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)?;
    let addr = UnixAddr::new_abstract(name.as_bytes())?;
    socket::bind(fd.as_raw_fd(), &addr).context("binding the control socket")?;
    socket::listen(&fd, socket::Backlog::new(16)?)?;
    Ok(Listener { fd, name })
}

fn nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// A checkpoint someone asked for.
struct Request {
    kill: bool,
    dest: Dest,
    reason: &'static str,
}

enum Dest {
    /// A new file in the job's directory.
    Dir,
    Path(PathBuf),
    /// An fd handed over by the client (`--to -`).
    Fd(OwnedFd),
}

pub struct Supervisor {
    opts: Options,
    listener: Listener,
    job: Started,
    argv: Vec<String>,
    started_unix_ns: u64,
    sigfd: SignalFd,
    checkpointed_and_stopped: Option<String>,
}

/// Signals the supervisor forwards to the job (and the one it waits for).
fn handled() -> SigSet {
    let mut s = SigSet::empty();
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGQUIT, Signal::SIGUSR1, Signal::SIGUSR2, Signal::SIGCHLD, Signal::SIGALRM, Signal::SIGWINCH, Signal::SIGCONT] {
        s.add(sig);
    }
    s
}

/// Block the handled signals before the job starts, so none is lost; the job unblocks them for itself.
pub fn block_signals() -> Result<()> {
    handled().thread_block()?;
    Ok(())
}

impl Supervisor {
    pub fn new(opts: Options, listener: Listener, job: Started, argv: Vec<String>, started_unix_ns: u64) -> Result<Supervisor> {
        let sigfd = SignalFd::with_flags(&handled(), SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
        let s = Supervisor { opts, listener, job, argv, started_unix_ns, sigfd, checkpointed_and_stopped: None };
        runtime::register(&runtime::Entry {
            name: s.opts.name.clone(),
            supervisor: std::process::id() as i32,
            pid: s.job.app.as_raw(),
            program: s.argv.clone(),
            since_unix: s.started_unix_ns / 1_000_000_000,
            sock: s.listener.name.clone(),
            dir: s.opts.dir.display().to_string(),
        })?;
        Ok(s)
    }

    /// Serve until the job's main process ends; returns the exit status to leave with.
    pub fn run(mut self) -> ! {
        let mut next_interval = self.opts.interval.map(|d| Instant::now() + d);
        loop {
            let timeout = match next_interval {
                Some(t) => PollTimeout::try_from(t.saturating_duration_since(Instant::now())).unwrap_or(PollTimeout::MAX),
                None => PollTimeout::NONE,
            };
            let mut fds = [
                PollFd::new(self.sigfd.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.listener.fd.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.job.status.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => self.die(&format!("poll: {e}")),
            }
            let ready = |i: usize| fds[i].revents().is_some_and(|r| !r.is_empty());
            let (sig_ready, conn_ready, status_ready) = (ready(0), ready(1), ready(2));
            if status_ready {
                self.finish();
            }
            if sig_ready {
                self.on_signals();
            }
            if conn_ready {
                self.on_connection();
            }
            if let Some(t) = next_interval {
                if Instant::now() >= t {
                    let req = Request { kill: false, dest: Dest::Dir, reason: "interval" };
                    match self.checkpoint(req, None) {
                        Ok(path) => self.prune(path.as_deref()),
                        Err(e) => self.say(&format!("periodic checkpoint failed: {e:#}")),
                    }
                    next_interval = self.opts.interval.map(|d| Instant::now() + d);
                }
            }
        }
    }

    fn say(&self, msg: &str) {
        if !self.opts.quiet {
            eprintln!("vrun: {}: {msg}", self.opts.name);
        }
    }

    fn die(&self, msg: &str) -> ! {
        eprintln!("vrun: {}: {msg}", self.opts.name);
        runtime::unregister(&self.opts.name);
        std::process::exit(1)
    }

    /// The job's main process ended: leave the way it did.
    fn finish(&mut self) -> ! {
        let mut b = [0u8; 4];
        let got = self.job.status.read_exact(&mut b).is_ok();
        let _ = nix::sys::wait::waitpid(self.job.init, None);
        runtime::unregister(&self.opts.name);
        if let Some(path) = &self.checkpointed_and_stopped {
            self.say(&format!("checkpointed to {path} and stopped"));
            std::process::exit(EXIT_CHECKPOINTED);
        }
        if !got {
            eprintln!("vrun: {}: the job's init ended without a status", self.opts.name);
            std::process::exit(1);
        }
        let st = i32::from_le_bytes(b);
        let (sig, code) = (st & 0x7f, (st >> 8) & 0xff);
        if sig == 0 {
            std::process::exit(code);
        }
        // Die of the same signal, so our parent sees what it would have seen without us.
        let _ = handled().thread_unblock();
        // SAFETY: resetting a disposition and signalling ourselves.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut all);
            libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
        }
        std::process::exit(128 + sig)
    }

    fn on_signals(&mut self) {
        while let Ok(Some(si)) = self.sigfd.read_signal() {
            let sig = si.ssi_signo as i32;
            if sig == libc::SIGCHLD {
                continue;
            }
            // Signals the terminal sends to the foreground process group reach the job directly.
            if si.ssi_code == libc::SI_KERNEL {
                continue;
            }
            let _ = send_signal(self.job.app, sig);
        }
    }

    /// Accept a connection from our own user and read its first message.
    fn accept(&self) -> Option<(OwnedFd, Msg, Option<i32>)> {
        let fd = socket::accept4(self.listener.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC).ok()?;
        let conn = crate::ns::owned(fd);
        if !peer_allowed(&conn) {
            return None;
        }
        set_timeout(&conn, Duration::from_secs(10));
        match proto::recv(conn.as_raw_fd()) {
            Ok(Some((m, fd))) => Some((conn, m, fd)),
            _ => None,
        }
    }

    fn on_connection(&mut self) {
        let Some((conn, msg, fd)) = self.accept() else { return };
        match msg {
            Msg::Checkpoint { kill, to, fd_attached } => {
                let dest = match (to, fd_attached, fd) {
                    (_, true, Some(fd)) => Dest::Fd(crate::ns::owned(fd)),
                    (Some(p), _, _) => Dest::Path(PathBuf::from(p)),
                    _ => Dest::Dir,
                };
                let req = Request { kill, dest, reason: "request" };
                let start = Instant::now();
                let answer = match self.checkpoint(req, None) {
                    Ok(path) => Msg::CheckpointDone { path, bytes: 0, millis: start.elapsed().as_millis() as u64 },
                    Err(e) => Msg::CheckpointFailed { why: format!("{e:#}") },
                };
                let _ = proto::send(conn.as_raw_fd(), &answer, None);
            }
            Msg::Hello { pid, trigger } => {
                // A trigger signal from outside (kill -s RTMAX-1): a checkpoint to the job's directory.
                let Trigger::Signal { sig } = trigger else { return };
                let kill = sig == self.opts.signals.1;
                let req = Request { kill, dest: Dest::Dir, reason: "signal" };
                match self.checkpoint(req, Some((conn, pid))) {
                    Ok(Some(p)) => self.say(&format!("checkpoint written to {p}")),
                    Ok(None) => {}
                    Err(e) => self.say(&format!("checkpoint failed: {e:#}")),
                }
            }
            _ => {}
        }
    }

    /// Wait for the shim of the job's process to connect after a trigger signal.
    fn await_shim(&self) -> Result<(OwnedFd, i32)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("the job did not answer the checkpoint signal within 10 s (is the program dynamically linked, and did it keep LD_PRELOAD?)");
            }
            let mut fds = [
                PollFd::new(self.listener.fd.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.job.status.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => bail!("poll: {e}"),
            }
            if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                bail!("the job ended");
            }
            match self.accept() {
                Some((conn, Msg::Hello { pid, .. }, _)) => return Ok((conn, pid)),
                Some((conn, Msg::Checkpoint { .. }, _)) => {
                    let _ = proto::send(conn.as_raw_fd(), &Msg::CheckpointFailed { why: "another checkpoint is running".into() }, None);
                }
                _ => {}
            }
        }
    }

    /// Run one checkpoint. Returns the image's path (None when it went to a client's fd).
    fn checkpoint(&mut self, req: Request, shim: Option<(OwnedFd, i32)>) -> Result<Option<String>> {
        let (conn, _pid) = match shim {
            Some(s) => s,
            None => {
                send_signal(self.job.app, self.opts.signals.0).map_err(|e| anyhow!("cannot signal the job: {e}"))?;
                self.await_shim()?
            }
        };
        let c = conn.as_raw_fd();
        let (out, tmp, fin) = match self.open_dest(&req.dest) {
            Ok(x) => x,
            Err(e) => {
                let _ = proto::send(c, &Msg::Cancel { why: format!("{e:#}") }, None);
                return Err(e);
            }
        };
        let cleanup = |tmp: &Option<PathBuf>| {
            if let Some(t) = tmp {
                let _ = std::fs::remove_file(t);
            }
        };
        let r = self.run_protocol(c, &req, out, tmp.as_deref(), fin.as_deref());
        if r.is_err() {
            cleanup(&tmp);
        }
        r
    }

    fn run_protocol(&mut self, c: i32, req: &Request, out: OwnedFd, tmp: Option<&Path>, fin: Option<&Path>) -> Result<Option<String>> {
        let t0 = Instant::now();
        let timing = std::env::var_os("VOS_TIMING").is_some();
        let mark = |what: &str| {
            if timing {
                eprintln!("vrun: checkpoint: {what} at {:.1} ms", t0.elapsed().as_secs_f64() * 1000.0);
            }
        };
        let cancel = |why: String| -> anyhow::Error {
            let _ = proto::send(c, &Msg::Cancel { why: why.clone() }, None);
            anyhow!(why)
        };
        let mut w = imagefile::Writer::new(out.try_clone()?);
        let header = ImageHeader {
            vrun_version: env!("CARGO_PKG_VERSION").into(),
            created_unix_ns: nanos(),
            host: host::current(),
            job: JobInfo { name: self.opts.name.clone(), argv: self.argv.clone(), started_unix_ns: self.started_unix_ns },
            reason: req.reason.into(),
            processes: 1,
        };
        let first_seq = w.start(&header).map_err(|e| cancel(format!("writing the image: {e}")))?;
        set_timeout_raw(c, Duration::from_secs(3600));
        let begin = Msg::Begin {
            kill: req.kill,
            reason: req.reason.into(),
            job: self.opts.name.clone(),
            argv: self.argv.clone(),
            started_unix_ns: self.started_unix_ns,
            processes: 1,
        };
        proto::send(c, &begin, Some(out.as_raw_fd())).map_err(|e| anyhow!("talking to the job: {e}"))?;
        drop(out);
        match recv(c)? {
            Msg::Quiesced { error: None } => {}
            Msg::Quiesced { error: Some(e) } => bail!("{e}"),
            m => return Err(cancel(format!("unexpected message from the job: {m:?}"))),
        }
        mark("quiesced and captured");
        proto::send(c, &Msg::Dump { first_seq }, None).map_err(|e| anyhow!("talking to the job: {e}"))?;
        let next_seq = match recv(c)? {
            Msg::Dumped { error: None, next_seq, .. } => next_seq,
            Msg::Dumped { error: Some(e), .. } => bail!("{e}"),
            m => return Err(cancel(format!("unexpected message from the job: {m:?}"))),
        };
        mark("written");
        w.end(next_seq).map_err(|e| cancel(format!("writing the image: {e}")))?;
        // A job that goes on may do so now: its image is complete, and a failure to make it durable below
        // loses nothing (the image is not put in place). A job that ends waits until its image is safe.
        if !req.kill {
            proto::send(c, &Msg::Finish { exit: false }, None).map_err(|e| anyhow!("talking to the job: {e}"))?;
        }
        let path = match (tmp, fin) {
            (Some(t), Some(f)) => {
                commit(&w.file, t, f).map_err(|e| cancel(format!("{e:#}")))?;
                Some(f.display().to_string())
            }
            _ => None,
        };
        drop(w);
        mark("synced and renamed");
        if req.kill {
            proto::send(c, &Msg::Finish { exit: true }, None).map_err(|e| anyhow!("talking to the job: {e}"))?;
            self.checkpointed_and_stopped = Some(path.clone().unwrap_or_else(|| "the requester's output".into()));
        } else {
            match recv(c)? {
                Msg::Resumed => {}
                m => bail!("unexpected message from the job: {m:?}"),
            }
        }
        mark("done");
        Ok(path)
    }

    /// The fd to write to, and for files the temporary and final paths.
    fn open_dest(&mut self, d: &Dest) -> Result<(OwnedFd, Option<PathBuf>, Option<PathBuf>)> {
        let fin = match d {
            Dest::Fd(fd) => return Ok((fd.try_clone()?, None, None)),
            Dest::Path(p) => p.clone(),
            Dest::Dir => {
                std::fs::create_dir_all(&self.opts.dir).with_context(|| format!("creating {}", self.opts.dir.display()))?;
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
        let tmp = dir.join(format!(".{}.tmp-{}", fin.file_name().and_then(|n| n.to_str()).unwrap_or("image"), std::process::id()));
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        Ok((OwnedFd::from(f), Some(tmp), Some(fin)))
    }

    /// Keep the newest `keep` periodic images of this job.
    fn prune(&self, _just_written: Option<&str>) {
        let prefix = format!("{}-", self.opts.name);
        let Ok(rd) = std::fs::read_dir(&self.opts.dir) else { return };
        let mut imgs: Vec<(std::time::SystemTime, PathBuf)> = rd
            .flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with(&prefix) && n.ends_with(&format!(".{EXT}"))
            })
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        imgs.sort();
        let n = imgs.len().saturating_sub(self.opts.keep);
        for (_, p) in imgs.into_iter().take(n) {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// kill(2) with any signal number (nix's Signal has no real-time signals).
fn send_signal(pid: nix::unistd::Pid, sig: i32) -> std::io::Result<()> {
    // SAFETY: kill has no memory effects.
    if unsafe { libc::kill(pid.as_raw(), sig) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

fn recv(c: i32) -> Result<Msg> {
    match proto::recv(c) {
        Ok(Some((m, _))) => Ok(m),
        Ok(None) => bail!("the job's process went away during the checkpoint"),
        Err(e) => bail!("talking to the job: {e}"),
    }
}

/// Make a written image durable, then give it its name: a reader never sees a partial image under it.
fn commit(f: &File, tmp: &Path, fin: &Path) -> Result<()> {
    f.sync_all().context("syncing the image")?;
    std::fs::rename(tmp, fin).with_context(|| format!("renaming the image to {}", fin.display()))?;
    if let Some(dir) = fin.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn set_timeout(fd: &OwnedFd, d: Duration) {
    set_timeout_raw(fd.as_raw_fd(), d)
}

fn set_timeout_raw(fd: i32, d: Duration) {
    let tv = libc::timeval { tv_sec: d.as_secs() as i64, tv_usec: 0 };
    // SAFETY: tv is a valid timeval.
    unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv as *const _ as *const libc::c_void, std::mem::size_of::<libc::timeval>() as u32);
    }
}

/// Only our own user (or root) may drive a job.
fn peer_allowed(conn: &OwnedFd) -> bool {
    match socket::getsockopt(conn, socket::sockopt::PeerCredentials) {
        Ok(c) => c.uid() == 0 || c.uid() == nix::unistd::getuid().as_raw(),
        Err(_) => false,
    }
}

/// UTC "YYYYmmdd-HHMMSS.mmm" (image file names).
pub fn timestamp() -> String {
    let n = nanos();
    let (y, m, d, hh, mm, ss) = civil((n / 1_000_000_000) as i64);
    format!("{y:04}{m:02}{d:02}-{hh:02}{mm:02}{ss:02}.{:03}", n / 1_000_000 % 1000)
}

/// UTC "YYYY-mm-dd HH:MM:SS" of a Unix time.
pub fn timestamp_of(secs: u64) -> String {
    let (y, m, d, hh, mm, ss) = civil(secs as i64);
    format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02}:{ss:02}")
}

/// Civil date and time from a Unix time (Howard Hinnant's days-to-civil algorithm).
fn civil(secs: i64) -> (i64, i64, i64, i64, i64, i64) {
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    (y, m, d, rem / 3600, rem / 60 % 60, rem % 60)
}
