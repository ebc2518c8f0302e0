//! The token embedding lookup, `y[b, t] = W[ids[b, t]]`, whose backward pass on flex touches only
//! the rows of `W` that the batch used.
//!
//! The gradient of `W` `[V, D]` is zero but for the rows of the batch's tokens. burn-flex 0.22.1
//! builds it as `float_zeros` and a scatter-add; its `float_zeros` allocates a zeroed byte vector
//! and copies it into a second, aligned allocation, a read and a write of every page. For a tied
//! 262,144 × 640 vocabulary (Gemma 3) that is 671 MB zeroed and copied each step on one thread,
//! before the head's gradient is added to it. Here the gradient is an f32 vector that the system
//! hands over already zeroed (no page is touched until written) and the batch's rows are added
//! into it, in token order as burn-flex adds them (the same sums). Elsewhere it is the backend's
//! own `embedding_backward`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend, Dispatch, backend_extension};
use burn::tensor::{Int, Tensor};

/// The embedding lookup with a backward pass of the extension's choosing.
#[backend_extension(Autodiff, Flex: cfg(feature = "flex"))]
pub trait EmbeddingBackend: Backend {
    /// `W[ids]`: `[B, T, D]` for `ids` `[B, T]` and `weights` `[V, D]`.
    fn embedding_lookup(weights: FloatTensor<Self>, ids: IntTensor<Self>) -> FloatTensor<Self> {
        Self::embedding(weights, ids)
    }

    /// The gradient of [`Self::embedding_lookup`] with respect to `weights`, for the output
    /// gradient `dy` `[B, T, D]`.
    fn embedding_lookup_backward(weights: FloatTensor<Self>, dy: FloatTensor<Self>, ids: IntTensor<Self>) -> FloatTensor<Self> {
        Self::embedding_backward(weights, dy, ids)
    }
}

/// flex: the gradient written into a lazily zeroed vector, see the module docs. Anything but f32
/// with ids inside the vocabulary takes burn-flex's own backward.
#[cfg(feature = "flex")]
impl EmbeddingBackend for burn::backend::Flex {
    fn embedding_lookup_backward(weights: FloatTensor<Self>, dy: FloatTensor<Self>, ids: IntTensor<Self>) -> FloatTensor<Self> {
        use burn::backend::ops::ModuleOps;
        flex_backward(&weights, &dy, &ids).unwrap_or_else(|| Self::embedding_backward(weights, dy, ids))
    }
}

#[cfg(feature = "flex")]
fn flex_backward(weights: &FloatTensor<burn::backend::Flex>, dy: &FloatTensor<burn::backend::Flex>, ids: &IntTensor<burn::backend::Flex>) -> Option<FloatTensor<burn::backend::Flex>> {
    use burn::backend::TensorMetadata;

    let shape = weights.shape();
    let [v, d] = [*shape.first()?, *shape.get(1)?];
    let ids = crate::cpu::flex::ints(ids)?;
    if shape.num_dims() != 2 || dy.shape().num_elements() != ids.len() * d || ids.iter().any(|&i| usize::try_from(i).map_or(true, |i| i >= v)) {
        return None;
    }
    crate::cpu::flex::with_rows(dy, |dy| {
        // Zeroed by the allocator (fresh pages for a large vector): only the rows written below
        // are touched.
        let mut grad = vec![0f32; v * d];
        for (&id, row) in ids.iter().zip(dy.chunks_exact(d)) {
            let start = id as usize * d;
            for (g, &x) in grad[start..start + d].iter_mut().zip(row) {
                *g += x;
            }
        }
        crate::cpu::flex::tensor(shape.clone(), grad)
    })
}

/// Autodiff: the lookup recorded as one operation whose state is the weight (shared, for its
/// shape) and the ids.
impl<B: Backend + EmbeddingBackend, C: CheckpointStrategy> EmbeddingBackend for Autodiff<B, C> {
    fn embedding_lookup(weights: FloatTensor<Self>, ids: IntTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Lookup;

        impl<B: Backend + EmbeddingBackend> Backward<B, 1> for Lookup {
            type State = (FloatTensor<B>, IntTensor<B>);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let (weights, ids) = ops.state;
                unary::<B, _>(ops.parents, ops.node, grads, |dy| B::embedding_lookup_backward(weights, dy, ids));
            }
        }

        match Lookup.prepare::<C>([weights.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let weights = weights.into_primitive();
                let out = B::embedding_lookup(weights.clone(), ids.clone());
                prep.finish((weights, ids), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::embedding_lookup(weights.into_primitive(), ids)),
        }
    }
}

/// The extension has a body on flex alone; elsewhere burn's own embedding runs.
const FLEX_ONLY: crate::Reach = crate::Reach { flex: true, libtorch: false, cube: false };

/// `weights[ids]`, `[B, T, D]`, through the extension where the backend has it (flex) and `None`
/// elsewhere (the caller runs burn's `embedding`). See the module docs.
pub fn embedding(weights: Tensor<2>, ids: Tensor<2, Int>) -> Option<Tensor<3>> {
    if !crate::extended(&weights.clone().into_dispatch().kind, FLEX_ONLY) {
        return None;
    }
    let out = <Dispatch as EmbeddingBackend>::embedding_lookup(weights.into_dispatch(), ids.into_dispatch());
    Some(Tensor::from_dispatch(out))
}

#[cfg(all(test, feature = "flex"))]
#[allow(clippy::expect_used)]
mod tests {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::backend::ops::{FloatTensorOps, ModuleOps};
    use burn::tensor::TensorData;

    use super::*;
    use crate::cpu::flex::testing::{values, wave};

    /// The gradient equals burn-flex's `embedding_backward` to the bit, with repeated ids (whose
    /// rows add up) and a strided output gradient; an id outside the vocabulary falls
    /// back to burn-flex's own.
    #[test]
    fn the_gradient_equals_burn_flexs() {
        let (v, d) = (50, 24);
        let weights = FlexTensor::from_data(TensorData::new(wave(v * d, 1, 1.0), [v, d]));
        let ids = FlexTensor::from_data(TensorData::new(vec![3i64, 7, 3, 49, 0, 3, 12, 7], [2, 4]));
        let dy = Flex::float_swap_dims(FlexTensor::from_data(TensorData::new(wave(8 * d, 2, 1.0), [2, d, 4])), 1, 2);
        assert!(dy.as_slice::<f32>().is_none(), "the output gradient is a strided view");
        let ours = <Flex as EmbeddingBackend>::embedding_lookup_backward(weights.clone(), dy.clone(), ids.clone());
        let burns = Flex::embedding_backward(weights.clone(), dy.clone(), ids);
        assert_eq!(values(&ours), values(&burns));
        assert!(values(&ours)[3 * d..4 * d].iter().all(|&g| g != 0.0), "row 3 took three rows");
        let outside = FlexTensor::from_data(TensorData::new(vec![1i64, 2, 3, 4, 5, 6, 7, 50], [2, 4]));
        assert!(flex_backward(&weights, &dy, &outside).is_none());
    }
}
