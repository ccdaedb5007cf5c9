//! Hashing page chunks on a second thread, so that checksums cost no wall time on a machine with two cores.
//!
//! The checkpoint writer (in the shim) fills a job with a chunk's run table and pages, the hashing thread computes
//! the chunk's payload hash, and the writer writes the chunk once its hash is known. The restorer fills a job
//! after reading a chunk into place; the hashing thread compares with the hash the image claims. Jobs go
//! through a small ring, in order. `no_std`: used by the shim and by the freestanding restorer.

use crate::chunk::{self, PageRun, PayloadHasher};
use crate::sys;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub const SLOTS: usize = 4;
const TABLE: usize = 8 + chunk::RUN_LEN * chunk::MAX_RUNS as usize;
pub const STACK: usize = 64 << 10;
/// `Job::expected` when there is nothing to compare with.
pub const NONE: u64 = u64::MAX;

/// One Pages chunk: its run table (hashed first), then each run's bytes, which lie at `src[i]` (the run's own
/// address, or a copy for pages the writer cannot read in place).
pub struct Job {
    pub seq: u64,
    pub tlen: usize,
    pub table: [u8; TABLE],
    pub nruns: usize,
    pub runs: [PageRun; chunk::MAX_RUNS as usize],
    pub src: [u64; chunk::MAX_RUNS as usize],
    /// The hash the image claims (restore), or NONE (checkpoint).
    pub expected: u64,
    /// The hash computed.
    pub hash: u64,
}

impl Job {
    const EMPTY: Job = Job {
        seq: 0,
        tlen: 0,
        table: [0; TABLE],
        nruns: 0,
        runs: [PageRun { addr: 0, len: 0 }; chunk::MAX_RUNS as usize],
        src: [0; chunk::MAX_RUNS as usize],
        expected: NONE,
        hash: 0,
    };

    /// Set the runs (their bytes in place) and build the table from them.
    pub fn set_runs(&mut self, runs: &[PageRun], src: &[u64]) {
        self.nruns = runs.len();
        self.table[..8].copy_from_slice(&(runs.len() as u64 & 0xffff_ffff).to_le_bytes());
        for (i, r) in runs.iter().enumerate() {
            self.runs[i] = *r;
            self.src[i] = src[i];
            self.table[8 + i * chunk::RUN_LEN..8 + (i + 1) * chunk::RUN_LEN].copy_from_slice(&r.encode());
        }
        self.tlen = 8 + runs.len() * chunk::RUN_LEN;
    }

    /// The payload length: table plus data.
    #[allow(clippy::len_without_is_empty)] // a chunk's payload length, not a container's: never empty (its table).
    pub fn len(&self) -> u64 {
        self.tlen as u64 + self.runs[..self.nruns].iter().map(|r| r.len).sum::<u64>()
    }

    fn compute(&mut self) {
        let mut h = PayloadHasher::default();
        h.update(&self.table[..self.tlen]);
        for i in 0..self.nruns {
            // SAFETY: the producer put the run's bytes at src[i] and keeps them there until the job is released.
            h.update(unsafe { core::slice::from_raw_parts(self.src[i] as *const u8, self.runs[i].len as usize) });
        }
        self.hash = h.finish();
    }
}

#[repr(C, align(16))]
pub struct Stack(pub [u8; STACK]);

/// The ring and its hashing thread. Lives in a static of its user. Page aligned, so a checkpoint can leave it
/// out of the image whole: it changes while the image is written.
#[repr(C, align(4096))]
pub struct Ring {
    slots: UnsafeCell<[Job; SLOTS]>,
    stack: UnsafeCell<Stack>,
    /// Jobs submitted, hashed, and released (whose slot may be filled again); futex words.
    produced: AtomicU32,
    /// Rung by every submit and by `finish`: the word the hashing thread sleeps on. (Sleeping on `produced`
    /// would miss a stop asked for between its last look and its sleep: `produced` does not change then.)
    doorbell: AtomicU32,
    hashed: AtomicU32,
    released: AtomicU32,
    stop: AtomicU32,
    /// The hashing thread's tid while it runs (the kernel clears it when the thread ends).
    tid: AtomicU32,
    /// The first job whose hash differs from `expected` (u64::MAX: none).
    bad: AtomicU64,
    /// Release each job as soon as it is hashed (the restorer has nothing to write).
    auto_release: AtomicU32,
}

// SAFETY: the slots are handed between producer and hashing thread by the produced/hashed/released counters.
unsafe impl Sync for Ring {}

impl Ring {
    pub const fn new() -> Ring {
        Ring {
            slots: UnsafeCell::new([Job::EMPTY; SLOTS]),
            stack: UnsafeCell::new(Stack([0; STACK])),
            produced: AtomicU32::new(0),
            doorbell: AtomicU32::new(0),
            hashed: AtomicU32::new(0),
            released: AtomicU32::new(0),
            stop: AtomicU32::new(0),
            tid: AtomicU32::new(0),
            bad: AtomicU64::new(u64::MAX),
            auto_release: AtomicU32::new(0),
        }
    }

    /// The whole ring, its thread's stack included (to leave out of images).
    pub fn range(&self) -> (u64, u64) {
        let s = self as *const Ring as u64;
        (s, s + core::mem::size_of::<Ring>() as u64)
    }

    #[allow(clippy::mut_from_ref)] // the slots live in an UnsafeCell; the counters hand each to one side at a time.
    fn job(&self, i: u32) -> &mut Job {
        // SAFETY: callers only touch the slot the counters give them.
        unsafe { &mut (*self.slots.get())[i as usize % SLOTS] }
    }

    /// Reset the counters and start the hashing thread. Without a thread (clone3 refused), jobs are hashed
    /// inline by `submit`.
    pub fn start(&'static self, auto_release: bool) {
        self.produced.store(0, Ordering::Release);
        self.hashed.store(0, Ordering::Release);
        self.released.store(0, Ordering::Release);
        self.stop.store(0, Ordering::Release);
        self.bad.store(u64::MAX, Ordering::Release);
        self.auto_release.store(auto_release as u32, Ordering::Release);
        let args = sys::CloneArgs {
            flags: (libc::CLONE_VM | libc::CLONE_FS | libc::CLONE_FILES | libc::CLONE_SIGHAND | libc::CLONE_THREAD
                | libc::CLONE_SYSVSEM | libc::CLONE_PARENT_SETTID | libc::CLONE_CHILD_CLEARTID) as u64,
            parent_tid: self.tid.as_ptr() as u64,
            child_tid: self.tid.as_ptr() as u64,
            stack: self.stack.get() as u64,
            stack_size: STACK as u64,
            ..Default::default()
        };
        // SAFETY: the stack belongs to this ring's thread, which only runs `worker` on this static ring. It
        // inherits the caller's signal mask and TLS pointer and uses neither.
        if unsafe { sys::clone3_thread(&args, worker, self as *const Ring as usize) }.is_err() {
            self.tid.store(0, Ordering::Release);
        }
    }

    fn wait(word: &AtomicU32, cond: impl Fn() -> bool) {
        loop {
            let seen = word.load(Ordering::Acquire);
            if cond() {
                return;
            }
            let _ = sys::futex_wait(word, seen, None);
        }
    }

    /// The next slot to fill (waits while the ring is full).
    pub fn slot(&self) -> &mut Job {
        let p = self.produced.load(Ordering::Acquire);
        Self::wait(&self.released, || p - self.released.load(Ordering::Acquire) < SLOTS as u32);
        self.job(p)
    }

    /// Hand the slot filled after `slot` over for hashing; returns its number.
    pub fn submit(&self) -> u32 {
        let p = self.produced.load(Ordering::Acquire);
        if self.tid.load(Ordering::Acquire) == 0 {
            self.process(p);
            self.produced.fetch_add(1, Ordering::AcqRel);
            return p;
        }
        self.produced.fetch_add(1, Ordering::AcqRel);
        self.ring();
        p
    }

    fn ring(&self) {
        self.doorbell.fetch_add(1, Ordering::AcqRel);
        let _ = sys::futex_wake(&self.doorbell, 1);
    }

    fn process(&self, i: u32) {
        let j = self.job(i);
        j.compute();
        if j.expected != NONE && j.hash != j.expected {
            self.bad.fetch_min(j.seq, Ordering::AcqRel);
        }
        self.hashed.fetch_add(1, Ordering::AcqRel);
        let _ = sys::futex_wake(&self.hashed, 1);
        if self.auto_release.load(Ordering::Acquire) != 0 {
            self.released.fetch_add(1, Ordering::AcqRel);
            let _ = sys::futex_wake(&self.released, 1);
        }
    }

    /// Number of jobs submitted and not yet released.
    pub fn in_flight(&self) -> u32 {
        self.produced.load(Ordering::Acquire) - self.released.load(Ordering::Acquire)
    }

    /// The oldest unreleased job, once hashed.
    pub fn oldest_hashed(&self) -> &mut Job {
        let r = self.released.load(Ordering::Acquire);
        Self::wait(&self.hashed, || self.hashed.load(Ordering::Acquire) > r);
        self.job(r)
    }

    /// Free the oldest job's slot.
    pub fn release(&self) {
        self.released.fetch_add(1, Ordering::AcqRel);
        let _ = sys::futex_wake(&self.released, 1);
    }

    /// The first job found not to match its expected hash, so far.
    pub fn bad(&self) -> Option<u64> {
        let b = self.bad.load(Ordering::Acquire);
        (b != u64::MAX).then_some(b)
    }

    /// Wait for every job to be hashed, stop the thread and wait for it to end; the first bad job, if any.
    pub fn finish(&self) -> Option<u64> {
        let p = self.produced.load(Ordering::Acquire);
        Self::wait(&self.hashed, || self.hashed.load(Ordering::Acquire) >= p);
        self.stop.store(1, Ordering::Release);
        self.ring();
        let tid = self.tid.load(Ordering::Acquire);
        loop {
            let t = self.tid.load(Ordering::Acquire);
            if t == 0 {
                break;
            }
            let _ = sys::futex_wait(&self.tid, t, None);
        }
        // The kernel clears the tid word a moment before it frees the thread's id; a restore that recreates the
        // app's threads with their ids needs it free.
        if tid != 0 {
            for _ in 0..100_000 {
                if sys::tgkill(sys::getpid(), tid as i32, 0).is_err() {
                    break;
                }
                sys::nanosleep_ns(20_000);
            }
        }
        self.bad()
    }
}

impl Default for Ring {
    fn default() -> Self {
        Ring::new()
    }
}

extern "C" fn worker(ring: usize) -> ! {
    // SAFETY: `start` passes a pointer to a static Ring.
    let ring = unsafe { &*(ring as *const Ring) };
    loop {
        // Read before looking: a submit or stop after the look rings it, and the sleep returns at once.
        let bell = ring.doorbell.load(Ordering::Acquire);
        let (p, h) = (ring.produced.load(Ordering::Acquire), ring.hashed.load(Ordering::Acquire));
        if h == p {
            if ring.stop.load(Ordering::Acquire) != 0 {
                sys::exit_thread(0);
            }
            let _ = sys::futex_wait(&ring.doorbell, bell, None);
            continue;
        }
        ring.process(h);
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use std::boxed::Box;
    use std::vec::Vec;

    /// Bytes for a run of `pages` pages, different for every seed.
    fn bytes(pages: usize, seed: u8) -> Vec<u8> {
        (0..pages * chunk::PAGE).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The payload the writer hashes and writes for a Pages chunk is the framing the readers take apart: its
        /// table lists the runs (as `chunk::run_table` reads it), and its length and hash are those of the table
        /// followed by each run's bytes, wherever those lie.
        #[test]
        fn a_jobs_payload_is_its_table_then_its_runs(runs in vec((any::<u64>(), 0..3usize, any::<u8>()), 0..12)) {
            let data: Vec<Vec<u8>> = runs.iter().map(|&(_, pages, seed)| bytes(pages, seed)).collect();
            let list: Vec<PageRun> = runs.iter().zip(&data).map(|(&(addr, _, _), d)| PageRun { addr, len: d.len() as u64 }).collect();
            let src: Vec<u64> = data.iter().map(|d| d.as_ptr() as u64).collect();
            let mut job = Box::new(Job::EMPTY);
            job.set_runs(&list, &src);
            let table = &job.table[..job.tlen];
            let (n, t) = chunk::run_table(table).unwrap();
            prop_assert_eq!(n, list.len());
            for (i, r) in list.iter().enumerate() {
                prop_assert_eq!(PageRun::decode(&t[i * chunk::RUN_LEN..]), *r);
            }
            let mut payload = table.to_vec();
            data.iter().for_each(|d| payload.extend_from_slice(d));
            prop_assert_eq!(job.len(), payload.len() as u64);
            job.compute();
            prop_assert_eq!(job.hash, chunk::payload_hash(&payload));
        }
    }

    /// The ring as the restorer runs it (jobs released once hashed, on its own thread when the kernel gives one):
    /// every job is hashed, and the first whose hash is not the one expected is named.
    #[test]
    fn the_ring_names_the_first_chunk_that_fails_its_hash() {
        static RING: Ring = Ring::new();
        let data: Vec<Vec<u8>> = (0..12).map(|i| bytes(1 + i % 3, i as u8)).collect();
        RING.start(true);
        for (seq, d) in data.iter().enumerate() {
            let run = PageRun { addr: 0x1000 * seq as u64, len: d.len() as u64 };
            let mut payload = Vec::new();
            payload.extend_from_slice(&1u64.to_le_bytes());
            payload.extend_from_slice(&run.encode());
            payload.extend_from_slice(d);
            let job = RING.slot();
            job.seq = 100 + seq as u64;
            job.set_runs(&[run], &[d.as_ptr() as u64]);
            job.expected = chunk::payload_hash(&payload) ^ if seq == 7 || seq == 9 { 1 } else { 0 };
            RING.submit();
        }
        assert_eq!(RING.finish(), Some(107));
        assert_eq!(RING.in_flight(), 0);
    }
}
