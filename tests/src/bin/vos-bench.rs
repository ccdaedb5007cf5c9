//! vos-bench: what vOS costs on this machine, as ratios to baselines measured in the same run.
//!
//!   cargo build --release && cargo run --release -p vos-tests --bin vos-bench [-- --sizes 256,1024 --dir DIR]
//!
//! - checkpoint and restore of a C program holding N MiB of random data plus N MiB mapped but never touched,
//!   against writing the same bytes from memory to the same directory (with fsync, as a checkpoint does) and
//!   reading them back into fresh memory;
//! - the app's own longest pause during a checkpoint that lets it go on;
//! - the image and checkpoint time of a trivial program;
//! - the per-call cost of open+close, clock_gettime, malloc+free and write under the shim vs natively;
//! - `vrun migrate` of N MiB between two test hosts (network namespaces), idle and while the job rewrites
//!   10 MB/s, against sending the same bytes over TCP into fresh memory (`--migrate-only` runs just this);
//! - `--signed-only`: checkpoint and restore of N MiB with signed images (`--image-key`) against unsigned ones,
//!   measured alternately in the same run.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vos_tests::*;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn wait_line(path: &Path, prefix: &str, after: usize) -> (String, usize) {
    let start = Instant::now();
    loop {
        let s = fs::read_to_string(path).unwrap_or_default();
        if let Some(l) = s.lines().skip(after).find(|l| l.starts_with(prefix)) {
            return (l.to_string(), s.lines().count());
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no {prefix:?} in {}", path.display());
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn lines(path: &Path) -> usize {
    fs::read_to_string(path).unwrap_or_default().lines().count()
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(pid, sig) };
}

/// Time to write `mib` MiB from memory to a new file in `dir` and fsync it, and to read it back into fresh memory.
fn baselines(dir: &Path, mib: usize) -> (f64, f64) {
    let mut buf = vec![0u8; mib << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    let p = dir.join("baseline.bin");
    let (mut w, mut r) = (vec![], vec![]);
    for _ in 0..3 {
        let _ = fs::remove_file(&p);
        let t = Instant::now();
        let mut f = fs::File::create(&p).unwrap();
        f.write_all(&buf).unwrap();
        f.sync_all().unwrap();
        drop(f);
        w.push(t.elapsed().as_secs_f64());
        r.push(read_back(&p, mib << 20));
    }
    let _ = fs::remove_file(&p);
    (median(w), median(r))
}

/// Read a file into fresh anonymous memory the fastest plain way: populate the memory 1 MiB at a time
/// (MADV_POPULATE_WRITE), then read into it (reading straight into unpopulated memory is several times
/// slower on this VM).
fn read_back(p: &Path, len: usize) -> f64 {
    let t = Instant::now();
    // SAFETY: a fresh private anonymous mapping, unmapped below.
    let mem = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) } as *mut u8;
    let mut f = fs::File::open(p).unwrap();
    let chunk = 1 << 20;
    let mut off = 0;
    while off < len {
        let n = chunk.min(len - off);
        // SAFETY: within the mapping.
        unsafe { libc::madvise(mem.add(off) as *mut libc::c_void, n, 23 /* MADV_POPULATE_WRITE */) };
        // SAFETY: within the mapping, which is writable.
        f.read_exact(unsafe { std::slice::from_raw_parts_mut(mem.add(off), n) }).unwrap();
        off += n;
    }
    let e = t.elapsed().as_secs_f64();
    // SAFETY: our mapping.
    unsafe { libc::munmap(mem as *mut libc::c_void, len) };
    e
}

/// Guest memory this VM never touched is slow to touch the first time (the host backs it lazily), which makes
/// every measurement of fresh memory noisy. Touch and free a few GiB first.
fn warm_up(gib: usize) {
    let len = gib << 30;
    // SAFETY: a fresh private anonymous mapping, unmapped below.
    let m = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
    // SAFETY: within the mapping.
    unsafe {
        libc::memset(m, 1, len);
        libc::munmap(m, len);
    }
}

struct MemResult {
    mib: usize,
    write: f64,
    read: f64,
    ckpt: f64,
    pause_ms: f64,
    kill_ckpt: f64,
    restore_run: f64,
    restore_all: f64,
    image: u64,
}

fn registered(name: &str) -> bool {
    registered_pid(Path::new("/run/vos"), name) > 0
}

/// `vrun [SUBCOMMAND] [--image-key KEY]`.
fn vrun_keyed(sub: Option<&str>, key: Option<&Path>) -> std::process::Command {
    let mut c = vrun();
    c.args(sub);
    if let Some(k) = key {
        c.arg("--image-key").arg(k);
    }
    c
}

/// With `key`, the job's images are signed with it and restored only once checked against it.
fn bench_mem(dir: &Path, mib: usize, key: Option<&Path>) -> MemResult {
    let (write, read) = if key.is_none() { baselines(dir, mib) } else { (0.0, 0.0) };
    let prog = gcc("bench_mem");
    let w = Work { dir: dir.join(format!("mem{mib}")) };
    let _ = fs::remove_dir_all(&w.dir);
    fs::create_dir_all(&w.dir).unwrap();
    let (mut ckpt, mut pause, mut kill_ckpt, mut run, mut all, mut image) = (vec![], vec![], vec![], vec![], vec![], 0);
    let out = w.path("out.txt");
    let name = w.name("bench");
    let mut c = vrun_keyed(None, key);
    c.args(["--name", &name, "--dir"]).arg(&w.dir).arg("--").args([prog.to_str().unwrap(), &mib.to_string()]);
    let mut job = spawn(c, &name, &out, &w.path("vrun.err"));
    wait_line(&out, "ready", 0);
    for _ in 0..3 {
        let n = lines(&out);
        signal(job.pid(), libc::SIGUSR1);
        wait_line(&out, "gap", n);
        let t = Instant::now();
        let img = job.checkpoint(false);
        ckpt.push(t.elapsed().as_secs_f64());
        image = fs::metadata(&img).unwrap().len();
        let n = lines(&out);
        signal(job.pid(), libc::SIGUSR1);
        let (g, _) = wait_line(&out, "gap", n);
        pause.push(g[4..].parse::<f64>().unwrap() / 1000.0);
        let _ = fs::remove_file(&img);
    }
    for _ in 0..3 {
        let t = Instant::now();
        let img = job.checkpoint(true);
        kill_ckpt.push(t.elapsed().as_secs_f64());
        job.wait(Duration::from_secs(60));
        let t = Instant::now();
        let mut c = vrun_keyed(Some("restore"), key);
        c.args(["--name", &name, "--dir"]).arg(&w.dir).arg(&img);
        job = spawn(c, &name, &w.path("restore.out"), &w.path("vrun.err"));
        while !registered(&name) {
            assert!(t.elapsed() < Duration::from_secs(120), "the restore did not start: see {}", w.path("vrun.err").display());
            std::thread::sleep(Duration::from_micros(500));
        }
        let r = t.elapsed().as_secs_f64();
        run.push(r);
        let n = lines(&out);
        signal(job.pid(), libc::SIGUSR2);
        let (v, _) = wait_line(&out, "verified", n);
        all.push(r + v[9..].parse::<f64>().unwrap() / 1000.0);
        let _ = fs::remove_file(&img);
    }
    drop(job);
    let _ = fs::remove_dir_all(&w.dir);
    MemResult {
        mib,
        write,
        read,
        ckpt: median(ckpt),
        pause_ms: median(pause),
        kill_ckpt: median(kill_ckpt),
        restore_run: median(run),
        restore_all: median(all),
        image,
    }
}

/// Seconds to send `mib` MiB over loopback TCP into fresh memory: what any migration must at least pay here.
fn tcp_baseline(mib: usize) -> f64 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = Instant::now();
    let recv = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf: Vec<u8> = Vec::with_capacity(mib << 20);
        s.read_to_end(&mut buf).unwrap();
        buf.len()
    });
    let chunk = vec![0x5au8; 1 << 20];
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    for _ in 0..mib {
        s.write_all(&chunk).unwrap();
    }
    drop(s);
    assert_eq!(recv.join().unwrap(), mib << 20);
    t.elapsed().as_secs_f64()
}

struct Migration {
    total: f64,
    downtime: f64,
    stall: f64,
    bytes: u64,
}

/// Migrate a job holding `mib` MiB (rewriting `dirty` MB/s of it) from one test host to another and back.
fn bench_migrate(dir: &Path, mib: usize, dirty: u32, args: &[&str]) -> Vec<Migration> {
    use vos_tests::hosts::Net;
    let w = Work { dir: dir.join(format!("migrate{mib}")) };
    let _ = fs::remove_dir_all(&w.dir);
    fs::create_dir_all(&w.dir).unwrap();
    let key = vos_tests::hosts::keygen(&w.path("key"));
    let mut net = Net::new(2, &w.dir);
    for h in &mut net.hosts {
        h.serve(&key);
    }
    let prog = gcc("bench_mem");
    let out = w.path("out.txt");
    let mut name = w.name("bench");
    let mut c = net.hosts[0].vrun();
    c.args(["--name", &name, "--dir"]).arg(&net.hosts[0].dir).arg("--").args([prog.to_str().unwrap(), &mib.to_string(), &dirty.to_string()]);
    let job = spawn(c, &name, &out, &w.path("vrun.err"));
    wait_line(&out, "ready", 0);
    let mut results = vec![];
    for (from, to) in [(0, 1), (1, 0), (0, 1)] {
        let pid = job_pid(&name);
        let n = lines(&out);
        signal(pid, libc::SIGUSR1);
        wait_line(&out, "gap", n);
        let v = net.hosts[from].migrate_report(&name, &net.hosts[to], &key, args).unwrap_or_else(|e| panic!("migrate: {e}"));
        name = v["name_there"].as_str().unwrap().to_string();
        while !registered(&name) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let pid = job_pid(&name);
        let n = lines(&out);
        signal(pid, libc::SIGUSR1);
        let (g, _) = wait_line(&out, "gap", n);
        results.push(Migration {
            total: v["total_ms"].as_f64().unwrap() / 1e3,
            downtime: v["downtime_ms"].as_f64().unwrap() / 1e3,
            stall: g[4..].parse::<f64>().unwrap() / 1e6,
            bytes: v["bytes"].as_u64().unwrap(),
        });
    }
    drop(job);
    drop(net);
    let _ = fs::remove_dir_all(&w.dir);
    results
}

fn print_migrations(mib: usize) {
    let base = median((0..3).map(|_| tcp_baseline(mib)).collect());
    println!("migration: vrun migrate of N MiB random data between two test hosts, 3 moves (A->B, B->A, A->B)");
    println!("  baseline: {mib} MiB over TCP into fresh memory: {base:.3}s");
    println!("  CRIU page server, 1 GiB, measured earlier on this machine (notes): 1.2-1.35 s; no pre-copy possible here");
    println!("{:>6} {:>6} {:>8} {:>10} {:>9} {:>12} {:>12} {:>10}", "mode", "MiB", "dirty", "total", "ratio", "downtime", "app stall", "sent MiB");
    for (mode, args) in [("live", &[][..]), ("lazy", &["--lazy"][..])] {
    for dirty in [0, 10] {
        for m in bench_migrate(&repo().join("target/vos-bench"), mib, dirty, args) {
            println!(
                "{:>6} {:>6} {:>6}MB/s {:>9.3}s {:>8.2}x {:>10.1}ms {:>10.1}ms {:>10.1}",
                mode,
                mib,
                dirty,
                m.total,
                m.total / base,
                m.downtime * 1e3,
                m.stall * 1e3,
                m.bytes as f64 / (1 << 20) as f64
            );
        }
    }
    }
    println!("  (live: pre-copy rounds while the job runs, then a stop for what changed; the destination fills the");
    println!("   pre-copied memory after the job resumes. lazy: post-copy, the job stops for its image only and pulls");
    println!("   its memory once it runs there. total = first byte until the source may let go (live: the job runs");
    println!("   there; lazy: all its memory arrived); downtime as vrun migrate sees it; app stall = the job's own");
    println!("   longest pause on the real-time clock, which with lazy includes waiting for pages it touches)");
}

fn bench_trivial(dir: &Path) -> (f64, u64) {
    let prog = gcc("trivial");
    let w = Work { dir: dir.join("trivial") };
    let _ = fs::remove_dir_all(&w.dir);
    fs::create_dir_all(&w.dir).unwrap();
    let out = w.path("out.txt");
    let name = w.name("trivial");
    let job = launch(&w, &name, &[prog.to_str().unwrap()], &out);
    wait_line(&out, "ready", 0);
    let (mut t, mut size) = (vec![], 0);
    for _ in 0..5 {
        let s = Instant::now();
        let img = job.checkpoint(false);
        t.push(s.elapsed().as_secs_f64());
        size = fs::metadata(&img).unwrap().len();
    }
    // The supervisor's own view (without starting the `vrun checkpoint` client): from the log of the job.
    drop(job);
    let _ = fs::remove_dir_all(&w.dir);
    (median(t), size)
}

/// Best per-call times of `rounds` alternating runs, natively and under vrun (this VM is noisy: interleaving
/// and taking the best of many rounds keeps drift out of the ratio).
/// A job of `procs` processes holding `mib` MiB each: checkpoint (it goes on), checkpoint --kill, and restore
/// until it runs again; medians of 3.
fn bench_tree(dir: &Path, procs: usize, mib: usize) -> (f64, f64, f64, u64) {
    let prog = gcc("bench_tree");
    let w = Work { dir: dir.join("tree") };
    let _ = fs::remove_dir_all(&w.dir);
    fs::create_dir_all(&w.dir).unwrap();
    let out = w.path("out.txt");
    let name = w.name("tree");
    let mut job = launch(&w, &name, &[prog.to_str().unwrap(), &procs.to_string(), &mib.to_string()], &out);
    wait_line(&out, "ready", 0);
    let (mut ck, mut kill, mut rs, mut size) = (vec![], vec![], vec![], 0);
    for _ in 0..3 {
        let t = Instant::now();
        let img = job.checkpoint(false);
        ck.push(t.elapsed().as_secs_f64());
        let _ = fs::remove_file(img);
        let t = Instant::now();
        let img = job.checkpoint(true);
        kill.push(t.elapsed().as_secs_f64());
        size = fs::metadata(&img).unwrap().len();
        job.wait(Duration::from_secs(60));
        let t = Instant::now();
        job = restore(&w, &name, &img, &w.path("restore.out"));
        while !registered(&name) {
            std::thread::sleep(Duration::from_micros(500));
        }
        rs.push(t.elapsed().as_secs_f64());
        let _ = fs::remove_file(&img);
    }
    drop(job);
    let _ = fs::remove_dir_all(&w.dir);
    (median(ck), median(kill), median(rs), size)
}

fn overhead(dir: &Path, rounds: usize) -> Vec<(String, f64, f64)> {
    let mut best: Vec<(String, f64, f64)> = vec![];
    for _ in 0..rounds {
        for (under, v) in [(false, overhead_run(false, dir)), (true, overhead_run(true, dir))] {
            for (n, x) in v {
                match best.iter_mut().find(|b| b.0 == n) {
                    Some(b) if under => b.2 = b.2.min(x),
                    Some(b) => b.1 = b.1.min(x),
                    None if under => best.push((n, f64::MAX, x)),
                    None => best.push((n, x, f64::MAX)),
                }
            }
        }
    }
    best
}

fn overhead_run(under_vrun: bool, dir: &Path) -> Vec<(String, f64)> {
    let prog = gcc("bench_overhead");
    let text = if under_vrun {
        let w = Work { dir: dir.join("overhead") };
        let _ = fs::remove_dir_all(&w.dir);
        fs::create_dir_all(&w.dir).unwrap();
        let out = w.path("out.txt");
        let mut job = launch(&w, &w.name("ovh"), &[prog.to_str().unwrap(), "5"], &out);
        assert!(job.wait(Duration::from_secs(300)).success());
        let s = fs::read_to_string(&out).unwrap();
        let _ = fs::remove_dir_all(&w.dir);
        s
    } else {
        String::from_utf8(std::process::Command::new(&prog).arg("5").output().unwrap().stdout).unwrap()
    };
    text.lines()
        .filter_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            Some((n.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |k: &str| args.iter().position(|a| a == k).and_then(|i| args.get(i + 1)).cloned();
    let sizes: Vec<usize> = opt("--sizes").unwrap_or("256,1024".into()).split(',').map(|s| s.parse().unwrap()).collect();
    let dir = PathBuf::from(opt("--dir").unwrap_or_else(|| repo().join("target/vos-bench").display().to_string()));
    fs::create_dir_all(&dir).unwrap();
    if args.iter().any(|a| a == "--migrate-only") {
        print_migrations(*sizes.last().unwrap());
        return;
    }
    if args.iter().any(|a| a == "--signed-only") {
        print_signed(&dir, &sizes);
        return;
    }
    warm_up(6);
    println!("vos-bench on {} (images and baselines in {})", std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim(), dir.display());
    println!();
    println!("memory: N MiB random + N MiB untouched; medians of 3; ratio = vOS / baseline of the same bytes");
    println!("{:>6} {:>10} {:>10} {:>10} {:>9} {:>11} {:>12} {:>12} {:>10} {:>10}", "MiB", "write+sync", "ckpt", "ckpt+kill", "ratio", "app pause", "read back", "restore", "ratio", "image MiB");
    for &mib in &sizes {
        let r = bench_mem(&dir, mib, None);
        println!(
            "{:>6} {:>9.3}s {:>9.3}s {:>9.3}s {:>8.2}x {:>9.1}ms {:>11.3}s {:>11.3}s {:>9.2}x {:>10.1}",
            r.mib, r.write, r.ckpt, r.kill_ckpt, r.kill_ckpt / r.write, r.pause_ms, r.read, r.restore_run, r.restore_run / r.read,
            r.image as f64 / (1 << 20) as f64
        );
        println!("       (restore is eager: when the job runs again all its memory is back; the job then read all of it in {:.3}s)", r.restore_all - r.restore_run);
    }
    let (ck, kill, rs, size) = bench_tree(&dir, 8, 16);
    println!();
    println!(
        "job of 8 processes (16 MiB each): checkpoint {:.1} ms, checkpoint+kill {:.1} ms, restore until running {:.1} ms, image {:.1} MiB",
        ck * 1000.0,
        kill * 1000.0,
        rs * 1000.0,
        size as f64 / (1 << 20) as f64
    );
    let (t, size) = bench_trivial(&dir);
    println!();
    println!("trivial C program: checkpoint {:.1} ms (vrun checkpoint, end to end), image {:.2} MiB", t * 1000.0, size as f64 / (1 << 20) as f64);
    println!();
    print_migrations(*sizes.last().unwrap());
    println!();
    println!("shim overhead (ns per call, best of 3 alternating runs of 5 rounds each)");
    println!("{:<16} {:>10} {:>10} {:>8}", "call", "native", "vrun", "ratio");
    for (n, a, b) in overhead(&dir, 3) {
        println!("{n:<16} {a:>10.1} {b:>10.1} {:>7.2}x", b / a);
    }
}

/// Signed images against unsigned ones: each size measured unsigned, signed, unsigned, signed (medians of 3 each
/// time), so both see the same machine.
fn print_signed(dir: &Path, sizes: &[usize]) {
    warm_up(6);
    let key = dir.join("bench.key");
    let mut b = [0u8; 32];
    fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).unwrap();
    fs::write(&key, b).unwrap();
    fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    println!("signed images (--image-key) against unsigned: N MiB random + N MiB untouched; medians of 3, two rounds");
    println!("{:>6} {:>8} {:>10} {:>10} {:>12} {:>12}", "MiB", "", "ckpt", "ckpt+kill", "restore", "restore all");
    for &mib in sizes {
        let mut rows: Vec<(&str, MemResult)> = vec![];
        for _ in 0..2 {
            rows.push(("plain", bench_mem(dir, mib, None)));
            rows.push(("signed", bench_mem(dir, mib, Some(&key))));
        }
        for (what, r) in &rows {
            println!("{:>6} {:>8} {:>9.3}s {:>9.3}s {:>11.3}s {:>11.3}s", r.mib, what, r.ckpt, r.kill_ckpt, r.restore_run, r.restore_all);
        }
        let med = |f: &dyn Fn(&MemResult) -> f64, w: &str| median(rows.iter().filter(|r| r.0 == w).map(|r| f(&r.1)).collect());
        let ratio = |f: &dyn Fn(&MemResult) -> f64| med(f, "signed") / med(f, "plain");
        println!(
            "{:>6} {:>8} {:>9.2}x {:>9.2}x {:>11.2}x {:>11.2}x",
            mib,
            "ratio",
            ratio(&|r| r.ckpt),
            ratio(&|r| r.kill_ckpt),
            ratio(&|r| r.restore_run),
            ratio(&|r| r.restore_all)
        );
    }
    let _ = fs::remove_file(&key);
}
