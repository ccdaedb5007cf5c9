//! The command line: parsing (`args`) and the thin subcommands that hand over to the job, the two flows
//! (checkpoint, restore), migration and the image tools.

pub mod args;

use crate::{image, job, migration, restore};
use anyhow::Result;
use args::{Cli, Cmd, JobArgs, RebindArgs};
use clap::Parser;

/// vrun's entry: run the subcommand, print its error (escaped) and exit 1 if it fails.
pub fn main() {
    let cli = Cli::parse();
    job::ns::raise_nofile();
    if matches!(cli.cmd, Some(Cmd::Inspect { .. } | Cmd::List | Cmd::Completions { .. } | Cmd::Man)) {
        // Reports end quietly when their reader goes away (`vrun inspect IMG | head`).
        // SAFETY: plain signal disposition change, before anything else runs.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let r = match cli.cmd {
        None => launch(cli.run),
        Some(Cmd::Run(a)) => launch(a),
        Some(Cmd::List) => list(),
        Some(Cmd::Checkpoint { name, kill, to, bundle, tcp_established, quiet, json, image_key }) => {
            job::client::run(job::client::Args { name, kill, to, quiet, json, bundle, tcp_established, image_key })
        }
        Some(Cmd::Restore { image, trust_unsigned, job, rebind, report_fd, bases, fill_fd }) => {
            restore_cmd(image, trust_unsigned, job, rebind, report_fd, bases, fill_fd)
        }
        Some(Cmd::Migrate { name, to, key, insecure_no_key, tcp_established, bundle, map_addr, move_addr, stop_and_copy, lazy, quiet, json }) => {
            migration::migrate::run(migration::migrate::Args { name, to, key, insecure_no_key, tcp_established, bundle, map_addr, move_addr, stop_and_copy, lazy, quiet, json })
        }
        Some(Cmd::Serve { listen, key, insecure_no_key, dir, allow_addr, max_connections }) => {
            migration::serve::run(migration::serve::Args { listen, key, insecure_no_key, dir, allow_addr, max_connections: max_connections.into() })
        }
        Some(Cmd::Keygen { file }) => migration::channel::keygen(&file).map(|()| {
            eprintln!("vrun: a new key in {} (mode 0600): copy it to every host that sends or receives jobs, owned by root, mode 0600", file.display())
        }),
        Some(Cmd::Inspect { image, json, mappings, image_key, trust_unsigned }) => image::inspect::run(&image, json, mappings, image_key.as_deref(), trust_unsigned),
        Some(Cmd::Completions { shell }) => {
            clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "vrun", &mut std::io::stdout());
            Ok(())
        }
        Some(Cmd::Man) => clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut std::io::stdout()).map_err(Into::into),
    };
    if let Err(e) = r {
        // Messages quote images, paths and names others chose: escaped, line by line.
        let msg = format!("{e:#}");
        let lines: Vec<String> = msg.lines().map(crate::output::escape::escape).collect();
        eprintln!("vrun: {}", lines.join("\n"));
        std::process::exit(1);
    }
}


fn restore_cmd(image: String, trust_unsigned: bool, j: JobArgs, rebind: RebindArgs, report_fd: Option<i32>, bases: Vec<(i32, i32)>, fill_fd: Option<i32>) -> Result<()> {
    let restorer = job::launch::beside_me("vos-restore")?;
    let args = restore::Args {
        src: image,
        image_key: j.image_key.clone(),
        trust_unsigned,
        name: j.name.clone(),
        given: j.given(),
        hostname: rebind.hostname,
        domainname: rebind.domainname,
        map: rebind.map,
        map_addr: rebind.map_addr,
        report_fd,
        bases,
        fill_fd,
    };
    restore::run(args, restorer, job::launch::beside_me("libvos_shim.so")?).map(|_| ())
}

fn launch(a: args::RunArgs) -> Result<()> {
    let given = a.job.given();
    job::launch::launch(job::launch::Launch { program: a.program, name: a.job.name, given, image_key: a.job.image_key })?.run()
}

/// Names, argv and process names are the jobs' own: escaped.
fn list() -> Result<()> {
    let jobs = job::registry::list()?;
    if jobs.is_empty() {
        println!("no jobs running");
        return Ok(());
    }
    println!("{:<16} {:>8} {:<20} PROGRAM", "NAME", "PID", "SINCE (UTC)");
    for j in jobs {
        let program: Vec<String> = j.program.iter().map(|a| crate::output::escape::escape(a)).collect();
        println!("{:<16} {:>8} {:<20} {}", crate::output::escape::escape(&j.name), j.pid, crate::output::time::timestamp_of(j.since_unix), program.join(" "));
        // The job's process tree (pids as this host and as the job see them).
        let members = job::members::members(nix::unistd::Pid::from_raw(j.init)).unwrap_or_default();
        if members.len() > 1 {
            print_tree(&members, 1, 1);
        }
    }
    Ok(())
}

fn print_tree(members: &[job::members::Member], parent: i32, depth: usize) {
    for m in members.iter().filter(|m| m.ids.ppid == parent) {
        let state = if m.zombie { " (zombie)" } else { "" };
        println!("{:<16} {:>8} {}{} {}{state}", "", m.host, "  ".repeat(depth), m.ids.pid, crate::output::escape::escape(&m.comm));
        print_tree(members, m.ids.pid, depth + 1);
    }
}
