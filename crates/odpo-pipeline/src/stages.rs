//! The stages the pipelines are built of, each a plain function: the synthetic task written into
//! a run folder, an SFT run, a preference run at one point of a sweep, a model loaded back, the
//! evaluation's sampling settings. The default run ([`crate::pipeline`]), the online rounds, the
//! frontier sweep and the experiment compose them; each holds its run folder (`hold`) and prints
//! its lines through `say`. The stages' trainer presets are `src/stages/*.toml`.

use std::io::Write;
use std::path::{Path, PathBuf};

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

use crate::config::{Method, PipelineConfig, ScoreKind};
use crate::error::{PipelineError, Result};
use crate::reward::{ClassifierScore, RewardModel};
use crate::sample::SampleSettings;
use crate::synthetic;

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
    synthetic::write_json(&init_dir.join("config.json"), &synthetic::gpt2_config(cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head, synthetic::MAX_POSITIONS))?;
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
