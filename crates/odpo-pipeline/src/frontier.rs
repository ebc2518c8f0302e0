//! `cargo xtask frontier --config FILE`: the reward-vs-KL frontier of DPO and ODPO on the known-reward
//! task. One SFT model and one set of scored samples are shared; for every method, pair count, seed,
//! β (and α for ODPO) a preference run starts from the SFT model on `n` prompts' pairs (the first `n`,
//! or `n` drawn by the seed from the sampled pool) and is evaluated on the held-out prompts with the
//! true reward. With two seeds or more, [`crate::compare`] decides whether ODPO's frontier is above
//! DPO's. Writes `frontier.csv`, `frontier.md`, `frontier.png` and `comparison.json`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Device;
use odpo_loss::offset::OffsetConfig;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::index::sample as sample_indices;
use serde::{Deserialize, Serialize};

use crate::compare::{self, Comparison, SeedGap};
use crate::config::{Method, PipelineConfig};
use crate::error::{PipelineError, Result};
use crate::eval::{Estimate, evaluate_samples, pair_margins};
use crate::stages::{SweepPoint, eval_settings, load_model, prepare_task, task_score, train_pref, train_sft};
use crate::plot::{self, Band, Series};
use crate::progress::SweepProgress;
use crate::sample::{self, SampleSettings};
use crate::synthetic;
use odpo_trainer::config::Checked;

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
    /// Preference pair budgets: `n` prompts' pairs each (see `subset`).
    pub pair_counts: Vec<usize>,
    /// Which `n` prompts: `first` (the first `n` sampled, the same for every seed) or `per-seed` (each
    /// seed draws `n` of the base config's `task.pref_prompts` sampled prompts).
    #[serde(default)]
    pub subset: Subset,
    /// Seeds of the preference runs (data order and evaluation sampling).
    pub seeds: Vec<u64>,
    /// β values.
    pub betas: Vec<f64>,
    /// α values (ODPO only).
    pub alphas: Vec<f64>,
}

/// Which prompts' pairs a budget of `n` takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Subset {
    /// The first `n` sampled prompts, for every seed (the pool is `n` prompts).
    #[default]
    First,
    /// `n` prompts drawn by each seed from the pool of `task.pref_prompts`: a seed's DPO and ODPO runs
    /// share its draw.
    PerSeed,
}

/// One preference run of the sweep.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
    /// Spearman's ρ between each training pair's margin β·h and its log score gap log(s_w − s_l) (the
    /// offset at α = 1) after training: what ODPO's offset shapes and DPO's loss never sees.
    pub rho_margin_gap: f64,
    /// Seconds for training and evaluation.
    pub seconds: f64,
}

/// A finished run's row, in its folder: a resumed sweep reads it instead of running the run again.
const ROW_FILE: &str = "row.toml";

impl FrontierRow {
    /// Writes the row into the run's folder, atomically. TOML, because its floats are written
    /// shortest and read back exactly (NaN included), so that a kept row is the computed one to the
    /// bit and so are the comparisons drawn from it.
    fn write(&self, run_dir: &Path) -> Result<()> {
        let path = run_dir.join(ROW_FILE);
        let text = toml::to_string(self).map_err(|e| PipelineError::config_parse(path.display().to_string(), format!("could not be written as TOML: {e}")))?;
        Ok(odpo_model::weights::write_atomic(&path, text.as_bytes())?)
    }

    /// The row kept in `run_dir` for this point of the sweep, if there is a whole one (a row that
    /// does not parse, or names another point, is run again).
    fn read(run_dir: &Path, method: Method, pair_budget: usize, beta: f64, alpha: f64, seed: u64) -> Option<Self> {
        let path = run_dir.join(ROW_FILE);
        let text = std::fs::read_to_string(&path).ok()?;
        match toml::from_str::<Self>(&text) {
            Ok(row) if (row.method, row.pair_budget, row.beta.to_bits(), row.alpha.to_bits(), row.seed) == (method, pair_budget, beta.to_bits(), alpha.to_bits(), seed) => Some(row),
            Ok(_) => {
                tracing::warn!("{} is the row of another point of the sweep; running the run again", path.display());
                None
            }
            Err(e) => {
                tracing::warn!("{} is unreadable ({e}); running the run again", path.display());
                None
            }
        }
    }
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
    /// ODPO against DPO per pair budget and α (sweeps with both methods and two seeds or more).
    pub comparisons: Vec<Comparison>,
    /// Seconds in all.
    pub wall_seconds: f64,
}

impl FrontierConfig {
    /// The α values `method` runs at: the sweep's for ODPO, none (0) for DPO.
    fn alphas_of(&self, method: Method) -> &[f64] {
        if method == Method::Odpo { &self.alphas } else { &[0.0] }
    }

    /// Reads and checks a sweep file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = odpo_trainer::config::load_toml_file(path, &[])?;
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
        crate::config::check_sweep_values(&cfg.betas, &cfg.alphas)?;
        Ok(cfg)
    }
}

/// The pipeline config a sweep starts from: its `base` (relative to the sweep file) with its
/// `base_sets`, then `sets`.
pub fn base_config(config_path: &Path, sets: &[String]) -> Result<PipelineConfig> {
    let fc = FrontierConfig::from_file(config_path)?;
    let base_path = config_path.parent().unwrap_or(Path::new(".")).join(&fc.base);
    let all_sets: Vec<String> = fc.base_sets.iter().chain(sets).cloned().collect();
    Ok(PipelineConfig::from_file(&base_path, &all_sets)?.into_inner())
}

/// Runs the sweep in `config_path` (`sets` override the sweep's base pipeline config after its own
/// `base_sets`), printing one line per run when `verbose`.
pub fn frontier(config_path: &Path, sets: &[String], device: &Device, verbose: bool) -> Result<FrontierSummary> {
    let fc = FrontierConfig::from_file(config_path)?;
    let mut cfg = base_config(config_path, sets)?;
    cfg.name = fc.name.clone();
    let largest = fc.pair_counts.iter().copied().max().unwrap_or(1);
    match fc.subset {
        Subset::First => {
            // One pair a prompt: the largest budget needs that many prompts outside the held-out ones.
            let left = synthetic::all_prompts().len().saturating_sub(cfg.task.eval_prompts);
            if largest > left {
                return Err(PipelineError::config(
                    "pair_counts",
                    format!("holds {largest}; the task has {left} prompts left after the {} held-out ones (`task.eval_prompts`), one pair each", cfg.task.eval_prompts),
                ));
            }
            cfg.task.pref_prompts = largest;
        }
        Subset::PerSeed if cfg.task.pref_prompts < largest => {
            return Err(PipelineError::config("task.pref_prompts", format!("is {}; `subset = \"per-seed\"` draws up to {largest} prompts from it", cfg.task.pref_prompts)));
        }
        Subset::PerSeed => {}
    }
    let cfg = cfg.check()?;
    let dir = cfg.new_run_dir(Path::new("runs"))?;
    let _held = crate::stages::hold(&dir)?;
    let fc_text = toml::to_string(&fc).map_err(|e| PipelineError::config_parse(config_path.display().to_string(), e.to_string()))?;
    for (name, text) in [("pipeline.toml", cfg.to_toml()?), (SWEEP_FILE, fc_text)] {
        odpo_model::weights::write_atomic(&dir.join(name), text.as_bytes())?;
    }
    sweep(&fc, &cfg, &dir, device, verbose).map_err(|e| e.in_run(&dir))
}

/// The file in a sweep's folder that holds its sweep config (its pipeline config beside it, in
/// `pipeline.toml`).
pub const SWEEP_FILE: &str = "frontier.toml";

/// Whether `dir` is a sweep's folder: both configs are there (a folder of config files may hold a
/// `frontier.toml`, but no `pipeline.toml`).
pub fn is_sweep_dir(dir: &Path) -> bool {
    dir.join(SWEEP_FILE).is_file() && dir.join("pipeline.toml").is_file()
}

/// `odpo frontier --resume DIR`: goes on with the sweep in `dir`, under the configs written there.
/// The SFT stage, the samples and every run with its `row.toml` are kept; a run cut short resumes
/// from its checkpoint; the rest run. The rows are those of a sweep never stopped, to the bit.
pub fn resume_frontier(dir: &Path, device: &Device, verbose: bool) -> Result<FrontierSummary> {
    let fc = FrontierConfig::from_file(&dir.join(SWEEP_FILE))?;
    let cfg = PipelineConfig::from_file(&dir.join("pipeline.toml"), &[])?;
    let _held = crate::stages::hold(dir)?;
    sweep(&fc, &cfg, dir, device, verbose).map_err(|e| e.in_run(dir))
}

/// The sweep of `fc` over `cfg` in `dir`, keeping what an earlier invocation finished there.
fn sweep(fc: &FrontierConfig, cfg: &Checked<PipelineConfig>, dir: &Path, device: &Device, verbose: bool) -> Result<FrontierSummary> {
    let start = Instant::now();
    let dir = dir.to_path_buf();
    let say = |m: String| crate::stages::say(verbose, m);

    let task = prepare_task(cfg, &dir)?;
    say(format!("SFT -> {}", dir.join("sft").display()));
    let sft_model = train_sft(cfg, &task, &dir.join("sft"), device)?;
    let settings = SampleSettings { k: cfg.sample.k, temperature: cfg.sample.temperature, max_new_tokens: cfg.sample.max_new_tokens, seed: cfg.seed };
    let samples = dir.join("data").join("samples.jsonl");
    let scorer = task_score(cfg);
    // Kept from an earlier invocation (written atomically: present means whole).
    if !samples.exists() {
        sample::sample(&sft_model, &task.pref_prompts, &settings, scorer.as_ref(), &samples, device)?;
    }
    say(format!("{} samples scored by {}", task.pref_prompts.len() * cfg.sample.k, scorer.name()));
    let lines: Vec<String> = std::fs::read_to_string(&samples).map_err(|e| PipelineError::io(&samples, e))?.lines().map(String::from).collect();
    let (reference, tok) = load_model(&sft_model, device)?;
    let (sft_eval, _, _) = evaluate_samples(&reference, &reference, &tok, &task.eval_prompts, &eval_settings(cfg, cfg.seed), &synthetic::reward(), device)?;
    say(format!("SFT reward on held-out prompts: {:.3} ± {:.3}", sft_eval.reward.mean, sft_eval.reward.ci95));

    let mut rows = Vec::new();
    let k = cfg.sample.k;
    let per_budget_and_seed: usize = fc.methods.iter().map(|&m| fc.betas.len() * fc.alphas_of(m).len()).sum();
    let mut progress = SweepProgress::new(fc.pair_counts.len() * fc.seeds.len() * per_budget_and_seed);
    for &n in &fc.pair_counts {
        for &seed in &fc.seeds {
            // Samples are prompt-major, k per prompt: prompt i is lines [i·k, (i+1)·k).
            let (subset, prompts) = match fc.subset {
                Subset::First => (dir.join("data").join(format!("samples-n{n}.jsonl")), (0..n.min(lines.len() / k)).collect::<Vec<_>>()),
                Subset::PerSeed => {
                    let mut drawn = sample_indices(&mut StdRng::seed_from_u64(seed ^ 0x5EED5), lines.len() / k, n).into_vec();
                    drawn.sort_unstable();
                    (dir.join("data").join(format!("samples-n{n}-s{seed}.jsonl")), drawn)
                }
            };
            let text: String = prompts.iter().flat_map(|&i| lines[i * k..(i + 1) * k].iter()).map(|l| format!("{l}\n")).collect();
            odpo_model::weights::write_atomic(&subset, text.as_bytes())?;
            for &method in &fc.methods {
                for &beta in &fc.betas {
                    for &alpha in fc.alphas_of(method) {
                        let t = Instant::now();
                        let tag = format!("{}-n{n}-b{beta}-a{alpha}-s{seed}", method.name());
                        let run_dir = dir.join("runs").join(&tag);
                        if let Some(row) = FrontierRow::read(&run_dir, method, n, beta, alpha, seed) {
                            say(format!("{} {tag}: kept from an earlier invocation ({})", progress.kept(), run_dir.join(ROW_FILE).display()));
                            rows.push(row);
                            continue;
                        }
                        let summary = train_pref(cfg, &SweepPoint { method, beta, alpha, seed }, &sft_model, &subset, &run_dir, device)?;
                        let model = summary.exported.ok_or_else(|| PipelineError::config("output.export", "a preference run exported no model"))?;
                        let (policy, _) = load_model(&model, device)?;
                        let (ev, _, _) = evaluate_samples(&policy, &reference, &tok, &task.eval_prompts, &eval_settings(cfg, seed), &synthetic::reward(), device)?;
                        // The run's own data rules, with the α = 1 offset whatever the method: Δ = log(s_w − s_l).
                        let mut data = odpo_trainer::RunConfig::from_file(&run_dir.join("config.toml"), &[])?.into_inner().data;
                        data.offset = Some(OffsetConfig { alpha: 1.0, ..OffsetConfig::default() });
                        let margins = pair_margins(&policy, &reference, &tok, &data, device)?;
                        let (h, gap): (Vec<f64>, Vec<f64>) = margins.iter().map(|m| (m.h, m.offset)).unzip();
                        let row = FrontierRow {
                            method,
                            pairs: margins.len(),
                            pair_budget: n,
                            beta,
                            alpha,
                            seed,
                            reward: ev.reward,
                            kl_seq: ev.kl.seq,
                            kl_k3: ev.kl.k3,
                            rho_margin_gap: compare::spearman(&h, &gap),
                            seconds: t.elapsed().as_secs_f64(),
                        };
                        let count = progress.trained(row.seconds);
                        say(format!(
                            "{count} {tag}: reward {:.3} ± {:.3}, KL {:.3} (k3 {:.3}), rho(beta*h, gap) {:.2}, {:.1} s{}",
                            row.reward.mean,
                            row.reward.ci95,
                            row.kl_seq.mean,
                            row.kl_k3.mean,
                            row.rho_margin_gap,
                            row.seconds,
                            progress.left()
                        ));
                        row.write(&run_dir)?;
                        rows.push(row);
                    }
                }
            }
        }
    }

    let comparisons = compare_methods(fc, &rows, sft_eval.reward.mean);
    for c in &comparisons {
        say(format!("ODPO - DPO, {} pairs, alpha {}: mean D {:.3}, 95% CI [{:.3}, {:.3}], one-sided sign-flip p {:.4} ({} seeds)", c.pair_budget, c.alpha, c.mean_d, c.ci95.0, c.ci95.1, c.p_value, c.seeds.len()));
    }
    let csv = dir.join("frontier.csv");
    let mut text = String::from("method,pairs,pair_budget,beta,alpha,seed,reward,reward_ci95,kl_seq,kl_seq_ci95,kl_k3,kl_k3_ci95,rho_margin_gap,seconds\n");
    for r in &rows {
        let _ = writeln!(text, "{},{},{},{},{},{},{:.4},{:.4},{:.4},{:.4},{:.4},{:.4},{:.4},{:.1}", r.method.name(), r.pairs, r.pair_budget, r.beta, r.alpha, r.seed, r.reward.mean, r.reward.ci95, r.kl_seq.mean, r.kl_seq.ci95, r.kl_k3.mean, r.kl_k3.ci95, r.rho_margin_gap, r.seconds);
    }
    odpo_model::weights::write_atomic(&csv, text.as_bytes())?;
    let json = dir.join("comparison.json");
    let json_text = serde_json::to_string_pretty(&comparisons).map_err(|e| PipelineError::Json { path: json.clone(), line: 0, message: e.to_string() })?;
    odpo_model::weights::write_atomic(&json, json_text.as_bytes())?;
    let table = dir.join("frontier.md");
    let md = comparison_table(&comparisons) + &markdown_table(&rows, &sft_eval.reward);
    odpo_model::weights::write_atomic(&table, md.as_bytes())?;
    let plot_path = dir.join("frontier.png");
    if fc.seeds.len() >= 2 {
        plot::bands(&plot_path, &format!("Reward vs KL over {} seeds: mean envelope, 95% band", fc.seeds.len()), sft_eval.reward.mean, &band_series(fc, &rows, sft_eval.reward.mean))?;
    } else {
        let mut series = vec![Series { name: "SFT".into(), points: vec![(0.0, sft_eval.reward.mean)], frontier: false }];
        for &m in &fc.methods {
            let points = rows.iter().filter(|r| r.method == m).map(|r| (r.kl_seq.mean, r.reward.mean)).collect();
            series.push(Series { name: m.name().to_uppercase(), points, frontier: true });
        }
        plot::scatter(&plot_path, "Reward vs KL on the known-reward task", &series)?;
    }
    let summary = FrontierSummary { dir, table, csv, plot: plot_path, sft_reward: sft_eval.reward, rows, comparisons, wall_seconds: start.elapsed().as_secs_f64() };
    say(format!("table: {}\nplot:  {}\n({:.0} s)", summary.table.display(), summary.plot.display(), summary.wall_seconds));
    Ok(summary)
}

/// (KL, reward) of the runs of one method, pair budget, α (ignored for DPO) and seed.
fn points(rows: &[FrontierRow], method: Method, n: usize, alpha: f64, seed: u64) -> Vec<(f64, f64)> {
    rows.iter()
        .filter(|r| r.method == method && r.pair_budget == n && r.seed == seed && (method == Method::Dpo || r.alpha == alpha))
        .map(|r| (r.kl_seq.mean, r.reward.mean))
        .collect()
}

/// The comparison for every pair budget and α, when the sweep has both methods and two seeds or more.
pub fn compare_methods(fc: &FrontierConfig, rows: &[FrontierRow], sft_reward: f64) -> Vec<Comparison> {
    if fc.seeds.len() < 2 || !fc.methods.contains(&Method::Dpo) || !fc.methods.contains(&Method::Odpo) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for &n in &fc.pair_counts {
        for &alpha in &fc.alphas {
            let seeds = fc
                .seeds
                .iter()
                .map(|&seed| {
                    let (d, k_star) = compare::frontier_gap(&points(rows, Method::Odpo, n, alpha, seed), &points(rows, Method::Dpo, n, alpha, seed), sft_reward);
                    SeedGap { seed, d, k_star }
                })
                .collect();
            out.push(Comparison::of(n, alpha, seeds));
        }
    }
    out
}

/// One band per method (and pair budget, α) for the plot.
fn band_series(fc: &FrontierConfig, rows: &[FrontierRow], sft_reward: f64) -> Vec<Band> {
    let mut out = Vec::new();
    for &n in &fc.pair_counts {
        for &method in &fc.methods {
            for &alpha in fc.alphas_of(method) {
                let per_seed: Vec<Vec<(f64, f64)>> = fc.seeds.iter().map(|&s| points(rows, method, n, alpha, s)).collect();
                let mut name = format!("{} ({n} pairs)", method.name().to_uppercase());
                if method == Method::Odpo && fc.alphas.len() > 1 {
                    name = format!("{name}, alpha {alpha}");
                }
                out.push(Band { name, points: per_seed.concat(), curve: compare::envelope_band(&per_seed, sft_reward, 60) });
            }
        }
    }
    out
}

/// The comparisons as Markdown (empty without any).
pub fn comparison_table(comparisons: &[Comparison]) -> String {
    if comparisons.is_empty() {
        return String::new();
    }
    let mut s = String::from("ODPO − DPO along the frontier (D: mean reward gap over KL in [0, K*], per seed; 95% bootstrap interval over seeds; one-sided sign-flip p):\n\n| pairs | α | seeds | mean D | 95% interval | p | D > 0 in | per-seed D |\n|---|---|---|---|---|---|---|---|\n");
    for c in comparisons {
        let positive = c.seeds.iter().filter(|g| g.d > 0.0).count();
        let per_seed: Vec<String> = c.seeds.iter().map(|g| format!("{:.2}", g.d)).collect();
        let _ = writeln!(s, "| {} | {} | {} | {:.3} | [{:.3}, {:.3}] | {:.4} | {positive}/{} | {} |", c.pair_budget, c.alpha, c.seeds.len(), c.mean_d, c.ci95.0, c.ci95.1, c.p_value, c.seeds.len(), per_seed.join(" "));
    }
    s.push('\n');
    s
}

/// The sweep as a Markdown table, one row per run, then the mean over seeds per setting.
pub fn markdown_table(rows: &[FrontierRow], sft: &Estimate) -> String {
    let mut s = format!("SFT model: reward {:.3} ± {:.3} (KL 0)\n\n", sft.mean, sft.ci95);
    s.push_str("| method | pairs | β | α | seed | reward (±95%) | KL seq (±95%) | KL k3 (±95%) | ρ(βh, log gap) |\n|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let alpha = if r.method == Method::Odpo { format!("{}", r.alpha) } else { "–".into() };
        let _ = writeln!(s, "| {} | {} | {} | {} | {} | {:.3} ± {:.3} | {:.3} ± {:.3} | {:.3} ± {:.3} | {:.2} |", r.method.name(), r.pairs, r.beta, alpha, r.seed, r.reward.mean, r.reward.ci95, r.kl_seq.mean, r.kl_seq.ci95, r.kl_k3.mean, r.kl_k3.ci95, r.rho_margin_gap);
    }
    s.push_str("\nMean over seeds:\n\n| method | pair budget | β | α | reward | KL seq | (reward − SFT) / KL | ρ(βh, log gap) |\n|---|---|---|---|---|---|---|---|\n");
    let mut keys: Vec<(Method, usize, u64, u64)> = rows.iter().map(|r| (r.method, r.pair_budget, r.beta.to_bits(), r.alpha.to_bits())).collect();
    // Bits of non-negative floats order as the values do.
    keys.sort_by_key(|k| (k.1, k.0.name(), k.2, k.3));
    keys.dedup();
    for (m, n, b, a) in keys {
        let group: Vec<&FrontierRow> = rows.iter().filter(|r| (r.method, r.pair_budget, r.beta.to_bits(), r.alpha.to_bits()) == (m, n, b, a)).collect();
        let mean = |f: fn(&FrontierRow) -> f64| group.iter().map(|r| f(r)).sum::<f64>() / group.len().max(1) as f64;
        let (reward, kl, rho) = (mean(|r| r.reward.mean), mean(|r| r.kl_seq.mean), mean(|r| r.rho_margin_gap));
        let alpha = if m == Method::Odpo { format!("{}", f64::from_bits(a)) } else { "–".into() };
        let _ = writeln!(s, "| {} | {n} | {} | {alpha} | {reward:.3} | {kl:.3} | {:.3} | {rho:.2} |", m.name(), f64::from_bits(b), (reward - sft.mean) / kl.max(1e-9));
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A kept row reads back as written, to the bit, NaN included; a row of another point of the
    /// sweep, or a damaged one, is not read.
    #[test]
    fn a_kept_row_reads_back_to_the_bit() {
        use rand::Rng;
        let dir = tempfile::tempdir().unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let mut draw = || match rng.random_range(0..4) {
            0 => f64::from_bits(rng.random::<u64>() & !(0x7FFu64 << 52) | (rng.random_range(1..2046u64) << 52)),
            1 => rng.random::<f64>() * 1e-300,
            2 => f64::NAN,
            _ => rng.random::<f64>() - 0.5,
        };
        let same = |a: f64, b: f64| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        for _ in 0..500 {
            let est = |m: f64, c: f64| Estimate { mean: m, ci95: c, n: 64 };
            let row = FrontierRow { method: Method::Odpo, pairs: 30, pair_budget: 32, beta: 0.1, alpha: 1.0, seed: 3, reward: est(draw(), draw()), kl_seq: est(draw(), draw()), kl_k3: est(draw(), draw()), rho_margin_gap: draw(), seconds: draw() };
            row.write(dir.path()).unwrap();
            let back = FrontierRow::read(dir.path(), Method::Odpo, 32, 0.1, 1.0, 3).unwrap();
            let values = |r: &FrontierRow| [r.reward.mean, r.reward.ci95, r.kl_seq.mean, r.kl_seq.ci95, r.kl_k3.mean, r.kl_k3.ci95, r.rho_margin_gap, r.seconds];
            assert!(values(&row).iter().zip(values(&back)).all(|(&a, b)| same(a, b)), "{row:?}\n{back:?}");
        }
        assert!(FrontierRow::read(dir.path(), Method::Dpo, 32, 0.1, 1.0, 3).is_none());
        assert!(FrontierRow::read(dir.path(), Method::Odpo, 32, f64::from_bits(0.1f64.to_bits() + 1), 1.0, 3).is_none());
        assert!(FrontierRow::read(dir.path(), Method::Odpo, 32, 0.3, 1.0, 3).is_none());
        let text = std::fs::read_to_string(dir.path().join(ROW_FILE)).unwrap();
        std::fs::write(dir.path().join(ROW_FILE), &text[..text.len() / 2]).unwrap();
        assert!(FrontierRow::read(dir.path(), Method::Odpo, 32, 0.1, 1.0, 3).is_none());
    }

    /// A sweep's values a run could not take are refused when the file is read, naming the list,
    /// before the SFT stage runs.
    #[test]
    fn a_sweep_folder_in_use_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let sweep_dir = dir.path().join("sweep");
        std::fs::create_dir_all(&sweep_dir).unwrap();
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/pipeline/frontier.toml");
        std::fs::copy(&shipped, sweep_dir.join(SWEEP_FILE)).unwrap();
        std::fs::write(sweep_dir.join("pipeline.toml"), PipelineConfig::default_with(&[]).unwrap().to_toml().unwrap()).unwrap();
        let held = odpo_trainer::lock::acquire(&sweep_dir).unwrap();
        let e = resume_frontier(&sweep_dir, &Device::default(), false).map(|_| ()).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, PipelineError::Busy { .. }), "{msg}");
        assert!(msg.starts_with(&format!("{}: in use by another odpo process (process {}", sweep_dir.display(), std::process::id())), "{msg}");
        let mut names: Vec<String> = std::fs::read_dir(&sweep_dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, [".lock", SWEEP_FILE, "pipeline.toml"], "the refused resume wrote into the folder");
        drop(held);
    }

    #[test]
    fn a_sweeps_bad_values_are_named_before_anything_runs() {
        let dir = tempfile::tempdir().unwrap();
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/pipeline/default.toml");
        let sweep = |lists: &str| {
            let path = dir.path().join("sweep.toml");
            std::fs::write(&path, format!("base = {:?}\nname = \"s\"\nmethods = [\"dpo\", \"odpo\"]\nseeds = [0]\n{lists}\n", base.display().to_string())).unwrap();
            path
        };
        let device = Device::default();
        for (lists, msg) in [
            ("pair_counts = [10]\nbetas = [0.1, 0.0]\nalphas = [1.0]", "config: `betas` holds 0; every β must be a finite number > 0"),
            ("pair_counts = [10]\nbetas = [0.1]\nalphas = [-1.0]", "config: `alphas` holds -1; every α must be a finite number >= 0"),
            (
                "pair_counts = [10, 1700]\nbetas = [0.1]\nalphas = [1.0]",
                "config: `pair_counts` holds 1700; the task has 1664 prompts left after the 64 held-out ones (`task.eval_prompts`), one pair each",
            ),
        ] {
            let e = frontier(&sweep(lists), &[], &device, false).map(|_| ()).unwrap_err().to_string();
            assert_eq!(e, msg);
        }
        assert!(!Path::new("runs/s").exists(), "a refused sweep wrote its folder");
    }
}
