//! `vrun checkpoint`: ask a job's supervisor for a checkpoint and wait for the answer.

use crate::job::registry;
use anyhow::{Result, anyhow, bail};
use crate::output::progress::{Progress, mib};
use std::os::fd::AsRawFd;
use std::time::Duration;
use vos::proto::{self, Msg};

pub struct Args {
    pub name: Option<String>,
    pub kill: bool,
    /// A path, "-" for standard output, or None for the job's directory.
    pub to: Option<String>,
    pub quiet: bool,
    pub json: bool,
    pub bundle: bool,
    pub tcp_established: bool,
    /// Sign this image with the key in this file (else the job's own key, if it has one, signs it).
    pub image_key: Option<std::path::PathBuf>,
}

/// The longest silence from a supervisor a checkpoint client accepts (syncing a very large image is the longest
/// step without progress reports).
const SILENCE_S: u64 = 180;

pub fn run(a: Args) -> Result<()> {
    // Checked before the job is asked anything.
    if a.image_key.is_some() && a.to.as_deref() == Some("-") {
        bail!("--image-key: an image written to standard output cannot be signed (it is never read back): write it to a file");
    }
    let key = a.image_key.as_deref().map(crate::image::sign::read_key_file).transpose()?;
    let job = registry::find(a.name.as_deref())?;
    let conn = registry::connect(&job)?;
    let sock = conn.as_raw_fd();
    let to_stdout = a.to.as_deref() == Some("-");
    let to = match a.to.as_deref() {
        None | Some("-") => None,
        Some(p) => Some(std::path::absolute(p)?.display().to_string()),
    };
    let mut bar = Progress::new("checkpoint", a.quiet || a.json, Duration::from_secs(1));
    let ask = Msg::Checkpoint { kill: a.kill, to, fd_attached: to_stdout, bundle: a.bundle, tcp_established: a.tcp_established, handoff: false, pages: proto::Pages::All };
    if let Some(k) = key {
        proto::send(sock, &Msg::SignWith { key: serde_bytes::ByteBuf::from(k.to_vec()) }, None).map_err(|e| anyhow!("talking to the supervisor: {e}"))?;
    }
    proto::send(sock, &ask, to_stdout.then_some(1)).map_err(|e| anyhow!("talking to the supervisor: {e}"))?;
    // The supervisor answers within seconds, and while the image is written says how far it is four times a
    // second: a silence this long means it is stuck, or gone with its socket held elsewhere.
    crate::os::set_timeout(sock, Duration::from_secs(SILENCE_S));
    let answer = loop {
        match proto::recv(sock) {
            Ok(Some((Msg::Progress { total: 0, .. }, _))) => {}
            Ok(Some((Msg::Progress { bytes, total }, _))) => bar.show(bytes, Some(total.max(bytes)), bytes, ""),
            a => break a,
        }
    };
    bar.done();
    drop(conn);
    let ms = bar.elapsed().as_millis();
    match answer {
        Ok(Some((Msg::CheckpointDone { path, signed, .. }, _))) => {
            let bytes = path.as_ref().and_then(|p| std::fs::metadata(p).ok()).filter(|m| m.is_file()).map(|m| m.len());
            if a.json {
                println!("{}", serde_json::json!({"job": job.name, "image": path, "bytes": bytes, "millis": ms, "killed": a.kill, "signed": signed}));
                return Ok(());
            }
            match path {
                Some(p) => {
                    if !a.quiet {
                        let size = bytes.map_or(String::new(), |b| format!(", {:.1} MiB", mib(b)));
                        let by = signed.map_or(String::new(), |id| format!(", signed by key {id}"));
                        eprintln!("vrun: checkpoint of {} took {ms} ms{size}{by}", job.name);
                    }
                    println!("{p}");
                }
                None if !a.quiet => eprintln!("vrun: checkpoint of {} written to standard output in {ms} ms", job.name),
                None => {}
            }
            Ok(())
        }
        Ok(Some((Msg::CheckpointFailed { why }, _))) => bail!("checkpoint of {} failed: {why}; the job goes on untouched", job.name),
        Ok(_) => bail!("the supervisor of {} went away during the checkpoint (is the job still there? see `vrun list`)", job.name),
        Err(e) if e.0 == libc::EAGAIN => {
            bail!("the supervisor of {} said nothing for {SILENCE_S} s: the checkpoint is abandoned (see the job's log)", job.name)
        }
        Err(e) => bail!("talking to the supervisor: {e}"),
    }
}
