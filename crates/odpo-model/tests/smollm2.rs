//! The real SmolLM2-135M-Instruct loaded from its llama.cpp GGUF file (Q4_1, dequantized at
//! load), checked against the outputs of HF transformers stored beside it in the shared folder:
//! logits rows, completion log-probabilities, greedy generation, and the tokenizer + chat template.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use burn::tensor::{Device, Int, Tensor, TensorData};
use common::*;
use odpo_model::generate::{GenerationConfig, SamplingConfig, generate};
use odpo_model::logprobs::sequence_logprobs;
use odpo_model::tokenizer::{ChatMessage, Tokenizer};
use odpo_model::{CausalLm, LoadedModel};

fn model_dir() -> Option<PathBuf> {
    shared_dir().map(|d| d.join("models/smollm2-135m-instruct"))
}

fn load(dir: &std::path::Path, device: &Device) -> LoadedModel {
    CausalLm::load(&dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"), device).unwrap()
}

/// One test for the whole model: loading 135M parameters is the slow part.
#[test]
fn smollm2_gguf_matches_transformers() {
    let Some(dir) = model_dir() else { return };
    let device = Device::default();
    let loaded = load(&dir, &device);
    let reference = read_safetensors(&dir.join("reference.safetensors"));
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();

    for (i, case) in json["cases"].as_array().unwrap().iter().enumerate() {
        let ids = &reference[&format!("case{i}.input_ids")];
        let n = ids.shape[0];
        let prompt_len = case["prompt_len"].as_u64().unwrap() as usize;

        // The tokenizer and chat template reproduce the reference input ids.
        let prompt = tok
            .apply_chat_template(&[ChatMessage { role: "user".into(), content: case["user"].as_str().unwrap().into() }], true)
            .unwrap();
        assert_eq!(prompt, case["prompt_text"].as_str().unwrap());
        let mut ours = tok.encode(&prompt, false).unwrap();
        assert_eq!(ours.len(), prompt_len, "case {i}: prompt length");
        ours.extend(tok.encode(case["completion_text"].as_str().unwrap(), false).unwrap());
        let want: Vec<u32> = ids.data.iter().map(|&x| x as u32).collect();
        assert_eq!(ours, want, "case {i}: input ids");

        // Logits rows from the prompt's last position to the end.
        let input = Tensor::<2, Int>::from_data(TensorData::new(ids.data.iter().map(|&x| x as i64).collect::<Vec<_>>(), [1, n]), &device);
        let mask = Tensor::<2, Int>::ones([1, n], &device);
        let logits = loaded.model.forward(input.clone(), &mask, None);
        let v = logits.dims()[2];
        let rows = to_vec(logits.clone().narrow(1, prompt_len - 1, n - prompt_len + 1));
        let want = &reference[&format!("case{i}.logits_from_prompt_end")];
        assert_eq!(rows.len(), want.data.len());
        let worst = rows.iter().zip(&want.data).map(|(a, b)| (f64::from(*a) - b).abs()).fold(0.0, f64::max);
        println!("case {i}: max |logit diff| {worst:.2e} over {} rows x {v}", want.shape[0]);
        assert!(worst < 2e-3, "case {i}: logits differ by {worst}");

        // Summed completion log-probability.
        let lm: Vec<f32> = (0..n).map(|t| if t >= prompt_len { 1.0 } else { 0.0 }).collect();
        let (sum, count) = sequence_logprobs(logits, input, Tensor::from_data(TensorData::new(lm, [1, n]), &device));
        let sum = f64::from(to_vec(sum)[0]);
        let want = case["completion_logprob_sum"].as_f64().unwrap();
        println!("case {i}: completion log-prob {sum:.5} vs {want:.5}");
        assert!((sum - want).abs() < 1e-2, "case {i}: {sum} vs {want}");
        assert_eq!(to_vec(count)[0] as usize, n - prompt_len);
    }

    // Greedy generation reproduces transformers' tokens exactly.
    let prompt: Vec<u32> = reference["greedy.prompt_ids"].data.iter().map(|&x| x as u32).collect();
    let want: Vec<u32> = reference["greedy.new_ids"].data.iter().map(|&x| x as u32).collect();
    let rendered = tok.chat_prompt(json["greedy"]["user"].as_str().unwrap()).unwrap();
    assert_eq!(tok.encode(&rendered, false).unwrap(), prompt);
    let cfg = GenerationConfig {
        max_new_tokens: 24,
        eos_token_ids: vec![tok.eos_token_id().unwrap()],
        pad_token_id: tok.pad_token_id().unwrap(),
        sampling: SamplingConfig { greedy: true, ..Default::default() },
    };
    let out = generate(&loaded.model, std::slice::from_ref(&prompt), &cfg, &device).unwrap();
    assert_eq!(out.tokens[0], want);
    assert_eq!(tok.decode(&out.tokens[0], false).unwrap(), json["greedy"]["text"].as_str().unwrap());

    // The same prompt in a left-padded batch beside a longer one generates the same tokens.
    let longer = tok.encode(&tok.chat_prompt("Write a haiku about the sea, please, in English.").unwrap(), false).unwrap();
    let batch = generate(&loaded.model, &[longer, prompt], &cfg, &device).unwrap();
    assert_eq!(batch.tokens[1], want, "left padding changed the greedy tokens");
}
