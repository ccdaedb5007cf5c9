//! A job's life around its supervisor: never orphaned, never half-restored, never waited for without a word.
//! The supervisor killed (the job ends with it), trigger signals sent to `vrun` itself, a stopped job, a client
//! whose supervisor dies, temporary images left behind, and faults injected at random instants.

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vos_tests::*;

/// Processes (host pids) running `exe` now, zombies left out.
fn running(exe: &Path) -> Vec<i32> {
    let want = fs::canonicalize(exe).unwrap();
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == want))
        .filter(|pid| !fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z "))
        .collect()
}

/// Wait until nothing runs `exe` any more.
fn none_left(exe: &Path, what: &str) {
    let t = Instant::now();
    while !running(exe).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(10), "{what}: processes left behind: {:?}", running(exe));
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(pid, sig) };
}

fn images(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "vimg") && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    v.sort();
    v
}

fn temporaries(dir: &Path) -> Vec<String> {
    fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.contains(".tmp-")).collect()
}

/// A copy of a test program under a name of this test's own, so `running` sees only this test's processes.
fn own_copy(w: &Work, prog: &str) -> PathBuf {
    let p = w.path(prog);
    fs::copy(gcc(prog), &p).unwrap();
    p
}

#[test]
fn a_killed_supervisor_takes_its_job_along() {
    let w = Work::new("supkill");
    let prog = own_copy(&w, "heaplog");
    let out = w.path("out.txt");
    let name = w.name("supkill");
    let mut job = launch(&w, &name, &[prog.to_str().unwrap(), "8", &w.s("log.txt"), "100000"], &out);
    wait_step(&out, 3);
    assert_eq!(running(&prog).len(), 1);
    kill(job.child.as_ref().unwrap().id() as i32, libc::SIGKILL);
    job.wait(Duration::from_secs(10));
    // Not left running unsupervised: unlisted, unreachable, its output going nowhere.
    none_left(&prog, "after SIGKILL of the supervisor");
    let err = fs::read_to_string(w.path("vrun.err")).unwrap_or_default();
    assert!(err.contains("supervisor is gone"), "the job did not say why it ended: {err}");
}

#[test]
fn trigger_signals_sent_to_vrun_reach_the_job() {
    let w = Work::new("vruntrig");
    let prog = gcc("heaplog");
    let out = w.path("out.txt");
    let name = w.name("vruntrig");
    let mut job = launch(&w, &name, &[prog.to_str().unwrap(), "8", &w.s("log.txt"), "150"], &out);
    wait_step(&out, 5);
    let vrun_pid = job.child.as_ref().unwrap().id() as i32;
    // `kill -s RTMAX-1 $!` right after `vrun ... &`: the job checkpoints and goes on; vrun lives.
    kill(vrun_pid, libc::SIGRTMAX() - 1);
    let t = Instant::now();
    while images(&w.dir).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(30), "no image after SIGRTMAX-1 to vrun");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(job.child.as_mut().unwrap().try_wait().unwrap().is_none(), "vrun died of its job's trigger signal");
    let s = last_step(&fs::read_to_string(&out).unwrap());
    wait_step(&out, s + 3);
    kill(vrun_pid, libc::SIGRTMAX() - 2);
    assert_eq!(job.wait(Duration::from_secs(20)).code(), Some(75));
    let img = images(&w.dir).pop().unwrap();
    let mut job = restore(&w, &name, img.to_str().unwrap(), &w.path("r.out"));
    assert!(job.wait(Duration::from_secs(60)).success());
    assert_steps(&fs::read_to_string(&out).unwrap(), 150);
}

#[test]
fn a_stopped_job_is_refused_at_once_and_never_checkpointed_later() {
    let w = Work::new("stopped");
    let prog = gcc("heaplog");
    let out = w.path("out.txt");
    let name = w.name("stopped");
    let job = launch(&w, &name, &[prog.to_str().unwrap(), "8", &w.s("log.txt"), "100000"], &out);
    wait_step(&out, 3);
    kill(job.pid(), libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    let (st, _, err) = run_vrun(&["checkpoint", &name]);
    assert!(!st.success() && err.contains("stopped") && err.contains("kill -CONT"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "the refusal took {:?}", t.elapsed());
    kill(job.pid(), libc::SIGCONT);
    let s = last_step(&fs::read_to_string(&out).unwrap());
    wait_step(&out, s + 3);
    assert!(images(&w.dir).is_empty(), "an image was written once the job went on: {:?}", images(&w.dir));
    // And it still checkpoints once running.
    drop(job.checkpoint(false));
}

#[test]
fn a_client_whose_supervisor_dies_hears_so_at_once() {
    let w = Work::new("clientdie");
    let prog = gcc("heaplog");
    let out = w.path("out.txt");
    let name = w.name("clientdie");
    let mut job = launch(&w, &name, &[prog.to_str().unwrap(), "256", &w.s("log.txt"), "100000"], &out);
    wait_step(&out, 2);
    // A checkpoint into a FIFO read slowly: the supervisor is in the middle of it for a good while.
    let fifo = w.path("slow.fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    // Its read end is open before the checkpoint opens the FIFO (one nobody reads is refused).
    let read_end = fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).unwrap();
    // SAFETY: fcntl on an fd we own, clearing O_NONBLOCK.
    unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&read_end), libc::F_SETFL, 0) };
    // A writer of our own, so the reader waits for the checkpoint's bytes rather than seeing an end at once.
    let keep_open = fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    let reader = std::thread::spawn(move || {
        let mut f = read_end;
        let mut b = vec![0u8; 64 << 10];
        while std::io::Read::read(&mut f, &mut b).is_ok_and(|n| n > 0) {
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let mut client = vrun().args(["checkpoint", &name, "--to"]).arg(&fifo).stderr(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(700));
    if client.try_wait().unwrap().is_some() {
        let o = client.wait_with_output().unwrap();
        panic!("the checkpoint ended too soon for this test: {}", String::from_utf8_lossy(&o.stderr));
    }
    kill(job.child.as_ref().unwrap().id() as i32, libc::SIGKILL);
    let t = Instant::now();
    let o = loop {
        if client.try_wait().unwrap().is_some() {
            break client.wait_with_output().unwrap();
        }
        assert!(t.elapsed() < Duration::from_secs(15), "the client still waits for its dead supervisor");
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("went away"), "{err}");
    job.wait(Duration::from_secs(10));
    drop(keep_open);
    let _ = reader.join();
}

#[test]
fn temporaries_of_a_dead_writer_are_swept_and_nothing_else() {
    let w = Work::new("sweep");
    let prog = gcc("heaplog");
    let out = w.path("out.txt");
    let name = w.name("sweep");
    let job = launch(&w, &name, &[prog.to_str().unwrap(), "8", &w.s("log.txt"), "100000"], &out);
    wait_step(&out, 3);
    // Left by a supervisor killed mid-checkpoint (nobody holds its lock).
    let stale = w.path(&format!(".{name}-20261207-000000.000.vimg.tmp-99999"));
    fs::write(&stale, vec![0u8; 1 << 20]).unwrap();
    // Being written right now by someone alive (it holds the lock).
    let live = w.path(&format!(".{name}-20261207-000001.000.vimg.tmp-1"));
    let held = fs::File::create(&live).unwrap();
    // SAFETY: flock on a file we hold.
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&held), libc::LOCK_EX) }, 0);
    // Planted: a link named like a temporary, to a file that must survive.
    let victim = w.path("victim");
    fs::write(&victim, "keep me").unwrap();
    let link = w.path(".planted.vimg.tmp-2");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    drop(job.checkpoint(false));
    assert!(!stale.exists(), "a dead writer's temporary image is still there");
    assert!(live.exists(), "a live writer's temporary image was removed");
    assert!(fs::symlink_metadata(&link).is_ok() && fs::read_to_string(&victim).unwrap() == "keep me");
    drop(held);
}

/// One good image of a running counter, then a fault at a random instant; afterwards the invariants hold:
/// the job runs and answers, or it ended cleanly; the last good image restores and goes on from where it was;
/// nothing of the job runs unsupervised.
#[test]
fn faults_at_random_instants_lose_nothing() {
    let w = Work::new("faults");
    let prog = own_copy(&w, "heaplog");
    let rounds: u64 = std::env::var("VOS_FAULT_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(9);
    let mut seed: u64 = std::env::var("VOS_FAULT_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed);
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for round in 0..rounds {
        let dir = w.path(&format!("r{round}"));
        fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out.txt");
        let name = w.name("fault");
        let mut c = vrun();
        c.args(["--name", &name, "--dir"]).arg(&dir).arg("--").args([prog.to_str().unwrap(), "64", dir.join("log.txt").to_str().unwrap(), "100000"]);
        let mut job = spawn(c, &name, &out, &dir.join("vrun.err"));
        wait_step(&out, 2);
        let good = job.checkpoint(false);
        let delay = Duration::from_millis(rand(120));
        let what = rand(3);
        match what {
            0 => {
                // The checkpoint client killed: the job goes on and answers.
                let mut client = vrun().args(["checkpoint", &name]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
                std::thread::sleep(delay);
                let _ = client.kill();
                let _ = client.wait();
                let s = last_step(&fs::read_to_string(&out).unwrap());
                wait_step(&out, s + 2);
                drop(job.checkpoint(false));
                assert!(temporaries(&dir).is_empty(), "round {round}: temporaries left: {:?}", temporaries(&dir));
                let _ = job.checkpoint_kill();
            }
            1 => {
                // The supervisor killed in the middle of a checkpoint: the job ends with it.
                let mut client = vrun().args(["checkpoint", &name]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
                std::thread::sleep(delay);
                kill(job.child.as_ref().unwrap().id() as i32, libc::SIGKILL);
                job.wait(Duration::from_secs(10));
                let _ = client.wait();
                none_left(&prog, &format!("round {round}: supervisor killed after {delay:?}"));
            }
            _ => {
                // The restore killed part way: nothing is left of it.
                let img = job.checkpoint_kill();
                let mut r = vrun();
                r.args(["restore", "--name", &name, "--dir"]).arg(&dir).arg(&img);
                let mut restoring = spawn(r, &name, &dir.join("r.out"), &dir.join("restore.err"));
                std::thread::sleep(delay);
                kill(restoring.child.as_ref().unwrap().id() as i32, libc::SIGKILL);
                restoring.wait(Duration::from_secs(10));
                none_left(&prog, &format!("round {round}: restore killed after {delay:?}"));
            }
        }
        none_left(&prog, &format!("round {round}"));
        // The newest complete image (the good one, or one taken since) brings the job back where it was.
        let newest = images(&dir).pop().unwrap();
        assert!(images(&dir).contains(&PathBuf::from(&good)));
        let before = last_step(&fs::read_to_string(&out).unwrap());
        let mut back = restore(&w, &name, newest.to_str().unwrap(), &dir.join("back.out"));
        wait_step(&out, before + 2);
        let text = fs::read_to_string(&out).unwrap();
        assert!(!text.contains("MISMATCH"), "round {round}: memory came back wrong");
        drop(back.checkpoint(true));
        assert_eq!(back.wait(Duration::from_secs(20)).code(), Some(75));
        none_left(&prog, &format!("round {round}: after the last checkpoint"));
        // The next command in the directory sweeps what a killed writer left.
        let (st, _, err) = run_vrun(&["inspect", dir.to_str().unwrap()]);
        assert!(st.success(), "round {round}: {err}");
        assert!(temporaries(&dir).is_empty(), "round {round} ({what}): temporaries left: {:?}", temporaries(&dir));
    }
}

#[test]
fn a_killed_restore_of_a_process_tree_leaves_nothing_behind() {
    let w = Work::new("treekill");
    let prog = own_copy(&w, "bench_tree");
    let name = w.name("treekill");
    let out = w.path("out.txt");
    let job = launch(&w, &name, &[prog.to_str().unwrap(), "20", "12"], &out);
    wait_for(&out, "ready", Duration::from_secs(60), |s| s.contains("ready"));
    assert_eq!(running(&prog).len(), 20);
    let img = job.checkpoint_kill();
    none_left(&prog, "after checkpoint --kill");
    for delay in [5u64, 30, 80, 150, 300] {
        let mut r = vrun();
        r.args(["restore", "--name", &name, "--dir"]).arg(&w.dir).arg(&img);
        let mut restoring = spawn(r, &name, &w.path("r.out"), &w.path("restore.err"));
        std::thread::sleep(Duration::from_millis(delay));
        kill(restoring.child.as_ref().unwrap().id() as i32, libc::SIGKILL);
        restoring.wait(Duration::from_secs(10));
        none_left(&prog, &format!("restore killed after {delay} ms"));
    }
    // The image is intact: the whole tree comes back.
    let mut back = restore(&w, &name, &img, &w.path("back.out"));
    let t = Instant::now();
    while running(&prog).len() < 20 {
        assert!(t.elapsed() < Duration::from_secs(30), "the tree did not come back whole");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(back.checkpoint(true));
    back.wait(Duration::from_secs(20));
    none_left(&prog, "at the end");
}

/// A trigger signal sent while another checkpoint runs is not lost: it gets an image of its own after it.
#[test]
fn a_trigger_during_a_checkpoint_is_not_lost() {
    let w = Work::new("overlap");
    let prog = gcc("heaplog");
    let out = w.path("out.txt");
    let name = w.name("overlap");
    let job = launch(&w, &name, &[prog.to_str().unwrap(), "256", &w.s("log.txt"), "100000"], &out);
    wait_step(&out, 2);
    for round in 1..=3 {
        let mut client = vrun().args(["checkpoint", &name, "-q"]).stdout(std::process::Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(20 * round));
        kill(job.pid(), libc::SIGRTMAX() - 1);
        assert!(client.wait().unwrap().success());
        let t = Instant::now();
        while images(&w.dir).len() < 2 * round as usize {
            assert!(t.elapsed() < Duration::from_secs(30), "round {round}: the trigger's checkpoint was lost: {:?}", images(&w.dir));
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    drop(job.checkpoint_kill());
}
