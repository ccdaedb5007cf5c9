//! Attacks on `vrun serve` and `vrun migrate` from outside (root, test hosts in network namespaces): key files
//! others could read or guess, a packet capture of a migration, a wrong key, a client that says nothing useful,
//! slow and flooding connections, a peer holding the key that claims thousands of processes, an address the
//! destination does not allow, and accept failing for want of fds.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vos_tests::hosts::{Host, Net, keygen};
use vos_tests::*;

const PORT: u16 = 9000;
/// The protocol as `launcher/src/migration/channel.rs` speaks it, for the tests that play a peer of their own.
const MAGIC: &[u8; 8] = b"vOSmig2\n";
const NOISE: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
const KIND_BEGIN: u8 = 1;
const KIND_PRECOPY: u8 = 7;
const KIND_ACCEPTED: u8 = 11;

/// 32 random bytes, mode 0600, written by the test itself (so the attacks run against any vrun).
fn key(w: &Work, name: &str) -> PathBuf {
    let p = w.path(name);
    let mut k = [0u8; 32];
    std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut k).unwrap();
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&p).unwrap().write_all(&k).unwrap();
    p
}

fn key_bytes(p: &Path) -> [u8; 32] {
    std::fs::read(p).unwrap().try_into().unwrap()
}

/// counter_server under vrun on `host`, listening on PORT: the job and its name.
fn counter_on(host: &Host, w: &Work) -> (Running, String) {
    let prog = gcc("counter_server");
    let out = w.path("out.txt");
    let name = w.name("counter");
    let mut c = host.vrun();
    c.args(["--name", &name, "--dir"]).arg(&host.dir).arg("--").args([prog.to_str().unwrap(), &PORT.to_string()]);
    let job = spawn(c, &name, &out, &w.path("vrun.err"));
    wait_for(&out, "the server listening", Duration::from_secs(10), |s| s.contains("listening"));
    (job, name)
}

fn wait_log(h: &Host, what: &str, within: Duration) -> String {
    let t = Instant::now();
    loop {
        let log = h.serve_log();
        if log.contains(what) {
            return log;
        }
        assert!(t.elapsed() < within, "{what:?} never came in {}'s serve log:\n{log}", h.ns);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Threads and open fds of process `pid`.
fn threads_and_fds(pid: u32) -> Option<(usize, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let threads = status.lines().find_map(|l| l.strip_prefix("Threads:"))?.trim().parse().ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((threads, fds))
}

/// Samples `threads_and_fds(pid)` every 20 ms until dropped; `max()` is the most of each seen.
struct Sampler {
    stop: Arc<AtomicBool>,
    max: Arc<Mutex<(usize, usize)>>,
    t: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn new(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(Mutex::new((0, 0)));
        let (s, m) = (stop.clone(), max.clone());
        let t = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some((t, f)) = threads_and_fds(pid) {
                    let mut m = m.lock().unwrap();
                    *m = (m.0.max(t), m.1.max(f));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Sampler { stop, max, t: Some(t) }
    }

    fn max(&self) -> (usize, usize) {
        *self.max.lock().unwrap()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.t.take() {
            let _ = t.join();
        }
    }
}

// ---- Key files ----

#[test]
fn keys_others_could_read_or_guess_are_refused() {
    let w = Work::new("serve-keys");
    let serve = |args: &[&str]| {
        let mut c = vrun();
        c.args(["serve", "--listen", "127.0.0.1:0", "--dir"]).arg(w.path("jobs")).args(args);
        run_bounded(&w, c, None, Duration::from_secs(5))
    };
    serve(&[]).assert_refused("serve without a key", &["needs --key", "keygen"]);
    let write = |name: &str, bytes: &[u8], mode: u32| {
        let p = w.path(name);
        std::fs::write(&p, bytes).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
        p.display().to_string()
    };
    // The README's old way: `head -c 32 /dev/urandom > key` makes it 0644.
    let open = write("open", &[7; 32], 0o644);
    serve(&["--key", &open]).assert_refused("a 0644 key", &["chmod 600"]);
    let group = write("group", &[7; 32], 0o640);
    serve(&["--key", &group]).assert_refused("a 0640 key", &["chmod 600"]);
    let short = write("short", &[7; 16], 0o600);
    serve(&["--key", &short]).assert_refused("a 16-byte key", &["exactly 32"]);
    let long = write("long", &[7; 64], 0o600);
    serve(&["--key", &long]).assert_refused("a 64-byte key", &["exactly 32"]);
    let theirs = write("theirs", &[7; 32], 0o600);
    std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
    serve(&["--key", &theirs]).assert_refused("another user's key", &["belongs to uid 65534"]);
    serve(&["--key", w.s("missing").as_str()]).assert_refused("a missing key", &["No such file"]);
    serve(&["--key", w.dir.to_str().unwrap()]).assert_refused("a directory as key", &["not a regular file"]);
    // migrate checks its key before anything else.
    let mut c = vrun();
    c.args(["migrate", "nosuchjob", "--to", "127.0.0.1:9", "--key", &open]);
    run_bounded(&w, c, None, Duration::from_secs(5)).assert_refused("migrate with a 0644 key", &["chmod 600"]);
    // keygen: 32 bytes, mode 0600; never over an existing file, never through a symlink.
    let k = keygen(&w.path("k"));
    let m = std::fs::metadata(&k).unwrap();
    assert_eq!((std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777, m.len()), (0o600, 32));
    let first = std::fs::read(&k).unwrap();
    let (st, _, err) = run_vrun(&["keygen", k.to_str().unwrap()]);
    assert!(!st.success() && err.contains("exists already"), "keygen overwrote a key: {err}");
    assert_eq!(std::fs::read(&k).unwrap(), first, "the key changed");
    std::os::unix::fs::symlink(w.path("target"), w.path("link")).unwrap();
    let (st, _, err) = run_vrun(&["keygen", w.s("link").as_str()]);
    assert!(!st.success() && !w.path("target").exists(), "keygen wrote through a symlink: {err}");
    assert_ne!(std::fs::read(keygen(&w.path("k2"))).unwrap(), first, "two keys alike");
    // --insecure-no-key starts, and says so.
    let mut c = vrun();
    c.args(["serve", "--listen", "127.0.0.1:0", "--insecure-no-key", "--dir"]).arg(w.path("jobs"));
    let o = run_bounded(&w, c, None, Duration::from_secs(2));
    assert!(o.status.is_none() && o.stderr.contains("INSECURE"), "--insecure-no-key: {:?} {}", o.status, o.stderr);
}

// ---- What a packet capture shows ----

/// A capture of every frame through one interface (AF_PACKET), until `stop`.
struct Capture {
    fd: std::os::fd::OwnedFd,
    stop: Arc<AtomicBool>,
    t: Option<std::thread::JoinHandle<Vec<Vec<u8>>>>,
}

impl Capture {
    fn start(ifname: &str) -> Capture {
        use std::os::fd::{AsRawFd, FromRawFd};
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2); the fd is owned at once.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto as i32) };
        assert!(raw >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        // SAFETY: raw is a fresh fd of ours.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index > 0, "no interface {ifname}");
        // SAFETY: sockaddr_ll is plain data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        let size = 256i32 << 20;
        let timeout = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
        // SAFETY: binding and setting options with pointers to values of the sizes given.
        unsafe {
            assert_eq!(libc::bind(fd.as_raw_fd(), &sll as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_ll>() as u32), 0);
            libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &size as *const _ as *const libc::c_void, 4);
            libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout as *const _ as *const libc::c_void, std::mem::size_of::<libc::timeval>() as u32);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let rfd = fd.as_raw_fd();
        let t = std::thread::spawn(move || {
            let mut frames = vec![];
            let mut buf = vec![0u8; 256 << 10];
            loop {
                // SAFETY: receiving into our buffer.
                let n = unsafe { libc::recv(rfd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
                if n > 0 {
                    frames.push(buf[..n as usize].to_vec());
                } else if s.load(Ordering::Relaxed) {
                    return frames;
                }
            }
        });
        Capture { fd, stop, t: Some(t) }
    }

    /// The frames, and how many the kernel dropped.
    fn finish(mut self) -> (Vec<Vec<u8>>, u32) {
        use std::os::fd::AsRawFd;
        std::thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::Relaxed);
        let frames = self.t.take().unwrap().join().unwrap();
        let mut st = [0u32; 2];
        let mut len = 8u32;
        // SAFETY: struct tpacket_stats is two u32s.
        unsafe { libc::getsockopt(self.fd.as_raw_fd(), libc::SOL_PACKET, libc::PACKET_STATISTICS, st.as_mut_ptr() as *mut libc::c_void, &mut len) };
        (frames, st[1])
    }
}

/// One direction of a TCP connection: (source address, source port, destination address, destination port).
type Flow = ([u8; 4], u16, [u8; 4], u16);

/// The TCP streams in `frames` (IPv4 over Ethernet), each direction's payload put together by sequence number:
/// (source port, destination port, bytes, holes).
fn tcp_streams(frames: &[Vec<u8>]) -> Vec<(u16, u16, Vec<u8>, usize)> {
    // Each flow's segments: (sequence number, payload).
    let mut flows: std::collections::HashMap<Flow, Vec<(u32, Vec<u8>)>> = Default::default();
    for f in frames {
        if f.len() < 34 || f[12..14] != [8, 0] || f[23] != 6 {
            continue;
        }
        let ihl = ((f[14] & 15) as usize) * 4;
        let total = u16::from_be_bytes([f[16], f[17]]) as usize;
        let end = if total == 0 { f.len() } else { (14 + total).min(f.len()) };
        let t = 14 + ihl;
        if f.len() < t + 20 {
            continue;
        }
        let doff = ((f[t + 12] >> 4) as usize) * 4;
        let (sport, dport) = (u16::from_be_bytes([f[t], f[t + 1]]), u16::from_be_bytes([f[t + 2], f[t + 3]]));
        let seq = u32::from_be_bytes([f[t + 4], f[t + 5], f[t + 6], f[t + 7]]);
        if t + doff < end {
            let key = (f[26..30].try_into().unwrap(), sport, f[30..34].try_into().unwrap(), dport);
            flows.entry(key).or_default().push((seq, f[t + doff..end].to_vec()));
        }
    }
    flows
        .into_iter()
        .map(|((_, sport, _, dport), mut segs)| {
            let base = segs[0].0;
            segs.sort_by_key(|s| s.0.wrapping_sub(base));
            let (mut bytes, mut holes) = (vec![], 0);
            let mut next = 0u32;
            for (seq, data) in segs {
                let at = seq.wrapping_sub(base);
                if at > next {
                    holes += 1;
                    next = at;
                }
                let skip = (next - at) as usize;
                if skip < data.len() {
                    bytes.extend_from_slice(&data[skip..]);
                    next = at + data.len() as u32;
                }
            }
            (sport, dport, bytes, holes)
        })
        .collect()
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn a_capture_of_a_migration_holds_nothing_of_the_jobs_memory() {
    let w = Work::new("serve-capture");
    let k = key(&w, "key");
    let mut net = Net::new(2, &w.dir);
    for h in &mut net.hosts {
        h.serve(&k);
    }
    let prog = gcc("secret_heap");
    let out = w.path("out.txt");
    let name = w.name("secret");
    let mut c = net.hosts[0].vrun();
    c.args(["--name", &name, "--dir"]).arg(&net.hosts[0].dir).arg("--").arg(&prog);
    let job = spawn(c, &name, &out, &w.path("vrun.err"));
    let text = wait_for(&out, "the secret", Duration::from_secs(10), |s| s.contains('\n'));
    let secret_hex = text.lines().next().unwrap().strip_prefix("secret ").unwrap().to_string();
    let secret = hex(&secret_hex);
    assert_eq!(secret.len(), 64);
    // Everything host 1 sends and receives: a live move there, then a post-copy move back.
    let cap = Capture::start(&net.hosts[1].link);
    let there = net.hosts[0].migrate_report(&name, &net.hosts[1], &k, &[]).expect("migrating 0 -> 1");
    let name1 = there["name_there"].as_str().unwrap().to_string();
    let back = net.hosts[1].migrate_report(&name1, &net.hosts[0], &k, &["--lazy"]).expect("migrating 1 -> 0");
    let name2 = back["name_there"].as_str().unwrap().to_string();
    let (frames, dropped) = cap.finish();
    assert_eq!(dropped, 0, "the capture missed frames: the test proves nothing");
    let streams = tcp_streams(&frames);
    let moved = there["bytes"].as_u64().unwrap() + back["bytes"].as_u64().unwrap();
    let serve_port = vos_tests::hosts::SERVE_PORT;
    let seen: usize = streams.iter().filter(|s| s.0 == serve_port || s.1 == serve_port).map(|s| s.2.len()).sum();
    assert!(seen as u64 >= moved, "the capture holds {seen} bytes of the migrations, which moved {moved}: it missed them");
    assert!(streams.iter().all(|s| s.3 == 0), "the capture has holes in a stream");
    let pattern = b"vOS capture test: heap pattern!!".repeat(2);
    for (sport, dport, bytes, _) in &streams {
        assert!(!find(bytes, &secret), "the job's secret is in the clear in the capture (port {sport} -> {dport})");
        assert!(!find(bytes, &pattern), "the job's heap is in the clear in the capture (port {sport} -> {dport})");
    }
    for f in &frames {
        assert!(!find(f, &secret[..32]), "half the job's secret is in a captured frame");
    }
    // It arrived whole: the secret and the heap are intact at the destination.
    let t = Instant::now();
    while job_pid(&name2) == 0 {
        assert!(t.elapsed() < Duration::from_secs(20), "{name2} is not registered");
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = std::fs::read_to_string(&out).unwrap().lines().count();
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(job_pid(&name2), libc::SIGUSR2) };
    let text = wait_for(&out, "the job's check", Duration::from_secs(20), |s| s.lines().skip(before).any(|l| l.starts_with("pattern")));
    let after: Vec<&str> = text.lines().skip(before).collect();
    assert_eq!(after, [format!("secret {secret_hex}").as_str(), "pattern ok"], "the job's memory changed on the way");
    // What the job printed there is for root alone.
    let log = std::fs::metadata(net.hosts[1].dir.join(format!("{name1}.log"))).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&log.permissions()) & 0o777, 0o600, "the job's log there is not 0600");
    drop(job);
}

// ---- A wrong key, and a client that proves nothing ----

/// A relay from `listen` to `to`: the bytes the server sent back, once either side closed.
fn relay(listen: TcpListener, to: String) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let (mut c, _) = listen.accept().unwrap();
        let mut s = TcpStream::connect(&to).unwrap();
        let (mut c2, mut s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
        let up = std::thread::spawn(move || {
            let _ = std::io::copy(&mut c2, &mut s2);
            let _ = s2.shutdown(std::net::Shutdown::Write);
        });
        let mut said = vec![];
        let mut buf = [0u8; 4096];
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            said.extend_from_slice(&buf[..n]);
            let _ = c.write_all(&buf[..n]);
        }
        let _ = c.shutdown(std::net::Shutdown::Both);
        let _ = up.join();
        said
    })
}

/// What the server answers a greeting made with `key` before it closes (at most 3 s are waited).
fn greet(addr: &str, key: &[u8; 32]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut hs = snow::Builder::new(NOISE.parse().unwrap()).psk(0, key).unwrap().prologue(MAGIC).unwrap().build_initiator().unwrap();
    let mut m = [0u8; 48];
    assert_eq!(hs.write_message(&[], &mut m).unwrap(), 48);
    s.write_all(&[&MAGIC[..], &[0, 48], &m].concat()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut said = vec![];
    let mut buf = [0u8; 256];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        said.extend_from_slice(&buf[..n]);
        if said.len() >= 50 {
            break;
        }
    }
    said
}

#[test]
fn a_wrong_key_learns_nothing_and_the_job_goes_on() {
    let w = Work::new("serve-wrongkey");
    let (ka, kb, wrong) = (key(&w, "a"), key(&w, "b"), key(&w, "wrong"));
    let mut net = Net::new(3, &w.dir);
    net.hosts[1].serve(&ka);
    net.hosts[2].serve(&kb);
    let (job, name) = counter_on(&net.hosts[0], &w);
    let mut c = LineClient::connect(&format!("{}:{PORT}", net.hosts[0].ip));
    assert_eq!(c.inc(), 1);
    // `vrun migrate` with a wrong key, through a relay that records what each server says: two servers with
    // different keys say the same, nothing, before the client proved it holds their key.
    let mut said = vec![];
    for to in [1, 2] {
        let l = TcpListener::bind(format!("{}:0", net.gateway)).unwrap();
        let via = l.local_addr().unwrap().to_string();
        let r = relay(l, net.hosts[to].serve_addr());
        let mut m = net.hosts[0].vrun();
        m.args(["migrate", &name, "--to", &via, "--json", "--key"]).arg(&wrong);
        let o = m.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "a wrong key moved the job to host {to}");
        assert!(err.contains("does not hold the same key"), "{err}");
        said.push(r.join().unwrap());
        wait_log(&net.hosts[to], "refused", Duration::from_secs(10));
        assert!(!net.hosts[to].serve_log().contains("receiving"), "host {to} took a job from a wrong key");
    }
    assert!(said[0].is_empty(), "host 1 said {} bytes to a client that did not prove it holds the key", said[0].len());
    assert_eq!(said[0], said[1], "what the servers say before the key is proved depends on their key");
    // The same by hand: a greeting keyed wrong gets no byte back, one keyed right gets the server's answer.
    let none = greet(&net.hosts[1].serve_addr(), &key_bytes(&wrong));
    assert!(none.is_empty(), "a wrong greeting got {none:?}");
    let answer = greet(&net.hosts[1].serve_addr(), &key_bytes(&ka));
    assert_eq!(&answer[..2], &[0, 48], "the right key got no answer: {answer:?}");
    // Untouched: the job goes on at its source, on the same connection.
    assert_eq!(c.inc(), 2);
    drop(job);
}

// ---- Slow and many connections ----

#[test]
fn slow_loris_and_a_flood_leave_room_for_a_migration() {
    let w = Work::new("serve-loris");
    let k = key(&w, "key");
    let mut net = Net::new(2, &w.dir);
    for h in &mut net.hosts {
        h.serve(&k);
    }
    let pid = net.hosts[1].serve_pid().unwrap();
    let to: std::net::SocketAddr = net.hosts[1].serve_addr().parse().unwrap();
    let sampler = Sampler::new(pid);
    let stop = Arc::new(AtomicBool::new(false));
    // 500 connections that send the protocol's greeting one byte a second (and come back when dropped).
    let s = stop.clone();
    let loris = std::thread::spawn(move || {
        let greeting: Vec<u8> = [&MAGIC[..], &[0, 48], &[0u8; 48]].concat();
        let mut conns: Vec<Option<(TcpStream, usize)>> = (0..500).map(|_| None).collect();
        let mut reconnects = 0;
        while !s.load(Ordering::Relaxed) {
            let round = Instant::now();
            for c in conns.iter_mut() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let alive = match c {
                    Some((st, at)) => {
                        let ok = st.write(&greeting[*at % greeting.len()..][..1]).is_ok_and(|n| n == 1);
                        *at += 1;
                        ok
                    }
                    None => false,
                };
                if !alive {
                    *c = TcpStream::connect_timeout(&to, Duration::from_millis(500)).ok().map(|st| {
                        st.set_nonblocking(true).unwrap();
                        reconnects += 1;
                        (st, 0)
                    });
                }
            }
            std::thread::sleep(Duration::from_secs(1).saturating_sub(round.elapsed()));
        }
        reconnects
    });
    // And connections opened and closed as fast as one thread can.
    let s = stop.clone();
    let flood = std::thread::spawn(move || {
        let mut n = 0u64;
        while !s.load(Ordering::Relaxed) {
            if TcpStream::connect_timeout(&to, Duration::from_millis(500)).is_ok() {
                n += 1;
            }
        }
        n
    });
    std::thread::sleep(Duration::from_secs(3));
    let (job, name) = counter_on(&net.hosts[0], &w);
    let t = Instant::now();
    let r = net.hosts[0].migrate(&name, &net.hosts[1], &k, &[]);
    let took = t.elapsed();
    // Under attack still: the job runs at the destination.
    let there = r.as_ref().ok().map(|n| {
        let mut c = LineClient::connect(&format!("{}:{PORT}", net.hosts[1].ip));
        (n.clone(), c.inc())
    });
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let (reconnects, flooded) = (loris.join().unwrap(), flood.join().unwrap());
    let (threads, fds) = sampler.max();
    drop(sampler);
    eprintln!("migration under attack: {took:?}; {reconnects} slow connections, {flooded} flooding ones; serve at most {threads} threads, {fds} fds");
    let r = r.unwrap_or_else(|e| panic!("the migration failed under attack after {took:?}: {e}"));
    assert!(took < Duration::from_secs(60), "the migration took {took:?} under attack");
    assert_eq!(there.map(|t| t.1), Some(1), "{r} does not answer at the destination");
    assert!(reconnects >= 500 && flooded > 100, "the attack did not happen: {reconnects} slow, {flooded} flooding connections");
    assert!(threads <= 16, "serve ran {threads} threads under attack");
    assert!(fds <= 128, "serve held {fds} fds under attack");
    drop(job);
}

#[test]
fn accept_failing_for_want_of_fds_does_not_spin() {
    let w = Work::new("serve-emfile");
    let k = key(&w, "key");
    let net = Net::new(1, &w.dir);
    let h = &net.hosts[0];
    // 24 fds at most: a handful of connections use them up.
    let log = std::fs::File::create(w.path("serve.log")).unwrap();
    let mut c = h.cmd("prlimit");
    c.arg("--nofile=24:24").arg(bin_dir().join("vrun")).args(["serve", "--listen", &h.serve_addr(), "--key"]).arg(&k).arg("--dir").arg(&h.dir);
    let mut serve = c.stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap();
    let t = Instant::now();
    while !std::fs::read_to_string(w.path("serve.log")).unwrap_or_default().contains("listening") {
        assert!(t.elapsed() < Duration::from_secs(10), "serve did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ticks = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", serve.id())).unwrap();
        let f: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let idle: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(h.serve_addr()).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let (t0, c0) = (Instant::now(), ticks());
    std::thread::sleep(Duration::from_secs(3));
    let used = (ticks() - c0) as f64 / 100.0 / t0.elapsed().as_secs_f64();
    let log = std::fs::read_to_string(w.path("serve.log")).unwrap();
    drop(idle);
    // Once connections go, it takes new ones again.
    std::thread::sleep(Duration::from_millis(1500));
    let answer = greet(&h.serve_addr(), &key_bytes(&k));
    let _ = serve.kill();
    let _ = serve.wait();
    assert!(used < 0.2, "serve used {:.0}% of a core while accept failed", used * 100.0);
    assert!(log.contains("pausing"), "serve never said accept failed: {log}");
    assert_eq!(answer.get(..2), Some(&[0u8, 48][..]), "serve did not recover: {answer:?}");
}

// ---- A peer that holds the key ----

/// A session of our own with a serve: the protocol of `launcher/src/migration/channel.rs`.
struct Peer {
    s: TcpStream,
    t: snow::TransportState,
}

impl Peer {
    fn connect(addr: &str, key: &[u8; 32]) -> Peer {
        let mut s = TcpStream::connect(addr).unwrap();
        let mut hs = snow::Builder::new(NOISE.parse().unwrap()).psk(0, key).unwrap().prologue(MAGIC).unwrap().build_initiator().unwrap();
        let mut m = [0u8; 48];
        hs.write_message(&[], &mut m).unwrap();
        s.write_all(&[&MAGIC[..], &[0, 48], &m].concat()).unwrap();
        let mut a = [0u8; 50];
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.read_exact(&mut a).unwrap();
        assert_eq!(&a[..2], &[0, 48]);
        hs.read_message(&a[2..], &mut []).unwrap();
        Peer { s, t: hs.into_transport_mode().unwrap() }
    }

    fn send(&mut self, kind: u8, payload: &[u8]) -> std::io::Result<()> {
        let mut plain = vec![kind];
        plain.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        plain.extend_from_slice(payload);
        let mut out = vec![];
        // The head and the first bytes in one message, the rest in messages of 65519 bytes.
        let first = plain.len().min(65519);
        for c in std::iter::once(&plain[..first]).chain(plain[first..].chunks(65519)) {
            let mut m = vec![0u8; c.len() + 16];
            let n = self.t.write_message(c, &mut m).unwrap();
            out.extend_from_slice(&(n as u16).to_be_bytes());
            out.extend_from_slice(&m[..n]);
        }
        self.s.write_all(&out)
    }

    /// The kind and payload of the next frame (a small one: one message).
    fn recv(&mut self) -> (u8, Vec<u8>) {
        let mut l = [0u8; 2];
        self.s.read_exact(&mut l).unwrap();
        let mut m = vec![0u8; u16::from_be_bytes(l) as usize];
        self.s.read_exact(&mut m).unwrap();
        let mut p = vec![0u8; m.len()];
        let n = self.t.read_message(&m, &mut p).unwrap();
        (p[0], p[5..n].to_vec())
    }
}

#[test]
fn a_peer_claiming_thousands_of_processes_is_cut_off() {
    let w = Work::new("serve-pids");
    let k = key(&w, "key");
    let mut net = Net::new(1, &w.dir);
    net.hosts[0].serve(&k);
    let h = &net.hosts[0];
    let sampler = Sampler::new(h.serve_pid().unwrap());
    let mut p = Peer::connect(&h.serve_addr(), &key_bytes(&k));
    let begin = serde_json::json!({"name": w.name("claims"), "map_addr": [], "address": null, "lazy": false});
    p.send(KIND_BEGIN, &rmp_serde::to_vec_named(&begin).unwrap()).unwrap();
    assert_eq!(p.recv().0, KIND_ACCEPTED, "serve did not take a well-formed job description");
    // Pre-copy records: one page for each of 3000 pids.
    let mut sent = 0;
    let mut frame = vec![];
    let mut cut = false;
    for pid in 1..=3000i32 {
        frame.extend_from_slice(&pid.to_le_bytes());
        frame.extend_from_slice(&[0; 4]);
        frame.extend_from_slice(&0x10000u64.to_le_bytes());
        frame.extend_from_slice(&4096u64.to_le_bytes());
        frame.extend_from_slice(&[0x5a; 4096]);
        if frame.len() + 4120 > 1 << 20 || pid == 3000 {
            if p.send(KIND_PRECOPY, &frame).is_err() {
                cut = true;
                break;
            }
            sent = pid;
            frame.clear();
        }
    }
    let log = wait_log(h, "more than 256 processes", Duration::from_secs(20));
    // The connection is gone: what we send now fails, or reads end.
    let _ = p.s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut b = [0u8; 1];
    assert!(cut || p.send(KIND_PRECOPY, &[0; 24]).is_err() || p.s.read(&mut b).is_ok_and(|n| n == 0), "still connected after {sent} pids");
    // Its memfds went with it.
    let t = Instant::now();
    while threads_and_fds(h.serve_pid().unwrap()).unwrap().1 > 16 {
        assert!(t.elapsed() < Duration::from_secs(10), "serve keeps fds of the cut connection");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, fds) = sampler.max();
    assert!(fds < 300, "serve opened {fds} fds for a peer's claims: {log}");
}

// ---- An address the destination does not allow ----

#[test]
fn an_address_outside_allow_addr_is_refused_and_the_job_goes_on() {
    let w = Work::new("serve-allow");
    let k = key(&w, "key");
    let mut net = Net::new(2, &w.dir);
    let vip = net.spare_ip();
    vos_tests::hosts::must(&format!("ip -n {} addr add {vip}/24 dev eth0", net.hosts[0].ns));
    let (job, name) = counter_on(&net.hosts[0], &w);
    let mut c = LineClient::connect(&format!("{vip}:{PORT}"));
    assert_eq!(c.inc(), 1);
    let subnet = net.subnet();
    let narrow = format!("{}/28", vip.rsplit_once('.').unwrap().0.to_string() + ".96");
    // No --allow-addr: no address; another range; a range that holds the address but not its whole /24.
    for (allow, says) in [(None, "takes no job's address"), (Some("192.168.77.0/24"), "outside"), (Some(narrow.as_str()), "outside")] {
        net.hosts[1].kill_serve();
        match allow {
            Some(a) => net.hosts[1].serve_with(&k, &["--allow-addr", a]),
            None => net.hosts[1].serve(&k),
        }
        let e = net.hosts[0].migrate(&name, &net.hosts[1], &k, &["--move-addr", &format!("{vip}/24")]).expect_err("the address was taken");
        assert!(e.contains(says) && e.contains("goes on here"), "allow {allow:?}: {e}");
        let held = vos_tests::hosts::sh(&format!("ip -n {} -o addr show to {vip}/32", net.hosts[1].ns));
        assert!(held.stdout.is_empty(), "host 1 took {vip}");
        assert!(!net.hosts[1].serve_log().contains("receiving"), "host 1 received the job");
    }
    // The job is where it was, with its address, on the same connection.
    assert_eq!(c.inc(), 2);
    // And the range that holds it lets it go.
    net.hosts[1].kill_serve();
    net.hosts[1].serve_with(&k, &["--allow-addr", &subnet]);
    net.hosts[0].migrate(&name, &net.hosts[1], &k, &["--move-addr", &format!("{vip}/24")]).expect("migrating within --allow-addr");
    let mut c = LineClient::connect(&format!("{vip}:{PORT}"));
    assert_eq!(c.inc(), 3);
    drop(job);
}
