//! The supervisor: the `vrun` process that stays in the foreground while a job runs (started or restored).
//!
//! It forwards signals sent to it, answers `vrun checkpoint`, runs periodic checkpoints, reacts to the trigger
//! signals the shim reports, and exits as the job's main process did. One thread, one poll loop.
//!
//! Here: its state and what every flow asks of it. Its loop is in `supervise`, checkpoints in `checkpoint`.

use crate::job::ns::Started;
use crate::job::registry;
use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;
use vos::image::JobInfo;
use vos::proto::{self, Msg, Trigger};

/// What a migration's pre-copy rounds sent of the job's memory (`migration::precopy` makes it): the final
/// checkpoint asks which of those pages nobody changed since, and leaves them out of the image.
pub trait Precopied {
    /// The page ranges of job process `pid` (host pid `host`, stopped now) the destination already holds as they are.
    fn unchanged(&self, pid: i32, host: i32) -> Result<Vec<(u64, u64)>>;
}

/// Exit status of `vrun` when the job was checkpointed and stopped (EX_TEMPFAIL: restore it to go on).
pub const EXIT_CHECKPOINTED: i32 = 75;

pub struct Options {
    pub name: String,
    pub dir: PathBuf,
    pub interval: Option<Duration>,
    pub keep: usize,
    pub signals: (i32, i32),
    pub quiet: bool,
    /// Images written to files are signed with it (`--image-key`, or the host's key).
    pub sign: Option<crate::image::sign::Key>,
}

/// Periodic images kept unless told otherwise, and the most that may be asked for.
pub const DEFAULT_KEEP: usize = 3;
pub const KEEP_MAX: usize = 10_000;
/// The range of `--interval`.
pub const INTERVAL_MIN: Duration = Duration::from_millis(100);
pub const INTERVAL_MAX: Duration = Duration::from_secs(365 * 24 * 3600);

/// The default trigger signals: checkpoint, checkpoint and exit.
fn default_signals() -> (i32, i32) {
    (libc::SIGRTMAX() - 1, libc::SIGRTMAX() - 2)
}

/// Trigger signals must be real-time ones (ordinary signals belong to the app) and two different ones.
fn check_signals((ck, ex): (i32, i32)) -> Result<(), String> {
    let rt = libc::SIGRTMIN()..=libc::SIGRTMAX();
    if !rt.contains(&ck) || !rt.contains(&ex) {
        return Err(format!("signals {ck} and {ex}: both must be real-time signals ({}..{})", rt.start(), rt.end()));
    }
    if ck == ex {
        return Err(format!("signal {ck} cannot both ask for a checkpoint and for a checkpoint and exit"));
    }
    Ok(())
}

/// Settings as given on the command line (None: not given).
pub struct Given {
    pub dir: Option<PathBuf>,
    pub interval: Option<Duration>,
    pub keep: Option<usize>,
    pub signals: (Option<i32>, Option<i32>),
    pub quiet: bool,
}

impl Given {
    /// The supervisor's settings: what was given, else what the job had (`kept`, from its image, for a restore),
    /// else the defaults. The trigger signals cannot change at a restore: the restored shims answer to those
    /// they had. Checked, with nothing done yet; the name is the caller's to set once taken.
    pub fn settle(&self, kept: Option<&JobInfo>) -> Result<Options> {
        let kept_signals = kept.and_then(|k| k.signals);
        let signals = match kept_signals {
            Some(s) => {
                check_signals(s).map_err(|e| anyhow!("the image's trigger {e}"))?;
                for (given, had, opt) in [(self.signals.0, s.0, "--checkpoint-signal"), (self.signals.1, s.1, "--exit-signal")] {
                    if given.is_some_and(|g| g != had) {
                        bail!("{opt}: the job answers to signal {had} (its shim's setting travels in the image and cannot change at a restore)");
                    }
                }
                s
            }
            None => {
                let d = default_signals();
                let s = (self.signals.0.unwrap_or(d.0), self.signals.1.unwrap_or(d.1));
                check_signals(s).map_err(|e| anyhow!("--checkpoint-signal and --exit-signal: {e}"))?;
                s
            }
        };
        let interval = match (self.interval, kept.and_then(|k| k.interval_ms)) {
            (Some(i), _) => Some(i),
            (None, Some(ms)) => {
                let i = Duration::from_millis(ms);
                if !(INTERVAL_MIN..=INTERVAL_MAX).contains(&i) {
                    bail!("the image's checkpoint interval ({ms} ms) is out of range; give --interval");
                }
                Some(i)
            }
            (None, None) => None,
        };
        let keep = match (self.keep, kept.and_then(|k| k.keep)) {
            (Some(k), _) => k,
            (None, Some(k)) if (1..=KEEP_MAX).contains(&(k as usize)) => k as usize,
            (None, Some(k)) => bail!("the image's --keep ({k}) is out of range; give --keep"),
            (None, None) => DEFAULT_KEEP,
        };
        let kept_dir = kept.and_then(|k| k.dir.as_deref()).map(PathBuf::from);
        let dir = match (&self.dir, kept_dir) {
            (Some(d), _) => std::path::absolute(d)?,
            (None, Some(d)) if d.is_absolute() && d.is_dir() => d,
            (None, kept) => {
                let cwd = std::env::current_dir().context("the current directory")?;
                if let Some(d) = kept.filter(|_| !self.quiet) {
                    eprintln!("vrun: the job's image directory {} is not here; images go to {}", crate::output::escape::escape(&d.display().to_string()), cwd.display());
                }
                cwd
            }
        };
        Ok(Options { name: String::new(), dir, interval, keep, signals, quiet: self.quiet, sign: None })
    }
}

/// The listening socket, made before the job starts so its name can be given to the job.
pub struct Listener {
    pub fd: OwnedFd,
    pub name: String,
}

pub fn listen(job: &str) -> Result<Listener> {
    let name = format!("vos/{}/{job}/{}/{:x}", nix::unistd::getuid(), std::process::id(), crate::output::time::nanos() & 0xffff_ffff);
    let fd = socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)?;
    let addr = UnixAddr::new_abstract(name.as_bytes())?;
    socket::bind(fd.as_raw_fd(), &addr).context("binding the control socket")?;
    socket::listen(&fd, socket::Backlog::new(16)?)?;
    Ok(Listener { fd, name })
}

pub struct Supervisor {
    pub(crate) opts: Options,
    /// The job's name in the registry, held as long as we live.
    reserved: registry::Reservation,
    pub(crate) listener: Listener,
    pub(crate) job: Started,
    pub(crate) argv: Vec<String>,
    pub(crate) started_unix_ns: u64,
    pub(crate) sigfd: SignalFd,
    pub(crate) checkpointed_and_stopped: Option<String>,
    /// What the last pre-copy sent, for the migration's final checkpoint.
    pub(crate) precopied: Option<Box<dyn Precopied>>,
    /// A migrated job's filler, still putting pre-copied pages in place (see `fill`).
    pub(crate) filling: Option<OwnedFd>,
    /// A trigger signal from outside heard while another checkpoint ran: it gets a checkpoint of its own next.
    pub(crate) pending_trigger: Option<i32>,
    /// The id of the key that signed the last image written (None: not signed).
    pub(crate) last_signed: Option<String>,
}

/// Signals the supervisor forwards to the job (and the one it waits for): the usual ones a user or a scheduler
/// sends, and the job's two trigger signals (`signals`), so `kill -s RTMAX-1 <vrun pid>` checkpoints the job
/// instead of killing its supervisor (a real-time signal's default action ends a process).
fn handled(signals: (i32, i32)) -> SigSet {
    let mut s = SigSet::empty();
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGQUIT, Signal::SIGUSR1, Signal::SIGUSR2, Signal::SIGCHLD, Signal::SIGALRM, Signal::SIGWINCH, Signal::SIGCONT] {
        s.add(sig);
    }
    let mut raw: libc::sigset_t = *s.as_ref();
    for sig in [signals.0, signals.1] {
        // SAFETY: sigaddset on a valid set; an out-of-range number only makes it fail (clap checked them).
        unsafe { libc::sigaddset(&mut raw, sig) };
    }
    // SAFETY: `raw` was made from a valid SigSet by sigaddset.
    unsafe { SigSet::from_sigset_t_unchecked(raw) }
}

/// Block the handled signals before the job starts, so none is lost; the job unblocks them for itself.
pub fn block_signals(signals: (i32, i32)) -> Result<()> {
    handled(signals).thread_block()?;
    Ok(())
}

impl Supervisor {
    /// The job runs: from now on `vrun list` and `vrun checkpoint` find it under its reserved name.
    pub fn new(opts: Options, reserved: registry::Reservation, listener: Listener, job: Started, argv: Vec<String>, started_unix_ns: u64) -> Result<Supervisor> {
        let sigfd = SignalFd::with_flags(&handled(opts.signals), SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
        let s = Supervisor { opts, reserved, listener, job, argv, started_unix_ns, sigfd, checkpointed_and_stopped: None, precopied: None, filling: None, pending_trigger: None, last_signed: None };
        s.reserved.publish(&registry::Entry {
            name: s.opts.name.clone(),
            supervisor: std::process::id() as i32,
            pid: s.job.app.as_raw(),
            init: s.job.init.as_raw(),
            program: s.argv.clone(),
            since_unix: s.started_unix_ns / 1_000_000_000,
            sock: s.listener.name.clone(),
            dir: s.opts.dir.display().to_string(),
        })?;
        Ok(s)
    }

    /// What an image records of the job and of how it is supervised (a restore goes on the same way).
    pub(crate) fn job_info(&self) -> JobInfo {
        JobInfo {
            name: self.opts.name.clone(),
            argv: self.argv.clone(),
            started_unix_ns: self.started_unix_ns,
            dir: Some(self.opts.dir.display().to_string()),
            interval_ms: self.opts.interval.map(|i| i.as_millis() as u64),
            keep: Some(self.opts.keep as u32),
            signals: Some(self.opts.signals),
        }
    }

    /// Tell the user (unless quiet), naming the job.
    pub(crate) fn say(&self, msg: &str) {
        if !self.opts.quiet {
            eprintln!("vrun: {}: {msg}", self.opts.name);
        }
    }

    pub(crate) fn die(&self, msg: &str) -> ! {
        eprintln!("vrun: {}: {msg}", self.opts.name);
        self.reserved.release();
        std::process::exit(1)
    }

    /// The job's main process ended: leave the way it did.
    pub(crate) fn finish(&mut self) -> ! {
        let mut b = [0u8; 4];
        let got = self.job.status.read_exact(&mut b).is_ok();
        let _ = nix::sys::wait::waitpid(self.job.init, None);
        self.reserved.release();
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
        let _ = handled(self.opts.signals).thread_unblock();
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


    /// Accept a connection from our own user (or root), or from a process of the job, and read its first message.
    /// A process of the job that runs as another user (a daemon's child that switched to its own) may only say
    /// hello to a checkpoint: answering one its supervisor asked for, or passing on a trigger signal when every
    /// process of the job is that user's (it may not end other users' processes).
    pub(crate) fn accept(&self) -> Option<(OwnedFd, Msg, Option<i32>)> {
        let fd = socket::accept4(self.listener.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC).ok()?;
        let conn = crate::os::owned(fd);
        let peer = socket::getsockopt(&conn, socket::sockopt::PeerCredentials).ok()?;
        let own = peer.uid() == 0 || peer.uid() == nix::unistd::getuid().as_raw();
        if !own && !self.of_job(peer.pid()) {
            return None;
        }
        crate::os::set_timeout(conn.as_raw_fd(), Duration::from_secs(10));
        let (m, fd) = match proto::recv(conn.as_raw_fd()) {
            Ok(Some(got)) => got,
            _ => return None,
        };
        let allowed = own
            || match &m {
                Msg::Hello { trigger: Trigger::Supervisor, .. } => true,
                Msg::Hello { trigger: Trigger::Signal { .. }, .. } => self.all_run_as(peer.uid()),
                _ => false,
            };
        if !allowed {
            if let Some(f) = fd {
                drop(crate::os::owned(f));
            }
            return None;
        }
        Some((conn, m, fd))
    }

    /// Whether host process `pid` is one of the job's (in its pid namespace).
    fn of_job(&self, pid: i32) -> bool {
        let ns = |p: i32| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok();
        pid > 0 && ns(pid).is_some() && ns(pid) == ns(self.job.init.as_raw())
    }

    /// Whether every live process of the job runs as `uid` (real, effective, saved and filesystem uid).
    fn all_run_as(&self, uid: u32) -> bool {
        crate::job::members::members(self.job.init).is_ok_and(|ms| {
            ms.iter().filter(|m| !m.zombie).all(|m| {
                let s = std::fs::read_to_string(format!("/proc/{}/status", m.host)).unwrap_or_default();
                s.lines().find_map(|l| l.strip_prefix("Uid:")).is_some_and(|v| v.split_whitespace().all(|u| u.parse() == Ok(uid)))
            })
        })
    }


}

/// kill(2) with any signal number (nix's Signal has no real-time signals).
pub fn send_signal(pid: nix::unistd::Pid, sig: i32) -> std::io::Result<()> {
    // SAFETY: kill has no memory effects.
    if unsafe { libc::kill(pid.as_raw(), sig) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Send process `pid` of the job the trigger signal `sig` for a checkpoint the supervisor runs: queued with the
/// supervisor's mark, so its shim says so (a shim that hears it only later, when no checkpoint runs, is told to
/// go on: `on_connection`).
pub fn ask_checkpoint(pid: nix::unistd::Pid, sig: i32) -> std::io::Result<()> {
    // SAFETY: siginfo is plain data; rt_sigqueueinfo only reads it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let raw = &mut info as *mut libc::siginfo_t as *mut u8;
    // SAFETY: writing si_signo, si_code, si_pid, si_uid and si_value at their x86-64 offsets inside the struct.
    unsafe {
        std::ptr::write_unaligned(raw as *mut i32, sig);
        std::ptr::write_unaligned(raw.add(8) as *mut i32, libc::SI_QUEUE);
        std::ptr::write_unaligned(raw.add(16) as *mut i32, libc::getpid());
        std::ptr::write_unaligned(raw.add(20) as *mut u32, libc::getuid());
        std::ptr::write_unaligned(raw.add(24) as *mut u64, vos::signals::SUPERVISOR_MAGIC);
    }
    // SAFETY: a valid siginfo for the call.
    if unsafe { libc::syscall(libc::SYS_rt_sigqueueinfo, pid.as_raw(), sig, &info as *const libc::siginfo_t) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
