//! Filling a migrated job's memory after it resumes. The restorer leaves the pages the image only lists missing,
//! registered with a userfaultfd in missing-page mode, and hands that fd over: the job runs at once instead of
//! waiting while hundreds of MiB are copied into fresh memory. A `Filler` puts the pages the job touches first in
//! place, and the rest in the background. The pages come from one of two places:
//! - pre-copy brought them (sparse files, each page at its address): `start` runs a process of its own that
//!   reads them from there;
//! - post-copy (`vrun migrate --lazy`): the source host still holds them, in the stopped job; `vrun serve` asks
//!   for them over the migration's connection (see `serve`).
//!
//! The job may change its memory meanwhile, and the filler hears of it (events that hold the job until read): a
//! fork's child gets a userfaultfd of its own and the same pages to fill; mremap moves pages still missing;
//! madvise(DONTNEED) and munmap leave them zeros or gone, never filled later with old contents. A page the job
//! touches that is not to be filled is made a zero page. When every page is in place the userfaultfds close (the
//! job's memory is ordinary again); a checkpoint of the job waits for that.

use anyhow::{Result, anyhow, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use vos::proto::{self, Msg};
use vos::sys::{UFFD_EVENT_FORK, UFFD_EVENT_PAGEFAULT, UFFD_EVENT_REMAP, UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP, UFFDIO_COPY, UFFDIO_WAKE, UFFDIO_ZEROPAGE};

pub const PAGE: u64 = 4096;
/// Pages asked for around a fault: the job likely reads on.
const AHEAD: u64 = 16 * PAGE;

/// The memory of a restored job left to fill.
#[derive(Default)]
pub struct Filler {
    work: Vec<Work>,
    /// Per process of the image: the runs it listed (its addresses) and how far the background went.
    plan: Vec<Plan>,
    /// Pieces a thread of the job waits for: (pid, from, to), addresses of the image.
    pub urgent: Vec<(i32, u64, u64)>,
    /// The job's init on this host: ending it ends the whole job.
    init: Option<i32>,
}

struct Plan {
    pid: i32,
    runs: Vec<(u64, u64)>,
    at: (usize, u64),
}

/// One process's missing pages. A child forked meanwhile has its own, with its parent's pid and pages.
struct Work {
    uffd: OwnedFd,
    pid: i32,
    left: Vec<Left>,
    gone: bool,
}

/// Missing pages [dst, end) here, to hold the image's pages from address `src` (they differ once mremap moved them).
#[derive(Clone, Copy, Debug)]
struct Left {
    dst: u64,
    end: u64,
    src: u64,
}

impl Work {
    /// The image address of missing page `dst`, and the end of its piece (image addresses).
    fn find(&self, dst: u64) -> Option<(u64, u64)> {
        self.left.iter().find(|l| l.dst <= dst && dst < l.end).map(|l| (l.src + (dst - l.dst), l.src + (l.end - l.dst)))
    }

    /// The first missing piece holding image addresses in [from, to): (dst, src, len).
    fn overlap(&self, from: u64, to: u64) -> Option<(u64, u64, u64)> {
        self.left.iter().find_map(|l| {
            let (s, e) = (from.max(l.src), to.min(l.src + (l.end - l.dst)));
            (s < e).then(|| (l.dst + (s - l.src), s, e - s))
        })
    }

    /// [a, b) is no longer missing (filled, zapped, unmapped), or moves by `shift` (mremap).
    fn cut(&mut self, a: u64, b: u64, shift: Option<i64>) {
        let mut out = Vec::with_capacity(self.left.len() + 1);
        let mut moved = vec![];
        for l in self.left.drain(..) {
            if l.end <= a || b <= l.dst {
                out.push(l);
                continue;
            }
            if l.dst < a {
                out.push(Left { dst: l.dst, end: a, src: l.src });
            }
            if b < l.end {
                out.push(Left { dst: b, end: l.end, src: l.src + (b - l.dst) });
            }
            if let Some(d) = shift {
                let (s, e) = (l.dst.max(a), l.end.min(b));
                moved.push(Left { dst: s.wrapping_add_signed(d), end: e.wrapping_add_signed(d), src: l.src + (s - l.dst) });
            }
        }
        out.extend(moved);
        out.sort_by_key(|l| l.dst);
        self.left = out;
    }
}

/// What one UFFDIO_COPY did.
enum Copied {
    All,
    /// A page there already (filled by a fault, or the job wrote it): `done` bytes went in before it.
    Exists(u64),
    /// The job's memory is changing (an event waits to be read): `done` bytes went in.
    Again(u64),
    /// Not registered any more (unmapped meanwhile).
    Unmapped,
    /// The process is gone.
    Gone,
}

fn uffd_copy(uffd: RawFd, dst: u64, data: &[u8]) -> Result<Copied> {
    // struct uffdio_copy: dst, src, len, mode, copy (bytes copied, or a negative errno).
    let mut c: [i64; 5] = [dst as i64, data.as_ptr() as i64, data.len() as i64, 0, 0];
    // SAFETY: c is a uffdio_copy; src points to len readable bytes.
    if unsafe { libc::ioctl(uffd, UFFDIO_COPY, c.as_mut_ptr()) } == 0 {
        return Ok(Copied::All);
    }
    let done = c[4].max(0) as u64;
    Ok(match std::io::Error::last_os_error().raw_os_error().unwrap_or(0) {
        libc::EEXIST => Copied::Exists(done),
        libc::EAGAIN => Copied::Again(done),
        libc::ENOENT => Copied::Unmapped,
        libc::ESRCH | libc::EFAULT => Copied::Gone,
        e => bail!("UFFDIO_COPY at {dst:#x}: {}", std::io::Error::from_raw_os_error(e)),
    })
}

fn uffd_wake(uffd: RawFd, at: u64) {
    let mut range: [u64; 2] = [at, PAGE];
    // SAFETY: range is a uffdio_range.
    unsafe { libc::ioctl(uffd, UFFDIO_WAKE, range.as_mut_ptr()) };
}

/// Make `at` a zero page (a page the job touched that is not to be filled); false when it must be tried again.
fn uffd_zero(uffd: RawFd, at: u64) -> bool {
    // struct uffdio_zeropage: range (start, len), mode, zeropage (result).
    let mut z: [i64; 4] = [at as i64, PAGE as i64, 0, 0];
    // SAFETY: z is a uffdio_zeropage.
    if unsafe { libc::ioctl(uffd, UFFDIO_ZEROPAGE, z.as_mut_ptr()) } == 0 {
        return true;
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => false,
        Some(libc::EEXIST) => {
            uffd_wake(uffd, at);
            true
        }
        _ => true,
    }
}

fn u64_at(m: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(m[at..at + 8].try_into().unwrap())
}

impl Filler {
    /// Take a process's runs to fill (`Msg::Fill`) and its userfaultfd.
    pub fn add(&mut self, pid: i32, init: i32, runs: Vec<(u64, u64)>, uffd: OwnedFd) -> Result<()> {
        nix::fcntl::fcntl(&uffd, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))?;
        self.init = Some(init);
        self.work.push(Work { uffd, pid, left: runs.iter().map(|&(s, e)| Left { dst: s, end: e, src: s }).collect(), gone: false });
        self.plan.push(Plan { pid, runs, at: (0, 0) });
        Ok(())
    }

    /// Poll entries for the job's events.
    pub fn poll_fds(&self) -> Vec<PollFd<'_>> {
        self.work.iter().map(|w| PollFd::new(w.uffd.as_fd(), PollFlags::POLLIN)).collect()
    }

    /// The next background piece of at most `step` bytes: (pid, from, to); None once all was handed out.
    pub fn next_piece(&mut self, step: u64) -> Option<(i32, u64, u64)> {
        let p = self.plan.iter_mut().find(|p| p.at.0 < p.runs.len())?;
        let (s, e) = p.runs[p.at.0];
        let from = s + p.at.1;
        let to = (from + step).min(e);
        p.at = if to == e { (p.at.0 + 1, 0) } else { (p.at.0, to - s) };
        Some((p.pid, from, to))
    }

    /// Every piece was handed out once.
    pub fn handed_out(&self) -> bool {
        self.plan.iter().all(|p| p.at.0 == p.runs.len())
    }

    /// Read the job's events: faults on missing pages go to `urgent`, other faults get a zero page, forks,
    /// moves and removals change what is missing.
    pub fn events(&mut self) -> Result<()> {
        let mut retry_zero = vec![];
        let mut i = 0;
        // Children forked are appended, and read in turn.
        while i < self.work.len() {
            let mut m = [0u8; 32];
            loop {
                let w = &mut self.work[i];
                // SAFETY: reading one uffd_msg into our buffer.
                if unsafe { libc::read(w.uffd.as_raw_fd(), m.as_mut_ptr() as *mut libc::c_void, 32) } != 32 {
                    break;
                }
                match m[0] {
                    UFFD_EVENT_PAGEFAULT => {
                        let at = u64_at(&m, 16) & !(PAGE - 1);
                        match w.find(at) {
                            Some((src, end)) => self.urgent.push((w.pid, src, (src + AHEAD).min(end))),
                            None => {
                                if !uffd_zero(w.uffd.as_raw_fd(), at) {
                                    retry_zero.push((i, at));
                                }
                            }
                        }
                    }
                    UFFD_EVENT_FORK => {
                        let fd = u32::from_le_bytes(m[8..12].try_into().unwrap()) as RawFd;
                        let uffd = crate::os::owned(fd);
                        nix::fcntl::fcntl(&uffd, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC))?;
                        let child = Work { uffd, pid: w.pid, left: w.left.clone(), gone: false };
                        self.work.push(child);
                    }
                    UFFD_EVENT_REMAP => {
                        let (from, to, len) = (u64_at(&m, 8), u64_at(&m, 16), u64_at(&m, 24));
                        w.cut(from, from + len, Some(to as i64 - from as i64));
                    }
                    UFFD_EVENT_REMOVE | UFFD_EVENT_UNMAP => w.cut(u64_at(&m, 8), u64_at(&m, 16), None),
                    _ => {}
                }
            }
            i += 1;
        }
        // Zero pages refused while an event was pending: the events are read now.
        for (i, at) in retry_zero {
            while !uffd_zero(self.work[i].uffd.as_raw_fd(), at) {}
        }
        Ok(())
    }

    /// Put `data`, the image's pages of `pid` from address `src`, in place in every process that misses them;
    /// pages already there are skipped (and whoever waits on them woken).
    pub fn place(&mut self, pid: i32, src: u64, data: &[u8]) -> Result<()> {
        let end = src + data.len() as u64;
        'again: loop {
            let mut i = 0;
            while i < self.work.len() {
                if self.work[i].pid != pid || self.work[i].gone {
                    i += 1;
                    continue;
                }
                while let Some((dst, s, n)) = self.work[i].overlap(src, end) {
                    let w = &mut self.work[i];
                    let bytes = &data[(s - src) as usize..][..n as usize];
                    match uffd_copy(w.uffd.as_raw_fd(), dst, bytes)? {
                        Copied::All | Copied::Unmapped => w.cut(dst, dst + n, None),
                        Copied::Exists(done) => {
                            uffd_wake(w.uffd.as_raw_fd(), dst + done);
                            w.cut(dst, dst + done + PAGE, None);
                        }
                        Copied::Again(done) => {
                            w.cut(dst, dst + done, None);
                            self.events()?;
                            continue 'again;
                        }
                        Copied::Gone => {
                            w.gone = true;
                            break;
                        }
                    }
                }
                i += 1;
            }
            self.work.retain(|w| !w.gone);
            return Ok(());
        }
    }

    /// Everything arrived: the userfaultfds close, and the job's memory is ordinary again.
    pub fn finish(&mut self) -> Result<()> {
        self.events()?;
        if let Some(l) = self.work.iter().find_map(|w| w.left.first()) {
            bail!("pages at {:#x} never arrived", l.dst);
        }
        self.work.clear();
        Ok(())
    }

    /// Filling failed: pages left missing would read as zeros once the userfaultfds close, so the job ends
    /// instead, loudly, rather than run on wrong memory.
    pub fn end_job(&self, why: &anyhow::Error) {
        eprintln!("vrun: filling the migrated job's memory failed, ending it: {why:#}");
        if let Some(init) = self.init {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(init), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Start the filler for pre-copied pages, in `bases` (pid, fd); returns the socket to send it work on
/// (`Msg::Fill` with a userfaultfd); shut down for writing once all is sent, it ends by itself when all is
/// filled, and the socket then reads end of file.
pub fn start(bases: &[(i32, RawFd)]) -> Result<OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let (mine, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
    let bases = bases.to_vec();
    // SAFETY: vrun restore is single-threaded here; the child only runs our loop and exits.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => {
            drop(mine);
            // Orphaned at once (a grandchild), so the supervisor never has to reap it.
            // SAFETY: as above.
            if let Ok(nix::unistd::ForkResult::Child) = unsafe { nix::unistd::fork() } {
                // Nothing of vrun restore's but what it needs: a restorer's end of its control socket held
                // here would hide that restorer's death.
                let keep: Vec<RawFd> = bases.iter().map(|b| b.1).chain([theirs.as_raw_fd(), 0, 1, 2]).collect();
                let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd").map_or(vec![], |d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect());
                for fd in open.into_iter().filter(|fd| !keep.contains(fd)) {
                    // SAFETY: closing fds this process does not use.
                    unsafe { libc::close(fd) };
                }
                let mut f = Filler::default();
                let code = match from_files(theirs, &bases, &mut f) {
                    Ok(()) => 0,
                    Err(e) => {
                        f.end_job(&e);
                        1
                    }
                };
                // SAFETY: leaving without running the parent's atexit handlers or destructors.
                unsafe { libc::_exit(code) };
            }
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(theirs);
            let _ = nix::sys::wait::waitpid(child, None);
            Ok(mine)
        }
    }
}

/// Take a `Msg::Fill` from `sock` into `f`; false once the sender is done.
pub fn take_work(sock: &OwnedFd, f: &mut Filler) -> Result<bool> {
    match proto::recv(sock.as_raw_fd()) {
        Ok(Some((Msg::Fill { pid, init, runs }, Some(fd)))) => {
            f.add(pid, init, runs, crate::os::owned(fd))?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Fill from the pre-copied pages until all is in place.
fn from_files(sock: OwnedFd, bases: &[(i32, RawFd)], f: &mut Filler) -> Result<()> {
    const STEP: u64 = 256 * PAGE;
    let mut more = true;
    let mut buf = vec![0u8; STEP as usize];
    let read = |pid: i32, from: u64, to: u64, buf: &mut [u8]| -> Result<usize> {
        let base = bases.iter().find(|b| b.0 == pid).map(|b| b.1).ok_or_else(|| anyhow!("no pre-copied pages for pid {pid}"))?;
        let n = (to - from) as usize;
        let mut got = 0;
        while got < n {
            // SAFETY: reading into our buffer.
            let r = unsafe { libc::pread(base, buf[got..n].as_mut_ptr() as *mut libc::c_void, n - got, (from + got as u64) as i64) };
            if r <= 0 {
                bail!("reading pre-copied pages at {:#x}: {}", from + got as u64, std::io::Error::last_os_error());
            }
            got += r as usize;
        }
        Ok(n)
    };
    loop {
        if !more && f.handed_out() && f.urgent.is_empty() {
            return f.finish();
        }
        let work_came = {
            let mut fds = f.poll_fds();
            if more {
                fds.push(PollFd::new(sock.as_fd(), PollFlags::POLLIN));
            }
            let busy = !f.handed_out() || !f.urgent.is_empty();
            match poll(&mut fds, if busy { PollTimeout::ZERO } else { PollTimeout::NONE }) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => bail!("poll: {e}"),
            }
            more && fds.last().and_then(|p| p.revents()).is_some_and(|r| !r.is_empty())
        };
        if work_came {
            more = take_work(&sock, f)?;
        }
        f.events()?;
        // The job's faults first: a thread waits on each. Then the next piece in the background.
        let next = f.urgent.pop().or_else(|| f.next_piece(STEP));
        if let Some((pid, from, to)) = next {
            let n = read(pid, from, to, &mut buf)?;
            f.place(pid, from, &buf[..n])?;
        }
    }
}

