//! Evaluation on the held-out pairs: every loss-crate metric, averaged over pairs, with a mixture of
//! experts' load-balancing loss beside them where the run adds it (SFT: token-mean NLL).

use std::collections::BTreeMap;

use burn::tensor::Device;
use odpo_data::{PreferenceBatcher, TokenizedPair};
use odpo_loss::{LossConfig, preference_loss};
use odpo_model::CausalLm;
use odpo_model::logprobs::RowExtras;

use crate::error::Result;
use crate::forward::{self, Reference};
use crate::step::{MetricSums, ROUTER_AUX};

/// Preference metrics of `model` (a `.valid()` model) on `pairs`, batch by batch, each metric the mean
/// over pairs (batch means weighted by batch size), and with `router_aux` the routers'
/// load-balancing loss as training logs it (`router/aux_loss`, before its weight); `progress` hears
/// of each batch's pairs.
#[allow(clippy::too_many_arguments)] // the evaluation inputs, each used once
pub fn preference(
    model: &CausalLm,
    reference: &Reference,
    pairs: &[TokenizedPair],
    loss: &LossConfig,
    use_offsets: bool,
    router_aux: bool,
    batch_size: usize,
    batcher: &PreferenceBatcher,
    device: &Device,
    progress: &dyn Fn(usize),
) -> Result<BTreeMap<String, f64>> {
    let mut sums = MetricSums::default();
    let items: Vec<&TokenizedPair> = pairs.iter().collect();
    for chunk in items.chunks(batch_size.max(1)) {
        let batch = forward::preference_batch(chunk, batcher, device);
        let extras = RowExtras { wpo: loss.use_weighting, router_aux };
        let (inputs, aux) = forward::preference_inputs(model, reference, &batch, use_offsets, extras, device)?;
        let out = preference_loss(&inputs, loss)?;
        sums.add_preference(&out.metrics, chunk.len());
        if let Some(aux) = aux {
            sums.add_mean(ROUTER_AUX, aux.into_scalar::<f64>(), chunk.len());
        }
        progress(chunk.len());
    }
    Ok(sums.means())
}

/// SFT metrics (`nll`, the token-mean negative log-likelihood of the chosen responses, and `ppl`),
/// and with `router_aux` the routers' load-balancing loss; `progress` hears of each batch's pairs.
#[allow(clippy::too_many_arguments)] // the evaluation inputs, each used once
pub fn sft(model: &CausalLm, pairs: &[TokenizedPair], router_aux: bool, batch_size: usize, batcher: &PreferenceBatcher, device: &Device, progress: &dyn Fn(usize)) -> Result<BTreeMap<String, f64>> {
    let mut sums = MetricSums::default();
    let items: Vec<&TokenizedPair> = pairs.iter().collect();
    for chunk in items.chunks(batch_size.max(1)) {
        let batch = forward::sft_batch(chunk, batcher, device);
        let (nll, aux) = forward::sft_nll(model, &batch, router_aux);
        sums.add_nll(nll.into_scalar::<f64>(), chunk.iter().map(|p| forward::sft_tokens(p)).sum::<usize>() as f64, chunk.len());
        if let Some(aux) = aux {
            sums.add_mean(ROUTER_AUX, aux.into_scalar::<f64>(), chunk.len());
        }
        progress(chunk.len());
    }
    Ok(sums.means())
}
