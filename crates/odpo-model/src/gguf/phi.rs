//! A GGUF file of `phi2` (llama.cpp's converter's output for `PhiForCausalLM`: Phi-1, Phi-1.5,
//! Phi-2) as an HF `config.json` value and weights under HF names and layouts.
//!
//! The converter (`Phi2Model`) writes the shapes, the LayerNorm's epsilon and the rotated dims
//! (`rope.dimension_count`); what it leaves out, llama.cpp decides, and so does this reader: the
//! base 10,000 unless the file gives one, GELU's tanh form, biases on every projection and on the
//! head. Files made from the first Phi checkpoints (before transformers had the architecture) hold
//! the query, key and value in one `attn_qkv`; its rows, the queries' then the keys' then the
//! values', are split into HF's three projections. Q/K rows are stored as they are: llama.cpp
//! rotates halves for Phi, as HF does.

use serde_json::json;

use super::{GgufError, GgufFile, HfModel, tensor_err};

/// The architecture read, as `general.architecture` names it.
pub(super) const ARCH: &str = "phi2";

/// The tensors outside the layers: llama.cpp's name and HF's.
const TOP: [(&str, &str); 3] = [("token_embd", "model.embed_tokens"), ("output_norm", "model.final_layernorm"), ("output", "lm_head")];

/// A layer's tensors: llama.cpp's name and HF's (`attn_qkv` only read, then split).
const PARTS: [(&str, &str); 8] = [
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_qkv", "self_attn.qkv_proj"),
    ("attn_output", "self_attn.dense"),
    ("ffn_up", "mlp.fc1"),
    ("ffn_down", "mlp.fc2"),
];

/// The HF name of a llama.cpp tensor of a `phi2` file, or `None` if it has none.
pub(super) fn hf_name(gguf: &str) -> Option<String> {
    super::hf_name_by(&TOP, &PARTS, gguf)
}

/// The llama.cpp name of an HF tensor of a Phi model: the inverse of [`hf_name`] (a Phi's
/// projections are separate, and are written so, as the converter writes them).
pub(super) fn gguf_name(hf: &str) -> Option<String> {
    super::gguf_name_by(&TOP, &PARTS, hf)
}

/// [`super::load_blocks_as_hf`] of an open `phi2` file.
pub(super) fn read(f: &GgufFile, keep_blocks: bool) -> Result<HfModel, GgufError> {
    let path = f.path();
    let shape @ [_, heads, kv_heads, head_dim] = f.layer_norm_shape(ARCH)?;
    let (mut weights, mut blocks) = f.read_tensors(
        keep_blocks,
        |name| hf_name(name).ok_or_else(|| tensor_err(path, name, "has no Hugging Face PhiForCausalLM equivalent")),
        |_, _, _| Ok(()),
        |_, _, _| Ok(()),
    )?;
    // The fused query-key-value rows of the older files, split as llama.cpp splits them.
    let sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim].map(|n| n as usize);
    let fused: Vec<String> = weights.keys().chain(blocks.keys()).filter(|n| n.contains(".self_attn.qkv_proj.")).cloned().collect();
    for name in fused {
        let gguf = name.replace("model.layers.", "blk.").replace("self_attn.qkv_proj", "attn_qkv");
        let rows_err = |rows: usize| tensor_err(path, &gguf, format!("has {rows} rows; expected {} (queries, keys and values of {heads} and {kv_heads} heads of {head_dim})", sizes.iter().sum::<usize>()));
        let mut start = 0;
        if let Some(t) = weights.remove(&name) {
            let rows = t.shape.first().copied().unwrap_or(0);
            if rows != sizes.iter().sum::<usize>() {
                return Err(rows_err(rows));
            }
            let cols = t.data.len() / rows;
            for (part, n) in ["q_proj", "k_proj", "v_proj"].into_iter().zip(sizes) {
                let shape = if t.shape.len() == 1 { vec![n] } else { vec![n, cols] };
                let data = t.data[start * cols..(start + n) * cols].to_vec();
                weights.insert(name.replace("qkv_proj", part), super::HostTensor { shape, data });
                start += n;
            }
        } else if let Some(b) = blocks.remove(&name) {
            if b.shape[0] != sizes.iter().sum::<usize>() {
                return Err(rows_err(b.shape[0]));
            }
            for (part, n) in ["q_proj", "k_proj", "v_proj"].into_iter().zip(sizes) {
                blocks.insert(name.replace("qkv_proj", part), b.rows(start, n));
                start += n;
            }
        }
    }
    let mut config = f.layer_norm_config(ARCH, "PhiForCausalLM", "phi", shape, &weights)?;
    // llama.cpp's GELU is the tanh form.
    config["hidden_act"] = json!("gelu_new");
    Ok((config, weights, blocks))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{gguf_name, hf_name};

    #[test]
    fn phi2_names() {
        for (gguf, hf) in [
            ("blk.1.attn_q.bias", Some("model.layers.1.self_attn.q_proj.bias")),
            ("blk.0.attn_output.weight", Some("model.layers.0.self_attn.dense.weight")),
            ("blk.3.ffn_up.weight", Some("model.layers.3.mlp.fc1.weight")),
            ("blk.3.ffn_down.bias", Some("model.layers.3.mlp.fc2.bias")),
            ("blk.2.attn_norm.bias", Some("model.layers.2.input_layernorm.bias")),
            ("output_norm.weight", Some("model.final_layernorm.weight")),
            ("output.bias", Some("lm_head.bias")),
            ("blk.0.attn_qkv.weight", Some("model.layers.0.self_attn.qkv_proj.weight")),
            ("blk.0.ffn_gate.weight", None),
            ("blk.x.attn_q.weight", None),
            ("blk.0.attn_q.scale", None),
        ] {
            assert_eq!(hf_name(gguf).as_deref(), hf, "{gguf}");
            if let Some(hf) = hf {
                assert_eq!(gguf_name(hf).as_deref(), Some(gguf), "{hf}");
            }
        }
    }
}
