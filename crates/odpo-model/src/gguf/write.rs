//! Writing a model of the Llama, Gemma, Phi or StableLM family with its byte-level or SentencePiece BPE tokenizer
//! as a llama.cpp GGUF file (version 3), the way llama.cpp's `convert_hf_to_gguf.py` writes one:
//! tensors under llama.cpp's names (Q/K rows permuted for `llama`, Gemma's norms as `1 + w`),
//! vectors in F32 and matrices in F32, F16 or Q8_0, the model's hyper-parameters and the tokenizer
//! (`tokenizer.ggml.*`: the merges and the
//! text split named by `tokenizer.ggml.pre`, or SentencePiece's scores; the chat template) as
//! metadata. A trained model then runs in llama.cpp (`tests/fixtures/gguf/check_llamacpp.py`).
//!
//! Format: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>.

use std::path::Path;

use serde_json::Value;

use super::vocab::{BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED};
use super::{GgufError, llama, meta_err};
use crate::model::{CausalLm, ModelConfig};
use crate::moe::MoeLayout;
use crate::quantized::{BLOCK, QuantBlocks};
use crate::tokenizer::Tokenizer;
use crate::weights::HfEntry;

/// How the matrices are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufDtype {
    /// 32-bit floats: exactly the weights.
    F32,
    /// 16-bit floats (vectors stay F32, as llama.cpp's converter keeps them).
    F16,
    /// ggml's Q8_0: blocks of 32 values along a row, each an f16 scale `d = max|x| / 127` and 32
    /// signed bytes `round(x / d)` (8.5 bits a weight, what `convert_hf_to_gguf.py --outtype q8_0`
    /// writes). Rows that do not split into blocks of 32 are written in F16, as the converter does.
    Q8_0,
}

impl GgufDtype {
    /// The ggml type of a tensor of `shape` (`[rows, row length]` for a matrix).
    fn of(self, shape: &[usize]) -> TensorType {
        match (self, shape) {
            (_, [_]) | (GgufDtype::F32, _) => TensorType::F32,
            // A matrix, or a mixture of experts' stack of them.
            (GgufDtype::Q8_0, [_, .., cols]) if cols % BLOCK == 0 => TensorType::Q8_0,
            _ => TensorType::F16,
        }
    }

    /// `general.file_type`: llama.cpp's `LLAMA_FTYPE_ALL_F32`, `MOSTLY_F16`, `MOSTLY_Q8_0`.
    fn file_type(self) -> u32 {
        match self {
            GgufDtype::F32 => 0,
            GgufDtype::F16 => 1,
            GgufDtype::Q8_0 => 7,
        }
    }
}

/// The ggml types written, with their ids in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TensorType {
    F32 = 0,
    F16 = 1,
    Q8_0 = 8,
}

impl TensorType {
    /// Bytes of `n` values (`n` a multiple of the block for Q8_0).
    fn bytes(self, n: usize) -> usize {
        match self {
            TensorType::F32 => 4 * n,
            TensorType::F16 => 2 * n,
            TensorType::Q8_0 => n / BLOCK * (2 + BLOCK),
        }
    }
}

/// GGUF's metadata value types used here.
enum Kv {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
    Bools(Vec<bool>),
}

const ALIGNMENT: usize = 32;

/// A tensor as written: its name (HF's, or llama.cpp's for a stack or a tensor made here), its
/// shape, and the entries whose values it holds in turn (one, but a mixture of experts' stack).
type Written<'a> = (String, Vec<usize>, Vec<&'a HfEntry>);

/// Writes `model` (adapters merged in) with `tokenizer` to `path` as a GGUF file, atomically.
/// Llama, Mistral without a sliding window, Qwen2, Qwen3, OLMo 2 / 3, SmolLM3, Granite, Phi-3, Gemma 1 / 2 / 3 (as llama.cpp runs
/// them: see `GemmaConfig::llama_cpp_form`), Phi-1 / 1.5 / 2 (`phi2`) and StableLM with a byte-level BPE tokenizer whose text split GGUF
/// can name or a SentencePiece BPE one; anything else is an error that says what cannot be written.
pub fn save_gguf(model: &CausalLm, config: &ModelConfig, tokenizer: &Tokenizer, path: &Path, dtype: GgufDtype) -> Result<(), GgufError> {
    let cfg = config.to_hf_json();
    let err = |key: &str, msg: String| meta_err(path, key, msg);
    let hf_arch = cfg["architectures"][0].as_str().unwrap_or_default();
    let arch = match hf_arch {
        "LlamaForCausalLM" | "MistralForCausalLM" => "llama",
        "Qwen2ForCausalLM" => "qwen2",
        "Qwen3ForCausalLM" => "qwen3",
        // llama.cpp's converter writes OLMo 3 as OLMo 2 with a window.
        "Olmo2ForCausalLM" | "Olmo3ForCausalLM" => "olmo2",
        "SmolLM3ForCausalLM" => "smollm3",
        "GraniteForCausalLM" => "granite",
        "Phi3ForCausalLM" => "phi3",
        "GemmaForCausalLM" => "gemma",
        "Gemma2ForCausalLM" => "gemma2",
        "Gemma3ForCausalLM" => "gemma3",
        "PhiForCausalLM" => "phi2",
        "StableLmForCausalLM" => "stablelm",
        // llama.cpp's converter writes a Mixtral as a `llama` file with experts.
        "MixtralForCausalLM" => "llama",
        "Qwen2MoeForCausalLM" => "qwen2moe",
        "Qwen3MoeForCausalLM" => "qwen3moe",
        other => return Err(err("general.architecture", format!("`{other}` is not written to GGUF (the Llama family: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Olmo2ForCausalLM, Olmo3ForCausalLM, SmolLM3ForCausalLM, GraniteForCausalLM, Phi3ForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM; the Gemma family: GemmaForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM; PhiForCausalLM; StableLmForCausalLM)"))),
    };
    let stablelm = match config {
        ModelConfig::StableLm(c) => Some(c),
        _ => None,
    };
    // The families with LayerNorms (their epsilon under its own key), their rotated dims and base
    // as the model reads them, and whether a tied head must be written out.
    let layer_norm = match config {
        ModelConfig::Phi(c) => Some((c.layer_norm_eps, c.rotary_dims(), c.theta(), c.tie_word_embeddings)),
        ModelConfig::StableLm(c) => Some((c.layer_norm_eps, c.rotary_dims(), c.theta(), c.tie_word_embeddings)),
        _ => None,
    };
    // What llama.cpp's `phi2` fixes must be what a Phi does: GELU's tanh form, no norm over queries
    // and keys.
    let phi = match config {
        ModelConfig::Phi(c) => Some(c),
        _ => None,
    };
    if let Some(c) = phi {
        if c.qk_layernorm {
            return Err(err("qk_layernorm", "true: llama.cpp's `phi2` has no norm over queries and keys".into()));
        }
        if c.hidden_act == "gelu" {
            return Err(err("hidden_act", "`gelu` (exact): llama.cpp's `phi2` computes GELU's tanh approximation".into()));
        }
    }
    // What llama.cpp fixes by architecture for Gemma must be what the model does.
    let gemma = match config {
        ModelConfig::Gemma(c) => Some(c.llama_cpp_form(path).map_err(|(key, msg)| err(key, msg))?),
        _ => None,
    };
    let window = cfg.get("sliding_window").filter(|w| !w.is_null());
    let sliding = matches!(hf_arch, "MistralForCausalLM" | "MixtralForCausalLM") || cfg["use_sliding_window"].as_bool().unwrap_or(false);
    if let (true, Some(w)) = (sliding, window) {
        return Err(err("sliding_window", format!("{w}: a GGUF file has no sliding window for `{arch}`; the model would attend differently in llama.cpp")));
    }
    // OLMo 3: llama.cpp rotates its sliding layers at the full layers' base without scaling, and
    // scales the full ones as the file says; the full layers' embedding is written.
    let olmo3 = match config {
        ModelConfig::Llama(c) => c.layer_type_ropes().map(|[full, sliding]| (c, full, sliding)),
        _ => None,
    };
    let rope_cfg = match &olmo3 {
        Some((c, full, sliding)) => {
            if sliding.rope_kind() != "default" || sliding.theta() != full.theta() {
                return Err(err("rope_parameters", format!("the sliding layers' rotary embedding ({}) differs from the full layers' base without scaling ({}): llama.cpp's `olmo2` rotates them so", serde_json::to_string(&sliding.rope_parameters).unwrap_or_default(), full.theta())));
            }
            if c.sliding_window.is_none() {
                return Err(err("sliding_window", "null: an OLMo 3 without a window is written by llama.cpp's converter as OLMo 2, whose full layers' scaling would reach every layer".into()));
            }
            serde_json::to_value(full).unwrap_or_default()
        }
        None => cfg.clone(),
    };
    // RoPE scaling: `rope_scaling`, or transformers 5's `rope_parameters`.
    let scaling = [&rope_cfg["rope_scaling"], &rope_cfg["rope_parameters"]].into_iter().find(|s| {
        let kind = s["rope_type"].as_str().or(s["type"].as_str());
        kind.is_some_and(|k| k != "default")
    });
    // Phi-3's rotation: the rotated dims, LongRoPE's factors and attention factor as the model
    // computes them (llama.cpp keeps the factors as tensors).
    let phi3 = match config {
        ModelConfig::Llama(c) if c.phi3() => Some((c.rotary_dims(), c.rotary(path).map_err(|e| err("rope_parameters", e.to_string()))?)),
        _ => None,
    };
    let kind = |s: &Value| s["rope_type"].as_str().or(s["type"].as_str()).unwrap_or_default().to_string();
    let mut yarn = None;
    let (theta, linear_factor) = match (&gemma, scaling) {
        (Some(g), _) => (g.rope_theta, g.linear_factor),
        (None, None) => (rope_theta(&rope_cfg), None),
        (None, Some(_)) if phi3.is_some() => (rope_theta(&rope_cfg), None),
        (None, Some(s)) if kind(s) == "linear" => (rope_theta(&rope_cfg), Some(s["factor"].as_f64().unwrap_or(1.0))),
        (None, Some(s)) if kind(s) == "yarn" => {
            // As the converter writes YaRN (type, factor, original length), which llama.cpp runs
            // as transformers does; the options it would run otherwise are refused: its own
            // attention scale (but the one YaRN derives, which OLMo 3's checkpoints write out), and
            // betas, which llama.cpp reads for none of these architectures.
            let derived = s["factor"].as_f64().map(|f| if f <= 1.0 { 1.0 } else { 0.1 * f.ln() + 1.0 });
            let is_derived = |k: &str| k == "attention_factor" && s[k].as_f64().zip(derived).is_some_and(|(a, d)| (a - d).abs() <= 1e-9 * d);
            let own = |k: &str| !(s[k].is_null() || is_derived(k));
            if let Some(k) = ["attention_factor", "mscale", "mscale_all_dim"].into_iter().find(|k| own(k)) {
                return Err(err("rope_parameters", format!("{s}: YaRN with `{k}` is not written to GGUF (llama.cpp would scale the attention otherwise)")));
            }
            for (k, default) in [("beta_fast", 32.0), ("beta_slow", 1.0)] {
                if s[k].as_f64().is_some_and(|b| b != default && b != 0.0) {
                    return Err(err("rope_parameters", format!("{s}: YaRN with `{k}` other than {default} is not written to GGUF (llama.cpp's `{arch}` takes {default} whatever the file says)")));
                }
            }
            if s["truncate"] == false {
                return Err(err("rope_parameters", format!("{s}: YaRN with `truncate: false` is not written to GGUF (llama.cpp rounds the ramp's ends)")));
            }
            let Some(factor) = s["factor"].as_f64() else { return Err(err("rope_parameters", format!("{s}: YaRN without a number `factor` is not written to GGUF"))) };
            let original = s["original_max_position_embeddings"].as_u64().or(cfg["original_max_position_embeddings"].as_u64()).or(cfg["max_position_embeddings"].as_u64()).unwrap_or(0);
            yarn = Some((factor, original));
            (rope_theta(&rope_cfg), None)
        }
        (None, Some(s)) => return Err(err("rope_scaling", format!("{s}: only linear and YaRN RoPE scaling are written to GGUF"))),
    };
    // Phi's and StableLM's base as the model reads it (its RoPE settings before the top-level key).
    let theta = layer_norm.map_or(theta, |(_, _, theta, _)| theta);
    let uint = |key: &str| cfg[key].as_u64().ok_or_else(|| err(key, "missing from the model's config".into()));
    let (hidden, heads, layers) = (uint("hidden_size")?, uint("num_attention_heads")?, uint("num_hidden_layers")?);
    let kv_heads = cfg["num_key_value_heads"].as_u64().unwrap_or(heads);
    let head_dim = cfg["head_dim"].as_u64().unwrap_or(hidden / heads);
    // What llama.cpp fixes by architecture for the Llama family's later members must be what the
    // model does: OLMo 2's query norm as wide as the model, SmolLM3's rotation skipped in every
    // fourth layer, Granite's head size hidden / heads (its converter drops `head_dim`).
    if let ModelConfig::Llama(c) = config {
        match arch {
            "olmo2" if heads * head_dim != hidden => {
                return Err(err("head_dim", format!("{head_dim}: llama.cpp's `olmo2` norms queries over hidden_size ({hidden}), not heads × head_dim ({})", heads * head_dim)));
            }
            "smollm3" => {
                let ropes = c.layer_ropes(path).map_err(|e| err("no_rope_layers", e.to_string()))?;
                if ropes.iter().enumerate().any(|(i, &rope)| rope != ((i + 1) % 4 != 0)) {
                    return Err(err("no_rope_layers", format!("{ropes:?} (true: rotated): llama.cpp's `smollm3` skips the rotation in every fourth layer and only there")));
                }
            }
            "qwen2moe" if heads * head_dim != hidden => {
                return Err(err("head_dim", format!("{head_dim}: llama.cpp's `qwen2moe` takes the queries to be hidden_size ({hidden}) wide, not heads × head_dim ({})", heads * head_dim)));
            }
            "granite" if heads * head_dim != hidden => {
                return Err(err("head_dim", format!("{head_dim}: llama.cpp's `granite` takes the head size to be hidden_size / num_attention_heads ({})", hidden / heads)));
            }
            _ => {}
        }
    }
    // A mixture of experts as llama.cpp runs one: experts in every layer, the chosen experts'
    // weights renormalised in `llama` (Mixtral) and `qwen3moe` and not in `qwen2moe`.
    let moe = match config {
        ModelConfig::Llama(c) => MoeLayout::of(c, path).map_err(|e| err("num_experts", e.to_string()))?,
        _ => None,
    };
    if let Some(m) = &moe {
        if let Some(i) = m.sparse.iter().position(|s| !s) {
            return Err(err("mlp_only_layers", format!("layer {i} has a dense MLP (`mlp_only_layers`, `decoder_sparse_step`): llama.cpp's `{arch}` has experts in every layer")));
        }
        let renormalises = arch != "qwen2moe";
        if m.normalize != renormalises {
            let does = if renormalises { "renormalises" } else { "does not renormalise" };
            return Err(err("norm_topk_prob", format!("{}: llama.cpp's `{arch}` {does} the chosen experts' weights", m.normalize)));
        }
    }

    let key = |k: &str| format!("{arch}.{k}");
    let u32_of = |v: u64| Kv::U32(u32::try_from(v).unwrap_or(u32::MAX));
    let mut kvs: Vec<(String, Kv)> = vec![
        ("general.architecture".into(), Kv::Str(arch.into())),
        ("general.name".into(), Kv::Str(cfg["_name_or_path"].as_str().unwrap_or("odpo").into())),
        ("general.file_type".into(), Kv::U32(dtype.file_type())),
        (key("context_length"), u32_of(uint("max_position_embeddings")?)),
        (key("embedding_length"), u32_of(hidden)),
        (key("block_count"), u32_of(layers)),
        (key("feed_forward_length"), u32_of(uint("intermediate_size")?)),
        (key("attention.head_count"), u32_of(heads)),
        (key("attention.head_count_kv"), u32_of(kv_heads)),
        (key("attention.key_length"), u32_of(head_dim)),
        (key("attention.value_length"), u32_of(head_dim)),
        match layer_norm {
            Some((eps, ..)) => (key("attention.layer_norm_epsilon"), Kv::F32(eps as f32)),
            None => (key("attention.layer_norm_rms_epsilon"), Kv::F32(cfg["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32)),
        },
        (key("rope.freq_base"), Kv::F32(theta as f32)),
    ];
    if let Some((_, rotated, ..)) = layer_norm {
        kvs.push((key("rope.dimension_count"), u32_of(rotated as u64)));
    }
    if let Some(c) = stablelm {
        kvs.push((key("use_parallel_residual"), Kv::Bool(c.use_parallel_residual)));
    }
    if let Some(g) = &gemma {
        if let Some(w) = g.window {
            kvs.push((key("attention.sliding_window"), u32_of(w as u64)));
        }
        // Gemma 2's caps; 0 where the model has none (llama.cpp's converter writes them as given).
        if arch == "gemma2" {
            kvs.push((key("attn_logit_softcapping"), Kv::F32(g.caps.0.unwrap_or(0.0) as f32)));
            kvs.push((key("final_logit_softcapping"), Kv::F32(g.caps.1.unwrap_or(0.0) as f32)));
        }
    }
    if arch == "granite" {
        // As the converter writes them (`add_logit_scale` and the rest), transformers' defaults
        // included: every one of them, so that llama.cpp's own defaults (none, 1/√head_dim) never apply.
        for (k, hf) in [("logit_scale", "logits_scaling"), ("residual_scale", "residual_multiplier"), ("embedding_scale", "embedding_multiplier"), ("attention.scale", "attention_multiplier")] {
            kvs.push((key(k), Kv::F32(cfg[hf].as_f64().unwrap_or(1.0) as f32)));
        }
    }
    if let Some(m) = &moe {
        kvs.push((key("expert_count"), u32_of(m.experts as u64)));
        kvs.push((key("expert_used_count"), u32_of(m.top_k as u64)));
        if arch != "llama" {
            kvs.push((key("expert_feed_forward_length"), u32_of(m.width as u64)));
        }
        if let Some(w) = m.shared {
            kvs.push((key("expert_shared_feed_forward_length"), u32_of(w as u64)));
        }
    }
    if let Some((c, ..)) = &olmo3 {
        // The window and which layers slide, as the converter writes OLMo 3's.
        let sliding = c.sliding_types(path).map_err(|e| err("layer_types", e.to_string()))?;
        kvs.push((key("attention.sliding_window"), u32_of(c.sliding_window.unwrap_or(0) as u64)));
        kvs.push((key("attention.sliding_window_pattern"), Kv::Bools(sliding)));
    }
    let mut extra: Vec<HfEntry> = Vec::new();
    if let (Some((rotated, rotary)), ModelConfig::Llama(c)) = (&phi3, config) {
        kvs.push((key("rope.dimension_count"), u32_of(*rotated as u64)));
        kvs.push((key("rope.scaling.original_context_length"), u32_of(c.original_max_position_embeddings.unwrap_or(4096) as u64)));
        // 0 for none, as the converter writes it (llama.cpp reads a window but does not apply it yet).
        kvs.push((key("attention.sliding_window"), u32_of(c.sliding_window.unwrap_or(0) as u64)));
        if !rotary.long_inv_freq.is_empty() {
            kvs.push((key("rope.scaling.attn_factor"), Kv::F32(rotary.scale as f32)));
            for ((name, _), factors) in llama::ROPE_FACTORS.iter().zip(&rotary.factors) {
                extra.push(((*name).into(), vec![factors.len()], factors.iter().map(|&f| f as f32).collect()));
            }
        }
    }
    if let Some(factor) = linear_factor {
        kvs.push((key("rope.scaling.type"), Kv::Str("linear".into())));
        kvs.push((key("rope.scaling.factor"), Kv::F32(factor as f32)));
    }
    if let Some((factor, original)) = yarn {
        kvs.push((key("rope.scaling.type"), Kv::Str("yarn".into())));
        kvs.push((key("rope.scaling.factor"), Kv::F32(factor as f32)));
        kvs.push((key("rope.scaling.original_context_length"), u32_of(original)));
    }
    kvs.extend(tokenizer_kvs(tokenizer, path, uint("vocab_size")? as usize)?);

    // Tensors: llama.cpp's names, ggml's dimension order (fastest first), each aligned. The infos
    // come first (offsets from the sizes), then the data straight into the file's bytes.
    let hf = model.hf_tensors();
    let written = hf.read_back(path).map_err(|e| err("tensors", e.to_string()))?;
    // StableLM's head norms, one `[heads, head_dim]` tensor a layer as the converter stacks them,
    // in place of the one-head entries (left out below).
    if stablelm.is_some() {
        extra.extend(stacked_head_norms(written));
    }
    // llama.cpp's `phi2`, `stablelm` and `qwen2moe` need an `output`: a tied head is written as the
    // embedding's copy.
    let tied = layer_norm.map_or(arch == "qwen2moe" && cfg["tie_word_embeddings"].as_bool().unwrap_or(false), |(.., tied)| tied);
    if tied
        && let Some((_, shape, values)) = written.iter().find(|(n, ..)| n == "model.embed_tokens.weight")
    {
        extra.push(("output.weight".into(), shape.clone(), values.clone()));
    }
    // The model's tensors, then Phi-3's LongRoPE factors or a tied head under llama.cpp's names:
    // each one piece, but a mixture of experts' stacks, whose pieces are its experts' matrices.
    fn piece(e: &HfEntry) -> Written<'_> {
        (e.0.clone(), e.1.clone(), vec![e])
    }
    let mut tensors: Vec<Written<'_>> =
        written.iter().filter(|(n, ..)| !(n.contains("_layernorm.norms.") || moe.is_some() && moe_part(n).is_some())).chain(&extra).map(piece).collect();
    if let Some(m) = &moe {
        tensors.extend(expert_stacks(written, m.experts, layers as usize).map_err(|msg| err("tensors", msg))?);
    }
    // Qwen2-MoE's shared-expert gate as one vector, as llama.cpp's quantiser leaves it: llama.cpp
    // reads it so or as `[1, hidden]`, transformers' GGUF reader only so.
    for (name, shape, _) in &mut tensors {
        if name.ends_with(".mlp.shared_expert_gate.weight") {
            *shape = vec![shape.iter().product()];
        }
    }
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for (name, shape, pieces) in &tensors {
        let gguf = match gemma {
            Some(_) => super::gemma::gguf_name(arch, name),
            None if extra.iter().any(|(n, ..)| n == name) || pieces.len() > 1 || name.starts_with("blk.") => Some(name.clone()),
            None if phi.is_some() => super::phi::gguf_name(name),
            None if stablelm.is_some() => super::stablelm::gguf_name(name),
            None => llama::gguf_name(arch, name),
        };
        let gguf = gguf.ok_or_else(|| err("tensors", format!("`{name}` has no llama.cpp name")))?;
        // Norms stay F32, stacked or not, and so do the experts' routers and the shared expert's
        // gate, as the converter keeps them.
        let ty = if ["_norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight"].iter().any(|e| gguf.ends_with(e)) { TensorType::F32 } else { dtype.of(shape) };
        offset = offset.next_multiple_of(ALIGNMENT);
        infos.push((gguf, shape, ty, offset));
        offset += ty.bytes(pieces.iter().map(|(_, _, v)| v.len()).sum());
    }

    let mut out = Vec::with_capacity(offset + (1 << 20));
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend((infos.len() as u64).to_le_bytes());
    out.extend((kvs.len() as u64).to_le_bytes());
    for (k, v) in &kvs {
        put_str(&mut out, k);
        put_kv(&mut out, v);
    }
    for (name, shape, ty, offset) in &infos {
        put_str(&mut out, name);
        out.extend((shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            out.extend((*d as u64).to_le_bytes());
        }
        out.extend((*ty as u32).to_le_bytes());
        out.extend((*offset as u64).to_le_bytes());
    }
    out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
    let data_start = out.len();
    for ((_, _, pieces), (_, _, ty, offset)) in tensors.iter().zip(&infos) {
        out.resize(data_start + offset, 0);
        // A stack's experts one after the other: its rows in turn, whole blocks each.
        for &(name, shape, values) in pieces {
            let mut values = std::borrow::Cow::Borrowed(values.as_slice());
            if llama::permuted(arch) {
                for (part, h) in [(".self_attn.q_proj.", heads), (".self_attn.k_proj.", kv_heads)] {
                    if name.contains(part) {
                        values = std::borrow::Cow::Owned(llama::permute_rows(&values, shape[0], h as usize));
                    }
                }
            }
            // llama.cpp scales by a Gemma norm's weight as stored; HF by `1 + w`.
            if gemma.is_some() && name.ends_with("norm.weight") {
                values = std::borrow::Cow::Owned(values.iter().map(|w| w + 1.0).collect());
            }
            match ty {
                TensorType::F32 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
                TensorType::F16 => out.extend(values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes())),
                TensorType::Q8_0 => {
                    let blocks = QuantBlocks::quantize_q8_0([shape[0], shape[1]], &values);
                    for (d, q) in blocks.d.iter().zip(blocks.q.chunks_exact(BLOCK)) {
                        out.extend(half::f16::from_f32(*d).to_le_bytes());
                        out.extend(q.iter().map(|&q| q as u8));
                    }
                }
            }
        }
    }
    crate::weights::write_atomic(path, &out).map_err(|e| err("file", e.to_string()))
}

/// StableLM's head norms among `entries` (`...q_layernorm.norms.H.weight`, one `[head_dim]` weight
/// a head, in the heads' order) stacked into one `[heads, head_dim]` tensor a layer under
/// llama.cpp's name (`blk.N.attn_q_norm.weight`); the other entries are not copied.
fn stacked_head_norms(entries: &[HfEntry]) -> Vec<HfEntry> {
    let mut out: Vec<HfEntry> = Vec::new();
    for (name, _, values) in entries {
        let Some((norm, _head)) = name.strip_suffix(".weight").and_then(|n| n.split_once("_layernorm.norms.")) else { continue };
        let hf = format!("{norm}_layernorm.weight");
        let gguf = super::stablelm::gguf_name(&hf).unwrap_or(hf);
        match out.iter_mut().find(|(n, ..)| *n == gguf) {
            Some((_, s, v)) => {
                s[0] += 1;
                v.extend_from_slice(values);
            }
            None => out.push((gguf, vec![1, values.len()], values.clone())),
        }
    }
    out
}

/// A mixture of experts' expert weight's layer, expert and llama.cpp stack (`ffn_gate_exps`, ...),
/// from its HF name (`model.layers.N.mlp.experts.E.gate_proj.weight`, Mixtral's
/// `block_sparse_moe.experts.E.w1.weight`), or its layer and `ffn_gate_inp` for a router.
fn moe_part(name: &str) -> Option<(usize, Option<usize>, &'static str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let rest = rest.strip_prefix("block_sparse_moe.").or_else(|| rest.strip_prefix("mlp."))?;
    if rest == "gate.weight" {
        return Some((layer, None, "ffn_gate_inp"));
    }
    let (expert, part) = rest.strip_prefix("experts.")?.split_once('.')?;
    let stack = match part {
        "w1.weight" | "gate_proj.weight" => "ffn_gate_exps",
        "w3.weight" | "up_proj.weight" => "ffn_up_exps",
        "w2.weight" | "down_proj.weight" => "ffn_down_exps",
        _ => return None,
    };
    Some((layer, Some(expert.parse().ok()?), stack))
}

/// A mixture of experts' routers under llama.cpp's names, and each layer's experts' matrices of a
/// projection as one `[experts, rows, cols]` stack (borrowed, in the experts' order), as the
/// converter writes them.
fn expert_stacks(entries: &[HfEntry], experts: usize, layers: usize) -> Result<Vec<Written<'_>>, String> {
    // Every expert weight and router by (layer, expert, stack), in one pass over the entries.
    let parts: std::collections::HashMap<_, &HfEntry> = entries.iter().filter_map(|e| Some((moe_part(&e.0)?, e))).collect();
    let mut out = Vec::new();
    for layer in 0..layers {
        let of = |want: Option<usize>, stack: &'static str| parts.get(&(layer, want, stack)).copied();
        if let Some(router) = of(None, "ffn_gate_inp") {
            out.push((format!("blk.{layer}.ffn_gate_inp.weight"), router.1.clone(), vec![router]));
        }
        for stack in ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"] {
            let pieces: Vec<&HfEntry> = (0..experts).filter_map(|e| of(Some(e), stack)).collect();
            if pieces.is_empty() {
                continue;
            }
            if pieces.len() != experts || pieces.iter().any(|p| p.1 != pieces[0].1) {
                return Err(format!("layer {layer}'s `{stack}`: {} of {experts} experts' matrices, of shapes {:?}; expected all, of one shape", pieces.len(), pieces.iter().map(|p| &p.1).collect::<Vec<_>>()));
            }
            let shape = [vec![experts], pieces[0].1.clone()].concat();
            out.push((format!("blk.{layer}.{stack}.weight"), shape, pieces));
        }
    }
    Ok(out)
}

/// The base of the rotary angles: `rope_theta`, or transformers 5's `rope_parameters.rope_theta`.
fn rope_theta(cfg: &Value) -> f64 {
    cfg["rope_theta"].as_f64().or(cfg["rope_parameters"]["rope_theta"].as_f64()).unwrap_or(10_000.0)
}

/// The tokenizer as llama.cpp's metadata: tokens in id order with their types, the special ids,
/// whether BOS / EOS are added, and the chat template, and by kind:
/// - byte-level BPE (`gpt2`): the merges and the text split (`tokenizer.ggml.pre`);
/// - SentencePiece BPE (`llama`: spaces as `▁`, byte fallback, as Llama 2's and Mistral's
///   tokenizers): a score per piece, from which llama.cpp merges (the best-scoring adjacent pair
///   first). A piece scores minus the rank of the first merge that makes it, so llama.cpp merges
///   in the merges' order; whether a `▁` goes in front of the text (`add_space_prefix`).
///
/// llama.cpp wants one token per embedding row (`rows`): rows the tokenizer has no token for get
/// unused `[PAD{id}]` tokens, as llama.cpp's converter writes them; more tokens than rows is an
/// error.
fn tokenizer_kvs(tokenizer: &Tokenizer, path: &Path, rows: usize) -> Result<Vec<(String, Kv)>, GgufError> {
    let err = |key: &str, msg: String| meta_err(path, key, msg);
    let json: Value = tokenizer
        .inner()
        .to_string(false)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .ok_or_else(|| err("tokenizer.ggml.model", "the tokenizer could not be serialised".into()))?;
    let model = &json["model"];
    let byte_level = model["type"] == "BPE" && json["decoder"].to_string().contains("ByteLevel");
    let sentencepiece = if model["type"] == "BPE" && model["byte_fallback"] == true { sentencepiece_prefix(&json) } else { None };
    if !byte_level && sentencepiece.is_none() {
        return Err(err("tokenizer.ggml.model", "only byte-level BPE and SentencePiece BPE (spaces as `▁`, byte fallback) tokenizers are written to GGUF".into()));
    }
    let vocab = model["vocab"].as_object().ok_or_else(|| err("tokenizer.ggml.tokens", "no vocabulary".into()))?;
    let n = tokenizer.vocab_size();
    if n > rows {
        return Err(err("tokenizer.ggml.tokens", format!("the tokenizer has {n} tokens, more than the model's {rows} embedding rows")));
    }
    let mut tokens = vec![String::new(); rows];
    let mut types = vec![NORMAL; rows];
    for id in n..rows {
        (tokens[id], types[id]) = (format!("[PAD{id}]"), UNUSED);
    }
    for (t, id) in vocab {
        if let Some(slot) = id.as_u64().and_then(|i| tokens.get_mut(i as usize)) {
            *slot = t.clone();
        }
    }
    for a in json["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(id), Some(t)) = (a["id"].as_u64(), a["content"].as_str())
            && let Some(slot) = tokens.get_mut(id as usize)
        {
            *slot = t.to_string();
            types[id as usize] = if a["special"].as_bool() == Some(true) { CONTROL } else { USER_DEFINED };
        }
    }
    if let Some(id) = tokens.iter().position(String::is_empty) {
        return Err(err("tokenizer.ggml.tokens", format!("token id {id} is neither in the vocabulary nor an added token")));
    }
    let merges: Vec<(String, String)> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Value::Array(p) => (p[0].as_str().unwrap_or_default().to_string(), p.get(1).and_then(Value::as_str).unwrap_or_default().to_string()),
            other => {
                let s = other.as_str().unwrap_or_default();
                let (a, b) = s.split_once(' ').unwrap_or((s, ""));
                (a.to_string(), b.to_string())
            }
        })
        .collect();
    let mut kvs = Vec::new();
    if let Some(prefix) = sentencepiece {
        let unk = model["unk_token"].as_str();
        let is_byte = |t: &str| t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') && u8::from_str_radix(&t[3..5], 16).is_ok();
        for (t, ty) in tokens.iter().zip(types.iter_mut()) {
            if *ty == NORMAL && Some(t.as_str()) == unk {
                *ty = UNKNOWN;
            } else if *ty == NORMAL && is_byte(t) {
                *ty = BYTE;
            }
        }
        // Pieces no merge makes (single characters, bytes, specials) score below every merged one.
        let mut scores: Vec<f32> = (0..rows).map(|id| -((merges.len() + id) as f32)).collect();
        let ids: std::collections::HashMap<&str, usize> = tokens.iter().enumerate().map(|(id, t)| (t.as_str(), id)).collect();
        for (rank, (a, b)) in merges.iter().enumerate().rev() {
            if let Some(&id) = ids.get(format!("{a}{b}").as_str()) {
                scores[id] = -(rank as f32);
            }
        }
        kvs.extend([
            ("tokenizer.ggml.model".to_string(), Kv::Str("llama".into())),
            ("tokenizer.ggml.pre".to_string(), Kv::Str("default".into())),
            ("tokenizer.ggml.tokens".to_string(), Kv::Strs(tokens)),
            ("tokenizer.ggml.scores".to_string(), Kv::F32s(scores)),
            ("tokenizer.ggml.token_type".to_string(), Kv::I32s(types.iter().map(|&t| t as i32).collect())),
            ("tokenizer.ggml.add_space_prefix".to_string(), Kv::Bool(prefix)),
        ]);
        if let Some(id) = unk.and_then(|u| tokenizer.token_to_id(u)) {
            kvs.push(("tokenizer.ggml.unknown_token_id".to_string(), Kv::U32(id)));
        }
    } else {
        let pre = super::vocab::pre_of(&json["pre_tokenizer"]).ok_or_else(|| {
            err("tokenizer.ggml.pre", format!("the tokenizer's text split ({}) is not one llama.cpp names", json["pre_tokenizer"]))
        })?;
        kvs.extend([
            ("tokenizer.ggml.model".to_string(), Kv::Str("gpt2".into())),
            ("tokenizer.ggml.pre".to_string(), Kv::Str(pre.into())),
            ("tokenizer.ggml.tokens".to_string(), Kv::Strs(tokens)),
            ("tokenizer.ggml.token_type".to_string(), Kv::I32s(types.iter().map(|&t| t as i32).collect())),
            ("tokenizer.ggml.merges".to_string(), Kv::Strs(merges.into_iter().map(|(a, b)| format!("{a} {b}")).collect())),
        ]);
    }
    // What the tokenizer adds around a text: BOS first, EOS last.
    let ends = tokenizer.encode("", true).unwrap_or_default();
    let add_bos = tokenizer.bos_token_id().is_some_and(|b| ends.first() == Some(&b));
    let add_eos = tokenizer.eos_token_id().is_some_and(|e| ends.last() == Some(&e) && ends.len() > usize::from(add_bos));
    kvs.push(("tokenizer.ggml.add_bos_token".to_string(), Kv::Bool(add_bos)));
    kvs.push(("tokenizer.ggml.add_eos_token".to_string(), Kv::Bool(add_eos)));
    for (key, id) in [("bos", tokenizer.bos_token_id()), ("eos", tokenizer.eos_token_id()), ("padding", tokenizer.pad_token_id())] {
        if let Some(id) = id {
            kvs.push((format!("tokenizer.ggml.{key}_token_id"), Kv::U32(id)));
        }
    }
    if let Some(template) = tokenizer.chat_template_source() {
        kvs.push(("tokenizer.chat_template".to_string(), Kv::Str(template.to_string())));
    }
    Ok(kvs)
}

/// Whether a SentencePiece-style tokenizer puts `▁` in front of the text, or `None` when the
/// tokenizer does not write spaces as `▁`: HF's two shapes of it, a normalizer replacing spaces
/// (with a `Prepend` for the prefix) or a `Metaspace` pre-tokenizer (its `prepend_scheme`).
fn sentencepiece_prefix(json: &Value) -> Option<bool> {
    let steps = |v: &Value, list: &str| -> Vec<Value> {
        match v[list].as_array() {
            Some(items) => items.clone(),
            None if !v.is_null() => vec![v.clone()],
            None => Vec::new(),
        }
    };
    let normalizers = steps(&json["normalizer"], "normalizers");
    let replaces = normalizers.iter().any(|n| n["type"] == "Replace" && n["pattern"]["String"] == " " && n["content"] == "▁");
    if replaces {
        return Some(normalizers.iter().any(|n| n["type"] == "Prepend" && n["prepend"] == "▁"));
    }
    let metaspace = steps(&json["pre_tokenizer"], "pretokenizers").into_iter().find(|p| p["type"] == "Metaspace" && p["replacement"] == "▁")?;
    Some(metaspace["prepend_scheme"] != "never" && metaspace["add_prefix_space"] != false)
}

/// An array of `n` values of GGUF type `tag`, each `N` bytes.
fn put_array<const N: usize>(out: &mut Vec<u8>, tag: u32, items: impl Iterator<Item = [u8; N]>, n: usize) {
    out.extend(9u32.to_le_bytes());
    out.extend(tag.to_le_bytes());
    out.extend((n as u64).to_le_bytes());
    out.extend(items.flatten());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// A value with its GGUF type tag (4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array).
fn put_kv(out: &mut Vec<u8>, v: &Kv) {
    match v {
        Kv::U32(x) => {
            out.extend(4u32.to_le_bytes());
            out.extend(x.to_le_bytes());
        }
        Kv::F32(x) => {
            out.extend(6u32.to_le_bytes());
            out.extend(x.to_le_bytes());
        }
        Kv::Bool(x) => {
            out.extend(7u32.to_le_bytes());
            out.push(u8::from(*x));
        }
        Kv::Str(s) => {
            out.extend(8u32.to_le_bytes());
            put_str(out, s);
        }
        Kv::Strs(items) => {
            out.extend(9u32.to_le_bytes());
            out.extend(8u32.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for s in items {
                put_str(out, s);
            }
        }
        Kv::I32s(items) => put_array(out, 5, items.iter().map(|x| x.to_le_bytes()), items.len()),
        Kv::F32s(items) => put_array(out, 6, items.iter().map(|x| x.to_le_bytes()), items.len()),
        Kv::Bools(items) => put_array(out, 7, items.iter().map(|x| [u8::from(*x)]), items.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_quantises_matrices_whose_rows_split_into_blocks() {
        assert_eq!(GgufDtype::Q8_0.of(&[576]), TensorType::F32);
        assert_eq!(GgufDtype::Q8_0.of(&[1536, 576]), TensorType::Q8_0);
        assert_eq!(GgufDtype::Q8_0.of(&[576, 48]), TensorType::F16);
        assert_eq!(GgufDtype::F16.of(&[1536, 576]), TensorType::F16);
        assert_eq!(GgufDtype::F32.of(&[1536, 576]), TensorType::F32);
        // 32 values: a 2-byte scale and 32 bytes, as ggml's `block_q8_0`.
        assert_eq!(TensorType::Q8_0.bytes(576 * 1536), 576 * 1536 / 32 * 34);
    }

    #[test]
    fn sentencepiece_tokenizers_are_told_by_their_space_handling() {
        use serde_json::json;
        let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"});
        let prepend = json!({"type": "Prepend", "prepend": "▁"});
        let metaspace = |scheme: &str| json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": false});
        let shapes = [
            // Llama 2's tokenizer.json (transformers 4), and the one odpo reads from a GGUF file.
            (json!({"normalizer": {"type": "Sequence", "normalizers": [prepend, replace]}}), Some(true)),
            // Gemma's: spaces replaced, nothing in front.
            (json!({"normalizer": replace}), Some(false)),
            // transformers 5's Llama tokenizer.
            (json!({"normalizer": null, "pre_tokenizer": metaspace("first")}), Some(true)),
            (json!({"normalizer": null, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [metaspace("never")]}}), Some(false)),
            // Byte-level and other tokenizers.
            (json!({"normalizer": null, "pre_tokenizer": {"type": "ByteLevel"}}), None),
            (json!({"normalizer": {"type": "NFC"}, "pre_tokenizer": null}), None),
        ];
        for (json, want) in shapes {
            assert_eq!(sentencepiece_prefix(&json), want, "{json}");
        }
    }
}
