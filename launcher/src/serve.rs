//! `vrun serve`: the daemon on each host that receives jobs from `vrun migrate` and restores them. Each job
//! comes over an authenticated connection and goes, memory to memory, into a `vrun restore -` started for it;
//! that restore supervises the job from then on, detached from the daemon, with the job's output in
//! DIR/NAME.log. The daemon answers "running" only once the whole image was checked and the job resumed.

use crate::address::{self, Address};
use crate::channel::{self, Channel, Kind, PageHead};
use crate::migrate::Begin;
use anyhow::{Context, Result, anyhow, bail};
use std::io::{BufRead, Write};
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use crate::fill::{self, Filler};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct Args {
    pub listen: String,
    pub key: Option<PathBuf>,
    pub dir: PathBuf,
}

fn log(what: &str) {
    eprintln!("vrun serve: {what}");
}

pub fn run(a: Args) -> Result<()> {
    let key = channel::key(a.key.as_deref())?;
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    let l = TcpListener::bind(&a.listen).with_context(|| format!("listening on {}", a.listen))?;
    log(&format!("listening on {}, jobs go to {}", l.local_addr()?, a.dir.display()));
    if a.key.is_none() {
        log("no --key: any peer that can reach this port may send jobs here");
    }
    for s in l.incoming() {
        let Ok(s) = s else { continue };
        let dir = a.dir.clone();
        std::thread::spawn(move || {
            let peer = s.peer_addr().map_or("?".into(), |p| p.to_string());
            let ch = match Channel::accept(s, &key) {
                Ok(ch) => ch,
                Err(e) => return log(&format!("refused {peer}: {e:#}")),
            };
            if let Err(e) = receive(ch, &dir, &peer) {
                log(&format!("{peer}: {e:#}"));
            }
        });
    }
    Ok(())
}

/// Receive one job and restore it; tell the sender whether it runs.
fn receive(mut ch: Channel, dir: &Path, peer: &str) -> Result<()> {
    let (kind, b) = ch.recv()?;
    if kind != Kind::Begin {
        bail!("expected the job's description, got {kind:?}");
    }
    let begin: Begin = rmp_serde::from_slice(&b).context("a malformed job description")?;
    // The name becomes a file name here (DIR/NAME.log, the registry): a peer's must be a valid one.
    let name = match crate::runtime::check_name(&begin.name).map_err(|e| anyhow!(e)).and_then(|()| crate::runtime::free_name(&begin.name)) {
        Ok(n) => n,
        Err(e) => {
            let _ = ch.send(Kind::Failed, format!("{e:#}").as_bytes());
            return Err(e);
        }
    };
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
        let address = begin.address.as_deref().map(|a| a.parse::<Address>().map_err(|e| anyhow!(e))).transpose()?;
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
    let mut stdin = child.stdin.take().unwrap();
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
    // The restore supervises the job from now on; a thread reaps it when it ends.
    std::thread::spawn(move || child.wait());
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
    // Never through a symlink planted in DIR.
    let out = std::fs::OpenOptions::new().create(true).write(true).truncate(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(log_path).with_context(|| format!("opening {}", log_path.display()))?;
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
            let ready = {
                let watched = [Some(ch.stream.as_fd()), more.then(|| sock.as_fd()), (!running).then(|| report.as_fd())];
                let mut fds: Vec<PollFd> = watched.iter().flatten().map(|fd| PollFd::new(*fd, PollFlags::POLLIN)).collect();
                fds.extend(f.poll_fds());
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => bail!("poll: {e}"),
                }
                let mut got = fds.iter().map(|p| p.revents().is_some_and(|r| !r.is_empty()));
                watched.map(|w| w.is_some() && got.next().unwrap_or(false))
            };
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
/// for the restore to take the ones the image says are unchanged.
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
                        if !self.files.contains_key(&pid) {
                            self.files.insert(pid, crate::restore::memfd("precopy", 0)?.into());
                        }
                        self.cur = (len > 0).then_some((pid, addr, len));
                    }
                }
                Some((pid, addr, left)) => {
                    let n = left.min(d.len() as u64);
                    self.files[&pid].write_all_at(&d[..n as usize], addr).context("keeping pre-copied pages")?;
                    d = &d[n as usize..];
                    self.cur = (left > n).then_some((pid, addr + n, left - n));
                }
            }
        }
        Ok(())
    }
}
