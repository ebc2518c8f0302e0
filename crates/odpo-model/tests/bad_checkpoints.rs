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
