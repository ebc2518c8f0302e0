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
//! pass is the formula above; on libtorch both passes are direct torch calls, on flex one loop
//! each over the rows, split over the CPU's threads. A model applies it to the queries and the
//! keys of every layer, so on a GPU, where a small model's step waits on the host issuing
//! operations, the difference is a few hundred operations a step.

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
        tensor_ops::<Self>(x, cos, sin)
    }

    /// `dy·cos + rotate_halfᵀ(dy·sin)`.
    fn rotary_backward(dy: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        tensor_ops_backward::<Self>(dy, cos, sin)
    }
}

/// [`RotaryBackend::rotary`] in the backend's tensor operations.
fn tensor_ops<B: Backend>(x: FloatTensor<B>, cos: FloatTensor<B>, sin: FloatTensor<B>) -> FloatTensor<B> {
    let (x1, x2) = halves::<B>(&x);
    let rot = B::float_cat(vec![B::float_neg(x2), x1], 3);
    B::float_add(B::float_mul(x, cos), B::float_mul(rot, sin))
}

/// [`RotaryBackend::rotary_backward`] in the backend's tensor operations.
fn tensor_ops_backward<B: Backend>(dy: FloatTensor<B>, cos: FloatTensor<B>, sin: FloatTensor<B>) -> FloatTensor<B> {
    let (a1, a2) = halves::<B>(&B::float_mul(dy.clone(), sin));
    let rot_t = B::float_cat(vec![a2, B::float_neg(a1)], 3);
    B::float_add(B::float_mul(dy, cos), rot_t)
}

/// The two halves of the last dimension.
fn halves<B: Backend>(x: &FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>) {
    let half = x.shape()[3] / 2;
    let cut = |r: std::ops::Range<usize>| B::float_slice(x.clone(), &[Slice::from(..), Slice::from(..), Slice::from(..), Slice::from(r)]);
    (cut(0..half), cut(half..2 * half))
}

/// flex: each pass one loop over the rows of `x` (read through its strides, as the heads' view of
/// the projections leaves it) and of the angles (broadcast over the heads), split over rayon's
/// threads, in the tensor operations' order of arithmetic. Half precision takes the tensor
/// operations.
#[cfg(feature = "flex")]
impl RotaryBackend for burn::backend::Flex {
    fn rotary(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        // y = x·cos + rotate_half(x)·sin, rotate_half([x₁, x₂]) = [−x₂, x₁]
        let rotated = flex::rows(&x, &cos, &sin, |x, c, s, y| {
            let half = x.len() / 2;
            for (j, y) in y.iter_mut().enumerate() {
                let rot = if j < half { -x[j + half] } else { x[j - half] };
                *y = x[j] * c[j] + rot * s[j];
            }
        });
        rotated.unwrap_or_else(|| tensor_ops::<Self>(x, cos, sin))
    }

    fn rotary_backward(dy: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        // dx = dy·cos + rotate_halfᵀ(dy·sin), rotate_halfᵀ([a₁, a₂]) = [a₂, −a₁]
        let rotated = flex::rows(&dy, &cos, &sin, |dy, c, s, dx| {
            let half = dy.len() / 2;
            for (j, dx) in dx.iter_mut().enumerate() {
                let rot_t = if j < half { dy[j + half] * s[j + half] } else { -(dy[j - half] * s[j - half]) };
                *dx = dy[j] * c[j] + rot_t;
            }
        });
        rotated.unwrap_or_else(|| tensor_ops_backward::<Self>(dy, cos, sin))
    }
}

/// The loops of the flex body.
#[cfg(feature = "flex")]
mod flex {
    use burn::backend::flex::FlexTensor;
    use rayon::prelude::*;

    use crate::cpu::flex::View;

    /// `[B, H, T, Dh]` of `x`, when `Dh` is even and the tensors are f32 views this reads.
    fn shape(x: &FlexTensor) -> Option<[usize; 4]> {
        let dims = x.layout().shape();
        (dims.num_dims() == 4 && dims[3].is_multiple_of(2)).then(|| [dims[0], dims[1], dims[2], dims[3]])
    }

    /// A new contiguous tensor of `x`'s shape whose row `[b, h, t, ..]` `body` writes from the
    /// same rows of `x`, `cos` and `sin`; `None` when a tensor is out of reach.
    pub(super) fn rows(x: &FlexTensor, cos: &FlexTensor, sin: &FlexTensor, body: impl Fn(&[f32], &[f32], &[f32], &mut [f32]) + Sync) -> Option<FlexTensor> {
        let shape = shape(x)?;
        let [_, heads, tokens, dh] = shape;
        let (xv, cv, sv) = (View::f32(x, shape)?, View::f32(cos, shape)?, View::f32(sin, shape)?);
        let mut out = vec![0f32; shape.iter().product()];
        if dh == 0 {
            return Some(crate::cpu::flex::tensor(x.layout().shape().clone(), out));
        }
        let per_task = (crate::cpu::CHUNK / dh).max(1);
        let done: Option<()> = out.par_chunks_mut(per_task * dh).enumerate().try_for_each(|(task, out)| {
            let (mut xr, mut cr, mut sr) = (Vec::with_capacity(dh), Vec::with_capacity(dh), Vec::with_capacity(dh));
            for (i, out) in out.chunks_mut(dh).enumerate() {
                let row = task * per_task + i;
                let at = [row / (heads * tokens), row / tokens % heads, row % tokens];
                body(xv.row(at, dh, &mut xr)?, cv.row(at, dh, &mut cr)?, sv.row(at, dh, &mut sr)?, out);
            }
            Some(())
        });
        done?;
        Some(crate::cpu::flex::tensor(x.layout().shape().clone(), out))
    }
}

/// The cubecl backends: one kernel for each pass, where the tensor operations launch about eight
/// (two slices, a negation, a concatenation of two slice writes, two products and a sum).
#[cfg(feature = "cube")]
impl RotaryBackend for burn::backend::Cube {
    fn rotary(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        cube::rotary(x, cos, sin, false)
    }

    fn rotary_backward(dy: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        cube::rotary(dy, cos, sin, true)
    }
}

/// The kernel of the cubecl body.
#[cfg(feature = "cube")]
mod cube {
    use burn::backend::TensorMetadata;
    use burn_backend::cubecl::dtype_to_storage_type;
    // The `cube` macro's expansion names the `cubecl` crate.
    use burn_cubecl::cubecl;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::std::tensor::layout::linear::{LinearView, LinearViewMut};
    use cubecl::prelude::*;

    /// One element of `y` `[B, H, T, Dh]` per unit, read through each tensor's own strides (the
    /// heads' view of the projections, the angles broadcast over the heads), in f32:
    /// `x·cos + rotate_half(x)·sin`, or with `backward` `dy·cos + rotate_halfᵀ(dy·sin)`.
    #[cube(launch_unchecked, address_type = "dynamic")]
    fn rotary_kernel<F: Float>(
        x: LinearView<'_, F>,
        cos: LinearView<'_, F>,
        sin: LinearView<'_, F>,
        mut y: LinearViewMut<'_, F>,
        #[comptime] dh: usize,
        #[comptime] backward: bool,
        #[define(F)] _dtype: ElemType,
    ) {
        let i = ABSOLUTE_POS;
        if !y.is_in_bounds(i) {
            terminate!();
        }
        let half = dh / 2;
        let lower = i % dh < half;
        // The element of the other half of the row that the rotation pairs with this one.
        let partner = select(lower, i + half, i - half);
        let xi = f32::cast_from(x.read(i));
        let xp = f32::cast_from(x.read(partner));
        let c = f32::cast_from(cos.read(i));
        if backward {
            // rotate_halfᵀ([a₁, a₂]) = [a₂, −a₁] with a = dy·sin.
            let a = xp * f32::cast_from(sin.read(partner));
            y.write(i, F::cast_from(xi * c + select(lower, a, -a)));
        } else {
            // rotate_half([x₁, x₂]) = [−x₂, x₁].
            let s = f32::cast_from(sin.read(i));
            y.write(i, F::cast_from(xi * c + select(lower, -xp, xp) * s));
        }
    }

    /// A new `[B, H, T, Dh]` tensor laid out as `[B, T, H, Dh]`, the heads' view of the
    /// projections that the models rotate: the gradient written so, once its heads are swapped
    /// back, is the projections' contiguous `[B, T, H·Dh]` gradient, which burn would otherwise
    /// copy into that layout for the projection's backward pass.
    fn heads_view_output(like: &CubeTensor) -> CubeTensor {
        use burn::tensor::Shape;
        use burn_cubecl::cubecl::zspace::Strides;
        use burn_cubecl::cubecl::zspace::metadata::Metadata;
        let s = like.shape();
        let (b, h, t, dh) = (s[0], s[1], s[2], s[3]);
        let mut y = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), Shape::new([b, t, h, dh]), like.dtype);
        *y.meta = Metadata::new(s, Strides::new(&[t * h * dh, dh, h * dh, 1]));
        y
    }

    pub(super) fn rotary(x: CubeTensor, cos: CubeTensor, sin: CubeTensor, backward: bool) -> CubeTensor {
        let shape = x.shape();
        let dh = shape[shape.num_dims() - 1];
        let n = shape.num_elements();
        let halves = shape.num_dims() == 4 && dh.is_multiple_of(2);
        let readable = |t: &CubeTensor| t.dtype == x.dtype && !t.meta.is_tiled();
        if !halves || n == 0 || ![&x, &cos, &sin].into_iter().all(readable) {
            return if backward { super::tensor_ops_backward::<burn::backend::Cube>(x, cos, sin) } else { super::tensor_ops::<burn::backend::Cube>(x, cos, sin) };
        }
        let y = if backward { heads_view_output(&x) } else { crate::elementwise_output(&x) };
        let client = y.client.clone();
        let (cube_count, cube_dim, address) = crate::elementwise_launch(n, &[&x, &cos, &sin, &y]);
        let dtype = dtype_to_storage_type(x.dtype);
        // SAFETY: each unit reads elements of its own row (bounds-checked against `y`, whose shape the
        // views of `x` and the angles take) and writes only its own element of `y`.
        #[allow(unsafe_code)]
        unsafe {
            rotary_kernel::launch_unchecked(
                &client,
                cube_count,
                cube_dim,
                address,
                x.into_linear_view_like(&y),
                cos.into_linear_view_like(&y),
                sin.into_linear_view_like(&y),
                y.clone().into_linear_view(),
                dh,
                backward,
                dtype,
            );
        }
        y
    }
}

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

#[cfg(all(test, feature = "flex"))]
#[allow(clippy::expect_used)]
mod tests {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::backend::ops::FloatTensorOps;
    use burn::tensor::TensorData;

    use super::*;
    use crate::cpu::flex::testing::{values, wave};

    /// The flex loops against the tensor operations, on the layout the models pass: `x` the heads'
    /// view `[B, H, T, Dh]` of `[B, T, H, Dh]` projections, the angles `[B, 1, T, Dh]`, more rows than
    /// one rayon task takes. The arithmetic is the same, so the values are equal.
    #[test]
    fn the_flex_loops_equal_the_tensor_operations() {
        let (b, t, h, dh) = (2, 40, 9, 64);
        let x = Flex::float_swap_dims(FlexTensor::from_data(TensorData::new(wave(b * t * h * dh, 1, 2.0), [b, t, h, dh])), 1, 2);
        assert!(x.as_slice::<f32>().is_none(), "x is a strided view");
        let angles = wave(b * t * dh, 2, 3.0);
        let cos = FlexTensor::from_data(TensorData::new(angles.iter().map(|a| a.cos()).collect::<Vec<_>>(), [b, 1, t, dh]));
        let sin = FlexTensor::from_data(TensorData::new(angles.iter().map(|a| a.sin()).collect::<Vec<_>>(), [b, 1, t, dh]));
        let dy = FlexTensor::from_data(TensorData::new(wave(b * h * t * dh, 3, 1.0), [b, h, t, dh]));
        let y = <Flex as RotaryBackend>::rotary(x.clone(), cos.clone(), sin.clone());
        assert!(flex::rows(&x, &cos, &sin, |x, _, _, y| y.copy_from_slice(x)).is_some(), "the loop reads these tensors");
        assert_eq!(values(&y), values(&tensor_ops::<Flex>(x, cos.clone(), sin.clone())), "y");
        let dx = <Flex as RotaryBackend>::rotary_backward(dy.clone(), cos.clone(), sin.clone());
        assert_eq!(values(&dx), values(&tensor_ops_backward::<Flex>(dy, cos.clone(), sin.clone())), "dx");

        // A view whose last dimension is strided, read element by element.
        let xt = Flex::float_swap_dims(FlexTensor::from_data(TensorData::new(wave(b * h * t * dh, 4, 2.0), [b, h, dh, t])), 2, 3);
        let yt = <Flex as RotaryBackend>::rotary(xt.clone(), cos.clone(), sin.clone());
        assert_eq!(values(&yt), values(&tensor_ops::<Flex>(xt, cos, sin)), "y of a strided last dimension");
    }
}

#[cfg(all(test, feature = "tch"))]
mod tch_tests {
    use burn::backend::LibTorch;
    use burn::backend::libtorch::TchTensor;
    use tch::{Kind, Tensor};

    use super::*;

    /// libtorch's rotation gives transformers' `x·cos + rotate_half(x)·sin` bit for bit in every
    /// dtype, on the heads' strided view of the projections too; its backward pass gives
    /// `dy·cos + rotate_halfᵀ(dy·sin)` within two roundings to the dtype of its largest entry (the
    /// sums round in another order).
    #[test]
    fn the_rotation_is_transformers_rotation_bit_for_bit() {
        let (b, h, t, dh) = (2, 3, 5, 8);
        tch::manual_seed(0);
        let cpu = tch::Device::Cpu;
        for (kind, tol) in [(Kind::Float, 2.0 / 16_777_216.0), (Kind::BFloat16, 2.0 / 256.0), (Kind::Half, 2.0 / 2048.0)] {
            // `x` as the heads' view of `[B, T, H·Dh]` projections.
            let x = (Tensor::randn([b, t, h * dh], (Kind::Float, cpu)) * 3.0).to_kind(kind).view([b, t, h, dh]).transpose(1, 2);
            let angles = Tensor::randn([1, 1, t, dh], (Kind::Float, cpu)) * 2.0;
            let (cos, sin) = (angles.cos().to_kind(kind), angles.sin().to_kind(kind));
            let dy = Tensor::randn([b, h, t, dh], (Kind::Float, cpu)).to_kind(kind);
            let half = dh / 2;
            let rotate_half = |v: &Tensor| Tensor::cat(&[v.narrow(3, half, half).neg(), v.narrow(3, 0, half)], 3);
            let want_y = &x * &cos + rotate_half(&x) * &sin;
            let a = &dy * &sin;
            let want_dx = (&dy * &cos).to_kind(Kind::Float) + Tensor::cat(&[a.narrow(3, half, half), a.narrow(3, 0, half).neg()], 3).to_kind(Kind::Float);
            let tt = |v: &Tensor| TchTensor::new(v.shallow_clone());
            let y = <LibTorch as RotaryBackend>::rotary(tt(&x), tt(&cos), tt(&sin));
            assert!(y.tensor.equal(&want_y), "{kind:?}: y differs from transformers' rotation");
            let dx = <LibTorch as RotaryBackend>::rotary_backward(tt(&dy), tt(&cos), tt(&sin)).tensor.to_kind(Kind::Float);
            let scale = f64::try_from(want_dx.abs().max()).unwrap_or(f64::NAN);
            let diff = f64::try_from((&dx - &want_dx).abs().max()).unwrap_or(f64::NAN);
            assert!(diff <= tol * scale, "{kind:?}: dx {diff} from the formula, largest entry {scale}");
        }
    }
}
