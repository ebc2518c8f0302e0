//! `odpo train --config` end to end on real data: the paper's IMDB file and SmolLM2's tokenizer from the
//! shared folder (`ODPO_SHARED`; skipped, saying so, when it is absent, unless `ODPO_REQUIRE_SHARED=1`),
//! a tiny random GPT-2 as the model; then `--resume` with a longer run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../odpo-model/tests/common/env.rs"]
mod env;

use std::process::Command;

fn odpo_train(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_odpo")).arg("train").args(args).env("RUST_LOG", "warn").output().expect("run odpo");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The value of `name:` in `odpo train`'s closing lines.
fn line<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or_else(|| panic!("no `{name}` line in:\n{out}"))
}

#[test]
fn train_then_resume_from_the_command_line() {
    let Some(shared) = env::shared_dir() else { return };
    let data = shared.join("data/odpo-paper/imdb-sft-test.jsonl");
    let tokenizer = shared.join("models/smollm2-135m-instruct");
    let dir = std::env::temp_dir().join(format!("odpo-cli-tests/cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
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
    assert_eq!(line(&out, "steps:"), "3");
    for f in ["config.toml", "metrics.jsonl", "metrics.csv", "model/model.safetensors", "model/config.json", "model/tokenizer.json"] {
        assert!(run.join(f).is_file(), "{f} missing");
    }

    let (ok, out, err) = odpo_train(&["--resume", run.to_str().unwrap(), "--set", "train.max_steps=5"]);
    assert!(ok, "{err}");
    assert_eq!((line(&out, "resumed from:"), line(&out, "steps:")), ("step 3", "5"));
}

/// `--backend` is checked when the flags are read, naming the backends, before anything loads.
#[test]
fn an_unknown_backend_is_refused_with_the_list() {
    let (ok, _, err) = odpo_train(&["--backend", "cuad"]);
    assert!(!ok && err.contains("`cuad` is not a backend; expected one of: flex, wgpu, vulkan, metal, cuda, tch, tch-cuda"), "{err}");
    // A device index is part of the spec.
    let out = Command::new(env!("CARGO_BIN_EXE_odpo")).args(["generate", "--backend", "flux:1", "--model", "x", "--prompt", "y"]).output().expect("run odpo");
    assert!(String::from_utf8_lossy(&out.stderr).contains("`flux` is not a backend"));
}
