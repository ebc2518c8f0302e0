//! `odpo train --config` end to end on real data: the paper's IMDB file and SmolLM2's tokenizer from the
//! shared folder (`ODPO_SHARED`; skipped, saying so, when it is absent, unless `ODPO_REQUIRE_SHARED=1`),
//! a tiny random GPT-2 as the model; then `--resume` with a longer run. And `odpo logprobs` on the
//! real SmolLM2-135M-Instruct against transformers, and `odpo generate`'s greedy text.
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
    let dir = env::scratch("cli");
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

    // Rows longer than the model's 64 learned positions are refused before anything trains.
    let other = dir.join("too-long").display().to_string();
    let (ok, _, err) = odpo_train(&["--config", config.to_str().unwrap(), "--set", "data.max_length=96", "--set", &format!("output.dir={other:?}")]);
    assert!(!ok && !err.contains("panicked"), "{err}");
    assert!(err.contains("error: config: `data.max_length` (96) is more than the model holds: pair ") && err.contains("; the model has 64 (its learned position table"), "{err}");
    let needed: usize = err.split(" needs ").nth(1).and_then(|s| s.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{err}"));
    assert!(needed > 64 && err.trim_end().ends_with("set `data.max_length` to 64 or less"), "{err}");

    // `--matmul` overrides `train.matmul`, a routine of the cubecl backends' half-precision products:
    // refused in f32, and on flex, before anything is written.
    let (ok, _, err) = odpo_train(&["--config", config.to_str().unwrap(), "--matmul", "double_cyclic_mma"]);
    assert!(!ok && err.contains("error: config: `train.matmul` = \"double_cyclic_mma\" chooses the routine of bf16 / f16 products"), "{err}");
    let (ok, _, err) = odpo_train(&["--config", config.to_str().unwrap(), "--matmul", "double_cyclic_mma", "--set", "train.dtype=\"bf16\""]);
    assert!(!ok && err.contains("chooses a routine of the cubecl backends (cuda, vulkan, wgpu, metal); the device") && err.contains("has none"), "{err}");
    assert!(!run.exists());

    let (ok, out, err) = odpo_train(&["--config", config.to_str().unwrap(), "--backend", "flex"]);
    assert!(ok, "{err}");
    assert_eq!(line(&out, "steps:"), "3");
    for f in ["config.toml", "metrics.jsonl", "metrics.csv", "model/model.safetensors", "model/config.json", "model/tokenizer.json"] {
        assert!(run.join(f).is_file(), "{f} missing");
    }

    let (ok, out, err) = odpo_train(&["--resume", run.to_str().unwrap(), "--set", "train.max_steps=5"]);
    assert!(ok, "{err}");
    assert_eq!((line(&out, "resumed from:"), line(&out, "steps:")), ("step 3", "5"));

    // `odpo sample` from the exported model: without `--max-new-tokens`, 32 new tokens or what its
    // 64 learned positions leave after the longest prompt (here about 48 tokens), where 32 was
    // refused; a length that does not fit is refused naming the flag.
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, format!("{}\nshort prompt\n", "the film was good and ".repeat(10))).unwrap();
    let sample = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_odpo"))
            .args(["sample", "--k", "1", "--model"])
            .arg(run.join("model"))
            .arg("--prompts")
            .arg(&prompts)
            .arg("--out")
            .arg(dir.join("samples.jsonl"))
            .args(extra)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run odpo");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, out, err) = sample(&[]);
    assert!(ok && out.starts_with("2 responses to 2 prompts"), "{out}{err}");
    let (ok, _, err) = sample(&["--max-new-tokens", "40"]);
    assert!(!ok && err.contains("error: --max-new-tokens 40: a prompt of ") && err.contains("; the model has 64 (its learned position table); pass --max-new-tokens "), "{err}");
}

/// `odpo bench` on rows longer than a GPT-2's learned position table: an error, where the forward
/// pass would index past the table (a panic on the CPU, unchecked reads on a GPU).
#[test]
fn a_bench_longer_than_the_models_positions_is_refused() {
    let config = format!("{}/bench/configs/gpt2-tiny.json", env::repo_root().display());
    for (command, seq, rows) in [("bench", "257", "--pairs"), ("bench-forward", "300", "--batch")] {
        let out = Command::new(env!("CARGO_BIN_EXE_odpo")).args([command, "--config", &config, "--seq", seq, rows, "1"]).output().expect("run odpo");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {err}");
        assert!(err.contains(&format!("needs {seq} positions; the model has 256 (its learned position table")) && !err.contains("panicked"), "{command}: {err}");
    }
}

/// A model config no model can have, in the commands that build a random model from it: the error
/// names that file and the key, not the random source of the weights.
#[test]
fn a_random_models_bad_sizes_name_its_config_file() {
    let tiny = std::fs::read_to_string(env::repo_root().join("bench/configs/gpt2-tiny.json")).unwrap();
    let dir = env::scratch("cli-bad-sizes");
    let config = dir.join("gpt2-three-heads.json");
    std::fs::write(&config, tiny.replace("\"n_head\": 4", "\"n_head\": 3")).unwrap();
    let config = config.to_str().unwrap();
    for args in [
        vec!["bench", "--config", config, "--pairs", "1", "--seq", "16"],
        vec!["bench-forward", "--config", config, "--batch", "1", "--seq", "16"],
        vec!["bench-generate", "--config", config, "--batches", "1"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_odpo")).args(&args).output().expect("run odpo");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(&format!("{config}: n_embd (128) must be a multiple of n_head (3)")) && !err.contains("random init"), "{args:?}: {err}");
    }
}

/// `odpo bench --kernels` counts the launches of the cubecl backends; on flex, which launches
/// none, it is an error that says so rather than an empty census.
#[test]
fn a_kernel_census_on_flex_is_refused() {
    let config = format!("{}/bench/configs/gpt2-tiny.json", env::repo_root().display());
    for flag in ["--kernels", "--kernel-times"] {
        let out = Command::new(env!("CARGO_BIN_EXE_odpo")).args(["bench", "--config", &config, "--pairs", "1", "--seq", "16", "--backend", "flex", flag]).output().expect("run odpo");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {err}");
        assert!(err.contains("kernels") && err.contains("counts the kernels of the cubecl backends") && !err.contains("panicked"), "{flag}: {err}");
    }
}

/// Counts of zero, where a command needs at least one, are refused when the flags are read (a zero
/// batch crashed the CPU backend); a share of held-out prompts must leave both sides members; a
/// missing file is named with its cause once.
#[test]
fn zero_counts_and_missing_files_are_refused_plainly() {
    let config = format!("{}/bench/configs/gpt2-tiny.json", env::repo_root().display());
    let odpo = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_odpo")).args(args).output().expect("run odpo");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    for (args, flag) in [
        (vec!["bench", "--config", &config, "--pairs", "0"], "--pairs <PAIRS>"),
        (vec!["bench-forward", "--config", &config, "--batch", "0"], "--batch <BATCH>"),
        (vec!["bench-forward", "--config", &config, "--seq", "0"], "--seq <SEQ>"),
        (vec!["sample", "--model", "m", "--prompts", "p", "--out", "o", "--k", "0"], "--k <K>"),
    ] {
        let (code, err) = odpo(&args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.starts_with(&format!("error: invalid value '0' for '{flag}': expected at least 1, got 0")), "{args:?}: {err}");
    }
    let (code, err) = odpo(&["bench-generate", "--config", &config, "--batches", "1,0"]);
    assert_eq!((code, err.trim()), (Some(2), "error: --batches: expected at least 1, got 0"));
    for share in ["0", "1", "1.5"] {
        let (code, err) = odpo(&["reward-model", "--data", "d", "--backbone", "b", "--out", "o", "--heldout", share]);
        assert!(code == Some(2) && err.contains("expected a share between 0 and 1 (both excluded)"), "{share}: {err}");
    }
    let dir = env::scratch("cli-missing");
    let missing = dir.join("no-such-run.toml");
    let (code, err) = odpo(&["train", "--config", missing.to_str().unwrap()]);
    assert_eq!((code, err.trim()), (Some(2), format!("error: {}: No such file or directory (os error 2)", missing.display()).as_str()));
    // A prompt file with no prompt: an error, where sampling nothing wrote an empty file and succeeded.
    let blank = dir.join("blank.txt");
    std::fs::write(&blank, "\n  \n").unwrap();
    let (code, err) = odpo(&["sample", "--model", "m", "--prompts", blank.to_str().unwrap(), "--out", "o"]);
    assert_eq!((code, err.trim()), (Some(2), format!("error: {}: no prompts (every line is blank); expected one prompt a line", blank.display()).as_str()));
    // Too little data to fit a reward model: the flag and its file, before the backbone loads.
    let scored = dir.join("scored.jsonl");
    std::fs::write(&scored, (0..3).map(|i| format!("{{\"prompt\": \"a\", \"text\": \"b{i}\", \"reward\": 1.0}}\n")).collect::<String>()).unwrap();
    let pairs = dir.join("pairs.jsonl");
    std::fs::write(&pairs, "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n").unwrap();
    // Gzipped, as the hub ships hh-rlhf (no prompt: the start both sides share): its format read
    // from the name before `.gz`.
    let zipped = dir.join("hh.jsonl.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, b"{\"chosen\": \"Human: hi Assistant: hello\", \"rejected\": \"Human: hi Assistant: go\"}\n").unwrap();
    std::fs::write(&zipped, gz.finish().unwrap()).unwrap();
    for (flag, file, what) in [("--data", &scored, "3 scored texts"), ("--pairs", &pairs, "1 pairs"), ("--pairs", &zipped, "1 pairs")] {
        let (code, err) = odpo(&["reward-model", flag, file.to_str().unwrap(), "--backbone", "no-such-model", "--out", "o"]);
        assert_eq!((code, err.trim()), (Some(2), format!("error: {flag} {}: {what}; at least 10 are needed to fit a reward model", file.display()).as_str()));
    }
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

/// A tokenizer that is not the model's, whose ids run past the model's vocabulary, is refused by
/// `logprobs` and `generate` naming the token and the vocabulary; the forward pass used to panic
/// indexing past the embedding.
#[test]
fn token_ids_past_the_vocabulary_are_refused() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../odpo-model/tests/fixtures");
    // A tiny GPT-2 of 256 tokens, and a 500-token byte-level vocabulary.
    let (model, tokenizer) = (fixtures.join("gpt2"), fixtures.join("gguf/vocab/llama-bpe.gguf"));
    for command in [&["logprobs", "--prompt", "It's 2024 and", "--completion", " the weather holds"][..], &["generate", "--prompt", "It's 2024 and", "--max-new-tokens", "4"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_odpo")).args(&command[..1]).arg("--model").arg(&model).arg("--tokenizer").arg(&tokenizer).args(&command[1..]).env("RUST_LOG", "warn").output().expect("run odpo");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && !err.contains("panicked"), "{}: {err}", command[0]);
        assert!(err.contains("past the model's vocabulary of 256 (ids 0 to 255): the tokenizer, or the data's tokens, are not the model's"), "{}: {err}", command[0]);
    }
}

/// `odpo reward-model --pairs` on the paper's TL;DR pairs (400 of them, every k-th; SmolLM2 as the
/// backbone): a Bradley–Terry head that orders held-out posts' pairs better than chance and than a
/// coin's log-loss, with the ridge baseline beside; the pairs it writes with its scores load with an
/// offset, and the saved model gives those scores again.
#[test]
fn reward_model_on_pairs_scores_them_for_offsets() {
    use odpo_pipeline::RewardModel;
    let Some(shared) = env::shared_dir() else { return };
    let dir = env::scratch("cli-bt");
    let (model, scored) = (dir.join("model"), dir.join("scored.jsonl"));
    let tldr = shared.join("data/odpo-paper/tldr-sft-train-rel.json");
    let gguf = shared.join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let out = Command::new(env!("CARGO_BIN_EXE_odpo"))
        .args(["reward-model", "--pairs"])
        .arg(&tldr)
        .args(["--limit", "400", "--max-length", "48", "--keep", "end", "--backbone"])
        .arg(&gguf)
        .arg("--out")
        .arg(&model)
        .arg("--scored-out")
        .arg(&scored)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run odpo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    println!("{stdout}");

    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model.join("reward.json")).unwrap()).unwrap();
    assert_eq!(meta["objective"], "bradley-terry");
    assert_eq!((meta["pooling"].as_str(), meta["keep"].as_str()), (Some("last"), Some("end")));
    let r = &meta["pair_report"];
    let (acc, loss) = (r["accuracy"].as_f64().unwrap(), r["log_loss"].as_f64().unwrap());
    assert_eq!(r["train_pairs"].as_u64().unwrap() + r["heldout_pairs"].as_u64().unwrap(), 400);
    assert!(acc > 0.58 && loss < std::f64::consts::LN_2, "held-out accuracy {acc}, log-loss {loss}");
    assert!(r["regression_accuracy"].as_f64().is_some(), "TL;DR pairs carry ratings: the ridge baseline runs");

    // The written pairs: each ordered by the model, loadable with the paper's offset.
    let data_toml = dir.join("scored.toml");
    std::fs::write(&data_toml, format!("path = {:?}\nformat = \"jsonl\"\noffset = {{ function = \"log\", alpha = 1.0 }}\neval_fraction = 0.0\n", scored.display().to_string())).unwrap();
    let loaded = odpo_data::load(&odpo_data::DataConfig::from_toml_file(&data_toml).unwrap()).unwrap();
    let written = std::fs::read_to_string(&scored).unwrap().lines().count();
    assert!(written > 200 && loaded.pairs.len() == written, "{written} written, {} loaded", loaded.pairs.len());
    assert!(stdout.contains(&format!("{written} pairs with the model's scores")), "{stdout}");
    for p in &loaded.pairs {
        let (w, l) = (p.score_chosen.unwrap(), p.score_rejected.unwrap());
        assert!(w > l && (p.offset - (w - l).ln()).abs() < 1e-9, "pair {}: {w} {l} {}", p.id, p.offset);
    }
    // The saved model scores the written texts as the fit did.
    let device = odpo_model::backend::device("flex").unwrap();
    let again = odpo_pipeline::learned::LearnedReward::load(&model, &device).unwrap();
    let first: Vec<_> = loaded.pairs.iter().take(4).collect();
    let prompts: Vec<String> = first.iter().flat_map(|p| [p.prompt.flat(), p.prompt.flat()]).collect();
    let texts: Vec<String> = first.iter().flat_map(|p| [p.chosen.flat(), p.rejected.flat()]).collect();
    let s = again.score(&prompts, &texts).unwrap();
    for (k, p) in first.iter().enumerate() {
        for (got, want) in [(s[2 * k], p.score_chosen.unwrap()), (s[2 * k + 1], p.score_rejected.unwrap())] {
            assert!((got - want).abs() < 1e-4 * want.abs().max(1.0), "pair {}: {got} against the fit's {want}", p.id);
        }
    }
}

/// `odpo logprobs` on the real SmolLM2-135M-Instruct (the shared folder's GGUF file) gives the
/// completion log-probability HF transformers computed for each reference case, after the model's
/// chat template; and so does the GGUF file alone, with no tokenizer.json beside it (its own
/// vocabulary and chat template), and the model written back out by `odpo export-gguf`.
#[test]
fn logprobs_of_a_completion_match_transformers() {
    let Some(dir) = env::shared_path("models/smollm2-135m-instruct") else { return };
    let refs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let model = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let scratch = env::scratch("cli-gguf-alone");
    let alone = scratch.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    std::os::unix::fs::symlink(&model, &alone).unwrap();
    // The model written back out as an F32 GGUF file with its tokenizer (`odpo export-gguf`).
    let exported = scratch.join("exported.gguf");
    let out = Command::new(env!("CARGO_BIN_EXE_odpo"))
        .args(["export-gguf", "--dtype", "f32", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(&exported)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run odpo");
    assert!(out.status.success(), "odpo export-gguf failed:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("exported.gguf"));
    let cases = refs["cases"].as_array().unwrap();
    for (case, model) in cases.iter().map(|c| (c, &model)).chain([(&cases[0], &alone), (&cases[1], &exported)]) {
        let (user, completion) = (case["user"].as_str().unwrap(), case["completion_text"].as_str().unwrap());
        let out = Command::new(env!("CARGO_BIN_EXE_odpo"))
            .args(["logprobs", "--model"])
            .arg(model)
            .args(["--chat", "--json", "--prompt", user, "--completion", completion])
            .env("RUST_LOG", "warn")
            .output()
            .expect("run odpo");
        assert!(out.status.success(), "odpo logprobs failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got["prompt_tokens"], case["prompt_len"], "{user}");
        assert_eq!(got["completion_tokens"], case["completion_len"], "{user}");
        let (sum, want) = (got["completion_logprob_sum"].as_f64().unwrap(), case["completion_logprob_sum"].as_f64().unwrap());
        eprintln!("{user}: {sum:.5} (transformers {want:.5})");
        assert!((sum - want).abs() < 2e-3, "{user}: log p(completion) {sum} against transformers' {want}");
    }
}

/// `odpo generate` prints the text as it is generated: greedy decoding of the real SmolLM2-135M-Instruct
/// prints transformers' greedy continuation, the same text `--json` gives.
#[test]
fn generate_prints_transformers_greedy_text() {
    let Some(dir) = env::shared_path("models/smollm2-135m-instruct") else { return };
    let refs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let (user, want) = (refs["greedy"]["user"].as_str().unwrap(), refs["greedy"]["text"].as_str().unwrap());
    let generate = |json: bool| {
        let out = Command::new(env!("CARGO_BIN_EXE_odpo"))
            .args(["generate", "--model"])
            .arg(dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"))
            .args(["--chat", "--greedy", "--max-new-tokens", "24", "--prompt", user])
            .args(json.then_some("--json"))
            .env("RUST_LOG", "warn")
            .output()
            .expect("run odpo");
        assert!(out.status.success(), "odpo generate failed:\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(generate(false), format!("{want}\n"));
    let json: serde_json::Value = serde_json::from_str(&generate(true)).unwrap();
    assert_eq!(json["text"], want);
}

/// `--matmul` takes the names of `odpo_kernels::MATMUL_ROUTINES` and says which when given another;
/// `odpo bench --matmul-routines` times the cubecl backends' routines, and on flex, which has none,
/// is an error that says so.
#[test]
fn matmul_routines_are_named_and_refused_where_there_are_none() {
    let config = format!("{}/bench/configs/gpt2-tiny.json", env::repo_root().display());
    let bench = ["bench", "--config", &config, "--pairs", "1", "--seq", "16", "--backend", "flex"];
    let run = |extra: &[&str]| Command::new(env!("CARGO_BIN_EXE_odpo")).args(bench).args(extra).output().expect("run odpo");
    let out = run(&["--matmul", "fastest"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("unknown matmul routine `fastest`") && err.contains("double_cyclic_mma") && err.contains("specialized_tma_mma"), "{err}");
    let out = run(&["--matmul-routines", "auto,fastest"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--matmul-routines: unknown matmul routine `fastest`"), "{err}");
    let out = run(&["--matmul-routines", "all"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("times the routines of the cubecl backends") && !err.contains("panicked"), "{err}");
    // A routine on flex changes nothing: the bench runs.
    let out = run(&["--matmul", "double_cyclic_mma", "--warmup", "0", "--repeats", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["matmul"], "double_cyclic_mma");
}
