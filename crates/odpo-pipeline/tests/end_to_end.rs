//! The default pipeline on a smaller setting: the preference-trained policy's known reward must rise
//! clearly above the SFT model's, at a finite KL, every promised file must exist, and `eval --run`
//! reproduces the run's evaluation; settings too large for the host are refused naming the
//! pipeline's keys.

#[path = "../../odpo-model/tests/common/env.rs"]
mod env;

use odpo_pipeline::{DefaultOptions, DefaultSummary, Result, eval_run, run_default};

/// The built-in pipeline on flex with these `--set` overrides, in a scratch folder of its own.
fn run_with(name: &str, sets: &[&str]) -> (env::Scratch, Result<DefaultSummary>) {
    let dir = env::scratch(name);
    let opts = DefaultOptions { sets: sets.iter().map(|s| s.to_string()).collect(), run_dir: Some(dir.to_path_buf()), ..Default::default() };
    let run = odpo_model::backend::device("flex").map_err(Into::into).and_then(|device| run_default(&opts, &device));
    (dir, run)
}

#[test]
fn default_pipeline_raises_the_known_reward() -> Result<()> {
    let (dir, run) = run_with("pipeline-e2e", &["task.sft_texts=1500", "task.pref_prompts=200", "task.eval_prompts=32", "sft.steps=200", "eval.samples_per_prompt=4"]);
    let s = run?;
    let (p, r) = (&s.eval.policy, &s.eval.reference);
    assert!(p.reward.mean > r.reward.mean + 1.0, "policy {:?} vs SFT {:?}", p.reward, r.reward);
    assert!(p.kl.seq.mean.is_finite() && p.kl.seq.mean > 0.0, "{:?}", p.kl);
    // The reference scored against itself: both estimators are exactly 0.
    assert_eq!((r.kl.seq.mean, r.kl.k3.mean), (0.0, 0.0));
    assert!(s.pairs > 150 && s.pairs <= 200, "{}", s.pairs);
    for f in [&s.metrics, &s.eval_json, &s.plot, &s.samples, &dir.join("summary.json"), &dir.join("pipeline.toml")] {
        assert!(f.is_file(), "{} is missing", f.display());
    }
    // `eval --run` on the finished run (the run's own seed by default) reproduces its evaluation from the
    // exported models; a folder that no run of this pipeline wrote is named as such.
    let device = odpo_model::backend::device("flex")?;
    assert_eq!(eval_run(&dir, None, None, &device)?, s.eval);
    let e = eval_run(&dir.join("sft"), None, None, &device).map(|_| ()).map_err(|e| e.to_string()).err().unwrap_or_default();
    assert!(e.ends_with("sft: not a run folder of the built-in task (it has no pipeline.toml); `eval --run` re-evaluates the runs of `train` without `--config`, and a `train --config` run's evaluations are in its metrics.jsonl"), "{e}");
    Ok(())
}

/// A `[model]` far too large for the host is refused before any weight is drawn, naming the
/// pipeline's own keys rather than the config file it wrote for the trainer.
#[test]
fn a_model_too_large_for_the_host_is_refused_naming_the_model_keys() {
    let (_dir, run) = run_with("pipeline-too-large", &["task.sft_texts=50", "task.pref_prompts=20", "task.eval_prompts=4", "model.n_embd=100000"]);
    let err = run.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.starts_with("config: `model` (n_layer = 2, n_embd = 100000, n_head = 4) is too large: the model's 240.0 billion parameters need at least 894.1 GiB of host memory as f32"), "{err}");
    assert!(err.ends_with("; lower model.n_embd or model.n_layer"), "{err}");
}

/// A preference batch whose activations alone exceed any host's memory is refused at the stage's
/// start, naming the pipeline's key, where flex would have been ended by the system in its first step.
#[test]
fn a_preference_batch_too_large_for_the_host_is_refused_naming_the_pipeline_key() {
    let (_dir, run) = run_with("pipeline-batch-too-large", &["task.sft_texts=200", "task.pref_prompts=40", "task.eval_prompts=4", "sft.steps=5", "pref.batch_size=50000000"]);
    let err = run.err().map(|e| e.to_string()).unwrap_or_default();
    // 100 million rows: their logits and what the two layers keep, terabytes.
    assert!(err.starts_with("not enough host memory: the training state needs at least "), "{err}");
    assert!(err.contains("the logits of a micro-batch (100000000 rows of "), "{err}");
    assert!(err.contains(" TiB), and this machine has "), "{err}");
    assert!(err.ends_with("; to fit, lower `pref.batch_size`, or run on a GPU backend (`--backend`)"), "{err}");
}
