//! Subnormal floats flushed to zero on the CPU (the FTZ and DAZ bits of x86's MXCSR), set by
//! `odpo` for its main thread and every thread of rayon's pool, where flex computes; threads started
//! later (libtorch's pool, at its first operation) inherit it. A process-wide choice, so the binary
//! makes it, as TensorFlow does for its CPU threads.
//!
//! Why: an x86 core computes an operation on a subnormal operand (below 1.2e-38 in f32) through a
//! microcode assist, about a hundred times slower. A softmax over a 49,152-token vocabulary whose
//! logits spread over more than 87 gives subnormal probabilities, and their gradient reaches the LM
//! head's products: a SmolLM2-135M run whose loss blew up (`optim.lr = 1e-3`) slowed from 70 to 7
//! tokens/s a step, 86% of the time in the gemm kernel (docs/performance.md, "Subnormals"). What
//! changes: values below 1.2e-38 count as 0, far below anything a loss or a log-prob can show.
//! `ODPO_SUBNORMALS=keep` leaves them as IEEE 754 has them.

/// The environment variable that keeps subnormals when set to `keep`.
pub const ENV: &str = "ODPO_SUBNORMALS";

/// Flushes subnormals to zero on this thread and on rayon's threads (building rayon's global pool
/// when nothing has yet). Returns whether the setting was changed.
pub fn flush_to_zero() -> bool {
    if std::env::var(ENV).is_ok_and(|v| v == "keep") || !set_this_thread() {
        return false;
    }
    if rayon::ThreadPoolBuilder::new().start_handler(|_| _ = set_this_thread()).build_global().is_err() {
        // The pool was already running: set its threads where they are.
        rayon::broadcast(|_| set_this_thread());
    }
    true
}

/// Sets FTZ (bit 15) and DAZ (bit 6) of this thread's MXCSR.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
fn set_this_thread() -> bool {
    let mut csr: u32 = 0;
    // SAFETY: `stmxcsr` stores the 32-bit control register into the `u32` it is given, and
    // `ldmxcsr` loads it back with two mode bits set; neither touches other memory or the stack.
    unsafe {
        std::arch::asm!("stmxcsr [{}]", in(reg) &raw mut csr, options(nostack, preserves_flags));
        csr |= (1 << 15) | (1 << 6);
        std::arch::asm!("ldmxcsr [{}]", in(reg) &raw const csr, options(nostack, preserves_flags, readonly));
    }
    true
}

/// Elsewhere (aarch64's FZ bit is left as the platform sets it) nothing changes.
#[cfg(not(target_arch = "x86_64"))]
fn set_this_thread() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use std::hint::black_box;

    /// A product whose exact value is subnormal, and a subnormal operand, on this thread, on every
    /// thread of rayon's pool and on a thread started afterwards: zero after the call.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn subnormals_are_zero_on_every_compute_thread() {
        let tiny = || black_box(1e-30f32) * black_box(1e-10f32);
        let subnormal_in = || black_box(f32::from_bits(1)) * black_box(2.0f32);
        assert!(tiny() > 0.0 && subnormal_in() > 0.0, "IEEE 754 before");
        assert!(super::flush_to_zero());
        assert_eq!((tiny(), subnormal_in()), (0.0, 0.0));
        let each: Vec<(f32, f32)> = rayon::broadcast(|_| (tiny(), subnormal_in()));
        assert!(!each.is_empty() && each.iter().all(|&p| p == (0.0, 0.0)), "{each:?}");
        // A thread started afterwards (libtorch's pool) inherits the setting.
        assert_eq!(std::thread::spawn(move || (tiny(), subnormal_in())).join().ok(), Some((0.0, 0.0)));
    }
}
