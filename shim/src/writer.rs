//! Writing image chunks to an fd (file, pipe or socket) with raw syscalls.

use vos::chunk::{self, ChunkHead, Kind, PageRun, PayloadHasher};
use vos::sys::{self, Errno};

pub struct Writer {
    pub fd: i32,
    /// Number of the next chunk.
    pub seq: u64,
    pub bytes: u64,
}

impl Writer {
    pub fn new(fd: i32, first_seq: u64) -> Writer {
        Writer { fd, seq: first_seq, bytes: 0 }
    }

    /// A metadata chunk.
    pub fn chunk(&mut self, kind: Kind, payload: &[u8]) -> Result<(), Errno> {
        let head = ChunkHead { kind, seq: self.seq, len: payload.len() as u64, payload_hash: chunk::payload_hash(payload) };
        self.write_all(&head.encode())?;
        self.write_all(payload)?;
        self.seq += 1;
        Ok(())
    }

    /// A Pages chunk: the run table, then `data`, which holds exactly the runs' bytes in order.
    pub fn pages(&mut self, runs: &[PageRun], data: &[libc::iovec]) -> Result<(), Errno> {
        let mut table = [0u8; 8 + chunk::RUN_LEN * chunk::MAX_RUNS as usize];
        table[..4].copy_from_slice(&(runs.len() as u32).to_le_bytes());
        for (i, r) in runs.iter().enumerate() {
            table[8 + i * chunk::RUN_LEN..8 + (i + 1) * chunk::RUN_LEN].copy_from_slice(&r.encode());
        }
        let tlen = 8 + runs.len() * chunk::RUN_LEN;
        let mut h = PayloadHasher::default();
        h.update(&table[..tlen]);
        let mut len = tlen as u64;
        for v in data {
            // SAFETY: each iovec describes readable memory (the caller's pages or bounce buffer).
            h.update(unsafe { core::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) });
            len += v.iov_len as u64;
        }
        let head = ChunkHead { kind: Kind::Pages, seq: self.seq, len, payload_hash: h.finish() };
        self.write_all(&head.encode())?;
        self.write_all(&table[..tlen])?;
        self.writev_all(data)?;
        self.seq += 1;
        Ok(())
    }

    pub fn write_all(&mut self, mut b: &[u8]) -> Result<(), Errno> {
        while !b.is_empty() {
            match sys::write(self.fd, b) {
                Ok(n) => {
                    b = &b[n..];
                    self.bytes += n as u64;
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
            self.bytes += n as u64;
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
