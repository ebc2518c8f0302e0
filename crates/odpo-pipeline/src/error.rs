//! `PipelineError`: what can stop a pipeline stage, each naming the file or option to look at.

use std::path::PathBuf;

/// Why a pipeline stage failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file (score table, run summary) is malformed.
    #[error("{}{}: {message}", path.display(), if *line > 0 { format!(":{line}") } else { String::new() })]
    Json {
        /// The file.
        path: PathBuf,
        /// The line (1-based; 0 for a whole-file document).
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// `eval --run` was given a folder that no run of the built-in task wrote.
    #[error(
        "{}: not a run folder of the built-in task (it has no pipeline.toml); `eval --run` re-evaluates the runs of `train` without `--config`, and a `train --config` run's evaluations are in its metrics.jsonl",
        path.display()
    )]
    NotPipelineRun {
        /// The folder.
        path: PathBuf,
    },
    /// A score table has no score for a text it was asked about.
    #[error("the score table `{}` has no score for prompt {prompt:?} and text {text:?}", path.display())]
    Unscored {
        /// The table's file.
        path: PathBuf,
        /// The prompt.
        prompt: String,
        /// The text.
        text: String,
    },
    /// The model could not be loaded, run or saved.
    #[error(transparent)]
    Model(#[from] odpo_model::ModelError),
    /// The tokenizer failed.
    #[error(transparent)]
    Tokenizer(#[from] odpo_model::tokenizer::TokenizerError),
    /// The backend named is unknown or not compiled in.
    #[error(transparent)]
    Backend(#[from] odpo_model::backend::BackendError),
    /// A training stage failed, or a config could not be read (every config's errors are the
    /// trainer's: `TrainError::ConfigParse` and `TrainError::Config`).
    #[error(transparent)]
    Train(#[from] odpo_trainer::TrainError),
    /// Too few scored texts or pairs to fit a reward model on.
    #[error("{count} {what}; at least {least} are needed to fit a reward model")]
    TooLittleData {
        /// `scored texts` or `pairs`.
        what: &'static str,
        /// How many were given.
        count: usize,
        /// The fewest a fit takes ([`crate::learned::MIN_FIT_ROWS`]).
        least: usize,
    },
    /// A reward model's fit or scoring failed on the numbers it was given.
    #[error("reward model: {0}")]
    RewardModel(String),
    /// A prompt file holds no prompt.
    #[error("{}: no prompts (every line is blank); expected one prompt a line", path.display())]
    NoPrompts {
        /// The file.
        path: PathBuf,
    },
    /// A stop was asked for (a signal) during a long pass over a model (sampling, a reward
    /// model's features): the pass ended after its current batch.
    #[error("stopped on request while {task}, after {done} of {total} {unit}{}", kept.as_ref().map(|k| format!("; they are kept in {}", k.display())).unwrap_or_default())]
    Stopped {
        /// The pass: `sampling`, `computing the backbone's features`.
        task: &'static str,
        /// Rows done.
        done: usize,
        /// Rows the pass was to compute.
        total: usize,
        /// What a row is: `responses`, `texts`.
        unit: &'static str,
        /// The journal that keeps them, where the pass has one (an evaluation's samples and the
        /// scores of a learned reward are computed again).
        kept: Option<PathBuf>,
        /// The built-in pipeline's run folder, which `train --resume` continues, when the pass
        /// was one of its stages.
        run_dir: Option<PathBuf>,
    },
    /// Another live odpo process works in the run folder (a sweep, an experiment or a run of the
    /// built-in pipeline resumed twice at once).
    #[error("{}: in use by another odpo process ({holder}); wait for it to end (a new run gets a folder of its own)", dir.display())]
    Busy {
        /// The run folder.
        dir: PathBuf,
        /// Who holds it, as its lock file says (process id and start time).
        holder: String,
    },
    /// The plot could not be drawn.
    #[error("plot `{}`: {message}", path.display())]
    Plot {
        /// The PNG file.
        path: PathBuf,
        /// The drawing backend's message.
        message: String,
    },
}

impl PipelineError {
    /// A pass's stop after `done` of `total` rows, kept in `journal` where it has one.
    pub(crate) fn stopped(task: &'static str, done: usize, total: usize, unit: &'static str, journal: Option<&std::path::Path>) -> Self {
        Self::Stopped { task, done, total, unit, kept: journal.map(std::path::Path::to_path_buf), run_dir: None }
    }

    /// `self`, naming the pipeline run folder `dir` that continues it where it is a stop.
    pub(crate) fn in_run(self, dir: &std::path::Path) -> Self {
        match self {
            Self::Stopped { task, done, total, unit, kept, .. } => Self::Stopped { task, done, total, unit, kept, run_dir: Some(dir.to_path_buf()) },
            other => other,
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }

    /// A config value problem on `key`.
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Train(odpo_trainer::TrainError::Config { key: key.into(), message: message.into() })
    }

    /// A config that could not be read or written (`origin`: the file, or `--set key=value`).
    pub fn config_parse(origin: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Train(odpo_trainer::TrainError::ConfigParse { origin: origin.into(), message: message.into() })
    }
}

/// `Result` with [`PipelineError`].
pub type Result<T, E = PipelineError> = std::result::Result<T, E>;
