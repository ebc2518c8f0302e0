//! Parity with HF transformers on tiny random models of every family, made by
//! `tests/fixtures/make_fixtures.py`, `make_fixtures_neo.py` and `make_fixtures_moe.py`:
//! logits on right- and left-padded batches within 1e-4, completion log-probabilities (with the LM
//! head in one call and in runs of a few rows, with WPO's per-row means against transformers' logits),
//! and the save -> load round trip.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use burn::optim::GradientsParams;
use common::*;
use odpo_model::{CausalLm, Module};
use odpo_model::logprobs::{completion_rows, head_logprobs, head_outputs, sequence_logprobs, wpo_row_means};

const CASES: &[&str] = &[
    "gpt2",
    "llama_gqa_untied",
    "llama3_rope",
    "qwen2_bias",
    "llama_sharded",
    "qwen3_qk_norm",
    "mistral_window",
    "qwen2_window",
    "gemma",
    "gemma2_softcap",
    "gemma3_text",
    "gemma2_llamacpp",
    "gemma3_llamacpp",
    "gpt_neo_local",
    "gptj",
    "gpt_neox_parallel",
    "gpt_neox_sequential",
    "olmo2",
    "smollm3_nope",
    "granite_scales",
    "smollm3_llamacpp",
    "phi3_longrope",
    "phi3_short",
    "phi3_llamacpp",
    "llama_yarn",
    "qwen2_yarn",
    "llama_linear",
    "olmo3",
    "olmo3_llamacpp",
    "phi2",
    "phi_qk_norm",
    "stablelm2",
    "stablelm_parallel",
    "mixtral_moe",
    "qwen2_moe_shared",
    "qwen2_moe_llamacpp",
    "qwen3_moe",
];

#[test]
fn logits_match_transformers_on_padded_batches() {
    let device = test_device();
    for case in CASES {
        let dir = fixture(case);
        let exp = read_safetensors(&dir.join("expected.safetensors"));
        let model = CausalLm::load(&dir, &device).unwrap().model;
        let right = max_diff_logits(&model, &exp, "", &device);
        let left = max_diff_logits(&model, &exp, "left_", &device);
        println!("{case}: max |diff| right-padded {right:.2e}, left-padded {left:.2e}");
        assert!(right < 1e-4, "{case}: right-padded logits differ by {right}");
        assert!(left < 1e-4, "{case}: left-padded logits differ by {left}");
    }
}

#[test]
fn completion_logprobs_match_transformers() {
    let device = test_device();
    for case in CASES {
        let dir = fixture(case);
        let exp = read_safetensors(&dir.join("expected.safetensors"));
        let model = CausalLm::load(&dir, &device).unwrap().model;
        for prefix in ["", "left_"] {
            let ids = int2(&exp[&format!("{prefix}input_ids")], &device);
            let logits = model.forward(ids.clone(), &int2(&exp[&format!("{prefix}attention_mask")], &device), None);
            let mask_t = &exp[&format!("{prefix}completion_mask")];
            let (sum, count) = sequence_logprobs(logits, ids.clone(), float2(mask_t, &device));
            // The LM head on completion columns only, from the first one any row has (and from
            // column 1, which runs it everywhere): the same sums.
            let t = ids.dims()[1];
            let first = (1..t).find(|&c| mask_t.data.chunks_exact(t).any(|row| row[c] > 0.5)).unwrap_or(t);
            let attn = int2(&exp[&format!("{prefix}attention_mask")], &device);
            // With WPO's means: from the same head calls, against f64 values from transformers' logits.
            let heads: Vec<_> = [first, 1].iter().map(|&f| completion_rows(&model, ids.clone(), &attn, float2(mask_t, &device), f, odpo_model::logprobs::RowExtras { wpo: true, ..Default::default() })).collect();
            let (sums, means): (Vec<_>, Vec<_>) = heads.into_iter().map(|r| (to_vec(r.sum), to_vec(r.wpo.unwrap()))).unzip();
            let want_means = wpo_means_from_logits(&exp, prefix);
            for (i, (s, c)) in to_vec(sum).iter().zip(to_vec(count)).enumerate() {
                let want = exp["completion_logprob_sum"].data[i];
                assert!((f64::from(*s) - want).abs() < 1e-4, "{case} {prefix}row {i}: {s} vs {want}");
                assert_eq!(f64::from(c), exp["completion_token_count"].data[i], "{case} row {i}");
                for ((h, m), f) in sums.iter().zip(&means).zip([first, 1]) {
                    assert!((f64::from(h[i]) - want).abs() < 1e-4, "{case} {prefix}row {i}, head from column {f}: {} vs {want}", h[i]);
                    let w = want_means[i];
                    assert!((f64::from(m[i]) - w).abs() < 1e-4, "{case} {prefix}row {i}, head from column {f}: WPO mean {} vs {w} from transformers' logits", m[i]);
                }
            }
            // The head in runs of 3 rows gives the same WPO means.
            let hidden = model.hidden(ids.clone(), &attn, None).narrow(1, 0, t - 1);
            let (lp, lsq) = head_outputs(&model, hidden, ids.clone().narrow(1, 1, t - 1), Some(3), true);
            let runs = to_vec(wpo_row_means(lp, lsq.unwrap(), float2(mask_t, &device).narrow(1, 1, t - 1)));
            for (i, (g, w)) in runs.iter().zip(&want_means).enumerate() {
                assert!((f64::from(*g) - w).abs() < 1e-4, "{case} {prefix}row {i}, head in runs of 3 rows: WPO mean {g} vs {w} from transformers' logits");
            }
            assert!(first > 1, "{case}: the fixture's prompts should leave columns to skip");
        }
    }
}

/// WPO's per-row means in f64 from the fixture's transformers logits: the mean over a row's completion
/// tokens of log p(y_t) − log Σ_v p_v².
fn wpo_means_from_logits(exp: &std::collections::HashMap<String, Arr>, prefix: &str) -> Vec<f64> {
    let (ids, mask, logits) = (&exp[&format!("{prefix}input_ids")], &exp[&format!("{prefix}completion_mask")], &exp[&format!("{prefix}logits")]);
    let [b, t, v] = [logits.shape[0], logits.shape[1], logits.shape[2]];
    (0..b)
        .map(|r| {
            let terms: Vec<f64> = (1..t)
                .filter(|&c| mask.data[r * t + c] > 0.5)
                .map(|c| {
                    let row = &logits.data[(r * t + c - 1) * v..(r * t + c) * v];
                    let m = row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x));
                    let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                    let lsq = row.iter().map(|x| (2.0 * (x - lse)).exp()).sum::<f64>().ln();
                    row[ids.data[r * t + c] as usize] - lse - lsq
                })
                .collect();
            terms.iter().sum::<f64>() / terms.len().max(1) as f64
        })
        .collect()
}

/// The LM head and log-softmax run over a few rows at a time, as on a device whose buffers cannot
/// hold a step's logits (`head_logprobs`, `odpo_kernels::max_buffer_bytes`): transformers'
/// completion log-probabilities, and the gradients of every parameter that one call gives (a tied
/// embedding collects a share from each run).
#[test]
fn head_logprobs_in_runs_match_transformers_and_one_call() {
    let device = test_device().autodiff();
    for case in CASES {
        let dir = fixture(case);
        let exp = read_safetensors(&dir.join("expected.safetensors"));
        let model = CausalLm::load(&dir, &device).unwrap().model;
        let ids = int2(&exp["input_ids"], &device);
        let attn = int2(&exp["attention_mask"], &device);
        let mask = float2(&exp["completion_mask"], &device);
        let [b, t] = ids.dims();
        assert!(b * (t - 1) > 3, "{case}: the fixture should have more rows than one run");
        let sums_and_grads = |rows: usize| {
            let hidden = model.hidden(ids.clone(), &attn, None).narrow(1, 0, t - 1);
            let lp = head_logprobs(&model, hidden, ids.clone().narrow(1, 1, t - 1), Some(rows)) * mask.clone().narrow(1, 1, t - 1);
            let sums = lp.sum_dim(1).reshape([b]);
            let grads = GradientsParams::from_grads(sums.clone().sum().backward(), &model);
            (to_vec(sums), param_grads(&model, &grads))
        };
        let (whole, whole_grads) = sums_and_grads(usize::MAX);
        for rows in [1, 3] {
            let (runs, run_grads) = sums_and_grads(rows);
            for (i, (got, one)) in runs.iter().zip(&whole).enumerate() {
                let want = exp["completion_logprob_sum"].data[i];
                assert!((f64::from(*got) - want).abs() < 1e-4, "{case} row {i}, runs of {rows}: {got} vs transformers {want}");
                assert!((got - one).abs() < 1e-5, "{case} row {i}, runs of {rows}: {got} vs one call {one}");
            }
            assert_eq!(run_grads.len(), whole_grads.len(), "{case}: parameters with a gradient");
            for (k, (g, w)) in run_grads.iter().zip(&whole_grads).enumerate() {
                let scale = w.iter().fold(1e-3_f32, |m, x| m.max(x.abs()));
                let diff = g.iter().zip(w).fold(0.0_f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(diff <= 1e-5 * scale.max(1.0), "{case} parameter {k}, runs of {rows}: gradients differ by {diff:.2e} (largest {scale:.2e})");
            }
        }
    }
}

#[test]
fn save_then_load_gives_identical_logits() {
    let device = test_device();
    for case in CASES {
        let dir = fixture(case);
        let exp = read_safetensors(&dir.join("expected.safetensors"));
        let loaded = CausalLm::load(&dir, &device).unwrap();
        // `ODPO_KEEP_SAVED=DIR` keeps the saved folders for `tests/fixtures/check_saved.py`.
        let keep = std::env::var_os("ODPO_KEEP_SAVED").map(std::path::PathBuf::from);
        // The scratch folder is bound here, so that it lives until the test has read it back.
        let tmp;
        let out = match &keep {
            Some(dir) => dir.join(case),
            None => {
                tmp = scratch(&format!("roundtrip-{case}"));
                tmp.to_path_buf()
            }
        };
        loaded.model.save_hf(&loaded.config, &out).unwrap();
        let again = CausalLm::load(&out, &device).unwrap();
        assert_eq!(again.config, loaded.config, "{case}: config changed in the round trip");
        // The token ids transformers would otherwise default (SmolLM3's padding id, 128,004, is
        // outside these vocabularies) are written back as given.
        let json = |d: &std::path::Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap() };
        let (given, written) = (json(&dir), json(&out));
        for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
            if !given[key].is_null() {
                assert_eq!(written[key], given[key], "{case}: {key}");
            }
        }
        assert_eq!(again.model.num_params(), loaded.model.num_params(), "{case}");
        for prefix in ["", "left_"] {
            let ids = int2(&exp[&format!("{prefix}input_ids")], &device);
            let mask = int2(&exp[&format!("{prefix}attention_mask")], &device);
            let a = to_vec(loaded.model.forward(ids.clone(), &mask, None));
            let b = to_vec(again.model.forward(ids, &mask, None));
            assert_eq!(a, b, "{case} {prefix}: logits changed after save + load");
        }
    }
}

/// KV-cache generation against full recomputation on the Llama and Gemma families' fixtures, the
/// sliding windows among them: twelve decoded steps carry the sequences past every window, and the
/// batch's left padding shifts the indices the windows are counted in. A prompt of 7 tokens and 12
/// new ones passes `phi3_longrope`'s original length of 16, where LongRoPE changes frequencies and
/// the cache is filled again.
#[test]
fn cached_generation_matches_full_recompute() {
    for case in ["llama_gqa_untied", "qwen3_qk_norm", "olmo2", "smollm3_nope", "granite_scales", "phi3_longrope", "phi3_short", "olmo3", "mistral_window", "qwen2_window", "gemma", "gemma2_softcap", "gemma3_text"] {
        check_cached_generation(case);
    }
}

/// What the Gemma, SmolLM3, Granite, Phi-3, OLMo 3, mixture-of-experts and RoPE-scaling fixtures exercise matters: each of their options, lifted, moves the
/// logits far from transformers' (and Gemma's legacy `hidden_act: gelu` is read as the tanh form it
/// meant).
#[test]
fn family_options_change_the_logits() {
    use serde_json::json;
    let device = test_device();
    let full = json!({"full_attention": {"rope_type": "default", "rope_theta": 1000000.0}, "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}});
    let local = json!({"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}, "sliding_attention": {"rope_type": "default", "rope_theta": 1000000.0}});
    let mutations: &[(&str, &str, serde_json::Value, bool)] = &[
        ("gemma", "hidden_act", json!("gelu"), false),
        ("gemma", "hidden_act", json!("gelu_new"), false),
        ("gemma2_softcap", "attn_logit_softcapping", json!(null), true),
        ("gemma2_softcap", "final_logit_softcapping", json!(null), true),
        ("gemma2_softcap", "sliding_window", json!(null), true),
        ("gemma2_softcap", "query_pre_attn_scalar", json!(16), true),
        ("gemma3_text", "sliding_window", json!(null), true),
        ("gemma3_text", "rope_parameters", full, true),
        ("gemma3_text", "rope_parameters", local, true),
        ("smollm3_nope", "no_rope_layers", json!([1, 1, 1]), true),
        ("smollm3_nope", "use_sliding_window", json!(false), true),
        ("granite_scales", "embedding_multiplier", json!(1.0), true),
        ("granite_scales", "residual_multiplier", json!(1.0), true),
        ("granite_scales", "attention_multiplier", json!(0.25), true),
        ("granite_scales", "logits_scaling", json!(1.0), true),
        // The short factors in place of the long ones, no window, no LongRoPE.
        ("phi3_longrope", "original_max_position_embeddings", json!(32), true),
        ("phi3_longrope", "sliding_window", json!(null), true),
        ("phi3_short", "rope_parameters", json!({"rope_type": "default", "rope_theta": 10000.0}), true),
        // Without YaRN; YaRN with transformers' defaults in place of the fixture's options; without
        // the linear scaling.
        ("llama_yarn", "rope_parameters", json!({"rope_type": "default", "rope_theta": 100.0}), true),
        ("qwen2_yarn", "rope_parameters", json!({"rope_type": "yarn", "rope_theta": 300.0, "factor": 3.0, "original_max_position_embeddings": 48}), true),
        ("llama_linear", "rope_parameters", json!({"rope_type": "default", "rope_theta": 10000.0}), true),
        // OLMo 3 with its two rotary embeddings swapped; without its window.
        ("olmo3", "rope_parameters", json!({"sliding_attention": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0, "original_max_position_embeddings": 16, "attention_factor": 1.2}, "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}), true),
        ("olmo3", "sliding_window", json!(null), true),
        // Mixtures of experts: one expert a token in place of two; a window Mixtral has not; the
        // chosen experts' weights renormalised where they were not, and not where they were.
        ("mixtral_moe", "num_experts_per_tok", json!(1), true),
        ("mixtral_moe", "sliding_window", json!(6), true),
        ("qwen2_moe_shared", "norm_topk_prob", json!(true), true),
        ("qwen3_moe", "norm_topk_prob", json!(false), true),
        ("qwen3_moe", "num_experts_per_tok", json!(2), true),
    ];
    for (case, key, value, moves) in mutations {
        let dir = fixture(case);
        let exp = read_safetensors(&dir.join("expected.safetensors"));
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        json[*key] = value.clone();
        let cfg = odpo_model::ModelConfig::from_hf_json(&json, &dir).unwrap();
        let mut weights = odpo_model::weights::Weights::from_hf_dir(&dir).unwrap();
        let model = CausalLm::from_weights(&cfg, &mut weights, &device).unwrap();
        let d = max_diff_logits(&model, &exp, "", &device).max(max_diff_logits(&model, &exp, "left_", &device));
        println!("{case} with {key} = {value}: max |diff| {d:.3e}");
        if *moves {
            assert!(d > 1e-1, "{case}: setting {key} to {value} changed the logits by only {d}");
        } else {
            assert!(d < 1e-4, "{case}: setting {key} to {value} changed the logits by {d}");
        }
    }
}

/// A mixture of experts' backward pass against transformers': every parameter's gradient of the
/// summed completion log-probabilities (the routers' through the chosen experts' weights, each
/// expert's through the rows routed to it), as `make_fixtures_moe.py` fingerprints them
/// (`gradients.json`: each tensor's element count, sum and sum of squares, sorted; an expert no
/// token reached has a zero gradient). And the routers' load-balancing loss (transformers'
/// `aux_loss` with `output_router_logits`) on both paddings, with its own gradients.
#[test]
fn moe_gradients_match_transformers() {
    use burn::module::{ModuleVisitor, Param};
    use burn::tensor::Tensor;
    struct Fingerprint<'a>(&'a GradientsParams, Vec<[f64; 3]>);
    impl ModuleVisitor for Fingerprint<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let n = param.val().dims().iter().product::<usize>();
            let g: Vec<f64> = self.0.get::<D>(param.id).map_or_else(|| vec![0.0; n], |g| to_vec(g).into_iter().map(f64::from).collect());
            self.1.push([n as f64, g.iter().sum(), g.iter().map(|x| x * x).sum()]);
        }
    }
    let device = test_device().autodiff();
    for case in ["mixtral_moe", "qwen2_moe_shared", "qwen2_moe_llamacpp", "qwen3_moe"] {
        let dir = fixture(case);
        let exp = read_safetensors(&dir.join("expected.safetensors"));
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("gradients.json")).unwrap()).unwrap();
        let want: Vec<[f64; 3]> = json["gradients"].as_array().unwrap().iter().map(|r| std::array::from_fn(|i| r[i].as_f64().unwrap())).collect();
        let want_aux: Vec<[f64; 3]> = json["aux_gradients"].as_array().unwrap().iter().map(|r| std::array::from_fn(|i| r[i].as_f64().unwrap())).collect();
        let model = CausalLm::load(&dir, &device).unwrap().model;
        let compare = |what: &str, loss: burn::tensor::Tensor<1>, want: &[[f64; 3]]| {
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let mut got = Fingerprint(&grads, Vec::new());
            model.visit(&mut got);
            let mut got = got.1;
            got.sort_by(|a, b| a[0].total_cmp(&b[0]).then(a[2].total_cmp(&b[2])));
            assert_eq!(got.len(), want.len(), "{case}: parameter tensors");
            let mut worst = 0f64;
            for (g, w) in got.iter().zip(want) {
                assert_eq!(g[0], w[0], "{case} {what}: element counts {got:?} against {want:?}");
                // The sum within 1e-4 of the gradient's norm, the sum of squares within 1e-4 of itself.
                let norm = (w[0] * w[2]).sqrt();
                let err = ((g[1] - w[1]).abs() / (norm + 1e-6)).max((g[2] - w[2]).abs() / (w[2] + 1e-9));
                worst = worst.max(err);
                assert!(err < 1e-4, "{case} {what}: a gradient's sum / sum of squares {g:?} against transformers' {w:?}");
            }
            println!("{case}: {} gradients of {what} match transformers' within {worst:.1e} (relative)", got.len());
        };
        let ids = int2(&exp["input_ids"], &device);
        let logits = model.forward(ids.clone(), &int2(&exp["attention_mask"], &device), None);
        let (sums, _) = sequence_logprobs(logits, ids, float2(&exp["completion_mask"], &device));
        compare("the log-probabilities", sums.sum(), &want);
        for prefix in ["", "left_"] {
            let mut stats = odpo_model::moe::RouterStats::default();
            let mask = int2(&exp[&format!("{prefix}attention_mask")], &device);
            model.hidden_routed(int2(&exp[&format!("{prefix}input_ids")], &device), &mask, None, Some((1.0, &mut stats)));
            let aux = stats.load_balancing_loss().unwrap();
            let (got, want) = (f64::from(aux.clone().into_scalar::<f32>()), json["aux_loss"][if prefix.is_empty() { "right_" } else { prefix }].as_f64().unwrap());
            println!("{case} {prefix}padded: load-balancing loss {got:.7} against transformers' {want:.7}");
            assert!((got - want).abs() < 1e-5 * want, "{case} {prefix}padded: load-balancing loss {got} against transformers' {want}");
            if prefix.is_empty() {
                compare("the load-balancing loss", aux, &want_aux);
            }
        }
    }
}

/// Fixtures written as llama.cpp writes GGUF files (`fixtures/gguf/`, by `make_gguf_fixtures.py`)
/// and loaded from them give transformers' logits: Qwen2, Qwen3 and OLMo 2 (stored unpermuted),
/// SmolLM3 (permuted; no key for its layers without the rotation), Granite (permuted; its
/// multipliers as llama.cpp's scales), Phi-3 (fused projections; the rotated dims, LongRoPE's
/// original length and attention factor as keys, its factors as tensors), a YaRN Llama, OLMo 3 (an
/// `olmo2` file with a window, the layers' pattern, YaRN on the full layers alone), and Gemma,
/// Gemma 2 and Gemma 3 (norms stored as `1 + w`, llama.cpp's names, no key for the query scale or
/// the layer pattern: the norms, the query scale, the sliding layers, both caps and the full
/// layers' scaled rotary base all come back), and the mixtures of experts Mixtral (a `llama` file
/// with experts) and Qwen3-MoE (each projection's experts stacked in one tensor).
#[test]
fn gguf_files_match_transformers() {
    let device = test_device();
    for (file, case, arch) in [
        ("tiny_qwen2.gguf", "qwen2_bias", "Qwen2ForCausalLM"),
        ("tiny_qwen3.gguf", "qwen3_qk_norm", "Qwen3ForCausalLM"),
        ("tiny_gemma.gguf", "gemma", "GemmaForCausalLM"),
        ("tiny_gemma2.gguf", "gemma2_llamacpp", "Gemma2ForCausalLM"),
        ("tiny_gemma3.gguf", "gemma3_llamacpp", "Gemma3ForCausalLM"),
        ("tiny_olmo2.gguf", "olmo2", "Olmo2ForCausalLM"),
        ("tiny_smollm3.gguf", "smollm3_llamacpp", "SmolLM3ForCausalLM"),
        ("tiny_granite.gguf", "granite_scales", "GraniteForCausalLM"),
        ("tiny_phi3.gguf", "phi3_llamacpp", "Phi3ForCausalLM"),
        ("tiny_llama_yarn.gguf", "llama_yarn", "LlamaForCausalLM"),
        ("tiny_olmo3.gguf", "olmo3_llamacpp", "Olmo3ForCausalLM"),
        ("tiny_phi2.gguf", "phi2", "PhiForCausalLM"),
        ("tiny_phi2_qkv.gguf", "phi2", "PhiForCausalLM"),
        ("tiny_stablelm.gguf", "stablelm2", "StableLmForCausalLM"),
        ("tiny_stablelm_parallel.gguf", "stablelm_parallel", "StableLmForCausalLM"),
        ("tiny_mixtral.gguf", "mixtral_moe", "MixtralForCausalLM"),
        ("tiny_qwen3moe.gguf", "qwen3_moe", "Qwen3MoeForCausalLM"),
        ("tiny_qwen2moe.gguf", "qwen2_moe_llamacpp", "Qwen2MoeForCausalLM"),
    ] {
        let exp = read_safetensors(&fixture(case).join("expected.safetensors"));
        let loaded = CausalLm::load(&fixture("gguf").join(file), &device).unwrap();
        assert_eq!(loaded.config.to_hf_json()["architectures"][0], arch);
        for prefix in ["", "left_"] {
            let diff = max_diff_logits(&loaded.model, &exp, prefix, &device);
            println!("{file}, {prefix}padded: max |diff| {diff:.2e}");
            assert!(diff < 1e-4, "{file}, {prefix}padded: logits differ by {diff}");
        }
    }
}

/// Models of the Llama family written as GGUF files by `save_gguf`, with a byte-level tokenizer
/// read from a GGUF vocabulary, and loaded back: the same logits (F32 exactly as the weights, F16
/// and Q8_0 within their rounding), the same tokenizer. The models take the fixtures' shapes, random weights and
/// the tokenizer's vocabulary (one with four rows more, which get unused `[PAD]` tokens, as llama.cpp
/// wants a token per row); `check_written.py` loads the kept files with transformers. What GGUF
/// cannot hold is refused by name, and nothing is written.
#[test]
fn written_gguf_files_read_back_as_the_model() {
    use odpo_model::ModelConfig;
    use odpo_model::gguf::{GgufDtype, save_gguf};
    use odpo_model::tokenizer::Tokenizer;
    let device = test_device();
    let vocab = fixture("gguf").join("vocab");
    let tok = Tokenizer::from_gguf(&vocab.join("llama-bpe.gguf")).unwrap();
    // `ODPO_KEEP_GGUF=DIR` keeps the written files (and each model's HF folder) for
    // `tests/fixtures/gguf/check_written.py`.
    let tmp = scratch("gguf-written");
    let dir = std::env::var_os("ODPO_KEEP_GGUF").map_or_else(|| tmp.to_path_buf(), std::path::PathBuf::from);
    let exp = read_safetensors(&fixture("llama_gqa_untied").join("expected.safetensors"));
    let (ids, mask) = (int2(&exp["left_input_ids"], &device), int2(&exp["left_attention_mask"], &device));
    for (case, extra_rows) in [("llama_gqa_untied", 0), ("qwen2_bias", 0), ("qwen3_qk_norm", 4), ("llama_sharded", 0), ("olmo2", 0), ("smollm3_llamacpp", 0), ("granite_scales", 4), ("phi3_longrope", 0), ("phi3_llamacpp", 4), ("llama_linear", 0), ("llama_yarn", 0), ("qwen2_yarn", 0), ("olmo3_llamacpp", 0), ("phi2", 4), ("phi_qk_norm", 0), ("stablelm2", 0), ("stablelm_parallel", 4), ("mixtral_moe", 0), ("qwen3_moe", 4), ("qwen2_moe_llamacpp", 0)] {
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture(case).join("config.json")).unwrap()).unwrap();
        json["vocab_size"] = (tok.vocab_size() + extra_rows).into();
        if case.contains("moe") {
            // Rows of whole Q8_0 blocks in every expert's matrices.
            for key in ["hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"] {
                if json.get(key).is_some() {
                    json[key] = 32.into();
                }
            }
        }
        if case == "qwen2_moe_llamacpp" {
            // Tied: llama.cpp's `qwen2moe` needs an `output`, written as the embedding's copy.
            json["tie_word_embeddings"] = true.into();
        }
        if case == "qwen2_yarn" {
            // YaRN on a `qwen2` file, without the options a GGUF file cannot hold (refused below).
            let rope = json["rope_parameters"].as_object_mut().unwrap();
            for k in ["mscale", "mscale_all_dim", "truncate", "beta_fast", "beta_slow"] {
                rope.remove(k);
            }
        }
        if case == "phi_qk_norm" {
            // A tied, grouped, linearly scaled Phi, without the two options llama.cpp's `phi2`
            // lacks (refused below): its head is written as the embedding's copy.
            (json["qk_layernorm"], json["hidden_act"]) = (false.into(), "gelu_new".into());
        }
        let config = ModelConfig::from_hf_json(&json, &fixture(case)).unwrap();
        let model = CausalLm::random(&config, 7, &device).unwrap();
        let want = to_vec(model.forward(ids.clone(), &mask, None));
        model.save_hf(&config, &dir.join(format!("{case}-hf"))).unwrap();
        // Q8_0: within 3e-2 (OLMo 3's four layers, each branch normed after it: 2.3e-2).
        for (dtype, tol) in [(GgufDtype::F32, 0.0), (GgufDtype::F16, 1e-3), (GgufDtype::Q8_0, 3e-2)] {
            let out = dir.join(format!("{case}-{dtype:?}.gguf"));
            save_gguf(&model, &config, &tok, &out, dtype).unwrap();
            let again = CausalLm::load(&out, &device).unwrap();
            assert_eq!(again.config.to_hf_json()["architectures"], json["architectures"], "{case}");
            let got = to_vec(again.model.forward(ids.clone(), &mask, None));
            let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            println!("{case} {dtype:?}: max |diff| {diff:.2e}");
            assert!(diff <= tol, "{case} {dtype:?}: logits differ by {diff}");
            // Kept as blocks (a quantised base, which runs on flex: where this build has it),
            // each expert's rows cut from its stack, the routers in f32: the logits of the
            // dequantised weights.
            if dtype == GgufDtype::Q8_0
                && case.contains("moe")
                && let Ok(flex) = odpo_model::backend::device("flex")
            {
                let blocks = CausalLm::load_with(&out, &flex, true).unwrap();
                assert!(blocks.model.has_quantized_base(), "{case}");
                let (ids, mask) = (int2(&exp["left_input_ids"], &flex), int2(&exp["left_attention_mask"], &flex));
                let kept = to_vec(blocks.model.forward(ids, &mask, None));
                let d = kept.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                println!("{case} Q8_0 kept as blocks: max |diff| {d:.2e} from the dequantised weights");
                assert!(d < 1e-4, "{case}: a quantised base's logits differ by {d}");
            }
            let back = Tokenizer::open(&out).unwrap();
            for text in ["It's 2024 <|im_start|>user\nhi<|im_end|><think>", "Café 東京 🙂"] {
                assert_eq!(back.encode(text, true).unwrap(), tok.encode(text, true).unwrap(), "{case}: {text:?}");
            }
            assert_eq!(back.vocab_size(), tok.vocab_size() + extra_rows);
            assert_eq!(back.chat_template_source(), tok.chat_template_source());
            // Vectors and norms (StableLM's stacked head norms) stay F32; in a Q8_0 file every
            // matrix here has rows of whole blocks.
            let file = odpo_model::gguf::GgufFile::open(&out).unwrap();
            for t in file.tensor_infos() {
                let want = match (dtype, t.dims.len()) {
                    // Norms, a mixture of experts' routers and Qwen2-MoE's shared-expert gate stay
                    // F32, as the converter keeps them.
                    _ if ["_norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight"].iter().any(|e| t.name.ends_with(e)) => 0,
                    (_, 1) | (GgufDtype::F32, _) => 0,
                    (GgufDtype::F16, _) => 1,
                    (GgufDtype::Q8_0, _) => 8,
                };
                assert_eq!(t.ggml_type, want, "{case} {dtype:?}: {}", t.name);
                // Qwen2-MoE's shared-expert gate is one vector, as transformers reads it.
                if t.name.ends_with("ffn_gate_inp_shexp.weight") {
                    assert_eq!(t.dims, [32u64], "{case}: {}", t.name);
                }
            }
        }
    }
    // The text split is written under the name llama.cpp knows for it (`gpt-2`, not the `gpt2`
    // that odpo once wrote); files with the same split under two names get the first.
    for (source, written) in [("gpt2", "gpt-2"), ("pre-gpt-2", "gpt-2"), ("pre-default", "default"), ("smollm", "smollm"), ("pre-starcoder", "smollm"), ("pre-llama3", "llama-bpe"), ("qwen2", "qwen2")] {
        let tok = Tokenizer::from_gguf(&vocab.join(format!("{source}.gguf"))).unwrap();
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("llama_gqa_untied").join("config.json")).unwrap()).unwrap();
        json["vocab_size"] = tok.vocab_size().into();
        let config = ModelConfig::from_hf_json(&json, &fixture("llama_gqa_untied")).unwrap();
        let model = CausalLm::random(&config, 7, &device).unwrap();
        let out = tmp.join(format!("pre-{source}.gguf"));
        save_gguf(&model, &config, &tok, &out, GgufDtype::F16).unwrap();
        let file = odpo_model::gguf::GgufFile::open(&out).unwrap();
        assert_eq!(file.metadata()["tokenizer.ggml.pre"].as_str(), Some(written), "{source}");
        let back = Tokenizer::open(&out).unwrap();
        let text = "It's 2024, and 1234567 +++ things.";
        assert_eq!(back.encode(text, false).unwrap(), tok.encode(text, false).unwrap(), "{source}");
    }
    // SentencePiece BPE (Llama 2's and Mistral's kind): written as a `llama` vocabulary with a score
    // per piece, it reads back to SentencePiece's own ids (`expected.json`) on every probe, with and
    // without BOS. `check_llamacpp.py` runs the kept file's tokenizer in llama.cpp.
    let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(vocab.join("expected.json")).unwrap()).unwrap();
    let tok = Tokenizer::from_gguf(&vocab.join("sentencepiece.gguf")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("llama_gqa_untied").join("config.json")).unwrap()).unwrap();
    json["vocab_size"] = tok.vocab_size().into();
    let config = ModelConfig::from_hf_json(&json, &fixture("llama_gqa_untied")).unwrap();
    let model = CausalLm::random(&config, 7, &device).unwrap();
    model.save_hf(&config, &dir.join("spm_llama_gqa_untied-hf")).unwrap();
    let out = dir.join("spm_llama_gqa_untied-F32.gguf");
    save_gguf(&model, &config, &tok, &out, GgufDtype::F32).unwrap();
    let file = odpo_model::gguf::GgufFile::open(&out).unwrap();
    assert_eq!(file.metadata()["tokenizer.ggml.model"].as_str(), Some("llama"));
    let back = Tokenizer::open(&out).unwrap();
    let want = |v: &serde_json::Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect() };
    for p in expected["cases"]["sentencepiece"].as_array().unwrap() {
        let text = p["text"].as_str().unwrap();
        assert_eq!(back.encode(text, true).unwrap(), want(&p["ids"]), "{text:?}");
        assert_eq!(back.encode(text, false).unwrap(), want(&p["ids_plain"]), "{text:?}");
    }
    assert_eq!(back.encode("the</s>the <think>", true).unwrap(), tok.encode("the</s>the <think>", true).unwrap());
    let again = CausalLm::load(&out, &device).unwrap();
    let got = to_vec(again.model.forward(ids.clone(), &mask, None));
    assert_eq!(got, to_vec(model.forward(ids.clone(), &mask, None)));
    // Refused: a family GGUF's `llama` files cannot hold, a SmolLM3 whose rotation llama.cpp's would not follow, Llama 3's RoPE scaling, a sliding window,
    // a Unigram tokenizer, more tokens than embedding rows.
    let refuse = |case: &str, tok: &Tokenizer, says: &str| {
        let loaded = CausalLm::load(&fixture(case), &device).unwrap();
        let out = dir.join(format!("{case}-refused.gguf"));
        let err = save_gguf(&loaded.model, &loaded.config, tok, &out, GgufDtype::F32).unwrap_err().to_string();
        assert!(err.contains(&out.display().to_string()) && err.contains(says), "{case}: {err}");
        assert!(!out.exists(), "{case}: nothing written");
    };
    refuse("gpt2", &tok, "`GPT2LMHeadModel` is not written to GGUF");
    refuse("smollm3_nope", &tok, "a GGUF file has no sliding window for `smollm3`");
    // Without its window, its layers' rotation is still not llama.cpp's.
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("smollm3_nope").join("config.json")).unwrap()).unwrap();
    json["use_sliding_window"] = false.into();
    let config = ModelConfig::from_hf_json(&json, &fixture("smollm3_nope")).unwrap();
    let out = dir.join("smollm3-rotation-refused.gguf");
    let err = save_gguf(&CausalLm::random(&config, 7, &device).unwrap(), &config, &tok, &out, GgufDtype::F32).unwrap_err().to_string();
    assert!(err.contains("`no_rope_layers`: [true, false, true] (true: rotated): llama.cpp's `smollm3` skips the rotation in every fourth layer and only there"), "{err}");
    assert!(!out.exists());
    refuse("llama3_rope", &tok, "only linear and YaRN RoPE scaling");
    refuse("qwen2_yarn", &tok, "YaRN with `mscale` is not written to GGUF");
    refuse("olmo3", &tok, "differs from the full layers' base without scaling (500000): llama.cpp's `olmo2` rotates them so");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("llama_yarn").join("config.json")).unwrap()).unwrap();
    json["rope_parameters"]["beta_fast"] = 12.0.into();
    let config = ModelConfig::from_hf_json(&json, &fixture("llama_yarn")).unwrap();
    let out = dir.join("yarn-betas-refused.gguf");
    let err = save_gguf(&CausalLm::random(&config, 7, &device).unwrap(), &config, &tok, &out, GgufDtype::F32).unwrap_err().to_string();
    assert!(err.contains("YaRN with `beta_fast` other than 32 is not written to GGUF (llama.cpp's `llama` takes 32"), "{err}");
    assert!(!out.exists());
    refuse("mistral_window", &tok, "no sliding window");
    // Mixtures of experts llama.cpp would run otherwise: a dense layer, weights renormalised where
    // llama.cpp does not or the other way, Mixtral's window, Qwen2-MoE's queries narrower than the model.
    refuse("qwen2_moe_shared", &tok, "layer 1 has a dense MLP (`mlp_only_layers`, `decoder_sparse_step`): llama.cpp's `qwen2moe` has experts in every layer");
    for (case, key, value, says) in [
        ("qwen3_moe", "mlp_only_layers", serde_json::json!([1]), "layer 1 has a dense MLP (`mlp_only_layers`, `decoder_sparse_step`): llama.cpp's `qwen3moe` has experts in every layer"),
        ("qwen3_moe", "norm_topk_prob", serde_json::json!(false), "false: llama.cpp's `qwen3moe` renormalises the chosen experts' weights"),
        ("qwen2_moe_llamacpp", "norm_topk_prob", serde_json::json!(true), "true: llama.cpp's `qwen2moe` does not renormalise the chosen experts' weights"),
        ("qwen2_moe_llamacpp", "head_dim", serde_json::json!(8), "`head_dim`: 8: llama.cpp's `qwen2moe` takes the queries to be hidden_size (16) wide, not heads × head_dim (32)"),
        ("mixtral_moe", "sliding_window", serde_json::json!(8), "a GGUF file has no sliding window"),
    ] {
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture(case).join("config.json")).unwrap()).unwrap();
        json[key] = value;
        let config = ModelConfig::from_hf_json(&json, &fixture(case)).unwrap();
        let out = dir.join(format!("{case}-{key}-refused.gguf"));
        let err = save_gguf(&CausalLm::random(&config, 7, &device).unwrap(), &config, &tok, &out, GgufDtype::F32).unwrap_err().to_string();
        assert!(err.contains(says), "{case} {key}: {err}");
        assert!(!out.exists());
    }
    // Phi's options llama.cpp's `phi2` does not have.
    refuse("phi_qk_norm", &tok, "`qk_layernorm`: true: llama.cpp's `phi2` has no norm over queries and keys");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("phi2").join("config.json")).unwrap()).unwrap();
    json["hidden_act"] = "gelu".into();
    let config = ModelConfig::from_hf_json(&json, &fixture("phi2")).unwrap();
    let out = dir.join("phi-gelu-refused.gguf");
    let err = save_gguf(&CausalLm::random(&config, 7, &device).unwrap(), &config, &tok, &out, GgufDtype::F32).unwrap_err().to_string();
    assert!(err.contains("`hidden_act`: `gelu` (exact): llama.cpp's `phi2` computes GELU's tanh approximation"), "{err}");
    assert!(!out.exists());
    let unigram = tmp.join("unigram.json");
    std::fs::write(&unigram, r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":null,"post_processor":null,"decoder":null,"model":{"type":"Unigram","unk_id":0,"vocab":[["<unk>",0.0],["a",-1.0]],"byte_fallback":false}}"#).unwrap();
    refuse("llama_gqa_untied", &Tokenizer::from_file(&unigram).unwrap(), "only byte-level BPE and SentencePiece BPE");
    refuse("llama_gqa_untied", &tok, "more than the model's 200 embedding rows");
}

/// Models of the Gemma family written as GGUF files by `save_gguf` with a Gemma-style SentencePiece
/// tokenizer, and loaded back: the same logits (F32 up to the `1 + w` of the norms, F16 and Q8_0
/// within their rounding), the same tokenizer ids; `check_llamacpp.py` runs the kept files in
/// llama.cpp. What llama.cpp fixes by architecture and a model does otherwise is refused by name.
#[test]
fn written_gemma_gguf_files_read_back_as_the_model() {
    use odpo_model::ModelConfig;
    use odpo_model::gguf::{GgufDtype, save_gguf};
    use odpo_model::tokenizer::Tokenizer;
    let device = test_device();
    let tok = Tokenizer::from_gguf(&fixture("gguf").join("vocab").join("sentencepiece_gemma.gguf")).unwrap();
    let tmp = scratch("gguf-written-gemma");
    let dir = std::env::var_os("ODPO_KEEP_GGUF").map_or_else(|| tmp.to_path_buf(), std::path::PathBuf::from);
    let exp = read_safetensors(&fixture("gemma3_llamacpp").join("expected.safetensors"));
    let (ids, mask) = (int2(&exp["left_input_ids"], &device), int2(&exp["left_attention_mask"], &device));
    let config_of = |case: &str| {
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture(case).join("config.json")).unwrap()).unwrap();
        json["vocab_size"] = tok.vocab_size().into();
        ModelConfig::from_hf_json(&json, &fixture(case)).unwrap()
    };
    for case in ["gemma", "gemma2_llamacpp", "gemma3_llamacpp"] {
        let config = config_of(case);
        let model = CausalLm::random(&config, 7, &device).unwrap();
        let want = to_vec(model.forward(ids.clone(), &mask, None));
        model.save_hf(&config, &dir.join(format!("{case}-hf"))).unwrap();
        for (dtype, tol) in [(GgufDtype::F32, 1e-5), (GgufDtype::F16, 1e-3), (GgufDtype::Q8_0, 3e-2)] {
            let out = dir.join(format!("{case}-{dtype:?}.gguf"));
            save_gguf(&model, &config, &tok, &out, dtype).unwrap();
            let again = CausalLm::load(&out, &device).unwrap();
            assert_eq!(again.config.to_hf_json()["architectures"], config.to_hf_json()["architectures"], "{case}");
            let got = to_vec(again.model.forward(ids.clone(), &mask, None));
            let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            println!("{case} {dtype:?}: max |diff| {diff:.2e}");
            assert!(diff <= tol, "{case} {dtype:?}: logits differ by {diff}");
            let back = Tokenizer::open(&out).unwrap();
            for text in ["the  the   the", "  leading", "<think>ж"] {
                assert_eq!(back.encode(text, true).unwrap(), tok.encode(text, true).unwrap(), "{case}: {text:?}");
            }
        }
    }
    let refuse = |case: &str, says: &str| {
        let config = config_of(case);
        let model = CausalLm::random(&config, 7, &device).unwrap();
        let out = dir.join(format!("{case}-refused.gguf"));
        let err = save_gguf(&model, &config, &tok, &out, GgufDtype::F32).unwrap_err().to_string();
        assert!(err.contains(&out.display().to_string()) && err.contains(says), "{case}: {err}");
        assert!(!out.exists(), "{case}: nothing written");
    };
    refuse("gemma2_softcap", "query_pre_attn_scalar");
    refuse("gemma3_text", "layer_types");
}

/// Half-precision weights and compute: the same model in f16 and bf16 stays close to the f32
/// reference (looser tolerances, set by the formats' 11 and 8 significant bits).
#[test]
fn half_precision_stays_close_to_f32() {
    use odpo_model::Precision;
    let device = test_device();
    for case in ["gpt2", "qwen2_bias", "gemma2_softcap"] {
        let dir = fixture(case);
        let exp = read_safetensors(&dir.join("expected.safetensors"));
        for (precision, tol) in [(Precision::F16, 0.03), (Precision::Bf16, 0.3)] {
            if !device.supports_dtype(precision.dtype()) {
                println!("{case} {precision:?}: this device has no {precision:?}; skipped");
                continue;
            }
            let model = CausalLm::load(&dir, &device).unwrap().model.with_precision(precision);
            let ids = int2(&exp["input_ids"], &device);
            let logits = model.forward(ids, &int2(&exp["attention_mask"], &device), None);
            assert_eq!(logits.dtype(), precision.dtype().into(), "{case}: compute did not follow the weights");
            let got = to_vec(logits.cast(burn::tensor::FloatDType::F32));
            let want = &exp["logits"];
            let v = want.shape[2];
            let mut worst = 0.0f64;
            for (pos, m) in exp["attention_mask"].data.iter().enumerate() {
                if *m == 1.0 {
                    for j in 0..v {
                        worst = worst.max((f64::from(got[pos * v + j]) - want.data[pos * v + j]).abs());
                    }
                }
            }
            println!("{case} {precision:?}: max |diff| {worst:.3e}");
            assert!(worst < tol, "{case} {precision:?}: logits differ by {worst}");
        }
    }
}
