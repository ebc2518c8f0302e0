//! RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467) as one differentiable operation, with burn's
//! `RmsNorm` rounding (the mean square in f32, the input divided by the root cast back):
//!
//! ```text
//! r = √(mean(x²) + ε),   x̂ = x / r,   y = x̂ · γ
//! ∂L/∂x = (g − x̂ · mean(g · x̂)) / r   with g = dy · γ,      ∂L/∂γ = Σ_rows dy · x̂
//! ```
//!
//! burn's `RmsNorm` is about seven recorded operations whose backward pass is twice as many; a
//! Llama-family model normalises twice in every layer. Here it is one recorded operation whose
//! backward pass recomputes `r` and applies the formula above; on libtorch both passes are direct
//! torch calls. On a GPU, where a small model's step waits on the host issuing operations, that
//! is a few hundred operations fewer a step.

// burn-tch is marked deprecated upstream; it is still the libtorch backend of burn 0.22.
#![cfg_attr(feature = "tch", allow(deprecated))]

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::{DType, FloatDType, Shape, Tensor};

/// RMSNorm over the last dimension of `x`, scaled by `gamma` `[D]`, differentiable with respect to
/// both.
#[backend_extension(Autodiff, Flex: cfg(feature = "flex"), LibTorch: cfg(feature = "tch"), Cube: cfg(feature = "cube"))]
pub trait RmsNormBackend: Backend {
    /// `x / √(mean(x²) + ε) · γ`.
    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let gamma = broadcast::<Self>(gamma, &x);
        Self::float_mul(normalized::<Self>(x, eps).0, gamma)
    }

    /// The gradients `(dx, dγ)` of [`Self::rms_norm`] for the output gradient `dy`.
    fn rms_norm_backward(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f64, dy: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let d = gamma.shape()[0];
        let last = x.shape().num_dims() - 1;
        let gamma = broadcast::<Self>(gamma, &x);
        let (xh, r) = normalized::<Self>(x, eps);
        let rows = Self::float_reshape(Self::float_mul(dy.clone(), xh.clone()), Shape::new([dy.shape().num_elements() / d, d]));
        let dgamma = Self::float_reshape(Self::float_sum_dim(rows, 0), Shape::new([d]));
        let g = Self::float_mul(dy, gamma);
        let dot = Self::float_mean_dim(Self::float_mul(g.clone(), xh.clone()), last);
        let dx = Self::float_div(Self::float_sub(g, Self::float_mul(xh, dot)), r);
        (dx, dgamma)
    }
}

/// `γ` `[D]` as `[1, …, 1, D]`, of `x`'s rank.
fn broadcast<B: Backend>(gamma: FloatTensor<B>, x: &FloatTensor<B>) -> FloatTensor<B> {
    let mut dims = vec![1; x.shape().num_dims()];
    if let Some(last) = dims.last_mut() {
        *last = gamma.shape()[0];
    }
    B::float_reshape(gamma, Shape::from(dims))
}

/// `(x̂, r)`: the root mean square taken in f32 and cast back to `x`'s type, as burn's `RmsNorm`.
fn normalized<B: Backend>(x: FloatTensor<B>, eps: f64) -> (FloatTensor<B>, FloatTensor<B>) {
    let dtype = x.dtype();
    let last = x.shape().num_dims() - 1;
    let xf = if dtype == DType::F32 { x.clone() } else { B::float_cast(x.clone(), FloatDType::F32) };
    let r = B::float_sqrt(B::float_add_scalar(B::float_mean_dim(B::float_mul(xf.clone(), xf), last), eps.into()));
    let r = if dtype == DType::F32 { r } else { B::float_cast(r, dtype.into()) };
    (B::float_div(x, r.clone()), r)
}

#[cfg(feature = "flex")]
impl RmsNormBackend for burn::backend::Flex {}

#[cfg(feature = "cube")]
impl RmsNormBackend for burn::backend::Cube {}

/// libtorch: the same formulas as direct torch calls.
#[cfg(feature = "tch")]
impl RmsNormBackend for burn::backend::LibTorch {
    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let (xh, _) = libtorch::normalized(&x.tensor, eps);
        burn::backend::libtorch::TchTensor::new(xh * &gamma.tensor)
    }

    fn rms_norm_backward(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f64, dy: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (x, gamma, dy) = (&x.tensor, &gamma.tensor, &dy.tensor);
        let (xh, r) = libtorch::normalized(x, eps);
        let d = gamma.size()[0];
        let dgamma = (dy * &xh).reshape([-1, d]).sum_dim_intlist(0, false, None::<tch::Kind>);
        let g = dy * gamma;
        let dot = (&g * &xh).mean_dim(-1, true, None::<tch::Kind>);
        let mut dx = g - xh * dot;
        dx /= &r;
        (burn::backend::libtorch::TchTensor::new(dx), burn::backend::libtorch::TchTensor::new(dgamma))
    }
}

#[cfg(feature = "tch")]
mod libtorch {
    use tch::{Kind, Tensor};

    /// `(x̂, r)` as [`super::normalized`] forms them.
    pub(super) fn normalized(x: &Tensor, eps: f64) -> (Tensor, Tensor) {
        let kind = x.kind();
        let xf = if kind == Kind::Float { x.shallow_clone() } else { x.to_kind(Kind::Float) };
        let mut ms = (&xf * &xf).mean_dim(-1, true, None::<Kind>);
        ms += eps;
        let r = ms.sqrt();
        let r = if kind == Kind::Float { r } else { r.to_kind(kind) };
        (x / &r, r)
    }
}

/// Autodiff: the inner backend's normalisation, recorded as one operation whose state is its
/// inputs.
impl<B: Backend + RmsNormBackend, C: CheckpointStrategy> RmsNormBackend for Autodiff<B, C> {
    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct RmsNorm;

        impl<B: Backend + RmsNormBackend> Backward<B, 2> for RmsNorm {
            type State = (FloatTensor<B>, FloatTensor<B>, f64);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_x, node_gamma] = ops.parents;
                let dy = grads.consume::<B>(&ops.node);
                let (x, gamma, eps) = ops.state;
                let (dx, dgamma) = B::rms_norm_backward(x, gamma, eps, dy);
                for (node, grad) in [(node_x, dx), (node_gamma, dgamma)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        let (xp, gp) = (x.primitive().clone(), gamma.primitive().clone());
        match RmsNorm.prepare::<C>([x.node(), gamma.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::rms_norm(xp.clone(), gp.clone(), eps);
                prep.finish((xp, gp, eps), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rms_norm(xp, gp, eps)),
        }
    }
}

/// Where the extension has a body: every backend this project builds.
const REACH: crate::Reach = crate::Reach { flex: true, libtorch: true, cube: true };

/// RMSNorm of `x` over its last dimension with scale `gamma` `[D]` and `eps`, through the
/// extension where the backend has it, and `None` where it does not (the caller takes burn's
/// `RmsNorm`). See the module docs.
pub fn rms_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, eps: f64) -> Option<Tensor<D>> {
    if !crate::extended(&x.clone().into_dispatch().kind, REACH) {
        return None;
    }
    let out = <Dispatch as RmsNormBackend>::rms_norm(x.into_dispatch(), gamma.into_dispatch(), eps);
    Some(Tensor::from_dispatch(out))
}
