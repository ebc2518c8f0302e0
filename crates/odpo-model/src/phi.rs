//! Phi-1, Phi-1.5 and Phi-2 (Gunasekar et al. 2023, "Textbooks Are All You Need", arXiv
//! 2306.11644; Li et al. 2023, arXiv 2309.05463), following HF transformers'
//! `models/phi/modeling_phi.py`: attention and MLP computed in parallel from one LayerNorm
//! (`x + attn(ln(x)) + mlp(ln(x))`, as GPT-J), q/k/v/`dense` projections with biases and grouped
//! keys and values where `num_key_value_heads` says so, an optional LayerNorm over each head's
//! queries and keys (`qk_layernorm`), rotate-half RoPE on the first
//! `int(head_dim · partial_rotary_factor)` dims of each head (Phi-2: 32 of 80), a `gelu_new` MLP
//! (`fc1`, `fc2`) with biases, a final LayerNorm, and an LM head with a bias, tied or not.
//!
//! Phi-3 and Phi-4 are Llama-shaped and live in [`crate::llama`]. Tested against transformers on
//! tiny random models (`tests/fixtures/phi2`, `tests/fixtures/phi_qk_norm`).

use burn::module::{Module, Param};
use burn::nn::{Embedding, LayerNorm};
use burn::tensor::activation::{gelu, gelu_approximate};
use burn::tensor::{Bool, Device, Int, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::layers::{KvCache, attention_mask, embed, grouped_attention, linear_3d, merge_heads, positions, rotate_half, rotate_half_cos_sin, split_heads, tied_head};
use crate::linear::Linear;
use crate::names::{self, Slot, Table};
use crate::weights::Weights;

/// A Phi `config.json`, with HF's key names (extra keys are ignored). RoPE settings are read as
/// transformers 5 writes them (`rope_parameters`) or as the published checkpoints give them
/// (`rope_theta`, `partial_rotary_factor` and `rope_scaling` at the top level).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PhiConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key-value heads; `null` means one per query head.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// MLP activation: `gelu_new` (tanh approximation; also `gelu_fast`, `gelu_pytorch_tanh`) or `gelu` (exact).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Maximum sequence length.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    /// RoPE base at the top level (the published checkpoints).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Fraction of each head's dims that rotate, at the top level (the published checkpoints).
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    /// RoPE scaling as transformers 4 writes it (`{"type": "linear", "factor": 2}`).
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    /// RoPE settings as transformers 5 writes them (`rope_type`, `rope_theta`,
    /// `partial_rotary_factor`, `factor`).
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    /// A LayerNorm over each head's queries and keys before the rotation.
    #[serde(default)]
    pub qk_layernorm: bool,
    /// Whether the head shares the token embedding matrix (the head's bias is kept either way).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token.
    #[serde(default)]
    pub bos_token_id: Option<Value>,
    /// End-of-sequence token(s).
    #[serde(default)]
    pub eos_token_id: Option<Value>,
    /// Padding token, written back as read.
    #[serde(default)]
    pub pad_token_id: Option<Value>,
}

fn default_act() -> String {
    "gelu_new".into()
}
fn default_max_pos() -> usize {
    2048
}
fn default_ln_eps() -> f64 {
    1e-5
}

impl PhiConfig {
    /// Its RoPE settings, in either form.
    fn rope(&self) -> crate::layers::PartialRope<'_> {
        crate::layers::PartialRope { parameters: &self.rope_parameters, scaling: &self.rope_scaling, theta: self.rope_theta, partial: self.partial_rotary_factor, default_partial: 0.5 }
    }

    /// Dims per head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size.checked_div(self.num_attention_heads).unwrap_or(0)
    }

    /// Key-value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// The RoPE base: `rope_parameters.rope_theta`, else the top-level `rope_theta`, else 10000.
    pub fn theta(&self) -> f64 {
        self.rope().theta()
    }

    /// Rotated dims per head: `int(head_dim · partial_rotary_factor)`, the factor 0.5 where
    /// neither form gives it (transformers' default).
    pub fn rotary_dims(&self) -> usize {
        self.rope().rotary_dims(self.head_dim())
    }

    /// The inverse frequencies of the rotated pairs (`default` or `linear`; another kind is an
    /// error naming it).
    fn inv_freq(&self, path: &std::path::Path) -> Result<Vec<f32>> {
        self.rope().inv_freq(self.head_dim(), "Phi", path)
    }
}

#[derive(Module, Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    dense: Linear,
    q_layernorm: Option<LayerNorm>,
    k_layernorm: Option<LayerNorm>,
    n_heads: usize,
    n_kv_heads: usize,
    scale: f64,
}

#[derive(Module, Debug)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    exact_gelu: bool,
}

#[derive(Module, Debug)]
struct Layer {
    input_layernorm: LayerNorm,
    self_attn: Attention,
    mlp: Mlp,
}

/// A Phi language model (`PhiForCausalLM`).
#[derive(Module, Debug)]
pub struct Phi {
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    final_layernorm: LayerNorm,
    /// `[hidden, vocab]`; `None` when tied to the embeddings.
    lm_head: Option<Param<Tensor<2>>>,
    /// `[vocab]`, present tied or not.
    lm_head_bias: Param<Tensor<1>>,
    inv_freq: Vec<f32>,
}

impl Attention {
    fn forward(&self, x: Tensor<3>, cos: &Tensor<4>, sin: &Tensor<4>, mask: &Tensor<4, Bool>, layer: usize, cache: Option<&mut KvCache>) -> Tensor<3> {
        let q = split_heads(self.q_proj.forward(x.clone()), self.n_heads);
        let k = split_heads(self.k_proj.forward(x.clone()), self.n_kv_heads);
        let v = split_heads(self.v_proj.forward(x), self.n_kv_heads);
        let (q, k) = match (&self.q_layernorm, &self.k_layernorm) {
            (Some(qn), Some(kn)) => (qn.forward(q), kn.forward(k)),
            _ => (q, k),
        };
        // cos and sin span the rotated dims only: the rest of each head passes as it is.
        let (q, k) = (rotate_half(q, cos, sin), rotate_half(k, cos, sin));
        let (k, v) = match cache {
            Some(cache) => cache.append(layer, k, v),
            None => (k, v),
        };
        self.dense.forward(merge_heads(grouped_attention(q, k, v, mask, self.scale)))
    }
}

impl Mlp {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = self.fc1.forward(x);
        self.fc2.forward(if self.exact_gelu { gelu(h) } else { gelu_approximate(h) })
    }
}

impl Phi {
    /// Builds the model from HF-named weights (`model.layers.N.self_attn.q_proj.weight`, ...,
    /// `lm_head.weight` and `lm_head.bias`).
    pub fn load(cfg: &PhiConfig, w: &mut Weights, device: &Device) -> Result<Self> {
        let exact_gelu = match cfg.hidden_act.as_str() {
            "gelu" => true,
            "gelu_new" | "gelu_fast" | "gelu_pytorch_tanh" => false,
            other => return Err(ModelError::config(w.path(), format!("hidden_act `{other}` is not implemented; expected gelu_new or gelu"))),
        };
        let (d, v, eps, nh, nkv) = (cfg.hidden_size, cfg.vocab_size, cfg.layer_norm_eps, cfg.num_attention_heads, cfg.kv_heads());
        crate::layers::sizes_at_least_one(&[("vocab_size", v), ("hidden_size", d), ("intermediate_size", cfg.intermediate_size), ("num_key_value_heads", nkv)], w.path())?;
        if nh == 0 || !d.is_multiple_of(nh) || !nh.is_multiple_of(nkv) {
            return Err(ModelError::config(
                w.path(),
                format!("hidden_size ({d}) must be a multiple of num_attention_heads ({nh}), and that a multiple of num_key_value_heads ({nkv})"),
            ));
        }
        if !(eps.is_finite() && eps > 0.0) {
            return Err(ModelError::config(w.path(), format!("layer_norm_eps is {eps}; expected a positive number")));
        }
        let inv_freq = cfg.inv_freq(w.path())?;
        let hd = cfg.head_dim();
        let norm = |n: usize| cfg.qk_layernorm.then(|| names::layer_norm(n, eps, device));
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| Layer {
                input_layernorm: names::layer_norm(d, eps, device),
                self_attn: Attention {
                    q_proj: names::linear(d, nh * hd, true, device),
                    k_proj: names::linear(d, nkv * hd, true, device),
                    v_proj: names::linear(d, nkv * hd, true, device),
                    dense: names::linear(nh * hd, d, true, device),
                    q_layernorm: norm(hd),
                    k_layernorm: norm(hd),
                    n_heads: nh,
                    n_kv_heads: nkv,
                    scale: 1.0 / (hd as f64).sqrt(),
                },
                mlp: Mlp {
                    fc1: names::linear(d, cfg.intermediate_size, true, device),
                    fc2: names::linear(cfg.intermediate_size, d, true, device),
                    exact_gelu,
                },
            })
            .collect();
        let mut model = Self {
            embed_tokens: Embedding { weight: names::lazy([v, d], device) },
            layers,
            final_layernorm: names::layer_norm(d, eps, device),
            lm_head: (!cfg.tie_word_embeddings).then(|| names::lazy([d, v], device)),
            lm_head_bias: names::lazy([v], device),
            inv_freq,
        };
        names::fill(model.named_mut(), w, device)?;
        Ok(model)
    }

    /// Every parameter under its HF name: the one list loading, saving and LoRA read.
    pub(crate) fn named_mut(&mut self) -> Table<'_> {
        let mut t: Table<'_> = vec![("model.embed_tokens.weight".into(), Slot::Matrix(&mut self.embed_tokens.weight))];
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            t.push((format!("{p}.input_layernorm"), Slot::LayerNorm(&mut l.input_layernorm)));
            let a = &mut l.self_attn;
            t.push((format!("{p}.self_attn.q_proj"), Slot::Linear(&mut a.q_proj)));
            t.push((format!("{p}.self_attn.k_proj"), Slot::Linear(&mut a.k_proj)));
            t.push((format!("{p}.self_attn.v_proj"), Slot::Linear(&mut a.v_proj)));
            t.push((format!("{p}.self_attn.dense"), Slot::Linear(&mut a.dense)));
            if let (Some(qn), Some(kn)) = (&mut a.q_layernorm, &mut a.k_layernorm) {
                t.push((format!("{p}.self_attn.q_layernorm"), Slot::LayerNorm(qn)));
                t.push((format!("{p}.self_attn.k_layernorm"), Slot::LayerNorm(kn)));
            }
            t.push((format!("{p}.mlp.fc1"), Slot::Linear(&mut l.mlp.fc1)));
            t.push((format!("{p}.mlp.fc2"), Slot::Linear(&mut l.mlp.fc2)));
        }
        t.push(("model.final_layernorm".into(), Slot::LayerNorm(&mut self.final_layernorm)));
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
        let [_, t] = input_ids.dims();
        let mut x = embed(&self.embed_tokens, input_ids);
        let (cos, sin) = rotate_half_cos_sin(&self.inv_freq, 1.0, positions(mask, t), x.dtype());
        let causal = attention_mask(mask, t, &x.device());
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(x.clone());
            let a = layer.self_attn.forward(h.clone(), &cos, &sin, &causal, i, cache.as_deref_mut());
            x = x + a + layer.mlp.forward(h);
        }
        self.final_layernorm.forward(x)
    }

    /// Logits `[B, T, V]`: the LM head on [`Self::hidden`].
    pub fn forward(&self, input_ids: Tensor<2, Int>, mask: &Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.head(self.hidden(input_ids, mask, cache))
    }

    /// The LM head: logits `[B, T, V]` of final hidden states `[B, T, D]`.
    pub fn head(&self, x: Tensor<3>) -> Tensor<3> {
        let logits = match &self.lm_head {
            Some(w) => linear_3d(x, &w.val()),
            None => tied_head(x, &self.embed_tokens.weight.val()),
        };
        logits + self.lm_head_bias.val().unsqueeze::<3>()
    }

    /// Entries of the vocabulary: the rows of the token embedding, the columns of the logits.
    pub fn vocab_size(&self) -> usize {
        self.embed_tokens.weight.val().dims()[0]
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

    fn config(extra: Value) -> PhiConfig {
        let mut v = serde_json::json!({
            "vocab_size": 8, "hidden_size": 160, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2
        });
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn published_and_transformers_5_rope_keys_agree() {
        // Phi-2's own config.json against the form transformers 5 writes.
        let old = config(serde_json::json!({"partial_rotary_factor": 0.4, "rope_theta": 10000.0, "rope_scaling": null}));
        let new = config(serde_json::json!({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.4}}));
        let path = std::path::Path::new("config.json");
        assert_eq!((old.rotary_dims(), old.theta()), (32, 10_000.0));
        assert_eq!(old.inv_freq(path).unwrap(), new.inv_freq(path).unwrap());
        // transformers' default factor is 0.5; the first pair turns once per position.
        let defaults = config(serde_json::json!({}));
        assert_eq!(defaults.rotary_dims(), 40);
        assert_eq!(defaults.inv_freq(path).unwrap()[0], 1.0);
        // transformers 4's linear scaling divides every frequency by its factor.
        let scaled = config(serde_json::json!({"rope_scaling": {"type": "linear", "factor": 4.0}}));
        let plain = defaults.inv_freq(path).unwrap();
        assert!(scaled.inv_freq(path).unwrap().iter().zip(&plain).all(|(s, p)| *s == p / 4.0));
        let dynamic = config(serde_json::json!({"rope_scaling": {"type": "dynamic", "factor": 4.0}}));
        assert!(dynamic.inv_freq(path).unwrap_err().to_string().contains("rope_type `dynamic` is not implemented for Phi"));
    }
}
