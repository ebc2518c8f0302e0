//! SimPO: simple preference optimisation with a reference-free, length-normalised reward.

use burn::tensor::Tensor;
use burn::tensor::activation::log_sigmoid;

use crate::nll::token_mean;

/// SimPO (`loss_type = "simpo"`).
///
/// ```text
/// ℓ = −log σ( β/|y_w|·log π_θ(y_w|x) − β/|y_l|·log π_θ(y_l|x) − γ − Δ )
/// ```
///
/// Meng, Xia, Chen, "SimPO: Simple Preference Optimization with a Reference-Free Reward", arXiv 2405.14734,
/// Eq. 6 (TRL: `CPOTrainer` with `loss_type="simpo"`, without label smoothing). |y| are token counts
/// (clamped to ≥ 1). β scales the length-normalised reward (the paper uses 2 to 10, larger than DPO's);
/// γ is the target reward margin (`simpo_gamma`, TRL default 0.5). No reference model: reference log-probs
/// are ignored. The offset composes as a per-pair addition to the constant margin γ, which is exactly the
/// role Δ plays in ODPO.
pub fn simpo(
    policy_chosen: Tensor<1>,
    policy_rejected: Tensor<1>,
    chosen_tokens: Tensor<1>,
    rejected_tokens: Tensor<1>,
    offset: Option<Tensor<1>>,
    beta: f64,
    gamma: f64,
) -> Tensor<1> {
    let margin =
        token_mean(policy_chosen, chosen_tokens) - token_mean(policy_rejected, rejected_tokens);
    let z = margin.mul_scalar(beta).sub_scalar(gamma);
    let z = match offset {
        Some(delta) => z - delta,
        None => z,
    };
    log_sigmoid(z).neg()
}
