//! Live migration's pre-copy, run by the supervisor while the job goes on.
//!
//! Each process first registers its private memory for write tracking (userfaultfd write-protect, async mode:
//! see the shim's `tracking`), in one short stop. Then round after round the supervisor reads, from
//! /proc/PID/pagemap with PAGEMAP_SCAN, the pages written since the round before (all touched pages in round
//! 0), protects them again in the same call, and sends their contents read from /proc/PID/mem. When a round
//! is small or no longer shrinks, the migration takes the final checkpoint: a page goes into the image only
//! if it changed; one unchanged since it was sent is listed as "reuse", and the destination takes it from
//! what pre-copy brought.
//!
//! "Unchanged" is decided page by page, strictly: the page was sent, its mapping is still tracked, the scan
//! says it was not written since, and it is still the same physical page (its frame number, which root reads
//! in pagemap, matches the one it had when sent; a page moved by mremap, swapped, or replaced has another).
//!
//! The stream to the migration: `channel::PageHead` records, each followed by its bytes.

use crate::migration::channel::PageHead;
use crate::checkpoint::{Shim, cancel};
use crate::job::supervisor::Supervisor;
use anyhow::{Context, Result, anyhow, bail};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use vos::pagemap::{self, PAGE_IS_FILE, PAGE_IS_PFNZERO, PAGE_IS_WRITTEN, PM_SCAN_WP_MATCHING, PageRegion, ScanError};
use vos::proto::{self, Msg};

const PAGE: u64 = 4096;
/// Rounds stop at this many, when one sends less than this, or when one is not 20% smaller than the last.
const MAX_ROUNDS: u32 = 8;
const SMALL_ROUND: u64 = 8 << 20;
/// Largest reuse list one process's Dump message carries; pages beyond it are simply sent.
const MAX_REUSE_RUNS: usize = 3000;

/// What pre-copy sent, per process (pid as the job sees it): each page with the frame it was read from,
/// appended round after round, then sorted by address with only the last sending of each page kept.
#[derive(Default)]
pub struct Sent {
    procs: HashMap<i32, Vec<(u64, u64)>>,
}

impl Sent {
    fn settle(&mut self) {
        for pages in self.procs.values_mut() {
            pages.sort_by_key(|p| p.0);
            let mut out: Vec<(u64, u64)> = Vec::with_capacity(pages.len());
            for &p in pages.iter() {
                match out.last_mut() {
                    Some(last) if last.0 == p.0 => *last = p,
                    _ => out.push(p),
                }
            }
            *pages = out;
        }
    }
}

/// A mapping of another process worth pre-copying: private and tracked.
struct Vma {
    start: u64,
    end: u64,
    file: bool,
}

/// The tracked private mappings of process `host` (VmFlags "uw": registered for userfaultfd write-protect).
fn tracked_vmas(host: i32) -> Result<Vec<Vma>> {
    let text = std::fs::read_to_string(format!("/proc/{host}/smaps")).with_context(|| format!("reading /proc/{host}/smaps"))?;
    let mut out = vec![];
    let mut cur: Option<Vma> = None;
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(v) = cur.take().filter(|_| flags.split_whitespace().any(|f| f == "uw")) {
                out.push(v);
            }
            continue;
        }
        let mut w = line.split_whitespace();
        let (Some(range), Some(perms)) = (w.next(), w.next()) else { continue };
        let Some((a, b)) = range.split_once('-') else { continue };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else { continue };
        let inode = w.nth(2).unwrap_or("0");
        cur = (perms.ends_with('p')).then_some(Vma { start, end, file: inode != "0" });
    }
    Ok(out)
}

/// Page ranges of `v` that hold data of their own (touched, not the zero page, for file mappings copied on
/// write); only those written since their last protection when `written`. `protect` protects them again.
fn scan(pagemap: &File, v: &Vma, written: bool, protect: bool) -> Result<Vec<(u64, u64)>> {
    let mut inverted = PAGE_IS_PFNZERO;
    if v.file {
        inverted |= PAGE_IS_FILE;
    }
    let mask = inverted | if written { PAGE_IS_WRITTEN } else { 0 };
    let mut vec = vec![PageRegion::default(); 1024];
    let mut out = vec![];
    let flags = if protect { PM_SCAN_WP_MATCHING } else { 0 };
    let found = pagemap::scan(pagemap.as_raw_fd(), v.start, v.end, &mut vec, flags, inverted, mask, &mut |a, b| {
        out.push((a, b));
        Ok::<(), std::convert::Infallible>(())
    });
    match found {
        Ok(()) => {}
        Err(ScanError::Ioctl { at, errno }) => bail!("PAGEMAP_SCAN at {at:#x}: {errno}"),
        Err(ScanError::Visit(never)) => match never {},
    }
    Ok(out)
}

/// The frame number of each page of [start, end) (0: not present).
fn frames(pagemap: &File, start: u64, end: u64) -> Result<Vec<u64>> {
    let n = ((end - start) / PAGE) as usize;
    let mut raw = vec![0u8; n * 8];
    pagemap.read_exact_at(&mut raw, start / PAGE * 8).context("reading pagemap")?;
    Ok(raw
        .chunks_exact(8)
        .map(|e| {
            let e = u64::from_le_bytes(e.try_into().unwrap());
            if e >> 63 == 1 { e & ((1 << 55) - 1) } else { 0 }
        })
        .collect())
}

impl Supervisor {
    /// Pre-copy the job's memory to `out` in rounds, telling `conn` of each; the pages sent are remembered for
    /// the final checkpoint (a migration's, with `precopy`).
    pub(crate) fn precopy(&mut self, out: OwnedFd, conn: &OwnedFd) -> Result<()> {
        self.precopied = None;
        self.await_filled();
        let members = self.track()?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, File::from(out));
        let mut sent = Sent::default();
        let mut buf = vec![0u8; 1 << 20];
        let mut last = u64::MAX;
        for round in 0..MAX_ROUNDS {
            // First what to send (found and protected again in one pass), so the migration can tell how long the
            // round will take; then the pages themselves.
            let mut plan = vec![];
            // The destination keeps a file per process pre-copied, and takes so many only; a bigger job's other
            // processes go whole in the final round.
            for m in members.iter().filter(|m| !m.zombie).take(crate::migration::channel::MAX_PRECOPY_PROCESSES) {
                let host = m.task.as_raw();
                // A process that ended meanwhile is simply not pre-copied any further.
                let (Ok(pagemap), Ok(vmas)) = (File::open(format!("/proc/{host}/pagemap")), tracked_vmas(host)) else { continue };
                let mut ranges = vec![];
                for v in &vmas {
                    for (a, b) in scan(&pagemap, v, round > 0, true).unwrap_or_default() {
                        if let Ok(fr) = frames(&pagemap, a, b) {
                            ranges.push((a, b, fr));
                        }
                    }
                }
                plan.push((m, ranges));
            }
            let planned: u64 = plan.iter().flat_map(|(_, r)| r.iter().map(|(a, b, _)| b - a)).sum();
            proto::send(conn.as_raw_fd(), &Msg::PrecopyPlan { round, bytes: planned }, None).map_err(|e| anyhow!("the migration went away: {e}"))?;
            let mut bytes = 0u64;
            for (m, ranges) in plan {
                let Ok(mem) = File::open(format!("/proc/{}/mem", m.task.as_raw())) else { continue };
                let pages = sent.procs.entry(m.ids.pid).or_default();
                for (a, b, fr) in ranges {
                    let mut p = a;
                    while p < b {
                        let n = (b - p).min(buf.len() as u64);
                        // Unmapped meanwhile: not sent, so never reused.
                        if mem.read_exact_at(&mut buf[..n as usize], p).is_err() {
                            break;
                        }
                        let head = PageHead { pid: m.ids.pid, addr: p, len: n }.encode();
                        out.write_all(&head).and_then(|_| out.write_all(&buf[..n as usize])).context("sending pre-copied pages")?;
                        pages.extend((0..n / PAGE).map(|k| (p + k * PAGE, fr[((p - a) / PAGE + k) as usize])));
                        bytes += n;
                        p += n;
                    }
                }
            }
            out.flush().context("sending pre-copied pages")?;
            proto::send(conn.as_raw_fd(), &Msg::PrecopyRound { round, bytes }, None).map_err(|e| anyhow!("the migration went away: {e}"))?;
            if bytes < SMALL_ROUND || (round > 0 && bytes * 10 > last * 8) {
                break;
            }
            last = bytes;
        }
        sent.settle();
        self.precopied = Some(Box::new(sent));
        Ok(())
    }

    /// Have every process register its memory for write tracking, in one short stop.
    fn track(&mut self) -> Result<Vec<crate::job::members::Member>> {
        let mut shims: Vec<Shim> = vec![];
        let r = (|| {
            let members = self.quiesce(&mut shims, false)?;
            for s in &shims {
                s.send(&Msg::Track, None)?;
            }
            for s in &shims {
                match s.recv()? {
                    (Msg::Tracked { error: None }, _) => {}
                    (Msg::Tracked { error: Some(e) }, _) => bail!("pid {}: {e}", s.pid),
                    (m, _) => bail!("unexpected message from pid {}: {m:?}", s.pid),
                }
            }
            Ok(members)
        })();
        let members = match r {
            Ok(m) => m,
            Err(e) => {
                cancel(&shims, &format!("{e:#}"));
                return Err(e);
            }
        };
        for s in &shims {
            s.send(&Msg::Finish { exit: false }, None)?;
        }
        for s in &shims {
            match s.recv()? {
                (Msg::Resumed, _) => {}
                (m, _) => bail!("unexpected message from pid {}: {m:?}", s.pid),
            }
        }
        Ok(members)
    }
}

impl crate::job::supervisor::Precopied for Sent {
    fn unchanged(&self, pid: i32, host: i32) -> Result<Vec<(u64, u64)>> {
        reuse(self, pid, host)
    }
}

/// The page ranges of process `pid` (host pid `host`, stopped now) whose pre-copied contents are still theirs.
fn reuse(sent: &Sent, pid: i32, host: i32) -> Result<Vec<(u64, u64)>> {
    let Some(pages) = sent.procs.get(&pid).filter(|p| !p.is_empty()) else { return Ok(vec![]) };
    let pagemap = File::open(format!("/proc/{host}/pagemap")).with_context(|| format!("pid {pid}: pagemap"))?;
    // Written since the last round, over the whole span at once: pages of mappings no longer tracked count as
    // written too (no write-protect bit).
    let span = Vma { start: pages[0].0, end: pages[pages.len() - 1].0 + PAGE, file: false };
    let written = scan(&pagemap, &span, true, false)?;
    let mut out: Vec<(u64, u64)> = vec![];
    let mut w = 0;
    let mut i = 0;
    while i < pages.len() {
        // A run of consecutive sent pages: one pagemap read for all of it.
        let mut j = i + 1;
        while j < pages.len() && pages[j].0 == pages[j - 1].0 + PAGE {
            j += 1;
        }
        let now = frames(&pagemap, pages[i].0, pages[j - 1].0 + PAGE)?;
        for (&(p, then), now) in pages[i..j].iter().zip(now) {
            while w < written.len() && written[w].1 <= p {
                w += 1;
            }
            let dirty = w < written.len() && written[w].0 <= p;
            if dirty || now == 0 || now != then {
                continue;
            }
            // Runs may span mappings here; the shim splits them by region.
            match out.last_mut() {
                Some(last) if last.1 == p => last.1 += PAGE,
                _ => out.push((p, p + PAGE)),
            }
        }
        i = j;
    }
    out.truncate(MAX_REUSE_RUNS);
    Ok(out)
}
