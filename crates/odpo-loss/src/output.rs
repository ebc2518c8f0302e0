//! `LossOutput` and `Metrics`: the reduced loss, per-pair losses and detached metrics, all still on the
//! device; and `check_finite`, the one place that reads them back.

use burn::tensor::Tensor;

use crate::inputs::read;
use crate::{LossError, PairLogps};

/// The metrics of one batch, each a detached tensor of shape `[1]` (no host sync until the caller reads
/// them). Definitions follow TRL's logged metrics; r = β·(log π_θ − log π_ref) with SUMMED log-probs
/// whatever the objective, plain (unweighted) means over the B pairs.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// `rewards/chosen`: mean of r_w = β·(log π_θ(y_w|x) − log π_ref(y_w|x)).
    pub rewards_chosen: Tensor<1>,
    /// `rewards/rejected`: mean of r_l.
    pub rewards_rejected: Tensor<1>,
    /// `rewards/margins`: mean of r_w − r_l = β·h.
    pub rewards_margins: Tensor<1>,
    /// `rewards/accuracies`: share of pairs with r_w > r_l (strictly).
    pub rewards_accuracies: Tensor<1>,
    /// `logps/chosen`: mean of log π_θ(y_w|x).
    pub logps_chosen: Tensor<1>,
    /// `logps/rejected`: mean of log π_θ(y_l|x).
    pub logps_rejected: Tensor<1>,
    /// `offset/mean`: mean of Δ (0 without offsets).
    pub offset_mean: Tensor<1>,
    /// `offset/satisfied`: share of pairs with β·h > Δ (equals `rewards/accuracies` without offsets).
    pub offset_satisfied: Tensor<1>,
    /// `loss`: the reduced loss, as in [`LossOutput::loss`].
    pub loss: Tensor<1>,
    /// `wpo/weight`: mean of WPO's pair weights ω; only with `use_weighting`.
    pub wpo_weight: Option<Tensor<1>>,
}

impl Metrics {
    /// The metric names, in the order of [`Metrics::named`].
    pub const NAMES: [&'static str; 9] = [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "offset/mean",
        "offset/satisfied",
        "loss",
    ];

    /// The name of the metric logged only with `use_weighting`.
    pub const WPO_WEIGHT: &'static str = "wpo/weight";

    /// `(name, tensor)` pairs for logging, named as in [`Metrics::NAMES`], then
    /// [`Metrics::WPO_WEIGHT`] when the loss had WPO's weights.
    pub fn named(&self) -> Vec<(&'static str, Tensor<1>)> {
        let values = [
            &self.rewards_chosen,
            &self.rewards_rejected,
            &self.rewards_margins,
            &self.rewards_accuracies,
            &self.logps_chosen,
            &self.logps_rejected,
            &self.offset_mean,
            &self.offset_satisfied,
            &self.loss,
        ];
        let mut named: Vec<_> = Self::NAMES.into_iter().zip(values.map(Tensor::clone)).collect();
        if let Some(w) = &self.wpo_weight {
            named.push((Self::WPO_WEIGHT, w.clone()));
        }
        named
    }

    /// Computes the metrics from the inputs, the reduced loss and WPO's weights ω when the loss had
    /// them; everything is detached.
    pub(crate) fn compute(inputs: &PairLogps, beta: f64, loss: &Tensor<1>, wpo: Option<&Tensor<1>>) -> Self {
        let d = |t: &Tensor<1>| t.clone().detach();
        let chosen = (d(&inputs.policy_chosen) - d(&inputs.reference_chosen)).mul_scalar(beta);
        let rejected =
            (d(&inputs.policy_rejected) - d(&inputs.reference_rejected)).mul_scalar(beta);
        let margins = chosen.clone() - rejected.clone();
        let offset = match &inputs.offset {
            Some(o) => d(o),
            None => margins.zeros_like(),
        };
        Self {
            rewards_accuracies: chosen.clone().greater(rejected.clone()).float().mean(),
            offset_satisfied: margins.clone().greater(offset.clone()).float().mean(),
            rewards_chosen: chosen.mean(),
            rewards_rejected: rejected.mean(),
            rewards_margins: margins.mean(),
            logps_chosen: d(&inputs.policy_chosen).mean(),
            logps_rejected: d(&inputs.policy_rejected).mean(),
            offset_mean: offset.mean(),
            loss: d(loss),
            wpo_weight: wpo.map(|w| d(w).mean()),
        }
    }
}

/// What [`crate::preference_loss`] returns. Nothing here has been read back to the host.
#[derive(Clone, Debug)]
pub struct LossOutput {
    /// The reduced loss, shape `[1]`, tracked for `backward()`: the (weighted) mean of `per_pair`.
    pub loss: Tensor<1>,
    /// Per-pair losses, shape `[B]`, tracked: Σ_k λ_k·ℓ_k (+ rpo_alpha·NLL), before the per-pair weights
    /// (the data's and WPO's).
    /// For AOT terms the i-th entry is the i-th quantile's term, not pair i's.
    pub per_pair: Tensor<1>,
    /// Detached metrics.
    pub metrics: Metrics,
}

/// The trainer-facing guard against a silent NaN. Reads one probe value back (one device sync) that is
/// finite exactly when the loss and every input are finite and no weight is negative. When it is not, it
/// finds out why: the first non-finite input (naming the pair and the input), then bad weights, then the
/// first non-finite per-pair loss. Returns `Ok(())` otherwise.
///
/// NaN log-probs therefore do give a NaN loss on the device (the objectives never look at the values, to
/// stay free of host syncs); this function turns it into an error before the optimiser steps. It also
/// catches inputs that leave the loss finite but are wrong, e.g. a reference log-prob of −inf, whose pair
/// would otherwise contribute a zero loss and gradient without a word.
pub fn check_finite(inputs: &PairLogps, output: &LossOutput) -> Result<(), LossError> {
    // x·0 is NaN exactly when x is NaN or ±inf; sqrt(Σ(w − |w|)) is NaN exactly when some w < 0.
    let mut probe = output.loss.clone().detach();
    for (_, t) in inputs.named() {
        probe = probe + t.clone().detach().mul_scalar(0.0).sum();
    }
    if let Some(w) = &inputs.weight {
        let w = w.clone().detach();
        probe = probe + (w.clone() - w.abs()).sum().sqrt().mul_scalar(0.0);
    }
    let probe = read(&probe, "loss")?;
    if probe.first().is_some_and(|v| v.is_finite()) {
        return Ok(());
    }
    inputs.check_finite()?;
    let value = read(&output.loss, "loss")?
        .first()
        .copied()
        .unwrap_or(f64::NAN);
    let per_pair = read(&output.per_pair, "per_pair")?;
    let pair = per_pair.iter().position(|v| !v.is_finite());
    Err(LossError::NonFiniteLoss { value, pair })
}
