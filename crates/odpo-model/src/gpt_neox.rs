//! GPT-NeoX and Pythia (Black et al. 2022, "GPT-NeoX-20B", arXiv 2204.06745; Biderman et al.
//! 2023, "Pythia", arXiv 2304.01373), following HF transformers'
//! `models/gpt_neox/modeling_gpt_neox.py`: a fused `query_key_value` projection whose output is
//! laid out per head as `[heads, 3, head_dim]`, rotate-half rotary embeddings on the first
//! `rotary_pct` of each head's dims, LayerNorm, an exact-`gelu` MLP, a parallel residual
//! (`x + attn(ln1(x)) + mlp(ln2(x))`) or, with `use_parallel_residual: false`, a sequential one,
//! optional attention biases (`attention_bias`), and an untied head saved as `embed_out`.
//!
//! Tested against transformers on tiny random GPT-NeoX models with parallel and sequential
//! residuals (`tests/fixtures/gpt_neox_parallel`, `tests/fixtures/gpt_neox_sequential`).

use burn::module::{Module, Param};
use burn::nn::{Embedding, LayerNorm};
use crate::linear::Linear;
use burn::tensor::activation::{gelu, gelu_approximate};
use burn::tensor::{Bool, Device, Int, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::layers::{KvCache, attention_mask, embed, grouped_attention, linear_3d, merge_heads, positions, rotary_cos_sin, tied_head};
use crate::names::{self, Slot, Table};
use crate::weights::Weights;

/// A GPT-NeoX / Pythia `config.json`, with HF's key names (extra keys are ignored). RoPE settings
/// are read as transformers 5 writes them (`rope_parameters`) or as older checkpoints give them
/// (`rotary_pct`, `rotary_emb_base`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GptNeoxConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// MLP activation; `gelu` (exact), `gelu_new` / `gelu_fast` / `gelu_pytorch_tanh` (tanh approximation).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Maximum sequence length.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    /// Fraction of each head's dims that are rotated (older configs).
    #[serde(default)]
    pub rotary_pct: Option<f64>,
    /// RoPE base (older configs).
    #[serde(default)]
    pub rotary_emb_base: Option<f64>,
    /// RoPE base at the top level.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE settings as transformers 5 writes them (`rope_theta`, `partial_rotary_factor`, `rope_type`).
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    /// `x + attn(ln1(x)) + mlp(ln2(x))` when true; `y = x + attn(ln1(x)); y + mlp(ln2(y))` when false.
    #[serde(default = "yes")]
    pub use_parallel_residual: bool,
    /// Bias on `query_key_value` and `dense`.
    #[serde(default = "yes")]
    pub attention_bias: bool,
    /// Whether the head shares the token embedding matrix (Pythia's does not).
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
    pub pad_token_id: Option<Value>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_max_pos() -> usize {
    2048
}
fn default_ln_eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}

impl GptNeoxConfig {
    fn rope_field(&self, key: &str) -> Option<&Value> {
        self.rope_parameters.as_ref().and_then(|p| p.get(key))
    }

    /// The RoPE base: `rope_parameters.rope_theta`, else `rotary_emb_base`, else `rope_theta`, else 10000.
    pub fn theta(&self) -> f64 {
        self.rope_field("rope_theta").and_then(Value::as_f64).or(self.rotary_emb_base).or(self.rope_theta).unwrap_or(10_000.0)
    }

    /// Rotated dims per head: `int(head_dim * partial_rotary_factor)` (or `rotary_pct`, default 0.25).
    pub fn rotary_ndims(&self) -> usize {
        let pct = self.rope_field("partial_rotary_factor").and_then(Value::as_f64).or(self.rotary_pct).unwrap_or(0.25);
        (self.hidden_size.checked_div(self.num_attention_heads).unwrap_or(0) as f64 * pct) as usize
    }
}

#[derive(Module, Debug)]
struct Attention {
    query_key_value: Linear,
    dense: Linear,
    n_heads: usize,
    rotary_ndims: usize,
    scale: f64,
}

#[derive(Module, Debug)]
struct Mlp {
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
    exact_gelu: bool,
}

#[derive(Module, Debug)]
struct Layer {
    input_layernorm: LayerNorm,
    post_attention_layernorm: LayerNorm,
    attention: Attention,
    mlp: Mlp,
}

/// A GPT-NeoX / Pythia language model (`GPTNeoXForCausalLM`).
#[derive(Module, Debug)]
pub struct GptNeox {
    embed_in: Embedding,
    layers: Vec<Layer>,
    final_layer_norm: LayerNorm,
    /// `[hidden, vocab]`; `None` when tied to the embeddings.
    embed_out: Option<Param<Tensor<2>>>,
    parallel_residual: bool,
    rotary_ndims: usize,
    theta: f64,
}

/// Rotates each head's halves: `[x1, x2] -> [-x2, x1]`.
fn rotate_half(x: Tensor<4>) -> Tensor<4> {
    let d = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.narrow(3, d / 2, d / 2);
    Tensor::cat(vec![x2.neg(), x1], 3)
}

/// Rotates the first `r` dims of `x` `[B, H, T, Dh]` (cos/sin `[B, 1, T, r]`), keeps the rest.
fn apply_rotary(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>, r: usize) -> Tensor<4> {
    let dh = x.dims()[3];
    let rot = x.clone().narrow(3, 0, r);
    let rot = rot.clone() * cos.clone() + rotate_half(rot) * sin.clone();
    if r == dh { rot } else { Tensor::cat(vec![rot, x.narrow(3, r, dh - r)], 3) }
}

impl Attention {
    fn forward(&self, x: Tensor<3>, cos: &Tensor<4>, sin: &Tensor<4>, mask: &Tensor<4, Bool>, layer: usize, cache: Option<&mut KvCache>) -> Tensor<3> {
        let [b, t, d] = x.dims();
        let hd = d / self.n_heads;
        // HF: view(B, T, H, 3 * hd).transpose(1, 2).chunk(3, -1): per head, q then k then v.
        let qkv = self.query_key_value.forward(x).reshape([b, t, self.n_heads, 3 * hd]).swap_dims(1, 2);
        let q = qkv.clone().narrow(3, 0, hd);
        let k = qkv.clone().narrow(3, hd, hd);
        let v = qkv.narrow(3, 2 * hd, hd);
        let (q, k) = if self.rotary_ndims > 0 {
            (apply_rotary(q, cos, sin, self.rotary_ndims), apply_rotary(k, cos, sin, self.rotary_ndims))
        } else {
            (q, k)
        };
        let (k, v) = match cache {
            Some(cache) => cache.append(layer, k, v),
            None => (k, v),
        };
        self.dense.forward(merge_heads(grouped_attention(q, k, v, mask, self.scale)))
    }
}

impl Mlp {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = self.dense_h_to_4h.forward(x);
        self.dense_4h_to_h.forward(if self.exact_gelu { gelu(h) } else { gelu_approximate(h) })
    }
}

impl GptNeox {
    /// Builds the model from HF-named weights (`gpt_neox.layers.N...`; the head as `embed_out.weight`,
    /// as transformers saves it, or `lm_head.weight`).
    pub fn load(cfg: &GptNeoxConfig, w: &mut Weights, device: &Device) -> Result<Self> {
        let exact_gelu = match cfg.hidden_act.as_str() {
            "gelu" => true,
            "gelu_new" | "gelu_fast" | "gelu_pytorch_tanh" => false,
            other => return Err(ModelError::config(w.path(), format!("hidden_act `{other}` is not implemented; expected gelu or gelu_new"))),
        };
        if let Some(kind) = cfg.rope_field("rope_type").and_then(Value::as_str).filter(|k| *k != "default") {
            return Err(ModelError::config(w.path(), format!("rope_type `{kind}` is not implemented for GPT-NeoX; expected `default`")));
        }
        let (d, v, eps, nh) = (cfg.hidden_size, cfg.vocab_size, cfg.layer_norm_eps, cfg.num_attention_heads);
        crate::layers::sizes_at_least_one(&[("vocab_size", v), ("hidden_size", d), ("intermediate_size", cfg.intermediate_size)], w.path())?;
        let r = cfg.rotary_ndims();
        if nh == 0 || !d.is_multiple_of(nh) || !r.is_multiple_of(2) || r > d / nh {
            return Err(ModelError::config(
                w.path(),
                format!("hidden_size must be a multiple of num_attention_heads and the rotary dims ({r}) even and at most the head size"),
            ));
        }
        // Some GPT-NeoX-style checkpoints call the untied head `lm_head` rather than `embed_out`.
        if !cfg.tie_word_embeddings && !w.contains("embed_out.weight") {
            w.rename("lm_head.weight", "embed_out.weight");
        }
        let (inner, bias) = (cfg.intermediate_size, cfg.attention_bias);
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| Layer {
                input_layernorm: names::layer_norm(d, eps, device),
                post_attention_layernorm: names::layer_norm(d, eps, device),
                attention: Attention {
                    query_key_value: names::linear(d, 3 * d, bias, device),
                    dense: names::linear(d, d, bias, device),
                    n_heads: nh,
                    rotary_ndims: r,
                    scale: 1.0 / ((d / nh) as f64).sqrt(),
                },
                mlp: Mlp {
                    dense_h_to_4h: names::linear(d, inner, true, device),
                    dense_4h_to_h: names::linear(inner, d, true, device),
                    exact_gelu,
                },
            })
            .collect();
        let mut model = Self {
            embed_in: Embedding { weight: names::lazy([v, d], device) },
            layers,
            final_layer_norm: names::layer_norm(d, eps, device),
            embed_out: (!cfg.tie_word_embeddings).then(|| names::lazy([d, v], device)),
            parallel_residual: cfg.use_parallel_residual,
            rotary_ndims: r,
            theta: cfg.theta(),
        };
        names::fill(model.named_mut(), w, device)?;
        Ok(model)
    }

    /// Every parameter under its HF name: the one list loading, saving and LoRA read.
    pub(crate) fn named_mut(&mut self) -> Table<'_> {
        let mut t: Table<'_> = vec![("gpt_neox.embed_in.weight".into(), Slot::Matrix(&mut self.embed_in.weight))];
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("gpt_neox.layers.{i}");
            t.push((format!("{p}.input_layernorm"), Slot::LayerNorm(&mut l.input_layernorm)));
            t.push((format!("{p}.post_attention_layernorm"), Slot::LayerNorm(&mut l.post_attention_layernorm)));
            t.push((format!("{p}.attention.query_key_value"), Slot::Linear(&mut l.attention.query_key_value)));
            t.push((format!("{p}.attention.dense"), Slot::Linear(&mut l.attention.dense)));
            t.push((format!("{p}.mlp.dense_h_to_4h"), Slot::Linear(&mut l.mlp.dense_h_to_4h)));
            t.push((format!("{p}.mlp.dense_4h_to_h"), Slot::Linear(&mut l.mlp.dense_4h_to_h)));
        }
        t.push(("gpt_neox.final_layer_norm".into(), Slot::LayerNorm(&mut self.final_layer_norm)));
        if let Some(head) = &mut self.embed_out {
            t.push(("embed_out.weight".into(), Slot::Transposed(head)));
        }
        t
    }

    /// Final hidden states `[B, T, D]` (after the last norm, before the LM head) for the new tokens
    /// `input_ids` `[B, T]`; `mask` `[B, T_past + T]` marks real tokens (1) and padding (0), including the
    /// cached ones.
    pub fn hidden(&self, input_ids: Tensor<2, Int>, mask: &Tensor<2, Int>, mut cache: Option<&mut KvCache>) -> Tensor<3> {
        let [_, t] = input_ids.dims();
        let mut x = embed(&self.embed_in, input_ids);
        let (cos, sin) = rotary_cos_sin(positions(mask, t), self.rotary_ndims.max(2), self.theta, x.dtype());
        // transformers' cat((freqs, freqs), -1): the halves of the rotated dims share angles.
        let (cos, sin) = (Tensor::cat(vec![cos.clone(), cos], 3), Tensor::cat(vec![sin.clone(), sin], 3));
        let causal = attention_mask(mask, t, &x.device());
        for (i, layer) in self.layers.iter().enumerate() {
            let a = layer.attention.forward(layer.input_layernorm.forward(x.clone()), &cos, &sin, &causal, i, cache.as_deref_mut());
            x = if self.parallel_residual {
                let m = layer.mlp.forward(layer.post_attention_layernorm.forward(x.clone()));
                x + a + m
            } else {
                let y = x + a;
                y.clone() + layer.mlp.forward(layer.post_attention_layernorm.forward(y))
            };
        }
        self.final_layer_norm.forward(x)
    }

    /// Logits `[B, T, V]`: the LM head on [`Self::hidden`].
    pub fn forward(&self, input_ids: Tensor<2, Int>, mask: &Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.head(self.hidden(input_ids, mask, cache))
    }

    /// The LM head: logits `[B, T, V]` of final hidden states `[B, T, D]`.
    pub fn head(&self, x: Tensor<3>) -> Tensor<3> {
        match &self.embed_out {
            Some(w) => linear_3d(x, &w.val()),
            None => tied_head(x, &self.embed_in.weight.val()),
        }
    }

    /// Entries of the vocabulary: the rows of the token embedding, the columns of the logits.
    pub fn vocab_size(&self) -> usize {
        self.embed_in.weight.val().dims()[0]
    }

    /// Number of layers (the KV cache's size).
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn old_and_new_rope_keys_agree() {
        let base = serde_json::json!({
            "vocab_size": 8, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 8
        });
        let with = |extra: Value| {
            let mut v = base.clone();
            v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            serde_json::from_value::<GptNeoxConfig>(v).unwrap()
        };
        let old = with(serde_json::json!({"rotary_pct": 0.25, "rotary_emb_base": 500}));
        let new = with(serde_json::json!({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25}}));
        assert_eq!((old.rotary_ndims(), old.theta()), (4, 500.0));
        assert_eq!((new.rotary_ndims(), new.theta()), (4, 500.0));
        let defaults = with(serde_json::json!({}));
        assert_eq!((defaults.rotary_ndims(), defaults.theta()), (4, 10_000.0));
        assert!(defaults.use_parallel_residual && defaults.attention_bias && !defaults.tie_word_embeddings);
    }
}
