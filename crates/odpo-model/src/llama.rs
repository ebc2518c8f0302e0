//! The Llama family (Touvron et al. 2023, arXiv 2302.13971; Llama 3's RoPE scaling from
//! arXiv 2407.21783), following HF transformers' `models/llama/modeling_llama.py`: RMSNorm,
//! rotate-half rotary embeddings with `rope_theta` and optional `llama3` frequency scaling,
//! grouped-query attention, a SwiGLU MLP, optional q/k/v(/o) bias, tied or untied LM head.
//! One file serves Llama 2/3, Mistral (a sliding attention window in every layer), Qwen2 (q/k/v
//! bias, `modeling_qwen2.py`; a sliding window in the upper layers where `use_sliding_window`),
//! Qwen3 (an RMSNorm over each head's queries and keys before the rotation, `modeling_qwen3.py`),
//! OLMo 2 (Groeneveld et al. / OLMo Team 2024, arXiv 2501.00656, `modeling_olmo2.py`: no norm
//! before the attention and the MLP but one after each, on the branch before the residual sum, and
//! an RMSNorm over all query heads and over all key heads together before the rotation), SmolLM3
//! (`modeling_smollm3.py`: layers without the rotation, NoPE, by default every fourth), Granite
//! (`modeling_granite.py`: embeddings, residual branches, attention scores and logits scaled by
//! the config's four multipliers) and SmolLM2, which differ only by configuration.
//!
//! Tested against transformers on tiny random Llama / Qwen2 / Qwen3 / OLMo 2 / SmolLM3 / Granite
//! models and on SmolLM2-135M-Instruct.

use burn::module::{Module, Param};
use burn::nn::{Embedding, RmsNorm};
use crate::linear::Linear;
use burn::tensor::activation::silu;
use burn::tensor::{Bool, Device, Int, Tensor};
use odpo_kernels::Gate;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::layers::{KvCache, attention_mask, embed, grouped_attention, linear_3d, merge_heads, positions, rotate_half, rotate_half_cos_sin, sliding_layers, sliding_window_mask, split_heads, tied_head};
use crate::names::{self, Slot, Table};
use crate::weights::Weights;

/// A Llama-family `config.json`, with HF's key names (extra keys are ignored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `llama`, `mistral`, `qwen2`, `qwen3`, `olmo2`, `smollm3`, `granite`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head size; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base, as older configs give it at the top level.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE settings as transformers 5 writes them (`rope_theta`, `rope_type`, scaling fields).
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    /// RoPE scaling as older configs give it.
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    /// Maximum sequence length.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Whether the LM head shares the token embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v/o projections (Llama's option).
    #[serde(default)]
    pub attention_bias: bool,
    /// Bias on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// The attention window of Mistral's layers (`null`: none; the key absent: transformers'
    /// default, 4096, set by [`crate::ModelConfig::from_hf_json`]), and of Qwen2 / Qwen3's sliding
    /// layers where `use_sliding_window`.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2 / Qwen3: whether the layers `layer_types` names `sliding_attention` (by default those
    /// from `max_window_layers` on) attend within `sliding_window`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub use_sliding_window: bool,
    /// Qwen2 / Qwen3: the first layer that slides when `layer_types` is not given (default 28).
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    /// Qwen2 / Qwen3 (transformers 5): `full_attention` or `sliding_attention` for each layer.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// SmolLM3: for each layer, 1 where it rotates its queries and keys and 0 where it does not.
    #[serde(default)]
    pub no_rope_layers: Option<Vec<i64>>,
    /// SmolLM3: without `no_rope_layers`, every this-many-th layer goes without the rotation
    /// (transformers' default 4).
    #[serde(default)]
    pub no_rope_layer_interval: Option<usize>,
    /// Granite: the token embeddings' scale (transformers' default 1).
    #[serde(default)]
    pub embedding_multiplier: Option<f64>,
    /// Granite: the scale of each attention and MLP output before it joins the residual stream.
    #[serde(default)]
    pub residual_multiplier: Option<f64>,
    /// Granite: the attention scores' scale, in place of 1/√`head_dim`.
    #[serde(default)]
    pub attention_multiplier: Option<f64>,
    /// Granite: the logits are the LM head's output divided by this.
    #[serde(default)]
    pub logits_scaling: Option<f64>,
    /// MLP activation; only `silu` is implemented.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Beginning-of-sequence token.
    #[serde(default)]
    pub bos_token_id: Option<Value>,
    /// End-of-sequence token(s).
    #[serde(default)]
    pub eos_token_id: Option<Value>,
    /// Padding token, written back as read: where it is absent transformers takes its config's
    /// default (SmolLM3's 128,004), which need not be a token of the model.
    #[serde(default)]
    pub pad_token_id: Option<Value>,
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}

/// Llama 3's frequency-dependent RoPE scaling.
#[derive(Clone, Debug, PartialEq)]
struct Llama3Scaling {
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original_max_position_embeddings: f64,
}

impl LlamaConfig {
    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head size.
    pub fn head_size(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    fn rope_field(&self, key: &str) -> Option<&Value> {
        self.rope_parameters.as_ref().and_then(|p| p.get(key)).or_else(|| self.rope_scaling.as_ref().and_then(|p| p.get(key)))
    }

    /// The RoPE base: top-level `rope_theta`, else `rope_parameters.rope_theta`, else 10000.
    pub fn theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| self.rope_parameters.as_ref().and_then(|p| p.get("rope_theta")).and_then(Value::as_f64))
            .unwrap_or(10_000.0)
    }

    fn scaling(&self, path: &std::path::Path) -> Result<Option<Llama3Scaling>> {
        let kind = self.rope_field("rope_type").or_else(|| self.rope_field("type")).and_then(Value::as_str).unwrap_or("default");
        match kind {
            "default" => Ok(None),
            "llama3" => {
                let get = |k: &str| {
                    self.rope_field(k)
                        .and_then(Value::as_f64)
                        .ok_or_else(|| ModelError::config(path, format!("rope scaling `llama3` needs a number `{k}`")))
                };
                Ok(Some(Llama3Scaling {
                    factor: get("factor")?,
                    low_freq_factor: get("low_freq_factor")?,
                    high_freq_factor: get("high_freq_factor")?,
                    original_max_position_embeddings: get("original_max_position_embeddings")?,
                }))
            }
            other => Err(ModelError::config(
                path,
                format!("rope_type `{other}` is not implemented; expected `default` or `llama3`"),
            )),
        }
    }

    /// Inverse frequencies of the rotary embedding, computed as transformers does (f32), with
    /// Llama 3 scaling applied when configured.
    fn inv_freq(&self, path: &std::path::Path) -> Result<Vec<f32>> {
        let dim = self.head_size();
        let base = self.theta() as f32;
        let mut inv: Vec<f32> = (0..dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32)).collect();
        if let Some(s) = self.scaling(path)? {
            let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
            for f in &mut inv {
                let freq = f64::from(*f);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let scaled = if wavelen > low_wavelen { freq / s.factor } else { freq };
                let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                *f = if medium { ((1.0 - smooth) * scaled / s.factor + smooth * scaled) as f32 } else { scaled as f32 };
            }
        }
        Ok(inv)
    }

    fn qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type == "qwen2"
    }

    /// Whether transformers' config of this model type has a `sliding_window` key (Mistral, Qwen2,
    /// Qwen3), whose absence it reads as 4096 and `null` as no window.
    pub(crate) fn has_window_key(&self) -> bool {
        matches!(self.model_type.as_str(), "mistral" | "qwen2" | "qwen3")
    }

    /// The attention window of each layer (`None`: the whole causal past), as transformers sets it:
    /// every layer of a Mistral; for Qwen2 / Qwen3 with `use_sliding_window`, the layers
    /// `layer_types` marks `sliding_attention`, or without it those from `max_window_layers` on.
    pub fn layer_windows(&self, path: &std::path::Path) -> Result<Vec<Option<usize>>> {
        let n = self.num_hidden_layers;
        let window = match self.model_type.as_str() {
            "mistral" => self.sliding_window,
            "qwen2" | "qwen3" | "smollm3" if self.use_sliding_window => self.sliding_window,
            _ => None,
        };
        let Some(w) = window else { return Ok(vec![None; n]) };
        if w == 0 {
            return Err(ModelError::config(path, "sliding_window must be at least 1"));
        }
        if self.model_type == "mistral" {
            return Ok(vec![Some(w); n]);
        }
        let sliding = match &self.layer_types {
            Some(types) => sliding_layers(types, n, path)?,
            // SmolLM3: the layers without the rotation.
            None if self.model_type == "smollm3" => self.layer_ropes(path)?.into_iter().map(|rope| !rope).collect(),
            None => (0..n).map(|i| i >= self.max_window_layers.unwrap_or(28)).collect(),
        };
        Ok(sliding.into_iter().map(|s| s.then_some(w)).collect())
    }

    /// Whether each layer rotates its queries and keys: all but SmolLM3's NoPE layers, which
    /// `no_rope_layers` lists (0), or else every `no_rope_layer_interval`-th (transformers' rule).
    pub fn layer_ropes(&self, path: &std::path::Path) -> Result<Vec<bool>> {
        let n = self.num_hidden_layers;
        if self.model_type != "smollm3" {
            return Ok(vec![true; n]);
        }
        match &self.no_rope_layers {
            Some(flags) if flags.len() != n => Err(ModelError::config(path, format!("no_rope_layers has {} entries; expected one per layer ({n})", flags.len()))),
            Some(flags) => Ok(flags.iter().map(|&f| f != 0).collect()),
            None => match self.no_rope_layer_interval.unwrap_or(4) {
                0 => Err(ModelError::config(path, "no_rope_layer_interval is 0; expected at least 1")),
                k => Ok((0..n).map(|i| (i + 1) % k != 0).collect()),
            },
        }
    }

    /// Granite's four multipliers (embeddings, residual branches, attention scores, logits' divisor),
    /// each checked to be a finite number (the divisor also non-zero); 1, 1, 1/√`head_dim`, 1 for the
    /// other families, whatever the keys say, as transformers reads them only for Granite.
    fn multipliers(&self, path: &std::path::Path) -> Result<[f64; 4]> {
        let plain = 1.0 / (self.head_size() as f64).sqrt();
        if self.model_type != "granite" {
            return Ok([1.0, 1.0, plain, 1.0]);
        }
        let get = |key: &str, v: Option<f64>| match v.unwrap_or(1.0) {
            x if !x.is_finite() || (key == "logits_scaling" && x == 0.0) => Err(ModelError::config(path, format!("{key} is {x}; expected a finite number{}", if key == "logits_scaling" { " other than 0" } else { "" }))),
            x => Ok(x),
        };
        Ok([
            get("embedding_multiplier", self.embedding_multiplier)?,
            get("residual_multiplier", self.residual_multiplier)?,
            get("attention_multiplier", self.attention_multiplier)?,
            get("logits_scaling", self.logits_scaling)?,
        ])
    }

    /// Qwen3's RMSNorm of each head's queries and keys (`q_norm`, `k_norm`, over `head_dim`).
    fn qk_norm(&self) -> bool {
        self.model_type == "qwen3"
    }

    /// OLMo 2's layer: its norms after the attention and the MLP (on their outputs, before the
    /// residual sums) instead of before them, and its query and key norms over all heads together.
    pub(crate) fn olmo2(&self) -> bool {
        self.model_type == "olmo2"
    }
}

#[derive(Module, Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Qwen3: RMSNorm over each query head and key head, before the rotation; OLMo 2: over all
    /// query heads and all key heads together.
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    /// Whether `q_norm` and `k_norm` norm all heads together (OLMo 2) rather than each head (Qwen3).
    norm_whole: bool,
    /// Mistral's and Qwen's sliding window, on the layers that have one.
    window: Option<usize>,
    /// Whether the queries and keys are rotated (not in SmolLM3's NoPE layers).
    rope: bool,
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
    /// Before the attention; OLMo 2 has none.
    input_layernorm: Option<RmsNorm>,
    self_attn: Attention,
    /// Before the MLP; OLMo 2's is on the attention's output, before the residual sum.
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    /// OLMo 2: on the MLP's output, before the residual sum.
    post_feedforward_layernorm: Option<RmsNorm>,
}

/// A Llama-family causal language model (`LlamaForCausalLM`, `Qwen2ForCausalLM`,
/// `Qwen3ForCausalLM`, `Olmo2ForCausalLM`, ...).
#[derive(Module, Debug)]
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// `[hidden, vocab]`; `None` when tied to the embeddings.
    lm_head: Option<Param<Tensor<2>>>,
    inv_freq: Vec<f32>,
    /// Granite's scales of the embeddings and of the residual branches, and the logits' divisor
    /// (1 elsewhere).
    embedding_multiplier: f64,
    residual_multiplier: f64,
    logits_scaling: f64,
}

/// burn's `RmsNorm` as one recorded operation where the backend has `odpo_kernels::rms_norm`.
fn rms_norm(norm: &RmsNorm, x: Tensor<3>) -> Tensor<3> {
    odpo_kernels::rms_norm(x.clone(), norm.gamma.val(), norm.epsilon).unwrap_or_else(|| norm.forward(x))
}

/// Qwen3's per-head RMSNorm of projected queries or keys `[B, T, heads·Dh]`: the rows of every
/// head normed over `Dh` (a free reshape to `[B, T·heads, Dh]` and back); with `heads` 1, OLMo 2's
/// norm over the whole row; `x` itself without a norm.
fn head_norm(norm: Option<&RmsNorm>, x: Tensor<3>, heads: usize) -> Tensor<3> {
    let Some(norm) = norm else { return x };
    let [b, t, d] = x.dims();
    rms_norm(norm, x.reshape([b, t * heads, d / heads])).reshape([b, t, d])
}

impl Attention {
    fn forward(&self, x: Tensor<3>, cos: &Tensor<4>, sin: &Tensor<4>, mask: &Tensor<4, Bool>, layer: usize, cache: Option<&mut KvCache>) -> Tensor<3> {
        let groups = |heads: usize| if self.norm_whole { 1 } else { heads };
        let q = split_heads(head_norm(self.q_norm.as_ref(), self.q_proj.forward(x.clone()), groups(self.n_heads)), self.n_heads);
        let k = split_heads(head_norm(self.k_norm.as_ref(), self.k_proj.forward(x.clone()), groups(self.n_kv_heads)), self.n_kv_heads);
        let v = split_heads(self.v_proj.forward(x), self.n_kv_heads);
        let (q, k) = if self.rope { (rotate_half(q, cos, sin), rotate_half(k, cos, sin)) } else { (q, k) };
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

impl Llama {
    /// Builds the model from HF-named weights (`model.layers.N...`, `lm_head.weight` when untied).
    pub fn load(cfg: &LlamaConfig, w: &mut Weights, device: &Device) -> Result<Self> {
        if cfg.hidden_act != "silu" {
            return Err(ModelError::config(w.path(), format!("hidden_act `{}` is not implemented; expected silu", cfg.hidden_act)));
        }
        let sizes = [cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.kv_heads()];
        crate::layers::grouped_layer_sizes(sizes, w.path())?;
        // burn's RMSNorm asserts a positive epsilon.
        if !cfg.rms_norm_eps.is_finite() || cfg.rms_norm_eps <= 0.0 {
            return Err(ModelError::config(w.path(), format!("rms_norm_eps is {}; expected a positive number", cfg.rms_norm_eps)));
        }
        // The rotation turns pairs of a head's dimensions (its two halves).
        let hd = cfg.head_size();
        if hd == 0 || !hd.is_multiple_of(2) {
            return Err(ModelError::config(w.path(), format!("the head size (head_dim, else hidden_size / num_attention_heads) is {hd}; expected an even number")));
        }
        let (d, v) = (cfg.hidden_size, cfg.vocab_size);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.kv_heads());
        let inv_freq = cfg.inv_freq(w.path())?;
        let [embedding_multiplier, residual_multiplier, attention_multiplier, logits_scaling] = cfg.multipliers(w.path())?;
        let windows = cfg.layer_windows(w.path())?;
        let ropes = cfg.layer_ropes(w.path())?;
        let (eps, inner, qkv_bias, olmo2) = (cfg.rms_norm_eps, cfg.intermediate_size, cfg.qkv_bias(), cfg.olmo2());
        // Qwen3 norms each head's queries and keys, OLMo 2 all of a row's queries and all its keys.
        let (q_norm, k_norm) = if olmo2 { (Some(nh * hd), Some(nkv * hd)) } else if cfg.qk_norm() { (Some(hd), Some(hd)) } else { (None, None) };
        let layers = windows
            .into_iter()
            .zip(ropes)
            .map(|(window, rope)| Layer {
                input_layernorm: (!olmo2).then(|| names::rms_norm(d, eps, device)),
                self_attn: Attention {
                    q_proj: names::linear(d, nh * hd, qkv_bias, device),
                    k_proj: names::linear(d, nkv * hd, qkv_bias, device),
                    v_proj: names::linear(d, nkv * hd, qkv_bias, device),
                    o_proj: names::linear(nh * hd, d, cfg.attention_bias, device),
                    q_norm: q_norm.map(|n| names::rms_norm(n, eps, device)),
                    k_norm: k_norm.map(|n| names::rms_norm(n, eps, device)),
                    norm_whole: olmo2,
                    window,
                    rope,
                    n_heads: nh,
                    n_kv_heads: nkv,
                    scale: attention_multiplier,
                },
                post_attention_layernorm: names::rms_norm(d, eps, device),
                mlp: Mlp {
                    gate_proj: names::linear(d, inner, cfg.mlp_bias, device),
                    up_proj: names::linear(d, inner, cfg.mlp_bias, device),
                    down_proj: names::linear(inner, d, cfg.mlp_bias, device),
                },
                post_feedforward_layernorm: olmo2.then(|| names::rms_norm(d, eps, device)),
            })
            .collect();
        let mut model = Self {
            embed_tokens: Embedding { weight: names::lazy([v, d], device) },
            layers,
            norm: names::rms_norm(d, eps, device),
            lm_head: (!cfg.tie_word_embeddings).then(|| names::lazy([d, v], device)),
            inv_freq,
            embedding_multiplier,
            residual_multiplier,
            logits_scaling,
        };
        names::fill(model.named_mut(), w, device)?;
        Ok(model)
    }

    /// Every parameter under its HF name: the one list loading, saving and LoRA read.
    pub(crate) fn named_mut(&mut self) -> Table<'_> {
        let mut t: Table<'_> = vec![("model.embed_tokens.weight".into(), Slot::Matrix(&mut self.embed_tokens.weight))];
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            if let Some(n) = &mut l.input_layernorm {
                t.push((format!("{p}.input_layernorm"), Slot::RmsNorm(n)));
            }
            t.push((format!("{p}.self_attn.q_proj"), Slot::Linear(&mut l.self_attn.q_proj)));
            t.push((format!("{p}.self_attn.k_proj"), Slot::Linear(&mut l.self_attn.k_proj)));
            t.push((format!("{p}.self_attn.v_proj"), Slot::Linear(&mut l.self_attn.v_proj)));
            t.push((format!("{p}.self_attn.o_proj"), Slot::Linear(&mut l.self_attn.o_proj)));
            if let Some(n) = &mut l.self_attn.q_norm {
                t.push((format!("{p}.self_attn.q_norm"), Slot::RmsNorm(n)));
            }
            if let Some(n) = &mut l.self_attn.k_norm {
                t.push((format!("{p}.self_attn.k_norm"), Slot::RmsNorm(n)));
            }
            t.push((format!("{p}.post_attention_layernorm"), Slot::RmsNorm(&mut l.post_attention_layernorm)));
            t.push((format!("{p}.mlp.gate_proj"), Slot::Linear(&mut l.mlp.gate_proj)));
            t.push((format!("{p}.mlp.up_proj"), Slot::Linear(&mut l.mlp.up_proj)));
            t.push((format!("{p}.mlp.down_proj"), Slot::Linear(&mut l.mlp.down_proj)));
            if let Some(n) = &mut l.post_feedforward_layernorm {
                t.push((format!("{p}.post_feedforward_layernorm"), Slot::RmsNorm(n)));
            }
        }
        t.push(("model.norm".into(), Slot::RmsNorm(&mut self.norm)));
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
        if self.embedding_multiplier != 1.0 {
            x = x.mul_scalar(self.embedding_multiplier);
        }
        // Granite scales each branch on its way into the residual stream.
        let branch = |y: Tensor<3>| if self.residual_multiplier != 1.0 { y.mul_scalar(self.residual_multiplier) } else { y };
        let (cos, sin) = rotate_half_cos_sin(&self.inv_freq, positions(mask, t), x.dtype());
        let m = attention_mask(mask, t, &x.device());
        // Every sliding layer has the config's one window.
        let windowed = self.layers.iter().find_map(|l| l.self_attn.window).map(|w| sliding_window_mask(&m, w));
        for (i, layer) in self.layers.iter().enumerate() {
            let m = match (layer.self_attn.window, &windowed) {
                (Some(_), Some(windowed)) => windowed,
                _ => &m,
            };
            match &layer.post_feedforward_layernorm {
                // OLMo 2: each branch normed on its way into the residual stream.
                Some(post_ffn) => {
                    let a = layer.self_attn.forward(x.clone(), &cos, &sin, m, i, cache.as_deref_mut());
                    x = x + rms_norm(&layer.post_attention_layernorm, a);
                    x = x.clone() + rms_norm(post_ffn, layer.mlp.forward(x));
                }
                None => {
                    let h = layer.input_layernorm.as_ref().map_or_else(|| x.clone(), |n| rms_norm(n, x.clone()));
                    x = x + branch(layer.self_attn.forward(h, &cos, &sin, m, i, cache.as_deref_mut()));
                    x = x.clone() + branch(layer.mlp.forward(rms_norm(&layer.post_attention_layernorm, x)));
                }
            }
        }
        rms_norm(&self.norm, x)
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
        if self.logits_scaling != 1.0 { logits.div_scalar(self.logits_scaling) } else { logits }
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
    use serde_json::json;

    use super::LlamaConfig;
    use crate::ModelConfig;

    /// The Llama-family config of a small model of `layers` layers with the keys of `extra`.
    fn config(layers: usize, extra: serde_json::Value) -> crate::Result<LlamaConfig> {
        let mut v = json!({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": layers, "num_attention_heads": 2});
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        match ModelConfig::from_hf_json(&v, "c".as_ref())? {
            ModelConfig::Llama(c) => Ok(c),
            other => panic!("{other:?}"),
        }
    }

    fn windows(extra: serde_json::Value) -> crate::Result<Vec<Option<usize>>> {
        config(3, extra)?.layer_windows("c".as_ref())
    }

    /// OLMo 2's config: the architecture makes the layer (not `model_type` on a Llama), the
    /// epsilon defaults to transformers' 1e-5, and the export names the architecture again.
    #[test]
    fn olmo2_configs_follow_transformers() {
        let parse = |extra| config(1, extra).unwrap();
        let c = parse(json!({"architectures": ["Olmo2ForCausalLM"]}));
        assert!(c.olmo2() && c.rms_norm_eps == 1e-5, "{c:?}");
        assert_eq!(ModelConfig::Llama(c).to_hf_json()["architectures"], json!(["Olmo2ForCausalLM"]));
        assert_eq!(parse(json!({"model_type": "olmo2", "rms_norm_eps": 1e-6})).rms_norm_eps, 1e-6);
        assert!(parse(json!({"model_type": "olmo2"})).olmo2(), "model_type alone, without architectures");
        let llama = parse(json!({"architectures": ["LlamaForCausalLM"], "model_type": "olmo2"}));
        assert!(!llama.olmo2() && llama.rms_norm_eps == 1e-6, "{llama:?}");
    }

    /// SmolLM3's layers without the rotation, as `configuration_smollm3.py` sets them: the list,
    /// else every fourth (or `no_rope_layer_interval`-th) layer; with `use_sliding_window` those
    /// layers slide. Other families rotate in every layer, whatever the keys say.
    #[test]
    fn smollm3_nope_layers_follow_transformers() {
        let parse = |mut extra: serde_json::Value| {
            extra.as_object_mut().unwrap().entry("architectures").or_insert(json!(["SmolLM3ForCausalLM"]));
            config(8, extra).unwrap()
        };
        let ropes = |c: &LlamaConfig| c.layer_ropes("c".as_ref());
        let every_fourth = parse(json!({}));
        assert_eq!(ropes(&every_fourth).unwrap(), [true, true, true, false, true, true, true, false]);
        assert_eq!(every_fourth.layer_windows("c".as_ref()).unwrap(), vec![None; 8], "no window unless use_sliding_window");
        assert_eq!(ropes(&parse(json!({"no_rope_layer_interval": 3}))).unwrap(), [true, true, false, true, true, false, true, true]);
        let listed = parse(json!({"no_rope_layers": [0, 1, 1, 1, 1, 1, 1, 0], "use_sliding_window": true, "sliding_window": 5}));
        assert_eq!(ropes(&listed).unwrap(), [false, true, true, true, true, true, true, false]);
        let w = listed.layer_windows("c".as_ref()).unwrap();
        assert_eq!(w, [Some(5), None, None, None, None, None, None, Some(5)]);
        assert_eq!(ModelConfig::Llama(listed.clone()).to_hf_json()["architectures"], json!(["SmolLM3ForCausalLM"]));
        for (bad, says) in [(json!({"no_rope_layers": [1, 0]}), "no_rope_layers has 2 entries; expected one per layer (8)"), (json!({"no_rope_layer_interval": 0}), "no_rope_layer_interval is 0")] {
            let err = ropes(&parse(bad)).unwrap_err().to_string();
            assert!(err.starts_with("c: ") && err.contains(says), "{err}");
        }
        let mut llama = parse(json!({"architectures": ["LlamaForCausalLM"], "model_type": "smollm3", "no_rope_layers": [0, 0, 0, 0, 0, 0, 0, 0]}));
        assert_eq!(llama.model_type, "llama");
        assert_eq!(ropes(&llama).unwrap(), vec![true; 8]);
        llama.model_type = "qwen3".into();
        assert_eq!(ropes(&llama).unwrap(), vec![true; 8]);
    }

    /// Granite's multipliers are read for Granite alone (transformers' other configs ignore the
    /// keys), default to 1, and a logits' divisor of 0 or a value that is not finite is refused.
    #[test]
    fn granite_multipliers_follow_transformers() {
        let parse = |mut extra: serde_json::Value| {
            extra.as_object_mut().unwrap().entry("logits_scaling").or_insert(json!(4.0));
            config(1, extra).unwrap()
        };
        let path: &std::path::Path = "c".as_ref();
        assert_eq!(parse(json!({"architectures": ["GraniteForCausalLM"]})).multipliers(path).unwrap(), [1.0, 1.0, 1.0, 4.0]);
        assert_eq!(parse(json!({"architectures": ["LlamaForCausalLM"], "model_type": "granite"})).multipliers(path).unwrap(), [1.0, 1.0, 0.5, 1.0]);
        let err = parse(json!({"architectures": ["GraniteForCausalLM"], "logits_scaling": 0.0})).multipliers(path).unwrap_err().to_string();
        assert!(err.starts_with("c: ") && err.contains("logits_scaling is 0; expected a finite number other than 0"), "{err}");
        let mut nan = parse(json!({"architectures": ["GraniteForCausalLM"]}));
        nan.attention_multiplier = Some(f64::NAN);
        let err = nan.multipliers(path).unwrap_err().to_string();
        assert!(err.contains("attention_multiplier is NaN; expected a finite number"), "{err}");
    }

    /// Which layers slide, as transformers' configs decide it (`configuration_mistral.py`,
    /// `configuration_qwen2.py`, `configuration_qwen3.py`).
    #[test]
    fn sliding_layers_follow_transformers_configs() {
        let (none, all) = (vec![None; 3], |w| vec![Some(w); 3]);
        assert_eq!(windows(json!({"architectures": ["LlamaForCausalLM"], "sliding_window": 4})).unwrap(), none);
        // Mistral: every layer; the key absent is transformers' default, `null` no window.
        assert_eq!(windows(json!({"architectures": ["MistralForCausalLM"], "model_type": "mistral"})).unwrap(), all(4096));
        assert_eq!(windows(json!({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": null})).unwrap(), none);
        assert_eq!(windows(json!({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 5})).unwrap(), all(5));
        // Qwen: only with use_sliding_window; the layers from max_window_layers on, or as layer_types says.
        assert_eq!(windows(json!({"architectures": ["Qwen2ForCausalLM"], "sliding_window": 5})).unwrap(), none);
        assert_eq!(windows(json!({"architectures": ["Qwen3ForCausalLM"], "use_sliding_window": true, "max_window_layers": 1})).unwrap(), vec![None, Some(4096), Some(4096)]);
        assert_eq!(windows(json!({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": true, "sliding_window": 5})).unwrap(), none, "28 layers are full by default");
        let types = json!({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": true, "sliding_window": 5, "max_window_layers": 0,
                           "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]});
        assert_eq!(windows(types).unwrap(), vec![Some(5), None, Some(5)]);
        for (bad, says) in [
            (json!({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": true, "layer_types": ["full_attention"]}), "layer_types has 1 entries"),
            (json!({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": true, "layer_types": ["full_attention", "local", "full_attention"]}), "layer_types[1]: `local`"),
            (json!({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 0}), "at least 1"),
        ] {
            let err = windows(bad).unwrap_err().to_string();
            assert!(err.starts_with("c: ") && err.contains(says), "{err}");
        }
    }
}
