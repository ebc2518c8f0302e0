//! A custom training loop on the model, data and loss crates directly, in the style of burn's
//! `custom-training-loop` example: no `RunConfig`, no trainer, one screen of code.
//!
//! - odpo-model: a tiny random GPT-2 ([`CausalLm::random`]) as the policy, its starting point frozen as
//!   the reference ([`odpo_model::Module::valid`]), summed response log-probs ([`sequence_logprobs`]);
//! - odpo-data: [`TokenizedPair`]s (built here from token ids) stacked into `[2B, T]` batches by
//!   [`PreferenceBatcher`], chosen rows first;
//! - odpo-loss: the objective's inputs ([`PairLogps`]) and either a built-in objective
//!   ([`preference_loss`]) or a user-defined one: any function of the log-prob tensors ([`capped_odpo`]).
//!
//! `cargo run --release -p odpo-trainer --example custom_loop`

use burn::data::dataloader::batcher::Batcher;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Tensor, activation};
use odpo_data::{ConcatenatedRows, Layout, PreferenceBatcher, TokenizedPair};
use odpo_loss::{LossConfig, LossKind, PairLogps, preference_loss};
use odpo_model::logprobs::sequence_logprobs;
use odpo_model::{CausalLm, Module, ModelConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Vocabulary of the toy task: token 0 pads, token 1 ends a response.
const VOCAB: u32 = 32;

/// The loop's settings.
#[derive(Clone, Debug)]
pub struct LoopConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Pairs per step.
    pub batch_size: usize,
    /// β of the objective.
    pub beta: f64,
    /// AdamW learning rate.
    pub lr: f64,
    /// Train with the user-defined [`capped_odpo`] (true) or the built-in ODPO (`sigmoid` with offsets).
    pub custom_objective: bool,
    /// Seed of the model and the data.
    pub seed: u64,
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self { steps: 30, batch_size: 8, beta: 0.5, lr: 3e-3, custom_objective: true, seed: 0 }
    }
}

/// A user-defined objective: ODPO whose logit stops pushing once the margin clears the offset by `cap`,
/// `-log σ(min(β·h − Δ, cap))`. Any function of [`PairLogps`] returning per-pair losses `[B]` will do.
pub fn capped_odpo(x: &PairLogps, beta: f64, cap: f64) -> Tensor<1> {
    let h = (x.policy_chosen.clone() - x.reference_chosen.clone()) - (x.policy_rejected.clone() - x.reference_rejected.clone());
    let mut logits = h.mul_scalar(beta);
    if let Some(offset) = &x.offset {
        logits = logits - offset.clone();
    }
    activation::log_sigmoid(logits.clamp_max(cap)).neg()
}

/// Toy preference pairs: chosen responses use even tokens, rejected ones odd tokens; the offset grows
/// with the chosen response's length (any per-pair number works as Δ).
pub fn toy_pairs(n: usize, seed: u64) -> Vec<TokenizedPair> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|pair_id| {
            let prompt: Vec<u32> = (0..rng.random_range(2..5)).map(|_| rng.random_range(2..VOCAB)).collect();
            let mut response = |parity: u32| -> Vec<u32> {
                let mut v: Vec<u32> = (0..rng.random_range(2..6)).map(|_| 2 + 2 * rng.random_range(0..VOCAB / 2 - 1) + parity).collect();
                v.push(1); // EOS
                v
            };
            let (chosen, rejected) = (response(0), response(1));
            let offset = 0.1 * chosen.len() as f32;
            TokenizedPair { pair_id, prompt, chosen, rejected, offset, weight: None }
        })
        .collect()
}

/// Summed response log-probs `[2B]` (chosen rows first) of a batch of concatenated rows under `model`.
fn row_logps(model: &CausalLm, rows: &ConcatenatedRows) -> (Tensor<1>, Tensor<1>) {
    let logits = model.forward(rows.input_ids.clone(), &rows.attention_mask, None);
    sequence_logprobs(logits, rows.input_ids.clone(), rows.loss_mask.clone())
}

/// Trains the tiny policy and returns the loss of every step.
pub fn run(cfg: &LoopConfig, device: &Device) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
    let ad = device.clone().autodiff();
    // The model: a 2-layer GPT-2 from a HF-style config, random weights.
    let config_json = serde_json::json!({
        "architectures": ["GPT2LMHeadModel"], "vocab_size": VOCAB, "n_positions": 32,
        "n_embd": 32, "n_layer": 2, "n_head": 4, "eos_token_id": 1, "bos_token_id": 1
    });
    let config = ModelConfig::from_hf_json(&config_json, "tiny-gpt2".as_ref())?;
    let mut policy = CausalLm::random(&config, cfg.seed, &ad)?;
    let reference = policy.valid(); // frozen: the inner (non-autodiff) backend
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let builtin = LossConfig::new(LossKind::Sigmoid, cfg.beta);

    // The data: pairs, and a batcher that pads and stacks them.
    let pairs = toy_pairs(64, cfg.seed);
    let batcher = PreferenceBatcher::new(0, None, Layout::Concatenated);

    let mut losses = Vec::with_capacity(cfg.steps);
    for step in 0..cfg.steps {
        let start = (step * cfg.batch_size) % pairs.len();
        let items: Vec<TokenizedPair> = pairs.iter().cycle().skip(start).take(cfg.batch_size).cloned().collect();
        let b = items.len();
        let batch = batcher.batch(items, &ad);

        // Policy log-probs (tracked) and reference log-probs (no graph), each [2B]: chosen then rejected.
        let rows = batch.concatenated().ok_or("the batcher was asked for concatenated rows")?;
        let (policy_rows, counts) = row_logps(&policy, rows);
        let inner = batch.inner();
        let inner_rows = inner.concatenated().ok_or("the batcher was asked for concatenated rows")?;
        let reference_rows = Tensor::from_inner(row_logps(&reference, inner_rows).0);
        let half = |t: &Tensor<1>, i: usize| t.clone().narrow(0, i * b, b);
        let inputs = PairLogps::new(
            half(&policy_rows, 0),
            half(&policy_rows, 1),
            half(&reference_rows, 0),
            half(&reference_rows, 1),
            half(&counts, 0),
            half(&counts, 1),
        )
        .with_offset(batch.offsets.clone());

        let loss = if cfg.custom_objective {
            capped_odpo(&inputs, cfg.beta, 5.0).mean()
        } else {
            preference_loss(&inputs, &builtin)?.loss
        };
        let value = loss.clone().into_scalar::<f64>();
        if !value.is_finite() {
            return Err(format!("step {step}: loss is {value}").into());
        }
        losses.push(value);

        let grads = GradientsParams::from_grads(loss.backward(), &policy);
        policy = optim.step(cfg.lr, policy, grads);
        if step % 10 == 0 || step + 1 == cfg.steps {
            println!("step {step:>3}  loss {value:.4}");
        }
    }
    Ok(losses)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = odpo_model::backend::device("flex")?;
    let losses = run(&LoopConfig::default(), &device)?;
    println!("loss {:.4} -> {:.4}", losses[0], losses[losses.len() - 1]);
    Ok(())
}
