//! The `odpo` binary stopped by a batch scheduler: `odpo train` sent SIGTERM finishes its step, writes
//! a checkpoint, says how to resume and exits with status 75; `--resume` then continues from there;
//! a second run on the live folder is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../../odpo-model/tests/common/env.rs"]
mod env;

const ODPO: &str = env!("CARGO_BIN_EXE_odpo");

/// A tiny random GPT-2 over the two-word fixture tokenizer, 64 pairs and a run config, in `dir`.
fn setup(dir: &Path, max_steps: usize) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    let tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("../odpo-model/tests/fixtures/tokenizer/tiny/tokenizer.json");
    std::fs::copy(tok, model.join("tokenizer.json")).unwrap();
    let config = serde_json::json!({"architectures": ["GPT2LMHeadModel"], "vocab_size": 6, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "bos_token_id": 0, "eos_token_id": 1});
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    write_pairs(dir, 64);
    let toml = format!(
        r#"[model]
path = "{model}"
random_init = true
[data]
path = "{data}"
format = "jsonl"
max_length = 16
max_prompt_length = 8
eval_fraction = 0.1
[loss]
beta = 0.5
[optim]
optimizer = "adamw"
lr = 1e-3
[train]
batch_size = 4
max_steps = {max_steps}
checkpoint_every = 100000
log_every = 1
[eval]
every = 0
[output]
dir = "{run}"
progress = false
export = false
"#,
        model = model.display(),
        data = dir.join("pairs.jsonl").display(),
        run = dir.join("run").display()
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// `n` pairs of one to four words in `dir/pairs.jsonl`.
fn write_pairs(dir: &Path, n: usize) {
    let rows: Vec<String> = (0..n)
        .map(|i| {
            let words = |k: usize, w: &str| vec![w; 1 + (i + k) % 4].join(" ");
            serde_json::json!({"prompt": words(0, "hello"), "chosen": words(1, "world"), "rejected": words(2, "hello")}).to_string()
        })
        .collect();
    std::fs::write(dir.join("pairs.jsonl"), rows.join("\n")).unwrap();
}

/// The tiny GPT-2 of [`setup`] trained one step and exported: a model folder with its tokenizer.
fn tiny_model(dir: &Path) -> PathBuf {
    let config = setup(dir, 1);
    let text = std::fs::read_to_string(&config).unwrap().replace("export = false", "export = true");
    std::fs::write(&config, text).unwrap();
    let out = Command::new(ODPO).args(["train", "--config", config.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dir.join("run").join("model")
}

/// Waits until `journal` holds more than `rows` rows (below its header line).
fn wait_for_rows(journal: &Path, rows: usize) {
    let t = Instant::now();
    while std::fs::read_to_string(journal).map(|t| t.lines().count()).unwrap_or(0) <= rows + 1 {
        assert!(t.elapsed() < Duration::from_secs(300), "{}: no batch was journaled", journal.display());
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A scratch folder with two working folders in it: one for the run that is stopped and resumed,
/// one for the run that is not.
fn stopped_and_whole(name: &str) -> (env::Scratch, PathBuf, PathBuf) {
    let dir = env::scratch(name);
    let (stopped, whole) = (dir.join("stopped"), dir.join("whole"));
    for d in [&stopped, &whole] {
        std::fs::create_dir_all(d).unwrap();
    }
    (dir, stopped, whole)
}

/// `odpo COMMAND ARGS` in the working folder `cwd`.
fn odpo_in(cwd: &Path, command: &str, args: &[&str]) -> Command {
    let mut c = Command::new(ODPO);
    c.current_dir(cwd).arg(command).args(args);
    c
}

fn start(args: &[&str]) -> Child {
    Command::new(ODPO).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("odpo")
}

/// Waits until the run folder's metrics have a row at step `step` or later.
fn wait_for_step(run: &Path, step: u64) {
    let start = Instant::now();
    loop {
        let logged = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default().lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).filter_map(|v| v["step"].as_u64()).max();
        if logged.is_some_and(|s| s >= step) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "odpo did not reach step {step}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends `child` SIGTERM and waits for it: it must exit with status 75 (stopped on request, work
/// kept). Its stderr.
fn stop(child: Child) -> String {
    kill("TERM", child.id());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(75), "{err}");
    err
}

fn kill(signal: &str, pid: u32) {
    assert!(Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().unwrap().success());
}

#[test]
fn sigterm_checkpoints_says_how_to_resume_and_exits_75() {
    let dir = env::scratch("cli-sigterm");
    let config = setup(&dir, 100_000);
    let run = dir.join("run");
    let child = start(&["train", "--config", config.to_str().unwrap()]);
    wait_for_step(&run, 3);

    // A second run on the live folder is refused, naming it.
    let second = Command::new(ODPO).args(["train", "--resume", run.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{err}");
    assert!(err.contains("in use by another run"), "{err}");

    let err = stop(child);
    assert!(err.contains(&format!("resume with: odpo train --resume {}", run.display())), "{err}");
    let checkpoints: Vec<_> = std::fs::read_dir(run.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(checkpoints.len(), 1, "{checkpoints:?}");
    let step: usize = checkpoints[0].trim_start_matches("step-").parse().unwrap();
    assert!(step >= 3, "checkpoint {checkpoints:?}");

    // The resumed run continues from that step and finishes.
    let out = Command::new(ODPO).args(["train", "--resume", run.to_str().unwrap(), "--set", &format!("train.max_steps={}", step + 2)]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("steps:        {}", step + 2)), "{text}");
}

/// A stop asked for while the reference log-probs are computed (`train.reference = "cached"`): the
/// rows computed so far are kept beside the cache, the run exits 75 saying how to resume, and the
/// resumed run goes on from them to the cache an unstopped run writes, bit for bit.
#[test]
fn sigterm_during_the_reference_cache_keeps_the_rows_computed() {
    let dir = env::scratch("cli-sigterm-refcache");
    let config = setup(&dir, 2);
    write_pairs(&dir, 3000);
    let text = std::fs::read_to_string(&config).unwrap().replace("[eval]\n", "[eval]\nbatch_size = 2\n").replace("max_steps = 2\n", "max_steps = 2\nreference = \"cached\"\n");
    let (run, cache, whole) = (dir.join("run"), dir.join("cache"), dir.join("cache-whole"));
    let config_for = |name: &str, cache: &Path| {
        let path = dir.join(name);
        std::fs::write(&path, format!("{text}cache_dir = \"{}\"\n", cache.display())).unwrap();
        path
    };
    let (stopped, unstopped) = (config_for("stopped.toml", &cache), config_for("whole.toml", &whole));

    // The run folder's config is written before the model loads: the signal lands before the
    // first of the 1,500 batches of reference log-probs is done, and stops the run at its end.
    let child = start(&["train", "--config", stopped.to_str().unwrap()]);
    let t = Instant::now();
    while !run.join("config.toml").exists() {
        assert!(t.elapsed() < Duration::from_secs(60), "odpo did not start");
        std::thread::sleep(Duration::from_millis(1));
    }
    let err = stop(child);
    assert!(err.contains(&format!("resume with: odpo train --resume {}", run.display())), "{err}");
    let files = |dir: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir).map(|d| d.map(|e| e.unwrap().path()).collect()).unwrap_or_default();
        v.sort();
        v
    };
    let partial = files(&cache);
    assert_eq!(partial.len(), 1, "{partial:?}");
    assert!(partial[0].to_string_lossy().ends_with(".partial.json"), "{partial:?}");
    let kept: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&partial[0]).unwrap()).unwrap();
    let n = kept["rows"].as_array().unwrap().len();
    assert!(n > 0 && n.is_multiple_of(2) && n < 3000, "{n} rows kept");

    // Resumed, it reads those rows, computes the rest and removes the partial file.
    let out = Command::new(ODPO).args(["train", "--resume", run.to_str().unwrap()]).env("RUST_LOG", "info").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("reference log-probs: {n} of ")), "{err}");
    let out = Command::new(ODPO).args(["train", "--config", unstopped.to_str().unwrap(), "--set", &format!("output.dir={:?}", dir.join("run-whole").display().to_string())]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (resumed, whole) = (files(&cache), files(&whole));
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert_eq!(resumed[0].file_name(), whole[0].file_name());
    assert_eq!(std::fs::read(&resumed[0]).unwrap(), std::fs::read(&whole[0]).unwrap());
}

/// `odpo sample` stopped by a signal keeps its finished batches in a journal beside the samples
/// file and exits 75 saying how to go on; run again, it reads them, samples the rest and writes the
/// samples a run never stopped writes, byte for byte.
#[test]
fn sigterm_while_sampling_keeps_the_finished_batches() {
    let dir = env::scratch("cli-sigterm-sample");
    let model = tiny_model(&dir);
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, (0..4000).map(|i| format!("{}\n", vec!["hello"; 1 + i % 4].join(" "))).collect::<String>()).unwrap();
    // 4,000 prompts × 16 responses: 250 generation batches of 256.
    let (total, batch) = (64_000, 256);
    let sample = |out: &Path| {
        let mut c = Command::new(ODPO);
        c.args(["sample", "--k", "16", "--max-new-tokens", "8", "--seed", "3", "--model"]).arg(&model).arg("--prompts").arg(&prompts).arg("--out").arg(out);
        c
    };
    let (stopped, whole) = (dir.join("stopped.jsonl"), dir.join("whole.jsonl"));
    let journal = dir.join("stopped.jsonl.journal");
    let lines = || std::fs::read_to_string(&journal).map(|t| t.lines().count()).unwrap_or(0);

    // The signal lands once the first batch is in the journal (a header line, then a line a response).
    let child = sample(&stopped).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_rows(&journal, batch - 1);
    let err = stop(child);
    assert!(err.contains(&format!("responses, kept in {}", journal.display())), "{err}");
    assert!(err.contains("resume by running the same command again"), "{err}");
    assert!(!stopped.exists());
    let kept = lines() - 1;
    assert!(kept > 0 && kept.is_multiple_of(batch) && kept < total, "{kept} responses kept");

    // A part batch ending in a torn line (a kill during an append) is dropped. Its responses are
    // none the sampler draws: kept, they would show in the samples.
    let part = format!("{{\"prompt_index\": {}, \"tokens\": [2, 2]}}\n", kept / 16).repeat(3);
    std::fs::write(&journal, format!("{}{part}{{\"prompt_index\": 1", std::fs::read_to_string(&journal).unwrap())).unwrap();
    let out = sample(&stopped).env("RUST_LOG", "info").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("sampling: {kept} of {total} responses read from {}", journal.display())), "{err}");
    assert!(!journal.exists(), "the journal is removed once the samples are written");
    let out = sample(&whole).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (resumed, unstopped) = (std::fs::read(&stopped).unwrap(), std::fs::read(&whole).unwrap());
    assert_eq!(resumed.iter().filter(|&&b| b == b'\n').count(), total);
    assert!(resumed == unstopped, "the resumed samples differ from an unstopped run's");
}

/// The built-in pipeline stopped while it samples: `train --resume` reads the journal (the SFT
/// stage, finished, exports the same model again on the way) and the pipeline writes the samples
/// of a pipeline never stopped.
#[test]
fn sigterm_while_the_pipeline_samples_resumes_from_the_journal() {
    let (_dir, stopped, whole) = stopped_and_whole("cli-sigterm-pipeline-sample");
    // 400 prompts × 64 responses: 100 batches.
    let train = |cwd: &Path, args: &[&str]| odpo_in(cwd, "train", args);
    let journal = stopped.join("runs/default/data/samples.jsonl.journal");
    let child = train(&stopped, &["--set", "sample.k=64"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_rows(&journal, 255);
    let err = stop(child);
    assert!(err.contains("resume with: odpo train --resume runs/default"), "{err}");

    let out = train(&stopped, &["--resume", "runs/default"]).env("RUST_LOG", "info").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("of 25600 responses read from runs/default/data/samples.jsonl.journal"), "{err}");
    let out = train(&whole, &["--set", "sample.k=64"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let samples = |d: &Path| std::fs::read(d.join("runs/default/data/samples.jsonl")).unwrap();
    assert!(samples(&stopped) == samples(&whole), "the resumed pipeline's samples differ from an unstopped one's");
}

/// `odpo reward-model` stopped while the backbone computes its features: the finished batches are
/// kept in `OUT/features.journal`, the run exits 75; run again, it reads them, computes the rest
/// and fits the head a fit never stopped fits, byte for byte, then removes the journal. Then the
/// same for `odpo sample` scoring with that reward model.
#[test]
fn sigterm_during_a_reward_models_features_keeps_the_finished_batches() {
    let dir = env::scratch("cli-sigterm-reward-model");
    let model = tiny_model(&dir);
    // 20,000 distinct texts (15 words spelling `i` in binary) over 20 prompts, 1,250 batches of 16;
    // the reward counts the text's `world`s.
    let data = dir.join("scored.jsonl");
    let rows: String = (0..20_000)
        .map(|i: usize| {
            let words: Vec<&str> = (0..15).map(|k| if (i >> k) & 1 == 1 { "world" } else { "hello" }).collect();
            let reward = words.iter().filter(|w| **w == "world").count();
            format!("{}\n", serde_json::json!({"prompt": vec!["hello"; 1 + i % 20].join(" "), "text": words.join(" "), "reward": reward}))
        })
        .collect();
    std::fs::write(&data, rows).unwrap();
    let fit = |out: &Path| {
        let mut c = Command::new(ODPO);
        c.args(["reward-model", "--max-length", "48", "--data"]).arg(&data).arg("--backbone").arg(&model).arg("--out").arg(out);
        c
    };
    let (stopped, whole) = (dir.join("stopped"), dir.join("whole"));
    let journal = stopped.join("features.journal");
    let child = fit(&stopped).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_rows(&journal, 15);
    let err = stop(child);
    assert!(err.contains("stopped on request while computing the backbone's features, after ") && err.contains(&format!("texts, kept in {}", journal.display())), "{err}");
    assert!(!stopped.join("head.json").exists());
    let kept = std::fs::read_to_string(&journal).unwrap().lines().count() - 1;
    assert!(kept > 0 && kept.is_multiple_of(16) && kept < 20_000, "{kept} texts kept");

    let out = fit(&stopped).env("RUST_LOG", "info").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("features: {kept} of 20000 texts read from {}", journal.display())), "{err}");
    assert!(!journal.exists(), "the journal is removed once the model is saved");
    let out = fit(&whole).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let head = |d: &Path| std::fs::read(d.join("head.json")).unwrap();
    assert!(head(&stopped) == head(&whole), "the resumed fit's head differs from an unstopped fit's");

    // `odpo sample` scored by that reward model, stopped while the backbone scores its 16,000
    // responses: the scores' finished batches are kept beside the samples file (the responses
    // in theirs), and the same command goes on from both to the samples of a run never stopped.
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, (0..2000).map(|i| format!("{}\n", vec!["hello"; 1 + i % 20].join(" "))).collect::<String>()).unwrap();
    let reward = format!("learned:{}", whole.display());
    let sample = |out: &Path| {
        let mut c = Command::new(ODPO);
        c.args(["sample", "--k", "8", "--max-new-tokens", "8", "--reward", &reward, "--model"]).arg(&model).arg("--prompts").arg(&prompts).arg("--out").arg(out);
        c
    };
    let (stopped, whole) = (dir.join("stopped.jsonl"), dir.join("whole.jsonl"));
    let scores = dir.join("stopped.jsonl.scores.journal");
    let child = sample(&stopped).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_rows(&scores, 15);
    let err = stop(child);
    assert!(err.contains(&format!("texts, kept in {}", scores.display())), "{err}");
    let out = sample(&stopped).env("RUST_LOG", "info").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("sampling: 16000 of 16000 responses read from") && err.contains(" of 16000 texts read from "), "{err}");
    assert!(!scores.exists() && !dir.join("stopped.jsonl.journal").exists(), "the journals are removed once the samples are written");
    let out = sample(&whole).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::read(&stopped).unwrap() == std::fs::read(&whole).unwrap(), "the resumed samples differ from an unstopped run's");
}

/// A frontier sweep stopped once its first run is done: the stop says `odpo frontier --resume`
/// (not the built-in pipeline's `train --resume`, though a sweep's folder holds a pipeline config
/// too), which keeps that run's row, resumes the cut run from its checkpoint and runs the rest. The
/// rows, and the comparison of the methods drawn from them, are an unstopped sweep's to the bit.
#[test]
fn sigterm_during_a_frontier_sweep_resumes_the_sweep() {
    let (dir, stopped, whole) = stopped_and_whole("cli-sigterm-frontier");
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/pipeline/default.toml").canonicalize().unwrap();
    let sweep = dir.join("sweep.toml");
    let sets = r#"["sft.steps=40", "task.sft_texts=500", "task.eval_prompts=16", "eval.samples_per_prompt=2", "pref.epochs=40.0"]"#;
    std::fs::write(&sweep, format!("base = {:?}\nbase_sets = {sets}\nname = \"sweep\"\nmethods = [\"dpo\", \"odpo\"]\npair_counts = [32]\nseeds = [0, 1]\nbetas = [0.1]\nalphas = [1.0]\n", base.display().to_string())).unwrap();
    let frontier = |cwd: &Path, args: &[&str]| odpo_in(cwd, "frontier", args);
    let config = ["--config", sweep.to_str().unwrap()];
    let tags = ["dpo-n32-b0.1-a0-s0", "odpo-n32-b0.1-a1-s0", "dpo-n32-b0.1-a0-s1", "odpo-n32-b0.1-a1-s1"];
    let row = |root: &Path, tag: &str| root.join("runs/sweep/runs").join(tag).join("row.toml");

    // The signal lands once the first of the four runs has its row.
    let child = frontier(&stopped, &config).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let t = Instant::now();
    while !row(&stopped, tags[0]).exists() {
        assert!(t.elapsed() < Duration::from_secs(300), "the first run of the sweep did not finish");
        std::thread::sleep(Duration::from_millis(1));
    }
    // A second process on the live sweep is refused at once, naming the one that holds it.
    let second = frontier(&stopped, &["--resume", "runs/sweep"]).output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("runs/sweep: in use by another odpo process (process {} since", child.id())), "{err}");
    let err = stop(child);
    assert!(err.contains("resume with: odpo frontier --resume runs/sweep\n"), "{err}");
    assert!(!row(&stopped, tags[3]).exists(), "the sweep ran to its end");
    let kept_at = std::fs::metadata(row(&stopped, tags[0])).unwrap().modified().unwrap();
    // `train --resume` on a sweep's folder would run the built-in pipeline there: refused.
    let out = odpo_in(&stopped, "train", &["--resume", "runs/sweep"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("a frontier sweep's folder; go on with it by `odpo frontier --resume runs/sweep`"), "{out:?}");

    let out = frontier(&stopped, &["--resume", "runs/sweep"]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Each run's line counts it in the sweep; those trained now say how long the rest should take.
    assert!(said.contains(&format!("[1/4] {}: kept from an earlier invocation", tags[0])), "{said}");
    assert!(said.lines().any(|l| l.starts_with(&format!("[3/4] {}: reward ", tags[2])) && l.ends_with(" left")), "{said}");
    assert!(said.lines().any(|l| l.starts_with(&format!("[4/4] {}: reward ", tags[3])) && l.ends_with(" s")), "{said}");
    assert_eq!(std::fs::metadata(row(&stopped, tags[0])).unwrap().modified().unwrap(), kept_at);
    let out = frontier(&whole, &config).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Each row but its seconds, and what the comparison drew from the rows as read back.
    let without_seconds = |path: PathBuf| std::fs::read_to_string(path).unwrap().lines().filter(|l| !l.starts_with("seconds")).collect::<Vec<_>>().join("\n");
    for tag in tags {
        assert_eq!(without_seconds(row(&stopped, tag)), without_seconds(row(&whole, tag)), "{tag}");
    }
    let comparison = |root: &Path| std::fs::read_to_string(root.join("runs/sweep/comparison.json")).unwrap();
    assert!(comparison(&stopped).contains("\"mean_d\""), "{}", comparison(&stopped));
    assert_eq!(comparison(&stopped), comparison(&whole));
}

/// `odpo experiment` on a folder another process holds is refused before it writes anything there
/// (the sweep's case, with a live sweep, is in `sigterm_during_a_frontier_sweep_resumes_the_sweep`).
#[test]
fn an_experiment_whose_folder_is_held_is_refused_naming_the_holder() {
    let dir = env::scratch("cli-experiment-held");
    let model = tiny_model(&dir);
    std::fs::write(dir.join("prompts.txt"), "hello\nhello hello\nhello hello hello\n").unwrap();
    let config = format!(
        "name = \"held\"\nmodel = {:?}\nprompts = \"prompts.txt\"\nreward = \"known\"\npref_prompts = 2\neval_prompts = 1\nsamples_per_prompt = 2\nmethods = [\"dpo\"]\nbetas = [0.1]\n\n[sample]\nk = 2\ntemperature = 1.0\nmax_new_tokens = 4\n\n[pref]\nepochs = 1.0\nbatch_size = 2\nlr = 1e-3\nmax_length = 16\nmax_prompt_length = 8\n",
        model.display().to_string()
    );
    std::fs::write(dir.join("experiment.toml"), config).unwrap();
    // The holder: this process, with the lock file as the trainer's lock writes it.
    let held = dir.join("runs/held");
    std::fs::create_dir_all(&held).unwrap();
    let lock = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(held.join(".lock")).unwrap();
    lock.try_lock().unwrap();
    std::fs::write(held.join(".lock"), format!("process {} since unix time 0\n", std::process::id())).unwrap();

    let out = odpo_in(&dir, "experiment", &["--config", "experiment.toml"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("runs/held: in use by another odpo process (process {} since unix time 0)", std::process::id())), "{err}");
    let names: Vec<String> = std::fs::read_dir(&held).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, [".lock"], "the refused experiment wrote into its folder");
    drop(lock);
}
