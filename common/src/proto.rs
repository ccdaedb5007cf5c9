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

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use alloc::vec;
    use proptest::collection::vec as vec_of;
    use proptest::prelude::*;
    use proptest::sample::Index;

    fn text() -> impl Strategy<Value = String> {
        vec_of(any::<char>(), 0..12).prop_map(|c| c.into_iter().collect())
    }

    fn error() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(text())
    }

    fn ranges() -> impl Strategy<Value = Vec<(u64, u64)>> {
        vec_of(any::<(u64, u64)>(), 0..4)
    }

    /// Every message: a variant added to `Msg` fails to compile here until it is generated too.
    fn msg() -> impl Strategy<Value = Msg> {
        let _all = |m: Msg| match m {
            Msg::Hello { .. } | Msg::Quiesced { .. } | Msg::Dumped { .. } | Msg::Resumed | Msg::Tracked { .. } | Msg::ProcFile { .. }
            | Msg::Begin { .. } | Msg::Dump { .. } | Msg::Track | Msg::Finish { .. } | Msg::Cancel { .. } | Msg::Ready | Msg::Go
            | Msg::Running | Msg::RestoreFailed { .. } | Msg::Checkpoint { .. } | Msg::SignWith { .. } | Msg::Precopy
            | Msg::Handoff { .. } | Msg::Written | Msg::MemoryOf { .. } | Msg::CheckpointDone { .. } | Msg::Progress { .. }
            | Msg::CheckpointFailed { .. } | Msg::Fill { .. } | Msg::PrecopyPlan { .. } | Msg::PrecopyRound { .. }
            | Msg::PrecopyDone => (),
        };
        let trigger = prop_oneof![any::<i32>().prop_map(|sig| Trigger::Signal { sig }), Just(Trigger::Supervisor)];
        let pages = prop::sample::select(vec![Pages::All, Pages::Precopied, Pages::Lazy]);
        prop_oneof![
            (any::<i32>(), trigger).prop_map(|(pid, trigger)| Msg::Hello { pid, trigger }),
            (error(), vec_of(any::<i32>(), 0..4)).prop_map(|(error, own_fds)| Msg::Quiesced { error, own_fds }),
            (error(), any::<u64>(), any::<u64>()).prop_map(|(error, next_seq, bytes)| Msg::Dumped { error, next_seq, bytes }),
            Just(Msg::Resumed),
            error().prop_map(|error| Msg::Tracked { error }),
            text().prop_map(|name| Msg::ProcFile { name }),
            any::<bool>().prop_map(|kill| Msg::Begin { kill }),
            (any::<u64>(), ranges(), ranges(), any::<bool>()).prop_map(|(first_seq, skip, reuse, lazy)| Msg::Dump { first_seq, skip, reuse, lazy }),
            Just(Msg::Track),
            any::<bool>().prop_map(|exit| Msg::Finish { exit }),
            text().prop_map(|why| Msg::Cancel { why }),
            Just(Msg::Ready),
            Just(Msg::Go),
            Just(Msg::Running),
            text().prop_map(|why| Msg::RestoreFailed { why }),
            (any::<[bool; 5]>(), proptest::option::of(text()), pages).prop_map(|(b, to, pages)| Msg::Checkpoint {
                kill: b[0],
                to,
                fd_attached: b[1],
                bundle: b[2],
                tcp_established: b[3],
                handoff: b[4],
                pages
            }),
            vec_of(any::<u8>(), 0..40).prop_map(|k| Msg::SignWith { key: serde_bytes::ByteBuf::from(k) }),
            Just(Msg::Precopy),
            any::<bool>().prop_map(|exit| Msg::Handoff { exit }),
            Just(Msg::Written),
            any::<(i32, bool)>().prop_map(|(pid, more)| Msg::MemoryOf { pid, more }),
            (proptest::option::of(text()), any::<u64>(), any::<u64>(), proptest::option::of(text()))
                .prop_map(|(path, bytes, millis, signed)| Msg::CheckpointDone { path, bytes, millis, signed }),
            any::<(u64, u64)>().prop_map(|(bytes, total)| Msg::Progress { bytes, total }),
            text().prop_map(|why| Msg::CheckpointFailed { why }),
            (any::<i32>(), any::<i32>(), ranges()).prop_map(|(pid, init, runs)| Msg::Fill { pid, init, runs }),
            any::<(u32, u64)>().prop_map(|(round, bytes)| Msg::PrecopyPlan { round, bytes }),
            any::<(u32, u64)>().prop_map(|(round, bytes)| Msg::PrecopyRound { round, bytes }),
            Just(Msg::PrecopyDone),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// A message sent is the message received; a cut one is no message.
        #[test]
        fn messages_round_trip(m in msg(), cut in any::<Index>()) {
            let b = encode(&m);
            prop_assert!(!b.is_empty() && b.len() <= MAX_MSG);
            prop_assert_eq!(decode(&b), Some(m));
            prop_assert_eq!(decode(&b[..cut.index(b.len())]), None);
        }

        /// A peer's bytes, whatever they are, decode to a message or to none, without panicking.
        #[test]
        fn any_bytes_decode_or_fail(b in vec_of(any::<u8>(), 0..64)) {
            let _ = decode(&b);
        }

        /// A `CheckpointDone` from a vrun before signed images (no `signed`) reads as not signed.
        #[test]
        fn checkpoint_done_without_signed_reads_as_unsigned(path in proptest::option::of(text()), bytes in any::<u64>(), millis in any::<u64>()) {
            let b = encode(&Msg::CheckpointDone { path: path.clone(), bytes, millis, signed: None });
            // {"CheckpointDone": {path, bytes, millis, signed}}: drop the last pair of the inner fixmap.
            let head = [vec![0x81], rmp_serde::to_vec(&"CheckpointDone").unwrap()].concat();
            let tail = [rmp_serde::to_vec(&"signed").unwrap(), vec![0xc0]].concat();
            prop_assert!(b.starts_with(&head) && b[head.len()] == 0x84 && b.ends_with(&tail));
            let mut old = b[..b.len() - tail.len()].to_vec();
            old[head.len()] = 0x83;
            prop_assert_eq!(decode(&old), Some(Msg::CheckpointDone { path, bytes, millis, signed: None }));
        }
    }
}
