//! `cargo xtask`: the project's workflows. Commands that run models build the `odpo` binary
//! (crate `odpo-cli`) with the Cargo feature of the backend asked for, then run it; the
//! backend-to-feature table below is the only place that knows which feature a backend needs.

use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// The project's workflows: benchmarks, conformance, setup. Every other command is the `odpo` binary's,
/// built with the Cargo feature of the backend it runs on (its `--backend`, else the one its config
/// names, else flex) and run with the arguments as given.
#[derive(Parser)]
#[command(name = "cargo xtask", after_help = "odpo's commands, run through `cargo xtask COMMAND ...`: train (no arguments: the built-in task), sample, eval, reward-model, frontier, experiment, data, generate, logprobs, export-gguf. `cargo xtask COMMAND --help` shows a command's flags.")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Forward throughput on a model shape with random weights: --config CONFIG_JSON [--batch 8 --seq 128 --repeats 5].
    /// With --vs-pytorch, also runs bench/pytorch/forward.py (python from $ODPO_PYTHON or `python3`) and prints the ratio.
    BenchForward(Passthrough),
    /// Greedy generation throughput (KV cache) on a model shape with random weights: --config CONFIG_JSON
    /// [--batches 1,8 --prompt 32 --new 64 --repeats 3] [--backend B]. With --vs-pytorch, also runs
    /// bench/pytorch/generate.py (transformers' `generate`) and prints both and the ratio per batch size.
    BenchGenerate(Passthrough),
    /// Long-run health: trains a tiny random GPT-2 for many steps (checkpoints and evaluation
    /// included) and samples the process's resident memory and step time; prints both slopes.
    /// [--steps 20000] [--backend flex] [--out FILE.json]
    Soak(SoakArgs),
    /// The ODPO training-step benchmark: each model shape x batch shape in its own process (peak memory
    /// per row). --models tiny,gpt2-124m,smollm2-135m (or config.json paths) --shapes 4x128 [--lora R]
    /// [--backend B] [--dtype bf16] [--repeats N] [--vs-pytorch] [--out FILE.jsonl]. With --vs-pytorch the same step in
    /// PyTorch (bench/pytorch/step.py, python from $ODPO_PYTHON or `python3`) runs after each row, and the
    /// table shows the ratio.
    Bench(BenchArgs),
    /// The conformance suite on one backend or several: the model parity fixtures (seventeen tiny
    /// random models against transformers), the loss fixtures (against PyTorch), three ODPO training steps against
    /// PyTorch, data-parallel and mixed-precision training, f32 products exact to f32 rounding. [--backend B] or [--backend B1,B2]: one
    /// build with every named backend's feature, the suites run once per backend. [--also-build B3]:
    /// compiled and linked in, not run. [--binary-out FILE]: the test binary's path, written there.
    Conformance(Passthrough),
    /// Installs PyTorch 2.9.0 (the libtorch burn-tch 0.22 links against) from PyPI into a virtual
    /// environment (default ~/.cache/odpo/libtorch-venv) and prints the environment the `tch` backend
    /// needs; `cargo xtask ... --backend tch` finds that environment by itself. [--venv DIR] [--python PY]
    SetupLibtorch(LibtorchArgs),
    /// Installs the static LLVM 23.1 SDK that burn's `cuda` backend compiles its kernels with
    /// (PyPI's mlc-llvm-static with its extra targets, NVPTX among them, into a virtual environment,
    /// default ~/.cache/odpo/cuda-llvm-venv) and lays out the folder tracel-llvm-bundler looks for,
    /// so that `--features cuda` builds with nothing but the package registries. Idempotent.
    /// [--venv DIR] [--python PY]
    SetupCuda(SetupArgs),
    /// Regenerates the test fixtures from their scripts in the pinned Python environment
    /// (scripts/fixtures-requirements.txt, installed into the libtorch environment or --venv DIR).
    /// [--only loss,conformance,models,tokenizer,gguf,llamacpp,data] [--check: regenerate, compare with the committed
    /// files (JSON numbers to 1e-12 relative, other files byte for byte), put the committed files back,
    /// fail on a difference]
    Fixtures(FixturesArgs),
    /// Every other command is the `odpo` binary's, built with the feature of its backend and run
    /// with the arguments as given: train, sample, eval, reward-model, frontier, experiment, data,
    /// generate, logprobs, export-gguf (`cargo xtask train --help` shows its flags).
    #[command(external_subcommand)]
    Odpo(Vec<String>),
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
struct FixturesArgs {
    /// Fixture sets, comma-separated (default: all): loss, conformance, models, tokenizer, gguf,
    /// llamacpp (llama.cpp's own token ids; installs llama-cpp-python, which builds llama.cpp), data
    /// (TRL's implicit prompts; installs trl).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Compare the regenerated fixtures with the committed ones instead of keeping them.
    #[arg(long)]
    check: bool,
    /// The virtual environment (default: the libtorch one, ~/.cache/odpo/libtorch-venv).
    #[arg(long)]
    venv: Option<std::path::PathBuf>,
    /// The Python that creates it when it does not exist.
    #[arg(long, default_value = "python3")]
    python: String,
}

#[derive(clap::Args)]
struct LibtorchArgs {
    #[command(flatten)]
    setup: SetupArgs,
    /// The PyTorch version. burn-tch 0.22 is written for 2.9.0; another version builds with
    /// `LIBTORCH_BYPASS_VERSION_CHECK` (docs/backends.md lists those checked), and `cargo xtask`
    /// uses it when `ODPO_TORCH_VERSION` names it.
    #[arg(long, default_value = TORCH_DEFAULT)]
    torch: String,
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
    /// With `--lora`: the odpo side keeps its frozen base block-quantised (Q8_0,
    /// `lora.quantized_base`); the PyTorch side's base stays f32.
    #[arg(long)]
    quantized_base: bool,
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
    /// How the odpo side's rows go through the model (`odpo bench --layout`): `auto` (the shared
    /// prompt on CPU backends, the concatenated rows on GPU backends), `shared-prompt` or
    /// `concatenated`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "shared-prompt", "concatenated"])]
    layout: String,
    /// The same as `--layout concatenated`: the `[2B, T]` rows on the odpo side, as TRL runs them.
    #[arg(long, conflicts_with = "layout")]
    no_shared_prompt: bool,
    /// Compute precision on both sides: f32, or bf16 / f16 mixed precision (PyTorch: autocast).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// WPO's pair weights (`loss.use_weighting`) on both sides (PyTorch: log_softmax, then
    /// logsumexp(2·log p) under no_grad, as TRL's eager path computes them).
    #[arg(long)]
    wpo: bool,
    /// Append every row's JSON here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

#[derive(clap::Args)]
struct SoakArgs {
    /// Optimizer steps.
    #[arg(long, default_value_t = 20_000)]
    steps: usize,
    /// Backend.
    #[arg(long, default_value = "flex")]
    backend: String,
    /// Write the samples and the slopes here as JSON.
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
        Task::Odpo(args) => match args.split_first() {
            Some((command, rest)) => odpo(command, rest),
            None => bail!("no command given"),
        },
        Task::BenchForward(p) => bench_forward(p.args),
        Task::BenchGenerate(p) => bench_generate(p.args),
        Task::Soak(a) => soak(&a),
        Task::Bench(a) => bench(&a),
        Task::Conformance(p) => conformance(&p.args),
        Task::SetupLibtorch(a) => setup_libtorch(&a),
        Task::SetupCuda(a) => setup_cuda(&a),
        Task::Fixtures(a) => fixtures(&a),
    }
}

/// The backend named by `--backend X` / `--backend=X` in `args`, default `flex`.
fn backend_of(args: &[String]) -> Result<&str> {
    Ok(flag_value(args, "--backend")?.unwrap_or("flex"))
}

/// The backend an `odpo` command runs on, so that the build has its feature: `--backend`, else a
/// `--set train.backend=` / `--set backend=` override, else what its config names (`train.backend` of
/// a run config, or of the run folder's `config.toml` under `--resume`; `backend` of a pipeline or
/// experiment config, following a sweep's `base`), else `flex`.
fn backend_for(args: &[String]) -> Result<String> {
    if let Some(b) = flag_value(args, "--backend")? {
        return Ok(b.to_string());
    }
    let mut from_set = None;
    for (i, a) in args.iter().enumerate() {
        let set = match a.strip_prefix("--set=") {
            Some(v) => Some(v),
            None if a == "--set" => args.get(i + 1).map(String::as_str),
            None => None,
        };
        if let Some((key, value)) = set.and_then(|s| s.split_once('='))
            && matches!(key.trim(), "train.backend" | "backend")
        {
            from_set = Some(value.trim().trim_matches('"').to_string());
        }
    }
    if let Some(b) = from_set {
        return Ok(b);
    }
    let config = match (flag_value(args, "--config")?, flag_value(args, "--resume")?) {
        (Some(c), _) => Some(std::path::PathBuf::from(c)),
        // A trainer run's folder holds `config.toml`; a built-in pipeline's, `pipeline.toml`.
        (None, Some(run)) => ["config.toml", "pipeline.toml"].iter().map(|f| std::path::Path::new(run).join(f)).find(|p| p.exists()),
        (None, None) => None,
    };
    Ok(config.and_then(|c| config_backend(&c, 0)).unwrap_or_else(|| "flex".into()))
}

/// The backend a config file names, if it names one. A file that is missing or not TOML names none:
/// `odpo` reports it with its line.
fn config_backend(path: &std::path::Path, depth: usize) -> Option<String> {
    let table: toml::Table = std::fs::read_to_string(path).ok()?.parse().ok()?;
    let named = table.get("train").and_then(|t| t.get("backend")).or_else(|| table.get("backend"));
    if let Some(b) = named.and_then(toml::Value::as_str) {
        return Some(b.to_string());
    }
    let base = table.get("base").and_then(toml::Value::as_str)?;
    (depth < 4).then(|| config_backend(&path.parent().unwrap_or(std::path::Path::new(".")).join(base), depth + 1)).flatten()
}

/// The value of `flag VALUE` / `flag=VALUE` in `args`, if given.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Result<Option<&'a str>> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == flag {
            return it.next().map(|v| Some(v.as_str())).with_context(|| format!("{flag} needs a value"));
        }
        if let Some(v) = a.strip_prefix(flag).and_then(|rest| rest.strip_prefix('=')) {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// `odpo <command> <args>` built with the feature of the backend it runs on ([`backend_for`]):
/// `cargo run`, whose progress shows (a first build takes many minutes). A `vulkan` build is made
/// first, with cubecl-spirv's fix ([`with_spirv_fix`]), and the command runs the binary itself, so
/// that Cargo.lock is put back before it starts.
fn odpo_command(command: &str, args: &[String]) -> Result<Command> {
    let backend = backend_for(args)?;
    let backend = backend.split(':').next().unwrap_or("flex");
    let Some(&(_, feature)) = BACKENDS.iter().find(|(b, _)| *b == backend) else {
        let names: Vec<&str> = BACKENDS.iter().map(|(b, _)| *b).collect();
        bail!("unknown backend `{backend}`; expected one of: {}", names.join(", "));
    };
    let mut cmd = if needs_spirv_fix(&[feature]) {
        Command::new(build_odpo(feature)?)
    } else {
        let mut cargo = cargo_cmd();
        cargo.args(["run", "--release", "-p", "odpo-cli", "--no-default-features", "--features", &cli_features(feature), "--"]);
        cargo
    };
    backend_env(&mut cmd, &[feature])?;
    cmd.arg(command).args(args);
    Ok(cmd)
}

/// The `odpo` binary's Cargo features for a backend's feature: the flex build also has burn-train's
/// dashboard (`dashboard`, which builds flex in), the other backends' builds leave it out.
fn cli_features(feature: &str) -> String {
    if feature == "flex" { "flex,dashboard".into() } else { feature.into() }
}

/// Builds and runs `odpo <command> <args>` with the feature of the requested backend.
fn odpo(command: &str, args: &[String]) -> Result<ExitCode> {
    let mut cmd = odpo_command(command, args)?;
    // On Unix cargo becomes this process, and `cargo run` becomes `odpo` in turn: Ctrl-C and a
    // scheduler's SIGTERM reach `odpo` alone (which stops at a step boundary with a checkpoint)
    // and its exit status is the command's.
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        Err(cmd.exec()).context("running cargo")
    }
    #[cfg(not(unix))]
    {
        let status = cmd.status().context("running cargo")?;
        Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::from(status.code().unwrap_or(1).clamp(1, 255) as u8) })
    }
}

/// `cargo xtask conformance [--backend B[,B2...]] [--also-build B3[,...]]`: the twelve suites
/// (`odpo-trainer/tests/suites.rs`, one test binary) built once with every named backend's feature,
/// then run once per backend with `ODPO_TEST_DEVICE` choosing the device; `--also-build` adds
/// backends that are compiled and linked into the same binary but not run (CI keeps `cuda` building
/// this way on a machine without a GPU). With `tch`, odpo-kernels' unit tests of its libtorch paths
/// run after the suites.
fn conformance(args: &[String]) -> Result<ExitCode> {
    let list = |flag: &str| -> Result<Vec<String>> {
        Ok(flag_value(args, flag)?.unwrap_or_default().split(',').map(|b| b.trim().to_string()).filter(|b| !b.is_empty()).collect())
    };
    let mut backends = list("--backend")?;
    if backends.is_empty() {
        backends.push("flex".into());
    }
    let also = list("--also-build")?;
    let mut features = vec!["suites"];
    for spec in backends.iter().chain(&also) {
        let name = spec.split(':').next().unwrap_or_default();
        let Some(&(_, feature)) = BACKENDS.iter().find(|(b, _)| *b == name) else {
            let names: Vec<&str> = BACKENDS.iter().map(|(b, _)| *b).collect();
            bail!("unknown backend `{name}`; expected one of: {}", names.join(", "));
        };
        if !features.contains(&feature) {
            features.push(feature);
        }
    }
    // The `attention` and `fused_layers` suites compare the device's results with burn's operations
    // on a CPU backend of the build; one that names none (`--backend wgpu`) gets flex for that, or
    // would compare the device with itself, whose own GELU and attention are what is tested.
    if !features.iter().any(|f| matches!(*f, "flex" | "tch")) {
        features.push("flex");
    }
    // suites.rs takes its suites from other crates' tests/ folders (`#[path]`), which Cargo's
    // fingerprint records by absolute path: a build made from another checkout (an earlier CI
    // clone) that still exists would count as fresh and run that checkout's tests. Marking
    // suites.rs changed rebuilds the one test crate (seconds).
    let suites = repo_root().join("crates/odpo-trainer/tests/suites.rs");
    std::fs::File::options()
        .write(true)
        .open(&suites)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()))
        .with_context(|| format!("marking {} changed", suites.display()))?;
    // `cargo test` of the suites binary with every feature, its environment set.
    let suites_cmd = |extra: &[&str]| -> Result<Command> {
        let mut cmd = cargo_cmd();
        backend_env(&mut cmd, &features)?;
        cmd.args(["test", "--profile", "conformance", "-p", "odpo-trainer", "--no-default-features", "--features", &features.join(","), "--test", "suites"]).args(extra);
        Ok(cmd)
    };
    for backend in &backends {
        let mut cmd = suites_cmd(&[])?;
        // burn's own default device where it has a name for it (`tch-cuda`'s is libtorch's CPU);
        // the suites run on `ODPO_TEST_DEVICE`.
        let name = backend.split(':').next().unwrap_or_default();
        cmd.env("ODPO_TEST_DEVICE", backend).env("BURN_DEVICE", if name == "tch-cuda" { "tch" } else { name });
        // wgpu's Vulkan loader complains on every device creation without it.
        if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
            cmd.env("XDG_RUNTIME_DIR", std::env::temp_dir());
        }
        eprintln!("conformance ({backend}): model parity, loss parity, three ODPO steps against PyTorch, shared prompt, data parallel, mixed precision");
        let status = with_spirv_fix(&mut cmd, &features, Command::status)?;
        if !status.success() {
            eprintln!("conformance ({backend}): failed");
            return Ok(ExitCode::from(1));
        }
        eprintln!("conformance ({backend}): all suites passed");
    }
    // odpo-kernels' own tests of its libtorch paths (torch's fused kernels, the log-probabilities in
    // runs, the CUDA kernel census through a stand-in CUPTI), which `cargo test --workspace` (flex)
    // does not build: the same profile, so the libtorch crates built for the suites serve them.
    if backends.iter().any(|b| b.split(':').next() == Some("tch")) {
        let mut cmd = cargo_cmd();
        backend_env(&mut cmd, &["tch"])?;
        cmd.args(["test", "--profile", "conformance", "-p", "odpo-kernels", "--no-default-features", "--features", "tch", "--lib"]);
        eprintln!("conformance (tch): odpo-kernels' unit tests of its libtorch paths");
        if !cmd.status().context("running cargo test -p odpo-kernels")?.success() {
            eprintln!("conformance (tch): odpo-kernels' unit tests failed");
            return Ok(ExitCode::from(1));
        }
    }
    // The binary those runs used, for what runs it again (CI's PTX check): cargo names it, where the
    // newest `suites-*` in the build folder may be another build's.
    if let Some(out) = flag_value(args, "--binary-out")? {
        let mut cmd = suites_cmd(&["--no-run", "--message-format=json"])?;
        let output = with_spirv_fix(&mut cmd, &features, |c| c.stderr(std::process::Stdio::inherit()).output())?;
        let exe = executable(&output.stdout, "suites").context("cargo named no `suites` test binary")?;
        std::fs::write(out, format!("{}\n", exe.display())).with_context(|| format!("writing {out}"))?;
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
    let status = odpo_command("bench-forward", &args)?.status().context("running cargo")?;
    let code = if status.success() { ExitCode::SUCCESS } else { ExitCode::from(1) };
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
    if !BACKENDS.iter().any(|(b, _)| *b == a.backend) {
        bail!("unknown backend `{}`", a.backend);
    }
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
            let common = ["--config".to_string(), config.clone(), "--pairs".into(), pairs.to_string(), "--seq".into(), seq.to_string(), "--repeats".into(), a.repeats.to_string(), "--dtype".into(), a.dtype.clone()];
            let mut odpo_args = vec!["--backend".to_string(), a.backend.clone()];
            odpo_args.extend(common.iter().cloned());
            if a.lora > 0 {
                odpo_args.extend(["--lora".to_string(), a.lora.to_string()]);
            }
            if a.quantized_base {
                if a.lora == 0 {
                    bail!("--quantized-base: a quantised base is frozen; give --lora RANK");
                }
                odpo_args.push("--quantized-base".into());
            }
            if a.cached_reference {
                odpo_args.push("--cached-reference".into());
            }
            if a.wpo {
                odpo_args.push("--wpo".into());
            }
            odpo_args.push("--layout".into());
            odpo_args.push(if a.no_shared_prompt { "concatenated".into() } else { a.layout.clone() });
            eprintln!("odpo ({}) {model} {shape} ...", a.backend);
            let ours = json_of(&mut odpo_command("bench", &odpo_args)?, "odpo bench")?;
            let theirs = if a.vs_pytorch {
                let mut py = vec!["bench/pytorch/step.py".to_string(), "--threads".into(), a.threads.to_string(), "--lora".into(), a.lora.to_string()];
                py.extend(common.iter().cloned());
                if a.cached_reference {
                    py.push("--cached-reference".into());
                }
                if a.wpo {
                    py.push("--wpo".into());
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

/// The PyTorch version burn-tch 0.22's bindings are written for.
const TORCH_DEFAULT: &str = "2.9.0";

/// The PyTorch version `--backend tch` builds against: `ODPO_TORCH_VERSION`, else 2.9.0.
fn torch_version() -> String {
    std::env::var("ODPO_TORCH_VERSION").ok().filter(|v| !v.is_empty()).unwrap_or_else(|| TORCH_DEFAULT.into())
}

/// The virtual environment of a PyTorch version: ~/.cache/odpo/libtorch-venv for 2.9.0,
/// ~/.cache/odpo/libtorch-VERSION-venv for another.
fn default_venv(version: &str) -> std::path::PathBuf {
    let name = if version == TORCH_DEFAULT { "libtorch-venv".to_string() } else { format!("libtorch-{version}-venv") };
    home().join(".cache/odpo").join(name)
}

/// The PyTorch of a virtual environment: `(python, torch/lib)`.
fn torch_of(venv: &std::path::Path, want: &str) -> Result<(std::path::PathBuf, String)> {
    let python = venv.join("bin/python");
    let out = Command::new(&python)
        .args(["-c", "import torch, os; print(torch.__version__); print(os.path.join(os.path.dirname(torch.__file__), 'lib'))"])
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines();
    match (out.status.success(), lines.next(), lines.next()) {
        (true, Some(version), Some(lib)) if version.split('+').next() == Some(want) => Ok((python, lib.to_string())),
        (true, Some(version), _) => bail!("{} has torch {version}, not {want} (run `cargo xtask setup-libtorch --torch {want}`)", venv.display()),
        _ => bail!("no PyTorch in {} (run `cargo xtask setup-libtorch --torch {want}`): {}", venv.display(), String::from_utf8_lossy(&out.stderr).trim()),
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

/// The repository root (xtask is one of its crates): where `cargo run` (the `cargo xtask` alias) says
/// xtask's manifest is. The path compiled in is only the fallback: with a build folder shared between
/// checkouts (CI's clones), Cargo counts an xtask binary built in another checkout as fresh, and the
/// path compiled into it names that checkout.
fn repo_root() -> std::path::PathBuf {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")), std::path::PathBuf::from);
    dir.join("..")
}

/// Whether a build of these Cargo features compiles cubecl-spirv, and so takes its shared-memory fix.
fn needs_spirv_fix(features: &[&str]) -> bool {
    features.contains(&"vulkan")
}

/// Runs a Cargo command whose arguments are set (through `run`), with cubecl-spirv's shared-memory
/// fix added when `features` has `vulkan`. cubecl-spirv 0.11.3 writes
/// invalid SPIR-V for shared memory on Vulkan devices without
/// `VK_KHR_workgroup_memory_explicit_layout` (Mesa's lavapipe crashes on it; docs/backends.md,
/// "Vulkan"): `scripts/cubecl-spirv-patched.sh` lays out the patched crate outside the checkout and
/// names the `--config` flags that build with it (the patch, and `ODPO_CUBECL_SPIRV_FIX` in the
/// build's environment: without it, odpo-model refuses the devices that need the fix). Cargo
/// records a patch in Cargo.lock, so the lock is put back as it was once the command has ended,
/// success or not.
fn with_spirv_fix<T>(cmd: &mut Command, features: &[&str], run: impl FnOnce(&mut Command) -> std::io::Result<T>) -> Result<T> {
    if !needs_spirv_fix(features) {
        return run(cmd).context("running cargo");
    }
    let script = repo_root().join("scripts/cubecl-spirv-patched.sh");
    let out = Command::new("bash").arg(&script).stderr(std::process::Stdio::inherit()).output().with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({}): the vulkan build needs cubecl-spirv's shared-memory fix", script.display(), out.status);
    }
    // `--config PATCH --config env.ODPO_CUBECL_SPIRV_FIX=...`; the values may hold spaces (a path).
    let flags = String::from_utf8_lossy(&out.stdout);
    let values: Vec<&str> = flags.trim().strip_prefix("--config ").map(|rest| rest.split(" --config ").collect()).unwrap_or_default();
    if values.len() != 2 {
        bail!("{} printed `{}`, not its two --config flags", script.display(), flags.trim());
    }
    for value in values {
        cmd.args(["--config", value]);
    }
    let lock = repo_root().join("Cargo.lock");
    let kept = std::fs::read(&lock).with_context(|| format!("reading {}", lock.display()))?;
    let result = run(cmd).context("running cargo");
    put_back(&lock, &kept)?;
    result
}

/// Writes `bytes` back to `path` (through a temporary file and a rename) unless it holds them already.
fn put_back(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    if std::fs::read(path).is_ok_and(|now| now == bytes) {
        return Ok(());
    }
    let tmp = path.with_extension("lock.xtask");
    std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path)).with_context(|| format!("putting {} back", path.display()))
}

/// Builds the `odpo` binary with a backend's Cargo feature (with cubecl-spirv's fix for `vulkan`,
/// [`with_spirv_fix`]) and returns its path. Cargo's progress shows: a first build takes many minutes.
fn build_odpo(feature: &str) -> Result<std::path::PathBuf> {
    let mut build = cargo_cmd();
    backend_env(&mut build, &[feature])?;
    build.args(["build", "--release", "-p", "odpo-cli", "--no-default-features", "--features", &cli_features(feature), "--message-format=json-render-diagnostics"]);
    let out = with_spirv_fix(&mut build, &[feature], |c| c.stderr(std::process::Stdio::inherit()).output())?;
    if !out.status.success() {
        bail!("cargo build failed");
    }
    executable(&out.stdout, "odpo").context("cargo did not report the odpo binary")
}

/// The executable cargo built for `target`, as its JSON messages (`--message-format=json*`) name it.
fn executable(messages: &[u8], target: &str) -> Option<std::path::PathBuf> {
    String::from_utf8_lossy(messages)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == target)
        .find_map(|m| m["executable"].as_str().map(std::path::PathBuf::from))
}

/// The environment the build (and run) of these Cargo features needs.
fn backend_env(cmd: &mut Command, features: &[&str]) -> Result<()> {
    if features.contains(&"tch") {
        libtorch_env(cmd)?;
    }
    if features.contains(&"cuda") {
        cuda_env(cmd)?;
    }
    Ok(())
}

/// Points the build and the run of the `tch` feature at PyTorch's libtorch, unless LIBTORCH or
/// LIBTORCH_USE_PYTORCH is already set.
fn libtorch_env(cmd: &mut Command) -> Result<()> {
    if std::env::var_os("LIBTORCH").is_some() || std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        return Ok(());
    }
    let version = torch_version();
    let venv = default_venv(&version);
    let (python, lib) = torch_of(&venv, &version)?;
    if version != TORCH_DEFAULT {
        cmd.env("LIBTORCH_BYPASS_VERSION_CHECK", "1");
    }
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
fn setup_libtorch(a: &LibtorchArgs) -> Result<ExitCode> {
    let version = &a.torch;
    let venv = a.setup.venv.clone().unwrap_or_else(|| default_venv(version));
    if torch_of(&venv, version).is_err() {
        eprintln!("creating {} and installing torch=={version} from PyPI (about 1 GB on Linux, with its CUDA libraries several) ...", venv.display());
        let ok = Command::new(&a.setup.python).args(["-m", "venv"]).arg(&venv).status().context("creating the virtual environment")?.success();
        if !ok {
            bail!("`{} -m venv {}` failed (on Debian: apt-get install python3-venv)", a.setup.python, venv.display());
        }
        let ok = Command::new(venv.join("bin/pip")).args(["install", &format!("torch=={version}")]).status().context("running pip")?.success();
        if !ok {
            bail!("`pip install torch=={version}` failed");
        }
    }
    let (python, lib) = torch_of(&venv, version)?;
    let bin = python.parent().map(|p| p.display().to_string()).unwrap_or_default();
    let bypass = if version == TORCH_DEFAULT { String::new() } else { " LIBTORCH_BYPASS_VERSION_CHECK=1".into() };
    if version == TORCH_DEFAULT {
        println!("PyTorch {version} is in {}. `cargo xtask ... --backend tch` uses it as it is; for cargo itself:", venv.display());
    } else {
        println!("PyTorch {version} is in {}. `ODPO_TORCH_VERSION={version} cargo xtask ... --backend tch` uses it; for cargo itself:", venv.display());
    }
    println!("export VIRTUAL_ENV={} PATH={bin}:$PATH LIBTORCH_USE_PYTORCH=1{bypass} LD_LIBRARY_PATH={lib}:$LD_LIBRARY_PATH", venv.display());
    Ok(ExitCode::SUCCESS)
}

/// A fixture set: its name, its scripts (folder to run in, script path from there, arguments) and
/// the paths it writes (files or folders; the scripts themselves are not outputs).
struct FixtureSet {
    name: &'static str,
    /// How far a regenerated number may be from the committed one, relative: float64 results differ
    /// in the last place between CPUs and library builds, float32 ones at about 1e-6 (what the tests
    /// read is checked at 1e-5 or looser).
    tolerance: f64,
    scripts: &'static [(&'static str, &'static str)],
    outputs: &'static [&'static str],
    /// What the set needs beyond scripts/fixtures-requirements.txt, installed when it runs.
    pip: &'static [&'static str],
}

/// Every fixture the tests read that a script of the repository makes. `models` and `gguf` read
/// nothing but their scripts; `tokenizer` and the SmolLM2 GGUF expectations need the shared folder.
const FIXTURES: &[FixtureSet] = &[
    FixtureSet { name: "loss", tolerance: 1e-12, scripts: &[(".", "crates/odpo-loss/tests/fixtures/make_loss_fixtures.py")], outputs: &["crates/odpo-loss/tests/fixtures/losses.json"], pip: &[] },
    FixtureSet { name: "conformance", tolerance: 1e-5, scripts: &[(".", "crates/odpo-trainer/tests/fixtures/make_conformance.py")], outputs: &["crates/odpo-trainer/tests/fixtures/conformance"], pip: &[] },
    FixtureSet {
        name: "models",
        // The parity tests' own bound on logits: adapters and CPUs move PEFT's logits by up to 3e-5.
        tolerance: 1e-4,
        scripts: &[(".", "crates/odpo-model/tests/fixtures/make_fixtures.py"), (".", "crates/odpo-model/tests/fixtures/make_fixtures_neo.py"), (".", "crates/odpo-model/tests/fixtures/make_fixtures_moe.py"), (".", "crates/odpo-model/tests/fixtures/make_lora_fixtures.py")],
        outputs: &["crates/odpo-model/tests/fixtures"],
        pip: &[],
    },
    FixtureSet { name: "tokenizer", tolerance: 0.0, scripts: &[("crates/odpo-model/tests/fixtures/tokenizer", "make_expected.py")], outputs: &["crates/odpo-model/tests/fixtures/tokenizer/trim_expected.txt"], pip: &[] },
    FixtureSet {
        name: "gguf",
        tolerance: 1e-5,
        scripts: &[(".", "crates/odpo-model/tests/fixtures/gguf/make_gguf_fixtures.py"), (".", "crates/odpo-model/tests/fixtures/gguf/make_smollm_expected.py")],
        outputs: &["crates/odpo-model/tests/fixtures/gguf"],
        pip: &[],
    },
    // llama.cpp's own token ids; llama-cpp-python builds llama.cpp from source (minutes, once).
    FixtureSet {
        name: "llamacpp",
        tolerance: 0.0,
        scripts: &[(".", "crates/odpo-model/tests/fixtures/gguf/make_llamacpp_expected.py")],
        outputs: &["crates/odpo-model/tests/fixtures/gguf/vocab/llamacpp_expected.json", "crates/odpo-model/tests/fixtures/gguf/vocab/pre-*.gguf"],
        pip: &["llama-cpp-python==0.3.36"],
    },
    FixtureSet {
        name: "data",
        tolerance: 0.0,
        scripts: &[(".", "crates/odpo-data/tests/fixtures/make_implicit_prompt.py")],
        outputs: &["crates/odpo-data/tests/fixtures/implicit_prompt.jsonl"],
        pip: &["trl==1.16.0"],
    },
];

/// The committed files of a set: tracked files under its outputs, scripts and notes left out, and
/// (for `models`) the other sets' folders.
fn fixture_files(set: &FixtureSet) -> Result<Vec<String>> {
    let out = Command::new("git").arg("ls-files").args(set.outputs).output().context("running git ls-files")?;
    let owned_elsewhere = |f: &str| set.name == "models" && (f.contains("/fixtures/tokenizer/") || f.contains("/fixtures/gguf/"));
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|f| !f.ends_with(".py") && !f.ends_with(".md") && !owned_elsewhere(f))
        .map(String::from)
        .collect())
}

/// Whether two fixture files hold the same values, numbers to `tol` (relative, and absolute below 1:
/// logits and gradient sums near 0 move by rounding alone on another CPU): JSON numbers, and the
/// float32 tensors of safetensors files, whose other tensors (token ids, masks) and layout must be
/// the same; other files byte for byte. JSON fields are read as their tests read them: PEFT's
/// `target_modules` and `target_parameters`, which it writes from sets, in any order; and the gradient fingerprints of
/// `gradients.json` (`[count, sum, sum of squares]` rows), each sum to `tol` of its gradient's norm
/// and each sum of squares to `tol` of itself.
fn same_fixture(path: &str, a: &[u8], b: &[u8], tol: f64) -> bool {
    use serde_json::Value as V;
    let near = |p: f64, q: f64| p == q || (p - q).abs() <= tol * p.abs().max(q.abs()).max(1.0);
    fn json_close(x: &V, y: &V, near: &dyn Fn(f64, f64) -> bool, fingerprint: &dyn Fn(&V, &V) -> bool) -> bool {
        match (x, y) {
            (V::Number(p), V::Number(q)) => match (p.as_f64(), q.as_f64()) {
                (Some(p), Some(q)) => near(p, q),
                _ => p == q,
            },
            (V::Array(p), V::Array(q)) => p.len() == q.len() && p.iter().zip(q).all(|(p, q)| json_close(p, q, near, fingerprint)),
            (V::Object(p), V::Object(q)) => {
                p.len() == q.len()
                    && p.iter().all(|(k, v)| {
                        q.get(k).is_some_and(|w| match k.as_str() {
                            "target_modules" | "target_parameters" => sorted(v) == sorted(w),
                            "gradients" | "aux_gradients" => fingerprint(v, w),
                            _ => json_close(v, w, near, fingerprint),
                        })
                    })
            }
            _ => x == y,
        }
    }
    fn sorted(v: &V) -> V {
        match v {
            V::Array(items) => {
                let mut items = items.clone();
                items.sort_by_key(|i| i.to_string());
                V::Array(items)
            }
            other => other.clone(),
        }
    }
    // `[count, sum, sum of squares]` rows, as tests/parity.rs compares odpo's gradients with them.
    let fingerprint = |x: &V, y: &V| {
        let rows = |v: &V| v.as_array().map(|r| r.iter().map(|row| row.as_array().map(|c| c.iter().filter_map(V::as_f64).collect::<Vec<_>>())).collect::<Option<Vec<_>>>());
        let (Some(Some(x)), Some(Some(y))) = (rows(x), rows(y)) else { return false };
        x.len() == y.len()
            && x.iter().zip(&y).all(|(p, q)| match (p.as_slice(), q.as_slice()) {
                ([n, s, ss], [m, t, tt]) => n == m && (s - t).abs() <= tol * ((n * ss).sqrt() + 1e-6) && (ss - tt).abs() <= tol * (ss + 1e-9),
                _ => false,
            })
    };
    /// The header and data of a safetensors file.
    fn safetensors(bytes: &[u8]) -> Option<(serde_json::Value, &[u8])> {
        let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
        Some((serde_json::from_slice(bytes.get(8..8 + n)?).ok()?, bytes.get(8 + n..)?))
    }
    if path.ends_with(".json")
        && let (Ok(x), Ok(y)) = (serde_json::from_slice::<V>(a), serde_json::from_slice::<V>(b))
    {
        return json_close(&x, &y, &near, &fingerprint);
    }
    if path.ends_with(".safetensors")
        && let (Some((ha, da)), Some((hb, db))) = (safetensors(a), safetensors(b))
    {
        let entries = |h: &V| h.as_object().map(|o| o.iter().filter(|(k, _)| *k != "__metadata__").map(|(k, v)| (k.clone(), v.clone())).collect::<std::collections::BTreeMap<_, _>>());
        let (Some(ea), Some(eb)) = (entries(&ha), entries(&hb)) else { return false };
        let f32s = |d: &[u8]| d.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect::<Vec<_>>();
        // The same names, dtypes, shapes and offsets; each tensor's bytes, or its floats to `tol`.
        return ea == eb
            && ea.values().all(|v| {
                let offsets: Option<Vec<usize>> = v["data_offsets"].as_array().and_then(|o| o.iter().map(|x| x.as_u64().map(|x| x as usize)).collect());
                let Some([start, end]) = offsets.as_deref().and_then(|o| <[usize; 2]>::try_from(o).ok()) else { return false };
                let (Some(x), Some(y)) = (da.get(start..end), db.get(start..end)) else { return false };
                if v["dtype"] == "F32" { f32s(x).iter().zip(f32s(y)).all(|(p, q)| near(*p, q)) } else { x == y }
            });
    }
    a == b
}

/// `cargo xtask fixtures`: the pinned environment, then each set's scripts.
fn fixtures(a: &FixturesArgs) -> Result<ExitCode> {
    let sets: Vec<&FixtureSet> = if a.only.is_empty() {
        FIXTURES.iter().collect()
    } else {
        a.only.iter().map(|n| FIXTURES.iter().find(|s| s.name == n).with_context(|| format!("--only: no fixture set `{n}`; expected one of: {}", FIXTURES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")))).collect::<Result<_>>()?
    };
    let venv = a.venv.clone().unwrap_or_else(|| default_venv(TORCH_DEFAULT));
    if !venv.join("bin/python").is_file() {
        eprintln!("creating {} ...", venv.display());
        if !Command::new(&a.python).args(["-m", "venv"]).arg(&venv).status().context("creating the virtual environment")?.success() {
            bail!("`{} -m venv {}` failed (on Debian: apt-get install python3-venv)", a.python, venv.display());
        }
    }
    eprintln!("the pinned environment (scripts/fixtures-requirements.txt) in {} ...", venv.display());
    if !Command::new(venv.join("bin/pip")).args(["install", "-q", "-r", "scripts/fixtures-requirements.txt"]).status().context("running pip")?.success() {
        bail!("`pip install -r scripts/fixtures-requirements.txt` failed");
    }
    let mut differ = Vec::new();
    for set in sets {
        if !set.pip.is_empty() {
            eprintln!("fixtures ({}): pip install {} ...", set.name, set.pip.join(" "));
            if !Command::new(venv.join("bin/pip")).args(["install", "-q"]).args(set.pip).status().context("running pip")?.success() {
                bail!("`pip install {}` failed", set.pip.join(" "));
            }
        }
        let files = fixture_files(set)?;
        let committed: Vec<(String, Vec<u8>)> = files.iter().map(|f| Ok((f.clone(), std::fs::read(f).with_context(|| format!("reading {f}"))?))).collect::<Result<_>>()?;
        for (dir, script) in set.scripts {
            eprintln!("fixtures ({}): {script}", set.name);
            let python = std::path::absolute(venv.join("bin/python")).context("the environment's python")?;
            let shared = std::env::var_os("ODPO_SHARED").map_or_else(|| std::path::Path::new("..").join("shared"), std::path::PathBuf::from);
            let shared = std::fs::canonicalize(&shared).unwrap_or(shared);
            // A fixed hash seed: PEFT writes `target_modules` from a set, in the order of its hashes.
            let status = Command::new(python).arg(script).current_dir(dir).env("ODPO_SHARED", shared).env("PYTHONHASHSEED", "0").status().context("running the script")?;
            if !status.success() {
                bail!("{script} failed");
            }
        }
        if a.check {
            for (f, old) in &committed {
                let new = std::fs::read(f).unwrap_or_default();
                if !same_fixture(f, old, &new, set.tolerance) {
                    differ.push(f.clone());
                }
                std::fs::write(f, old).with_context(|| format!("restoring {f}"))?;
            }
            eprintln!("fixtures ({}): {} files compared", set.name, committed.len());
        }
    }
    if !differ.is_empty() {
        eprintln!("regenerated fixtures differ from the committed ones:\n  {}", differ.join("\n  "));
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// The LLVM bundle cubecl-cuda 0.11.3 builds against: tracel-llvm-bundler 23.1.0-4 returns without
/// downloading when `<data dir>/tracel/tracel-llvm-23.1.0-4/.tracel-llvm-installed` exists, and then
/// asks `<that folder>/bin/llvm-config` for everything (libraries, system libraries, include and
/// library folders, C++ flags).
const TRACEL_LLVM: &str = "tracel-llvm-23.1.0-4";
/// The static LLVM SDK on PyPI that stands in for it (LLVM 23.1.1: the same major version, whose C API
/// is what cubecl-llvm binds).
const LLVM_SDK: &[&str] = &["mlc-llvm-static==23.1.1.post0", "mlc-llvm-static-extra-targets==23.1.1.post0"];
/// The CUDA version cudarc is compiled for when `CUDARC_CUDA_VERSION` is not set: its build script
/// otherwise asks `nvcc`, which a build machine without the CUDA toolkit does not have. CUDA 13.0
/// needs an NVIDIA driver ≥ 580.
const CUDARC_DEFAULT: &str = "13000";

fn home() -> std::path::PathBuf {
    std::env::var_os("HOME").map(std::path::PathBuf::from).unwrap_or_default()
}

/// Where tracel-llvm-bundler looks for its LLVM (the `dirs` crate's data-local folder on Linux:
/// `$XDG_DATA_HOME`, else `~/.local/share`).
fn tracel_llvm_dir() -> std::path::PathBuf {
    let data = std::env::var_os("XDG_DATA_HOME").map(std::path::PathBuf::from).filter(|p| p.is_absolute()).unwrap_or_else(|| home().join(".local/share"));
    data.join("tracel").join(TRACEL_LLVM)
}

/// The SDK's prefix (`.../mlc_llvm_static/static`) in a virtual environment, if it is installed
/// there with the NVPTX target.
fn llvm_sdk_of(venv: &std::path::Path) -> Result<std::path::PathBuf> {
    let python = venv.join("bin/python");
    let out = Command::new(&python)
        .args(["-c", "import mlc_llvm_static as m; print(m.get_prefix())"])
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!("no LLVM SDK in {} (run `cargo xtask setup-cuda`): {}", venv.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let prefix = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let ask = |arg: &str| -> Result<String> {
        let out = Command::new(&python).arg(prefix.join("bin/llvm-config")).arg(arg).output().context("running llvm-config")?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let (version, targets) = (ask("--version")?, ask("--targets-built")?);
    if !version.starts_with("23.") || !targets.split_whitespace().any(|t| t == "NVPTX") {
        bail!("the LLVM SDK in {} is {version} with targets `{targets}`; the cuda backend needs LLVM 23 with NVPTX", venv.display());
    }
    Ok(prefix)
}

/// `cargo xtask setup-cuda`.
fn setup_cuda(a: &SetupArgs) -> Result<ExitCode> {
    if !cfg!(target_os = "linux") {
        bail!("setup-cuda lays out the LLVM bundle for Linux builds; on other systems tracel-llvm-bundler downloads its own");
    }
    let venv = a.venv.clone().unwrap_or_else(|| home().join(".cache/odpo/cuda-llvm-venv"));
    if llvm_sdk_of(&venv).is_err() {
        eprintln!("creating {} and installing {} from PyPI (about 90 MB) ...", venv.display(), LLVM_SDK.join(" "));
        let ok = Command::new(&a.python).args(["-m", "venv"]).arg(&venv).status().context("creating the virtual environment")?.success();
        if !ok {
            bail!("`{} -m venv {}` failed (on Debian: apt-get install python3-venv)", a.python, venv.display());
        }
        let ok = Command::new(venv.join("bin/pip")).arg("install").args(LLVM_SDK).status().context("running pip")?.success();
        if !ok {
            bail!("`pip install {}` failed", LLVM_SDK.join(" "));
        }
    }
    let sdk = llvm_sdk_of(&venv)?;
    let dir = tracel_llvm_dir();
    let sentinel = dir.join(".tracel-llvm-installed");
    let ours = dir.join("odpo-llvm-sdk");
    if sentinel.exists() && !ours.exists() {
        println!("{} already holds tracel's own LLVM bundle; nothing to do", dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    // The folder: `bin/llvm-config` runs the SDK's pure-Python llvm-config with the environment's
    // Python (it needs 3.10 or newer, which the system's `python3` may not be); `include`, `lib`
    // and `share` point into the SDK. The sentinel is written last, so a half-made folder is not
    // taken for an installed one, and only when something changed: the bundler's build script
    // reruns when the sentinel's time changes, and everything above it would be rebuilt.
    let wrapper = format!(
        "#!/bin/sh\n# Written by `cargo xtask setup-cuda`: the LLVM SDK of {venv}.\nMLC_LLVM_STATIC_SDK_PREFIX='{sdk}' exec '{python}' '{sdk}/bin/llvm-config.py' \"$@\"\n",
        venv = venv.display(),
        sdk = sdk.display(),
        python = venv.join("bin/python").display()
    );
    let config = dir.join("bin/llvm-config");
    let links_ok = ["include", "lib", "share"].iter().all(|sub| std::fs::read_link(dir.join(sub)).ok().as_deref() == Some(sdk.join(sub).as_path()));
    let current = sentinel.exists() && links_ok && std::fs::read_to_string(&config).ok().as_deref() == Some(wrapper.as_str());
    if !current {
        let _ = std::fs::remove_file(&sentinel);
        std::fs::create_dir_all(dir.join("bin")).with_context(|| format!("creating {}", dir.display()))?;
        for sub in ["include", "lib", "share"] {
            let link = dir.join(sub);
            let _ = std::fs::remove_file(&link);
            #[cfg(unix)]
            std::os::unix::fs::symlink(sdk.join(sub), &link).with_context(|| format!("linking {}", link.display()))?;
        }
        std::fs::write(&config, &wrapper).with_context(|| format!("writing {}", config.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    let out = Command::new(&config).args(["--link-static", "--libdir"]).output().context("running the llvm-config wrapper")?;
    if !out.status.success() {
        bail!("{} does not run: {}", config.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    if !current {
        std::fs::write(&ours, format!("{}\n", sdk.display()))?;
        std::fs::write(&sentinel, "")?;
    }
    println!("LLVM {} is laid out in {} for burn's cuda backend.", LLVM_SDK[0].trim_start_matches("mlc-llvm-static=="), dir.display());
    println!("`cargo xtask ... --backend cuda` builds with it as it is; for cargo itself: export CUDARC_CUDA_VERSION={CUDARC_DEFAULT}   # or your toolkit's, e.g. 12080");
    println!("At run time the cuda backend needs the NVIDIA driver and, for kernels that call math functions, libdevice: $CUDA_PATH/nvvm/libdevice/libdevice.10.bc (CUDA_PATH defaults to /usr/local/cuda).");
    Ok(ExitCode::SUCCESS)
}

/// What a build with the `cuda` feature needs: the LLVM folder (checked) and the CUDA version cudarc
/// compiles for.
fn cuda_env(cmd: &mut Command) -> Result<()> {
    let dir = tracel_llvm_dir();
    if !dir.join(".tracel-llvm-installed").exists() {
        bail!("the cuda backend's LLVM is not installed at {} (run `cargo xtask setup-cuda`)", dir.display());
    }
    if std::env::var_os("CUDARC_CUDA_VERSION").is_none() {
        cmd.env("CUDARC_CUDA_VERSION", CUDARC_DEFAULT);
    }
    Ok(())
}

/// `cargo xtask soak`: `odpo train` on a tiny random GPT-2 over the two-word fixture tokenizer for
/// `--steps` steps (a checkpoint and an evaluation every 1,000), with this process reading the
/// trainer's resident memory from /proc every second and its step time from the metrics; the
/// slopes, by least squares over the run after its first tenth (warm-up), say whether either grows.
fn soak(a: &SoakArgs) -> Result<ExitCode> {
    let Some(&(_, feature)) = BACKENDS.iter().find(|(b, _)| *b == a.backend) else {
        bail!("unknown backend `{}`", a.backend);
    };
    let dir = std::env::temp_dir().join(format!("odpo-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let model = dir.join("model");
    std::fs::create_dir_all(&model)?;
    std::fs::copy("crates/odpo-model/tests/fixtures/tokenizer/tiny/tokenizer.json", model.join("tokenizer.json")).context("the fixture tokenizer (run from the repository root)")?;
    let config = serde_json::json!({"architectures": ["GPT2LMHeadModel"], "vocab_size": 6, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "bos_token_id": 0, "eos_token_id": 1});
    std::fs::write(model.join("config.json"), config.to_string())?;
    let rows: Vec<String> = (0..256)
        .map(|i| {
            let words = |n: usize, w: &str| vec![w; 1 + (i + n) % 6].join(" ");
            serde_json::json!({"prompt": words(0, "hello"), "chosen": words(1, "world"), "rejected": words(2, "hello")}).to_string()
        })
        .collect();
    std::fs::write(dir.join("pairs.jsonl"), rows.join("\n"))?;
    let run = dir.join("run");
    let toml = format!(
        "[model]\npath = {model:?}\nrandom_init = true\n[data]\npath = {data:?}\nformat = \"jsonl\"\nmax_length = 24\nmax_prompt_length = 8\neval_fraction = 0.1\n\
         [loss]\nbeta = 0.5\n[optim]\noptimizer = \"adamw\"\nlr = 1e-4\n[train]\nbatch_size = 8\nmax_steps = {steps}\ncheckpoint_every = 1000\nkeep_checkpoints = 2\nlog_every = 100\nbackend = {backend:?}\n\
         [eval]\nevery = 1000\n[output]\ndir = {run:?}\ncache_dir = {cache:?}\nprogress = false\nexport = false\n",
        model = model.display().to_string(),
        data = dir.join("pairs.jsonl").display().to_string(),
        steps = a.steps,
        backend = a.backend,
        run = run.display().to_string(),
        cache = dir.join("cache").display().to_string()
    );
    let config_path = dir.join("soak.toml");
    std::fs::write(&config_path, toml)?;

    // Build, then start the binary itself: its process id is the one to sample.
    let mut cmd = Command::new(build_odpo(feature)?);
    backend_env(&mut cmd, &[feature])?;
    let log = std::fs::File::create(dir.join("odpo.log"))?;
    let mut child = cmd.args(["train", "--config"]).arg(&config_path).stdout(std::process::Stdio::null()).stderr(log).spawn().context("starting odpo")?;
    eprintln!("soak: {} steps of a tiny GPT-2 on {} (odpo pid {}) ...", a.steps, a.backend, child.id());
    let start = std::time::Instant::now();
    let mut rss: Vec<(f64, f64, f64)> = Vec::new(); // (seconds, step, MiB)
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        let kib = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<f64>().ok()));
        let step = last_step(&run.join("metrics.jsonl"));
        if let (Some(kib), Some(step)) = (kib, step) {
            rss.push((start.elapsed().as_secs_f64(), step, kib / 1024.0));
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    };
    if !status.success() {
        bail!("odpo train failed ({status}); its log is {}", dir.join("odpo.log").display());
    }
    // Step time of each logged window: batch / pairs per second.
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl"))?;
    let steps: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["split"] == "train")
        .filter_map(|v| Some((v["step"].as_f64()?, 1e3 * 8.0 / v["pairs_per_s"].as_f64()?)))
        .collect();
    let warm = |v: &[(f64, f64)]| -> Vec<(f64, f64)> { v.iter().copied().filter(|(s, _)| *s >= a.steps as f64 / 10.0).collect() };
    let rss_pts: Vec<(f64, f64)> = rss.iter().map(|&(_, s, m)| (s, m)).collect();
    let (rss_slope, rss_mean) = slope(&warm(&rss_pts));
    let (time_slope, time_mean) = slope(&warm(&steps));
    let peak = rss.iter().map(|r| r.2).fold(0.0, f64::max);
    println!("| what | mean after warm-up | slope per 1,000 steps | relative slope per 1,000 steps |");
    println!("|---|---|---|---|");
    println!("| resident memory | {rss_mean:.1} MiB (peak {peak:.1}) | {:+.3} MiB | {:+.3}% |", 1e3 * rss_slope, 1e5 * rss_slope / rss_mean);
    println!("| step time | {time_mean:.3} ms | {:+.4} ms | {:+.3}% |", 1e3 * time_slope, 1e5 * time_slope / time_mean);
    println!("{} steps in {:.0} s, {} memory samples, {} step-time windows", a.steps, start.elapsed().as_secs_f64(), rss.len(), steps.len());
    if let Some(out) = &a.out {
        let json = serde_json::json!({
            "steps": a.steps, "backend": a.backend, "seconds": start.elapsed().as_secs_f64(),
            "rss_mib_mean": rss_mean, "rss_mib_peak": peak, "rss_mib_per_1000_steps": 1e3 * rss_slope,
            "step_ms_mean": time_mean, "step_ms_per_1000_steps": 1e3 * time_slope,
            "rss_samples": rss, "step_ms_windows": steps,
        });
        std::fs::write(out, serde_json::to_string_pretty(&json)?)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ExitCode::SUCCESS)
}

/// The newest step in a metrics file (0 before the first row).
fn last_step(path: &std::path::Path) -> Option<f64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    Some(text.lines().rev().find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_f64()).unwrap_or(0.0))
}

/// Least-squares slope of y on x, and the mean of y.
fn slope(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    if n < 2.0 {
        return (f64::NAN, points.first().map_or(f64::NAN, |p| p.1));
    }
    let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    (if sxx > 0.0 { sxy / sxx } else { f64::NAN }, my)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    /// A safetensors file of an I64 tensor `ids` and an F32 tensor `x`.
    fn safetensors(ids: [i64; 2], x: [f32; 3]) -> Vec<u8> {
        let header = r#"{"ids":{"dtype":"I64","shape":[2],"data_offsets":[0,16]},"x":{"dtype":"F32","shape":[3],"data_offsets":[16,28]}}"#;
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend(header.as_bytes());
        out.extend(ids.iter().flat_map(|i| i.to_le_bytes()));
        out.extend(x.iter().flat_map(|v| v.to_le_bytes()));
        out
    }

    #[test]
    fn regenerated_fixtures_are_compared_as_their_tests_read_them() {
        let st = |ids, x| safetensors(ids, x);
        let base = st([1, 2], [0.5, -3.0, 1e-3]);
        assert!(same_fixture("e.safetensors", &base, &base, 1e-5), "identical files with token ids");
        // Floats to 1e-5: absolute near 0, relative above 1; ids exactly.
        assert!(same_fixture("e.safetensors", &base, &st([1, 2], [0.500_002, -3.000_02, 1e-3 + 5e-6]), 1e-5));
        assert!(!same_fixture("e.safetensors", &base, &st([1, 2], [0.5, -3.0, 1e-3 + 2e-5]), 1e-5));
        assert!(!same_fixture("e.safetensors", &base, &st([1, 3], [0.5, -3.0, 1e-3]), 1e-5));
        // PEFT's set of targets in any order; another list's order matters.
        let json = |v: serde_json::Value| v.to_string().into_bytes();
        let a = json(serde_json::json!({"target_modules": ["c_proj", "c_attn"], "layer_types": ["a", "b"]}));
        assert!(same_fixture("c.json", &a, &json(serde_json::json!({"target_modules": ["c_attn", "c_proj"], "layer_types": ["a", "b"]})), 1e-5));
        assert!(!same_fixture("c.json", &a, &json(serde_json::json!({"target_modules": ["c_proj", "c_attn"], "layer_types": ["b", "a"]})), 1e-5));
        // A gradient's sum to 1e-5 of its norm (here √(100·4) = 20), its sum of squares relative.
        let g = |sum: f64, squares: f64| json(serde_json::json!({"gradients": [[100.0, sum, squares]]}));
        assert!(same_fixture("gradients.json", &g(1e-3, 4.0), &g(1e-3 + 1.5e-4, 4.0 + 3e-5), 1e-5));
        assert!(!same_fixture("gradients.json", &g(1e-3, 4.0), &g(1e-3 + 3e-4, 4.0), 1e-5));
        assert!(!same_fixture("gradients.json", &g(1e-3, 4.0), &g(1e-3, 4.001), 1e-5));
    }

    #[test]
    fn flags_are_read_in_both_spellings() {
        assert_eq!(backend_of(&args(&["--config", "x.toml"])).ok(), Some("flex"));
        assert_eq!(backend_of(&args(&["--backend", "tch"])).ok(), Some("tch"));
        assert_eq!(backend_of(&args(&["--backend=wgpu"])).ok(), Some("wgpu"));
        assert_eq!(flag_value(&args(&["--also-build=cuda,tch"]), "--also-build").ok().flatten(), Some("cuda,tch"));
        // A longer flag with the same prefix is not this one.
        assert_eq!(flag_value(&args(&["--backends=tch"]), "--backend").ok().flatten(), None);
        let missing = backend_of(&args(&["--backend"])).err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(missing, "--backend needs a value");
    }

    /// docs/concepts.md's architecture table is the rule for crate edges: every `odpo-*` dependency in
    /// a crate's `[dependencies]` is one its row allows, and every crate has a row.
    #[test]
    fn crate_edges_follow_docs_concepts_md() -> Result<()> {
        let root = repo_root();
        let doc = std::fs::read_to_string(root.join("docs/concepts.md"))?;
        let section = doc.split("\n## Architecture\n").nth(1).context("docs/concepts.md has no `## Architecture`")?;
        let mut allowed = std::collections::BTreeMap::new();
        for line in section.lines().filter(|l| l.starts_with("| `odpo-")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells[1].trim_matches('`').to_string();
            let deps: Vec<String> = if cells[3] == "all of the above" {
                allowed.keys().cloned().collect()
            } else {
                cells[3].split(',').map(|d| d.trim().trim_matches('`').to_string()).filter(|d| d.starts_with("odpo-")).collect()
            };
            allowed.insert(name, deps);
        }
        let mut crates = 0;
        for entry in std::fs::read_dir(root.join("crates"))? {
            let manifest: toml::Table = std::fs::read_to_string(entry?.path().join("Cargo.toml"))?.parse()?;
            let name = manifest["package"]["name"].as_str().context("package.name")?.to_string();
            let rule = allowed.get(&name).with_context(|| format!("docs/concepts.md has no row for {name}"))?;
            let deps = manifest.get("dependencies").and_then(toml::Value::as_table).map(|t| t.keys().filter(|k| k.starts_with("odpo-")).cloned().collect::<Vec<_>>()).unwrap_or_default();
            for d in deps {
                assert!(rule.contains(&d), "{name} depends on {d}, which docs/concepts.md does not allow (allowed: {rule:?})");
            }
            crates += 1;
        }
        assert_eq!(crates, allowed.len(), "crates/ and the table differ: {:?}", allowed.keys());
        Ok(())
    }

    /// A build with `vulkan` takes cubecl-spirv from the patched copy, and Cargo.lock, which Cargo
    /// rewrites for the patch, is left as it was.
    #[test]
    fn a_vulkan_build_takes_the_spirv_fix_and_leaves_the_lock() -> Result<()> {
        let lock = repo_root().join("Cargo.lock");
        let before = std::fs::read(&lock)?;
        let mut cmd = cargo_cmd();
        cmd.current_dir(repo_root()).args(["metadata", "--format-version", "1", "-q"]);
        let mut rewritten = false;
        let out = with_spirv_fix(&mut cmd, &["vulkan"], |c| {
            let out = c.output();
            rewritten = std::fs::read(&lock).is_ok_and(|now| now != before);
            out
        })?;
        assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
        assert!(rewritten, "Cargo did not record the patch in Cargo.lock");
        assert_eq!(std::fs::read(&lock)?, before, "Cargo.lock was not put back");
        let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let spirv = meta["packages"].as_array().context("packages")?.iter().find(|p| p["name"] == "cubecl-spirv").context("no cubecl-spirv")?;
        let dir = std::path::Path::new(spirv["manifest_path"].as_str().context("manifest_path")?).parent().context("crate folder")?.to_path_buf();
        assert!(spirv["source"].is_null(), "cubecl-spirv still comes from {}", spirv["source"]);
        let memory = std::fs::read_to_string(dir.join("src/ops/memory.rs"))?;
        assert!(memory.contains("GlobalVariableOp::new(ctx, ty, StorageClass::Workgroup"), "{} is not the patched crate", dir.display());
        // The build is told the fix is in (odpo-model refuses devices that need it otherwise).
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(args.iter().any(|a| a.starts_with("env.ODPO_CUBECL_SPIRV_FIX=")), "{args:?}");
        // Without `vulkan`, the command runs as it is.
        let mut plain = cargo_cmd();
        plain.current_dir(repo_root()).args(["metadata", "--format-version", "1", "-q"]);
        let out = with_spirv_fix(&mut plain, &["wgpu"], Command::output)?;
        let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let spirv = meta["packages"].as_array().context("packages")?.iter().find(|p| p["name"] == "cubecl-spirv").context("no cubecl-spirv")?;
        assert!(spirv["source"].as_str().is_some_and(|s| s.starts_with("registry+")), "{}", spirv["source"]);
        Ok(())
    }

    /// The build follows the backend the command will run on: the flag, an override, the config
    /// (a run config, a resumed run folder, a pipeline config, a sweep through its base).
    #[test]
    fn the_backend_a_config_names_decides_the_build() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("xtask-backend-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("run"))?;
        std::fs::write(dir.join("run.toml"), "[model]\npath = \"m\"\n[train]\nbackend = \"tch-cuda\"\n")?;
        std::fs::write(dir.join("run/config.toml"), "[train]\nbackend = \"wgpu\"\n")?;
        std::fs::write(dir.join("pipeline.toml"), "name = \"p\"\nbackend = \"cuda\"\n")?;
        std::fs::create_dir_all(dir.join("pipeline-run"))?;
        std::fs::write(dir.join("pipeline-run/pipeline.toml"), "name = \"p\"\nbackend = \"metal\"\n")?;
        std::fs::write(dir.join("sweep.toml"), "base = \"pipeline.toml\"\nname = \"s\"\n")?;
        std::fs::write(dir.join("data.toml"), "path = \"x.jsonl\"\nformat = \"jsonl\"\n")?;
        let at = |f: &str| dir.join(f).display().to_string();
        assert_eq!(backend_for(&args(&["--config", &at("run.toml")]))?, "tch-cuda");
        assert_eq!(backend_for(&args(&["--config", &at("run.toml"), "--backend", "flex"]))?, "flex");
        assert_eq!(backend_for(&args(&["--config", &at("run.toml"), "--set", "train.backend=\"vulkan\""]))?, "vulkan");
        assert_eq!(backend_for(&args(&["--resume", &at("run")]))?, "wgpu");
        assert_eq!(backend_for(&args(&["--resume", &at("pipeline-run")]))?, "metal");
        assert_eq!(backend_for(&args(&["--config", &at("pipeline.toml")]))?, "cuda");
        assert_eq!(backend_for(&args(&["--config", &at("sweep.toml")]))?, "cuda");
        assert_eq!(backend_for(&args(&["--set=backend=metal"]))?, "metal");
        // Names no backend, or cannot be read: flex, and odpo reports the file.
        assert_eq!(backend_for(&args(&["--config", &at("data.toml")]))?, "flex");
        assert_eq!(backend_for(&args(&["--config", &at("missing.toml")]))?, "flex");
        assert_eq!(backend_for(&args(&[]))?, "flex");
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
