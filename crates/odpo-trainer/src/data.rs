//! The run's data: tokenized train and eval pairs (from odpo-data), and the deterministic order in
//! which steps consume them, so that a data position is just a step number.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use odpo_data::{DataConfig, PreferenceBatcher, TokenizedPair};
use odpo_model::tokenizer::Tokenizer;

use crate::error::Result;

/// Tokenized pairs of a run.
#[derive(Clone, Debug, Default)]
pub struct RunData {
    /// Training pairs, in file order.
    pub train: Vec<TokenizedPair>,
    /// Held-out pairs (no prompt shared with `train`).
    pub eval: Vec<TokenizedPair>,
    /// The padding id used for batches (padding is masked; any id works).
    pub pad_id: u32,
    /// Batches' length rounded up to a multiple of this (`data.pad_to_multiple`).
    pub pad_to_multiple: Option<usize>,
}

impl RunData {
    /// Reads, pairs, splits and tokenizes the configured data, logging what was dropped.
    pub fn load(cfg: &DataConfig, tokenizer: &Tokenizer) -> Result<Self> {
        let loaded = odpo_data::load(cfg)?;
        tracing::info!(
            rows = loaded.report.rows,
            prompts = loaded.report.prompts,
            pairs = loaded.report.pairs,
            ties_dropped = loaded.report.ties(),
            skipped_rows = loaded.report.skipped.len(),
            "loaded {}",
            cfg.path.display()
        );
        if loaded.report.identical > 0 {
            tracing::warn!(pairs = loaded.report.identical, "pairs whose chosen and rejected texts are the same: they teach nothing");
        }
        if loaded.report.implicit_prompts > 0 {
            tracing::info!(pairs = loaded.report.implicit_prompts, "pairs without a prompt: each takes the start its chosen and rejected texts share");
        }
        let (train, eval) = odpo_data::split_by_prompt(loaded.pairs, cfg.eval_fraction, cfg.seed);
        let (train, report) = odpo_data::tokenize_pairs(&train, tokenizer, cfg)?;
        tracing::info!(?report, "tokenized training pairs");
        let (eval, report) = odpo_data::tokenize_pairs(&eval, tokenizer, cfg)?;
        tracing::info!(?report, "tokenized eval pairs");
        let pad_id = tokenizer.pad_token_id().or(tokenizer.eos_token_id()).unwrap_or(0);
        Ok(Self { train, eval, pad_id, pad_to_multiple: cfg.pad_to_multiple })
    }

    /// The batcher of this data's padding rules, building rows of `layout`
    /// ([`crate::config::RowLayout::resolve`]), with LD-DPO's token weights when `ld_alpha` is given
    /// (`loss.ld_alpha`).
    pub fn batcher(&self, layout: odpo_data::Layout, ld_alpha: Option<f64>) -> PreferenceBatcher {
        PreferenceBatcher::new(self.pad_id, self.pad_to_multiple, layout).with_ld_alpha(ld_alpha.map(|a| a as f32))
    }
}

impl RunData {
    /// Every scored response after its prompt, as SFT items (`train.sft_on = "responses"`): each becomes a
    /// pair whose chosen side is the response (the rejected side is never read in SFT). The split is by
    /// prompt, as for pairs.
    pub fn load_responses(cfg: &DataConfig, tokenizer: &Tokenizer) -> Result<Self> {
        let (responses, skipped) = odpo_data::load_responses(cfg)?;
        tracing::info!(responses = responses.len(), skipped_rows = skipped, "loaded {} for SFT on every response", cfg.path.display());
        let (train, eval) = odpo_data::split_by_prompt(responses, cfg.eval_fraction, cfg.seed);
        let (train, report) = odpo_data::tokenize_pairs(&train, tokenizer, cfg)?;
        tracing::info!(?report, "tokenized training responses");
        let (eval, _) = odpo_data::tokenize_pairs(&eval, tokenizer, cfg)?;
        let pad_id = tokenizer.pad_token_id().or(tokenizer.eos_token_id()).unwrap_or(0);
        Ok(Self { train, eval, pad_id, pad_to_multiple: cfg.pad_to_multiple })
    }
}

/// The order of pass `epoch` over `n` items: a permutation seeded by (`seed`, `epoch`) alone, so it can
/// be recomputed on resume without saving any RNG state.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = StdRng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    order
}

/// The indices of the items at stream positions `start..start + count` of the endless sequence of
/// epochs (each a fresh permutation). A step that crosses an epoch boundary takes from both.
pub fn stream_slice(n: usize, seed: u64, start: usize, count: usize) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(count);
    let mut pos = start;
    while out.len() < count {
        let (epoch, at) = (pos / n, pos % n);
        let order = epoch_order(n, seed, epoch);
        let take = (count - out.len()).min(n - at);
        out.extend_from_slice(&order[at..at + take]);
        pos += take;
    }
    out
}

/// The fewest different items any run of `count` consecutive positions of the stream holds, of
/// `n`: a run crosses at most one epoch's end while it is shorter than an epoch, and each of its
/// two sides is part of one permutation, so at least half of it is of different items; a longer
/// run holds every item.
pub fn distinct_in_run(count: usize, n: usize) -> usize {
    count.div_ceil(2).min(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every run of every length over the first epochs of small streams holds at least as many
    /// different items as `distinct_in_run` says.
    #[test]
    fn a_run_of_the_stream_holds_at_least_half_as_many_different_items() {
        for n in 1..7 {
            let whole = stream_slice(n, 11, 0, 6 * n);
            for count in 1..=3 * n {
                let fewest = (0..=whole.len() - count).map(|s| whole[s..s + count].iter().collect::<std::collections::BTreeSet<_>>().len()).min();
                assert!(fewest >= Some(distinct_in_run(count, n)), "n {n}, runs of {count}: {fewest:?} different");
            }
        }
        assert_eq!((distinct_in_run(1, 400), distinct_in_run(5, 400), distinct_in_run(100_000, 400)), (1, 3, 400));
    }

    #[test]
    fn stream_is_a_sequence_of_permutations() {
        let whole = stream_slice(5, 3, 0, 15);
        for e in 0..3 {
            let mut chunk = whole[e * 5..(e + 1) * 5].to_vec();
            assert_eq!(chunk, epoch_order(5, 3, e));
            chunk.sort();
            assert_eq!(chunk, vec![0, 1, 2, 3, 4]);
        }
        // Any window equals the same window of the whole stream: the data position is a number.
        assert_eq!(stream_slice(5, 3, 4, 7), whole[4..11].to_vec());
        assert_ne!(epoch_order(50, 3, 0), epoch_order(50, 3, 1));
    }
}
