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

    // ---- properties ------------------------------------------------------------------------------------------

    extern crate std;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::Index;
    use std::vec::Vec;

    const KINDS: [Kind; 8] =
        [Kind::Header, Kind::Job, Kind::Pages, Kind::ProcessEnd, Kind::End, Kind::Data, Kind::Reuse, Kind::Signature];

    /// Adding a kind fails to compile here: add it to KINDS too.
    #[allow(dead_code)]
    fn every_kind_is_listed(k: Kind) {
        match k {
            Kind::Header | Kind::Job | Kind::Pages | Kind::ProcessEnd | Kind::End | Kind::Data | Kind::Reuse | Kind::Signature => {}
        }
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop::sample::select(&KINDS[..])
    }

    /// Addresses and lengths near the edges that matter (page multiples, the end of user space, overflow) as well
    /// as anything.
    fn addr() -> impl Strategy<Value = u64> {
        let page = PAGE as u64;
        prop_oneof![
            any::<u64>(),
            (0..crate::plan::USER_END / page + 2).prop_map(move |p| p * page),
            (0..crate::plan::USER_END / page + 2).prop_map(move |p| p * page + 1),
            Just(crate::plan::USER_END),
            Just(!(page - 1)),
        ]
    }

    fn length() -> impl Strategy<Value = u64> {
        let page = PAGE as u64;
        prop_oneof![any::<u64>(), (0..64u64).prop_map(move |p| p * page), Just(page - 1), Just(crate::plan::USER_END)]
    }

    /// A stream that yields its bytes in order, like a file or a pipe.
    struct Bytes<'a>(&'a [u8]);

    impl Source for Bytes<'_> {
        fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), Option<Errno>> {
            if self.0.len() < buf.len() {
                self.0 = &[];
                return Err(None);
            }
            let (now, rest) = self.0.split_at(buf.len());
            buf.copy_from_slice(now);
            self.0 = rest;
            Ok(())
        }
    }

    /// An image's framing the way the writer lays it out: file head, each chunk's head and payload, End.
    fn write_stream(chunks: &[(Kind, Vec<u8>)]) -> Vec<u8> {
        let mut out = super::file_head().to_vec();
        let mut put = |kind, seq, payload: &[u8]| {
            out.extend_from_slice(&ChunkHead { kind, seq, len: payload.len() as u64, payload_hash: payload_hash(payload) }.encode());
            out.extend_from_slice(payload);
        };
        for (seq, (kind, payload)) in chunks.iter().enumerate() {
            put(*kind, seq as u64, payload);
        }
        put(Kind::End, chunks.len() as u64, &end_payload(chunks.len() as u64));
        out
    }

    /// Read a stream strictly forward, checking every head and payload, up to and with its End chunk.
    fn read_stream(b: &[u8]) -> Result<Vec<(Kind, Vec<u8>)>, ImageError> {
        let mut src = Bytes(b);
        read_file_head(&mut src)?;
        let mut chunks = Vec::new();
        for seq in 0.. {
            let h = read_head(&mut src, seq)?;
            let mut payload = std::vec![0u8; h.len as usize];
            src.read_exact(&mut payload).map_err(|_| ImageError::Truncated("chunk payload"))?;
            if payload_hash(&payload) != h.payload_hash {
                return Err(ImageError::PayloadCorrupt { seq });
            }
            if h.kind == Kind::End {
                if payload != end_payload(seq) {
                    return Err(ImageError::Malformed { seq, what: "End's count" });
                }
                break;
            }
            chunks.push((h.kind, payload));
        }
        Ok(chunks)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// A map op's region is judged as a page run is (the restorer checks both the same way).
        #[test]
        fn regions_are_judged_as_page_runs(addr in addr(), len in length()) {
            prop_assert_eq!(crate::plan::MapOp { addr, len, ..Default::default() }.end(), PageRun { addr, len }.end());
        }


        /// `from_u32` inverts `as u32` and refuses every other number.
        #[test]
        fn kinds_are_their_numbers(v in prop_oneof![0..16u32, any::<u32>()]) {
            match Kind::from_u32(v) {
                Some(k) => prop_assert_eq!(k as u32, v),
                None => prop_assert!(KINDS.iter().all(|k| *k as u32 != v)),
            }
        }

        #[test]
        fn heads_round_trip(kind in kind(), seq in any::<u64>(), len in 0..=MAX_PAYLOAD, hash in any::<u64>(), other in any::<u64>()) {
            let b = ChunkHead { kind, seq, len, payload_hash: hash }.encode();
            let d = ChunkHead::decode(&b, seq).unwrap();
            prop_assert_eq!((d.kind, d.seq, d.len, d.payload_hash), (kind, seq, len, hash));
            prop_assume!(other != seq);
            prop_assert_eq!(ChunkHead::decode(&b, other).unwrap_err(), ImageError::Sequence { expected: other, found: seq });
        }

        /// Any one bit flipped in a head, checksum included, is caught as a corrupt head.
        #[test]
        fn a_flipped_bit_in_a_head_is_caught(kind in kind(), seq in any::<u64>(), len in 0..=MAX_PAYLOAD, hash in any::<u64>(), bit in 0..CHUNK_HEAD_LEN * 8) {
            let mut b = ChunkHead { kind, seq, len, payload_hash: hash }.encode();
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert_eq!(ChunkHead::decode(&b, seq).unwrap_err(), ImageError::HeadCorrupt { seq });
        }

        /// A forged head (its checksum computed again, as anyone can) decodes exactly as its fields say: refused
        /// for a wrong magic, number, kind or length, else read back to the very same bytes.
        #[test]
        fn forged_heads_decode_as_their_fields_say(
            magic in prop_oneof![Just(CHUNK_MAGIC), any::<u32>()],
            kind in prop_oneof![1..=8u32, any::<u32>()],
            seq in any::<u64>(),
            expected in prop_oneof![Just(None), any::<u64>().prop_map(Some)],
            len in prop_oneof![0..=MAX_PAYLOAD, MAX_PAYLOAD..=MAX_PAYLOAD + 1, any::<u64>()],
            hash in any::<u64>(),
        ) {
            let expected = expected.unwrap_or(seq);
            let mut b = [0u8; CHUNK_HEAD_LEN];
            b[0..4].copy_from_slice(&magic.to_le_bytes());
            b[4..8].copy_from_slice(&kind.to_le_bytes());
            b[8..16].copy_from_slice(&seq.to_le_bytes());
            b[16..24].copy_from_slice(&len.to_le_bytes());
            b[24..32].copy_from_slice(&hash.to_le_bytes());
            let h = xxh3_64(&b[..32]);
            b[32..40].copy_from_slice(&h.to_le_bytes());
            let got = ChunkHead::decode(&b, expected);
            let want = if magic != CHUNK_MAGIC {
                Err(ImageError::HeadCorrupt { seq: expected })
            } else if seq != expected {
                Err(ImageError::Sequence { expected, found: seq })
            } else if Kind::from_u32(kind).is_none() {
                Err(ImageError::Malformed { seq, what: "unknown chunk kind" })
            } else if len > MAX_PAYLOAD {
                Err(ImageError::Malformed { seq, what: "payload length too large" })
            } else {
                Ok(())
            };
            match (got, want) {
                (Ok(d), Ok(())) => prop_assert_eq!(d.encode(), b),
                (got, want) => prop_assert_eq!(got.map(|_| ()), want),
            }
        }

        /// A file head is accepted only with the magic and this format version; anything else is named.
        #[test]
        fn file_heads(version in prop_oneof![Just(FORMAT_VERSION), any::<u32>()], at in 0..8usize, x in 1..=255u8) {
            let mut b = super::file_head();
            b[8..12].copy_from_slice(&version.to_le_bytes());
            let want = if version == FORMAT_VERSION { Ok(()) } else { Err(ImageError::Version(version)) };
            prop_assert_eq!(check_file_head(&b), want);
            b[at] ^= x;
            prop_assert_eq!(check_file_head(&b), Err(ImageError::NotAnImage));
        }

        /// A run reads back from its 16 bytes, whatever follows them.
        #[test]
        fn runs_round_trip(addr in any::<u64>(), len in any::<u64>(), tail in vec(any::<u8>(), 0..8)) {
            let mut b = PageRun { addr, len }.encode().to_vec();
            b.extend_from_slice(&tail);
            prop_assert_eq!(PageRun::decode(&b), PageRun { addr, len });
        }

        /// A run is well formed exactly when it is a non-empty range of whole pages within user space (computed
        /// without overflow), and then it ends at addr + len and holds len / PAGE pages.
        #[test]
        fn well_formed_runs_are_ranges_of_user_pages(addr in addr(), len in length()) {
            let r = PageRun { addr, len };
            let page = PAGE as u128;
            let user = (addr as u128).is_multiple_of(page) && (len as u128).is_multiple_of(page) && len > 0
                && addr as u128 + len as u128 <= crate::plan::USER_END as u128;
            prop_assert_eq!(r.end().is_some(), user);
            if let Some(end) = r.end() {
                prop_assert_eq!(end as u128, addr as u128 + len as u128);
                prop_assert_eq!(r.pages() * PAGE as u64, len);
            }
        }

        /// A Pages or Reuse payload's run table reads back whatever data follows it; a payload cut inside its
        /// table is refused.
        #[test]
        fn run_tables_round_trip(runs in vec((any::<u64>(), any::<u64>()), 0..=MAX_RUNS as usize), data in vec(any::<u8>(), 0..64), cut in any::<Index>()) {
            let mut p = (runs.len() as u32).to_le_bytes().to_vec();
            p.extend_from_slice(&[0; 4]);
            for &(addr, len) in &runs {
                p.extend_from_slice(&PageRun { addr, len }.encode());
            }
            let table_end = p.len();
            p.extend_from_slice(&data);
            let (n, table) = run_table(&p).unwrap();
            prop_assert_eq!(n, runs.len());
            prop_assert_eq!(table.len(), n * RUN_LEN);
            for (i, &(addr, len)) in runs.iter().enumerate() {
                prop_assert_eq!(PageRun::decode(&table[i * RUN_LEN..]), PageRun { addr, len });
            }
            prop_assert_eq!(run_table(&p[..cut.index(table_end)]), None);
        }

        /// More runs than a chunk holds are refused, even when the bytes for them are there.
        #[test]
        fn oversized_run_tables_are_refused(n in prop_oneof![Just(MAX_RUNS + 1), MAX_RUNS + 1..=u32::MAX]) {
            let mut p = n.to_le_bytes().to_vec();
            p.resize(8 + (MAX_RUNS as usize + 1) * RUN_LEN, 0);
            prop_assert_eq!(run_table(&p), None);
        }

        #[test]
        fn process_end_prefix_round_trips(pages in any::<u64>(), rest in vec(any::<u8>(), 0..32), short in vec(any::<u8>(), 0..PROCESS_END_PREFIX)) {
            let mut p = process_end_prefix(pages).to_vec();
            p.extend_from_slice(&rest);
            prop_assert_eq!(split_process_end(&p), Some((pages, &rest[..])));
            prop_assert_eq!(split_process_end(&short), None);
        }

        /// A payload hashed piece by piece (empty pieces too) hashes as the whole: the writer and the restorer
        /// hash page runs where they lie.
        #[test]
        fn a_payload_hashed_in_pieces_hashes_as_a_whole(data in vec(any::<u8>(), 0..20_000), cuts in vec(any::<Index>(), 0..8)) {
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(data.len() + 1)).collect();
            at.sort();
            let mut h = PayloadHasher::default();
            let mut from = 0;
            for &to in at.iter().chain([data.len()].iter()) {
                h.update(&data[from..to]);
                from = to;
            }
            prop_assert_eq!(h.finish(), payload_hash(&data));
        }

        /// Chunks written strictly forward read back in order, kinds and payloads; a stream cut anywhere before its
        /// End is refused as truncated (or as no image, inside the file head), never read as a whole image.
        #[test]
        fn chunk_streams_read_back_and_a_cut_is_caught(chunks in vec((kind(), vec(any::<u8>(), 0..64)), 0..6), cut in any::<Index>()) {
            let chunks: Vec<(Kind, Vec<u8>)> = chunks.into_iter().filter(|c| c.0 != Kind::End).collect();
            let b = write_stream(&chunks);
            prop_assert_eq!(read_stream(&b), Ok(chunks));
            let n = cut.index(b.len());
            match read_stream(&b[..n]) {
                Err(ImageError::NotAnImage) => prop_assert!(n < FILE_HEAD_LEN),
                Err(ImageError::Truncated(_)) => prop_assert!(n >= FILE_HEAD_LEN),
                other => prop_assert!(false, "cut at {} of {}: {:?}", n, b.len(), other),
            }
        }
    }

    #[test]
    fn every_kind_has_its_number() {
        for k in KINDS {
            assert_eq!(Kind::from_u32(k as u32), Some(k));
        }
        assert_eq!((SIGNATURE_CHUNK_LEN, END_CHUNK_LEN), (CHUNK_HEAD_LEN + SIGNATURE_LEN, CHUNK_HEAD_LEN + 8));
    }
}
