//! What is particular to GPT-Neo, GPT-J, GPT-NeoX, Phi, StableLM and the mixtures of experts (tiny
//! random models made by `tests/fixtures/make_fixtures_neo.py` and `make_fixtures_moe.py`; their logits, log-probabilities and round trip are checked
//! with the other families in `parity.rs`): configs, the options that must matter, KV-cache
//! generation against full recomputation, and one preference (ODPO) training step per family.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Int, Tensor, TensorData};
use common::*;
use odpo_model::logprobs::sequence_logprobs;
use odpo_model::{CausalLm, ModelConfig};

const CASES: &[&str] = &["gpt_neo_local", "gptj", "gpt_neox_parallel", "gpt_neox_sequential", "phi2", "phi_qk_norm", "stablelm2", "stablelm_parallel", "mixtral_moe", "qwen2_moe_shared", "qwen3_moe"];

#[test]
fn configs_name_their_family() {
    for case in CASES {
        let cfg = ModelConfig::from_file(&fixture(case).join("config.json")).unwrap();
        let ok = match *case {
            "gpt_neo_local" => matches!(cfg, ModelConfig::GptNeo(_)),
            "gptj" => matches!(cfg, ModelConfig::Gptj(_)),
            "phi2" | "phi_qk_norm" => matches!(cfg, ModelConfig::Phi(_)),
            "stablelm2" | "stablelm_parallel" => matches!(cfg, ModelConfig::StableLm(_)),
            "mixtral_moe" | "qwen2_moe_shared" | "qwen3_moe" => matches!(&cfg, ModelConfig::Llama(c) if c.moe()),
            _ => matches!(cfg, ModelConfig::GptNeox(_)),
        };
        assert!(ok, "{case}: parsed as {cfg:?}");
        // The config written back names the same architecture and parses to the same config.
        let again = ModelConfig::from_hf_json(&cfg.to_hf_json(), "x".as_ref()).unwrap();
        assert_eq!(again, cfg, "{case}");
        // A freshly initialised model of the same shape has as many parameters and runs.
        let device = test_device();
        let fresh = CausalLm::random(&cfg, 0, &device).unwrap();
        let loaded = CausalLm::load(&fixture(case), &device).unwrap().model;
        assert_eq!(fresh.num_params(), loaded.num_params(), "{case}");
        let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 2, 3, 4], [1, 4]), &device);
        let logits = to_vec(fresh.forward(ids, &Tensor::<2, Int>::ones([1, 4], &device), None));
        assert!(logits.iter().all(|x| x.is_finite()), "{case}");
    }
}

#[test]
fn options_change_the_logits() {
    let device = test_device();
    let mutations: &[(&str, &str, serde_json::Value)] = &[
        ("gpt_neo_local", "window_size", serde_json::json!(64)),
        ("gpt_neo_local", "attention_types", serde_json::json!([[["global"], 3]])),
        ("gptj", "rotary_dim", serde_json::json!(16)),
        ("gpt_neox_parallel", "use_parallel_residual", serde_json::json!(false)),
        ("gpt_neox_sequential", "use_parallel_residual", serde_json::json!(true)),
        ("gpt_neox_parallel", "rope_parameters", serde_json::json!({"rope_type": "default", "rope_theta": 10000, "partial_rotary_factor": 1.0})),
        ("gpt_neox_sequential", "rope_parameters", serde_json::json!({"rope_type": "default", "rope_theta": 10000, "partial_rotary_factor": 0.5})),
        // Phi-2's 6 rotated dims of 16 against the whole head; the base, the linear scaling and
        // the head norms each lifted (exact gelu against its tanh approximation moves them by
        // 7e-4 only: the parity tests' 1e-4 tells the two apart).
        ("phi2", "rope_parameters", serde_json::json!({"rope_type": "default", "rope_theta": 10000, "partial_rotary_factor": 1.0})),
        ("phi_qk_norm", "rope_parameters", serde_json::json!({"rope_type": "default", "rope_theta": 500, "partial_rotary_factor": 0.5})),
        ("phi_qk_norm", "rope_parameters", serde_json::json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 10000, "partial_rotary_factor": 0.5})),
        ("phi_qk_norm", "qk_layernorm", serde_json::json!(false)),
        // StableLM: the sequential residual made parallel (the other way round needs a norm the
        // checkpoint has not), the head norms lifted, the rotated quarter widened to the whole head.
        ("stablelm2", "use_parallel_residual", serde_json::json!(true)),
        ("stablelm_parallel", "qk_layernorm", serde_json::json!(false)),
        ("stablelm2", "rope_parameters", serde_json::json!({"rope_type": "default", "rope_theta": 10000, "partial_rotary_factor": 1.0})),
    ];
    for (case, key, value) in mutations {
        let dir = fixture(case);
        let exp = read_safetensors(&dir.join("expected.safetensors"));
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        json[*key] = value.clone();
        let cfg = ModelConfig::from_hf_json(&json, &dir).unwrap();
        let mut weights = odpo_model::weights::Weights::from_hf_dir(&dir).unwrap();
        let model = CausalLm::from_weights(&cfg, &mut weights, &device).unwrap();
        let d = max_diff_logits(&model, &exp, "", &device);
        println!("{case} with {key} = {value}: max |diff| {d:.6e}");
        assert!(d > 1e-2, "{case}: setting {key} to {value} changed the logits by only {d}");
    }
}

#[test]
fn cached_generation_matches_full_recompute() {
    for case in CASES {
        check_cached_generation(case);
    }
}

/// Paths of every float parameter whose gradient is missing, non-finite or all zero.
fn bad_grads<M: Module>(model: &M, grads: &GradientsParams) -> (usize, Vec<String>) {
    struct Check<'a> {
        grads: &'a GradientsParams,
        path: Vec<String>,
        seen: usize,
        bad: Vec<String>,
    }
    impl ModuleVisitor for Check<'_> {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.seen += 1;
            let why = match self.grads.get::<D>(param.id) {
                None => Some("no gradient"),
                Some(g) => {
                    let v = to_vec(g);
                    if v.iter().any(|x| !x.is_finite()) {
                        Some("non-finite")
                    } else if v.iter().all(|&x| x == 0.0) {
                        Some("all zero")
                    } else {
                        None
                    }
                }
            };
            if let Some(why) = why {
                self.bad.push(format!("{}: {why}", self.path.join(".")));
            }
        }
    }
    let mut c = Check { grads, path: Vec::new(), seen: 0, bad: Vec::new() };
    model.visit(&mut c);
    (c.seen, c.bad)
}

/// One ODPO step per family: chosen and rejected in one `[2B, T]` forward, the loss
/// `-log σ(β·h - Δ)` with `h = (π_c - ref_c) - (π_r - ref_r)`, backward, a finite non-zero
/// gradient on every parameter, and one AdamW step that changes the weights and lowers the loss.
#[test]
fn preference_training_step_runs() {
    let base = test_device();
    let ad = base.clone().autodiff();
    let (beta, offset) = (0.1f32, 0.5f32);
    for case in CASES {
        let dir = fixture(case);
        let exp = read_safetensors(&dir.join("expected.safetensors"));
        let loaded = CausalLm::load(&dir, &ad).unwrap();
        let vocab = loaded.config.vocab_size();
        let model = loaded.model;
        // Chosen: the fixture's right-padded rows; rejected: the same prompts with other completions.
        let chosen = &exp["input_ids"];
        let comp = &exp["completion_mask"];
        let mut rejected = chosen.clone();
        for (i, x) in rejected.data.iter_mut().enumerate() {
            if comp.data[i] == 1.0 {
                *x = ((*x as usize * 7 + 3) % (vocab - 1) + 1) as f64;
            }
        }
        let [b, t] = [chosen.shape[0], chosen.shape[1]];
        let stack = |a: &Arr, c: &Arr| Arr { shape: vec![2 * b, t], data: [a.data.clone(), c.data.clone()].concat() };
        let ids = stack(chosen, &rejected);
        let mask = stack(&exp["attention_mask"], &exp["attention_mask"]);
        let loss_mask = stack(comp, comp);

        // The frozen reference: the same weights without autodiff.
        let reference = model.valid();
        let ref_lp = {
            let logits = reference.forward(int2(&ids, &base), &int2(&mask, &base), None);
            to_vec(sequence_logprobs(logits, int2(&ids, &base), float2(&loss_mask, &base)).0)
        };
        let ref_lp = Tensor::<1>::from_data(TensorData::new(ref_lp, [2 * b]), &ad);
        let loss_of = |m: &CausalLm| {
            let logits = m.forward(int2(&ids, &ad), &int2(&mask, &ad), None);
            let (lp, _) = sequence_logprobs(logits, int2(&ids, &ad), float2(&loss_mask, &ad));
            let ratio = lp - ref_lp.clone();
            let h = ratio.clone().narrow(0, 0, b) - ratio.narrow(0, b, b);
            burn::tensor::activation::log_sigmoid(h.mul_scalar(beta).sub_scalar(offset)).neg().mean()
        };

        let loss = loss_of(&model);
        let before = loss.clone().into_scalar::<f32>();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let (n_params, bad) = bad_grads(&model, &grads);
        assert!(n_params > 0);
        assert!(bad.is_empty(), "{case}: {} of {n_params} parameters have bad gradients: {bad:?}", bad.len());

        let w0 = flat_params(&model);
        let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
        let model = optim.step(1e-3, model, grads);
        let w1 = flat_params(&model);
        assert_ne!(w0, w1, "{case}: the AdamW step left the weights unchanged");
        let after = loss_of(&model).into_scalar::<f32>();
        println!("{case}: {n_params} parameter tensors, ODPO loss {before:.5} -> {after:.5} after one AdamW step");
        assert!(after < before, "{case}: loss did not decrease ({before} -> {after})");
    }
}

/// A flat copy of every parameter, to compare weights before and after a step.
fn flat_params(model: &CausalLm) -> Vec<f32> {
    struct Collect(Vec<f32>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.extend(to_vec(param.val()));
        }
    }
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}
