//! Memory: the address space as /proc/self/smaps shows it, and the pages that must travel.
//!
//! Which pages are stored: in private memory, the touched ones (PAGEMAP_SCAN: present or swapped) that are not
//! the shared zero page; of those, anonymous pages full of zeros are skipped (they come back as fresh zero
//! pages); in private file mappings only the pages copied on write (the rest is the file's, mapped again at
//! restore after an identity check). Shared file mappings keep their data in the file. The restorer undoes it
//! (restore/src/memory.rs).

use crate::procfs;
use crate::writer::Writer;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use vos::chunk::{self, PageRun};
use vos::hashring::{self, Ring};
use vos::image::*;
use vos::plan;
use vos::sys::{self, Errno};

const PAGE: usize = chunk::PAGE;

/// One line of /proc/self/smaps, with its VmFlags.
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub prot: u32,
    pub shared: bool,
    pub offset: u64,
    pub dev: (u32, u32),
    pub inode: u64,
    pub name: String,
    pub vmflags: u32,
}

pub fn read_vmas() -> Result<Vec<Vma>, String> {
    let text = procfs::read_string("/proc/thread-self/smaps").map_err(|e| format!("reading /proc/thread-self/smaps: {e}"))?;
    let mut out: Vec<Vma> = Vec::new();
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(v) = out.last_mut() {
                v.vmflags = parse_vmflags(flags);
            }
            continue;
        }
        if let Some(v) = parse_header(line) {
            out.push(v);
        }
    }
    Ok(out)
}

fn parse_header(line: &str) -> Option<Vma> {
    let mut rest = line;
    let mut field = || {
        let t = rest.trim_start();
        let end = t.find(' ').unwrap_or(t.len());
        let (f, r) = t.split_at(end);
        rest = r;
        f
    };
    let range = field();
    let (a, b) = range.split_once('-')?;
    let start = procfs::parse_hex(a.as_bytes())?;
    let end = procfs::parse_hex(b.as_bytes())?;
    let perms = field().as_bytes();
    if perms.len() != 4 {
        return None;
    }
    let offset = procfs::parse_hex(field().as_bytes())?;
    let (ma, mi) = field().split_once(':')?;
    let dev = (procfs::parse_hex(ma.as_bytes())? as u32, procfs::parse_hex(mi.as_bytes())? as u32);
    let inode = procfs::parse_dec(field().as_bytes())?;
    let mut prot = 0;
    if perms[0] == b'r' {
        prot |= libc::PROT_READ as u32;
    }
    if perms[1] == b'w' {
        prot |= libc::PROT_WRITE as u32;
    }
    if perms[2] == b'x' {
        prot |= libc::PROT_EXEC as u32;
    }
    Some(Vma { start, end, prot, shared: perms[3] == b's', offset, dev, inode, name: rest.trim().into(), vmflags: 0 })
}

fn parse_vmflags(s: &str) -> u32 {
    s.split_whitespace()
        .map(|f| match f {
            "gd" => VMF_GROWSDOWN,
            "dc" => VMF_DONTFORK,
            "wf" => VMF_WIPEONFORK,
            "dd" => VMF_DONTDUMP,
            "hg" => VMF_HUGEPAGE,
            "nh" => VMF_NOHUGEPAGE,
            "mg" => VMF_MERGEABLE,
            "lo" => VMF_LOCKED,
            "mw" => VMF_MAYWRITE,
            _ => 0,
        })
        .fold(0, |a, b| a | b)
}

fn makedev(major: u32, minor: u32) -> u64 {
    let (ma, mi) = (major as u64, minor as u64);
    ((ma & 0xfff) << 8) | (mi & 0xff) | ((mi & !0xff) << 12) | ((ma & !0xfff) << 32)
}

/// Identify a file the process maps or has open, checking that the path still names that very file.
pub fn file_id(path: &str, dev: u64, ino: u64) -> Result<FileId, String> {
    let st = sys::stat(&procfs::cpath(path)).map_err(|e| format!("{path}: {e}"))?;
    if st.st_dev != dev || st.st_ino != ino {
        return Err(format!("{path} was replaced by another file since it was opened"));
    }
    Ok(FileId {
        path: path.into(),
        dev,
        ino,
        size: st.st_size as u64,
        mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
        build_id: None,
        hash: 0,
    })
}

/// Turn the address space into image regions; refuse what cannot be restored yet, naming it. `skip` lists
/// address ranges of the shim itself (its restorer window, its session arena): they are cut out, even where the
/// kernel merged them with a neighbouring mapping of the app.
pub fn capture(vmas: &[Vma], skip: &[(u64, u64)]) -> Result<Vec<Region>, String> {
    let mut pieces: Vec<Vma> = Vec::with_capacity(vmas.len());
    for v in vmas {
        for (s, e) in subtract(v.start, v.end, skip) {
            pieces.push(Vma {
                start: s,
                end: e,
                prot: v.prot,
                shared: v.shared,
                offset: if v.inode != 0 || v.shared { v.offset + (s - v.start) } else { v.offset },
                dev: v.dev,
                inode: v.inode,
                name: v.name.clone(),
                vmflags: v.vmflags,
            });
        }
    }
    let mut out = Vec::with_capacity(pieces.len());
    let mut mem = Mem(-1);
    for v in &pieces {
        if v.name == "[vsyscall]" || v.name.starts_with("[anon:vos-") {
            continue;
        }
        if v.start < plan::WINDOW_END && v.end > plan::WINDOW_START {
            return Err(format!(
                "memory at {:#x}-{:#x} ({}) lies in the restorer's window {:#x}-{:#x}",
                v.start, v.end, v.name, plan::WINDOW_START, plan::WINDOW_END
            ));
        }
        let mut r = Region {
            start: v.start,
            end: v.end,
            prot: v.prot,
            shared: v.shared,
            kind: RegionKind::Anon,
            name: v.name.clone(),
            offset: 0,
            file: None,
            vmflags: v.vmflags,
            contents: Contents::Pages,
            shared_memory: None,
            dev: makedev(v.dev.0, v.dev.1),
            ino: v.inode,
            guards: Vec::new(),
        };
        let what = || format!("memory at {:#x}-{:#x} ({})", v.start, v.end, v.name);
        match v.name.as_str() {
            "[vdso]" => (r.kind, r.contents) = (RegionKind::Vdso, Contents::Nothing),
            "[vvar]" => (r.kind, r.contents) = (RegionKind::Vvar, Contents::Nothing),
            "[vvar_vclock]" => (r.kind, r.contents) = (RegionKind::VvarVclock, Contents::Nothing),
            "[heap]" => r.kind = RegionKind::Heap,
            "[stack]" => r.kind = RegionKind::Stack,
            n if n.is_empty() || n.starts_with("[anon:") => {
                r.kind = if v.shared { RegionKind::SharedAnon } else { RegionKind::Anon };
                r.offset = v.offset;
            }
            // The segment's contents travel with the job's System V objects; its inode number is its id.
            n if n.starts_with("/SYSV") => {
                (r.kind, r.contents) = (RegionKind::SysvShm, Contents::Elsewhere);
                r.offset = v.offset;
            }
            // Shared memory no file on disk keeps: its pages travel in the image (one process stores them).
            n if v.shared && (n.starts_with("[anon_shmem:") || is_detached(n)) => {
                r.kind = RegionKind::SharedAnon;
                r.offset = v.offset;
            }
            // Every page travels (no file will be there to map again); pages wholly past the end of the mapped
            // object fault with SIGBUS when touched, so they are never read and come back as such pages.
            n if is_detached(n) => {
                r.kind = RegionKind::Detached;
                r.offset = v.offset;
                let cut = past_end(&mut mem, v)?;
                if cut < v.end {
                    let mut tail = r.clone();
                    (tail.start, tail.offset, tail.contents) = (cut, v.offset + (cut - v.start), Contents::Nothing);
                    if cut > v.start {
                        r.end = cut;
                        out.push(r);
                    }
                    out.push(tail);
                    continue;
                }
            }
            n if n.starts_with('/') => {
                let id = file_id(n, makedev(v.dev.0, v.dev.1), v.inode).map_err(|e| format!("{}: {e}", what()))?;
                let st = sys::stat(&procfs::cpath(n)).map_err(|e| format!("{}: {e}", what()))?;
                if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                    return Err(format!("{}: mappings of devices are not supported", what()));
                }
                r.kind = RegionKind::File;
                r.offset = v.offset;
                r.file = Some(id);
                if v.shared {
                    r.contents = Contents::File;
                }
            }
            _ => return Err(format!("{}: this kind of mapping is not supported", what())),
        }
        out.push(r);
    }
    find_guards(&mut out)?;
    Ok(out)
}

/// /proc/thread-self/mem, opened when first needed.
struct Mem(i32);

impl Drop for Mem {
    fn drop(&mut self) {
        if self.0 >= 0 {
            let _ = sys::close(self.0);
        }
    }
}

/// The first page of a private file mapping that lies wholly past the end of the mapped object (its end: none).
/// Reading such a page faults with SIGBUS. The object's size, where /proc lets this process see it (map_files needs
/// CAP_CHECKPOINT_RESTORE), tells; otherwise a binary search for the first page /proc/thread-self/mem cannot read
/// (pages past the end are the mapping's last ones).
fn past_end(mem: &mut Mem, v: &Vma) -> Result<u64, String> {
    let (start, end) = (v.start, v.end);
    if let Ok(st) = sys::stat(&procfs::cpath(&format!("/proc/thread-self/map_files/{start:x}-{end:x}"))) {
        let object_end = (st.st_size as u64).next_multiple_of(PAGE as u64);
        return Ok(if object_end <= v.offset { start } else { end.min(start + (object_end - v.offset)) });
    }
    if mem.0 < 0 {
        mem.0 = procfs::open_own("mem").map_err(|e| format!("/proc/thread-self/mem: {e}"))?;
    }
    let readable = |page: u64| {
        let mut b = [0u8; 1];
        sys::pread(mem.0, &mut b, start + page * PAGE as u64).is_ok_and(|n| n == 1)
    };
    let (mut lo, mut hi) = (0u64, (end - start) / PAGE as u64);
    if readable(hi - 1) {
        return Ok(end);
    }
    // Invariant: every page below lo reads, page hi does not.
    hi -= 1;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if readable(mid) { lo = mid + 1 } else { hi = mid }
    }
    Ok(start + lo * PAGE as u64)
}

/// Record each region's guard pages (madvise MADV_GUARD_INSTALL): the kernel reports them as swapped out, and
/// reading one faults, so they are never read; the restorer installs them again. A kernel that cannot tell them
/// (before Linux 6.14) has none to tell.
fn find_guards(regions: &mut [Region]) -> Result<(), String> {
    let pagemap = procfs::open_own("pagemap").map_err(|e| format!("/proc/thread-self/pagemap: {e}"))?;
    let mut vec = [PageRegion::default(); 64];
    let mut r = Ok(());
    for reg in regions.iter_mut().filter(|r| !matches!(r.kind, RegionKind::Vdso | RegionKind::Vvar | RegionKind::VvarVclock)) {
        let mut guards: Vec<(u64, u64)> = Vec::new();
        let found = pagemap::scan_guards(pagemap, reg.start, reg.end, &mut vec, &mut |a, b| {
            match guards.last_mut() {
                Some(last) if last.1 == a => last.1 = b,
                _ => guards.push((a, b)),
            }
            Ok::<(), ()>(())
        });
        match found {
            Ok(()) | Err(ScanError::Visit(())) => reg.guards = guards,
            Err(ScanError::Ioctl { errno, .. }) if errno.0 == libc::EINVAL => break,
            Err(ScanError::Ioctl { at, errno }) => {
                r = Err(format!("finding guard pages at {at:#x}: {errno}"));
                break;
            }
        }
    }
    let _ = sys::close(pagemap);
    r
}

// ---- page scanning ---------------------------------------------------------------------------------------------

use vos::pagemap::{self, PAGE_IS_FILE, PAGE_IS_PFNZERO, PageRegion, ScanError};

/// Finds the pages of a region worth storing.
pub struct Scanner {
    pagemap: i32,
    use_scan: bool,
}

impl Scanner {
    pub fn open() -> Result<Scanner, String> {
        let pagemap = procfs::open_own("pagemap").map_err(|e| format!("/proc/thread-self/pagemap: {e}"))?;
        Ok(Scanner { pagemap, use_scan: true })
    }

    /// Call `f(start, end)` for each range of pages that hold data of their own: touched, not the shared zero
    /// page, and (for file mappings) copied on write.
    fn ranges(&mut self, r: &Region, f: &mut dyn FnMut(u64, u64) -> Result<(), String>) -> Result<(), String> {
        match r.kind {
            RegionKind::SharedAnon => return self.resident(r, f),
            RegionKind::Detached => return f(r.start, r.end),
            _ => {}
        }
        let (mut mask, mut inverted) = (PAGE_IS_PFNZERO, PAGE_IS_PFNZERO);
        if r.kind == RegionKind::File {
            mask |= PAGE_IS_FILE;
            inverted |= PAGE_IS_FILE;
        }
        if self.use_scan {
            let mut vec = [PageRegion::default(); 512];
            return match pagemap::scan(self.pagemap, r.start, r.end, &mut vec, 0, inverted, mask, f) {
                Ok(()) => Ok(()),
                Err(ScanError::Visit(e)) => Err(e),
                Err(ScanError::Ioctl { at, errno }) if at == r.start && (errno.0 == libc::ENOTTY || errno.0 == libc::EINVAL) => {
                    self.use_scan = false;
                    self.ranges(r, f)
                }
                Err(ScanError::Ioctl { at, errno }) => Err(format!("PAGEMAP_SCAN at {at:#x}: {errno}")),
            };
        }
        self.pagemap_ranges(r, f)
    }

    /// Fallback for kernels without PAGEMAP_SCAN: read the 64-bit pagemap entries.
    fn pagemap_ranges(&mut self, r: &Region, f: &mut dyn FnMut(u64, u64) -> Result<(), String>) -> Result<(), String> {
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        const FILE: u64 = 1 << 61;
        let mut buf = alloc::vec![0u64; 8192];
        let mut addr = r.start;
        let mut run: Option<u64> = None;
        while addr < r.end {
            let n = (((r.end - addr) as usize) / PAGE).min(buf.len());
            // SAFETY: viewing the u64 buffer as bytes for pread.
            let bytes = unsafe { core::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u8, n * 8) };
            let got = sys::pread(self.pagemap, bytes, (addr / PAGE as u64) * 8).map_err(|e| format!("pagemap: {e}"))? / 8;
            if got == 0 {
                break;
            }
            for (k, e) in buf[..got].iter().enumerate() {
                let a = addr + (k * PAGE) as u64;
                let own = e & (PRESENT | SWAPPED) != 0 && !(r.kind == RegionKind::File && e & FILE != 0);
                match (own, run) {
                    (true, None) => run = Some(a),
                    (false, Some(s)) => {
                        f(s, a)?;
                        run = None;
                    }
                    _ => {}
                }
            }
            addr += (got * PAGE) as u64;
        }
        if let Some(s) = run {
            f(s, addr)?;
        }
        Ok(())
    }

    /// Shared memory: pages present in the shared object, whether or not this process touched them.
    fn resident(&mut self, r: &Region, f: &mut dyn FnMut(u64, u64) -> Result<(), String>) -> Result<(), String> {
        let pages = ((r.end - r.start) as usize) / PAGE;
        let mut vec = alloc::vec![0u8; pages];
        // SAFETY: vec has one byte per page of the range.
        let rc = unsafe { sys::syscall6(libc::SYS_mincore, r.start as usize, (r.end - r.start) as usize, vec.as_mut_ptr() as usize, 0, 0, 0) };
        if rc != 0 {
            return Err(format!("mincore at {:#x}: {}", r.start, Errno(-rc as i32)));
        }
        let mut run: Option<u64> = None;
        for (k, v) in vec.iter().enumerate() {
            let a = r.start + (k * PAGE) as u64;
            match (v & 1 != 0, run) {
                (true, None) => run = Some(a),
                (false, Some(s)) => {
                    f(s, a)?;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(s) = run {
            f(s, r.end)?;
        }
        Ok(())
    }
}

impl Drop for Scanner {
    fn drop(&mut self) {
        let _ = sys::close(self.pagemap);
    }
}

fn is_zero(page: *const u8) -> bool {
    // SAFETY: page points at PAGE readable bytes.
    let words = unsafe { core::slice::from_raw_parts(page as *const u64, PAGE / 8) };
    words[0] == 0 && words.iter().all(|&w| w == 0)
}

/// Hashes page chunks on a second thread while the coordinator writes the previous ones.
static RING: Ring = Ring::new();

/// The hashing ring (left out of images: it changes while they are written).
pub fn ring_range() -> (u64, u64) {
    RING.range()
}

/// Collects pages into Pages chunks of up to PAGES_PER_CHUNK pages, hands each to the hashing thread, and
/// writes chunks in order as their hashes come back.
struct Batch {
    runs: Vec<PageRun>,
    /// Where each run's bytes are: in place, or in a bounce buffer.
    src: Vec<u64>,
    pages: usize,
    /// Copies of pages the process cannot read itself (PROT_NONE, write-only), read through /proc/self/mem;
    /// one buffer more than the ring has slots, so the one being filled is never in flight.
    bounce: Vec<Vec<u8>>,
    cur: usize,
    bounce_used: usize,
    /// Start of the region the last run belongs to: runs never span regions (the restorer checks each run
    /// lies in one region).
    region: u64,
}

impl Batch {
    fn add(&mut self, w: &mut Writer, mem: i32, region: u64, readable: bool, addr: u64, len: u64) -> Result<(), String> {
        let mut a = addr;
        while a < addr + len {
            if self.pages == chunk::PAGES_PER_CHUNK || self.runs.len() == chunk::MAX_RUNS as usize {
                self.flush(w)?;
            }
            let room = (chunk::PAGES_PER_CHUNK - self.pages) as u64 * PAGE as u64;
            let n = room.min(addr + len - a);
            let src = if readable {
                a
            } else {
                if self.bounce.is_empty() {
                    self.bounce = (0..hashring::SLOTS + 1).map(|_| alloc::vec![0u8; chunk::PAGES_PER_CHUNK * PAGE]).collect();
                }
                let dst = &mut self.bounce[self.cur][self.bounce_used..self.bounce_used + n as usize];
                sys::pread(mem, dst, a).map_err(|e| format!("reading memory at {a:#x} through /proc/thread-self/mem: {e}"))?;
                self.bounce_used += n as usize;
                dst.as_ptr() as u64
            };
            match (self.runs.last_mut(), self.src.last()) {
                (Some(r), Some(&s)) if r.addr + r.len == a && region == self.region && s + r.len == src => r.len += n,
                _ => {
                    self.runs.push(PageRun { addr: a, len: n });
                    self.src.push(src);
                    self.region = region;
                }
            }
            self.pages += (n as usize) / PAGE;
            a += n;
        }
        Ok(())
    }

    /// Queue the collected pages as a chunk; write finished chunks while the ring is full.
    fn flush(&mut self, w: &mut Writer) -> Result<(), String> {
        if !self.runs.is_empty() {
            while RING.in_flight() as usize >= hashring::SLOTS {
                write_oldest(w)?;
            }
            let job = RING.slot();
            job.set_runs(&self.runs, &self.src);
            job.expected = hashring::NONE;
            RING.submit();
        }
        self.runs.clear();
        self.src.clear();
        self.pages = 0;
        if self.bounce_used > 0 {
            self.cur = (self.cur + 1) % self.bounce.len();
        }
        self.bounce_used = 0;
        Ok(())
    }

    /// Write everything still queued.
    fn drain(&mut self, w: &mut Writer) -> Result<(), String> {
        self.flush(w)?;
        while RING.in_flight() > 0 {
            write_oldest(w)?;
        }
        Ok(())
    }
}

fn write_oldest(w: &mut Writer) -> Result<(), String> {
    let job = RING.oldest_hashed();
    let r = w.pages(job).map_err(|e| format!("writing the image: {e}"));
    RING.release();
    r
}

/// [a, b) split by the sorted, disjoint `reuse` ranges: `f(start, end, reused)` for each piece, in order.
fn split_reuse(a: u64, b: u64, reuse: &[(u64, u64)], f: &mut dyn FnMut(u64, u64, bool) -> Result<(), String>) -> Result<(), String> {
    let mut p = a;
    let mut i = reuse.partition_point(|r| r.1 <= a);
    while p < b {
        match reuse.get(i) {
            Some(&(rs, re)) if rs < b => {
                if p < rs {
                    f(p, rs, false)?;
                }
                let (s, e) = (p.max(rs), re.min(b));
                if s < e {
                    f(s, e, true)?;
                }
                p = e.max(p);
                i += 1;
            }
            _ => {
                f(p, b, false)?;
                p = b;
            }
        }
    }
    Ok(())
}

/// Post-copy: join runs (sorted) across the smallest gaps until at most `max` remain, for the restorer must leave
/// each run missing on its own. A gap joined never crosses a region's edge or an excluded range; its pages,
/// absent here, are fetched as the zeros they are. False when the runs cannot be made that few.
fn coalesce(runs: &mut Vec<PageRun>, regions: &[Region], exclude: &[(u64, u64)], max: usize) -> bool {
    let joinable = |a: &PageRun, b: &PageRun| {
        let (gs, ge) = (a.addr + a.len, b.addr);
        let one_region = regions.get(regions.partition_point(|r| r.end <= a.addr)).is_some_and(|r| r.start <= a.addr && b.addr + b.len <= r.end);
        one_region && !exclude.iter().any(|&(xs, xe)| xs < ge && gs < xe)
    };
    let mut gap = PAGE as u64;
    while runs.len() > max && gap < 1 << 48 {
        let mut out: Vec<PageRun> = Vec::with_capacity(runs.len());
        for r in runs.drain(..) {
            match out.last_mut() {
                Some(last) if r.addr - (last.addr + last.len) <= gap && joinable(last, &r) => last.len = r.addr + r.len - last.addr,
                _ => out.push(r),
            }
        }
        *runs = out;
        gap *= 2;
    }
    runs.len() <= max
}

/// Write Reuse chunks listing `runs`.
fn write_reuse(w: &mut Writer, runs: &[PageRun]) -> Result<(), String> {
    for part in runs.chunks(chunk::MAX_RUNS as usize) {
        w.reuse(part).map_err(|e| format!("writing the image: {e}"))?;
    }
    Ok(())
}

/// Write the Pages chunks of every region; `exclude` lists shim-private ranges whose contents never travel
/// (the coordinator's own stack); pages in the sorted `reuse` ranges are only listed (the destination holds
/// them from pre-copy, or fetches them after the job resumes when `lazy`). Returns what was stored per region.
pub fn write_pages(w: &mut Writer, regions: &[Region], exclude: &[(u64, u64)], reuse: &[(u64, u64)], lazy: bool) -> Result<ProcessSummary, String> {
    let mut scanner = Scanner::open()?;
    let mem = procfs::open_own("mem").map_err(|e| format!("/proc/thread-self/mem: {e}"))?;
    let mut batch = Batch {
        runs: Vec::with_capacity(chunk::MAX_RUNS as usize),
        src: Vec::with_capacity(chunk::MAX_RUNS as usize),
        pages: 0,
        bounce: Vec::new(),
        cur: 0,
        bounce_used: 0,
        region: 0,
    };
    let mut summary = ProcessSummary { regions: Vec::with_capacity(regions.len()), bytes: 0 };
    let mut reused_runs: Vec<PageRun> = Vec::new();
    let start_bytes = w.bytes;
    RING.start(false);
    let result = (|| {
        for r in regions {
            let mut s = RegionSummary::default();
            if r.contents == Contents::Pages {
                let readable = r.prot & libc::PROT_READ as u32 != 0;
                let anon = r.kind != RegionKind::File;
                // Guard pages read as swapped out (or, in shared memory, resident): never touch them.
                let with_guards: Vec<(u64, u64)>;
                let exclude = if r.guards.is_empty() {
                    exclude
                } else {
                    with_guards = exclude.iter().chain(&r.guards).copied().collect();
                    &with_guards[..]
                };
                scanner.ranges(r, &mut |start, end| {
                    for (a0, b0) in subtract(start, end, exclude) {
                        split_reuse(a0, b0, reuse, &mut |a, b, reused| {
                        if reused {
                            // Runs never span regions; the ranges given here lie inside one.
                            match reused_runs.last_mut() {
                                Some(last) if last.addr + last.len == a && a != r.start => last.len += b - a,
                                _ => reused_runs.push(PageRun { addr: a, len: b - a }),
                            }
                            // Counted below, once the runs are final.
                            return Ok(());
                        }
                        let mut p = a;
                        while p < b {
                            // Zero pages of anonymous memory need not travel; a zero page copied from a file
                            // must (the file holds something else there).
                            if anon && readable && is_zero(p as *const u8) {
                                s.zero += 1;
                                p += PAGE as u64;
                                continue;
                            }
                            let mut q = p + PAGE as u64;
                            while q < b && !(anon && readable && is_zero(q as *const u8)) {
                                q += PAGE as u64;
                            }
                            batch.add(w, mem, r.start, readable, p, q - p)?;
                            s.stored += (q - p) / PAGE as u64;
                            p = q;
                        }
                        Ok(())
                        })?;
                    }
                    Ok(())
                })?;
            }
            summary.regions.push(s);
        }
        batch.drain(w)?;
        let exclude: Vec<(u64, u64)> = exclude.iter().chain(regions.iter().flat_map(|r| &r.guards)).copied().collect();
        if lazy && !coalesce(&mut reused_runs, regions, &exclude, plan::MAX_LAZY_RUNS) {
            return Err(format!(
                "its memory is in more pieces than a post-copy restore can leave to fetch ({} at most): migrate it without --lazy",
                plan::MAX_LAZY_RUNS
            ));
        }
        // The summary counts every page listed, reused ones too (as the runs go: joined across gaps for
        // post-copy), so a reader can check it against the chunks region by region.
        for run in &reused_runs {
            let i = regions.partition_point(|r| r.end <= run.addr);
            if let Some(s) = summary.regions.get_mut(i) {
                s.stored += run.len / PAGE as u64;
            }
        }
        write_reuse(w, &reused_runs)
    })();
    // Whatever happened, the hashing thread ends before the app may run again.
    while RING.in_flight() > 0 {
        let _ = RING.oldest_hashed();
        RING.release();
    }
    RING.finish();
    let _ = sys::close(mem);
    result?;
    summary.bytes = w.bytes - start_bytes;
    Ok(summary)
}

/// [start, end) minus the whole pages of the excluded ranges.
fn subtract(start: u64, end: u64, exclude: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = alloc::vec![(start, end)];
    let page = PAGE as u64;
    for &(xs, xe) in exclude {
        let (xs, xe) = (xs.next_multiple_of(page), xe / page * page);
        if xs >= xe {
            continue;
        }
        out = out
            .into_iter()
            .flat_map(|(a, b)| {
                if xe <= a || xs >= b {
                    alloc::vec![(a, b)]
                } else {
                    let mut v = Vec::new();
                    if a < xs {
                        v.push((a, xs));
                    }
                    if xe < b {
                        v.push((xe, b));
                    }
                    v
                }
            })
            .collect();
    }
    out
}
