//! `vrun restore`: check an image against this host, recreate what the job's processes share, plan every
//! process's address space for the restorer, start the job again in fresh namespaces, and supervise it.
//!
//! Order of events: the header and the job's metadata are read and checked (host, CPU, vDSO, every file the job
//! used) before anything is created; the supervisor opens or makes every open file, pipe, socket and piece of
//! shared memory; init starts the restorer as the job's top-level processes, which make the rest of the tree with
//! the original pids; each restorer maps its process's memory and reads its page chunks (in turn, from the same
//! stream); each process's shim rebuilds fds, signals and threads and says it is ready; the launcher reads the end
//! of the image, gives the terminal to the job's foreground group, and only if the image is whole lets the job run.

use crate::image::file::{Reader, Trust};
use crate::job::ns::{self, Child, ClockOffsets};
use crate::output::progress::Progress;
use crate::job::supervisor::{self, Options, Supervisor};
use crate::job::{members, registry};
use crate::resources::{bundle, creds, files, host, identity, pathopen, sysv, terminal, vdso};
use anyhow::{Context, Result, anyhow, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType};
use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use vos::image::{FileKind, JobImage, ProcessImage, RestartSpec};
use vos::plan;
use vos::proto::{self, Msg};
use crate::os::memfd;
use planning::{Fds, entries, for_restart, job_plan, process_plan};

pub struct Args {
    pub src: String,
    /// The key the image must be signed by (None: the host's, if there is one), which then signs the job's images.
    pub image_key: Option<PathBuf>,
    /// Restore it even if the key did not sign it.
    pub trust_unsigned: bool,
    /// A name chosen on the command line (valid): refused if taken. Without it, the image's, made valid and
    /// unique.
    pub name: Option<String>,
    /// Supervisor settings given on the command line; the job's own (from the image) otherwise.
    pub given: supervisor::Given,
    /// Re-bindings asked for on the command line.
    pub hostname: Option<String>,
    pub domainname: Option<String>,
    pub map: Vec<(String, String)>,
    pub map_addr: Vec<(String, String)>,
    /// Told "running" once the job runs (`vrun serve` waits for it).
    pub report_fd: Option<RawFd>,
    /// Pages received by pre-copy, per process (pid as in the image): sparse files, each page at its address.
    pub bases: Vec<(i32, RawFd)>,
    /// Post-copy: every page the image lists comes after the job resumes, put in place by the filler at the
    /// other end of this socket (`vrun serve`'s, which fetches them from the source host).
    pub fill_fd: Option<RawFd>,
}

/// How long a job restored for a migration must run before the source is told it runs here (`--report-fd`).
const SETTLE_MS: u16 = 300;

/// With VOS_TIMING set, `vrun restore` reports how long each phase took (on stderr).
struct Phases(Option<std::time::Instant>);

impl Phases {
    fn mark(&mut self, what: &str) {
        if let Some(t) = self.0 {
            eprintln!("vrun: restore: {what} at {:.1} ms", t.elapsed().as_secs_f64() * 1000.0);
        }
    }
}

pub mod planning;

pub fn run(a: Args, restorer: PathBuf, shim: PathBuf) -> Result<std::convert::Infallible> {
    let mut phases = Phases(std::env::var_os("VOS_TIMING").map(|_| std::time::Instant::now()));
    // SAFETY: the fd was handed to us for this alone; owning it closes it on every path, and CLOEXEC keeps it
    // out of the job.
    let report = a.report_fd.map(|fd| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    if let Some(r) = &report {
        nix::fcntl::fcntl(r, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC)).context("--report-fd")?;
    }
    let key = crate::image::sign::resolve(a.image_key.as_deref())?;
    // A restore for `vrun serve` (--report-fd) takes what its authenticated connection delivered.
    let trust = Trust { key: key.as_ref(), unsigned_ok: a.trust_unsigned, channel: a.report_fd.is_some() };
    let mut r = Reader::open(&a.src, trust)?;
    let header = r.header()?;
    let here = host::current();
    host::check(&header.host, &here).map_err(|e| anyhow!("cannot restore {} here: {e}", r.name))?;
    let swap = vdso::swap(&header.host.vdso, &here.vdso).map_err(|e| anyhow!("cannot restore {} here: {e}", r.name))?;
    let mut job = r.job()?;
    rebind_paths(&mut job, &a.map);
    crate::resources::inet::rebind(&mut job, &a.map_addr)?;
    // Everything the image says is checked before anything is made from it.
    job.validate(&header).map_err(|e| anyhow!("{}: {e}", r.name))?;
    // Whose the job was, and whether this restore may bring it back: before anything is opened or made.
    let auth = creds::Authority::of(r.raw_fd(), &job)?;
    auth.check(&job).map_err(|e| anyhow!("cannot restore {}: {e}", r.name))?;
    let verified = check_files(&job, &auth).map_err(|e| anyhow!("cannot restore {} here: {e}", r.name))?;
    let opts = Options { sign: key.clone(), ..a.given.settle(Some(&header.job))? };

    // A name given is taken only once the image is whole, just before the job runs: until then it may still be
    // the checkpointed job's, ending (`vrun checkpoint X --kill --to - | vrun restore --name X -`). Otherwise the
    // image's name, only a suggestion (it may be taken here, or not even valid: a hostile image), is made valid
    // and unique now.
    let early = match &a.name {
        Some(_) => None,
        None => {
            let r = registry::reserve_like(&header.job.name)?;
            if r.name() != header.job.name && !opts.quiet {
                eprintln!("vrun: job {} is restored as {}", crate::output::escape::escape(&header.job.name), r.name());
            }
            Some(r)
        }
    };
    let name = match (&early, &a.name) {
        (Some(r), _) => r.name().to_string(),
        (None, n) => n.clone().unwrap_or_default(),
    };
    let log = registry::log_path(&name)?;
    let listener = supervisor::listen(&name)?;
    // The job's stdio re-binds to ours; when the image comes on stdin, the job's stdin is /dev/null.
    let stdin: OwnedFd = if a.src == "-" { File::open("/dev/null")?.into() } else { nix::unistd::dup(std::io::stdin())? };
    let stdio = [stdin.as_raw_fd(), 1, 2];
    // Memfds and deleted files get their contents from the Data chunks that follow the job's metadata, in order.
    let mut fill = |data: u32, fd: RawFd| -> Result<()> {
        r.data(data, &job.data[data as usize], &mut |off, bytes| {
            nix::sys::uio::pwrite(unsafe_borrow(fd), bytes, off as i64)?;
            Ok(())
        })
    };
    // A job restored into a user namespace makes its own mount namespace there, as one launched without root.
    let own_mounts = if auth.userns.is_some() { None } else { ns::enter_job_mounts()? };
    let objects = files::restore(&job, &stdio, &mut fill, &auth)?;
    let sysv_contents: Vec<OwnedFd> = job
        .sysv
        .shm
        .iter()
        .map(|s| {
            let fd = memfd("vos-sysv", s.size)?;
            fill(s.data, fd.as_raw_fd())?;
            Ok(fd)
        })
        .collect::<Result<_>>()?;
    let shm: Vec<OwnedFd> = job
        .shared_memory
        .iter()
        .map(|m| match m.file {
            Some(f) => Ok(objects[f as usize].try_clone()?),
            None => memfd(&m.name, m.size),
        })
        .collect::<Result<_>>()?;
    if let Some(t) = &job.terminal {
        terminal::restore_modes(t);
    }

    let bundled = bundle::restore(&job, &mut fill)?;
    let mut fds = Fds::new(&job, verified);
    for (&k, f) in &bundled {
        let n = fds.put(f.as_raw_fd());
        fds.bundled.insert(k, n);
    }
    let memfd_plan = fds.reserve();
    let image_at = fds.put(r.raw_fd());
    let mut ctls: Vec<OwnedFd> = vec![];
    let mut plans: Vec<(Vec<u8>, usize)> = vec![]; // (process plan, index of its entry)
    let object_at: Vec<i32> = objects.iter().map(|o| fds.put(o.as_raw_fd())).collect();
    let stdio_bound = files::stdio_bindings(&job, &stdio)?;
    let stdio_at: Vec<i32> = stdio_bound.iter().map(|o| fds.put(o.as_raw_fd())).collect();
    let shm_at: Vec<i32> = shm.iter().map(|m| fds.put(m.as_raw_fd())).collect();
    let shm_size: Vec<u64> = shm.iter().map(|m| nix::sys::stat::fstat(m).map_or(0, |st| st.st_size as u64)).collect();
    let mut keep: Vec<OwnedFd> = vec![];
    for (i, p) in job.processes.iter().enumerate() {
        let (parent, child) = socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
        let ctl_at = fds.put(child.as_raw_fd());
        keep.push(child);
        ctls.push(parent);
        let mut process = for_restart(p);
        auth.adapt(&mut process);
        let spec = RestartSpec {
            process,
            fd_sources: p.fds.iter().map(|f| files::source_of(&job, f, &object_at, &stdio_at)).collect(),
            ctl_fd: ctl_at,
            sock: listener.name.clone(),
            log: log.display().to_string(),
            shim: shim.display().to_string(),
        };
        let base_at = match a.fill_fd {
            Some(_) => plan::POST_COPY,
            None => a.bases.iter().find(|b| b.0 == p.pid).map_or(-1, |b| fds.put(b.1)),
        };
        fds.who = auth.for_process(p);
        let plan = process_plan(p, &spec, &mut fds, &mut keep, image_at, ctl_at, &shm_at, &shm_size, r.seq, swap.as_ref(), base_at)?;
        plans.push((plan, i));
    }
    let plan_fd = job_plan(&job, &plans)?;
    fds.set(memfd_plan, plan_fd.as_raw_fd());
    phases.mark("image checked and planned");

    supervisor::block_signals(opts.signals)?;
    let first = &job.processes[0].attrs;
    let now = |c| nix::time::clock_gettime(c).map(|t| t.tv_sec() * 1_000_000_000 + t.tv_nsec());
    let clocks = ClockOffsets {
        monotonic: first.monotonic_ns as i64 - now(nix::time::ClockId::CLOCK_MONOTONIC)?,
        boottime: first.boottime_ns as i64 - now(nix::time::ClockId::CLOCK_BOOTTIME)?,
    };
    let tops: Vec<(i32, usize)> = entries(&job).iter().enumerate().filter(|(_, e)| e.ppid == 1).map(|(i, e)| (e.pid, i)).collect();
    let child = Child::Restore {
        tops,
        restorer: CString::new(restorer.as_os_str().as_encoded_bytes())?,
        in_job_mounts: own_mounts.is_some(),
        plan_fd: memfd_plan,
        fds: fds.list.clone(),
        hostname: a.hostname.clone().unwrap_or_else(|| first.hostname.clone()),
        domainname: a.domainname.clone().unwrap_or_else(|| first.domainname.clone()),
        in_namespaces: {
            let (sysv, contents) = (job.sysv.clone(), sysv_contents.iter().map(|f| f.as_raw_fd()).collect::<Vec<_>>());
            Box::new(move || {
                sysv::restore(&sysv, &contents)?;
                for fd in contents {
                    // SAFETY: init's inherited copies, used up.
                    unsafe { libc::close(fd) };
                }
                Ok(())
            })
        },
    };
    // Pre-copied pages are filled after the job resumes, by a process of their own, started before the job's
    // namespaces exist.
    let filler = match a.fill_fd {
        Some(fd) => Some(crate::os::owned(fd)),
        None if a.bases.is_empty() => None,
        None => Some(crate::migration::fill::start(&a.bases)?),
    };
    let userns = match &auth.userns {
        Some((uid, gid, groups)) => ns::UserNs::For { uid: *uid, gid: *gid, groups: groups.clone() },
        None => ns::UserNs::default_here(),
    };
    // A restorer that refuses the image at once may be gone before its process is seen: its report says why.
    let started = ns::start(child, clocks, own_mounts, early.as_ref().map(|r| r.fd()).as_slice(), userns).map_err(|e| restorer_said(&ctls).unwrap_or(e))?;
    phases.mark("restorer started");
    drop((keep, objects, shm, sysv_contents, bundled, plan_fd, stdin, stdio_bound));
    let fail = |e: anyhow::Error| -> anyhow::Error {
        let _ = nix::sys::signal::kill(started.init, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(started.init, None);
        e
    };

    // How far the restorers read the image (a file: they share its offset), shown while they do.
    let mut image_read = ImageRead::new(r.raw_fd(), opts.quiet);
    // Every process reports once its memory is back (or why it failed), then once fds, signals and threads are.
    let mut last_seq = 0;
    for (i, c) in ctls.iter().enumerate() {
        let report = wait_report(&ctls, i, &started.status, &job.processes, &mut || image_read.show()).map_err(fail)?;
        last_seq = last_seq.max(report.next_seq);
        if report.lazy_runs > 0 {
            let (uffd, runs) = lazy_runs(c).map_err(fail)?;
            let pid = job.processes[i].pid;
            let f = filler.as_ref().ok_or_else(|| fail(anyhow!("pid {pid}: pages left to fill, and no filler")))?;
            proto::send(f.as_raw_fd(), &Msg::Fill { pid, init: started.init.as_raw(), runs }, Some(uffd.as_raw_fd()))
                .map_err(|e| fail(anyhow!("handing pages to fill: {e}")))?;
        }
    }
    if let Some(f) = &filler {
        // All is handed over: the filler ends once it has filled it all.
        let _ = nix::sys::socket::shutdown(f.as_raw_fd(), nix::sys::socket::Shutdown::Write);
    }
    // The pre-copied pages are in place or the filler's now: our copies of them would live as long as the job.
    for &(_, fd) in &a.bases {
        // SAFETY: the fds were handed to this process for the restore alone, and it is done with them.
        drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    }
    image_read.bar.done();
    phases.mark("memory restored");
    for (i, c) in ctls.iter().enumerate() {
        match proto::recv(c.as_raw_fd()) {
            Ok(Some((Msg::Ready, _))) => {}
            Ok(Some((Msg::RestoreFailed { why }, _))) => return Err(fail(anyhow!("restoring pid {} failed: {why}", job.processes[i].pid))),
            Ok(Some((m, _))) => return Err(fail(anyhow!("unexpected message from the restored job: {m:?}"))),
            Ok(None) | Err(_) => return Err(fail(anyhow!("restoring {} failed: pid {} ended", r.name, job.processes[i].pid))),
        }
    }
    phases.mark("threads and fds restored");
    // Only a whole image may run.
    r.seq = last_seq;
    r.end().map_err(fail)?;
    let reserved = match early {
        Some(r) => r,
        None => registry::reserve_when_free(&name, std::time::Duration::from_secs(10)).map_err(fail)?,
    };
    sysv::remove_destroyed(started.init.as_raw(), &job.sysv).map_err(fail)?;
    if let Some(t) = &job.terminal {
        terminal::hand_over(t, &members::members(started.init).map_err(fail)?);
    }
    for c in &ctls {
        proto::send(c.as_raw_fd(), &Msg::Go, None).map_err(|e| fail(anyhow!("talking to the restored job: {e}")))?;
    }
    for c in &ctls {
        match proto::recv(c.as_raw_fd()) {
            Ok(Some((Msg::Running, _))) => {}
            _ => return Err(fail(anyhow!("the restored job did not start"))),
        }
    }
    phases.mark("running");
    if job.terminal.is_some() {
        terminal::redraw();
    }
    if let Some(r) = report {
        // A migration's source lets its copy go once told the job runs here: the job must have run past its
        // restart, not merely been made. One that fails at once (a signal, an error exit) is reported, and the
        // source keeps its copy; one that ends well that soon has done its work.
        let mut ended = [PollFd::new(started.status.as_fd(), PollFlags::POLLIN)];
        if poll(&mut ended, PollTimeout::from(SETTLE_MS)).is_ok_and(|n| n > 0) {
            let mut b = [0u8; 4];
            let st = std::io::Read::read_exact(&mut &started.status, &mut b).map(|_| i32::from_le_bytes(b));
            let _ = nix::sys::wait::waitpid(started.init, None);
            match st {
                Ok(0) => {
                    let _ = nix::unistd::write(&r, format!("running {name}\n").as_bytes());
                    std::process::exit(0);
                }
                Ok(st) if st & 0x7f != 0 => bail!("the restored job was killed by signal {} at once", st & 0x7f),
                Ok(st) => bail!("the restored job exited with status {} at once", (st >> 8) & 0xff),
                Err(_) => bail!("the restored job ended at once"),
            }
        }
        let _ = nix::unistd::write(&r, format!("running {name}\n").as_bytes());
    }
    drop(ctls);
    drop(r);
    let opts = Options { name, ..opts };
    let mut sup = Supervisor::new(opts, reserved, listener, started, header.job.argv.clone(), header.job.started_unix_ns)?;
    sup.filling = filler;
    sup.run()
}

fn unsafe_borrow(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: the fd belongs to an object alive for the whole restore.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

/// The userfaultfd and the table of runs a restorer left to fill, sent after its report.
fn lazy_runs(ctl: &OwnedFd) -> Result<(OwnedFd, Vec<(u64, u64)>)> {
    let mut table = vec![0u8; plan::MAX_LAZY_RUNS * vos::chunk::RUN_LEN];
    let mut iov = [std::io::IoSliceMut::new(&mut table)];
    let mut space = nix::cmsg_space!(RawFd);
    let m = nix::sys::socket::recvmsg::<()>(ctl.as_raw_fd(), &mut iov, Some(&mut space), nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC)?;
    let n = m.bytes;
    let fd = m.cmsgs()?.find_map(|c| match c {
        nix::sys::socket::ControlMessageOwned::ScmRights(f) => f.first().copied(),
        _ => None,
    });
    let fd = fd.ok_or_else(|| anyhow!("the restorer's pages to fill came without their userfaultfd"))?;
    let runs = table[..n].chunks_exact(vos::chunk::RUN_LEN).map(|r| {
        let run = vos::chunk::PageRun::decode(r);
        (run.addr, run.addr + run.len)
    });
    Ok((crate::os::owned(fd), runs.collect()))
}

/// Wait for a restorer's report on `ctl`, noticing if the job died instead.
/// Progress of the restorers through an image file.
struct ImageRead {
    bar: Progress,
    fd: RawFd,
    size: Option<u64>,
}

impl ImageRead {
    fn new(fd: RawFd, quiet: bool) -> ImageRead {
        let size = nix::sys::stat::fstat(unsafe_borrow(fd)).ok().filter(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG).map(|st| st.st_size as u64);
        ImageRead { bar: Progress::new("restore", quiet, std::time::Duration::from_secs(1)), fd, size }
    }

    fn show(&mut self) {
        if self.size.is_some() {
            let at = nix::unistd::lseek(unsafe_borrow(self.fd), 0, nix::unistd::Whence::SeekCur).map_or(0, |o| o as u64);
            self.bar.show(at, self.size, at, "");
        }
    }
}

/// Wait for the report of the restorer of process `at` (on `all[at]`); `tick` is called every quarter second
/// meanwhile. The restorers after it may fail first (this one then waits for them for ever): a failure they
/// report, or their end, ends the wait too; so does the end of the job's main process, with the reason an earlier
/// process's restart gave, if one did.
/// The failure a restorer reported, if one did (without waiting).
fn restorer_said(ctls: &[OwnedFd]) -> Option<anyhow::Error> {
    ctls.iter().find_map(|c| {
        let mut buf = vec![0u8; std::mem::size_of::<plan::RestorerReport>()];
        let n = nix::sys::socket::recv(c.as_raw_fd(), &mut buf, nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT).ok()?;
        let rep = plan::RestorerReport::from_bytes(&buf[..n])?;
        (rep.status != plan::REPORT_OK).then(|| anyhow!("{}", rep.message()))
    })
}

fn wait_report(all: &[OwnedFd], at: usize, status: &File, all_procs: &[ProcessImage], tick: &mut dyn FnMut()) -> Result<plan::RestorerReport> {
    let (ctls, procs) = (&all[at..], &all_procs[at..]);
    let pid = procs[0].pid;
    // Later restorers that reported success already: not watched any more (their report stays queued).
    let mut fine = vec![false; ctls.len()];
    loop {
        let mut fds = vec![PollFd::new(status.as_fd(), PollFlags::POLLIN)];
        let watched: Vec<usize> = (0..ctls.len()).filter(|&i| !fine[i]).collect();
        fds.extend(watched.iter().map(|&i| PollFd::new(ctls[i].as_fd(), PollFlags::POLLIN)));
        match poll(&mut fds, PollTimeout::from(250u16)) {
            Ok(0) => tick(),
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => bail!("poll: {e}"),
        }
        let ready = |k: usize| fds[k].revents().is_some_and(|r| !r.is_empty());
        if ready(1) {
            break;
        }
        for (k, &i) in watched.iter().enumerate().skip(1) {
            if !ready(k + 1) {
                continue;
            }
            let mut buf = vec![0u8; std::mem::size_of::<plan::RestorerReport>()];
            match nix::sys::socket::recv(ctls[i].as_raw_fd(), &mut buf, nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT) {
                Ok(0) => bail!("the restorer of pid {} ended without a word", procs[i].pid),
                Ok(n) => match plan::RestorerReport::from_bytes(&buf[..n]) {
                    Some(rep) if rep.status != plan::REPORT_OK => bail!("{}", rep.message()),
                    _ => fine[i] = true,
                },
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
                Err(e) => bail!("the restorer of pid {}: {e}", procs[i].pid),
            }
        }
        if ready(0) {
            for (c, p) in all[..at].iter().zip(all_procs) {
                let mut buf = vec![0u8; proto::MAX_MSG];
                let peeked = nix::sys::socket::recv(c.as_raw_fd(), &mut buf, nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT);
                if let Some(Msg::RestoreFailed { why }) = peeked.ok().and_then(|n| proto::decode(&buf[..n])) {
                    bail!("restoring pid {} failed: {why}", p.pid);
                }
            }
            match at {
                0 => bail!("the restore failed: the job's main process ended (pid {pid} never reported)"),
                _ => bail!("the restore failed: the job's main process (pid {}) ended after its memory was restored", all_procs[0].pid),
            }
        }
    }
    let ctl = &ctls[0];
    let mut buf = vec![0u8; proto::MAX_MSG];
    let n = loop {
        match nix::sys::socket::recv(ctl.as_raw_fd(), &mut buf, nix::sys::socket::MsgFlags::empty()) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => break r?,
        }
    };
    if n == 0 {
        bail!("the restorer of pid {pid} ended without a word");
    }
    let rep = plan::RestorerReport::from_bytes(&buf[..n]).ok_or_else(|| anyhow!("the restorer sent something unexpected"))?;
    if rep.status != plan::REPORT_OK {
        bail!("{}", rep.message());
    }
    Ok(rep)
}

/// `--map OLD=NEW`: every path of the job under OLD (a whole path component) moves under NEW.
fn rebind_paths(job: &mut JobImage, map: &[(String, String)]) {
    if map.is_empty() {
        return;
    }
    let mut map = map.to_vec();
    map.sort_by_key(|(old, _)| std::cmp::Reverse(old.len()));
    job.paths_mut(&mut |p| {
        if let Some(new) = rebound(p, &map) {
            *p = new;
        }
    });
}

/// Path `p` under the first prefix of `map` that holds it (a whole path component: `/a` holds `/a/b`, not `/ab`),
/// moved under that prefix's new place; None if no prefix holds it. Longer prefixes should come first.
fn rebound(p: &str, map: &[(String, String)]) -> Option<String> {
    let (old, new) = map.iter().find(|(old, _)| p.starts_with(old.as_str()) && (p.len() == old.len() || old == "/" || p.as_bytes()[old.len()] == b'/'))?;
    let rest = if old == "/" { &p[1..] } else { p[old.len()..].trim_start_matches('/') };
    Some(if rest.is_empty() { new.clone() } else { format!("{}/{rest}", new.trim_end_matches('/')) })
}

/// Every file the job maps or has open must still be there, and mapped files unchanged: named here, before
/// anything is restored. Returns, by path, the files found to be what the image needs (`Fds::file` opens them
/// later, in the job's mount namespace, and checks again that it got those).
/// Files a process maps are opened with its own credentials (`auth`), open files with theirs.
fn check_files(job: &JobImage, auth: &creds::Authority) -> Result<HashMap<String, identity::Stamp>> {
    let mut verified = HashMap::new();
    let mut checked = std::collections::HashSet::new();
    for p in &job.processes {
        let who = auth.for_process(p);
        for (f, private) in std::iter::once((&p.exe, true)).chain(p.regions.iter().filter_map(|r| Some((r.file.as_ref()?, !r.shared)))) {
            let carried = job.bundle.iter().any(|b| b.dev == f.dev && b.ino == f.ino);
            if carried || !checked.insert((&f.path, private, who.clone())) {
                continue;
            }
            let (fd, _) = creds::as_user(who.as_ref(), || pathopen::open(&f.path, libc::O_RDONLY, pathopen::Want::Regular))
                .map_err(|e| anyhow!("{}, mapped by pid {}: {e}", f.path, p.pid))?;
            if private {
                let st = identity::check(f, &File::from(fd), None).map_err(|e| anyhow!("pid {}: {e}", p.pid))?;
                verified.insert(f.path.clone(), st);
            }
        }
        // A working directory only root reaches (an image root vouches for says so) is entered before the process
        // drops to its own credentials.
        let cwd_as = if p.attrs.creds.as_ref().is_some_and(|c| c.privileged_cwd) { None } else { who.clone() };
        creds::as_user(cwd_as.as_ref(), || Ok(std::fs::metadata(&p.attrs.cwd)?))
            .map_err(|e| anyhow!("the working directory {} of pid {} is missing: {e}", p.attrs.cwd, p.pid))?;
    }
    for f in &job.files {
        let path = match &f.kind {
            FileKind::Regular { file } => &file.path,
            FileKind::Dir { path } | FileKind::Device { path } => path,
            FileKind::Pipe { pipe, .. } => match &job.pipes[*pipe as usize].fifo {
                Some(p) => p,
                None => continue,
            },
            _ => continue,
        };
        creds::as_user(auth.for_file(f).as_ref(), || Ok(std::fs::symlink_metadata(path)?)).map_err(|e| anyhow!("{path}, open in the job, is missing: {e}"))?;
    }
    Ok(verified)
}

#[cfg(test)]
mod tests {
    use super::rebound;

    fn m(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn prefixes_match_whole_components() {
        let map = m(&[("/data/run", "/scratch/r"), ("/data", "/mnt/d"), ("/", "/chroot")]);
        assert_eq!(rebound("/data/run/x.log", &map).as_deref(), Some("/scratch/r/x.log"));
        assert_eq!(rebound("/data/run", &map).as_deref(), Some("/scratch/r"));
        assert_eq!(rebound("/data/runner", &map).as_deref(), Some("/mnt/d/runner"));
        assert_eq!(rebound("/database", &map).as_deref(), Some("/chroot/database"));
        assert_eq!(rebound("/data/", &m(&[("/data", "/x/")])).as_deref(), Some("/x/"));
        assert_eq!(rebound("/etc/passwd", &m(&[("/data", "/x")])), None);
    }

    proptest::proptest! {
        /// Moving a tree and moving it back gives every path under it back, and paths outside it are untouched.
        #[test]
        fn moving_there_and_back_is_the_identity(
            old in "(/[a-z]{1,3}){1,3}", new in "/new(/[a-z]{1,3}){0,2}", tail in "(/[a-z.]{1,4}){0,3}", other in "/[a-z]{1,3}(/[a-z]{1,3}){0,2}"
        ) {
            let p = format!("{old}{tail}");
            let there = rebound(&p, &m(&[(&old, &new)])).expect("under the prefix");
            let under_new = there == new || there.starts_with(&(new.clone() + "/"));
            proptest::prop_assert!(under_new);
            proptest::prop_assert_eq!(rebound(&there, &m(&[(&new, &old)])), Some(p));
            let inside = other == old || other.starts_with(&(old.clone() + "/"));
            proptest::prop_assert_eq!(rebound(&other, &m(&[(&old, &new)])).is_some(), inside);
        }
    }
}
