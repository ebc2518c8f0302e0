//! Parity with HF transformers on tiny random models of every family, made by
//! `tests/fixtures/make_fixtures.py` and `make_fixtures_neo.py`:
//! logits on right- and left-padded batches within 1e-4, completion log-probabilities, and the
//! save -> load round trip.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use odpo_model::{CausalLm, Module};
use odpo_model::logprobs::{completion_logprobs, sequence_logprobs};

const CASES: &[&str] = &[
    "gpt2",
    "llama_gqa_untied",
    "llama3_rope",
    "qwen2_bias",
    "llama_sharded",
    "gpt_neo_local",
    "gptj",
    "gpt_neox_parallel",
    "gpt_neox_sequential",
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
            let heads: Vec<_> = [first, 1].iter().map(|&f| to_vec(completion_logprobs(&model, ids.clone(), &attn, float2(mask_t, &device), f).0)).collect();
            for (i, (s, c)) in to_vec(sum).iter().zip(to_vec(count)).enumerate() {
                let want = exp["completion_logprob_sum"].data[i];
                assert!((f64::from(*s) - want).abs() < 1e-4, "{case} {prefix}row {i}: {s} vs {want}");
                assert_eq!(f64::from(c), exp["completion_token_count"].data[i], "{case} row {i}");
                for (h, f) in heads.iter().zip([first, 1]) {
                    assert!((f64::from(h[i]) - want).abs() < 1e-4, "{case} {prefix}row {i}, head from column {f}: {} vs {want}", h[i]);
                }
            }
            assert!(first > 1, "{case}: the fixture's prompts should leave columns to skip");
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
        let out = match &keep {
            Some(dir) => dir.join(case),
            None => std::env::temp_dir().join(format!("odpo-roundtrip-{case}-{}", std::process::id())),
        };
        loaded.model.save_hf(&loaded.config, &out).unwrap();
        let again = CausalLm::load(&out, &device).unwrap();
        assert_eq!(again.config, loaded.config, "{case}: config changed in the round trip");
        assert_eq!(again.model.num_params(), loaded.model.num_params(), "{case}");
        for prefix in ["", "left_"] {
            let ids = int2(&exp[&format!("{prefix}input_ids")], &device);
            let mask = int2(&exp[&format!("{prefix}attention_mask")], &device);
            let a = to_vec(loaded.model.forward(ids.clone(), &mask, None));
            let b = to_vec(again.model.forward(ids, &mask, None));
            assert_eq!(a, b, "{case} {prefix}: logits changed after save + load");
        }
        if keep.is_none() {
            std::fs::remove_dir_all(&out).ok();
        }
    }
}

/// Half-precision weights and compute: the same model in f16 and bf16 stays close to the f32
/// reference (looser tolerances, set by the formats' 11 and 8 significant bits).
#[test]
fn half_precision_stays_close_to_f32() {
    use odpo_model::Precision;
    let device = test_device();
    for case in ["gpt2", "qwen2_bias"] {
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
