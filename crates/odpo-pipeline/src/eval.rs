//! Evaluation of a trained policy against its reference on held-out prompts: samples from the
//! policy, their mean reward, and the KL(π_θ ‖ π_ref) of the policy to the reference by two
//! estimators, each with a 95% confidence interval (normal approximation, mean ± 1.96·sd/√n):
//!
//! ```text
//! seq  = mean_i Σ_t [log π_θ(y_it) − log π_ref(y_it)]            y_i ~ π_θ; unbiased for the sequence KL
//! k3   = mean_i Σ_t [(e^{r_it} − 1) − r_it],  r = log π_ref − log π_θ   the ODPO reference code's estimator
//! ```
//!
//! Both are averaged over sampled sequences; the token log-probs are computed teacher-forced, both
//! models at temperature 1.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use odpo_model::CausalLm;
use odpo_model::logprobs::token_logprobs;
use odpo_model::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};

use crate::error::{PipelineError, Result};
use crate::reward::RewardModel;
use crate::sample::{Response, SampleSettings, sample_responses, score};

/// Sequences per teacher-forced forward pass.
const SCORE_BATCH: usize = 128;

/// A mean with the half-width of its 95% confidence interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// The sample mean.
    pub mean: f64,
    /// 1.96 × the standard error (0 for fewer than 2 values).
    pub ci95: f64,
    /// Number of values.
    pub n: usize,
}

impl Estimate {
    /// The mean and 95% interval of `values`.
    pub fn of(values: &[f64]) -> Self {
        let n = values.len();
        if n == 0 {
            return Self { mean: f64::NAN, ci95: f64::NAN, n };
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        if n < 2 {
            return Self { mean, ci95: 0.0, n };
        }
        let var = values.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        Self { mean, ci95: 1.96 * (var / n as f64).sqrt(), n }
    }
}

/// The two KL estimates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KlEstimates {
    /// mean Σ_t (log π_θ − log π_ref).
    pub seq: Estimate,
    /// mean Σ_t ((e^r − 1) − r), r = log π_ref − log π_θ.
    pub k3: Estimate,
}

/// KL estimates from the per-token log-probs of sequences sampled from π_θ under π_θ
/// (`policy`) and under π_ref (`reference`), row by row.
pub fn kl_estimates(policy: &[Vec<f64>], reference: &[Vec<f64>]) -> KlEstimates {
    let mut seq = Vec::with_capacity(policy.len());
    let mut k3 = Vec::with_capacity(policy.len());
    for (p, q) in policy.iter().zip(reference) {
        seq.push(p.iter().zip(q).map(|(a, b)| a - b).sum());
        k3.push(p.iter().zip(q).map(|(a, b)| {
            let r = b - a;
            r.exp_m1() - r
        }).sum());
    }
    KlEstimates { seq: Estimate::of(&seq), k3: Estimate::of(&k3) }
}

/// Per-token log-probs of each response's tokens under `model`, teacher-forced.
pub fn response_logprobs(model: &CausalLm, responses: &[Response], pad_id: u32, device: &Device) -> Result<Vec<Vec<f64>>> {
    let mut out = Vec::with_capacity(responses.len());
    for chunk in responses.chunks(SCORE_BATCH) {
        let t = chunk.iter().map(|r| r.prompt_ids.len() + r.tokens.len()).max().unwrap_or(0);
        if t < 2 {
            out.extend(chunk.iter().map(|r| vec![0.0; r.tokens.len()]));
            continue;
        }
        let b = chunk.len();
        let (mut ids, mut mask) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
        for r in chunk {
            let n = r.prompt_ids.len() + r.tokens.len();
            ids.extend(r.prompt_ids.iter().chain(&r.tokens).map(|&x| i64::from(x)).chain(std::iter::repeat_n(i64::from(pad_id), t - n)));
            mask.extend(std::iter::repeat_n(1i64, n).chain(std::iter::repeat_n(0, t - n)));
        }
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, t]), device);
        let mask = Tensor::<2, Int>::from_data(TensorData::new(mask, [b, t]), device);
        let logits = model.forward(ids.clone(), &mask, None);
        let lp = token_logprobs(logits, ids).into_data().convert::<f32>();
        let lp = lp.try_into_vec::<f32>().map_err(|e| PipelineError::config("eval", format!("could not read log-probs back: {e:?}")))?;
        for (i, r) in chunk.iter().enumerate() {
            let start = r.prompt_ids.len() - 1;
            out.push((0..r.tokens.len()).map(|j| f64::from(lp[i * (t - 1) + start + j])).collect());
        }
    }
    Ok(out)
}

/// How one model's samples did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SampleEval {
    /// Known reward of the samples.
    pub reward: Estimate,
    /// KL to the reference, estimated on these samples.
    pub kl: KlEstimates,
    /// Mean response length in tokens (EOS included).
    pub mean_tokens: f64,
}

/// The evaluation of a policy and of its reference on the same held-out prompts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The trained policy's samples.
    pub policy: SampleEval,
    /// The reference's own samples (its KL to itself is 0: a check on the estimators).
    pub reference: SampleEval,
    /// Held-out prompts.
    pub prompts: usize,
    /// Samples per prompt and model.
    pub samples_per_prompt: usize,
    /// The reward model's name.
    pub reward_model: String,
}

/// Samples `settings.k` responses per prompt from `model` and evaluates them against `reference`.
pub fn evaluate_samples(model: &CausalLm, reference: &CausalLm, tokenizer: &Tokenizer, prompts: &[String], settings: &SampleSettings, reward: &dyn RewardModel, device: &Device) -> Result<(SampleEval, Vec<Response>, Vec<f64>)> {
    let pad = tokenizer.pad_token_id().or(tokenizer.eos_token_id()).unwrap_or(0);
    let responses = sample_responses(model, tokenizer, prompts, settings, device)?;
    let rewards = score(&responses, prompts, reward)?;
    let lp = response_logprobs(model, &responses, pad, device)?;
    let lp_ref = response_logprobs(reference, &responses, pad, device)?;
    let mean_tokens = responses.iter().map(|r| r.tokens.len() as f64).sum::<f64>() / responses.len().max(1) as f64;
    Ok((SampleEval { reward: Estimate::of(&rewards), kl: kl_estimates(&lp, &lp_ref), mean_tokens }, responses, rewards))
}

/// Evaluates `policy` and `reference` on `prompts` (the same sampler seed for both).
pub fn evaluate(policy: &CausalLm, reference: &CausalLm, tokenizer: &Tokenizer, prompts: &[String], settings: &SampleSettings, reward: &dyn RewardModel, device: &Device) -> Result<EvalReport> {
    let (policy_eval, _, _) = evaluate_samples(policy, reference, tokenizer, prompts, settings, reward, device)?;
    let (reference_eval, _, _) = evaluate_samples(reference, reference, tokenizer, prompts, settings, reward, device)?;
    Ok(EvalReport { policy: policy_eval, reference: reference_eval, prompts: prompts.len(), samples_per_prompt: settings.k, reward_model: reward.name() })
}

/// One preference pair seen by a trained policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairMargin {
    /// The implicit reward margin h = [log π_θ(y_w) − log π_ref(y_w)] − [log π_θ(y_l) − log π_ref(y_l)].
    pub h: f64,
    /// The pair's offset Δ under the data config's offset rule (0 without one).
    pub offset: f64,
}

/// Pairs per forward pass in [`pair_margins`].
const MARGIN_BATCH: usize = 64;

/// Every pair of `data` (read, paired, offset and tokenized by its rules, as the trainer does) with its
/// margin h between `policy` and `reference`: what ODPO changes is how h spreads with Δ across pairs.
pub fn pair_margins(policy: &CausalLm, reference: &CausalLm, tokenizer: &Tokenizer, data: &odpo_data::DataConfig, device: &Device) -> Result<Vec<PairMargin>> {
    let loaded = odpo_data::load(data).map_err(odpo_trainer::TrainError::from)?;
    let (pairs, _) = odpo_data::tokenize_pairs(&loaded.pairs, tokenizer, data).map_err(odpo_trainer::TrainError::from)?;
    let pad_id = tokenizer.pad_token_id().or(tokenizer.eos_token_id()).unwrap_or(0);
    let batcher = odpo_data::PreferenceBatcher::new(pad_id, data.pad_to_multiple, odpo_data::Layout::SharedPrompt);
    let longest = pairs.iter().map(odpo_data::TokenizedPair::row_len).max().unwrap_or(0);
    for model in [policy, reference] {
        model.check_positions(longest, || format!("the longest pair ({longest} tokens; `data.max_length` = {})", data.max_length))?;
        model.check_tokens([&pad_id], || "the tokenizer's padding token".into())?;
        for p in &pairs {
            model.check_tokens(p.prompt.iter().chain(&p.chosen).chain(&p.rejected), || format!("pair {}", p.pair_id))?;
        }
    }
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(MARGIN_BATCH) {
        let items: Vec<&odpo_data::TokenizedPair> = chunk.iter().collect();
        let batch = odpo_trainer::forward::preference_batch(&items, &batcher, device).inner();
        let rows = |model: &CausalLm| -> Result<Vec<f64>> {
            let (sum, _) = odpo_trainer::forward::row_logps(model, &batch);
            sum.try_to_vec_as::<f64>().map_err(|e| PipelineError::config("eval", format!("could not read log-probs back: {e:?}")))
        };
        let (lp, lr) = (rows(policy)?, rows(reference)?);
        let b = chunk.len();
        for (i, p) in chunk.iter().enumerate() {
            let h = (lp[i] - lr[i]) - (lp[b + i] - lr[b + i]);
            out.push(PairMargin { h, offset: f64::from(p.offset) });
        }
    }
    Ok(out)
}

/// Writes `report` as pretty JSON.
pub fn write_report(path: &Path, report: &EvalReport) -> Result<PathBuf> {
    let text = serde_json::to_string_pretty(report).map_err(|e| PipelineError::Json { path: path.to_path_buf(), line: 0, message: e.to_string() })?;
    odpo_model::weights::write_atomic(path, text.as_bytes())?;
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn estimate_by_hand() {
        let e = Estimate::of(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(e.mean, 2.5);
        // sd = sqrt(5/3); 1.96 * sd / 2
        assert!((e.ci95 - 1.96 * (5.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-12);
    }

    /// Sequences of 3 independent tokens, each from p (the policy) over 3 outcomes, scored
    /// under p and q: the true KL is 3·KL(p‖q), and both estimators must find it.
    #[test]
    fn kl_estimators_find_a_known_kl() {
        let p = [0.6f64, 0.3, 0.1];
        let q = [0.2f64, 0.5, 0.3];
        let exact: f64 = 3.0 * p.iter().zip(&q).map(|(a, b)| a * (a / b).ln()).sum::<f64>();
        let mut rng = StdRng::seed_from_u64(7);
        let (mut lp, mut lq) = (Vec::new(), Vec::new());
        for _ in 0..40_000 {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for _ in 0..3 {
                let u: f64 = rng.random();
                let i = if u < p[0] { 0 } else if u < p[0] + p[1] { 1 } else { 2 };
                a.push(p[i].ln());
                b.push(q[i].ln());
            }
            lp.push(a);
            lq.push(b);
        }
        let kl = kl_estimates(&lp, &lq);
        for est in [kl.seq, kl.k3] {
            assert!((est.mean - exact).abs() < 3.0 * est.ci95 / 1.96 + 1e-9, "{est:?} vs {exact}");
            assert!((est.mean - exact).abs() < 0.03, "{est:?} vs {exact}");
        }
        // Identical distributions: both estimates are exactly 0.
        let same = kl_estimates(&lp, &lp);
        assert_eq!((same.seq.mean, same.k3.mean), (0.0, 0.0));
    }
}
