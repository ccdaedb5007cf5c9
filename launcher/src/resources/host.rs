//! This host's identity (CPU, kernel, vDSO, libc) as an image records it, and the check that an image can run
//! here: a mismatch is named before anything is restored.

use anyhow::Result;
use vos::image::{CpuInfo, HostInfo, VdsoInfo};

pub fn current() -> HostInfo {
    let uts = nix::sys::utsname::uname().ok();
    HostInfo {
        hostname: nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default(),
        arch: std::env::consts::ARCH.into(),
        kernel: uts.as_ref().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default(),
        glibc: glibc_version(),
        cpu: cpu(),
        vdso: vdso(),
    }
}

fn glibc_version() -> String {
    unsafe extern "C" {
        fn gnu_get_libc_version() -> *const libc::c_char;
    }
    // SAFETY: glibc returns a static NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(gnu_get_libc_version()) }.to_string_lossy().into_owned()
}

fn cpu() -> CpuInfo {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    let v = __cpuid(0);
    let vendor: Vec<u8> = [v.ebx, v.edx, v.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
    let osxsave = __cpuid(1).ecx & (1 << 27) != 0;
    let (xcr0, xsave_size) = if osxsave {
        let (lo, hi): (u32, u32);
        // SAFETY: XGETBV with ECX=0 is allowed when CPUID reports OSXSAVE.
        unsafe { std::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
        let size = __cpuid_count(0xd, 0).ebx;
        (((hi as u64) << 32) | lo as u64, size)
    } else {
        (3, 512)
    };
    CpuInfo { vendor: String::from_utf8_lossy(&vendor).into_owned(), xcr0, xsave_size }
}

/// The special mappings of this process, as (name, start, end).
pub fn special_mappings() -> Vec<(String, u64, u64)> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    maps.lines()
        .filter_map(|l| {
            let name = l.split_whitespace().nth(5)?;
            if !matches!(name, "[vdso]" | "[vvar]" | "[vvar_vclock]") {
                return None;
            }
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((name.to_string(), u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?))
        })
        .collect()
}

fn vdso() -> VdsoInfo {
    let mut info = VdsoInfo::default();
    for (name, s, e) in special_mappings() {
        match name.as_str() {
            "[vdso]" => {
                info.vdso_len = e - s;
                // SAFETY: the vDSO is mapped readable in every process for its whole length.
                let bytes = unsafe { std::slice::from_raw_parts(s as *const u8, (e - s) as usize) };
                info.hash = xxhash_rust::xxh3::xxh3_64(bytes);
                info.build_id = crate::resources::identity::build_id(bytes).unwrap_or_default();
                info.image = serde_bytes::ByteBuf::from(bytes.to_vec());
            }
            "[vvar]" => info.vvar_len = e - s,
            "[vvar_vclock]" => info.vvar_vclock_len = e - s,
            _ => {}
        }
    }
    info
}

fn xfeature_names(bits: u64) -> String {
    let names = [
        (1 << 2, "AVX"),
        (1 << 3 | 1 << 4, "MPX"),
        (1 << 5 | 1 << 6 | 1 << 7, "AVX-512"),
        (1 << 9, "PKU"),
        (1 << 17 | 1 << 18, "AMX"),
    ];
    let v: Vec<&str> = names.iter().filter(|(m, _)| bits & m != 0).map(|(_, n)| *n).collect();
    if v.is_empty() { format!("XSAVE features {bits:#x}") } else { v.join(", ") }
}

/// Why an image taken on `img` cannot run on `here`, if it cannot.
pub fn check(img: &HostInfo, here: &HostInfo) -> Result<(), String> {
    if img.arch != here.arch {
        return Err(format!("image taken on {}; this host is {}", img.arch, here.arch));
    }
    let missing = img.cpu.xcr0 & !here.cpu.xcr0;
    if missing != 0 {
        return Err(format!("image taken on a CPU with {}; this host lacks it", xfeature_names(missing)));
    }
    if img.cpu.xsave_size > here.cpu.xsave_size {
        return Err(format!(
            "image taken on a CPU with {} bytes of XSAVE state; this host has {}",
            img.cpu.xsave_size, here.cpu.xsave_size
        ));
    }
    Ok(())
}
