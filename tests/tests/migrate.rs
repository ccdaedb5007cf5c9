//! Live migration between test hosts (network namespaces joined by a bridge, each with a `vrun serve`): jobs
//! move with their state, clients outside the job go on, and a failed or refused migration leaves the job
//! running where it was.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vos_tests::hosts::{Host, Net};
use vos_tests::*;

const PORT: u16 = 9000;

fn key(w: &Work, name: &str) -> PathBuf {
    vos_tests::hosts::keygen(&w.path(name))
}

fn udp_inc(ip: &str) -> i64 {
    let u = UdpSocket::bind("0.0.0.0:0").unwrap();
    u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    u.send_to(b"inc", (ip, PORT)).unwrap();
    let mut b = [0u8; 64];
    let n = u.recv(&mut b).unwrap();
    String::from_utf8_lossy(&b[..n]).trim().parse().unwrap()
}

/// Start `argv` under vrun on `host` as job `name`; its output goes to `out`.
fn launch_on(host: &Host, name: &str, argv: &[&str], out: &Path, w: &Work) -> Running {
    let mut c = host.vrun();
    c.args(["--name", name, "--dir"]).arg(&host.dir).arg("--").args(argv);
    spawn(c, name, out, &w.path("vrun.err"))
}

/// counter_server under vrun on `host`, listening on PORT, with `ballast` MiB of memory to move: the job and its
/// name.
fn counter_on(host: &Host, w: &Work, ballast: u32) -> (Running, String) {
    let prog = gcc("counter_server");
    let out = w.path("out.txt");
    let name = w.name("counter");
    let (port, ballast_arg) = (PORT.to_string(), ballast.to_string());
    let mut argv = vec![prog.to_str().unwrap(), &port];
    if ballast > 0 {
        argv.push(&ballast_arg);
    }
    let job = launch_on(host, &name, &argv, &out, w);
    let wait = Duration::from_secs(if ballast > 0 { 30 } else { 10 });
    wait_for(&out, "the server listening", wait, |s| s.contains("listening"));
    (job, name)
}

/// Hosts with a serve each, all holding `key`, letting jobs bring addresses of their subnet.
fn net(n: usize, w: &Work, key: &Path) -> Net {
    let mut net = Net::new(n, &w.dir);
    let subnet = net.subnet();
    for h in &mut net.hosts {
        h.serve_with(key, &["--allow-addr", &subnet]);
    }
    net
}

#[test]
fn counter_moves_a_b_c_a_and_clients_reconnect() {
    let w = Work::new("migrate-abca");
    let k = key(&w, "key");
    let net = net(3, &w, &k);
    let (mut job, mut name) = counter_on(&net.hosts[0], &w, 0);
    let mut at = 0;
    let mut c = LineClient::connect(&format!("{}:{PORT}", net.hosts[at].ip));
    let opts = c.ask("opt").unwrap();
    let mut expect = 1;
    for to in [1, 2, 0] {
        for _ in 0..3 {
            assert_eq!(c.inc(), expect);
            expect += 1;
        }
        assert_eq!(udp_inc(&net.hosts[at].ip), expect);
        expect += 1;
        name = net.hosts[at].migrate(&name, &net.hosts[to], &k, &[]).unwrap_or_else(|e| panic!("migrating {at} -> {to}: {e}"));
        if at == 0 {
            // The job left its first host: its vrun ends with "checkpointed and stopped".
            assert_eq!(job.wait(Duration::from_secs(20)).code(), Some(75));
        }
        // The connection to the old host is gone; the client reconnects to the new one and the counter goes on.
        assert!(c.ask("inc").is_err(), "the old host still answers");
        at = to;
        c = LineClient::connect(&format!("{}:{PORT}", net.hosts[at].ip));
        assert_eq!(c.ask("opt").unwrap(), opts, "options changed on the way");
        assert_eq!(c.inc(), expect, "the counter did not go on where it was after reaching host {at}");
        expect += 1;
    }
    assert!(net.hosts[0].serve_log().contains("runs here"), "host 0 never received the job back");
    drop(job);
}

#[test]
fn process_tree_with_pipes_moves_mid_run() {
    let w = Work::new("migrate-pingpong");
    let k = key(&w, "key");
    let net = net(2, &w, &k);
    let prog = gcc("pingpong");
    let out = w.path("out.txt");
    let name = w.name("pingpong");
    let steps = 400;
    let mut job = launch_on(&net.hosts[0], &name, &[prog.to_str().unwrap(), &steps.to_string()], &out, &w);
    wait_step(&out, 20);
    net.hosts[0].migrate(&name, &net.hosts[1], &k, &[]).expect("migrating");
    assert_eq!(job.wait(Duration::from_secs(20)).code(), Some(75));
    // Its stdout is a regular file, reopened at its offset on the destination (the hosts share this disk).
    let all = wait_for(&out, "the job to finish at the destination", Duration::from_secs(60), |s| s.ends_with("done\n"));
    assert_steps(&all, steps);
}

#[test]
fn a_wrong_key_is_refused_and_the_job_goes_on() {
    let w = Work::new("migrate-key");
    let k = key(&w, "key");
    let other = key(&w, "other-key");
    let net = net(2, &w, &k);
    let (job, name) = counter_on(&net.hosts[0], &w, 0);
    let mut c = LineClient::connect(&format!("{}:{PORT}", net.hosts[0].ip));
    assert_eq!(c.inc(), 1);
    let e = net.hosts[0].migrate(&name, &net.hosts[1], &other, &[]).expect_err("a wrong key was accepted");
    assert!(e.contains("does not hold the same key"), "{e}");
    // The client finds out first; the destination logs the refusal as the connection closes.
    let t = Instant::now();
    while !net.hosts[1].serve_log().contains("refused") {
        assert!(t.elapsed() < Duration::from_secs(10), "the destination did not log the refusal: {}", net.hosts[1].serve_log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!net.hosts[1].serve_log().contains("receiving"), "the destination took a job from a wrong key");
    // Untouched: the same connection goes on.
    assert_eq!(c.inc(), 2);
    drop(job);
}

#[test]
fn destination_killed_mid_transfer_leaves_the_job_running() {
    let w = Work::new("migrate-kill");
    let k = key(&w, "key");
    let mut net = net(2, &w, &k);
    // 768 MiB of memory to send: the transfer takes long enough to be cut.
    let (job, name) = counter_on(&net.hosts[0], &w, 768);
    let mut c = LineClient::connect(&format!("{}:{PORT}", net.hosts[0].ip));
    assert_eq!(c.inc(), 1);
    let sum = c.ask("sum").unwrap();
    let (src, dst) = net.hosts.split_at_mut(1);
    let mut m = src[0].vrun();
    m.args(["migrate", &name, "--to", &dst[0].serve_addr(), "--key"]).arg(&k);
    let m = m.stderr(std::process::Stdio::piped()).spawn().unwrap();
    let t = Instant::now();
    while !dst[0].serve_log().contains("receiving job") {
        assert!(t.elapsed() < Duration::from_secs(20), "the transfer did not start");
        std::thread::sleep(Duration::from_millis(2));
    }
    dst[0].kill_serve();
    let o = m.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the migration succeeded although its destination was killed: {err}");
    assert!(err.contains("goes on here"), "{err}");
    // The job goes on where it was, its memory and counter intact, on the same connection.
    assert_eq!(c.inc(), 2, "the job did not go on");
    assert_eq!(c.ask("sum").unwrap(), sum, "the job's memory changed");
    drop(job);
}

/// A counter holding 768 MiB (a transfer long enough to be cut) on host 0 is migrated to host 1 with `args`, and
/// `vrun migrate` is killed once host 1's serve log says `when`: the job goes on where it was, memory and
/// counter intact, on the same connection.
fn migrate_cut(w: &Work, args: &[&str], when: &str) -> (Net, Running, String) {
    let k = key(w, "key");
    let net = net(2, w, &k);
    let (job, name) = counter_on(&net.hosts[0], w, 768);
    let mut c = LineClient::connect(&format!("{}:{PORT}", net.hosts[0].ip));
    assert_eq!(c.inc(), 1);
    let sum = c.ask("sum").unwrap();
    let mut m = net.hosts[0].vrun();
    m.args(["migrate", &name, "--to", &net.hosts[1].serve_addr(), "--key"]).arg(&k).args(args);
    let mut m = m.spawn().unwrap();
    let t = Instant::now();
    while !net.hosts[1].serve_log().contains(when) {
        assert!(t.elapsed() < Duration::from_secs(20), "no {when:?} at the destination: {}", net.hosts[1].serve_log());
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(50));
    m.kill().unwrap();
    m.wait().unwrap();
    assert_eq!(c.inc(), 2, "the job did not go on");
    assert_eq!(c.ask("sum").unwrap(), sum, "the job's memory changed");
    (net, job, name)
}

#[test]
fn migrate_killed_mid_transfer_leaves_the_job_running() {
    // The job is stopped while its image streams; the migration dies in the middle of it. Nothing runs at the
    // destination (its restore refused the cut image).
    let w = Work::new("migrate-cut");
    let (net, job, name) = migrate_cut(&w, &["--stop-and-copy"], "receiving job");
    let t = Instant::now();
    while !net.hosts[1].serve_log().contains("went away") {
        assert!(t.elapsed() < Duration::from_secs(20), "the destination did not notice: {}", net.hosts[1].serve_log());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(job_pid(&format!("{name}-2")), 0, "a copy of the job runs at the destination");
    drop(job);
}

#[test]
fn tcp_established_connections_move_with_the_jobs_address() {
    let w = Work::new("migrate-established");
    let k = key(&w, "key");
    let net = net(3, &w, &k);
    let vip = net.spare_ip();
    vos_tests::hosts::must(&format!("ip -n {} addr add {vip}/24 dev eth0", net.hosts[0].ns));
    let (job, mut name) = counter_on(&net.hosts[0], &w, 0);
    let mut c = LineClient::connect(&format!("{}:{PORT}", vip));
    let mut expect = 1;
    let mut at = 0;
    for to in [1, 2, 0] {
        for _ in 0..3 {
            assert_eq!(c.inc(), expect);
            expect += 1;
        }
        // The last move is post-copy: the connection waits while the job runs there and pulls its memory.
        let addr = format!("{vip}/24");
        let mut args = vec!["--tcp-established", "--move-addr", &addr];
        if to == 0 {
            args.push("--lazy");
        }
        name = net.hosts[at].migrate(&name, &net.hosts[to], &k, &args).unwrap_or_else(|e| panic!("migrating {at} -> {to}: {e}"));
        at = to;
        // The very same connection goes on at the new host: no request lost or repeated.
        assert_eq!(c.inc(), expect, "the connection lost its place after moving to host {at}");
        expect += 1;
        assert_eq!(c.ask("opt").unwrap().split(' ').next_back(), Some("1"), "TCP_NODELAY was lost");
        let held = vos_tests::hosts::sh(&format!("ip -n {} -o addr show to {vip}/32", net.hosts[at].ns));
        assert!(!held.stdout.is_empty(), "host {at} does not hold the job's address");
    }
    drop(job);
}

/// A minimal Redis client: one command, one reply (simple strings, integers, bulk strings).
struct Redis {
    r: BufReader<TcpStream>,
}

impl Redis {
    fn connect(ip: &str, port: u16) -> Redis {
        let t = Instant::now();
        loop {
            if let Ok(s) = TcpStream::connect_timeout(&format!("{ip}:{port}").parse().unwrap(), Duration::from_secs(2)) {
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                return Redis { r: BufReader::new(s) };
            }
            assert!(t.elapsed() < Duration::from_secs(20), "redis does not answer at {ip}:{port}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    fn cmd(&mut self, args: &[&str]) -> std::io::Result<String> {
        let mut m = format!("*{}\r\n", args.len());
        for a in args {
            m += &format!("${}\r\n{a}\r\n", a.len());
        }
        self.r.get_mut().write_all(m.as_bytes())?;
        let mut l = String::new();
        if self.r.read_line(&mut l)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
        }
        let l = l.trim_end().to_string();
        match l.as_bytes().first() {
            Some(b'$') if l != "$-1" => {
                let mut v = String::new();
                self.r.read_line(&mut v)?;
                Ok(v.trim_end().to_string())
            }
            _ => Ok(l[1..].to_string()),
        }
    }
}

#[test]
fn redis_moves_with_its_data_and_clients() {
    let redis = ["/usr/bin/redis-server", "/usr/sbin/redis-server"].into_iter().find(|p| Path::new(p).exists());
    let redis = redis.expect("redis-server is missing: apt-get install redis-server (.ci/run installs it)");
    let w = Work::new("migrate-redis");
    let k = key(&w, "key");
    let net = net(3, &w, &k);
    let vip = net.spare_ip();
    vos_tests::hosts::must(&format!("ip -n {} addr add {vip}/24 dev eth0", net.hosts[0].ns));
    let out = w.path("out.txt");
    let mut name = w.name("redis");
    let port = "6390";
    let dir = w.s("");
    let argv = [redis, "--port", port, "--bind", "0.0.0.0", "--save", "", "--appendonly", "no", "--protected-mode", "no", "--dir", &dir];
    let job = launch_on(&net.hosts[0], &name, &argv, &out, &w);
    let mut c = Redis::connect(&vip, 6390);
    let mut n = 0;
    let mut numbered = |c: &mut Redis, count: usize| {
        for _ in 0..count {
            n += 1;
            assert_eq!(c.cmd(&["SET", &format!("key:{n}"), &n.to_string()]).unwrap(), "OK");
            assert_eq!(c.cmd(&["INCR", "requests"]).unwrap(), n.to_string(), "a request was lost or repeated");
        }
    };
    numbered(&mut c, 200);
    // By default the client's connection is reset at the move: it reconnects and finds everything.
    let addr = ["--move-addr", &format!("{vip}/24")];
    name = net.hosts[0].migrate(&name, &net.hosts[1], &k, &addr).unwrap_or_else(|e| panic!("migrating 0 -> 1: {e}"));
    assert!(c.cmd(&["PING"]).is_err(), "the connection survived without --tcp-established");
    c = Redis::connect(&vip, 6390);
    numbered(&mut c, 200);
    // With --tcp-established the very same connection goes on.
    let args = [&addr[..], &["--tcp-established"]].concat();
    net.hosts[1].migrate(&name, &net.hosts[2], &k, &args).unwrap_or_else(|e| panic!("migrating 1 -> 2: {e}"));
    numbered(&mut c, 200);
    for i in (1..=600).step_by(37) {
        assert_eq!(c.cmd(&["GET", &format!("key:{i}")]).unwrap(), i.to_string(), "key:{i} is lost");
    }
    assert_eq!(c.cmd(&["DBSIZE"]).unwrap(), "601");
    assert!(net.hosts[2].serve_log().contains("runs here"));
    drop(job);
}

#[test]
fn every_write_arrives_live_stopped_and_lazy() {
    let w = Work::new("migrate-precopy");
    let k = key(&w, "key");
    let net = net(2, &w, &k);
    let prog = gcc("bench_mem");
    let out = w.path("out.txt");
    let mut name = w.name("mem");
    // 96 MiB of data, 30 MB/s of it changing (each change also added to the checksum the program keeps).
    let job = launch_on(&net.hosts[0], &name, &[prog.to_str().unwrap(), "96", "30"], &out, &w);
    wait_for(&out, "the data filled", Duration::from_secs(30), |s| s.contains("ready"));
    let mut at = 0;
    for (to, args) in [(1, &[][..]), (0, &["--stop-and-copy"][..]), (1, &["--lazy"][..]), (0, &[][..])] {
        let v = net.hosts[at].migrate_report(&name, &net.hosts[to], &k, args).unwrap_or_else(|e| panic!("migrating {at} -> {to}: {e}"));
        name = v["name_there"].as_str().unwrap().to_string();
        let rounds: Vec<u64> = v["rounds"].as_array().unwrap().iter().map(|r| r.as_u64().unwrap()).collect();
        if args.is_empty() {
            // Memory went over while the job ran; the final, stopped round carried only what changed.
            assert!(rounds.len() >= 2, "no pre-copy rounds: {rounds:?}");
            assert!(*rounds.last().unwrap() * 4 < rounds[0], "the final round was not small: {rounds:?}");
        } else if args == ["--lazy"] {
            // The image went while the job was stopped, its memory once it ran there, pulled.
            assert_eq!(rounds.len(), 2, "post-copy: {rounds:?}");
            assert!(rounds[0] * 4 < rounds[1] && rounds[1] >= 90 << 20, "the image carried the memory: {rounds:?}");
        } else {
            assert_eq!(rounds.len(), 1, "--stop-and-copy made rounds: {rounds:?}");
        }
        at = to;
        // Every change made while memory was on its way is there: the data matches the running checksum.
        let before = std::fs::read_to_string(&out).unwrap().lines().count();
        let t = Instant::now();
        while job_pid(&name) == 0 {
            assert!(t.elapsed() < Duration::from_secs(20), "{name} is not registered at host {at}");
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(job_pid(&name), libc::SIGUSR2) };
        let text = wait_for(&out, "the data verified", Duration::from_secs(30), |s| s.lines().skip(before).any(|l| l.starts_with("verified") || l.starts_with("CORRUPT")));
        assert!(!text.lines().skip(before).any(|l| l.starts_with("CORRUPT")), "memory differs after moving to host {at}");
    }
    drop(job);
}

#[test]
fn lazy_fills_memory_the_job_forks_moves_and_zaps_meanwhile() {
    let w = Work::new("migrate-lazy");
    let k = key(&w, "key");
    let net = net(2, &w, &k);
    let prog = gcc("postcopy");
    let out = w.path("out.txt");
    let name = w.name("postcopy");
    // 256 MiB to pull; a step every 20 ms forks a child that checks every page, moves a block and zaps pages.
    let steps = 120;
    let mut job = launch_on(&net.hosts[0], &name, &[prog.to_str().unwrap(), "256", &steps.to_string()], &out, &w);
    wait_step(&out, 5);
    let v = net.hosts[0].migrate_report(&name, &net.hosts[1], &k, &["--lazy"]).expect("migrating");
    let rounds: Vec<u64> = v["rounds"].as_array().unwrap().iter().map(|r| r.as_u64().unwrap()).collect();
    assert!(rounds.len() == 2 && rounds[0] < 1 << 20 && rounds[1] >= 256 << 20, "not a post-copy: {rounds:?}");
    assert_eq!(job.wait(Duration::from_secs(20)).code(), Some(75));
    // Every step once, in order, and every check (in the children forked while pages were missing, and in the
    // end in the process itself) found its memory right.
    let all = wait_for(&out, "the job to finish at the destination", Duration::from_secs(120), |s| s.ends_with("done\n") || s.contains("CORRUPT"));
    assert_steps(&all.replacen("ready\n", "", 1), steps);
}

#[test]
fn lazy_migration_cut_after_the_job_ran_there_leaves_it_here() {
    // Cut while the destination's copy runs and still pulls its memory: that copy, missing memory, ends.
    let w = Work::new("migrate-lazycut");
    let (net, job, name) = migrate_cut(&w, &["--lazy"], "runs here");
    let t = Instant::now();
    while job_pid(&format!("{name}-2")) != 0 {
        assert!(t.elapsed() < Duration::from_secs(20), "the destination's copy, missing memory, still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(net.hosts[1].serve_log().contains("failed, ending it"), "{}", net.hosts[1].serve_log());
    drop(job);
}
