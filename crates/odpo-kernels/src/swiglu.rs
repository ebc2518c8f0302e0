//! The SwiGLU gate of a Llama-family MLP (Shazeer 2020, "GLU Variants Improve Transformer",
//! arXiv:2002.05202; transformers' `LlamaMLP`: `act_fn(gate_proj(x)) * up_proj(x)` with SiLU), as one
//! differentiable operation:
//!
//! ```text
//! y = silu(g) · u,                 silu(g) = g · σ(g)
//! ∂L/∂u = dy · silu(g),            ∂L/∂g = dy · u · (σ(g) + silu(g) · (1 − σ(g)))
//! ```
//!
//! Written with burn tensor operations it is three recorded operations (burn's `silu` is a sigmoid
//! and a product, then the product with `u`), whose backward passes take about eight more and add
//! the two paths into `g`. Here it is one recorded operation; on libtorch both passes are direct
//! torch calls (`silu`, and `silu_backward` for the gate's gradient, as PyTorch's autograd runs
//! them). A model applies it in every layer, so on a GPU, where a small model's step waits on the
//! host issuing operations, that is a few hundred operations fewer a step.

// burn-tch is marked deprecated upstream; it is still the libtorch backend of burn 0.22.
#![cfg_attr(feature = "tch", allow(deprecated))]

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, backend_extension};
use burn::tensor::Tensor;

/// `silu(g) · u` for a gate `g` and a value `u` of one shape, differentiable with respect to both.
#[backend_extension(Autodiff, Flex: cfg(feature = "flex"), LibTorch: cfg(feature = "tch"), Cube: cfg(feature = "cube"))]
pub trait SwigluBackend: Backend {
    /// `g · σ(g) · u`.
    fn swiglu(g: FloatTensor<Self>, u: FloatTensor<Self>) -> FloatTensor<Self> {
        let silu = Self::float_mul(g.clone(), Self::sigmoid(g));
        Self::float_mul(silu, u)
    }

    /// The gradients `(dg, du)` of [`Self::swiglu`] for the output gradient `dy`.
    fn swiglu_backward(g: FloatTensor<Self>, u: FloatTensor<Self>, dy: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let s = Self::sigmoid(g.clone());
        let silu = Self::float_mul(g, s.clone());
        let du = Self::float_mul(dy.clone(), silu.clone());
        // σ + silu·(1 − σ)
        let one_minus_s = Self::float_add_scalar(Self::float_neg(s.clone()), 1.0f64.into());
        let dsilu = Self::float_add(s, Self::float_mul(silu, one_minus_s));
        let dg = Self::float_mul(Self::float_mul(dy, u), dsilu);
        (dg, du)
    }
}

#[cfg(feature = "flex")]
impl SwigluBackend for burn::backend::Flex {}

#[cfg(feature = "cube")]
impl SwigluBackend for burn::backend::Cube {}

/// libtorch: torch's SiLU and its backward kernel, as PyTorch's autograd runs transformers' MLP.
#[cfg(feature = "tch")]
impl SwigluBackend for burn::backend::LibTorch {
    fn swiglu(g: FloatTensor<Self>, u: FloatTensor<Self>) -> FloatTensor<Self> {
        let mut y = g.tensor.silu();
        y *= &u.tensor;
        burn::backend::libtorch::TchTensor::new(y)
    }

    fn swiglu_backward(g: FloatTensor<Self>, u: FloatTensor<Self>, dy: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (g, u, dy) = (&g.tensor, &u.tensor, &dy.tensor);
        let du = dy * g.silu();
        let dg = g.silu_backward(&(dy * u));
        (burn::backend::libtorch::TchTensor::new(dg), burn::backend::libtorch::TchTensor::new(du))
    }
}

/// Autodiff: the inner backend's gate, recorded as one operation whose state is its inputs.
impl<B: Backend + SwigluBackend, C: CheckpointStrategy> SwigluBackend for Autodiff<B, C> {
    fn swiglu(g: FloatTensor<Self>, u: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Swiglu;

        impl<B: Backend + SwigluBackend> Backward<B, 2> for Swiglu {
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_g, node_u] = ops.parents;
                let dy = grads.consume::<B>(&ops.node);
                let (g, u) = ops.state;
                let (dg, du) = B::swiglu_backward(g, u, dy);
                for (node, grad) in [(node_g, dg), (node_u, du)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        let (gp, up) = (g.primitive().clone(), u.primitive().clone());
        match Swiglu.prepare::<C>([g.node(), u.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::swiglu(gp.clone(), up.clone());
                prep.finish((gp, up), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::swiglu(gp, up)),
        }
    }
}

/// Where the extension has a body: every backend this project builds.
const REACH: crate::Reach = crate::Reach { flex: true, libtorch: true, cube: true };

/// `silu(g) · u` for a gate and a value of one shape, through the extension where the backend has
/// it, and `None` where it does not (the caller writes it in tensor operations). See the module docs.
pub fn swiglu<const D: usize>(g: Tensor<D>, u: Tensor<D>) -> Option<Tensor<D>> {
    if !crate::extended(&g.clone().into_dispatch().kind, REACH) {
        return None;
    }
    let out = <Dispatch as SwigluBackend>::swiglu(g.into_dispatch(), u.into_dispatch());
    Some(Tensor::from_dispatch(out))
}
