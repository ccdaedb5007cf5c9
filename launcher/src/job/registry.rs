//! The job registry (`vrun list`, `vrun checkpoint NAME`): one entry per job, `DIR/jobs/NAME.json`, beside the
//! job's log `DIR/jobs/NAME.log` (DIR: see `dir`).
//!
//! A name is taken by creating its entry (O_EXCL) and locking it (flock); the supervisor holds that lock until
//! it exits, so a job is alive exactly while its entry is locked. No pid is ever asked: a dead supervisor may
//! stay a zombie for a while, and its pid may be reused. An entry whose lock is free is stale, and whoever sees
//! it removes it. Taking a name and removing a stale entry happen under the directory's own lock (`.lock`, a
//! name no job can have), so a name is never given twice, and an entry is never removed while it is being
//! taken. An entry holds its JSON (`Entry`) once the job runs; one still empty is a job starting.
//!
//! Older vrun versions kept unlocked entries as `DIR/NAME.json`: they are neither read nor touched.

use crate::output::escape::escape;
use anyhow::{Context, Result, anyhow, bail};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{FileStat, Mode};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Entry {
    pub name: String,
    /// The `vrun` process supervising the job.
    pub supervisor: i32,
    /// The job's main process, as this host numbers it.
    pub pid: i32,
    /// The job's init (pid 1 of its namespace), as this host numbers it.
    #[serde(default)]
    pub init: i32,
    pub program: Vec<String>,
    pub since_unix: u64,
    /// Abstract socket name of the supervisor.
    pub sock: String,
    /// Where images go by default.
    pub dir: String,
}

/// Longest job name, in bytes.
pub const NAME_MAX: usize = 64;

/// Most jobs sharing one default name (`base`, `base-2`, ... `base-10000`).
const SAME_BASE_MAX: usize = 10_000;

/// A job name becomes a file name (registry, log, images) and comes from the command line, from an image or from
/// a network peer: only [A-Za-z0-9._+-], 1 to 64 bytes, not starting with '.' (hidden files, "..") or '-'
/// (options).
pub fn check_name(name: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._+-".contains(c);
    if name.is_empty() {
        return Err("a job name cannot be empty".into());
    }
    if let Some(c) = name.chars().find(|&c| !allowed(c)) {
        return Err(format!(
            "job name \"{}\": {} is not allowed (letters, digits, '.', '_', '+' and '-' are)",
            escape(name),
            if c == '/' { "'/'".to_string() } else { format!("\"{}\"", escape(&c.to_string())) }
        ));
    }
    if name.len() > NAME_MAX {
        return Err(format!("job name \"{}...\" is {} bytes long (at most {NAME_MAX})", &name[..16], name.len()));
    }
    if name.starts_with(['.', '-']) {
        return Err(format!("job name \"{name}\" must not start with '{}'", &name[..1]));
    }
    Ok(())
}

/// `check_name` for clap.
pub fn name_arg(s: &str) -> Result<String, String> {
    check_name(s).map(|()| s.to_string())
}

/// A valid name made of any text (a program's file name, an image's job name): what is not allowed becomes '_',
/// short enough to take a "-N" suffix.
pub fn sanitize(raw: &str) -> String {
    let mut s: String = raw.chars().map(|c| if c.is_ascii_alphanumeric() || "._+-".contains(c) { c } else { '_' }).collect();
    if s.starts_with(['.', '-']) {
        s.replace_range(..1, "_");
    }
    s.truncate(NAME_MAX - 1 - SAME_BASE_MAX.to_string().len());
    if s.is_empty() { "job".into() } else { s }
}

/// Directory modes the registry accepts: only its owner may write it (for a user's own directory, only its owner
/// may even read it: another user's `vrun list` has no business there).
const NOT_FOR_OTHERS_ROOT: u32 = 0o022;
const NOT_FOR_OTHERS_USER: u32 = 0o077;

/// The runtime directory: /run/vos for root; for a user, $XDG_RUNTIME_DIR/vos when $XDG_RUNTIME_DIR is a
/// directory of the user's that only the user may write, else /tmp/vos-UID. It must be the user's own (made
/// 0700 if missing): in /tmp another user may have made it first, or planted a symlink there, to read or
/// redirect what vrun writes and to plant entries that point `vrun checkpoint` at a socket of theirs.
fn runtime_dir() -> Result<(PathBuf, OwnedFd)> {
    let uid = nix::unistd::getuid();
    if uid.is_root() {
        let p = PathBuf::from("/run/vos");
        let fd = own_dir(at_cwd(), &p, &p, NOT_FOR_OTHERS_ROOT)?;
        return Ok((p, fd));
    }
    let xdg = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).filter(|x| {
        x.is_absolute() && nix::sys::stat::lstat(x).is_ok_and(|st| is_dir(&st) && st.st_uid == uid.as_raw() && st.st_mode & 0o022 == 0)
    });
    let p = match xdg {
        Some(x) => x.join("vos"),
        None => PathBuf::from(format!("/tmp/vos-{uid}")),
    };
    let fd = own_dir(at_cwd(), &p, &p, NOT_FOR_OTHERS_USER)?;
    Ok((p, fd))
}

fn is_dir(st: &FileStat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// Make directory `path` (relative to `at`, or absolute) 0700 unless it exists, and open it; refused unless it is
/// a directory (not a symlink) of ours whose mode has none of the `forbidden` bits.
/// `shown` is its full path, for messages.
fn own_dir(at: BorrowedFd, path: &Path, shown: &Path, forbidden: u32) -> Result<OwnedFd> {
    let refuse = |why: String| {
        anyhow!("{} is not safe to use: {why}; vrun needs a directory of yours that no one else may write (remove it, or set XDG_RUNTIME_DIR)", shown.display())
    };
    match nix::sys::stat::mkdirat(at, path, Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(anyhow!("creating {}: {e}", shown.display())),
    }
    let fd = match nix::fcntl::openat(at, path, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ELOOP | Errno::ENOTDIR) => {
            let link = nix::sys::stat::fstatat(at, path, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK);
            return Err(refuse(if link { "it is a symbolic link" } else { "it is not a directory" }.into()));
        }
        Err(e) => return Err(anyhow!("opening {}: {e}", shown.display())),
    };
    let st = nix::sys::stat::fstat(&fd).with_context(|| format!("{}", shown.display()))?;
    let me = nix::unistd::getuid().as_raw();
    if st.st_uid != me {
        return Err(refuse(format!("it belongs to uid {}", st.st_uid)));
    }
    if st.st_mode & forbidden != 0 {
        return Err(refuse(format!("its mode is {:04o}", st.st_mode & 0o7777)));
    }
    Ok(fd)
}

/// AT_FDCWD, for *at calls given an absolute path.
fn at_cwd() -> BorrowedFd<'static> {
    // SAFETY: AT_FDCWD is a valid dirfd for every *at call for the life of the process (never closed).
    unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) }
}

/// flock(2) on `fd`.
fn flock(fd: BorrowedFd, op: libc::c_int) -> nix::Result<()> {
    // SAFETY: flock only changes the lock state of a valid fd; no memory is touched.
    Errno::result(unsafe { libc::flock(fd.as_raw_fd(), op) }).map(drop)
}

/// The registry directory, open.
struct Registry {
    path: PathBuf,
    dir: OwnedFd,
}

/// What an entry says about its name.
enum Probe {
    /// No entry (or a stale one, now removed).
    Free,
    /// Taken by a job that is starting: its entry has no JSON yet.
    Starting,
    Live(Entry),
}

/// Regular files of ours only: the directory is ours, so anything else there was not made by vrun.
fn check_file(f: &File, what: &str) -> Result<FileStat> {
    let st = nix::sys::stat::fstat(f)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_uid != nix::unistd::getuid().as_raw() {
        bail!("{what} is not a regular file of yours: leaving it alone");
    }
    Ok(st)
}

impl Registry {
    fn open() -> Result<Registry> {
        let (base, fd) = runtime_dir()?;
        let path = base.join("jobs");
        let dir = own_dir(fd.as_fd(), Path::new("jobs"), &path, NOT_FOR_OTHERS_USER)?;
        Ok(Registry { path, dir })
    }

    /// Create `name` in the registry directory, never through a symlink and never over an existing file.
    fn create(&self, name: &str) -> nix::Result<File> {
        let flags = OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        nix::fcntl::openat(&self.dir, name, flags, Mode::from_bits_truncate(0o600)).map(File::from)
    }

    /// The directory's lock, held while names are taken and stale entries removed. Waits up to 10 s (another
    /// vrun holds it for a moment only; one stopped while it holds it must not hang every other).
    fn lock(&self) -> Result<File> {
        let f = match self.create(".lock") {
            Ok(f) => f,
            Err(Errno::EEXIST) => File::from(nix::fcntl::openat(&self.dir, ".lock", OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())?),
            Err(e) => return Err(anyhow!("creating {}/.lock: {e}", self.path.display())),
        };
        check_file(&f, &format!("{}/.lock", self.path.display()))?;
        let start = Instant::now();
        loop {
            match flock(f.as_fd(), libc::LOCK_EX | libc::LOCK_NB) {
                Ok(()) => return Ok(f),
                Err(Errno::EWOULDBLOCK | Errno::EINTR) if start.elapsed() < Duration::from_secs(10) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => bail!("locking {}/.lock: {e}", self.path.display()),
            }
        }
    }

    /// Who holds `name`; a stale entry is removed. Under the directory's lock.
    fn probe(&self, name: &str) -> Result<Probe> {
        let file = format!("{name}.json");
        let f = match nix::fcntl::openat(&self.dir, file.as_str(), OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK, Mode::empty()) {
            Ok(fd) => File::from(fd),
            Err(Errno::ENOENT) => return Ok(Probe::Free),
            Err(e) => bail!("job {name}: opening its entry {}/{file}: {e}", self.path.display()),
        };
        let st = check_file(&f, &format!("{}/{file}", self.path.display()))?;
        match flock(f.as_fd(), libc::LOCK_EX | libc::LOCK_NB) {
            Err(Errno::EWOULDBLOCK) => {
                use std::io::Read;
                let mut text = vec![];
                (&f).take(1 << 20).read_to_end(&mut text)?;
                // Written in one go once the job runs: until then (or if it does not parse) the job is starting.
                Ok(match serde_json::from_slice::<Entry>(&text) {
                    Ok(e) if e.name == name => Probe::Live(e),
                    _ => Probe::Starting,
                })
            }
            Ok(()) => {
                // Stale: its supervisor is gone. The lock we hold now and the directory's keep it so until the
                // unlink; the name must still be the file we locked.
                let now = nix::sys::stat::fstatat(&self.dir, file.as_str(), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)?;
                if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) {
                    nix::unistd::unlinkat(&self.dir, file.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir)?;
                }
                Ok(Probe::Free)
            }
            Err(e) => bail!("job {name}: locking its entry: {e}"),
        }
    }

    /// Take `name` if it is free.
    fn take_locked(&self, name: &str) -> Result<Option<Reservation>> {
        let _lock = self.lock()?;
        self.take(name)
    }

    /// Take `name` if it is free (under the directory's lock).
    fn take(&self, name: &str) -> Result<Option<Reservation>> {
        if !matches!(self.probe(name)?, Probe::Free) {
            return Ok(None);
        }
        let f = self.create(&format!("{name}.json")).with_context(|| format!("creating {}/{name}.json", self.path.display()))?;
        flock(f.as_fd(), libc::LOCK_EX | libc::LOCK_NB).with_context(|| format!("locking {}/{name}.json", self.path.display()))?;
        let dir = self.dir.try_clone()?;
        Ok(Some(Reservation { name: name.into(), path: self.path.clone(), dir, entry: f, released: Cell::new(false) }))
    }

    /// Every name with an entry (live, starting or stale).
    fn names(&self) -> Result<Vec<String>> {
        let rd = std::fs::read_dir(format!("/proc/self/fd/{}", self.dir.as_raw_fd())).with_context(|| format!("reading {}", self.path.display()))?;
        let mut out = vec![];
        for e in rd.flatten() {
            let file = e.file_name();
            let Some(name) = file.to_str().and_then(|f| f.strip_suffix(".json")) else { continue };
            if check_name(name).is_ok() {
                out.push(name.to_string());
            }
        }
        Ok(out)
    }
}

/// A job name taken in the registry, held until the supervisor exits (or `release`).
pub struct Reservation {
    name: String,
    path: PathBuf,
    dir: OwnedFd,
    /// The entry, locked.
    entry: File,
    released: Cell<bool>,
}

impl Reservation {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log_path(&self) -> PathBuf {
        log_in(&self.path, &self.name)
    }

    /// The entry's fd: the job's init is forked from the supervisor and does not exec, so it must close its copy
    /// (held there, the lock would outlive the supervisor and keep its name).
    pub fn fd(&self) -> RawFd {
        self.entry.as_raw_fd()
    }

    /// Write what `vrun list` and `vrun checkpoint` read: the job runs.
    pub fn publish(&self, e: &Entry) -> Result<()> {
        use std::os::unix::fs::FileExt;
        if e.name != self.name {
            bail!("registering job {} under the name {}", e.name, self.name);
        }
        if self.released.get() {
            bail!("job {}: its name was given up", self.name);
        }
        let f = &self.entry;
        // One write, so a reader sees all of it or nothing parseable.
        let text = serde_json::to_vec_pretty(e)?;
        let n = f.write_at(&text, 0).with_context(|| format!("writing {}/{}.json", self.path.display(), self.name))?;
        if n != text.len() {
            bail!("writing {}/{}.json: short write", self.path.display(), self.name);
        }
        Ok(())
    }

    /// Give the name up: remove the entry (still ours: it is locked, and no one removes a locked entry). The lock
    /// goes with the fd, as we exit.
    pub fn release(&self) {
        if self.released.replace(true) {
            return;
        }
        let file = format!("{}.json", self.name);
        let ours = nix::sys::stat::fstat(&self.entry).ok();
        let there = nix::sys::stat::fstatat(&self.dir, file.as_str(), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).ok();
        if let (Some(a), Some(b)) = (ours, there)
            && (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) {
                let _ = nix::unistd::unlinkat(&self.dir, file.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
            }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release();
    }
}

/// The job's log (the shim's lines): beside its entry, so only the job holding the name writes it.
fn log_in(registry: &Path, name: &str) -> PathBuf {
    registry.join(format!("{name}.log"))
}

/// The log of job `name` (valid), for a job that takes its name later (`reserve_when_free`).
pub fn log_path(name: &str) -> Result<PathBuf> {
    check_name(name).map_err(|e| anyhow!(e))?;
    Ok(log_in(&Registry::open()?.path, name))
}

fn taken(name: &str) -> anyhow::Error {
    anyhow!("a running job is already named {name} (see `vrun list`); choose another --name")
}

/// Take `name` exactly (a name the user chose): refused if a running job has it.
pub fn reserve(name: &str) -> Result<Reservation> {
    reserve_when_free(name, Duration::ZERO)
}

/// `reserve`, waiting up to `wait` for a job that has the name to end.
pub fn reserve_when_free(name: &str, wait: Duration) -> Result<Reservation> {
    check_name(name).map_err(|e| anyhow!(e))?;
    let reg = Registry::open()?;
    let start = Instant::now();
    loop {
        if let Some(r) = reg.take_locked(name)? {
            return Ok(r);
        }
        if start.elapsed() >= wait {
            return Err(taken(name));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Take a name made from `raw` (a program's file name, an image's job name): sanitized, then the first free of
/// `base`, `base-2`, `base-3`...
pub fn reserve_like(raw: &str) -> Result<Reservation> {
    let base = sanitize(raw);
    let reg = Registry::open()?;
    let _lock = reg.lock()?;
    for n in std::iter::once(base.clone()).chain((2..=SAME_BASE_MAX).map(|i| format!("{base}-{i}"))) {
        if let Some(r) = reg.take(&n)? {
            return Ok(r);
        }
    }
    bail!("{SAME_BASE_MAX} jobs named after {base} run already; give this one a --name")
}

/// The first of `base`, `base-2`... that no job holds now, not taken (`vrun serve` names the `vrun restore` it
/// starts; should another job take it meanwhile, that restore waits a moment, then refuses it).
pub fn free_name(raw: &str) -> Result<String> {
    let r = reserve_like(raw)?;
    Ok(r.name.clone())
}

/// Running jobs, oldest first; stale entries are removed on the way, starting jobs left out.
pub fn list() -> Result<Vec<Entry>> {
    let reg = Registry::open()?;
    let _lock = reg.lock()?;
    let mut out = vec![];
    for n in reg.names()? {
        if let Ok(Probe::Live(e)) = reg.probe(&n) {
            out.push(e);
        }
    }
    out.sort_by(|a, b| (a.since_unix, &a.name).cmp(&(b.since_unix, &b.name)));
    Ok(out)
}

/// The job called `name`; without a name, the only job running. A job still starting is waited for a moment.
pub fn find(name: Option<&str>) -> Result<Entry> {
    let Some(n) = name else {
        let mut jobs = list()?;
        if jobs.len() > 1 {
            bail!("several jobs are running; name one (see `vrun list`)");
        }
        return jobs.pop().ok_or_else(|| anyhow!("no job is running"));
    };
    check_name(n).map_err(|e| anyhow!(e))?;
    let reg = Registry::open()?;
    let start = Instant::now();
    loop {
        let p = {
            let _lock = reg.lock()?;
            reg.probe(n)?
        };
        match p {
            Probe::Live(e) => return Ok(e),
            Probe::Free => bail!("no job named {n} is running (see `vrun list`)"),
            Probe::Starting if start.elapsed() > Duration::from_secs(3) => bail!("job {n} is still starting; try again in a moment"),
            Probe::Starting => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Connect to a job's supervisor, and make sure it is: the socket's name is only a name (anyone may bind an
/// abstract socket), so before anything is sent or believed, its peer must be the registered supervisor (pid)
/// of our own user or root. Otherwise a planted name would get our requests, the fd of our stdout, and with
/// `vrun migrate` the power to send its own image as our job.
pub fn connect(e: &Entry) -> Result<OwnedFd> {
    let raw = vos::proto::connect(&e.sock).map_err(|err| anyhow!("cannot reach the supervisor of job {}: {err}", e.name))?;
    // SAFETY: a fresh fd from socket+connect, owned by no one else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let cred = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|err| anyhow!("job {}: who holds its socket: {err}", e.name))?;
    let me = nix::unistd::getuid().as_raw();
    if cred.uid() != me && cred.uid() != 0 {
        bail!("job {}: its socket is held by uid {}, not by you: refusing to talk to it", e.name, cred.uid());
    }
    if cred.pid() != e.supervisor {
        bail!("job {}: its socket is held by pid {}, not by its supervisor (pid {}): refusing to talk to it", e.name, cred.pid(), e.supervisor);
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "calc", "python3", "job-2", "a.b", "x_y", "c++", "A9", &"n".repeat(64)] {
            assert_eq!(check_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", ".", "..", ".hidden", "-x", "x/y", "../../tmp/t", "a b", "a\nb", "a\u{1b}[31m", "é", &"n".repeat(65), &"n".repeat(200), "a\0b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        // The messages never carry the name's control characters.
        assert!(!check_name("a\u{1b}[2J").unwrap_err().contains('\u{1b}'));
        assert!(!check_name(&format!("{}\u{1b}", "n".repeat(70))).unwrap_err().contains('\u{1b}'));
    }

    #[test]
    fn sanitized_names_are_valid_with_a_suffix() {
        for raw in ["python3", "", ".", "..", "-rf", ".bashrc", "my prog", "a/b", "ünïcode", "\u{1b}[2J", &"x".repeat(300)] {
            let s = sanitize(raw);
            assert_eq!(check_name(&s), Ok(()), "{raw:?} -> {s:?}");
            assert_eq!(check_name(&format!("{s}-{SAME_BASE_MAX}")), Ok(()), "{raw:?} -> {s:?}");
        }
        assert_eq!(sanitize("python3"), "python3");
        assert_eq!(sanitize("my prog"), "my_prog");
        assert_eq!(sanitize(".bashrc"), "_bashrc");
        assert_eq!(sanitize(""), "job");
    }

    proptest::proptest! {
        /// Whatever a name is made of, one that passes is a single plain path component inside the runtime
        /// directory, and its messages never carry a control character.
        #[test]
        fn a_valid_name_is_one_plain_component(name in "\\PC{0,80}|[a-zA-Z0-9._+/-]{0,70}") {
            match check_name(&name) {
                Ok(()) => {
                    let mut c = std::path::Path::new(&name).components();
                    proptest::prop_assert!(matches!(c.next(), Some(std::path::Component::Normal(_))));
                    proptest::prop_assert!(c.next().is_none());
                    proptest::prop_assert!(name.len() <= NAME_MAX && !name.starts_with(['.', '-']));
                }
                Err(msg) => proptest::prop_assert!(!msg.chars().any(char::is_control)),
            }
        }

        /// Every raw program name gives a valid default name, also with the suffix a second job of it gets.
        #[test]
        fn sanitize_always_gives_a_valid_name(raw in "\\PC{0,300}") {
            let s = sanitize(&raw);
            proptest::prop_assert_eq!(check_name(&s), Ok(()));
            proptest::prop_assert_eq!(check_name(&format!("{s}-{SAME_BASE_MAX}")), Ok(()));
        }
    }
}
