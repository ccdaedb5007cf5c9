//! The core engine: one unmodified program (C, Rust, python3), checkpointed, killed and restored, twice in a
//! row, going on exactly where it stopped.

use std::fs;
use std::time::Duration;
use vos_tests::*;

#[test]
fn heap_checksum_and_append_only_log() {
    let w = Work::new("heaplog");
    let prog = gcc("heaplog");
    let log = w.s("log.txt");
    twice("heaplog", &[prog.to_str().unwrap(), "64", &log, "120"], 120, &w);
    // The log file, written with O_APPEND, has every step once.
    let lines: Vec<i64> = fs::read_to_string(&log).unwrap().lines().filter_map(step_of).collect();
    assert_eq!(lines, (0..120).collect::<Vec<_>>());
}

#[test]
fn eight_threads_mutex_condvar_tls() {
    let w = Work::new("threads");
    let prog = gcc("threads");
    let out = w.path("out.txt");
    let name = w.name("threads");
    let job = launch(&w, &name, &[prog.to_str().unwrap(), "600"], &out);
    wait_for(&out, "total 400", Duration::from_secs(60), |s| s.contains("total 400"));
    let img1 = job.checkpoint_kill();
    let job = restore(&w, &name, &img1, &w.path("r1.out"));
    let n1 = fs::read_to_string(&out).unwrap().lines().filter(|l| l.starts_with("total")).count();
    wait_for(&out, "more progress", Duration::from_secs(60), |s| s.lines().filter(|l| l.starts_with("total")).count() >= n1 + 5);
    let img2 = job.checkpoint_kill();
    let mut job = restore(&w, &name, &img2, &w.path("r2.out"));
    let st = job.wait(Duration::from_secs(120));
    let text = fs::read_to_string(&out).unwrap();
    assert!(st.success(), "restored job: {st:?}\n{text}");
    let totals: Vec<i64> = text.lines().filter_map(|l| l.strip_prefix("total ")?.parse().ok()).collect();
    let expect: Vec<i64> = (0..=60).map(|i| i * 80).collect();
    assert_eq!(totals, expect, "totals must advance by 80 without gap or repeat");
    assert_eq!(text.lines().last(), Some("done"));
}

#[test]
fn signals_altstack_pending_and_virtualized_trigger() {
    let w = Work::new("signals");
    let prog = gcc("signals");
    let go = w.s("go");
    let out = w.path("out.txt");
    let name = w.name("signals");
    let job = launch(&w, &name, &[prog.to_str().unwrap(), &go, "200"], &out);
    wait_step(&out, 10);
    let img1 = job.checkpoint_kill();
    let job = restore(&w, &name, &img1, &w.path("r1.out"));
    let s = last_step(&fs::read_to_string(&out).unwrap());
    wait_step(&out, s + 5);
    let img2 = job.checkpoint_kill();
    // Only now may the pending SIGUSR2 be delivered.
    fs::write(&go, "").unwrap();
    let mut job = restore(&w, &name, &img2, &w.path("r2.out"));
    let st = job.wait(Duration::from_secs(60));
    let text = fs::read_to_string(&out).unwrap();
    assert!(st.success(), "restored job: {st:?}\n{text}");
    let usr2: Vec<&str> = text.lines().filter(|l| l.starts_with("usr2")).collect();
    assert_eq!(usr2, vec!["usr2 1"], "the pending SIGUSR2 must be delivered exactly once, after the restore");
    assert_steps(&text, 200);
}

#[test]
fn reader_offsets_carry_over() {
    let w = Work::new("reader");
    let prog = gcc("reader");
    let data = w.path("data.bin");
    let bytes: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    fs::write(&data, &bytes).unwrap();
    let text = twice("reader", &[prog.to_str().unwrap(), data.to_str().unwrap(), "150"], 150, &w);
    // Recompute every read: offsets and contents must be exactly what an uninterrupted run reads.
    let size = bytes.len() as i64;
    let mut cur: i64 = 0;
    for l in text.lines().filter(|l| l.starts_with("step")) {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (s, off, sum): (i64, i64, u64) = (f[1].parse().unwrap(), f[3].parse().unwrap(), f[5].parse().unwrap());
        let mut at = if s % 3 == 0 { (cur + (s % 7) * 1000 + 1) % (size - 4096) } else { cur - s % 5 };
        if at < 0 || at > size - 4096 {
            at = 0;
        }
        assert_eq!(off, at, "step {s}: read at {off}, expected {at}");
        let expect: u64 = bytes[at as usize..at as usize + 4096].iter().enumerate().map(|(i, b)| *b as u64 * (i as u64 + 1)).sum();
        assert_eq!(sum, expect, "step {s}: wrong bytes read");
        cur = at + 4096;
    }
}

#[test]
fn python3_stateful_loop() {
    let w = Work::new("python");
    let script = repo().join("tests/programs/stateful.py");
    let text = twice("python", &["python3", script.to_str().unwrap(), "150"], 150, &w);
    // Recompute the hash chain.
    let out = std::process::Command::new("python3").arg(&script).arg("150").env("PYTHONHASHSEED", "0").output().unwrap();
    let expect = String::from_utf8_lossy(&out.stdout).replace("\r", "");
    assert_eq!(text, expect, "the restored python produced other results than an uninterrupted run");
}

#[test]
fn rust_program() {
    let w = Work::new("rust");
    let prog = env!("CARGO_BIN_EXE_vos-testprog");
    let text = twice("rustprog", &[prog, "150"], 150, &w);
    let out = std::process::Command::new(prog).arg("150").output().unwrap();
    assert_eq!(text, String::from_utf8_lossy(&out.stdout), "the restored program produced other results");
}

#[test]
fn through_a_pipe() {
    let w = Work::new("pipe");
    let prog = gcc("heaplog");
    let out = w.path("out.txt");
    let name = w.name("pipe");
    let log = w.s("log.txt");
    let mut job = launch(&w, &name, &[prog.to_str().unwrap(), "16", &log, "80"], &out);
    wait_step(&out, 10);
    let mut ck = vrun().args(["checkpoint", &name, "--kill", "--to", "-"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let pipe = ck.stdout.take().unwrap();
    let mut r = vrun();
    r.args(["restore", "--name", &name, "-"]).stdin(pipe);
    let rout = fs::File::create(w.path("restore.out")).unwrap();
    let rerr = fs::File::create(w.path("restore.err")).unwrap();
    let mut restored = Running::new(r.stdout(rout).stderr(rerr).spawn().unwrap(), &name);
    assert!(ck.wait().unwrap().success(), "checkpoint --to - failed");
    assert_eq!(job.wait(Duration::from_secs(20)).code(), Some(75));
    let st = restored.wait(Duration::from_secs(60));
    assert!(st.success(), "restore - : {st:?}: {}", fs::read_to_string(w.path("restore.err")).unwrap_or_default());
    assert_steps(&fs::read_to_string(&out).unwrap(), 80);
}
