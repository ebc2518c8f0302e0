//! Times the optimizer's part of a step on its own: the global gradient norm and the AdamW update
//! with clipping (`Optim::grad_norm`, `Optim::step`), with `optim.foreach` on (all parameters as
//! one buffer, where it applies) and off (each parameter on its own), in alternation, on a model
//! shape with random weights held in the given precision.
//!
//! On a GPU a small model's update waits on the host issuing operations; a model of many tiny
//! tensors (`bench/configs/smollm2-135m-minimal.json`: SmolLM2-135M's 272 parameters at almost no
//! width) shows that cost on any machine. The multi-tensor update applies to libtorch tensors the
//! CPU kernel cannot reach, so on the CPU it needs half-precision weights:
//!
//! ```sh
//! ODPO_BENCH_DEVICE=tch OMP_NUM_THREADS=1 cargo run --release -p odpo-trainer --no-default-features \
//!     --features tch --example bench_optimizer -- bench/configs/smollm2-135m-minimal.json bf16 100
//! ```
//!
//! Arguments: model config (HF `config.json` form), precision of the weights (`f32`, `bf16`,
//! `f16`), timed updates per side (default 100). `ODPO_BENCH_DEVICE` picks the device (a
//! `--backend` spec, default burn's default device).

use std::time::Instant;

use burn::optim::GradientsParams;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use odpo_model::{CausalLm, ModelConfig, Module, Precision};
use odpo_trainer::config::{OptimConfig, OptimizerKind};
use odpo_trainer::optim::{Optim, build, clip_coefficient};

/// One side of the comparison: its name, optimizer, model, and each update's (total, norm) seconds.
type Side = (&'static str, Optim, Option<CausalLm>, Vec<(f64, f64)>);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(config_path) = args.first() else { return Err("usage: bench_optimizer CONFIG.json [f32|bf16|f16] [UPDATES]".into()) };
    let precision: Precision = args.get(1).map_or("f32", String::as_str).parse()?;
    let updates: usize = args.get(2).map_or(Ok(100), |a| a.parse()).map_err(|e| format!("UPDATES: expected a count ({e})"))?;
    let device = match std::env::var("ODPO_BENCH_DEVICE") {
        Ok(spec) => odpo_model::backend::device(&spec)?,
        Err(_) => Device::default(),
    }
    .autodiff();
    let text = std::fs::read_to_string(config_path).map_err(|e| format!("reading {config_path}: {e}"))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("parsing {config_path}: {e}"))?;
    let config = ModelConfig::from_hf_json(&json, std::path::Path::new(config_path))?;
    if !device.supports_dtype(precision.dtype()) {
        return Err(format!("{device:?} has no {}", precision.name()).into());
    }
    // The cast weights as the trainable leaves (with_precision records the cast in the graph).
    let new_model = || CausalLm::random_with(&config, 0, &device, false).map(|m| m.with_precision(precision).map(&mut Leaves));
    // Each update's gradients come from a backward pass of its own (not timed).
    let t = 16;
    let ids: Vec<i64> = (0..2 * t as i64).map(|i| (i * 7 + 3) % config.vocab_size() as i64).collect();
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, t]), &device);
    let grads_of = |m: &CausalLm| {
        let logits = m.forward(input.clone(), &Tensor::ones([2, t], &device), None).cast(DType::F32);
        GradientsParams::from_grads((logits.clone() * logits).mean().backward(), m)
    };

    let cfg = |foreach| OptimConfig { optimizer: OptimizerKind::Adamw, lr: 1e-6, foreach: Some(foreach), ..OptimConfig::default() };
    // Each side holds a model of its own (an update runs in place only on weights nothing else holds).
    let mut sides: Vec<Side> = vec![("foreach", build(&cfg(true)), Some(new_model()?), Vec::new()), ("per parameter", build(&cfg(false)), Some(new_model()?), Vec::new())];
    // Rounds of 10 updates per side, in alternation, so that both see the same machine; the first
    // round is warm-up (the multi-tensor side builds its buffers there).
    let rounds = updates.div_ceil(10) + 1;
    for round in 0..rounds {
        for (_, optim, model, times) in &mut sides {
            for _ in 0..10 {
                let Some(current) = model.take() else { continue };
                let grads = grads_of(&current);
                let _ = wait(&current);
                let start = Instant::now();
                let norm = optim.grad_norm(&current, &grads);
                let t_norm = start.elapsed().as_secs_f64();
                let updated = optim.step(1e-6, current, grads, clip_coefficient(norm, Some(1.0)));
                // The update is queued on a GPU: wait for it.
                let _ = wait(&updated);
                *model = Some(updated);
                if round > 0 {
                    times.push((start.elapsed().as_secs_f64(), t_norm));
                }
            }
        }
    }
    println!("{config_path}, {} weights, {device:?}", precision.name());
    let mut medians = Vec::new();
    for (name, optim, _, times) in &mut sides {
        let mut norms: Vec<f64> = times.iter().map(|t| t.1).collect();
        norms.sort_by(f64::total_cmp);
        times.sort_by(|a, b| a.0.total_cmp(&b.0));
        let median = times[times.len() / 2].0;
        medians.push(median);
        let (fused, total) = optim.fused_updates();
        println!(
            "{name:>14}: median {:.3} ms (of which the gradient norm {:.3} ms), fastest {:.3} ms over {} updates ({} on the buffers; {fused} of {total} parameter updates in place)",
            1e3 * median,
            1e3 * norms[norms.len() / 2],
            1e3 * times[0].0,
            times.len(),
            optim.multi_tensor_steps()
        );
    }
    println!("per parameter / foreach: {:.2}x", medians[1] / medians[0]);
    Ok(())
}

/// Every weight detached from what made it and marked trainable.
struct Leaves;

impl burn::module::ModuleMapper for Leaves {
    fn map_float<const D: usize>(&mut self, param: burn::module::Param<Tensor<D>>) -> burn::module::Param<Tensor<D>> {
        param.map(|t| t.detach().require_grad())
    }
}

/// Reads one element of the first float parameter: on a GPU, waits for the queued update.
fn wait(model: &CausalLm) -> f64 {
    struct First(Option<f64>);
    impl burn::module::ModuleVisitor for First {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            if self.0.is_none() {
                self.0 = Some(param.val().flatten::<1>(0, D - 1).narrow(0, 0, 1).cast(DType::F32).into_scalar::<f64>());
            }
        }
    }
    let mut v = First(None);
    model.visit(&mut v);
    v.0.unwrap_or_default()
}
