//! `RunConfig`: one TOML file per run, tables `[model] [data] [loss] [optim] [train] [eval] [output]`.
//!
//! Strict like nanoGPT's configurator: an unknown key is an error naming it, a `--set a.b=value`
//! override is applied to the TOML tree before deserialising (the value parsed as TOML, a bare word
//! taken as a string), and [`RunConfig::validate`] refuses values out of range and options that do
//! nothing for the chosen optimizer, schedule or stage. Each key is documented once, here.

use std::path::{Path, PathBuf};

use odpo_data::DataConfig;
use odpo_loss::LossConfig;
use odpo_model::Precision;
use odpo_model::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// A whole run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The policy (and reference) model.
    pub model: ModelSection,
    /// The data: odpo-data's `[data]` table (path, format, pairing, offset, lengths, split).
    pub data: DataConfig,
    /// The objective: odpo-loss's `[loss]` table. Ignored (and must be left out) for `stage = "sft"`.
    #[serde(default)]
    pub loss: Option<LossConfig>,
    /// Optimizer, learning rate and schedule.
    #[serde(default)]
    pub optim: OptimConfig,
    /// Stage, batch sizes, length of the run, reference handling, logging and checkpoints.
    #[serde(default)]
    pub train: TrainConfig,
    /// Evaluation on the held-out pairs.
    #[serde(default)]
    pub eval: EvalConfig,
    /// Where the run writes.
    #[serde(default)]
    pub output: OutputConfig,
    /// LoRA: train low-rank adapters on the frozen model instead of every weight (rank, alpha,
    /// dropout, targets, rslora, seed; see `odpo_model::LoraConfig`). The reference is then the same
    /// weights with the adapters off.
    #[serde(default)]
    pub lora: Option<odpo_model::LoraConfig>,
}

/// `[model]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A HF folder (`config.json` + safetensors) or a `.gguf` file: the policy's starting point and the reference.
    pub path: PathBuf,
    /// The folder with `tokenizer.json`; default: the model folder (or the `.gguf` file's folder).
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Ignore the weights and start from random ones (seeded by `train.seed`): for tests and smoke runs.
    #[serde(default)]
    pub random_init: bool,
    /// The reference model, when it is not the policy's starting point (a HF folder or a `.gguf`
    /// file with the policy's vocabulary): online rounds that keep the first round's reference
    /// while the policy starts from the last round's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<PathBuf>,
}

/// The optimizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// AdamW (decoupled weight decay), PyTorch's update rule.
    Adamw,
    /// RMSprop, PyTorch's update rule (the ODPO paper's optimizer).
    Rmsprop,
}

/// The learning-rate decay after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DecayKind {
    /// Stay at `lr` (the DPO/ODPO code).
    Constant,
    /// Linearly down to `lr * min_lr_ratio` at the last step.
    Linear,
    /// Half a cosine down to `lr * min_lr_ratio` at the last step.
    Cosine,
}

/// `[optim]`. PyTorch's defaults, written out: burn's AdamW defaults (eps 1e-5, weight decay 1e-4)
/// and RMSprop defaults (momentum 0.9, eps 1e-5) differ from PyTorch's and are never used.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// `adamw` or `rmsprop` (the paper: rmsprop).
    pub optimizer: OptimizerKind,
    /// Peak learning rate (the paper: 5e-7).
    pub lr: f64,
    /// Weight decay: decoupled for AdamW (PyTorch default 0.01), L2 added to the gradient for RMSprop (default 0).
    pub weight_decay: Option<f64>,
    /// ε added to the denominator (PyTorch: 1e-8 for both).
    pub eps: f64,
    /// AdamW only: (β1, β2), default [0.9, 0.999].
    pub betas: Option<[f64; 2]>,
    /// RMSprop only: smoothing constant α of the squared-gradient average, default 0.99.
    pub alpha: Option<f64>,
    /// RMSprop only: momentum, default 0.
    pub momentum: Option<f64>,
    /// RMSprop only: centred variant, default false.
    pub centered: Option<bool>,
    /// AdamW only: update all parameters at once as one buffer, as PyTorch's `foreach` AdamW does,
    /// on libtorch tensors, and four parameters to a kernel launch on the cubecl backends. Unset:
    /// where it pays, the libtorch tensors the one-pass CPU kernel cannot reach (CUDA, half
    /// precision), and the cubecl backends; true: on every libtorch tensor too; false: each
    /// parameter on its own. The same values either way.
    pub foreach: Option<bool>,
    /// Clip the global gradient norm to this, as `torch.nn.utils.clip_grad_norm_` (the paper: 10). None: no clipping.
    pub max_grad_norm: Option<f64>,
    /// Linear warmup steps: lr · min(1, (step + 1) / (warmup_steps + 1)) (the paper: 150).
    pub warmup_steps: usize,
    /// The decay after warmup.
    pub schedule: DecayKind,
    /// Final lr as a share of `lr` for `linear` and `cosine`, in [0, 1]. Default 0.
    pub min_lr_ratio: Option<f64>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            optimizer: OptimizerKind::Rmsprop,
            lr: 5e-7,
            weight_decay: None,
            eps: 1e-8,
            betas: None,
            alpha: None,
            momentum: None,
            centered: None,
            foreach: None,
            max_grad_norm: Some(10.0),
            warmup_steps: 150,
            schedule: DecayKind::Constant,
            min_lr_ratio: None,
        }
    }
}

/// What a run trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Supervised fine-tuning: token-mean NLL of the chosen responses (prompt masked).
    Sft,
    /// Preference training with the `[loss]` objective.
    Preference,
}

/// What the SFT stage trains on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SftOn {
    /// The chosen response of every pair (prompt masked).
    #[default]
    Chosen,
    /// Every response of a scored format (`scored-jsonl`, `tldr-json`) after its prompt, whatever its
    /// score: the paper's SFT on the task's texts.
    Responses,
}

/// Where the reference log-probs come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReferenceMode {
    /// A frozen copy of the starting model, run (without autodiff) next to the policy on every batch.
    Frozen,
    /// Computed once for every pair before training and cached on disk (`output.cache_dir`), keyed by the
    /// model, the tokenized data and the length settings; later runs with the same key reuse the file.
    Cached,
}

/// How a preference micro-batch's rows go through the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RowLayout {
    /// `shared-prompt` on the CPU backends (`flex`, `tch`), `concatenated` on the GPU backends.
    #[default]
    Auto,
    /// Each prompt once, then its two completions after it from the prompt's keys and values: fewer
    /// tokens (each prompt's are computed once, not twice) in two passes through the layers.
    SharedPrompt,
    /// Chosen and rejected as `[2B, T]` rows of prompt + completion, as TRL runs them: every token of
    /// a prompt twice, in one pass through the layers.
    Concatenated,
}

impl RowLayout {
    /// The layout a run on `backend` takes. Where the step is bound by computation (the CPU) the
    /// shared prompt's fewer tokens win: 13% off the policy forward and 22% off the backward pass on
    /// SmolLM2-135M 4 × 128 (docs/performance.md). Where the step waits on the host issuing
    /// operations (a GPU, below billions of parameters) its second pass through the layers costs
    /// more than the tokens it saves: on the launch-bound shape that stands in for a GPU the
    /// concatenated rows took 0.46x the shared prompt's step.
    pub fn resolve(self, backend: Backend) -> odpo_data::Layout {
        match self {
            Self::SharedPrompt => odpo_data::Layout::SharedPrompt,
            Self::Concatenated => odpo_data::Layout::Concatenated,
            Self::Auto if backend.is_gpu() => odpo_data::Layout::Concatenated,
            Self::Auto => odpo_data::Layout::SharedPrompt,
        }
    }
}

impl std::str::FromStr for RowLayout {
    type Err = TrainError;
    /// The names `train.layout` takes (`odpo bench --layout`).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "shared-prompt" => Ok(Self::SharedPrompt),
            "concatenated" => Ok(Self::Concatenated),
            other => Err(TrainError::config("train.layout", format!("is `{other}`; expected auto, shared-prompt or concatenated"))),
        }
    }
}

/// `[train]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// `preference` (default) or `sft`.
    pub stage: Stage,
    /// SFT only: `chosen` (default; the chosen response of every pair) or `responses` (every response of a
    /// scored format).
    pub sft_on: SftOn,
    /// Pairs (SFT: sequences) per optimizer step (the paper: 32).
    pub batch_size: usize,
    /// Pairs per forward pass; `batch_size` must be a multiple. Gradients are accumulated over the
    /// micro-batches and weighted so the step equals one pass over the whole batch.
    pub micro_batch_size: usize,
    /// Optimizer steps; None: `epochs` passes over the training pairs.
    pub max_steps: Option<usize>,
    /// Passes over the training pairs when `max_steps` is not set (the paper: 1).
    pub epochs: f64,
    /// Seed of the data order (and of `model.random_init`).
    pub seed: u64,
    /// The backend (`flex`, `wgpu`, `cuda`, ...); `--backend` overrides it.
    pub backend: Backend,
    /// Data-parallel devices (`["cuda:0", "cuda:1"]`, all of one backend); empty: the backend's
    /// default device alone. Each step's pairs are split evenly across them and the gradients summed
    /// on the first; `--devices` overrides it.
    pub devices: Vec<String>,
    /// Compute precision: `f32` (default), or `bf16` / `f16` mixed precision (forward and backward in
    /// half precision; weights, gradients and optimizer state in f32).
    pub dtype: Precision,
    /// The routine of the bf16 / f16 products on the cubecl backends (cuda, vulkan, wgpu, metal):
    /// `auto` (default: burn's own, or the one `odpo --matmul` names) or a name from
    /// `odpo bench --matmul-routines`, which times each on the products of a step. A product the
    /// routine refuses runs burn's routine (logged once).
    pub matmul: odpo_kernels::MatmulRoutine,
    /// Keep fewer activations for the backward pass and recompute the rest there (burn's balanced
    /// gradient checkpointing: memory-bound operations are recomputed, matmuls keep their outputs).
    /// The gradients are the same; less memory, more time.
    pub gradient_checkpointing: bool,
    /// `frozen` (default) or `cached` reference log-probs; preference stage only.
    pub reference: ReferenceMode,
    /// TR-DPO: every `ref_model_sync_steps` steps the frozen reference moves toward the policy,
    /// `π_ref ← α·π_θ + (1 − α)·π_ref` with α = `ref_model_mixup_alpha` (TRL's `sync_ref_model`).
    /// Needs `reference = "frozen"`, full fine-tuning and the starting model as the reference.
    pub sync_ref_model: bool,
    /// TR-DPO's α in (0, 1] (TRL's default 0.6); 1 copies the policy (the hard update).
    pub ref_model_mixup_alpha: f64,
    /// TR-DPO's τ: optimizer steps between updates of the reference (TRL's default 512).
    pub ref_model_sync_steps: usize,
    /// `auto` (default), `shared-prompt` or `concatenated`: how a preference micro-batch's rows go
    /// through the model ([`RowLayout`]). The gradients are the same up to rounding.
    pub layout: RowLayout,
    /// Log training metrics every this many steps.
    pub log_every: usize,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: usize,
    /// Checkpoints kept on disk (the newest ones), at least 1.
    pub keep_checkpoints: usize,
    /// Stop with an error after this many steps in a row that change nothing: a gradient norm of
    /// (almost) zero, with the preference loss at ln 2 (adapters not attached, every completion masked,
    /// chosen identical to rejected, the policy frozen). 0 turns the guard off.
    pub stop_if_not_learning: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            stage: Stage::Preference,
            sft_on: SftOn::Chosen,
            batch_size: 32,
            micro_batch_size: 4,
            max_steps: None,
            epochs: 1.0,
            seed: 0,
            backend: Backend::Flex,
            devices: Vec::new(),
            dtype: Precision::F32,
            matmul: odpo_kernels::MatmulRoutine::AUTO,
            gradient_checkpointing: false,
            reference: ReferenceMode::Frozen,
            sync_ref_model: false,
            ref_model_mixup_alpha: 0.6,
            ref_model_sync_steps: 512,
            layout: RowLayout::Auto,
            log_every: 10,
            checkpoint_every: 100,
            keep_checkpoints: 2,
            stop_if_not_learning: 20,
        }
    }
}

/// `[eval]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Evaluate on the eval split every this many steps (0: only at the start and the end).
    pub every: usize,
    /// Pairs per forward pass during evaluation.
    pub batch_size: usize,
    /// Use at most this many eval pairs (the first ones); None: all.
    pub max_pairs: Option<usize>,
    /// Also evaluate before the first step.
    pub at_start: bool,
    /// Stop when a held-out metric stops improving (`[eval.early_stopping]`); None: train to the end.
    pub early_stopping: Option<EarlyStoppingConfig>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self { every: 100, batch_size: 8, max_pairs: None, at_start: true, early_stopping: None }
    }
}

/// `[eval.early_stopping]`: stop training when the eval metric `metric` has not improved by more
/// than `min_delta` for `patience` evaluations in a row, and end with the best evaluated model
/// (transformers' `EarlyStoppingCallback` with `load_best_model_at_end`; see [`crate::early_stop`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EarlyStoppingConfig {
    /// An eval metric (`loss`, `rewards/accuracies`, `rewards/margins`, ...; SFT: `nll`, `ppl`).
    pub metric: String,
    /// Evaluations without improvement before the run stops.
    pub patience: usize,
    /// The least change that resets the patience (a smaller improvement still becomes the best).
    pub min_delta: f64,
    /// Whether lower or higher is better; None: lower for `loss`, `nll` and `ppl`, higher otherwise.
    pub mode: Option<StopMode>,
    /// End with the best evaluated model (its checkpoint is kept in `<run>/best`) rather than the last.
    pub restore_best: bool,
}

impl Default for EarlyStoppingConfig {
    fn default() -> Self {
        Self { metric: "loss".into(), patience: 3, min_delta: 0.0, mode: None, restore_best: true }
    }
}

/// Which way an early-stopping metric improves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopMode {
    /// Lower is better.
    Min,
    /// Higher is better.
    Max,
}

impl EarlyStoppingConfig {
    /// The direction in force: `mode`, or the metric's own (lower for losses).
    pub fn mode(&self) -> StopMode {
        self.mode.unwrap_or(if matches!(self.metric.as_str(), "loss" | "nll" | "ppl") || self.metric.ends_with("loss") { StopMode::Min } else { StopMode::Max })
    }
}

/// `[output]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    /// The run folder: config.toml, metrics.jsonl, metrics.csv, checkpoints/, model/.
    pub dir: PathBuf,
    /// Where cached reference log-probs live (shared between runs).
    pub cache_dir: PathBuf,
    /// Export the trained model (HF safetensors + config + tokenizer files) to `<dir>/model` at the end.
    pub export: bool,
    /// Show a progress bar on stderr (hidden anyway when stderr is not a terminal).
    pub progress: bool,
    /// burn-train's TUI dashboard instead of the progress bar when stdout is a terminal: every
    /// metric plotted as it comes, `q` stops (checkpointed, resumable); the log goes to
    /// `<run>/train.log` meanwhile.
    pub dashboard: bool,
    /// Where else the metrics go: `"tensorboard"` writes `<dir>/tensorboard/events.out.tfevents.*`,
    /// `"burn-train"` burn-train's metric files under `<dir>/burn-train/`.
    pub report_to: Vec<ReportTo>,
}

/// A metrics sink besides `metrics.jsonl` and `metrics.csv`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReportTo {
    /// TensorBoard event files.
    Tensorboard,
    /// burn-train's file metric logger (`<run>/burn-train/`).
    BurnTrain,
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self { dir: PathBuf::from("runs/run"), cache_dir: PathBuf::from("runs/refcache"), export: true, progress: true, dashboard: false, report_to: Vec::new() }
    }
}

/// A config that passed its checks: what a run takes. Only a config's `check` makes one, so nothing
/// runs on values that were not validated, and a change after the check needs a new check
/// ([`Checked::into_inner`], edit, `check`).
#[derive(Clone, Debug, PartialEq)]
pub struct Checked<T>(T);

impl<T> std::ops::Deref for Checked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: Serialize> Serialize for Checked<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<T> Checked<T> {
    /// Marks a config as checked; for a config type's own `check` after its validation.
    pub fn after_validation(cfg: T) -> Self {
        Self(cfg)
    }

    /// The config, to edit (and check again).
    pub fn into_inner(self) -> T {
        self.0
    }
}

/// A loss config error with its keys named as the run config spells them (`loss.beta`), so that
/// it reads like every other key's error and the fix can be typed as `--set loss.beta=...`.
fn in_loss_table(e: odpo_loss::LossError) -> TrainError {
    use odpo_loss::LossError::*;
    match e {
        InvalidOption { option, value, reason } => TrainError::config(format!("loss.{option}"), format!("= {value}: {reason}")),
        UnusedOption { option, value, loss_type, read_by } => TrainError::config(
            format!("loss.{option}"),
            format!("= {value} does nothing with `loss.loss_type` = [{loss_type}]: it is read only by {read_by}"),
        ),
        WeightsLength { weights, losses } => TrainError::config(
            "loss.loss_weights",
            format!("has {weights} entries but `loss.loss_type` has {losses}; give one weight per loss"),
        ),
        other => other.into(),
    }
}

impl RunConfig {
    /// Parses TOML text, applies `--set` overrides (`a.b=value`), deserialises and checks.
    /// `origin` names the text in error messages.
    pub fn from_toml_str(text: &str, origin: &str, sets: &[String]) -> Result<Checked<Self>> {
        load_toml::<RunConfig>(text, origin, sets)?.check()
    }

    /// Validates every table and the rules between them ([`RunConfig::validate`]).
    pub fn check(self) -> Result<Checked<Self>> {
        self.validate()?;
        Ok(Checked(self))
    }

    /// Reads [`RunConfig::from_toml_str`] from a file.
    pub fn from_file(path: &Path, sets: &[String]) -> Result<Checked<Self>> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        Self::from_toml_str(&text, &path.display().to_string(), sets)
    }

    /// The resolved config as TOML (every default written out), as saved in the run folder.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| TrainError::ConfigParse { origin: "the resolved config".into(), message: format!("could not be written as TOML: {e}") })
    }

    /// Checks ranges and refuses options that do nothing, naming the key.
    pub fn validate(&self) -> Result<()> {
        let err = |k: &str, m: String| Err(TrainError::config(k, m));
        if let Some(lora) = &self.lora {
            lora.validate()?;
        }
        self.data.validate()?;
        self.optim.validate()?;
        self.train.validate()?;
        self.eval.validate()?;
        // An empty path is the working folder: the run's files would land among the user's own.
        for (key, dir) in [("output.dir", &self.output.dir), ("output.cache_dir", &self.output.cache_dir)] {
            if dir.as_os_str().is_empty() {
                return err(key, "is empty; expected a folder (it is created if missing)".into());
            }
        }
        if cfg!(not(feature = "dashboard")) {
            if self.output.dashboard {
                return err("output.dashboard", "this build has no burn-train dashboard (odpo-trainer's `dashboard` feature, in the default flex build); remove it".into());
            }
            if self.output.report_to.contains(&ReportTo::BurnTrain) {
                return err("output.report_to", "\"burn-train\" needs the `dashboard` feature, in the default flex build; remove it".into());
            }
        }
        // What one table allows depends on another.
        let t = &self.train;
        if t.sft_on == SftOn::Responses {
            if t.stage != Stage::Sft {
                return err("train.sft_on", "= \"responses\" applies to `train.stage = \"sft\"` only; remove it".into());
            }
            if !self.data.format.is_scored() {
                return err(
                    "train.sft_on",
                    format!("= \"responses\" needs a scored format (scored-jsonl, tldr-json); `data.format` is `{}`", self.data.format.name()),
                );
            }
        }
        match t.stage {
            Stage::Sft => {
                // The SFT loss is the chosen responses' NLL, with a mixture of experts' load-balancing
                // loss beside it: of the table, only its weight applies.
                if let Some(loss) = &self.loss {
                    let weight = odpo_loss::LossConfig { router_aux_loss_coef: loss.router_aux_loss_coef, ..Default::default() };
                    if *loss != weight {
                        return err("loss", "does not apply to `train.stage = \"sft\"` (the SFT loss is the chosen responses' NLL), but for `loss.router_aux_loss_coef`; remove the rest of the table".into());
                    }
                    weight.validate().map_err(in_loss_table)?;
                }
                if t.reference != ReferenceMode::Frozen {
                    return err("train.reference", "does not apply to `train.stage = \"sft\"`, which has no reference model; remove it".into());
                }
                if self.data.offset.is_some() {
                    return err("data.offset", "does not apply to `train.stage = \"sft\"`; remove it".into());
                }
                if self.model.reference.is_some() {
                    return err("model.reference", "does not apply to `train.stage = \"sft\"`, which has no reference model; remove it".into());
                }
            }
            Stage::Preference => {
                let loss = self.loss.clone().unwrap_or_default();
                loss.validate().map_err(in_loss_table)?;
                if self.data.offset.is_some() {
                    for kind in &loss.loss_type {
                        if let Err(why) = kind.offset_support() {
                            return err("data.offset", format!("cannot be used with `loss.loss_type` {kind}: {why}"));
                        }
                    }
                }
                if t.reference == ReferenceMode::Cached && loss.loss_type.iter().all(|k| k.reference_free()) {
                    return err("train.reference", "= \"cached\" does nothing: every objective in `loss.loss_type` is reference-free".into());
                }
            }
        }
        if t.sync_ref_model {
            // TR-DPO moves a reference model of the policy's own weights; TRL refuses the same cases.
            let why = if t.stage == Stage::Sft {
                Some("`train.stage = \"sft\"` has no reference model")
            } else if !self.needs_reference() {
                Some("every objective in `loss.loss_type` is reference-free")
            } else if t.reference == ReferenceMode::Cached {
                Some("`train.reference = \"cached\"` computes the reference's log-probs once, before training; use \"frozen\"")
            } else if self.lora.is_some() {
                Some("under `[lora]` the reference is the base weights the adapters are trained on, shared with the policy; train without LoRA")
            } else if self.model.reference.is_some() {
                Some("`model.reference` names another model than the one the policy starts from")
            } else {
                None
            };
            if let Some(why) = why {
                return err("train.sync_ref_model", format!("(TR-DPO) cannot be used here: {why}"));
            }
        }
        Ok(())
    }

    /// The loss config in force (the default one when `[loss]` is left out).
    pub fn loss(&self) -> LossConfig {
        self.loss.clone().unwrap_or_default()
    }

    /// Whether the run needs reference log-probs at all.
    pub fn needs_reference(&self) -> bool {
        self.train.stage == Stage::Preference && !self.loss().loss_type.iter().all(|k| k.reference_free())
    }
}

impl OptimConfig {
    /// Checks `[optim]` on its own, naming the key.
    pub fn validate(&self) -> Result<()> {
        let err = |k: &str, m: String| Err(TrainError::config(k, m));
        let o = self;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return err("optim.lr", format!("is {}; expected a finite number > 0", o.lr));
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return err("optim.eps", format!("is {}; expected a finite number > 0", o.eps));
        }
        if let Some(wd) = o.weight_decay
            && !(wd.is_finite() && wd >= 0.0)
        {
            return err("optim.weight_decay", format!("is {wd}; expected a finite number >= 0"));
        }
        let not_for = |k: &str| err(k, format!("does not apply to `optim.optimizer = \"{}\"`; remove it", optimizer_name(o.optimizer)));
        match o.optimizer {
            OptimizerKind::Adamw => {
                if o.alpha.is_some() {
                    return not_for("optim.alpha");
                }
                if o.momentum.is_some() {
                    return not_for("optim.momentum");
                }
                if o.centered.is_some() {
                    return not_for("optim.centered");
                }
                if let Some([b1, b2]) = o.betas
                    && !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2))
                {
                    return err("optim.betas", format!("is [{b1}, {b2}]; expected two numbers in [0, 1)"));
                }
            }
            OptimizerKind::Rmsprop => {
                if o.foreach.is_some() {
                    return not_for("optim.foreach");
                }
                if o.betas.is_some() {
                    return not_for("optim.betas");
                }
                if let Some(a) = o.alpha
                    && !(0.0..1.0).contains(&a)
                {
                    return err("optim.alpha", format!("is {a}; expected a number in [0, 1)"));
                }
                if let Some(m) = o.momentum
                    && !(0.0..1.0).contains(&m)
                {
                    return err("optim.momentum", format!("is {m}; expected a number in [0, 1)"));
                }
            }
        }
        if let Some(c) = o.max_grad_norm
            && !(c.is_finite() && c > 0.0)
        {
            return err("optim.max_grad_norm", format!("is {c}; expected a finite number > 0 (leave it out for no clipping)"));
        }
        if let Some(r) = o.min_lr_ratio {
            if o.schedule == DecayKind::Constant {
                return err("optim.min_lr_ratio", "does not apply to `optim.schedule = \"constant\"`; remove it".into());
            }
            if !(0.0..=1.0).contains(&r) {
                return err("optim.min_lr_ratio", format!("is {r}; expected a number in [0, 1]"));
            }
        }

        Ok(())
    }
}

impl TrainConfig {
    /// Checks `[train]` on its own, naming the key.
    pub fn validate(&self) -> Result<()> {
        let err = |k: &str, m: String| Err(TrainError::config(k, m));
        let t = self;
        if t.batch_size == 0 || t.micro_batch_size == 0 {
            return err("train.batch_size", "and `train.micro_batch_size` must be at least 1".into());
        }
        if !t.batch_size.is_multiple_of(t.micro_batch_size) {
            return err(
                "train.batch_size",
                format!("({}) must be a multiple of `train.micro_batch_size` ({})", t.batch_size, t.micro_batch_size),
            );
        }
        for d in &t.devices {
            if d.split(':').next() != Some(t.backend.name()) {
                return err("train.devices", format!("entry `{d}` is not a device of `train.backend = \"{}\"`; every device must be of the run's backend", t.backend.name()));
            }
        }
        check_batch_split(t.batch_size, t.micro_batch_size, t.devices.len().max(1))?;
        if t.stage == Stage::Sft && t.layout != RowLayout::Auto {
            return err("train.layout", "does not apply to `train.stage = \"sft\"` (its rows have no rejected side); remove it".into());
        }
        if t.matmul != odpo_kernels::MatmulRoutine::AUTO && t.dtype == Precision::F32 {
            return err(
                "train.matmul",
                format!("= \"{}\" chooses the routine of bf16 / f16 products, and `train.dtype` is \"f32\" (f32 products keep their own); set `train.dtype` to \"bf16\" or \"f16\", or remove it", t.matmul),
            );
        }
        if t.max_steps == Some(0) {
            return err("train.max_steps", "is 0; expected at least 1 (or leave it out to use `train.epochs`)".into());
        }
        if !(t.epochs.is_finite() && t.epochs > 0.0) {
            return err("train.epochs", format!("is {}; expected a finite number > 0", t.epochs));
        }
        if t.log_every == 0 {
            return err("train.log_every", "is 0; expected at least 1".into());
        }
        if t.keep_checkpoints == 0 {
            return err("train.keep_checkpoints", "is 0; expected at least 1 (the last good checkpoint is what a failed run keeps)".into());
        }
        let d = TrainConfig::default();
        if !t.sync_ref_model {
            for (key, changed) in [("train.ref_model_mixup_alpha", t.ref_model_mixup_alpha != d.ref_model_mixup_alpha), ("train.ref_model_sync_steps", t.ref_model_sync_steps != d.ref_model_sync_steps)] {
                if changed {
                    return err(key, "does nothing without `train.sync_ref_model = true` (TR-DPO); set that, or remove it".into());
                }
            }
        }
        if !(t.ref_model_mixup_alpha > 0.0 && t.ref_model_mixup_alpha <= 1.0) {
            return err("train.ref_model_mixup_alpha", format!("is {}; expected a number in (0, 1] (1 copies the policy into the reference)", t.ref_model_mixup_alpha));
        }
        if t.ref_model_sync_steps == 0 {
            return err("train.ref_model_sync_steps", "is 0; expected at least 1 step between updates of the reference".into());
        }
        Ok(())
    }
}

impl EvalConfig {
    /// Checks `[eval]` on its own.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(TrainError::config("eval.batch_size", "is 0; expected at least 1"));
        }
        if let Some(es) = &self.early_stopping {
            if es.patience == 0 {
                return Err(TrainError::config("eval.early_stopping.patience", "is 0; expected at least 1 evaluation"));
            }
            if !(es.min_delta.is_finite() && es.min_delta >= 0.0) {
                return Err(TrainError::config("eval.early_stopping.min_delta", format!("is {}; expected a finite number >= 0", es.min_delta)));
            }
            if es.metric.is_empty() {
                return Err(TrainError::config("eval.early_stopping.metric", "is empty; expected an eval metric such as \"loss\""));
            }
            if self.every == 0 {
                return Err(TrainError::config("eval.early_stopping", "needs evaluations during training; `eval.every` is 0"));
            }
        }
        Ok(())
    }
}

/// The optimizer's name as configs spell it (`optim.optimizer`).
pub(crate) fn optimizer_name(k: OptimizerKind) -> &'static str {
    match k {
        OptimizerKind::Adamw => "adamw",
        OptimizerKind::Rmsprop => "rmsprop",
    }
}

/// Every config's loader (run, pipeline, sweep and experiment configs): parses TOML `text` (named
/// `origin` in errors) into `T`, then applies each `--set key=value` override to the tree, checking
/// each on its own so that an error names it. Unknown keys and wrong types are serde's errors, which
/// name the key; a file's own errors carry its line numbers.
pub fn load_toml<T: serde::de::DeserializeOwned>(text: &str, origin: &str, sets: &[String]) -> Result<T> {
    let parse_err = |origin: &str, e: toml::de::Error| TrainError::ConfigParse { origin: origin.to_string(), message: e.to_string().trim_end().to_string() };
    let mut value: T = toml::from_str(text).map_err(|e| parse_err(origin, e))?;
    if !sets.is_empty() {
        let mut tree: toml::Table = toml::from_str(text).map_err(|e| parse_err(origin, e))?;
        for set in sets {
            apply_set(&mut tree, set)?;
            value = tree.clone().try_into().map_err(|e| parse_err(&format!("--set {set}"), e))?;
        }
    }
    Ok(value)
}

/// [`load_toml`] from a file.
pub fn load_toml_file<T: serde::de::DeserializeOwned>(path: &Path, sets: &[String]) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    load_toml(&text, &path.display().to_string(), sets)
}

/// Applies one `a.b.c=value` to the tree. The value is parsed as a TOML value (`0.5`, `true`, `"x"`,
/// `[0.9, 0.95]`, `{ alpha = 1 }`); anything that does not parse is taken as a string, so
/// `--set output.dir=runs/x` works unquoted. Intermediate tables are created; an unknown key is
/// reported when the tree is deserialised.
pub fn apply_set(tree: &mut toml::Table, set: &str) -> Result<()> {
    let bad = |m: &str| TrainError::ConfigParse { origin: format!("--set {set}"), message: m.to_string() };
    let (key, value) = set.split_once('=').ok_or_else(|| bad("expected `key=value`, e.g. `optim.lr=1e-6`"))?;
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(bad("the key is empty or has an empty part"));
    }
    let value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(value.to_string())),
        Err(_) => toml::Value::String(value.to_string()),
    };
    let mut table = tree;
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            table.insert(part.to_string(), value);
            return Ok(());
        }
        let entry = table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(bad(&format!("`{}` is not a table", parts[..=i].join(".")))),
        };
    }
    Ok(())
}

/// Data parallelism's rule on the batch: each of `replicas` devices must get whole micro-batches of
/// a step.
pub fn check_batch_split(batch_size: usize, micro_batch_size: usize, replicas: usize) -> Result<()> {
    if replicas > 1 && !batch_size.is_multiple_of(replicas * micro_batch_size) {
        return Err(TrainError::config(
            "train.batch_size",
            format!(
                "({batch_size}) must be a multiple of {replicas} devices × `train.micro_batch_size` ({micro_batch_size}) = {}, so that every device gets whole micro-batches",
                replicas * micro_batch_size
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[model]
path = "models/tiny"
[data]
path = "data/pairs.jsonl"
format = "jsonl"
[loss]
beta = 0.1
"#;

    fn parse(text: &str, sets: &[&str]) -> Result<RunConfig> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        RunConfig::from_toml_str(text, "run.toml", &sets).map(Checked::into_inner)
    }

    #[test]
    fn defaults_and_round_trip() -> Result<()> {
        let cfg = parse(BASE, &[])?;
        assert_eq!(cfg.optim.optimizer, OptimizerKind::Rmsprop);
        assert_eq!(cfg.train.batch_size, 32);
        let again = parse(&cfg.to_toml()?, &[])?;
        assert_eq!(again, cfg);
        Ok(())
    }

    #[test]
    fn set_overrides_and_parses_values() -> Result<()> {
        let cfg = parse(BASE, &["optim.lr=1e-6", "train.max_steps=7", "output.dir=runs/x", "loss.beta=0.7", "optim.optimizer=adamw", "optim.betas=[0.9, 0.95]"])?;
        assert_eq!(cfg.optim.lr, 1e-6);
        assert_eq!(cfg.train.max_steps, Some(7));
        assert_eq!(cfg.output.dir, PathBuf::from("runs/x"));
        assert_eq!(cfg.loss().beta, 0.7);
        assert_eq!(cfg.optim.betas, Some([0.9, 0.95]));
        Ok(())
    }

    #[test]
    fn the_row_layout_follows_the_backend_unless_set() -> Result<()> {
        use odpo_data::Layout::{Concatenated, SharedPrompt};
        let auto = parse(BASE, &[])?.train.layout;
        assert_eq!(auto, RowLayout::Auto);
        let on = |b: &str| auto.resolve(b.parse().unwrap_or(Backend::Flex));
        assert_eq!([on("flex"), on("tch")], [SharedPrompt, SharedPrompt]);
        assert_eq!([on("cuda"), on("tch-cuda"), on("vulkan"), on("wgpu"), on("metal")], [Concatenated; 5]);
        let set = parse(BASE, &["train.layout=concatenated"])?.train.layout;
        assert_eq!(set.resolve(Backend::Flex), Concatenated);
        let set = parse(BASE, &["train.layout=\"shared-prompt\""])?.train.layout;
        assert_eq!(set.resolve(Backend::Cuda), SharedPrompt);
        // The names `odpo bench --layout` parses are the config's.
        for layout in [RowLayout::Auto, RowLayout::SharedPrompt, RowLayout::Concatenated] {
            let name = serde_json::to_value(layout).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
            assert_eq!(name.parse::<RowLayout>()?, layout);
        }
        Ok(())
    }

    #[test]
    fn tr_dpo_settings_are_checked_and_named() -> Result<()> {
        let cfg = parse(BASE, &["train.sync_ref_model=true", "train.ref_model_mixup_alpha=1.0", "train.ref_model_sync_steps=8"])?;
        assert!(cfg.train.sync_ref_model && cfg.train.ref_model_mixup_alpha == 1.0 && cfg.train.ref_model_sync_steps == 8);
        let msg = |sets: &[&str]| parse(BASE, sets).map(|_| ()).map_err(|e| e.to_string()).err().unwrap_or_default();
        for (sets, key, says) in [
            (&["train.ref_model_mixup_alpha=0.5"][..], "train.ref_model_mixup_alpha", "does nothing without `train.sync_ref_model = true`"),
            (&["train.ref_model_sync_steps=10"][..], "train.ref_model_sync_steps", "does nothing without"),
            (&["train.sync_ref_model=true", "train.ref_model_mixup_alpha=0.0"][..], "train.ref_model_mixup_alpha", "expected a number in (0, 1]"),
            (&["train.sync_ref_model=true", "train.ref_model_mixup_alpha=1.5"][..], "train.ref_model_mixup_alpha", "expected a number in (0, 1]"),
            (&["train.sync_ref_model=true", "train.ref_model_sync_steps=0"][..], "train.ref_model_sync_steps", "at least 1"),
            (&["train.sync_ref_model=true", "train.reference=\"cached\""][..], "train.sync_ref_model", "computes the reference's log-probs once"),
            (&["train.sync_ref_model=true", "lora.rank=4"][..], "train.sync_ref_model", "under `[lora]`"),
            (&["train.sync_ref_model=true", "model.reference=\"other\""][..], "train.sync_ref_model", "names another model"),
            (&["train.sync_ref_model=true", "loss.loss_type=\"simpo\""][..], "train.sync_ref_model", "reference-free"),
        ] {
            let m = msg(sets);
            assert!(m.contains(&format!("`{key}`")) && m.contains(says), "{sets:?}: {m}");
        }
        Ok(())
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = parse(BASE, &["optim.lrr=1e-6"]).map(|_| ()).map_err(|e| e.to_string()).err().unwrap_or_default();
        assert!(e.starts_with("--set optim.lrr=1e-6: "), "{e}");
        assert!(e.contains("unknown field `lrr`"), "{e}");
        let e = parse(&format!("{BASE}[train]\nbatchsize = 4\n"), &[]).map(|_| ()).map_err(|e| e.to_string()).err().unwrap_or_default();
        assert!(e.starts_with("run.toml: "), "{e}");
        assert!(e.contains("unknown field `batchsize`"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_expected_type() {
        let e = parse(BASE, &["train.batch_size=\"many\""]).map(|_| ()).map_err(|e| e.to_string()).err().unwrap_or_default();
        assert!(e.contains("batch_size") && e.contains("expected"), "{e}");
        let e = parse(BASE, &["optim.schedule=exponential"]).map(|_| ()).map_err(|e| e.to_string()).err().unwrap_or_default();
        assert!(e.contains("unknown variant `exponential`") && e.contains("cosine"), "{e}");
        let e = parse(BASE, &["loss.loss_type=dpp"]).map(|_| ()).map_err(|e| e.to_string()).err().unwrap_or_default();
        assert!(e.starts_with("--set loss.loss_type=dpp: unknown variant `dpp`, expected one of `dpo`, `sigmoid`"), "{e}");
    }

    #[test]
    fn options_that_do_nothing_are_refused() -> Result<()> {
        let cases = [
            (vec!["optim.betas=[0.9, 0.99]"], "config: `optim.betas` does not apply to `optim.optimizer = \"rmsprop\"`; remove it"),
            (vec!["optim.optimizer=adamw", "optim.momentum=0.9"], "config: `optim.momentum` does not apply to `optim.optimizer = \"adamw\"`; remove it"),
            (vec!["optim.min_lr_ratio=0.1"], "config: `optim.min_lr_ratio` does not apply to `optim.schedule = \"constant\"`; remove it"),
            (vec!["train.batch_size=6", "train.micro_batch_size=4"], "config: `train.batch_size` (6) must be a multiple of `train.micro_batch_size` (4)"),
            (
                vec!["train.backend=cuda", "train.batch_size=8", "train.micro_batch_size=4", r#"train.devices=["cuda:0","cuda:1","cuda:2"]"#],
                "config: `train.batch_size` (8) must be a multiple of 3 devices × `train.micro_batch_size` (4) = 12, so that every device gets whole micro-batches",
            ),
            (
                vec![r#"train.devices=["cuda:0","cuda:1"]"#],
                "config: `train.devices` entry `cuda:0` is not a device of `train.backend = \"flex\"`; every device must be of the run's backend",
            ),
            (vec!["train.dtype=f64"], "--set train.dtype=f64: unknown variant `f64`, expected one of `f32`, `f16`, `bf16`\nin `train.dtype`"),
            (
                vec!["train.stage=sft", "train.layout=concatenated"],
                "config: `train.layout` does not apply to `train.stage = \"sft\"` (its rows have no rejected side); remove it",
            ),
            // Of the loss table, SFT takes the load-balancing loss's weight alone.
            (
                vec!["train.stage=sft", "loss.router_aux_loss_coef=0.01", "loss.beta=0.5"],
                "config: `loss` does not apply to `train.stage = \"sft\"` (the SFT loss is the chosen responses' NLL), but for `loss.router_aux_loss_coef`; remove the rest of the table",
            ),
            (
                vec![r#"train.matmul="double_cyclic_mma""#],
                "config: `train.matmul` = \"double_cyclic_mma\" chooses the routine of bf16 / f16 products, and `train.dtype` is \"f32\" (f32 products keep their own); set `train.dtype` to \"bf16\" or \"f16\", or remove it",
            ),
            (
                vec!["train.layout=packed"],
                "--set train.layout=packed: unknown variant `packed`, expected one of `auto`, `shared-prompt`, `concatenated`\nin `train.layout`",
            ),
            // The loss table's own checks name their keys as `--set` spells them.
            (vec!["loss.beta=0"], "config: `loss.beta` = 0: must be finite and > 0"),
            (
                vec!["loss.label_smoothing=0.1"],
                "config: `loss.label_smoothing` = 0.1 does nothing with `loss.loss_type` = [sigmoid]: it is read only by cdpo, robust, exo-pair, aot, aot-unpaired (for cDPO use `loss_type = \"cdpo\"`)",
            ),
            (vec!["loss.loss_weights=[1.0, 0.5]"], "config: `loss.loss_weights` has 2 entries but `loss.loss_type` has 1; give one weight per loss"),
            (vec![r#"output.dir="""#], "config: `output.dir` is empty; expected a folder (it is created if missing)"),
            (vec![r#"output.cache_dir="""#], "config: `output.cache_dir` is empty; expected a folder (it is created if missing)"),
        ];
        for (sets, msg) in cases {
            let e = parse(BASE, &sets).map(|_| ()).map_err(|e| e.to_string()).err().unwrap_or_default();
            assert_eq!(e, msg);
        }
        let sft = BASE.replace("[loss]\nbeta = 0.1\n", "[train]\nstage = \"sft\"\n");
        assert!(parse(&sft, &[]).is_ok());
        let e = parse(&format!("{sft}[loss]\nbeta = 0.5\n"), &[]).map(|_| ()).map_err(|e| e.to_string()).err().unwrap_or_default();
        assert!(e.starts_with("config: `loss` does not apply"), "{e}");
        // But for the load-balancing loss's weight, checked as the preference stage checks it.
        assert_eq!(parse(&sft, &["loss.router_aux_loss_coef=0.01"])?.loss.and_then(|l| l.router_aux_loss_coef), Some(0.01));
        let e = parse(&sft, &["loss.router_aux_loss_coef=-1"]).map(|_| ()).map_err(|e| e.to_string()).err().unwrap_or_default();
        assert_eq!(e, "config: `loss.router_aux_loss_coef` = -1: must be finite and >= 0 (0 turns the load-balancing loss off)");
        Ok(())
    }

    #[test]
    fn a_matmul_routine_is_kept_by_name() -> Result<()> {
        // A routine by name, kept in the run folder's config; an unknown one lists the names.
        let cfg = parse(BASE, &[r#"train.dtype="bf16""#, r#"train.matmul="matmul_double_cyclic_mma""#])?;
        assert_eq!(cfg.train.matmul.name(), "double_cyclic_mma");
        let saved = cfg.to_toml()?;
        assert!(saved.contains("matmul = \"double_cyclic_mma\""), "{saved}");
        assert_eq!(parse(&saved, &[])?.train.matmul, cfg.train.matmul);
        assert_eq!(parse(BASE, &[])?.train.matmul, odpo_kernels::MatmulRoutine::AUTO);
        let e = parse(BASE, &[r#"train.dtype="bf16""#, r#"train.matmul="fastest""#]).map(|_| ()).map_err(|e| e.to_string()).err().unwrap_or_default();
        assert!(e.contains("unknown matmul routine `fastest`; expected one of: auto, simple_cyclic_mma") && e.contains("in `train.matmul`"), "{e}");
        Ok(())
    }
}
