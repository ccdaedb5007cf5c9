//! `vrun inspect`: what an image holds, as a report or as JSON. Reads (and so verifies) the whole image.

use crate::imagefile::Reader;
use anyhow::Result;
use serde::Serialize;
use vos::image::{Contents, FdKind, ImageHeader, ProcessImage, ProcessSummary, RegionKind};

#[derive(Serialize)]
struct Report {
    source: String,
    format: u32,
    header: ImageHeader,
    processes: Vec<ProcessReport>,
}

#[derive(Serialize)]
struct ProcessReport {
    process: ProcessImage,
    summary: ProcessSummary,
    pages_stored: u64,
}

pub fn run(src: &str, json: bool) -> Result<()> {
    let mut r = Reader::open(src)?;
    let header = r.header()?;
    let mut processes = Vec::new();
    for _ in 0..header.processes {
        let process = r.process()?;
        let (summary, pages_stored) = r.skip_pages()?;
        processes.push(ProcessReport { process, summary, pages_stored });
    }
    r.end()?;
    let rep = Report { source: r.name.clone(), format: vos::chunk::FORMAT_VERSION, header, processes };
    if json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        print_report(&rep);
    }
    Ok(())
}

fn size(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn prot(p: u32) -> String {
    let f = |bit: i32, c: char| if p & bit as u32 != 0 { c } else { '-' };
    format!("{}{}{}", f(libc::PROT_READ, 'r'), f(libc::PROT_WRITE, 'w'), f(libc::PROT_EXEC, 'x'))
}

fn print_report(rep: &Report) {
    let h = &rep.header;
    let when = crate::supervisor::timestamp_of(h.created_unix_ns / 1_000_000_000);
    println!("image      {} (format {})", rep.source, rep.format);
    println!("taken      {when} UTC, reason: {}", h.reason);
    println!(
        "host       {} ({}, kernel {}, glibc {}, {} CPU, XCR0 {:#x}, XSAVE {} bytes)",
        h.host.hostname, h.host.arch, h.host.kernel, h.host.glibc, h.host.cpu.vendor, h.host.cpu.xcr0, h.host.cpu.xsave_size
    );
    println!("vdso       build-id {}, {} bytes", h.host.vdso.build_id, h.host.vdso.vdso_len);
    println!("job        {}: {}", h.job.name, h.job.argv.join(" "));
    for pr in &rep.processes {
        let p = &pr.process;
        println!();
        println!("process    pid {} (parent {}) {}: {}", p.pid, p.ppid, p.comm, p.argv.join(" "));
        println!("program    {}", p.exe.path);
        println!("cwd        {}", p.attrs.cwd);
        println!("threads    {}", p.threads.len());
        for t in &p.threads {
            println!(
                "  tid {:<7} {:<16} rip {:#014x} rsp {:#014x} sigmask {:#x}{}{}",
                t.tid,
                t.comm,
                t.rip,
                t.rsp,
                t.sigmask,
                if t.altstack.is_some() { " altstack" } else { "" },
                if t.pending.is_empty() { String::new() } else { format!(" {} pending", t.pending.len()) }
            );
        }
        let (mut stored, mut file, mut zero) = (0u64, 0u64, 0u64);
        println!("memory     {} mappings", p.regions.len());
        for (i, r) in p.regions.iter().enumerate() {
            let s = pr.summary.regions.get(i).copied().unwrap_or_default();
            let len = r.end - r.start;
            let how = match (&r.contents, r.kind) {
                (_, RegionKind::Vdso | RegionKind::Vvar | RegionKind::VvarVclock) => "kernel's, not stored".to_string(),
                (Contents::File, _) => "shared file, data stays in the file".to_string(),
                (Contents::Nothing, _) => "nothing to store".to_string(),
                (Contents::Pages, RegionKind::File) => {
                    file += len - s.stored * 4096;
                    format!("{} stored (copied on write), rest from the file", size(s.stored * 4096))
                }
                (Contents::Pages, _) if r.prot == 0 && s.stored == 0 => "guard, nothing stored".to_string(),
                (Contents::Pages, _) => {
                    format!("{} stored, {} zero pages skipped, {} never touched", size(s.stored * 4096), s.zero, size(len - (s.stored + s.zero) * 4096))
                }
            };
            stored += s.stored * 4096;
            zero += s.zero;
            println!("  {:#014x}-{:#014x} {:>9} {} {:<28} {}", r.start, r.end, size(len), prot(r.prot), trim(&r.name, 28), how);
        }
        println!("  total: {} stored, {} mapped from files, {} zero pages skipped", size(stored), size(file), zero);
        println!("fds        {}", p.fds.len());
        for f in &p.fds {
            let what = match &f.kind {
                FdKind::File { file } => format!("file {} at offset {}", file.path, f.pos),
                FdKind::Dir { path } => format!("directory {path}"),
                FdKind::Device { path } => format!("device {path}"),
                FdKind::Terminal { path, stream } => format!("terminal {path} (re-bound to restore's {})", stream_name(*stream)),
                FdKind::OutsideStream { what, stream } => format!("{what} (re-bound to restore's {})", stream_name(*stream)),
                FdKind::Unknown => "unknown".into(),
            };
            let dup = f.dup_of.map(|d| format!(", same open file as fd {d}")).unwrap_or_default();
            println!("  {:<4} {what}, flags {:#o}{}{dup}", f.fd, f.flags, if f.cloexec { ", cloexec" } else { "" });
        }
        let handled = p.signals.actions.iter().filter(|a| a.handler > 1).count();
        println!("signals    {handled} handlers, {} pending for the process", p.signals.pending.len());
        println!("image data {} in page chunks", size(pr.summary.bytes));
    }
}

fn stream_name(s: u8) -> &'static str {
    ["stdin", "stdout", "stderr"].get(s as usize).copied().unwrap_or("stdio")
}

fn trim(s: &str, n: usize) -> String {
    if s.chars().count() <= n { s.into() } else { format!("…{}", s.chars().rev().take(n - 1).collect::<Vec<_>>().into_iter().rev().collect::<String>()) }
}
