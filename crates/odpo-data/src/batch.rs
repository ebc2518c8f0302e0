//! Batches of B pairs in the layout the batcher is asked for ([`Layout`]): each prompt once with its two
//! completions after it ([`SharedPromptRows`], what training runs), or the chosen and rejected sequences
//! stacked into one [2B, T] forward batch (chosen rows first, then rejected, pair i's rejected at row
//! B + i), right-padded to the longest sequence, optionally rounded up to a multiple. Built by burn
//! [`Batcher`]s so burn's `DataLoader` can prepare batches beside training.
//!
//! `loss_mask[r, t] = 1` where token t of row r is a completion token (EOS included): the log-prob of the
//! completion is the sum over t of log p(input_ids[r, t] | tokens < t) · loss_mask[r, t], so the prediction
//! for token t comes from the logits at t − 1. Under LD-DPO ([`PreferenceBatcher::ld_alpha`]) the tokens
//! of the longer response beyond the length both share weigh α instead of 1, and the batch carries the
//! true token counts beside the weighted mask.

use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::InMemDataset;
use burn::tensor::{Device, Int, Tensor, TensorData};


use crate::tokenize::{SftItem, TokenizedPair};

/// Padded rows on the host, before they become tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct HostRows {
    /// Rows.
    pub rows: usize,
    /// Padded length T.
    pub len: usize,
    /// Token ids, row-major [rows, len].
    pub input_ids: Vec<i64>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<i64>,
    /// 1.0 on completion tokens.
    pub loss_mask: Vec<f32>,
    /// The first column holding a predicted completion token in any row (`len` when there is none):
    /// the logits of the columns before `first_target - 1` are never read.
    pub first_target: usize,
}

impl HostRows {
    /// Pads sequences `(tokens, prompt_len)` to the longest, rounded up to `multiple`.
    pub fn pad(seqs: &[(Vec<u32>, usize)], pad_id: u32, multiple: Option<usize>) -> Self {
        let longest = seqs.iter().map(|(s, _)| s.len()).max().unwrap_or(0).max(1);
        let len = match multiple {
            Some(m) if m > 1 => longest.div_ceil(m) * m,
            _ => longest,
        };
        let rows = seqs.len();
        let mut input_ids = vec![i64::from(pad_id); rows * len];
        let mut attention_mask = vec![0; rows * len];
        let mut loss_mask = vec![0.0; rows * len];
        for (r, (s, prompt_len)) in seqs.iter().enumerate() {
            for (t, &id) in s.iter().enumerate() {
                input_ids[r * len + t] = i64::from(id);
                attention_mask[r * len + t] = 1;
                if t >= *prompt_len {
                    loss_mask[r * len + t] = 1.0;
                }
            }
        }
        // The first token of a sequence is never predicted, so column 0 never counts.
        let first_target = seqs.iter().filter(|(s, p)| s.len() > (*p).max(1)).map(|(_, p)| (*p).max(1)).min().unwrap_or(len);
        HostRows { rows, len, input_ids, attention_mask, loss_mask, first_target }
    }

    fn tensors(self, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>, Tensor<2>) {
        let shape = [self.rows, self.len];
        (
            Tensor::from_data(TensorData::new(self.input_ids, shape), device),
            Tensor::from_data(TensorData::new(self.attention_mask, shape), device),
            Tensor::from_data(TensorData::new(self.loss_mask, shape), device),
        )
    }
}

/// Which rows a [`PreferenceBatcher`] builds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// Each prompt once, its two completions after it ([`SharedPromptRows`]): what training runs on
    /// the CPU backends (`train.layout`). A batch with no prompt or no completion token falls back
    /// to the concatenated rows.
    #[default]
    SharedPrompt,
    /// Chosen and rejected as `[2B, T]` rows of prompt + completion, as TRL runs them.
    Concatenated,
}

/// `[2B, T]` rows of prompt + completion: rows 0..B chosen, rows B..2B rejected.
#[derive(Clone, Debug)]
pub struct ConcatenatedRows {
    /// Token ids `[2B, T]`.
    pub input_ids: Tensor<2, Int>,
    /// 1 on real tokens, 0 on padding `[2B, T]`.
    pub attention_mask: Tensor<2, Int>,
    /// 1.0 on completion tokens and EOS, 0.0 on prompt and padding `[2B, T]`.
    pub loss_mask: Tensor<2>,
    /// The first column whose token is a completion token in some row ([`HostRows::first_target`]).
    pub first_target: usize,
}

/// A batch's rows, in the layout its batcher was asked for.
// One value a batch, moved whole into the batch: boxing the larger layout would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum PairRows {
    /// Prompt + completion rows.
    Concatenated(ConcatenatedRows),
    /// Each prompt once.
    SharedPrompt(SharedPromptRows),
}

/// A batch of B preference pairs for one forward pass.
#[derive(Clone, Debug)]
pub struct PreferenceBatch {
    /// The rows: chosen first, then rejected.
    pub rows: PairRows,
    /// Offsets Δ, `[B]`.
    pub offsets: Tensor<1>,
    /// Per-pair weights `[B]`, when the data has weights (missing ones are 1).
    pub weights: Option<Tensor<1>>,
    /// The pairs' ids, in row order.
    pub pair_ids: Vec<usize>,
    /// The rows' completion token counts `[2B]` (chosen first) when `loss_mask` holds LD-DPO's weights,
    /// whose sum is no longer the count; None when the mask is 0 or 1.
    pub token_counts: Option<Tensor<1>>,
}

impl PreferenceBatch {
    /// The same batch off autodiff (for a `.valid()` model).
    pub fn inner(&self) -> Self {
        let rows = match &self.rows {
            PairRows::Concatenated(r) => PairRows::Concatenated(ConcatenatedRows {
                input_ids: r.input_ids.clone().inner(),
                attention_mask: r.attention_mask.clone().inner(),
                loss_mask: r.loss_mask.clone().inner(),
                first_target: r.first_target,
            }),
            PairRows::SharedPrompt(r) => PairRows::SharedPrompt(r.inner()),
        };
        Self {
            rows,
            offsets: self.offsets.clone().inner(),
            weights: self.weights.clone().map(Tensor::inner),
            pair_ids: self.pair_ids.clone(),
            token_counts: self.token_counts.clone().map(Tensor::inner),
        }
    }

    /// The concatenated rows, when the batch has that layout.
    pub fn concatenated(&self) -> Option<&ConcatenatedRows> {
        match &self.rows {
            PairRows::Concatenated(r) => Some(r),
            PairRows::SharedPrompt(_) => None,
        }
    }

    /// The shared-prompt rows, when the batch has that layout.
    pub fn shared(&self) -> Option<&SharedPromptRows> {
        match &self.rows {
            PairRows::SharedPrompt(r) => Some(r),
            PairRows::Concatenated(_) => None,
        }
    }
}

/// A preference batch laid out so that each prompt runs through the model once: the B prompts
/// left-padded to P columns, and the 2B completions (row `r < B` pair r's chosen, row `B + r` its
/// rejected) right-padded to C columns. Built by [`PreferenceBatcher`]; read by
/// `odpo_model::logprobs::shared_prompt_logprobs`.
#[derive(Clone, Debug)]
pub struct SharedPromptRows {
    /// Prompt ids `[B, P]`, left-padded (every non-empty prompt ends in column P − 1).
    pub prompt_ids: Tensor<2, Int>,
    /// 1 on real prompt tokens `[B, P]`.
    pub prompt_mask: Tensor<2, Int>,
    /// Completion ids `[2B, C]`, right-padded.
    pub completion_ids: Tensor<2, Int>,
    /// Attention mask of the completion pass `[2B, P + C]`: the row's prompt mask, then 1 on its
    /// real completion tokens.
    pub full_mask: Tensor<2, Int>,
    /// 1.0 on the completion tokens whose log-probs count `[2B, C]` (column 0 only where the
    /// prompt is non-empty: a sequence's first token is never predicted).
    pub loss_mask: Tensor<2>,
}

impl SharedPromptRows {
    /// The same rows off autodiff (for a `.valid()` model).
    pub fn inner(&self) -> Self {
        Self {
            prompt_ids: self.prompt_ids.clone().inner(),
            prompt_mask: self.prompt_mask.clone().inner(),
            completion_ids: self.completion_ids.clone().inner(),
            full_mask: self.full_mask.clone().inner(),
            loss_mask: self.loss_mask.clone().inner(),
        }
    }
}

/// The [`SharedPromptRows`] of `items`: prompts left-padded, chosen then rejected completions
/// right-padded, each width rounded up to `multiple` (None when the longest prompt or the longest
/// completion is empty).
pub fn shared_prompt_rows(items: &[TokenizedPair], pad_id: u32, multiple: Option<usize>, device: &Device) -> Option<SharedPromptRows> {
    shared_prompt_rows_ld(items, pad_id, multiple, None, device).map(|(rows, _)| rows)
}

/// [`shared_prompt_rows`] with LD-DPO's weights in the loss mask when `ld_alpha` is given, and then
/// the rows' token counts.
fn shared_prompt_rows_ld(items: &[TokenizedPair], pad_id: u32, multiple: Option<usize>, ld_alpha: Option<f32>, device: &Device) -> Option<(SharedPromptRows, Option<Vec<f32>>)> {
    let b = items.len();
    let p = items.iter().map(|x| x.prompt.len()).max().unwrap_or(0);
    let c = items.iter().map(|x| x.chosen.len().max(x.rejected.len())).max().unwrap_or(0);
    if b == 0 || p == 0 || c == 0 {
        return None;
    }
    let round = |n: usize| match multiple {
        Some(m) if m > 1 => n.div_ceil(m) * m,
        _ => n,
    };
    let (p, c) = (round(p), round(c));
    let pad = i64::from(pad_id);
    let (mut prompt_ids, mut prompt_mask) = (Vec::with_capacity(b * p), Vec::with_capacity(b * p));
    for it in items {
        let n = it.prompt.len();
        prompt_ids.extend(std::iter::repeat_n(pad, p - n).chain(it.prompt.iter().map(|&x| i64::from(x))));
        prompt_mask.extend(std::iter::repeat_n(0i64, p - n).chain(std::iter::repeat_n(1, n)));
    }
    let (mut ids, mut full, mut loss) = (Vec::with_capacity(2 * b * c), Vec::with_capacity(2 * b * (p + c)), Vec::with_capacity(2 * b * c));
    for r in 0..2 * b {
        let it = &items[r % b];
        let comp = if r < b { &it.chosen } else { &it.rejected };
        let n = comp.len();
        ids.extend(comp.iter().map(|&x| i64::from(x)).chain(std::iter::repeat_n(pad, c - n)));
        full.extend_from_slice(&prompt_mask[(r % b) * p..(r % b + 1) * p]);
        full.extend(std::iter::repeat_n(1i64, n).chain(std::iter::repeat_n(0, c - n)));
        let first = if it.prompt.is_empty() { 0.0 } else { 1.0 };
        loss.extend((0..c).map(|j| if j >= n { 0.0 } else if j == 0 { first } else { 1.0 }));
    }
    let counts = ld_alpha.map(|alpha| ld_weights(&mut loss, b, c, 0, alpha));
    let rows = SharedPromptRows {
        prompt_ids: Tensor::from_data(TensorData::new(prompt_ids, [b, p]), device),
        prompt_mask: Tensor::from_data(TensorData::new(prompt_mask, [b, p]), device),
        completion_ids: Tensor::from_data(TensorData::new(ids, [2 * b, c]), device),
        full_mask: Tensor::from_data(TensorData::new(full, [2 * b, p + c]), device),
        loss_mask: Tensor::from_data(TensorData::new(loss, [2 * b, c]), device),
    };
    Some((rows, counts))
}

/// LD-DPO (Liu et al., "Length Desensitization in Direct Preference Optimization", arXiv 2409.06411):
/// in a `[2B, len]` loss mask whose rows r and B + r are pair r's chosen and rejected completions, the
/// k-th counted token of a row (a nonzero entry at column ≥ `skip`) keeps its weight while k ≤ the
/// shorter of the pair's two counts, and weighs `alpha` after that, as TRL's `ld_alpha` weighs them.
/// Returns the rows' token counts, which the weighted mask no longer sums to.
fn ld_weights(mask: &mut [f32], b: usize, len: usize, skip: usize, alpha: f32) -> Vec<f32> {
    let counted = |row: &[f32]| row.iter().skip(skip).filter(|&&m| m != 0.0).count();
    let counts: Vec<usize> = mask.chunks(len.max(1)).take(2 * b).map(counted).collect();
    for (r, row) in mask.chunks_mut(len.max(1)).take(2 * b).enumerate() {
        let shared = counts[r % b].min(counts[b + r % b]);
        for (k, m) in row.iter_mut().skip(skip).filter(|m| **m != 0.0).enumerate() {
            if k >= shared {
                *m *= alpha;
            }
        }
    }
    counts.iter().map(|&n| n as f32).collect()
}

/// Builds [`PreferenceBatch`]es.
#[derive(Clone, Debug, Default)]
pub struct PreferenceBatcher {
    /// Padding token id (padding positions are masked out; any id works).
    pub pad_id: u32,
    /// Round T up to a multiple of this.
    pub pad_to_multiple: Option<usize>,
    /// The rows to build.
    pub layout: Layout,
    /// LD-DPO's α (`loss.ld_alpha`): the weight, in the loss mask, of each response's tokens beyond the
    /// length the pair's two responses share (the module doc). None: every token weighs 1.
    pub ld_alpha: Option<f32>,
}

impl PreferenceBatcher {
    /// A batcher of `layout` rows padded with `pad_id` to the longest row, rounded up to `pad_to_multiple`.
    pub fn new(pad_id: u32, pad_to_multiple: Option<usize>, layout: Layout) -> Self {
        Self { pad_id, pad_to_multiple, layout, ld_alpha: None }
    }

    /// The same batcher with LD-DPO's token weights (`loss.ld_alpha`).
    pub fn with_ld_alpha(mut self, ld_alpha: Option<f32>) -> Self {
        self.ld_alpha = ld_alpha;
        self
    }

    /// The host-side rows of a batch (what [`Batcher::batch`] turns into tensors).
    pub fn host_rows(&self, items: &[TokenizedPair]) -> HostRows {
        let seq = |p: &TokenizedPair, c: &[u32]| {
            let mut s = p.prompt.clone();
            s.extend_from_slice(c);
            (s, p.prompt.len())
        };
        let seqs: Vec<_> = items
            .iter()
            .map(|p| seq(p, &p.chosen))
            .chain(items.iter().map(|p| seq(p, &p.rejected)))
            .collect();
        HostRows::pad(&seqs, self.pad_id, self.pad_to_multiple)
    }
}

impl Batcher<TokenizedPair, PreferenceBatch> for PreferenceBatcher {
    fn batch(&self, items: Vec<TokenizedPair>, device: &Device) -> PreferenceBatch {
        let b = items.len();
        let shared = match self.layout {
            Layout::SharedPrompt => shared_prompt_rows_ld(&items, self.pad_id, self.pad_to_multiple, self.ld_alpha, device),
            Layout::Concatenated => None,
        };
        let (rows, counts) = match shared {
            Some((r, counts)) => (PairRows::SharedPrompt(r), counts),
            None => {
                let mut host = self.host_rows(&items);
                // Column 0 is never predicted, so it never counts.
                let counts = self.ld_alpha.map(|alpha| ld_weights(&mut host.loss_mask, b, host.len, 1, alpha));
                let first_target = host.first_target;
                let (input_ids, attention_mask, loss_mask) = host.tensors(device);
                (PairRows::Concatenated(ConcatenatedRows { input_ids, attention_mask, loss_mask, first_target }), counts)
            }
        };
        let token_counts = counts.map(|counts| Tensor::from_data(TensorData::new(counts, [2 * b]), device));
        let offsets: Vec<f32> = items.iter().map(|p| p.offset).collect();
        let weights = items.iter().any(|p| p.weight.is_some()).then(|| {
            let w: Vec<f32> = items.iter().map(|p| p.weight.unwrap_or(1.0)).collect();
            Tensor::from_data(TensorData::new(w, [b]), device)
        });
        PreferenceBatch {
            rows,
            offsets: Tensor::from_data(TensorData::new(offsets, [b]), device),
            weights,
            pair_ids: items.iter().map(|p| p.pair_id).collect(),
            token_counts,
        }
    }
}

/// A batch of single sequences for supervised fine-tuning.
#[derive(Clone, Debug)]
pub struct SftBatch {
    /// Token ids [B, T].
    pub input_ids: Tensor<2, Int>,
    /// 1 on real tokens [B, T].
    pub attention_mask: Tensor<2, Int>,
    /// 1.0 on trained tokens (the completion) [B, T].
    pub loss_mask: Tensor<2>,
    /// Source ids, in row order.
    pub ids: Vec<usize>,
    /// The first column whose token is trained in some row ([`HostRows::first_target`]).
    pub first_target: usize,
}

/// Builds [`SftBatch`]es.
#[derive(Clone, Debug)]
pub struct SftBatcher {
    /// Padding token id.
    pub pad_id: u32,
    /// Round T up to a multiple of this.
    pub pad_to_multiple: Option<usize>,
}

impl Batcher<SftItem, SftBatch> for SftBatcher {
    fn batch(&self, items: Vec<SftItem>, device: &Device) -> SftBatch {
        let seqs: Vec<_> = items.iter().map(|i| (i.ids.clone(), i.prompt_len)).collect();
        let rows = HostRows::pad(&seqs, self.pad_id, self.pad_to_multiple);
        let first_target = rows.first_target;
        let (input_ids, attention_mask, loss_mask) = rows.tensors(device);
        SftBatch { input_ids, attention_mask, loss_mask, ids: items.iter().map(|i| i.id).collect(), first_target }
    }
}

/// A burn data loader over tokenized pairs: `batch_size` pairs a batch, reshuffled each epoch with `seed`
/// when given, `workers` background threads (0: batches are built on the caller's thread).
pub fn preference_loader(
    items: Vec<TokenizedPair>,
    batcher: PreferenceBatcher,
    batch_size: usize,
    seed: Option<u64>,
    workers: usize,
    device: &Device,
) -> Arc<dyn DataLoader<PreferenceBatch>> {
    let mut b = DataLoaderBuilder::new(batcher).batch_size(batch_size.max(1)).num_workers(workers).set_device(device.clone());
    if let Some(s) = seed {
        b = b.shuffle(s);
    }
    b.build(InMemDataset::new(items))
}

/// A burn data loader over SFT items (see [`preference_loader`]).
pub fn sft_loader(
    items: Vec<SftItem>,
    batcher: SftBatcher,
    batch_size: usize,
    seed: Option<u64>,
    workers: usize,
    device: &Device,
) -> Arc<dyn DataLoader<SftBatch>> {
    let mut b = DataLoaderBuilder::new(batcher).batch_size(batch_size.max(1)).num_workers(workers).set_device(device.clone());
    if let Some(s) = seed {
        b = b.shuffle(s);
    }
    b.build(InMemDataset::new(items))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn tp(id: usize, prompt: &[u32], chosen: &[u32], rejected: &[u32]) -> TokenizedPair {
        TokenizedPair {
            pair_id: id,
            prompt: prompt.to_vec(),
            chosen: chosen.to_vec(),
            rejected: rejected.to_vec(),
            offset: id as f32,
            weight: None,
        }
    }

    #[test]
    fn stacks_chosen_then_rejected_with_masks() {
        let b = PreferenceBatcher::new(0, Some(4), Layout::Concatenated);
        let h = b.host_rows(&[tp(0, &[5, 6], &[7, 2], &[8, 9, 2]), tp(1, &[5], &[3, 2], &[2])]);
        assert_eq!((h.rows, h.len), (4, 8));
        assert_eq!(&h.input_ids[0..8], &[5, 6, 7, 2, 0, 0, 0, 0]);
        assert_eq!(&h.input_ids[16..24], &[5, 6, 8, 9, 2, 0, 0, 0]);
        assert_eq!(&h.loss_mask[16..24], &[0., 0., 1., 1., 1., 0., 0., 0.]);
        assert_eq!(&h.attention_mask[24..32], &[1, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&h.loss_mask[24..32], &[0., 1., 0., 0., 0., 0., 0., 0.]);
        // Pair 1's one-token prompt puts its completion at column 1.
        assert_eq!(h.first_target, 1);
        let h = b.host_rows(&[tp(0, &[5, 6, 7], &[7, 2], &[8, 2]), tp(1, &[5, 6], &[3, 2], &[4])]);
        assert_eq!(h.first_target, 2);
    }

    #[test]
    fn first_target_skips_rows_without_completion_and_column_zero() {
        // An empty prompt still never predicts column 0; a row with nothing to predict does not count.
        let h = HostRows::pad(&[(vec![4, 5, 6], 0), (vec![1, 2], 2), (vec![1, 2, 3, 4], 3)], 0, None);
        assert_eq!(h.first_target, 1);
        let h = HostRows::pad(&[(vec![1, 2], 2), (vec![1, 2, 3, 4], 3)], 0, None);
        assert_eq!(h.first_target, 3);
        assert_eq!(HostRows::pad(&[(vec![1, 2], 2)], 0, None).first_target, 2);
    }

    #[test]
    fn ld_alpha_weighs_tokens_beyond_the_shared_length_in_both_layouts() {
        let device = Device::default();
        // Pair 0: 2 chosen vs 4 rejected tokens, shared 2; pair 1 (empty prompt): 4 chosen tokens, of which
        // 3 are predicted, vs 1 rejected, shared 1.
        let items = vec![tp(0, &[5, 6], &[7, 2], &[8, 9, 10, 2]), tp(1, &[], &[3, 4, 5, 2], &[6, 2])];
        let mask = |batch: &PreferenceBatch| -> Vec<f32> {
            let m = match &batch.rows {
                PairRows::Concatenated(r) => r.loss_mask.clone(),
                PairRows::SharedPrompt(r) => r.loss_mask.clone(),
            };
            m.into_data().try_to_vec::<f32>().unwrap()
        };
        let counts = |batch: &PreferenceBatch| -> Option<Vec<f32>> { batch.token_counts.clone().map(|t| t.into_data().try_to_vec::<f32>().unwrap()) };
        let concat = PreferenceBatcher::new(0, None, Layout::Concatenated).with_ld_alpha(Some(0.25));
        let batch = concat.batch(items.clone(), &device);
        #[rustfmt::skip]
        assert_eq!(mask(&batch), vec![
            0., 0., 1., 1., 0., 0.,
            1., 1., 0.25, 0.25, 0., 0., // column 0 never counts; the 2nd and 3rd predicted tokens are beyond 1
            0., 0., 1., 1., 0.25, 0.25,
            1., 1., 0., 0., 0., 0.,
        ]);
        assert_eq!(counts(&batch), Some(vec![2., 3., 4., 1.]));
        let shared = PreferenceBatcher::new(0, None, Layout::SharedPrompt).with_ld_alpha(Some(0.25));
        let batch = shared.batch(items.clone(), &device);
        assert!(batch.shared().is_some());
        #[rustfmt::skip]
        assert_eq!(mask(&batch), vec![
            1., 1., 0., 0.,
            0., 1., 0.25, 0.25,
            1., 1., 0.25, 0.25,
            0., 1., 0., 0.,
        ]);
        assert_eq!(counts(&batch), Some(vec![2., 3., 4., 1.]));
        // Without LD-DPO the mask is 0 or 1 and the batch carries no counts.
        let plain = PreferenceBatcher::new(0, None, Layout::SharedPrompt).batch(items, &device);
        assert!(plain.token_counts.is_none());
        assert!(mask(&plain).iter().all(|&m| m == 0.0 || m == 1.0));
    }

    #[test]
    fn loader_yields_tensors_of_the_right_shape() {
        let device = Device::default();
        let items: Vec<_> = (0..5).map(|i| tp(i, &[1, 2], &[3; 3], &[4])).collect();
        let loader = preference_loader(items, PreferenceBatcher::new(0, None, Layout::Concatenated), 2, Some(3), 0, &device);
        let batches: Vec<_> = loader.iter().collect::<Result<_, _>>().unwrap();
        assert_eq!(batches.len(), 3);
        assert_eq!(batches[0].concatenated().unwrap().input_ids.dims(), [4, 5]);
        assert_eq!(batches[0].offsets.dims(), [2]);
        assert!(batches[0].weights.is_none());
        let mut ids: Vec<_> = batches.iter().flat_map(|b| b.pair_ids.clone()).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![0, 1, 2, 3, 4]);
    }
}
