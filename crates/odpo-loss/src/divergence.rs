//! f-DPO: the divergence that keeps the policy near the reference, as a function of each response's
//! log-ratio that the pairwise objectives read in place of the log-ratio itself.
//!
//! DPO's reward β·log(π_θ/π_ref) comes from a reverse-KL penalty. Wang et al., "Beyond Reverse KL:
//! Generalizing Direct Preference Optimization with Diverse Divergence Constraints" (arXiv 2309.16240,
//! Thm. 1) show that a penalty by any f-divergence with f' invertible gives the reward β·f'(u), where
//! u = π_θ(y|x)/π_ref(y|x); the normalising term β·log Z(x) cancels only in a chosen-minus-rejected
//! difference, so only the objectives built on that difference generalise (see
//! [`LossKind::f_divergence_support`](crate::LossKind::f_divergence_support)). Each score below is f'
//! shifted so that u = 1 (the policy agrees with the reference) scores 0, as reverse KL's log u does and as
//! TRL computes them. The shift cancels in a difference of summed scores, but not between the per-token
//! averages of responses of different lengths (`sigmoid-norm`, token-averaged `ipo`), so it is part of
//! the definition:
//!
//! ```text
//! reverse KL   f'(u) = log u                              (DPO)
//! forward KL   f'(u) = 1 − 1/u
//! JS           f'(u) = log(2u / (1 + u)) = log 2 + log σ(log u)
//! α-divergence f'(u) = (u^(a−1) − 1) / (a − 1)            a = `f_alpha_divergence_coef`
//! ```
//!
//! The α-divergence is parameterised as TRL ≥ 1.0 does (`f_alpha_divergence_coef`, default 0.5): a → 1
//! is reverse KL (taken exactly within 1e-6 of 1), a = 0 is forward KL; the f-DPO paper's α is 1 − a, so
//! the default is the paper's α = 0.5 either way. The exponent (a − 1)·log u is capped at 80 before `exp`,
//! as TRL caps it in f32, so that the score stays finite; the forward KL, which is the α-divergence at
//! a = 0, is capped the same way (TRL's `forward_kl` overflows to infinity beyond log u < −88 in f32).

use burn::tensor::Tensor;
use burn::tensor::activation::log_sigmoid;
use serde::{Deserialize, Serialize};

/// The largest exponent passed to `exp` (e^80 ≈ 5.5e34 is finite in f32), TRL's cap for f32 and bf16.
const EXP_CAP: f64 = 80.0;

/// The f-divergence of f-DPO: `loss.f_divergence_type`. Kebab-case in configs; TRL's snake_case names are
/// accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FDivergence {
    /// Reverse KL, the score log u: DPO itself.
    #[default]
    #[serde(alias = "reverse_kl")]
    ReverseKl,
    /// Forward KL, the score 1 − 1/u.
    #[serde(alias = "forward_kl")]
    ForwardKl,
    /// Jensen–Shannon, the score log 2 + log σ(log u).
    #[serde(alias = "js_divergence")]
    JsDivergence,
    /// The α-divergence with coefficient a (`f_alpha_divergence_coef`), the score (u^(a−1) − 1)/(a − 1).
    #[serde(alias = "alpha_divergence")]
    AlphaDivergence,
}

impl FDivergence {
    /// Every divergence, in documentation order.
    pub const ALL: [FDivergence; 4] = [
        FDivergence::ReverseKl,
        FDivergence::ForwardKl,
        FDivergence::JsDivergence,
        FDivergence::AlphaDivergence,
    ];

    /// The config spelling (kebab-case).
    pub fn name(self) -> &'static str {
        match self {
            FDivergence::ReverseKl => "reverse-kl",
            FDivergence::ForwardKl => "forward-kl",
            FDivergence::JsDivergence => "js-divergence",
            FDivergence::AlphaDivergence => "alpha-divergence",
        }
    }
}

/// The score f'(u) of each response, from its log-ratio `log u = log π_θ(y|x) − log π_ref(y|x)` (`[B]`).
/// `coef` is a, read by the α-divergence only. Reverse KL returns the log-ratio itself, so DPO's path is
/// unchanged to the bit.
pub fn score(log_ratio: Tensor<1>, divergence: FDivergence, coef: f64) -> Tensor<1> {
    match divergence {
        FDivergence::ReverseKl => log_ratio,
        FDivergence::ForwardKl => power_score(log_ratio, 0.0),
        FDivergence::JsDivergence => log_sigmoid(log_ratio).add_scalar(std::f64::consts::LN_2),
        FDivergence::AlphaDivergence if (coef - 1.0).abs() < 1e-6 => log_ratio,
        FDivergence::AlphaDivergence => power_score(log_ratio, coef),
    }
}

/// (u^(a−1) − 1)/(a − 1) = (exp((a − 1)·log u) − 1)/(a − 1), the exponent capped at [`EXP_CAP`].
fn power_score(log_ratio: Tensor<1>, a: f64) -> Tensor<1> {
    let k = a - 1.0;
    log_ratio
        .mul_scalar(k)
        .clamp_max(EXP_CAP)
        .exp()
        .sub_scalar(1.0)
        .div_scalar(k)
}
