//! The supervisor's loop: one thread polling the signals sent to vrun, connections on the job's socket
//! (`vrun checkpoint`, `vrun migrate`, a trigger signal the shim passes on) and the job's status; periodic
//! checkpoints on a timer. The supervisor's state is `job::supervisor`; what a checkpoint does is `checkpoint`.

use crate::checkpoint::{Dest, Request};
use crate::job::supervisor::{Supervisor, send_signal};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Instant;
use vos::proto::{self, Msg, Trigger};

impl Supervisor {
    /// Serve until the job's main process ends; returns the exit status to leave with.
    pub fn run(mut self) -> ! {
        let mut next_interval = self.opts.interval.map(|d| Instant::now() + d);
        loop {
            let timeout = match next_interval {
                Some(t) => PollTimeout::try_from(t.saturating_duration_since(Instant::now())).unwrap_or(PollTimeout::MAX),
                None => PollTimeout::NONE,
            };
            let mut fds = [
                PollFd::new(self.sigfd.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.listener.fd.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.job.status.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => self.die(&format!("poll: {e}")),
            }
            let ready = |i: usize| fds[i].revents().is_some_and(|r| !r.is_empty());
            let (sig_ready, conn_ready, status_ready) = (ready(0), ready(1), ready(2));
            if status_ready {
                self.finish();
            }
            if sig_ready {
                self.on_signals();
            }
            if conn_ready {
                self.on_connection();
            }
            if let Some(t) = next_interval
                && Instant::now() >= t {
                    let req = Request::to_dir(false, "interval");
                    match self.checkpoint(req, None) {
                        Ok(_) => self.prune(),
                        Err(e) => self.say(&format!("periodic checkpoint failed: {e:#}")),
                    }
                    next_interval = self.opts.interval.map(|d| Instant::now() + d);
                }
            if let Some(sig) = self.pending_trigger.take() {
                let req = Request::to_dir(sig == self.opts.signals.1, "signal");
                match self.checkpoint(req, None) {
                    Ok(Some(p)) => self.say(&format!("checkpoint written to {p}")),
                    Ok(None) => {}
                    Err(e) => self.say(&format!("checkpoint failed: {e:#}")),
                }
            }
        }
    }

    fn on_signals(&mut self) {
        while let Ok(Some(si)) = self.sigfd.read_signal() {
            let sig = si.ssi_signo as i32;
            if sig == libc::SIGCHLD {
                continue;
            }
            // Signals the terminal sends to the foreground process group reach the job directly.
            if si.ssi_code == libc::SI_KERNEL {
                continue;
            }
            let _ = send_signal(self.job.app, sig);
        }
    }

    fn on_connection(&mut self) {
        let Some((conn, msg, fd)) = self.accept() else { return };
        // `vrun checkpoint --image-key` sends the key file's bytes first, then its request.
        let (msg, fd, sign) = match msg {
            Msg::SignWith { key } => {
                drop(fd.map(crate::os::owned));
                let Ok(raw) = <[u8; 32]>::try_from(key.as_slice()) else { return };
                match proto::recv(conn.as_raw_fd()) {
                    Ok(Some((m @ Msg::Checkpoint { .. }, fd))) => (m, fd, Some(crate::image::sign::Key::derive(&raw, "the key of `vrun checkpoint`".into()))),
                    _ => return,
                }
            }
            m => (m, fd, None),
        };
        match msg {
            Msg::Precopy => {
                let Some(out) = fd.map(crate::os::owned) else { return };
                let answer = match self.precopy(out, &conn) {
                    Ok(()) => Msg::PrecopyDone,
                    Err(e) => Msg::CheckpointFailed { why: format!("{e:#}") },
                };
                let _ = proto::send(conn.as_raw_fd(), &answer, None);
            }
            Msg::Checkpoint { kill, to, fd_attached, bundle, tcp_established, handoff, pages } => {
                let dest = match (to, fd_attached, fd) {
                    (_, true, Some(fd)) => Dest::Stream { fd: crate::os::owned(fd), name: None },
                    (Some(p), _, _) => match Dest::to_path(std::path::Path::new(&p)) {
                        Ok(d) => d,
                        Err(e) => {
                            let _ = proto::send(conn.as_raw_fd(), &Msg::CheckpointFailed { why: format!("{e:#}") }, None);
                            return;
                        }
                    },
                    _ => Dest::Dir,
                };
                if sign.is_some() && matches!(dest, Dest::Stream { .. }) {
                    let why = "an image written to a stream cannot be signed (it is never read back): write it to a file".to_string();
                    let _ = proto::send(conn.as_raw_fd(), &Msg::CheckpointFailed { why }, None);
                    return;
                }
                // A migration's client shows its own progress; a checkpoint's is told how far the image is.
                let (handoff, progress) = match handoff {
                    true => (Some(conn.try_clone().expect("dup")), None),
                    false => (None, conn.try_clone().ok()),
                };
                let reason = if handoff.is_some() { "migration" } else { "request" };
                let req = Request { kill, dest, reason, bundle, tcp_established, handoff, pages, progress, sign };
                let start = Instant::now();
                let answer = match self.checkpoint(req, None) {
                    Ok(path) => Msg::CheckpointDone { path, bytes: 0, millis: start.elapsed().as_millis() as u64, signed: self.last_signed.clone() },
                    Err(e) => Msg::CheckpointFailed { why: format!("{e:#}") },
                };
                let _ = proto::send(conn.as_raw_fd(), &answer, None);
            }
            Msg::Hello { pid, trigger } => {
                // A trigger signal from outside (kill -s RTMAX-1): a checkpoint to the job's directory. One of
                // ours heard only now belongs to a checkpoint that is over (the process was stopped meanwhile).
                let Trigger::Signal { sig } = trigger else {
                    let _ = proto::send(conn.as_raw_fd(), &Msg::Cancel { why: "no checkpoint is running".into() }, None);
                    return;
                };
                let kill = sig == self.opts.signals.1;
                let req = Request::to_dir(kill, "signal");
                match self.checkpoint(req, Some((conn, pid))) {
                    Ok(Some(p)) => self.say(&format!("checkpoint written to {p}")),
                    Ok(None) => {}
                    Err(e) => self.say(&format!("checkpoint failed: {e:#}")),
                }
            }
            _ => {}
        }
    }
}
