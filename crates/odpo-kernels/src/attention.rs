//! Masked scaled dot-product attention whose backward pass recomputes the attention weights
//! instead of keeping them (the memory behaviour of FlashAttention; Dao et al. 2022,
//! arXiv:2205.14135, without its tiling in the backward pass).
//!
//! burn 0.22.1's autodiff attention is its fallback written in differentiable operations: under
//! training each layer keeps its `[B, H, Tq, Tk]` scores, exponentials and weights until the
//! backward pass (with burn's checkpointing, the scores matmul's output still stays: it is
//! compute-bound). At 8 pairs × 512 tokens on SmolLM2-135M's 30 layers that is gigabytes. Here the
//! op's saved state is `q`, `k`, `v` and the boolean mask (`[B, H, Tq, Dh]`-sized, and the mask
//! shared by every layer); the backward pass recomputes `P = softmax(scale·QKᵀ, masked)` one
//! layer at a time and forms
//!
//! ```text
//! dV = Pᵀ·dO,   dP = dO·Vᵀ,   dS = P ⊙ (dP − rowsum(dP ⊙ P)),   dQ = scale·dS·K,   dK = scale·dSᵀ·Q
//! ```
//!
//! On libtorch both passes are torch's fused kernels instead (the `libtorch` module below). On flex
//! both passes are one loop over (sequence, head) pairs split over rayon's threads, each head's
//! products through the gemm crate and its `[Tq, Tk]` weights in a buffer of the task (the `flex`
//! module below). On the cubecl backends both passes are formed kernel by kernel over grouped
//! query rows (the `grouped` module below), which reads grouped keys and values as they are: the
//! products, and the masked softmax and the scores' gradient as one kernel each
//! (`masked_softmax.rs`); the forward pass's temporaries are freed as soon as the layer's output
//! is made.

// burn-tch is marked deprecated upstream; it is still the libtorch backend of burn 0.22.
#![cfg_attr(feature = "tch", allow(deprecated))]

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::AttentionModuleOptions;
use burn::backend::tensor::{BoolTensor, FloatTensor};
use burn::backend::{Autodiff, Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::{Bool, Shape, Tensor};

/// Attention with a boolean mask (`true`: the query does not look at that key), differentiable
/// with respect to `q`, `k` and `v` by recomputation. On flex, libtorch and (with the `cube`
/// feature) the cubecl backends.
///
/// Keys and values come grouped: `k` and `v` are `[B, Hkv, Tk, Dh]`, each of the `Hkv` heads serving
/// `H / Hkv` query heads in turn (transformers' `repeat_kv`), and `mask` is `[B, H, Tq, Tk]` or
/// `[B, 1, Tq, Tk]` (every head alike). The default bodies repeat them into copies; flex reads them
/// where they lie.
#[backend_extension(Autodiff, Flex: cfg(feature = "flex"), LibTorch: cfg(feature = "tch"), Cube: cfg(feature = "cube"))]
pub trait MaskedAttentionBackend: Backend {
    /// `softmax(scale·q·kᵀ, masked)·v` for `q` `[B, H, Tq, Dh]` and grouped `k`, `v` and `mask`
    /// (the trait's docs). The default is the backend's attention with the boolean mask as burn
    /// means it (no `[B, H, Tq, Tk]` bias is made).
    fn masked_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, mask: BoolTensor<Self>, scale: f32) -> FloatTensor<Self> {
        tensor_ops::<Self>(q, k, v, mask, scale)
    }

    /// The gradients `(dq, dk, dv)` of [`Self::masked_attention`] for the output gradient `dout`,
    /// `dk` and `dv` grouped as `k` and `v` are.
    fn masked_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        scale: f32,
        dout: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        tensor_ops_backward::<Self>(q, k, v, mask, scale, dout)
    }
}

/// What a tracked forward pass may keep for its backward pass besides the inputs. The autodiff
/// operation holds it: libtorch keeps its fused kernel's output and row log-sum-exp, which that
/// kernel's backward takes, so that the backward pass does not run the forward kernel again (as
/// PyTorch's autograd does). The others keep nothing (`()`) and recompute.
pub trait KeptAttention: MaskedAttentionBackend {
    /// The kept state.
    type Kept: Clone + Send + std::fmt::Debug + 'static;

    /// [`MaskedAttentionBackend::masked_attention`] and what its backward pass may reuse (`None`:
    /// nothing).
    fn masked_attention_keeping(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, mask: BoolTensor<Self>, scale: f32) -> (FloatTensor<Self>, Option<Self::Kept>) {
        (Self::masked_attention(q, k, v, mask, scale), None)
    }

    /// [`MaskedAttentionBackend::masked_attention_backward`] with what the forward pass kept.
    fn masked_attention_backward_kept(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        scale: f32,
        dout: FloatTensor<Self>,
        kept: Option<Self::Kept>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let _ = kept;
        Self::masked_attention_backward(q, k, v, mask, scale, dout)
    }
}

#[cfg(feature = "flex")]
impl KeptAttention for burn::backend::Flex {
    type Kept = ();
}

#[cfg(feature = "cube")]
impl KeptAttention for burn::backend::Cube {
    type Kept = ();
}

/// [`MaskedAttentionBackend::masked_attention`] as the backend's attention over repeated heads.
fn tensor_ops<B: Backend>(q: FloatTensor<B>, k: FloatTensor<B>, v: FloatTensor<B>, mask: BoolTensor<B>, scale: f32) -> FloatTensor<B> {
    let (k, v, mask) = widen_all::<B>(q.shape()[1], k, v, mask);
    B::attention(q, k, v, Some(mask), None, options(scale))
}

/// [`MaskedAttentionBackend::masked_attention_backward`] in the backend's tensor operations.
fn tensor_ops_backward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    mask: BoolTensor<B>,
    scale: f32,
    dout: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    widened_backward::<B>(q, k, v, mask, scale, dout, |q, k, v, mask, scale, dout| backward_with::<B>(q, k, v, mask, scale, dout, B::float_matmul))
}

/// `body`, a backward pass over every head, run on repeated keys, values and mask; its `dk` and
/// `dv` summed back over each group.
fn widened_backward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    mask: BoolTensor<B>,
    scale: f32,
    dout: FloatTensor<B>,
    body: impl FnOnce(FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, BoolTensor<B>, f32, FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>),
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let h_kv = k.shape()[1];
    let (k, v, mask) = widen_all::<B>(q.shape()[1], k, v, mask);
    let (dq, dk, dv) = body(q, k, v, mask, scale, dout);
    (dq, narrow_grad::<B>(dk, h_kv), narrow_grad::<B>(dv, h_kv))
}

/// Grouped `k`, `v` and `mask` repeated to `heads` heads (the mask through a stride of 0).
fn widen_all<B: Backend>(heads: usize, k: FloatTensor<B>, v: FloatTensor<B>, mask: BoolTensor<B>) -> (FloatTensor<B>, FloatTensor<B>, BoolTensor<B>) {
    (widen::<B>(k, heads), widen::<B>(v, heads), mask_heads::<B>(mask, heads))
}

/// `P = softmax(scale·q·kᵀ, masked)`, its products taken by `mm` (no row is fully masked: every
/// query sees its own key).
fn weights_with<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    mask: BoolTensor<B>,
    scale: f32,
    mm: fn(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>,
) -> FloatTensor<B> {
    let s = B::float_mul_scalar(mm(q, B::float_transpose(k)), scale.into());
    let s = B::float_mask_fill(s, mask, f32::NEG_INFINITY.into());
    let max = B::float_max_dim(s.clone(), 3);
    let e = B::float_exp(B::float_sub(s, max));
    let sum = B::float_sum_dim(e.clone(), 3);
    B::float_div(e, sum)
}

/// The gradients of the attention (module docs), its products taken by `mm`.
fn backward_with<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    mask: BoolTensor<B>,
    scale: f32,
    dout: FloatTensor<B>,
    mm: fn(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let p = weights_with::<B>(q.clone(), k.clone(), mask, scale, mm);
    gradients::<B>(p, q, k, v, scale, dout, mm, scores_grad_ops::<B>)
}

/// `(dq, dk, dv)` from the attention weights `p` (module docs), the products taken by `mm` and the
/// scores' gradient by `scores_grad` ([`scores_grad_ops`], or a kernel).
#[allow(clippy::too_many_arguments)]
fn gradients<B: Backend>(
    p: FloatTensor<B>,
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    scale: f32,
    dout: FloatTensor<B>,
    mm: fn(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>,
    scores_grad: fn(FloatTensor<B>, FloatTensor<B>, f32) -> FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let dv = mm(B::float_transpose(p.clone()), dout.clone());
    let dp = mm(dout, B::float_transpose(v));
    let ds = scores_grad(p, dp, scale);
    let dq = mm(ds.clone(), k);
    let dk = mm(B::float_transpose(ds), q);
    (dq, dk, dv)
}

/// `dS = scale · P ⊙ (dP − rowsum(dP ⊙ P))` over the last dimension, as tensor operations.
fn scores_grad_ops<B: Backend>(p: FloatTensor<B>, dp: FloatTensor<B>, scale: f32) -> FloatTensor<B> {
    let last = p.shape().num_dims() - 1;
    let row = B::float_sum_dim(B::float_mul(dp.clone(), p.clone()), last);
    B::float_mul_scalar(B::float_mul(p, B::float_sub(dp, row)), scale.into())
}

fn options(scale: f32) -> AttentionModuleOptions {
    AttentionModuleOptions { scale: Some(f64::from(scale)), softcap: None, is_causal: false }
}

/// flex: one task per (sequence, head) on rayon's threads (the `flex` module below); other dtypes
/// and views out of its reach take the default bodies.
#[cfg(feature = "flex")]
impl MaskedAttentionBackend for burn::backend::Flex {
    fn masked_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, mask: BoolTensor<Self>, scale: f32) -> FloatTensor<Self> {
        match flex::forward(&q, &k, &v, &mask, scale) {
            Some(out) => out,
            None => tensor_ops::<Self>(q, k, v, mask, scale),
        }
    }

    fn masked_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        scale: f32,
        dout: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        match flex::backward(&q, &k, &v, &mask, scale, &dout) {
            Some(grads) => {
                FUSED_BACKWARD.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                grads
            }
            None => tensor_ops_backward::<Self>(q, k, v, mask, scale, dout),
        }
    }
}

/// The attention on flex. burn-flex's own runs as a chain of tensor operations around its kernel:
/// grouped keys and values repeated into copies, and in the backward pass a dozen operations of
/// `[B, H, Tq, Tk]` tensors, most on one thread. Here each (sequence, head) pair is one rayon task
/// that reads `q`, the group's `k` and `v` and the mask where they lie (any non-negative strides),
/// and keeps its `[Tq, Tk]` weights in a buffer of its own:
///
/// ```text
/// forward, per head:            S = scale·Q·Kᵀ, masked   P = softmax(S)   O = P·V
/// backward, per key/value head and each of its query heads in turn:
///     P recomputed   dV += Pᵀ·dO   dP = dO·Vᵀ   dS = scale·P ⊙ (dP − rowsum(dP ⊙ P))   dQ = dS·K   dK += dSᵀ·Q
/// ```
///
/// A row with every key masked gives zeros (no row is, in the models: each query sees its own key).
#[cfg(feature = "flex")]
#[allow(unsafe_code)]
mod flex {
    use burn::backend::flex::FlexTensor;
    use burn::tensor::{DType, Shape};
    use rayon::prelude::*;

    use crate::cpu::flex::View;

    /// Query rows per block of the products. A block reaches only the key columns up to its last
    /// unmasked one, so under a causal mask the products skip most of the masked upper triangle:
    /// at 512 tokens they cover 56% of the scores, against all of them in one block.
    pub(super) const BLOCK: usize = 64;

    /// The sizes `[B, H, Hkv, Tq, Tk, Dh]` when `q`, `k`, `v` (and `dout`) are f32 and their shapes
    /// agree, and the mask has one byte an element.
    fn sizes(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor, mask: &FlexTensor) -> Option<[usize; 6]> {
        let (qs, ks) = (q.layout().shape(), k.layout().shape());
        if [q, k, v].iter().any(|t| t.dtype() != DType::F32) || !matches!(mask.dtype(), DType::Bool(_)) || mask.dtype().size() != 1 {
            return None;
        }
        if qs.num_dims() != 4 || ks.num_dims() != 4 || v.layout().shape() != ks {
            return None;
        }
        let (b, h, h_kv, tq, tk, dh) = (qs[0], qs[1], ks[1], qs[2], ks[2], qs[3]);
        let agree = ks[0] == b && ks[3] == dh && h_kv > 0 && h.is_multiple_of(h_kv);
        let nonempty = [b, h, tq, tk, dh].iter().all(|&n| n > 0);
        (agree && nonempty).then_some([b, h, h_kv, tq, tk, dh])
    }

    /// The inputs read in place.
    struct Inputs<'a> {
        q: View<'a, f32>,
        k: View<'a, f32>,
        v: View<'a, f32>,
        mask: View<'a, u8>,
        /// `[B, H, Hkv, Tq, Tk, Dh]`
        sizes: [usize; 6],
        scale: f32,
        /// The key columns each block of query rows reaches ([`reach`]), `[B, Hm, blocks]`, where
        /// `Hm` is 1 when the heads read one mask (a stride of 0, as the models build it): then it
        /// is read once a pass, not once per head and pass.
        reaches: Vec<usize>,
    }

    impl<'a> Inputs<'a> {
        fn new(q: &'a FlexTensor, k: &'a FlexTensor, v: &'a FlexTensor, mask: &'a FlexTensor, scale: f32) -> Option<Self> {
            let sizes = sizes(q, k, v, mask)?;
            let [b, h, h_kv, tq, tk, dh] = sizes;
            let mask = View::new(mask, mask.bytes(), [b, h, tq, tk])?;
            let heads = if mask.strides[1] == 0 { 1 } else { h };
            let blocks = tq.div_ceil(BLOCK);
            let reaches = (0..b * heads * blocks)
                .into_par_iter()
                .map(|n| {
                    let (bh, block) = (n / blocks, n % blocks);
                    reach(&mask, tk, bh / heads, bh % heads, block * BLOCK..((block + 1) * BLOCK).min(tq))
                })
                .collect();
            Some(Self {
                q: View::f32(q, [b, h, tq, dh])?,
                k: View::f32(k, [b, h_kv, tk, dh])?,
                v: View::f32(v, [b, h_kv, tk, dh])?,
                mask,
                sizes,
                scale,
                reaches,
            })
        }

        /// The key columns reached by each block of query rows of head `h` of sequence `b`.
        fn reach(&self, b: usize, h: usize) -> &[usize] {
            let blocks = self.sizes[3].div_ceil(BLOCK);
            let (heads, h) = if self.mask.strides[1] == 0 { (1, 0) } else { (self.sizes[1], h) };
            &self.reaches[(b * heads + h) * blocks..][..blocks]
        }

        /// The weights `P = softmax(scale·Q·Kᵀ, masked)` of query head `h` of sequence `b` into `p`
        /// (`[Tq, Tk]`, row-major). Block by block of [`BLOCK`] query rows, only the key columns
        /// the block reaches ([`Inputs::reach`]) are computed; the weights beyond are 0, as the
        /// masked ones are.
        fn weights(&self, b: usize, h: usize, p: &mut [f32]) {
            let [_, heads, h_kv, _, tk, dh] = self.sizes;
            let (k, k_cs, k_rs) = self.k.transposed(b, h / (heads / h_kv));
            let m = &self.mask;
            for ((block, p), &n) in p.chunks_mut(BLOCK * tk).enumerate().zip(self.reach(b, h)) {
                let (r0, rows) = (block * BLOCK, p.len() / tk);
                if n > 0 {
                    let (q, q_cs, q_rs) = self.q.rows_from(b, h, r0);
                    // SAFETY: `p` holds this block's `rows × tk` row-major scores, of which the
                    // first `n ≤ tk` columns are written; the operands are views whose every
                    // reachable element `Inputs::new` checked to lie in their buffers, borrowed by
                    // `self`, from row `r0 + rows ≤ Tq` of `q` and over `n ≤ Tk` keys.
                    unsafe {
                        gemm::gemm(rows, n, dh, p.as_mut_ptr(), 1, tk as isize, false, q, q_cs, q_rs, k, k_cs, k_rs, 0.0f32, self.scale, false, false, false, gemm::Parallelism::None);
                    }
                }
                for (i, row) in p.chunks_exact_mut(tk).enumerate() {
                    let (row, past) = row.split_at_mut(n);
                    past.fill(0.0);
                    if n > 0 {
                        row_loops::softmax(row, &m.data[m.at(b, h, r0 + i)..], m.strides[3]);
                    }
                }
            }
        }
    }

    /// How many leading key columns hold every unmasked entry of query rows `rows` of head `h` of
    /// sequence `b` (0 when all are masked). Each row is read from its end, and only past what
    /// earlier rows reach: under a causal mask a row stops at its own position.
    fn reach(m: &View<'_, u8>, tk: usize, b: usize, h: usize, rows: std::ops::Range<usize>) -> usize {
        let mut reach = 0;
        for i in rows {
            let at = m.at(b, h, i);
            if let Some(j) = (reach..tk).rev().find(|&j| m.data[at + j * m.strides[3]] == 0) {
                reach = j + 1;
            }
        }
        reach
    }

    /// The loops over one row of weights, compiled again for AVX-512 and for AVX2 + FMA and chosen
    /// at run time, as the log-softmax's are (`crate::softmax`): 16 or 8 lanes where the baseline
    /// takes 4, and the sums in lanes, so that they vectorise at all.
    mod row_loops {
        use crate::softmax::{exp, row_max};
        use multiversion::multiversion;

        /// Lanes of the sums.
        const LANES: usize = 16;

        /// `Σ a·b` in [`LANES`] partial sums.
        #[inline(always)]
        fn dot(a: &[f32], b: &[f32]) -> f32 {
            let mut lanes = [0f32; LANES];
            let (mut xa, mut xb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
            for (x, y) in (&mut xa).zip(&mut xb) {
                for ((l, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
                    *l += x * y;
                }
            }
            let tail = xa.remainder().iter().zip(xb.remainder()).fold(0f32, |s, (&x, &y)| s + x * y);
            lanes.iter().sum::<f32>() + tail
        }

        /// The masked softmax of one row of scores in place: `mask` from the row's first key on,
        /// `stride` apart (non-zero: masked). A row with every key masked becomes zeros.
        #[inline(always)]
        fn softmax_any(row: &mut [f32], mask: &[u8], stride: usize) {
            if stride == 1 {
                let mask = &mask[..row.len()];
                for (s, &m) in row.iter_mut().zip(mask) {
                    *s = if m != 0 { f32::NEG_INFINITY } else { *s };
                }
            } else {
                for (j, s) in row.iter_mut().enumerate() {
                    if mask[j * stride] != 0 {
                        *s = f32::NEG_INFINITY;
                    }
                }
            }
            let max = row_max(row);
            if max == f32::NEG_INFINITY {
                row.fill(0.0);
                return;
            }
            let mut lanes = [0f32; LANES];
            let mut blocks = row.chunks_exact_mut(LANES);
            for block in &mut blocks {
                for (l, s) in lanes.iter_mut().zip(block) {
                    *s = exp(*s - max);
                    *l += *s;
                }
            }
            let mut sum = 0f32;
            for s in blocks.into_remainder() {
                *s = exp(*s - max);
                sum += *s;
            }
            let sum = lanes.iter().sum::<f32>() + sum;
            for s in row.iter_mut() {
                *s /= sum;
            }
        }

        /// The gradient of the scores from that of the weights, in place: `dS = scale·P ⊙ (dP − Σ dP ⊙ P)`.
        #[inline(always)]
        fn scores_grad_any(dp: &mut [f32], p: &[f32], scale: f32) {
            let row = dot(dp, p);
            for (d, &p) in dp.iter_mut().zip(p) {
                *d = p * (*d - row) * scale;
            }
        }

        /// [`softmax_any`], in a copy compiled for AVX-512 or AVX2 + FMA where the CPU has them.
        #[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+fma", "x86_64+avx2+fma"))]
        pub(in super::super) fn softmax(row: &mut [f32], mask: &[u8], stride: usize) {
            softmax_any(row, mask, stride);
        }

        /// [`scores_grad_any`], in a copy compiled for AVX-512 or AVX2 + FMA where the CPU has them.
        #[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+fma", "x86_64+avx2+fma"))]
        pub(in super::super) fn scores_grad(dp: &mut [f32], p: &[f32], scale: f32) {
            scores_grad_any(dp, p, scale);
        }

        #[cfg(test)]
        mod tests {
            /// A row of 37 scores (two blocks of lanes and a tail), every third key masked.
            fn scores() -> (Vec<f32>, Vec<u8>) {
                let row = (0..37).map(|j| ((j * 17 % 11) as f32 - 5.0) * 0.7).collect();
                (row, (0..37).map(|j| u8::from(j % 3 == 1)).collect())
            }

            /// Both copies of the loops, the mask read in place and `stride` apart, against the
            /// softmax worked in f64 from its definition; and a row with every key masked.
            #[test]
            fn softmax_matches_the_definition() {
                let (row, mask) = scores();
                let max = row.iter().zip(&mask).filter(|&(_, &m)| m == 0).fold(f64::NEG_INFINITY, |a, (&s, _)| a.max(f64::from(s)));
                let sum: f64 = row.iter().zip(&mask).filter(|&(_, &m)| m == 0).map(|(&s, _)| (f64::from(s) - max).exp()).sum();
                let spread: Vec<u8> = mask.iter().flat_map(|&m| [m, 7, 7]).collect();
                for (mask, stride) in [(&mask, 1), (&spread, 3)] {
                    let (mut ours, mut baseline) = (row.clone(), row.clone());
                    super::softmax(&mut ours, mask, stride);
                    super::softmax_any(&mut baseline, mask, stride);
                    for (j, (&a, &b)) in ours.iter().zip(&baseline).enumerate() {
                        let want = if mask[j * stride] != 0 { 0.0 } else { (f64::from(row[j]) - max).exp() / sum };
                        assert!((f64::from(a) - want).abs() < 1e-7 && (f64::from(b) - want).abs() < 1e-7, "key {j}: {a}, {b} against {want}");
                    }
                }
                let mut all = row.clone();
                super::softmax(&mut all, &[1; 37], 1);
                assert!(all.iter().all(|&x| x == 0.0));
            }

            #[test]
            fn scores_grad_matches_the_definition() {
                let (p, _) = scores();
                let dp: Vec<f32> = (0..37).map(|j| (j as f32 * 0.37).sin()).collect();
                let row: f64 = dp.iter().zip(&p).map(|(&d, &p)| f64::from(d) * f64::from(p)).sum();
                let (mut ours, mut baseline) = (dp.clone(), dp.clone());
                super::scores_grad(&mut ours, &p, 0.5);
                super::scores_grad_any(&mut baseline, &p, 0.5);
                for j in 0..37 {
                    let want = 0.5 * f64::from(p[j]) * (f64::from(dp[j]) - row);
                    for got in [ours[j], baseline[j]] {
                        assert!((f64::from(got) - want).abs() < 2e-6, "key {j}: {got} against {want}");
                    }
                }
            }
        }
    }

    /// `softmax(scale·q·kᵀ, masked)·v`, or `None` when the inputs are out of reach.
    pub(super) fn forward(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor, mask: &FlexTensor, scale: f32) -> Option<FlexTensor> {
        let x = Inputs::new(q, k, v, mask, scale)?;
        let [b, h, h_kv, tq, tk, dh] = x.sizes;
        let mut out = vec![0f32; b * h * tq * dh];
        out.par_chunks_mut(tq * dh).enumerate().for_each(|(bh, out)| {
            let (bi, hi) = (bh / h, bh % h);
            let mut p = vec![0f32; tq * tk];
            x.weights(bi, hi, &mut p);
            let (v, v_cs, v_rs) = x.v.matrix(bi, hi / (h / h_kv));
            for (block, (out, &n)) in out.chunks_mut(BLOCK * dh).zip(x.reach(bi, hi)).enumerate() {
                // A block that reaches no key keeps its zeros.
                if n == 0 {
                    continue;
                }
                // SAFETY: `out` is this block's `rows × dh` row-major output, the block's weights
                // are `rows × tk` row-major from row `block · BLOCK` of `p`, of which the first `n`
                // columns are read, and `v` is a checked view (`Inputs::new`) read over `n ≤ Tk` keys.
                unsafe {
                    let weights = p[block * BLOCK * tk..].as_ptr();
                    gemm::gemm(out.len() / dh, dh, n, out.as_mut_ptr(), 1, dh as isize, false, weights, 1, tk as isize, v, v_cs, v_rs, 0.0f32, 1.0f32, false, false, false, gemm::Parallelism::None);
                }
            }
        });
        Some(crate::cpu::flex::tensor(Shape::new([b, h, tq, dh]), out))
    }

    /// `(dq, dk, dv)` for the output gradient `dout`, `dk` and `dv` grouped as `k` and `v`; `None`
    /// when the inputs are out of reach. One task per key/value head, which adds its query heads'
    /// contributions to `dk` and `dv` in turn, block by block of query rows over the keys each
    /// block reaches.
    pub(super) fn backward(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor, mask: &FlexTensor, scale: f32, dout: &FlexTensor) -> Option<(FlexTensor, FlexTensor, FlexTensor)> {
        let x = Inputs::new(q, k, v, mask, scale)?;
        let [b, h, h_kv, tq, tk, dh] = x.sizes;
        let d = View::f32(dout, [b, h, tq, dh])?;
        let group = h / h_kv;
        let (mut dq, mut dk, mut dv) = (vec![0f32; b * h * tq * dh], vec![0f32; b * h_kv * tk * dh], vec![0f32; b * h_kv * tk * dh]);
        let tasks = dq.par_chunks_mut(group * tq * dh).zip(dk.par_chunks_mut(tk * dh)).zip(dv.par_chunks_mut(tk * dh));
        tasks.enumerate().for_each(|(bg, ((dq, dk), dv))| {
            let (bi, g) = (bg / h_kv, bg % h_kv);
            let (mut p, mut ds) = (vec![0f32; tq * tk], vec![0f32; tq * tk]);
            let ((k, k_cs, k_rs), (vt, vt_cs, vt_rs)) = (x.k.matrix(bi, g), x.v.transposed(bi, g));
            for (j, dq) in dq.chunks_exact_mut(tq * dh).enumerate() {
                let hi = g * group + j;
                x.weights(bi, hi, &mut p);
                for (block, (dq, &n)) in dq.chunks_mut(BLOCK * dh).zip(x.reach(bi, hi)).enumerate() {
                    // A block that reaches no key has zero weights: it adds nothing to dK and dV,
                    // and its dQ stays zero.
                    if n == 0 {
                        continue;
                    }
                    let (r0, rows) = (block * BLOCK, dq.len() / dh);
                    let ((dout, do_cs, do_rs), (q, q_cs, q_rs)) = (d.rows_from(bi, hi, r0), x.q.rows_from(bi, hi, r0));
                    let (p, ds) = (&p[r0 * tk..], &mut ds[r0 * tk..]);
                    // SAFETY (each product): the destination is a row-major buffer of this task
                    // (`dv`, `dk`: `tk × dh`, of which the first `n` rows are written; `ds`: the
                    // block's `rows × tk`, of which the first `n` columns are written; `dq`: the
                    // block's `rows × dh`), `p` and `ds` are read as the block's `rows × n` of a
                    // `tk`-wide row-major buffer, and the other operands are checked views
                    // (`Inputs::new`, `View::f32` for `dout`) read from row `r0` over `rows`
                    // query rows and `n ≤ Tk` keys.
                    unsafe {
                        // dV += Pᵀ·dO
                        gemm::gemm(n, dh, rows, dv.as_mut_ptr(), 1, dh as isize, true, p.as_ptr(), tk as isize, 1, dout, do_cs, do_rs, 1.0f32, 1.0f32, false, false, false, gemm::Parallelism::None);
                        // dP = dO·Vᵀ
                        gemm::gemm(rows, n, dh, ds.as_mut_ptr(), 1, tk as isize, false, dout, do_cs, do_rs, vt, vt_cs, vt_rs, 0.0f32, 1.0f32, false, false, false, gemm::Parallelism::None);
                    }
                    for (dp, p) in ds.chunks_mut(tk).zip(p.chunks(tk)).take(rows) {
                        row_loops::scores_grad(&mut dp[..n], &p[..n], scale);
                    }
                    // SAFETY: as above.
                    unsafe {
                        // dQ = dS·K
                        gemm::gemm(rows, dh, n, dq.as_mut_ptr(), 1, dh as isize, false, ds.as_ptr(), 1, tk as isize, k, k_cs, k_rs, 0.0f32, 1.0f32, false, false, false, gemm::Parallelism::None);
                        // dK += dSᵀ·Q
                        gemm::gemm(n, dh, rows, dk.as_mut_ptr(), 1, dh as isize, true, ds.as_ptr(), tk as isize, 1, q, q_cs, q_rs, 1.0f32, 1.0f32, false, false, false, gemm::Parallelism::None);
                    }
                }
            }
        });
        let grouped = Shape::new([b, h_kv, tk, dh]);
        Some((crate::cpu::flex::tensor(Shape::new([b, h, tq, dh]), dq), crate::cpu::flex::tensor(grouped.clone(), dk), crate::cpu::flex::tensor(grouped, dv)))
    }
}

/// The cubecl backends (wgpu, Vulkan, Metal, CUDA): the default bodies, except for f32 on a device
/// whose matmul would round f32 to TF32 (CUDA): there the attention is formed kernel by kernel with
/// the f32 product of [`crate::matmul`], forward and backward.
#[cfg(feature = "cube")]
impl MaskedAttentionBackend for burn::backend::Cube {
    fn masked_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, mask: BoolTensor<Self>, scale: f32) -> FloatTensor<Self> {
        if grouped::fits(&q, &k, &mask) {
            return grouped::forward(q, k, v, mask, scale, crate::matmul::cube::matmul);
        }
        if !crate::matmul::cube::rounds_f32(&q) {
            return tensor_ops::<Self>(q, k, v, mask, scale);
        }
        let (k, v, mask) = widen_all::<Self>(q.shape()[1], k, v, mask);
        let p = weights_with::<Self>(q, k, mask, scale, crate::matmul::cube::matmul);
        crate::matmul::cube::matmul(p, v)
    }

    fn masked_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        scale: f32,
        dout: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        if grouped::fits(&q, &k, &mask) {
            return grouped::backward(q, k, v, mask, scale, dout, crate::matmul::cube::matmul);
        }
        widened_backward::<Self>(q, k, v, mask, scale, dout, |q, k, v, mask, scale, dout| backward_with::<Self>(q, k, v, mask, scale, dout, crate::matmul::cube::matmul))
    }
}

/// Both passes over grouped rows, for backends that run attention as separate kernels (the
/// cubecl backends): each key/value head's `G = H / Hkv` query heads are one run of `G·Tq` query
/// rows (`[B, Hkv, G·Tq, Dh]`, a view of `q` whose heads lie in order), so the products take `k`
/// and `v` as they are and `dk`, `dv` come out summed over the group. Repeating `k` and `v` to
/// every head took a copy of each per pass, and the group's sums two reductions more backward:
/// 300 launches of a SmolLM2-135M step (9 query heads over 3). The scores are masked as
/// `[B, Hkv, G, Tq, Tk]`, the mask read through strides of 0 over the heads it is shared by.
#[cfg(feature = "cube")]
mod grouped {
    use burn::backend::Cube as B;
    use burn::backend::ops::{BoolTensorOps, FloatTensorOps};
    use burn::backend::tensor::{BoolTensor, FloatTensor};
    use burn::backend::TensorMetadata;
    use burn::tensor::Shape;

    use crate::masked_softmax;

    type Product = fn(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>;

    /// Whether the grouped form takes these: `H` a multiple of `Hkv` and the mask over one head
    /// or all `H`.
    pub(super) fn fits<T: TensorMetadata, M: TensorMetadata>(q: &T, k: &T, mask: &M) -> bool {
        let (heads, h_kv, mh) = (q.shape()[1], k.shape()[1], mask.shape()[1]);
        h_kv > 0 && heads % h_kv == 0 && (mh == 1 || mh == heads)
    }

    /// `[B, H, T, D]` as `[B, Hkv, G·T, D]`.
    fn rows(x: FloatTensor<B>, h_kv: usize) -> FloatTensor<B> {
        let s = x.shape();
        B::float_reshape(x, Shape::new([s[0], h_kv, s[1] / h_kv * s[2], s[3]]))
    }

    /// `[B, Hkv, G·T, D]` as `[B, H, T, D]`.
    fn heads(x: FloatTensor<B>, heads: usize) -> FloatTensor<B> {
        let s = x.shape();
        B::float_reshape(x, Shape::new([s[0], heads, s[1] * s[2] / heads, s[3]]))
    }

    /// `P = softmax(scale·q·kᵀ, masked)` over grouped rows, `[B, Hkv, G·Tq, Tk]`: one kernel
    /// ([`masked_softmax::softmax`]) after the product, or tensor operations where it does not take
    /// the tensors.
    fn weights(q: FloatTensor<B>, k: FloatTensor<B>, mask: BoolTensor<B>, scale: f32, heads: usize, mm: Product) -> FloatTensor<B> {
        let (ms, h_kv) = (mask.shape(), k.shape()[1]);
        let (b, tq, tk) = (ms[0], ms[2], ms[3]);
        let g = heads / h_kv;
        let s = mm(q, B::float_transpose(k));
        if masked_softmax::fits(&s, &mask, heads) {
            return masked_softmax::softmax(s, &mask, scale, heads);
        }
        let mask = if ms[1] == 1 {
            B::bool_expand(B::bool_reshape(mask, Shape::new([b, 1, 1, tq, tk])), Shape::new([b, h_kv, g, tq, tk]))
        } else {
            B::bool_reshape(mask, Shape::new([b, h_kv, g, tq, tk]))
        };
        let s = B::float_mul_scalar(s, scale.into());
        let s = B::float_mask_fill(B::float_reshape(s, Shape::new([b, h_kv, g, tq, tk])), mask, f32::NEG_INFINITY.into());
        let max = B::float_max_dim(s.clone(), 4);
        let e = B::float_exp(B::float_sub(s, max));
        let sum = B::float_sum_dim(e.clone(), 4);
        B::float_reshape(B::float_div(e, sum), Shape::new([b, h_kv, g * tq, tk]))
    }

    /// The scores' gradient: one kernel ([`masked_softmax::softmax_grad`]) where it takes the
    /// tensors.
    fn scores_grad(p: FloatTensor<B>, dp: FloatTensor<B>, scale: f32) -> FloatTensor<B> {
        if masked_softmax::grad_fits(&p, &dp) { masked_softmax::softmax_grad(p, dp, scale) } else { super::scores_grad_ops::<B>(p, dp, scale) }
    }

    pub(super) fn forward(q: FloatTensor<B>, k: FloatTensor<B>, v: FloatTensor<B>, mask: BoolTensor<B>, scale: f32, mm: Product) -> FloatTensor<B> {
        let (h, h_kv) = (q.shape()[1], k.shape()[1]);
        let p = weights(rows(q, h_kv), k, mask, scale, h, mm);
        heads(mm(p, v), h)
    }

    /// The gradients of the module docs over grouped rows: `dk` and `dv` are the group's sums.
    pub(super) fn backward(q: FloatTensor<B>, k: FloatTensor<B>, v: FloatTensor<B>, mask: BoolTensor<B>, scale: f32, dout: FloatTensor<B>, mm: Product) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
        let (h, h_kv) = (q.shape()[1], k.shape()[1]);
        let (q, dout) = (rows(q, h_kv), rows(dout, h_kv));
        let p = weights(q.clone(), k.clone(), mask, scale, h, mm);
        let (dq, dk, dv) = super::gradients::<B>(p, q, k, v, scale, dout, mm, scores_grad);
        (heads(dq, h), dk, dv)
    }
}

/// libtorch: torch's own fused attention, forward and backward (the `libtorch` module below), with the mask as
/// an additive bias; the recomputing backward of the other backends where torch's kernels decline.
#[cfg(feature = "tch")]
impl MaskedAttentionBackend for burn::backend::LibTorch {
    fn masked_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, mask: BoolTensor<Self>, scale: f32) -> FloatTensor<Self> {
        use burn::backend::ops::ModuleOps;
        let kind = q.tensor.kind();
        let mask = mask_heads::<Self>(mask, q.shape()[1]);
        let bias = libtorch::bias(&mask, kind);
        if libtorch::takes_groups(&q, &k, &bias)
            && let Some(out) = libtorch::forward(&q, &k, &v, &bias, scale)
        {
            return out;
        }
        let (k, v) = (widen::<Self>(k, q.shape()[1]), widen::<Self>(v, q.shape()[1]));
        match libtorch::forward(&q, &k, &v, &bias, scale) {
            Some(out) => out,
            None => Self::attention(q, k, v, None, Some(burn::backend::libtorch::TchTensor::new(libtorch::bias_of(&mask.tensor, kind))), options(scale)),
        }
    }

    fn masked_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        scale: f32,
        dout: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        libtorch_backward(q, k, v, mask, scale, dout, None)
    }
}

/// The libtorch backward pass over repeated heads: torch's fused kernel from what the forward kept,
/// or after running its forward again; the recomputing backward where torch refuses the inputs.
#[cfg(feature = "tch")]
fn libtorch_backward(
    q: FloatTensor<burn::backend::LibTorch>,
    k: FloatTensor<burn::backend::LibTorch>,
    v: FloatTensor<burn::backend::LibTorch>,
    mask: BoolTensor<burn::backend::LibTorch>,
    scale: f32,
    dout: FloatTensor<burn::backend::LibTorch>,
    kept: Option<libtorch::Kept>,
) -> (FloatTensor<burn::backend::LibTorch>, FloatTensor<burn::backend::LibTorch>, FloatTensor<burn::backend::LibTorch>) {
    type B = burn::backend::LibTorch;
    // A forward pass whose kernel took the grouped keys and values as they are: its backward
    // kernel does too, and hands back `dk` and `dv` grouped. Where it refuses them, the widened
    // path below recomputes.
    if let Some(kept) = kept.as_ref().filter(|kept| kept.grouped)
        && let Some(grads) = libtorch::backward_kept(&q, &k, &v, scale, &dout, kept)
    {
        return grads;
    }
    let kept = kept.filter(|kept| !kept.grouped);
    widened_backward::<B>(q, k, v, mask, scale, dout, |q, k, v, mask, scale, dout| {
        let fused = match &kept {
            Some(kept) => libtorch::backward_kept(&q, &k, &v, scale, &dout, kept),
            None => libtorch::backward(&q, &k, &v, &libtorch::bias(&mask, q.tensor.kind()), scale, &dout),
        };
        fused.unwrap_or_else(|| backward_with::<B>(q, k, v, mask, scale, dout, <B as burn::backend::ops::FloatTensorOps<B>>::float_matmul))
    })
}

/// libtorch under autodiff: the forward pass through the device's fused kernel itself, keeping its
/// output and log-sum-exp for that kernel's backward.
#[cfg(feature = "tch")]
impl KeptAttention for burn::backend::LibTorch {
    type Kept = libtorch::Kept;

    fn masked_attention_keeping(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, mask: BoolTensor<Self>, scale: f32) -> (FloatTensor<Self>, Option<Self::Kept>) {
        let heads = q.shape()[1];
        let bias = libtorch::bias(&mask_heads::<Self>(mask.clone(), heads), q.tensor.kind());
        if libtorch::takes_groups(&q, &k, &bias)
            && let Some((out, kept)) = libtorch::forward_keeping(&q, &k, &v, &bias, scale)
        {
            return (out, Some(kept));
        }
        let (kw, vw) = (widen::<Self>(k.clone(), heads), widen::<Self>(v.clone(), heads));
        match libtorch::forward_keeping(&q, &kw, &vw, &bias, scale) {
            Some((out, kept)) => (out, Some(kept)),
            None => (Self::masked_attention(q, k, v, mask, scale), None),
        }
    }

    fn masked_attention_backward_kept(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        scale: f32,
        dout: FloatTensor<Self>,
        kept: Option<Self::Kept>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        libtorch_backward(q, k, v, mask, scale, dout, kept)
    }
}

/// Attention through torch's kernels. burn-tch 0.22.1 runs an attention with a bias as burn's
/// operation-by-operation fallback (scores, softmax and product as separate kernels, the
/// `[B, H, Tq, Tk]` scores in memory), and hands a boolean mask to torch's SDPA, which reads `true`
/// as "attend", the opposite of burn's convention. Here the forward pass is one call of
/// `scaled_dot_product_attention` with the mask as a 0 / −∞ bias (torch picks the kernel; cuDNN's on
/// an H200). Under autodiff the forward pass calls the device's fused kernel itself and keeps its
/// output and row log-sum-exp for that kernel's backward, as PyTorch's autograd does: on the CPU
/// `_scaled_dot_product_flash_attention_for_cpu` and its backward, on CUDA
/// `_scaled_dot_product_efficient_attention` and `_efficient_attention_backward` (tch 0.22 binds
/// no cuDNN attention forward). Each is a handful of host calls where the composed form is a dozen,
/// which is what a small model's step on a GPU waits on.
///
/// A bias is opaque to those kernels: they compute every block of queries against every block of
/// keys, the future's too, and add −∞ there. Where the mask hides every key after its query (a
/// model's causal mask over `Tq = Tk` tokens, with padding or a sliding window on top), the kernels
/// are also told `is_causal`, and skip the blocks above the diagonal, about half the work; the bias
/// still hides the rest, so the result is the same. Where the mask is the causal mask and nothing
/// more (rows without padding), no bias is made or read at all: both passes are
/// `scaled_dot_product_attention` with `is_causal`, as transformers calls it for such rows, under
/// autodiff recorded by torch's own autograd, so that torch picks the kernels both ways as it does
/// for PyTorch's step (cuDNN's on an H200, whose forward tch 0.22 does not bind).
///
/// Grouped keys and values (fewer key/value heads than query heads) go to the kernels that take
/// them so as they are ([`libtorch::takes_groups`]), as transformers hands them to torch over rows
/// without padding: no copy repeats them to every query head in the forward pass, none sums their
/// gradients back over each group in the backward, and torch's record of the forward pass keeps
/// the narrow `k` and `v` burn's record holds anyway, not copies (on a Llama-3.2-1B step of 8
/// pairs × 512 tokens in bf16, 67 MB a layer less).
#[cfg(feature = "tch")]
pub(crate) mod libtorch {
    use std::cell::RefCell;
    use std::sync::atomic::Ordering;

    use burn::backend::libtorch::TchTensor;
    use tch::{Device, Kind, Tensor};

    /// A mask as the kernels take it: whether it hides every key after its query (then the kernels
    /// may skip those blocks: torch's `is_causal`), and the additive bias of what else it hides
    /// (`None` where the mask is the causal mask and nothing more).
    #[derive(Debug)]
    pub(crate) struct Bias {
        pub(crate) tensor: Option<Tensor>,
        pub(crate) causal: bool,
    }

    impl Clone for Bias {
        fn clone(&self) -> Self {
            Self { tensor: self.tensor.as_ref().map(Tensor::shallow_clone), causal: self.causal }
        }
    }

    thread_local! {
        /// The last mask and its bias. Every layer of a forward and backward pass gets the same
        /// mask (the models build it once per pass), so the bias is built once, not once per layer
        /// and pass. The held clone of the mask keeps burn from writing its buffer in place (burn
        /// writes only buffers nothing else holds), so a mask with the same buffer, sizes and
        /// strides is the same mask.
        static BIAS: RefCell<Option<(TchTensor, Kind, Bias)>> = const { RefCell::new(None) };
    }

    /// A boolean mask (`true`: the query does not look) as the kernels take it, for attention of
    /// the float kind `kind`.
    pub(crate) fn bias(mask: &TchTensor, kind: Kind) -> Bias {
        let m = &mask.tensor;
        let same = |held: &TchTensor| held.tensor.data_ptr() == m.data_ptr() && held.tensor.size() == m.size() && held.tensor.stride() == m.stride() && held.tensor.device() == m.device();
        BIAS.with(|cell| {
            let mut cell = cell.borrow_mut();
            if let Some((held, k, bias)) = cell.as_ref()
                && *k == kind
                && same(held)
            {
                return bias.clone();
            }
            let (causal, only_causal) = causal(&one_head(m));
            let bias = Bias { tensor: (!only_causal).then(|| bias_of(m, kind)), causal };
            *cell = Some((mask.clone(), kind, bias.clone()));
            bias
        })
    }

    /// The mask over one head when the heads read one mask (a stride of 0).
    fn one_head(m: &Tensor) -> Tensor {
        let size = m.size();
        if size.len() == 4 && size[1] > 1 && m.stride()[1] == 0 { m.narrow(1, 0, 1) } else { m.shallow_clone() }
    }

    /// The additive bias of a boolean mask (`true`: −∞), of the float kind `kind`: over one head
    /// when the heads read one mask, expanded to all of them; its rows padded to a multiple of 16
    /// elements, which CUDA's memory-efficient kernel requires of a bias (PyTorch's SDPA pads it
    /// the same way).
    pub(crate) fn bias_of(m: &Tensor, kind: Kind) -> Tensor {
        let size = m.size();
        let one = one_head(m);
        let mut padded = one.size();
        let Some(last) = padded.last_mut() else { return Tensor::zeros(&size, (kind, m.device())) };
        let tk = *last;
        *last = (tk + 15) / 16 * 16;
        let mut bias = Tensor::zeros(&padded, (kind, m.device())).narrow(-1, 0, tk);
        let _ = bias.masked_fill_(&one, f64::NEG_INFINITY);
        bias.expand(&size, false)
    }

    /// Whether a mask `[.., Tq, Tk]` hides every key after its query, counted from the first
    /// (torch's `is_causal`, aligned top left), and whether it hides nothing else. Only with
    /// `Tq = Tk`, where a model's mask over its whole sequence does; a step of generation
    /// (`Tq < Tk`) needs its keys in the past. One read of the device per mask, that is per
    /// forward pass.
    fn causal(one: &Tensor) -> (bool, bool) {
        let size = one.size();
        let [.., tq, tk] = size[..] else { return (false, false) };
        if tq != tk || tq < 2 {
            return (false, false);
        }
        let future = Tensor::ones([tq, tk], (Kind::Bool, one.device())).triu(1);
        let read = || -> Result<Vec<i64>, tch::TchError> {
            let hides_the_future = one.f_logical_or(&future.f_logical_not()?)?.f_all()?;
            let nothing_else = one.f_eq_tensor(&future)?.f_all()?;
            Vec::<i64>::try_from(Tensor::f_stack(&[hides_the_future, nothing_else], 0)?.f_to_kind(Kind::Int64)?)
        };
        match read().as_deref() {
            Ok(&[future, only]) => (future != 0, future != 0 && only != 0),
            _ => (false, false),
        }
    }

    /// Whether torch's kernels take `k` and `v` grouped as they are (fewer key/value heads than
    /// query heads), each key/value head read by its group of query heads, with no copy repeating
    /// them: on the CPU its flash kernel, whatever the mask; on CUDA its scaled dot-product
    /// attention told `enable_gqa`, in half precision over the causal mask with no bias and heads
    /// of at most 128 (cuDNN's kernels or flash attention's, as for PyTorch's step, whose
    /// transformers attention passes `enable_gqa` over rows without padding). Elsewhere on CUDA
    /// (a bias, which only the memory-efficient kernel takes, or f32, which flash attention does
    /// not) no fused kernel has groups and torch would fall back to its operation-by-operation
    /// form, so there `k` and `v` are repeated.
    pub(crate) fn takes_groups(q: &TchTensor, k: &TchTensor, bias: &Bias) -> bool {
        let q = &q.tensor;
        let grouped = k.tensor.size()[1] != q.size()[1];
        let cuda_groups = || bias.causal && bias.tensor.is_none() && matches!(q.kind(), Kind::BFloat16 | Kind::Half) && q.size().last().is_some_and(|&dh| dh <= 128);
        grouped && (q.device() == Device::Cpu || cuda_groups())
    }

    /// A forward pass whose kernel took grouped keys and values as they are.
    fn count_grouped(q: &Tensor, k: &Tensor) {
        if k.size()[1] != q.size()[1] {
            super::GROUPED_KERNELS.with(|n| n.set(n.get() + 1));
        }
    }

    /// `softmax(scale·q·kᵀ + bias)·v` by torch's SDPA (told `is_causal` where there is no bias,
    /// and `enable_gqa` where `k` and `v` are grouped), on the CPU by its flash kernel told where
    /// the mask is causal; `None` where torch refuses the inputs.
    pub(crate) fn forward(q: &TchTensor, k: &TchTensor, v: &TchTensor, bias: &Bias, scale: f32) -> Option<TchTensor> {
        let (q, k, v) = (&q.tensor, &k.tensor, &v.tensor);
        let scale = Some(f64::from(scale));
        if bias.causal
            && q.device() == Device::Cpu
            && let Ok((out, _)) = Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, true, bias.tensor.as_ref(), scale)
        {
            count_grouped(q, k);
            return Some(TchTensor::new(out));
        }
        let (causal, groups) = (bias.tensor.is_none(), k.size()[1] != q.size()[1]);
        let out = Tensor::f_scaled_dot_product_attention(q, k, v, bias.tensor.as_ref(), 0.0, causal, scale, groups).ok()?;
        count_grouped(q, k);
        Some(TchTensor::new(out))
    }

    /// What the backward pass takes from the forward pass, and whether its kernel took the keys
    /// and values grouped (then so does the backward's, and `dk` and `dv` come back grouped).
    #[derive(Clone, Debug)]
    pub struct Kept {
        record: Record,
        pub(crate) grouped: bool,
    }

    #[derive(Clone, Debug)]
    enum Record {
        /// A fused kernel's output and row log-sum-exp, the mask as its forward pass took it, and
        /// on CUDA the kernel's random-number seed and offset (unread without dropout).
        Fused { out: TchTensor, lse: TchTensor, bias: Bias, philox: Option<(TchTensor, TchTensor)> },
        /// torch's own autograd record of its scaled dot-product attention: the output that
        /// carries it, and the inputs it differentiates.
        Graph { out: TchTensor, inputs: [TchTensor; 3] },
    }

    /// The forward pass through torch's fused kernel of the device, and what its backward takes;
    /// `None` where there is none or it refuses the inputs. `k` and `v` may be grouped where
    /// [`takes_groups`] says the kernels take them so.
    ///
    /// Over rows without padding (the causal mask and nothing more), torch's scaled dot-product
    /// attention with `is_causal`, recorded by torch's own autograd: torch picks the kernels both
    /// ways as it does for PyTorch's step (on an H200 cuDNN's, whose forward tch 0.22 does not
    /// bind), and its record keeps what their backward takes.
    pub(crate) fn forward_keeping(q: &TchTensor, k: &TchTensor, v: &TchTensor, bias: &Bias, scale: f32) -> Option<(TchTensor, Kept)> {
        if bias.causal
            && bias.tensor.is_none()
            && let Some(recorded) = forward_recorded(q, k, v, scale)
        {
            count_causal(true);
            return Some(recorded);
        }
        let (q, k, v) = (&q.tensor, &k.tensor, &v.tensor);
        let (scale, causal, grouped) = (Some(f64::from(scale)), bias.causal, k.size()[1] != q.size()[1]);
        let (out, lse, philox) = match q.device() {
            Device::Cpu => {
                let (out, lse) = Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, bias.tensor.as_ref(), scale).ok()?;
                (out, lse, None)
            }
            // The memory-efficient kernel has no groups.
            Device::Cuda(_) if !grouped => {
                let (out, lse, seed, offset) = Tensor::f_internal_scaled_dot_product_efficient_attention(q, k, v, bias.tensor.as_ref(), true, 0.0, causal, scale).ok()?;
                (out, lse, Some((TchTensor::new(seed), TchTensor::new(offset))))
            }
            _ => return None,
        };
        if causal {
            count_causal(bias.tensor.is_none());
        }
        count_grouped(q, k);
        let out = TchTensor::new(out);
        Some((out.clone(), Kept { record: Record::Fused { out, lse: TchTensor::new(lse), bias: bias.clone(), philox }, grouped }))
    }

    /// A forward pass whose kernel was told the mask is causal (`unbiased`: with no bias).
    fn count_causal(unbiased: bool) {
        super::CAUSAL_KERNELS.with(|n| {
            let (told, none) = n.get();
            n.set((told + 1, none + usize::from(unbiased)));
        });
    }

    /// `softmax(scale·q·kᵀ, causal)·v` under torch's autograd, on leaves that share `q`, `k` and
    /// `v`'s memory (`k` and `v` grouped or not: `enable_gqa`); `None` where torch refuses the
    /// inputs or records nothing (its grad mode off).
    fn forward_recorded(q: &TchTensor, k: &TchTensor, v: &TchTensor, scale: f32) -> Option<(TchTensor, Kept)> {
        let inputs = [q, k, v].map(crate::torch_leaf);
        let [lq, lk, lv] = &inputs;
        let grouped = k.tensor.size()[1] != q.tensor.size()[1];
        let out = tch::with_grad(|| Tensor::f_scaled_dot_product_attention(&lq.tensor, &lk.tensor, &lv.tensor, None::<&Tensor>, 0.0, true, Some(f64::from(scale)), grouped)).ok()?;
        if !out.requires_grad() {
            return None;
        }
        let out = TchTensor::new(out);
        let shown = crate::torch_shown(&out);
        count_grouped(&q.tensor, &k.tensor);
        Some((shown, Kept { record: Record::Graph { out, inputs }, grouped }))
    }

    /// `(dq, dk, dv)` through the fused kernel's backward, from what its forward pass kept; `None`
    /// where it refuses the inputs (the caller recomputes with burn operations).
    pub(crate) fn backward_kept(q: &TchTensor, k: &TchTensor, v: &TchTensor, scale: f32, dout: &TchTensor, kept: &Kept) -> Option<(TchTensor, TchTensor, TchTensor)> {
        let (q, k, v, dout) = (&q.tensor, &k.tensor, &v.tensor, &dout.tensor);
        let (out, lse, bias, philox) = match &kept.record {
            Record::Fused { out, lse, bias, philox } => (&out.tensor, &lse.tensor, bias, philox),
            Record::Graph { out, inputs } => return backward_recorded(out, inputs, dout),
        };
        let (causal, bias) = (bias.causal, bias.tensor.as_ref());
        let scale = Some(f64::from(scale));
        let (dq, dk, dv) = match (q.device(), philox) {
            (Device::Cpu, None) => Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, causal, bias, scale).ok()?,
            (Device::Cuda(_), Some((seed, offset))) => {
                // The kernel's backward takes [B, T, H, Dh] (what PyTorch's
                // `_scaled_dot_product_efficient_attention_backward` hands it), and the causal
                // mask as its `custom_mask_type` 1 (top left), as that function passes it.
                let t = |x: &Tensor| x.transpose(1, 2);
                let (tq, tk) = (q.size()[2], k.size()[2]);
                let (dq, dk, dv, _) = Tensor::f_internal_efficient_attention_backward(
                    &t(dout),
                    &t(q),
                    &t(k),
                    &t(v),
                    bias,
                    &t(out),
                    None,
                    None,
                    tq,
                    tk,
                    lse,
                    0.0,
                    &seed.tensor,
                    &offset.tensor,
                    i64::from(causal),
                    false,
                    scale,
                    None,
                    None,
                    false,
                )
                .ok()?;
                (t(&dq), t(&dk), t(&dv))
            }
            _ => return None,
        };
        super::FUSED_BACKWARD.fetch_add(1, Ordering::Relaxed);
        Some((TchTensor::new(dq), TchTensor::new(dk), TchTensor::new(dv)))
    }

    /// `(dq, dk, dv)` from torch's record of the forward pass (`crate::torch_vjp`).
    fn backward_recorded(out: &TchTensor, inputs: &[TchTensor; 3], dout: &Tensor) -> Option<(TchTensor, TchTensor, TchTensor)> {
        let [dq, dk, dv] = crate::torch_vjp(&out.tensor, dout, inputs.each_ref().map(|x| &x.tensor))?;
        super::FUSED_BACKWARD.fetch_add(1, Ordering::Relaxed);
        Some((TchTensor::new(dq), TchTensor::new(dk), TchTensor::new(dv)))
    }

    /// `(dq, dk, dv)` with nothing kept: the fused forward run again for its output and
    /// log-sum-exp, then its backward.
    pub(crate) fn backward(q: &TchTensor, k: &TchTensor, v: &TchTensor, bias: &Bias, scale: f32, dout: &TchTensor) -> Option<(TchTensor, TchTensor, TchTensor)> {
        let (_, kept) = forward_keeping(q, k, v, bias, scale)?;
        super::FORWARD_RERUNS.fetch_add(1, Ordering::Relaxed);
        backward_kept(q, k, v, scale, dout, &kept)
    }
}

/// `k` or `v` `[B, Hkv, T, Dh]` repeated to `heads` heads, each key/value head serving
/// `heads / Hkv` query heads in turn (transformers' `repeat_kv`).
fn widen<B: Backend>(x: FloatTensor<B>, heads: usize) -> FloatTensor<B> {
    let s = x.shape();
    let (b, h_kv, t, dh) = (s[0], s[1], s[2], s[3]);
    if h_kv == heads {
        return x;
    }
    let x = B::float_reshape(x, Shape::new([b, h_kv, 1, t, dh]));
    let x = B::float_expand(x, Shape::new([b, h_kv, heads / h_kv, t, dh]));
    B::float_reshape(x, Shape::new([b, heads, t, dh]))
}

/// The gradient of a [`widen`]ed tensor, summed back over each key/value head's group.
fn narrow_grad<B: Backend>(g: FloatTensor<B>, h_kv: usize) -> FloatTensor<B> {
    let s = g.shape();
    let (b, heads, t, dh) = (s[0], s[1], s[2], s[3]);
    if heads == h_kv {
        return g;
    }
    let g = B::float_sum_dim(B::float_reshape(g, Shape::new([b, h_kv, heads / h_kv, t, dh])), 2);
    B::float_reshape(g, Shape::new([b, h_kv, t, dh]))
}

/// A mask `[B, 1, Tq, Tk]` read by every one of `heads` heads through a stride of 0.
fn mask_heads<B: Backend>(mask: BoolTensor<B>, heads: usize) -> BoolTensor<B> {
    let s = mask.shape();
    if s[1] == heads {
        return mask;
    }
    B::bool_expand(mask, Shape::new([s[0], heads, s[2], s[3]]))
}

/// Autodiff: the inner backend's attention, recorded as one operation whose state is the inputs
/// and what the inner backend kept ([`KeptAttention`]).
/// Grouped keys and values and a mask over one head go to the inner backend as they are, so that
/// the repetition costs no recorded operations (six, and as many in the backward pass, written as
/// tensor operations) and the backward pass keeps the narrow `k` and `v`.
impl<B: Backend + KeptAttention, C: CheckpointStrategy> MaskedAttentionBackend for Autodiff<B, C> {
    fn masked_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, mask: BoolTensor<Self>, scale: f32) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct MaskedAttention;

        impl<B: Backend + KeptAttention> Backward<B, 3> for MaskedAttention {
            type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, BoolTensor<B>, f32, Option<B::Kept>);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_q, node_k, node_v] = ops.parents;
                let dout = grads.consume::<B>(&ops.node);
                let (q, k, v, mask, scale, kept) = ops.state;
                let (dq, dk, dv) = B::masked_attention_backward_kept(q, k, v, mask, scale, dout, kept);
                for (node, grad) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        let (qp, kp, vp) = (q.primitive().clone(), k.primitive().clone(), v.primitive().clone());
        match MaskedAttention.prepare::<C>([q.node(), k.node(), v.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, kept) = B::masked_attention_keeping(qp.clone(), kp.clone(), vp.clone(), mask.clone(), scale);
                prep.finish((qp, kp, vp, mask, scale, kept), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::masked_attention(qp, kp, vp, mask, scale)),
        }
    }
}

/// Where the extension has a body: every backend this project builds.
const REACH: crate::Reach = crate::Reach { flex: true, libtorch: true, cube: true };

/// Calls of the extension in this process (for the tests that check it ran).
static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How often [`masked_attention`] ran through the backend extension in this process.
pub fn masked_attention_calls() -> usize {
    CALLS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Backward passes that ran through a fused body: libtorch's attention kernels, or flex's loop.
static FUSED_BACKWARD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Backward passes on libtorch that ran the fused forward kernel again (nothing kept from the forward pass).
static FORWARD_RERUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many backward passes of [`masked_attention`] on libtorch ran torch's fused attention
/// forward again because the forward pass kept nothing (for the tests that check it kept).
pub fn fused_attention_forward_reruns() -> usize {
    FORWARD_RERUNS.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(feature = "tch")]
thread_local! {
    /// Forward passes on libtorch, on this thread, whose fused kernel was told the mask is causal,
    /// and how many of them took no bias.
    static CAUSAL_KERNELS: std::cell::Cell<(usize, usize)> = const { std::cell::Cell::new((0, 0)) };
    /// Forward passes on libtorch, on this thread, whose kernel took grouped keys and values as
    /// they are.
    static GROUPED_KERNELS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many forward passes of [`masked_attention`] on libtorch, on the calling thread, ran a
/// kernel of torch's that took grouped keys and values (fewer key/value heads than query heads)
/// as they are, with no copy repeating them to the query heads (for the tests that check where
/// they do); 0 without the `tch` feature.
pub fn grouped_attention_kernels() -> usize {
    #[cfg(feature = "tch")]
    return GROUPED_KERNELS.with(std::cell::Cell::get);
    #[cfg(not(feature = "tch"))]
    0
}

/// How many forward passes of [`masked_attention`] under autodiff on libtorch, on the calling
/// thread, told torch's fused kernel that the mask is causal, so that it skipped the blocks after
/// each query, and how many of those took no bias, the mask being the causal mask and nothing
/// more (for the tests that check which masks do; per thread, so that tests running beside them
/// do not count); `(0, 0)` without the `tch` feature.
pub fn causal_attention_kernels() -> (usize, usize) {
    #[cfg(feature = "tch")]
    return CAUSAL_KERNELS.with(std::cell::Cell::get);
    #[cfg(not(feature = "tch"))]
    (0, 0)
}

/// How many backward passes of [`masked_attention`] ran through a fused body in this process:
/// libtorch's attention kernels, or flex's loop (for the tests that check which path ran).
pub fn fused_attention_backward_calls() -> usize {
    FUSED_BACKWARD.load(std::sync::atomic::Ordering::Relaxed)
}

/// `softmax(scale·q·kᵀ, masked)·v` (`mask` true where a query must not look; no row fully
/// masked) through the extension where the backend has it, and `None` where it does not (the
/// caller takes burn's attention). See the module docs.
///
/// `q` is `[B, H, Tq, Dh]`; `k` and `v` are `[B, Hkv, Tk, Dh]` with `H` a multiple of `Hkv`
/// (grouped-query attention; each key/value head serves `H / Hkv` query heads in turn); `mask` is
/// `[B, H, Tq, Tk]` or `[B, 1, Tq, Tk]` (every head alike).
pub fn masked_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: Tensor<4, Bool>, scale: f32) -> Option<Tensor<4>> {
    let kind = q.clone().into_dispatch().kind;
    if !crate::extended(&kind, REACH) {
        return None;
    }
    CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (q, k, v, mask) = (q.into_dispatch(), k.into_dispatch(), v.into_dispatch(), mask.into_dispatch());
    let out = <Dispatch as MaskedAttentionBackend>::masked_attention(q, k, v, mask, scale);
    Some(Tensor::from_dispatch(out))
}

#[cfg(all(test, feature = "flex"))]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::backend::ops::{BoolTensorOps, FloatTensorOps};
    use burn::tensor::{Shape, TensorData};

    use super::*;
    use crate::cpu::flex::testing::{values, wave};

    /// Sizes (batch, query heads, key/value heads, Dh).
    const B: usize = 2;
    const H: usize = 6;
    const H_KV: usize = 2;
    const DH: usize = 8;

    fn close(name: &str, ours: &FlexTensor, ops: &FlexTensor) {
        let (a, b) = (values(ours), values(ops));
        assert_eq!(ours.layout().shape(), ops.layout().shape(), "{name}");
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{name}: {x} against {y}");
        }
    }

    /// A causal mask over the last `tq` of `tk` positions, with the second sequence's first two
    /// keys padding (except for a query's own key); `[B, 1, tq, tk]`.
    fn mask(tq: usize, tk: usize) -> FlexTensor {
        let past = tk - tq;
        let masked: Vec<bool> = (0..B * tq * tk)
            .map(|n| {
                let (b, i, j) = (n / (tq * tk), n / tk % tq, n % tk);
                j > i + past || (b == 1 && j < 2 && j != i + past)
            })
            .collect();
        FlexTensor::from_data(TensorData::new(masked, [B, 1, tq, tk]))
    }

    /// A mask of its own for each head, `[B, H, tq, tk]`: causal, and head `h` also hides the
    /// `H − 1 − h` keys up to a query's own, except the first key, so that each head's rows reach a
    /// different number of keys, the first head's fewest; the second sequence's second key is padding.
    fn mask_per_head(tq: usize, tk: usize) -> FlexTensor {
        let past = tk - tq;
        let masked: Vec<bool> = (0..B * H * tq * tk)
            .map(|n| {
                let (b, h, i, j) = (n / (H * tq * tk), n / (tq * tk) % H, n / tk % tq, n % tk);
                j > i + past || (j > 0 && j + (H - 1 - h) > i + past) || (b == 1 && j == 1)
            })
            .collect();
        FlexTensor::from_data(TensorData::new(masked, [B, H, tq, tk]))
    }

    /// The flex loops against the tensor-operation bodies (repeated heads, burn-flex's attention and
    /// the recomputing backward), with `q` a transposed view as the models make it, grouped keys
    /// and values, and a mask over one head or one for each: within one block of query rows, and
    /// over three blocks (the last one partial) that each reach a different number of keys.
    #[test]
    fn the_flex_loops_match_the_tensor_operations() {
        for (tq, tk, per_head) in [(5, 9, false), (2 * flex::BLOCK + 22, 2 * flex::BLOCK + 32, false), (2 * flex::BLOCK + 22, 2 * flex::BLOCK + 32, true)] {
            let q = FlexTensor::from_data(TensorData::new(wave(B * tq * H * DH, 1, 2.0), [B, tq, H, DH]));
            let q = Flex::float_swap_dims(q, 1, 2);
            assert!(q.as_slice::<f32>().is_none(), "q is a strided view");
            let [k, v] = [2, 3].map(|seed| FlexTensor::from_data(TensorData::new(wave(B * H_KV * tk * DH, seed, 2.0), [B, H_KV, tk, DH])));
            let dout = FlexTensor::from_data(TensorData::new(wave(B * H * tq * DH, 4, 1.0), [B, H, tq, DH]));
            let (mask, scale) = (if per_head { mask_per_head(tq, tk) } else { mask(tq, tk) }, 0.35);

            let ours = flex::forward(&q, &k, &v, &mask, scale).expect("in reach");
            close("out", &ours, &tensor_ops::<Flex>(q.clone(), k.clone(), v.clone(), mask.clone(), scale));
            let (dq, dk, dv) = flex::backward(&q, &k, &v, &mask, scale, &dout).expect("in reach");
            let (dq_ops, dk_ops, dv_ops) = tensor_ops_backward::<Flex>(q, k, v, mask, scale, dout);
            close("dq", &dq, &dq_ops);
            close("dk", &dk, &dk_ops);
            close("dv", &dv, &dv_ops);
        }
    }

    /// A query whose keys are all masked gets zeros, and passes no gradient on: alone in a block
    /// with a query that sees a key, and as a whole block of such queries before one that does.
    #[test]
    fn a_fully_masked_row_gives_zeros() {
        for masked_rows in [1, flex::BLOCK] {
            // The masked queries, then one that sees the first key alone; three keys, Dh 3.
            let rows = masked_rows + 1;
            let data = |rows: usize, seed| FlexTensor::from_data(TensorData::new(wave(rows * 3, seed, 1.0), [1, 1, rows, 3]));
            let (q, k, v, dout) = (data(rows, 1), data(3, 2), data(3, 3), data(rows, 4));
            let masked: Vec<bool> = (0..rows * 3).map(|n| n / 3 < masked_rows || n % 3 != 0).collect();
            let mask = Flex::bool_from_data(TensorData::new(masked, Shape::new([1, 1, rows, 3])), &Default::default());
            let out = values(&flex::forward(&q, &k, &v, &mask, 1.0).expect("in reach"));
            let seen = 3 * masked_rows;
            assert!(out[..seen].iter().all(|&x| x == 0.0), "the masked rows");
            assert_eq!(&out[seen..], &values(&v)[..3], "the last query sees the first key alone");
            let (dq, dk, dv) = flex::backward(&q, &k, &v, &mask, 1.0, &dout).expect("in reach");
            assert!(values(&dq)[..seen].iter().all(|&x| x == 0.0));
            assert!(values(&dk).iter().chain(&values(&dv)).all(|x| x.is_finite()));
            // Only the seen key gets a value gradient: the last query's output gradient.
            assert_eq!(&values(&dv)[..3], &values(&dout)[seen..]);
            assert!(values(&dv)[3..].iter().all(|&x| x == 0.0));
        }
    }
}
