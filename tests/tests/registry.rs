//! The job registry and what `vrun` accepts: a job's name is held exactly as long as its supervisor lives,
//! names and values from the command line are checked before anything is done, a restore goes on as the job
//! was supervised, and neither a runtime directory nor a registry entry planted by someone else is trusted.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};
use vos_tests::*;

fn runtime() -> PathBuf {
    PathBuf::from("/run/vos")
}

/// A refusal: a message and exit status 1 (ours) or 2 (clap's), never a panic (101) or a signal.
fn assert_refused(st: ExitStatus, err: &str, what: &str) {
    assert!(matches!(st.code(), Some(1 | 2)), "{what}: exit {st:?}, stderr: {err}");
    assert!(!err.trim().is_empty(), "{what}: refused without a message");
    assert!(!err.contains("panicked"), "{what}: {err}");
}

/// A job that runs long enough (the heaplog program, 1 MiB, a step every 20 ms, for a minute or so).
fn long_job(w: &Work, name: &str, out: &Path) -> Running {
    let prog = gcc("heaplog");
    launch(w, name, &[prog.to_str().unwrap(), "1", &w.s("log.txt"), "3000"], out)
}

/// `vrun ARGS`, which must be refused: its status and stderr. One that runs a job instead is ended.
fn refused_vrun(args: &[&str]) -> (ExitStatus, String) {
    let err = std::env::temp_dir().join(format!("vos-test-refused-{}-{:?}", std::process::id(), std::thread::current().id()));
    let mut c = vrun().args(args).stdout(std::process::Stdio::null()).stderr(fs::File::create(&err).unwrap()).spawn().unwrap();
    let t = Instant::now();
    let st = loop {
        if let Some(st) = c.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > Duration::from_secs(30) {
            signal(c.id() as i32, libc::SIGTERM);
            let _ = c.wait();
            panic!("vrun {args:?} was not refused: it runs");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = fs::read_to_string(&err).unwrap_or_default();
    let _ = fs::remove_file(&err);
    (st, text)
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(pid, sig) };
}

fn wait_until(what: &str, timeout: Duration, mut pred: impl FnMut() -> bool) {
    let t = Instant::now();
    while !pred() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A supervisor that dies without a word (SIGKILL, left unreaped: a zombie, whose pid still answers kill(pid, 0))
/// leaves a stale entry: it must not hold the name, and `vrun checkpoint NAME` must reach the new job. Nor does
/// an unlocked entry naming a live, unrelated pid (a reused pid).
#[test]
fn a_dead_supervisor_does_not_hold_its_name() {
    let w = Work::new("stale");
    let name = w.name("stale");
    let out = w.path("out.txt");
    let mut first = long_job(&w, &name, &out);
    wait_step(&out, 2);
    let (pid, init) = (first.pid(), registered_field(&runtime(), &name, "init"));
    assert!(pid > 0 && init > 0);
    let mut sup = first.child.take().unwrap();
    signal(sup.id() as i32, libc::SIGKILL);
    // Its job, orphaned, ends with its init.
    signal(init, libc::SIGKILL);
    wait_until("the killed supervisor to be a zombie", Duration::from_secs(10), || {
        fs::read_to_string(format!("/proc/{}/stat", sup.id())).is_ok_and(|s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
    });
    assert!(entry_path(&runtime(), &name).exists(), "the dead supervisor's entry should still be there, stale");

    let out2 = w.path("out2.txt");
    let second = long_job(&w, &name, &out2);
    wait_step(&out2, 2);
    let pid2 = second.pid();
    assert!(pid2 > 0 && pid2 != pid, "the new job did not get the name {name}: pid {pid2}");
    let (_, list, _) = run_vrun(&["list"]);
    assert_eq!(list.lines().filter(|l| l.starts_with(&format!("{name} "))).count(), 1, "vrun list: {list}");
    let img = second.checkpoint(false);
    assert!(img.contains(&name), "{img}");
    drop(second);
    let _ = sup.wait();

    // An entry nobody holds, naming a live process (ours) as its supervisor.
    let planted = w.name("reused");
    let json = format!(
        r#"{{"name": "{planted}", "supervisor": {me}, "pid": {me}, "init": {me}, "program": ["x"], "since_unix": 0, "sock": "nothing", "dir": "/"}}"#,
        me = std::process::id()
    );
    fs::write(entry_path(&runtime(), &planted), json).unwrap();
    let (_, list, _) = run_vrun(&["list"]);
    assert!(!list.contains(&planted), "an entry nobody holds is listed: {list}");
    assert!(!entry_path(&runtime(), &planted).exists(), "the stale entry was not removed");
    let third = long_job(&w, &planted, &w.path("out3.txt"));
    assert!(third.pid() > 0, "the name of a stale entry was not given");
}

/// `vrun` processes ended (SIGTERM, which they forward to their jobs) and reaped when dropped, also on a failure.
struct Kids(Vec<std::process::Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for k in &self.0 {
            signal(k.id() as i32, libc::SIGTERM);
        }
        for k in &mut self.0 {
            let _ = k.wait();
        }
    }
}

/// Launches at the same moment each get a name of their own, and all are listed; the names made unique are said.
#[test]
fn parallel_launches_all_get_a_name() {
    let w = Work::new("parallel");
    let base = format!("par{}", std::process::id());
    let prog = w.path(&base);
    fs::copy("/bin/sleep", &prog).unwrap();
    let kids = Kids((0..8)
        .map(|i| {
            let mut c = vrun();
            c.args(["--dir"]).arg(&w.dir).arg("--").arg(&prog).arg("60");
            c.stdout(fs::File::create(w.path(&format!("out{i}"))).unwrap()).stderr(fs::File::create(w.path(&format!("err{i}"))).unwrap());
            c.spawn().unwrap()
        })
        .collect());
    let expect: Vec<String> = std::iter::once(base.clone()).chain((2..=8).map(|i| format!("{base}-{i}"))).collect();
    let mut list = String::new();
    let t = Instant::now();
    while !expect.iter().all(|n| list.lines().any(|l| l.starts_with(&format!("{n} ")))) {
        assert!(t.elapsed() < Duration::from_secs(30), "not all 8 jobs are listed: {list}");
        std::thread::sleep(Duration::from_millis(100));
        list = run_vrun(&["list"]).1;
    }
    let pids: std::collections::HashSet<i32> = expect.iter().map(|n| registered_pid(&runtime(), n)).collect();
    assert_eq!(pids.len(), 8, "{list}");
    let said: String = (0..8).map(|i| fs::read_to_string(w.path(&format!("err{i}"))).unwrap()).collect();
    for n in &expect[1..] {
        assert!(said.contains(&format!("the job is named {n} ")), "the chosen name {n} was not said: {said}");
    }
    drop(kids);
    wait_until("the jobs to leave the registry", Duration::from_secs(10), || expect.iter().all(|n| !entry_path(&runtime(), n).exists()));
}

/// A name a running job has is refused when asked for explicitly (launch and restore), and nothing starts; a
/// restore without --name takes the image's name made unique, and says so.
#[test]
fn a_taken_name_is_refused() {
    let w = Work::new("taken");
    let name = w.name("taken");
    let out = w.path("out.txt");
    let job = long_job(&w, &name, &out);
    wait_step(&out, 2);
    let marker = w.path("started");
    let o = vrun().args(["--name", &name, "--dir"]).arg(&w.dir).arg("--").arg("/usr/bin/touch").arg(&marker).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_refused(o.status, &err, "a taken --name");
    assert!(err.contains(&name) && err.contains("already"), "{err}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!marker.exists(), "the program ran under a taken name");

    let img = job.checkpoint(false);
    let (st, err) = refused_vrun(&["restore", "--name", &name, &img]);
    assert_refused(st, &err, "restore under a taken --name");
    assert!(err.contains("already"), "{err}");
    let mut copy = vrun();
    copy.args(["restore", &img]);
    let mut copy = spawn(copy, &format!("{name}-2"), &w.path("copy.out"), &w.path("copy.err"));
    assert!(copy.pid() > 0, "the copy is not registered as {name}-2");
    let said = fs::read_to_string(w.path("copy.err")).unwrap();
    assert!(said.contains(&format!("restored as {name}-2")), "{said}");
    signal(copy.pid(), libc::SIGKILL);
    copy.wait(Duration::from_secs(20));
}

/// Invalid names are refused before anything is created: nothing runs, nothing appears in the registry or
/// outside it.
#[test]
fn invalid_names_are_refused() {
    let w = Work::new("badname");
    let escape = format!("vos-badname-{}", std::process::id());
    let outside = format!("../../tmp/{escape}");
    let long = "n".repeat(200);
    let marker = w.path("started");
    for bad in ["", ".", "..", "x/y", &outside, &long, "a\nb", "\u{1b}[31mred", "-x", ".hidden", "a b"] {
        let o = vrun().arg(format!("--name={bad}")).arg("--dir").arg(&w.dir).arg("--").arg("/usr/bin/touch").arg(&marker).output().unwrap();
        assert_refused(o.status, &String::from_utf8_lossy(&o.stderr), &format!("--name {bad:?}"));
        for cmd in ["checkpoint", "migrate"] {
            let o = vrun().args([cmd, bad, "--to", "127.0.0.1:9"]).output().unwrap();
            assert_refused(o.status, &String::from_utf8_lossy(&o.stderr), &format!("{cmd} {bad:?}"));
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(!marker.exists(), "a program ran under an invalid name");
    for d in ["/tmp", "/run", "/run/tmp", "/run/vos", "/run/vos/jobs"] {
        let Ok(rd) = fs::read_dir(d) else { continue };
        let found: Vec<String> = rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.contains(&escape)).collect();
        assert!(found.is_empty(), "{d} holds {found:?}");
    }
}

/// Out-of-range values are refused with a message (never a panic); so are identical trigger signals.
#[test]
fn command_line_values_are_checked() {
    let w = Work::new("values");
    let marker = w.path("started");
    let cases: &[&[&str]] = &[
        &["--interval=1e300"],
        &["--interval=-1"],
        &["--interval=nan"],
        &["--interval=inf"],
        &["--interval=0"],
        &["--interval=0.01"],
        &["--interval=forty"],
        &["--keep=0"],
        &["--keep=10001"],
        &["--keep=-1"],
        &["--checkpoint-signal=RTMAX-2"],
        &["--checkpoint-signal=RTMAX-5", "--exit-signal=RTMAX-5"],
        &["--exit-signal=RTMAX-1"],
        &["--checkpoint-signal=9"],
        &["--exit-signal=RTMAX-99"],
        &["--exit-signal=RTMAX--2147483648"],
        &["--exit-signal=RTMIN+2147483647"],
    ];
    for args in cases {
        let o = vrun().args(*args).arg("--").arg("/usr/bin/touch").arg(&marker).output().unwrap();
        assert_refused(o.status, &String::from_utf8_lossy(&o.stderr), &format!("{args:?}"));
        let o = vrun().arg("restore").args(*args).arg(w.path("none.vimg")).output().unwrap();
        assert_refused(o.status, &String::from_utf8_lossy(&o.stderr), &format!("restore {args:?}"));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(!marker.exists(), "a program ran with a bad value");
    // The bounds themselves are fine.
    let name = w.name("bounds");
    let mut c = vrun();
    // (Not a program that ends at once: vrun may then miss the job's first process.)
    c.args(["--name", &name, "--interval", "31536000", "--keep", "10000", "--dir"]).arg(&w.dir).args(["--", "/bin/sh", "-c", "touch \"$0\"; sleep 0.5"]).arg(&marker);
    assert!(c.status().unwrap().success());
    assert!(marker.exists());
}

/// `vrun restore` without --dir, --interval or --keep goes on as the job was supervised: periodic images into
/// its own directory, as many kept; and its shims' trigger signals stay what they were (another is refused).
#[test]
fn a_restore_keeps_the_jobs_settings() {
    let w = Work::new("keeps");
    let name = w.name("keeps");
    let imgs = w.path("imgs");
    let elsewhere = w.path("elsewhere");
    fs::create_dir_all(&imgs).unwrap();
    fs::create_dir_all(&elsewhere).unwrap();
    let images = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(d).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.ends_with(".vimg") && !n.starts_with('.')).collect();
        v.sort();
        v
    };
    let prog = gcc("heaplog");
    let out = w.path("out.txt");
    let mut c = vrun();
    c.args(["--name", &name, "--dir"]).arg(&imgs).args(["--interval", "0.3", "--keep", "2", "--checkpoint-signal", "RTMAX-4", "--exit-signal", "RTMAX-5", "--"]);
    c.args([prog.to_str().unwrap(), "1", &w.s("log.txt"), "3000"]);
    let job = spawn(c, &name, &out, &w.path("vrun.err"));
    wait_step(&out, 3);
    wait_until("a periodic image", Duration::from_secs(10), || !images(&imgs).is_empty());
    let last = w.s("last.vimg");
    job.checkpoint_kill_with(&["--to", &last]);
    for i in images(&imgs) {
        fs::remove_file(imgs.join(i)).unwrap();
    }

    // Other trigger signals than the job's shims answer to: refused, nothing runs.
    let (st, err) = refused_vrun(&["restore", "--name", &name, "--checkpoint-signal", "RTMAX-1", &last]);
    assert_refused(st, &err, "restore with another --checkpoint-signal");
    assert!(err.contains("--checkpoint-signal"), "{err}");
    assert_eq!(registered_pid(&runtime(), &name), 0);

    let mut c = vrun();
    c.current_dir(&elsewhere).args(["restore", "--name", &name, &last]);
    let mut job = spawn(c, &name, &w.path("r.out"), &w.path("vrun.err"));
    wait_until("a periodic image in the job's own directory", Duration::from_secs(20), || !images(&imgs).is_empty());
    std::thread::sleep(Duration::from_millis(1500));
    let kept = images(&imgs);
    assert!(!kept.is_empty() && kept.len() <= 2, "--keep 2 was not kept: {kept:?}");
    assert!(images(&elsewhere).is_empty(), "images went to the restore's working directory");
    // (Ended by a signal it forwards to the job, not a checkpoint: one asked for while a periodic one runs is
    // refused.)
    signal(job.child.as_ref().unwrap().id() as i32, libc::SIGTERM);
    job.wait(Duration::from_secs(20));

    // Again, without periodic checkpoints this time (what is given wins): the job's own exit signal makes an
    // image in its directory, and the job ends.
    let mut c = vrun();
    c.current_dir(&elsewhere).args(["restore", "--name", &name, "--interval", "3600", &last]);
    let mut job = spawn(c, &name, &w.path("r.out"), &w.path("vrun.err"));
    let before = images(&imgs).len();
    signal(job.pid(), libc::SIGRTMAX() - 5);
    assert_eq!(job.wait(Duration::from_secs(20)).code(), Some(75), "the job's --exit-signal did not end it after the restore");
    assert_eq!(images(&imgs).len(), before + 1, "no image from the exit signal in the job's directory");
}

/// Runs `vrun ARGS` as uid 65534 without $XDG_RUNTIME_DIR (its runtime directory is then /tmp/vos-65534).
fn vrun_as_nobody(bin: &Path, args: &[&str]) -> (ExitStatus, String) {
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", "env", "-u", "XDG_RUNTIME_DIR", "HOME=/tmp"])
        .arg(bin.join("vrun"))
        .args(args)
        .current_dir("/tmp")
        .output()
        .expect("setpriv");
    (o.status, String::from_utf8_lossy(&o.stderr).into_owned())
}

/// A runtime directory someone else made first in /tmp (theirs, a symlink to one of ours, or one others may
/// write) is refused, and nothing is written through it.
#[test]
fn a_runtime_directory_taken_over_is_refused() {
    let w = Work::new("takeover");
    let bin = w.path("bin");
    fs::create_dir_all(&bin).unwrap();
    for f in ["vrun", "libvos_shim.so", "vos-restore"] {
        fs::copy(bin_dir().join(f), bin.join(f)).unwrap();
        fs::set_permissions(bin.join(f), fs::Permissions::from_mode(0o755)).unwrap();
    }
    for d in [&w.dir, &bin] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let rt = Path::new("/tmp/vos-65534");
    let clear = || {
        let _ = fs::remove_file(rt);
        let _ = fs::remove_dir_all(rt);
    };
    let chown = |p: &Path, uid: u32| std::os::unix::fs::lchown(p, Some(uid), Some(uid)).unwrap();
    // Where a victim's files would go through a planted symlink: a directory of the victim's own.
    let victim = w.path("victim");
    fs::create_dir_all(&victim).unwrap();
    chown(&victim, 65534);
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o700)).unwrap();
    let job = ["--name", "np", "--", "/bin/sleep", "1"];

    clear();
    fs::create_dir(rt).unwrap();
    fs::set_permissions(rt, fs::Permissions::from_mode(0o777)).unwrap();
    for args in [&["list"][..], &job] {
        let (st, err) = vrun_as_nobody(&bin, args);
        assert_refused(st, &err, "another user's runtime directory");
        assert!(err.contains("/tmp/vos-65534") && err.contains("uid 0"), "{err}");
    }
    assert_eq!(fs::read_dir(rt).unwrap().count(), 0, "vrun wrote into another user's directory");

    clear();
    std::os::unix::fs::symlink(&victim, rt).unwrap();
    chown(rt, 0);
    for args in [&["list"][..], &job] {
        let (st, err) = vrun_as_nobody(&bin, args);
        assert_refused(st, &err, "a symlink as the runtime directory");
        assert!(err.contains("symbolic link"), "{err}");
    }
    assert_eq!(fs::read_dir(&victim).unwrap().count(), 0, "vrun wrote through a planted symlink");

    clear();
    fs::create_dir(rt).unwrap();
    chown(rt, 65534);
    fs::set_permissions(rt, fs::Permissions::from_mode(0o777)).unwrap();
    let (st, err) = vrun_as_nobody(&bin, &["list"]);
    assert_refused(st, &err, "a runtime directory others may write");
    assert!(err.contains("mode"), "{err}");

    // Made by vrun itself: the user's own, 0700.
    clear();
    let (st, err) = vrun_as_nobody(&bin, &["list"]);
    assert!(st.success(), "{err}");
    let md = fs::symlink_metadata(rt).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(md.is_dir() && md.uid() == 65534 && md.mode() & 0o777 == 0o700, "{:o} uid {}", md.mode(), md.uid());
    clear();
}

/// A socket server that records what it receives; run as `uid`.
fn fake_supervisor(w: &Work, sock: &str, uid: u32) -> (std::process::Child, PathBuf) {
    let log = w.path(&format!("fake-{uid}.log"));
    fs::write(&log, "").unwrap();
    fs::set_permissions(&log, fs::Permissions::from_mode(0o666)).unwrap();
    let script = r#"
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.bind("\0" + sys.argv[1]); s.listen(4); s.settimeout(0.2)
log = open(sys.argv[2], "a"); log.write("ready\n"); log.flush()
end = time.time() + 30
while time.time() < end:
    try: c, _ = s.accept()
    except socket.timeout: continue
    c.settimeout(2.0)
    try: d = c.recv(65536)
    except socket.timeout: d = b""
    log.write("got %d bytes\n" % len(d)); log.flush()
    c.close()
"#;
    let child = Command::new("setpriv")
        .args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into(), "--".into(), "/usr/bin/python3".into(), "-c".into(), script.into()])
        .arg(sock)
        .arg(&log)
        .spawn()
        .expect("python3");
    wait_for(&log, "the fake supervisor", Duration::from_secs(10), |s| s.contains("ready"));
    (child, log)
}

/// A registry entry whose socket is held by another user, or by a process other than the registered supervisor,
/// is not talked to: `vrun checkpoint` sends it nothing (not our stdout's fd either).
#[test]
fn a_planted_entry_is_not_trusted() {
    let w = Work::new("planted");
    fs::set_permissions(&w.dir, fs::Permissions::from_mode(0o755)).unwrap();
    let _ = run_vrun(&["list"]);
    for (uid, why) in [(65534, "uid 65534"), (0, "not by its supervisor")] {
        let name = w.name("planted");
        let sock = format!("vos-test-fake-{name}");
        let (mut fake, log) = fake_supervisor(&w, &sock, uid);
        // Registered as supervised by the fake server (another user), or by us (the fake is not us).
        let sup = if uid == 0 { std::process::id() } else { fake.id() };
        let json = format!(r#"{{"name": "{name}", "supervisor": {sup}, "pid": {sup}, "init": {sup}, "program": ["x"], "since_unix": 0, "sock": "{sock}", "dir": "/tmp"}}"#);
        let entry = entry_path(&runtime(), &name);
        fs::write(&entry, json).unwrap();
        // Held, as a live supervisor holds its entry.
        let held = fs::File::open(&entry).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: flock on an fd we own.
        assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);
        let (st, _, err) = run_vrun(&["checkpoint", &name, "--to", "-"]);
        assert_refused(st, &err, "a planted entry");
        assert!(err.contains(why) && err.contains("refusing"), "{err}");
        std::thread::sleep(Duration::from_millis(500));
        let got = fs::read_to_string(&log).unwrap();
        assert!(got.lines().all(|l| !l.starts_with("got") || l == "got 0 bytes"), "the fake supervisor received: {got}");
        let _ = fake.kill();
        let _ = fake.wait();
        drop(held);
        let _ = fs::remove_file(&entry);
    }
}
