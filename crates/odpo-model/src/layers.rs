//! Pieces that more than one model family uses: positions and attention masks for padded
//! batches, the KV cache, and the attention call itself.

use burn::module::Module;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Device, Int, Tensor};

/// Keys and values of every layer for the tokens seen so far; runtime state of generation,
/// kept apart from the weights.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
}

impl KvCache {
    /// An empty cache for a model with `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        Self { layers: (0..n_layers).map(|_| None).collect() }
    }

    /// Number of cached positions (0 when empty).
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |(k, _)| k.dims()[2])
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends this step's keys and values `[B, H, T, Dh]` to layer `i` and returns all of them.
    pub(crate) fn append(&mut self, i: usize, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let (k, v) = match self.layers[i].take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        self.layers[i] = Some((k.clone(), v.clone()));
        (k, v)
    }

    /// Keeps only the batch rows in `rows` (used when some sequences of a batch have finished).
    pub fn select_rows(&mut self, rows: Tensor<1, Int>) {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.clone().select(0, rows.clone());
            *v = v.clone().select(0, rows.clone());
        }
    }
}

/// Position of each of the last `t_q` tokens: the number of real tokens before it, so left- and
/// right-padded batches give every real token the position it has unpadded.
///
/// `attention_mask` is `[B, T_past + t_q]` with 1 for real tokens and 0 for padding.
pub(crate) fn positions(attention_mask: &Tensor<2, Int>, t_q: usize) -> Tensor<2, Int> {
    let [_, t_k] = attention_mask.dims();
    let pos = attention_mask.clone().cumsum(1) - 1;
    pos.clamp_min(0).narrow(1, t_k - t_q, t_q)
}

/// The boolean mask for [`grouped_attention`], `[B, 1, t_q, T_k]` (every head alike), true where a
/// query must not look: future keys, and padding keys. A query always sees its own key so that
/// rows of padding tokens are never fully masked (a fully masked row gives NaN gradients).
///
/// The same for every layer: the models build it once per forward pass, not once per layer (a
/// dozen small operations each time, which on a GPU cost the host more than they cost the device).
pub(crate) fn attention_mask(attention_mask: &Tensor<2, Int>, t_q: usize, device: &Device) -> Tensor<4, Bool> {
    let [b, t_k] = attention_mask.dims();
    let t_past = (t_k - t_q) as i64;
    let future = Tensor::<2, Bool>::tril_mask([t_q, t_k], t_past, device);
    let not_self = Tensor::<2, Bool>::diag_mask([t_q, t_k], t_past, device);
    let pad = attention_mask.clone().equal_elem(0).reshape([b, 1, 1, t_k]).expand([b, 1, t_q, t_k]);
    let pad = pad.bool_and(not_self.reshape([1, 1, t_q, t_k]).expand([b, 1, t_q, t_k]));
    pad.bool_or(future.reshape([1, 1, t_q, t_k]).expand([b, 1, t_q, t_k]))
}

/// [`attention_mask`] `[B, 1, t_q, T_k]` with a sliding window on top (GPT-Neo's local layers,
/// Mistral's and Qwen's sliding-window layers): the query at index i (of the `T_k` keys, the queries
/// being the last `t_q`) also may not look at keys j with i − j ≥ `window` (at least 1). The indices
/// are those of the padded rows, as transformers counts them: padding at the left or the right, or
/// prompts left-padded before their completions, leaves the distance between real tokens as it is.
pub(crate) fn sliding_window_mask(mask: &Tensor<4, Bool>, window: usize) -> Tensor<4, Bool> {
    let [b, _, t_q, t_k] = mask.dims();
    // Masked when (t_past + i) - j >= window, i.e. j - i < t_past - window + 1.
    let offset = (t_k - t_q) as i64 - window as i64 + 1;
    let outside = Tensor::<2, Bool>::triu_mask([t_q, t_k], offset, &mask.device());
    mask.clone().bool_or(outside.reshape([1, 1, t_q, t_k]).expand([b, 1, t_q, t_k]))
}

/// Scaled dot-product attention with grouped keys and values: `q` is `[B, H, Tq, Dh]`, `k` and
/// `v` are `[B, Hkv, Tk, Dh]` with `H` a multiple of `Hkv`; `mask` is [`attention_mask`]'s
/// `[B, 1, Tq, Tk]`, read by every head through a stride of 0.
pub(crate) fn grouped_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: &Tensor<4, Bool>, scale: f64) -> Tensor<4> {
    // Attention whose backward pass recomputes the weights rather than keeping every layer's
    // `[B, H, Tq, Tk]` scores and weights until then (`odpo_kernels::masked_attention`: flex,
    // libtorch and the cubecl backends; burn's own attention is the path of any other). It takes
    // the grouped keys and values and the one-head mask as they are, and repeats them inside one
    // recorded operation.
    if let Some(out) = odpo_kernels::masked_attention(q.clone(), k.clone(), v.clone(), mask.clone(), scale as f32) {
        return out;
    }
    burn_attention(q, k, v, mask, scale)
}

/// [`grouped_attention`] with the scores capped as `cap·tanh(s / cap)` before the mask (Gemma 2's
/// `attn_logit_softcapping`), formed operation by operation as transformers' eager attention does,
/// keeping the scores for the backward pass: the fused kernels of `odpo_kernels::masked_attention`
/// do not cap. Its two products are `odpo_kernels::matmul`'s, in f32 where burn's attention
/// would round f32 to TF32 (CUDA).
pub(crate) fn capped_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: &Tensor<4, Bool>, scale: f64, cap: f64) -> Tensor<4> {
    let (k, v, mask) = widened(&q, k, v, mask);
    // The cap and the softmax in f32 whatever the model's dtype, as transformers computes them.
    let dtype = q.dtype();
    let scores = odpo_kernels::matmul(q, k.swap_dims(2, 3)).cast(DType::F32).mul_scalar(scale);
    let scores = scores.div_scalar(cap).tanh().mul_scalar(cap).mask_fill(mask, f32::NEG_INFINITY);
    odpo_kernels::matmul(burn::tensor::activation::softmax(scores, 3).cast(dtype), v)
}

/// Keys and values repeated to every query head (`[B, H, Tk, Dh]`), and the mask to `[B, H, Tq, Tk]`.
fn widened(q: &Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: &Tensor<4, Bool>) -> (Tensor<4>, Tensor<4>, Tensor<4, Bool>) {
    let [b, h, t_q, dh] = q.dims();
    let [_, h_kv, t_k, _] = k.dims();
    let (k, v) = if h_kv == h {
        (k, v)
    } else {
        let rep = h / h_kv;
        let widen = |x: Tensor<4>| x.unsqueeze_dim::<5>(2).expand([b, h_kv, rep, t_k, dh]).reshape([b, h, t_k, dh]);
        (widen(k), widen(v))
    };
    (k, v, mask.clone().expand([b, h, t_q, t_k]))
}

fn burn_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: &Tensor<4, Bool>, scale: f64) -> Tensor<4> {
    let (k, v, mask) = widened(&q, k, v, mask);
    let options = AttentionModuleOptions { scale: Some(scale), softcap: None, is_causal: false };
    // The mask goes in as an additive bias (0 or -inf), which every backend applies alike: burn-tch
    // 0.22.1 hands a boolean mask to torch's SDPA, which reads `true` as "attend", the opposite of
    // burn's convention, and so attended to exactly the masked keys.
    let bias = Tensor::<4>::zeros(mask.dims(), &q.device()).cast(q.dtype()).mask_fill(mask, f32::NEG_INFINITY);
    attention(q, k, v, None, Some(bias), options)
}

/// `[B, T, H*Dh]` to `[B, H, T, Dh]`.
pub(crate) fn split_heads(x: Tensor<3>, n_heads: usize) -> Tensor<4> {
    let [b, t, d] = x.dims();
    x.reshape([b, t, n_heads, d / n_heads]).swap_dims(1, 2)
}

/// `[B, H, T, Dh]` to `[B, T, H*Dh]`.
pub(crate) fn merge_heads(x: Tensor<4>) -> Tensor<3> {
    let [b, h, t, dh] = x.dims();
    x.swap_dims(1, 2).reshape([b, t, h * dh])
}

/// The number of parameters of a module.
pub fn parameter_count<M: Module>(module: &M) -> usize {
    module.num_params()
}

/// The token embeddings of `ids` `[B, T]`, `[B, T, D]`; on flex the backward pass touches only
/// the rows of the vocabulary that `ids` holds (`odpo_kernels::embedding`).
pub(crate) fn embed(embedding: &burn::nn::Embedding, ids: Tensor<2, Int>) -> Tensor<3> {
    odpo_kernels::embedding(embedding.weight.val(), ids.clone()).unwrap_or_else(|| embedding.forward(ids))
}

/// `x · Wᵀ` for a tied LM head: `x` is `[B, T, D]`, `embedding` `[V, D]`; a 2D matmul, which
/// every backend runs at its best, whose backward pass writes the embedding's gradient `[V, D]` as
/// the embedding is laid out (`odpo_kernels::matmul_nt`).
pub(crate) fn tied_head(x: Tensor<3>, embedding: &Tensor<2>) -> Tensor<3> {
    let [b, t, d] = x.dims();
    let v = embedding.dims()[0];
    odpo_kernels::matmul_nt(x.reshape([b * t, d]), embedding.clone()).reshape([b, t, v])
}

/// `x · W` for an untied head or any `[in, out]` weight, through a 2D matmul.
pub(crate) fn linear_3d(x: Tensor<3>, weight: &Tensor<2>) -> Tensor<3> {
    let [b, t, d] = x.dims();
    let v = weight.dims()[1];
    odpo_kernels::matmul(x.reshape([b * t, d]), weight.clone()).reshape([b, t, v])
}

/// `x·cos + rotate_half(x)·sin`, `rotate_half([x1, x2]) = [-x2, x1]` (the Llama and Gemma
/// families' rotation): one recorded operation where the backend has `odpo_kernels::rotary`, else
/// tensor operations. Where cos and sin are narrower than a head (Phi-4-mini's
/// `partial_rotary_factor`), the head's first dims rotate and the rest pass as they are.
pub(crate) fn rotate_half(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let (d, r) = (x.dims()[3], cos.dims()[3]);
    if r < d {
        let rotated = rotate_half(x.clone().narrow(3, 0, r), cos, sin);
        return Tensor::cat(vec![rotated, x.narrow(3, r, d - r)], 3);
    }
    if let Some(y) = odpo_kernels::rotary(x.clone(), cos, sin) {
        return y;
    }
    let d = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.clone().narrow(3, d / 2, d / 2);
    x * cos.clone() + Tensor::cat(vec![x2.neg(), x1], 3) * sin.clone()
}

/// cos and sin `[B, 1, T, 2 · inv_freq.len()]` for [`rotate_half`] at positions `pos` `[B, T]`:
/// the angles `pos · inv_freq` twice over, computed in f32 as transformers does, times `scale`
/// (LongRoPE's or YaRN's attention factor; 1 elsewhere), cast to `dtype`.
pub(crate) fn rotate_half_cos_sin(inv_freq: &[f32], scale: f64, pos: Tensor<2, Int>, dtype: burn::tensor::DType) -> (Tensor<4>, Tensor<4>) {
    let [b, t] = pos.dims();
    let half = inv_freq.len();
    let inv = Tensor::<1>::from_data(burn::tensor::TensorData::new(inv_freq.to_vec(), [half]), &pos.device());
    let freqs = pos.float().reshape([b, t, 1]) * inv.reshape([1, 1, half]);
    let emb = Tensor::cat(vec![freqs.clone(), freqs], 2).unsqueeze_dim::<4>(1);
    let (cos, sin) = (emb.clone().cos(), emb.sin());
    if scale == 1.0 {
        return (cos.cast(dtype), sin.cast(dtype));
    }
    (cos.mul_scalar(scale).cast(dtype), sin.mul_scalar(scale).cast(dtype))
}

/// The RoPE settings of a family that reads them as transformers 5 writes them
/// (`rope_parameters`), as transformers 4 did (`rope_scaling`) or at the top level (`rope_theta`,
/// `partial_rotary_factor`), as the published Phi and StableLM checkpoints have them, and knows the
/// `default` and `linear` kinds only.
pub(crate) struct PartialRope<'a> {
    /// `rope_parameters`.
    pub parameters: &'a Option<serde_json::Value>,
    /// `rope_scaling`.
    pub scaling: &'a Option<serde_json::Value>,
    /// The top-level `rope_theta`.
    pub theta: Option<f64>,
    /// The top-level `partial_rotary_factor`.
    pub partial: Option<f64>,
    /// The factor where neither form gives one (transformers' default for the family).
    pub default_partial: f64,
}

impl PartialRope<'_> {
    /// A setting: `rope_parameters`' key, else `rope_scaling`'s.
    fn field(&self, key: &str) -> Option<&serde_json::Value> {
        [self.parameters, self.scaling].into_iter().flatten().find_map(|p| p.get(key))
    }

    /// The base: `rope_parameters.rope_theta`, else the top-level `rope_theta`, else 10000.
    pub fn theta(&self) -> f64 {
        self.field("rope_theta").and_then(serde_json::Value::as_f64).or(self.theta).unwrap_or(10_000.0)
    }

    /// The rotated dims of a head of `head_dim`: `int(head_dim · partial_rotary_factor)`.
    pub fn rotary_dims(&self, head_dim: usize) -> usize {
        let f = self.field("partial_rotary_factor").and_then(serde_json::Value::as_f64).or(self.partial).unwrap_or(self.default_partial);
        (head_dim as f64 * f) as usize
    }

    /// The inverse frequencies of the rotated pairs of a head of `head_dim`
    /// ([`plain_rope_inv_freq`]).
    pub fn inv_freq(&self, head_dim: usize, family: &str, path: &std::path::Path) -> crate::Result<Vec<f32>> {
        let kind = self.field("rope_type").or_else(|| self.field("type")).and_then(serde_json::Value::as_str).unwrap_or("default");
        let factor = self.field("factor").and_then(serde_json::Value::as_f64);
        plain_rope_inv_freq(kind, factor, head_dim, self.rotary_dims(head_dim), self.theta(), family, path)
    }
}

/// The inverse frequencies of a rotate-half RoPE over the first `dim` of a head's `head_dim` dims
/// at base `theta`, in f32 as transformers computes them (`1 / theta^(2i / dim)`), each divided by
/// `factor` under `linear` scaling: the RoPE of the families that read the `default` and `linear`
/// kinds only (Phi, StableLM). Another kind, a rotated part that is not an even number from 2 to the
/// head, or a base that is not positive, is an error naming it.
fn plain_rope_inv_freq(kind: &str, factor: Option<f64>, head_dim: usize, dim: usize, theta: f64, family: &str, path: &std::path::Path) -> crate::Result<Vec<f32>> {
    use crate::error::ModelError;
    if dim == 0 || !dim.is_multiple_of(2) || dim > head_dim {
        return Err(ModelError::config(path, format!("{dim} dims of each head rotate (head_dim × partial_rotary_factor); expected an even number from 2 to the head size ({head_dim})")));
    }
    if !(theta.is_finite() && theta > 0.0) {
        return Err(ModelError::config(path, format!("rope_theta is {theta}; expected a positive number")));
    }
    let factor = match (kind, factor) {
        ("default", _) => 1.0,
        ("linear", Some(f)) if f.is_finite() && f > 0.0 => f as f32,
        ("linear", _) => return Err(ModelError::config(path, "rope scaling `linear` needs a positive number `factor`")),
        (other, _) => return Err(ModelError::config(path, format!("rope_type `{other}` is not implemented for {family}; expected `default` or `linear`"))),
    };
    let base = theta as f32;
    Ok((0..dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32) / factor).collect())
}

/// An error naming the first of a config's `sizes` (name, value) that is 0: a model needs at least
/// one of each (a width, a vocabulary, heads), and a 0 would otherwise surface later as a panic
/// inside a tensor operation, with no field named.
pub(crate) fn sizes_at_least_one(sizes: &[(&str, usize)], path: &std::path::Path) -> crate::Result<()> {
    match sizes.iter().find(|(_, n)| *n == 0) {
        Some((name, _)) => Err(crate::ModelError::config(path, format!("{name} is 0; expected at least 1"))),
        None => Ok(()),
    }
}

/// The sizes a Llama-style config gives under the keys Llama and Gemma share: `vocab_size`,
/// `hidden_size`, `intermediate_size`, `num_attention_heads`, `num_key_value_heads`, each at least
/// 1, and the query heads in whole groups over the key/value heads.
pub(crate) fn grouped_layer_sizes(sizes: [usize; 5], path: &std::path::Path) -> crate::Result<()> {
    let keys = ["vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"];
    let named: Vec<(&str, usize)> = keys.into_iter().zip(sizes).collect();
    sizes_at_least_one(&named, path)?;
    if !sizes[3].is_multiple_of(sizes[4]) {
        return Err(crate::ModelError::config(path, "num_attention_heads must be a multiple of num_key_value_heads"));
    }
    Ok(())
}

/// transformers' `layer_types` (`full_attention` or `sliding_attention` for each of `n` layers)
/// as whether each layer slides; an error naming the entry otherwise.
pub(crate) fn sliding_layers(types: &[String], n: usize, path: &std::path::Path) -> crate::Result<Vec<bool>> {
    use crate::ModelError;
    if types.len() != n {
        return Err(ModelError::config(path, format!("layer_types has {} entries; expected one per layer ({n})", types.len())));
    }
    types
        .iter()
        .enumerate()
        .map(|(i, t)| match t.as_str() {
            "full_attention" => Ok(false),
            "sliding_attention" => Ok(true),
            other => Err(ModelError::config(path, format!("layer_types[{i}]: `{other}`; expected full_attention or sliding_attention"))),
        })
        .collect()
}

/// cos and sin of the rotary angles `pos · inv_freq`, each `[B, 1, T, dim/2]`, for positions `pos`
/// `[B, T]`, with `inv_freq_i = 1 / base^(2i/dim)` computed in f32 as transformers does, cast to
/// `dtype`. Each family lays the halves out its own way (GPT-J interleaves, GPT-NeoX concatenates).
pub(crate) fn rotary_cos_sin(pos: Tensor<2, Int>, dim: usize, base: f64, dtype: burn::tensor::DType) -> (Tensor<4>, Tensor<4>) {
    let [b, t] = pos.dims();
    let half = dim / 2;
    let base = base as f32;
    let inv: Vec<f32> = (0..half).map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32)).collect();
    let device = pos.device();
    let inv = Tensor::<1>::from_data(burn::tensor::TensorData::new(inv, [half]), &device);
    let angles = (pos.float().reshape([b, t, 1]) * inv.reshape([1, 1, half])).unsqueeze_dim::<4>(1);
    (angles.clone().cos().cast(dtype), angles.sin().cast(dtype))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_window_masks_keys_window_or_more_behind() {
        let device = Device::default();
        // 2 new queries at indices 3 and 4 of 5 keys, window 2: each sees itself and one before.
        let nothing = Tensor::<4, Bool>::from_data(burn::tensor::TensorData::new(vec![false; 10], [1, 1, 2, 5]), &device);
        let m = sliding_window_mask(&nothing, 2).into_data().try_to_vec::<bool>().unwrap();
        assert_eq!(m, vec![true, true, false, false, false, true, true, true, false, false]);
    }
}
