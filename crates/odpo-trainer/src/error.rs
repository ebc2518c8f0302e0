//! `TrainError`: everything that can stop a run, each naming what to look at.

use std::path::PathBuf;

/// Why a run could not start, continue or finish.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// The run config could not be read or parsed (TOML syntax, unknown key, wrong type).
    #[error("{origin}: {message}")]
    ConfigParse {
        /// The file, or `--set key=value` for an override.
        origin: String,
        /// The parser's message, which names the key and the expected type.
        message: String,
    },
    /// A config value is out of range or does not apply.
    #[error("config: `{key}` {message}")]
    Config {
        /// The dotted key, e.g. `optim.betas`.
        key: String,
        /// What is wrong and what is expected.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Loading or saving the model failed.
    #[error(transparent)]
    Model(#[from] odpo_model::ModelError),
    /// Reading or tokenizing the data failed.
    #[error(transparent)]
    Data(#[from] odpo_data::DataError),
    /// The tokenizer could not be loaded.
    #[error(transparent)]
    Tokenizer(#[from] odpo_model::tokenizer::TokenizerError),
    /// The backend named is unknown or not compiled in.
    #[error(transparent)]
    Backend(#[from] odpo_model::backend::BackendError),
    /// The objective refused its inputs (a config or shape problem).
    #[error(transparent)]
    Loss(#[from] odpo_loss::LossError),
    /// A NaN or infinity appeared; the last good checkpoint is kept.
    #[error("non-finite {what} at step {step} (pairs {pair_ids:?}): {detail}; the last good checkpoint is kept")]
    NonFinite {
        /// The optimizer step (0-based) being computed.
        step: usize,
        /// `loss` or `gradient`.
        what: &'static str,
        /// The ids of the pairs in the offending micro-batch (or the whole step for gradients).
        pair_ids: Vec<usize>,
        /// Which tensor: the loss crate's diagnosis, or the parameter whose gradient is not finite.
        detail: String,
    },
    /// A checkpoint or cache file is missing or unreadable.
    #[error("checkpoint {}: {message}", path.display())]
    Checkpoint {
        /// The file or folder.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Training changes nothing: the gradient was (almost) zero for `steps` steps in a row.
    #[error("nothing is learning: the gradient norm was {grad_norm:.1e} or less for {steps} steps in a row up to step {step}{detail}; check that adapters are attached, that completions are not all masked or cut, and that chosen and rejected differ (`train.stop_if_not_learning = 0` turns this check off)")]
    NotLearning {
        /// Steps in a row.
        steps: usize,
        /// The last of them (1-based).
        step: usize,
        /// The largest gradient norm among them.
        grad_norm: f64,
        /// What the metrics say (the loss and the reward margin of a preference run).
        detail: String,
    },
    /// Reading a tensor back from the device failed.
    #[error("reading {what} back from the device failed: {message}")]
    Device {
        /// What was being read.
        what: &'static str,
        /// The backend's message.
        message: String,
    },
    /// The device ran out of memory: the batch does not fit. Checkpoints already written are kept.
    #[error("out of memory on the device during {during}: {cause}; {advice}")]
    OutOfMemory {
        /// What was running: `step 12`, `the evaluation at step 40`.
        during: String,
        /// What to change, naming the config keys.
        advice: String,
        /// The allocation that failed.
        cause: odpo_model::out_of_memory::OutOfMemory,
        /// The run folder, where a run was training (its checkpoints can be resumed from).
        run_dir: Option<PathBuf>,
    },
    /// The training state cannot fit in the host memory left after the model loaded, on a device
    /// that keeps its tensors there (flex, libtorch's CPU): refused before the first step, where
    /// the process would otherwise be ended by the allocator or the system.
    #[error("not enough host memory: {message}; {advice}")]
    HostMemory {
        /// What the state needs, part by part, and what is free.
        message: String,
        /// What to change, naming the config keys.
        advice: String,
    },
    /// A data-parallel worker thread panicked: a bug, not a config problem.
    #[error("the worker thread of device {device} panicked: {message}")]
    WorkerPanicked {
        /// The device's index in `train.devices`.
        device: usize,
        /// The panic's message.
        message: String,
    },
    /// The reference cache read for this run has no row for a pair it trains on.
    #[error("the reference log-prob cache has no row for pair {pair}: it does not match this run's data (delete its file in `output.cache_dir` to recompute it)")]
    MissingReference {
        /// The pair id.
        pair: usize,
    },
    /// The run stopped at a step boundary because a stop was asked for (SIGTERM, SIGINT or
    /// [`crate::interrupt::request`]), after writing a checkpoint.
    #[error("stopped at step {step} on request; checkpoint {}; the run in {} can be resumed", checkpoint.display(), run_dir.display())]
    Interrupted {
        /// Optimizer steps done.
        step: usize,
        /// The checkpoint written on the way out.
        checkpoint: PathBuf,
        /// The run folder to resume.
        run_dir: PathBuf,
    },
    /// Another live run holds the run folder.
    #[error("{}: in use by another run ({holder}); wait for it to end or choose another `output.dir`", run_dir.display())]
    Busy {
        /// The run folder.
        run_dir: PathBuf,
        /// Who holds it, as its lock file says (process id and start time).
        holder: String,
    },
}

/// Results of this crate.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }

    pub(crate) fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config { key: key.into(), message: message.into() }
    }

    /// This error as [`TrainError::OutOfMemory`] in `during` when it reports an allocation failure
    /// (cubecl's, read back from the device), else unchanged.
    pub(crate) fn out_of_memory_in(self, during: impl FnOnce() -> String, advice: impl FnOnce() -> String) -> Self {
        let found = match &self {
            Self::Device { message, .. } => odpo_model::out_of_memory::OutOfMemory::find(message),
            Self::Loss(e @ odpo_loss::LossError::Read { .. }) => odpo_model::out_of_memory::OutOfMemory::find(&e.to_string()),
            Self::WorkerPanicked { message, .. } => odpo_model::out_of_memory::OutOfMemory::find(message),
            _ => None,
        };
        match found {
            Some(cause) => Self::OutOfMemory { during: during(), advice: advice(), cause, run_dir: None },
            None => self,
        }
    }

    /// An out-of-memory error of the run in `run_dir` names the folder, whose checkpoints resume.
    pub(crate) fn in_run(self, run_dir: &std::path::Path) -> Self {
        match self {
            Self::OutOfMemory { during, advice, cause, run_dir: None } => Self::OutOfMemory { during, advice, cause, run_dir: Some(run_dir.to_path_buf()) },
            e => e,
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Self::Checkpoint { path: path.into(), message: message.to_string() }
    }
}
