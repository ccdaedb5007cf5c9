//! Files carried inside the image. `vrun checkpoint --bundle` carries every program and library the job maps
//! privately, so the job restores on a host that lacks them or has other versions; a program file that was
//! deleted (or is a memfd) is always carried. A restore maps them from memfds instead of the host's files.

use crate::os::data_ranges;
use crate::job::members::Member;
use anyhow::{Context, Result, anyhow};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use vos::image::{BundledFile, DataImage, JobImage, is_detached};

/// Add the job's carried files to `job.bundle` and their contents to `job.data`; returns their sources, which
/// follow in Data chunks.
pub fn capture(job: &mut JobImage, members: &[Member], all: bool) -> Result<Vec<OwnedFd>> {
    let mut sources = vec![];
    let mut bundle: Vec<BundledFile> = vec![];
    for p in &job.processes {
        let host = crate::job::members::task_of(members, p.pid).ok_or_else(|| anyhow!("process {} vanished", p.pid))?.as_raw();
        let exe = std::iter::once((&p.exe, format!("/proc/{host}/exe")));
        let libs = p.regions.iter().filter(|r| all && !r.shared).filter_map(|r| Some((r.file.as_ref()?, format!("/proc/{host}/map_files/{:x}-{:x}", r.start, r.end))));
        for (id, through) in exe.chain(libs) {
            if !(all || is_detached(&id.path)) || bundle.iter().any(|b| b.dev == id.dev && b.ino == id.ino) {
                continue;
            }
            // The very file the process has: by its path when that still names it (opened as the process: the
            // path is its word), else through /proc (the kernel's: the file mapped there).
            let as_it = p.attrs.creds.as_ref().map(|c| c.fs());
            let src = match crate::resources::creds::as_user(as_it.as_ref(), || Ok(std::fs::File::open(crate::job::members::seen_by(host, &id.path))?)) {
                Ok(f) if f.metadata().is_ok_and(|m| m.dev() == id.dev && m.ino() == id.ino) => OwnedFd::from(f),
                _ => OwnedFd::from(std::fs::File::open(&through).with_context(|| format!("pid {}: reading {} to carry it", p.pid, id.path))?),
            };
            let size = nix::sys::stat::fstat(&src)?.st_size as u64;
            let stored = data_ranges(src.as_raw_fd(), size).iter().map(|(a, b)| b - a).sum();
            job.data.push(DataImage { size, stored });
            bundle.push(BundledFile { dev: id.dev, ino: id.ino, path: id.path.clone(), data: (job.data.len() - 1) as u32 });
            sources.push(src);
        }
    }
    job.bundle = bundle;
    Ok(sources)
}

/// Memfds with the carried files' contents (`fill` copies an object's Data chunks into an fd), by (dev, ino).
pub fn restore(job: &JobImage, fill: &mut dyn FnMut(u32, RawFd) -> Result<()>) -> Result<HashMap<(u64, u64), OwnedFd>> {
    let mut out = HashMap::new();
    for b in &job.bundle {
        let name = std::ffi::CString::new(format!("vos:{}", b.path.rsplit('/').next().unwrap_or("file")))?;
        // Executable, so it can be the process's program file again.
        const MFD_EXEC: u32 = 0x10;
        // SAFETY: memfd_create with a NUL-terminated name.
        let mut fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | MFD_EXEC) };
        if fd < 0 {
            // SAFETY: as above; kernels before 6.3 make memfds executable without asking.
            fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        }
        if fd < 0 {
            return Err(anyhow!("memfd for {}: {}", b.path, std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd of ours.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        nix::unistd::ftruncate(&fd, job.data[b.data as usize].size as i64)?;
        fill(b.data, fd.as_raw_fd()).with_context(|| format!("the carried copy of {}", b.path))?;
        out.insert((b.dev, b.ino), fd);
    }
    Ok(out)
}
