//! The process's allocators, chosen once by `odpo` (a process-wide choice, so the binary makes it,
//! not a library): small Rust blocks from mimalloc, large ones from the C allocator, whose policy
//! for large blocks is set at the start.
//!
//! Small blocks (under 4 KiB): a training step creates and drops burn's bookkeeping for every
//! operation (graph nodes, shapes, reference counts), small allocations by the tens of thousands a
//! step, and on a GPU a small model's step waits on its host. mimalloc serves them from
//! thread-local free lists, apart from the C heap. Measured on libtorch's CPU (docs/performance.md,
//! "Small blocks from mimalloc"): the host's time a step 3–4% less on a shape that waits on its
//! host, and the peak of a SmolLM2-135M step 7% lower (likely because small blocks no longer split
//! the large freed blocks the C heap keeps for reuse); flex's step and peak did not move. Tensors'
//! buffers, the large blocks, stay with the C allocator and its policy below.
//!
//! Large blocks: glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh `mmap` and
//! unmaps it when it is freed. A training step creates and frees many tensors larger than that (the
//! logits of a batch, 150 MB for 768 tokens over a 49,152-token vocabulary; the tied embedding's
//! gradient, 113 MB), so each step maps them anew and the kernel faults in and zeroes every 4 KiB
//! page of each: in a `perf` profile of the libtorch step, `clear_page_erms` and the page-fault path
//! took 8% of the time. With mmap off for allocations they come from the heap, where a freed block
//! is reused by the next tensor of its size. The cost is that the process keeps the memory of its
//! peak until it exits (the trim threshold is raised too); the peak itself does not grow.

use std::alloc::{GlobalAlloc, Layout, System};

use mimalloc::MiMalloc;

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

/// Blocks below this size come from mimalloc, the rest from the C allocator: burn's bookkeeping
/// below it, tensors' buffers (bar the smallest) above.
const SMALL: usize = 4 << 10;

/// The process's Rust allocator: small blocks from mimalloc, large ones from the C allocator.
pub struct Split;

#[allow(unsafe_code)]
// SAFETY: every block is freed (or grown) by the allocator that made it: `GlobalAlloc` hands
// `dealloc` and `realloc` the layout the block was allocated with, and the size decides which.
unsafe impl GlobalAlloc for Split {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { if layout.size() < SMALL { MiMalloc.alloc(layout) } else { System.alloc(layout) } }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        unsafe { if layout.size() < SMALL { MiMalloc.alloc_zeroed(layout) } else { System.alloc_zeroed(layout) } }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `layout` is the block's, so its size names the allocator that made it.
        unsafe { if layout.size() < SMALL { MiMalloc.dealloc(ptr, layout) } else { System.dealloc(ptr, layout) } }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; across the threshold the block moves to the other allocator.
        unsafe {
            match (layout.size() < SMALL, new_size < SMALL) {
                (true, true) => MiMalloc.realloc(ptr, layout, new_size),
                (false, false) => System.realloc(ptr, layout, new_size),
                _ => {
                    let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
                    let new = self.alloc(new_layout);
                    if !new.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    new
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Blocks keep their bytes when they grow or shrink across the threshold, either way, and blocks
    /// of every size come and go (this test binary runs under the same global allocator).
    #[test]
    fn blocks_keep_their_bytes_across_the_threshold() {
        let pattern = |n: usize| (0..n).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>();
        let mut v = pattern(1000);
        v.reserve_exact((super::SMALL * 3).saturating_sub(v.len()));
        assert!(v.capacity() >= super::SMALL * 3);
        assert_eq!(v, pattern(1000));
        v.extend(std::iter::repeat_n(9u8, super::SMALL * 2));
        v.truncate(1000);
        v.shrink_to_fit();
        assert_eq!(v, pattern(1000));
        for n in [0, 1, 16, super::SMALL - 1, super::SMALL, super::SMALL + 1, 40 << 20] {
            let zeros = vec![0u8; n];
            assert!(zeros.iter().all(|&b| b == 0));
            let mut b = pattern(n);
            b.push(1);
            assert_eq!(b[..n], pattern(n)[..]);
        }
    }
}
