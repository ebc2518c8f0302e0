//! Reward models: whatever scores a (prompt, text) pair. [`KnownReward`] is a ground-truth reward
//! given as a word lexicon (the synthetic task's), [`ScoreTable`] looks scores up in data that is
//! already scored (the paper's `{"prompt", "text", "reward"}` JSONL).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{PipelineError, Result};

/// Scores texts, a batch at a time.
pub trait RewardModel {
    /// One score per `(prompts[i], texts[i])`; `prompts` and `texts` have the same length.
    fn score(&self, prompts: &[String], texts: &[String]) -> Result<Vec<f64>>;

    /// [`Self::score`], keeping the finished batches of a long scoring pass (a learned reward runs
    /// its backbone over every text) in the journal at `journal`, for a pass stopped and run again
    /// to go on from them. The default scores as [`Self::score`] does: a quick score keeps nothing.
    fn score_journaled(&self, prompts: &[String], texts: &[String], journal: &std::path::Path) -> Result<Vec<f64>> {
        let _ = journal;
        self.score(prompts, texts)
    }

    /// A short name for reports.
    fn name(&self) -> String;
}

/// A known reward: the sum of the values of the continuation's whitespace-separated words
/// (words outside the lexicon are worth 0). The prompt does not count.
#[derive(Clone, Debug, PartialEq)]
pub struct KnownReward {
    values: HashMap<String, f64>,
}

impl KnownReward {
    /// A reward from `(word, value)` entries.
    pub fn from_lexicon<'a>(entries: impl IntoIterator<Item = (&'a str, f64)>) -> Self {
        Self { values: entries.into_iter().map(|(w, v)| (w.to_string(), v)).collect() }
    }

    /// The value of one word (0 outside the lexicon).
    pub fn word_value(&self, word: &str) -> f64 {
        self.values.get(word).copied().unwrap_or(0.0)
    }

    /// The reward of one text.
    pub fn text_reward(&self, text: &str) -> f64 {
        text.split_whitespace().map(|w| self.word_value(w)).sum()
    }
}

impl RewardModel for KnownReward {
    fn score(&self, _prompts: &[String], texts: &[String]) -> Result<Vec<f64>> {
        Ok(texts.iter().map(|t| self.text_reward(t)).collect())
    }

    fn name(&self) -> String {
        "known (lexicon sum)".into()
    }
}

/// A sentiment classifier's score put on a known reward, the shape of the ODPO paper's IMDB scores:
///
/// ```text
/// p = σ(R/τ + ε),   ε ~ N(0, σ²),   s = p + 1[p > 0.5]      every s in [0, 0.5) ∪ (1.5, 2]
/// ```
///
/// R is the known reward, τ (`temperature`) how sharply p saturates, σ (`noise`) the classifier's error.
/// ε is a fixed function of (seed, prompt, text), as a real classifier's error is: the same text always
/// gets the same score, and two responses on the same side of 0.5 are often near-ties whose order is
/// partly noise. Pairs and offsets then see s; evaluation still uses R.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassifierScore {
    reward: KnownReward,
    temperature: f64,
    noise: f64,
    seed: u64,
}

impl ClassifierScore {
    /// The classifier-shaped score of `reward` with τ = `temperature`, σ = `noise`, ε seeded by `seed`.
    pub fn new(reward: KnownReward, temperature: f64, noise: f64, seed: u64) -> Self {
        Self { reward, temperature, noise, seed }
    }

    /// ε for one (prompt, text): a standard normal (Box–Muller) from an RNG seeded by an FNV-1a hash of
    /// the seed, prompt and text, times σ.
    pub fn noise_of(&self, prompt: &str, text: &str) -> f64 {
        use rand::{Rng, SeedableRng};
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.seed.to_le_bytes().iter().chain(prompt.as_bytes()).chain(&[0xff]).chain(text.as_bytes()) {
            h = (h ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(h);
        let (u1, u2): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random());
        self.noise * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// s for one (prompt, text).
    pub fn text_score(&self, prompt: &str, text: &str) -> f64 {
        let z = self.reward.text_reward(text) / self.temperature + self.noise_of(prompt, text);
        let p = 1.0 / (1.0 + (-z).exp());
        if p > 0.5 { p + 1.0 } else { p }
    }
}

impl RewardModel for ClassifierScore {
    fn score(&self, prompts: &[String], texts: &[String]) -> Result<Vec<f64>> {
        Ok(prompts.iter().zip(texts).map(|(p, t)| self.text_score(p, t)).collect())
    }

    fn name(&self) -> String {
        format!("classifier-shaped (tau {}, noise {})", self.temperature, self.noise)
    }
}

/// Scores read from a scored-responses JSONL file (`{"prompt", "text", "reward"}` per line): a text
/// that is not in the table is an error, never a silent 0.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoreTable {
    path: PathBuf,
    scores: HashMap<(String, String), f64>,
}

impl ScoreTable {
    /// Reads the table; a line without a string `prompt`, a string `text` or a finite `reward` is an
    /// error naming file and line. A repeated (prompt, text) keeps its last score.
    pub fn from_jsonl(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| PipelineError::io(path, e))?;
        let mut scores = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |message: String| PipelineError::Json { path: path.to_path_buf(), line: i + 1, message };
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
            let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string).ok_or_else(|| bad(format!("`{k}` is missing or not a string")));
            let (prompt, text) = (field("prompt")?, field("text")?);
            let reward = v.get("reward").and_then(serde_json::Value::as_f64).filter(|r| r.is_finite());
            let reward = reward.ok_or_else(|| bad("`reward` is missing or not a finite number".into()))?;
            scores.insert((prompt, text), reward);
        }
        Ok(Self { path: path.to_path_buf(), scores })
    }

    /// Every `(prompt, text, score)`, sorted.
    pub fn entries(&self) -> Vec<(String, String, f64)> {
        let mut v: Vec<(String, String, f64)> = self.scores.iter().map(|((p, t), s)| (p.clone(), t.clone(), *s)).collect();
        v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        v
    }

    /// Number of scored (prompt, text) entries.
    pub fn len(&self) -> usize {
        self.scores.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }
}

impl RewardModel for ScoreTable {
    fn score(&self, prompts: &[String], texts: &[String]) -> Result<Vec<f64>> {
        prompts
            .iter()
            .zip(texts)
            .map(|(p, t)| {
                self.scores.get(&(p.clone(), t.clone())).copied().ok_or_else(|| PipelineError::Unscored {
                    path: self.path.clone(),
                    prompt: p.clone(),
                    text: t.clone(),
                })
            })
            .collect()
    }

    fn name(&self) -> String {
        format!("score table {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_reward_sums_word_values() -> Result<()> {
        let r = KnownReward::from_lexicon([("good", 1.0), ("great", 2.0), ("bad", -1.0)]);
        assert_eq!(r.text_reward("good and great ."), 3.0);
        assert_eq!(r.text_reward("bad but good"), 0.0);
        assert_eq!(r.text_reward("bad bad unknown"), -2.0);
        assert_eq!(r.text_reward(""), 0.0);
        let s = r.score(&["the film was".into(), "x".into()], &["great".into(), "bad .".into()])?;
        assert_eq!(s, vec![2.0, -1.0]);
        Ok(())
    }

    #[test]
    fn classifier_score_has_two_clusters_and_fixed_noise() -> Result<()> {
        let known = KnownReward::from_lexicon([("good", 2.0), ("bad", -2.0)]);
        // Without noise: s = σ(R/τ) + 1[σ(R/τ) > 0.5], by hand.
        let c = ClassifierScore::new(known.clone(), 2.0, 0.0, 7);
        let sig = |z: f64| 1.0 / (1.0 + (-z).exp());
        assert_eq!(c.text_score("p", "good"), sig(1.0) + 1.0);
        assert_eq!(c.text_score("p", "bad"), sig(-1.0));
        assert_eq!(c.text_score("p", "meh"), 0.5); // p = 0.5 exactly is not positive
        // With noise: fixed per (prompt, text), different across texts, prompts and seeds; always in the
        // two clusters; ε ~ N(0, σ²).
        let c = ClassifierScore::new(known.clone(), 1.0, 1.5, 7);
        assert_eq!(c.noise_of("p", "good"), c.noise_of("p", "good"));
        assert_ne!(c.noise_of("p", "good"), c.noise_of("q", "good"));
        assert_ne!(c.noise_of("p", "good"), ClassifierScore::new(known, 1.0, 1.5, 8).noise_of("p", "good"));
        let eps: Vec<f64> = (0..4000).map(|i| c.noise_of("p", &format!("text {i}"))).collect();
        let mean = eps.iter().sum::<f64>() / eps.len() as f64;
        let sd = (eps.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / eps.len() as f64).sqrt();
        assert!(mean.abs() < 0.08 && (sd - 1.5).abs() < 0.08, "mean {mean} sd {sd}");
        let texts: Vec<String> = (0..200).map(|i| if i % 2 == 0 { format!("good {i}") } else { format!("bad {i}") }).collect();
        let scores = c.score(&vec!["p".to_string(); texts.len()], &texts)?;
        assert!(scores.iter().all(|&s| (0.0..0.5).contains(&s) || (s > 1.5 && s <= 2.0)), "{scores:?}");
        assert!(scores.iter().any(|&s| s < 0.5) && scores.iter().any(|&s| s > 1.5));
        Ok(())
    }

    #[test]
    fn score_table_looks_up_and_refuses_unknown_texts() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| PipelineError::io(std::env::temp_dir(), e))?;
        let dir = tmp.path();
        let path = dir.join("s.jsonl");
        std::fs::write(&path, "{\"prompt\":\"p\",\"text\":\"a\",\"reward\":1.5}\n\n{\"prompt\":\"p\",\"text\":\"b\",\"reward\":-2}\n")
            .map_err(|e| PipelineError::io(&path, e))?;
        let t = ScoreTable::from_jsonl(&path)?;
        assert_eq!(t.len(), 2);
        assert_eq!(t.score(&["p".into(), "p".into()], &["b".into(), "a".into()])?, vec![-2.0, 1.5]);
        let e = t.score(&["q".into()], &["a".into()]).map(|_| ()).map_err(|e| e.to_string()).err().unwrap_or_default();
        assert!(e.contains("no score for prompt \"q\""), "{e}");
        std::fs::write(&path, "{\"prompt\":\"p\",\"text\":\"a\"}\n").map_err(|e| PipelineError::io(&path, e))?;
        let e = ScoreTable::from_jsonl(&path).map(|_| ()).map_err(|e| e.to_string()).err().unwrap_or_default();
        assert!(e.ends_with("s.jsonl:1: `reward` is missing or not a finite number"), "{e}");
        Ok(())
    }
}
