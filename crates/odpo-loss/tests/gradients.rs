//! The autodiff gradient of every objective against central finite differences, in f64 on the host-side
//! loss (flex backend, f64 tensors), at points away from kinks (hinge) and ties (AOT's sort).
//!
//! Tolerance: |autodiff − fd| ≤ 1e-6·|fd| + 1e-9 with step 1e-5 (truncation error ~1e-10 relative).
//! On cubecl devices (wgpu, CUDA), f32 with step 1e-2 and 2e-3·|fd| + 2e-5 + the losses' f32 rounding
//! over the step (see `precision`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use burn::tensor::DType;
use common::{Host, LOGP_NAMES, device, host, scalar};
use odpo_loss::{FDivergence, LossConfig, LossKind, preference_loss};

fn point() -> Host {
    Host {
        policy_chosen: vec![-12.3, -30.1, -7.7, -45.0],
        policy_rejected: vec![-14.0, -25.5, -9.9, -40.2],
        reference_chosen: vec![-13.1, -28.0, -8.4, -44.1],
        reference_rejected: vec![-13.5, -27.2, -8.0, -41.7],
        chosen_tokens: vec![5.0, 12.0, 4.0, 20.0],
        rejected_tokens: vec![7.0, 10.0, 6.0, 18.0],
        offset: None,
        weight: None,
    }
}

fn config(kind: LossKind) -> LossConfig {
    let mut c = LossConfig::new(kind, 0.1);
    match kind {
        LossKind::Cdpo | LossKind::Robust | LossKind::Aot | LossKind::AotUnpaired => {
            c.label_smoothing = 0.1
        }
        LossKind::ExoPair => c.label_smoothing = 1e-3,
        LossKind::Simpo => c.beta = 2.0,
        LossKind::Discopop => c.discopop_tau = 0.5, // a smoother mixing sigmoid keeps the FD step accurate
        _ => {}
    }
    c
}

/// f64 with step 1e-5 on the CPU backends. On cubecl devices f32 with step 1e-2, where the loss's
/// rounding (~6e-8) over the step bounds the finite difference's error near 1e-5: WGSL has no f64, and
/// burn 0.22.1's wgpu backend, which reports f64 as supported, returns infinite f64 gradients here.
fn precision() -> (DType, f64, f64, f64) {
    match common::device_kind() {
        common::Kind::Cube => (DType::F32, 1e-2, 2e-3, 2e-5),
        _ => (DType::F64, 1e-5, 1e-6, 1e-9),
    }
}

fn check(cfg: &LossConfig, h: &Host, label: &str) {
    let dev = device();
    let (dtype, step, rel, abs) = precision();
    let (inputs, leaves) = h.build(&dev, dtype);
    let out = preference_loss(&inputs, cfg).unwrap();
    let grads = out.loss.backward();
    let loss_at = |h: &Host| {
        let (inputs, _) = h.build(&dev, dtype);
        scalar(&preference_loss(&inputs, cfg).unwrap().loss)
    };
    for (which, name) in LOGP_NAMES.iter().enumerate() {
        let auto = leaves[which]
            .grad(&grads)
            .map(|g| host(&g))
            .unwrap_or_else(|| vec![0.0; 4]);
        for (i, &auto_i) in auto.iter().enumerate() {
            let mut plus = h.clone();
            plus.logps_mut()[which][i] += step;
            let mut minus = h.clone();
            minus.logps_mut()[which][i] -= step;
            let (lp, lm) = (loss_at(&plus), loss_at(&minus));
            let fd = (lp - lm) / (2.0 * step);
            // In f32 the two losses carry rounding of a few ulps of their size, divided by the step.
            let rounding = if dtype == DType::F32 { 4.0 * f64::from(f32::EPSILON) * lp.abs().max(lm.abs()) / (2.0 * step) } else { 0.0 };
            let err = (auto_i - fd).abs();
            assert!(
                err <= rel * fd.abs() + abs + rounding,
                "{label}: d loss/d {name}[{i}]: autodiff {auto_i} vs finite difference {fd} (err {err:e})"
            );
        }
    }
}

#[test]
fn every_objective_matches_finite_differences() {
    for kind in LossKind::ALL {
        let cfg = config(kind);
        check(&cfg, &point(), kind.name());
        if kind.offset_support().is_ok() {
            let mut h = point();
            h.offset = Some(vec![0.4, -1.2, 0.9, -0.3]);
            check(&cfg, &h, &format!("{kind} with offset"));
        }
        if kind.weight_support().is_ok() {
            let mut h = point();
            h.weight = Some(vec![1.0, 0.5, 2.0, 0.0]);
            check(&cfg, &h, &format!("{kind} with weights"));
        }
    }
}

#[test]
fn ipo_summed_rpo_and_mixtures_match_finite_differences() {
    let ipo_summed = LossConfig {
        ipo_token_average: false,
        ..LossConfig::new(LossKind::Ipo, 0.1)
    };
    check(&ipo_summed, &point(), "ipo summed");
    let rpo = LossConfig {
        rpo_alpha: Some(0.3),
        ..LossConfig::new(LossKind::Sigmoid, 0.1)
    };
    check(&rpo, &point(), "sigmoid + rpo");
    let mix = LossConfig {
        loss_type: vec![LossKind::Sigmoid, LossKind::BcoPair, LossKind::Sft],
        loss_weights: Some(vec![0.8, 0.2, 1.0]),
        ..LossConfig::default()
    };
    check(&mix, &point(), "mixture");
}

#[test]
fn f_divergences_match_finite_differences() {
    for kind in [LossKind::Sigmoid, LossKind::SigmoidNorm, LossKind::Ipo, LossKind::Robust] {
        for f in FDivergence::ALL {
            for coef in [0.5, 1.5] {
                let cfg = LossConfig {
                    f_divergence_type: f,
                    f_alpha_divergence_coef: if f == FDivergence::AlphaDivergence { coef } else { 0.5 },
                    ..config(kind)
                };
                let mut h = point();
                h.offset = Some(vec![0.4, -1.2, 0.9, -0.3]);
                check(&cfg, &h, &format!("{kind} with {} (a = {coef})", f.name()));
            }
        }
    }
}
