//! Memory: rebuild the image's address space at the original addresses.

use crate::out::fail;
use crate::out::Msg;
use crate::chunk::{self, ImageError, Kind, PageRun, PayloadHasher, Source};
use crate::plan::{self, MapOp};
use crate::hashring::Ring;
use crate::sys::{self, Errno};

const MADV_POPULATE_WRITE: i32 = 23;

unsafe extern "C" {
    static __ehdr_start: u8;
}

/// Replace this program's file-backed segments by anonymous copies at the same addresses, so that no mapping of
/// the restorer's file remains: the kernel refuses to change /proc/self/exe while the old exe is mapped.
pub fn make_self_anonymous() {
    // SAFETY: __ehdr_start is the linker-provided address of our own ELF header, mapped by the kernel.
    let base = core::ptr::addr_of!(__ehdr_start) as usize;
    // SAFETY: the ELF header and program headers of a loaded executable are mapped and readable.
    let (phoff, phnum) = unsafe {
        let eh = core::ptr::read_volatile(base as *const libc::Elf64_Ehdr);
        (eh.e_phoff as usize, eh.e_phnum as usize)
    };
    for i in 0..phnum {
        // SAFETY: within the program header table, mapped as part of the first segment.
        let ph = unsafe {
            core::ptr::read_volatile((base + phoff + i * core::mem::size_of::<libc::Elf64_Phdr>()) as *const libc::Elf64_Phdr)
        };
        if ph.p_type != libc::PT_LOAD || ph.p_filesz == 0 {
            continue;
        }
        let start = ph.p_vaddr as usize & !(chunk::PAGE - 1);
        let end = (ph.p_vaddr + ph.p_filesz) as usize;
        let end = (end + chunk::PAGE - 1) & !(chunk::PAGE - 1);
        let len = end - start;
        let mut prot = 0;
        if ph.p_flags & libc::PF_R != 0 {
            prot |= libc::PROT_READ;
        }
        if ph.p_flags & libc::PF_W != 0 {
            prot |= libc::PROT_WRITE;
        }
        if ph.p_flags & libc::PF_X != 0 {
            prot |= libc::PROT_EXEC;
        }
        // SAFETY: a fresh private anonymous mapping somewhere free; we copy our segment into it, give it the same
        // protection and move it over the original. The bytes at every address stay identical, so the code running
        // this (possibly in the segment being replaced) continues undisturbed.
        unsafe {
            let tmp = sys::mmap(0, len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
                .unwrap_or_else(|e| fail(Msg::new("vos-restore: mmap: ").errno(e)));
            core::ptr::copy_nonoverlapping(start as *const u8, tmp as *mut u8, len);
            sys::mprotect(tmp, len, prot).unwrap_or_else(|e| fail(Msg::new("vos-restore: mprotect: ").errno(e)));
            sys::mremap(tmp, len, len, libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED, start)
                .unwrap_or_else(|e| fail(Msg::new("vos-restore: mremap self: ").errno(e)));
        }
    }
}

/// Unmap everything outside the restorer's window: the kernel's stack, vDSO and vvar included.
pub fn clear_address_space() {
    // SAFETY: nothing outside the window is used any more: our code, data, stack and plan live inside it.
    unsafe {
        let _ = sys::munmap(0, plan::WINDOW_START as usize);
        let _ = sys::munmap(plan::WINDOW_END as usize, (plan::USER_END - plan::WINDOW_END) as usize);
    }
}

/// Refuse a plan whose regions are not page ranges of user space, sorted and apart, outside our window, or that
/// would put page data anywhere but memory the restore made for it. Checked whole before anything is mapped.
pub fn check_regions(ops: &[MapOp]) {
    let mut prev_end = 0;
    for op in ops {
        let Some(end) = op.end() else {
            fail(Msg::new("vos-restore: region ").hex(op.addr).push("+").hex(op.len).push(" is not a range of pages in user space"))
        };
        if op.addr < prev_end {
            fail(Msg::new("vos-restore: region ").hex(op.addr).push(" is out of order or overlaps another"));
        }
        prev_end = end;
        if op.overlaps_window() {
            fail(Msg::new("vos-restore: region ").hex(op.addr).push(" overlaps the restorer's window"));
        }
        if op.op & plan::OP_FILL != 0 && !op.fillable() {
            fail(Msg::new("vos-restore: region ").hex(op.addr).push(" would take page data into a shared file mapping"));
        }
    }
}

/// Map every region at its address (`check_regions` passed); regions that receive page data stay writable until
/// `protect_regions`.
pub fn map_regions(ops: &[MapOp], plan_buf: &[u8]) {
    for op in ops {
        if op.op & plan::OP_SHMAT != 0 {
            attach(op);
            continue;
        }
        if op.op & plan::OP_COPY != 0 {
            copy_in(op, plan_buf);
            continue;
        }
        let prot = if op.op & plan::OP_FILL != 0 { libc::PROT_READ | libc::PROT_WRITE } else { op.prot as i32 };
        let mut flags = op.flags as i32 | libc::MAP_FIXED_NOREPLACE;
        if op.op & plan::OP_GROWSDOWN != 0 {
            flags |= libc::MAP_GROWSDOWN;
        }
        // SAFETY: the address space outside our window is empty; MAP_FIXED_NOREPLACE refuses to replace anything.
        let r = unsafe { sys::mmap(op.addr as usize, op.len as usize, prot, flags, op.fd, op.offset) };
        match r {
            Ok(a) if a as u64 == op.addr => {}
            Ok(_) => fail(Msg::new("vos-restore: region ").hex(op.addr).push(" landed elsewhere")),
            Err(e) => fail(Msg::new("vos-restore: mapping ").hex(op.addr).push("+").hex(op.len).push(": ").errno(e)),
        }
        let name_fits = op.name_off.checked_add(op.name_len).is_some_and(|e| e <= plan_buf.len() as u64);
        if op.name_len > 0 && name_fits && plan_buf[(op.name_off + op.name_len - 1) as usize] == 0 {
            let name = plan_buf.as_ptr() as usize + op.name_off as usize;
            const PR_SET_VMA: i32 = 0x53564d41;
            // Naming is cosmetic ([anon:NAME] in /proc/PID/maps); a kernel without it just shows no name.
            let _ = sys::prctl(PR_SET_VMA, 0, op.addr as usize, op.len as usize, name);
        }
        for (i, advice) in plan::ADVICE.iter().enumerate() {
            if op.advice & (1 << i) != 0 {
                // SAFETY: advice from the original region; none of these discard contents. Advice is a hint: a
                // kernel that does not take it (no KSM, say) changes no behaviour the app can see.
                let _ = unsafe { sys::madvise(op.addr as usize, op.len as usize, *advice) };
            }
        }
    }
}

/// A piece of a System V shared memory attachment: the first piece attaches the whole segment (the job's
/// IPC namespace has it under the same id); each piece then gets its own protection.
fn attach(op: &MapOp) {
    if op.offset == 0 {
        // SAFETY: the address range is free (checked whole at checkpoint: the pieces tile the attachment).
        match unsafe { sys::shmat(op.shmid, op.addr as usize, op.flags as i32) } {
            Ok(a) if a as u64 == op.addr => {}
            Ok(_) => fail(Msg::new("vos-restore: System V shared memory landed elsewhere than ").hex(op.addr)),
            Err(e) => fail(Msg::new("vos-restore: attaching System V shared memory ").dec(op.shmid as u64).push(" at ").hex(op.addr).push(": ").errno(e)),
        }
    }
    // SAFETY: part of the attachment just made.
    if let Err(e) = unsafe { sys::mprotect(op.addr as usize, op.len as usize, op.prot as i32) } {
        fail(Msg::new("vos-restore: mprotect ").hex(op.addr).push(": ").errno(e));
    }
}

/// Anonymous memory holding bytes the plan carries (a copy of the image's vDSO, see launcher/src/resources/vdso.rs).
fn copy_in(op: &MapOp, plan_buf: &[u8]) {
    if op.data_off.checked_add(op.data_len).is_none_or(|e| e > plan_buf.len() as u64) || op.data_len > op.len {
        fail(Msg::new("vos-restore: plan data out of bounds at ").hex(op.addr));
    }
    let flags = (op.flags as i32) | libc::MAP_FIXED_NOREPLACE;
    // SAFETY: the address space outside our window is empty; MAP_FIXED_NOREPLACE refuses to replace anything.
    match unsafe { sys::mmap(op.addr as usize, op.len as usize, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) } {
        Ok(a) if a as u64 == op.addr => {}
        _ => fail(Msg::new("vos-restore: mapping a copy at ").hex(op.addr)),
    }
    // SAFETY: the source lies in the plan (checked above); the destination is the mapping just made.
    unsafe { core::ptr::copy_nonoverlapping(plan_buf.as_ptr().add(op.data_off as usize), op.addr as *mut u8, op.data_len as usize) };
    // SAFETY: our own fresh mapping.
    if let Err(e) = unsafe { sys::mprotect(op.addr as usize, op.len as usize, op.prot as i32) } {
        fail(Msg::new("vos-restore: mprotect ").hex(op.addr).push(": ").errno(e));
    }
}

/// Give every filled region its final protection.
pub fn protect_regions(ops: &[MapOp]) {
    for op in ops.iter().filter(|o| o.op & plan::OP_FILL != 0) {
        if op.prot as i32 != libc::PROT_READ | libc::PROT_WRITE {
            // SAFETY: our own fresh mapping; no one else runs yet.
            if let Err(e) = unsafe { sys::mprotect(op.addr as usize, op.len as usize, op.prot as i32) } {
                fail(Msg::new("vos-restore: mprotect ").hex(op.addr).push(": ").errno(e));
            }
        }
    }
}

/// Make the image's guard pages guard pages again (after the pages are in: installing one discards its page).
pub fn install_guards(guards: &[[u64; 2]]) {
    for &[addr, len] in guards {
        // SAFETY: guard pages of a region just mapped, which the image says held no data there.
        if let Err(e) = unsafe { sys::madvise(addr as usize, len as usize, plan::MADV_GUARD_INSTALL) } {
            fail(Msg::new("vos-restore: installing guard pages at ").hex(addr).push(": ").errno(e).push(" (they need Linux 6.13)"));
        }
    }
}

struct Fd(i32);

impl Source for Fd {
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), Option<Errno>> {
        // SAFETY: buf is a valid writable slice.
        unsafe { read_exact_raw(self.0, buf.as_mut_ptr(), buf.len()) }
    }
}

/// # Safety
/// `ptr..ptr+len` must be writable.
unsafe fn read_exact_raw(fd: i32, ptr: *mut u8, len: usize) -> Result<(), Option<Errno>> {
    let mut n = 0;
    while n < len {
        // SAFETY: forwarded contract.
        match unsafe { sys::read_raw(fd, ptr.add(n), len - n) } {
            Ok(0) => return Err(None),
            Ok(k) => n += k,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(Some(e)),
        }
    }
    Ok(())
}

fn image_fail(e: ImageError) -> ! {
    let mut m = Msg::new("");
    let _ = core::fmt::write(&mut m, format_args!("{e}"));
    fail(&m)
}

/// Whether `run` is well formed and lies entirely in one region that takes page data (ops are sorted and apart:
/// `check_regions`).
fn fill_target(ops: &[MapOp], run: &PageRun) -> bool {
    let Some(end) = run.end() else { return false };
    let i = ops.partition_point(|o| o.addr.saturating_add(o.len) <= run.addr);
    ops.get(i).is_some_and(|o| o.fillable() && o.addr <= run.addr && o.end().is_some_and(|oe| end <= oe))
}

/// Checks page chunks on a second thread while the next ones are read.
static RING: Ring = Ring::new();

/// Read this process's Pages chunks (and its closing ProcessEnd chunk) straight into place; a second thread
/// verifies each chunk's checksum meanwhile. Returns the next chunk number and the pages read.
pub fn read_pages(fd: i32, first_seq: u64, ops: &[MapOp], base_fd: i32) -> (u64, u64) {
    let mut src = Fd(fd);
    let mut seq = first_seq;
    let mut pages = 0u64;
    RING.start(true);
    loop {
        if let Some(bad) = RING.bad() {
            RING.finish();
            image_fail(ImageError::PayloadCorrupt { seq: bad });
        }
        let head = chunk::read_head(&mut src, seq).unwrap_or_else(|e| image_fail(e));
        match head.kind {
            Kind::Pages => {}
            Kind::Reuse => {
                pages += reuse(&mut src, seq, head.len, head.payload_hash, ops, base_fd);
                seq += 1;
                continue;
            }
            Kind::ProcessEnd => {
                if let Some(bad) = RING.finish() {
                    image_fail(ImageError::PayloadCorrupt { seq: bad });
                }
                // The count of pages listed tells a chunk that went missing; only `inspect` reads the summary
                // after it: check it and skip it.
                let mut count = [0u8; chunk::PROCESS_END_PREFIX];
                if head.len < count.len() as u64 {
                    image_fail(ImageError::Malformed { seq, what: "process end too short" });
                }
                src.read_exact(&mut count).unwrap_or_else(|e| image_fail(read_err(e)));
                let mut h = PayloadHasher::default();
                h.update(&count);
                let mut buf = [0u8; 4096];
                let mut left = head.len as usize - count.len();
                while left > 0 {
                    let n = left.min(buf.len());
                    src.read_exact(&mut buf[..n]).unwrap_or_else(|e| image_fail(read_err(e)));
                    h.update(&buf[..n]);
                    left -= n;
                }
                if h.finish() != head.payload_hash {
                    image_fail(ImageError::PayloadCorrupt { seq });
                }
                let listed = chunk::split_process_end(&count).map_or(0, |c| c.0);
                if listed != pages {
                    fail(Msg::new("vos-restore: image is corrupt: chunk ").dec(seq).push(": the process's page data lists ").dec(listed)
                        .push(" pages, ").dec(pages).push(" arrived (a chunk is missing or misplaced)"));
                }
                return (seq + 1, pages);
            }
            _ => image_fail(ImageError::UnexpectedKind { seq, found: head.kind as u32, wanted: "page data" }),
        }
        if head.len < 8 {
            image_fail(ImageError::Malformed { seq, what: "bad run table" });
        }
        let job = RING.slot();
        job.seq = seq;
        job.expected = head.payload_hash;
        src.read_exact(&mut job.table[..8]).unwrap_or_else(|e| image_fail(read_err(e)));
        let nruns = u32::from_le_bytes([job.table[0], job.table[1], job.table[2], job.table[3]]);
        if nruns > chunk::MAX_RUNS || 8 + nruns as u64 * chunk::RUN_LEN as u64 > head.len {
            image_fail(ImageError::Malformed { seq, what: "bad run table" });
        }
        job.nruns = nruns as usize;
        job.tlen = 8 + job.nruns * chunk::RUN_LEN;
        src.read_exact(&mut job.table[8..job.tlen]).unwrap_or_else(|e| image_fail(read_err(e)));
        for i in 0..job.nruns {
            let run = PageRun::decode(&job.table[8 + i * chunk::RUN_LEN..]);
            if !fill_target(ops, &run) {
                image_fail(ImageError::Malformed { seq, what: "page run outside the process's memory" });
            }
            job.runs[i] = run;
            job.src[i] = run.addr;
        }
        if job.len() != head.len {
            image_fail(ImageError::Malformed { seq, what: "page data length" });
        }
        for run in &job.runs[..job.nruns] {
            // SAFETY: fill_target checked the run lies inside a region we mapped writable. Populating first is
            // much faster than letting read() fault every page in from inside the kernel.
            unsafe {
                let _ = sys::madvise(run.addr as usize, run.len as usize, MADV_POPULATE_WRITE);
                read_exact_raw(fd, run.addr as *mut u8, run.len as usize).unwrap_or_else(|e| image_fail(read_err(e)));
            }
            pages += run.len / chunk::PAGE as u64;
        }
        RING.submit();
        seq += 1;
    }
}

/// Pre-copied runs left to be filled after the job resumes, through a userfaultfd (missing-page mode) that
/// the launcher's filler serves from the same pages: the job need not wait for its memory to be copied.
static LAZY_FD: core::sync::atomic::AtomicI32 = core::sync::atomic::AtomicI32::new(-2);
static LAZY_N: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);
static mut LAZY_RUNS: [[u8; chunk::RUN_LEN]; plan::MAX_LAZY_RUNS] = [[0; chunk::RUN_LEN]; plan::MAX_LAZY_RUNS];

/// The userfaultfd for lazy runs, made on first use; -1 when this kernel or process cannot have one.
fn lazy_fd() -> i32 {
    use core::sync::atomic::Ordering::Relaxed;
    let fd = LAZY_FD.load(Relaxed);
    if fd != -2 {
        return fd;
    }
    // Out of the way of the app's fds, which are put in place later at their numbers.
    let fd = match sys::userfaultfd(0, sys::UFFD_FEATURES_FILL) {
        Ok(raw) => {
            let high = sys::fcntl(raw, libc::F_DUPFD_CLOEXEC, 950).map_or(-1, |h| h as i32);
            let _ = sys::close(raw);
            high
        }
        Err(_) => -1,
    };
    LAZY_FD.store(fd, Relaxed);
    fd
}

/// Leave `run` missing, to be filled after the job resumes; false if it must be copied now.
fn defer(run: &PageRun) -> bool {
    use core::sync::atomic::Ordering::Relaxed;
    let n = LAZY_N.load(Relaxed);
    let fd = lazy_fd();
    if n == plan::MAX_LAZY_RUNS || fd < 0 {
        return false;
    }
    // Only anonymous memory takes missing-page tracking; the call fails for the rest, which is copied.
    if sys::uffd_register(fd, run.addr, run.len, sys::UFFDIO_REGISTER_MODE_MISSING).is_err() {
        return false;
    }
    // SAFETY: only the main thread touches LAZY_RUNS, and only here and in hand_over_lazy.
    unsafe { LAZY_RUNS[n] = run.encode() };
    LAZY_N.store(n + 1, Relaxed);
    true
}

pub fn lazy_runs() -> usize {
    LAZY_N.load(core::sync::atomic::Ordering::Relaxed)
}

/// Send the userfaultfd and the table of lazy runs to the launcher on `ctl`, then close our copy: the job
/// must not find it among its fds.
pub fn hand_over_lazy(ctl: i32) {
    let n = lazy_runs();
    let fd = LAZY_FD.load(core::sync::atomic::Ordering::Relaxed);
    // SAFETY: the table is complete; nothing writes it any more.
    let table = unsafe { core::slice::from_raw_parts((&raw const LAZY_RUNS) as *const u8, n * chunk::RUN_LEN) };
    let mut iov = libc::iovec { iov_base: table.as_ptr() as *mut libc::c_void, iov_len: table.len() };
    #[repr(C)]
    struct Cmsg {
        hdr: libc::cmsghdr,
        fd: i32,
        _pad: i32,
    }
    let mut c = Cmsg { hdr: libc::cmsghdr { cmsg_len: 20, cmsg_level: libc::SOL_SOCKET, cmsg_type: libc::SCM_RIGHTS }, fd, _pad: 0 };
    // SAFETY: msghdr is plain data; every pointer in it refers to live locals.
    let mut msg: libc::msghdr = unsafe { core::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = &mut c as *mut Cmsg as *mut libc::c_void;
    msg.msg_controllen = core::mem::size_of::<Cmsg>();
    // SAFETY: msg describes valid buffers.
    if unsafe { sys::sendmsg(ctl, &msg, 0) }.is_err() {
        fail(&Msg::new("vos-restore: handing over the pages left to fill failed"));
    }
    let _ = sys::close(fd);
}

/// A Reuse chunk: copy the runs it lists from the pages pre-copy brought (`base_fd`, each page at its address),
/// or leave them to be filled after the job resumes.
fn reuse(src: &mut Fd, seq: u64, len: u64, hash: u64, ops: &[MapOp], base_fd: i32) -> u64 {
    let mut table = [0u8; 8 + chunk::MAX_RUNS as usize * chunk::RUN_LEN];
    if len < 8 || len > table.len() as u64 {
        image_fail(ImageError::Malformed { seq, what: "bad reuse table" });
    }
    src.read_exact(&mut table[..len as usize]).unwrap_or_else(|e| image_fail(read_err(e)));
    let mut h = PayloadHasher::default();
    h.update(&table[..len as usize]);
    if h.finish() != hash {
        image_fail(ImageError::PayloadCorrupt { seq });
    }
    let nruns = u32::from_le_bytes([table[0], table[1], table[2], table[3]]) as usize;
    if nruns > chunk::MAX_RUNS as usize || 8 + nruns * chunk::RUN_LEN != len as usize {
        image_fail(ImageError::Malformed { seq, what: "bad reuse table" });
    }
    if base_fd == -1 {
        fail(&Msg::new("vos-restore: the image refers to pages sent ahead by a migration, and none came"));
    }
    let mut pages = 0;
    for i in 0..nruns {
        let run = PageRun::decode(&table[8 + i * chunk::RUN_LEN..]);
        if !fill_target(ops, &run) {
            image_fail(ImageError::Malformed { seq, what: "reused run outside the process's memory" });
        }
        pages += run.len / chunk::PAGE as u64;
        if defer(&run) {
            continue;
        }
        if base_fd == plan::POST_COPY {
            fail(Msg::new("vos-restore: post-copy: cannot leave memory at ").hex(run.addr).push(" to fetch later (no userfaultfd for missing pages here)"));
        }
        let mut done = 0u64;
        // SAFETY: fill_target checked the run lies inside a region we mapped writable.
        unsafe {
            let _ = sys::madvise(run.addr as usize, run.len as usize, MADV_POPULATE_WRITE);
        }
        while done < run.len {
            // SAFETY: as above; pread writes inside the run.
            let dst = unsafe { core::slice::from_raw_parts_mut((run.addr + done) as *mut u8, (run.len - done) as usize) };
            match sys::pread(base_fd, dst, run.addr + done) {
                Ok(0) => fail(Msg::new("vos-restore: pages sent ahead by the migration are missing at ").hex(run.addr + done)),
                Ok(n) => done += n as u64,
                Err(e) if e.0 == libc::EINTR => {}
                Err(e) => fail(Msg::new("vos-restore: reading pages sent ahead: ").errno(e)),
            }
        }
    }
    pages
}

fn read_err(e: Option<Errno>) -> ImageError {
    e.map_or(ImageError::Truncated("page data"), ImageError::Io)
}

/// Map the vvar/vdso block where the image had it; glibc holds pointers into the vDSO.
pub fn map_vdso(addr: u64, text: u64) {
    if let Err(e) = sys::arch_prctl(sys::ARCH_MAP_VDSO_64, addr as usize) {
        fail(Msg::new("vos-restore: mapping the vDSO at ").hex(addr).push(": ").errno(e));
    }
    // The kernel takes the address as a hint only: check the vDSO's ELF header is where the image needs it.
    let mut vec = [0u8; 1];
    // SAFETY: mincore only reports residency; it fails with ENOMEM if nothing is mapped there.
    let mapped = unsafe { sys::syscall6(libc::SYS_mincore, text as usize, 4096, vec.as_mut_ptr() as usize, 0, 0, 0) } == 0;
    // SAFETY: read only after mincore confirmed a mapping at `text`; the vDSO text is readable.
    if !mapped || unsafe { core::ptr::read_volatile(text as *const [u8; 4]) } != *b"\x7fELF" {
        fail(Msg::new("vos-restore: the kernel put the vDSO elsewhere than ").hex(text));
    }
}

/// Restore the kernel's per-process mm fields: brk, argv/env bounds, auxv, and /proc/self/exe.
pub fn set_mm(mm: &mut plan::PrctlMmMap) {
    const PR_SET_MM: i32 = 35;
    const PR_SET_MM_MAP: usize = 14;
    let r = sys::prctl(PR_SET_MM, PR_SET_MM_MAP, mm as *mut plan::PrctlMmMap as usize, core::mem::size_of::<plan::PrctlMmMap>(), 0);
    if let Err(e) = r {
        fail(Msg::new("vos-restore: PR_SET_MM_MAP (brk, argv, auxv, exe): ").errno(e));
    }
}
