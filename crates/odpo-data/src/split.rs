//! Train/eval split by prompt: all pairs of a prompt land on one side, so evaluation never sees a training
//! prompt. Seeded.

use std::collections::HashSet;

use rand::seq::SliceRandom;

use crate::pairs::{self, PreferencePair};

/// Splits pairs into (train, eval), holding out `round(eval_fraction * prompts)` prompts chosen at random with
/// `seed` (at least one when the fraction is positive and there are two prompts or more). Order within each
/// part is the input order.
pub fn split_by_prompt(pairs: Vec<PreferencePair>, eval_fraction: f64, seed: u64) -> (Vec<PreferencePair>, Vec<PreferencePair>) {
    let eval = eval_prompts(pairs.iter().map(|p| p.prompt_id), eval_fraction, seed);
    pairs.into_iter().partition(|p| !eval.contains(&p.prompt_id))
}

/// The prompt ids [`split_by_prompt`] holds out, from the pairs' prompt ids alone.
pub fn eval_prompts(prompt_ids: impl Iterator<Item = usize>, eval_fraction: f64, seed: u64) -> HashSet<usize> {
    let mut ids: Vec<usize> = prompt_ids.collect::<HashSet<_>>().into_iter().collect();
    ids.sort_unstable();
    let n = ids.len();
    let mut n_eval = (eval_fraction * n as f64).round() as usize;
    if eval_fraction > 0.0 && n >= 2 {
        n_eval = n_eval.clamp(1, n - 1);
    } else {
        n_eval = n_eval.min(n.saturating_sub(1));
    }
    ids.shuffle(&mut pairs::rng(seed));
    ids[..n_eval].iter().copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Position;
    use crate::pairs::Text;

    fn pair(id: usize, prompt_id: usize) -> PreferencePair {
        PreferencePair {
            id,
            prompt_id,
            prompt: Text::Plain(format!("p{prompt_id}")),
            chosen: Text::Plain("a".into()),
            rejected: Text::Plain("b".into()),
            score_chosen: None,
            score_rejected: None,
            offset: 0.0,
            weight: None,
            position: Position::File,
        }
    }

    #[test]
    fn no_prompt_on_both_sides_and_seeded() {
        let pairs: Vec<_> = (0..300).map(|i| pair(i, i % 37)).collect();
        let (train, eval) = split_by_prompt(pairs.clone(), 0.2, 1);
        let tp: HashSet<_> = train.iter().map(|p| p.prompt_id).collect();
        let ep: HashSet<_> = eval.iter().map(|p| p.prompt_id).collect();
        assert!(tp.is_disjoint(&ep));
        assert_eq!(ep.len(), 7);
        assert_eq!(train.len() + eval.len(), 300);
        assert_eq!(split_by_prompt(pairs.clone(), 0.2, 1).1, eval);
        assert_ne!(split_by_prompt(pairs.clone(), 0.2, 2).1, eval);
        assert!(split_by_prompt(pairs, 0.0, 1).1.is_empty());
    }
}
