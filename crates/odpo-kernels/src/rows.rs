//! The leading dimensions of a tensor merged into rows, or split again, as a view wherever its
//! layout allows: [`reshape_rows`].
//!
//! burn-cubecl copies every tensor that is not contiguous when its leading dimensions are merged,
//! and cubecl pads the rows it allocates (rows of 576 elements take 640). The models' linear layers
//! view `[B, T, D]` as `[B·T, D]` for the product and the product's rows as `[B, T, N]` again, so
//! each padded tensor arriving there, forward or backward, cost a copy kernel: 180 in the backward
//! pass of a SmolLM2-135M step. Rows evenly spaced in memory are rows whatever the leading shape,
//! so the view keeps the padding. Elsewhere (and for any other layout) it is burn's reshape.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::{Shape, Tensor};

/// `x` `[.., D]` as `shape` `[.., D]`, the same rows under other leading dimensions.
#[backend_extension(Autodiff, Cube: cfg(feature = "cube"))]
pub trait RowsBackend: Backend {
    /// `x` with its leading dimensions reshaped to `shape`'s (the last dimension unchanged).
    // Without a backend that has a body, the extension's expansion leaves `shape` unread.
    #[cfg_attr(not(feature = "cube"), allow(unused_variables))]
    fn reshape_rows(x: FloatTensor<Self>, shape: Shape) -> FloatTensor<Self> {
        Self::float_reshape(x, shape)
    }
}

/// cubecl: a view of the same buffer when the rows are evenly spaced (see `view` in `cube.rs`).
#[cfg(feature = "cube")]
impl RowsBackend for burn::backend::Cube {
    fn reshape_rows(x: FloatTensor<Self>, shape: Shape) -> FloatTensor<Self> {
        match cube::view(x, &shape) {
            Ok(view) => view,
            Err(x) => <Self as burn::backend::ops::FloatTensorOps<Self>>::float_reshape(x, shape),
        }
    }
}

#[cfg(feature = "cube")]
mod cube {
    use burn::backend::TensorMetadata;
    use burn::tensor::Shape;
    use burn_cubecl::cubecl::zspace::Strides;
    use burn_cubecl::cubecl::zspace::metadata::Metadata;
    use burn_cubecl::tensor::CubeTensor;

    /// `x` viewed as `shape` when the two share the last dimension and the number of rows, and
    /// `x`'s rows lie at one stride from each other (each leading dimension's stride is that
    /// stride times the rows below it, as in a contiguous or row-padded tensor); `x` back otherwise.
    #[allow(clippy::result_large_err)] // the tensor handed back, as it came
    pub(super) fn view(mut x: CubeTensor, shape: &Shape) -> Result<CubeTensor, CubeTensor> {
        let (old, strides) = (x.shape(), x.meta.strides().clone());
        let (n, k) = (old.num_dims(), shape.num_dims());
        if x.meta.is_tiled() || n < 1 || k < 1 || old[n - 1] != shape[k - 1] || old.num_elements() != shape.num_elements() {
            return Err(x);
        }
        let d = old[n - 1];
        // The stride between rows: that of the innermost leading dimension of more than one row.
        let row_stride = (0..n - 1).rev().find(|&i| old[i] > 1).map_or(d * strides[n - 1], |i| strides[i]);
        let mut below = 1;
        for i in (0..n - 1).rev() {
            if old[i] > 1 && strides[i] != row_stride * below {
                return Err(x);
            }
            below *= old[i];
        }
        let mut new = vec![0; k];
        new[k - 1] = strides[n - 1];
        let mut below = 1;
        for i in (0..k - 1).rev() {
            new[i] = row_stride * below;
            below *= shape[i];
        }
        *x.meta = Metadata::new(shape.clone(), Strides::new(&new));
        Ok(x)
    }
}

/// Autodiff: recorded as one operation whose backward step views the gradient's rows as the
/// input's shape again. It is memory-bound (a view costs nothing to take again): under gradient
/// checkpointing a product that keeps its operand keeps the view's input, which may itself be
/// computed again, rather than the view.
impl<B: Backend + RowsBackend, C: CheckpointStrategy> RowsBackend for Autodiff<B, C> {
    fn reshape_rows(x: FloatTensor<Self>, shape: Shape) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct ReshapeRows;

        impl<B: Backend + RowsBackend> Backward<B, 1> for ReshapeRows {
            type State = Shape;

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node] = ops.parents;
                let dy = grads.consume::<B>(&ops.node);
                if let Some(node) = node {
                    grads.register::<B>(node.id, B::reshape_rows(dy, ops.state));
                }
            }
        }

        let xp = x.primitive().clone();
        let retro = crate::retro::Unary::<B, _>(x.node().id(), shape.clone(), B::reshape_rows);
        match ReshapeRows.prepare::<C>([x.node()]).memory_bound().retro_forward(retro).parents([&x]).stateful() {
            OpsKind::Tracked(prep) => {
                let input = xp.shape();
                prep.finish(input, B::reshape_rows(xp, shape))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::reshape_rows(xp, shape)),
        }
    }
}

/// Where the extension has a body: the cubecl backends.
const REACH: crate::Reach = crate::Reach { flex: false, libtorch: false, cube: true };

/// `x` `[.., D]` reshaped to `dims` `[.., D]` (the same number of rows): a view of `x`'s buffer on
/// the cubecl backends wherever its rows are evenly spaced, burn's `reshape` elsewhere. See the
/// module docs.
pub fn reshape_rows<const D: usize, const K: usize>(x: Tensor<D>, dims: [usize; K]) -> Tensor<K> {
    let same_rows = x.dims()[D - 1] == dims[K - 1] && x.shape().num_elements() == dims.iter().product::<usize>();
    if !same_rows || !crate::extended(&x.clone().into_dispatch().kind, REACH) {
        return x.reshape(dims);
    }
    Tensor::from_dispatch(<Dispatch as RowsBackend>::reshape_rows(x.into_dispatch(), Shape::new(dims)))
}
