//! StableLM (Bellagente et al. 2024, "Stable LM 2 1.6B Technical Report", arXiv 2402.17834;
//! StableLM-3B-4E1T, StableLM 2 12B), following HF transformers' `models/stablelm/modeling_stablelm.py`:
//! LayerNorm with a bias, rotate-half RoPE on the first `int(head_dim · partial_rotary_factor)`
//! dims of each head (a quarter by default), grouped-query attention with optional q/k/v biases
//! (`use_qkv_bias`) and an output projection without one, an optional LayerNorm of each query head
//! and each key head with weights of its own and no bias (`qk_layernorm`, StableLM 2 12B), a SwiGLU
//! MLP without biases, the attention and the MLP in sequence (a second LayerNorm before the MLP) or,
//! with `use_parallel_residual`, in parallel from one LayerNorm, and an LM head without a bias.
//!
//! Tested against transformers on tiny random models (`tests/fixtures/stablelm2`,
//! `tests/fixtures/stablelm_parallel`).

use burn::module::{Module, Param};
use burn::nn::{Embedding, LayerNorm};
use burn::tensor::activation::silu;
use burn::tensor::{Bool, DType, Device, Int, Tensor};
use odpo_kernels::Gate;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::layers::{KvCache, attention_mask, embed, grouped_attention, linear_3d, merge_heads, positions, rotate_half, rotate_half_cos_sin, split_heads, tied_head};
use crate::linear::Linear;
use crate::names::{self, Slot, Table};
use crate::weights::Weights;

/// A StableLM `config.json` (`StableLmForCausalLM`), with HF's key names (extra keys are ignored).
/// RoPE settings are read as transformers 5 writes them (`rope_parameters`) or at the top level
/// (`rope_theta`, `partial_rotary_factor`, `rope_scaling`), as the published checkpoints have them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StableLmConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP width (of the gate and of the up projection each).
    pub intermediate_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key-value heads (32 where absent, as transformers reads it).
    #[serde(default = "default_kv_heads")]
    pub num_key_value_heads: usize,
    /// MLP activation; only `silu` is implemented.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Maximum sequence length.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    /// RoPE base at the top level.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Fraction of each head's dims that rotate, at the top level.
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    /// RoPE scaling as transformers 4 writes it.
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    /// RoPE settings as transformers 5 writes them.
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    /// Biases on the query, key and value projections.
    #[serde(default)]
    pub use_qkv_bias: bool,
    /// A LayerNorm of each query head and each key head, weights of its own, no bias.
    #[serde(default)]
    pub qk_layernorm: bool,
    /// `x + attn(ln(x)) + mlp(ln(x))` when true; `y = x + attn(ln1(x)); y + mlp(ln2(y))` when false.
    #[serde(default)]
    pub use_parallel_residual: bool,
    /// Whether the head shares the token embedding matrix.
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

fn default_kv_heads() -> usize {
    32
}
fn default_act() -> String {
    "silu".into()
}
fn default_max_pos() -> usize {
    4096
}
fn default_ln_eps() -> f64 {
    1e-5
}

impl StableLmConfig {
    /// Its RoPE settings, in either form.
    fn rope(&self) -> crate::layers::PartialRope<'_> {
        crate::layers::PartialRope { parameters: &self.rope_parameters, scaling: &self.rope_scaling, theta: self.rope_theta, partial: self.partial_rotary_factor, default_partial: 0.25 }
    }

    /// Dims per head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size.checked_div(self.num_attention_heads).unwrap_or(0)
    }

    /// The RoPE base: `rope_parameters.rope_theta`, else the top-level `rope_theta`, else 10000.
    pub fn theta(&self) -> f64 {
        self.rope().theta()
    }

    /// Rotated dims per head: `int(head_dim · partial_rotary_factor)`, the factor 0.25 where
    /// neither form gives it (transformers' default).
    pub fn rotary_dims(&self) -> usize {
        self.rope().rotary_dims(self.head_dim())
    }

    /// The inverse frequencies of the rotated pairs (`default` or `linear`; another kind is an
    /// error naming it).
    fn inv_freq(&self, path: &std::path::Path) -> Result<Vec<f32>> {
        self.rope().inv_freq(self.head_dim(), "StableLM", path)
    }
}

/// A LayerNorm of each head over its dims, with a weight of its own per head and no bias
/// (transformers' `StableLmLayerNormPerHead`), computed for all heads at once.
#[derive(Module, Debug)]
struct HeadNorms {
    /// One `[head_dim]` weight per head.
    weights: Vec<Param<Tensor<1>>>,
    eps: f64,
}

impl HeadNorms {
    /// `x` `[B, H, T, Dh]`, each head normalised over its `Dh` dims (statistics in f32) and scaled by
    /// its weight.
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let dtype = x.dtype();
        let [_, h, _, d] = x.dims();
        let x = x.cast(DType::F32);
        let centred = x.clone() - x.mean_dim(3);
        let var = centred.clone().square().mean_dim(3);
        let normed = (centred / (var + self.eps).sqrt()).cast(dtype);
        let weight = Tensor::stack::<2>(self.weights.iter().map(Param::val).collect(), 0).reshape([1, h, 1, d]);
        normed * weight
    }
}

#[derive(Module, Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_layernorm: Option<HeadNorms>,
    k_layernorm: Option<HeadNorms>,
    n_heads: usize,
    n_kv_heads: usize,
    scale: f64,
}

#[derive(Module, Debug)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

#[derive(Module, Debug)]
struct Layer {
    input_layernorm: LayerNorm,
    /// The norm before the MLP; `None` with the parallel residual, whose MLP reads the first.
    post_attention_layernorm: Option<LayerNorm>,
    self_attn: Attention,
    mlp: Mlp,
}

/// A StableLM language model (`StableLmForCausalLM`).
#[derive(Module, Debug)]
pub struct StableLm {
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: LayerNorm,
    /// `[hidden, vocab]`; `None` when tied to the embeddings.
    lm_head: Option<Param<Tensor<2>>>,
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
        self.o_proj.forward(merge_heads(grouped_attention(q, k, v, mask, self.scale)))
    }
}

impl Mlp {
    /// `down(silu(gate(x)) · up(x))`, the gate one recorded operation where the backend has
    /// `odpo_kernels::glu`.
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let (g, u) = (self.gate_proj.forward(x.clone()), self.up_proj.forward(x));
        self.down_proj.forward(odpo_kernels::glu(g.clone(), u.clone(), Gate::Silu).unwrap_or_else(|| silu(g) * u))
    }
}

impl StableLm {
    /// Builds the model from HF-named weights (`model.layers.N.self_attn.q_proj.weight`, ...,
    /// `model.layers.N.self_attn.q_layernorm.norms.H.weight`, `lm_head.weight`).
    pub fn load(cfg: &StableLmConfig, w: &mut Weights, device: &Device) -> Result<Self> {
        if cfg.hidden_act != "silu" {
            return Err(ModelError::config(w.path(), format!("hidden_act `{}` is not implemented; expected silu", cfg.hidden_act)));
        }
        let (d, v, eps, nh, nkv) = (cfg.hidden_size, cfg.vocab_size, cfg.layer_norm_eps, cfg.num_attention_heads, cfg.num_key_value_heads);
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
        let (hd, ff, bias) = (cfg.head_dim(), cfg.intermediate_size, cfg.use_qkv_bias);
        let head_norms = |heads: usize| cfg.qk_layernorm.then(|| HeadNorms { weights: (0..heads).map(|_| names::lazy([hd], device)).collect(), eps });
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| Layer {
                input_layernorm: names::layer_norm(d, eps, device),
                post_attention_layernorm: (!cfg.use_parallel_residual).then(|| names::layer_norm(d, eps, device)),
                self_attn: Attention {
                    q_proj: names::linear(d, nh * hd, bias, device),
                    k_proj: names::linear(d, nkv * hd, bias, device),
                    v_proj: names::linear(d, nkv * hd, bias, device),
                    o_proj: names::linear(nh * hd, d, false, device),
                    q_layernorm: head_norms(nh),
                    k_layernorm: head_norms(nkv),
                    n_heads: nh,
                    n_kv_heads: nkv,
                    scale: 1.0 / (hd as f64).sqrt(),
                },
                mlp: Mlp { gate_proj: names::linear(d, ff, false, device), up_proj: names::linear(d, ff, false, device), down_proj: names::linear(ff, d, false, device) },
            })
            .collect();
        let mut model = Self {
            embed_tokens: Embedding { weight: names::lazy([v, d], device) },
            layers,
            norm: names::layer_norm(d, eps, device),
            lm_head: (!cfg.tie_word_embeddings).then(|| names::lazy([d, v], device)),
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
            t.push((format!("{p}.self_attn.o_proj"), Slot::Linear(&mut a.o_proj)));
            for (which, norms) in [("q_layernorm", &mut a.q_layernorm), ("k_layernorm", &mut a.k_layernorm)] {
                for (h, w) in norms.iter_mut().flat_map(|n| n.weights.iter_mut()).enumerate() {
                    t.push((format!("{p}.self_attn.{which}.norms.{h}.weight"), Slot::Vector(w)));
                }
            }
            if let Some(n) = &mut l.post_attention_layernorm {
                t.push((format!("{p}.post_attention_layernorm"), Slot::LayerNorm(n)));
            }
            t.push((format!("{p}.mlp.gate_proj"), Slot::Linear(&mut l.mlp.gate_proj)));
            t.push((format!("{p}.mlp.up_proj"), Slot::Linear(&mut l.mlp.up_proj)));
            t.push((format!("{p}.mlp.down_proj"), Slot::Linear(&mut l.mlp.down_proj)));
        }
        t.push(("model.norm".into(), Slot::LayerNorm(&mut self.norm)));
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
        let mut x = embed(&self.embed_tokens, input_ids);
        let (cos, sin) = rotate_half_cos_sin(&self.inv_freq, 1.0, positions(mask, t), x.dtype());
        let causal = attention_mask(mask, t, &x.device());
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(x.clone());
            let a = layer.self_attn.forward(h.clone(), &cos, &sin, &causal, i, cache.as_deref_mut());
            x = match &layer.post_attention_layernorm {
                None => x + a + layer.mlp.forward(h),
                Some(norm) => {
                    let y = x + a;
                    y.clone() + layer.mlp.forward(norm.forward(y))
                }
            };
        }
        self.norm.forward(x)
    }

    /// Logits `[B, T, V]`: the LM head on [`Self::hidden`].
    pub fn forward(&self, input_ids: Tensor<2, Int>, mask: &Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.head(self.hidden(input_ids, mask, cache))
    }

    /// The LM head: logits `[B, T, V]` of final hidden states `[B, T, D]`.
    pub fn head(&self, x: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(w) => linear_3d(x, &w.val()),
            None => tied_head(x, &self.embed_tokens.weight.val()),
        }
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

    #[test]
    fn top_level_and_transformers_5_rope_keys_agree() {
        let config = |extra: Value| -> StableLmConfig {
            let mut v = serde_json::json!({"vocab_size": 8, "hidden_size": 128, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2});
            v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            serde_json::from_value(v).unwrap()
        };
        // StableLM 2 1.6B's own keys against the form transformers 5 writes.
        let old = config(serde_json::json!({"partial_rotary_factor": 0.25, "rope_theta": 10000, "rope_scaling": null}));
        let new = config(serde_json::json!({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}}));
        let path = std::path::Path::new("config.json");
        assert_eq!((old.rotary_dims(), old.theta(), old.num_key_value_heads), (16, 10_000.0, 32));
        assert_eq!(old.inv_freq(path).unwrap(), new.inv_freq(path).unwrap());
        // transformers' default factor is a quarter; linear scaling divides every frequency.
        let defaults = config(serde_json::json!({}));
        assert_eq!(defaults.rotary_dims(), 16);
        let scaled = config(serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.0}}));
        let plain = defaults.inv_freq(path).unwrap();
        assert!(scaled.inv_freq(path).unwrap().iter().zip(&plain).all(|(s, p)| *s == p / 2.0));
        let yarn = config(serde_json::json!({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}));
        assert!(yarn.inv_freq(path).unwrap_err().to_string().contains("rope_type `yarn` is not implemented for StableLM"));
    }
}
