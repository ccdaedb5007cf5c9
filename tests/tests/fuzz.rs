//! A structure-aware fuzzer of images. It takes a real image (two processes talking over pipes and socketpairs,
//! bytes in flight) and changes it where a hostile image would: integers in the job's metadata or header to
//! boundary values, indices out of range, strings to "../", to huge ones or to paths of files that are not the
//! job's, arrays shorter, longer or reordered, chunks dropped, repeated, swapped or cut, data after the end; then
//! frames it again with the right checksums, so every change reaches the decoder and the restorer.
//!
//! Each case runs `vrun inspect` and `vrun restore` (as root, in a mount namespace where everything but the
//! test's own directory, /run/vos, /proc, /dev and /sys is read-only). Neither may panic, crash (vos-restore must
//! say why it gave up) or hang, and no file outside the job's own directory may change (sentinel files are
//! compared). A restore that succeeds (a harmless change) has its job ended at once.
//!
//! VOS_FUZZ_CASES=N runs N cases (default 300), VOS_FUZZ_SEED=S another deterministic series.

use std::ffi::CString;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vos_tests::image::{self, Image, Rng, Value};
use vos_tests::*;

const CASE_TIMEOUT: Duration = Duration::from_secs(20);

/// Files outside the job's directory, which no case may change: their bytes (a FIFO and a directory: their kind).
struct Sentinels {
    dir: PathBuf,
    files: Vec<(PathBuf, Vec<u8>)>,
}

impl Sentinels {
    fn new(lib: &str) -> Sentinels {
        let dir = std::env::temp_dir().join(format!("vos-fuzz-sentinels-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("dir")).unwrap();
        fs::write(dir.join("file.txt"), b"a sentinel: no restore may write here\n").unwrap();
        fs::copy(lib, dir.join("lib.so")).unwrap();
        std::os::unix::fs::symlink(dir.join("file.txt"), dir.join("link")).unwrap();
        let fifo = CString::new(dir.join("fifo").display().to_string()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let files = ["file.txt", "lib.so"].iter().map(|f| (dir.join(f), fs::read(dir.join(f)).unwrap())).collect();
        Sentinels { dir, files }
    }

    fn paths(&self) -> Vec<String> {
        ["file.txt", "lib.so", "link", "fifo", "dir", "dir/new", "sock"].iter().map(|f| self.dir.join(f).display().to_string()).collect()
    }

    fn check(&self, case: &str) {
        for (p, bytes) in &self.files {
            assert!(fs::read(p).unwrap() == *bytes, "{case}: sentinel {} changed", p.display());
        }
        let kind = |f: &str| fs::symlink_metadata(self.dir.join(f)).map(|m| m.file_type());
        use std::os::unix::fs::FileTypeExt;
        assert!(kind("link").unwrap().is_symlink() && kind("fifo").unwrap().is_fifo() && kind("dir").unwrap().is_dir(), "{case}: a sentinel changed kind");
        let extra: Vec<_> = fs::read_dir(&self.dir).unwrap().flatten().map(|e| e.file_name()).filter(|n| !["file.txt", "lib.so", "link", "fifo", "dir"].contains(&n.to_str().unwrap_or(""))).collect();
        assert!(extra.is_empty() && fs::read_dir(self.dir.join("dir")).unwrap().next().is_none(), "{case}: files appeared among the sentinels: {extra:?}");
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Run `c` in a mount namespace of its own where every mount is read-only but `writable` (bound onto themselves
/// first) and the kernel's /proc, /dev, /sys.
fn read_only_host(c: &mut std::process::Command, writable: &[&Path]) {
    let skip = |m: &str| {
        ["/proc", "/dev", "/sys"].iter().any(|k| m == *k || m.starts_with(&format!("{k}/"))) || writable.iter().any(|w| Path::new(m).starts_with(w))
    };
    let mounts: Vec<CString> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| !m.contains('\\') && !skip(m))
        .map(|m| CString::new(m).unwrap())
        .collect();
    let writable: Vec<CString> = writable.iter().map(|w| CString::new(w.display().to_string()).unwrap()).collect();
    // SAFETY: only system calls between fork and exec, on strings made before the fork.
    unsafe {
        c.pre_exec(move || {
            let null = std::ptr::null::<libc::c_char>();
            let err = || Err(std::io::Error::last_os_error());
            if libc::unshare(libc::CLONE_NEWNS) != 0 || libc::mount(null, c"/".as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()) != 0 {
                return err();
            }
            for w in &writable {
                if libc::mount(w.as_ptr(), w.as_ptr(), null, libc::MS_BIND | libc::MS_REC, std::ptr::null()) != 0 {
                    return err();
                }
            }
            for m in &mounts {
                let r = libc::mount(null, m.as_ptr(), null, libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY, std::ptr::null());
                if r != 0 && m.as_bytes() == b"/" {
                    return err();
                }
            }
            Ok(())
        });
    }
}

/// Whether the restore got the job running (VOS_TIMING has it say so).
fn ran(o: &Outcome) -> bool {
    o.ran || o.stderr.contains("vrun: restore: running at")
}

/// A case's outcome is acceptable: a clean refusal (status 1 and a `vrun:` message), a report (inspect), or a
/// job that ran; never a panic, a signal, a crash of vos-restore, or a hang.
fn check(case: &str, what: &str, o: &Outcome) {
    use std::os::unix::process::ExitStatusExt;
    let st = o.status.unwrap_or_else(|| panic!("{case}: {what} hung (killed after {CASE_TIMEOUT:?}); stderr: {}", o.stderr));
    // Once the job runs, vrun ends as the job does (killed by the test, or crashed by a harmless-looking change).
    let crashed = !ran(o) && (st.signal().is_some() || st.code() == Some(101) || st.code() == Some(134));
    assert!(!crashed, "{case}: {what} crashed: {st:?}; stderr: {}", o.stderr);
    assert!(!CRASH_WORDS.iter().any(|c| o.stderr.contains(c)), "{case}: {what} crashed rather than refused: {}", o.stderr);
    if st.code() == Some(1) && !ran(o) {
        assert!(o.stderr.lines().any(|l| l.starts_with("vrun: ")), "{case}: {what} failed without a message: {:?}", o.stderr);
    }
}

#[test]
fn crafted_images_are_refused_or_restored_never_crash() {
    let cases: usize = std::env::var("VOS_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let seed: u64 = std::env::var("VOS_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let w = Work::new("fuzz");
    let prog = gcc("pingpong");
    let out = w.path("out.txt");
    let job = launch(&w, &w.name("fuzzbase"), &[prog.to_str().unwrap(), "100000000"], &out);
    wait_step(&out, 3);
    let base = Image::read(job.checkpoint_kill());
    let lib = base.job().processes[0].regions.iter().find_map(|r| r.file.as_ref().map(|f| f.path.clone()).filter(|p| p.contains("libc"))).unwrap();
    let sentinels = Sentinels::new(&lib);
    fs::write(w.path("mine.txt"), b"the job's own\n").unwrap();
    let mut targets = sentinels.paths();
    targets.push(w.s("mine.txt"));
    fs::create_dir_all("/run/vos").unwrap();
    let writable = [w.dir.as_path(), Path::new("/run/vos")];
    // The namespace holds: the sentinels cannot be written in it, the test's directory can.
    let mut probe = command("sh");
    probe.arg("-c").arg(format!("! touch {0}/x 2>/dev/null && touch {1}/x && rm {1}/x", sentinels.dir.display(), w.dir.display()));
    read_only_host(&mut probe, &writable);
    assert!(probe.status().unwrap().success(), "the read-only namespace does not hold");

    let mut rng = Rng::new(seed);
    let (mut refused, mut restored) = (0, 0);
    let start = Instant::now();
    let job_chunk = base.all(vos::chunk::Kind::Job)[0];
    let header_chunk = base.all(vos::chunk::Kind::Header)[0];
    for n in 0..cases {
        let mut img = base.clone();
        let mut did = vec![];
        for _ in 0..1 + rng.below(3) {
            let which = rng.below(10);
            let chunk = if which < 7 { job_chunk } else { header_chunk };
            did.push(match which {
                // The metadata as a tree, unless a change before made it something else.
                0..=7 if chunk < img.chunks.len() && img.chunks[chunk].kind == base.chunks[chunk].kind && Value::decode(&img.chunks[chunk].payload).is_some() => {
                    let (mut v, _) = Value::decode(&img.chunks[chunk].payload).unwrap();
                    let what = image::mutate_value(&mut v, &mut rng, &targets);
                    img.chunks[chunk].payload = v.to_bytes();
                    what
                }
                _ => image::mutate_chunks(&mut img, &mut rng),
            });
        }
        let case = format!("case {n} (seed {seed}): {}", did.join("; "));
        let path = w.path("case.vimg");
        img.write(&path);

        let mut c = vrun();
        c.arg("inspect").arg(&path);
        check(&case, "inspect", &run_bounded(&w, c, None, CASE_TIMEOUT));

        let name = w.name("fz");
        let mut c = vrun();
        c.args(["restore", "--quiet", "--name", &name, "--dir"]).arg(&w.dir).arg(&path).env("VOS_TIMING", "1");
        read_only_host(&mut c, &writable);
        let o = run_bounded(&w, c, Some(&name), CASE_TIMEOUT);
        check(&case, "restore", &o);
        if self::ran(&o) { restored += 1 } else { refused += 1 }
        sentinels.check(&case);
        for f in fs::read_dir(&w.dir).unwrap().flatten() {
            if f.file_name().to_string_lossy().starts_with("bounded-") {
                let _ = fs::remove_file(f.path());
            }
        }
    }
    eprintln!("{cases} cases in {:.1} s: {refused} refused, {restored} restored", start.elapsed().as_secs_f64());
}
