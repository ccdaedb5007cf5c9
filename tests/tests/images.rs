//! Images: a truncated, corrupt or foreign image is refused with a clear message, and nothing of the job runs.

use std::fs;
use std::time::Duration;
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
