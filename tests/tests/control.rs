//! Driving jobs: trigger signals from outside, periodic checkpoints, `vrun list`, sleeping calls that must not
//! notice a checkpoint, and a restored copy running beside its original.

use std::fs;
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};
use vos_tests::*;

fn images(w: &Work) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(&w.dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".vimg") && !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

fn wait_images(w: &Work, n: usize) -> Vec<String> {
    let start = Instant::now();
    loop {
        let v = images(w);
        if v.len() >= n {
            return v;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "expected {n} images, have {v:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn trigger_signals_from_outside() {
    let w = Work::new("trigger");
    let prog = gcc("heaplog");
    let out = w.path("out.txt");
    let name = w.name("trig");
    let log = w.s("log.txt");
    let mut job = launch(&w, &name, &[prog.to_str().unwrap(), "8", &log, "150"], &out);
    wait_step(&out, 5);
    let pid = job.pid();
    assert!(pid > 0);
    // SIGRTMAX-1: an image, and the job goes on.
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(pid, libc::SIGRTMAX() - 1) };
    wait_images(&w, 1);
    let s = last_step(&fs::read_to_string(&out).unwrap());
    wait_step(&out, s + 5);
    // SIGRTMAX-2: an image, and the job ends.
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGRTMAX() - 2) };
    assert_eq!(job.wait(Duration::from_secs(20)).code(), Some(75));
    let imgs = wait_images(&w, 2);
    let mut job = restore(&w, &name, &w.s(&imgs[1]), &w.path("r.out"));
    assert!(job.wait(Duration::from_secs(60)).success());
    assert_steps(&fs::read_to_string(&out).unwrap(), 150);
}

#[test]
fn periodic_checkpoints_keep_the_last_few() {
    let w = Work::new("interval");
    let prog = gcc("heaplog");
    let out = w.path("out.txt");
    let name = w.name("intv");
    let log = w.s("log.txt");
    let mut c = vrun();
    c.args(["--name", &name, "--dir"]).arg(&w.dir).args(["--interval", "0.2", "--keep", "2", "--"]);
    c.args([prog.to_str().unwrap(), "8", &log, "100000"]);
    c.stdout(fs::File::create(&out).unwrap()).stderr(fs::File::create(w.path("err")).unwrap());
    let job = Running::new(c.spawn().unwrap(), &name);
    wait_step(&out, 3);
    std::thread::sleep(Duration::from_millis(1500));
    let imgs = images(&w);
    assert!(!imgs.is_empty() && imgs.len() <= 2, "interval images: {imgs:?}");
    let (_, list, _) = run_vrun(&["list"]);
    assert!(list.contains(&name) && list.contains("heaplog"), "vrun list: {list}");
    let last = job.checkpoint_kill();
    let imgs = images(&w);
    assert!(imgs.len() <= 3, "{imgs:?}");
    let mut job = restore(&w, &name, &last, &w.path("r.out"));
    let s = last_step(&fs::read_to_string(&out).unwrap());
    wait_step(&out, s + 3);
    drop(job.checkpoint(true));
    assert_eq!(job.wait(Duration::from_secs(20)).code(), Some(75));
}

#[test]
fn sleeping_calls_never_see_eintr() {
    let w = Work::new("sleeper");
    let prog = gcc("sleeper");
    let out = w.path("out.txt");
    let name = w.name("sleep");
    let job = launch(&w, &name, &[prog.to_str().unwrap(), "60", "3000"], &out);
    wait_step(&out, 3);
    for _ in 0..3 {
        job.checkpoint(false);
    }
    // Catch it in the long sleep, stop it, and bring it back: it sleeps only what was left.
    wait_for(&out, "long sleep", Duration::from_secs(30), |s| s.contains("long sleep"));
    std::thread::sleep(Duration::from_millis(800));
    job.checkpoint(false);
    let img = job.checkpoint_kill();
    std::thread::sleep(Duration::from_millis(1500));
    let mut job = restore(&w, &name, &img, &w.path("r.out"));
    let restored_at = Instant::now();
    wait_for(&out, "woke", Duration::from_secs(30), |s| s.contains("woke"));
    let waited = restored_at.elapsed();
    let st = job.wait(Duration::from_secs(60));
    let text = fs::read_to_string(&out).unwrap();
    assert!(st.success(), "{text}");
    assert!(!text.contains("FAILED"), "{text}");
    // The job's own monotonic clock saw no time pass while it was not running.
    let ms: u64 = text.lines().find_map(|l| l.strip_prefix("woke after ")?.split(' ').next()?.parse().ok()).unwrap();
    assert!((3000..4500).contains(&ms), "the 3 s sleep took {ms} ms of the job's time");
    assert!(waited < Duration::from_millis(2900), "after restore it slept {waited:?}: more than what was left");
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("long") && !l.starts_with("woke")).collect();
    assert_steps(&(lines.join("\n") + "\n"), 60);
}

#[test]
fn restored_copy_runs_beside_the_original() {
    let w = Work::new("beside");
    let prog = gcc("heaplog");
    let name = w.name("orig");
    let log = w.s("log.txt");
    // The original's stdout is a pipe to us: a restore re-binds it to the restorer's own stdout.
    let mut c = vrun();
    c.args(["--name", &name, "--dir"]).arg(&w.dir).arg("--").args([prog.to_str().unwrap(), "8", &log, "60"]);
    c.stdout(std::process::Stdio::piped()).stderr(fs::File::create(w.path("err")).unwrap());
    let mut child = c.spawn().unwrap();
    let pipe = child.stdout.take().unwrap();
    let a = w.path("a.out");
    let a2 = a.clone();
    let copier = std::thread::spawn(move || {
        let mut f = fs::File::create(&a2).unwrap();
        for l in std::io::BufReader::new(pipe).lines() {
            writeln!(f, "{}", l.unwrap()).unwrap();
        }
    });
    let mut orig = Running::new(child, &name);
    wait_step(&a, 10);
    let img = orig.checkpoint(false);
    let at = last_step(&fs::read_to_string(&a).unwrap());
    let b = w.path("b.out");
    let mut copy = restore(&w, &w.name("copy"), &img, &b);
    assert!(copy.wait(Duration::from_secs(60)).success());
    assert!(orig.wait(Duration::from_secs(60)).success());
    copier.join().unwrap();
    let a = fs::read_to_string(&a).unwrap();
    let b = fs::read_to_string(&b).unwrap();
    assert_steps(&a, 60);
    let bsteps: Vec<i64> = b.lines().filter_map(step_of).collect();
    let first = bsteps[0];
    assert!(first <= at + 1, "the copy started at step {first}, after the checkpoint at {at}");
    assert_eq!(bsteps, (first..60).collect::<Vec<_>>());
    assert_eq!(b.lines().last(), Some("done"));
}

/// Without root: the job runs in a user namespace of its own; checkpoint and restore work the same, and the
/// restored job has exactly the capabilities it had (none).
#[test]
fn unprivileged_user() {
    let w = Work::new("unpriv");
    // Everything the unprivileged user runs must be readable by it: copy it to a world-readable place.
    let bin = w.path("bin");
    fs::create_dir_all(&bin).unwrap();
    for f in ["vrun", "libvos_shim.so", "vos-restore"] {
        fs::copy(bin_dir().join(f), bin.join(f)).unwrap();
    }
    fs::copy(gcc("heaplog"), bin.join("heaplog")).unwrap();
    let script = w.path("run.sh");
    fs::write(
        &script,
        r#"#!/bin/bash
set -e
for fd in /proc/$$/fd/*; do fd=${fd##*/}; [ "$fd" -gt 2 ] && eval "exec $fd>&-" 2>/dev/null || true; done
exec 2>> "$1/err.txt"
cd "$1"; V="$1/bin/vrun"; export XDG_RUNTIME_DIR="$1/rt"; mkdir -p -m 0700 "$XDG_RUNTIME_DIR"
"$V" --name np --dir "$1" -- "$1/bin/heaplog" 4 "$1/log.txt" 80 > "$1/out.txt" 2> "$1/err.txt" &
until grep -q "step 5" "$1/out.txt" 2>/dev/null; do sleep 0.05; done
img=$("$V" checkpoint np --kill)
wait || true
"$V" restore --name np2 "$img" 2>> "$1/err.txt" &
until grep -qs '"pid"' "$XDG_RUNTIME_DIR/vos/jobs/np2.json"; do sleep 0.02; done
pid=$(grep -o '"pid": [0-9]*' "$XDG_RUNTIME_DIR/vos/jobs/np2.json" | grep -o '[0-9]*$')
grep -E '^Cap(Eff|Prm|Inh|Amb)' /proc/$pid/status > "$1/caps.txt"
wait
"#,
    )
    .unwrap();
    let dirs = |mode| {
        use std::os::unix::fs::PermissionsExt;
        for p in [&w.dir, &bin] {
            fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
        }
        for f in fs::read_dir(&bin).unwrap().flatten().map(|e| e.path()).chain([script.clone()]) {
            fs::set_permissions(f, fs::Permissions::from_mode(0o755)).unwrap();
        }
    };
    dirs(0o777);
    let st = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&script)
        .arg(&w.dir)
        .status()
        .expect("setpriv");
    let out = fs::read_to_string(w.path("out.txt")).unwrap_or_default();
    assert!(st.success(), "as nobody: {st:?}\n{}\n{out}", fs::read_to_string(w.path("err.txt")).unwrap_or_default());
    assert_steps(&out, 80);
    let caps = fs::read_to_string(w.path("caps.txt")).unwrap();
    assert!(caps.lines().all(|l| l.ends_with("0000000000000000")), "the restored job holds capabilities:\n{caps}");
}

#[test]
fn manual_page_and_completions_cover_every_command() {
    let (st, man, _) = run_vrun(&["man"]);
    assert!(st.success());
    assert!(man.starts_with(".ie") && man.contains(".TH vrun 1"), "not a roff manual page: {}", &man[..man.len().min(200)]);
    for shell in ["bash", "zsh"] {
        let (st, out, err) = run_vrun(&["completions", shell]);
        assert!(st.success(), "{err}");
        for cmd in ["checkpoint", "restore", "migrate", "serve", "keygen", "inspect"] {
            assert!(out.contains(cmd), "{shell} completions lack {cmd}");
            assert!(man.contains(cmd), "the manual page lacks {cmd}");
        }
    }
}

#[test]
fn sigev_thread_timers_go_on_after_restore() {
    // glibc would run them on a helper thread that blocks every signal; the shim runs them on one that parks.
    let w = Work::new("sigev");
    let prog = gcc("sigev_thread");
    let out = w.path("out.txt");
    let ticks = |n: usize| wait_for(&out, "more ticks", Duration::from_secs(10), |s| s.lines().filter(|l| l.starts_with("tick")).count() >= n);
    let job = cycle(&w, "sigev", &[prog.to_str().unwrap()], &out, &|n| {
        ticks(5 * n as usize);
    });
    let text = ticks(15);
    // Ticks once each, in order, and the timer fired (a thread ran the function) between every few of them.
    let lines: Vec<(i64, i64)> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            Some((f.nth(1)?.parse().ok()?, f.nth(1)?.parse().ok()?))
        })
        .collect();
    assert!(lines.iter().enumerate().all(|(i, t)| t.0 == i as i64), "ticks lost or repeated: {text}");
    assert!(lines.windows(3).all(|w| w[2].1 > w[0].1), "the timer stopped firing: {text}");
    drop(job);
}
