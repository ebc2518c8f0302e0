//! What a run's training state takes in host memory, checked before the first step where the
//! device keeps its tensors there (flex, libtorch's CPU).
//!
//! There, a step that does not fit does not fail with an error: Rust's allocator ends the process,
//! or Linux's out-of-memory killer does, after the model has loaded and minutes have gone. So once
//! the model is loaded (its weights already counted in what the system has left), the state a step
//! adds on top of them is counted, a lower bound, and a run that can never fit is refused with
//! what to change:
//! - a gradient for each trained parameter (f32, as the weights the optimizer keeps);
//! - the optimizer's state: AdamW's two moments; RMSprop's running square, and its momentum and mean
//!   gradient where asked. From the second step on it is held beside the step's gradients; a run
//!   of one step holds the larger of the two;
//! - a frozen reference's own weights: in full fine-tuning in f32 the reference shares the policy's
//!   weights until the first update writes new ones, so from then on it holds a copy of every
//!   trained weight; in half precision it is a cast copy of the model's float weights (a
//!   quantised base stays as it is) from the start.
//!   With LoRA in f32 it shares the frozen base; a cached reference is dropped once its pass is
//!   done;
//! - the logits of a forward pass: a training micro-batch's (2 rows a pair, 1 in SFT) from the
//!   second step on beside the optimizer's state and the reference, and an evaluation batch's;
//!   each row as wide as the batch's longest completion at least, times the vocabulary, in the
//!   compute dtype;
//! - beside a training micro-batch's logits, what its forward pass keeps through the layers for
//!   the backward pass: the attention's query, key and value, the MLP's hidden units, in full
//!   fine-tuning the products' inputs, and without gradient checkpointing the norms' inputs
//!   ([`odpo_model::ModelConfig::backward_kept_per_token`]; under LoRA, the layers after the
//!   first), for each token the layers see ([`Pass::of`]: a micro-batch is padded to its longest
//!   pair, and holds at least so many different pairs). On a model of a real vocabulary this is
//!   several times the logits.
//!
//! The norms' and the activation functions' other records come on top and are not counted: a run
//! refused here could never finish its steps, and one let through may still not fit its batch.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{DType, Device, Tensor};
use odpo_model::out_of_memory::human_bytes;
use odpo_model::{CausalLm, Precision};

use crate::config::{OptimConfig, OptimizerKind};
use crate::error::{Result, TrainError};

/// What a run keeps beside its loaded model, and how it trains it.
pub(crate) struct TrainingState<'a> {
    /// The optimizer and its options.
    pub optim: &'a OptimConfig,
    /// Whether a frozen reference is made from the policy's starting weights.
    pub frozen_reference: bool,
    /// Whether LoRA adapters train (the base frozen, shared with the reference).
    pub lora: bool,
    /// The compute precision (a half-precision reference is a cast copy).
    pub precision: Precision,
    /// Whether the run takes more than one optimizer step (or resumes one, with its optimizer
    /// state): from the second step on, a step's gradients and the optimizer's state are all held at
    /// once; the first step's update turns gradients into state as it goes.
    pub more_than_one_step: bool,
    /// A training micro-batch's forward pass.
    pub train: Pass,
    /// An evaluation batch's forward pass (no rows where the run does not evaluate); it keeps
    /// nothing for a backward pass.
    pub eval: Pass,
    /// The values a training forward pass keeps for its backward pass per token the layers see
    /// ([`odpo_model::ModelConfig::backward_kept_per_token`]).
    pub kept_per_token: u64,
    /// How the advice names the settings to change: config keys, or a command's flags.
    pub names: AdviceNames,
}

/// The shape of one forward pass, a lower bound: its logits are `rows × width × vocab` in the
/// compute dtype, and its layers see `tokens` tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Pass {
    /// Rows: 2 a pair (chosen and rejected), 1 in SFT.
    pub rows: u64,
    /// Predicted tokens a row, at least: the head runs on every column where some row of the batch
    /// has a completion token, so on the batch's longest completion at least.
    pub width: u64,
    /// Tokens through the layers, at least: each row's predicted ones, and each pair's prompt once
    /// (the shared-prompt layout runs it once; the concatenated rows twice).
    pub tokens: u64,
}

impl Pass {
    /// A batch of `pairs` pairs from `all`, at least `distinct` of them different pairs, each as 2
    /// rows (`preference`) or 1. A batch is padded to its longest pair, so each of its lengths is
    /// at least the `distinct`-th shortest of that length among `all`: its completions, its
    /// prompts (the shared-prompt layout pads them apart), and, for the concatenated rows, prompt
    /// and completion together. The layers see the fewer tokens of the two layouts.
    pub fn of(all: &[odpo_data::TokenizedPair], pairs: usize, distinct: usize, preference: bool) -> Self {
        let k = distinct.clamp(1, all.len().max(1));
        // Empty only where `all` is.
        let kth = |mut lengths: Vec<usize>| -> u64 { if lengths.len() < k { 0 } else { *lengths.select_nth_unstable(k - 1).1 as u64 } };
        let completion = |p: &odpo_data::TokenizedPair| if preference { p.chosen.len().max(p.rejected.len()) } else { p.chosen.len() };
        let width = kth(all.iter().map(completion).collect());
        let prompt = kth(all.iter().map(|p| p.prompt.len()).collect());
        let whole = kth(all.iter().map(|p| p.prompt.len() + completion(p)).collect());
        let (pairs, rows) = (pairs as u64, pairs as u64 * if preference { 2 } else { 1 });
        let shared = rows.saturating_mul(width).saturating_add(pairs.saturating_mul(prompt));
        let tokens = if preference { shared.min(rows.saturating_mul(whole)) } else { rows.saturating_mul(whole) };
        Self { rows, width, tokens }
    }

    /// The widest of the batches an evaluation runs, `all` in order `batch` pairs at a time: each
    /// of them exactly, so the one whose logits are the largest.
    pub fn widest_batch(all: &[odpo_data::TokenizedPair], batch: usize, preference: bool) -> Self {
        all.chunks(batch.max(1)).map(|chunk| Self::of(chunk, chunk.len(), chunk.len(), preference)).max_by_key(|p| p.rows.saturating_mul(p.width)).unwrap_or_default()
    }

    fn logit_bytes(self, vocab: u64, dtype_bytes: u64) -> u64 {
        self.rows.saturating_mul(self.width).saturating_mul(vocab).saturating_mul(dtype_bytes)
    }
}

/// The settings an error's advice names.
pub(crate) struct AdviceNames {
    /// Training LoRA adapters.
    pub lora: &'static str,
    /// The cached reference.
    pub cached_reference: &'static str,
    /// A smaller training micro-batch.
    pub micro_batch: &'static str,
    /// A smaller evaluation batch, where there is one to lower.
    pub eval_batch: Option<&'static str>,
}

/// A run's config keys.
pub(crate) const RUN_KEYS: AdviceNames = AdviceNames {
    lora: "train LoRA adapters (`[lora]`)",
    cached_reference: "set `train.reference = \"cached\"`",
    micro_batch: "lower `train.micro_batch_size`",
    eval_batch: Some("lower `eval.batch_size`"),
};
/// `odpo bench`'s flags.
pub(crate) const BENCH_FLAGS: AdviceNames = AdviceNames {
    lora: "train LoRA adapters (`--lora RANK`)",
    cached_reference: "cache the reference (`--cached-reference`)",
    micro_batch: "lower `--pairs` or `--seq`",
    eval_batch: None,
};

/// The state's bytes, each part a lower bound.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Need {
    trained: u64,
    gradients: u64,
    optimizer: u64,
    /// The optimizer's buffers, in words: "AdamW's two moments".
    optimizer_buffers: String,
    reference: u64,
    train_logits: u64,
    /// What a training micro-batch's forward pass keeps through the layers for its backward.
    train_kept: u64,
    eval_logits: u64,
    /// Whether gradients and optimizer state are held at once (a second step).
    together: bool,
}

impl Need {
    /// From the second step on, a step holds the optimizer's state and the reference's copy beside
    /// its activations (the logits and what the layers keep) and then its gradients; a single step,
    /// its activations, then its gradients, then the state its update turns them into beside the
    /// reference's copy. An evaluation holds its logits (the first one, at step 0, nothing of the
    /// training state).
    fn total(&self) -> u64 {
        let (g, o, r) = (self.gradients, self.optimizer, self.reference);
        let a = self.train_activations();
        let step = if self.together { o.saturating_add(r).saturating_add(g.max(a)) } else { a.max(g.max(o).saturating_add(r)) };
        step.max(self.eval_logits)
    }

    fn train_activations(&self) -> u64 {
        self.train_logits.saturating_add(self.train_kept)
    }
}

/// The state of a run training `trained` weights of a model with `float` weights held as floats
/// and a vocabulary of `vocab`.
fn need(trained: u64, float: u64, vocab: u64, state: &TrainingState<'_>) -> Need {
    let f32_copy = trained.saturating_mul(4);
    let (buffers, words) = match state.optim.optimizer {
        OptimizerKind::Adamw => (2, "AdamW's two moments".to_string()),
        OptimizerKind::Rmsprop => {
            let momentum = state.optim.momentum.is_some_and(|m| m > 0.0);
            let centered = state.optim.centered.unwrap_or(false);
            let words = match (momentum, centered) {
                (false, false) => "RMSprop's running square",
                (true, false) => "RMSprop's running square and momentum",
                (false, true) => "RMSprop's running square and mean gradient",
                (true, true) => "RMSprop's running square, momentum and mean gradient",
            };
            (1 + u64::from(momentum) + u64::from(centered), words.to_string())
        }
    };
    let reference = match (state.frozen_reference, state.precision, state.lora) {
        (false, _, _) => 0,
        // The cast leaves a quantised base's weights as they are.
        (true, Precision::F16 | Precision::Bf16, _) => float.saturating_mul(2),
        (true, Precision::F32, true) => 0,
        (true, Precision::F32, false) => f32_copy,
    };
    let dtype_bytes = if state.precision == Precision::F32 { 4 } else { 2 };
    Need {
        trained,
        gradients: f32_copy,
        optimizer: f32_copy.saturating_mul(buffers),
        optimizer_buffers: words,
        reference,
        train_logits: state.train.logit_bytes(vocab, dtype_bytes),
        train_kept: state.train.tokens.saturating_mul(state.kept_per_token).saturating_mul(dtype_bytes),
        eval_logits: state.eval.logit_bytes(vocab, dtype_bytes),
        together: state.more_than_one_step,
    }
}

/// Refuses a run whose training state cannot fit in the host memory left after `policy` loaded, on
/// a device that keeps its tensors there; elsewhere, or where the system does not say what is
/// free, nothing is checked.
pub(crate) fn check(policy: &CausalLm, state: &TrainingState<'_>, device: &Device) -> Result<()> {
    if !odpo_model::backend::in_host_memory(device) {
        return Ok(());
    }
    let trained = trainable_params(policy) as u64;
    let vocab = policy.vocab_size() as u64;
    check_against(need(trained, float_params(policy), vocab, state), state, odpo_model::out_of_memory::host_free_bytes())
}

/// The weights held as floats: all but a quantised base's, which a half-precision cast leaves as
/// they are.
fn float_params(model: &CausalLm) -> u64 {
    struct Count(u64);
    impl ModuleVisitor for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !matches!(param.val().dtype(), DType::QFloat(_)) {
                self.0 += param.lazy_shape().num_elements() as u64;
            }
        }
    }
    let mut count = Count(0);
    model.visit(&mut count);
    count.0
}

fn check_against(need: Need, state: &TrainingState<'_>, free: Option<u64>) -> Result<()> {
    let Some(free) = free else { return Ok(()) };
    if need.total() <= free {
        return Ok(());
    }
    let millions = need.trained as f64 / 1e6;
    // A single step holds its gradients and then the state its update turns them into.
    let then = if need.together { "" } else { "then " };
    let mut parts = vec![format!("their gradients {}", human_bytes(need.gradients)), format!("{then}{} {}", need.optimizer_buffers, human_bytes(need.optimizer))];
    if need.reference > 0 {
        let copy = if state.precision == Precision::F32 { "own copy of the trained weights" } else { "cast copy of the model" };
        parts.push(format!("the frozen reference's {copy} {}", human_bytes(need.reference)));
    }
    let logits = |l: Pass, of: &str, bytes: u64| format!("the logits of {of} ({} rows of {} tokens or more) {}", l.rows, l.width, human_bytes(bytes));
    let mut activations = Vec::new();
    if need.train_logits > 0 {
        activations.push(logits(state.train, "a micro-batch", need.train_logits));
    }
    if need.train_kept > 0 {
        activations.push(format!("what its layers keep for the backward pass ({} tokens or more) {}", state.train.tokens, human_bytes(need.train_kept)));
    }
    if need.eval_logits > 0 {
        activations.push(logits(state.eval, "an evaluation batch", need.eval_logits));
    }
    let activations = if activations.is_empty() { String::new() } else { format!("; {}", activations.join(", ")) };
    let message = format!(
        "the training state needs at least {} beside the loaded model ({millions:.1} million trained parameters: {}{activations}), and this machine has {} free (memory and swap)",
        human_bytes(need.total()),
        parts.join(", "),
        human_bytes(free)
    );
    // Only what lowers the part that does not fit.
    let mut advice = Vec::new();
    if need.eval_logits > free && let Some(eval_batch) = state.names.eval_batch {
        advice.push(eval_batch);
    }
    if (Need { eval_logits: 0, ..need.clone() }).total() > free {
        if need.train_activations() > need.gradients {
            advice.push(state.names.micro_batch);
        }
        if !state.lora {
            advice.push(state.names.lora);
        }
        if need.reference > 0 {
            advice.push(state.names.cached_reference);
        }
    }
    advice.push("run on a GPU backend");
    Err(TrainError::HostMemory { message, advice: format!("to fit, {}", advice.join(", or ")) })
}

/// The number of parameters that receive gradients (all of them, or the adapters with LoRA).
pub fn trainable_params(model: &CausalLm) -> usize {
    struct Count(usize);
    impl burn::module::ModuleVisitor for Count {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<burn::tensor::Tensor<D>>) {
            if param.is_require_grad() {
                self.0 += param.lazy_shape().num_elements();
            }
        }
    }
    let mut c = Count(0);
    model.visit(&mut c);
    c.0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn state(optim: &OptimConfig, frozen_reference: bool, lora: bool, precision: Precision) -> TrainingState<'_> {
        TrainingState { optim, frozen_reference, lora, precision, more_than_one_step: true, train: Pass::default(), eval: Pass::default(), kept_per_token: 0, names: RUN_KEYS }
    }

    /// Llama-3.2-1B's vocabulary.
    const V: u64 = 128_256;

    #[test]
    fn the_state_of_each_kind_of_run_is_counted() {
        let adamw = OptimConfig { optimizer: OptimizerKind::Adamw, ..OptimConfig::default() };
        let rmsprop = OptimConfig { optimizer: OptimizerKind::Rmsprop, momentum: Some(0.9), centered: Some(true), ..OptimConfig::default() };
        let plain_rmsprop = OptimConfig { optimizer: OptimizerKind::Rmsprop, momentum: Some(0.0), ..OptimConfig::default() };
        // Llama-3.2-1B: 1,235,814,400 weights, all trained.
        let n = 1_235_814_400u64;
        // Full fine-tuning in f32 with a frozen reference: gradients, two moments and the reference's
        // copy, four f32 copies beside the policy's own (the five PyTorch's step was killed at).
        let full = need(n, n, V, &state(&adamw, true, false, Precision::F32));
        assert_eq!((full.gradients, full.optimizer, full.reference, full.total()), (4 * n, 8 * n, 4 * n, 16 * n));
        // A cached reference leaves the copy out.
        assert_eq!(need(n, n, V, &state(&adamw, false, false, Precision::F32)).total(), 12 * n);
        // LoRA in f32: 11.3 M adapter weights; the reference shares the base.
        let a = 11_272_192u64;
        assert_eq!(need(a, n + a, V, &state(&adamw, true, true, Precision::F32)).total(), 12 * a);
        // In bf16 the reference is a cast copy of every weight, two bytes each.
        assert_eq!(need(a, n + a, V, &state(&adamw, true, true, Precision::Bf16)).reference, 2 * (n + a));
        // A single step turns its gradients into the moments as its update goes.
        let one = TrainingState { more_than_one_step: false, ..state(&adamw, false, false, Precision::F32) };
        assert_eq!(need(n, n, V, &one).total(), 8 * n);
        let err = check_against(need(n, n, V, &one), &one, Some(1)).unwrap_err().to_string();
        assert!(err.contains("(1235.8 million trained parameters: their gradients 4.6 GiB, then AdamW's two moments 9.2 GiB)"), "{err}");
        // RMSprop keeps one buffer, and one more for each of momentum and centring.
        assert_eq!(need(n, n, V, &state(&rmsprop, false, false, Precision::F32)).optimizer, 12 * n);
        assert_eq!(need(n, n, V, &state(&plain_rmsprop, false, false, Precision::F32)).optimizer, 4 * n);
    }

    #[test]
    fn the_logits_of_a_micro_batch_and_an_evaluation_batch_are_counted() {
        let pair = |c: usize, r: usize| odpo_data::TokenizedPair { pair_id: 0, prompt: vec![1; 3], chosen: vec![4; c], rejected: vec![5; r], offset: 0.0, weight: None };
        let pairs = [pair(5, 9), pair(7, 3)];
        // Each batch is as wide as its longest row at least: the narrowest pair's longer row, 7; its
        // layers see that on each row and a prompt of 3 a pair: 8 · 7 + 4 · 3.
        assert_eq!(Pass::of(&pairs, 4, 1, true), Pass { rows: 8, width: 7, tokens: 68 });
        assert_eq!(Pass::of(&pairs, 4, 1, false), Pass { rows: 4, width: 5, tokens: 32 });
        assert_eq!(Pass::of(&[], 4, 1, true), Pass { rows: 8, width: 0, tokens: 0 });
        // An evaluation's batches, in order: the wider of [5, 9] and [7, 3], then [5, 9] alone.
        assert_eq!(Pass::widest_batch(&[pairs[1].clone(), pairs[0].clone()], 1, true), Pass { rows: 2, width: 9, tokens: 2 * 9 + 3 });
        assert_eq!(Pass::widest_batch(&[pairs[0].clone(), pairs[1].clone(), pairs[0].clone()], 2, true), Pass { rows: 4, width: 9, tokens: 4 * 9 + 2 * 3 });
        assert_eq!(Pass::widest_batch(&[], 2, true), Pass::default());
        // With both pairs in the batch: the longest completion, 9, and prompts of 3.
        assert_eq!(Pass::of(&pairs, 4, 2, true), Pass { rows: 8, width: 9, tokens: 8 * 9 + 4 * 3 });
        // A long prompt with a short completion beside a short prompt with a long one: the shared
        // prompt pads prompts and completions apart, 4 · 10 + 8 · 10; the concatenated rows are as
        // long as the longer pair, 11: 8 · 11 = 88, the fewer.
        let pair_of = |p: usize, c: usize| odpo_data::TokenizedPair { prompt: vec![1; p], chosen: vec![4; c], rejected: vec![5; c], ..pairs[0].clone() };
        assert_eq!(Pass::of(&[pair_of(10, 1), pair_of(1, 10)], 4, 2, true), Pass { rows: 8, width: 10, tokens: 88 });
        assert_eq!(Pass::of(&[pair_of(10, 1), pair_of(10, 10)], 4, 2, true), Pass { rows: 8, width: 10, tokens: 4 * 10 + 8 * 10 });

        let adamw = OptimConfig { optimizer: OptimizerKind::Adamw, ..OptimConfig::default() };
        // LoRA's 11.3 M adapter weights under micro-batches of 32 pairs of 100 tokens or more:
        // 64 × 100 × 128,256 f32 logits, 3.1 GiB, beside the moments from the second step on.
        let a = 11_272_192u64;
        let mut run = TrainingState { train: Pass { rows: 64, width: 100, tokens: 64 * 100 }, ..state(&adamw, true, true, Precision::F32) };
        let logits = 64 * 100 * V * 4;
        assert_eq!(need(a, a, V, &run).total(), 8 * a + logits);
        let err = check_against(need(a, a, V, &run), &run, Some(2 << 30)).unwrap_err().to_string();
        assert!(
            err.ends_with(
                "(11.3 million trained parameters: their gradients 43.0 MiB, AdamW's two moments 86.0 MiB; the logits of a micro-batch (64 rows of 100 tokens or more) 3.1 GiB), \
                 and this machine has 2.0 GiB free (memory and swap); to fit, lower `train.micro_batch_size`, or run on a GPU backend"
            ),
            "{err}"
        );
        // An evaluation batch of 64 pairs: twice those logits, alone, where the step fits.
        run.eval = Pass { rows: 128, width: 100, tokens: 128 * 100 };
        assert_eq!(need(a, a, V, &run).total(), 2 * logits);
        let err = check_against(need(a, a, V, &run), &run, Some(4 << 30)).unwrap_err().to_string();
        assert!(err.ends_with("and this machine has 4.0 GiB free (memory and swap); to fit, lower `eval.batch_size`, or run on a GPU backend"), "{err}");
        // A single step holds its logits before its gradients and the update's state.
        run.more_than_one_step = false;
        run.eval = Pass::default();
        assert_eq!(need(a, a, V, &run).total(), logits);
    }

    /// What a micro-batch's layers keep comes beside its logits.
    #[test]
    fn what_the_layers_keep_for_the_backward_pass_is_counted_in_full_fine_tuning() {
        let json = serde_json::json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3});
        let smollm2 = odpo_model::ModelConfig::from_hf_json(&json, "smollm2".as_ref()).unwrap();
        // 30 layers × (the attention's q, k, v and output: 576 + 2 · 192 + 576; gate and up: 2 · 1536;
        // the norms' outputs and inputs 4 · 576 and down's input 1536).
        assert_eq!(smollm2.backward_kept_per_token(false, false), 30 * (4608 + 3840));
        // Checkpointed: the two projections into the residual stream in place of those.
        assert_eq!(smollm2.backward_kept_per_token(true, false), 30 * (4608 + 2 * 576));
        // LoRA: the layers after the first, without the products' inputs.
        assert_eq!(smollm2.backward_kept_per_token(false, true), 29 * (576 + 2 * 192 + 2 * 1536 + 2 * 576));
        let pair = odpo_data::TokenizedPair { pair_id: 0, prompt: vec![1; 64], chosen: vec![4; 64], rejected: vec![5; 40], offset: 0.0, weight: None };
        let adamw = OptimConfig { optimizer: OptimizerKind::Adamw, ..OptimConfig::default() };
        // 8 pairs: 16 rows of 64 completion tokens and 8 prompts of 64, 1,536 tokens.
        let run = TrainingState { train: Pass::of(&[pair], 8, 1, true), kept_per_token: 253_440, ..state(&adamw, false, false, Precision::F32) };
        let n = 134_515_008u64;
        let (logits, kept) = (16 * 64 * 49_152 * 4, 1536 * 253_440 * 4);
        let full = need(n, n, 49_152, &run);
        assert_eq!((full.train_logits, full.train_kept), (logits, kept));
        // The moments beside the activations, which outweigh the gradients.
        assert_eq!(full.total(), 8 * n + logits + kept);
        let err = check_against(full, &run, Some(1 << 30)).unwrap_err().to_string();
        assert!(
            err.contains("the logits of a micro-batch (16 rows of 64 tokens or more) 192.0 MiB, what its layers keep for the backward pass (1536 tokens or more) 1.5 GiB)"),
            "{err}"
        );
        assert!(err.ends_with("to fit, lower `train.micro_batch_size`, or train LoRA adapters (`[lora]`), or run on a GPU backend"), "{err}");
        // In bf16, two bytes a value.
        let half = TrainingState { precision: Precision::Bf16, ..run };
        assert_eq!(need(n, n, 49_152, &half).train_kept, kept / 2);
    }

    #[test]
    fn a_quantised_bases_weights_are_not_counted_in_a_half_precision_copy() {
        let device = odpo_model::backend::device("flex").unwrap();
        let json = serde_json::json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 16, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1});
        let config = odpo_model::ModelConfig::from_hf_json(&json, "tiny".as_ref()).unwrap();
        let plain = CausalLm::random_with(&config, 0, &device, false).unwrap();
        let quantized = CausalLm::random_with(&config, 0, &device, true).unwrap();
        assert_eq!(float_params(&plain), plain.num_params() as u64);
        // q and o 32·32, k and v 32·16, gate and up 32·64, down 64·32: 9,216 projection weights.
        assert_eq!(float_params(&quantized), plain.num_params() as u64 - 9216);
    }

    #[test]
    fn a_state_beyond_the_free_memory_is_refused_with_what_to_change() {
        let adamw = OptimConfig { optimizer: OptimizerKind::Adamw, ..OptimConfig::default() };
        let n = 1_235_814_400u64;
        let full = state(&adamw, true, false, Precision::F32);
        assert!(check_against(need(n, n, V, &full), &full, Some(16 * n)).is_ok());
        assert!(check_against(need(n, n, V, &full), &full, None).is_ok());
        let err = check_against(need(n, n, V, &full), &full, Some(16 * n - 1)).unwrap_err().to_string();
        assert_eq!(
            err,
            "not enough host memory: the training state needs at least 18.4 GiB beside the loaded model (1235.8 million trained parameters: \
             their gradients 4.6 GiB, AdamW's two moments 9.2 GiB, the frozen reference's own copy of the trained weights 4.6 GiB), and this machine has 18.4 GiB free \
             (memory and swap); to fit, train LoRA adapters (`[lora]`), or set `train.reference = \"cached\"`, or run on a GPU backend"
        );
        // Only the changes the run has not made are offered.
        let lora = state(&adamw, false, true, Precision::F32);
        let err = check_against(need(n, n, V, &lora), &lora, Some(1)).unwrap_err().to_string();
        assert!(err.ends_with("(memory and swap); to fit, run on a GPU backend"), "{err}");
    }
}
