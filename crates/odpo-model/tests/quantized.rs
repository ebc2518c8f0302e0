//! LoRA over a block-quantised base (`odpo_model::quantized`): the quantised model gives the
//! outputs of its dequantised twin (the same values in f32), and adapters on it get the twin's
//! gradients, while the base stays quantised.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use burn::module::{Module, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use common::*;
use odpo_model::{CausalLm, LoraConfig};

fn tmp(name: &str) -> Scratch {
    scratch(&format!("quantized-{name}"))
}

fn flex() -> Device {
    odpo_model::backend::device("flex").unwrap()
}

/// A safetensors base quantised to Q8_0 at load: the same logits as the f32 model holding the
/// quantised values, and adapters with the same gradients.
#[test]
fn lora_over_a_quantized_base_matches_its_dequantized_twin() {
    let device = flex().autodiff();
    let exp = read_safetensors(&fixture("llama_gqa_untied").join("expected.safetensors"));
    let quantized = CausalLm::load_with(&fixture("llama_gqa_untied"), &device, true).unwrap();
    assert!(quantized.model.has_quantized_base());
    // Its twin: the dequantised values saved as f32 and loaded as a plain model.
    let dir = tmp("twin");
    quantized.model.save_hf(&quantized.config, &dir).unwrap();
    let twin = CausalLm::load(&dir, &device).unwrap().model;
    std::fs::remove_dir_all(&dir).ok();
    assert!(!twin.has_quantized_base());

    let (ids, mask) = (int2(&exp["input_ids"], &device), int2(&exp["attention_mask"], &device));
    let same = max_abs(quantized.model.forward(ids.clone(), &mask, None), twin.forward(ids.clone(), &mask, None));
    let q8_error = max_diff_logits(&quantized.model, &exp, "", &device);
    println!("quantised base against its twin: {same:.2e}; against transformers' f32 logits (Q8_0 rounding): {q8_error:.2e}");
    assert!(same < 1e-4, "the quantised base's logits differ from its twin's by {same}");
    assert!(q8_error < 0.25, "Q8_0 moved the logits by {q8_error}");

    let cfg = LoraConfig { rank: 4, alpha: 8.0, seed: 3, ..LoraConfig::default() };
    // The base stays quantised with adapters attached, and in the reference made of it.
    let adapted = quantized.model.clone().with_lora(&cfg, &device).unwrap();
    assert!(adapted.has_quantized_base(), "attaching adapters dequantised the base");
    assert!(adapted.without_adapters().valid().has_quantized_base(), "the reference's base is not quantised");
    // burn's `fork` dequantises a quantised tensor; `fork_to` keeps the base.
    assert!(adapted.clone().valid().fork_to(&flex()).has_quantized_base(), "fork_to dequantised the base");
    let run = |m: &CausalLm| {
        let adapted = m.clone().with_lora(&cfg, &device).unwrap();
        // Adapters start with B = 0; give them a value so that both factors get gradients.
        let adapted = adapted.map(&mut Nudge);
        let logits = adapted.forward(ids.clone(), &mask, None);
        let grads = GradientsParams::from_grads((logits.clone() * logits).mean().backward(), &adapted);
        param_grads(&adapted, &grads)
    };
    let (g, want) = (run(&quantized.model), run(&twin));
    assert_eq!(g.len(), 2 * 7 * 2, "A and B of 7 projections in 2 layers");
    assert_eq!(g.len(), want.len());
    for (i, (a, b)) in g.iter().zip(&want).enumerate() {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 1e-4 * scale, "adapter gradient {i}: max |diff| {diff} against a scale of {scale}");
    }
}

/// Sets every LoRA `B` (zero when fresh) to a small constant, keeping it trainable.
struct Nudge;
impl burn::module::ModuleMapper for Nudge {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if !param.is_require_grad() {
            return param;
        }
        param.map(|t| if t.clone().abs().max().into_scalar::<f32>() == 0.0 { t.add_scalar(0.01).detach().require_grad() } else { t })
    }
}

fn max_abs<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f64 {
    to_vec(a).iter().zip(to_vec(b)).fold(0.0, |m, (x, y)| m.max(f64::from((x - y).abs())))
}

/// The real SmolLM2 Q4_1 file with its projections kept in their blocks: the logits of the
/// dequantised load, and a base of about 1.1 bytes a projection weight.
#[test]
fn smollm2_q4_1_base_keeps_the_files_blocks() {
    let Some(gguf) = shared_path("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    let device = flex();
    let blocks = CausalLm::load_with(&gguf, &device, true).unwrap().model;
    let plain = CausalLm::load(&gguf, &device).unwrap().model;
    assert!(blocks.has_quantized_base() && !plain.has_quantized_base());
    let ids = Tensor::<2, burn::tensor::Int>::from_data([[1i64, 504, 3458, 314, 260, 1345, 30, 216, 2, 105]], &device);
    let mask = ids.clone().ones_like();
    let (a, b) = (blocks.forward(ids.clone(), &mask, None), plain.forward(ids, &mask, None));
    let scale = to_vec(b.clone()).iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = max_abs(a, b);
    println!("SmolLM2 Q4_1: |logits| up to {scale:.1}; blocks against dequantised: {diff:.2e}");
    assert!(diff < 1e-3, "the Q4_1 base's logits differ from the dequantised model's by {diff}");
}
