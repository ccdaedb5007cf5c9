//! `vrun restore`: check an image against this host, recreate what the job's processes share, plan every
//! process's address space for the restorer, start the job again in fresh namespaces, and supervise it.
//!
//! Order of events: the header and the job's metadata are read and checked (host, CPU, vDSO, every file the job
//! used) before anything is created; the supervisor opens or makes every open file, pipe, socket and piece of
//! shared memory; init starts the restorer as the job's top-level processes, which make the rest of the tree with
//! the original pids; each restorer maps its process's memory and reads its page chunks (in turn, from the same
//! stream); each process's shim rebuilds fds, signals and threads and says it is ready; the launcher reads the end
//! of the image, gives the terminal to the job's foreground group, and only if the image is whole lets the job run.

use crate::imagefile::{Reader, Trust};
use crate::ns::{self, Child, ClockOffsets};
use crate::progress::Progress;
use crate::supervisor::{self, Options, Supervisor};
use crate::{bundle, creds, files, host, identity, job, pathopen, runtime, sysv, terminal, vdso};
use anyhow::{Context, Result, anyhow, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType};
use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use vos::image::{Contents, FileKind, JobImage, ProcessImage, RegionKind, RestartSpec, VMF_GROWSDOWN, VMF_MAYWRITE};
use vos::plan::{self, JobPlanHead, MapOp, PlanHead, PrctlMmMap, ProcEntry};
use vos::proto::{self, Msg};

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

pub fn run(a: Args, restorer: PathBuf, shim: PathBuf) -> Result<std::convert::Infallible> {
    let mut phases = Phases(std::env::var_os("VOS_TIMING").map(|_| std::time::Instant::now()));
    // SAFETY: the fd was handed to us for this alone; owning it closes it on every path, and CLOEXEC keeps it
    // out of the job.
    let report = a.report_fd.map(|fd| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    if let Some(r) = &report {
        nix::fcntl::fcntl(r, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC)).context("--report-fd")?;
    }
    let key = crate::sign::resolve(a.image_key.as_deref())?;
    // A restore for `vrun serve` (--report-fd) takes what its authenticated connection delivered.
    let trust = Trust { key: key.as_ref(), unsigned_ok: a.trust_unsigned, channel: a.report_fd.is_some() };
    let mut r = Reader::open(&a.src, trust)?;
    let header = r.header()?;
    let here = host::current();
    host::check(&header.host, &here).map_err(|e| anyhow!("cannot restore {} here: {e}", r.name))?;
    let swap = vdso::swap(&header.host.vdso, &here.vdso).map_err(|e| anyhow!("cannot restore {} here: {e}", r.name))?;
    let mut job = r.job()?;
    rebind_paths(&mut job, &a.map);
    crate::inet::rebind(&mut job, &a.map_addr)?;
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
            let r = runtime::reserve_like(&header.job.name)?;
            if r.name() != header.job.name && !opts.quiet {
                eprintln!("vrun: job {} is restored as {}", crate::escape::escape(&header.job.name), r.name());
            }
            Some(r)
        }
    };
    let name = match (&early, &a.name) {
        (Some(r), _) => r.name().to_string(),
        (None, n) => n.clone().unwrap_or_default(),
    };
    let log = runtime::log_path(&name)?;
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
    let now = |c| nix::time::clock_gettime(c).map(|t| t.tv_sec() as i64 * 1_000_000_000 + t.tv_nsec() as i64);
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
        sysv: job.sysv.clone(),
        sysv_contents: sysv_contents.iter().map(|f| f.as_raw_fd()).collect(),
    };
    // Pre-copied pages are filled after the job resumes, by a process of their own, started before the job's
    // namespaces exist.
    let filler = match a.fill_fd {
        Some(fd) => Some(ns::owned(fd)),
        None if a.bases.is_empty() => None,
        None => Some(crate::fill::start(&a.bases)?),
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
        None => runtime::reserve_when_free(&name, std::time::Duration::from_secs(10)).map_err(fail)?,
    };
    sysv::remove_destroyed(started.init.as_raw(), &job.sysv).map_err(fail)?;
    if let Some(t) = &job.terminal {
        terminal::hand_over(t, &job::members(started.init).map_err(fail)?);
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

/// What of a process the shim's restart code needs: not its memory map (the restorer made it; a job with
/// hundreds of thousands of mappings would otherwise make a plan too large), not its program or auxv.
fn for_restart(p: &ProcessImage) -> ProcessImage {
    ProcessImage { regions: vec![], argv: vec![], exe: Default::default(), mm: Default::default(), ..p.clone() }
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
    Ok((crate::ns::owned(fd), runs.collect()))
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
        let hit = map.iter().find(|(old, _)| p.starts_with(old.as_str()) && (p.len() == old.len() || old == "/" || p.as_bytes()[old.len()] == b'/'));
        if let Some((old, new)) = hit {
            let rest = if old == "/" { &p[1..] } else { p[old.len()..].trim_start_matches('/') };
            *p = if rest.is_empty() { new.clone() } else { format!("{}/{rest}", new.trim_end_matches('/')) };
        }
    });
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

/// The job's processes, live ones first in image order, then zombies, as the restorer's plan lists them.
fn entries(job: &JobImage) -> Vec<ProcEntry> {
    let live = job.processes.iter().enumerate().map(|(i, p)| ProcEntry {
        pid: p.pid,
        ppid: p.ppid,
        pgid: p.pgid,
        sid: p.sid,
        order: i as u32,
        ..Default::default()
    });
    let zombies = job.zombies.iter().map(|z| ProcEntry {
        pid: z.ids.pid,
        ppid: z.ids.ppid,
        pgid: z.ids.pgid,
        sid: z.ids.sid,
        zombie: 1,
        status: z.status,
        ..Default::default()
    });
    live.chain(zombies).collect()
}

fn align8(v: &mut Vec<u8>) {
    while v.len() % 8 != 0 {
        v.push(0);
    }
}

/// The job's plan in a memfd: head, process entries, the shared sync page, then each process's plan.
fn job_plan(job: &JobImage, plans: &[(Vec<u8>, usize)]) -> Result<OwnedFd> {
    let mut es = entries(job);
    let head_len = std::mem::size_of::<JobPlanHead>();
    let procs_off = head_len;
    let sync_off = (procs_off + es.len() * std::mem::size_of::<ProcEntry>()).next_multiple_of(4096);
    let mut body: Vec<u8> = vec![0; sync_off + 4096];
    for (plan, i) in plans {
        align8(&mut body);
        es[*i].plan_off = body.len() as u64;
        let base = body.len() as u64;
        body.extend_from_slice(&rebase(plan, base));
    }
    let head = JobPlanHead {
        magic: plan::JOB_PLAN_MAGIC,
        nproc: es.len() as u32,
        nleaders: es.iter().filter(|e| e.pgid == e.pid).count() as u32,
        procs_off: procs_off as u64,
        sync_off: sync_off as u64,
        total_len: body.len() as u64,
    };
    // SAFETY: repr(C) plain data.
    unsafe {
        body[..head_len].copy_from_slice(plan::bytes_of(&head));
        for (i, e) in es.iter().enumerate() {
            let o = procs_off + i * std::mem::size_of::<ProcEntry>();
            body[o..o + std::mem::size_of::<ProcEntry>()].copy_from_slice(plan::bytes_of(e));
        }
    }
    if body.len() > plan::MAX_PLAN {
        bail!("the restore plan is too large ({} bytes)", body.len());
    }
    let fd = nix::sys::memfd::memfd_create(c"vos-plan", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
    let mut f = File::from(fd);
    f.write_all(&body)?;
    Ok(f.into())
}

/// A process plan is built with offsets from its own start; shift them to where it lands in the job plan.
fn rebase(plan: &[u8], base: u64) -> Vec<u8> {
    let mut v = plan.to_vec();
    // SAFETY: the plan starts with a PlanHead (plain data); read and write unaligned copies.
    unsafe {
        let mut h: PlanHead = std::ptr::read_unaligned(v.as_ptr() as *const PlanHead);
        h.ops_off += base;
        h.auxv_off += base;
        h.blob_off += base;
        h.guards_off += base;
        std::ptr::write_unaligned(v.as_mut_ptr() as *mut PlanHead, h);
        for i in 0..h.nmaps as usize {
            let o = (h.ops_off - base) as usize + i * std::mem::size_of::<MapOp>();
            let mut op: MapOp = std::ptr::read_unaligned(v.as_ptr().add(o) as *const MapOp);
            op.shift(base);
            std::ptr::write_unaligned(v.as_mut_ptr().add(o) as *mut MapOp, op);
        }
    }
    v
}

/// How many fd numbers a restore of `job` needs in each restored process (`Fds`: above the job's own highest fd,
/// one per open file, piece of shared memory, carried or mapped file, and a few of its own), so that a checkpoint
/// can refuse a job no restore could take (`ns::arrange_fds` lays them out within the hard open-file limit).
pub fn fds_needed(job: &JobImage) -> u64 {
    let top = job.processes.iter().flat_map(|p| p.fds.iter().map(|f| f.fd as u64 + 1)).max().unwrap_or(0).max(10);
    let mapped: std::collections::HashSet<&str> =
        job.processes.iter().flat_map(|p| p.regions.iter().filter_map(|r| r.file.as_ref()).map(|f| f.path.as_str()).chain([p.exe.path.as_str()])).collect();
    let objects = job.files.len() + job.shared_memory.len() + job.bundle.len() + mapped.len() + 2 * job.processes.len() + 3;
    top + objects as u64 + 16
}

/// About how large the restore plan of `job` will be (`job_plan`): a map op and its name per mapping, and the
/// restart spec per process. A checkpoint refuses a job whose plan no restore could take (`plan::MAX_PLAN`).
pub fn plan_size(job: &JobImage) -> u64 {
    let per_process: u64 = job
        .processes
        .iter()
        .map(|p| {
            let spec = rmp_serde::to_vec_named(&for_restart(p)).map_or(0, |v| v.len() as u64);
            let names: u64 = p.regions.iter().map(|r| r.name.len() as u64 + 8).sum();
            p.regions.len() as u64 * std::mem::size_of::<MapOp>() as u64 + names + p.mm.auxv.len() as u64 + spec + 4096
        })
        .sum();
    per_process + ((job.processes.len() + job.zombies.len()) * std::mem::size_of::<ProcEntry>()) as u64 + 2 * 4096
}

/// The fds the restored processes inherit, at numbers above every fd of the job.
struct Fds {
    next: i32,
    list: Vec<(RawFd, i32)>,
    /// Files opened for mappings, by path, for writing, privately, and whose credentials opened them (shared by
    /// every process that maps them with the same).
    by_path: HashMap<(String, bool, bool, Option<vos::image::FsCreds>), i32>,
    /// Carried files (`bundle`), by the checkpoint host's (dev, ino): mapped instead of the host's.
    bundled: HashMap<(u64, u64), i32>,
    /// Files `check_files` found to be what the image needs, by path.
    verified: HashMap<String, identity::Stamp>,
    /// Whose credentials the files of the process being planned are opened with (its own).
    who: Option<vos::image::FsCreds>,
}

impl Fds {
    fn new(job: &JobImage, verified: HashMap<String, identity::Stamp>) -> Fds {
        let top = job.processes.iter().flat_map(|p| p.fds.iter().map(|f| f.fd + 1)).max().unwrap_or(0);
        Fds { next: top.max(10), list: vec![], by_path: HashMap::new(), bundled: HashMap::new(), verified, who: None }
    }
    fn reserve(&mut self) -> i32 {
        self.next += 1;
        self.next - 1
    }
    fn put(&mut self, fd: RawFd) -> i32 {
        let n = self.reserve();
        self.list.push((fd, n));
        n
    }
    fn set(&mut self, n: i32, fd: RawFd) {
        self.list.push((fd, n));
    }
    /// A file to map, opened once for the whole job (its carried copy when the image has one): a regular file,
    /// and for a private mapping (`private`) the very file the image needs. Only a shared mapping that may be
    /// written (`write`) opens it for writing; page data never goes into it (`MapOp::fillable`).
    fn file(&mut self, id: &vos::image::FileId, private: bool, write: bool, keep: &mut Vec<OwnedFd>) -> Result<i32> {
        let write = write && !private;
        if let Some(&n) = self.bundled.get(&(id.dev, id.ino)).filter(|_| !write) {
            return Ok(n);
        }
        let path = id.path.as_str();
        let key = (path.to_string(), write, private, self.who.clone());
        if let Some(&n) = self.by_path.get(&key) {
            return Ok(n);
        }
        let flags = if write { libc::O_RDWR } else { libc::O_RDONLY };
        let (fd, _) = creds::as_user(self.who.as_ref(), || pathopen::open(path, flags, pathopen::Want::Regular)).with_context(|| format!("opening {path}"))?;
        let f = File::from(fd);
        if private {
            identity::check(id, &f, self.verified.get(path).copied())?;
        }
        let n = self.put(f.as_raw_fd());
        keep.push(f.into());
        self.by_path.insert(key, n);
        Ok(n)
    }
}

pub(crate) fn memfd(name: &str, size: u64) -> Result<OwnedFd> {
    let n = CString::new(format!("vos:{}", name.trim_start_matches('/')).replace(" (deleted)", "")).unwrap_or_default();
    let fd = nix::sys::memfd::memfd_create(n.as_c_str(), nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
    nix::unistd::ftruncate(&fd, size as i64)?;
    Ok(fd)
}

/// One process's plan, with offsets from its own start (see `rebase`).
#[allow(clippy::too_many_arguments)]
fn process_plan(
    p: &ProcessImage,
    spec: &RestartSpec,
    fds: &mut Fds,
    keep: &mut Vec<OwnedFd>,
    image_fd: i32,
    ctl_fd: i32,
    shm_at: &[i32],
    shm_size: &[u64],
    first_seq: u64,
    swap: Option<&vdso::Swap>,
    base_fd: i32,
) -> Result<Vec<u8>> {
    let mut regions: Vec<_> = p.regions.iter().collect();
    regions.sort_by_key(|r| r.start);
    let find = |k: RegionKind| regions.iter().find(|r| r.kind == k).copied();
    let (vdso_addr, vdso_text) = match (find(RegionKind::Vvar), find(RegionKind::VvarVclock), find(RegionKind::Vdso)) {
        (Some(a), Some(b), Some(c)) if a.end == b.start && b.end == c.start => (a.start, c.start),
        (Some(a), None, Some(c)) if a.end == c.start => (a.start, c.start),
        (None, None, None) => (0, 0),
        _ => bail!("pid {}: the image's vDSO layout is not one this kernel makes", p.pid),
    };
    let mut ops: Vec<MapOp> = vec![];
    let mut names: Vec<(usize, Vec<u8>)> = vec![];
    // Bytes the plan carries for OP_COPY regions, by op index.
    let mut copies: Vec<(usize, Vec<u8>)> = vec![];
    let (vdso_addr, vdso_text) = match swap {
        Some(s) => {
            let rips: Vec<u64> = p.threads.iter().map(|t| t.rip).collect();
            let (addr, text, old) = s.plan(&regions, &rips).map_err(|e| anyhow!("pid {}: {e}", p.pid))?;
            for (op, bytes) in old {
                if let Some(b) = bytes {
                    copies.push((ops.len(), b));
                }
                ops.push(op);
            }
            (addr, text)
        }
        None => (vdso_addr, vdso_text),
    };
    for r in &regions {
        if matches!(r.kind, RegionKind::Vdso | RegionKind::Vvar | RegionKind::VvarVclock) {
            continue;
        }
        let mut op = MapOp { addr: r.start, len: r.end - r.start, prot: r.prot, fd: -1, ..Default::default() };
        op.flags = (if r.shared { libc::MAP_SHARED } else { libc::MAP_PRIVATE }) as u32;
        match (r.kind, r.shared_memory, &r.file) {
            (RegionKind::SharedAnon, Some(m), _) => {
                // A memfd or unnamed file this restore made: the one shared mapping page data may go into.
                op.fd = shm_at[m as usize];
                op.offset = r.offset;
                op.op |= plan::OP_OWNED;
            }
            (RegionKind::SysvShm, _, _) => {
                op.op |= plan::OP_SHMAT;
                op.shmid = r.ino as i32;
                op.offset = r.offset;
                op.flags = if r.vmflags & VMF_MAYWRITE != 0 { 0 } else { libc::SHM_RDONLY as u32 };
            }
            // Pages past the end of a file no restore finds (a memfd, a deleted file): a private mapping of an empty
            // memfd, where touching a page faults with SIGBUS as it did.
            (RegionKind::Detached, _, _) if r.contents == Contents::Nothing => {
                // A memfd's own name, so /proc shows the mapping as before.
                let fd = match r.name.strip_prefix("/memfd:").and_then(|n| n.strip_suffix(" (deleted)")).and_then(|n| CString::new(n).ok()) {
                    Some(n) => nix::sys::memfd::memfd_create(n.as_c_str(), nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?,
                    None => memfd(&r.name, 0)?,
                };
                op.fd = fds.put(fd.as_raw_fd());
                keep.push(fd);
                op.offset = r.offset;
            }
            (RegionKind::File, _, Some(f)) => {
                op.fd = fds.file(f, !r.shared, r.prot & libc::PROT_WRITE as u32 != 0, keep)?;
                op.offset = r.offset;
            }
            _ => op.flags |= libc::MAP_ANONYMOUS as u32,
        }
        if r.contents == Contents::Pages {
            op.op |= plan::OP_FILL;
        }
        if r.vmflags & VMF_GROWSDOWN != 0 {
            op.op |= plan::OP_GROWSDOWN;
        }
        // vmflags bits 1.. line up with plan::ADVICE.
        op.advice = (r.vmflags >> 1) & 0x3f;
        if let Some(n) = r.name.strip_prefix("[anon:").and_then(|n| n.strip_suffix(']')) {
            let mut v = n.as_bytes().to_vec();
            v.push(0);
            names.push((ops.len(), v));
        }
        // Shared memory mapped past its object's end: page data may go only where the object is (beyond, a
        // write would fault), so that part is mapped apart, taking none.
        let room = match (r.kind, r.shared_memory) {
            (RegionKind::SharedAnon, Some(m)) => shm_size[m as usize].next_multiple_of(4096).saturating_sub(op.offset).min(op.len),
            _ => op.len,
        };
        if room < op.len {
            let rest = MapOp { addr: op.addr + room, len: op.len - room, offset: op.offset + room, op: op.op & !plan::OP_FILL, name_len: 0, ..op };
            op.len = room;
            if room > 0 {
                ops.push(op);
            }
            ops.push(rest);
            continue;
        }
        ops.push(op);
    }
    let exe_fd = fds.file(&p.exe, true, false, keep)?;
    let head_len = std::mem::size_of::<PlanHead>();
    let ops_off = head_len as u64;
    let mut blob: Vec<u8> = vec![];
    let mut add = |b: &[u8]| {
        align8(&mut blob);
        let off = blob.len();
        blob.extend_from_slice(b);
        (off as u64, b.len() as u64)
    };
    let (auxv_off, auxv_len) = add(&p.mm.auxv);
    for (i, n) in names {
        let (off, len) = add(&n);
        ops[i].name_off = off;
        ops[i].name_len = len;
    }
    for (i, b) in copies {
        let (off, len) = add(&b);
        ops[i].data_off = off;
        ops[i].data_len = len;
    }
    let guards: Vec<u8> = regions
        .iter()
        .flat_map(|r| r.guards.iter().filter(|&&(a, b)| r.start <= a && a < b && b <= r.end))
        .flat_map(|&(a, b)| a.to_le_bytes().into_iter().chain((b - a).to_le_bytes()))
        .collect();
    let (guards_off, guards_len) = add(&guards);
    // The restorer takes regions in address order (and refuses others): the vDSO's copies go among the rest.
    ops.sort_by_key(|o| o.addr);
    let (blob_off, blob_len) = add(&rmp_serde::to_vec_named(spec)?);
    let blob_base = ops_off + (ops.len() * std::mem::size_of::<MapOp>()) as u64;
    for op in ops.iter_mut() {
        op.shift(blob_base);
    }
    let m = &p.mm;
    let head = PlanHead {
        magic: plan::PLAN_MAGIC,
        nmaps: ops.len() as u32,
        base_fd,
        ops_off,
        image_fd,
        ctl_fd,
        exe_fd,
        first_seq,
        vdso_addr,
        vdso_text,
        mm: PrctlMmMap {
            start_code: m.start_code,
            end_code: m.end_code,
            start_data: m.start_data,
            end_data: m.end_data,
            start_brk: m.start_brk,
            brk: m.brk,
            start_stack: m.start_stack,
            arg_start: m.arg_start,
            arg_end: m.arg_end,
            env_start: m.env_start,
            env_end: m.env_end,
            auxv: 0,
            auxv_size: 0,
            exe_fd: exe_fd as u32,
        },
        auxv_off: blob_base + auxv_off,
        auxv_len,
        restart_entry: p.shim.restart_entry,
        restart_stack_top: p.shim.restart_stack_top,
        blob_off: blob_base + blob_off,
        blob_len,
        guards_off: blob_base + guards_off,
        nguards: guards_len / 16,
    };
    let mut out = Vec::with_capacity(blob_base as usize + blob.len());
    // SAFETY: PlanHead and MapOp are repr(C) plain data.
    unsafe {
        out.extend_from_slice(plan::bytes_of(&head));
        for op in &ops {
            out.extend_from_slice(plan::bytes_of(op));
        }
    }
    out.extend_from_slice(&blob);
    Ok(out)
}
