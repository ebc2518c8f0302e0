//! ODPO with a user-defined offset function.
//!
//! `data.offset` picks one of the built-in offsets Δ = α·f(s_w, s_l) (`log`, `log-ratio`, `identity`). An
//! offset is just a number on each [`PreferencePair`], so any function of the pair can replace it between
//! loading and tokenizing: here Δ = α·tanh((s_w − s_l) / 2), an offset that saturates for large score gaps.
//! The run is an ordinary `RunConfig` (written as TOML below) trained with [`odpo_trainer::train_on`]; the
//! `[data.offset]` table is still set, because it is what tells the trainer to feed offsets to the loss.
//!
//! Data: scored responses of the built-in synthetic task (continuations drawn from its generator, scored by
//! its known reward) in the paper's scored-responses format. Model: a tiny random GPT-2 over the task's
//! vocabulary. Runs in seconds on the CPU:
//!
//! `cargo run --release -p odpo-pipeline --example custom_offset`

use std::io::Write;
use std::path::Path;

use burn::tensor::Device;
use odpo_data::PreferencePair;
use odpo_model::tokenizer::Tokenizer;
use odpo_pipeline::synthetic;
use odpo_trainer::{RunConfig, RunData, RunSummary};
use rand::SeedableRng;
use rand::rngs::StdRng;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The user's offset function: any function of the pair (its scores, texts, lengths, ...).
pub fn bounded_offset(pair: &PreferencePair, alpha: f64) -> f64 {
    let (w, l) = (pair.score_chosen.unwrap_or(0.0), pair.score_rejected.unwrap_or(0.0));
    alpha * ((w - l) / 2.0).tanh()
}

/// Writes `k` scored continuations for each of the first `prompts` prompts of the synthetic task, one
/// `{"prompt", "text", "reward"}` object a line.
pub fn write_scored_samples(path: &Path, prompts: usize, k: usize, seed: u64) -> Result<()> {
    let (reward, mut rng) = (synthetic::reward(), StdRng::seed_from_u64(seed));
    let mut out = std::fs::File::create(path)?;
    for prompt in synthetic::all_prompts().into_iter().take(prompts) {
        for _ in 0..k {
            let text = synthetic::sample_continuation(&mut rng);
            writeln!(out, "{}", serde_json::json!({"prompt": prompt, "text": text, "reward": reward.text_reward(&text)}))?;
        }
    }
    Ok(())
}

/// Trains ODPO with [`bounded_offset`] for `steps` steps in `dir` (emptied first).
pub fn run(dir: &Path, steps: usize, device: &Device) -> Result<RunSummary> {
    let _ = std::fs::remove_dir_all(dir);
    // The task: a word-level tokenizer and a tiny GPT-2 config, and the scored responses.
    let model_dir = dir.join("init");
    synthetic::write_tokenizer(&model_dir)?;
    synthetic::write_json(&model_dir.join("config.json"), &synthetic::gpt2_config(2, 32, 4, 32))?;
    let samples = dir.join("samples.jsonl");
    write_scored_samples(&samples, 96, 4, 0)?;

    // The run: best-vs-worst pairs, ODPO's loss (sigmoid with offsets), a random starting model.
    let text = format!(
        r#"
[model]
path = '{model}'
random_init = true
[data]
path = '{samples}'
format = "scored-jsonl"
pairing = {{ strategy = "best-vs-worst" }}
offset = {{ alpha = 1.0 }}   # turns offsets on; the values are replaced below
eval_fraction = 0.2
max_length = 32
max_prompt_length = 8
[loss]
loss_type = "sigmoid"
beta = 0.1
[optim]
optimizer = "adamw"
lr = 3e-3
weight_decay = 0.0
warmup_steps = 2
[train]
batch_size = 16
micro_batch_size = 16
max_steps = {steps}
log_every = 5
checkpoint_every = 0
[eval]
at_start = true
[output]
dir = '{out}'
progress = false
"#,
        model = model_dir.display(),
        samples = samples.display(),
        out = dir.join("run").display(),
    );
    let cfg = RunConfig::from_toml_str(&text, "custom_offset", &[])?;

    // Load and pair as usual, then put the user's offset on every pair.
    let mut loaded = odpo_data::load(&cfg.data)?;
    for pair in &mut loaded.pairs {
        pair.offset = bounded_offset(pair, 1.0);
    }
    let (train, eval) = odpo_data::split_by_prompt(loaded.pairs, cfg.data.eval_fraction, cfg.data.seed);
    let tokenizer = Tokenizer::from_dir(&model_dir)?;
    let (train, _) = odpo_data::tokenize_pairs(&train, &tokenizer, &cfg.data)?;
    let (eval, _) = odpo_data::tokenize_pairs(&eval, &tokenizer, &cfg.data)?;
    let data = RunData { train, eval, pad_id: tokenizer.pad_token_id().unwrap_or(0), pad_to_multiple: None };
    Ok(odpo_trainer::train_on(&cfg, data, device, false, Some(&model_dir))?)
}

fn main() -> Result<()> {
    let device = odpo_model::backend::device("flex")?;
    let summary = run(Path::new("runs/examples/custom_offset"), 20, &device)?;
    println!("run folder: {}", summary.run_dir.display());
    if let Some((first, last)) = summary.train_loss {
        println!("train loss {first:.4} -> {last:.4}");
    }
    if let (Some(start), Some(end)) = (&summary.eval_start, &summary.eval_end) {
        let loss = |m: &std::collections::BTreeMap<String, f64>| m.get("loss").copied().unwrap_or(f64::NAN);
        println!("eval loss  {:.4} -> {:.4}", loss(start), loss(end));
    }
    Ok(())
}
