//! Sampling: k responses per prompt from a model (odpo-model's batched, KV-cached generation), scored
//! by a [`RewardModel`] and written in the ODPO paper's scored-responses format, one
//! `{"prompt", "text", "reward"}` object a line (odpo-data's `scored-jsonl`). [`reward_from_spec`]
//! gives the reward model that `odpo sample --reward` and an experiment's `reward` key name.

use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use odpo_model::CausalLm;
use odpo_model::generate::{GenerationConfig, SamplingConfig, generate_with};
use odpo_model::tokenizer::Tokenizer;

use crate::error::{PipelineError, Result};
use crate::journal::Journal;
use crate::reward::{RewardModel, ScoreTable};

/// A reward model from its command-line / config spelling: `known` (the built-in task's lexicon),
/// `table:FILE` (a scored JSONL whose texts already carry rewards) or `learned:DIR` (a
/// [`crate::learned::LearnedReward`] saved by `cargo xtask reward-model`, run on `device`).
pub fn reward_from_spec(spec: &str, device: &Device) -> Result<Box<dyn RewardModel>> {
    Ok(match spec.split_once(':') {
        None if spec == "known" => Box::new(crate::synthetic::reward()),
        Some(("table", file)) => Box::new(ScoreTable::from_jsonl(Path::new(file))?),
        Some(("learned", dir)) => Box::new(crate::learned::LearnedReward::load(Path::new(dir), device)?),
        _ => return Err(PipelineError::config("reward", format!("`{spec}`: expected `known`, `table:FILE` or `learned:DIR`"))),
    })
}

/// Sequences per generation call.
const GENERATE_BATCH: usize = 256;

/// One sampled response.
#[derive(Clone, Debug, PartialEq)]
pub struct Response {
    /// Index of its prompt in the prompt list.
    pub prompt_index: usize,
    /// The prompt's token ids.
    pub prompt_ids: Vec<u32>,
    /// The new tokens, ending with EOS when the model produced one.
    pub tokens: Vec<u32>,
    /// The decoded response, special tokens dropped.
    pub text: String,
}

/// How to sample.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleSettings {
    /// Responses per prompt.
    pub k: usize,
    /// Softmax temperature.
    pub temperature: f64,
    /// Longest response in tokens.
    pub max_new_tokens: usize,
    /// Seed of the sampler (each generation batch derives its own from it).
    pub seed: u64,
}

/// Samples `settings.k` responses to each prompt (prompt-major order: all of prompt 0's first). A
/// stop asked for ([`odpo_trainer::interrupt`]) ends it after the current batch with
/// [`PipelineError::Stopped`].
pub fn sample_responses(model: &CausalLm, tokenizer: &Tokenizer, prompts: &[String], settings: &SampleSettings, device: &Device) -> Result<Vec<Response>> {
    sample_journaled(model, tokenizer, prompts, settings, None, device)
}

/// [`sample_responses`], keeping each finished batch in `journal` where one is given: a pass
/// stopped (or killed) and run again goes on from the batches kept, to the responses of a pass
/// never stopped.
pub fn sample_journaled(model: &CausalLm, tokenizer: &Tokenizer, prompts: &[String], settings: &SampleSettings, journal: Option<&Journal>, device: &Device) -> Result<Vec<Response>> {
    let eos = tokenizer.eos_token_id().ok_or_else(|| PipelineError::config("tokenizer", "has no EOS token to stop responses at"))?;
    let pad = tokenizer.pad_token_id().unwrap_or(eos);
    let encoded = prompts.iter().map(|p| tokenizer.encode(p, true)).collect::<Result<Vec<_>, _>>()?;
    let jobs: Vec<usize> = (0..prompts.len()).flat_map(|i| std::iter::repeat_n(i, settings.k)).collect();
    let SampleSettings { k, temperature, max_new_tokens, seed } = *settings;
    let numbers = [k as u64, temperature.to_bits(), max_new_tokens as u64, seed, GENERATE_BATCH as u64, u64::from(eos), u64::from(pad)];
    let key = journal.map(|j| j.key("sampling", &numbers, &encoded));
    let fits = |at: usize, row: &Kept| row.prompt_index == jobs[at] && row.tokens.len() <= max_new_tokens;
    let kept: Vec<Kept> = journal.zip(key.as_deref()).and_then(|(j, key)| j.read(key, jobs.len(), GENERATE_BATCH, fits)).unwrap_or_default();
    if let (Some(j), false) = (journal, kept.is_empty()) {
        tracing::info!("sampling: {} of {} responses read from {}", kept.len(), jobs.len(), j.path().display());
    }
    let mut open = journal.zip(key.as_deref()).map(|(j, key)| j.start(key, &kept)).transpose()?;
    let mut out = Vec::with_capacity(jobs.len());
    for Kept { prompt_index, tokens } in kept {
        out.push(response(tokenizer, prompt_index, &encoded[prompt_index], tokens)?);
    }
    let bar = progress_bar(jobs.len(), out.len(), settings.max_new_tokens);
    let mut finished = out.len();
    // Batch `b` samples from a seed of its own: the batches after those kept are the ones a pass
    // that was never stopped samples. (`div_ceil`: when all are kept, the last batch may be short.)
    for (b, chunk) in jobs.chunks(GENERATE_BATCH).enumerate().skip(out.len().div_ceil(GENERATE_BATCH)) {
        if odpo_trainer::interrupt::requested() {
            bar.finish_and_clear();
            return Err(PipelineError::stopped("sampling", out.len(), jobs.len(), "responses", journal.map(Journal::path)));
        }
        let ids: Vec<Vec<u32>> = chunk.iter().map(|&i| encoded[i].clone()).collect();
        let cfg = GenerationConfig {
            max_new_tokens: settings.max_new_tokens,
            eos_token_ids: vec![eos],
            pad_token_id: pad,
            sampling: SamplingConfig { temperature: settings.temperature, seed: settings.seed.wrapping_mul(1_000_003).wrapping_add(b as u64), ..SamplingConfig::default() },
        };
        // The bar counts token slots, a response's unused ones when it ends: its ETA then holds
        // whether responses stop early or run to the length limit.
        let mut made = vec![0; chunk.len()];
        let generation = generate_with(model, &ids, &cfg, device, |row, token| {
            made[row] += 1;
            bar.inc(1);
            if token == eos || made[row] == settings.max_new_tokens {
                bar.inc((settings.max_new_tokens - made[row]) as u64);
                finished += 1;
                bar.set_message(format!("{finished}/{} responses", jobs.len()));
            }
        })?;
        if let Some(open) = open.as_mut() {
            open.append(chunk.iter().zip(&generation.tokens).map(|(&prompt_index, tokens)| Kept { prompt_index, tokens: tokens.clone() }))?;
        }
        for (j, tokens) in generation.tokens.into_iter().enumerate() {
            out.push(response(tokenizer, chunk[j], &ids[j], tokens)?);
        }
    }
    bar.finish_and_clear();
    Ok(out)
}

/// A response as the sampling journal keeps it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Kept {
    prompt_index: usize,
    tokens: Vec<u32>,
}

/// The response `tokens` to prompt `prompt_index` (`prompt_ids`), decoded.
fn response(tokenizer: &Tokenizer, prompt_index: usize, prompt_ids: &[u32], tokens: Vec<u32>) -> Result<Response> {
    let text = tokenizer.decode(&tokens, true)?.trim().to_string();
    Ok(Response { prompt_index, prompt_ids: prompt_ids.to_vec(), tokens, text })
}

/// Sampling's progress on stderr (drawn only on a terminal), in token slots: `responses` ×
/// `max_new_tokens`, `done` of the responses read from a journal.
fn progress_bar(responses: usize, done: usize, max_new_tokens: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new((responses * max_new_tokens) as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:30} {msg} sampled [{elapsed_precise} < {eta_precise}]") {
        bar.set_style(style);
    }
    bar.set_position((done * max_new_tokens) as u64);
    bar.reset_eta();
    bar.set_message(format!("{done}/{responses} responses"));
    bar
}

/// Scores responses with `reward`.
pub fn score(responses: &[Response], prompts: &[String], reward: &dyn RewardModel) -> Result<Vec<f64>> {
    let (ps, ts) = scored_texts(responses, prompts);
    reward.score(&ps, &ts)
}

/// [`score`] for the samples file `out`: a long scoring pass keeps its finished batches in
/// `<out>.scores.journal` ([`RewardModel::score_journaled`]); the caller removes it with
/// [`remove_journals`] once `out` is written.
pub fn score_for(out: &Path, responses: &[Response], prompts: &[String], reward: &dyn RewardModel) -> Result<Vec<f64>> {
    let (ps, ts) = scored_texts(responses, prompts);
    reward.score_journaled(&ps, &ts, &scores_journal(out))
}

/// Each response's prompt and text.
fn scored_texts(responses: &[Response], prompts: &[String]) -> (Vec<String>, Vec<String>) {
    responses.iter().map(|r| (prompts[r.prompt_index].clone(), r.text.clone())).unzip()
}

/// Where the scores of the samples file `out` are journaled.
fn scores_journal(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    out.with_file_name(format!("{name}.scores.journal"))
}

/// Removes the journals of the samples file `out` (its responses', `journal`, and its scores'),
/// once `out` is written.
pub fn remove_journals(out: &Path, journal: &Journal) {
    journal.remove();
    let _ = std::fs::remove_file(scores_journal(out));
}

/// Writes the scored-responses JSONL.
pub fn write_scored(path: &Path, responses: &[Response], prompts: &[String], rewards: &[f64]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| PipelineError::io(dir, e))?;
    }
    let mut buf = Vec::new();
    for (r, s) in responses.iter().zip(rewards) {
        let line = serde_json::json!({"prompt": prompts[r.prompt_index], "text": r.text, "reward": s});
        writeln!(buf, "{line}").map_err(|e| PipelineError::io(path, e))?;
    }
    // Atomic: a rerun of an interrupted pipeline reuses a samples file only when it is whole.
    Ok(odpo_model::weights::write_atomic(path, &buf)?)
}

/// What [`sample`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleReport {
    /// The scored-responses file.
    pub path: PathBuf,
    /// Responses written.
    pub responses: usize,
    /// Their mean reward.
    pub mean_reward: f64,
}

/// `cargo xtask sample`: loads the model in `model_dir` (HF folder with its tokenizer), samples k
/// responses per prompt, scores them with `reward` and writes `out` in the paper's format. The
/// finished batches are kept in a [`Journal`] beside `out` until it is written: a stopped pass run
/// again goes on from them.
pub fn sample(model_dir: &Path, prompts: &[String], settings: &SampleSettings, reward: &dyn RewardModel, out: &Path, device: &Device) -> Result<SampleReport> {
    let loaded = CausalLm::load(model_dir, device)?;
    let tokenizer = Tokenizer::open(&loaded.tokenizer_path)?;
    let journal = Journal::beside(out, model_dir)?;
    let responses = sample_journaled(&loaded.model, &tokenizer, prompts, settings, Some(&journal), device)?;
    let rewards = score_for(out, &responses, prompts, reward)?;
    write_scored(out, &responses, prompts, &rewards)?;
    remove_journals(out, &journal);
    let mean_reward = rewards.iter().sum::<f64>() / rewards.len().max(1) as f64;
    Ok(SampleReport { path: out.to_path_buf(), responses: responses.len(), mean_reward })
}

/// Reads prompts, one a line (blank lines skipped), for `cargo xtask sample --prompts FILE`; a
/// file with none is an error (sampling nothing would write an empty file and report success).
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| PipelineError::io(path, e))?;
    let prompts: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if prompts.is_empty() {
        return Err(PipelineError::NoPrompts { path: path.to_path_buf() });
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reward_model_is_found_by_its_spelling_and_a_wrong_one_is_named() -> Result<()> {
        let device = Device::default();
        let known = reward_from_spec("known", &device)?;
        assert_eq!(known.name(), "known (lexicon sum)");
        assert_eq!(known.score(&["p".into()], &["great and dull".into()])?, vec![1.0], "great (2) + dull (-1)");
        let dir = tempfile::tempdir().map_err(|e| PipelineError::io(std::env::temp_dir(), e))?;
        let table = dir.path().join("scored.jsonl");
        std::fs::write(&table, "{\"prompt\": \"p\", \"text\": \"a\", \"reward\": 1.5}\n").map_err(|e| PipelineError::io(&table, e))?;
        let scored = reward_from_spec(&format!("table:{}", table.display()), &device)?;
        assert_eq!(scored.score(&["p".into()], &["a".into()])?, vec![1.5]);
        let wrong = |spec: &str| reward_from_spec(spec, &device).err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(wrong("lexicon"), "config: `reward` `lexicon`: expected `known`, `table:FILE` or `learned:DIR`");
        assert!(wrong("learned:/nonexistent/reward").contains("/nonexistent/reward"), "{}", wrong("learned:/nonexistent/reward"));
        Ok(())
    }
}
