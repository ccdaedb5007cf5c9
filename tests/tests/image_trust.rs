//! Whose images a restore trusts: in a shared directory only the caller's own images count, a directory others
//! could empty or refill is refused, images and the directories vrun makes for them are private, and with a key
//! only an image it signed is restored (every byte covered, another key's or an unsigned one refused unless
//! --trust-unsigned). `vrun inspect` escapes what the job controls. Attacks run as uid 65534.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use vos::chunk::Kind;
use vos_tests::image::Image;
use vos_tests::*;

const NOBODY: u32 = 65534;

/// `ARGV` as uid 65534 (no groups), in /tmp; its status and stderr.
fn as_nobody(argv: &[&str]) -> (std::process::ExitStatus, String, String) {
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", "env", "-u", "XDG_RUNTIME_DIR", "HOME=/tmp"])
        .args(argv)
        .current_dir("/tmp")
        .output()
        .expect("setpriv");
    (o.status, String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn nobody_ok(argv: &[&str]) -> String {
    let (st, out, err) = as_nobody(argv);
    assert!(st.success(), "as uid 65534: {argv:?}: {err}");
    out
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().mode() & 0o7777
}

/// A key file: 32 random bytes, 0600.
fn key(w: &Work, name: &str) -> PathBuf {
    let p = w.path(name);
    let mut b = [0u8; 32];
    fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b)).unwrap();
    fs::write(&p, b).unwrap();
    chmod(&p, 0o600);
    p
}

/// A heaplog job (8 MiB, a step every few ms) printing "step N" to `out`, with vrun's extra `args`.
fn job(w: &Work, tag: &str, out: &Path, args: &[&str]) -> Running {
    job_of(w, tag, out, args, 8)
}

fn job_of(w: &Work, tag: &str, out: &Path, args: &[&str], mib: u32) -> Running {
    let prog = gcc("heaplog");
    let name = w.name(tag);
    let mut c = vrun();
    c.args(["--name", &name]);
    if !args.contains(&"--dir") {
        c.arg("--dir").arg(&w.dir);
    }
    c.args(args).arg("--").args([prog.to_str().unwrap(), &mib.to_string(), &w.s(&format!("{tag}.log")), "100000"]);
    let j = spawn(c, &name, out, &w.path("vrun.err"));
    wait_step(out, 3);
    j
}

/// `vrun ARGS` bounded in time; a job it restores (as `name`) is ended at once.
fn bounded(w: &Work, args: &[&str], name: Option<&str>) -> Outcome {
    let mut c = vrun();
    c.args(args);
    run_bounded(w, c, name, Duration::from_secs(60))
}

/// `vrun restore ARGS... IMAGE` as a job that must start (and is ended at once).
fn restores(w: &Work, args: &[&str], what: &str) -> Outcome {
    let name = w.name("ok");
    let o = bounded(w, &[&["restore", "--name", &name, "--dir", &w.s("")][..], args].concat(), Some(&name));
    assert!(o.ran, "{what}: not restored: {}", o.stderr);
    o
}

/// `vrun restore ARGS... IMAGE`, which must be refused naming one of `expect`.
fn refused(w: &Work, args: &[&str], what: &str, expect: &[&str]) {
    let name = w.name("no");
    let o = bounded(w, &[&["restore", "--name", &name, "--dir", &w.s("")][..], args].concat(), Some(&name));
    o.assert_refused(what, expect);
}

/// Another user drops a newer image (and a link to one of root's other images) into a shared sticky directory:
/// root's `vrun restore DIR` takes root's own newest image, says what it ignored, and the other job never runs.
/// A directory others may write that is not sticky, or that belongs to another user, is refused.
#[test]
fn another_users_newer_image_is_ignored() {
    let w = Work::new("foreign");
    let shared = w.path("shared");
    fs::create_dir(&shared).unwrap();
    chmod(&shared, 0o1777);
    // Root's job, checkpointed into the shared directory.
    let (out_a, out_b) = (w.path("a.out"), w.path("b.out"));
    let a = job(&w, "mine", &out_a, &["--dir", shared.to_str().unwrap()]);
    let mine = a.checkpoint_kill();
    // Another image (another job of root's, elsewhere), which the other user gets a readable copy of.
    let b = job(&w, "theirs", &out_b, &[]);
    let other = b.checkpoint_kill();
    let public = w.path("public.vimg");
    fs::copy(&other, &public).unwrap();
    chmod(&public, 0o644);
    std::thread::sleep(Duration::from_millis(50));
    let dropped = shared.join("zz-newer.vimg");
    nobody_ok(&["cp", public.to_str().unwrap(), dropped.to_str().unwrap()]);
    nobody_ok(&["touch", "-d", "+1 hour", dropped.to_str().unwrap()]);
    nobody_ok(&["ln", "-s", &other, shared.join("zzz-link.vimg").to_str().unwrap()]);
    assert_eq!(fs::metadata(&dropped).unwrap().uid(), NOBODY);

    let (st, text, err) = run_vrun(&["inspect", shared.to_str().unwrap()]);
    assert!(st.success(), "{err}");
    assert!(text.contains(Path::new(&mine).file_name().unwrap().to_str().unwrap()), "inspect DIR took another image:\n{text}");
    assert!(err.contains("2 image(s) not yours"), "{err}");
    let b_steps = fs::read_to_string(&out_b).unwrap();
    let before = last_step(&fs::read_to_string(&out_a).unwrap());
    let name = w.name("back");
    let mut back = restore(&w, &name, shared.to_str().unwrap(), &w.path("r.out"));
    wait_step(&out_a, before + 3);
    assert_eq!(fs::read_to_string(&out_b).unwrap(), b_steps, "the other user's image ran");
    drop(back.checkpoint(true));
    assert_eq!(back.wait(Duration::from_secs(20)).code(), Some(75));

    // Writable by others and not sticky: anyone could take root's images away or put theirs in.
    chmod(&shared, 0o777);
    refused(&w, &[shared.to_str().unwrap()], "a 0777 directory", &["writable by others and not sticky"]);
    let o = bounded(&w, &["inspect", shared.to_str().unwrap()], None);
    o.assert_refused("inspect of a 0777 directory", &["writable by others and not sticky"]);
    // Another user's directory.
    chmod(&shared, 0o755);
    std::os::unix::fs::chown(&shared, Some(NOBODY), Some(NOBODY)).unwrap();
    refused(&w, &[shared.to_str().unwrap()], "another user's directory", &["belongs to user 65534"]);
    // A directory of only other users' images has none to restore.
    let only = w.path("only-theirs");
    fs::create_dir(&only).unwrap();
    chmod(&only, 0o1777);
    nobody_ok(&["cp", public.to_str().unwrap(), only.join("x.vimg").to_str().unwrap()]);
    refused(&w, &[only.to_str().unwrap()], "only another user's image", &["no image (*.vimg) of yours"]);
}

/// Root's job checkpoints periodically into a shared sticky directory where another user put files named like
/// its images, newer: root keeps its own newest images and removes none of theirs.
#[test]
fn pruning_keeps_our_images_and_leaves_others_alone() {
    let w = Work::new("prune");
    let shared = w.path("shared");
    fs::create_dir(&shared).unwrap();
    chmod(&shared, 0o1777);
    let prog = gcc("heaplog");
    let name = w.name("prune");
    let out = w.path("out.txt");
    let mut theirs = vec![];
    for i in 0..3 {
        let p = shared.join(format!("{name}-29991231-00000{i}.000.vimg"));
        nobody_ok(&["sh", "-c", &format!("echo junk > '{}' && touch -d '+1 day' '{}'", p.display(), p.display())]);
        theirs.push(p);
    }
    let mut c = vrun();
    c.args(["--name", &name, "--dir", shared.to_str().unwrap(), "--interval", "0.3", "--keep", "2", "--"]);
    c.args([prog.to_str().unwrap(), "1", &w.s("log"), "100000"]);
    let job = spawn(c, &name, &out, &w.path("vrun.err"));
    let own = || -> Vec<PathBuf> {
        fs::read_dir(&shared).unwrap().flatten().map(|e| e.path()).filter(|p| fs::metadata(p).unwrap().uid() == 0 && p.extension().is_some_and(|x| x == "vimg")).collect()
    };
    let t = std::time::Instant::now();
    while own().len() < 2 || t.elapsed() < Duration::from_secs(3) {
        assert!(t.elapsed() < Duration::from_secs(60), "no periodic images: {:?}", own());
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(job);
    // (A checkpoint may have been renamed into place just before its pruning when the job was killed.)
    let kept = own();
    assert!((2..=3).contains(&kept.len()), "root keeps its 2 newest images: {kept:?}");
    for p in &theirs {
        assert_eq!(fs::read_to_string(p).unwrap_or_default(), "junk\n", "{} was removed", p.display());
    }
}

/// Images are 0600 whatever the umask, written to the job's directory (asked for or periodic) or by --to (a new
/// file, or one that was there, replaced); a directory vrun makes for them is 0700. A --to through another
/// user's symbolic link is refused, and its target is left alone.
#[test]
fn images_are_private() {
    let w = Work::new("private");
    let prog = gcc("heaplog");
    let name = w.name("private");
    let out = w.path("out.txt");
    let dir = w.path("made/by/vrun");
    let mut c = vrun();
    c.args(["--name", &name, "--dir", dir.to_str().unwrap(), "--interval", "0.5", "--"]).args([prog.to_str().unwrap(), "2", &w.s("log"), "100000"]);
    use std::os::unix::process::CommandExt;
    // SAFETY: umask only, in the child before exec.
    unsafe {
        c.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let job = spawn(c, &name, &out, &w.path("vrun.err"));
    wait_step(&out, 3);
    let asked = job.checkpoint(false);
    let new = w.path("new.vimg");
    job.checkpoint_with(&["--to", new.to_str().unwrap()]);
    let existing = w.path("existing.vimg");
    fs::write(&existing, b"old").unwrap();
    chmod(&existing, 0o644);
    job.checkpoint_with(&["--to", existing.to_str().unwrap()]);
    // Another user's link, aimed at a file of root's.
    let victim = w.path("victim.txt");
    fs::write(&victim, b"precious\n").unwrap();
    let shared = w.path("shared");
    fs::create_dir(&shared).unwrap();
    chmod(&shared, 0o1777);
    let link = shared.join("x.vimg");
    nobody_ok(&["ln", "-s", victim.to_str().unwrap(), link.to_str().unwrap()]);
    let o = vrun().args(["checkpoint", &name, "--to", link.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("symbolic link of user 65534"), "{err}");
    assert_eq!(fs::read(&victim).unwrap(), b"precious\n");
    let t = std::time::Instant::now();
    let periodic = || {
        let images = fs::read_dir(&dir).unwrap().flatten().map(|e| e.path());
        images.filter(|p| p.to_str() != Some(asked.as_str()) && p.file_name().unwrap().to_str().unwrap().ends_with(".vimg") && !p.file_name().unwrap().to_str().unwrap().starts_with('.')).collect::<Vec<_>>()
    };
    while periodic().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(30), "no periodic image");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(job);
    for p in [PathBuf::from(&asked), new, existing, periodic()[0].clone()] {
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }
    for d in [w.path("made"), w.path("made/by"), dir] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
}

/// With a key, a signed image restores (and its job's later images are signed too); a byte changed anywhere
/// (the chunk's checksum made right), an unsigned image, one signed by another key, and any image on a stream are
/// refused, unless --trust-unsigned, which says so. A key that is not private is refused.
#[test]
fn only_images_signed_by_the_key_restore() {
    let w = Work::new("signed");
    let (k1, k2) = (key(&w, "k1"), key(&w, "k2"));
    let (k1s, k2s) = (k1.to_str().unwrap(), k2.to_str().unwrap());
    let out = w.path("out.txt");
    // Large enough (40 MiB) to be hashed in two halves: by the supervisor on one thread (it cannot start threads),
    // by restore and inspect on two.
    let j = job_of(&w, "signed", &out, &["--image-key", k1s, "--interval", "0.5"], 40);
    let t = std::time::Instant::now();
    let periodic = loop {
        let found = fs::read_dir(&w.dir).unwrap().flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "vimg"));
        if let Some(p) = found {
            break p;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no periodic image");
        std::thread::sleep(Duration::from_millis(50));
    };
    let signed = j.checkpoint_kill();
    let (st, text, err) = run_vrun(&["inspect", "--image-key", k1s, &signed]);
    assert!(st.success(), "{err}");
    assert!(text.contains("signature  keyed BLAKE3 by key") && text.contains(", checked"), "{text}");
    let (st, _, err) = run_vrun(&["inspect", "--image-key", k1s, periodic.to_str().unwrap()]);
    assert!(st.success(), "a periodic image is not signed: {err}");
    let (st, text, _) = run_vrun(&["inspect", &signed]);
    assert!(st.success() && text.contains("not checked (no key given)"), "{text}");

    // It restores with its key, and the restored job signs its images with it.
    let name = w.name("again");
    let mut again = Running::new(vrun().args(["restore", "--name", &name, "--dir"]).arg(&w.dir).args(["--image-key", k1s, &signed]).spawn().unwrap(), &name);
    let s = last_step(&fs::read_to_string(&out).unwrap());
    wait_step(&out, s + 3);
    let next = again.checkpoint(true);
    assert_eq!(again.wait(Duration::from_secs(20)).code(), Some(75));
    let (st, _, err) = run_vrun(&["inspect", "--image-key", k1s, &next]);
    assert!(st.success(), "the restored job's image is not signed: {err}");

    // A byte changed in any chunk's payload, its xxh3 made right again: the signature no longer matches.
    let good = Image::read(&signed);
    assert!(good.signature.is_some());
    // (what, bytes, also try a restore)
    let mut cases: Vec<(String, Vec<u8>, bool)> = vec![];
    let first_pages = good.all(Kind::Pages)[0];
    for i in 0..good.chunks.len() {
        let mut b = good.clone();
        let p = &mut b.chunks[i].payload;
        if p.is_empty() {
            continue;
        }
        let at = p.len() / 2;
        p[at] ^= 0x01;
        cases.push((format!("chunk {i} (kind {}) changed", good.chunks[i].kind), b.encode(), i <= 1 || i == first_pages));
    }
    let bytes = fs::read(&signed).unwrap();
    let mut flags = bytes.clone();
    flags[13] ^= 0x40; // the file head's flags: no checksum covers them
    cases.push(("the file head's flags".into(), flags, false));
    let mut mac = bytes.clone();
    let n = mac.len();
    mac[n - 1] ^= 0x80;
    let h = vos::chunk::payload_hash(&mac[n - 64..]);
    mac[n - 104 + 24..n - 104 + 32].copy_from_slice(&h.to_le_bytes());
    let hh = vos::chunk::payload_hash(&mac[n - 104..n - 104 + 32]);
    mac[n - 104 + 32..n - 104 + 40].copy_from_slice(&hh.to_le_bytes());
    cases.push(("the MAC itself".into(), mac, true));
    assert!(cases.len() > 8, "too few chunks: {}", cases.len());
    for (i, (what, b, restore_too)) in cases.iter().enumerate() {
        let p = w.path(&format!("changed-{i}.vimg"));
        fs::write(&p, b).unwrap();
        chmod(&p, 0o600);
        let o = bounded(&w, &["inspect", "--image-key", k1s, p.to_str().unwrap()], None);
        o.assert_refused(what, &["signature does not match"]);
        if *restore_too {
            refused(&w, &["--image-key", k1s, p.to_str().unwrap()], what, &["signature does not match"]);
        }
    }

    // Unsigned: refused, unless --trust-unsigned (loudly).
    let mut unsigned = good.clone();
    unsigned.signature = None;
    let up = w.path("unsigned.vimg");
    unsigned.write(&up);
    refused(&w, &["--image-key", k1s, up.to_str().unwrap()], "unsigned", &["is not signed"]);
    let o = restores(&w, &["--image-key", k1s, "--trust-unsigned", up.to_str().unwrap()], "unsigned, trusted");
    assert!(o.stderr.contains("WARNING: --trust-unsigned"), "{}", o.stderr);
    // Without a key, as before.
    restores(&w, &[up.to_str().unwrap()], "unsigned, no key");

    // Another key's signature.
    let out2 = w.path("out2.txt");
    let other = job(&w, "other", &out2, &["--image-key", k2s]).checkpoint_kill();
    refused(&w, &["--image-key", k1s, &other], "another key's", &["signed by another key"]);

    // A stream cannot be checked before it is used: refused at once, unless trusted. (Standard input that is
    // a file is checked like a file.)
    let piped = |trust: bool| {
        let name = w.name("stream");
        let mut c = vrun();
        c.args(["restore", "--name", &name, "--dir"]).arg(&w.dir).args(["--image-key", k1s]);
        if trust {
            c.arg("--trust-unsigned");
        }
        let (r, wr) = std::io::pipe().unwrap();
        let feed = fs::read(&signed).unwrap();
        std::thread::spawn(move || std::io::Write::write_all(&mut { wr }, &feed));
        c.arg("-").stdin(r);
        run_bounded(&w, c, Some(&name), Duration::from_secs(30))
    };
    piped(false).assert_refused("a stream", &["is a stream"]);
    assert!(piped(true).ran, "a trusted stream was not restored");
    let name = w.name("stdin");
    let mut c = vrun();
    c.args(["restore", "--name", &name, "--dir"]).arg(&w.dir).args(["--image-key", k1s, "-"]).stdin(fs::File::open(&signed).unwrap());
    assert!(run_bounded(&w, c, Some(&name), Duration::from_secs(30)).ran, "a signed image on standard input (a file) was not restored");

    // An image someone holds open for writing could change between its check and its use.
    let held = fs::OpenOptions::new().append(true).open(&signed).unwrap();
    refused(&w, &["--image-key", k1s, &signed], "open for writing", &["open for writing by another process"]);
    drop(held);

    // Keys must be private, exactly 32 bytes, and not reached through a link.
    let loose = w.path("loose");
    fs::copy(&k1, &loose).unwrap();
    chmod(&loose, 0o644);
    let short = w.path("short");
    fs::write(&short, [1u8; 31]).unwrap();
    chmod(&short, 0o600);
    let link = w.path("link");
    std::os::unix::fs::symlink(&k1, &link).unwrap();
    for (k, expect) in [(&loose, "can be read or changed by others"), (&short, "exactly 32 bytes"), (&link, "symbolic link")] {
        let o = bounded(&w, &["inspect", "--image-key", k.to_str().unwrap(), &signed], None);
        o.assert_refused(&format!("key {}", k.display()), &[expect]);
    }
}

/// `vrun checkpoint --image-key` signs one image of a job that has no key; a stream cannot be signed. A user who
/// cannot lease another user's image file checks a private copy of it instead.
#[test]
fn a_checkpoint_signed_on_request() {
    let w = Work::new("asked");
    let k = key(&w, "k");
    let ks = k.to_str().unwrap();
    let out = w.path("out.txt");
    let mut j = job(&w, "asked", &out, &[]);
    let o = vrun().args(["checkpoint", &j.name, "--image-key", ks, "--to", "-"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("cannot be signed"));
    let plain = j.checkpoint(false);
    let (st, text, _) = run_vrun(&["inspect", &plain]);
    assert!(st.success() && text.contains("signature  none"), "{text}");
    let o = vrun().args(["checkpoint", &j.name, "--kill", "--json", "--image-key", ks]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let json = String::from_utf8_lossy(&o.stdout);
    let img = json.split("\"image\":\"").nth(1).and_then(|s| s.split('"').next()).unwrap().to_string();
    assert!(json.contains("\"signed\":\""), "{json}");
    assert_eq!(j.wait(Duration::from_secs(20)).code(), Some(75));
    let (st, _, err) = run_vrun(&["inspect", "--image-key", ks, &img]);
    assert!(st.success(), "{err}");
    restores(&w, &["--image-key", ks, &img], "signed on request");

    // As another user, with a copy of the key of their own: the root-owned image (readable) cannot be leased by
    // them, so it is checked and read from a private copy.
    let pubdir = w.path("pub");
    fs::create_dir(&pubdir).unwrap();
    let copy = pubdir.join("img.vimg");
    fs::copy(&img, &copy).unwrap();
    chmod(&copy, 0o644);
    let theirs = pubdir.join("key");
    fs::copy(&k, &theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    let vrun_bin = bin_dir().join("vrun");
    let text = nobody_ok(&[vrun_bin.to_str().unwrap(), "inspect", "--image-key", theirs.to_str().unwrap(), copy.to_str().unwrap()]);
    assert!(text.contains(", checked") && text.contains("owned by uid 0"), "{text}");
    let mut b = fs::read(&copy).unwrap();
    let n = b.len();
    b[n / 2] ^= 1;
    fs::write(&copy, &b).unwrap();
    let (st, _, err) = as_nobody(&[vrun_bin.to_str().unwrap(), "inspect", "--image-key", theirs.to_str().unwrap(), copy.to_str().unwrap()]);
    assert!(!st.success() && err.contains("signature does not match"), "{err}");
}

/// What the job controls (its program's path, argv, cwd, process name) is printed escaped by `vrun inspect`:
/// no terminal escape sequence reaches whoever reads the report.
#[test]
fn inspect_escapes_what_the_job_controls() {
    let w = Work::new("escape");
    let evil = "\u{1b}[2J\u{1b}]0;pwned\u{7}";
    let prog = w.path(&format!("x{evil}prog"));
    fs::copy(gcc("heaplog"), &prog).unwrap();
    let cwd = w.path(&format!("cwd{evil}"));
    fs::create_dir(&cwd).unwrap();
    let name = w.name("escape");
    let out = w.path("out.txt");
    let mut c = vrun();
    c.current_dir(&cwd).args(["--name", &name, "--dir"]).arg(&w.dir).arg("--").arg(&prog).args(["2", &w.s("log"), "100000", evil]);
    let j = spawn(c, &name, &out, &w.path("vrun.err"));
    wait_step(&out, 3);
    let img = j.checkpoint_kill();
    for args in [vec!["inspect", img.as_str()], vec!["inspect", "--mappings", img.as_str()]] {
        let o = vrun().args(&args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(!o.stdout.iter().any(|&b| b == 0x1b || b == 0x07), "a raw control character in the report:\n{text:?}");
        for want in ["\\x1b[2J\\x1b]0;pwned\\x07", "x\\x1b[2J"] {
            assert!(text.contains(want), "{want} not in the report:\n{text}");
        }
        assert!(text.contains(&format!("cwd        {}/cwd\\x1b[2J", w.dir.display())), "{text}");
    }
    // JSON carries the bytes as JSON escapes.
    let o = vrun().args(["inspect", "--json", &img]).output().unwrap();
    assert!(o.status.success() && !o.stdout.contains(&0x1b) && String::from_utf8_lossy(&o.stdout).contains("\\u001b[2J"));
}
