//! Early stopping on a held-out metric (`[eval.early_stopping]`), by transformers' rule
//! (`EarlyStoppingCallback` with `load_best_model_at_end`): any evaluation better than the best so
//! far becomes the best (its checkpoint kept in `<run>/best` at once, with `restore_best`); one that
//! is not better by more than `min_delta` spends patience, and after `patience` of those in a row
//! the run stops and ends with the best evaluated model.
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
    /// Evaluations in a row without an improvement beyond `min_delta`.
    pub since_best: usize,
    /// The run stopped early at its last checkpoint's step.
    pub stopped: bool,
}

/// What an evaluation means for the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// A new best (by any amount): keep this model.
    pub improved: bool,
    /// `patience` evaluations in a row without an improvement beyond `min_delta`: stop.
    pub stop: bool,
}

impl EarlyStopState {
    /// Records the evaluation at `step`. An error when the eval has no such metric.
    pub fn observe(&mut self, cfg: &EarlyStoppingConfig, step: usize, values: &BTreeMap<String, f64>) -> Result<Verdict> {
        let Some(&value) = values.get(&cfg.metric) else {
            let names: Vec<&str> = values.keys().map(String::as_str).collect();
            return Err(TrainError::config("eval.early_stopping.metric", format!("is `{}`, which the evaluation does not report; it reports {names:?}", cfg.metric)));
        };
        // How much better than the best so far (positive: better); a NaN or infinite value never is.
        let gain = match (self.best, cfg.mode()) {
            _ if !value.is_finite() => f64::NEG_INFINITY,
            (None, _) => f64::INFINITY,
            (Some((_, best)), StopMode::Min) => best - value,
            (Some((_, best)), StopMode::Max) => value - best,
        };
        let improved = gain > 0.0;
        if improved {
            (self.best, self.best_values) = (Some((step, value)), values.clone());
        }
        self.since_best = if gain > cfg.min_delta { 0 } else { self.since_best + 1 };
        self.stopped = self.since_best >= cfg.patience;
        Ok(Verdict { improved, stop: self.stopped })
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
        let verdicts: Vec<(bool, bool)> = [(0, 0.70), (10, 0.60), (20, 0.595), (30, 0.50), (40, 0.55), (50, 0.495)]
            .iter()
            .map(|&(step, loss)| s.observe(&cfg, step, &eval(loss)).map(|v| (v.improved, v.stop)).unwrap())
            .collect();
        // 0.595 and 0.495 are new bests within min_delta of the one before: kept, but they spend
        // patience; the second of two such evaluations in a row (0.55, 0.495) stops the run.
        assert_eq!(verdicts, [(true, false), (true, false), (true, false), (true, false), (false, false), (true, true)]);
        assert_eq!(s.best, Some((50, 0.495)));
        assert_eq!(s.best_values["loss"], 0.495);
        assert!(s.stopped);
    }

    /// A resumed run reads its record back from `state.json` bit for bit (serde_json's
    /// `float_roundtrip`; its default parse is an ulp off for about one f64 in eleven, this one among
    /// them), so an evaluation that ties the best is still a tie after a resume.
    #[test]
    fn the_record_reads_back_from_json_bit_for_bit() {
        let cfg = EarlyStoppingConfig { patience: 3, ..Default::default() };
        let best = 0.009389878496179485;
        let mut s = EarlyStopState::default();
        s.observe(&cfg, 10, &eval(best)).unwrap();
        let mut back: EarlyStopState = serde_json::from_str(&serde_json::to_string_pretty(&s).unwrap()).unwrap();
        assert_eq!(back.best.map(|(_, v)| v.to_bits()), Some(best.to_bits()));
        assert_eq!(back, s);
        assert!(!back.observe(&cfg, 20, &eval(best)).unwrap().improved, "a tie is no improvement after a resume");
    }

    #[test]
    fn higher_is_better_for_accuracies_and_nan_never_improves() {
        let cfg = EarlyStoppingConfig { metric: "rewards/accuracies".into(), patience: 1, ..Default::default() };
        assert_eq!(cfg.mode(), StopMode::Max);
        let mut s = EarlyStopState::default();
        assert_eq!(s.observe(&cfg, 0, &eval(f64::NAN)).unwrap(), Verdict { improved: false, stop: true });
        let mut s = EarlyStopState::default();
        assert_eq!(s.observe(&cfg, 0, &eval(0.5)).unwrap(), Verdict { improved: true, stop: false });
        assert_eq!(s.observe(&cfg, 10, &eval(0.4)).unwrap(), Verdict { improved: true, stop: false });
        assert_eq!(s.observe(&cfg, 20, &eval(0.45)).unwrap(), Verdict { improved: false, stop: true });
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
