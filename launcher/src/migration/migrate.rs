//! `vrun migrate`: move a running job to the `vrun serve` of another host. The job's supervisor writes its
//! image into a pipe; we relay it, framed and authenticated, to the destination, which restores it as it
//! arrives. Nothing is written to disk on either side. The handoff is atomic: the job here ends only once the
//! destination says it runs there; any failure before that (a refused key, a broken connection, a failed
//! restore) lets it go on here as if nothing had happened.
//!
//! The one window left: the destination has the job running and said so, and the connection breaks before
//! its word arrives. Then both copies run (the destination's is never killed once running: that would lose
//! its new state); `vrun migrate` says so.

use crate::migration::address::{self, Address};
use crate::migration::channel::{Busy, Channel, Key, Kind, MAX_FIRST, MAX_FRAME, PageHead};
use crate::output::escape::escape_bytes;
use crate::output::progress::mib;
use crate::job::registry;
use anyhow::{Context, Result, anyhow, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde::{Deserialize, Serialize};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vos::proto::{self, Msg, Pages};

/// What the destination needs to know before the image.
#[derive(Serialize, Deserialize)]
pub struct Begin {
    pub name: String,
    /// `--map-addr` re-bindings for the restore there.
    pub map_addr: Vec<(String, String)>,
    /// `--move-addr`: the address the destination takes before the restore.
    pub address: Option<String>,
    /// Post-copy: the job's anonymous memory is fetched from here after it resumes there.
    pub lazy: bool,
}

pub struct Args {
    pub name: Option<String>,
    pub to: String,
    pub key: Option<PathBuf>,
    /// The well-known key of a `serve --insecure-no-key`.
    pub insecure_no_key: bool,
    pub tcp_established: bool,
    pub bundle: bool,
    pub map_addr: Vec<(String, String)>,
    pub move_addr: Option<Address>,
    /// No pre-copy: the job stops for the whole transfer.
    pub stop_and_copy: bool,
    /// Post-copy: the job runs at the destination at once and pulls its memory from here.
    pub lazy: bool,
    pub quiet: bool,
    pub json: bool,
}

/// What went so far, shown as it goes.
struct Progress {
    bar: crate::output::progress::Progress,
    /// The round being sent (the last one is the final, stopped one), and its size when known.
    round: u32,
    planned: Option<u64>,
    total: u64,
}

impl Progress {
    fn show(&mut self, round_bytes: u64) {
        let note = format!(" (round {}, {:.1} MiB in all)", self.round, mib(self.total));
        self.bar.show(round_bytes, self.planned, self.total, &note);
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let _ = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
    Ok((r, w))
}

/// Send what the supervisor writes into `pipe` to the destination as `kind` frames, until the supervisor says
/// something on `sup` other than a round's end; returns that, and the bytes of each round.
fn relay(ch: &mut Channel, pipe: &OwnedFd, sup: &OwnedFd, kind: Kind, progress: &mut Progress) -> Result<(Msg, Vec<u64>)> {
    let mut buf = vec![0u8; MAX_FRAME];
    let (mut rounds, mut round) = (vec![], 0u64);
    let mut send = |ch: &mut Channel, nonblocking: bool, round: &mut u64, progress: &mut Progress| -> Result<bool> {
        let n = match nix::unistd::read(pipe, &mut buf) {
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN) if nonblocking => return Ok(false),
            Err(nix::errno::Errno::EINTR) => return Ok(true),
            Err(e) => bail!("reading from the supervisor: {e}"),
        };
        if n == 0 {
            return Ok(false);
        }
        ch.send(kind, &buf[..n]).context("the destination went away during the transfer; the job goes on here")?;
        *round += n as u64;
        progress.total += n as u64;
        progress.show(*round);
        Ok(true)
    };
    let end = loop {
        let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN), PollFd::new(sup.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => bail!("poll: {e}"),
        }
        if fds[0].revents().is_some_and(|r| r.intersects(PollFlags::POLLIN)) {
            send(ch, false, &mut round, progress)?;
            continue;
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            match proto::recv(sup.as_raw_fd()) {
                Ok(Some((Msg::PrecopyPlan { bytes, .. }, _))) => progress.planned = Some(bytes),
                Ok(Some((Msg::PrecopyRound { .. }, _))) => {
                    // Everything of that round is in the pipe: send it, then count the next.
                    nix::fcntl::fcntl(pipe, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))?;
                    while send(ch, true, &mut round, progress)? {}
                    nix::fcntl::fcntl(pipe, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()))?;
                    rounds.push(std::mem::take(&mut round));
                    progress.round += 1;
                    progress.planned = None;
                }
                Ok(Some((m, _))) => break m,
                _ => bail!("the supervisor went away"),
            }
        }
    };
    // Whatever ended it, all that was written is in the pipe: send what is left.
    nix::fcntl::fcntl(pipe, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))?;
    while send(ch, true, &mut round, progress)? {}
    if round > 0 || kind == Kind::Data {
        rounds.push(round);
    }
    Ok((end, rounds))
}

/// Post-copy: /proc/PID/mem of each process of the stopped job, from its supervisor (`Msg::MemoryOf`).
fn memory_of(sup: &OwnedFd) -> Result<Vec<(i32, std::fs::File)>> {
    let mut out = vec![];
    loop {
        match proto::recv(sup.as_raw_fd()) {
            Ok(Some((Msg::MemoryOf { pid, more }, Some(fd)))) => {
                out.push((pid, std::fs::File::from(crate::os::owned(fd))));
                if !more {
                    return Ok(out);
                }
            }
            _ => bail!("the supervisor did not hand over the job's memory"),
        }
    }
}

/// Post-copy: answer a `Want` frame with the pages it names, read from the stopped job; returns the bytes sent.
fn send_wanted(ch: &mut Channel, want: &[u8], memory: &[(i32, std::fs::File)]) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut sent = 0;
    let mut buf = vec![];
    for h in want.chunks(PageHead::LEN) {
        let h = PageHead::decode(h)?;
        let mem = memory.iter().find(|m| m.0 == h.pid).map(|m| &m.1).ok_or_else(|| anyhow!("the destination wants pages of pid {}, not in the job", h.pid))?;
        if h.len as usize > MAX_FRAME - PageHead::LEN {
            bail!("the destination wants {} bytes at once", h.len);
        }
        buf.clear();
        buf.extend_from_slice(&h.encode());
        buf.resize(PageHead::LEN + h.len as usize, 0);
        mem.read_exact_at(&mut buf[PageHead::LEN..], h.addr).with_context(|| format!("reading pid {}'s memory at {:#x}", h.pid, h.addr))?;
        ch.send(Kind::Pages, &buf)?;
        sent += h.len;
    }
    Ok(sent)
}

/// Connect to the destination and have it accept the job's description, trying again for a minute while it says
/// it is busy (too many connections or jobs at once). Nothing of the job has moved yet.
fn open(a: &Args, key: &Key, begin: &[u8]) -> Result<Channel> {
    if begin.len() > MAX_FIRST {
        bail!("the job's description takes {} bytes, more than one message (fewer --map-addr)", begin.len());
    }
    let give_up = Instant::now() + Duration::from_secs(60);
    let mut pause = Duration::from_millis(50);
    loop {
        let why = match Channel::connect(&a.to, key) {
            Ok(mut ch) => {
                ch.send(Kind::Begin, begin)?;
                match ch.recv().with_context(|| format!("{} did not take the job's description; it goes on here", a.to))? {
                    (Kind::Accepted, _) => return Ok(ch),
                    (Kind::Failed, why) if why.starts_with(b"busy") => escape_bytes(&why),
                    (Kind::Failed, why) => bail!("{} refused the job: {}; it goes on here", a.to, escape_bytes(&why)),
                    (k, _) => bail!("{} answered {k:?} to the job's description; it goes on here", a.to),
                }
            }
            Err(e) if e.is::<Busy>() => "busy: too many connections there".to_string(),
            Err(e) => return Err(e),
        };
        if Instant::now() + pause >= give_up {
            bail!("{} stayed busy for a minute ({why}); the job goes on here", a.to);
        }
        if pause == Duration::from_millis(50) && !a.quiet && !a.json {
            eprintln!("vrun: migrate: {} is {why}; trying again", a.to);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

pub fn run(a: Args) -> Result<()> {
    let key = match (&a.key, a.insecure_no_key) {
        (Some(p), false) => Key::load(p)?,
        (None, true) => Key::insecure(),
        (Some(_), true) => bail!("--key and --insecure-no-key exclude each other"),
        (None, false) => bail!("vrun migrate needs --key FILE, the key the destination's vrun serve holds (or --insecure-no-key for a serve started so)"),
    };
    let job = registry::find(a.name.as_deref())?;
    if let Some(m) = &a.move_addr {
        address::holder(m)?.ok_or_else(|| anyhow!("--move-addr {m}: this host does not hold that address"))?;
    }
    let start = Instant::now();
    let begin = Begin { name: job.name.clone(), map_addr: a.map_addr.clone(), address: a.move_addr.as_ref().map(|m| m.to_string()), lazy: a.lazy };
    let mut ch = open(&a, &key, &rmp_serde::to_vec_named(&begin)?)?;

    let connect = || registry::connect(&job);
    let bar = crate::output::progress::Progress::new("migrate", a.quiet || a.json, Duration::ZERO);
    let mut progress = Progress { bar, round: 0, planned: None, total: 0 };
    let mut rounds: Vec<u64> = vec![];

    // Live: memory goes over while the job runs, then again what it wrote meanwhile, until little changes.
    let mut precopied = false;
    if !a.stop_and_copy && !a.lazy {
        let sup = connect()?;
        let (pipe, w) = pipe()?;
        proto::send(sup.as_raw_fd(), &Msg::Precopy, Some(w.as_raw_fd())).map_err(|e| anyhow!("talking to the supervisor: {e}"))?;
        drop(w);
        match relay(&mut ch, &pipe, &sup, Kind::Precopy, &mut progress)? {
            (Msg::PrecopyDone, r) => {
                rounds = r;
                precopied = true;
            }
            (Msg::CheckpointFailed { why }, _) => {
                if !a.quiet && !a.json {
                    eprintln!("vrun: migrate: no pre-copy ({why}); the job stops for the whole transfer");
                }
            }
            (m, _) => bail!("unexpected answer from the supervisor: {m:?}"),
        }
    }

    // The final round: the job stops, and its image (with only the pages that changed) goes over.
    let sup = connect()?;
    let (image, w) = pipe()?;
    let pages = match (precopied, a.lazy) {
        (true, _) => Pages::Precopied,
        (_, true) => Pages::Lazy,
        _ => Pages::All,
    };
    let ask = Msg::Checkpoint { kill: false, to: None, fd_attached: true, bundle: a.bundle, tcp_established: a.tcp_established, handoff: true, pages };
    proto::send(sup.as_raw_fd(), &ask, Some(w.as_raw_fd())).map_err(|e| anyhow!("talking to the supervisor: {e}"))?;
    drop(w);
    let paused = Instant::now();
    progress.round = rounds.len() as u32;
    // From here until the handoff the job is stopped; leaving early (an error) drops `sup`, and a supervisor
    // that loses its migration lets the job go on.
    let last = match relay(&mut ch, &image, &sup, Kind::Data, &mut progress)? {
        (Msg::Written, r) => r,
        (Msg::CheckpointFailed { why }, _) => bail!("checkpoint of {} failed: {why}; it goes on here", job.name),
        (m, _) => bail!("unexpected answer from the supervisor: {m:?}"),
    };
    rounds.extend(last);
    let memory = if a.lazy { memory_of(&sup)? } else { vec![] };
    ch.send(Kind::End, &[])?;
    progress.bar.done();
    ch.stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut downtime = None;
    // Post-copy: the pages the destination pulls make one more round.
    progress.round = rounds.len() as u32;
    progress.planned = None;
    let mut answer = || -> Result<String> {
        let mut frame = vec![];
        let mut running: Option<String> = None;
        let mut pages = 0u64;
        loop {
            let k = ch.recv_into(&mut frame).map_err(|e| match &running {
                Some(_) => anyhow!("{e:#}; the job goes on here (its copy there, missing memory, ends)"),
                None => anyhow!("{e:#}; the job goes on here (if {} had started it already, it runs there too: check `vrun list` there)", a.to),
            })?;
            match k {
                Kind::Running if !a.lazy => return Ok(escape_bytes(&frame)),
                Kind::Running => {
                    downtime = Some(paused.elapsed());
                    running = Some(escape_bytes(&frame));
                }
                Kind::Want => {
                    let n = send_wanted(&mut ch, &frame, &memory)?;
                    pages += n;
                    progress.total += n;
                    progress.show(pages);
                }
                Kind::Filled if running.is_some() => {
                    rounds.push(pages);
                    return Ok(running.take().unwrap());
                }
                Kind::Failed => bail!("{} could not restore {}: {}; the job goes on here", a.to, job.name, escape_bytes(&frame)),
                k => bail!("{} answered {k:?}; the job goes on here", a.to),
            }
        }
    };
    let answered = answer();
    progress.bar.done();
    let there = match answered {
        Ok(t) => t,
        Err(e) => {
            let _ = proto::send(sup.as_raw_fd(), &Msg::Handoff { exit: false }, None);
            return Err(e);
        }
    };
    let sent: u64 = rounds.iter().sum();
    let downtime = downtime.unwrap_or_else(|| paused.elapsed());
    // The job's sockets here close as it ends: first the address goes, so nothing answers its peers with a reset.
    if let Some(m) = &a.move_addr
        && let Err(e) = address::release(m) {
            eprintln!("vrun: migrate: letting go of {m}: {e:#}");
        }
    proto::send(sup.as_raw_fd(), &Msg::Handoff { exit: true }, None).map_err(|e| anyhow!("the job runs on {} as {there}, but ending it here failed: {e}", a.to))?;
    match proto::recv(sup.as_raw_fd()) {
        Ok(Some((Msg::CheckpointDone { .. }, _))) | Ok(None) => {}
        Ok(Some((Msg::CheckpointFailed { why }, _))) => bail!("the job runs on {} as {there}, but ending it here failed: {why}", a.to),
        _ => {}
    }
    if a.move_addr.is_some() {
        let _ = ch.send(Kind::Released, &[]);
    }
    let total = start.elapsed();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"job": job.name, "to": a.to, "name_there": there, "bytes": sent, "rounds": rounds,
                "total_ms": total.as_secs_f64() * 1e3, "downtime_ms": downtime.as_secs_f64() * 1e3})
        );
    } else if !a.quiet {
        let per_round: Vec<String> = rounds.iter().map(|b| format!("{:.1}", mib(*b))).collect();
        eprintln!(
            "vrun: {} moved to {} as {there} in {:.0} ms: {:.1} MiB sent in {} round{} (MiB: {}); the job was stopped for {:.0} ms",
            job.name,
            a.to,
            total.as_secs_f64() * 1e3,
            mib(sent),
            rounds.len(),
            if rounds.len() == 1 { "" } else { "s" },
            per_round.join(", "),
            downtime.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
