//! Errors of the loss configuration, of the inputs' shapes and of non-finite values.

use crate::LossKind;

/// Why a loss configuration or a batch of inputs was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum LossError {
    /// An option has a value outside its range.
    #[error("`{option}` = {value}: {reason}")]
    InvalidOption {
        /// The option, as spelled in the config.
        option: &'static str,
        /// Its value, printed.
        value: String,
        /// What is required.
        reason: String,
    },
    /// An option was set that none of the chosen objectives reads.
    #[error(
        "`{option}` = {value} does nothing with `loss_type` = [{loss_type}]: it is read only by {read_by}"
    )]
    UnusedOption {
        /// The option that does nothing.
        option: &'static str,
        /// Its value, printed.
        value: String,
        /// The chosen objectives, comma separated.
        loss_type: String,
        /// The objectives that read the option.
        read_by: &'static str,
    },
    /// `loss_weights` and `loss_type` differ in length.
    #[error(
        "`loss_weights` has {weights} entries but `loss_type` has {losses}; give one weight per loss"
    )]
    WeightsLength {
        /// Number of weights.
        weights: usize,
        /// Number of objectives.
        losses: usize,
    },
    /// Two tensors of one batch have different lengths, or the batch is empty.
    #[error("input `{input}` has shape {got:?}, expected [{expected}] like `policy_chosen`")]
    Shape {
        /// The input's field name in `PairLogps`.
        input: &'static str,
        /// The batch size taken from `policy_chosen`.
        expected: usize,
        /// The input's shape.
        got: Vec<usize>,
    },
    /// Offsets were given to an objective that has no pairwise margin to put them in.
    #[error(
        "`offset` was given but `loss_type` {kind} cannot use it ({why}); drop the offset or choose an objective that composes with it (see docs/losses.md)"
    )]
    OffsetNotSupported {
        /// The objective.
        kind: LossKind,
        /// Why the offset does not compose.
        why: &'static str,
    },
    /// Per-pair weights were given to an objective whose per-pair losses are not per pair.
    #[error("per-pair `weight` was given but `loss_type` {kind} cannot use it ({why})")]
    WeightNotSupported {
        /// The objective.
        kind: LossKind,
        /// Why the weights do not apply.
        why: &'static str,
    },
    /// `use_weighting` is on but the inputs lack WPO's per-response means.
    #[error("`use_weighting` is on but the inputs carry no `wpo_chosen` / `wpo_rejected`; compute them in the policy's forward pass (`PairLogps::with_wpo`)")]
    MissingWpo,
    /// An input holds NaN or an infinity.
    #[error("pair {pair}: input `{input}` is {value}; the loss would be {result}")]
    NonFiniteInput {
        /// Index of the first offending pair in the batch.
        pair: usize,
        /// The input's field name in `PairLogps`.
        input: &'static str,
        /// The value found.
        value: f64,
        /// What the loss becomes (`NaN` or `inf`).
        result: &'static str,
    },
    /// The per-pair weights sum to zero (or are negative or not finite), so the weighted mean is undefined.
    #[error(
        "the per-pair weights sum to {sum}; the weighted mean needs non-negative weights with a positive sum"
    )]
    BadWeights {
        /// The sum of the weights.
        sum: f64,
    },
    /// The loss is not finite although every input is (an overflow in the objective itself).
    #[error(
        "the loss is {value} (first non-finite per-pair loss: {pair:?}) although every input is finite"
    )]
    NonFiniteLoss {
        /// The loss value.
        value: f64,
        /// Index of the first non-finite per-pair loss, when one is.
        pair: Option<usize>,
    },
    /// Reading a tensor back to the host failed.
    #[error("reading `{what}` back from the device failed: {message}")]
    Read {
        /// What was read.
        what: &'static str,
        /// The backend's message.
        message: String,
    },
}
