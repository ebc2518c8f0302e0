//! Learned reward models: a linear head on a frozen transformer's final hidden states, fitted by
//! the project, either to scored texts or to preference pairs.
//!
//! - [`LearnedReward::fit`]: ridge regression on `{"prompt", "text", "reward"}` texts (the paper's
//!   IMDB files), solved in closed form (Cholesky, f64) with the penalty chosen on a validation split
//!   of the training prompts; [`FitReport`] gives the held-out Spearman correlation.
//! - [`LearnedReward::fit_pairs`]: a Bradley–Terry model on chosen/rejected pairs, for data sets that
//!   have no scores: `P(y_w ≻ y_l) = σ(r(y_w) − r(y_l))` with `r = w·φ`, fitted by L2-penalised
//!   logistic regression on feature differences (Newton's method, f64; Bradley & Terry 1952, the
//!   reward model of Ouyang et al. 2022, arXiv 2203.02155, with the backbone frozen). Its scores then
//!   give `[data.offset]` the `s_w − s_l` it needs: `s_w − s_l` is the model's log-odds that `y_w`
//!   wins. [`PairFitReport`] gives the held-out pair accuracy, beside a ridge model's on the same
//!   pairs when the pairs carry scores.
//!
//! The backbone runs once over each distinct text; data is split by prompt, so no prompt's responses
//! are on both sides. Fine-tuning the backbone as well (with LoRA) would fit better and costs a
//! backward pass per text; on a CPU the frozen backbone is what fits in minutes.

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
use crate::journal::Journal;
use crate::reward::RewardModel;

/// How the head is fitted.
#[derive(Clone, Debug)]
pub struct FitOptions {
    /// The backbone: a HF folder or a `.gguf` file (its folder holds the tokenizer).
    pub backbone: PathBuf,
    /// How each text becomes a feature vector.
    pub features: FeatureSpec,
    /// Texts per backbone forward.
    pub batch_size: usize,
    /// Share of the prompts held out for the reported correlation.
    pub heldout_fraction: f64,
    /// Seed of the prompt split.
    pub seed: u64,
    /// Where the backbone's features are journaled as they are computed ([`Journal`]), for a fit
    /// stopped and run again to go on from them; the caller removes it once the model is saved.
    /// None: not kept.
    pub journal: Option<PathBuf>,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self { backbone: PathBuf::new(), features: FeatureSpec::default(), batch_size: 16, heldout_fraction: 0.2, seed: 0, journal: None }
    }
}

/// How a `(prompt, text)` becomes the backbone's feature vector.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FeatureSpec {
    /// Tokens of `prompt + separator + text` kept.
    pub max_length: usize,
    /// Joins prompt and text (the paper's IMDB texts continue their prompt after a space).
    pub separator: String,
    /// How the final hidden states are pooled.
    #[serde(default)]
    pub pooling: Pooling,
    /// Which end is kept when a text is longer than `max_length`.
    #[serde(default)]
    pub keep: Keep,
}

impl Default for FeatureSpec {
    fn default() -> Self {
        Self { max_length: 128, separator: " ".into(), pooling: Pooling::Mean, keep: Keep::Start }
    }
}

/// Pooling of the final hidden states over a text's tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pooling {
    /// The mean over the tokens.
    #[default]
    Mean,
    /// The last token's state (it has attended to the whole text): what reward models use.
    Last,
}

/// Which tokens a long text keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Keep {
    /// The first `max_length` (a short prompt and the start of its response).
    #[default]
    Start,
    /// The last `max_length`: the response and the end of a long prompt (a TL;DR summary after its
    /// post).
    End,
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

/// Held-out agreement of a Bradley–Terry model with the pairs' preferences.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PairFitReport {
    /// Pairs the model was fitted on.
    pub train_pairs: usize,
    /// Pairs held out (their prompts are not among the training pairs').
    pub heldout_pairs: usize,
    /// Prompts on each side.
    pub train_prompts: usize,
    /// Held-out prompts.
    pub heldout_prompts: usize,
    /// Distinct texts through the backbone.
    pub texts: usize,
    /// The L2 penalty chosen (on standardised features) by validation log-loss.
    pub l2: f64,
    /// Share of the training pairs whose chosen response scores higher.
    pub train_accuracy: f64,
    /// Share of the held-out pairs whose chosen response scores higher (ties count half).
    pub accuracy: f64,
    /// Mean `−log σ(s_w − s_l)` on the held-out pairs (ln 2 = 0.693 is chance).
    pub log_loss: f64,
    /// Held-out pair accuracy of a ridge model fitted to the training texts' scores, when every
    /// pair carries scores (the same features, split and pairs).
    pub regression_accuracy: Option<f64>,
    /// Seconds spent running the backbone.
    pub feature_seconds: f64,
}

/// What `reward.json` holds beside the head's tensors.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Meta {
    backbone: PathBuf,
    #[serde(flatten)]
    features: FeatureSpec,
    /// `regression` (fitted to scores) or `bradley-terry` (fitted to pairs).
    #[serde(default = "regression")]
    objective: String,
    #[serde(default)]
    report: Option<FitReport>,
    #[serde(default)]
    pair_report: Option<PairFitReport>,
}

fn regression() -> String {
    "regression".into()
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

/// A text's features as the journal keeps them: each `f32` as its bits, exact.
#[derive(Serialize, Deserialize)]
struct KeptFeatures {
    index: usize,
    bits: Vec<u32>,
}

/// Pooled final hidden states of `prompt + separator + text` (as `spec` says), one row per text.
/// Each finished batch is kept in `journal` where one is given: a pass stopped ([`odpo_trainer::interrupt`],
/// after the current batch, with [`PipelineError::Stopped`]) and run again goes on from the batches kept.
#[allow(clippy::too_many_arguments)] // the pass's inputs, settings and device, each used
pub fn features(model: &CausalLm, tokenizer: &Tokenizer, prompts: &[String], texts: &[String], spec: &FeatureSpec, batch_size: usize, journal: Option<&Journal>, device: &Device) -> Result<Vec<Vec<f32>>> {
    let mut ids: Vec<Vec<u32>> = Vec::with_capacity(texts.len());
    let keep = spec.max_length.max(1);
    for (p, t) in prompts.iter().zip(texts) {
        let mut v = tokenizer.encode(&format!("{p}{}{t}", spec.separator), true)?;
        match spec.keep {
            Keep::Start => v.truncate(keep),
            Keep::End => v = v.split_off(v.len().saturating_sub(keep)),
        }
        if v.is_empty() {
            v.push(tokenizer.eos_token_id().unwrap_or(0));
        }
        ids.push(v);
    }
    // Similar lengths together: less padding.
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| ids[i].len());
    let mut out = vec![Vec::new(); ids.len()];
    let batch_size = batch_size.max(1);
    let pooling = match spec.pooling {
        Pooling::Mean => 0,
        Pooling::Last => 1,
    };
    let key = journal.map(|j| j.key("features", &[pooling, batch_size as u64], &ids));
    let fits = |at: usize, row: &KeptFeatures| row.index == order[at] && !row.bits.is_empty();
    let mut kept: Vec<KeptFeatures> = journal.zip(key.as_deref()).and_then(|(j, key)| j.read(key, ids.len(), batch_size, fits)).unwrap_or_default();
    if kept.iter().any(|r| r.bits.len() != kept[0].bits.len()) {
        kept.clear();
    }
    if let (Some(j), false) = (journal, kept.is_empty()) {
        tracing::info!("features: {} of {} texts read from {}", kept.len(), ids.len(), j.path().display());
    }
    let mut open = journal.zip(key.as_deref()).map(|(j, key)| j.start(key, &kept)).transpose()?;
    let done = kept.len();
    for KeptFeatures { index, bits } in kept {
        let row: Vec<f32> = bits.into_iter().map(f32::from_bits).collect();
        out[index] = finite_features(&row, index, &prompts[index])?;
    }
    let bar = indicatif::ProgressBar::new(ids.len() as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} texts through the backbone [{elapsed_precise} < {eta_precise}, {per_sec}]") {
        bar.set_style(style);
    }
    bar.set_position(done as u64);
    bar.reset_eta();
    let batcher = odpo_data::SftBatcher { pad_id: 0, pad_to_multiple: None };
    // The batches after those kept (`div_ceil`: when all are kept, the last batch may be short).
    for (b, chunk) in order.chunks(batch_size).enumerate().skip(done.div_ceil(batch_size)) {
        if odpo_trainer::interrupt::requested() {
            bar.finish_and_clear();
            return Err(PipelineError::stopped("computing the backbone's features", b * batch_size, ids.len(), "texts", journal.map(Journal::path)));
        }
        let items: Vec<odpo_data::SftItem> = chunk.iter().map(|&i| odpo_data::SftItem { id: i, ids: ids[i].clone(), prompt_len: 0 }).collect();
        let batch = burn::data::dataloader::batcher::Batcher::batch(&batcher, items, device);
        let (input, mask) = (batch.input_ids, batch.attention_mask);
        let [b, t] = input.dims();
        let hidden = model.hidden(input, &mask, None);
        let d = hidden.dims()[2];
        let pooled = match spec.pooling {
            Pooling::Mean => {
                let m = mask.float().reshape([b, t, 1]);
                (hidden * m.clone()).sum_dim(1).reshape([b, d]) / m.sum_dim(1).reshape([b, 1])
            }
            Pooling::Last => {
                // Rows are right-padded: a row's last real token is at its length − 1.
                let last = (mask.sum_dim(1).reshape([b]) - 1).clamp_min(0);
                let idx = last.reshape([b, 1, 1]).expand([b, 1, d]);
                hidden.gather(1, idx).reshape([b, d])
            }
        };
        let values = pooled.into_data().convert::<f32>().try_into_vec::<f32>().map_err(|e| PipelineError::RewardModel(format!("the backbone's pooled features: {e:?}")))?;
        for (k, &i) in chunk.iter().enumerate() {
            out[i] = finite_features(&values[k * d..(k + 1) * d], i, &prompts[i])?;
        }
        if let Some(open) = open.as_mut() {
            open.append(chunk.iter().map(|&index| KeptFeatures { index, bits: out[index].iter().map(|x| x.to_bits()).collect() }))?;
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    tracing::info!("reward features: {} texts in {:.0} s", ids.len(), bar.elapsed().as_secs_f64());
    Ok(out)
}

/// Text `i`'s features, refused when one is NaN or infinite: such a row would otherwise pass
/// through the fit unseen (a Cholesky factor of NaNs reports no failure) and score everything NaN.
fn finite_features(row: &[f32], i: usize, prompt: &str) -> Result<Vec<f32>> {
    match row.iter().position(|v| !v.is_finite()) {
        Some(j) => Err(PipelineError::RewardModel(format!(
            "the backbone's feature {j} of text {} (prompt {prompt:?}) is {}; its hidden states overflowed or its weights hold NaN",
            i + 1,
            row[j]
        ))),
        None => Ok(row.to_vec()),
    }
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
    let chol = nalgebra::Cholesky::new(a).ok_or_else(|| PipelineError::RewardModel(format!("the ridge system with penalty {l2} cannot be solved (not positive definite)")))?;
    let w = chol.solve(&rhs);
    // Features are centred on the training mean, so the intercept is the mean score.
    Ok(Head { mean: mean.to_vec(), std: std.to_vec(), weight: w.iter().copied().collect(), bias: y_mean })
}

/// A ridge head on the rows of the `train` prompts (`(prompt, features, score)`), its penalty the
/// one with the best Spearman correlation on a validation split of those prompts.
fn ridge_selected(rows: &[(&str, &Vec<f32>, f64)], train: &BTreeSet<String>, seed: u64) -> Result<(Head, f64)> {
    let pick = |set: &BTreeSet<String>| -> (Vec<&Vec<f32>>, Vec<f64>) { rows.iter().filter(|r| set.contains(r.0)).map(|r| (r.1, r.2)).unzip() };
    let train_prompts: Vec<String> = train.iter().cloned().collect();
    let (fit_p, val_p) = split_prompts(&train_prompts, 0.2, seed.wrapping_add(1));
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
    let (train_x, train_y) = pick(train);
    let (mean, std) = standardiser(&train_x);
    Ok((ridge(&train_x, &train_y, best.1, &mean, &std)?, best.1))
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

/// A Bradley–Terry fit: the model, its report, and the scores it gives each pair's two responses.
pub struct PairFit {
    /// The fitted reward model.
    pub model: LearnedReward,
    /// Held-out figures.
    pub report: PairFitReport,
    /// `(r(y_w), r(y_l))` of every pair given, in order.
    pub pair_scores: Vec<(f64, f64)>,
}

/// The backbone (a HF folder or a `.gguf` file) and the tokenizer beside it.
fn backbone(path: &Path, device: &Device) -> Result<(CausalLm, Tokenizer)> {
    let loaded = CausalLm::load(path, device)?;
    let tokenizer = Tokenizer::open(&loaded.tokenizer_path)?;
    Ok((loaded.model, tokenizer))
}

/// A preference pair as texts: the prompt, the chosen and the rejected response, and their scores
/// where the data has them.
#[derive(Clone, Debug)]
pub struct PairText {
    /// The prompt.
    pub prompt: String,
    /// The preferred response.
    pub chosen: String,
    /// The dispreferred response.
    pub rejected: String,
    /// `(s_w, s_l)`, when known.
    pub scores: Option<(f64, f64)>,
}

/// Rows of `(φ − μ) / σ`, one per text.
fn standardised(x: &[Vec<f32>], mean: &[f64], std: &[f64]) -> nalgebra::DMatrix<f64> {
    nalgebra::DMatrix::from_fn(x.len(), mean.len(), |i, j| (f64::from(x[i][j]) - mean[j]) / std[j])
}

fn log_sigmoid(m: f64) -> f64 {
    // −log(1 + e^{−m}), stable for either sign.
    -(-m).max(0.0) - (-m.abs()).exp().ln_1p()
}

/// The Bradley–Terry weights: `w` minimising `Σ −log σ(w·(z_w − z_l)) + (l2/2)·‖w‖²` over the
/// `(winner, loser)` rows of `z`, by Newton's method (the objective is strictly convex for `l2 > 0`),
/// each step halved until the objective falls.
fn bradley_terry(z: &nalgebra::DMatrix<f64>, pairs: &[(usize, usize)], l2: f64) -> Result<nalgebra::DVector<f64>> {
    let d = z.ncols();
    let diff = nalgebra::DMatrix::from_fn(pairs.len(), d, |i, j| z[(pairs[i].0, j)] - z[(pairs[i].1, j)]);
    let objective = |w: &nalgebra::DVector<f64>| -> f64 { -(&diff * w).iter().map(|&m| log_sigmoid(m)).sum::<f64>() + 0.5 * l2 * w.norm_squared() };
    let mut w = nalgebra::DVector::<f64>::zeros(d);
    let mut current = objective(&w);
    for _ in 0..100 {
        let margins = &diff * &w;
        // d/dm −log σ(m) = −σ(−m); d²/dm² = σ(m)·σ(−m).
        let lose: Vec<f64> = margins.iter().map(|&m| 1.0 / (1.0 + m.exp())).collect();
        let grad = -(diff.transpose() * nalgebra::DVector::from_vec(lose.clone())) + l2 * &w;
        let mut weighted = diff.clone();
        for (i, mut row) in weighted.row_iter_mut().enumerate() {
            row *= lose[i] * (1.0 - lose[i]);
        }
        let mut hessian = diff.transpose() * weighted;
        for j in 0..d {
            hessian[(j, j)] += l2;
        }
        let chol = nalgebra::Cholesky::new(hessian).ok_or_else(|| PipelineError::RewardModel(format!("the Bradley–Terry Hessian with penalty {l2} cannot be solved (not positive definite)")))?;
        let step = chol.solve(&grad);
        let mut t = 1.0;
        let (mut next, mut value) = (&w - &step, 0.0);
        for _ in 0..30 {
            value = objective(&next);
            // Near the optimum a full Newton step changes the objective by less than its rounding.
            if value <= current + 1e-12 * current.abs() {
                break;
            }
            t *= 0.5;
            next = &w - t * &step;
        }
        let moved = (t * step.amax()).abs();
        (w, current) = (next, value);
        if moved < 1e-10 {
            break;
        }
    }
    Ok(w)
}

/// Mean `−log σ(r_w − r_l)` of `w` on `pairs`.
fn pair_log_loss(z: &nalgebra::DMatrix<f64>, pairs: &[(usize, usize)], w: &nalgebra::DVector<f64>) -> f64 {
    let r = z * w;
    -pairs.iter().map(|&(c, l)| log_sigmoid(r[c] - r[l])).sum::<f64>() / pairs.len().max(1) as f64
}

/// Share of `pairs` whose winner scores higher; ties count half.
fn pair_accuracy(scores: &[f64], pairs: &[(usize, usize)]) -> f64 {
    let won: f64 = pairs.iter().map(|&(c, l)| if scores[c] > scores[l] { 1.0 } else if scores[c] == scores[l] { 0.5 } else { 0.0 }).sum();
    won / pairs.len().max(1) as f64
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

/// The features journal `opts` asks for, keyed by its backbone.
fn journal(opts: &FitOptions) -> Result<Option<Journal>> {
    opts.journal.as_ref().map(|path| Journal::at(path, &opts.backbone)).transpose()
}

/// The fewest scored texts (or pairs) a reward model is fitted on.
pub const MIN_FIT_ROWS: usize = 10;

impl LearnedReward {
    /// Fits a head on `(prompt, text, score)` entries; reports the held-out agreement.
    pub fn fit(entries: &[(String, String, f64)], opts: &FitOptions, device: &Device) -> Result<(Self, FitReport)> {
        if entries.len() < MIN_FIT_ROWS {
            return Err(PipelineError::TooLittleData { what: "scored texts", count: entries.len(), least: MIN_FIT_ROWS });
        }
        let (model, tokenizer) = backbone(&opts.backbone, device)?;
        let prompts: Vec<String> = entries.iter().map(|e| e.0.clone()).collect();
        let texts: Vec<String> = entries.iter().map(|e| e.1.clone()).collect();
        let started = std::time::Instant::now();
        let feats = features(&model, &tokenizer, &prompts, &texts, &opts.features, opts.batch_size, journal(opts)?.as_ref(), device)?;
        let feature_seconds = started.elapsed().as_secs_f64();

        let (train_p, held_p) = split_prompts(&prompts, opts.heldout_fraction, opts.seed);
        let rows: Vec<(&str, &Vec<f32>, f64)> = entries.iter().zip(&feats).map(|(e, f)| (e.0.as_str(), f, e.2)).collect();
        let (head, l2) = ridge_selected(&rows, &train_p, opts.seed)?;
        let (held_x, held_y): (Vec<&Vec<f32>>, Vec<f64>) = rows.iter().filter(|r| held_p.contains(r.0)).map(|r| (r.1, r.2)).unzip();
        let train_x_len = rows.len() - held_x.len();
        let pred: Vec<f64> = held_x.iter().map(|f| head.predict(f)).collect();
        let n = held_y.len().max(1) as f64;
        let held_mean = held_y.iter().sum::<f64>() / n;
        let report = FitReport {
            train_texts: train_x_len,
            heldout_texts: held_x.len(),
            l2,
            spearman: spearman(&pred, &held_y),
            pearson: pearson(&pred, &held_y),
            rmse: (pred.iter().zip(&held_y).map(|(p, y)| (p - y).powi(2)).sum::<f64>() / n).sqrt(),
            heldout_std: (held_y.iter().map(|y| (y - held_mean).powi(2)).sum::<f64>() / n).sqrt(),
            feature_seconds,
        };
        let meta = Meta { backbone: opts.backbone.clone(), features: opts.features.clone(), objective: regression(), report: Some(report.clone()), pair_report: None };
        Ok((Self { model, tokenizer, head, meta, device: device.clone(), batch_size: opts.batch_size }, report))
    }

    /// Fits a Bradley–Terry head on preference pairs (module doc); reports the held-out pair
    /// accuracy, and a ridge model's on the same pairs when every pair carries scores.
    pub fn fit_pairs(pairs: &[PairText], opts: &FitOptions, device: &Device) -> Result<PairFit> {
        if pairs.len() < MIN_FIT_ROWS {
            return Err(PipelineError::TooLittleData { what: "pairs", count: pairs.len(), least: MIN_FIT_ROWS });
        }
        // Each distinct (prompt, text) runs through the backbone once.
        let mut index: std::collections::HashMap<(&str, &str), usize> = std::collections::HashMap::new();
        let (mut prompts, mut texts): (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
        let mut sides = Vec::with_capacity(pairs.len());
        for p in pairs {
            let mut side = [0; 2];
            for (k, t) in [p.chosen.as_str(), p.rejected.as_str()].into_iter().enumerate() {
                let next = index.len();
                side[k] = *index.entry((p.prompt.as_str(), t)).or_insert(next);
                if side[k] == next {
                    prompts.push(p.prompt.clone());
                    texts.push(t.to_string());
                }
            }
            sides.push((side[0], side[1]));
        }
        let (model, tokenizer) = backbone(&opts.backbone, device)?;
        let started = std::time::Instant::now();
        let feats = features(&model, &tokenizer, &prompts, &texts, &opts.features, opts.batch_size, journal(opts)?.as_ref(), device)?;
        let feature_seconds = started.elapsed().as_secs_f64();

        let pair_prompts: Vec<String> = pairs.iter().map(|p| p.prompt.clone()).collect();
        let (train_p, held_p) = split_prompts(&pair_prompts, opts.heldout_fraction, opts.seed);
        let in_set = |set: &BTreeSet<String>| -> Vec<(usize, usize)> { pairs.iter().zip(&sides).filter(|(p, _)| set.contains(&p.prompt)).map(|(_, s)| *s).collect() };
        let (train, held) = (in_set(&train_p), in_set(&held_p));
        if train.is_empty() || held.is_empty() {
            return Err(PipelineError::RewardModel(format!("{} training and {} held-out pairs; both sides of the split by prompt need pairs (more prompts, or another --heldout)", train.len(), held.len())));
        }
        // Standardised on the training prompts' texts.
        let train_texts: Vec<&Vec<f32>> = feats.iter().zip(&prompts).filter(|(_, p)| train_p.contains(*p)).map(|(f, _)| f).collect();
        let (mean, std) = standardiser(&train_texts);
        let z = standardised(&feats, &mean, &std);

        // The penalty: the best validation log-loss on a split of the training prompts.
        let train_list: Vec<String> = train_p.iter().cloned().collect();
        let (fit_p, val_p) = split_prompts(&train_list, 0.2, opts.seed.wrapping_add(1));
        let (fit, val) = (in_set(&fit_p), in_set(&val_p));
        let mut best = (f64::INFINITY, 1.0);
        for l2 in [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0] {
            let w = bradley_terry(&z, &fit, l2)?;
            let loss = pair_log_loss(&z, &val, &w);
            tracing::debug!(l2, loss, "Bradley–Terry validation");
            if loss < best.0 {
                best = (loss, l2);
            }
        }
        let w = bradley_terry(&z, &train, best.1)?;
        let head = Head { mean, std, weight: w.iter().copied().collect(), bias: 0.0 };
        let scores: Vec<f64> = feats.iter().map(|f| head.predict(f)).collect();

        // The regression baseline: ridge on the training prompts' scored texts, the same held-out pairs.
        let regression_accuracy = if pairs.iter().all(|p| p.scores.is_some()) {
            let mut score = vec![0.0; texts.len()];
            for (p, &(c, r)) in pairs.iter().zip(&sides) {
                if let Some((sc, sr)) = p.scores {
                    (score[c], score[r]) = (sc, sr);
                }
            }
            let rows: Vec<(&str, &Vec<f32>, f64)> = prompts.iter().zip(&feats).zip(&score).map(|((p, f), s)| (p.as_str(), f, *s)).collect();
            let (ridge_head, _) = ridge_selected(&rows, &train_p, opts.seed)?;
            let ridge_scores: Vec<f64> = feats.iter().map(|f| ridge_head.predict(f)).collect();
            Some(pair_accuracy(&ridge_scores, &held))
        } else {
            None
        };
        let report = PairFitReport {
            train_pairs: train.len(),
            heldout_pairs: held.len(),
            train_prompts: train_p.len(),
            heldout_prompts: held_p.len(),
            texts: texts.len(),
            l2: best.1,
            train_accuracy: pair_accuracy(&scores, &train),
            accuracy: pair_accuracy(&scores, &held),
            log_loss: pair_log_loss(&z, &held, &w),
            regression_accuracy,
            feature_seconds,
        };
        let meta = Meta { backbone: opts.backbone.clone(), features: opts.features.clone(), objective: "bradley-terry".into(), report: None, pair_report: Some(report.clone()) };
        let pair_scores = sides.iter().map(|&(c, r)| (scores[c], scores[r])).collect();
        Ok(PairFit { model: Self { model, tokenizer, head, meta, device: device.clone(), batch_size: opts.batch_size }, report, pair_scores })
    }

    /// Writes `reward.json` (backbone, lengths, the fit report) and `head.json` (the head) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| PipelineError::io(dir, e))?;
        let meta = serde_json::to_string_pretty(&self.meta).map_err(|e| PipelineError::RewardModel(format!("{}: {e}", dir.join("reward.json").display())))?;
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
        let bad = |message: String| PipelineError::Json { path: dir.join("head.json"), line: 0, message };
        // JSON has no NaN (serde_json writes it as null): a value that is not a number is refused, not skipped.
        let vec = |k: &str| -> Result<Vec<f64>> {
            let list = h.get(k).and_then(|v| v.as_array()).ok_or_else(|| bad(format!("`{k}` is missing or not a list of numbers")))?;
            list.iter().enumerate().map(|(i, v)| v.as_f64().ok_or_else(|| bad(format!("`{k}[{i}]` is {v}; expected a number")))).collect()
        };
        let head = Head { mean: vec("mean")?, std: vec("std")?, weight: vec("weight")?, bias: h.get("bias").and_then(serde_json::Value::as_f64).ok_or_else(|| bad("`bias` is missing or not a number".into()))? };
        if head.mean.len() != head.weight.len() || head.std.len() != head.weight.len() {
            return Err(bad(format!("`mean`, `std` and `weight` hold {}, {} and {} numbers; expected one each per feature", head.mean.len(), head.std.len(), head.weight.len())));
        }
        let (model, tokenizer) = backbone(&meta.backbone, device)?;
        Ok(Self { model, tokenizer, head, meta, device: device.clone(), batch_size: 16 })
    }

    /// The regression fit's report saved with the model (`None` for a pair model).
    pub fn report(&self) -> Option<&FitReport> {
        self.meta.report.as_ref()
    }

    /// The pair fit's report saved with the model (`None` for a regression model).
    pub fn pair_report(&self) -> Option<&PairFitReport> {
        self.meta.pair_report.as_ref()
    }
}

impl LearnedReward {
    /// The head's scores of the backbone's features, computed with `journal` where one is given.
    fn scores(&self, prompts: &[String], texts: &[String], journal: Option<&Journal>) -> Result<Vec<f64>> {
        let feats = features(&self.model, &self.tokenizer, prompts, texts, &self.meta.features, self.batch_size, journal, &self.device)?;
        if feats.first().is_some_and(|f| f.len() != self.head.weight.len()) {
            return Err(PipelineError::RewardModel(format!("the backbone `{}` gives {} features; its head.json expects {}", self.meta.backbone.display(), feats[0].len(), self.head.weight.len())));
        }
        Ok(feats.iter().map(|f| self.head.predict(f)).collect())
    }
}

impl RewardModel for LearnedReward {
    fn score(&self, prompts: &[String], texts: &[String]) -> Result<Vec<f64>> {
        self.scores(prompts, texts, None)
    }

    fn score_journaled(&self, prompts: &[String], texts: &[String], journal: &Path) -> Result<Vec<f64>> {
        self.scores(prompts, texts, Some(&Journal::at(journal, &self.meta.backbone)?))
    }

    fn name(&self) -> String {
        format!("learned ({})", self.meta.backbone.display())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Pairs drawn from a known Bradley–Terry model: the fit satisfies the optimality condition
    /// `Σ σ(−m_i)·d_i = l2·w` (the gradient is zero) and recovers the true weights.
    #[test]
    fn bradley_terry_recovers_the_generating_weights() {
        use rand::Rng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let truth = [2.0, -1.0, 0.5];
        let z = nalgebra::DMatrix::<f64>::from_fn(400, 3, |_, _| rng.random_range(-1.7..1.7));
        let r: Vec<f64> = (0..400).map(|i| (0..3).map(|j| truth[j] * z[(i, j)]).sum()).collect();
        let pairs: Vec<(usize, usize)> = (0..4000)
            .map(|_| {
                let (a, b) = (rng.random_range(0..400), rng.random_range(0..400));
                let p_a = 1.0 / (1.0 + (r[b] - r[a]).exp());
                if rng.random::<f64>() < p_a { (a, b) } else { (b, a) }
            })
            .filter(|(a, b)| a != b)
            .collect();
        let l2 = 0.01;
        let w = bradley_terry(&z, &pairs, l2).unwrap();
        let mut grad = l2 * &w;
        for &(a, b) in &pairs {
            let d = z.row(a) - z.row(b);
            let m = (&d * &w)[0];
            grad -= d.transpose() / (1.0 + m.exp());
        }
        // Zero up to rounding: each of the ~4,000 terms is of order 1.
        assert!(grad.amax() < 1e-9, "gradient at the fit: {grad}");
        for (j, t) in truth.iter().enumerate() {
            assert!((w[j] - t).abs() < 0.25, "weight {j}: {} against {t}", w[j]);
        }
        // The true scores order most pairs the way they were drawn, and the fit does as well as the truth.
        let fitted: Vec<f64> = (0..400).map(|i| (0..3).map(|j| w[j] * z[(i, j)]).sum()).collect();
        let (a_fit, a_true) = (pair_accuracy(&fitted, &pairs), pair_accuracy(&r, &pairs));
        assert!(a_true > 0.75 && (a_fit - a_true).abs() < 0.02, "accuracy {a_fit} against the truth's {a_true}");
        assert!(pair_log_loss(&z, &pairs, &w) < std::f64::consts::LN_2);
    }

    #[test]
    fn log_sigmoid_and_pair_accuracy_by_hand() {
        assert!((log_sigmoid(0.0) + std::f64::consts::LN_2).abs() < 1e-15);
        assert!((log_sigmoid(800.0)).abs() < 1e-15 && (log_sigmoid(-800.0) + 800.0).abs() < 1e-9);
        assert!((log_sigmoid(1.5) - (1.0 / (1.0 + (-1.5f64).exp())).ln()).abs() < 1e-15);
        // Winner higher, a tie, winner lower: 1 + 0.5 + 0 of 3.
        assert!((pair_accuracy(&[3.0, 1.0, 1.0, 2.0], &[(0, 1), (1, 2), (1, 3)]) - 0.5).abs() < 1e-15);
    }

    #[test]
    fn non_finite_features_are_refused_naming_the_text() {
        assert_eq!(finite_features(&[0.5, -1.0], 3, "p").unwrap(), vec![0.5, -1.0]);
        let err = finite_features(&[0.5, f32::NAN, f32::INFINITY], 3, "A film").unwrap_err().to_string();
        assert_eq!(err, "reward model: the backbone's feature 1 of text 4 (prompt \"A film\") is NaN; its hidden states overflowed or its weights hold NaN");
    }

    /// A saved head that is not a head is refused before the backbone loads, naming `head.json`
    /// and the entry: a NaN saved as JSON's `null`, lists of unequal length, no bias.
    #[test]
    fn a_damaged_head_file_is_refused_naming_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let meta = serde_json::json!({ "backbone": dir.path().join("no-such-backbone"), "max_length": 16, "separator": " " });
        std::fs::write(dir.path().join("reward.json"), meta.to_string()).unwrap();
        let device = odpo_model::backend::device("flex").unwrap();
        let head = dir.path().join("head.json");
        let load = |text: &str| {
            std::fs::write(&head, text).unwrap();
            LearnedReward::load(dir.path(), &device).err().map(|e| e.to_string()).unwrap_or_default()
        };
        let at = head.display();
        assert_eq!(load(r#"{"mean": [0.0, 1.0], "std": [1.0, 1.0], "weight": [0.5, null], "bias": 0.0}"#), format!("{at}: `weight[1]` is null; expected a number"));
        assert_eq!(load(r#"{"mean": [0.0], "std": [1.0, 1.0], "weight": [0.5, 0.1], "bias": 0.0}"#), format!("{at}: `mean`, `std` and `weight` hold 1, 2 and 2 numbers; expected one each per feature"));
        assert_eq!(load(r#"{"mean": [0.0], "std": [1.0], "weight": [0.5]}"#), format!("{at}: `bias` is missing or not a number"));
        // A sound head gets as far as the backbone, which is missing.
        assert!(load(r#"{"mean": [0.0], "std": [1.0], "weight": [0.5], "bias": 0.0}"#).contains("no-such-backbone"));
    }

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
