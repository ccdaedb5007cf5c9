//! Raw Linux syscalls and the little assembly vOS needs, in one place.
//!
//! The shim lives inside other people's programs: its own I/O must never go through libc (it would re-enter the
//! shim's hooks, touch errno and take libc locks that a parked thread may hold). The restorer has no libc at all.
//! Both use only what is here. x86-64 only.

use core::arch::{asm, global_asm};

pub use libc::{c_int, c_long, c_void};

/// A kernel error number.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const EINTR: Errno = Errno(libc::EINTR);
    pub const EAGAIN: Errno = Errno(libc::EAGAIN);
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const ESRCH: Errno = Errno(libc::ESRCH);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const EACCES: Errno = Errno(libc::EACCES);
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const ETIMEDOUT: Errno = Errno(libc::ETIMEDOUT);

    /// The symbolic name, for messages that work without libc's strerror.
    pub fn name(self) -> &'static str {
        match self.0 {
            libc::EPERM => "EPERM",
            libc::ENOENT => "ENOENT",
            libc::ESRCH => "ESRCH",
            libc::EINTR => "EINTR",
            libc::EIO => "EIO",
            libc::EBADF => "EBADF",
            libc::EAGAIN => "EAGAIN",
            libc::ENOMEM => "ENOMEM",
            libc::EACCES => "EACCES",
            libc::EFAULT => "EFAULT",
            libc::EBUSY => "EBUSY",
            libc::EEXIST => "EEXIST",
            libc::ENOTDIR => "ENOTDIR",
            libc::EISDIR => "EISDIR",
            libc::EINVAL => "EINVAL",
            libc::EMFILE => "EMFILE",
            libc::ENOSPC => "ENOSPC",
            libc::EPIPE => "EPIPE",
            libc::ENOSYS => "ENOSYS",
            libc::ECONNREFUSED => "ECONNREFUSED",
            libc::ETIMEDOUT => "ETIMEDOUT",
            libc::ENOTTY => "ENOTTY",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            _ => "errno",
        }
    }
}

impl core::fmt::Debug for Errno {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

impl core::fmt::Display for Errno {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Debug::fmt(self, f)
    }
}

pub type Res<T = usize> = Result<T, Errno>;

#[inline(always)]
fn check(r: isize) -> Res {
    if (-4095..0).contains(&r) { Err(Errno(-r as i32)) } else { Ok(r as usize) }
}

/// Issue syscall `nr` with up to six arguments.
///
/// # Safety
/// The caller guarantees the arguments are valid for that syscall (pointers point where the kernel expects).
#[inline(always)]
pub unsafe fn syscall6(nr: c_long, a: usize, b: usize, c: usize, d: usize, e: usize, f: usize) -> isize {
    let r: isize;
    // SAFETY: the syscall instruction clobbers only rax, rcx, r11 (declared); memory effects are the caller's contract.
    unsafe {
        asm!("syscall", inlateout("rax") nr as isize => r, in("rdi") a, in("rsi") b, in("rdx") c,
             in("r10") d, in("r8") e, in("r9") f, lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    r
}

macro_rules! sc {
    ($nr:expr) => { sc!($nr, 0, 0, 0, 0, 0, 0) };
    ($nr:expr, $a:expr) => { sc!($nr, $a, 0, 0, 0, 0, 0) };
    ($nr:expr, $a:expr, $b:expr) => { sc!($nr, $a, $b, 0, 0, 0, 0) };
    ($nr:expr, $a:expr, $b:expr, $c:expr) => { sc!($nr, $a, $b, $c, 0, 0, 0) };
    ($nr:expr, $a:expr, $b:expr, $c:expr, $d:expr) => { sc!($nr, $a, $b, $c, $d, 0, 0) };
    ($nr:expr, $a:expr, $b:expr, $c:expr, $d:expr, $e:expr) => { sc!($nr, $a, $b, $c, $d, $e, 0) };
    ($nr:expr, $a:expr, $b:expr, $c:expr, $d:expr, $e:expr, $f:expr) => {
        // SAFETY: each wrapper below passes arguments of the types the kernel documents for that syscall.
        check(unsafe { syscall6($nr, $a as usize, $b as usize, $c as usize, $d as usize, $e as usize, $f as usize) })
    };
}

// ---- files -------------------------------------------------------------------------------------------------

pub fn read(fd: i32, buf: &mut [u8]) -> Res {
    sc!(libc::SYS_read, fd, buf.as_mut_ptr(), buf.len())
}
/// # Safety
/// `ptr..ptr+len` must be writable memory.
pub unsafe fn read_raw(fd: i32, ptr: *mut u8, len: usize) -> Res {
    sc!(libc::SYS_read, fd, ptr, len)
}
pub fn pread(fd: i32, buf: &mut [u8], off: u64) -> Res {
    sc!(libc::SYS_pread64, fd, buf.as_mut_ptr(), buf.len(), off)
}
pub fn write(fd: i32, buf: &[u8]) -> Res {
    sc!(libc::SYS_write, fd, buf.as_ptr(), buf.len())
}
/// # Safety
/// `iov` must describe readable memory.
pub unsafe fn writev(fd: i32, iov: &[libc::iovec]) -> Res {
    sc!(libc::SYS_writev, fd, iov.as_ptr(), iov.len())
}
/// Open a NUL-terminated path.
pub fn open(path: &[u8], flags: i32, mode: u32) -> Res<i32> {
    debug_assert!(path.last() == Some(&0));
    sc!(libc::SYS_openat, libc::AT_FDCWD, path.as_ptr(), flags | libc::O_CLOEXEC, mode).map(|f| f as i32)
}
pub fn close(fd: i32) -> Res {
    sc!(libc::SYS_close, fd)
}
pub fn lseek(fd: i32, off: i64, whence: i32) -> Res<u64> {
    sc!(libc::SYS_lseek, fd, off, whence).map(|o| o as u64)
}
pub fn dup3(old: i32, new: i32, flags: i32) -> Res<i32> {
    sc!(libc::SYS_dup3, old, new, flags).map(|f| f as i32)
}
pub fn fcntl(fd: i32, cmd: i32, arg: usize) -> Res {
    sc!(libc::SYS_fcntl, fd, cmd, arg)
}
pub fn readlink(path: &[u8], buf: &mut [u8]) -> Res {
    sc!(libc::SYS_readlinkat, libc::AT_FDCWD, path.as_ptr(), buf.as_mut_ptr(), buf.len())
}
pub fn getdents64(fd: i32, buf: &mut [u8]) -> Res {
    sc!(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len())
}
pub fn fstat(fd: i32) -> Res<libc::stat> {
    // SAFETY: stat is plain old data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    sc!(libc::SYS_fstat, fd, &mut st as *mut libc::stat)?;
    Ok(st)
}
pub fn stat(path: &[u8]) -> Res<libc::stat> {
    // SAFETY: stat is plain old data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    sc!(libc::SYS_newfstatat, libc::AT_FDCWD, path.as_ptr(), &mut st as *mut libc::stat, 0)?;
    Ok(st)
}
pub fn fsync(fd: i32) -> Res {
    sc!(libc::SYS_fsync, fd)
}
pub fn chdir(path: &[u8]) -> Res {
    sc!(libc::SYS_chdir, path.as_ptr())
}
pub fn umask(mask: u32) -> u32 {
    sc!(libc::SYS_umask, mask).unwrap_or(0) as u32
}
pub fn ioctl(fd: i32, req: u64, arg: usize) -> Res {
    sc!(libc::SYS_ioctl, fd, req, arg)
}
pub fn kcmp_file(pid1: i32, pid2: i32, fd1: i32, fd2: i32) -> Res {
    const KCMP_FILE: usize = 0;
    sc!(libc::SYS_kcmp, pid1, pid2, KCMP_FILE, fd1, fd2)
}

// ---- userfaultfd: write tracking for pre-copy (shim), missing pages filled after a migration (restorer) ----

pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// What a filler of missing pages must hear of (as events, each holding the app until read): a fork's child
/// (it gets a userfaultfd of its own, else its missing pages would read as zeros), mremap (the pages move),
/// madvise(DONTNEED) and munmap (the pages must stay zeros, or are gone).
pub const UFFD_FEATURES_FILL: u64 = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 6);
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;
pub const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;
/// struct uffdio_copy (dst, src, len, mode, copy) and struct uffdio_range (start, len).
pub const UFFDIO_COPY: u64 = 0xc028_aa03;
pub const UFFDIO_WAKE: u64 = 0x8010_aa02;
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_API: u64 = 0xAA;
const UFFDIO_API: u64 = 0xc018_aa3f;
const UFFDIO_REGISTER: u64 = 0xc020_aa00;

/// A userfaultfd (close-on-exec, and `flags`) with the API handshake done for `features`.
pub fn userfaultfd(flags: i32, features: u64) -> Res<i32> {
    let fd = sc!(libc::SYS_userfaultfd, libc::O_CLOEXEC | flags)? as i32;
    let mut api = [UFFD_API, features, 0];
    if let Err(e) = ioctl(fd, UFFDIO_API, api.as_mut_ptr() as usize) {
        let _ = close(fd);
        return Err(e);
    }
    Ok(fd)
}

/// Register [start, start + len) with userfaultfd `fd` in `mode`.
pub fn uffd_register(fd: i32, start: u64, len: u64, mode: u64) -> Res {
    let mut reg = [start, len, mode, 0];
    ioctl(fd, UFFDIO_REGISTER, reg.as_mut_ptr() as usize)
}

// ---- memory ------------------------------------------------------------------------------------------------

/// # Safety
/// A MAP_FIXED mapping replaces whatever was at `addr`; the caller owns that range.
pub unsafe fn mmap(addr: usize, len: usize, prot: i32, flags: i32, fd: i32, off: u64) -> Res {
    sc!(libc::SYS_mmap, addr, len, prot, flags, fd, off)
}
/// # Safety
/// Nothing may still use the range.
pub unsafe fn munmap(addr: usize, len: usize) -> Res {
    sc!(libc::SYS_munmap, addr, len)
}
/// # Safety
/// Nothing may rely on the old protection of the range.
pub unsafe fn mprotect(addr: usize, len: usize, prot: i32) -> Res {
    sc!(libc::SYS_mprotect, addr, len, prot)
}
/// # Safety
/// The range at `addr` (non-zero) must be free: the segment is attached there.
pub unsafe fn shmat(shmid: i32, addr: usize, flags: i32) -> Res {
    sc!(libc::SYS_shmat, shmid, addr, flags)
}
/// # Safety
/// As for munmap and mmap: the old range is gone and the new one replaces what was there.
pub unsafe fn mremap(old: usize, old_len: usize, new_len: usize, flags: i32, new: usize) -> Res {
    sc!(libc::SYS_mremap, old, old_len, new_len, flags, new)
}
/// # Safety
/// Some advice (MADV_DONTNEED) discards memory contents.
pub unsafe fn madvise(addr: usize, len: usize, advice: i32) -> Res {
    sc!(libc::SYS_madvise, addr, len, advice)
}
pub fn brk(addr: usize) -> usize {
    sc!(libc::SYS_brk, addr).unwrap_or(0)
}

// ---- processes and threads ---------------------------------------------------------------------------------

pub fn getpid() -> i32 {
    sc!(libc::SYS_getpid).unwrap_or(0) as i32
}
pub fn getppid() -> i32 {
    sc!(libc::SYS_getppid).unwrap_or(0) as i32
}
pub fn gettid() -> i32 {
    sc!(libc::SYS_gettid).unwrap_or(0) as i32
}
pub fn exit_thread(code: i32) -> ! {
    loop {
        let _ = sc!(libc::SYS_exit, code);
    }
}
pub fn exit_group(code: i32) -> ! {
    loop {
        let _ = sc!(libc::SYS_exit_group, code);
    }
}
pub fn prctl(op: i32, a: usize, b: usize, c: usize, d: usize) -> Res {
    sc!(libc::SYS_prctl, op, a, b, c, d)
}
pub fn arch_prctl(op: i32, addr: usize) -> Res {
    sc!(libc::SYS_arch_prctl, op, addr)
}
pub const ARCH_SET_FS: i32 = 0x1002;
pub const ARCH_GET_FS: i32 = 0x1003;
/// Map a fresh vvar+vdso block at an address (the old one must be gone).
pub const ARCH_MAP_VDSO_64: i32 = 0x2003;

pub fn get_fs_base() -> usize {
    let mut v: usize = 0;
    let _ = arch_prctl(ARCH_GET_FS, &mut v as *mut usize as usize);
    v
}
pub fn set_tid_address(addr: usize) -> Res {
    sc!(libc::SYS_set_tid_address, addr)
}
pub fn set_robust_list(head: usize, len: usize) -> Res {
    sc!(libc::SYS_set_robust_list, head, len)
}
pub fn get_robust_list() -> Res<(usize, usize)> {
    let (mut head, mut len) = (0usize, 0usize);
    sc!(libc::SYS_get_robust_list, 0, &mut head as *mut usize, &mut len as *mut usize)?;
    Ok((head, len))
}
pub fn rseq(area: usize, len: u32, flags: i32, sig: u32) -> Res {
    sc!(libc::SYS_rseq, area, len, flags, sig)
}
pub fn prlimit(resource: u32, new: Option<&libc::rlimit64>) -> Res<libc::rlimit64> {
    let mut old = libc::rlimit64 { rlim_cur: 0, rlim_max: 0 };
    let newp = new.map_or(core::ptr::null(), |n| n as *const libc::rlimit64);
    sc!(libc::SYS_prlimit64, 0, resource, newp, &mut old as *mut libc::rlimit64)?;
    Ok(old)
}
pub fn sethostname(name: &[u8]) -> Res {
    sc!(libc::SYS_sethostname, name.as_ptr(), name.len())
}
pub fn clock_gettime(clock: i32) -> libc::timespec {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    let _ = sc!(libc::SYS_clock_gettime, clock, &mut ts as *mut libc::timespec);
    ts
}
pub fn now_ns(clock: i32) -> u64 {
    let ts = clock_gettime(clock);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
pub fn nanosleep_ns(ns: u64) {
    let ts = libc::timespec { tv_sec: (ns / 1_000_000_000) as i64, tv_nsec: (ns % 1_000_000_000) as i64 };
    let _ = sc!(libc::SYS_nanosleep, &ts as *const libc::timespec, 0);
}

// ---- signals -----------------------------------------------------------------------------------------------

/// The kernel's `struct sigaction` (not glibc's: the kernel mask is 64 bits).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KSigaction {
    pub handler: usize,
    pub flags: u64,
    pub restorer: usize,
    pub mask: u64,
}

pub fn rt_sigaction(sig: i32, new: Option<&KSigaction>) -> Res<KSigaction> {
    let mut old = KSigaction::default();
    let newp = new.map_or(core::ptr::null(), |n| n as *const KSigaction);
    sc!(libc::SYS_rt_sigaction, sig, newp, &mut old as *mut KSigaction, 8)?;
    Ok(old)
}
/// Change this thread's signal mask; returns the old one.
pub fn sigprocmask(how: i32, set: Option<u64>) -> u64 {
    let mut old: u64 = 0;
    let setp = set.as_ref().map_or(core::ptr::null(), |s| s as *const u64);
    let _ = sc!(libc::SYS_rt_sigprocmask, how, setp, &mut old as *mut u64, 8);
    old
}
/// The raw 128-byte siginfo.
pub type SigInfo = [u8; 128];
/// Dequeue one pending signal out of `set` without waiting.
pub fn sigtimedwait_now(set: u64, info: &mut SigInfo) -> Res<i32> {
    let ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    sc!(libc::SYS_rt_sigtimedwait, &set as *const u64, info.as_mut_ptr(), &ts as *const libc::timespec, 8)
        .map(|s| s as i32)
}
pub fn tgkill(tgid: i32, tid: i32, sig: i32) -> Res {
    sc!(libc::SYS_tgkill, tgid, tid, sig)
}
pub fn kill(pid: i32, sig: i32) -> Res {
    sc!(libc::SYS_kill, pid, sig)
}
pub fn rt_tgsigqueueinfo(tgid: i32, tid: i32, sig: i32, info: &SigInfo) -> Res {
    sc!(libc::SYS_rt_tgsigqueueinfo, tgid, tid, sig, info.as_ptr())
}
pub fn rt_sigqueueinfo(pid: i32, sig: i32, info: &SigInfo) -> Res {
    sc!(libc::SYS_rt_sigqueueinfo, pid, sig, info.as_ptr())
}
pub fn sigaltstack(new: Option<&libc::stack_t>) -> Res<libc::stack_t> {
    let mut old = libc::stack_t { ss_sp: core::ptr::null_mut(), ss_flags: 0, ss_size: 0 };
    let newp = new.map_or(core::ptr::null(), |n| n as *const libc::stack_t);
    sc!(libc::SYS_sigaltstack, newp, &mut old as *mut libc::stack_t)?;
    Ok(old)
}
pub const fn sigbit(sig: i32) -> u64 {
    1u64 << (sig - 1)
}

// ---- futexes -----------------------------------------------------------------------------------------------

/// Sleep while `*word == val` (or until `timeout_ns` passes, when given). Spurious wake-ups are possible.
pub fn futex_wait(word: &core::sync::atomic::AtomicU32, val: u32, timeout_ns: Option<u64>) -> Res {
    let ts = timeout_ns.map(|ns| libc::timespec { tv_sec: (ns / 1_000_000_000) as i64, tv_nsec: (ns % 1_000_000_000) as i64 });
    let tsp = ts.as_ref().map_or(core::ptr::null(), |t| t as *const libc::timespec);
    // Not FUTEX_PRIVATE: the restorer and init share futex words across processes only through shared memory.
    sc!(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT, val, tsp, 0, 0)
}
pub fn futex_wake(word: &core::sync::atomic::AtomicU32, n: u32) -> Res {
    sc!(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, n, 0, 0, 0)
}

// ---- sockets -----------------------------------------------------------------------------------------------

pub fn socket(domain: i32, ty: i32, proto: i32) -> Res<i32> {
    sc!(libc::SYS_socket, domain, ty | libc::SOCK_CLOEXEC, proto).map(|f| f as i32)
}
/// # Safety
/// `addr` must point to `len` bytes of a socket address.
pub unsafe fn connect(fd: i32, addr: *const libc::sockaddr, len: u32) -> Res {
    sc!(libc::SYS_connect, fd, addr, len)
}
/// # Safety
/// `msg` must describe valid buffers.
pub unsafe fn sendmsg(fd: i32, msg: &libc::msghdr, flags: i32) -> Res {
    sc!(libc::SYS_sendmsg, fd, msg as *const libc::msghdr, flags)
}
/// # Safety
/// `msg` must describe valid, writable buffers.
pub unsafe fn recvmsg(fd: i32, msg: &mut libc::msghdr, flags: i32) -> Res {
    sc!(libc::SYS_recvmsg, fd, msg as *mut libc::msghdr, flags)
}

// ---- assembly ----------------------------------------------------------------------------------------------

/// `clone3` arguments (kernel ABI, version 2 with `set_tid`).
#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

/// Flags of a thread exactly as glibc's pthread_create makes it.
pub const THREAD_FLAGS: u64 = (libc::CLONE_VM | libc::CLONE_FS | libc::CLONE_FILES | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD | libc::CLONE_SYSVSEM | libc::CLONE_SETTLS | libc::CLONE_CHILD_CLEARTID) as u64;

unsafe extern "C" {
    fn vos_clone3_thread(args: *const CloneArgs, size: usize, f: extern "C" fn(usize) -> !, arg: usize) -> isize;
    fn vos_save_and_call(rsp_out: *mut usize, f: extern "C" fn(usize), arg: usize);
    fn vos_resume_and_call(rsp: usize, f: extern "C" fn(usize), arg: usize) -> !;
    fn vos_jump(entry: usize, stack_top: usize, a: usize, b: usize, c: usize) -> !;
}

// The child of clone3 starts on the new stack with no return address: it must not return into Rust code
// that expects the parent's frame, so the child path is pure assembly that calls `f(arg)` (never returns).
global_asm!(
    ".globl vos_clone3_thread",
    ".type vos_clone3_thread,@function",
    "vos_clone3_thread:",
    "  mov r8, rdx",          // f
    "  mov r9, rcx",          // arg
    "  mov eax, 435",         // SYS_clone3
    "  syscall",
    "  test rax, rax",
    "  jnz 2f",
    "  xor ebp, ebp",
    "  and rsp, -16",
    "  mov rdi, r9",
    "  call r8",
    "  ud2",
    "2:",
    "  ret",
    // vos_save_and_call(rsp_out, f, arg): push the callee-saved registers, store the stack pointer in *rsp_out,
    // call f(arg), then return normally. vos_resume_and_call(rsp, f, arg) re-enters that frame on a recreated
    // thread: it calls f(arg) on the saved stack and returns to vos_save_and_call's caller. The compiler sees an
    // ordinary call that returns once, so no returns-twice hazards.
    ".globl vos_save_and_call",
    ".type vos_save_and_call,@function",
    "vos_save_and_call:",
    "  push rbp",
    "  push rbx",
    "  push r12",
    "  push r13",
    "  push r14",
    "  push r15",
    "  sub rsp, 8",
    "  mov [rdi], rsp",
    "  mov rdi, rdx",
    "  call rsi",
    "3:",
    "  add rsp, 8",
    "  pop r15",
    "  pop r14",
    "  pop r13",
    "  pop r12",
    "  pop rbx",
    "  pop rbp",
    "  ret",
    ".globl vos_resume_and_call",
    ".type vos_resume_and_call,@function",
    "vos_resume_and_call:",
    "  mov rsp, rdi",
    "  mov rdi, rdx",
    "  call rsi",
    "  jmp 3b",
    // vos_jump(entry, stack_top, a, b, c): switch to a new stack and call entry(a, b, c), never to return.
    ".globl vos_jump",
    ".type vos_jump,@function",
    "vos_jump:",
    "  mov rsp, rsi",
    "  and rsp, -16",
    "  mov rax, rdi",
    "  mov rdi, rdx",
    "  mov rsi, rcx",
    "  mov rdx, r8",
    "  xor ebp, ebp",
    "  call rax",
    "  ud2",
);

/// Start a thread with `clone3`; in the child `f(arg)` runs on `args.stack` and must never return.
/// Returns the child's tid in the parent.
///
/// # Safety
/// `args` must describe a valid stack and TLS for a thread that only runs `f`.
pub unsafe fn clone3_thread(args: &CloneArgs, f: extern "C" fn(usize) -> !, arg: usize) -> Res<i32> {
    // SAFETY: forwarded contract; the assembly passes args to the kernel unchanged.
    check(unsafe { vos_clone3_thread(args, core::mem::size_of::<CloneArgs>(), f, arg) }).map(|t| t as i32)
}

/// Save this thread's callee-saved registers on its stack, record the stack pointer in `*rsp_out`, and call
/// `f(arg)`. A thread recreated at restore continues from the same point with [`resume_and_call`].
///
/// # Safety
/// `rsp_out` must be writable; `f` must not unwind.
pub unsafe fn save_and_call(rsp_out: *mut usize, f: extern "C" fn(usize), arg: usize) {
    // SAFETY: the assembly is an ordinary call frame around f.
    unsafe { vos_save_and_call(rsp_out, f, arg) }
}

/// Continue a frame saved by [`save_and_call`]: call `f(arg)` on that stack, then return from the original
/// `save_and_call`.
///
/// # Safety
/// `rsp` must be a value recorded by `save_and_call` whose stack memory is intact and not otherwise in use.
pub unsafe fn resume_and_call(rsp: usize, f: extern "C" fn(usize), arg: usize) -> ! {
    // SAFETY: forwarded contract.
    unsafe { vos_resume_and_call(rsp, f, arg) }
}

/// Switch to `stack_top` and call `entry(a, b, c)`; never returns.
///
/// # Safety
/// `entry` must be a function of that signature that never returns; the stack must be usable.
pub unsafe fn jump(entry: usize, stack_top: usize, a: usize, b: usize, c: usize) -> ! {
    // SAFETY: forwarded contract.
    unsafe { vos_jump(entry, stack_top, a, b, c) }
}

/// Defines the `_start` of a freestanding binary: switch to `$stack` (a static of `$size` bytes) and call
/// `$main(initial_sp)`, where `initial_sp` points at argc, argv, envp, auxv as the kernel left them.
#[macro_export]
macro_rules! freestanding_start {
    ($stack:path, $size:expr, $main:path) => {
        core::arch::global_asm!(
            ".globl _start",
            "_start:",
            "  mov rdi, rsp",
            "  lea rsp, [rip + {stack}]",
            "  add rsp, {size}",
            "  and rsp, -16",
            "  xor ebp, ebp",
            "  call {main}",
            "  ud2",
            stack = sym $stack,
            size = const $size,
            main = sym $main,
        );
    };
}
