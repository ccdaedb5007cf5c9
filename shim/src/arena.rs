//! The shim's own allocator: never glibc's malloc.
//!
//! An app thread parked at a checkpoint may hold glibc's malloc lock, so nothing the shim does on the checkpoint
//! path may call it. Allocation here is bump-only from mmap'ed arenas (raw syscalls):
//! - the *session* arena serves a checkpoint or a restart (the only times the shim allocates much); it is left
//!   out of the image and unmapped as a whole when the session ends;
//! - the *permanent* arena serves everything else (a few small buffers made at start-up).
//!
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

impl Arena {
    const fn new(name: &'static core::ffi::CStr) -> Arena {
        Arena {
            lock: AtomicBool::new(false),
            cur: AtomicUsize::new(0),
            end: AtomicUsize::new(0),
            chunks: [const { AtomicUsize::new(0) }; MAX_CHUNKS * 2],
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
        // Never a multiple of 2 MiB: the kernel would align the mapping and leave a hole above it (see `state`).
        let len = crate::state::no_huge_multiple((layout.size() + align).max(CHUNK).next_multiple_of(4096));
        let Some(base) = window_chunk(self, len).or_else(|| {
            // SAFETY: a fresh private anonymous mapping at an address the kernel picks.
            unsafe { sys::mmap(0, len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0) }.ok()
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

    /// Unmap everything (what lay in the restorer's window is reserved again). Only when nothing allocated from this
    /// arena is used any more.
    fn reset(&self) {
        for (s, e) in self.ranges() {
            if in_window(s) {
                // SAFETY: as below; an inaccessible reservation replaces the chunk.
                let _ = unsafe {
                    sys::mmap(s, e - s, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED, -1, 0)
                };
                continue;
            }
            // SAFETY: the caller guarantees no allocation from this arena is live.
            let _ = unsafe { sys::munmap(s, e - s) };
        }
        WINDOW_USED.store(0, Ordering::Relaxed);
        self.nchunks.store(0, Ordering::Release);
        self.cur.store(0, Ordering::Relaxed);
        self.end.store(0, Ordering::Relaxed);
    }
}

static PERMANENT: Arena = Arena::new(c"shim-heap");
static SESSION: Arena = Arena::new(c"vos-arena");
static IN_SESSION: AtomicBool = AtomicBool::new(false);

/// A checkpoint's session takes its chunks from the restorer's window first: reserved in every process and never in
/// an image, nothing there changes the app's address space (a chunk the kernel placed could land just below a
/// stack the app grows down, at the edge of its guard gap, and stop it growing until the checkpoint ended). A
/// restart's session cannot: the restorer still runs there.
static SESSION_IN_WINDOW: AtomicBool = AtomicBool::new(false);
/// Bytes of the window the session's chunks take.
static WINDOW_USED: AtomicUsize = AtomicUsize::new(0);

fn in_window(addr: usize) -> bool {
    (vos::plan::WINDOW_START..vos::plan::WINDOW_END).contains(&(addr as u64))
}

/// A chunk of `len` bytes in the restorer's window, for the session arena of a checkpoint, while there is room.
fn window_chunk(arena: &Arena, len: usize) -> Option<usize> {
    if !core::ptr::eq(arena, &SESSION)
        || !SESSION_IN_WINDOW.load(Ordering::Relaxed)
        || !crate::window::WINDOW_RESERVED.load(Ordering::Relaxed)
    {
        return None;
    }
    let used = WINDOW_USED.load(Ordering::Relaxed);
    if used + len > vos::plan::WINDOW_LEN as usize {
        return None;
    }
    let at = vos::plan::WINDOW_START as usize + used;
    // SAFETY: the window is the shim's own reservation; nothing else of the process is there during a checkpoint.
    let r = unsafe {
        sys::mmap(at, len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED, -1, 0)
    };
    let base = r.ok().filter(|&b| b == at)?;
    WINDOW_USED.store(used + len, Ordering::Relaxed);
    Some(base)
}

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
/// `in_window`: a checkpoint's session, whose chunks go in the restorer's window first.
pub fn begin_session(in_window: bool) {
    SESSION_IN_WINDOW.store(in_window, Ordering::SeqCst);
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
    WINDOW_USED.store(0, Ordering::Relaxed);
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
