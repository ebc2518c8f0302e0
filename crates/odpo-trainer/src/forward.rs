//! One forward pass over a micro-batch: chosen and rejected rows of B pairs in one [2B, T] batch, summed
//! response log-probs per row, and the objective's inputs.

use burn::data::dataloader::batcher::Batcher;
use burn::tensor::{Device, Tensor, TensorData};
use odpo_data::{PairRows, PreferenceBatch, PreferenceBatcher, SftBatcher, SftItem, TokenizedPair};
use odpo_loss::PairLogps;
use odpo_model::CausalLm;
use odpo_model::logprobs::{RowExtras, RowLogprobs, completion_rows, shared_prompt_rows};

/// A preference micro-batch on `device`, padded by `batcher`'s rules.
pub fn preference_batch(items: &[&TokenizedPair], batcher: &PreferenceBatcher, device: &Device) -> PreferenceBatch {
    batcher.batch(items.iter().map(|p| (*p).clone()).collect(), device)
}

/// Summed log-probs and token counts of the 2B rows (chosen first), each `[2B]`: each prompt runs
/// once ([`odpo_model::logprobs::shared_prompt_logprobs`]) in the shared layout, the concatenated
/// rows with the LM head on completion columns only. Under LD-DPO the sums are weighted by the
/// batch's mask and the counts are the batch's own (the mask's sum is then no count).
pub fn row_logps(model: &CausalLm, batch: &PreferenceBatch) -> (Tensor<1>, Tensor<1>) {
    let rows = policy_rows(model, batch, RowExtras::default());
    (rows.sum, rows.count)
}

/// [`row_logps`], and as `extras` asks, from the same forward pass: WPO's per-row means
/// (`loss.use_weighting`, [`odpo_model::logprobs::wpo_row_means`]); a mixture of experts'
/// load-balancing loss over the batch's real tokens as the concatenated rows hold them (`loss.router_aux_loss_coef`).
pub fn policy_rows(model: &CausalLm, batch: &PreferenceBatch, extras: RowExtras) -> RowLogprobs {
    let rows = match &batch.rows {
        PairRows::SharedPrompt(r) => shared_prompt_rows(model, r.prompt_ids.clone(), &r.prompt_mask, r.completion_ids.clone(), &r.full_mask, r.loss_mask.clone(), extras),
        PairRows::Concatenated(r) => completion_rows(model, r.input_ids.clone(), &r.attention_mask, r.loss_mask.clone(), r.first_target, extras),
    };
    match &batch.token_counts {
        Some(counts) => RowLogprobs { count: counts.clone(), ..rows },
        None => rows,
    }
}

/// The reference model's summed log-probs of the 2B rows, on the host (chosen first). `model` is a
/// `.valid()` model: the batch is moved off autodiff for it.
pub fn reference_row_logps(model: &CausalLm, batch: &PreferenceBatch) -> crate::error::Result<Vec<f32>> {
    let (sum, _) = row_logps(model, &batch.inner());
    sum.try_to_vec_as::<f32>().map_err(|e| crate::error::TrainError::Device { what: "the reference log-probs", message: format!("{e:?}") })
}

/// The objective's inputs for a batch: policy log-probs from `policy_rows` (`[2B]`, tracked), reference
/// log-probs from the host (`[2B]`, chosen first), offsets when the run has them, weights when the data
/// has them, WPO's means when `policy_rows` has them.
pub fn pair_logps(
    batch: &PreferenceBatch,
    policy_rows: RowLogprobs,
    reference_rows: &[f32],
    use_offsets: bool,
    device: &Device,
) -> PairLogps {
    let b = batch.pair_ids.len();
    let RowLogprobs { sum, count, wpo, .. } = policy_rows;
    let reference = Tensor::<1>::from_data(TensorData::new(reference_rows.to_vec(), [2 * b]), device);
    let mut inputs = PairLogps::new(
        sum.clone().narrow(0, 0, b),
        sum.narrow(0, b, b),
        reference.clone().narrow(0, 0, b),
        reference.narrow(0, b, b),
        count.clone().narrow(0, 0, b),
        count.narrow(0, b, b),
    );
    if use_offsets {
        inputs = inputs.with_offset(batch.offsets.clone());
    }
    if let Some(w) = &batch.weights {
        inputs = inputs.with_weight(w.clone());
    }
    if let Some(m) = wpo {
        inputs = inputs.with_wpo(m.clone().narrow(0, 0, b), m.narrow(0, b, b));
    }
    inputs
}

/// The objective's inputs for a preference batch: the reference's row log-probs, then the policy's
/// (tracked when `policy` is on an autodiff device), with what `extras` asks for: WPO's means, and
/// beside them a mixture of experts' load-balancing loss.
pub fn preference_inputs(policy: &CausalLm, reference: &Reference, batch: &PreferenceBatch, use_offsets: bool, extras: RowExtras, device: &Device) -> crate::error::Result<(PairLogps, Option<Tensor<1>>)> {
    let reference_rows = reference.rows(batch)?;
    let rows = policy_rows(policy, batch, extras);
    let aux = rows.router_aux.clone();
    Ok((pair_logps(batch, rows, &reference_rows, use_offsets, device), aux))
}

/// SFT rows (prompt + chosen, loss on the chosen response) for a micro-batch of pairs, padded by
/// `batcher`'s rules.
pub fn sft_batch(items: &[&TokenizedPair], batcher: &PreferenceBatcher, device: &Device) -> odpo_data::SftBatch {
    let items: Vec<SftItem> = items
        .iter()
        .map(|p| {
            let mut ids = p.prompt.clone();
            ids.extend_from_slice(&p.chosen);
            SftItem { id: p.pair_id, ids, prompt_len: p.prompt.len() }
        })
        .collect();
    SftBatcher { pad_id: batcher.pad_id, pad_to_multiple: batcher.pad_to_multiple }.batch(items, device)
}

/// Summed NLL of the trained tokens of an SFT batch, `[1]`, tracked; with `router_aux`, beside it a
/// mixture of experts' load-balancing loss over the batch's real tokens.
pub fn sft_nll(model: &CausalLm, batch: &odpo_data::SftBatch, router_aux: bool) -> (Tensor<1>, Option<Tensor<1>>) {
    let extras = RowExtras { router_aux, ..RowExtras::default() };
    let rows = completion_rows(model, batch.input_ids.clone(), &batch.attention_mask, batch.loss_mask.clone(), batch.first_target, extras);
    (rows.sum.sum().neg(), rows.router_aux)
}

/// Trained tokens of a pair's SFT row (the first token of a sequence is never predicted).
pub fn sft_tokens(p: &TokenizedPair) -> usize {
    p.chosen.len() - usize::from(p.prompt.is_empty() && !p.chosen.is_empty())
}

/// Completion tokens (the loss-masked ones, both responses) of a pair.
pub fn pair_tokens(p: &TokenizedPair) -> usize {
    p.chosen.len() + p.rejected.len()
}

/// Where a batch's reference log-probs come from.
pub enum Reference {
    /// Reference-free objectives (and SFT): zeros, used only by the reward metrics.
    None,
    /// A frozen copy of the starting model, without autodiff.
    Frozen(Box<CausalLm>),
    /// Log-probs computed before training.
    Cached(crate::refcache::RefCache),
}

impl Reference {
    /// This reference for a data-parallel worker on `device` (without autodiff): the frozen model
    /// copied there, the cache shared by value.
    pub fn fork(&self, device: &burn::tensor::Device) -> Reference {
        match self {
            Reference::None => Reference::None,
            Reference::Frozen(model) => Reference::Frozen(Box::new((**model).clone().fork_to(device))),
            Reference::Cached(cache) => Reference::Cached(cache.clone()),
        }
    }

    /// The `[2B]` reference row log-probs of a batch (chosen first), on the host.
    pub fn rows(&self, batch: &PreferenceBatch) -> crate::error::Result<Vec<f32>> {
        match self {
            Reference::None => Ok(vec![0.0; 2 * batch.pair_ids.len()]),
            Reference::Frozen(model) => reference_row_logps(model, batch),
            Reference::Cached(cache) => cache.rows_for(&batch.pair_ids).map_err(|pair| crate::error::TrainError::MissingReference { pair }),
        }
    }
}
