//! The Llama family (Touvron et al. 2023, arXiv 2302.13971; Llama 3's RoPE scaling from
//! arXiv 2407.21783), following HF transformers' `models/llama/modeling_llama.py`: RMSNorm,
//! rotate-half rotary embeddings with `rope_theta` and optional `linear`, `llama3` or YaRN
//! (Peng et al. 2023, arXiv 2309.00071) frequency scaling,
//! grouped-query attention, a SwiGLU MLP, optional q/k/v(/o) bias, tied or untied LM head.
//! One file serves Llama 2/3, Mistral (a sliding attention window in every layer), Qwen2 (q/k/v
//! bias, `modeling_qwen2.py`; a sliding window in the upper layers where `use_sliding_window`),
//! Qwen3 (an RMSNorm over each head's queries and keys before the rotation, `modeling_qwen3.py`),
//! OLMo 2 (Groeneveld et al. / OLMo Team 2024, arXiv 2501.00656, `modeling_olmo2.py`: no norm
//! before the attention and the MLP but one after each, on the branch before the residual sum, and
//! an RMSNorm over all query heads and over all key heads together before the rotation), OLMo 3
//! (`modeling_olmo3.py`: OLMo 2's layer, sliding layers, and a rotary embedding for each kind of
//! layer), SmolLM3
//! (`modeling_smollm3.py`: layers without the rotation, NoPE, by default every fourth), Granite
//! (`modeling_granite.py`: embeddings, residual branches, attention scores and logits scaled by
//! the config's four multipliers), Phi-3 (Abdin et al. 2024, arXiv 2404.14219, `modeling_phi3.py`:
//! the query, key and value projections fused in one `qkv_proj` and the gate and up projections in
//! one `gate_up_proj`, as PEFT adapts them; LongRoPE, Ding et al. 2024, arXiv 2402.13753, and
//! Phi-4-mini's rotation of part of each head), SmolLM2, and the mixtures of experts Mixtral
//! (`modeling_mixtral.py`: Mistral's layer with a sparse MLP), Qwen2-MoE (`modeling_qwen2_moe.py`,
//! with a shared expert) and Qwen3-MoE (`modeling_qwen3_moe.py`), whose sparse MLPs [`crate::moe`]
//! holds; they differ only by configuration.
//!
//! Tested against transformers on tiny random Llama / Qwen2 / Qwen3 / OLMo 2 / OLMo 3 / SmolLM3 / Granite /
//! Phi-3 / Mixtral / Qwen2-MoE / Qwen3-MoE models and on SmolLM2-135M-Instruct.

use burn::module::{Module, Param};
use burn::nn::{Embedding, RmsNorm};
use crate::linear::{Adapter, Linear};
use burn::tensor::activation::silu;
use burn::tensor::{Bool, Device, Int, Tensor};
use odpo_kernels::Gate;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::moe::{MoeLayout, RouterStats, SparseMoe};
use crate::layers::{KvCache, attention_mask, embed, grouped_attention, linear_3d, merge_heads, positions, rotate_half, rotate_half_cos_sin, sliding_layers, sliding_window_mask, split_heads, tied_head};
use crate::names::{self, Slot, Table};
use crate::weights::Weights;

/// A Llama-family `config.json`, with HF's key names (extra keys are ignored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `llama`, `mistral`, `qwen2`, `qwen3`, `olmo2`, `olmo3`, `smollm3`, `granite`, `phi3`,
    /// `mixtral`, `qwen2_moe`, `qwen3_moe`.
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
    /// Phi-3: the length LongRoPE's short factors serve (transformers' default 4096); a sequence
    /// past it is rotated with the long factors.
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    /// Phi-3 (Phi-4-mini): the fraction of each head's dims that rotate (at the top level or in the
    /// RoPE settings; 1 where absent).
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
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
    /// Mixtral / Qwen3-MoE: the experts of each sparse layer (transformers' defaults 8 and 128;
    /// their configs also read `num_experts` under this name).
    #[serde(default)]
    pub num_local_experts: Option<usize>,
    /// Qwen2-MoE: the experts of each sparse layer (default 60).
    #[serde(default)]
    pub num_experts: Option<usize>,
    /// Mixture of experts: the experts each token takes (defaults: Mixtral 2, Qwen2-MoE 4,
    /// Qwen3-MoE 8).
    #[serde(default)]
    pub num_experts_per_tok: Option<usize>,
    /// Qwen2-MoE / Qwen3-MoE: whether the chosen experts' probabilities are renormalised to sum to
    /// 1 (Mixtral always renormalises).
    #[serde(default)]
    pub norm_topk_prob: Option<bool>,
    /// Qwen2-MoE / Qwen3-MoE: each routed expert's MLP width (`intermediate_size` is the dense
    /// layers' and Mixtral's experts').
    #[serde(default)]
    pub moe_intermediate_size: Option<usize>,
    /// Qwen2-MoE: the shared expert's MLP width.
    #[serde(default)]
    pub shared_expert_intermediate_size: Option<usize>,
    /// Qwen2-MoE / Qwen3-MoE: every this-many-th layer is sparse (default 1).
    #[serde(default)]
    pub decoder_sparse_step: Option<usize>,
    /// Qwen2-MoE / Qwen3-MoE: layers with a dense MLP whatever `decoder_sparse_step` says.
    #[serde(default)]
    pub mlp_only_layers: Option<Vec<usize>>,
    /// Qwen2-MoE: biases on the query, key and value projections (default true).
    #[serde(default)]
    pub qkv_bias: Option<bool>,
    /// Mixture of experts: the weight of the routers' load-balancing loss in transformers'
    /// training loss (default 0.001), added where `output_router_logits`.
    #[serde(default)]
    pub router_aux_loss_coef: Option<f64>,
    /// Mixture of experts: whether transformers' forward returns the routers' logits and adds
    /// their load-balancing loss to the loss (and TRL to its trainers' losses).
    #[serde(default)]
    pub output_router_logits: Option<bool>,
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

/// Phi-3's LongRoPE: each frequency divided by its own factor, the short ones up to the original
/// length and the long ones past it, and cos and sin scaled by the attention factor.
#[derive(Clone, Debug, PartialEq)]
struct LongRope {
    short_factor: Vec<f64>,
    long_factor: Vec<f64>,
    original: usize,
    attention_factor: f64,
}

/// YaRN (Peng et al. 2023, arXiv 2309.00071), as transformers' `_compute_yarn_parameters`: the
/// frequencies of the dims that turn fewer than `beta_slow` times over the original length divided
/// by `factor`, those that turn more than `beta_fast` times kept, a linear ramp between, and cos
/// and sin scaled by the attention factor.
#[derive(Clone, Debug, PartialEq)]
struct Yarn {
    factor: f64,
    original: f64,
    attention_factor: f64,
    beta_fast: f64,
    beta_slow: f64,
    truncate: bool,
}

/// The RoPE scalings of the Llama family.
#[derive(Clone, Debug, PartialEq)]
enum Scaling {
    /// Every frequency divided by the factor (positions interpolated).
    Linear(f64),
    Llama3(Llama3Scaling),
    Yarn(Yarn),
    LongRope(LongRope),
}

/// The rotary embedding a model's configuration gives: the inverse frequencies of the first
/// `2 · inv_freq.len()` dims of each head, LongRoPE's long ones and the length past which they
/// serve, and the scale of cos and sin.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Rotary {
    pub(crate) inv_freq: Vec<f32>,
    /// Empty without LongRoPE.
    pub(crate) long_inv_freq: Vec<f32>,
    pub(crate) original: usize,
    pub(crate) scale: f64,
    /// LongRoPE's short and long factors as the config gives them (empty without LongRoPE).
    pub(crate) factors: [Vec<f64>; 2],
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

    /// The dims of each head that rotate: `int(head_dim · partial_rotary_factor)` for Phi-3, all
    /// of them elsewhere (transformers reads the factor only there).
    pub fn rotary_dims(&self) -> usize {
        let hd = self.head_size();
        if !self.phi3() {
            return hd;
        }
        let f = self.partial_rotary_factor.or_else(|| self.rope_field("partial_rotary_factor").and_then(Value::as_f64)).unwrap_or(1.0);
        (hd as f64 * f) as usize
    }

    /// The pretraining length of a scaled RoPE: the top-level key where the config has one (which
    /// transformers prefers), else the RoPE settings'.
    fn original_positions(&self) -> Option<f64> {
        self.original_max_position_embeddings.map(|n| n as f64).or_else(|| self.rope_field("original_max_position_embeddings").and_then(Value::as_f64))
    }

    /// The RoPE's kind: `rope_type` (or the older `type`), `default` where neither is given.
    pub(crate) fn rope_kind(&self) -> &str {
        self.rope_field("rope_type").or_else(|| self.rope_field("type")).and_then(Value::as_str).unwrap_or("default")
    }

    fn scaling(&self, path: &std::path::Path) -> Result<Option<Scaling>> {
        let kind = self.rope_kind();
        let number = |k: &str| -> Result<f64> {
            match self.rope_field(k).and_then(Value::as_f64) {
                Some(x) if x.is_finite() && x > 0.0 => Ok(x),
                Some(x) => Err(ModelError::config(path, format!("rope scaling `{kind}`: `{k}` is {x}; expected a positive number"))),
                None => Err(ModelError::config(path, format!("rope scaling `{kind}` needs a number `{k}`"))),
            }
        };
        match kind {
            "default" => Ok(None),
            "linear" => Ok(Some(Scaling::Linear(number("factor")?))),
            "yarn" if !self.phi3() => {
                let original = match self.original_positions() {
                    Some(o) if o.is_finite() && o >= 1.0 => o,
                    Some(o) => return Err(ModelError::config(path, format!("rope scaling `yarn`: original_max_position_embeddings is {o}; expected at least 1"))),
                    None => self.max_position_embeddings as f64,
                };
                // `factor: null` (DeepSeek's configs) is the ratio of the two lengths.
                let factor = match self.rope_field("factor") {
                    Some(Value::Null) => self.max_position_embeddings as f64 / original,
                    _ => number("factor")?,
                };
                let mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
                let optional = |k: &str| self.rope_field(k).and_then(Value::as_f64).filter(|x| *x != 0.0);
                let attention_factor = match (self.rope_field("attention_factor").and_then(Value::as_f64), optional("mscale"), optional("mscale_all_dim")) {
                    (Some(a), ..) => a,
                    (None, Some(m), Some(all)) => mscale(factor, m) / mscale(factor, all),
                    (None, ..) => mscale(factor, 1.0),
                };
                if !attention_factor.is_finite() || !factor.is_finite() || factor <= 0.0 {
                    return Err(ModelError::config(path, format!("rope scaling `yarn`: a factor of {factor} and an attention factor of {attention_factor}; expected finite positive numbers")));
                }
                // `beta_fast: 0` is transformers' default too (`get(..) or 32`).
                let beta_fast = optional("beta_fast").map_or(Ok(32.0), |_| number("beta_fast"))?;
                let beta_slow = optional("beta_slow").map_or(Ok(1.0), |_| number("beta_slow"))?;
                let truncate = self.rope_field("truncate").and_then(Value::as_bool).unwrap_or(true);
                Ok(Some(Scaling::Yarn(Yarn { factor, original, attention_factor, beta_fast, beta_slow, truncate })))
            }
            // transformers reads Phi-3's older names (`su`, `yarn`) as LongRoPE.
            "longrope" | "su" | "yarn" if self.phi3() => {
                let half = self.rotary_dims() / 2;
                let factors = |k: &str| -> Result<Vec<f64>> {
                    let list = self.rope_field(k).and_then(Value::as_array).ok_or_else(|| ModelError::config(path, format!("rope scaling `longrope` needs a list of numbers `{k}`")))?;
                    let v: Vec<f64> = list.iter().filter_map(Value::as_f64).filter(|x| x.is_finite() && *x > 0.0).collect();
                    if v.len() != list.len() || v.len() != half {
                        return Err(ModelError::config(path, format!("rope scaling `{k}` must be {half} positive numbers, one per rotated pair of a head's dims; found {} entries", list.len())));
                    }
                    Ok(v)
                };
                // transformers takes Phi-3's top-level key (its default 4096), not the RoPE settings'.
                let original = self.original_max_position_embeddings.unwrap_or(4096);
                if original == 0 {
                    return Err(ModelError::config(path, "original_max_position_embeddings is 0; expected at least 1"));
                }
                let factor = self.rope_field("factor").and_then(Value::as_f64).unwrap_or(self.max_position_embeddings as f64 / original as f64);
                let attention_factor = match self.rope_field("attention_factor").and_then(Value::as_f64) {
                    Some(a) => a,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
                };
                if !attention_factor.is_finite() {
                    return Err(ModelError::config(path, format!("rope scaling's attention factor (`attention_factor`, else derived from max_position_embeddings and original_max_position_embeddings) is {attention_factor}; expected a finite number")));
                }
                Ok(Some(Scaling::LongRope(LongRope { short_factor: factors("short_factor")?, long_factor: factors("long_factor")?, original, attention_factor })))
            }
            "llama3" => {
                let get = |k: &str| {
                    self.rope_field(k)
                        .and_then(Value::as_f64)
                        .ok_or_else(|| ModelError::config(path, format!("rope scaling `llama3` needs a number `{k}`")))
                };
                Ok(Some(Scaling::Llama3(Llama3Scaling {
                    factor: get("factor")?,
                    low_freq_factor: get("low_freq_factor")?,
                    high_freq_factor: get("high_freq_factor")?,
                    original_max_position_embeddings: self.original_positions().map_or_else(|| get("original_max_position_embeddings"), Ok)?,
                })))
            }
            other => Err(ModelError::config(
                path,
                format!("rope_type `{other}` is not implemented; expected `default`, `linear`, `llama3` or `yarn`{}", if self.phi3() { " (or `longrope` for Phi-3)" } else { "" }),
            )),
        }
    }

    /// The rotary embedding, its inverse frequencies computed as transformers does (f32), with
    /// linear, Llama 3's, YaRN's or LongRoPE's scaling applied when configured.
    pub(crate) fn rotary(&self, path: &std::path::Path) -> Result<Rotary> {
        let dim = self.rotary_dims();
        if dim == 0 || !dim.is_multiple_of(2) || dim > self.head_size() {
            return Err(ModelError::config(path, format!("{dim} dims of each head rotate (head_dim × partial_rotary_factor); expected an even number from 2 to the head size ({})", self.head_size())));
        }
        if !(self.theta().is_finite() && self.theta() > 0.0) {
            return Err(ModelError::config(path, format!("rope_theta is {}; expected a positive number", self.theta())));
        }
        let base = self.theta() as f32;
        let plain = |i: usize| base.powf((2 * i) as f32 / dim as f32);
        let inv = |i: usize| 1.0 / plain(i);
        let plain_rotary = |inv_freq: Vec<f32>, scale: f64| Rotary { inv_freq, long_inv_freq: Vec::new(), original: usize::MAX, scale, factors: [Vec::new(), Vec::new()] };
        Ok(match self.scaling(path)? {
            None => plain_rotary((0..dim / 2).map(inv).collect(), 1.0),
            Some(Scaling::Linear(factor)) => plain_rotary((0..dim / 2).map(|i| inv(i) / factor as f32).collect(), 1.0),
            Some(Scaling::Llama3(s)) => {
                let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
                let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
                let scaled = |i: usize| {
                    let freq = f64::from(inv(i));
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    let scaled = if wavelen > low_wavelen { freq / s.factor } else { freq };
                    let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    if medium { ((1.0 - smooth) * scaled / s.factor + smooth * scaled) as f32 } else { scaled as f32 }
                };
                plain_rotary((0..dim / 2).map(scaled).collect(), 1.0)
            }
            Some(Scaling::Yarn(y)) => {
                // The dims (of `dim`) whose wavelength turns `rotations` times over the original length.
                let correction = |rotations: f64| dim as f64 * (y.original / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * self.theta().ln());
                let (low, high) = (correction(y.beta_fast), correction(y.beta_slow));
                let (low, high) = if y.truncate { (low.floor(), high.ceil()) } else { (low, high) };
                let (low, mut high) = (low.max(0.0), high.min(dim as f64 - 1.0));
                if low == high {
                    high += 0.001;
                }
                let ramped = |i: usize| {
                    let kept = 1.0 - ((i as f32 - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
                    (1.0 / (y.factor as f32 * plain(i))) * (1.0 - kept) + inv(i) * kept
                };
                plain_rotary((0..dim / 2).map(ramped).collect(), y.attention_factor)
            }
            Some(Scaling::LongRope(r)) => {
                let scaled = |factors: &[f64]| factors.iter().enumerate().map(|(i, &f)| 1.0 / (f as f32 * plain(i))).collect::<Vec<f32>>();
                let (inv_freq, long_inv_freq) = (scaled(&r.short_factor), scaled(&r.long_factor));
                Rotary { inv_freq, long_inv_freq, original: r.original, scale: r.attention_factor, factors: [r.short_factor, r.long_factor] }
            }
        })
    }

    fn qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type == "qwen2" || (self.model_type == "qwen2_moe" && self.qkv_bias.unwrap_or(true))
    }

    /// The output projection's bias: Qwen2-MoE's has none whatever `attention_bias` says.
    fn o_bias(&self) -> bool {
        self.attention_bias && self.model_type != "qwen2_moe"
    }

    /// Whether the model is a mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE).
    pub fn moe(&self) -> bool {
        matches!(self.model_type.as_str(), "mixtral" | "qwen2_moe" | "qwen3_moe")
    }

    /// The MLP width a token runs through, averaged over the layers: `intermediate_size`, or in a
    /// mixture of experts the widths of the experts it takes (and the shared one) in the sparse
    /// layers and `intermediate_size` in the dense ones.
    pub fn token_mlp_width(&self) -> usize {
        match MoeLayout::of(self, std::path::Path::new("config.json")) {
            Ok(Some(m)) if self.num_hidden_layers > 0 => (0..self.num_hidden_layers).map(|i| m.active_width(i, self.intermediate_size)).sum::<usize>() / self.num_hidden_layers,
            _ => self.intermediate_size,
        }
    }

    /// Phi-3's layer: the query, key and value projections in one matrix, and the gate and up
    /// projections in another (in that order), without biases.
    pub(crate) fn phi3(&self) -> bool {
        self.model_type == "phi3"
    }

    /// Whether transformers' config of this model type has a `sliding_window` key (Mistral, Qwen2,
    /// Qwen3), whose absence it reads as 4096 and `null` as no window.
    pub(crate) fn has_window_key(&self) -> bool {
        matches!(self.model_type.as_str(), "mistral" | "qwen2" | "qwen3" | "olmo3" | "qwen2_moe" | "qwen3_moe")
    }

    /// The attention window of each layer (`None`: the whole causal past), as transformers sets it:
    /// every layer of a Mistral or a Phi-3; for Qwen2 / Qwen3 with `use_sliding_window`, the layers
    /// `layer_types` marks `sliding_attention`, or without it those from `max_window_layers` on;
    /// OLMo 3's sliding layers ([`Self::sliding_types`]).
    pub fn layer_windows(&self, path: &std::path::Path) -> Result<Vec<Option<usize>>> {
        let n = self.num_hidden_layers;
        let window = match self.model_type.as_str() {
            "mistral" | "phi3" | "mixtral" => self.sliding_window,
            "qwen2" | "qwen3" | "smollm3" | "qwen2_moe" | "qwen3_moe" if self.use_sliding_window => self.sliding_window,
            "olmo3" => self.sliding_window,
            _ => None,
        };
        let Some(w) = window else { return Ok(vec![None; n]) };
        if w == 0 {
            return Err(ModelError::config(path, "sliding_window must be at least 1"));
        }
        if matches!(self.model_type.as_str(), "mistral" | "phi3" | "mixtral" | "qwen3_moe") {
            return Ok(vec![Some(w); n]);
        }
        let sliding = match &self.layer_types {
            Some(types) => sliding_layers(types, n, path)?,
            None if self.model_type == "olmo3" => self.sliding_types(path)?,
            // SmolLM3: the layers without the rotation.
            None if self.model_type == "smollm3" => self.layer_ropes(path)?.into_iter().map(|rope| !rope).collect(),
            // Qwen2-MoE: every other layer below `max_window_layers`, the first among them.
            None if self.model_type == "qwen2_moe" => (0..n).map(|i| i % 2 == 0 && i < self.max_window_layers.unwrap_or(28)).collect(),
            None => (0..n).map(|i| i >= self.max_window_layers.unwrap_or(28)).collect(),
        };
        Ok(sliding.into_iter().map(|s| s.then_some(w)).collect())
    }

    /// Whether each layer is of the sliding kind (OLMo 3: its window and its own rotary embedding):
    /// those `layer_types` marks `sliding_attention`, else three layers of every four, the fourth
    /// full, as transformers' OLMo 3 config derives them; none elsewhere.
    pub fn sliding_types(&self, path: &std::path::Path) -> Result<Vec<bool>> {
        let n = self.num_hidden_layers;
        match &self.layer_types {
            _ if self.model_type != "olmo3" => Ok(vec![false; n]),
            Some(types) => sliding_layers(types, n, path),
            None => Ok((0..n).map(|i| (i + 1) % 4 != 0).collect()),
        }
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

    /// Qwen3's (and Qwen3-MoE's) RMSNorm of each head's queries and keys (`q_norm`, `k_norm`,
    /// over `head_dim`).
    fn qk_norm(&self) -> bool {
        matches!(self.model_type.as_str(), "qwen3" | "qwen3_moe")
    }

    /// OLMo 2's layer: its norms after the attention and the MLP (on their outputs, before the
    /// residual sums) instead of before them, and its query and key norms over all heads together.
    pub(crate) fn olmo2(&self) -> bool {
        matches!(self.model_type.as_str(), "olmo2" | "olmo3")
    }

    /// OLMo 3's rotary embeddings, one per kind of layer: the full-attention layers' (where the
    /// checkpoint's scaling, YaRN, applies) and the sliding layers', each from its own entry of the
    /// nested `rope_parameters` (or, in the older form, `rope_scaling` for the full layers alone),
    /// with a base of 500,000 where none is given; `None` for the other families.
    pub(crate) fn layer_type_ropes(&self) -> Option<[LlamaConfig; 2]> {
        if self.model_type != "olmo3" {
            return None;
        }
        let nested = |t: &str| self.rope_parameters.as_ref().and_then(|p| p.get(t)).filter(|v| v.is_object()).cloned();
        let of = |t: &str, scaling: Option<Value>| {
            let params = nested(t);
            let theta = params.as_ref().and_then(|p| p.get("rope_theta")).and_then(Value::as_f64).or(self.rope_theta).unwrap_or(500_000.0);
            LlamaConfig { rope_theta: Some(theta), rope_parameters: params, rope_scaling: scaling, model_type: "llama".into(), ..self.clone() }
        };
        Some([of("full_attention", self.rope_scaling.clone()), of("sliding_attention", None)])
    }
}

#[derive(Module, Debug)]
struct Attention {
    /// The three projections; Phi-3 has them in one, `qkv_proj`.
    q_proj: Option<Linear>,
    k_proj: Option<Linear>,
    v_proj: Option<Linear>,
    /// Phi-3: the queries', keys' and values' rows of one matrix, in that order.
    qkv_proj: Option<Linear>,
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
    /// OLMo 3's sliding layers: rotated with the sliding layers' embedding.
    local_rope: bool,
    n_heads: usize,
    n_kv_heads: usize,
    scale: f64,
}

/// A SwiGLU MLP (also each expert of a mixture).
#[derive(Module, Debug)]
pub(crate) struct Mlp {
    /// The gate and up projections; Phi-3 has them in one, `gate_up_proj` (the gate's rows first).
    pub(crate) gate_proj: Option<Linear>,
    pub(crate) up_proj: Option<Linear>,
    gate_up_proj: Option<Linear>,
    pub(crate) down_proj: Linear,
    /// A routed expert's adapter on its gate and up projections together (`A` `[hidden, r]`, `B`
    /// `[r, 2 · width]`, the gate's columns first), as PEFT adapts transformers 5's stacked
    /// `gate_up_proj` (see [`crate::moe::ExpertParam`]): one `A` for both.
    pub(crate) gate_up_lora: Option<Adapter>,
}

#[derive(Module, Debug)]
struct Layer {
    /// Before the attention; OLMo 2 has none.
    input_layernorm: Option<RmsNorm>,
    self_attn: Attention,
    /// Before the MLP; OLMo 2's is on the attention's output, before the residual sum.
    post_attention_layernorm: RmsNorm,
    /// The dense MLP, or in a mixture of experts' sparse layers the experts.
    mlp: Option<Mlp>,
    moe: Option<SparseMoe>,
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
    /// LongRoPE's inverse frequencies for sequences longer than `rope_original` (empty without
    /// LongRoPE), and the scale of cos and sin (LongRoPE's or YaRN's attention factor; 1 elsewhere).
    long_inv_freq: Vec<f32>,
    rope_original: usize,
    rope_scale: f64,
    /// OLMo 3's sliding layers' inverse frequencies and scale (empty: every layer rotates alike).
    sliding_inv_freq: Vec<f32>,
    sliding_rope_scale: f64,
    /// Granite's scales of the embeddings and of the residual branches, and the logits' divisor
    /// (1 elsewhere).
    embedding_multiplier: f64,
    residual_multiplier: f64,
    logits_scaling: f64,
    /// Mixtral's names for its experts (`block_sparse_moe.experts.N.w1`, ...).
    mixtral: bool,
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

/// The outputs of one projection `[B, T, Σ widths]` split along the last axis.
fn split_last<const N: usize>(y: Tensor<3>, widths: [usize; N]) -> [Tensor<3>; N] {
    let mut start = 0;
    widths.map(|w| {
        start += w;
        y.clone().narrow(2, start - w, w)
    })
}

impl Attention {
    /// Queries, keys and values `[B, T, heads · Dh]`, from the three projections or Phi-3's one.
    fn qkv(&self, x: Tensor<3>) -> [Tensor<3>; 3] {
        match (&self.qkv_proj, &self.q_proj, &self.k_proj, &self.v_proj) {
            (Some(qkv), ..) => {
                let y = qkv.forward(x);
                let hd = y.dims()[2] / (self.n_heads + 2 * self.n_kv_heads);
                split_last(y, [self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd])
            }
            (None, Some(q), Some(k), Some(v)) => [q.forward(x.clone()), k.forward(x.clone()), v.forward(x)],
            _ => unreachable!("a Llama-family attention is built with q/k/v projections or a fused one"),
        }
    }

    fn forward(&self, x: Tensor<3>, cos: &Tensor<4>, sin: &Tensor<4>, mask: &Tensor<4, Bool>, layer: usize, cache: Option<&mut KvCache>) -> Tensor<3> {
        let groups = |heads: usize| if self.norm_whole { 1 } else { heads };
        let [q, k, v] = self.qkv(x);
        let q = split_heads(head_norm(self.q_norm.as_ref(), q, groups(self.n_heads)), self.n_heads);
        let k = split_heads(head_norm(self.k_norm.as_ref(), k, groups(self.n_kv_heads)), self.n_kv_heads);
        let v = split_heads(v, self.n_kv_heads);
        let (q, k) = if self.rope { (rotate_half(q, cos, sin), rotate_half(k, cos, sin)) } else { (q, k) };
        let (k, v) = match cache {
            Some(cache) => cache.append(layer, k, v),
            None => (k, v),
        };
        self.o_proj.forward(merge_heads(grouped_attention(q, k, v, mask, self.scale)))
    }
}

impl Mlp {
    /// An MLP of width `inner` over a hidden size `d`, its gate and up projections in one where
    /// `fused` (Phi-3), waiting for its weights.
    pub(crate) fn new(d: usize, inner: usize, bias: bool, fused: bool, device: &Device) -> Self {
        let separate = |rows: usize| (!fused).then(|| names::linear(d, rows, bias, device));
        Self {
            gate_proj: separate(inner),
            up_proj: separate(inner),
            gate_up_proj: fused.then(|| names::linear(d, 2 * inner, false, device)),
            down_proj: names::linear(inner, d, bias, device),
            gate_up_lora: None,
        }
    }

    /// Its projections under `prefix`, named `[gate, up, down]` (`gate_up_proj` when fused).
    pub(crate) fn push_named<'a>(&'a mut self, t: &mut Table<'a>, prefix: &str, [gate, up, down]: [&str; 3]) {
        let Self { gate_proj, up_proj, gate_up_proj, down_proj, .. } = self;
        let projections = [(gate, gate_proj), (up, up_proj), ("gate_up_proj", gate_up_proj)];
        t.extend(projections.into_iter().filter_map(|(name, proj)| Some((format!("{prefix}.{name}"), Slot::Linear(proj.as_mut()?)))));
        t.push((format!("{prefix}.{down}"), Slot::Linear(down_proj)));
    }

    /// Folds the gate and up projections' shared adapter into their weights and removes it.
    pub(crate) fn merge_gate_up_lora(&mut self) {
        let (Some(ad), Some(g), Some(u)) = (self.gate_up_lora.take(), &mut self.gate_proj, &mut self.up_proj) else { return };
        let delta = ad.delta();
        let inner = delta.dims()[1] / 2;
        g.fold(delta.clone().narrow(1, 0, inner));
        u.fold(delta.narrow(1, inner, inner));
    }

    /// `down(silu(gate(x)) · up(x))`, the gate one recorded operation where the backend has
    /// `odpo_kernels::glu`.
    pub(crate) fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [g, u] = match (&self.gate_up_proj, &self.gate_proj, &self.up_proj) {
            (Some(gate_up), ..) => {
                let y = gate_up.forward(x);
                let inner = y.dims()[2] / 2;
                split_last(y, [inner, inner])
            }
            (None, Some(g), Some(u)) => match &self.gate_up_lora {
                None => [g.forward(x.clone()), u.forward(x)],
                Some(ad) => {
                    let [b, t, d] = x.dims();
                    let low = ad.low_rank(x.clone().reshape([b * t, d]));
                    let inner = low.dims()[1] / 2;
                    let [lg, lu] = split_last(low.reshape([b, t, 2 * inner]), [inner, inner]);
                    [g.forward(x.clone()) + lg.mul_scalar(ad.scale), u.forward(x) + lu.mul_scalar(ad.scale)]
                }
            },
            _ => unreachable!("a Llama-family MLP is built with gate and up projections or a fused one"),
        };
        self.down_proj.forward(odpo_kernels::glu(g.clone(), u.clone(), Gate::Silu).unwrap_or_else(|| silu(g) * u))
    }
}

impl Layer {
    /// The dense MLP's or the experts' output for `x` (the experts' routing added to `stats`).
    fn feed_forward(&self, x: Tensor<3>, stats: Option<(&[f32], f64, &mut RouterStats)>) -> Tensor<3> {
        match (&self.moe, &self.mlp) {
            (Some(moe), _) => moe.forward(x, stats),
            (None, Some(mlp)) => mlp.forward(x),
            (None, None) => unreachable!("a Llama-family layer is built with an MLP or experts"),
        }
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
        // OLMo 3 rotates its full and its sliding layers each with their own embedding.
        let (rotary, sliding_rotary) = match cfg.layer_type_ropes() {
            Some([full, sliding]) => (full.rotary(w.path())?, Some(sliding.rotary(w.path())?)),
            None => (cfg.rotary(w.path())?, None),
        };
        let local_ropes = cfg.sliding_types(w.path())?;
        let [embedding_multiplier, residual_multiplier, attention_multiplier, logits_scaling] = cfg.multipliers(w.path())?;
        let windows = cfg.layer_windows(w.path())?;
        let ropes = cfg.layer_ropes(w.path())?;
        let moe = MoeLayout::of(cfg, w.path())?;
        let sparse = |i: usize| moe.as_ref().is_some_and(|m| m.sparse[i]);
        let (eps, inner, qkv_bias, olmo2, fused) = (cfg.rms_norm_eps, cfg.intermediate_size, cfg.qkv_bias(), cfg.olmo2(), cfg.phi3());
        let separate = |rows: usize, bias: bool| (!fused).then(|| names::linear(d, rows, bias, device));
        // Qwen3 norms each head's queries and keys, OLMo 2 all of a row's queries and all its keys.
        let (q_norm, k_norm) = if olmo2 { (Some(nh * hd), Some(nkv * hd)) } else if cfg.qk_norm() { (Some(hd), Some(hd)) } else { (None, None) };
        let layers = windows
            .into_iter()
            .zip(ropes)
            .zip(local_ropes)
            .enumerate()
            .map(|(i, ((window, rope), local_rope))| Layer {
                input_layernorm: (!olmo2).then(|| names::rms_norm(d, eps, device)),
                self_attn: Attention {
                    q_proj: separate(nh * hd, qkv_bias),
                    k_proj: separate(nkv * hd, qkv_bias),
                    v_proj: separate(nkv * hd, qkv_bias),
                    qkv_proj: fused.then(|| names::linear(d, (nh + 2 * nkv) * hd, false, device)),
                    o_proj: names::linear(nh * hd, d, cfg.o_bias(), device),
                    q_norm: q_norm.map(|n| names::rms_norm(n, eps, device)),
                    k_norm: k_norm.map(|n| names::rms_norm(n, eps, device)),
                    norm_whole: olmo2,
                    window,
                    rope,
                    local_rope,
                    n_heads: nh,
                    n_kv_heads: nkv,
                    scale: attention_multiplier,
                },
                post_attention_layernorm: names::rms_norm(d, eps, device),
                mlp: (!sparse(i)).then(|| Mlp::new(d, inner, cfg.mlp_bias, fused, device)),
                moe: moe.as_ref().filter(|_| sparse(i)).map(|m| SparseMoe::new(m, d, device)),
                post_feedforward_layernorm: olmo2.then(|| names::rms_norm(d, eps, device)),
            })
            .collect();
        let mut model = Self {
            embed_tokens: Embedding { weight: names::lazy([v, d], device) },
            layers,
            norm: names::rms_norm(d, eps, device),
            lm_head: (!cfg.tie_word_embeddings).then(|| names::lazy([d, v], device)),
            inv_freq: rotary.inv_freq,
            long_inv_freq: rotary.long_inv_freq,
            rope_original: rotary.original,
            rope_scale: rotary.scale,
            sliding_rope_scale: sliding_rotary.as_ref().map_or(1.0, |r| r.scale),
            sliding_inv_freq: sliding_rotary.map(|r| r.inv_freq).unwrap_or_default(),
            embedding_multiplier,
            residual_multiplier,
            logits_scaling,
            mixtral: cfg.model_type == "mixtral",
        };
        names::fill(model.named_mut(), w, device)?;
        Ok(model)
    }

    /// The sparse layers with the module name transformers 5 gives them (`model.layers.N.mlp`,
    /// Mixtral's too): where PEFT's `target_parameters` find the experts and routers.
    pub(crate) fn sparse_layers_mut(&mut self) -> Vec<(String, &mut SparseMoe)> {
        self.layers.iter_mut().enumerate().filter_map(|(i, l)| Some((format!("model.layers.{i}.mlp"), l.moe.as_mut()?))).collect()
    }

    /// Every parameter under its HF name: the one list loading, saving and LoRA read.
    pub(crate) fn named_mut(&mut self) -> Table<'_> {
        let mixtral = self.mixtral;
        let mut t: Table<'_> = vec![("model.embed_tokens.weight".into(), Slot::Matrix(&mut self.embed_tokens.weight))];
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            if let Some(n) = &mut l.input_layernorm {
                t.push((format!("{p}.input_layernorm"), Slot::RmsNorm(n)));
            }
            let Attention { q_proj, k_proj, v_proj, qkv_proj, o_proj, q_norm, k_norm, .. } = &mut l.self_attn;
            let attention = [("q_proj", q_proj), ("k_proj", k_proj), ("v_proj", v_proj), ("qkv_proj", qkv_proj)];
            t.extend(attention.into_iter().filter_map(|(name, proj)| Some((format!("{p}.self_attn.{name}"), Slot::Linear(proj.as_mut()?)))));
            t.push((format!("{p}.self_attn.o_proj"), Slot::Linear(o_proj)));
            for (name, norm) in [("q_norm", q_norm), ("k_norm", k_norm)] {
                if let Some(n) = norm {
                    t.push((format!("{p}.self_attn.{name}"), Slot::RmsNorm(n)));
                }
            }
            t.push((format!("{p}.post_attention_layernorm"), Slot::RmsNorm(&mut l.post_attention_layernorm)));
            if let Some(mlp) = &mut l.mlp {
                mlp.push_named(&mut t, &format!("{p}.mlp"), ["gate_proj", "up_proj", "down_proj"]);
            }
            if let Some(moe) = &mut l.moe {
                // Mixtral's experts sit in `block_sparse_moe`, Qwen's in `mlp`.
                moe.push_named(&mut t, &format!("{p}.{}", if mixtral { "block_sparse_moe" } else { "mlp" }), mixtral);
            }
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
    pub fn hidden(&self, input_ids: Tensor<2, Int>, mask: &Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.hidden_routed(input_ids, mask, cache, None)
    }

    /// [`Self::hidden`], a mixture of experts' routing of the new real tokens added to `stats`
    /// (`weight` times: see [`RouterStats`]).
    pub fn hidden_routed(&self, input_ids: Tensor<2, Int>, mask: &Tensor<2, Int>, mut cache: Option<&mut KvCache>, mut stats: Option<(f64, &mut RouterStats)>) -> Tensor<3> {
        let [_, t] = input_ids.dims();
        // Which of the new tokens are real, on the host, where the routing is counted.
        let real: Vec<f32> = match &stats {
            Some(_) if self.layers.iter().any(|l| l.moe.is_some()) => {
                let [_, all] = mask.dims();
                mask.clone().narrow(1, all - t, t).into_data().iter::<f32>().collect()
            }
            _ => Vec::new(),
        };
        let mut x = embed(&self.embed_tokens, input_ids);
        if self.embedding_multiplier != 1.0 {
            x = x.mul_scalar(self.embedding_multiplier);
        }
        // Granite scales each branch on its way into the residual stream.
        let branch = |y: Tensor<3>| if self.residual_multiplier != 1.0 { y.mul_scalar(self.residual_multiplier) } else { y };
        let pos = positions(mask, t);
        let (cos, sin) = rotate_half_cos_sin(self.frequencies(mask), self.rope_scale, pos.clone(), x.dtype());
        let local = (!self.sliding_inv_freq.is_empty()).then(|| rotate_half_cos_sin(&self.sliding_inv_freq, self.sliding_rope_scale, pos, x.dtype()));
        let m = attention_mask(mask, t, &x.device());
        // Every sliding layer has the config's one window.
        let windowed = self.layers.iter().find_map(|l| l.self_attn.window).map(|w| sliding_window_mask(&m, w));
        for (i, layer) in self.layers.iter().enumerate() {
            let m = match (layer.self_attn.window, &windowed) {
                (Some(_), Some(windowed)) => windowed,
                _ => &m,
            };
            let (cos, sin) = match (&local, layer.self_attn.local_rope) {
                (Some((cos, sin)), true) => (cos, sin),
                _ => (&cos, &sin),
            };
            match &layer.post_feedforward_layernorm {
                // OLMo 2 and 3: each branch normed on its way into the residual stream.
                Some(post_ffn) => {
                    let a = layer.self_attn.forward(x.clone(), cos, sin, m, i, cache.as_deref_mut());
                    x = x + rms_norm(&layer.post_attention_layernorm, a);
                    let routed = stats.as_mut().map(|(w, s)| (real.as_slice(), *w, &mut **s));
                    x = x.clone() + rms_norm(post_ffn, layer.feed_forward(x, routed));
                }
                None => {
                    let h = layer.input_layernorm.as_ref().map_or_else(|| x.clone(), |n| rms_norm(n, x.clone()));
                    x = x + branch(layer.self_attn.forward(h, cos, sin, m, i, cache.as_deref_mut()));
                    let routed = stats.as_mut().map(|(w, s)| (real.as_slice(), *w, &mut **s));
                    x = x.clone() + branch(layer.feed_forward(rms_norm(&layer.post_attention_layernorm, x), routed));
                }
            }
        }
        rms_norm(&self.norm, x)
    }

    /// The inverse frequencies for a batch whose real tokens (cached ones included) `mask` marks:
    /// LongRoPE's long ones once a row's last position reaches the original length, as
    /// transformers switches on `max(position_ids) + 1`, the short ones before.
    fn frequencies(&self, mask: &Tensor<2, Int>) -> &[f32] {
        // A batch no wider than the original length is short whatever its padding (no read-back).
        if self.long_inv_freq.is_empty() || mask.dims()[1] <= self.rope_original {
            return &self.inv_freq;
        }
        let longest = mask.clone().sum_dim(1).max().into_scalar::<i64>();
        if longest > self.rope_original as i64 { &self.long_inv_freq } else { &self.inv_freq }
    }

    /// The length past which a sequence is rotated with other frequencies (LongRoPE's original
    /// length): a KV cache filled before it holds keys the longer sequence would rotate otherwise.
    pub fn rope_switch(&self) -> Option<usize> {
        (!self.long_inv_freq.is_empty()).then_some(self.rope_original)
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

    /// OLMo 3's configs as `configuration_olmo3.py` reads them: three sliding layers of four by
    /// default, a window of 4096 where the key is absent (`null`: none, the layers' kinds kept for
    /// their rotation), the older `rope_scaling` on the full layers alone, a base of 500,000.
    #[test]
    fn olmo3_configs_follow_transformers() {
        let path = std::path::Path::new("config.json");
        let c = config(8, json!({"architectures": ["Olmo3ForCausalLM"], "hidden_size": 32, "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8}})).unwrap();
        assert!(c.olmo2() && c.rms_norm_eps == 1e-5, "{c:?}");
        assert_eq!(ModelConfig::Llama(c.clone()).to_hf_json()["architectures"], json!(["Olmo3ForCausalLM"]));
        let sliding = vec![true, true, true, false, true, true, true, false];
        assert_eq!(c.sliding_types(path).unwrap(), sliding);
        assert_eq!(c.layer_windows(path).unwrap(), sliding.iter().map(|&s| s.then_some(4096)).collect::<Vec<_>>());
        let [full, local] = c.layer_type_ropes().unwrap();
        let (full, local) = (full.rotary(path).unwrap(), local.rotary(path).unwrap());
        // YaRN (0.1 ln 8 + 1) on the full layers only, both at OLMo 3's base.
        assert!((full.scale - (0.1 * 8f64.ln() + 1.0)).abs() < 1e-12 && local.scale == 1.0, "{full:?} {local:?}");
        assert_eq!(local.inv_freq[1], 1.0 / 500_000f32.powf(2.0 / 16.0));
        assert!(full.inv_freq[7] < local.inv_freq[7] / 7.9, "the slowest frequency interpolated by 8");
        let none = config(8, json!({"architectures": ["Olmo3ForCausalLM"], "sliding_window": null})).unwrap();
        assert_eq!(none.layer_windows(path).unwrap(), vec![None; 8]);
        assert_eq!(none.sliding_types(path).unwrap(), sliding);
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
