//! Mixed-precision training (`train.dtype = "bf16"` / `"f16"`): six ODPO steps of the tiny GPT-2 in
//! half precision follow the f32 run (losses and weights within half-precision rounding), and the
//! weights stay f32. A device that cannot compute in the type refuses the run with an error naming
//! `train.dtype`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use burn::tensor::DType;
use common::*;

fn run(dir: &std::path::Path, dtype: &str) -> odpo_trainer::Result<std::path::PathBuf> {
    let model = tiny_model(dir);
    let run = dir.join(dtype);
    let dtype_set = format!("train.dtype=\"{dtype}\"");
    let sets = ["train.batch_size=8", "train.micro_batch_size=4", "train.max_steps=6", "train.log_every=1", "eval.every=0", "eval.max_pairs=8", dtype_set.as_str()];
    let cfg = config(&model, &run, "", &sets);
    odpo_trainer::train_on(&cfg, data(48, 8), &test_device(), false, None)?;
    Ok(run)
}

fn losses(run: &std::path::Path) -> Vec<f64> {
    metric_rows(run, "train").iter().map(|r| r["loss"].as_f64().expect("loss")).collect()
}

#[test]
fn half_precision_runs_follow_the_f32_run() {
    let dir = scratch("mixed-precision");
    let full = run(&dir, "f32").expect("f32 run");
    let (l32, w32) = (losses(&full), exported_floats(&full));
    let init = {
        let cfg = config(&tiny_model(&dir), &dir.join("init"), "", &[]);
        let (config, policy) = odpo_trainer::load_policy(&cfg.model, cfg.train.seed, &test_device()).expect("policy");
        odpo_trainer::export(&policy, &config, &dir.join("init/model"), None).expect("export");
        exported_floats(&dir.join("init"))
    };
    let mut checked = 0;
    for (dtype, burn_dtype, tol) in [("bf16", DType::BF16, 3e-2), ("f16", DType::F16, 5e-3)] {
        if !test_device().supports_dtype(burn_dtype) {
            let err = run(&dir, dtype).map(|_| ()).expect_err("an unsupported dtype must be refused");
            let msg = err.to_string();
            println!("{dtype}: refused: {msg}");
            assert!(msg.starts_with("config: `train.dtype` is"), "{msg}");
            continue;
        }
        let half = run(&dir, dtype).expect("half-precision run");
        let lh = losses(&half);
        println!("{dtype}: losses {lh:?}\n f32: losses {l32:?}");
        for (step, (a, b)) in l32.iter().zip(&lh).enumerate() {
            assert!((a - b).abs() <= tol * a.abs().max(1.0), "step {}: loss {a} in f32, {b} in {dtype}", step + 1);
        }
        assert!(lh[5] < lh[0], "{dtype}: the loss did not fall ({lh:?})");
        // The update: the weights moved as in f32 (relative L2 distance of the two runs' changes
        // from the start; AdamW turns rounding in near-zero gradients into ±lr steps, so single
        // entries can differ by a step), and were exported as f32.
        let wh = exported_floats(&half);
        assert_eq!(wh.len(), w32.len());
        let (mut diff, mut norm) = (0f64, 0f64);
        for (((_, a), (_, b)), (_, z)) in w32.iter().zip(&wh).zip(&init) {
            for ((x, y), z) in a.iter().zip(b).zip(z) {
                diff += ((x - y) as f64).powi(2);
                norm += ((x - z) as f64).powi(2);
            }
        }
        let rel = (diff / norm).sqrt();
        println!("{dtype}: |Δ{dtype} - Δf32| / |Δf32| = {rel:.3}");
        assert!(norm > 0.0 && rel <= 0.5, "{dtype}: the update differs from the f32 one by {rel} of its size");
        assert!(safetensors::SafeTensors::deserialize(&exported(&half)).expect("safetensors").tensors().iter().all(|(_, v)| v.dtype() == safetensors::Dtype::F32));
        checked += 1;
    }
    println!("half-precision types trained: {checked}");
}

/// What `odpo bench --matmul-routines` measures: a half-precision step of the tiny GPT-2 records
/// its products on the cubecl backends (none elsewhere), the fused QKV projection `x·W` among them
/// and its weight's gradient `xᵀ·dy` by a transposed view; each routine is then timed on them,
/// `auto` first, and every routine's products agree with `auto`'s within half-precision rounding.
#[test]
fn a_steps_products_are_recorded_and_each_routine_timed_on_them() {
    use odpo_model::Precision;
    use odpo_trainer::bench::{Census, StepBench};
    let device = test_device();
    let Some(precision) = [Precision::Bf16, Precision::F16].into_iter().find(|p| device.supports_dtype(p.dtype())) else {
        eprintln!("{device:?} has neither bf16 nor f16: skipped");
        return;
    };
    let config = repo_root().join("bench/configs/gpt2-tiny.json");
    let b = StepBench { pairs: 1, seq: 32, prompt: 8, warmup: 0, repeats: 1, lora: None, cached_reference: false, shared_prompt: false, precision, gradient_checkpointing: false, wpo: false, census: Census::Off, record_products: true };
    let r = odpo_trainer::bench::step(&config, &b, &device).unwrap();
    if !odpo_kernels::launches_kernels(&device) {
        assert!(r.products.is_empty(), "{device:?} recorded {} products", r.products.len());
        return;
    }
    // 2 rows of 32 tokens through `c_attn`, a [128, 384] weight.
    let (rows, d) = (64, 128);
    let found = |lhs: Vec<usize>, rhs: Vec<usize>, lhs_transposed| r.products.iter().any(|p| p.lhs == lhs && p.rhs == rhs && p.lhs_transposed == lhs_transposed && p.dtype == DType::from(precision.dtype()));
    assert!(found(vec![rows, d], vec![d, 3 * d], false), "no x·W among {:?}", r.products);
    assert!(found(vec![d, rows], vec![rows, 3 * d], true), "no xᵀ·dy among {:?}", r.products);
    let routines: Vec<odpo_kernels::MatmulRoutine> = ["double_cyclic_mma", "auto"].iter().map(|n| n.parse().unwrap()).collect();
    let report = odpo_trainer::bench::time_routines(&r.products, &routines, &device, std::time::Duration::from_secs(300));
    assert!(!report.incomplete);
    assert_eq!(report.routines.len(), 2);
    let distinct = report.products.len();
    assert!(distinct >= 2 && distinct <= r.products.len());
    for t in &report.routines {
        assert_eq!(t.ran + t.refused, distinct, "{t:?}");
        assert!(t.step_seconds > 0.0 && t.step_seconds.is_finite() && t.tflops > 0.0, "{t:?}");
        assert!(t.max_relative_difference <= 2f64.powi(-7), "{t:?}");
        eprintln!("{device:?} {}: {:.2e} s for the step's products, ran {}, refused {}", t.routine, t.step_seconds, t.ran, t.refused);
    }
    let auto = report.routines.iter().find(|t| t.routine == "auto").unwrap();
    assert_eq!((auto.speedup, auto.refused, auto.max_relative_difference), (1.0, 0, 0.0));
}

/// What `odpo bench` reports as `kernel_paths`: the paths of odpo-kernels its last timed step took,
/// as the kernels count them. A half-precision step (f32 where the device has neither half type)
/// of a model with grouped heads (SmolLM2's narrow shape: 9 query heads over 3 key/value heads,
/// 30 layers) over rows without padding runs the attention once a layer in the reference pass and
/// once in the policy's, and the target log-probabilities once in each and once backward. The
/// attention's backward pass is a fused one on libtorch (and on flex in f32); on libtorch every
/// tracked forward's kernel is told the mask is causal and takes no bias, and the grouped keys and
/// values go to torch's kernels as they are (the CPU's flash kernel; CUDA's in half precision); on
/// CUDA in half precision RMSNorm is torch's kernel both ways, the gated unit's backward reads the
/// activation its forward kept, and the update is PyTorch's fused AdamW. Other tests running beside this one add to the process-wide counters, so those are
/// lower bounds; the attention's libtorch counts are this thread's.
#[test]
fn the_step_benchmark_reports_the_kernel_paths_its_step_took() {
    use odpo_model::Precision;
    use odpo_trainer::bench::{Census, StepBench};
    let device = test_device();
    let precision = [Precision::Bf16, Precision::F16].into_iter().find(|p| device.supports_dtype(p.dtype())).unwrap_or(Precision::F32);
    let config = repo_root().join("bench/configs/smollm2-135m-narrow.json");
    let b = StepBench { pairs: 1, seq: 16, prompt: 4, warmup: 0, repeats: 1, lora: None, cached_reference: false, shared_prompt: false, precision, gradient_checkpointing: false, wpo: false, census: Census::Off, record_products: false };
    let p = odpo_trainer::bench::step(&config, &b, &device).unwrap().kernel_paths;
    println!("{device:?}, {}: {p:?}", precision.name());
    let layers = 30;
    let name = format!("{device:?}");
    assert!(p.attention >= 2 * layers, "attention through the extension on {device:?}: {p:?}");
    if name.contains("LibTorch") || (name.contains("Flex") && precision == Precision::F32) {
        assert!(p.attention_fused_backward >= layers, "fused attention backward passes on {device:?}: {p:?}");
    }
    if name.contains("LibTorch") {
        let half = precision != Precision::F32;
        let cuda = name.contains("Cuda");
        assert_eq!((p.attention_causal, p.attention_causal_no_bias), (layers, layers), "tracked forwards told causal, and with no bias, on {device:?}");
        let grouped = if !cuda || half { 2 * layers } else { 0 };
        assert_eq!(p.attention_grouped, grouped, "forwards that took grouped keys and values as they are on {device:?}, {}", precision.name());
        if half {
            assert!(p.logprobs_torch_forward >= 2 && p.logprobs_torch_backward_in_place >= 1, "torch's log-probabilities on {device:?}: {p:?}");
        }
        if half && cuda {
            // Two norms a layer and the final one, in each of the two forward passes; once backward.
            let norms = 2 * layers + 1;
            assert!(p.rms_norm_torch_forward >= 2 * norms && p.rms_norm_torch_backward >= norms, "torch's RMSNorm on {device:?}: {p:?}");
            assert!(p.adamw_torch_fused >= 1, "PyTorch's fused AdamW on {device:?}: {p:?}");
            assert!(p.glu_kept_activation >= layers, "the gated unit's kept activation on {device:?}: {p:?}");
        }
    } else {
        assert_eq!((p.attention_causal, p.attention_grouped), (0, 0), "libtorch's counts on {device:?}");
    }
    if name.contains("Flex") || (name.contains("LibTorch(Cpu)") && precision == Precision::F32) {
        assert!(p.logprobs_cpu_forward >= 2 && p.logprobs_cpu_backward >= 1, "the CPU loops of the log-probabilities on {device:?}: {p:?}");
    }
}

/// `train.matmul`: a run's half-precision products go through the routine it names (each one run
/// or refused by it, counted), a run without it leaves them to burn's, and the routine is lifted
/// when the run returns. A device without cubecl routines refuses the key, naming it.
#[test]
fn a_runs_products_take_the_routine_its_config_names() {
    use odpo_kernels::{MatmulRoutine, matmul_routine, matmul_routine_calls};
    let device = test_device();
    let precision = ["bf16", "f16"].into_iter().find(|p| device.supports_dtype(if *p == "bf16" { DType::BF16 } else { DType::F16 })).unwrap_or("bf16");
    let dir = scratch("matmul-routine");
    let model = tiny_model(&dir);
    let run = |name: &str| {
        let (dtype, matmul) = (format!("train.dtype=\"{precision}\""), format!("train.matmul=\"{name}\""));
        let sets = ["train.batch_size=4", "train.micro_batch_size=4", "train.max_steps=1", "eval.every=0", "eval.max_pairs=4", dtype.as_str(), matmul.as_str()];
        let cfg = config(&model, &dir.join(name), "", &sets);
        assert_eq!(cfg.train.matmul.name(), name);
        let before = matmul_routine_calls();
        let result = odpo_trainer::train_on(&cfg, data(8, 4), &device, false, None);
        let after = matmul_routine_calls();
        assert_eq!(matmul_routine(), MatmulRoutine::AUTO, "the run's routine outlived it");
        result.map(|_| (after.ran - before.ran, after.refused - before.refused))
    };
    if !odpo_kernels::launches_kernels(&device) {
        let msg = run("double_cyclic_mma").expect_err("a device without routines must refuse one").to_string();
        assert!(msg.starts_with("config: `train.matmul` = \"double_cyclic_mma\" chooses a routine of the cubecl backends") && msg.contains("has none"), "{msg}");
        return;
    }
    if !device.supports_dtype(DType::BF16) && !device.supports_dtype(DType::F16) {
        eprintln!("{device:?} has neither bf16 nor f16: skipped");
        return;
    }
    assert_eq!(run("auto").expect("auto"), (0, 0));
    let (ran, refused) = run("simple_cyclic_mma").expect("simple_cyclic_mma");
    println!("{device:?} {precision}: simple_cyclic_mma ran {ran} products and refused {refused}");
    // The forward and backward products of a step: at least the 2 layers' 4 projections each way.
    assert!(ran + refused >= 16, "ran {ran}, refused {refused}");
}
