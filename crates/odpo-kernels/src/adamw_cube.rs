//! [`crate::adamw`] on the cubecl backends (CUDA, Vulkan, wgpu, Metal): one kernel per parameter
//! that reads the gradient and updates the parameter and both moments in place, where the same
//! formula as burn tensor operations launches twelve kernels and allocates a buffer for each.
//! On a GPU whose step waits on the host issuing kernels, the launches are what the update costs.
//! Computed in f32 whatever the tensors' dtype, as PyTorch's fused AdamW computes half-precision
//! parameters; the gradient may be half precision where the parameter is f32 (a mixed-precision
//! step's, [`crate::compute_cast`]).

use burn::backend::DispatchTensorKind;
use burn::tensor::DType;
use burn_backend::cubecl::dtype_to_storage_type;
// The `cube` macro's expansion names the `cubecl` crate.
use burn_cubecl::cubecl;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::std::tensor::layout::linear::{LinearView, LinearViewMut};

use crate::Coeffs;

/// Element `i`'s update: the CPU kernel's arithmetic (`cpu::adamw`), in f32. Writes the moments
/// and returns the parameter's new value, for the kernel to write.
#[cube]
#[allow(clippy::too_many_arguments)]
fn update<F: Float, G: Float>(
    i: usize,
    p: &LinearViewMut<'_, F>,
    g: &LinearView<'_, G>,
    m: &mut LinearViewMut<'_, F>,
    v: &mut LinearViewMut<'_, F>,
    c: &Scalars,
) -> F {
    let gi = f32::cast_from(g.read(i)) * c.scale;
    let mi = f32::cast_from(m.read(i));
    let vi = f32::cast_from(v.read(i));
    // PyTorch's lerp for a weight below 0.5, and addcmul's `self + value·t1·t2`.
    let m1 = mi + c.w1 * (gi - mi);
    let v1 = vi * c.b2 + c.w2 * gi * gi;
    let denom = v1.sqrt() / c.bc2_sqrt + c.eps;
    m.write(i, F::cast_from(m1));
    v.write(i, F::cast_from(v1));
    F::cast_from(f32::cast_from(p.read(i)) * c.decay + c.neg_step_size * m1 / denom)
}

/// The step's scalars, as the kernels take them.
#[derive(CubeLaunch, CubeType)]
struct Scalars {
    decay: f32,
    scale: f32,
    w1: f32,
    b2: f32,
    w2: f32,
    bc2_sqrt: f32,
    eps: f32,
    neg_step_size: f32,
}

/// One element per unit. Each tensor is read through its own layout (cubecl pads the rows it
/// allocates: a `[49152, 576]` f32 tensor takes rows of 640), and the gradient may be of another
/// dtype than the parameter: a mixed-precision step hands it on in half precision
/// ([`crate::compute_cast`]), which the load widens to f32 exactly.
#[cube(launch_unchecked, address_type = "dynamic")]
fn adamw_kernel<F: Float, G: Float>(
    mut p: LinearViewMut<'_, F>,
    g: LinearView<'_, G>,
    mut m: LinearViewMut<'_, F>,
    mut v: LinearViewMut<'_, F>,
    n: usize,
    c: &Scalars,
    #[define(F, G)] _dtypes: [ElemType; 2],
) {
    let i = ABSOLUTE_POS;
    if i >= n {
        terminate!();
    }
    let p1 = update::<F, G>(i, &p, &g, &mut m, &mut v, c);
    p.write(i, p1);
}

/// [`adamw_kernel`] that also writes the new parameter cast to `H` into `h` (the half-precision
/// weights of the next mixed-precision step, which would otherwise be cast from the parameter in
/// a kernel of their own): the same conversion as that cast's, of the same value.
#[cube(launch_unchecked, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
fn adamw_half_kernel<F: Float, G: Float, H: Float>(
    mut p: LinearViewMut<'_, F>,
    g: LinearView<'_, G>,
    mut m: LinearViewMut<'_, F>,
    mut v: LinearViewMut<'_, F>,
    mut h: LinearViewMut<'_, H>,
    n: usize,
    c: &Scalars,
    #[define(F, G, H)] _dtypes: [ElemType; 3],
) {
    let i = ABSOLUTE_POS;
    if i >= n {
        terminate!();
    }
    let p1 = update::<F, G>(i, &p, &g, &mut m, &mut v, c);
    p.write(i, p1);
    h.write(i, H::cast_from(p1));
}

/// A float tensor the kernel can read as it lies in memory.
fn readable(t: &CubeTensor) -> bool {
    !t.meta.is_tiled() && matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// One it can also write in place: no other holder of its buffer, no element at two places.
fn writable(t: &CubeTensor) -> bool {
    readable(t) && t.can_mut() && t.is_nonoverlapping()
}

/// The update in place, when all four are cubecl tensors of one shape on one device, the
/// parameter and moments of one dtype and writable (see [`writable`]), the gradient of any float
/// dtype; `false` leaves them untouched for the tensor-operation form. With `half`, the new
/// parameter cast to that dtype as well (a new contiguous tensor), when the update ran.
pub(crate) fn adamw(p: &DispatchTensorKind, g: &DispatchTensorKind, m: &DispatchTensorKind, v: &DispatchTensorKind, c: &Coeffs, half: Option<DType>) -> Option<Option<CubeTensor>> {
    use burn::backend::BackendTensor::Float;
    let (DispatchTensorKind::Cube(Float(p)), DispatchTensorKind::Cube(Float(g)), DispatchTensorKind::Cube(Float(m)), DispatchTensorKind::Cube(Float(v))) = (p, g, m, v) else {
        return None;
    };
    let n = p.meta.num_elements();
    let like = |t: &CubeTensor| t.meta.shape() == p.meta.shape() && t.device == p.device;
    let takes = n > 0 && writable(p) && writable(m) && writable(v) && readable(g) && m.dtype == p.dtype && v.dtype == p.dtype && [g, m, v].into_iter().all(like);
    if !takes {
        return None;
    }
    let half = half.filter(|&d| matches!(d, DType::F16 | DType::BF16) && d != p.dtype);
    let h = half.map(|dtype| burn_cubecl::ops::numeric::empty_device_contiguous_dtype(p.client.clone(), p.device.clone(), p.meta.shape().clone(), dtype));
    let client = p.client.clone();
    let mut tensors = vec![p, g, m, v];
    tensors.extend(h.as_ref());
    let (cube_count, cube_dim, address) = crate::elementwise_launch(n, &tensors);
    let scalars = ScalarsLaunch::new(c.decay.unwrap_or(1.0), c.scale.unwrap_or(1.0), c.w1, c.b2, c.w2, c.bc2_sqrt, c.eps, c.neg_step_size);
    let views = || (p.clone().into_linear_view(), g.clone().into_linear_view(), m.clone().into_linear_view(), v.clone().into_linear_view());
    let (pd, gd) = (dtype_to_storage_type(p.dtype), dtype_to_storage_type(g.dtype));
    // SAFETY: each unit reads and writes element `i < n` of each tensor, through its layout, and
    // no element of those it writes lies at two places or in a buffer another tensor holds (`h`
    // is new).
    #[allow(unsafe_code)]
    unsafe {
        let (pv, gv, mv, vv) = views();
        match &h {
            None => adamw_kernel::launch_unchecked(&client, cube_count, cube_dim, address, pv, gv, mv, vv, n, scalars, [pd, gd]),
            Some(h) => adamw_half_kernel::launch_unchecked(&client, cube_count, cube_dim, address, pv, gv, mv, vv, h.clone().into_linear_view(), n, scalars, [pd, gd, dtype_to_storage_type(h.dtype)]),
        }
    }
    Some(h)
}
