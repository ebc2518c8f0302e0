//! Log-probabilities of token sequences: the hot path of preference training.

use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use crate::model::CausalLm;

/// Per-token log-probabilities `[B, T-1]`: entry `t` is `log p(input_ids[t+1] | input_ids[..=t])`.
///
/// Computed as `logit[target] - logsumexp(logits)`, so the `[B, T, V]` log-softmax is never
/// stored. For B×T tokens and a vocabulary V the logits alone cost `4·B·T·V` bytes in f32:
/// 8 sequences × 128 tokens × 49,152 (SmolLM2) is 201 MB, and autodiff keeps them for the backward
/// pass.
pub fn token_logprobs(logits: Tensor<3>, input_ids: Tensor<2, Int>) -> Tensor<2> {
    let [_, t, _] = logits.dims();
    target_logprobs(logits.narrow(1, 0, t - 1), input_ids.narrow(1, 1, t - 1))
}

/// `log softmax(logits)[target]` `[B, N]` for aligned `logits` `[B, N, V]` and `targets` `[B, N]`:
/// `odpo_kernels::token_logprobs`, which on CPU backends reads the logits once and writes their
/// gradient over them in place, never holding a `[B, N, V]` temporary.
fn target_logprobs(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    target_outputs(logits, targets, false).0
}

/// [`target_logprobs`], and with `wpo` also [`log_sum_sq_probs`] of the same logits `[B, N]`.
fn target_outputs(logits: Tensor<3>, targets: Tensor<2, Int>, wpo: bool) -> (Tensor<2>, Option<Tensor<2>>) {
    let [b, n, v] = logits.dims();
    let logits = logits.reshape([b * n, v]);
    // Before the log-probs: on CPU backends their kernel writes the logits' gradient over them in
    // place, which a live handle to the logits would turn into a copy.
    let lsq = wpo.then(|| log_sum_sq_probs(logits.clone()).reshape([b, n]));
    // Low-precision logits are widened inside: log-probabilities summed over a completion need f32,
    // and the backward pass then keeps the logits in the model's dtype, not their f32 copy.
    (odpo_kernels::token_logprobs(logits, targets.reshape([b * n])).reshape([b, n]), lsq)
}

/// Rows of logits handled at once by [`log_sum_sq_probs`]: its f32 temporaries stay near 64 MB each
/// whatever the batch (Llama-3.2-1B's 128,256 entries: 128 rows).
const LSQ_ROW_BYTES: usize = 64 << 20;

/// log Σ_v p_v² of each row of `logits` `[R, V]` (p = softmax of the row), `[R]`, without gradient:
/// the term WPO subtracts from each token's log-prob (TRL's `log_sum_sq_probs`), log Σ_v (e^{l_v − m})² −
/// 2·log Σ_v e^{l_v − m} with m the row's maximum. Built from plain tensor ops, so every backend runs
/// it; rows go through in runs of about 64 MB of f32 so that its temporaries stay small beside
/// the logits.
pub fn log_sum_sq_probs(logits: Tensor<2>) -> Tensor<1> {
    let v = logits.dims()[1];
    log_sum_sq_probs_in_runs(logits, (LSQ_ROW_BYTES / (4 * v.max(1))).max(1))
}

/// [`log_sum_sq_probs`] over `run` rows at a time.
fn log_sum_sq_probs_in_runs(logits: Tensor<2>, run: usize) -> Tensor<1> {
    let r = logits.dims()[0];
    let logits = logits.detach();
    let runs: Vec<Tensor<1>> = (0..r)
        .step_by(run)
        .map(|s| {
            // Widened run by run: half-precision logits get no f32 copy of the whole.
            let z = logits.clone().narrow(0, s, run.min(r - s)).cast(DType::F32);
            // e^{2(l − m)} as the square of e^{l − m}: one exponential a logit, and it underflows
            // exactly where e^{2(l − m)} does (l − m < −43.7 in f32).
            let e = (z.clone() - z.max_dim(1)).exp();
            let lse = e.clone().sum_dim(1).log();
            let lse2 = e.square().sum_dim(1).log();
            let rows = lse.dims()[0];
            (lse2 - lse.mul_scalar(2.0)).reshape([rows])
        })
        .collect();
    if runs.is_empty() { Tensor::zeros([0], &logits.device()) } else { Tensor::cat(runs, 0) }
}

/// `log p(target)` `[B, N]` of final hidden states `hidden` `[B, N, D]` through the LM head, for the
/// aligned `targets` `[B, N]`: `token_logprobs(model.head(hidden))` without the `[B, N, V]` logits
/// in one tensor where the device cannot hold them in one buffer.
///
/// The logits are the largest tensor of a step (Llama-3.2-1B: a token's 128,256 entries are 0.5 MB
/// in f32, 8 pairs of 512 tokens 4.2 GB), and some backends cap one buffer well below their memory
/// ([`odpo_kernels::max_buffer_bytes`]: wgpu's binding limit; 128 MiB on Mesa's lavapipe). There the
/// rows run through the head and the log-softmax in consecutive runs of at most `rows_per_run` rows
/// (by default the most whose f32 logits fit in one buffer), each run's logits a tensor of its own.
/// Gradients flow as through the whole: each run adds its share to the head's weight gradient.
/// Where everything fits (every device but a buffer-capped one, on most steps) it is one call.
pub fn head_logprobs(model: &CausalLm, hidden: Tensor<3>, targets: Tensor<2, Int>, rows_per_run: Option<usize>) -> Tensor<2> {
    head_outputs(model, hidden, targets, rows_per_run, false).0
}

/// [`head_logprobs`], and with `wpo` also WPO's [`log_sum_sq_probs`] of the same logits `[B, N]`
/// (no gradient), so that the head runs once for both.
pub fn head_outputs(model: &CausalLm, hidden: Tensor<3>, targets: Tensor<2, Int>, rows_per_run: Option<usize>, wpo: bool) -> (Tensor<2>, Option<Tensor<2>>) {
    let [b, n, d] = hidden.dims();
    let rows = b * n;
    // The vocabulary is read only where the device caps a buffer (not on every CPU step).
    let capped = || odpo_kernels::max_buffer_bytes(&hidden.device()).map(|bytes| rows_in(bytes, model.vocab_size()));
    let run = rows_per_run.or_else(capped).unwrap_or(rows).max(1);
    if run >= rows {
        return target_outputs(model.head(hidden), targets, wpo);
    }
    // Once per process: where a run's speed or memory looks odd, this is part of why.
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| tracing::info!("the logits of {rows} rows are more than one buffer of the device holds: the LM head runs over {run} rows at a time"));
    let (hidden, targets) = (hidden.reshape([1, rows, d]), targets.reshape([1, rows]));
    let (runs, lsq): (Vec<_>, Vec<_>) = (0..rows)
        .step_by(run)
        .map(|s| {
            let len = run.min(rows - s);
            target_outputs(model.head(hidden.clone().narrow(1, s, len)), targets.clone().narrow(1, s, len), wpo)
        })
        .unzip();
    let lsq = wpo.then(|| Tensor::cat(lsq.into_iter().flatten().collect(), 1).reshape([b, n]));
    (Tensor::cat(runs, 1).reshape([b, n]), lsq)
}

/// How many rows of f32 logits over `vocab` entries one buffer of `device` holds, where its backend
/// caps one buffer ([`odpo_kernels::max_buffer_bytes`]); at least 1. `None`: no cap.
pub fn logit_rows_per_buffer(device: &Device, vocab: usize) -> Option<usize> {
    odpo_kernels::max_buffer_bytes(device).map(|bytes| rows_in(bytes, vocab))
}

/// Rows of f32 logits over `vocab` entries in `bytes`, at least 1.
fn rows_in(bytes: u64, vocab: usize) -> usize {
    usize::try_from(bytes / (4 * vocab.max(1) as u64)).unwrap_or(usize::MAX).max(1)
}

/// [`sequence_logprobs`] of `model` on `input_ids`, with the LM head run only where a prediction
/// counts: from column `first_target - 1` on, `first_target` being the first column whose token
/// is a completion token in some row (a batch's `first_target`; 1 runs the head everywhere).
///
/// The head is the largest matmul of a small model (SmolLM2-135M: 576 × 49,152 per token) and its
/// logits the largest activation, so skipping the prompt columns saves time and memory in
/// proportion to the prompt's share of the batch; the result is the same as
/// `sequence_logprobs(model.forward(..), ..)`.
pub fn completion_logprobs(
    model: &CausalLm,
    input_ids: Tensor<2, Int>,
    attention_mask: &Tensor<2, Int>,
    loss_mask: Tensor<2>,
    first_target: usize,
) -> (Tensor<1>, Tensor<1>) {
    let rows = completion_rows(model, input_ids, attention_mask, loss_mask, first_target, RowExtras::default());
    (rows.sum, rows.count)
}

/// Per-row results of [`completion_rows`] and [`shared_prompt_rows`], each `[R]`.
#[derive(Clone, Debug)]
pub struct RowLogprobs {
    /// Σ_t loss_mask_t · log p(y_t), tracked.
    pub sum: Tensor<1>,
    /// Σ_t loss_mask_t.
    pub count: Tensor<1>,
    /// When asked for: WPO's mean over the row's counted tokens (loss_mask > 0) of
    /// log p(y_t) − log Σ_v p_v(·)², without gradient ([`wpo_row_means`]).
    pub wpo: Option<Tensor<1>>,
    /// When asked for, of a mixture of experts: its routers' load-balancing loss `[1]` over every
    /// real token of the rows, tracked ([`crate::moe::RouterStats::load_balancing_loss`]).
    pub router_aux: Option<Tensor<1>>,
}

/// What [`completion_rows`] and [`shared_prompt_rows`] compute beside the sums and counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RowExtras {
    /// WPO's per-row means ([`RowLogprobs::wpo`]).
    pub wpo: bool,
    /// A mixture of experts' load-balancing loss ([`RowLogprobs::router_aux`]).
    pub router_aux: bool,
}

/// [`completion_logprobs`], and as `extras` asks: each row's [`wpo_row_means`] from the same head
/// call; a mixture of experts' load-balancing loss over every real token of the rows (prompts and
/// completions, as TRL's concatenated forward counts them).
pub fn completion_rows(
    model: &CausalLm,
    input_ids: Tensor<2, Int>,
    attention_mask: &Tensor<2, Int>,
    loss_mask: Tensor<2>,
    first_target: usize,
    extras: RowExtras,
) -> RowLogprobs {
    let [b, t] = loss_mask.dims();
    let mut stats = crate::moe::RouterStats::default();
    let hidden = model.hidden_routed(input_ids.clone(), attention_mask, None, extras.router_aux.then_some((1.0, &mut stats)));
    let router_aux = stats.load_balancing_loss();
    let wpo = extras.wpo;
    if t < 2 {
        let zeros = || Tensor::zeros([b], &loss_mask.device());
        return RowLogprobs { sum: zeros(), count: zeros(), wpo: wpo.then(zeros), router_aux };
    }
    // Hidden state at column c predicts the token at c + 1.
    let start = first_target.clamp(1, t - 1) - 1;
    let n = t - 1 - start;
    let mask = loss_mask.narrow(1, start + 1, n);
    let (lp, lsq) = head_outputs(model, hidden.narrow(1, start, n), input_ids.narrow(1, start + 1, n), None, wpo);
    let wpo = lsq.map(|lsq| wpo_row_means(lp.clone(), lsq, mask.clone()));
    let lp = lp * mask.clone();
    RowLogprobs { sum: lp.sum_dim(1).reshape([b]), count: mask.sum_dim(1).reshape([b]), wpo, router_aux }
}

/// WPO's per-row weight exponent (Zhou et al. 2024, Weighted Preference Optimization, Eq. 3, as TRL's
/// `use_weighting` computes it): the mean over the tokens where `mask` `[R, N]` is positive of
/// log p(y_t) − log Σ_v p_v², from the per-token log-probs `logps` and [`log_sum_sq_probs`] `lsq`
/// (`[R, N]` each). No gradient flows through it. Counting the tokens where the mask is positive keeps
/// LD-DPO's fractional weights out of it, as TRL's 0/1 completion mask does; a row without tokens
/// gives 0.
pub fn wpo_row_means(logps: Tensor<2>, lsq: Tensor<2>, mask: Tensor<2>) -> Tensor<1> {
    let [r, _] = mask.dims();
    let counted = mask.greater_elem(0.0).float();
    let tokens = counted.clone().sum_dim(1).clamp_min(1.0);
    ((logps.detach() - lsq) * counted).sum_dim(1).div(tokens).reshape([r])
}

/// Summed log-probability of the tokens where `loss_mask` is 1, and their count, per sequence.
///
/// `logits` `[B, T, V]` are the model outputs for `input_ids` `[B, T]`; `loss_mask` `[B, T]` is 1
/// on the completion tokens (the first token of a sequence is never predicted, so its mask is
/// ignored) and 0 on the prompt and padding. Nothing is read back to the host.
pub fn sequence_logprobs(logits: Tensor<3>, input_ids: Tensor<2, Int>, loss_mask: Tensor<2>) -> (Tensor<1>, Tensor<1>) {
    let [b, t] = loss_mask.dims();
    let mask = loss_mask.narrow(1, 1, t - 1);
    let lp = token_logprobs(logits, input_ids) * mask.clone();
    (lp.sum_dim(1).reshape([b]), mask.sum_dim(1).reshape([b]))
}

/// Summed completion log-probs and token counts `[2B]` of a preference batch laid out so that each
/// prompt runs through the model once (`odpo_data::SharedPromptRows`): the B prompts `prompt_ids`
/// `[B, P]` left-padded (`prompt_mask`), the 2B completions `completion_ids` `[2B, C]` right-padded
/// (row `r < B` pair r's chosen, row `B + r` its rejected), `full_mask` `[2B, P + C]` the attention
/// mask of a row's prompt and completion, `loss_mask` `[2B, C]` 1.0 on the tokens that count.
///
/// One forward of each shared prompt: the prompts run once (`[B, P]`), their keys and values are repeated
/// for the chosen and the rejected row, and the completions run on top of them (`[2B, C − 1]`;
/// the last token predicts nothing). The result equals [`completion_logprobs`] on the
/// concatenated rows up to float rounding, gradients included (they reach the prompt through the
/// cached keys and values of both rows).
///
/// Against the concatenated `[2B, P + C]` forward this saves the second pass over every prompt:
/// `P / (2 (P + C))` of the transformer's token work, a quarter when prompts are as long as
/// completions. TRL's `DPOTrainer` runs the concatenated forward.
pub fn shared_prompt_logprobs(
    model: &CausalLm,
    prompt_ids: Tensor<2, Int>,
    prompt_mask: &Tensor<2, Int>,
    completion_ids: Tensor<2, Int>,
    full_mask: &Tensor<2, Int>,
    loss_mask: Tensor<2>,
) -> (Tensor<1>, Tensor<1>) {
    let rows = shared_prompt_rows(model, prompt_ids, prompt_mask, completion_ids, full_mask, loss_mask, RowExtras::default());
    (rows.sum, rows.count)
}

/// [`shared_prompt_logprobs`], and as `extras` asks: each row's [`wpo_row_means`] from the same head
/// call; a mixture of experts' load-balancing loss over what the concatenated rows hold (each
/// prompt's routing counted twice, and each completion's last token, which predicts nothing, run
/// for its routing), the value [`completion_rows`] gives on them.
pub fn shared_prompt_rows(
    model: &CausalLm,
    prompt_ids: Tensor<2, Int>,
    prompt_mask: &Tensor<2, Int>,
    completion_ids: Tensor<2, Int>,
    full_mask: &Tensor<2, Int>,
    loss_mask: Tensor<2>,
    extras: RowExtras,
) -> RowLogprobs {
    let [b, p] = prompt_ids.dims();
    let [b2, c] = completion_ids.dims();
    let device = loss_mask.device();
    let count = loss_mask.clone().sum_dim(1).reshape([b2]);
    let wpo = extras.wpo;
    if p == 0 || c == 0 || b2 != 2 * b {
        let zeros = || Tensor::zeros([b2], &device);
        return RowLogprobs { sum: zeros(), count, wpo: wpo.then(zeros), router_aux: None };
    }
    let both: Vec<i64> = (0..b as i64).chain(0..b as i64).collect();
    let both = Tensor::<1, Int>::from_data(TensorData::new(both, [b2]), &device);
    if model.rope_switch().is_some_and(|o| p + c > o) {
        // LongRoPE picks its frequencies by the batch's longest row, which the prompts' pass alone
        // cannot see: the rows run concatenated instead (the same log-probs, the prompt twice).
        let ids = Tensor::cat(vec![prompt_ids.select(0, both), completion_ids], 1);
        let loss_mask = Tensor::cat(vec![Tensor::zeros([b2, p], &device), loss_mask], 1);
        return completion_rows(model, ids, full_mask, loss_mask, p, extras);
    }
    let mut cache = model.new_cache();
    let mut stats = crate::moe::RouterStats::default();
    // Each prompt's routing weighs twice: the concatenated rows hold it twice.
    let hidden = model.hidden_routed(prompt_ids, prompt_mask, Some(&mut cache), extras.router_aux.then_some((2.0, &mut stats)));
    // The last prompt column predicts each completion's first token.
    let mut h = hidden.narrow(1, p - 1, 1).select(0, both.clone());
    // The last completion column predicts nothing; it runs only for its routing.
    let columns = if extras.router_aux { c } else { c - 1 };
    if columns > 0 {
        cache.select_rows(both);
        let ids = completion_ids.clone().narrow(1, 0, columns);
        let completions = model.hidden_routed(ids, &full_mask.clone().narrow(1, 0, p + columns), Some(&mut cache), extras.router_aux.then_some((1.0, &mut stats)));
        if c > 1 {
            h = Tensor::cat(vec![h, completions.narrow(1, 0, c - 1)], 1);
        }
    }
    // One head call for every predicting column (where one buffer holds the logits): with a tied
    // embedding, each call's backward writes a vocabulary-sized weight gradient that autodiff then
    // adds to the others.
    let (lp, lsq) = head_outputs(model, h, completion_ids, None, wpo);
    let wpo = lsq.map(|lsq| wpo_row_means(lp.clone(), lsq, loss_mask.clone()));
    RowLogprobs { sum: (lp * loss_mask).sum_dim(1).reshape([b2]), count, wpo, router_aux: stats.load_balancing_loss() }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// f64 by hand: log Σ_v softmax(row)_v².
    fn by_hand(row: &[f32]) -> f64 {
        let m = row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(f64::from(x)));
        let lse = m + row.iter().map(|&x| (f64::from(x) - m).exp()).sum::<f64>().ln();
        row.iter().map(|&x| (2.0 * (f64::from(x) - lse)).exp()).sum::<f64>().ln()
    }

    /// Rows of every kind (flat, sharp, far below the maximum, where e^{2z} underflows), in one run and
    /// in runs of 3 rows, in f32 and from bf16 logits (widened run by run), against f64 by hand.
    #[test]
    fn log_sum_sq_probs_by_hand_in_runs_and_from_bf16() {
        let device = Device::default();
        let (r, v) = (7, 50);
        let data: Vec<f32> = (0..r * v)
            .map(|i| {
                let (row, col) = (i / v, i % v);
                match row {
                    0 => 0.0,
                    1 if col == 3 => 30.0,
                    2 => -60.0 * (col % 2) as f32,
                    _ => ((i * 7919) % 1000) as f32 / 100.0 - 5.0 * row as f32,
                }
            })
            .collect();
        let logits = Tensor::<2>::from_data(TensorData::new(data.clone(), [r, v]), &device);
        let half = logits.clone().cast(DType::BF16);
        let rounded: Vec<f32> = half.clone().cast(DType::F32).into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
        for (what, logits, values) in [("f32", logits.clone(), &data), ("bf16", half, &rounded)] {
            for run in [r, 3] {
                let got: Vec<f32> = log_sum_sq_probs_in_runs(logits.clone(), run).into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
                assert_eq!(got.len(), r);
                for (i, g) in got.iter().enumerate() {
                    let want = by_hand(&values[i * v..(i + 1) * v]);
                    assert!((f64::from(*g) - want).abs() < 1e-5 * want.abs().max(1.0), "{what}, runs of {run}, row {i}: {g} vs {want}");
                }
            }
        }
        // The flat row: log(1/V); the sharp one: log 1 = 0 (to f32 precision).
        assert!((by_hand(&data[..v]) - (1.0 / v as f64).ln()).abs() < 1e-12);
        assert!(by_hand(&data[v..2 * v]).abs() < 1e-9);
    }
}
