//! Tokenization of pairs: the prompt/completion boundary and the truncation rule.
//!
//! - The prompt is rendered with the tokenizer's chat template (user turn + generation prompt) or taken as
//!   plain text, and tokenized alone (special tokens added for plain text only; a template writes its own).
//! - Each completion is `separator + text`, tokenized alone (no special tokens) and appended, then EOS. So the
//!   boundary is exact: the loss mask covers the completion's tokens and the EOS, nothing of the prompt.
//!   (A multi-turn message completion is the template's rendering of prompt + completion minus the prompt's.)
//! - Truncation: a prompt longer than `max_prompt_length` keeps its last tokens. A pair whose prompt leaves
//!   no room for one completion token in `max_length` is dropped. A completion that does not fit after the
//!   prompt is cut at its end, or its pair dropped (`long_completion`); every case is counted.

use std::cell::RefCell;
use std::collections::HashMap;

use odpo_model::tokenizer::{ChatMessage, Tokenizer};

use crate::config::{DataConfig, LongCompletion};
use crate::error::DataError;
use crate::pairs::{PreferencePair, Text};

/// One pair as token ids, ready to batch.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenizedPair {
    /// The pair's id ([`PreferencePair::id`]).
    pub pair_id: usize,
    /// Prompt tokens (after truncation).
    pub prompt: Vec<u32>,
    /// Chosen completion tokens, EOS included unless cut.
    pub chosen: Vec<u32>,
    /// Rejected completion tokens, EOS included unless cut.
    pub rejected: Vec<u32>,
    /// The offset Δ.
    pub offset: f32,
    /// The weight, where the data has one.
    pub weight: Option<f32>,
}

impl TokenizedPair {
    /// Tokens of the pair's longer row (prompt and the longer completion): the positions a model
    /// runs it at.
    pub fn row_len(&self) -> usize {
        self.prompt.len() + self.chosen.len().max(self.rejected.len())
    }
}

/// Counts from tokenizing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenizeReport {
    /// Pairs kept.
    pub kept: usize,
    /// Prompts cut to `max_prompt_length` (their start removed).
    pub prompts_truncated: usize,
    /// Completions cut to fit `max_length` (counted per completion).
    pub completions_truncated: usize,
    /// Pairs dropped because the prompt alone fills `max_length`.
    pub dropped_prompt_too_long: usize,
    /// Pairs dropped because a completion does not fit (`long_completion = "drop"`).
    pub dropped_completion_too_long: usize,
}

impl TokenizeReport {
    /// Adds another part's counts.
    pub fn add(&mut self, o: &TokenizeReport) {
        self.kept += o.kept;
        self.prompts_truncated += o.prompts_truncated;
        self.completions_truncated += o.completions_truncated;
        self.dropped_prompt_too_long += o.dropped_prompt_too_long;
        self.dropped_completion_too_long += o.dropped_completion_too_long;
    }
}

/// Token counts of one pair before truncation (for statistics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawLengths {
    /// Prompt tokens.
    pub prompt: usize,
    /// Chosen tokens (with EOS).
    pub chosen: usize,
    /// Rejected tokens (with EOS).
    pub rejected: usize,
}

/// A pair's prompt, chosen and rejected token ids.
pub type PairIds = (Vec<u32>, Vec<u32>, Vec<u32>);

/// Renders and tokenizes pairs for one tokenizer and config. A prompt or response shared by several
/// pairs (every pair of a prompt shares it; all-pairs puts each response in several pairs) is rendered
/// and tokenized once: the results are kept by their text, so the ids are exactly those of a fresh call.
pub struct PairTokenizer<'a> {
    tokenizer: &'a Tokenizer,
    cfg: &'a DataConfig,
    eos: u32,
    /// Token ids by text: `[without special tokens, with them]`.
    encoded: [RefCell<HashMap<String, Vec<u32>>>; 2],
}

impl<'a> PairTokenizer<'a> {
    /// Checks that the tokenizer can do what the config asks (an EOS token; a chat template if wanted).
    pub fn new(tokenizer: &'a Tokenizer, cfg: &'a DataConfig) -> Result<Self, DataError> {
        let eos = tokenizer
            .eos_token_id()
            .ok_or_else(|| DataError::Config("the tokenizer has no EOS token to end completions with".into()))?;
        if cfg.chat_template && !tokenizer.has_chat_template() {
            return Err(DataError::Config(
                "`chat_template = true` but the tokenizer has no chat template; set `chat_template = false`".into(),
            ));
        }
        Ok(PairTokenizer { tokenizer, cfg, eos, encoded: Default::default() })
    }

    fn tok_err(pair: usize) -> impl Fn(odpo_model::tokenizer::TokenizerError) -> DataError {
        move |source| DataError::Tokenizer { pair, source }
    }

    /// The prompt as the model sees it, before tokenizing.
    pub fn render_prompt(&self, pair: usize, prompt: &Text) -> Result<String, DataError> {
        match (prompt, self.cfg.chat_template) {
            (Text::Plain(p), false) => Ok(p.clone()),
            (Text::Plain(p), true) => self.tokenizer.chat_prompt(p).map_err(Self::tok_err(pair)),
            (Text::Messages(m), true) => self.tokenizer.apply_chat_template(m, true).map_err(Self::tok_err(pair)),
            // The loader refuses messages without a template; flat text keeps this total.
            (t @ Text::Messages(_), false) => Ok(t.flat()),
        }
    }

    /// A completion's text as appended after the rendered prompt.
    pub fn render_completion(&self, pair: usize, prompt: &Text, rendered_prompt: &str, completion: &Text) -> Result<String, DataError> {
        match completion {
            // An empty response is the EOS alone, without the separator.
            Text::Plain(c) if c.is_empty() => Ok(String::new()),
            Text::Plain(c) => Ok(format!("{}{c}", self.cfg.separator)),
            Text::Messages(m) => {
                let mut all: Vec<ChatMessage> = match prompt {
                    Text::Plain(p) => vec![ChatMessage::new("user", p.as_str())],
                    Text::Messages(pm) => pm.clone(),
                };
                all.extend(m.iter().cloned());
                let full = self.tokenizer.apply_chat_template(&all, false).map_err(Self::tok_err(pair))?;
                match full.strip_prefix(rendered_prompt) {
                    Some(completion) => Ok(completion.to_owned()),
                    None => {
                        let start = |s: &str| s.chars().take(120).collect::<String>();
                        Err(DataError::TemplateMismatch { pair, prompt: start(rendered_prompt), conversation: start(&full) })
                    }
                }
            }
        }
    }

    /// `tokenizer.encode(text, special)`, once per distinct text.
    fn encode(&self, pair: usize, text: &str, special: bool) -> Result<Vec<u32>, DataError> {
        // Looked up by `&str`: a hit allocates nothing but the ids it returns.
        let cache = &self.encoded[usize::from(special)];
        if let Some(ids) = cache.borrow().get(text) {
            return Ok(ids.clone());
        }
        let ids = self.tokenizer.encode(text, special).map_err(Self::tok_err(pair))?;
        cache.borrow_mut().insert(text.to_string(), ids.clone());
        Ok(ids)
    }

    /// A completion's ids, ending in exactly one EOS: added when the text has none, and repeats
    /// collapsed when it already has some (a template that ends every turn with EOS, written out
    /// again in the data, would otherwise train the model to say EOS twice).
    fn encode_completion(&self, pair: usize, text: &str) -> Result<Vec<u32>, DataError> {
        let mut ids = self.encode(pair, text, false)?;
        while ids.len() >= 2 && ids[ids.len() - 1] == self.eos && ids[ids.len() - 2] == self.eos {
            ids.pop();
        }
        if ids.last() != Some(&self.eos) {
            ids.push(self.eos);
        }
        Ok(ids)
    }

    /// Prompt, chosen and rejected ids of a pair, untruncated.
    pub fn encode_pair(&self, p: &PreferencePair) -> Result<PairIds, DataError> {
        let rp = self.render_prompt(p.id, &p.prompt)?;
        let prompt = self.encode(p.id, &rp, !self.cfg.chat_template)?;
        let chosen = self.encode_completion(p.id, &self.render_completion(p.id, &p.prompt, &rp, &p.chosen)?)?;
        let rejected = self.encode_completion(p.id, &self.render_completion(p.id, &p.prompt, &rp, &p.rejected)?)?;
        Ok((prompt, chosen, rejected))
    }

    /// Tokenizes and truncates one pair; `None` when the pair is dropped (counted in `report`).
    pub fn tokenize(&self, p: &PreferencePair, report: &mut TokenizeReport) -> Result<Option<TokenizedPair>, DataError> {
        let (mut prompt, mut chosen, mut rejected) = self.encode_pair(p)?;
        if let Some(mp) = self.cfg.max_prompt_length
            && prompt.len() > mp
        {
            prompt.drain(..prompt.len() - mp);
            report.prompts_truncated += 1;
        }
        let max = self.cfg.max_length;
        if prompt.len() >= max {
            report.dropped_prompt_too_long += 1;
            return Ok(None);
        }
        let room = max - prompt.len();
        if chosen.len().max(rejected.len()) > room {
            if self.cfg.long_completion == LongCompletion::Drop {
                report.dropped_completion_too_long += 1;
                return Ok(None);
            }
            for c in [&mut chosen, &mut rejected] {
                if c.len() > room {
                    c.truncate(room);
                    report.completions_truncated += 1;
                }
            }
        }
        report.kept += 1;
        Ok(Some(TokenizedPair {
            pair_id: p.id,
            prompt,
            chosen,
            rejected,
            offset: p.offset as f32,
            weight: p.weight.map(|w| w as f32),
        }))
    }
}

/// Tokenizes pairs with the config's rules, returning the kept pairs and the counts.
pub fn tokenize_pairs(
    pairs: &[PreferencePair],
    tokenizer: &Tokenizer,
    cfg: &DataConfig,
) -> Result<(Vec<TokenizedPair>, TokenizeReport), DataError> {
    let parts = in_parallel(pairs, tokenizer, cfg, |t, chunk| {
        let mut report = TokenizeReport::default();
        let mut out = Vec::with_capacity(chunk.len());
        for p in chunk {
            if let Some(tp) = t.tokenize(p, &mut report)? {
                out.push(tp);
            }
        }
        Ok((out, report))
    })?;
    let mut report = TokenizeReport::default();
    let mut out = Vec::with_capacity(pairs.len());
    for (items, r) in parts {
        out.extend(items);
        report.add(&r);
    }
    Ok((out, report))
}

/// Runs `f` on contiguous chunks of `pairs`, one per core (each with its own [`PairTokenizer`] and its
/// cache), and returns the results in order; the first error in pair order wins, as one pass would give.
pub fn in_parallel<T: Send>(
    pairs: &[PreferencePair],
    tokenizer: &Tokenizer,
    cfg: &DataConfig,
    f: impl Fn(&PairTokenizer<'_>, &[PreferencePair]) -> Result<T, DataError> + Sync,
) -> Result<Vec<T>, DataError> {
    // Small inputs stay on one thread: a thread costs more than a few hundred pairs.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(pairs.len().div_ceil(512)).max(1);
    if threads == 1 {
        return Ok(vec![f(&PairTokenizer::new(tokenizer, cfg)?, pairs)?]);
    }
    let chunk = pairs.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = pairs.chunks(chunk).map(|c| s.spawn(|| f(&PairTokenizer::new(tokenizer, cfg)?, c))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(DataError::Config("a tokenizing thread panicked".into())))).collect()
    })
}

/// One sequence for supervised fine-tuning: prompt (may be empty) then completion; the loss covers the
/// completion.
#[derive(Clone, Debug, PartialEq)]
pub struct SftItem {
    /// The source id (pair id or text index).
    pub id: usize,
    /// All tokens.
    pub ids: Vec<u32>,
    /// Tokens before the completion (not trained on).
    pub prompt_len: usize,
}

/// SFT items from pairs: prompt + chosen completion, with the same rendering and truncation as the pairs.
pub fn sft_from_pairs(pairs: &[PreferencePair], tokenizer: &Tokenizer, cfg: &DataConfig) -> Result<(Vec<SftItem>, TokenizeReport), DataError> {
    let (tp, report) = tokenize_pairs(pairs, tokenizer, cfg)?;
    let items = tp
        .into_iter()
        .map(|t| {
            let prompt_len = t.prompt.len();
            let mut ids = t.prompt;
            ids.extend(t.chosen);
            SftItem { id: t.pair_id, ids, prompt_len }
        })
        .collect();
    Ok((items, report))
}

/// SFT items from plain texts, trained on whole (special tokens added, EOS appended, cut at `max_length`).
pub fn sft_from_texts(texts: &[String], tokenizer: &Tokenizer, max_length: usize) -> Result<Vec<SftItem>, DataError> {
    let eos = tokenizer
        .eos_token_id()
        .ok_or_else(|| DataError::Config("the tokenizer has no EOS token to end texts with".into()))?;
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut ids = tokenizer.encode(t, true).map_err(|source| DataError::Tokenizer { pair: i, source })?;
            if ids.last() != Some(&eos) {
                ids.push(eos);
            }
            ids.truncate(max_length);
            Ok(SftItem { id: i, ids, prompt_len: 0 })
        })
        .collect()
}
