//! The vDSO under another kernel.
//!
//! glibc looks up the vDSO's functions once, at startup, and keeps pointers into it; a job restored where the
//! kernel's vDSO differs still calls through them. So the restore puts a copy of the image's vDSO back at its old
//! address, with a jump at every entry point to the new vDSO's function of the same name, and has the kernel map
//! the new vDSO (with its data pages) at a free address. The old data pages come back as zeros: code that was
//! interrupted inside the old vDSO then reads a clock mode of "none" and falls back to the system call.

use anyhow::{Result, anyhow, bail};
use std::collections::HashMap;
use vos::image::{Region, RegionKind, VdsoInfo};
use vos::plan::{self, MapOp};

/// `jmp *0(%rip)` followed by the 8-byte target: no register touched.
const JUMP: [u8; 6] = [0xff, 0x25, 0, 0, 0, 0];
const JUMP_LEN: u64 = 14;

/// How to rebuild the vDSO of every process when this kernel's differs from the image's.
pub struct Swap {
    old: Vec<u8>,
    /// Entry points of the old vDSO (offset in it) and, for each, the new vDSO's entry of the same name.
    jumps: Vec<(u64, u64)>,
    /// This kernel's vvar, vvar_vclock and vDSO block, and where the vDSO text starts in it.
    block_len: u64,
    text_off: u64,
}

/// Function symbols of a vDSO image by name, as offsets from its start.
fn functions(bytes: &[u8]) -> Result<HashMap<String, u64>> {
    let elf = goblin::elf::Elf::parse(bytes).map_err(|e| anyhow!("parsing a vDSO: {e}"))?;
    let base = elf.program_headers.iter().filter(|p| p.p_type == goblin::elf::program_header::PT_LOAD).map(|p| p.p_vaddr).min().unwrap_or(0);
    Ok(elf
        .dynsyms
        .iter()
        .filter(|s| s.is_function() && s.st_value != 0)
        .filter_map(|s| Some((elf.dynstrtab.get_at(s.st_name)?.to_string(), s.st_value.checked_sub(base)?)))
        .collect())
}

/// None when the image's vDSO is this kernel's (VOS_TEST_FOREIGN_VDSO=1 pretends it is not, for tests).
pub fn swap(img: &VdsoInfo, here: &VdsoInfo) -> Result<Option<Swap>> {
    let same = img.hash == here.hash && img.vdso_len == here.vdso_len && img.vvar_len == here.vvar_len && img.vvar_vclock_len == here.vvar_vclock_len;
    if same && std::env::var_os("VOS_TEST_FOREIGN_VDSO").is_none() {
        return Ok(None);
    }
    if img.image.is_empty() {
        bail!("the kernel's vDSO differs (image: vDSO build-id {}; here {}) and the image carries no copy of it", img.build_id, here.build_id);
    }
    let old = functions(&img.image)?;
    let new = functions(&here.image)?;
    let mut jumps: Vec<(u64, u64)> = vec![];
    for (name, &at) in &old {
        // A function this kernel's vDSO lacks keeps its old code: its data reads as zeros, so it takes the syscall.
        let Some(&to) = new.get(name) else { continue };
        if !jumps.iter().any(|(a, _)| *a == at) {
            jumps.push((at, to));
        }
    }
    jumps.sort();
    let fits = |a: u64| a.checked_add(JUMP_LEN).is_some_and(|e| e <= img.image.len() as u64);
    if jumps.windows(2).any(|w| w[1].0 < w[0].0.saturating_add(JUMP_LEN)) || !jumps.iter().all(|(a, _)| fits(*a)) {
        bail!("the image's vDSO has entry points too close together to redirect");
    }
    let text_off = here.vvar_len + here.vvar_vclock_len;
    Ok(Some(Swap { old: img.image.to_vec(), jumps, block_len: text_off + here.vdso_len, text_off }))
}

/// One op that rebuilds the old vDSO block, with the bytes it maps (None: no data).
pub type Rebuild = (MapOp, Option<Vec<u8>>);

impl Swap {
    /// For a process with these regions (sorted by address) and threads stopped at `rips`: where this kernel's
    /// vDSO block goes and its text then lies, and the ops that rebuild the old block, each with its bytes.
    pub fn plan(&self, regions: &[&Region], rips: &[u64]) -> Result<(u64, u64, Vec<Rebuild>)> {
        let old_text = regions.iter().find(|r| r.kind == RegionKind::Vdso).map(|r| r.start).ok_or_else(|| anyhow!("the process has no vDSO"))?;
        for &rip in rips {
            if self.jumps.iter().any(|(a, _)| rip > old_text.saturating_add(*a) && rip < old_text.saturating_add(a + JUMP_LEN)) {
                bail!("a thread stopped at {rip:#x}, inside a vDSO entry point that must be redirected: checkpoint again");
            }
        }
        let addr = free_gap(regions, self.block_len).ok_or_else(|| anyhow!("no room for this kernel's vDSO in the address space"))?;
        let new_text = addr + self.text_off;
        let mut text = self.old.clone();
        for &(at, to) in &self.jumps {
            let at = at as usize;
            text[at..at + 6].copy_from_slice(&JUMP);
            text[at + 6..at + 14].copy_from_slice(&new_text.wrapping_add(to).to_le_bytes());
        }
        let mut ops = vec![];
        for r in regions.iter().filter(|r| matches!(r.kind, RegionKind::Vvar | RegionKind::VvarVclock | RegionKind::Vdso)) {
            let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u32;
            let mut op = MapOp { addr: r.start, len: r.end - r.start, prot: libc::PROT_READ as u32, flags, fd: -1, ..Default::default() };
            let bytes = if r.kind == RegionKind::Vdso {
                op.prot = (libc::PROT_READ | libc::PROT_EXEC) as u32;
                op.op = plan::OP_COPY;
                let mut b = text.clone();
                b.resize((r.end - r.start) as usize, 0);
                Some(b)
            } else {
                None
            };
            ops.push((op, bytes));
        }
        Ok((addr, new_text, ops))
    }
}

/// The highest free range of `len` bytes below the top of user space, outside the restorer's window.
fn free_gap(regions: &[&Region], len: u64) -> Option<u64> {
    const TOP: u64 = plan::USER_END;
    const BOTTOM: u64 = 0x1_0000_0000;
    // A main stack may still grow down by its limit: leave it room.
    const STACK_ROOM: u64 = 64 << 20;
    let mut busy: Vec<(u64, u64)> =
        regions.iter().map(|r| (if r.kind == RegionKind::Stack { r.start.saturating_sub(STACK_ROOM) } else { r.start }, r.end)).collect();
    busy.push((plan::WINDOW_START, plan::WINDOW_END));
    busy.push((TOP, u64::MAX));
    busy.sort();
    // A page of distance from each neighbour, so nothing merges with or grows into the vDSO.
    let mut best = None;
    let mut prev_end = BOTTOM;
    for (s, e) in busy {
        if s >= prev_end + len + 2 * 4096 {
            best = Some(s - len - 4096);
        }
        prev_end = prev_end.max(e);
    }
    best
}
