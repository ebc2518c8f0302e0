//! A GGUF file of the Llama family (`llama`, which Mistral's and Mixtral's files declare too,
//! `qwen2`, `qwen3`, `olmo2` (OLMo 3 with a window), `smollm3`, `granite`, `phi3`, `qwen2moe`, `qwen3moe`) as an
//! HF `config.json` value and weights under HF names and layouts: llama.cpp's tensor names mapped to HF's, and for `llama`, `smollm3` and `granite` its
//! Q/K row permutation undone. llama.cpp's converter permutes those rows for the architectures whose
//! rotation it computes on adjacent pairs (its `LlamaModel` and the classes built on it); for Qwen2,
//! Qwen3, OLMo 2 and Phi-3 it rotates halves as HF does and stores the rows as they are.
//!
//! What a file of the three later architectures leaves out, llama.cpp decides (`src/models/`), and
//! so does this reader: SmolLM3 skips the rotation in every fourth layer; Granite without an
//! `attention.scale` scales scores by `head_dim^-½`, and without a residual or embedding scale uses
//! none. Phi-3's fused projections keep their HF layout (`attn_qkv`, and `ffn_up` holding the gate's
//! rows then the up projection's); its LongRoPE factors are two tensors (`rope_factors_short`,
//! `rope_factors_long`), which become the config's `short_factor` and `long_factor`.
//!
//! A mixture of experts (a `llama` file with `llama.expert_count`, Mixtral; `qwen2moe`; `qwen3moe`)
//! holds each layer's experts stacked, one `[experts, rows, cols]` tensor a projection
//! (`ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`), which are split into HF's experts, and its
//! router as `ffn_gate_inp`; Qwen2-MoE's shared expert is `ffn_{gate,up,down}_shexp` and its gate
//! `ffn_gate_inp_shexp`. llama.cpp renormalises the chosen experts' weights in Mixtral and
//! Qwen3-MoE, and not in Qwen2-MoE (transformers' default there).

use std::path::Path;

use serde_json::json;

use std::collections::BTreeMap;

use super::{GgufError, GgufFile, GgufValue, HfModel, HostTensor, tensor_err};
use crate::quantized::QuantBlocks;

/// The architectures read, as `general.architecture` names them, with the HF architecture each
/// becomes.
pub(super) const ARCHITECTURES: [(&str, &str); 9] = [
    ("llama", "LlamaForCausalLM"),
    ("qwen2", "Qwen2ForCausalLM"),
    ("qwen3", "Qwen3ForCausalLM"),
    ("olmo2", "Olmo2ForCausalLM"),
    ("smollm3", "SmolLM3ForCausalLM"),
    ("granite", "GraniteForCausalLM"),
    ("phi3", "Phi3ForCausalLM"),
    ("qwen2moe", "Qwen2MoeForCausalLM"),
    ("qwen3moe", "Qwen3MoeForCausalLM"),
];

/// Phi-3's LongRoPE factors: the tensors' names, and the HF config keys they become.
pub(super) const ROPE_FACTORS: [(&str, &str); 2] = [("rope_factors_short.weight", "short_factor"), ("rope_factors_long.weight", "long_factor")];

/// The architectures whose Q/K rows llama.cpp's converter permutes.
pub(super) fn permuted(arch: &str) -> bool {
    matches!(arch, "llama" | "smollm3" | "granite")
}

/// The HF name of a llama.cpp tensor of the Llama family in a file of `arch`, or `None` if it has
/// none.
pub(super) fn hf_name(arch: &str, gguf: &str) -> Option<String> {
    let (base, suffix) = gguf.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    if let Some((_, top)) = TOP.iter().find(|(g, _)| *g == base) {
        return Some(format!("{top}.{suffix}"));
    }
    // Phi-3's factors keep their own names until the reader moves them into the config.
    if arch == "phi3" && ROPE_FACTORS.iter().any(|(g, _)| *g == gguf) {
        return Some(gguf.into());
    }
    let (layer, part) = base.strip_prefix("blk.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let part = PARTS.iter().find(|(g, h)| *g == part && has_part(arch, g, h))?.1;
    Some(format!("model.layers.{layer}.{part}.{suffix}"))
}

/// The tensors outside the layers: llama.cpp's name and HF's.
const TOP: [(&str, &str); 3] = [("token_embd", "model.embed_tokens"), ("output_norm", "model.norm"), ("output", "lm_head")];

/// Whether a layer of `arch` has llama.cpp's tensor `part` as HF's `hf`: OLMo 2's norms are after
/// the attention and the MLP (`post_attention_norm`, `post_ffw_norm`), the others' before them
/// (`attn_norm`, `ffn_norm`); Phi-3 has its fused projections (`attn_qkv`, and `ffn_up` for the
/// gate and up projections together) in place of the separate ones.
fn has_part(arch: &str, part: &str, hf: &str) -> bool {
    let after = matches!(part, "post_attention_norm" | "post_ffw_norm");
    let before = matches!(part, "attn_norm" | "ffn_norm");
    let fused = matches!(hf, "self_attn.qkv_proj" | "mlp.gate_up_proj");
    let separate = matches!(hf, "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj" | "mlp.gate_proj" | "mlp.up_proj");
    let phi3 = arch == "phi3";
    let norms = if arch == "olmo2" { !before } else { !after };
    norms && if phi3 { !separate } else { !fused }
}

/// A layer's tensors: llama.cpp's name and HF's. HF's `post_attention_layernorm` is the norm before
/// the MLP (`ffn_norm`) but OLMo 2's after the attention (`post_attention_norm`).
const PARTS: [(&str, &str); 23] = [
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_qkv", "self_attn.qkv_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_up", "mlp.gate_up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("post_attention_norm", "post_attention_layernorm"),
    ("post_ffw_norm", "post_feedforward_layernorm"),
    // A mixture of experts: the router, and each projection's experts stacked (split on reading).
    ("ffn_gate_inp", "mlp.gate"),
    ("ffn_gate_exps", "mlp.experts.gate_proj"),
    ("ffn_up_exps", "mlp.experts.up_proj"),
    ("ffn_down_exps", "mlp.experts.down_proj"),
    // Qwen2-MoE's shared expert and its gate.
    ("ffn_gate_shexp", "mlp.shared_expert.gate_proj"),
    ("ffn_up_shexp", "mlp.shared_expert.up_proj"),
    ("ffn_down_shexp", "mlp.shared_expert.down_proj"),
    ("ffn_gate_inp_shexp", "mlp.shared_expert_gate"),
];

/// The llama.cpp name of an HF tensor of the Llama family in a file of `arch`: the inverse of
/// [`hf_name`].
pub(super) fn gguf_name(arch: &str, hf: &str) -> Option<String> {
    let (base, suffix) = hf.rsplit_once('.')?;
    let name = if let Some((top, _)) = TOP.iter().find(|(_, h)| *h == base) {
        format!("{top}.{suffix}")
    } else {
        let (layer, part) = base.strip_prefix("model.layers.")?.split_once('.')?;
        format!("blk.{layer}.{}.{suffix}", PARTS.iter().find(|(g, h)| *h == part && has_part(arch, g, h))?.0)
    };
    // Only names the reader maps back the same way (a `.weight` or `.bias` of a numbered layer).
    (hf_name(arch, &name).as_deref() == Some(hf)).then_some(name)
}

/// convert_hf_to_gguf.py's `permute`: within each of `heads` heads, row 2i+s takes HF row s*half+i
/// (the inverse of [`unpermute_rows`]).
pub(super) fn permute_rows(data: &[f32], rows: usize, heads: usize) -> Vec<f32> {
    let cols = data.len() / rows.max(1);
    let half = rows / heads.max(1) / 2;
    let mut out = vec![0f32; data.len()];
    for dst in 0..rows {
        let src = unpermuted_source(dst, half.max(1));
        out[src * cols..(src + 1) * cols].copy_from_slice(&data[dst * cols..(dst + 1) * cols]);
    }
    out
}

/// Undoes convert_hf_to_gguf.py's `permute`: within each of `heads` heads, llama.cpp stores
/// the rows interleaved (row 2i+s holds HF row s*half+i), for its rotate-adjacent-pairs RoPE.
pub(super) fn unpermute_rows(
    path: &Path,
    name: &str,
    t: &mut HostTensor,
    heads: usize,
) -> Result<(), GgufError> {
    let rows = t.shape.first().copied().unwrap_or(0);
    let half = unpermute_half(path, name, rows, heads)?;
    let cols = t.data.len() / rows;
    let mut out = vec![0f32; t.data.len()];
    for dst in 0..rows {
        let src = unpermuted_source(dst, half);
        out[dst * cols..(dst + 1) * cols].copy_from_slice(&t.data[src * cols..(src + 1) * cols]);
    }
    t.data = out;
    Ok(())
}

/// Half a head's rows, checking that `rows` split into `heads` heads of even size.
fn unpermute_half(path: &Path, name: &str, rows: usize, heads: usize) -> Result<usize, GgufError> {
    if heads == 0 || rows == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(tensor_err(
            path,
            name,
            format!("{rows} rows do not split into {heads} heads of even size"),
        ));
    }
    Ok(rows / heads / 2)
}

/// The llama.cpp row that HF row `dst` comes from: within a head, HF row `s·half + i` is stored
/// at row `2i + s`.
fn unpermuted_source(dst: usize, half: usize) -> usize {
    let (head, r) = (dst / (2 * half), dst % (2 * half));
    head * 2 * half + 2 * (r % half) + r / half
}

/// A file of the Llama family (`arch`, one of [`ARCHITECTURES`]) as
/// [`super::load_blocks_as_hf`] gives it: the weights in HF layout (`[out, in]` matrices, Q/K rows in
/// HF order). Every tensor must have an HF llama equivalent: an unknown one (e.g. Llama 3's
/// `rope_freqs.weight`, whose RoPE scaling the HF config could not express) is an error rather
/// than silently dropped. RoPE scaling metadata, if present, becomes `rope_scaling`.
pub(super) fn read(f: &GgufFile, arch: &str, keep_blocks: bool) -> Result<HfModel, GgufError> {
    let path = f.path();
    let hf_arch = ARCHITECTURES.iter().find(|(a, _)| *a == arch).map_or("LlamaForCausalLM", |(_, h)| *h);
    // Metadata keys begin with the architecture's name (`qwen3.block_count`).
    let key = |k: &str| format!("{arch}.{k}");
    let permuted = permuted(arch);
    let uint = |key: &str| f.meta(key, "an unsigned integer", GgufValue::as_u64);
    let float = |key: &str| f.meta(key, "a number", GgufValue::as_f64);
    let need_uint = |key: &str| f.required(key, uint(key)?);

    let hidden = f.positive(&key("embedding_length"))?;
    let heads = f.positive(&key("attention.head_count"))?;
    let kv_heads = uint(&key("attention.head_count_kv"))?.unwrap_or(heads);
    let eps_key = key("attention.layer_norm_rms_epsilon");
    let head_dim = uint(&key("attention.key_length"))?.unwrap_or(hidden / heads);

    let (mut weights, mut blocks) = f.read_tensors(
        keep_blocks,
        |name| hf_name(arch, name).ok_or_else(|| tensor_err(path, name, format!("has no Hugging Face {hf_arch} equivalent"))),
        |name, hf, b| {
            for (part, h) in [(".self_attn.q_proj.", heads), (".self_attn.k_proj.", kv_heads)] {
                if permuted && hf.contains(part) {
                    let half = unpermute_half(path, name, b.shape[0], h as usize)?;
                    b.permute_rows(|dst| unpermuted_source(dst, half));
                }
            }
            Ok(())
        },
        |name, hf, t| {
            if permuted && hf.contains(".self_attn.q_proj.") {
                unpermute_rows(path, name, t, heads as usize)?;
            } else if permuted && hf.contains(".self_attn.k_proj.") {
                unpermute_rows(path, name, t, kv_heads as usize)?;
            }
            Ok(())
        },
    )?;
    let vocab = super::vocab(path, &weights)?;
    // Qwen2-MoE's shared-expert gate: `[1, hidden]` as the checkpoint holds it, or `[hidden]` as
    // llama.cpp's quantiser and earlier converters leave it (both run in llama.cpp).
    for (_, t) in weights.iter_mut().filter(|(n, _)| n.ends_with(".mlp.shared_expert_gate.weight")) {
        if t.shape.len() == 1 {
            t.shape.insert(0, 1);
        }
    }
    // A `llama` file with experts is a Mixtral.
    let experts = uint(&key("expert_count"))?.filter(|n| *n > 0);
    let (hf_arch, model_type) = match (arch, experts) {
        ("llama", Some(_)) => ("MixtralForCausalLM", "mixtral"),
        ("qwen2moe", _) => (hf_arch, "qwen2_moe"),
        ("qwen3moe", _) => (hf_arch, "qwen3_moe"),
        _ => (hf_arch, arch),
    };

    let mut config = serde_json::json!({
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": need_uint(&key("feed_forward_length"))?,
        "num_hidden_layers": need_uint(&key("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": f.required(&eps_key, float(&eps_key)?)?,
        "rope_theta": float(&key("rope.freq_base"))?.unwrap_or(10000.0),
        "max_position_embeddings": need_uint(&key("context_length"))?,
        "vocab_size": vocab,
        "tie_word_embeddings": !weights.contains_key("lm_head.weight"),
        // Qwen2's q/k/v biases come with its architecture (its o_proj has none), and Qwen2-MoE's
        // with `qkv_bias`; elsewhere the option covers all four projections.
        "attention_bias": !matches!(arch, "qwen2" | "qwen2moe") && weights.contains_key("model.layers.0.self_attn.q_proj.bias"),
        "mlp_bias": weights.contains_key("model.layers.0.mlp.up_proj.bias"),
    });
    if model_type == "mixtral" || matches!(arch, "qwen2moe" | "qwen3moe") {
        split_experts(f, arch, model_type == "mixtral", &mut config, &mut weights, &mut blocks)?;
    }
    match arch {
        "qwen2moe" => config["qkv_bias"] = json!(weights.contains_key("model.layers.0.self_attn.q_proj.bias")),
        // llama.cpp's SmolLM3 rotates in three layers of four, whatever the checkpoint did.
        "smollm3" => config["no_rope_layer_interval"] = json!(4),
        "phi3" => {
            // The rotated dims (Phi-4-mini's partial rotation), LongRoPE's original length, its
            // attention factor and its factors, which llama.cpp keeps as tensors.
            let rotated = uint(&key("rope.dimension_count"))?.unwrap_or(head_dim);
            config["partial_rotary_factor"] = json!(rotated as f64 / head_dim as f64);
            if let Some(original) = uint(&key("rope.scaling.original_context_length"))? {
                config["original_max_position_embeddings"] = json!(original);
            }
            // The converter writes 0 for none (Phi-4).
            config["sliding_window"] = json!(uint(&key("attention.sliding_window"))?.filter(|w| *w > 0));
            let mut rope = json!({"rope_type": "default", "rope_theta": config["rope_theta"]});
            for (name, hf_key) in ROPE_FACTORS {
                if let Some(t) = weights.remove(name) {
                    rope[hf_key] = json!(t.data);
                }
            }
            match (rope.get("short_factor").is_some(), rope.get("long_factor").is_some()) {
                (true, true) => {
                    rope["rope_type"] = json!("longrope");
                    if let Some(a) = float(&key("rope.scaling.attn_factor"))? {
                        rope["attention_factor"] = json!(a);
                    }
                }
                (false, false) => {}
                _ => return Err(tensor_err(path, "rope_factors_short.weight", "comes without rope_factors_long.weight or the other way round; LongRoPE needs both")),
            }
            config["rope_parameters"] = rope;
        }
        "granite" => {
            // An absent (or zero) scale is none, as in llama.cpp; the scores' default is 1/√head_dim.
            let scale = |k: &str, none: f64| -> Result<f64, GgufError> { Ok(float(&key(k))?.filter(|x| *x != 0.0).unwrap_or(none)) };
            let logits_key = key("logit_scale");
            config["logits_scaling"] = json!(f.required(&logits_key, float(&logits_key)?)?);
            config["residual_multiplier"] = json!(scale("residual_scale", 1.0)?);
            config["embedding_multiplier"] = json!(scale("embedding_scale", 1.0)?);
            config["attention_multiplier"] = json!(scale("attention.scale", 1.0 / (head_dim as f64).sqrt())?);
        }
        _ => {}
    }
    f.add_token_ids(&mut config)?;
    let scaling = f.rope_scaling(arch)?;
    let window = uint(&key("attention.sliding_window"))?.filter(|w| *w > 0);
    match (arch, window) {
        // OLMo 3, as llama.cpp's converter writes it: an `olmo2` file with a window, its sliding
        // layers from the pattern (each layer's flag, or every n-th layer full; every fourth where
        // the key is absent), the file's RoPE scaling on the full layers alone.
        ("olmo2", Some(w)) => {
            let n = config["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
            let pattern_key = key("attention.sliding_window_pattern");
            let sliding: Vec<bool> = match f.metadata.get(&pattern_key) {
                Some(GgufValue::Array(flags)) => {
                    let flags: Option<Vec<bool>> = flags.iter().map(|v| if let GgufValue::Bool(b) = v { Some(*b) } else { None }).collect();
                    match flags {
                        Some(flags) if flags.len() == n => flags,
                        _ => return Err(super::meta_err(path, &pattern_key, format!("expected one boolean per layer ({n})"))),
                    }
                }
                _ => match uint(&pattern_key)?.unwrap_or(4) {
                    0 => return Err(super::meta_err(path, &pattern_key, "0; expected a layer pattern of at least 1")),
                    every => (0..n).map(|i| !(i as u64 + 1).is_multiple_of(every)).collect(),
                },
            };
            let kind = |s: &bool| if *s { "sliding_attention" } else { "full_attention" };
            config["architectures"] = json!(["Olmo3ForCausalLM"]);
            config["model_type"] = json!("olmo3");
            config["sliding_window"] = json!(w);
            config["layer_types"] = json!(sliding.iter().map(kind).collect::<Vec<_>>());
            let theta = config["rope_theta"].clone();
            let mut full = scaling.unwrap_or_else(|| json!({"rope_type": "default"}));
            full["rope_theta"] = theta.clone();
            // A base of the sliding layers' own, where the file gives one.
            let local = float(&key("rope.freq_base_swa"))?.map_or(theta, |b| json!(b));
            config["rope_parameters"] = json!({"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": local}});
        }
        _ => {
            if let Some(scaling) = scaling {
                config["rope_scaling"] = scaling;
            }
        }
    }
    Ok((config, weights, blocks))
}

/// A mixture of experts' stacked expert tensors split into HF's (`model.layers.N.mlp.experts.E.*`,
/// Mixtral's `block_sparse_moe.experts.E.w1` / `w3` / `w2`), and the config's expert keys from the
/// file's: the experts' count and the count each token takes, Qwen's expert width (the key, else
/// the stacks' rows), Qwen2-MoE's shared expert's (the key, else its rows) and Qwen's layers
/// without experts (`mlp_only_layers`; Mixtral has none).
fn split_experts(f: &GgufFile, arch: &str, mixtral: bool, config: &mut serde_json::Value, weights: &mut BTreeMap<String, HostTensor>, blocks: &mut BTreeMap<String, QuantBlocks>) -> Result<(), GgufError> {
    let path = f.path();
    let key = |k: &str| format!("{arch}.{k}");
    let uint = |k: &str| f.meta(&key(k), "an unsigned integer", GgufValue::as_u64);
    let experts = f.positive(&key("expert_count"))? as usize;
    let used = f.required(&key("expert_used_count"), uint("expert_used_count")?)?;
    let layers = config["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
    let mut width = None;
    for (part, mixtral_part) in [("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")] {
        for i in 0..layers {
            let stacked = format!("model.layers.{i}.mlp.experts.{part}.weight");
            let gguf = gguf_name(arch, &stacked).unwrap_or_else(|| stacked.clone());
            let name = |e: usize| if mixtral { format!("model.layers.{i}.block_sparse_moe.experts.{e}.{mixtral_part}.weight") } else { format!("model.layers.{i}.mlp.experts.{e}.{part}.weight") };
            let bad = |what: String| tensor_err(path, &gguf, format!("{what}; expected {experts} experts' matrices (`{}`)", key("expert_count")));
            if let Some(t) = weights.remove(&stacked) {
                let &[n, rows, cols] = t.shape.as_slice() else { return Err(bad(format!("has shape {:?}", t.shape))) };
                if n != experts {
                    return Err(bad(format!("stacks {n}")));
                }
                for (e, data) in t.data.chunks_exact(rows * cols).enumerate() {
                    weights.insert(name(e), HostTensor { shape: vec![rows, cols], data: data.to_vec() });
                }
                width.get_or_insert(if part == "down_proj" { cols } else { rows });
            } else if let Some(b) = blocks.remove(&stacked) {
                if !b.shape[0].is_multiple_of(experts) {
                    return Err(bad(format!("has {} rows", b.shape[0])));
                }
                let rows = b.shape[0] / experts;
                for e in 0..experts {
                    blocks.insert(name(e), b.rows(e * rows, rows));
                }
                width.get_or_insert(if part == "down_proj" { b.shape[1] } else { rows });
            }
        }
    }
    // The routers, and the layers that have none (a dense MLP).
    let mut dense = Vec::new();
    for i in 0..layers {
        match weights.remove(&format!("model.layers.{i}.mlp.gate.weight")) {
            Some(router) => {
                let hf = if mixtral { format!("model.layers.{i}.block_sparse_moe.gate.weight") } else { format!("model.layers.{i}.mlp.gate.weight") };
                weights.insert(hf, router);
            }
            None if mixtral => return Err(tensor_err(path, &format!("blk.{i}.ffn_gate_inp.weight"), "is missing; a Mixtral's every layer has a router")),
            None => dense.push(i),
        }
    }
    // Mixtral's and Qwen3-MoE's configs both name the count `num_local_experts`; Qwen2-MoE's
    // `num_experts`.
    let qwen2 = arch == "qwen2moe";
    config[if qwen2 { "num_experts" } else { "num_local_experts" }] = json!(experts);
    config["num_experts_per_tok"] = json!(used);
    if !mixtral {
        let width = uint("expert_feed_forward_length")?.map(|w| w as usize).or(width);
        config["moe_intermediate_size"] = json!(f.required(&key("expert_feed_forward_length"), width.map(|w| w as u64))?);
        // What llama.cpp does: renormalise in `qwen3moe`, not in `qwen2moe`.
        config["norm_topk_prob"] = json!(!qwen2);
        config["mlp_only_layers"] = json!(dense);
    }
    if qwen2 {
        let rows = weights.get("model.layers.0.mlp.shared_expert.up_proj.weight").map(|t| t.shape[0]).or(blocks.get("model.layers.0.mlp.shared_expert.up_proj.weight").map(|b| b.shape[0]));
        let shared_key = key("expert_shared_feed_forward_length");
        config["shared_expert_intermediate_size"] = json!(f.required(&shared_key, uint("expert_shared_feed_forward_length")?.or(rows.map(|r| r as u64)))?);
    }
    Ok(())
}
