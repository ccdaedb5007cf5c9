//! Helpers for vOS's end-to-end tests: run real programs under `vrun`, checkpoint, restore, and read what they
//! printed. The binaries under test are the workspace's release build (`cargo build --release` first), or those
//! in $VOS_BIN.

pub mod hosts;
pub mod image;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Where vrun, libvos_shim.so and vos-restore are.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("VOS_BIN").map(PathBuf::from).unwrap_or_else(|| repo().join("target/release"))
}

pub fn vrun() -> Command {
    let p = bin_dir().join("vrun");
    assert!(p.exists(), "{} missing: run `cargo build --release` first", p.display());
    command(p)
}

/// A command with stdin from /dev/null that inherits none of the test runner's fds but 0-2.
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    c.stdin(Stdio::null());
    use std::os::unix::process::CommandExt;
    // SAFETY: close_range only closes fds in the child before exec; a job must not inherit the test
    // runner's stray fds (the checkpoint would rightly refuse them).
    unsafe {
        c.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    c
}

/// A scratch directory for one test, removed when the test passes.
pub struct Work {
    pub dir: PathBuf,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Work {
    pub fn new(test: &str) -> Work {
        let dir = std::env::temp_dir().join(format!("vos-test-{test}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Work { dir }
    }
    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }
    pub fn s(&self, f: &str) -> String {
        self.path(f).display().to_string()
    }
    /// A job name unique to this test run.
    pub fn name(&self, base: &str) -> String {
        format!("{base}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("test files kept in {}", self.dir.display());
        }
    }
}

/// Compile tests/programs/NAME.c (once per test binary run) and return the executable.
pub fn gcc(name: &str) -> PathBuf {
    let src = repo().join("tests/programs").join(format!("{name}.c"));
    let outdir = repo().join("target/vos-test-programs");
    fs::create_dir_all(&outdir).unwrap();
    let out = outdir.join(name);
    // Newer than its source and the headers beside it.
    let newest = fs::read_dir(repo().join("tests/programs"))
        .unwrap()
        .flatten()
        .filter(|e| e.path() == src || e.path().extension().is_some_and(|x| x == "h"))
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max();
    let fresh = |o: &Path| fs::metadata(o).ok().and_then(|m| m.modified().ok()).zip(newest).is_some_and(|(a, b)| a >= b);
    if !fresh(&out) {
        // Tests run in parallel threads and may compile the same program at once: one temporary name each.
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = outdir.join(format!(".{name}.{}.{seq}", std::process::id()));
        let st = Command::new("gcc").args(["-O2", "-g", "-pthread", "-o"]).arg(&tmp).arg(&src).status().expect("gcc");
        assert!(st.success(), "gcc {name}.c failed");
        fs::rename(&tmp, &out).unwrap();
    }
    out
}

/// A `vrun` process (a launched or restored job, in the foreground).
pub struct Running {
    /// Where its supervisor registers (vrun's runtime directory as this test sees it).
    pub runtime: PathBuf,
    pub child: Option<Child>,
    pub name: String,
}

/// Start `c` (a vrun that runs or restores job `name`), appending its stdout and stderr to the files.
pub fn spawn(mut c: Command, name: &str, stdout: &Path, stderr: &Path) -> Running {
    let out = fs::OpenOptions::new().create(true).append(true).open(stdout).unwrap();
    let err = fs::OpenOptions::new().create(true).append(true).open(stderr).unwrap();
    c.stdout(out).stderr(err);
    Running::new(c.spawn().expect("spawning vrun"), name)
}

/// Start `argv` under vrun as job `name`, images to the work dir; its stdout appends to `stdout`.
pub fn launch(w: &Work, name: &str, argv: &[&str], stdout: &Path) -> Running {
    let mut c = vrun();
    c.args(["--name", name, "--dir"]).arg(&w.dir).arg("--").args(argv);
    spawn(c, name, stdout, &w.path("vrun.err"))
}

/// Restore `image` as job `name`.
pub fn restore(w: &Work, name: &str, image: &str, stdout: &Path) -> Running {
    let mut c = vrun();
    c.args(["restore", "--name", name, "--dir"]).arg(&w.dir).arg(image);
    spawn(c, name, stdout, &w.path("vrun.err"))
}

impl Running {
    pub fn new(child: Child, name: &str) -> Running {
        Running { child: Some(child), name: name.into(), runtime: PathBuf::from("/run/vos") }
    }

    /// `vrun checkpoint NAME [--kill]`: the image's path.
    pub fn checkpoint(&self, kill: bool) -> String {
        self.checkpoint_with(if kill { &["--kill"] } else { &[] })
    }

    /// `vrun checkpoint NAME ARGS...`: the image's path.
    pub fn checkpoint_with(&self, args: &[&str]) -> String {
        let o = vrun().args(["checkpoint", &self.name]).args(args).output().unwrap();
        assert!(o.status.success(), "vrun checkpoint {} failed: {}", self.name, String::from_utf8_lossy(&o.stderr));
        let path = String::from_utf8_lossy(&o.stdout).lines().last().unwrap_or_default().to_string();
        assert!(Path::new(&path).exists(), "checkpoint printed {path:?}, which does not exist");
        path
    }

    /// Checkpoint and stop the job; `vrun` must exit with 75.
    pub fn checkpoint_kill(self) -> String {
        self.checkpoint_kill_with(&[])
    }

    /// `checkpoint_kill` with more checkpoint options.
    pub fn checkpoint_kill_with(mut self, args: &[&str]) -> String {
        let p = self.checkpoint_with(&[&["--kill"], args].concat());
        let st = self.wait(Duration::from_secs(20));
        assert_eq!(st.code(), Some(75), "vrun after checkpoint --kill: {st:?}");
        p
    }

    pub fn pid(&self) -> i32 {
        pid_in(&self.runtime, &self.name)
    }

    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        let c = self.child.as_mut().unwrap();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                self.child = None;
                return st;
            }
            if start.elapsed() > timeout {
                panic!("job {} did not end within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The host pid of running job `name`'s main process (0 when none runs), from vrun's runtime directory.
pub fn job_pid(name: &str) -> i32 {
    pid_in(Path::new("/run/vos"), name)
}

/// The pid registered for `name` under `runtime`, waiting a moment for a job that is registering or whose
/// process is being made (0 when none comes).
fn pid_in(runtime: &Path, name: &str) -> i32 {
    let t = Instant::now();
    loop {
        let pid = registered_pid(runtime, name);
        if pid > 0 && Path::new(&format!("/proc/{pid}")).exists() || t.elapsed() > Duration::from_secs(5) {
            return pid;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Job `name`'s registry entry under vrun's runtime directory `runtime`.
pub fn entry_path(runtime: &Path, name: &str) -> PathBuf {
    runtime.join("jobs").join(format!("{name}.json"))
}

/// The pid registered for `name` under `runtime` (0 when no job runs, or it is still starting).
pub fn registered_pid(runtime: &Path, name: &str) -> i32 {
    registered_field(runtime, name, "pid")
}

/// A number of job `name`'s registry entry ("pid", "init", "supervisor"); 0 when there is none yet: the entry is
/// made (empty) when the name is taken, and gets its JSON once the job runs.
pub fn registered_field(runtime: &Path, name: &str, field: &str) -> i32 {
    let j = fs::read_to_string(entry_path(runtime, name)).unwrap_or_default();
    if !j.trim_end().ends_with('}') {
        return 0;
    }
    let key = format!("\"{field}\":");
    j.find(&key).and_then(|i| j[i + key.len()..].trim_start().split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()).unwrap_or(0)
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = registered_pid(&self.runtime, &self.name);
            if pid > 0 {
                // SAFETY: kill has no memory effects.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Wait until `pred` holds for the file's contents; returns them.
pub fn wait_for(path: &Path, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(path) {
            let _ = f.read_to_string(&mut s);
        }
        if pred(&s) {
            return s;
        }
        if start.elapsed() > timeout {
            panic!("timed out waiting for {what} in {}; it holds:\n{}", path.display(), tail(&s, 20));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tail(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

/// The highest N of the lines "step N ..." in `s`.
pub fn last_step(s: &str) -> i64 {
    s.lines().filter_map(step_of).max().unwrap_or(-1)
}

pub fn step_of(l: &str) -> Option<i64> {
    l.strip_prefix("step ")?.split_whitespace().next()?.parse().ok()
}

/// Wait until the program printed step `n` or beyond.
pub fn wait_step(path: &Path, n: i64) -> String {
    wait_for(path, &format!("step {n}"), Duration::from_secs(60), |s| last_step(s) >= n || s.contains("MISMATCH") || s.contains("BROKEN"))
}

/// Every "step N" line appears exactly once, in order 0..total, followed by "done"; no error lines.
pub fn assert_steps(s: &str, total: i64) {
    let steps: Vec<i64> = s.lines().filter_map(step_of).collect();
    let bad: Vec<&str> = s.lines().filter(|l| step_of(l).is_none() && *l != "done" && !l.starts_with("usr2") && !l.starts_with("total")).collect();
    assert!(bad.is_empty(), "unexpected lines: {bad:?}");
    let expect: Vec<i64> = (0..total).collect();
    if steps != expect {
        let first_bad = steps.iter().zip(&expect).position(|(a, b)| a != b).unwrap_or(steps.len().min(expect.len()));
        panic!("steps are not 0..{total} exactly once: first difference at index {first_bad}: {:?}", &steps[first_bad.saturating_sub(3)..(first_bad + 3).min(steps.len())]);
    }
    assert_eq!(s.lines().last(), Some("done"), "the program did not finish");
}

/// Run vrun with arguments and return (status, stdout, stderr).
pub fn run_vrun(args: &[&str]) -> (ExitStatus, String, String) {
    let o = vrun().args(args).output().unwrap();
    (o.status, String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Launch `argv`, and twice in a row: wait (`wait(n)` with n = 1, 2), checkpoint --kill, restore. Returns the
/// last restored job, running.
pub fn cycle(w: &Work, test: &str, argv: &[&str], stdout: &Path, wait: &dyn Fn(u32)) -> Running {
    let name = w.name(test);
    let mut job = launch(w, &name, argv, stdout);
    let mut images = vec![];
    for n in 1..=2 {
        wait(n);
        let img = job.checkpoint_kill();
        assert!(!images.contains(&img));
        images.push(img.clone());
        job = restore(w, &name, &img, &w.path(&format!("restore{n}.out")));
    }
    job
}

/// `cycle` for programs that print "step N" lines on stdout (a regular file, reopened at its offset by each
/// restore): every step must be in it exactly once, and both checkpoints fall inside the run.
pub fn twice(test: &str, argv: &[&str], steps: i64, w: &Work) -> String {
    let out = w.path("out.txt");
    let at = std::cell::Cell::new(vec![]);
    let mut job = cycle(w, test, argv, &out, &|n| {
        let before = last_step(&fs::read_to_string(&out).unwrap_or_default());
        let s = last_step(&wait_step(&out, before.max(0) + 5));
        let mut v = at.take();
        v.push((n, s));
        at.set(v);
    });
    let st = job.wait(Duration::from_secs(120));
    let text = fs::read_to_string(&out).unwrap();
    assert!(st.success(), "restored job ended with {st:?}; output tail: {}", text.lines().rev().take(5).collect::<Vec<_>>().join(" | "));
    let at = at.take();
    assert!(at.iter().all(|(_, s)| *s < steps), "checkpoints must fall inside the run ({at:?} of {steps})");
    assert_steps(&text, steps);
    text
}

/// A client of a line protocol (tests/programs/counter_server.c): one line out, one line back.
pub struct LineClient {
    r: std::io::BufReader<std::net::TcpStream>,
}

impl LineClient {
    /// Connect to `addr` (IP:PORT), retrying for up to 20 s while nothing listens there.
    pub fn connect(addr: &str) -> LineClient {
        let to: std::net::SocketAddr = addr.parse().unwrap();
        let t = Instant::now();
        loop {
            match std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    return LineClient { r: std::io::BufReader::new(s) };
                }
                Err(e) => assert!(t.elapsed() < Duration::from_secs(20), "nothing listens at {addr}: {e}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn ask(&mut self, what: &str) -> std::io::Result<String> {
        use std::io::{BufRead, Write};
        self.r.get_mut().write_all(format!("{what}\n").as_bytes())?;
        let mut l = String::new();
        if self.r.read_line(&mut l)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
        }
        Ok(l.trim().to_string())
    }

    pub fn inc(&mut self) -> i64 {
        self.ask("inc").unwrap().parse().unwrap()
    }
}

/// What a `vrun` run that may refuse did.
pub struct Outcome {
    /// None: it did not end in time (and was killed).
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    /// It restored a job (registered under its name), which was then ended.
    pub ran: bool,
}

/// Run `c` (a `vrun inspect`, or a `vrun restore --name NAME`) for at most `timeout`, its output to files in `w`.
/// A restore that succeeded is ended at once: its job, then vrun.
pub fn run_bounded(w: &Work, mut c: Command, name: Option<&str>, timeout: Duration) -> Outcome {
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let (out, err) = (w.path(&format!("bounded-{seq}.out")), w.path(&format!("bounded-{seq}.err")));
    c.stdout(fs::File::create(&out).unwrap()).stderr(fs::File::create(&err).unwrap());
    let mut child = c.spawn().expect("spawning vrun");
    let start = Instant::now();
    let mut ran = false;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        let pid = name.map_or(0, |n| registered_pid(Path::new("/run/vos"), n));
        if pid > 0 {
            ran = true;
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let t = Instant::now();
            while child.try_wait().unwrap().is_none() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            break child.wait().ok();
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let read = |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned();
    Outcome { status, stdout: read(&out), stderr: read(&err), ran }
}

/// Words in a refusal that mean vrun or vos-restore broke rather than refused.
pub const CRASH_WORDS: [&str; 4] = ["ended without a word", "never reported", "internal error", "panicked"];

impl Outcome {
    /// vrun refused cleanly: exit status 1, a `vrun:` message naming one of `expect` (any message if empty),
    /// nothing that says it crashed, and no job ran.
    pub fn assert_refused(&self, what: &str, expect: &[&str]) {
        use std::os::unix::process::ExitStatusExt;
        let st = self.status.unwrap_or_else(|| panic!("{what}: vrun did not end in time; stderr: {}", self.stderr));
        assert_eq!((st.code(), st.signal()), (Some(1), None), "{what}: vrun ended with {st:?}; stderr: {}", self.stderr);
        assert!(!self.ran, "{what}: the job was restored and ran");
        let msg = self.stderr.lines().find(|l| l.starts_with("vrun: ")).unwrap_or_else(|| panic!("{what}: no `vrun:` message in {:?}", self.stderr));
        assert!(expect.is_empty() || expect.iter().any(|e| msg.contains(e)), "{what}: message {msg:?} names none of {expect:?}");
        assert!(!CRASH_WORDS.iter().any(|c| self.stderr.contains(c)), "{what}: a crash, not a refusal: {}", self.stderr);
    }
}
