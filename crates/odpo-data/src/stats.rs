//! `cargo xtask data stats`: what a data config yields, as one readable report. Counts of prompts, responses,
//! pairs, ties, dropped and skipped rows and why, the train/eval split, the offset distribution, and (with a
//! tokenizer) token length percentiles and the truncation counts.

use std::fmt;

use odpo_model::tokenizer::Tokenizer;

use crate::config::DataConfig;
use crate::error::DataError;
use crate::load::{LoadReport, stream};
use crate::split::eval_prompts;
use crate::tokenize::{TokenizeReport, in_parallel};

/// Quantiles of a sample (nearest rank).
#[derive(Clone, Debug, PartialEq)]
pub struct Distribution {
    /// Sample size.
    pub count: usize,
    /// Mean.
    pub mean: f64,
    /// Smallest value.
    pub min: f64,
    /// 5th, 25th, 50th, 75th, 95th percentiles.
    pub p: [f64; 5],
    /// Largest value.
    pub max: f64,
    /// Share of values below zero.
    pub share_negative: f64,
}

impl Distribution {
    /// The distribution of `values`; `None` when empty.
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let q = |f: f64| v[((f * n as f64).ceil() as usize).clamp(1, n) - 1];
        Some(Distribution {
            count: n,
            mean: v.iter().sum::<f64>() / n as f64,
            min: v[0],
            p: [q(0.05), q(0.25), q(0.5), q(0.75), q(0.95)],
            max: v[n - 1],
            share_negative: v.iter().filter(|&&x| x < 0.0).count() as f64 / n as f64,
        })
    }
}

/// Token length distributions (before truncation) and what truncation did.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenStats {
    /// Prompt tokens.
    pub prompt: Distribution,
    /// Chosen tokens (with EOS).
    pub chosen: Distribution,
    /// Rejected tokens (with EOS).
    pub rejected: Distribution,
    /// Prompt + the longer completion.
    pub total: Distribution,
    /// Truncation and drop counts under the config's limits.
    pub report: TokenizeReport,
}

/// Everything `data stats` reports.
#[derive(Clone, Debug)]
pub struct Stats {
    /// The config the figures come from.
    pub config: DataConfig,
    /// Loading counts.
    pub load: LoadReport,
    /// Pairs and prompts in the training part.
    pub train: (usize, usize),
    /// Pairs and prompts in the evaluation part.
    pub eval: (usize, usize),
    /// Offsets of all pairs (none without an offset config).
    pub offsets: Option<Distribution>,
    /// Token statistics (with a tokenizer).
    pub tokens: Option<TokenStats>,
}

/// Loads, pairs, splits and (with a tokenizer) tokenizes the configured data and counts everything.
pub fn stats(cfg: &DataConfig, tokenizer: Option<&Tokenizer>) -> Result<Stats, DataError> {
    // A part at a time (a JSON-lines file is streamed): what is kept is a few numbers per pair.
    let (mut offsets, mut prompt_ids) = (Vec::new(), Vec::new());
    let (mut lp, mut lc, mut lr, mut lt) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut report = TokenizeReport::default();
    let load = stream(cfg, 1 << 16, |pairs| {
        if cfg.offset.is_some() {
            offsets.extend(pairs.iter().map(|p| p.offset));
        }
        prompt_ids.extend(pairs.iter().map(|p| p.prompt_id));
        if let Some(t) = tokenizer {
            // Per pair: the untruncated lengths (prompt, chosen, rejected) and the truncation counts.
            let parts = in_parallel(&pairs, t, cfg, |pt, chunk| {
                let mut report = TokenizeReport::default();
                let mut lengths = Vec::with_capacity(chunk.len());
                for p in chunk {
                    let (a, b, c) = pt.encode_pair(p)?;
                    lengths.push((a.len(), b.len(), c.len()));
                    pt.tokenize(p, &mut report)?;
                }
                Ok((lengths, report))
            })?;
            for (lengths, r) in parts {
                report.add(&r);
                for (a, b, c) in lengths {
                    lp.push(a as f64);
                    lc.push(b as f64);
                    lr.push(c as f64);
                    lt.push((a + b.max(c)) as f64);
                }
            }
        }
        Ok(())
    })?;
    let offsets = cfg.offset.as_ref().and_then(|_| Distribution::of(&offsets));
    let d = |v: &[f64]| Distribution::of(v);
    let tokens = match (tokenizer, d(&lp), d(&lc), d(&lr), d(&lt)) {
        (Some(_), Some(prompt), Some(chosen), Some(rejected), Some(total)) => Some(TokenStats { prompt, chosen, rejected, total, report }),
        _ => None,
    };
    let eval = eval_prompts(prompt_ids.iter().copied(), cfg.eval_fraction, cfg.seed);
    let count = |held: bool| {
        let ids: Vec<usize> = prompt_ids.iter().copied().filter(|id| eval.contains(id) == held).collect();
        (ids.len(), ids.iter().collect::<std::collections::HashSet<_>>().len())
    };
    Ok(Stats { config: cfg.clone(), load, train: count(false), eval: count(true), offsets, tokens })
}

fn dist_line(f: &mut fmt::Formatter<'_>, name: &str, d: &Distribution, prec: usize) -> fmt::Result {
    writeln!(
        f,
        "  {name:<9} n={} mean={:.prec$} min={:.prec$} p5={:.prec$} p25={:.prec$} p50={:.prec$} p75={:.prec$} p95={:.prec$} max={:.prec$}",
        d.count, d.mean, d.min, d.p[0], d.p[1], d.p[2], d.p[3], d.p[4], d.max
    )
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        let l = &self.load;
        writeln!(f, "data: {} (format {})", c.path.display(), c.format.name())?;
        if c.format.is_scored() {
            writeln!(f, "pairing: {:?}", c.pairing())?;
        }
        writeln!(f, "rows used: {}   skipped bad rows: {}", l.rows, l.skipped.len())?;
        writeln!(f, "prompts: {}   responses: {}   pairs: {}", l.prompts, l.responses, l.pairs)?;
        if l.dropped.is_empty() {
            writeln!(f, "dropped: none")?;
        }
        for (why, n) in &l.dropped {
            writeln!(f, "dropped: {n} ({why})")?;
        }
        for s in &l.skipped {
            writeln!(f, "  skipped: {s}")?;
        }
        if l.identical > 0 {
            writeln!(f, "warning: {} pairs have the same chosen and rejected text (they teach nothing)", l.identical)?;
        }
        if l.implicit_prompts > 0 {
            writeln!(f, "implicit prompts: {} pairs have no prompt; each takes the start its chosen and rejected texts share", l.implicit_prompts)?;
        }
        writeln!(
            f,
            "split (eval_fraction {}, seed {}): train {} pairs / {} prompts, eval {} pairs / {} prompts",
            c.eval_fraction, c.seed, self.train.0, self.train.1, self.eval.0, self.eval.1
        )?;
        match (&self.offsets, &c.offset) {
            (Some(d), Some(o)) => {
                writeln!(
                    f,
                    "offsets ({:?}, alpha {}, clip {:?}..{:?}): negative {:.1}%",
                    o.function,
                    o.alpha,
                    o.clip_min,
                    o.clip_max,
                    100.0 * d.share_negative
                )?;
                dist_line(f, "offset", d, 4)?;
            }
            _ => writeln!(f, "offsets: none (no [data.offset]: DPO)")?,
        }
        if let Some(t) = &self.tokens {
            writeln!(f, "tokens (before truncation):")?;
            dist_line(f, "prompt", &t.prompt, 1)?;
            dist_line(f, "chosen", &t.chosen, 1)?;
            dist_line(f, "rejected", &t.rejected, 1)?;
            dist_line(f, "total", &t.total, 1)?;
            let r = &t.report;
            writeln!(
                f,
                "truncation (max_length {}, max_prompt_length {:?}): kept {}, prompts cut {}, completions cut {}, dropped: prompt too long {}, completion too long {}",
                c.max_length,
                c.max_prompt_length,
                r.kept,
                r.prompts_truncated,
                r.completions_truncated,
                r.dropped_prompt_too_long,
                r.dropped_completion_too_long
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let d = Distribution::of(&[3.0, -1.0, 2.0, 1.0]).unwrap();
        assert_eq!((d.min, d.p[2], d.max), (-1.0, 1.0, 3.0));
        assert_eq!(d.share_negative, 0.25);
        assert!(Distribution::of(&[]).is_none());
    }
}
