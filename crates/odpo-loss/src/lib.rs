//! Preference objectives as plain functions of tensors: ODPO, DPO and the DPO family that TRL ships,
//! their offsets, metrics and the guard against silent NaNs.
//!
//! This crate owns the math between "summed log-probs of each response" and "a scalar to call
//! `backward()` on". It does not run models or read data: `odpo-model` gives the log-probs, `odpo-data`
//! computes each pair's offset with [`offset::OffsetConfig`], and the trainer calls [`preference_loss`] and
//! [`check_finite`]. Every objective takes `[B]` tensors and returns per-pair losses `[B]`; nothing in the
//! loss path reads a tensor back to the host. docs/losses.md has the table of objectives.
//!
//! ```
//! use burn::tensor::{Device, Tensor};
//! use odpo_loss::{LossConfig, LossKind, PairLogps, preference_loss};
//!
//! # fn main() -> Result<(), odpo_loss::LossError> {
//! let device = Device::flex().autodiff();
//! let t = |v: [f32; 2]| Tensor::<1>::from_floats(v, &device);
//! let policy_chosen = t([-10.0, -22.0]).require_grad();
//! let inputs = PairLogps::new(policy_chosen.clone(), t([-12.0, -20.0]), t([-11.0, -21.0]), t([-11.5, -21.5]),
//!     t([5.0, 9.0]), t([6.0, 8.0]))
//!     .with_offset(t([0.5, -1.7])); // ODPO: Δ per pair
//! let out = preference_loss(&inputs, &LossConfig::new(LossKind::Sigmoid, 0.1))?;
//! let grads = out.loss.backward();
//! assert!(policy_chosen.grad(&grads).is_some());
//! for (name, value) in out.metrics.named() {
//!     let _ = (name, value); // e.g. "rewards/margins", a detached [1] tensor
//! }
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

pub mod anchored;
pub mod aot;
mod config;
pub mod divergence;
pub mod dpo;
mod error;
mod inputs;
pub mod nll;
pub mod offset;
pub mod orpo;
mod output;
pub mod simpo;

use burn::tensor::Tensor;

pub use config::{LossConfig, LossKind};
pub use divergence::FDivergence;
pub use error::LossError;
pub use inputs::PairLogps;
pub use offset::{OffsetConfig, OffsetError, OffsetFn};
pub use output::{LossOutput, Metrics, check_finite};

/// Computes the configured objective(s) on a batch of pairs.
///
/// ```text
/// per_pair_i = Σ_k λ_k·ℓ_k(i)  [+ rpo_alpha·NLL_i]          λ = loss_weights (1 each by default)
/// loss       = Σ_i w_i·ω_i·per_pair_i / Σ_i w_i              w = inputs.weight (1 each by default)
/// ω_i        = exp(wpo_chosen_i + wpo_rejected_i)            with use_weighting (WPO), else 1
/// ```
///
/// This matches TRL's `loss = Σ_k λ_k·mean(ω·ℓ_k)` (plus `rpo_alpha·NLL`) when there are no per-pair
/// weights w. WPO's ω carries no gradient (TRL computes it under `no_grad`). The loss, per-pair losses
/// and metrics stay on the device; call [`check_finite`] to read the loss and turn a NaN into an error.
///
/// # Errors
///
/// A [`LossError`] for an invalid config, mismatched input shapes, or an offset or weight given to an
/// objective that cannot use it. All of these are decided without reading tensors.
pub fn preference_loss(inputs: &PairLogps, cfg: &LossConfig) -> Result<LossOutput, LossError> {
    cfg.validate()?;
    inputs.check_shapes()?;
    for &kind in &cfg.loss_type {
        if inputs.offset.is_some() {
            kind.offset_support()
                .map_err(|why| LossError::OffsetNotSupported { kind, why })?;
        }
        if inputs.weight.is_some() {
            kind.weight_support()
                .map_err(|why| LossError::WeightNotSupported { kind, why })?;
        }
    }

    let mut per_pair: Option<Tensor<1>> = None;
    for (&kind, lambda) in cfg.loss_type.iter().zip(cfg.weights()) {
        let term = objective(kind, inputs, cfg);
        // Skip the multiply for λ = 1 so the single-objective path is exactly the bare objective.
        let term = if lambda == 1.0 {
            term
        } else {
            term.mul_scalar(lambda)
        };
        per_pair = Some(match per_pair {
            Some(acc) => acc + term,
            None => term,
        });
    }
    let mut per_pair = per_pair.ok_or_else(|| LossError::InvalidOption {
        option: "loss_type",
        value: "[]".into(),
        reason: "name at least one objective".into(),
    })?;
    if let Some(alpha) = cfg.rpo_alpha {
        let nll = nll::chosen_nll(inputs.policy_chosen.clone(), inputs.chosen_tokens.clone());
        per_pair = per_pair + nll.mul_scalar(alpha);
    }

    let omega = if cfg.use_weighting {
        let (Some(c), Some(r)) = (&inputs.wpo_chosen, &inputs.wpo_rejected) else {
            return Err(LossError::MissingWpo);
        };
        Some((c.clone() + r.clone()).detach().exp())
    } else {
        None
    };
    let weighted = match &omega {
        Some(w) => per_pair.clone() * w.clone(),
        None => per_pair.clone(),
    };
    let loss = match &inputs.weight {
        Some(w) => (weighted * w.clone()).sum() / w.clone().sum(),
        None => weighted.mean(),
    };
    let metrics = Metrics::compute(inputs, cfg.beta, &loss, omega.as_ref());
    Ok(LossOutput {
        loss,
        per_pair,
        metrics,
    })
}

/// One objective's per-pair losses. Matching on every variant keeps a new `LossKind` from compiling until
/// it is wired in here.
fn objective(kind: LossKind, x: &PairLogps, cfg: &LossConfig) -> Tensor<1> {
    let beta = cfg.beta;
    let eps = cfg.label_smoothing;
    let (pc, pr) = (|| x.policy_chosen.clone(), || x.policy_rejected.clone());
    let (nc, nr) = (|| x.chosen_tokens.clone(), || x.rejected_tokens.clone());
    let chosen_lr = || x.policy_chosen.clone() - x.reference_chosen.clone();
    let rejected_lr = || x.policy_rejected.clone() - x.reference_rejected.clone();
    // The objectives of a chosen-minus-rejected difference read each log-ratio through f-DPO's score
    // (the log-ratio itself under the default reverse KL); `validate` keeps the others on reverse KL.
    let (f, coef) = (cfg.f_divergence_type, cfg.f_alpha_divergence_coef);
    let chosen_s = || divergence::score(chosen_lr(), f, coef);
    let rejected_s = || divergence::score(rejected_lr(), f, coef);
    let h = || chosen_s() - rejected_s();
    // The same difference of per-token averages (IPO as TRL computes it, length-normalised DPO).
    let h_token_mean = || nll::token_mean(chosen_s(), nc()) - nll::token_mean(rejected_s(), nr());
    let offset = || x.offset.clone();
    match kind {
        LossKind::Sigmoid => dpo::sigmoid_loss(h(), offset(), beta),
        LossKind::SigmoidNorm => dpo::sigmoid_norm(h_token_mean(), offset(), beta),
        LossKind::Cdpo => dpo::cdpo(h(), offset(), beta, eps),
        LossKind::Robust => dpo::robust(h(), offset(), beta, eps),
        LossKind::Ipo => {
            let h = if cfg.ipo_token_average {
                h_token_mean()
            } else {
                h()
            };
            dpo::ipo(h, offset(), beta)
        }
        LossKind::Hinge => dpo::hinge(h(), offset(), beta),
        LossKind::ExoPair => dpo::exo_pair(h(), offset(), beta, eps),
        LossKind::Discopop => dpo::discopop(h(), offset(), beta, cfg.discopop_tau),
        LossKind::BcoPair => anchored::bco_pair(chosen_lr(), rejected_lr(), beta),
        LossKind::NcaPair => anchored::nca_pair(chosen_lr(), rejected_lr(), beta),
        LossKind::SppoHard => anchored::sppo_hard(chosen_lr(), rejected_lr(), beta),
        LossKind::ApoZero => anchored::apo_zero(chosen_lr(), rejected_lr(), beta),
        LossKind::ApoDown => anchored::apo_down(chosen_lr(), rejected_lr(), beta),
        LossKind::Aot => aot::aot(
            pc(),
            pr(),
            x.reference_chosen.clone(),
            x.reference_rejected.clone(),
            beta,
            eps,
        ),
        LossKind::AotUnpaired => aot::aot_unpaired(chosen_lr(), rejected_lr(), beta, eps),
        LossKind::Simpo => simpo::simpo(pc(), pr(), nc(), nr(), offset(), beta, cfg.simpo_gamma),
        LossKind::Orpo => orpo::orpo(pc(), pr(), nc(), nr(), offset(), beta),
        LossKind::Sft => nll::chosen_nll(pc(), nc()),
    }
}
