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
    use super::*;
    use proptest::prelude::*;
    use std::format;
    use std::string::String;

    /// The restorer is linked at WINDOW_START (restore/build.rs); both must agree.
    #[test]
    fn restorer_links_inside_the_window() {
        let build = include_str!("../../restore/build.rs");
        assert!(build.contains(&format!("--image-base={:#x}", super::WINDOW_START)));
    }

    /// The window's parts: the restorer's code, then its plan, then the Sync page, all in user space; the plan
    /// records lie end to end in the plan at 8-aligned offsets (the restorer reads them in place); the kernel
    /// takes `prctl_mm_map` only at its own size.
    #[test]
    fn layout() {
        const {
            assert!(WINDOW_START.is_multiple_of(4096) && WINDOW_END <= USER_END);
            assert!(WINDOW_START < PLAN_ADDR && PLAN_ADDR < SYNC_ADDR && SYNC_ADDR + 4096 == WINDOW_END);
            assert!(MAX_PLAN as u64 == SYNC_ADDR - PLAN_ADDR);
            assert!(core::mem::size_of::<Sync>() <= 4096);
        }
        for (size, align) in [
            (core::mem::size_of::<JobPlanHead>(), core::mem::align_of::<JobPlanHead>()),
            (core::mem::size_of::<ProcEntry>(), core::mem::align_of::<ProcEntry>()),
            (core::mem::size_of::<PlanHead>(), core::mem::align_of::<PlanHead>()),
            (core::mem::size_of::<MapOp>(), core::mem::align_of::<MapOp>()),
        ] {
            assert!(size.is_multiple_of(8) && align <= 8, "{size} {align}");
        }
        assert_eq!(core::mem::size_of::<PrctlMmMap>(), 104);
        // `bytes_of` may only see records without padding (its bytes would be uninitialized). PlanHead has a hole
        // of 4 bytes after `exe_fd`, so it is left out here.
        assert_eq!(core::mem::size_of::<JobPlanHead>(), 8 + 4 + 4 + 8 + 8 + 8);
        assert_eq!(core::mem::size_of::<ProcEntry>(), 8 * 4 + 8);
        assert_eq!(core::mem::size_of::<MapOp>(), 3 * 8 + 4 * 4 + 2 * 8 + 2 * 4 + 2 * 8);
        assert_eq!(core::mem::size_of::<RestorerReport>(), 4 + 4 + 8 + 8 + 4 + 4 + 240);
    }

    fn addr() -> impl Strategy<Value = u64> {
        prop_oneof![
            any::<u64>(),
            (0..USER_END / 4096 + 2).prop_map(|p| p * 4096),
            (WINDOW_START / 4096 - 4..WINDOW_END / 4096 + 4).prop_map(|p| p * 4096),
            Just(USER_END),
        ]
    }

    fn length() -> impl Strategy<Value = u64> {
        prop_oneof![any::<u64>(), (0..64u64).prop_map(|p| p * 4096), Just(WINDOW_LEN), Just(4095)]
    }

    fn flags() -> impl Strategy<Value = u32> {
        let bits = std::vec![libc::MAP_PRIVATE, libc::MAP_SHARED, libc::MAP_ANONYMOUS, libc::MAP_NORESERVE];
        proptest::sample::subsequence(bits, 0..=4).prop_map(|b| b.iter().fold(0, |a, f| a | *f as u32))
    }

    fn ops() -> impl Strategy<Value = u32> {
        prop_oneof![any::<u32>(), 0..32u32]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// For a well-formed region, touching the window means sharing a byte with it.
        #[test]
        fn window_overlap_is_range_intersection(addr in addr(), len in length()) {
            let op = MapOp { addr, len, ..Default::default() };
            if let Some(end) = op.end() {
                prop_assert_eq!(op.overlaps_window(), addr.max(WINDOW_START) < end.min(WINDOW_END));
            }
        }

        /// Page data lands only where the restore may write: a region marked for it, not System V memory nor a
        /// copy, and no shared mapping of a file but one the restore made itself; every other such region takes it.
        #[test]
        fn page_data_lands_only_in_memory_the_restore_owns(flags in flags(), op in ops()) {
            let m = MapOp { flags, op, ..Default::default() };
            let shared_file = flags & libc::MAP_SHARED as u32 != 0 && flags & libc::MAP_ANONYMOUS as u32 == 0;
            let may = op & OP_FILL != 0 && op & (OP_SHMAT | OP_COPY) == 0 && (!shared_file || op & OP_OWNED != 0);
            prop_assert_eq!(m.fillable(), may);
            if shared_file && op & OP_OWNED == 0 {
                prop_assert!(!m.fillable());
            }
        }

        /// Moving an op's plan moves exactly the offsets of the parts it has (a name, data) and nothing else.
        #[test]
        fn shifting_moves_only_present_offsets(w in any::<[u64; 7]>(), n in any::<[u32; 5]>(), has_name in any::<bool>(), has_data in any::<bool>(), by in 0..1u64 << 40) {
            let op = MapOp {
                addr: w[0], len: w[1], offset: w[2], prot: n[0], flags: n[1], fd: n[2] as i32, op: n[3],
                name_off: w[3] >> 24, name_len: if has_name { w[4] } else { 0 }, advice: n[4], shmid: w[5] as i32,
                data_off: w[6] >> 24, data_len: if has_data { w[5] } else { 0 },
            };
            let mut moved = op;
            moved.shift(by);
            let want = MapOp {
                name_off: if has_name { op.name_off + by } else { op.name_off },
                data_off: if has_data { op.data_off + by } else { op.data_off },
                ..op
            };
            prop_assert_eq!(format!("{moved:?}"), format!("{want:?}"));
        }

        /// Plan records as the launcher writes them (`bytes_of`) read back as the restorer reads them
        /// (`read_unaligned`, at any offset) field for field. (Not PlanHead: see `layout`.)
        #[test]
        fn plan_records_read_back_as_written(w in any::<[u64; 12]>(), n in any::<[u32; 8]>(), at in 0..8usize) {
            fn back<T: Copy + core::fmt::Debug>(v: &T, at: usize) -> (String, String) {
                // SAFETY: the plan's records are repr(C) plain data.
                let b = unsafe { bytes_of(v) };
                let mut buf = std::vec![0u8; at];
                buf.extend_from_slice(b);
                // SAFETY: `buf[at..]` holds size_of::<T>() bytes of a T; read_unaligned copies them.
                let r: T = unsafe { core::ptr::read_unaligned(buf[at..].as_ptr() as *const T) };
                (format!("{r:?}"), format!("{v:?}"))
            }
            let head = JobPlanHead { magic: w[0], nproc: n[0], nleaders: n[1], procs_off: w[1], sync_off: w[2], total_len: w[3] };
            let (a, b) = back(&head, at);
            prop_assert_eq!(a, b);
            let e = ProcEntry {
                pid: n[0] as i32, ppid: n[1] as i32, pgid: n[2] as i32, sid: n[3] as i32, zombie: n[4], status: n[5] as i32,
                order: n[6], _pad: 0, plan_off: w[4],
            };
            let (a, b) = back(&e, at);
            prop_assert_eq!(a, b);
            let op = MapOp {
                addr: w[0], len: w[1], offset: w[2], prot: n[0], flags: n[1], fd: n[2] as i32, op: n[3], name_off: w[3],
                name_len: w[4], advice: n[4], shmid: n[5] as i32, data_off: w[5], data_len: w[6],
            };
            let (a, b) = back(&op, at);
            prop_assert_eq!(a, b);
            let mm = PrctlMmMap {
                start_code: w[0], end_code: w[1], start_data: w[2], end_data: w[3], start_brk: w[4], brk: w[5],
                start_stack: w[6], arg_start: w[7], arg_end: w[8], env_start: w[9], env_end: w[10], auxv: w[11],
                auxv_size: n[6], exe_fd: n[7],
            };
            let (a, b) = back(&mm, at);
            prop_assert_eq!(a, b);
        }

        /// A report read back from its bytes is the report the restorer sent, its message the text it put there
        /// (cut to fit, as `report` does); bytes of another length or without the magic are no report.
        #[test]
        fn reports_read_back(status in any::<u32>(), next_seq in any::<u64>(), pages in any::<u64>(), lazy_runs in any::<u32>(),
                             text in "[ -~]{0,300}", magic in any::<u32>(), extra in 1..8usize) {
            let mut r = RestorerReport { magic: REPORT_MAGIC, status, next_seq, pages, lazy_runs, _pad: 0, msg: [0; 240] };
            let n = text.len().min(r.msg.len() - 1);
            r.msg[..n].copy_from_slice(&text.as_bytes()[..n]);
            let back = RestorerReport::from_bytes(r.as_bytes()).unwrap();
            prop_assert_eq!((back.status, back.next_seq, back.pages, back.lazy_runs), (status, next_seq, pages, lazy_runs));
            prop_assert_eq!(back.message(), &text[..n]);
            let b = r.as_bytes();
            prop_assert!(RestorerReport::from_bytes(&b[..b.len() - extra]).is_none());
            let mut longer = b.to_vec();
            longer.resize(b.len() + extra, 0);
            prop_assert!(RestorerReport::from_bytes(&longer).is_none());
            prop_assume!(magic != REPORT_MAGIC);
            r.magic = magic;
            prop_assert!(RestorerReport::from_bytes(r.as_bytes()).is_none());
        }
    }

    #[test]
    fn a_report_that_is_not_text_says_so() {
        let mut r = RestorerReport { magic: REPORT_MAGIC, status: REPORT_FAILED, next_seq: 0, pages: 0, lazy_runs: 0, _pad: 0, msg: [0; 240] };
        r.msg[..3].copy_from_slice(&[b'a', 0xff, b'b']);
        assert_eq!(r.message(), "(unreadable message)");
        r.msg = [b'x'; 240];
        assert_eq!(r.message().len(), 240, "a message without its NUL is taken whole");
    }
}
