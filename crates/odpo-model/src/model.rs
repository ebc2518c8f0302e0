//! The model families behind one type: reading `config.json`, loading from a HF folder or a
//! GGUF file, running the forward pass, and saving in HF layout.

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Device, FloatDType, Int, Tensor};
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::gemma::{Gemma, GemmaConfig};
use crate::gpt_neo::{GptNeo, GptNeoConfig};
use crate::gpt_neox::{GptNeox, GptNeoxConfig};
use crate::gpt2::{Gpt2, Gpt2Config};
use crate::gptj::{Gptj, GptjConfig};
use crate::phi::{Phi, PhiConfig};
use crate::stablelm::{StableLm, StableLmConfig};
use crate::layers::KvCache;
use crate::llama::{Llama, LlamaConfig};
use crate::weights::{Weights, write_atomic};

/// A model configuration read from HF `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelConfig {
    /// GPT-2.
    Gpt2(Gpt2Config),
    /// Llama, Mistral, Qwen2, Qwen3, OLMo 2, SmolLM2, SmolLM3, Granite.
    Llama(LlamaConfig),
    /// GPT-Neo.
    GptNeo(GptNeoConfig),
    /// GPT-J.
    Gptj(GptjConfig),
    /// GPT-NeoX, Pythia.
    GptNeox(GptNeoxConfig),
    /// Gemma, Gemma 2, Gemma 3 (text).
    Gemma(GemmaConfig),
    /// Phi-1, Phi-1.5, Phi-2.
    Phi(PhiConfig),
    /// StableLM 2, StableLM-3B-4E1T.
    StableLm(StableLmConfig),
}

impl ModelConfig {
    /// Parses a `config.json` value; `path` is only used in error messages.
    pub fn from_hf_json(value: &Value, path: &Path) -> Result<Self> {
        let arch = value
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .or_else(|| value.get("model_type").and_then(Value::as_str))
            .ok_or_else(|| ModelError::config(path, "neither `architectures` nor `model_type` is given"))?;
        // The error names the key: `vocab_size: invalid type: string "many", expected usize`.
        let parse = |e: serde_path_to_error::Error<serde_json::Error>| ModelError::config(path, e.to_string());
        match arch {
            "GPT2LMHeadModel" | "GPT2Model" | "gpt2" => {
                Ok(Self::Gpt2(serde_path_to_error::deserialize(value.clone()).map_err(parse)?))
            }
            "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM" | "Qwen3ForCausalLM" | "Olmo2ForCausalLM" | "Olmo3ForCausalLM" | "SmolLM3ForCausalLM" | "GraniteForCausalLM" | "Phi3ForCausalLM" | "MixtralForCausalLM" | "Qwen2MoeForCausalLM" | "Qwen3MoeForCausalLM" | "llama" | "mistral" | "qwen2" | "qwen3" | "olmo2" | "olmo3" | "smollm3" | "granite" | "phi3" | "mixtral" | "qwen2_moe" | "qwen3_moe" => {
                let mut cfg: LlamaConfig = serde_path_to_error::deserialize(value.clone()).map_err(parse)?;
                // The architecture decides what the weights hold (Qwen2's q/k/v biases, Qwen3's
                // head norms, OLMo 2's norms), whatever `model_type` says.
                if matches!(arch, "MixtralForCausalLM" | "mixtral") {
                    cfg.model_type = "mixtral".into();
                    // transformers' Mixtral config: epsilon 1e-5, no window where the key is absent.
                    if value.get("rms_norm_eps").is_none() {
                        cfg.rms_norm_eps = 1e-5;
                    }
                } else if matches!(arch, "Qwen2MoeForCausalLM" | "qwen2_moe") {
                    cfg.model_type = "qwen2_moe".into();
                } else if matches!(arch, "Qwen3MoeForCausalLM" | "qwen3_moe") {
                    cfg.model_type = "qwen3_moe".into();
                } else if arch.starts_with("Qwen2") {
                    cfg.model_type = "qwen2".into();
                } else if arch.starts_with("Qwen3") {
                    cfg.model_type = "qwen3".into();
                } else if matches!(arch, "Olmo2ForCausalLM" | "olmo2" | "Olmo3ForCausalLM" | "olmo3") {
                    cfg.model_type = if arch.contains('3') { "olmo3" } else { "olmo2" }.into();
                    // transformers' OLMo 2 and 3 configs default the epsilon to 1e-5 (Llama's to 1e-6).
                    if value.get("rms_norm_eps").is_none() {
                        cfg.rms_norm_eps = 1e-5;
                    }
                } else if matches!(arch, "SmolLM3ForCausalLM" | "smollm3") {
                    cfg.model_type = "smollm3".into();
                } else if matches!(arch, "GraniteForCausalLM" | "granite") {
                    cfg.model_type = "granite".into();
                } else if matches!(arch, "Phi3ForCausalLM" | "phi3") {
                    cfg.model_type = "phi3".into();
                    // transformers' Phi-3 config: epsilon 1e-5, 4096 positions, no biases whatever
                    // the keys say (its projections have none).
                    if value.get("rms_norm_eps").is_none() {
                        cfg.rms_norm_eps = 1e-5;
                    }
                    if value.get("max_position_embeddings").is_none() {
                        cfg.max_position_embeddings = 4096;
                    }
                    (cfg.attention_bias, cfg.mlp_bias) = (false, false);
                } else if matches!(cfg.model_type.as_str(), "olmo2" | "olmo3" | "smollm3" | "granite" | "phi3" | "mixtral" | "qwen2_moe" | "qwen3_moe") {
                    // `model_type` alone does not make OLMo 2's, OLMo 3's, SmolLM3's, Granite's,
                    // Phi-3's or a mixture of experts' layers out of a Llama architecture.
                    cfg.model_type = "llama".into();
                }
                // transformers' Mistral, Qwen2, Qwen3 and OLMo 3 configs default the window to 4096 tokens
                // where the key is absent (`null` is no window).
                if cfg.has_window_key() && value.get("sliding_window").is_none() {
                    cfg.sliding_window = Some(4096);
                }
                Ok(Self::Llama(cfg))
            }
            "GPTNeoForCausalLM" | "gpt_neo" => Ok(Self::GptNeo(serde_path_to_error::deserialize(value.clone()).map_err(parse)?)),
            "GPTJForCausalLM" | "gptj" => Ok(Self::Gptj(serde_path_to_error::deserialize(value.clone()).map_err(parse)?)),
            "GPTNeoXForCausalLM" | "gpt_neox" => Ok(Self::GptNeox(serde_path_to_error::deserialize(value.clone()).map_err(parse)?)),
            "PhiForCausalLM" | "phi" => Ok(Self::Phi(serde_path_to_error::deserialize(value.clone()).map_err(parse)?)),
            "StableLmForCausalLM" | "stablelm" => Ok(Self::StableLm(serde_path_to_error::deserialize(value.clone()).map_err(parse)?)),
            "GemmaForCausalLM" | "Gemma2ForCausalLM" | "Gemma3ForCausalLM" | "gemma" | "gemma2" | "gemma3_text" => {
                // The architecture decides the generation, whatever `model_type` says.
                let model_type = match arch {
                    "GemmaForCausalLM" | "gemma" => "gemma",
                    "Gemma2ForCausalLM" | "gemma2" => "gemma2",
                    _ => "gemma3_text",
                };
                let mut value = value.clone();
                if let Some(map) = value.as_object_mut() {
                    map.insert("model_type".into(), Value::from(model_type));
                    // The keys transformers reads as a number where they are absent (`null`: none).
                    for (key, default) in GemmaConfig::defaulted_keys(model_type) {
                        map.entry(key).or_insert(default);
                    }
                }
                Ok(Self::Gemma(serde_path_to_error::deserialize(value).map_err(parse)?))
            }
            other => Err(ModelError::UnknownArchitecture { path: path.into(), architecture: other.into() }),
        }
    }

    /// Reads and parses a `config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| ModelError::config(path, e.to_string()))?;
        Self::from_hf_json(&value, path)
    }

    /// The vocabulary size.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Gpt2(c) => c.vocab_size,
            Self::Llama(c) => c.vocab_size,
            Self::GptNeo(c) => c.vocab_size,
            Self::Gptj(c) => c.vocab_size,
            Self::GptNeox(c) => c.vocab_size,
            Self::Phi(c) => c.vocab_size,
            Self::StableLm(c) => c.vocab_size,
            Self::Gemma(c) => c.vocab_size,
        }
    }

    /// A lower bound of the values a training forward pass keeps for its backward pass, per token
    /// and over all layers. Kept either way, each layer: the query, key and value the attention
    /// keeps, and the MLP's hidden units before the activation (its gate and up projections'
    /// outputs in a gated unit); where every weight trains, also the attention's output (the output
    /// projection's input). Without gradient checkpointing also each norm's input, and where every
    /// weight trains the projections' other inputs (the norms' outputs, the activation's output),
    /// which their weights' gradients are computed from; with burn's checkpointing those are
    /// recomputed, and the outputs of the two projections into the residual stream are kept
    /// instead, to recompute it from. The norms' and activations' other records, the attention's
    /// own and the logits are not counted.
    ///
    /// Under LoRA (`lora`) a frozen product keeps nothing for its weight's gradient, and the first
    /// layer, whose input needs no gradient, may keep nothing: its layers after the first are
    /// counted, each without the products' inputs.
    pub fn backward_kept_per_token(&self, gradient_checkpointing: bool, lora: bool) -> u64 {
        // (layers, hidden size, heads × head size, key-value heads × head size, MLP width, the
        // distinct norm inputs a layer keeps without checkpointing, in hidden sizes)
        let (layers, d, q, kv, ff, norms_in) = match self {
            Self::Gpt2(c) => (c.n_layer, c.n_embd, c.n_embd, c.n_embd, c.n_inner.unwrap_or(4 * c.n_embd), 2),
            Self::GptNeo(c) => (c.num_layers, c.hidden_size, c.hidden_size, c.hidden_size, c.intermediate_size.unwrap_or(4 * c.hidden_size), 2),
            // Parallel or not: a norm's input counted once (the parallel block's two norms read one).
            Self::GptNeox(c) => (c.num_hidden_layers, c.hidden_size, c.hidden_size, c.hidden_size, c.intermediate_size, 1),
            Self::Gptj(c) => (c.n_layer, c.n_embd, c.n_embd, c.n_embd, c.n_inner.unwrap_or(4 * c.n_embd), 1),
            Self::Phi(c) => (c.num_hidden_layers, c.hidden_size, c.num_attention_heads * c.head_dim(), c.kv_heads() * c.head_dim(), c.intermediate_size, 1),
            // Sequential: two norms' inputs; parallel: one, read by the attention and the MLP.
            Self::StableLm(c) => (c.num_hidden_layers, c.hidden_size, c.num_attention_heads * c.head_dim(), c.num_key_value_heads * c.head_dim(), c.intermediate_size, if c.use_parallel_residual { 1 } else { 2 }),
            // A mixture of experts: the units of the experts a token takes, averaged over the layers.
            Self::Llama(c) => (c.num_hidden_layers, c.hidden_size, c.num_attention_heads * c.head_size(), c.kv_heads() * c.head_size(), c.token_mlp_width(), 2),
            Self::Gemma(c) => (c.num_hidden_layers, c.hidden_size, c.num_attention_heads * c.head_dim, c.kv_heads() * c.head_dim, c.intermediate_size, 2),
        };
        // A gated unit keeps its gate's and its up projection's outputs; GELU its one input.
        let gated = matches!(self, Self::Llama(_) | Self::Gemma(_) | Self::StableLm(_));
        let hidden = if gated { 2 * ff } else { ff };
        let residual = 2 * d;
        if lora {
            // The attention's query, key and value and the MLP's hidden units are kept by the
            // operations that read them (the norms' inputs too without checkpointing), trained or not.
            let per_layer = q + 2 * kv + hidden + if gradient_checkpointing { residual } else { norms_in * d };
            return (layers.saturating_sub(1) as u64).saturating_mul(per_layer as u64);
        }
        // Attention: query, key and value, and its output.
        let both = q + 2 * kv + q + hidden;
        // GPT-J's, Phi's and a parallel StableLM's attention and MLP read one norm's output; the
        // others each their own.
        let norm_outputs = match self {
            Self::Gptj(_) | Self::Phi(_) => 1,
            Self::StableLm(c) if c.use_parallel_residual => 1,
            _ => 2,
        };
        let extra = if gradient_checkpointing { residual } else { (norm_outputs + norms_in) * d + ff };
        (layers as u64).saturating_mul((both + extra) as u64)
    }

    /// Whether the model is a mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE).
    pub fn has_experts(&self) -> bool {
        matches!(self, Self::Llama(c) if c.moe())
    }

    /// A mixture of experts' load-balancing loss weight as its config declares it:
    /// `router_aux_loss_coef`, transformers' 0.001 where absent, whatever `output_router_logits`
    /// says (TRL 1.16 takes it so); `None` for a model without experts.
    pub fn router_aux_loss_coef(&self) -> Option<f64> {
        match self {
            Self::Llama(c) if c.moe() => Some(c.router_aux_loss_coef.unwrap_or(0.001)),
            _ => None,
        }
    }

    /// The most positions a row can have where the family learns a position table (GPT-2,
    /// GPT-Neo): [`CausalLm::position_limit`] before the model is built.
    pub fn position_limit(&self) -> Option<usize> {
        match self {
            Self::Gpt2(c) => Some(c.n_positions),
            Self::GptNeo(c) => Some(c.max_position_embeddings),
            Self::Llama(_) | Self::Gptj(_) | Self::GptNeox(_) | Self::Phi(_) | Self::StableLm(_) | Self::Gemma(_) => None,
        }
    }

    /// The longest sequence the model supports.
    pub fn max_positions(&self) -> usize {
        match self {
            Self::Gpt2(c) => c.n_positions,
            Self::Llama(c) => c.max_position_embeddings,
            Self::GptNeo(c) => c.max_position_embeddings,
            Self::Gptj(c) => c.n_positions,
            Self::GptNeox(c) => c.max_position_embeddings,
            Self::Phi(c) => c.max_position_embeddings,
            Self::StableLm(c) => c.max_position_embeddings,
            Self::Gemma(c) => c.max_position_embeddings,
        }
    }

    /// The end-of-sequence token given by the config, if any (the first of a list).
    pub fn eos_token_id(&self) -> Option<u32> {
        match self {
            Self::Gpt2(c) => c.eos_token_id,
            Self::Llama(c) => first_id(c.eos_token_id.as_ref()),
            Self::Gemma(c) => first_id(c.eos_token_id.as_ref()),
            Self::GptNeo(c) => c.eos_token_id,
            Self::Gptj(c) => c.eos_token_id,
            Self::GptNeox(c) => c.eos_token_id,
            Self::Phi(c) => first_id(c.eos_token_id.as_ref()),
            Self::StableLm(c) => first_id(c.eos_token_id.as_ref()),
        }
    }

    /// The config as HF `config.json` writes it (architecture and model type included).
    pub fn to_hf_json(&self) -> Value {
        let (mut v, arch, model_type) = match self {
            Self::Gpt2(c) => (serde_json::to_value(c), "GPT2LMHeadModel", "gpt2"),
            Self::Llama(c) => {
                let arch = match c.model_type.as_str() {
                    "qwen2" => "Qwen2ForCausalLM",
                    "qwen3" => "Qwen3ForCausalLM",
                    "mistral" => "MistralForCausalLM",
                    "olmo2" => "Olmo2ForCausalLM",
                    "olmo3" => "Olmo3ForCausalLM",
                    "smollm3" => "SmolLM3ForCausalLM",
                    "granite" => "GraniteForCausalLM",
                    "phi3" => "Phi3ForCausalLM",
                    "mixtral" => "MixtralForCausalLM",
                    "qwen2_moe" => "Qwen2MoeForCausalLM",
                    "qwen3_moe" => "Qwen3MoeForCausalLM",
                    _ => "LlamaForCausalLM",
                };
                (serde_json::to_value(c), arch, c.model_type.as_str())
            }
            Self::GptNeo(c) => (serde_json::to_value(c), "GPTNeoForCausalLM", "gpt_neo"),
            Self::Gptj(c) => (serde_json::to_value(c), "GPTJForCausalLM", "gptj"),
            Self::GptNeox(c) => (serde_json::to_value(c), "GPTNeoXForCausalLM", "gpt_neox"),
            Self::Phi(c) => (serde_json::to_value(c), "PhiForCausalLM", "phi"),
            Self::StableLm(c) => (serde_json::to_value(c), "StableLmForCausalLM", "stablelm"),
            Self::Gemma(c) => {
                let arch = match c.model_type.as_str() {
                    "gemma2" => "Gemma2ForCausalLM",
                    "gemma3_text" => "Gemma3ForCausalLM",
                    _ => "GemmaForCausalLM",
                };
                (serde_json::to_value(c), arch, c.model_type.as_str())
            }
        };
        if let Ok(Value::Object(map)) = &mut v {
            map.retain(|_, v| !v.is_null());
            map.insert("architectures".into(), Value::from(vec![arch]));
            map.insert("model_type".into(), Value::from(model_type));
            map.insert("torch_dtype".into(), Value::from("float32"));
            if let Self::Gpt2(_) = self {
                map.insert("tie_word_embeddings".into(), Value::from(true));
            }
            // No window is written as `null`, as transformers writes it: it reads the key's absence
            // as 4096.
            if let Self::Llama(c) = self
                && c.has_window_key()
                && c.sliding_window.is_none()
            {
                map.insert("sliding_window".into(), Value::Null);
            }
            if let Self::Gemma(c) = self {
                for (key, _) in GemmaConfig::defaulted_keys(&c.model_type) {
                    map.entry(key).or_insert(Value::Null);
                }
            }
        }
        v.unwrap_or(Value::Null)
    }
}

/// Floating-point precision of the weights and of the compute that follows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats (the default; what the parity tests check at 1e-4).
    #[default]
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl Precision {
    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }

    /// burn's dtype for this precision.
    pub fn dtype(self) -> FloatDType {
        match self {
            Self::F32 => FloatDType::F32,
            Self::F16 => FloatDType::F16,
            Self::Bf16 => FloatDType::BF16,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(ModelError::Invalid(format!("unknown precision `{other}`; expected f32, f16 or bf16"))),
        }
    }
}

/// Casts every float parameter of a module; with `keep_gradients`, through
/// [`odpo_kernels::compute_cast`], whose gradients stay in the cast's dtype.
struct Caster {
    dtype: FloatDType,
    keep_gradients: bool,
}

impl ModuleMapper for Caster {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Self { dtype, keep_gradients } = *self;
        // A quantised weight stays so; its product dequantises to the activations' type.
        param.map(|t| match t.dtype() {
            burn::tensor::DType::QFloat(_) => t,
            _ if keep_gradients => odpo_kernels::compute_cast(t, dtype),
            _ => t.cast(dtype),
        })
    }
}

/// A model's weights cast once to half precision, for the micro-batches of one training step to
/// run on ([`CausalLm::with_half_weights`]) without casting them again for each.
#[derive(Debug)]
pub struct HalfWeights {
    dtype: FloatDType,
    /// Each float parameter's cast, in visiting order (`None`: a quantised weight, left as it is).
    weights: Vec<Option<burn::backend::DispatchTensor>>,
}

impl HalfWeights {
    /// Casts made elsewhere (the optimizer writes them as it updates the weights): one entry per
    /// float parameter of the model they were made from, in visiting order; `None` for one to cast
    /// when used.
    pub fn from_parts(precision: Precision, weights: Vec<Option<burn::backend::DispatchTensor>>) -> Self {
        Self { dtype: precision.dtype(), weights }
    }
}

/// Takes each weight's cast from [`HalfWeights`], in visiting order.
struct HalfCopies<'a> {
    dtype: FloatDType,
    weights: std::slice::Iter<'a, Option<burn::backend::DispatchTensor>>,
}

impl ModuleMapper for HalfCopies<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (dtype, half) = (self.dtype, self.weights.next().cloned().flatten());
        param.map(|t| match (t.dtype(), half.map(Tensor::<D>::from_dispatch)) {
            (burn::tensor::DType::QFloat(_), _) => t,
            (_, Some(half)) if half.dtype() == dtype.into() => odpo_kernels::compute_copy(t, half),
            _ => odpo_kernels::compute_cast(t, dtype),
        })
    }
}

/// A causal language model of any implemented family.
#[derive(Module, Debug)]
pub enum CausalLm {
    /// GPT-2.
    Gpt2(Gpt2),
    /// Llama family.
    Llama(Llama),
    /// GPT-Neo.
    GptNeo(GptNeo),
    /// GPT-J.
    Gptj(Gptj),
    /// GPT-NeoX, Pythia.
    GptNeox(GptNeox),
    /// Gemma family.
    Gemma(Gemma),
    /// Phi-1, Phi-1.5, Phi-2 (after the others: a variant's place is part of a saved record).
    Phi(Phi),
    /// StableLM 2, StableLM-3B-4E1T.
    StableLm(StableLm),
}

/// A loaded model with its configuration and where it came from.
#[derive(Debug)]
pub struct LoadedModel {
    /// The configuration.
    pub config: ModelConfig,
    /// The weights.
    pub model: CausalLm,
    /// Where the tokenizer comes from: the model folder, or the `.gguf` file (whose own vocabulary
    /// serves when no `tokenizer.json` lies beside it); [`crate::tokenizer::Tokenizer::open`] reads it.
    pub tokenizer_path: PathBuf,
}

impl CausalLm {
    /// Builds a model from a config and HF-named weights; leftover tensors are logged.
    pub fn from_weights(config: &ModelConfig, weights: &mut Weights, device: &Device) -> Result<Self> {
        let model = match config {
            ModelConfig::Gpt2(c) => Self::Gpt2(Gpt2::load(c, weights, device)?),
            ModelConfig::Llama(c) => Self::Llama(Llama::load(c, weights, device)?),
            ModelConfig::GptNeo(c) => Self::GptNeo(GptNeo::load(c, weights, device)?),
            ModelConfig::Gptj(c) => Self::Gptj(Gptj::load(c, weights, device)?),
            ModelConfig::GptNeox(c) => Self::GptNeox(GptNeox::load(c, weights, device)?),
            ModelConfig::Phi(c) => Self::Phi(Phi::load(c, weights, device)?),
            ModelConfig::StableLm(c) => Self::StableLm(StableLm::load(c, weights, device)?),
            ModelConfig::Gemma(c) => Self::Gemma(Gemma::load(c, weights, device)?),
        };
        // Causal-mask buffers older GPT-2 / GPT-Neo / GPT-J / GPT-NeoX checkpoints carry are expected leftovers.
        let buffer = |n: &str| [".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias"].iter().any(|s| n.ends_with(s));
        let unused: Vec<&str> = weights.remaining().filter(|n| !buffer(n) && !n.contains("rotary_emb")).collect();
        if !unused.is_empty() {
            tracing::warn!(file = %weights.path().display(), "{} tensors in the checkpoint are not used: {}", unused.len(), unused.join(", "));
        }
        Ok(model)
    }

    /// A freshly initialised model (weights N(0, 0.02), norms scaling by 1, biases 0), seeded.
    pub fn random(config: &ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        Self::random_with(config, seed, device, false)
    }

    /// [`Self::random`], with the projections block-quantised to Q8_0 when `quantized_base` (the
    /// same draws, then quantised; see [`crate::quantized`]).
    pub fn random_with(config: &ModelConfig, seed: u64, device: &Device, quantized_base: bool) -> Result<Self> {
        let mut weights = Weights::random(seed, 0.02);
        if let ModelConfig::Gemma(_) = config {
            weights = weights.with_zero_centred_norms();
        }
        if quantized_base {
            weights = weights.quantizing_projections();
        }
        Self::from_weights(config, &mut weights, device)
    }

    /// [`Self::random_with`] on the config in the file `config_path` (a HF `config.json`); a size no
    /// model can have is an error naming that file, as [`Self::load`] names a folder's `config.json`.
    pub fn random_from_file(config_path: &Path, seed: u64, device: &Device, quantized_base: bool) -> Result<(ModelConfig, Self)> {
        let config = ModelConfig::from_file(config_path)?;
        let model = Self::random_with(&config, seed, device, quantized_base).map_err(|e| e.in_config_file(config_path))?;
        Ok((config, model))
    }

    /// Loads a model from a HF folder (`config.json` + safetensors) or a llama.cpp `.gguf` file.
    pub fn load(path: &Path, device: &Device) -> Result<LoadedModel> {
        Self::load_with(path, device, false)
    }

    /// [`Self::load`], with the projections block-quantised when `quantized_base`: a GGUF file's
    /// Q8_0, Q4_0 and Q4_1 projections as stored, any other weight quantised to Q8_0 at load (see
    /// [`crate::quantized`]). Such a base is for LoRA: the quantised weights take no gradient.
    pub fn load_with(path: &Path, device: &Device, quantized_base: bool) -> Result<LoadedModel> {
        let quantize = |w: Weights| if quantized_base { w.quantizing_projections() } else { w };
        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            let (config_json, tensors, blocks) = crate::gguf::load_blocks_as_hf(path, quantized_base)?;
            let config = ModelConfig::from_hf_json(&config_json, path)?;
            let mut weights = quantize(Weights::new(path, tensors).with_blocks(blocks));
            let model = Self::from_weights(&config, &mut weights, device)?;
            return Ok(LoadedModel { config, model, tokenizer_path: path.to_path_buf() });
        }
        if path.is_file() {
            let what = "a file; expected a HF model folder (config.json and model.safetensors) or a llama.cpp `.gguf` file";
            return Err(ModelError::Invalid(format!("{}: is {what}", path.display())));
        }
        let config_path = path.join("config.json");
        let config = ModelConfig::from_file(&config_path)?;
        let mut weights = quantize(Weights::from_hf_dir(path)?);
        let model = Self::from_weights(&config, &mut weights, device).map_err(|e| e.in_config_file(&config_path))?;
        Ok(LoadedModel { config, model, tokenizer_path: path.to_path_buf() })
    }

    /// [`Module::fork`] onto `device`, except that a model with a block-quantised base stays as it
    /// is: burn 0.22.1's `to_device` of a quantised tensor returns it dequantised (the f32 base the
    /// quantisation was for), and such a base lives on flex, a single device, where the model
    /// already is.
    pub fn fork_to(self, device: &Device) -> Self {
        if self.has_quantized_base() { self } else { self.fork(device) }
    }

    /// Whether any projection holds a block-quantised weight.
    pub fn has_quantized_base(&self) -> bool {
        crate::names::projections(self.clone().named_mut()).iter().any(|((_, l), _)| l.is_quantized())
    }

    /// Logits `[B, T, V]` for `input_ids` `[B, T]`. `attention_mask` `[B, T_past + T]` marks real
    /// tokens (1) and padding (0), left or right; positions count real tokens only. With a
    /// cache, `input_ids` are the new tokens and the cache grows by `T`.
    pub fn forward(&self, input_ids: Tensor<2, Int>, attention_mask: &Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        match self {
            Self::Gpt2(m) => m.forward(input_ids, attention_mask, cache),
            Self::Llama(m) => m.forward(input_ids, attention_mask, cache),
            Self::GptNeo(m) => m.forward(input_ids, attention_mask, cache),
            Self::Gptj(m) => m.forward(input_ids, attention_mask, cache),
            Self::GptNeox(m) => m.forward(input_ids, attention_mask, cache),
            Self::Phi(m) => m.forward(input_ids, attention_mask, cache),
            Self::StableLm(m) => m.forward(input_ids, attention_mask, cache),
            Self::Gemma(m) => m.forward(input_ids, attention_mask, cache),
        }
    }

    /// Final hidden states `[B, T, D]` (after the last norm, before the LM head): what reward heads
    /// and other probes read. Same arguments as [`Self::forward`].
    pub fn hidden(&self, input_ids: Tensor<2, Int>, attention_mask: &Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        match self {
            Self::Gpt2(m) => m.hidden(input_ids, attention_mask, cache),
            Self::Llama(m) => m.hidden(input_ids, attention_mask, cache),
            Self::GptNeo(m) => m.hidden(input_ids, attention_mask, cache),
            Self::Gptj(m) => m.hidden(input_ids, attention_mask, cache),
            Self::GptNeox(m) => m.hidden(input_ids, attention_mask, cache),
            Self::Phi(m) => m.hidden(input_ids, attention_mask, cache),
            Self::StableLm(m) => m.hidden(input_ids, attention_mask, cache),
            Self::Gemma(m) => m.hidden(input_ids, attention_mask, cache),
        }
    }

    /// [`Self::hidden`], and for a mixture of experts its routing of the new real tokens added to
    /// `stats` (`weight` times): what its load-balancing loss is computed from. Other families
    /// route nothing.
    pub fn hidden_routed(&self, input_ids: Tensor<2, Int>, attention_mask: &Tensor<2, Int>, cache: Option<&mut KvCache>, stats: Option<(f64, &mut crate::moe::RouterStats)>) -> Tensor<3> {
        match self {
            Self::Llama(m) => m.hidden_routed(input_ids, attention_mask, cache, stats),
            _ => self.hidden(input_ids, attention_mask, cache),
        }
    }

    /// The LM head: logits `[B, T, V]` of final hidden states `[B, T, D]` ([`Self::hidden`]);
    /// `forward` is `head(hidden(..))`. Calling the two apart lets a caller run the head on the
    /// positions it needs only (completion tokens in training, the last token in generation).
    pub fn head(&self, hidden: Tensor<3>) -> Tensor<3> {
        match self {
            Self::Gpt2(m) => m.head(hidden),
            Self::Llama(m) => m.head(hidden),
            Self::GptNeo(m) => m.head(hidden),
            Self::Gptj(m) => m.head(hidden),
            Self::GptNeox(m) => m.head(hidden),
            Self::Phi(m) => m.head(hidden),
            Self::StableLm(m) => m.head(hidden),
            Self::Gemma(m) => m.head(hidden),
        }
    }

    /// The model with its weights cast to `precision`; activations follow the weights, while
    /// norms, softmax and log-probabilities accumulate in f32.
    pub fn with_precision(self, precision: Precision) -> Self {
        self.map(&mut Caster { dtype: precision.dtype(), keep_gradients: false })
    }

    /// [`Self::with_precision`] for a mixed-precision training step: the same forward pass, but
    /// the gradients that reach the f32 weights stay in `precision` ([`odpo_kernels::compute_cast`]),
    /// with no cast launched per weight in the backward pass. For an optimizer that reads them as
    /// odpo's does (`odpo_kernels::adamw` widens them to f32 as it loads them); any other should
    /// cast them to the weights' dtype first.
    pub fn with_compute_precision(self, precision: Precision) -> Self {
        self.map(&mut Caster { dtype: precision.dtype(), keep_gradients: true })
    }

    /// The weights cast to `precision` once, outside the autodiff graph, for
    /// [`Self::with_half_weights`].
    pub fn half_weights(&self, precision: Precision) -> HalfWeights {
        struct Collect(FloatDType, Vec<Option<burn::backend::DispatchTensor>>);
        impl burn::module::ModuleVisitor for Collect {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let t = param.val();
                let half = (!matches!(t.dtype(), burn::tensor::DType::QFloat(_))).then(|| t.detach().cast(self.0).into_dispatch());
                self.1.push(half);
            }
        }
        let mut c = Collect(precision.dtype(), Vec::new());
        self.visit(&mut c);
        HalfWeights { dtype: c.0, weights: c.1 }
    }

    /// [`Self::with_compute_precision`] with the casts `half` holds (made by [`Self::half_weights`]
    /// of this model, with these weights): the same values and gradients, recorded in this graph
    /// (`odpo_kernels::compute_copy`) with nothing launched. The micro-batches of a step each need
    /// a graph of their own, and this gives each one without casting the weights again.
    pub fn with_half_weights(self, half: &HalfWeights) -> Self {
        self.map(&mut HalfCopies { dtype: half.dtype, weights: half.weights.iter() })
    }

    /// TR-DPO's soft update of a reference toward a policy (Gorbatovski et al., "Learn Your Reference
    /// Model for Real Good Alignment", arXiv 2404.09656, its soft update): every float weight becomes
    /// `(1 − alpha)·self + alpha·toward`, in self's dtype and on self's device; `alpha = 1` copies the
    /// policy (the paper's hard update). `toward` must have self's parameters, in the same order and
    /// shapes (the same architecture); anything else is an error. Block-quantised weights cannot be
    /// mixed and are refused.
    pub fn soft_update(self, toward: &CausalLm, alpha: f64) -> Result<Self> {
        /// Each float weight's shape and whether it is block-quantised, and (`keep`) the weight itself.
        struct Collect {
            keep: bool,
            shapes: Vec<(Vec<usize>, bool)>,
            weights: Vec<burn::backend::DispatchTensor>,
        }
        impl burn::module::ModuleVisitor for Collect {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let t = param.val().detach();
                self.shapes.push((t.dims().to_vec(), matches!(t.dtype(), burn::tensor::DType::QFloat(_))));
                if self.keep {
                    self.weights.push(t.into_dispatch());
                }
            }
        }
        let mut mine = Collect { keep: false, shapes: Vec::new(), weights: Vec::new() };
        let mut theirs = Collect { keep: true, shapes: Vec::new(), weights: Vec::new() };
        self.visit(&mut mine);
        toward.visit(&mut theirs);
        if mine.shapes.len() != theirs.shapes.len() {
            return Err(ModelError::Invalid(format!("a soft update needs the same parameters: {} weights against {}", mine.shapes.len(), theirs.shapes.len())));
        }
        for (i, ((a, qa), (b, qb))) in mine.shapes.iter().zip(&theirs.shapes).enumerate() {
            if a != b || *qa || *qb {
                return Err(ModelError::Invalid(format!("a soft update needs the same, unquantised weights: weight {i} is {a:?} against {b:?}")));
            }
        }
        struct Mix {
            alpha: f64,
            toward: std::vec::IntoIter<burn::backend::DispatchTensor>,
        }
        impl ModuleMapper for Mix {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                let Some(other) = self.toward.next() else { return param };
                let alpha = self.alpha;
                param.map(|t| {
                    let other = Tensor::<D>::from_dispatch(other).cast(FloatDType::from(t.dtype())).to_device(&t.device());
                    t.mul_scalar(1.0 - alpha) + other.mul_scalar(alpha)
                })
            }
        }
        Ok(self.map(&mut Mix { alpha, toward: theirs.weights.into_iter() }))
    }

    /// The most positions (prompt and completion tokens of a row) the model can run on, where it
    /// has a limit: the learned position table of GPT-2 and GPT-Neo. Rotary families compute their
    /// positions and have none; beyond `max_position_embeddings` they run, as in transformers.
    pub fn position_limit(&self) -> Option<usize> {
        match self {
            Self::Gpt2(m) => Some(m.n_positions()),
            Self::GptNeo(m) => Some(m.n_positions()),
            Self::Llama(_) | Self::Gptj(_) | Self::GptNeox(_) | Self::Phi(_) | Self::StableLm(_) | Self::Gemma(_) => None,
        }
    }

    /// An error naming `what` when rows of `tokens` positions exceed [`Self::position_limit`].
    pub fn check_positions(&self, tokens: usize, what: impl FnOnce() -> String) -> Result<()> {
        match self.position_limit() {
            Some(limit) if tokens > limit => Err(ModelError::TooLong { what: what(), tokens, limit }),
            _ => Ok(()),
        }
    }

    /// An error naming `what` when one of `ids` is past the model's vocabulary: the embedding has
    /// no row for it (a tokenizer or data made for another model), and the forward pass would index
    /// past the table.
    pub fn check_tokens<'a>(&self, ids: impl IntoIterator<Item = &'a u32>, what: impl FnOnce() -> String) -> Result<()> {
        let vocab = self.vocab_size();
        match ids.into_iter().find(|&&id| id as usize >= vocab) {
            Some(&id) => Err(ModelError::TokenPastVocab { what: what(), id, vocab }),
            None => Ok(()),
        }
    }

    /// Entries of the vocabulary: the width of the logits [`Self::head`] returns.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Gpt2(m) => m.vocab_size(),
            Self::Llama(m) => m.vocab_size(),
            Self::GptNeo(m) => m.vocab_size(),
            Self::Gptj(m) => m.vocab_size(),
            Self::GptNeox(m) => m.vocab_size(),
            Self::Phi(m) => m.vocab_size(),
            Self::StableLm(m) => m.vocab_size(),
            Self::Gemma(m) => m.vocab_size(),
        }
    }

    /// The length past which the model rotates a sequence with other frequencies (Phi-3's
    /// LongRoPE): keys cached before a sequence passes it are not the keys of the longer sequence,
    /// so a generation that passes it fills its cache again, as transformers' Phi-3 does.
    pub fn rope_switch(&self) -> Option<usize> {
        match self {
            Self::Llama(m) => m.rope_switch(),
            _ => None,
        }
    }

    /// An empty KV cache sized for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(match self {
            Self::Gpt2(m) => m.n_layers(),
            Self::Llama(m) => m.n_layers(),
            Self::GptNeo(m) => m.n_layers(),
            Self::Gptj(m) => m.n_layers(),
            Self::GptNeox(m) => m.n_layers(),
            Self::Phi(m) => m.n_layers(),
            Self::StableLm(m) => m.n_layers(),
            Self::Gemma(m) => m.n_layers(),
        })
    }

    /// A mixture of experts' sparse layers under transformers 5's module names (none elsewhere).
    pub(crate) fn sparse_layers_mut(&mut self) -> Vec<(String, &mut crate::moe::SparseMoe)> {
        match self {
            Self::Llama(m) => m.sparse_layers_mut(),
            _ => Vec::new(),
        }
    }

    /// Every parameter under its HF name (the family's one table; see [`crate::names`]).
    pub(crate) fn named_mut(&mut self) -> crate::names::Table<'_> {
        match self {
            Self::Gpt2(m) => m.named_mut(),
            Self::Llama(m) => m.named_mut(),
            Self::GptNeo(m) => m.named_mut(),
            Self::Gptj(m) => m.named_mut(),
            Self::GptNeox(m) => m.named_mut(),
            Self::Phi(m) => m.named_mut(),
            Self::StableLm(m) => m.named_mut(),
            Self::Gemma(m) => m.named_mut(),
        }
    }

    /// Saves `model.safetensors` (float32, HF names and layout) and `config.json` into `dir`,
    /// each written atomically, so that transformers' `from_pretrained(dir)` loads it. LoRA adapters
    /// are merged into the weights they adapt.
    pub fn save_hf(&self, config: &ModelConfig, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        self.hf_tensors().write(&dir.join("model.safetensors"))?;
        let json = serde_json::to_string_pretty(&config.to_hf_json()).map_err(|e| ModelError::config(dir, e.to_string()))?;
        write_atomic(&dir.join("config.json"), json.as_bytes())
    }
}

impl CausalLm {
    /// Every weight under its HF name and in HF's layout, adapters merged in: what
    /// [`CausalLm::save_hf`] and [`crate::gguf::save_gguf`] write.
    pub(crate) fn hf_tensors(&self) -> crate::weights::HfTensors {
        let mut model = if self.has_adapters() { self.clone().merge_adapters() } else { self.clone() };
        crate::names::to_hf(model.named_mut())
    }
}

/// The first token id of a config's `eos_token_id` (a number or a list).
fn first_id(v: Option<&Value>) -> Option<u32> {
    v.and_then(|v| v.as_u64().or_else(|| v.get(0).and_then(Value::as_u64))).map(|v| v as u32)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A test fixture's `config.json` with the sizes of a real model of its family.
    fn sized(fixture: &str, sizes: Value) -> ModelConfig {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(fixture).join("config.json");
        let mut json: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for (k, v) in sizes.as_object().unwrap() {
            json[k] = v.clone();
        }
        ModelConfig::from_hf_json(&json, &path).unwrap()
    }

    /// Token ids up to the last row of the embedding pass; one past it is an error naming where it
    /// is, the id and the vocabulary.
    #[test]
    fn token_ids_past_the_vocabulary_are_named() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stablelm_parallel/config.json");
        let model = CausalLm::random_from_file(&path, 0, &Device::default(), false).unwrap().1;
        assert_eq!(model.vocab_size(), 104);
        model.check_tokens(&[0, 5, 103], || unreachable!()).unwrap();
        let err = model.check_tokens(&[5, 104, 200], || "pair 3".into()).unwrap_err().to_string();
        assert_eq!(err, "pair 3 holds token id 104, past the model's vocabulary of 104 (ids 0 to 103): the tokenizer, or the data's tokens, are not the model's");
    }

    /// TR-DPO's soft update: α = 1 copies the other model's weights; another architecture is an error.
    #[test]
    fn a_soft_update_mixes_models_of_one_architecture_only() {
        let dev = Device::default();
        let config = |f: &str| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(f).join("config.json");
        let model = |f: &str, seed| CausalLm::random_from_file(&config(f), seed, &dev, false).unwrap().1;
        let floats = |m: &CausalLm| -> Vec<f32> {
            struct V(Vec<f32>);
            impl burn::module::ModuleVisitor for V {
                fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
                    self.0.extend(p.val().into_data().convert::<f32>().try_into_vec::<f32>().unwrap());
                }
            }
            let mut v = V(Vec::new());
            m.visit(&mut v);
            v.0
        };
        let (a, b) = (model("gpt2", 1), model("gpt2", 2));
        assert_eq!(floats(&a.clone().soft_update(&b, 1.0).unwrap()), floats(&b));
        let half = floats(&a.clone().soft_update(&b, 0.5).unwrap());
        for ((m, x), y) in half.iter().zip(floats(&a)).zip(floats(&b)) {
            assert!((m - (x + y) / 2.0).abs() <= 1e-6 * m.abs().max(1e-3));
        }
        let e = a.soft_update(&model("llama3_rope", 2), 0.5).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("a soft update needs the same"), "{e}");
    }

    /// Counted by hand from each family's layers: (kept either way, the extra without
    /// checkpointing, the extra with it) a layer.
    #[test]
    fn what_the_layers_keep_for_the_backward_pass_by_family() {
        let per_layer = |c: &ModelConfig, layers: u64| (c.backward_kept_per_token(false, false) / layers, c.backward_kept_per_token(true, false) / layers);
        // GPT-2 124M: q, k, v and the attention's output (4 · 768), the GELU's input (3072); the two
        // norms' inputs and outputs and the GELU's output; checkpointed, c_proj's and mlp.c_proj's outputs.
        let gpt2 = sized("gpt2", serde_json::json!({"n_layer": 12, "n_embd": 768, "n_head": 12}));
        assert_eq!(per_layer(&gpt2, 12), (4 * 768 + 3072 + 4 * 768 + 3072, 4 * 768 + 3072 + 2 * 768));
        let neo = sized("gpt_neo_local", serde_json::json!({"num_layers": 12, "hidden_size": 768, "num_heads": 12, "attention_types": [[["global", "local"], 6]]}));
        assert_eq!(per_layer(&neo, 12), per_layer(&gpt2, 12));
        // Pythia-160m: its parallel block's two norms read one input, counted once.
        let pythia = sized("gpt_neox_parallel", serde_json::json!({"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072}));
        assert_eq!(per_layer(&pythia, 12), (4 * 768 + 3072 + 3 * 768 + 3072, 4 * 768 + 3072 + 2 * 768));
        // GPT-J-6B: one norm, whose output q, k, v and fc_in all read.
        let gptj = sized("gptj", serde_json::json!({"n_layer": 28, "n_embd": 4096, "n_head": 16, "rotary_dim": 64}));
        assert_eq!(per_layer(&gptj, 28), (4 * 4096 + 16384 + 2 * 4096 + 16384, 4 * 4096 + 16384 + 2 * 4096));
        // StableLM 2 1.6B: q, k, v and the output 2,048 each, gate and up 5,632 each; without
        // checkpointing its two norms' inputs and outputs and down's input; a parallel block's one norm.
        let stablelm = sized("stablelm2", serde_json::json!({"num_hidden_layers": 24, "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 5632}));
        assert_eq!(per_layer(&stablelm, 24), (4 * 2048 + 2 * 5632 + 4 * 2048 + 5632, 4 * 2048 + 2 * 5632 + 2 * 2048));
        let parallel = sized("stablelm_parallel", serde_json::json!({"num_hidden_layers": 24, "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 5632}));
        assert_eq!(per_layer(&parallel, 24), (4 * 2048 + 2 * 5632 + 2 * 2048 + 5632, 4 * 2048 + 2 * 5632 + 2 * 2048));
        // Phi-2: GPT-J's block, q, k and v 2,560 each, fc1 10,240.
        let phi = sized("phi2", serde_json::json!({"num_hidden_layers": 32, "hidden_size": 2560, "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 10240}));
        assert_eq!(per_layer(&phi, 32), (4 * 2560 + 10240 + 2 * 2560 + 10240, 4 * 2560 + 10240 + 2 * 2560));
        // Llama-3.2-1B: q and the attention's output 32 × 64 each, k and v 8 × 64 each, gate and up
        // 8,192 each; without checkpointing the four norms' values 4 · 2048 and down's input 8,192.
        let llama = sized("llama_gqa_untied", serde_json::json!({"num_hidden_layers": 16, "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64}));
        assert_eq!(per_layer(&llama, 16), (2 * 2048 + 2 * 512 + 2 * 8192 + 4 * 2048 + 8192, 2 * 2048 + 2 * 512 + 2 * 8192 + 2 * 2048));
        // Mixtral 8x7B: its two experts a token, gate and up 14,336 each, as one MLP twice as wide;
        // q and the output 32 × 128, k and v 8 × 128.
        let mixtral = sized("mixtral_moe", serde_json::json!({"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8}));
        assert_eq!(per_layer(&mixtral, 32), (2 * 4096 + 2 * 1024 + 2 * 28672 + 4 * 4096 + 28672, 2 * 4096 + 2 * 1024 + 2 * 28672 + 2 * 4096));
        // Gemma-3-270M: 4 heads × 256 for q and the output, 1 × 256 for k and v.
        let gemma = sized("gemma3_text", serde_json::json!({"num_hidden_layers": 18, "hidden_size": 640, "intermediate_size": 2048, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256}));
        assert_eq!(per_layer(&gemma, 18), (2 * 1024 + 2 * 256 + 2 * 2048 + 4 * 640 + 2048, 2 * 1024 + 2 * 256 + 2 * 2048 + 2 * 640));
        assert_eq!(gemma.backward_kept_per_token(false, false), 18 * 11_264);
        // Under LoRA, the layers after the first: q, k and v, gate and up, and the two norms' inputs
        // (checkpointed: the residual stream's two projections' outputs).
        assert_eq!(llama.backward_kept_per_token(false, true), 15 * (2048 + 2 * 512 + 2 * 8192 + 2 * 2048));
        assert_eq!(llama.backward_kept_per_token(true, true), 15 * (2048 + 2 * 512 + 2 * 8192 + 2 * 2048));
        // GPT-J's one norm; a GELU's one input.
        assert_eq!(gptj.backward_kept_per_token(false, true), 27 * (3 * 4096 + 16384 + 4096));
        assert_eq!(gptj.backward_kept_per_token(true, true), 27 * (3 * 4096 + 16384 + 2 * 4096));
    }
}
