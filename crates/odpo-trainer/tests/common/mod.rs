//! Shared fixtures: a tiny random GPT-2 and synthetic pairs built from token ids (no tokenizer).
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use odpo_data::TokenizedPair;
use odpo_trainer::config::Checked;
use odpo_trainer::{RunConfig, RunData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "../../../odpo-model/tests/common/env.rs"]
mod env;
#[allow(unused_imports)]
pub use env::*;

pub const VOCAB: u32 = 64;

/// Writes a tiny GPT-2 `config.json` into `dir`.
pub fn tiny_model(dir: &Path) -> PathBuf {
    let cfg = serde_json::json!({
        "architectures": ["GPT2LMHeadModel"], "vocab_size": VOCAB, "n_positions": 64,
        "n_embd": 32, "n_layer": 2, "n_head": 4, "eos_token_id": 1, "bos_token_id": 1
    });
    let path = dir.join("tiny-gpt2");
    std::fs::create_dir_all(&path).expect("model dir");
    std::fs::write(path.join("config.json"), cfg.to_string()).expect("config.json");
    path
}

/// Pairs whose chosen responses use even tokens and rejected ones odd tokens: a preference a tiny model
/// can learn and that generalises to held-out pairs.
pub fn pairs(n: usize, first_id: usize, seed: u64) -> Vec<TokenizedPair> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let plen = rng.random_range(3..7);
            let prompt: Vec<u32> = (0..plen).map(|_| rng.random_range(2..VOCAB)).collect();
            let mut resp = |parity: u32| -> Vec<u32> {
                let len = rng.random_range(3..7);
                let mut v: Vec<u32> = (0..len).map(|_| (2 * rng.random_range(1..VOCAB / 2) + parity).min(VOCAB - 1)).collect();
                v.push(1);
                v
            };
            let chosen = resp(0);
            let rejected = resp(1);
            TokenizedPair { pair_id: first_id + i, prompt, chosen, rejected, offset: 0.5, weight: None }
        })
        .collect()
}

pub fn data(train: usize, eval: usize) -> RunData {
    RunData { train: pairs(train, 0, 1), eval: pairs(eval, 100_000, 2), pad_id: 0, pad_to_multiple: None }
}

/// A run config for the tiny model; `extra` is TOML appended (tables), `sets` are `--set` overrides.
pub fn config(model: &Path, run_dir: &Path, extra: &str, sets: &[&str]) -> Checked<RunConfig> {
    let text = format!(
        r#"
[model]
path = "{model}"
random_init = true
[data]
path = "unused.jsonl"
format = "jsonl"
max_length = 32
max_prompt_length = 16
offset = {{ alpha = 1.0 }}
[loss]
beta = 0.5
[optim]
optimizer = "adamw"
lr = 3e-3
weight_decay = 0.0
warmup_steps = 5
max_grad_norm = 1.0
[output]
dir = "{run}"
cache_dir = "{run}/../refcache"
export = true
progress = false
{extra}
"#,
        model = model.display(),
        run = run_dir.display()
    );
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    RunConfig::from_toml_str(&text, "test.toml", &sets).expect("test config")
}

/// `cfg` as an SFT run: no objective, no offsets (validated).
pub fn as_sft(cfg: Checked<RunConfig>) -> Checked<RunConfig> {
    edit(cfg, |cfg| {
        cfg.train.stage = odpo_trainer::config::Stage::Sft;
        cfg.loss = None;
        cfg.data.offset = None;
    })
}

/// `cfg` changed by `f`, checked again.
pub fn edit(cfg: Checked<RunConfig>, f: impl FnOnce(&mut RunConfig)) -> Checked<RunConfig> {
    let mut cfg = cfg.into_inner();
    f(&mut cfg);
    cfg.check().expect("edited config")
}

/// The exported weights of a run, as raw bytes.
pub fn exported(run_dir: &Path) -> Vec<u8> {
    std::fs::read(run_dir.join("model/model.safetensors")).expect("exported model")
}

/// The exported weights as floats, by tensor name.
pub fn exported_floats(run_dir: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = exported(run_dir);
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let v = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            (name, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Rows of metrics.jsonl of one split.
pub fn metric_rows(run_dir: &Path, split: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json line"))
        .filter(|v| v["split"] == split)
        .collect()
}
