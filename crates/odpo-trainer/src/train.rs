//! `train`: the whole run, top to bottom, like nanoGPT's train.py. Set up the run folder, the policy
//! and its frozen reference (or the cached reference log-probs), the optimizer and `lr_at(step)`;
//! resume if asked; then loop: micro-batches (forward, loss, backward, accumulate), global-norm clip,
//! step, log, evaluate, checkpoint. At the end: a last checkpoint, evaluation and the HF export.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::tensor::Device;
use indicatif::{ProgressBar, ProgressStyle};
use odpo_data::TokenizedPair;
use odpo_loss::Metrics;
use odpo_model::tokenizer::Tokenizer;
use odpo_model::{CausalLm, ModelConfig, Precision};

use crate::checkpoint::{self, TrainState};
use crate::config::{Checked, ModelSection, ReferenceMode, RunConfig, Stage};
use crate::host_memory::Pass;
use crate::data::{self, RunData};
use crate::error::{Result, TrainError};
use crate::early_stop;
use crate::eval;
use crate::forward::{self, Reference};
use crate::step::{DataParallel, MetricSums, StepSettings, StepStats, Trainer};
use crate::metrics::{MetricsWriter, Row};
use crate::refcache::{self, RefCache};
use crate::schedule::Schedule;

/// What a finished run reports.
#[derive(Clone, Debug, Default)]
pub struct RunSummary {
    /// The run folder.
    pub run_dir: PathBuf,
    /// Optimizer steps done in all (including those before a resume).
    pub steps: usize,
    /// The step the run resumed from, if it did.
    pub resumed_from: Option<usize>,
    /// The first and the last logged training loss (SFT: token-mean NLL).
    pub train_loss: Option<(f64, f64)>,
    /// Eval metrics before training (when `eval.at_start` and the run did not resume).
    pub eval_start: Option<BTreeMap<String, f64>>,
    /// Eval metrics at the end.
    pub eval_end: Option<BTreeMap<String, f64>>,
    /// Where the trained model was exported.
    pub exported: Option<PathBuf>,
    /// The run ended before its last step (`eval.early_stopping`).
    pub stopped_early: bool,
    /// The step of the model the run ended with when that is not its last (`restore_best`);
    /// `eval_end` is then that step's evaluation.
    pub best_step: Option<usize>,
    /// The rows of the run's preference micro-batches: `train.layout` resolved for the backend.
    pub layout: odpo_data::Layout,
}

/// Runs `cfg` on `device` (without autodiff; the trainer adds it): reads the model's tokenizer and the
/// data, then [`train_on`]. With `resume`, continues from the newest checkpoint in `output.dir`.
pub fn train(cfg: &Checked<RunConfig>, device: &Device, resume: bool) -> Result<RunSummary> {
    let data = load_data(cfg)?;
    train_on(cfg, data, device, resume, Some(&tokenizer_path(&cfg.model)))
}

/// [`train`] on data already tokenized (tests build pairs from token ids). `tokenizer`: the model folder, tokenizer
/// file or GGUF file whose tokenizer is exported with the model ([`export`]).
pub fn train_on(cfg: &Checked<RunConfig>, data: RunData, device: &Device, resume: bool, tokenizer: Option<&Path>) -> Result<RunSummary> {
    train_on_devices(cfg, data, std::slice::from_ref(device), resume, tokenizer)
}

/// Reads the run's tokenizer and data, as [`train`] does.
pub fn load_data(cfg: &RunConfig) -> Result<RunData> {
    let tokenizer = Tokenizer::open(&tokenizer_path(&cfg.model))?;
    match (cfg.train.stage, cfg.train.sft_on) {
        (Stage::Sft, crate::config::SftOn::Responses) => RunData::load_responses(&cfg.data, &tokenizer),
        _ => RunData::load(&cfg.data, &tokenizer),
    }
}

/// [`train_on`] data-parallel over `devices` (one backend; the first holds the model, the optimizer
/// and the evaluation): each step is [`Trainer::step`] over [`DataParallel`] replicas, equal to the
/// single-device step up to the order of floating-point additions.
pub fn train_on_devices(cfg: &Checked<RunConfig>, data: RunData, devices: &[Device], resume: bool, tokenizer: Option<&Path>) -> Result<RunSummary> {
    let routine = cfg.train.matmul;
    if routine == odpo_kernels::MatmulRoutine::AUTO {
        return run_on_devices(cfg, data, devices, resume, tokenizer);
    }
    if let Some(d) = devices.iter().find(|d| !odpo_kernels::launches_kernels(d)) {
        return Err(TrainError::config(
            "train.matmul",
            format!("= \"{routine}\" chooses a routine of the cubecl backends (cuda, vulkan, wgpu, metal); the device {d:?} has none; remove it"),
        ));
    }
    // The step's replica threads take the routine in force where they start.
    odpo_kernels::with_matmul_routine(routine, || run_on_devices(cfg, data, devices, resume, tokenizer))
}

/// [`train_on_devices`] under the matmul routine in force.
fn run_on_devices(cfg: &Checked<RunConfig>, data: RunData, devices: &[Device], resume: bool, tokenizer: Option<&Path>) -> Result<RunSummary> {
    let (t, run_dir) = (&cfg.train, cfg.output.dir.clone());
    let Some(device) = devices.first() else {
        return Err(TrainError::config("train.devices", "is empty; expected at least one device"));
    };
    // The config checked its own `train.devices`; the devices given here may be others.
    crate::config::check_batch_split(t.batch_size, t.micro_batch_size, devices.len())?;
    let ad = crate::step::autodiff(device, t.gradient_checkpointing);
    let precision = compute_precision(t.dtype, devices)?;
    if data.train.is_empty() {
        return Err(TrainError::config("data.path", "gives no training pairs after pairing, splitting and tokenizing"));
    }
    if t.batch_size > data.train.len() {
        // Allowed (an online round may pair fewer prompts than a batch), but a step then holds
        // pairs more than once, and a batch far beyond the data costs its full size in memory.
        tracing::warn!(
            "`train.batch_size` ({}) is more than the {} training pairs: each step takes pairs more than once",
            t.batch_size,
            data.train.len()
        );
    }
    std::fs::create_dir_all(&run_dir).map_err(|e| TrainError::io(&run_dir, e))?;
    // Held until the run returns; a second run on this folder is refused.
    let _lock = crate::lock::acquire(&run_dir)?;
    if !resume && !checkpoint::list(&run_dir)?.is_empty() {
        return Err(TrainError::config("output.dir", format!("`{}` already holds the checkpoints of a run; resume that run or choose another folder", run_dir.display())));
    }
    let config_toml = cfg.to_toml()?;
    odpo_model::weights::write_atomic(&run_dir.join("config.toml"), config_toml.as_bytes())?;

    // The policy, and its starting point as the reference: frozen, or run once into a cache.
    // With LoRA the weights are frozen and only fresh adapters train; the reference is the same
    // weights with the adapters removed (shared tensors, not a copy).
    let quantized_base = cfg.lora.as_ref().is_some_and(|l| l.quantized_base);
    let (model_cfg, mut policy) = load_base(&cfg.model, t.seed, &ad, quantized_base)?;
    let router_aux_loss_coef = crate::step::router_aux_loss_coef(&cfg.loss(), &model_cfg)?;
    if router_aux_loss_coef > 0.0 {
        tracing::info!(coef = router_aux_loss_coef, "the routers' load-balancing loss is added to the loss");
    }
    check_positions(&policy, &data, cfg.data.max_length, "")?;
    if let Some(lora) = &cfg.lora {
        policy = policy.with_lora(lora, &ad)?;
        tracing::info!(rank = lora.rank, alpha = lora.alpha, trainable = crate::host_memory::trainable_params(&policy), "LoRA adapters attached");
    }
    // On a CPU backend a state that cannot fit would end the process at its first steps.
    let frozen_reference = cfg.needs_reference() && t.reference == ReferenceMode::Frozen && cfg.model.reference.is_none();
    let total_steps = t.max_steps.unwrap_or_else(|| ((t.epochs * data.train.len() as f64) / t.batch_size as f64).ceil().max(1.0) as usize);
    let more_than_one_step = total_steps > 1 || resume;
    let preference = t.stage == Stage::Preference;
    let held_out = data.eval.len().min(cfg.eval.max_pairs.unwrap_or(usize::MAX));
    let kept = crate::host_memory::TrainingState {
        optim: &cfg.optim,
        frozen_reference,
        lora: cfg.lora.is_some(),
        precision,
        more_than_one_step,
        train: Pass::of(&data.train, t.micro_batch_size, data::distinct_in_run(t.micro_batch_size, data.train.len()), preference),
        eval: Pass::widest_batch(&data.eval[..held_out], cfg.eval.batch_size, preference),
        kept_per_token: model_cfg.backward_kept_per_token(t.gradient_checkpointing, cfg.lora.is_some()),
        names: crate::host_memory::RUN_KEYS,
    };
    crate::host_memory::check(&policy, &kept, device)?;
    // The reference computes in the run's precision, so that its log-probs and the policy's agree
    // at the start whatever the dtype.
    // `model.reference` names another model instead.
    let reference_model = || -> Result<CausalLm> {
        let Some(path) = &cfg.model.reference else { return Ok(policy.without_adapters().valid().with_precision(precision)) };
        let loaded = CausalLm::load(path, device)?;
        check_positions(&loaded.model, &data, cfg.data.max_length, " (`model.reference`)")?;
        if loaded.config.vocab_size() != model_cfg.vocab_size() {
            return Err(TrainError::config("model.reference", format!("`{}` has a vocabulary of {}; the policy's is {}", path.display(), loaded.config.vocab_size(), model_cfg.vocab_size())));
        }
        Ok(loaded.model.with_precision(precision))
    };
    let reference = match (cfg.needs_reference(), t.reference) {
        (false, _) => Reference::None,
        (true, ReferenceMode::Frozen) => Reference::Frozen(Box::new(reference_model()?)),
        (true, ReferenceMode::Cached) => Reference::Cached(reference_cache(cfg, &reference_model()?, &data, device)?),
    };
    let mut replicas = DataParallel::new(devices, &reference, t.gradient_checkpointing);

    let schedule = Schedule::new(&cfg.optim, total_steps);
    let mut optim = crate::optim::build(&cfg.optim);
    let mut state = TrainState { step: 0, pairs_seen: 0, tokens_seen: 0, seed: t.seed, total_steps, early_stop: Default::default() };
    let layout = t.layout.resolve(t.backend);
    let mut summary = RunSummary { run_dir: run_dir.clone(), layout, ..RunSummary::default() };
    // Whether the checkpoint resumed from was written under this very config.
    let mut same_config = false;
    if resume && let Some(ckpt) = checkpoint::latest_intact(&run_dir)? {
        checkpoint::check_resumable(&ckpt, cfg)?;
        // TR-DPO's reference has moved since the start: the checkpoint keeps it.
        if t.sync_ref_model {
            match checkpoint::load_reference(&ckpt, reference_model()?)? {
                Some(moved) => replicas = DataParallel::new(devices, &Reference::Frozen(Box::new(moved)), t.gradient_checkpointing),
                None => tracing::warn!("{} holds no reference (written without `train.sync_ref_model`): the reference restarts from the starting model", ckpt.display()),
            }
        } else if checkpoint::keeps_reference(&ckpt) && cfg.needs_reference() {
            tracing::warn!("{} keeps a TR-DPO reference, and `train.sync_ref_model` is off here: the run goes on against the starting model as its reference", ckpt.display());
        }
        (policy, optim, state) = checkpoint::load(&ckpt, policy, optim)?;
        tracing::info!(step = state.step, "resumed from {}", ckpt.display());
        summary.resumed_from = Some(state.step);
        same_config = std::fs::read_to_string(ckpt.join("config.toml")).is_ok_and(|saved| saved == config_toml);
    }
    tracing::info!(?layout, setting = ?t.layout, backend = t.backend.name(), "rows of each micro-batch (`train.layout`)");
    let settings = StepSettings {
        stage: t.stage,
        micro_batch_size: t.micro_batch_size,
        batcher: data.batcher(layout, cfg.loss().ld_alpha),
        loss: cfg.loss(),
        use_offsets: cfg.data.offset.is_some(),
        precision,
        max_grad_norm: cfg.optim.max_grad_norm,
        seed: t.seed,
        router_aux_loss_coef,
    };
    let mut trainer = Trainer::new(policy, optim, replicas, settings);
    let sync = t.sync_ref_model;

    let mut metrics = MetricsWriter::open_with(&run_dir, metric_columns(t.stage, cfg.loss().use_weighting, router_aux_loss_coef > 0.0), summary.resumed_from, &cfg.output.report_to)?;
    let dashboard = cfg.output.dashboard && metrics.open_dashboard(&run_dir, total_steps, state.step)?;
    let eval_pairs: Vec<TokenizedPair> = data.eval.iter().take(cfg.eval.max_pairs.unwrap_or(usize::MAX)).cloned().collect();
    let evaluate = |trainer: &Trainer, at: usize| -> Result<BTreeMap<String, f64>> {
        let (model, s) = (trainer.policy().valid().with_precision(precision), &trainer.settings);
        let during = || format!("the evaluation at step {at}");
        let advice = || format!("to fit, lower `eval.batch_size` (now {})", cfg.eval.batch_size);
        let pairs_done = if dashboard { ProgressBar::hidden() } else { counting_bar(cfg, eval_pairs.len(), 0, "held-out pairs evaluated") };
        let progress = |n: usize| pairs_done.inc(n as u64);
        let values = crate::step::guarded(during, advice, || match t.stage {
            Stage::Preference => eval::preference(&model, trainer.replicas.reference(), &eval_pairs, &s.loss, s.use_offsets, s.router_aux_loss_coef > 0.0, cfg.eval.batch_size, &s.batcher, device, &progress),
            Stage::Sft => eval::sft(&model, &eval_pairs, s.router_aux_loss_coef > 0.0, cfg.eval.batch_size, &s.batcher, device, &progress),
        })
        .map_err(|e| e.in_run(&run_dir));
        pairs_done.finish_and_clear();
        values
    };
    let early = cfg.eval.early_stopping.as_ref();
    if early.is_some() && eval_pairs.is_empty() {
        return Err(TrainError::config("eval.early_stopping", "needs held-out pairs; the eval split is empty (`data.eval_fraction` or `data.eval_path`)"));
    }
    // Early stopping's verdict on an evaluation at `state.step`: a new best is checkpointed into
    // `<run>/best` (with `restore_best`) before anything else happens.
    let judge = |trainer: &Trainer, state: &mut TrainState, values: &BTreeMap<String, f64>| -> Result<bool> {
        let Some(es) = early else { return Ok(false) };
        let verdict = state.early_stop.observe(es, state.step, values)?;
        if verdict.improved && es.restore_best {
            checkpoint::save(&early_stop::best_dir(&run_dir), trainer.policy(), &trainer.optim, None, state, &config_toml, 1)?;
        }
        Ok(verdict.stop)
    };
    if cfg.eval.at_start && state.step == 0 && !eval_pairs.is_empty() {
        let values = evaluate(&trainer, 0)?;
        tracing::info!(?values, "eval before training");
        metrics.write(&Row { step: 0, split: "eval", values: values.clone() })?;
        judge(&trainer, &mut state, &values)?;
        summary.eval_start = Some(values);
    }

    let bar = if dashboard { ProgressBar::hidden() } else { counting_bar(cfg, total_steps, state.step, "steps") };
    let mut window = Window::default();
    let mut stalled = Stalled::default();
    // A finished run resumed as it was (a pipeline's finished stage) has its last checkpoint, and
    // its last evaluation in its metrics; under changed settings that evaluation is run again.
    let finished = summary.resumed_from.is_some() && (state.step >= total_steps || state.early_stop.stopped);
    // The evaluation of the step the loop ends at, when it already ran: an early stop here, or
    // the metrics' row of a finished run resumed.
    let mut last_eval = if finished && same_config { crate::metrics::eval_row(&run_dir, state.step)? } else { None };
    while state.step < total_steps && !state.early_stop.stopped {
        let step = state.step;
        let lr = schedule.lr_at(step);
        let idx = data::stream_slice(data.train.len(), t.seed, state.pairs_seen, t.batch_size);
        let pairs: Vec<&TokenizedPair> = idx.iter().map(|&i| &data.train[i]).collect();
        let stats;
        (trainer, stats) = trainer.step(&pairs, step, lr).map_err(|e| e.in_run(&run_dir))?;
        state = TrainState { step: step + 1, pairs_seen: state.pairs_seen + stats.pairs, tokens_seen: state.tokens_seen + stats.tokens as u64, ..state };
        // TR-DPO, after the step as TRL's callback: the reference moves toward the policy.
        if t.sync_ref_model && state.step.is_multiple_of(t.ref_model_sync_steps) {
            trainer.sync_reference(t.ref_model_mixup_alpha).map_err(|e| e.in_run(&run_dir))?;
            tracing::debug!(step = state.step, alpha = t.ref_model_mixup_alpha, "reference moved toward the policy (TR-DPO)");
        }
        window.add(&stats);
        stalled.check(&stats, state.step, t)?;
        bar.set_position(state.step as u64);

        if state.step.is_multiple_of(t.log_every) || state.step == total_steps {
            let mut values = window.values(lr, stats.grad_norm);
            values.insert("epoch".into(), state.pairs_seen as f64 / data.train.len() as f64);
            let loss = values.get(if t.stage == Stage::Sft { "nll" } else { "loss" }).copied().unwrap_or(f64::NAN);
            summary.train_loss = Some((summary.train_loss.map_or(loss, |(first, _)| first), loss));
            bar.set_message(format!("loss {loss:.4}"));
            tracing::info!(step = state.step, loss, lr, grad_norm = stats.grad_norm, "train");
            metrics.write(&Row { step: state.step, split: "train", values })?;
            window = Window::default();
        }
        if cfg.eval.every > 0 && state.step.is_multiple_of(cfg.eval.every) && state.step < total_steps && !eval_pairs.is_empty() {
            // The steps' bar makes way for the evaluation's own.
            let values = bar.suspend(|| evaluate(&trainer, state.step))?;
            tracing::info!(step = state.step, ?values, "eval");
            metrics.write(&Row { step: state.step, split: "eval", values: values.clone() })?;
            if judge(&trainer, &mut state, &values)? {
                if let (Some(es), Some((best_step, best))) = (early, state.early_stop.best) {
                    tracing::info!(step = state.step, best_step, best, "early stop: eval `{}` has not improved for {} evaluations", es.metric, es.patience);
                }
                last_eval = Some(values);
                break;
            }
        }
        let mut saved = None;
        if t.checkpoint_every > 0 && state.step.is_multiple_of(t.checkpoint_every) && state.step < total_steps {
            let dir = checkpoint::save(&run_dir, trainer.policy(), &trainer.optim, synced_reference(&trainer, sync), &state, &config_toml, t.keep_checkpoints)?;
            tracing::debug!("checkpoint {}", dir.display());
            saved = Some(dir);
        }
        // A stop asked for (SIGTERM, SIGINT, the dashboard's `q`): this step is done; keep it and leave.
        if (crate::interrupt::requested() || metrics.stop_requested()) && state.step < total_steps {
            bar.finish_and_clear();
            let checkpoint = match saved {
                Some(dir) => dir,
                None => checkpoint::save(&run_dir, trainer.policy(), &trainer.optim, synced_reference(&trainer, sync), &state, &config_toml, t.keep_checkpoints)?,
            };
            tracing::warn!(step = state.step, "stopped on request; checkpoint {}", checkpoint.display());
            return Err(TrainError::Interrupted { step: state.step, checkpoint, run_dir });
        }
    }
    bar.finish_and_clear();

    if !finished {
        checkpoint::save(&run_dir, trainer.policy(), &trainer.optim, synced_reference(&trainer, sync), &state, &config_toml, t.keep_checkpoints)?;
    }
    summary.steps = state.step;
    if !eval_pairs.is_empty() {
        let values = match last_eval {
            Some(values) => values,
            None => {
                let values = evaluate(&trainer, state.step)?;
                tracing::info!(step = state.step, ?values, "eval at the end");
                metrics.write(&Row { step: state.step, split: "eval", values: values.clone() })?;
                values
            }
        };
        // The last evaluation counts too, unless early stopping judged it already; the run ran to
        // its end, so only the best can change.
        if let Some(es) = early
            && !state.early_stop.stopped
        {
            state.early_stop.observe(es, state.step, &values)?;
            state.early_stop.stopped = false;
        }
        summary.eval_end = Some(values);
    }
    summary.stopped_early = state.early_stop.stopped;
    // End with the best evaluated model rather than the last (`eval.early_stopping.restore_best`).
    if let (Some(es), Some((best_step, _))) = (early, state.early_stop.best)
        && es.restore_best
        && best_step != state.step
    {
        let ckpt = checkpoint::dir(&early_stop::best_dir(&run_dir)).join(format!("step-{best_step:08}"));
        trainer.set_policy(checkpoint::load_model(&ckpt, trainer.policy().clone())?);
        tracing::info!(best_step, "restored the best evaluated model from {}", ckpt.display());
        summary.best_step = Some(best_step);
        summary.eval_end = Some(state.early_stop.best_values.clone());
    }
    if cfg.output.export {
        summary.exported = Some(export(trainer.policy(), &model_cfg, &run_dir.join("model"), tokenizer)?);
        if let Some(lora) = &cfg.lora {
            let dir = run_dir.join("adapter");
            trainer.policy().valid().save_peft(lora, &cfg.model.path.display().to_string(), &dir)?;
            tracing::info!("LoRA adapters saved in PEFT layout to {}", dir.display());
        }
    }
    Ok(summary)
}

/// The guard against a run that changes nothing (`train.stop_if_not_learning`).
#[derive(Default)]
struct Stalled {
    steps: usize,
    worst: f64,
}

impl Stalled {
    /// A gradient norm below this is "nothing": a real step's is orders of magnitude larger, and a
    /// gradient that cancels exactly up to rounding (chosen identical to rejected) lands far below.
    const ZERO: f64 = 1e-6;

    fn check(&mut self, stats: &StepStats, step: usize, t: &crate::config::TrainConfig) -> Result<()> {
        let means = stats.metrics.means();
        // A reward margin away from 0 means the policy tells chosen from rejected: a gradient that
        // is small there is a saturated loss (learned), not a stalled run.
        let margin = means.get("rewards/margins").copied();
        let unmoved = margin.is_none_or(|m| m.abs() < 1e-4);
        if t.stop_if_not_learning == 0 || stats.grad_norm > Self::ZERO || !unmoved {
            *self = Self::default();
            return Ok(());
        }
        (self.steps, self.worst) = (self.steps + 1, self.worst.max(stats.grad_norm));
        if self.steps >= t.stop_if_not_learning {
            let detail = match (means.get("loss"), margin) {
                (Some(l), Some(m)) => format!(", with the loss at {l:.4} and the reward margin at {m:.1e}"),
                _ => String::new(),
            };
            return Err(TrainError::NotLearning { steps: self.steps, step, grad_norm: self.worst.max(f64::MIN_POSITIVE), detail });
        }
        Ok(())
    }
}

/// The steps since the last logged one: their metric sums, pairs, tokens and time.
struct Window {
    metrics: MetricSums,
    pairs: usize,
    tokens: usize,
    start: Instant,
}

impl Default for Window {
    fn default() -> Self {
        Self { metrics: MetricSums::default(), pairs: 0, tokens: 0, start: Instant::now() }
    }
}

impl Window {
    fn add(&mut self, stats: &StepStats) {
        self.metrics.merge(&stats.metrics);
        (self.pairs, self.tokens) = (self.pairs + stats.pairs, self.tokens + stats.tokens);
    }

    /// The logged values: the metrics' means, the learning rate, the last step's gradient norm, and
    /// throughput over the window.
    fn values(&self, lr: f64, grad_norm: f64) -> BTreeMap<String, f64> {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let mut values = self.metrics.means();
        values.insert("lr".into(), lr);
        values.insert("grad_norm".into(), grad_norm);
        values.insert("tokens_per_s".into(), self.tokens as f64 / secs);
        values.insert("pairs_per_s".into(), self.pairs as f64 / secs);
        values
    }
}

/// `train.dtype`, checked against every device of the run.
fn compute_precision(precision: Precision, devices: &[Device]) -> Result<Precision> {
    if let Some(d) = devices.iter().find(|d| !d.supports_dtype(precision.dtype())) {
        let hint = if precision == Precision::Bf16 { " (or \"f16\" where the device has it)" } else { "" };
        return Err(TrainError::config("train.dtype", format!("is `{}`, which the device {d:?} cannot compute in; use \"f32\"{hint}", precision.name())));
    }
    Ok(precision)
}

/// Where the tokenizer of `model` comes from ([`Tokenizer::open`] reads it): `model.tokenizer`,
/// else the model folder, the `.gguf` file, or the folder of another model file.
pub fn tokenizer_path(model: &ModelSection) -> PathBuf {
    let gguf = model.path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    match &model.tokenizer {
        Some(path) => path.clone(),
        None if model.path.is_dir() || gguf => model.path.clone(),
        None => model.path.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf),
    }
}

/// The policy at its starting point: loaded, or random (seeded) from the config when `random_init`.
pub fn load_policy(model: &ModelSection, seed: u64, device: &Device) -> Result<(ModelConfig, CausalLm)> {
    load_base(model, seed, device, false)
}

/// [`load_policy`], with the projections block-quantised when `quantized_base`
/// (`lora.quantized_base`: a frozen base for LoRA).
pub fn load_base(model: &ModelSection, seed: u64, device: &Device, quantized_base: bool) -> Result<(ModelConfig, CausalLm)> {
    if quantized_base && !odpo_kernels::holds_quantized(device) {
        return Err(TrainError::config(
            "lora.quantized_base",
            format!("is true, but the device {device:?} cannot hold burn's quantised tensors (the flex backend can; burn-tch 0.22.1 leaves them unimplemented); use `--backend flex` or an f32 base"),
        ));
    }
    if model.random_init {
        let path = if model.path.is_dir() { model.path.join("config.json") } else { model.path.clone() };
        return Ok(CausalLm::random_from_file(&path, seed, device, quantized_base)?);
    }
    let loaded = CausalLm::load_with(&model.path, device, quantized_base)?;
    Ok((loaded.config, loaded.model))
}

/// The reference a checkpoint keeps: TR-DPO's (`train.sync_ref_model`), which has moved since the
/// start and which a resume cannot rebuild.
fn synced_reference(trainer: &Trainer, sync: bool) -> Option<&CausalLm> {
    if sync { trainer.replicas.reference_model() } else { None }
}

/// Reads the cached reference log-probs of every train and eval pair, or computes and writes them.
fn reference_cache(cfg: &RunConfig, reference: &CausalLm, data: &RunData, device: &Device) -> Result<RefCache> {
    let all: Vec<&TokenizedPair> = data.train.iter().chain(&data.eval).collect();
    let mut identity = refcache::model_identity(&cfg.model, cfg.train.seed)?;
    if cfg.train.dtype != Precision::F32 {
        identity = format!("{identity}:{}", cfg.train.dtype.name());
    }
    // LD-DPO's weights change the sums themselves.
    if let Some(a) = cfg.loss().ld_alpha {
        identity = format!("{identity}:ld_alpha={a}");
    }
    let key = refcache::cache_key(&identity, all.iter().copied());
    if let Some(cache) = RefCache::read(&cfg.output.cache_dir, &key) {
        tracing::info!("reference log-probs read from {}", RefCache::path(&cfg.output.cache_dir, &key).display());
        return Ok(cache);
    }
    // The rows an earlier run computed before it was stopped, where they are whole batches of
    // this run's: the batches after them are then the ones an unstopped run computes.
    let partial = RefCache::partial_path(&cfg.output.cache_dir, &key);
    let batch_size = cfg.eval.batch_size;
    let mut rows = RefCache::read_from(&partial, &key)
        .map(|c| c.rows)
        .filter(|r| r.len().is_multiple_of(batch_size) && r.len() < all.len() && r.iter().zip(&all).all(|(row, p)| row.0 == p.pair_id))
        .unwrap_or_default();
    if !rows.is_empty() {
        tracing::info!("reference log-probs: {} of {} pairs read from {}", rows.len(), all.len(), partial.display());
    }
    let bar = counting_bar(cfg, all.len(), rows.len(), "pairs' reference log-probs");
    let during = || "the computation of the reference log-prob cache (`train.reference = \"cached\"`)".to_string();
    let advice = || format!("to fit, lower `eval.batch_size` (now {batch_size}), the batch it is computed in");
    let mut kept_at = std::time::Instant::now();
    let batcher = data.batcher(cfg.train.layout.resolve(cfg.train.backend), cfg.loss().ld_alpha);
    let stopped = crate::step::guarded(during, advice, || {
        for chunk in all[rows.len()..].chunks(batch_size) {
            let batch = forward::preference_batch(chunk, &batcher, device);
            let lp = forward::reference_row_logps(reference, &batch)?;
            let b = chunk.len();
            rows.extend(chunk.iter().enumerate().map(|(i, p)| (p.pair_id, lp[i], lp[b + i])));
            bar.inc(b as u64);
            if crate::interrupt::requested() && rows.len() < all.len() {
                return Ok(true);
            }
            if kept_at.elapsed().as_secs() >= 60 && rows.len() < all.len() {
                RefCache::new(key.clone(), rows.clone()).write_to(&partial)?;
                kept_at = std::time::Instant::now();
            }
        }
        Ok(false)
    })
    .map_err(|e| e.in_run(&cfg.output.dir))?;
    bar.finish_and_clear();
    if stopped {
        let kept = RefCache::new(key, rows).write_to(&partial)?;
        tracing::warn!("stopped on request; the reference log-probs computed so far are in {}", kept.display());
        return Err(TrainError::Interrupted { step: 0, checkpoint: kept, run_dir: cfg.output.dir.clone() });
    }
    let cache = RefCache::new(key, rows);
    let path = cache.write(&cfg.output.cache_dir)?;
    // The whole cache is written: what the partial file held is in it.
    let _ = std::fs::remove_file(&partial);
    tracing::info!(pairs = all.len(), "reference log-probs cached in {}", path.display());
    Ok(cache)
}

/// Every row of the run's pairs fits `model`'s positions (GPT-2 and GPT-Neo learn a table of them;
/// beyond it a row would index past the table), and every token, the padding one too, its
/// vocabulary. `whose`: which model, for the message.
fn check_positions(model: &CausalLm, data: &RunData, max_length: usize, whose: &str) -> Result<()> {
    model.check_tokens([&data.pad_id], || format!("the padding token of the model{whose}'s tokenizer"))?;
    for p in data.train.iter().chain(&data.eval) {
        model.check_tokens(p.prompt.iter().chain(&p.chosen).chain(&p.rejected), || format!("pair {} (for the model{whose})", p.pair_id))?;
    }
    let Some(longest) = data.train.iter().chain(&data.eval).max_by_key(|p| p.row_len()) else { return Ok(()) };
    let (prompt, completion) = (longest.prompt.len(), longest.row_len() - longest.prompt.len());
    let what = || format!("pair {} (a prompt of {prompt} tokens and a completion of {completion})", longest.pair_id);
    model.check_positions(longest.row_len(), what).map_err(|e| {
        let limit = model.position_limit().unwrap_or(0);
        TrainError::config("data.max_length", format!("({max_length}) is more than the model{whose} holds: {e}; set `data.max_length` to {limit} or less"))
    })
}

/// Exports the model as HF safetensors + config.json, with the tokenizer files of `tokenizer` (a
/// folder, or the folder of a tokenizer or GGUF file) copied next to them; a GGUF file's own
/// tokenizer is written out when no `tokenizer.json` lies beside it.
pub fn export(policy: &CausalLm, config: &ModelConfig, out: &Path, tokenizer: Option<&Path>) -> Result<PathBuf> {
    policy.valid().save_hf(config, out)?;
    if let Some(path) = tokenizer {
        let dir = if path.is_dir() { path } else { path.parent().unwrap_or(Path::new(".")) };
        for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja"] {
            let src = dir.join(name);
            if src.is_file() {
                let bytes = std::fs::read(&src).map_err(|e| TrainError::io(&src, e))?;
                odpo_model::weights::write_atomic(&out.join(name), &bytes)?;
            }
        }
        let gguf = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        if gguf && !out.join("tokenizer.json").is_file() {
            Tokenizer::from_gguf(path)?.save(out)?;
        }
    }
    tracing::info!("model exported to {}", out.display());
    Ok(out.to_path_buf())
}

fn metric_columns(stage: Stage, wpo: bool, router_aux: bool) -> Vec<String> {
    let stage_metrics: Vec<&str> = match stage {
        Stage::Preference => Metrics::NAMES.into_iter().chain(wpo.then_some(Metrics::WPO_WEIGHT)).chain(router_aux.then_some(crate::step::ROUTER_AUX)).collect(),
        Stage::Sft => ["nll", "ppl"].into_iter().chain(router_aux.then_some(crate::step::ROUTER_AUX)).collect(),
    };
    stage_metrics.into_iter().chain(["lr", "grad_norm", "tokens_per_s", "pairs_per_s", "epoch"]).map(String::from).collect()
}

/// A bar on stderr over `total` things (`what`: the steps, the pairs of an evaluation or of the
/// reference's log-probs), from `at`, with rate and ETA; hidden under `output.progress = false`.
fn counting_bar(cfg: &RunConfig, total: usize, at: usize, what: &str) -> ProgressBar {
    if !cfg.output.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total as u64);
    if let Ok(style) = ProgressStyle::with_template(&format!("{{bar:30}} {{pos}}/{{len}} {what} [{{elapsed_precise}} < {{eta_precise}}, {{per_sec}}] {{msg}}")) {
        bar.set_style(style);
    }
    bar.set_position(at as u64);
    bar.reset_eta();
    bar
}
