//! `Σ_p ‖x_p‖²` over many device tensors with one host read: the global gradient norm of
//! `torch.nn.utils.clip_grad_norm_`. On the cubecl backends one kernel takes up to six tensors of
//! one dtype (a row of its grid each) and its cubes each write their share of the sum into one
//! buffer, which one reduction then adds up, where
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

    /// This unit's part of the sum of squares of a grid stride of `x`'s `n` elements (read through
    /// their layout, so that a padded buffer's padding stays out).
    #[cube]
    fn part<F: Float>(x: &LinearView<'_, F>, n: usize, #[comptime] block: usize) -> f32 {
        let mut acc = 0.0f32;
        let mut i = CUBE_POS_X as usize * block + UNIT_POS_X as usize;
        let stride = CUBE_COUNT_X as usize * block;
        while i < n {
            let v = f32::cast_from(x.read(i));
            acc += v * v;
            i += stride;
        }
        acc
    }

    /// The cube's sum of the units' parts into `shares[at]`.
    #[cube]
    fn write_share(acc: f32, shares: &mut Tensor<f32>, at: usize, #[comptime] block: usize) {
        let t = UNIT_POS_X as usize;
        let mut sums = Shared::<[f32]>::new_slice(block);
        sums[t] = acc;
        cube_sums(&mut sums, 1usize);
        if t == 0 {
            shares[at] = sums[0];
        }
    }

    /// Each cube sums the squares of a grid stride of `x`'s `n` elements and writes the sum to
    /// `shares[offset + cube]`.
    #[cube(launch_unchecked, address_type = "dynamic")]
    fn square_sum_kernel<F: Float>(x: LinearView<'_, F>, shares: &mut Tensor<f32>, n: usize, offset: usize, #[comptime] block: usize, #[define(F)] _dtype: ElemType) {
        let acc = part::<F>(&x, n, block);
        write_share(acc, shares, offset + CUBE_POS_X as usize, block);
    }

    /// [`SLOTS`] tensors a launch: the cubes of row `y` of the grid sum tensor `y`'s squares
    /// (`x0`, `x1`, .. of `ns[y]` elements) and write their shares to `shares[offset + y·width +
    /// cube]`, `width` the grid's. Slots beyond the grid's rows are bound but not read.
    #[cube(launch_unchecked, address_type = "dynamic")]
    #[allow(clippy::too_many_arguments)]
    fn square_sums_kernel<F: Float>(
        x0: LinearView<'_, F>,
        x1: LinearView<'_, F>,
        x2: LinearView<'_, F>,
        x3: LinearView<'_, F>,
        x4: LinearView<'_, F>,
        x5: LinearView<'_, F>,
        shares: &mut Tensor<f32>,
        ns: Sequence<usize>,
        offset: usize,
        #[comptime] block: usize,
        #[define(F)] _dtype: ElemType,
    ) {
        let y = CUBE_POS_Y as usize;
        let mut acc = 0.0f32;
        if y == 0 {
            acc = part::<F>(&x0, ns[0], block);
        } else if y == 1 {
            acc = part::<F>(&x1, ns[1], block);
        } else if y == 2 {
            acc = part::<F>(&x2, ns[2], block);
        } else if y == 3 {
            acc = part::<F>(&x3, ns[3], block);
        } else if y == 4 {
            acc = part::<F>(&x4, ns[4], block);
        } else if y == 5 {
            acc = part::<F>(&x5, ns[5], block);
        }
        write_share(acc, shares, offset + y * CUBE_COUNT_X as usize + CUBE_POS_X as usize, block);
    }

    /// Tensors one launch of [`square_sums_kernel`] takes.
    const SLOTS: usize = 6;

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

        /// One kernel per [`SLOTS`] non-empty tensors of one dtype (one per tensor on a device that
        /// binds fewer buffers than that takes) into one buffer of shares, one sum, one read.
        pub(super) fn total(self) -> f64 {
            let Self { mut first, tensors } = self;
            let tensors: Vec<CubeTensor> = tensors.into_iter().filter(|t| t.shape().num_elements() > 0).collect();
            let Some(t0) = tensors.first() else { return 0.0 };
            let (client, device) = (t0.client.clone(), t0.device.clone());
            let slots = if client.properties().hardware.max_bindings as usize >= SLOTS + 2 { SLOTS } else { 1 };
            // Runs of up to `slots` tensors of one dtype, each launch as wide as its largest needs.
            let mut chunks: Vec<&[CubeTensor]> = Vec::new();
            let mut start = 0;
            for i in 1..=tensors.len() {
                if i == tensors.len() || i - start == slots || tensors[i].dtype != tensors[start].dtype {
                    chunks.push(&tensors[start..i]);
                    start = i;
                }
            }
            let width = |chunk: &[CubeTensor]| chunk.iter().map(|t| cubes(t.shape().num_elements())).max().unwrap_or(1);
            let len: usize = chunks.iter().map(|c| c.len() * width(c)).sum();
            // Every share is written (a cube with nothing to add writes 0).
            let shares = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(client.clone(), device, Shape::new([len]), DType::F32);
            let mut offset = 0;
            for chunk in chunks {
                let w = width(chunk);
                let address = chunk.iter().map(|t| t.required_address_type()).max().unwrap_or_default().max(shares.required_address_type());
                let dtype = dtype_to_storage_type(chunk[0].dtype);
                // SAFETY: each unit reads its tensor at logical indices below its number of
                // elements; the first unit of each cube writes one share below `offset + rows ·
                // w <= len`.
                #[allow(unsafe_code)]
                unsafe {
                    if slots == 1 {
                        let n = chunk[0].shape().num_elements();
                        square_sum_kernel::launch_unchecked(&client, CubeCount::Static(w as u32, 1, 1), CubeDim::new_1d(BLOCK as u32), address, chunk[0].clone().into_linear_view(), shares.clone().into_tensor_arg(), n, offset, BLOCK, dtype);
                    } else {
                        // Unused slots repeat the first tensor: bound, read by no cube.
                        let x = |j: usize| chunk.get(j).unwrap_or(&chunk[0]).clone().into_linear_view();
                        let mut ns = SequenceArg::<usize>::new();
                        for j in 0..SLOTS {
                            ns.push(chunk.get(j).map_or(0, |t| t.shape().num_elements()));
                        }
                        square_sums_kernel::launch_unchecked(
                            &client,
                            CubeCount::Static(w as u32, chunk.len() as u32, 1),
                            CubeDim::new_1d(BLOCK as u32),
                            address,
                            x(0),
                            x(1),
                            x(2),
                            x(3),
                            x(4),
                            x(5),
                            shares.clone().into_tensor_arg(),
                            ns,
                            offset,
                            BLOCK,
                            dtype,
                        );
                    }
                }
                offset += chunk.len() * w;
            }
            first.kind = DispatchTensorKind::Cube(BackendTensor::Float(<burn::backend::Cube as FloatTensorOps<burn::backend::Cube>>::float_sum(shares)));
            burn::tensor::Tensor::<1>::from_dispatch(first).into_scalar::<f64>()
        }
    }
}
