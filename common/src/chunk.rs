//! The image's framing: a file head, then a sequence of checksummed chunks.
//!
//! ```text
//! image  := file-head chunk*                         (the last chunk is End; no End = truncated)
//! head   := "\x7fVOSIMG\n" version:u32 flags:u32      (16 bytes)
//! chunk  := chunk-head payload
//! chunk-head := magic:u32 kind:u32 seq:u64 len:u64 payload_hash:u64 head_hash:u64   (40 bytes, little endian)
//! ```
//! `seq` counts chunks from 0, so a lost or repeated chunk is caught; `head_hash` covers the first 32 bytes of
//! the head and `payload_hash` the payload (xxh3). Everything is written and read strictly forward, so the same
//! code works on a file, a pipe and a socket. A Pages payload is a run table followed by the runs' bytes:
//! `nruns:u32 0:u32 (addr:u64 len:u64)*nruns data`. Metadata payloads are MessagePack (see `image`). Order:
//! Header, Job, Data chunks, then for each process its Pages (and Reuse) chunks and a ProcessEnd, then End, then
//! nothing. A ProcessEnd payload is `pages:u64` (the pages its Pages and Reuse chunks list, so the restorer can
//! tell a chunk is missing without MessagePack) followed by the MessagePack summary.
//!
//! A signed image has one more chunk after End, the last bytes of the file: a Signature (number End's + 1) whose
//! payload is `alg:u32 0:u32 signed:u64 key_id:[u8;16] mac:[u8;32]`: a keyed BLAKE3 MAC (`alg` 1) of the image's
//! first `signed` bytes (every byte before this chunk: file head, every chunk head and payload, End). The xxh3
//! checksums find accidents; only the MAC tells who made the image (see the launcher's `sign`). An unsigned image
//! is the same bytes without it, so signing appends and older images read as before.
//!
//! This module is `no_std`: the restorer reads page chunks with it.

use crate::sys::Errno;
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

pub const FILE_MAGIC: [u8; 8] = *b"\x7fVOSIMG\n";
/// Bumped on any incompatible change; a reader refuses other versions.
pub const FORMAT_VERSION: u32 = 2;
pub const FILE_HEAD_LEN: usize = 16;
pub const CHUNK_MAGIC: u32 = u32::from_le_bytes(*b"VCHK");
pub const CHUNK_HEAD_LEN: usize = 40;
/// Largest payload a reader accepts; a larger length means a corrupt head.
pub const MAX_PAYLOAD: u64 = 64 << 20;
/// Page data per Pages chunk: small enough that hashing and writing see it in cache.
pub const PAGES_PER_CHUNK: usize = 256;
pub const MAX_RUNS: u32 = PAGES_PER_CHUNK as u32;
pub const PAGE: usize = 4096;

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// MessagePack `image::ImageHeader`: host, job, format facts.
    Header = 1,
    /// MessagePack `image::JobImage`: every process's threads, memory map, fds, signals..., and what they share.
    Job = 2,
    /// Page data of one process (processes follow each other in the order of the job's metadata).
    Pages = 3,
    /// `pages:u64`, then MessagePack `image::ProcessSummary`: what was stored per region.
    ProcessEnd = 4,
    /// Last chunk: `chunks:u64`, the number of chunks before it.
    End = 5,
    /// Contents of an object the job's metadata lists in `data` (memfd, deleted file): `object:u32 0:u32
    /// offset:u64 bytes`. Data chunks follow the Job chunk.
    Data = 6,
    /// Pages of one process that a migration's destination already holds from pre-copy: a run table like a
    /// Pages chunk's, with no data.
    Reuse = 7,
    /// After End, in a signed image only: `SIGNATURE_LEN` bytes (see the module's description).
    Signature = 8,
}

/// A Signature chunk's payload length, and its whole length with its head.
pub const SIGNATURE_LEN: usize = 64;
pub const SIGNATURE_CHUNK_LEN: usize = CHUNK_HEAD_LEN + SIGNATURE_LEN;
/// The End chunk's whole length (head and count).
pub const END_CHUNK_LEN: usize = CHUNK_HEAD_LEN + 8;

impl Kind {
    pub fn from_u32(v: u32) -> Option<Kind> {
        Some(match v {
            1 => Kind::Header,
            2 => Kind::Job,
            3 => Kind::Pages,
            4 => Kind::ProcessEnd,
            5 => Kind::End,
            6 => Kind::Data,
            7 => Kind::Reuse,
            8 => Kind::Signature,
            _ => return None,
        })
    }
}

/// Why an image is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageError {
    /// The stream ended inside the named part.
    Truncated(&'static str),
    /// Not a vOS image at all.
    NotAnImage,
    /// A vOS image of another format version.
    Version(u32),
    /// A chunk head does not match its checksum (chunk number `seq` expected there).
    HeadCorrupt { seq: u64 },
    /// A chunk's payload does not match its checksum.
    PayloadCorrupt { seq: u64 },
    /// Chunks are missing or repeated.
    Sequence { expected: u64, found: u64 },
    /// A chunk of an unexpected kind.
    UnexpectedKind { seq: u64, found: u32, wanted: &'static str },
    /// A length or address out of bounds.
    Malformed { seq: u64, what: &'static str },
    Io(Errno),
}

impl core::fmt::Display for ImageError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ImageError::Truncated(what) => write!(f, "image is truncated (it ends inside the {what})"),
            ImageError::NotAnImage => write!(f, "not a vOS image (bad magic)"),
            ImageError::Version(v) => {
                write!(f, "image format version {v} is not supported (this vrun reads version {FORMAT_VERSION})")
            }
            ImageError::HeadCorrupt { seq } => write!(f, "image is corrupt: chunk {seq} has a bad header checksum"),
            ImageError::PayloadCorrupt { seq } => write!(f, "image is corrupt: chunk {seq} fails its checksum"),
            ImageError::Sequence { expected, found } => {
                write!(f, "image is corrupt: chunk {found} found where chunk {expected} belongs")
            }
            ImageError::UnexpectedKind { seq, found, wanted } => {
                write!(f, "image is corrupt: chunk {seq} is of kind {found}, expected {wanted}")
            }
            ImageError::Malformed { seq, what } => write!(f, "image is corrupt: chunk {seq}: {what}"),
            ImageError::Io(e) => write!(f, "reading the image failed: {e}"),
        }
    }
}

/// Encode the file head.
pub fn file_head() -> [u8; FILE_HEAD_LEN] {
    let mut b = [0u8; FILE_HEAD_LEN];
    b[..8].copy_from_slice(&FILE_MAGIC);
    b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b
}

/// Check a file head.
pub fn check_file_head(b: &[u8; FILE_HEAD_LEN]) -> Result<(), ImageError> {
    if b[..8] != FILE_MAGIC {
        return Err(ImageError::NotAnImage);
    }
    let v = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    if v != FORMAT_VERSION {
        return Err(ImageError::Version(v));
    }
    Ok(())
}

/// A decoded, verified chunk head.
#[derive(Clone, Copy, Debug)]
pub struct ChunkHead {
    pub kind: Kind,
    pub seq: u64,
    pub len: u64,
    pub payload_hash: u64,
}

impl ChunkHead {
    pub fn encode(&self) -> [u8; CHUNK_HEAD_LEN] {
        let mut b = [0u8; CHUNK_HEAD_LEN];
        b[0..4].copy_from_slice(&CHUNK_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&(self.kind as u32).to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..32].copy_from_slice(&self.payload_hash.to_le_bytes());
        let h = xxh3_64(&b[..32]);
        b[32..40].copy_from_slice(&h.to_le_bytes());
        b
    }

    /// Decode and verify a head that should be chunk number `expected_seq`.
    pub fn decode(b: &[u8; CHUNK_HEAD_LEN], expected_seq: u64) -> Result<ChunkHead, ImageError> {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        if u32_at(0) != CHUNK_MAGIC || u64_at(32) != xxh3_64(&b[..32]) {
            return Err(ImageError::HeadCorrupt { seq: expected_seq });
        }
        let seq = u64_at(8);
        if seq != expected_seq {
            return Err(ImageError::Sequence { expected: expected_seq, found: seq });
        }
        let kind = Kind::from_u32(u32_at(4)).ok_or(ImageError::Malformed { seq, what: "unknown chunk kind" })?;
        let len = u64_at(16);
        if len > MAX_PAYLOAD {
            return Err(ImageError::Malformed { seq, what: "payload length too large" });
        }
        Ok(ChunkHead { kind, seq, len, payload_hash: u64_at(24) })
    }
}

/// One run of pages in a Pages chunk: `len` bytes at `addr`, both page aligned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRun {
    pub addr: u64,
    pub len: u64,
}

pub const RUN_LEN: usize = 16;

impl PageRun {
    pub fn encode(&self) -> [u8; RUN_LEN] {
        let mut b = [0u8; RUN_LEN];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..].copy_from_slice(&self.len.to_le_bytes());
        b
    }
    /// Decode the run at the start of `b`, which must hold `RUN_LEN` bytes or more.
    pub fn decode(b: &[u8]) -> PageRun {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        let addr = u64::from_le_bytes(a);
        a.copy_from_slice(&b[8..16]);
        PageRun { addr, len: u64::from_le_bytes(a) }
    }

    /// The run's end, if it is a well-formed one: page aligned, not empty, within user space, no overflow.
    pub fn end(&self) -> Option<u64> {
        let end = self.addr.checked_add(self.len)?;
        let aligned = self.addr.is_multiple_of(PAGE as u64) && self.len.is_multiple_of(PAGE as u64);
        (aligned && self.len > 0 && end <= crate::plan::USER_END).then_some(end)
    }

    pub fn pages(&self) -> u64 {
        self.len / PAGE as u64
    }
}

/// Bytes before a ProcessEnd chunk's MessagePack summary.
pub const PROCESS_END_PREFIX: usize = 8;

/// The start of a ProcessEnd payload: the number of pages the process's Pages and Reuse chunks list.
pub fn process_end_prefix(pages: u64) -> [u8; PROCESS_END_PREFIX] {
    pages.to_le_bytes()
}

/// A ProcessEnd payload's page count and summary bytes; None when it is too short to hold the count.
pub fn split_process_end(payload: &[u8]) -> Option<(u64, &[u8])> {
    let (count, rest) = payload.split_first_chunk::<PROCESS_END_PREFIX>()?;
    Some((u64::from_le_bytes(*count), rest))
}

/// A Pages or Reuse payload's run table: `(nruns, table bytes)`; None when the payload cannot hold it.
pub fn run_table(payload: &[u8]) -> Option<(usize, &[u8])> {
    let (n, _) = payload.split_first_chunk::<4>()?;
    let n = u32::from_le_bytes(*n);
    if n > MAX_RUNS {
        return None;
    }
    let len = 8 + n as usize * RUN_LEN;
    Some((n as usize, payload.get(8..len)?))
}

/// The payload hash of a Pages chunk, fed piece by piece.
pub struct PayloadHasher(Xxh3);

impl Default for PayloadHasher {
    fn default() -> Self {
        PayloadHasher(Xxh3::new())
    }
}

impl PayloadHasher {
    pub fn update(&mut self, b: &[u8]) {
        self.0.update(b)
    }
    pub fn finish(&self) -> u64 {
        self.0.digest()
    }
}

/// Hash of a whole payload held in one buffer; equal to feeding it to a [`PayloadHasher`].
pub fn payload_hash(b: &[u8]) -> u64 {
    xxh3_64(b)
}

/// Something chunks are read from, strictly forward.
pub trait Source {
    /// Fill `buf` completely; `Err(None)` at end of stream before the first byte or inside the buffer.
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), Option<Errno>>;
}

/// Read and verify the next chunk head.
pub fn read_head<S: Source>(src: &mut S, expected_seq: u64) -> Result<ChunkHead, ImageError> {
    let mut b = [0u8; CHUNK_HEAD_LEN];
    src.read_exact(&mut b).map_err(|e| e.map_or(ImageError::Truncated("chunk list"), ImageError::Io))?;
    ChunkHead::decode(&b, expected_seq)
}

/// Read a file head from `src` and check it.
pub fn read_file_head<S: Source>(src: &mut S) -> Result<(), ImageError> {
    let mut b = [0u8; FILE_HEAD_LEN];
    src.read_exact(&mut b).map_err(|e| e.map_or(ImageError::NotAnImage, ImageError::Io))?;
    check_file_head(&b)
}

/// End chunk payload.
pub fn end_payload(chunks_before: u64) -> [u8; 8] {
    chunks_before.to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_round_trip_and_corruption() {
        let h = ChunkHead { kind: Kind::Pages, seq: 7, len: 4096, payload_hash: 0x1234 };
        let b = h.encode();
        let d = ChunkHead::decode(&b, 7).unwrap();
        assert_eq!((d.kind, d.seq, d.len, d.payload_hash), (Kind::Pages, 7, 4096, 0x1234));
        assert_eq!(ChunkHead::decode(&b, 8).unwrap_err(), ImageError::Sequence { expected: 8, found: 7 });
        for i in 0..CHUNK_HEAD_LEN {
            let mut c = b;
            c[i] ^= 1;
            assert!(ChunkHead::decode(&c, 7).is_err(), "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn file_head() {
        assert!(check_file_head(&super::file_head()).is_ok());
        let mut b = super::file_head();
        b[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        assert_eq!(check_file_head(&b), Err(ImageError::Version(FORMAT_VERSION + 1)));
        b[0] = 0;
        assert_eq!(check_file_head(&b), Err(ImageError::NotAnImage));
    }

    #[test]
    fn runs_and_tables_from_hostile_bytes() {
        assert_eq!(PageRun { addr: 0x1000, len: 0x2000 }.end(), Some(0x3000));
        for bad in [(0x1001, 0x1000), (0x1000, 0), (0x1000, 0x10), (!0xfff, 0x2000), (crate::plan::USER_END, 0x1000)] {
            assert_eq!(PageRun { addr: bad.0, len: bad.1 }.end(), None, "{bad:x?}");
        }
        assert_eq!(run_table(&[]), None);
        assert_eq!(run_table(&[1, 0, 0]), None);
        assert_eq!(run_table(&[1, 0, 0, 0, 0, 0, 0, 0]), None, "one run announced, none there");
        assert_eq!(run_table(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]), None);
        let mut p = [0u8; 8 + RUN_LEN + 5];
        p[0] = 1;
        assert_eq!(run_table(&p).map(|t| (t.0, t.1.len())), Some((1, RUN_LEN)));
        assert_eq!(split_process_end(&[1, 2, 3]), None);
        let mut e = process_end_prefix(42).to_vec();
        e.push(0x90);
        assert_eq!(split_process_end(&e), Some((42, &[0x90u8][..])));
    }

    #[test]
    fn streaming_hash_equals_whole() {
        let data: [u8; 10000] = core::array::from_fn(|i| (i * 7) as u8);
        let mut h = PayloadHasher::default();
        for part in data.chunks(333) {
            h.update(part);
        }
        assert_eq!(h.finish(), payload_hash(&data));
    }
}
