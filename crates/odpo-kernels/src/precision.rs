//! The half-precision weights of a mixed-precision step, whose gradients stay in half precision:
//! [`compute_cast`].
//!
//! Mixed precision runs the forward and backward passes on a bf16 or f16 cast of the f32 weights.
//! Recorded as burn's cast, each weight's gradient is cast back to f32 in the backward pass: one
//! kernel per weight (272 for SmolLM2-135M) on a GPU step that waits on the host issuing kernels,
//! and an f32 buffer per weight. The optimizer reads gradients in f32 whatever their dtype (its
//! kernels convert as they load, [`crate::adamw`], [`crate::SquareSums`], [`crate::FlatAdamW`]), and
//! every bf16 or f16 number is an f32, so here the backward step hands the gradient on as it came:
//! the same values, with nothing launched. A step of several micro-batches casts the weights once
//! and records that cast anew for each micro-batch's graph, launching nothing ([`compute_copy`]).

// burn-tch is marked deprecated upstream; it is still the libtorch backend of burn 0.22.
#![cfg_attr(feature = "tch", allow(deprecated))]

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, backend_extension};
use burn::tensor::{FloatDType, Tensor};

/// A cast whose gradient keeps the cast's dtype.
#[backend_extension(Autodiff, Flex: cfg(feature = "flex"), LibTorch: cfg(feature = "tch"), Cube: cfg(feature = "cube"))]
pub trait ComputeCastBackend: Backend {
    /// `x` cast to `dtype`: every backend's own cast.
    fn compute_cast(x: FloatTensor<Self>, dtype: FloatDType) -> FloatTensor<Self> {
        Self::float_cast(x, dtype)
    }

    /// `half`, a cast of `x` made before: nothing runs.
    // No backend computes anything: the extension's expansion leaves `x` unread.
    #[allow(unused_variables)]
    fn compute_copy(x: FloatTensor<Self>, half: FloatTensor<Self>) -> FloatTensor<Self> {
        half
    }
}

#[cfg(feature = "flex")]
impl ComputeCastBackend for burn::backend::Flex {}
#[cfg(feature = "tch")]
impl ComputeCastBackend for burn::backend::LibTorch {}
#[cfg(feature = "cube")]
impl ComputeCastBackend for burn::backend::Cube {}

/// The backward step of both operations: the gradient passed through to the input in the dtype
/// it arrives in (the cast's).
#[derive(Debug)]
struct PassThrough;

impl<B: Backend> Backward<B, 1> for PassThrough {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        if let Some(node) = node {
            grads.register::<B>(node.id, dy);
        }
    }
}

/// Autodiff: each recorded as one operation of `PassThrough`'s backward step.
impl<B: Backend + ComputeCastBackend, C: CheckpointStrategy> ComputeCastBackend for Autodiff<B, C> {
    fn compute_cast(x: FloatTensor<Self>, dtype: FloatDType) -> FloatTensor<Self> {
        // Memory-bound: under gradient checkpointing a product that keeps its operand keeps the
        // cast's input (or computes that again) rather than a second copy in the compute dtype.
        let xp = x.primitive().clone();
        let retro = crate::retro::Unary::<B, _>(x.node().id(), dtype, B::compute_cast);
        PassThrough.prepare::<C>([x.node()]).memory_bound().retro_forward(retro).parents([&x]).stateless(B::compute_cast(xp, dtype))
    }

    fn compute_copy(x: FloatTensor<Self>, half: FloatTensor<Self>) -> FloatTensor<Self> {
        // `half` stands for `x`'s cast.
        PassThrough.prepare::<C>([x.node()]).compute_bound().stateless(half.primitive().clone())
    }
}

/// [`compute_cast`] of `x` when `half` already holds `x` cast to its dtype (the same weights, cast
/// once for the several micro-batches of a step): `half`'s values, recorded as a function of `x`
/// whose gradient passes to `x` in `half`'s dtype, with nothing launched. `half` is taken as a
/// constant (a detached cast, or one written without autodiff, as the optimizer's). Where the
/// shapes differ, `x` cast anew.
pub fn compute_copy<const D: usize>(x: Tensor<D>, half: Tensor<D>) -> Tensor<D> {
    if x.shape() != half.shape() || !half.dtype().is_float() {
        return compute_cast(x, half.dtype().into());
    }
    // `half` joins `x`'s graph as a constant: with `x`'s autodiff, and its checkpointing.
    let half = match (x.is_autodiff(), x.gradient_checkpointing_strategy()) {
        (false, _) => half.without_autodiff(),
        (true, Some(strategy)) => half.autodiff().with_gradient_checkpointing_strategy(strategy),
        (true, None) => half.autodiff(),
    };
    Tensor::from_dispatch(<Dispatch as ComputeCastBackend>::compute_copy(x.into_dispatch(), half.into_dispatch()))
}

/// `x` cast to `dtype` for a mixed-precision step: the values of `x.cast(dtype)`, but the
/// gradient that reaches `x` stays in `dtype` (see the module docs). For gradients read by this
/// crate's optimizer, which converts them to f32 as it loads them; anything else that reads them
/// should cast them to `x`'s dtype first.
pub fn compute_cast<const D: usize>(x: Tensor<D>, dtype: FloatDType) -> Tensor<D> {
    if x.dtype() == dtype.into() {
        return x;
    }
    Tensor::from_dispatch(<Dispatch as ComputeCastBackend>::compute_cast(x.into_dispatch(), dtype))
}
