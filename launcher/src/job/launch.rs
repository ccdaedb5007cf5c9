//! Starting a program as a new job: found and checked, its environment given the shim, its name reserved, then
//! started in fresh namespaces under a supervisor.

use anyhow::{Context, Result, anyhow, bail};
use std::ffi::CString;
use crate::{image, job};
use std::path::{Path, PathBuf};

/// The shim and the restorer live beside vrun.
pub fn beside_me(file: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("locating vrun")?;
    let p = me.parent().unwrap_or(Path::new(".")).join(file);
    if !p.exists() {
        bail!("{} is missing (it must be installed beside vrun)", p.display());
    }
    Ok(p)
}

/// Find a program the way execvp would.
fn which(prog: &str) -> Option<PathBuf> {
    if prog.contains('/') {
        return Some(PathBuf::from(prog));
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(if d.is_empty() { "." } else { d }).join(prog))
        .find(|p| p.is_file())
}

/// The shim can only enter dynamically linked programs (or scripts, whose interpreter is one).
fn check_dynamic(path: &Path) -> Result<()> {
    let Ok(bytes) = std::fs::read(path) else { return Ok(()) };
    if bytes.starts_with(b"#!") {
        return Ok(());
    }
    if let Ok(elf) = goblin::elf::Elf::parse(&bytes)
        && elf.interpreter.is_none() {
            bail!("{} is statically linked: vOS cannot enter it (it needs a dynamically linked program)", path.display());
        }
    Ok(())
}

/// What a launch needs: the program and its arguments, the job's name if one is asked for, how it is supervised.
pub struct Launch {
    pub program: Vec<String>,
    pub name: Option<String>,
    pub given: job::supervisor::Given,
    pub image_key: Option<PathBuf>,
}

/// The job runs; its supervisor is returned to be run (`supervise`).
pub fn launch(a: Launch) -> Result<job::supervisor::Supervisor> {
    let prog = a.program.first().ok_or_else(|| anyhow!("no program given"))?.clone();
    let opts = job::supervisor::Options { sign: image::sign::resolve(a.image_key.as_deref())?, ..a.given.settle(None)? };
    if let Some(p) = which(&prog) {
        check_dynamic(&p)?;
    }
    let shim = beside_me("libvos_shim.so")?;
    let reserved = match &a.name {
        Some(n) => job::registry::reserve(n)?,
        None => {
            let base = Path::new(&prog).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or(prog.clone());
            let r = job::registry::reserve_like(&base)?;
            if r.name() != base && !opts.quiet {
                eprintln!("vrun: the job is named {} (`vrun checkpoint {}`)", r.name(), r.name());
            }
            r
        }
    };
    let opts = job::supervisor::Options { name: reserved.name().to_string(), ..opts };
    let listener = job::supervisor::listen(&opts.name)?;
    let mut env: Vec<(String, String)> = std::env::vars().filter(|(k, _)| !k.starts_with("VOS_")).collect();
    let preload = match env.iter().find(|(k, _)| k == "LD_PRELOAD") {
        Some((_, v)) if !v.is_empty() => format!("{}:{v}", shim.display()),
        _ => shim.display().to_string(),
    };
    env.retain(|(k, _)| k != "LD_PRELOAD");
    env.push(("LD_PRELOAD".into(), preload));
    env.push((vos::env::SOCK.into(), listener.name.clone()));
    env.push((vos::env::SHIM.into(), shim.display().to_string()));
    env.push((vos::env::LOG.into(), reserved.log_path().display().to_string()));
    env.push((vos::env::SIGNALS.into(), format!("{},{}", opts.signals.0, opts.signals.1)));
    let env: Vec<CString> = env.iter().map(|(k, v)| CString::new(format!("{k}={v}"))).collect::<Result<_, _>>()?;
    let argv: Vec<CString> = a.program.iter().map(|s| CString::new(s.as_str())).collect::<Result<_, _>>()?;
    job::supervisor::block_signals(opts.signals)?;
    let started_ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64;
    let child = job::ns::Child::Exec { argv, env, shim_signals: [opts.signals.0, opts.signals.1] };
    let started = match job::ns::start(child, job::ns::ClockOffsets::default(), None, &[reserved.fd()], job::ns::UserNs::default_here()) {
        Ok(s) => s,
        Err(e) => {
            reserved.release();
            eprintln!("vrun: {prog}: {e:#}");
            std::process::exit(127);
        }
    };
    job::supervisor::Supervisor::new(opts, reserved, listener, started, a.program.clone(), started_ns)
}

