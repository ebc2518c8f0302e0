//! Each family's parameters under their HF names, written once.
//!
//! A family builds its module tree from the config alone, with burn's lazy parameters (a shape and
//! no data, so nothing is allocated), and lists every parameter once with its HF name and kind in
//! its `named_mut` method. That one table drives
//! - loading ([`fill`]): each parameter is read by name from a [`Weights`] source, with the shape
//!   the tree declares;
//! - saving ([`to_hf`]): each parameter is written under its name, in HF's layout;
//! - LoRA ([`projections`]): the linear layers of the table are what `lora.targets` matches, and a
//!   [`Slot::Conv1d`] tells PEFT's `fan_in_fan_out`.
//!
//! This is candle's `VarBuilder::pp` idea turned both ways: the names are in one place, and loading,
//! saving and adapters cannot drift apart.

use burn::module::{Param, ParamId};
use burn::nn::{LayerNorm, LayerNormConfig, RmsNorm, RmsNormConfig};
use burn::tensor::{Device, Tensor};

use crate::error::Result;
use crate::linear::{Linear, Projection};
use crate::weights::{HfTensors, Weights};

/// One parameter (or layer) of a model, as HF stores it.
pub(crate) enum Slot<'a> {
    /// A tensor stored as it is (an embedding or position table, `[rows, cols]`).
    Matrix(&'a mut Param<Tensor<2>>),
    /// A vector stored as it is (a bias of its own, such as GPT-J's `lm_head.bias`).
    Vector(&'a mut Param<Tensor<1>>),
    /// A bare matrix burn keeps `[in, out]` and HF `[out, in]` (an untied LM head).
    Transposed(&'a mut Param<Tensor<2>>),
    /// `nn.Linear`: `{name}.weight` `[out, in]` and, when the layer has one, `{name}.bias`.
    Linear(&'a mut Linear),
    /// transformers' `Conv1D` (GPT-2): `{name}.weight` stored `[in, out]`, and `{name}.bias`.
    Conv1d(&'a mut Linear),
    /// `{name}.weight` and `{name}.bias`.
    LayerNorm(&'a mut LayerNorm),
    /// `{name}.weight`.
    RmsNorm(&'a mut RmsNorm),
}

/// A family's table: every parameter under its HF name, in the family's load order (a random
/// model draws its weights in this order).
pub(crate) type Table<'a> = Vec<(String, Slot<'a>)>;

/// A parameter with a shape and no data yet: what [`fill`] replaces.
pub(crate) fn lazy<const D: usize>(shape: [usize; D], device: &Device) -> Param<Tensor<D>> {
    Param::uninitialized(ParamId::new(), move |d, _| Tensor::zeros(shape, d), device.clone(), true, shape.into())
}

/// A linear layer `[d_in, d_out]` (with a bias when asked) waiting for its weights.
pub(crate) fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    Linear { weight: lazy([d_in, d_out], device), bias: bias.then(|| lazy([d_out], device)), lora: None, offset: None }
}

/// A LayerNorm of width `d` waiting for its weights.
pub(crate) fn layer_norm(d: usize, eps: f64, device: &Device) -> LayerNorm {
    LayerNormConfig::new(d).with_epsilon(eps).init(device)
}

/// An RMSNorm of width `d` waiting for its weights.
pub(crate) fn rms_norm(d: usize, eps: f64, device: &Device) -> RmsNorm {
    RmsNormConfig::new(d).with_epsilon(eps).init(device)
}

fn dims<const D: usize>(p: &Param<Tensor<D>>) -> [usize; D] {
    let shape = p.lazy_shape();
    std::array::from_fn(|i| shape[i])
}

/// Reads every parameter of the table from `w` by name, shape-checked against the tree.
pub(crate) fn fill(table: Table<'_>, w: &mut Weights, device: &Device) -> Result<()> {
    if w.draws_random() {
        check_host_memory(&table, w, crate::backend::in_host_memory(device), crate::out_of_memory::host_free_bytes())?;
    }
    for (name, slot) in table {
        let conv1d = matches!(slot, Slot::Conv1d(_));
        match slot {
            Slot::Matrix(p) => *p = Param::from_tensor(w.tensor(&name, dims(p), device)?),
            Slot::Vector(p) => *p = Param::from_tensor(w.tensor(&name, dims(p), device)?),
            Slot::Transposed(p) => {
                let [d_in, d_out] = dims(p);
                *p = Param::from_tensor(w.linear_weight(&name, d_out, d_in, device)?);
            }
            // A mixture of experts' routers stay f32: quantised, they would pick other experts.
            Slot::Linear(l) | Slot::Conv1d(l) if w.quantizes_projections() && !crate::moe::is_gate(&name) => {
                let [d_in, d_out] = dims(&l.weight);
                let blocks = w.quantized(&format!("{name}.weight"), [d_out, d_in], conv1d)?;
                let (weight, offset) = blocks.to_device(device);
                (l.weight, l.offset) = (Param::from_tensor(weight), offset.map(Param::from_tensor));
                fill_bias(l, &name, w, device)?;
            }
            Slot::Linear(l) => {
                let [d_in, d_out] = dims(&l.weight);
                l.weight = Param::from_tensor(w.linear_weight(&format!("{name}.weight"), d_out, d_in, device)?);
                fill_bias(l, &name, w, device)?;
            }
            Slot::Conv1d(l) => {
                l.weight = Param::from_tensor(w.tensor(&format!("{name}.weight"), dims(&l.weight), device)?);
                fill_bias(l, &name, w, device)?;
            }
            Slot::LayerNorm(ln) => {
                ln.gamma = Param::from_tensor(w.tensor(&format!("{name}.weight"), dims(&ln.gamma), device)?);
                if let Some(beta) = &mut ln.beta {
                    *beta = Param::from_tensor(w.tensor(&format!("{name}.bias"), dims(beta), device)?);
                }
            }
            Slot::RmsNorm(n) => n.gamma = Param::from_tensor(w.tensor(&format!("{name}.weight"), dims(&n.gamma), device)?),
        }
    }
    Ok(())
}

/// Refuses a fresh model whose weights need more host memory than `free`: all of them where the
/// device keeps its tensors there (`on_host`: flex, libtorch's CPU), else the largest, which is
/// drawn on the host on its way to the device. Without it a size no machine holds (a width of
/// 100,000) ended the process on flex with the allocator's abort. Lower bounds: a quantised
/// projection counts half a byte a weight (Q4's blocks; Q8_0's take more), a norm nothing.
fn check_host_memory(table: &Table<'_>, w: &Weights, on_host: bool, free: Option<u64>) -> Result<()> {
    let Some(free) = free else { return Ok(()) };
    let quantized = w.quantizes_projections();
    let (mut params, mut total) = (0u64, 0u64);
    let mut largest: Option<(u64, String, Vec<usize>)> = None;
    for (name, slot) in table {
        let (tensor, shape, bytes_per_weight) = match slot {
            Slot::Matrix(p) | Slot::Transposed(p) => (name.clone(), dims(p).to_vec(), 4.0),
            Slot::Vector(p) => (name.clone(), dims(p).to_vec(), 4.0),
            Slot::Linear(l) | Slot::Conv1d(l) => (format!("{name}.weight"), dims(&l.weight).to_vec(), if quantized && !crate::moe::is_gate(name) { 0.5 } else { 4.0 }),
            Slot::LayerNorm(_) | Slot::RmsNorm(_) => continue,
        };
        let n = shape.iter().fold(1u64, |n, &d| n.saturating_mul(d as u64));
        let bytes = (n as f64 * bytes_per_weight) as u64;
        params = params.saturating_add(n);
        total = total.saturating_add(bytes);
        if largest.as_ref().is_none_or(|l| bytes > l.0) {
            largest = Some((bytes, tensor, shape));
        }
    }
    let human = crate::out_of_memory::human_bytes;
    let form = if quantized { "with the projections quantised" } else { "as f32" };
    let message = match crate::out_of_memory::weights_beyond_free(params, total, form, "where the device keeps them", Some(free)) {
        Some(message) if on_host => message,
        _ => match largest.filter(|l| l.0 > free) {
            Some((bytes, tensor, shape)) => format!(
                "the model's largest tensor, `{tensor}` {shape:?}, needs {} of host memory, where it is drawn on its way to the device, and this machine has {} free (memory and swap)",
                human(bytes),
                human(free)
            ),
            None => return Ok(()),
        },
    };
    Err(crate::ModelError::TooLarge { path: w.path().to_path_buf(), message })
}

fn fill_bias(l: &mut Linear, name: &str, w: &mut Weights, device: &Device) -> Result<()> {
    if let Some(b) = &mut l.bias {
        *b = Param::from_tensor(w.tensor(&format!("{name}.bias"), dims(b), device)?);
    }
    Ok(())
}

/// Every parameter of the table under its HF name, in HF's layout (adapters are not included).
pub(crate) fn to_hf(table: Table<'_>) -> HfTensors {
    let mut out = HfTensors::default();
    for (name, slot) in table {
        match slot {
            Slot::Matrix(p) => out.push(name, p.val()),
            Slot::Vector(p) => out.push(name, p.val()),
            Slot::Transposed(p) => out.push_linear(name, p.val()),
            Slot::Linear(l) => {
                out.push_linear(format!("{name}.weight"), l.float_weight());
                push_bias(&mut out, &name, l);
            }
            Slot::Conv1d(l) => {
                out.push(format!("{name}.weight"), l.float_weight());
                push_bias(&mut out, &name, l);
            }
            Slot::LayerNorm(ln) => out.push_layer_norm(name, ln),
            Slot::RmsNorm(n) => out.push(format!("{name}.weight"), n.gamma.val()),
        }
    }
    out
}

fn push_bias(out: &mut HfTensors, name: &str, l: &Linear) {
    if let Some(b) = &l.bias {
        out.push(format!("{name}.bias"), b.val());
    }
}

/// The table's projections (linear and Conv1D layers: what LoRA adapts), with whether each is a
/// Conv1D (stored `[in, out]`, PEFT's `fan_in_fan_out`).
pub(crate) fn projections(table: Table<'_>) -> Vec<(Projection<'_>, bool)> {
    table
        .into_iter()
        .filter_map(|(name, slot)| match slot {
            Slot::Linear(l) => Some(((name, l), false)),
            Slot::Conv1d(l) => Some(((name, l), true)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use burn::module::Module;
    use serde_json::json;

    use crate::{CausalLm, ModelConfig, backend};

    use super::*;

    /// One tiny config per family, with the options that change the table (untied heads, biases).
    fn tiny_configs() -> Vec<serde_json::Value> {
        vec![
            json!({"architectures": ["GPT2LMHeadModel"], "vocab_size": 11, "n_positions": 8, "n_embd": 8, "n_layer": 2, "n_head": 2}),
            json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 11, "hidden_size": 8, "intermediate_size": 12,
                   "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": false}),
            json!({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 11, "hidden_size": 8,
                   "intermediate_size": 12, "num_hidden_layers": 1, "num_attention_heads": 2, "tie_word_embeddings": true}),
            json!({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 11, "hidden_size": 8,
                   "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                   "head_dim": 6, "tie_word_embeddings": true}),
            json!({"architectures": ["GPTNeoForCausalLM"], "vocab_size": 11, "max_position_embeddings": 8, "hidden_size": 8,
                   "num_layers": 2, "num_heads": 2, "attention_types": [[["global", "local"], 1]], "window_size": 4}),
            json!({"architectures": ["GPTJForCausalLM"], "vocab_size": 11, "n_positions": 8, "n_embd": 8, "n_layer": 2,
                   "n_head": 2, "rotary_dim": 2}),
            json!({"architectures": ["GPTNeoXForCausalLM"], "vocab_size": 11, "hidden_size": 8, "intermediate_size": 12,
                   "num_hidden_layers": 2, "num_attention_heads": 2, "rotary_pct": 0.5}),
            json!({"architectures": ["GemmaForCausalLM"], "vocab_size": 11, "hidden_size": 8, "intermediate_size": 12,
                   "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
                   "tie_word_embeddings": false, "attention_bias": true}),
            json!({"architectures": ["Gemma2ForCausalLM"], "vocab_size": 11, "hidden_size": 8, "intermediate_size": 12,
                   "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 4}),
            json!({"architectures": ["Gemma3ForCausalLM"], "vocab_size": 11, "hidden_size": 8, "intermediate_size": 12,
                   "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 6}),
        ]
    }

    #[test]
    fn a_fresh_model_too_large_for_the_hosts_free_memory_is_refused() {
        let device = backend::device("flex").unwrap();
        let json = json!({"architectures": ["GPT2LMHeadModel"], "vocab_size": 16, "n_positions": 8, "n_embd": 8, "n_layer": 1, "n_head": 2});
        let mut model = CausalLm::random(&ModelConfig::from_hf_json(&json, "tiny".as_ref()).unwrap(), 0, &device).unwrap();
        let table = model.named_mut();
        // Counted by hand, biases and norms left out: wte 16·8, wpe 8·8, c_attn 8·24, attn.c_proj
        // 8·8, c_fc 8·32, mlp.c_proj 32·8 = 960 weights, 3,840 bytes as f32; the largest, c_fc,
        // 1,024 bytes (mlp.c_proj, as large, comes after it).
        let w = Weights::random(0, 0.02);
        let check = |on_host, free| check_host_memory(&table, &w, on_host, Some(free)).map_err(|e| e.to_string());
        assert_eq!(check(true, 3840), Ok(()));
        assert_eq!(
            check(true, 3839),
            Err("<random init>: the model's 960 parameters need at least 3.8 KiB of host memory as f32, where the device keeps them, and this machine has 3.7 KiB free (memory and swap)".into())
        );
        // On a GPU each tensor passes through the host alone.
        assert_eq!(check(false, 1024), Ok(()));
        assert_eq!(
            check(false, 1023),
            Err("<random init>: the model's largest tensor, `transformer.h.0.mlp.c_fc.weight` [8, 32], needs 1.0 KiB of host memory, where it is drawn on its way to the device, and this machine has 1023 bytes free (memory and swap)".into())
        );
        // Quantised projections count half a byte a weight: 128 + 64 embedding weights as f32, 768
        // projection weights at half a byte, 1,152 bytes.
        let q = Weights::random(0, 0.02).quantizing_projections();
        assert_eq!(check_host_memory(&table, &q, true, Some(1152)).map_err(|e| e.to_string()), Ok(()));
        assert!(check_host_memory(&table, &q, true, Some(1151)).is_err());
        // Where the system does not say, nothing is refused.
        assert!(check_host_memory(&table, &w, true, None).is_ok());
    }

    #[test]
    fn each_table_names_every_parameter_once_and_round_trips() {
        let device = backend::device("flex").unwrap();
        for json in tiny_configs() {
            let cfg = ModelConfig::from_hf_json(&json, "tiny".as_ref()).unwrap();
            let mut model = CausalLm::random(&cfg, 3, &device).unwrap();
            let table = model.named_mut();
            let names: Vec<String> = table.iter().map(|(n, _)| n.clone()).collect();
            let mut unique = names.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), names.len(), "{json}: a name is listed twice");
            // Every parameter is in the table: nothing stays a lazy placeholder.
            let saved = to_hf(table);
            let listed: usize = saved.entries().iter().map(|(_, _, data)| data.len()).sum();
            assert_eq!(listed, model.num_params(), "{json}: the table misses parameters");
            // Saving then loading by the same table gives the same tensors.
            let tensors = saved.entries().iter().map(|(n, s, d)| (n.clone(), crate::weights::HostTensor { shape: s.clone(), data: d.clone() })).collect();
            let mut w = Weights::new("saved", tensors);
            let mut again = CausalLm::from_weights(&cfg, &mut w, &device).unwrap();
            assert_eq!(w.remaining().count(), 0, "{json}: a saved tensor was not read back");
            assert_eq!(to_hf(again.named_mut()).entries(), saved.entries(), "{json}");
        }
    }
}
