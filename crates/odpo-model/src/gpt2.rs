//! GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"),
//! following HF transformers' `models/gpt2/modeling_gpt2.py`: learned absolute positions,
//! pre-LayerNorm blocks, `gelu_new`, a fused `c_attn` projection, and an LM head tied to the
//! token embeddings. HF stores GPT-2's projections as `Conv1D` weights, already `[in, out]`, which
//! is burn's `Linear` layout, so they load without a transpose.
//!
//! Tested against transformers on a tiny random GPT-2 (`tests/fixtures/gpt2`).

use burn::module::Module;
use burn::nn::{Embedding, LayerNorm};
use crate::linear::Linear;
use burn::tensor::activation::gelu_approximate;
use burn::tensor::{Bool, Device, Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::layers::{KvCache, attention_mask, embed, grouped_attention, merge_heads, positions, split_heads, tied_head};
use crate::names::{self, Slot, Table};
use crate::weights::Weights;

/// GPT-2's `config.json`, with HF's key names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Maximum sequence length (learned position table size).
    pub n_positions: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// Number of blocks.
    pub n_layer: usize,
    /// Number of attention heads.
    pub n_head: usize,
    /// MLP width; `null` means `4 * n_embd`.
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// LayerNorm epsilon.
    #[serde(default = "default_ln_eps")]
    pub layer_norm_epsilon: f64,
    /// MLP activation; only `gelu_new` (tanh approximation) and `gelu` are implemented.
    #[serde(default = "default_activation")]
    pub activation_function: String,
    /// Divide attention scores by sqrt(head_dim).
    #[serde(default = "yes")]
    pub scale_attn_weights: bool,
    /// Also divide attention scores by (layer index + 1).
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Beginning-of-sequence token.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token.
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// Padding token, written back as read.
    #[serde(default)]
    pub pad_token_id: Option<serde_json::Value>,
}

fn default_ln_eps() -> f64 {
    1e-5
}
fn default_activation() -> String {
    "gelu_new".into()
}
fn yes() -> bool {
    true
}

impl Gpt2Config {
    fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }
}

#[derive(Module, Debug)]
struct Attention {
    c_attn: Linear,
    c_proj: Linear,
    n_head: usize,
    scale: f64,
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

/// A GPT-2 language model (`GPT2LMHeadModel`).
#[derive(Module, Debug)]
pub struct Gpt2 {
    wte: Embedding,
    wpe: Embedding,
    h: Vec<Block>,
    ln_f: LayerNorm,
}

impl Attention {
    fn forward(&self, x: Tensor<3>, mask: &Tensor<4, Bool>, layer: usize, cache: Option<&mut KvCache>) -> Tensor<3> {
        let d = x.dims()[2];
        let qkv = self.c_attn.forward(x);
        let q = split_heads(qkv.clone().narrow(2, 0, d), self.n_head);
        let k = split_heads(qkv.clone().narrow(2, d, d), self.n_head);
        let v = split_heads(qkv.narrow(2, 2 * d, d), self.n_head);
        let (k, v) = match cache {
            Some(cache) => cache.append(layer, k, v),
            None => (k, v),
        };
        self.c_proj.forward(merge_heads(grouped_attention(q, k, v, mask, self.scale)))
    }
}

impl Mlp {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = self.c_fc.forward(x);
        let h = if self.exact_gelu { burn::tensor::activation::gelu(h) } else { gelu_approximate(h) };
        self.c_proj.forward(h)
    }
}

impl Gpt2 {
    /// Builds the model from HF weights (`transformer.`-prefixed as `GPT2LMHeadModel` saves
    /// them, or bare as the original OpenAI checkpoints are).
    pub fn load(cfg: &Gpt2Config, w: &mut Weights, device: &Device) -> Result<Self> {
        if !matches!(cfg.activation_function.as_str(), "gelu_new" | "gelu" | "gelu_pytorch_tanh") {
            return Err(crate::ModelError::config(
                w.path(),
                format!("activation_function `{}` is not implemented; expected gelu_new or gelu", cfg.activation_function),
            ));
        }
        let sizes = [("vocab_size", cfg.vocab_size), ("n_positions", cfg.n_positions), ("n_embd", cfg.n_embd), ("n_head", cfg.n_head), ("n_inner", cfg.inner())];
        crate::layers::sizes_at_least_one(&sizes, w.path())?;
        if !cfg.n_embd.is_multiple_of(cfg.n_head) {
            return Err(crate::ModelError::config(w.path(), format!("n_embd ({}) must be a multiple of n_head ({})", cfg.n_embd, cfg.n_head)));
        }
        // The original OpenAI checkpoints name the tensors without the `transformer.` prefix.
        if !w.contains("transformer.wte.weight") && w.contains("wte.weight") {
            w.add_prefix("transformer.");
        }
        let (d, v, eps, inner) = (cfg.n_embd, cfg.vocab_size, cfg.layer_norm_epsilon, cfg.inner());
        let head_dim = (d / cfg.n_head) as f64;
        let h = (0..cfg.n_layer)
            .map(|i| {
                let mut scale = if cfg.scale_attn_weights { 1.0 / head_dim.sqrt() } else { 1.0 };
                if cfg.scale_attn_by_inverse_layer_idx {
                    scale /= (i + 1) as f64;
                }
                Block {
                    ln_1: names::layer_norm(d, eps, device),
                    attn: Attention {
                        c_attn: names::linear(d, 3 * d, true, device),
                        c_proj: names::linear(d, d, true, device),
                        n_head: cfg.n_head,
                        scale,
                    },
                    ln_2: names::layer_norm(d, eps, device),
                    mlp: Mlp {
                        c_fc: names::linear(d, inner, true, device),
                        c_proj: names::linear(inner, d, true, device),
                        exact_gelu: cfg.activation_function == "gelu",
                    },
                }
            })
            .collect();
        let mut model = Self {
            wte: Embedding { weight: names::lazy([v, d], device) },
            wpe: Embedding { weight: names::lazy([cfg.n_positions, d], device) },
            h,
            ln_f: names::layer_norm(d, eps, device),
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
            t.push((format!("{p}.attn.c_attn"), Slot::Conv1d(&mut b.attn.c_attn)));
            t.push((format!("{p}.attn.c_proj"), Slot::Conv1d(&mut b.attn.c_proj)));
            t.push((format!("{p}.ln_2"), Slot::LayerNorm(&mut b.ln_2)));
            t.push((format!("{p}.mlp.c_fc"), Slot::Conv1d(&mut b.mlp.c_fc)));
            t.push((format!("{p}.mlp.c_proj"), Slot::Conv1d(&mut b.mlp.c_proj)));
        }
        t.push(("transformer.ln_f".into(), Slot::LayerNorm(&mut self.ln_f)));
        t
    }

    /// Final hidden states `[B, T, D]` (after the last norm, before the LM head) for the new tokens
    /// `input_ids` `[B, T]`; `mask` `[B, T_past + T]` marks real tokens (1) and padding (0), including the
    /// cached ones.
    pub fn hidden(&self, input_ids: Tensor<2, Int>, mask: &Tensor<2, Int>, mut cache: Option<&mut KvCache>) -> Tensor<3> {
        let [_, t] = input_ids.dims();
        let pos = positions(mask, t);
        let mut x = embed(&self.wte, input_ids) + self.wpe.forward(pos);
        let m = attention_mask(mask, t, &x.device());
        for (i, block) in self.h.iter().enumerate() {
            let a = block.attn.forward(block.ln_1.forward(x.clone()), &m, i, cache.as_deref_mut());
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
        tied_head(x, &self.wte.weight.val())
    }

    /// Entries of the vocabulary: the rows of the token embedding, the columns of the logits.
    pub fn vocab_size(&self) -> usize {
        self.wte.weight.val().dims()[0]
    }

    /// Number of blocks (the KV cache's size).
    pub fn n_layers(&self) -> usize {
        self.h.len()
    }

    /// Rows of the learned position table (`n_positions`): positions beyond it have no embedding.
    pub fn n_positions(&self) -> usize {
        self.wpe.weight.lazy_shape()[0]
    }
}
