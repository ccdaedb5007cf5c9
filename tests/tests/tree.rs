//! Whole jobs: process trees at one instant, pipes and sockets between processes with data in flight, shells,
//! make, python's subprocess and multiprocessing, zombies, and an interactive shell on a terminal.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use vos_tests::*;

fn sleep(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

#[test]
fn parent_and_child_exchange_over_pipes_and_sockets() {
    let w = Work::new("pingpong");
    let prog = gcc("pingpong");
    twice("pingpong", &[prog.to_str().unwrap(), "200"], 200, &w);
}

#[test]
fn shell_pipeline() {
    let w = Work::new("pipeline");
    let script = repo().join("tests/programs/pipeline.sh");
    let (out, reference) = (w.s("result.txt"), w.s("reference.txt"));
    let st = Command::new(&script).args([&reference, "40000"]).stdout(std::process::Stdio::null()).status().unwrap();
    assert!(st.success());
    let mut job = cycle(&w, "pipeline", &[script.to_str().unwrap(), &out, "40000"], &w.path("out.txt"), &|_| sleep(700));
    assert!(job.wait(Duration::from_secs(60)).success());
    assert!(!fs::read_to_string(&reference).unwrap().is_empty());
    assert_eq!(fs::read_to_string(&out).unwrap(), fs::read_to_string(&reference).unwrap(), "the pipeline's result differs");
}

#[test]
fn parallel_make() {
    let w = Work::new("make");
    let generator = repo().join("tests/programs/makeproj/gen.sh");
    let (a, b) = (w.path("a"), w.path("b"));
    for d in [&a, &b] {
        assert!(Command::new(&generator).arg(d).args(["6", "200"]).status().unwrap().success());
    }
    // The reference build, uninterrupted.
    assert!(Command::new("make").args(["-j2", "-s", "-C"]).arg(&b).status().unwrap().success());
    let argv = ["make", "-j2", "-s", "-C", a.to_str().unwrap()];
    let mut job = cycle(&w, "make", &argv, &w.path("out.txt"), &|_| sleep(1200));
    let st = job.wait(Duration::from_secs(120));
    assert!(st.success(), "make: {st:?}\n{}", fs::read_to_string(w.path("out.txt")).unwrap_or_default());
    assert_eq!(fs::read(a.join("prog")).unwrap(), fs::read(b.join("prog")).unwrap(), "the binaries differ");
}

#[test]
fn python_subprocess_and_multiprocessing_pool() {
    let w = Work::new("pool");
    let script = repo().join("tests/programs/pool.py");
    let reference = Command::new("python3").arg(&script).arg("60").output().unwrap();
    let out = w.path("out.txt");
    let mut job = cycle(&w, "pool", &["python3", script.to_str().unwrap(), "60"], &out, &|n| {
        wait_step(&out, n as i64 * 12);
    });
    assert!(job.wait(Duration::from_secs(120)).success());
    assert_eq!(fs::read_to_string(&out).unwrap(), String::from_utf8_lossy(&reference.stdout), "results differ from a direct run");
}

#[test]
fn zombie_is_reaped_after_restore() {
    let w = Work::new("zombie");
    let prog = gcc("zombie");
    let go = w.s("go");
    let out = w.path("out.txt");
    let mut job = cycle(&w, "zombie", &[prog.to_str().unwrap(), &go, "2000"], &out, &|n| {
        let s = last_step(&fs::read_to_string(&out).unwrap_or_default());
        wait_step(&out, s.max(0) + 5 * n as i64);
    });
    let s = last_step(&fs::read_to_string(&out).unwrap());
    wait_step(&out, s + 3);
    fs::write(&go, "").unwrap();
    assert!(job.wait(Duration::from_secs(30)).success());
    let text = fs::read_to_string(&out).unwrap();
    assert!(text.contains("exit 42,") && text.contains("signal 15"), "statuses lost:\n{text}");
}

/// tmux with a private server; commands typed into panes.
struct Tmux {
    sock: String,
}

impl Tmux {
    fn new(w: &Work) -> Tmux {
        let t = Tmux { sock: w.name("tmux") };
        t.run(&["new-session", "-d", "-s", "t", "-x", "120", "-y", "40"]);
        t
    }
    fn run(&self, args: &[&str]) -> String {
        let o = Command::new("tmux").arg("-L").arg(&self.sock).args(args).output().expect("tmux");
        assert!(o.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    fn type_line(&self, window: &str, line: &str) {
        self.run(&["send-keys", "-t", window, "-l", line]);
        self.run(&["send-keys", "-t", window, "Enter"]);
    }
    fn screen(&self, window: &str) -> String {
        self.run(&["capture-pane", "-p", "-t", window])
    }
    fn wait_screen(&self, window: &str, what: &str) -> String {
        for _ in 0..600 {
            let s = self.screen(window);
            if s.contains(what) {
                return s;
            }
            sleep(50);
        }
        panic!("{what:?} never appeared in window {window}:\n{}", self.screen(window));
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").arg("-L").arg(&self.sock).arg("kill-server").status();
    }
}

fn wait_file_lines(p: &Path, n: usize) {
    wait_for(p, &format!("{n} lines"), Duration::from_secs(60), |s| s.lines().count() >= n);
}

#[test]
fn interactive_bash_in_tmux() {
    let w = Work::new("tmux");
    let t = Tmux::new(&w);
    let vrun = bin_dir().join("vrun");
    let name = w.name("ib");
    let dir = w.dir.display().to_string();
    let lines = w.path("loop.txt");
    t.type_line("t:0", &format!("cd {dir} && {} --name {name} --dir {dir} bash --norc --noprofile -i", vrun.display()));
    t.type_line("t:0", "PS1='job$ '; stty eol ^X -echoctl; stty -a > before.txt");
    t.wait_screen("t:0", "job$");
    t.type_line("t:0", "for i in $(seq 1 60); do echo line $i | tee -a loop.txt; sleep 0.1; done; echo LOOP-END");
    let mut window = 0;
    for n in [8, 25] {
        wait_file_lines(&lines, n);
        let (st, _, err) = run_vrun(&["checkpoint", &name, "--kill"]);
        assert!(st.success(), "{err}");
        t.wait_screen(&format!("t:{window}"), "checkpointed to");
        window += 1;
        t.run(&["new-window", "-t", &format!("t:{window}")]);
        t.type_line(&format!("t:{window}"), &format!("cd {dir} && {} restore --name {name} {dir}", vrun.display()));
    }
    let win = format!("t:{window}");
    t.wait_screen(&win, "LOOP-END");
    t.type_line(&win, "stty -a > after.txt; echo typed-$((6 * 7))");
    t.wait_screen(&win, "typed-42");
    t.type_line(&win, "exit");
    t.wait_screen(&win, "exit");
    let got: Vec<String> = fs::read_to_string(&lines).unwrap().lines().map(String::from).collect();
    let want: Vec<String> = (1..=60).map(|i| format!("line {i}")).collect();
    assert_eq!(got, want, "the loop's lines");
    let before = fs::read_to_string(w.path("before.txt")).unwrap();
    let after = fs::read_to_string(w.path("after.txt")).unwrap();
    assert!(before.contains("eol = ^X") && before.contains("-echoctl"));
    assert_eq!(before, after, "terminal modes differ after restore");
}

#[test]
fn pseudo_terminal_made_inside_the_job() {
    let w = Work::new("script");
    let out = w.path("out.txt");
    let inner = "for i in $(seq 1 60); do echo line $i; sleep 0.05; done";
    let mut job = cycle(&w, "script", &["script", "-qfc", &format!("bash -c '{inner}'"), "/dev/null"], &out, &|n| {
        wait_for(&out, "progress", Duration::from_secs(30), |s| s.matches("line ").count() >= 8 * n as usize + 10);
    });
    assert!(job.wait(Duration::from_secs(60)).success());
    let text = fs::read_to_string(&out).unwrap().replace('\r', "");
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    let want: Vec<String> = (1..=60).map(|i| format!("line {i}")).collect();
    assert_eq!(lines, want, "what the shell wrote through the job's own pseudo-terminal");
}

#[test]
fn daemon_that_double_forks_stays_in_the_job() {
    let w = Work::new("daemon");
    let script = repo().join("tests/programs/daemon.sh");
    let file = w.path("daemon.txt");
    let mut job = cycle(&w, "daemon", &[script.to_str().unwrap(), file.to_str().unwrap(), "80"], &w.path("out.txt"), &|n| {
        wait_file_lines(&file, 15 * n as usize);
    });
    assert!(job.wait(Duration::from_secs(60)).success());
    let got: Vec<String> = fs::read_to_string(&file).unwrap().lines().map(String::from).collect();
    let mut want: Vec<String> = (1..=80).map(|i| format!("d {i}")).collect();
    want.push("end".into());
    assert_eq!(got, want);
}

#[test]
fn exec_with_a_cleared_environment_keeps_the_shim() {
    let w = Work::new("envi");
    let prog = gcc("heaplog");
    let log = w.s("log.txt");
    // bash forks, env clears the environment and execs: the program must still carry the shim.
    let cmd = format!("env -i {} 4 {log} 80; echo $? > {}", prog.display(), w.s("status"));
    twice("envi", &["bash", "-c", &cmd], 80, &w);
    assert_eq!(fs::read_to_string(w.path("status")).unwrap().trim(), "0");
}

/// An exec with an environment the app made up (entries without '=', LD_PRELOAD among them) runs: the shim
/// adds the job's settings without choking on what it does not understand.
#[test]
fn an_exec_with_a_made_up_environment() {
    let w = Work::new("oddenv");
    let prog = gcc("oddenv");
    let out = w.path("out.txt");
    let name = w.name("oddenv");
    let mut job = launch(&w, &name, &[prog.to_str().unwrap()], &out);
    assert!(job.wait(Duration::from_secs(20)).success());
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("exec ok: odd") && text.contains("child status 0"), "{text}");
}
