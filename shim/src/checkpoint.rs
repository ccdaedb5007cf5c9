//! The checkpoint coordinator: a thread of the shim's own, made (raw clone3, not pthread_create, so glibc still
//! believes a single-threaded app is single-threaded) only while a checkpoint runs.
//!
//! It talks to the job's supervisor (`vos::proto`), parks every app thread, captures the process (one module
//! per resource kind), writes this process's chunks of the image to the fd the supervisor sends, and resumes
//! or ends the app as told. Any failure on the way resumes the app untouched.

use crate::global::{CONFIG, Global};
use crate::writer::Writer;
use crate::{arena, files, interrupts, log, memory, process, procfs, restart, signals, threads};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicI32, Ordering};
use vos::chunk::Kind;
use vos::image::{FileId, ProcessImage, ProcessSummary, Region, ShimImage};
use vos::proto::{self, Msg, Trigger};
use vos::sys;

const STACK_SIZE: usize = 1 << 20;

#[repr(C, align(16))]
struct Stack([u8; STACK_SIZE]);

/// The coordinator's stack; its contents never travel in an image.
static STACK: Global<Stack> = Global::new(Stack([0; STACK_SIZE]));
/// A minimal thread control block for the coordinator (glibc-style: the word at fs:0 points to itself), so
/// a stray TLS access reads zeros instead of another thread's TLS.
static TCB: Global<[u64; 64]> = Global::new([0; 64]);
/// Non-zero while a coordinator (or a restart) runs: its tid, cleared by the kernel when the thread exits.
pub static COORDINATOR: AtomicI32 = AtomicI32::new(0);

/// How long the shim waits for a slow supervisor before it gives up and resumes the app.
const SUPERVISOR_TIMEOUT_S: i64 = 300;
const PARK_TIMEOUT_NS: u64 = 10_000_000_000;

/// A trigger signal arrived (in a signal handler): start a coordinator unless one runs.
pub fn trigger(sig: i32) {
    // This very handler may have interrupted a sleeping call of the app: let the hook retry it.
    interrupts::GEN.fetch_add(1, Ordering::AcqRel);
    if COORDINATOR.compare_exchange(0, -1, Ordering::AcqRel, Ordering::Acquire).is_err() {
        return;
    }
    // SAFETY: only one coordinator at a time (COORDINATOR), so STACK and TCB are ours.
    let (stack, tcb) = unsafe { (STACK.get(), TCB.get()) };
    let tcb_addr = tcb.as_ptr() as u64;
    tcb[0] = tcb_addr;
    tcb[2] = tcb_addr;
    let args = sys::CloneArgs {
        flags: (libc::CLONE_VM | libc::CLONE_FS | libc::CLONE_FILES | libc::CLONE_SIGHAND | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM | libc::CLONE_SETTLS | libc::CLONE_PARENT_SETTID | libc::CLONE_CHILD_CLEARTID) as u64,
        parent_tid: COORDINATOR.as_ptr() as u64,
        child_tid: COORDINATOR.as_ptr() as u64,
        stack: stack.0.as_mut_ptr() as u64,
        stack_size: STACK_SIZE as u64,
        tls: tcb_addr,
        ..Default::default()
    };
    // SAFETY: the stack and TCB are reserved for the coordinator; it runs only `coordinate`. The new thread
    // inherits this handler's mask: every signal blocked.
    if let Err(e) = unsafe { sys::clone3_thread(&args, coordinate, sig as usize) } {
        COORDINATOR.store(0, Ordering::Release);
        log::line(format_args!("cannot start the checkpoint thread: {e}"));
    }
}

/// The address range of the coordinator's stack (left out of images).
fn stack_range() -> (u64, u64) {
    // SAFETY: only the address is taken.
    let s = unsafe { STACK.get().0.as_ptr() } as u64;
    (s, s + STACK_SIZE as u64)
}

extern "C" fn coordinate(sig: usize) -> ! {
    arena::begin_session();
    if let Err(e) = run(sig as i32) {
        log::line(format_args!("checkpoint abandoned: {e}"));
    }
    arena::end_session();
    sys::exit_thread(0)
}

struct Conn(i32);

impl Conn {
    fn send(&self, m: &Msg, fd: Option<i32>) -> Result<(), String> {
        proto::send(self.0, m, fd).map_err(|e| format!("talking to the supervisor: {e}"))
    }
    fn recv(&self) -> Result<(Msg, Option<i32>), String> {
        match proto::recv(self.0) {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err("the supervisor went away".into()),
            Err(e) => Err(format!("talking to the supervisor: {e}")),
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let _ = sys::close(self.0);
    }
}

/// Keep the coordinator's fds out of the range apps use.
fn move_high(fd: i32) -> i32 {
    match sys::fcntl(fd, libc::F_DUPFD_CLOEXEC, 900) {
        Ok(h) => {
            let _ = sys::close(fd);
            h as i32
        }
        Err(_) => fd,
    }
}

fn run(sig: i32) -> Result<(), String> {
    // SAFETY: CONFIG is written only before other shim code runs.
    let sock = unsafe { CONFIG.get().sock.clone() };
    if sock.is_empty() {
        return Err("no supervisor (VOS_SOCK is not set)".into());
    }
    let conn = Conn(move_high(proto::connect(&sock).map_err(|e| format!("connecting to the supervisor {sock}: {e}"))?));
    let tv = libc::timeval { tv_sec: SUPERVISOR_TIMEOUT_S, tv_usec: 0 };
    // SAFETY: tv is a valid timeval for SO_RCVTIMEO.
    unsafe {
        sys::syscall6(libc::SYS_setsockopt, conn.0 as usize, libc::SOL_SOCKET as usize, libc::SO_RCVTIMEO as usize, &tv as *const libc::timeval as usize, core::mem::size_of::<libc::timeval>(), 0);
    }
    conn.send(&Msg::Hello { pid: sys::getpid(), trigger: Trigger::Signal { sig } }, None)?;
    let out = match conn.recv()? {
        (Msg::Begin { .. }, Some(fd)) => move_high(fd),
        (Msg::Cancel { why }, _) => return Err(format!("the supervisor declined: {why}")),
        (m, _) => return Err(format!("unexpected message from the supervisor: {m:?}")),
    };
    let out = Fd(out);

    interrupts::GEN.fetch_add(1, Ordering::AcqRel);
    let parked = match threads::park_all(PARK_TIMEOUT_NS) {
        Ok(p) => p,
        Err(e) => {
            conn.send(&Msg::Quiesced { error: Some(e.clone()) }, None)?;
            return Err(e);
        }
    };
    let shared_pending = signals::drain_shared();
    let captured = capture(&parked, &[conn.0, out.0]);
    let image = match captured {
        Ok(img) => img,
        Err(e) => {
            signals::requeue_shared(&shared_pending);
            threads::release_all();
            conn.send(&Msg::Quiesced { error: Some(e.clone()) }, None)?;
            return Err(e);
        }
    };
    let mut image = image;
    image.signals.pending = shared_pending.clone();
    let resume = |why: String| -> Result<(), String> {
        signals::requeue_shared(&shared_pending);
        threads::release_all();
        Err(why)
    };
    if let Err(e) = conn.send(&Msg::Quiesced { error: None }, None) {
        return resume(e);
    }
    let first_seq = match conn.recv() {
        Ok((Msg::Dump { first_seq }, _)) => first_seq,
        Ok((Msg::Cancel { why }, _)) => return resume(format!("cancelled: {why}")),
        Ok((m, _)) => return resume(format!("unexpected message from the supervisor: {m:?}")),
        Err(e) => return resume(e),
    };
    let mut w = Writer::new(out.0, first_seq);
    let written = write(&mut w, &image);
    let dumped = Msg::Dumped { error: written.as_ref().err().cloned(), next_seq: w.seq, bytes: w.bytes };
    if let Err(e) = conn.send(&dumped, None) {
        return resume(e);
    }
    if let Err(e) = written {
        return resume(e);
    }
    match conn.recv() {
        Ok((Msg::Finish { exit: true }, _)) => {
            // The image is safe: end here, before any app code runs again.
            sys::exit_group(0)
        }
        Ok((Msg::Finish { exit: false }, _)) => {}
        Ok((Msg::Cancel { why }, _)) => return resume(format!("cancelled: {why}")),
        Ok((m, _)) => return resume(format!("unexpected message from the supervisor: {m:?}")),
        Err(e) => return resume(e),
    }
    signals::requeue_shared(&shared_pending);
    threads::release_all();
    let _ = conn.send(&Msg::Resumed, None);
    Ok(())
}

struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        let _ = sys::close(self.0);
    }
}

/// Everything about this process except page contents. `ours` are the coordinator's fds.
fn capture(parked: &threads::Parked, ours: &[i32]) -> Result<ProcessImage, String> {
    only_process()?;
    let threads = threads::capture(parked)?;
    let vmas = memory::read_vmas()?;
    let arena: Vec<(usize, usize)> = arena::session_ranges().collect();
    let skip = |s: u64, e: u64| {
        arena.iter().any(|&(a, b)| s >= a as u64 && e <= b as u64)
            || (s >= vos::plan::WINDOW_START && e <= vos::plan::WINDOW_END)
    };
    let regions: Vec<Region> = memory::capture(&vmas, &skip)?;
    let fds = files::capture(ours)?;
    let exe_path = procfs::readlink("/proc/self/exe").map_err(|e| format!("/proc/self/exe: {e}"))?;
    let exe_st = sys::stat(b"/proc/self/exe\0").map_err(|e| format!("/proc/self/exe: {e}"))?;
    let exe: FileId = memory::file_id(&exe_path, exe_st.st_dev, exe_st.st_ino).map_err(|e| format!("the program file: {e}"))?;
    let cmdline = procfs::read_file("/proc/self/cmdline").unwrap_or_default();
    let argv = cmdline.split(|&c| c == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    Ok(ProcessImage {
        pid: sys::getpid(),
        ppid: sys::getppid(),
        comm: procfs::read_string("/proc/self/comm").unwrap_or_default().trim_end().to_string(),
        argv,
        exe,
        threads,
        regions,
        fds,
        signals: signals::capture(),
        attrs: process::capture()?,
        mm: process::capture_mm()?,
        shim: ShimImage { restart_entry: restart::entry as *const () as u64, restart_stack_top: restart::stack_top() },
    })
}

/// Process trees come later: refuse a job with another process in it (the pid namespace shows only the job,
/// plus the launcher's init as pid 1).
fn only_process() -> Result<(), String> {
    let me = sys::getpid();
    let pids = procfs::list_numbers("/proc").map_err(|e| format!("listing processes: {e}"))?;
    if let Some(other) = pids.iter().find(|&&p| p != me && p != 1) {
        let comm = procfs::read_string(&format!("/proc/{other}/comm")).unwrap_or_default();
        return Err(format!(
            "pid {other} ({}) is another process of the job: jobs of several processes are not supported yet",
            comm.trim_end()
        ));
    }
    Ok(())
}

/// This process's chunks: its metadata, its pages, its summary.
fn write(w: &mut Writer, image: &ProcessImage) -> Result<(), String> {
    let meta = rmp_serde::to_vec_named(image).map_err(|e| format!("encoding the process metadata: {e}"))?;
    w.chunk(Kind::Process, &meta).map_err(|e| format!("writing the image: {e}"))?;
    let summary: ProcessSummary = memory::write_pages(w, &image.regions, &[stack_range(), restart::stack_range(), memory::ring_range(), arena::session_state()])?;
    let s = rmp_serde::to_vec_named(&summary).map_err(|e| format!("encoding the summary: {e}"))?;
    w.chunk(Kind::ProcessEnd, &s).map_err(|e| format!("writing the image: {e}"))?;
    Ok(())
}
