//! The connection between `vrun migrate` and `vrun serve`: a Noise protocol session (`snow`) keyed by a
//! pre-shared key, so everything after the handshake is encrypted and authenticated, and a stream altered, cut,
//! replayed or reordered on the way is refused.
//!
//! Protocol: `Noise_NNpsk0_25519_AESGCM_SHA256` (AES-GCM measured 3.7 GB/s each way here through `snow` with
//! `ring`, ChaCha20-Poly1305 1.2 GB/s). NNpsk0: the client's first message is already keyed by the PSK, so the
//! server checks it before it sends a single byte; a client without the key learns nothing from the server it
//! could test guesses against, and the ephemeral X25519 exchange makes the session keys forward-secret. Hence
//! keys are exactly 32 random bytes (`vrun keygen`): a passive observer holding a transcript cannot guess one.
//!
//! On the wire:
//!   client -> server   MAGIC, len:u16be, Noise message 1 (e; empty payload)     48 bytes
//!   server -> client   len:u16be, Noise message 2 (e, ee; empty payload)         48 bytes
//!                      (or len 0 and close: busy, try again later)
//!   then both ways     len:u16be, Noise transport message                        at most 65535 bytes
//! A frame is kind:u8 and length:u32le followed by its payload, cut into transport messages (a new message
//! starts each frame). The client's first frame (`Begin`) fits in one message, so the server can check it
//! before it gives the connection a thread.

use anyhow::{Context, Result, anyhow, bail};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// Names this protocol's version; also the Noise prologue, so both ends agree on it.
pub const MAGIC: &[u8; 8] = b"vOSmig2\n";
const NOISE: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// Noise's limits: a message is at most 65535 bytes, of which 16 are the AEAD tag.
const MSG_MAX: usize = 65535;
const TAG: usize = 16;
const CHUNK: usize = MSG_MAX - TAG;
/// Both handshake messages: an X25519 public key and the tag of an empty payload.
const HANDSHAKE_MSG: usize = 48;
const HEAD: usize = 5;
/// The largest frame either side accepts.
pub const MAX_FRAME: usize = 1 << 20;
/// The largest first frame (`Begin`): one transport message.
pub const MAX_FIRST: usize = CHUNK - HEAD;
/// The whole handshake, from accept to the client's first frame, must fit in this.
pub const HANDSHAKE_TIME: Duration = Duration::from_secs(10);
/// Processes a pre-copy stream may name: the source pre-copies at most this many (the rest of a bigger job
/// goes whole in the final round), the destination refuses a stream that names more (each is a memfd there).
pub const MAX_PRECOPY_PROCESSES: usize = 256;
/// A key file's size: exactly a Noise PSK.
pub const KEY_LEN: usize = 32;
/// Received bytes buffered: a few transport messages.
const RX_CAP: usize = 4 * (MSG_MAX + 2);
const TX_CAP: usize = HEAD + MAX_FRAME + (MAX_FRAME / CHUNK + 2) * (2 + TAG);

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
    /// Server: the restore failed, or the job was refused (why).
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
    /// Server: the job's description is accepted; its memory may come.
    Accepted = 11,
}

impl Kind {
    fn from(b: u8) -> Option<Kind> {
        use Kind::*;
        [Begin, Data, End, Running, Failed, Released, Precopy, Want, Pages, Filled, Accepted].into_iter().find(|k| *k as u8 == b)
    }
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

    /// A head read from the other host: a real pid, whole pages inside a user address space.
    pub fn decode(h: &[u8]) -> Result<PageHead> {
        let h: &[u8; 24] = h.try_into().map_err(|_| anyhow!("a truncated page record"))?;
        let u = |at: usize| u64::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3], h[at + 4], h[at + 5], h[at + 6], h[at + 7]]);
        let p = PageHead { pid: i32::from_le_bytes([h[0], h[1], h[2], h[3]]), addr: u(8), len: u(16) };
        if p.pid <= 0 || !p.addr.is_multiple_of(4096) || !p.len.is_multiple_of(4096) || p.addr.checked_add(p.len).is_none_or(|e| e > 1 << 57) {
            bail!("a malformed page record");
        }
        Ok(p)
    }
}

/// A pre-shared key: 32 random bytes both hosts hold.
pub struct Key([u8; KEY_LEN]);

impl Key {
    /// The well-known key of `--insecure-no-key`: traffic is still encrypted against a passive observer (the
    /// ephemeral exchange), but anyone can complete the handshake, so nothing is authenticated.
    pub fn insecure() -> Key {
        Key([0; KEY_LEN])
    }

    /// Read a key file, refusing one that others could read or change, or that is not exactly a key (as ssh
    /// refuses a private key file that is too open). The message says how to fix it.
    pub fn load(path: &Path) -> Result<Key> {
        let shown = path.display();
        // O_NONBLOCK: a FIFO planted at the path must not hang us (it is refused below as not a file).
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(path)
            .with_context(|| format!("opening the key file {shown}"))?;
        let m = f.metadata().with_context(|| format!("{shown}"))?;
        if !m.file_type().is_file() {
            bail!("{shown} is not a regular file: a key file is made by `vrun keygen FILE`");
        }
        let me = nix::unistd::geteuid().as_raw();
        if m.uid() != me && m.uid() != 0 {
            bail!("{shown} belongs to uid {}: a key file must belong to you (uid {me}) or root (chown {me} {shown})", m.uid());
        }
        let mode = m.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            bail!("{shown}: permissions {mode:04o} are too open: a key file must be readable and writable by its owner alone (chmod 600 {shown})");
        }
        if m.len() != KEY_LEN as u64 {
            bail!("{shown} holds {} bytes: a key is exactly {KEY_LEN} random bytes (make one with `vrun keygen FILE`)", m.len());
        }
        let mut k = [0u8; KEY_LEN];
        let mut more = [0u8; 1];
        f.read_exact(&mut k).with_context(|| format!("reading {shown}"))?;
        if f.read(&mut more).with_context(|| format!("reading {shown}"))? != 0 {
            bail!("{shown} grew while it was read: a key is exactly {KEY_LEN} bytes");
        }
        Ok(Key(k))
    }
}

/// `vrun keygen FILE`: a new key, 32 bytes from the kernel's random source, in a file created for it alone (never
/// an existing file or a symlink), mode 0600.
pub fn keygen(path: &Path) -> Result<()> {
    let shown = path.display();
    let mut k = [0u8; KEY_LEN];
    random(&mut k)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => anyhow!("{shown} exists already: keygen never overwrites a key (remove it first if it is to go)"),
            _ => anyhow!("creating {shown}: {e}"),
        })?;
    // The umask may have taken bits the owner needs; nobody else gets any.
    let written = f
        .set_permissions(std::fs::Permissions::from_mode(0o600))
        .and_then(|()| f.write_all(&k))
        .and_then(|()| f.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(path);
        bail!("writing {shown}: {e}");
    }
    Ok(())
}

fn random(buf: &mut [u8]) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: getrandom writes at most len bytes into our buffer.
        let n = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), buf.len() - got, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e).context("getrandom");
            }
            continue;
        }
        got += n as usize;
    }
    Ok(())
}

fn builder(key: &Key) -> Result<snow::Builder<'_>> {
    let params = NOISE.parse().map_err(|e| anyhow!("{NOISE}: {e}"))?;
    snow::Builder::new(params).psk(0, &key.0).and_then(|b| b.prologue(MAGIC)).map_err(|e| anyhow!("setting up Noise: {e}"))
}

/// Why a connection was not taken (the server's side of the handshake).
#[derive(Debug)]
pub enum Refused {
    /// Closed, or nothing arrived in time, before any of the protocol: a scanner or a flood, not worth a line each.
    Silent(String),
    /// Spoke, but not as a `vrun migrate` holding our key.
    Said(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Refused::Silent(s) | Refused::Said(s) => f.write_str(s),
        }
    }
}

/// The server's side of the handshake on a non-blocking socket, fed as bytes arrive, so that one thread keeps many
/// connections at once and none is given more than `HANDSHAKE_TIME` (`vrun serve`'s gate). Nothing is sent until
/// the client proved it holds the key (its first message decrypts); the connection is handed over only once its
/// first transport message (the job's description) decrypts too, which a replay of a first message cannot give.
pub struct Responder {
    hs: Option<snow::HandshakeState>,
    noise: Option<snow::TransportState>,
    rx: Vec<u8>,
}

impl Responder {
    pub fn new(key: &Key) -> Result<Responder> {
        let hs = builder(key)?.build_responder().map_err(|e| anyhow!("setting up Noise: {e}"))?;
        Ok(Responder { hs: Some(hs), noise: None, rx: Vec::with_capacity(MAGIC.len() + 2 + HANDSHAKE_MSG) })
    }

    /// The client proved it holds the key (its first message decrypted; it may still be a replay of one).
    pub fn keyed(&self) -> bool {
        self.noise.is_some()
    }

    /// Bytes still missing for the next step.
    fn want(&self) -> usize {
        match &self.noise {
            None => MAGIC.len() + 2 + HANDSHAKE_MSG,
            Some(_) if self.rx.len() < 2 => 2,
            Some(_) => 2 + u16::from_be_bytes([self.rx[0], self.rx[1]]) as usize,
        }
    }

    /// Read what arrived on `s` (non-blocking) and go as far as it allows: None while more is awaited, the first
    /// frame's payload once the client is in. Then `channel` makes the session.
    pub fn advance(&mut self, s: &mut TcpStream) -> Result<Option<Vec<u8>>, Refused> {
        loop {
            let want = self.want();
            while self.rx.len() < want {
                let at = self.rx.len();
                self.rx.resize(want, 0);
                match s.read(&mut self.rx[at..]) {
                    Ok(0) => {
                        self.rx.truncate(at);
                        return Err(match (at, &self.noise) {
                            (0, None) => Refused::Silent("closed at once".into()),
                            (_, None) => Refused::Said("closed in the middle of its greeting".into()),
                            (_, Some(_)) => Refused::Said("closed before saying what it sends".into()),
                        });
                    }
                    Ok(n) => {
                        self.rx.truncate(at + n);
                        // Not our protocol: no need to wait for the whole greeting to know.
                        let k = self.rx.len().min(MAGIC.len());
                        if self.noise.is_none() && self.rx[..k] != MAGIC[..k] {
                            return Err(Refused::Said(match self.rx.starts_with(b"vOSmig") {
                                true => "an older or newer vrun migrate (another protocol version)".into(),
                                false => "not a vrun migrate".into(),
                            }));
                        }
                    }
                    Err(e) => {
                        self.rx.truncate(at);
                        return match e.kind() {
                            std::io::ErrorKind::WouldBlock => Ok(None),
                            std::io::ErrorKind::Interrupted => continue,
                            _ => Err(Refused::Silent(format!("{e}"))),
                        };
                    }
                }
            }
            if self.rx.len() < self.want() {
                // The first frame's length arrived: now its message.
                continue;
            }
            match self.noise.as_mut() {
                None => {
                    let rest = &self.rx[MAGIC.len()..];
                    if u16::from_be_bytes([rest[0], rest[1]]) as usize != HANDSHAKE_MSG {
                        return Err(Refused::Said("a malformed greeting".into()));
                    }
                    let Some(mut hs) = self.hs.take() else { return Err(Refused::Said("handshake state lost".into())) };
                    let mut none = [0u8; 0];
                    if hs.read_message(&rest[2..], &mut none).is_err() {
                        return Err(Refused::Said("it does not hold this server's key".into()));
                    }
                    let mut out = [0u8; 2 + HANDSHAKE_MSG];
                    let n = hs.write_message(&[], &mut out[2..]).map_err(|e| Refused::Said(format!("Noise: {e}")))?;
                    out[..2].copy_from_slice(&(n as u16).to_be_bytes());
                    // 50 bytes into an empty socket buffer: written whole, or the peer is gone.
                    match s.write(&out[..2 + n]) {
                        Ok(w) if w == 2 + n => {}
                        _ => return Err(Refused::Said("went away during the handshake".into())),
                    }
                    self.noise = Some(hs.into_transport_mode().map_err(|e| Refused::Said(format!("Noise: {e}")))?);
                    self.rx.clear();
                }
                Some(noise) => {
                    let msg = &self.rx[2..];
                    if msg.len() <= TAG {
                        return Err(Refused::Said("a malformed first frame".into()));
                    }
                    let mut plain = vec![0u8; msg.len()];
                    let n = noise.read_message(msg, &mut plain).map_err(|_| Refused::Said("its first frame failed its integrity check".into()))?;
                    plain.truncate(n);
                    if plain.len() < HEAD || plain[0] != Kind::Begin as u8 {
                        return Err(Refused::Said("its first frame is not a job's description".into()));
                    }
                    let len = u32::from_le_bytes([plain[1], plain[2], plain[3], plain[4]]) as usize;
                    if len != plain.len() - HEAD {
                        return Err(Refused::Said("its job's description does not fit in one message".into()));
                    }
                    plain.drain(..HEAD);
                    return Ok(Some(plain));
                }
            }
        }
    }

    /// Send the encrypted refusal of a client that is in (`Failed`), without blocking: the server is busy.
    pub fn refuse(self, s: TcpStream, why: &str) {
        if let Ok(mut ch) = self.channel(s) {
            let _ = ch.stream.set_nonblocking(true);
            let _ = ch.send(Kind::Failed, why.as_bytes());
        }
    }

    /// The session with a client whose first frame `advance` returned. The stream becomes blocking.
    pub fn channel(self, s: TcpStream) -> Result<Channel> {
        let noise = self.noise.ok_or_else(|| anyhow!("the handshake is not done"))?;
        s.set_nonblocking(false)?;
        Ok(Channel::new(s, noise))
    }
}

/// Tell a connection the server cannot take now to try again later (a message of length 0), and close it. Sent
/// before any handshake: the same for every server, whatever its key.
pub fn busy(mut s: TcpStream) {
    let _ = s.set_nonblocking(true);
    let _ = s.write(&[0, 0]);
}

pub struct Channel {
    pub stream: TcpStream,
    noise: snow::TransportState,
    /// Received, not yet decrypted: rx[lo..hi].
    rx: Box<[u8]>,
    lo: usize,
    hi: usize,
    /// A frame's transport messages, sealed before one write.
    tx: Box<[u8]>,
    /// A frame's first message: its head and the payload's start, contiguous.
    first: Box<[u8]>,
}

/// A handshake the server cut short on purpose.
#[derive(Debug)]
pub struct Busy;

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("busy")
    }
}

impl std::error::Error for Busy {}

impl Channel {
    fn new(stream: TcpStream, noise: snow::TransportState) -> Channel {
        Channel {
            stream,
            noise,
            rx: vec![0u8; RX_CAP].into_boxed_slice(),
            lo: 0,
            hi: 0,
            tx: vec![0u8; TX_CAP].into_boxed_slice(),
            first: vec![0u8; MSG_MAX].into_boxed_slice(),
        }
    }

    /// Connect to a `vrun serve` and do the handshake: it proves it holds `key` as we do. `Busy` when the server
    /// cannot take us now.
    pub fn connect(to: &str, key: &Key) -> Result<Channel> {
        use std::net::ToSocketAddrs;
        let addr = to.to_socket_addrs().with_context(|| format!("{to}: not a HOST:PORT"))?.next().ok_or_else(|| anyhow!("{to}: no address"))?;
        let deadline = Instant::now() + HANDSHAKE_TIME;
        let mut s = TcpStream::connect_timeout(&addr, HANDSHAKE_TIME).with_context(|| format!("connecting to {to}"))?;
        s.set_nodelay(true)?;
        let mut hs = builder(key)?.build_initiator().map_err(|e| anyhow!("setting up Noise: {e}"))?;
        let mut hello = [0u8; 8 + 2 + HANDSHAKE_MSG];
        hello[..8].copy_from_slice(MAGIC);
        let n = hs.write_message(&[], &mut hello[10..]).map_err(|e| anyhow!("Noise: {e}"))?;
        hello[8..10].copy_from_slice(&(n as u16).to_be_bytes());
        s.set_write_timeout(Some(HANDSHAKE_TIME))?;
        s.write_all(&hello[..10 + n]).with_context(|| format!("greeting {to}"))?;
        let mut answer = [0u8; 2 + HANDSHAKE_MSG];
        let mut got = 0;
        while got < 2 || (got < answer.len() && answer[..2] != [0, 0]) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("{to} did not complete the handshake within {} s", HANDSHAKE_TIME.as_secs());
            }
            s.set_read_timeout(Some(left))?;
            match s.read(&mut answer[got..]) {
                Ok(0) if got == 0 => bail!("{to} closed the connection without answering: it does not hold the same key (or is not a vrun serve of this version); nothing was sent"),
                Ok(0) => bail!("{to} closed the connection in the middle of the handshake"),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Reset before its answer: it dropped us unread, as a busy server does.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && got == 0 => return Err(Busy.into()),
                Err(e) => return Err(e).with_context(|| format!("{to} did not answer the handshake")),
            }
        }
        if answer[..2] == [0, 0] {
            return Err(Busy.into());
        }
        if u16::from_be_bytes([answer[0], answer[1]]) as usize != HANDSHAKE_MSG {
            bail!("{to} did not answer as a vrun serve of this version");
        }
        let mut none = [0u8; 0];
        if hs.read_message(&answer[2..], &mut none).is_err() {
            bail!("{to} does not hold the same key: refusing to send it anything");
        }
        let noise = hs.into_transport_mode().map_err(|e| anyhow!("Noise: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.set_write_timeout(None)?;
        Ok(Channel::new(s, noise))
    }

    /// Seal `plain` as the next transport message at tx[at..]; returns where it ends.
    fn seal(noise: &mut snow::TransportState, tx: &mut [u8], at: usize, plain: &[u8]) -> Result<usize> {
        let n = noise.write_message(plain, &mut tx[at + 2..]).map_err(|e| anyhow!("encrypting: {e}"))?;
        tx[at..at + 2].copy_from_slice(&(n as u16).to_be_bytes());
        Ok(at + 2 + n)
    }

    pub fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<()> {
        if payload.len() > MAX_FRAME {
            bail!("a frame of {} bytes is too big to send", payload.len());
        }
        let split = payload.len().min(CHUNK - HEAD);
        self.first[0] = kind as u8;
        self.first[1..HEAD].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        self.first[HEAD..HEAD + split].copy_from_slice(&payload[..split]);
        let mut end = Channel::seal(&mut self.noise, &mut self.tx, 0, &self.first[..HEAD + split])?;
        for c in payload[split..].chunks(CHUNK) {
            end = Channel::seal(&mut self.noise, &mut self.tx, end, c)?;
        }
        let mut out = &self.tx[..end];
        while !out.is_empty() {
            match self.stream.write(out) {
                Ok(0) => bail!("sending to the other host: connection closed"),
                Ok(n) => out = &out[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("sending to the other host"),
            }
        }
        Ok(())
    }

    pub fn recv(&mut self) -> Result<(Kind, Vec<u8>)> {
        let mut b = vec![];
        let k = self.recv_into(&mut b)?;
        Ok((k, b))
    }

    /// Received bytes are waiting here (read ahead), which poll on the stream would not report.
    pub fn buffered(&self) -> bool {
        self.hi > self.lo
    }

    /// Make sure `need` received bytes are buffered.
    fn fill(&mut self, need: usize) -> Result<()> {
        while self.hi - self.lo < need {
            if self.rx.len() - self.lo < need {
                self.rx.copy_within(self.lo..self.hi, 0);
                self.hi -= self.lo;
                self.lo = 0;
            }
            match self.stream.read(&mut self.rx[self.hi..]) {
                Ok(0) => bail!("the other host went away"),
                Ok(n) => self.hi += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("the other host went away"),
            }
        }
        Ok(())
    }

    /// The next transport message, decrypted into `out` (which has room for its tag); returns the plaintext size.
    fn open(&mut self, out: &mut [u8]) -> Result<usize> {
        self.fill(2)?;
        let len = u16::from_be_bytes([self.rx[self.lo], self.rx[self.lo + 1]]) as usize;
        if len <= TAG || len > out.len() {
            bail!("a message of {len} bytes where at most {} fit: the stream is damaged", out.len());
        }
        self.fill(2 + len)?;
        let msg = &self.rx[self.lo + 2..self.lo + 2 + len];
        let n = self.noise.read_message(msg, out).map_err(|_| anyhow!("a message failed its integrity check: the stream was altered or damaged"))?;
        self.lo += 2 + len;
        Ok(n)
    }

    /// Receive a frame's payload into `payload` (reused: big frames need no fresh memory each time).
    pub fn recv_into(&mut self, payload: &mut Vec<u8>) -> Result<Kind> {
        let mut first = std::mem::take(&mut self.first);
        let r = self.open(&mut first);
        let n = match r {
            Ok(n) => n,
            Err(e) => {
                self.first = first;
                return Err(e);
            }
        };
        let head = [first[0], first[1], first[2], first[3], first[4]];
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let kind = Kind::from(head[0]);
        let ok = n >= HEAD && len <= MAX_FRAME && n - HEAD <= len && kind.is_some() && (n - HEAD == len || n == CHUNK);
        if ok {
            payload.clear();
            payload.extend_from_slice(&first[HEAD..n]);
        }
        self.first = first;
        if !ok {
            bail!("a malformed frame (kind {}, {len} bytes): the stream is damaged", head[0]);
        }
        // The rest straight into place; each message needs room for its tag past its end.
        payload.resize(len + TAG, 0);
        let mut have = n - HEAD;
        while have < len {
            let room = (len - have).min(CHUNK) + TAG;
            let got = self.open(&mut payload[have..have + room])?;
            if got != room - TAG {
                bail!("a frame's message of {got} bytes where {} were due: the stream is damaged", room - TAG);
            }
            have += got;
        }
        payload.truncate(len);
        kind.ok_or_else(|| anyhow!("a frame of unknown kind"))
    }
}
