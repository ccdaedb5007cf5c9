//! The job registry: one JSON file per running job in the runtime directory (`vrun list`, `vrun checkpoint
//! NAME`), plus each job's log file. Entries of supervisors that are gone are removed when seen.

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Entry {
    pub name: String,
    /// The `vrun` process supervising the job.
    pub supervisor: i32,
    /// The job's main process, as this host numbers it.
    pub pid: i32,
    /// The job's init (pid 1 of its namespace), as this host numbers it.
    #[serde(default)]
    pub init: i32,
    pub program: Vec<String>,
    pub since_unix: u64,
    /// Abstract socket name of the supervisor.
    pub sock: String,
    /// Where images go by default.
    pub dir: String,
}

/// /run/vos for root, $XDG_RUNTIME_DIR/vos or /tmp/vos-UID otherwise; created 0700.
pub fn dir() -> PathBuf {
    let uid = nix::unistd::getuid();
    let d = if uid.is_root() {
        PathBuf::from("/run/vos")
    } else if let Ok(x) = std::env::var("XDG_RUNTIME_DIR") {
        PathBuf::from(x).join("vos")
    } else {
        PathBuf::from(format!("/tmp/vos-{uid}"))
    };
    let _ = std::fs::create_dir_all(&d);
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700));
    d
}

fn path_of(name: &str) -> PathBuf {
    dir().join(format!("{name}.json"))
}

pub fn log_path(name: &str) -> PathBuf {
    dir().join(format!("{name}.log"))
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

pub fn register(e: &Entry) -> Result<()> {
    let p = path_of(&e.name);
    let tmp = p.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(e)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &p)?;
    Ok(())
}

pub fn unregister(name: &str) {
    let _ = std::fs::remove_file(path_of(name));
}

/// Live jobs, oldest first.
pub fn list() -> Vec<Entry> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir()) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let Ok(text) = std::fs::read(&p) else { continue };
        match serde_json::from_slice::<Entry>(&text) {
            Ok(en) if alive(en.supervisor) => out.push(en),
            _ => {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
    out.sort_by_key(|e| (e.since_unix, e.name.clone()));
    out
}

/// The job called `name`; without a name, the only job running.
pub fn find(name: Option<&str>) -> Result<Entry> {
    let jobs = list();
    match name {
        Some(n) => jobs.into_iter().find(|e| e.name == n).ok_or_else(|| anyhow!("no job named {n} is running (see `vrun list`)")),
        None => match jobs.len() {
            0 => bail!("no job is running"),
            1 => Ok(jobs.into_iter().next().unwrap()),
            _ => bail!("several jobs are running; name one (see `vrun list`)"),
        },
    }
}

/// `base`, or `base-2`, `base-3`... whichever no live job uses.
pub fn unique_name(base: &str) -> String {
    let jobs = list();
    let taken = |n: &str| jobs.iter().any(|e| e.name == n);
    if !taken(base) {
        return base.into();
    }
    (2..).map(|i| format!("{base}-{i}")).find(|n| !taken(n)).unwrap()
}
