//! Where an image and a job's output go: `checkpoint --to` with each kind of path, and a job started on a
//! terminal restored through a pipe, into files and by migration, its output and errors intact.

use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vos_tests::hosts::Net;
use vos_tests::*;

fn inspect_ok(img: &Path) {
    let (st, _, err) = run_vrun(&["inspect", img.to_str().unwrap()]);
    assert!(st.success(), "{}: {err}", img.display());
}

fn refused(name: &str, to: &str, why: &str) {
    let t = Instant::now();
    let (st, _, err) = run_vrun(&["checkpoint", name, "--to", to]);
    assert!(!st.success() && err.contains(why) && err.contains("goes on untouched"), "--to {to}: {err}");
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn to_writes_files_atomically_streams_in_place_and_refuses_the_rest() {
    let w = Work::new("to");
    let prog = gcc("heaplog");
    let out = w.path("out.txt");
    let name = w.name("to");
    let job = launch(&w, &name, &[prog.to_str().unwrap(), "8", &w.s("log.txt"), "100000"], &out);
    wait_step(&out, 3);
    // A character device is written in place: /dev/null stays /dev/null.
    assert_eq!(job.checkpoint_with(&["--to", "/dev/null"]), "/dev/null");
    let m = fs::metadata("/dev/null").unwrap();
    assert!(m.file_type().is_char_device(), "/dev/null was replaced");
    // A FIFO is written in place, for its reader.
    let fifo = w.path("img.fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let copy = w.path("from-fifo.vimg");
    let mut reader = std::process::Command::new("sh").arg("-c").arg(format!("cat {} > {}", fifo.display(), copy.display())).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    job.checkpoint_with(&["--to", fifo.to_str().unwrap()]);
    assert!(reader.wait().unwrap().success());
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "the FIFO was replaced");
    inspect_ok(&copy);
    // A FIFO nobody reads: refused at once, instead of waiting for a reader.
    refused(&name, fifo.to_str().unwrap(), "nothing reads");
    // A symbolic link: its target gets the image, the link stays.
    let target = w.path("target.vimg");
    fs::write(&target, "old").unwrap();
    let link = w.path("link.vimg");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    job.checkpoint_with(&["--to", link.to_str().unwrap()]);
    assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link was replaced");
    inspect_ok(&target);
    // A socket: connected to and written as a stream.
    let sock = w.path("img.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let got = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut v = vec![];
        c.read_to_end(&mut v).unwrap();
        v
    });
    job.checkpoint_with(&["--to", sock.to_str().unwrap()]);
    let bytes = got.join().unwrap();
    fs::write(w.path("from-socket.vimg"), &bytes).unwrap();
    inspect_ok(&w.path("from-socket.vimg"));
    // Anything else is refused, and the job goes on.
    refused(&name, w.dir.to_str().unwrap(), "a directory");
    let s = last_step(&fs::read_to_string(&out).unwrap());
    wait_step(&out, s + 2);
    let img = job.checkpoint_kill_with(&["--to", w.s("last.vimg").as_str()]);
    inspect_ok(Path::new(&img));
}

/// A pseudo-terminal pair (master, terminal side).
fn pty() -> (OwnedFd, OwnedFd) {
    let (mut m, mut s) = (0, 0);
    // SAFETY: openpty writes two fds; no name, termios or size are asked for.
    assert_eq!(unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) }, 0);
    // SAFETY: fresh fds we own.
    unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) }
}

/// What a terminal shows, read on a thread of its own so the job never blocks on a full terminal.
fn screen(master: OwnedFd) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let t = text.clone();
    std::thread::spawn(move || {
        let mut f = fs::File::from(master);
        let mut b = [0u8; 4096];
        while let Ok(n) = f.read(&mut b) {
            if n == 0 {
                break;
            }
            t.lock().unwrap().push_str(&String::from_utf8_lossy(&b[..n]));
        }
    });
    text
}

const TALKER: &str = "import sys, time\ni = 0\nwhile True:\n    print('step', i, flush=True)\n    print('err', i, file=sys.stderr, flush=True)\n    i += 1\n    time.sleep(0.05)\n";

/// `cmd` with fds 0, 1 and 2 on one open file of the terminal `slave`, in a session of its own with that
/// terminal as its controlling terminal: as a shell starts a program.
fn on_terminal(cmd: &mut std::process::Command, slave: &OwnedFd) {
    let s = || Stdio::from(slave.try_clone().unwrap());
    cmd.stdin(s()).stdout(s()).stderr(s());
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid and ioctl are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY, 0);
            Ok(())
        });
    }
}

/// The highest N of lines "WORD N" in `s`.
fn last(s: &str, word: &str) -> i64 {
    s.lines().filter_map(|l| l.trim().strip_prefix(word)?.trim().parse().ok()).max().unwrap_or(-1)
}

fn wait_more(path: &Path, word: &str, beyond: i64) {
    wait_for(path, &format!("{word} > {beyond}"), Duration::from_secs(30), |s| last(s, word) > beyond + 3);
}

#[test]
fn a_job_on_a_terminal_restores_with_its_output_through_a_pipe_and_into_files() {
    let w = Work::new("tty");
    let script = w.path("talker.py");
    fs::write(&script, TALKER).unwrap();
    let (master, slave) = pty();
    let shown = screen(master);
    let name = w.name("tty");
    let mut c = command(bin_dir().join("vrun"));
    c.args(["--name", &name, "--dir"]).arg(&w.dir).args(["python3", script.to_str().unwrap()]);
    on_terminal(&mut c, &slave);
    let mut first = Running::new(c.spawn().unwrap(), &name);
    let t = Instant::now();
    while last(&shown.lock().unwrap(), "err") < 3 {
        assert!(t.elapsed() < Duration::from_secs(20), "nothing on the terminal: {}", shown.lock().unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Through a pipe: the restore's stdin is the image (kept aside with tee), its stdout and stderr two files.
    let (a, b, img) = (w.path("a.out"), w.path("b.err"), w.path("tty.vimg"));
    let name2 = w.name("tty2");
    let pipeline = format!(
        "{v} checkpoint {name} --kill --to - | tee {img} | {v} restore --name {name2} --dir {d} - > {a} 2> {b}",
        v = bin_dir().join("vrun").display(),
        d = w.dir.display(),
        a = a.display(),
        b = b.display(),
        img = img.display()
    );
    let mut sh = command("sh");
    sh.args(["-c", &pipeline]);
    let mut second = Running::new(sh.spawn().unwrap(), &name2);
    assert_eq!(first.wait(Duration::from_secs(20)).code(), Some(75));
    let on_screen = last(&shown.lock().unwrap(), "step");
    wait_more(&a, "step", on_screen);
    wait_more(&b, "err", on_screen);
    assert!(last(&fs::read_to_string(&a).unwrap(), "err") < 0, "errors went to the output");
    drop(second.checkpoint(true));
    second.wait(Duration::from_secs(20));
    // Into files, from the image file.
    let (c_out, d_err) = (w.path("c.out"), w.path("d.err"));
    let name3 = w.name("tty3");
    let mut r = vrun();
    r.args(["restore", "--name", &name3, "--dir"]).arg(&w.dir).arg(&img);
    let mut third = spawn(r, &name3, &c_out, &d_err);
    wait_more(&c_out, "step", on_screen);
    wait_more(&d_err, "err", on_screen);
    drop(third.checkpoint(true));
    third.wait(Duration::from_secs(20));
}

#[test]
fn a_job_on_a_terminal_migrates_with_its_output() {
    let w = Work::new("ttymig");
    let script = w.path("talker.py");
    fs::write(&script, TALKER).unwrap();
    let key = vos_tests::hosts::keygen(&w.path("key"));
    let mut net = Net::new(2, &w.dir);
    for h in &mut net.hosts {
        h.serve(&key);
    }
    let (master, slave) = pty();
    let shown = screen(master);
    let name = w.name("ttymig");
    let mut c = net.hosts[0].vrun();
    c.args(["--name", &name, "--dir"]).arg(&net.hosts[0].dir).args(["python3", script.to_str().unwrap()]);
    on_terminal(&mut c, &slave);
    let mut job = Running::new(c.spawn().unwrap(), &name);
    let t = Instant::now();
    while last(&shown.lock().unwrap(), "err") < 3 {
        assert!(t.elapsed() < Duration::from_secs(20), "nothing on the terminal");
        std::thread::sleep(Duration::from_millis(20));
    }
    let there = net.hosts[0].migrate(&name, &net.hosts[1], &key, &[]).expect("migration");
    assert_eq!(job.wait(Duration::from_secs(20)).code(), Some(75), "the source copy did not end");
    let upto = last(&shown.lock().unwrap(), "step");
    let t = Instant::now();
    loop {
        let log = net.hosts[1].job_output(&there);
        if last(&log, "step") > upto + 3 && last(&log, "err") > upto + 3 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the migrated job's output and errors do not go on:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = slave.as_raw_fd();
}

/// A job that dies at once at the destination (here: it cannot bear another address) is not counted as
/// arrived: migrate fails, the source keeps its copy, which goes on.
#[test]
fn a_job_that_dies_on_arrival_stays_at_the_source() {
    let w = Work::new("arrival");
    let key = vos_tests::hosts::keygen(&w.path("key"));
    let mut net = Net::new(2, &w.dir);
    for h in &mut net.hosts {
        h.serve(&key);
    }
    let prog = gcc("addrwatch");
    let out = w.path("out.txt");
    let name = w.name("arrival");
    let mut c = net.hosts[0].vrun();
    c.args(["--name", &name, "--dir"]).arg(&net.hosts[0].dir).args([prog.to_str().unwrap(), "100000"]);
    let job = spawn(c, &name, &out, &w.path("vrun.err"));
    wait_step(&out, 3);
    let r = net.hosts[0].migrate(&name, &net.hosts[1], &key, &["--stop-and-copy"]);
    let err = r.expect_err("a migration whose job died at once succeeded");
    assert!(err.contains("goes on here") && err.contains("status 3"), "{err}");
    let s = last_step(&fs::read_to_string(&out).unwrap());
    wait_step(&out, s + 3);
    drop(job);
}
