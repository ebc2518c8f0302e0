//! `a + s·b` as one recorded operation ([`scaled_sum`]): a LoRA projection's frozen product plus
//! its scaled low-rank update.
//!
//! burn's balanced gradient checkpointing holds, from the forward pass until the backward pass
//! starts, the output of every compute-bound operation (a product) that a memory-bound one (an
//! `add`, a `mul_scalar`, a reshape) reads, in case it has to compute that one again. Written as
//! burn's `add` of a `mul_scalar`, an adapted projection's sum so held both its terms, each as large
//! as the projection's output: under LoRA the checkpointed step kept more than the plain one.
//! Recorded as one compute-bound operation that keeps nothing for its backward step, it holds
//! neither term; only the sum is held, where a memory-bound operation reads it. Without
//! checkpointing nothing changes: neither form keeps anything for its backward step, and the same
//! two operations compute the values.

// burn-tch is marked deprecated upstream; it is still the libtorch backend of burn 0.22.
#![cfg_attr(feature = "tch", allow(deprecated))]

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, backend_extension};
use burn::tensor::Tensor;

/// `a + scale·b`, recorded as one operation.
#[backend_extension(Autodiff, Flex: cfg(feature = "flex"), LibTorch: cfg(feature = "tch"), Cube: cfg(feature = "cube"))]
pub trait ScaledSumBackend: Backend {
    /// `a + scale·b` for two tensors of one shape: every backend's own `mul_scalar` and `add`.
    fn scaled_sum(a: FloatTensor<Self>, b: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        Self::float_add(a, Self::float_mul_scalar(b, scale.into()))
    }
}

#[cfg(feature = "flex")]
impl ScaledSumBackend for burn::backend::Flex {}
#[cfg(feature = "tch")]
impl ScaledSumBackend for burn::backend::LibTorch {}
#[cfg(feature = "cube")]
impl ScaledSumBackend for burn::backend::Cube {}

/// The backward step: `dy` to `a`, `scale·dy` to `b`; nothing kept.
#[derive(Debug)]
struct ScaledSum(f64);

impl<B: Backend> Backward<B, 2> for ScaledSum {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_a, node_b] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        match (node_a, node_b) {
            (Some(a), Some(b)) => {
                grads.register::<B>(b.id, B::float_mul_scalar(dy.clone(), self.0.into()));
                grads.register::<B>(a.id, dy);
            }
            (Some(a), None) => grads.register::<B>(a.id, dy),
            (None, Some(b)) => grads.register::<B>(b.id, B::float_mul_scalar(dy, self.0.into())),
            (None, None) => {}
        }
    }
}

/// Autodiff: compute-bound and keeping nothing, so that under gradient checkpointing neither term
/// is held for it.
impl<B: Backend + ScaledSumBackend, C: CheckpointStrategy> ScaledSumBackend for Autodiff<B, C> {
    fn scaled_sum(a: FloatTensor<Self>, b: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        let out = B::scaled_sum(a.primitive().clone(), b.primitive().clone(), scale);
        ScaledSum(scale).prepare::<C>([a.node(), b.node()]).compute_bound().stateless(out)
    }
}

/// Where the extension has a body: every backend this project builds.
const REACH: crate::Reach = crate::Reach { flex: true, libtorch: true, cube: true };

/// `a + scale·b` for two tensors of one shape, recorded as one operation where the backend has the
/// extension (see the module docs), and as burn's `mul_scalar` and `add` elsewhere.
pub fn scaled_sum<const D: usize>(a: Tensor<D>, b: Tensor<D>, scale: f64) -> Tensor<D> {
    if !crate::extended(&a.clone().into_dispatch().kind, REACH) || a.shape() != b.shape() {
        return a + b.mul_scalar(scale);
    }
    Tensor::from_dispatch(<Dispatch as ScaledSumBackend>::scaled_sum(a.into_dispatch(), b.into_dispatch(), scale))
}

#[cfg(all(test, feature = "flex"))]
#[allow(clippy::expect_used)]
mod tests {
    use burn::tensor::{Device, TensorData};

    use super::*;

    fn vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 values")
    }

    /// The same values and gradients as `a + s·b` in burn's operations, to the bit: with gradient
    /// checkpointing and without, and with either term untracked (a frozen base's product).
    #[test]
    fn values_and_gradients_are_burns_add_of_a_mul_scalar() {
        let (a_values, b_values, dy): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            (0..12).map(|i| (i as f32 - 5.5) / 3.0).collect(),
            (0..12).map(|i| ((i * 7 % 12) as f32 - 6.0) / 5.0).collect(),
            (0..12).map(|i| ((i * 5 % 11) as f32 - 5.0) / 2.0).collect(),
        );
        for device in [Device::flex().autodiff(), Device::flex().autodiff().gradient_checkpointing()] {
            for (track_a, track_b) in [(true, true), (false, true), (true, false)] {
                let run = |fused: bool| {
                    let leaf = |v: &Vec<f32>, track: bool| {
                        let t = Tensor::<2>::from_data(TensorData::new(v.clone(), [3, 4]), &device);
                        if track { t.require_grad() } else { t }
                    };
                    let (a, b) = (leaf(&a_values, track_a), leaf(&b_values, track_b));
                    // Through an operation on each side, as a product's output arrives.
                    let (a2, b2) = (a.clone().mul_scalar(1.5), b.clone().mul_scalar(-0.5));
                    let y = if fused { scaled_sum(a2, b2, 0.375) } else { a2 + b2.mul_scalar(0.375) };
                    let weights = Tensor::<2>::from_data(TensorData::new(dy.clone(), [3, 4]), &device);
                    let grads = (y.clone() * weights).sum().backward();
                    (vec(y.inner()), a.grad(&grads).map(vec), b.grad(&grads).map(vec))
                };
                let (fused, plain) = (run(true), run(false));
                assert_eq!(fused, plain, "tracked a {track_a}, b {track_b}, device {device:?}");
                assert_eq!((fused.1.is_some(), fused.2.is_some()), (track_a, track_b));
            }
        }
    }
}
