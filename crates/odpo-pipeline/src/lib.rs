//! odpo-pipeline: preference training end to end, from a reward to a reward-vs-KL frontier.
//!
//! It owns [`reward`] (the [`RewardModel`] trait: a known ground-truth reward and a score table),
//! [`learned`] (a regression head on a transformer, fitted to scored texts),
//! [`synthetic`] (the built-in known-reward task: a small word-level language whose words carry
//! sentiment values), [`mod@sample`] (k scored responses per prompt in the ODPO paper's format; [`journal`] keeps a
//! stopped pass's finished batches),
//! [`eval`] (mean reward and two KL estimators with 95% intervals), [`plot`] (PNG scatter plots), [`progress`] (a sweep's count of runs and time left),
//! [`stages`] (the task, SFT and preference runs as plain functions), [`pipeline`] (the default run: task, SFT, sampling, ODPO or DPO, evaluation), [`mod@frontier`]
//! (the β/α × pair-count × seed sweep), [`compare`] (whether ODPO's frontier is above DPO's, over seeds) and [`mod@experiment`] (DPO and ODPO from a pretrained model
//! scored by a reward model: the paper's sentiment experiment). Training goes through `odpo-trainer`; it never names a
//! backend: every entry point takes a `&Device`.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = odpo_model::backend::device("flex")?;
//! let summary = odpo_pipeline::run_default(&odpo_pipeline::DefaultOptions { verbose: true, ..Default::default() }, &device)?;
//! println!("{}", summary.plot.display());
//! # Ok(()) }
//! ```
//!
//! A reward model is anything that implements [`RewardModel`]; the synthetic task's is a word lexicon:
//!
//! ```
//! use odpo_pipeline::{RewardModel, synthetic};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let reward = synthetic::reward();
//! let scores = reward.score(&["lately this movie seemed".into()], &["great and very dull , yet fun .".into()])?;
//! assert_eq!(scores, vec![2.0]); // great (2) + dull (-1) + fun (1)
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod compare;
pub mod config;
mod error;
pub mod eval;
pub mod experiment;
pub mod frontier;
pub mod journal;
pub mod learned;
pub mod pipeline;
pub mod plot;
pub mod progress;
pub mod reward;
pub mod rounds;
pub mod sample;
pub mod stages;
pub mod synthetic;

pub use config::{Method, PipelineConfig};
pub use error::{PipelineError, Result};
pub use eval::{EvalReport, Estimate, KlEstimates};
pub use experiment::{ExperimentConfig, ExperimentSummary, experiment};
pub use frontier::{FrontierConfig, FrontierSummary, frontier, resume_frontier};
pub use pipeline::{DefaultOptions, DefaultSummary, eval_run, run_default};
pub use reward::{ClassifierScore, KnownReward, RewardModel, ScoreTable};
pub use sample::{SampleReport, SampleSettings, sample};
