//! burn-train's training dashboard and metric files, fed by the loop's own metrics.
//!
//! - [`Dashboard`] (`output.dashboard = true`, on a terminal): burn-train's TUI renderer with every
//!   metric of `metrics.jsonl` registered as a burn-train numeric metric (loss, rewards and
//!   accuracies, margins, offsets, lr, grad norm, tokens/s; evaluation rows on its validation side),
//!   the step as its progress. Its `q` stops the run as SIGINT does: the step finishes, a checkpoint
//!   is written, the run exits to be resumed. While it is up, the log goes to `<run>/train.log`
//!   ([`log_file`]) so that it does not write over the screen.
//! - [`BurnTrainLog`] (`output.report_to = ["burn-train"]`): burn-train's `FileMetricLogger`, one
//!   file per metric under `<run>/burn-train/{train,valid}/epoch-N/`, beside `metrics.jsonl`.
//!
//! What is not used, and why: burn-train's `SupervisedTraining` drives its own epochs over a
//! `DataLoader` and steps through `TrainStep::optimize`; odpo's step keeps micro-batches, the reference
//! pass, global-norm clipping folded into a fused AdamW, data parallelism and an exact resume
//! position that burn-train's loop does not carry (docs/concepts.md). Its plain (non-terminal)
//! renderer prints a `Debug` line per update, which the progress bar and `metrics.jsonl` already say
//! better, so off a terminal the bar stays.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::{Arc, Mutex};

use burn_train::logger::{FileMetricLogger, MetricLogger, TrainingProgressLogger};
use burn_train::metric::store::{MetricsUpdate, NumericMetricUpdate, Split};
use burn_train::metric::{MetricAttributes, MetricDefinition, MetricEntry, MetricId, NumericAttributes, NumericEntry, SerializedEntry};
use burn_train::renderer::tui::TuiMetricsRendererWrapper;
use burn_train::renderer::{MetricState, MetricsRenderer, MetricsRendererTraining};
use burn_train::Interrupter;

use crate::error::{Result, TrainError};

/// Where the log goes while the dashboard holds the terminal; `None` otherwise.
static LOG_FILE: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// The file the process's log should be written to instead of stderr, while a dashboard is up.
/// The command line's log writer asks this on every line.
pub fn log_file() -> Option<std::fs::File> {
    LOG_FILE.lock().ok()?.as_ref().and_then(|f| f.try_clone().ok())
}

/// A metric's definition: its unit, and whether larger is better (for the dashboard's colours).
fn definition(name: &str) -> MetricDefinition {
    let lower_is_better = ["loss", "nll", "ppl", "grad_norm"].iter().any(|k| name.contains(k)) || name.contains("rejected");
    let unit = if name.ends_with("_per_s") { Some("/s".to_string()) } else { None };
    MetricDefinition {
        metric_id: MetricId::new(Arc::new(name.to_string())),
        name: Arc::new(name.to_string()),
        description: None,
        attributes: MetricAttributes::Numeric(NumericAttributes { unit, higher_is_better: !lower_is_better }),
    }
}

fn entry(name: &str, value: f64) -> MetricEntry {
    MetricEntry::new(MetricId::new(Arc::new(name.to_string())), SerializedEntry { formatted: format!("{value:.4}"), serialized: value.to_string() })
}

/// burn-train's TUI over the loop's metrics.
pub struct Dashboard {
    renderer: TuiMetricsRendererWrapper,
    interrupter: Interrupter,
    registered: std::collections::BTreeSet<String>,
}

impl Dashboard {
    /// The dashboard, when stdout is a terminal; `None` otherwise (the progress bar is used then).
    /// `at` is the step the run starts from (not 0 when resumed).
    pub fn open(run_dir: &Path, total_steps: usize, at: usize) -> Result<Option<Self>> {
        if !std::io::stdout().is_terminal() {
            tracing::info!("output.dashboard: stdout is not a terminal; showing the progress bar instead");
            return Ok(None);
        }
        let path = run_dir.join("train.log");
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| TrainError::io(&path, e))?;
        tracing::info!("dashboard on; the log goes to {} until it closes", path.display());
        if let Ok(mut slot) = LOG_FILE.lock() {
            *slot = Some(file);
        }
        let interrupter = Interrupter::new();
        let mut renderer = TuiMetricsRendererWrapper::new(interrupter.clone(), None);
        renderer.start(1, 0, Some(total_steps), Some("odpo"));
        renderer.start_split("train", total_steps);
        renderer.update_split(at);
        Ok(Some(Self { renderer, interrupter, registered: Default::default() }))
    }

    /// Shows a row of `metrics.jsonl` (its step, split and values): a train row as training metrics
    /// and the progress, an eval row as validation metrics.
    pub fn row(&mut self, step: usize, split: &str, values: &BTreeMap<String, f64>) {
        for (name, &value) in values.iter().filter(|(_, v)| v.is_finite()) {
            if self.registered.insert(name.clone()) {
                self.renderer.register_metric(definition(name));
            }
            let state = MetricState::Numeric(entry(name, value), Some(NumericEntry::Value(value)));
            if split == "eval" { self.renderer.update_valid(state) } else { self.renderer.update_train(state) }
        }
        if split == "train" {
            self.renderer.update_split(step);
        }
    }

    /// Whether the dashboard's user asked the run to stop (`q`).
    pub fn stop_requested(&self) -> bool {
        self.interrupter.should_stop()
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        self.renderer.end_split();
        // Gives the terminal back (burn-train's renderer restores it when its thread ends).
        let _ = self.renderer.on_train_end(None);
        if let Ok(mut slot) = LOG_FILE.lock() {
            *slot = None;
        }
    }
}

/// burn-train's file metric logger beside `metrics.jsonl`: `<run>/burn-train/{train,valid}/epoch-N/<metric>.log`.
pub struct BurnTrainLog {
    dir: std::path::PathBuf,
    logger: FileMetricLogger,
    registered: std::collections::BTreeSet<String>,
    /// The data epoch of the last training row (evaluation rows go with it).
    epoch: usize,
}

impl BurnTrainLog {
    /// Writes under `dir`.
    pub fn create(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf(), logger: FileMetricLogger::new(dir), registered: Default::default(), epoch: 1 }
    }

    /// Logs a row under the data epoch it is in (burn-train groups its files by epoch; a training
    /// row's `epoch` value is the passes made so far).
    pub fn row(&mut self, split: &str, values: &BTreeMap<String, f64>) -> Result<()> {
        if let Some(e) = values.get("epoch").filter(|e| e.is_finite() && **e >= 0.0) {
            self.epoch = (e.ceil() as usize).max(1);
        }
        let mut numeric = Vec::new();
        for (name, &value) in values.iter().filter(|(_, v)| v.is_finite()) {
            // A metric is a file: `rewards/accuracies` becomes `rewards.accuracies.log`.
            let name = name.replace('/', ".");
            if self.registered.insert(name.clone()) {
                self.logger.log_metric_definition(definition(&name));
            }
            numeric.push(NumericMetricUpdate { entry: entry(&name, value), numeric_entry: Some(NumericEntry::Value(value)), running_entry: None });
        }
        let split = if split == "eval" { Split::Valid } else { Split::Train };
        // burn-train's file logger panics when it cannot write; here that is an error naming the folder.
        let update = MetricsUpdate { entries: Vec::new(), entries_numeric: numeric };
        let (logger, epoch) = (&mut self.logger, self.epoch);
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| logger.log(update, epoch, &split)))
            .map_err(|_| TrainError::io(&self.dir, std::io::Error::other("burn-train's file metric logger could not write here")))
    }
}
