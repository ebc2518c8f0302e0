//! Broken HF checkpoints give errors that name the file and the tensor or key; nothing panics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use burn::tensor::Device;
use common::{Scratch, fixture, scratch};
use odpo_model::CausalLm;

/// A copy of the tiny GPT-2 fixture in a fresh temporary folder.
fn copy_gpt2(name: &str) -> Scratch {
    let dir = scratch(&format!("bad-{name}"));
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("gpt2").join(f), dir.join(f)).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> String {
    match CausalLm::load(dir, &Device::default()) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrites `model.safetensors` keeping only the tensors `keep` accepts, reshaped by `reshape`.
fn rewrite(dir: &Path, keep: impl Fn(&str) -> bool, reshape: impl Fn(&str, Vec<usize>) -> Vec<usize>) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let owned: Vec<(String, Vec<usize>, Vec<u8>, safetensors::Dtype)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| keep(n))
        .map(|(n, v)| {
            let shape = reshape(&n, v.shape().to_vec());
            let n_bytes = shape.iter().product::<usize>() * 4;
            let mut data = v.data().to_vec();
            data.resize(n_bytes, 0);
            (n, shape, data, v.dtype())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(n, s, d, t)| (n.clone(), safetensors::tensor::TensorView::new(*t, s.clone(), d).unwrap()))
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_gpt2("missing");
    rewrite(&dir, |n| n != "transformer.h.1.mlp.c_fc.weight", |_, s| s);
    let msg = load_err(&dir);
    assert!(msg.contains("model.safetensors: missing tensor `transformer.h.1.mlp.c_fc.weight`"), "{msg}");
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() {
    let dir = copy_gpt2("shape");
    rewrite(&dir, |_| true, |n, s| if n == "transformer.h.0.attn.c_proj.weight" { vec![s[0], s[1] - 1] } else { s });
    let msg = load_err(&dir);
    assert!(msg.contains("tensor `transformer.h.0.attn.c_proj.weight` has shape [64, 63], expected [64, 64]"), "{msg}");
}

#[test]
fn truncated_file_is_an_error_at_every_cut() {
    let dir = copy_gpt2("truncated");
    let path = dir.join("model.safetensors");
    let full = std::fs::read(&path).unwrap();
    for cut in [0, 7, 8, 100, full.len() / 2, full.len() - 1] {
        std::fs::write(&path, &full[..cut]).unwrap();
        let msg = load_err(&dir);
        assert!(msg.contains("model.safetensors"), "cut {cut}: {msg}");
    }
}

#[test]
fn unknown_architecture_and_bad_config_are_named() {
    let dir = copy_gpt2("arch");
    std::fs::write(dir.join("config.json"), r#"{"architectures": ["BertForMaskedLM"], "vocab_size": 10}"#).unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains("config.json: unknown architecture `BertForMaskedLM`"), "{msg}");

    std::fs::write(dir.join("config.json"), r#"{"architectures": ["GPT2LMHeadModel"], "vocab_size": "many"}"#).unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains("config.json: vocab_size: invalid type: string \"many\", expected usize"), "{msg}");

    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains("config.json"), "{msg}");

    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::copy(fixture("gpt2").join("config.json"), dir.join("config.json")).unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains("neither model.safetensors nor model.safetensors.index.json"), "{msg}");
}

#[test]
fn sharded_index_naming_a_missing_shard_is_an_error() {
    let dir = scratch("bad-shard");
    for entry in std::fs::read_dir(fixture("llama_sharded")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::remove_file(dir.join("model-00002-of-00005.safetensors")).unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains("model-00002-of-00005.safetensors"), "{msg}");
}

#[test]
fn a_file_that_is_not_a_gguf_is_refused_as_a_model() {
    // A folder's own files named where the folder belongs: the config, the weights.
    let dir = copy_gpt2("file-as-model");
    for f in ["config.json", "model.safetensors"] {
        let msg = load_err(&dir.join(f));
        let expected = format!("{}: is a file; expected a HF model folder (config.json and model.safetensors) or a llama.cpp `.gguf` file", dir.join(f).display());
        assert_eq!(msg, expected);
    }
}

/// Causal-mask buffers that older checkpoints store (boolean or float) are skipped, not errors.
#[test]
fn stored_mask_buffers_are_ignored() {
    let dir = copy_gpt2("maskbuf");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mask = vec![1u8; 64 * 64];
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors();
    views.push((
        "transformer.h.0.attn.bias".into(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::BOOL, vec![1, 1, 64, 64], &mask).unwrap(),
    ));
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(&path, out).unwrap();
    assert!(CausalLm::load(&dir, &Device::default()).is_ok());
}

/// Sizes no model can have (a zero width, heads that do not divide it, an odd head for the
/// rotation) and a norm's epsilon of 0 are errors naming the key, in every family, where they used to panic inside a tensor
/// operation; the fixture's own config still builds.
#[test]
fn sizes_a_model_cannot_have_are_named_in_every_family() {
    let cases: [(&str, &str, serde_json::Value, &str); 24] = [
        ("gpt2", "n_embd", 0.into(), "n_embd is 0; expected at least 1"),
        ("gpt2", "n_head", 3.into(), "n_embd (64) must be a multiple of n_head (3)"),
        ("gpt2", "vocab_size", 0.into(), "vocab_size is 0; expected at least 1"),
        ("gpt_neo_local", "hidden_size", 0.into(), "hidden_size is 0; expected at least 1"),
        ("gptj", "n_inner", 0.into(), "n_inner is 0; expected at least 1"),
        ("gpt_neox_parallel", "intermediate_size", 0.into(), "intermediate_size is 0; expected at least 1"),
        ("llama_gqa_untied", "num_attention_heads", 0.into(), "num_attention_heads is 0; expected at least 1"),
        ("llama_gqa_untied", "num_key_value_heads", 0.into(), "num_key_value_heads is 0; expected at least 1"),
        ("llama_gqa_untied", "head_dim", 7.into(), "is 7; expected an even number"),
        ("qwen3_qk_norm", "intermediate_size", 0.into(), "intermediate_size is 0; expected at least 1"),
        ("mistral_window", "rms_norm_eps", 0.into(), "rms_norm_eps is 0; expected a positive number"),
        ("gemma3_text", "head_dim", 3.into(), "head_dim is 3; expected an even number"),
        ("gemma3_text", "vocab_size", 0.into(), "vocab_size is 0; expected at least 1"),
        ("phi2", "intermediate_size", 0.into(), "intermediate_size is 0; expected at least 1"),
        ("phi_qk_norm", "num_key_value_heads", 3.into(), "hidden_size (32) must be a multiple of num_attention_heads (4), and that a multiple of num_key_value_heads (3)"),
        ("stablelm_parallel", "num_key_value_heads", 3.into(), "hidden_size (32) must be a multiple of num_attention_heads (4), and that a multiple of num_key_value_heads (3)"),
        ("stablelm2", "layer_norm_eps", 0.into(), "layer_norm_eps is 0; expected a positive number"),
        ("phi2", "num_attention_heads", 32.into(), "0 dims of each head rotate (head_dim × partial_rotary_factor); expected an even number from 2 to the head size (1)"),
        // Mixtures of experts: more experts a token than there are, none, a width of 0, a layer
        // past the model, a step of 0.
        ("mixtral_moe", "num_experts_per_tok", 5.into(), "num_experts_per_tok is 5; expected 1 to num_local_experts (4)"),
        ("qwen2_moe_shared", "num_experts_per_tok", 0.into(), "num_experts_per_tok is 0; expected 1 to num_experts (4)"),
        ("qwen3_moe", "moe_intermediate_size", 0.into(), "moe_intermediate_size is 0; expected at least 1"),
        ("qwen2_moe_shared", "shared_expert_intermediate_size", 0.into(), "shared_expert_intermediate_size is 0; expected at least 1"),
        ("qwen2_moe_shared", "mlp_only_layers", serde_json::json!([1, 2]), "mlp_only_layers lists layer 2; the model has 2 (0 to 1)"),
        ("qwen3_moe", "decoder_sparse_step", 0.into(), "decoder_sparse_step is 0; expected at least 1"),
    ];
    let device = Device::default();
    for (case, key, value, want) in cases {
        let path = fixture(case).join("config.json");
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let config = odpo_model::ModelConfig::from_hf_json(&json, &path).unwrap();
        CausalLm::random(&config, 0, &device).unwrap_or_else(|e| panic!("{case}'s own config: {e}"));
        json[key] = value;
        let config = odpo_model::ModelConfig::from_hf_json(&json, &path).unwrap();
        match CausalLm::random(&config, 0, &device) {
            Ok(_) => panic!("{case} with {key} = {}: built", json[key]),
            Err(e) => assert!(e.to_string().contains(want), "{case} with {key} = {}: {e}", json[key]),
        }
    }
    // Loaded from a folder, the error names its config file, whose value it is, not the weights.
    let dir = copy_gpt2("heads");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    json["n_head"] = 3.into();
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains("config.json: n_embd (64) must be a multiple of n_head (3)"), "{msg}");
}
