//! `odpo`: the command-line front of the crates. `cargo xtask` builds it with the features of the
//! backend asked for and runs it; it can also be run directly from a release build.

mod allocator;
mod bench;
mod subnormals;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Int, Tensor, TensorData};
use clap::{Args, Parser, Subcommand};
use odpo_model::generate::{GenerationConfig, SamplingConfig, generate_with};
use odpo_model::logprobs::completion_logprobs;
use odpo_model::tokenizer::Tokenizer;
use odpo_model::{CausalLm, LoadedModel, Module, backend};

/// Small blocks from mimalloc, large ones from the C allocator (`allocator`).
#[global_allocator]
static ALLOCATOR: allocator::Split = allocator::Split;

/// Preference training of language models (ODPO and the DPO family) on burn.
#[derive(Parser)]
#[command(name = "odpo", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The routine of bf16 / f16 products on the cubecl backends (cuda, vulkan, wgpu, metal):
    /// `auto` (burn's own) or a name from `odpo bench --matmul-routines` (docs/backends.md,
    /// "Matmul routines"). For `train --config` / `--resume` it overrides `train.matmul`.
    #[arg(long, global = true, value_parser = matmul_routine)]
    matmul: Option<odpo_kernels::MatmulRoutine>,
}

fn matmul_routine(s: &str) -> std::result::Result<odpo_kernels::MatmulRoutine, String> {
    s.parse()
}

#[derive(Subcommand)]
enum Command {
    /// Train with SFT or a preference objective, as a TOML run config says. Without `--config`:
    /// the built-in known-reward task end to end (SFT, sampling, pairs, ODPO, evaluation).
    Train(TrainArgs),
    /// Sample k responses per prompt from a model, score them, write the paper's scored format.
    Sample(SampleArgs),
    /// Reward and KL to the reference of a pipeline run's policy, on held-out prompts.
    Eval(EvalArgs),
    /// Fit a reward model (a linear head on a frozen transformer): a regression on scored texts
    /// (`--data`), or a Bradley–Terry model on preference pairs (`--pairs`, for data with no scores),
    /// with held-out figures; `--reward learned:DIR` then scores with it, and `--scored-out` writes
    /// the pairs with the model's scores for `[data.offset]`.
    RewardModel(RewardModelArgs),
    /// Sweep beta (and alpha) for DPO and ODPO over pair counts and seeds; table and plot.
    Frontier(FrontierArgs),
    /// DPO and ODPO from a pretrained model scored by a reward model (the paper's sentiment
    /// experiment): samples, pairs, one run per setting, reward and KL on held-out prompts; resumes.
    Experiment(ExperimentArgs),
    /// Inspect preference data.
    #[command(subcommand)]
    Data(DataCommand),
    /// Generate a continuation of a prompt.
    Generate(GenerateArgs),
    /// Print the token counts and the summed log-probability of a completion after a prompt.
    Logprobs(LogprobsArgs),
    /// Write a model (Llama, Mistral, Qwen2, Qwen3, OLMo 2, SmolLM3, Granite, Gemma 1-3; adapters merged in) with its byte-level or
    /// SentencePiece BPE tokenizer as a llama.cpp GGUF file, e.g. a run's exported `model/` folder.
    ExportGguf(ExportGgufArgs),
    /// Forward-pass throughput of a model shape with random weights (tokens/s, peak memory).
    #[command(hide = true)]
    BenchForward(bench::BenchForwardArgs),
    /// Greedy generation throughput (KV cache) of a model shape with random weights, per batch size
    /// (one JSON object, the fields `bench/pytorch/generate.py` prints).
    #[command(hide = true)]
    BenchGenerate(bench::BenchGenerateArgs),
    /// One ODPO training step on a model shape with random weights: tokens/s, pairs/s, peak memory,
    /// FLOP utilisation against a matmul peak measured here (one JSON line).
    #[command(hide = true)]
    Bench(bench::BenchArgs),
}

#[derive(Args)]
struct RewardModelArgs {
    /// Scored texts: `{"prompt", "text", "reward"}` per line (the paper's IMDB file, or `sample`'s
    /// output); fits a ridge regression.
    #[arg(long, required_unless_present = "pairs", conflicts_with = "pairs")]
    data: Option<PathBuf>,
    /// Preference pairs: a data file (its format from `--format` or its extension), or a data config
    /// `.toml` (`datasets/tldr/dataset.toml`); fits a Bradley–Terry model. Scores in the data are not
    /// needed; where every pair has them, a ridge model's held-out pair accuracy is reported beside.
    #[arg(long)]
    pairs: Option<PathBuf>,
    /// The format of `--pairs` when it is not a `.toml`: jsonl, parquet, scored-jsonl or tldr-json.
    #[arg(long, requires = "pairs")]
    format: Option<String>,
    /// With `--pairs`: write every pair the model orders as the data does to this JSONL file, with
    /// `score_chosen` and `score_rejected` from the model, ready for `format = "jsonl"` and
    /// `[data.offset]`; pairs it orders the other way (an offset would need `s_w > s_l`) are left
    /// out and counted.
    #[arg(long, requires = "pairs")]
    scored_out: Option<PathBuf>,
    /// The transformer under the head: a HF folder or a `.gguf` file.
    #[arg(long)]
    backbone: PathBuf,
    /// Where to write the reward model (`reward.json`, `head.json`).
    #[arg(long)]
    out: PathBuf,
    /// Tokens of prompt + separator + text kept.
    #[arg(long, default_value_t = 128, value_parser = positive)]
    max_length: usize,
    /// Which tokens a longer text keeps: `start` (the first), or `end` (the last: the response
    /// after a long prompt).
    #[arg(long, default_value = "start", value_parser = ["start", "end"])]
    keep: String,
    /// Pooling of the final hidden states: `mean`, or `last` (the last token's). Default: `mean`
    /// for `--data`, `last` for `--pairs`.
    #[arg(long, value_parser = ["mean", "last"])]
    pooling: Option<String>,
    /// Joins prompt and text.
    #[arg(long, default_value = " ")]
    separator: String,
    /// Share of the prompts held out for the reported figures.
    #[arg(long, default_value_t = 0.2, value_parser = share)]
    heldout: f64,
    /// Use only N texts (`--data`) or pairs (`--pairs`), every k-th, for a quicker fit.
    #[arg(long, value_parser = positive)]
    limit: Option<usize>,
    /// Seed of the prompt split.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Backend.
    #[arg(long, default_value = "flex", value_parser = crate::backend_spec)]
    backend: String,
}

#[derive(Args)]
struct ExperimentArgs {
    /// An experiment config (configs/pipeline/smollm2-imdb.toml).
    #[arg(long)]
    config: PathBuf,
    /// Backend; overrides the config's `backend`.
    #[arg(long, value_parser = crate::backend_spec)]
    backend: Option<String>,
}

#[derive(Args)]
struct TrainArgs {
    /// The run config (configs/NAME.toml). Not needed with --resume.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Backend (flex, wgpu, vulkan, metal, cuda, tch, tch-cuda); overrides `train.backend`.
    #[arg(long, value_parser = crate::backend_spec)]
    backend: Option<String>,
    /// Data-parallel devices of the backend, e.g. `--devices cuda:0,cuda:1`; overrides `train.devices`.
    #[arg(long, value_delimiter = ',', value_name = "DEVICE,...")]
    devices: Vec<String>,
    /// Override a config key, e.g. `--set optim.lr=1e-6` (repeatable; the value is parsed as TOML).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Continue the run in this folder from its newest checkpoint; a built-in pipeline's folder
    /// (`runs/default`) keeps its finished stages and online rounds and resumes the rest.
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
}

#[derive(Args)]
struct SampleArgs {
    /// A HF model folder (with its tokenizer).
    #[arg(long)]
    model: PathBuf,
    /// Prompts, one a line.
    #[arg(long)]
    prompts: PathBuf,
    /// Where to write `{"prompt", "text", "reward"}` lines.
    #[arg(long)]
    out: PathBuf,
    /// How responses are scored: `known` (the built-in task's ground-truth reward) or
    /// `table:FILE` (a scored JSONL whose texts already carry rewards).
    #[arg(long, default_value = "known")]
    reward: String,
    /// Responses per prompt.
    #[arg(long, default_value_t = 4, value_parser = positive)]
    k: usize,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Longest response in tokens [default: 32, or what a learned position table (GPT-2, GPT-Neo)
    /// leaves after the longest prompt when that is fewer].
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Backend.
    #[arg(long, default_value = "flex", value_parser = crate::backend_spec)]
    backend: String,
}

#[derive(Args)]
struct EvalArgs {
    /// A run folder made by `train` without `--config` (holds `pipeline.toml`).
    #[arg(long)]
    run: PathBuf,
    /// Samples per held-out prompt (default: the run's setting).
    #[arg(long, value_parser = positive)]
    samples_per_prompt: Option<usize>,
    /// Sampler seed (default: the run's `seed`, which gives its own evaluation again).
    #[arg(long)]
    seed: Option<u64>,
    /// Backend.
    #[arg(long, default_value = "flex", value_parser = crate::backend_spec)]
    backend: String,
}

#[derive(Args)]
struct FrontierArgs {
    /// A frontier config (configs/pipeline/frontier.toml).
    #[arg(long, required_unless_present = "resume")]
    config: Option<PathBuf>,
    /// Go on with the sweep in this folder (`runs/NAME`), under the configs written there: its
    /// finished runs are kept, a run cut short resumes from its checkpoint.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["config", "sets"])]
    resume: Option<PathBuf>,
    /// Override a key of the base pipeline config (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Backend; default: the base pipeline config's `backend`.
    #[arg(long, value_parser = crate::backend_spec)]
    backend: Option<String>,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Counts of prompts, responses, pairs, ties and dropped rows, token lengths, offsets.
    Stats(DataStatsArgs),
}

#[derive(Args)]
struct DataStatsArgs {
    /// A data config, or a run config with a `[data]` table.
    #[arg(long, conflicts_with_all = ["data", "format"])]
    config: Option<PathBuf>,
    /// A data file (with --format).
    #[arg(long, requires = "format")]
    data: Option<PathBuf>,
    /// The file's format: jsonl, parquet, scored-jsonl, tldr-json.
    #[arg(long)]
    format: Option<String>,
    /// `tokenizer.json` or a model folder, for token length statistics.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

#[derive(Args)]
struct ModelArgs {
    /// A HF model folder (config.json + safetensors) or a llama.cpp `.gguf` file.
    #[arg(long)]
    model: PathBuf,
    /// `tokenizer.json`, or a folder holding it; defaults to the model's folder.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Backend: flex, wgpu, vulkan, metal, cuda, tch, tch-cuda.
    #[arg(long, default_value = "flex", value_parser = crate::backend_spec)]
    backend: String,
    /// Render the prompt as a user turn with the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Precision of weights and compute: f32, f16, bf16.
    #[arg(long, default_value = "f32")]
    precision: String,
    /// LoRA adapters in PEFT's layout (`adapter_config.json` + `adapter_model.safetensors`) to put
    /// on the model, e.g. a LoRA run's `adapter/` folder.
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Maximum number of new tokens [default: 64, or what a learned position table (GPT-2,
    /// GPT-Neo) leaves after the prompt when that is fewer].
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Greedy decoding (the default is sampling).
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"])]
    greedy: bool,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Nucleus sampling threshold (1.0 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print JSON (tokens, text, log-probabilities) instead of the text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LogprobsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt text (not scored).
    #[arg(long)]
    prompt: String,
    /// The completion text (scored).
    #[arg(long)]
    completion: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ExportGgufArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The GGUF file to write.
    #[arg(long)]
    out: PathBuf,
    /// How the matrices are stored: f16 (half the size), q8_0 (ggml's 8-bit blocks, a quarter of
    /// f32 and a little more) or f32 (exactly the weights); vectors are f32.
    #[arg(long, default_value = "f16", value_parser = ["f16", "q8_0", "f32"])]
    dtype: String,
}

/// Where a log line goes: stderr, or the run's `train.log` while burn-train's dashboard holds the
/// terminal (`output.dashboard`).
fn log_writer() -> Box<dyn std::io::Write> {
    #[cfg(feature = "dashboard")]
    if let Some(file) = odpo_trainer::dashboard::log_file() {
        return Box::new(file);
    }
    Box::new(std::io::stderr())
}

/// The log filter without `RUST_LOG`: progress at `info`, except pliron (the IR framework of burn's
/// CUDA kernel compiler), which logs every kernel's IR after every compiler pass at `info`: hundreds
/// of megabytes in a run's first steps on `cuda`.
const DEFAULT_LOG: &str = "info,pliron=warn";

/// Makes burn's default device the host's (flex, else libtorch's CPU) unless `BURN_DEVICE` names
/// one. burn materialises the optimizer state a checkpoint brings back on `Device::default()` (the
/// first step moves it to the run's device), and its own default is the first backend of the build
/// in its order, CUDA before Vulkan before libtorch: in a build with several backends, one this
/// machine may not have, so that `--resume` on `wgpu` panicked starting CUDA. Host memory is always
/// there, and holds the state only until that first step.
fn host_default_device() {
    let host = if cfg!(feature = "flex") {
        "flex"
    } else if cfg!(feature = "tch") {
        "tch"
    } else {
        return;
    };
    if std::env::var_os("BURN_DEVICE").is_none() {
        // SAFETY: the first thing `main` does, while this is the process's only thread, so no
        // other thread reads the environment while it changes.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("BURN_DEVICE", host)
        };
    }
}

fn main() -> ExitCode {
    host_default_device();
    allocator::reuse_freed_memory();
    subnormals::flush_to_zero();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| DEFAULT_LOG.into()))
        .with_writer(log_writer)
        .init();
    let cli = Cli::parse();
    if let Some(routine) = cli.matmul {
        odpo_kernels::set_matmul_routine(routine);
    }
    // Commands that train stop at a step boundary on SIGTERM / SIGINT, with a checkpoint; sampling
    // and a reward model's features stop at a batch boundary, their finished batches journaled.
    let trains = matches!(cli.command, Command::Train(_) | Command::Experiment(_) | Command::Frontier(_) | Command::Sample(_) | Command::RewardModel(_));
    if trains && let Err(e) = odpo_trainer::interrupt::install() {
        eprintln!("warning: SIGTERM and SIGINT will end the run without a checkpoint: {e}");
    }
    // A batch the device has no memory for is an error, not a crash, whichever backend says so.
    let result = odpo_model::out_of_memory::catch(|| run(cli)).unwrap_or_else(|cause| Err(cause.into()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match interrupted(&e) {
            Some((step, run_dir)) => {
                eprintln!("stopped on request (a signal, or the dashboard's stop) after step {step}, with a checkpoint in {}", run_dir.display());
                // A stage of the built-in pipeline or a run of a sweep: resume that, whose folder is above.
                match resume_command(&run_dir) {
                    Some(command) => eprintln!("{command}"),
                    None => eprintln!("resume with: odpo train --resume {}", run_dir.display()),
                }
                ExitCode::from(odpo_trainer::interrupt::EXIT_INTERRUPTED)
            }
            None => {
                if let Some(odpo_pipeline::PipelineError::Stopped { task, done, total, unit, kept, run_dir }) = pipeline_error(&e) {
                    match kept {
                        Some(journal) => eprintln!("stopped on request while {task}, after {done} of {total} {unit}, kept in {}", journal.display()),
                        None => eprintln!("stopped on request while {task}, after {done} of {total} {unit} (computed again on resume)"),
                    }
                    // A stage of the built-in pipeline: resume the pipeline; else the same command
                    // reads the journal, or computes the pass again.
                    match run_dir.as_deref().and_then(resume_command) {
                        Some(command) => eprintln!("{command}"),
                        None => eprintln!("resume by running the same command again"),
                    }
                    return ExitCode::from(odpo_trainer::interrupt::EXIT_INTERRUPTED);
                }
                match out_of_memory(&e) {
                    Some(message) => eprintln!("error: {message}"),
                    None => eprintln!("error: {}", render(&e)),
                }
                ExitCode::from(2)
            }
        },
    }
}

/// How to go on with the built-in pipeline, the frontier sweep or the experiment whose folder holds
/// `dir` (a stage's or a run's folder, or its own).
fn resume_command(dir: &Path) -> Option<String> {
    dir.ancestors().find_map(|d| {
        if odpo_pipeline::frontier::is_sweep_dir(d) {
            Some(format!("resume with: odpo frontier --resume {}", d.display()))
        } else if d.join("pipeline.toml").is_file() {
            Some(format!("resume with: odpo train --resume {}", d.display()))
        } else {
            // `odpo experiment` keeps its folder (runs/NAME) and goes on in it when run again.
            d.join("experiment.toml").is_file().then(|| format!("resume by running the same `odpo experiment` command again: it goes on in {}", d.display()))
        }
    })
}

/// `{e:#}` (each cause after its context) without repeats: an error whose message already holds its
/// source (`config.json: No such file …` above the `io::Error` itself) would print the cause twice.
fn render(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain().map(ToString::to_string) {
        if out.contains(&cause) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&cause);
    }
    out
}

/// An out-of-memory error said shortly (a cubecl backend's read-back error is pages long), with how
/// to continue a run whose checkpoints were kept.
fn out_of_memory(e: &anyhow::Error) -> Option<String> {
    if let Some(t @ odpo_trainer::TrainError::OutOfMemory { run_dir, .. }) = train_error(e) {
        let kept = run_dir.as_ref().filter(|dir| odpo_trainer::checkpoint::list(dir).is_ok_and(|c| !c.is_empty()));
        return Some(match kept {
            Some(dir) => format!("{t}\nthe run's checkpoints in {} are kept: `odpo train --resume {}` continues from the newest (`--set KEY=VALUE` changes a key)", dir.display(), dir.display()),
            None => t.to_string(),
        });
    }
    use odpo_model::out_of_memory::OutOfMemory;
    let cause = e.downcast_ref::<OutOfMemory>().cloned().or_else(|| OutOfMemory::find(&format!("{e:#}")))?;
    tracing::debug!("{e:#}");
    Some(format!("out of memory on the device: {cause}; smaller batches or shorter sequences need less"))
}

/// The trainer's error in `e`'s chain, as it is or inside the pipeline's.
fn train_error(e: &anyhow::Error) -> Option<&odpo_trainer::TrainError> {
    e.chain().find_map(|c| {
        c.downcast_ref::<odpo_trainer::TrainError>().or_else(|| match c.downcast_ref::<odpo_pipeline::PipelineError>() {
            Some(odpo_pipeline::PipelineError::Train(t)) => Some(t),
            _ => None,
        })
    })
}

/// The pipeline's error in `e`'s chain.
fn pipeline_error(e: &anyhow::Error) -> Option<&odpo_pipeline::PipelineError> {
    e.chain().find_map(|c| c.downcast_ref::<odpo_pipeline::PipelineError>())
}

/// The step and run folder of a run that stopped on request, however deep the error.
fn interrupted(e: &anyhow::Error) -> Option<(usize, PathBuf)> {
    match train_error(e)? {
        odpo_trainer::TrainError::Interrupted { step, run_dir, .. } => Some((*step, run_dir.clone())),
        _ => None,
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => cmd_train(a, cli.matmul),
        Command::Sample(a) => cmd_sample(a),
        Command::Eval(a) => cmd_eval(a),
        Command::Frontier(a) => cmd_frontier(a),
        Command::Data(DataCommand::Stats(a)) => cmd_data_stats(a),
        Command::Generate(a) => cmd_generate(a),
        Command::Logprobs(a) => cmd_logprobs(a),
        Command::ExportGguf(a) => cmd_export_gguf(a),
        Command::Experiment(a) => cmd_experiment(a),
        Command::BenchForward(a) => bench::cmd_bench_forward(a),
        Command::BenchGenerate(a) => bench::cmd_bench_generate(a),
        Command::Bench(a) => bench::cmd_bench(a),
        Command::RewardModel(a) => cmd_reward_model(a),
    }
}

fn load(args: &ModelArgs) -> Result<(LoadedModel, Tokenizer, Device)> {
    let device = backend::device(&args.backend)?;
    let t = std::time::Instant::now();
    let precision: odpo_model::Precision = args.precision.parse()?;
    let mut loaded = CausalLm::load(&args.model, &device).with_context(|| format!("loading {}", args.model.display()))?;
    if let Some(dir) = &args.adapter {
        let (model, lora) = loaded.model.load_peft(dir, &device).with_context(|| format!("loading adapters from {}", dir.display()))?;
        tracing::info!(rank = lora.rank, projections = lora.targets.len(), parameters = ?lora.target_parameters, "LoRA adapters from {}", dir.display());
        loaded.model = model;
    }
    loaded.model = loaded.model.with_precision(precision);
    tracing::info!(
        "loaded {} ({:.1}M parameters) in {:.1}s",
        args.model.display(),
        loaded.model.num_params() as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let tok_path = args.tokenizer.clone().unwrap_or_else(|| loaded.tokenizer_path.clone());
    let tokenizer = open_tokenizer(&tok_path)?;
    Ok((loaded, tokenizer, device))
}

fn open_tokenizer(path: &Path) -> Result<Tokenizer> {
    Tokenizer::open(path).with_context(|| format!("no usable tokenizer at {} (pass --tokenizer)", path.display()))
}

fn cmd_export_gguf(a: ExportGgufArgs) -> Result<()> {
    let (loaded, tok, _) = load(&a.model)?;
    let dtype = match a.dtype.as_str() {
        "f32" => odpo_model::gguf::GgufDtype::F32,
        "q8_0" => odpo_model::gguf::GgufDtype::Q8_0,
        _ => odpo_model::gguf::GgufDtype::F16,
    };
    odpo_model::gguf::save_gguf(&loaded.model, &loaded.config, &tok, &a.out, dtype)?;
    let bytes = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    println!("wrote {} ({:.1} MB, {} matrices)", a.out.display(), bytes as f64 / 1e6, a.dtype);
    Ok(())
}

fn render_prompt(tok: &Tokenizer, prompt: &str, chat: bool) -> Result<String> {
    if chat {
        if !tok.has_chat_template() {
            bail!("--chat: the tokenizer has no chat template");
        }
        Ok(tok.chat_prompt(prompt)?)
    } else {
        Ok(prompt.to_string())
    }
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let (loaded, tok, device) = load(&a.model)?;
    let prompt = render_prompt(&tok, &a.prompt, a.model.chat)?;
    let ids = tok.encode(&prompt, !a.model.chat)?;
    let eos: Vec<u32> = tok.eos_token_id().or(loaded.config.eos_token_id()).into_iter().collect();
    let cfg = GenerationConfig {
        max_new_tokens: new_tokens(a.max_new_tokens, ids.len(), loaded.model.position_limit(), 64)?,
        pad_token_id: tok.pad_token_id().or(eos.first().copied()).unwrap_or(0),
        eos_token_ids: eos,
        sampling: SamplingConfig { greedy: a.greedy, temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed },
    };
    let t = std::time::Instant::now();
    // Plain output is printed as it is generated; a piece the stream cannot place is left to the
    // whole decode at the end.
    let mut stream = (!a.json).then(|| tok.decode_stream(false));
    let mut printed = String::new();
    let out = generate_with(&loaded.model, &[ids], &cfg, &device, |_, token| {
        let Some(s) = stream.as_mut() else { return };
        match s.step(token) {
            Ok(Some(piece)) => {
                use std::io::Write;
                print!("{piece}");
                let _ = std::io::stdout().flush();
                printed.push_str(&piece);
            }
            Ok(None) => {}
            Err(_) => stream = None,
        }
    })?;
    let secs = t.elapsed().as_secs_f64();
    let tokens = &out.tokens[0];
    let text = tok.decode(tokens, false)?;
    if a.json {
        let v = serde_json::json!({ "prompt": prompt, "tokens": tokens, "text": text, "logprobs": out.logprobs[0] });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if let Some(rest) = text.strip_prefix(printed.as_str()) {
        println!("{rest}");
    } else {
        println!();
        tracing::warn!("the text printed as it came differs from the whole decode, which follows");
        println!("{text}");
    }
    tracing::info!("{} tokens in {:.2}s ({:.1} tokens/s)", tokens.len(), secs, tokens.len() as f64 / secs);
    Ok(())
}

/// New tokens after a prompt of `prompt` tokens: `--max-new-tokens` where given, else `default`,
/// or fewer where the model's learned position table (`limit`) has less room.
fn new_tokens(flag: Option<usize>, prompt: usize, limit: Option<usize>, default: usize) -> Result<usize> {
    let Some(limit) = limit else { return Ok(flag.unwrap_or(default)) };
    let room = limit.saturating_sub(prompt);
    match flag {
        Some(n) if n > room => bail!(
            "--max-new-tokens {n}: a prompt of {prompt} tokens and {n} new ones need {} positions; the model has {limit} (its learned position table); pass --max-new-tokens {room} or less",
            prompt + n
        ),
        Some(n) => Ok(n),
        None if room == 0 => bail!("the prompt's {prompt} tokens fill the model's {limit} positions (its learned position table): no room for a new token"),
        None => Ok(room.min(default)),
    }
}

fn cmd_logprobs(a: LogprobsArgs) -> Result<()> {
    let (loaded, tok, device) = load(&a.model)?;
    let prompt = render_prompt(&tok, &a.prompt, a.model.chat)?;
    let p = tok.encode(&prompt, !a.model.chat)?;
    let c = tok.encode(&a.completion, false)?;
    if p.is_empty() || c.is_empty() {
        bail!("the prompt and the completion must each have at least one token");
    }
    let n = p.len() + c.len();
    loaded.model.check_positions(n, || format!("a prompt of {} tokens and a completion of {}", p.len(), c.len()))?;
    loaded.model.check_tokens(p.iter().chain(&c), || "the prompt and completion, as the tokenizer encodes them,".into())?;
    let ids: Vec<i64> = p.iter().chain(&c).map(|&x| i64::from(x)).collect();
    let loss_mask: Vec<f32> = (0..n).map(|i| if i >= p.len() { 1.0 } else { 0.0 }).collect();
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
    let mask = Tensor::<2, Int>::ones([1, n], &device);
    // The LM head on the completion's columns only, in runs of rows that fit one buffer.
    let loss_mask = Tensor::from_data(TensorData::new(loss_mask, [1, n]), &device);
    let (sum, count) = completion_logprobs(&loaded.model, input, &mask, loss_mask, p.len());
    let sum = f64::from(sum.into_scalar::<f32>());
    let count = f64::from(count.into_scalar::<f32>());
    if a.json {
        let v = serde_json::json!({
            "prompt_tokens": p.len(), "completion_tokens": c.len(),
            "completion_logprob_sum": sum, "completion_logprob_mean": sum / count,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("prompt tokens:     {}", p.len());
        println!("completion tokens: {}", c.len());
        println!("log p(completion | prompt) = {sum:.6} (mean {:.6} per token)", sum / count);
    }
    Ok(())
}

fn cmd_train(mut a: TrainArgs, matmul: Option<odpo_kernels::MatmulRoutine>) -> Result<()> {
    // A run config's `train.matmul` yields to the flag, and its run folder records the routine.
    if let Some(routine) = matmul
        && (a.config.is_some() || a.resume.is_some())
    {
        a.sets.push(format!("train.matmul=\"{routine}\""));
    }
    if !a.devices.is_empty() {
        if a.config.is_none() && a.resume.is_none() {
            anyhow::bail!("--devices needs --config (or --resume): the built-in default run trains on one device");
        }
        let list: Vec<String> = a.devices.iter().map(|d| serde_json::Value::String(d.clone()).to_string()).collect();
        a.sets.push(format!("train.devices=[{}]", list.join(",")));
    }
    if let Some(dir) = a.resume.as_ref().filter(|d| odpo_pipeline::frontier::is_sweep_dir(d)) {
        anyhow::bail!("--resume {}: a frontier sweep's folder; go on with it by `odpo frontier --resume {}`", dir.display(), dir.display());
    }
    if let Some(dir) = a.resume.as_ref().filter(|d| d.join("pipeline.toml").exists()) {
        // A built-in pipeline's folder: its finished stages and rounds are kept, the rest resumed.
        let config = dir.join("pipeline.toml");
        let backend = match &a.backend {
            Some(b) => b.clone(),
            None => odpo_pipeline::PipelineConfig::from_file(&config, &a.sets)?.backend.name().to_string(),
        };
        let device = backend::device(&backend)?;
        let opts = odpo_pipeline::DefaultOptions { config: Some(config), sets: a.sets, run_dir: Some(dir.clone()), verbose: true };
        odpo_pipeline::run_default(&opts, &device)?;
        return Ok(());
    }
    if a.config.is_none() && a.resume.is_none() {
        // The built-in default: the known-reward task end to end, on `--backend`, else its `backend`.
        let backend = match a.backend {
            Some(b) => b,
            None => odpo_pipeline::PipelineConfig::default_with(&a.sets)?.backend.name().to_string(),
        };
        let device = backend::device(&backend)?;
        let opts = odpo_pipeline::DefaultOptions { sets: a.sets, verbose: true, ..Default::default() };
        // With `verbose`, the pipeline prints each stage and the summary itself.
        odpo_pipeline::run_default(&opts, &device)?;
        return Ok(());
    }
    let s = train_from_config(a.config.as_deref(), a.backend.as_deref(), &a.sets, a.resume.as_deref())?;
    println!("run folder:   {}", s.run_dir.display());
    println!("steps:        {}", s.steps);
    if let Some(step) = s.resumed_from {
        println!("resumed from: step {step}");
    }
    if let Some((first, last)) = s.train_loss {
        println!("train loss:   {first:.4} -> {last:.4}");
    }
    if s.stopped_early {
        println!("stopped:      early (eval.early_stopping)");
    }
    let after = match s.best_step {
        Some(step) => format!("eval best (step {step}, the exported model)"),
        None => "eval after".to_string(),
    };
    for (name, m) in [("eval before", &s.eval_start), (after.as_str(), &s.eval_end)] {
        if let Some(m) = m {
            let items: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v:.4}")).collect();
            println!("{name}:  {}", items.join(" "));
        }
    }
    println!("metrics:      {}", s.run_dir.join("metrics.jsonl").display());
    if let Some(dir) = s.exported {
        println!("model:        {}", dir.display());
    }
    Ok(())
}

/// `odpo train --config FILE` (or `--resume RUN_DIR`, which reads the folder's resolved `config.toml`):
/// `--set` overrides applied, the backend picked (`--backend` overrides `train.backend`), then the
/// trainer on one device or data-parallel over `train.devices`.
fn train_from_config(config: Option<&Path>, backend: Option<&str>, sets: &[String], resume: Option<&Path>) -> Result<odpo_trainer::RunSummary> {
    let path = match (resume, config) {
        (Some(run_dir), _) => run_dir.join("config.toml"),
        (None, Some(config)) => config.to_path_buf(),
        (None, None) => bail!("--config FILE is required unless --resume RUN_DIR is given"),
    };
    // `--backend` is applied as the first override, so that `train.devices` is checked against it.
    let sets: Vec<String> = backend.map(|b| format!("train.backend={}", serde_json::Value::String(b.to_string()))).into_iter().chain(sets.iter().cloned()).collect();
    let mut cfg = odpo_trainer::RunConfig::from_file(&path, &sets)?;
    if let Some(run_dir) = resume {
        // The run folder is where it is now, whatever the saved config says.
        let mut moved = cfg.into_inner();
        moved.output.dir = run_dir.to_path_buf();
        cfg = moved.check()?;
    }
    let devices = backend::devices(cfg.train.backend.name(), &cfg.train.devices)?;
    tracing::info!(backend = cfg.train.backend.name(), devices = ?cfg.train.devices, run = %cfg.output.dir.display(), "training");
    if let [device] = devices.as_slice() {
        return Ok(odpo_trainer::train(&cfg, device, resume.is_some())?);
    }
    let data = odpo_trainer::load_data(&cfg)?;
    Ok(odpo_trainer::train_on_devices(&cfg, data, &devices, resume.is_some(), Some(&odpo_trainer::tokenizer_path(&cfg.model)))?)
}

/// A count that must be at least 1 (a batch, a length, a number of samples or runs).
pub(crate) fn positive(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("expected at least 1, got 0".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{s}` is not a whole number")),
    }
}

/// A share strictly between 0 and 1 (a held-out fraction: both sides need members).
fn share(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x > 0.0 && x < 1.0 => Ok(x),
        Ok(x) => Err(format!("expected a share between 0 and 1 (both excluded), got {x}")),
        Err(_) => Err(format!("`{s}` is not a number")),
    }
}

/// `--backend`, checked when the flags are read: a backend name (flex, wgpu, vulkan, metal, cuda,
/// tch, tch-cuda), optionally with a device (`cuda:1`).
fn backend_spec(spec: &str) -> std::result::Result<String, String> {
    let name = spec.split(':').next().unwrap_or(spec);
    name.parse::<backend::Backend>().map(|_| spec.to_string()).map_err(|_| format!("`{name}` is not a backend; expected one of: {}", backend::BACKEND_NAMES.join(", ")))
}

/// `--format NAME` as a data format.
fn parse_format(name: &str) -> Result<odpo_data::Format> {
    // The parse error lists the known formats itself.
    name.parse().context("--format")
}

fn cmd_data_stats(a: DataStatsArgs) -> Result<()> {
    let cfg = match (&a.config, &a.data, &a.format) {
        (Some(path), _, _) => odpo_data::DataConfig::from_toml_file(path)?,
        (None, Some(data), Some(format)) => {
            odpo_data::DataConfig::new(data, parse_format(format)?)
        }
        _ => bail!("give --config FILE, or --data PATH with --format NAME"),
    };
    let tok = a.tokenizer.as_deref().map(open_tokenizer).transpose()?;
    print!("{}", odpo_data::stats(&cfg, tok.as_ref())?);
    Ok(())
}

fn cmd_sample(a: SampleArgs) -> Result<()> {
    let device = backend::device(&a.backend)?;
    let prompts = odpo_pipeline::sample::read_prompts(&a.prompts)?;
    let reward = odpo_pipeline::sample::reward_from_spec(&a.reward, &device).with_context(|| format!("--reward `{}`", a.reward))?;
    let max_new_tokens = sample_length(&a.model, &prompts, a.max_new_tokens)?;
    let settings = odpo_pipeline::SampleSettings { k: a.k, temperature: a.temperature, max_new_tokens, seed: a.seed };
    let report = odpo_pipeline::sample(&a.model, &prompts, &settings, reward.as_ref(), &a.out, &device)?;
    println!("{} responses to {} prompts, mean reward {:.4}, written to {}", report.responses, prompts.len(), report.mean_reward, report.path.display());
    Ok(())
}

/// `sample`'s response length: `--max-new-tokens` where given, else 32, or fewer where the model's
/// learned position table has less room after the longest prompt.
fn sample_length(model: &std::path::Path, prompts: &[String], flag: Option<usize>) -> Result<usize> {
    const DEFAULT: usize = 32;
    let config = model.join("config.json");
    let limit = if config.is_file() { odpo_model::ModelConfig::from_file(&config)?.position_limit() } else { None };
    if limit.is_none() {
        return Ok(flag.unwrap_or(DEFAULT));
    }
    let tokenizer = Tokenizer::open(model)?;
    let mut longest = 0;
    for p in prompts {
        longest = longest.max(tokenizer.encode(p, true)?.len());
    }
    new_tokens(flag, longest, limit, DEFAULT)
}

/// A fit's rows counted against the fewest it takes, naming the flag and its file.
fn too_few(path: &std::path::Path, flag: &str, n: usize, what: &str, limit: Option<usize>) -> Result<()> {
    let least = odpo_pipeline::learned::MIN_FIT_ROWS;
    if n < least {
        let limited = limit.map(|l| format!(" with --limit {l}")).unwrap_or_default();
        bail!("{flag} {}: {n} {what}{limited}; at least {least} are needed to fit a reward model", path.display());
    }
    Ok(())
}

fn cmd_reward_model(a: RewardModelArgs) -> Result<()> {
    use odpo_pipeline::learned::{FeatureSpec, FitOptions, Keep, LearnedReward, Pooling};
    let device = backend::device(&a.backend)?;
    let pooling = match a.pooling.as_deref() {
        Some("last") => Pooling::Last,
        Some(_) => Pooling::Mean,
        None if a.pairs.is_some() => Pooling::Last,
        None => Pooling::Mean,
    };
    let keep = if a.keep == "end" { Keep::End } else { Keep::Start };
    let opts = FitOptions {
        backbone: a.backbone.clone(),
        features: FeatureSpec { max_length: a.max_length, separator: a.separator.clone(), pooling, keep },
        heldout_fraction: a.heldout,
        seed: a.seed,
        // Kept until the model is saved: a fit stopped, or refused after the features (a split
        // with no held-out pairs), goes on from them when run again.
        journal: Some(a.out.join("features.journal")),
        ..Default::default()
    };
    let saved = || {
        if let Some(journal) = &opts.journal {
            let _ = std::fs::remove_file(journal);
        }
    };
    // A spread of the file rather than its start: every k-th entry.
    let spread = |n: usize, len: usize| (len / n.max(1)).max(1);
    let Some(pairs_path) = &a.pairs else {
        let Some(data) = &a.data else { bail!("give --data FILE (scored texts) or --pairs FILE (preference pairs)") };
        let mut entries = odpo_pipeline::ScoreTable::from_jsonl(data)?.entries();
        if let Some(n) = a.limit {
            let k = spread(n, entries.len());
            entries = entries.into_iter().step_by(k).take(n).collect();
        }
        too_few(data, "--data", entries.len(), "scored texts", a.limit)?;
        let (model, report) = LearnedReward::fit(&entries, &opts, &device)?;
        model.save(&a.out)?;
        saved();
        println!("fitted on {} texts, {} held out (by prompt); ridge penalty {}", report.train_texts, report.heldout_texts, report.l2);
        println!("held-out Spearman {:.4}, Pearson {:.4}, RMSE {:.4} (score std {:.4}); backbone features in {:.0} s", report.spearman, report.pearson, report.rmse, report.heldout_std, report.feature_seconds);
        println!("saved to {} (use --reward learned:{0})", a.out.display());
        return Ok(());
    };

    let mut cfg = if pairs_path.extension().is_some_and(|e| e == "toml") {
        odpo_data::DataConfig::from_toml_file(pairs_path)?
    } else {
        // `pairs.jsonl.gz` is read through gzip (odpo-data): its format is the name's before `.gz`.
        let name = if pairs_path.extension().is_some_and(|e| e == "gz") { pairs_path.with_extension("") } else { pairs_path.clone() };
        let format = match (a.format.as_deref(), name.extension().and_then(|e| e.to_str())) {
            (Some(f), _) => f.to_string(),
            (None, Some("jsonl")) => "jsonl".into(),
            (None, Some("parquet")) => "parquet".into(),
            (None, Some("json")) => "tldr-json".into(),
            _ => bail!("--pairs {}: give --format (jsonl, parquet, scored-jsonl or tldr-json)", pairs_path.display()),
        };
        odpo_data::DataConfig::new(pairs_path, parse_format(&format)?)
    };
    // The pairs as they are: no offsets (they need scores), no held-out split (the fit splits by prompt).
    (cfg.offset, cfg.eval_fraction) = (None, 0.0);
    let mut loaded = odpo_data::load(&cfg)?.pairs;
    if let Some(n) = a.limit {
        let k = spread(n, loaded.len());
        loaded = loaded.into_iter().step_by(k).take(n).collect();
    }
    let pairs: Vec<odpo_pipeline::learned::PairText> = loaded
        .iter()
        .map(|p| odpo_pipeline::learned::PairText {
            prompt: p.prompt.flat(),
            chosen: p.chosen.flat(),
            rejected: p.rejected.flat(),
            scores: p.score_chosen.zip(p.score_rejected),
        })
        .collect();
    too_few(pairs_path, "--pairs", pairs.len(), "pairs", a.limit)?;
    let odpo_pipeline::learned::PairFit { model, report, pair_scores } = LearnedReward::fit_pairs(&pairs, &opts, &device)?;
    model.save(&a.out)?;
    saved();
    println!(
        "Bradley–Terry on {} pairs ({} prompts), {} held out ({} prompts); {} texts through the backbone in {:.0} s; penalty {}",
        report.train_pairs, report.train_prompts, report.heldout_pairs, report.heldout_prompts, report.texts, report.feature_seconds, report.l2
    );
    println!("held-out pair accuracy {:.4} (training {:.4}), log-loss {:.4} (chance 0.6931)", report.accuracy, report.train_accuracy, report.log_loss);
    if let Some(r) = report.regression_accuracy {
        println!("ridge regression on the training texts' scores, same held-out pairs: accuracy {r:.4}");
    }
    println!("saved to {} (use --reward learned:{0})", a.out.display());
    if let Some(out) = &a.scored_out {
        let mut text = String::new();
        let mut reversed = 0;
        for (p, &(chosen, rejected)) in loaded.iter().zip(&pair_scores) {
            if chosen <= rejected {
                reversed += 1;
                continue;
            }
            let row = serde_json::json!({ "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "score_chosen": chosen, "score_rejected": rejected });
            text.push_str(&row.to_string());
            text.push('\n');
        }
        odpo_model::weights::write_atomic(out, text.as_bytes())?;
        println!("{} pairs with the model's scores written to {}; {reversed} the model orders the other way left out", loaded.len() - reversed, out.display());
    }
    Ok(())
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    let device = backend::device(&a.backend)?;
    let report = odpo_pipeline::eval_run(&a.run, a.samples_per_prompt, a.seed, &device)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn cmd_experiment(a: ExperimentArgs) -> Result<()> {
    let cfg = odpo_pipeline::ExperimentConfig::from_file(&a.config)?;
    let device = backend::device(a.backend.as_deref().unwrap_or(cfg.backend.name()))?;
    let summary = odpo_pipeline::experiment(&a.config, &device, true)?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

fn cmd_frontier(a: FrontierArgs) -> Result<()> {
    let summary = match (&a.resume, &a.config) {
        (Some(dir), _) => {
            if !odpo_pipeline::frontier::is_sweep_dir(dir) {
                anyhow::bail!("--resume {}: no frontier.toml and pipeline.toml there; expected the folder of a frontier sweep (runs/NAME)", dir.display());
            }
            let backend = match a.backend {
                Some(b) => b,
                None => odpo_pipeline::PipelineConfig::from_file(&dir.join("pipeline.toml"), &[])?.backend.name().to_string(),
            };
            odpo_pipeline::resume_frontier(dir, &backend::device(&backend)?, true)?
        }
        (None, Some(config)) => {
            let backend = match a.backend {
                Some(b) => b,
                None => odpo_pipeline::frontier::base_config(config, &a.sets)?.backend.name().to_string(),
            };
            odpo_pipeline::frontier(config, &a.sets, &backend::device(&backend)?, true)?
        }
        (None, None) => anyhow::bail!("give --config FILE, or --resume DIR"),
    };
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A stop's advice names what goes on with the folder the stopped run lies in: the built-in
    /// pipeline's, a frontier sweep's (which holds a pipeline config too) or an experiment's.
    #[test]
    fn a_stop_names_the_command_that_goes_on_with_its_folder() {
        let root = tempfile::tempdir().unwrap();
        let folder = |name: &str, files: &[&str]| {
            let dir = root.path().join(name);
            std::fs::create_dir_all(dir.join("runs/run-1")).unwrap();
            for f in files {
                std::fs::write(dir.join(f), "").unwrap();
            }
            dir
        };
        let pipeline = folder("default", &["pipeline.toml"]);
        let sweep = folder("frontier", &["pipeline.toml", "frontier.toml"]);
        let experiment = folder("smollm2", &["experiment.toml"]);
        let configs = folder("configs", &["frontier.toml"]);
        let said = |dir: &Path| resume_command(&dir.join("runs/run-1"));
        assert_eq!(said(&pipeline), Some(format!("resume with: odpo train --resume {}", pipeline.display())));
        assert_eq!(said(&sweep), Some(format!("resume with: odpo frontier --resume {}", sweep.display())));
        assert_eq!(said(&experiment), Some(format!("resume by running the same `odpo experiment` command again: it goes on in {}", experiment.display())));
        // A folder of config files is no sweep: a run there is resumed as a run.
        assert_eq!(said(&configs), None);
    }

    #[test]
    fn the_default_length_of_generate_fits_a_learned_position_table() {
        // Rotary positions: the flag, else 64.
        assert_eq!(new_tokens(None, 40, None, 64).ok(), Some(64));
        assert_eq!(new_tokens(Some(500), 40, None, 64).ok(), Some(500));
        // A table of 32 positions after a prompt of 5 tokens leaves 27.
        assert_eq!(new_tokens(None, 5, Some(32), 64).ok(), Some(27));
        assert_eq!(new_tokens(None, 5, Some(1024), 64).ok(), Some(64));
        assert_eq!(new_tokens(Some(27), 5, Some(32), 64).ok(), Some(27));
        // `sample`'s default, 32, after the built-in task's prompts of 4 tokens: 28.
        assert_eq!(new_tokens(None, 4, Some(32), 32).ok(), Some(28));
        let err = new_tokens(Some(28), 5, Some(32), 64).map(|_| ()).unwrap_err().to_string();
        assert_eq!(
            err,
            "--max-new-tokens 28: a prompt of 5 tokens and 28 new ones need 33 positions; the model has 32 (its learned position table); pass --max-new-tokens 27 or less"
        );
        let err = new_tokens(None, 32, Some(32), 64).map(|_| ()).unwrap_err().to_string();
        assert_eq!(err, "the prompt's 32 tokens fill the model's 32 positions (its learned position table): no room for a new token");
    }
}
