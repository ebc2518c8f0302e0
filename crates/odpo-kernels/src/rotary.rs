//! Rotary position embedding in the rotate-half layout (Su et al. 2021, "RoFormer",
//! arXiv:2104.09864; transformers' `apply_rotary_pos_emb`), as one differentiable operation:
//!
//! ```text
//! y = x·cos + rotate_half(x)·sin,      rotate_half([x₁, x₂]) = [−x₂, x₁]
//! ∂L/∂x = dy·cos + rotate_halfᵀ(dy·sin), rotate_halfᵀ([a₁, a₂]) = [a₂, −a₁]
//! ```
//!
//! Written with burn tensor operations it is seven recorded operations (two slices, a negation, a
//! concatenation, two products and a sum), whose backward pass pads each slice's gradient back to
//! full width and adds the three paths into `x`. Here it is one recorded operation whose backward
//! pass is the formula above; on libtorch both passes are direct torch calls. A model applies it to
//! the queries and the keys of every layer, so on a GPU, where a small model's step waits on the
//! host issuing operations, the difference is a few hundred operations a step.

// burn-tch is marked deprecated upstream; it is still the libtorch backend of burn 0.22.
#![cfg_attr(feature = "tch", allow(deprecated))]

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::{Slice, Tensor};

/// The rotary embedding of `x` `[B, H, T, Dh]` by `cos` and `sin` (broadcast to `x`'s shape, for
/// instance `[B, 1, T, Dh]`), differentiable with respect to `x` (the angles are constants).
#[backend_extension(Autodiff, Flex: cfg(feature = "flex"), LibTorch: cfg(feature = "tch"), Cube: cfg(feature = "cube"))]
pub trait RotaryBackend: Backend {
    /// `x·cos + rotate_half(x)·sin`.
    fn rotary(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        let (x1, x2) = halves::<Self>(&x);
        let rot = Self::float_cat(vec![Self::float_neg(x2), x1], 3);
        Self::float_add(Self::float_mul(x, cos), Self::float_mul(rot, sin))
    }

    /// `dy·cos + rotate_halfᵀ(dy·sin)`.
    fn rotary_backward(dy: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        let (a1, a2) = halves::<Self>(&Self::float_mul(dy.clone(), sin));
        let rot_t = Self::float_cat(vec![a2, Self::float_neg(a1)], 3);
        Self::float_add(Self::float_mul(dy, cos), rot_t)
    }
}

/// The two halves of the last dimension.
fn halves<B: Backend>(x: &FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>) {
    let half = x.shape()[3] / 2;
    let cut = |r: std::ops::Range<usize>| B::float_slice(x.clone(), &[Slice::from(..), Slice::from(..), Slice::from(..), Slice::from(r)]);
    (cut(0..half), cut(half..2 * half))
}

#[cfg(feature = "flex")]
impl RotaryBackend for burn::backend::Flex {}

#[cfg(feature = "cube")]
impl RotaryBackend for burn::backend::Cube {}

/// libtorch: the same formulas as direct torch calls (the forward pass in transformers' order of
/// operations, so that the values round as theirs do).
#[cfg(feature = "tch")]
impl RotaryBackend for burn::backend::LibTorch {
    fn rotary(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        let (x, cos, sin) = (&x.tensor, &cos.tensor, &sin.tensor);
        let half = x.size()[3] / 2;
        let rot = tch::Tensor::cat(&[x.narrow(3, half, half).neg(), x.narrow(3, 0, half)], 3);
        let mut y = x * cos;
        y += rot * sin;
        burn::backend::libtorch::TchTensor::new(y)
    }

    fn rotary_backward(dy: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        let (dy, cos, sin) = (&dy.tensor, &cos.tensor, &sin.tensor);
        let half = dy.size()[3] / 2;
        let a = dy * sin;
        let mut dx = tch::Tensor::cat(&[a.narrow(3, half, half), a.narrow(3, 0, half).neg()], 3);
        let _ = dx.addcmul_(dy, cos);
        burn::backend::libtorch::TchTensor::new(dx)
    }
}

/// Autodiff: the inner backend's rotation, recorded as one operation whose state is the angles.
impl<B: Backend + RotaryBackend, C: CheckpointStrategy> RotaryBackend for Autodiff<B, C> {
    fn rotary(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Rotary;

        impl<B: Backend + RotaryBackend> Backward<B, 1> for Rotary {
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node] = ops.parents;
                let dy = grads.consume::<B>(&ops.node);
                let (cos, sin) = ops.state;
                if let Some(node) = node {
                    grads.register::<B>(node.id, B::rotary_backward(dy, cos, sin));
                }
            }
        }

        let (xp, cos, sin) = (x.primitive().clone(), cos.primitive().clone(), sin.primitive().clone());
        match Rotary.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::rotary(xp, cos.clone(), sin.clone());
                prep.finish((cos, sin), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rotary(xp, cos, sin)),
        }
    }
}

/// Where the extension has a body: every backend this project builds.
const REACH: crate::Reach = crate::Reach { flex: true, libtorch: true, cube: true };

/// `x·cos + rotate_half(x)·sin` for `x` `[B, H, T, Dh]` (`Dh` even) and angles broadcast to it,
/// through the extension where the backend has it, and `None` where it does not (the caller
/// writes the formula in tensor operations). See the module docs.
pub fn rotary(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Option<Tensor<4>> {
    if !crate::extended(&x.clone().into_dispatch().kind, REACH) {
        return None;
    }
    let out = <Dispatch as RotaryBackend>::rotary(x.into_dispatch(), cos.clone().into_dispatch(), sin.clone().into_dispatch());
    Some(Tensor::from_dispatch(out))
}
