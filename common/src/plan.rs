//! The restorer's input: a flat, `#[repr(C)]` plan the launcher derives from a verified image.
//!
//! The restorer is freestanding (no allocator, no MessagePack), so the launcher does all parsing and checking and
//! hands over only what to map where. One plan serves the whole job: a `JobPlanHead`, the job's processes
//! (`ProcEntry`: ids, and where its own plan is), a page of counters the restorers of all processes share
//! (`Sync`), and per process a `PlanHead`, its `MapOp`s and a blob area (auxv bytes, vma names, and the shim's
//! restart spec, opaque to the restorer). Every offset is from the start of the plan.

pub const PLAN_MAGIC: u64 = u64::from_le_bytes(*b"VOSPLAN1");
pub const JOB_PLAN_MAGIC: u64 = u64::from_le_bytes(*b"VOSJOBP1");

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct JobPlanHead {
    pub magic: u64,
    /// Processes, live and zombie.
    pub nproc: u32,
    /// How many of them lead their own process group.
    pub nleaders: u32,
    /// Offset of `nproc` ProcEntry.
    pub procs_off: u64,
    /// Page-aligned offset of the shared `Sync` page.
    pub sync_off: u64,
    pub total_len: u64,
}

/// One process of the job as the restorer makes it. Ids as the job's pid namespace numbers them (pgid and sid
/// 0: those of the restoring supervisor, outside the job).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcEntry {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// A zombie: it exits at once with `status` (a wait status) and waits for its parent.
    pub zombie: u32,
    pub status: i32,
    /// Position of its page data in the image (live processes only).
    pub order: u32,
    pub _pad: u32,
    /// Offset of its PlanHead (live processes only).
    pub plan_off: u64,
}

/// Counters the restorers of all the job's processes share (a MAP_SHARED page of the plan's memfd).
#[repr(C)]
pub struct Sync {
    /// Processes that exist with all their children.
    pub created: core::sync::atomic::AtomicU32,
    /// Group leaders that made their group.
    pub leaders: core::sync::atomic::AtomicU32,
    /// The process whose turn it is to read its pages from the image (by `order`).
    pub turn: core::sync::atomic::AtomicU32,
    pub _pad: u32,
    /// The number of the next chunk in the image, left by the process before (the first one's is in its plan).
    pub seq: core::sync::atomic::AtomicU64,
}

/// Where the restorers map the Sync page: the last page of their window.
pub const SYNC_ADDR: u64 = WINDOW_END - 4096;
/// The restorer's own fixed address range; the shim keeps it reserved in every job so it is free in every image.
pub const WINDOW_START: u64 = 0x2000_0000_0000;
pub const WINDOW_LEN: u64 = 64 << 20;
pub const WINDOW_END: u64 = WINDOW_START + WINDOW_LEN;
/// The end of user address space on x86-64 with 4-level page tables: no mapping of a job lies above it.
pub const USER_END: u64 = 0x7fff_ffff_f000;
/// Where the restorer maps the job's plan: in its window, above its own code, data and stack (the restorer checks
/// its end lies below).
pub const PLAN_ADDR: u64 = WINDOW_START + (4 << 20);
/// Largest plan a restore takes: the rest of the window, below the Sync page. A checkpoint refuses a job whose
/// plan would be larger (hundreds of thousands of mappings), naming the limit.
pub const MAX_PLAN: usize = (SYNC_ADDR - PLAN_ADDR) as usize;

/// The kernel's `struct prctl_mm_map` (PR_SET_MM_MAP).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PrctlMmMap {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: u64,
    pub auxv_size: u32,
    pub exe_fd: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PlanHead {
    pub magic: u64,
    pub nmaps: u32,
    /// This process's pages received by pre-copy (a sparse file, each page at its address), -1, or
    /// `POST_COPY`.
    pub base_fd: i32,
    /// Offset of the `nmaps` MapOps.
    pub ops_off: u64,
    /// Image stream, positioned at this process's first Pages chunk.
    pub image_fd: i32,
    /// Control socket to the launcher; handed on to the shim.
    pub ctl_fd: i32,
    /// Executable for /proc/self/exe (-1: leave).
    pub exe_fd: i32,
    /// Sequence number of the first chunk of the job's page data (for the first process; the others learn
    /// theirs from the one before, through `Sync::seq`).
    pub first_seq: u64,
    /// Where the vvar/vdso block goes (0: none), and where its vDSO text then lies (checked).
    pub vdso_addr: u64,
    pub vdso_text: u64,
    pub mm: PrctlMmMap,
    pub auxv_off: u64,
    pub auxv_len: u64,
    /// The shim's restart function, its stack, and its argument (blob offset and length).
    pub restart_entry: u64,
    pub restart_stack_top: u64,
    pub blob_off: u64,
    pub blob_len: u64,
    /// Guard pages to install once the pages are in (madvise MADV_GUARD_INSTALL): `nguards` pairs of u64 (start,
    /// length) at this offset.
    pub guards_off: u64,
    pub nguards: u64,
}

/// madvise(2) advice that makes pages guard pages (Linux 6.13).
pub const MADV_GUARD_INSTALL: i32 = 102;

/// The region receives page data from the image (it stays writable until all of it has arrived).
pub const OP_FILL: u32 = 1;
/// The region gets MAP_GROWSDOWN (a main stack).
pub const OP_GROWSDOWN: u32 = 2;
/// A System V shared memory attachment: the piece at segment offset 0 attaches the whole segment (shmat), every
/// piece then gets its protection. `flags` holds SHM_RDONLY or 0.
pub const OP_SHMAT: u32 = 4;
/// Anonymous memory whose bytes come from the plan itself (a copy of the image's vDSO), then get `prot`.
pub const OP_COPY: u32 = 8;
/// `fd` is memory the restore itself made (a memfd or unnamed file holding shared memory): a MAP_SHARED mapping
/// of it may take page data. Page data never lands in a shared mapping of any other file: it would write the file.
pub const OP_OWNED: u32 = 16;

impl MapOp {
    /// Whether page data may land in this region: OP_FILL, plain mmap (not System V, not a copy), and no shared
    /// mapping of a file but one the restore made.
    pub fn fillable(&self) -> bool {
        let shared_file = self.flags & libc::MAP_SHARED as u32 != 0 && self.flags & libc::MAP_ANONYMOUS as u32 == 0;
        self.op & OP_FILL != 0 && self.op & (OP_SHMAT | OP_COPY) == 0 && (!shared_file || self.op & OP_OWNED != 0)
    }

    /// The region's end, if it is a well-formed one: page aligned, not empty, within user space, no overflow.
    pub fn end(&self) -> Option<u64> {
        let end = self.addr.checked_add(self.len)?;
        let aligned = self.addr.is_multiple_of(4096) && self.len.is_multiple_of(4096);
        (aligned && self.len > 0 && end <= USER_END).then_some(end)
    }

    /// Whether it touches the restorer's own window.
    pub fn overlaps_window(&self) -> bool {
        self.addr < WINDOW_END && self.addr.saturating_add(self.len) > WINDOW_START
    }
}

/// One region to recreate at its original address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MapOp {
    pub addr: u64,
    pub len: u64,
    /// File offset (file mappings).
    pub offset: u64,
    /// Final protection (PROT_*); the region is writable while page data arrives.
    pub prot: u32,
    /// MAP_PRIVATE / MAP_SHARED / MAP_ANONYMOUS.
    pub flags: u32,
    /// File to map, -1 for anonymous.
    pub fd: i32,
    /// OP_* bits.
    pub op: u32,
    /// Anonymous vma name ("[anon:NAME]") in the blob, NUL-terminated; len 0 = none.
    pub name_off: u64,
    pub name_len: u64,
    /// madvise() advice to apply after mapping, as bits of `ADVICE`.
    pub advice: u32,
    /// OP_SHMAT: the System V shared memory segment.
    pub shmid: i32,
    /// OP_COPY: the region's bytes in the plan.
    pub data_off: u64,
    pub data_len: u64,
}

impl MapOp {
    /// Move the op's offsets into the plan (name, data) by `by` bytes, as its plan moves within a larger one.
    pub fn shift(&mut self, by: u64) {
        if self.name_len > 0 {
            self.name_off += by;
        }
        if self.data_len > 0 {
            self.data_off += by;
        }
    }
}

/// Advice bits for `MapOp::advice`, in order; bit i means madvise(ADVICE[i]).
pub const ADVICE: [i32; 6] = [
    libc::MADV_DONTFORK,
    libc::MADV_WIPEONFORK,
    libc::MADV_DONTDUMP,
    libc::MADV_HUGEPAGE,
    libc::MADV_NOHUGEPAGE,
    libc::MADV_MERGEABLE,
];

pub const REPORT_MAGIC: u32 = u32::from_le_bytes(*b"VRPT");
pub const REPORT_OK: u32 = 0;
pub const REPORT_FAILED: u32 = 1;

/// What the restorer tells the launcher once page data is in place (or why it gave up).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RestorerReport {
    pub magic: u32,
    pub status: u32,
    /// The sequence number of the next chunk in the stream, which the launcher reads on.
    pub next_seq: u64,
    pub pages: u64,
    /// Runs of pre-copied pages left to be filled after the job resumes: a message with the userfaultfd that
    /// covers them and their table (`PageRun`s) follows the report.
    pub lazy_runs: u32,
    pub _pad: u32,
    pub msg: [u8; 240],
}

/// `base_fd` of a post-copy restore: the pages the image lists come from the source after the job resumes, so
/// every listed run must be left missing.
pub const POST_COPY: i32 = -2;

/// Most runs of pre-copied pages one process leaves to be filled lazily (the rest are copied at once).
pub const MAX_LAZY_RUNS: usize = 2048;

impl RestorerReport {
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: repr(C) plain data without padding holes that matter; read-only view.
        unsafe { core::slice::from_raw_parts(self as *const Self as *const u8, core::mem::size_of::<Self>()) }
    }
    pub fn from_bytes(b: &[u8]) -> Option<RestorerReport> {
        if b.len() != core::mem::size_of::<Self>() {
            return None;
        }
        // SAFETY: length checked; every bit pattern is a valid RestorerReport; read_unaligned copies.
        let r: RestorerReport = unsafe { core::ptr::read_unaligned(b.as_ptr() as *const RestorerReport) };
        (r.magic == REPORT_MAGIC).then_some(r)
    }
    pub fn message(&self) -> &str {
        let n = self.msg.iter().position(|&c| c == 0).unwrap_or(self.msg.len());
        core::str::from_utf8(&self.msg[..n]).unwrap_or("(unreadable message)")
    }
}

/// View a plain-data value as bytes (for building the plan).
///
/// # Safety
/// `T` must be `repr(C)` plain data.
pub unsafe fn bytes_of<T>(v: &T) -> &[u8] {
    // SAFETY: forwarded contract.
    unsafe { core::slice::from_raw_parts(v as *const T as *const u8, core::mem::size_of::<T>()) }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::format;

    /// The restorer is linked at WINDOW_START (restore/build.rs); both must agree.
    #[test]
    fn restorer_links_inside_the_window() {
        let build = include_str!("../../restore/build.rs");
        assert!(build.contains(&format!("--image-base={:#x}", super::WINDOW_START)));
    }
}
