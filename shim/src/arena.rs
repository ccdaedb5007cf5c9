//! The shim's own allocator: never glibc's malloc.
//!
//! An app thread parked at a checkpoint may hold glibc's malloc lock, so nothing the shim does on the checkpoint
//! path may call it. Allocation here is bump-only from mmap'ed arenas (raw syscalls):
//! - the *session* arena serves a checkpoint or a restart (the only times the shim allocates much); it is left
//!   out of the image and unmapped as a whole when the session ends;
//! - the *permanent* arena serves everything else (a few small buffers made at start-up).
//! Frees are no-ops; both uses are short-lived or tiny.

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use vos::sys;

const CHUNK: usize = 16 << 20;
const MAX_CHUNKS: usize = 256;

/// Page aligned: the session arena's bookkeeping changes while an image is written, so it is left out whole.
#[repr(C, align(4096))]
struct Arena {
    lock: AtomicBool,
    cur: AtomicUsize,
    end: AtomicUsize,
    /// (start, len) of every mapping this arena made, so a session can exclude and unmap them.
    chunks: [AtomicUsize; MAX_CHUNKS * 2],
    nchunks: AtomicUsize,
    name: &'static core::ffi::CStr,
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicUsize = AtomicUsize::new(0);

impl Arena {
    const fn new(name: &'static core::ffi::CStr) -> Arena {
        Arena {
            lock: AtomicBool::new(false),
            cur: AtomicUsize::new(0),
            end: AtomicUsize::new(0),
            chunks: [ZERO; MAX_CHUNKS * 2],
            nchunks: AtomicUsize::new(0),
            name,
        }
    }

    fn alloc(&self, layout: Layout) -> *mut u8 {
        while self.lock.swap(true, Ordering::Acquire) {
            core::hint::spin_loop();
        }
        let p = self.bump(layout);
        self.lock.store(false, Ordering::Release);
        p
    }

    fn bump(&self, layout: Layout) -> *mut u8 {
        let align = layout.align().max(16);
        let cur = (self.cur.load(Ordering::Relaxed) + align - 1) & !(align - 1);
        if cur != 0 && cur + layout.size() <= self.end.load(Ordering::Relaxed) {
            self.cur.store(cur + layout.size(), Ordering::Relaxed);
            return cur as *mut u8;
        }
        let n = self.nchunks.load(Ordering::Relaxed);
        if n == MAX_CHUNKS {
            return core::ptr::null_mut();
        }
        // Never a multiple of 2 MiB: the kernel would align the mapping and leave a hole above it (see `global`).
        let len = crate::global::no_huge_multiple((layout.size() + align).max(CHUNK).next_multiple_of(4096));
        // SAFETY: a fresh private anonymous mapping at an address the kernel picks.
        let Ok(base) = (unsafe {
            sys::mmap(0, len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0)
        }) else {
            return core::ptr::null_mut();
        };
        // A name of its own keeps the kernel from merging it with a neighbouring mapping of the app. Only the
        // session arena's starts with "vos-" (mappings so named never travel in an image; the permanent one must).
        const PR_SET_VMA: i32 = 0x53564d41;
        let _ = sys::prctl(PR_SET_VMA, 0, base, len, self.name.as_ptr() as usize);
        self.chunks[2 * n].store(base, Ordering::Relaxed);
        self.chunks[2 * n + 1].store(len, Ordering::Relaxed);
        self.nchunks.store(n + 1, Ordering::Relaxed);
        let p = (base + align - 1) & !(align - 1);
        self.cur.store(p + layout.size(), Ordering::Relaxed);
        self.end.store(base + len, Ordering::Relaxed);
        p as *mut u8
    }

    fn ranges(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.nchunks.load(Ordering::Acquire)).map(|i| {
            let s = self.chunks[2 * i].load(Ordering::Relaxed);
            (s, s + self.chunks[2 * i + 1].load(Ordering::Relaxed))
        })
    }

    /// Unmap everything. Only when nothing allocated from this arena is used any more.
    fn reset(&self) {
        for (s, e) in self.ranges() {
            // SAFETY: the caller guarantees no allocation from this arena is live.
            let _ = unsafe { sys::munmap(s, e - s) };
        }
        self.nchunks.store(0, Ordering::Release);
        self.cur.store(0, Ordering::Relaxed);
        self.end.store(0, Ordering::Relaxed);
    }
}

static PERMANENT: Arena = Arena::new(c"shim-heap");
static SESSION: Arena = Arena::new(c"vos-arena");
static IN_SESSION: AtomicBool = AtomicBool::new(false);

pub struct ShimAlloc;

// SAFETY: alloc returns memory aligned as asked and never handed out twice; dealloc never reuses memory.
unsafe impl GlobalAlloc for ShimAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if IN_SESSION.load(Ordering::Relaxed) { SESSION.alloc(layout) } else { PERMANENT.alloc(layout) }
    }
    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}

/// Start a session: until `end_session`, all of the shim's allocations come from the session arena. Only one
/// thread of the shim runs at a time during a session (the coordinator, or the restart code), app threads parked.
pub fn begin_session() {
    IN_SESSION.store(true, Ordering::SeqCst);
}

/// End a session and unmap its arena: nothing allocated during the session may be used afterwards.
pub fn end_session() {
    IN_SESSION.store(false, Ordering::SeqCst);
    SESSION.reset();
}

/// In a restored process: the session that was running when the image was taken (the checkpoint's own) left
/// its bookkeeping behind, but none of its memory (it was not stored). Forget it without unmapping.
pub fn forget_session() {
    SESSION.nchunks.store(0, Ordering::Release);
    SESSION.cur.store(0, Ordering::Relaxed);
    SESSION.end.store(0, Ordering::Relaxed);
    SESSION.lock.store(false, Ordering::Release);
    IN_SESSION.store(false, Ordering::SeqCst);
}

/// Where the session arena's bookkeeping lives (left out of images; `forget_session` resets it after restore).
pub fn session_state() -> (u64, u64) {
    let s = &SESSION as *const Arena as u64;
    (s, s + core::mem::size_of::<Arena>() as u64)
}

/// Address ranges of the session arena (left out of images).
pub fn session_ranges() -> impl Iterator<Item = (usize, usize)> {
    SESSION.ranges()
}

/// Run `f` with allocations going to the permanent arena (for values that must outlive the session).
pub fn permanent<R>(f: impl FnOnce() -> R) -> R {
    let was = IN_SESSION.swap(false, Ordering::SeqCst);
    let r = f();
    IN_SESSION.store(was, Ordering::SeqCst);
    r
}
