//! Batched generation with a KV cache: left padding, greedy or temperature / top-k / top-p
//! sampling, stopping at EOS, seeded.

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand::rngs::StdRng;

use crate::error::{ModelError, Result};
use crate::model::CausalLm;

/// How the next token is chosen.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingConfig {
    /// Pick the most likely token (ignores the other fields).
    pub greedy: bool,
    /// Softmax temperature (finite, > 0).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `p` (1.0 = off).
    pub top_p: f64,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { greedy: false, temperature: 1.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    /// At most this many new tokens per sequence.
    pub max_new_tokens: usize,
    /// Tokens that end a sequence (kept in the output).
    pub eos_token_ids: Vec<u32>,
    /// Token used to pad (never attended to).
    pub pad_token_id: u32,
    /// Sampling settings.
    pub sampling: SamplingConfig,
}

/// Generated continuations, one per prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// New tokens of each sequence, ending with an EOS token when one was produced.
    pub tokens: Vec<Vec<u32>>,
    /// `log p(token)` under the model itself (temperature 1, no truncation), per new token:
    /// what KL estimates need, whatever sampler chose the token.
    pub logprobs: Vec<Vec<f32>>,
}

/// Generates continuations of `prompts` (token ids, unpadded, possibly of different lengths).
pub fn generate(model: &CausalLm, prompts: &[Vec<u32>], cfg: &GenerationConfig, device: &Device) -> Result<Generation> {
    generate_with(model, prompts, cfg, device, |_, _| {})
}

/// [`generate`], calling `on_token(row, token)` for each new token as it is chosen (in row order
/// within a step): for printing text as it comes, or a progress bar. A row's EOS token is passed
/// too; a finished row gets no further calls.
pub fn generate_with(model: &CausalLm, prompts: &[Vec<u32>], cfg: &GenerationConfig, device: &Device, mut on_token: impl FnMut(usize, u32)) -> Result<Generation> {
    let s = &cfg.sampling;
    let usable_temperature = s.temperature.is_finite() && s.temperature > 0.0;
    if !s.greedy && !usable_temperature {
        return Err(ModelError::Invalid(format!("temperature must be finite and > 0, got {}", s.temperature)));
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return Err(ModelError::Invalid(format!("top_p must be in (0, 1], got {}", s.top_p)));
    }
    if prompts.iter().any(Vec::is_empty) {
        return Err(ModelError::Invalid("a prompt has no tokens".into()));
    }
    let b = prompts.len();
    let mut out = Generation { tokens: vec![Vec::new(); b], logprobs: vec![Vec::new(); b] };
    if b == 0 || cfg.max_new_tokens == 0 {
        return Ok(out);
    }
    let mut rng = StdRng::seed_from_u64(s.seed);
    let t0 = prompts.iter().map(Vec::len).max().unwrap_or(0);
    model.check_positions(t0 + cfg.max_new_tokens, || format!("a prompt of {t0} tokens and {} new ones (`max_new_tokens`)", cfg.max_new_tokens))?;
    for (i, p) in prompts.iter().enumerate() {
        model.check_tokens(p, || format!("prompt {i}"))?;
    }
    // The padding token is embedded (and masked) where prompts differ in length.
    if prompts.iter().any(|p| p.len() < t0) {
        model.check_tokens([&cfg.pad_token_id], || "the padding token (`pad_token_id`)".into())?;
    }
    // Left padding puts every prompt's last token in the last column.
    let mut ids: Vec<Vec<i64>> = Vec::with_capacity(b);
    let mut mask: Vec<Vec<i64>> = Vec::with_capacity(b);
    for p in prompts {
        let pad = t0 - p.len();
        ids.push(std::iter::repeat_n(i64::from(cfg.pad_token_id), pad).chain(p.iter().map(|&x| i64::from(x))).collect());
        mask.push(std::iter::repeat_n(0, pad).chain(std::iter::repeat_n(1, p.len())).collect());
    }
    let every = |rows: &[Vec<i64>]| rows.iter().flatten().copied().collect::<Vec<i64>>();
    let mut cache = model.new_cache();
    let mut input = Tensor::<2, Int>::from_data(TensorData::new(every(&ids), [b, t0]), device);
    let longest = |mask: &[Vec<i64>]| mask.iter().map(|r| r.iter().sum::<i64>()).max().unwrap_or(0) as usize;
    // Whether the cache was filled with the short frequencies of a model that switches.
    let mut cached_short = model.rope_switch().is_some_and(|o| longest(&mask) <= o);
    let mut done = vec![false; b];
    for _ in 0..cfg.max_new_tokens {
        let t_total = mask[0].len();
        if cached_short && model.rope_switch().is_some_and(|o| longest(&mask) > o) {
            // The sequence has outgrown the short frequencies: encode it all again with the long ones.
            (cache, cached_short) = (model.new_cache(), false);
            input = Tensor::<2, Int>::from_data(TensorData::new(every(&ids), [b, t_total]), device);
        }
        let m = Tensor::<2, Int>::from_data(TensorData::new(every(&mask), [b, t_total]), device);
        // Only the last column's logits are needed: the LM head skips the rest of the prompt.
        let hidden = model.hidden(input, &m, Some(&mut cache));
        let t = hidden.dims()[1];
        let logits = model.head(hidden.narrow(1, t - 1, 1));
        let v = logits.dims()[2];
        let last = logits.reshape([b, v]);
        let host = last.into_data().convert::<f32>().try_into_vec::<f32>().map_err(|e| ModelError::Invalid(format!("{e:?}")))?;
        let picks = choose_rows(&host, v, &done, s, &mut rng);
        let mut next = Vec::with_capacity(b);
        for (row, pick) in picks.into_iter().enumerate() {
            let Some((token, logprob)) = pick else {
                next.push(i64::from(cfg.pad_token_id));
                ids[row].push(i64::from(cfg.pad_token_id));
                mask[row].push(0);
                continue;
            };
            on_token(row, token as u32);
            out.tokens[row].push(token as u32);
            out.logprobs[row].push(logprob);
            done[row] = cfg.eos_token_ids.contains(&(token as u32));
            next.push(token as i64);
            ids[row].push(token as i64);
            mask[row].push(1);
        }
        if done.iter().all(|&d| d) {
            break;
        }
        input = Tensor::<2, Int>::from_data(TensorData::new(next, [b, 1]), device);
    }
    Ok(out)
}

/// The next token and its log-probability for each row not `done` (`None` for those). The rows'
/// arithmetic runs in parallel; the random numbers are drawn in row order, one for each row that
/// samples, so a seed gives the tokens a row-by-row loop gives.
fn choose_rows(host: &[f32], v: usize, done: &[bool], s: &SamplingConfig, rng: &mut StdRng) -> Vec<Option<(usize, f32)>> {
    use rayon::prelude::*;
    let rows: Vec<&[f32]> = host.chunks_exact(v).zip(done).filter(|&(_, &d)| !d).map(|(logits, _)| logits).collect();
    let draws: Vec<Draw> = rows.par_iter().map(|logits| prepare(logits, s)).collect();
    let us: Vec<f64> = draws.iter().map(|d| if matches!(d, Draw::Weighted { .. }) { rng.random::<f64>() } else { 0.0 }).collect();
    let picked: Vec<(usize, f32)> = rows
        .par_iter()
        .zip(draws)
        .zip(us)
        .map(|((&logits, draw), u)| {
            let token = finish(logits, s, &draw, u);
            // Untruncated at temperature 1, the sampler's total is the softmax's own sum.
            let logprob = match draw {
                Draw::Weighted { max, total, kept: None } if s.temperature == 1.0 => (f64::from(logits[token] - max) - total.ln()) as f32,
                _ => log_softmax_at(logits, token),
            };
            (token, logprob)
        })
        .collect();
    let mut picked = picked.into_iter();
    done.iter().map(|&d| if d { None } else { picked.next() }).collect()
}

fn log_softmax_at(logits: &[f32], i: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| f64::from(x - max).exp()).sum();
    (f64::from(logits[i] - max) - sum.ln()) as f32
}

/// A row's choice up to the random draw.
enum Draw {
    /// Decided without one: greedy, or weights that do not sum to a positive finite number.
    Token(usize),
    /// `exp((x − max) / T)` over the vocabulary (`kept: None`, recomputed as the walk goes) or over
    /// the top-k / top-p tokens kept, summing to `total`.
    Weighted { max: f32, total: f64, kept: Option<Vec<(usize, f64)>> },
}

fn argmax(logits: &[f32]) -> usize {
    logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best }).0
}

fn weight(x: f32, max: f32, temperature: f64) -> f64 {
    (f64::from(x - max) / temperature).exp()
}

/// Everything of picking the next token from one row of logits that comes before the random draw.
fn prepare(logits: &[f32], s: &SamplingConfig) -> Draw {
    if s.greedy {
        return Draw::Token(argmax(logits));
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut kept = None;
    let total: f64 = if s.top_k > 0 || s.top_p < 1.0 {
        let mut probs: Vec<(usize, f64)> = logits.iter().enumerate().map(|(i, &x)| (i, weight(x, max, s.temperature))).collect();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        if s.top_k > 0 {
            probs.truncate(s.top_k);
        }
        if s.top_p < 1.0 {
            let total: f64 = probs.iter().map(|p| p.1).sum();
            let mut acc = 0.0;
            let keep = probs.iter().position(|p| {
                acc += p.1 / total;
                acc >= s.top_p
            });
            probs.truncate(keep.map_or(probs.len(), |k| k + 1));
        }
        let total = probs.iter().map(|p| p.1).sum();
        kept = Some(probs);
        total
    } else {
        logits.iter().map(|&x| weight(x, max, s.temperature)).sum()
    };
    if !total.is_finite() || total <= 0.0 {
        return Draw::Token(argmax(logits));
    }
    Draw::Weighted { max, total, kept }
}

/// The token a uniform draw `u` in [0, 1) picks: the first whose running weight reaches `u · total`.
fn finish(logits: &[f32], s: &SamplingConfig, draw: &Draw, u: f64) -> usize {
    let (max, total, kept) = match draw {
        Draw::Token(t) => return *t,
        Draw::Weighted { max, total, kept } => (*max, *total, kept),
    };
    let mut u = u * total;
    match kept {
        Some(probs) => {
            for &(i, p) in probs {
                u -= p;
                if u <= 0.0 {
                    return i;
                }
            }
            probs.last().map_or_else(|| argmax(logits), |p| p.0)
        }
        None => {
            for (i, &x) in logits.iter().enumerate() {
                u -= weight(x, max, s.temperature);
                if u <= 0.0 {
                    return i;
                }
            }
            logits.len() - 1
        }
    }
}

/// Picks the next token from one row of logits (one row's [`choose_rows`]).
#[cfg(test)]
fn choose(logits: &[f32], s: &SamplingConfig, rng: &mut StdRng) -> usize {
    let draw = prepare(logits, s);
    let u = if matches!(draw, Draw::Weighted { .. }) { rng.random::<f64>() } else { 0.0 };
    finish(logits, s, &draw, u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_one_is_greedy() {
        let logits = [0.1, 3.0, -1.0, 2.9];
        let s = SamplingConfig { top_k: 1, ..Default::default() };
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..20 {
            assert_eq!(choose(&logits, &s, &mut rng), 1);
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Probabilities ~ [0.6, 0.3, 0.1]: top_p 0.5 keeps only token 0; 0.8 keeps 0 and 1.
        let logits = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        let mut rng = StdRng::seed_from_u64(7);
        let s = SamplingConfig { top_p: 0.5, ..Default::default() };
        assert!((0..50).all(|_| choose(&logits, &s, &mut rng) == 0));
        let s = SamplingConfig { top_p: 0.8, ..Default::default() };
        let picks: Vec<usize> = (0..200).map(|_| choose(&logits, &s, &mut rng)).collect();
        assert!(picks.contains(&1) && !picks.contains(&2));
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0.75f32.ln(), 0.25f32.ln()];
        let mut rng = StdRng::seed_from_u64(3);
        let s = SamplingConfig::default();
        let n = 20_000;
        let ones = (0..n).filter(|_| choose(&logits, &s, &mut rng) == 1).count();
        let share = ones as f64 / n as f64;
        assert!((share - 0.25).abs() < 0.015, "{share}");
    }

    /// The sampler as one sequential loop over the rows, as [`generate`] ran it before the rows went
    /// in parallel: each row's token, then its log-probability from a softmax of its own.
    fn sequential(host: &[f32], v: usize, done: &[bool], s: &SamplingConfig, rng: &mut StdRng) -> Vec<Option<(usize, f32)>> {
        let mut pick = |logits: &[f32]| {
            let t = choose(logits, s, rng);
            (t, log_softmax_at(logits, t))
        };
        host.chunks_exact(v).zip(done).map(|(logits, &d)| (!d).then(|| pick(logits))).collect()
    }

    /// The untruncated sampler walks the weights again rather than storing them: the same token as
    /// a walk over the stored weights, for draws across [0, 1).
    #[test]
    fn the_walk_recomputed_picks_what_the_stored_weights_pick() {
        let mut g = StdRng::seed_from_u64(5);
        let logits: Vec<f32> = (0..300).map(|_| g.random::<f32>() * 9.0).collect();
        for temperature in [1.0, 0.6] {
            let s = SamplingConfig { temperature, ..Default::default() };
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let stored: Vec<f64> = logits.iter().map(|&x| (f64::from(x - max) / temperature).exp()).collect();
            let total: f64 = stored.iter().sum();
            for k in 0..1000 {
                let u = f64::from(k) / 1000.0;
                let mut left = u * total;
                let want = stored.iter().position(|&w| {
                    left -= w;
                    left <= 0.0
                });
                assert_eq!(finish(&logits, &s, &prepare(&logits, &s), u), want.unwrap_or(logits.len() - 1), "u = {u}");
            }
        }
    }

    #[test]
    fn rows_in_parallel_give_the_sequential_loops_tokens_and_logprobs() {
        let (b, v) = (37, 500);
        let mut g = StdRng::seed_from_u64(11);
        // Peaked rows, flat rows, a row of equal logits and one with an infinite logit.
        let mut host: Vec<f32> = (0..b * v).map(|i| g.random::<f32>() * if (i / v) % 3 == 0 { 12.0 } else { 2.0 }).collect();
        host[5 * v..6 * v].fill(0.25);
        host[7 * v + 3] = f32::INFINITY;
        let done: Vec<bool> = (0..b).map(|r| r % 5 == 2).collect();
        let settings = [
            SamplingConfig::default(),
            SamplingConfig { temperature: 0.7, ..Default::default() },
            SamplingConfig { temperature: 1.3, top_k: 20, ..Default::default() },
            SamplingConfig { top_p: 0.9, ..Default::default() },
            SamplingConfig { top_k: 50, top_p: 0.5, temperature: 0.9, ..Default::default() },
            SamplingConfig { greedy: true, ..Default::default() },
        ];
        for s in &settings {
            let (mut a, mut c) = (StdRng::seed_from_u64(3), StdRng::seed_from_u64(3));
            for _ in 0..4 {
                let (par, seq) = (choose_rows(&host, v, &done, s, &mut a), sequential(&host, v, &done, s, &mut c));
                let bits = |r: &[Option<(usize, f32)>]| r.iter().map(|p| p.map(|(t, l)| (t, l.to_bits()))).collect::<Vec<_>>();
                assert_eq!(bits(&par), bits(&seq), "{s:?}");
            }
            // The generator is left where the loop leaves it.
            assert_eq!(a.random::<u64>(), c.random::<u64>());
        }
    }

    #[test]
    fn log_softmax_matches_definition() {
        let logits = [1.0f32, 2.0, 3.0];
        let z: f64 = [1.0f64, 2.0, 3.0].iter().map(|x| x.exp()).sum();
        assert!((f64::from(log_softmax_at(&logits, 2)) - (3.0 - z.ln())).abs() < 1e-6);
    }
}

#[cfg(test)]
mod position_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ModelConfig;

    fn model(json: serde_json::Value, device: &Device) -> CausalLm {
        CausalLm::random(&ModelConfig::from_hf_json(&json, "tiny".as_ref()).unwrap(), 0, device).unwrap()
    }

    #[test]
    fn generation_past_a_learned_position_table_is_refused() {
        let device = crate::backend::device("flex").unwrap();
        let gpt2 = model(serde_json::json!({"architectures": ["GPT2LMHeadModel"], "vocab_size": 16, "n_positions": 8, "n_embd": 8, "n_layer": 1, "n_head": 2}), &device);
        assert_eq!(gpt2.position_limit(), Some(8));
        let cfg = |max_new_tokens| GenerationConfig { max_new_tokens, eos_token_ids: vec![], pad_token_id: 0, sampling: SamplingConfig { greedy: true, ..Default::default() } };
        let prompts = vec![vec![3, 4, 5], vec![6, 7, 8, 9]];
        // The longest prompt (4) and 4 new tokens fill the 8 positions exactly.
        assert_eq!(generate(&gpt2, &prompts, &cfg(4), &device).unwrap().tokens[1].len(), 4);
        let err = generate(&gpt2, &prompts, &cfg(5), &device).unwrap_err();
        assert!(matches!(err, ModelError::TooLong { tokens: 9, limit: 8, .. }), "{err}");
        assert!(err.to_string().starts_with("a prompt of 4 tokens and 5 new ones (`max_new_tokens`) needs 9 positions; the model has 8"), "{err}");
        // Rotary positions are computed: no limit.
        let llama = model(serde_json::json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 8}), &device);
        assert_eq!(llama.position_limit(), None);
        assert_eq!(generate(&llama, &prompts, &cfg(6), &device).unwrap().tokens[1].len(), 6);
    }

    /// A prompt token past the vocabulary is refused naming the prompt; the padding token only
    /// where prompts differ in length (it is embedded then, masked).
    #[test]
    fn tokens_past_the_vocabulary_are_refused() {
        let device = crate::backend::device("flex").unwrap();
        let gpt2 = model(serde_json::json!({"architectures": ["GPT2LMHeadModel"], "vocab_size": 16, "n_positions": 8, "n_embd": 8, "n_layer": 1, "n_head": 2}), &device);
        let cfg = |pad_token_id| GenerationConfig { max_new_tokens: 2, eos_token_ids: vec![], pad_token_id, sampling: SamplingConfig { greedy: true, ..Default::default() } };
        let err = generate(&gpt2, &[vec![3, 4], vec![5, 16]], &cfg(0), &device).unwrap_err().to_string();
        assert!(err.starts_with("prompt 1 holds token id 16, past the model's vocabulary of 16"), "{err}");
        assert!(generate(&gpt2, &[vec![3, 4], vec![5, 6]], &cfg(50), &device).is_ok());
        let err = generate(&gpt2, &[vec![3, 4], vec![5]], &cfg(50), &device).unwrap_err().to_string();
        assert!(err.starts_with("the padding token (`pad_token_id`) holds token id 50"), "{err}");
    }

    #[test]
    fn each_new_token_is_passed_on_as_it_is_chosen() {
        let device = crate::backend::device("flex").unwrap();
        let gpt2 = model(serde_json::json!({"architectures": ["GPT2LMHeadModel"], "vocab_size": 16, "n_positions": 32, "n_embd": 8, "n_layer": 1, "n_head": 2}), &device);
        let prompts = vec![vec![3, 4, 5], vec![6, 7], vec![8]];
        let sampling = SamplingConfig { seed: 5, ..Default::default() };
        let free = GenerationConfig { max_new_tokens: 12, eos_token_ids: vec![], pad_token_id: 0, sampling: sampling.clone() };
        // An EOS that the sampled rows produce early, at different steps.
        let plain = generate(&gpt2, &prompts, &free, &device).unwrap();
        let eos = plain.tokens[0][2];
        let cfg = GenerationConfig { eos_token_ids: vec![eos], ..free };
        let mut seen = vec![Vec::new(); prompts.len()];
        let with = generate_with(&gpt2, &prompts, &cfg, &device, |row, token| seen[row].push(token)).unwrap();
        assert_eq!(with, generate(&gpt2, &prompts, &cfg, &device).unwrap());
        assert_eq!(seen, with.tokens);
        assert_eq!(with.tokens[0].len(), plain.tokens[0].iter().position(|&t| t == eos).unwrap() + 1);
        assert!(with.tokens.iter().any(|t| t.len() < 12) && with.tokens.iter().all(|t| t.last() == Some(&eos) || t.len() == 12));
    }

    #[test]
    fn a_temperature_that_is_not_a_finite_positive_number_is_refused() {
        let device = crate::backend::device("flex").unwrap();
        let gpt2 = model(serde_json::json!({"architectures": ["GPT2LMHeadModel"], "vocab_size": 16, "n_positions": 8, "n_embd": 8, "n_layer": 1, "n_head": 2}), &device);
        let cfg = |temperature| GenerationConfig { max_new_tokens: 2, eos_token_ids: vec![], pad_token_id: 0, sampling: SamplingConfig { temperature, ..Default::default() } };
        // An infinite temperature made every token equally likely, whatever the model.
        for t in [0.0, -1.0, f64::INFINITY, f64::NAN] {
            let err = generate(&gpt2, &[vec![3, 4]], &cfg(t), &device).unwrap_err();
            assert_eq!(err.to_string(), format!("temperature must be finite and > 0, got {t}"));
        }
        assert_eq!(generate(&gpt2, &[vec![3, 4]], &cfg(1e-3), &device).unwrap().tokens[0].len(), 2);
    }
}
