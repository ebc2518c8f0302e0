//! `cargo xtask frontier --config FILE`: the reward-vs-KL frontier of DPO and ODPO on the known-reward
//! task. One SFT model and one set of scored samples are shared; for every method, pair count, seed,
//! β (and α for ODPO) a preference run starts from the SFT model on the first `n` prompts' pairs and
//! is evaluated on the held-out prompts. Writes `frontier.csv`, `frontier.md` and `frontier.png`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::config::{Method, PipelineConfig};
use crate::error::{PipelineError, Result};
use crate::eval::{Estimate, evaluate_samples};
use crate::pipeline::{eval_settings, load_model, prepare_task, train_pref, train_sft};
use crate::plot::{self, Series};
use crate::sample::{self, SampleSettings};
use crate::synthetic;

/// A frontier sweep (configs/pipeline/frontier*.toml).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrontierConfig {
    /// The pipeline config the sweep starts from, relative to this file.
    pub base: PathBuf,
    /// `--set` overrides applied to the base config.
    #[serde(default)]
    pub base_sets: Vec<String>,
    /// The sweep's folder is `runs/<name>` (or a free `runs/<name>-N`).
    pub name: String,
    /// Methods to sweep.
    pub methods: Vec<Method>,
    /// Preference pair budgets: the first `n` prompts' best-vs-worst pairs.
    pub pair_counts: Vec<usize>,
    /// Seeds of the preference runs (data order and evaluation sampling).
    pub seeds: Vec<u64>,
    /// β values.
    pub betas: Vec<f64>,
    /// α values (ODPO only).
    pub alphas: Vec<f64>,
}

/// One preference run of the sweep.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FrontierRow {
    /// The method.
    pub method: Method,
    /// Pairs trained on (ties dropped).
    pub pairs: usize,
    /// The pair budget asked for.
    pub pair_budget: usize,
    /// β.
    pub beta: f64,
    /// α (ODPO; 0 for DPO).
    pub alpha: f64,
    /// Seed.
    pub seed: u64,
    /// Known reward of the policy's samples on the held-out prompts.
    pub reward: Estimate,
    /// KL, sequence-level estimate.
    pub kl_seq: Estimate,
    /// KL, k3 estimate.
    pub kl_k3: Estimate,
    /// Seconds for training and evaluation.
    pub seconds: f64,
}

/// What the sweep wrote.
#[derive(Clone, Debug, Serialize)]
pub struct FrontierSummary {
    /// The sweep folder.
    pub dir: PathBuf,
    /// `frontier.md`.
    pub table: PathBuf,
    /// `frontier.csv`.
    pub csv: PathBuf,
    /// `frontier.png`.
    pub plot: PathBuf,
    /// The SFT model's own reward on the held-out prompts.
    pub sft_reward: Estimate,
    /// Every run.
    pub rows: Vec<FrontierRow>,
    /// Seconds in all.
    pub wall_seconds: f64,
}

impl FrontierConfig {
    /// Reads and checks a sweep file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| PipelineError::io(path, e))?;
        let cfg: Self = toml::from_str(&text).map_err(|e| PipelineError::ConfigParse { origin: path.display().to_string(), message: e.to_string().trim_end().into() })?;
        for (key, empty) in [("methods", cfg.methods.is_empty()), ("pair_counts", cfg.pair_counts.is_empty()), ("seeds", cfg.seeds.is_empty()), ("betas", cfg.betas.is_empty())] {
            if empty {
                return Err(PipelineError::config(key, "is empty; give at least one value"));
            }
        }
        if cfg.methods.contains(&Method::Odpo) && cfg.alphas.is_empty() {
            return Err(PipelineError::config("alphas", "is empty but `methods` has odpo; give at least one α"));
        }
        if cfg.pair_counts.contains(&0) {
            return Err(PipelineError::config("pair_counts", "holds 0; every budget must be at least 1 pair"));
        }
        Ok(cfg)
    }
}

/// Runs the sweep in `config_path` (`sets` override the sweep's base pipeline config after its own
/// `base_sets`), printing one line per run when `verbose`.
pub fn frontier(config_path: &Path, sets: &[String], device: &Device, verbose: bool) -> Result<FrontierSummary> {
    let start = Instant::now();
    let fc = FrontierConfig::from_file(config_path)?;
    let base_path = config_path.parent().unwrap_or(Path::new(".")).join(&fc.base);
    let all_sets: Vec<String> = fc.base_sets.iter().chain(sets).cloned().collect();
    let mut cfg = PipelineConfig::from_file(&base_path, &all_sets)?;
    cfg.name = fc.name.clone();
    cfg.task.pref_prompts = fc.pair_counts.iter().copied().max().unwrap_or(1);
    let dir = cfg.fresh_run_dir(Path::new("runs"));
    std::fs::create_dir_all(&dir).map_err(|e| PipelineError::io(&dir, e))?;
    for (name, text) in [("pipeline.toml", cfg.to_toml()), ("frontier.toml", toml::to_string(&fc).unwrap_or_default())] {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| PipelineError::io(&p, e))?;
    }
    let say = |m: String| {
        if verbose {
            println!("{m}");
        }
        tracing::info!("{m}");
    };

    let task = prepare_task(&cfg, &dir)?;
    say(format!("SFT -> {}", dir.join("sft").display()));
    let sft_model = train_sft(&cfg, &task, &dir.join("sft"), device)?;
    let settings = SampleSettings { k: cfg.sample.k, temperature: cfg.sample.temperature, max_new_tokens: cfg.sample.max_new_tokens, seed: cfg.seed };
    let samples = dir.join("data").join("samples.jsonl");
    sample::sample(&sft_model, &task.pref_prompts, &settings, &synthetic::reward(), &samples, device)?;
    let lines: Vec<String> = std::fs::read_to_string(&samples).map_err(|e| PipelineError::io(&samples, e))?.lines().map(String::from).collect();
    let (reference, tok) = load_model(&sft_model, device)?;
    let (sft_eval, _, _) = evaluate_samples(&reference, &reference, &tok, &task.eval_prompts, &eval_settings(&cfg, cfg.seed), &synthetic::reward(), device)?;
    say(format!("SFT reward on held-out prompts: {:.3} ± {:.3}", sft_eval.reward.mean, sft_eval.reward.ci95));

    let mut rows = Vec::new();
    for &n in &fc.pair_counts {
        // Samples are prompt-major, k per prompt: the first n prompts are the first n·k lines.
        let subset = dir.join("data").join(format!("samples-n{n}.jsonl"));
        let take = (n * cfg.sample.k).min(lines.len());
        std::fs::write(&subset, lines[..take].join("\n") + "\n").map_err(|e| PipelineError::io(&subset, e))?;
        for &method in &fc.methods {
            let alphas: Vec<f64> = if method == Method::Odpo { fc.alphas.clone() } else { vec![0.0] };
            for &beta in &fc.betas {
                for &alpha in &alphas {
                    for &seed in &fc.seeds {
                        let t = Instant::now();
                        let tag = format!("{}-n{n}-b{beta}-a{alpha}-s{seed}", method.name());
                        let summary = train_pref(&cfg, &sft_model, &subset, method, beta, alpha, seed, &dir.join("runs").join(&tag), device)?;
                        let model = summary.exported.ok_or_else(|| PipelineError::config("output.export", "a preference run exported no model"))?;
                        let (policy, _) = load_model(&model, device)?;
                        let (ev, _, _) = evaluate_samples(&policy, &reference, &tok, &task.eval_prompts, &eval_settings(&cfg, seed), &synthetic::reward(), device)?;
                        let pairs = odpo_trainer::RunConfig::from_file(&dir.join("runs").join(&tag).join("config.toml"), &[])
                            .ok()
                            .and_then(|c| odpo_data::load(&c.data).ok())
                            .map_or(0, |l| l.pairs.len());
                        let row = FrontierRow { method, pairs, pair_budget: n, beta, alpha, seed, reward: ev.reward, kl_seq: ev.kl.seq, kl_k3: ev.kl.k3, seconds: t.elapsed().as_secs_f64() };
                        say(format!("{tag}: reward {:.3} ± {:.3}, KL {:.3} (k3 {:.3}), {:.1} s", row.reward.mean, row.reward.ci95, row.kl_seq.mean, row.kl_k3.mean, row.seconds));
                        rows.push(row);
                    }
                }
            }
        }
    }

    let csv = dir.join("frontier.csv");
    let mut text = String::from("method,pairs,pair_budget,beta,alpha,seed,reward,reward_ci95,kl_seq,kl_seq_ci95,kl_k3,kl_k3_ci95,seconds\n");
    for r in &rows {
        let _ = writeln!(text, "{},{},{},{},{},{},{:.4},{:.4},{:.4},{:.4},{:.4},{:.4},{:.1}", r.method.name(), r.pairs, r.pair_budget, r.beta, r.alpha, r.seed, r.reward.mean, r.reward.ci95, r.kl_seq.mean, r.kl_seq.ci95, r.kl_k3.mean, r.kl_k3.ci95, r.seconds);
    }
    std::fs::write(&csv, text).map_err(|e| PipelineError::io(&csv, e))?;
    let table = dir.join("frontier.md");
    let md = markdown_table(&rows, &sft_eval.reward);
    std::fs::write(&table, &md).map_err(|e| PipelineError::io(&table, e))?;
    let plot_path = dir.join("frontier.png");
    let mut series = vec![Series { name: "SFT".into(), points: vec![(0.0, sft_eval.reward.mean)], frontier: false }];
    for &m in &fc.methods {
        let points = rows.iter().filter(|r| r.method == m).map(|r| (r.kl_seq.mean, r.reward.mean)).collect();
        series.push(Series { name: m.name().to_uppercase(), points, frontier: true });
    }
    plot::scatter(&plot_path, "Reward vs KL on the known-reward task", &series)?;
    let summary = FrontierSummary { dir, table, csv, plot: plot_path, sft_reward: sft_eval.reward, rows, wall_seconds: start.elapsed().as_secs_f64() };
    say(format!("table: {}\nplot:  {}\n({:.0} s)", summary.table.display(), summary.plot.display(), summary.wall_seconds));
    Ok(summary)
}

/// The sweep as a Markdown table, one row per run, then the mean over seeds per setting.
pub fn markdown_table(rows: &[FrontierRow], sft: &Estimate) -> String {
    let mut s = format!("SFT model: reward {:.3} ± {:.3} (KL 0)\n\n", sft.mean, sft.ci95);
    s.push_str("| method | pairs | β | α | seed | reward (±95%) | KL seq (±95%) | KL k3 (±95%) |\n|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let alpha = if r.method == Method::Odpo { format!("{}", r.alpha) } else { "–".into() };
        let _ = writeln!(s, "| {} | {} | {} | {} | {} | {:.3} ± {:.3} | {:.3} ± {:.3} | {:.3} ± {:.3} |", r.method.name(), r.pairs, r.beta, alpha, r.seed, r.reward.mean, r.reward.ci95, r.kl_seq.mean, r.kl_seq.ci95, r.kl_k3.mean, r.kl_k3.ci95);
    }
    s.push_str("\nMean over seeds:\n\n| method | pair budget | β | α | reward | KL seq | (reward − SFT) / KL |\n|---|---|---|---|---|---|---|\n");
    let mut keys: Vec<(Method, usize, u64, u64)> = rows.iter().map(|r| (r.method, r.pair_budget, r.beta.to_bits(), r.alpha.to_bits())).collect();
    keys.dedup();
    keys.sort_by_key(|k| (k.1, k.0.name()));
    keys.dedup();
    for (m, n, b, a) in keys {
        let group: Vec<&FrontierRow> = rows.iter().filter(|r| (r.method, r.pair_budget, r.beta.to_bits(), r.alpha.to_bits()) == (m, n, b, a)).collect();
        let mean = |f: fn(&FrontierRow) -> f64| group.iter().map(|r| f(r)).sum::<f64>() / group.len().max(1) as f64;
        let (reward, kl) = (mean(|r| r.reward.mean), mean(|r| r.kl_seq.mean));
        let alpha = if m == Method::Odpo { format!("{}", f64::from_bits(a)) } else { "–".into() };
        let _ = writeln!(s, "| {} | {n} | {} | {alpha} | {reward:.3} | {kl:.3} | {:.3} |", m.name(), f64::from_bits(b), (reward - sft.mean) / kl.max(1e-9));
    }
    s
}
