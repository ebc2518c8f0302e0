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

const CASES: &[(&str, &str)] = &[("gpt2", "gpt2"), ("llama_rslora", "llama_gqa_untied"), ("qwen2_all", "qwen2_bias"), ("phi3_fused", "phi3_longrope"), ("phi_all", "phi_qk_norm"), ("qwen2_moe_shared", "qwen2_moe_shared"), ("qwen3_moe_experts", "qwen3_moe"), ("mixtral_experts", "mixtral_moe")];

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
        let ids = int2(&exp["input_ids"], &device);
        let mask = int2(&exp["attention_mask"], &device);
        // The cases on the experts keep no base logits (the repository's size): the base model's
        // own, which the parity tests hold to transformers', bit for bit.
        let without = match exp.get("base_logits") {
            Some(base) => {
                let mut base_exp = exp.clone();
                base_exp.insert("logits".into(), base.clone());
                max_diff_logits(&adapted.without_adapters(), &base_exp, "", &device)
            }
            None => {
                assert_eq!(to_vec(adapted.without_adapters().forward(ids.clone(), &mask, None)), to_vec(model.forward(ids.clone(), &mask, None)), "{case}");
                0.0
            }
        };
        // The adapters matter: the base model is far from PEFT's adapted logits.
        let moved = max_diff_logits(&model, &exp, "", &device);
        println!("{case}: rank {} on {} projections and {:?}; |diff| with adapters {with:.2e}, without {without:.2e}; adapters move logits by {moved:.2}", cfg.rank, cfg.targets.len(), cfg.target_parameters);
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
        assert_eq!(to_vec(adapted.forward(ids.clone(), &mask, None)), to_vec(again.forward(ids, &mask, None)), "{case}: save + load changed the logits");
        // What odpo writes is PEFT's file: the same tensors under the same names, the experts'
        // stacks nested as PEFT nests them.
        let (ours, peft) = (read_safetensors(&out.join("adapter_model.safetensors")), read_safetensors(&dir.join("adapter_model.safetensors")));
        let sorted = |m: &std::collections::HashMap<String, Arr>| {
            let mut k: Vec<String> = m.keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(sorted(&ours), sorted(&peft), "{case}");
        for (k, t) in &peft {
            assert_eq!((&ours[k].shape, &ours[k].data), (&t.shape, &t.data), "{case}: {k}");
        }
        let mut params = cfg2.target_parameters.clone();
        params.sort();
        let peft_cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
        let mut want: Vec<String> = peft_cfg["target_parameters"].as_array().map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect()).unwrap_or_default();
        want.sort();
        assert_eq!(params, want, "{case}");
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
}

/// PEFT's LoRA of parameters on the experts and routers (`lora.target_parameters`): fresh adapters
/// change nothing, train alone (the gradient reaching each expert's and the router's), come off
/// exactly, merge, save in PEFT's layout and load back; bad input is named.
#[test]
fn expert_adapters_train_merge_save_and_name_bad_input() {
    let device = Device::default();
    let ad = device.clone().autodiff();
    let dir = fixture("qwen3_moe");
    let exp = read_safetensors(&dir.join("expected.safetensors"));
    let base = CausalLm::load(&dir, &device).unwrap().model;
    let params = ["mlp.experts.gate_up_proj", "experts.down_proj", "model.layers.1.mlp.gate.weight"];
    let cfg = LoraConfig { rank: 2, alpha: 4.0, targets: vec![], target_parameters: params.iter().map(|p| p.to_string()).collect(), ..LoraConfig::default() };
    let mut policy = CausalLm::load(&dir, &ad).unwrap().model.with_lora(&cfg, &ad).unwrap();
    let (ids, mask, comp) = (int2(&exp["input_ids"], &device), int2(&exp["attention_mask"], &device), float2(&exp["completion_mask"], &device));
    let logps = |m: &CausalLm| to_vec(sequence_logprobs(m.forward(ids.clone(), &mask, None), ids.clone(), comp.clone()).0);
    assert!(policy.has_adapters());
    assert_eq!(logps(&policy.valid()), logps(&base), "a fresh adapter changed the outputs");
    let mut optim = AdamWConfig::new().init();
    let (ids_ad, mask_ad) = (int2(&exp["input_ids"], &ad), int2(&exp["attention_mask"], &ad));
    for step in 0..3 {
        let (sum, _) = sequence_logprobs(policy.forward(ids_ad.clone(), &mask_ad, None), ids_ad.clone(), float2(&exp["completion_mask"], &ad));
        let grads = GradientsParams::from_grads(sum.sum().neg().backward(), &policy);
        let names = grad_names(&policy, &grads);
        assert!(names.iter().all(|n| n.contains("lora")), "gradients outside the adapters: {names:?}");
        if step > 0 {
            // After a step every B is nonzero and every adapter has a gradient: 2 layers × 6
            // experts × (gate-up, down) and one router, each an A and a B.
            assert_eq!(names.len(), 2 * (2 * 6 * 2) + 2, "{names:?}");
            assert!(names.iter().any(|n| n.contains("gate_up_lora")) && names.iter().any(|n| n.contains("down_proj.lora")) && names.iter().any(|n| n.contains("gate.lora")), "{names:?}");
        }
        policy = optim.step(1e-2, policy, grads);
    }
    let trained = policy.valid();
    let moved = logps(&trained).iter().zip(logps(&base)).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(moved > 1e-3, "training did not move the adapted model ({moved})");
    assert_eq!(logps(&trained.without_adapters()), logps(&base), "adapters off differs from the base model");
    let merged = trained.clone().merge_adapters();
    assert!(!merged.has_adapters());
    let m = logps(&merged).iter().zip(logps(&trained)).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(m < 1e-4, "merged log-probabilities differ by {m}");

    // `ODPO_KEEP_LORA=DIR` keeps the trained adapters, with odpo's logits from them, in
    // `DIR/qwen3_moe_trained` for `tests/fixtures/check_peft_saved.py` (PEFT loading them).
    let keep = std::env::var_os("ODPO_KEEP_LORA").map(|d| std::path::PathBuf::from(d).join("qwen3_moe_trained"));
    let tmp_out = tmp("experts-trained");
    let out = keep.clone().unwrap_or_else(|| tmp_out.to_path_buf());
    trained.save_peft(&cfg, "qwen3_moe", &out).unwrap();
    if keep.is_some() {
        let mut logits = odpo_model::weights::HfTensors::default();
        logits.push("logits", trained.forward(ids.clone(), &mask, None));
        logits.write(&out.join("odpo_logits.safetensors")).unwrap();
    }
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    // The stacks in every sparse layer by their names in the layer; the one router by its full name.
    assert_eq!(json["target_parameters"], serde_json::json!(["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "model.layers.1.mlp.gate.weight"]));
    assert_eq!(json["target_modules"], serde_json::json!([]));
    let st = read_safetensors(&out.join("adapter_model.safetensors"));
    assert_eq!(st["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape, vec![6 * 2, 16]);
    assert_eq!(st["base_model.model.model.layers.0.mlp.experts.lora_B.weight"].shape, vec![16, 2 * 6]);
    assert_eq!(st["base_model.model.model.layers.1.mlp.gate.lora_B.weight"].shape, vec![6, 2]);
    assert_eq!(st.len(), 2 * 4 + 2);
    let (again, _) = base.clone().load_peft(&out, &device).unwrap();
    // Loading gives back exactly the trained adapters: saving them again writes the same bytes. The
    // outputs agree to rounding only, since a matrix product's summation order may follow where
    // its operands lie in memory.
    let tmp_again = tmp("experts-again");
    again.save_peft(&cfg, "qwen3_moe", &tmp_again).unwrap();
    let bytes = |d: &std::path::Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert!(bytes(&tmp_again) == bytes(&out), "save + load + save changed the adapters");
    let d = logps(&again).iter().zip(logps(&trained)).map(|(a, b)| (a - b).abs() / b.abs()).fold(0.0f32, f32::max);
    assert!(d < 1e-6, "save + load changed the log-probabilities by {d} (relative)");

    // Bad input, named.
    let err = |cfg: LoraConfig, model: &CausalLm| model.clone().with_lora(&cfg, &device).unwrap_err().to_string();
    let e = err(LoraConfig { dropout: 0.1, ..cfg.clone() }, &base);
    assert!(e.contains("lora.dropout") && e.contains("target_parameters"), "{e}");
    let e = err(LoraConfig { target_parameters: vec!["mlp.experts.w1".into()], ..cfg.clone() }, &base);
    assert!(e.contains("lora.target_parameters: `mlp.experts.w1` matches no parameter") && e.contains("mlp.experts.gate_up_proj"), "{e}");
    let e = err(LoraConfig { rank: 8, target_parameters: vec!["gate.weight".into()], ..cfg.clone() }, &base);
    assert!(e.contains("lora.rank") && e.contains("model.layers.0.mlp.gate.weight"), "{e}");
    let dense = CausalLm::load(&fixture("llama_gqa_untied"), &device).unwrap().model;
    let e = err(cfg.clone(), &dense);
    assert!(e.contains("has no mixture of experts"), "{e}");
    // An adapter file without the tensors its config names, and a config naming what the model lacks.
    let broken = tmp("experts-missing");
    std::fs::create_dir_all(&broken).unwrap();
    let peft = fixture("lora").join("mixtral_experts");
    std::fs::copy(peft.join("adapter_model.safetensors"), broken.join("adapter_model.safetensors")).unwrap();
    let mixtral = CausalLm::load(&fixture("mixtral_moe"), &device).unwrap().model;
    for (params, want) in [
        (r#"["mlp.experts.down_proj", "mlp.experts.gate_up_proj", "mlp.gate.weight"]"#, "has no `base_model.model.model.layers.0.mlp.gate.lora_A.weight`"),
        (r#"["mlp.experts.gate_proj"]"#, "target_parameters: `mlp.experts.gate_proj` names no parameter"),
        (r#"["mlp.experts.down_proj"]"#, "does not name a projection"),
        (r#""mlp.gate.weight""#, "expected a list of parameter names"),
    ] {
        std::fs::write(broken.join("adapter_config.json"), format!(r#"{{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": [], "target_parameters": {params}}}"#)).unwrap();
        let e = mixtral.clone().load_peft(&broken, &device).unwrap_err().to_string();
        assert!(e.contains(want), "{params}: {e}");
    }
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
