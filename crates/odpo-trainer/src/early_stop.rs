//! Early stopping on a held-out metric (`[eval.early_stopping]`): after each evaluation, is the
//! metric better than its best by more than `min_delta`? After `patience` evaluations that are not,
//! the run stops, and (with `restore_best`) ends with the best evaluated model, whose checkpoint is
//! kept in `<run>/best` as soon as it is found.
//!
//! burn-train has the same rule (`MetricEarlyStoppingStrategy`), but it reads the metric from its
//! learner's event store, counts epochs, and keeps its best value in memory only; here the state
//! travels in each checkpoint, so a resumed run stops at the step the uninterrupted one would.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{EarlyStoppingConfig, StopMode};
use crate::error::{Result, TrainError};

/// What early stopping has seen so far (saved in each checkpoint's `state.json`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopState {
    /// The step of the best evaluation so far and the metric's value there.
    pub best: Option<(usize, f64)>,
    /// Every eval metric at the best step.
    pub best_values: BTreeMap<String, f64>,
    /// Evaluations since the best one.
    pub since_best: usize,
    /// The run stopped early at its last checkpoint's step.
    pub stopped: bool,
}

/// What an evaluation means for the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A new best: keep this model.
    Improved,
    /// Not better; patience left.
    Continue,
    /// Not better for `patience` evaluations: stop.
    Stop,
}

impl EarlyStopState {
    /// Records the evaluation at `step`. An error when the eval has no such metric.
    pub fn observe(&mut self, cfg: &EarlyStoppingConfig, step: usize, values: &BTreeMap<String, f64>) -> Result<Verdict> {
        let Some(&value) = values.get(&cfg.metric) else {
            let names: Vec<&str> = values.keys().map(String::as_str).collect();
            return Err(TrainError::config("eval.early_stopping.metric", format!("is `{}`, which the evaluation does not report; it reports {names:?}", cfg.metric)));
        };
        // A NaN or infinite value is never an improvement.
        let better = value.is_finite()
            && match self.best {
                None => true,
                Some((_, best)) => match cfg.mode() {
                    StopMode::Min => value < best - cfg.min_delta,
                    StopMode::Max => value > best + cfg.min_delta,
                },
            };
        if better {
            (self.best, self.best_values, self.since_best) = (Some((step, value)), values.clone(), 0);
            return Ok(Verdict::Improved);
        }
        self.since_best += 1;
        self.stopped = self.since_best >= cfg.patience;
        Ok(if self.stopped { Verdict::Stop } else { Verdict::Continue })
    }
}

/// The folder (a run folder of its own, one checkpoint) that keeps the best evaluated model.
pub fn best_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("best")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn eval(loss: f64) -> BTreeMap<String, f64> {
        BTreeMap::from([("loss".to_string(), loss), ("rewards/accuracies".to_string(), 1.0 - loss)])
    }

    #[test]
    fn stops_after_patience_evaluations_without_an_improvement_beyond_min_delta() {
        let cfg = EarlyStoppingConfig { patience: 2, min_delta: 0.01, ..Default::default() };
        let mut s = EarlyStopState::default();
        let verdicts: Vec<Verdict> = [(0, 0.70), (10, 0.60), (20, 0.595), (30, 0.50), (40, 0.55), (50, 0.495)]
            .iter()
            .map(|&(step, loss)| s.observe(&cfg, step, &eval(loss)).unwrap())
            .collect();
        use Verdict::*;
        // 0.595 is within min_delta of 0.60; 0.495 is within it of 0.50.
        assert_eq!(verdicts, [Improved, Improved, Continue, Improved, Continue, Stop]);
        assert_eq!(s.best, Some((30, 0.50)));
        assert_eq!(s.best_values["loss"], 0.50);
        assert!(s.stopped);
    }

    #[test]
    fn higher_is_better_for_accuracies_and_nan_never_improves() {
        let cfg = EarlyStoppingConfig { metric: "rewards/accuracies".into(), patience: 1, ..Default::default() };
        assert_eq!(cfg.mode(), StopMode::Max);
        let mut s = EarlyStopState::default();
        assert_eq!(s.observe(&cfg, 0, &eval(f64::NAN)).unwrap(), Verdict::Stop);
        let mut s = EarlyStopState::default();
        assert_eq!(s.observe(&cfg, 0, &eval(0.5)).unwrap(), Verdict::Improved);
        assert_eq!(s.observe(&cfg, 10, &eval(0.4)).unwrap(), Verdict::Improved);
        assert_eq!(s.observe(&cfg, 20, &eval(0.45)).unwrap(), Verdict::Stop);
        let (step, best) = s.best.unwrap();
        assert!(step == 10 && (best - 0.6).abs() < 1e-12);
    }

    #[test]
    fn a_metric_the_evaluation_lacks_is_an_error_naming_the_setting_and_the_metrics() {
        let cfg = EarlyStoppingConfig { metric: "accuracy".into(), ..Default::default() };
        let e = EarlyStopState::default().observe(&cfg, 0, &eval(0.5)).unwrap_err().to_string();
        assert!(e.contains("eval.early_stopping.metric") && e.contains("rewards/accuracies"), "{e}");
    }
}
