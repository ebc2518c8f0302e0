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
//! them), on flex one loop each over the f32 buffers, split over the CPU's threads. A model
//! applies it in every layer, so on a GPU, where a small model's step waits on the host issuing
//! operations, that is a few hundred operations fewer a step.

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
        tensor_ops::<Self>(g, u)
    }

    /// The gradients `(dg, du)` of [`Self::swiglu`] for the output gradient `dy`.
    fn swiglu_backward(g: FloatTensor<Self>, u: FloatTensor<Self>, dy: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        tensor_ops_backward::<Self>(g, u, dy)
    }
}

/// [`SwigluBackend::swiglu`] in the backend's tensor operations.
fn tensor_ops<B: Backend>(g: FloatTensor<B>, u: FloatTensor<B>) -> FloatTensor<B> {
    let silu = B::float_mul(g.clone(), B::sigmoid(g));
    B::float_mul(silu, u)
}

/// [`SwigluBackend::swiglu_backward`] in the backend's tensor operations.
fn tensor_ops_backward<B: Backend>(g: FloatTensor<B>, u: FloatTensor<B>, dy: FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>) {
    let s = B::sigmoid(g.clone());
    let silu = B::float_mul(g, s.clone());
    let du = B::float_mul(dy.clone(), silu.clone());
    // σ + silu·(1 − σ)
    let one_minus_s = B::float_add_scalar(B::float_neg(s.clone()), 1.0f64.into());
    let dsilu = B::float_add(s, B::float_mul(silu, one_minus_s));
    let dg = B::float_mul(B::float_mul(dy, u), dsilu);
    (dg, du)
}

/// σ(x) as burn-flex computes it: `1 / (1 + e⁻ˣ)`, or `eˣ / (1 + eˣ)` for negative `x`, whose
/// `e⁻ˣ` would overflow.
#[cfg(feature = "flex")]
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// flex: each pass one loop over its f32 buffers, split over rayon's threads (burn-flex's
/// element-wise operations make a pass and a buffer per operation, on one thread). Half precision
/// takes the tensor operations.
#[cfg(feature = "flex")]
impl SwigluBackend for burn::backend::Flex {
    fn swiglu(g: FloatTensor<Self>, u: FloatTensor<Self>) -> FloatTensor<Self> {
        match crate::cpu::flex::zip_map([&g, &u], |[g, u]| [g * sigmoid(g) * u]) {
            Some([y]) => y,
            None => tensor_ops::<Self>(g, u),
        }
    }

    fn swiglu_backward(g: FloatTensor<Self>, u: FloatTensor<Self>, dy: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let grads = crate::cpu::flex::zip_map([&g, &u, &dy], |[g, u, dy]| {
            let s = sigmoid(g);
            let silu = g * s;
            [dy * u * (s + silu * (1.0 - s)), dy * silu]
        });
        match grads {
            Some([dg, du]) => (dg, du),
            None => tensor_ops_backward::<Self>(g, u, dy),
        }
    }
}

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

#[cfg(all(test, feature = "flex"))]
#[allow(clippy::expect_used)]
mod tests {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::backend::ops::FloatTensorOps;
    use burn::tensor::TensorData;

    use super::*;
    use crate::cpu::flex::testing::{values, wave};

    /// The flex loops against the same formula in burn-flex's tensor operations: equal values, over
    /// more elements than one rayon task takes and with the value a transposed view.
    #[test]
    fn the_flex_loops_equal_the_tensor_operations() {
        let (rows, cols) = (300, 256);
        // Gates from −15 to 15, deep in both tails of the sigmoid.
        let g = FlexTensor::from_data(TensorData::new(wave(rows * cols, 1, 15.0), [rows, cols]));
        let u = Flex::float_transpose(FlexTensor::from_data(TensorData::new(wave(rows * cols, 2, 1.0), [cols, rows])));
        let dy = FlexTensor::from_data(TensorData::new(wave(rows * cols, 3, 1.0), [rows, cols]));
        assert!(u.as_slice::<f32>().is_none(), "the value is a strided view");
        let ours = <Flex as SwigluBackend>::swiglu(g.clone(), u.clone());
        assert_eq!(values(&ours), values(&tensor_ops::<Flex>(g.clone(), u.clone())), "y");
        let (dg, du) = <Flex as SwigluBackend>::swiglu_backward(g.clone(), u.clone(), dy.clone());
        let (dg_ops, du_ops) = tensor_ops_backward::<Flex>(g, u, dy);
        assert_eq!(values(&dg), values(&dg_ops), "dg");
        assert_eq!(values(&du), values(&du_ops), "du");
    }
}
