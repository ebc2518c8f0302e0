//! `x · deq(W)` over a frozen block-quantised weight, with a backward pass that keeps the
//! quantised weight rather than its f32 form.
//!
//! burn 0.22.1 multiplies by a quantised tensor by dequantising it (`QTensorOps::q_matmul`), and
//! its autodiff matmul keeps its right operand for the backward pass: under training every layer's
//! dequantised f32 weight stays alive from the forward pass to the backward, so a quantised frozen
//! base (LoRA over a Q8_0/Q4_0 checkpoint) would peak at the f32 model's size plus the quantised
//! copy. Here the op's saved state is the quantised tensor (shared, not copied); the backward pass
//! dequantises it again for `dy · deq(W)ᵀ`. At any moment one layer's f32 weight exists.
//! There is no gradient for `W`: the base is frozen.

// burn-tch is marked deprecated upstream; it is still the libtorch backend of burn 0.22.
#![cfg_attr(feature = "tch", allow(deprecated))]

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
#[cfg(feature = "flex")]
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::{FloatTensor, QuantizedTensor};
use burn::backend::{Autodiff, Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::{DType, Tensor};

/// The product with a dequantised weight. burn's own quantised tensors exist on flex only among
/// this project's CPU backends (burn-tch 0.22.1 leaves its `QTensorOps` `unimplemented!()`).
#[backend_extension(Autodiff, Flex: cfg(feature = "flex"))]
pub trait QuantizedMatmulBackend: Backend {
    /// `x · deq(w)` for `x` `[N, in]` and a quantised `w` `[in, out]`, in `x`'s float type.
    fn dequantized_matmul(x: FloatTensor<Self>, w: QuantizedTensor<Self>) -> FloatTensor<Self> {
        let w = Self::dequantize(w, x.dtype().into());
        Self::float_matmul(x, w)
    }

    /// `dy · deq(w)ᵀ`: the gradient of [`Self::dequantized_matmul`] with respect to `x`.
    fn dequantized_matmul_backward(dy: FloatTensor<Self>, w: QuantizedTensor<Self>) -> FloatTensor<Self> {
        let w = Self::dequantize(w, dy.dtype().into());
        Self::float_matmul(dy, Self::float_transpose(w))
    }
}

/// flex: the default bodies, with the weight dequantised by `flex_dequantize`.
#[cfg(feature = "flex")]
impl QuantizedMatmulBackend for burn::backend::Flex {
    fn dequantized_matmul(x: FloatTensor<Self>, w: QuantizedTensor<Self>) -> FloatTensor<Self> {
        let w = flex_dequantize(w, x.dtype());
        Self::float_matmul(x, w)
    }

    fn dequantized_matmul_backward(dy: FloatTensor<Self>, w: QuantizedTensor<Self>) -> FloatTensor<Self> {
        let w = flex_dequantize(w, dy.dtype());
        Self::float_matmul(dy, Self::float_transpose(w))
    }
}

/// A flex quantised tensor as f32. flex's own `dequantize` finds each element's block by
/// division in a scalar loop (6.5 ns an element here: 16 ms for a 960 × 2560 weight, three times
/// the matmul of 128 tokens by it); for the layout [`dequantized_matmul`]'s weights have (2-D,
/// blocks of `[b, 1]`, one level of scales) this is one pass over rows of `q` and their row of
/// scales, split over rayon's threads. Anything else goes to flex's `dequantize`.
#[cfg(feature = "flex")]
fn flex_dequantize(w: QuantizedTensor<burn::backend::Flex>, dtype: DType) -> FloatTensor<burn::backend::Flex> {
    use burn::backend::Flex;
    use burn::backend::ops::QTensorOps;
    use rayon::prelude::*;
    let fast = || -> Option<Vec<f32>> {
        let DType::QFloat(scheme) = w.dtype() else { return None };
        let shape = w.tensor().layout().shape().clone();
        if dtype != DType::F32 || shape.num_dims() != 2 || scheme.tensor_scale().is_some() {
            return None;
        }
        let (rows, cols) = (shape[0], shape[1]);
        let block = scheme.block_size()?.to_dim_vec(2);
        let rows_per_block = usize::from(block[0]);
        if block[1] != 1 || rows_per_block == 0 || !rows.is_multiple_of(rows_per_block) || w.tensor().dtype() != DType::I8 {
            return None;
        }
        let (start, end) = w.tensor().layout().contiguous_offsets()?;
        let q: &[i8] = w.tensor().storage::<i8>().get(start..end)?;
        let scales = w.scales();
        if q.len() != rows * cols || scales.len() != rows / rows_per_block * cols {
            return None;
        }
        let mut out = vec![0f32; rows * cols];
        out.par_chunks_mut(cols).zip(q.par_chunks(cols)).enumerate().for_each(|(r, (o, q))| {
            let s = &scales[r / rows_per_block * cols..][..cols];
            for ((o, &q), &s) in o.iter_mut().zip(q).zip(s) {
                *o = f32::from(q) * s;
            }
        });
        Some(out)
    };
    match fast() {
        Some(values) => {
            let shape = w.tensor().layout().shape().clone();
            Flex::float_from_data(burn::tensor::TensorData::new(values, shape), &Default::default())
        }
        None => Flex::dequantize(w, dtype.into()),
    }
}

/// Autodiff: the inner backend's product, recorded with a backward step whose state is the
/// quantised weight.
impl<B: Backend + QuantizedMatmulBackend, C: CheckpointStrategy> QuantizedMatmulBackend for Autodiff<B, C> {
    fn dequantized_matmul(x: FloatTensor<Self>, w: QuantizedTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct DequantizedMatmul;

        impl<B: Backend + QuantizedMatmulBackend> Backward<B, 1> for DequantizedMatmul {
            type State = QuantizedTensor<B>;

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let w = ops.state;
                unary::<B, _>(ops.parents, ops.node, grads, |dy| B::dequantized_matmul_backward(dy, w));
            }
        }

        match DequantizedMatmul.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::dequantized_matmul(x.into_primitive(), w.clone());
                prep.finish(w, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::dequantized_matmul(x.into_primitive(), w)),
        }
    }
}

/// The product has a body on flex alone (burn's quantised tensors live there).
const FLEX_ONLY: crate::Reach = crate::Reach { flex: true, libtorch: false, cube: false };

/// Calls of the op whose backward keeps the quantised weight (for tests that check it ran).
static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How often [`dequantized_matmul`] ran through the backend extension in this process.
pub fn dequantized_matmul_calls() -> usize {
    CALLS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether `device`'s backend holds burn's quantised tensors and runs [`dequantized_matmul`]'s
/// extension (flex).
pub fn holds_quantized(device: &burn::tensor::Device) -> bool {
    crate::extended(&Tensor::<1>::zeros([1], device).into_dispatch().kind, FLEX_ONLY)
}

/// `x · deq(w)` for `x` `[N, in]` and a block-quantised `w` `[in, out]` (a frozen weight),
/// differentiable with respect to `x`, whose backward pass keeps `w` quantised (see the module
/// docs). A float `w`, or a backend without the extension, takes [`crate::matmul`].
pub fn dequantized_matmul(x: Tensor<2>, w: &Tensor<2>) -> Tensor<2> {
    let quantized = matches!(w.dtype(), DType::QFloat(_));
    if !quantized || !crate::extended(&x.clone().into_dispatch().kind, FLEX_ONLY) {
        return crate::matmul(x, w.clone());
    }
    CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = <Dispatch as QuantizedMatmulBackend>::dequantized_matmul(x.into_dispatch(), w.clone().into_dispatch());
    Tensor::from_dispatch(out)
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    #![allow(clippy::expect_used)]

    use burn::tensor::quantization::{QuantScheme, QuantStore, QuantValue};
    use burn::tensor::{Device, Tensor, TensorData};

    use super::*;

    fn vec(t: Tensor<2>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default()
    }

    /// A `[rows, cols]` Q8 weight with blocks of 4 along the rows, its f32 values, and its scales.
    fn weight(rows: usize, cols: usize, device: &Device) -> (Tensor<2>, Vec<f32>) {
        let q: Vec<i8> = (0..rows * cols).map(|i| ((i * 37 % 255) as i32 - 127) as i8).collect();
        let scales: Vec<f32> = (0..rows / 4 * cols).map(|b| 0.001 + (b % 7) as f32 * 0.0005).collect();
        let scheme = QuantScheme::default().with_value(QuantValue::Q8S).with_store(QuantStore::Native).per_block([4, 1], burn::tensor::quantization::ScaleDtype::F32);
        let values: Vec<f32> = (0..rows * cols).map(|i| f32::from(q[i]) * scales[(i / cols / 4) * cols + i % cols]).collect();
        let data = TensorData::quantized(q, [rows, cols], scheme, &scales, None);
        (Tensor::<2>::from_data(data, device), values)
    }

    #[test]
    fn values_and_input_gradients_match_the_f32_weight() {
        let device = Device::flex().autodiff();
        let (n, rows, cols) = (5, 8, 6);
        let (w, values) = weight(rows, cols, &device);
        let dense = Tensor::<2>::from_data(TensorData::new(values.clone(), [rows, cols]), &device);
        let xs: Vec<f32> = (0..n * rows).map(|i| ((i * 13 % 17) as f32 - 8.0) / 4.0).collect();
        let dy: Vec<f32> = (0..n * cols).map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0).collect();
        let run = |quantized: bool| {
            let x = Tensor::<2>::from_data(TensorData::new(xs.clone(), [n, rows]), &device).require_grad();
            let before = dequantized_matmul_calls();
            let y = if quantized { dequantized_matmul(x.clone(), &w) } else { x.clone().matmul(dense.clone()) };
            if quantized {
                assert!(dequantized_matmul_calls() > before, "the extension did not run");
            }
            let weights = Tensor::<2>::from_data(TensorData::new(dy.clone(), [n, cols]), &device);
            let grads = (y.clone() * weights).sum().backward();
            (vec(y.inner()), vec(x.grad(&grads).expect("x has a gradient")))
        };
        let ((y, gx), (want_y, want_gx)) = (run(true), run(false));
        for (a, b) in y.iter().zip(&want_y).chain(gx.iter().zip(&want_gx)) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} against {b}");
        }
        // And without autodiff.
        let x = Tensor::<2>::from_data(TensorData::new(xs, [n, rows]), &Device::flex());
        let (w, _) = weight(rows, cols, &Device::flex());
        for (a, b) in vec(dequantized_matmul(x, &w)).iter().zip(&want_y) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} against {b}");
        }
    }
}
