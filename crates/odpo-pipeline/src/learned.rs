//! A learned reward model: a linear regression head on a transformer's mean-pooled final hidden
//! states, fitted by the project to scored texts (the paper's `{"prompt", "text", "reward"}` files).
//!
//! The backbone is frozen and run once over the texts; the head is ridge regression on the
//! standardised features, solved in closed form (Cholesky, f64), with the penalty chosen on a
//! validation split of the training prompts. Texts are split by prompt, so no prompt's responses
//! are on both sides; [`FitReport`] gives the held-out Spearman rank correlation with the given
//! scores. Fine-tuning the backbone as well (with LoRA) would fit better and costs a backward pass
//! per text; on a CPU the frozen backbone is what fits in minutes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use odpo_model::tokenizer::Tokenizer;
use odpo_model::CausalLm;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::compare::{pearson, spearman};
use crate::error::{PipelineError, Result};
use crate::reward::RewardModel;

/// How the head is fitted.
#[derive(Clone, Debug)]
pub struct FitOptions {
    /// The backbone: a HF folder or a `.gguf` file (its folder holds the tokenizer).
    pub backbone: PathBuf,
    /// Tokens of `prompt + separator + text` kept (the beginning).
    pub max_length: usize,
    /// Joins prompt and text (the paper's IMDB texts continue their prompt after a space).
    pub separator: String,
    /// Texts per backbone forward.
    pub batch_size: usize,
    /// Share of the prompts held out for the reported correlation.
    pub heldout_fraction: f64,
    /// Seed of the prompt split.
    pub seed: u64,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self { backbone: PathBuf::new(), max_length: 128, separator: " ".into(), batch_size: 16, heldout_fraction: 0.2, seed: 0 }
    }
}

/// Held-out agreement of the fitted model with the given scores.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FitReport {
    /// Texts the head was fitted on.
    pub train_texts: usize,
    /// Texts held out.
    pub heldout_texts: usize,
    /// The ridge penalty chosen (on standardised features).
    pub l2: f64,
    /// Spearman rank correlation with the held-out scores.
    pub spearman: f64,
    /// Pearson correlation with the held-out scores.
    pub pearson: f64,
    /// Root mean squared error on the held-out scores.
    pub rmse: f64,
    /// Standard deviation of the held-out scores (the RMSE of predicting their mean).
    pub heldout_std: f64,
    /// Seconds spent running the backbone.
    pub feature_seconds: f64,
}

/// What `reward.json` holds beside the head's tensors.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Meta {
    backbone: PathBuf,
    max_length: usize,
    separator: String,
    pooling: String,
    report: FitReport,
}

/// `score = w · (φ(x) − μ) / σ + b`, φ the mean-pooled final hidden state.
#[derive(Clone, Debug)]
struct Head {
    mean: Vec<f64>,
    std: Vec<f64>,
    weight: Vec<f64>,
    bias: f64,
}

impl Head {
    fn predict(&self, f: &[f32]) -> f64 {
        let z = f.iter().zip(&self.mean).zip(&self.std).map(|((x, m), s)| (f64::from(*x) - m) / s);
        self.bias + z.zip(&self.weight).map(|(z, w)| z * w).sum::<f64>()
    }
}

/// A fitted reward model, ready to score.
pub struct LearnedReward {
    model: CausalLm,
    tokenizer: Tokenizer,
    head: Head,
    meta: Meta,
    device: Device,
    batch_size: usize,
}

/// Mean-pooled final hidden states of `prompt + separator + text`, one row per text.
pub fn features(model: &CausalLm, tokenizer: &Tokenizer, prompts: &[String], texts: &[String], max_length: usize, separator: &str, batch_size: usize, device: &Device) -> Result<Vec<Vec<f32>>> {
    let mut ids: Vec<Vec<u32>> = Vec::with_capacity(texts.len());
    for (p, t) in prompts.iter().zip(texts) {
        let mut v = tokenizer.encode(&format!("{p}{separator}{t}"), true)?;
        v.truncate(max_length.max(1));
        if v.is_empty() {
            v.push(tokenizer.eos_token_id().unwrap_or(0));
        }
        ids.push(v);
    }
    // Similar lengths together: less padding.
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| ids[i].len());
    let mut out = vec![Vec::new(); ids.len()];
    let started = std::time::Instant::now();
    let batcher = odpo_data::SftBatcher { pad_id: 0, pad_to_multiple: None };
    for (n, chunk) in order.chunks(batch_size.max(1)).enumerate() {
        let items: Vec<odpo_data::SftItem> = chunk.iter().map(|&i| odpo_data::SftItem { id: i, ids: ids[i].clone(), prompt_len: 0 }).collect();
        let batch = burn::data::dataloader::batcher::Batcher::batch(&batcher, items, device);
        let (input, mask) = (batch.input_ids, batch.attention_mask);
        let [b, t] = input.dims();
        let hidden = model.hidden(input, &mask, None);
        let d = hidden.dims()[2];
        let m = mask.float().reshape([b, t, 1]);
        let pooled = (hidden * m.clone()).sum_dim(1).reshape([b, d]) / m.sum_dim(1).reshape([b, 1]);
        let values = pooled.into_data().convert::<f32>().try_into_vec::<f32>().map_err(|e| PipelineError::config("reward", format!("{e:?}")))?;
        for (k, &i) in chunk.iter().enumerate() {
            out[i] = values[k * d..(k + 1) * d].to_vec();
        }
        if n % 20 == 19 {
            let done = (n + 1) * batch_size;
            tracing::info!("reward features: {done}/{} texts, {:.1} texts/s", ids.len(), done as f64 / started.elapsed().as_secs_f64());
        }
    }
    Ok(out)
}

/// Ridge regression on standardised features: the head minimising `‖Zw + b − y‖² + l2·‖w‖²`.
fn ridge(x: &[&Vec<f32>], y: &[f64], l2: f64, mean: &[f64], std: &[f64]) -> Result<Head> {
    let (n, d) = (x.len(), mean.len());
    let y_mean = y.iter().sum::<f64>() / n.max(1) as f64;
    let mut a = nalgebra::DMatrix::<f64>::zeros(d, d);
    let mut rhs = nalgebra::DVector::<f64>::zeros(d);
    let mut z = vec![0.0; d];
    for (row, &target) in x.iter().zip(y) {
        for j in 0..d {
            z[j] = (f64::from(row[j]) - mean[j]) / std[j];
        }
        for j in 0..d {
            rhs[j] += z[j] * (target - y_mean);
            for k in 0..=j {
                a[(j, k)] += z[j] * z[k];
            }
        }
    }
    for j in 0..d {
        for k in 0..j {
            a[(k, j)] = a[(j, k)];
        }
        a[(j, j)] += l2;
    }
    let chol = nalgebra::Cholesky::new(a).ok_or_else(|| PipelineError::config("reward", "the feature matrix is not positive definite; raise the penalty"))?;
    let w = chol.solve(&rhs);
    // Features are centred on the training mean, so the intercept is the mean score.
    Ok(Head { mean: mean.to_vec(), std: std.to_vec(), weight: w.iter().copied().collect(), bias: y_mean })
}

fn standardiser(x: &[&Vec<f32>]) -> (Vec<f64>, Vec<f64>) {
    let (n, d) = (x.len().max(1) as f64, x.first().map_or(0, |r| r.len()));
    let mut mean = vec![0.0; d];
    for r in x {
        for (m, v) in mean.iter_mut().zip(r.iter()) {
            *m += f64::from(*v) / n;
        }
    }
    let mut var = vec![0.0; d];
    for r in x {
        for ((s, v), m) in var.iter_mut().zip(r.iter()).zip(&mean) {
            *s += (f64::from(*v) - m).powi(2) / n;
        }
    }
    (mean, var.into_iter().map(|v| v.sqrt().max(1e-8)).collect())
}

/// Prompts split into (train, held out), seeded.
fn split_prompts(prompts: &[String], fraction: f64, seed: u64) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut unique: Vec<String> = prompts.iter().cloned().collect::<BTreeSet<_>>().into_iter().collect();
    unique.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let k = ((unique.len() as f64) * fraction).round() as usize;
    let held: BTreeSet<String> = unique[..k.min(unique.len())].iter().cloned().collect();
    let train: BTreeSet<String> = unique[k.min(unique.len())..].iter().cloned().collect();
    (train, held)
}

impl LearnedReward {
    /// Fits a head on `(prompt, text, score)` entries; reports the held-out agreement.
    pub fn fit(entries: &[(String, String, f64)], opts: &FitOptions, device: &Device) -> Result<(Self, FitReport)> {
        if entries.len() < 10 {
            return Err(PipelineError::config("reward", format!("{} scored texts; at least 10 are needed to fit a reward model", entries.len())));
        }
        let loaded = CausalLm::load(&opts.backbone, device)?;
        let tokenizer = Tokenizer::from_dir(&loaded.tokenizer_dir)?;
        let model = loaded.model;
        let prompts: Vec<String> = entries.iter().map(|e| e.0.clone()).collect();
        let texts: Vec<String> = entries.iter().map(|e| e.1.clone()).collect();
        let started = std::time::Instant::now();
        let feats = features(&model, &tokenizer, &prompts, &texts, opts.max_length, &opts.separator, opts.batch_size, device)?;
        let feature_seconds = started.elapsed().as_secs_f64();

        let (train_p, held_p) = split_prompts(&prompts, opts.heldout_fraction, opts.seed);
        let pick = |set: &BTreeSet<String>| -> (Vec<&Vec<f32>>, Vec<f64>) { entries.iter().zip(&feats).filter(|(e, _)| set.contains(&e.0)).map(|(e, f)| (f, e.2)).unzip() };
        let (train_x, train_y) = pick(&train_p);
        let (held_x, held_y) = pick(&held_p);

        // The penalty: best validation Spearman on a split of the training prompts.
        let train_prompts: Vec<String> = train_p.iter().cloned().collect();
        let (fit_p, val_p) = split_prompts(&train_prompts, 0.2, opts.seed.wrapping_add(1));
        let (fit_x, fit_y) = pick(&fit_p);
        let (val_x, val_y) = pick(&val_p);
        let (mean, std) = standardiser(&fit_x);
        let mut best = (f64::NEG_INFINITY, 1.0);
        for l2 in [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0] {
            let head = ridge(&fit_x, &fit_y, l2, &mean, &std)?;
            let pred: Vec<f64> = val_x.iter().map(|f| head.predict(f)).collect();
            let rho = spearman(&pred, &val_y);
            tracing::debug!(l2, rho, "reward head validation");
            if rho > best.0 {
                best = (rho, l2);
            }
        }
        let (mean, std) = standardiser(&train_x);
        let head = ridge(&train_x, &train_y, best.1, &mean, &std)?;
        let pred: Vec<f64> = held_x.iter().map(|f| head.predict(f)).collect();
        let n = held_y.len().max(1) as f64;
        let held_mean = held_y.iter().sum::<f64>() / n;
        let report = FitReport {
            train_texts: train_x.len(),
            heldout_texts: held_x.len(),
            l2: best.1,
            spearman: spearman(&pred, &held_y),
            pearson: pearson(&pred, &held_y),
            rmse: (pred.iter().zip(&held_y).map(|(p, y)| (p - y).powi(2)).sum::<f64>() / n).sqrt(),
            heldout_std: (held_y.iter().map(|y| (y - held_mean).powi(2)).sum::<f64>() / n).sqrt(),
            feature_seconds,
        };
        let meta = Meta { backbone: opts.backbone.clone(), max_length: opts.max_length, separator: opts.separator.clone(), pooling: "mean".into(), report: report.clone() };
        Ok((Self { model, tokenizer, head, meta, device: device.clone(), batch_size: opts.batch_size }, report))
    }

    /// Writes `reward.json` (backbone, lengths, the fit report) and `head.json` (the head) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| PipelineError::io(dir, e))?;
        let meta = serde_json::to_string_pretty(&self.meta).map_err(|e| PipelineError::config("reward", e.to_string()))?;
        let head = serde_json::json!({ "mean": self.head.mean, "std": self.head.std, "weight": self.head.weight, "bias": self.head.bias });
        odpo_model::weights::write_atomic(&dir.join("reward.json"), meta.as_bytes())?;
        odpo_model::weights::write_atomic(&dir.join("head.json"), head.to_string().as_bytes())?;
        Ok(())
    }

    /// Loads a saved reward model (the backbone from where `reward.json` says it is).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let read = |name: &str| -> Result<serde_json::Value> {
            let path = dir.join(name);
            let text = std::fs::read_to_string(&path).map_err(|e| PipelineError::io(&path, e))?;
            serde_json::from_str(&text).map_err(|e| PipelineError::Json { path: path.clone(), line: e.line(), message: e.to_string() })
        };
        let meta: Meta = serde_json::from_value(read("reward.json")?).map_err(|e| PipelineError::Json { path: dir.join("reward.json"), line: 0, message: e.to_string() })?;
        let h = read("head.json")?;
        let vec = |k: &str| -> Result<Vec<f64>> {
            h.get(k)
                .and_then(|v| v.as_array())
                .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
                .ok_or_else(|| PipelineError::Json { path: dir.join("head.json"), line: 0, message: format!("`{k}` is missing or not a list of numbers") })
        };
        let head = Head { mean: vec("mean")?, std: vec("std")?, weight: vec("weight")?, bias: h.get("bias").and_then(serde_json::Value::as_f64).unwrap_or(0.0) };
        let loaded = CausalLm::load(&meta.backbone, device)?;
        let tokenizer = Tokenizer::from_dir(&loaded.tokenizer_dir)?;
        Ok(Self { model: loaded.model, tokenizer, head, meta, device: device.clone(), batch_size: 16 })
    }

    /// The fit report saved with the model.
    pub fn report(&self) -> &FitReport {
        &self.meta.report
    }
}

impl RewardModel for LearnedReward {
    fn score(&self, prompts: &[String], texts: &[String]) -> Result<Vec<f64>> {
        let feats = features(&self.model, &self.tokenizer, prompts, texts, self.meta.max_length, &self.meta.separator, self.batch_size, &self.device)?;
        if feats.first().is_some_and(|f| f.len() != self.head.weight.len()) {
            return Err(PipelineError::config("reward", format!("the backbone gives {} features; the head expects {}", feats[0].len(), self.head.weight.len())));
        }
        Ok(feats.iter().map(|f| self.head.predict(f)).collect())
    }

    fn name(&self) -> String {
        format!("learned ({})", self.meta.backbone.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ridge_recovers_a_linear_target() {
        // y = 2·x0 − x1 + 0.5 exactly: a tiny penalty recovers it on the training rows.
        let rows: Vec<Vec<f32>> = (0..50).map(|i| vec![(i % 7) as f32, (i % 5) as f32 * 0.3, ((i * 13) % 11) as f32]).collect();
        let y: Vec<f64> = rows.iter().map(|r| 2.0 * f64::from(r[0]) - f64::from(r[1]) + 0.5).collect();
        let x: Vec<&Vec<f32>> = rows.iter().collect();
        let (mean, std) = standardiser(&x);
        let head = ridge(&x, &y, 1e-9, &mean, &std).unwrap_or_else(|e| panic!("{e}"));
        for (r, t) in rows.iter().zip(&y) {
            assert!((head.predict(r) - t).abs() < 1e-6);
        }
    }
}
