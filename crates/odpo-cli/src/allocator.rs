//! The C allocator's policy for large blocks, set once at the start of `odpo` (a process-wide choice,
//! so the binary makes it, not a library).
//!
//! glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh `mmap` and
//! unmaps it when it is freed. A training step creates and frees many tensors larger than that (the
//! logits of a batch, 150 MB for 768 tokens over a 49,152-token vocabulary; the tied embedding's
//! gradient, 113 MB), so each step maps them anew and the kernel faults in and zeroes every 4 KiB
//! page of each: in a `perf` profile of the libtorch step, `clear_page_erms` and the page-fault path
//! took 8% of the time. With mmap off for allocations they come from the heap, where a freed block
//! is reused by the next tensor of its size. The cost is that the process keeps the memory of its
//! peak until it exits (the trim threshold is raised too); the peak itself does not grow.

/// The environment variable that keeps glibc's own policy when set to `system`.
pub const ENV: &str = "ODPO_MALLOC";

/// Keeps large freed blocks in the heap for reuse (glibc on Linux; elsewhere nothing changes).
/// Returns whether the policy was changed; `ODPO_MALLOC=system` leaves glibc's default.
pub fn reuse_freed_memory() -> bool {
    if std::env::var(ENV).is_ok_and(|v| v == "system") {
        return false;
    }
    set()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn set() -> bool {
    // SAFETY: `mallopt` only changes allocator parameters; it is called before the program
    // allocates tensors, and glibc serialises it with allocations on its own lock.
    unsafe { libc::mallopt(libc::M_MMAP_MAX, 0) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set() -> bool {
    false
}
