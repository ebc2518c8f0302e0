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
//! On libtorch both passes are torch's fused kernels instead (the `libtorch` module below). Elsewhere
//! the forward pass is the backend's own attention (flex: its flash kernel with the boolean mask; the cubecl backends:
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
use burn::backend::{Autodiff, Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::{Bool, Shape, Tensor};

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

/// libtorch: torch's own fused attention, forward and backward (the `libtorch` module below), with the mask as
/// an additive bias; the recomputing backward of the other backends where torch's kernels decline.
#[cfg(feature = "tch")]
impl MaskedAttentionBackend for burn::backend::LibTorch {
    fn masked_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, mask: BoolTensor<Self>, scale: f32) -> FloatTensor<Self> {
        use burn::backend::ops::ModuleOps;
        let bias = libtorch::bias(&mask, q.tensor.kind());
        match libtorch::forward(&q, &k, &v, &bias, scale) {
            Some(out) => out,
            None => Self::attention(q, k, v, None, Some(burn::backend::libtorch::TchTensor::new(bias)), options(scale)),
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
        let bias = libtorch::bias(&mask, q.tensor.kind());
        if let Some(grads) = libtorch::backward(&q, &k, &v, &bias, scale, &dout) {
            return grads;
        }
        backward_with::<Self>(q, k, v, mask, scale, dout, <Self as burn::backend::ops::FloatTensorOps<Self>>::float_matmul)
    }
}

/// Attention through torch's kernels. burn-tch 0.22.1 runs an attention with a bias as burn's
/// operation-by-operation fallback (scores, softmax and product as separate kernels, the
/// `[B, H, Tq, Tk]` scores in memory), and hands a boolean mask to torch's SDPA, which reads `true`
/// as "attend", the opposite of burn's convention. Here the forward pass is one call of
/// `scaled_dot_product_attention` with the mask as a 0 / −∞ bias, and the backward pass recomputes
/// the output and its row log-sum-exp with torch's fused kernel and calls that kernel's backward,
/// as PyTorch's autograd does (which keeps them from the forward pass instead): on the CPU
/// `_scaled_dot_product_flash_attention_for_cpu`, on CUDA `_scaled_dot_product_efficient_attention`
/// and `_efficient_attention_backward`. Each is a handful of host calls where the composed form is
/// a dozen, which is what a small model's step on a GPU waits on.
#[cfg(feature = "tch")]
pub(crate) mod libtorch {
    use std::cell::RefCell;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use burn::backend::libtorch::TchTensor;
    use tch::{Device, Kind, Tensor};

    thread_local! {
        /// The last mask and its bias. Every layer of a forward and backward pass gets the same
        /// mask (the models build it once per pass), so the bias is built once, not once per layer
        /// and pass. The held clone of the mask keeps burn from writing its buffer in place (burn
        /// writes only buffers nothing else holds), so a mask with the same buffer, sizes and
        /// strides is the same mask.
        static BIAS: RefCell<Option<(TchTensor, Kind, Tensor)>> = const { RefCell::new(None) };
    }

    /// Backward passes that ran through torch's fused kernels, in this process.
    pub(crate) static FUSED_BACKWARD: AtomicUsize = AtomicUsize::new(0);

    /// The additive bias of a boolean mask (`true`: −∞), of the attention's float kind.
    pub(crate) fn bias(mask: &TchTensor, kind: Kind) -> Tensor {
        let m = &mask.tensor;
        let same = |held: &TchTensor| held.tensor.data_ptr() == m.data_ptr() && held.tensor.size() == m.size() && held.tensor.stride() == m.stride() && held.tensor.device() == m.device();
        BIAS.with(|cell| {
            let mut cell = cell.borrow_mut();
            if let Some((held, k, bias)) = cell.as_ref()
                && *k == kind
                && same(held)
            {
                return bias.shallow_clone();
            }
            let bias = build(m, kind);
            *cell = Some((mask.clone(), kind, bias.shallow_clone()));
            bias
        })
    }

    /// The bias over one head when the heads read one mask (a stride of 0), expanded to all of
    /// them; its rows padded to a multiple of 16 elements, which CUDA's memory-efficient kernel
    /// requires of a bias (PyTorch's SDPA pads it the same way).
    fn build(m: &Tensor, kind: Kind) -> Tensor {
        let size = m.size();
        let shared_heads = size.len() == 4 && size[1] > 1 && m.stride()[1] == 0;
        let one = if shared_heads { m.narrow(1, 0, 1) } else { m.shallow_clone() };
        let mut padded = one.size();
        let Some(last) = padded.last_mut() else { return Tensor::zeros(&size, (kind, m.device())) };
        let tk = *last;
        *last = (tk + 15) / 16 * 16;
        let mut bias = Tensor::zeros(&padded, (kind, m.device())).narrow(-1, 0, tk);
        let _ = bias.masked_fill_(&one, f64::NEG_INFINITY);
        bias.expand(&size, false)
    }

    /// `softmax(scale·q·kᵀ + bias)·v` by torch's SDPA; `None` where torch refuses the inputs.
    pub(crate) fn forward(q: &TchTensor, k: &TchTensor, v: &TchTensor, bias: &Tensor, scale: f32) -> Option<TchTensor> {
        Tensor::f_scaled_dot_product_attention(&q.tensor, &k.tensor, &v.tensor, Some(bias), 0.0, false, Some(f64::from(scale)), false).ok().map(TchTensor::new)
    }

    /// `(dq, dk, dv)` through torch's fused kernel of the device; `None` where there is none or
    /// it refuses the inputs (the caller recomputes with burn operations).
    pub(crate) fn backward(q: &TchTensor, k: &TchTensor, v: &TchTensor, bias: &Tensor, scale: f32, dout: &TchTensor) -> Option<(TchTensor, TchTensor, TchTensor)> {
        let (q, k, v, dout) = (&q.tensor, &k.tensor, &v.tensor, &dout.tensor);
        let scale = Some(f64::from(scale));
        let (dq, dk, dv) = match q.device() {
            Device::Cpu => {
                let (out, lse) = Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, false, Some(bias), scale).ok()?;
                Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, &out, &lse, 0.0, false, Some(bias), scale).ok()?
            }
            Device::Cuda(_) => {
                let (out, lse, seed, offset) = Tensor::f_internal_scaled_dot_product_efficient_attention(q, k, v, Some(bias), true, 0.0, false, scale).ok()?;
                // The kernel's backward takes [B, T, H, Dh] (what PyTorch's
                // `_scaled_dot_product_efficient_attention_backward` hands it).
                let t = |x: &Tensor| x.transpose(1, 2);
                let (tq, tk) = (q.size()[2], k.size()[2]);
                let (dq, dk, dv, _) = Tensor::f_internal_efficient_attention_backward(
                    &t(dout), &t(q), &t(k), &t(v), Some(bias), &t(&out), None, None, tq, tk, &lse, 0.0, &seed, &offset, 0, false, scale, None, None, false,
                )
                .ok()?;
                (t(&dq), t(&dk), t(&dv))
            }
            _ => return None,
        };
        FUSED_BACKWARD.fetch_add(1, Ordering::Relaxed);
        Some((TchTensor::new(dq), TchTensor::new(dk), TchTensor::new(dv)))
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

/// Autodiff: the inner backend's attention, recorded as one operation whose state is the inputs.
/// Grouped keys and values and a mask over one head are widened inside it, so that the repetition
/// costs no recorded operations (six, and as many in the backward pass, written as tensor
/// operations) and the backward pass keeps the narrow `k` and `v`.
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
                let (heads, h_kv) = (q.shape()[1], k.shape()[1]);
                let (k, v, mask) = (widen::<B>(k, heads), widen::<B>(v, heads), mask_heads::<B>(mask, heads));
                let (dq, dk, dv) = B::masked_attention_backward(q, k, v, mask, scale, dout);
                let (dk, dv) = (narrow_grad::<B>(dk, h_kv), narrow_grad::<B>(dv, h_kv));
                for (node, grad) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        let (qp, kp, vp) = (q.primitive().clone(), k.primitive().clone(), v.primitive().clone());
        let heads = qp.shape()[1];
        let run = |k: &FloatTensor<B>, v: &FloatTensor<B>, mask: &BoolTensor<B>| {
            B::masked_attention(qp.clone(), widen::<B>(k.clone(), heads), widen::<B>(v.clone(), heads), mask_heads::<B>(mask.clone(), heads), scale)
        };
        match MaskedAttention.prepare::<C>([q.node(), k.node(), v.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = run(&kp, &vp, &mask);
                prep.finish((qp, kp, vp, mask, scale), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(run(&kp, &vp, &mask)),
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

/// How many backward passes of [`masked_attention`] ran through libtorch's fused attention kernels
/// in this process (0 without the `tch` feature).
pub fn fused_attention_backward_calls() -> usize {
    #[cfg(feature = "tch")]
    return libtorch::FUSED_BACKWARD.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(feature = "tch"))]
    0
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
    // Under autodiff the recorded operation widens grouped heads itself; the backends' bodies take
    // every head.
    let (k, v, mask) = match kind {
        burn::backend::DispatchTensorKind::Autodiff(_) => (k, v, mask),
        _ => {
            let heads = q.shape()[1];
            (widen::<Dispatch>(k, heads), widen::<Dispatch>(v, heads), mask_heads::<Dispatch>(mask, heads))
        }
    };
    let out = <Dispatch as MaskedAttentionBackend>::masked_attention(q, k, v, mask, scale);
    Some(Tensor::from_dispatch(out))
}
