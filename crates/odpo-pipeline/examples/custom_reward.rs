//! A user-defined reward model driving sample → score → pair → train → evaluate.
//!
//! A reward model is anything that implements [`RewardModel`]: one score per (prompt, response). Here it
//! is a hand-written rule over the synthetic task's words; a classifier or an API call fits the same
//! trait. The stages are the pipeline crate's plain functions:
//!
//! 1. a tiny random GPT-2 over the synthetic task's vocabulary, saved as a HF folder;
//! 2. [`odpo_pipeline::sample`]: k responses per prompt, scored by the reward model, written in the
//!    paper's scored-responses format (`{"prompt", "text", "reward"}` per line);
//! 3. [`odpo_trainer::train`]: ODPO on best-vs-worst pairs of those responses (ties dropped), with the
//!    offset Δ = log(s_w − s_l) from the scores;
//! 4. [`odpo_pipeline::eval::evaluate`]: the policy's and the starting model's mean reward, and the KL
//!    between them, on held-out prompts.
//!
//! `cargo run --release -p odpo-pipeline --example custom_reward`

use std::path::Path;

use burn::tensor::Device;
use odpo_model::{CausalLm, ModelConfig};
use odpo_pipeline::eval::{EvalReport, evaluate};
use odpo_pipeline::stages::load_model;
use odpo_pipeline::{RewardModel, SampleSettings, synthetic};
use odpo_trainer::RunConfig;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The user's reward: +1 for every word it likes, −1 for every word it dislikes, and a small cost per
/// word so that rambling does not pay.
pub struct WordRule {
    /// Words worth +1.
    pub liked: Vec<&'static str>,
    /// Words worth −1.
    pub disliked: Vec<&'static str>,
}

impl RewardModel for WordRule {
    fn score(&self, _prompts: &[String], texts: &[String]) -> odpo_pipeline::Result<Vec<f64>> {
        let word = |w: &str| f64::from(self.liked.contains(&w)) - f64::from(self.disliked.contains(&w)) - 0.05;
        Ok(texts.iter().map(|t| t.split_whitespace().map(word).sum()).collect())
    }

    fn name(&self) -> String {
        "word rule".into()
    }
}

/// Runs the four stages in `dir` (emptied first) with `steps` preference steps.
pub fn run(dir: &Path, steps: usize, device: &Device) -> Result<EvalReport> {
    let _ = std::fs::remove_dir_all(dir);
    let reward = WordRule { liked: vec!["great", "fun", "lovely", "good"], disliked: vec!["awful", "boring", "bad", "dull"] };

    // 1. The starting model: random weights, saved with the task's tokenizer.
    let init = dir.join("init");
    synthetic::write_tokenizer(&init)?;
    let config = ModelConfig::from_hf_json(&synthetic::gpt2_config(2, 32, 4, 32), &init)?;
    CausalLm::random(&config, 0, device)?.save_hf(&config, &init)?;

    // 2. Sample and score: 4 responses for each training prompt.
    let prompts = synthetic::split_prompts(0, 16)?;
    let train_prompts: Vec<String> = prompts.train.into_iter().take(96).collect();
    let settings = SampleSettings { k: 4, temperature: 1.0, max_new_tokens: 8, seed: 0 };
    let samples = dir.join("samples.jsonl");
    let report = odpo_pipeline::sample(&init, &train_prompts, &settings, &reward, &samples, device)?;
    println!("sampled {} responses, mean reward {:.3}", report.responses, report.mean_reward);

    // 3. Pair and train: the scored file is ordinary `scored-jsonl` data for the trainer.
    let text = format!(
        r#"
[model]
path = '{init}'
[data]
path = '{samples}'
format = "scored-jsonl"
pairing = {{ strategy = "best-vs-worst" }}
offset = {{ function = "log", alpha = 1.0 }}
allow_empty_completions = true
max_length = 32
max_prompt_length = 8
[loss]
beta = 0.1
[optim]
optimizer = "adamw"
lr = 1e-3
weight_decay = 0.0
warmup_steps = 2
[train]
batch_size = 16
micro_batch_size = 16
max_steps = {steps}
log_every = 5
checkpoint_every = 0
[eval]
at_start = false
[output]
dir = '{out}'
progress = false
"#,
        init = init.display(),
        samples = samples.display(),
        out = dir.join("odpo").display(),
    );
    let cfg = RunConfig::from_toml_str(&text, "custom_reward", &[])?;
    let summary = odpo_trainer::train(&cfg, device, false)?;
    let policy_dir = summary.exported.ok_or("the run exported no model")?;

    // 4. Evaluate on held-out prompts with the same reward model.
    let (policy, tokenizer) = load_model(&policy_dir, device)?;
    let (reference, _) = load_model(&init, device)?;
    let eval_settings = SampleSettings { k: 4, seed: 1, ..settings };
    Ok(evaluate(&policy, &reference, &tokenizer, &prompts.eval, &eval_settings, &reward, device)?)
}

fn main() -> Result<()> {
    let device = odpo_model::backend::device("flex")?;
    let report = run(Path::new("runs/examples/custom_reward"), 30, &device)?;
    let (p, r) = (&report.policy, &report.reference);
    println!("reward: start {:.3} ± {:.3}, policy {:.3} ± {:.3}", r.reward.mean, r.reward.ci95, p.reward.mean, p.reward.ci95);
    println!("KL(policy ‖ start) per sequence: {:.3} ± {:.3}", p.kl.seq.mean, p.kl.seq.ci95);
    Ok(())
}
