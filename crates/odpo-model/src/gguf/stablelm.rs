//! A GGUF file of `stablelm` (llama.cpp's converter's output for `StableLmForCausalLM`: StableLM 2,
//! StableLM-3B-4E1T) as an HF `config.json` value and weights under HF names and layouts.
//!
//! The converter (`StableLMModel`) writes the shapes, the LayerNorm's epsilon, the rotated dims
//! (`rope.dimension_count`) and whether the residual is parallel; what it leaves out, llama.cpp
//! decides, and so does this reader: the base 10,000 unless the file gives one, SiLU's gated unit,
//! the parallel residual where a layer has no `ffn_norm` (llama.cpp's test, whatever the key says).
//! The per-head query and key norms of StableLM 2 12B are stacked into one `[heads, head_dim]`
//! tensor a layer (`attn_q_norm`, `attn_k_norm`), split here into HF's one norm a head. Q/K rows are
//! stored as they are: llama.cpp rotates halves for StableLM, as HF does.

use serde_json::json;

use super::{GgufError, GgufFile, HfModel, HostTensor, tensor_err};

/// The architecture read, as `general.architecture` names it.
pub(super) const ARCH: &str = "stablelm";

/// The tensors outside the layers: llama.cpp's name and HF's.
const TOP: [(&str, &str); 3] = [("token_embd", "model.embed_tokens"), ("output_norm", "model.norm"), ("output", "lm_head")];

/// A layer's tensors: llama.cpp's name and HF's (the stacked head norms under a name of their own
/// until they are split).
const PARTS: [(&str, &str); 11] = [
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_layernorm"),
    ("attn_k_norm", "self_attn.k_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// The HF name of a llama.cpp tensor of a `stablelm` file, or `None` if it has none.
pub(super) fn hf_name(gguf: &str) -> Option<String> {
    super::hf_name_by(&TOP, &PARTS, gguf)
}

/// The llama.cpp name of an HF tensor of a StableLM model: the inverse of [`hf_name`], the head
/// norms under the stacked tensor's name (`..q_layernorm.weight`).
pub(super) fn gguf_name(hf: &str) -> Option<String> {
    super::gguf_name_by(&TOP, &PARTS, hf)
}

/// [`super::load_blocks_as_hf`] of an open `stablelm` file.
pub(super) fn read(f: &GgufFile, keep_blocks: bool) -> Result<HfModel, GgufError> {
    let path = f.path();
    let shape @ [_, heads, kv_heads, head_dim] = f.layer_norm_shape(ARCH)?;
    let (mut weights, blocks) = f.read_tensors(
        keep_blocks,
        |name| hf_name(name).ok_or_else(|| tensor_err(path, name, "has no Hugging Face StableLmForCausalLM equivalent")),
        |_, _, _| Ok(()),
        |_, _, _| Ok(()),
    )?;
    // The stacked head norms, one `[head_dim]` weight a head.
    let stacked: Vec<String> = weights.keys().filter(|n| n.ends_with("_layernorm.weight") && n.contains(".self_attn.")).cloned().collect();
    for name in stacked {
        let gguf = gguf_name(&name).unwrap_or_else(|| name.clone());
        let Some(t) = weights.remove(&name) else { continue };
        let n = if name.contains(".q_layernorm.") { heads } else { kv_heads } as usize;
        if t.shape != [n, head_dim as usize] {
            return Err(tensor_err(path, &gguf, format!("has shape {:?}; expected [{n}, {head_dim}] (a norm of {head_dim} weights for each of {n} heads)", t.shape)));
        }
        for (h, w) in t.data.chunks_exact(head_dim as usize).enumerate() {
            weights.insert(name.replace("_layernorm.weight", &format!("_layernorm.norms.{h}.weight")), HostTensor { shape: vec![head_dim as usize], data: w.to_vec() });
        }
    }
    let mut config = f.layer_norm_config(ARCH, "StableLmForCausalLM", "stablelm", shape, &weights)?;
    config["hidden_act"] = json!("silu");
    config["use_qkv_bias"] = json!(weights.contains_key("model.layers.0.self_attn.q_proj.bias"));
    config["qk_layernorm"] = json!(weights.contains_key("model.layers.0.self_attn.q_layernorm.norms.0.weight"));
    // llama.cpp runs a layer without `ffn_norm` in parallel.
    config["use_parallel_residual"] = json!(!weights.contains_key("model.layers.0.post_attention_layernorm.weight"));
    Ok((config, weights, blocks))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{gguf_name, hf_name};

    #[test]
    fn stablelm_names() {
        for (gguf, hf) in [
            ("blk.1.attn_q.bias", Some("model.layers.1.self_attn.q_proj.bias")),
            ("blk.0.attn_output.weight", Some("model.layers.0.self_attn.o_proj.weight")),
            ("blk.0.attn_k_norm.weight", Some("model.layers.0.self_attn.k_layernorm.weight")),
            ("blk.2.ffn_norm.bias", Some("model.layers.2.post_attention_layernorm.bias")),
            ("blk.3.ffn_gate.weight", Some("model.layers.3.mlp.gate_proj.weight")),
            ("output_norm.bias", Some("model.norm.bias")),
            ("output.weight", Some("lm_head.weight")),
            ("rope_freqs.weight", None),
            ("blk.0.attn_qkv.weight", None),
        ] {
            assert_eq!(hf_name(gguf).as_deref(), hf, "{gguf}");
            if let Some(hf) = hf {
                assert_eq!(gguf_name(hf).as_deref(), Some(gguf), "{hf}");
            }
        }
    }
}
