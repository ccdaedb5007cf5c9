//! Test hosts for migration: network namespaces joined by a bridge, each with its own address, hostname and
//! `vrun serve`. The test itself (the "outside" client) lives in the root namespace, at the bridge's address.

use crate::{bin_dir, command};
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The port every host's `vrun serve` listens on.
pub const SERVE_PORT: u16 = 7070;

static NETS: AtomicU32 = AtomicU32::new(0);

pub fn sh(cmd: &str) -> Output {
    Command::new("sh").args(["-c", cmd]).output().expect("sh")
}

pub fn must(cmd: &str) {
    let o = sh(cmd);
    assert!(o.status.success(), "{cmd}: {}", String::from_utf8_lossy(&o.stderr));
}

pub struct Host {
    pub ns: String,
    pub ip: String,
    pub dir: PathBuf,
    /// Its link's end on the bridge, in the root namespace: everything it sends or receives passes there.
    pub link: String,
    serve: Option<Child>,
}

/// A new key file made by `vrun keygen` (32 random bytes, mode 0600).
pub fn keygen(path: &std::path::Path) -> PathBuf {
    let o = command(bin_dir().join("vrun")).arg("keygen").arg(path).output().expect("vrun keygen");
    assert!(o.status.success(), "vrun keygen {}: {}", path.display(), String::from_utf8_lossy(&o.stderr));
    path.to_path_buf()
}

impl Host {
    /// `HOST:PORT` of its `vrun serve`.
    pub fn serve_addr(&self) -> String {
        format!("{}:{SERVE_PORT}", self.ip)
    }

    /// A command run inside this host.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = command("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// `vrun ARGS...` run on this host.
    pub fn vrun(&self) -> Command {
        self.cmd(bin_dir().join("vrun"))
    }

    /// Start this host's `vrun serve` with `key`, and wait until it answers.
    pub fn serve(&mut self, key: &std::path::Path) {
        self.serve_with(key, &[]);
    }

    /// The same, with more arguments (`--allow-addr`, ...).
    pub fn serve_with(&mut self, key: &std::path::Path, args: &[&str]) {
        let log = std::fs::File::create(self.dir.join("serve.log")).unwrap();
        let mut c = self.vrun();
        c.args(["serve", "--listen", &self.serve_addr(), "--key"]).arg(key).arg("--dir").arg(&self.dir).args(args);
        c.stdout(log.try_clone().unwrap()).stderr(log);
        self.serve = Some(c.spawn().unwrap());
        let t = Instant::now();
        while !std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default().contains("listening") {
            assert!(t.elapsed() < Duration::from_secs(10), "vrun serve on {} did not start", self.ns);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pid of its `vrun serve` (`ip netns exec` becomes it).
    pub fn serve_pid(&self) -> Option<u32> {
        self.serve.as_ref().map(|c| c.id())
    }

    /// Kill this host's `vrun serve` (its jobs go on).
    pub fn kill_serve(&mut self) {
        if let Some(mut c) = self.serve.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn serve_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }

    /// What a job received here printed (its stdout and stderr), without vrun's own lines.
    pub fn job_output(&self, name: &str) -> String {
        let s = std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        s.lines().filter(|l| !l.starts_with("vrun")).map(|l| format!("{l}\n")).collect()
    }

    /// `vrun migrate JOB --to TO --key KEY ARGS... --json` run on this host: the job's name there, or why not.
    pub fn migrate(&self, job: &str, to: &Host, key: &std::path::Path, args: &[&str]) -> Result<String, String> {
        self.migrate_report(job, to, key, args).map(|v| v["name_there"].as_str().unwrap().to_string())
    }

    /// The same, with the whole summary (`name_there`, `rounds`, `bytes`, `total_ms`, `downtime_ms`).
    pub fn migrate_report(&self, job: &str, to: &Host, key: &std::path::Path, args: &[&str]) -> Result<serde_json::Value, String> {
        let mut c = self.vrun();
        c.args(["migrate", job, "--to", &to.serve_addr(), "--json", "--key"]).arg(key).args(args);
        let o = c.output().unwrap();
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).into_owned());
        }
        let out = String::from_utf8_lossy(&o.stdout);
        Ok(serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("migrate --json printed {out:?}: {e}")))
    }
}

/// Hosts joined by a bridge in the root namespace (which holds .1, the test's own address).
pub struct Net {
    pub bridge: String,
    pub hosts: Vec<Host>,
    pub gateway: String,
}

impl Net {
    pub fn new(n: usize, dir: &std::path::Path) -> Net {
        let id = (std::process::id() * 7 + NETS.fetch_add(1, Ordering::Relaxed)) % 200 + 20;
        let bridge = format!("vosbr{id}");
        let gateway = format!("10.231.{id}.1");
        let _ = sh(&format!("ip link del {bridge} 2>/dev/null"));
        must(&format!("ip link add {bridge} type bridge && ip addr add {gateway}/24 dev {bridge} && ip link set {bridge} up"));
        let mut hosts = vec![];
        for i in 0..n {
            let ns = format!("vos{id}h{i}");
            let ip = format!("10.231.{id}.{}", i + 2);
            let (a, b) = (format!("vos{id}h{i}a"), format!("vos{id}h{i}b"));
            // Leftovers of an earlier run that was killed.
            let _ = sh(&format!("ip netns del {ns} 2>/dev/null; ip link del {a} 2>/dev/null"));
            must(&format!(
                "ip netns add {ns} && ip link add {a} type veth peer name {b} && ip link set {a} master {bridge} up && \
                 ip link set {b} netns {ns} && ip -n {ns} link set {b} name eth0 && ip -n {ns} addr add {ip}/24 dev eth0 && \
                 ip -n {ns} link set eth0 up && ip -n {ns} link set lo up && ip -n {ns} route add default via {gateway}"
            ));
            let hdir = dir.join(format!("host{i}"));
            std::fs::create_dir_all(&hdir).unwrap();
            hosts.push(Host { ns, ip, dir: hdir, link: a, serve: None });
        }
        Net { bridge, hosts, gateway }
    }
}

impl Net {
    /// An address on the hosts' subnet that no host holds: a job's own address.
    pub fn spare_ip(&self) -> String {
        format!("{}.100", self.gateway.rsplit_once('.').unwrap().0)
    }

    /// The hosts' subnet, NET/24 (for `serve --allow-addr`).
    pub fn subnet(&self) -> String {
        format!("{}.0/24", self.gateway.rsplit_once('.').unwrap().0)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            h.kill_serve();
            // Whatever still runs in the host (jobs and their supervisors) ends with it.
            let _ = sh(&format!("ip netns pids {} | xargs -r kill -9", h.ns));
            let _ = sh(&format!("ip netns del {}", h.ns));
        }
        let _ = sh(&format!("ip link del {}", self.bridge));
    }
}
