//! GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"),
//! following HF transformers' `models/gpt2/modeling_gpt2.py`: learned absolute positions,
//! pre-LayerNorm blocks, `gelu_new`, a fused `c_attn` projection, and an LM head tied to the
//! token embeddings. HF stores GPT-2's projections as `Conv1D` weights, already `[in, out]`, which
//! is burn's `Linear` layout, so they load without a transpose.
//!
//! Tested against transformers on a tiny random GPT-2 (`tests/fixtures/gpt2`).

use burn::module::{Module, Param};
use burn::nn::{Embedding, LayerNorm};
use crate::lora::Linear;
use burn::tensor::activation::gelu_approximate;
use burn::tensor::{Device, Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::layers::{KvCache, tied_head, attention_mask, grouped_attention, merge_heads, positions, split_heads};
use crate::weights::{HfTensors, Weights};

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
    fn forward(&self, x: Tensor<3>, mask: &Tensor<2, Int>, layer: usize, cache: Option<&mut KvCache>) -> Tensor<3> {
        let [_, t, d] = x.dims();
        let qkv = self.c_attn.forward(x);
        let q = split_heads(qkv.clone().narrow(2, 0, d), self.n_head);
        let k = split_heads(qkv.clone().narrow(2, d, d), self.n_head);
        let v = split_heads(qkv.narrow(2, 2 * d, d), self.n_head);
        let (k, v) = match cache {
            Some(cache) => cache.append(layer, k, v),
            None => (k, v),
        };
        let m = attention_mask(mask, t, self.n_head, &q.device());
        self.c_proj.forward(merge_heads(grouped_attention(q, k, v, m, self.scale)))
    }
}

impl Mlp {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = self.c_fc.forward(x);
        let h = if self.exact_gelu { burn::tensor::activation::gelu(h) } else { gelu_approximate(h) };
        self.c_proj.forward(h)
    }
}

fn conv1d(w: &mut Weights, prefix: &str, d_in: usize, d_out: usize, device: &Device) -> Result<Linear> {
    let weight = w.tensor(&format!("{prefix}.weight"), [d_in, d_out], device)?;
    Ok(Linear::new(weight, Some(w.tensor(&format!("{prefix}.bias"), [d_out], device)?)))
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
        let p = if w.contains("transformer.wte.weight") { "transformer." } else { "" };
        let (d, v) = (cfg.n_embd, cfg.vocab_size);
        let eps = cfg.layer_norm_epsilon;
        let wte = Embedding { weight: Param::from_tensor(w.tensor(&format!("{p}wte.weight"), [v, d], device)?) };
        let wpe = Embedding {
            weight: Param::from_tensor(w.tensor(&format!("{p}wpe.weight"), [cfg.n_positions, d], device)?),
        };
        let head_dim = (d / cfg.n_head) as f64;
        let h = (0..cfg.n_layer)
            .map(|i| {
                let b = format!("{p}h.{i}");
                let mut scale = if cfg.scale_attn_weights { 1.0 / head_dim.sqrt() } else { 1.0 };
                if cfg.scale_attn_by_inverse_layer_idx {
                    scale /= (i + 1) as f64;
                }
                Ok(Block {
                    ln_1: w.layer_norm(&format!("{b}.ln_1"), d, eps, device)?,
                    attn: Attention {
                        c_attn: conv1d(w, &format!("{b}.attn.c_attn"), d, 3 * d, device)?,
                        c_proj: conv1d(w, &format!("{b}.attn.c_proj"), d, d, device)?,
                        n_head: cfg.n_head,
                        scale,
                    },
                    ln_2: w.layer_norm(&format!("{b}.ln_2"), d, eps, device)?,
                    mlp: Mlp {
                        c_fc: conv1d(w, &format!("{b}.mlp.c_fc"), d, cfg.inner(), device)?,
                        c_proj: conv1d(w, &format!("{b}.mlp.c_proj"), cfg.inner(), d, device)?,
                        exact_gelu: cfg.activation_function == "gelu",
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = w.layer_norm(&format!("{p}ln_f"), d, eps, device)?;
        Ok(Self { wte, wpe, h, ln_f })
    }

    /// Final hidden states `[B, T, D]` (after the last norm, before the LM head) for the new tokens
    /// `input_ids` `[B, T]`; `mask` `[B, T_past + T]` marks real tokens (1) and padding (0), including the
    /// cached ones.
    pub fn hidden(&self, input_ids: Tensor<2, Int>, mask: &Tensor<2, Int>, mut cache: Option<&mut KvCache>) -> Tensor<3> {
        let [_, t] = input_ids.dims();
        let pos = positions(mask, t);
        let mut x = self.wte.forward(input_ids) + self.wpe.forward(pos);
        for (i, block) in self.h.iter().enumerate() {
            let a = block.attn.forward(block.ln_1.forward(x.clone()), mask, i, cache.as_deref_mut());
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

    /// Number of blocks (the KV cache's size).
    pub fn n_layers(&self) -> usize {
        self.h.len()
    }

    /// Every projection under its HF module name (what LoRA adapts).
    pub(crate) fn projections_mut(&mut self) -> Vec<crate::lora::Projection<'_>> {
        let mut out = Vec::new();
        for (i, l) in self.h.iter_mut().enumerate() {
            let p_attn = format!("transformer.h.{i}.attn");
            let p_mlp = format!("transformer.h.{i}.mlp");
            out.push((format!("{p_attn}.c_attn"), &mut l.attn.c_attn));
            out.push((format!("{p_attn}.c_proj"), &mut l.attn.c_proj));
            out.push((format!("{p_mlp}.c_fc"), &mut l.mlp.c_fc));
            out.push((format!("{p_mlp}.c_proj"), &mut l.mlp.c_proj));
        }
        out
    }

    /// The weights under HF names, in HF layout.
    pub fn hf_tensors(&self) -> HfTensors {
        let mut out = HfTensors::default();
        out.push("transformer.wte.weight", self.wte.weight.val());
        out.push("transformer.wpe.weight", self.wpe.weight.val());
        for (i, b) in self.h.iter().enumerate() {
            let p = format!("transformer.h.{i}");
            out.push_layer_norm(format!("{p}.ln_1"), &b.ln_1);
            out.push_layer_norm(format!("{p}.ln_2"), &b.ln_2);
        }
        out.push_layer_norm("transformer.ln_f", &self.ln_f);
        out.push_projections(self.clone().projections_mut(), true);
        out
    }
}
