//! What ODPO's offset does to training, on the built-in task's tiny GPT-2 (seconds each):
//! α = 0 is DPO exactly; at step 0 the pairs' gradient weights σ(Δ − β·h) rank with their score gaps;
//! after ODPO training each pair's margin β·h follows its offset, after DPO it does not; with equal gaps
//! the final KL rises with α. The pairs' content is unrelated to the gaps given them here, so only the
//! offset can tie the margins to the gaps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::tensor::{Device, Tensor, TensorData};
use odpo_data::{DataConfig, Format, Pairing};
use odpo_loss::offset::OffsetConfig;
use odpo_loss::{LossConfig, LossKind, PairLogps, preference_loss};
use odpo_pipeline::compare::spearman;
use odpo_pipeline::config::PairSelection;
use odpo_pipeline::eval::{evaluate_samples, pair_margins};
use odpo_pipeline::stages::{SweepPoint, eval_settings, load_model, prepare_task, train_pref, train_sft};
use odpo_pipeline::sample::{SampleSettings, sample};
use odpo_pipeline::{Method, PipelineConfig, synthetic};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A small task, an SFT model of it and 4 scored samples for each of 128 prompts, made once.
struct Fixture {
    cfg: PipelineConfig,
    dir: PathBuf,
    sft: PathBuf,
    eval_prompts: Vec<String>,
    /// (prompt, first text, second text, true reward of each) for every prompt whose first two differ.
    pairs: Vec<(String, String, String, f64, f64)>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        // Shared by the tests through a static, which is never dropped: the folder goes in Cargo's
        // scratch folder for integration tests, under the build folder, and is replaced each run.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("offset-effect");
        let _ = std::fs::remove_dir_all(&dir);
        let sets = ["task.sft_texts=800", "task.pref_prompts=160", "task.eval_prompts=32", "sft.steps=60", "pref.lr=2e-3", "pref.pairing=first-two", "eval.samples_per_prompt=8"];
        let cfg = PipelineConfig::default_with(&sets.map(String::from)).unwrap();
        let device = device();
        let task = prepare_task(&cfg, &dir).unwrap();
        let sft = train_sft(&cfg, &task, &dir.join("sft"), &device).unwrap();
        let samples = dir.join("samples.jsonl");
        let settings = SampleSettings { k: 2, temperature: 1.0, max_new_tokens: cfg.sample.max_new_tokens, seed: 3 };
        sample(&sft, &task.pref_prompts, &settings, &synthetic::reward(), &samples, &device).unwrap();
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&samples).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let field = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap().to_string();
        let pairs = lines
            .chunks(2)
            .filter(|c| c[0]["text"] != c[1]["text"])
            .map(|c| (field(&c[0], "prompt"), field(&c[0], "text"), field(&c[1], "text"), c[0]["reward"].as_f64().unwrap(), c[1]["reward"].as_f64().unwrap()))
            .collect::<Vec<_>>();
        assert!(pairs.len() >= 120, "only {} prompts gave two different responses", pairs.len());
        Fixture { cfg: cfg.into_inner(), dir, sft, eval_prompts: task.eval_prompts, pairs }
    })
}

fn device() -> Device {
    odpo_model::backend::device("flex").unwrap()
}

/// Writes scored responses whose first two per prompt are `(winner, loser)` with scores `(gap, 0)`:
/// `first-two` pairing then gives each pair exactly that gap.
fn write_pairs(path: &Path, pairs: &[(String, String, String, f64)]) {
    let mut text = String::new();
    for (prompt, w, l, gap) in pairs {
        text += &format!("{}\n", serde_json::json!({"prompt": prompt, "text": w, "reward": gap}));
        text += &format!("{}\n", serde_json::json!({"prompt": prompt, "text": l, "reward": 0.0}));
    }
    std::fs::write(path, text).unwrap();
}

/// The pairs with gaps drawn independently of their content: log gap ~ U(−1.5, 1.5).
fn random_gap_pairs(f: &Fixture) -> Vec<(String, String, String, f64)> {
    let mut rng = StdRng::seed_from_u64(11);
    f.pairs.iter().map(|(p, a, b, _, _)| (p.clone(), a.clone(), b.clone(), rng.random_range(-1.5f64..1.5).exp())).collect()
}

/// The data rules of a pipeline preference run on `samples`, with the offset at `alpha`.
fn data_config(samples: &Path, alpha: f64) -> DataConfig {
    let mut data = DataConfig::new(samples, Format::ScoredJsonl);
    data.pairing = Some(Pairing::FirstTwo);
    data.offset = Some(OffsetConfig { alpha, ..OffsetConfig::default() });
    (data.max_length, data.max_prompt_length, data.allow_empty_completions) = (32, Some(8), true);
    data
}

fn train(f: &Fixture, samples: &Path, method: Method, beta: f64, alpha: f64, steps: usize, tag: &str) -> PathBuf {
    let mut cfg = f.cfg.clone();
    cfg.pref.steps = Some(steps);
    cfg.pref.pairing = PairSelection::FirstTwo;
    let cfg = cfg.check().unwrap();
    let s = train_pref(&cfg, &SweepPoint { method, beta, alpha, seed: 5 }, &f.sft, samples, &f.dir.join(tag), &device()).unwrap();
    s.exported.unwrap()
}

#[test]
fn alpha_zero_is_dpo_exactly() {
    let f = fixture();
    let samples = f.dir.join("alpha0.jsonl");
    write_pairs(&samples, &random_gap_pairs(f));
    let odpo = train(f, &samples, Method::Odpo, 0.5, 0.0, 40, "alpha0-odpo");
    let dpo = train(f, &samples, Method::Dpo, 0.5, 0.0, 40, "alpha0-dpo");
    let mut compared = 0;
    for entry in std::fs::read_dir(&dpo).unwrap() {
        let name = entry.unwrap().file_name();
        if name.to_string_lossy().ends_with(".safetensors") {
            let (a, b) = (std::fs::read(odpo.join(&name)).unwrap(), std::fs::read(dpo.join(&name)).unwrap());
            assert!(a == b, "{}: ODPO with alpha 0 differs from DPO", name.to_string_lossy());
            compared += 1;
        }
    }
    assert!(compared > 0, "no weights exported in {}", dpo.display());
    // And the run moved the weights: the comparison is not between two copies of the SFT model.
    let sft: Vec<u8> = std::fs::read(f.sft.join("model.safetensors")).unwrap();
    assert!(std::fs::read(dpo.join("model.safetensors")).unwrap() != sft);
}

#[test]
fn step_zero_gradient_weights_rank_with_score_gaps() {
    let f = fixture();
    let samples = f.dir.join("step0.jsonl");
    write_pairs(&samples, &random_gap_pairs(f));
    let (beta, alpha) = (0.5, 1.0);
    let data = data_config(&samples, alpha);
    let loaded = odpo_data::load(&data).unwrap();
    let gaps: Vec<f64> = loaded.pairs.iter().map(|p| p.score_chosen.unwrap() - p.score_rejected.unwrap()).collect();
    let (model, tok) = load_model(&f.sft, &device()).unwrap();
    let (items, _) = odpo_data::tokenize_pairs(&loaded.pairs, &tok, &data).unwrap();
    assert_eq!(items.len(), gaps.len());
    // Step 0: the policy is the reference, so h = 0 and the weight of pair i is σ(Δ_i).
    let refs: Vec<&odpo_data::TokenizedPair> = items.iter().collect();
    let batch = odpo_trainer::forward::preference_batch(&refs, &odpo_data::PreferenceBatcher::default(), &device());
    let rows = odpo_trainer::forward::reference_row_logps(&model, &batch).unwrap();
    let b = items.len();
    let ad = device().autodiff();
    let t = |v: &[f32]| Tensor::<1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &ad);
    let policy_chosen = t(&rows[..b]).require_grad();
    let offsets: Vec<f32> = items.iter().map(|p| p.offset).collect();
    let counts = vec![1.0f32; b];
    let inputs = PairLogps::new(policy_chosen.clone(), t(&rows[b..]), t(&rows[..b]), t(&rows[b..]), t(&counts), t(&counts)).with_offset(t(&offsets));
    let out = preference_loss(&inputs, &LossConfig::new(LossKind::Sigmoid, beta)).unwrap();
    let grads = out.loss.backward();
    // The mean loss: dℓ/d log π(y_w)_i = −β·σ(Δ_i − β·h_i)/B.
    let grad: Vec<f64> = policy_chosen.grad(&grads).unwrap().try_to_vec_as::<f64>().unwrap();
    let weights: Vec<f64> = grad.iter().map(|g| -g * b as f64 / beta).collect();
    for ((w, gap), off) in weights.iter().zip(&gaps).zip(&offsets) {
        let expected = 1.0 / (1.0 + (-alpha * gap.ln()).exp());
        assert!((w - expected).abs() < 1e-5, "weight {w} vs σ(α·log {gap}) = {expected}");
        assert!((f64::from(*off) - alpha * gap.ln()).abs() < 1e-5, "offset {off} vs α·log {gap}");
    }
    let rho = spearman(&weights, &gaps);
    assert!(rho > 0.999, "step-0 weights rank with the gaps: Spearman {rho}");
}

#[test]
fn odpo_margins_follow_the_offsets_and_dpo_margins_do_not() {
    let f = fixture();
    let samples = f.dir.join("rho.jsonl");
    write_pairs(&samples, &random_gap_pairs(f));
    let device = device();
    let (reference, tok) = load_model(&f.sft, &device).unwrap();
    let data = data_config(&samples, 1.0);
    let mut rho = Vec::new();
    for (method, alpha) in [(Method::Odpo, 3.0), (Method::Dpo, 0.0)] {
        let (policy, _) = load_model(&train(f, &samples, method, 0.5, alpha, 150, &format!("rho-{}", method.name())), &device).unwrap();
        let m = pair_margins(&policy, &reference, &tok, &data, &device).unwrap();
        let (h, delta): (Vec<f64>, Vec<f64>) = m.iter().map(|m| (0.5 * m.h, m.offset)).unzip();
        assert!(h.iter().sum::<f64>() > 0.0, "{}: training did not raise the margins", method.name());
        rho.push(spearman(&h, &delta));
    }
    eprintln!("Spearman(beta*h, offset) after ODPO {:.3}, after DPO {:.3} ({} pairs)", rho[0], rho[1], f.pairs.len());
    assert!(rho[0] > 0.45, "after ODPO, Spearman(beta*h, offset) = {:.3}; expected clearly positive", rho[0]);
    assert!(rho[1].abs() < 0.2, "after DPO, Spearman(beta*h, offset) = {:.3}; expected near 0", rho[1]);
    assert!(rho[0] > rho[1] + 0.3, "{rho:?}");
}

#[test]
fn with_equal_gaps_the_final_kl_rises_with_alpha() {
    let f = fixture();
    // Each pair ordered by the true reward, every gap e: Δ = α for every pair, a constant margin.
    let pairs: Vec<(String, String, String, f64)> = f
        .pairs
        .iter()
        .filter(|p| p.3 != p.4)
        .map(|(p, a, b, ra, rb)| if ra > rb { (p.clone(), a.clone(), b.clone(), 1f64.exp()) } else { (p.clone(), b.clone(), a.clone(), 1f64.exp()) })
        .collect();
    let samples = f.dir.join("equal.jsonl");
    write_pairs(&samples, &pairs);
    let device = device();
    let (reference, tok) = load_model(&f.sft, &device).unwrap();
    let mut kl = Vec::new();
    for alpha in [0.0, 2.0, 4.0] {
        let (policy, _) = load_model(&train(f, &samples, Method::Odpo, 0.5, alpha, 40, &format!("equal-a{alpha}")), &device).unwrap();
        let (ev, _, _) = evaluate_samples(&policy, &reference, &tok, &f.eval_prompts, &eval_settings(&f.cfg, 1), &synthetic::reward(), &device).unwrap();
        kl.push(ev.kl.seq.mean);
    }
    eprintln!("KL at alpha 0, 2, 4: {kl:?}");
    assert!(kl[0] < kl[1] && kl[1] < kl[2], "KL at alpha 0, 2, 4: {kl:?}");
}
