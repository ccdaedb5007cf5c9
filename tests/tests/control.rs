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
    let job = Running { child: Some(c.spawn().unwrap()), name: name.clone() };
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
    let mut orig = Running { child: Some(child), name: name.clone() };
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
