//! A GGUF file of the Gemma family (`gemma`, `gemma2`, `gemma3`: llama.cpp's converter's output for
//! `GemmaForCausalLM`, `Gemma2ForCausalLM` and `Gemma3ForCausalLM`) as an HF `config.json` value and
//! weights under HF names and layouts.
//!
//! What the converter changed, undone here:
//! - every RMSNorm weight is stored as `1 + w`, since llama.cpp scales by the weight as stored and
//!   HF by `1 + w`;
//! - Gemma 2 and 3's four norms a layer take llama.cpp's names: `post_attention_norm`, `ffn_norm`
//!   (before the MLP) and `post_ffw_norm`; Gemma's one `ffn_norm` is HF's `post_attention_layernorm`.
//!
//! Q/K rows are stored as they are: llama.cpp rotates halves for Gemma, as HF does. What the file
//! leaves out, llama.cpp decides by architecture (`llama-model.cpp`), and so does this reader:
//! queries are scaled by `head_dim^-½`, except in the 27B models (Gemma 2's 46 layers, Gemma 3's 62)
//! by `(hidden / heads)^-½`; Gemma 2 slides on every other layer, Gemma 3 on five of six with a
//! rotary base of 10,000 there.

use serde_json::{Value, json};

use super::{GgufError, GgufFile, GgufValue, HfModel, tensor_err};

/// The architectures read, as `general.architecture` names them, with the HF architecture each
/// becomes and the layer count of its 27B model (whose queries llama.cpp scales differently).
pub(super) const ARCHITECTURES: [(&str, &str, Option<u64>); 3] =
    [("gemma", "GemmaForCausalLM", None), ("gemma2", "Gemma2ForCausalLM", Some(46)), ("gemma3", "Gemma3ForCausalLM", Some(62))];

/// Gemma 2 and 3's layer norms whose names are not the Llama family's: (llama.cpp, HF).
const NORMS: [(&str, &str); 3] =
    [("post_attention_norm", "post_attention_layernorm"), ("ffn_norm", "pre_feedforward_layernorm"), ("post_ffw_norm", "post_feedforward_layernorm")];

/// A layer's norm in [`NORMS`] named the other way: from llama.cpp's `blk.N.` to HF's
/// `model.layers.N.`, or (`to_gguf`) back.
fn norm_name(name: &str, to_gguf: bool) -> Option<String> {
    let (from, to) = if to_gguf { ("model.layers.", "blk.") } else { ("blk.", "model.layers.") };
    let (layer, rest) = name.strip_prefix(from)?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let part = rest.strip_suffix(".weight")?;
    let (_, other) = NORMS.iter().map(|&(g, h)| if to_gguf { (h, g) } else { (g, h) }).find(|(p, _)| *p == part)?;
    Some(format!("{to}{layer}.{other}.weight"))
}

/// The HF name of a llama.cpp tensor of a Gemma file, or `None` if it has none.
fn hf_name(arch: &str, gguf: &str) -> Option<String> {
    if arch != "gemma" && let Some(hf) = norm_name(gguf, false) {
        return Some(hf);
    }
    super::llama::hf_name(arch, gguf)
}

/// The llama.cpp name of an HF tensor of a Gemma model of architecture `arch`: the inverse of
/// [`hf_name`].
pub(super) fn gguf_name(arch: &str, hf: &str) -> Option<String> {
    if arch != "gemma" && let Some(gguf) = norm_name(hf, true) {
        return Some(gguf);
    }
    super::llama::gguf_name(arch, hf)
}

/// [`super::load_blocks_as_hf`] of an open file whose architecture, `arch`, is one of [`ARCHITECTURES`].
pub(super) fn read(f: &GgufFile, arch: &str, keep_blocks: bool) -> Result<HfModel, GgufError> {
    let path = f.path();
    let (hf_arch, layers_27b) = ARCHITECTURES.iter().find(|(a, ..)| *a == arch).map_or(("GemmaForCausalLM", None), |(_, h, l)| (*h, *l));
    let key = |k: &str| format!("{arch}.{k}");
    let uint = |key: &str| f.meta(key, "an unsigned integer", GgufValue::as_u64);
    let float = |key: &str| f.meta(key, "a number", GgufValue::as_f64);

    let hidden = f.positive(&key("embedding_length"))?;
    let heads = f.positive(&key("attention.head_count"))?;
    let layers = f.positive(&key("block_count"))?;
    let kv_heads = uint(&key("attention.head_count_kv"))?.unwrap_or(heads);
    let head_dim = uint(&key("attention.key_length"))?.unwrap_or(hidden / heads);
    let eps_key = key("attention.layer_norm_rms_epsilon");

    let (weights, blocks) = f.read_tensors(
        keep_blocks,
        |name| hf_name(arch, name).ok_or_else(|| tensor_err(path, name, format!("has no Hugging Face {hf_arch} equivalent"))),
        |_, _, _| Ok(()),
        |_, hf, t| {
            if hf.ends_with("norm.weight") {
                t.data.iter_mut().for_each(|w| *w -= 1.0);
            }
            Ok(())
        },
    )?;
    let vocab = super::vocab(path, &weights)?;

    let mut config = json!({
        "architectures": [hf_arch],
        "model_type": if arch == "gemma3" { "gemma3_text" } else { arch },
        "hidden_size": hidden,
        "intermediate_size": f.required(&key("feed_forward_length"), uint(&key("feed_forward_length"))?)?,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": f.required(&eps_key, float(&eps_key)?)?,
        // llama.cpp's default where the file has no base.
        "rope_theta": float(&key("rope.freq_base"))?.unwrap_or(10_000.0),
        "max_position_embeddings": f.required(&key("context_length"), uint(&key("context_length"))?)?,
        "vocab_size": vocab,
        "tie_word_embeddings": !weights.contains_key("lm_head.weight"),
        "attention_bias": weights.contains_key("model.layers.0.self_attn.q_proj.bias"),
    });
    // llama.cpp's GELU is the tanh form for every generation.
    let activation = if arch == "gemma" { "hidden_act" } else { "hidden_activation" };
    config[activation] = "gelu_pytorch_tanh".into();
    if arch != "gemma" {
        let scalar = if Some(layers) == layers_27b { hidden / heads } else { head_dim };
        config["query_pre_attn_scalar"] = scalar.into();
        // The window where the file gives one; otherwise Gemma 2's 4,096, and none for Gemma 3.
        let window = uint(&key("attention.sliding_window"))?;
        config["sliding_window"] = match (arch, window) {
            ("gemma2", None) => 4096.into(),
            (_, Some(w)) if w > 0 => w.into(),
            _ => Value::Null,
        };
        config["final_logit_softcapping"] = cap(float(&key("final_logit_softcapping"))?, (arch == "gemma2").then_some(30.0));
        config["attn_logit_softcapping"] = cap(float(&key("attn_logit_softcapping"))?, (arch == "gemma2").then_some(50.0));
    }
    if arch == "gemma3" {
        config["sliding_window_pattern"] = 6.into();
        config["rope_local_base_freq"] = 10_000.0.into();
    }
    f.add_token_ids(&mut config)?;
    if let Some(scaling) = f.rope_scaling(arch)? {
        config["rope_scaling"] = scaling;
    }
    Ok((config, weights, blocks))
}

/// A soft cap as the file gives it (0: none), else the architecture's default.
fn cap(given: Option<f64>, default: Option<f64>) -> Value {
    match given.or(default) {
        Some(c) if c > 0.0 => c.into(),
        _ => Value::Null,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{gguf_name, hf_name};

    #[test]
    fn gemma_names() {
        for (arch, gguf, hf) in [
            ("gemma", "blk.1.ffn_norm.weight", Some("model.layers.1.post_attention_layernorm.weight")),
            ("gemma2", "blk.1.ffn_norm.weight", Some("model.layers.1.pre_feedforward_layernorm.weight")),
            ("gemma2", "blk.0.post_attention_norm.weight", Some("model.layers.0.post_attention_layernorm.weight")),
            ("gemma3", "blk.4.post_ffw_norm.weight", Some("model.layers.4.post_feedforward_layernorm.weight")),
            ("gemma3", "blk.2.attn_k_norm.weight", Some("model.layers.2.self_attn.k_norm.weight")),
            ("gemma3", "token_embd.weight", Some("model.embed_tokens.weight")),
            ("gemma", "blk.0.post_ffw_norm.weight", None),
            ("gemma3", "blk.x.post_ffw_norm.weight", None),
        ] {
            assert_eq!(hf_name(arch, gguf).as_deref(), hf, "{arch} {gguf}");
            if let Some(hf) = hf {
                assert_eq!(gguf_name(arch, hf).as_deref(), Some(gguf), "{arch} {hf}");
            }
        }
    }
}
