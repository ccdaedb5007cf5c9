//! The job's terminal: its modes (termios), size and foreground process group. At restore the job comes back
//! on the terminal of `vrun restore`: same modes, the same group in the foreground, and a SIGWINCH so
//! full-screen programs redraw for the (maybe different) size.

use crate::os::grab;
use crate::job::members::{self, Member};
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
            let Some(host) = members::task_of(members, p.pid) else { continue };
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

/// Give the terminal to the job's foreground group, once its processes exist and before they run (a background
/// group that touches the terminal is stopped).
pub fn hand_over(t: &TerminalImage, members: &[Member]) {
    let Some(tty) = own_tty() else { return };
    // A job in the foreground group of vrun's own (foreground 0) stays in ours, already in the foreground.
    if t.foreground == 0 {
        return;
    }
    let Some(group) = members::host_of(members, t.foreground) else { return };
    // SAFETY: tcsetpgrp on our own terminal and the job's group. We are in the foreground, so no SIGTTOU; ignore it
    // anyway for the moment of the call.
    unsafe {
        let old = libc::signal(libc::SIGTTOU, libc::SIG_IGN);
        libc::tcsetpgrp(tty, group.as_raw());
        libc::signal(libc::SIGTTOU, old);
    }
}

/// Make the running job's full-screen app redraw. It does only when the size really changes (vim ignores a
/// SIGWINCH that changes nothing), and only once it waits for input again (a signal that came while it was
/// being restored is handled before it waits): the terminal is one row shorter for a moment, then has its size
/// back. Each change signals the terminal's foreground group.
pub fn redraw() {
    let Some(tty) = own_tty() else { return };
    // SAFETY: winsize is plain data; TIOCGWINSZ/TIOCSWINSZ on our own terminal.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(tty, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_row > 1 {
            let short = libc::winsize { ws_row: ws.ws_row - 1, ..ws };
            std::thread::sleep(std::time::Duration::from_millis(50));
            libc::ioctl(tty, libc::TIOCSWINSZ, &short);
            std::thread::sleep(std::time::Duration::from_millis(100));
            libc::ioctl(tty, libc::TIOCSWINSZ, &ws);
        }
    }
}

// ---- pseudo-terminals made inside the job ------------------------------------------------------------------------

fn tcget(fd: RawFd) -> Result<libc::termios> {
    // SAFETY: termios is plain data filled by the kernel.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-parameter for a terminal fd.
    if unsafe { libc::tcgetattr(fd, &mut t) } < 0 {
        anyhow::bail!("tcgetattr: {}", std::io::Error::last_os_error());
    }
    Ok(t)
}

fn tcset(fd: RawFd, t: &libc::termios) {
    // SAFETY: tcsetattr with a termios read from the same kind of terminal.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, t) };
}

/// Bytes waiting to be read on `fd` (FIONREAD), read without blocking.
fn read_waiting(fd: RawFd) -> Vec<u8> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD with a valid int out-parameter.
    unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    let mut buf = vec![0u8; n.max(0) as usize];
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: reading into our buffer; FIONREAD said this much is there, so the read does not block.
        let r = unsafe { libc::read(fd, buf[got..].as_mut_ptr() as *mut libc::c_void, buf.len() - got) };
        if r <= 0 {
            break;
        }
        got += r as usize;
    }
    buf.truncate(got);
    buf
}

/// Put `output` back in the master's read queue and `input` in the terminal side's, as they were: written
/// with output processing, echo and input processing off for the moment, so no byte is processed twice.
fn refill(master: RawFd, slave: RawFd, t: &libc::termios, input: &[u8], output: &[u8]) -> Result<()> {
    use std::io::Write;
    let write = |fd: RawFd, b: &[u8]| -> Result<()> {
        // SAFETY: borrowing an fd we hold for the duration of the write.
        let mut f = std::mem::ManuallyDrop::new(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        f.write_all(b).map_err(|e| anyhow::anyhow!("refilling a pseudo-terminal: {e}"))
    };
    if !output.is_empty() {
        let mut raw = *t;
        raw.c_oflag &= !libc::OPOST;
        tcset(slave, &raw);
        write(slave, output)?;
    }
    if !input.is_empty() {
        let mut quiet = *t;
        quiet.c_lflag &= !(libc::ECHO | libc::ECHOE | libc::ECHOK | libc::ECHONL | libc::ECHOCTL | libc::ISIG | libc::IEXTEN | libc::ICANON);
        quiet.c_iflag &= !(libc::ICRNL | libc::INLCR | libc::IGNCR | libc::ISTRIP | libc::IXON | libc::IXOFF);
        quiet.c_cc[libc::VMIN] = 0;
        quiet.c_cc[libc::VTIME] = 0;
        tcset(slave, &quiet);
        write(master, input)?;
        // The terminal side takes written input asynchronously: wait until all of it is there.
        for _ in 0..1000 {
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD with a valid int out-parameter.
            unsafe { libc::ioctl(slave, libc::FIONREAD, &mut n) };
            if n as usize >= input.len() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    tcset(slave, t);
    Ok(())
}

/// A job's pseudo-terminal from its master and terminal sides (dups of the job's fds): modes, size, and the
/// bytes in flight, which are read and put back, so the job goes on as if nothing happened.
pub fn capture_pty(index: u32, master: RawFd, slave: RawFd) -> Result<vos::image::PtyImage> {
    let t = tcget(slave)?;
    // SAFETY: winsize is plain data; TIOCGWINSZ fills it.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-parameter.
    unsafe { libc::ioctl(slave, libc::TIOCGWINSZ, &mut ws) };
    let output = read_waiting(master);
    // A partial line of canonical input becomes readable once canonical mode is off.
    let mut raw = t;
    raw.c_lflag &= !libc::ICANON;
    raw.c_cc[libc::VMIN] = 0;
    raw.c_cc[libc::VTIME] = 0;
    tcset(slave, &raw);
    let input = read_waiting(slave);
    tcset(slave, &t);
    refill(master, slave, &t, &input, &output)?;
    // SAFETY: viewing termios as bytes.
    let tb = unsafe { std::slice::from_raw_parts(&t as *const libc::termios as *const u8, std::mem::size_of::<libc::termios>()) };
    Ok(vos::image::PtyImage { index, termios: ByteBuf::from(tb.to_vec()), rows: ws.ws_row, cols: ws.ws_col, input: ByteBuf::from(input), output: ByteBuf::from(output) })
}

/// A new pseudo-terminal pair like the job's: (master, terminal side).
pub fn make_pty(p: &vos::image::PtyImage) -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    // SAFETY: opening the pty multiplexer and its peer with plain syscalls; the fds are owned below.
    let (m, s) = unsafe {
        let m = libc::open(c"/dev/ptmx".as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if m < 0 {
            anyhow::bail!("opening /dev/ptmx: {}", std::io::Error::last_os_error());
        }
        let m = std::os::fd::OwnedFd::from_raw_fd(m);
        let unlock: libc::c_int = 0;
        libc::ioctl(m.as_raw_fd(), libc::TIOCSPTLCK, &unlock);
        let s = libc::ioctl(m.as_raw_fd(), libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if s < 0 {
            anyhow::bail!("opening a pseudo-terminal: {}", std::io::Error::last_os_error());
        }
        (m, std::os::fd::OwnedFd::from_raw_fd(s))
    };
    if p.termios.len() != std::mem::size_of::<libc::termios>() {
        anyhow::bail!("a pseudo-terminal's modes are malformed in the image");
    }
    // SAFETY: size checked; termios is plain data.
    let t: libc::termios = unsafe { std::ptr::read_unaligned(p.termios.as_ptr() as *const libc::termios) };
    let ws = libc::winsize { ws_row: p.rows, ws_col: p.cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ with a valid winsize.
    unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    tcset(s.as_raw_fd(), &t);
    refill(m.as_raw_fd(), s.as_raw_fd(), &t, &p.input, &p.output)?;
    Ok((m, s))
}

/// For each session leader whose controlling terminal is one of the job's pseudo-terminals: the fd it will make
/// it its controlling terminal again with, and that terminal's foreground group.
pub fn controlling_ptys(job: &mut JobImage, members: &[Member]) -> Result<()> {
    for i in 0..job.processes.len() {
        let p = &job.processes[i];
        if p.sid != p.pid {
            continue;
        }
        let Some(host) = members::task_of(members, p.pid) else { continue };
        let stat = std::fs::read_to_string(format!("/proc/{host}/stat")).unwrap_or_default();
        let after = stat.rfind(')').map(|i| &stat[i + 2..]).unwrap_or("");
        // Field 7 (tty_nr) is the 5th after the command name.
        let tty: u64 = after.split_whitespace().nth(4).and_then(|v| v.parse().ok()).unwrap_or(0);
        let (major, minor) = ((tty >> 8) & 0xfff, (tty & 0xff) | ((tty >> 12) & 0xfff00));
        if !(136..=143).contains(&major) {
            continue;
        }
        let index = ((major - 136) * 256 + minor) as u32;
        let Some(pty) = job.ptys.iter().position(|t| t.index == index) else { continue };
        let fd = p
            .fds
            .iter()
            .find(|f| matches!(job.files[f.file as usize].kind, FileKind::PtySlave { pty: q } if q as usize == pty))
            .map(|f| f.fd)
            .ok_or_else(|| anyhow::anyhow!("pid {}: its controlling terminal /dev/pts/{index} is not open in it: not supported", p.pid))?;
        let t = grab(host.as_raw(), fd)?;
        // SAFETY: tcgetpgrp on a terminal fd.
        let fg = unsafe { libc::tcgetpgrp(t.as_raw_fd()) };
        let foreground = members.iter().find(|m| m.host.as_raw() == fg).map(|m| m.ids.pid).unwrap_or(0);
        job.processes[i].ctty = Some(vos::image::Ctty { fd, foreground });
    }
    Ok(())
}
