//! Losses, gradients and metrics against the PyTorch reference in tests/fixtures/losses.json, written by
//! tests/fixtures/make_loss_fixtures.py (an independent float64 implementation from the papers' and TRL's
//! formulas, on float32 inputs).
//!
//! Tolerance: |rust − torch| ≤ 1e-6·max(|torch|, scale) + 1e-9, i.e. 1e-6 relative with an absolute
//! floor of 1e-9 for values near 0 (saturated pairs whose loss is e^-30 and whose gradients are of that
//! order). `scale` is |torch| itself except for the metrics that are means of signed terms
//! (`rewards/chosen`, `rewards/rejected`, `rewards/margins`, `offset/mean`): an f32 sum of terms of both
//! signs is only accurate relative to the terms' magnitude, so there scale = mean |term|.
//! Rust computes in f32 on the build's default device. On libtorch the absolute floor is 5e-9:
//! libtorch's f32 log-sigmoid backward loses digits in the far tail (gradients of saturated pairs,
//! ~1e-4, off by up to 2.1e-9 on the CPU). On cubecl devices (wgpu, CUDA) the kernels' exp and log
//! are less exact than the CPU's: 5e-5 relative and 1e-7 absolute (on Mesa's llvmpipe: worst 1.7e-5
//! relative, and per-pair losses of saturated pairs, ~1e-8, off by up to 4e-8). See docs/backends.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;

use burn::tensor::DType;
use common::{Host, LOGP_NAMES, device, host, scalar, t32};
use odpo_loss::{LossConfig, preference_loss};
use serde::Deserialize;

/// (relative, absolute) tolerance on the device the test runs on (see the module doc).
fn tolerance() -> (f64, f64) {
    match common::device_kind() {
        common::Kind::Flex => (1e-6, 1e-9),
        common::Kind::LibTorch => (1e-6, 5e-9),
        common::Kind::Cube => (5e-5, 1e-7),
    }
}

#[derive(Deserialize)]
struct Fixture {
    torch_version: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    config: LossConfig,
    inputs: Inputs,
    expected: Expected,
}

#[derive(Deserialize)]
struct Inputs {
    policy_chosen: Vec<f32>,
    policy_rejected: Vec<f32>,
    reference_chosen: Vec<f32>,
    reference_rejected: Vec<f32>,
    chosen_tokens: Vec<f32>,
    rejected_tokens: Vec<f32>,
    offset: Option<Vec<f32>>,
    weight: Option<Vec<f32>>,
    /// WPO's per-response means, in the cases with `use_weighting`.
    #[serde(default)]
    wpo_chosen: Option<Vec<f32>>,
    #[serde(default)]
    wpo_rejected: Option<Vec<f32>>,
}

#[derive(Deserialize)]
struct Expected {
    per_pair: Vec<f64>,
    loss: f64,
    grads: HashMap<String, Vec<f64>>,
    metrics: HashMap<String, f64>,
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// Tracks the worst error of a case and every value outside the tolerance.
#[derive(Default)]
struct Compare {
    max_rel: f64,
    worst: String,
    max_abs: f64,
    failures: Vec<String>,
}

impl Compare {
    fn check(&mut self, what: &str, got: f64, want: f64) {
        self.check_scaled(what, got, want, 0.0);
    }

    fn check_scaled(&mut self, what: &str, got: f64, want: f64, scale: f64) {
        let err = (got - want).abs();
        let scale = want.abs().max(scale);
        if scale >= 1e-3 {
            if err / scale > self.max_rel {
                self.max_rel = err / scale;
                self.worst = format!("{what} = {want:.3e}");
            }
        } else {
            self.max_abs = self.max_abs.max(err);
        }
        // Written so that a NaN on either side fails.
        let (rel, abs) = tolerance();
        if err.is_nan() || err > rel * scale + abs {
            self.failures
                .push(format!("{what}: rust {got:e} torch {want:e} (err {err:e})"));
        }
    }
}

/// Mean |term| of the metrics that average terms of both signs (see the tolerance above).
fn metric_scales(h: &Host, beta: f64) -> HashMap<&'static str, f64> {
    let mean_abs = |v: Vec<f64>| v.iter().map(|x| x.abs()).sum::<f64>() / v.len() as f64;
    let diff = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| beta * (x - y))
            .collect::<Vec<_>>()
    };
    let rw = diff(&h.policy_chosen, &h.reference_chosen);
    let rl = diff(&h.policy_rejected, &h.reference_rejected);
    let both = rw.iter().zip(&rl).map(|(a, b)| a.abs() + b.abs()).collect();
    let mut m = HashMap::from([
        ("rewards/chosen", mean_abs(rw)),
        ("rewards/rejected", mean_abs(rl)),
        ("rewards/margins", mean_abs(both)),
    ]);
    if let Some(o) = &h.offset {
        m.insert("offset/mean", mean_abs(o.clone()));
    }
    m
}

#[test]
fn losses_gradients_and_metrics_match_pytorch() {
    let path = common::repo_root().join("crates/odpo-loss/tests/fixtures/losses.json");
    let text = std::fs::read_to_string(path).expect("fixture exists: run make_loss_fixtures.py");
    let fixture: Fixture = serde_json::from_str(&text).expect("fixture parses");
    assert!(fixture.cases.len() >= 20);
    println!("fixture from torch {}", fixture.torch_version);
    let dev = device();
    let mut worst = 0.0f64;
    let mut failures = Vec::new();
    let mut kinds_seen = std::collections::HashSet::new();
    let mut divergences_seen = std::collections::HashSet::new();
    for case in &fixture.cases {
        kinds_seen.extend(case.config.loss_type.iter().copied());
        divergences_seen.insert(case.config.f_divergence_type);
        let i = &case.inputs;
        let h = Host {
            policy_chosen: widen(&i.policy_chosen),
            policy_rejected: widen(&i.policy_rejected),
            reference_chosen: widen(&i.reference_chosen),
            reference_rejected: widen(&i.reference_rejected),
            chosen_tokens: widen(&i.chosen_tokens),
            rejected_tokens: widen(&i.rejected_tokens),
            offset: i.offset.as_deref().map(widen),
            weight: i.weight.as_deref().map(widen),
        };
        let (mut inputs, leaves) = h.build(&dev, DType::F32);
        if let (Some(c), Some(r)) = (&i.wpo_chosen, &i.wpo_rejected) {
            inputs = inputs.with_wpo(t32(c, &dev), t32(r, &dev));
        }
        let out = preference_loss(&inputs, &case.config).unwrap();
        let mut cmp = Compare::default();
        cmp.check("loss", scalar(&out.loss), case.expected.loss);
        for (k, (g, w)) in host(&out.per_pair)
            .iter()
            .zip(&case.expected.per_pair)
            .enumerate()
        {
            cmp.check(&format!("per_pair[{k}]"), *g, *w);
        }
        let scales = metric_scales(&h, case.config.beta);
        for (name, value) in out.metrics.named() {
            let want = case.expected.metrics[name];
            cmp.check_scaled(
                name,
                scalar(&value),
                want,
                scales.get(name).copied().unwrap_or(0.0),
            );
        }
        let grads = out.loss.backward();
        for (leaf, name) in leaves.iter().zip(LOGP_NAMES) {
            let want = &case.expected.grads[name];
            // An input the objective does not read has no gradient: that is a zero.
            let got = leaf
                .grad(&grads)
                .map(|g| host(&g))
                .unwrap_or_else(|| vec![0.0; want.len()]);
            for (k, (g, w)) in got.iter().zip(want).enumerate() {
                cmp.check(&format!("d loss/d {name}[{k}]"), *g, *w);
            }
        }
        println!(
            "{:<20} max rel err {:.2e} (|value| >= 1e-3; at {}), max abs err {:.2e} (|value| < 1e-3)",
            case.name, cmp.max_rel, cmp.worst, cmp.max_abs
        );
        worst = worst.max(cmp.max_rel);
        failures.extend(
            cmp.failures
                .into_iter()
                .map(|f| format!("{}: {f}", case.name)),
        );
    }
    println!("worst relative error over all cases: {worst:.2e}");
    for k in odpo_loss::LossKind::ALL {
        assert!(kinds_seen.contains(&k), "no fixture case covers {k}");
    }
    for f in odpo_loss::FDivergence::ALL {
        assert!(divergences_seen.contains(&f), "no fixture case covers f_divergence_type {}", f.name());
    }
    assert!(fixture.cases.iter().any(|c| c.config.use_weighting && c.inputs.wpo_chosen.is_some()), "no fixture case covers use_weighting (WPO)");
    assert!(
        failures.is_empty(),
        "{} values outside tolerance:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
