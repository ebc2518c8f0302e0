//! `PipelineConfig`: one TOML file per pipeline (configs/pipeline/*.toml). Strict like the trainer's
//! `RunConfig`: unknown keys are errors, `--set a.b=value` overrides apply to the TOML tree before it
//! is read, and [`PipelineConfig::validate`] names the key that is out of range.

use std::path::{Path, PathBuf};

use odpo_trainer::config::Checked;
use serde::{Deserialize, Serialize};

use crate::error::{PipelineError, Result};

/// The built-in default pipeline, `configs/pipeline/default.toml`.
pub const DEFAULT_TOML: &str = include_str!("../../../configs/pipeline/default.toml");

/// The preference objective of the pipeline's last stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// DPO: `-log σ(β·h)`.
    Dpo,
    /// ODPO: `-log σ(β·h − Δ)`, Δ = α·log(s_w − s_l).
    Odpo,
}

impl Method {
    /// The name used in configs, tables and plots.
    pub fn name(self) -> &'static str {
        match self {
            Method::Dpo => "dpo",
            Method::Odpo => "odpo",
        }
    }
}

/// How the task scores sampled responses for pairing and offsets. Evaluation always uses the true reward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScoreKind {
    /// The true reward R itself.
    #[default]
    Exact,
    /// A sentiment classifier's shape put on R ([`crate::reward::ClassifierScore`]): p = σ(R/τ + ε),
    /// s = p + 1[p > 0.5], two clusters in [0, 0.5) ∪ (1.5, 2] like the ODPO paper's IMDB scores.
    Classifier,
}

/// Which pair each prompt's scored responses give.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PairSelection {
    /// The best-scored response against the worst (ties dropped).
    #[default]
    BestVsWorst,
    /// The first two responses as sampled, ordered by score (the ODPO paper's code): many are near-ties.
    FirstTwo,
}

impl PairSelection {
    /// The data crate's pairing rule.
    pub fn pairing(self) -> odpo_data::Pairing {
        match self {
            PairSelection::BestVsWorst => odpo_data::Pairing::BestVsWorst,
            PairSelection::FirstTwo => odpo_data::Pairing::FirstTwo,
        }
    }
}

/// A whole pipeline: synthetic task, model, SFT, sampling, preference training, evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// The run folder is `runs/<name>` (a free `runs/<name>-N` when that exists).
    pub name: String,
    /// `odpo` or `dpo`.
    pub loss: Method,
    /// Backend name (`flex`, `wgpu`, `cuda`, ...).
    pub backend: odpo_model::backend::Backend,
    /// Seed of the prompt split, the SFT texts, model init, sampling and training order.
    pub seed: u64,
    /// The synthetic task.
    pub task: TaskSection,
    /// The tiny GPT-2.
    pub model: ModelSection,
    /// Supervised fine-tuning on the synthetic texts.
    pub sft: SftSection,
    /// Sampling the SFT model for preference pairs.
    pub sample: SampleSection,
    /// Preference training.
    pub pref: PrefSection,
    /// Evaluation on held-out prompts.
    pub eval: EvalSection,
}

/// `[task]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSection {
    /// SFT texts (prompt + continuation drawn from the task's generator).
    pub sft_texts: usize,
    /// Prompts sampled for preference pairs (one pair each, see `pref.pairing`; ties dropped).
    pub pref_prompts: usize,
    /// Held-out prompts for evaluation (never seen in training).
    pub eval_prompts: usize,
    /// What pairs and offsets see: `exact` (the true reward) or `classifier`.
    #[serde(default)]
    pub score: ScoreKind,
    /// τ of the classifier score, p = σ(R/τ + ε).
    #[serde(default = "one")]
    pub score_temperature: f64,
    /// σ of the classifier's noise ε ~ N(0, σ²), fixed per (prompt, response).
    #[serde(default = "one")]
    pub score_noise: f64,
}

fn one() -> f64 {
    1.0
}

/// `[model]`: a GPT-2 over the task's vocabulary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Blocks.
    pub n_layer: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// Attention heads (must divide `n_embd`).
    pub n_head: usize,
}

/// `[sft]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftSection {
    /// Optimizer steps (AdamW, cosine decay).
    pub steps: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
}

/// `[sample]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleSection {
    /// Responses per prompt.
    pub k: usize,
    /// Sampling temperature (also used for evaluation samples).
    pub temperature: f64,
    /// Longest response in tokens.
    pub max_new_tokens: usize,
}

/// `[pref]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefSection {
    /// β, the inverse strength of the KL constraint.
    pub beta: f64,
    /// α, the offset scale (ODPO only): Δ = α·log(s_w − s_l).
    pub alpha: f64,
    /// Passes over the pairs (when `steps` is not set).
    pub epochs: f64,
    /// Optimizer steps, whatever the number of pairs: a pair budget then changes the data, not the
    /// compute. Unset: `epochs` passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// Which pair each prompt gives: `best-vs-worst` or `first-two`.
    #[serde(default)]
    pub pairing: PairSelection,
    /// Pairs per step.
    pub batch_size: usize,
    /// Learning rate (AdamW, constant after 10 warmup steps).
    pub lr: f64,
    /// Online rounds (`odpo_pipeline::rounds`): each samples the policy it starts from on its share
    /// of the prompts, pairs the samples and trains `epochs` (or `steps`) on them. 1: one offline
    /// round from the SFT model's samples.
    #[serde(default = "one_round")]
    pub rounds: usize,
    /// The reference in rounds after the first: `initial` (the SFT model throughout) or `previous`
    /// (the policy the round starts from).
    #[serde(default)]
    pub round_reference: RoundReference,
}

fn one_round() -> usize {
    1
}

/// The reference of an online round.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoundReference {
    /// The SFT model, in every round.
    #[default]
    Initial,
    /// The policy the round starts from (the last round's result).
    Previous,
}

/// `[eval]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Samples per held-out prompt, from the policy and from the reference.
    pub samples_per_prompt: usize,
}

impl PipelineConfig {
    /// The built-in default with `sets` applied.
    pub fn default_with(sets: &[String]) -> Result<Checked<Self>> {
        Self::from_toml_str(DEFAULT_TOML, "configs/pipeline/default.toml", sets)
    }

    /// Parses TOML text, applies `--set` overrides and checks; `origin` names the text in errors.
    pub fn from_toml_str(text: &str, origin: &str, sets: &[String]) -> Result<Checked<Self>> {
        odpo_trainer::config::load_toml::<Self>(text, origin, sets)?.check()
    }

    /// Validates ([`PipelineConfig::validate`]) into the config the stages take.
    pub fn check(self) -> Result<Checked<Self>> {
        self.validate()?;
        Ok(Checked::after_validation(self))
    }

    /// Reads [`PipelineConfig::from_toml_str`] from a file.
    pub fn from_file(path: &Path, sets: &[String]) -> Result<Checked<Self>> {
        let text = std::fs::read_to_string(path).map_err(|e| PipelineError::io(path, e))?;
        Self::from_toml_str(&text, &path.display().to_string(), sets)
    }

    /// The resolved config as TOML.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| PipelineError::config_parse("the resolved pipeline config", format!("could not be written as TOML: {e}")))
    }

    /// Checks ranges, naming the key.
    pub fn validate(&self) -> Result<()> {
        check_run_name(&self.name)?;
        let positive = [
            ("task.sft_texts", self.task.sft_texts),
            ("task.pref_prompts", self.task.pref_prompts),
            ("task.eval_prompts", self.task.eval_prompts),
            ("model.n_layer", self.model.n_layer),
            ("model.n_embd", self.model.n_embd),
            ("model.n_head", self.model.n_head),
            ("sft.steps", self.sft.steps),
            ("sft.batch_size", self.sft.batch_size),
            ("sample.max_new_tokens", self.sample.max_new_tokens),
            ("pref.batch_size", self.pref.batch_size),
            ("eval.samples_per_prompt", self.eval.samples_per_prompt),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(PipelineError::config(key, "is 0; expected at least 1"));
            }
        }
        let most = crate::synthetic::MAX_POSITIONS - crate::synthetic::PROMPT_WORDS;
        if self.sample.max_new_tokens > most {
            return Err(PipelineError::config(
                "sample.max_new_tokens",
                format!(
                    "is {}; the task's model has {} positions and its prompts take {}, so at most {most}",
                    self.sample.max_new_tokens,
                    crate::synthetic::MAX_POSITIONS,
                    crate::synthetic::PROMPT_WORDS
                ),
            ));
        }
        if self.sample.k < 2 {
            return Err(PipelineError::config("sample.k", format!("is {}; pairs need at least 2 responses per prompt", self.sample.k)));
        }
        if !self.model.n_embd.is_multiple_of(self.model.n_head) {
            return Err(PipelineError::config("model.n_embd", format!("({}) must be a multiple of `model.n_head` ({})", self.model.n_embd, self.model.n_head)));
        }
        for (key, v) in [("sft.lr", self.sft.lr), ("pref.lr", self.pref.lr), ("pref.beta", self.pref.beta), ("pref.epochs", self.pref.epochs), ("sample.temperature", self.sample.temperature)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(PipelineError::config(key, format!("is {v}; expected a finite number > 0")));
            }
        }
        if self.pref.rounds == 0 || self.pref.rounds > self.task.pref_prompts {
            return Err(PipelineError::config("pref.rounds", format!("is {}; expected 1 to task.pref_prompts ({}): each round needs prompts of its own", self.pref.rounds, self.task.pref_prompts)));
        }
        if self.pref.steps == Some(0) {
            return Err(PipelineError::config("pref.steps", "is 0; expected at least 1 (or leave it out to use `pref.epochs`)"));
        }
        if !(self.task.score_temperature.is_finite() && self.task.score_temperature > 0.0) {
            return Err(PipelineError::config("task.score_temperature", format!("is {}; expected a finite number > 0", self.task.score_temperature)));
        }
        if !(self.task.score_noise.is_finite() && self.task.score_noise >= 0.0) {
            return Err(PipelineError::config("task.score_noise", format!("is {}; expected a finite number >= 0", self.task.score_noise)));
        }
        if !(self.pref.alpha.is_finite() && self.pref.alpha >= 0.0) {
            return Err(PipelineError::config("pref.alpha", format!("is {}; expected a finite number >= 0", self.pref.alpha)));
        }
        Ok(())
    }

    /// A new folder for a run of this config, created here: `<root>/<name>`, or the first free
    /// `<root>/<name>-N`. `create_dir` fails on a folder that exists, so two runs started at once
    /// never share one.
    pub fn new_run_dir(&self, root: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(root).map_err(|e| PipelineError::io(root, e))?;
        let mut n = 0usize;
        loop {
            let dir = if n == 0 { root.join(&self.name) } else { root.join(format!("{}-{n}", self.name)) };
            match std::fs::create_dir(&dir) {
                Ok(()) => return Ok(dir),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                Err(e) => return Err(PipelineError::io(&dir, e)),
            }
        }
    }
}

/// A run's `name`: one folder under `runs/`, so neither empty nor a path (`runs/` itself, or a
/// folder elsewhere, is not what the key means).
pub(crate) fn check_run_name(name: &str) -> Result<()> {
    let mut parts = Path::new(name).components();
    match (parts.next(), parts.next()) {
        (Some(std::path::Component::Normal(_)), None) if !name.contains(['/', '\\']) => Ok(()),
        _ => Err(PipelineError::config("name", format!("is {name:?}; expected the name of one folder under runs/ (no `/`, not empty, `.` or `..`)"))),
    }
}

/// A sweep's β and α lists: every β finite and > 0, every α finite and ≥ 0, refused at load naming
/// the list (each run's own check would name `loss.beta` or the offset's `alpha`, and only after
/// the SFT stage and the sampling).
pub(crate) fn check_sweep_values(betas: &[f64], alphas: &[f64]) -> Result<()> {
    if let Some(b) = betas.iter().find(|b| !(b.is_finite() && **b > 0.0)) {
        return Err(PipelineError::config("betas", format!("holds {b}; every β must be a finite number > 0")));
    }
    if let Some(a) = alphas.iter().find(|a| !(a.is_finite() && **a >= 0.0)) {
        return Err(PipelineError::config("alphas", format!("holds {a}; every α must be a finite number >= 0")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_started_at_once_each_get_a_folder_of_their_own() -> Result<()> {
        let root = tempfile::tempdir().map_err(|e| PipelineError::io(std::env::temp_dir(), e))?;
        let cfg = PipelineConfig::default_with(&["name=race".into()])?;
        std::fs::create_dir_all(root.path().join("race-2")).map_err(|e| PipelineError::io(root.path(), e))?;
        // Eight claims at once: an existence check followed by a create would hand some of them
        // the same folder.
        let barrier = std::sync::Barrier::new(8);
        let mut dirs: Vec<PathBuf> = std::thread::scope(|s| {
            let claims: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        cfg.new_run_dir(root.path())
                    })
                })
                .collect();
            claims.into_iter().map(|c| c.join().unwrap_or_else(|_| Err(PipelineError::config("name", "a claim panicked")))).collect::<Result<Vec<_>>>()
        })?;
        dirs.sort();
        let names: Vec<String> = dirs.iter().map(|d| d.strip_prefix(root.path()).unwrap_or(d).display().to_string()).collect();
        assert_eq!(names, ["race", "race-1", "race-3", "race-4", "race-5", "race-6", "race-7", "race-8"], "the folder that was there (race-2) is skipped, and no two claims share one");
        assert!(dirs.iter().all(|d| d.is_dir()));
        Ok(())
    }

    #[test]
    fn default_parses_and_sets_apply() -> Result<()> {
        let cfg = PipelineConfig::default_with(&[])?;
        assert_eq!(cfg.loss, Method::Odpo);
        let cfg = PipelineConfig::default_with(&["loss=dpo".into(), "pref.beta=0.5".into()])?;
        assert_eq!(cfg.loss, Method::Dpo);
        assert_eq!(cfg.pref.beta, 0.5);
        let e = PipelineConfig::default_with(&["pref.betta=0.5".into()]).map(|_| ()).map_err(|e| e.to_string()).err().unwrap_or_default();
        assert!(e.starts_with("--set pref.betta=0.5: ") && e.contains("unknown field `betta`"), "{e}");
        let e = PipelineConfig::default_with(&["sample.k=1".into()]).map(|_| ()).map_err(|e| e.to_string()).err().unwrap_or_default();
        assert_eq!(e, "config: `sample.k` is 1; pairs need at least 2 responses per prompt");
        let cfg = PipelineConfig::default_with(&["task.score=classifier".into(), "pref.pairing=first-two".into(), "pref.steps=50".into()])?;
        assert_eq!((cfg.task.score, cfg.pref.pairing, cfg.pref.steps), (ScoreKind::Classifier, PairSelection::FirstTwo, Some(50)));
        assert_eq!(PipelineConfig::from_toml_str(&cfg.to_toml()?, "round trip", &[])?, cfg);
        let e = PipelineConfig::default_with(&["task.score_noise=-1".into()]).map(|_| ()).map_err(|e| e.to_string()).err().unwrap_or_default();
        assert_eq!(e, "config: `task.score_noise` is -1; expected a finite number >= 0");
        // The model's sizes and the responses' length are checked before any stage runs (the
        // length once ran the SFT stage, then stopped at sampling).
        let e = PipelineConfig::default_with(&["model.n_embd=0".into()]).map(|_| ()).map_err(|e| e.to_string()).err().unwrap_or_default();
        assert_eq!(e, "config: `model.n_embd` is 0; expected at least 1");
        let e = PipelineConfig::default_with(&["sample.max_new_tokens=29".into()]).map(|_| ()).map_err(|e| e.to_string()).err().unwrap_or_default();
        assert_eq!(e, "config: `sample.max_new_tokens` is 29; the task's model has 32 positions and its prompts take 4, so at most 28");
        assert_eq!(PipelineConfig::default_with(&["sample.max_new_tokens=28".into()])?.sample.max_new_tokens, 28);
        for name in ["", ".", "..", "a/b", "../elsewhere", "/tmp/x"] {
            let e = PipelineConfig::default_with(&[format!("name={name:?}")]).map(|_| ()).map_err(|e| e.to_string()).err().unwrap_or_default();
            assert_eq!(e, format!("config: `name` is {name:?}; expected the name of one folder under runs/ (no `/`, not empty, `.` or `..`)"));
        }
        assert_eq!(PipelineConfig::default_with(&["name=\"beta-0.1\"".into()])?.name, "beta-0.1");
        Ok(())
    }
}
