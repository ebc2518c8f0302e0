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
    /// Fit a reward model to scored texts: --data FILE --backbone PATH --out DIR [--max-length 128] [--heldout 0.2].
    RewardModel(Passthrough),
    /// The reward-KL frontier: --config configs/pipeline/frontier.toml.
    Frontier(Passthrough),
    /// DPO and ODPO from a pretrained model scored by a reward model: --config FILE [--backend B]
    /// (configs/pipeline/smollm2-imdb.toml is the paper's sentiment experiment). Resumes when rerun.
    Experiment(Passthrough),
    /// Data tools: `data stats --config FILE` or `data stats --data PATH --format NAME [--tokenizer PATH]`.
    Data(Passthrough),
    /// Generate text: --model PATH --prompt TEXT [--chat] [--max-new-tokens N] [--greedy | --temperature T --top-p P] [--seed S].
    Generate(Passthrough),
    /// Summed completion log-probability: --model PATH --prompt TEXT --completion TEXT [--chat] [--json].
    Logprobs(Passthrough),
    /// Forward throughput on a model shape with random weights: --config CONFIG_JSON [--batch 8 --seq 128 --repeats 5].
    /// With --vs-pytorch, also runs bench/pytorch/forward.py (python from $ODPO_PYTHON or `python3`) and prints the ratio.
    BenchForward(Passthrough),
    /// Greedy generation throughput (KV cache) on a model shape with random weights: --config CONFIG_JSON
    /// [--batches 1,8 --prompt 32 --new 64 --repeats 3] [--backend B]. With --vs-pytorch, also runs
    /// bench/pytorch/generate.py (transformers' `generate`) and prints both and the ratio per batch size.
    BenchGenerate(Passthrough),
    /// The ODPO training-step benchmark: each model shape x batch shape in its own process (peak memory
    /// per row). --models tiny,gpt2-124m,smollm2-135m (or config.json paths) --shapes 4x128 [--lora R]
    /// [--backend B] [--repeats N] [--vs-pytorch] [--out FILE.jsonl]. With --vs-pytorch the same step in
    /// PyTorch (bench/pytorch/step.py, python from $ODPO_PYTHON or `python3`) runs after each row, and the
    /// table shows the ratio.
    Bench(BenchArgs),
    /// The conformance suite on one backend or several: the model parity fixtures (nine families
    /// against transformers), the loss fixtures (against PyTorch), three ODPO training steps against
    /// PyTorch, data-parallel and mixed-precision training. [--backend B] or [--backend B1,B2]: one
    /// build with every named backend's feature, the suites run once per backend.
    Conformance(Passthrough),
    /// Installs PyTorch 2.9.0 (the libtorch burn-tch 0.22 links against) from PyPI into a virtual
    /// environment (default ~/.cache/odpo/libtorch-venv) and prints the environment the `tch` backend
    /// needs; `cargo xtask ... --backend tch` finds that environment by itself. [--venv DIR] [--python PY]
    SetupLibtorch(SetupArgs),
}

#[derive(clap::Args)]
struct SetupArgs {
    /// Where to create the virtual environment.
    #[arg(long)]
    venv: Option<std::path::PathBuf>,
    /// The Python that creates it.
    #[arg(long, default_value = "python3")]
    python: String,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Model shapes: names of bench/configs/*.json or paths to config.json files, comma-separated.
    #[arg(long, default_value = "gpt2-tiny,gpt2-124m,smollm2-135m")]
    models: String,
    /// Batch shapes `PAIRSxSEQ`, comma-separated.
    #[arg(long, default_value = "4x128")]
    shapes: String,
    /// Backend of the odpo side.
    #[arg(long, default_value = "flex")]
    backend: String,
    /// Timed steps per row (after 2 warm-up steps).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// LoRA rank (0: full fine-tuning).
    #[arg(long, default_value_t = 0)]
    lora: usize,
    /// Also run the PyTorch reference of each row and print the ratio.
    #[arg(long)]
    vs_pytorch: bool,
    /// CPU threads of the PyTorch side (the odpo side uses every core).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Reference log-probs computed once before the steps (`train.reference = "cached"`, TRL's
    /// `precompute_ref_log_probs`) on both sides; prints what an epoch after the first costs
    /// against the first.
    #[arg(long)]
    cached_reference: bool,
    /// Run the concatenated `[2B, T]` rows on the odpo side, as TRL does, instead of each prompt once.
    #[arg(long)]
    no_shared_prompt: bool,
    /// Append every row's JSON here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
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
        Task::RewardModel(p) => odpo("reward-model", &p.args),
        Task::Frontier(p) => odpo("frontier", &p.args),
        Task::Experiment(p) => odpo("experiment", &p.args),
        Task::Generate(p) => odpo("generate", &p.args),
        Task::Logprobs(p) => odpo("logprobs", &p.args),
        Task::BenchForward(p) => bench_forward(p.args),
        Task::BenchGenerate(p) => bench_generate(p.args),
        Task::Bench(a) => bench(&a),
        Task::Conformance(p) => conformance(&p.args),
        Task::SetupLibtorch(a) => setup_libtorch(&a),
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

/// `cargo run` of `odpo <command> <args>` with the feature of the requested backend.
fn odpo_command(command: &str, args: &[String]) -> Result<Command> {
    let backend = backend_of(args)?;
    let Some(&(_, feature)) = BACKENDS.iter().find(|(b, _)| *b == backend) else {
        let names: Vec<&str> = BACKENDS.iter().map(|(b, _)| *b).collect();
        bail!("unknown backend `{backend}`; expected one of: {}", names.join(", "));
    };
    let mut cmd = cargo_cmd();
    if feature == "tch" {
        libtorch_env(&mut cmd)?;
    }
    cmd.args(["run", "--quiet", "--release", "-p", "odpo-cli", "--no-default-features", "--features", feature, "--"]).arg(command).args(args);
    Ok(cmd)
}

/// Builds and runs `odpo <command> <args>` with the feature of the requested backend.
fn odpo(command: &str, args: &[String]) -> Result<ExitCode> {
    let status = odpo_command(command, args)?.status().context("running cargo")?;
    Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::from(status.code().unwrap_or(1).clamp(1, 255) as u8) })
}

/// `cargo xtask conformance [--backend B]`: the parity, loss and training-step fixtures with the
/// backend's feature; stops at the first failing suite.
fn conformance(args: &[String]) -> Result<ExitCode> {
    // `--backend wgpu,tch`: one build with both features, each suite run once per backend with
    // `BURN_DEVICE` choosing the tests' default device.
    let backends: Vec<&str> = backend_of(args)?.split(',').map(str::trim).filter(|b| !b.is_empty()).collect();
    let mut features = Vec::new();
    for b in &backends {
        let Some(&(_, feature)) = BACKENDS.iter().find(|(name, _)| name == b) else {
            bail!("unknown backend `{b}`");
        };
        if *b == "tch-cuda" && backends.len() > 1 {
            bail!("`tch-cuda` shares the `tch` feature with `tch`; run its conformance on its own");
        }
        if !features.contains(&feature) {
            features.push(feature);
        }
    }
    // One `cargo test` over the three packages: run per package, cargo would unify features
    // differently for each and compile burn once per package.
    let tests = ["parity", "parity_neo", "pytorch_parity", "gradients", "conformance", "shared_prompt", "data_parallel", "mixed_precision"];
    for backend in &backends {
        let mut cmd = cargo_cmd();
        if features.contains(&"tch") {
            libtorch_env(&mut cmd)?;
        }
        if backends.len() > 1 {
            cmd.env("BURN_DEVICE", backend);
        }
        cmd.args(["test", "--profile", "conformance", "-p", "odpo-model", "-p", "odpo-loss", "-p", "odpo-trainer", "--no-default-features", "--features", &features.join(",")]);
        // wgpu's Vulkan loader complains on every device creation without it.
        if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
            cmd.env("XDG_RUNTIME_DIR", std::env::temp_dir());
        }
        for t in tests {
            cmd.args(["--test", t]);
        }
        eprintln!("conformance ({backend}): {}", tests.join(" "));
        let status = cmd.status().context("running cargo test")?;
        if !status.success() {
            eprintln!("conformance ({backend}): failed");
            return Ok(ExitCode::from(1));
        }
        eprintln!("conformance ({backend}): all suites passed");
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs the generation benchmark, and with `--vs-pytorch` transformers' `generate` on the same
/// shapes after it; prints one table.
fn bench_generate(mut args: Vec<String>) -> Result<ExitCode> {
    let vs = args.iter().any(|a| a == "--vs-pytorch");
    args.retain(|a| a != "--vs-pytorch");
    let backend = backend_of(&args)?.to_string();
    eprintln!("odpo ({backend}) generation ...");
    let ours = json_of(&mut odpo_command("bench-generate", &args)?, "odpo bench-generate")?;
    let theirs = if vs {
        let python = std::env::var("ODPO_PYTHON").unwrap_or_else(|_| "python3".into());
        let mut py_args = vec!["bench/pytorch/generate.py".to_string()];
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if matches!(a.as_str(), "--config" | "--batches" | "--prompt" | "--new" | "--repeats" | "--warmup") {
                py_args.push(a.clone());
                py_args.extend(it.next().cloned());
            }
        }
        eprintln!("pytorch generation ...");
        Some(json_of(Command::new(&python).args(&py_args), "bench/pytorch/generate.py")?)
    } else {
        None
    };
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!();
    println!("| batch | {backend} tokens/s (min-max) | PyTorch tokens/s (min-max) | speed ratio |");
    println!("|---|---|---|---|");
    let empty = Vec::new();
    for (i, o) in ours["results"].as_array().unwrap_or(&empty).iter().enumerate() {
        let (t, ratio) = match theirs.as_ref().map(|t| &t["results"][i]) {
            Some(t) if t.is_object() => (
                format!("{:.1} ({:.1}-{:.1})", f(t, "tokens_per_s_median"), f(t, "tokens_per_s_min"), f(t, "tokens_per_s_max")),
                format!("{:.2}x", f(o, "tokens_per_s_median") / f(t, "tokens_per_s_median")),
            ),
            _ => ("-".into(), "-".into()),
        };
        println!(
            "| {} | {:.1} ({:.1}-{:.1}) | {t} | {ratio} |",
            o["batch"], f(o, "tokens_per_s_median"), f(o, "tokens_per_s_min"), f(o, "tokens_per_s_max")
        );
    }
    let rss = |v: &serde_json::Value| v["peak_rss_mib"].as_f64().map_or("-".into(), |x| format!("{x:.0} MiB"));
    println!("\npeak RSS: odpo {}, PyTorch {}", rss(&ours), theirs.as_ref().map_or("-".into(), rss));
    Ok(ExitCode::SUCCESS)
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

/// `cargo xtask bench`: one process per row and side, one table at the end.
fn bench(a: &BenchArgs) -> Result<ExitCode> {
    let Some(&(_, feature)) = BACKENDS.iter().find(|(b, _)| *b == a.backend) else {
        bail!("unknown backend `{}`", a.backend);
    };
    let python = std::env::var("ODPO_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut table = Vec::new();
    for model in a.models.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        let config = if model.ends_with(".json") { model.to_string() } else { format!("bench/configs/{model}.json") };
        if !std::path::Path::new(&config).is_file() {
            bail!("--models: `{model}`: no file {config}");
        }
        for shape in a.shapes.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (pairs, seq) = shape
                .split_once('x')
                .and_then(|(p, s)| Some((p.parse::<usize>().ok()?, s.parse::<usize>().ok()?)))
                .with_context(|| format!("--shapes: `{shape}` is not PAIRSxSEQ, e.g. 4x128"))?;
            let common = ["--config".to_string(), config.clone(), "--pairs".into(), pairs.to_string(), "--seq".into(), seq.to_string(), "--repeats".into(), a.repeats.to_string()];
            let mut odpo_args: Vec<String> = vec!["run", "--quiet", "--release", "-p", "odpo-cli", "--no-default-features", "--features", feature, "--", "bench", "--backend", &a.backend]
                .into_iter()
                .map(String::from)
                .collect();
            odpo_args.extend(common.iter().cloned());
            if a.lora > 0 {
                odpo_args.extend(["--lora".to_string(), a.lora.to_string()]);
            }
            if a.cached_reference {
                odpo_args.push("--cached-reference".into());
            }
            if a.no_shared_prompt {
                odpo_args.push("--no-shared-prompt".into());
            }
            eprintln!("odpo ({}) {model} {shape} ...", a.backend);
            let mut cmd = cargo_cmd();
            if feature == "tch" {
                libtorch_env(&mut cmd)?;
            }
            let ours = json_of(cmd.args(&odpo_args), "odpo bench")?;
            let theirs = if a.vs_pytorch {
                let mut py = vec!["bench/pytorch/step.py".to_string(), "--threads".into(), a.threads.to_string(), "--lora".into(), a.lora.to_string()];
                py.extend(common.iter().cloned());
                if a.cached_reference {
                    py.push("--cached-reference".into());
                }
                eprintln!("pytorch {model} {shape} ...");
                Some(json_of(Command::new(&python).args(&py), "bench/pytorch/step.py")?)
            } else {
                None
            };
            if let Some(out) = &a.out {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new().create(true).append(true).open(out).with_context(|| format!("opening {}", out.display()))?;
                for v in std::iter::once(&ours).chain(theirs.as_ref()) {
                    writeln!(f, "{}", serde_json::to_string(v)?)?;
                }
            }
            table.push((model.to_string(), shape.to_string(), ours, theirs));
        }
    }
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!();
    println!("| model | pairs x seq | backend | tokens/s | ms/step (min-max) | peak MiB | GFLOP/s (util) | PyTorch tokens/s | PyTorch peak MiB | PyTorch GFLOP/s (util) | speed ratio | memory ratio |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (model, shape, o, t) in &table {
        let ours = format!(
            "| {model} | {shape} | {} | {:.0} | {:.0} ({:.0}-{:.0}) | {:.0} | {:.1} ({:.0}%) |",
            a.backend,
            f(o, "tokens_per_s"),
            1e3 * f(o, "seconds_per_step_median"),
            1e3 * f(o, "seconds_per_step_min"),
            1e3 * f(o, "seconds_per_step_max"),
            f(o, "peak_rss_mib"),
            f(o, "achieved_gflops"),
            100.0 * f(o, "flop_utilisation")
        );
        let theirs = match t {
            Some(t) => format!(
                " {:.0} | {:.0} | {:.1} ({:.0}%) | {:.2}x | {:.2}x |",
                f(t, "tokens_per_s"),
                f(t, "peak_rss_mib"),
                f(t, "achieved_gflops"),
                100.0 * f(t, "flop_utilisation"),
                f(o, "tokens_per_s") / f(t, "tokens_per_s"),
                f(o, "peak_rss_mib") / f(t, "peak_rss_mib")
            ),
            None => " - | - | - | - | - |".into(),
        };
        println!("{ours}{theirs}");
    }
    if a.cached_reference {
        println!();
        for (model, shape, o, t) in &table {
            let r = |v: &serde_json::Value| v["later_epoch_over_first"].as_f64().map_or("-".into(), |x| format!("{:.0}%", 100.0 * x));
            println!(
                "{model} {shape}: with cached reference log-probs an epoch after the first costs {} of the first ({}); PyTorch {}",
                r(o),
                a.backend,
                t.as_ref().map_or("-".into(), r)
            );
        }
    }
    // Where the time goes: each phase's median, ours against PyTorch's.
    let phase = |v: &serde_json::Value, k: &str| v["phase_seconds_median"][k].as_f64().unwrap_or(f64::NAN);
    let names = ["reference", "policy_forward", "backward", "optimizer"];
    println!();
    println!("| model | pairs x seq | phase | {} s | PyTorch s | ratio (PyTorch / ours) |", a.backend);
    println!("|---|---|---|---|---|---|");
    for (model, shape, o, t) in &table {
        for k in names {
            let (theirs, ratio) = match t {
                Some(t) => (format!("{:.3}", phase(t, k)), format!("{:.2}x", phase(t, k) / phase(o, k))),
                None => ("-".into(), "-".into()),
            };
            println!("| {model} | {shape} | {k} | {:.3} | {theirs} | {ratio} |", phase(o, k));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs a command whose stdout is one JSON object (stderr passes through).
fn json_of(cmd: &mut Command, what: &str) -> Result<serde_json::Value> {
    let out = cmd.stderr(std::process::Stdio::inherit()).output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("{what} printed no JSON object: {text}"))
}

fn default_venv() -> std::path::PathBuf {
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from).unwrap_or_default();
    home.join(".cache/odpo/libtorch-venv")
}

/// The PyTorch of a virtual environment: `(python, torch/lib)`.
fn torch_of(venv: &std::path::Path) -> Result<(std::path::PathBuf, String)> {
    let python = venv.join("bin/python");
    let out = Command::new(&python)
        .args(["-c", "import torch, os; print(torch.__version__); print(os.path.join(os.path.dirname(torch.__file__), 'lib'))"])
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines();
    match (out.status.success(), lines.next(), lines.next()) {
        (true, Some(version), Some(lib)) if version.starts_with("2.9.0") => Ok((python, lib.to_string())),
        (true, Some(version), _) => bail!("{} has torch {version}; burn-tch 0.22 needs 2.9.0 (run `cargo xtask setup-libtorch`)", venv.display()),
        _ => bail!("no PyTorch in {} (run `cargo xtask setup-libtorch`): {}", venv.display(), String::from_utf8_lossy(&out.stderr).trim()),
    }
}

/// A `cargo` command without the variables `cargo run` gave this process (`CARGO_MANIFEST_DIR`,
/// `CARGO_PKG_*`, ...): build scripts that read them (ring's, under libtorch's bindings) would see
/// the checkout's path, and every new clone would rebuild them and all above them.
fn cargo_cmd() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (key, _) in std::env::vars_os() {
        if let Some(k) = key.to_str()
            && (k.starts_with("CARGO_MANIFEST_") || k.starts_with("CARGO_PKG_") || matches!(k, "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"))
        {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Points the build and the run of the `tch` feature at PyTorch's libtorch, unless LIBTORCH or
/// LIBTORCH_USE_PYTORCH is already set.
fn libtorch_env(cmd: &mut Command) -> Result<()> {
    if std::env::var_os("LIBTORCH").is_some() || std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        return Ok(());
    }
    let venv = default_venv();
    let (python, lib) = torch_of(&venv)?;
    let path = format!("{}:{}", python.parent().map(|p| p.display().to_string()).unwrap_or_default(), std::env::var("PATH").unwrap_or_default());
    // Where the run finds libtorch's shared libraries: LD_LIBRARY_PATH on Linux, DYLD_LIBRARY_PATH on macOS.
    let var = if cfg!(target_os = "macos") { "DYLD_LIBRARY_PATH" } else { "LD_LIBRARY_PATH" };
    let ld = match std::env::var(var) {
        Ok(old) if !old.is_empty() => format!("{lib}:{old}"),
        _ => lib,
    };
    cmd.env("VIRTUAL_ENV", &venv).env("PATH", path).env("LIBTORCH_USE_PYTORCH", "1").env(var, ld);
    Ok(())
}

/// `cargo xtask setup-libtorch`.
fn setup_libtorch(a: &SetupArgs) -> Result<ExitCode> {
    let venv = a.venv.clone().unwrap_or_else(default_venv);
    if torch_of(&venv).is_err() {
        eprintln!("creating {} and installing torch==2.9.0 from PyPI (about 1 GB on Linux) ...", venv.display());
        let ok = Command::new(&a.python).args(["-m", "venv"]).arg(&venv).status().context("creating the virtual environment")?.success();
        if !ok {
            bail!("`{} -m venv {}` failed", a.python, venv.display());
        }
        let ok = Command::new(venv.join("bin/pip")).args(["install", "torch==2.9.0"]).status().context("running pip")?.success();
        if !ok {
            bail!("`pip install torch==2.9.0` failed");
        }
    }
    let (python, lib) = torch_of(&venv)?;
    let bin = python.parent().map(|p| p.display().to_string()).unwrap_or_default();
    println!("PyTorch 2.9.0 is in {}. `cargo xtask ... --backend tch` uses it as it is; for cargo itself:", venv.display());
    println!("export VIRTUAL_ENV={} PATH={bin}:$PATH LIBTORCH_USE_PYTORCH=1 LD_LIBRARY_PATH={lib}:$LD_LIBRARY_PATH", venv.display());
    Ok(ExitCode::SUCCESS)
}
