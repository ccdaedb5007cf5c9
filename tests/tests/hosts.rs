//! Restoring where the world differs: another host name, files under other paths, libraries missing or of
//! another version, another kernel's vDSO. Each "other host" is made by the test itself: a UTS namespace with its
//! own names, or a separate root directory (its own copies of vrun and the libraries vrun needs, at another
//! prefix) entered with a mount namespace and chroot.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use vos_tests::*;

const LIBS: &str = "/usr/lib/x86_64-linux-gnu";

/// A separate root: vrun, its restorer and shim under /vos, the libraries vrun needs under /opt/vrunlib, the
/// loader at its usual path, and /proc, /dev, /tmp, /run, /work.
struct Root {
    dir: PathBuf,
}

impl Root {
    fn new(w: &Work) -> Root {
        let dir = w.path("root");
        for d in ["proc", "dev", "tmp", "run", "vos", "lib64", "work", "opt/vrunlib"] {
            fs::create_dir_all(dir.join(d)).unwrap();
        }
        let r = Root { dir };
        for f in ["vrun", "vos-restore", "libvos_shim.so"] {
            r.put(&bin_dir().join(f), &format!("/vos/{f}"));
        }
        let ldd = Command::new("ldd").arg(bin_dir().join("vrun")).output().unwrap();
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            let line = line.trim();
            if let Some((name, rest)) = line.split_once(" => ") {
                r.put(Path::new(rest.split_whitespace().next().unwrap()), &format!("/opt/vrunlib/{name}"));
            } else if line.starts_with('/') {
                let loader = line.split_whitespace().next().unwrap();
                r.put(Path::new(loader), loader);
            }
        }
        r
    }

    /// Copy `src` to `at` inside the root.
    fn put(&self, src: &Path, at: &str) {
        let dst = self.path(at);
        fs::create_dir_all(dst.parent().unwrap()).unwrap();
        fs::copy(src, &dst).unwrap_or_else(|e| panic!("copying {} into the root: {e}", src.display()));
    }

    fn path(&self, at: &str) -> PathBuf {
        self.dir.join(at.trim_start_matches('/'))
    }

    /// `vrun ARGS` inside the root: a mount namespace of its own with /proc and /dev bound in, then chroot.
    fn vrun(&self, args: &[&str]) -> Command {
        let mut c = command("unshare");
        c.args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(r#"R="$1"; shift; mount --rbind /proc "$R/proc" && mount --rbind /dev "$R/dev" && exec chroot "$R" /vos/vrun "$@""#)
            .arg("sh")
            .arg(&self.dir)
            .args(args)
            .env("LD_LIBRARY_PATH", "/opt/vrunlib");
        c
    }

    /// Start `vrun ARGS` in the root for job `name`.
    fn spawn(&self, w: &Work, name: &str, args: &[&str], n: u32) -> Running {
        let mut r = spawn(self.vrun(args), name, &w.path(&format!("restore{n}.out")), &w.path("vrun.err"));
        r.runtime = self.path("/run/vos");
        r
    }

    /// Checkpoint job `name` running in the root and end it; the image's path inside the root.
    fn checkpoint_kill(&self, job: &mut Running, to: &str) {
        let o = self.vrun(&["checkpoint", "--kill", &job.name, "--to", to]).output().unwrap();
        assert!(o.status.success(), "checkpoint in the root: {}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(job.wait(Duration::from_secs(20)).code(), Some(75));
    }
}

/// Launch `argv` with the work dir as its working directory (so a root can give it that place too).
fn launch_in(w: &Work, name: &str, argv: &[&str], out: &Path) -> Running {
    let mut c = vrun();
    c.current_dir(&w.dir).args(["--name", name, "--dir"]).arg(&w.dir).arg("--").args(argv);
    spawn(c, name, out, &w.path("vrun.err"))
}

fn run_to_end(job: &mut Running, out: &Path, steps: i64) -> String {
    let st = job.wait(Duration::from_secs(120));
    let text = fs::read_to_string(out).unwrap();
    assert!(st.success(), "restored job ended with {st:?}; output tail: {}", text.lines().rev().take(5).collect::<Vec<_>>().join(" | "));
    assert_steps(&text, steps);
    text
}

#[test]
fn host_and_domain_names_stay_with_the_job() {
    let w = Work::new("uts");
    let prog = gcc("uts");
    let out = w.path("out.txt");
    let name = w.name("uts");
    let job = launch(&w, &name, &[prog.to_str().unwrap(), "300"], &out);
    wait_step(&out, 20);
    let img = job.checkpoint_kill();
    // Another host, with other names.
    let mut c = command("unshare");
    c.args(["-u", "sh", "-c", r#"hostname elsewhere.example && domainname otherdomain && exec "$@""#, "sh"]);
    c.arg(bin_dir().join("vrun")).args(["restore", "--name", &name, "--dir"]).arg(&w.dir).arg(&img);
    let job = spawn(c, &name, &w.path("restore1.out"), &w.path("vrun.err"));
    let at = last_step(&wait_step(&out, 60));
    let img = job.checkpoint_kill();
    // Renamed on purpose.
    let mut c = vrun();
    c.args(["restore", "--name", &name, "--hostname", "renamed", "--domainname", "newdomain", "--dir"]).arg(&w.dir).arg(&img);
    let mut job = spawn(c, &name, &w.path("restore2.out"), &w.path("vrun.err"));
    let text = run_to_end(&mut job, &out, 300);
    let names: Vec<(i64, String)> = text.lines().filter_map(|l| Some((step_of(l)?, l.splitn(3, ' ').nth(2)?.to_string()))).collect();
    let first = names[0].1.clone();
    let renamed = names.iter().position(|(_, n)| *n != first).expect("the names never changed");
    assert!(names[renamed].0 > at, "the names changed before the renaming restore (step {})", names[renamed].0);
    assert!(names[renamed..].iter().all(|(_, n)| n == "renamed newdomain"), "after the renaming restore: {:?}", &names[renamed..renamed + 3]);
    assert!(!text.contains("elsewhere"), "the restoring host's name leaked into the job");
}

/// The job's own libraries, copied into the root under /opt/applib.
fn app_libs(root: &Root) {
    for f in ["libc.so.6", "libgcc_s.so.1", "ld-linux-x86-64.so.2"] {
        root.put(&Path::new(LIBS).join(f), &format!("/opt/applib/{f}"));
    }
}

/// Launch `clock`, checkpoint it, and set up a root holding what it needs elsewhere: the program in /apps, its
/// output and working directory in /work, the image in /work. Returns the job name and the --map arguments.
fn clock_in_root(w: &Work, root: &Root, steps: i64) -> (String, Vec<String>) {
    let prog = gcc("clock");
    let out = w.path("out.txt");
    let name = w.name("clock");
    let job = launch_in(w, &name, &[prog.to_str().unwrap(), &steps.to_string()], &out);
    wait_step(&out, 30);
    let img = job.checkpoint_kill();
    root.put(&prog, "/apps/clock");
    root.put(&out, "/work/out.txt");
    root.put(&w.path("vrun.err"), "/work/vrun.err");
    root.put(Path::new(&img), "/work/1.vimg");
    let maps = vec![
        format!("{LIBS}=/opt/applib"),
        format!("{}=/apps", prog.parent().unwrap().display()),
        format!("{}=/vos", bin_dir().display()),
        format!("{}=/work", w.dir.display()),
    ];
    (name, maps)
}

fn restore_args<'a>(name: &'a str, maps: &'a [String], img: &'a str) -> Vec<&'a str> {
    let mut a = vec!["restore", "--name", name, "--dir", "/work"];
    for m in maps {
        a.extend(["--map", m.as_str()]);
    }
    a.push(img);
    a
}

#[test]
fn paths_remapped_in_a_separate_root() {
    let w = Work::new("root-map");
    let root = Root::new(&w);
    app_libs(&root);
    let (name, maps) = clock_in_root(&w, &root, 300);
    restore_twice_in_root(&w, &root, &name, &maps, 300);
}

/// Restore /work/1.vimg in the root with `maps`, let it run, checkpoint it again there and restore that with no
/// maps (its paths are the root's now); it must run to its end with every step once.
fn restore_twice_in_root(w: &Work, root: &Root, name: &str, maps: &[String], steps: i64) {
    let out = root.path("/work/out.txt");
    let mut job = root.spawn(w, name, &restore_args(name, maps, "/work/1.vimg"), 1);
    wait_step(&out, last_step(&fs::read_to_string(&out).unwrap()) + 30);
    root.checkpoint_kill(&mut job, "/work/2.vimg");
    let mut job = root.spawn(w, name, &restore_args(name, &[], "/work/2.vimg"), 2);
    run_to_end(&mut job, &out, steps);
}

#[test]
fn a_different_library_is_named_before_anything_is_mapped() {
    let w = Work::new("root-differs");
    let root = Root::new(&w);
    app_libs(&root);
    // Another "libc.so.6" here: a different file of the same name.
    root.put(&Path::new(LIBS).join("libm.so.6"), "/opt/applib/libc.so.6");
    let (name, maps) = clock_in_root(&w, &root, 300);
    let o = root.vrun(&restore_args(&name, &maps, "/work/1.vimg")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("libc.so.6: build-id differs"), "stderr: {err}");
    assert_eq!(fs::read_to_string(root.path("/work/out.txt")).unwrap().lines().filter(|l| l.starts_with("MISMATCH")).count(), 0);
    // Nothing was lost: with the right library the same image restores and runs to its end.
    root.put(&Path::new(LIBS).join("libc.so.6"), "/opt/applib/libc.so.6");
    let mut job = root.spawn(&w, &name, &restore_args(&name, &maps, "/work/1.vimg"), 1);
    run_to_end(&mut job, &root.path("/work/out.txt"), 300);
}

#[test]
fn a_bundle_restores_in_a_root_without_the_programs_libraries() {
    let w = Work::new("root-bundle");
    let prog = gcc("clock");
    let out = w.path("out.txt");
    let name = w.name("clock");
    let mut job = launch_in(&w, &name, &[prog.to_str().unwrap(), "300"], &out);
    wait_step(&out, 30);
    let mut c = vrun();
    let img = w.s("1.vimg");
    c.args(["checkpoint", "--bundle", "--kill", &name, "--to", &img]);
    assert!(c.status().unwrap().success());
    assert_eq!(job.wait(Duration::from_secs(20)).code(), Some(75));
    // The root has no program and none of its libraries (vrun's own copies live under /opt/vrunlib).
    let root = Root::new(&w);
    assert!(!root.path(LIBS).exists() && !root.path(&prog.display().to_string()).exists());
    root.put(&out, "/work/out.txt");
    root.put(&w.path("vrun.err"), "/work/vrun.err");
    root.put(Path::new(&img), "/work/1.vimg");
    // Its program and libraries then come from the image: the second, plain checkpoint carries them again.
    restore_twice_in_root(&w, &root, &name, &[format!("{}=/work", w.dir.display())], 300);
}

/// The image's vDSO address and this process's vDSO address, from /proc/PID/maps.
fn vdso_of(pid: i32) -> u64 {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let l = maps.lines().find(|l| l.ends_with("[vdso]")).expect("no vDSO");
    u64::from_str_radix(l.split('-').next().unwrap(), 16).unwrap()
}

#[test]
fn a_different_vdso_is_reached_through_trampolines() {
    let w = Work::new("vdso");
    let prog = gcc("clock");
    let out = w.path("out.txt");
    let name = w.name("vdso");
    let mut job = launch(&w, &name, &[prog.to_str().unwrap(), "300"], &out);
    for n in 1..=2 {
        wait_step(&out, last_step(&fs::read_to_string(&out).unwrap_or_default()).max(0) + 30);
        let before = vdso_of(job.pid());
        let img = job.checkpoint_kill();
        let mut c = vrun();
        c.env("VOS_TEST_FOREIGN_VDSO", "1").args(["restore", "--name", &name, "--dir"]).arg(&w.dir).arg(&img);
        job = spawn(c, &name, &w.path(&format!("restore{n}.out")), &w.path("vrun.err"));
        wait_step(&out, last_step(&fs::read_to_string(&out).unwrap()) + 5);
        let pid = job.pid();
        assert_ne!(vdso_of(pid), before, "the new vDSO must lie elsewhere");
        // The old vDSO's place holds a copy whose entry points jump (jmp *0(%rip)) to the new one.
        let mut mem = fs::File::open(format!("/proc/{pid}/mem")).unwrap();
        let mut text = vec![0u8; 8192];
        use std::io::{Read, Seek, SeekFrom};
        mem.seek(SeekFrom::Start(before)).unwrap();
        mem.read_exact(&mut text).unwrap();
        assert_eq!(&text[..4], b"\x7fELF");
        let jumps = text.windows(6).filter(|w| *w == [0xff, 0x25, 0, 0, 0, 0]).count();
        assert!(jumps >= 4, "only {jumps} redirected entry points");
    }
    run_to_end(&mut job, &out, 300);
}
