//! GPT-J (Wang & Komatsuzaki 2021, "GPT-J-6B: A 6 Billion Parameter Autoregressive Language
//! Model", github.com/kingoflolz/mesh-transformer-jax), following HF transformers'
//! `models/gptj/modeling_gptj.py`: attention and MLP computed in parallel from one LayerNorm
//! (`x + attn(ln(x)) + mlp(ln(x))`), rotary embeddings on the first `rotary_dim` dims of each head
//! with GPT-J's interleaved pairs (`rotate_every_two`: pairs (0,1), (2,3), ...), q/k/v/out
//! projections without bias, a `gelu_new` MLP with biases, and an untied LM head with a bias.
//!
//! Tested against transformers on a tiny random GPT-J with partial rotary (`tests/fixtures/gptj`).

use burn::module::{Module, Param};
use burn::nn::{Embedding, LayerNorm};
use crate::linear::Linear;
use burn::tensor::activation::{gelu, gelu_approximate};
use burn::tensor::{Bool, Device, Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::layers::{KvCache, attention_mask, embed, grouped_attention, linear_3d, merge_heads, positions, rotary_cos_sin, split_heads, tied_head};
use crate::names::{self, Slot, Table};
use crate::weights::Weights;

/// GPT-J's `config.json`, with HF's key names (extra keys are ignored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GptjConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Maximum sequence length.
    #[serde(default = "default_max_pos")]
    pub n_positions: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// Number of blocks.
    pub n_layer: usize,
    /// Number of attention heads.
    pub n_head: usize,
    /// Rotated dims per head (the first ones); `null` rotates the whole head.
    #[serde(default)]
    pub rotary_dim: Option<usize>,
    /// MLP width; `null` means `4 * n_embd`.
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// MLP activation; `gelu_new` (tanh approximation) or `gelu`.
    #[serde(default = "default_activation")]
    pub activation_function: String,
    /// LayerNorm epsilon.
    #[serde(default = "default_ln_eps")]
    pub layer_norm_epsilon: f64,
    /// Whether the LM head shares the token embedding matrix (never in GPT-J's checkpoints; the
    /// head's bias is kept either way).
    #[serde(default)]
    pub tie_word_embeddings: bool,
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

fn default_max_pos() -> usize {
    2048
}
fn default_activation() -> String {
    "gelu_new".into()
}
fn default_ln_eps() -> f64 {
    1e-5
}

impl GptjConfig {
    fn head_dim(&self) -> usize {
        self.n_embd.checked_div(self.n_head).unwrap_or(0)
    }

    /// Rotated dims per head.
    pub fn rotary_dims(&self) -> usize {
        self.rotary_dim.unwrap_or(self.head_dim())
    }
}

#[derive(Module, Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    n_heads: usize,
    rotary_dim: usize,
    scale: f64,
}

#[derive(Module, Debug)]
struct Mlp {
    fc_in: Linear,
    fc_out: Linear,
    exact_gelu: bool,
}

#[derive(Module, Debug)]
struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    mlp: Mlp,
}

/// A GPT-J language model (`GPTJForCausalLM`).
#[derive(Module, Debug)]
pub struct Gptj {
    wte: Embedding,
    h: Vec<Block>,
    ln_f: LayerNorm,
    /// `[hidden, vocab]`; `None` when tied to the embeddings.
    lm_head: Option<Param<Tensor<2>>>,
    /// `[vocab]`, present tied or not.
    lm_head_bias: Param<Tensor<1>>,
    rotary_dim: usize,
}

/// GPT-J's `rotate_every_two` on the last dim: `(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)`.
fn rotate_every_two(x: Tensor<4>) -> Tensor<4> {
    let [b, h, t, d] = x.dims();
    let pairs = x.reshape([b, h, t, d / 2, 2]);
    let even = pairs.clone().narrow(4, 0, 1);
    let odd = pairs.narrow(4, 1, 1);
    Tensor::cat(vec![odd.neg(), even], 4).reshape([b, h, t, d])
}

/// Rotates the first `r` dims of `x` `[B, H, T, Dh]` (cos/sin `[B, 1, T, r]`), keeps the rest.
fn apply_rotary(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>, r: usize) -> Tensor<4> {
    let dh = x.dims()[3];
    let rot = x.clone().narrow(3, 0, r);
    let rot = rot.clone() * cos.clone() + rotate_every_two(rot) * sin.clone();
    if r == dh { rot } else { Tensor::cat(vec![rot, x.narrow(3, r, dh - r)], 3) }
}

impl Attention {
    fn forward(&self, x: Tensor<3>, cos: &Tensor<4>, sin: &Tensor<4>, mask: &Tensor<4, Bool>, layer: usize, cache: Option<&mut KvCache>) -> Tensor<3> {
        let q = split_heads(self.q_proj.forward(x.clone()), self.n_heads);
        let k = split_heads(self.k_proj.forward(x.clone()), self.n_heads);
        let v = split_heads(self.v_proj.forward(x), self.n_heads);
        let q = apply_rotary(q, cos, sin, self.rotary_dim);
        let k = apply_rotary(k, cos, sin, self.rotary_dim);
        let (k, v) = match cache {
            Some(cache) => cache.append(layer, k, v),
            None => (k, v),
        };
        self.out_proj.forward(merge_heads(grouped_attention(q, k, v, mask, self.scale)))
    }
}

impl Mlp {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = self.fc_in.forward(x);
        self.fc_out.forward(if self.exact_gelu { gelu(h) } else { gelu_approximate(h) })
    }
}

impl Gptj {
    /// Builds the model from HF-named weights (`transformer.h.N.attn.q_proj.weight`, ...,
    /// `lm_head.weight` and `lm_head.bias`).
    pub fn load(cfg: &GptjConfig, w: &mut Weights, device: &Device) -> Result<Self> {
        if !matches!(cfg.activation_function.as_str(), "gelu_new" | "gelu" | "gelu_pytorch_tanh") {
            return Err(ModelError::config(
                w.path(),
                format!("activation_function `{}` is not implemented; expected gelu_new or gelu", cfg.activation_function),
            ));
        }
        let sizes = [("vocab_size", cfg.vocab_size), ("n_positions", cfg.n_positions), ("n_embd", cfg.n_embd), ("n_inner", cfg.n_inner.unwrap_or(4 * cfg.n_embd))];
        crate::layers::sizes_at_least_one(&sizes, w.path())?;
        let r = cfg.rotary_dims();
        if cfg.n_head == 0 || !cfg.n_embd.is_multiple_of(cfg.n_head) || !r.is_multiple_of(2) || r > cfg.head_dim() || r == 0 {
            return Err(ModelError::config(
                w.path(),
                format!("n_embd must be a multiple of n_head and rotary_dim ({r}) even, positive and at most the head size"),
            ));
        }
        let (d, v, eps, inner) = (cfg.n_embd, cfg.vocab_size, cfg.layer_norm_epsilon, cfg.n_inner.unwrap_or(4 * cfg.n_embd));
        let h = (0..cfg.n_layer)
            .map(|_| Block {
                ln_1: names::layer_norm(d, eps, device),
                attn: Attention {
                    q_proj: names::linear(d, d, false, device),
                    k_proj: names::linear(d, d, false, device),
                    v_proj: names::linear(d, d, false, device),
                    out_proj: names::linear(d, d, false, device),
                    n_heads: cfg.n_head,
                    rotary_dim: r,
                    scale: 1.0 / (cfg.head_dim() as f64).sqrt(),
                },
                mlp: Mlp {
                    fc_in: names::linear(d, inner, true, device),
                    fc_out: names::linear(inner, d, true, device),
                    exact_gelu: cfg.activation_function == "gelu",
                },
            })
            .collect();
        let mut model = Self {
            wte: Embedding { weight: names::lazy([v, d], device) },
            h,
            ln_f: names::layer_norm(d, eps, device),
            lm_head: (!cfg.tie_word_embeddings).then(|| names::lazy([d, v], device)),
            lm_head_bias: names::lazy([v], device),
            rotary_dim: r,
        };
        names::fill(model.named_mut(), w, device)?;
        Ok(model)
    }

    /// Every parameter under its HF name: the one list loading, saving and LoRA read.
    pub(crate) fn named_mut(&mut self) -> Table<'_> {
        let mut t: Table<'_> = vec![("transformer.wte.weight".into(), Slot::Matrix(&mut self.wte.weight))];
        for (i, b) in self.h.iter_mut().enumerate() {
            let p = format!("transformer.h.{i}");
            t.push((format!("{p}.ln_1"), Slot::LayerNorm(&mut b.ln_1)));
            t.push((format!("{p}.attn.q_proj"), Slot::Linear(&mut b.attn.q_proj)));
            t.push((format!("{p}.attn.k_proj"), Slot::Linear(&mut b.attn.k_proj)));
            t.push((format!("{p}.attn.v_proj"), Slot::Linear(&mut b.attn.v_proj)));
            t.push((format!("{p}.attn.out_proj"), Slot::Linear(&mut b.attn.out_proj)));
            t.push((format!("{p}.mlp.fc_in"), Slot::Linear(&mut b.mlp.fc_in)));
            t.push((format!("{p}.mlp.fc_out"), Slot::Linear(&mut b.mlp.fc_out)));
        }
        t.push(("transformer.ln_f".into(), Slot::LayerNorm(&mut self.ln_f)));
        if let Some(head) = &mut self.lm_head {
            t.push(("lm_head.weight".into(), Slot::Transposed(head)));
        }
        t.push(("lm_head.bias".into(), Slot::Vector(&mut self.lm_head_bias)));
        t
    }

    /// Final hidden states `[B, T, D]` (after the last norm, before the LM head) for the new tokens
    /// `input_ids` `[B, T]`; `mask` `[B, T_past + T]` marks real tokens (1) and padding (0), including the
    /// cached ones.
    pub fn hidden(&self, input_ids: Tensor<2, Int>, mask: &Tensor<2, Int>, mut cache: Option<&mut KvCache>) -> Tensor<3> {
        let [b, t] = input_ids.dims();
        let mut x = embed(&self.wte, input_ids);
        let (cos, sin) = rotary_cos_sin(positions(mask, t), self.rotary_dim, 10_000.0, x.dtype());
        // transformers' repeat_interleave(2): each angle covers one interleaved pair.
        let half = self.rotary_dim / 2;
        let pairwise = |c: Tensor<4>| c.unsqueeze_dim::<5>(4).expand([b, 1, t, half, 2]).reshape([b, 1, t, 2 * half]);
        let (cos, sin) = (pairwise(cos), pairwise(sin));
        let m = attention_mask(mask, t, &x.device());
        for (i, block) in self.h.iter().enumerate() {
            let hidden = block.ln_1.forward(x.clone());
            let a = block.attn.forward(hidden.clone(), &cos, &sin, &m, i, cache.as_deref_mut());
            x = x + a + block.mlp.forward(hidden);
        }
        self.ln_f.forward(x)
    }

    /// Logits `[B, T, V]`: the LM head on [`Self::hidden`].
    pub fn forward(&self, input_ids: Tensor<2, Int>, mask: &Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.head(self.hidden(input_ids, mask, cache))
    }

    /// The LM head: logits `[B, T, V]` of final hidden states `[B, T, D]`.
    pub fn head(&self, x: Tensor<3>) -> Tensor<3> {
        let logits = match &self.lm_head {
            Some(w) => linear_3d(x, &w.val()),
            None => tied_head(x, &self.wte.weight.val()),
        };
        logits + self.lm_head_bias.val().unsqueeze::<3>()
    }

    /// Entries of the vocabulary: the rows of the token embedding, the columns of the logits.
    pub fn vocab_size(&self) -> usize {
        self.wte.weight.val().dims()[0]
    }

    /// Number of blocks (the KV cache's size).
    pub fn n_layers(&self) -> usize {
        self.h.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn rotate_every_two_swaps_interleaved_pairs() {
        let device = Device::default();
        let x = Tensor::<4>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [1, 1, 1, 4]), &device);
        assert_eq!(rotate_every_two(x).into_data().try_to_vec::<f32>().unwrap(), vec![-2.0, 1.0, -4.0, 3.0]);
    }
}
