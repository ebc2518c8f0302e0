//! Evaluation on the held-out pairs: every loss-crate metric, averaged over pairs (SFT: token-mean NLL).

use std::collections::BTreeMap;

use burn::tensor::Device;
use odpo_data::{PreferenceBatcher, TokenizedPair};
use odpo_loss::{LossConfig, Metrics, try_preference_loss};
use odpo_model::CausalLm;

use crate::error::Result;
use crate::forward::{self, Reference};

/// Preference metrics of `model` (a `.valid()` model) on `pairs`, batch by batch, each metric the mean
/// over pairs (batch means weighted by batch size).
#[allow(clippy::too_many_arguments)] // the evaluation inputs, each used once
pub fn preference(
    model: &CausalLm,
    reference: &Reference,
    pairs: &[TokenizedPair],
    loss: &LossConfig,
    use_offsets: bool,
    batch_size: usize,
    batcher: &PreferenceBatcher,
    device: &Device,
) -> Result<BTreeMap<String, f64>> {
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    let items: Vec<&TokenizedPair> = pairs.iter().collect();
    for chunk in items.chunks(batch_size.max(1)) {
        let batch = forward::preference_batch(chunk, batcher, device);
        let inputs = forward::preference_inputs(model, reference, &batch, use_offsets, device)?;
        let out = try_preference_loss(&inputs, loss)?;
        add_metrics(&mut sums, &out.metrics, chunk.len() as f64);
    }
    Ok(sums.into_iter().map(|(k, v)| (k, v / pairs.len().max(1) as f64)).collect())
}

/// SFT metrics (`nll`, the token-mean negative log-likelihood of the chosen responses, and `ppl`).
pub fn sft(model: &CausalLm, pairs: &[TokenizedPair], batch_size: usize, batcher: &PreferenceBatcher, device: &Device) -> Result<BTreeMap<String, f64>> {
    let (mut nll, mut tokens) = (0.0, 0usize);
    let items: Vec<&TokenizedPair> = pairs.iter().collect();
    for chunk in items.chunks(batch_size.max(1)) {
        let batch = forward::sft_batch(chunk, batcher, device);
        nll += forward::sft_nll(model, &batch).into_scalar::<f64>();
        tokens += chunk.iter().map(|p| forward::sft_tokens(p)).sum::<usize>();
    }
    let nll = nll / tokens.max(1) as f64;
    Ok(BTreeMap::from([("nll".to_string(), nll), ("ppl".to_string(), nll.exp())]))
}

/// Adds `weight` × each metric to `sums` (one host read per metric).
pub fn add_metrics(sums: &mut BTreeMap<String, f64>, metrics: &Metrics, weight: f64) {
    for (name, t) in metrics.named() {
        *sums.entry(name.to_string()).or_default() += weight * t.into_scalar::<f64>();
    }
}
