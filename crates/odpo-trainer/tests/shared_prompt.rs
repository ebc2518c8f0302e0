//! The shared-prompt forward (each prompt once, its keys and values reused by the chosen and the
//! rejected completion) against the concatenated forward, on the model fixtures of every family:
//! the same row log-probs and token counts, and the same gradients of every parameter, on pairs
//! with different prompt and completion lengths (an empty prompt and an empty completion among them).
//! Also LD-DPO's token weights (`loss.ld_alpha`) in both layouts, against the log-probs of the responses
//! cut to the length each pair's two responses share.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use burn::data::dataloader::batcher::Batcher;
use burn::module::{ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};
use odpo_data::{Layout, PreferenceBatcher, SharedPromptRows, TokenizedPair};
use odpo_model::logprobs::{completion_logprobs, shared_prompt_logprobs};
use odpo_model::{CausalLm, Module};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CASES: &[&str] = &["gpt2", "llama_gqa_untied", "llama3_rope", "qwen2_bias", "qwen3_qk_norm", "mistral_window", "qwen2_window", "gemma", "gemma2_softcap", "gemma3_text", "gpt_neo_local", "gptj", "gpt_neox_parallel", "gpt_neox_sequential", "olmo2", "smollm3_nope", "granite_scales", "phi3_longrope", "phi3_short", "olmo3", "phi2", "phi_qk_norm", "stablelm2", "stablelm_parallel", "mixtral_moe", "qwen2_moe_shared", "qwen3_moe"];

fn fixture(case: &str) -> std::path::PathBuf {
    common::repo_root().join("crates/odpo-model/tests/fixtures").join(case)
}

fn pairs(vocab: u32, seed: u64) -> Vec<TokenizedPair> {
    let mut rng = StdRng::seed_from_u64(seed);
    // (prompt, chosen, rejected) lengths: uneven prompts, an empty prompt, an empty rejected, and a
    // pair of 17 tokens, past `phi3_longrope`'s original length of 16 (LongRoPE's long factors).
    let shapes = [(5, 4, 2), (1, 3, 6), (0, 4, 3), (9, 1, 0), (3, 7, 7), (9, 8, 5)];
    let mut toks = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(3..vocab)).collect() };
    shapes
        .iter()
        .enumerate()
        .map(|(i, &(p, c, r))| TokenizedPair { pair_id: i, prompt: toks(p), chosen: toks(c), rejected: toks(r), offset: 0.0, weight: None })
        .collect()
}

fn shared_logps(model: &CausalLm, r: &SharedPromptRows) -> (Tensor<1>, Tensor<1>) {
    shared_prompt_logprobs(model, r.prompt_ids.clone(), &r.prompt_mask, r.completion_ids.clone(), &r.full_mask, r.loss_mask.clone())
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

/// Every parameter's gradient, flattened, in visiting order.
fn grads_of(model: &CausalLm, grads: &GradientsParams) -> Vec<(String, Vec<f32>)> {
    struct V<'a> {
        grads: &'a GradientsParams,
        out: Vec<(String, Vec<f32>)>,
    }
    impl ModuleVisitor for V<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                self.out.push((format!("{:?}", param.id), to_vec(g)));
            }
        }
    }
    let mut v = V { grads, out: Vec::new() };
    model.visit(&mut v);
    v.out
}

/// Asserts that every parameter's gradient in `a` is `b`'s within 1e-4 of its largest entry, and
/// returns the worst difference relative to it.
fn same_grads(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)], what: &str) -> f32 {
    assert_eq!(a.len(), b.len(), "{what}: parameters with gradients");
    let mut worst = 0.0f32;
    for ((name, x), (_, y)) in a.iter().zip(b) {
        let scale = y.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-3);
        let diff = x.iter().zip(y).fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
        worst = worst.max(diff / scale);
        assert!(diff <= 1e-4 * scale, "{what}: gradient of {name} differs by {diff} (largest entry {scale})");
    }
    worst
}

#[test]
fn shared_prompt_forward_equals_the_concatenated_forward_with_gradients() {
    let device = common::test_device().autodiff();
    for case in CASES {
        let loaded = CausalLm::load(&fixture(case), &device).unwrap();
        let vocab = loaded.config.vocab_size() as u32;
        let model = loaded.model;
        let items = pairs(vocab, 7);
        let batch = PreferenceBatcher::new(0, None, Layout::SharedPrompt).batch(items.clone(), &device);
        let shared = batch.shared().expect("the batch has prompts and completions");
        let concat = PreferenceBatcher::new(0, None, Layout::Concatenated).batch(items.clone(), &device);
        let rows = concat.concatenated().expect("concatenated rows");
        let (s_sum, s_count) = shared_logps(&model, shared);
        let (c_sum, c_count) = completion_logprobs(&model, rows.input_ids.clone(), &rows.attention_mask, rows.loss_mask.clone(), 1);
        assert_eq!(to_vec(s_count.clone()), to_vec(c_count.clone()), "{case}: token counts");
        let (a, b) = (to_vec(s_sum.clone()), to_vec(c_sum.clone()));
        // The empty prompt predicts no first token, the empty rejected nothing at all.
        assert_eq!(to_vec(c_count)[2], 3.0, "{case}");
        assert_eq!(b[9], 0.0, "{case}");
        assert!(b[0] < -1.0 && b[6] < -1.0, "{case}: log-probs of real completions: {b:?}");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() < 2e-5 * y.abs().max(1.0), "{case} row {i}: shared {x} vs concatenated {y}");
        }

        // The same gradient for every parameter, under a loss that weighs the rows differently.
        let w: Vec<f32> = (0..a.len()).map(|i| 0.3 + 0.2 * i as f32).collect();
        let w = Tensor::<1>::from_data(TensorData::new(w, [a.len()]), &device);
        let g_shared = grads_of(&model, &GradientsParams::from_grads((s_sum * w.clone()).sum().backward(), &model));
        let g_concat = grads_of(&model, &GradientsParams::from_grads((c_sum * w).sum().backward(), &model));
        let worst = same_grads(&g_shared, &g_concat, case);
        println!("{case}: rows within {:.1e}, gradients within {worst:.1e} of their largest entry", a.iter().zip(&b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())));
    }
}

/// A mixture of experts' load-balancing loss (`loss.router_aux_loss_coef`) is the same in both
/// layouts, gradients included: the shared prompts' routing counts twice, as the concatenated rows
/// hold each prompt twice, and each completion's last token runs for its routing. Padded to a
/// multiple of 8 it does not move (padding is not routed); nor on a model without experts does a
/// value appear.
#[test]
fn router_load_balancing_loss_is_the_same_in_both_layouts() {
    use odpo_model::logprobs::RowExtras;
    let device = common::test_device().autodiff();
    let extras = RowExtras { router_aux: true, ..RowExtras::default() };
    for case in ["mixtral_moe", "qwen2_moe_shared", "qwen3_moe"] {
        let loaded = CausalLm::load(&fixture(case), &device).unwrap();
        let model = loaded.model;
        let items = pairs(loaded.config.vocab_size() as u32, 7);
        let aux = |layout, multiple| {
            let batch = PreferenceBatcher::new(0, multiple, layout).batch(items.clone(), &device);
            odpo_trainer::forward::policy_rows(&model, &batch, extras).router_aux.expect("a mixture of experts' load-balancing loss")
        };
        let (shared, concat) = (aux(Layout::SharedPrompt, None), aux(Layout::Concatenated, None));
        let (a, b) = (to_vec(shared.clone())[0], to_vec(concat.clone())[0]);
        assert!((a - b).abs() < 1e-5 * b, "{case}: shared {a} vs concatenated {b}");
        for layout in [Layout::SharedPrompt, Layout::Concatenated] {
            let padded = to_vec(aux(layout, Some(8)))[0];
            assert!((padded - b).abs() < 1e-5 * b, "{case} {layout:?} padded to 8: {padded} vs {b}");
        }
        let g_shared = grads_of(&model, &GradientsParams::from_grads(shared.backward(), &model));
        let g_concat = grads_of(&model, &GradientsParams::from_grads(concat.backward(), &model));
        let worst = same_grads(&g_shared, &g_concat, &format!("{case}, the load-balancing loss"));
        println!("{case}: load-balancing loss {a:.6} shared, {b:.6} concatenated; gradients within {worst:.1e}");
    }
    let dense = CausalLm::load(&fixture("qwen3_qk_norm"), &device).unwrap();
    let batch = PreferenceBatcher::new(0, None, Layout::SharedPrompt).batch(pairs(dense.config.vocab_size() as u32, 7), &device);
    assert!(odpo_trainer::forward::policy_rows(&dense.model, &batch, extras).router_aux.is_none());
}

/// `data.pad_to_multiple`: both layouts padded to a multiple of 8 give the log-probs of the unpadded
/// batch, for every model family (padding is masked wherever it lands).
#[test]
fn padding_to_a_multiple_changes_no_log_prob() {
    let device = common::test_device();
    for case in CASES {
        let loaded = CausalLm::load(&fixture(case), &device).unwrap();
        let model = loaded.model;
        let items = pairs(loaded.config.vocab_size() as u32, 11);
        let batch = |multiple, layout| PreferenceBatcher::new(0, multiple, layout).batch(items.clone(), &device);
        let (plain_shared, padded_shared) = (batch(None, Layout::SharedPrompt), batch(Some(8), Layout::SharedPrompt));
        let (plain_concat, padded_concat) = (batch(None, Layout::Concatenated), batch(Some(8), Layout::Concatenated));
        let shared = padded_shared.shared().expect("shared layout");
        let (plain, padded) = (plain_concat.concatenated().expect("concatenated"), padded_concat.concatenated().expect("concatenated"));
        for width in [padded.input_ids.dims()[1], shared.prompt_ids.dims()[1], shared.completion_ids.dims()[1]] {
            assert_eq!(width % 8, 0, "{case}: width {width}");
        }
        assert!(padded.input_ids.dims()[1] > plain.input_ids.dims()[1] || plain.input_ids.dims()[1] % 8 == 0, "{case}: nothing was padded");
        let (a, _) = shared_logps(&model, plain_shared.shared().expect("shared layout"));
        let (b, _) = shared_logps(&model, shared);
        let (c, _) = completion_logprobs(&model, plain.input_ids.clone(), &plain.attention_mask, plain.loss_mask.clone(), 1);
        let (d, _) = completion_logprobs(&model, padded.input_ids.clone(), &padded.attention_mask, padded.loss_mask.clone(), 1);
        for (x, y) in to_vec(a).iter().zip(to_vec(b)).chain(to_vec(c).iter().zip(to_vec(d))) {
            assert!((x - y).abs() < 2e-5 * y.abs().max(1.0), "{case}: unpadded {x} vs padded {y}");
        }
    }
}

/// `train.gradient_checkpointing`: burn's balanced checkpointing recomputes activations in the
/// backward pass; every parameter's gradient equals the plain run's within 1e-6 of its largest entry,
/// for every model family, in both batch layouts, trained whole and through LoRA adapters on every
/// projection (whose sums are recorded apart under checkpointing: `odpo_kernels::scaled_sum`).
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let plain = odpo_trainer::step::autodiff(&common::test_device(), false);
    let checkpointed = odpo_trainer::step::autodiff(&common::test_device(), true);
    assert_ne!(plain.gradient_checkpointing_strategy(), checkpointed.gradient_checkpointing_strategy());
    let lora = odpo_model::LoraConfig { rank: 2, targets: vec!["all-linear".into()], ..odpo_model::LoraConfig::default() };
    for (case, adapted) in CASES.iter().flat_map(|c| [(c, false), (c, true)]) {
        for layout in [Layout::SharedPrompt, Layout::Concatenated] {
            let grads = |device: &burn::tensor::Device| {
                let mut loaded = CausalLm::load(&fixture(case), device).unwrap();
                if adapted {
                    loaded.model = loaded.model.with_lora(&lora, device).unwrap();
                }
                let items = pairs(loaded.config.vocab_size() as u32, 5);
                let batch = PreferenceBatcher::new(0, None, layout).batch(items, device);
                let (sum, _) = odpo_trainer::forward::row_logps(&loaded.model, &batch);
                let w: Vec<f32> = (0..sum.dims()[0]).map(|i| 0.5 - 0.1 * i as f32).collect();
                let loss = (sum * Tensor::<1>::from_data(TensorData::new(w.clone(), [w.len()]), device)).sum();
                grads_of(&loaded.model, &GradientsParams::from_grads(loss.backward(), &loaded.model))
            };
            let (a, b) = (grads(&plain), grads(&checkpointed));
            assert_eq!(a.len(), b.len(), "{case}: parameters with gradients");
            assert!(!a.is_empty() && a.iter().any(|(_, g)| g.iter().any(|v| *v != 0.0)), "{case} (LoRA: {adapted}): no gradient");
            for ((_, x), (_, y)) in a.iter().zip(&b) {
                let scale = x.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
                let diff = x.iter().zip(y).fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
                assert!(diff <= 1e-6 * scale, "{case} {layout:?} (LoRA: {adapted}): a gradient differs by {diff} (largest entry {scale})");
            }
        }
    }
}

/// `loss.ld_alpha`: a row's sum is its first `shared` counted tokens plus α times the rest, `shared` the
/// shorter of the pair's two responses (TRL's LD-DPO). Reference: the same pairs with both responses cut
/// to that length, whose sums are the shared parts (a causal model's earlier log-probs do not see later
/// tokens); the counts stay the responses' own.
#[test]
fn ld_alpha_weighs_the_tokens_beyond_the_shared_length() {
    let device = common::test_device();
    for case in ["gpt2", "llama3_rope"] {
        let loaded = CausalLm::load(&fixture(case), &device).unwrap();
        let model = loaded.model;
        let items = pairs(loaded.config.vocab_size() as u32, 13);
        // Counted tokens: the first token of a sequence (an empty prompt's) is never predicted.
        let counted = |p: &TokenizedPair, c: &[u32]| c.len() - usize::from(p.prompt.is_empty() && !c.is_empty());
        let cut: Vec<TokenizedPair> = items
            .iter()
            .map(|p| {
                let shared = counted(p, &p.chosen).min(counted(p, &p.rejected));
                let keep = |c: &[u32]| c[..(shared + usize::from(p.prompt.is_empty() && !c.is_empty())).min(c.len())].to_vec();
                TokenizedPair { chosen: keep(&p.chosen), rejected: keep(&p.rejected), ..p.clone() }
            })
            .collect();
        let counts: Vec<f32> = items.iter().map(|p| counted(p, &p.chosen) as f32).chain(items.iter().map(|p| counted(p, &p.rejected) as f32)).collect();
        for layout in [Layout::SharedPrompt, Layout::Concatenated] {
            let rows = |items: &[TokenizedPair], ld: Option<f32>| {
                let batch = PreferenceBatcher::new(0, None, layout).with_ld_alpha(ld).batch(items.to_vec(), &device);
                let (sum, count) = odpo_trainer::forward::row_logps(&model, &batch);
                (to_vec(sum), to_vec(count))
            };
            let (full, full_counts) = rows(&items, None);
            let (shared, _) = rows(&cut, None);
            assert_eq!(full_counts, counts, "{case} {layout:?}");
            assert!(full.iter().zip(&shared).any(|(f, s)| (f - s).abs() > 0.1), "{case} {layout:?}: no pair has tokens beyond its shared length");
            // α = 1 leaves the mask as it is: the same bits.
            assert_eq!(rows(&items, Some(1.0)), (full.clone(), counts.clone()), "{case} {layout:?}: α = 1");
            for alpha in [0.0f32, 0.3, 0.75] {
                let (got, got_counts) = rows(&items, Some(alpha));
                assert_eq!(got_counts, counts, "{case} {layout:?} α = {alpha}: the counts are the responses' own");
                for (i, ((g, f), s)) in got.iter().zip(&full).zip(&shared).enumerate() {
                    let want = s + alpha * (f - s);
                    assert!((g - want).abs() < 2e-5 * want.abs().max(1.0), "{case} {layout:?} α = {alpha}, row {i}: {g} vs {want}");
                }
            }
        }
    }
}

/// `loss.use_weighting` (WPO): each row's mean over its response tokens of log p(y_t) − log Σ_v p_v²,
/// from both layouts, with and without LD-DPO's weights (which WPO does not read), against f64 values
/// from the logits of each prompt + response run alone, unpadded. A response without counted tokens
/// gives 0.
#[test]
fn wpo_means_match_each_sequence_run_alone() {
    let device = common::test_device();
    for case in ["gpt2", "llama3_rope"] {
        let loaded = CausalLm::load(&fixture(case), &device).unwrap();
        let model = loaded.model;
        let items = pairs(loaded.config.vocab_size() as u32, 29);
        let mean_of = |p: &TokenizedPair, response: &[u32]| -> f64 {
            let ids: Vec<i64> = p.prompt.iter().chain(response).map(|&t| i64::from(t)).collect();
            let n = ids.len();
            if n < 2 || response.is_empty() {
                return 0.0;
            }
            let input = Tensor::<2, burn::tensor::Int>::from_data(TensorData::new(ids.clone(), [1, n]), &device);
            let mask = Tensor::<2, burn::tensor::Int>::ones([1, n], &device);
            let logits = to_vec(model.forward(input, &mask, None));
            let v = logits.len() / n;
            let first = p.prompt.len().max(1);
            let terms: Vec<f64> = (first..n)
                .map(|c| {
                    let row: Vec<f64> = logits[(c - 1) * v..c * v].iter().map(|&x| f64::from(x)).collect();
                    let m = row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x));
                    let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                    let lsq = row.iter().map(|x| (2.0 * (x - lse)).exp()).sum::<f64>().ln();
                    row[ids[c] as usize] - lse - lsq
                })
                .collect();
            terms.iter().sum::<f64>() / terms.len().max(1) as f64
        };
        let want: Vec<f64> = items.iter().map(|p| mean_of(p, &p.chosen)).chain(items.iter().map(|p| mean_of(p, &p.rejected))).collect();
        assert!(want.iter().any(|w| w.abs() > 1e-3), "{case}: the means should not all vanish");
        for layout in [Layout::SharedPrompt, Layout::Concatenated] {
            for ld in [None, Some(0.3f32)] {
                let batch = PreferenceBatcher::new(0, None, layout).with_ld_alpha(ld).batch(items.clone(), &device);
                let got = to_vec(odpo_trainer::forward::policy_rows(&model, &batch, odpo_model::logprobs::RowExtras { wpo: true, ..Default::default() }).wpo.unwrap());
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!((f64::from(*g) - w).abs() < 2e-5 * w.abs().max(1.0), "{case} {layout:?} ld_alpha {ld:?}, row {i}: {g} vs {w}");
                }
            }
        }
    }
}
