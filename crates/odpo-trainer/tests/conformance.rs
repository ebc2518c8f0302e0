//! Conformance of a backend: three ODPO training steps on the tiny random GPT-2 against the same
//! three steps in PyTorch (`tests/fixtures/make_conformance.py`: concatenated rows, log_softmax +
//! gather, clip_grad_norm_, torch.optim.AdamW), from the same initial weights. Checked at every step:
//! the reference and policy row log-probs, the loss and the gradient norm before clipping; after the
//! third step: every weight.
//!
//! It runs on the build's default backend, so the same file checks each backend:
//! `cargo test --release -p odpo-trainer --test conformance` (flex) and, for example,
//! `cargo test --release -p odpo-trainer --no-default-features --features tch --test conformance`
//! (`cargo xtask conformance --backend tch` runs this with the model and loss parity tests).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use burn::module::{ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use odpo_data::TokenizedPair;
use odpo_loss::{LossConfig, preference_loss};
use odpo_model::{CausalLm, Module};
use odpo_trainer::config::{OptimConfig, OptimizerKind};
use odpo_trainer::forward::{self, Reference};

fn here() -> PathBuf {
    common::repo_root().join("crates/odpo-trainer/tests/fixtures/conformance")
}

fn model_dir() -> PathBuf {
    common::repo_root().join("crates/odpo-model/tests/fixtures/gpt2")
}

/// Every float parameter, flattened, with its module path, in visiting order.
fn weights(model: &CausalLm) -> Vec<(String, Vec<f32>)> {
    struct V(Vec<String>, Vec<(String, Vec<f32>)>);
    impl ModuleVisitor for V {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.0.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.0.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let values = param.val().into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
            self.1.push((format!("{}[{D}D]", self.0.join(".")), values));
        }
    }
    let mut v = V(Vec::new(), Vec::new());
    model.visit(&mut v);
    v.1
}

fn close(what: &str, got: f64, want: f64, rel: f64) {
    let tol = rel * want.abs().max(1.0);
    assert!((got - want).abs() <= tol, "{what}: {got} vs PyTorch {want} (|diff| {:.2e} > {tol:.1e})", (got - want).abs());
}

#[test]
fn three_odpo_steps_match_pytorch() {
    three_odpo_steps(None);
}

/// The same three steps with `optim.foreach = true`: on libtorch (the CPU included) the second and
/// third AdamW updates run on all parameters at once, and the gradient norm on the gathered
/// gradients, against PyTorch's AdamW and `clip_grad_norm_`.
#[test]
fn three_odpo_steps_with_the_multi_tensor_adamw_match_pytorch() {
    three_odpo_steps(Some(true));
}

fn three_odpo_steps(foreach: Option<bool>) {
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(here().join("expected.json")).unwrap()).unwrap();
    let f = |v: &serde_json::Value| v.as_f64().unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
    let pairs: Vec<TokenizedPair> = exp["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, p)| TokenizedPair { pair_id: i, prompt: ids(&p["prompt"]), chosen: ids(&p["chosen"]), rejected: ids(&p["rejected"]), offset: f(&p["offset"]) as f32, weight: None })
        .collect();
    let refs: Vec<&TokenizedPair> = pairs.iter().collect();
    let b = pairs.len();

    let device = common::test_device().autodiff();
    let attention_calls = odpo_kernels::masked_attention_calls();
    let mut policy = CausalLm::load(&model_dir(), &device).unwrap().model;
    let reference = Reference::Frozen(Box::new(policy.valid()));
    let loss_cfg = LossConfig { beta: f(&exp["beta"]), ..LossConfig::default() };
    let lr = f(&exp["lr"]);
    let optim_cfg = OptimConfig {
        optimizer: OptimizerKind::Adamw,
        lr,
        weight_decay: Some(f(&exp["weight_decay"])),
        betas: Some([f(&exp["betas"][0]), f(&exp["betas"][1])]),
        eps: f(&exp["eps"]),
        foreach,
        ..OptimConfig::default()
    };
    let mut optim = odpo_trainer::optim::build(&optim_cfg);
    #[cfg(feature = "tch")]
    let fused_kernel_before = odpo_kernels::fused_adamw_calls();
    for (step, want) in exp["steps"].as_array().unwrap().iter().enumerate() {
        let batch = forward::preference_batch(&refs, &odpo_data::PreferenceBatcher::default(), &device);
        let reference_rows = reference.rows(&batch).unwrap();
        let rows = forward::policy_rows(&policy, &batch, Default::default());
        let policy_rows = rows.sum.clone().into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
        for r in 0..2 * b {
            close(&format!("step {} reference row {r}", step + 1), f64::from(reference_rows[r]), f(&want["reference_logps"][r]), 1e-5);
            close(&format!("step {} policy row {r}", step + 1), f64::from(policy_rows[r]), f(&want["policy_logps"][r]), 1e-5);
        }
        let inputs = forward::pair_logps(&batch, rows, &reference_rows, true, &device);
        let out = preference_loss(&inputs, &loss_cfg).unwrap();
        close(&format!("step {} loss", step + 1), out.loss.clone().into_scalar::<f64>(), f(&want["loss"]), 1e-5);
        let grads = GradientsParams::from_grads(out.loss.backward(), &policy);
        // The optimizer's norm: gathered into the multi-tensor update's buffer where that runs.
        let norm = optim.grad_norm(&policy, &grads);
        close(&format!("step {} gradient norm", step + 1), norm, f(&want["grad_norm"]), 1e-5);
        policy = optim.step(lr, policy, grads, odpo_trainer::optim::clip_coefficient(norm, Some(f(&exp["max_grad_norm"]))));
    }

    // Every backend this project builds runs attention as odpo-kernels' extension (its backward
    // recomputes the weights); the values above checked it against PyTorch.
    assert!(odpo_kernels::masked_attention_calls() > attention_calls, "attention did not run through odpo_kernels::masked_attention on {:?}", common::test_device());

    // On the CPU backends every update after the first (whose weights the reference still shares)
    // runs as the one-pass kernel, the tied embedding's transposed gradient included.
    let (fused, total) = optim.fused_updates();
    let params = total / 3;
    let on = format!("{:?}", common::test_device());
    if ["Flex", "LibTorch(Cpu)"].iter().any(|k| on.contains(k)) {
        assert_eq!(fused, 2 * params, "fused updates: {fused} of {total}");
    }
    // On libtorch's CUDA (and with `foreach = true` its CPU) the second and third updates run on
    // all parameters at once.
    let multi_tensor = on.contains("LibTorch(Cuda") || (on.contains("LibTorch") && foreach == Some(true));
    assert_eq!(optim.multi_tensor_steps(), if multi_tensor { 2 } else { 0 }, "multi-tensor AdamW steps (foreach {foreach:?}) on {on}");
    if multi_tensor {
        assert_eq!(fused, 2 * params, "fused updates: {fused} of {total}");
        // Each on the buffers is one call of libtorch's fused AdamW kernel.
        #[cfg(feature = "tch")]
        assert!(odpo_kernels::fused_adamw_calls() >= fused_kernel_before + 2, "libtorch's fused AdamW kernel did not run on {on}");
    }

    // PyTorch's weights after the third step, loaded as a model of the same shape.
    let dir = common::scratch("conformance-after");
    std::fs::copy(model_dir().join("config.json"), dir.join("config.json")).unwrap();
    std::fs::copy(here().join("weights_after.safetensors"), dir.join("model.safetensors")).unwrap();
    let torch_after = CausalLm::load(&dir, &common::test_device()).unwrap().model;
    let start = CausalLm::load(&model_dir(), &common::test_device()).unwrap().model;
    let (ours, theirs, before) = (weights(&policy.valid()), weights(&torch_after), weights(&start));
    assert_eq!(ours.len(), theirs.len());
    let (mut worst, mut moved, mut compared) = (0.0f32, 0.0f32, 0usize);
    for (((path, o), (_, t)), (_, z)) in ours.iter().zip(&theirs).zip(&before) {
        // The key part of GPT-2's fused QKV bias has a gradient of exactly zero in exact arithmetic
        // (it adds the same q·b to every score of a row, which softmax ignores), so both sides
        // hold rounding noise of ~1e-10 there, which Adam scales to ±lr steps of either sign.
        let skip = if path.contains("c_attn") && path.ends_with("[1D]") { o.len() / 3..2 * o.len() / 3 } else { 0..0 };
        for (i, ((x, y), w)) in o.iter().zip(t).zip(z).enumerate() {
            moved = moved.max((y - w).abs());
            if !skip.contains(&i) {
                worst = worst.max((x - y).abs());
                compared += 1;
            }
        }
    }
    println!("after 3 steps (foreach {foreach:?}): {compared} weights within {worst:.2e} of PyTorch's (the steps moved them by up to {moved:.2e})");
    // Each AdamW step moves a weight by at most about lr; agreement is asked to 1.5% of one step.
    // Adam divides by √v, so weights whose gradients are near zero turn rounding differences into
    // visible ones; the largest such difference is what this bounds. On CPU backends the
    // log-probabilities come from odpo-kernels' fused loop (log-sum-exp summed in f64, its own
    // `exp`) rather than PyTorch's f32 `log_softmax`: flex lands at 7.6e-6, libtorch at 1.1e-5
    // (8.4e-6 and 9.6e-6 with burn tensor operations). A wrong formula misses by a whole step or more.
    assert!(moved > 2.0 * lr as f32, "the steps should move the weights (moved {moved})");
    assert!(worst <= 0.015 * lr as f32, "weights differ from PyTorch's by {worst} after 3 steps");
}

/// `grads` of `from`'s parameters registered for `to`'s, parameter by parameter in visiting order.
fn same_grads(from: &CausalLm, grads: &GradientsParams, to: &CausalLm) -> GradientsParams {
    struct Ids(Vec<burn::module::ParamId>);
    impl ModuleVisitor for Ids {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push(param.id);
        }
    }
    struct Copy<'a>(std::vec::IntoIter<burn::module::ParamId>, &'a GradientsParams, GradientsParams);
    impl ModuleVisitor for Copy<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.0.next().and_then(|id| self.1.get::<D>(id)) {
                self.2.register(param.id, g);
            }
        }
    }
    let mut ids = Ids(Vec::new());
    from.visit(&mut ids);
    let mut copy = Copy(ids.0.into_iter(), grads, GradientsParams::new());
    to.visit(&mut copy);
    copy.2
}

/// Every weight detached from what made it and marked trainable.
struct Leaves;

impl burn::module::ModuleMapper for Leaves {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.map(|t| t.detach().require_grad())
    }
}

/// AdamW over all parameters at once (`optim.foreach`, PyTorch's multi-tensor update) against the
/// per-parameter update: four steps of the tiny GPT-2 in bf16 (f32 where the device has no bf16),
/// clipped, from the same weights with the same gradients, the multi-tensor side saved to a
/// checkpoint and resumed after the second. On libtorch the second and fourth steps run on the
/// buffers (the first and third, after the resume, build them); elsewhere both take the
/// per-parameter path. The gathered gradient norm is the per-parameter one up to rounding, and with
/// the same clipping coefficient the weights come out the same to the bit.
#[test]
fn multi_tensor_adamw_equals_the_per_parameter_update() {
    use burn::tensor::{DType, Int};
    let device = common::test_device().autodiff();
    let precision = if device.supports_dtype(DType::BF16) { odpo_model::Precision::Bf16 } else { odpo_model::Precision::F32 };
    // The cast weights as the trainable leaves (with_precision records the cast in the graph).
    let load = || CausalLm::load(&model_dir(), &device).unwrap().model.with_precision(precision).map(&mut Leaves);
    let (mut a, mut b) = (load(), load());
    let lr = 1e-2;
    let cfg = |foreach| OptimConfig { optimizer: OptimizerKind::Adamw, lr, foreach: Some(foreach), ..OptimConfig::default() };
    let (mut oa, mut ob) = (odpo_trainer::optim::build(&cfg(true)), odpo_trainer::optim::build(&cfg(false)));
    let ids: Vec<i64> = (0..24).map(|i| (i * 7 + 3) % 50).collect();
    let input = Tensor::<2, Int>::from_data(burn::tensor::TensorData::new(ids, [2, 12]), &device);
    let mask = Tensor::<2, Int>::ones([2, 12], &device);
    let start = weights(&a.valid());
    let mut resumed_after = None;
    let run_dir = common::scratch("multi-tensor");
    for step in 0..4 {
        if step == 2 {
            // A checkpoint and a resume in the middle: the multi-tensor side rebuilds its buffers
            // from the loaded weights and moments.
            let state = odpo_trainer::checkpoint::TrainState { step, pairs_seen: 0, tokens_seen: 0, seed: 0, total_steps: 4, early_stop: Default::default() };
            let ckpt = odpo_trainer::checkpoint::save(&run_dir, &a, &oa, None, &state, "", 1).unwrap();
            let (steps_before, built) = (oa.multi_tensor_steps(), odpo_trainer::optim::build(&cfg(true)));
            let resumed = odpo_trainer::checkpoint::load(&ckpt, load(), built).unwrap();
            (a, oa) = (resumed.0, resumed.1);
            resumed_after = Some(steps_before);
        }
        // One backward pass gives both sides their gradients (a GPU's backward pass need not be
        // deterministic): `a`'s, handed to `b`'s parameters in the same order.
        let logits = a.forward(input.clone(), &mask, None).cast(DType::F32);
        let loss = (logits.clone() * logits).mean().mul_scalar(1e3 * (step + 1) as f64);
        let ga = GradientsParams::from_grads(loss.backward(), &a);
        let gb = same_grads(&a, &ga, &b);
        let (na, nb) = (oa.grad_norm(&a, &ga), ob.grad_norm(&b, &gb));
        assert!((na - nb).abs() <= 1e-2 * nb, "step {}: gradient norm {na} (multi-tensor) against {nb}", step + 1);
        let coef = odpo_trainer::optim::clip_coefficient(nb, Some(0.3 * nb));
        a = oa.step(lr, a, ga, coef);
        b = ob.step(lr, b, gb, coef);
    }
    // On libtorch: steps 2 (before the resume) and 4 (after the rebuild in step 3) on the buffers.
    let libtorch = format!("{device:?}").contains("LibTorch");
    let on_buffers = (resumed_after.unwrap_or(0), oa.multi_tensor_steps());
    assert_eq!(on_buffers, if libtorch { (1, 1) } else { (0, 0) }, "multi-tensor steps before and after the resume on {device:?}");
    assert_eq!(ob.multi_tensor_steps(), 0);
    let (wa, wb) = (weights(&a.valid()), weights(&b.valid()));
    let (mut worst, mut moved) = (0.0f32, 0.0f32);
    for (((path, x), (_, y)), (_, z)) in wa.iter().zip(&wb).zip(&start) {
        for ((x, y), z) in x.iter().zip(y).zip(z) {
            // The same operations on the same values: the same bits.
            assert!(x.to_bits() == y.to_bits(), "{path}: {x} (multi-tensor) against {y} on {device:?}");
            worst = worst.max((x - y).abs());
            moved = moved.max((y - z).abs());
        }
    }
    println!("multi-tensor AdamW ({precision:?}, {on_buffers:?} steps on the buffers before and after a resume): weights within {worst:.2e} of the per-parameter update's (moved up to {moved:.2e})");
    assert!(moved > 2.0 * lr as f32, "the steps should move the weights (moved {moved})");
}

/// A mixed-precision step's gradients through `CausalLm::with_compute_precision`: they reach the
/// f32 weights in bf16 (f16 where the device has no bf16), and widened to f32 they equal to the bit
/// those of `with_precision` (burn's cast, whose backward step casts each gradient to f32; every
/// half-precision number is an f32); so do those through `with_half_weights`, the casts made once
/// for a step's micro-batches. On the cubecl backends a forward and backward pass launch one cast
/// kernel fewer per weight with the first, and none for the weights with the second. One AdamW step
/// from either set of gradients gives the same weights.
#[test]
fn compute_precision_gradients_equal_the_cast_ones() {
    use burn::tensor::{DType, Int};
    let device = common::test_device().autodiff();
    let Some((precision, half)) = [(odpo_model::Precision::Bf16, DType::BF16), (odpo_model::Precision::F16, DType::F16)].into_iter().find(|&(_, d)| device.supports_dtype(d)) else {
        println!("skipping: {device:?} has no half-precision dtype");
        return;
    };
    let model = CausalLm::load(&model_dir(), &device).unwrap().model;
    let ids: Vec<i64> = (0..24).map(|i| (i * 7 + 3) % 50).collect();
    let input = Tensor::<2, Int>::from_data(burn::tensor::TensorData::new(ids, [2, 12]), &device);
    let mask = Tensor::<2, Int>::ones([2, 12], &device);
    let once = model.half_weights(precision);
    // 0: burn's cast; 1: the cast whose gradients stay half; 2: the casts made once.
    let run = |how: usize| {
        let (grads, census) = odpo_kernels::kernel_census(false, || {
            let cast = match how {
                0 => model.clone().with_precision(precision),
                1 => model.clone().with_compute_precision(precision),
                _ => model.clone().with_half_weights(&once),
            };
            let logits = cast.forward(input.clone(), &mask, None).cast(DType::F32);
            let loss = (logits.clone() * logits).mean().mul_scalar(1e3);
            GradientsParams::from_grads(loss.backward(), &model)
        });
        let casts = census.unwrap_or_default().iter().filter(|k| k.kernel.contains("Cast")).map(|k| k.launches).sum::<u64>();
        (grads, casts)
    };
    let (cast, cast_kernels) = run(0);
    struct Compare<'a>(&'a GradientsParams, &'a GradientsParams, DType, usize);
    impl ModuleVisitor for Compare<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let (a, b) = (self.0.get::<D>(param.id).unwrap(), self.1.get::<D>(param.id).unwrap());
            assert_eq!((a.dtype(), b.dtype()), (DType::F32, self.2), "gradient dtypes (cast, kept)");
            let read = |t: Tensor<D>| t.cast(DType::F32).into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
            let (a, b) = (read(a), read(b));
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "gradients differ");
            self.3 += 1;
        }
    }
    let cfg = OptimConfig { optimizer: OptimizerKind::Adamw, lr: 1e-2, ..OptimConfig::default() };
    let step = |grads| weights(&odpo_trainer::optim::build(&cfg).step(1e-2, model.clone(), grads, 0.5).valid());
    // The same gradients again (a GPU's backward pass need not be deterministic, but is the same program).
    let stepped = step(run(0).0);
    let mut kernels = vec![cast_kernels];
    for how in [1, 2] {
        let (kept, kept_kernels) = run(how);
        let mut compare = Compare(&cast, &kept, half, 0);
        model.visit(&mut compare);
        let count = compare.3 as u64;
        if odpo_kernels::launches_kernels(&device) {
            let before = kernels[how - 1];
            assert_eq!(before - kept_kernels, count, "cast kernels of a forward and backward pass ({how}): {before} before, {kept_kernels} now, {count} weights");
        }
        kernels.push(kept_kernels);
        for ((path, x), (_, y)) in stepped.iter().zip(&step(kept)) {
            assert!(x.iter().zip(y).all(|(x, y)| x.to_bits() == y.to_bits()), "{path}: the updates differ ({how})");
        }
    }
    println!("{half:?} gradients equal to the bit; cast kernels of a forward and backward pass: {kernels:?} (burn's cast, kept half, cast once)");
}

/// The weights AdamW writes in half precision as it updates them (`Optim::step_to_half`, for the
/// next mixed-precision step) equal the updated f32 weights cast, to the bit: on the cubecl
/// backends from every update (the AdamW kernel writes them, four parameters to a launch), on libtorch from the multi-tensor
/// update's buffer once it is built (one cast of the buffer, from the second step on), on flex
/// none (the next step casts the weights itself).
#[test]
fn the_updates_half_precision_weights_equal_the_cast_weights() {
    use burn::tensor::{DType, Int};
    let device = common::test_device().autodiff();
    let Some((precision, half)) = [(odpo_model::Precision::Bf16, DType::BF16), (odpo_model::Precision::F16, DType::F16)].into_iter().find(|&(_, d)| device.supports_dtype(d)) else {
        println!("skipping: {device:?} has no half-precision dtype");
        return;
    };
    let mut model = CausalLm::load(&model_dir(), &device).unwrap().model;
    let ids: Vec<i64> = (0..24).map(|i| (i * 7 + 3) % 50).collect();
    let input = Tensor::<2, Int>::from_data(burn::tensor::TensorData::new(ids, [2, 12]), &device);
    let mask = Tensor::<2, Int>::ones([2, 12], &device);
    let cfg = OptimConfig { optimizer: OptimizerKind::Adamw, lr: 1e-2, foreach: Some(true), ..OptimConfig::default() };
    let mut optim = odpo_trainer::optim::build(&cfg);
    let name = format!("{device:?}");
    let mut written = Vec::new();
    for step in 0..3 {
        let grads = {
            let cast = model.clone().with_compute_precision(precision);
            let logits = cast.forward(input.clone(), &mask, None).cast(DType::F32);
            let loss = (logits.clone() * logits).mean().mul_scalar(1e3 * (step + 1) as f64);
            // Read, which waits until the device has run what this thread queued: a tensor's
            // buffer counts as shared while its allocation is queued (the loaded weights' at the
            // first step, under load), and AdamW then updates a copy rather than in place.
            assert!(loss.clone().into_scalar::<f32>().is_finite());
            GradientsParams::from_grads(loss.backward(), &model)
        };
        let ((updated, halves), census) = odpo_kernels::kernel_census(false, || optim.step_to_half(1e-2, model, grads, 0.5, Some(half.into())));
        model = updated;
        if odpo_kernels::launches_kernels(&device) {
            // Four parameters to a launch, the rest one each.
            let launches = |name: &str| census.iter().flatten().filter(|k| k.kernel == name).map(|k| k.launches as usize).sum::<usize>();
            let n = weights(&model.valid()).len();
            assert_eq!((launches("Adamw4HalfKernel"), launches("AdamwHalfKernel")), (n / 4, n % 4), "AdamW launches for {n} weights on {device:?}");
        }
        let Some(halves) = halves else {
            written.push(0);
            continue;
        };
        struct Compare(std::vec::IntoIter<Option<burn::backend::DispatchTensor>>, DType, usize);
        impl ModuleVisitor for Compare {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let Some(h) = self.0.next().expect("one entry per weight") else { return };
                let h = Tensor::<D>::from_dispatch(h);
                assert_eq!(h.dtype(), self.1);
                let read = |t: Tensor<D>| t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
                let (got, want) = (read(h), read(param.val().inner().cast(self.1)));
                assert!(got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()), "the written cast differs from the weight's");
                self.2 += 1;
            }
        }
        let mut compare = Compare(halves.into_iter(), half, 0);
        model.visit(&mut compare);
        written.push(compare.2);
    }
    let weights = weights(&model.valid()).len();
    let want = if odpo_kernels::launches_kernels(&device) {
        vec![weights; 3]
    } else if name.contains("LibTorch") {
        vec![0, weights, weights]
    } else {
        vec![0; 3]
    };
    assert_eq!(written, want, "{half:?} weights written by the updates of three steps on {device:?}");
    println!("{half:?} weights written by the updates of three steps: {written:?} of {weights}");
}

/// `odpo_kernels::SquareSums` on the test device against the f64 sum of squares of the same f32
/// values, over tensors of the sizes of a model's gradients (a bias, a weight of many cubes, a
/// transposed view, a half-precision copy where the device has one). On the cubecl backends it
/// takes every tensor and runs one kernel for each run of up to six of one dtype; elsewhere it
/// hands each back.
#[test]
fn square_sums_match_the_f64_sum() {
    use burn::tensor::{DType, TensorData};
    let device = common::test_device();
    let values = |n: usize, k: usize| -> Vec<f32> { (0..n).map(|i| ((i * k % 1009) as f32 - 504.0) / 97.0).collect() };
    let (a, b, c) = (values(576, 37), values(300 * 1000, 53), values(64 * 96, 7));
    let mut want: f64 = [&a, &b, &c].iter().flat_map(|v| v.iter()).map(|&x| f64::from(x) * f64::from(x)).sum();
    let mut tensors = vec![
        Tensor::<2>::from_data(TensorData::new(a, [1, 576]), &device),
        Tensor::<2>::from_data(TensorData::new(b, [300, 1000]), &device),
        Tensor::<2>::from_data(TensorData::new(c, [64, 96]), &device).swap_dims(0, 1),
    ];
    if device.supports_dtype(DType::BF16) {
        let half = Tensor::<2>::from_data(TensorData::new(values(4096, 11), [64, 64]), &device).cast(DType::BF16);
        let rounded = half.clone().cast(DType::F32).into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
        want += rounded.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>();
        tensors.push(half);
    }
    // Eight more like a model's biases: more f32 tensors in a row than one launch takes.
    for k in 0..8 {
        let small = values(37 + k, 3 + k);
        want += small.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>();
        tensors.push(Tensor::<2>::from_data(TensorData::new(small, [1, 37 + k]), &device));
    }
    let has_half = device.supports_dtype(DType::BF16);
    let count = tensors.len() as u64;
    let ((got, taken), census) = odpo_kernels::kernel_census(false, || {
        let mut sums = odpo_kernels::SquareSums::new();
        let (mut rest, mut taken) = (0.0, 0);
        for t in tensors {
            match sums.take(t) {
                Ok(()) => taken += 1,
                Err(t) => rest += t.cast(DType::F32).square().sum().into_scalar::<f64>(),
            }
        }
        (sums.total() + rest, taken)
    });
    if odpo_kernels::launches_kernels(&device) {
        // Up to six tensors of one dtype in a row to a launch: the first three f32 ones, the
        // bf16 one, the eight after in two (without bf16, eleven f32 tensors in two).
        let kernels = census.unwrap_or_default().iter().filter(|k| k.kernel.starts_with("SquareSum")).map(|k| k.launches).sum::<u64>();
        assert_eq!((taken, kernels), (count, if has_half { 4 } else { 2 }), "tensors taken and square-sum kernels on {device:?}");
    } else {
        assert_eq!(taken, 0, "only the cubecl backends have the kernel ({device:?})");
    }
    assert!((got - want).abs() <= 1e-5 * want, "{got} against {want} on {device:?}");
}

/// One AdamW update through `odpo_kernels::adamw` on the test device, in f32 and in bf16 where the
/// device has it, against PyTorch's formula worked in f64 on the same (rounded) inputs. On libtorch
/// every unshared update runs in place: the CPU kernel for f32 on the CPU, PyTorch's fused AdamW
/// kernel otherwise; on the cubecl backends, odpo's one AdamW kernel.
#[test]
fn adamw_updates_match_the_formula() {
    use burn::tensor::{DType, TensorData};
    let device = common::test_device();
    let n = 4096;
    let s = odpo_kernels::AdamWStep { lr: 0.1, beta_1: 0.9, beta_2: 0.999, eps: 1e-8, weight_decay: 0.01, step: 3, grad_scale: 0.25 };
    let start: [Vec<f32>; 4] = [
        (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect(),
        (0..n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 10.0).collect(),
        (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 100.0).collect(),
        (0..n).map(|i| (i % 11) as f32 / 50.0 + 0.01).collect(),
    ];
    for (dtype, rel) in [(DType::F32, 1e-6), (DType::BF16, 2e-2)] {
        if !device.supports_dtype(dtype) {
            println!("skipping {dtype:?}: {device:?} does not have it");
            continue;
        }
        let t = |x: &Vec<f32>| Tensor::<1>::from_data(TensorData::new(x.clone(), [n]), &device).cast(dtype);
        let read = |x: Tensor<1>| x.cast(DType::F32).into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
        let [p, g, m, v] = std::array::from_fn(|i| t(&start[i]));
        // The inputs as the device holds them (bf16 rounds them).
        let [p0, g0, m0, v0] = [&p, &g, &m, &v].map(|x| read(x.clone()));
        #[cfg(feature = "tch")]
        let fused_before = odpo_kernels::fused_adamw_calls();
        let (out, census) = odpo_kernels::kernel_census(false, || odpo_kernels::adamw(p, g, Some((m, v)), &s));
        if odpo_kernels::launches_kernels(&device) {
            let kernels = census.unwrap_or_default().iter().filter(|k| k.kernel == "AdamwKernel").map(|k| k.launches).sum::<u64>();
            assert!(out.fused && kernels > 0, "{dtype:?}: the AdamW kernel did not run on {device:?}");
        }
        if format!("{device:?}").contains("LibTorch") {
            assert!(out.fused, "{dtype:?}: the update did not run in place on {device:?}");
            // f32 on the CPU takes the CPU kernel; anything else libtorch's fused AdamW kernel.
            #[cfg(feature = "tch")]
            if dtype != DType::F32 || !format!("{device:?}").contains("Cpu") {
                assert!(odpo_kernels::fused_adamw_calls() > fused_before, "{dtype:?}: libtorch's fused AdamW kernel did not run on {device:?}");
            }
        }
        let (p1, m1, v1) = (read(out.param), read(out.moment_1), read(out.moment_2));
        let (bc1, bc2) = (1.0 - s.beta_1.powi(s.step), 1.0 - s.beta_2.powi(s.step));
        for i in 0..n {
            let gi = f64::from(g0[i]) * s.grad_scale;
            let m = f64::from(m0[i]) + (1.0 - s.beta_1) * (gi - f64::from(m0[i]));
            let v = s.beta_2 * f64::from(v0[i]) + (1.0 - s.beta_2) * gi * gi;
            let p = f64::from(p0[i]) * (1.0 - s.lr * s.weight_decay) - s.lr / bc1 * m / (v.sqrt() / bc2.sqrt() + s.eps);
            for (name, got, want) in [("p", p1[i], p), ("m", m1[i], m), ("v", v1[i], v)] {
                assert!((f64::from(got) - want).abs() <= rel * want.abs().max(0.1), "{dtype:?} {name}[{i}]: {got} against {want} on {device:?}");
            }
        }
    }
}

/// `odpo_kernels::adamw` with f32 weights and moments and a bf16 (else f16) gradient (a mixed-precision step's,
/// `CausalLm::with_compute_precision`) laid out transposed, against PyTorch's formula in f64 on the
/// gradient's values: on every backend the update runs in place (the cubecl kernel reads the
/// gradient as it is; elsewhere it is cast to f32 first) and agrees to f32 rounding (of the bias
/// corrections too, which PyTorch's CUDA kernel computes in f32).
#[test]
fn adamw_reads_a_half_precision_gradient() {
    use burn::tensor::{DType, TensorData};
    let device = common::test_device();
    let Some(half) = [DType::BF16, DType::F16].into_iter().find(|&d| device.supports_dtype(d)) else {
        println!("skipping: {device:?} has no half-precision dtype");
        return;
    };
    let n = 64;
    let s = odpo_kernels::AdamWStep { lr: 0.1, beta_1: 0.9, beta_2: 0.999, eps: 1e-8, weight_decay: 0.01, step: 2, grad_scale: 0.5 };
    let values = |k: usize, scale: f32, shift: f32| -> Vec<f32> { (0..n * n).map(|i| ((i * k % 101) as f32 - 50.0) / scale + shift).collect() };
    let t = |x: Vec<f32>| Tensor::<2>::from_data(TensorData::new(x, [n, n]), &device);
    let (p, m, v) = (t(values(37, 25.0, 0.0)), t(values(7, 1000.0, 0.0)), t(values(11, 5000.0, 0.011)));
    let g = t(values(53, 10.0, 0.0)).cast(half).swap_dims(0, 1);
    let read = |x: Tensor<2>| x.cast(DType::F32).into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
    let [p0, g0, m0, v0] = [&p, &g, &m, &v].map(|x| read(x.clone()));
    let (out, census) = odpo_kernels::kernel_census(false, || odpo_kernels::adamw(p, g, Some((m, v)), &s));
    assert!(out.fused, "the update did not run in place on {device:?}");
    if odpo_kernels::launches_kernels(&device) {
        let kernels: Vec<_> = census.unwrap_or_default().into_iter().filter(|k| k.launches > 0).map(|k| k.kernel).collect();
        assert_eq!(kernels, ["AdamwKernel"], "kernels of the update on {device:?}");
    }
    assert_eq!(out.param.dtype(), DType::F32);
    let (p1, m1, v1) = (read(out.param), read(out.moment_1), read(out.moment_2));
    let (bc1, bc2) = (1.0 - s.beta_1.powi(s.step), 1.0 - s.beta_2.powi(s.step));
    for i in 0..n * n {
        let gi = f64::from(g0[i]) * s.grad_scale;
        let m = f64::from(m0[i]) + (1.0 - s.beta_1) * (gi - f64::from(m0[i]));
        let v = s.beta_2 * f64::from(v0[i]) + (1.0 - s.beta_2) * gi * gi;
        let update = s.lr / bc1 * m / (v.sqrt() / bc2.sqrt() + s.eps);
        let p = f64::from(p0[i]) * (1.0 - s.lr * s.weight_decay) - update;
        // PyTorch's CUDA kernel (tch-cuda) evaluates the bias corrections in f32, where 1 − β₂ᵗ
        // (0.002 here) loses digits to cancellation: up to one ulp of 1 (2⁻²³) in it, so a relative
        // error of 2⁻²³ / (1 − β₂ᵗ) in the update at most (about half that from the square root, the
        // rest covers 1 − β₁ᵗ). Measured on an H200: 2.1e-7 on an update of 0.023 (this bound: 1.5e-6).
        let bias_correction = update.abs() * f64::from(f32::EPSILON) / bc2;
        for (name, got, want, slack) in [("p", p1[i], p, bias_correction), ("m", m1[i], m, 0.0), ("v", v1[i], v, 0.0)] {
            let tol = 1e-6 * want.abs().max(0.1) + slack;
            assert!((f64::from(got) - want).abs() <= tol, "{name}[{i}]: {got} against {want} (allowed {tol:.1e}) on {device:?}");
        }
    }
}
