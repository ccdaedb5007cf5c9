//! The control protocol: MessagePack messages over SOCK_SEQPACKET unix sockets, optionally carrying one fd.
//!
//! Three parties talk: the shim's checkpoint coordinator inside each process, the launcher supervising the job
//! (`vrun` / `vrun restore`), and the CLI (`vrun checkpoint`). The supervisor listens on an abstract socket named
//! in the job's registry entry; the shim connects to it only while a checkpoint runs, so it holds no fd otherwise.

use crate::sys::{self, Errno};
use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// Largest message; metadata travels in the image, not here.
pub const MAX_MSG: usize = 64 * 1024;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// The shim saw a trigger signal from outside the job (`kill -s RTMAX-1`).
    Signal { sig: i32 },
    /// The supervisor asked (it sent the signal itself).
    Supervisor,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    // ---- shim coordinator -> supervisor
    /// A checkpoint starts in process `pid` (pid as the job sees it).
    Hello { pid: i32, trigger: Trigger },
    /// Every thread is parked (or why not: the checkpoint is then abandoned and the app goes on). The process's
    /// metadata (MessagePack ProcessImage) comes along in a memfd; `own_fds` are the coordinator's, not the app's.
    Quiesced { error: Option<String>, own_fds: Vec<i32> },
    /// The image of this process is written (or why not); the next chunk of the stream is number `next_seq`.
    Dumped { error: Option<String>, next_seq: u64, bytes: u64 },
    /// The app runs again.
    Resumed,
    /// Write tracking is on (or why not) for this process's private memory.
    Tracked { error: Option<String> },

    // ---- supervisor -> shim coordinator
    /// Before `Begin`, to a process whose /proc files its own credentials cannot open (its dumpable flag is off:
    /// a daemon that switched to another user): the supervisor's fd of its `name` ("pagemap", "mem" or "auxv",
    /// read-only, opened without CAP_SYS_ADMIN so pagemap shows no physical addresses) comes along.
    ProcFile { name: String },
    /// Go ahead: park every thread and describe the process.
    Begin { kill: bool },
    /// Write this process's page chunks now to the fd that comes along, numbering them from `first_seq` (every
    /// process of the job is quiesced). Pages in the `skip` ranges are stored by another process (shared memory);
    /// pages in the `reuse` ranges (sorted) reached the destination before, unchanged since: listed, not sent.
    /// `lazy`: the reuse ranges are memory the destination fetches after the job resumes (post-copy): listed
    /// pages stand for present ones, in few enough runs for the restorer to leave them all missing.
    Dump { first_seq: u64, skip: Vec<(u64, u64)>, reuse: Vec<(u64, u64)>, lazy: bool },
    /// Start tracking writes to private memory (userfaultfd write-protect, async), then wait for `Finish`.
    Track,
    /// Done: resume the app, or end it (checkpoint --kill).
    Finish { exit: bool },
    /// Abandon the checkpoint; the app goes on.
    Cancel { why: String },

    // ---- restore: shim restart code <-> supervisor
    /// State rebuilt; threads wait for Go.
    Ready,
    Go,
    Running,
    /// Restart failed; the process ends.
    RestoreFailed { why: String },

    // ---- CLI -> supervisor
    /// `vrun checkpoint`: to a path, to the fd that comes with the message (`--to -`), or to the job's directory.
    /// `handoff` (migration): once the image is written the job waits, stopped, for `Handoff`.
    Checkpoint { kill: bool, to: Option<String>, fd_attached: bool, bundle: bool, tcp_established: bool, handoff: bool, pages: Pages },
    /// `vrun checkpoint --image-key`: the key file's 32 bytes, to sign the image of the `Checkpoint` that follows on
    /// the same connection.
    SignWith { key: serde_bytes::ByteBuf },
    /// `vrun migrate`: send the job's memory to the fd that comes along while it runs, in rounds, each round the
    /// pages written since the last one, until few change.
    Precopy,
    /// The job's fate after a handoff checkpoint: it ends (it runs elsewhere now) or goes on. A client that goes
    /// away without saying means go on.
    Handoff { exit: bool },
    // ---- supervisor -> CLI
    /// The image is complete; the job waits for `Handoff`. With `Pages::Lazy`, a `MemoryOf` follows for each
    /// process.
    Written,
    /// Post-copy: /proc/PID/mem of job process `pid` (as the job numbers it), opened by the supervisor, comes
    /// along; `more` says whether another follows.
    MemoryOf { pid: i32, more: bool },
    /// `signed`: the id of the key that signed the image (None: not signed).
    CheckpointDone {
        path: Option<String>,
        bytes: u64,
        millis: u64,
        #[serde(default)]
        signed: Option<String>,
    },
    /// A checkpoint's image has `bytes` so far, of about `total`.
    Progress { bytes: u64, total: u64 },
    CheckpointFailed { why: String },
    /// vrun restore -> its filler: fill these runs of process `pid` through the userfaultfd that comes along;
    /// `init` is the job's init as this host numbers it (ending it ends the job, should filling fail).
    Fill { pid: i32, init: i32, runs: Vec<(u64, u64)> },
    /// A pre-copy round begins: its number and the bytes it will send.
    PrecopyPlan { round: u32, bytes: u64 },
    /// One pre-copy round is written: its number and bytes.
    PrecopyRound { round: u32, bytes: u64 },
    PrecopyDone,
}

/// What of the job's private memory a migration's image carries.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Pages {
    /// Every page.
    #[default]
    All,
    /// The destination holds what the last `Precopy` sent: pages unchanged since are only listed.
    Precopied,
    /// Post-copy: readable anonymous memory is only listed; the destination fetches it after the job resumes.
    Lazy,
}

pub fn encode(m: &Msg) -> Vec<u8> {
    rmp_serde::to_vec_named(m).unwrap_or_default()
}

pub fn decode(b: &[u8]) -> Option<Msg> {
    rmp_serde::from_slice(b).ok()
}

/// Send one message, with an fd when given.
pub fn send(sock: i32, m: &Msg, fd: Option<i32>) -> Result<(), Errno> {
    let buf = encode(m);
    let mut iov = libc::iovec { iov_base: buf.as_ptr() as *mut _, iov_len: buf.len() };
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is plain data; every pointer set below stays valid for the sendmsg call.
    let mut msg: libc::msghdr = unsafe { core::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        msg.msg_control = cbuf.as_mut_ptr() as *mut _;
        // SAFETY: CMSG_SPACE is pure arithmetic.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as usize;
        // SAFETY: the control buffer is 32 bytes, larger than CMSG_SPACE(4); CMSG_FIRSTHDR points into it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
            core::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut i32, fd);
        }
    }
    loop {
        // SAFETY: msg describes live buffers.
        match unsafe { sys::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) } {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(_) => return Ok(()),
        }
    }
}

/// Receive one message and the fd that came with it. `Ok(None)` when the peer closed the connection.
pub fn recv(sock: i32) -> Result<Option<(Msg, Option<i32>)>, Errno> {
    let mut buf = alloc::vec![0u8; MAX_MSG];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut _, iov_len: buf.len() };
    let mut cbuf = [0u64; 8];
    // SAFETY: msghdr is plain data; every pointer set below stays valid for the recvmsg call.
    let mut msg: libc::msghdr = unsafe { core::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut _;
    msg.msg_controllen = core::mem::size_of_val(&cbuf);
    let n = loop {
        // SAFETY: msg describes live, writable buffers.
        match unsafe { sys::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) } {
            Err(Errno::EINTR) => continue,
            r => break r?,
        }
    };
    if n == 0 {
        return Ok(None);
    }
    let mut fd = None;
    // SAFETY: walking the control messages the kernel wrote into cbuf, within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                fd = Some(core::ptr::read_unaligned(libc::CMSG_DATA(c) as *const i32));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    match decode(&buf[..n]) {
        Some(m) => Ok(Some((m, fd))),
        None => {
            if let Some(f) = fd {
                let _ = sys::close(f);
            }
            Err(Errno(libc::EBADMSG))
        }
    }
}

/// Fill a `sockaddr_un` for an abstract socket name; returns it and its length.
pub fn abstract_addr(name: &str) -> (libc::sockaddr_un, u32) {
    // SAFETY: sockaddr_un is plain data.
    let mut a: libc::sockaddr_un = unsafe { core::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as u16;
    let n = name.len().min(a.sun_path.len() - 1);
    for (i, b) in name.as_bytes()[..n].iter().enumerate() {
        a.sun_path[i + 1] = *b as libc::c_char;
    }
    (a, (core::mem::size_of::<libc::sa_family_t>() + 1 + n) as u32)
}

/// Connect to a supervisor's abstract socket.
pub fn connect(name: &str) -> Result<i32, Errno> {
    let s = sys::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0)?;
    let (a, len) = abstract_addr(name);
    // SAFETY: a is a valid sockaddr_un of length len.
    match unsafe { sys::connect(s, &a as *const libc::sockaddr_un as *const libc::sockaddr, len) } {
        Ok(_) => Ok(s),
        Err(e) => {
            let _ = sys::close(s);
            Err(e)
        }
    }
}
