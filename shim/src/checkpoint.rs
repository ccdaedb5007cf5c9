//! The checkpoint coordinator: a thread of the shim's own, made (raw clone3, not pthread_create, so glibc still
//! believes a single-threaded app is single-threaded) only while a checkpoint runs.
//!
//! It talks to the job's supervisor (`vos::proto`), parks every app thread, captures the process (one module
//! per resource kind), writes this process's chunks of the image to the fd the supervisor sends, and resumes
//! or ends the app as told. Any failure on the way resumes the app untouched.

use crate::global::{CONFIG, COORDINATOR, Global};
use crate::writer::Writer;
use crate::{arena, interrupts, log, memory, process, procfs, restart, signals, state, threads, tracking};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicI32, Ordering};
use vos::image::{FileId, ProcessImage, ProcessSummary, Region, ShimImage};
use vos::proto::{self, Msg, Trigger};
use vos::sys;

/// The coordinator's stack (`state::COORDINATOR_STACK`); its contents never travel in an image.
const STACK: (usize, usize) = state::COORDINATOR_STACK;
/// A minimal thread control block for the coordinator (glibc-style: the word at fs:0 points to itself), so
/// a stray TLS access reads zeros instead of another thread's TLS.
static TCB: Global<[u64; 64]> = Global::new([0; 64]);

/// How long the shim waits for a slow supervisor before it gives up and resumes the app.
const SUPERVISOR_TIMEOUT_S: i64 = 300;
const PARK_TIMEOUT_NS: u64 = 10_000_000_000;

/// A trigger signal from outside that came while a checkpoint ran (0: none).
static PENDING: AtomicI32 = AtomicI32::new(0);

/// Bit of the coordinator's argument that says the supervisor sent the trigger (the rest is the signal).
const FROM_SUPERVISOR: usize = 1 << 16;

/// A trigger signal arrived (in a signal handler): start a coordinator unless one runs. `supervisor`: the job's
/// supervisor sent it, for a checkpoint it runs.
pub fn trigger(sig: i32, supervisor: bool) {
    // This very handler may have interrupted a sleeping call of the app: let the hook retry it.
    interrupts::GEN.fetch_add(1, Ordering::AcqRel);
    if COORDINATOR.compare_exchange(0, -1, Ordering::AcqRel, Ordering::Acquire).is_err() {
        // A checkpoint runs already. One asked from outside meanwhile is not dropped: the coordinator takes it
        // once it is done (the exit signal wins over the other).
        if !supervisor && PENDING.load(Ordering::Acquire) != crate::global::SIG_CHECKPOINT_EXIT.load(Ordering::Relaxed) {
            PENDING.store(sig, Ordering::Release);
        }
        return;
    }
    let Some(stack) = state::addr(STACK) else {
        COORDINATOR.store(0, Ordering::Release);
        return;
    };
    // SAFETY: only one coordinator at a time (COORDINATOR), so the stack and TCB are ours.
    let tcb = unsafe { TCB.get() };
    let tcb_addr = tcb.as_ptr() as u64;
    tcb[0] = tcb_addr;
    tcb[2] = tcb_addr;
    let args = sys::CloneArgs {
        flags: (libc::CLONE_VM | libc::CLONE_FS | libc::CLONE_FILES | libc::CLONE_SIGHAND | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM | libc::CLONE_SETTLS | libc::CLONE_PARENT_SETTID | libc::CLONE_CHILD_CLEARTID) as u64,
        parent_tid: COORDINATOR.as_ptr() as u64,
        child_tid: COORDINATOR.as_ptr() as u64,
        stack: stack as u64,
        stack_size: STACK.1 as u64,
        tls: tcb_addr,
        ..Default::default()
    };
    let arg = sig as usize | if supervisor { FROM_SUPERVISOR } else { 0 };
    // SAFETY: the stack and TCB are reserved for the coordinator; it runs only `coordinate`. The new thread
    // inherits this handler's mask: every signal blocked.
    if let Err(e) = unsafe { sys::clone3_thread(&args, coordinate, arg) } {
        COORDINATOR.store(0, Ordering::Release);
        log::line(format_args!("cannot start the checkpoint thread: {e}"));
    }
}

/// The address range of the coordinator's stack (left out of images).
fn stack_range() -> (u64, u64) {
    let s = state::addr(STACK).unwrap_or(0) as u64;
    (s, s + STACK.1 as u64)
}

extern "C" fn coordinate(arg: usize) -> ! {
    let mut trigger = match arg & FROM_SUPERVISOR {
        0 => Trigger::Signal { sig: (arg & 0xffff) as i32 },
        _ => Trigger::Supervisor,
    };
    loop {
        arena::begin_session(true);
        if let Err(e) = run(trigger) {
            log::line(format_args!("checkpoint abandoned: {e}"));
        }
        arena::end_session();
        // A trigger from outside that came meanwhile gets its own checkpoint. (One in the last instant before
        // this thread is gone waits for the next signal: the kernel clears COORDINATOR only as the thread ends.)
        match PENDING.swap(0, Ordering::AcqRel) {
            0 => break,
            sig => trigger = Trigger::Signal { sig },
        }
    }
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

fn run(trigger: Trigger) -> Result<(), String> {
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
    conn.send(&Msg::Hello { pid: sys::getpid(), trigger }, None)?;
    // The /proc files the supervisor opens for us, if any, are ours until the checkpoint ends.
    struct Given;
    impl Drop for Given {
        fn drop(&mut self) {
            procfs::forget_given();
        }
    }
    let _given = Given;
    loop {
        match conn.recv()? {
            (Msg::ProcFile { name }, Some(fd)) => {
                let fd = move_high(fd);
                if !procfs::give(&name, fd) {
                    let _ = sys::close(fd);
                }
            }
            (Msg::Begin { .. }, _) => break,
            (Msg::Cancel { why }, _) => return Err(format!("the supervisor declined: {why}")),
            (m, _) => return Err(format!("unexpected message from the supervisor: {m:?}")),
        }
    }

    interrupts::GEN.fetch_add(1, Ordering::AcqRel);
    let mut own_fds = alloc::vec![conn.0];
    own_fds.extend(tracking::fd());
    own_fds.extend(procfs::given_fds());
    let parked = match threads::park_all(PARK_TIMEOUT_NS) {
        Ok(p) => p,
        Err(e) => {
            conn.send(&Msg::Quiesced { error: Some(e.clone()), own_fds }, None)?;
            return Err(e);
        }
    };
    let shared_pending = signals::drain_shared();
    let resume = |why: String| -> Result<(), String> {
        go_on(&shared_pending);
        Err(why)
    };
    let mut image = match capture(&parked) {
        Ok(img) => img,
        Err(e) => {
            let _ = conn.send(&Msg::Quiesced { error: Some(e.clone()), own_fds }, None);
            return resume(e);
        }
    };
    image.signals.pending = shared_pending.clone();
    let meta = match metadata_fd(&image) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = conn.send(&Msg::Quiesced { error: Some(e.clone()), own_fds }, None);
            return resume(e);
        }
    };
    own_fds.push(meta.0);
    let sent = conn.send(&Msg::Quiesced { error: None, own_fds }, Some(meta.0));
    drop(meta);
    if let Err(e) = sent {
        return resume(e);
    }
    let (first_seq, skip, reuse, lazy, out) = match conn.recv() {
        Ok((Msg::Dump { first_seq, skip, reuse, lazy }, Some(fd))) => (first_seq, skip, reuse, lazy, Fd(move_high(fd))),
        Ok((Msg::Track, _)) => {
            let tracked = Msg::Tracked { error: tracking::start(move_high).err() };
            if let Err(e) = conn.send(&tracked, None) {
                return resume(e);
            }
            return finish(&conn, &shared_pending);
        }
        Ok((Msg::Cancel { why }, _)) => return resume(format!("cancelled: {why}")),
        Ok((m, _)) => return resume(format!("unexpected message from the supervisor: {m:?}")),
        Err(e) => return resume(e),
    };
    let mut w = Writer::new(out.0, first_seq);
    let written = write(&mut w, &image, &skip, &reuse, lazy);
    // The migration this tracking served has its image: whatever comes next, tracking is over.
    tracking::stop();
    let dumped = Msg::Dumped { error: written.as_ref().err().cloned(), next_seq: w.seq, bytes: w.bytes };
    drop(out);
    if let Err(e) = conn.send(&dumped, None) {
        return resume(e);
    }
    if let Err(e) = written {
        return resume(e);
    }
    finish(&conn, &shared_pending)
}

/// Let the app run again: the process-wide signals taken out for the image go back, the threads go on.
fn go_on(shared_pending: &[serde_bytes::ByteBuf]) {
    signals::requeue_shared(shared_pending);
    threads::release_all();
}

/// Wait for the supervisor's word: end the process (the image is safe) or let the app go on.
fn finish(conn: &Conn, shared_pending: &[serde_bytes::ByteBuf]) -> Result<(), String> {
    let resume = |why: String| -> Result<(), String> {
        go_on(shared_pending);
        Err(why)
    };
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
    go_on(shared_pending);
    let _ = conn.send(&Msg::Resumed, None);
    Ok(())
}

/// The process's metadata in a memfd, for the supervisor (it can be larger than a message).
fn metadata_fd(image: &ProcessImage) -> Result<Fd, String> {
    let meta = rmp_serde::to_vec_named(image).map_err(|e| format!("encoding the process metadata: {e}"))?;
    // SAFETY: memfd_create with a NUL-terminated name.
    let r = unsafe { sys::syscall6(libc::SYS_memfd_create, c"vos-meta".as_ptr() as usize, libc::MFD_CLOEXEC as usize, 0, 0, 0, 0) };
    if r < 0 {
        return Err(format!("memfd_create: {}", sys::Errno(-r as i32)));
    }
    let fd = Fd(move_high(r as i32));
    let mut w = Writer::new(fd.0, 0);
    w.write_all(&meta).map_err(|e| format!("writing the process metadata: {e}"))?;
    let _ = sys::lseek(fd.0, 0, libc::SEEK_SET);
    Ok(fd)
}

struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        let _ = sys::close(self.0);
    }
}

/// Everything about this process except page contents and fds (the supervisor reads those from outside).
fn capture(parked: &threads::Parked) -> Result<ProcessImage, String> {
    let threads = threads::capture(parked)?;
    let vmas = memory::read_vmas()?;
    let mut skip: Vec<(u64, u64)> = arena::session_ranges().map(|(a, b)| (a as u64, b as u64)).collect();
    if crate::window::WINDOW_RESERVED.load(Ordering::Relaxed) {
        skip.push((vos::plan::WINDOW_START, vos::plan::WINDOW_END));
    }
    let regions: Vec<Region> = memory::capture(&vmas, &skip)?;
    // The process's memory, fds and files as this thread sees them: /proc/self shows the main thread's, which is
    // empty once it has exited (pthread_exit from main).
    let exe_path = procfs::readlink("/proc/thread-self/exe").map_err(|e| format!("/proc/thread-self/exe: {e}"))?;
    let exe_st = sys::stat(b"/proc/thread-self/exe\0").map_err(|e| format!("/proc/thread-self/exe: {e}"))?;
    // A deleted or memfd program is still the process's: its bytes travel in the image (the launcher's bundle).
    let exe: FileId = if vos::image::is_detached(&exe_path) {
        FileId { path: exe_path, dev: exe_st.st_dev, ino: exe_st.st_ino, size: exe_st.st_size as u64, ..Default::default() }
    } else {
        memory::file_id(&exe_path, exe_st.st_dev, exe_st.st_ino).map_err(|e| format!("the program file: {e}"))?
    };
    let cmdline = procfs::read_file("/proc/thread-self/cmdline").unwrap_or_default();
    let argv = cmdline.split(|&c| c == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    Ok(ProcessImage {
        pid: sys::getpid(),
        ppid: sys::getppid(),
        pgid: own_id(libc::SYS_getpgid) as i32,
        sid: own_id(libc::SYS_getsid) as i32,
        comm: procfs::read_string("/proc/self/comm").unwrap_or_default().trim_end().to_string(),
        argv,
        exe,
        threads,
        regions,
        fds: Vec::new(),
        ctty: None,
        watches: crate::inotify::capture(),
        fixups: Vec::new(),
        timers: crate::timers::capture()?,
        signals: signals::capture(),
        attrs: {
            let mut a = process::capture()?;
            // The supervisor reads the rest of the credentials from outside; the securebits only a thread can read.
            a.creds = Some(vos::image::Creds { securebits: threads::securebits(parked)?, ..Default::default() });
            a
        },
        mm: process::capture_mm()?,
        shim: ShimImage { restart_entry: restart::entry as *const () as u64, restart_stack_top: restart::stack_top() },
    })
}

/// getpgid(0) or getsid(0): the ids as the job's pid namespace numbers them (0 when outside it).
fn own_id(nr: i64) -> i64 {
    // SAFETY: getpgid/getsid with pid 0 only read the caller's ids.
    let r = unsafe { sys::syscall6(nr, 0, 0, 0, 0, 0, 0) };
    r.max(0) as i64
}

/// This process's chunks: its pages, its summary. `skip`: shared memory another process stores.
fn write(w: &mut Writer, image: &ProcessImage, skip: &[(u64, u64)], reuse: &[(u64, u64)], lazy: bool) -> Result<(), String> {
    let mut exclude = alloc::vec![stack_range(), restart::stack_range(), memory::ring_range(), arena::session_state()];
    exclude.extend_from_slice(skip);
    let summary: ProcessSummary = memory::write_pages(w, &image.regions, &exclude, reuse, lazy)?;
    let s = rmp_serde::to_vec_named(&summary).map_err(|e| format!("encoding the summary: {e}"))?;
    w.process_end(&s).map_err(|e| format!("writing the image: {e}"))?;
    Ok(())
}
