//! Images taken apart and put together again, to make hostile ones from real ones: parse the chunks, let a test
//! change the job's metadata (typed, or as a MessagePack tree) or the chunks themselves, then frame them again
//! with the right sequence numbers, checksums and End chunk, so every change reaches the decoder and restorer.

use std::path::Path;
use vos::chunk::{self, ChunkHead, Kind};
use vos::image::{ImageHeader, JobImage, ProcessSummary};

/// One chunk: its kind (raw, so a test may use any) and payload.
#[derive(Clone, Debug)]
pub struct Chunk {
    pub kind: u32,
    pub payload: Vec<u8>,
}

/// An image as chunks (its End chunk left out: `encode` writes one).
#[derive(Clone)]
pub struct Image {
    pub head: [u8; chunk::FILE_HEAD_LEN],
    pub chunks: Vec<Chunk>,
    /// The payload of the Signature chunk after End, of a signed image (kept as it was: a changed image keeps a
    /// signature that no longer matches it, framed again after the new End).
    pub signature: Option<Vec<u8>>,
}

impl Image {
    /// Parse a good image (the test's own: anything wrong with it panics).
    pub fn read(path: impl AsRef<Path>) -> Image {
        let b = std::fs::read(path.as_ref()).unwrap();
        let head: [u8; chunk::FILE_HEAD_LEN] = b[..chunk::FILE_HEAD_LEN].try_into().unwrap();
        let mut at = chunk::FILE_HEAD_LEN;
        let mut chunks = vec![];
        loop {
            let h: [u8; chunk::CHUNK_HEAD_LEN] = b[at..at + chunk::CHUNK_HEAD_LEN].try_into().unwrap();
            let kind = u32::from_le_bytes(h[4..8].try_into().unwrap());
            let len = u64::from_le_bytes(h[16..24].try_into().unwrap()) as usize;
            at += chunk::CHUNK_HEAD_LEN;
            let payload = b[at..at + len].to_vec();
            at += len;
            if kind == Kind::End as u32 {
                let mut signature = None;
                if at < b.len() {
                    let h: [u8; chunk::CHUNK_HEAD_LEN] = b[at..at + chunk::CHUNK_HEAD_LEN].try_into().unwrap();
                    assert_eq!(u32::from_le_bytes(h[4..8].try_into().unwrap()), Kind::Signature as u32, "data after the End chunk of a good image");
                    signature = Some(b[at + chunk::CHUNK_HEAD_LEN..].to_vec());
                    assert_eq!(b.len() - at, chunk::SIGNATURE_CHUNK_LEN, "data after the signature of a good image");
                }
                return Image { head, chunks, signature };
            }
            chunks.push(Chunk { kind, payload });
        }
    }

    /// The image's bytes: chunks numbered from 0, checksummed, then End.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.head.to_vec();
        let n = self.chunks.len() as u64;
        let end = Chunk { kind: Kind::End as u32, payload: chunk::end_payload(n).to_vec() };
        for (seq, c) in self.chunks.iter().chain(std::iter::once(&end)).enumerate() {
            out.extend_from_slice(&frame(c.kind, seq as u64, &c.payload));
        }
        if let Some(s) = &self.signature {
            out.extend_from_slice(&frame(Kind::Signature as u32, n + 1, s));
        }
        out
    }

    pub fn write(&self, path: impl AsRef<Path>) {
        std::fs::write(path, self.encode()).unwrap();
    }

    /// The format version in the file head.
    pub fn version(&self) -> u32 {
        u32::from_le_bytes(self.head[8..12].try_into().unwrap())
    }

    fn index(&self, kind: Kind) -> usize {
        self.chunks.iter().position(|c| c.kind == kind as u32).unwrap_or_else(|| panic!("no {kind:?} chunk"))
    }

    pub fn header(&self) -> ImageHeader {
        rmp_serde::from_slice(&self.chunks[self.index(Kind::Header)].payload).unwrap()
    }

    pub fn job(&self) -> JobImage {
        rmp_serde::from_slice(&self.chunks[self.index(Kind::Job)].payload).unwrap()
    }

    pub fn set_job(&mut self, job: &JobImage) {
        let i = self.index(Kind::Job);
        self.chunks[i].payload = rmp_serde::to_vec_named(job).unwrap();
    }

    /// Change the job's metadata.
    pub fn edit_job(&mut self, f: impl FnOnce(&mut JobImage)) {
        let mut j = self.job();
        f(&mut j);
        self.set_job(&j);
    }

    /// Indices of the chunks of this kind.
    pub fn all(&self, kind: Kind) -> Vec<usize> {
        (0..self.chunks.len()).filter(|&i| self.chunks[i].kind == kind as u32).collect()
    }

    /// The summaries of the processes, in order (any format version).
    pub fn summaries(&self) -> Vec<ProcessSummary> {
        let skip = if self.version() >= 2 { chunk::PROCESS_END_PREFIX } else { 0 };
        self.all(Kind::ProcessEnd).iter().map(|&i| rmp_serde::from_slice(&self.chunks[i].payload[skip..]).unwrap()).collect()
    }
}

/// A chunk's bytes: head (with seq and checksums) and payload.
pub fn frame(kind: u32, seq: u64, payload: &[u8]) -> Vec<u8> {
    let h = ChunkHead { kind: Kind::End, seq, len: payload.len() as u64, payload_hash: chunk::payload_hash(payload) };
    let mut head = h.encode();
    // Any kind, also ones a reader does not know: the head's own checksum covers it.
    head[4..8].copy_from_slice(&kind.to_le_bytes());
    let hh = xxh3(&head[..32]);
    head[32..40].copy_from_slice(&hh.to_le_bytes());
    let mut out = head.to_vec();
    out.extend_from_slice(payload);
    out
}

fn xxh3(b: &[u8]) -> u64 {
    // The payload hash is xxh3 as well (vos::chunk).
    chunk::payload_hash(b)
}

// ---- MessagePack as a tree --------------------------------------------------------------------------------------

/// A MessagePack value, kept as written, so a test can change any part of a structure (an integer to a boundary
/// value, a string to a path of its choice, an array shorter) whatever type the reader expects there.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Nil,
    Bool(bool),
    Uint(u64),
    Int(i64),
    F32(f32),
    F64(f64),
    Str(Vec<u8>),
    Bin(Vec<u8>),
    Array(Vec<Value>),
    Map(Vec<(Value, Value)>),
    Ext(i8, Vec<u8>),
}

impl Value {
    /// Decode one value from the start of `b`; returns it and the bytes after it.
    pub fn decode(b: &[u8]) -> Option<(Value, &[u8])> {
        fn take(r: &[u8], n: usize) -> Option<(&[u8], &[u8])> {
            (r.len() >= n).then(|| r.split_at(n))
        }
        fn uint(r: &[u8], n: usize) -> Option<(u64, &[u8])> {
            let (x, rest) = take(r, n)?;
            Some((x.iter().fold(0u64, |a, &c| a << 8 | c as u64), rest))
        }
        fn bytes(r: &[u8], n: usize) -> Option<(Vec<u8>, &[u8])> {
            let (len, rest) = uint(r, n)?;
            let (x, rest) = take(rest, len as usize)?;
            Some((x.to_vec(), rest))
        }
        fn seq(mut r: &[u8], n: usize, pairs: bool) -> Option<(Value, &[u8])> {
            let mut items = vec![];
            let mut map = vec![];
            for _ in 0..n {
                let (v, rest) = Value::decode(r)?;
                r = rest;
                if pairs {
                    let (w, rest) = Value::decode(r)?;
                    r = rest;
                    map.push((v, w));
                } else {
                    items.push(v);
                }
            }
            Some((if pairs { Value::Map(map) } else { Value::Array(items) }, r))
        }
        let (&t, r) = b.split_first()?;
        Some(match t {
            0x00..=0x7f => (Value::Uint(t as u64), r),
            0x80..=0x8f => return seq(r, (t & 0xf) as usize, true),
            0x90..=0x9f => return seq(r, (t & 0xf) as usize, false),
            0xa0..=0xbf => {
                let (x, rest) = take(r, (t & 0x1f) as usize)?;
                (Value::Str(x.to_vec()), rest)
            }
            0xc0 => (Value::Nil, r),
            0xc2 => (Value::Bool(false), r),
            0xc3 => (Value::Bool(true), r),
            0xc4..=0xc6 => {
                let (x, rest) = bytes(r, 1 << (t - 0xc4))?;
                (Value::Bin(x), rest)
            }
            0xca => {
                let (x, rest) = uint(r, 4)?;
                (Value::F32(f32::from_bits(x as u32)), rest)
            }
            0xcb => {
                let (x, rest) = uint(r, 8)?;
                (Value::F64(f64::from_bits(x)), rest)
            }
            0xcc..=0xcf => {
                let (x, rest) = uint(r, 1 << (t - 0xcc))?;
                (Value::Uint(x), rest)
            }
            0xd0..=0xd3 => {
                let n = 1usize << (t - 0xd0);
                let (x, rest) = uint(r, n)?;
                let shift = 64 - 8 * n as u32;
                (Value::Int(((x << shift) as i64) >> shift), rest)
            }
            0xd9..=0xdb => {
                let (x, rest) = bytes(r, 1 << (t - 0xd9))?;
                (Value::Str(x), rest)
            }
            0xdc | 0xdd => {
                let (n, rest) = uint(r, 2 << (t - 0xdc))?;
                return seq(rest, n as usize, false);
            }
            0xde | 0xdf => {
                let (n, rest) = uint(r, 2 << (t - 0xde))?;
                return seq(rest, n as usize, true);
            }
            0xd4..=0xd8 => {
                let (ty, rest) = take(r, 1)?;
                let (x, rest) = take(rest, 1 << (t - 0xd4))?;
                (Value::Ext(ty[0] as i8, x.to_vec()), rest)
            }
            0xc7..=0xc9 => {
                let (len, rest) = uint(r, 1 << (t - 0xc7))?;
                let (ty, rest) = take(rest, 1)?;
                let (x, rest) = take(rest, len as usize)?;
                (Value::Ext(ty[0] as i8, x.to_vec()), rest)
            }
            0xe0..=0xff => (Value::Int(t as i8 as i64), r),
            0xc1 => return None,
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let len = |out: &mut Vec<u8>, n: usize, small: Option<(u8, usize)>, tags: [u8; 3]| match n {
            n if small.is_some_and(|(_, max)| n <= max) => out.push(small.unwrap().0 | n as u8),
            n if n <= 0xff && tags[0] != 0 => out.extend_from_slice(&[tags[0], n as u8]),
            n if n <= 0xffff => {
                out.push(tags[1]);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(tags[2]);
                out.extend_from_slice(&(n as u32).to_be_bytes());
            }
        };
        match self {
            Value::Nil => out.push(0xc0),
            Value::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
            Value::Uint(v) => match *v {
                v if v < 0x80 => out.push(v as u8),
                v if v <= 0xff => out.extend_from_slice(&[0xcc, v as u8]),
                v if v <= 0xffff => {
                    out.push(0xcd);
                    out.extend_from_slice(&(v as u16).to_be_bytes());
                }
                v if v <= 0xffff_ffff => {
                    out.push(0xce);
                    out.extend_from_slice(&(v as u32).to_be_bytes());
                }
                v => {
                    out.push(0xcf);
                    out.extend_from_slice(&v.to_be_bytes());
                }
            },
            Value::Int(v) => match *v {
                v if v >= 0 => Value::Uint(v as u64).encode(out),
                v if v >= -32 => out.push(v as i8 as u8),
                v if v >= i8::MIN as i64 => out.extend_from_slice(&[0xd0, v as i8 as u8]),
                v if v >= i16::MIN as i64 => {
                    out.push(0xd1);
                    out.extend_from_slice(&(v as i16).to_be_bytes());
                }
                v if v >= i32::MIN as i64 => {
                    out.push(0xd2);
                    out.extend_from_slice(&(v as i32).to_be_bytes());
                }
                v => {
                    out.push(0xd3);
                    out.extend_from_slice(&v.to_be_bytes());
                }
            },
            Value::F32(f) => {
                out.push(0xca);
                out.extend_from_slice(&f.to_bits().to_be_bytes());
            }
            Value::F64(f) => {
                out.push(0xcb);
                out.extend_from_slice(&f.to_bits().to_be_bytes());
            }
            Value::Str(s) => {
                len(out, s.len(), Some((0xa0, 31)), [0xd9, 0xda, 0xdb]);
                out.extend_from_slice(s);
            }
            Value::Bin(b) => {
                len(out, b.len(), None, [0xc4, 0xc5, 0xc6]);
                out.extend_from_slice(b);
            }
            Value::Array(a) => {
                len(out, a.len(), Some((0x90, 15)), [0, 0xdc, 0xdd]);
                a.iter().for_each(|v| v.encode(out));
            }
            Value::Map(m) => {
                len(out, m.len(), Some((0x80, 15)), [0, 0xde, 0xdf]);
                for (k, v) in m {
                    k.encode(out);
                    v.encode(out);
                }
            }
            Value::Ext(ty, b) => {
                len(out, b.len(), None, [0xc7, 0xc8, 0xc9]);
                out.push(*ty as u8);
                out.extend_from_slice(b);
            }
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![];
        self.encode(&mut out);
        out
    }

    /// Every node of the tree, depth first (the root first), for picking one to change.
    pub fn count(&self) -> usize {
        1 + match self {
            Value::Array(a) => a.iter().map(Value::count).sum(),
            Value::Map(m) => m.iter().map(|(_, v)| v.count()).sum(),
            _ => 0,
        }
    }

    /// The `n`th node (as `count` numbers them), and the names of the map keys on the way to it.
    pub fn nth(&mut self, n: usize, path: &mut Vec<String>) -> Option<&mut Value> {
        if n == 0 {
            return Some(self);
        }
        let mut n = n - 1;
        match self {
            Value::Array(a) => {
                for (i, v) in a.iter_mut().enumerate() {
                    let c = v.count();
                    if n < c {
                        path.push(i.to_string());
                        return v.nth(n, path);
                    }
                    n -= c;
                }
                None
            }
            Value::Map(m) => {
                for (k, v) in m.iter_mut() {
                    let c = v.count();
                    if n < c {
                        path.push(match k {
                            Value::Str(s) => String::from_utf8_lossy(s).into_owned(),
                            k => format!("{k:?}"),
                        });
                        return v.nth(n, path);
                    }
                    n -= c;
                }
                None
            }
            _ => None,
        }
    }
}

// ---- mutations ---------------------------------------------------------------------------------------------------

/// A small deterministic generator (xorshift64*): the same seed, the same cases.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next_u64() % n as u64) as usize }
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// Change one node of a MessagePack tree the way a hostile image would: integers to boundary values, strings to
/// paths of `targets` and other troublemakers, arrays shorter, longer or reordered, a byte string cut. Returns
/// what was done (for the test's message).
pub fn mutate_value(root: &mut Value, rng: &mut Rng, targets: &[String]) -> String {
    let n = rng.below(root.count());
    let mut path = vec![];
    let Some(v) = root.nth(n, &mut path) else { return "nothing".into() };
    let at = path.join(".");
    let what = match v {
        Value::Uint(_) | Value::Int(_) => {
            let old = match v {
                Value::Uint(x) => *x as i128,
                Value::Int(x) => *x as i128,
                _ => 0,
            };
            let choices: [i128; 18] = [
                0,
                1,
                -1,
                old + 1,
                old - 1,
                old + 4096,
                old * 4096,
                u32::MAX as i128,
                u32::MAX as i128 + 1,
                i32::MAX as i128,
                i32::MIN as i128,
                u64::MAX as i128,
                i64::MIN as i128,
                i64::MAX as i128,
                0x7fff_ffff_f000,
                vos::plan::WINDOW_START as i128,
                65,
                1 << 20,
            ];
            let new = *rng.pick(&choices);
            *v = if new < 0 { Value::Int(new as i64) } else { Value::Uint(new as u64) };
            format!("{old} -> {new}")
        }
        Value::Str(s) => {
            let mut choices: Vec<String> =
                ["../", "", "/", "..", "/proc/self/mem", "/dev/sda", "/etc/passwd", "a\0b", "/tmp/../etc/shadow"].iter().map(|s| s.to_string()).collect();
            choices.push(format!("/{}", "x".repeat(5000)));
            choices.extend(targets.iter().cloned());
            let new = rng.pick(&choices).clone();
            let old = String::from_utf8_lossy(s).into_owned();
            *s = new.clone().into_bytes();
            format!("{old:?} -> {new:?}")
        }
        Value::Bin(b) => {
            let old = b.len();
            match rng.below(3) {
                0 => b.clear(),
                1 => b.truncate(old / 2),
                _ => b.extend(std::iter::repeat_n(0x41, 1 + rng.below(300))),
            }
            format!("bytes {old} -> {}", b.len())
        }
        Value::Array(a) if !a.is_empty() => {
            let (i, j) = (rng.below(a.len()), rng.below(a.len()));
            match rng.below(4) {
                0 => {
                    a.remove(i);
                    format!("dropped [{i}]")
                }
                1 => {
                    let x = a[i].clone();
                    a.insert(j, x);
                    format!("[{i}] copied to [{j}]")
                }
                2 => {
                    a.swap(i, j);
                    format!("swapped [{i}] [{j}]")
                }
                _ => {
                    a.clear();
                    "emptied".into()
                }
            }
        }
        Value::Bool(b) => {
            *b = !*b;
            "flipped".into()
        }
        Value::Nil => {
            *v = Value::Uint(rng.below(1000) as u64);
            "nil -> a number".into()
        }
        Value::Map(m) if !m.is_empty() && rng.below(4) == 0 => {
            let i = rng.below(m.len());
            m.remove(i);
            format!("key {i} dropped")
        }
        _ => "left as is".into(),
    };
    format!("{at}: {what}")
}

/// Change the image at chunk level: drop, repeat or swap chunks, cut a page run, shorten a payload below its
/// table, add data after the end. Returns what was done.
pub fn mutate_chunks(img: &mut Image, rng: &mut Rng) -> String {
    let n = img.chunks.len();
    let pages = img.all(Kind::Pages);
    match rng.below(7) {
        0 => {
            let i = rng.below(n);
            img.chunks.remove(i);
            format!("chunk {i} dropped")
        }
        1 => {
            let (i, j) = (rng.below(n), rng.below(n));
            let c = img.chunks[i].clone();
            img.chunks.insert(j, c);
            format!("chunk {i} repeated at {j}")
        }
        2 => {
            let (i, j) = (rng.below(n), rng.below(n));
            img.chunks.swap(i, j);
            format!("chunks {i} and {j} swapped")
        }
        3 if !pages.is_empty() => {
            // The last run of a Pages chunk loses its last page (table and data agree, the summary not).
            let i = *rng.pick(&pages);
            let p = &mut img.chunks[i].payload;
            if p.len() < 8 {
                return "a pages chunk too short for a run table left".into();
            }
            let nruns = u32::from_le_bytes(p[..4].try_into().unwrap()) as usize;
            if nruns == 0 || p.len() < 8 + nruns * chunk::RUN_LEN {
                return "an empty pages chunk left".into();
            }
            let at = 8 + (nruns - 1) * chunk::RUN_LEN + 8;
            let len = u64::from_le_bytes(p[at..at + 8].try_into().unwrap());
            p[at..at + 8].copy_from_slice(&(len - chunk::PAGE as u64).to_le_bytes());
            let keep = p.len() - chunk::PAGE;
            p.truncate(keep);
            format!("chunk {i}: its last run one page shorter")
        }
        4 if !pages.is_empty() => {
            let i = *rng.pick(&pages);
            let keep = rng.below(8);
            img.chunks[i].payload.truncate(keep);
            format!("chunk {i}: payload cut to {keep} bytes")
        }
        5 => {
            let i = rng.below(n);
            let len = img.chunks[i].payload.len();
            let cut = rng.below(len + 1);
            img.chunks[i].payload.truncate(cut);
            format!("chunk {i}: payload cut from {len} to {cut} bytes")
        }
        _ => {
            img.chunks.push(Chunk { kind: Kind::End as u32, payload: chunk::end_payload(n as u64).to_vec() });
            "an End chunk more (the image goes on after its end)".to_string()
        }
    }
}
