//! The training loop of odpo: SFT and preference training (ODPO and every objective of `odpo-loss`) of
//! an `odpo-model` causal LM on `odpo-data` pairs, configured by one TOML file per run.
//!
//! This crate owns the run: [`config`] (the strict `RunConfig` and `--set` overrides), [`train()`] (the
//! loop, readable top to bottom), [`schedule`] (warmup then constant, linear or cosine), [`optim`]
//! (AdamW and RMSprop with PyTorch's hyper-parameters, PyTorch's global-norm clipping), [`checkpoint`]
//! (atomic, checksummed checkpoints and exact resume), [`interrupt`] (a clean stop on SIGTERM / SIGINT),
//! [`metrics`] (`metrics.jsonl` and `metrics.csv`), [`refcache`]
//! (reference log-probs cached on disk) and [`eval`]. It never names a backend: it takes a `&Device`.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let summary = odpo_trainer::run_from_args(
//!     Some("configs/smollm2-imdb-odpo.toml".as_ref()), None, &["train.max_steps=20".into()], None)?;
//! println!("{:?}", summary.eval_end);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod allocator;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
mod error;
pub mod eval;
pub mod forward;
pub mod interrupt;
pub mod lock;
pub mod metrics;
pub mod optim;
pub mod refcache;
pub mod schedule;
mod train;

use std::path::Path;

pub use config::RunConfig;
pub use data::RunData;
pub use error::{Result, TrainError};
pub use train::{RunSummary, export, load_data, load_policy, tokenizer_dir, train, train_on, train_on_devices, trainable_params};

/// What `odpo train` / `cargo xtask train` call: reads the config (or, with `resume`, the run folder's
/// resolved `config.toml`), applies `--set` overrides, picks the backend (`backend` overrides
/// `train.backend`) and trains.
pub fn run_from_args(config: Option<&Path>, backend: Option<&str>, sets: &[String], resume: Option<&Path>) -> Result<RunSummary> {
    let path = match (resume, config) {
        (Some(run_dir), _) => run_dir.join("config.toml"),
        (None, Some(config)) => config.to_path_buf(),
        (None, None) => return Err(TrainError::config("--config", "is required unless `--resume RUN_DIR` is given")),
    };
    // `--backend` is applied as the first override, so that `train.devices` is checked against it.
    let sets: Vec<String> = backend.map(|b| format!("train.backend={}", toml::Value::String(b.to_string()))).into_iter().chain(sets.iter().cloned()).collect();
    let mut cfg = RunConfig::from_file(&path, &sets)?;
    if let Some(run_dir) = resume {
        // The run folder is where it is now, whatever the saved config says.
        cfg.output.dir = run_dir.to_path_buf();
    }
    let devices = odpo_model::backend::devices(&cfg.train.backend, &cfg.train.devices)?;
    tracing::info!(backend = %cfg.train.backend, devices = ?cfg.train.devices, run = %cfg.output.dir.display(), "training");
    if devices.len() == 1 {
        return train(&cfg, &devices[0], resume.is_some());
    }
    let data = load_data(&cfg)?;
    train_on_devices(&cfg, data, &devices, resume.is_some(), Some(&tokenizer_dir(&cfg.model)))
}
