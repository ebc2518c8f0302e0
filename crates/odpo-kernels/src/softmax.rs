//! The row loops of the fused log-softmax + gather: one read of a row of logits for its
//! log-sum-exp, one pass over it for its gradient. Rows are split over rayon's threads. On x86-64
//! each row runs in a copy of the loop compiled for AVX-512 or for AVX2 + FMA, whichever the CPU
//! has (`multiversion` chooses at run time; the binary itself targets baseline x86-64, where the
//! loops take 4 lanes).

use multiversion::multiversion;
use rayon::prelude::*;

/// `e^x` in f32 without a libm call, so that loops over it vectorise: `x = n·ln 2 + r` with
/// `|r| ≤ ln 2 / 2`, `e^r` by Cephes' `expf` polynomial, `2^n` built in the exponent bits.
/// Relative error below 2·10⁻⁷ on [−87, 88]; 0 below −88 (where e^x < 7·10⁻³⁹), NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, so that `n · LN2_HI` is exact for the n that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2²³: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    // Comparisons rather than `clamp`/`max`, which would turn NaN into a number.
    let x = if x < -88.0 { -88.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    // x·log₂e + 1.5·2²³ holds the nearest integer n in its low mantissa bits: no float-to-int
    // cast, whose saturating form does not vectorise.
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let er = p * r * r + r + 1.0;
    // The bits of `shifted` are 0x4B40_0000 + n; n ∈ [−127, 127], and −127 gives the bits of 0.0.
    let two_n = f32::from_bits(shifted.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23);
    er * two_n
}

/// The largest element (NaN is skipped here, and comes back through the sum of exponentials).
#[inline(always)]
pub(crate) fn row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut blocks = row.chunks_exact(16);
    for b in &mut blocks {
        for (l, &a) in lanes.iter_mut().zip(b) {
            *l = if a > *l { a } else { *l };
        }
    }
    let m = blocks.remainder().iter().fold(f32::NEG_INFINITY, |m, &a| if a > m { a } else { m });
    lanes.iter().fold(m, |m, &a| if a > m { a } else { m })
}

/// `Σ e^(x − shift)` accumulated in f64 (eight independent lanes, so that the loop vectorises).
#[inline(always)]
fn sum_exp(row: &[f32], shift: f32) -> f64 {
    let mut lanes = [0f64; 8];
    let mut blocks = row.chunks_exact(8);
    for b in &mut blocks {
        for (l, &a) in lanes.iter_mut().zip(b) {
            *l += f64::from(exp(a - shift));
        }
    }
    lanes.iter().sum::<f64>() + blocks.remainder().iter().map(|&a| f64::from(exp(a - shift))).sum::<f64>()
}

/// The position of `target` in a row of `v` logits.
fn column(target: i64, v: usize) -> usize {
    match usize::try_from(target) {
        Ok(t) if t < v => t,
        _ => panic!("token id {target} is outside the {v} logits of a row (the model's vocabulary)"),
    }
}

/// `(log softmax(row)[target], logsumexp(row))` of one row.
#[inline(always)]
fn row_forward_any(row: &[f32], target: usize) -> (f32, f32) {
    let m = row_max(row);
    // An infinite maximum (all −∞, or a +∞) leaves the result to IEEE rules, as the composed
    // operations do.
    let shift = if m.is_finite() { m } else { 0.0 };
    let lse = f64::from(shift) + sum_exp(row, shift).ln();
    ((f64::from(row[target]) - lse) as f32, lse as f32)
}

/// One row of the gradient: `out = g · (onehot(target) − softmax(row))`, `softmax = e^(row − lse)`;
/// `input` is `None` when `out` holds the logits (in place).
#[inline(always)]
fn row_backward_any(input: Option<&[f32]>, out: &mut [f32], lse: f32, g: f32) {
    let neg_g = -g;
    match input {
        Some(x) => {
            for (o, &a) in out.iter_mut().zip(x) {
                *o = neg_g * exp(a - lse);
            }
        }
        None => {
            for o in out.iter_mut() {
                *o = neg_g * exp(*o - lse);
            }
        }
    }
}

/// [`row_forward_any`], in a copy compiled for AVX-512 or AVX2 + FMA where the CPU has them.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+fma", "x86_64+avx2+fma"))]
#[allow(unused_braces)] // multiversion puts the body in a block of its own
fn row_forward(row: &[f32], target: usize) -> (f32, f32) {
    row_forward_any(row, target)
}

/// Log-probabilities of the targets and log-sum-exps, each `[N]`, of row-major logits `[N, V]`.
pub(crate) fn forward(logits: &[f32], v: usize, targets: &[i64]) -> (Vec<f32>, Vec<f32>) {
    let n = targets.len();
    assert_eq!(logits.len(), n * v, "logits hold {} values, not {n} rows of {v}", logits.len());
    let (lp, lse): (Vec<f32>, Vec<f32>) = if v == 0 {
        (vec![f32::NAN; n], vec![f32::NEG_INFINITY; n])
    } else {
        logits.par_chunks_exact(v).zip(targets.par_iter()).map(|(row, &t)| row_forward(row, column(t, v))).unzip()
    };
    (lp, lse)
}

/// [`row_backward_any`] (in a copy compiled for AVX-512 or AVX2 + FMA where the CPU has them),
/// then the one-hot term of the target.
fn row_backward(input: Option<&[f32]>, out: &mut [f32], target: usize, lse: f32, g: f32) {
    if g == 0.0 {
        // A masked position (prompt, padding): no gradient, and no exponentials to compute.
        out.fill(0.0);
        return;
    }
    row_backward_simd(input, out, lse, g);
    out[target] += g;
}

/// [`row_backward_any`], in a copy compiled for AVX-512 or AVX2 + FMA where the CPU has them.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+fma", "x86_64+avx2+fma"))]
fn row_backward_simd(input: Option<&[f32]>, out: &mut [f32], lse: f32, g: f32) {
    row_backward_any(input, out, lse, g);
}

/// The gradient with respect to the logits `[N, V]` of `Σ grad[n] · logprob[n]`, written into
/// `out`; `logits` is `None` when `out` holds the logits (computed in place).
pub(crate) fn backward(logits: Option<&[f32]>, out: &mut [f32], v: usize, targets: &[i64], lse: &[f32], grad: &[f32]) {
    let n = targets.len();
    assert!(out.len() == n * v && lse.len() == n && grad.len() == n, "gradient of {n} rows of {v} logits: mismatched buffers");
    if v == 0 {
        return;
    }
    let rows = out.par_chunks_exact_mut(v).zip(targets.par_iter().zip(lse.par_iter().zip(grad.par_iter())));
    match logits {
        Some(x) => {
            assert_eq!(x.len(), n * v, "logits hold {} values, not {n} rows of {v}", x.len());
            rows.zip(x.par_chunks_exact(v)).for_each(|((o, (&t, (&l, &g))), x)| row_backward(Some(x), o, column(t, v), l, g));
        }
        None => rows.for_each(|(o, (&t, (&l, &g)))| row_backward(None, o, column(t, v), l, g)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_f64_to_two_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 2.4e-7, "worst relative error {worst}");
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
    }

    /// log-softmax worked in f64 from the definition.
    fn want(row: &[f32], t: usize) -> (f64, f64) {
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &a| m.max(f64::from(a)));
        let lse = m + row.iter().map(|&a| (f64::from(a) - m).exp()).sum::<f64>().ln();
        (f64::from(row[t]) - lse, lse)
    }

    fn rows(n: usize, v: usize) -> Vec<f32> {
        // Deterministic, spread over a wide range, with a few very negative entries.
        (0..n * v).map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 40.0 - if i % 97 == 0 { 1e4 } else { 0.0 }).collect()
    }

    #[test]
    fn forward_matches_the_definition() {
        let (n, v) = (6, 1037);
        let x = rows(n, v);
        let targets: Vec<i64> = vec![0, 1036, 5, 500, 96, 97];
        let (lp, lse) = forward(&x, v, &targets);
        for r in 0..n {
            let (wlp, wlse) = want(&x[r * v..(r + 1) * v], targets[r] as usize);
            assert!((f64::from(lse[r]) - wlse).abs() <= 4e-7 * wlse.abs().max(1.0), "row {r}: lse {} vs {wlse}", lse[r]);
            assert!((f64::from(lp[r]) - wlp).abs() <= 4e-7 * wlp.abs().max(1.0), "row {r}: lp {} vs {wlp}", lp[r]);
        }
    }

    #[test]
    fn backward_matches_the_definition_in_place_and_not() {
        let (n, v) = (4, 333);
        let x = rows(n, v);
        let targets: Vec<i64> = vec![3, 0, 332, 100];
        let grad = [0.5f32, -2.0, 0.0, 1.0];
        let (_, lse) = forward(&x, v, &targets);
        let mut out = vec![f32::NAN; n * v];
        backward(Some(&x), &mut out, v, &targets, &lse, &grad);
        let mut inplace = x.clone();
        backward(None, &mut inplace, v, &targets, &lse, &grad);
        assert_eq!(out, inplace);
        for r in 0..n {
            let (_, wlse) = want(&x[r * v..(r + 1) * v], 0);
            for c in 0..v {
                let sm = (f64::from(x[r * v + c]) - wlse).exp();
                let w = f64::from(grad[r]) * (if c == targets[r] as usize { 1.0 } else { 0.0 } - sm);
                let got = f64::from(out[r * v + c]);
                assert!((got - w).abs() <= 1e-6 * w.abs().max(1e-3), "row {r} col {c}: {got} vs {w}");
            }
        }
    }

    #[test]
    fn the_baseline_loops_agree_with_the_dispatched_ones() {
        let v = 1000;
        let x = rows(1, v);
        let (lp, lse) = row_forward(&x, 7);
        assert_eq!(row_forward_any(&x, 7), (lp, lse));
        let (mut a, mut b) = (vec![0f32; v], vec![0f32; v]);
        row_backward(Some(&x), &mut a, 7, lse, 0.5);
        row_backward_any(Some(&x), &mut b, lse, 0.5);
        b[7] += 0.5;
        for (p, q) in a.iter().zip(&b) {
            // FMA contraction may differ between the two copies by an ulp.
            assert!((p - q).abs() <= 1e-6 * q.abs().max(1e-6), "{p} vs {q}");
        }
    }

    #[test]
    fn nan_logits_give_nan() {
        let mut x = rows(1, 64);
        x[10] = f32::NAN;
        let (lp, lse) = forward(&x, 64, &[3]);
        assert!(lp[0].is_nan() && lse[0].is_nan());
    }

    #[test]
    #[should_panic(expected = "token id 64 is outside the 64 logits")]
    fn out_of_range_target_is_named() {
        let _ = forward(&rows(1, 64), 64, &[64]);
    }
}
