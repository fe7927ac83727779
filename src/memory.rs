//! How the process keeps memory it has freed.
//!
//! Every reconcile pass builds two [`crate::state::KernelState`]s (desired, observed)
//! of a few thousand objects each at 1000 peers, and drops them at the end. glibc's
//! malloc gives the freed top of its heap back to the kernel as soon as it exceeds
//! 128 KiB, so the next pass touches fresh pages again and pays a page fault per
//! 4 KiB: a few hundred faults per pass. On bare metal that is ~1 µs each; inside
//! user-mode-linux (where the benchmarks and the ESP tests run) ~50 µs each, which
//! made page faults most of a no-op apply's time. Keeping freed memory for reuse
//! bounds the process's resident size by its peak (which B5 measures) and makes
//! repeated passes fault-free.

/// Freed memory below this much is kept for reuse instead of being returned.
const KEEP_FREED_BYTES: i32 = 64 << 20;

/// Allocations from this size up get their own mapping (returned when freed); below,
/// they come from the heap, so the dump buffers and plan vectors are reused too.
const OWN_MAPPING_FROM_BYTES: i32 = 16 << 20;

/// Malloc arenas for all threads together. The agent's worker threads (its local API,
/// control sessions) allocate little; one arena keeps what they free in the same pool
/// as the main loop's passes, so the process's peak stays what B5 measures instead of
/// growing by an arena kept per thread.
const ARENAS: i32 = 1;

/// Tells the allocator to keep freed memory (see the module comment). Call once, at
/// the start of `main`, before other threads exist. A no-op where the C library is
/// not glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's tuning parameters; called before any other
    // thread exists, so no allocation runs concurrently with the change.
    unsafe {
        // Setting either one also turns off glibc's dynamic adjustment of both.
        libc::mallopt(libc::M_TRIM_THRESHOLD, KEEP_FREED_BYTES);
        libc::mallopt(libc::M_MMAP_THRESHOLD, OWN_MAPPING_FROM_BYTES);
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}
