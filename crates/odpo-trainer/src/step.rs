//! One optimizer step, the only one: the training loop, the benchmark and data parallelism all run
//! [`Trainer::step`]. A step takes `batch_size` pairs, runs them in micro-batches (forward, loss,
//! backward, gradients summed) on each replica's slice, sums the replicas' gradients, takes the global
//! gradient norm, and updates the policy with the clipping folded into the update.
//!
//! Every micro-batch's mean loss is scaled by its share of the whole step ([`pair_share`]), so the
//! summed gradient is the gradient of the whole batch however it is cut into micro-batches and
//! devices: the step equals the single-device, single-batch step up to the order of additions.

use std::collections::BTreeMap;
use std::time::Instant;

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Tensor};
use odpo_data::{PreferenceBatcher, TokenizedPair};
use odpo_loss::{LossConfig, Metrics, check_finite, preference_loss};
use odpo_model::logprobs::RowExtras;
use odpo_model::{CausalLm, HalfWeights, Module, Precision};
use serde::Serialize;

use crate::config::Stage;
use crate::error::{Result, TrainError};
use crate::forward::{self, Reference};
use crate::optim::{self, Optim};

/// What every step of a run does the same way.
#[derive(Clone, Debug)]
pub struct StepSettings {
    /// SFT or preference training.
    pub stage: Stage,
    /// Pairs per forward pass.
    pub micro_batch_size: usize,
    /// How pairs become batches (padding, and the layout: each prompt once, or concatenated rows).
    pub batcher: PreferenceBatcher,
    /// The objective (preference stage).
    pub loss: LossConfig,
    /// Whether the pairs' offsets enter the loss (ODPO).
    pub use_offsets: bool,
    /// Compute precision: bf16 / f16 run forward and backward on a half-precision cast of the f32
    /// weights, whose gradients arrive in that type (`CausalLm::with_compute_precision`) and are
    /// read as f32 by the optimizer.
    pub precision: Precision,
    /// Global-norm clipping (`optim.max_grad_norm`).
    pub max_grad_norm: Option<f64>,
    /// The run's seed (dropout draws are seeded per step from it).
    pub seed: u64,
    /// The weight of a mixture of experts' load-balancing loss in the preference stage's loss
    /// (`loss.router_aux_loss_coef`, or the model config's: [`router_aux_loss_coef`]); 0: none.
    pub router_aux_loss_coef: f64,
}

/// The weight of the load-balancing loss a run adds, in either stage: `loss.router_aux_loss_coef`
/// where set, else a mixture of experts' own (its config's `router_aux_loss_coef`, 0.001 where
/// absent, as TRL 1.16's `DPOTrainer` and `SFTTrainer` take it whatever `output_router_logits`
/// says), else 0. Set above 0 for a model without experts, where it would do nothing, it is refused.
pub fn router_aux_loss_coef(loss: &LossConfig, model: &odpo_model::ModelConfig) -> Result<f64> {
    match loss.router_aux_loss_coef {
        Some(c) if c > 0.0 && !model.has_experts() => {
            Err(TrainError::config("loss.router_aux_loss_coef", format!("{c}: the model has no experts, so no load-balancing loss (a mixture of experts: Mixtral, Qwen2-MoE, Qwen3-MoE)")))
        }
        Some(c) => Ok(c),
        None => Ok(model.router_aux_loss_coef().unwrap_or(0.0)),
    }
}

/// The metric of a mixture of experts' load-balancing loss (before its weight), where a run adds it.
pub const ROUTER_AUX: &str = "router/aux_loss";

/// The policy, its optimizer and the replicas that compute a step's gradients.
pub struct Trainer {
    /// The model being trained (on the first device, with autodiff): [`Trainer::policy`], replaced
    /// through [`Trainer::set_policy`], which forgets `half`.
    policy: CausalLm,
    /// Its optimizer.
    pub optim: Optim,
    /// Where the gradients are computed: one replica per device.
    pub replicas: DataParallel,
    /// How a step runs.
    pub settings: StepSettings,
    /// In mixed precision, the policy's weights in the compute precision as the last update wrote
    /// them, for the next step to run on without casting them (`None`: cast at the next step).
    half: Option<HalfWeights>,
}

/// `device` with autodiff, and with burn's balanced gradient checkpointing when `checkpointing`
/// (`train.gradient_checkpointing`). The policy's parameters must live on this same device.
pub fn autodiff(device: &Device, checkpointing: bool) -> Device {
    let ad = device.clone().autodiff();
    if checkpointing { ad.gradient_checkpointing() } else { ad }
}

/// Data parallelism: one replica per device of one backend, each with its own copy of the
/// reference. A step's pairs are split into equal contiguous slices, one per replica; each runs its
/// slice on a copy of the policy, and the gradients are summed on the first device. One device is
/// the same type with one replica.
pub struct DataParallel {
    replicas: Vec<Replica>,
    /// Whether the replicas' autodiff keeps fewer activations (what out-of-memory advice leaves out).
    checkpointing: bool,
}

struct Replica {
    /// The replica's autodiff device.
    device: Device,
    /// The same device without autodiff, where its reference lives.
    plain: Device,
    reference: Reference,
}

impl DataParallel {
    /// Replicas on `devices` (without autodiff; it is added, with gradient checkpointing when
    /// asked), each with `reference` copied to it.
    pub fn new(devices: &[Device], reference: &Reference, checkpointing: bool) -> Self {
        Self { replicas: devices.iter().map(|d| Replica { device: autodiff(d, checkpointing), plain: d.clone(), reference: reference.fork(d) }).collect(), checkpointing }
    }

    /// TR-DPO (`train.sync_ref_model`): moves the frozen reference toward `policy` by `alpha`
    /// ([`CausalLm::soft_update`]) on the first replica and copies the result to the others, so that
    /// every replica scores against the same reference. A reference that is no model (cached log-probs,
    /// none) is left as it is.
    pub fn sync_reference(&mut self, policy: &CausalLm, alpha: f64) -> Result<()> {
        let Some(Reference::Frozen(first)) = self.replicas.first().map(|r| &r.reference) else { return Ok(()) };
        let moved = Reference::Frozen(Box::new((**first).clone().soft_update(&policy.valid(), alpha)?));
        for r in self.replicas.iter_mut().skip(1) {
            r.reference = moved.fork(&r.plain);
        }
        if let Some(r) = self.replicas.first_mut() {
            r.reference = moved;
        }
        Ok(())
    }

    /// The reference model, when the replicas score against one (what a TR-DPO checkpoint keeps).
    pub fn reference_model(&self) -> Option<&CausalLm> {
        match self.replicas.first().map(|r| &r.reference) {
            Some(Reference::Frozen(m)) => Some(m),
            _ => None,
        }
    }

    /// Number of replicas.
    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    /// Whether there is no replica.
    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// The first replica's reference (evaluation runs there).
    pub fn reference(&self) -> &Reference {
        static NONE: Reference = Reference::None;
        self.replicas.first().map_or(&NONE, |r| &r.reference)
    }
}

/// The seed of the dropout draws of step `step` on replica `replica`: a resumed run draws what the
/// uninterrupted one would have, and replicas draw differently.
pub fn dropout_seed(seed: u64, step: usize, replica: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(step as u64) ^ ((replica as u64) << 48)
}

/// A pair's share of a step: its weight (preference) or its trained tokens (SFT).
pub fn pair_share(stage: Stage, p: &TokenizedPair) -> f64 {
    match stage {
        Stage::Preference => f64::from(p.weight.unwrap_or(1.0)),
        Stage::Sft => forward::sft_tokens(p) as f64,
    }
}

/// Metric sums over pairs (preference: each loss-crate metric × pairs; SFT: summed NLL and tokens),
/// added across micro-batches, replicas and steps; [`MetricSums::means`] turns them into values.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricSums {
    sums: BTreeMap<String, f64>,
    pairs: usize,
    nll: f64,
    nll_tokens: f64,
    /// Whether these are SFT sums.
    sft: bool,
}

impl MetricSums {
    /// Adds a preference micro-batch's metrics, each weighted by its `pairs`.
    pub fn add_preference(&mut self, metrics: &Metrics, pairs: usize) {
        for (name, t) in metrics.named() {
            *self.sums.entry(name.to_string()).or_default() += pairs as f64 * t.into_scalar::<f64>();
        }
        self.pairs += pairs;
    }

    /// Adds `value`, a metric of the micro-batch of `pairs` that the loss crate does not name, to its
    /// mean (after [`Self::add_preference`] counted the pairs).
    pub fn add_mean(&mut self, name: &str, value: f64, pairs: usize) {
        *self.sums.entry(name.to_string()).or_default() += pairs as f64 * value;
    }

    /// Adds an SFT micro-batch's summed NLL over its trained tokens.
    pub fn add_nll(&mut self, nll: f64, tokens: f64, pairs: usize) {
        (self.nll, self.nll_tokens, self.pairs, self.sft) = (self.nll + nll, self.nll_tokens + tokens, self.pairs + pairs, true);
    }

    /// Adds `other` to these sums.
    pub fn merge(&mut self, other: &MetricSums) {
        for (k, v) in &other.sums {
            *self.sums.entry(k.clone()).or_default() += v;
        }
        (self.nll, self.nll_tokens, self.pairs, self.sft) = (self.nll + other.nll, self.nll_tokens + other.nll_tokens, self.pairs + other.pairs, self.sft || other.sft);
    }

    /// Pairs counted.
    pub fn pairs(&self) -> usize {
        self.pairs
    }

    /// The values: each preference metric's mean over pairs, or SFT's token-mean `nll` and `ppl`;
    /// beside either, the means [`Self::add_mean`] took.
    pub fn means(&self) -> BTreeMap<String, f64> {
        let mut means: BTreeMap<String, f64> = self.sums.iter().map(|(k, v)| (k.clone(), v / self.pairs.max(1) as f64)).collect();
        if self.sft {
            let nll = self.nll / self.nll_tokens.max(1.0);
            means.extend([("nll".to_string(), nll), ("ppl".to_string(), nll.exp())]);
        }
        means
    }
}

/// Where a step's time went, in seconds. Reference and forward end in host reads (the reference rows,
/// the metrics), backward in the gradient norm's; the update is queued, so on an asynchronous backend
/// part of it lands in the next phase that reads the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Phases {
    /// Batches to the device and the reference's row log-probs.
    pub reference: f64,
    /// The policy's forward pass, the loss and its metrics.
    pub policy_forward: f64,
    /// Backward passes, the gradients' sum and their global norm.
    pub backward: f64,
    /// The optimizer update.
    pub optimizer: f64,
}

/// What one step did.
#[derive(Clone, Debug)]
pub struct StepStats {
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// The step's metric sums.
    pub metrics: MetricSums,
    /// Pairs in the step.
    pub pairs: usize,
    /// Tokens in the step (prompt and completions, both rows of a pair).
    pub tokens: usize,
    /// Its phases.
    pub phases: Phases,
}

/// One replica's summed gradients, metric sums and phase times over its slice of a step.
struct SliceOut {
    grads: GradientsParams,
    metrics: MetricSums,
    phases: Phases,
}

impl Trainer {
    /// A trainer of `policy` (on the first device of `replicas`, with autodiff).
    pub fn new(policy: CausalLm, optim: Optim, replicas: DataParallel, settings: StepSettings) -> Self {
        Self { policy, optim, replicas, settings, half: None }
    }

    /// The model being trained.
    pub fn policy(&self) -> &CausalLm {
        &self.policy
    }

    /// TR-DPO: moves the replicas' reference toward the policy by `alpha` ([`DataParallel::sync_reference`]).
    pub fn sync_reference(&mut self, alpha: f64) -> Result<()> {
        self.replicas.sync_reference(&self.policy, alpha)
    }

    /// Replaces the model being trained (a checkpoint's weights): the next step casts its weights
    /// anew.
    pub fn set_policy(&mut self, policy: CausalLm) {
        self.policy = policy;
        self.half = None;
    }

    /// The model being trained, giving up the trainer.
    pub fn into_policy(self) -> CausalLm {
        self.policy
    }

    /// One optimizer step on `pairs` at step index `at` with learning rate `lr`. A batch the device
    /// has no memory for is [`TrainError::OutOfMemory`], which says what to lower.
    pub fn step(self, pairs: &[&TokenizedPair], at: usize, lr: f64) -> Result<(Self, StepStats)> {
        let (micro, precision, checkpointing) = (self.settings.micro_batch_size, self.settings.precision, self.replicas.checkpointing);
        guarded(|| format!("step {}", at + 1), || step_advice(micro, precision, checkpointing), || self.step_unguarded(pairs, at, lr))
    }

    fn step_unguarded(mut self, pairs: &[&TokenizedPair], at: usize, lr: f64) -> Result<(Self, StepStats)> {
        let s = &self.settings;
        let total = pairs.iter().map(|p| pair_share(s.stage, p)).sum::<f64>().max(f64::MIN_POSITIVE);
        let main = self.replicas.replicas.first().map(|r| r.device.clone()).ok_or_else(|| TrainError::config("train.devices", "is empty; expected at least one device"))?;
        let outs: Vec<Result<SliceOut>> = if self.replicas.len() == 1 {
            let r = &self.replicas.replicas[0];
            r.device.seed(dropout_seed(s.seed, at, 0));
            vec![slice_grads(s, at, (total, pairs.len()), &self.policy, self.half.take().as_ref(), &r.reference, pairs, &r.device)]
        } else {
            let per = pairs.len() / self.replicas.len();
            let (policy, checkpointing) = (&self.policy, self.replicas.checkpointing);
            // A routine chosen for this thread (`train.matmul`) holds on the replicas' threads too.
            let routine = odpo_kernels::matmul_routine();
            std::thread::scope(|scope| {
                let handles: Vec<_> = self
                    .replicas
                    .replicas
                    .iter()
                    .zip(pairs.chunks(per))
                    .enumerate()
                    .map(|(k, (r, slice))| {
                        let replica = policy.clone();
                        scope.spawn(move || {
                            // A panic here would not reach the caller's guard (another thread).
                            odpo_kernels::with_matmul_routine(routine, || guarded(|| format!("step {} on device {k}", at + 1), || step_advice(s.micro_batch_size, s.precision, checkpointing), || {
                                let replica = if k == 0 { replica } else { replica.fork_to(&r.device) };
                                r.device.seed(dropout_seed(s.seed, at, k));
                                slice_grads(s, at, (total, pairs.len()), &replica, None, &r.reference, slice, &r.device)
                            }))
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .enumerate()
                    .map(|(device, h)| h.join().unwrap_or_else(|panic| Err(TrainError::WorkerPanicked { device, message: panic_message(panic.as_ref()) })))
                    .collect()
            })
        };
        let (mut metrics, mut phases) = (MetricSums::default(), Phases::default());
        let mut accum = GradientsAccumulator::<CausalLm>::new();
        let one = self.replicas.len() == 1;
        for out in outs {
            let out = out?;
            // Replicas' half-precision gradients are summed in f32 (see `slice_grads`).
            accum.accumulate(&self.policy, if one { out.grads } else { optim::widen_grads(&self.policy, out.grads).to_device(&main, &self.policy) });
            metrics.merge(&out.metrics);
            // Replicas run at the same time: a phase lasts as long as its slowest replica's.
            phases = Phases {
                reference: phases.reference.max(out.phases.reference),
                policy_forward: phases.policy_forward.max(out.phases.policy_forward),
                backward: phases.backward.max(out.phases.backward),
                optimizer: 0.0,
            };
        }
        let clock = Instant::now();
        let grads = accum.grads();
        let grad_norm = self.optim.grad_norm(&self.policy, &grads);
        if !grad_norm.is_finite() {
            let param = optim::first_nonfinite_grad(&self.policy, &grads).unwrap_or_else(|| "?".into());
            let detail = format!("global gradient norm is {grad_norm}; first non-finite gradient: parameter `{param}`");
            return Err(TrainError::NonFinite { step: at, what: "gradient", pair_ids: pairs.iter().map(|p| p.pair_id).collect(), detail });
        }
        phases.backward += clock.elapsed().as_secs_f64();
        let clock = Instant::now();
        // Clipping is folded into the update: the gradients are not rewritten.
        // In mixed precision on one device the update also writes the next step's half-precision
        // weights, where it can (the cubecl kernel, libtorch's multi-tensor update).
        let precision = self.settings.precision;
        let half = (precision != Precision::F32 && self.replicas.len() == 1).then(|| precision.dtype());
        let coef = optim::clip_coefficient(grad_norm, self.settings.max_grad_norm);
        let (policy, half) = self.optim.step_to_half(lr, self.policy, grads, coef, half);
        self.policy = policy;
        self.half = half.map(|weights| HalfWeights::from_parts(precision, weights));
        phases.optimizer = clock.elapsed().as_secs_f64();
        let tokens = pairs.iter().map(|p| 2 * p.prompt.len() + forward::pair_tokens(p)).sum();
        Ok((self, StepStats { grad_norm, metrics, pairs: pairs.len(), tokens, phases }))
    }
}

/// Forward, loss and backward of one replica's `pairs` in micro-batches on `device` (where `policy`
/// lives); gradients summed. `total`: the whole step's share, and its pairs. `half`: the policy's weights in the
/// compute precision, when the last update wrote them.
#[allow(clippy::too_many_arguments)]
fn slice_grads(s: &StepSettings, at: usize, (total, step_pairs): (f64, usize), policy: &CausalLm, half: Option<&HalfWeights>, reference: &Reference, pairs: &[&TokenizedPair], device: &Device) -> Result<SliceOut> {
    let (mut metrics, mut phases) = (MetricSums::default(), Phases::default());
    let mut accum = GradientsAccumulator::<CausalLm>::new();
    let several = pairs.len() > s.micro_batch_size;
    let cast_once = (half.is_none() && several && s.precision != Precision::F32).then(|| policy.half_weights(s.precision));
    let half = half.or(cast_once.as_ref());
    for micro in pairs.chunks(s.micro_batch_size) {
        let ids: Vec<usize> = micro.iter().map(|p| p.pair_id).collect();
        let nonfinite = |detail: String| TrainError::NonFinite { step: at, what: "loss", pair_ids: ids.clone(), detail };
        let share: f64 = micro.iter().map(|p| pair_share(s.stage, p)).sum();
        let clock = Instant::now();
        // Mixed precision: the forward and backward run on a half-precision cast of the f32
        // weights; the cast is part of the graph, so the gradients arrive on the f32 parameters,
        // which the optimizer updates. They arrive in half precision (no cast launched per weight),
        // which the optimizer reads as f32. Each backward consumes its graph, so each micro-batch
        // records the cast anew; with several, or where the last update wrote them, the casts
        // made once are recorded.
        let cast;
        let policy_fwd = if s.precision == Precision::F32 {
            policy
        } else {
            cast = match half {
                Some(half) => policy.clone().with_half_weights(half),
                None => policy.clone().with_compute_precision(s.precision),
            };
            &cast
        };
        let loss = match s.stage {
            Stage::Preference => {
                let batch = forward::preference_batch(micro, &s.batcher, device);
                let reference_rows = reference.rows(&batch)?;
                phases.reference += clock.elapsed().as_secs_f64();
                let clock = Instant::now();
                let extras = RowExtras { wpo: s.loss.use_weighting, router_aux: s.router_aux_loss_coef > 0.0 };
                let rows = forward::policy_rows(policy_fwd, &batch, extras);
                let aux = rows.router_aux.clone();
                let inputs = forward::pair_logps(&batch, rows, &reference_rows, s.use_offsets, device);
                let out = preference_loss(&inputs, &s.loss)?;
                check_finite(&inputs, &out).map_err(|e| nonfinite(name_pair(e, &ids)))?;
                metrics.add_preference(&out.metrics, micro.len());
                let mut loss = out.loss;
                // TRL's `losses + router_aux_loss_coef · aux_loss`, the mean over the micro-batch's pairs.
                if let Some(aux) = weighted_router_aux(aux, s.router_aux_loss_coef, &mut metrics, micro.len()).map_err(&nonfinite)? {
                    loss = loss + aux;
                }
                phases.policy_forward += clock.elapsed().as_secs_f64();
                loss.mul_scalar(share / total)
            }
            Stage::Sft => {
                let batch = forward::sft_batch(micro, &s.batcher, device);
                phases.reference += clock.elapsed().as_secs_f64();
                let clock = Instant::now();
                let (nll, aux) = forward::sft_nll(policy_fwd, &batch, s.router_aux_loss_coef > 0.0);
                let value = nll.clone().into_scalar::<f64>();
                if !value.is_finite() {
                    return Err(nonfinite(format!("summed NLL of the chosen responses is {value}")));
                }
                metrics.add_nll(value, share, micro.len());
                let mut loss = nll.div_scalar(total);
                // TRL's SFTTrainer: the token-mean NLL over the step, plus `router_aux_loss_coef ·
                // aux_loss` averaged over its micro-batches (here weighed by their pairs).
                let weight = s.router_aux_loss_coef * micro.len() as f64 / step_pairs.max(1) as f64;
                if let Some(aux) = weighted_router_aux(aux, weight, &mut metrics, micro.len()).map_err(&nonfinite)? {
                    loss = loss + aux;
                }
                phases.policy_forward += clock.elapsed().as_secs_f64();
                loss
            }
        };
        let clock = Instant::now();
        let grads = GradientsParams::from_grads(loss.backward(), policy);
        // Summed over micro-batches in f32, as PyTorch accumulates the f32 weights' gradients.
        let grads = if several { optim::widen_grads(policy, grads) } else { grads };
        accum.accumulate(policy, grads);
        phases.backward += clock.elapsed().as_secs_f64();
    }
    Ok(SliceOut { grads: accum.grads(), metrics, phases })
}

/// A micro-batch's load-balancing loss of the routers times `weight`, its value logged as
/// [`ROUTER_AUX`] for the micro-batch's `pairs`; an error message where the value is not finite.
fn weighted_router_aux(aux: Option<Tensor<1>>, weight: f64, metrics: &mut MetricSums, pairs: usize) -> std::result::Result<Option<Tensor<1>>, String> {
    let Some(aux) = aux else { return Ok(None) };
    let value = aux.clone().into_scalar::<f64>();
    if !value.is_finite() {
        return Err(format!("the routers' load-balancing loss is {value}"));
    }
    metrics.add_mean(ROUTER_AUX, value, pairs);
    Ok(Some(aux.mul_scalar(weight)))
}

/// Runs `f`, turning an allocation failure (libtorch's panic, or cubecl's error read back from the
/// device) into [`TrainError::OutOfMemory`] in `during`, with `advice`.
pub(crate) fn guarded<T>(during: impl Fn() -> String, advice: impl Fn() -> String, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match odpo_model::out_of_memory::catch(f) {
        Ok(result) => result.map_err(|e| e.out_of_memory_in(&during, &advice)),
        Err(cause) => Err(TrainError::OutOfMemory { during: during(), advice: advice(), cause, run_dir: None }),
    }
}

/// What lowers a step's memory, of what this run has not done yet.
fn step_advice(micro_batch_size: usize, precision: Precision, checkpointing: bool) -> String {
    let mut ways = Vec::new();
    if micro_batch_size > 1 {
        ways.push(format!("lower `train.micro_batch_size` (now {micro_batch_size}; a step's gradient stays the same, accumulated over more micro-batches)"));
    }
    ways.push("shorten `data.max_length`".to_string());
    if !checkpointing {
        ways.push("set `train.gradient_checkpointing = true`".to_string());
    }
    if precision == Precision::F32 {
        ways.push("train in `train.dtype = \"bf16\"`".to_string());
    }
    format!("to fit, {}", ways.join(", or "))
}

/// The text of a panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned()).unwrap_or_else(|| "(no message)".into())
}

/// The loss crate counts pairs within the micro-batch; name the pair by its id instead.
fn name_pair(e: odpo_loss::LossError, ids: &[usize]) -> String {
    let pair = match &e {
        odpo_loss::LossError::NonFiniteInput { pair, .. } => Some(*pair),
        odpo_loss::LossError::NonFiniteLoss { pair, .. } => *pair,
        _ => None,
    };
    match pair.and_then(|i| ids.get(i)) {
        Some(id) => format!("{e} (pair {} of the micro-batch is pair id {id})", pair.unwrap_or(0)),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn an_allocation_failure_in_a_step_is_out_of_memory_with_what_to_lower() {
        let advice = step_advice(4, Precision::F32, false);
        assert_eq!(
            advice,
            "to fit, lower `train.micro_batch_size` (now 4; a step's gradient stays the same, accumulated over more micro-batches), or shorten `data.max_length`, or set `train.gradient_checkpointing = true`, or train in `train.dtype = \"bf16\"`"
        );
        // What the run already does is not advised again.
        assert_eq!(step_advice(1, Precision::Bf16, true), "to fit, shorten `data.max_length`");
        // libtorch's failure arrives as a panic.
        let e = guarded(|| "step 3".into(), || advice.clone(), || -> Result<()> { panic!("called `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.81 GiB\")") }).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("out of memory on the device during step 3: an allocation of 2.0 GiB failed; the backend says: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.81 GiB; {advice}")
        );
        // cubecl's arrives as an error reading back from the device; others are left as they are.
        let read = || -> Result<()> { Err(TrainError::Device { what: "the reference log-probs", message: "Execution(An IO error happened\nCaused by:\n  can't allocate buffer of size: 9663676416\nNo backtrace available)".into() }) };
        match guarded(|| "step 1".into(), String::new, read).unwrap_err().in_run("runs/x".as_ref()) {
            TrainError::OutOfMemory { during, cause, run_dir, .. } => {
                assert_eq!((during.as_str(), cause.bytes, run_dir), ("step 1", Some(9_663_676_416), Some("runs/x".into())));
            }
            e => panic!("{e}"),
        }
        let other = || -> Result<()> { Err(TrainError::Device { what: "x", message: "shape mismatch".into() }) };
        assert!(matches!(guarded(|| "step 1".into(), String::new, other), Err(TrainError::Device { .. })));
    }
}
