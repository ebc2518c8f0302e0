//! The built-in default, end to end: write the synthetic task (tokenizer, SFT texts, prompt split),
//! SFT a tiny GPT-2 from scratch, sample k scored responses per prompt, train ODPO (or DPO) on
//! best-vs-worst pairs from the SFT model, evaluate reward and KL on held-out prompts, plot.
//! The stages are [`crate::stages`]'s, which the frontier sweep and the experiment share.
//!
//! Run folder layout: `pipeline.toml` (resolved config), `data/` (tokenizer, `sft.jsonl`,
//! `samples.jsonl`, prompt lists), `sft/` and `<loss>/` (trainer runs: `metrics.jsonl`,
//! `model/`), `eval.json`, `eval.png`, `summary.json`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Device;
use serde::Serialize;

use crate::config::PipelineConfig;
use crate::error::{PipelineError, Result};
use crate::eval::{self, EvalReport};
use crate::plot::{self, Series};
use crate::sample::{self, SampleSettings};
use crate::stages::{SweepPoint, eval_settings, hold, load_model, pairs_in, prepare_task, say, task_score, train_pref, train_sft};
use crate::synthetic;

/// What `cargo xtask train` (no arguments) passes.
#[derive(Clone, Debug, Default)]
pub struct DefaultOptions {
    /// A pipeline config; `None`: the built-in `configs/pipeline/default.toml`.
    pub config: Option<PathBuf>,
    /// `--set key=value` overrides, e.g. `loss=dpo`.
    pub sets: Vec<String>,
    /// The run folder; `None`: `runs/<name>` (or the first free `runs/<name>-N`).
    pub run_dir: Option<PathBuf>,
    /// Print one line per stage to stdout.
    pub verbose: bool,
}

/// What a default run produced and measured.
#[derive(Clone, Debug, Serialize)]
pub struct DefaultSummary {
    /// The run folder.
    pub run_dir: PathBuf,
    /// The SFT model (HF folder with tokenizer).
    pub sft_model: PathBuf,
    /// The preference-trained policy.
    pub policy_model: PathBuf,
    /// The scored samples the pairs came from.
    pub samples: PathBuf,
    /// The preference stage's training metrics.
    pub metrics: PathBuf,
    /// `eval.json`.
    pub eval_json: PathBuf,
    /// `eval.png`.
    pub plot: PathBuf,
    /// Pairs trained on.
    pub pairs: usize,
    /// The evaluation.
    pub eval: EvalReport,
    /// Each online round's outcome (empty for one offline round).
    pub rounds: Vec<crate::rounds::RoundResult>,
    /// Seconds per stage, in order.
    pub stage_seconds: Vec<(String, f64)>,
    /// Seconds in all.
    pub wall_seconds: f64,
}

impl std::fmt::Display for DefaultSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (p, r) = (&self.eval.policy, &self.eval.reference);
        writeln!(f, "run:     {}", self.run_dir.display())?;
        writeln!(f, "metrics: {}", self.metrics.display())?;
        writeln!(f, "eval:    {}", self.eval_json.display())?;
        writeln!(f, "plot:    {}", self.plot.display())?;
        writeln!(f, "reward   SFT {:.3} ± {:.3}   policy {:.3} ± {:.3}   ({} held-out prompts × {})", r.reward.mean, r.reward.ci95, p.reward.mean, p.reward.ci95, self.eval.prompts, self.eval.samples_per_prompt)?;
        writeln!(f, "KL       seq {:.3} ± {:.3}   k3 {:.3} ± {:.3}", p.kl.seq.mean, p.kl.seq.ci95, p.kl.k3.mean, p.kl.k3.ci95)?;
        for r in &self.rounds {
            writeln!(f, "round {}  {} pairs   reward {:.3} ± {:.3}   KL seq {:.3} ± {:.3}", r.round, r.pairs, r.eval.reward.mean, r.eval.reward.ci95, r.eval.kl.seq.mean, r.eval.kl.seq.ci95)?;
        }
        if !self.rounds.is_empty() {
            writeln!(f, "rounds:  {}", self.run_dir.join("rounds.md").display())?;
        }
        write!(f, "time     {:.1} s ({})", self.wall_seconds, self.stage_seconds.iter().map(|(s, t)| format!("{s} {t:.1} s")).collect::<Vec<_>>().join(", "))
    }
}

/// `cargo xtask train` with no arguments: the whole known-reward task, end to end.
pub fn run_default(opts: &DefaultOptions, device: &Device) -> Result<DefaultSummary> {
    let start = Instant::now();
    let cfg = match &opts.config {
        Some(path) => PipelineConfig::from_file(path, &opts.sets)?,
        None => PipelineConfig::default_with(&opts.sets)?,
    };
    let dir = match &opts.run_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| PipelineError::io(dir, e))?;
            dir.clone()
        }
        None => cfg.new_run_dir(Path::new("runs"))?,
    };
    let _held = hold(&dir)?;
    odpo_model::weights::write_atomic(&dir.join("pipeline.toml"), cfg.to_toml()?.as_bytes())?;
    let v = opts.verbose;
    let mut stages: Vec<(String, f64)> = Vec::new();
    let mut lap = Instant::now();
    let mut done = |name: &str, stages: &mut Vec<(String, f64)>| {
        stages.push((name.to_string(), lap.elapsed().as_secs_f64()));
        lap = Instant::now();
    };
    say(v, format_args!("[1/5] synthetic task -> {}", dir.join("data").display()));
    let task = prepare_task(&cfg, &dir)?;
    done("task", &mut stages);

    say(v, format_args!("[2/5] SFT: tiny GPT-2 ({} layers, {} hidden), {} steps", cfg.model.n_layer, cfg.model.n_embd, cfg.sft.steps));
    let sft_model = train_sft(&cfg, &task, &dir.join("sft"), device)?;
    done("sft", &mut stages);

    let (samples, pref_dir, policy_model, pairs, rounds) = if cfg.pref.rounds > 1 {
        say(v, format_args!("[3-4/5] {} online rounds of {} (beta {}, alpha {}) from the SFT model, {} prompts each, reference: {:?}", cfg.pref.rounds, cfg.loss.name(), cfg.pref.beta, cfg.pref.alpha, task.pref_prompts.len() / cfg.pref.rounds, cfg.pref.round_reference));
        let rounds = crate::rounds::online_rounds(&cfg, &task, &sft_model, &dir, device, v).map_err(|e| e.in_run(&dir))?;
        let last = rounds.last().ok_or_else(|| PipelineError::config("pref.rounds", "no round ran"))?;
        let n = rounds.len();
        let pairs = rounds.iter().map(|r| r.pairs).sum();
        (dir.join("data").join(format!("samples-round-{n}.jsonl")), dir.join(cfg.loss.name()).join(format!("round-{n}")), last.model.clone(), pairs, rounds)
    } else {
        say(v, format_args!("[3/5] sampling {} responses for each of {} prompts", cfg.sample.k, task.pref_prompts.len()));
        let samples = dir.join("data").join("samples.jsonl");
        // A resumed run reuses its samples (written atomically: present means whole).
        if !samples.exists() {
            let settings = SampleSettings { k: cfg.sample.k, temperature: cfg.sample.temperature, max_new_tokens: cfg.sample.max_new_tokens, seed: cfg.seed };
            let report = sample::sample(&sft_model, &task.pref_prompts, &settings, task_score(&cfg).as_ref(), &samples, device).map_err(|e| e.in_run(&dir))?;
            say(v, format_args!("      {} responses, mean score {:.3} ({})", report.responses, report.mean_reward, task_score(&cfg).name()));
        }
        done("sample", &mut stages);

        say(v, format_args!("[4/5] {} (beta {}, alpha {}) from the SFT model", cfg.loss.name(), cfg.pref.beta, cfg.pref.alpha));
        let pref_dir = dir.join(cfg.loss.name());
        let pref = train_pref(&cfg, &SweepPoint::of(&cfg), &sft_model, &samples, &pref_dir, device)?;
        let policy_model = pref.exported.clone().ok_or_else(|| PipelineError::config("output.export", "the preference stage exported no model"))?;
        let pairs = pairs_in(&pref_dir)?;
        (samples, pref_dir, policy_model, pairs, Vec::new())
    };
    done(cfg.loss.name(), &mut stages);

    say(v, format_args!("[5/5] evaluating on {} held-out prompts", task.eval_prompts.len()));
    let (policy, tok) = load_model(&policy_model, device)?;
    let (reference, _) = load_model(&sft_model, device)?;
    let eval = eval::evaluate(&policy, &reference, &tok, &task.eval_prompts, &eval_settings(&cfg, cfg.seed), &synthetic::reward(), device).map_err(|e| e.in_run(&dir))?;
    let eval_json = eval::write_report(&dir.join("eval.json"), &eval)?;
    let plot_path = dir.join("eval.png");
    let series = [
        Series { name: "SFT (reference)".into(), points: vec![(eval.reference.kl.seq.mean, eval.reference.reward.mean)], frontier: false },
        Series { name: cfg.loss.name().to_uppercase(), points: vec![(eval.policy.kl.seq.mean, eval.policy.reward.mean)], frontier: false },
    ];
    plot::scatter(&plot_path, &format!("{} on the known-reward task", cfg.loss.name().to_uppercase()), &series)?;
    if !rounds.is_empty() {
        crate::rounds::write_rounds(&dir, &format!("{} in {} online rounds", cfg.loss.name().to_uppercase(), rounds.len()), &eval.reference, &rounds)?;
    }
    done("eval", &mut stages);

    let summary = DefaultSummary {
        run_dir: dir.clone(),
        sft_model,
        policy_model,
        samples,
        metrics: pref_dir.join("metrics.jsonl"),
        eval_json,
        plot: plot_path,
        pairs,
        eval,
        rounds,
        stage_seconds: stages,
        wall_seconds: start.elapsed().as_secs_f64(),
    };
    let path = dir.join("summary.json");
    let text = serde_json::to_string_pretty(&summary).map_err(|e| PipelineError::Json { path: path.clone(), line: 0, message: e.to_string() })?;
    odpo_model::weights::write_atomic(&path, text.as_bytes())?;
    say(v, &summary);
    Ok(summary)
}

/// `cargo xtask eval --run DIR`: re-evaluates a finished default run (its `pipeline.toml`, `sft/model`
/// and `<loss>/model`) with `samples_per_prompt` and `seed` (by default the config's: the run's own
/// evaluation again), writing `eval.json` again.
pub fn eval_run(dir: &Path, samples_per_prompt: Option<usize>, seed: Option<u64>, device: &Device) -> Result<EvalReport> {
    if !dir.join("pipeline.toml").is_file() {
        return Err(PipelineError::NotPipelineRun { path: dir.to_path_buf() });
    }
    let mut cfg = PipelineConfig::from_file(&dir.join("pipeline.toml"), &[])?.into_inner();
    if let Some(n) = samples_per_prompt {
        cfg.eval.samples_per_prompt = n;
    }
    let cfg = cfg.check()?;
    let eval_prompts = sample::read_prompts(&dir.join("data").join("prompts-eval.txt"))?;
    let (policy, tok) = load_model(&dir.join(cfg.loss.name()).join("model"), device)?;
    let (reference, _) = load_model(&dir.join("sft").join("model"), device)?;
    let report = eval::evaluate(&policy, &reference, &tok, &eval_prompts, &eval_settings(&cfg, seed.unwrap_or(cfg.seed)), &synthetic::reward(), device)?;
    eval::write_report(&dir.join("eval.json"), &report)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_run_folder_in_use_is_refused_before_its_config_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let held = odpo_trainer::lock::acquire(dir.path()).unwrap();
        let opts = DefaultOptions { run_dir: Some(dir.path().to_path_buf()), ..Default::default() };
        let e = run_default(&opts, &Device::default()).map(|_| ()).unwrap_err();
        assert!(matches!(e, PipelineError::Busy { .. }), "{e}");
        assert!(!dir.path().join("pipeline.toml").exists(), "the refused run wrote its config");
        drop(held);
        // Released (as when the holder ends, however it ends): the same folder is taken again.
        let again = hold(dir.path()).unwrap();
        drop(again);
    }
}
