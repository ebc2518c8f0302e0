//! SFT on every response of a scored file (`train.sft_on = "responses"`), and its config checks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{scratch, tiny_model};
use odpo_model::tokenizer::Tokenizer;
use odpo_trainer::RunData;

fn tokenizer_fixture() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../odpo-model/tests/fixtures/tokenizer/tiny"))
}

/// Three prompts with three scored responses each, over the fixture tokenizer's words.
fn scored_file(dir: &Path) -> PathBuf {
    let rows = [
        ("hello", "world", 0.1),
        ("hello", "hello world", 0.5),
        ("hello", "world world", 1.5),
        ("world", "hello", 0.2),
        ("world", "hello hello", 0.2),
        ("world", "world", 1.9),
        ("hello world", "world hello", 0.3),
        ("hello world", "hello", 1.1),
        ("hello world", "world", 1.7),
    ];
    let text: String = rows
        .iter()
        .map(|(p, t, r)| serde_json::json!({"prompt": p, "text": t, "reward": r}).to_string() + "\n")
        .collect();
    let path = dir.join("scored.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

/// A run config for SFT on the tiny model; `data` and `train` are TOML lines for those tables.
fn run_config(model: &Path, run: &Path, data: &str, train: &str) -> Result<odpo_trainer::config::Checked<odpo_trainer::RunConfig>, odpo_trainer::TrainError> {
    let text = format!(
        "[model]\npath = \"{}\"\nrandom_init = true\n[data]\n{data}\nmax_length = 32\nmax_prompt_length = 16\n\
         [optim]\noptimizer = \"adamw\"\nlr = 3e-3\nweight_decay = 0.0\n[train]\n{train}\n[output]\ndir = \"{}\"\nprogress = false\n",
        model.display(),
        run.display()
    );
    odpo_trainer::RunConfig::from_toml_str(&text, "test.toml", &[])
}

#[test]
fn every_response_becomes_an_sft_sequence() {
    let dir = scratch("sft-responses");
    let data_path = scored_file(&dir);
    let model = tiny_model(&dir);
    let data = format!("path = \"{}\"\nformat = \"scored-jsonl\"\nseparator = \" \"\neval_fraction = 0.34", data_path.display());
    let train = "stage = \"sft\"\nsft_on = \"responses\"\nbatch_size = 3\nmicro_batch_size = 3\nmax_steps = 12";
    let cfg = run_config(&model, &dir.join("run"), &data, train).unwrap();

    let tok = Tokenizer::from_dir(&tokenizer_fixture()).unwrap();
    let data = RunData::load_responses(&cfg.data, &tok).unwrap();
    // All nine responses, ties included (an SFT sequence has no partner), split by prompt.
    assert_eq!(data.train.len() + data.eval.len(), 9);
    assert_eq!(data.eval.len() % 3, 0, "a prompt's responses stay on one side of the split");
    let eos = tok.eos_token_id().unwrap();
    for p in data.train.iter().chain(&data.eval) {
        assert_eq!(p.chosen.last(), Some(&eos));
        assert!(!p.prompt.is_empty());
    }

    // The same data through the whole trainer lowers the NLL.
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tokenizer_fixture().join(f), model.join(f)).unwrap();
    }
    let summary = odpo_trainer::train(&cfg, &odpo_model::backend::device("flex").unwrap(), false).unwrap();
    let (first, last) = summary.train_loss.unwrap();
    assert!(last < first, "SFT NLL {first} -> {last}");
}

#[test]
fn responses_need_the_sft_stage_and_a_scored_format() {
    let dir = scratch("sft-responses-config");
    let model = tiny_model(&dir);
    let scored = "path = \"x.jsonl\"\nformat = \"scored-jsonl\"";
    let msg = run_config(&model, &dir, scored, "sft_on = \"responses\"").unwrap_err().to_string();
    assert!(msg.contains("train.sft_on") && msg.contains("applies to `train.stage = \"sft\"` only"), "{msg}");

    let pairs = "path = \"x.jsonl\"\nformat = \"jsonl\"";
    let msg = run_config(&model, &dir, pairs, "stage = \"sft\"\nsft_on = \"responses\"").unwrap_err().to_string();
    assert!(msg.contains("needs a scored format (scored-jsonl, tldr-json); `data.format` is `jsonl`"), "{msg}");
}
