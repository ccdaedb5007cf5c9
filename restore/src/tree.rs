//! The process tree: each restorer makes its process's children with their original pids, sessions and process
//! groups, zombies included, then the processes take turns reading their pages from the one image stream.

use crate::out::{Msg, fail};
use crate::plan::{self, JobPlanHead, ProcEntry, Sync};
use crate::sys;
use core::sync::atomic::{AtomicU32, Ordering};

fn sync() -> &'static Sync {
    // SAFETY: rmain mapped the shared Sync page at SYNC_ADDR before any of this runs.
    unsafe { &*(plan::SYNC_ADDR as *const Sync) }
}

/// Wait until `word` reaches `want` (counters only grow).
fn wait_for(word: &AtomicU32, want: u32) {
    loop {
        let v = word.load(Ordering::Acquire);
        if v >= want {
            return;
        }
        let _ = sys::futex_wait(word, v, None);
    }
}

fn bump(word: &AtomicU32) {
    word.fetch_add(1, Ordering::AcqRel);
    let _ = sys::futex_wake(word, i32::MAX as u32);
}

/// A fork with an exact pid in the job's pid namespace. Returns 0 in the child.
fn fork_as(pid: i32) -> i32 {
    let tid = pid as u64;
    let args = sys::CloneArgs { exit_signal: libc::SIGCHLD as u64, set_tid: &tid as *const u64 as u64, set_tid_size: 1, ..Default::default() };
    // SAFETY: a fork-like clone3 (no CLONE_VM): the child runs on its own copy of our memory and returns here.
    let r = unsafe { sys::syscall6(libc::SYS_clone3, &args as *const sys::CloneArgs as usize, core::mem::size_of::<sys::CloneArgs>(), 0, 0, 0, 0) };
    if r < 0 {
        fail(Msg::new("vos-restore: creating pid ").dec(pid as u64).push(": ").errno(sys::Errno(-r as i32)));
    }
    r as i32
}

/// Be the process `entries[index]`: make its session, its children, its group; then (a zombie) exit as it
/// did, or (a live process) restore it with `restore` (the process's memory and the jump into the shim).
pub fn become_process(buf: &[u8], head: &JobPlanHead, mut index: usize, restore: fn(&[u8], &ProcEntry) -> !) -> ! {
    // SAFETY: rmain checked the entries lie inside the plan; ProcEntry is plain data, 8-aligned in PLAN.
    let entries: &[ProcEntry] =
        unsafe { core::slice::from_raw_parts(buf.as_ptr().add(head.procs_off as usize) as *const ProcEntry, head.nproc as usize) };
    'me: loop {
        let me = entries[index];
        if me.sid == me.pid && sys::getpid() == me.pid {
            // SAFETY: setsid has no memory effects.
            if unsafe { sys::syscall6(libc::SYS_setsid, 0, 0, 0, 0, 0, 0) } < 0 {
                fail(Msg::new("vos-restore: setsid in pid ").dec(me.pid as u64));
            }
        }
        for (ci, c) in entries.iter().enumerate() {
            if c.ppid == me.pid && fork_as(c.pid) == 0 {
                index = ci;
                continue 'me;
            }
        }
        break;
    }
    let me = entries[index];
    let s = sync();
    bump(&s.created);
    wait_for(&s.created, head.nproc);
    if me.pgid == me.pid {
        if me.sid != me.pid {
            setpgid(me.pgid);
        }
        bump(&s.leaders);
    }
    wait_for(&s.leaders, head.nleaders);
    if me.pgid != 0 && me.pgid != me.pid {
        setpgid(me.pgid);
    }
    if me.zombie != 0 {
        die_as(me.status);
    }
    restore(buf, &me)
}

fn setpgid(pgid: i32) {
    // SAFETY: setpgid has no memory effects.
    let r = unsafe { sys::syscall6(libc::SYS_setpgid, 0, pgid as usize, 0, 0, 0, 0) };
    if r < 0 {
        fail(Msg::new("vos-restore: joining process group ").dec(pgid as u64).push(": ").errno(sys::Errno(-r as i32)));
    }
}

/// End the way a zombie of the job ended, so its parent's wait() sees the same status.
fn die_as(status: i32) -> ! {
    let sig = status & 0x7f;
    if sig == 0 {
        sys::exit_group((status >> 8) & 0xff);
    }
    let dfl = sys::KSigaction { handler: libc::SIG_DFL, ..Default::default() };
    let _ = sys::rt_sigaction(sig, Some(&dfl));
    sys::sigprocmask(libc::SIG_SETMASK, Some(0));
    let _ = sys::kill(sys::getpid(), sig);
    sys::exit_group(128 + sig)
}

/// Wait until this process's zombie children have exited (without reaping them), so that no SIGCHLD of theirs
/// arrives after the restored process's own pending signals are in place.
pub fn await_zombie_children(buf: &[u8], head_procs: (usize, usize), me: i32) {
    // SAFETY: the caller passes the entries' offset and count that rmain checked.
    let entries: &[ProcEntry] = unsafe { core::slice::from_raw_parts(buf.as_ptr().add(head_procs.0) as *const ProcEntry, head_procs.1) };
    for z in entries.iter().filter(|e| e.zombie != 0 && e.ppid == me) {
        let mut info = [0u8; 128];
        const P_PID: usize = 1;
        // SAFETY: waitid with WNOWAIT only reports the child's state; info is a valid siginfo buffer.
        unsafe { sys::syscall6(libc::SYS_waitid, P_PID, z.pid as usize, info.as_mut_ptr() as usize, (libc::WEXITED | libc::WNOWAIT) as usize, 0, 0) };
    }
}

/// Wait until it is this process's turn to read its pages; returns the number of its first chunk.
pub fn wait_turn(order: u32, first: u64) -> u64 {
    wait_for(&sync().turn, order);
    if order == 0 { first } else { sync().seq.load(Ordering::Acquire) }
}

/// Let the next process read, from chunk `next_seq` on.
pub fn pass_turn(next_seq: u64) {
    sync().seq.store(next_seq, Ordering::Release);
    bump(&sync().turn);
}
