//! `LossKind`, one variant per objective, and `LossConfig`, the `[loss]` table of a run.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use crate::LossError;
use crate::divergence::FDivergence;

/// One preference objective. Spelled in kebab-case in configs; TRL's snake_case `loss_type` names are
/// accepted as aliases. docs/losses.md has one row per variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    /// DPO, and ODPO when offsets are given: `-log σ(β·h − Δ)` ([`crate::dpo::sigmoid_loss`]).
    #[serde(alias = "dpo")]
    Sigmoid,
    /// Length-normalised DPO: `-log σ(β·(r_w/|y_w| − r_l/|y_l|) − Δ)` ([`crate::dpo::sigmoid_norm`]).
    #[serde(alias = "sigmoid_norm")]
    SigmoidNorm,
    /// Conservative DPO, label smoothing ε ([`crate::dpo::cdpo`]).
    Cdpo,
    /// Robust DPO, unbiased under label noise ε ([`crate::dpo::robust`]).
    Robust,
    /// IPO, squared loss towards a margin 1/(2β) ([`crate::dpo::ipo`]).
    Ipo,
    /// SLiC hinge `relu(1 − β·h)` ([`crate::dpo::hinge`]).
    Hinge,
    /// EXO, pairwise reverse-KL form ([`crate::dpo::exo_pair`]).
    #[serde(alias = "exo_pair")]
    ExoPair,
    /// DiscoPOP, the log-ratio modulated loss ([`crate::dpo::discopop`]).
    Discopop,
    /// BCO, pairwise form ([`crate::anchored::bco_pair`]).
    #[serde(alias = "bco_pair")]
    BcoPair,
    /// NCA, pairwise form ([`crate::anchored::nca_pair`]).
    #[serde(alias = "nca_pair")]
    NcaPair,
    /// SPPO with hard labels ([`crate::anchored::sppo_hard`]).
    #[serde(alias = "sppo_hard")]
    SppoHard,
    /// AOT for paired data ([`crate::aot::aot`]).
    Aot,
    /// AOT for unpaired data ([`crate::aot::aot_unpaired`]); TRL calls it `aot_unpaired` (was `aot_pair`).
    #[serde(alias = "aot_unpaired", alias = "aot_pair")]
    AotUnpaired,
    /// APO-zero ([`crate::anchored::apo_zero`]).
    #[serde(alias = "apo_zero")]
    ApoZero,
    /// APO-down ([`crate::anchored::apo_down`]).
    #[serde(alias = "apo_down")]
    ApoDown,
    /// SimPO: reference-free, length-normalised, margin γ ([`crate::simpo::simpo`]).
    Simpo,
    /// ORPO: NLL plus odds-ratio term, reference-free ([`crate::orpo::orpo`]).
    Orpo,
    /// Mean token NLL of the chosen response ([`crate::nll::chosen_nll`]), TRL's `sft` loss type.
    Sft,
}

impl LossKind {
    /// Every objective, in documentation order.
    pub const ALL: [LossKind; 18] = [
        LossKind::Sigmoid,
        LossKind::SigmoidNorm,
        LossKind::Cdpo,
        LossKind::Robust,
        LossKind::Ipo,
        LossKind::Hinge,
        LossKind::ExoPair,
        LossKind::Discopop,
        LossKind::BcoPair,
        LossKind::NcaPair,
        LossKind::SppoHard,
        LossKind::Aot,
        LossKind::AotUnpaired,
        LossKind::ApoZero,
        LossKind::ApoDown,
        LossKind::Simpo,
        LossKind::Orpo,
        LossKind::Sft,
    ];

    /// The config spelling (kebab-case).
    pub fn name(self) -> &'static str {
        match self {
            LossKind::Sigmoid => "sigmoid",
            LossKind::SigmoidNorm => "sigmoid-norm",
            LossKind::Cdpo => "cdpo",
            LossKind::Robust => "robust",
            LossKind::Ipo => "ipo",
            LossKind::Hinge => "hinge",
            LossKind::ExoPair => "exo-pair",
            LossKind::Discopop => "discopop",
            LossKind::BcoPair => "bco-pair",
            LossKind::NcaPair => "nca-pair",
            LossKind::SppoHard => "sppo-hard",
            LossKind::Aot => "aot",
            LossKind::AotUnpaired => "aot-unpaired",
            LossKind::ApoZero => "apo-zero",
            LossKind::ApoDown => "apo-down",
            LossKind::Simpo => "simpo",
            LossKind::Orpo => "orpo",
            LossKind::Sft => "sft",
        }
    }

    /// `Ok(())` when a per-pair offset Δ composes with this objective (subtracted from its pairwise logit),
    /// otherwise the reason it does not.
    pub fn offset_support(self) -> Result<(), &'static str> {
        match self {
            LossKind::Sigmoid
            | LossKind::SigmoidNorm
            | LossKind::Cdpo
            | LossKind::Robust
            | LossKind::Ipo
            | LossKind::Hinge
            | LossKind::ExoPair
            | LossKind::Discopop
            | LossKind::Simpo
            | LossKind::Orpo => Ok(()),
            LossKind::BcoPair
            | LossKind::NcaPair
            | LossKind::SppoHard
            | LossKind::ApoZero
            | LossKind::ApoDown => Err(
                "it scores each response against an absolute anchor, not the pair's reward difference",
            ),
            LossKind::Aot | LossKind::AotUnpaired => {
                Err("it sorts log-ratios across the batch, so a term no longer belongs to one pair")
            }
            LossKind::Sft => {
                Err("it is a likelihood term on the chosen response, with no pairwise margin")
            }
        }
    }

    /// `Ok(())` when the objective reads the responses' log-ratios only through their chosen-minus-rejected
    /// difference (or not at all), so that an f-divergence other than reverse KL applies to it
    /// (`f_divergence_type`, [`crate::divergence`]); otherwise the reason it does not.
    pub fn f_divergence_support(self) -> Result<(), &'static str> {
        match self {
            LossKind::Sigmoid
            | LossKind::SigmoidNorm
            | LossKind::Cdpo
            | LossKind::Robust
            | LossKind::Ipo
            | LossKind::Hinge
            | LossKind::ExoPair
            | LossKind::Discopop
            | LossKind::Sft => Ok(()),
            LossKind::BcoPair
            | LossKind::NcaPair
            | LossKind::SppoHard
            | LossKind::ApoZero
            | LossKind::ApoDown => Err(
                "it scores each response against an absolute anchor, where f-DPO's log Z(x) term does not cancel",
            ),
            LossKind::Aot | LossKind::AotUnpaired => Err(
                "it sorts log-ratios across the batch, so f-DPO's log Z(x) term does not cancel within a pair",
            ),
            LossKind::Simpo | LossKind::Orpo => {
                Err("it has no reference model to diverge from")
            }
        }
    }

    /// `Ok(())` when LD-DPO's token weights (`ld_alpha`) apply to this objective's log-probs, otherwise
    /// the reason they do not. The token-averaged objectives of a reference (`sigmoid-norm`, `ipo`)
    /// divide the weighted sums by the true token counts, as TRL's do.
    pub fn ld_support(self) -> Result<(), &'static str> {
        match self {
            LossKind::Sft | LossKind::Orpo => Err(
                "its NLL is a mean over every token of the chosen response (TRL's `sft` term reads the unweighted tokens)",
            ),
            LossKind::Simpo => Err(
                "its length-normalised reward has no reference and no LD-DPO form (TRL's CPOTrainer has no `ld_alpha`)",
            ),
            _ => Ok(()),
        }
    }

    /// `Ok(())` when per-pair weights apply to this objective's per-pair losses.
    pub fn weight_support(self) -> Result<(), &'static str> {
        match self {
            LossKind::Aot | LossKind::AotUnpaired => {
                Err("its i-th term is the i-th quantile of the batch, not pair i")
            }
            _ => Ok(()),
        }
    }

    /// Whether the objective ignores the reference log-probs (SimPO, ORPO, SFT).
    pub fn reference_free(self) -> bool {
        matches!(self, LossKind::Simpo | LossKind::Orpo | LossKind::Sft)
    }
}

impl fmt::Display for LossKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The objectives and their hyper-parameters: the `[loss]` table. Defaults follow TRL's `DPOConfig`
/// (and `CPOConfig` for SimPO's γ). Unknown keys are rejected; [`LossConfig::validate`] rejects an option
/// that none of the chosen objectives reads (compared with its default) and names both.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    /// β > 0. For the DPO family the inverse temperature of the implicit reward β·log(π/π_ref); for IPO the
    /// regularisation τ; for hinge the inverse margin; for SimPO the reward scale; for ORPO the weight λ of
    /// the odds-ratio term. TRL default 0.1; the ODPO paper uses 0.05 to 0.7.
    pub beta: f64,
    /// The objectives, summed with `loss_weights` (TRL's `loss_type` list). A single name is accepted too.
    #[serde(deserialize_with = "one_or_many")]
    pub loss_type: Vec<LossKind>,
    /// One weight per entry of `loss_type`; all 1 when absent.
    pub loss_weights: Option<Vec<f64>>,
    /// ε, the assumed rate of flipped labels: cdpo and robust need [0, 0.5) (cdpo > 0), exo-pair (0, 1),
    /// aot and aot-unpaired [0, 0.5). Default 0.
    pub label_smoothing: f64,
    /// IPO only: average the log-ratios over the response tokens (TRL's current IPO, as the IPO authors
    /// confirmed) when true, sum them (the IPO paper's Eq. 17 read literally, and the ODPO code) when false.
    pub ipo_token_average: bool,
    /// DiscoPOP only: τ in (0, 1], the temperature of the mixing sigmoid. Default 0.05 (the paper's).
    pub discopop_tau: f64,
    /// SimPO only: γ, the target reward margin (TRL's `simpo_gamma`, default 0.5).
    pub simpo_gamma: f64,
    /// RPO: adds `rpo_alpha` × the chosen response's mean token NLL to every pair's loss. None: off.
    pub rpo_alpha: Option<f64>,
    /// f-DPO: the divergence from the reference whose score f'(π_θ/π_ref) replaces each log-ratio in the
    /// pairwise objectives ([`crate::divergence`]). Default reverse KL, which is DPO.
    pub f_divergence_type: FDivergence,
    /// a of the α-divergence (TRL's `f_alpha_divergence_coef`, default 0.5); read only with
    /// `f_divergence_type = "alpha-divergence"`.
    pub f_alpha_divergence_coef: f64,
    /// LD-DPO's α in [0, 1]: the weight of each response's tokens beyond the length the pair's two
    /// responses share, in the summed log-probs of policy and reference (TRL's `ld_alpha`). None: every
    /// token weighs 1. Read by the trainer when it sums a batch's log-probs, not by the objectives.
    pub ld_alpha: Option<f64>,
    /// WPO (TRL's `use_weighting`): each pair's loss is multiplied by exp(m_w + m_l), m the response's
    /// mean over its tokens of log π_θ(y_t) − log Σ_v π_θ(v)² (Zhou et al. 2024), without gradient.
    /// Read by the trainer, which computes the means in the policy's forward pass, and by
    /// [`crate::preference_loss`]. Default false.
    pub use_weighting: bool,
    /// A mixture of experts: the weight of its routers' load-balancing loss (transformers'
    /// `load_balancing_loss_func`) added to the objective, as TRL adds `router_aux_loss_coef` × the
    /// model's `aux_loss`. None: the model config's `router_aux_loss_coef` (0.001 where absent)
    /// whatever its `output_router_logits` says (TRL 1.16's rule); 0: off. The one key of the table
    /// the SFT stage reads. Read by the trainer, which
    /// computes the loss in the policy's forward pass; a model without experts has none.
    pub router_aux_loss_coef: Option<f64>,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            loss_type: vec![LossKind::Sigmoid],
            loss_weights: None,
            label_smoothing: 0.0,
            ipo_token_average: true,
            discopop_tau: 0.05,
            simpo_gamma: 0.5,
            rpo_alpha: None,
            f_divergence_type: FDivergence::ReverseKl,
            f_alpha_divergence_coef: 0.5,
            ld_alpha: None,
            use_weighting: false,
            router_aux_loss_coef: None,
        }
    }
}

/// A name or a list of names. Written as a visitor rather than an untagged enum, so that an unknown
/// name gets serde's "unknown variant `x`, expected one of ..." instead of "did not match any variant".
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<LossKind>, D::Error> {
    use serde::de::{self, IntoDeserializer, SeqAccess, Visitor};
    struct Kinds;
    impl<'de> Visitor<'de> for Kinds {
        type Value = Vec<LossKind>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a loss name or a list of loss names")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(vec![LossKind::deserialize(v.into_deserializer())?])
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut kinds = Vec::new();
            while let Some(k) = seq.next_element()? {
                kinds.push(k);
            }
            Ok(kinds)
        }
    }
    d.deserialize_any(Kinds)
}

impl LossConfig {
    /// A config with one objective and the given β, other options at their defaults.
    pub fn new(kind: LossKind, beta: f64) -> Self {
        Self {
            beta,
            loss_type: vec![kind],
            ..Self::default()
        }
    }

    /// The weight of each objective (`loss_weights`, or 1 each).
    pub fn weights(&self) -> Vec<f64> {
        self.loss_weights
            .clone()
            .unwrap_or_else(|| vec![1.0; self.loss_type.len()])
    }

    fn has(&self, kinds: &[LossKind]) -> bool {
        self.loss_type.iter().any(|k| kinds.contains(k))
    }

    /// Checks ranges and refuses options that do nothing for the chosen objectives.
    pub fn validate(&self) -> Result<(), LossError> {
        let invalid = |option: &'static str, value: String, reason: &str| {
            Err(LossError::InvalidOption {
                option,
                value,
                reason: reason.to_string(),
            })
        };
        let listed = || {
            self.loss_type
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let unused = |option: &'static str, value: String, read_by: &'static str| {
            Err(LossError::UnusedOption {
                option,
                value,
                loss_type: listed(),
                read_by,
            })
        };

        if !(self.beta.is_finite() && self.beta > 0.0) {
            return invalid("beta", self.beta.to_string(), "must be finite and > 0");
        }
        if self.loss_type.is_empty() {
            return invalid("loss_type", "[]".into(), "name at least one objective");
        }
        for (i, k) in self.loss_type.iter().enumerate() {
            if self.loss_type[..i].contains(k) {
                return invalid(
                    "loss_type",
                    format!("[{}]", listed()),
                    "lists an objective twice; use `loss_weights`",
                );
            }
        }
        if let Some(w) = &self.loss_weights {
            if w.len() != self.loss_type.len() {
                return Err(LossError::WeightsLength {
                    weights: w.len(),
                    losses: self.loss_type.len(),
                });
            }
            if w.iter().any(|x| !x.is_finite()) {
                return invalid("loss_weights", format!("{w:?}"), "must be finite");
            }
        }

        use LossKind::*;
        let eps = self.label_smoothing;
        if !eps.is_finite() {
            return invalid("label_smoothing", eps.to_string(), "must be finite");
        }
        if eps != 0.0 && !self.has(&[Cdpo, Robust, ExoPair, Aot, AotUnpaired]) {
            return unused(
                "label_smoothing",
                eps.to_string(),
                "cdpo, robust, exo-pair, aot, aot-unpaired (for cDPO use `loss_type = \"cdpo\"`)",
            );
        }
        if self.has(&[Cdpo]) && !(eps > 0.0 && eps < 0.5) {
            return invalid(
                "label_smoothing",
                eps.to_string(),
                "cdpo needs it in (0, 0.5); with 0 it is `sigmoid`",
            );
        }
        if self.has(&[Robust, Aot, AotUnpaired]) && !(0.0..0.5).contains(&eps) {
            return invalid(
                "label_smoothing",
                eps.to_string(),
                "robust, aot and aot-unpaired need it in [0, 0.5)",
            );
        }
        if self.has(&[ExoPair]) && !(eps > 0.0 && eps < 1.0) {
            return invalid(
                "label_smoothing",
                eps.to_string(),
                "exo-pair needs it in (0, 1): log ε and log(1 − ε) must be finite (TRL's example uses 1e-3)",
            );
        }

        let d = Self::default();
        if self.ipo_token_average != d.ipo_token_average && !self.has(&[Ipo]) {
            return unused(
                "ipo_token_average",
                self.ipo_token_average.to_string(),
                "ipo",
            );
        }
        if self.discopop_tau != d.discopop_tau && !self.has(&[Discopop]) {
            return unused("discopop_tau", self.discopop_tau.to_string(), "discopop");
        }
        if !(self.discopop_tau > 0.0 && self.discopop_tau <= 1.0) {
            // τ > 1 lets exp(−z)·σ(z/τ) overflow for very negative z; the paper uses 0.05.
            return invalid(
                "discopop_tau",
                self.discopop_tau.to_string(),
                "must be in (0, 1]",
            );
        }
        if self.simpo_gamma != d.simpo_gamma && !self.has(&[Simpo]) {
            return unused("simpo_gamma", self.simpo_gamma.to_string(), "simpo");
        }
        if !self.simpo_gamma.is_finite() {
            return invalid(
                "simpo_gamma",
                self.simpo_gamma.to_string(),
                "must be finite",
            );
        }
        if let Some(c) = self.router_aux_loss_coef
            && !(c.is_finite() && c >= 0.0)
        {
            return invalid("router_aux_loss_coef", c.to_string(), "must be finite and >= 0 (0 turns the load-balancing loss off)");
        }
        if let Some(a) = self.rpo_alpha
            && !(a.is_finite() && a > 0.0)
        {
            return invalid(
                "rpo_alpha",
                a.to_string(),
                "must be finite and > 0 (leave it out to turn RPO off)",
            );
        }
        let coef = self.f_alpha_divergence_coef;
        if coef != d.f_alpha_divergence_coef
            && self.f_divergence_type != FDivergence::AlphaDivergence
        {
            return invalid(
                "f_alpha_divergence_coef",
                coef.to_string(),
                &format!(
                    "is read only with `f_divergence_type = \"alpha-divergence\"` (it is \"{}\")",
                    self.f_divergence_type.name()
                ),
            );
        }
        if !coef.is_finite() {
            return invalid("f_alpha_divergence_coef", coef.to_string(), "must be finite");
        }
        if let Some(a) = self.ld_alpha {
            if !(0.0..=1.0).contains(&a) {
                return invalid(
                    "ld_alpha",
                    a.to_string(),
                    "must be in [0, 1]: 1 weighs every token alike (DPO), 0 drops the tokens beyond the shared length",
                );
            }
            for &k in &self.loss_type {
                if let Err(why) = k.ld_support() {
                    return invalid(
                        "ld_alpha",
                        a.to_string(),
                        &format!("`loss_type` {k} cannot take LD-DPO's token weights: {why}"),
                    );
                }
            }
            if self.rpo_alpha.is_some() {
                return invalid(
                    "ld_alpha",
                    a.to_string(),
                    "`rpo_alpha`'s NLL would read the LD-weighted sums (TRL computes an NLL on the unweighted tokens); leave one of them out",
                );
            }
        }
        if self.use_weighting {
            for &k in &self.loss_type {
                if let Err(why) = k.weight_support() {
                    return invalid("use_weighting", "true".into(), &format!("`loss_type` {k} cannot take WPO's per-pair weights: {why}"));
                }
            }
        }
        if self.f_divergence_type != FDivergence::ReverseKl {
            for &k in &self.loss_type {
                if let Err(why) = k.f_divergence_support() {
                    return invalid(
                        "f_divergence_type",
                        format!("\"{}\"", self.f_divergence_type.name()),
                        &format!(
                            "`loss_type` {k} has no f-divergence form ({why}); f-DPO applies to sigmoid, sigmoid-norm, cdpo, robust, ipo, hinge, exo-pair, discopop and sft"
                        ),
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        assert_eq!(LossConfig::default().validate(), Ok(()));
        for k in LossKind::ALL {
            let mut c = LossConfig::new(k, 0.1);
            if matches!(k, LossKind::Cdpo | LossKind::ExoPair) {
                c.label_smoothing = 0.1;
            }
            assert_eq!(c.validate(), Ok(()), "{k}");
        }
    }

    #[test]
    fn serde_names_and_aliases() -> Result<(), Box<dyn std::error::Error>> {
        for k in LossKind::ALL {
            let s = serde_json::to_string(&k)?;
            assert_eq!(s, format!("\"{}\"", k.name()));
            assert_eq!(serde_json::from_str::<LossKind>(&s)?, k);
        }
        let c: LossConfig = toml::from_str("loss_type = \"exo_pair\"\nlabel_smoothing = 0.001")?;
        assert_eq!(c.loss_type, vec![LossKind::ExoPair]);
        let c: LossConfig = toml::from_str(
            "beta = 0.5\nloss_type = [\"sigmoid\", \"sft\"]\nloss_weights = [0.8, 0.2]",
        )?;
        assert_eq!(c.loss_type, vec![LossKind::Sigmoid, LossKind::Sft]);
        assert_eq!(c.beta, 0.5);
        assert_eq!(c.validate(), Ok(()));
        assert!(toml::from_str::<LossConfig>("betta = 0.5").is_err());
        // An unknown name, alone or in a list, is named with the names that exist.
        for text in ["loss_type = \"dpp\"", "loss_type = [\"sigmoid\", \"dpp\"]"] {
            let e = toml::from_str::<LossConfig>(text).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("unknown variant `dpp`, expected one of") && e.contains("`sigmoid`"), "{e}");
        }
        let e = toml::from_str::<LossConfig>("loss_type = 3").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("expected a loss name or a list of loss names"), "{e}");
        Ok(())
    }

    #[test]
    fn unused_options_name_both() {
        let c = LossConfig {
            label_smoothing: 0.1,
            ..LossConfig::default()
        };
        let msg = c
            .validate()
            .map_err(|e| e.to_string())
            .err()
            .unwrap_or_default();
        assert!(
            msg.contains("`label_smoothing` = 0.1 does nothing with `loss_type` = [sigmoid]"),
            "{msg}"
        );
        assert!(msg.contains("cdpo"), "{msg}");
        let c = LossConfig {
            simpo_gamma: 1.0,
            ..LossConfig::default()
        };
        assert!(matches!(
            c.validate(),
            Err(LossError::UnusedOption {
                option: "simpo_gamma",
                ..
            })
        ));
        let c = LossConfig {
            discopop_tau: 0.1,
            ..LossConfig::default()
        };
        assert!(matches!(
            c.validate(),
            Err(LossError::UnusedOption {
                option: "discopop_tau",
                ..
            })
        ));
        let c = LossConfig {
            ipo_token_average: false,
            ..LossConfig::default()
        };
        assert!(matches!(
            c.validate(),
            Err(LossError::UnusedOption {
                option: "ipo_token_average",
                ..
            })
        ));
    }

    #[test]
    fn f_divergence_names_and_where_it_applies() -> Result<(), Box<dyn std::error::Error>> {
        for f in FDivergence::ALL {
            let s = serde_json::to_string(&f)?;
            assert_eq!(s, format!("\"{}\"", f.name()));
        }
        // TRL's spellings, as a TRL config writes them.
        let c: LossConfig = toml::from_str(
            "loss_type = [\"sigmoid_norm\", \"sft\"]\nf_divergence_type = \"alpha_divergence\"\nf_alpha_divergence_coef = 0.3",
        )?;
        assert_eq!(c.loss_type, vec![LossKind::SigmoidNorm, LossKind::Sft]);
        assert_eq!(c.f_divergence_type, FDivergence::AlphaDivergence);
        assert_eq!(c.validate(), Ok(()));
        // Every objective either takes every divergence or refuses the ones other than reverse KL by name.
        for k in LossKind::ALL {
            let mut c = LossConfig::new(k, 0.1);
            if matches!(k, LossKind::Cdpo | LossKind::ExoPair) {
                c.label_smoothing = 0.1;
            }
            for f in FDivergence::ALL {
                c.f_divergence_type = f;
                let got = c.validate();
                if f == FDivergence::ReverseKl || k.f_divergence_support().is_ok() {
                    assert_eq!(got, Ok(()), "{k} with {}", f.name());
                } else {
                    let msg = got.map_err(|e| e.to_string()).err().unwrap_or_default();
                    assert!(
                        msg.contains(&format!("`f_divergence_type` = \"{}\"", f.name()))
                            && msg.contains(&format!("`loss_type` {k} has no f-divergence form")),
                        "{msg}"
                    );
                }
            }
        }
        // The coefficient alone does nothing; it must be finite.
        let c = LossConfig {
            f_alpha_divergence_coef: 0.3,
            ..LossConfig::default()
        };
        let msg = c.validate().map_err(|e| e.to_string()).err().unwrap_or_default();
        assert!(msg.contains("`f_alpha_divergence_coef` = 0.3: is read only with `f_divergence_type = \"alpha-divergence\"` (it is \"reverse-kl\")"), "{msg}");
        let c = LossConfig {
            f_divergence_type: FDivergence::AlphaDivergence,
            f_alpha_divergence_coef: f64::INFINITY,
            ..LossConfig::default()
        };
        assert!(c.validate().is_err());
        assert!(toml::from_str::<LossConfig>("f_divergence_type = \"kl\"").is_err());
        Ok(())
    }

    #[test]
    fn ld_alpha_range_and_objectives() {
        let ld = |a: f64, kinds: Vec<LossKind>| LossConfig {
            ld_alpha: Some(a),
            loss_type: kinds,
            ..LossConfig::default()
        };
        for a in [0.0, 0.5, 1.0] {
            assert_eq!(ld(a, vec![LossKind::Sigmoid, LossKind::SigmoidNorm, LossKind::Ipo]).validate(), Ok(()));
        }
        for a in [-0.1, 1.5, f64::NAN] {
            let msg = ld(a, vec![LossKind::Sigmoid]).validate().map_err(|e| e.to_string()).err().unwrap_or_default();
            assert!(msg.starts_with("`ld_alpha` = ") && msg.contains("must be in [0, 1]"), "{msg}");
        }
        for k in [LossKind::Sft, LossKind::Orpo, LossKind::Simpo] {
            let msg = ld(0.5, vec![LossKind::Sigmoid, k]).validate().map_err(|e| e.to_string()).err().unwrap_or_default();
            assert!(msg.contains(&format!("`loss_type` {k} cannot take LD-DPO's token weights")), "{msg}");
        }
        let c = LossConfig {
            rpo_alpha: Some(0.5),
            ..ld(0.5, vec![LossKind::Sigmoid])
        };
        assert!(c.validate().map_err(|e| e.to_string()).err().unwrap_or_default().contains("`rpo_alpha`"));
        let c: Result<LossConfig, _> = toml::from_str("ld_alpha = 0.5");
        assert_eq!(c.map(|c| c.ld_alpha).ok(), Some(Some(0.5)));
    }

    #[test]
    fn ranges() {
        let bad = [
            LossConfig {
                beta: 0.0,
                ..LossConfig::default()
            },
            LossConfig {
                beta: f64::NAN,
                ..LossConfig::default()
            },
            LossConfig {
                loss_type: vec![],
                ..LossConfig::default()
            },
            LossConfig {
                loss_type: vec![LossKind::Ipo, LossKind::Ipo],
                ..LossConfig::default()
            },
            LossConfig {
                loss_weights: Some(vec![1.0, 2.0]),
                ..LossConfig::default()
            },
            LossConfig::new(LossKind::Cdpo, 0.1),
            LossConfig::new(LossKind::ExoPair, 0.1),
            LossConfig {
                label_smoothing: 0.5,
                ..LossConfig::new(LossKind::Robust, 0.1)
            },
            LossConfig {
                rpo_alpha: Some(0.0),
                ..LossConfig::default()
            },
            LossConfig {
                discopop_tau: 2.0,
                ..LossConfig::new(LossKind::Discopop, 0.1)
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
    }
}
