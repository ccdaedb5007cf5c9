//! Seccomp filters as data: what a classic BPF program returns for a system call, whatever its arguments.
//!
//! A job's own filter stays in force while the shim checkpoints the process, and is installed again before a
//! restored process runs. The shim's own system calls must then get through: a filter that would kill the process
//! (or trap, or fail a call the shim cannot do without) at the next checkpoint is refused at checkpoint time, by
//! name, before any thread is signalled. `outcomes` runs the program on every path its argument tests can take
//! (arguments and instruction pointer unknown, the system call number and architecture known), so the answer
//! holds for any call of that number. Pure: no system calls.

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

pub const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// The action part of a filter's return value.
pub const ACTION_FULL: u32 = 0xffff_0000;
pub const RET_KILL_PROCESS: u32 = 0x8000_0000;
pub const RET_KILL_THREAD: u32 = 0;
pub const RET_TRAP: u32 = 0x0003_0000;
pub const RET_ERRNO: u32 = 0x0005_0000;
pub const RET_USER_NOTIF: u32 = 0x7fc0_0000;
pub const RET_TRACE: u32 = 0x7ff0_0000;
pub const RET_LOG: u32 = 0x7ffc_0000;
pub const RET_ALLOW: u32 = 0x7fff_0000;
/// BPF_MAXINSNS: the kernel takes no longer program.
pub const MAX_INSNS: usize = 4096;
/// SECCOMP_FILTER_FLAG_LOG.
pub const FLAG_LOG: u32 = 2;

/// One instruction (struct sock_filter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// The instructions of a program as the kernel stores them (8 bytes each, native endian).
pub fn parse(prog: &[u8]) -> Result<Vec<Insn>, String> {
    if prog.is_empty() || !prog.len().is_multiple_of(8) || prog.len() / 8 > MAX_INSNS {
        return Err(format!("{} bytes is not a BPF program", prog.len()));
    }
    Ok(prog
        .chunks_exact(8)
        .map(|c| Insn { code: u16::from_ne_bytes([c[0], c[1]]), jt: c[2], jf: c[3], k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]) })
        .collect())
}

/// A register or scratch word: known, or anything (it came from the arguments or the instruction pointer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum V {
    K(u32),
    Any,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct State {
    pc: usize,
    a: V,
    x: V,
    m: [V; 16],
}

/// A return value a program may give: a known one, or one it computes from what it read (`RET A`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Ret(u32),
    Computed,
}

/// Steps an exploration may take before it gives up (a program whose argument tests multiply its paths).
const BUDGET: usize = 200_000;

/// Every value `prog` may return for system call `nr` on x86-64, over all arguments and instruction pointers.
pub fn outcomes(prog: &[Insn], nr: u32) -> Result<BTreeSet<Outcome>, String> {
    let mut out = BTreeSet::new();
    let mut seen: BTreeSet<State> = BTreeSet::new();
    let mut todo = vec![State { pc: 0, a: V::K(0), x: V::K(0), m: [V::K(0); 16] }];
    let mut steps = 0;
    while let Some(mut s) = todo.pop() {
        loop {
            steps += 1;
            if steps > BUDGET {
                return Err("a program with too many paths to check".into());
            }
            let Some(&i) = prog.get(s.pc) else { return Err(format!("runs past its end at {}", s.pc)) };
            let bad = || format!("instruction {} (code {:#x}) is not one seccomp takes", s.pc, i.code);
            let next = s.pc + 1;
            match i.code & 0x07 {
                // BPF_LD / BPF_LDX
                0x00 | 0x01 => {
                    let v = match (i.code & 0xe0, i.code & 0x18) {
                        (0x00, _) => V::K(i.k),
                        (0x60, _) => *s.m.get(i.k as usize).ok_or_else(bad)?,
                        (0x80, 0x00) => V::K(64),
                        (0x20, 0x00) if i.code & 0x07 == 0x00 => match i.k {
                            0 => V::K(nr),
                            4 => V::K(AUDIT_ARCH_X86_64),
                            8..=60 if i.k % 4 == 0 => V::Any,
                            _ => return Err(bad()),
                        },
                        _ => return Err(bad()),
                    };
                    if i.code & 0x07 == 0x00 { s.a = v } else { s.x = v }
                    s.pc = next;
                }
                // BPF_ST / BPF_STX
                0x02 | 0x03 => {
                    let v = if i.code & 0x07 == 0x02 { s.a } else { s.x };
                    *s.m.get_mut(i.k as usize).ok_or_else(bad)? = v;
                    s.pc = next;
                }
                // BPF_ALU
                0x04 => {
                    let src = if i.code & 0x08 != 0 { s.x } else { V::K(i.k) };
                    let op = i.code & 0xf0;
                    if matches!(op, 0x30 | 0x90) {
                        // Division by X = 0: classic BPF returns 0 (kill the thread).
                        match src {
                            V::K(0) => {
                                out.insert(Outcome::Ret(RET_KILL_THREAD));
                                break;
                            }
                            V::Any => {
                                out.insert(Outcome::Ret(RET_KILL_THREAD));
                            }
                            V::K(_) => {}
                        }
                    }
                    s.a = match (s.a, src) {
                        (V::K(a), V::K(b)) => V::K(match op {
                            0x00 => a.wrapping_add(b),
                            0x10 => a.wrapping_sub(b),
                            0x20 => a.wrapping_mul(b),
                            0x30 => a / b,
                            0x40 => a | b,
                            0x50 => a & b,
                            0x60 => a.checked_shl(b).unwrap_or(0),
                            0x70 => a.checked_shr(b).unwrap_or(0),
                            0x80 => a.wrapping_neg(),
                            0x90 => a % b,
                            0xa0 => a ^ b,
                            _ => return Err(bad()),
                        }),
                        _ if op <= 0xa0 => V::Any,
                        _ => return Err(bad()),
                    };
                    s.pc = next;
                }
                // BPF_JMP
                0x05 => {
                    let op = i.code & 0xf0;
                    if op == 0x00 {
                        s.pc = next + i.k as usize;
                        continue;
                    }
                    let b = if i.code & 0x08 != 0 { s.x } else { V::K(i.k) };
                    let taken = match (s.a, b) {
                        (V::K(a), V::K(b)) => Some(match op {
                            0x10 => a == b,
                            0x20 => a > b,
                            0x30 => a >= b,
                            0x40 => a & b != 0,
                            _ => return Err(bad()),
                        }),
                        _ if matches!(op, 0x10..=0x40) => None,
                        _ => return Err(bad()),
                    };
                    let (t, f) = (next + i.jt as usize, next + i.jf as usize);
                    match taken {
                        Some(true) => s.pc = t,
                        Some(false) => s.pc = f,
                        None => {
                            let other = State { pc: f, ..s.clone() };
                            if seen.insert(other.clone()) {
                                todo.push(other);
                            }
                            s.pc = t;
                        }
                    }
                }
                // BPF_RET
                0x06 => {
                    out.insert(match (i.code & 0x18, s.a) {
                        (0x00, _) => Outcome::Ret(i.k),
                        (0x10, V::K(a)) => Outcome::Ret(a),
                        (0x10, V::Any) => Outcome::Computed,
                        _ => return Err(bad()),
                    });
                    break;
                }
                // BPF_MISC: TAX, TXA
                _ => {
                    match i.code {
                        0x07 => s.x = s.a,
                        0x87 => s.a = s.x,
                        _ => return Err(bad()),
                    }
                    s.pc = next;
                }
            }
        }
    }
    Ok(out)
}

/// What a return value does, in words.
pub fn describe(o: Outcome) -> String {
    match o {
        Outcome::Computed => "a return value computed from the call's arguments".into(),
        Outcome::Ret(r) => match r & ACTION_FULL {
            RET_KILL_PROCESS => "kill the process".into(),
            RET_KILL_THREAD => "kill the thread".into(),
            RET_TRAP => "send SIGSYS".into(),
            RET_ERRNO => format!("fail with errno {}", r & 0xffff),
            RET_USER_NOTIF => "wait for a user-space notifier".into(),
            RET_TRACE => "stop for a tracer".into(),
            RET_LOG => "allow (logged)".into(),
            RET_ALLOW => "allow".into(),
            a => format!("an unknown action {a:#x} (the kernel kills the process)"),
        },
    }
}

/// Whether a filter hands calls to a user-space notifier (SECCOMP_RET_USER_NOTIF): its listener lives outside
/// what a checkpoint captures. A return the program computes might be one.
pub fn notifies(prog: &[Insn]) -> bool {
    prog.iter().any(|i| match i.code {
        0x06 => i.k & ACTION_FULL == RET_USER_NOTIF,
        0x16 => true,
        _ => false,
    })
}

/// The first system call the shim needs that `prog` does not allow for every argument, with what it would do.
pub fn blocks_shim(prog: &[Insn]) -> Result<Option<(&'static str, Outcome)>, String> {
    for &(nr, name) in SHIM_SYSCALLS {
        let bad = outcomes(prog, nr)?.into_iter().find(|o| !matches!(o, Outcome::Ret(r) if matches!(r & ACTION_FULL, RET_ALLOW | RET_LOG)));
        if let Some(o) = bad {
            return Ok(Some((name.trim_start_matches("SYS_"), o)));
        }
    }
    Ok(None)
}

macro_rules! calls {
    ($($name:ident),* $(,)?) => { &[$((libc::$name as u32, stringify!($name))),*] };
}

/// System calls (number, `SYS_` name) the shim makes in a process whose filters are in force: in its signal handlers and checkpoint
/// thread at any checkpoint, and at the end of a restart, once the filters are installed again (the kernel's own
/// rt_sigreturn and restart_syscall too). `tests::every_call_of_the_shim_is_listed` keeps it complete.
pub const SHIM_SYSCALLS: &[(u32, &str)] = calls![
    SYS_arch_prctl, SYS_brk, SYS_capset, SYS_clock_gettime, SYS_clock_nanosleep, SYS_clone3, SYS_close, SYS_connect,
    SYS_exit, SYS_exit_group, SYS_fcntl, SYS_fstat, SYS_fsync, SYS_futex, SYS_get_robust_list, SYS_getdents64,
    SYS_getitimer, SYS_getpgid, SYS_getpid, SYS_getppid, SYS_getsid, SYS_gettid, SYS_ioctl, SYS_kill, SYS_lseek,
    SYS_madvise, SYS_memfd_create, SYS_mincore, SYS_mmap, SYS_mprotect, SYS_mremap, SYS_munmap, SYS_nanosleep,
    SYS_newfstatat, SYS_openat, SYS_prctl, SYS_pread64, SYS_prlimit64, SYS_read, SYS_readlinkat, SYS_recvmsg,
    SYS_restart_syscall, SYS_rseq, SYS_rt_sigaction, SYS_rt_sigprocmask, SYS_rt_sigqueueinfo, SYS_rt_sigreturn,
    SYS_rt_sigtimedwait, SYS_rt_tgsigqueueinfo, SYS_sendmsg, SYS_set_robust_list, SYS_set_tid_address,
    SYS_setitimer, SYS_setsockopt, SYS_sigaltstack, SYS_socket, SYS_sync_file_range, SYS_tgkill, SYS_timer_gettime,
    SYS_timer_settime, SYS_uname, SYS_userfaultfd, SYS_write, SYS_writev,
];

/// System calls the shim makes only while restoring a process, before its filters are installed again.
pub const BEFORE_FILTERS: &[(u32, &str)] = calls![
    SYS_capget, SYS_chdir, SYS_dup3, SYS_epoll_ctl, SYS_getgroups, SYS_getresuid, SYS_pidfd_open, SYS_seccomp,
    SYS_setfsgid, SYS_setfsuid, SYS_setgroups, SYS_setresgid, SYS_setresuid, SYS_timer_create, SYS_umask,
];

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::string::ToString;

    fn insn(code: u16, jt: u8, jf: u8, k: u32) -> Insn {
        Insn { code, jt, jf, k }
    }
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const JGE_K: u16 = 0x35;
    const RET_K: u16 = 0x06;

    /// What libseccomp makes for "mkdir fails with EPERM, everything else allowed", arch checked first.
    fn deny_mkdir() -> Vec<Insn> {
        vec![
            insn(LD_W_ABS, 0, 0, 4),
            insn(JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
            insn(RET_K, 0, 0, RET_KILL_PROCESS),
            insn(LD_W_ABS, 0, 0, 0),
            insn(JEQ_K, 0, 1, libc::SYS_mkdir as u32),
            insn(RET_K, 0, 0, RET_ERRNO | libc::EPERM as u32),
            insn(RET_K, 0, 0, RET_ALLOW),
        ]
    }

    #[test]
    fn a_filter_that_denies_mkdir() {
        let p = deny_mkdir();
        assert_eq!(outcomes(&p, libc::SYS_mkdir as u32).unwrap().into_iter().collect::<Vec<_>>(), [Outcome::Ret(RET_ERRNO | 1)]);
        assert_eq!(outcomes(&p, libc::SYS_read as u32).unwrap().into_iter().collect::<Vec<_>>(), [Outcome::Ret(RET_ALLOW)]);
        assert_eq!(blocks_shim(&p).unwrap(), None);
        assert!(!notifies(&p));
    }

    #[test]
    fn argument_tests_take_both_ways() {
        // socket(): allowed for AF_UNIX only (args[0] at offset 16), killed otherwise.
        let p = vec![
            insn(LD_W_ABS, 0, 0, 0),
            insn(JEQ_K, 0, 3, libc::SYS_socket as u32),
            insn(LD_W_ABS, 0, 0, 16),
            insn(JEQ_K, 1, 0, libc::AF_UNIX as u32),
            insn(RET_K, 0, 0, RET_KILL_THREAD),
            insn(RET_K, 0, 0, RET_ALLOW),
        ];
        let o = outcomes(&p, libc::SYS_socket as u32).unwrap();
        assert!(o.contains(&Outcome::Ret(RET_ALLOW)) && o.contains(&Outcome::Ret(RET_KILL_THREAD)));
        let (name, what) = blocks_shim(&p).unwrap().unwrap();
        assert_eq!((name, describe(what)), ("socket", "kill the thread".to_string()));
    }

    #[test]
    fn an_allow_list_without_the_shims_calls_is_refused() {
        let p = vec![insn(LD_W_ABS, 0, 0, 0), insn(JGE_K, 0, 1, 400), insn(RET_K, 0, 0, RET_ALLOW), insn(RET_K, 0, 0, RET_TRAP)];
        let (name, what) = blocks_shim(&p).unwrap().unwrap();
        assert!(!name.is_empty());
        assert_eq!(describe(what), "send SIGSYS");
        let notify = vec![insn(RET_K, 0, 0, RET_USER_NOTIF)];
        assert!(notifies(&notify));
        assert!(notifies(&[insn(0x16, 0, 0, 0)]));
    }

    #[test]
    fn malformed_programs_are_errors() {
        assert!(parse(&[0; 7]).is_err());
        assert!(outcomes(&[insn(LD_W_ABS, 0, 0, 2)], 0).is_err());
        assert!(outcomes(&[insn(LD_W_ABS, 0, 0, 0)], 0).is_err(), "runs past its end");
        let p = parse(&[6, 0, 0, 0, 0, 0, 0xff, 0x7f]).unwrap();
        assert_eq!(p, [insn(RET_K, 0, 0, RET_ALLOW)]);
    }

    /// Every system call the shim's code makes (directly, or through `vos::sys` and `vos::proto`) is one of the
    /// two lists: a new one must be put in its place, or a filter that kills it would go unnoticed.
    #[test]
    fn every_call_of_the_shim_is_listed() {
        use std::collections::{BTreeMap, BTreeSet};
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
        let words = |s: &str, prefix: &str| -> Vec<String> {
            let mut v = Vec::new();
            let mut rest = s;
            while let Some(i) = rest.find(prefix) {
                let after = &rest[i + prefix.len()..];
                let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
                let before_ok = i == 0 || !rest.as_bytes()[i - 1].is_ascii_alphanumeric() && rest.as_bytes()[i - 1] != b'_';
                if end > 0 && before_ok {
                    v.push(after[..end].to_string());
                }
                rest = &after[end..];
            }
            v
        };
        // vos::sys's functions and the system calls each makes.
        let sys = read(&root.join("common/src/sys.rs"));
        let mut by_fn: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut current = String::new();
        for line in sys.lines() {
            let l = line.trim_start();
            for p in ["pub fn ", "pub unsafe fn ", "fn "] {
                if let Some(r) = l.strip_prefix(p) {
                    current = r.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).next().unwrap().to_string();
                }
            }
            for w in words(line, "SYS_") {
                by_fn.entry(current.clone()).or_default().insert(w);
            }
        }
        by_fn.entry("clone3_thread".into()).or_default().insert("clone3".into());
        let mut used: BTreeSet<String> = BTreeSet::new();
        let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(root.join("shim/src")).unwrap().map(|e| e.unwrap().path()).collect();
        files.extend(["proto.rs", "hashring.rs", "pagemap.rs", "chunk.rs"].iter().map(|f| root.join("common/src").join(f)));
        for f in &files {
            let text = read(f);
            used.extend(words(&text, "SYS_"));
            for call in words(&text, "sys::").into_iter().chain(words(&text, "sys :: ")) {
                let called = by_fn.get(&call).cloned().unwrap_or_default();
                used.extend(called);
            }
        }
        let listed: BTreeSet<&str> = SHIM_SYSCALLS.iter().chain(BEFORE_FILTERS).map(|c| c.1.trim_start_matches("SYS_")).collect();
        let missing: Vec<&String> = used.iter().filter(|c| !listed.contains(c.as_str())).collect();
        assert!(missing.is_empty(), "system calls of the shim in neither list: {missing:?}");
        assert!(used.len() > 40, "the scan found only {used:?}");
    }
}
