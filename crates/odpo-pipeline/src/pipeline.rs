//! The built-in default, end to end: write the synthetic task (tokenizer, SFT texts, prompt split),
//! SFT a tiny GPT-2 from scratch, sample k scored responses per prompt, train ODPO (or DPO) on
//! best-vs-worst pairs from the SFT model, evaluate reward and KL on held-out prompts, plot.
//! Each stage is a plain function so the frontier sweep can reuse them.
//!
//! Run folder layout: `pipeline.toml` (resolved config), `data/` (tokenizer, `sft.jsonl`,
//! `samples.jsonl`, prompt lists), `sft/` and `<loss>/` (trainer runs: `metrics.jsonl`,
//! `model/`), `eval.json`, `eval.png`, `summary.json`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Device;
use odpo_loss::offset::OffsetConfig;
use odpo_loss::{LossConfig, LossKind};
use odpo_model::CausalLm;
use odpo_model::tokenizer::Tokenizer;
use odpo_trainer::RunConfig;
use odpo_trainer::config::Checked;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use serde::Serialize;

use crate::config::{Method, PipelineConfig, ScoreKind};
use crate::error::{PipelineError, Result};
use crate::eval::{self, EvalReport};
use crate::plot::{self, Series};
use crate::reward::{ClassifierScore, RewardModel};
use crate::sample::{self, SampleSettings};
use crate::synthetic;

/// Longest prompt + response in tokens (prompts are [`synthetic::PROMPT_WORDS`] words, responses
/// at most `max_new_tokens`, which the config checks against it).
pub(crate) const MAX_POSITIONS: usize = 32;

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

/// The task files of a run.
#[derive(Clone, Debug)]
pub struct TaskFiles {
    /// Folder with `tokenizer.json` and the initial `config.json`.
    pub init_dir: PathBuf,
    /// SFT texts in pair layout (only `chosen` is trained on).
    pub sft_data: PathBuf,
    /// Prompts for preference sampling.
    pub pref_prompts: Vec<String>,
    /// Held-out prompts.
    pub eval_prompts: Vec<String>,
}

/// Writes the synthetic task into `dir/data`: tokenizer, GPT-2 config, SFT texts, prompt lists.
pub fn prepare_task(cfg: &Checked<PipelineConfig>, dir: &Path) -> Result<TaskFiles> {
    let data = dir.join("data");
    let init_dir = data.join("init");
    synthetic::write_tokenizer(&init_dir)?;
    synthetic::write_json(&init_dir.join("config.json"), &synthetic::gpt2_config(cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head, MAX_POSITIONS))?;
    let split = synthetic::split_prompts(cfg.seed, cfg.task.eval_prompts)?;
    if cfg.task.pref_prompts > split.train.len() {
        return Err(PipelineError::config("task.pref_prompts", format!("is {}; only {} prompts are left after the held-out ones", cfg.task.pref_prompts, split.train.len())));
    }
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x5f7);
    let mut sft = Vec::new();
    for _ in 0..cfg.task.sft_texts {
        let prompt = split.train.choose(&mut rng).cloned().unwrap_or_default();
        let chosen = synthetic::sample_continuation(&mut rng);
        let rejected = synthetic::sample_continuation(&mut rng);
        writeln!(sft, "{}", serde_json::json!({"prompt": prompt, "chosen": chosen, "rejected": rejected})).map_err(|e| PipelineError::io(&data, e))?;
    }
    let sft_data = data.join("sft.jsonl");
    odpo_model::weights::write_atomic(&sft_data, &sft)?;
    let pref_prompts: Vec<String> = split.train[..cfg.task.pref_prompts].to_vec();
    for (name, list) in [("prompts-pref.txt", &pref_prompts), ("prompts-eval.txt", &split.eval)] {
        odpo_model::weights::write_atomic(&data.join(name), (list.join("\n") + "\n").as_bytes())?;
    }
    Ok(TaskFiles { init_dir, sft_data, pref_prompts, eval_prompts: split.eval })
}

/// What the task's pairs and offsets are scored by (`task.score`): the true reward, or the classifier
/// shape of it, its noise seeded by the pipeline's seed. Evaluation always uses the true reward.
pub fn task_score(cfg: &PipelineConfig) -> Box<dyn RewardModel> {
    match cfg.task.score {
        ScoreKind::Exact => Box::new(synthetic::reward()),
        ScoreKind::Classifier => Box::new(ClassifierScore::new(synthetic::reward(), cfg.task.score_temperature, cfg.task.score_noise, cfg.seed)),
    }
}

/// The SFT stage's preset: every setting of the stage that a pipeline config does not choose.
const SFT_PRESET: &str = include_str!("stages/sft.toml");
/// The preference stage's preset.
const PREF_PRESET: &str = include_str!("stages/pref.toml");

/// One preference run of a sweep: the objective, β, α (ODPO only) and the seed of its data order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SweepPoint {
    /// DPO or ODPO.
    pub method: Method,
    /// β.
    pub beta: f64,
    /// α, the offset scale (ODPO).
    pub alpha: f64,
    /// The seed of the data order (and of LoRA dropout).
    pub seed: u64,
}

impl SweepPoint {
    /// The pipeline config's own run: its `loss`, `pref.beta`, `pref.alpha` and `seed`.
    pub fn of(cfg: &PipelineConfig) -> Self {
        Self { method: cfg.loss, beta: cfg.pref.beta, alpha: cfg.pref.alpha, seed: cfg.seed }
    }
}

/// The SFT stage's run config: the preset (`src/stages/sft.toml`) with the pipeline config's `[sft]`,
/// seed and backend, reading the task's texts and writing into `dir`.
pub fn sft_run_config(cfg: &Checked<PipelineConfig>, task: &TaskFiles, dir: &Path) -> Result<Checked<RunConfig>> {
    let mut run: RunConfig = odpo_trainer::config::load_toml(SFT_PRESET, "odpo-pipeline's SFT preset", &[])?;
    (run.model.path, run.data.path, run.data.seed) = (task.init_dir.clone(), task.sft_data.clone(), cfg.seed);
    (run.optim.lr, run.optim.warmup_steps) = (cfg.sft.lr, (cfg.sft.steps / 10).max(1));
    let t = &mut run.train;
    (t.batch_size, t.micro_batch_size, t.max_steps, t.seed, t.backend) = (cfg.sft.batch_size, cfg.sft.batch_size, Some(cfg.sft.steps), cfg.seed, cfg.backend);
    (run.output.dir, run.output.cache_dir) = (dir.to_path_buf(), dir.join("refcache"));
    Ok(run.check()?)
}

/// A preference run's config: the preset (`src/stages/pref.toml`) with the pipeline config's `[pref]`
/// and backend and the sweep point, from (and anchored to) `sft_model`, on the pairs of `samples`.
pub fn pref_run_config(cfg: &Checked<PipelineConfig>, point: &SweepPoint, sft_model: &Path, samples: &Path, dir: &Path) -> Result<Checked<RunConfig>> {
    let mut run: RunConfig = odpo_trainer::config::load_toml(PREF_PRESET, "odpo-pipeline's preference preset", &[])?;
    (run.model.path, run.data.path, run.data.seed) = (sft_model.to_path_buf(), samples.to_path_buf(), point.seed);
    run.data.pairing = Some(cfg.pref.pairing.pairing());
    run.data.offset = (point.method == Method::Odpo).then(|| OffsetConfig { alpha: point.alpha, ..OffsetConfig::default() });
    run.loss = Some(LossConfig::new(LossKind::Sigmoid, point.beta));
    run.optim.lr = cfg.pref.lr;
    let t = &mut run.train;
    (t.batch_size, t.micro_batch_size, t.max_steps, t.epochs, t.seed, t.backend) = (cfg.pref.batch_size, cfg.pref.batch_size, cfg.pref.steps, cfg.pref.epochs, point.seed, cfg.backend);
    (run.output.dir, run.output.cache_dir) = (dir.to_path_buf(), dir.join("refcache"));
    Ok(run.check()?)
}

/// SFT from random weights on the task's texts; returns the exported model folder. A folder that
/// holds a checkpoint (an interrupted or finished stage) is resumed.
pub fn train_sft(cfg: &Checked<PipelineConfig>, task: &TaskFiles, dir: &Path, device: &Device) -> Result<PathBuf> {
    let summary = odpo_trainer::train(&sft_run_config(cfg, task, dir)?, device, has_checkpoint(dir)?).map_err(|e| match e {
        // The task's model is drawn from the config the pipeline wrote from `[model]`: name those keys.
        odpo_trainer::TrainError::Model(odpo_model::ModelError::TooLarge { message, .. }) => {
            let m = &cfg.model;
            PipelineError::config("model", format!("(n_layer = {}, n_embd = {}, n_head = {}) is too large: {message}; lower model.n_embd or model.n_layer", m.n_layer, m.n_embd, m.n_head))
        }
        other => in_stage_keys(other, "sft"),
    })?;
    summary.exported.ok_or_else(|| PipelineError::config("output.export", "the SFT stage exported no model"))
}

/// One preference stage (`pref_run_config`): trains (resuming from a checkpoint in `dir`) and returns
/// the trainer's summary.
pub fn train_pref(cfg: &Checked<PipelineConfig>, point: &SweepPoint, sft_model: &Path, samples: &Path, dir: &Path, device: &Device) -> Result<odpo_trainer::RunSummary> {
    odpo_trainer::train(&pref_run_config(cfg, point, sft_model, samples, dir)?, device, has_checkpoint(dir)?).map_err(|e| in_stage_keys(e, "pref"))
}

/// A stage's error, with a host-memory refusal's advice naming the pipeline's keys: a stage's
/// micro-batch is its `[sft]` or `[pref]` batch (the trainer's advice names the run config's).
fn in_stage_keys(e: odpo_trainer::TrainError, stage: &str) -> PipelineError {
    match e {
        odpo_trainer::TrainError::HostMemory { message, .. } => {
            odpo_trainer::TrainError::HostMemory { message, advice: format!("to fit, lower `{stage}.batch_size`, or run on a GPU backend (`--backend`)") }.into()
        }
        other => other.into(),
    }
}

/// Holds the run folder `dir` of a multi-stage command (its stages lock their own folders inside
/// it) for as long as the guard lives: a second process resuming the same folder is refused before
/// it writes anything there.
pub(crate) fn hold(dir: &Path) -> Result<odpo_trainer::lock::RunLock> {
    odpo_trainer::lock::acquire(dir).map_err(|e| match e {
        odpo_trainer::TrainError::Busy { run_dir, holder } => PipelineError::Busy { dir: run_dir, holder },
        other => other.into(),
    })
}

/// Whether a trainer folder holds a checkpoint to resume from.
pub(crate) fn has_checkpoint(dir: &Path) -> Result<bool> {
    Ok(!odpo_trainer::checkpoint::list(dir)?.is_empty())
}

/// Loads a model folder (weights, config, tokenizer).
pub fn load_model(dir: &Path, device: &Device) -> Result<(CausalLm, Tokenizer)> {
    let loaded = CausalLm::load(dir, device)?;
    let tok = Tokenizer::open(&loaded.tokenizer_path)?;
    Ok((loaded.model, tok))
}

/// Sampling settings for evaluation on held-out prompts.
pub fn eval_settings(cfg: &PipelineConfig, seed: u64) -> SampleSettings {
    SampleSettings { k: cfg.eval.samples_per_prompt, temperature: cfg.sample.temperature, max_new_tokens: cfg.sample.max_new_tokens, seed: seed ^ 0xE7A1 }
}

/// Lines the pipeline prints as it goes: on stdout when `verbose`, else to the log (not both, or a
/// terminal shows each twice).
pub(crate) fn say(verbose: bool, msg: impl std::fmt::Display) {
    if verbose {
        println!("{msg}");
    } else {
        tracing::info!("{msg}");
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

/// Pairs the preference stage trained on: its data re-read with its own config (one pair per prompt
/// whose responses do not all tie).
pub(crate) fn pairs_in(pref_dir: &Path) -> Result<usize> {
    let cfg = RunConfig::from_file(&pref_dir.join("config.toml"), &[])?;
    let loaded = odpo_data::load(&cfg.data).map_err(odpo_trainer::TrainError::from)?;
    Ok(loaded.pairs.len())
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

    #[test]
    fn the_task_written_again_on_resume_leaves_its_files_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = PipelineConfig::default_with(&[]).unwrap();
        let files = |d: &Path| -> Vec<(PathBuf, Vec<u8>, std::time::SystemTime)> {
            let mut out = Vec::new();
            for folder in [d.join("data"), d.join("data/init")] {
                for e in std::fs::read_dir(folder).unwrap() {
                    let p = e.unwrap().path();
                    if p.is_file() {
                        out.push((p.clone(), std::fs::read(&p).unwrap(), std::fs::metadata(&p).unwrap().modified().unwrap()));
                    }
                }
            }
            out.sort();
            out
        };
        prepare_task(&cfg, dir.path()).unwrap();
        let first = files(dir.path());
        assert_eq!(first.len(), 6, "sft.jsonl, two prompt lists, tokenizer.json, tokenizer_config.json, config.json");
        std::thread::sleep(std::time::Duration::from_millis(20));
        prepare_task(&cfg, dir.path()).unwrap();
        // Each file goes through a temporary file and a rename, and one that holds the same bytes is
        // left alone: a resume never truncates the task under a stage, nor gives it new times.
        assert_eq!(files(dir.path()), first);
    }
}
