//! Log-probabilities of token sequences: the hot path of preference training.

use burn::tensor::{Device, Int, Tensor, TensorData};

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
    let [b, n, v] = logits.dims();
    // Low-precision logits are widened inside: log-probabilities summed over a completion need f32,
    // and the backward pass then keeps the logits in the model's dtype, not their f32 copy.
    odpo_kernels::token_logprobs(logits.reshape([b * n, v]), targets.reshape([b * n])).reshape([b, n])
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
    let [b, n, d] = hidden.dims();
    let rows = b * n;
    // The vocabulary is read only where the device caps a buffer (not on every CPU step).
    let capped = || odpo_kernels::max_buffer_bytes(&hidden.device()).map(|bytes| rows_in(bytes, model.vocab_size()));
    let run = rows_per_run.or_else(capped).unwrap_or(rows).max(1);
    if run >= rows {
        return target_logprobs(model.head(hidden), targets);
    }
    // Once per process: where a run's speed or memory looks odd, this is part of why.
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| tracing::info!("the logits of {rows} rows are more than one buffer of the device holds: the LM head runs over {run} rows at a time"));
    let (hidden, targets) = (hidden.reshape([1, rows, d]), targets.reshape([1, rows]));
    let runs = (0..rows)
        .step_by(run)
        .map(|s| {
            let len = run.min(rows - s);
            target_logprobs(model.head(hidden.clone().narrow(1, s, len)), targets.clone().narrow(1, s, len))
        })
        .collect();
    Tensor::cat(runs, 1).reshape([b, n])
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
    let [b, t] = loss_mask.dims();
    let hidden = model.hidden(input_ids.clone(), attention_mask, None);
    if t < 2 {
        return (Tensor::zeros([b], &loss_mask.device()), Tensor::zeros([b], &loss_mask.device()));
    }
    // Hidden state at column c predicts the token at c + 1.
    let start = first_target.clamp(1, t - 1) - 1;
    let n = t - 1 - start;
    let mask = loss_mask.narrow(1, start + 1, n);
    let lp = head_logprobs(model, hidden.narrow(1, start, n), input_ids.narrow(1, start + 1, n), None) * mask.clone();
    (lp.sum_dim(1).reshape([b]), mask.sum_dim(1).reshape([b]))
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
    let [b, p] = prompt_ids.dims();
    let [b2, c] = completion_ids.dims();
    let device = loss_mask.device();
    let count = loss_mask.clone().sum_dim(1).reshape([b2]);
    if p == 0 || c == 0 || b2 != 2 * b {
        return (Tensor::zeros([b2], &device), count);
    }
    let mut cache = model.new_cache();
    let hidden = model.hidden(prompt_ids, prompt_mask, Some(&mut cache));
    let both: Vec<i64> = (0..b as i64).chain(0..b as i64).collect();
    let both = Tensor::<1, Int>::from_data(TensorData::new(both, [b2]), &device);
    // The last prompt column predicts each completion's first token.
    let mut h = hidden.narrow(1, p - 1, 1).select(0, both.clone());
    if c > 1 {
        cache.select_rows(both);
        let ids = completion_ids.clone().narrow(1, 0, c - 1);
        let completions = model.hidden(ids, &full_mask.clone().narrow(1, 0, p + c - 1), Some(&mut cache));
        h = Tensor::cat(vec![h, completions], 1);
    }
    // One head call for every predicting column (where one buffer holds the logits): with a tied
    // embedding, each call's backward writes a vocabulary-sized weight gradient that autodiff then
    // adds to the others.
    let lp = head_logprobs(model, h, completion_ids, None);
    ((lp * loss_mask).sum_dim(1).reshape([b2]), count)
}
