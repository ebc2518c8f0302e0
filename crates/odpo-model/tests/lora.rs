//! LoRA against PEFT: adapters PEFT made (`tests/fixtures/make_lora_fixtures.py`) load and give
//! PEFT's logits; merging, saving in PEFT's layout and removing the adapters; only the adapters
//! train.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Tensor};
use common::*;
use odpo_model::logprobs::sequence_logprobs;
use odpo_model::{CausalLm, LoraConfig};

const CASES: &[(&str, &str)] = &[("gpt2", "gpt2"), ("llama_rslora", "llama_gqa_untied"), ("qwen2_all", "qwen2_bias"), ("phi3_fused", "phi3_longrope"), ("phi_all", "phi_qk_norm"), ("qwen2_moe_shared", "qwen2_moe_shared")];

fn tmp(name: &str) -> Scratch {
    scratch(&format!("lora-{name}"))
}

#[test]
fn peft_adapters_give_peft_logits() {
    let device = Device::default();
    for (case, base) in CASES {
        let dir = fixture("lora").join(case);
        let exp = read_safetensors(&dir.join("expected.safetensors"));
        let model = CausalLm::load(&fixture(base), &device).unwrap().model;
        let (adapted, cfg) = model.clone().load_peft(&dir, &device).unwrap();
        let with = max_diff_logits(&adapted, &exp, "", &device);
        let mut base_exp = exp.clone();
        base_exp.insert("logits".into(), exp["base_logits"].clone());
        let without = max_diff_logits(&adapted.without_adapters(), &base_exp, "", &device);
        // The adapters matter: the base model is far from PEFT's adapted logits.
        let moved = max_diff_logits(&model, &exp, "", &device);
        println!("{case}: rank {} on {} projections; |diff| with adapters {with:.2e}, without {without:.2e}; adapters move logits by {moved:.2}", cfg.rank, cfg.targets.len());
        assert!(with < 1e-4, "{case}: adapted logits differ from PEFT's by {with}");
        assert!(without < 1e-4, "{case}: logits without adapters differ from the base by {without}");
        assert!(moved > 1e-1, "{case}: the fixture's adapters barely change the logits ({moved})");

        // Merged into the weights: the same logits, no adapters left.
        let merged = adapted.clone().merge_adapters();
        assert!(!merged.has_adapters());
        let m = max_diff_logits(&merged, &exp, "", &device);
        assert!(m < 1e-4, "{case}: merged logits differ from PEFT's by {m}");

        // Saved in PEFT's layout and read back: identical adapters, identical logits.
        let out = tmp(case);
        adapted.save_peft(&cfg, base, &out).unwrap();
        let (again, cfg2) = model.load_peft(&out, &device).unwrap();
        assert_eq!((cfg2.rank, cfg2.alpha, cfg2.rslora), (cfg.rank, cfg.alpha, cfg.rslora));
        let ids = int2(&exp["input_ids"], &device);
        let mask = int2(&exp["attention_mask"], &device);
        assert_eq!(to_vec(adapted.forward(ids.clone(), &mask, None)), to_vec(again.forward(ids, &mask, None)), "{case}: save + load changed the logits");
    }
}

/// The reference of a LoRA run is the model with its adapters removed: bit for bit the base model's
/// log-probabilities, even after the adapters were trained.
#[test]
fn adapters_off_is_exactly_the_base_model() {
    let device = Device::default();
    let ad = device.clone().autodiff();
    for case in ["llama_gqa_untied", "gpt2", "gpt_neox_parallel"] {
        let dir = fixture(case);
        let exp = read_safetensors(&dir.join("expected.safetensors"));
        let base = CausalLm::load(&dir, &device).unwrap().model;
        let cfg = LoraConfig { rank: 4, alpha: 8.0, ..LoraConfig::default() };
        let mut policy = CausalLm::load(&dir, &ad).unwrap().model.with_lora(&cfg, &ad).unwrap();
        let ids = int2(&exp["input_ids"], &device);
        let mask = int2(&exp["attention_mask"], &device);
        let comp = float2(&exp["completion_mask"], &device);
        let logps = |m: &CausalLm| to_vec(sequence_logprobs(m.forward(ids.clone(), &mask, None), ids.clone(), comp.clone()).0);
        // A fresh adapter (B = 0) changes nothing.
        assert_eq!(logps(&policy.valid()), logps(&base), "{case}: a fresh adapter changed the outputs");

        // A few optimizer steps on the adapters.
        let mut optim = AdamWConfig::new().init();
        let (ids_ad, mask_ad) = (int2(&exp["input_ids"], &ad), int2(&exp["attention_mask"], &ad));
        for _ in 0..3 {
            let (sum, _) = sequence_logprobs(policy.forward(ids_ad.clone(), &mask_ad, None), ids_ad.clone(), float2(&exp["completion_mask"], &ad));
            let loss = sum.sum().neg();
            let grads = GradientsParams::from_grads(loss.backward(), &policy);
            let names = grad_names(&policy, &grads);
            assert!(!names.is_empty() && names.iter().all(|n| n.contains("lora.a") || n.contains("lora.b")), "{case}: gradients outside the adapters: {names:?}");
            policy = optim.step(1e-2, policy, grads);
        }
        let trained = logps(&policy.valid());
        assert_ne!(trained, logps(&base), "{case}: training did not move the adapted model");
        assert_eq!(logps(&policy.without_adapters().valid()), logps(&base), "{case}: adapters off differs from the base model");
    }
}

/// Paths of the parameters that have a gradient.
fn grad_names(model: &CausalLm, grads: &GradientsParams) -> Vec<String> {
    struct V<'a> {
        grads: &'a GradientsParams,
        path: Vec<String>,
        out: Vec<String>,
    }
    impl ModuleVisitor for V<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if self.grads.get::<D>(param.id).is_some() {
                self.out.push(self.path.join("."));
            }
        }
    }
    let mut v = V { grads, path: Vec::new(), out: Vec::new() };
    model.visit(&mut v);
    v.out
}

/// A mixture of experts: adapters go where PEFT's `target_modules` put them on transformers 5's
/// models, on the attention, a dense layer's MLP and Qwen2-MoE's shared expert; never on a routed
/// expert or a router, which transformers 5 keeps as parameters (PEFT's `target_parameters`, refused
/// by name when an adapter holds them). `all-linear` leaves out the one-output shared-expert gate,
/// which a name still reaches.
#[test]
fn moe_adapters_leave_the_experts_and_routers_alone() {
    let device = Device::default();
    let model = CausalLm::load(&fixture("qwen2_moe_shared"), &device).unwrap().model;
    let names = model.projection_names();
    assert!(names.iter().all(|n| !n.contains(".experts.") && !n.ends_with("mlp.gate")), "{names:?}");
    let adapted = |targets: &[&str], rank: usize| {
        let cfg = LoraConfig { rank, targets: targets.iter().map(|t| t.to_string()).collect(), ..LoraConfig::default() };
        let out = tmp(&format!("moe-{}", targets.join("-")));
        model.clone().with_lora(&cfg, &device).unwrap().save_peft(&cfg, "base", &out).unwrap();
        let st = read_safetensors(&out.join("adapter_model.safetensors"));
        let mut keys: Vec<String> = st.keys().filter(|k| k.ends_with("lora_A.weight")).map(|k| k.trim_start_matches("base_model.model.").trim_end_matches(".lora_A.weight").to_string()).collect();
        keys.sort();
        keys
    };
    let all = adapted(&["all-linear"], 2);
    let layer0 = ["mlp.shared_expert.down_proj", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"];
    let layer1 = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"];
    let want: Vec<String> = layer0.iter().map(|p| format!("model.layers.0.{p}")).chain(layer1.iter().map(|p| format!("model.layers.1.{p}"))).collect();
    assert_eq!(all, want);
    assert_eq!(adapted(&["shared_expert_gate"], 1), ["model.layers.0.mlp.shared_expert_gate"]);
    let mixtral = CausalLm::load(&fixture("mixtral_moe"), &device).unwrap().model;
    let e = mixtral.with_lora(&LoraConfig { targets: vec!["w1".into(), "gate".into()], ..LoraConfig::default() }, &device).unwrap_err().to_string();
    assert!(e.contains("matches no projection") && e.contains("\"q_proj\""), "{e}");
    // PEFT's LoRA of the experts' and routers' parameters.
    let dir = tmp("moe-target-parameters");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), r#"{"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"], "target_parameters": ["gate_up_proj", "down_proj"]}"#).unwrap();
    let e = model.load_peft(&dir, &device).unwrap_err().to_string();
    assert!(e.contains("adapter_config.json") && e.contains("target_parameters: [\"gate_up_proj\", \"down_proj\"]: adapters on parameters"), "{e}");
}

#[test]
fn targets_select_projections_and_bad_input_is_named() {
    let device = Device::default();
    let model = CausalLm::load(&fixture("llama_gqa_untied"), &device).unwrap().model;
    let names = model.projection_names();
    assert_eq!(names.len(), 2 * 7);
    assert_eq!(names[0], "model.layers.0.self_attn.q_proj");

    let cfg = LoraConfig { rank: 2, targets: vec!["q_proj".into(), "v_proj".into()], ..LoraConfig::default() };
    let adapted = model.clone().with_lora(&cfg, &device).unwrap();
    let out = tmp("targets");
    adapted.save_peft(&cfg, "base", &out).unwrap();
    let st = read_safetensors(&out.join("adapter_model.safetensors"));
    let mut keys: Vec<&String> = st.keys().collect();
    keys.sort();
    assert_eq!(keys.len(), 2 * 2 * 2, "{keys:?}");
    assert_eq!(st["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].shape, vec![2, 64]);
    assert_eq!(st["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape, vec![32, 2]);
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(json["target_modules"], serde_json::json!(["q_proj", "v_proj"]));
    assert_eq!(json["r"], 2);

    // Wrong shapes in the adapter file are named.
    let gpt2_adapters = fixture("lora").join("gpt2");
    let e = model.clone().load_peft(&gpt2_adapters, &device).unwrap_err().to_string();
    assert!(e.contains("adapter_model.safetensors") && e.contains("does not name a projection"), "{e}");

    let e = model.clone().with_lora(&LoraConfig { targets: vec!["c_attn".into()], ..LoraConfig::default() }, &device).unwrap_err().to_string();
    assert!(e.contains("lora.targets") && e.contains("q_proj") && e.contains("down_proj"), "{e}");
    let e = model.clone().with_lora(&LoraConfig { rank: 0, ..LoraConfig::default() }, &device).unwrap_err().to_string();
    assert!(e.contains("lora.rank"), "{e}");
    let e = model.clone().with_lora(&LoraConfig { dropout: 1.0, ..LoraConfig::default() }, &device).unwrap_err().to_string();
    assert!(e.contains("lora.dropout"), "{e}");
    let e = model.load_peft(&tmp("nonexistent"), &device).unwrap_err().to_string();
    assert!(e.contains("adapter_config.json"), "{e}");
}
