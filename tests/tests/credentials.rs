//! Credentials and sandboxes: a job comes back as the users it belonged to, with its capability sets, securebits,
//! no_new_privs and seccomp filters, per process; a restore runs as the job's owner (root restores another user's
//! image only with that user's ids, and never opens for a job what the job could not); a daemon that switches
//! users is checkpointed with each process's own credentials. Run as root; attacks run as uid 65534.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;
use vos::image::FileKind;
use vos_tests::hosts::Net;
use vos_tests::image::Image;
use vos_tests::*;

const NOBODY: u32 = 65534;

/// The /proc status lines of a process that say who it is and what confines it.
fn status_lines(pid: i32) -> String {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let keys = ["Uid:", "Gid:", "Groups:", "CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:", "NoNewPrivs:", "Seccomp:", "Seccomp_filters:"];
    s.lines().filter(|l| keys.iter().any(|k| l.starts_with(k))).map(|l| format!("{}\n", l.trim_end())).collect()
}

fn chown(p: &Path, uid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(uid)).unwrap();
}

/// A directory nobody may use: vrun, its shim and restorer, and `programs`, all readable by uid 65534, its own
/// runtime directory, and files for the job's output that it owns.
struct NobodyHome {
    bin: PathBuf,
    rt: PathBuf,
}

fn nobody_home(w: &Work, programs: &[&str]) -> NobodyHome {
    let bin = w.path("bin");
    fs::create_dir_all(&bin).unwrap();
    for f in ["vrun", "libvos_shim.so", "vos-restore"] {
        fs::copy(bin_dir().join(f), bin.join(f)).unwrap();
    }
    for p in programs {
        fs::copy(gcc(p), bin.join(p)).unwrap();
    }
    for f in fs::read_dir(&bin).unwrap().flatten() {
        fs::set_permissions(f.path(), fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&w.dir, fs::Permissions::from_mode(0o777)).unwrap();
    let rt = w.path("rt");
    fs::create_dir_all(&rt).unwrap();
    chown(&rt, NOBODY);
    fs::set_permissions(&rt, fs::Permissions::from_mode(0o700)).unwrap();
    for f in ["out.txt", "err.txt"] {
        fs::write(w.path(f), "").unwrap();
        chown(&w.path(f), NOBODY);
    }
    NobodyHome { bin, rt }
}

/// `program ARGS` as uid 65534 (no groups), with its own runtime directory.
fn as_nobody(home: &NobodyHome, program: &Path) -> Command {
    let mut c = command("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", "env"]).arg(format!("XDG_RUNTIME_DIR={}", home.rt.display())).arg("HOME=/tmp").arg(program);
    c
}

/// The image path a `vrun checkpoint` printed last.
fn image_of(out: &std::process::Output) -> String {
    assert!(out.status.success(), "checkpoint failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_string()
}

/// Wait until `path` exists (a file the job writes on request); its contents.
fn answer(path: &Path) -> String {
    wait_for(path, "the job's answer", Duration::from_secs(10), |s| !s.is_empty())
}

/// Ask the `creds` program for a report (`exec`: a child's status and securebits; `mkdir`: what mkdir does).
fn ask(w: &Work, what: &str) -> String {
    let reply = w.path(if what == "exec" { "child.txt" } else { "mkdir.txt" });
    let _ = fs::remove_file(&reply);
    fs::write(w.path(what), "").unwrap();
    answer(&reply)
}

fn vrun_in(bin: &Path) -> Command {
    command(bin.join("vrun"))
}

#[test]
fn a_job_of_nobody_restored_by_root_runs_as_nobody() {
    let w = Work::new("nobody-root");
    let home = nobody_home(&w, &["creds"]);
    let name = w.name("nb");
    let mut c = as_nobody(&home, &home.bin.join("vrun"));
    c.args(["--name", &name, "--dir"]).arg(&w.dir).arg("--").arg(home.bin.join("creds")).arg(&w.dir);
    let mut job = spawn(c, &name, &w.path("out.txt"), &w.path("err.txt"));
    job.runtime = home.rt.join("vos");
    wait_step(&w.path("out.txt"), 3);
    let before = status_lines(job.pid());
    assert!(before.contains("Uid:\t65534\t65534\t65534\t65534"), "{before}");
    let child_before = ask(&w, "exec");
    let mut ck = as_nobody(&home, &home.bin.join("vrun"));
    ck.args(["checkpoint", &name, "--kill"]);
    let img = image_of(&ck.output().unwrap());
    assert_eq!(job.wait(Duration::from_secs(20)).code(), Some(75));
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::metadata(&img).unwrap().uid(), NOBODY, "nobody's vrun writes nobody's images");

    // Root restores it: it runs as nobody again, exactly.
    let mut r = vrun_in(&home.bin);
    r.args(["restore", "--name", &name, "--dir"]).arg(&w.dir).arg(&img);
    let job = spawn(r, &name, &w.path("out.txt"), &w.path("err.txt"));
    let at = last_step(&fs::read_to_string(w.path("out.txt")).unwrap());
    wait_step(&w.path("out.txt"), at + 3);
    assert_eq!(status_lines(job.pid()), before, "the restored job's credentials differ");
    let child = ask(&w, "exec");
    assert_eq!(child, child_before, "an exec'd child's credentials differ");
    for l in child.lines().filter(|l| ["CapInh", "CapPrm", "CapEff", "CapAmb"].iter().any(|k| l.starts_with(k))) {
        assert!(l.ends_with("0000000000000000"), "an exec'd child of the restored job holds capabilities: {child}");
    }
    assert!(child.contains("Uid:\t65534\t65534\t65534\t65534"), "{child}");
    // And again, from the image root's supervisor writes.
    let img2 = job.checkpoint_kill();
    let job = restore(&w, &name, &img2, &w.path("out.txt"));
    let at = last_step(&fs::read_to_string(w.path("out.txt")).unwrap());
    wait_step(&w.path("out.txt"), at + 3);
    assert_eq!(status_lines(job.pid()), before, "credentials differ after a second restore");
}

/// `vrun serve` (root) takes a job of nobody's from `vrun migrate`: it runs there as nobody.
#[test]
fn a_job_of_nobody_migrated_runs_as_nobody() {
    let w = Work::new("nobody-serve");
    let home = nobody_home(&w, &["creds"]);
    // One key, two copies: root's for serve, nobody's for migrate (each 0600, as key files must be).
    let key = vos_tests::hosts::keygen(&w.path("key"));
    let users_key = w.path("key.nobody");
    fs::copy(&key, &users_key).unwrap();
    std::os::unix::fs::chown(&users_key, Some(65534), Some(65534)).unwrap();
    let mut net = Net::new(2, &w.dir);
    net.hosts[1].serve(&key);
    let name = w.name("nbm");
    let mut c = net.hosts[0].cmd("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", "env"])
        .arg(format!("XDG_RUNTIME_DIR={}", home.rt.display()))
        .arg("HOME=/tmp")
        .arg(home.bin.join("vrun"))
        .args(["--name", &name, "--dir"])
        .arg(&w.dir)
        .arg("--")
        .arg(home.bin.join("creds"))
        .arg(&w.dir);
    let mut job = spawn(c, &name, &w.path("out.txt"), &w.path("err.txt"));
    job.runtime = home.rt.join("vos");
    wait_step(&w.path("out.txt"), 3);
    let before = status_lines(job.pid());
    let mut m = net.hosts[0].cmd("setpriv");
    m.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", "env"])
        .arg(format!("XDG_RUNTIME_DIR={}", home.rt.display()))
        .arg("HOME=/tmp")
        .arg(home.bin.join("vrun"))
        .args(["migrate", &name, "--to", &net.hosts[1].serve_addr(), "--stop-and-copy", "--json", "--key"])
        .arg(&users_key);
    let o = m.output().unwrap();
    assert!(o.status.success(), "migrate as nobody: {}\n{}", String::from_utf8_lossy(&o.stderr), net.hosts[1].serve_log());
    let there: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    let there = there["name_there"].as_str().unwrap().to_string();
    job.wait(Duration::from_secs(20));
    let pid = job_pid(&there);
    assert!(pid > 0, "the migrated job does not run: {}", net.hosts[1].serve_log());
    assert_eq!(status_lines(pid), before, "the migrated job's credentials differ");
    let child = ask(&w, "exec");
    assert!(child.contains("Uid:\t65534\t65534\t65534\t65534") && child.contains("CapEff:\t0000000000000000"), "{child}");
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// A job under setpriv: a smaller bounding set, inheritable and ambient capabilities, securebits with locks,
/// no_new_privs and two seccomp filters (mkdir denied) all come back, filters in their order.
#[test]
fn a_sandbox_comes_back_whole() {
    let w = Work::new("sandbox");
    let prog = gcc("creds");
    let name = w.name("sb");
    let out = w.path("out.txt");
    let mut c = vrun();
    c.args(["--name", &name, "--dir"]).arg(&w.dir).args(["--", "setpriv", "--bounding-set", "-net_raw,-sys_module", "--inh-caps", "+net_bind_service"]);
    c.args(["--ambient-caps", "+net_bind_service", "--securebits", "+noroot,+noroot_locked,+keep_caps_locked", "--no-new-privs", "--"]);
    c.arg(&prog).arg(&w.dir).arg("filter");
    let job = spawn(c, &name, &out, &w.path("vrun.err"));
    wait_step(&out, 3);
    let before = status_lines(job.pid());
    for want in ["CapAmb:\t0000000000000400", "CapInh:\t0000000000000400", "NoNewPrivs:\t1", "Seccomp:\t2", "Seccomp_filters:\t2"] {
        assert!(before.contains(want), "the sandbox is not what the test sets up: {before}");
    }
    let child_before = ask(&w, "exec");
    assert!(child_before.contains("noroot_locked") && child_before.contains("keep_caps_locked"), "securebits: {child_before}");
    let mkdir_before = ask(&w, "mkdir");
    assert_eq!(mkdir_before.trim(), "mkdir=EPERM mkdirat=EACCES");
    let img = job.checkpoint_kill();
    let (st, report, err) = run_vrun(&["inspect", &img]);
    assert!(st.success(), "{err}");
    let bnd = before.lines().find_map(|l| l.strip_prefix("CapBnd:")).map(|v| u64::from_str_radix(v.trim(), 16).unwrap()).unwrap();
    let bounding = format!("bounding {bnd:#x}");
    for want in ["securebits noroot,noroot_locked,keep_caps_locked", "no_new_privs 1", "seccomp: 2 filters", "ambient 0x400", &bounding] {
        assert!(report.contains(want), "vrun inspect does not say {want:?}:\n{report}");
    }
    let job = restore(&w, &name, &img, &out);
    let at = last_step(&fs::read_to_string(&out).unwrap());
    wait_step(&out, at + 3);
    assert_eq!(status_lines(job.pid()), before, "the restored sandbox differs");
    assert_eq!(ask(&w, "mkdir"), mkdir_before, "the restored filters do not do what they did");
    assert_eq!(ask(&w, "exec"), child_before, "an exec'd child's credentials or securebits differ");
    // The restored filters let the shim work: a second checkpoint and restore.
    let img = job.checkpoint_kill();
    let job = restore(&w, &name, &img, &out);
    let at = last_step(&fs::read_to_string(&out).unwrap());
    wait_step(&out, at + 3);
    assert_eq!(status_lines(job.pid()), before, "the sandbox differs after a second restore");
    assert!(!w.path("newdir").exists());
}

/// A filter that would kill the process when the shim calls socket() at a checkpoint: refused by name before any
/// thread is signalled; the job goes on.
#[test]
fn a_filter_that_would_kill_the_shim_is_refused() {
    let w = Work::new("badfilter");
    let prog = gcc("creds");
    let name = w.name("bf");
    let out = w.path("out.txt");
    let job = launch(&w, &name, &[prog.to_str().unwrap(), w.dir.to_str().unwrap(), "badfilter"], &out);
    wait_step(&out, 3);
    let (st, _, err) = run_vrun(&["checkpoint", &name]);
    assert!(!st.success(), "a checkpoint of a process whose filter kills socket() succeeded");
    assert!(err.contains("seccomp filter") && err.contains("socket") && err.contains("kill the process"), "{err}");
    let at = last_step(&fs::read_to_string(&out).unwrap());
    wait_step(&out, at + 3);
    assert!(std::path::Path::new(&format!("/proc/{}", job.pid())).exists());
}

/// A daemon that starts as root and whose worker switches to nobody (as nginx, postgres or sshd do): it
/// checkpoints, and each process comes back with its own credentials; the worker keeps the root-only file it
/// was given and the working directory only root may enter.
#[test]
fn a_daemon_that_drops_privileges_comes_back_per_process() {
    let w = Work::new("dropper");
    let prog = gcc("dropper");
    let secret = w.path("secret");
    fs::write(&secret, "").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let private = w.path("private");
    fs::create_dir_all(&private).unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
    let name = w.name("dr");
    let out = w.path("out.txt");
    let job = launch(&w, &name, &[prog.to_str().unwrap(), secret.to_str().unwrap(), private.to_str().unwrap()], &out);
    wait_step(&out, 3);
    let parent = job.pid();
    let worker: i32 = fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).unwrap().trim().parse().unwrap();
    let who = |pid: i32| format!("{}cwd {}\n", status_lines(pid), fs::read_link(format!("/proc/{pid}/cwd")).unwrap().display());
    let before = (who(parent), who(worker));
    assert!(before.1.contains("Uid:\t65534"), "{}", before.1);
    let img = job.checkpoint_kill();
    let job = restore(&w, &name, &img, &out);
    let at = last_step(&fs::read_to_string(&secret).unwrap());
    wait_for(&secret, "the worker's steps", Duration::from_secs(20), |s| last_step(s) >= at + 3);
    let parent = job.pid();
    let worker: i32 = fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).unwrap().trim().parse().unwrap();
    assert_eq!((who(parent), who(worker)), before, "the processes' credentials differ after the restore");
    // Once more, from the image of the restored job.
    let img = job.checkpoint_kill();
    let mut job = restore(&w, &name, &img, &out);
    let st = job.wait(Duration::from_secs(120));
    assert!(st.success(), "{st:?}");
    let steps: Vec<i64> = fs::read_to_string(&secret).unwrap().lines().filter_map(step_of).collect();
    assert_eq!(steps, (0..1000).collect::<Vec<_>>(), "the worker's steps in the root-only file are not 0..1000 once each");
}

/// Run `vrun restore` (as `c`) of an image that must be refused: (status, stderr), the job never running.
fn refused_restore(w: &Work, c: Command, name: &str) -> (ExitStatus, String) {
    let o = run_bounded(w, c, Some(name), Duration::from_secs(30));
    assert!(!o.ran, "the job was restored: {}", o.stderr);
    (o.status.expect("vrun restore did not end"), o.stderr)
}

#[test]
fn images_bound_their_owner() {
    let w = Work::new("owners");
    let home = nobody_home(&w, &["creds"]);
    // A job of root's.
    let name = w.name("rootjob");
    let job = launch(&w, &name, &[home.bin.join("creds").to_str().unwrap(), w.dir.to_str().unwrap()], &w.path("root-out.txt"));
    wait_step(&w.path("root-out.txt"), 2);
    let img = job.checkpoint_kill();

    // Chowned to nobody: root restores it only with nobody's ids, so not at all.
    let theirs = w.path("theirs.vimg");
    fs::copy(&img, &theirs).unwrap();
    chown(&theirs, NOBODY);
    let mut c = vrun_in(&home.bin);
    c.args(["restore", "--name", &w.name("r1")]).arg(&theirs);
    let (st, err) = refused_restore(&w, c, &w.name("r1"));
    assert_eq!(st.code(), Some(1));
    assert!(err.contains("uid 0") && err.contains("owned by") && err.contains("65534"), "{err}");

    // On stdin from a FIFO nobody made, fed by nobody: the same.
    let fifo = w.path("fifo");
    let nobody = "setpriv --reuid=65534 --regid=65534 --clear-groups";
    let piped = format!(
        "{nobody} mkfifo {f} && ({nobody} cat {img} > {f} &) && {vrun} restore --name {r} - < {f}",
        f = fifo.display(),
        img = theirs.display(),
        vrun = home.bin.join("vrun").display(),
        r = w.name("r2")
    );
    let o = command("sh").args(["-c", &piped]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("uid 0") && err.contains("65534"), "{err}");

    // Nobody restoring a readable copy of root's job: refused by name.
    let copy = w.path("copy.vimg");
    fs::copy(&img, &copy).unwrap();
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o644)).unwrap();
    let mut c = as_nobody(&home, &home.bin.join("vrun"));
    c.args(["restore", "--name", "mine"]).arg(&copy);
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("uid 0") && err.contains("not root"), "{err}");
}

/// A crafted image of nobody's job naming /etc/shadow as an open file: a root restore opens it as nobody (and
/// fails), never as root; one that claims root opened it is refused unless root owns the image.
#[test]
fn a_crafted_image_cannot_read_what_its_owner_cannot() {
    let w = Work::new("shadow");
    let home = nobody_home(&w, &["creds"]);
    let name = w.name("nbs");
    let mut c = as_nobody(&home, &home.bin.join("vrun"));
    c.args(["--name", &name, "--dir"]).arg(&w.dir).arg("--").arg(home.bin.join("creds")).arg(&w.dir);
    let mut job = spawn(c, &name, &w.path("out.txt"), &w.path("err.txt"));
    job.runtime = home.rt.join("vos");
    wait_step(&w.path("out.txt"), 2);
    let mut ck = as_nobody(&home, &home.bin.join("vrun"));
    ck.args(["checkpoint", &name, "--kill"]);
    let img = image_of(&ck.output().unwrap());
    job.wait(Duration::from_secs(20));

    let shadow = std::path::Path::new("/etc/shadow");
    assert!(shadow.exists());
    let craft = |open_as_root: bool, owner: u32, tag: &str| {
        let mut im = Image::read(&img);
        im.edit_job(|j| {
            let f = j.files.iter_mut().find(|f| matches!(&f.kind, FileKind::Regular { .. })).expect("a regular file in the job");
            if let FileKind::Regular { file } = &mut f.kind {
                file.path = "/etc/shadow".into();
            }
            f.flags = libc::O_RDONLY;
            if open_as_root {
                f.open_as = Some(vos::image::FsCreds { uid: 0, gid: 0, groups: vec![] });
            }
        });
        let p = w.path(&format!("crafted-{tag}.vimg"));
        im.write(&p);
        chown(&p, owner);
        p
    };
    for (tag, open_as_root, owner, expect) in [
        ("nobody", false, NOBODY, &["Permission denied", "as uid 65534"][..]),
        ("nobody-claims-root", true, NOBODY, &["opened with uid 0", "cannot bring it back"][..]),
        ("root-owned", false, 0, &["Permission denied", "as uid 65534"][..]),
    ] {
        let p = craft(open_as_root, owner, tag);
        let r = w.name("crafted");
        let mut c = vrun_in(&home.bin);
        c.args(["restore", "--name", &r]).arg(&p);
        let (st, err) = refused_restore(&w, c, &r);
        assert_eq!(st.code(), Some(1), "{tag}: {err}");
        assert!(expect.iter().all(|e| err.contains(e)) && err.contains("/etc/shadow"), "{tag}: {err}");
    }
}
