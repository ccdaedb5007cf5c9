//! The job's terminal: its modes (termios), size and foreground process group. At restore the job comes back
//! on the terminal of `vrun restore`: same modes, the same group in the foreground, and a SIGWINCH so
//! full-screen programs redraw for the (maybe different) size.

use crate::files::grab;
use crate::job::{self, Member};
use anyhow::Result;
use serde_bytes::ByteBuf;
use std::os::fd::{AsRawFd, RawFd};
use vos::image::{FileKind, JobImage, TerminalImage};

/// The first terminal any process of the job has open.
pub fn capture(job: &JobImage, members: &[Member]) -> Result<Option<TerminalImage>> {
    for p in &job.processes {
        for fd in &p.fds {
            if !matches!(job.files[fd.file as usize].kind, FileKind::Terminal { .. }) {
                continue;
            }
            let Some(host) = job::host_of(members, p.pid) else { continue };
            let t = grab(host.as_raw(), fd.fd)?;
            return Ok(Some(read(t.as_raw_fd(), members)?));
        }
    }
    Ok(None)
}

fn read(fd: RawFd, members: &[Member]) -> Result<TerminalImage> {
    // SAFETY: termios and winsize are plain data filled by the kernel.
    let (mut tio, mut ws): (libc::termios, libc::winsize) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    // SAFETY: valid out-parameters for a terminal fd.
    unsafe {
        if libc::tcgetattr(fd, &mut tio) < 0 {
            anyhow::bail!("tcgetattr: {}", std::io::Error::last_os_error());
        }
        libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws);
    }
    // SAFETY: tcgetpgrp on a terminal fd.
    let fg = unsafe { libc::tcgetpgrp(fd) };
    let foreground = members.iter().find(|m| m.host.as_raw() == fg).map(|m| m.ids.pid).unwrap_or(0);
    // SAFETY: viewing termios as bytes.
    let raw = unsafe { std::slice::from_raw_parts(&tio as *const libc::termios as *const u8, std::mem::size_of::<libc::termios>()) };
    Ok(TerminalImage { termios: ByteBuf::from(raw.to_vec()), rows: ws.ws_row, cols: ws.ws_col, foreground })
}

/// The restoring supervisor's terminal, if any of its standard streams is one.
pub fn own_tty() -> Option<RawFd> {
    // SAFETY: isatty has no memory effects.
    (0..=2).find(|&fd| unsafe { libc::isatty(fd) } == 1)
}

/// Put the job's terminal modes back on our terminal.
pub fn restore_modes(t: &TerminalImage) {
    let Some(tty) = own_tty() else { return };
    if t.termios.len() != std::mem::size_of::<libc::termios>() {
        return;
    }
    // SAFETY: same size checked; termios is plain data.
    let tio: libc::termios = unsafe { std::ptr::read_unaligned(t.termios.as_ptr() as *const libc::termios) };
    // SAFETY: tcsetattr on our own terminal.
    unsafe { libc::tcsetattr(tty, libc::TCSANOW, &tio) };
}

/// Give the terminal to the job's foreground group (once its processes exist) and let it redraw.
pub fn hand_over(t: &TerminalImage, members: &[Member]) {
    let Some(tty) = own_tty() else { return };
    if t.foreground == 0 {
        return;
    }
    let Some(group) = job::host_of(members, t.foreground) else { return };
    // SAFETY: tcsetpgrp and kill on our own terminal and the job's group. We are in the foreground, so no SIGTTOU;
    // ignore it anyway for the moment of the call.
    unsafe {
        let old = libc::signal(libc::SIGTTOU, libc::SIG_IGN);
        libc::tcsetpgrp(tty, group.as_raw());
        libc::signal(libc::SIGTTOU, old);
        libc::kill(-group.as_raw(), libc::SIGWINCH);
    }
}
