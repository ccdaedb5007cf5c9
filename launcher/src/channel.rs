//! The connection between `vrun migrate` and `vrun serve`: both ends prove they hold the same key before
//! anything else is said, and every frame after that carries a MAC, so a stream altered, cut, replayed or
//! reordered on the way is refused.
//!
//! Handshake (each side sends a fresh 32-byte nonce; K is derived from the key file):
//!   client -> server   MAGIC, Nc
//!   server -> client   Ns, MAC(K, "server" Nc Ns)
//!   client -> server   MAC(K, "client" Nc Ns)
//! The session key is MAC(K, "session" Nc Ns). A frame is kind (1 byte), length (4), payload, and
//! MAC(session, direction, sequence number, kind, length, payload).

use anyhow::{Context, Result, anyhow, bail};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

const MAGIC: &[u8; 8] = b"vOSmig1\n";
const MAC_LEN: usize = 32;
/// The largest frame either side accepts.
pub const MAX_FRAME: usize = 1 << 20;

/// What a frame holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Kind {
    /// Client: the job's name and how to restore it (msgpack of `migrate::Begin`).
    Begin = 1,
    /// Client: the next bytes of the image.
    Data = 2,
    /// Client: the image is complete.
    End = 3,
    /// Server: the job runs here now (its name here).
    Running = 4,
    /// Server: the restore failed (why).
    Failed = 5,
    /// Client: the source host let go of the job's address (`--move-addr`).
    Released = 6,
    /// Client: pages sent ahead while the job runs (`PageHead` records, each followed by its bytes).
    Precopy = 7,
    /// Server, post-copy: pages the job needs (`PageHead` records alone).
    Want = 8,
    /// Client, post-copy: pages wanted (`PageHead` records, each followed by its bytes).
    Pages = 9,
    /// Server, post-copy: every page arrived; the source may let the job go.
    Filled = 10,
}

/// The head of a record of pages, pid as the job numbers it.
#[derive(Clone, Copy, Debug)]
pub struct PageHead {
    pub pid: i32,
    pub addr: u64,
    pub len: u64,
}

impl PageHead {
    pub const LEN: usize = 24;

    /// `pid:u32 0:u32 addr:u64 len:u64`, little-endian.
    pub fn encode(&self) -> [u8; 24] {
        let mut h = [0u8; 24];
        h[..4].copy_from_slice(&self.pid.to_le_bytes());
        h[8..16].copy_from_slice(&self.addr.to_le_bytes());
        h[16..].copy_from_slice(&self.len.to_le_bytes());
        h
    }

    /// A head read from the other host: whole pages, inside a user address space.
    pub fn decode(h: &[u8]) -> Result<PageHead> {
        let u = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().unwrap());
        let p = PageHead { pid: i32::from_le_bytes(h[..4].try_into().unwrap()), addr: u(8), len: u(16) };
        if h.len() != 24 || p.addr % 4096 != 0 || p.len % 4096 != 0 || p.addr.checked_add(p.len).is_none_or(|e| e > 1 << 57) {
            bail!("a malformed page record");
        }
        Ok(p)
    }
}

impl Kind {
    fn from(b: u8) -> Option<Kind> {
        [Kind::Begin, Kind::Data, Kind::End, Kind::Running, Kind::Failed, Kind::Released, Kind::Precopy, Kind::Want, Kind::Pages, Kind::Filled].into_iter().find(|k| *k as u8 == b)
    }
}

/// A shared key: a file of any bytes both hosts hold (e.g. `head -c 32 /dev/urandom`). Without one, frames are
/// still checked for damage but anyone who can connect is believed.
pub fn key(file: Option<&Path>) -> Result<[u8; 32]> {
    let Some(f) = file else { return Ok([0; 32]) };
    let bytes = std::fs::read(f).with_context(|| format!("reading the key file {}", f.display()))?;
    if bytes.len() < 16 {
        bail!("{}: a key needs at least 16 bytes (make one with: head -c 32 /dev/urandom > {})", f.display(), f.display());
    }
    Ok(blake3::derive_key("vOS 2026 migration key", &bytes))
}

fn mac(key: &[u8; 32], label: &[u8], nc: &[u8; 32], ns: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(label).update(nc).update(ns);
    *h.finalize().as_bytes()
}

fn nonce() -> Result<[u8; 32]> {
    let mut n = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut n).context("reading /dev/urandom")?;
    Ok(n)
}

fn same(a: &[u8; 32], b: &[u8]) -> bool {
    // blake3::Hash compares in constant time.
    b.len() == 32 && blake3::Hash::from_bytes(*a) == blake3::Hash::from_bytes(b.try_into().unwrap())
}

pub struct Channel {
    pub stream: TcpStream,
    session: [u8; 32],
    /// 0 for the client's frames, 1 for the server's.
    me: u8,
    sent: u64,
    received: u64,
}

impl Channel {
    /// Connect to a `vrun serve` and prove we hold its key (and that it holds ours).
    pub fn connect(to: &str, key: &[u8; 32]) -> Result<Channel> {
        use std::net::ToSocketAddrs;
        let addr = to.to_socket_addrs().with_context(|| format!("{to}: not a HOST:PORT"))?.next().ok_or_else(|| anyhow!("{to}: no address"))?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).with_context(|| format!("connecting to {to}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.set_nodelay(true)?;
        let nc = nonce()?;
        s.write_all(MAGIC)?;
        s.write_all(&nc)?;
        let mut answer = [0u8; 64];
        s.read_exact(&mut answer).with_context(|| format!("{to} did not answer as a vrun serve"))?;
        let ns: [u8; 32] = answer[..32].try_into().unwrap();
        if !same(&mac(key, b"server", &nc, &ns), &answer[32..]) {
            bail!("{to} does not hold the same key: refusing to send it anything");
        }
        s.write_all(&mac(key, b"client", &nc, &ns))?;
        Ok(Channel::new(s, mac(key, b"session", &nc, &ns), 0))
    }

    /// Check a connecting client: it must prove it holds `key`. The error says why it was refused.
    pub fn accept(mut s: TcpStream, key: &[u8; 32]) -> Result<Channel> {
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_nodelay(true)?;
        let mut hello = [0u8; 40];
        s.read_exact(&mut hello).context("no greeting")?;
        if &hello[..8] != MAGIC {
            bail!("not a vrun migrate");
        }
        let nc: [u8; 32] = hello[8..].try_into().unwrap();
        let ns = nonce()?;
        s.write_all(&ns)?;
        s.write_all(&mac(key, b"server", &nc, &ns))?;
        let mut proof = [0u8; 32];
        s.read_exact(&mut proof).context("no proof of the key")?;
        if !same(&mac(key, b"client", &nc, &ns), &proof) {
            bail!("wrong key");
        }
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Channel::new(s, mac(key, b"session", &nc, &ns), 1))
    }

    fn new(stream: TcpStream, session: [u8; 32], me: u8) -> Channel {
        Channel { stream, session, me, sent: 0, received: 0 }
    }

    fn frame_mac(&self, from: u8, seq: u64, head: &[u8], payload: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.session);
        h.update(&[from]).update(&seq.to_le_bytes()).update(head).update(payload);
        *h.finalize().as_bytes()
    }

    pub fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<()> {
        assert!(payload.len() <= MAX_FRAME);
        let mut head = [0u8; 5];
        head[0] = kind as u8;
        head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        let m = self.frame_mac(self.me, self.sent, &head, payload);
        self.sent += 1;
        // Head, payload and MAC in one vectored write: the payload is not copied first.
        let mut parts = [std::io::IoSlice::new(&head), std::io::IoSlice::new(payload), std::io::IoSlice::new(&m)];
        let mut parts = &mut parts[..];
        while !parts.is_empty() {
            let n = match self.stream.write_vectored(parts) {
                Ok(0) => bail!("sending to the other host: connection closed"),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("sending to the other host"),
            };
            std::io::IoSlice::advance_slices(&mut parts, n);
        }
        Ok(())
    }

    pub fn recv(&mut self) -> Result<(Kind, Vec<u8>)> {
        let mut b = vec![];
        let k = self.recv_into(&mut b)?;
        Ok((k, b))
    }

    /// Receive a frame's payload into `payload` (reused: big frames need no fresh memory each time).
    pub fn recv_into(&mut self, payload: &mut Vec<u8>) -> Result<Kind> {
        let mut head = [0u8; 5];
        self.stream.read_exact(&mut head).context("the other host went away")?;
        let len = u32::from_le_bytes(head[1..].try_into().unwrap()) as usize;
        if len > MAX_FRAME {
            bail!("a frame of {len} bytes: the stream is damaged");
        }
        payload.resize(len, 0);
        let mut got = [0u8; MAC_LEN];
        self.stream.read_exact(payload).and_then(|_| self.stream.read_exact(&mut got)).context("the other host went away in the middle of a frame")?;
        if !same(&self.frame_mac(1 - self.me, self.received, &head, payload), &got) {
            bail!("a frame failed its integrity check: the stream was altered or damaged");
        }
        self.received += 1;
        Kind::from(head[0]).ok_or_else(|| anyhow!("a frame of unknown kind {}", head[0]))
    }
}
