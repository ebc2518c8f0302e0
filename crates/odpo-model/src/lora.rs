//! Low-rank adapters (LoRA; Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
//! arXiv:2106.09685) on the models' linear layers, in the layout PEFT reads and writes.
//!
//! An adapted projection computes `y = x·W + b + (α/r) · dropout(x)·A·B` with the base `W`, `b`
//! frozen, `A` `[in, r]` drawn as PEFT draws it (uniform ±1/√in) and `B` `[r, out]` zero, so a fresh
//! adapter changes nothing. The low-rank path is a separate pair of thin matmuls rather than burn's
//! weight-space LoRA (`Module::apply_lora`, which forms `W + s·A·B` and so back-propagates through a
//! full weight-shaped gradient and cannot drop out the adapter's input): here the backward pass
//! never forms a gradient for `W`, and LoRA dropout acts where PEFT applies it.
//!
//! The reference of preference training is the same model with the adapters removed
//! ([`CausalLm::without_adapters`]): a module that shares every base tensor with the policy (burn
//! tensors are reference-counted and the frozen bases are never rewritten), so there is no second
//! copy of the weights.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::DropoutConfig;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::linear::{Adapter, Projection};
use crate::model::CausalLm;
use crate::moe::ExpertParam;
use crate::weights::{HfTensors, write_atomic};

/// `[lora]`: which projections get adapters and how large.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// Rank `r` of each adapter (PEFT's `r`).
    pub rank: usize,
    /// Scaling numerator α: the update is scaled by `α / r` (PEFT's `lora_alpha`).
    pub alpha: f64,
    /// Dropout probability on the adapter's input while training, in [0, 1) (PEFT's `lora_dropout`).
    pub dropout: f64,
    /// Module names to adapt, matched against the last part of each projection's HF name
    /// (`q_proj`, `v_proj`, `c_attn`, ...); `all-linear` adapts every projection (not the LM head).
    pub targets: Vec<String>,
    /// A mixture of experts' parameters to adapt, as PEFT's `target_parameters` names them on
    /// transformers 5's models and matches them (the whole name, or its end after a dot):
    /// `mlp.experts.gate_up_proj` (each expert's gate and up projections, one `A` for both),
    /// `mlp.experts.down_proj` and `mlp.gate.weight` (the router). One adapter an expert; no
    /// dropout, as PEFT's LoRA of parameters has none.
    pub target_parameters: Vec<String>,
    /// Scale by `α / √r` instead of `α / r` (rank-stabilised LoRA, PEFT's `use_rslora`).
    pub rslora: bool,
    /// Seed of the `A` initialisation.
    pub seed: u64,
    /// Keep the frozen projections block-quantised instead of f32 (QLoRA's memory saving): a GGUF
    /// file's Q8_0, Q4_0 and Q4_1 projections as stored, any other base quantised to Q8_0 at load
    /// (see [`crate::quantized`]). The flex backend only.
    pub quantized_base: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { rank: 8, alpha: 16.0, dropout: 0.0, targets: vec!["all-linear".into()], target_parameters: Vec::new(), rslora: false, seed: 0, quantized_base: false }
    }
}

impl LoraConfig {
    /// The factor the low-rank product is scaled by.
    pub fn scale(&self) -> f64 {
        if self.rslora { self.alpha / (self.rank as f64).sqrt() } else { self.alpha / self.rank as f64 }
    }

    /// Checks ranges; errors name the key (`lora.rank`, ...).
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| Err(ModelError::Invalid(format!("lora.{key}: {msg}")));
        if self.rank == 0 {
            return bad("rank", "is 0; expected a positive integer".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad("alpha", format!("is {}; expected a finite number > 0", self.alpha));
        }
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            return bad("dropout", format!("is {}; expected a number in [0, 1)", self.dropout));
        }
        if self.targets.is_empty() && self.target_parameters.is_empty() {
            return bad("targets", "is empty; name projections (e.g. [\"q_proj\", \"v_proj\"]) or use [\"all-linear\"]".into());
        }
        if !self.target_parameters.is_empty() && self.dropout != 0.0 {
            return bad("dropout", format!("is {}; adapters on parameters (lora.target_parameters) take no dropout, as in PEFT", self.dropout));
        }
        Ok(())
    }

    fn matches(&self, hf_name: &str) -> bool {
        let last = hf_name.rsplit('.').next().unwrap_or(hf_name);
        // Qwen2-MoE's shared-expert gate has one output, below any rank: named, not by `all-linear`.
        let all = !crate::moe::is_gate(hf_name);
        self.targets.iter().any(|t| (t == "all-linear" && all) || t == last || t == hf_name)
    }
}

/// PEFT's rule for `target_parameters`: the whole name, or its end after a dot.
fn parameter_matches(name: &str, target: &str) -> bool {
    name == target || name.strip_suffix(target).is_some_and(|head| head.ends_with('.'))
}

/// Which entries of `target_parameters` reached a parameter: each must reach one.
struct Reached<'a> {
    targets: &'a [String],
    hit: Vec<bool>,
}

impl<'a> Reached<'a> {
    fn new(targets: &'a [String]) -> Self {
        Self { targets, hit: vec![false; targets.len()] }
    }

    /// Whether some entry reaches the parameter of full name `name`, marking those that do.
    fn mark(&mut self, name: &str) -> bool {
        let mut any = false;
        for (hit, t) in self.hit.iter_mut().zip(self.targets) {
            if parameter_matches(name, t) {
                (*hit, any) = (true, true);
            }
        }
        any
    }

    fn first_missed(&self) -> Option<&'a str> {
        self.targets.iter().zip(&self.hit).find(|(_, hit)| !**hit).map(|(t, _)| t.as_str())
    }
}

/// The full names of the parameters of a sparse layer `prefix` PEFT's LoRA of parameters reaches.
fn expert_parameter(prefix: &str, p: ExpertParam) -> String {
    format!("{prefix}.{}", p.name())
}

/// PEFT's key stem of an adapter on `p` of the sparse layer `prefix` when the stacks `wrapped` (in
/// the order transformers declares them: the gate and up stack, then the down stack) have adapters:
/// PEFT wraps the experts' module once a parameter, the first declared innermost
/// (`experts.base_layer.lora_A.weight` is then the gate and up stack's).
fn expert_key(prefix: &str, p: ExpertParam, wrapped: &[ExpertParam]) -> String {
    match p {
        ExpertParam::Router => format!("base_model.model.{prefix}.gate"),
        _ => {
            let depth = wrapped.iter().position(|&w| w == p).map_or(0, |i| wrapped.len() - 1 - i);
            format!("base_model.model.{prefix}.experts{}", ".base_layer".repeat(depth))
        }
    }
}

/// Whether a projection takes an adapter: all but a mixture of experts' routers and routed
/// experts, which transformers 5 keeps as parameters (a stack of the experts' matrices a layer, not
/// linear layers), and PEFT adapts with its LoRA of parameters (`target_parameters`, attached by
/// the expert-aware code below, not by `targets`).
fn adaptable(hf_name: &str) -> bool {
    !(hf_name.contains(".experts.") || (crate::moe::is_gate(hf_name) && !hf_name.ends_with(".shared_expert_gate")))
}

impl CausalLm {
    /// Every projection of the model (attention and MLP; not embeddings or the LM head) under its HF
    /// module name, in the model's order.
    fn projections_mut(&mut self) -> Vec<Projection<'_>> {
        crate::names::projections(self.named_mut()).into_iter().map(|(p, _)| p).filter(|(name, _)| adaptable(name)).collect()
    }

    /// The HF module names of the model's projections (what `lora.targets` matches).
    pub fn projection_names(&self) -> Vec<String> {
        self.clone().projections_mut().into_iter().map(|(n, _)| n).collect()
    }

    /// Freezes every weight and attaches a fresh adapter (`B = 0`, so the outputs are unchanged) to each
    /// projection `cfg.targets` names. Only the adapters then receive gradients and optimizer state.
    pub fn with_lora(self, cfg: &LoraConfig, device: &Device) -> Result<Self> {
        use rand::SeedableRng;
        cfg.validate()?;
        if self.has_adapters() {
            return Err(ModelError::Invalid("the model already has LoRA adapters".into()));
        }
        let mut model = self.set_require_grad(false);
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
        let mut adapted = 0;
        for (name, lin) in model.projections_mut() {
            if !cfg.matches(&name) {
                continue;
            }
            let [d_in, d_out] = lin.weight.dims();
            if cfg.rank > d_in.min(d_out) {
                return Err(ModelError::Invalid(format!(
                    "lora.rank: is {}; `{name}` is {d_in} x {d_out}, and an adapter's rank is at most the smaller of the two",
                    cfg.rank
                )));
            }
            lin.lora = Some(fresh_adapter(d_in, d_out, lin.adapter_dtype(), cfg, &mut rng, device)?);
            adapted += 1;
        }
        // PEFT's LoRA of parameters: an adapter on each expert of a stack, or on the router.
        let mut reached = Reached::new(&cfg.target_parameters);
        for (prefix, moe) in model.sparse_layers_mut() {
            for p in ExpertParam::ALL {
                let name = expert_parameter(&prefix, p);
                if !reached.mark(&name) {
                    continue;
                }
                let [d_in, d_out] = moe.dims_of(p);
                if cfg.rank > d_in.min(d_out) {
                    return Err(ModelError::Invalid(format!(
                        "lora.rank: is {}; `{name}` is {d_in} x {d_out} an expert, and an adapter's rank is at most the smaller of the two",
                        cfg.rank
                    )));
                }
                let adapters = (0..moe.adapters_of(p)).map(|_| fresh_adapter(d_in, d_out, moe.adapter_dtype(p), cfg, &mut rng, device)).collect::<Result<Vec<_>>>()?;
                moe.set_adapters(p, adapters);
                adapted += 1;
            }
        }
        if let Some(missed) = reached.first_missed() {
            let names: Vec<String> = ExpertParam::ALL.iter().map(|p| format!("mlp.{}", p.name())).collect();
            let has = if !model.sparse_layers_mut().is_empty() { format!("its sparse layers hold {names:?}") } else { "the model has no mixture of experts".into() };
            return Err(ModelError::Invalid(format!("lora.target_parameters: `{missed}` matches no parameter of this model; {has}")));
        }
        if adapted == 0 && cfg.target_parameters.is_empty() {
            let mut kinds: Vec<String> = model.projection_names().iter().map(|n| n.rsplit('.').next().unwrap_or(n).to_string()).collect();
            kinds.sort();
            kinds.dedup();
            return Err(ModelError::Invalid(format!(
                "lora.targets: {:?} matches no projection of this model; its projections are {kinds:?} (or use \"all-linear\")",
                cfg.targets
            )));
        }
        Ok(model)
    }

    /// Whether any projection carries an adapter.
    pub fn has_adapters(&self) -> bool {
        let mut model = self.clone();
        model.projections_mut().iter().any(|(_, l)| l.lora.is_some())
            || model.sparse_layers_mut().iter().any(|(_, m)| ExpertParam::ALL.iter().any(|&p| !m.adapters(p).is_empty()))
    }

    /// The same model with every adapter removed: the base weights, shared with `self` (no copy).
    pub fn without_adapters(&self) -> Self {
        let mut model = self.clone();
        for (_, lin) in model.projections_mut() {
            lin.lora = None;
        }
        for (_, moe) in model.sparse_layers_mut() {
            moe.remove_adapters();
        }
        model
    }

    /// Folds every adapter into its weight (`W + s·A·B`) and removes it: a plain model that gives the
    /// adapted model's outputs.
    pub fn merge_adapters(mut self) -> Self {
        for (_, lin) in self.projections_mut() {
            lin.merge_lora();
        }
        for (_, moe) in self.sparse_layers_mut() {
            moe.merge_adapters();
        }
        self
    }

    /// Saves the adapters in PEFT's layout: `adapter_model.safetensors` (`base_model.model.{name}.lora_A.weight`
    /// `[r, in]` and `lora_B.weight` `[out, r]`, float32) and `adapter_config.json`, each written
    /// atomically, so that `PeftModel.from_pretrained(base, dir)` loads them.
    pub fn save_peft(&self, cfg: &LoraConfig, base_model: &str, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let mut out = HfTensors::default();
        let mut targets: Vec<String> = Vec::new();
        let mut fan_in_fan_out = false;
        let mut model = self.clone();
        for ((name, lin), conv1d) in crate::names::projections(model.named_mut()) {
            // The experts' and routers' adapters are PEFT's LoRA of parameters, written below.
            if let Some(ad) = lin.lora.as_ref().filter(|_| adaptable(&name)) {
                // transformers' Conv1D stores its weight [in, out].
                fan_in_fan_out |= conv1d;
                out.push(format!("base_model.model.{name}.lora_A.weight"), ad.a.val().transpose());
                out.push(format!("base_model.model.{name}.lora_B.weight"), ad.b.val().transpose());
                let last = name.rsplit('.').next().unwrap_or(&name).to_string();
                if !targets.contains(&last) {
                    targets.push(last);
                }
            }
        }
        // The experts' and routers' adapters as PEFT's LoRA of parameters holds them: each stack's
        // in two tensors (see [`ExpertParam`]), named after the stack's place in PEFT's nesting.
        let mut parameters: Vec<(ExpertParam, String)> = Vec::new();
        let layers = model.sparse_layers_mut();
        let n_layers = layers.len();
        for (prefix, moe) in &layers {
            let wrapped: Vec<ExpertParam> = [ExpertParam::GateUp, ExpertParam::Down].into_iter().filter(|&p| !moe.adapters(p).is_empty()).collect();
            for p in ExpertParam::ALL {
                let adapters = moe.adapters(p);
                if adapters.is_empty() {
                    continue;
                }
                let stem = expert_key(prefix, p, &wrapped);
                // A `[E·r, in]`: expert e's `A^T` in rows e·r..; B `[out, r·E]`: column i·E + e.
                let a = Tensor::cat(adapters.iter().map(|ad| ad.a.val().transpose()).collect(), 0);
                let b = Tensor::stack::<3>(adapters.iter().map(|ad| ad.b.val()).collect(), 0);
                let [e, r, d_out] = b.dims();
                out.push(format!("{stem}.lora_A.weight"), a);
                out.push(format!("{stem}.lora_B.weight"), b.permute([2, 1, 0]).reshape([d_out, r * e]));
                parameters.push((p, expert_parameter(prefix, p)));
            }
        }
        // Each parameter by its name in the layer where every sparse layer has it adapted, else by
        // its full names.
        let mut target_parameters: Vec<String> = Vec::new();
        for p in ExpertParam::ALL {
            let names: Vec<&String> = parameters.iter().filter(|(q, _)| *q == p).map(|(_, n)| n).collect();
            if names.is_empty() {
                continue;
            } else if names.len() == n_layers {
                target_parameters.push(format!("mlp.{}", p.name()));
            } else {
                target_parameters.extend(names.into_iter().cloned());
            }
        }
        if targets.is_empty() && target_parameters.is_empty() {
            return Err(ModelError::Invalid("the model has no LoRA adapters to save".into()));
        }
        out.write(&dir.join("adapter_model.safetensors"))?;
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": cfg.rank,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "target_modules": targets,
            "target_parameters": if target_parameters.is_empty() { serde_json::Value::Null } else { serde_json::json!(target_parameters) },
            "use_rslora": cfg.rslora,
            "fan_in_fan_out": fan_in_fan_out,
            "bias": "none",
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
        });
        let json = serde_json::to_string_pretty(&config).map_err(|e| ModelError::config(dir, e.to_string()))?;
        write_atomic(&dir.join("adapter_config.json"), json.as_bytes())
    }

    /// Attaches the adapters of a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`),
    /// freezing the rest. Errors name the file and the tensor or key.
    pub fn load_peft(self, dir: &Path, device: &Device) -> Result<(Self, LoraConfig)> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::config(&cfg_path, e.to_string()))?;
        let field = |k: &str| json.get(k).filter(|v| !v.is_null());
        if let Some(kind) = field("peft_type").and_then(|v| v.as_str())
            && kind != "LORA"
        {
            return Err(ModelError::config(&cfg_path, format!("peft_type: `{kind}` is not supported; expected LORA")));
        }
        let rank = field("r").and_then(|v| v.as_u64()).ok_or_else(|| ModelError::config(&cfg_path, "r: missing or not a positive integer"))? as usize;
        let alpha = field("lora_alpha").and_then(|v| v.as_f64()).unwrap_or(8.0);
        let rslora = field("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false);
        let dropout = field("lora_dropout").and_then(|v| v.as_f64()).unwrap_or(0.0);
        // PEFT's LoRA of parameters: a mixture of experts' stacks and routers.
        let target_parameters: Vec<String> = match field("target_parameters") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|p| p.as_str().map(String::from)).collect::<Option<Vec<_>>>())
                .ok_or_else(|| ModelError::config(&cfg_path, format!("target_parameters: is {v}; expected a list of parameter names")))?,
        };
        for unsupported in ["rank_pattern", "alpha_pattern"] {
            if field(unsupported).and_then(|v| v.as_object()).is_some_and(|m| !m.is_empty()) {
                return Err(ModelError::config(&cfg_path, format!("{unsupported}: per-module ranks are not supported")));
            }
        }
        for (key, what) in [("use_dora", "DoRA"), ("lora_bias", "biases on lora_B")] {
            if field(key).and_then(|v| v.as_bool()) == Some(true) {
                return Err(ModelError::config(&cfg_path, format!("{key}: {what} is not supported")));
            }
        }
        let cfg = LoraConfig { rank, alpha, dropout, targets: vec!["all-linear".into()], target_parameters, rslora, seed: 0, quantized_base: false };
        cfg.validate().map_err(|e| ModelError::config(&cfg_path, e.to_string()))?;

        let st_path = dir.join("adapter_model.safetensors");
        let mut tensors = BTreeMap::new();
        crate::weights::read_safetensors(&st_path, &mut tensors)?;
        let mut model = self.set_require_grad(false);
        let mut targets = Vec::new();
        for (name, lin) in model.projections_mut() {
            let key = |ab: &str| format!("base_model.model.{name}.lora_{ab}.weight");
            let (Some(a), Some(b)) = (tensors.remove(&key("A")), tensors.remove(&key("B"))) else {
                continue;
            };
            let [d_in, d_out] = lin.weight.dims();
            for (k, t, want) in [(key("A"), &a, [rank, d_in]), (key("B"), &b, [d_out, rank])] {
                if t.shape != want {
                    return Err(ModelError::Shape { path: st_path.clone(), name: k, expected: want.to_vec(), got: t.shape.clone() });
                }
            }
            let dtype = lin.adapter_dtype();
            let a = Tensor::<2>::from_data(TensorData::new(a.data, [rank, d_in]), device).transpose().cast(dtype);
            let b = Tensor::<2>::from_data(TensorData::new(b.data, [d_out, rank]), device).transpose().cast(dtype);
            lin.lora = Some(adapter(a, b, &cfg));
            targets.push(name);
        }
        let mut reached = Reached::new(&cfg.target_parameters);
        for (prefix, moe) in model.sparse_layers_mut() {
            let wrapped: Vec<ExpertParam> = [ExpertParam::GateUp, ExpertParam::Down].into_iter().filter(|&p| cfg.target_parameters.iter().any(|t| parameter_matches(&expert_parameter(&prefix, p), t))).collect();
            for p in ExpertParam::ALL {
                let name = expert_parameter(&prefix, p);
                if !reached.mark(&name) {
                    continue;
                }
                let stem = expert_key(&prefix, p, &wrapped);
                let (e, [d_in, d_out]) = (moe.adapters_of(p), moe.dims_of(p));
                let mut take = |ab: &str, want: [usize; 2]| {
                    let key = format!("{stem}.lora_{ab}.weight");
                    match tensors.remove(&key) {
                        None => Err(ModelError::Safetensors { path: st_path.clone(), message: format!("has no `{key}`, the adapter of `{name}` that adapter_config.json's target_parameters name") }),
                        Some(t) if t.shape != want => Err(ModelError::Shape { path: st_path.clone(), name: key, expected: want.to_vec(), got: t.shape }),
                        Some(t) => Ok(t.data),
                    }
                };
                let (a, b) = (take("A", [e * rank, d_in])?, take("B", [d_out, rank * e])?);
                let dtype = moe.adapter_dtype(p);
                let adapters = (0..e)
                    .map(|x| {
                        // Expert x's `A` is rows x·r.. of PEFT's; its `B`, columns i·E + x.
                        let a = Tensor::<2>::from_data(TensorData::new(a[x * rank * d_in..(x + 1) * rank * d_in].to_vec(), [rank, d_in]), device).transpose();
                        let b: Vec<f32> = (0..rank).flat_map(|i| (0..d_out).map(move |o| (i, o))).map(|(i, o)| b[o * rank * e + i * e + x]).collect();
                        let b = Tensor::<2>::from_data(TensorData::new(b, [rank, d_out]), device);
                        adapter(a.cast(dtype), b.cast(dtype), &cfg)
                    })
                    .collect();
                moe.set_adapters(p, adapters);
            }
        }
        if let Some(missed) = reached.first_missed() {
            return Err(ModelError::config(&cfg_path, format!("target_parameters: `{missed}` names no parameter of this model's mixture of experts (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`, `mlp.gate.weight` in each sparse layer)")));
        }
        if let Some(left) = tensors.keys().next() {
            let params = if cfg.target_parameters.is_empty() { String::new() } else { format!(" {:?}", cfg.target_parameters) };
            return Err(ModelError::Safetensors {
                path: st_path,
                message: format!("tensor `{left}` does not name a projection of this model, nor an adapter of the parameters adapter_config.json's target_parameters{params} name"),
            });
        }
        if targets.is_empty() && cfg.target_parameters.is_empty() {
            return Err(ModelError::Safetensors { path: st_path, message: "holds no LoRA tensors".into() });
        }
        Ok((model, LoraConfig { targets, ..cfg }))
    }
}

/// A fresh adapter on a `[d_in, d_out]` matrix: `A` drawn as PEFT draws it (uniform ±1/√in), `B`
/// zero.
fn fresh_adapter(d_in: usize, d_out: usize, dtype: burn::tensor::DType, cfg: &LoraConfig, rng: &mut rand::rngs::StdRng, device: &Device) -> Result<Adapter> {
    use rand_distr::Distribution;
    let bound = 1.0 / (d_in as f32).sqrt();
    let uniform = rand_distr::Uniform::new(-bound, bound).map_err(|e| ModelError::Invalid(e.to_string()))?;
    let a: Vec<f32> = (0..d_in * cfg.rank).map(|_| uniform.sample(rng)).collect();
    let a = Tensor::<2>::from_data(TensorData::new(a, [d_in, cfg.rank]), device).cast(dtype);
    let b = Tensor::<2>::zeros([cfg.rank, d_out], device).cast(dtype);
    Ok(adapter(a, b, cfg))
}

fn adapter(a: Tensor<2>, b: Tensor<2>, cfg: &LoraConfig) -> Adapter {
    Adapter {
        a: Param::from_tensor(a),
        b: Param::from_tensor(b),
        scale: cfg.scale(),
        dropout: DropoutConfig::new(cfg.dropout).init(),
    }
}
