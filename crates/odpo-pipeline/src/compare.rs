//! Is ODPO's reward-vs-KL frontier above DPO's? The comparison statistic of `cargo xtask frontier` for a
//! sweep with two seeds or more, and the rank correlation used to look at what ODPO changes.
//!
//! Methods are compared along their frontiers, never at equal β (β moves a run along the frontier, and
//! ODPO's offset moves it too). Per seed:
//!
//! ```text
//! f_m(x)  = the upper envelope of (0, SFT reward) and method m's β points (KL, reward), KL clamped at 0:
//!           the points no other beats on both reward and KL, joined linearly, flat after the last one
//! K*      = min(largest KL of ODPO's points, largest KL of DPO's points)
//! D       = mean over 50 evenly spaced x in [0, K*] of f_ODPO(x) − f_DPO(x)
//! ```
//!
//! Over seeds: the mean of D, a 95% percentile-bootstrap interval (seeds resampled with replacement),
//! and an exact one-sided sign-flip p-value for "mean D > 0" (every ± assignment of the per-seed D's;
//! a seeded Monte Carlo of 2^20 assignments above 24 seeds).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::plot::frontier;

/// KL points in [0, K*] that D averages over.
pub const GRID_POINTS: usize = 50;
/// Bootstrap resamples of the seeds.
pub const BOOTSTRAP_REPS: usize = 10_000;

/// The upper envelope of `(0, sft_reward)` and `points` (KL, reward), KL clamped at 0: the frontier
/// points in order of KL.
pub fn envelope(points: &[(f64, f64)], sft_reward: f64) -> Vec<(f64, f64)> {
    let mut all: Vec<(f64, f64)> = points.iter().map(|&(kl, r)| (kl.max(0.0), r)).collect();
    all.push((0.0, sft_reward));
    frontier(&all)
}

/// The envelope at KL `x`: linear between its points, its first value before them, its last after.
pub fn envelope_at(env: &[(f64, f64)], x: f64) -> f64 {
    let Some(&(x0, y0)) = env.first() else { return f64::NAN };
    if x <= x0 {
        return y0;
    }
    for w in env.windows(2) {
        let ((xa, ya), (xb, yb)) = (w[0], w[1]);
        if x <= xb {
            return if xb > xa { ya + (yb - ya) * (x - xa) / (xb - xa) } else { yb };
        }
    }
    env.last().map_or(f64::NAN, |p| p.1)
}

/// One seed's comparison.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct SeedGap {
    /// The seed.
    pub seed: u64,
    /// D: ODPO's envelope minus DPO's, averaged over [0, K*].
    pub d: f64,
    /// K*, the smaller of the two methods' largest KL.
    pub k_star: f64,
}

/// D and K* for one seed from each method's (KL, reward) points and the SFT model's reward.
pub fn frontier_gap(odpo: &[(f64, f64)], dpo: &[(f64, f64)], sft_reward: f64) -> (f64, f64) {
    let largest = |pts: &[(f64, f64)]| pts.iter().map(|p| p.0.max(0.0)).fold(0.0, f64::max);
    let k_star = largest(odpo).min(largest(dpo));
    let (eo, ed) = (envelope(odpo, sft_reward), envelope(dpo, sft_reward));
    let d = (0..GRID_POINTS)
        .map(|i| {
            let x = k_star * i as f64 / (GRID_POINTS - 1) as f64;
            envelope_at(&eo, x) - envelope_at(&ed, x)
        })
        .sum::<f64>()
        / GRID_POINTS as f64;
    (d, k_star)
}

/// The mean of `values`.
fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// A 95% percentile-bootstrap interval of the mean of `values` (`reps` resamples, seeded).
pub fn bootstrap_ci(values: &[f64], reps: usize, seed: u64) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..reps.max(1)).map(|_| (0..n).map(|_| values[rng.random_range(0..n)]).sum::<f64>() / n as f64).collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * (means.len() - 1) as f64).round() as usize).min(means.len() - 1)];
    (at(0.025), at(0.975))
}

/// One-sided sign-flip p-value for "the mean of `values` is above 0": the share of sign assignments
/// whose mean is at least the observed one. Exact (all 2^n) up to 24 values, else 2^20 seeded draws.
pub fn sign_flip_p(values: &[f64]) -> f64 {
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    let observed: f64 = values.iter().sum();
    // A relative tolerance so that assignments equal to the observed sum count despite rounding.
    let tol = 1e-12 * values.iter().map(|v| v.abs()).sum::<f64>().max(1e-300);
    let sum_for = |mask: u64| values.iter().enumerate().map(|(i, v)| if mask >> i & 1 == 1 { -v } else { *v }).sum::<f64>();
    if n <= 24 {
        let total = 1u64 << n;
        let hits = (0..total).filter(|&m| sum_for(m) >= observed - tol).count();
        hits as f64 / total as f64
    } else {
        let mut rng = StdRng::seed_from_u64(0x51f7);
        let draws = 1usize << 20;
        let hits = (0..draws)
            .filter(|_| values.iter().map(|v| if rng.random_bool(0.5) { -v } else { *v }).sum::<f64>() >= observed - tol)
            .count();
        (hits + 1) as f64 / (draws + 1) as f64
    }
}

/// Ranks (1-based, ties averaged).
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

/// Pearson correlation.
pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

/// Spearman rank correlation (Pearson on tie-averaged ranks).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    pearson(&ranks(a), &ranks(b))
}

/// ODPO against DPO over seeds, for one pair budget and α.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Comparison {
    /// The pair budget.
    pub pair_budget: usize,
    /// ODPO's α.
    pub alpha: f64,
    /// Every seed's D and K*.
    pub seeds: Vec<SeedGap>,
    /// The mean of D over seeds.
    pub mean_d: f64,
    /// Its 95% bootstrap interval.
    pub ci95: (f64, f64),
    /// The one-sided sign-flip p-value of mean D > 0.
    pub p_value: f64,
}

impl Comparison {
    /// The statistic over `seeds` (each seed's D and K*).
    pub fn of(pair_budget: usize, alpha: f64, seeds: Vec<SeedGap>) -> Self {
        let d: Vec<f64> = seeds.iter().map(|s| s.d).collect();
        Self { pair_budget, alpha, mean_d: mean(&d), ci95: bootstrap_ci(&d, BOOTSTRAP_REPS, 0xB007), p_value: sign_flip_p(&d), seeds }
    }
}

/// Mean and 95% band over seeds of one method's envelopes, on `points` KL values from 0 to the largest
/// KL that at least half the seeds (and two) reach: `(x, mean, low, high)`, the band ±1.96 standard
/// errors over the seeds that reach x.
pub fn envelope_band(per_seed: &[Vec<(f64, f64)>], sft_reward: f64, points: usize) -> Vec<(f64, f64, f64, f64)> {
    let envs: Vec<(Vec<(f64, f64)>, f64)> = per_seed.iter().map(|pts| (envelope(pts, sft_reward), pts.iter().map(|p| p.0.max(0.0)).fold(0.0, f64::max))).collect();
    let mut reach: Vec<f64> = envs.iter().map(|e| e.1).collect();
    reach.sort_by(|a, b| b.total_cmp(a));
    let need = envs.len().div_ceil(2).max(2);
    let Some(&x_max) = reach.get(need - 1) else { return Vec::new() };
    (0..points.max(2))
        .map(|i| {
            let x = x_max * i as f64 / (points.max(2) - 1) as f64;
            let ys: Vec<f64> = envs.iter().filter(|e| e.1 >= x).map(|e| envelope_at(&e.0, x)).collect();
            let m = mean(&ys);
            let sd = (ys.iter().map(|y| (y - m).powi(2)).sum::<f64>() / (ys.len().max(2) - 1) as f64).sqrt();
            let half = 1.96 * sd / (ys.len() as f64).sqrt();
            (x, m, m - half, m + half)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_by_hand() {
        // (2, 1) is beaten by (1, 2); the negative KL estimate is clamped to 0.
        let env = envelope(&[(1.0, 2.0), (2.0, 1.0), (4.0, 3.0), (-0.1, 0.2)], 0.0);
        assert_eq!(env, vec![(0.0, 0.2), (1.0, 2.0), (4.0, 3.0)]);
        assert_eq!(envelope_at(&env, 0.0), 0.2);
        assert!((envelope_at(&env, 0.5) - 1.1).abs() < 1e-12);
        assert!((envelope_at(&env, 2.5) - 2.5).abs() < 1e-12);
        assert_eq!(envelope_at(&env, 9.0), 3.0);
    }

    #[test]
    fn frontier_gap_by_hand() {
        // SFT at 0. DPO: a line from (0, 0) to (2, 2); ODPO: (0, 0) to (1, 2), flat after, largest KL 3.
        // K* = 2. On [0, 1] ODPO − DPO = x, on [1, 2] it is 2 − x: the mean over the 50-point grid of
        // [0, 2] is 0.5 by symmetry of the tent (exactly: sum of the tent at x_i = 2i/49, over 50).
        let (d, k) = frontier_gap(&[(1.0, 2.0), (3.0, 2.0)], &[(2.0, 2.0)], 0.0);
        assert_eq!(k, 2.0);
        let exact: f64 = (0..50).map(|i| { let x = 2.0 * i as f64 / 49.0; if x <= 1.0 { x } else { 2.0 - x } }).sum::<f64>() / 50.0;
        assert!((d - exact).abs() < 1e-12 && (d - 0.49).abs() < 0.02, "{d} {exact}");
        // Swapping the methods flips the sign; a method against itself gives 0.
        assert!((frontier_gap(&[(2.0, 2.0)], &[(1.0, 2.0), (3.0, 2.0)], 0.0).0 + d).abs() < 1e-12);
        assert_eq!(frontier_gap(&[(2.0, 2.0)], &[(2.0, 2.0)], 0.0).0, 0.0);
        // Equal β is never paired: only the envelopes count, so reordering points changes nothing.
        assert_eq!(frontier_gap(&[(3.0, 2.0), (1.0, 2.0)], &[(2.0, 2.0)], 0.0), (d, k));
    }

    #[test]
    fn sign_flip_p_by_hand() {
        // All three positive: only the identity assignment reaches the observed sum: 1/8.
        assert_eq!(sign_flip_p(&[1.0, 2.0, 3.0]), 0.125);
        // {3, −1}: sums 2 (observed), 4, −4, −2: two of four reach 2.
        assert_eq!(sign_flip_p(&[3.0, -1.0]), 0.5);
        // All zero: every assignment ties.
        assert_eq!(sign_flip_p(&[0.0; 5]), 1.0);
        // Twelve positives: 1/4096.
        assert_eq!(sign_flip_p(&[0.5; 12]), 1.0 / 4096.0);
    }

    #[test]
    fn bootstrap_ci_covers_the_mean_and_shrinks_to_a_constant() {
        let (lo, hi) = bootstrap_ci(&[1.0; 8], 1000, 1);
        assert_eq!((lo, hi), (1.0, 1.0));
        let v: Vec<f64> = (0..12).map(|i| i as f64).collect();
        let (lo, hi) = bootstrap_ci(&v, 10_000, 1);
        // Normal approximation: 5.5 ± 1.96·sd/√12, sd = 3.606: ±2.04.
        assert!(lo < 5.5 && hi > 5.5 && (hi - lo - 4.08).abs() < 0.5, "{lo} {hi}");
    }

    #[test]
    fn spearman_matches_hand_computed_values() {
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[10.0, 20.0, 30.0, 40.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        // scipy.stats.spearmanr([1, 2, 2, 3], [1, 3, 2, 4]) = 0.9486832980505138
        assert!((spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 3.0, 2.0, 4.0]) - 0.948_683_298_050_513_8).abs() < 1e-12);
    }

    #[test]
    fn band_over_seeds() {
        let seeds = vec![vec![(2.0, 2.0)], vec![(2.0, 4.0)], vec![(1.0, 3.0)]];
        let band = envelope_band(&seeds, 0.0, 3);
        // Two of three seeds reach KL 2: x = 0, 1, 2.
        assert_eq!(band.iter().map(|b| b.0).collect::<Vec<_>>(), vec![0.0, 1.0, 2.0]);
        assert_eq!((band[0].1, band[0].2, band[0].3), (0.0, 0.0, 0.0));
        // At x = 1: 1, 2, 3 → mean 2; at x = 2 only the two seeds reaching it: 2, 4 → mean 3.
        assert!((band[1].1 - 2.0).abs() < 1e-12 && (band[2].1 - 3.0).abs() < 1e-12);
        assert!((band[2].3 - band[2].1 - 1.96 * 2f64.sqrt() / 2f64.sqrt()).abs() < 1e-9);
    }
}
