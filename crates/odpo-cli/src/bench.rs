//! The benchmark commands behind `cargo xtask bench`, `bench-forward` and `bench-generate` (and the
//! GPU check): hidden from `odpo --help`, they are the repository's measuring tools, not user commands.

use std::path::PathBuf;

use anyhow::Result;
use burn::tensor::{Int, Tensor, TensorData};
use clap::Args;
use odpo_model::generate::{GenerationConfig, SamplingConfig, generate};
use odpo_model::{CausalLm, Module, backend};

use crate::positive;

#[derive(Args)]
pub struct BenchArgs {
    /// A HF `config.json` giving the model shape (weights are random).
    #[arg(long)]
    config: PathBuf,
    /// Pairs per step (2 × pairs rows of `seq` tokens).
    #[arg(long, default_value_t = 4, value_parser = positive)]
    pairs: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 128, value_parser = positive)]
    seq: usize,
    /// Prompt tokens per row (default: seq / 4).
    #[arg(long)]
    prompt: Option<usize>,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed steps (the median is reported, with the fastest and slowest).
    #[arg(long, default_value_t = 5, value_parser = positive)]
    repeats: usize,
    /// Train LoRA adapters of this rank on every projection instead of every weight.
    #[arg(long)]
    lora: Option<usize>,
    /// With `--lora`: keep the frozen projections block-quantised (Q8_0) instead of f32
    /// (`lora.quantized_base`).
    #[arg(long, requires = "lora")]
    quantized_base: bool,
    /// Compute the reference log-probs once before the timed steps (`train.reference = "cached"`)
    /// and report what an epoch after the first costs against the first.
    #[arg(long)]
    cached_reference: bool,
    /// How a micro-batch's rows go through the model, as `train.layout`: `auto` (the shared prompt
    /// on CPU backends, the concatenated rows on GPU backends), `shared-prompt` or `concatenated`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "shared-prompt", "concatenated"])]
    layout: String,
    /// The same as `--layout concatenated`: the `[2B, T]` rows, as TRL runs them.
    #[arg(long, conflicts_with = "layout")]
    no_shared_prompt: bool,
    /// burn's balanced gradient checkpointing (`train.gradient_checkpointing`).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// WPO's pair weights (`loss.use_weighting`), whose log Σ_v p_v² reads every completion token's
    /// logits once more.
    #[arg(long)]
    wpo: bool,
    /// Compute precision: f32, or bf16 / f16 mixed precision as `train.dtype` trains (weights,
    /// gradients and optimizer state stay f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Backend.
    #[arg(long, default_value = "flex", value_parser = crate::backend_spec)]
    backend: String,
    /// After the timed steps, count the kernels one more step launches (cubecl backends: cuda,
    /// vulkan, wgpu, metal; on tch-cuda the kernels, copies and fills CUPTI records, with their
    /// device time, as torch.profiler counts PyTorch's), reported under `census`.
    #[arg(long)]
    kernels: bool,
    /// The same, with each kernel's device time (on the cubecl backends each launch waits for its
    /// kernel).
    #[arg(long)]
    kernel_times: bool,
    /// After the timed steps, record the products of one more step and time each matmul routine
    /// on them (cubecl backends, bf16 / f16): `all`, or routine names separated by commas
    /// (`auto` is always timed); reported under `matmul_routines`, fastest first.
    #[arg(long, value_name = "ROUTINES")]
    matmul_routines: Option<String>,
    /// Seconds after which `--matmul-routines` starts no further routine.
    #[arg(long, default_value_t = 120.0)]
    routines_budget: f64,
}


#[derive(Args)]
pub struct BenchGenerateArgs {
    /// A HF `config.json` giving the model shape (weights are random).
    #[arg(long)]
    config: PathBuf,
    /// Batch sizes, comma-separated.
    #[arg(long, default_value = "1,8")]
    batches: String,
    /// Prompt tokens per row.
    #[arg(long, default_value_t = 32, value_parser = positive)]
    prompt: usize,
    /// New tokens per row (always this many: no EOS).
    #[arg(long, default_value_t = 64, value_parser = positive)]
    new: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 3, value_parser = positive)]
    repeats: usize,
    /// Backend.
    #[arg(long, default_value = "flex", value_parser = crate::backend_spec)]
    backend: String,
}

#[derive(Args)]
pub struct BenchForwardArgs {
    /// A HF `config.json` giving the model shape (weights are random).
    #[arg(long)]
    config: PathBuf,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8, value_parser = positive)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128, value_parser = positive)]
    seq: usize,
    /// Timed repeats (after one warm-up).
    #[arg(long, default_value_t = 5, value_parser = positive)]
    repeats: usize,
    /// Backend.
    #[arg(long, default_value = "flex", value_parser = crate::backend_spec)]
    backend: String,
}

pub fn cmd_bench_forward(a: BenchForwardArgs) -> Result<()> {
    let device = backend::device(&a.backend)?;
    let (config, model) = CausalLm::random_from_file(&a.config, 0, &device, false)?;
    model.check_positions(a.seq, || format!("`--seq` {}", a.seq))?;
    let v = config.vocab_size() as i64;
    let ids: Vec<i64> = (0..a.batch * a.seq).map(|i| (i as i64 * 7919 + 13) % v).collect();
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [a.batch, a.seq]), &device);
    let mask = Tensor::<2, Int>::ones([a.batch, a.seq], &device);
    let run = || -> Result<f64> {
        let t = std::time::Instant::now();
        let logits = model.forward(input.clone(), &mask, None);
        // Reading one value back waits for the whole computation on asynchronous backends.
        let _ = logits.narrow(1, 0, 1).sum().into_scalar::<f32>();
        Ok(t.elapsed().as_secs_f64())
    };
    run()?;
    let mut secs: Vec<f64> = (0..a.repeats).map(|_| run()).collect::<Result<_>>()?;
    secs.sort_by(f64::total_cmp);
    let tokens = (a.batch * a.seq) as f64;
    let median = secs[secs.len() / 2];
    let v = serde_json::json!({
        "backend": a.backend, "batch": a.batch, "seq": a.seq, "repeats": a.repeats,
        "params": model.num_params(),
        "tokens_per_s_median": tokens / median,
        "tokens_per_s_min": tokens / secs[secs.len() - 1],
        "tokens_per_s_max": tokens / secs[0],
        "peak_rss_mb": peak_rss_mb(),
    });
    println!("{}", serde_json::to_string(&v)?);
    Ok(())
}

pub fn cmd_bench_generate(a: BenchGenerateArgs) -> Result<()> {
    use rand::{Rng, SeedableRng};
    let device = backend::device(&a.backend)?;
    let (config, model) = CausalLm::random_from_file(&a.config, 0, &device, false)?;
    let cfg = GenerationConfig {
        max_new_tokens: a.new,
        eos_token_ids: Vec::new(),
        pad_token_id: 0,
        sampling: SamplingConfig { greedy: true, ..SamplingConfig::default() },
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut results = Vec::new();
    for b in a.batches.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let b: usize = positive(b).map_err(|e| anyhow::anyhow!("--batches: {e}"))?;
        let prompts: Vec<Vec<u32>> = (0..b).map(|_| (0..a.prompt).map(|_| rng.random_range(3..config.vocab_size() as u32)).collect()).collect();
        let mut secs = Vec::new();
        for i in 0..a.warmup + a.repeats {
            let t = std::time::Instant::now();
            let g = generate(&model, &prompts, &cfg, &device)?;
            let dt = t.elapsed().as_secs_f64();
            anyhow::ensure!(g.tokens.iter().all(|t| t.len() == a.new), "generation stopped early");
            if i >= a.warmup {
                secs.push(dt);
            }
        }
        secs.sort_by(f64::total_cmp);
        let tokens = (b * a.new) as f64;
        results.push(serde_json::json!({
            "batch": b,
            "tokens_per_s_median": tokens / secs[secs.len() / 2],
            "tokens_per_s_min": tokens / secs[secs.len() - 1],
            "tokens_per_s_max": tokens / secs[0],
            "seconds_per_run_median": secs[secs.len() / 2],
        }));
    }
    let v = serde_json::json!({
        "bench": "odpo_generate_greedy", "backend": a.backend, "prompt_tokens": a.prompt, "new_tokens": a.new,
        "kv_cache": true, "warmup": a.warmup, "repeats": a.repeats, "results": results, "peak_rss_mib": peak_rss_mb(),
    });
    println!("{}", serde_json::to_string(&v)?);
    Ok(())
}

pub fn cmd_bench(a: BenchArgs) -> Result<()> {
    let device = backend::device(&a.backend)?;
    let lora = a.lora.map(|rank| odpo_model::LoraConfig { rank, alpha: 2.0 * rank as f64, quantized_base: a.quantized_base, ..Default::default() });
    let layout: odpo_trainer::config::RowLayout = if a.no_shared_prompt { "concatenated" } else { a.layout.as_str() }.parse()?;
    let backend_name = a.backend.split(':').next().unwrap_or_default();
    let shared_prompt = layout.resolve(backend_name.parse()?) == odpo_data::Layout::SharedPrompt;
    use odpo_trainer::bench::Census;
    let census = if a.kernel_times { Census::Times } else if a.kernels { Census::Launches } else { Census::Off };
    let routines: Option<Vec<odpo_kernels::MatmulRoutine>> = match a.matmul_routines.as_deref() {
        None => None,
        Some("all") => Some(odpo_kernels::MatmulRoutine::all().collect()),
        Some(list) => Some(list.split(',').map(|r| r.parse().map_err(|e: String| anyhow::anyhow!("--matmul-routines: {e}"))).collect::<Result<_>>()?),
    };
    if routines.is_some() && !odpo_kernels::launches_kernels(&device) {
        anyhow::bail!("--matmul-routines times the routines of the cubecl backends (cuda, vulkan, wgpu, metal); backend `{}` has none", a.backend);
    }
    let b = odpo_trainer::bench::StepBench { pairs: a.pairs, seq: a.seq, prompt: a.prompt.unwrap_or(a.seq / 4), warmup: a.warmup, repeats: a.repeats, lora, cached_reference: a.cached_reference, shared_prompt, precision: a.dtype.parse()?, gradient_checkpointing: a.gradient_checkpointing, wpo: a.wpo, census, record_products: routines.is_some() };
    let r = odpo_trainer::bench::step(&a.config, &b, &device)?;
    let routine_report = routines.map(|list| odpo_trainer::bench::time_routines(&r.products, &list, &device, std::time::Duration::from_secs_f64(a.routines_budget)));
    // Measured after the step, so that it does not raise the step's peak memory.
    let peak_rss = peak_rss_mb();
    let matmul = odpo_trainer::bench::matmul_peak(1024, &device);
    let mut v = serde_json::to_value(&r)?;
    if let serde_json::Value::Object(m) = &mut v {
        m.insert("bench".into(), "odpo_step".into());
        m.insert("config".into(), a.config.display().to_string().into());
        m.insert("backend".into(), a.backend.clone().into());
        m.insert("lora".into(), a.lora.unwrap_or(0).into());
        m.insert("shared_prompt".into(), shared_prompt.into());
        m.insert("dtype".into(), a.dtype.clone().into());
        m.insert("gradient_checkpointing".into(), a.gradient_checkpointing.into());
        m.insert("wpo".into(), a.wpo.into());
        m.insert("quantized_base".into(), a.quantized_base.into());
        m.insert("repeats".into(), b.repeats.into());
        m.insert("peak_rss_mib".into(), peak_rss.into());
        m.insert("matmul_peak_gflops".into(), matmul.into());
        m.insert("flop_utilisation".into(), (r.achieved_gflops / matmul).into());
        m.insert("matmul".into(), odpo_kernels::matmul_routine().name().into());
        if let Some(report) = &routine_report {
            m.insert("matmul_routines".into(), serde_json::to_value(report)?);
        }
    }
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// Peak resident memory of this process (Linux `VmHWM`), in MB.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

