//! The attention's weights and their gradient as one kernel each on the cubecl backends, over the
//! grouped query rows of `attention.rs`:
//!
//! ```text
//! P  = softmax(scale·S, masked)                  (forward, and again in the backward pass)
//! dS = scale · P ⊙ (dP − rowsum(dP ⊙ P))         (backward)
//! ```
//!
//! As burn tensor operations the first is six launches (scale, mask, max, subtract, exp, sum,
//! divide: the mask fill counted apart) and the second five, per layer and pass: 600 of a
//! SmolLM2-135M step. Each kernel gives a row of `Tk` keys one cube of units, which reads the row
//! in f32 and adds up its maximum and sums through shared memory (the RMSNorm kernels' pattern).
//! The scaled scores are rounded to the tensors' dtype before the softmax, as the tensor
//! operations and PyTorch's eager attention round them; the rest is computed in f32 and rounded
//! once, where the tensor operations rounded each step. A row whose every key is masked gets
//! zeros (the tensor operations' 0 / 0 would be NaN; no model row is, as each query sees its own
//! key).

use burn::backend::TensorMetadata;
use burn::tensor::DType;
use burn_backend::cubecl::dtype_to_storage_type;
// The `cube` macro's expansion names the `cubecl` crate.
use burn_cubecl::cubecl;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::std::tensor::layout::linear::{LinearView, LinearViewMut};

use crate::reduce::{cube_max, cube_sums, row_launch};

/// `p` `[rows, tk]` from the scores `s` of the same shape: row `r` is query `r % tq` of head
/// `(r / tq) % heads` of sequence `r / (tq·heads)`, whose mask row (`mask` `[B, 1 or heads, Tq,
/// Tk]`, read through its strides; non-zero: masked) is taken from head `h % mask_heads`.
#[cube(launch_unchecked, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
fn masked_softmax_kernel<F: Float, M: Int>(
    s: LinearView<'_, F>,
    mask: &Tensor<M>,
    mut p: LinearViewMut<'_, F>,
    rows: usize,
    tk: usize,
    tq: usize,
    heads: usize,
    mask_heads: usize,
    scale: f32,
    #[comptime] block: usize,
    #[define(F, M)] _dtypes: [ElemType; 2],
) {
    let t = UNIT_POS_X as usize;
    let mut red = Shared::<[f32]>::new_slice(block);
    let mut row = CUBE_POS_X as usize;
    while row < rows {
        let h = (row / tq) % heads;
        let at = (row / (tq * heads)) * mask.stride(0) + (h % mask_heads) * mask.stride(1) + (row % tq) * mask.stride(2);
        let step = mask.stride(3);
        let base = row * tk;
        let mut m = f32::min_value();
        let mut c = t;
        while c < tk {
            if u32::cast_from(mask[at + c * step]) == 0 {
                m = max(m, f32::cast_from(F::cast_from(f32::cast_from(s.read(base + c)) * scale)));
            }
            c += block;
        }
        red[t] = m;
        cube_max(&mut red);
        let m = red[0];
        // Every unit has read the maximum before the sums overwrite it.
        sync_cube();
        let mut sum = 0.0f32;
        c = t;
        while c < tk {
            if u32::cast_from(mask[at + c * step]) == 0 {
                sum += (f32::cast_from(F::cast_from(f32::cast_from(s.read(base + c)) * scale)) - m).exp();
            }
            c += block;
        }
        red[t] = sum;
        cube_sums(&mut red, 1usize);
        let sum = red[0];
        c = t;
        while c < tk {
            let mut w = 0.0f32;
            if u32::cast_from(mask[at + c * step]) == 0 && sum > 0.0 {
                w = (f32::cast_from(F::cast_from(f32::cast_from(s.read(base + c)) * scale)) - m).exp() / sum;
            }
            p.write(base + c, F::cast_from(w));
            c += block;
        }
        sync_cube();
        row += CUBE_COUNT_X as usize;
    }
}

/// `ds = scale · p ⊙ (dp − rowsum(dp ⊙ p))`, rows of `tk`.
#[cube(launch_unchecked, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
fn softmax_grad_kernel<F: Float>(
    p: LinearView<'_, F>,
    dp: LinearView<'_, F>,
    mut ds: LinearViewMut<'_, F>,
    rows: usize,
    tk: usize,
    scale: f32,
    #[comptime] block: usize,
    #[define(F)] _dtype: ElemType,
) {
    let t = UNIT_POS_X as usize;
    let mut red = Shared::<[f32]>::new_slice(block);
    let mut row = CUBE_POS_X as usize;
    while row < rows {
        let base = row * tk;
        let mut dot = 0.0f32;
        let mut c = t;
        while c < tk {
            dot += f32::cast_from(dp.read(base + c)) * f32::cast_from(p.read(base + c));
            c += block;
        }
        red[t] = dot;
        cube_sums(&mut red, 1usize);
        let dot = red[0];
        c = t;
        while c < tk {
            let w = f32::cast_from(p.read(base + c));
            ds.write(base + c, F::cast_from(scale * w * (f32::cast_from(dp.read(base + c)) - dot)));
            c += block;
        }
        sync_cube();
        row += CUBE_COUNT_X as usize;
    }
}

fn float(t: &CubeTensor) -> bool {
    matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16) && !t.meta.is_tiled() && t.shape().num_elements() > 0
}

/// Whether [`softmax`] takes scores `s` `[B, Hkv, G·Tq, Tk]` of `heads = Hkv·G` query heads and
/// `mask` `[B, 1 or heads, Tq, Tk]`.
pub(crate) fn fits(s: &CubeTensor, mask: &CubeTensor, heads: usize) -> bool {
    let (ss, ms) = (s.shape(), mask.shape());
    let boolean = matches!(mask.dtype, DType::Bool(_)) && !mask.meta.is_tiled();
    float(s)
        && boolean
        && ss.num_dims() == 4
        && ms.num_dims() == 4
        && ss[0] == ms[0]
        && ss[3] == ms[3]
        && (ms[1] == 1 || ms[1] == heads)
        && heads > 0
        && ss[1] * ss[2] == heads * ms[2]
}

/// `softmax(scale·s, masked)` of scores the kernel takes ([`fits`]), of `s`'s shape and dtype.
pub(crate) fn softmax(s: CubeTensor, mask: &CubeTensor, scale: f32, heads: usize) -> CubeTensor {
    let (ss, ms) = (s.shape(), mask.shape());
    let tk = ss[3];
    let rows = ss.num_elements() / tk;
    let p = crate::elementwise_output(&s);
    let (count, dim, block) = row_launch(rows, tk);
    let address = [&s, mask, &p].iter().map(|t| t.required_address_type()).max().unwrap_or_default();
    let client = p.client.clone();
    let dtypes = [dtype_to_storage_type(s.dtype), dtype_to_storage_type(mask.dtype)];
    // SAFETY: rows and columns stay below `rows` and `tk`, within the views of `s` and `p`
    // (`rows · tk` elements); the mask is read at (sequence, head, query, key) below its shape
    // (`fits`: `B`, `1` or `heads`, `Tq`, `Tk`) through its own strides.
    #[allow(unsafe_code)]
    unsafe {
        masked_softmax_kernel::launch_unchecked(
            &client,
            count,
            dim,
            address,
            s.into_linear_view(),
            mask.clone().into_tensor_arg(),
            p.clone().into_linear_view(),
            rows,
            tk,
            ms[2],
            heads,
            ms[1],
            scale,
            block,
            dtypes,
        );
    }
    p
}

/// Whether [`softmax_grad`] takes `p` and `dp`: one shape and float dtype.
pub(crate) fn grad_fits(p: &CubeTensor, dp: &CubeTensor) -> bool {
    float(p) && dp.dtype == p.dtype && !dp.meta.is_tiled() && dp.shape() == p.shape() && p.shape().num_dims() >= 1
}

/// `scale · p ⊙ (dp − rowsum(dp ⊙ p))` over the last dimension, for tensors [`grad_fits`] takes.
pub(crate) fn softmax_grad(p: CubeTensor, dp: CubeTensor, scale: f32) -> CubeTensor {
    let shape = p.shape();
    let tk = shape[shape.num_dims() - 1];
    let rows = shape.num_elements() / tk;
    let ds = crate::elementwise_output(&p);
    let (count, dim, block) = row_launch(rows, tk);
    let address = [&p, &dp, &ds].iter().map(|t| t.required_address_type()).max().unwrap_or_default();
    let (client, dtype) = (ds.client.clone(), dtype_to_storage_type(p.dtype));
    // SAFETY: every read and write is at `row · tk + c` with `row < rows` and `c < tk`, within
    // the views of the three (`rows · tk` elements).
    #[allow(unsafe_code)]
    unsafe {
        softmax_grad_kernel::launch_unchecked(&client, count, dim, address, p.into_linear_view(), dp.into_linear_view(), ds.clone().into_linear_view(), rows, tk, scale, block, dtype);
    }
    ds
}
