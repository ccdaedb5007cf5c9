//! Writing image chunks to an fd (file, pipe or socket) with raw syscalls.

use vos::chunk::{self, ChunkHead, Kind, PageRun};
use vos::hashring::Job;
use vos::sys::{self, Errno};

pub struct Writer {
    pub fd: i32,
    /// Number of the next chunk.
    pub seq: u64,
    pub bytes: u64,
    /// Pages listed in the Pages and Reuse chunks written (the ProcessEnd chunk states it for the restorer).
    pub pages: u64,
    /// For a regular file: bytes written since writeback was last started.
    unsynced: Option<u64>,
}

/// Start writing back every this many bytes, so the final fsync finds little left to do.
const WRITEBACK_EVERY: u64 = 16 << 20;

impl Writer {
    pub fn new(fd: i32, first_seq: u64) -> Writer {
        let regular = sys::fstat(fd).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG);
        Writer { fd, seq: first_seq, bytes: 0, pages: 0, unsynced: regular.then_some(0) }
    }

    fn wrote(&mut self, n: u64) {
        self.bytes += n;
        if let Some(u) = self.unsynced.as_mut() {
            *u += n;
            if *u >= WRITEBACK_EVERY {
                let end = sys::lseek(self.fd, 0, libc::SEEK_CUR).unwrap_or(0);
                const SYNC_FILE_RANGE_WRITE: usize = 2;
                // SAFETY: sync_file_range only starts writeback of the file's dirty pages.
                unsafe { sys::syscall6(libc::SYS_sync_file_range, self.fd as usize, (end - *u) as usize, *u as usize, SYNC_FILE_RANGE_WRITE, 0, 0) };
                *u = 0;
            }
        }
    }

    /// A metadata chunk.
    pub fn chunk(&mut self, kind: Kind, payload: &[u8]) -> Result<(), Errno> {
        let head = ChunkHead { kind, seq: self.seq, len: payload.len() as u64, payload_hash: chunk::payload_hash(payload) };
        self.write_all(&head.encode())?;
        self.write_all(payload)?;
        self.seq += 1;
        Ok(())
    }

    /// A Pages chunk whose payload hash the hashing thread computed.
    pub fn pages(&mut self, job: &Job) -> Result<(), Errno> {
        let head = ChunkHead { kind: Kind::Pages, seq: self.seq, len: job.len(), payload_hash: job.hash };
        self.write_all(&head.encode())?;
        self.write_all(&job.table[..job.tlen])?;
        let mut iov = [libc::iovec { iov_base: core::ptr::null_mut(), iov_len: 0 }; chunk::MAX_RUNS as usize];
        for ((v, &src), run) in iov.iter_mut().zip(&job.src).zip(&job.runs).take(job.nruns) {
            *v = libc::iovec { iov_base: src as *mut libc::c_void, iov_len: run.len as usize };
        }
        self.writev_all(&iov[..job.nruns])?;
        self.seq += 1;
        self.pages += job.runs[..job.nruns].iter().map(|r| r.pages()).sum::<u64>();
        Ok(())
    }

    /// A Reuse chunk listing `runs` (pages the destination already holds).
    pub fn reuse(&mut self, runs: &[PageRun]) -> Result<(), Errno> {
        let mut table = [0u8; 8 + chunk::MAX_RUNS as usize * chunk::RUN_LEN];
        let runs = &runs[..runs.len().min(chunk::MAX_RUNS as usize)];
        table[..4].copy_from_slice(&(runs.len() as u32).to_le_bytes());
        for (i, r) in runs.iter().enumerate() {
            table[8 + i * chunk::RUN_LEN..8 + (i + 1) * chunk::RUN_LEN].copy_from_slice(&r.encode());
        }
        self.chunk(Kind::Reuse, &table[..8 + runs.len() * chunk::RUN_LEN])?;
        self.pages += runs.iter().map(|r| r.pages()).sum::<u64>();
        Ok(())
    }

    /// The ProcessEnd chunk: the pages listed, then the MessagePack summary.
    pub fn process_end(&mut self, summary: &[u8]) -> Result<(), Errno> {
        let prefix = chunk::process_end_prefix(self.pages);
        let head = ChunkHead { kind: Kind::ProcessEnd, seq: self.seq, len: (prefix.len() + summary.len()) as u64, payload_hash: {
            let mut h = chunk::PayloadHasher::default();
            h.update(&prefix);
            h.update(summary);
            h.finish()
        } };
        self.write_all(&head.encode())?;
        self.write_all(&prefix)?;
        self.write_all(summary)?;
        self.seq += 1;
        Ok(())
    }

    pub fn write_all(&mut self, mut b: &[u8]) -> Result<(), Errno> {
        while !b.is_empty() {
            match sys::write(self.fd, b) {
                Ok(n) => {
                    b = &b[n..];
                    self.wrote(n as u64);
                }
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn writev_all(&mut self, iov: &[libc::iovec]) -> Result<(), Errno> {
        let mut i = 0;
        let mut skip = 0usize;
        while i < iov.len() {
            let mut batch = [libc::iovec { iov_base: core::ptr::null_mut(), iov_len: 0 }; 64];
            let mut k = 0;
            while k < batch.len() && i + k < iov.len() {
                batch[k] = iov[i + k];
                k += 1;
            }
            // SAFETY: advancing within the first iovec by what was already written.
            batch[0].iov_base = unsafe { (batch[0].iov_base as *mut u8).add(skip) } as *mut _;
            batch[0].iov_len -= skip;
            // SAFETY: the iovecs describe readable memory.
            let mut n = match unsafe { sys::writev(self.fd, &batch[..k]) } {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            };
            self.wrote(n as u64);
            // Step over what was written.
            let mut j = 0;
            while j < k && n >= batch[j].iov_len {
                n -= batch[j].iov_len;
                j += 1;
            }
            i += j;
            skip = if j == 0 { skip + n } else { n };
        }
        Ok(())
    }
}
