//! `PairLogps`: what every objective reads for a batch of B preference pairs.

use burn::tensor::Tensor;

use crate::LossError;

/// The per-pair inputs of the objectives, each a tensor of shape `[B]`.
///
/// Log-probs are SUMS over the response tokens (prompt and padding excluded), as in the DPO and ODPO
/// papers; objectives that need per-token averages (IPO with `ipo_token_average`, SimPO, ORPO, the NLL
/// terms) divide by the token counts themselves. Token counts are clamped to at least 1, as TRL does, so
/// an empty response cannot divide by zero.
#[derive(Clone, Debug)]
pub struct PairLogps {
    /// log π_θ(y_w|x), summed over the chosen response's tokens.
    pub policy_chosen: Tensor<1>,
    /// log π_θ(y_l|x), summed over the rejected response's tokens.
    pub policy_rejected: Tensor<1>,
    /// log π_ref(y_w|x). Ignored by the reference-free objectives (SimPO, ORPO, SFT), but still used for the
    /// reward metrics: pass zeros when no reference exists.
    pub reference_chosen: Tensor<1>,
    /// log π_ref(y_l|x).
    pub reference_rejected: Tensor<1>,
    /// |y_w|, the chosen response's token count, as a float.
    pub chosen_tokens: Tensor<1>,
    /// |y_l|, the rejected response's token count, as a float.
    pub rejected_tokens: Tensor<1>,
    /// Δ per pair (see [`crate::offset`]); None is DPO. Refused by objectives it does not compose with.
    pub offset: Option<Tensor<1>>,
    /// Non-negative per-pair weights w: the loss becomes Σ w·ℓ / Σ w. None weighs pairs equally.
    pub weight: Option<Tensor<1>>,
    /// WPO (`use_weighting`): the chosen response's mean over its tokens of log π_θ(y_t) − log Σ_v π_θ(v)²
    /// (`odpo_model::logprobs::wpo_row_means`). Read only with `use_weighting`.
    pub wpo_chosen: Option<Tensor<1>>,
    /// WPO: the same mean for the rejected response.
    pub wpo_rejected: Option<Tensor<1>>,
}

impl PairLogps {
    /// Inputs without offsets or weights.
    pub fn new(
        policy_chosen: Tensor<1>,
        policy_rejected: Tensor<1>,
        reference_chosen: Tensor<1>,
        reference_rejected: Tensor<1>,
        chosen_tokens: Tensor<1>,
        rejected_tokens: Tensor<1>,
    ) -> Self {
        Self {
            policy_chosen,
            policy_rejected,
            reference_chosen,
            reference_rejected,
            chosen_tokens,
            rejected_tokens,
            offset: None,
            weight: None,
            wpo_chosen: None,
            wpo_rejected: None,
        }
    }

    /// Sets the per-pair offsets Δ.
    pub fn with_offset(mut self, offset: Tensor<1>) -> Self {
        self.offset = Some(offset);
        self
    }

    /// Sets the per-pair weights.
    pub fn with_weight(mut self, weight: Tensor<1>) -> Self {
        self.weight = Some(weight);
        self
    }

    /// Sets WPO's per-response means (chosen, rejected) that `use_weighting` turns into pair weights.
    pub fn with_wpo(mut self, chosen: Tensor<1>, rejected: Tensor<1>) -> Self {
        self.wpo_chosen = Some(chosen);
        self.wpo_rejected = Some(rejected);
        self
    }

    /// The number of pairs B.
    pub fn batch_size(&self) -> usize {
        self.policy_chosen.dims()[0]
    }

    /// Every input with its field name.
    pub fn named(&self) -> Vec<(&'static str, &Tensor<1>)> {
        let mut v = vec![
            ("policy_chosen", &self.policy_chosen),
            ("policy_rejected", &self.policy_rejected),
            ("reference_chosen", &self.reference_chosen),
            ("reference_rejected", &self.reference_rejected),
            ("chosen_tokens", &self.chosen_tokens),
            ("rejected_tokens", &self.rejected_tokens),
        ];
        if let Some(o) = &self.offset {
            v.push(("offset", o));
        }
        if let Some(w) = &self.weight {
            v.push(("weight", w));
        }
        if let Some(w) = &self.wpo_chosen {
            v.push(("wpo_chosen", w));
        }
        if let Some(w) = &self.wpo_rejected {
            v.push(("wpo_rejected", w));
        }
        v
    }

    /// Checks that every input has the shape `[B]` of `policy_chosen` and that B > 0. No host sync.
    pub fn check_shapes(&self) -> Result<usize, LossError> {
        let b = self.batch_size();
        for (input, t) in self.named() {
            let got = t.dims().to_vec();
            if got != [b] || b == 0 {
                return Err(LossError::Shape {
                    input,
                    expected: b,
                    got,
                });
            }
        }
        Ok(b)
    }

    /// Reads every input back to the host and reports the first NaN or infinity, naming the pair and the
    /// input; also checks that the weights are non-negative with a positive sum. This synchronises with
    /// the device: call it when a loss came out non-finite (as [`crate::check_finite`] does), or on data
    /// you do not trust.
    pub fn check_finite(&self) -> Result<(), LossError> {
        for (input, t) in self.named() {
            let values = read(t, input)?;
            if let Some((pair, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                let result = if value.is_nan() { "NaN" } else { "inf" };
                return Err(LossError::NonFiniteInput {
                    pair,
                    input,
                    value,
                    result,
                });
            }
        }
        if let Some(w) = &self.weight {
            let values = read(w, "weight")?;
            let sum: f64 = values.iter().sum();
            if values.iter().any(|&x| x < 0.0) || sum <= 0.0 {
                return Err(LossError::BadWeights { sum });
            }
        }
        Ok(())
    }
}

/// Host copy of a tensor as f64 (one device sync).
pub(crate) fn read(t: &Tensor<1>, what: &'static str) -> Result<Vec<f64>, LossError> {
    t.try_to_vec_as::<f64>().map_err(|e| LossError::Read {
        what,
        message: e.to_string(),
    })
}
