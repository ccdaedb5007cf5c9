//! Progress of a long operation (checkpoint, restore, migration) on stderr: a bar rewritten in place on a
//! terminal, a plain line a second otherwise; nothing at all for an operation done within `after`, or when quiet.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    label: String,
    on: bool,
    tty: bool,
    start: Instant,
    last: Option<Instant>,
    /// Shown only once the operation has run this long.
    after: Duration,
    shown: bool,
}

pub fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

impl Progress {
    pub fn new(label: &str, quiet: bool, after: Duration) -> Progress {
        Progress { label: label.into(), on: !quiet, tty: std::io::stderr().is_terminal(), start: Instant::now(), last: None, after, shown: false }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// `done` bytes so far, of `total` when known (then a bar and the time left), the rate measured over `rate_of`
    /// bytes since the start, and a note after.
    pub fn show(&mut self, done: u64, total: Option<u64>, rate_of: u64, note: &str) {
        let every = Duration::from_millis(if self.tty { 100 } else { 1000 });
        if !self.on || self.start.elapsed() < self.after || self.last.is_some_and(|l| l.elapsed() < every) {
            return;
        }
        self.last = Some(Instant::now());
        self.shown = true;
        let rate = rate_of as f64 / self.start.elapsed().as_secs_f64().max(1e-3);
        let mut line = format!("vrun: {}: ", self.label);
        match total.filter(|&t| t > 0) {
            Some(t) => {
                let frac = (done as f64 / t as f64).min(1.0);
                if self.tty {
                    let n = (frac * 24.0) as usize;
                    line += &format!("[{}{}] ", "#".repeat(n), "-".repeat(24 - n));
                }
                line += &format!("{:.1} of {:.1} MiB ({:.0}%), {:.0} MiB/s", mib(done), mib(t), frac * 100.0, rate / (1 << 20) as f64);
                if t > done && rate > 0.0 {
                    line += &format!(", {:.1} s left", (t - done) as f64 / rate);
                }
            }
            None => line += &format!("{:.1} MiB, {:.0} MiB/s", mib(done), rate / (1 << 20) as f64),
        }
        line += note;
        let mut e = std::io::stderr();
        let _ = if self.tty { write!(e, "\r{line}\x1b[K") } else { writeln!(e, "{line}") };
    }

    /// The operation is over: a bar on a terminal is cleared (the summary that follows takes its place).
    pub fn done(&self) {
        if self.shown && self.tty {
            eprint!("\r\x1b[K");
        }
    }
}
