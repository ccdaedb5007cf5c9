//! Error messages without an allocator: a fixed buffer with hex and decimal numbers.

use crate::plan::{self, RestorerReport};
use crate::sys::{self, Errno};
use core::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// The control fd to the launcher (-1 until the plan names it: then messages go to stderr).
static CTL: AtomicI32 = AtomicI32::new(-1);
static FAILING: AtomicBool = AtomicBool::new(false);

pub fn set_ctl(fd: i32) {
    CTL.store(fd, Ordering::Relaxed);
}

/// Tell the launcher why the restore failed and end this process: the app never ran.
pub fn fail(m: &Msg) -> ! {
    if !FAILING.swap(true, Ordering::SeqCst) {
        report(plan::REPORT_FAILED, 0, 0, 0, m.as_str());
    }
    sys::exit_group(1)
}

/// Send the launcher this process's report; the control fd it went to, if there is one yet.
pub fn report(status: u32, next_seq: u64, pages: u64, lazy_runs: u32, text: &str) -> Option<i32> {
    let mut r = RestorerReport { magic: plan::REPORT_MAGIC, status, next_seq, pages, lazy_runs, _pad: 0, msg: [0; 240] };
    let n = text.len().min(r.msg.len() - 1);
    r.msg[..n].copy_from_slice(&text.as_bytes()[..n]);
    let ctl = CTL.load(Ordering::Relaxed);
    if ctl >= 0 {
        let _ = sys::write(ctl, r.as_bytes());
        Some(ctl)
    } else {
        let _ = sys::write(2, text.as_bytes());
        None
    }
}

pub struct Msg {
    buf: [u8; 232],
    len: usize,
}

impl Msg {
    pub fn new(s: &str) -> Msg {
        let mut m = Msg { buf: [0; 232], len: 0 };
        m.push(s);
        m
    }
    pub fn push(&mut self, s: &str) -> &mut Msg {
        for &b in s.as_bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        self
    }
    pub fn hex(&mut self, v: u64) -> &mut Msg {
        self.push("0x");
        let digits = b"0123456789abcdef";
        let mut started = false;
        for i in (0..16).rev() {
            let d = ((v >> (i * 4)) & 0xf) as usize;
            if d != 0 || started || i == 0 {
                started = true;
                let c = [digits[d]];
                // SAFETY: an ASCII digit is valid UTF-8.
                self.push(unsafe { core::str::from_utf8_unchecked(&c) });
            }
        }
        self
    }
    pub fn dec(&mut self, v: u64) -> &mut Msg {
        let mut tmp = [0u8; 20];
        let mut n = 0;
        let mut v = v;
        loop {
            tmp[n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        for i in (0..n).rev() {
            let c = [tmp[i]];
            // SAFETY: an ASCII digit is valid UTF-8.
            self.push(unsafe { core::str::from_utf8_unchecked(&c) });
        }
        self
    }
    pub fn errno(&mut self, e: Errno) -> &mut Msg {
        self.push(e.name()).push(" (").dec(e.0 as u64).push(")")
    }
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?")
    }
}

impl core::fmt::Write for Msg {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.push(s);
        Ok(())
    }
}
