//! TCP and UDP sockets, IPv4 and IPv6. Bound and listening sockets are bound again to the same address with the
//! options the app set. An established TCP connection is read and made again with TCP_REPAIR (sequence numbers,
//! queues, windows, options), which needs CAP_NET_ADMIN: always for connections between processes of the job,
//! and for connections to peers outside it when the checkpoint asks for `--tcp-established`. Otherwise a
//! connection to an outside peer comes back reset, as if the network had dropped it: the app sees ECONNRESET and
//! reconnects. While a connection is read, a socket filter that drops every packet keeps the peer from adding
//! to it (CRIU blocks the network with netfilter rules for the same reason); a job that ends (`--kill`) leaves
//! its sockets in repair mode, so closing them sends the peer nothing.
//!
//! Datagrams waiting in a UDP socket are not kept: UDP may lose them anyway.

use crate::os::grab;
use anyhow::{Result, anyhow, bail};
use serde_bytes::ByteBuf;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use vos::image::{InetSocket, InetState, JobImage, TcpConnection};

const TCP_REPAIR: i32 = 19;
const TCP_REPAIR_QUEUE: i32 = 20;
const TCP_QUEUE_SEQ: i32 = 21;
const TCP_REPAIR_OPTIONS: i32 = 22;
const TCP_TIMESTAMP: i32 = 24;
const TCP_REPAIR_WINDOW: i32 = 29;
const TCP_RECV_QUEUE: i32 = 1;
const TCP_SEND_QUEUE: i32 = 2;
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;
const SIOCOUTQNSD: libc::c_ulong = 0x894B;
const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE: u8 = 7;
const TCP_LISTEN: u8 = 10;
/// SO_LINGER is a struct; it travels as one int: the linger time when on, -1 when off.
const LINGER_OFF: i32 = -1;

/// Options kept across a restore (the image's list, so a restore refuses others).
const OPTIONS: &[(i32, i32)] = vos::image::INET_OPTIONS;

// ---- small socket helpers ----------------------------------------------------------------------------------------

fn get_int(fd: RawFd, level: i32, opt: i32) -> Option<i32> {
    if (level, opt) == (libc::SOL_SOCKET, libc::SO_LINGER) {
        let mut l = libc::linger { l_onoff: 0, l_linger: 0 };
        let mut len = std::mem::size_of::<libc::linger>() as u32;
        // SAFETY: l and len are valid out-parameters.
        let r = unsafe { libc::getsockopt(fd, level, opt, &mut l as *mut _ as *mut libc::c_void, &mut len) };
        return (r == 0).then_some(if l.l_onoff != 0 { l.l_linger } else { LINGER_OFF });
    }
    let mut v: i32 = 0;
    let mut len = 4u32;
    // SAFETY: v and len are valid out-parameters.
    let r = unsafe { libc::getsockopt(fd, level, opt, &mut v as *mut i32 as *mut libc::c_void, &mut len) };
    (r == 0).then_some(v)
}

fn set_raw<T>(fd: RawFd, level: i32, opt: i32, v: &T, what: &str) -> Result<()> {
    // SAFETY: v points to a live value of its own size.
    if unsafe { libc::setsockopt(fd, level, opt, v as *const T as *const libc::c_void, std::mem::size_of::<T>() as u32) } < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn set_int(fd: RawFd, level: i32, opt: i32, v: i32) -> Result<()> {
    if (level, opt) == (libc::SOL_SOCKET, libc::SO_LINGER) {
        let l = libc::linger { l_onoff: (v != LINGER_OFF) as i32, l_linger: v.max(0) };
        return set_raw(fd, level, opt, &l, "SO_LINGER");
    }
    set_raw(fd, level, opt, &v, &format!("setsockopt({level}, {opt})"))
}

fn tcp(fd: RawFd, opt: i32, v: i32, what: &str) -> Result<()> {
    set_raw(fd, libc::IPPROTO_TCP, opt, &v, what)
}

fn to_std(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says it is a sockaddr_in.
            let a = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)), u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says it is a sockaddr_in6.
            let a = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(a.sin6_port), a.sin6_flowinfo, a.sin6_scope_id)))
        }
        _ => None,
    }
}

fn from_std(a: &SocketAddr) -> (libc::sockaddr_storage, u32) {
    // SAFETY: sockaddr_storage is plain data.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v) => {
            // SAFETY: sockaddr_storage is large enough for a sockaddr_in.
            let s = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            s.sin_family = libc::AF_INET as u16;
            s.sin_port = v.port().to_be();
            s.sin_addr.s_addr = u32::from(*v.ip()).to_be();
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v) => {
            // SAFETY: sockaddr_storage is large enough for a sockaddr_in6.
            let s = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            s.sin6_family = libc::AF_INET6 as u16;
            s.sin6_port = v.port().to_be();
            s.sin6_addr.s6_addr = v.ip().octets();
            s.sin6_flowinfo = v.flowinfo();
            s.sin6_scope_id = v.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as u32)
}

/// The socket's own address (`peer` false) or its peer's; None when unbound or unconnected.
fn address(fd: RawFd, peer: bool) -> Option<SocketAddr> {
    // SAFETY: sockaddr_storage is plain data; ss and len are valid out-parameters.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as u32;
    let p = &mut ss as *mut _ as *mut libc::sockaddr;
    // SAFETY: as above.
    let r = unsafe { if peer { libc::getpeername(fd, p, &mut len) } else { libc::getsockname(fd, p, &mut len) } };
    (r == 0).then(|| to_std(&ss)).flatten()
}

fn ioctl_int(fd: RawFd, req: libc::c_ulong) -> Result<usize> {
    let mut n: i32 = 0;
    // SAFETY: the request writes one int.
    if unsafe { libc::ioctl(fd, req, &mut n) } < 0 {
        bail!("ioctl {req:#x}: {}", std::io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// TCP_INFO's first bytes: state, options, window scales; the accept queue (unacked) and backlog (sacked).
struct TcpInfo {
    state: u8,
    options: u8,
    snd_wscale: u8,
    rcv_wscale: u8,
    unacked: u32,
    sacked: u32,
}

fn tcp_info(fd: RawFd) -> Result<TcpInfo> {
    let mut b = [0u8; 104];
    let mut len = b.len() as u32;
    // SAFETY: b and len are valid out-parameters.
    if unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, b.as_mut_ptr() as *mut libc::c_void, &mut len) } < 0 {
        bail!("TCP_INFO: {}", std::io::Error::last_os_error());
    }
    let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap());
    Ok(TcpInfo { state: b[0], options: b[5], snd_wscale: b[6] & 15, rcv_wscale: b[6] >> 4, unacked: u32_at(24), sacked: u32_at(28) })
}

fn state_name(s: u8) -> &'static str {
    ["?", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT", "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING"]
        .get(s as usize)
        .copied()
        .unwrap_or("?")
}

fn new_socket(family: i32, kind: i32) -> Result<OwnedFd> {
    // SAFETY: socket(2).
    let fd = unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bind(fd: &OwnedFd, a: &SocketAddr) -> Result<()> {
    let (ss, len) = from_std(a);
    // SAFETY: ss holds a sockaddr of length len.
    if unsafe { libc::bind(fd.as_raw_fd(), &ss as *const _ as *const libc::sockaddr, len) } < 0 {
        let e = std::io::Error::last_os_error();
        let hint = match e.raw_os_error() {
            Some(libc::EADDRINUSE) => " (is the original job still running?)",
            Some(libc::EADDRNOTAVAIL) => " (this host has no such address: give it one, or use --map-addr)",
            _ => "",
        };
        bail!("binding to {a}: {e}{hint}");
    }
    Ok(())
}

fn connect(fd: &OwnedFd, a: &SocketAddr) -> Result<()> {
    let (ss, len) = from_std(a);
    // SAFETY: ss holds a sockaddr of length len.
    if unsafe { libc::connect(fd.as_raw_fd(), &ss as *const _ as *const libc::sockaddr, len) } < 0 {
        bail!("connecting to {a}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A socket filter that drops every packet: the peer's segments wait (it retransmits them) while a connection is
/// read, and reach the restored one.
fn block(fd: RawFd) -> Result<()> {
    let mut len = 0u32;
    // SAFETY: asking only for the length of an attached filter (SO_GET_FILTER with no room).
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, std::ptr::null_mut(), &mut len) };
    if r == 0 && len > 0 {
        bail!("the app attached a socket filter to this TCP connection: not supported yet");
    }
    let drop_all = [libc::sock_filter { code: (libc::BPF_RET | libc::BPF_K) as u16, jt: 0, jf: 0, k: 0 }];
    let prog = libc::sock_fprog { len: 1, filter: drop_all.as_ptr() as *mut libc::sock_filter };
    set_raw(fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &prog, "blocking the connection")
}

// ---- checkpoint --------------------------------------------------------------------------------------------------

/// Connections read in repair mode. Dropped, they go back to normal; `keep` leaves them in repair mode for a job
/// that ends, so closing them sends nothing.
#[derive(Default)]
pub struct Held {
    /// Each socket with the app's SO_REUSEADDR, which leaving repair mode resets.
    fds: Vec<(OwnedFd, i32)>,
    kept: bool,
}

impl Held {
    pub fn keep(&mut self) {
        self.kept = true;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        for (fd, reuse) in &self.fds {
            let _ = tcp(fd.as_raw_fd(), TCP_REPAIR, 0, "TCP_REPAIR off");
            let _ = set_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, *reuse);
            let _ = set_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_DETACH_FILTER, 0);
        }
    }
}

/// TCP and UDP sockets being captured.
pub struct Capture {
    by_ino: HashMap<u64, u32>,
    /// (local, peer) of every connected TCP socket of the job: a connection whose reverse is here is the job's.
    ends: Vec<(SocketAddr, SocketAddr)>,
    /// Keep connections to outside peers (`--tcp-established`).
    established: bool,
    pub held: Held,
}

impl Capture {
    /// `sockets`: every socket fd of the job, as (host pid, fd).
    pub fn new(sockets: &[(i32, i32)], established: bool) -> Capture {
        let mut ends = vec![];
        for &(host, fd) in sockets {
            let Ok(s) = grab(host, fd) else { continue };
            let s = s.as_raw_fd();
            if get_int(s, libc::SOL_SOCKET, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
                && let (Some(l), Some(p)) = (address(s, false), address(s, true)) {
                    ends.push((l, p));
                }
        }
        Capture { by_ino: HashMap::new(), ends, established, held: Held::default() }
    }

    /// The job's TCP or UDP socket `fd` of process `host` (inode `ino`), captured once; None when it is not one.
    pub fn socket(&mut self, job: &mut JobImage, host: i32, fd: i32, ino: u64) -> Result<Option<u32>> {
        if let Some(&i) = self.by_ino.get(&ino) {
            return Ok(Some(i));
        }
        let sock = grab(host, fd)?;
        let s = sock.as_raw_fd();
        let family = get_int(s, libc::SOL_SOCKET, libc::SO_DOMAIN).unwrap_or(-1);
        let kind = get_int(s, libc::SOL_SOCKET, libc::SO_TYPE).unwrap_or(-1);
        if family != libc::AF_INET && family != libc::AF_INET6 {
            return Ok(None);
        }
        let protocol = get_int(s, libc::SOL_SOCKET, libc::SO_PROTOCOL).unwrap_or(-1);
        let what = match (kind, protocol) {
            (libc::SOCK_STREAM, libc::IPPROTO_TCP) => "TCP",
            (libc::SOCK_DGRAM, libc::IPPROTO_UDP) => "UDP",
            (libc::SOCK_RAW, _) => bail!("a raw IP socket is not supported yet"),
            _ => bail!("an IP socket of type {kind}, protocol {protocol} is not supported yet"),
        };
        let (local, peer) = (address(s, false), address(s, true));
        // Read before repair mode, which changes SO_REUSEADDR.
        let options = changed_options(s, family, kind, kind == libc::SOCK_STREAM && peer.is_some())?;
        let state = if what == "UDP" {
            InetState::Open
        } else {
            let info = tcp_info(s)?;
            match info.state {
                TCP_CLOSE => InetState::Open,
                TCP_LISTEN if info.unacked > 0 && self.established => {
                    bail!("TCP listener {}: {} connections wait to be accepted: not supported yet (try again once the app has accepted them)", fmt(&local), info.unacked)
                }
                TCP_LISTEN => InetState::Listening { backlog: info.sacked },
                st => {
                    let (l, p) = (local.unwrap(), peer.ok_or_else(|| anyhow!("TCP socket in state {} without a peer", state_name(st)))?);
                    let inside = self.ends.contains(&(p, l));
                    if !inside && !self.established {
                        InetState::Reset
                    } else if st != TCP_ESTABLISHED {
                        bail!("TCP connection {l} -> {p} in state {}: only established connections can be kept yet", state_name(st))
                    } else {
                        let c = self.connection(sock.try_clone()?, &info).map_err(|e| anyhow!("TCP connection {l} -> {p}: {e}"))?;
                        InetState::Connected(c)
                    }
                }
            }
        };
        let local = local.filter(|a| a.port() != 0 || !a.ip().is_unspecified());
        job.inet.push(InetSocket { family, kind, local: local.map(|a| a.to_string()), peer: peer.map(|a| a.to_string()), state, options });
        let i = (job.inet.len() - 1) as u32;
        self.by_ino.insert(ino, i);
        Ok(Some(i))
    }

    /// Read an established connection with TCP_REPAIR; the socket stays blocked and in repair mode (`held`).
    fn connection(&mut self, sock: OwnedFd, info: &TcpInfo) -> Result<TcpConnection> {
        let s = sock.as_raw_fd();
        let reuse = get_int(s, libc::SOL_SOCKET, libc::SO_REUSEADDR).unwrap_or(0);
        block(s)?;
        self.held.fds.push((sock, reuse));
        tcp(s, TCP_REPAIR, 1, "TCP_REPAIR (needs root: CAP_NET_ADMIN)")?;
        let inq = ioctl_int(s, libc::FIONREAD)?;
        let outq = ioctl_int(s, libc::TIOCOUTQ)?;
        let unsent = ioctl_int(s, SIOCOUTQNSD)?;
        let queue = |q: i32, len: usize| -> Result<(u32, ByteBuf)> {
            tcp(s, TCP_REPAIR_QUEUE, q, "TCP_REPAIR_QUEUE")?;
            let seq = get_int(s, libc::IPPROTO_TCP, TCP_QUEUE_SEQ).ok_or_else(|| anyhow!("TCP_QUEUE_SEQ: {}", std::io::Error::last_os_error()))?;
            let mut buf = vec![0u8; len];
            if len > 0 {
                // SAFETY: peeking into our buffer.
                let n = unsafe { libc::recv(s, buf.as_mut_ptr() as *mut libc::c_void, len, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
                if n != len as isize {
                    bail!("reading a queue of {len} bytes: {}", std::io::Error::last_os_error());
                }
            }
            Ok((seq as u32, ByteBuf::from(buf)))
        };
        let (recv_seq, recv_queue) = queue(TCP_RECV_QUEUE, inq)?;
        let (send_seq, send_queue) = queue(TCP_SEND_QUEUE, outq)?;
        let mut window = [0u32; 5];
        let mut len = std::mem::size_of_val(&window) as u32;
        // SAFETY: window and len are valid out-parameters (struct tcp_repair_window is five u32).
        if unsafe { libc::getsockopt(s, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW, window.as_mut_ptr() as *mut libc::c_void, &mut len) } < 0 {
            bail!("TCP_REPAIR_WINDOW: {}", std::io::Error::last_os_error());
        }
        Ok(TcpConnection {
            send_seq,
            recv_seq,
            send_queue,
            unsent: unsent.min(outq) as u32,
            recv_queue,
            mss: get_int(s, libc::IPPROTO_TCP, libc::TCP_MAXSEG).unwrap_or(1460) as u32,
            tcp_options: info.options,
            snd_wscale: info.snd_wscale,
            rcv_wscale: info.rcv_wscale,
            timestamp: get_int(s, libc::IPPROTO_TCP, TCP_TIMESTAMP).unwrap_or(0) as u32,
            window,
        })
    }
}

fn fmt(a: &Option<SocketAddr>) -> String {
    a.map_or("(unbound)".into(), |a| a.to_string())
}

/// The options of `s` that differ from a fresh socket's. Buffer sizes of a connection are the kernel's own
/// tuning unless the app set them; they are left to the kernel.
fn changed_options(s: RawFd, family: i32, kind: i32, connected: bool) -> Result<Vec<(i32, i32, i32)>> {
    let fresh = new_socket(family, kind)?;
    let mut out = vec![];
    for &(level, opt) in OPTIONS {
        if connected && level == libc::SOL_SOCKET && (opt == libc::SO_SNDBUF || opt == libc::SO_RCVBUF) {
            continue;
        }
        let applies = match level {
            libc::IPPROTO_IPV6 => family == libc::AF_INET6,
            libc::IPPROTO_IP => family == libc::AF_INET,
            libc::IPPROTO_TCP => kind == libc::SOCK_STREAM,
            _ => true,
        };
        if !applies {
            continue;
        }
        let (Some(v), Some(d)) = (get_int(s, level, opt), get_int(fresh.as_raw_fd(), level, opt)) else { continue };
        if v != d {
            out.push((level, opt, v));
        }
    }
    Ok(out)
}

// ---- restore -----------------------------------------------------------------------------------------------------

/// `vrun restore --map-addr OLD=NEW`: every address of the job at OLD (an IP, or IP:port) moves to NEW.
pub fn rebind(job: &mut JobImage, maps: &[(String, String)]) -> Result<()> {
    let mut parsed = vec![];
    for (old, new) in maps {
        let p = |s: &str| -> Result<Result<SocketAddr, IpAddr>> {
            if let Ok(a) = s.parse::<SocketAddr>() {
                return Ok(Ok(a));
            }
            s.parse::<IpAddr>().map(Err).map_err(|_| anyhow!("--map-addr {old}={new}: {s} is neither an IP address nor IP:port"))
        };
        parsed.push((p(old)?, p(new)?));
    }
    let map = |a: &mut Option<String>| {
        let Some(cur) = a.as_ref().and_then(|s| s.parse::<SocketAddr>().ok()) else { return };
        for (old, new) in &parsed {
            let to = match (old, new) {
                (Ok(o), Ok(n)) if *o == cur => *n,
                (Err(o), Err(n)) if *o == cur.ip() => SocketAddr::new(*n, cur.port()),
                (Err(o), Ok(n)) if *o == cur.ip() => *n,
                _ => continue,
            };
            *a = Some(to.to_string());
            return;
        }
    };
    for s in &mut job.inet {
        map(&mut s.local);
        map(&mut s.peer);
    }
    Ok(())
}

fn parse(a: &Option<String>) -> Result<Option<SocketAddr>> {
    a.as_ref().map(|s| s.parse::<SocketAddr>().map_err(|_| anyhow!("bad address {s} in the image"))).transpose()
}

/// Make the job's TCP and UDP sockets again; one fd per `job.inet` entry. Connections leave repair mode only
/// once all exist: leaving it sends the peer a window probe, and a peer not made yet would answer with a reset.
pub fn restore(job: &JobImage) -> Result<Vec<OwnedFd>> {
    // Connections first: once a listener answers, a client may go on at once on its kept connection.
    let mut order: Vec<usize> = (0..job.inet.len()).collect();
    order.sort_by_key(|&i| !matches!(job.inet[i].state, InetState::Connected(_)));
    let mut made: Vec<Option<OwnedFd>> = job.inet.iter().map(|_| None).collect();
    for i in order {
        let s = &job.inet[i];
        made[i] = Some(make(s).map_err(|e| anyhow!("{}: {e}", describe(s)))?);
    }
    let fds: Vec<OwnedFd> = made.into_iter().flatten().collect();
    for (s, fd) in job.inet.iter().zip(&fds) {
        if let InetState::Connected(c) = &s.state {
            let f = fd.as_raw_fd();
            tcp(f, TCP_REPAIR, 0, "TCP_REPAIR off").map_err(|e| anyhow!("{}: {e}", describe(s)))?;
            // Leaving repair mode resets SO_REUSEADDR.
            set_options(f, s).map_err(|e| anyhow!("{}: {e}", describe(s)))?;
            // Bytes the app had queued but the kernel had not sent yet go out as new data.
            send_all(f, &c.send_queue[c.send_queue.len() - c.unsent as usize..]).map_err(|e| anyhow!("{}: {e}", describe(s)))?;
        }
    }
    Ok(fds)
}

fn describe(s: &InetSocket) -> String {
    let kind = if s.kind == libc::SOCK_STREAM { "TCP" } else { "UDP" };
    match &s.peer {
        Some(p) => format!("{kind} connection {} -> {p}", s.local.as_deref().unwrap_or("?")),
        None => format!("{kind} socket {}", s.local.as_deref().unwrap_or("(unbound)")),
    }
}

fn make(s: &InetSocket) -> Result<OwnedFd> {
    let (local, peer) = (parse(&s.local)?, parse(&s.peer)?);
    if let InetState::Reset = s.state {
        return reset(s.family);
    }
    let fd = new_socket(s.family, s.kind)?;
    let f = fd.as_raw_fd();
    set_options(f, s)?;
    match &s.state {
        InetState::Open => {
            if let Some(l) = local {
                bind_reusing(&fd, &l, s)?;
            }
            if let Some(p) = peer {
                connect(&fd, &p)?;
            }
        }
        InetState::Listening { backlog } => {
            bind_reusing(&fd, &local.ok_or_else(|| anyhow!("a listener without an address"))?, s)?;
            // SAFETY: listen(2).
            if unsafe { libc::listen(f, (*backlog).max(1) as i32) } < 0 {
                bail!("listen: {}", std::io::Error::last_os_error());
            }
        }
        InetState::Connected(c) => {
            let (l, p) = (local.ok_or_else(|| anyhow!("no local address"))?, peer.ok_or_else(|| anyhow!("no peer"))?);
            repair(&fd, &l, &p, c)?;
        }
        InetState::Reset => unreachable!(),
    }
    Ok(fd)
}

fn set_options(f: RawFd, s: &InetSocket) -> Result<()> {
    for &(level, opt, v) in &s.options {
        // The kernel doubles the buffer sizes it is given.
        let v = if level == libc::SOL_SOCKET && (opt == libc::SO_SNDBUF || opt == libc::SO_RCVBUF) { v / 2 } else { v };
        set_int(f, level, opt, v)?;
    }
    Ok(())
}

/// Bind, reusing the address the way a restarted server does: connections of the job's earlier life may still
/// linger in TIME_WAIT there.
fn bind_reusing(fd: &OwnedFd, a: &SocketAddr, s: &InetSocket) -> Result<()> {
    let f = fd.as_raw_fd();
    let own = s.options.iter().find(|o| (o.0, o.1) == (libc::SOL_SOCKET, libc::SO_REUSEADDR)).map_or(0, |o| o.2);
    set_int(f, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    bind(fd, a)?;
    set_int(f, libc::SOL_SOCKET, libc::SO_REUSEADDR, own)
}

/// An established connection made again in repair mode: no handshake, the same sequence numbers, queues,
/// options and windows. It stays in repair mode.
fn repair(fd: &OwnedFd, local: &SocketAddr, peer: &SocketAddr, c: &TcpConnection) -> Result<()> {
    let f = fd.as_raw_fd();
    tcp(f, TCP_REPAIR, 1, "TCP_REPAIR (needs root: CAP_NET_ADMIN)")?;
    tcp(f, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE")?;
    tcp(f, TCP_QUEUE_SEQ, c.send_seq.wrapping_sub(c.send_queue.len() as u32) as i32, "TCP_QUEUE_SEQ")?;
    tcp(f, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, "TCP_REPAIR_QUEUE")?;
    tcp(f, TCP_QUEUE_SEQ, c.recv_seq.wrapping_sub(c.recv_queue.len() as u32) as i32, "TCP_QUEUE_SEQ")?;
    bind(fd, local)?;
    connect(fd, peer)?;
    let mut opts: Vec<[u32; 2]> = vec![[TCPOPT_MAXSEG, c.mss]];
    if c.tcp_options & TCPI_OPT_WSCALE != 0 {
        opts.push([TCPOPT_WINDOW, c.snd_wscale as u32 | (c.rcv_wscale as u32) << 16]);
    }
    if c.tcp_options & TCPI_OPT_SACK != 0 {
        opts.push([TCPOPT_SACK_PERM, 0]);
    }
    if c.tcp_options & TCPI_OPT_TIMESTAMPS != 0 {
        opts.push([TCPOPT_TIMESTAMP, 0]);
        tcp(f, TCP_TIMESTAMP, c.timestamp as i32, "TCP_TIMESTAMP")?;
    }
    // SAFETY: opts is an array of struct tcp_repair_opt (two u32 each).
    if unsafe { libc::setsockopt(f, libc::IPPROTO_TCP, TCP_REPAIR_OPTIONS, opts.as_ptr() as *const libc::c_void, (opts.len() * 8) as u32) } < 0 {
        bail!("TCP_REPAIR_OPTIONS: {}", std::io::Error::last_os_error());
    }
    let sent = c.send_queue.len() - c.unsent as usize;
    tcp(f, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, "TCP_REPAIR_QUEUE")?;
    send_all(f, &c.recv_queue)?;
    tcp(f, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE")?;
    send_all(f, &c.send_queue[..sent])?;
    set_raw(f, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW, &c.window, "TCP_REPAIR_WINDOW")
}

/// Send every byte, in pieces the kernel takes (a queue filled in repair mode takes one piece per call).
fn send_all(f: RawFd, mut b: &[u8]) -> Result<()> {
    let mut piece = 64 << 10;
    while !b.is_empty() {
        let n = piece.min(b.len());
        // SAFETY: sending from our buffer.
        let r = unsafe { libc::send(f, b.as_ptr() as *const libc::c_void, n, libc::MSG_NOSIGNAL) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOMEM) && piece > 4096 {
                piece /= 2;
                continue;
            }
            bail!("refilling a queue: {e}");
        }
        b = &b[r as usize..];
    }
    Ok(())
}

/// A TCP socket whose connection was reset: made on loopback and reset by its peer (SO_LINGER 0 then close).
fn reset(family: i32) -> Result<OwnedFd> {
    let lo: IpAddr = if family == libc::AF_INET6 { Ipv6Addr::LOCALHOST.into() } else { Ipv4Addr::LOCALHOST.into() };
    let l = new_socket(family, libc::SOCK_STREAM)?;
    bind(&l, &SocketAddr::new(lo, 0)).map_err(|e| anyhow!("a connection to an outside peer is restored reset, through loopback: {e}"))?;
    // SAFETY: listen(2).
    if unsafe { libc::listen(l.as_raw_fd(), 1) } < 0 {
        bail!("listen: {}", std::io::Error::last_os_error());
    }
    let c = new_socket(family, libc::SOCK_STREAM)?;
    connect(&c, &address(l.as_raw_fd(), false).ok_or_else(|| anyhow!("loopback listener without an address"))?)?;
    // SAFETY: accept4(2) without addresses.
    let a = unsafe { libc::accept4(l.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
    if a < 0 {
        bail!("accept: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fresh fd.
    let a = unsafe { OwnedFd::from_raw_fd(a) };
    set_int(a.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, 0)?;
    drop(a);
    Ok(c)
}
