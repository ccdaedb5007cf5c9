//! `vrun serve`: the daemon on each host that receives jobs from `vrun migrate` and restores them. Each job
//! comes over an encrypted connection whose client proved it holds the cluster's key (`channel`), and goes,
//! memory to memory, into a `vrun restore -` started for it; that restore supervises the job from then on,
//! detached from the daemon, with the job's output in DIR/NAME.log (mode 0600). The daemon answers "running"
//! only once the whole image was checked and the job resumed.
//!
//! Whoever holds the key runs jobs here as root, so the rest is about what those who do not can do: nothing is
//! said to them (`channel`), their connections cost one pollable fd each for at most `HANDSHAKE_TIME`, no more
//! than `MAX_HANDSHAKES` at once, and no thread; a failing accept pauses the listener instead of spinning. A job's
//! description is checked before anything is made for it (its name, its address against `--allow-addr`).

use crate::migration::address::{self, Address, Range};
use crate::migration::channel::{self, Channel, Key, Kind, PageHead, Refused, Responder};
use crate::migration::migrate::Begin;
use anyhow::{Context, Result, anyhow, bail};
use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use crate::migration::fill::{self, Filler};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub struct Args {
    pub listen: String,
    pub key: Option<PathBuf>,
    /// No key: a well-known one, so anyone who reaches the port may send jobs (a lab only).
    pub insecure_no_key: bool,
    pub dir: PathBuf,
    /// Networks within which a job may bring its own address (`migrate --move-addr`); none: no address.
    pub allow_addr: Vec<Range>,
    /// Jobs received at once; connections still in their handshake are kept apart (`MAX_HANDSHAKES`).
    pub max_connections: usize,
}

/// Connections in their handshake at once. One more evicts the oldest that has not proved it holds the key: a
/// slow client holds a place for at most `HANDSHAKE_TIME`, and a real client, whose greeting comes with its
/// connection, is through that step at once (an attacker who keeps more connections coming than this can still
/// make a real one try again: the client is told it is busy, and does).
const MAX_HANDSHAKES: usize = 64;
/// At most this many log lines of one kind in `QUIET_WINDOW`; the rest are counted.
const QUIET_LINES: u32 = 5;
const QUIET_WINDOW: Duration = Duration::from_secs(10);
/// After accept fails (out of fds, memory): the listener waits this long, doubling up to `PAUSE_MAX`.
const PAUSE_MIN: Duration = Duration::from_millis(100);
const PAUSE_MAX: Duration = Duration::from_secs(1);
/// `--map-addr` pairs a job's description may carry.
const MAX_MAP_ADDR: usize = 64;

fn log(what: &str) {
    eprintln!("vrun serve: {what}");
}

/// A kind of log line that a flood could repeat without end: a few per window, then a count.
struct Quiet {
    what: &'static str,
    since: Instant,
    said: u32,
    held: u32,
}

impl Quiet {
    fn new(what: &'static str) -> Quiet {
        Quiet { what, since: Instant::now(), said: 0, held: 0 }
    }

    fn say(&mut self, line: impl FnOnce() -> String) {
        self.flush();
        if self.said < QUIET_LINES {
            self.said += 1;
            log(&line());
        } else {
            self.held += 1;
        }
    }

    fn flush(&mut self) {
        if self.since.elapsed() >= QUIET_WINDOW {
            if self.held > 0 {
                log(&format!("{} more {} in the last {} s", self.held, self.what, self.since.elapsed().as_secs()));
            }
            *self = Quiet::new(self.what);
        }
    }
}

/// What every session needs.
struct Opts {
    dir: PathBuf,
    allow: Vec<Range>,
    insecure: bool,
}

pub fn run(a: Args) -> Result<()> {
    let key = match (&a.key, a.insecure_no_key) {
        (Some(_), true) => bail!("--key and --insecure-no-key exclude each other"),
        (Some(p), false) => Key::load(p)?,
        (None, true) => Key::insecure(),
        (None, false) => bail!(
            "vrun serve needs --key FILE: whoever can send it a job runs that job as root here. Make a key with \
             `vrun keygen /etc/vos/key`, copy it (mode 0600, owned by root) to every host that sends or receives jobs, \
             and give it to serve and migrate alike (--insecure-no-key for a lab where anyone may)"
        ),
    };
    if a.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    // Received jobs' logs and periodic images hold what the jobs print and their memory: ours alone.
    if !a.dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    }
    let l = TcpListener::bind(&a.listen).with_context(|| format!("listening on {}", a.listen))?;
    l.set_nonblocking(true)?;
    log(&format!("listening on {}, jobs go to {}", l.local_addr()?, a.dir.display()));
    if a.insecure_no_key {
        log("INSECURE: --insecure-no-key: anyone who can reach this port may send a job that runs here as root; traffic is encrypted but not authenticated");
    }
    if !a.allow_addr.is_empty() {
        let list: Vec<String> = a.allow_addr.iter().map(|r| r.to_string()).collect();
        log(&format!("jobs may bring their own address within {}", list.join(", ")));
    }
    let opts = Arc::new(Opts { dir: a.dir, allow: a.allow_addr, insecure: a.insecure_no_key });
    gate(l, &key, a.max_connections, opts)
}

/// A connection in its handshake.
struct Pending {
    s: TcpStream,
    peer: String,
    deadline: Instant,
    hs: Responder,
}

/// One thread takes every connection and does its handshake without blocking, each within one deadline from
/// accept; only a client that proved it holds the key and said what it sends gets a thread of its own, and only
/// `max` such at once. So neither slow nor many connections can make serve hold more than `MAX_HANDSHAKES` +
/// `max` connections, or spin.
fn gate(l: TcpListener, key: &Key, max: usize, opts: Arc<Opts>) -> Result<()> {
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let sessions = Arc::new(AtomicUsize::new(0));
    let (mut paused_until, mut pause) = (None::<Instant>, PAUSE_MIN);
    let mut refused = Quiet::new("refusals");
    let mut dropped = Quiet::new("connections dropped (slow, silent or too many)");
    let mut busy = Quiet::new("jobs turned away (busy)");
    let mut failing = Quiet::new("accept failures");
    loop {
        let now = Instant::now();
        pending.retain(|p| {
            let late = p.deadline <= now;
            if late {
                dropped.say(|| format!("dropped {}: no handshake within {} s", p.peer, channel::HANDSHAKE_TIME.as_secs()));
            }
            !late
        });
        for q in [&mut refused, &mut dropped, &mut busy, &mut failing] {
            q.flush();
        }
        let listening = paused_until.is_none_or(|t| now >= t);
        if listening {
            paused_until = None;
        }
        let wake = pending.iter().map(|p| p.deadline).chain(paused_until).min().unwrap_or(now + QUIET_WINDOW);
        let (ready, accept) = {
            let mut fds: Vec<PollFd> = pending.iter().map(|p| PollFd::new(p.s.as_fd(), PollFlags::POLLIN)).collect();
            if listening {
                fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
            }
            let ms = wake.saturating_duration_since(now).as_millis().clamp(1, QUIET_WINDOW.as_millis()) as u16;
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    // Out of memory, most likely: wait rather than spin or end the server.
                    failing.say(|| format!("poll: {e}"));
                    std::thread::sleep(PAUSE_MIN);
                }
            }
            let hit = |p: &PollFd| p.revents().is_some_and(|r| !r.is_empty());
            let ready: Vec<usize> = fds[..pending.len()].iter().enumerate().filter(|(_, p)| hit(p)).map(|(i, _)| i).collect();
            (ready, listening && fds.last().is_some_and(hit))
        };
        // From the back, so the indices of those before stay right.
        for &i in ready.iter().rev() {
            let Some(p) = pending.get_mut(i) else { continue };
            if let Some(done) = step(p, &mut refused, &mut dropped)
                && let (Some(p), Some(first)) = (pending.remove(i), done) {
                    hand_off(p, first, &sessions, max, &opts, &mut busy);
                }
        }
        if !accept {
            continue;
        }
        // A batch, so one busy listener cannot starve the handshakes in progress.
        for _ in 0..MAX_HANDSHAKES {
            match l.accept() {
                Ok((s, peer)) => {
                    pause = PAUSE_MIN;
                    if s.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if pending.len() >= MAX_HANDSHAKES {
                        // The oldest that has not proved it holds the key; one that has is near its first frame.
                        let i = pending.iter().position(|p| !p.hs.keyed()).unwrap_or(0);
                        if let Some(old) = pending.remove(i) {
                            dropped.say(|| format!("dropped {}: {MAX_HANDSHAKES} handshakes in progress, it was the oldest", old.peer));
                            channel::busy(old.s);
                        }
                    }
                    let hs = match Responder::new(key) {
                        Ok(h) => h,
                        Err(e) => bail!("{e:#}"),
                    };
                    let mut p = Pending { s, peer: peer.to_string(), deadline: Instant::now() + channel::HANDSHAKE_TIME, hs };
                    // A client's greeting comes with its connection: most are through at once.
                    match step(&mut p, &mut refused, &mut dropped) {
                        None => pending.push_back(p),
                        Some(Some(first)) => hand_off(p, first, &sessions, max, &opts, &mut busy),
                        Some(None) => {}
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO | libc::EPERM)) => {}
                Err(e) => {
                    // Out of fds or memory: the connection waits in the backlog; polling the listener again at
                    // once would only spin. Waiting handshakes free their fds meanwhile.
                    failing.say(|| format!("accepting a connection: {e}; pausing {} ms", pause.as_millis()));
                    paused_until = Some(Instant::now() + pause);
                    pause = (pause * 2).min(PAUSE_MAX);
                    break;
                }
            }
        }
    }
}

/// Advance one handshake: None while it goes on; Some(None) when it ended (refused, logged); Some(Some(first))
/// when the client is in, with its first frame.
fn step(p: &mut Pending, refused: &mut Quiet, dropped: &mut Quiet) -> Option<Option<Vec<u8>>> {
    match p.hs.advance(&mut p.s) {
        Ok(None) => None,
        Ok(Some(first)) => Some(Some(first)),
        Err(Refused::Silent(why)) => {
            dropped.say(|| format!("dropped {}: {why}", p.peer));
            Some(None)
        }
        Err(Refused::Said(why)) => {
            refused.say(|| format!("refused {}: {why}", p.peer));
            Some(None)
        }
    }
}

/// A thread for a client that is in, if fewer than `max` jobs are being received; else it hears it is busy.
fn hand_off(p: Pending, first: Vec<u8>, sessions: &Arc<AtomicUsize>, max: usize, opts: &Arc<Opts>, busy: &mut Quiet) {
    let Pending { s, peer, hs, .. } = p;
    if sessions.load(Ordering::SeqCst) >= max {
        busy.say(|| format!("turned {peer} away: {max} jobs are being received (--max-connections)"));
        hs.refuse(s, &format!("busy: {max} jobs are being received there already (--max-connections)"));
        return;
    }
    let ch = match hs.channel(s).and_then(|ch| {
        // Post-copy's requests are small and wait for an answer: no Nagle delay.
        ch.stream.set_nodelay(true)?;
        ch.stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        ch.stream.set_write_timeout(Some(Duration::from_secs(60)))?;
        Ok(ch)
    }) {
        Ok(ch) => ch,
        Err(e) => return log(&format!("{peer}: {e:#}")),
    };
    if opts.insecure {
        log(&format!("INSECURE: {peer} sends a job, unauthenticated (--insecure-no-key)"));
    }
    /// The count goes down however the session ends.
    struct Slot(Arc<AtomicUsize>);
    impl Drop for Slot {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    sessions.fetch_add(1, Ordering::SeqCst);
    let slot = Slot(sessions.clone());
    let opts = opts.clone();
    let who = peer.clone();
    let spawned = std::thread::Builder::new().name("session".into()).spawn(move || {
        let _slot = slot;
        if let Err(e) = receive(ch, first, &opts, &who) {
            log(&format!("{who}: {e:#}"));
        }
    });
    if let Err(e) = spawned {
        log(&format!("{peer}: no thread for it: {e}"));
    }
}

/// The job's description from the source, checked before anything is made for it.
fn check_begin(first: &[u8], opts: &Opts) -> Result<(Begin, Option<Address>, String)> {
    let begin: Begin = rmp_serde::from_slice(first).context("a malformed job description")?;
    // The name becomes a file name here (DIR/NAME.log, the registry): a peer's must be a valid one.
    crate::job::registry::check_name(&begin.name).map_err(|e| anyhow!(e))?;
    if begin.map_addr.len() > MAX_MAP_ADDR {
        bail!("{} --map-addr pairs (at most {MAX_MAP_ADDR})", begin.map_addr.len());
    }
    let addr_like = |s: &str| s.parse::<std::net::SocketAddr>().is_ok() || s.parse::<std::net::IpAddr>().is_ok();
    if let Some((old, new)) = begin.map_addr.iter().find(|(o, n)| !addr_like(o) || !addr_like(n)) {
        bail!("--map-addr {old:?}={new:?}: each side must be an IP address or IP:port");
    }
    let address = begin.address.as_deref().map(|a| a.parse::<Address>().map_err(|e| anyhow!(e))).transpose()?;
    if let Some(a) = &address {
        address::allowed(a, &opts.allow).map_err(|e| anyhow!(e))?;
    }
    let name = crate::job::registry::free_name(&begin.name)?;
    Ok((begin, address, name))
}

/// Receive one job and restore it; tell the sender whether it runs.
fn receive(mut ch: Channel, first: Vec<u8>, opts: &Opts, peer: &str) -> Result<()> {
    let dir = opts.dir.as_path();
    let (begin, address, name) = match check_begin(&first, opts) {
        Ok(b) => b,
        Err(e) => {
            let _ = ch.send(Kind::Failed, format!("{e:#}").as_bytes());
            return Err(e.context("refused its job"));
        }
    };
    ch.send(Kind::Accepted, &[])?;
    log(&format!("{peer}: receiving job {} as {name}", begin.name));
    let log_path = dir.join(format!("{name}.log"));
    // Pages sent ahead while the job still ran at the source, until its image begins.
    let mut ahead = Ahead::default();
    let mut frame = Vec::with_capacity(channel::MAX_FRAME);
    loop {
        match ch.recv_into(&mut frame)? {
            Kind::Precopy => ahead.take(&frame)?,
            Kind::Data => break,
            k => bail!("unexpected {k:?} before the image"),
        }
    }
    let first = std::mem::take(&mut frame);
    // The job's own address is here before its sockets are made (and not before: until the source stops the job,
    // its peers must reach it there). It is given back unless the job comes to run here.
    // Post-copy: the restore hands us the job's memory to fill (`fill`), which we fetch from the source.
    let fill = match begin.lazy {
        true => Some(socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?),
        false => None,
    };
    let started = (|| {
        let taken = address.map(address::take).transpose()?;
        Ok((start_restore(&name, dir, &begin, &log_path, &ahead, fill.as_ref().map(|f| f.1.as_raw_fd()))?, taken))
    })();
    let fill = fill.map(|(mine, _)| mine);
    let ((mut child, report), mut taken) = match started {
        Ok(c) => c,
        Err(e) => {
            let _ = ch.send(Kind::Failed, format!("{e:#}").as_bytes());
            return Err(e);
        }
    };
    drop(ahead);
    let Some(mut stdin) = child.stdin.take() else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("the restore has no standard input");
    };
    // Big pipe writes: the restore reads page data straight into place, a pipe's worth per read.
    let _ = nix::fcntl::fcntl(&stdin, nix::fcntl::FcntlArg::F_SETPIPE_SZ(4 << 20));
    let mut bytes = first.len() as u64;
    let mut accepted = stdin.write_all(&first).is_ok();
    let mut frame = first;
    let relay = loop {
        match ch.recv_into(&mut frame) {
            Ok(Kind::Data) => {
                bytes += frame.len() as u64;
                // A restore that refused the image has ended (its log says why); the rest is read and dropped,
                // so the sender hears why rather than a reset.
                accepted = accepted && stdin.write_all(&frame).is_ok();
            }
            Ok(Kind::End) => break Ok(()),
            Ok(k) => break Err(anyhow!("unexpected {k:?} in the middle of the image")),
            Err(e) => break Err(e),
        }
    };
    // A cut stream leaves the restore a truncated image, which it refuses before the job runs.
    drop(stdin);
    let outcome = match fill {
        Some(sock) if relay.is_ok() => {
            let said = |what: &str| log(&format!("{peer}: job {name} {what}"));
            post_copy(&mut ch, sock, report, &name, &said)
        }
        _ => {
            // One line; the job's processes may hold the pipe open, so no end of file is waited for.
            let mut said = String::new();
            let _ = std::io::BufReader::new(std::fs::File::from(report)).read_line(&mut said);
            Ok(said.starts_with("running"))
        }
    };
    let running = matches!(outcome, Ok(true));
    if running {
        if let Some(t) = taken.as_mut() {
            t.keep();
        }
    } else {
        let _ = child.wait();
    }
    // The restore supervises the job from now on; a thread reaps it when it ends (without one, it stays a zombie
    // until serve ends).
    let _ = std::thread::Builder::new().name("reaper".into()).spawn(move || child.wait());
    relay?;
    outcome?;
    if !running {
        let why = why_failed(&log_path);
        log(&format!("{peer}: job {name} could not be restored: {why}"));
        return ch.send(Kind::Failed, why.as_bytes());
    }
    log(&format!("{peer}: job {name} runs here ({:.1} MiB of image received); its output goes to {}", bytes as f64 / (1 << 20) as f64, log_path.display()));
    if !begin.lazy {
        ch.send(Kind::Running, name.as_bytes())?;
    }
    if let Some(t) = &taken {
        // Peers learn the address's new home now, and again once the source has let go of it.
        address::announce(&t.addr, &t.dev)?;
        ch.stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        let released = matches!(ch.recv(), Ok((Kind::Released, _)));
        address::announce(&t.addr, &t.dev)?;
        log(&format!("{peer}: {} is here now{}", t.addr, if released { "" } else { " (the source did not say it let go of it)" }));
    }
    Ok(())
}

/// `vrun restore -` for the job, detached in its own session; it writes "running" to the returned pipe once the
/// job runs.
fn start_restore(name: &str, dir: &Path, begin: &Begin, log_path: &Path, ahead: &Ahead, fill: Option<RawFd>) -> Result<(std::process::Child, OwnedFd)> {
    let (report_r, report_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // Never through a symlink planted in DIR; the job's output is its own business: readable by root alone.
    let out = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    out.set_permissions(std::fs::Permissions::from_mode(0o600)).with_context(|| format!("{}", log_path.display()))?;
    let mut c = Command::new(std::env::current_exe()?);
    c.args(["restore", "-", "--name", name, "--dir"]).arg(dir).args(["--report-fd", &report_w.as_raw_fd().to_string()]);
    for (old, new) in &begin.map_addr {
        c.arg("--map-addr").arg(format!("{old}={new}"));
    }
    let mut inherit = vec![report_w.as_raw_fd()];
    if let Some(fd) = fill {
        c.arg("--fill-fd").arg(fd.to_string());
        inherit.push(fd);
    }
    for (pid, f) in &ahead.files {
        c.arg("--base").arg(format!("{pid}:{}", f.as_raw_fd()));
        inherit.push(f.as_raw_fd());
    }
    c.stdin(Stdio::piped()).stdout(out.try_clone()?).stderr(out);
    // SAFETY: between fork and exec only async-signal-safe calls: setsid and fcntl.
    unsafe {
        c.pre_exec(move || {
            libc::setsid();
            for &fd in &inherit {
                libc::fcntl(fd, libc::F_SETFD, 0);
            }
            Ok(())
        });
    }
    let child = c.spawn().context("starting vrun restore")?;
    drop(report_w);
    Ok((child, report_r))
}

/// Post-copy, once the image is in: while the job is restored and runs here, fetch the memory its image only
/// listed from the source, pages a thread waits for first, the rest in the background (a window of requests in
/// flight). The source hears "running" once the job runs, and "filled" once every page is here; it lets its
/// copy go only then. False when the restore failed before the job ran. If fetching fails, the job here ends:
/// its missing pages would read as zeros, and the source's copy goes on.
fn post_copy(ch: &mut Channel, sock: OwnedFd, report: OwnedFd, name: &str, say: &dyn Fn(&str)) -> Result<bool> {
    // Background pieces, and how much of them may be on the way: a fault's pages come after those.
    const STEP: u64 = 512 << 10;
    const WINDOW: u64 = 4 << 20;
    let mut f = Filler::default();
    let (mut more, mut running, mut inflight, mut pulled) = (true, false, 0u64, 0u64);
    let mut frame = Vec::with_capacity(channel::MAX_FRAME);
    let mut said = vec![];
    let r = (|| -> Result<bool> {
        loop {
            if running && !more && f.handed_out() && f.urgent.is_empty() && inflight == 0 {
                f.finish()?;
                say(&format!("has all its memory ({:.1} MiB pulled)", pulled as f64 / (1 << 20) as f64));
                ch.send(Kind::Filled, &[])?;
                return Ok(true);
            }
            // The source, the restore's hand-over until it is done, its report until the job runs, the job.
            // (A closed fd reports a hang-up for ever, so one done with is left out.)
            // Bytes the channel read ahead are not seen by poll: they count as the source's, at once.
            let buffered = ch.buffered();
            let mut ready = {
                let watched = [Some(ch.stream.as_fd()), more.then(|| sock.as_fd()), (!running).then(|| report.as_fd())];
                let mut fds: Vec<PollFd> = watched.iter().flatten().map(|fd| PollFd::new(*fd, PollFlags::POLLIN)).collect();
                fds.extend(f.poll_fds());
                match poll(&mut fds, if buffered { PollTimeout::ZERO } else { PollTimeout::NONE }) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => bail!("poll: {e}"),
                }
                let mut got = fds.iter().map(|p| p.revents().is_some_and(|r| !r.is_empty()));
                watched.map(|w| w.is_some() && got.next().unwrap_or(false))
            };
            ready[0] |= buffered;
            if more && ready[1] {
                more = fill::take_work(&sock, &mut f)?;
            }
            if !running && ready[2] {
                let mut b = [0u8; 256];
                let n = nix::unistd::read(&report, &mut b).unwrap_or(0);
                said.extend_from_slice(&b[..n]);
                if n == 0 || (said.contains(&b'\n') && !said.starts_with(b"running")) {
                    return Ok(false);
                }
                if said.contains(&b'\n') {
                    running = true;
                    ch.send(Kind::Running, name.as_bytes())?;
                    say("runs here, pulling its memory from the source");
                }
            }
            if ready[0] {
                match ch.recv_into(&mut frame)? {
                    Kind::Pages => {
                        let mut d = &frame[..];
                        while !d.is_empty() {
                            let h = PageHead::decode(&d[..PageHead::LEN.min(d.len())])?;
                            let bytes = d.get(PageHead::LEN..PageHead::LEN + h.len as usize).ok_or_else(|| anyhow!("a short page record"))?;
                            f.place(h.pid, h.addr, bytes)?;
                            inflight = inflight.saturating_sub(h.len);
                            pulled += h.len;
                            d = &d[PageHead::LEN + h.len as usize..];
                        }
                    }
                    k => bail!("unexpected {k:?} from the source"),
                }
            }
            f.events()?;
            let mut want = vec![];
            for (pid, from, to) in f.urgent.drain(..) {
                want.extend_from_slice(&PageHead { pid, addr: from, len: to - from }.encode());
                inflight += to - from;
            }
            // Until the job runs, only what its restore touches: the job is stopped until then.
            while running && inflight < WINDOW {
                let Some((pid, from, to)) = f.next_piece(STEP) else { break };
                want.extend_from_slice(&PageHead { pid, addr: from, len: to - from }.encode());
                inflight += to - from;
            }
            for part in want.chunks(channel::MAX_FRAME / PageHead::LEN * PageHead::LEN) {
                ch.send(Kind::Want, part)?;
            }
        }
    })();
    if let Err(e) = &r {
        f.end_job(e);
    }
    r
}

/// The restore's own error lines from its log.
fn why_failed(log_path: &Path) -> String {
    let text = std::fs::read_to_string(log_path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("vrun")).collect();
    match lines.last() {
        Some(l) => l.trim_start_matches("vrun: ").to_string(),
        None => format!("the restore ended without a word (see {})", log_path.display()),
    }
}

/// Pages pre-copy sent ahead, per process (pid as the job sees it): sparse memfds, each page at its address,
/// for the restore to take the ones the image says are unchanged. At most `MAX_PRECOPY_PROCESSES` of them.
#[derive(Default)]
struct Ahead {
    files: std::collections::HashMap<i32, std::fs::File>,
    head: Vec<u8>,
    /// The record being received: pid, where its next bytes go, how many are left.
    cur: Option<(i32, u64, u64)>,
}

impl Ahead {
    /// Take the next bytes of the stream of records (`PageHead` and `len` bytes).
    fn take(&mut self, mut d: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        while !d.is_empty() {
            match self.cur {
                None => {
                    let n = (24 - self.head.len()).min(d.len());
                    self.head.extend_from_slice(&d[..n]);
                    d = &d[n..];
                    if self.head.len() == 24 {
                        let PageHead { pid, addr, len } = PageHead::decode(&std::mem::take(&mut self.head))?;
                        // Each process named costs a memfd here: no more than a source pre-copies.
                        if !self.files.contains_key(&pid) {
                            if self.files.len() >= channel::MAX_PRECOPY_PROCESSES {
                                bail!("the pre-copy stream names more than {} processes", channel::MAX_PRECOPY_PROCESSES);
                            }
                            self.files.insert(pid, crate::os::memfd("precopy", 0)?.into());
                        }
                        self.cur = (len > 0).then_some((pid, addr, len));
                    }
                }
                Some((pid, addr, left)) => {
                    let n = left.min(d.len() as u64);
                    let f = self.files.get(&pid).ok_or_else(|| anyhow!("pre-copied pages of pid {pid}, never named"))?;
                    f.write_all_at(&d[..n as usize], addr).context("keeping pre-copied pages")?;
                    d = &d[n as usize..];
                    self.cur = (left > n).then_some((pid, addr + n, left - n));
                }
            }
        }
        Ok(())
    }
}
