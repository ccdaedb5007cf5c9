//! The real libc functions behind the shim's hooks, resolved once in the constructor with dlsym(RTLD_NEXT)
//! (a lookup mallocs, so never lazily inside a hook, except when a hook runs before the constructor).

use core::sync::atomic::{AtomicUsize, Ordering};
use libc::{c_char, c_int};

macro_rules! real_fns {
    ($($name:ident: fn($($arg:ty),*) -> $ret:ty;)*) => {
        #[allow(non_upper_case_globals, reason = "each slot is named after its libc function")]
        mod slot {
            use core::sync::atomic::AtomicUsize;
            $(pub static $name: AtomicUsize = AtomicUsize::new(0);)*
        }
        /// Resolve every real function.
        pub fn resolve() {
            $(lookup(&slot::$name, concat!(stringify!($name), "\0"));)*
        }
        $(
            /// The real function of that name.
            pub fn $name() -> unsafe extern "C" fn($($arg),*) -> $ret {
                let mut p = slot::$name.load(Ordering::Relaxed);
                if p == 0 {
                    p = lookup(&slot::$name, concat!(stringify!($name), "\0"));
                }
                // SAFETY: dlsym returned libc's function of this name, whose C signature is declared above.
                unsafe { core::mem::transmute::<usize, unsafe extern "C" fn($($arg),*) -> $ret>(p) }
            }
        )*
    };
}

fn lookup(slot: &AtomicUsize, name: &str) -> usize {
    // SAFETY: name is NUL-terminated; RTLD_NEXT finds the definition after the shim (libc's).
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr() as *const libc::c_char) } as usize;
    if p == 0 {
        crate::log::line(format_args!("libc has no {}", name.trim_end_matches('\0')));
        vos::sys::exit_group(127);
    }
    slot.store(p, Ordering::Relaxed);
    p
}

type Sigset = libc::sigset_t;

real_fns! {
    sigaction: fn(c_int, *const libc::sigaction, *mut libc::sigaction) -> c_int;
    sigprocmask: fn(c_int, *const Sigset, *mut Sigset) -> c_int;
    pthread_sigmask: fn(c_int, *const Sigset, *mut Sigset) -> c_int;
    sigsuspend: fn(*const Sigset) -> c_int;
    sigwaitinfo: fn(*const Sigset, *mut libc::siginfo_t) -> c_int;
    sigtimedwait: fn(*const Sigset, *mut libc::siginfo_t, *const libc::timespec) -> c_int;
    sigwait: fn(*const Sigset, *mut c_int) -> c_int;
    nanosleep: fn(*const libc::timespec, *mut libc::timespec) -> c_int;
    clock_nanosleep: fn(libc::clockid_t, c_int, *const libc::timespec, *mut libc::timespec) -> c_int;
    poll: fn(*mut libc::pollfd, libc::nfds_t, c_int) -> c_int;
    ppoll: fn(*mut libc::pollfd, libc::nfds_t, *const libc::timespec, *const Sigset) -> c_int;
    select: fn(c_int, *mut libc::fd_set, *mut libc::fd_set, *mut libc::fd_set, *mut libc::timeval) -> c_int;
    pselect: fn(c_int, *mut libc::fd_set, *mut libc::fd_set, *mut libc::fd_set, *const libc::timespec, *const Sigset) -> c_int;
    epoll_wait: fn(c_int, *mut libc::epoll_event, c_int, c_int) -> c_int;
    epoll_pwait: fn(c_int, *mut libc::epoll_event, c_int, c_int, *const Sigset) -> c_int;
    pause: fn() -> c_int;
    execve: fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int;
    execvpe: fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int;
    fexecve: fn(c_int, *const *const c_char, *const *const c_char) -> c_int;
    execveat: fn(c_int, *const c_char, *const *const c_char, *const *const c_char, c_int) -> c_int;
    posix_spawn: fn(*mut libc::pid_t, *const c_char, *const libc::posix_spawn_file_actions_t, *const libc::posix_spawnattr_t, *const *const c_char, *const *const c_char) -> c_int;
    posix_spawnp: fn(*mut libc::pid_t, *const c_char, *const libc::posix_spawn_file_actions_t, *const libc::posix_spawnattr_t, *const *const c_char, *const *const c_char) -> c_int;
    system: fn(*const c_char) -> c_int;
    popen: fn(*const c_char, *const c_char) -> *mut libc::FILE;
    fork: fn() -> libc::pid_t;
    inotify_add_watch: fn(c_int, *const c_char, u32) -> c_int;
    inotify_rm_watch: fn(c_int, c_int) -> c_int;
    clock_gettime: fn(libc::clockid_t, *mut libc::timespec) -> c_int;
    timer_create: fn(libc::clockid_t, *mut libc::sigevent, *mut libc::timer_t) -> c_int;
    timer_delete: fn(libc::timer_t) -> c_int;
}
