//! The negative log-likelihood of the chosen response: TRL's `sft` loss type, RPO's extra term and the SFT
//! half of ORPO.

use burn::tensor::Tensor;

/// Mean token log-prob `log π(y|x) / |y|`, with |y| clamped to at least 1 as TRL does.
pub fn token_mean(logps: Tensor<1>, tokens: Tensor<1>) -> Tensor<1> {
    logps / tokens.clamp_min(1.0)
}

/// Mean token NLL of the chosen response, per pair (`loss_type = "sft"`, and RPO's term).
///
/// ```text
/// ℓ = −log π_θ(y_w|x) / |y_w|
/// ```
///
/// RPO: Pang et al., "Iterative Reasoning Preference Optimization", arXiv 2404.19733, the NLL term of its
/// DPO+NLL loss (TRL: `rpo_alpha`, "RPO loss from V3 of the paper"). Departure from TRL: TRL averages
/// the NLL over all chosen tokens of the batch (long responses weigh more); here each pair's NLL is its own token mean
/// and pairs are then averaged (or weighted), so that the term has a per-pair value. The two agree when all
/// chosen responses have the same length. There is no β and no reference; the offset does not apply.
pub fn chosen_nll(policy_chosen: Tensor<1>, chosen_tokens: Tensor<1>) -> Tensor<1> {
    token_mean(policy_chosen, chosen_tokens).neg()
}
