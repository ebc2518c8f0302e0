//! DPO and ODPO, and the objectives that are a link function of the same pairwise logit:
//! length-normalised DPO, cDPO, robust DPO, IPO, hinge (SLiC), EXO-pair and DiscoPOP.
//!
//! Symbols, shared by every function here (all tensors of shape `[B]`, one entry per pair):
//!
//! ```text
//! h = [log π_θ(y_w|x) − log π_ref(y_w|x)] − [log π_θ(y_l|x) − log π_ref(y_l|x)]   (summed log-probs)
//! z = β·h − Δ                                                                     (the pairwise logit)
//! ```
//!
//! Δ is the per-pair offset (0 when `offset` is None). The offset composes with every function in this file
//! the same way, subtracted from β·h inside the link function: the ODPO paper's Gumbel argument
//! (p(r_w − r_l > Δ) = σ(β·h − Δ), arXiv 2402.10571 §3) holds for any loss of the logit, so each variant
//! below turns into "the same loss, but the margin must exceed Δ". With Δ = 0 each is exactly its
//! published form.
//!
//! Under f-DPO (`LossConfig::f_divergence_type`) the caller replaces each log-ratio in h by its score
//! f'(π_θ/π_ref) ([`crate::divergence`]); the functions here take h as given.

use burn::tensor::Tensor;
use burn::tensor::activation::{log_sigmoid, relu, sigmoid};

/// z = β·h − Δ, the logit of every objective in this file.
pub fn logit(h: Tensor<1>, offset: Option<Tensor<1>>, beta: f64) -> Tensor<1> {
    let z = h.mul_scalar(beta);
    match offset {
        Some(delta) => z - delta,
        None => z,
    }
}

/// DPO, and ODPO when an offset is given (`loss_type = "sigmoid"`).
///
/// ```text
/// ℓ = −log σ(β·h − Δ)
/// ```
///
/// DPO: Rafailov et al., arXiv 2305.18290, Eq. 7 (Δ = 0). ODPO: Amini et al., arXiv 2402.10571, the ODPO
/// loss of §3 (the released code's `preference_loss`, `offset=True` branch).
/// β is the inverse temperature of the implicit reward β·log(π_θ/π_ref): larger β keeps the policy closer to
/// the reference. The offset is not multiplied by β. Computed as `−log_sigmoid(z)`, which is finite for any
/// finite z (no NaN or inf at |z| = 1e4, for the loss or its gradient).
pub fn sigmoid_loss(h: Tensor<1>, offset: Option<Tensor<1>>, beta: f64) -> Tensor<1> {
    log_sigmoid(logit(h, offset, beta)).neg()
}

/// Length-normalised DPO (`loss_type = "sigmoid-norm"`, TRL's `sigmoid_norm`): DPO on the difference of
/// per-token log-ratios.
///
/// ```text
/// h̄ = r_w/|y_w| − r_l/|y_l|,   ℓ = −log σ(β·h̄ − Δ)
/// ```
///
/// r = log π_θ(y|x) − log π_ref(y|x) summed over the response, |y| its token count (clamped to ≥ 1); the
/// caller passes h̄. Lambert et al., "Tülu 3: Pushing Frontiers in Open Language Model Post-Training"
/// (arXiv 2411.15124), the length-normalised DPO of its preference-tuning stage; SimPO (arXiv
/// 2405.14734) is its reference-free relative. β is the inverse temperature of a per-token implicit
/// reward, so it is larger than DPO's for the same strength (Tülu 3 uses 5). The offset composes through
/// the logit as in DPO: the per-token margin must exceed Δ/β.
pub fn sigmoid_norm(h_token_mean: Tensor<1>, offset: Option<Tensor<1>>, beta: f64) -> Tensor<1> {
    sigmoid_loss(h_token_mean, offset, beta)
}

/// Conservative DPO (cDPO), label smoothing ε (`loss_type = "cdpo"`).
///
/// ```text
/// ℓ = −(1 − ε)·log σ(z) − ε·log σ(−z),   z = β·h − Δ
/// ```
///
/// Mitchell, "A note on DPO with noisy preferences" (2023, ericmitchell.ai/cdpo.pdf), Eq. 3; TRL's
/// `sigmoid` with `label_smoothing` up to v0.2x, and the ODPO code's non-offset branch. ε is the assumed
/// probability that a label is flipped. β as in DPO. The offset composes through z.
pub fn cdpo(h: Tensor<1>, offset: Option<Tensor<1>>, beta: f64, eps: f64) -> Tensor<1> {
    let z = logit(h, offset, beta);
    let pos = log_sigmoid(z.clone()).mul_scalar(-(1.0 - eps));
    let neg = log_sigmoid(z.neg()).mul_scalar(-eps);
    pos + neg
}

/// Robust DPO, an unbiased estimate of the clean DPO loss under label noise ε (`loss_type = "robust"`).
///
/// ```text
/// ℓ = [−(1 − ε)·log σ(z) + ε·log σ(−z)] / (1 − 2ε),   z = β·h − Δ
/// ```
///
/// Chowdhury et al., "Provably Robust DPO", arXiv 2403.00409, its unbiased loss (as TRL's `robust`).
/// β as in DPO; ε ∈ [0, 0.5). The offset composes through z.
pub fn robust(h: Tensor<1>, offset: Option<Tensor<1>>, beta: f64, eps: f64) -> Tensor<1> {
    let z = logit(h, offset, beta);
    let clean = log_sigmoid(z.clone()).mul_scalar(-(1.0 - eps));
    let flipped = log_sigmoid(z.neg()).mul_scalar(eps);
    (clean + flipped).div_scalar(1.0 - 2.0 * eps)
}

/// IPO, a squared loss that regresses the log-ratio difference onto a fixed margin (`loss_type = "ipo"`).
///
/// ```text
/// ℓ = (h − (1/2 + Δ)/β)² = (z − 1/2)² / β²,   z = β·h − Δ
/// ```
///
/// Azar et al., "A General Theoretical Paradigm to Understand Learning from Human Preferences",
/// arXiv 2310.12036, Eq. 17, where β is the regularisation τ and the target margin is 1/(2τ). With Δ = 0 this
/// is the paper's (h − 1/(2β))². The caller picks h: summed log-probs (the paper read literally, the ODPO
/// code) or token-averaged ones (TRL, which the IPO authors confirmed), see `LossConfig::ipo_token_average`.
/// The offset composes through z: the target margin moves from 1/(2β) to (1/2 + Δ)/β.
pub fn ipo(h: Tensor<1>, offset: Option<Tensor<1>>, beta: f64) -> Tensor<1> {
    let z = logit(h, offset, beta);
    z.sub_scalar(0.5).div_scalar(beta).square()
}

/// Hinge loss of SLiC-HF (`loss_type = "hinge"`).
///
/// ```text
/// ℓ = max(0, 1 − (β·h − Δ))
/// ```
///
/// Zhao et al., "SLiC-HF", arXiv 2305.10425, the rank-calibration loss max(0, δ − h) with δ = 1/β,
/// scaled by β, as TRL's `hinge` (SLiC compares policy log-probs alone; here, as in TRL, h is relative to
/// the reference). β is the inverse of the margin. The offset composes through z: the margin becomes
/// (1 + Δ)/β.
pub fn hinge(h: Tensor<1>, offset: Option<Tensor<1>>, beta: f64) -> Tensor<1> {
    relu(logit(h, offset, beta).neg().add_scalar(1.0))
}

/// EXO, pairwise form: the reverse KL between the policy's pair distribution and the smoothed labels
/// (`loss_type = "exo-pair"`).
///
/// ```text
/// ℓ = σ(z)·[log σ(z) − log(1 − ε)] + σ(−z)·[log σ(−z) − log ε],   z = β·h − Δ
/// ```
///
/// Ji et al., "Towards Efficient Exact Optimization of Language Model Alignment", arXiv 2402.00856, Eq. 16
/// with K = 2. β is the inverse temperature of the policy's reward β·log(π_θ/π_ref); ε ∈ (0, 1) smooths the
/// label distribution (ε = 0 makes log ε infinite; TRL refuses it too). The offset composes through z.
pub fn exo_pair(h: Tensor<1>, offset: Option<Tensor<1>>, beta: f64, eps: f64) -> Tensor<1> {
    let z = logit(h, offset, beta);
    let win = sigmoid(z.clone()) * log_sigmoid(z.clone()).sub_scalar((1.0 - eps).ln());
    let lose = sigmoid(z.clone().neg()) * log_sigmoid(z.neg()).sub_scalar(eps.ln());
    win + lose
}

/// DiscoPOP, the log-ratio modulated loss found by LLM-driven discovery (`loss_type = "discopop"`).
///
/// ```text
/// m = σ(z/τ),   ℓ = (1 − m)·(−log σ(z)) + m·exp(−z),   z = β·h − Δ
/// ```
///
/// Chris Lu et al., "Discovering Preference Optimization Algorithms with and for Large Language Models",
/// arXiv 2406.08414, Eq. 5 (τ = 0.05 there). β as in DPO. Evaluated as σ(−z/τ)·softplus(−z) +
/// exp(log σ(z/τ) − z), which equals TRL's form but cannot produce `inf · 0` for very negative z (TRL's
/// gives NaN at z = −1e4); it stays finite for τ ≤ 1. The offset composes through z.
pub fn discopop(h: Tensor<1>, offset: Option<Tensor<1>>, beta: f64, tau: f64) -> Tensor<1> {
    let z = logit(h, offset, beta);
    let scaled = z.clone().div_scalar(tau);
    let logistic = sigmoid(scaled.clone().neg()) * log_sigmoid(z.clone()).neg();
    let exponential = (log_sigmoid(scaled) - z).exp();
    logistic + exponential
}
