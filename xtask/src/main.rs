//! `cargo xtask`: the project's workflows. Commands that run models build the `odpo` binary
//! (crate `odpo-cli`) with the Cargo feature of the backend asked for, then run it; the
//! backend-to-feature table below is the only place that knows which feature a backend needs.

use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// The project's workflows.
#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Train: --config configs/NAME.toml [--backend B] [--set key=value ...] [--resume RUN_DIR].
    /// With no --config: the built-in known-reward task end to end (`--set loss=dpo` for DPO).
    Train(Passthrough),
    /// Sample and score: --model DIR --prompts FILE --out FILE [--reward known|table:FILE] [--k 4].
    Sample(Passthrough),
    /// Evaluate a pipeline run: --run DIR [--samples-per-prompt N].
    Eval(Passthrough),
    /// The reward-KL frontier: --config configs/pipeline/frontier.toml.
    Frontier(Passthrough),
    /// Data tools: `data stats --config FILE` or `data stats --data PATH --format NAME [--tokenizer PATH]`.
    Data(Passthrough),
    /// Generate text: --model PATH --prompt TEXT [--chat] [--max-new-tokens N] [--greedy | --temperature T --top-p P] [--seed S].
    Generate(Passthrough),
    /// Summed completion log-probability: --model PATH --prompt TEXT --completion TEXT [--chat] [--json].
    Logprobs(Passthrough),
    /// Forward throughput on a model shape with random weights: --config CONFIG_JSON [--batch 8 --seq 128 --repeats 5].
    /// With --vs-pytorch, also runs bench/pytorch/forward.py (python from $ODPO_PYTHON or `python3`) and prints the ratio.
    BenchForward(Passthrough),
}

/// Arguments handed to the `odpo` binary as they are (see `odpo <command> --help`).
#[derive(clap::Args)]
struct Passthrough {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// Backend name -> Cargo feature of `odpo-cli`.
const BACKENDS: &[(&str, &str)] = &[
    ("flex", "flex"),
    ("wgpu", "wgpu"),
    ("vulkan", "vulkan"),
    ("metal", "metal"),
    ("cuda", "cuda"),
    ("tch", "tch"),
    ("tch-cuda", "tch"),
];

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Task::Train(p) => odpo("train", &p.args),
        Task::Data(p) => odpo("data", &p.args),
        Task::Sample(p) => odpo("sample", &p.args),
        Task::Eval(p) => odpo("eval", &p.args),
        Task::Frontier(p) => odpo("frontier", &p.args),
        Task::Generate(p) => odpo("generate", &p.args),
        Task::Logprobs(p) => odpo("logprobs", &p.args),
        Task::BenchForward(p) => bench_forward(p.args),
    }
}

/// The backend named by `--backend X` / `--backend=X` in `args`, default `flex`.
fn backend_of(args: &[String]) -> Result<&str> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--backend" {
            return it.next().map(String::as_str).context("--backend needs a value");
        }
        if let Some(v) = a.strip_prefix("--backend=") {
            return Ok(v);
        }
    }
    Ok("flex")
}

/// Builds and runs `odpo <command> <args>` with the feature of the requested backend.
fn odpo(command: &str, args: &[String]) -> Result<ExitCode> {
    let backend = backend_of(args)?;
    let Some(&(_, feature)) = BACKENDS.iter().find(|(b, _)| *b == backend) else {
        let names: Vec<&str> = BACKENDS.iter().map(|(b, _)| *b).collect();
        bail!("unknown backend `{backend}`; expected one of: {}", names.join(", "));
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["run", "--quiet", "--release", "-p", "odpo-cli", "--no-default-features", "--features", feature, "--"])
        .arg(command)
        .args(args)
        .status()
        .context("running cargo")?;
    Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::from(status.code().unwrap_or(1).clamp(1, 255) as u8) })
}

/// Runs the forward benchmark, and with `--vs-pytorch` the PyTorch reference beside it.
fn bench_forward(mut args: Vec<String>) -> Result<ExitCode> {
    let vs = args.iter().any(|a| a == "--vs-pytorch");
    args.retain(|a| a != "--vs-pytorch");
    let code = odpo("bench-forward", &args)?;
    if !vs || code != ExitCode::SUCCESS {
        return Ok(code);
    }
    let python = std::env::var("ODPO_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut py_args = vec!["bench/pytorch/forward.py".to_string()];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if matches!(a.as_str(), "--config" | "--batch" | "--seq" | "--repeats") {
            py_args.push(a.clone());
            py_args.extend(it.next().cloned());
        }
    }
    let status = Command::new(&python).args(&py_args).status().with_context(|| format!("running {python}"))?;
    Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
