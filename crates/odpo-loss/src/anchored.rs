//! Objectives that score each response's log-ratio against an absolute anchor rather than only the pair's
//! difference: BCO-pair, NCA-pair, SPPO-hard, APO-zero and APO-down.
//!
//! Symbols (tensors of shape `[B]`):
//!
//! ```text
//! r_w = log π_θ(y_w|x) − log π_ref(y_w|x)     r_l = log π_θ(y_l|x) − log π_ref(y_l|x)     h = r_w − r_l
//! ```
//!
//! The offset does not compose with any of these: each term pins one response's reward to a fixed point
//! (0, ±1/(2β)), so there is no single pairwise logit to subtract Δ from, and splitting Δ between the two
//! terms would be an invention of this crate. `preference_loss` refuses offsets for them.

use burn::tensor::Tensor;
use burn::tensor::activation::{log_sigmoid, sigmoid};

/// BCO, pairwise form (`loss_type = "bco-pair"`).
///
/// ```text
/// ℓ = −log σ(β·r_w) − log σ(−β·r_l)
/// ```
///
/// Jung et al., "Binary Classifier Optimization", arXiv 2404.04656: a binary classifier with logit β·r
/// labels chosen responses 1 and rejected 0. β is the inverse temperature of the reward. As TRL's current
/// `bco_pair`: the paper's (and TRL ≤ 0.2x's) reward shift δ, a running mean of past rewards, is not
/// applied, since it makes the loss depend on training history.
pub fn bco_pair(chosen_logratio: Tensor<1>, rejected_logratio: Tensor<1>, beta: f64) -> Tensor<1> {
    let chosen = log_sigmoid(chosen_logratio.mul_scalar(beta)).neg();
    let rejected = log_sigmoid(rejected_logratio.mul_scalar(-beta)).neg();
    chosen + rejected
}

/// NCA, pairwise form (`loss_type = "nca-pair"`).
///
/// ```text
/// ℓ = −log σ(β·r_w) − ½·log σ(−β·r_w) − ½·log σ(−β·r_l)
/// ```
///
/// Chen et al., "Noise Contrastive Alignment of Language Models with Explicit Rewards", arXiv 2402.05369,
/// the NCA loss for K = 2 responses (as TRL's `nca_pair`). β is the inverse temperature of the reward.
pub fn nca_pair(chosen_logratio: Tensor<1>, rejected_logratio: Tensor<1>, beta: f64) -> Tensor<1> {
    let chosen = chosen_logratio.mul_scalar(beta);
    let rejected = rejected_logratio.mul_scalar(beta);
    log_sigmoid(chosen.clone()).neg()
        - log_sigmoid(chosen.neg()).mul_scalar(0.5)
        - log_sigmoid(rejected.neg()).mul_scalar(0.5)
}

/// SPPO with hard labels (`loss_type = "sppo-hard"`).
///
/// ```text
/// ℓ = (r_w − 1/(2β))² + (r_l + 1/(2β))²
/// ```
///
/// Wu et al., "Self-Play Preference Optimization", arXiv 2405.00675, Eq. 4.7 of Algorithm 1 with the win
/// probability P set to 1 for the chosen and 0 for the rejected response (as TRL's `sppo_hard`). β is the
/// inverse of the SPPO step size η: each log-ratio is regressed onto ±1/(2β).
pub fn sppo_hard(chosen_logratio: Tensor<1>, rejected_logratio: Tensor<1>, beta: f64) -> Tensor<1> {
    let target = 0.5 / beta;
    chosen_logratio.sub_scalar(target).square() + rejected_logratio.add_scalar(target).square()
}

/// APO-zero: raise the chosen likelihood, lower the rejected one (`loss_type = "apo-zero"`).
///
/// ```text
/// ℓ = 1 − σ(β·r_w) + σ(β·r_l)
/// ```
///
/// D'Oosterlinck et al., "Anchored Preference Optimization", arXiv 2408.06266, Eq. 7. For chosen responses
/// better than the model's own outputs. β is the inverse temperature of the reward.
pub fn apo_zero(chosen_logratio: Tensor<1>, rejected_logratio: Tensor<1>, beta: f64) -> Tensor<1> {
    sigmoid(chosen_logratio.mul_scalar(beta))
        .neg()
        .add_scalar(1.0)
        + sigmoid(rejected_logratio.mul_scalar(beta))
}

/// APO-down: lower both likelihoods, the rejected one more (`loss_type = "apo-down"`).
///
/// ```text
/// ℓ = σ(β·r_w) + 1 − σ(β·(r_w − r_l))
/// ```
///
/// arXiv 2408.06266, Eq. 8. For chosen responses worse than the model's own outputs. β as in APO-zero. The
/// second term is pairwise, but the first anchors r_w at 0, so the offset is refused here as for APO-zero.
pub fn apo_down(chosen_logratio: Tensor<1>, rejected_logratio: Tensor<1>, beta: f64) -> Tensor<1> {
    let h = chosen_logratio.clone() - rejected_logratio;
    sigmoid(chosen_logratio.mul_scalar(beta)) + sigmoid(h.mul_scalar(beta)).neg().add_scalar(1.0)
}
