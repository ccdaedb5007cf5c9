//! `vrun migrate`: move a running job to the `vrun serve` of another host. The job's supervisor writes its
//! image into a pipe; we relay it, framed and authenticated, to the destination, which restores it as it
//! arrives. Nothing is written to disk on either side. The handoff is atomic: the job here ends only once the
//! destination says it runs there; any failure before that (a refused key, a broken connection, a failed
//! restore) lets it go on here as if nothing had happened.
//!
//! The one window left: the destination has the job running and said so, and the connection breaks before
//! its word arrives. Then both copies run (the destination's is never killed once running: that would lose
//! its new state); `vrun migrate` says so.

use crate::address::{self, Address};
use crate::channel::{self, Channel, Kind, MAX_FRAME};
use crate::runtime;
use anyhow::{Context, Result, anyhow, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde::{Deserialize, Serialize};
use std::io::{IsTerminal, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vos::proto::{self, Msg};

/// What the destination needs to know before the image.
#[derive(Serialize, Deserialize)]
pub struct Begin {
    pub name: String,
    /// `--map-addr` re-bindings for the restore there.
    pub map_addr: Vec<(String, String)>,
    /// `--move-addr`: the address the destination takes before the restore.
    pub address: Option<String>,
}

pub struct Args {
    pub name: Option<String>,
    pub to: String,
    pub key: Option<PathBuf>,
    pub tcp_established: bool,
    pub bundle: bool,
    pub map_addr: Vec<(String, String)>,
    pub move_addr: Option<Address>,
    pub quiet: bool,
    pub json: bool,
}

/// Progress on stderr: a line rewritten in place on a terminal, a line a second otherwise.
struct Progress {
    on: bool,
    tty: bool,
    start: Instant,
    last: Instant,
}

impl Progress {
    fn show(&mut self, bytes: u64, done: bool) {
        if !self.on || (!done && self.last.elapsed() < Duration::from_millis(if self.tty { 100 } else { 1000 })) {
            return;
        }
        self.last = Instant::now();
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let line = format!("vrun: migrate: {:.1} MiB sent, {:.0} MiB/s", mib(bytes), mib(bytes) / secs);
        let mut e = std::io::stderr();
        let _ = if self.tty { write!(e, "\r{line}\x1b[K{}", if done { "\n" } else { "" }) } else { writeln!(e, "{line}") };
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

pub fn run(a: Args) -> Result<()> {
    let job = runtime::find(a.name.as_deref())?;
    let key = channel::key(a.key.as_deref())?;
    if let Some(m) = &a.move_addr {
        address::holder(m)?.ok_or_else(|| anyhow!("--move-addr {m}: this host does not hold that address"))?;
    }
    let start = Instant::now();
    let mut ch = Channel::connect(&a.to, &key)?;
    let begin = Begin { name: job.name.clone(), map_addr: a.map_addr.clone(), address: a.move_addr.as_ref().map(|m| m.to_string()) };
    ch.send(Kind::Begin, &rmp_serde::to_vec_named(&begin)?)?;

    let raw = proto::connect(&job.sock).map_err(|e| anyhow!("cannot reach the supervisor of job {}: {e}", job.name))?;
    // SAFETY: a fresh fd from connect, ours alone.
    let sup = unsafe { OwnedFd::from_raw_fd(raw) };
    let (image, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let _ = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
    let ask = Msg::Checkpoint { kill: false, to: None, fd_attached: true, bundle: a.bundle, tcp_established: a.tcp_established, handoff: true };
    proto::send(sup.as_raw_fd(), &ask, Some(w.as_raw_fd())).map_err(|e| anyhow!("talking to the supervisor: {e}"))?;
    drop(w);
    let paused = Instant::now();
    let mut progress = Progress { on: !a.quiet && !a.json, tty: std::io::stderr().is_terminal(), start: paused, last: paused };

    // From here until the handoff the job is stopped; leaving early (an error) drops `sup`, and a supervisor
    // that loses its migration lets the job go on.
    let mut buf = vec![0u8; MAX_FRAME];
    let mut sent = 0u64;
    let mut relay = |ch: &mut Channel, nonblocking: bool| -> Result<bool> {
        let n = match nix::unistd::read(&image, &mut buf) {
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN) if nonblocking => return Ok(false),
            Err(nix::errno::Errno::EINTR) => return Ok(true),
            Err(e) => bail!("reading the image: {e}"),
        };
        if n == 0 {
            return Ok(false);
        }
        ch.send(Kind::Data, &buf[..n]).context("the destination went away during the transfer; the job goes on here")?;
        sent += n as u64;
        progress.show(sent, false);
        Ok(true)
    };
    loop {
        let mut fds = [PollFd::new(image.as_fd(), PollFlags::POLLIN), PollFd::new(sup.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => bail!("poll: {e}"),
        }
        if fds[0].revents().is_some_and(|r| r.intersects(PollFlags::POLLIN)) {
            relay(&mut ch, false)?;
            continue;
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            match proto::recv(sup.as_raw_fd()) {
                Ok(Some((Msg::Written, _))) => break,
                Ok(Some((Msg::CheckpointFailed { why }, _))) => bail!("checkpoint of {} failed: {why}; it goes on here", job.name),
                _ => bail!("the supervisor of {} went away", job.name),
            }
        }
    }
    // The whole image is in the pipe now: send what is left of it.
    nix::fcntl::fcntl(&image, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))?;
    while relay(&mut ch, true)? {}
    ch.send(Kind::End, &[])?;
    progress.show(sent, true);
    ch.stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let answer = ch.recv();
    let there = match answer {
        Ok((Kind::Running, n)) => String::from_utf8_lossy(&n).into_owned(),
        Ok((Kind::Failed, why)) => {
            let _ = proto::send(sup.as_raw_fd(), &Msg::Handoff { exit: false }, None);
            bail!("{} could not restore {}: {}; the job goes on here", a.to, job.name, String::from_utf8_lossy(&why));
        }
        Ok((k, _)) => {
            let _ = proto::send(sup.as_raw_fd(), &Msg::Handoff { exit: false }, None);
            bail!("{} answered {k:?}; the job goes on here", a.to);
        }
        Err(e) => {
            let _ = proto::send(sup.as_raw_fd(), &Msg::Handoff { exit: false }, None);
            bail!("{e:#}; the job goes on here (if {} had started it already, it runs there too: check `vrun list` there)", a.to);
        }
    };
    let downtime = paused.elapsed();
    // The job's sockets here close as it ends: first the address goes, so nothing answers its peers with a reset.
    if let Some(m) = &a.move_addr {
        if let Err(e) = address::release(m) {
            eprintln!("vrun: migrate: letting go of {m}: {e:#}");
        }
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
            serde_json::json!({"job": job.name, "to": a.to, "name_there": there, "bytes": sent, "rounds": [sent],
                "total_ms": total.as_secs_f64() * 1e3, "downtime_ms": downtime.as_secs_f64() * 1e3})
        );
    } else if !a.quiet {
        eprintln!(
            "vrun: {} moved to {} as {there} in {:.0} ms: {:.1} MiB sent in 1 round ({:.0} MiB/s); the job was paused for {:.0} ms",
            job.name,
            a.to,
            total.as_secs_f64() * 1e3,
            mib(sent),
            mib(sent) / downtime.as_secs_f64().max(1e-3),
            downtime.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
