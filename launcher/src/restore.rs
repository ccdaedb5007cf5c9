//! `vrun restore`: check an image against this host, plan the address space for the restorer, start the job
//! again in fresh namespaces, and supervise it.
//!
//! Order of events: the header and process metadata are read and checked (host, CPU, vDSO, every file the job
//! used) before anything is created; then init starts the restorer as the job's process with its original
//! pid; the restorer maps memory and reads the page chunks from the same stream; the shim's restart code
//! rebuilds fds, signals and threads and says it is ready; the launcher reads the end of the image, and only
//! if it is whole does it let the job run.

use crate::imagefile::Reader;
use crate::ns::{self, Child, ClockOffsets};
use crate::supervisor::{self, Options, Supervisor};
use crate::{host, runtime};
use anyhow::{Context, Result, anyhow, bail};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType};
use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use vos::image::{Contents, FdKind, ProcessImage, RegionKind, RestartSpec, VMF_GROWSDOWN};
use vos::plan::{self, MapOp, PlanHead, PrctlMmMap};
use vos::proto::{self, Msg};

pub struct Args {
    pub src: String,
    pub name: Option<String>,
    pub dir: Option<PathBuf>,
    pub interval: Option<std::time::Duration>,
    pub keep: usize,
    pub signals: (i32, i32),
    pub quiet: bool,
}

/// With VOS_TIMING set, `vrun restore` reports how long each phase took (on stderr).
struct Phases(Option<std::time::Instant>);

impl Phases {
    fn mark(&mut self, what: &str) {
        if let Some(t) = self.0 {
            eprintln!("vrun: restore: {what} at {:.1} ms", t.elapsed().as_secs_f64() * 1000.0);
        }
    }
}

pub fn run(a: Args, restorer: PathBuf) -> Result<std::convert::Infallible> {
    let mut phases = Phases(std::env::var_os("VOS_TIMING").map(|_| std::time::Instant::now()));
    let mut r = Reader::open(&a.src)?;
    let header = r.header()?;
    if header.processes != 1 {
        bail!("{}: images of {} processes cannot be restored yet", r.name, header.processes);
    }
    let here = host::current();
    host::check(&header.host, &here).map_err(|e| anyhow!("cannot restore {} here: {e}", r.name))?;
    let process = r.process()?;
    check_files(&process).map_err(|e| anyhow!("cannot restore {} here: {e}", r.name))?;

    let name = runtime::unique_name(a.name.as_deref().unwrap_or(&header.job.name));
    let listener = supervisor::listen(&name)?;
    let from_stdin = a.src == "-";
    let mut plan = Plan::new(&process)?;
    let (ctl_parent, ctl_child) = socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
    let image_fd = r.raw_fd();
    let exe = File::open(&process.exe.path).with_context(|| format!("opening the program {}", process.exe.path))?;
    let stdin: OwnedFd = if from_stdin {
        // The image arrives on stdin: the job's stdin is /dev/null.
        File::open("/dev/null")?.into()
    } else {
        nix::unistd::dup(std::io::stdin())?
    };
    let spec = RestartSpec {
        process: process.clone(),
        stdio: [plan.base + 4, plan.base + 5, plan.base + 6],
        close: vec![],
        ctl_fd: plan.base + 2,
        sock: listener.name.clone(),
    };
    let memfd = plan.write(&process, &spec, r.seq)?;
    let mut fds: Vec<(RawFd, i32)> = vec![
        (memfd.as_raw_fd(), plan.base),
        (image_fd, plan.base + 1),
        (ctl_child.as_raw_fd(), plan.base + 2),
        (exe.as_raw_fd(), plan.base + 3),
        (stdin.as_raw_fd(), plan.base + 4),
        (1, plan.base + 5),
        (2, plan.base + 6),
    ];
    fds.extend(plan.files.iter().map(|(f, n)| (f.as_raw_fd(), *n)));

    supervisor::block_signals()?;
    let now_mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    let now_boot = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)?;
    let ns_of = |t: nix::sys::time::TimeSpec| t.tv_sec() as i64 * 1_000_000_000 + t.tv_nsec() as i64;
    let clocks = ClockOffsets {
        monotonic: process.attrs.monotonic_ns as i64 - ns_of(now_mono),
        boottime: process.attrs.boottime_ns as i64 - ns_of(now_boot),
    };
    let child = Child::Restore {
        pid: process.pid,
        restorer: CString::new(restorer.as_os_str().as_encoded_bytes())?,
        plan_fd: plan.base,
        fds,
        hostname: process.attrs.hostname.clone(),
    };
    phases.mark("image checked and planned");
    let started = ns::start(child, clocks)?;
    phases.mark("restorer started");
    drop(ctl_child);
    drop(memfd);
    drop(plan.files);
    drop(exe);
    drop(stdin);
    let c = ctl_parent.as_raw_fd();
    let fail = |e: anyhow::Error| -> anyhow::Error {
        let _ = nix::sys::signal::kill(started.init, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(started.init, None);
        e
    };

    // The restorer reports once memory is back (or why it failed).
    let report = wait_report(c).map_err(fail)?;
    phases.mark("memory restored");
    r.seq = report.next_seq;
    match proto::recv(c) {
        Ok(Some((Msg::Ready, _))) => {}
        Ok(Some((Msg::RestoreFailed { why }, _))) => return Err(fail(anyhow!("restoring {} failed: {why}", r.name))),
        Ok(Some((m, _))) => return Err(fail(anyhow!("unexpected message from the restored job: {m:?}"))),
        Ok(None) | Err(_) => return Err(fail(anyhow!("restoring {} failed: the restored process ended", r.name))),
    }
    // Only a whole image may run.
    phases.mark("threads and fds restored");
    r.end().map_err(fail)?;
    proto::send(c, &Msg::Go, None).map_err(|e| fail(anyhow!("talking to the restored job: {e}")))?;
    match proto::recv(c) {
        Ok(Some((Msg::Running, _))) => {}
        _ => return Err(fail(anyhow!("the restored job did not start"))),
    }
    phases.mark("running");
    drop(ctl_parent);
    drop(r);
    let opts = Options {
        name,
        dir: a.dir.unwrap_or_else(|| std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))),
        interval: a.interval,
        keep: a.keep,
        signals: a.signals,
        quiet: a.quiet,
    };
    Supervisor::new(opts, listener, started, header.job.argv.clone(), header.job.started_unix_ns)?.run()
}

fn wait_report(c: RawFd) -> Result<plan::RestorerReport> {
    let mut buf = vec![0u8; proto::MAX_MSG];
    let n = loop {
        match nix::sys::socket::recv(c, &mut buf, nix::sys::socket::MsgFlags::empty()) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => break r?,
        }
    };
    if n == 0 {
        bail!("the restorer ended without a word");
    }
    let rep = plan::RestorerReport::from_bytes(&buf[..n]).ok_or_else(|| anyhow!("the restorer sent something unexpected"))?;
    if rep.status != plan::REPORT_OK {
        bail!("{}", rep.message());
    }
    Ok(rep)
}

/// Every file the job maps or has open must still be there, and mapped files unchanged: named here, before
/// anything is restored.
fn check_files(p: &ProcessImage) -> Result<()> {
    for r in &p.regions {
        if let Some(f) = &r.file {
            let md = std::fs::metadata(&f.path).map_err(|e| anyhow!("{}, mapped by the job, is missing: {e}", f.path))?;
            use std::os::unix::fs::MetadataExt;
            let mtime = md.mtime() * 1_000_000_000 + md.mtime_nsec();
            if md.size() != f.size || mtime != f.mtime_ns {
                bail!("{} differs from the file the job had mapped (size or modification time changed)", f.path);
            }
        }
    }
    for fd in &p.fds {
        let path = match &fd.kind {
            FdKind::File { file } => &file.path,
            FdKind::Dir { path } | FdKind::Device { path } => path,
            _ => continue,
        };
        std::fs::metadata(path).map_err(|e| anyhow!("fd {}: {path} is missing: {e}", fd.fd))?;
    }
    std::fs::metadata(&p.attrs.cwd).map_err(|e| anyhow!("the working directory {} is missing: {e}", p.attrs.cwd))?;
    Ok(())
}

/// The restorer's plan, and the files it maps, at their fd numbers in the restored process.
struct Plan {
    /// First fd number of the restorer's own fds, above every fd of the job.
    base: i32,
    files: Vec<(File, i32)>,
    ops: Vec<MapOp>,
    blob: Vec<u8>,
}

impl Plan {
    fn new(p: &ProcessImage) -> Result<Plan> {
        let base = p.fds.iter().map(|f| f.fd + 1).max().unwrap_or(0).max(10);
        Ok(Plan { base, files: vec![], ops: vec![], blob: vec![] })
    }

    fn add_blob(&mut self, b: &[u8]) -> (u64, u64) {
        while self.blob.len() % 8 != 0 {
            self.blob.push(0);
        }
        let off = self.blob.len();
        self.blob.extend_from_slice(b);
        (off as u64, b.len() as u64)
    }

    fn file_fd(&mut self, path: &str, write: bool) -> Result<i32> {
        let n = self.base + 7 + self.files.len() as i32;
        let f = std::fs::OpenOptions::new().read(true).write(write).open(path).with_context(|| format!("opening {path}"))?;
        self.files.push((f, n));
        Ok(n)
    }

    /// Build the plan and put it in a memfd for the restorer.
    fn write(&mut self, p: &ProcessImage, spec: &RestartSpec, first_seq: u64) -> Result<OwnedFd> {
        let mut regions: Vec<_> = p.regions.iter().collect();
        regions.sort_by_key(|r| r.start);
        let find = |k: RegionKind| regions.iter().find(|r| r.kind == k).copied();
        let (vdso_addr, vdso_text) = match (find(RegionKind::Vvar), find(RegionKind::VvarVclock), find(RegionKind::Vdso)) {
            (Some(a), Some(b), Some(c)) if a.end == b.start && b.end == c.start => (a.start, c.start),
            (Some(a), None, Some(c)) if a.end == c.start => (a.start, c.start),
            (None, None, None) => (0, 0),
            _ => bail!("the image's vDSO layout is not one this kernel makes"),
        };
        let mut names: Vec<(usize, Vec<u8>)> = vec![];
        for r in &regions {
            if matches!(r.kind, RegionKind::Vdso | RegionKind::Vvar | RegionKind::VvarVclock) {
                continue;
            }
            let mut op = MapOp { addr: r.start, len: r.end - r.start, prot: r.prot, fd: -1, ..Default::default() };
            op.flags = (if r.shared { libc::MAP_SHARED } else { libc::MAP_PRIVATE }) as u32;
            match (&r.file, r.kind) {
                (Some(f), RegionKind::File) => {
                    let write = r.shared && r.prot & libc::PROT_WRITE as u32 != 0;
                    op.fd = self.file_fd(&f.path, write)?;
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
            // vmflags bits 2.. line up with plan::ADVICE.
            op.advice = (r.vmflags >> 1) & 0x3f;
            if let Some(n) = r.name.strip_prefix("[anon:").and_then(|n| n.strip_suffix(']')) {
                let mut v = n.as_bytes().to_vec();
                v.push(0);
                names.push((self.ops.len(), v));
            }
            self.ops.push(op);
        }
        let (auxv_off, auxv_len) = self.add_blob(&p.mm.auxv);
        for (i, n) in names {
            let (off, len) = self.add_blob(&n);
            self.ops[i].name_off = off;
            self.ops[i].name_len = len;
        }
        let spec_bytes = rmp_serde::to_vec_named(spec)?;
        let (blob_off, blob_len) = self.add_blob(&spec_bytes);
        let m = &p.mm;
        let ops_len = self.ops.len() * std::mem::size_of::<MapOp>();
        let blob_base = (std::mem::size_of::<PlanHead>() + ops_len) as u64;
        let head = PlanHead {
            magic: plan::PLAN_MAGIC,
            nmaps: self.ops.len() as u32,
            image_fd: self.base + 1,
            ctl_fd: self.base + 2,
            exe_fd: self.base + 3,
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
                exe_fd: (self.base + 3) as u32,
            },
            auxv_off: blob_base + auxv_off,
            auxv_len,
            restart_entry: p.shim.restart_entry,
            restart_stack_top: p.shim.restart_stack_top,
            blob_off: blob_base + blob_off,
            blob_len,
            total_len: blob_base + self.blob.len() as u64,
        };
        if head.total_len as usize > plan::MAX_PLAN {
            bail!("the restore plan is too large ({} bytes)", head.total_len);
        }
        let fd = nix::sys::memfd::memfd_create(c"vos-plan", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
        let mut f = File::from(fd);
        // SAFETY: PlanHead and MapOp are repr(C) plain data.
        unsafe {
            f.write_all(plan::bytes_of(&head))?;
            for op in &self.ops {
                f.write_all(plan::bytes_of(op))?;
            }
        }
        f.write_all(&self.blob)?;
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(0))?;
        Ok(f.into())
    }
}
