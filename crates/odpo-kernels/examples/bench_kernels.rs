//! Times the kernels on the default device: over SmolLM2-135M's parameter shapes (134.5M f32
//! values) one AdamW update, fused against the same formula as burn tensor operations, and the
//! global gradient norm, summed in place against `square().sum()` per tensor; over the logits of a
//! 4-pair batch (768 completion tokens × SmolLM2's 49,152-token vocabulary) the target
//! log-probabilities, forward and backward, fused against tensor operations.
//!
//! `cargo run --release -p odpo-kernels --example bench_kernels [-- REPEATS]` (add
//! `--no-default-features --features tch` for libtorch).

use std::time::Instant;

use burn::tensor::{Distribution, Tensor};
use burn::tensor::{Int, TensorData};
use odpo_kernels::{AdamWStep, adamw, adamw_tensor_ops, cpu_sum_squares, token_logprobs, token_logprobs_tensor_ops};

fn main() {
    let repeats: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let device = burn::tensor::Device::default();
    // SmolLM2-135M: the tied embedding, then 30 layers of attention and MLP weights and two norms.
    let mut shapes = vec![49_152 * 576];
    for _ in 0..30 {
        shapes.extend([576 * 576, 576 * 192, 576 * 192, 576 * 576, 576 * 1536, 576 * 1536, 1536 * 576, 576, 576]);
    }
    shapes.push(576);
    let rand = |n: usize| Tensor::<1>::random([n], Distribution::Normal(0.0, 0.02), &device);
    let mut state: Vec<[Tensor<1>; 4]> = shapes.iter().map(|&n| [rand(n), rand(n), rand(n).mul_scalar(0.1), rand(n).abs().mul_scalar(0.01)]).collect();
    let values: usize = shapes.iter().sum();
    println!("{device:?}: {} tensors, {values} values", shapes.len());
    let step = |t: i32| AdamWStep { lr: 1e-6, beta_1: 0.9, beta_2: 0.999, eps: 1e-8, weight_decay: 0.01, step: t, grad_scale: 0.5 };
    let sync = |s: &[[Tensor<1>; 4]]| {
        let _ = s[0][0].clone().narrow(0, 0, 1).into_scalar::<f32>();
    };
    let mut times = [Vec::new(), Vec::new()];
    for r in 0..repeats + 1 {
        for (which, out) in times.iter_mut().enumerate() {
            let t = Instant::now();
            let mut fused = 0;
            state = state
                .into_iter()
                .map(|[p, g, m, v]| {
                    let o = if which == 0 { adamw(p, g.clone(), Some((m, v)), &step(r as i32 + 2)) } else { adamw_tensor_ops(p, g.clone(), (m, v), &step(r as i32 + 2)) };
                    fused += usize::from(o.fused);
                    [o.param, g, o.moment_1, o.moment_2]
                })
                .collect();
            sync(&state);
            if r > 0 {
                out.push(t.elapsed().as_secs_f64());
            }
            if r == 1 && which == 0 {
                println!("fused kernel on {fused} of {} tensors", shapes.len());
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (f, o) = (median(&mut times[0]), median(&mut times[1]));
    println!("AdamW: fused {f:.3} s, tensor ops {o:.3} s, ratio {:.2}x ({repeats} repeats, medians)", o / f);

    let mut norms = [Vec::new(), Vec::new()];
    for r in 0..repeats + 1 {
        for (which, out) in norms.iter_mut().enumerate() {
            let t = Instant::now();
            let sq: f64 = if which == 0 {
                state.iter().map(|[_, g, _, _]| cpu_sum_squares(g).unwrap_or(f64::NAN)).sum()
            } else {
                state.iter().map(|[_, g, _, _]| g.clone().square().sum()).reduce(|a, b| a + b).map_or(0.0, |s| s.into_scalar::<f64>())
            };
            if r > 0 {
                out.push(t.elapsed().as_secs_f64());
            }
            if r == 1 {
                println!("{}: squared norm {sq:.6e}", ["in place", "square().sum()"][which]);
            }
        }
    }
    let (f, o) = (median(&mut norms[0]), median(&mut norms[1]));
    println!("gradient norm: in place {f:.3} s, square().sum() {o:.3} s, ratio {:.2}x", o / f);

    let (n, v) = (768, 49_152);
    let ad = device.clone().autodiff();
    let x = Tensor::<2>::random([n, v], Distribution::Normal(0.0, 3.0), &ad).require_grad();
    let t: Vec<i64> = (0..n as i64).map(|i| i * 7919 % v as i64).collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(t, [n]), &ad);
    let mut lp_times = [Vec::new(), Vec::new()];
    for r in 0..repeats + 1 {
        for (which, out) in lp_times.iter_mut().enumerate() {
            let t = Instant::now();
            // The logits as an operation's output, as the model's head hands them over.
            let head = x.clone().mul_scalar(1.0);
            let lp = if which == 0 { token_logprobs(head, targets.clone()) } else { token_logprobs_tensor_ops(head, targets.clone()) };
            let grads = lp.sum().backward();
            let g = x.grad(&grads).map(|g| g.narrow(0, 0, 1).narrow(1, 0, 1).into_scalar::<f32>());
            if r > 0 {
                out.push(t.elapsed().as_secs_f64());
            }
            if r == 1 {
                println!("{}: d/dx[0, 0] = {g:?}", ["fused", "tensor ops"][which]);
            }
        }
    }
    let (f, o) = (median(&mut lp_times[0]), median(&mut lp_times[1]));
    println!("token log-probs [{n}, {v}] forward + backward (with one scaling pass of the logits): fused {f:.3} s, tensor ops {o:.3} s, ratio {:.2}x", o / f);
}
