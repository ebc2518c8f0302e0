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
//! let cfg = odpo_trainer::RunConfig::from_file("configs/smollm2-imdb-odpo.toml".as_ref(), &["train.max_steps=20".into()])?;
//! let summary = odpo_trainer::train(&cfg, &burn::tensor::Device::default(), false)?;
//! println!("{:?}", summary.eval_end);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod bench;
pub mod checkpoint;
#[cfg(feature = "dashboard")]
pub mod dashboard;
pub mod config;
pub mod data;
pub mod early_stop;
mod error;
pub mod eval;
pub mod forward;
mod host_memory;
pub mod interrupt;
pub mod lock;
pub mod metrics;
pub mod optim;
pub mod refcache;
pub mod schedule;
pub mod step;
pub mod tensorboard;
mod train;

pub use config::RunConfig;
pub use data::RunData;
pub use error::{Result, TrainError};
pub use step::{StepStats, Trainer};
pub use host_memory::trainable_params;
pub use train::{RunSummary, export, load_base, load_data, load_policy, tokenizer_path, train, train_on, train_on_devices};
