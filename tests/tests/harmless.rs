//! A checkpoint never harms the job it reports as saved: what the shim or the supervisor would break (guard pages,
//! mappings past the end of their file, a thread in seccomp strict mode, a main thread gone with pthread_exit,
//! a unix socket whose peer shut down, a stack that grows down) is either captured and restored exactly, or
//! refused by name with the job going on untouched.

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use vos_tests::*;

/// `vrun checkpoint NAME ARGS...`, ended within a minute (a checkpoint never hangs): (success, stdout, stderr).
fn checkpoint(name: &str, args: &[&str]) -> (bool, String, String) {
    let mut c = vrun().args(["checkpoint", name]).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let t = Instant::now();
    let st = loop {
        if let Some(st) = c.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > Duration::from_secs(60) {
            let _ = c.kill();
            let _ = c.wait();
            panic!("vrun checkpoint {name} {args:?} did not end within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (mut out, mut err) = (String::new(), String::new());
    std::io::Read::read_to_string(c.stdout.as_mut().unwrap(), &mut out).unwrap();
    std::io::Read::read_to_string(c.stderr.as_mut().unwrap(), &mut err).unwrap();
    (st.success(), out, err)
}

/// A checkpoint that must be refused, the job going on untouched: its message.
fn refused(name: &str, args: &[&str]) -> String {
    let (ok, _, err) = checkpoint(name, args);
    assert!(!ok, "vrun checkpoint {name} {args:?} was not refused");
    assert!(err.contains("the job goes on untouched"), "{err}");
    err
}

/// A checkpoint that must succeed: the image's path.
fn saved(name: &str, args: &[&str]) -> String {
    let (ok, out, err) = checkpoint(name, args);
    assert!(ok, "vrun checkpoint {name} {args:?} failed: {err}");
    out.lines().last().unwrap_or_default().to_string()
}

/// Launch `argv` (a program printing "step N" lines to `out`); twice: five more steps, checkpoint --kill, restore.
/// Returns the restored job.
fn restored_twice(w: &Work, test: &str, argv: &[&str], out: &Path) -> Running {
    let name = w.name(test);
    let mut job = launch(w, &name, argv, out);
    for n in 1..=2 {
        goes_on(out);
        let img = saved(&name, &["--kill"]);
        assert_eq!(job.wait(Duration::from_secs(20)).code(), Some(75));
        job = restore(w, &name, &img, &w.path(&format!("restore{n}.out")));
    }
    job
}

/// The job at `out` still makes progress: five more steps.
fn goes_on(out: &Path) {
    let s = last_step(&fs::read_to_string(out).unwrap_or_default());
    wait_step(out, s + 5);
}

/// Wait for the job and check its steps, each exactly once.
fn finishes(mut job: Running, out: &Path, steps: i64) {
    let st = job.wait(Duration::from_secs(120));
    let text = fs::read_to_string(out).unwrap();
    assert!(st.success(), "job ended with {st:?}; output tail: {}", text.lines().rev().take(5).collect::<Vec<_>>().join(" | "));
    assert_steps(&text, steps);
}

#[test]
fn a_thread_in_seccomp_strict_mode_is_refused_by_name() {
    let w = Work::new("seccomp");
    let prog = gcc("seccomp_strict");
    let out = w.path("out.txt");
    let name = w.name("seccomp");
    let job = launch(&w, &name, &[prog.to_str().unwrap(), "200"], &out);
    wait_step(&out, 5);
    for args in [&[][..], &["--kill"]] {
        let err = refused(&name, args);
        assert!(err.contains("pid 2 thread 3 is in seccomp strict mode: it cannot be checkpointed"), "{err}");
        goes_on(&out);
    }
    finishes(job, &out, 200);
}

#[test]
fn seqpacket_queue_with_empty_messages_and_a_shut_down_writer() {
    let w = Work::new("seqpacket");
    let prog = gcc("seqpacket");
    let out = w.path("out.txt");
    let job = restored_twice(&w, "seqpacket", &[prog.to_str().unwrap(), "150"], &out);
    // The program reads the queue at the end: the messages exactly, the empty ones too, then end of file.
    finishes(job, &out, 150);

    // A checkpoint the job goes on from leaves the empty messages peeked, which the kernel then hides from any
    // later peek: the next checkpoint sees the queue is not whole and refuses.
    let out = w.path("on.txt");
    let name = w.name("seqpacket-on");
    let job = launch(&w, &name, &[prog.to_str().unwrap(), "150"], &out);
    goes_on(&out);
    saved(&name, &[]);
    goes_on(&out);
    let err = refused(&name, &["--kill"]);
    assert!(err.contains("a unix socket holds messages a peek cannot show"), "{err}");
    goes_on(&out);
    finishes(job, &out, 150);
}

#[test]
fn a_region_that_grows_down_keeps_growing_under_the_shim_and_after_restore() {
    let w = Work::new("growsdown");
    let prog = gcc("growsdown");
    // Where the kernel puts the region varies from run to run: a few runs meet a hole the shim would leave above
    // memory of its own (a fault as soon as the region grows near it).
    for k in 0..3 {
        let out = w.path(&format!("plain{k}.txt"));
        let job = launch(&w, &w.name("growsdown"), &[prog.to_str().unwrap(), "150"], &out);
        finishes(job, &out, 150);
    }
    // A checkpoint the job goes on from, then two restores: it grows on each time.
    let out = w.path("out.txt");
    let name = w.name("growsdown");
    let job = launch(&w, &name, &[prog.to_str().unwrap(), "200"], &out);
    goes_on(&out);
    saved(&name, &[]);
    goes_on(&out);
    finishes(job, &out, 200);
    let out = w.path("restored.txt");
    let job = restored_twice(&w, "growsdown", &[prog.to_str().unwrap(), "200"], &out);
    finishes(job, &out, 200);
}

/// The shim's own mapping stays under 2 MiB: a larger library is mapped 2 MiB-aligned, with a hole above it where
/// the app's small mappings land right above the shim's memory (see `global::STATE` in the shim).
#[test]
fn the_shim_library_is_mapped_without_alignment_padding() {
    let elf = fs::read(bin_dir().join("libvos_shim.so")).unwrap();
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36), u16_at(0x38));
    let span = (0..phnum)
        .map(|i| phoff + i * phentsize)
        .filter(|&ph| u32::from_le_bytes(elf[ph..ph + 4].try_into().unwrap()) == 1)
        .map(|ph| u64_at(ph + 0x10) + u64_at(ph + 0x28))
        .max()
        .unwrap();
    assert!(span < 2 << 20, "libvos_shim.so spans {span:#x} bytes when loaded: keep large state out of its bss");
}

#[test]
fn guard_pages_are_never_read_and_come_back() {
    let w = Work::new("guard");
    let prog = gcc("guard");
    // A checkpoint the job goes on from: the shim read the guard pages, and the job died of it.
    let out = w.path("on.txt");
    let name = w.name("guard-on");
    let job = launch(&w, &name, &[prog.to_str().unwrap(), "150"], &out);
    goes_on(&out);
    saved(&name, &[]);
    goes_on(&out);
    finishes(job, &out, 150);
    // Restored twice: the counter goes on, and each guard page still faults (the program checks at every step).
    let out = w.path("out.txt");
    let job = restored_twice(&w, "guard", &[prog.to_str().unwrap(), "200"], &out);
    finishes(job, &out, 200);
}

#[test]
fn a_process_whose_main_thread_exited_keeps_its_other_threads() {
    let w = Work::new("main_exits");
    let prog = gcc("main_exits");
    // A checkpoint the job goes on from: it used to be saved as a zombie, its threads dropped without a word.
    let out = w.path("on.txt");
    let name = w.name("main-exits-on");
    let job = launch(&w, &name, &[prog.to_str().unwrap(), "600"], &out);
    goes_on(&out);
    saved(&name, &[]);
    goes_on(&out);
    finishes(job, &out, 600);
    // Restored twice: the workers go on, every step once, and the main thread is gone again each time (the
    // program checks its state at every step).
    let out = w.path("out.txt");
    let job = restored_twice(&w, "main-exits", &[prog.to_str().unwrap(), "600"], &out);
    finishes(job, &out, 600);
}

#[test]
fn private_mappings_past_the_end_of_a_memfd_or_deleted_file() {
    let w = Work::new("past_eof");
    let prog = gcc("past_eof");
    // A checkpoint the job goes on from: the shim read past the end of the file, and the job died of SIGBUS.
    let out = w.path("on.txt");
    let name = w.name("past-eof-on");
    let job = launch(&w, &name, &[prog.to_str().unwrap(), &w.s(""), "150"], &out);
    goes_on(&out);
    saved(&name, &[]);
    goes_on(&out);
    finishes(job, &out, 150);
    // Restored twice: the pages within the files hold their bytes, and those past the end still fault with SIGBUS
    // (the program checks at every step).
    let out = w.path("out.txt");
    let job = restored_twice(&w, "past-eof", &[prog.to_str().unwrap(), &w.s(""), "200"], &out);
    finishes(job, &out, 200);
}
