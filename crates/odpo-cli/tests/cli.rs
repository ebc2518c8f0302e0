//! The `odpo-train` binary end to end on real data: the paper's IMDB file and SmolLM2's tokenizer from
//! `../shared` (skipped when absent), a tiny random GPT-2 as the model; then `--resume` with a longer run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

fn odpo_train(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_odpo-train")).args(args).env("RUST_LOG", "warn").output().expect("run odpo-train");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn train_then_resume_from_the_command_line() {
    let data = shared().join("data/odpo-paper/imdb-sft-test.jsonl");
    let tokenizer = shared().join("models/smollm2-135m-instruct");
    if !data.is_file() || !tokenizer.join("tokenizer.json").is_file() {
        eprintln!("skipped: ../shared is not there");
        return;
    }
    let dir = common::temp_dir("cli");
    let model = dir.join("tiny");
    std::fs::create_dir_all(&model).unwrap();
    let cfg = serde_json::json!({"architectures": ["GPT2LMHeadModel"], "vocab_size": 49152, "n_positions": 64, "n_embd": 16, "n_layer": 1, "n_head": 2});
    std::fs::write(model.join("config.json"), cfg.to_string()).unwrap();
    let run = dir.join("run");
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[model]
path = "{model}"
tokenizer = "{tokenizer}"
random_init = true
[data]
path = "{data}"
format = "scored-jsonl"
separator = " "
allow_empty_completions = true
pairing = {{ strategy = "best-vs-worst" }}
offset = {{ alpha = 0.5 }}
max_length = 48
max_prompt_length = 16
eval_fraction = 0.1
[loss]
beta = 0.7
[optim]
lr = 1e-3
warmup_steps = 1
[train]
batch_size = 4
micro_batch_size = 2
max_steps = 3
reference = "cached"
[eval]
max_pairs = 8
[output]
dir = "{run}"
cache_dir = "{cache}"
progress = false
"#,
            model = model.display(),
            tokenizer = tokenizer.display(),
            data = data.display(),
            run = run.display(),
            cache = dir.join("cache").display()
        ),
    )
    .unwrap();

    let (ok, _, err) = odpo_train(&["--config", config.to_str().unwrap(), "--set", "optim.lrr=1"]);
    assert!(!ok && err.contains("--set optim.lrr=1") && err.contains("unknown field `lrr`"), "{err}");

    let (ok, out, err) = odpo_train(&["--config", config.to_str().unwrap(), "--backend", "flex"]);
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
    assert_eq!(summary["steps"], 3);
    for f in ["config.toml", "metrics.jsonl", "metrics.csv", "model/model.safetensors", "model/config.json", "model/tokenizer.json"] {
        assert!(run.join(f).is_file(), "{f} missing");
    }

    let (ok, out, err) = odpo_train(&["--resume", run.to_str().unwrap(), "--set", "train.max_steps=5"]);
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
    assert_eq!((summary["resumed_from"].as_u64(), summary["steps"].as_u64()), (Some(3), Some(5)));
}
