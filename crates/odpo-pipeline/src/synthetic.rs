//! The built-in known-reward task: a small synthetic language of short reviews whose words carry
//! sentiment values, so the ground-truth reward of a continuation is known exactly.
//!
//! A prompt is `<time> <det> <noun> <verb>` ("lately this movie seemed"): 6·4·12·6 = 1,728 distinct
//! prompts. A continuation is three adjectives joined by connectors, some with a neutral modifier,
//! ending with "." ("great and very dull , yet fun ."). Its reward ([`reward`]) is the sum of the
//! adjectives' values, in [-6, 6]. The SFT texts draw a "mood" p ~ U(0, 1) per text and make each
//! adjective positive with probability p, so an SFT model's samples spread over the whole reward
//! range and preference training has room to move. The tokenizer is word-level (one token per
//! word, split on whitespace), written as an HF `tokenizer.json`.

use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::error::{PipelineError, Result};
use crate::reward::KnownReward;

const TIMES: [&str; 6] = ["today", "yesterday", "overall", "somehow", "frankly", "lately"];
const DETS: [&str; 4] = ["the", "this", "that", "my"];
const NOUNS: [&str; 12] = ["movie", "film", "show", "book", "meal", "trip", "song", "game", "hotel", "story", "class", "day"];
const VERBS: [&str; 6] = ["was", "is", "seemed", "felt", "looked", "sounded"];
const CONNECTORS: [&str; 4] = ["and", "but", "so", "yet"];
const MODIFIERS: [&str; 3] = ["very", "quite", "rather"];
/// Positive adjectives and their values.
pub const POSITIVE: [(&str, f64); 10] = [
    ("great", 2.0), ("wonderful", 2.0), ("excellent", 2.0), ("superb", 2.0), ("lovely", 1.5),
    ("good", 1.0), ("nice", 1.0), ("fun", 1.0), ("pleasant", 1.0), ("fine", 0.5),
];
/// Negative adjectives and their values.
pub const NEGATIVE: [(&str, f64); 10] = [
    ("awful", -2.0), ("terrible", -2.0), ("horrible", -2.0), ("dreadful", -2.0), ("boring", -1.5),
    ("bad", -1.0), ("dull", -1.0), ("poor", -1.0), ("messy", -1.0), ("weak", -0.5),
];
/// Padding token (id 0).
pub const PAD: &str = "<pad>";
/// End of sequence (id 1).
pub const EOS: &str = "</s>";
/// Unknown word (id 2).
pub const UNK: &str = "<unk>";
/// Adjective slots in a continuation.
pub const SLOTS: usize = 3;

/// The vocabulary in id order: the special tokens first, then every word once.
pub fn vocabulary() -> Vec<&'static str> {
    let mut v = vec![PAD, EOS, UNK, ".", ","];
    for group in [&TIMES[..], &DETS[..], &NOUNS[..], &VERBS[..], &CONNECTORS[..], &MODIFIERS[..]] {
        v.extend_from_slice(group);
    }
    v.extend(POSITIVE.iter().chain(&NEGATIVE).map(|(w, _)| *w));
    v
}

/// The task's ground-truth reward: the sum of the adjectives' values.
pub fn reward() -> KnownReward {
    KnownReward::from_lexicon(POSITIVE.iter().chain(&NEGATIVE).copied())
}

/// Tokens in every prompt: one word of each of the four kinds (the tokenizer has a token a word).
pub const PROMPT_WORDS: usize = 4;

/// The task model's positions: the longest prompt and response in tokens (prompts are
/// [`PROMPT_WORDS`] words, responses at most `sample.max_new_tokens`, which the pipeline config
/// checks against it).
pub const MAX_POSITIONS: usize = 32;

/// Every prompt, in a fixed order.
pub fn all_prompts() -> Vec<String> {
    let mut out = Vec::with_capacity(TIMES.len() * DETS.len() * NOUNS.len() * VERBS.len());
    for t in TIMES {
        for d in DETS {
            for n in NOUNS {
                for v in VERBS {
                    out.push(format!("{t} {d} {n} {v}"));
                }
            }
        }
    }
    out
}

/// The prompts split once, by `seed`: `eval` (held out from every training stage) and `train`
/// (for SFT texts and preference sampling).
#[derive(Clone, Debug, PartialEq)]
pub struct PromptSplit {
    /// Prompts used by SFT and preference sampling.
    pub train: Vec<String>,
    /// Held-out prompts for evaluation.
    pub eval: Vec<String>,
}

/// Shuffles [`all_prompts`] with `seed` and holds out the first `n_eval`.
pub fn split_prompts(seed: u64, n_eval: usize) -> Result<PromptSplit> {
    let mut all = all_prompts();
    if n_eval >= all.len() {
        return Err(PipelineError::config("task.eval_prompts", format!("is {n_eval}; the task has {} prompts in all", all.len())));
    }
    all.shuffle(&mut StdRng::seed_from_u64(seed));
    let train = all.split_off(n_eval);
    Ok(PromptSplit { train, eval: all })
}

/// One SFT continuation: a mood p ~ U(0, 1), then [`SLOTS`] adjectives, each positive with
/// probability p, a modifier before an adjective with probability 0.3.
pub fn sample_continuation(rng: &mut StdRng) -> String {
    let mood: f64 = rng.random();
    let mut words: Vec<&str> = Vec::with_capacity(2 * SLOTS + 2);
    for slot in 0..SLOTS {
        if slot > 0 {
            if rng.random_bool(0.3) {
                words.push(",");
            }
            words.push(CONNECTORS[rng.random_range(0..CONNECTORS.len())]);
        }
        if rng.random_bool(0.3) {
            words.push(MODIFIERS[rng.random_range(0..MODIFIERS.len())]);
        }
        let pool = if rng.random_bool(mood) { &POSITIVE } else { &NEGATIVE };
        words.push(pool[rng.random_range(0..pool.len())].0);
    }
    words.push(".");
    words.join(" ")
}

/// Writes `tokenizer.json` (HF format: WordLevel model, whitespace split, no normalizer; decoding
/// joins words with spaces) and `tokenizer_config.json` (EOS, pad and unk tokens) into `dir`.
pub fn write_tokenizer(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| PipelineError::io(dir, e))?;
    let vocab = vocabulary();
    let specials: Vec<Value> = [PAD, EOS, UNK]
        .iter()
        .enumerate()
        .map(|(id, t)| json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let map: serde_json::Map<String, Value> = vocab.iter().enumerate().map(|(i, w)| (w.to_string(), json!(i))).collect();
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": specials,
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": map, "unk_token": UNK},
    });
    let config = json!({"eos_token": EOS, "pad_token": PAD, "unk_token": UNK, "model_max_length": 64});
    write_json(&dir.join("tokenizer.json"), &tokenizer)?;
    write_json(&dir.join("tokenizer_config.json"), &config)
}

/// An HF GPT-2 `config.json` for the task's vocabulary.
pub fn gpt2_config(n_layer: usize, n_embd: usize, n_head: usize, n_positions: usize) -> Value {
    json!({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": vocabulary().len(), "n_positions": n_positions, "n_embd": n_embd,
        "n_layer": n_layer, "n_head": n_head, "n_inner": null, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0,
    })
}

/// Writes pretty JSON to `path`.
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| PipelineError::Json { path: path.to_path_buf(), line: 0, message: e.to_string() })?;
    Ok(odpo_model::weights::write_atomic(path, text.as_bytes())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward::RewardModel;

    #[test]
    fn vocabulary_is_small_and_unique() {
        let v = vocabulary();
        let mut sorted = v.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), v.len());
        assert_eq!(v.len(), 60);
        assert_eq!(all_prompts().len(), 1728);
    }

    #[test]
    fn reward_by_hand() -> Result<()> {
        let r = reward();
        assert_eq!(r.text_reward("great and very dull , yet fun ."), 2.0 - 1.0 + 1.0);
        assert_eq!(r.text_reward("awful but terrible so weak ."), -4.5);
        assert_eq!(r.text_reward("great and superb and excellent ."), 6.0);
        // The prompt never counts.
        assert_eq!(r.score(&["the good film was".into()], &["fine .".into()])?, vec![0.5]);
        Ok(())
    }

    #[test]
    fn continuations_are_in_the_vocabulary_and_spread() {
        let mut rng = StdRng::seed_from_u64(1);
        let vocab = vocabulary();
        let r = reward();
        let rewards: Vec<f64> = (0..500)
            .map(|_| {
                let c = sample_continuation(&mut rng);
                assert!(c.split_whitespace().all(|w| vocab.contains(&w)), "{c}");
                r.text_reward(&c)
            })
            .collect();
        let (lo, hi) = rewards.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        assert!(lo <= -4.0 && hi >= 4.0, "{lo} {hi}");
    }

    #[test]
    fn tokenizer_round_trips() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| PipelineError::io(std::env::temp_dir(), e))?;
        let dir = tmp.path();
        write_tokenizer(dir)?;
        let tok = odpo_model::tokenizer::Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        assert_eq!(tok.eos_token_id(), Some(1));
        assert_eq!(tok.pad_token_id(), Some(0));
        let text = "lately this movie seemed great and very dull , yet fun .";
        let ids = tok.encode(text, true)?;
        assert_eq!(ids.len(), 12);
        assert_eq!(tok.decode(&ids, true)?, text);
        let mut with_eos = ids.clone();
        with_eos.push(1);
        assert_eq!(tok.decode(&with_eos, true)?, text);
        Ok(())
    }
}
