//! Event objects: eventfd, timerfd, signalfd, epoll, inotify, pidfd. The kernel shows their state in each
//! fd's fdinfo; the supervisor reads it at checkpoint and makes the object again at restore. What depends on the
//! fd numbers of a process (epoll registrations, pidfds) is left to that process (`FdFixup`).

use anyhow::{Result, anyhow, bail};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use vos::image::{EpollItem, FileKind, InotifyWatch, JobImage};

/// `key: value` fields of an fdinfo text.
pub fn field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':').map(str::trim))
}

/// "(secs, nsecs)" -> nanoseconds.
fn pair_ns(v: &str) -> u64 {
    let v = v.trim_matches(|c| c == '(' || c == ')');
    let mut it = v.split(',').map(|x| x.trim().parse::<u64>().unwrap_or(0));
    it.next().unwrap_or(0) * 1_000_000_000 + it.next().unwrap_or(0)
}

/// A periodic timerfd that expired shows no time left in its fdinfo until it is read or asked (the kernel moves
/// it on to its next period lazily). timerfd_gettime does that step, adding the missed periods to its ticks, so
/// the fdinfo read next has the true phase. The job is frozen: it would see the same on its next call.
pub fn settle_timerfd(fd: &OwnedFd) {
    // SAFETY: itimerspec is plain data.
    let mut cur: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: a timerfd we hold and a valid out-parameter.
    unsafe { libc::timerfd_gettime(fd.as_raw_fd(), &mut cur) };
}

/// A restore starts the job's monotonic and boottime clocks where the processes read them when they stopped
/// (`ProcessAttrs`); a timerfd's time left was read a little later. Move it to that same instant, so timers keep
/// their phase. `init` (this host's pid) is in the job's time namespace.
pub fn date_timers(job: &mut JobImage, init: i32) {
    let Some(first) = job.processes.first() else { return };
    let (mono0, boot0) = (first.attrs.monotonic_ns as i64, first.attrs.boottime_ns as i64);
    // The job's clocks now: this host's plus its namespace's offsets.
    let offsets = std::fs::read_to_string(format!("/proc/{init}/timens_offsets")).unwrap_or_default();
    let offset = |name: &str| {
        offsets.lines().find(|l| l.starts_with(name)).map_or(0, |l| {
            let v: Vec<i64> = l.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
            v.first().unwrap_or(&0) * 1_000_000_000 + v.get(1).unwrap_or(&0)
        })
    };
    let now = |c| nix::time::clock_gettime(c).map(|t| t.tv_sec() * 1_000_000_000 + t.tv_nsec()).unwrap_or(0);
    let mono_late = now(nix::time::ClockId::CLOCK_MONOTONIC) + offset("monotonic") - mono0;
    let boot_late = now(nix::time::ClockId::CLOCK_BOOTTIME) + offset("boottime") - boot0;
    for f in &mut job.files {
        if let FileKind::TimerFd { clock, value_ns, .. } = &mut f.kind {
            let late = match *clock {
                libc::CLOCK_MONOTONIC => mono_late,
                libc::CLOCK_BOOTTIME | libc::CLOCK_BOOTTIME_ALARM => boot_late,
                _ => continue,
            };
            if *value_ns != 0 {
                *value_ns += late.max(0) as u64;
            }
        }
    }
}

/// What an anon_inode fd is, from its fdinfo; None when it is not an event object.
pub fn capture(target: &str, info: &str) -> Result<Option<FileKind>> {
    Ok(Some(match target {
        "anon_inode:[signalfd]" => {
            let mask = field(info, "sigmask").and_then(|m| u64::from_str_radix(m, 16).ok()).ok_or_else(|| anyhow!("signalfd without a mask"))?;
            FileKind::SignalFd { mask }
        }
        "anon_inode:[eventfd]" => FileKind::EventFd {
            count: field(info, "eventfd-count").and_then(|c| u64::from_str_radix(c, 16).ok()).unwrap_or(0),
            semaphore: field(info, "eventfd-semaphore") == Some("1"),
        },
        "anon_inode:[timerfd]" => {
            let clock: i32 = field(info, "clockid").and_then(|c| c.parse().ok()).unwrap_or(libc::CLOCK_MONOTONIC);
            let settime_flags = field(info, "settime flags").and_then(|f| i32::from_str_radix(f, 8).ok()).unwrap_or(0);
            let mut value_ns = field(info, "it_value").map(pair_ns).unwrap_or(0);
            // fdinfo gives the time left. An absolute CLOCK_REALTIME deadline stays absolute (real time passes
            // while the job is not running); the job's monotonic clocks resume where they stopped.
            if settime_flags & libc::TFD_TIMER_ABSTIME != 0 && clock == libc::CLOCK_REALTIME && value_ns != 0 {
                let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME)?;
                value_ns += now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
            }
            FileKind::TimerFd {
                clock,
                settime_flags,
                value_ns,
                interval_ns: field(info, "it_interval").map(pair_ns).unwrap_or(0),
                ticks: field(info, "ticks").and_then(|t| t.parse().ok()).unwrap_or(0),
            }
        }
        "anon_inode:[eventpoll]" => {
            // "tfd: N events: HEX data: HEX pos:.. ino:HEX sdev:HEX" per registration.
            let items = info
                .lines()
                .filter_map(|l| {
                    let w: Vec<&str> = l.split_whitespace().collect();
                    (w.first() == Some(&"tfd:")).then(|| EpollItem {
                        fd: w[1].parse().unwrap_or(-1),
                        events: u32::from_str_radix(w[3], 16).unwrap_or(0),
                        data: u64::from_str_radix(w[5], 16).unwrap_or(0),
                    })
                })
                .collect();
            FileKind::Epoll { items, owner: u32::MAX }
        }
        "anon_inode:inotify" => FileKind::Inotify { watches: vec![] },
        "anon_inode:[pidfd]" => {
            let pid = field(info, "NSpid").and_then(|p| p.split_whitespace().last()?.parse().ok()).unwrap_or(0);
            if pid <= 0 {
                bail!("a pidfd of a process outside the job is not supported");
            }
            FileKind::PidFd { pid }
        }
        _ => return Ok(None),
    }))
}

/// Events queued in an inotify instance cannot be put back into a new one: refuse (the job goes on; a
/// checkpoint a moment later, once it has read them, succeeds).
pub fn inotify_unread(fd: &OwnedFd) -> Result<()> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD on an inotify fd we hold, with a valid out-parameter.
    unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    if n > 0 {
        bail!("inotify has {n} bytes of events the job has not read yet; they cannot be restored (try again once it has read them)");
    }
    Ok(())
}

/// inotify watches of open file `file` (held at `fd` in process `pi`): numbers and masks from fdinfo, paths
/// from the shim's records (or, as root, from the kernel's file handles).
pub fn inotify_watches(job: &JobImage, file: u32, info: &str) -> Result<Vec<InotifyWatch>> {
    let mut out = vec![];
    for l in info.lines().filter(|l| l.starts_with("inotify ")) {
        let get = |k: &str| l.split_whitespace().find_map(|w| w.strip_prefix(k));
        let wd = get("wd:").and_then(|v| i32::from_str_radix(v, 16).ok()).unwrap_or(-1);
        let mask = get("mask:").and_then(|v| u32::from_str_radix(v, 16).ok()).unwrap_or(0);
        // Any process holding this inotify instance may have recorded the path.
        let path = job.processes.iter().find_map(|p| {
            p.fds.iter().filter(|f| f.file == file).find_map(|f| p.watches.iter().find(|w| w.fd == f.fd && w.wd == wd).map(|w| w.path.clone()))
        });
        let path = match path {
            Some(p) => p,
            None => path_of_handle(l).ok_or_else(|| anyhow!("inotify watch {wd}: its path is unknown (added before the shim was there?)"))?,
        };
        out.push(InotifyWatch { wd, mask, path });
    }
    out.sort_by_key(|w| w.wd);
    Ok(out)
}

/// The path of an inotify watch from its file handle (needs CAP_DAC_READ_SEARCH).
fn path_of_handle(line: &str) -> Option<String> {
    let get = |k: &str| line.split_whitespace().find_map(|w| w.strip_prefix(k));
    let bytes = usize::from_str_radix(get("fhandle-bytes:")?, 16).ok()?;
    let ty = i32::from_str_radix(get("fhandle-type:")?, 16).ok()?;
    let hex = get("f_handle:")?;
    let sdev = u64::from_str_radix(get("sdev:")?, 16).ok()?;
    let handle: Vec<u8> = (0..bytes).filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()).collect();
    // A mount of that device to open the handle relative to.
    let (major, minor) = ((sdev >> 20) as u32, (sdev & 0xfffff) as u32);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mnt = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&format!("{major}:{minor}").as_str())).then(|| f[4].to_string())
    })?;
    let m = std::fs::File::open(&mnt).ok()?;
    let mut buf = vec![0u8; 8 + bytes];
    buf[..4].copy_from_slice(&(bytes as u32).to_ne_bytes());
    buf[4..8].copy_from_slice(&ty.to_ne_bytes());
    buf[8..].copy_from_slice(&handle);
    use std::os::fd::AsRawFd;
    // SAFETY: a file_handle laid out as the kernel expects; O_PATH opens nothing but a reference.
    let fd = unsafe { libc::syscall(libc::SYS_open_by_handle_at, m.as_raw_fd(), buf.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok().map(|p| p.display().to_string())
}

/// The process that registers an epoll instance's fds again: one holding the instance in which every
/// registered fd number still points at the registered file (`ino` from fdinfo); none: refuse.
pub fn epoll_owner(job: &JobImage, file: u32, items: &[EpollItem], inode_of: &dyn Fn(usize, i32) -> Option<u64>, info: &str) -> Result<u32> {
    let inos: Vec<u64> = info
        .lines()
        .filter(|l| l.starts_with("tfd:"))
        .map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("ino:")).and_then(|v| u64::from_str_radix(v, 16).ok()).unwrap_or(0))
        .collect();
    for (pi, p) in job.processes.iter().enumerate() {
        if !p.fds.iter().any(|f| f.file == file) {
            continue;
        }
        if items.iter().zip(&inos).all(|(it, ino)| inode_of(pi, it.fd) == Some(*ino)) {
            return Ok(pi as u32);
        }
    }
    bail!("an epoll instance watches a file through an fd that is closed now: not supported yet")
}

fn fd_or_err(r: i64, what: &str) -> Result<OwnedFd> {
    if r < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd from the syscall.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// Make an event object again (pidfds are opened by their process: a placeholder here).
pub fn restore(kind: &FileKind) -> Result<Option<OwnedFd>> {
    use std::os::fd::AsRawFd;
    Ok(Some(match kind {
        FileKind::SignalFd { mask } => {
            // SAFETY: the kernel's signal set is 64 bits; signalfd takes its size.
            fd_or_err(unsafe { libc::syscall(libc::SYS_signalfd4, -1, mask as *const u64, 8usize, libc::SFD_CLOEXEC) }, "signalfd")?
        }
        FileKind::EventFd { count, semaphore } => {
            let flags = libc::EFD_CLOEXEC | if *semaphore { libc::EFD_SEMAPHORE } else { 0 };
            // SAFETY: eventfd with an initial count; counts above u32 are added by a write.
            let fd = fd_or_err(unsafe { libc::eventfd((*count).min(u32::MAX as u64) as u32, flags) } as i64, "eventfd")?;
            if *count > u32::MAX as u64 {
                let rest = count - u32::MAX as u64;
                // SAFETY: writing an 8-byte counter increment.
                unsafe { libc::write(fd.as_raw_fd(), &rest as *const u64 as *const libc::c_void, 8) };
            }
            fd
        }
        FileKind::TimerFd { clock, settime_flags, value_ns, interval_ns, ticks } => {
            // SAFETY: timerfd_create has no memory effects.
            let fd = fd_or_err(unsafe { libc::timerfd_create(*clock, libc::TFD_CLOEXEC) } as i64, "timerfd")?;
            let ts = |ns: u64| libc::timespec { tv_sec: (ns / 1_000_000_000) as i64, tv_nsec: (ns % 1_000_000_000) as i64 };
            let absolute = *clock == libc::CLOCK_REALTIME && settime_flags & libc::TFD_TIMER_ABSTIME != 0;
            let flags = if absolute { *settime_flags } else { settime_flags & !libc::TFD_TIMER_ABSTIME };
            let spec = libc::itimerspec { it_interval: ts(*interval_ns), it_value: ts(*value_ns) };
            // SAFETY: a valid itimerspec.
            if *value_ns != 0 && unsafe { libc::timerfd_settime(fd.as_raw_fd(), flags, &spec, std::ptr::null_mut()) } < 0 {
                bail!("timerfd_settime: {}", std::io::Error::last_os_error());
            }
            if *ticks > 0 {
                const TFD_IOC_SET_TICKS: u64 = 0x4008_5400;
                // SAFETY: the ioctl reads one u64.
                if unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS, ticks as *const u64) } < 0 {
                    bail!("restoring a timerfd's {ticks} pending expirations: {}", std::io::Error::last_os_error());
                }
            }
            fd
        }
        // SAFETY: epoll_create1 has no memory effects; its registrations are the owner process's job.
        FileKind::Epoll { .. } => fd_or_err(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) } as i64, "epoll_create1")?,
        FileKind::Inotify { watches } => inotify(watches)?,
        // The process opens it itself; it gets /dev/null in its place until then.
        FileKind::PidFd { .. } => std::fs::File::open("/dev/null")?.into(),
        _ => return Ok(None),
    }))
}

/// An inotify instance with the same watches under the same numbers. Watch numbers are handed out in turn, so
/// a dummy watch added and removed moves the counter on to the number wanted.
fn inotify(watches: &[InotifyWatch]) -> Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    // SAFETY: inotify_init1 has no memory effects.
    let fd = fd_or_err(unsafe { libc::inotify_init1(libc::IN_CLOEXEC) } as i64, "inotify_init1")?;
    // A memfd of our own as the dummy: no watched inode of the job's, and no file created anywhere.
    let dummy = nix::sys::memfd::memfd_create(c"vos-inotify", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
    let cdummy = std::ffi::CString::new(format!("/proc/self/fd/{}", dummy.as_raw_fd()))?;
    let mut last = 0;
    for w in watches {
        let path = std::ffi::CString::new(w.path.as_str())?;
        while last + 1 < w.wd {
            // SAFETY: valid NUL-terminated path.
            let d = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), cdummy.as_ptr(), libc::IN_ACCESS) };
            if d < 0 || d >= w.wd || watches.iter().any(|x| x.wd == d) {
                bail!("cannot give inotify watch {} on {} its number back", w.wd, w.path);
            }
            // SAFETY: removing the dummy watch just added.
            unsafe { libc::inotify_rm_watch(fd.as_raw_fd(), d) };
            last = d;
        }
        // SAFETY: valid NUL-terminated path.
        let got = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), w.mask) };
        if got != w.wd {
            bail!("inotify watch on {}: got number {got}, needed {} ({})", w.path, w.wd, std::io::Error::last_os_error());
        }
        last = got;
    }
    // Removing the dummies queued IN_IGNORED events the job must not see; nothing of the job runs yet.
    let mut buf = [0u8; 4096];
    // SAFETY: fcntl and non-blocking reads into our buffer on our own fd.
    unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK);
        while libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) > 0 {}
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, 0);
    }
    Ok(fd)
}

