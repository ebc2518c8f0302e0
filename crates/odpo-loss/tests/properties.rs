//! Exact identities (ODPO with Δ = 0 or α = 0 is DPO, the α-divergence at its limits is reverse and
//! forward KL), stability at |β·h| = 1e4, the NaN policy, refused
//! combinations, and hand-computed metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use burn::tensor::DType;
use common::{Host, LOGP_NAMES, device, host, scalar};
use odpo_loss::{
    FDivergence, LossConfig, LossError, LossKind, OffsetConfig, check_finite, preference_loss,
};

fn batch() -> Host {
    Host {
        policy_chosen: vec![-12.3, -30.1, -7.7, -45.0, -101.5, -3.2],
        policy_rejected: vec![-14.0, -25.5, -9.9, -40.2, -80.25, -6.0],
        reference_chosen: vec![-13.1, -28.0, -8.4, -44.1, -140.0, -3.0],
        reference_rejected: vec![-13.5, -27.2, -8.0, -41.7, -60.0, -6.5],
        chosen_tokens: vec![5.0, 12.0, 4.0, 20.0, 40.0, 2.0],
        rejected_tokens: vec![7.0, 10.0, 6.0, 18.0, 33.0, 3.0],
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
        _ => {}
    }
    c
}

/// Loss, per-pair losses and the four gradients, as host bit patterns.
fn run(cfg: &LossConfig, h: &Host) -> (Vec<u64>, Vec<u64>) {
    let (inputs, leaves) = h.build(&device(), DType::F32);
    let out = preference_loss(&inputs, cfg).unwrap();
    let mut values: Vec<f64> = host(&out.loss);
    values.extend(host(&out.per_pair));
    let grads = out.loss.backward();
    let mut g = Vec::new();
    for leaf in &leaves {
        g.extend(leaf.grad(&grads).map(|t| host(&t)).unwrap_or_default());
    }
    (
        values.iter().map(|v| v.to_bits()).collect(),
        g.iter().map(|v| v.to_bits()).collect(),
    )
}

/// Every gradient of `loss` with respect to the four log-prob leaves is finite.
fn assert_finite_gradients(loss: &burn::tensor::Tensor<1>, leaves: &[burn::tensor::Tensor<1>; 4], label: &str) {
    let grads = loss.backward();
    for (leaf, name) in leaves.iter().zip(LOGP_NAMES) {
        if let Some(g) = leaf.grad(&grads) {
            let g = host(&g);
            assert!(g.iter().all(|v| v.is_finite()), "{label}: d/d {name} = {g:?}");
        }
    }
}

#[test]
fn zero_offset_is_dpo_exactly_for_every_objective_it_composes_with() {
    for kind in LossKind::ALL
        .into_iter()
        .filter(|k| k.offset_support().is_ok())
    {
        let cfg = config(kind);
        let dpo = run(&cfg, &batch());
        let mut h = batch();
        h.offset = Some(vec![0.0; 6]);
        assert_eq!(
            run(&cfg, &h),
            dpo,
            "{kind}: Δ = 0 must give bit-identical losses and gradients"
        );
    }
}

#[test]
fn alpha_zero_is_dpo_exactly() {
    let scores = [
        (1.9, 1.2),
        (3.0, 1.0),
        (0.9, 0.1),
        (5.0, 4.5),
        (2.0, 1.5),
        (7.0, 1.0),
    ];
    let offsets = OffsetConfig {
        alpha: 0.0,
        ..OffsetConfig::default()
    }
    .offsets(&scores)
    .unwrap();
    let cfg = LossConfig::new(LossKind::Sigmoid, 0.1);
    let mut h = batch();
    h.offset = Some(offsets);
    assert_eq!(run(&cfg, &h), run(&cfg, &batch()));
}

#[test]
fn offset_tightens_and_loosens_the_dpo_constraint() {
    let cfg = LossConfig::new(LossKind::Sigmoid, 0.1);
    let loss_with = |offset: Option<f64>| {
        let mut h = batch();
        h.offset = offset.map(|d| vec![d; 6]);
        let (inputs, _) = h.build(&device(), DType::F32);
        scalar(&preference_loss(&inputs, &cfg).unwrap().loss)
    };
    let dpo = loss_with(None);
    assert!(
        loss_with(Some(1.0)) > dpo,
        "a positive offset demands a larger margin"
    );
    assert!(
        loss_with(Some(-1.0)) < dpo,
        "a negative (log of a gap below 1) offset demands less"
    );
}

#[test]
fn finite_at_beta_h_of_plus_minus_1e4_for_every_objective() {
    // β = 1 and h = ±1e4 per pair; token counts of 1 put SimPO's and ORPO's margins at the same scale.
    let h = Host {
        policy_chosen: vec![-1.0, -10001.0, -1.0, -10001.0],
        policy_rejected: vec![-10001.0, -1.0, -10001.0, -1.0],
        reference_chosen: vec![-1.0, -1.0, -1.0, -1.0],
        reference_rejected: vec![-1.0, -1.0, -1.0, -1.0],
        chosen_tokens: vec![1.0; 4],
        rejected_tokens: vec![1.0; 4],
        offset: None,
        weight: None,
    };
    for kind in LossKind::ALL {
        for offset in [None, Some(vec![3.0, -3.0, 0.0, 1.0])] {
            if offset.is_some() && kind.offset_support().is_err() {
                continue;
            }
            let mut cfg = config(kind);
            cfg.beta = 1.0;
            let mut h = h.clone();
            h.offset = offset;
            let (inputs, leaves) = h.build(&device(), DType::F32);
            let out = preference_loss(&inputs, &cfg).unwrap();
            let values = host(&out.per_pair);
            assert!(
                values.iter().all(|v| v.is_finite()),
                "{kind}: per-pair {values:?}"
            );
            assert!(check_finite(&inputs, &out).is_ok(), "{kind}");
            assert_finite_gradients(&out.loss, &leaves, &kind.to_string());
        }
    }
    // The values themselves, for ODPO: −log σ(1e4) = 0 and −log σ(−1e4) = 1e4.
    let (inputs, leaves) = h.build(&device(), DType::F32);
    let out = preference_loss(&inputs, &LossConfig::new(LossKind::Sigmoid, 1.0)).unwrap();
    assert_eq!(host(&out.per_pair), vec![0.0, 1e4, 0.0, 1e4]);
    let g = host(&leaves[0].grad(&out.loss.backward()).unwrap());
    assert_eq!(g, vec![0.0, -0.25, 0.0, -0.25]);
}

#[test]
fn nan_and_infinite_log_probs_are_reported_with_the_pair() {
    let cfg = LossConfig::default();
    let mut h = batch();
    h.policy_rejected[2] = f64::NAN;
    let (inputs, _) = h.build(&device(), DType::F32);
    let out = preference_loss(&inputs, &cfg).unwrap();
    assert!(
        scalar(&out.loss).is_nan(),
        "documented: NaN propagates on the device"
    );
    let err = check_finite(&inputs, &out).unwrap_err();
    assert!(
        matches!(
            err,
            LossError::NonFiniteInput {
                pair: 2,
                input: "policy_rejected",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "pair 2: input `policy_rejected` is NaN; the loss would be NaN"
    );

    let mut h = batch();
    h.reference_chosen[4] = f64::NEG_INFINITY;
    let (inputs, _) = h.build(&device(), DType::F32);
    let out = preference_loss(&inputs, &cfg).unwrap();
    let err = check_finite(&inputs, &out).unwrap_err();
    assert!(
        matches!(
            err,
            LossError::NonFiniteInput {
                pair: 4,
                input: "reference_chosen",
                ..
            }
        ),
        "{err}"
    );

    let mut h = batch();
    h.offset = Some(vec![0.0, 0.0, 0.0, f64::NAN, 0.0, 0.0]);
    let (inputs, _) = h.build(&device(), DType::F32);
    let err = check_finite(&inputs, &preference_loss(&inputs, &cfg).unwrap()).unwrap_err();
    assert!(
        matches!(
            err,
            LossError::NonFiniteInput {
                pair: 3,
                input: "offset",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn all_zero_weights_are_an_error_not_a_nan() {
    let mut h = batch();
    h.weight = Some(vec![0.0; 6]);
    let (inputs, _) = h.build(&device(), DType::F32);
    let out = preference_loss(&inputs, &LossConfig::default()).unwrap();
    assert!(matches!(
        check_finite(&inputs, &out),
        Err(LossError::BadWeights { .. })
    ));
}

#[test]
fn finite_loss_passes_the_check() {
    let (inputs, _) = batch().build(&device(), DType::F32);
    let out = preference_loss(&inputs, &LossConfig::default()).unwrap();
    assert_eq!(check_finite(&inputs, &out), Ok(()));
}

#[test]
fn refused_combinations() {
    let dev = device();
    let mut with_offset = batch();
    with_offset.offset = Some(vec![0.5; 6]);
    let (inputs, _) = with_offset.build(&dev, DType::F32);
    for kind in [
        LossKind::BcoPair,
        LossKind::Aot,
        LossKind::ApoZero,
        LossKind::Sft,
    ] {
        let err = preference_loss(&inputs, &config(kind)).unwrap_err();
        assert!(
            matches!(err, LossError::OffsetNotSupported { .. }),
            "{kind}: {err}"
        );
    }
    let mut with_weight = batch();
    with_weight.weight = Some(vec![1.0; 6]);
    let (inputs, _) = with_weight.build(&dev, DType::F32);
    let err = preference_loss(&inputs, &config(LossKind::Aot)).unwrap_err();
    assert!(matches!(err, LossError::WeightNotSupported { .. }), "{err}");

    let (mut inputs, _) = batch().build(&dev, DType::F32);
    inputs.rejected_tokens = inputs.rejected_tokens.clone().slice(0..5);
    let err = preference_loss(&inputs, &LossConfig::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "input `rejected_tokens` has shape [5], expected [6] like `policy_chosen`"
    );
}

#[test]
fn an_offset_given_to_an_objective_that_cannot_use_it_is_an_error() {
    let mut h = batch();
    h.offset = Some(vec![0.5; 6]);
    let (inputs, _) = h.build(&device(), DType::F32);
    let e = preference_loss(&inputs, &config(LossKind::NcaPair)).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("cannot use it"), "{e}");
}

#[test]
fn metrics_by_hand() {
    // Two pairs, β = 0.5. r_w = 0.5·(−10 − −11) = 0.5, r_l = 0.5·(−12 − −11.5) = −0.25 for pair 0;
    // r_w = 0.5·(−22 − −21) = −0.5, r_l = 0.5·(−20 − −21.5) = 0.75 for pair 1.
    let h = Host {
        policy_chosen: vec![-10.0, -22.0],
        policy_rejected: vec![-12.0, -20.0],
        reference_chosen: vec![-11.0, -21.0],
        reference_rejected: vec![-11.5, -21.5],
        chosen_tokens: vec![5.0, 9.0],
        rejected_tokens: vec![6.0, 8.0],
        offset: Some(vec![0.5, -2.0]),
        weight: None,
    };
    let (inputs, _) = h.build(&device(), DType::F32);
    let out = preference_loss(&inputs, &LossConfig::new(LossKind::Sigmoid, 0.5)).unwrap();
    let m: Vec<(&str, f64)> = out
        .metrics
        .named()
        .iter()
        .map(|(n, t)| (*n, scalar(t)))
        .collect();
    let z0: f64 = 0.75 - 0.5;
    let z1: f64 = -1.25 + 2.0;
    let loss = 0.5 * ((1.0 + (-z0).exp()).ln() + (1.0 + (-z1).exp()).ln());
    let want = [
        ("rewards/chosen", 0.0),
        ("rewards/rejected", 0.25),
        ("rewards/margins", -0.25),
        ("rewards/accuracies", 0.5),
        ("logps/chosen", -16.0),
        ("logps/rejected", -16.0),
        ("offset/mean", -0.75),
        ("offset/satisfied", 1.0), // 0.75 > 0.5 and −1.25 > −2
        ("loss", loss),
    ];
    assert_eq!(m.len(), want.len());
    for ((name, got), (want_name, value)) in m.iter().zip(want) {
        assert_eq!(*name, want_name);
        assert!((got - value).abs() < 1e-6, "{name}: {got} vs {value}");
    }
}

#[test]
fn alpha_divergence_at_its_limits_is_reverse_and_forward_kl_exactly() {
    for kind in [LossKind::Sigmoid, LossKind::SigmoidNorm, LossKind::Ipo] {
        let with = |f: FDivergence, coef: f64| {
            let cfg = LossConfig {
                f_divergence_type: f,
                f_alpha_divergence_coef: coef,
                ..config(kind)
            };
            let mut h = batch();
            h.offset = Some(vec![0.3, -0.2, 0.0, 1.0, -1.0, 0.5]);
            run(&cfg, &h)
        };
        let reverse = with(FDivergence::ReverseKl, 0.5);
        assert_eq!(with(FDivergence::AlphaDivergence, 1.0), reverse, "{kind}: a = 1");
        assert_eq!(with(FDivergence::AlphaDivergence, 1.0 + 1e-7), reverse, "{kind}: a within 1e-6 of 1");
        assert_ne!(with(FDivergence::AlphaDivergence, 0.5), reverse, "{kind}: a = 0.5");
        assert_eq!(with(FDivergence::AlphaDivergence, 0.0), with(FDivergence::ForwardKl, 0.5), "{kind}: a = 0");
    }
}

#[test]
fn f_divergence_scores_by_hand() {
    // One pair, β = 1, no offset: log u_w = ln 2, log u_l = −ln 2.
    let ln2 = std::f64::consts::LN_2;
    let h = Host {
        policy_chosen: vec![-10.0 + ln2],
        policy_rejected: vec![-12.0 - ln2],
        reference_chosen: vec![-10.0],
        reference_rejected: vec![-12.0],
        chosen_tokens: vec![4.0],
        rejected_tokens: vec![2.0],
        offset: None,
        weight: None,
    };
    let softplus = |x: f64| (1.0 + x.exp()).ln();
    // Scores: forward KL 1 − 1/u: 1/2 and −1; JS log(2u/(1+u)): ln(4/3) and ln(2/3);
    // α-divergence at a = 0.5, (u^(−1/2) − 1)/(−1/2): 2 − √2 and 2 − 2√2.
    let cases = [
        (FDivergence::ReverseKl, LossKind::Sigmoid, 2.0 * ln2),
        (FDivergence::ForwardKl, LossKind::Sigmoid, 1.5),
        (FDivergence::JsDivergence, LossKind::Sigmoid, ln2),
        (FDivergence::AlphaDivergence, LossKind::Sigmoid, std::f64::consts::SQRT_2),
        // Per token: 1/2 / 4 − (−1) / 2.
        (FDivergence::ForwardKl, LossKind::SigmoidNorm, 0.625),
    ];
    for (f, kind, h_want) in cases {
        let cfg = LossConfig {
            f_divergence_type: f,
            ..LossConfig::new(kind, 1.0)
        };
        let (inputs, _) = h.build(&device(), DType::F32);
        let got = scalar(&preference_loss(&inputs, &cfg).unwrap().loss);
        let want = softplus(-h_want);
        // f32 inputs: log u is exact to about 1e-6.
        assert!((got - want).abs() < 1e-5, "{} {kind}: {got} vs {want}", f.name());
    }
}

#[test]
fn f_divergences_stay_finite_at_log_ratios_of_plus_minus_1e4() {
    let h = Host {
        policy_chosen: vec![-1.0, -10001.0, -1.0, -10001.0],
        policy_rejected: vec![-10001.0, -1.0, -10001.0, -1.0],
        reference_chosen: vec![-10001.0, -1.0, -1.0, -1.0],
        reference_rejected: vec![-1.0, -10001.0, -1.0, -1.0],
        chosen_tokens: vec![1.0; 4],
        rejected_tokens: vec![1.0; 4],
        offset: Some(vec![3.0, -3.0, 0.0, 1.0]),
        weight: None,
    };
    for kind in LossKind::ALL.into_iter().filter(|k| k.f_divergence_support().is_ok()) {
        for f in FDivergence::ALL {
            for coef in [0.5, 1.5, -0.5] {
                let cfg = LossConfig {
                    f_divergence_type: f,
                    f_alpha_divergence_coef: if f == FDivergence::AlphaDivergence { coef } else { 0.5 },
                    ..config(kind)
                };
                let mut h = h.clone();
                if kind.offset_support().is_err() {
                    h.offset = None;
                }
                let (inputs, leaves) = h.build(&device(), DType::F32);
                let out = preference_loss(&inputs, &cfg).unwrap();
                let label = format!("{kind} with {} (a = {coef})", f.name());
                if kind == LossKind::Ipo && matches!(f, FDivergence::ForwardKl | FDivergence::AlphaDivergence) {
                    // Scores near e^80 squared overflow f32 (as in TRL): an error naming the loss, not a NaN.
                    let err = check_finite(&inputs, &out).unwrap_err();
                    assert!(matches!(err, LossError::NonFiniteLoss { .. }), "{label}: {err}");
                    continue;
                }
                assert!(check_finite(&inputs, &out).is_ok(), "{label}: {:?}", host(&out.per_pair));
                assert_finite_gradients(&out.loss, &leaves, &label);
            }
        }
    }
}

/// WPO (`use_weighting`): means of 0 give ω = 1, the unweighted loss bit for bit; otherwise each
/// pair's loss is scaled by exp(m_w + m_l) (hand-computed), the gradients by the same ω, and no gradient
/// reaches the means. Missing means and the sorted objectives are refused.
#[test]
fn wpo_weights_scale_each_pair_by_exp_of_its_means() {
    let dev = device();
    let h = batch();
    for kind in [LossKind::Sigmoid, LossKind::Ipo, LossKind::Orpo, LossKind::Sft] {
        let plain = config(kind);
        let mut wpo = plain.clone();
        wpo.use_weighting = true;
        let (inputs, _) = h.build(&dev, DType::F32);
        let err = preference_loss(&inputs, &wpo).map(|_| ()).unwrap_err();
        assert_eq!(err, LossError::MissingWpo, "{kind}");

        let zeros = common::t32(&[0.0; 6], &dev);
        let (inputs, leaves) = h.build(&dev, DType::F32);
        let out = preference_loss(&inputs.with_wpo(zeros.clone(), zeros), &wpo).unwrap();
        let loss = scalar(&out.loss);
        let grads = out.loss.backward();
        let g_wpo: Vec<f64> = leaves.iter().flat_map(|l| l.grad(&grads).map(|t| host(&t)).unwrap_or_default()).collect();
        let (bits, g_bits) = run(&plain, &h);
        let (plain_inputs, _) = h.build(&dev, DType::F32);
        assert!(preference_loss(&plain_inputs, &plain).unwrap().metrics.named().iter().all(|(n, _)| *n != "wpo/weight"), "{kind}: no wpo/weight without WPO");
        assert_eq!(loss.to_bits(), bits[0], "{kind}: ω = 1 is the plain loss");
        assert_eq!(g_wpo.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), g_bits, "{kind}: ω = 1 gradients");

        let (mc, mr) = ([-0.5f32, -1.25, 0.1, -2.0, -0.75, 0.0], [-1.0f32, -0.2, -0.3, -1.5, 0.2, -2.5]);
        let omega: Vec<f64> = mc.iter().zip(&mr).map(|(c, r)| (f64::from(*c) + f64::from(*r)).exp()).collect();
        let (inputs, leaves) = h.build(&dev, DType::F32);
        let (c, r) = (common::t32(&mc, &dev).require_grad(), common::t32(&mr, &dev).require_grad());
        let out = preference_loss(&inputs.with_wpo(c.clone(), r.clone()), &wpo).unwrap();
        let per_pair = host(&out.per_pair);
        let want = per_pair.iter().zip(&omega).map(|(l, w)| l * w).sum::<f64>() / 6.0;
        let got = scalar(&out.loss);
        assert!((got - want).abs() <= 1e-6 * want.abs(), "{kind}: {got} vs Σ ω·ℓ / B = {want}");
        let logged = out.metrics.named().into_iter().find(|(n, _)| *n == "wpo/weight").map(|(_, t)| scalar(&t));
        let mean = omega.iter().sum::<f64>() / 6.0;
        assert!(logged.is_some_and(|w| (w - mean).abs() <= 1e-6 * mean), "{kind}: wpo/weight {logged:?} vs mean ω {mean}");
        let grads = out.loss.backward();
        assert!(c.grad(&grads).is_none() && r.grad(&grads).is_none(), "{kind}: WPO's weights carry no gradient");
        // Each pair's gradient is ω_i times its unweighted one, for objectives whose pairs are independent.
        let (plain_inputs, plain_leaves) = h.build(&dev, DType::F32);
        let plain_grads = preference_loss(&plain_inputs, &plain).unwrap().loss.backward();
        for (leaf, plain_leaf) in leaves.iter().zip(&plain_leaves) {
            if let (Some(g), Some(p)) = (leaf.grad(&grads), plain_leaf.grad(&plain_grads)) {
                for (i, (g, p)) in host(&g).iter().zip(host(&p)).enumerate() {
                    assert!((g - omega[i] * p).abs() <= 1e-6 * (omega[i] * p).abs().max(1e-9), "{kind} pair {i}: {g} vs ω·{p}");
                }
            }
        }
    }
    for kind in [LossKind::Aot, LossKind::AotUnpaired] {
        let mut c = config(kind);
        c.use_weighting = true;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("use_weighting") && e.contains("quantile"), "{e}");
    }
}
