//! Filling a migrated job's pre-copied memory after it resumes. The restorer leaves the pages that came ahead
//! (in pre-copy) missing, registered with a userfaultfd in missing-page mode, and hands that fd over: the job
//! runs at once instead of waiting while hundreds of MiB are copied into fresh memory. This filler, a process
//! of its own outside the job, serves the pages the job touches first and copies the rest in the background,
//! from the sparse files pre-copy filled (`vrun serve`'s, each page at its address). When every page is in
//! place it closes the userfaultfds (the job's memory is ordinary again) and ends; a checkpoint of the job waits
//! for that.

use anyhow::{Result, anyhow, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use vos::proto::{self, Msg};

use vos::sys::{UFFD_EVENT_PAGEFAULT, UFFDIO_COPY, UFFDIO_WAKE};
const PAGE: u64 = 4096;
/// Pages copied in one background step, between looks at the job's faults.
const STEP: u64 = 256 * PAGE;

/// One process's pages left to fill.
struct Work {
    uffd: OwnedFd,
    base: RawFd,
    runs: Vec<(u64, u64)>,
    /// Next run and offset in it the background copy takes.
    at: (usize, u64),
}

/// Start the filler for the processes whose pre-copied pages are in `bases` (pid, fd); returns the socket to
/// send it work on (`Msg::Fill` with a userfaultfd); shut down for writing once all is sent, it ends by itself
/// when all is filled, and the socket then reads end of file.
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
                let mut hosts = vec![];
                let code = match serve(theirs, &bases, &mut hosts) {
                    Ok(()) => 0,
                    Err(e) => {
                        // Pages left missing would read as zeros once we are gone: the processes end instead,
                        // loudly, rather than run on wrong memory.
                        eprintln!("vrun: filling the migrated job's memory failed, ending it: {e:#}");
                        for &h in &hosts {
                            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(h), nix::sys::signal::Signal::SIGKILL);
                        }
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

/// Fill what comes on `sock` until all is in place; `hosts` learns every process given (to end them on failure).
fn serve(sock: OwnedFd, bases: &[(i32, RawFd)], hosts: &mut Vec<i32>) -> Result<()> {
    let mut work: Vec<Work> = vec![];
    let mut more = true;
    let mut buf = vec![0u8; STEP as usize];
    loop {
        let busy = work.iter().any(|w| w.at.0 < w.runs.len());
        if !more && !busy {
            return Ok(());
        }
        {
            let mut fds: Vec<PollFd> = work.iter().map(|w| PollFd::new(w.uffd.as_fd(), PollFlags::POLLIN)).collect();
            if more {
                fds.push(PollFd::new(sock.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, if busy { PollTimeout::ZERO } else { PollTimeout::NONE }) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => bail!("poll: {e}"),
            }
            let sock_ready = more && fds.last().and_then(|f| f.revents()).is_some_and(|r| !r.is_empty());
            drop(fds);
            if sock_ready {
                match proto::recv(sock.as_raw_fd()) {
                    Ok(Some((Msg::Fill { pid, host, runs }, Some(fd)))) => {
                        hosts.push(host);
                        let base = bases.iter().find(|b| b.0 == pid).map(|b| b.1).ok_or_else(|| anyhow!("no pre-copied pages for pid {pid}"))?;
                        let uffd = crate::ns::owned(fd);
                        nix::fcntl::fcntl(&uffd, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))?;
                        work.push(Work { uffd, base, runs, at: (0, 0) });
                    }
                    _ => more = false,
                }
            }
        }
        // The job's faults first: a thread waits on each.
        for w in &mut work {
            let mut msg = [0u8; 32];
            // SAFETY: reading into our buffer.
            while unsafe { libc::read(w.uffd.as_raw_fd(), msg.as_mut_ptr() as *mut libc::c_void, 32) } == 32 {
                if msg[0] != UFFD_EVENT_PAGEFAULT {
                    continue;
                }
                let addr = u64::from_le_bytes(msg[16..24].try_into().unwrap()) & !(PAGE - 1);
                // Around the fault, a little ahead: the job likely reads on.
                let Some(&(_, e)) = w.runs.iter().find(|r| r.0 <= addr && addr < r.1) else { continue };
                if !copy(w, addr, (addr + 16 * PAGE).min(e), &mut buf)? {
                    w.at = (w.runs.len(), 0);
                }
            }
        }
        // Then the next piece in the background.
        if let Some(w) = work.iter_mut().find(|w| w.at.0 < w.runs.len()) {
            let (s, e) = w.runs[w.at.0];
            let from = s + w.at.1;
            let to = (from + STEP).min(e);
            w.at = if !copy(w, from, to, &mut buf)? {
                (w.runs.len(), 0)
            } else if to == e {
                (w.at.0 + 1, 0)
            } else {
                (w.at.0, to - s)
            };
        }
        // Processes whose pages are all in place: their memory is ordinary again.
        work.retain(|w| w.at.0 < w.runs.len());
    }
}

/// Put [from, to) in place from the pre-copied pages; pages already there (filled by a fault, or the job
/// gone) are skipped, and a thread waiting on one is woken. False when the process is gone.
fn copy(w: &Work, from: u64, to: u64, buf: &mut [u8]) -> Result<bool> {
    let mut p = from;
    while p < to {
        let n = (to - p).min(buf.len() as u64) as usize;
        let mut got = 0;
        while got < n {
            // SAFETY: reading into our buffer.
            let r = unsafe { libc::pread(w.base, buf[got..n].as_mut_ptr() as *mut libc::c_void, n - got, (p + got as u64) as i64) };
            if r <= 0 {
                bail!("reading pre-copied pages at {:#x}: {}", p + got as u64, std::io::Error::last_os_error());
            }
            got += r as usize;
        }
        // struct uffdio_copy: dst, src, len, mode, copy (bytes copied, or a negative errno).
        let mut c: [i64; 5] = [p as i64, buf.as_ptr() as i64, n as i64, 0, 0];
        // SAFETY: c is a uffdio_copy; src points to n readable bytes.
        let r = unsafe { libc::ioctl(w.uffd.as_raw_fd(), UFFDIO_COPY, c.as_mut_ptr()) };
        if r == 0 {
            p += n as u64;
            continue;
        }
        let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let done = c[4].max(0) as u64;
        match e {
            libc::EAGAIN => p += done,
            libc::EEXIST => {
                // One page there already: wake whoever waits on it, and go on after it.
                let at = p + done;
                let mut range: [u64; 2] = [at, PAGE];
                // SAFETY: range is a uffdio_range.
                unsafe { libc::ioctl(w.uffd.as_raw_fd(), UFFDIO_WAKE, range.as_mut_ptr()) };
                p = at + PAGE;
            }
            // The job ended: nothing left to fill.
            libc::ESRCH | libc::ENOENT | libc::EFAULT => return Ok(false),
            _ => bail!("UFFDIO_COPY at {p:#x}: {}", std::io::Error::from_raw_os_error(e)),
        }
    }
    Ok(true)
}
