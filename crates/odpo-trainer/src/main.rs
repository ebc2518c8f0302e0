//! `odpo-train`: the trainer's command line (`cargo xtask train` runs it with the backend's features).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Train a model with SFT or a preference objective (ODPO, DPO, ...), as a TOML run config says.
#[derive(Parser, Debug)]
#[command(name = "odpo-train", version)]
struct Args {
    /// The run config (configs/NAME.toml). Not needed with --resume.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Backend (flex, wgpu, vulkan, metal, cuda, tch, tch-cuda); overrides `train.backend`.
    #[arg(long)]
    backend: Option<String>,
    /// Override a config key, e.g. `--set optim.lr=1e-6` (repeatable; the value is parsed as TOML).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Continue the run in this folder from its newest checkpoint.
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
}

fn main() -> ExitCode {
    odpo_trainer::allocator::reuse_freed_memory();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let args = Args::parse();
    if let Err(e) = odpo_trainer::interrupt::install() {
        eprintln!("warning: SIGTERM and SIGINT will end the run without a checkpoint: {e}");
    }
    match odpo_trainer::run_from_args(args.config.as_deref(), args.backend.as_deref(), &args.sets, args.resume.as_deref()) {
        Ok(summary) => {
            println!("{}", serde_json::json!({
                "run_dir": summary.run_dir, "steps": summary.steps, "resumed_from": summary.resumed_from,
                "train_loss": summary.train_loss, "eval_start": summary.eval_start, "eval_end": summary.eval_end,
                "exported": summary.exported,
            }));
            ExitCode::SUCCESS
        }
        Err(odpo_trainer::TrainError::Interrupted { step, run_dir, .. }) => {
            eprintln!("stopped on a signal after step {step}, with a checkpoint in {}", run_dir.display());
            eprintln!("resume with: odpo-train --resume {}", run_dir.display());
            ExitCode::from(odpo_trainer::interrupt::EXIT_INTERRUPTED)
        }
        Err(e) => {
            let err = anyhow::Error::new(e);
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
