//! Reading /proc and other small files with raw syscalls (the shim never uses libc for its own I/O).

use alloc::string::String;
use alloc::vec::Vec;
use vos::sys::{self, Errno};

/// A NUL-terminated copy of `path` for the kernel.
pub fn cpath(path: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(path.len() + 1);
    v.extend_from_slice(path.as_bytes());
    v.push(0);
    v
}

/// Read a whole file.
pub fn read_file(path: &str) -> Result<Vec<u8>, Errno> {
    let fd = sys::open(&cpath(path), libc::O_RDONLY, 0)?;
    let mut out = Vec::with_capacity(4096);
    let r = read_to_end(fd, &mut out);
    let _ = sys::close(fd);
    r.map(|_| out)
}

pub fn read_to_end(fd: i32, out: &mut Vec<u8>) -> Result<(), Errno> {
    loop {
        if out.capacity() - out.len() < 4096 {
            out.reserve(out.capacity().max(4096));
        }
        let spare = out.spare_capacity_mut();
        // SAFETY: reading into the vector's spare capacity, then extending the length by what was read.
        let n = match unsafe { sys::read_raw(fd, spare.as_mut_ptr() as *mut u8, spare.len()) } {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(());
        }
        // SAFETY: n bytes were just initialized by read.
        unsafe { out.set_len(out.len() + n) };
    }
}

pub fn read_string(path: &str) -> Result<String, Errno> {
    read_file(path).map(|b| String::from_utf8_lossy(&b).into_owned())
}

pub fn readlink(path: &str) -> Result<String, Errno> {
    let mut buf = alloc::vec![0u8; 4096];
    let n = sys::readlink(&cpath(path), &mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Numeric entries of a /proc directory (pids, tids, fds), sorted.
pub fn list_numbers(dir: &str) -> Result<Vec<i32>, Errno> {
    let fd = sys::open(&cpath(dir), libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let mut out = Vec::new();
    let mut buf = alloc::vec![0u8; 16384];
    loop {
        let n = match sys::getdents64(fd, &mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                let _ = sys::close(fd);
                return Err(e);
            }
        };
        let mut off = 0;
        while off < n {
            let reclen = u16::from_le_bytes([buf[off + 16], buf[off + 17]]) as usize;
            let name = &buf[off + 19..off + reclen];
            let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
            if let Some(v) = parse_dec(name) {
                out.push(v as i32);
            }
            off += reclen;
        }
    }
    let _ = sys::close(fd);
    out.sort_unstable();
    Ok(out)
}

pub fn parse_dec(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add((c - b'0') as u64)?;
    }
    Some(v)
}

pub fn parse_hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in s {
        let d = (c as char).to_digit(16)? as u64;
        v = v.checked_mul(16)?.checked_add(d)?;
    }
    Some(v)
}

/// The value after `key` in a "Key:\tvalue" file such as /proc/self/status.
pub fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')).map(|v| v.trim()))
}

/// This process's own /proc files its credentials may not open (its dumpable flag is off), as the supervisor
/// opened them for a checkpoint: pagemap, mem, auxv (`Msg::ProcFile`). -1: none. Only the coordinator touches them.
static GIVEN: [core::sync::atomic::AtomicI32; 3] =
    [core::sync::atomic::AtomicI32::new(-1), core::sync::atomic::AtomicI32::new(-1), core::sync::atomic::AtomicI32::new(-1)];
const GIVEN_NAMES: [&str; 3] = ["pagemap", "mem", "auxv"];

/// Keep the supervisor's fd of our own /proc file `name`; false if it is not one we take.
pub fn give(name: &str, fd: i32) -> bool {
    let Some(i) = GIVEN_NAMES.iter().position(|n| *n == name) else { return false };
    let old = GIVEN[i].swap(fd, core::sync::atomic::Ordering::AcqRel);
    if old >= 0 {
        let _ = sys::close(old);
    }
    true
}

/// The fds `give` holds (the coordinator's, not the app's).
pub fn given_fds() -> Vec<i32> {
    GIVEN.iter().map(|g| g.load(core::sync::atomic::Ordering::Acquire)).filter(|&fd| fd >= 0).collect()
}

/// After a restore: what `give` held was the checkpointed process's (its numbers mean nothing here).
pub fn drop_given_numbers() {
    for g in &GIVEN {
        g.store(-1, core::sync::atomic::Ordering::Release);
    }
}

/// Close what `give` holds (the checkpoint is over).
pub fn forget_given() {
    for g in &GIVEN {
        let fd = g.swap(-1, core::sync::atomic::Ordering::AcqRel);
        if fd >= 0 {
            let _ = sys::close(fd);
        }
    }
}

/// Open this thread's /proc/thread-self/`name` (pagemap, mem, auxv) read-only: with our own credentials, or, when
/// they may not (EACCES: the process is not dumpable), a copy of the supervisor's fd, read from the start.
pub fn open_own(name: &str) -> Result<i32, Errno> {
    let path = cpath(&alloc::format!("/proc/thread-self/{name}"));
    match sys::open(&path, libc::O_RDONLY | libc::O_CLOEXEC, 0) {
        Err(Errno::EACCES) => {
            let i = GIVEN_NAMES.iter().position(|n| *n == name).ok_or(Errno::EACCES)?;
            let fd = GIVEN[i].load(core::sync::atomic::Ordering::Acquire);
            if fd < 0 {
                return Err(Errno::EACCES);
            }
            // A copy (its offset shared: the coordinator alone reads it, auxv from the start).
            let d = sys::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0)? as i32;
            let _ = sys::lseek(d, 0, libc::SEEK_SET);
            Ok(d)
        }
        r => r,
    }
}
