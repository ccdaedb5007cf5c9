//! Reading and writing image streams from the launcher (files, pipes, sockets): strictly forward, unbuffered,
//! so the restorer can take over the very same fd at the first page chunk.

use anyhow::{Context, Result, anyhow, bail};
use serde::de::DeserializeOwned;
use std::fs::File;
use crate::output::escape::escape;
use crate::image::sign::{self, Key, Signature};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use vos::chunk::{self, ChunkHead, ImageError, Kind};
use vos::image::{Contents, DataImage, ImageHeader, JobImage, ProcessImage, ProcessSummary};
use vos::sys::Errno;

pub const EXT: &str = "vimg";

/// What a reader demands of an image's signature (`sign`).
#[derive(Clone, Copy, Default)]
pub struct Trust<'a> {
    /// Only an image signed by this key is read (None: signatures are not checked).
    pub key: Option<&'a Key>,
    /// `--trust-unsigned`: read it without checking its signature (said loudly).
    pub unsigned_ok: bool,
    /// The image comes over `vrun serve`'s authenticated connection, which vouches for it.
    pub channel: bool,
}

/// An image being read.
pub struct Reader {
    pub file: File,
    /// Number of the next chunk.
    pub seq: u64,
    /// Where it comes from, for messages (escaped: a directory entry's name is anyone's).
    pub name: String,
    owner: u32,
    /// A read lease on the image file, taken before it was verified: as long as it holds, nobody has opened the
    /// file for writing since (`end` looks).
    leased: bool,
    /// Its signature, if it has one (a file's is known at once, a stream's at its end).
    pub signature: Option<Signature>,
    /// The signature was checked against the reader's key.
    pub verified: bool,
}

struct Src<'a>(&'a mut File);

impl chunk::Source for Src<'_> {
    fn read_exact(&mut self, buf: &mut [u8]) -> std::result::Result<(), Option<Errno>> {
        let mut n = 0;
        while n < buf.len() {
            match self.0.read(&mut buf[n..]) {
                Ok(0) => return Err(None),
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Some(Errno(e.raw_os_error().unwrap_or(libc::EIO)))),
            }
        }
        Ok(())
    }
}

fn img_err(e: ImageError) -> anyhow::Error {
    anyhow!("{e}")
}

fn is_regular(f: &File) -> bool {
    nix::sys::stat::fstat(f).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG)
}

/// Does nothing: a lease break's SIGIO must not end vrun (`Reader::end` finds the broken lease and refuses).
extern "C" fn on_sigio(_: libc::c_int) {}

impl Reader {
    /// Open an image: a file, a directory (the caller's newest complete image in it, see `newest_in`), or "-"
    /// (standard input). With a key in `trust`, an image not signed by it is refused here, before anything of it
    /// is used; a file is then held still (a read lease, or a private copy) so what was verified is what is read.
    pub fn open(src: &str, trust: Trust) -> Result<Reader> {
        let (file, name) = if src == "-" {
            // SAFETY: dup of our own stdin, owned by the File from here on.
            let fd = unsafe { libc::dup(0) };
            if fd < 0 {
                bail!("cannot use standard input: {}", std::io::Error::last_os_error());
            }
            // SAFETY: fd was just created and is owned by nobody else.
            (unsafe { File::from_raw_fd(fd) }, "standard input".to_string())
        } else {
            let p = Path::new(src);
            refuse_foreign_link(p)?;
            if p.is_dir() {
                let (f, path) = newest_in(p)?;
                (f, escape(&path.display().to_string()))
            } else {
                let f = File::open(p).with_context(|| format!("cannot open {}", escape(src)))?;
                (f, escape(src))
            }
        };
        let owner = nix::sys::stat::fstat(&file).map(|st| st.st_uid).with_context(|| format!("{name}: fstat"))?;
        let mut r = Reader { file, seq: 0, name, owner, leased: false, signature: None, verified: false };
        let check = trust.key.filter(|_| !trust.unsigned_ok && !trust.channel);
        if let Some(key) = check {
            if !is_regular(&r.file) {
                bail!(
                    "{} is a stream: a signature (key {}) cannot be checked before the image is used; save it to a file \
                     first, or give --trust-unsigned if the way it came (ssh, `vrun migrate`) vouches for it",
                    r.name,
                    escape(&key.from)
                );
            }
            r.hold()?;
        }
        r.signature = r.check_end_first()?;
        match (check, trust.key) {
            (Some(key), _) => r.verify(key)?,
            (None, Some(key)) if trust.unsigned_ok && !trust.channel => eprintln!(
                "vrun: WARNING: --trust-unsigned: {} is read without checking that key {} signed it: whoever could \
                 write it decides what runs",
                r.name,
                escape(&key.from)
            ),
            _ => {}
        }
        chunk::read_file_head(&mut Src(&mut r.file)).map_err(|e| anyhow!("{}: {e}", r.name))?;
        Ok(r)
    }

    /// The uid owning the image as opened: a file's owner (st_uid), or that of standard input's fd 0 (a pipe's
    /// is its maker's). Whoever owns an image could have written any of it: a restore bounds the job by it.
    pub fn owner(&self) -> u32 {
        self.owner
    }

    /// Keep the image file from changing while it is verified and read: a read lease (which nobody can take while
    /// the file is open for writing, and which breaks when anyone opens it for writing or truncates it), or where
    /// no lease can be had (another user's file for a user without CAP_LEASE, a filesystem without leases such as
    /// NFS), a private copy in memory to read instead.
    fn hold(&mut self) -> Result<()> {
        // SAFETY: an async-signal-safe no-op handler; a handler, unlike SIG_IGN, is not inherited across exec.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigio as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(libc::SIGIO, &sa, std::ptr::null_mut());
        }
        // SAFETY: fcntl on our own fd.
        if unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) } == 0 {
            self.leased = true;
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            bail!("{} is open for writing by another process: it could change while it is verified and restored", self.name);
        }
        let size = nix::sys::stat::fstat(&self.file)?.st_size as u64;
        let copy = nix::sys::memfd::memfd_create(c"vos-image", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).context("memfd_create")?;
        let mut copy = File::from(copy);
        let n = std::io::copy(&mut (&self.file).take(size), &mut copy).with_context(|| format!("copying {}", self.name))?;
        if n != size {
            bail!("{}: {}", self.name, ImageError::Truncated("image (it shrank while it was copied)"));
        }
        copy.seek(SeekFrom::Start(0))?;
        self.file = copy;
        Ok(())
    }

    /// The image must carry a MAC by `key` of every byte before its signature.
    fn verify(&mut self, key: &Key) -> Result<()> {
        let Some(sig) = self.signature else {
            bail!(
                "{} is not signed: with key {} only images it signed are used (--trust-unsigned to use it anyway)",
                self.name,
                escape(&key.from)
            );
        };
        if sig.key_id != key.id {
            bail!(
                "{} is signed by another key (id {}), not by {} (id {}): refused",
                self.name,
                sign::hex(&sig.key_id),
                escape(&key.from),
                key.id_hex()
            );
        }
        let mac = sign::mac(&self.file, sig.signed, key).with_context(|| format!("reading {} to check its signature", self.name))?;
        if !sign::same(&mac, &sig.mac) {
            bail!("{}: its signature does not match (the image was changed after it was signed, or the signature is not the key's)", self.name);
        }
        self.verified = true;
        Ok(())
    }

    /// A seekable image must end with its End chunk (and may have a Signature after it, which is returned): find
    /// truncation before anything else is read.
    fn check_end_first(&mut self) -> Result<Option<Signature>> {
        let Ok(len) = self.file.seek(SeekFrom::End(0)) else { return Ok(None) };
        self.file.seek(SeekFrom::Start(0))?;
        let mut head = [0u8; chunk::FILE_HEAD_LEN];
        if len < chunk::FILE_HEAD_LEN as u64 || self.file.read_exact(&mut head).is_err() {
            bail!("{}: {}", self.name, ImageError::NotAnImage);
        }
        chunk::check_file_head(&head).map_err(|e| anyhow!("{}: {e}", self.name))?;
        let truncated = || anyhow!("{}: {}", self.name, ImageError::Truncated("last chunk (no end marker)"));
        let end_at = |at: u64| -> Option<u64> {
            let mut b = [0u8; chunk::END_CHUNK_LEN];
            self.file.read_exact_at(&mut b, at).ok()?;
            let (h, count) = b.split_first_chunk::<{ chunk::CHUNK_HEAD_LEN }>()?;
            let seq = u64::from_le_bytes(h[8..16].try_into().ok()?);
            match ChunkHead::decode(h, seq) {
                Ok(c) if c.kind == Kind::End && c.len == 8 && count[..] == chunk::end_payload(seq) => Some(seq),
                _ => None,
            }
        };
        let body = chunk::FILE_HEAD_LEN as u64;
        let end = chunk::END_CHUNK_LEN as u64;
        if len >= body + end && end_at(len - end).is_some() {
            self.file.seek(SeekFrom::Start(0))?;
            return Ok(None);
        }
        // Signed: End, then the Signature chunk numbered after it, covering everything before it.
        let sig_len = chunk::SIGNATURE_CHUNK_LEN as u64;
        if len < body + end + sig_len {
            return Err(truncated());
        }
        let at = len - sig_len;
        let Some(end_seq) = end_at(at - end) else { return Err(truncated()) };
        let mut b = [0u8; chunk::SIGNATURE_CHUNK_LEN];
        self.file.read_exact_at(&mut b, at)?;
        let (h, payload) = b.split_first_chunk::<{ chunk::CHUNK_HEAD_LEN }>().ok_or_else(truncated)?;
        let sig = match ChunkHead::decode(h, end_seq + 1) {
            Ok(c) if c.kind == Kind::Signature && c.len == chunk::SIGNATURE_LEN as u64 && chunk::payload_hash(payload) == c.payload_hash => {
                Signature::decode(payload).filter(|s| s.signed == at)
            }
            _ => return Err(truncated()),
        };
        let sig = sig.ok_or_else(|| anyhow!("{}: {}", self.name, ImageError::Malformed { seq: end_seq + 1, what: "a signature this vrun cannot read" }))?;
        self.file.seek(SeekFrom::Start(0))?;
        Ok(Some(sig))
    }

    pub fn head(&mut self) -> Result<ChunkHead> {
        chunk::read_head(&mut Src(&mut self.file), self.seq).map_err(|e| anyhow!("{}: {e}", self.name))
    }

    /// Read a chunk's payload and check it.
    pub fn payload(&mut self, h: &ChunkHead) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; h.len as usize];
        chunk::Source::read_exact(&mut Src(&mut self.file), &mut buf)
            .map_err(|e| img_err(e.map_or(ImageError::Truncated("chunk payload"), ImageError::Io)))
            .with_context(|| self.name.clone())?;
        if chunk::payload_hash(&buf) != h.payload_hash {
            bail!("{}: {}", self.name, ImageError::PayloadCorrupt { seq: h.seq });
        }
        self.seq += 1;
        Ok(buf)
    }

    /// The next chunk, which must be of kind `kind`, decoded from MessagePack.
    pub fn meta<T: DeserializeOwned>(&mut self, kind: Kind, what: &'static str) -> Result<T> {
        let h = self.head()?;
        if h.kind != kind {
            bail!("{}: {}", self.name, ImageError::UnexpectedKind { seq: h.seq, found: h.kind as u32, wanted: what });
        }
        let p = self.payload(&h)?;
        rmp_serde::from_slice(&p).map_err(|e| anyhow!("{}: {what} (chunk {}) cannot be decoded: {e}", self.name, h.seq))
    }

    pub fn header(&mut self) -> Result<ImageHeader> {
        self.meta(Kind::Header, "the image header")
    }

    pub fn job(&mut self) -> Result<JobImage> {
        self.meta(Kind::Job, "the job's metadata")
    }

    /// Skip over the page chunks of process `p` (verifying them: every run lies in one of its regions that
    /// stores pages, and what arrived for each region is what its summary says) and return its summary and the
    /// pages listed.
    pub fn skip_pages(&mut self, p: &ProcessImage) -> Result<(ProcessSummary, u64)> {
        let mut per_region = vec![0u64; p.regions.len()];
        let mut pages = 0u64;
        let name = self.name.clone();
        loop {
            let h = self.head()?;
            let malformed = |what| anyhow!("{name}: {}", ImageError::Malformed { seq: h.seq, what });
            match h.kind {
                Kind::Pages | Kind::Reuse => {
                    let payload = self.payload(&h)?;
                    let (n, table) = chunk::run_table(&payload).ok_or_else(|| malformed("bad run table"))?;
                    let mut data = 0u64;
                    for i in 0..n {
                        let run = chunk::PageRun::decode(&table[i * chunk::RUN_LEN..]);
                        let end = run.end().ok_or_else(|| malformed("bad page run"))?;
                        let r = p.regions.partition_point(|r| r.end <= run.addr);
                        match p.regions.get(r) {
                            Some(reg) if reg.start <= run.addr && end <= reg.end && reg.contents == Contents::Pages => per_region[r] += run.pages(),
                            _ => return Err(malformed("page run outside the process's memory")),
                        }
                        pages += run.pages();
                        data += run.len;
                    }
                    let want = if h.kind == Kind::Pages { data } else { 0 };
                    if payload.len() as u64 != 8 + (n * chunk::RUN_LEN) as u64 + want {
                        return Err(malformed("page data length"));
                    }
                }
                Kind::ProcessEnd => {
                    let payload = self.payload(&h)?;
                    let (listed, summary) = chunk::split_process_end(&payload).ok_or_else(|| malformed("process end too short"))?;
                    let s: ProcessSummary =
                        rmp_serde::from_slice(summary).map_err(|e| anyhow!("{}: process summary (chunk {}): {e}", self.name, h.seq))?;
                    if listed != pages {
                        bail!("{}: image is corrupt: pid {}: {listed} pages listed, {pages} arrived (a chunk is missing or misplaced)", self.name, p.pid);
                    }
                    let stored: Vec<u64> = s.regions.iter().map(|r| r.stored).collect();
                    if stored != per_region {
                        bail!("{}: image is corrupt: pid {}: the pages of its regions are not those its summary lists", self.name, p.pid);
                    }
                    return Ok((s, pages));
                }
                k => bail!("{}: {}", self.name, ImageError::UnexpectedKind { seq: h.seq, found: k as u32, wanted: "page data" }),
            }
        }
    }

    /// The Data chunks of object `object` (`d`, whose contents come next): each `(offset, bytes)` handed to `f`.
    pub fn data(&mut self, object: u32, d: &DataImage, f: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        let mut got = 0;
        while got < d.stored {
            let h = self.head()?;
            if h.kind != Kind::Data {
                bail!("{}: {}", self.name, ImageError::UnexpectedKind { seq: h.seq, found: h.kind as u32, wanted: "object contents" });
            }
            let p = self.payload(&h)?;
            let malformed = |what| anyhow!("{}: {}", self.name, ImageError::Malformed { seq: h.seq, what });
            let (head, bytes) = p.split_first_chunk::<16>().ok_or_else(|| malformed("short data chunk"))?;
            let (id, off) = (u32::from_le_bytes([head[0], head[1], head[2], head[3]]), u64::from_le_bytes(head[8..].try_into()?));
            if id != object {
                return Err(malformed("contents of another object (out of order)"));
            }
            let len = bytes.len() as u64;
            if len > d.stored - got || off.checked_add(len).is_none_or(|e| e > d.size) {
                return Err(malformed("contents beyond the object's size"));
            }
            f(off, bytes)?;
            got += len;
        }
        Ok(())
    }

    /// The End chunk: nothing may be missing before it, and nothing may follow it.
    pub fn end(&mut self) -> Result<()> {
        let h = self.head()?;
        if h.kind != Kind::End {
            bail!("{}: {}", self.name, ImageError::UnexpectedKind { seq: h.seq, found: h.kind as u32, wanted: "the end marker" });
        }
        let p = self.payload(&h)?;
        if p.len() != 8 || p[..] != chunk::end_payload(h.seq) {
            bail!("{}: {}", self.name, ImageError::Malformed { seq: h.seq, what: "end marker counts the wrong number of chunks" });
        }
        // A file: its end is here, or its signature follows. A stream: it ends here, or after its signature (its
        // writer closes it after them).
        let follows = || anyhow!("{}: image is corrupt: data follows its end marker", self.name);
        let left = match (self.file.stream_position(), self.file.metadata()) {
            (Ok(at), Ok(md)) if md.file_type().is_file() => Some(md.len().saturating_sub(at)),
            _ => None,
        };
        match left {
            Some(0) => {}
            Some(n) if n != chunk::SIGNATURE_CHUNK_LEN as u64 => return Err(follows()),
            _ => {
                let mut first = [0u8; 1];
                let got = loop {
                    match self.file.read(&mut first) {
                        Ok(n) => break n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => bail!("{}: reading past the end marker: {e}", self.name),
                    }
                };
                if got > 0 {
                    let mut b = [0u8; chunk::SIGNATURE_CHUNK_LEN + 1];
                    b[0] = first[0];
                    let mut n = 1;
                    while n < b.len() {
                        match self.file.read(&mut b[n..]) {
                            Ok(0) => break,
                            Ok(k) => n += k,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => bail!("{}: reading past the end marker: {e}", self.name),
                        }
                    }
                    if n != chunk::SIGNATURE_CHUNK_LEN {
                        return Err(follows());
                    }
                    let (h, payload) = b[..n].split_first_chunk::<{ chunk::CHUNK_HEAD_LEN }>().ok_or_else(follows)?;
                    let sig = match ChunkHead::decode(h, self.seq) {
                        Ok(c) if c.kind == Kind::Signature && c.len == chunk::SIGNATURE_LEN as u64 && chunk::payload_hash(payload) == c.payload_hash => {
                            Signature::decode(payload)
                        }
                        _ => None,
                    };
                    match (sig, self.signature) {
                        (Some(s), None) => self.signature = Some(s),
                        (Some(s), Some(known)) if s == known => {}
                        _ => return Err(follows()),
                    }
                }
            }
        }
        if self.leased {
            // SAFETY: fcntl on our own fd.
            let lease = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_GETLEASE) };
            if lease != libc::F_RDLCK {
                bail!("{} was opened for writing while it was read: it may have changed since its signature was checked", self.name);
            }
            // SAFETY: fcntl on our own fd; the default action of SIGIO again, as before `hold`.
            unsafe {
                libc::fcntl(self.file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK);
                libc::signal(libc::SIGIO, libc::SIG_DFL);
            }
            self.leased = false;
        }
        Ok(())
    }

    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

/// A symbolic link at the end of a path a user named is followed only if it is the user's own (or root's): in a
/// shared directory another user's link could point a restore at an image of the caller's choosing, of another
/// job, or at a FIFO that blocks it.
fn refuse_foreign_link(p: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(p) {
        Ok(md) if md.file_type().is_symlink() && md.uid() != nix::unistd::geteuid().as_raw() && md.uid() != 0 => bail!(
            "{} is a symbolic link of user {}: name what it points to, if you mean it",
            escape(&p.display().to_string()),
            md.uid()
        ),
        _ => Ok(()),
    }
}

/// The caller's newest complete image in a directory, opened. Only images the caller owns count (root's for
/// root), found without following links, and only in a directory that nobody else can take them out of or
/// swap: owned by the caller or root, and not writable by others unless sticky (in a sticky directory such as
/// /tmp/imgs others can add files, which are ignored, but not rename or remove the caller's). Temporary and
/// hidden files are never complete.
pub fn newest_in(dir: &Path) -> Result<(File, PathBuf)> {
    use nix::fcntl::{AtFlags, OFlag, openat};
    use nix::sys::stat::{Mode, fstat, fstatat};
    let shown = escape(&dir.display().to_string());
    let d = nix::fcntl::open(dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()).with_context(|| format!("cannot read {shown}"))?;
    let st = fstat(&d).with_context(|| format!("cannot read {shown}"))?;
    let me = nix::unistd::geteuid().as_raw();
    if st.st_uid != me && st.st_uid != 0 {
        bail!("{shown} belongs to user {}, who can take your images out of it or rename them: name the image file", st.st_uid);
    }
    if st.st_mode & 0o022 != 0 && st.st_mode & libc::S_ISVTX == 0 {
        bail!("{shown} is writable by others and not sticky: anyone could put an image there or take yours away; name the image file (or chmod +t {shown})");
    }
    sweep_temporaries(dir);
    let mut best: Option<((i64, i64), std::ffi::OsString)> = None;
    let mut foreign = 0;
    for e in std::fs::read_dir(format!("/proc/self/fd/{}", d.as_raw_fd())).with_context(|| format!("cannot read {shown}"))? {
        let name = e?.file_name();
        let s = name.to_string_lossy();
        if s.starts_with('.') || !s.ends_with(&format!(".{EXT}")) {
            continue;
        }
        let Ok(st) = fstatat(&d, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) else { continue };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_uid != me {
            foreign += 1;
            continue;
        }
        let t = (st.st_mtime, st.st_mtime_nsec);
        if best.as_ref().is_none_or(|(bt, bn)| t > *bt || (t == *bt && name > *bn)) {
            best = Some((t, name));
        }
    }
    let others = if foreign > 0 { format!(" ({foreign} not yours or not regular files, ignored)") } else { String::new() };
    let Some((_, name)) = best else { bail!("no image (*.{EXT}) of yours in {shown}{others}") };
    if foreign > 0 {
        eprintln!("vrun: {shown}: {foreign} image(s) not yours or not regular files ignored");
    }
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let path = dir.join(&name);
    let f = openat(&d, name.as_os_str(), flags, Mode::empty()).with_context(|| format!("cannot open {}", escape(&path.display().to_string())))?;
    let st = fstat(&f)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_uid != me {
        bail!("{} changed while it was opened", escape(&path.display().to_string()));
    }
    nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()))?;
    Ok((File::from(f), path))
}

/// Writes the launcher's parts of an image (file head, header, end) on the stream the shims write to.
pub struct Writer {
    pub file: File,
}

impl Writer {
    /// Sign the image just written (End is its last chunk, number `end_seq`): hash it back from the page cache
    /// through a read-only handle of the same file, then append the Signature chunk.
    pub fn sign(&mut self, end_seq: u64, key: &Key) -> Result<()> {
        use std::io::Seek;
        let signed = self.file.stream_position().context("signing the image")?;
        let r = File::open(format!("/proc/self/fd/{}", self.file.as_raw_fd())).context("reading the image back to sign it")?;
        let mac = sign::mac(&r, signed, key).context("reading the image back to sign it")?;
        let sig = Signature { signed, key_id: key.id, mac };
        self.chunk(vos::chunk::Kind::Signature, end_seq + 1, &sig.encode()).context("writing the image's signature")
    }

    pub fn new(fd: OwnedFd) -> Writer {
        Writer { file: File::from(fd) }
    }

    pub fn start(&mut self, header: &ImageHeader) -> Result<u64> {
        self.file.write_all(&chunk::file_head())?;
        let payload = rmp_serde::to_vec_named(header)?;
        self.chunk(Kind::Header, 0, &payload)?;
        Ok(1)
    }

    pub fn chunk(&mut self, kind: Kind, seq: u64, payload: &[u8]) -> Result<()> {
        let head = ChunkHead { kind, seq, len: payload.len() as u64, payload_hash: chunk::payload_hash(payload) };
        self.file.write_all(&head.encode())?;
        self.file.write_all(payload)?;
        Ok(())
    }

    pub fn end(&mut self, seq: u64) -> Result<()> {
        self.chunk(Kind::End, seq, &chunk::end_payload(seq))
    }

    /// The contents of object `object` (a file of `size` bytes read from `src`, holes skipped) as Data chunks
    /// from number `seq` on; returns the next number.
    pub fn data(&mut self, mut seq: u64, object: u32, src: i32, size: u64) -> Result<u64> {
        const PIECE: u64 = 4 << 20;
        for (start, end) in crate::os::data_ranges(src, size) {
            let mut off = start;
            while off < end {
                let n = PIECE.min(end - off) as usize;
                let mut payload = vec![0u8; 16 + n];
                payload[..4].copy_from_slice(&object.to_le_bytes());
                payload[8..16].copy_from_slice(&off.to_le_bytes());
                // SAFETY: pread into our buffer.
                let got = unsafe { libc::pread(src, payload[16..].as_mut_ptr() as *mut libc::c_void, n, off as i64) };
                if got != n as isize {
                    anyhow::bail!("reading the contents of a memfd or deleted file: {}", std::io::Error::last_os_error());
                }
                self.chunk(Kind::Data, seq, &payload)?;
                seq += 1;
                off += n as u64;
            }
        }
        Ok(seq)
    }
}

/// Whether `name` is the temporary file of an image being written (see `checkpoint`'s `open_dest`).
pub fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && name.contains(&format!(".{EXT}.tmp-"))
}

/// Remove the temporary images in `dir` that nobody is writing any more: a writer holds an exclusive lock on
/// its temporary file for as long as it writes (a supervisor killed mid-checkpoint leaves one behind, possibly
/// hundreds of MB). Only our own regular files are touched, never through a symbolic link.
pub fn sweep_temporaries(dir: &Path) {
    use nix::fcntl::{AtFlags, OFlag, openat};
    use nix::sys::stat::{Mode, fstat, fstatat};
    let Ok(d) = nix::fcntl::open(dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()) else { return };
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let me = nix::unistd::geteuid().as_raw();
    for e in rd.flatten() {
        let name = e.file_name();
        if !name.to_str().is_some_and(is_temporary) {
            continue;
        }
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
        let Ok(f) = openat(&d, name.as_os_str(), flags, Mode::empty()) else { continue };
        let Ok(st) = fstat(&f) else { continue };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_uid != me {
            continue;
        }
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue; // its writer is alive
        }
        // Still the very file we locked (not one made under the same name since).
        let same = fstatat(&d, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW).is_ok_and(|s| s.st_dev == st.st_dev && s.st_ino == st.st_ino);
        if same {
            let _ = nix::unistd::unlinkat(&d, name.as_os_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
        }
    }
}

/// Create the temporary file an image is written to, exclusively, and hold its writer's lock on it.
pub fn create_temporary(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    // SAFETY: flock on the file just made; nobody else can have it locked.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("locking {}: {}", path.display(), std::io::Error::last_os_error());
    }
    Ok(f)
}
