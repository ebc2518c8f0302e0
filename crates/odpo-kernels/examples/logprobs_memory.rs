//! Resident memory and time of `token_logprobs` on half-precision logits, forward and backward, with the
//! logits widened to f32 before the operation (what `odpo-model` did until 2026-12-01: autodiff
//! then keeps the f32 copy) or handed over as they are (the operation widens inside, in runs of
//! rows, and keeps the bf16 logits). One mode per process, as the peak is the process's:
//!
//! ```sh
//! cargo run --release -p odpo-kernels --no-default-features --features tch --example logprobs_memory -- widened-first
//! cargo run --release -p odpo-kernels --no-default-features --features tch --example logprobs_memory -- as-is
//! ```
//!
//! Arguments: the mode, rows (default 3,072), vocabulary (default 50,257); libtorch's CPU device.

// burn-tch is marked deprecated upstream; it is still the libtorch backend of burn 0.22.
#![allow(deprecated)]

use burn::tensor::{Distribution, FloatDType, Int, Tensor, TensorData};

/// `VmRSS` and `VmHWM` of this process, in MiB (Linux).
fn memory() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| status.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()).unwrap_or(0.0) / 1024.0;
    (field("VmRSS:"), field("VmHWM:"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map_or("as-is", String::as_str);
    let n: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3072);
    let v: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(50_257);
    let device = burn::tensor::Device::libtorch().autodiff();
    let weights = Tensor::<2>::random([n, v], Distribution::Normal(0.0, 1.0), &device).cast(FloatDType::BF16).require_grad();
    let targets = Tensor::<1, Int>::from_data(TensorData::new((0..n as i64).map(|i| i * 7919 % v as i64).collect::<Vec<_>>(), [n]), &device);
    let (rss0, _) = memory();
    let start = std::time::Instant::now();
    // The logits as a model's head hands them over: the output of an operation, held by nothing else.
    let logits = weights.clone().mul_scalar(1.0);
    let lp = match mode {
        "widened-first" => odpo_kernels::token_logprobs(logits.cast(FloatDType::F32), targets),
        _ => odpo_kernels::token_logprobs(logits, targets),
    };
    let (rss1, _) = memory();
    let forward = start.elapsed().as_secs_f64();
    let start = std::time::Instant::now();
    let grads = lp.sum().backward();
    let backward = start.elapsed().as_secs_f64();
    let (rss2, peak) = memory();
    let g = weights.grad(&grads).map(|g| g.dtype());
    println!(
        "{mode}: {n} rows x {v} in bf16 ({:.0} MiB); resident memory before {rss0:.0} MiB, after the forward pass {rss1:.0} MiB (+{:.0}), after the backward pass {rss2:.0} MiB, peak {peak:.0} MiB; gradient {g:?}; forward {forward:.3} s, backward {backward:.3} s",
        (n * v * 2) as f64 / (1u64 << 20) as f64,
        rss1 - rss0
    );
}
