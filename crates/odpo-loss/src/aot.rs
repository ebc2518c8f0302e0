//! AOT, alignment via optimal transport: a distributional preference constraint, enforced by comparing
//! the sorted (quantile) log-ratios of the batch.
//!
//! Melnyk et al., "Distributional Preference Alignment of LLMs via Optimal Transport", arXiv 2406.05882:
//! first-order stochastic dominance of the chosen rewards over the rejected ones, whose one-dimensional
//! optimal transport plan is the sorting of both samples. Both functions follow TRL's `aot` and
//! `aot_unpaired` (formerly `aot_pair`).
//!
//! The i-th term belongs to the i-th quantile of the batch, not to pair i, so neither a per-pair offset nor
//! a per-pair weight has a meaning here; `preference_loss` refuses both. The loss depends on the batch
//! composition (a batch of one is plain cDPO on that pair).

use burn::tensor::Tensor;
use burn::tensor::activation::log_sigmoid;

/// Sorts ascending; the gradient flows back to each value's original position through `select`.
fn sorted(x: Tensor<1>) -> Tensor<1> {
    let (_, order) = x.clone().detach().sort_with_indices(0);
    x.select(0, order)
}

/// The smoothed logistic loss of a sorted difference δ: `−(1 − ε)·log σ(β·δ) − ε·log σ(−β·δ)`.
fn smoothed(delta: Tensor<1>, beta: f64, eps: f64) -> Tensor<1> {
    let z = delta.mul_scalar(beta);
    log_sigmoid(z.clone()).mul_scalar(-(1.0 - eps)) - log_sigmoid(z.neg()).mul_scalar(eps)
}

/// AOT for paired data (`loss_type = "aot"`).
///
/// ```text
/// u = log π_θ(y_w|x) − log π_θ(y_l|x)         (policy log-ratio of each pair)
/// v = log π_ref(y_w|x) − log π_ref(y_l|x)     (reference log-ratio of each pair)
/// δ = sort(u) − sort(v)                        (quantile by quantile over the batch)
/// ℓ_i = −(1 − ε)·log σ(β·δ_i) − ε·log σ(−β·δ_i)
/// ```
///
/// β is the inverse temperature of the logistic link, as in DPO; ε the label smoothing.
pub fn aot(
    policy_chosen: Tensor<1>,
    policy_rejected: Tensor<1>,
    reference_chosen: Tensor<1>,
    reference_rejected: Tensor<1>,
    beta: f64,
    eps: f64,
) -> Tensor<1> {
    let delta =
        sorted(policy_chosen - policy_rejected) - sorted(reference_chosen - reference_rejected);
    smoothed(delta, beta, eps)
}

/// AOT for unpaired data (`loss_type = "aot-unpaired"`).
///
/// ```text
/// δ = sort(r_w) − sort(r_l),   r = log π_θ(y|x) − log π_ref(y|x)
/// ℓ_i = −(1 − ε)·log σ(β·δ_i) − ε·log σ(−β·δ_i)
/// ```
///
/// The chosen and rejected rewards are compared as two samples, ignoring which responses were paired.
pub fn aot_unpaired(
    chosen_logratio: Tensor<1>,
    rejected_logratio: Tensor<1>,
    beta: f64,
    eps: f64,
) -> Tensor<1> {
    smoothed(
        sorted(chosen_logratio) - sorted(rejected_logratio),
        beta,
        eps,
    )
}
