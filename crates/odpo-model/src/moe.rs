//! Sparse mixture-of-experts MLPs (Shazeer et al. 2017, arXiv 1701.06538; Mixtral, Jiang et al.
//! 2024, arXiv 2401.04088), as transformers' `MixtralSparseMoeBlock`, `Qwen2MoeSparseMoeBlock` and
//! `Qwen3MoeSparseMoeBlock` compute them: a router's softmax over the experts picks each token's
//! `k` most probable ones, whose SwiGLU outputs are summed weighted by those probabilities
//! (renormalised over the `k` in Mixtral, and in Qwen where `norm_topk_prob`); Qwen2-MoE adds a
//! shared expert behind a sigmoid gate.
//!
//! The routing is read back to the host once a layer and each expert runs on the rows routed to it
//! (gathered, then added back in place), as transformers' eager path does: a token costs `k`
//! experts, not all of them, and the gradient reaches the router through the chosen probabilities.
//!
//! [`RouterStats`] gathers what the routers did over a forward pass, for the load-balancing loss
//! transformers adds to a mixture of experts' training loss (Switch Transformers, Fedus et al. 2021,
//! arXiv 2101.03961, Eqs. 4–6), which TRL's trainers add with `router_aux_loss_coef`.

use burn::module::Module;
use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::{DType, Device, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::error::{ModelError, Result};
use crate::linear::{Adapter, Linear};
use crate::llama::{LlamaConfig, Mlp};
use crate::names::{self, Slot, Table};

/// The shape of a mixture-of-experts Llama-family model, from its config.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct MoeLayout {
    /// Routed experts in each sparse layer.
    pub(crate) experts: usize,
    /// Experts each token takes.
    pub(crate) top_k: usize,
    /// Each routed expert's MLP width.
    pub(crate) width: usize,
    /// Qwen2-MoE's shared expert's width.
    pub(crate) shared: Option<usize>,
    /// Whether the chosen probabilities are renormalised to sum to 1.
    pub(crate) normalize: bool,
    /// Whether each layer is sparse (the others have the dense MLP of `intermediate_size`).
    pub(crate) sparse: Vec<bool>,
}

impl MoeLayout {
    /// The layout a config gives, with transformers' defaults where a key is absent; `None` for a
    /// dense family.
    pub(crate) fn of(cfg: &LlamaConfig, path: &std::path::Path) -> Result<Option<Self>> {
        // Mixtral's and Qwen3-MoE's configs read `num_experts` as `num_local_experts` (which
        // transformers 5 writes for both); Qwen2-MoE's has `num_experts` alone.
        let local = cfg.num_local_experts.or(cfg.num_experts);
        // transformers' defaults: (experts, top-k, expert width, shared expert width).
        let (experts, top_k, width, shared) = match cfg.model_type.as_str() {
            "mixtral" => (local.unwrap_or(8), cfg.num_experts_per_tok.unwrap_or(2), cfg.intermediate_size, None),
            "qwen2_moe" => (
                cfg.num_experts.unwrap_or(60),
                cfg.num_experts_per_tok.unwrap_or(4),
                cfg.moe_intermediate_size.unwrap_or(1408),
                Some(cfg.shared_expert_intermediate_size.unwrap_or(5632)),
            ),
            "qwen3_moe" => (local.unwrap_or(128), cfg.num_experts_per_tok.unwrap_or(8), cfg.moe_intermediate_size.unwrap_or(768), None),
            _ => return Ok(None),
        };
        let key = if cfg.model_type == "qwen2_moe" { "num_experts" } else { "num_local_experts" };
        // A Qwen without experts is dense in every layer, as transformers builds it.
        let dense_qwen = experts == 0 && cfg.model_type != "mixtral";
        if !dense_qwen && (top_k == 0 || top_k > experts) {
            return Err(ModelError::config(path, format!("num_experts_per_tok is {top_k}; expected 1 to {key} ({experts})")));
        }
        let width_key = if cfg.model_type == "mixtral" { "intermediate_size" } else { "moe_intermediate_size" };
        crate::layers::sizes_at_least_one(&[(width_key, width), ("shared_expert_intermediate_size", shared.unwrap_or(1))], path)?;
        let n = cfg.num_hidden_layers;
        let sparse = match cfg.model_type.as_str() {
            "mixtral" => vec![true; n],
            // Qwen: every `decoder_sparse_step`-th layer, except those `mlp_only_layers` lists.
            _ => {
                let step = cfg.decoder_sparse_step.unwrap_or(1);
                if step == 0 {
                    return Err(ModelError::config(path, "decoder_sparse_step is 0; expected at least 1"));
                }
                let dense = cfg.mlp_only_layers.clone().unwrap_or_default();
                if let Some(&i) = dense.iter().find(|&&i| i >= n) {
                    return Err(ModelError::config(path, format!("mlp_only_layers lists layer {i}; the model has {n} (0 to {})", n.saturating_sub(1))));
                }
                (0..n).map(|i| experts > 0 && !dense.contains(&i) && (i + 1) % step == 0).collect()
            }
        };
        Ok(Some(Self { experts, top_k, width, shared, normalize: cfg.model_type == "mixtral" || cfg.norm_topk_prob.unwrap_or(false), sparse }))
    }

    /// The width of the MLP units a token runs through in layer `i` (its `k` experts and the
    /// shared one in a sparse layer, `dense` elsewhere).
    pub(crate) fn active_width(&self, i: usize, dense: usize) -> usize {
        if self.sparse.get(i).copied().unwrap_or(false) { self.top_k * self.width + self.shared.unwrap_or(0) } else { dense }
    }
}

/// What a mixture of experts' routers did over the real tokens of one or more forward passes,
/// across their sparse layers: for each expert the summed probability the routers gave it (tracked,
/// f32) and the times it was chosen, and the token-layers counted. Its
/// [`load_balancing_loss`](Self::load_balancing_loss) is transformers' `load_balancing_loss_func`
/// with the attention mask.
#[derive(Clone, Debug, Default)]
pub struct RouterStats {
    prob_sum: Option<Tensor<1>>,
    chosen: Vec<f64>,
    tokens: f64,
}

impl RouterStats {
    /// Adds one layer's routing: its probabilities `[N, E]` (f32), its chosen experts `[N · k]`
    /// (row-major), and which of the `N` tokens are real (`mask`, 1 or 0), the whole sum `weight`
    /// times (2: a shared prompt's tokens, which the concatenated rows hold twice).
    fn add_layer(&mut self, probs: Tensor<2>, chosen: &[i64], k: usize, mask: &[f32], weight: f64) {
        let [n, e] = probs.dims();
        let m = Tensor::<2>::from_data(TensorData::new(mask.to_vec(), [n, 1]), &probs.device());
        let sum = (probs * m).sum_dim(0).reshape([e]).mul_scalar(weight);
        self.prob_sum = Some(match self.prob_sum.take() {
            Some(s) => s + sum,
            None => sum,
        });
        self.chosen.resize(e, 0.0);
        for (slot, &expert) in chosen.iter().enumerate() {
            self.chosen[expert as usize] += weight * f64::from(mask[slot / k]);
        }
        self.tokens += weight * mask.iter().map(|&x| f64::from(x)).sum::<f64>();
    }

    /// Adds `other`'s counts, each `weight` times.
    pub fn merge(&mut self, other: RouterStats, weight: f64) {
        let Some(sum) = other.prob_sum else { return };
        let sum = sum.mul_scalar(weight);
        self.prob_sum = Some(match self.prob_sum.take() {
            Some(s) => s + sum,
            None => sum,
        });
        self.chosen.resize(self.chosen.len().max(other.chosen.len()), 0.0);
        for (c, o) in self.chosen.iter_mut().zip(other.chosen) {
            *c += weight * o;
        }
        self.tokens += weight * other.tokens;
    }

    /// Whether any sparse layer routed a real token.
    pub fn is_empty(&self) -> bool {
        self.prob_sum.is_none() || self.tokens <= 0.0
    }

    /// The load-balancing loss `[1]`: `E · Σ_e f_e · P_e`, `f_e` the share of the token-layers'
    /// `k` choices that went to expert `e` (each token counts `k` times; no gradient) and `P_e` the
    /// mean probability the routers gave it (tracked); `None` without a routed token. Its least,
    /// `k`, is reached when both are uniform.
    pub fn load_balancing_loss(&self) -> Option<Tensor<1>> {
        let sum = self.prob_sum.as_ref().filter(|_| self.tokens > 0.0)?;
        let e = self.chosen.len();
        let share: Vec<f32> = self.chosen.iter().map(|&c| (c / self.tokens) as f32).collect();
        let share = Tensor::<1>::from_data(TensorData::new(share, [e]), &sum.device());
        Some((sum.clone().div_scalar(self.tokens) * share).sum().mul_scalar(e as f64))
    }
}

/// A sparse mixture-of-experts MLP.
#[derive(Module, Debug)]
pub(crate) struct SparseMoe {
    /// The router, `[hidden, experts]` (HF's `gate`, no bias).
    gate: Linear,
    experts: Vec<Mlp>,
    /// Qwen2-MoE: the expert every token takes, scaled by `sigmoid(shared_expert_gate(x))`.
    shared_expert: Option<Mlp>,
    shared_expert_gate: Option<Linear>,
    top_k: usize,
    normalize: bool,
}

impl SparseMoe {
    /// A layer of `layout`'s shape over a hidden size `d`, waiting for its weights.
    pub(crate) fn new(layout: &MoeLayout, d: usize, device: &Device) -> Self {
        Self {
            gate: names::linear(d, layout.experts, false, device),
            experts: (0..layout.experts).map(|_| Mlp::new(d, layout.width, false, false, device)).collect(),
            shared_expert: layout.shared.map(|w| Mlp::new(d, w, false, false, device)),
            shared_expert_gate: layout.shared.map(|_| names::linear(d, 1, false, device)),
            top_k: layout.top_k,
            normalize: layout.normalize,
        }
    }

    /// Its parameters under their HF names below `prefix` (`model.layers.N.block_sparse_moe` for
    /// Mixtral, whose experts name their gate, down and up projections `w1`, `w2`, `w3`;
    /// `model.layers.N.mlp` for Qwen).
    pub(crate) fn push_named<'a>(&'a mut self, t: &mut Table<'a>, prefix: &str, mixtral: bool) {
        t.push((format!("{prefix}.gate"), Slot::Linear(&mut self.gate)));
        let [gate, up, down] = if mixtral { ["w1", "w3", "w2"] } else { ["gate_proj", "up_proj", "down_proj"] };
        for (e, expert) in self.experts.iter_mut().enumerate() {
            expert.push_named(t, &format!("{prefix}.experts.{e}"), [gate, up, down]);
        }
        if let Some(shared) = &mut self.shared_expert {
            shared.push_named(t, &format!("{prefix}.shared_expert"), ["gate_proj", "up_proj", "down_proj"]);
        }
        if let Some(g) = &mut self.shared_expert_gate {
            t.push((format!("{prefix}.shared_expert_gate"), Slot::Linear(g)));
        }
    }

    /// The layer's output `[B, T, D]` for its input `x` `[B, T, D]`; with `stats`, its routing of
    /// the tokens the mask `[B · T]` marks real is added to them (`weight` times).
    pub(crate) fn forward(&self, x: Tensor<3>, stats: Option<(&[f32], f64, &mut RouterStats)>) -> Tensor<3> {
        let [b, t, d] = x.dims();
        let (n, k, device) = (b * t, self.top_k, x.device());
        let rows = x.reshape([n, d]);
        // The router's probabilities in f32, as transformers takes its softmax.
        let probs = softmax(self.gate.forward(rows.clone()).cast(DType::F32), 1);
        let experts = self.experts.len();
        let host: Vec<f32> = probs.clone().into_data().iter::<f32>().collect();
        // Each token's k most probable experts, the lower index first on a tie.
        let mut chosen = Vec::with_capacity(n * k);
        let mut order: Vec<usize> = Vec::with_capacity(experts);
        for row in host.chunks(experts) {
            order.clear();
            order.extend(0..experts);
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            chosen.extend(order[..k].iter().map(|&e| e as i64));
        }
        let index = Tensor::<2, Int>::from_data(TensorData::new(chosen.clone(), [n, k]), &device);
        if let Some((mask, weight, stats)) = stats {
            stats.add_layer(probs.clone(), &chosen, k, mask, weight);
        }
        let mut weights = probs.gather(1, index);
        if self.normalize {
            weights = weights.clone() / weights.sum_dim(1);
        }
        let weights = weights.cast(rows.dtype()).reshape([n * k]);
        let mut out = rows.zeros_like();
        // The (token, slot) pairs routed to each expert, in one pass; a token takes an expert once.
        let mut routed: Vec<Vec<i64>> = vec![Vec::new(); experts];
        for (slot, &e) in chosen.iter().enumerate() {
            routed[e as usize].push(slot as i64);
        }
        for (expert, slots) in self.experts.iter().zip(routed) {
            if slots.is_empty() {
                continue;
            }
            let m = slots.len();
            let tokens = Tensor::<1, Int>::from_data(TensorData::new(slots.iter().map(|s| s / k as i64).collect::<Vec<_>>(), [m]), &device);
            let slots = Tensor::<1, Int>::from_data(TensorData::new(slots, [m]), &device);
            let y = expert.forward(rows.clone().select(0, tokens.clone()).reshape([1, m, d])).reshape([m, d]);
            out = out.select_assign(0, tokens, y * weights.clone().select(0, slots).reshape([m, 1]), IndexingUpdateOp::Add);
        }
        if let (Some(shared), Some(gate)) = (&self.shared_expert, &self.shared_expert_gate) {
            let y = shared.forward(rows.clone().reshape([1, n, d])).reshape([n, d]);
            out = out + sigmoid(gate.forward(rows)) * y;
        }
        out.reshape([b, t, d])
    }
}

/// A sparse layer's parameter that PEFT's LoRA of parameters (`target_parameters`) adapts in
/// transformers 5, where the experts of a layer are stacked into `[experts, out, in]` parameters and
/// the router is a bare weight: the stacks take one adapter an expert (PEFT's `lora_A` `[experts ·
/// r, in]`, row `e·r + i` expert `e`'s; `lora_B` `[out, r · experts]`, column `i·experts + e`), the
/// router one as a linear layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ExpertParam {
    /// The experts' gate and up projections, stacked `gate_up_proj` (each expert's gate rows first).
    GateUp,
    /// The experts' down projections, `down_proj`.
    Down,
    /// The router's `weight`.
    Router,
}

impl ExpertParam {
    pub(crate) const ALL: [Self; 3] = [Self::GateUp, Self::Down, Self::Router];

    /// Its name below the layer's `mlp` in transformers 5 (what `target_parameters` names).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::GateUp => "experts.gate_up_proj",
            Self::Down => "experts.down_proj",
            Self::Router => "gate.weight",
        }
    }
}

impl SparseMoe {
    /// How many adapters `p` takes: one an expert for the stacks, one for the router.
    pub(crate) fn adapters_of(&self, p: ExpertParam) -> usize {
        if p == ExpertParam::Router { 1 } else { self.experts.len() }
    }

    /// `[in, out]` of each matrix `p` adapts: `[hidden, 2 · width]` for the gate and up stack.
    pub(crate) fn dims_of(&self, p: ExpertParam) -> [usize; 2] {
        let proj = |f: fn(&Mlp) -> Option<&Linear>| self.experts.first().and_then(f).map(|l| l.weight.dims()).unwrap_or([0, 0]);
        match p {
            ExpertParam::GateUp => {
                let [d, w] = proj(|m| m.gate_proj.as_ref());
                [d, 2 * w]
            }
            ExpertParam::Down => proj(|m| Some(&m.down_proj)),
            ExpertParam::Router => self.gate.weight.dims(),
        }
    }

    /// The float type `p`'s adapters take (f32 over a quantised base).
    pub(crate) fn adapter_dtype(&self, p: ExpertParam) -> DType {
        match (p, self.experts.first()) {
            (ExpertParam::Router, _) | (_, None) => self.gate.adapter_dtype(),
            (_, Some(m)) => m.down_proj.adapter_dtype(),
        }
    }

    /// `p`'s adapters, in expert order; empty when it has none.
    pub(crate) fn adapters(&self, p: ExpertParam) -> Vec<&Adapter> {
        match p {
            ExpertParam::GateUp => self.experts.iter().filter_map(|m| m.gate_up_lora.as_ref()).collect(),
            ExpertParam::Down => self.experts.iter().filter_map(|m| m.down_proj.lora.as_ref()).collect(),
            ExpertParam::Router => self.gate.lora.iter().collect(),
        }
    }

    /// Attaches `adapters` to `p` (as many as [`Self::adapters_of`] says).
    pub(crate) fn set_adapters(&mut self, p: ExpertParam, adapters: Vec<Adapter>) {
        match p {
            ExpertParam::GateUp => self.experts.iter_mut().zip(adapters).for_each(|(m, a)| m.gate_up_lora = Some(a)),
            ExpertParam::Down => self.experts.iter_mut().zip(adapters).for_each(|(m, a)| m.down_proj.lora = Some(a)),
            ExpertParam::Router => self.gate.lora = adapters.into_iter().next(),
        }
    }

    /// Removes every adapter of the experts and the router (the shared expert's, linear layers
    /// of their own, stay).
    pub(crate) fn remove_adapters(&mut self) {
        self.gate.lora = None;
        for m in &mut self.experts {
            m.gate_up_lora = None;
            m.down_proj.lora = None;
        }
    }

    /// Folds the experts' and the router's adapters into their weights.
    pub(crate) fn merge_adapters(&mut self) {
        self.gate.merge_lora();
        for m in &mut self.experts {
            m.down_proj.merge_lora();
            m.merge_gate_up_lora();
        }
    }
}

/// Whether a linear layer's HF name is a mixture of experts' router (`mlp.gate`, Mixtral's
/// `block_sparse_moe.gate`) or Qwen2-MoE's shared-expert gate: small layers that pick the experts
/// and weigh them, kept in f32 under a quantised base (as llama.cpp's converter keeps routers) and
/// given no adapter by `all-linear`.
pub(crate) fn is_gate(name: &str) -> bool {
    name.ends_with(".mlp.gate") || name.ends_with(".block_sparse_moe.gate") || name.ends_with(".shared_expert_gate")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::MoeLayout;
    use crate::ModelConfig;

    fn layout(extra: serde_json::Value) -> MoeLayout {
        let mut v = json!({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 4, "num_attention_heads": 2});
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        match ModelConfig::from_hf_json(&v, "c".as_ref()).unwrap() {
            ModelConfig::Llama(c) => MoeLayout::of(&c, "c".as_ref()).unwrap().unwrap(),
            other => panic!("{other:?}"),
        }
    }

    /// transformers' defaults and its rule for the sparse layers (`(i + 1) % decoder_sparse_step
    /// == 0` and not in `mlp_only_layers`), and the key each family reads the experts' count under.
    #[test]
    fn layouts_follow_transformers_configs() {
        let mixtral = layout(json!({"architectures": ["MixtralForCausalLM"]}));
        assert_eq!(mixtral, MoeLayout { experts: 8, top_k: 2, width: 12, shared: None, normalize: true, sparse: vec![true; 4] });
        // Mixtral and Qwen3-MoE read `num_experts` as `num_local_experts`; Qwen2-MoE reads it alone.
        assert_eq!(layout(json!({"architectures": ["MixtralForCausalLM"], "num_experts": 6})).experts, 6);
        assert_eq!(layout(json!({"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 16, "moe_intermediate_size": 4})).experts, 16);
        assert_eq!(layout(json!({"architectures": ["Qwen2MoeForCausalLM"], "num_local_experts": 6})).experts, 60);
        let qwen2 = layout(json!({"architectures": ["Qwen2MoeForCausalLM"], "decoder_sparse_step": 2, "mlp_only_layers": [3]}));
        assert_eq!(qwen2, MoeLayout { experts: 60, top_k: 4, width: 1408, shared: Some(5632), normalize: false, sparse: vec![false, true, false, false] });
        let qwen3 = layout(json!({"architectures": ["Qwen3MoeForCausalLM"], "norm_topk_prob": true, "mlp_only_layers": [0]}));
        assert_eq!(qwen3, MoeLayout { experts: 128, top_k: 8, width: 768, shared: None, normalize: true, sparse: vec![false, true, true, true] });
        // No experts: every layer dense (Qwen), an error for Mixtral.
        assert_eq!(layout(json!({"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 0})).sparse, vec![false; 4]);
        let v = json!({"architectures": ["MixtralForCausalLM"], "num_local_experts": 0, "vocab_size": 8, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 4, "num_attention_heads": 2});
        let ModelConfig::Llama(c) = ModelConfig::from_hf_json(&v, "c".as_ref()).unwrap() else { panic!() };
        assert!(MoeLayout::of(&c, "c".as_ref()).unwrap_err().to_string().contains("num_experts_per_tok is 2; expected 1 to num_local_experts (0)"));
        // A token's MLP width: its experts' (and the shared one's) in a sparse layer.
        assert_eq!(qwen2.active_width(1, 12), 4 * 1408 + 5632);
        assert_eq!(qwen2.active_width(0, 12), 12);
    }
}
