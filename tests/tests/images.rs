//! Images: a truncated, corrupt or foreign image is refused with a clear message, and nothing of the job runs.

use std::fs;
use std::time::Duration;
use vos::chunk::Kind;
use vos::image::{Contents, FdImage, FileKind, OpenFile, PipeImage, RegionKind, SockAddr, SocketImage};
use vos_tests::image::{self, Image};
use vos_tests::*;

fn good_image(w: &Work) -> (String, std::path::PathBuf) {
    let prog = gcc("heaplog");
    let out = w.path("out.txt");
    let name = w.name("img");
    let log = w.s("log.txt");
    let job = launch(w, &name, &[prog.to_str().unwrap(), "8", &log, "100000"], &out);
    wait_step(&out, 3);
    (job.checkpoint_kill(), out)
}

/// `vrun restore` of a bad image fails fast, says why, and the job's program never runs.
fn refused(w: &Work, img: &std::path::Path, out: &std::path::Path, expect: &[&str]) {
    let before = fs::read_to_string(out).unwrap_or_default();
    let name = w.name("bad");
    let mut c = vrun();
    c.args(["restore", "--name", &name]).arg(img);
    let start = std::time::Instant::now();
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && o.status.code() != Some(75), "{}: restore succeeded ({:?})", img.display(), o.status);
    assert!(start.elapsed() < Duration::from_secs(20));
    assert!(expect.iter().any(|e| err.contains(e)), "{}: message {err:?} names none of {expect:?}", img.display());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fs::read_to_string(out).unwrap_or_default(), before, "the job ran from a bad image");
    let (_, list, _) = run_vrun(&["list"]);
    assert!(!list.contains(&name), "a job from a bad image is still listed");
}

#[test]
fn bad_images_are_refused() {
    let w = Work::new("badimg");
    let (img, out) = good_image(&w);
    let bytes = fs::read(&img).unwrap();
    let len = bytes.len();
    let bad = |tag: &str, b: &[u8]| {
        let p = w.path(&format!("bad-{tag}.vimg"));
        fs::write(&p, b).unwrap();
        p
    };
    let trunc = ["truncated"];
    let corrupt = ["corrupt", "truncated"];
    for (tag, cut) in [("empty", 0), ("head", 10), ("half", len / 2), ("nearly", len - 1), ("noend", len - 48)] {
        refused(&w, &bad(tag, &bytes[..cut]), &out, if cut < 16 { &["not a vOS image", "truncated"] } else { &trunc });
    }
    for (tag, at) in [("flip-head", 20), ("flip-header", 80), ("flip-meta", 600), ("flip-pages", len / 2), ("flip-late", len - 200)] {
        let mut b = bytes.clone();
        b[at] ^= 0x10;
        refused(&w, &bad(tag, &b), &out, &corrupt);
    }
    let mut v = bytes.clone();
    v[8] = 99;
    refused(&w, &bad("version", &v), &out, &["format version 99"]);
    let random: Vec<u8> = (0..65536u32).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
    refused(&w, &bad("random", &random), &out, &["not a vOS image"]);
    refused(&w, std::path::Path::new("/bin/true"), &out, &["not a vOS image"]);
    // The same bad bytes through a pipe.
    let mut c = vrun();
    let f = fs::File::open(w.path("bad-flip-pages.vimg")).unwrap();
    let o = c.args(["restore", "-"]).stdin(f).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("corrupt"));
    // And the good image still works.
    let name = w.name("good");
    let mut job = restore(&w, &name, &img, &w.path("r.out"));
    let s = last_step(&fs::read_to_string(&out).unwrap());
    wait_step(&out, s + 3);
    let _ = job.checkpoint(true);
    assert_eq!(job.wait(Duration::from_secs(20)).code(), Some(75));
}

#[test]
fn inspect_reports_and_json() {
    let w = Work::new("inspect");
    let (img, _) = good_image(&w);
    let (st, text, err) = run_vrun(&["inspect", &img]);
    assert!(st.success(), "{err}");
    // A report: the host, the tree, memory and fds of the whole job by kind, then each process.
    for want in ["host       ", "tree       1 processes", "memory     ", "mapped from files", "never touched", "fds        ", "process    pid 2", "threads    1"] {
        assert!(text.contains(want), "inspect lacks {want:?}:\n{text}");
    }
    assert!(!text.contains("[heap]"), "the report lists every mapping without --mappings");
    let (st, text, err) = run_vrun(&["inspect", "--mappings", &img]);
    assert!(st.success(), "{err}");
    for want in ["[heap]", "[stack]", "[vdso]", "kernel's, not stored", "stored"] {
        assert!(text.contains(want), "inspect --mappings lacks {want:?}:\n{text}");
    }
    let (st, json, err) = run_vrun(&["inspect", "--json", &img]);
    assert!(st.success(), "{err}");
    for want in ["\"processes\"", "\"threads\"", "\"regions\"", "\"fds\"", "\"summaries\"", "\"files\"", "\"xcr0\""] {
        assert!(json.contains(want), "inspect --json lacks {want}");
    }
    // A directory means its newest complete image.
    let (st, text, _) = run_vrun(&["inspect", w.dir.to_str().unwrap()]);
    assert!(st.success() && text.contains(img.rsplit('/').next().unwrap()));
}

/// `vrun restore IMG` as job `name`, bounded in time (a restore that succeeds is ended).
fn try_restore(w: &Work, img: &std::path::Path, name: &str) -> Outcome {
    let mut c = vrun();
    c.args(["restore", "--name", name, "--dir"]).arg(&w.dir).arg(img);
    run_bounded(w, c, Some(name), Duration::from_secs(30))
}

fn try_inspect(w: &Work, img: &std::path::Path) -> Outcome {
    let mut c = vrun();
    c.arg("inspect").arg(img);
    run_bounded(w, c, None, Duration::from_secs(30))
}

/// A private file mapping the image marks shared, pages and all, pointed at a copy of the real file: the restore
/// refuses it, and the file keeps every byte (a restore used to open it read-write and write the pages into it).
#[test]
fn shared_mark_on_a_private_mapping_never_writes_its_file() {
    let w = Work::new("sharedmark");
    let (img, _) = good_image(&w);
    let good = Image::read(&img);
    let job = good.job();
    let sum = &good.summaries()[0];
    let p = &job.processes[0];
    // A private, writable file mapping with pages copied on write (a library's data).
    let i = (0..p.regions.len())
        .find(|&i| {
            let r = &p.regions[i];
            r.kind == RegionKind::File && !r.shared && r.prot & libc::PROT_WRITE as u32 != 0 && sum.regions[i].stored > 0
        })
        .expect("a private file mapping with stored pages");
    let orig = p.regions[i].file.as_ref().unwrap().path.clone();
    let victim = w.path("victim.so");
    fs::copy(&orig, &victim).unwrap();
    let before = fs::read(&victim).unwrap();
    for (tag, contents) in [("pages", Contents::Pages), ("file", Contents::File)] {
        let mut bad = good.clone();
        bad.edit_job(|j| {
            let r = &mut j.processes[0].regions[i];
            r.shared = true;
            r.contents = contents.clone();
            r.name = victim.display().to_string();
            r.file.as_mut().unwrap().path = victim.display().to_string();
        });
        let path = w.path(&format!("shared-{tag}.vimg"));
        bad.write(&path);
        let o = try_restore(&w, &path, &w.name("shared"));
        assert!(fs::read(&victim).unwrap() == before, "{tag}: the restore wrote into {}", victim.display());
        o.assert_refused(tag, &["contents", "page run", "shared file mapping"]);
    }
}

/// Images that decode but do not hold together: `inspect` and `restore` both refuse each with a message (exit
/// status 1, no panic, no crash of vos-restore), and the job's program never runs.
#[test]
fn malformed_images_are_refused_by_inspect_and_restore() {
    let w = Work::new("malformed");
    let (img, out) = good_image(&w);
    let good = Image::read(&img);
    let first_pages = good.all(Kind::Pages)[0];
    let mut cases: Vec<(&str, Image, &[&str])> = vec![];
    let mut b = good.clone();
    b.edit_job(|j| j.processes[0].fds[0].file = j.files.len() as u32 + 5);
    cases.push(("file index out of range", b, &["fds[0].file", "out of range"]));
    let mut b = good.clone();
    b.chunks.remove(first_pages);
    cases.push(("missing page chunk", b, &["missing or misplaced"]));
    let mut b = good.clone();
    let c = b.chunks.remove(first_pages);
    b.chunks.push(c);
    cases.push(("page chunk after its process's end", b, &["missing or misplaced"]));
    let mut b = good.clone();
    let c = b.chunks.remove(first_pages);
    b.chunks.insert(1, c);
    cases.push(("page chunk before the job", b, &["expected the job's metadata"]));
    let mut b = good.clone();
    b.chunks.push(image::Chunk { kind: Kind::End as u32, payload: vos::chunk::end_payload(b.chunks.len() as u64).to_vec() });
    cases.push(("a chunk after the end", b, &["follows its end marker"]));
    let mut b = good.clone();
    b.chunks[first_pages].payload = vec![1, 0];
    cases.push(("pages chunk of 2 bytes", b, &["bad run table"]));
    for (what, b, expect) in cases {
        let path = w.path(&format!("{}.vimg", what.replace(' ', "-")));
        b.write(&path);
        try_inspect(&w, &path).assert_refused(&format!("inspect: {what}"), expect);
        try_restore(&w, &path, &w.name("bad")).assert_refused(&format!("restore: {what}"), expect);
        refused(&w, &path, &out, expect);
    }
    // Data after the end of a stream: the image comes on stdin.
    let mut bytes = fs::read(&img).unwrap();
    bytes.extend_from_slice(b"trailing");
    for cmd in ["inspect", "restore"] {
        let mut c = vrun();
        let (r, wr) = std::io::pipe().unwrap();
        let feed = bytes.clone();
        std::thread::spawn(move || std::io::Write::write_all(&mut { wr }, &feed));
        c.arg(cmd).arg("-").stdin(r);
        if cmd == "restore" {
            c.args(["--name", &w.name("tail")]);
        }
        run_bounded(&w, c, None, Duration::from_secs(30)).assert_refused(&format!("{cmd} from a pipe"), &["follows its end marker"]);
    }
}

/// A FIFO path and a unix socket path of a crafted image pointing at files that are not the job's: a regular
/// file, a symlink, a socket another process listens on. The restore refuses, and each is as it was.
#[test]
fn fifo_and_socket_paths_leave_other_files_alone() {
    let w = Work::new("fifopath");
    let (img, _) = good_image(&w);
    let good = Image::read(&img);
    let victim = w.path("victim.txt");
    fs::write(&victim, b"precious\n").unwrap();
    let link = w.path("link");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let live = w.path("live.sock");
    let listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let s = |p: &std::path::Path| p.display().to_string();
    let with_fifo = |path: String| {
        let mut b = good.clone();
        b.edit_job(|j| {
            j.pipes.push(PipeImage { capacity: 65536, data: serde_bytes::ByteBuf::from(b"EVIL BYTES\n".to_vec()), fifo: Some(path) });
            let pipe = j.pipes.len() as u32 - 1;
            for (fd, write) in [(40, false), (41, true)] {
                j.files.push(OpenFile { flags: if write { libc::O_WRONLY } else { libc::O_RDONLY }, kind: FileKind::Pipe { pipe, write }, ..Default::default() });
                j.processes[0].fds.push(FdImage { fd, cloexec: false, file: j.files.len() as u32 - 1 });
            }
        });
        b
    };
    let with_socket = |path: String| {
        let mut b = good.clone();
        b.edit_job(|j| {
            j.sockets.push(SocketImage { kind: libc::SOCK_STREAM, local: SockAddr::Path(path), listening: true, ..Default::default() });
            j.files.push(OpenFile { flags: libc::O_RDWR, kind: FileKind::Socket { socket: j.sockets.len() as u32 - 1 }, ..Default::default() });
            j.processes[0].fds.push(FdImage { fd: 42, cloexec: false, file: j.files.len() as u32 - 1 });
        });
        b
    };
    let cases = [
        ("fifo at a regular file", with_fifo(s(&victim)), &["not a FIFO"][..]),
        ("fifo at a symlink", with_fifo(s(&link)), &["symbolic link"][..]),
        ("socket at a live socket", with_socket(s(&live)), &["binding a unix socket"][..]),
        ("socket at a symlink", with_socket(s(&link)), &["binding a unix socket"][..]),
        ("socket at a regular file", with_socket(s(&victim)), &["binding a unix socket"][..]),
    ];
    for (what, b, expect) in cases {
        let path = w.path(&format!("{}.vimg", what.replace(' ', "-")));
        b.write(&path);
        let o = try_restore(&w, &path, &w.name("paths"));
        assert_eq!(fs::read(&victim).unwrap(), b"precious\n", "{what}: the victim file changed");
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "{what}: the symlink is gone");
        assert!(std::os::unix::net::UnixStream::connect(&live).is_ok(), "{what}: the live socket is gone");
        o.assert_refused(what, expect);
    }
    drop(listener);
}
