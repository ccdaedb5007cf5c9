//! The job's namespaces and its init.
//!
//! Every job runs in fresh pid, time, mount, UTS and IPC namespaces (plus a user namespace when not root): in its
//! pid namespace the job's processes and threads get their original ids back at restore (clone3 set_tid), its
//! time namespace lets CLOCK_MONOTONIC/BOOTTIME go on from the checkpoint instant, its UTS namespace keeps its
//! hostname, its IPC namespace keeps its System V objects apart and under their ids.
//! Pid 1 is a small init of ours, not the app (pid 1 ignores signals it has no handler for): it
//! mounts a /proc for the namespace, starts the app, reaps, and reports the app's wait status to the supervisor.

use anyhow::{Context, Result, anyhow, bail};
use nix::sched::CloneFlags;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

/// What init starts.
pub enum Child {
    /// A program, with its environment. It starts with the shim's signals blocked, as every exec in the job does
    /// (until its shim has its handlers in, one of them would end it).
    Exec { argv: Vec<CString>, env: Vec<CString>, shim_signals: [i32; 2] },
    /// The restorer, as each top-level process of the job (pid, index in the plan), with `fds` (source, number
    /// in the child) and nothing else open.
    /// `in_namespaces` runs in init first, in the job's fresh namespaces (it makes the System V objects there).
    Restore {
        tops: Vec<(i32, usize)>,
        restorer: CString,
        /// The supervisor made the job's mount namespace (`enter_job_mounts`) and init is in it.
        in_job_mounts: bool,
        plan_fd: i32,
        fds: Vec<(RawFd, i32)>,
        hostname: String,
        domainname: String,
        in_namespaces: Box<dyn FnOnce() -> anyhow::Result<()>>,
    },
}

/// The job's main process, the first child of its init: the job ends when it does.
pub const MAIN_PID: i32 = 2;

/// A started job.
pub struct Started {
    /// Init, as this host numbers it.
    pub init: Pid,
    /// The job's main process, as this host numbers it.
    pub app: Pid,
    /// Delivers the main process's wait status (4 bytes) when it ends.
    pub status: File,
}

/// Clock offsets for the job's time namespace, in nanoseconds.
#[derive(Clone, Copy, Default)]
pub struct ClockOffsets {
    pub monotonic: i64,
    pub boottime: i64,
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")
}

/// The user namespace a job runs in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserNs {
    /// Root's own, the initial one.
    Host,
    /// vrun without root: a namespace of the user's own, mapping only its uid and gid.
    Own,
    /// Root restoring a job that ran in vrun's user namespace (launched without root): one like it again, mapping
    /// the job's uid and gid (and root, the supervisor itself, which stays root there), with the job's
    /// supplementary groups, which nothing in it can change.
    For { uid: u32, gid: u32, groups: Vec<u32> },
}

impl UserNs {
    /// The job's user namespace when nothing else is asked: root's own for root, the user's own otherwise.
    pub fn default_here() -> UserNs {
        if nix::unistd::geteuid().is_root() { UserNs::Host } else { UserNs::Own }
    }
}

/// Enter new namespaces for our children and start init there, which starts `child`.
/// `own_mounts`: the supervisor's mount namespace, when it made the job's (`enter_job_mounts`); it goes back to
/// it as soon as init is forked, before init mounts the job's /proc.
/// `supervisor_only`: fds init closes at once (init is forked and never execs, so close-on-exec does not keep them
/// from it): the registry entry's lock, held by init, would outlive the supervisor and keep its job's name.
/// `userns`: the user namespace the job runs in.
pub fn start(child: Child, clocks: ClockOffsets, own_mounts: Option<OwnMounts>, supervisor_only: &[RawFd], userns: UserNs) -> Result<Started> {
    match &userns {
        UserNs::Host => {}
        UserNs::Own => enter_user_namespace()?,
        UserNs::For { uid, gid, groups } => enter_user_namespace_for(*uid, *gid, groups)?,
    }
    nix::sched::unshare(CloneFlags::CLONE_NEWPID | CloneFlags::from_bits_retain(libc::CLONE_NEWTIME))
        .map_err(|e| anyhow!("cannot create the job's pid and time namespaces: {e} (vOS needs root or user namespaces)"))?;
    set_clock_offsets(clocks)?;
    let (status_r, status_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    // SAFETY: the launcher is single-threaded here; the child only runs init's code.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            drop(status_r);
            drop(err_r);
            for &fd in supervisor_only {
                // SAFETY: the supervisor's fds, not used by init; closed without their owners' destructors (which
                // would unlock what the supervisor holds), and those never run here (init leaves by _exit).
                unsafe { libc::close(fd) };
            }
            let code = match init(child, status_w, err_w) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("vrun: init: {e:#}");
                    1
                }
            };
            // SAFETY: leave the forked child without running the launcher's destructors.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child: init_pid } => {
            if let Some(m) = own_mounts {
                leave_mounts(m)?;
            }
            drop(status_w);
            drop(err_w);
            // The child's exec (or its failure) closes the error pipe; 4 bytes mean it failed with that errno.
            let mut f = File::from(err_r);
            let mut b = [0u8; 4];
            let mut n = 0;
            while n < 4 {
                match f.read(&mut b[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if n == 4 {
                let _ = nix::sys::signal::kill(init_pid, nix::sys::signal::Signal::SIGKILL);
                let _ = waitpid(init_pid, None);
                let errno = i32::from_le_bytes(b);
                return Err(anyhow!(std::io::Error::from_raw_os_error(errno)));
            }
            let app = child_of(init_pid, &status_r)?;
            Ok(Started { init: init_pid, app, status: File::from(status_r) })
        }
    }
}

/// The only child of init (the job's main process), as this host numbers it. A program that ended at once may
/// be gone before it is seen: init has then written its status (`status`), and init itself stands in for it
/// (the supervisor reads that status next; a signal forwarded meanwhile reaches init, which ignores it).
fn child_of(init: Pid, status: &OwnedFd) -> Result<Pid> {
    let path = format!("/proc/{init}/task/{init}/children");
    for _ in 0..2000 {
        let s = std::fs::read_to_string(&path).unwrap_or_default();
        if let Some(p) = s.split_whitespace().next().and_then(|p| p.parse().ok()) {
            return Ok(Pid::from_raw(p));
        }
        let mut ended = [nix::poll::PollFd::new(status.as_fd(), nix::poll::PollFlags::POLLIN)];
        if nix::poll::poll(&mut ended, nix::poll::PollTimeout::ZERO).is_ok_and(|n| n > 0) {
            return Ok(init);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    bail!("the job's first process did not start")
}

/// Root makes a user namespace for a job that ran in one (`UserNs::For`): with the job's supplementary groups,
/// mapping the job's uid and gid and root's own. A process inside cannot write mappings that name ids other than
/// its own: a child left outside writes them (as `newuidmap` would), once we are in.
fn enter_user_namespace_for(uid: u32, gid: u32, groups: &[u32]) -> Result<()> {
    let gids: Vec<nix::unistd::Gid> = groups.iter().map(|&g| nix::unistd::Gid::from_raw(g)).collect();
    nix::unistd::setgroups(&gids).context("taking the job's supplementary groups")?;
    note_host_groups();
    let (go_r, go_w) = pipe()?;
    let (done_r, done_w) = pipe()?;
    let me = std::process::id();
    // SAFETY: the launcher is single-threaded here; the child only writes three small files, then _exits.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            drop(go_w);
            drop(done_r);
            let mut b = [0u8; 1];
            let ok = (|| -> std::io::Result<()> {
                File::from(go_r).read_exact(&mut b)?;
                std::fs::write(format!("/proc/{me}/setgroups"), "deny")?;
                std::fs::write(format!("/proc/{me}/uid_map"), format!("0 0 1\n{uid} {uid} 1\n"))?;
                std::fs::write(format!("/proc/{me}/gid_map"), format!("0 0 1\n{gid} {gid} 1\n"))?;
                Ok(())
            })();
            let _ = File::from(done_w).write_all(&[ok.is_ok() as u8]);
            // SAFETY: leave the forked child without running the launcher's destructors.
            unsafe { libc::_exit(if ok.is_ok() { 0 } else { 1 }) }
        }
        ForkResult::Parent { child } => {
            drop(go_r);
            drop(done_w);
            let entered = nix::sched::unshare(CloneFlags::CLONE_NEWUSER);
            let _ = File::from(go_w).write_all(&[1]);
            let mut b = [0u8; 1];
            let mapped = File::from(done_r).read_exact(&mut b).is_ok() && b[0] == 1;
            let _ = waitpid(child, None);
            entered.map_err(|e| anyhow!("cannot create a user namespace for the job: {e}"))?;
            if !mapped {
                bail!("cannot map uid {uid} and gid {gid} in the job's user namespace");
            }
            Ok(())
        }
    }
}

fn enter_user_namespace() -> Result<()> {
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    note_host_groups();
    nix::sched::unshare(CloneFlags::CLONE_NEWUSER)
        .map_err(|e| anyhow!("cannot create a user namespace: {e}; vOS needs root or unprivileged user namespaces"))?;
    std::fs::write("/proc/self/setgroups", "deny")?;
    std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1"))?;
    std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1"))?;
    Ok(())
}

fn set_clock_offsets(c: ClockOffsets) -> Result<()> {
    if c.monotonic == 0 && c.boottime == 0 {
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new().write(true).open("/proc/self/timens_offsets")?;
    for (clock, off) in [(libc::CLOCK_MONOTONIC, c.monotonic), (libc::CLOCK_BOOTTIME, c.boottime)] {
        let (s, ns) = (off.div_euclid(1_000_000_000), off.rem_euclid(1_000_000_000));
        f.write_all(format!("{clock} {s} {ns}").as_bytes()).with_context(|| format!("setting the job's clock {clock} offset"))?;
    }
    Ok(())
}

/// A mount namespace of the caller's own, whose mounts do not leak out. (Under a chroot whose root is not a
/// mount point, / cannot be made a slave (EINVAL): the chroot's own mount namespace must keep them in.)
fn new_mount_namespace() -> Result<()> {
    use nix::mount::{MsFlags, mount};
    nix::sched::unshare(CloneFlags::CLONE_NEWNS).context("unshare the mount namespace")?;
    match mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) => Ok(()),
        Err(e) => Err(anyhow!("making / a slave mount: {e}")),
    }
}

/// At restore (as root) the supervisor opens the job's files in the mount namespace the job will have: a file
/// opened in another one shows in /proc/PID/maps with a path from that namespace's root, which under a chroot is
/// not the job's. Returns the supervisor's own namespace, to go back to once init has started (`leave_mounts`).
pub fn enter_job_mounts() -> Result<Option<OwnMounts>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let open = |p: &str| nix::fcntl::open(p, nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty());
    let own = OwnMounts { ns: File::open("/proc/self/ns/mnt")?, root: open("/")?, cwd: open(".")? };
    new_mount_namespace()?;
    Ok(Some(own))
}

/// The supervisor's mount namespace, root and working directory (setns resets the last two: under a chroot they
/// must be taken back).
pub struct OwnMounts {
    ns: File,
    root: OwnedFd,
    cwd: OwnedFd,
}

fn leave_mounts(own: OwnMounts) -> Result<()> {
    nix::sched::setns(own.ns, CloneFlags::CLONE_NEWNS).context("returning to the supervisor's mount namespace")?;
    nix::unistd::fchdir(&own.root)?;
    nix::unistd::chroot(".").context("returning to the supervisor's root")?;
    nix::unistd::fchdir(&own.cwd)?;
    Ok(())
}

/// Pid 1 of the job.
fn init(child: Child, status: OwnedFd, err: OwnedFd) -> Result<()> {
    // A restoring supervisor may have made the job's mount namespace already (`enter_job_mounts`).
    let in_job_mounts = matches!(child, Child::Restore { in_job_mounts: true, .. });
    if !in_job_mounts {
        new_mount_namespace()?;
    }
    nix::sched::unshare(CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC).context("unshare UTS and IPC namespaces")?;
    use nix::mount::{MsFlags, mount};
    mount(Some("proc"), "/proc", Some("proc"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC, None::<&str>)
        .context("mounting /proc for the job's pid namespace")?;
    // The job ends with its supervisor (see `SUPERVISOR_GONE`); init learns of it by a signal it waits for,
    // with the children's.
    let mut waited = nix::sys::signal::SigSet::empty();
    waited.add(nix::sys::signal::Signal::SIGCHLD);
    waited.add(SUPERVISOR_GONE);
    let _ = nix::sys::signal::sigprocmask(nix::sys::signal::SigmaskHow::SIG_SETMASK, Some(&waited), None);
    let signals = nix::sys::signalfd::SignalFd::with_flags(&waited, nix::sys::signalfd::SfdFlags::SFD_CLOEXEC)?;
    // SAFETY: prctl with plain integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, SUPERVISOR_GONE as libc::c_ulong, 0, 0, 0) };
    if supervisor_gone(&status) {
        return Ok(());
    }
    let app = match child {
        Child::Exec { argv, env, shim_signals } => {
            // SAFETY: init is single-threaded.
            match unsafe { fork() }? {
                ForkResult::Child => {
                    lower_nofile();
                    vos::sys::sigprocmask(libc::SIG_SETMASK, Some(shim_signals.iter().fold(0, |m, &s| m | vos::sys::sigbit(s))));
                    exec_or_report(&argv[0], &argv, &env, err.as_raw_fd())
                }
                ForkResult::Parent { child } => child,
            }
        }
        Child::Restore { tops, restorer, plan_fd, fds, hostname, domainname, in_namespaces, .. } => {
            if !hostname.is_empty() {
                nix::unistd::sethostname(&hostname).context("setting the job's hostname")?;
            }
            // SAFETY: a valid buffer and length.
            if unsafe { libc::setdomainname(domainname.as_ptr().cast(), domainname.len()) } < 0 {
                bail!("setting the job's domain name: {}", std::io::Error::last_os_error());
            }
            in_namespaces()?;
            let mut main = None;
            for (pid, index) in tops {
                let p = spawn_with_pid(pid, || {
                    // Room first: the job's fds and the objects handed over may be many thousands.
                    raise_nofile();
                    let err = match arrange_fds(&fds, err.as_raw_fd()) {
                        Ok(err) => err,
                        Err(e) => report_and_exit(err.as_raw_fd(), e),
                    };
                    lend_restore_caps();
                    let argv = [restorer.clone(), CString::new(plan_fd.to_string()).unwrap(), CString::new(index.to_string()).unwrap()];
                    exec_or_report(&restorer, &argv, &[], err)
                })?;
                if main.is_none() || pid == MAIN_PID {
                    main = Some(p);
                }
            }
            let p = main.context("the image has no top-level process")?;
            // The restored process holds them now; the launcher must see their far ends close with it.
            for &(fd, _) in &fds {
                // SAFETY: init's inherited copies, not used by init.
                unsafe { libc::close(fd) };
            }
            p
        }
    };
    drop(err);
    let mut status = File::from(status);
    loop {
        match signals.read_signal() {
            Ok(Some(si)) if si.ssi_signo == SUPERVISOR_GONE as u32 && supervisor_gone(status.as_fd()) => {
                // Ending init ends every process of the namespace.
                let _ = writeln!(std::io::stderr(), "vrun: the job's supervisor is gone: the job ends with it");
                return Ok(());
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(p, code)) if p == app => {
                    let _ = status.write_all(&((code & 0xff) << 8).to_le_bytes());
                    return Ok(());
                }
                Ok(WaitStatus::Signaled(p, sig, core)) if p == app => {
                    let st = sig as i32 | if core { 0x80 } else { 0 };
                    let _ = status.write_all(&st.to_le_bytes());
                    return Ok(());
                }
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::ECHILD) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// What the kernel sends init when the supervisor (its parent) ends, however it ends (SIGKILL included).
/// A job is never left running unsupervised: unreachable by `vrun checkpoint`, not listed, its output going
/// nowhere. It ends with its supervisor, as a program ends when its terminal's session does; the last image
/// stays. (Processes of the job may send init the same signal: init acts only if the supervisor is really gone.)
const SUPERVISOR_GONE: nix::sys::signal::Signal = nix::sys::signal::Signal::SIGHUP;

/// Whether the supervisor is gone: it alone holds the read end of the status pipe, which init writes.
fn supervisor_gone(status: impl std::os::fd::AsFd) -> bool {
    let mut p = [nix::poll::PollFd::new(status.as_fd(), nix::poll::PollFlags::empty())];
    nix::poll::poll(&mut p, nix::poll::PollTimeout::ZERO).is_ok_and(|n| n > 0)
        && p[0].revents().is_some_and(|r| r.intersects(nix::poll::PollFlags::POLLERR | nix::poll::PollFlags::POLLHUP))
}

fn exec_or_report(path: &CString, argv: &[CString], env: &[CString], err: RawFd) -> ! {
    let e = if path.as_bytes().contains(&b'/') {
        nix::unistd::execve(path, argv, env).unwrap_err()
    } else {
        nix::unistd::execvpe(path, argv, env).unwrap_err()
    };
    report_and_exit(err, e)
}

/// Tell the supervisor (through the error pipe) why the child could not become what it should, and end it.
fn report_and_exit(err: RawFd, e: nix::errno::Errno) -> ! {
    let _ = nix::unistd::write(unsafe_borrow(err), &(e as i32).to_le_bytes());
    // SAFETY: leave the child without running destructors.
    unsafe { libc::_exit(127) }
}

/// Start a process with exactly `pid` in the job's pid namespace.
fn spawn_with_pid(pid: i32, child: impl FnOnce() -> std::convert::Infallible) -> Result<Pid> {
    let tid = pid as u64;
    let args = vos::sys::CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: &tid as *const u64 as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    // SAFETY: a fork-like clone3 (no CLONE_VM) from single-threaded init: the child gets its own copy of memory
    // and returns from the syscall like fork's child.
    let r = unsafe { libc::syscall(libc::SYS_clone3, &args as *const vos::sys::CloneArgs, std::mem::size_of::<vos::sys::CloneArgs>()) };
    match r {
        #[allow(unreachable_code)]
        0 => match child() {},
        r if r > 0 => Ok(Pid::from_raw(r as i32)),
        _ => Err(anyhow!("clone3 with pid {pid}: {}", std::io::Error::last_os_error())),
    }
}

/// Give the child exactly `fds` (source, target) plus `keep`, closing everything else; returns where `keep` is
/// now. Only fds that sit on another entry's target number are moved out of the way first (moving all of them
/// would need twice the fds: a job with thousands of fds would run out).
fn arrange_fds(fds: &[(RawFd, i32)], keep: RawFd) -> nix::Result<RawFd> {
    use std::collections::HashSet;
    let targets: HashSet<i32> = fds.iter().map(|&(_, d)| d).collect();
    let above = fds.iter().flat_map(|&(s, d)| [s, d]).chain([keep]).max().unwrap_or(0) + 1;
    let keep = if targets.contains(&keep) { nix::fcntl::fcntl(unsafe_borrow(keep), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(above))? } else { keep };
    let mut moved: Vec<(RawFd, i32)> = Vec::with_capacity(fds.len());
    for &(s, d) in fds {
        let s = if s != d && targets.contains(&s) { nix::fcntl::fcntl(unsafe_borrow(s), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(above))? } else { s };
        moved.push((s, d));
    }
    for &(s, d) in &moved {
        if s == d {
            // Already in place: only its close-on-exec flag must go.
            nix::fcntl::fcntl(unsafe_borrow(d), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))?;
        } else {
            // SAFETY: plain dup3 onto a number we want; the source stays open for other targets.
            if unsafe { libc::dup3(s, d, 0) } < 0 {
                return Err(nix::errno::Errno::last());
            }
        }
    }
    let wanted: HashSet<i32> = targets.into_iter().chain([keep]).collect();
    let open: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    for fd in open.into_iter().filter(|f| !wanted.contains(f)) {
        // SAFETY: closing an fd this child does not want.
        unsafe { libc::close(fd) };
    }
    Ok(keep)
}

fn unsafe_borrow(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: the fds arranged are init's, open for the whole life of the child that arranges them.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

/// Without root, the restorer and the shim's restart code run as the job's own (unprivileged) user, which
/// loses init's capabilities at exec. Lend them, as ambient capabilities, the few that restoring needs
/// (exact thread ids, /proc/self/exe, namespace pid counter); the restart code gives them back, thread by thread,
/// before the job runs again.
fn lend_restore_caps() {
    if nix::unistd::geteuid().is_root() && nix::unistd::getuid().is_root() {
        return;
    }
    // CAP_SETPCAP: the shim drops from the bounding set and sets securebits as the job had them.
    const CAPS: [u32; 4] = [40 /* CHECKPOINT_RESTORE */, 21 /* SYS_ADMIN */, 24 /* SYS_RESOURCE */, 8 /* SETPCAP */];
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut h = Header { version: 0x2008_0522, pid: 0 };
    let mut d = [Data::default(); 2];
    // SAFETY: capget/capset with a version 3 header and two data words.
    unsafe {
        libc::syscall(libc::SYS_capget, &mut h as *mut Header, d.as_mut_ptr());
        for c in CAPS {
            d[(c / 32) as usize].inheritable |= 1 << (c % 32);
        }
        libc::syscall(libc::SYS_capset, &h as *const Header, d.as_ptr());
        for c in CAPS {
            libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, c as libc::c_ulong, 0, 0);
        }
    }
}

/// The open-file limit vrun was started with (`raise_nofile` raised vrun's own; the job gets this one back).
static NOFILE: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();

/// Let this process open as many files as the hard limit allows: a supervisor holds every open file of a job
/// while restoring it, and its children lay out thousands of fds. Remembers the limit the job must have.
pub fn raise_nofile() {
    if let Ok((soft, hard)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        let _ = NOFILE.set((soft, hard));
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Give a process that starts the job the open-file limit vrun had (not the one it raised for itself).
fn lower_nofile() {
    if let Some(&(soft, hard)) = NOFILE.get() {
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, soft, hard);
    }
}

/// The supplementary groups this supervisor had when it made the job's user namespace: a process there cannot
/// change them (setgroups is denied), and sees the ones the namespace does not map as the overflow gid.
static HOST_GROUPS: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();

/// Remember our supplementary groups, just before entering a user namespace of the job's.
fn note_host_groups() {
    let groups = nix::unistd::getgroups().map(|g| g.into_iter().map(|g| g.as_raw()).collect()).unwrap_or_default();
    let _ = HOST_GROUPS.set(groups);
}

/// The groups noted by `note_host_groups`, if this supervisor made a user namespace.
pub fn host_groups() -> Option<&'static Vec<u32>> {
    HOST_GROUPS.get()
}
