//! ORPO: monolithic preference optimisation, an odds-ratio penalty added to the SFT loss, no reference.

use burn::tensor::Tensor;
use burn::tensor::activation::log_sigmoid;

use crate::nll::{chosen_nll, token_mean};

/// log(1 − eˣ) for x < 0, accurate near 0 and for very negative x (Mächler's log1mexp).
///
/// Near 0, 1 − eˣ cancels; burn has no `expm1`, so −expm1(x) is taken as −2t/(1 − t) with t = tanh(x/2).
/// Both branches are evaluated and then selected; each branch's input is clamped into its own range so
/// the unselected one stays finite and cannot put `inf · 0 = NaN` into the gradient.
pub fn log1mexp(x: Tensor<1>) -> Tensor<1> {
    let cut = -std::f64::consts::LN_2;
    let near_zero = x.clone().greater_elem(cut);
    let t = x.clone().clamp_min(cut).div_scalar(2.0).tanh();
    let small = t.clone().mul_scalar(-2.0).log() - t.neg().log1p();
    let large = x.clamp_max(cut).exp().neg().log1p();
    large.mask_where(near_zero, small)
}

/// log odds_θ(y_w|x) − log odds_θ(y_l|x), with odds(y) = P(y)/(1 − P(y)) and log P(y) the mean token
/// log-prob (as ORPO and TRL's `ORPOTrainer` use). Needs mean log-probs < 0 (P < 1); at exactly 0 the odds
/// are infinite.
pub fn log_odds_ratio(
    policy_chosen: Tensor<1>,
    policy_rejected: Tensor<1>,
    chosen_tokens: Tensor<1>,
    rejected_tokens: Tensor<1>,
) -> Tensor<1> {
    let w = token_mean(policy_chosen, chosen_tokens);
    let l = token_mean(policy_rejected, rejected_tokens);
    (w.clone() - l.clone()) - (log1mexp(w) - log1mexp(l))
}

/// ORPO (`loss_type = "orpo"`).
///
/// ```text
/// P(y) = exp(log π_θ(y|x) / |y|)            odds(y) = P(y) / (1 − P(y))
/// ℓ = −log π_θ(y_w|x)/|y_w|  −  β·log σ( log odds(y_w) − log odds(y_l) − Δ )
/// ```
///
/// Hong, Lee, Thorne, "ORPO: Monolithic Preference Optimization without Reference Model", arXiv 2403.07691,
/// Eq. 6 (L_SFT + λ·L_OR) with L_OR of Eq. 7. β is the paper's λ, the weight of the odds-ratio term (TRL's
/// `ORPOConfig.beta`, default 0.1). The NLL term is the chosen response's mean token NLL per pair (TRL
/// averages over the batch's tokens, see [`chosen_nll`]). No reference model. The offset composes inside the
/// odds-ratio term's sigmoid, as a margin on the log odds ratio (an extension; ORPO has none).
pub fn orpo(
    policy_chosen: Tensor<1>,
    policy_rejected: Tensor<1>,
    chosen_tokens: Tensor<1>,
    rejected_tokens: Tensor<1>,
    offset: Option<Tensor<1>>,
    beta: f64,
) -> Tensor<1> {
    let nll = chosen_nll(policy_chosen.clone(), chosen_tokens.clone());
    let ratio = log_odds_ratio(
        policy_chosen,
        policy_rejected,
        chosen_tokens,
        rejected_tokens,
    );
    let ratio = match offset {
        Some(delta) => ratio - delta,
        None => ratio,
    };
    nll - log_sigmoid(ratio).mul_scalar(beta)
}
