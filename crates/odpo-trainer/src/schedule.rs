//! The learning rate as a pure function of the step: warmup, then constant, linear or cosine decay.

use crate::config::{DecayKind, OptimConfig};

/// The learning-rate schedule of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Warmup steps.
    pub warmup_steps: usize,
    /// Decay after warmup.
    pub decay: DecayKind,
    /// Final lr as a share of `lr` (linear and cosine).
    pub min_lr_ratio: f64,
    /// Total optimizer steps of the run.
    pub total_steps: usize,
}

impl Schedule {
    /// The schedule of `cfg` over `total_steps` steps.
    pub fn new(cfg: &OptimConfig, total_steps: usize) -> Self {
        Self {
            lr: cfg.lr,
            warmup_steps: cfg.warmup_steps,
            decay: cfg.schedule,
            min_lr_ratio: cfg.min_lr_ratio.unwrap_or(0.0),
            total_steps,
        }
    }

    /// The learning rate of optimizer step `step` (0-based).
    ///
    /// ```text
    /// warmup:  lr · min(1, (step + 1) / (warmup_steps + 1))        (the DPO/ODPO code's LambdaLR)
    /// then     lr · (m + (1 − m) · d(p)),  p = (step − warmup) / (total − warmup − 1) in [0, 1]
    ///          d = 1 (constant), 1 − p (linear), (1 + cos(π p)) / 2 (cosine), m = min_lr_ratio
    /// ```
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * ((step + 1) as f64 / (self.warmup_steps + 1) as f64).min(1.0);
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps + 1).max(1);
        let p = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let d = match self.decay {
            DecayKind::Constant => return self.lr,
            DecayKind::Linear => 1.0 - p,
            DecayKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
        };
        self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(decay: DecayKind, warmup: usize, min: f64) -> Schedule {
        Schedule { lr: 1.0, warmup_steps: warmup, decay, min_lr_ratio: min, total_steps: 11 }
    }

    #[test]
    fn warmup_matches_the_reference_lambda() {
        let s = sched(DecayKind::Constant, 3, 0.0);
        let got: Vec<f64> = (0..5).map(|i| s.lr_at(i)).collect();
        assert_eq!(got, vec![0.25, 0.5, 0.75, 1.0, 1.0]);
    }

    #[test]
    fn decays_reach_the_floor_at_the_last_step() {
        let lin = sched(DecayKind::Linear, 0, 0.1);
        assert_eq!(lin.lr_at(0), 1.0);
        assert!((lin.lr_at(5) - 0.55).abs() < 1e-12);
        assert!((lin.lr_at(10) - 0.1).abs() < 1e-12);
        let cos = sched(DecayKind::Cosine, 1, 0.0);
        assert_eq!(cos.lr_at(0), 0.5);
        assert_eq!(cos.lr_at(1), 1.0);
        assert!(cos.lr_at(10).abs() < 1e-12);
        assert!((cos.lr_at(1 + 9 / 2) - 0.5 * (1.0 + (std::f64::consts::PI * 4.0 / 9.0).cos())).abs() < 1e-12);
    }
}
