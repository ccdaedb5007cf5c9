//! Unix sockets between processes of the job: socketpairs, bound and listening sockets, connections made with
//! connect/accept, stream, datagram and seqpacket, path-bound and abstract. At checkpoint the kernel's socket
//! table (sock_diag) says what each socket is bound to and connected to; the bytes and messages waiting in each
//! receive queue are read without being taken (MSG_PEEK with SO_PEEK_OFF). At restore the sockets are made
//! again, connected the same way (through their listeners, so addresses stay), and each queue refilled from
//! its peer.

use crate::os::grab;
use anyhow::{Result, anyhow, bail};
use serde_bytes::ByteBuf;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use vos::image::{FsCreds, JobImage, SockAddr, SocketImage};

/// What sock_diag says of one unix socket.
#[derive(Clone, Debug, Default)]
pub struct Diag {
    pub kind: i32,
    pub state: u8,
    pub name: SockAddr,
    pub peer: u64,
    /// Connections waiting to be accepted.
    pub pending: usize,
    pub shutdown: u8,
    /// Bytes of the messages it sent that are still queued somewhere (the kernel charges each to its sender), and
    /// its send buffer size.
    pub wmem: u32,
    pub sndbuf: u32,
}

const TCP_LISTEN: u8 = 10;

/// The kernel's table of unix sockets in this network namespace, by inode.
pub fn diag_table() -> Result<HashMap<u64, Diag>> {
    const NETLINK_SOCK_DIAG: i32 = 4;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const UDIAG_SHOW_NAME: u32 = 1;
    const UDIAG_SHOW_PEER: u32 = 4;
    const UDIAG_SHOW_ICONS: u32 = 8;
    const UDIAG_SHOW_MEMINFO: u32 = 0x20;
    // SAFETY: a netlink socket we own.
    let s = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
    if s < 0 {
        bail!("sock_diag: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fresh fd.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    #[repr(C)]
    struct Req {
        nlh: libc::nlmsghdr,
        family: u8,
        protocol: u8,
        pad: u16,
        states: u32,
        ino: u32,
        show: u32,
        cookie: [u32; 2],
    }
    let req = Req {
        nlh: libc::nlmsghdr {
            nlmsg_len: std::mem::size_of::<Req>() as u32,
            nlmsg_type: SOCK_DIAG_BY_FAMILY,
            nlmsg_flags: (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        family: libc::AF_UNIX as u8,
        protocol: 0,
        pad: 0,
        states: !0,
        ino: 0,
        show: UDIAG_SHOW_NAME | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS | UDIAG_SHOW_MEMINFO,
        cookie: [!0, !0],
    };
    // SAFETY: sending a plain-data request.
    if unsafe { libc::send(s.as_raw_fd(), &req as *const Req as *const libc::c_void, std::mem::size_of::<Req>(), 0) } < 0 {
        bail!("sock_diag: {}", std::io::Error::last_os_error());
    }
    let mut out = HashMap::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        // SAFETY: receiving into our buffer.
        let n = unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if n <= 0 {
            bail!("sock_diag: {}", std::io::Error::last_os_error());
        }
        let mut off = 0usize;
        while off + 16 <= n as usize {
            let u32_at = |o: usize| u32::from_ne_bytes(buf[o..o + 4].try_into().unwrap());
            let len = u32_at(off) as usize;
            let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
            if ty == libc::NLMSG_DONE as u16 {
                return Ok(out);
            }
            if ty == libc::NLMSG_ERROR as u16 || len < 16 {
                bail!("sock_diag refused the request");
            }
            // unix_diag_msg: family u8, type u8, state u8, pad u8, ino u32, cookie [u32; 2]
            let m = off + 16;
            let mut d = Diag { kind: buf[m + 1] as i32, state: buf[m + 2], ..Default::default() };
            let ino = u32_at(m + 4) as u64;
            let mut a = m + 16;
            while a + 4 <= off + len {
                let alen = u16::from_ne_bytes(buf[a..a + 2].try_into().unwrap()) as usize;
                let aty = u16::from_ne_bytes(buf[a + 2..a + 4].try_into().unwrap());
                if alen < 4 {
                    break;
                }
                let data = &buf[a + 4..a + alen];
                match aty {
                    0 => {
                        // UNIX_DIAG_NAME: a path, or a NUL then an abstract name
                        d.name = if data.first() == Some(&0) {
                            SockAddr::Abstract(ByteBuf::from(data[1..].to_vec()))
                        } else {
                            let end = data.iter().position(|&c| c == 0).unwrap_or(data.len());
                            SockAddr::Path(String::from_utf8_lossy(&data[..end]).into_owned())
                        }
                    }
                    2 => d.peer = u32::from_ne_bytes(data[..4].try_into().unwrap()) as u64,
                    3 => d.pending = data.len() / 4,
                    // UNIX_DIAG_MEMINFO: SK_MEMINFO_WMEM_ALLOC, SK_MEMINFO_SNDBUF
                    5 if data.len() >= 16 => {
                        d.wmem = u32::from_ne_bytes(data[8..12].try_into().unwrap());
                        d.sndbuf = u32::from_ne_bytes(data[12..16].try_into().unwrap());
                    }
                    6 => d.shutdown = data.first().copied().unwrap_or(0),
                    _ => {}
                }
                a += (alen + 3) & !3;
            }
            out.insert(ino, d);
            off += (len + 3) & !3;
        }
    }
}

/// Sockets being captured: the kernel's table, and the job's sockets by inode.
#[derive(Default)]
pub struct Capture {
    pub table: HashMap<u64, Diag>,
    by_ino: HashMap<u64, u32>,
    peers: Vec<u64>,
}

impl Capture {
    pub fn new() -> Result<Capture> {
        Ok(Capture { table: diag_table()?, ..Default::default() })
    }

    /// The job's socket for inode `ino` (fd `fd` of process `host`), captured the first time. `job_inodes`
    /// are the inodes of every socket fd in the job. None: connected to something outside the job.
    pub fn socket(&mut self, job: &mut JobImage, job_inodes: &[u64], host: i32, fd: i32, ino: u64) -> Result<Option<u32>> {
        if let Some(&i) = self.by_ino.get(&ino) {
            return Ok(Some(i));
        }
        let Some(d) = self.table.get(&ino).cloned() else {
            let what = socket_family(host, fd);
            bail!("{what} sockets are not supported yet");
        };
        if d.peer != 0 && !job_inodes.contains(&d.peer) {
            return Ok(None);
        }
        if d.pending > 0 {
            bail!("a connection waits to be accepted on a listening unix socket: not supported yet (try again once the app has accepted it)");
        }
        let sock = grab(host, fd)?;
        let queue = peek_queue(sock.as_raw_fd(), d.kind)?;
        if d.kind != libc::SOCK_STREAM
            && let Some(p) = self.table.get(&d.peer) {
                whole_queue(&queue, d.kind, p)?;
            }
        if d.kind == libc::SOCK_DGRAM && d.peer == 0 && !queue.is_empty() {
            bail!("an unconnected datagram socket holds messages: not supported yet (try again once the app has read them)");
        }
        let get = |opt| getsockopt_int(sock.as_raw_fd(), opt).max(0) as u32;
        job.sockets.push(SocketImage {
            kind: d.kind,
            local: d.name.clone(),
            peer: None,
            listening: d.state == TCP_LISTEN,
            queue,
            sndbuf: get(libc::SO_SNDBUF),
            rcvbuf: get(libc::SO_RCVBUF),
            shutdown: d.shutdown,
        });
        let i = (job.sockets.len() - 1) as u32;
        self.by_ino.insert(ino, i);
        self.peers.push(d.peer);
        Ok(Some(i))
    }

    /// Link every socket to its peer's index, once all are captured.
    pub fn link(&self, job: &mut JobImage) {
        for (i, peer) in self.peers.iter().enumerate() {
            job.sockets[i].peer = self.by_ino.get(peer).copied();
        }
    }
}

fn socket_family(host: i32, fd: i32) -> &'static str {
    let Ok(s) = grab(host, fd) else { return "these" };
    match (getsockopt_int(s.as_raw_fd(), libc::SO_DOMAIN), getsockopt_int(s.as_raw_fd(), libc::SO_TYPE)) {
        (libc::AF_INET | libc::AF_INET6, libc::SOCK_STREAM) => "TCP",
        (libc::AF_INET | libc::AF_INET6, libc::SOCK_DGRAM) => "UDP",
        (libc::AF_NETLINK, _) => "netlink",
        (libc::AF_PACKET, _) => "packet",
        _ => "these",
    }
}

fn getsockopt_int(fd: RawFd, opt: i32) -> i32 {
    let mut v: i32 = 0;
    let mut len = 4u32;
    // SAFETY: v and len are valid out-parameters.
    if unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, &mut v as *mut i32 as *mut libc::c_void, &mut len) } < 0 {
        return -1;
    }
    v
}

fn setsockopt_int(fd: RawFd, opt: i32, v: i32) -> Result<()> {
    // SAFETY: v is a valid int option value.
    if unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, opt, &v as *const i32 as *const libc::c_void, 4) } < 0 {
        bail!("setsockopt {opt}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Bounds of a receive queue the supervisor reads: a queue larger, or one that does not come to an end in time,
/// is refused rather than read on (a kernel that did not move the peek offset would repeat one message for ever).
const MAX_QUEUE_BYTES: usize = 256 << 20;
const MAX_QUEUE_MESSAGES: usize = 1 << 20;
const MAX_QUEUE_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// The receive queue, left in place: MSG_PEEK from a moving peek offset. One entry per message (datagram,
/// seqpacket), empty ones included, or all bytes in one entry (stream).
///
/// A message and the end of a seqpacket queue whose peer shut down both read as 0 bytes; while SO_PASSCRED is on
/// each message carries credentials and the end does not, so it is turned on for the moment (the app never sees
/// it: its threads are parked). Credentials or fds the app's own messages carry are refused, as before.
fn peek_queue(fd: RawFd, kind: i32) -> Result<Vec<ByteBuf>> {
    let old = getsockopt_int(fd, libc::SO_PEEK_OFF);
    setsockopt_int(fd, libc::SO_PEEK_OFF, 0)?;
    let marked = kind != libc::SOCK_STREAM && getsockopt_int(fd, libc::SO_PASSCRED) == 0;
    if marked
        && let Err(e) = setsockopt_int(fd, libc::SO_PASSCRED, 1) {
            let _ = setsockopt_int(fd, libc::SO_PEEK_OFF, old);
            return Err(e);
        }
    let r = peek_messages(fd, kind, marked);
    if marked {
        let _ = setsockopt_int(fd, libc::SO_PASSCRED, 0);
    }
    let _ = setsockopt_int(fd, libc::SO_PEEK_OFF, old);
    r
}

fn peek_messages(fd: RawFd, kind: i32, marked: bool) -> Result<Vec<ByteBuf>> {
    let mut out: Vec<ByteBuf> = vec![];
    let mut buf = vec![0u8; 1 << 20];
    let (mut bytes, start) = (0usize, std::time::Instant::now());
    loop {
        if bytes > MAX_QUEUE_BYTES || out.len() > MAX_QUEUE_MESSAGES || start.elapsed() > MAX_QUEUE_TIME {
            bail!(
                "the receive queue of a unix socket does not come to an end (over {} messages, {bytes} bytes read in {:.1} s): not supported",
                out.len(),
                start.elapsed().as_secs_f64()
            );
        }
        let mut cbuf = [0u64; 64];
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() };
        // SAFETY: msghdr is plain data, pointers valid for the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = std::mem::size_of_val(&cbuf);
        // SAFETY: peeking into our buffers.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::EAGAIN) { Ok(out) } else { Err(anyhow!("peeking a socket queue: {e}")) };
        }
        let (fds, creds) = control(&msg);
        if fds || (creds && !marked) || msg.msg_flags & libc::MSG_CTRUNC != 0 {
            bail!("fds or credentials in flight on a unix socket: not supported yet (try again once the peer has received them)");
        }
        if msg.msg_flags & libc::MSG_TRUNC != 0 {
            bail!("a message in flight is larger than 1 MiB");
        }
        let n = n as usize;
        if kind == libc::SOCK_STREAM {
            if n == 0 {
                return Ok(out);
            }
            match out.last_mut() {
                Some(b) => b.extend_from_slice(&buf[..n]),
                None => out.push(ByteBuf::from(buf[..n].to_vec())),
            }
        } else {
            // No credentials: the end of a seqpacket queue whose peer shut down, not a message.
            if marked && !creds {
                return Ok(out);
            }
            out.push(ByteBuf::from(buf[..n].to_vec()));
        }
        bytes += n;
    }
}

/// Whether `queue` (peeked from a socket whose peer `peer` sent every message in it) is all of it. The kernel hides
/// an empty message already peeked (by the app, or by an earlier checkpoint the job went on from) from any later peek
/// at an offset; but every queued message is charged to its sender, so the same messages sent again here, on a pair
/// of our own, must be charged exactly as much as the peer's are.
fn whole_queue(queue: &[ByteBuf], kind: i32, peer: &Diag) -> Result<()> {
    if peer.wmem == 0 && queue.is_empty() {
        return Ok(());
    }
    let hidden = || anyhow!("a unix socket holds messages a peek cannot show (an empty message peeked before): not supported yet (try again once the app has read them)");
    let mut sv = [0i32; 2];
    // SAFETY: socketpair into a two-int array.
    if unsafe { libc::socketpair(libc::AF_UNIX, kind | libc::SOCK_CLOEXEC, 0, sv.as_mut_ptr()) } < 0 {
        bail!("socketpair: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds.
    let (a, _b) = unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
    let room = (peer.sndbuf.max(queue.iter().map(|m| m.len() as u32 + 4096).sum::<u32>()) / 2 + 1) as i32;
    if setsockopt_int(a.as_raw_fd(), libc::SO_SNDBUFFORCE, room).is_err() {
        setsockopt_int(a.as_raw_fd(), libc::SO_SNDBUF, room)?;
    }
    for m in queue {
        // SAFETY: sending from our buffer.
        let r = unsafe { libc::send(a.as_raw_fd(), m.as_ptr() as *const libc::c_void, m.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if r != m.len() as isize {
            bail!("checking a unix socket's queue is whole: {}", std::io::Error::last_os_error());
        }
    }
    let mut charged: i32 = 0;
    // SAFETY: SIOCOUTQ writes an int.
    if unsafe { libc::ioctl(a.as_raw_fd(), libc::TIOCOUTQ, &mut charged) } < 0 {
        bail!("checking a unix socket's queue is whole: {}", std::io::Error::last_os_error());
    }
    if charged as u32 != peer.wmem {
        return Err(hidden());
    }
    Ok(())
}

/// What the control messages of a peeked message hold: fds (closed here: a peek gives the supervisor copies), and
/// credentials.
fn control(msg: &libc::msghdr) -> (bool, bool) {
    let (mut fds, mut creds) = (false, false);
    // SAFETY: walking the control buffer the kernel filled, with the libc macros that bound every step.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_CREDENTIALS {
                creds = true;
            } else {
                fds = true;
                // SCM_RIGHTS and SCM_PIDFD (4) give the receiver fds.
                if (*c).cmsg_level == libc::SOL_SOCKET && ((*c).cmsg_type == libc::SCM_RIGHTS || (*c).cmsg_type == 4) {
                    let data = libc::CMSG_DATA(c) as *const i32;
                    let n = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                    for i in 0..n {
                        libc::close(std::ptr::read_unaligned(data.add(i)));
                    }
                }
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    (fds, creds)
}

// ---- restore ---------------------------------------------------------------------------------------------------

fn sockaddr(a: &SockAddr) -> Option<(libc::sockaddr_un, u32)> {
    // SAFETY: sockaddr_un is plain data.
    let mut s: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    s.sun_family = libc::AF_UNIX as u16;
    let bytes: Vec<u8> = match a {
        SockAddr::Unnamed => return None,
        SockAddr::Path(p) => p.as_bytes().to_vec(),
        SockAddr::Abstract(n) => std::iter::once(0u8).chain(n.iter().copied()).collect(),
    };
    for (i, b) in bytes.iter().take(s.sun_path.len() - 1).enumerate() {
        s.sun_path[i] = *b as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len().min(s.sun_path.len() - 1) + matches!(a, SockAddr::Path(_)) as usize;
    Some((s, len as u32))
}

fn new_socket(kind: i32) -> Result<OwnedFd> {
    // SAFETY: socket(2).
    let fd = unsafe { libc::socket(libc::AF_UNIX, kind | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether something listens on (or is bound to) the unix socket at `a`: a live socket is not stale.
fn in_use(a: &SockAddr) -> bool {
    let Some((addr, len)) = sockaddr(a) else { return false };
    [libc::SOCK_STREAM, libc::SOCK_SEQPACKET, libc::SOCK_DGRAM].iter().any(|&kind| {
        let Ok(fd) = new_socket(kind | libc::SOCK_NONBLOCK) else { return false };
        // SAFETY: addr is a valid sockaddr_un of length len.
        let r = unsafe { libc::connect(fd.as_raw_fd(), &addr as *const _ as *const libc::sockaddr, len) };
        // Refused (nobody there) or of another type: not this one.
        r == 0 || !matches!(std::io::Error::last_os_error().raw_os_error(), Some(libc::ECONNREFUSED | libc::EPROTOTYPE | libc::ENOENT))
    })
}

/// Remove the socket file at `path`, left by the checkpointed job (or its earlier life), which is in a restored
/// bind's way. Only a stale socket: never a symlink (not followed), any other file, or a socket in use.
fn remove_stale_socket(path: &str) {
    if in_use(&SockAddr::Path(path.to_string())) {
        return;
    }
    let p = std::path::Path::new(path);
    let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else { return };
    let dir = if dir.as_os_str().is_empty() { std::path::Path::new(".") } else { dir };
    let Ok(d) = nix::fcntl::open(dir, nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty()) else {
        return;
    };
    let is_socket = nix::sys::stat::fstatat(&d, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFSOCK);
    if is_socket {
        let _ = nix::unistd::unlinkat(&d, name, nix::unistd::UnlinkatFlags::NoRemoveDir);
    }
}

fn bind(fd: &OwnedFd, a: &SockAddr) -> Result<()> {
    let Some((addr, len)) = sockaddr(a) else { return Ok(()) };
    if let SockAddr::Path(p) = a {
        remove_stale_socket(p);
    }
    // SAFETY: addr is a valid sockaddr_un of length len.
    if unsafe { libc::bind(fd.as_raw_fd(), &addr as *const _ as *const libc::sockaddr, len) } < 0 {
        bail!("binding a unix socket to {a:?}: {} (is the original job still running?)", std::io::Error::last_os_error());
    }
    Ok(())
}

fn connect(fd: &OwnedFd, a: &SockAddr) -> Result<()> {
    let (addr, len) = sockaddr(a).ok_or_else(|| anyhow!("connecting to an unnamed socket"))?;
    // SAFETY: addr is a valid sockaddr_un of length len.
    if unsafe { libc::connect(fd.as_raw_fd(), &addr as *const _ as *const libc::sockaddr, len) } < 0 {
        bail!("connecting a unix socket to {a:?}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn listen(fd: &OwnedFd) -> Result<()> {
    // SAFETY: listen(2).
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
        bail!("listen: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn accept(fd: &OwnedFd) -> Result<OwnedFd> {
    // SAFETY: accept4(2) without addresses.
    let c = unsafe { libc::accept4(fd.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
    if c < 0 {
        bail!("accept: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(c) })
}

/// Make the job's sockets again, connected and with their queues refilled; one fd per `job.sockets` entry.
/// `binders`: the credentials each socket (by index) is bound with (`creds::socket_openers`), so its file is made
/// where, and owned by whom, the job's own bind made it.
pub fn restore(job: &JobImage, binders: &HashMap<u32, Option<FsCreds>>) -> Result<Vec<OwnedFd>> {
    let bind_as = |i: usize, fd: &OwnedFd, a: &SockAddr| crate::resources::creds::as_user(binders.get(&(i as u32)).cloned().flatten().as_ref(), || bind(fd, a));
    let n = job.sockets.len();
    let mut made: Vec<Option<OwnedFd>> = (0..n).map(|_| None).collect();
    // Listeners and unconnected sockets first: connections go through the listeners, which keeps addresses.
    for (i, s) in job.sockets.iter().enumerate() {
        if s.peer.is_none() {
            let fd = new_socket(s.kind)?;
            bind_as(i, &fd, &s.local)?;
            if s.listening {
                listen(&fd)?;
            }
            made[i] = Some(fd);
        }
    }
    for (i, s) in job.sockets.iter().enumerate() {
        let Some(j) = s.peer.map(|p| p as usize) else { continue };
        if made[i].is_some() {
            continue;
        }
        let p = &job.sockets[j];
        if p.peer != Some(i as u32) {
            // A datagram socket connected to a peer that is not connected back.
            let fd = new_socket(s.kind)?;
            bind_as(i, &fd, &s.local)?;
            if made[j].is_none() {
                let pfd = new_socket(p.kind)?;
                bind_as(j, &pfd, &p.local)?;
                made[j] = Some(pfd);
            }
            connect(&fd, &p.local)?;
            made[i] = Some(fd);
            continue;
        }
        let (a, b) = pair(job, &made, s, p, &bind_as)?;
        made[i] = Some(a);
        made[j] = Some(b);
    }
    let made: Vec<OwnedFd> = made.into_iter().map(|m| m.unwrap()).collect();
    for (i, s) in job.sockets.iter().enumerate() {
        let fd = made[i].as_raw_fd();
        if s.sndbuf > 0 {
            let _ = setsockopt_int(fd, libc::SO_SNDBUF, (s.sndbuf / 2) as i32);
        }
        if s.rcvbuf > 0 {
            let _ = setsockopt_int(fd, libc::SO_RCVBUF, (s.rcvbuf / 2) as i32);
        }
    }
    // Refill each receive queue by sending from its peer.
    for (i, s) in job.sockets.iter().enumerate() {
        if s.queue.is_empty() {
            continue;
        }
        let from = s.peer.ok_or_else(|| anyhow!("socket {i} holds data but has no peer"))? as usize;
        for m in &s.queue {
            // SAFETY: sending from our buffer.
            let r = unsafe { libc::send(made[from].as_raw_fd(), m.as_ptr() as *const libc::c_void, m.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
            if r != m.len() as isize {
                bail!("refilling a unix socket queue: {}", std::io::Error::last_os_error());
            }
        }
    }
    for (i, s) in job.sockets.iter().enumerate() {
        let how = match s.shutdown & 3 {
            1 => libc::SHUT_RD,
            2 => libc::SHUT_WR,
            3 => libc::SHUT_RDWR,
            _ => continue,
        };
        // SAFETY: shutdown(2) on our socket.
        unsafe { libc::shutdown(made[i].as_raw_fd(), how) };
    }
    Ok(made)
}

/// Two sockets connected to each other, `s` first. A named side is made by accepting on a listener (the job's
/// own, made already, or one made for the moment), so both ends show the same addresses as before.
fn pair(job: &JobImage, made: &[Option<OwnedFd>], s: &SocketImage, p: &SocketImage, bind_as: &dyn Fn(usize, &OwnedFd, &SockAddr) -> Result<()>) -> Result<(OwnedFd, OwnedFd)> {
    let (server, client, swap) = match (&s.local, &p.local) {
        (SockAddr::Unnamed, SockAddr::Unnamed) => {
            let mut sv = [0i32; 2];
            // SAFETY: socketpair into a two-int array.
            if unsafe { libc::socketpair(libc::AF_UNIX, s.kind | libc::SOCK_CLOEXEC, 0, sv.as_mut_ptr()) } < 0 {
                bail!("socketpair: {}", std::io::Error::last_os_error());
            }
            // SAFETY: fresh fds.
            return Ok(unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) });
        }
        (SockAddr::Unnamed, _) => (p, s, true),
        _ => (s, p, false),
    };
    let own = job.sockets.iter().position(|x| x.listening && x.local == server.local).and_then(|i| made[i].as_ref());
    let temporary;
    let listener = match own {
        Some(l) => l,
        None => {
            temporary = new_socket(server.kind)?;
            let si = job.sockets.iter().position(|x| std::ptr::eq(x, server)).unwrap_or(usize::MAX);
            bind_as(si, &temporary, &server.local)?;
            listen(&temporary)?;
            &temporary
        }
    };
    let c = new_socket(client.kind)?;
    let ci = job.sockets.iter().position(|x| std::ptr::eq(x, client)).unwrap_or(usize::MAX);
    bind_as(ci, &c, &client.local)?;
    connect(&c, &server.local)?;
    let srv = accept(listener)?;
    Ok(if swap { (c, srv) } else { (srv, c) })
}
