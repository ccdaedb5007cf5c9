//! System V IPC: shared memory segments, semaphore sets and message queues.
//!
//! Every job has an IPC namespace of its own (init makes it), so the objects in it are all and only the job's,
//! and a restore can give them their ids back through the namespace's `*_next_id` settings. At a checkpoint the
//! supervisor reads them from inside the namespace (messages by MSG_COPY, which leaves them
//! queued); at a restore init makes them again before the restorers attach the segments, and the supervisor
//! removes the segments that were only waiting for their last detach.

use crate::os::data_ranges;
use anyhow::{Context, Result, anyhow, bail};
use nix::sched::CloneFlags;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use vos::image::{DataImage, IpcPerm, JobImage, RegionKind, SysvImage, SysvMsgQueue, SysvSem, SysvShm};

const SHM_INFO: i32 = 14;
const SHM_STAT_ANY: i32 = 15;
const SEM_INFO: i32 = 19;
const MSG_INFO: i32 = 12;
const MSG_STAT_ANY: i32 = 13;
/// shm_perm.mode bits: removed (IPC_RMID) but still attached; locked in memory (SHM_LOCK).
const SHM_DEST: u32 = 0o1000;
const SHM_LOCKED: u32 = 0o2000;
const PAGE: usize = 4096;

fn os_err(what: &str) -> anyhow::Error {
    anyhow!("{what}: {}", std::io::Error::last_os_error())
}

/// Run `f` in the IPC namespace of process `pid` (this host's number). The supervisor joins it itself (it
/// cannot start threads: it made the job's pid namespace, and a child would land in that) and stays: it uses no
/// IPC objects of its own, and without root it could not go back to the host's namespace.
fn in_namespace<T>(pid: i32, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let theirs = std::fs::File::open(format!("/proc/{pid}/ns/ipc")).context("the job's IPC namespace")?;
    nix::sched::setns(&theirs, CloneFlags::CLONE_NEWIPC).context("joining the job's IPC namespace")?;
    f()
}

fn perm(p: &libc::ipc_perm, id: i32) -> IpcPerm {
    IpcPerm { id, key: p.__key, uid: p.uid, gid: p.gid, mode: p.mode as u32 }
}

/// Capture the job's System V objects (init is its pid 1, as this host numbers it) into `job.sysv`. Returns the
/// sources of the segments' contents, which follow the files' in Data chunks.
pub fn capture(init: i32, job: &mut JobImage) -> Result<Vec<OwnedFd>> {
    let (sysv, contents) = in_namespace(init, || {
        let mut img = SysvImage::default();
        let contents = capture_shm(&mut img)?;
        capture_sem(&mut img)?;
        capture_msg(&mut img)?;
        Ok((img, contents))
    })?;
    let mut sysv = sysv;
    let first = job.data.len() as u32;
    for (i, s) in sysv.shm.iter_mut().enumerate() {
        s.data = first + i as u32;
    }
    job.data.extend(contents.iter().map(|(_, d)| d.clone()));
    job.sysv = sysv;
    check_attachments(job)?;
    Ok(contents.into_iter().map(|(fd, _)| fd).collect())
}

/// Swapped-out pages of each segment by id (/proc/sysvipc/shm, last column): those must be read too.
fn swapped() -> std::collections::HashMap<i32, u64> {
    let text = std::fs::read_to_string("/proc/sysvipc/shm").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            Some((w.get(1)?.parse().ok()?, w.last()?.parse().ok()?))
        })
        .collect()
}

fn capture_shm(img: &mut SysvImage) -> Result<Vec<(OwnedFd, DataImage)>> {
    // SAFETY: shmid_ds is plain data.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: SHM_INFO fills a struct shm_info, smaller than the shmid_ds given.
    let max = unsafe { libc::shmctl(0, SHM_INFO, &mut ds) };
    let swap = swapped();
    let mut out = vec![];
    for idx in 0..=max.max(-1) {
        // SAFETY: a valid out-parameter.
        let id = unsafe { libc::shmctl(idx, SHM_STAT_ANY, &mut ds) };
        if id < 0 {
            continue;
        }
        let size = ds.shm_segsz as u64;
        let fd = copy_segment(id, size as usize, swap.get(&id).copied().unwrap_or(0) > 0)
            .with_context(|| format!("System V shared memory {id}"))?;
        let stored = data_ranges(fd.as_raw_fd(), size).iter().map(|(a, b)| b - a).sum();
        img.shm.push(SysvShm { perm: perm(&ds.shm_perm, id), size, data: 0 });
        out.push((fd, DataImage { size, stored }));
    }
    Ok(out)
}

/// A memfd with the segment's pages: those in memory (or swapped) and not all zeros; the rest stay holes.
fn copy_segment(id: i32, size: usize, swapped: bool) -> Result<OwnedFd> {
    let fd = nix::sys::memfd::memfd_create(c"vos-sysv", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
    nix::unistd::ftruncate(&fd, size as i64)?;
    // SAFETY: a read-only attachment of our own, detached below; the job is frozen and cannot change it.
    let at = unsafe { libc::shmat(id, std::ptr::null(), libc::SHM_RDONLY) };
    if at as isize == -1 {
        return Err(os_err("shmat"));
    }
    let pages = size.div_ceil(PAGE);
    let mut resident = vec![0u8; pages];
    // SAFETY: mincore over our attachment into a buffer of one byte per page.
    if !swapped && unsafe { libc::mincore(at, size, resident.as_mut_ptr()) } != 0 {
        resident.iter_mut().for_each(|r| *r = 1);
    }
    let mut r = Ok(());
    for (i, _) in resident.iter().enumerate().filter(|(_, r)| swapped || **r & 1 != 0) {
        let len = PAGE.min(size - i * PAGE);
        // SAFETY: within our attachment of `size` bytes.
        let page = unsafe { std::slice::from_raw_parts((at as *const u8).add(i * PAGE), len) };
        if page.iter().all(|&b| b == 0) {
            continue;
        }
        if let Err(e) = nix::sys::uio::pwrite(&fd, page, (i * PAGE) as i64) {
            r = Err(e.into());
            break;
        }
    }
    // SAFETY: our own attachment.
    unsafe { libc::shmdt(at) };
    r.map(|_| fd)
}

fn capture_sem(img: &mut SysvImage) -> Result<()> {
    let mut info = [0i32; 10];
    // SAFETY: SEM_INFO fills a struct seminfo (10 ints).
    let max = unsafe { libc::semctl(0, 0, SEM_INFO, info.as_mut_ptr()) };
    for idx in 0..=max.max(-1) {
        // SAFETY: semid_ds is plain data; SEM_STAT_ANY fills it.
        let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: a valid out-parameter.
        let id = unsafe { libc::semctl(idx, 0, libc::SEM_STAT_ANY, &mut ds as *mut libc::semid_ds) };
        if id < 0 {
            continue;
        }
        let mut values = vec![0u16; ds.sem_nsems as usize];
        // SAFETY: GETALL fills one unsigned short per semaphore.
        if unsafe { libc::semctl(id, 0, libc::GETALL, values.as_mut_ptr()) } < 0 {
            return Err(os_err(&format!("System V semaphore set {id}: GETALL")));
        }
        img.sem.push(SysvSem { perm: perm(&ds.sem_perm, id), values });
    }
    Ok(())
}

fn capture_msg(img: &mut SysvImage) -> Result<()> {
    // SAFETY: msqid_ds is plain data.
    let mut ds: libc::msqid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: MSG_INFO fills a struct msginfo, smaller than the msqid_ds given.
    let max = unsafe { libc::msgctl(0, MSG_INFO, &mut ds) };
    for idx in 0..=max.max(-1) {
        // SAFETY: a valid out-parameter.
        let id = unsafe { libc::msgctl(idx, MSG_STAT_ANY, &mut ds) };
        if id < 0 {
            continue;
        }
        // No message is larger than all the queue holds.
        let mut buf = vec![0u8; 8 + ds.__msg_cbytes as usize];
        let mut messages = vec![];
        for n in 0..ds.msg_qnum {
            // SAFETY: buf holds a long and msg_cbytes bytes; MSG_COPY reads message n and leaves it queued.
            let len = unsafe {
                libc::msgrcv(id, buf.as_mut_ptr().cast(), buf.len() - 8, n as i64, libc::IPC_NOWAIT | libc::MSG_COPY | libc::MSG_NOERROR)
            };
            if len < 0 {
                return Err(os_err(&format!("System V message queue {id}: reading message {n} (MSG_COPY)")));
            }
            let mtype = i64::from_ne_bytes(buf[..8].try_into().unwrap());
            messages.push((mtype, serde_bytes::ByteBuf::from(buf[8..8 + len as usize].to_vec())));
        }
        img.msg.push(SysvMsgQueue { perm: perm(&ds.msg_perm, id), qbytes: ds.msg_qbytes as u64, messages });
    }
    Ok(())
}

/// An attachment comes back whole (shmat), so its pieces in the address space must still tile it.
fn check_attachments(job: &JobImage) -> Result<()> {
    for p in &job.processes {
        let pieces: Vec<_> = p.regions.iter().filter(|r| r.kind == RegionKind::SysvShm).collect();
        for (i, r) in pieces.iter().enumerate() {
            let what = || format!("pid {}: System V shared memory {} at {:#x}", p.pid, r.ino, r.start);
            let seg = job.sysv.shm.iter().find(|s| s.perm.id as u64 == r.ino).ok_or_else(|| anyhow!("{}: no such segment", what()))?;
            let joins_previous = i > 0 && {
                let q = pieces[i - 1];
                q.ino == r.ino && q.end == r.start && q.offset + (q.end - q.start) == r.offset
            };
            let next_joins = pieces.get(i + 1).is_some_and(|n| n.ino == r.ino && n.start == r.end && n.offset == r.offset + (r.end - r.start));
            let whole_end = r.offset + (r.end - r.start) >= seg.size;
            if (r.offset != 0 && !joins_previous) || (!whole_end && !next_joins) {
                bail!("{}: a partly unmapped attachment is not supported", what());
            }
        }
    }
    Ok(())
}

// ---- restore ---------------------------------------------------------------------------------------------------

/// Give the next object of `kind` ("shm", "sem", "msg") made in this IPC namespace the id `id`.
fn next_id(kind: &str, id: i32) -> Result<()> {
    std::fs::write(format!("/proc/sys/kernel/{kind}_next_id"), id.to_string())
        .with_context(|| format!("setting {kind}_next_id (needs CAP_CHECKPOINT_RESTORE in the job's namespace)"))
}

fn made(what: &str, want: i32, got: i32) -> Result<()> {
    if got < 0 {
        return Err(os_err(&format!("making System V {what} {want}")));
    }
    if got != want {
        bail!("System V {what} {want} came back as {got}");
    }
    Ok(())
}

fn set_owner(p: &IpcPerm, set: impl FnOnce(&mut libc::ipc_perm) -> i32, what: &str) -> Result<()> {
    // SAFETY: ipc_perm is plain data.
    let mut perm: libc::ipc_perm = unsafe { std::mem::zeroed() };
    (perm.uid, perm.gid, perm.mode) = (p.uid, p.gid, (p.mode & 0o777) as u16);
    if set(&mut perm) < 0 {
        return Err(os_err(&format!("giving System V {what} {} its owner", p.id)));
    }
    Ok(())
}

/// Make the image's objects in this (new, empty) IPC namespace, each under its id: in init, before the job's
/// processes exist. `contents` holds each segment's pages, in order.
pub fn restore(img: &SysvImage, contents: &[RawFd]) -> Result<()> {
    let flags = |p: &IpcPerm| libc::IPC_CREAT | libc::IPC_EXCL | (p.mode & 0o777) as i32;
    for (s, &src) in img.shm.iter().zip(contents) {
        next_id("shm", s.perm.id)?;
        // SAFETY: shmget has no memory effects.
        let id = unsafe { libc::shmget(s.perm.key, s.size as usize, flags(&s.perm)) };
        made("shared memory", s.perm.id, id)?;
        set_owner(&s.perm, |perm| {
            // SAFETY: shmid_ds is plain data; IPC_SET reads its perm.
            let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
            ds.shm_perm = *perm;
            // SAFETY: a valid shmid_ds.
            unsafe { libc::shmctl(id, libc::IPC_SET, &mut ds) }
        }, "shared memory")?;
        fill_segment(id, s.size as usize, src).with_context(|| format!("System V shared memory {id}"))?;
        // SAFETY: no memory effects.
        if s.perm.mode & SHM_LOCKED != 0 && unsafe { libc::shmctl(id, libc::SHM_LOCK, std::ptr::null_mut()) } < 0 {
            return Err(os_err(&format!("locking System V shared memory {id}")));
        }
    }
    for s in &img.sem {
        next_id("sem", s.perm.id)?;
        // SAFETY: semget has no memory effects.
        let id = unsafe { libc::semget(s.perm.key, s.values.len() as i32, flags(&s.perm)) };
        made("semaphore set", s.perm.id, id)?;
        // SAFETY: SETALL reads one unsigned short per semaphore.
        if unsafe { libc::semctl(id, 0, libc::SETALL, s.values.as_ptr()) } < 0 {
            return Err(os_err(&format!("setting System V semaphores {id}")));
        }
        set_owner(&s.perm, |perm| {
            // SAFETY: semid_ds is plain data; IPC_SET reads its perm.
            let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
            ds.sem_perm = *perm;
            // SAFETY: a valid semid_ds.
            unsafe { libc::semctl(id, 0, libc::IPC_SET, &mut ds as *mut libc::semid_ds) }
        }, "semaphore set")?;
    }
    for q in &img.msg {
        next_id("msg", q.perm.id)?;
        // SAFETY: msgget has no memory effects.
        let id = unsafe { libc::msgget(q.perm.key, flags(&q.perm)) };
        made("message queue", q.perm.id, id)?;
        set_owner(&q.perm, |perm| {
            // SAFETY: msqid_ds is plain data; IPC_SET reads its perm and msg_qbytes.
            let mut ds: libc::msqid_ds = unsafe { std::mem::zeroed() };
            ds.msg_perm = *perm;
            ds.msg_qbytes = q.qbytes as _;
            // SAFETY: a valid msqid_ds.
            unsafe { libc::msgctl(id, libc::IPC_SET, &mut ds) }
        }, "message queue")?;
        for (mtype, text) in &q.messages {
            let mut buf = mtype.to_ne_bytes().to_vec();
            buf.extend_from_slice(text);
            // SAFETY: buf holds the type and the text.
            if unsafe { libc::msgsnd(id, buf.as_ptr().cast(), text.len(), libc::IPC_NOWAIT) } < 0 {
                return Err(os_err(&format!("queueing a message on System V message queue {id}")));
            }
        }
    }
    Ok(())
}

fn fill_segment(id: i32, size: usize, src: RawFd) -> Result<()> {
    // SAFETY: an attachment of our own, detached below.
    let at = unsafe { libc::shmat(id, std::ptr::null(), 0) };
    if at as isize == -1 {
        return Err(os_err("shmat"));
    }
    let mut r = Ok(());
    for (lo, hi) in data_ranges(src, size as u64) {
        // SAFETY: within our attachment of `size` bytes.
        let dst = unsafe { std::slice::from_raw_parts_mut((at as *mut u8).add(lo as usize), (hi - lo) as usize) };
        // SAFETY: the source fd stays open for the call.
        if let Err(e) = nix::sys::uio::pread(unsafe { std::os::fd::BorrowedFd::borrow_raw(src) }, dst, lo as i64) {
            r = Err(e.into());
            break;
        }
    }
    // SAFETY: our own attachment.
    unsafe { libc::shmdt(at) };
    r
}

/// Segments removed (IPC_RMID) while still attached are removed again once the restored processes hold their
/// attachments (before the job runs), so they go away with the last detach, as they would have.
pub fn remove_destroyed(init: i32, img: &SysvImage) -> Result<()> {
    let ids: Vec<i32> = img.shm.iter().filter(|s| s.perm.mode & SHM_DEST != 0).map(|s| s.perm.id).collect();
    if ids.is_empty() {
        return Ok(());
    }
    in_namespace(init, || {
        for id in ids {
            // SAFETY: no memory effects.
            if unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) } < 0 {
                return Err(os_err(&format!("removing System V shared memory {id}")));
            }
        }
        Ok(())
    })
}
