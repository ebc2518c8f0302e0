//! The Gemma family (Gemma Team 2024, arXiv 2403.08295; Gemma 2, arXiv 2408.00118; Gemma 3,
//! arXiv 2503.19786), following HF transformers' `modeling_gemma.py`, `modeling_gemma2.py` and
//! `modeling_gemma3.py` (the text model, `Gemma3ForCausalLM`). What sets it apart from a Llama:
//! - RMSNorm scaled by `1 + w` (the stored weight is centred on zero), computed in f32;
//! - token embeddings multiplied by `√hidden_size`;
//! - a GeGLU MLP, `down(gelu_tanh(gate(x)) · up(x))`;
//! - `head_dim` 256 by default, and a tied LM head.
//!
//! Gemma 2 adds a norm after attention and around the MLP (four per layer), attention scores
//! scaled by `query_pre_attn_scalar^-½` and capped as `c·tanh(s / c)` (`attn_logit_softcapping`),
//! logits capped the same way (`final_logit_softcapping`), and a sliding window on every other
//! layer. Gemma 3 drops the caps, norms each head's queries and keys (`q_norm`, `k_norm`) and
//! slides in five layers of six, whose rotary base (`rope_local_base_freq`, 10,000) differs from
//! the full layers' (`rope_theta`, 1,000,000, linearly scaled in the larger models).
//!
//! Tested against transformers on tiny random Gemma, Gemma 2 and Gemma 3 models.

use burn::module::{Module, Param};
use burn::nn::Embedding;
use burn::tensor::activation::{gelu, gelu_approximate};
use burn::tensor::{Bool, DType, Device, Int, Tensor};
use odpo_kernels::Gate;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::layers::{KvCache, attention_mask, capped_attention, embed, grouped_attention, linear_3d, merge_heads, positions, rotate_half, rotate_half_cos_sin, sliding_layers, sliding_window_mask, split_heads, tied_head};
use crate::linear::Linear;
use crate::names::{self, Slot, Table};
use crate::weights::Weights;

/// A Gemma-family `config.json` (`gemma`, `gemma2`, `gemma3_text`), with HF's key names (extra
/// keys are ignored). [`crate::ModelConfig::from_hf_json`] fills in transformers' defaults for the
/// keys whose absence means something other than `null`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GemmaConfig {
    /// `gemma`, `gemma2` or `gemma3_text` (set from `architectures`).
    #[serde(default)]
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
    /// Number of key/value heads; defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head size (transformers' default: 256).
    #[serde(default = "default_head_dim")]
    pub head_dim: usize,
    /// Gemma's MLP activation (`gelu`, as the first releases wrote it, means the tanh form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    /// Gemma 2 / 3's MLP activation (default `gelu_pytorch_tanh`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_activation: Option<String>,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base, as older configs give it at the top level (Gemma 3: the full layers').
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// Gemma 3's RoPE base of the sliding layers, as older configs give it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_base_freq: Option<f64>,
    /// RoPE settings as transformers 5 writes them: `{rope_type, rope_theta, ...}`, or for Gemma 3
    /// one such object for each of `full_attention` and `sliding_attention`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Value>,
    /// RoPE scaling as older configs give it (Gemma 3: of the full layers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    /// Maximum sequence length.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Whether the LM head shares the token embedding matrix (Gemma's checkpoints do).
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v/o projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Gemma 2 / 3: attention scores are scaled by `query_pre_attn_scalar^-½` (default 256);
    /// Gemma by `head_dim^-½`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<usize>,
    /// Gemma 2 / 3: the window of the sliding layers (`null`: none).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Gemma 2 / 3: `full_attention` or `sliding_attention` for each layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// Gemma 3 without `layer_types`: every n-th layer is full, the others slide (default 6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window_pattern: Option<usize>,
    /// Gemma 2: logits are capped as `c·tanh(z / c)` (`null`: not capped).
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    /// Gemma 2: attention scores are capped the same way.
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    /// Attention to the whole sequence (an encoder); only causal attention is implemented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_bidirectional_attention: Option<bool>,
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

fn default_head_dim() -> usize {
    256
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    8192
}
fn default_true() -> bool {
    true
}

/// One rotary embedding: its base and a linear scaling factor (1: none).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Rope {
    theta: f64,
    factor: f64,
}

/// What a llama.cpp GGUF file of a Gemma model states beyond its shapes ([`GemmaConfig::llama_cpp_form`]).
pub(crate) struct LlamaCppGemma {
    /// The window of the sliding layers (Gemma 2 / 3).
    pub window: Option<usize>,
    /// The rotary base of the full layers.
    pub rope_theta: f64,
    /// Linear scaling of the full layers' positions (Gemma 3).
    pub linear_factor: Option<f64>,
    /// Gemma 2's caps on the attention scores and on the logits.
    pub caps: (Option<f64>, Option<f64>),
}

impl GemmaConfig {
    /// The three generations' differences, by `model_type`.
    fn generation(&self) -> u8 {
        match self.model_type.as_str() {
            "gemma2" => 2,
            "gemma3_text" => 3,
            _ => 1,
        }
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// The keys whose absence transformers reads as a value other than `null` (Gemma 2's caps,
    /// Gemma 2 / 3's window), with that value: [`crate::ModelConfig`] fills them in where they are
    /// absent, and writes `null` back where the value is `None`.
    pub(crate) fn defaulted_keys(model_type: &str) -> Vec<(&'static str, Value)> {
        match model_type {
            "gemma2" => vec![("sliding_window", 4096.into()), ("final_logit_softcapping", 30.0.into()), ("attn_logit_softcapping", 50.0.into())],
            "gemma3_text" => vec![("sliding_window", 4096.into())],
            _ => vec![],
        }
    }

    /// The MLP's activation: whether it is exact GELU (else the tanh approximation).
    fn exact_gelu(&self, path: &std::path::Path) -> Result<bool> {
        let (key, act) = match self.generation() {
            1 => ("hidden_act", self.hidden_act.as_deref().unwrap_or("gelu_pytorch_tanh")),
            _ => ("hidden_activation", self.hidden_activation.as_deref().unwrap_or("gelu_pytorch_tanh")),
        };
        match act {
            "gelu_pytorch_tanh" | "gelu_new" => Ok(false),
            // transformers reads Gemma's legacy `gelu` as the tanh form it was trained with.
            "gelu" => Ok(self.generation() != 1),
            other => Err(ModelError::config(path, format!("{key} `{other}` is not implemented; expected gelu_pytorch_tanh or gelu"))),
        }
    }

    /// The settings a llama.cpp GGUF file of this model holds, or which key of the config holds
    /// what it cannot and why: llama.cpp decides by architecture (`llama-model.cpp`) the query
    /// scale, which layers slide, Gemma 3's local rotary base and the tanh GELU, so a model that
    /// differs from those would run differently there.
    pub(crate) fn llama_cpp_form(&self, path: &std::path::Path) -> std::result::Result<LlamaCppGemma, (&'static str, String)> {
        let g = self.generation();
        if self.exact_gelu(path).map_err(|e| ("hidden_activation", e.to_string()))? {
            return Err(("hidden_activation", "exact GELU; llama.cpp's Gemma runs the tanh form".into()));
        }
        if g > 1 {
            let layers_27b = if g == 2 { 46 } else { 62 };
            let want = if self.num_hidden_layers == layers_27b { self.hidden_size / self.num_attention_heads } else { self.head_dim };
            let got = self.query_pre_attn_scalar.unwrap_or(256);
            if got != want {
                return Err(("query_pre_attn_scalar", format!("{got}; llama.cpp scales the queries of this shape by {want}^-1/2")));
            }
        }
        let windows = self.layer_windows(path).map_err(|e| ("layer_types", e.to_string()))?;
        let every = match g {
            1 => None,
            2 => Some(2),
            _ => Some(6),
        };
        if let Some(every) = every {
            let Some(w) = self.sliding_window else {
                return Err(("sliding_window", "none; llama.cpp's Gemma 2 and 3 always slide".into()));
            };
            let want: Vec<Option<usize>> = (0..self.num_hidden_layers).map(|i| ((i + 1) % every != 0).then_some(w)).collect();
            if windows != want {
                return Err(("layer_types", format!("llama.cpp slides on {} of every {every} layers, the last of them full", every - 1)));
            }
        }
        let (full, local) = self.ropes(path).map_err(|e| ("rope_parameters", e.to_string()))?;
        if let Some(local) = local
            && (local.theta != 10_000.0 || local.factor != 1.0)
        {
            return Err(("rope_parameters", format!("sliding layers with a rotary base of {} (factor {}); llama.cpp's Gemma 3 uses 10000, unscaled", local.theta, local.factor)));
        }
        let caps = (self.attn_logit_softcapping, self.final_logit_softcapping);
        if g != 2 && (caps.0.is_some() || caps.1.is_some()) {
            return Err(("attn_logit_softcapping", "soft caps; llama.cpp applies them to Gemma 2 only".into()));
        }
        Ok(LlamaCppGemma { window: self.sliding_window.filter(|_| g > 1), rope_theta: full.theta, linear_factor: (full.factor != 1.0).then_some(full.factor), caps })
    }

    /// The rotary embedding of the full layers and, for Gemma 3, of the sliding ones.
    fn ropes(&self, path: &std::path::Path) -> Result<(Rope, Option<Rope>)> {
        let p = self.rope_parameters.as_ref();
        let kind = |v: Option<&Value>, what: &str| -> Result<f64> {
            let Some(v) = v else { return Ok(1.0) };
            match v.get("rope_type").or_else(|| v.get("type")).and_then(Value::as_str).unwrap_or("default") {
                "default" => Ok(1.0),
                "linear" => v.get("factor").and_then(Value::as_f64).ok_or_else(|| ModelError::config(path, format!("{what}: rope_type `linear` needs a number `factor`"))),
                other => Err(ModelError::config(path, format!("{what}: rope_type `{other}` is not implemented; expected default or linear"))),
            }
        };
        let theta = |v: Option<&Value>| v.and_then(|v| v.get("rope_theta")).and_then(Value::as_f64);
        if self.generation() < 3 {
            let full = Rope { theta: self.rope_theta.or_else(|| theta(p)).unwrap_or(10_000.0), factor: kind(p.or(self.rope_scaling.as_ref()), "rope_parameters")? };
            if full.factor != 1.0 {
                return Err(ModelError::config(path, "rope scaling is implemented for Gemma 3 only"));
            }
            return Ok((full, None));
        }
        let (pf, ps) = (p.and_then(|p| p.get("full_attention")), p.and_then(|p| p.get("sliding_attention")));
        let full = Rope {
            theta: theta(pf).or(self.rope_theta).unwrap_or(1_000_000.0),
            factor: kind(pf.or(self.rope_scaling.as_ref()), "rope_parameters.full_attention")?,
        };
        let local = Rope { theta: theta(ps).or(self.rope_local_base_freq).unwrap_or(10_000.0), factor: kind(ps, "rope_parameters.sliding_attention")? };
        Ok((full, Some(local)))
    }

    /// The attention window of each layer (`None`: the whole causal past): none in Gemma; the
    /// layers `layer_types` marks `sliding_attention` in Gemma 2 / 3, by default every other layer
    /// from the first (Gemma 2) or five of every six (Gemma 3, `sliding_window_pattern`).
    pub fn layer_windows(&self, path: &std::path::Path) -> Result<Vec<Option<usize>>> {
        let n = self.num_hidden_layers;
        if self.generation() == 1 {
            return Ok(vec![None; n]);
        }
        let sliding: Vec<bool> = match &self.layer_types {
            Some(types) => sliding_layers(types, n, path)?,
            None => {
                let every = if self.generation() == 2 { 2 } else { self.sliding_window_pattern.unwrap_or(6) };
                if every == 0 {
                    return Err(ModelError::config(path, "sliding_window_pattern must be at least 1"));
                }
                (0..n).map(|i| (i + 1) % every != 0).collect()
            }
        };
        if self.sliding_window == Some(0) {
            return Err(ModelError::config(path, "sliding_window must be at least 1"));
        }
        Ok(sliding.into_iter().map(|s| if s { self.sliding_window } else { None }).collect())
    }
}

/// Inverse frequencies `1 / θ^(2i/d) / factor`, computed in f32 as transformers does.
fn inv_freq(rope: Rope, dim: usize) -> Vec<f32> {
    let base = rope.theta as f32;
    (0..dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32) / rope.factor as f32).collect()
}

/// Gemma's RMSNorm: `x / √(mean(x²) + ε) · (1 + w)`, the stored weight `w` centred on zero.
#[derive(Module, Debug)]
struct Norm {
    weight: Param<Tensor<1>>,
    eps: f64,
}

impl Norm {
    fn new(d: usize, eps: f64, device: &Device) -> Self {
        Self { weight: names::lazy([d], device), eps }
    }

    fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let gamma = self.weight.val().add_scalar(1.0);
        odpo_kernels::rms_norm(x.clone(), gamma.clone(), self.eps).unwrap_or_else(|| {
            let dtype = x.dtype();
            let rms = (x.clone().cast(DType::F32).square().mean_dim(D - 1) + self.eps).sqrt();
            (x / rms.cast(dtype)) * gamma.unsqueeze()
        })
    }

    /// The norm of each head's rows of projected queries or keys `[B, T, heads·Dh]` over `Dh`.
    fn per_head(&self, x: Tensor<3>, heads: usize) -> Tensor<3> {
        let [b, t, d] = x.dims();
        self.forward(x.reshape([b, t * heads, d / heads])).reshape([b, t, d])
    }
}

#[derive(Module, Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Gemma 3: RMSNorm over each query head and key head, before the rotation.
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    /// The sliding window, on the layers that have one.
    window: Option<usize>,
    /// Gemma 2's cap of the attention scores.
    softcap: Option<f64>,
    n_heads: usize,
    n_kv_heads: usize,
    scale: f64,
}

#[derive(Module, Debug)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    exact_gelu: bool,
}

#[derive(Module, Debug)]
struct Layer {
    input_layernorm: Norm,
    self_attn: Attention,
    /// Gemma: the MLP's input norm. Gemma 2 / 3: the attention output's norm.
    post_attention_layernorm: Norm,
    /// Gemma 2 / 3: the MLP's input and output norms.
    pre_feedforward_layernorm: Option<Norm>,
    post_feedforward_layernorm: Option<Norm>,
    mlp: Mlp,
}

/// A Gemma-family causal language model (`GemmaForCausalLM`, `Gemma2ForCausalLM`,
/// `Gemma3ForCausalLM`).
#[derive(Module, Debug)]
pub struct Gemma {
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: Norm,
    /// `[hidden, vocab]`; `None` when tied to the embeddings.
    lm_head: Option<Param<Tensor<2>>>,
    /// `√hidden_size`, rounded to f32 as transformers' buffer is.
    embed_scale: f32,
    /// Gemma 2's cap of the logits.
    final_softcap: Option<f64>,
    /// Inverse frequencies of the full layers' rotary embedding, and of the sliding layers' where
    /// they differ (Gemma 3).
    inv_freq: Vec<f32>,
    local_inv_freq: Option<Vec<f32>>,
}

/// `c·tanh(x / c)`.
fn softcap<const D: usize>(x: Tensor<D>, cap: f64) -> Tensor<D> {
    x.div_scalar(cap).tanh().mul_scalar(cap)
}

impl Attention {
    fn forward(&self, x: Tensor<3>, (cos, sin): (&Tensor<4>, &Tensor<4>), mask: &Tensor<4, Bool>, layer: usize, cache: Option<&mut KvCache>) -> Tensor<3> {
        let norm = |n: Option<&Norm>, x: Tensor<3>, heads| match n {
            Some(n) => n.per_head(x, heads),
            None => x,
        };
        let q = split_heads(norm(self.q_norm.as_ref(), self.q_proj.forward(x.clone()), self.n_heads), self.n_heads);
        let k = split_heads(norm(self.k_norm.as_ref(), self.k_proj.forward(x.clone()), self.n_kv_heads), self.n_kv_heads);
        let v = split_heads(self.v_proj.forward(x), self.n_kv_heads);
        let (q, k) = (rotate_half(q, cos, sin), rotate_half(k, cos, sin));
        let (k, v) = match cache {
            Some(cache) => cache.append(layer, k, v),
            None => (k, v),
        };
        let out = match self.softcap {
            Some(cap) => capped_attention(q, k, v, mask, self.scale, cap),
            None => grouped_attention(q, k, v, mask, self.scale),
        };
        self.o_proj.forward(merge_heads(out))
    }
}

impl Mlp {
    /// `down(gelu(gate(x)) · up(x))`, the gate one recorded operation where the backend has
    /// `odpo_kernels::glu`.
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let (g, u) = (self.gate_proj.forward(x.clone()), self.up_proj.forward(x));
        let gate = if self.exact_gelu { Gate::Gelu } else { Gate::GeluTanh };
        let y = odpo_kernels::glu(g.clone(), u.clone(), gate).unwrap_or_else(|| (if self.exact_gelu { gelu(g) } else { gelu_approximate(g) }) * u);
        self.down_proj.forward(y)
    }
}

impl Layer {
    fn forward(&self, x: Tensor<3>, rope: (&Tensor<4>, &Tensor<4>), mask: &Tensor<4, Bool>, i: usize, cache: Option<&mut KvCache>) -> Tensor<3> {
        let a = self.self_attn.forward(self.input_layernorm.forward(x.clone()), rope, mask, i, cache);
        match (&self.pre_feedforward_layernorm, &self.post_feedforward_layernorm) {
            (Some(pre), Some(post)) => {
                let x = x + self.post_attention_layernorm.forward(a);
                x.clone() + post.forward(self.mlp.forward(pre.forward(x)))
            }
            _ => {
                let x = x + a;
                x.clone() + self.mlp.forward(self.post_attention_layernorm.forward(x))
            }
        }
    }
}

impl Gemma {
    /// Builds the model from HF-named weights (`model.layers.N...`, `lm_head.weight` when untied).
    pub fn load(cfg: &GemmaConfig, w: &mut Weights, device: &Device) -> Result<Self> {
        if cfg.use_bidirectional_attention == Some(true) {
            return Err(ModelError::config(w.path(), "use_bidirectional_attention: only causal attention is implemented"));
        }
        let sizes = [cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.kv_heads()];
        crate::layers::grouped_layer_sizes(sizes, w.path())?;
        // The rotation turns pairs of a head's dimensions (its two halves).
        if cfg.head_dim == 0 || !cfg.head_dim.is_multiple_of(2) {
            return Err(ModelError::config(w.path(), format!("head_dim is {}; expected an even number", cfg.head_dim)));
        }
        let exact_gelu = cfg.exact_gelu(w.path())?;
        let (full, local) = cfg.ropes(w.path())?;
        let windows = cfg.layer_windows(w.path())?;
        let (d, v, hd, eps) = (cfg.hidden_size, cfg.vocab_size, cfg.head_dim, cfg.rms_norm_eps);
        let (nh, nkv, inner, bias, generation) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.intermediate_size, cfg.attention_bias, cfg.generation());
        let scale = if generation == 1 { 1.0 / (hd as f64).sqrt() } else { 1.0 / (cfg.query_pre_attn_scalar.unwrap_or(256) as f64).sqrt() };
        let norm = |d| Norm::new(d, eps, device);
        let layers = windows
            .into_iter()
            .map(|window| Layer {
                input_layernorm: norm(d),
                self_attn: Attention {
                    q_proj: names::linear(d, nh * hd, bias, device),
                    k_proj: names::linear(d, nkv * hd, bias, device),
                    v_proj: names::linear(d, nkv * hd, bias, device),
                    o_proj: names::linear(nh * hd, d, bias, device),
                    q_norm: (generation == 3).then(|| norm(hd)),
                    k_norm: (generation == 3).then(|| norm(hd)),
                    window,
                    softcap: if generation == 2 { cfg.attn_logit_softcapping } else { None },
                    n_heads: nh,
                    n_kv_heads: nkv,
                    scale,
                },
                post_attention_layernorm: norm(d),
                pre_feedforward_layernorm: (generation > 1).then(|| norm(d)),
                post_feedforward_layernorm: (generation > 1).then(|| norm(d)),
                mlp: Mlp {
                    gate_proj: names::linear(d, inner, false, device),
                    up_proj: names::linear(d, inner, false, device),
                    down_proj: names::linear(inner, d, false, device),
                    exact_gelu,
                },
            })
            .collect();
        let mut model = Self {
            embed_tokens: Embedding { weight: names::lazy([v, d], device) },
            layers,
            norm: norm(d),
            lm_head: (!cfg.tie_word_embeddings).then(|| names::lazy([d, v], device)),
            embed_scale: (d as f64).sqrt() as f32,
            final_softcap: if generation == 2 { cfg.final_logit_softcapping } else { None },
            inv_freq: inv_freq(full, hd),
            local_inv_freq: local.map(|r| inv_freq(r, hd)),
        };
        names::fill(model.named_mut(), w, device)?;
        Ok(model)
    }

    /// Every parameter under its HF name: the one list loading, saving and LoRA read.
    pub(crate) fn named_mut(&mut self) -> Table<'_> {
        fn norm(name: String, n: &mut Norm) -> (String, Slot<'_>) {
            (format!("{name}.weight"), Slot::Vector(&mut n.weight))
        }
        let mut t: Table<'_> = vec![("model.embed_tokens.weight".into(), Slot::Matrix(&mut self.embed_tokens.weight))];
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            t.push(norm(format!("{p}.input_layernorm"), &mut l.input_layernorm));
            t.push((format!("{p}.self_attn.q_proj"), Slot::Linear(&mut l.self_attn.q_proj)));
            t.push((format!("{p}.self_attn.k_proj"), Slot::Linear(&mut l.self_attn.k_proj)));
            t.push((format!("{p}.self_attn.v_proj"), Slot::Linear(&mut l.self_attn.v_proj)));
            t.push((format!("{p}.self_attn.o_proj"), Slot::Linear(&mut l.self_attn.o_proj)));
            if let Some(n) = &mut l.self_attn.q_norm {
                t.push(norm(format!("{p}.self_attn.q_norm"), n));
            }
            if let Some(n) = &mut l.self_attn.k_norm {
                t.push(norm(format!("{p}.self_attn.k_norm"), n));
            }
            t.push(norm(format!("{p}.post_attention_layernorm"), &mut l.post_attention_layernorm));
            if let Some(n) = &mut l.pre_feedforward_layernorm {
                t.push(norm(format!("{p}.pre_feedforward_layernorm"), n));
            }
            if let Some(n) = &mut l.post_feedforward_layernorm {
                t.push(norm(format!("{p}.post_feedforward_layernorm"), n));
            }
            t.push((format!("{p}.mlp.gate_proj"), Slot::Linear(&mut l.mlp.gate_proj)));
            t.push((format!("{p}.mlp.up_proj"), Slot::Linear(&mut l.mlp.up_proj)));
            t.push((format!("{p}.mlp.down_proj"), Slot::Linear(&mut l.mlp.down_proj)));
        }
        t.push(norm("model.norm".into(), &mut self.norm));
        if let Some(head) = &mut self.lm_head {
            t.push(("lm_head.weight".into(), Slot::Transposed(head)));
        }
        t
    }

    /// Final hidden states `[B, T, D]` (after the last norm, before the LM head) for the new tokens
    /// `input_ids` `[B, T]`; `mask` `[B, T_past + T]` marks real tokens (1) and padding (0),
    /// including the cached ones.
    pub fn hidden(&self, input_ids: Tensor<2, Int>, mask: &Tensor<2, Int>, mut cache: Option<&mut KvCache>) -> Tensor<3> {
        let [_, t] = input_ids.dims();
        let x = embed(&self.embed_tokens, input_ids);
        let mut x = x.mul_scalar(self.embed_scale);
        let pos = positions(mask, t);
        let full = rotate_half_cos_sin(&self.inv_freq, 1.0, pos.clone(), x.dtype());
        let local = self.local_inv_freq.as_ref().map(|f| rotate_half_cos_sin(f, 1.0, pos, x.dtype()));
        let m = attention_mask(mask, t, &x.device());
        // Every sliding layer has the config's one window.
        let windowed = self.layers.iter().find_map(|l| l.self_attn.window).map(|w| sliding_window_mask(&m, w));
        for (i, layer) in self.layers.iter().enumerate() {
            let sliding = layer.self_attn.window.is_some();
            let mask = if sliding { windowed.as_ref().unwrap_or(&m) } else { &m };
            let (cos, sin) = match (&local, sliding) {
                (Some(local), true) => local,
                _ => &full,
            };
            x = layer.forward(x, (cos, sin), mask, i, cache.as_deref_mut());
        }
        self.norm.forward(x)
    }

    /// Logits `[B, T, V]`: the LM head on [`Self::hidden`].
    pub fn forward(&self, input_ids: Tensor<2, Int>, mask: &Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.head(self.hidden(input_ids, mask, cache))
    }

    /// The LM head: logits `[B, T, V]` of final hidden states `[B, T, D]`, capped where the
    /// config caps them.
    pub fn head(&self, x: Tensor<3>) -> Tensor<3> {
        let logits = match &self.lm_head {
            Some(w) => linear_3d(x, &w.val()),
            None => tied_head(x, &self.embed_tokens.weight.val()),
        };
        match self.final_softcap {
            Some(cap) => softcap(logits, cap),
            None => logits,
        }
    }

    /// Entries of the vocabulary.
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

    use crate::ModelConfig;

    fn config(extra: serde_json::Value) -> crate::Result<super::GemmaConfig> {
        let mut v = json!({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 7, "num_attention_heads": 2});
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        match ModelConfig::from_hf_json(&v, "c".as_ref())? {
            ModelConfig::Gemma(c) => Ok(c),
            other => panic!("{other:?}"),
        }
    }

    /// A freshly initialised Gemma's norms scale by 1 (their stored weights are zeros), as
    /// transformers initialises them; the other families' norm weights are ones.
    #[test]
    fn a_fresh_gemma_scales_by_one() {
        let device = crate::backend::device("flex").unwrap();
        for arch in ["GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"] {
            let cfg = ModelConfig::Gemma(config(json!({"architectures": [arch], "num_hidden_layers": 2, "head_dim": 4})).unwrap());
            let mut model = crate::CausalLm::random(&cfg, 0, &device).unwrap();
            let saved = crate::names::to_hf(model.named_mut());
            let norms: Vec<_> = saved.entries().iter().filter(|(n, _, _)| n.contains("norm")).map(|(n, _, d)| (n.clone(), d.clone())).collect();
            assert!(norms.len() >= 5, "{arch}: {} norms", norms.len());
            for (name, data) in norms {
                assert!(data.iter().all(|&x| x == 0.0), "{arch}: {name}");
            }
        }
    }

    /// Which layers slide, the caps and the rotary bases, as transformers' configs set them
    /// (`configuration_gemma2.py`, `configuration_gemma3.py`).
    #[test]
    fn defaults_follow_transformers_configs() {
        let (s, f) = (Some(4096), None);
        let g1 = config(json!({"architectures": ["GemmaForCausalLM"]})).unwrap();
        assert_eq!(g1.layer_windows("c".as_ref()).unwrap(), vec![None; 7]);
        let g2 = config(json!({"architectures": ["Gemma2ForCausalLM"]})).unwrap();
        assert_eq!(g2.layer_windows("c".as_ref()).unwrap(), vec![s, f, s, f, s, f, s]);
        assert_eq!((g2.final_logit_softcapping, g2.attn_logit_softcapping), (Some(30.0), Some(50.0)));
        let g2 = config(json!({"architectures": ["Gemma2ForCausalLM"], "final_logit_softcapping": null, "sliding_window": null})).unwrap();
        assert_eq!((g2.final_logit_softcapping, g2.attn_logit_softcapping), (None, Some(50.0)));
        assert_eq!(g2.layer_windows("c".as_ref()).unwrap(), vec![None; 7]);
        // Written back, a lifted cap or window stays lifted (`null`, not absent).
        let saved = ModelConfig::Gemma(g2.clone()).to_hf_json();
        assert!(saved["final_logit_softcapping"].is_null() && saved["sliding_window"].is_null(), "{saved}");
        assert_eq!(ModelConfig::from_hf_json(&saved, "c".as_ref()).unwrap(), ModelConfig::Gemma(g2));
        let g3 = config(json!({"architectures": ["Gemma3ForCausalLM"], "sliding_window": 512})).unwrap();
        assert_eq!(g3.layer_windows("c".as_ref()).unwrap(), vec![Some(512), Some(512), Some(512), Some(512), Some(512), None, Some(512)]);
        assert_eq!((g3.final_logit_softcapping, g3.attn_logit_softcapping), (None, None));
        let (full, local) = g3.ropes("c".as_ref()).unwrap();
        assert_eq!((full.theta, full.factor, local.unwrap().theta), (1e6, 1.0, 1e4));
        // Gemma-3-4B's text config as released, and as transformers 5 writes it.
        for scaled in [
            json!({"architectures": ["Gemma3ForCausalLM"], "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"factor": 8.0, "rope_type": "linear"}}),
            json!({"architectures": ["Gemma3ForCausalLM"], "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                   "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
        ] {
            let (full, local) = config(scaled).unwrap().ropes("c".as_ref()).unwrap();
            assert_eq!((full.theta, full.factor, local.unwrap().theta), (1e6, 8.0, 1e4));
        }
        for (bad, says) in [
            (json!({"architectures": ["Gemma2ForCausalLM"], "layer_types": ["full_attention"]}), "layer_types has 1 entries"),
            (json!({"architectures": ["Gemma3ForCausalLM"], "sliding_window_pattern": 0}), "at least 1"),
            (json!({"architectures": ["Gemma3ForCausalLM"], "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}), "rope_type `yarn`"),
        ] {
            let cfg = config(bad).unwrap();
            let err = cfg.layer_windows("c".as_ref()).and_then(|_| cfg.ropes("c".as_ref()).map(|_| ())).unwrap_err().to_string();
            assert!(err.starts_with("c: ") && err.contains(says), "{err}");
        }
    }
}
