//! The restorer's plan: for each process, every mapping to make and where its pages come from, the fds it
//! inherits, and its restart spec; for the job, the table of processes. `vos-restore` reads it from one memfd
//! mapped at `plan::PLAN_ADDR`. What a plan will need (fds, bytes) is also what a checkpoint checks, so that
//! nothing a checkpoint accepts is refused by a restore.

use crate::os::memfd;
use crate::resources::{creds, pathopen};
use crate::resources::{identity, vdso};
use anyhow::{Context, Result, anyhow, bail};
use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use vos::image::{Contents, JobImage, ProcessImage, RegionKind, RestartSpec, VMF_GROWSDOWN, VMF_MAYWRITE};
use vos::plan::{self, JobPlanHead, MapOp, PlanHead, PrctlMmMap, ProcEntry};

/// What of a process the shim's restart code needs: not its memory map (the restorer made it; a job with
/// hundreds of thousands of mappings would otherwise make a plan too large), not its program or auxv.
pub(super) fn for_restart(p: &ProcessImage) -> ProcessImage {
    ProcessImage { regions: vec![], argv: vec![], exe: Default::default(), mm: Default::default(), ..p.clone() }
}

/// The job's processes, live ones first in image order, then zombies, as the restorer's plan lists them.
pub(super) fn entries(job: &JobImage) -> Vec<ProcEntry> {
    let live = job.processes.iter().enumerate().map(|(i, p)| ProcEntry {
        pid: p.pid,
        ppid: p.ppid,
        pgid: p.pgid,
        sid: p.sid,
        order: i as u32,
        ..Default::default()
    });
    let zombies = job.zombies.iter().map(|z| ProcEntry {
        pid: z.ids.pid,
        ppid: z.ids.ppid,
        pgid: z.ids.pgid,
        sid: z.ids.sid,
        zombie: 1,
        status: z.status,
        ..Default::default()
    });
    live.chain(zombies).collect()
}

fn align8(v: &mut Vec<u8>) {
    while !v.len().is_multiple_of(8) {
        v.push(0);
    }
}

/// The job's plan in a memfd: head, process entries, the shared sync page, then each process's plan.
pub(super) fn job_plan(job: &JobImage, plans: &[(Vec<u8>, usize)]) -> Result<OwnedFd> {
    let mut es = entries(job);
    let head_len = std::mem::size_of::<JobPlanHead>();
    let procs_off = head_len;
    let sync_off = (procs_off + es.len() * std::mem::size_of::<ProcEntry>()).next_multiple_of(4096);
    let mut body: Vec<u8> = vec![0; sync_off + 4096];
    for (plan, i) in plans {
        align8(&mut body);
        es[*i].plan_off = body.len() as u64;
        let base = body.len() as u64;
        body.extend_from_slice(&rebase(plan, base));
    }
    let head = JobPlanHead {
        magic: plan::JOB_PLAN_MAGIC,
        nproc: es.len() as u32,
        nleaders: es.iter().filter(|e| e.pgid == e.pid).count() as u32,
        procs_off: procs_off as u64,
        sync_off: sync_off as u64,
        total_len: body.len() as u64,
    };
    // SAFETY: repr(C) plain data.
    unsafe {
        body[..head_len].copy_from_slice(plan::bytes_of(&head));
        for (i, e) in es.iter().enumerate() {
            let o = procs_off + i * std::mem::size_of::<ProcEntry>();
            body[o..o + std::mem::size_of::<ProcEntry>()].copy_from_slice(plan::bytes_of(e));
        }
    }
    if body.len() > plan::MAX_PLAN {
        bail!("the restore plan is too large ({} bytes)", body.len());
    }
    let fd = nix::sys::memfd::memfd_create(c"vos-plan", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
    let mut f = File::from(fd);
    f.write_all(&body)?;
    Ok(f.into())
}

/// A process plan is built with offsets from its own start; shift them to where it lands in the job plan.
pub(super) fn rebase(plan: &[u8], base: u64) -> Vec<u8> {
    let mut v = plan.to_vec();
    // SAFETY: the plan starts with a PlanHead (plain data); read and write unaligned copies.
    unsafe {
        let mut h: PlanHead = std::ptr::read_unaligned(v.as_ptr() as *const PlanHead);
        h.ops_off += base;
        h.auxv_off += base;
        h.blob_off += base;
        h.guards_off += base;
        std::ptr::write_unaligned(v.as_mut_ptr() as *mut PlanHead, h);
        for i in 0..h.nmaps as usize {
            let o = (h.ops_off - base) as usize + i * std::mem::size_of::<MapOp>();
            let mut op: MapOp = std::ptr::read_unaligned(v.as_ptr().add(o) as *const MapOp);
            op.shift(base);
            std::ptr::write_unaligned(v.as_mut_ptr().add(o) as *mut MapOp, op);
        }
    }
    v
}

/// How many fd numbers a restore of `job` needs in each restored process (`Fds`: above the job's own highest fd,
/// one per open file, piece of shared memory, carried or mapped file, and a few of its own), so that a checkpoint
/// can refuse a job no restore could take (`ns::arrange_fds` lays them out within the hard open-file limit).
pub fn fds_needed(job: &JobImage) -> u64 {
    let top = job.processes.iter().flat_map(|p| p.fds.iter().map(|f| f.fd as u64 + 1)).max().unwrap_or(0).max(10);
    let mapped: std::collections::HashSet<&str> =
        job.processes.iter().flat_map(|p| p.regions.iter().filter_map(|r| r.file.as_ref()).map(|f| f.path.as_str()).chain([p.exe.path.as_str()])).collect();
    let objects = job.files.len() + job.shared_memory.len() + job.bundle.len() + mapped.len() + 2 * job.processes.len() + 3;
    top + objects as u64 + 16
}

/// About how large the restore plan of `job` will be (`job_plan`): a map op and its name per mapping, and the
/// restart spec per process. A checkpoint refuses a job whose plan no restore could take (`plan::MAX_PLAN`).
pub fn plan_size(job: &JobImage) -> u64 {
    let per_process: u64 = job
        .processes
        .iter()
        .map(|p| {
            let spec = rmp_serde::to_vec_named(&for_restart(p)).map_or(0, |v| v.len() as u64);
            let names: u64 = p.regions.iter().map(|r| r.name.len() as u64 + 8).sum();
            p.regions.len() as u64 * std::mem::size_of::<MapOp>() as u64 + names + p.mm.auxv.len() as u64 + spec + 4096
        })
        .sum();
    per_process + ((job.processes.len() + job.zombies.len()) * std::mem::size_of::<ProcEntry>()) as u64 + 2 * 4096
}

/// The fds the restored processes inherit, at numbers above every fd of the job.
pub(super) struct Fds {
    pub(super) next: i32,
    pub(super) list: Vec<(RawFd, i32)>,
    /// Files opened for mappings, by path, for writing, privately, and whose credentials opened them (shared by
    /// every process that maps them with the same).
    pub(super) by_path: HashMap<(String, bool, bool, Option<vos::image::FsCreds>), i32>,
    /// Carried files (`bundle`), by the checkpoint host's (dev, ino): mapped instead of the host's.
    pub(super) bundled: HashMap<(u64, u64), i32>,
    /// Files `check_files` found to be what the image needs, by path.
    pub(super) verified: HashMap<String, identity::Stamp>,
    /// Whose credentials the files of the process being planned are opened with (its own).
    pub(super) who: Option<vos::image::FsCreds>,
}

impl Fds {
    pub(super) fn new(job: &JobImage, verified: HashMap<String, identity::Stamp>) -> Fds {
        let top = job.processes.iter().flat_map(|p| p.fds.iter().map(|f| f.fd + 1)).max().unwrap_or(0);
        Fds { next: top.max(10), list: vec![], by_path: HashMap::new(), bundled: HashMap::new(), verified, who: None }
    }
    pub(super) fn reserve(&mut self) -> i32 {
        self.next += 1;
        self.next - 1
    }
    pub(super) fn put(&mut self, fd: RawFd) -> i32 {
        let n = self.reserve();
        self.list.push((fd, n));
        n
    }
    pub(super) fn set(&mut self, n: i32, fd: RawFd) {
        self.list.push((fd, n));
    }
    /// A file to map, opened once for the whole job (its carried copy when the image has one): a regular file,
    /// and for a private mapping (`private`) the very file the image needs. Only a shared mapping that may be
    /// written (`write`) opens it for writing; page data never goes into it (`MapOp::fillable`).
    pub(super) fn file(&mut self, id: &vos::image::FileId, private: bool, write: bool, keep: &mut Vec<OwnedFd>) -> Result<i32> {
        let write = write && !private;
        if let Some(&n) = self.bundled.get(&(id.dev, id.ino)).filter(|_| !write) {
            return Ok(n);
        }
        let path = id.path.as_str();
        let key = (path.to_string(), write, private, self.who.clone());
        if let Some(&n) = self.by_path.get(&key) {
            return Ok(n);
        }
        let flags = if write { libc::O_RDWR } else { libc::O_RDONLY };
        let (fd, _) = creds::as_user(self.who.as_ref(), || pathopen::open(path, flags, pathopen::Want::Regular)).with_context(|| format!("opening {path}"))?;
        let f = File::from(fd);
        if private {
            identity::check(id, &f, self.verified.get(path).copied())?;
        }
        let n = self.put(f.as_raw_fd());
        keep.push(f.into());
        self.by_path.insert(key, n);
        Ok(n)
    }
}

/// One process's plan, with offsets from its own start (see `rebase`).
#[allow(clippy::too_many_arguments)]
pub(super) fn process_plan(
    p: &ProcessImage,
    spec: &RestartSpec,
    fds: &mut Fds,
    keep: &mut Vec<OwnedFd>,
    image_fd: i32,
    ctl_fd: i32,
    shm_at: &[i32],
    shm_size: &[u64],
    first_seq: u64,
    swap: Option<&vdso::Swap>,
    base_fd: i32,
) -> Result<Vec<u8>> {
    let mut regions: Vec<_> = p.regions.iter().collect();
    regions.sort_by_key(|r| r.start);
    let find = |k: RegionKind| regions.iter().find(|r| r.kind == k).copied();
    let (vdso_addr, vdso_text) = match (find(RegionKind::Vvar), find(RegionKind::VvarVclock), find(RegionKind::Vdso)) {
        (Some(a), Some(b), Some(c)) if a.end == b.start && b.end == c.start => (a.start, c.start),
        (Some(a), None, Some(c)) if a.end == c.start => (a.start, c.start),
        (None, None, None) => (0, 0),
        _ => bail!("pid {}: the image's vDSO layout is not one this kernel makes", p.pid),
    };
    let mut ops: Vec<MapOp> = vec![];
    let mut names: Vec<(usize, Vec<u8>)> = vec![];
    // Bytes the plan carries for OP_COPY regions, by op index.
    let mut copies: Vec<(usize, Vec<u8>)> = vec![];
    let (vdso_addr, vdso_text) = match swap {
        Some(s) => {
            let rips: Vec<u64> = p.threads.iter().map(|t| t.rip).collect();
            let (addr, text, old) = s.plan(&regions, &rips).map_err(|e| anyhow!("pid {}: {e}", p.pid))?;
            for (op, bytes) in old {
                if let Some(b) = bytes {
                    copies.push((ops.len(), b));
                }
                ops.push(op);
            }
            (addr, text)
        }
        None => (vdso_addr, vdso_text),
    };
    for r in &regions {
        if matches!(r.kind, RegionKind::Vdso | RegionKind::Vvar | RegionKind::VvarVclock) {
            continue;
        }
        let mut op = MapOp { addr: r.start, len: r.end - r.start, prot: r.prot, fd: -1, ..Default::default() };
        op.flags = (if r.shared { libc::MAP_SHARED } else { libc::MAP_PRIVATE }) as u32;
        match (r.kind, r.shared_memory, &r.file) {
            (RegionKind::SharedAnon, Some(m), _) => {
                // A memfd or unnamed file this restore made: the one shared mapping page data may go into.
                op.fd = shm_at[m as usize];
                op.offset = r.offset;
                op.op |= plan::OP_OWNED;
            }
            (RegionKind::SysvShm, _, _) => {
                op.op |= plan::OP_SHMAT;
                op.shmid = r.ino as i32;
                op.offset = r.offset;
                op.flags = if r.vmflags & VMF_MAYWRITE != 0 { 0 } else { libc::SHM_RDONLY as u32 };
            }
            // Pages past the end of a file no restore finds (a memfd, a deleted file): a private mapping of an empty
            // memfd, where touching a page faults with SIGBUS as it did.
            (RegionKind::Detached, _, _) if r.contents == Contents::Nothing => {
                // A memfd's own name, so /proc shows the mapping as before.
                let fd = match r.name.strip_prefix("/memfd:").and_then(|n| n.strip_suffix(" (deleted)")).and_then(|n| CString::new(n).ok()) {
                    Some(n) => nix::sys::memfd::memfd_create(n.as_c_str(), nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?,
                    None => memfd(&r.name, 0)?,
                };
                op.fd = fds.put(fd.as_raw_fd());
                keep.push(fd);
                op.offset = r.offset;
            }
            (RegionKind::File, _, Some(f)) => {
                op.fd = fds.file(f, !r.shared, r.prot & libc::PROT_WRITE as u32 != 0, keep)?;
                op.offset = r.offset;
            }
            _ => op.flags |= libc::MAP_ANONYMOUS as u32,
        }
        if r.contents == Contents::Pages {
            op.op |= plan::OP_FILL;
        }
        if r.vmflags & VMF_GROWSDOWN != 0 {
            op.op |= plan::OP_GROWSDOWN;
        }
        // vmflags bits 1.. line up with plan::ADVICE.
        op.advice = (r.vmflags >> 1) & 0x3f;
        if let Some(n) = r.name.strip_prefix("[anon:").and_then(|n| n.strip_suffix(']')) {
            let mut v = n.as_bytes().to_vec();
            v.push(0);
            names.push((ops.len(), v));
        }
        // Shared memory mapped past its object's end: page data may go only where the object is (beyond, a
        // write would fault), so that part is mapped apart, taking none.
        let room = match (r.kind, r.shared_memory) {
            (RegionKind::SharedAnon, Some(m)) => shm_size[m as usize].next_multiple_of(4096).saturating_sub(op.offset).min(op.len),
            _ => op.len,
        };
        if room < op.len {
            let rest = MapOp { addr: op.addr + room, len: op.len - room, offset: op.offset + room, op: op.op & !plan::OP_FILL, name_len: 0, ..op };
            op.len = room;
            if room > 0 {
                ops.push(op);
            }
            ops.push(rest);
            continue;
        }
        ops.push(op);
    }
    let exe_fd = fds.file(&p.exe, true, false, keep)?;
    let head_len = std::mem::size_of::<PlanHead>();
    let ops_off = head_len as u64;
    let mut blob: Vec<u8> = vec![];
    let mut add = |b: &[u8]| {
        align8(&mut blob);
        let off = blob.len();
        blob.extend_from_slice(b);
        (off as u64, b.len() as u64)
    };
    let (auxv_off, auxv_len) = add(&p.mm.auxv);
    for (i, n) in names {
        let (off, len) = add(&n);
        ops[i].name_off = off;
        ops[i].name_len = len;
    }
    for (i, b) in copies {
        let (off, len) = add(&b);
        ops[i].data_off = off;
        ops[i].data_len = len;
    }
    let guards: Vec<u8> = regions
        .iter()
        .flat_map(|r| r.guards.iter().filter(|&&(a, b)| r.start <= a && a < b && b <= r.end))
        .flat_map(|&(a, b)| a.to_le_bytes().into_iter().chain((b - a).to_le_bytes()))
        .collect();
    let (guards_off, guards_len) = add(&guards);
    // The restorer takes regions in address order (and refuses others): the vDSO's copies go among the rest.
    ops.sort_by_key(|o| o.addr);
    let (blob_off, blob_len) = add(&rmp_serde::to_vec_named(spec)?);
    let blob_base = ops_off + (ops.len() * std::mem::size_of::<MapOp>()) as u64;
    for op in ops.iter_mut() {
        op.shift(blob_base);
    }
    let m = &p.mm;
    let head = PlanHead {
        magic: plan::PLAN_MAGIC,
        nmaps: ops.len() as u32,
        base_fd,
        ops_off,
        image_fd,
        ctl_fd,
        exe_fd,
        first_seq,
        vdso_addr,
        vdso_text,
        mm: PrctlMmMap {
            start_code: m.start_code,
            end_code: m.end_code,
            start_data: m.start_data,
            end_data: m.end_data,
            start_brk: m.start_brk,
            brk: m.brk,
            start_stack: m.start_stack,
            arg_start: m.arg_start,
            arg_end: m.arg_end,
            env_start: m.env_start,
            env_end: m.env_end,
            auxv: 0,
            auxv_size: 0,
            exe_fd: exe_fd as u32,
        },
        auxv_off: blob_base + auxv_off,
        auxv_len,
        restart_entry: p.shim.restart_entry,
        restart_stack_top: p.shim.restart_stack_top,
        blob_off: blob_base + blob_off,
        blob_len,
        guards_off: blob_base + guards_off,
        nguards: guards_len / 16,
    };
    let mut out = Vec::with_capacity(blob_base as usize + blob.len());
    // SAFETY: PlanHead and MapOp are repr(C) plain data.
    unsafe {
        out.extend_from_slice(plan::bytes_of(&head));
        for op in &ops {
            out.extend_from_slice(plan::bytes_of(op));
        }
    }
    out.extend_from_slice(&blob);
    Ok(out)
}
