//! What a file is, wherever it lives: the GNU build-id of an ELF file, or else its size and a hash of its
//! contents. Taken at checkpoint for the program and everything the job maps privately (code, read-only data);
//! checked at restore, so a library that differs on this host is named before anything is mapped. Files the job
//! shares or writes (open files, MAP_SHARED) are its data: they only have to exist.

use anyhow::{Result, anyhow, bail};
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use crate::job::members::{Member, seen_by, task_of};
use vos::image::{FileId, JobImage, is_detached};

/// A read-only mapping of a whole file.
struct Mapped {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapped {
    fn open(path: &str) -> Result<Mapped> {
        let f = std::fs::File::open(path).map_err(|e| anyhow!("{path}: {e}"))?;
        Mapped::of(&f, path)
    }

    fn of(f: &std::fs::File, path: &str) -> Result<Mapped> {
        let len = f.metadata()?.len() as usize;
        if len == 0 {
            return Ok(Mapped { ptr: std::ptr::null_mut(), len: 0 });
        }
        // SAFETY: a private read-only mapping of a file we opened; unmapped on drop.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, f.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            bail!("{path}: mmap: {}", std::io::Error::last_os_error());
        }
        Ok(Mapped { ptr, len })
    }

    fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the mapping is `len` bytes long and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: our own mapping.
            unsafe { libc::munmap(self.ptr, self.len) };
        }
    }
}

/// The GNU build-id of an ELF image in memory or on disk, as hex.
pub fn build_id(bytes: &[u8]) -> Option<String> {
    let elf = goblin::elf::Elf::parse(bytes).ok()?;
    let notes = elf.iter_note_headers(bytes)?;
    for n in notes.flatten() {
        if n.n_type == goblin::elf::note::NT_GNU_BUILD_ID {
            return Some(n.desc.iter().map(|b| format!("{b:02x}")).collect());
        }
    }
    None
}

/// (build-id, hash) of the file at `path`: the hash only when it has no build-id.
fn identity(path: &str) -> Result<(Option<String>, u64)> {
    identity_of(&Mapped::open(path)?)
}

fn identity_of(m: &Mapped) -> Result<(Option<String>, u64)> {
    Ok(match build_id(m.bytes()) {
        Some(b) => (Some(b), 0),
        None => (None, xxhash_rust::xxh3::xxh3_64(m.bytes())),
    })
}

/// Fill in the identity of the program and of every privately mapped file of the job (each file read once, as
/// the job sees it, with the credentials of the process that says it maps it). A deleted or memfd program has
/// none: it travels in the image.
pub fn capture(job: &mut JobImage, members: &[Member]) -> Result<()> {
    let mut known: HashMap<(u64, u64), (Option<String>, u64)> = HashMap::new();
    let mut fill = |host: i32, who: Option<&vos::image::FsCreds>, id: &mut FileId| -> Result<()> {
        if is_detached(&id.path) {
            return Ok(());
        }
        let v = match known.get(&(id.dev, id.ino)) {
            Some(v) => v.clone(),
            None => {
                let v = crate::resources::creds::as_user(who, || identity(&seen_by(host, &id.path))).map_err(|e| anyhow!("{}: {e:#}", id.path))?;
                known.insert((id.dev, id.ino), v.clone());
                v
            }
        };
        (id.build_id, id.hash) = v;
        Ok(())
    };
    for p in &mut job.processes {
        let host = task_of(members, p.pid).ok_or_else(|| anyhow!("process {} vanished", p.pid))?.as_raw();
        let who = p.attrs.creds.as_ref().map(|c| c.fs());
        fill(host, who.as_ref(), &mut p.exe)?;
        for r in p.regions.iter_mut().filter(|r| !r.shared) {
            if let Some(id) = &mut r.file {
                fill(host, who.as_ref(), id)?;
            }
        }
    }
    Ok(())
}

/// The stat fields that tell an unchanged file: (dev, ino, size, mtime in ns).
pub type Stamp = (u64, u64, u64, i64);

pub fn stamp(md: &std::fs::Metadata) -> Stamp {
    (md.dev(), md.ino(), md.size(), md.mtime() * 1_000_000_000 + md.mtime_nsec())
}

/// Whether `f`, opened from `id.path` here, is the file the image knew; the error names what differs. `known`:
/// a stamp of this path already found to be that file (nothing is read again if `f` still matches it).
pub fn check(id: &FileId, f: &std::fs::File, known: Option<Stamp>) -> Result<Stamp> {
    let md = f.metadata().map_err(|e| anyhow!("{}: {e}", id.path))?;
    let st = stamp(&md);
    // The very file, untouched (a restore on the same host): nothing to read.
    if st == (id.dev, id.ino, id.size, id.mtime_ns) || Some(st) == known {
        return Ok(st);
    }
    let name = id.path.rsplit('/').next().unwrap_or(&id.path);
    match (&id.build_id, id.hash) {
        (Some(want), _) => match identity_of(&Mapped::of(f, &id.path)?)?.0 {
            Some(h) if h == *want => Ok(st),
            Some(h) => bail!("{name}: build-id differs ({} has {h}; the image needs {want})", id.path),
            None => bail!("{name}: build-id differs ({} has none; the image needs {want})", id.path),
        },
        (None, want) if want != 0 => {
            if md.size() != id.size {
                bail!("{name}: size differs ({} has {} bytes; the image needs {})", id.path, md.size(), id.size);
            }
            if identity_of(&Mapped::of(f, &id.path)?)?.1 != want {
                bail!("{name}: contents differ ({} is not the file the job mapped)", id.path);
            }
            Ok(st)
        }
        _ => bail!("{name}: {} changed since the checkpoint (size or modification time)", id.path),
    }
}
