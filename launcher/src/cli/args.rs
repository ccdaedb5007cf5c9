//! The command line: every subcommand and option of vrun, with the checks of their values (clap).

use crate::{job, migration};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

const AFTER_HELP: &str = "\
Trigger signals (changeable with --checkpoint-signal / --exit-signal):
  SIGRTMAX-1  checkpoint the job and let it go on      (kill -s RTMAX-1 PID)
  SIGRTMAX-2  checkpoint the job, then end it          (for schedulers: \"migrate me away\")
The job never sees these signals; its own use of them is virtualized.

Exit status: the job's own; 75 when the job was checkpointed and stopped (restore it to go on).

Examples:
  vrun --name calc --dir /tmp/imgs python3 long_job.py
  vrun list
  vrun checkpoint calc                      # prints the image's path
  vrun checkpoint calc --kill               # image, then the job ends
  vrun restore /tmp/imgs                    # the newest complete image in the directory
  vrun checkpoint calc --kill --to - | ssh other vrun restore -
  vrun keygen /etc/vos/key                                 # once; copy it (0600, root's) to every host
  vrun serve --listen 0.0.0.0:7070 --key /etc/vos/key     # on another host
  vrun migrate calc --to other:7070 --key /etc/vos/key    # live: the job moves, memory to memory
  vrun inspect /tmp/imgs/calc-20261122-101500-1.vimg";

#[derive(Parser)]
#[command(name = "vrun", version, about = "Run unmodified Linux programs so they can be checkpointed, restored and moved",
    after_help = AFTER_HELP, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// How a job is supervised (launch and restore alike).
#[derive(Args, Clone)]
pub struct JobArgs {
    /// Name of the job: letters, digits, '.', '_', '+', '-', at most 64 bytes; refused if a running job has it
    /// (default: the program's file name, made valid and unique among running jobs; a restore: the image's)
    #[arg(long, value_parser = job::registry::name_arg)]
    pub name: Option<String>,
    /// Where checkpoint images go (default: the current directory; a restore: the job's own)
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Take a checkpoint every SECS seconds (0.1 to a year), keeping the last --keep images (a restore: as the
    /// job did)
    #[arg(long, value_name = "SECS", value_parser = parse_interval)]
    pub interval: Option<Duration>,
    /// How many periodic images to keep, 1 to 10000 [default: 3; a restore: as the job did]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=job::supervisor::KEEP_MAX as i64))]
    pub keep: Option<u32>,
    /// Signal that asks for a checkpoint (a number, RTMAX-n or RTMIN+n) [default: RTMAX-1; a restore: the job's,
    /// which cannot change]
    #[arg(long, value_name = "SIG", value_parser = parse_signal)]
    pub checkpoint_signal: Option<i32>,
    /// Signal that asks for a checkpoint and then the job's end [default: RTMAX-2; a restore: the job's]
    #[arg(long, value_name = "SIG", value_parser = parse_signal)]
    pub exit_signal: Option<i32>,
    /// Say nothing on stderr except errors
    #[arg(long, short)]
    pub quiet: bool,
    /// Sign the job's images with this key file (32 bytes, mode 600: `head -c 32 /dev/urandom`); a restore also
    /// takes only an image it signed [default: /etc/vos/image.key, if it exists and is readable]
    #[arg(long, value_name = "FILE")]
    pub image_key: Option<PathBuf>,
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// The program to run, and its arguments
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true, value_name = "PROGRAM [ARGS]")]
    pub program: Vec<String>,
}

/// What a restore may bind differently from the checkpoint host.
#[derive(Args)]
pub struct RebindArgs {
    /// Give the job this hostname instead of the one it had
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// Give the job this NIS domain name instead of the one it had
    #[arg(long, value_name = "NAME")]
    pub domainname: Option<String>,
    /// Paths under OLD on the checkpoint host are under NEW here (repeatable; the longest OLD wins)
    #[arg(long = "map", value_name = "OLD=NEW", value_parser = parse_map)]
    pub map: Vec<(String, String)>,
    /// The job's sockets bound or connected to OLD use NEW instead: an IP (every port) or IP:port (repeatable)
    #[arg(long = "map-addr", value_name = "OLD=NEW", value_parser = parse_map_addr)]
    pub map_addr: Vec<(String, String)>,
}

fn parse_base(s: &str) -> Result<(i32, i32), String> {
    let (p, f) = s.split_once(':').ok_or_else(|| format!("{s}: expected PID:FD"))?;
    Ok((p.parse().map_err(|_| format!("{s}: bad pid"))?, f.parse().map_err(|_| format!("{s}: bad fd"))?))
}

fn parse_map_addr(s: &str) -> Result<(String, String), String> {
    let (old, new) = old_new(s)?;
    Ok((old.to_string(), new.to_string()))
}

fn old_new(s: &str) -> Result<(&str, &str), String> {
    s.split_once('=').ok_or_else(|| format!("{s}: expected OLD=NEW"))
}

fn parse_map(s: &str) -> Result<(String, String), String> {
    let (old, new) = old_new(s)?;
    if !old.starts_with('/') || !new.starts_with('/') {
        return Err(format!("{s}: both sides must be absolute paths"));
    }
    let trim = |p: &str| if p.len() > 1 { p.trim_end_matches('/').to_string() } else { p.to_string() };
    Ok((trim(old), trim(new)))
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run PROGRAM under vOS (the default when the first word is not a command)
    Run(RunArgs),
    /// List running jobs
    #[command(after_help = "Each job's name, the pid of its main process on this host, when it started, and its program; \
the names are what `vrun checkpoint` and `vrun migrate` take.\n\nExample:\n  vrun list")]
    List,
    /// Checkpoint a running job; prints the image's path
    #[command(after_help = "Examples:\n  vrun checkpoint calc\n  vrun checkpoint calc --kill --to /tmp/calc.vimg\n  vrun checkpoint calc --kill --to - | ssh other vrun restore -")]
    Checkpoint {
        /// The job (may be left out when only one runs)
        #[arg(value_parser = job::registry::name_arg)]
        name: Option<String>,
        /// End the job once the image is safely written
        #[arg(long)]
        kill: bool,
        /// Write the image to this file, or "-" for standard output (default: a new file in the job's --dir)
        #[arg(long, value_name = "PATH|-")]
        to: Option<String>,
        /// Carry the programs and libraries the job maps inside the image, so it restores on a host that lacks
        /// them or has other versions
        #[arg(long)]
        bundle: bool,
        /// Keep TCP connections to peers outside the job (TCP_REPAIR, root); without it they are restored reset
        #[arg(long)]
        tcp_established: bool,
        /// Print only the image's path (and errors)
        #[arg(long, short)]
        quiet: bool,
        /// Print a JSON summary on stdout (job, image, bytes, millis, signed) instead of the path
        #[arg(long, conflicts_with = "quiet")]
        json: bool,
        /// Sign this image with the key in FILE (by default the job's own key, if it was given one, signs it;
        /// an image written to a stream is never signed)
        #[arg(long, value_name = "FILE")]
        image_key: Option<PathBuf>,
    },
    /// Restore a job from an image and supervise it in the foreground
    #[command(after_help = "IMAGE is an image file, a directory (your newest complete image in it: only images you own, \
in a directory others cannot write to unless it is sticky), or - (standard input).\n\nWith a key (--image-key, or \
/etc/vos/image.key when it exists), only an image it signed is restored; a stream cannot be checked first and is \
refused.\n\nExamples:\n  vrun restore /tmp/imgs/calc-20261122-101500-1.vimg\n  vrun restore /tmp/imgs\n  \
vrun restore --image-key /etc/vos/image.key /shared/imgs/calc.vimg\n  ssh src vrun checkpoint calc --kill --to - | vrun restore -")]
    Restore {
        /// Image file, directory, or - for standard input
        image: String,
        /// Restore an image the key did not sign (unsigned, a stream, another key's): whoever could write it
        /// decides what runs
        #[arg(long)]
        trust_unsigned: bool,
        #[command(flatten)]
        job: JobArgs,
        #[command(flatten)]
        rebind: RebindArgs,
        /// Write "running" to this fd once the job runs (for `vrun serve`)
        #[arg(long, hide = true)]
        report_fd: Option<i32>,
        /// PID:FD, the pages of process PID received by pre-copy (for `vrun serve`)
        #[arg(long = "base", hide = true, value_parser = parse_base)]
        bases: Vec<(i32, i32)>,
        /// Post-copy: the memory the image lists comes after the job resumes, filled by whoever reads this
        /// socket (`Msg::Fill`; for `vrun serve`)
        #[arg(long, hide = true)]
        fill_fd: Option<i32>,
    },
    /// Move a running job to another host's `vrun serve`, memory to memory; it ends here only once it runs there
    #[command(after_help = "Memory goes over while the job runs, then again what it wrote meanwhile, until little changes; \
the job then stops for the last round only, and goes on at the destination (--stop-and-copy: stopped for the whole \
transfer; --lazy: stopped only while its small image goes, then it runs there and pulls its memory from here). If \
anything fails before the destination reports it running (with --lazy: before all its memory arrived), it goes on \
here.\n\nExamples:\n  vrun migrate calc --to 10.0.0.2:7070 --key /etc/vos/key\n  vrun migrate web --to hostb:7070 --key k --tcp-established\n  vrun migrate big --to hostb:7070 --key k --lazy")]
    Migrate {
        /// The job (may be left out when only one runs)
        #[arg(value_parser = job::registry::name_arg)]
        name: Option<String>,
        /// The destination's `vrun serve` address
        #[arg(long, value_name = "HOST:PORT")]
        to: String,
        /// The key file the destination's serve holds (`vrun keygen`; mode 0600): the transfer is encrypted, and
        /// both ends prove they hold it before anything of the job is sent
        #[arg(long, value_name = "FILE", required_unless_present = "insecure_no_key")]
        key: Option<PathBuf>,
        /// Talk to a `vrun serve --insecure-no-key` (encrypted, not authenticated: a lab only)
        #[arg(long, conflicts_with = "key")]
        insecure_no_key: bool,
        /// Keep TCP connections to peers outside the job (TCP_REPAIR, root); without it they are restored reset
        #[arg(long)]
        tcp_established: bool,
        /// Carry the programs and libraries the job maps, for a destination that lacks them
        #[arg(long)]
        bundle: bool,
        /// Sockets bound or connected to OLD use NEW at the destination (as `vrun restore --map-addr`)
        #[arg(long = "map-addr", value_name = "OLD=NEW", value_parser = parse_map_addr)]
        map_addr: Vec<(String, String)>,
        /// The job's own IPv4 address moves with it: the destination takes it (if its serve allows that address,
        /// --allow-addr), this host lets go of it, and peers are told by gratuitous ARP (with --tcp-established,
        /// their connections go on)
        #[arg(long, value_name = "IP/PREFIX")]
        move_addr: Option<migration::address::Address>,
        /// No pre-copy: stop the job for the whole transfer (the default sends memory while it runs, then
        /// only what changed)
        #[arg(long, conflicts_with = "lazy")]
        stop_and_copy: bool,
        /// Post-copy: the job runs at the destination at once and pulls the pages it touches from here, the rest
        /// in the background; it ends here once every page arrived (if the connection breaks first, it goes on
        /// here and its copy there ends)
        #[arg(long)]
        lazy: bool,
        /// No progress and no summary (errors only)
        #[arg(long, short)]
        quiet: bool,
        /// The summary as JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// Receive jobs from `vrun migrate` and restore them here (as root: whoever holds the key runs jobs here)
    #[command(after_help = "Each job received is restored by a `vrun restore` of its own that supervises it, with the job's \
output in DIR/NAME.log (mode 0600). Connections are encrypted (Noise, keyed by the key file); a client that does not \
prove it holds the key within 10 s of connecting is dropped without a word.\n\nExample:\n  vrun keygen /etc/vos/key   \
# once; then the same file (root's, mode 0600) on every host\n  vrun serve --listen 0.0.0.0:7070 --key /etc/vos/key --dir /var/lib/vos --allow-addr 10.0.0.0/24")]
    Serve {
        /// Address and port to listen on
        #[arg(long, value_name = "ADDR:PORT")]
        listen: String,
        /// The key file every `vrun migrate` must prove it holds (`vrun keygen`; 32 bytes, mode 0600, owned by
        /// you or root)
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// No key: anyone who reaches the port may send jobs that run here as root (a lab only; said loudly).
        /// Traffic is still encrypted, with a well-known key, so not authenticated
        #[arg(long, conflicts_with = "key")]
        insecure_no_key: bool,
        /// Where received jobs keep their images and logs (made mode 0700 if missing)
        #[arg(long, default_value = "/var/lib/vos")]
        dir: PathBuf,
        /// A network within which jobs may bring their own address (`migrate --move-addr`), NET/PREFIX
        /// (repeatable; without it no job may bring one)
        #[arg(long = "allow-addr", value_name = "NET/PREFIX")]
        allow_addr: Vec<migration::address::Range>,
        /// How many jobs may be received at once; more are told to try again later
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
        max_connections: u16,
    },
    /// Make a new key file for `vrun serve` and `vrun migrate`: 32 random bytes, mode 0600
    #[command(after_help = "The file must not exist yet (it is never overwritten, never written through a symlink). Copy it \
to every host that sends or receives jobs, keeping it owned by root with mode 0600 (e.g. `install -m 600 key /etc/vos/key`); \
whoever can read it can run jobs as root on all of them.\n\nExample:\n  vrun keygen /etc/vos/key")]
    Keygen {
        /// Where to write the key
        file: PathBuf,
    },
    /// Print shell completions (bash, zsh, fish, ...) to standard output
    #[command(after_help = "Examples:\n  vrun completions bash > /etc/bash_completion.d/vrun\n  vrun completions zsh > \"${fpath[1]}/_vrun\"")]
    Completions {
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to standard output
    #[command(after_help = "Example:\n  vrun man > /usr/local/share/man/man1/vrun.1 && man vrun")]
    Man,
    /// Describe what an image holds (and verify it)
    #[command(after_help = "A report: the host it was taken on, the process tree, memory (stored, mapped from files, never touched) \
and fds of the whole job by kind, then each process. Reading it checks every chunk's checksum.\n\nExamples:\n  vrun inspect /tmp/imgs/calc-20261122-101500-1.vimg\n  vrun inspect /tmp/imgs --mappings\n  vrun inspect IMAGE --json | jq .job.processes[].pid")]
    Inspect {
        /// Image file, directory, or - for standard input
        image: String,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
        /// List every mapping of every process, with how it travels
        #[arg(long)]
        mappings: bool,
        /// Check that the key in FILE signed the image, and refuse it otherwise [default: /etc/vos/image.key, if
        /// it exists and is readable]
        #[arg(long, value_name = "FILE")]
        image_key: Option<PathBuf>,
        /// Read an image the key did not sign
        #[arg(long)]
        trust_unsigned: bool,
    },
}

/// Seconds, as a `Duration` within what `--interval` allows (a huge or odd number must not panic later).
fn parse_interval(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.trim().parse().map_err(|_| format!("{s}: not a number of seconds"))?;
    let (min, max) = (job::supervisor::INTERVAL_MIN, job::supervisor::INTERVAL_MAX);
    if !(min.as_secs_f64()..=max.as_secs_f64()).contains(&secs) {
        return Err(format!("{s}: use {} to {} seconds", min.as_secs_f64(), max.as_secs()));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s}: {e}"))
}

fn parse_signal(s: &str) -> Result<i32, String> {
    let t = s.trim_start_matches("SIG");
    let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    let v = if let Some(n) = t.strip_prefix("RTMAX-") {
        n.parse::<i32>().ok().and_then(|n| max.checked_sub(n))
    } else if let Some(n) = t.strip_prefix("RTMIN+") {
        n.parse::<i32>().ok().and_then(|n| min.checked_add(n))
    } else if t == "RTMAX" {
        Some(max)
    } else {
        t.parse::<i32>().ok()
    }
    .ok_or_else(|| format!("not a signal: {s}"))?;
    if !(min..=max).contains(&v) {
        return Err(format!("{s}: use a real-time signal ({min}..{max}); ordinary signals belong to the app"));
    }
    Ok(v)
}


impl JobArgs {
    pub fn given(&self) -> job::supervisor::Given {
        job::supervisor::Given {
            dir: self.dir.clone(),
            interval: self.interval,
            keep: self.keep.map(|k| k as usize),
            signals: (self.checkpoint_signal, self.exit_signal),
            quiet: self.quiet,
        }
    }
}

