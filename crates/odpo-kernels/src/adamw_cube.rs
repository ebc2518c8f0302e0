//! [`crate::adamw`] on the cubecl backends (CUDA, Vulkan, wgpu, Metal): one kernel per parameter
//! that reads the gradient and updates the parameter and both moments in place, where the same
//! formula as burn tensor operations launches twelve kernels and allocates a buffer for each.
//! On a GPU whose step waits on the host issuing kernels, the launches are what the update costs.
//! Computed in f32 whatever the tensors' dtype, as PyTorch's fused AdamW computes half-precision
//! parameters.

use burn::backend::DispatchTensorKind;
use burn::tensor::DType;
use burn_backend::cubecl::dtype_to_storage_type;
// The `cube` macro's expansion names the `cubecl` crate.
use burn_cubecl::cubecl;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use crate::Coeffs;

/// One element per unit: the CPU kernel's arithmetic (`cpu::adamw`), in f32. The four tensors share
/// one layout, so a unit updates the same element of each by its place in memory, padding
/// included (cubecl pads rows: a `[49152, 576]` f32 tensor takes rows of 640).
#[cube(launch_unchecked, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
fn adamw_kernel<F: Float>(
    p: &mut Tensor<F>,
    g: &Tensor<F>,
    m: &mut Tensor<F>,
    v: &mut Tensor<F>,
    decay: f32,
    scale: f32,
    w1: f32,
    b2: f32,
    w2: f32,
    bc2_sqrt: f32,
    eps: f32,
    neg_step_size: f32,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i >= p.buffer_len() || i >= g.buffer_len() || i >= m.buffer_len() || i >= v.buffer_len() {
        terminate!();
    }
    let gi = f32::cast_from(g[i]) * scale;
    let mi = f32::cast_from(m[i]);
    let vi = f32::cast_from(v[i]);
    // PyTorch's lerp for a weight below 0.5, and addcmul's `self + value·t1·t2`.
    let m1 = mi + w1 * (gi - mi);
    let v1 = vi * b2 + w2 * gi * gi;
    let denom = v1.sqrt() / bc2_sqrt + eps;
    p[i] = F::cast_from(f32::cast_from(p[i]) * decay + neg_step_size * m1 / denom);
    m[i] = F::cast_from(m1);
    v[i] = F::cast_from(v1);
}

/// A float tensor the kernel can read as it lies in memory.
fn readable(t: &CubeTensor) -> bool {
    !t.meta.is_tiled() && matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// One it can also write in place: no other holder of its buffer, no element at two places.
fn writable(t: &CubeTensor) -> bool {
    readable(t) && t.can_mut() && t.is_nonoverlapping()
}

/// Elements from a tensor's first to its last in memory.
fn span(t: &CubeTensor) -> usize {
    let (shape, strides) = (t.meta.shape(), t.meta.strides());
    1 + shape.iter().zip(strides.iter()).map(|(&n, &s)| n.saturating_sub(1) * s).sum::<usize>()
}

/// The update in place, when all four are cubecl tensors of one dtype and layout and the parameter
/// and moments can be written (see [`writable`]); `false` leaves them untouched for the
/// tensor-operation form.
pub(crate) fn adamw(p: &DispatchTensorKind, g: &DispatchTensorKind, m: &DispatchTensorKind, v: &DispatchTensorKind, c: &Coeffs) -> bool {
    use burn::backend::BackendTensor::Float;
    let (DispatchTensorKind::Cube(Float(p)), DispatchTensorKind::Cube(Float(g)), DispatchTensorKind::Cube(Float(m)), DispatchTensorKind::Cube(Float(v))) = (p, g, m, v) else {
        return false;
    };
    let n = p.meta.num_elements();
    // One layout for all four, so that an element's place in memory is the same in each, and
    // buffers that hold it (the kernel runs over the shortest buffer).
    let same = |t: &CubeTensor| t.dtype == p.dtype && t.meta.shape() == p.meta.shape() && t.meta.strides() == p.meta.strides() && t.device == p.device;
    let holds = |t: &CubeTensor| t.handle.size() as usize >= span(p) * t.dtype.size();
    let takes = n > 0 && writable(p) && writable(m) && writable(v) && readable(g) && [g, m, v].into_iter().all(same) && [p, g, m, v].into_iter().all(holds);
    if !takes {
        return false;
    }
    let units = [p, g, m, v].into_iter().map(|t| t.handle.size() as usize / t.dtype.size()).min().unwrap_or(0);
    let client = p.client.clone();
    let (cube_count, cube_dim, address) = crate::elementwise_launch(units, &[p, g, m, v]);
    // SAFETY: the kernel checks its one index against every buffer's length, and each unit writes
    // only its own element of buffers no one else holds.
    #[allow(unsafe_code)]
    unsafe {
        adamw_kernel::launch_unchecked(
            &client,
            cube_count,
            cube_dim,
            address,
            p.clone().into_tensor_arg(),
            g.clone().into_tensor_arg(),
            m.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            c.decay.unwrap_or(1.0),
            c.scale.unwrap_or(1.0),
            c.w1,
            c.b2,
            c.w2,
            c.bc2_sqrt,
            c.eps,
            c.neg_step_size,
            dtype_to_storage_type(p.dtype),
        );
    }
    true
}
