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
//! torch calls (in half precision on CUDA torch's own RMSNorm, one kernel each way, which rounds
//! `x̂ · γ` computed in f32 once, its autograd record kept by the forward pass for the backward's),
//! on flex one loop each over the rows, split over the CPU's threads, on the cubecl backends one
//! kernel forward and one backward (plus the sum of `dγ`'s shares over the rows). On a GPU, where
//! a small model's step waits on the host issuing operations, that is a few hundred operations
//! fewer a step.

// burn-tch is marked deprecated upstream; it is still the libtorch backend of burn 0.22.
#![cfg_attr(feature = "tch", allow(deprecated))]

use burn::backend::autodiff::NodeId;
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
        tensor_ops::<Self>(x, gamma, eps)
    }

    /// The gradients `(dx, dγ)` of [`Self::rms_norm`] for the output gradient `dy`.
    fn rms_norm_backward(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f64, dy: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        tensor_ops_backward::<Self>(x, gamma, eps, dy)
    }
}

/// What a tracked forward pass may keep for its backward pass besides the inputs: libtorch in half
/// precision on CUDA keeps torch's autograd record of its RMSNorm, as PyTorch's step does, so that
/// the backward pass applies the record's backward kernel instead of running the forward kernel
/// again to record it. The others keep nothing (`()`).
pub trait KeptRmsNorm: RmsNormBackend {
    /// The kept state.
    type Kept: Clone + Send + std::fmt::Debug + 'static;

    /// [`RmsNormBackend::rms_norm`] and what its backward pass may reuse (`None`: nothing).
    fn rms_norm_keeping(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f64) -> (FloatTensor<Self>, Option<Self::Kept>) {
        (Self::rms_norm(x, gamma, eps), None)
    }

    /// [`RmsNormBackend::rms_norm_backward`] with what the forward pass kept.
    fn rms_norm_backward_kept(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f64, dy: FloatTensor<Self>, kept: Option<Self::Kept>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let _ = kept;
        Self::rms_norm_backward(x, gamma, eps, dy)
    }
}

#[cfg(feature = "flex")]
impl KeptRmsNorm for burn::backend::Flex {
    type Kept = ();
}

#[cfg(feature = "cube")]
impl KeptRmsNorm for burn::backend::Cube {
    type Kept = ();
}

/// [`RmsNormBackend::rms_norm`] in the backend's tensor operations.
fn tensor_ops<B: Backend>(x: FloatTensor<B>, gamma: FloatTensor<B>, eps: f64) -> FloatTensor<B> {
    let gamma = broadcast::<B>(gamma, &x);
    B::float_mul(normalized::<B>(x, eps).0, gamma)
}

/// [`RmsNormBackend::rms_norm_backward`] in the backend's tensor operations.
fn tensor_ops_backward<B: Backend>(x: FloatTensor<B>, gamma: FloatTensor<B>, eps: f64, dy: FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>) {
    let d = gamma.shape()[0];
    let last = x.shape().num_dims() - 1;
    let gamma = broadcast::<B>(gamma, &x);
    let (xh, r) = normalized::<B>(x, eps);
    let rows = B::float_reshape(B::float_mul(dy.clone(), xh.clone()), Shape::new([dy.shape().num_elements() / d, d]));
    let dgamma = B::float_reshape(B::float_sum_dim(rows, 0), Shape::new([d]));
    let g = B::float_mul(dy, gamma);
    let dot = B::float_mean_dim(B::float_mul(g.clone(), xh.clone()), last);
    let dx = B::float_div(B::float_sub(g, B::float_mul(xh, dot)), r);
    (dx, dgamma)
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

/// flex: each pass one loop over the rows of its f32 buffers, split over rayon's threads, with
/// `r` recomputed per row in the backward pass. Half precision takes the tensor operations.
#[cfg(feature = "flex")]
impl RmsNormBackend for burn::backend::Flex {
    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        flex::forward(&x, &gamma, eps).unwrap_or_else(|| tensor_ops::<Self>(x, gamma, eps))
    }

    fn rms_norm_backward(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f64, dy: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        flex::backward(&x, &gamma, eps, &dy).unwrap_or_else(|| tensor_ops_backward::<Self>(x, gamma, eps, dy))
    }
}

/// The loops of the flex body, over rows of `D` elements in runs of rows per rayon task. The
/// arithmetic is the tensor operations' (the mean square summed in f32 in row order, then divided;
/// `x / r` then `· γ`), so the two agree to rounding.
#[cfg(feature = "flex")]
mod flex {
    use burn::backend::flex::FlexTensor;
    use burn::tensor::{DType, Shape};
    use rayon::prelude::*;

    use crate::cpu::flex::{tensor, with_rows};

    /// `D`, when `x` `[.., D]` and `γ` `[D]` are f32 tensors with `D > 0`.
    fn width(x: &FlexTensor, gamma: &FlexTensor) -> Option<usize> {
        let (xs, gs) = (x.layout().shape(), gamma.layout().shape());
        let d = *xs.last()?;
        (x.dtype() == DType::F32 && gamma.dtype() == DType::F32 && gs.num_dims() == 1 && gs[0] == d && d > 0).then_some(d)
    }

    /// Elements per rayon task: whole rows, about [`crate::cpu::CHUNK`] of them.
    fn run(d: usize) -> usize {
        (crate::cpu::CHUNK / d).max(1) * d
    }

    /// `r = √(mean(x²) + ε)` of one row.
    fn root(x: &[f32], eps: f64) -> f32 {
        let ms = x.iter().map(|&a| a * a).sum::<f32>() / x.len() as f32;
        (ms + eps as f32).sqrt()
    }

    pub(super) fn forward(x: &FlexTensor, gamma: &FlexTensor, eps: f64) -> Option<FlexTensor> {
        let d = width(x, gamma)?;
        let out = with_rows(gamma, |gm| {
            with_rows(x, |xs| {
                let mut out = vec![0f32; xs.len()];
                out.par_chunks_mut(run(d)).zip(xs.par_chunks(run(d))).for_each(|(o, x)| {
                    for (o, x) in o.chunks_mut(d).zip(x.chunks(d)) {
                        let r = root(x, eps);
                        for ((o, &x), &g) in o.iter_mut().zip(x).zip(gm) {
                            *o = x / r * g;
                        }
                    }
                });
                out
            })
        })??;
        Some(tensor(x.layout().shape().clone(), out))
    }

    pub(super) fn backward(x: &FlexTensor, gamma: &FlexTensor, eps: f64, dy: &FlexTensor) -> Option<(FlexTensor, FlexTensor)> {
        let d = width(x, gamma)?;
        if dy.dtype() != DType::F32 || dy.layout().shape() != x.layout().shape() {
            return None;
        }
        let (dx, dgamma) = with_rows(gamma, |gm| {
            with_rows(x, |xs| {
                with_rows(dy, |dys| {
                    let mut dx = vec![0f32; xs.len()];
                    // Each task's share of dγ, summed afterwards in task order (the same sum at
                    // any thread count).
                    let parts: Vec<Vec<f32>> = dx
                        .par_chunks_mut(run(d))
                        .zip(xs.par_chunks(run(d)))
                        .zip(dys.par_chunks(run(d)))
                        .map(|((o, x), dy)| {
                            let mut dgamma = vec![0f32; d];
                            for ((o, x), dy) in o.chunks_mut(d).zip(x.chunks(d)).zip(dy.chunks(d)) {
                                let r = root(x, eps);
                                let mut dot = 0f32;
                                for (((&x, &dy), &g), dg) in x.iter().zip(dy).zip(gm).zip(dgamma.iter_mut()) {
                                    let xh = x / r;
                                    *dg += dy * xh;
                                    dot += dy * g * xh;
                                }
                                let dot = dot / d as f32;
                                for (((o, &x), &dy), &g) in o.iter_mut().zip(x).zip(dy).zip(gm) {
                                    *o = (dy * g - x / r * dot) / r;
                                }
                            }
                            dgamma
                        })
                        .collect();
                    let mut dgamma = vec![0f32; d];
                    for part in &parts {
                        for (a, &b) in dgamma.iter_mut().zip(part) {
                            *a += b;
                        }
                    }
                    (dx, dgamma)
                })
            })
        })???;
        Some((tensor(x.layout().shape().clone(), dx), tensor(Shape::new([d]), dgamma)))
    }
}

/// The cubecl backends: one kernel forward, and backward one kernel for `dx` and the rows' shares
/// of `dγ` plus the sum over the rows (and a cast in half precision), where the tensor operations
/// launch eight and about fifteen. Tensors the kernels do not take keep the tensor operations.
#[cfg(feature = "cube")]
impl RmsNormBackend for burn::backend::Cube {
    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        if cube::fits(&x, &gamma, None) { cube::forward(x, gamma, eps) } else { tensor_ops::<Self>(x, gamma, eps) }
    }

    fn rms_norm_backward(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f64, dy: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if cube::fits(&x, &gamma, Some(&dy)) {
            let dtype = gamma.dtype;
            let (dx, shares) = cube::backward(x, gamma, eps, dy);
            (dx, column_sums::<Self>(shares, dtype))
        } else {
            tensor_ops_backward::<Self>(x, gamma, eps, dy)
        }
    }
}

/// `Σ_rows` of `[rows, D]` f32 `shares` as `[D]` of `dtype`, in two reductions: over runs of
/// [`RUN`] rows, then over the runs (and the rows after the last whole run). burn-cubecl without
/// autotune gives a reduction one unit per output, so one reduction over every row is `D` units,
/// each adding thousands of rows in turn (8,192 at 8 × 512 tokens): a GPU left nearly idle.
#[cfg(feature = "cube")]
fn column_sums<B: Backend>(shares: FloatTensor<B>, dtype: DType) -> FloatTensor<B> {
    let (rows, d) = (shares.shape()[0], shares.shape()[1]);
    let sums = if rows >= 2 * RUN {
        let runs = rows / RUN;
        let whole = if runs * RUN == rows { shares.clone() } else { B::float_slice(shares.clone(), &[burn::tensor::Slice::from(0..runs * RUN)]) };
        let partial = B::float_sum_dim(B::float_reshape(whole, Shape::new([runs, RUN, d])), 1);
        let sums = B::float_sum_dim(B::float_reshape(partial, Shape::new([runs, d])), 0);
        if runs * RUN == rows { sums } else { B::float_add(sums, B::float_sum_dim(B::float_slice(shares, &[burn::tensor::Slice::from(runs * RUN..rows)]), 0)) }
    } else {
        B::float_sum_dim(shares, 0)
    };
    let sums = B::float_reshape(sums, Shape::new([d]));
    if dtype == DType::F32 { sums } else { B::float_cast(sums, dtype.into()) }
}

/// The rows [`column_sums`] adds in its first reduction.
#[cfg(feature = "cube")]
const RUN: usize = 64;

/// The kernels of the cubecl body: one cube of units per row (rows beyond the grid's width taken
/// in turn), each unit summing a stride of the row's columns in f32 and the cube adding the units'
/// sums through shared memory. The forward pass rounds as the tensor operations do (`r` and `x / r`
/// to the tensors' dtype); the backward pass computes in f32 and rounds once.
#[cfg(feature = "cube")]
mod cube {
    use burn::backend::TensorMetadata;
    use burn::tensor::{DType, Shape};
    use burn_backend::cubecl::dtype_to_storage_type;
    // The `cube` macro's expansion names the `cubecl` crate.
    use burn_cubecl::cubecl;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::prelude::*;
    use cubecl::std::tensor::layout::linear::{LinearView, LinearViewMut};

    use crate::reduce::{cube_sums, row_launch};

    /// `√(Σx² / d + ε)` rounded to `F`, from the cube's sum of squares.
    #[cube]
    fn root<F: Float>(sum_sq: f32, d: usize, eps: f32) -> f32 {
        f32::cast_from(F::cast_from((sum_sq / f32::cast_from(d) + eps).sqrt()))
    }

    #[cube(launch_unchecked, address_type = "dynamic")]
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_kernel<F: Float>(
        x: LinearView<'_, F>,
        gamma: LinearView<'_, F>,
        mut y: LinearViewMut<'_, F>,
        rows: usize,
        d: usize,
        eps: f32,
        #[comptime] block: usize,
        #[define(F)] _dtype: ElemType,
    ) {
        let t = UNIT_POS_X as usize;
        let mut sums = Shared::<[f32]>::new_slice(block);
        let mut row = CUBE_POS_X as usize;
        while row < rows {
            let base = row * d;
            let mut acc = 0.0f32;
            let mut c = t;
            while c < d {
                let v = f32::cast_from(x.read(base + c));
                acc += v * v;
                c += block;
            }
            sums[t] = acc;
            cube_sums(&mut sums, 1usize);
            let r = root::<F>(sums[0], d, eps);
            c = t;
            while c < d {
                let xh = f32::cast_from(F::cast_from(f32::cast_from(x.read(base + c)) / r));
                y.write(base + c, F::cast_from(xh * f32::cast_from(gamma.read(c))));
                c += block;
            }
            // Every unit has read the total before the next row's sums overwrite it.
            sync_cube();
            row += CUBE_COUNT_X as usize;
        }
    }

    /// `dx` as `x`'s dtype, and each row's `dy · x̂` in f32 (`shares`, `[rows, d]`) for `dγ`.
    #[cube(launch_unchecked, address_type = "dynamic")]
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_backward_kernel<F: Float>(
        x: LinearView<'_, F>,
        gamma: LinearView<'_, F>,
        dy: LinearView<'_, F>,
        mut dx: LinearViewMut<'_, F>,
        shares: &mut Tensor<f32>,
        rows: usize,
        d: usize,
        eps: f32,
        #[comptime] block: usize,
        #[define(F)] _dtype: ElemType,
    ) {
        let t = UNIT_POS_X as usize;
        let mut sums = Shared::<[f32]>::new_slice(2 * block);
        let mut row = CUBE_POS_X as usize;
        while row < rows {
            let base = row * d;
            let mut sq = 0.0f32;
            let mut gx = 0.0f32;
            let mut c = t;
            while c < d {
                let v = f32::cast_from(x.read(base + c));
                sq += v * v;
                gx += f32::cast_from(dy.read(base + c)) * f32::cast_from(gamma.read(c)) * v;
                c += block;
            }
            sums[t] = sq;
            sums[block + t] = gx;
            cube_sums(&mut sums, 2usize);
            let r = root::<F>(sums[0], d, eps);
            // mean(g · x̂) with g = dy · γ.
            let dot = sums[block] / r / f32::cast_from(d);
            c = t;
            while c < d {
                let xh = f32::cast_from(x.read(base + c)) / r;
                let g = f32::cast_from(dy.read(base + c));
                dx.write(base + c, F::cast_from((g * f32::cast_from(gamma.read(c)) - xh * dot) / r));
                shares[base + c] = g * xh;
                c += block;
            }
            sync_cube();
            row += CUBE_COUNT_X as usize;
        }
    }

    /// Whether the kernels take these tensors: `x` `[.., D]` with `D > 0` rows, `γ` `[D]` and `dy`
    /// of `x`'s shape, all of one float dtype, none tiled.
    pub(super) fn fits(x: &CubeTensor, gamma: &CubeTensor, dy: Option<&CubeTensor>) -> bool {
        let (xs, gs) = (x.shape(), gamma.shape());
        let d = xs.as_slice().last().copied().unwrap_or(0);
        let float = matches!(x.dtype, DType::F32 | DType::F16 | DType::BF16);
        let like = |t: &CubeTensor| t.dtype == x.dtype && !t.meta.is_tiled();
        float && d > 0 && xs.num_elements() > 0 && gs.num_dims() == 1 && gs[0] == d && like(x) && like(gamma) && dy.is_none_or(|dy| like(dy) && dy.shape() == xs)
    }

    fn rows(x: &CubeTensor, d: usize) -> usize {
        x.shape().num_elements() / d
    }

    /// RMSNorm of tensors the kernel takes ([`fits`]).
    pub(super) fn forward(x: CubeTensor, gamma: CubeTensor, eps: f64) -> CubeTensor {
        let d = gamma.shape()[0];
        let rows = rows(&x, d);
        let y = crate::elementwise_output(&x);
        let (count, dim, block) = row_launch(rows, d);
        let address = [&x, &gamma, &y].iter().map(|t| t.required_address_type()).max().unwrap_or_default();
        let (client, dtype) = (y.client.clone(), dtype_to_storage_type(x.dtype));
        // SAFETY: every read and write is at `row · d + c` with `row < rows` and `c < d`, within the
        // views of `x` and `y` (`rows · d` elements) and at `c < d` within `γ`'s.
        #[allow(unsafe_code)]
        unsafe {
            rms_norm_kernel::launch_unchecked(&client, count, dim, address, x.into_linear_view_like(&y), gamma.into_linear_view(), y.clone().into_linear_view(), rows, d, eps as f32, block, dtype);
        }
        y
    }

    /// `(dx, shares)`, `shares` the rows' `dy · x̂` in f32 `[rows, d]`, for tensors the kernel takes
    /// ([`fits`]).
    pub(super) fn backward(x: CubeTensor, gamma: CubeTensor, eps: f64, dy: CubeTensor) -> (CubeTensor, CubeTensor) {
        let d = gamma.shape()[0];
        let rows = rows(&x, d);
        let dx = crate::elementwise_output(&x);
        // Contiguous: the kernel writes it at `row · d + c` (cubecl would pad rows of 576 f32 to 640).
        let shares = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), Shape::new([rows, d]), DType::F32);
        let (count, dim, block) = row_launch(rows, d);
        let address = [&x, &gamma, &dy, &dx, &shares].iter().map(|t| t.required_address_type()).max().unwrap_or_default();
        let (client, dtype) = (dx.client.clone(), dtype_to_storage_type(x.dtype));
        // SAFETY: as in `forward`; `shares` is a new contiguous `[rows, d]` tensor.
        #[allow(unsafe_code)]
        unsafe {
            rms_norm_backward_kernel::launch_unchecked(
                &client,
                count,
                dim,
                address,
                x.into_linear_view_like(&dx),
                gamma.into_linear_view(),
                dy.into_linear_view_like(&dx),
                dx.clone().into_linear_view(),
                shares.clone().into_tensor_arg(),
                rows,
                d,
                eps as f32,
                block,
                dtype,
            );
        }
        (dx, shares)
    }
}

/// libtorch: in half precision on CUDA (`x` and `γ` of one dtype) torch's own RMSNorm,
/// `_fused_rms_norm`, whose backward pass its autograd runs; elsewhere the formulas above as
/// direct torch calls (on the CPU torch's RMSNorm is a composite of tensor operations, slower than
/// these in bf16).
#[cfg(feature = "tch")]
impl RmsNormBackend for burn::backend::LibTorch {
    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        if x.tensor.device().is_cuda()
            && let Some(y) = libtorch::fused(&x.tensor, &gamma.tensor, eps)
        {
            return burn::backend::libtorch::TchTensor::new(y);
        }
        let (xh, _) = libtorch::normalized(&x.tensor, eps);
        burn::backend::libtorch::TchTensor::new(xh * &gamma.tensor)
    }

    fn rms_norm_backward(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f64, dy: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if x.tensor.device().is_cuda()
            && let Some((dx, dgamma)) = libtorch::fused_backward(&x.tensor, &gamma.tensor, eps, &dy.tensor)
        {
            return (burn::backend::libtorch::TchTensor::new(dx), burn::backend::libtorch::TchTensor::new(dgamma));
        }
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

/// libtorch: in half precision on CUDA the forward pass runs torch's RMSNorm under its autograd,
/// on leaves that share `x` and `γ`'s memory, and keeps the record (which holds `x`, `γ` and the
/// rows' `rsqrt`, the first two held anyway); the backward pass applies it to `dy`. Without it the
/// backward pass ran the forward kernel again to record it: 4 bytes an element of bf16 more and
/// one more kernel a norm (on Llama-3.2-1B's step of 8 pairs × 512 tokens, 33 norms over 16.8
/// million elements each, 2.2 GB).
#[cfg(feature = "tch")]
impl KeptRmsNorm for burn::backend::LibTorch {
    type Kept = libtorch::Recorded;

    fn rms_norm_keeping(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f64) -> (FloatTensor<Self>, Option<Self::Kept>) {
        if crate::keeps_for_backward(x.tensor.device())
            && let Some((y, recorded)) = libtorch::fused_recorded(&x, &gamma, eps)
        {
            return (y, Some(recorded));
        }
        (Self::rms_norm(x, gamma, eps), None)
    }

    fn rms_norm_backward_kept(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f64, dy: FloatTensor<Self>, kept: Option<Self::Kept>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if let Some(recorded) = kept
            && let Some((dx, dgamma)) = libtorch::backward_recorded(&recorded, &dy.tensor)
        {
            return (burn::backend::libtorch::TchTensor::new(dx), burn::backend::libtorch::TchTensor::new(dgamma));
        }
        Self::rms_norm_backward(x, gamma, eps, dy)
    }
}

/// Calls of torch's RMSNorm kernel in this process, forward and backward (libtorch, half precision).
#[cfg(feature = "tch")]
pub(crate) fn torch_calls() -> [usize; 2] {
    libtorch::FUSED.each_ref().map(|n| n.load(std::sync::atomic::Ordering::Relaxed))
}

#[cfg(feature = "tch")]
mod libtorch {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use burn::backend::libtorch::TchTensor;
    use tch::{Kind, Tensor};

    /// Calls of torch's RMSNorm (forward, backward), for the tests.
    pub(crate) static FUSED: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

    /// Half-precision `x` and `γ` of one dtype take torch's RMSNorm. On CUDA that is one kernel
    /// each way that reads a row for its mean square and again, mostly from the cache, for the
    /// output, where the torch calls below widen `x` to an f32 copy and square, reduce, divide and
    /// scale in five passes over the rows (4 to 6 bytes moved an element of bf16 against 26
    /// forward). torch rounds
    /// `x · rsqrt(mean(x²) + ε) · γ` computed in f32 once on CUDA (its CPU composite rounds `x̂`
    /// first, as transformers does), where the calls below round `r`, `x̂` and `y` in turn.
    fn takes_fused(x: &Tensor, gamma: &Tensor) -> bool {
        matches!(x.kind(), Kind::BFloat16 | Kind::Half) && gamma.kind() == x.kind() && gamma.dim() == 1
    }

    /// `y` through torch's RMSNorm, or `None` where it does not apply or refuses the inputs.
    pub(super) fn fused(x: &Tensor, gamma: &Tensor, eps: f64) -> Option<Tensor> {
        if !takes_fused(x, gamma) {
            return None;
        }
        let (y, _) = x.f_internal_fused_rms_norm([gamma.size()[0]], Some(gamma), eps).ok()?;
        FUSED[0].fetch_add(1, Ordering::Relaxed);
        Some(y)
    }

    /// `(dx, dγ)` through torch's autograd of its RMSNorm (`crate::torch_vjp`), recorded again over
    /// leaves that share `x` and `γ`'s memory (tch binds no backward kernel). On CUDA that is
    /// torch's fused backward, which reads the forward's `rsqrt` and writes `dx` in one
    /// kernel and `dγ`'s column sums in another; with the forward, the product and its sum, about 26
    /// bytes moved an element of bf16, against 56 for the calls below.
    pub(super) fn fused_backward(x: &Tensor, gamma: &Tensor, eps: f64, dy: &Tensor) -> Option<(Tensor, Tensor)> {
        if !takes_fused(x, gamma) {
            return None;
        }
        let (xl, gl) = (x.detach().set_requires_grad(true), gamma.detach().set_requires_grad(true));
        let (y, _) = tch::with_grad(|| xl.f_internal_fused_rms_norm([gamma.size()[0]], Some(&gl), eps)).ok()?;
        if !y.requires_grad() {
            return None;
        }
        let [dx, dgamma] = crate::torch_vjp(&y, dy, [&xl, &gl])?;
        FUSED[1].fetch_add(1, Ordering::Relaxed);
        Some((dx, dgamma))
    }

    /// torch's autograd record of its RMSNorm: the output that carries it, and the leaves it
    /// differentiates (sharing `x` and `γ`'s memory and burn's count of their holders, so that
    /// burn writes over neither while the record holds them).
    #[derive(Clone, Debug)]
    pub struct Recorded {
        out: TchTensor,
        inputs: [TchTensor; 2],
    }

    /// `y` through torch's RMSNorm under its autograd, and the record; `None` where it does not
    /// apply, torch refuses or records nothing (its grad mode off).
    pub(super) fn fused_recorded(x: &TchTensor, gamma: &TchTensor, eps: f64) -> Option<(TchTensor, Recorded)> {
        if !takes_fused(&x.tensor, &gamma.tensor) {
            return None;
        }
        let inputs = [x, gamma].map(crate::torch_leaf);
        let [lx, lg] = &inputs;
        let (y, _) = tch::with_grad(|| lx.tensor.f_internal_fused_rms_norm([gamma.tensor.size()[0]], Some(&lg.tensor), eps)).ok()?;
        if !y.requires_grad() {
            return None;
        }
        FUSED[0].fetch_add(1, Ordering::Relaxed);
        let out = TchTensor::new(y);
        Some((crate::torch_shown(&out), Recorded { out, inputs }))
    }

    /// `(dx, dγ)` from the kept record (`crate::torch_vjp`); `None` where torch refuses.
    pub(super) fn backward_recorded(recorded: &Recorded, dy: &Tensor) -> Option<(Tensor, Tensor)> {
        let [dx, dgamma] = crate::torch_vjp(&recorded.out.tensor, dy, recorded.inputs.each_ref().map(|t| &t.tensor))?;
        FUSED[1].fetch_add(1, Ordering::Relaxed);
        Some((dx, dgamma))
    }

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

/// Autodiff: the inner backend's normalisation, recorded as one operation whose backward step
/// reads its inputs through the checkpointer, and what the inner backend kept ([`KeptRmsNorm`]).
/// It is memory-bound: under gradient checkpointing its output (the projections' input) is not
/// kept but computed again from its inputs, themselves kept or computed again as the checkpointing
/// decides (the residual sums are memory-bound in burn).
impl<B: Backend + KeptRmsNorm, C: CheckpointStrategy> RmsNormBackend for Autodiff<B, C> {
    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct RmsNorm(f64);

        impl<B: Backend + KeptRmsNorm> Backward<B, 2> for RmsNorm {
            type State = (NodeId, NodeId, Option<B::Kept>);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let [node_x, node_gamma] = ops.parents;
                let dy = grads.consume::<B>(&ops.node);
                let (node_x_out, node_gamma_out, kept) = ops.state;
                let (x, gamma) = (checkpointer.retrieve_node_output(node_x_out), checkpointer.retrieve_node_output(node_gamma_out));
                let (dx, dgamma) = B::rms_norm_backward_kept(x, gamma, self.0, dy, kept);
                for (node, grad) in [(node_x, dx), (node_gamma, dgamma)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        let retro = crate::retro::Binary::<B, _>(x.node().id(), gamma.node().id(), eps, B::rms_norm);
        match RmsNorm(eps).prepare::<C>([x.node(), gamma.node()]).memory_bound().retro_forward(retro).parents([&x, &gamma]).stateful() {
            OpsKind::Tracked(mut prep) => {
                let (node_x, node_gamma) = (prep.checkpoint(&x), prep.checkpoint(&gamma));
                let (x, gamma) = (x.primitive().clone(), gamma.primitive().clone());
                let (y, kept) = if crate::keeps_more::<C>() { B::rms_norm_keeping(x, gamma, eps) } else { (B::rms_norm(x, gamma, eps), None) };
                prep.finish((node_x, node_gamma, kept), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rms_norm(x.primitive().clone(), gamma.primitive().clone(), eps)),
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

#[cfg(all(test, feature = "flex"))]
#[allow(clippy::expect_used)]
mod tests {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::tensor::TensorData;

    use super::*;
    use crate::cpu::flex::testing::{values, wave};

    fn close(name: &str, a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len(), "{name}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * y.abs().max(1.0), "{name}[{i}]: {x} against {y}");
        }
    }

    /// The flex loops against the tensor operations over 1,200 rows of 96, which rayon takes in
    /// several tasks, so that dγ is the sum of several tasks' shares.
    #[test]
    fn the_flex_loops_match_the_tensor_operations() {
        let (rows, d, eps) = (1200, 96, 1e-5);
        // Rows of very different sizes, as the residual stream has.
        let x: Vec<f32> = wave(rows * d, 1, 1.0).iter().enumerate().map(|(i, v)| v * (1 + (i / d) % 37) as f32).collect();
        let x = FlexTensor::from_data(TensorData::new(x, [3, rows / 3, d]));
        let gamma = FlexTensor::from_data(TensorData::new(wave(d, 2, 1.0).iter().map(|v| 1.0 + v).collect::<Vec<_>>(), [d]));
        let dy = FlexTensor::from_data(TensorData::new(wave(rows * d, 3, 1.0), [3, rows / 3, d]));
        let y = flex::forward(&x, &gamma, eps).expect("the loop takes f32 rows");
        close("y", &values(&y), &values(&tensor_ops::<Flex>(x.clone(), gamma.clone(), eps)), 1e-5);
        let (dx, dgamma) = flex::backward(&x, &gamma, eps, &dy).expect("the loop takes f32 rows");
        let (dx_ops, dgamma_ops) = tensor_ops_backward::<Flex>(x, gamma, eps, dy);
        close("dx", &values(&dx), &values(&dx_ops), 1e-5);
        // A sum over 1,200 rows, in another order.
        close("dgamma", &values(&dgamma), &values(&dgamma_ops), 1e-4);
    }
}

#[cfg(all(test, feature = "tch"))]
#[allow(clippy::expect_used)]
mod torch_tests {
    use std::sync::atomic::Ordering;

    use tch::{Kind, Tensor};

    use burn::backend::libtorch::TchTensor;

    use super::libtorch::{FUSED, backward_recorded, fused, fused_backward, fused_recorded, normalized};

    fn vec(t: &Tensor) -> Vec<f32> {
        Vec::try_from(&t.to_kind(Kind::Float).reshape([-1])).expect("f32 values")
    }

    /// torch's RMSNorm as the CUDA path calls it (here on the CPU, where torch composes it of tensor
    /// operations): `y`, and `dx`, `dγ` from its autograd record over leaves seeded with `dy`, give
    /// what the torch calls of the f32 path give on the same rounded inputs, within a few
    /// roundings to the dtype (measured against each tensor's largest entry), in bf16 and f16;
    /// f32 inputs, or a `γ` of another dtype, are left to those calls.
    #[test]
    fn torchs_rms_norm_matches_the_torch_calls() {
        let (rows, d, eps) = (9, 64, 1e-5);
        let scale = Tensor::rand([rows, 1], (Kind::Float, tch::Device::Cpu)) * 20.0 + 0.1;
        let x = Tensor::randn([rows, d], (Kind::Float, tch::Device::Cpu)) * scale;
        let gamma = Tensor::randn([d], (Kind::Float, tch::Device::Cpu)) * 0.5 + 1.0;
        let dy = Tensor::randn([rows, d], (Kind::Float, tch::Device::Cpu));
        assert!(fused(&x, &gamma, eps).is_none() && fused_backward(&x, &gamma, eps, &dy).is_none(), "f32 takes the torch calls");
        for (kind, tol) in [(Kind::BFloat16, 4.0 / 256.0), (Kind::Half, 4.0 / 2048.0)] {
            let (xh, gh, dyh) = (x.to_kind(kind), gamma.to_kind(kind), dy.to_kind(kind));
            assert!(fused(&xh, &gamma, eps).is_none(), "{kind:?}: a γ of another dtype takes the torch calls");
            let before = FUSED.each_ref().map(|n| n.load(Ordering::Relaxed));
            let y = fused(&xh, &gh, eps).expect("torch's RMSNorm takes half precision");
            let (dx, dg) = fused_backward(&xh, &gh, eps, &dyh).expect("torch's autograd records it");
            let after = FUSED.each_ref().map(|n| n.load(Ordering::Relaxed));
            assert!(after[0] > before[0] && after[1] > before[1], "{kind:?}: {before:?} → {after:?}");
            assert_eq!((y.kind(), dx.kind(), dg.kind()), (kind, kind, kind), "results in the inputs' dtype");
            // The f32 path's calls on the same rounded inputs.
            let (x32, g32, dy32) = (xh.to_kind(Kind::Float), gh.to_kind(Kind::Float), dyh.to_kind(Kind::Float));
            let (xhat, r) = normalized(&x32, eps);
            let want_y = &xhat * &g32;
            let want_dg = (&dy32 * &xhat).sum_dim_intlist(0, false, None::<Kind>);
            let g = &dy32 * &g32;
            let dot = (&g * &xhat).mean_dim(-1, true, None::<Kind>);
            let want_dx = (g - &xhat * dot) / &r;
            for (name, got, want) in [("y", &y, &want_y), ("dx", &dx, &want_dx), ("dgamma", &dg, &want_dg)] {
                let (got, want) = (vec(got), vec(want));
                let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let diff = got.iter().zip(&want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(diff <= tol * scale, "{kind:?} {name}: {diff} from the f32 calls, largest entry {scale}");
            }
            // The record kept by the forward pass (as CUDA's tracked forward keeps it) gives the
            // same output and, applied to `dy`, the same gradients as recording it again.
            let (bx, bg) = (TchTensor::new(xh.copy()), TchTensor::new(gh.copy()));
            let (shown, recorded) = fused_recorded(&bx, &bg, eps).expect("torch's autograd records it");
            assert!(!bx.can_mut() && !bg.can_mut(), "{kind:?}: burn could write over what the record holds");
            let (kdx, kdg) = backward_recorded(&recorded, &dyh).expect("the record takes dy");
            assert!(shown.tensor.equal(&y) && !shown.tensor.requires_grad(), "{kind:?}: the output shown to the model");
            assert!(kdx.equal(&dx) && kdg.equal(&dg), "{kind:?}: the kept record's gradients differ from the recorded again");
        }
    }
}
