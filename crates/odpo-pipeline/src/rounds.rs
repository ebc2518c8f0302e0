//! Online (iterative) preference rounds: round k samples the policy it starts from on its share of
//! the preference prompts, scores the samples, pairs them (with offsets for ODPO) and trains from
//! that policy; the next round starts from the result. `pref.rounds` sets N; `pref.round_reference`
//! keeps the SFT model as the reference throughout (`initial`) or moves it to each round's starting
//! policy (`previous`), as iterative DPO does (Xu et al. 2023, "Some things are more CRINGE than
//! others", arXiv 2312.16682; Xiong et al. 2024, arXiv 2312.11456).
//!
//! The prompts are split into N consecutive parts, so N rounds see as many prompts, pairs and
//! training steps (`pref.epochs` passes, or `pref.steps`, per round) as one round with all of them:
//! the same compute, spent on-policy.
//!
//! Every round writes `<loss>/round-K/round.json` when it is done; a rerun on the same folder skips
//! the rounds that have one, resumes a round's training from its checkpoint (a Ctrl-C or SIGTERM
//! writes one) and reuses its samples, which are written atomically.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::config::{PipelineConfig, RoundReference};
use crate::error::{PipelineError, Result};
use crate::eval::{SampleEval, evaluate_samples};
use crate::stages::{SweepPoint, TaskFiles, eval_settings, load_model, pairs_in, pref_run_config, say, task_score};
use crate::plot::{self, Series};
use crate::sample::{self, SampleSettings};
use odpo_trainer::config::Checked;

/// One finished round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundResult {
    /// 1-based.
    pub round: usize,
    /// Prompts sampled in this round.
    pub prompts: usize,
    /// Pairs trained on (ties dropped).
    pub pairs: usize,
    /// Mean task score of the round's samples (of the policy it started from).
    pub sample_score: f64,
    /// The model the round started from.
    pub start: PathBuf,
    /// Its reference.
    pub reference: PathBuf,
    /// The trained model.
    pub model: PathBuf,
    /// The trained model's reward and KL to the SFT model on the held-out prompts.
    pub eval: SampleEval,
    /// Seconds the round took (sampling, training, evaluation).
    pub seconds: f64,
}

/// Runs (or resumes) the rounds from `sft_model` in `dir`; returns one result per round.
pub fn online_rounds(cfg: &Checked<PipelineConfig>, task: &TaskFiles, sft_model: &Path, dir: &Path, device: &Device, verbose: bool) -> Result<Vec<RoundResult>> {
    let n = cfg.pref.rounds.max(1);
    let (sft, tok) = load_model(sft_model, device)?;
    let mut results: Vec<RoundResult> = Vec::with_capacity(n);
    for k in 0..n {
        let round_dir = dir.join(cfg.loss.name()).join(format!("round-{}", k + 1));
        let done = round_dir.join("round.json");
        if let Ok(text) = std::fs::read_to_string(&done) {
            let r: RoundResult = serde_json::from_str(&text).map_err(|e| PipelineError::Json { path: done.clone(), line: e.line(), message: e.to_string() })?;
            say(verbose, format_args!("      round {}/{n} done before: reward {:.3}, KL {:.3}", k + 1, r.eval.reward.mean, r.eval.kl.seq.mean));
            results.push(r);
            continue;
        }
        let started = std::time::Instant::now();
        let start = results.last().map_or_else(|| sft_model.to_path_buf(), |r| r.model.clone());
        let reference = match cfg.pref.round_reference {
            RoundReference::Initial => sft_model.to_path_buf(),
            RoundReference::Previous => start.clone(),
        };
        let all = &task.pref_prompts;
        let prompts = &all[k * all.len() / n..(k + 1) * all.len() / n];

        let samples = dir.join("data").join(format!("samples-round-{}.jsonl", k + 1));
        let sample_score = if let Ok(table) = crate::ScoreTable::from_jsonl(&samples) {
            mean(table.entries().iter().map(|e| e.2))
        } else {
            let settings = SampleSettings { k: cfg.sample.k, temperature: cfg.sample.temperature, max_new_tokens: cfg.sample.max_new_tokens, seed: cfg.seed.wrapping_add(k as u64) };
            sample::sample(&start, prompts, &settings, task_score(cfg).as_ref(), &samples, device)?.mean_reward
        };

        let mut run = pref_run_config(cfg, &SweepPoint::of(cfg), &start, &samples, &round_dir)?.into_inner();
        run.model.reference = (reference != start).then(|| reference.clone());
        let run = run.check()?;
        let summary = odpo_trainer::train(&run, device, crate::stages::has_checkpoint(&round_dir)?)?;
        let model = summary.exported.ok_or_else(|| PipelineError::config("output.export", "a round exported no model"))?;

        let (policy, _) = load_model(&model, device)?;
        let (eval, _, _) = evaluate_samples(&policy, &sft, &tok, &task.eval_prompts, &eval_settings(cfg, cfg.seed), &crate::synthetic::reward(), device)?;
        let r = RoundResult { round: k + 1, prompts: prompts.len(), pairs: pairs_in(&round_dir)?, sample_score, start, reference, model, eval, seconds: started.elapsed().as_secs_f64() };
        say(verbose, format_args!("      round {}/{n}: {} pairs (samples' score {:.3}), reward {:.3}, KL {:.3}", k + 1, r.pairs, r.sample_score, r.eval.reward.mean, r.eval.kl.seq.mean));
        let json = serde_json::to_string_pretty(&r).map_err(|e| PipelineError::Json { path: done.clone(), line: 0, message: e.to_string() })?;
        odpo_model::weights::write_atomic(&done, json.as_bytes())?;
        results.push(r);
    }
    Ok(results)
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, count) = values.fold((0.0, 0usize), |(s, c), v| (s + v, c + 1));
    sum / count.max(1) as f64
}

/// `rounds.md`, `rounds.csv` and `rounds.png` in `dir`: reward and KL after each round, from the SFT
/// model's point `sft`.
pub fn write_rounds(dir: &Path, title: &str, sft: &SampleEval, rounds: &[RoundResult]) -> Result<()> {
    let mut csv = String::from("round,prompts,pairs,sample_score,reward,reward_ci95,kl_seq,kl_seq_ci95,kl_k3,seconds\n");
    let mut md = String::from("| round | prompts | pairs | samples' score | reward | KL (seq) | KL (k3) | seconds |\n|---|---|---|---|---|---|---|---|\n");
    md.push_str(&format!("| SFT | | | | {:.3} ± {:.3} | 0 | 0 | |\n", sft.reward.mean, sft.reward.ci95));
    for r in rounds {
        let e = &r.eval;
        csv.push_str(&format!(
            "{},{},{},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.1}\n",
            r.round, r.prompts, r.pairs, r.sample_score, e.reward.mean, e.reward.ci95, e.kl.seq.mean, e.kl.seq.ci95, e.kl.k3.mean, r.seconds
        ));
        md.push_str(&format!(
            "| {} | {} | {} | {:.3} | {:.3} ± {:.3} | {:.3} ± {:.3} | {:.3} | {:.1} |\n",
            r.round, r.prompts, r.pairs, r.sample_score, e.reward.mean, e.reward.ci95, e.kl.seq.mean, e.kl.seq.ci95, e.kl.k3.mean, r.seconds
        ));
    }
    for (name, text) in [("rounds.csv", &csv), ("rounds.md", &md)] {
        odpo_model::weights::write_atomic(&dir.join(name), text.as_bytes())?;
    }
    let series = [
        Series { name: "SFT".into(), points: vec![(0.0, sft.reward.mean)], frontier: false },
        Series { name: "after each round".into(), points: rounds.iter().map(|r| (r.eval.kl.seq.mean, r.eval.reward.mean)).collect(), frontier: false },
    ];
    plot::scatter(&dir.join("rounds.png"), title, &series)?;
    Ok(())
}
