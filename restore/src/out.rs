//! Error messages without an allocator: a fixed buffer with hex and decimal numbers.

use crate::sys::Errno;

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
