//! Out of device memory, as an error rather than a crash.
//!
//! A batch too large for the device is the commonest way a run fails, and the backends say so each
//! in their own way: libtorch throws, which `tch` turns into a panic; burn's cubecl backends (cuda,
//! wgpu, vulkan, metal) record the failed allocation and report it when a tensor is read back.
//! [`OutOfMemory::find`] recognises every one of those messages, and [`catch`] turns the panic into
//! a value, so that callers can say which batch did not fit and what to change.
//!
//! burn's own CPU backend (flex) allocates through Rust's allocator, which ends the process on a
//! failed allocation; on a CPU the operating system's out-of-memory killer usually comes first.
//! There, what is known before a run starts is checked against [`host_free_bytes`]: a model
//! file's tensors before they are read (on every backend: the reader holds them on the host), a
//! fresh model's weights when it is built, a run's gradients, optimizer state and reference before
//! its first step.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Once;

/// The device could not allocate what a computation asked for.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}the backend says: {reason}", self.size_sentence())]
pub struct OutOfMemory {
    /// The size of the allocation that failed, where the backend says it.
    pub bytes: Option<u64>,
    /// The backend's own sentence (libtorch's `CUDA out of memory. Tried to allocate ...`).
    pub reason: String,
}

/// cubecl's `IoError::BufferTooBig`.
const BUFFER_TOO_BIG: &str = "can't allocate buffer of size: ";

/// The messages of the backends' allocation failures, with where the size follows.
const PATTERNS: &[(&str, Size)] = &[
    // libtorch on CUDA (c10's caching allocator): "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has ...".
    ("CUDA out of memory. Tried to allocate ", Size::Formatted),
    // libtorch on the CPU: "DefaultCPUAllocator: can't allocate memory: you tried to allocate 36864000000 bytes."
    ("can't allocate memory: you tried to allocate ", Size::Bytes),
    // cubecl: a buffer larger than the device can ever hold (`IoError::BufferTooBig`).
    (BUFFER_TOO_BIG, Size::Bytes),
    // cubecl: the device has no room now (`IoError::OutOfMemory`, from CUDA or Vulkan).
    ("out of device memory allocating ", Size::Bytes),
    // cubecl: a launch that could not get its memory (`LaunchError::OutOfMemory`).
    ("An out-of-memory error happened during launch", Size::None),
    // The CUDA driver's own name for it, where a runtime passes the code on.
    ("CUDA_ERROR_OUT_OF_MEMORY", Size::None),
];

#[derive(Clone, Copy)]
enum Size {
    /// A plain number of bytes.
    Bytes,
    /// c10's `format_size`: `512 bytes`, `1.50 KiB`, `20.00 MiB`, `3.25 GiB`.
    Formatted,
    /// Not given.
    None,
}

impl OutOfMemory {
    /// What failed, before the backend's sentence. cubecl's `BufferTooBig` is a limit on one buffer,
    /// not a lack of free memory (on an H200, Vulkan refused a 2.9 GiB buffer with 127 GiB free), and
    /// says so.
    fn size_sentence(&self) -> String {
        match self.bytes {
            Some(b) if self.reason.contains(BUFFER_TOO_BIG) => {
                format!("one buffer of {} is more than the backend allocates at once (its limit on a buffer, whatever memory is free); ", human_bytes(b))
            }
            Some(b) => format!("an allocation of {} failed; ", human_bytes(b)),
            None => String::new(),
        }
    }

    /// The allocation failure a backend's message (a panic's text, an error's chain) reports, if any.
    pub fn find(text: &str) -> Option<Self> {
        PATTERNS.iter().find_map(|&(pattern, size)| {
            let at = text.find(pattern)?;
            let after = &text[at + pattern.len()..];
            let bytes = match size {
                Size::Bytes => after.split(|c: char| !c.is_ascii_digit()).next().and_then(|n| n.parse().ok()),
                Size::Formatted => formatted_bytes(after),
                Size::None => None,
            };
            // The sentence as the backend wrote it, up to the end of its line (a panic's payload
            // may hold the line escaped, `\n`, inside a debug-printed error).
            let start = text[..at].rfind(['\n', '"']).map_or(0, |i| i + 1);
            let line = &text[start..];
            let end = [line.find('\n'), line.find("\\n"), line.find('"')].into_iter().flatten().min().unwrap_or(line.len());
            let reason: String = line[..end].trim().chars().take(400).collect();
            Some(Self { bytes, reason })
        })
    }
}

/// `20.00 GiB` and the like at the start of `s`, in bytes.
fn formatted_bytes(s: &str) -> Option<u64> {
    let mut words = s.split_whitespace();
    let number: f64 = words.next()?.parse().ok()?;
    let unit = words.next()?.trim_end_matches(['.', ',', ';']);
    let scale = match unit {
        "bytes" | "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((number * scale).round() as u64)
}

/// `1.5 GiB` and the like.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let (mut value, mut unit) = (bytes as f64, 0);
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} bytes") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// The memory the host can still give this process, in bytes: what the operating system counts
/// available (free, and caches it can drop) plus free swap, or what the process's cgroup leaves
/// when that is less; `None` where the system does not say. A check of what a model or a run needs
/// before it starts, where the CPU backends would otherwise end the process
/// (Rust's allocator aborts on a failed allocation; Linux's out-of-memory killer may come first).
pub fn host_free_bytes() -> Option<u64> {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    if system.total_memory() == 0 {
        return None;
    }
    let free = system.available_memory().saturating_add(system.free_swap());
    Some(match system.cgroup_limits() {
        Some(cgroup) => free.min(cgroup.free_memory.saturating_add(cgroup.free_swap)),
        None => free,
    })
}

/// The sentence refusing a model's weights when `bytes` of them (`params` parameters, held `form`,
/// `place`) are more than `free`; `None` when they fit, or where the system does not say.
pub(crate) fn weights_beyond_free(params: u64, bytes: u64, form: &str, place: &str, free: Option<u64>) -> Option<String> {
    let free = free?;
    let count = match params {
        1_000_000_000.. => format!("{:.1} billion", params as f64 / 1e9),
        1_000_000.. => format!("{:.1} million", params as f64 / 1e6),
        _ => params.to_string(),
    };
    (bytes > free).then(|| {
        format!("the model's {count} parameters need at least {} of host memory {form}, {place}, and this machine has {} free (memory and swap)", human_bytes(bytes), human_bytes(free))
    })
}

thread_local! {
    /// How many [`catch`] calls this thread is inside: the panic hook stays quiet about an
    /// out-of-memory panic that one of them will turn into an error.
    static CATCHING: Cell<usize> = const { Cell::new(0) };
}

/// Runs `f`; a panic that reports an allocation failure (libtorch's) comes back as the error, any
/// other panic goes on unwinding. While `f` runs, the panic hook prints nothing for the former, so
/// that the caller's error is all the user reads.
///
/// Whatever `f` was changing is left as the panic left it: drop it rather than use it again.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, OutOfMemory> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let caught = CATCHING.with(Cell::get) > 0 && info.payload_as_str().and_then(OutOfMemory::find).is_some();
            if !caught {
                previous(info);
            }
        }));
    });
    CATCHING.with(|c| c.set(c.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(c.get() - 1));
    result.or_else(|payload| {
        let text = payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied());
        match text.and_then(OutOfMemory::find) {
            Some(oom) => Err(oom),
            None => resume_unwind(payload),
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn libtorch_cpu_panic_as_tch_prints_it() {
        // The panic of `odpo bench --backend tch` with a step of 36.9 GB on a 24 GB machine.
        let text = r#"called `Result::unwrap()` on an `Err` value: Torch("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 36864000000 bytes. Error code 12 (Cannot allocate memory)\nframe #0: c10::ThrowEnforceNotMet(char const*, int, char const*) + 0x6a (0x7f287dec9d6a in libc10.so)")"#;
        let oom = OutOfMemory::find(text).unwrap();
        assert_eq!(oom.bytes, Some(36_864_000_000));
        assert_eq!(oom.reason, "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 36864000000 bytes. Error code 12 (Cannot allocate memory)");
        assert_eq!(oom.to_string(), format!("an allocation of 34.3 GiB failed; the backend says: {}", oom.reason));
    }

    #[test]
    fn libtorch_cuda_sizes_in_c10s_format() {
        // c10's caching allocator (the sentence's parts as libc10_cuda.so holds them).
        let text = r#"Torch("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 139.81 GiB of which 17.19 GiB is free. Of the allocated memory 100.10 GiB is allocated by PyTorch\nException raised from malloc at CUDACachingAllocator.cpp")"#;
        let oom = OutOfMemory::find(text).unwrap();
        assert_eq!(oom.bytes, Some(20 * 1024 * 1024 * 1024));
        assert!(oom.reason.starts_with("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0") && oom.reason.ends_with("by PyTorch"), "{}", oom.reason);
        for (size, bytes) in [("512 bytes", 512), ("1.50 KiB", 1536), ("3.25 MiB", 3_407_872)] {
            let oom = OutOfMemory::find(&format!("CUDA out of memory. Tried to allocate {size}. GPU 1 has")).unwrap();
            assert_eq!(oom.bytes, Some(bytes), "{size}");
        }
    }

    #[test]
    fn cubecl_errors_read_back_from_the_device() {
        // `odpo bench --backend vulkan` on Mesa's lavapipe, 64 pairs x 512 tokens of SmolLM2-135M.
        let text = "reading the reference log-probs back from the device failed: Execution(An error happened during execution\nCaused by:\n  Several failures at once\nCaused by:\n  The bytes were never written (failure #3192, still claiming 5 buffer(s))\n  skipped `ReduceKernel`: it needed memory ManagedMemoryId { value: 6999 }, which carried the failure\nCaused by:\n  An IO error happened\nCaused by:\n  can't allocate buffer of size: 9663676416\nNo backtrace available";
        let oom = OutOfMemory::find(text).unwrap();
        assert_eq!((oom.bytes, oom.reason.as_str()), (Some(9_663_676_416), "can't allocate buffer of size: 9663676416"));
        // A limit on one buffer, not a lack of free memory: the message says which.
        assert_eq!(oom.to_string(), "one buffer of 9.0 GiB is more than the backend allocates at once (its limit on a buffer, whatever memory is free); the backend says: can't allocate buffer of size: 9663676416");
        let oom = OutOfMemory::find("An IO error happened\nCaused by:\n  out of device memory allocating 1073741824 bytes\nNo backtrace available").unwrap();
        assert_eq!(oom.bytes, Some(1 << 30));
        assert_eq!(OutOfMemory::find("An out-of-memory error happened during launch\nCaused by:\n  x").unwrap().bytes, None);
    }

    #[test]
    fn other_failures_are_not_out_of_memory() {
        for text in [
            "index out of bounds: the len is 3 but the index is 7",
            "A launch error happened\nCaused by:\n  Too much shared memory requested.\nRequested 100000 bytes, maximum 49152 bytes available.",
            "called `Result::unwrap()` on an `Err` value: Torch(\"shape '[2, 3]' is invalid for input of size 7\")",
        ] {
            assert_eq!(OutOfMemory::find(text), None, "{text}");
        }
    }

    #[test]
    fn catch_returns_an_allocation_panic_and_passes_others_on() {
        let oom = catch(|| -> u32 { panic!("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4096 bytes. Error code 12") }).unwrap_err();
        assert_eq!(oom.bytes, Some(4096));
        assert_eq!(catch(|| 7), Ok(7));
        let other = catch_unwind(|| catch(|| -> u32 { panic!("index out of bounds") })).unwrap_err();
        assert_eq!(other.downcast_ref::<&str>(), Some(&"index out of bounds"));
        // Nested: the inner catch answers, the outer sees a value.
        assert_eq!(catch(|| catch(|| -> u32 { panic!("{}", String::from("out of device memory allocating 8 bytes")) }).map_err(|e| e.bytes)), Ok(Err(Some(8))));
    }
}
