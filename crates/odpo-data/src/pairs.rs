//! Preference pairs: the rows readers produce, the pairing strategies that turn scored responses into pairs
//! (the better-scored response is chosen, ties are dropped and counted), and [`PreferencePair`] itself.

use odpo_model::tokenizer::ChatMessage;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::index;
use serde::{Deserialize, Serialize};

use crate::error::Position;

/// A prompt or a response: plain text or a list of chat messages. Serialised as the data files
/// hold it: a string, or a list of `{"role", "content"}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Text {
    /// Plain text.
    Plain(String),
    /// Chat messages (HF `messages` layout).
    Messages(Vec<ChatMessage>),
}

impl Text {
    /// A key that is equal for equal texts, used to group rows by prompt.
    pub fn key(&self) -> String {
        match self {
            Text::Plain(s) => format!("p:{s}"),
            Text::Messages(m) => {
                let mut k = String::from("m:");
                for msg in m {
                    // Lengths make the key unambiguous whatever the contents hold.
                    k.push_str(&format!("{}:{}|{}:{}|", msg.role.len(), msg.role, msg.content.len(), msg.content));
                }
                k
            }
        }
    }

    /// The text as one string, for reports and plain prompts: the string itself, or the message contents joined
    /// by newlines.
    pub fn flat(&self) -> String {
        match self {
            Text::Plain(s) => s.clone(),
            Text::Messages(m) => m.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n"),
        }
    }
}

/// One ready-made pair as read from a pair-format row (HF layout).
#[derive(Clone, Debug, PartialEq)]
pub struct PairRow {
    /// The prompt.
    pub prompt: Text,
    /// The preferred response, with any copy of the prompt's messages removed.
    pub chosen: Text,
    /// The dispreferred response, likewise.
    pub rejected: Text,
    /// The chosen response's score, when the row has one.
    pub score_chosen: Option<f64>,
    /// The rejected response's score.
    pub score_rejected: Option<f64>,
    /// The pair's weight, when a weight column is configured and present.
    pub weight: Option<f64>,
    /// The row had no prompt: it is the start that chosen and rejected share (TRL's implicit prompt).
    pub implicit_prompt: bool,
    /// Where the row is.
    pub position: Position,
}

/// One scored response.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoredResponse {
    /// The response.
    pub text: Text,
    /// Its score.
    pub score: f64,
    /// Where it is in the file.
    pub position: Position,
}

/// The scored responses to one prompt, in file order.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoredGroup {
    /// The prompt.
    pub prompt: Text,
    /// Its responses.
    pub responses: Vec<ScoredResponse>,
}

/// How scored responses to one prompt become pairs. The better-scored response is always the chosen one;
/// pairs of equal scores are dropped and counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "strategy", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Pairing {
    /// Every pair of responses with different scores: n(n-1)/2 minus ties.
    #[default]
    AllPairs,
    /// The best-scored against the worst-scored response (first in file order among equals).
    BestVsWorst,
    /// The first two responses in file order (what the paper's code did).
    FirstTwo,
    /// Up to `k` pairs drawn at random (seeded) from the distinct-score pairs.
    RandomK {
        /// Pairs per prompt.
        k: usize,
    },
}

/// Pairs chosen from one group's scores: `(winner, loser)` indices, and the tied pairs dropped.
pub fn pair_indices(scores: &[f64], pairing: Pairing, rng: &mut StdRng) -> (Vec<(usize, usize)>, usize) {
    let order = |i: usize, j: usize| if scores[i] > scores[j] { (i, j) } else { (j, i) };
    let n = scores.len();
    if n < 2 {
        return (Vec::new(), 0);
    }
    match pairing {
        Pairing::AllPairs | Pairing::RandomK { .. } => {
            let mut pairs = Vec::new();
            let mut ties = 0;
            for i in 0..n {
                for j in i + 1..n {
                    if scores[i] == scores[j] {
                        ties += 1;
                    } else {
                        pairs.push(order(i, j));
                    }
                }
            }
            if let Pairing::RandomK { k } = pairing
                && k < pairs.len()
            {
                let mut picked: Vec<usize> = index::sample(rng, pairs.len(), k).into_vec();
                picked.sort_unstable();
                pairs = picked.into_iter().map(|i| pairs[i]).collect();
            }
            (pairs, ties)
        }
        Pairing::BestVsWorst => {
            let mut best = 0;
            let mut worst = 0;
            for i in 1..n {
                if scores[i] > scores[best] {
                    best = i;
                }
                if scores[i] < scores[worst] {
                    worst = i;
                }
            }
            if scores[best] == scores[worst] { (Vec::new(), 1) } else { (vec![(best, worst)], 0) }
        }
        Pairing::FirstTwo => {
            if scores[0] == scores[1] {
                (Vec::new(), 1)
            } else {
                (vec![order(0, 1)], 0)
            }
        }
    }
}

/// A seeded generator for a pairing pass.
pub(crate) fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// One preference pair, ready to tokenize.
#[derive(Clone, Debug, PartialEq)]
pub struct PreferencePair {
    /// Index of the pair in load order; carried into batches as `pair_ids`.
    pub id: usize,
    /// Index of the pair's prompt among the distinct prompts, in order of first appearance; the train/eval split
    /// is by this id.
    pub prompt_id: usize,
    /// The prompt.
    pub prompt: Text,
    /// The preferred response y_w.
    pub chosen: Text,
    /// The dispreferred response y_l.
    pub rejected: Text,
    /// Score s_w of the chosen response, where known.
    pub score_chosen: Option<f64>,
    /// Score s_l of the rejected response, where known.
    pub score_rejected: Option<f64>,
    /// The offset Δ = alpha·f(s_w − s_l); 0 without an offset config (DPO).
    pub offset: f64,
    /// The pair's weight, where the data has one.
    pub weight: Option<f64>,
    /// Where the chosen response's row is in the file.
    pub position: Position,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn strategies_order_by_score_and_count_ties() {
        let s = [1.0, 3.0, 3.0, 2.0];
        let mut r = rng(0);
        let (p, t) = pair_indices(&s, Pairing::AllPairs, &mut r);
        assert_eq!(p, vec![(1, 0), (2, 0), (3, 0), (1, 3), (2, 3)]);
        assert_eq!(t, 1);
        assert_eq!(pair_indices(&s, Pairing::BestVsWorst, &mut r), (vec![(1, 0)], 0));
        assert_eq!(pair_indices(&s, Pairing::FirstTwo, &mut r), (vec![(1, 0)], 0));
        assert_eq!(pair_indices(&[2.0, 2.0], Pairing::FirstTwo, &mut r), (vec![], 1));
        assert_eq!(pair_indices(&[2.0, 2.0, 2.0], Pairing::BestVsWorst, &mut r), (vec![], 1));
        assert_eq!(pair_indices(&[2.0], Pairing::AllPairs, &mut r), (vec![], 0));
        let (p, t) = pair_indices(&s, Pairing::RandomK { k: 2 }, &mut r);
        assert_eq!((p.len(), t), (2, 1));
        assert!(p.iter().all(|&(w, l)| s[w] > s[l]));
        // Seeded: the same seed draws the same pairs.
        assert_eq!(
            pair_indices(&s, Pairing::RandomK { k: 2 }, &mut rng(7)),
            pair_indices(&s, Pairing::RandomK { k: 2 }, &mut rng(7))
        );
        let (p, _) = pair_indices(&s, Pairing::RandomK { k: 50 }, &mut r);
        assert_eq!(p.len(), 5);
    }

    #[test]
    fn pairing_reads_from_toml() {
        #[derive(Deserialize)]
        struct W {
            pairing: Pairing,
        }
        let w: W = toml::from_str("pairing = { strategy = \"random-k\", k = 3 }").unwrap();
        assert_eq!(w.pairing, Pairing::RandomK { k: 3 });
        let w: W = toml::from_str("pairing = { strategy = \"first-two\" }").unwrap();
        assert_eq!(w.pairing, Pairing::FirstTwo);
    }
}
