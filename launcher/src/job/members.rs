//! The job's processes, as the supervisor sees them from outside: everything in the job's pid namespace but its
//! init, with the ids the namespace gives them.

use anyhow::{Context, Result};
use nix::unistd::Pid;
use std::collections::HashMap;
use vos::image::{Ids, ZombieImage};

/// One process of the job.
#[derive(Clone, Debug)]
pub struct Member {
    /// As this host numbers it.
    pub host: Pid,
    /// As the job's namespace numbers them (pgid/sid 0: outside the job).
    pub ids: Ids,
    pub comm: String,
    pub zombie: bool,
    /// Wait status of a zombie.
    pub exit_code: i32,
    /// Whether the vOS shim is mapped in it.
    pub has_shim: bool,
    /// Where /proc shows its memory, fds and files, and whose fds pidfd_getfd takes: its own pid, or one of its
    /// live threads when its main thread has exited (pthread_exit from main: /proc/PID then shows an empty zombie).
    pub task: Pid,
}

fn ns_of(pid: i32) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

/// Host pid -> namespace pid of every process in the job's namespace (init included, as 1).
fn ns_pids(init: Pid) -> Result<HashMap<i32, i32>> {
    let ns = ns_of(init.as_raw()).context("the job's init is gone")?;
    let mut map = HashMap::new();
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if ns_of(pid).as_ref() != Some(&ns) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { continue };
        if let Some(nspid) = field(&status, "NSpid").and_then(|v| v.split_whitespace().last()?.parse().ok()) {
            map.insert(pid, nspid);
        }
    }
    Ok(map)
}

fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':').map(str::trim))
}

/// Every process of the job (not its init), sorted by namespace pid.
pub fn members(init: Pid) -> Result<Vec<Member>> {
    let map = ns_pids(init)?;
    let mut out = Vec::new();
    for (&host, &ns) in &map {
        if ns == 1 {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{host}/status")) else { continue };
        let last = |k: &str| field(&status, k).and_then(|v| v.split_whitespace().last()?.parse::<i32>().ok()).unwrap_or(0);
        let ppid_host: i32 = field(&status, "PPid").and_then(|v| v.parse().ok()).unwrap_or(0);
        // A zombie main thread with others still running (pthread_exit from main) is a live process.
        let threads: i32 = field(&status, "Threads").and_then(|v| v.parse().ok()).unwrap_or(1);
        let zombie = field(&status, "State").is_some_and(|s| s.starts_with('Z')) && threads <= 1;
        let task = if field(&status, "State").is_some_and(|s| s.starts_with('Z')) && !zombie { live_thread(host).unwrap_or(host) } else { host };
        let stat = std::fs::read_to_string(format!("/proc/{host}/stat")).unwrap_or_default();
        let after = stat.rfind(')').map(|i| &stat[i + 2..]).unwrap_or("");
        // Field 52 (exit_code) is the 50th after the command name.
        let exit_code = after.split_whitespace().nth(49).and_then(|v| v.parse().ok()).unwrap_or(0);
        let maps = if zombie { String::new() } else { std::fs::read_to_string(format!("/proc/{task}/maps")).unwrap_or_default() };
        out.push(Member {
            host: Pid::from_raw(host),
            ids: Ids { pid: ns, ppid: map.get(&ppid_host).copied().unwrap_or(0), pgid: last("NSpgid"), sid: last("NSsid") },
            comm: field(&status, "Name").unwrap_or("").to_string(),
            zombie,
            exit_code,
            has_shim: maps.contains("libvos_shim.so"),
            task: Pid::from_raw(task),
        });
    }
    out.sort_by_key(|m| m.ids.pid);
    Ok(out)
}

/// A thread of process `host` in seccomp strict mode (`Seccomp: 1` in its status), by the id the job's namespace
/// gives it. Such a thread may only read, write, exit and return from a signal: the signal that parks it, or any
/// syscall of the shim's handler on it, would end it, and the image would miss it.
pub fn strict_seccomp_thread(host: Pid) -> Option<i32> {
    let tasks = std::fs::read_dir(format!("/proc/{host}/task")).ok()?;
    tasks.flatten().find_map(|t| {
        let status = std::fs::read_to_string(t.path().join("status")).ok()?;
        (field(&status, "Seccomp")? == "1").then(|| {
            let tid = t.file_name().to_str().and_then(|n| n.parse().ok()).unwrap_or(0);
            field(&status, "NSpid").and_then(|v| v.split_whitespace().last()?.parse().ok()).unwrap_or(tid)
        })
    })
}

/// A thread of process `host` that has not exited, if any.
fn live_thread(host: i32) -> Option<i32> {
    let tasks = std::fs::read_dir(format!("/proc/{host}/task")).ok()?;
    tasks.flatten().filter_map(|t| t.file_name().to_str()?.parse::<i32>().ok()).find(|&t| {
        let stat = std::fs::read_to_string(format!("/proc/{host}/task/{t}/stat")).unwrap_or_default();
        stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()).is_some_and(|s| s != "Z" && s != "X")
    })
}

/// Where /proc shows the memory and fds of job process `ns` (see `Member::task`).
pub fn task_of(members: &[Member], ns: i32) -> Option<Pid> {
    members.iter().find(|m| m.ids.pid == ns).map(|m| m.task)
}

pub fn zombie_image(m: &Member) -> ZombieImage {
    ZombieImage { ids: m.ids, comm: m.comm.clone(), status: m.exit_code }
}

/// Namespace pid -> host pid.
pub fn host_of(members: &[Member], ns: i32) -> Option<Pid> {
    members.iter().find(|m| m.ids.pid == ns).map(|m| m.host)
}

/// A path as process `host` (this host's pid) sees it, for the supervisor to open: through the process's root.
pub fn seen_by(host: i32, path: &str) -> String {
    format!("/proc/{host}/root{path}")
}

/// A /proc/PID link target (fd, cwd) as the process itself would read it. The kernel shows a path from the root
/// of the mount namespace the file is in; under a chroot the process's own root lies below that.
pub fn as_seen_by(host: i32, target: String) -> String {
    let root = std::fs::read_link(format!("/proc/{host}/root")).map(|r| r.display().to_string()).unwrap_or_default();
    match target.strip_prefix(root.as_str()) {
        Some(rest) if root != "/" && rest.starts_with('/') => rest.to_string(),
        _ => target,
    }
}

/// A process of the job ended (or was killed) in the middle of a checkpoint: the job is no longer the one being
/// captured, and the checkpoint is taken again.
#[derive(Debug)]
pub struct Gone(pub i32);

impl std::fmt::Display for Gone {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "pid {} went away during the checkpoint", self.0)
    }
}

impl std::error::Error for Gone {}
