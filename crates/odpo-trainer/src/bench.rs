//! The training-step benchmark behind `cargo xtask bench`: the training loop's own step
//! ([`Trainer::step`]: chosen and rejected in one forward, the reference forward, the loss and its
//! metrics, backward, global-norm clipping, the optimizer update) on a model shape with random
//! weights, timed after warm-up.
//!
//! `bench/pytorch/step.py` is the same step in PyTorch + transformers, written as TRL runs it, and
//! prints the same fields; the FLOP count of a step is the same formula on both sides
//! ([`step_flops`]).

use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor};
use odpo_data::TokenizedPair;
use odpo_loss::LossConfig;
use odpo_model::{CausalLm, LoraConfig, ModelConfig, Precision};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::config::{OptimConfig, Stage};
use crate::error::{Result, TrainError};
use crate::forward::{self, Reference};
pub use crate::step::Phases;
use crate::step::{DataParallel, StepSettings, Trainer};

/// What to measure.
#[derive(Clone, Debug)]
pub struct StepBench {
    /// Pairs per step (rows = 2 × pairs).
    pub pairs: usize,
    /// Tokens per row (prompt + response).
    pub seq: usize,
    /// Prompt tokens per row.
    pub prompt: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// Timed steps.
    pub repeats: usize,
    /// LoRA adapters instead of full fine-tuning.
    pub lora: Option<LoraConfig>,
    /// Reference log-probs computed once before the timed steps (`train.reference = "cached"`):
    /// the steps then skip the reference forward, and the result reports the cost of that pass.
    pub cached_reference: bool,
    /// Run each prompt once for both of its completions ([`odpo_model::logprobs::shared_prompt_logprobs`],
    /// what training does); false runs the concatenated `[2B, T]` rows as TRL does.
    pub shared_prompt: bool,
    /// Compute precision (`train.dtype`): bf16 / f16 run the forward and backward on a
    /// half-precision cast of the f32 weights, as the training loop's mixed precision does.
    pub precision: Precision,
    /// burn's balanced gradient checkpointing (`train.gradient_checkpointing`).
    pub gradient_checkpointing: bool,
    /// WPO's pair weights (`loss.use_weighting`): the policy's forward also computes log Σ_v p_v² of
    /// every completion token's logits.
    pub wpo: bool,
    /// After the timed steps, one more step whose kernel launches are counted (cubecl devices).
    pub census: Census,
    /// After the timed steps, one more step whose products are recorded ([`StepResult::products`]):
    /// what [`time_routines`] times.
    pub record_products: bool,
}

/// Whether the step benchmark counts the kernels of one step ([`odpo_kernels::kernel_census`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Census {
    /// No census.
    #[default]
    Off,
    /// The launches of each kernel.
    Launches,
    /// The launches and each kernel's device time (on the cubecl backends every launch waits for
    /// its kernel, so the census step is slower than the timed ones; on libtorch's CUDA CUPTI
    /// times them as they run, with or without this).
    Times,
}

/// The kernels of one step on a cubecl device or on libtorch's CUDA.
#[derive(Clone, Debug, Serialize)]
pub struct StepCensus {
    /// What was counted: the cubecl backends' kernel launches, or on libtorch's CUDA the kernels,
    /// copies and fills CUPTI recorded (as `bench/pytorch/step.py --kernels` counts PyTorch's).
    pub unit: String,
    /// Kernel launches in the step.
    pub launches_per_step: u64,
    /// Distinct kernels (by type) launched.
    pub kernels: usize,
    /// The kernels' device time summed, with [`Census::Times`].
    pub device_seconds: Option<f64>,
    /// The census step's own wall time.
    pub step_seconds: f64,
    /// The kernels with the most device time (with [`Census::Times`]) or the most launches, at most
    /// [`CENSUS_ROWS`].
    pub top: Vec<CensusRow>,
}

/// One kernel in a [`StepCensus`].
#[derive(Clone, Debug, Serialize)]
pub struct CensusRow {
    /// The kernel, by type.
    pub kernel: String,
    /// Launches in the step.
    pub launches: u64,
    /// Its device time in the step, with [`Census::Times`].
    pub device_seconds: Option<f64>,
}

/// Kernels listed in a [`StepCensus`]: enough for a step's whole list on libtorch's CUDA, so that it
/// can be set beside PyTorch's (`bench/pytorch/step.py --kernels` lists as many).
pub const CENSUS_ROWS: usize = 100;

/// The measured figures (the field names `bench/pytorch/step.py` prints too).
#[derive(Clone, Debug, Serialize)]
pub struct StepResult {
    /// Parameters of the policy.
    pub params: usize,
    /// Parameters that receive gradients.
    pub trainable: usize,
    /// Pairs per step.
    pub pairs: usize,
    /// Tokens per row.
    pub seq: usize,
    /// Median, fastest and slowest step.
    pub seconds_per_step_median: f64,
    /// Fastest step.
    pub seconds_per_step_min: f64,
    /// Slowest step.
    pub seconds_per_step_max: f64,
    /// 2 × pairs × seq / median step time.
    pub tokens_per_s: f64,
    /// pairs / median step time.
    pub pairs_per_s: f64,
    /// FLOPs of one step ([`step_flops`]), in GFLOP.
    pub step_gflop: f64,
    /// step_gflop / median step time.
    pub achieved_gflops: f64,
    /// Where the step's time goes (medians of each phase on its own).
    pub phase_seconds_median: Phases,
    /// With a cached reference: seconds of the pass that computes the step's reference log-probs.
    pub reference_cache_seconds: Option<f64>,
    /// With a cached reference: the cost of an epoch after the first over the first (which also
    /// runs the cache pass), `step / (step + cache pass)`.
    pub later_epoch_over_first: Option<f64>,
    /// Which of odpo-kernels' own paths the last timed step took, and how often: whether the
    /// fused paths engaged on this backend, dtype and shape (a step that quietly fell back to the
    /// composed form is slower without an error).
    pub kernel_paths: odpo_kernels::KernelPaths,
    /// The kernels of one more step, when asked for ([`StepBench::census`]).
    pub census: Option<StepCensus>,
    /// The products of one more step on a cubecl device, in order, when asked for
    /// ([`StepBench::record_products`]).
    #[serde(skip)]
    pub products: Vec<odpo_kernels::Product>,
}

/// Matmul FLOPs of one step: policy forward + backward (3×) and the reference forward (1×), each
/// `2 × (linear weights incl. the LM head)` per token plus the attention products `QKᵀ` and `AV`
/// over the full `seq × seq` square.
pub fn step_flops(model: &CausalLm, config: &serde_json::Value, pairs: usize, seq: usize) -> f64 {
    let get = |keys: &[&str]| keys.iter().find_map(|k| config.get(*k).and_then(serde_json::Value::as_u64)).unwrap_or(0) as f64;
    let (layers, heads, hidden, vocab) = (get(&["num_hidden_layers", "n_layer"]), get(&["num_attention_heads", "n_head"]), get(&["hidden_size", "n_embd"]), get(&["vocab_size"]));
    let head_dim = config.get("head_dim").and_then(serde_json::Value::as_u64).map_or(hidden / heads.max(1.0), |v| v as f64);
    let rows = (2 * pairs) as f64;
    let seq = seq as f64;
    let forward = 2.0 * (block_matrix_params(model) as f64 + vocab * hidden) * rows * seq + 4.0 * layers * heads * head_dim * seq * seq * rows;
    4.0 * forward
}

/// Elements of the 2-D weights outside embeddings and the LM head (adapters excluded).
fn block_matrix_params(model: &CausalLm) -> usize {
    struct V {
        path: Vec<String>,
        n: usize,
    }
    impl ModuleVisitor for V {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let skip = ["embed", "wte", "wpe", "lm_head", "lora"];
            if D == 2 && !self.path.iter().any(|p| skip.iter().any(|s| p.contains(s))) {
                self.n += param.lazy_shape().num_elements();
            }
        }
    }
    let mut v = V { path: Vec::new(), n: 0 };
    model.visit(&mut v);
    v.n
}

/// Random pairs of `seq` tokens per row (`prompt` of them shared), token ids in `[3, vocab)`.
pub fn random_pairs(n: usize, seq: usize, prompt: usize, vocab: usize, seed: u64) -> Vec<TokenizedPair> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut toks = |len: usize| -> Vec<u32> { (0..len).map(|_| rng.random_range(3..vocab as u32)).collect() };
    (0..n)
        .map(|i| TokenizedPair { pair_id: i, prompt: toks(prompt), chosen: toks(seq - prompt), rejected: toks(seq - prompt), offset: 0.3, weight: None })
        .collect()
}

/// Runs the step benchmark on `device` (its autodiff form trains) for a model config file.
pub fn step(config_path: &std::path::Path, b: &StepBench, device: &Device) -> Result<StepResult> {
    if b.prompt == 0 || b.prompt >= b.seq {
        return Err(TrainError::config("prompt", format!("is {} tokens; expected 0 < prompt < seq = {}", b.prompt, b.seq)));
    }
    if b.census != Census::Off && !odpo_kernels::launches_kernels(device) && !odpo_kernels::traces_cuda_activity(device) {
        return Err(TrainError::config(
            "kernels",
            format!("counts the kernels of the cubecl backends (cuda, vulkan, wgpu, metal) and of libtorch's CUDA (tch-cuda); the device {device:?} is neither"),
        ));
    }
    let text = std::fs::read_to_string(config_path).map_err(|e| TrainError::io(config_path, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| TrainError::ConfigParse { origin: config_path.display().to_string(), message: e.to_string() })?;
    let config = ModelConfig::from_hf_json(&json, config_path)?;
    // The random tokens leave out ids 0 to 2 (the special tokens of the small vocabularies).
    if config.vocab_size() <= 3 {
        let message = format!("vocab_size is {}; the step benchmark draws token ids from 3 up and needs at least 4", config.vocab_size());
        return Err(odpo_model::ModelError::Config { path: config_path.into(), message }.into());
    }
    let ad = crate::step::autodiff(device, b.gradient_checkpointing);
    let quantized_base = b.lora.as_ref().is_some_and(|l| l.quantized_base);
    if quantized_base && !odpo_kernels::holds_quantized(device) {
        return Err(TrainError::config("quantized-base", format!("the device {device:?} cannot hold burn's quantised tensors (flex can)")));
    }
    let mut policy = CausalLm::random_with(&config, 0, &ad, quantized_base).map_err(|e| e.in_config_file(config_path))?;
    policy.check_positions(b.seq, || format!("`seq` = {}", b.seq))?;
    if let Some(lora) = &b.lora {
        policy = policy.with_lora(lora, &ad)?;
    }
    if !device.supports_dtype(b.precision.dtype()) {
        return Err(TrainError::config("dtype", format!("is `{}`, which the device {device:?} cannot compute in", b.precision.name())));
    }
    let pairs = random_pairs(b.pairs, b.seq, b.prompt, config.vocab_size(), 0);
    let optim_cfg = OptimConfig { optimizer: crate::config::OptimizerKind::Adamw, lr: 1e-6, weight_decay: Some(0.0), ..OptimConfig::default() };
    let kept = crate::host_memory::TrainingState {
        optim: &optim_cfg,
        frozen_reference: !b.cached_reference,
        lora: b.lora.is_some(),
        precision: b.precision,
        more_than_one_step: b.warmup + b.repeats > 1,
        train: crate::host_memory::Pass::of(&pairs, b.pairs, b.pairs, true),
        eval: crate::host_memory::Pass::default(),
        kept_per_token: config.backward_kept_per_token(b.gradient_checkpointing, b.lora.is_some()),
        names: crate::host_memory::BENCH_FLAGS,
    };
    crate::host_memory::check(&policy, &kept, device)?;
    let mut reference = Reference::Frozen(Box::new(policy.without_adapters().valid().with_precision(b.precision)));
    let flops = step_flops(&policy, &json, b.pairs, b.seq);
    let refs: Vec<&TokenizedPair> = pairs.iter().collect();
    let layout = if b.shared_prompt { odpo_data::Layout::SharedPrompt } else { odpo_data::Layout::Concatenated };
    let batcher = odpo_data::PreferenceBatcher::new(0, None, layout);

    // The cache pass over the step's pairs: what the first epoch of a cached-reference run adds
    // (it runs once per pair, as the training loop's reference cache does).
    let mut reference_cache_seconds = None;
    if b.cached_reference {
        let t = Instant::now();
        let batch = forward::preference_batch(&refs, &batcher, &ad);
        let lp = reference.rows(&batch)?;
        let n = refs.len();
        let rows = refs.iter().enumerate().map(|(i, p)| (p.pair_id, lp[i], lp[n + i])).collect();
        reference = Reference::Cached(crate::refcache::RefCache::new(String::new(), rows));
        reference_cache_seconds = Some(t.elapsed().as_secs_f64());
    }
    // The training loop's own step: one micro-batch of every pair, AdamW, clipping at norm 10.
    let settings = StepSettings {
        stage: Stage::Preference,
        micro_batch_size: b.pairs,
        batcher,
        loss: LossConfig { beta: 0.7, use_weighting: b.wpo, ..LossConfig::default() },
        use_offsets: true,
        precision: b.precision,
        max_grad_norm: Some(10.0),
        seed: 0,
        router_aux_loss_coef: 0.0,
    };
    let mut trainer = Trainer::new(policy, crate::optim::build(&optim_cfg), DataParallel::new(std::slice::from_ref(device), &reference, b.gradient_checkpointing), settings);
    let mut secs = Vec::with_capacity(b.repeats);
    let mut phases: [Vec<f64>; 4] = Default::default();
    let mut kernel_paths = odpo_kernels::KernelPaths::default();
    for i in 0..b.warmup + b.repeats {
        let t = Instant::now();
        // The last timed step's paths.
        let paths = (i + 1 == b.warmup + b.repeats).then(odpo_kernels::KernelPaths::now);
        let stats;
        (trainer, stats) = trainer.step(&refs, i, 1e-6)?;
        // The update is queued: wait for it, and count the wait as the optimizer's.
        sync(trainer.policy());
        if let Some(paths) = paths {
            kernel_paths = odpo_kernels::KernelPaths::now().since(paths);
        }
        let total = t.elapsed().as_secs_f64();
        let p = &stats.phases;
        tracing::debug!(step = i, warmup = i < b.warmup, seconds = total, reference = p.reference, policy_forward = p.policy_forward, backward = p.backward, "bench step");
        if i >= b.warmup {
            secs.push(total);
            let p = stats.phases;
            for (v, x) in phases.iter_mut().zip([p.reference, p.policy_forward, p.backward, total - p.reference - p.policy_forward - p.backward]) {
                v.push(x);
            }
        }
    }
    let mut census = None;
    if b.census != Census::Off {
        let timed = b.census == Census::Times;
        let step = b.warmup + b.repeats;
        let one_step = || {
            let stepped = trainer.step(&refs, step, 1e-6);
            if let Ok((trainer, _)) = &stepped {
                sync(trainer.policy());
            }
            stepped
        };
        let t = Instant::now();
        let (stepped, kernels, unit) = if odpo_kernels::launches_kernels(device) {
            let (stepped, kernels) = odpo_kernels::kernel_census(timed, one_step);
            (stepped, kernels.unwrap_or_default(), "cubecl kernels")
        } else {
            let (stepped, kernels) = odpo_kernels::cuda_activity_census(one_step).map_err(|e| TrainError::config("kernels", format!("on libtorch's CUDA reads CUPTI: {e}")))?;
            (stepped, kernels, "CUDA kernels, copies and fills")
        };
        let step_seconds = t.elapsed().as_secs_f64();
        (trainer, _) = stepped?;
        census = Some(StepCensus {
            unit: unit.into(),
            launches_per_step: kernels.iter().map(|k| k.launches).sum(),
            kernels: kernels.len(),
            device_seconds: kernels.iter().any(|k| k.device_seconds.is_some()).then(|| kernels.iter().filter_map(|k| k.device_seconds).sum()),
            step_seconds,
            top: kernels.into_iter().take(CENSUS_ROWS).map(|k| CensusRow { kernel: k.kernel, launches: k.launches, device_seconds: k.device_seconds }).collect(),
        });
    }
    let mut products = Vec::new();
    if b.record_products {
        let stepped;
        (stepped, products) = odpo_kernels::record_products(|| trainer.step(&refs, b.warmup + b.repeats + 1, 1e-6));
        (trainer, _) = stepped?;
    }
    let policy = trainer.into_policy();
    secs.sort_by(f64::total_cmp);
    let median = secs[secs.len() / 2];
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let [r, f, bw, o] = &mut phases;
    let phase_seconds_median = Phases { reference: med(r), policy_forward: med(f), backward: med(bw), optimizer: med(o) };
    let tokens = (2 * b.pairs * b.seq) as f64;
    Ok(StepResult {
        params: policy.num_params(),
        trainable: crate::host_memory::trainable_params(&policy),
        pairs: b.pairs,
        seq: b.seq,
        seconds_per_step_median: median,
        seconds_per_step_min: secs[0],
        seconds_per_step_max: secs[secs.len() - 1],
        tokens_per_s: tokens / median,
        pairs_per_s: b.pairs as f64 / median,
        step_gflop: flops / 1e9,
        achieved_gflops: flops / median / 1e9,
        phase_seconds_median,
        reference_cache_seconds,
        // An epoch is a number of such steps; the first also runs the cache pass over its pairs.
        later_epoch_over_first: reference_cache_seconds.map(|c| median / (median + c)),
        kernel_paths,
        census,
        products,
    })
}

/// Reads one value of the first trainable parameter, which waits for the queued update.
fn sync(model: &CausalLm) {
    struct First(bool);
    impl ModuleVisitor for First {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !self.0 && param.is_require_grad() {
                self.0 = true;
                let _ = param.val().flatten::<1>(0, D - 1).narrow(0, 0, 1).into_scalar::<f32>();
            }
        }
    }
    model.visit(&mut First(false));
}

/// Float32 matmul throughput of `device` in GFLOP/s: the best of three ~0.3 s loops of an
/// `n × n × n` product (what a step's FLOP utilisation is measured against), through the product
/// the models' f32 layers take (`odpo_kernels::matmul`).
pub fn matmul_peak(n: usize, device: &Device) -> f64 {
    let a = Tensor::<2>::random([n, n], burn::tensor::Distribution::Normal(0.0, 1.0), device);
    let b = Tensor::<2>::random([n, n], burn::tensor::Distribution::Normal(0.0, 1.0), device);
    let run = |k: usize| {
        // Summed so that no product is dead code to a lazy backend; the adds are n² against n³.
        let mut acc = odpo_kernels::matmul(a.clone(), b.clone());
        for _ in 1..k {
            acc = acc + odpo_kernels::matmul(a.clone(), b.clone());
        }
        let _ = acc.narrow(0, 0, 1).narrow(1, 0, 1).into_scalar::<f32>();
    };
    run(2);
    let mut best = 0.0f64;
    for _ in 0..3 {
        let mut iters = 4;
        loop {
            let t = Instant::now();
            run(iters);
            let dt = t.elapsed().as_secs_f64();
            if dt > 0.3 || iters > 4096 {
                best = best.max(2.0 * (n as f64).powi(3) * iters as f64 / dt / 1e9);
                break;
            }
            iters *= 2;
        }
    }
    best
}

/// One routine's time on the products of a step ([`time_routines`]).
#[derive(Clone, Debug, Serialize)]
pub struct RoutineTiming {
    /// Its name (`odpo_kernels::MATMUL_ROUTINES`).
    pub routine: String,
    /// Distinct products it multiplied.
    pub ran: usize,
    /// Distinct products it refused: burn's routine multiplied those, and their time is burn's.
    pub refused: usize,
    /// The step's products: each distinct product's time times how often the step multiplies it.
    pub step_seconds: f64,
    /// The step's product FLOPs over `step_seconds`, in TFLOP/s.
    pub tflops: f64,
    /// `auto`'s `step_seconds` over this routine's.
    pub speedup: f64,
    /// The largest difference from `auto`'s product over all products, each relative to the
    /// largest magnitude of `auto`'s product.
    pub max_relative_difference: f64,
}

/// One distinct product of a step and the routine fastest on it.
#[derive(Clone, Debug, Serialize)]
pub struct ProductTiming {
    /// Shapes, transposed operands (ᵀ) and type.
    pub product: String,
    /// How often one step multiplies it.
    pub per_step: usize,
    /// Its FLOPs, in GFLOP.
    pub gflop: f64,
    /// Milliseconds on `auto`.
    pub auto_ms: f64,
    /// The fastest routine that took it, and its milliseconds.
    pub best: String,
    /// Milliseconds on `best`.
    pub best_ms: f64,
}

/// The routines timed on a step's products.
#[derive(Clone, Debug, Serialize)]
pub struct RoutineReport {
    /// Per routine, fastest first.
    pub routines: Vec<RoutineTiming>,
    /// Per distinct product, largest share of `auto`'s time first.
    pub products: Vec<ProductTiming>,
    /// The time budget ran out before every routine was timed on every product.
    pub incomplete: bool,
}

/// Times each routine of `routines` (on the cubecl backends; `auto` is always timed, first) on the
/// distinct products of `products` (a step's, [`StepBench::record_products`]): random operands of
/// the same shapes, layouts and type, each product compiled once, then run until 20 ms have passed,
/// best of two. Stops starting new routines once `budget` has passed.
pub fn time_routines(products: &[odpo_kernels::Product], routines: &[odpo_kernels::MatmulRoutine], device: &Device, budget: std::time::Duration) -> RoutineReport {
    use odpo_kernels::MatmulRoutine;
    let start = Instant::now();
    let mut distinct: Vec<(odpo_kernels::Product, usize)> = Vec::new();
    for p in products {
        match distinct.iter_mut().find(|(q, _)| q == p) {
            Some((_, n)) => *n += 1,
            None => distinct.push((p.clone(), 1)),
        }
    }
    if distinct.is_empty() {
        return RoutineReport { routines: Vec::new(), products: Vec::new(), incomplete: false };
    }
    let operands: Vec<_> = distinct.iter().map(|(p, _)| Operands::new(p, device)).collect();
    let flops: f64 = distinct.iter().map(|(p, n)| p.flops() * *n as f64).sum();
    let mut order = vec![MatmulRoutine::AUTO];
    order.extend(routines.iter().copied().filter(|r| *r != MatmulRoutine::AUTO));
    let mut reference = Vec::new();
    let mut times: Vec<Vec<Option<f64>>> = Vec::new();
    let mut timings = Vec::new();
    let mut incomplete = false;
    for routine in order {
        if routine != MatmulRoutine::AUTO && start.elapsed() > budget {
            incomplete = true;
            continue;
        }
        let (mut ran, mut refused, mut step_seconds, mut worst) = (0, 0, 0.0, 0.0f64);
        let mut row = Vec::new();
        for (i, ((_, n), ops)) in distinct.iter().zip(&operands).enumerate() {
            let (seconds, out, calls) = odpo_kernels::with_matmul_routine(routine, || ops.time());
            let took = calls.ran > 0 || routine == MatmulRoutine::AUTO;
            if took { ran += 1 } else { refused += 1 }
            step_seconds += seconds * *n as f64;
            row.push(took.then_some(seconds));
            if routine == MatmulRoutine::AUTO {
                reference.push(out);
            } else {
                worst = worst.max(relative_difference(&out, &reference[i]));
            }
        }
        tracing::info!(routine = routine.name(), step_seconds, ran, refused, "matmul routine timed");
        times.push(row);
        timings.push(RoutineTiming { routine: routine.name().to_string(), ran, refused, step_seconds, tflops: flops / step_seconds / 1e12, speedup: 0.0, max_relative_difference: worst });
    }
    let auto = timings[0].step_seconds;
    for t in &mut timings {
        t.speedup = auto / t.step_seconds;
    }
    let mut per_product: Vec<ProductTiming> = distinct
        .iter()
        .enumerate()
        .map(|(i, (p, n))| {
            let auto_s = times[0][i].unwrap_or(f64::NAN);
            let (best, best_s) = times.iter().zip(&timings).filter_map(|(row, t)| row[i].map(|s| (t.routine.clone(), s))).min_by(|a, b| a.1.total_cmp(&b.1)).unwrap_or(("auto".into(), auto_s));
            ProductTiming { product: p.to_string(), per_step: *n, gflop: p.flops() / 1e9, auto_ms: auto_s * 1e3, best, best_ms: best_s * 1e3 }
        })
        .collect();
    per_product.sort_by(|a, b| (b.auto_ms * b.per_step as f64).total_cmp(&(a.auto_ms * a.per_step as f64)));
    timings.sort_by(|a, b| a.step_seconds.total_cmp(&b.step_seconds));
    RoutineReport { routines: timings, products: per_product, incomplete }
}

/// A product's operands, as rank-2 tensors or with the leading dimensions in one.
enum Operands {
    Matrices(Tensor<2>, Tensor<2>),
    Batched(Tensor<3>, Tensor<3>),
}

impl Operands {
    fn new(p: &odpo_kernels::Product, device: &Device) -> Self {
        let normal = burn::tensor::Distribution::Normal(0.0, 1.0);
        let (lr, rr) = (p.lhs.len(), p.rhs.len());
        let (m, k, n) = (p.lhs[lr - 2], p.lhs[lr - 1], p.rhs[rr - 1]);
        let batch: usize = p.lhs[..lr - 2].iter().product();
        // A transposed operand is the transposed view of a contiguous tensor, as in the step.
        if lr == 2 {
            let a = if p.lhs_transposed { Tensor::<2>::random([k, m], normal, device).transpose() } else { Tensor::<2>::random([m, k], normal, device) };
            let b = if p.rhs_transposed { Tensor::<2>::random([n, k], normal, device).transpose() } else { Tensor::<2>::random([k, n], normal, device) };
            Self::Matrices(a.cast(p.dtype), b.cast(p.dtype))
        } else {
            let a = if p.lhs_transposed { Tensor::<3>::random([batch, k, m], normal, device).swap_dims(1, 2) } else { Tensor::<3>::random([batch, m, k], normal, device) };
            let b = if p.rhs_transposed { Tensor::<3>::random([batch, n, k], normal, device).swap_dims(1, 2) } else { Tensor::<3>::random([batch, k, n], normal, device) };
            Self::Batched(a.cast(p.dtype), b.cast(p.dtype))
        }
    }

    /// Seconds per product (after one that compiles it), the last product in f32, and the
    /// routine's calls meanwhile.
    fn time(&self) -> (f64, Tensor<1>, odpo_kernels::RoutineCalls) {
        let before = odpo_kernels::matmul_routine_calls();
        let product = || match self {
            Self::Matrices(a, b) => odpo_kernels::matmul(a.clone(), b.clone()).flatten::<1>(0, 1),
            Self::Batched(a, b) => odpo_kernels::matmul(a.clone(), b.clone()).flatten::<1>(0, 2),
        };
        // Reading one value waits for every kernel queued before it.
        let wait = |t: &Tensor<1>| t.clone().narrow(0, 0, 1).cast(burn::tensor::DType::F32).into_scalar::<f32>();
        let first = product();
        wait(&first);
        let after = odpo_kernels::matmul_routine_calls();
        let calls = odpo_kernels::RoutineCalls { ran: after.ran - before.ran, refused: after.refused - before.refused };
        let mut best = f64::INFINITY;
        for _ in 0..2 {
            let mut iters = 1;
            loop {
                let t = Instant::now();
                let mut last = product();
                for _ in 1..iters {
                    last = product();
                }
                wait(&last);
                let dt = t.elapsed().as_secs_f64();
                if dt > 0.02 || iters >= 1024 {
                    best = best.min(dt / iters as f64);
                    break;
                }
                iters *= 4;
            }
        }
        (best, first.cast(burn::tensor::DType::F32), calls)
    }
}

/// `max |x - y| / max |y|` (0 when `y` is all zeros).
fn relative_difference(x: &Tensor<1>, y: &Tensor<1>) -> f64 {
    let scale = y.clone().abs().max().into_scalar::<f32>() as f64;
    let diff = (x.clone() - y.clone()).abs().max().into_scalar::<f32>() as f64;
    if scale > 0.0 { diff / scale } else { diff }
}
