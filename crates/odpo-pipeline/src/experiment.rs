//! `cargo xtask experiment --config FILE`: DPO and ODPO from a pretrained model, scored by a reward
//! model, on the reward-vs-KL plane: the paper's sentiment experiment at whatever scale a config asks.
//!
//! The pretrained model is the reference and the starting point (no SFT stage). Its samples for the
//! first `pref_prompts` prompts are scored once (`samples.jsonl`); every method × β × α × seed run
//! trains on their best-vs-worst pairs (LoRA adapters when the config has a `[lora]` table) and is
//! evaluated on the last `eval_prompts` prompts: mean reward and KL to the pretrained model, each
//! with a 95% interval. Writes `experiment.csv`, `experiment.md` and `experiment.png`.
//!
//! The experiment folder is `runs/<name>` and is reused: the samples and every finished run
//! (`runs/<tag>/eval.json`) are kept, so an interrupted experiment resumes where it stopped.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Device;
use odpo_loss::offset::OffsetConfig;
use odpo_loss::{LossConfig, LossKind};
use odpo_model::LoraConfig;
use odpo_model::tokenizer::Tokenizer;
use odpo_trainer::RunConfig;
use odpo_trainer::config::Checked;
use serde::{Deserialize, Serialize};

use crate::config::{Method, SampleSection};
use crate::error::{PipelineError, Result};
use crate::eval::{Estimate, SampleEval, evaluate_samples};
use crate::journal::Journal;
use crate::stages::SweepPoint;
use crate::plot::{self, Series};
use crate::progress::SweepProgress;
use crate::sample::{self, SampleSettings, reward_from_spec};

/// An experiment (configs/pipeline/smollm2-imdb.toml).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// The experiment's folder is `runs/<name>`.
    pub name: String,
    /// The backend (`flex` when left out).
    #[serde(default = "default_backend")]
    pub backend: odpo_model::backend::Backend,
    /// Seed of the pair sampling (each run's seed orders its data and its evaluation samples).
    #[serde(default)]
    pub seed: u64,
    /// The pretrained model: a HF folder or a `.gguf` file (its tokenizer beside it).
    pub model: PathBuf,
    /// Prompts: a `.jsonl` whose rows have a `prompt` field (distinct prompts in order of first
    /// appearance) or a text file, one prompt a line.
    pub prompts: PathBuf,
    /// How responses are scored: `learned:DIR`, `table:FILE` or `known`.
    pub reward: String,
    /// Prompts sampled for pairs: the first ones of the list.
    pub pref_prompts: usize,
    /// Held-out prompts for evaluation: the last ones of the list.
    pub eval_prompts: usize,
    /// Methods to sweep.
    pub methods: Vec<Method>,
    /// β values.
    pub betas: Vec<f64>,
    /// α values (ODPO only).
    #[serde(default = "default_alphas")]
    pub alphas: Vec<f64>,
    /// Seeds of the runs.
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// Sampling, for the pairs and for evaluation.
    pub sample: SampleSection,
    /// Preference training.
    pub pref: ExperimentPref,
    /// LoRA adapters instead of full fine-tuning (absent: full fine-tuning).
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    /// Samples per held-out prompt, from each policy and from the pretrained model.
    pub samples_per_prompt: usize,
}

fn default_backend() -> odpo_model::backend::Backend {
    odpo_model::backend::Backend::Flex
}
fn default_alphas() -> Vec<f64> {
    vec![1.0]
}
fn default_seeds() -> Vec<u64> {
    vec![0]
}

/// `[pref]` of an experiment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentPref {
    /// Passes over the pairs.
    pub epochs: f64,
    /// Pairs per step.
    pub batch_size: usize,
    /// Pairs per forward pass (gradients accumulate over a step's micro-batches).
    #[serde(default)]
    pub micro_batch_size: Option<usize>,
    /// Learning rate (AdamW, constant after a short warm-up).
    pub lr: f64,
    /// Longest prompt + response in tokens.
    pub max_length: usize,
    /// Longest prompt in tokens.
    pub max_prompt_length: usize,
}

/// One run of an experiment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExperimentRow {
    /// The method.
    pub method: Method,
    /// β.
    pub beta: f64,
    /// α (ODPO; 0 for DPO).
    pub alpha: f64,
    /// Seed.
    pub seed: u64,
    /// Reward and KL of the policy's samples on the held-out prompts.
    pub eval: SampleEval,
    /// Seconds for training and evaluation.
    pub seconds: f64,
}

/// What an experiment wrote.
#[derive(Clone, Debug, Serialize)]
pub struct ExperimentSummary {
    /// The experiment folder.
    pub dir: PathBuf,
    /// `experiment.md`.
    pub table: PathBuf,
    /// `experiment.png`.
    pub plot: PathBuf,
    /// The pretrained model's own samples on the held-out prompts.
    pub base: SampleEval,
    /// Every run.
    pub rows: Vec<ExperimentRow>,
    /// Seconds in all (this invocation).
    pub wall_seconds: f64,
}

impl ExperimentConfig {
    /// Reads and checks an experiment file.
    pub fn from_file(path: &Path) -> Result<Checked<Self>> {
        let cfg: Self = odpo_trainer::config::load_toml_file(path, &[])?;
        cfg.validate()?;
        Ok(Checked::after_validation(cfg))
    }

    /// Checks ranges, naming the key.
    pub fn validate(&self) -> Result<()> {
        crate::config::check_run_name(&self.name)?;
        for (key, empty) in [("methods", self.methods.is_empty()), ("betas", self.betas.is_empty()), ("seeds", self.seeds.is_empty())] {
            if empty {
                return Err(PipelineError::config(key, "is empty; give at least one value"));
            }
        }
        if self.methods.contains(&Method::Odpo) && self.alphas.is_empty() {
            return Err(PipelineError::config("alphas", "is empty but `methods` has odpo; give at least one α"));
        }
        for (key, v) in [
            ("pref_prompts", self.pref_prompts),
            ("eval_prompts", self.eval_prompts),
            ("samples_per_prompt", self.samples_per_prompt),
            ("sample.max_new_tokens", self.sample.max_new_tokens),
            ("pref.batch_size", self.pref.batch_size),
            ("pref.max_length", self.pref.max_length),
        ] {
            if v == 0 {
                return Err(PipelineError::config(key, "is 0; expected at least 1"));
            }
        }
        if self.sample.k < 2 {
            return Err(PipelineError::config("sample.k", format!("is {}; pairs need at least 2 responses per prompt", self.sample.k)));
        }
        for (key, v) in [("sample.temperature", self.sample.temperature), ("pref.epochs", self.pref.epochs), ("pref.lr", self.pref.lr)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(PipelineError::config(key, format!("is {v}; expected a finite number > 0")));
            }
        }
        let p = &self.pref;
        match p.micro_batch_size {
            Some(0) => return Err(PipelineError::config("pref.micro_batch_size", "is 0; expected at least 1")),
            Some(m) if !p.batch_size.is_multiple_of(m) => {
                return Err(PipelineError::config("pref.batch_size", format!("({}) must be a multiple of `pref.micro_batch_size` ({m})", p.batch_size)));
            }
            _ => {}
        }
        if p.max_prompt_length == 0 || p.max_prompt_length >= p.max_length {
            return Err(PipelineError::config(
                "pref.max_prompt_length",
                format!("({}) must be between 1 and `pref.max_length` - 1 ({}) to leave room for the response", p.max_prompt_length, p.max_length.saturating_sub(1)),
            ));
        }
        if let Some(lora) = &self.lora {
            lora.validate()?;
        }
        crate::config::check_sweep_values(&self.betas, &self.alphas)?;
        // The rest of what a run checks (the preset's keys with these), for every run, before the
        // sampling: a refusal after it would cost its minutes.
        for point in self.points() {
            run_config(self, &point, Path::new("samples.jsonl"), Path::new("run"))?;
        }
        Ok(())
    }

    /// Every run of the sweep, in the order they run: method, β, α (ODPO; 0 for DPO), seed.
    fn points(&self) -> Vec<SweepPoint> {
        let mut out = Vec::new();
        for &method in &self.methods {
            let alphas: Vec<f64> = if method == Method::Odpo { self.alphas.clone() } else { vec![0.0] };
            for &beta in &self.betas {
                for &alpha in &alphas {
                    out.extend(self.seeds.iter().map(|&seed| SweepPoint { method, beta, alpha, seed }));
                }
            }
        }
        out
    }
}

/// The distinct prompts of `path`, in order of first appearance.
pub fn read_prompt_list(path: &Path) -> Result<Vec<String>> {
    if path.extension().is_some_and(|e| e == "jsonl") {
        let text = std::fs::read_to_string(path).map_err(|e| PipelineError::io(path, e))?;
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| PipelineError::Json { path: path.to_path_buf(), line: i + 1, message: e.to_string() })?;
            let p = v.get("prompt").and_then(serde_json::Value::as_str).ok_or_else(|| PipelineError::Json {
                path: path.to_path_buf(),
                line: i + 1,
                message: "expected a string field `prompt`".into(),
            })?;
            if seen.insert(p.to_string()) {
                out.push(p.to_string());
            }
        }
        Ok(out)
    } else {
        sample::read_prompts(path)
    }
}

/// Runs (or resumes) the experiment in `config_path`, printing a line per stage and run when `verbose`.
pub fn experiment(config_path: &Path, device: &Device, verbose: bool) -> Result<ExperimentSummary> {
    let start = Instant::now();
    let cfg = ExperimentConfig::from_file(config_path)?;
    let say = |m: String| crate::stages::say(verbose, m);
    let prompts = read_prompt_list(&cfg.prompts)?;
    if cfg.pref_prompts + cfg.eval_prompts > prompts.len() {
        return Err(PipelineError::config(
            "pref_prompts",
            format!("{} + eval_prompts {} exceed the {} distinct prompts of {}", cfg.pref_prompts, cfg.eval_prompts, prompts.len(), cfg.prompts.display()),
        ));
    }
    let pref_prompts = &prompts[..cfg.pref_prompts];
    let eval_prompts = &prompts[prompts.len() - cfg.eval_prompts..];
    let dir = PathBuf::from("runs").join(&cfg.name);
    std::fs::create_dir_all(&dir).map_err(|e| PipelineError::io(&dir, e))?;
    let _held = crate::stages::hold(&dir)?;
    let cfg_copy = dir.join("experiment.toml");
    let cfg_text = toml::to_string(&cfg).map_err(|e| PipelineError::config_parse(config_path.display().to_string(), format!("could not be written as TOML: {e}")))?;
    odpo_model::weights::write_atomic(&cfg_copy, cfg_text.as_bytes())?;

    let reward = reward_from_spec(&cfg.reward, device)?;
    let loaded = odpo_model::CausalLm::load(&cfg.model, device)?;
    let tok = Tokenizer::open(&loaded.tokenizer_path)?;
    let base = loaded.model;

    // 1. Scored samples of the pretrained model for the pair prompts (kept across invocations).
    let samples = dir.join("samples.jsonl");
    if samples.is_file() {
        say(format!("[samples] reusing {}", samples.display()));
    } else {
        let t = Instant::now();
        say(format!("[samples] {} responses for each of {} prompts ...", cfg.sample.k, pref_prompts.len()));
        let settings = SampleSettings { k: cfg.sample.k, temperature: cfg.sample.temperature, max_new_tokens: cfg.sample.max_new_tokens, seed: cfg.seed };
        // Finished batches are journaled: a stopped experiment run again goes on from them.
        let journal = Journal::beside(&samples, &cfg.model)?;
        let responses = sample::sample_journaled(&base, &tok, pref_prompts, &settings, Some(&journal), device)?;
        let rewards = sample::score_for(&samples, &responses, pref_prompts, reward.as_ref())?;
        sample::write_scored(&samples, &responses, pref_prompts, &rewards)?;
        sample::remove_journals(&samples, &journal);
        say(format!("[samples] mean reward {:.3} ({:.0} s)", Estimate::of(&rewards).mean, t.elapsed().as_secs_f64()));
    }

    // 2. The pretrained model on the held-out prompts: the KL-0 point.
    let eval_settings = |seed: u64| SampleSettings { k: cfg.samples_per_prompt, temperature: cfg.sample.temperature, max_new_tokens: cfg.sample.max_new_tokens, seed: seed ^ 0xE7A1 };
    let base_eval = cached_eval(&dir.join("base-eval.json"), || {
        say(format!("[base] evaluating the pretrained model on {} held-out prompts ...", eval_prompts.len()));
        Ok(evaluate_samples(&base, &base, &tok, eval_prompts, &eval_settings(cfg.seed), reward.as_ref(), device)?.0)
    })?;
    say(format!("[base] reward {:.3} ± {:.3}", base_eval.reward.mean, base_eval.reward.ci95));

    // 3. One run per setting.
    let mut rows = Vec::new();
    let points = cfg.points();
    let mut progress = SweepProgress::new(points.len());
    for point in points {
        let SweepPoint { method, beta, alpha, seed } = point;
        let t = Instant::now();
        let tag = format!("{}-b{beta}-a{alpha}-s{seed}", method.name());
        let run_dir = dir.join("runs").join(&tag);
        let mut kept = true;
        let eval = cached_eval(&run_dir.join("eval.json"), || {
            kept = false;
            say(format!("[{tag}] training ..."));
            let run = run_config(&cfg, &point, &samples, &run_dir)?;
            let summary = odpo_trainer::train(&run, device, false)?;
            let model = summary.exported.ok_or_else(|| PipelineError::config("output.export", "a preference run exported no model"))?;
            let policy = odpo_model::CausalLm::load(&model, device)?.model;
            say(format!("[{tag}] evaluating ..."));
            Ok(evaluate_samples(&policy, &base, &tok, eval_prompts, &eval_settings(seed), reward.as_ref(), device)?.0)
        })?;
        let row = ExperimentRow { method, beta, alpha, seed, eval, seconds: t.elapsed().as_secs_f64() };
        let count = if kept { progress.kept() } else { progress.trained(row.seconds) };
        say(format!("{count} [{tag}] reward {:.3} ± {:.3}, KL {:.3} (k3 {:.3}){}", eval.reward.mean, eval.reward.ci95, eval.kl.seq.mean, eval.kl.k3.mean, progress.left()));
        rows.push(row);
    }

    let table = dir.join("experiment.md");
    odpo_model::weights::write_atomic(&table, markdown(&cfg, &base_eval, &rows).as_bytes())?;
    let csv = dir.join("experiment.csv");
    let mut text = String::from("method,beta,alpha,seed,reward,reward_ci95,kl_seq,kl_seq_ci95,kl_k3,kl_k3_ci95,mean_tokens\n");
    for r in &rows {
        let e = &r.eval;
        let _ = writeln!(text, "{},{},{},{},{:.4},{:.4},{:.4},{:.4},{:.4},{:.4},{:.1}", r.method.name(), r.beta, r.alpha, r.seed, e.reward.mean, e.reward.ci95, e.kl.seq.mean, e.kl.seq.ci95, e.kl.k3.mean, e.kl.k3.ci95, e.mean_tokens);
    }
    odpo_model::weights::write_atomic(&csv, text.as_bytes())?;
    let plot_path = dir.join("experiment.png");
    let mut series = vec![Series { name: "pretrained model".into(), points: vec![(0.0, base_eval.reward.mean)], frontier: false }];
    for &m in &cfg.methods {
        let points = rows.iter().filter(|r| r.method == m).map(|r| (r.eval.kl.seq.mean, r.eval.reward.mean)).collect();
        series.push(Series { name: m.name().to_uppercase(), points, frontier: true });
    }
    plot::scatter(&plot_path, &format!("Reward vs KL: {}", cfg.name), &series)?;
    let summary = ExperimentSummary { dir, table, plot: plot_path, base: base_eval, rows, wall_seconds: start.elapsed().as_secs_f64() };
    say(format!("table: {}\nplot:  {}\n({:.0} s)", summary.table.display(), summary.plot.display(), summary.wall_seconds));
    Ok(summary)
}

/// Reads an evaluation written by an earlier invocation, or computes and writes it (atomically).
fn cached_eval(path: &Path, compute: impl FnOnce() -> Result<SampleEval>) -> Result<SampleEval> {
    if let Ok(text) = std::fs::read_to_string(path)
        && let Ok(e) = serde_json::from_str::<SampleEval>(&text)
    {
        return Ok(e);
    }
    let e = compute()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|err| PipelineError::io(dir, err))?;
    }
    let text = serde_json::to_string_pretty(&e).map_err(|err| PipelineError::Json { path: path.to_path_buf(), line: 0, message: err.to_string() })?;
    odpo_model::weights::write_atomic(path, text.as_bytes())?;
    Ok(e)
}

/// The experiment's preference-run preset: every setting a run does not take from the experiment config.
const PRESET: &str = include_str!("stages/experiment.toml");

/// The trainer's config for one run: the preset (`src/stages/experiment.toml`) with the experiment
/// config's model, backend, `[pref]` and `[lora]`, and the sweep point.
fn run_config(cfg: &ExperimentConfig, point: &SweepPoint, samples: &Path, dir: &Path) -> Result<Checked<RunConfig>> {
    let mut run: RunConfig = odpo_trainer::config::load_toml(PRESET, "odpo-pipeline's experiment preset", &[])?;
    (run.model.path, run.data.path, run.data.seed) = (cfg.model.clone(), samples.to_path_buf(), point.seed);
    (run.data.max_length, run.data.max_prompt_length) = (cfg.pref.max_length, Some(cfg.pref.max_prompt_length));
    run.data.offset = (point.method == Method::Odpo).then(|| OffsetConfig { alpha: point.alpha, ..OffsetConfig::default() });
    run.loss = Some(LossConfig::new(LossKind::Sigmoid, point.beta));
    run.optim.lr = cfg.pref.lr;
    let t = &mut run.train;
    (t.batch_size, t.micro_batch_size, t.epochs, t.seed, t.backend) = (cfg.pref.batch_size, cfg.pref.micro_batch_size.unwrap_or(cfg.pref.batch_size), cfg.pref.epochs, point.seed, cfg.backend);
    (run.output.dir, run.output.cache_dir, run.lora) = (dir.to_path_buf(), dir.join("refcache"), cfg.lora.clone());
    Ok(run.check()?)
}

/// The experiment as Markdown: one row per run, reward and KL with 95% intervals.
fn markdown(cfg: &ExperimentConfig, base: &SampleEval, rows: &[ExperimentRow]) -> String {
    let mut s = format!(
        "{}: {} pair prompts × {} samples, {} held-out prompts × {} samples, reward `{}`.\n\npretrained model: reward {:.3} ± {:.3} (KL 0), {:.1} tokens per response\n\n",
        cfg.name, cfg.pref_prompts, cfg.sample.k, cfg.eval_prompts, cfg.samples_per_prompt, cfg.reward, base.reward.mean, base.reward.ci95, base.mean_tokens
    );
    s.push_str("| method | β | α | seed | reward (±95%) | KL seq (±95%) | KL k3 (±95%) | tokens |\n|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let e = &r.eval;
        let alpha = if r.method == Method::Odpo { format!("{}", r.alpha) } else { "–".into() };
        let _ = writeln!(
            s,
            "| {} | {} | {alpha} | {} | {:.3} ± {:.3} | {:.3} ± {:.3} | {:.3} ± {:.3} | {:.1} |",
            r.method.name(), r.beta, r.seed, e.reward.mean, e.reward.ci95, e.kl.seq.mean, e.kl.seq.ci95, e.kl.k3.mean, e.kl.k3.ci95, e.mean_tokens
        );
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_shipped_experiment_config_parses_and_bad_values_are_named() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/pipeline/smollm2-imdb.toml");
        let cfg = ExperimentConfig::from_file(&path).unwrap().into_inner();
        assert_eq!((cfg.methods.len(), cfg.lora.as_ref().map(|l| l.rank)), (2, Some(16)));
        let mut bad = cfg.clone();
        bad.sample.k = 1;
        assert!(bad.validate().unwrap_err().to_string().contains("sample.k"));
        // Every value of the sweep's lists and its name, at load: a run's own check would come
        // after the samples, naming `loss.beta` or the offset's `alpha`.
        for (betas, alphas, name, msg) in [
            (vec![0.1, 0.0], vec![1.0], "x", "config: `betas` holds 0; every β must be a finite number > 0"),
            (vec![f64::INFINITY], vec![1.0], "x", "config: `betas` holds inf; every β must be a finite number > 0"),
            (vec![0.1], vec![1.0, -1.0], "x", "config: `alphas` holds -1; every α must be a finite number >= 0"),
            (vec![0.1], vec![f64::NAN], "x", "config: `alphas` holds NaN; every α must be a finite number >= 0"),
            (vec![0.1], vec![1.0], "", "config: `name` is \"\"; expected the name of one folder under runs/ (no `/`, not empty, `.` or `..`)"),
        ] {
            let mut bad = cfg.clone();
            (bad.betas, bad.alphas, bad.name) = (betas, alphas, name.into());
            assert_eq!(bad.validate().unwrap_err().to_string(), msg);
        }
        let refused = |change: &dyn Fn(&mut ExperimentConfig)| {
            let mut bad = cfg.clone();
            change(&mut bad);
            bad.validate().unwrap_err().to_string()
        };
        assert_eq!(refused(&|c| c.sample.temperature = f64::NAN), "config: `sample.temperature` is NaN; expected a finite number > 0");
        assert_eq!(refused(&|c| c.pref.lr = 0.0), "config: `pref.lr` is 0; expected a finite number > 0");
        assert_eq!(refused(&|c| c.pref.micro_batch_size = Some(3)), "config: `pref.batch_size` (8) must be a multiple of `pref.micro_batch_size` (3)");
        assert_eq!(
            refused(&|c| c.pref.max_prompt_length = 64),
            "config: `pref.max_prompt_length` (64) must be between 1 and `pref.max_length` - 1 (63) to leave room for the response"
        );
        assert!(refused(&|c| c.lora.as_mut().unwrap().rank = 0).contains("lora.rank: is 0"));
    }

    #[test]
    fn prompt_list_from_jsonl_is_distinct_and_ordered() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.jsonl");
        std::fs::write(&p, "{\"prompt\": \"b\", \"text\": \"x\"}\n{\"prompt\": \"a\"}\n\n{\"prompt\": \"b\"}\n").unwrap();
        assert_eq!(read_prompt_list(&p).unwrap(), vec!["b".to_string(), "a".to_string()]);
        std::fs::write(&p, "{\"prompt\": \"b\"}\n{\"text\": 1}\n").unwrap();
        let err = read_prompt_list(&p).unwrap_err().to_string();
        assert!(err.contains("p.jsonl:2") && err.contains("prompt"), "{err}");
    }
}
