//! End-to-end runs of the trainer on a tiny random GPT-2 and synthetic pairs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use burn::tensor::Device;
use common::*;

fn device() -> Device {
    odpo_model::backend::device("flex").expect("flex backend")
}

fn f(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

#[test]
fn odpo_lowers_the_loss_and_raises_heldout_accuracy() {
    let dir = scratch("odpo-learns");
    let model = tiny_model(&dir);
    let run = dir.join("run");
    let cfg = config(&model, &run, "", &["train.batch_size=8", "train.micro_batch_size=4", "train.max_steps=200", "train.log_every=20", "eval.every=100"]);
    let summary = odpo_trainer::train_on(&cfg, data(256, 64), &device(), false, None).expect("training");
    let start = summary.eval_start.expect("eval at start");
    let end = summary.eval_end.expect("eval at end");
    println!("eval start: {start:?}\neval end:   {end:?}\ntrain loss: {:?}", summary.train_loss);
    assert!(end["loss"] < start["loss"] - 0.3, "eval loss {} -> {}", start["loss"], end["loss"]);
    assert!(end["rewards/accuracies"] > 0.9, "held-out accuracy {} -> {}", start["rewards/accuracies"], end["rewards/accuracies"]);
    assert!(end["rewards/margins"] > start["rewards/margins"]);
    // metrics.jsonl and .csv hold every loss-crate metric and the throughput figures.
    let train_rows = metric_rows(&run, "train");
    assert_eq!(train_rows.len(), 10);
    for key in odpo_loss::Metrics::NAMES.iter().chain(&["lr", "grad_norm", "tokens_per_s", "pairs_per_s"]) {
        assert!(f(&train_rows[0], key).is_finite(), "{key} missing from {}", train_rows[0]);
    }
    assert_eq!(metric_rows(&run, "eval").len(), 3);
    let csv = std::fs::read_to_string(run.join("metrics.csv")).expect("csv");
    assert!(csv.starts_with("step,split,rewards/chosen,"));
    assert!(run.join("config.toml").is_file());
    // The export loads back as a model.
    let loaded = odpo_model::CausalLm::load(&run.join("model"), &device()).expect("exported model loads");
    assert_eq!(loaded.config.vocab_size(), VOCAB as usize);
}

#[test]
fn accumulation_averages_like_one_big_batch() {
    let dir = scratch("accumulation");
    let model = tiny_model(&dir);
    let mut weights = Vec::new();
    for micro in [8, 2, 1] {
        let run = dir.join(format!("micro{micro}"));
        let m = format!("train.micro_batch_size={micro}");
        let cfg = config(&model, &run, "", &["train.batch_size=8", &m, "train.max_steps=4", "eval.at_start=false", "optim.max_grad_norm=0.05"]);
        let mut d = data(64, 0);
        // Unequal per-pair weights: the average must be weighted across micro-batches too.
        for (i, p) in d.train.iter_mut().enumerate() {
            p.weight = Some(1.0 + (i % 3) as f32);
        }
        odpo_trainer::train_on(&cfg, d, &device(), false, None).expect("training");
        weights.push(exported_floats(&run));
    }
    for other in &weights[1..] {
        for ((name, a), (_, b)) in weights[0].iter().zip(other) {
            let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(worst < 2e-5, "{name}: max difference {worst}");
        }
    }
}

#[test]
fn cached_reference_gives_the_frozen_losses() {
    let dir = scratch("refcache");
    let model = tiny_model(&dir);
    let mut losses = Vec::new();
    for (i, mode) in ["frozen", "cached", "cached"].into_iter().enumerate() {
        let run = dir.join(format!("run{i}"));
        let r = format!("train.reference=\"{mode}\"");
        let cfg = config(&model, &run, "", &["train.batch_size=4", "train.micro_batch_size=4", "train.max_steps=6", "train.log_every=1", "eval.batch_size=4", &r]);
        odpo_trainer::train_on(&cfg, data(32, 8), &device(), false, None).expect("training");
        let rows: Vec<f64> = metric_rows(&run, "train").iter().chain(&metric_rows(&run, "eval")).map(|r| f(r, "loss")).collect();
        losses.push(rows);
    }
    let cache_files = std::fs::read_dir(dir.join("refcache")).expect("cache dir").count();
    assert_eq!(cache_files, 1, "the second cached run reuses the first one's file");
    for (a, b) in losses[0].iter().zip(&losses[1]) {
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "frozen {a} vs cached {b}");
    }
    assert_eq!(losses[1], losses[2]);
}

#[test]
fn both_row_layouts_train_alike_and_auto_takes_the_shared_prompt_on_the_cpu() {
    let dir = scratch("layouts");
    let model = tiny_model(&dir);
    let mut losses = Vec::new();
    for layout in ["auto", "shared-prompt", "concatenated"] {
        let run = dir.join(layout);
        let l = format!("train.layout=\"{layout}\"");
        let cfg = config(&model, &run, "", &["train.batch_size=4", "train.micro_batch_size=4", "train.max_steps=6", "train.log_every=1", "eval.batch_size=4", &l]);
        let summary = odpo_trainer::train_on(&cfg, data(32, 8), &device(), false, None).expect("training");
        let want = if layout == "concatenated" { odpo_data::Layout::Concatenated } else { odpo_data::Layout::SharedPrompt };
        assert_eq!(summary.layout, want, "{layout} on flex");
        losses.push(metric_rows(&run, "train").iter().chain(&metric_rows(&run, "eval")).map(|r| f(r, "loss")).collect::<Vec<f64>>());
    }
    assert_eq!(losses[0], losses[1], "auto is the shared prompt on flex");
    // Six steps of training apart, the two layouts differ only by rounding.
    assert_eq!(losses[1].len(), losses[2].len());
    let gap = losses[1].iter().zip(&losses[2]).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    println!("losses, shared prompt: {:?}\nlargest gap to the concatenated rows: {gap:.3e}", losses[1]);
    for (a, b) in losses[1].iter().zip(&losses[2]) {
        assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "shared prompt {a} vs concatenated {b}");
    }
}

#[test]
fn sft_lowers_the_nll() {
    let dir = scratch("sft");
    let model = tiny_model(&dir);
    let run = dir.join("run");
    let cfg = as_sft(config(&model, &run, "", &["train.batch_size=8", "train.micro_batch_size=4", "train.max_steps=60", "eval.every=0"]));
    let summary = odpo_trainer::train_on(&cfg, data(128, 32), &device(), false, None).expect("training");
    let (start, end) = (summary.eval_start.expect("start"), summary.eval_end.expect("end"));
    println!("sft nll {} -> {}", start["nll"], end["nll"]);
    assert!(end["nll"] < start["nll"] - 0.5);
}

#[test]
fn nan_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let dir = scratch("nan");
    let model = tiny_model(&dir);
    let run = dir.join("run");
    let cfg = config(&model, &run, "", &["train.batch_size=4", "train.micro_batch_size=2", "train.max_steps=8", "train.checkpoint_every=1", "eval.at_start=false"]);
    let mut d = data(8, 0);
    // A pair first met at step 1 (the order is a function of the seed) gets a NaN offset.
    let later = odpo_trainer::data::stream_slice(8, cfg.train.seed, 4, 4)[0];
    d.train[later].offset = f32::NAN;
    let err = odpo_trainer::train_on(&cfg, d, &device(), false, None).map(|_| ()).expect_err("NaN must stop the run");
    let msg = err.to_string();
    println!("{msg}");
    assert!(msg.starts_with("non-finite loss at step 1 (pairs ["), "{msg}");
    assert!(msg.contains(&format!("is pair id {later})")) && msg.contains("input `offset` is NaN"), "{msg}");
    let ckpts = odpo_trainer::checkpoint::list(&run).expect("list");
    assert_eq!(ckpts.len(), 1);
    assert_eq!(odpo_trainer::checkpoint::read_state(&ckpts[0]).expect("state").step, 1);
}

#[test]
fn a_run_folder_with_checkpoints_needs_resume() {
    let dir = scratch("needs-resume");
    let model = tiny_model(&dir);
    let run = dir.join("run");
    let cfg = config(&model, &run, "", &["train.batch_size=4", "train.micro_batch_size=4", "train.max_steps=2", "eval.at_start=false", "output.export=false"]);
    odpo_trainer::train_on(&cfg, data(8, 0), &device(), false, None).expect("training");
    let err = odpo_trainer::train_on(&cfg, data(8, 0), &device(), false, None).map(|_| ()).expect_err("second start");
    assert!(err.to_string().contains("already holds the checkpoints of a run; resume that run or choose another folder"), "{err}");
    // Resuming a finished run does no more steps.
    let s = odpo_trainer::train_on(&cfg, data(8, 0), &device(), true, None).expect("resume");
    assert_eq!((s.resumed_from, s.steps), (Some(2), 2));
}

/// Data tokenized for another model, an id past the 64-token vocabulary in one held-out pair, is
/// refused before the first step, naming the pair; the forward pass would index past the embedding.
#[test]
fn tokens_past_the_vocabulary_are_refused_naming_the_pair() {
    let dir = scratch("tokens-past-vocab");
    let model = tiny_model(&dir);
    let cfg = config(&model, &dir.join("run"), "", &["train.batch_size=4", "train.micro_batch_size=4", "train.max_steps=1"]);
    let mut d = data(8, 2);
    d.eval[1].chosen[0] = VOCAB;
    let err = odpo_trainer::train_on(&cfg, d, &device(), false, None).map(|_| ()).expect_err("an id of 64");
    assert_eq!(err.to_string(), "pair 100001 (for the model) holds token id 64, past the model's vocabulary of 64 (ids 0 to 63): the tokenizer, or the data's tokens, are not the model's");
}

/// A random init from a config no model can have: the error names that config file and the key.
#[test]
fn a_random_inits_bad_sizes_name_its_config_file() {
    let dir = scratch("random-init-sizes");
    let model = tiny_model(&dir);
    let file = model.join("config.json");
    let text = std::fs::read_to_string(&file).unwrap().replace("\"n_head\":4", "\"n_head\":3");
    std::fs::write(&file, text).unwrap();
    let cfg = config(&model, &dir.join("run"), "", &["train.batch_size=4", "train.micro_batch_size=4", "train.max_steps=1"]);
    let err = odpo_trainer::train_on(&cfg, data(8, 0), &device(), false, None).map(|_| ()).expect_err("three heads over 32 wide");
    assert_eq!(err.to_string(), format!("{}: n_embd (32) must be a multiple of n_head (3)", file.display()));
}

#[test]
fn every_config_in_configs_parses_and_validates() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&root).expect("configs/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            odpo_trainer::RunConfig::from_file(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 2);
}

/// Pairs whose chosen and rejected responses are the same: the gradient cancels, the reward margin
/// stays 0, nothing learns. The run stops with an error naming that after `train.stop_if_not_learning`
/// steps, before its budget is spent; with the guard off it runs to the end.
#[test]
fn a_run_that_learns_nothing_stops_with_an_error() {
    let dir = scratch("not-learning");
    let model = tiny_model(&dir);
    let mut d = data(64, 0);
    for p in &mut d.train {
        p.rejected = p.chosen.clone();
    }
    let cfg = config(&model, &dir.join("run"), "", &["train.batch_size=8", "train.micro_batch_size=8", "train.max_steps=200", "train.stop_if_not_learning=5", "eval.at_start=false"]);
    let e = odpo_trainer::train_on(&cfg, d.clone(), &device(), false, None).map(|_| ()).unwrap_err().to_string();
    assert!(e.starts_with("nothing is learning: the gradient norm was") && e.contains("for 5 steps in a row up to step 5") && e.contains("reward margin at"), "{e}");
    let cfg = config(&model, &dir.join("run-off"), "", &["train.batch_size=8", "train.micro_batch_size=8", "train.max_steps=12", "train.stop_if_not_learning=0", "eval.at_start=false"]);
    assert_eq!(odpo_trainer::train_on(&cfg, d, &device(), false, None).unwrap().steps, 12);
}

/// Held-out pairs that prefer what training teaches against: each training step makes their loss
/// worse, so the best evaluated model is the starting one.
fn data_against_training(train: usize, eval: usize) -> odpo_trainer::RunData {
    let mut d = data(train, eval);
    for p in &mut d.eval {
        std::mem::swap(&mut p.chosen, &mut p.rejected);
    }
    d
}

/// `eval.early_stopping`: the run stops after `patience` evaluations without a better eval loss,
/// ends with the best evaluated model (here the starting one, checked against the random init
/// exported on its own), and a run resumed before the stop stops at the same step with the same
/// export; `restore_best = false` ends with the last model instead.
#[test]
fn early_stopping_stops_after_patience_and_ends_with_the_best_model() {
    let dir = scratch("early-stop");
    let model = tiny_model(&dir);
    let sets = [
        "train.batch_size=4",
        "train.micro_batch_size=2",
        "train.max_steps=40",
        "train.log_every=2",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=10",
        "optim.lr=1e-2",
        "eval.every=2",
        "eval.early_stopping.patience=3",
    ];
    let run = dir.join("run");
    let summary = odpo_trainer::train_on(&config(&model, &run, "", &sets), data_against_training(64, 16), &device(), false, None).expect("training");

    // The stop step, replayed from the eval rows: three evaluations in a row not below the best.
    let rows = metric_rows(&run, "eval");
    let (mut best, mut since, mut stop) = ((0usize, f64::INFINITY), 0, None);
    for r in &rows {
        let (step, loss) = (r["step"].as_u64().unwrap() as usize, f(r, "loss"));
        if loss < best.1 {
            (best, since) = ((step, loss), 0);
        } else {
            since += 1;
            if since == 3 {
                stop = Some(step);
                break;
            }
        }
    }
    println!("eval losses: {:?}", rows.iter().map(|r| (r["step"].as_u64().unwrap(), f(r, "loss"))).collect::<Vec<_>>());
    assert_eq!(best.0, 0, "training against the held-out preference should only make its loss worse");
    assert_eq!(stop, Some(6));
    assert!(summary.stopped_early);
    assert_eq!(summary.steps, 6);
    assert_eq!(summary.best_step, Some(0));
    assert_eq!(summary.eval_end.as_ref().unwrap()["loss"], best.1);
    assert_eq!(rows.last().unwrap()["step"], 6, "no evaluation after the stop");

    // The export is the starting model: the random init exported on its own.
    let model_cfg = odpo_model::ModelConfig::from_file(&model.join("config.json")).unwrap();
    let cfg = config(&model, &run, "", &sets);
    let init = odpo_model::CausalLm::random(&model_cfg, cfg.train.seed, &device()).unwrap();
    odpo_trainer::export(&init, &model_cfg, &dir.join("init/model"), None).unwrap();
    assert!(exported(&run) == exported(&dir.join("init")), "the export is not the best (starting) model");

    // Without restore_best: the last model, which differs.
    let last = dir.join("last");
    let sets_last: Vec<&str> = sets.iter().copied().chain(["eval.early_stopping.restore_best=false"]).collect();
    let s = odpo_trainer::train_on(&config(&model, &last, "", &sets_last), data_against_training(64, 16), &device(), false, None).expect("training");
    assert!(s.stopped_early && s.steps == 6 && s.best_step.is_none());
    assert!(exported(&last) != exported(&run), "restore_best = false should end with the last model");
    assert!(!last.join("best").exists());

    // Cut at step 4 (its later checkpoints and export removed) and resumed: the same stop and export.
    for ckpt in odpo_trainer::checkpoint::list(&run).unwrap() {
        if odpo_trainer::checkpoint::read_state(&ckpt).unwrap().step > 4 {
            std::fs::remove_dir_all(&ckpt).unwrap();
        }
    }
    std::fs::remove_dir_all(run.join("model")).unwrap();
    let resumed = odpo_trainer::train_on(&config(&model, &run, "", &sets), data_against_training(64, 16), &device(), true, None).expect("resumed");
    assert_eq!((resumed.resumed_from, resumed.steps, resumed.stopped_early, resumed.best_step), (Some(4), 6, true, Some(0)));
    assert!(exported(&run) == exported(&dir.join("init")), "the resumed run does not end with the best model");
    // Resuming a run that stopped trains no further.
    let again = odpo_trainer::train_on(&config(&model, &run, "", &sets), data_against_training(64, 16), &device(), true, None).expect("resumed again");
    assert_eq!((again.resumed_from, again.steps), (Some(6), 6));
}

/// An early-stopping metric the evaluation does not report is an error that names the setting.
#[test]
fn an_unknown_early_stopping_metric_is_named() {
    let dir = scratch("early-stop-metric");
    let model = tiny_model(&dir);
    let cfg = config(&model, &dir.join("run"), "", &["train.max_steps=4", "eval.every=2", "eval.early_stopping.metric=\"accuracy\""]);
    let e = odpo_trainer::train_on(&cfg, data(16, 4), &device(), false, None).unwrap_err().to_string();
    assert!(e.contains("eval.early_stopping.metric") && e.contains("rewards/accuracies"), "{e}");
}

/// A model exported with a GGUF file as its tokenizer source (no tokenizer.json beside it) gets the
/// file's own tokenizer written out, which reads back as the same tokenizer.
#[test]
fn export_writes_a_gguf_files_own_tokenizer() {
    use odpo_model::tokenizer::Tokenizer;
    let dir = scratch("export-gguf-tokenizer");
    let model_cfg = odpo_model::ModelConfig::from_file(&tiny_model(&dir).join("config.json")).unwrap();
    let policy = odpo_model::CausalLm::random(&model_cfg, 0, &device()).unwrap();
    let gguf = dir.join("vocab.gguf");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("../odpo-model/tests/fixtures/gguf/vocab/llama-bpe.gguf"), &gguf).unwrap();
    let out = odpo_trainer::export(&policy, &model_cfg, &dir.join("model"), Some(&gguf)).unwrap();
    let (saved, own) = (Tokenizer::from_dir(&out).unwrap(), Tokenizer::from_gguf(&gguf).unwrap());
    let text = "It's 2024 <|im_start|>user\nhi<|im_end|>";
    assert_eq!(saved.encode(text, true).unwrap(), own.encode(text, true).unwrap());
    assert_eq!(saved.encode(text, true).unwrap()[0], 1, "the file asks for BOS");
    assert!(saved.has_chat_template() && out.join("config.json").is_file());
}

/// A finished run resumed under its own config (the built-in pipeline resumes its finished stages):
/// its last evaluation is read from its metrics, not run again; no row and no checkpoint is
/// written. Under a changed evaluation setting the evaluation runs again.
#[test]
fn a_finished_run_resumed_as_it_was_keeps_its_last_evaluation() {
    let dir = scratch("finished-resumed");
    let model = tiny_model(&dir);
    let run = dir.join("run");
    let sets = ["train.batch_size=4", "train.max_steps=3", "eval.at_start=false"];
    let cfg = config(&model, &run, "", &sets);
    let first = odpo_trainer::train_on(&cfg, data(32, 16), &device(), false, None).expect("training");
    let metrics = std::fs::read(run.join("metrics.jsonl")).unwrap();
    let checkpoints = odpo_trainer::checkpoint::list(&run).unwrap();
    assert_eq!(checkpoints.len(), 1);
    let written = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let at = written(&checkpoints[0].join("model.bpk"));
    // The model is exported again, the same bytes: its files keep their times, which key the
    // reference log-prob cache of a run that starts from it.
    let exported: Vec<std::path::PathBuf> = std::fs::read_dir(run.join("model")).unwrap().map(|e| e.unwrap().path()).collect();
    let exported_at: Vec<_> = exported.iter().map(|p| written(p)).collect();
    assert!(exported.iter().any(|p| p.ends_with("model.safetensors")), "{exported:?}");

    let again = odpo_trainer::train_on(&cfg, data(32, 16), &device(), true, None).expect("resumed");
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), metrics, "the metrics changed");
    assert_eq!(odpo_trainer::checkpoint::list(&run).unwrap(), checkpoints);
    assert_eq!(written(&checkpoints[0].join("model.bpk")), at, "the last checkpoint was written again");
    assert_eq!(exported.iter().map(|p| written(p)).collect::<Vec<_>>(), exported_at, "the exported model's files were written again");
    assert_eq!(again.eval_end, first.eval_end, "the last evaluation, read back");

    let changed = config(&model, &run, "", &[&sets[..], &["eval.max_pairs=8"]].concat());
    odpo_trainer::train_on(&changed, data(32, 16), &device(), true, None).expect("resumed");
    assert_eq!(metric_rows(&run, "eval").len(), 2, "the changed evaluation ran again");
}

/// The train and eval losses of a run of `steps` steps of 4 pairs in `run`, logged every step, with `sets`.
fn short_run_losses(run: &std::path::Path, model: &std::path::Path, steps: usize, sets: &[&str]) -> Vec<f64> {
    let steps = format!("train.max_steps={steps}");
    let mut all = vec!["train.batch_size=4", "train.micro_batch_size=4", steps.as_str(), "train.log_every=1", "eval.batch_size=4"];
    all.extend_from_slice(sets);
    odpo_trainer::train_on(&config(model, run, "", &all), data(32, 8), &device(), false, None).expect("training");
    metric_rows(run, "train").iter().chain(&metric_rows(run, "eval")).map(|r| f(r, "loss")).collect()
}

/// `loss.ld_alpha` end to end: a frozen and a cached reference give the same LD-DPO losses, the cache
/// is another file than the plain run's (its sums are other sums), and the losses differ from DPO's.
#[test]
fn ld_alpha_trains_alike_with_a_frozen_and_a_cached_reference() {
    let dir = scratch("ld-dpo");
    let model = tiny_model(&dir);
    let losses = |name: &str, sets: &[&str]| short_run_losses(&dir.join(name), &model, 4, sets);
    let plain = losses("plain", &["train.reference=\"cached\""]);
    let frozen = losses("frozen", &["loss.ld_alpha=0.25"]);
    let cached = losses("cached", &["loss.ld_alpha=0.25", "train.reference=\"cached\""]);
    assert_eq!(std::fs::read_dir(dir.join("refcache")).expect("cache dir").count(), 2, "LD-DPO's reference sums have their own cache file");
    for (a, b) in frozen.iter().zip(&cached) {
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "frozen {a} vs cached {b}");
    }
    assert!(frozen.iter().zip(&plain).skip(1).any(|(a, b)| (a - b).abs() > 1e-4), "LD-DPO's losses are DPO's: {frozen:?} vs {plain:?}");
}

/// `loss.use_weighting` (WPO) end to end: a frozen and a cached reference give the same losses (WPO's
/// weights come from the policy alone), they are not ODPO's plain losses, and `wpo/weight` is logged.
#[test]
fn wpo_trains_alike_with_a_frozen_and_a_cached_reference() {
    let dir = scratch("wpo");
    let model = tiny_model(&dir);
    let losses = |name: &str, sets: &[&str]| short_run_losses(&dir.join(name), &model, 3, sets);
    let plain = losses("plain", &[]);
    let frozen = losses("frozen", &["loss.use_weighting=true"]);
    for row in metric_rows(&dir.join("frozen"), "train").iter().chain(&metric_rows(&dir.join("frozen"), "eval")) {
        let w = f(row, "wpo/weight");
        assert!(w.is_finite() && w > 0.0, "wpo/weight is logged: {row}");
    }
    let cached = losses("cached", &["loss.use_weighting=true", "train.reference=\"cached\""]);
    for (a, b) in frozen.iter().zip(&cached) {
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "frozen {a} vs cached {b}");
    }
    println!("plain {plain:?}\nWPO {frozen:?}");
    assert!(frozen.iter().all(|l| l.is_finite()) && frozen.iter().zip(&plain).any(|(a, b)| (a - b).abs() > 1e-3), "WPO's losses are ODPO's: {frozen:?} vs {plain:?}");
}

/// A tiny random Mixtral (4 experts, 2 a token) in `dir`, with `extra` keys in its config.
fn tiny_mixtral(dir: &std::path::Path, extra: serde_json::Value) -> std::path::PathBuf {
    let mut cfg = serde_json::json!({
        "architectures": ["MixtralForCausalLM"], "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
        "num_experts_per_tok": 2, "max_position_embeddings": 64, "eos_token_id": 1, "bos_token_id": 1
    });
    cfg.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let path = dir.join("tiny-mixtral");
    std::fs::create_dir_all(&path).unwrap();
    std::fs::write(path.join("config.json"), cfg.to_string()).unwrap();
    path
}

/// `loss.router_aux_loss_coef` end to end on a tiny random Mixtral: the load-balancing loss is
/// logged as `router/aux_loss`, in training and in evaluation, and enters the gradient (the first
/// step's objective is the plain run's, the later ones differ); unset, the model config's
/// coefficient (0.001 where absent) applies whatever `output_router_logits` says, as TRL 1.16 takes
/// it, and the key at 0 turns it off. Set on a model without experts, it is refused.
#[test]
fn the_routers_load_balancing_loss_trains_a_mixture_of_experts() {
    let dir = scratch("router-aux");
    let plain_model = tiny_mixtral(&dir.join("plain"), serde_json::json!({}));
    let losses = |name: &str, model: &std::path::Path, sets: &[&str]| short_run_losses(&dir.join(name), model, 3, sets);
    let aux_of = |name: &str, split: &str| -> Vec<Option<f64>> { metric_rows(&dir.join(name), split).iter().map(|r| r.get("router/aux_loss").and_then(|v| v.as_f64())).collect() };
    let plain = losses("plain", &plain_model, &["loss.router_aux_loss_coef=0"]);
    assert!(aux_of("plain", "train").iter().chain(&aux_of("plain", "eval")).all(Option::is_none), "no load-balancing loss at 0");
    let aux = losses("aux", &plain_model, &["loss.router_aux_loss_coef=1.0"]);
    let logged: Vec<f64> = aux_of("aux", "train").into_iter().flatten().collect();
    let eval: Vec<f64> = aux_of("aux", "eval").into_iter().flatten().collect();
    println!("plain {plain:?}\nwith the load-balancing loss {aux:?}, which was {logged:?}, and in evaluation {eval:?}");
    assert!(logged.len() == 3 && logged.iter().all(|a| a.is_finite() && *a > 0.0), "router/aux_loss is logged every step: {logged:?}");
    assert!(!eval.is_empty() && eval.iter().all(|a| a.is_finite() && *a > 0.0), "router/aux_loss is logged in evaluation: {eval:?}");
    assert!((aux[0] - plain[0]).abs() <= 1e-6 * plain[0].abs(), "the first step's objective: {} vs {}", aux[0], plain[0]);
    assert!(aux.iter().zip(&plain).skip(1).any(|(a, b)| (a - b).abs() > 1e-5), "the load-balancing loss moved nothing: {aux:?} vs {plain:?}");
    // Unset: the model config's coefficient, with `output_router_logits` false too; transformers'
    // 0.001 where the config has none. The key's 0 turns it off.
    let on = tiny_mixtral(&dir.join("on"), serde_json::json!({"output_router_logits": false, "router_aux_loss_coef": 1.0}));
    let from_config = losses("from-config", &on, &[]);
    for (a, b) in from_config.iter().zip(&aux) {
        assert!((a - b).abs() <= 1e-6 * b.abs(), "the model config's coefficient: {from_config:?} vs the key's {aux:?}");
    }
    let default = losses("default", &plain_model, &[]);
    assert!(aux_of("default", "train").iter().all(|a| a.is_some_and(|a| a > 0.0)), "transformers' 0.001 where the config has none");
    // The second step's objective: moved from the plain run's, by less than with the key's 1.0.
    assert!(default[1] != plain[1] && (default[1] - plain[1]).abs() < (aux[1] - plain[1]).abs(), "{default:?}");
    let off = losses("off", &on, &["loss.router_aux_loss_coef=0.0"]);
    assert_eq!(off, plain, "`loss.router_aux_loss_coef = 0` turns it off");
    // The SFT stage adds it too, as TRL's SFTTrainer does; of the loss table it takes this key alone.
    let sft = |name: &str, coef: f64| {
        let run = dir.join(name);
        let sets = ["train.batch_size=4", "train.micro_batch_size=2", "train.max_steps=3", "train.log_every=1", "eval.batch_size=4"];
        let cfg = edit(as_sft(config(&plain_model, &run, "", &sets)), |c| c.loss = Some(odpo_loss::LossConfig { router_aux_loss_coef: Some(coef), ..Default::default() }));
        odpo_trainer::train_on(&cfg, data(32, 8), &device(), false, None).expect("SFT");
        metric_rows(&run, "train").iter().map(|r| (f(r, "nll"), r.get("router/aux_loss").and_then(|v| v.as_f64()))).collect::<Vec<_>>()
    };
    let (sft_plain, sft_aux) = (sft("sft-plain", 0.0), sft("sft-aux", 1.0));
    println!("SFT {sft_plain:?}\nwith the load-balancing loss {sft_aux:?}");
    assert!(sft_plain.iter().all(|(_, a)| a.is_none()) && sft_aux.iter().all(|(_, a)| a.is_some_and(|a| a.is_finite() && a > 0.0)), "{sft_aux:?}");
    assert_eq!(sft_aux[0].0, sft_plain[0].0, "the first step's NLL");
    assert!(sft_aux.iter().zip(&sft_plain).skip(1).any(|(a, b)| (a.0 - b.0).abs() > 1e-6), "the load-balancing loss moved nothing in SFT");
    assert!(aux_of("sft-aux", "eval").iter().all(|a| a.is_some_and(|a| a > 0.0)), "and in its evaluation");
    // Refused where it would do nothing.
    let gpt2 = tiny_model(&dir);
    let err = odpo_trainer::train_on(&config(&gpt2, &dir.join("dense"), "", &["loss.router_aux_loss_coef=0.01", "train.max_steps=1"]), data(8, 2), &device(), false, None).map(|_| ()).expect_err("a model without experts");
    assert!(err.to_string().contains("loss.router_aux_loss_coef") && err.to_string().contains("the model has no experts"), "{err}");
}

/// The float weights of a model, in visiting order.
fn weights(m: &odpo_model::CausalLm) -> Vec<Vec<f32>> {
    struct V(Vec<Vec<f32>>);
    impl burn::module::ModuleVisitor for V {
        fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<burn::tensor::Tensor<D>>) {
            self.0.push(p.val().into_data().convert::<f32>().try_into_vec::<f32>().unwrap());
        }
    }
    let mut v = V(Vec::new());
    odpo_model::Module::visit(m, &mut v);
    v.0
}

/// TR-DPO (`train.sync_ref_model`): every τ = 2 steps the reference becomes (1 − α)·itself + α·the
/// policy, as the checkpoints' own files show (their `reference.bpk` against their `model.bpk` and the
/// starting weights); and a run resumed from a checkpoint, which keeps that reference, ends with the
/// weights of the uninterrupted run.
#[test]
fn tr_dpo_moves_the_reference_and_a_resumed_run_keeps_it() {
    let dir = scratch("tr-dpo");
    let model = tiny_model(&dir);
    let sets = |steps: &'static str| ["train.batch_size=4", "train.micro_batch_size=4", steps, "train.checkpoint_every=2", "train.keep_checkpoints=10", "train.sync_ref_model=true", "train.ref_model_sync_steps=2", "train.ref_model_mixup_alpha=0.4", "eval.every=0"];
    let straight = dir.join("straight");
    odpo_trainer::train_on(&config(&model, &straight, "", &sets("train.max_steps=6")), data(32, 8), &device(), false, None).expect("TR-DPO run");

    let (cfg_path, alpha) = (model.join("config.json"), 0.4f32);
    let fresh = || odpo_model::CausalLm::random_from_file(&cfg_path, 0, &device(), false).expect("model").1;
    let ckpt = |step: usize| odpo_trainer::checkpoint::dir(&straight).join(format!("step-{step:08}"));
    let mut reference = weights(&fresh());
    let start = reference.clone();
    for step in [2, 4, 6] {
        let policy = weights(&odpo_trainer::checkpoint::load_model(&ckpt(step), fresh()).expect("policy"));
        let kept = odpo_trainer::checkpoint::load_reference(&ckpt(step), fresh()).expect("reference").expect("a TR-DPO checkpoint keeps its reference");
        reference = reference.iter().zip(&policy).map(|(r, p)| r.iter().zip(p).map(|(r, p)| r * (1.0 - alpha) + p * alpha).collect()).collect();
        for (i, (got, want)) in weights(&kept).iter().zip(&reference).enumerate() {
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-3), "step {step}, weight {i}: reference {g}, expected {w}");
            }
        }
    }
    let moved: f32 = reference.iter().zip(&start).flat_map(|(r, s)| r.iter().zip(s)).map(|(r, s)| (r - s).abs()).fold(0.0, f32::max);
    assert!(moved > 1e-4, "the reference did not move ({moved})");

    // Stopped at step 4 (its last checkpoint keeps the reference of step 4), resumed to step 6.
    let resumed = dir.join("resumed");
    odpo_trainer::train_on(&config(&model, &resumed, "", &sets("train.max_steps=4")), data(32, 8), &device(), false, None).expect("first part");
    odpo_trainer::train_on(&config(&model, &resumed, "", &sets("train.max_steps=6")), data(32, 8), &device(), true, None).expect("resumed part");
    assert!(exported(&straight) == exported(&resumed), "the resumed TR-DPO run's weights differ from the uninterrupted run's");
}
