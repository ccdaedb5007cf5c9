//! The PAGEMAP_SCAN ioctl on /proc/PID/pagemap (Linux 6.7): which pages of a range are present, copied on
//! write, written since they were last write-protected. The shim uses it to find the pages worth storing; the
//! supervisor, on another process's pagemap, to find what a running job wrote between pre-copy rounds.

pub const PAGEMAP_SCAN: u64 = 0xc060_6610;
/// Write-protect the pages found (async userfaultfd tracking starts over for them).
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// A guard page (madvise MADV_GUARD_INSTALL): reported since Linux 6.14, as swapped too.
pub const PAGE_IS_GUARD: u64 = 1 << 8;

#[repr(C)]
#[derive(Default)]
pub struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

impl PmScanArg {
    /// A scan of [start, end) for pages that hold data (present or swapped) and have every category of `mask`,
    /// those also in `inverted` negated; found ranges go to `vec`. `flags`: PM_SCAN_WP_MATCHING or 0.
    pub fn new(start: u64, end: u64, vec: &mut [PageRegion], flags: u64, inverted: u64, mask: u64) -> PmScanArg {
        PmScanArg {
            size: core::mem::size_of::<PmScanArg>() as u64,
            flags,
            start,
            end,
            vec: vec.as_mut_ptr() as u64,
            vec_len: vec.len() as u64,
            category_inverted: inverted,
            category_mask: mask,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            ..Default::default()
        }
    }
}

/// Why a scan stopped: the ioctl failed for the call starting at `at`, or the visitor returned an error.
pub enum ScanError<E> {
    Ioctl { at: u64, errno: crate::sys::Errno },
    Visit(E),
}

/// Walk [start, end) of `pagemap` (an open /proc/PID/pagemap) with PAGEMAP_SCAN, the pages chosen as in
/// `PmScanArg::new`, calling `f` for each range found, in order; `vec` is the room for one call's ranges.
#[allow(clippy::too_many_arguments)] // PAGEMAP_SCAN's own fields, passed through as the kernel takes them.
pub fn scan<E>(
    pagemap: i32,
    start: u64,
    end: u64,
    vec: &mut [PageRegion],
    flags: u64,
    inverted: u64,
    mask: u64,
    f: &mut dyn FnMut(u64, u64) -> Result<(), E>,
) -> Result<(), ScanError<E>> {
    walk(pagemap, start, end, vec, &|at, vec| PmScanArg::new(at, end, vec, flags, inverted, mask), f)
}

/// Walk [start, end) of `pagemap` for guard pages: `f` for each range of them, in order. A kernel that cannot report
/// them (before 6.14) fails with EINVAL.
pub fn scan_guards<E>(pagemap: i32, start: u64, end: u64, vec: &mut [PageRegion], f: &mut dyn FnMut(u64, u64) -> Result<(), E>) -> Result<(), ScanError<E>> {
    let arg = |at, vec: &mut [PageRegion]| PmScanArg {
        category_mask: PAGE_IS_GUARD,
        category_anyof_mask: 0,
        return_mask: PAGE_IS_GUARD,
        ..PmScanArg::new(at, end, vec, 0, 0, 0)
    };
    walk(pagemap, start, end, vec, &arg, f)
}

fn walk<E>(
    pagemap: i32,
    start: u64,
    end: u64,
    vec: &mut [PageRegion],
    make: &dyn Fn(u64, &mut [PageRegion]) -> PmScanArg,
    f: &mut dyn FnMut(u64, u64) -> Result<(), E>,
) -> Result<(), ScanError<E>> {
    let mut at = start;
    while at < end {
        let mut arg = make(at, vec);
        let n = crate::sys::ioctl(pagemap, PAGEMAP_SCAN, &mut arg as *mut PmScanArg as usize).map_err(|errno| ScanError::Ioctl { at, errno })?;
        for r in &vec[..n] {
            f(r.start, r.end).map_err(ScanError::Visit)?;
        }
        if arg.walk_end <= at {
            break;
        }
        at = arg.walk_end;
    }
    Ok(())
}
