//! GPT-Neo (Black et al. 2021, "GPT-Neo: Large Scale Autoregressive Language Modeling with
//! Mesh-Tensorflow", zenodo 5297715), following HF transformers' `models/gpt_neo/modeling_gpt_neo.py`:
//! GPT-2's block (pre-LayerNorm, learned absolute positions, `gelu_new` MLP, LM head tied to the
//! token embeddings) with separate q/k/v projections without bias, an `out_proj` with bias, **no**
//! 1/√d scaling of the attention scores, and layers alternating between global attention and
//! local attention, where a query at index i sees only keys j with `i - j < window_size`.
//!
//! Tested against transformers on a tiny random GPT-Neo whose window is shorter than the
//! sequences (`tests/fixtures/gpt_neo_local`).

use burn::module::{Module, Param};
use burn::nn::{Embedding, LayerNorm};
use crate::linear::Linear;
use burn::tensor::activation::{gelu, gelu_approximate};
use burn::tensor::{Bool, Device, Int, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::layers::{KvCache, attention_mask, embed, grouped_attention, linear_3d, merge_heads, positions, sliding_window_mask, split_heads, tied_head};
use crate::names::{self, Slot, Table};
use crate::weights::Weights;

/// GPT-Neo's `config.json`, with HF's key names (extra keys are ignored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GptNeoConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Maximum sequence length (learned position table size).
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Number of blocks.
    pub num_layers: usize,
    /// Number of attention heads.
    pub num_heads: usize,
    /// Layer kinds as `[[["global", "local"], n], ...]`: each pattern repeated `n` times, in order.
    #[serde(default = "default_attention_types")]
    pub attention_types: Value,
    /// Keys a local layer's query sees: itself and the `window_size - 1` before it.
    #[serde(default = "default_window")]
    pub window_size: usize,
    /// MLP width; `null` means `4 * hidden_size`.
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    /// MLP activation; `gelu_new` (tanh approximation) or `gelu`.
    #[serde(default = "default_activation")]
    pub activation_function: String,
    /// LayerNorm epsilon.
    #[serde(default = "default_ln_eps")]
    pub layer_norm_epsilon: f64,
    /// Whether the LM head shares the token embedding matrix (GPT-Neo's checkpoints do).
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token.
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// Padding token, written back as read.
    #[serde(default)]
    pub pad_token_id: Option<Value>,
}

fn default_max_pos() -> usize {
    2048
}
fn default_attention_types() -> Value {
    serde_json::json!([[["global", "local"], 12]])
}
fn default_window() -> usize {
    256
}
fn default_activation() -> String {
    "gelu_new".into()
}
fn default_ln_eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}

impl GptNeoConfig {
    /// Whether each layer is local, expanded from `attention_types` as transformers'
    /// `expand_attention_types_params` does; an error names anything malformed.
    pub fn local_layers(&self, path: &std::path::Path) -> Result<Vec<bool>> {
        let bad = |why: &str| ModelError::config(path, format!("attention_types: {why}; expected [[[\"global\", \"local\"], n], ...]"));
        let mut out = Vec::new();
        for item in self.attention_types.as_array().ok_or_else(|| bad("not a list"))? {
            let kinds = item.get(0).and_then(Value::as_array).ok_or_else(|| bad("an entry has no list of kinds"))?;
            let n = item.get(1).and_then(Value::as_u64).ok_or_else(|| bad("an entry has no repeat count"))?;
            for _ in 0..n {
                for k in kinds {
                    match k.as_str() {
                        Some("global") => out.push(false),
                        Some("local") => out.push(true),
                        _ => return Err(bad(&format!("unknown layer kind {k}"))),
                    }
                }
            }
        }
        if out.len() != self.num_layers {
            return Err(bad(&format!("gives {} layers but num_layers is {}", out.len(), self.num_layers)));
        }
        Ok(out)
    }

    fn inner(&self) -> usize {
        self.intermediate_size.unwrap_or(4 * self.hidden_size)
    }
}

#[derive(Module, Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    n_heads: usize,
    /// `Some(window_size)` on local layers.
    window: Option<usize>,
}

#[derive(Module, Debug)]
struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
    exact_gelu: bool,
}

#[derive(Module, Debug)]
struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

/// A GPT-Neo language model (`GPTNeoForCausalLM`).
#[derive(Module, Debug)]
pub struct GptNeo {
    wte: Embedding,
    wpe: Embedding,
    h: Vec<Block>,
    ln_f: LayerNorm,
    /// `[hidden, vocab]`; `None` when tied to the embeddings.
    lm_head: Option<Param<Tensor<2>>>,
}

impl Attention {
    /// `masks`: the causal-and-padding mask, and the same with the local window (for local layers).
    fn forward(&self, x: Tensor<3>, masks: &(Tensor<4, Bool>, Option<Tensor<4, Bool>>), layer: usize, cache: Option<&mut KvCache>) -> Tensor<3> {
        let q = split_heads(self.q_proj.forward(x.clone()), self.n_heads);
        let k = split_heads(self.k_proj.forward(x.clone()), self.n_heads);
        let v = split_heads(self.v_proj.forward(x), self.n_heads);
        let (k, v) = match cache {
            Some(cache) => cache.append(layer, k, v),
            None => (k, v),
        };
        let m = match (self.window, &masks.1) {
            (Some(_), Some(local)) => local,
            _ => &masks.0,
        };
        // GPT-Neo does not scale the scores by 1/sqrt(head_dim).
        self.out_proj.forward(merge_heads(grouped_attention(q, k, v, m, 1.0)))
    }
}

impl Mlp {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = self.c_fc.forward(x);
        self.c_proj.forward(if self.exact_gelu { gelu(h) } else { gelu_approximate(h) })
    }
}

impl GptNeo {
    /// Builds the model from HF-named weights (`transformer.h.N.attn.attention.q_proj.weight`, ...;
    /// `lm_head.weight` only when untied).
    pub fn load(cfg: &GptNeoConfig, w: &mut Weights, device: &Device) -> Result<Self> {
        if !matches!(cfg.activation_function.as_str(), "gelu_new" | "gelu" | "gelu_pytorch_tanh") {
            return Err(ModelError::config(
                w.path(),
                format!("activation_function `{}` is not implemented; expected gelu_new or gelu", cfg.activation_function),
            ));
        }
        let sizes = [("vocab_size", cfg.vocab_size), ("max_position_embeddings", cfg.max_position_embeddings), ("hidden_size", cfg.hidden_size), ("intermediate_size", cfg.inner())];
        crate::layers::sizes_at_least_one(&sizes, w.path())?;
        if cfg.num_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_heads) || cfg.window_size == 0 {
            return Err(ModelError::config(w.path(), "hidden_size must be a multiple of num_heads, and window_size at least 1"));
        }
        let local = cfg.local_layers(w.path())?;
        let (d, v, eps) = (cfg.hidden_size, cfg.vocab_size, cfg.layer_norm_epsilon);
        let inner = cfg.inner();
        let h = local
            .iter()
            .map(|&is_local| Block {
                ln_1: names::layer_norm(d, eps, device),
                attn: Attention {
                    q_proj: names::linear(d, d, false, device),
                    k_proj: names::linear(d, d, false, device),
                    v_proj: names::linear(d, d, false, device),
                    out_proj: names::linear(d, d, true, device),
                    n_heads: cfg.num_heads,
                    window: is_local.then_some(cfg.window_size),
                },
                ln_2: names::layer_norm(d, eps, device),
                mlp: Mlp {
                    c_fc: names::linear(d, inner, true, device),
                    c_proj: names::linear(inner, d, true, device),
                    exact_gelu: cfg.activation_function == "gelu",
                },
            })
            .collect();
        let mut model = Self {
            wte: Embedding { weight: names::lazy([v, d], device) },
            wpe: Embedding { weight: names::lazy([cfg.max_position_embeddings, d], device) },
            h,
            ln_f: names::layer_norm(d, eps, device),
            lm_head: (!cfg.tie_word_embeddings).then(|| names::lazy([d, v], device)),
        };
        names::fill(model.named_mut(), w, device)?;
        Ok(model)
    }

    /// Every parameter under its HF name: the one list loading, saving and LoRA read.
    pub(crate) fn named_mut(&mut self) -> Table<'_> {
        let mut t: Table<'_> = vec![
            ("transformer.wte.weight".into(), Slot::Matrix(&mut self.wte.weight)),
            ("transformer.wpe.weight".into(), Slot::Matrix(&mut self.wpe.weight)),
        ];
        for (i, b) in self.h.iter_mut().enumerate() {
            let p = format!("transformer.h.{i}");
            t.push((format!("{p}.ln_1"), Slot::LayerNorm(&mut b.ln_1)));
            t.push((format!("{p}.attn.attention.q_proj"), Slot::Linear(&mut b.attn.q_proj)));
            t.push((format!("{p}.attn.attention.k_proj"), Slot::Linear(&mut b.attn.k_proj)));
            t.push((format!("{p}.attn.attention.v_proj"), Slot::Linear(&mut b.attn.v_proj)));
            t.push((format!("{p}.attn.attention.out_proj"), Slot::Linear(&mut b.attn.out_proj)));
            t.push((format!("{p}.ln_2"), Slot::LayerNorm(&mut b.ln_2)));
            t.push((format!("{p}.mlp.c_fc"), Slot::Linear(&mut b.mlp.c_fc)));
            t.push((format!("{p}.mlp.c_proj"), Slot::Linear(&mut b.mlp.c_proj)));
        }
        t.push(("transformer.ln_f".into(), Slot::LayerNorm(&mut self.ln_f)));
        if let Some(head) = &mut self.lm_head {
            t.push(("lm_head.weight".into(), Slot::Transposed(head)));
        }
        t
    }

    /// Final hidden states `[B, T, D]` (after the last norm, before the LM head) for the new tokens
    /// `input_ids` `[B, T]`; `mask` `[B, T_past + T]` marks real tokens (1) and padding (0), including the
    /// cached ones.
    pub fn hidden(&self, input_ids: Tensor<2, Int>, mask: &Tensor<2, Int>, mut cache: Option<&mut KvCache>) -> Tensor<3> {
        let [_, t] = input_ids.dims();
        let mut x = embed(&self.wte, input_ids) + self.wpe.forward(positions(mask, t));
        let global = attention_mask(mask, t, &x.device());
        // Every local layer has the config's one window.
        let local = self.h.iter().find_map(|b| b.attn.window).map(|window| sliding_window_mask(&global, window));
        let masks = (global, local);
        for (i, block) in self.h.iter().enumerate() {
            let a = block.attn.forward(block.ln_1.forward(x.clone()), &masks, i, cache.as_deref_mut());
            x = x + a;
            x = x.clone() + block.mlp.forward(block.ln_2.forward(x));
        }
        self.ln_f.forward(x)
    }

    /// Logits `[B, T, V]`: the LM head on [`Self::hidden`].
    pub fn forward(&self, input_ids: Tensor<2, Int>, mask: &Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.head(self.hidden(input_ids, mask, cache))
    }

    /// The LM head: logits `[B, T, V]` of final hidden states `[B, T, D]`.
    pub fn head(&self, x: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(w) => linear_3d(x, &w.val()),
            None => tied_head(x, &self.wte.weight.val()),
        }
    }

    /// Entries of the vocabulary: the rows of the token embedding, the columns of the logits.
    pub fn vocab_size(&self) -> usize {
        self.wte.weight.val().dims()[0]
    }

    /// Number of blocks (the KV cache's size).
    pub fn n_layers(&self) -> usize {
        self.h.len()
    }

    /// Rows of the learned position table (`max_position_embeddings`): positions beyond it have no embedding.
    pub fn n_positions(&self) -> usize {
        self.wpe.weight.lazy_shape()[0]
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cfg(types: Value, n: usize) -> GptNeoConfig {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 8, "hidden_size": 8, "num_layers": n, "num_heads": 2, "attention_types": types
        }))
        .unwrap()
    }

    #[test]
    fn attention_types_expand_in_order() {
        let c = cfg(serde_json::json!([[["local", "global"], 2], [["local"], 1]]), 5);
        assert_eq!(c.local_layers("c".as_ref()).unwrap(), vec![true, false, true, false, true]);
        assert!(cfg(serde_json::json!([[["global", "local"], 2]]), 3).local_layers("c".as_ref()).is_err());
        assert!(cfg(serde_json::json!([[["sparse"], 1]]), 1).local_layers("c".as_ref()).is_err());
    }
}
