//! The ODPO offset Δ = α·f(s_w − s_l), computed on the host from the two responses' scores.
//!
//! Paper: Amini, Vieira, Cotterell, "Direct Preference Optimization with an Offset" (arXiv 2402.10571),
//! Eq. 7 and §3: the offset is a per-pair margin that the policy's implicit reward difference must
//! exceed, `-log σ(β·h − Δ)`. The paper's main experiments use f = log; its released code also offers the
//! log-ratio `log(s_w / s_l)`, and the ablations scale the difference without a log (identity).
//!
//! The reference code leaves three cases undefined (ties give `log 0 = −inf`, inverted pairs give NaN,
//! non-positive scores give NaN in the log-ratio). Here every pair must satisfy `s_w > s_l` with finite
//! scores; anything else is an [`OffsetError`] naming the pair. The data crate orders pairs by score and
//! drops ties before calling [`OffsetConfig::offset`], so an error here means a bug upstream or bad data.
//!
//! `s_w − s_l < 1` gives a negative log offset, a looser constraint than DPO. That is the paper's behaviour
//! and is kept; [`OffsetConfig::clip_min`] bounds it when wanted.

use serde::{Deserialize, Serialize};

/// The scaling function f in Δ = α·f(s_w, s_l).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OffsetFn {
    /// `f = log(s_w − s_l)`: the paper's choice (its Eq. 7 experiments). Negative when the scores differ by
    /// less than 1.
    Log,
    /// `f = log(s_w / s_l)`: the released code's `ratio` option. Needs both scores positive.
    LogRatio,
    /// `f = s_w − s_l`: the raw score difference (an ablation in the paper).
    Identity,
}

impl OffsetFn {
    fn name(self) -> &'static str {
        match self {
            OffsetFn::Log => "log",
            OffsetFn::LogRatio => "log-ratio",
            OffsetFn::Identity => "identity",
        }
    }
}

/// How a pair's offset is computed from its two scores: Δ = clip(α·f(s_w, s_l), clip_min, clip_max).
///
/// Serde defaults: `function = "log"`, `alpha = 1.0`, no clipping; unknown keys are rejected.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OffsetConfig {
    /// The scaling function f.
    pub function: OffsetFn,
    /// α ≥ 0, the offset's scale (the paper's α; 0.5 to 1.0 in its released commands). α = 0 gives DPO.
    pub alpha: f64,
    /// Lower bound applied after scaling by α, e.g. `0.0` to forbid offsets looser than DPO.
    pub clip_min: Option<f64>,
    /// Upper bound applied after scaling by α.
    pub clip_max: Option<f64>,
}

impl Default for OffsetConfig {
    fn default() -> Self {
        Self {
            function: OffsetFn::Log,
            alpha: 1.0,
            clip_min: None,
            clip_max: None,
        }
    }
}

/// Why an offset could not be computed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum OffsetError {
    /// A score is NaN or infinite.
    #[error("pair {pair}: scores must be finite, got chosen {chosen} and rejected {rejected}")]
    NonFiniteScore {
        /// Index of the pair, as given by the caller.
        pair: usize,
        /// Score of the chosen response s_w.
        chosen: f64,
        /// Score of the rejected response s_l.
        rejected: f64,
    },
    /// s_w = s_l: the pair carries no preference (and the log offset is −inf).
    #[error(
        "pair {pair}: scores are tied ({chosen} = {rejected}): the {function} offset is undefined; drop ties when building pairs"
    )]
    Tie {
        /// Index of the pair.
        pair: usize,
        /// Score of the chosen response.
        chosen: f64,
        /// Score of the rejected response.
        rejected: f64,
        /// Name of the offset function.
        function: &'static str,
    },
    /// s_w < s_l: the chosen response scores lower than the rejected one.
    #[error(
        "pair {pair}: the chosen response scores lower than the rejected one ({chosen} < {rejected}); order each pair by score when building pairs"
    )]
    Inverted {
        /// Index of the pair.
        pair: usize,
        /// Score of the chosen response.
        chosen: f64,
        /// Score of the rejected response.
        rejected: f64,
    },
    /// The log-ratio needs s_w > 0 and s_l > 0.
    #[error(
        "pair {pair}: the log-ratio offset needs positive scores, got chosen {chosen} and rejected {rejected}; use `function = \"log\"` or shift the scores"
    )]
    NonPositiveScore {
        /// Index of the pair.
        pair: usize,
        /// Score of the chosen response.
        chosen: f64,
        /// Score of the rejected response.
        rejected: f64,
    },
    /// The configuration itself is invalid (α negative or not finite, clip bounds crossed or not finite).
    #[error("invalid offset configuration: `{option}` = {value}: {reason}")]
    InvalidConfig {
        /// The offending key.
        option: &'static str,
        /// Its value, printed.
        value: String,
        /// What is required.
        reason: &'static str,
    },
}

impl OffsetConfig {
    /// Checks α and the clip bounds; [`OffsetConfig::offset`] calls it too.
    pub fn validate(&self) -> Result<(), OffsetError> {
        let bad = |option, value: String, reason| {
            Err(OffsetError::InvalidConfig {
                option,
                value,
                reason,
            })
        };
        if !self.alpha.is_finite() || self.alpha < 0.0 {
            return bad("alpha", self.alpha.to_string(), "must be finite and >= 0");
        }
        for (option, bound) in [("clip_min", self.clip_min), ("clip_max", self.clip_max)] {
            if let Some(b) = bound
                && !b.is_finite()
            {
                return bad(option, b.to_string(), "must be finite");
            }
        }
        if let (Some(lo), Some(hi)) = (self.clip_min, self.clip_max)
            && lo > hi
        {
            return bad("clip_min", lo.to_string(), "must not exceed `clip_max`");
        }
        Ok(())
    }

    /// The offset Δ of one pair, from the chosen score `score_chosen` (s_w) and the rejected score
    /// `score_rejected` (s_l). `pair` only labels the error.
    ///
    /// Every function requires finite scores with s_w > s_l (ties and inverted pairs are errors, whatever
    /// the function); the log-ratio also requires both scores positive.
    pub fn offset(
        &self,
        pair: usize,
        score_chosen: f64,
        score_rejected: f64,
    ) -> Result<f64, OffsetError> {
        self.validate()?;
        let (chosen, rejected) = (score_chosen, score_rejected);
        if !chosen.is_finite() || !rejected.is_finite() {
            return Err(OffsetError::NonFiniteScore {
                pair,
                chosen,
                rejected,
            });
        }
        if chosen == rejected {
            return Err(OffsetError::Tie {
                pair,
                chosen,
                rejected,
                function: self.function.name(),
            });
        }
        if chosen < rejected {
            return Err(OffsetError::Inverted {
                pair,
                chosen,
                rejected,
            });
        }
        let f = match self.function {
            OffsetFn::Log => (chosen - rejected).ln(),
            OffsetFn::LogRatio => {
                if chosen <= 0.0 || rejected <= 0.0 {
                    return Err(OffsetError::NonPositiveScore {
                        pair,
                        chosen,
                        rejected,
                    });
                }
                // ln(a) − ln(b) rather than ln(a / b): no overflow of the quotient for extreme scores.
                chosen.ln() - rejected.ln()
            }
            OffsetFn::Identity => chosen - rejected,
        };
        let mut delta = self.alpha * f;
        if let Some(lo) = self.clip_min {
            delta = delta.max(lo);
        }
        if let Some(hi) = self.clip_max {
            delta = delta.min(hi);
        }
        Ok(delta)
    }

    /// Offsets of many pairs `(s_w, s_l)`, indexed from 0; stops at the first bad pair.
    pub fn offsets(&self, scores: &[(f64, f64)]) -> Result<Vec<f64>, OffsetError> {
        scores
            .iter()
            .enumerate()
            .map(|(i, &(w, l))| self.offset(i, w, l))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(function: OffsetFn, alpha: f64) -> OffsetConfig {
        OffsetConfig {
            function,
            alpha,
            ..OffsetConfig::default()
        }
    }

    #[test]
    fn values_of_each_function() {
        let d = cfg(OffsetFn::Log, 0.5)
            .offset(0, 1.9, 1.2)
            .unwrap_or(f64::NAN);
        assert!((d - 0.5 * 0.7f64.ln()).abs() < 1e-15, "{d}");
        assert!(d < 0.0, "a score gap below 1 gives a negative log offset");
        let d = cfg(OffsetFn::LogRatio, 2.0)
            .offset(0, 3.0, 1.5)
            .unwrap_or(f64::NAN);
        assert!((d - 2.0 * 2f64.ln()).abs() < 1e-15);
        let d = cfg(OffsetFn::Identity, 1.0)
            .offset(0, 5.0, 2.0)
            .unwrap_or(f64::NAN);
        assert_eq!(d, 3.0);
        assert_eq!(cfg(OffsetFn::Log, 0.0).offset(0, 5.0, 2.0), Ok(0.0));
    }

    #[test]
    fn clipping() {
        let c = OffsetConfig {
            clip_min: Some(0.0),
            clip_max: Some(1.0),
            ..OffsetConfig::default()
        };
        assert_eq!(c.offset(0, 1.5, 1.0), Ok(0.0));
        assert_eq!(c.offset(0, 100.0, 1.0), Ok(1.0));
        let inside = c.offset(0, 3.0, 1.0).unwrap_or(f64::NAN);
        assert!((inside - 2f64.ln()).abs() < 1e-15);
    }

    #[test]
    fn errors_name_the_pair() {
        let log = OffsetConfig::default();
        let tie = log.offset(17, 0.5, 0.5).map_err(|e| e.to_string());
        assert_eq!(
            tie,
            Err("pair 17: scores are tied (0.5 = 0.5): the log offset is undefined; drop ties when building pairs"
                .to_string())
        );
        assert!(matches!(
            log.offset(3, 1.0, 2.0),
            Err(OffsetError::Inverted { pair: 3, .. })
        ));
        assert!(matches!(
            log.offset(4, f64::NAN, 2.0),
            Err(OffsetError::NonFiniteScore { pair: 4, .. })
        ));
        assert!(matches!(
            log.offset(4, 2.0, f64::NAN),
            Err(OffsetError::NonFiniteScore { pair: 4, .. })
        ));
        assert!(matches!(
            log.offset(5, f64::INFINITY, 2.0),
            Err(OffsetError::NonFiniteScore { .. })
        ));
        let ratio = cfg(OffsetFn::LogRatio, 1.0);
        assert!(matches!(
            ratio.offset(6, 1.0, -1.0),
            Err(OffsetError::NonPositiveScore { pair: 6, .. })
        ));
        assert!(matches!(
            ratio.offset(7, 1.0, 0.0),
            Err(OffsetError::NonPositiveScore { pair: 7, .. })
        ));
        let id = cfg(OffsetFn::Identity, 1.0);
        assert!(matches!(
            id.offset(8, 1.0, 1.0),
            Err(OffsetError::Tie { pair: 8, .. })
        ));
        assert!(matches!(
            id.offset(9, 1.0, 2.0),
            Err(OffsetError::Inverted { pair: 9, .. })
        ));
        let errs = log.offsets(&[(2.0, 1.0), (1.0, 1.0)]);
        assert!(matches!(errs, Err(OffsetError::Tie { pair: 1, .. })));
    }

    #[test]
    fn bad_config() {
        assert!(cfg(OffsetFn::Log, -1.0).offset(0, 2.0, 1.0).is_err());
        assert!(cfg(OffsetFn::Log, f64::NAN).offset(0, 2.0, 1.0).is_err());
        let crossed = OffsetConfig {
            clip_min: Some(1.0),
            clip_max: Some(0.0),
            ..OffsetConfig::default()
        };
        assert!(crossed.validate().is_err());
    }

    #[test]
    fn serde_defaults_and_names() -> Result<(), Box<dyn std::error::Error>> {
        let c: OffsetConfig = serde_json_like("{}")?;
        assert_eq!(c, OffsetConfig::default());
        let c: OffsetConfig =
            serde_json_like(r#"{"function": "log-ratio", "alpha": 0.5, "clip_min": 0.0}"#)?;
        assert_eq!(c.function, OffsetFn::LogRatio);
        assert_eq!(c.clip_min, Some(0.0));
        assert!(serde_json_like::<OffsetConfig>(r#"{"alhpa": 0.5}"#).is_err());
        Ok(())
    }

    fn serde_json_like<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, serde_json::Error> {
        serde_json::from_str(s)
    }
}
