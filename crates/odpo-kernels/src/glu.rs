//! The gated MLP unit of the Llama and Gemma families (Shazeer 2020, "GLU Variants Improve
//! Transformer", arXiv:2002.05202; transformers' `LlamaMLP` / `GemmaMLP`:
//! `act_fn(gate_proj(x)) * up_proj(x)`), as one differentiable operation:
//!
//! ```text
//! y = a(g) · u
//! ∂L/∂u = dy · a(g),                ∂L/∂g = dy · u · a′(g)
//!
//! SwiGLU (Llama):          a(g) = g · σ(g)                       a′ = σ + a · (1 − σ)
//! GeGLU, tanh (Gemma):     a(g) = g/2 · (1 + t),                 a′ = (1 + t)/2 + g/2 · (1 − t²) · k · (1 + 3c·g²)
//!                          t = tanh(k · (g + c·g³)), k = √(2/π), c = 0.044715
//! GeGLU, exact:            a(g) = g · Φ(g),                      a′ = Φ(g) + g · φ(g)
//! ```
//!
//! Written with burn tensor operations, SwiGLU is three recorded operations and the tanh GELU
//! nine (burn's `gelu_approximate` is a power, a tanh and seven scalar and element-wise steps), each
//! with its backward pass, then the two paths added into `g`. Here it is one recorded operation;
//! on libtorch both passes are direct torch calls (`silu` / `gelu`, and `silu_backward` /
//! `gelu_backward` for the gate's gradient, as PyTorch's autograd runs them; on CUDA from `a(g)`
//! kept by the forward pass, as PyTorch's autograd keeps it), on flex one loop each over the f32
//! buffers, split over the CPU's threads. A model applies it in every layer, so on a GPU, where a
//! small model's step waits on the host issuing operations, that is a few hundred operations fewer
//! a step.

// burn-tch is marked deprecated upstream; it is still the libtorch backend of burn 0.22.
#![cfg_attr(feature = "tch", allow(deprecated))]

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, backend_extension};
use burn::tensor::Tensor;

/// The activation of a gated unit's gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// SiLU, `g · σ(g)` (SwiGLU; transformers' `silu`).
    Silu,
    /// GELU in its tanh approximation (GeGLU; transformers' `gelu_pytorch_tanh`, torch's
    /// `gelu(approximate="tanh")`).
    GeluTanh,
    /// GELU through the error function, `g · Φ(g)` (transformers' `gelu`).
    Gelu,
}

/// √(2/π), the tanh GELU's slope at the origin.
const K: f64 = 0.797_884_560_802_865_4;
/// The cubic term of the tanh GELU.
const C: f64 = 0.044_715;
/// 1/√(2π), the normal density at 0.
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// `a(g) · u` for a gate `g` and a value `u` of one shape, differentiable with respect to both.
#[backend_extension(Autodiff, Flex: cfg(feature = "flex"), LibTorch: cfg(feature = "tch"), Cube: cfg(feature = "cube"))]
pub trait GluBackend: Backend {
    /// `a(g) · u` for the gate's activation `a`.
    fn glu(g: FloatTensor<Self>, u: FloatTensor<Self>, gate: Gate) -> FloatTensor<Self> {
        tensor_ops::<Self>(g, u, gate)
    }

    /// The gradients `(dg, du)` of [`Self::glu`] for the output gradient `dy`.
    fn glu_backward(g: FloatTensor<Self>, u: FloatTensor<Self>, dy: FloatTensor<Self>, gate: Gate) -> (FloatTensor<Self>, FloatTensor<Self>) {
        tensor_ops_backward::<Self>(g, u, dy, gate)
    }
}

/// What a tracked forward pass may keep for its backward pass besides the inputs: libtorch on CUDA
/// keeps `a(g)`, as PyTorch's autograd keeps its `silu` node's output for the product's backward,
/// so that the backward pass reads it instead of computing it again. The others keep nothing and
/// compute it again (flex and the cubecl backends in one pass that reads `g`, `u` and `dy`).
pub trait KeptGlu: GluBackend {
    /// [`GluBackend::glu`] and `a(g)` where the backward pass reads it (`None`: nothing kept).
    fn glu_keeping(g: FloatTensor<Self>, u: FloatTensor<Self>, gate: Gate) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        (Self::glu(g, u, gate), None)
    }

    /// [`GluBackend::glu_backward`] with `a(g)` where the forward pass kept it.
    fn glu_backward_kept(g: FloatTensor<Self>, u: FloatTensor<Self>, a: Option<FloatTensor<Self>>, dy: FloatTensor<Self>, gate: Gate) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let _ = a;
        Self::glu_backward(g, u, dy, gate)
    }
}

#[cfg(feature = "flex")]
impl KeptGlu for burn::backend::Flex {}

#[cfg(feature = "cube")]
impl KeptGlu for burn::backend::Cube {}

/// [`GluBackend::glu`] in the backend's tensor operations.
fn tensor_ops<B: Backend>(g: FloatTensor<B>, u: FloatTensor<B>, gate: Gate) -> FloatTensor<B> {
    B::float_mul(activation::<B>(g, gate), u)
}

/// `a(g)` in the backend's tensor operations.
fn activation<B: Backend>(g: FloatTensor<B>, gate: Gate) -> FloatTensor<B> {
    match gate {
        Gate::Silu => B::float_mul(g.clone(), B::sigmoid(g)),
        Gate::GeluTanh => {
            let t = tanh_term::<B>(g.clone(), B::float_mul(g.clone(), g.clone()));
            B::float_mul_scalar(B::float_mul(g, B::float_add_scalar(t, 1.0f64.into())), 0.5f64.into())
        }
        Gate::Gelu => B::gelu(g),
    }
}

/// The tanh GELU's `t = tanh(k · g · (1 + c·g²))`, for `g` and `g2 = g²`.
fn tanh_term<B: Backend>(g: FloatTensor<B>, g2: FloatTensor<B>) -> FloatTensor<B> {
    let inner = B::float_mul(g, B::float_add_scalar(B::float_mul_scalar(g2, C.into()), 1.0f64.into()));
    B::float_tanh(B::float_mul_scalar(inner, K.into()))
}

/// [`GluBackend::glu_backward`] in the backend's tensor operations: `a(g)` and `a′(g)`, then the
/// two products.
fn tensor_ops_backward<B: Backend>(g: FloatTensor<B>, u: FloatTensor<B>, dy: FloatTensor<B>, gate: Gate) -> (FloatTensor<B>, FloatTensor<B>) {
    let one = || 1.0f64.into();
    let (a, slope) = match gate {
        Gate::Silu => {
            let s = B::sigmoid(g.clone());
            let a = B::float_mul(g, s.clone());
            // σ + a·(1 − σ)
            let one_minus_s = B::float_add_scalar(B::float_neg(s.clone()), one());
            let slope = B::float_add(s, B::float_mul(a.clone(), one_minus_s));
            (a, slope)
        }
        Gate::GeluTanh => {
            let g2 = B::float_mul(g.clone(), g.clone());
            let t = tanh_term::<B>(g.clone(), g2.clone());
            let a = B::float_mul_scalar(B::float_mul(g.clone(), B::float_add_scalar(t.clone(), one())), 0.5f64.into());
            // (1 + t)/2 + g/2 · (1 − t²) · k · (1 + 3c·g²)
            let one_minus_t2 = B::float_add_scalar(B::float_neg(B::float_mul(t.clone(), t.clone())), one());
            let d_inner = B::float_add_scalar(B::float_mul_scalar(g2, (3.0 * C).into()), one());
            let tail = B::float_mul_scalar(B::float_mul(B::float_mul(g, one_minus_t2), d_inner), (0.5 * K).into());
            let slope = B::float_add(B::float_mul_scalar(B::float_add_scalar(t, one()), 0.5f64.into()), tail);
            (a, slope)
        }
        Gate::Gelu => {
            // Φ(g) = (1 + erf(g/√2))/2, φ(g) = e^(−g²/2)/√(2π)
            let cdf = B::float_mul_scalar(B::float_add_scalar(B::float_erf(B::float_mul_scalar(g.clone(), std::f64::consts::FRAC_1_SQRT_2.into())), one()), 0.5f64.into());
            let pdf = B::float_mul_scalar(B::float_exp(B::float_mul_scalar(B::float_mul(g.clone(), g.clone()), (-0.5f64).into())), INV_SQRT_2PI.into());
            let a = B::float_mul(g.clone(), cdf.clone());
            (a, B::float_add(cdf, B::float_mul(g, pdf)))
        }
    };
    let du = B::float_mul(dy.clone(), a);
    let dg = B::float_mul(B::float_mul(dy, u), slope);
    (dg, du)
}

/// The flex loops: the activation and its slope at one f32 value, and the passes over a chunk of
/// positions. SiLU and the tanh GELU take the crate's polynomial `exp` (no libm call), so that the
/// loops run in vector lanes; on x86-64 in a copy compiled for AVX-512 or AVX2 + FMA where the CPU
/// has them.
#[cfg(feature = "flex")]
mod loops {
    use super::{C, Gate, INV_SQRT_2PI, K};
    use crate::softmax::exp;
    use multiversion::multiversion;

    /// σ(x) from `e = e^(−|x|)`, which cannot overflow: `1/(1 + e)`, or `e/(1 + e)` for negative x.
    #[inline(always)]
    fn sigmoid(x: f32) -> f32 {
        let e = exp(-x.abs());
        let inv = 1.0 / (1.0 + e);
        if x >= 0.0 { inv } else { e * inv }
    }

    /// `(t, 1 − t²)` for `t = tanh(k · x · (1 + c·x²))`, from `e = e^(−2|z|)`: `|t| = (1 − e)/(1 + e)`
    /// and `1 − t² = 4e/(1 + e)²`, which keeps its digits where t rounds to ±1.
    #[inline(always)]
    fn tanh_term(x: f32) -> (f32, f32) {
        let z = K as f32 * x * (1.0 + C as f32 * x * x);
        let e = exp(-2.0 * z.abs());
        let inv = 1.0 / (1.0 + e);
        (((1.0 - e) * inv).copysign(z), 4.0 * e * inv * inv)
    }

    /// `Φ(x)`, the standard normal distribution function.
    #[inline(always)]
    fn cdf(x: f32) -> f32 {
        0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
    }

    /// `a(x)`.
    #[inline(always)]
    pub(super) fn activation(gate: Gate, x: f32) -> f32 {
        match gate {
            Gate::Silu => x * sigmoid(x),
            Gate::GeluTanh => 0.5 * x * (1.0 + tanh_term(x).0),
            Gate::Gelu => x * cdf(x),
        }
    }

    /// `(a(x), a′(x))`.
    #[inline(always)]
    pub(super) fn with_slope(gate: Gate, x: f32) -> (f32, f32) {
        match gate {
            Gate::Silu => {
                let s = sigmoid(x);
                let a = x * s;
                (a, s + a * (1.0 - s))
            }
            Gate::GeluTanh => {
                let (t, one_minus_t2) = tanh_term(x);
                let half = 0.5 * (1.0 + t);
                (x * half, half + 0.5 * x * one_minus_t2 * K as f32 * (1.0 + 3.0 * C as f32 * x * x))
            }
            Gate::Gelu => {
                let p = cdf(x);
                (x * p, p + x * INV_SQRT_2PI as f32 * exp(-0.5 * x * x))
            }
        }
    }

    /// `y = a(g) · u`, the gate matched once outside the loop.
    #[inline(always)]
    pub(super) fn forward_any(gate: Gate, g: &[f32], u: &[f32], y: &mut [f32]) {
        #[inline(always)]
        fn each(g: &[f32], u: &[f32], y: &mut [f32], gate: Gate) {
            for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                *y = activation(gate, g) * u;
            }
        }
        match gate {
            Gate::Silu => each(g, u, y, Gate::Silu),
            Gate::GeluTanh => each(g, u, y, Gate::GeluTanh),
            Gate::Gelu => each(g, u, y, Gate::Gelu),
        }
    }

    /// `dg = dy · u · a′(g)`, `du = dy · a(g)`.
    #[inline(always)]
    pub(super) fn backward_any(gate: Gate, [g, u, dy]: [&[f32]; 3], dg: &mut [f32], du: &mut [f32]) {
        #[inline(always)]
        fn each([g, u, dy]: [&[f32]; 3], dg: &mut [f32], du: &mut [f32], gate: Gate) {
            for ((((dg, du), &g), &u), &dy) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
                let (a, slope) = with_slope(gate, g);
                *dg = dy * u * slope;
                *du = dy * a;
            }
        }
        match gate {
            Gate::Silu => each([g, u, dy], dg, du, Gate::Silu),
            Gate::GeluTanh => each([g, u, dy], dg, du, Gate::GeluTanh),
            Gate::Gelu => each([g, u, dy], dg, du, Gate::Gelu),
        }
    }

    /// [`forward_any`], in a copy compiled for AVX-512 or AVX2 + FMA where the CPU has them.
    #[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+fma", "x86_64+avx2+fma"))]
    pub(super) fn forward(gate: Gate, g: &[f32], u: &[f32], y: &mut [f32]) {
        forward_any(gate, g, u, y);
    }

    /// [`backward_any`], in a copy compiled for AVX-512 or AVX2 + FMA where the CPU has them.
    #[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+fma", "x86_64+avx2+fma"))]
    pub(super) fn backward(gate: Gate, inputs: [&[f32]; 3], dg: &mut [f32], du: &mut [f32]) {
        backward_any(gate, inputs, dg, du);
    }
}

/// flex: each pass one loop over its f32 buffers, in vector lanes, split over rayon's threads
/// (burn-flex's element-wise operations make a pass and a buffer per operation, on one thread).
/// Half precision takes the tensor operations.
#[cfg(feature = "flex")]
impl GluBackend for burn::backend::Flex {
    fn glu(g: FloatTensor<Self>, u: FloatTensor<Self>, gate: Gate) -> FloatTensor<Self> {
        match crate::cpu::flex::zip_chunks([&g, &u], |[g, u], [y]| loops::forward(gate, g, u, y)) {
            Some([y]) => y,
            None => tensor_ops::<Self>(g, u, gate),
        }
    }

    fn glu_backward(g: FloatTensor<Self>, u: FloatTensor<Self>, dy: FloatTensor<Self>, gate: Gate) -> (FloatTensor<Self>, FloatTensor<Self>) {
        match crate::cpu::flex::zip_chunks([&g, &u, &dy], |inputs, [dg, du]| loops::backward(gate, inputs, dg, du)) {
            Some([dg, du]) => (dg, du),
            None => tensor_ops_backward::<Self>(g, u, dy, gate),
        }
    }
}

/// The cubecl backends: one kernel for each pass of SwiGLU and the tanh GeGLU, where the tensor
/// operations launch three to nine forward and eight to twenty backward; the exact GELU keeps them.
#[cfg(feature = "cube")]
impl GluBackend for burn::backend::Cube {
    fn glu(g: FloatTensor<Self>, u: FloatTensor<Self>, gate: Gate) -> FloatTensor<Self> {
        if cube::fits(gate, &[&g, &u]) { cube::glu(g, u, gate) } else { tensor_ops::<Self>(g, u, gate) }
    }

    fn glu_backward(g: FloatTensor<Self>, u: FloatTensor<Self>, dy: FloatTensor<Self>, gate: Gate) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if cube::fits(gate, &[&g, &u, &dy]) { cube::glu_backward(g, u, dy, gate) } else { tensor_ops_backward::<Self>(g, u, dy, gate) }
    }
}

/// The kernels of the cubecl body, in f32 whatever the tensors' dtype.
#[cfg(feature = "cube")]
mod cube {
    use burn::backend::TensorMetadata;
    use burn_backend::cubecl::dtype_to_storage_type;
    // The `cube` macro's expansion names the `cubecl` crate.
    use burn_cubecl::cubecl;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::std::tensor::layout::linear::{LinearView, LinearViewMut};
    use cubecl::prelude::*;

    use super::Gate;

    /// The gate's transcendental term, computed once per element: `σ(x)` for SiLU, or with
    /// `tanh_gelu` the tanh GELU's `t = tanh(k · x · (1 + c·x²))` (`K` and `C` of the module).
    #[cube]
    fn term(x: f32, #[comptime] tanh_gelu: bool) -> f32 {
        if tanh_gelu { (0.797_884_6f32 * x * (1.0f32 + 0.044_715f32 * x * x)).tanh() } else { 1.0f32 / (1.0f32 + (-x).exp()) }
    }

    /// `a(x)` from `x` and its [`term`].
    #[cube]
    fn activation(x: f32, t: f32, #[comptime] tanh_gelu: bool) -> f32 {
        if tanh_gelu { 0.5f32 * x * (1.0f32 + t) } else { x * t }
    }

    /// `a′(x)` from `x` and its [`term`] (see the module docs).
    #[cube]
    fn slope(x: f32, t: f32, #[comptime] tanh_gelu: bool) -> f32 {
        if tanh_gelu {
            0.5f32 * (1.0f32 + t) + 0.5f32 * x * (1.0f32 - t * t) * 0.797_884_6f32 * (1.0f32 + 0.134_145f32 * x * x)
        } else {
            t + x * t * (1.0f32 - t)
        }
    }

    #[cube(launch_unchecked, address_type = "dynamic")]
    fn glu_kernel<F: Float>(g: LinearView<'_, F>, u: LinearView<'_, F>, mut y: LinearViewMut<'_, F>, #[comptime] tanh_gelu: bool, #[define(F)] _dtype: ElemType) {
        let i = ABSOLUTE_POS;
        if !y.is_in_bounds(i) {
            terminate!();
        }
        let x = f32::cast_from(g.read(i));
        let a = activation(x, term(x, tanh_gelu), tanh_gelu);
        y.write(i, F::cast_from(a * f32::cast_from(u.read(i))));
    }

    #[cube(launch_unchecked, address_type = "dynamic")]
    fn glu_backward_kernel<F: Float>(
        g: LinearView<'_, F>,
        u: LinearView<'_, F>,
        dy: LinearView<'_, F>,
        mut dg: LinearViewMut<'_, F>,
        mut du: LinearViewMut<'_, F>,
        #[comptime] tanh_gelu: bool,
        #[define(F)] _dtype: ElemType,
    ) {
        let i = ABSOLUTE_POS;
        if !dg.is_in_bounds(i) {
            terminate!();
        }
        let x = f32::cast_from(g.read(i));
        let d = f32::cast_from(dy.read(i));
        let t = term(x, tanh_gelu);
        du.write(i, F::cast_from(d * activation(x, t, tanh_gelu)));
        dg.write(i, F::cast_from(d * f32::cast_from(u.read(i)) * slope(x, t, tanh_gelu)));
    }

    /// Whether the kernels take these tensors: one shape and float dtype, a gate they compute.
    pub(super) fn fits(gate: Gate, ts: &[&CubeTensor]) -> bool {
        let first = ts[0];
        gate != Gate::Gelu && first.shape().num_elements() > 0 && ts.iter().all(|t| t.dtype == first.dtype && t.shape() == first.shape() && !t.meta.is_tiled())
    }

    /// `a(g) · u`, for tensors the kernel takes ([`fits`]).
    pub(super) fn glu(g: CubeTensor, u: CubeTensor, gate: Gate) -> CubeTensor {
        let y = crate::elementwise_output(&g);
        let (count, dim, address) = crate::elementwise_launch(y.shape().num_elements(), &[&g, &u, &y]);
        let (client, dtype) = (y.client.clone(), dtype_to_storage_type(g.dtype));
        // SAFETY: each unit reads and writes its own element, bounds-checked against `y`, whose
        // shape the inputs' views share.
        #[allow(unsafe_code)]
        unsafe {
            glu_kernel::launch_unchecked(&client, count, dim, address, g.into_linear_view_like(&y), u.into_linear_view_like(&y), y.clone().into_linear_view(), gate == Gate::GeluTanh, dtype);
        }
        y
    }

    /// `(dg, du)`, for tensors the kernel takes ([`fits`]).
    pub(super) fn glu_backward(g: CubeTensor, u: CubeTensor, dy: CubeTensor, gate: Gate) -> (CubeTensor, CubeTensor) {
        let (dg, du) = (crate::elementwise_output(&g), crate::elementwise_output(&g));
        let (count, dim, address) = crate::elementwise_launch(dg.shape().num_elements(), &[&g, &u, &dy, &dg, &du]);
        let (client, dtype) = (dg.client.clone(), dtype_to_storage_type(g.dtype));
        // SAFETY: as in `glu`, with two outputs of the one shape.
        #[allow(unsafe_code)]
        unsafe {
            glu_backward_kernel::launch_unchecked(
                &client,
                count,
                dim,
                address,
                g.into_linear_view_like(&dg),
                u.into_linear_view_like(&dg),
                dy.into_linear_view_like(&dg),
                dg.clone().into_linear_view(),
                du.clone().into_linear_view(),
                gate == Gate::GeluTanh,
                dtype,
            );
        }
        (dg, du)
    }
}

/// libtorch: torch's activation and its backward kernel, as PyTorch's autograd runs transformers'
/// MLP.
#[cfg(feature = "tch")]
impl GluBackend for burn::backend::LibTorch {
    fn glu(g: FloatTensor<Self>, u: FloatTensor<Self>, gate: Gate) -> FloatTensor<Self> {
        let mut y = torch::activation(&g.tensor, gate);
        y *= &u.tensor;
        burn::backend::libtorch::TchTensor::new(y)
    }

    fn glu_backward(g: FloatTensor<Self>, u: FloatTensor<Self>, dy: FloatTensor<Self>, gate: Gate) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let a = torch::activation(&g.tensor, gate);
        torch::backward(&g.tensor, &u.tensor, &a, &dy.tensor, gate)
    }
}

/// libtorch on CUDA keeps `a(g)`: its backward pass is then three torch calls, 18 bytes moved an
/// element of half precision, where computing `a(g)` again makes four and 24 (on a Llama-3.2-1B
/// step of 8 pairs × 512 tokens, 6.4 GB), for one more tensor of the unit's size a layer, which
/// PyTorch's step holds too. On the CPU, where memory is the scarcer, it is computed again.
#[cfg(feature = "tch")]
impl KeptGlu for burn::backend::LibTorch {
    fn glu_keeping(g: FloatTensor<Self>, u: FloatTensor<Self>, gate: Gate) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        if !crate::keeps_for_backward(g.tensor.device()) {
            return (Self::glu(g, u, gate), None);
        }
        let a = torch::activation(&g.tensor, gate);
        let y = &a * &u.tensor;
        (burn::backend::libtorch::TchTensor::new(y), Some(burn::backend::libtorch::TchTensor::new(a)))
    }

    fn glu_backward_kept(g: FloatTensor<Self>, u: FloatTensor<Self>, a: Option<FloatTensor<Self>>, dy: FloatTensor<Self>, gate: Gate) -> (FloatTensor<Self>, FloatTensor<Self>) {
        match a {
            Some(a) => {
                KEPT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                torch::backward(&g.tensor, &u.tensor, &a.tensor, &dy.tensor, gate)
            }
            None => Self::glu_backward(g, u, dy, gate),
        }
    }
}

/// Backward passes on libtorch that read the kept `a(g)`.
#[cfg(feature = "tch")]
static KEPT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many backward passes of the gated unit on libtorch read `a(g)` kept by the forward pass, in
/// this process.
#[cfg(feature = "tch")]
pub(crate) fn kept_activations() -> usize {
    KEPT.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(feature = "tch")]
mod torch {
    use super::Gate;
    use burn::backend::libtorch::TchTensor;

    /// `(dg, du)` from `a = a(g)`: `du = dy · a`, and `dg` by torch's backward kernel of the
    /// activation applied to `dy · u`.
    pub(super) fn backward(g: &tch::Tensor, u: &tch::Tensor, a: &tch::Tensor, dy: &tch::Tensor, gate: Gate) -> (TchTensor, TchTensor) {
        let du = dy * a;
        let dy_u = dy * u;
        let dg = match gate {
            Gate::Silu => g.silu_backward(&dy_u),
            Gate::GeluTanh => g.gelu_backward(&dy_u, "tanh"),
            Gate::Gelu => g.gelu_backward(&dy_u, "none"),
        };
        (TchTensor::new(dg), TchTensor::new(du))
    }

    /// torch's kernel for `a(g)`.
    pub(super) fn activation(g: &tch::Tensor, gate: Gate) -> tch::Tensor {
        match gate {
            Gate::Silu => g.silu(),
            Gate::GeluTanh => g.gelu("tanh"),
            Gate::Gelu => g.gelu("none"),
        }
    }
}

/// Autodiff: the inner backend's unit, recorded as one operation whose backward step reads its
/// inputs through the checkpointer, and `a(g)` where the inner backend kept it ([`KeptGlu`]). It is
/// memory-bound: under gradient checkpointing its output (the down projection's input, the widest
/// activation of a layer) is not kept but computed again from the inputs, which the products that
/// made them keep.
impl<B: Backend + KeptGlu, C: CheckpointStrategy> GluBackend for Autodiff<B, C> {
    fn glu(g: FloatTensor<Self>, u: FloatTensor<Self>, gate: Gate) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Glu(Gate);

        impl<B: Backend + KeptGlu> Backward<B, 2> for Glu {
            type State = (NodeId, NodeId, Option<FloatTensor<B>>);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let [node_g, node_u] = ops.parents;
                let dy = grads.consume::<B>(&ops.node);
                let (node_g_out, node_u_out, a) = ops.state;
                let (g, u) = (checkpointer.retrieve_node_output(node_g_out), checkpointer.retrieve_node_output(node_u_out));
                let (dg, du) = B::glu_backward_kept(g, u, a, dy, self.0);
                for (node, grad) in [(node_g, dg), (node_u, du)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        let retro = crate::retro::Binary::<B, _>(g.node().id(), u.node().id(), gate, B::glu);
        match Glu(gate).prepare::<C>([g.node(), u.node()]).memory_bound().retro_forward(retro).parents([&g, &u]).stateful() {
            OpsKind::Tracked(mut prep) => {
                let (node_g, node_u) = (prep.checkpoint(&g), prep.checkpoint(&u));
                let (g, u) = (g.primitive().clone(), u.primitive().clone());
                let (y, a) = if crate::keeps_more::<C>() { B::glu_keeping(g, u, gate) } else { (B::glu(g, u, gate), None) };
                prep.finish((node_g, node_u, a), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::glu(g.primitive().clone(), u.primitive().clone(), gate)),
        }
    }
}

/// Where the extension has a body: every backend this project builds.
const REACH: crate::Reach = crate::Reach { flex: true, libtorch: true, cube: true };

/// `a(g) · u` for a gate and a value of one shape, through the extension where the backend has
/// it, and `None` where it does not (the caller writes it in tensor operations). See the module docs.
pub fn glu<const D: usize>(g: Tensor<D>, u: Tensor<D>, gate: Gate) -> Option<Tensor<D>> {
    if !crate::extended(&g.clone().into_dispatch().kind, REACH) {
        return None;
    }
    let out = <Dispatch as GluBackend>::glu(g.into_dispatch(), u.into_dispatch(), gate);
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

    /// The unit and its slope in f64, from the definitions (the error function by its series, so
    /// that nothing is shared with the code under test).
    fn reference(gate: Gate, x: f64) -> (f64, f64) {
        let h = 1e-6;
        let a = |x: f64| match gate {
            Gate::Silu => x / (1.0 + (-x).exp()),
            Gate::GeluTanh => 0.5 * x * (1.0 + (K * (x + C * x.powi(3))).tanh()),
            Gate::Gelu => x * 0.5 * (1.0 + erf(x / 2f64.sqrt())),
        };
        // The slope by a central difference, checking the hand-derived formulas.
        (a(x), (a(x + h) - a(x - h)) / (2.0 * h))
    }

    /// erf by its Maclaurin series below 2.5, where its terms stay small, and above by the
    /// continued fraction of erfc, `e^(−x²)/√π · 1/(x + ½/(x + 1/(x + 3⁄2/(x + …))))`.
    fn erf(x: f64) -> f64 {
        let z = x.abs();
        let erf_z = if z < 2.5 {
            let (mut term, mut sum, mut n) = (z, z, 0.0);
            while term.abs() > 1e-18 {
                n += 1.0;
                term *= -z * z / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let f = (1..=80).rev().fold(z, |f, k| z + f64::from(k) / 2.0 / f);
            1.0 - (-z * z).exp() / std::f64::consts::PI.sqrt() / f
        };
        erf_z.copysign(x)
    }

    /// The flex loops and the tensor-operation form (what the cubecl backends run) against the
    /// definitions in f64, for every gate, over more elements than one rayon task takes, with the
    /// value a transposed view, and gates deep in both tails.
    #[test]
    fn both_forms_match_the_definitions_for_every_gate() {
        let (rows, cols) = (300, 256);
        let gs = wave(rows * cols, 1, 9.0);
        let (us_t, dys) = (wave(rows * cols, 2, 1.0), wave(rows * cols, 3, 1.0));
        let g = FlexTensor::from_data(TensorData::new(gs.clone(), [rows, cols]));
        let u = Flex::float_transpose(FlexTensor::from_data(TensorData::new(us_t.clone(), [cols, rows])));
        let dy = FlexTensor::from_data(TensorData::new(dys.clone(), [rows, cols]));
        assert!(u.as_slice::<f32>().is_none(), "the value is a strided view");
        let us = values(&u);
        for gate in [Gate::Silu, Gate::GeluTanh, Gate::Gelu] {
            let loops = (values(&<Flex as GluBackend>::glu(g.clone(), u.clone(), gate)), <Flex as GluBackend>::glu_backward(g.clone(), u.clone(), dy.clone(), gate));
            let ops = (values(&tensor_ops::<Flex>(g.clone(), u.clone(), gate)), tensor_ops_backward::<Flex>(g.clone(), u.clone(), dy.clone(), gate));
            for (form, (y, (dg, du))) in [("loops", loops), ("tensor ops", ops)] {
                let (dg, du) = (values(&dg), values(&du));
                for i in 0..rows * cols {
                    let (x, uu, d) = (f64::from(gs[i]), f64::from(us[i]), f64::from(dys[i]));
                    let (a, slope) = reference(gate, x);
                    for (what, ours, want) in [("y", y[i], a * uu), ("dg", dg[i], d * uu * slope), ("du", du[i], d * a)] {
                        let tol = 2e-6 * (1.0 + want.abs() + x.abs());
                        assert!((f64::from(ours) - want).abs() <= tol, "{gate:?} {form} {what}[{i}] at g = {x}: {ours} against {want}");
                    }
                }
            }
        }
    }

    /// The copy of the loops this CPU runs (AVX-512 or AVX2 where it has them) gives the baseline
    /// loops' values bit for bit, and both stay finite far into the tails, where `e^(−x)` would
    /// overflow.
    #[test]
    fn the_baseline_loops_agree_with_the_dispatched_ones() {
        let n = 4099;
        let (g, u, dy) = (wave(n, 1, 60.0), wave(n, 2, 1.0), wave(n, 3, 1.0));
        for gate in [Gate::Silu, Gate::GeluTanh, Gate::Gelu] {
            let (mut base, mut dispatched) = (vec![0f32; n], vec![0f32; n]);
            loops::forward_any(gate, &g, &u, &mut base);
            loops::forward(gate, &g, &u, &mut dispatched);
            assert_eq!(base, dispatched, "{gate:?} y");
            let (mut base_dg, mut base_du, mut dg, mut du) = (vec![0f32; n], vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            loops::backward_any(gate, [&g, &u, &dy], &mut base_dg, &mut base_du);
            loops::backward(gate, [&g, &u, &dy], &mut dg, &mut du);
            assert_eq!((&base_dg, &base_du), (&dg, &du), "{gate:?} dg, du");
            assert!(base.iter().chain(&dg).chain(&du).all(|v| v.is_finite()), "{gate:?}: a value is not finite");
        }
    }
}

#[cfg(all(test, feature = "tch"))]
mod tch_tests {
    use burn::backend::LibTorch;
    use burn::backend::libtorch::TchTensor;

    use super::*;

    /// The backward pass from a kept `a(g)` gives the gradients of the one that computes it again,
    /// bit for bit, for every gate and in half precision too; on the CPU the forward pass keeps
    /// nothing (CUDA keeps it: the conformance suite's gated units check that path there).
    #[test]
    fn the_kept_activation_gives_the_gradients_computed_again() {
        for kind in [tch::Kind::Float, tch::Kind::BFloat16] {
            let t = |seed: i64, spread: f64| {
                tch::manual_seed(seed);
                TchTensor::new((tch::Tensor::randn([3, 7, 40], (tch::Kind::Float, tch::Device::Cpu)) * spread).to_kind(kind))
            };
            let (g, u, dy) = (t(1, 6.0), t(2, 1.0), t(3, 1.0));
            for gate in [Gate::Silu, Gate::GeluTanh, Gate::Gelu] {
                let (y, kept) = <LibTorch as KeptGlu>::glu_keeping(g.clone(), u.clone(), gate);
                assert!(kept.is_none(), "{kind:?} {gate:?}: the CPU keeps nothing");
                assert!(y.tensor.equal(&<LibTorch as GluBackend>::glu(g.clone(), u.clone(), gate).tensor));
                let a = TchTensor::new(torch::activation(&g.tensor, gate));
                let (dg, du) = <LibTorch as KeptGlu>::glu_backward_kept(g.clone(), u.clone(), Some(a), dy.clone(), gate);
                let (dg_again, du_again) = <LibTorch as GluBackend>::glu_backward(g.clone(), u.clone(), dy.clone(), gate);
                assert!(dg.tensor.equal(&dg_again.tensor) && du.tensor.equal(&du_again.tensor), "{kind:?} {gate:?}: the gradients differ");
                // And they are the unit's: du = dy · a(g).
                let want = &dy.tensor * torch::activation(&g.tensor, gate);
                assert!(du.tensor.equal(&want), "{kind:?} {gate:?}: du is not dy · a(g)");
            }
        }
    }
}
