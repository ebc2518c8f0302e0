//! `Σ_p ‖x_p‖²` over many device tensors with one host read: the global gradient norm of
//! `torch.nn.utils.clip_grad_norm_`. On the cubecl backends each tensor is one kernel whose cubes
//! each write their share of the sum into one buffer, which one reduction then adds up, where
//! `x.square().sum()` and the running total take three launches a tensor (a small model has
//! hundreds of gradients, and its step on a GPU waits on the host issuing kernels). Elsewhere
//! [`SquareSums::take`] hands the tensor back for the caller's own sum.

use burn::tensor::Tensor;

/// The tensors whose squares are summed on their device by this crate's kernel, read on the host
/// once by [`SquareSums::total`].
#[derive(Default)]
pub struct SquareSums {
    #[cfg(feature = "cube")]
    cube: Option<cube::Pending>,
}

impl SquareSums {
    /// Nothing taken yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes `x` when the kernel sums its squares: a float tensor of a cubecl backend, on the device
    /// of the tensors taken before. Otherwise `x` comes back, for the caller to sum.
    #[allow(clippy::result_large_err)] // the tensor handed back, as the caller gave it
    pub fn take<const D: usize>(&mut self, x: Tensor<D>) -> Result<(), Tensor<D>> {
        #[cfg(feature = "cube")]
        {
            let d = x.into_dispatch();
            match cube::Pending::take(&mut self.cube, d) {
                Ok(()) => Ok(()),
                Err(d) => Err(Tensor::from_dispatch(d)),
            }
        }
        #[cfg(not(feature = "cube"))]
        Err(x)
    }

    /// `Σ x²` over the tensors taken, in f32 on the device and read as one scalar (0 for none).
    pub fn total(self) -> f64 {
        #[cfg(feature = "cube")]
        if let Some(pending) = self.cube {
            return pending.total();
        }
        0.0
    }
}

#[cfg(feature = "cube")]
mod cube {
    use burn::backend::ops::FloatTensorOps;
    use burn::backend::{BackendTensor, DispatchTensor, DispatchTensorKind, TensorMetadata};
    use burn::tensor::{DType, Shape};
    use burn_backend::cubecl::dtype_to_storage_type;
    // The `cube` macro's expansion names the `cubecl` crate.
    use burn_cubecl::cubecl;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::prelude::*;
    use cubecl::std::tensor::layout::linear::LinearView;

    use crate::reduce::cube_sums;

    /// Units per cube.
    const BLOCK: usize = 256;

    /// Each cube sums the squares of a grid stride of `x`'s `n` elements (read through their
    /// layout, so that a padded buffer's padding stays out) and writes the sum to
    /// `shares[offset + cube]`.
    #[cube(launch_unchecked, address_type = "dynamic")]
    fn square_sum_kernel<F: Float>(x: LinearView<'_, F>, shares: &mut Tensor<f32>, n: usize, offset: usize, #[comptime] block: usize, #[define(F)] _dtype: ElemType) {
        let t = UNIT_POS_X as usize;
        let mut sums = Shared::<[f32]>::new_slice(block);
        let mut acc = 0.0f32;
        let mut i = CUBE_POS_X as usize * block + t;
        let stride = CUBE_COUNT_X as usize * block;
        while i < n {
            let v = f32::cast_from(x.read(i));
            acc += v * v;
            i += stride;
        }
        sums[t] = acc;
        cube_sums(&mut sums, 1usize);
        if t == 0 {
            shares[offset + CUBE_POS_X as usize] = sums[0];
        }
    }

    /// Cubes for a tensor of `n` elements: about 16 elements a unit, from 1 to 1,024.
    fn cubes(n: usize) -> usize {
        n.div_ceil(BLOCK * 16).clamp(1, 1024)
    }

    /// The tensors taken, and the first one's dispatch wrapper, which carries the total back.
    pub(super) struct Pending {
        first: DispatchTensor,
        tensors: Vec<CubeTensor>,
    }

    impl Pending {
        #[allow(clippy::result_large_err)] // the tensor handed back, as it came
        pub(super) fn take(pending: &mut Option<Self>, d: DispatchTensor) -> Result<(), DispatchTensor> {
            let DispatchTensorKind::Cube(BackendTensor::Float(t)) = &d.kind else {
                return Err(d);
            };
            let float = matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16) && !t.meta.is_tiled();
            if !float || pending.as_ref().is_some_and(|p| p.tensors[0].device != t.device) {
                return Err(d);
            }
            let t = t.clone();
            match pending {
                Some(p) => p.tensors.push(t),
                None => *pending = Some(Self { first: d, tensors: vec![t] }),
            }
            Ok(())
        }

        /// One kernel per non-empty tensor into one buffer of shares, one sum, one read.
        pub(super) fn total(self) -> f64 {
            let Self { mut first, tensors } = self;
            let slots: usize = tensors.iter().map(|t| cubes(t.shape().num_elements())).sum();
            let t0 = &tensors[0];
            let shares = burn_cubecl::ops::numeric::zeros_client(t0.client.clone(), t0.device.clone(), Shape::new([slots]), DType::F32);
            let mut offset = 0;
            for t in tensors {
                let n = t.shape().num_elements();
                let count = cubes(n);
                if n > 0 {
                    let address = t.required_address_type().max(shares.required_address_type());
                    let (client, dtype) = (t.client.clone(), dtype_to_storage_type(t.dtype));
                    let x = t.clone().into_linear_view();
                    // SAFETY: each unit reads `x` at logical indices below `n`, its number of
                    // elements; the first unit of cube `c` writes `shares[offset + c]`, with
                    // `offset + count <= slots`.
                    #[allow(unsafe_code)]
                    unsafe {
                        square_sum_kernel::launch_unchecked(
                            &client,
                            CubeCount::Static(count as u32, 1, 1),
                            CubeDim::new_1d(BLOCK as u32),
                            address,
                            x,
                            shares.clone().into_tensor_arg(),
                            n,
                            offset,
                            BLOCK,
                            dtype,
                        );
                    }
                }
                offset += count;
            }
            first.kind = DispatchTensorKind::Cube(BackendTensor::Float(<burn::backend::Cube as FloatTensorOps<burn::backend::Cube>>::float_sum(shares)));
            burn::tensor::Tensor::<1>::from_dispatch(first).into_scalar::<f64>()
        }
    }
}
