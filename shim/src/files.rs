//! Files: the fd table, discovered from the kernel at checkpoint (/proc/self/fd, fdinfo) rather than tracked by
//! hooks, so open/close run untouched. Restored in the restarted process with the same numbers, flags, offsets
//! and sharing (dup'ed fds share one open file again).

use crate::memory::file_id;
use crate::procfs;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use vos::image::{FdImage, FdKind};
use vos::sys;

/// Describe every fd of the process except `ours` (the coordinator's own); refuse kinds not supported yet.
pub fn capture(ours: &[i32]) -> Result<Vec<FdImage>, String> {
    let fds = procfs::list_numbers("/proc/self/fd").map_err(|e| format!("listing fds: {e}"))?;
    let pid = sys::getpid();
    let mut out: Vec<FdImage> = Vec::new();
    let mut ids: Vec<(i32, u64, u64)> = Vec::new();
    for fd in fds.into_iter().filter(|f| !ours.contains(f)) {
        let st = match sys::fstat(fd) {
            Ok(st) => st,
            // The directory fd the listing itself used.
            Err(sys::Errno(libc::EBADF)) => continue,
            Err(e) => return Err(format!("fd {fd}: fstat: {e}")),
        };
        let target = procfs::readlink(&format!("/proc/self/fd/{fd}")).unwrap_or_default();
        let info = procfs::read_string(&format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
        let mut flags = i64::from_str_radix(procfs::field(&info, "flags").unwrap_or("0"), 8).unwrap_or(0) as i32;
        let cloexec = flags & libc::O_CLOEXEC != 0;
        flags &= !libc::O_CLOEXEC;
        let pos = procfs::field(&info, "pos").and_then(|p| p.parse().ok()).unwrap_or(0);
        let dup_of = ids
            .iter()
            .filter(|(_, d, i)| *d == st.st_dev && *i == st.st_ino)
            .find(|(other, _, _)| sys::kcmp_file(pid, pid, *other, fd) == Ok(0))
            .map(|(other, _, _)| *other);
        ids.push((fd, st.st_dev, st.st_ino));
        let kind = classify(fd, &target, &st, flags)?;
        out.push(FdImage { fd, flags, cloexec, pos, kind, dup_of });
    }
    Ok(out)
}

fn classify(fd: i32, target: &str, st: &libc::stat, flags: i32) -> Result<FdKind, String> {
    let std_stream = (0..=2).contains(&fd);
    let unsupported = |what: &str| Err(format!("fd {fd}: {what} is not supported yet"));
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => {
            if target.ends_with(" (deleted)") {
                return unsupported(&format!("deleted file {target}"));
            }
            Ok(FdKind::File { file: file_id(target, st.st_dev, st.st_ino).map_err(|e| format!("fd {fd}: {e}"))? })
        }
        libc::S_IFDIR => Ok(FdKind::Dir { path: target.into() }),
        libc::S_IFCHR => {
            let (major, minor) = (libc::major(st.st_rdev), libc::minor(st.st_rdev));
            match (major, minor) {
                (1, 3) | (1, 5) | (1, 7) | (1, 8) | (1, 9) => Ok(FdKind::Device { path: target.into() }),
                (136..=143, _) | (4, _) | (5, 0) | (5, 1) => {
                    let stream = if std_stream {
                        fd as u8
                    } else if flags & libc::O_ACCMODE == libc::O_WRONLY {
                        1
                    } else {
                        0
                    };
                    Ok(FdKind::Terminal { path: target.into(), stream })
                }
                _ => unsupported(&format!("character device {target}")),
            }
        }
        libc::S_IFIFO if std_stream => Ok(FdKind::OutsideStream { what: target.into(), stream: fd as u8 }),
        libc::S_IFIFO => unsupported(&format!("{target} (a pipe or FIFO)")),
        libc::S_IFSOCK if std_stream => Ok(FdKind::OutsideStream { what: target.into(), stream: fd as u8 }),
        libc::S_IFSOCK => unsupported(&format!("{target} (a {} socket)", socket_kind(fd))),
        _ if target.starts_with("anon_inode:") => {
            let kind = target.trim_start_matches("anon_inode:").trim_matches(|c| c == '[' || c == ']');
            unsupported(&format!("{kind} (anon_inode:{kind})"))
        }
        _ => unsupported(target),
    }
}

fn socket_kind(fd: i32) -> &'static str {
    let get = |opt: i32| -> i32 {
        let mut v: i32 = 0;
        let mut len: u32 = 4;
        // SAFETY: v and len are valid out-parameters of the right size.
        let r = unsafe {
            sys::syscall6(libc::SYS_getsockopt, fd as usize, libc::SOL_SOCKET as usize, opt as usize, &mut v as *mut i32 as usize, &mut len as *mut u32 as usize, 0)
        };
        if r < 0 { -1 } else { v }
    };
    match (get(libc::SO_DOMAIN), get(libc::SO_TYPE)) {
        (libc::AF_UNIX, libc::SOCK_STREAM) => "unix stream",
        (libc::AF_UNIX, libc::SOCK_DGRAM) => "unix datagram",
        (libc::AF_UNIX, libc::SOCK_SEQPACKET) => "unix seqpacket",
        (libc::AF_INET, libc::SOCK_STREAM) => "TCP",
        (libc::AF_INET6, libc::SOCK_STREAM) => "TCP/IPv6",
        (libc::AF_INET, libc::SOCK_DGRAM) => "UDP",
        (libc::AF_INET6, libc::SOCK_DGRAM) => "UDP/IPv6",
        (libc::AF_NETLINK, _) => "netlink",
        _ => "",
    }
}

/// Status flags fcntl(F_SETFL) can change.
const SETFL_MASK: i32 = libc::O_APPEND | libc::O_ASYNC | libc::O_DIRECT | libc::O_NOATIME | libc::O_NONBLOCK;

/// Rebuild the fd table. `stdio` are the fds where `vrun restore`'s stdin, stdout, stderr wait.
pub fn restore(fds: &[FdImage], stdio: &[i32; 3]) -> Result<(), String> {
    for f in fds {
        let src = match (&f.dup_of, &f.kind) {
            (Some(other), _) => Source::Borrowed(*other),
            // The launcher checked before restoring that the path still names a suitable file.
            (None, FdKind::File { file }) => {
                let fd = reopen(&file.path, f.flags, f.fd)?;
                sys::lseek(fd, f.pos as i64, libc::SEEK_SET).map_err(|e| format!("fd {}: seeking {}: {e}", f.fd, file.path))?;
                Source::Owned(fd)
            }
            (None, FdKind::Dir { path }) => {
                let fd = reopen(path, f.flags | libc::O_DIRECTORY, f.fd)?;
                let _ = sys::lseek(fd, f.pos as i64, libc::SEEK_SET);
                Source::Owned(fd)
            }
            (None, FdKind::Device { path }) => Source::Owned(reopen(path, f.flags, f.fd)?),
            (None, FdKind::Terminal { stream, .. }) | (None, FdKind::OutsideStream { stream, .. }) => {
                Source::Borrowed(stdio[*stream as usize])
            }
            (None, FdKind::Unknown) => return Err(format!("fd {}: unknown kind", f.fd)),
        };
        let from = src.fd();
        if from == f.fd {
            // Opened straight onto its number (the lowest free one): only the close-on-exec bit to set.
            let fdflags = if f.cloexec { libc::FD_CLOEXEC } else { 0 };
            sys::fcntl(f.fd, libc::F_SETFD, fdflags as usize).map_err(|e| format!("fd {}: F_SETFD: {e}", f.fd))?;
        } else {
            let cloexec = if f.cloexec { libc::O_CLOEXEC } else { 0 };
            sys::dup3(from, f.fd, cloexec).map_err(|e| format!("fd {}: dup3: {e}", f.fd))?;
            if let Source::Owned(fd) = src {
                let _ = sys::close(fd);
            }
        }
        if f.dup_of.is_none() {
            let cur = sys::fcntl(f.fd, libc::F_GETFL, 0).unwrap_or(0) as i32;
            let want = (cur & !SETFL_MASK) | (f.flags & SETFL_MASK);
            if want != cur {
                sys::fcntl(f.fd, libc::F_SETFL, want as usize).map_err(|e| format!("fd {}: F_SETFL: {e}", f.fd))?;
            }
        }
    }
    Ok(())
}

enum Source {
    Owned(i32),
    Borrowed(i32),
}

impl Source {
    fn fd(&self) -> i32 {
        match self {
            Source::Owned(f) | Source::Borrowed(f) => *f,
        }
    }
}

fn reopen(path: &str, flags: i32, fd: i32) -> Result<i32, String> {
    let flags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY) | libc::O_NOCTTY;
    sys::open(&procfs::cpath(path), flags, 0).map_err(|e| format!("fd {fd}: reopening {path}: {e}"))
}
