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
//! The forward pass is the backend's own attention (flex: its flash kernel with the boolean mask;
//! libtorch: its scaled dot-product attention with the mask as a 0 / −∞ bias; the cubecl backends:
//! their attention with the boolean mask, which with an explicit scale is burn's kernel-by-kernel
//! form, its temporaries freed as soon as the layer's output is made).

// burn-tch is marked deprecated upstream; it is still the libtorch backend of burn 0.22.
#![cfg_attr(feature = "tch", allow(deprecated))]

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::AttentionModuleOptions;
use burn::backend::tensor::{BoolTensor, FloatTensor};
use burn::backend::{Autodiff, Backend, Dispatch, backend_extension};
use burn::tensor::{Bool, Tensor};

/// Attention with a boolean mask (`true`: the query does not look at that key), differentiable
/// with respect to `q`, `k` and `v` by recomputation. On flex, libtorch and (with the `cube`
/// feature) the cubecl backends.
#[backend_extension(Autodiff, Flex: cfg(feature = "flex"), LibTorch: cfg(feature = "tch"), Cube: cfg(feature = "cube"))]
pub trait MaskedAttentionBackend: Backend {
    /// `softmax(scale·q·kᵀ, masked)·v` for `q` `[B, H, Tq, Dh]`, `k` and `v` `[B, H, Tk, Dh]` and
    /// `mask` `[B, H, Tq, Tk]`.
    /// The default is the backend's attention with the boolean mask as burn means it (no
    /// `[B, H, Tq, Tk]` bias is made).
    fn masked_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, mask: BoolTensor<Self>, scale: f32) -> FloatTensor<Self> {
        Self::attention(q, k, v, Some(mask), None, options(scale))
    }

    /// The gradients `(dq, dk, dv)` of [`Self::masked_attention`] for the output gradient `dout`.
    fn masked_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        scale: f32,
        dout: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        backward_with::<Self>(q, k, v, mask, scale, dout, Self::float_matmul)
    }
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
    let dv = mm(B::float_transpose(p.clone()), dout.clone());
    let dp = mm(dout, B::float_transpose(v));
    let row = B::float_sum_dim(B::float_mul(dp.clone(), p.clone()), 3);
    let ds = B::float_mul_scalar(B::float_mul(p, B::float_sub(dp, row)), scale.into());
    let dq = mm(ds.clone(), k);
    let dk = mm(B::float_transpose(ds), q);
    (dq, dk, dv)
}

fn options(scale: f32) -> AttentionModuleOptions {
    AttentionModuleOptions { scale: Some(f64::from(scale)), softcap: None, is_causal: false }
}

/// flex: the default bodies (its flash kernel reads the boolean mask through the heads' stride 0).
#[cfg(feature = "flex")]
impl MaskedAttentionBackend for burn::backend::Flex {}

/// The cubecl backends (wgpu, Vulkan, Metal, CUDA): the default bodies, except for f32 on a device
/// whose matmul would round f32 to TF32 (CUDA): there the attention is formed kernel by kernel with
/// the f32 product of [`crate::matmul`], forward and backward.
#[cfg(feature = "cube")]
impl MaskedAttentionBackend for burn::backend::Cube {
    fn masked_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, mask: BoolTensor<Self>, scale: f32) -> FloatTensor<Self> {
        use burn::backend::ops::ModuleOps;
        if !crate::matmul::cube::rounds_f32(&q) {
            return Self::attention(q, k, v, Some(mask), None, options(scale));
        }
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
        backward_with::<Self>(q, k, v, mask, scale, dout, crate::matmul::cube::matmul)
    }
}

/// libtorch: the mask as an additive bias, since burn-tch 0.22.1 hands a boolean mask to torch's
/// SDPA, which reads `true` as "attend", the opposite of burn's convention.
#[cfg(feature = "tch")]
impl MaskedAttentionBackend for burn::backend::LibTorch {
    fn masked_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, mask: BoolTensor<Self>, scale: f32) -> FloatTensor<Self> {
        use burn::backend::TensorMetadata;
        use burn::backend::ops::{FloatTensorOps, ModuleOps};
        let bias = Self::float_zeros(mask.shape(), &q.device(), q.dtype().into());
        let bias = Self::float_mask_fill(bias, mask, f32::NEG_INFINITY.into());
        Self::attention(q, k, v, None, Some(bias), options(scale))
    }
}

/// Autodiff: the inner backend's attention, recorded with a backward step whose state is the inputs.
impl<B: Backend + MaskedAttentionBackend, C: CheckpointStrategy> MaskedAttentionBackend for Autodiff<B, C> {
    fn masked_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, mask: BoolTensor<Self>, scale: f32) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct MaskedAttention;

        impl<B: Backend + MaskedAttentionBackend> Backward<B, 3> for MaskedAttention {
            type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, BoolTensor<B>, f32);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_q, node_k, node_v] = ops.parents;
                let dout = grads.consume::<B>(&ops.node);
                let (q, k, v, mask, scale) = ops.state;
                let (dq, dk, dv) = B::masked_attention_backward(q, k, v, mask, scale, dout);
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
                let out = B::masked_attention(qp.clone(), kp.clone(), vp.clone(), mask.clone(), scale);
                prep.finish((qp, kp, vp, mask, scale), out)
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

/// `softmax(scale·q·kᵀ, masked)·v` (`mask` true where a query must not look; no row fully
/// masked) through the extension where the backend has it, and `None` where it does not (the
/// caller takes burn's attention). See the module docs.
pub fn masked_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: Tensor<4, Bool>, scale: f32) -> Option<Tensor<4>> {
    if !crate::extended(&q.clone().into_dispatch().kind, REACH) {
        return None;
    }
    CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = <Dispatch as MaskedAttentionBackend>::masked_attention(q.into_dispatch(), k.into_dispatch(), v.into_dispatch(), mask.into_dispatch(), scale);
    Some(Tensor::from_dispatch(out))
}
