//! Products of f32 tensors computed in f32 on every backend.
//!
//! burn-cubecl 0.22.1 multiplies through cubek-matmul 0.3.1's automatic routine, which on a device
//! with TF32 tensor cores (NVIDIA from Ampere on: the CUDA backend) rounds f32 operands to TF32
//! (`adjust_dtypes` in its blueprint): a 10-bit mantissa, so a product carries a relative error of
//! about 10⁻³, a hundred times what the conformance suites allow against PyTorch. PyTorch keeps f32
//! products in f32 unless told otherwise (`torch.backends.cuda.matmul.allow_tf32`, off since 1.12),
//! and so does this crate: on such a device an f32 product runs cubek's unit routine (f32
//! multiply-adds, no tensor cores). Half-precision products take the routine in force
//! ([`crate::MatmulRoutine`]; burn's own by default); other devices and the other backends take
//! burn's matmul, unchanged. Training in bf16 or f16 (`train.dtype`) is the fast path on a
//! GPU; f32 is the exact one.
//!
//! On flex, f32 products of two matrices run the gemm crate as burn-flex 0.22.1 does, with the same
//! arguments, into an output allocated once. burn-flex's own product allocates its output as bytes
//! and, since a byte vector reports an alignment of 1, copies it into a second, aligned allocation
//! before multiplying: for the logits and the embedding's gradient that is a zeroed and a copied
//! buffer of 100 to 150 MB each, on one thread, per product.
//!
//! `matmul` has its own backward step (`dL = dY·Rᵀ`, `dR = Lᵀ·dY`, each through the same
//! product), since burn's autodiff matmul would multiply the gradients with its own routine.
//! `matmul_nt` is `L·Rᵀ` for a tied LM head (`R` the `[V, D]` embedding): its step writes
//! `dR = dYᵀ·L` as `R` is laid out, where `matmul` of `Rᵀ` would hand back `(Lᵀ·dY)ᵀ`, a strided
//! view that the embedding's own gradient is then added to, and the gradient norm and the update
//! read, column by column (Gemma 3 270M's embedding: 168 million entries).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, backend_extension};
use burn::tensor::Tensor;

/// A product whose f32 operands are multiplied in f32. Overridden on the cubecl backends (with the
/// `cube` feature), where burn's own product may round them to TF32.
#[backend_extension(Autodiff, Flex: cfg(feature = "flex"), Cube: cfg(feature = "cube"))]
pub trait ExactMatmulBackend: Backend {
    /// `lhs · rhs` for `lhs` `[.., M, K]` and `rhs` `[.., K, N]` with the same leading dimensions.
    fn exact_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(lhs, rhs)
    }

    /// `lhs · rhsᵀ` for `lhs` `[M, K]` and `rhs` `[N, K]`: [`Self::exact_matmul`] of `rhs`'s
    /// transpose, with its own backward step under autodiff.
    fn exact_matmul_nt(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::exact_matmul(lhs, Self::float_transpose(rhs))
    }
}

/// flex: the gemm crate's product into an output allocated once (see the module docs).
#[cfg(feature = "flex")]
impl ExactMatmulBackend for burn::backend::Flex {
    fn exact_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        flex::matmul(lhs, rhs)
    }
}

#[cfg(feature = "flex")]
#[allow(unsafe_code)]
pub(crate) mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::backend::ops::FloatTensorOps;
    use burn::tensor::{DType, Shape};

    /// burn-flex's threshold (`m·n·k`) above which gemm splits a product over rayon's threads.
    const PARALLEL_THRESHOLD: usize = 192 * 192 * 192;

    /// `lhs · rhs` for f32 matrices (any strides); other products are burn-flex's.
    pub(crate) fn matmul(lhs: FlexTensor, rhs: FlexTensor) -> FlexTensor {
        let (l, r) = (lhs.layout(), rhs.layout());
        let matrices = l.shape().num_dims() == 2 && r.shape().num_dims() == 2 && l.shape()[1] == r.shape()[0];
        if !(matrices && lhs.dtype() == DType::F32 && rhs.dtype() == DType::F32) {
            return Flex::float_matmul(lhs, rhs);
        }
        let (m, k, n) = (l.shape()[0], l.shape()[1], r.shape()[1]);
        let (a, b) = (lhs.storage::<f32>(), rhs.storage::<f32>());
        if l.start_offset() > a.len() || r.start_offset() > b.len() {
            return Flex::float_matmul(lhs, rhs);
        }
        if m == 0 || n == 0 || k == 0 {
            return crate::cpu::flex::tensor(Shape::new([m, n]), vec![0f32; m * n]);
        }
        // Left unwritten for gemm to fill: a zeroed vector costs a pass over it on this thread
        // wherever the allocator does not hand out fresh pages (below glibc's mmap threshold).
        let mut out: Vec<f32> = Vec::with_capacity(m * n);
        let parallelism = if m.saturating_mul(n).saturating_mul(k) >= PARALLEL_THRESHOLD { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
        let ([a_rs, a_cs], [b_rs, b_cs]) = ([l.strides()[0], l.strides()[1]], [r.strides()[0], r.strides()[1]]);
        // Pointers into the whole buffers: a stride may reach back before the first element.
        let (a, b) = (a.as_ptr().wrapping_add(l.start_offset()), b.as_ptr().wrapping_add(r.start_offset()));
        // SAFETY: `out` has room for the m × n row-major result; `a` and `b` point at the operands'
        // first elements, and their layouts (flex's invariant) keep every element that the
        // strides reach inside their buffers, which `lhs` and `rhs` keep alive. With `read_dst`
        // false gemm sets alpha to 0 and writes every element of `out` before it reads any
        // (`out = lhs · rhs`), so all m × n are initialised when the length is set.
        unsafe {
            gemm::gemm(m, n, k, out.as_mut_ptr(), 1, n as isize, false, a, a_cs, a_rs, b, b_cs, b_rs, 0.0f32, 1.0f32, false, false, false, parallelism);
            out.set_len(m * n);
        }
        crate::cpu::flex::tensor(Shape::new([m, n]), out)
    }
}

/// The cubecl backends: cubek's unit routine for f32 operands where the device has TF32.
#[cfg(feature = "cube")]
impl ExactMatmulBackend for burn::backend::Cube {
    fn exact_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        cube::matmul(lhs, rhs)
    }
}

#[cfg(feature = "cube")]
pub(crate) mod cube {
    use burn::backend::Cube;
    use burn::backend::ops::FloatTensorOps;
    use burn::tensor::DType;
    use burn_backend::cubecl::dtype_to_storage_type;
    use burn_cubecl::cubecl::ir::{ElemType, FloatKind};
    use burn_cubecl::kernel::matmul::init_matmul_output;
    use burn_cubecl::tensor::CubeTensor;
    use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems, MatmulSetupError};
    use cubek::matmul::launch::launch_ref;
    use cubek::matmul::multi_level;
    use cubek::matmul::strategy::Strategy;
    use cubek::std::InputBinding;

    /// Whether burn's product would round this tensor's f32 values to TF32: an f32 tensor on a
    /// device that has the type.
    pub(crate) fn rounds_f32(t: &CubeTensor) -> bool {
        t.dtype == DType::F32 && t.client.properties().supports_type(ElemType::Float(FloatKind::TF32))
    }

    /// `lhs · rhs`, with f32 operands on a TF32 device through cubek's unit routine, and
    /// half-precision operands through the [`crate::MatmulRoutine`] in force.
    pub(crate) fn matmul(lhs: CubeTensor, rhs: CubeTensor) -> CubeTensor {
        crate::matmul_routine::note_product(&lhs, &rhs);
        if matches!(lhs.dtype, DType::BF16 | DType::F16) && rhs.dtype == lhs.dtype {
            let routine = crate::matmul_routine();
            if routine != crate::MatmulRoutine::AUTO {
                match launch(&routine.strategy(), &lhs, &rhs, lhs.dtype) {
                    Ok(out) => {
                        crate::matmul_routine::count(true);
                        return out;
                    }
                    Err(err) => crate::matmul_routine::refused(routine, &lhs, &rhs, &err),
                }
            }
            return Cube::float_matmul(lhs, rhs);
        }
        if !(rounds_f32(&lhs) && rhs.dtype == DType::F32) {
            return Cube::float_matmul(lhs, rhs);
        }
        super::CUBE_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let strategy = Strategy::MultiLevel(multi_level::Strategy::SimpleUnit(Default::default()));
        // As burn's own matmul does, a routine that cannot take the problem is a bug, not input.
        launch(&strategy, &lhs, &rhs, DType::F32).unwrap_or_else(|err| panic!("the f32 unit matmul refused the product: {err:?}"))
    }

    /// `lhs · rhs` (both of `dtype`) through cubek's `strategy`, into a new output of `dtype`.
    pub(crate) fn launch(strategy: &Strategy, lhs: &CubeTensor, rhs: &CubeTensor, dtype: DType) -> Result<CubeTensor, MatmulSetupError> {
        let out = init_matmul_output(lhs, rhs, dtype);
        let storage = dtype_to_storage_type(dtype);
        let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems { lhs: storage, rhs: storage, out: storage });
        let client = out.client.clone();
        let (lhs, rhs) = (InputBinding::new(lhs.clone().binding(), storage), InputBinding::new(rhs.clone().binding(), storage));
        launch_ref(strategy, &client, lhs, rhs, out.clone().binding(), &mut dtypes)?;
        Ok(out)
    }
}

/// Autodiff: the inner backend's product, recorded with a backward step that multiplies the
/// gradients through the same product (burn's own `Matmul` step, without broadcasting).
impl<B: Backend + ExactMatmulBackend, C: CheckpointStrategy> ExactMatmulBackend for Autodiff<B, C> {
    fn exact_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        record::<B, C>(ExactMatmul { rhs_transposed: false }, lhs, rhs)
    }

    fn exact_matmul_nt(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        record::<B, C>(ExactMatmul { rhs_transposed: true }, lhs, rhs)
    }
}

/// The backward step of `lhs · rhs`, or of `lhs · rhsᵀ` when `rhs_transposed`.
#[derive(Debug)]
struct ExactMatmul {
    rhs_transposed: bool,
}

impl<B: Backend + ExactMatmulBackend> Backward<B, 2> for ExactMatmul {
    type State = (Option<NodeId>, Option<NodeId>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_lhs, node_rhs] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (lhs, rhs) = ops.state;
        // Each operand was kept exactly when the other one's gradient is wanted.
        if let (Some(node), Some(rhs)) = (node_lhs, rhs) {
            let rhs: FloatTensor<B> = checkpointer.retrieve_node_output(rhs);
            let rhs = if self.rhs_transposed { rhs } else { B::float_transpose(rhs) };
            grads.register::<B>(node.id, B::exact_matmul(dy.clone(), rhs));
        }
        if let (Some(node), Some(lhs)) = (node_rhs, lhs) {
            let lhs: FloatTensor<B> = checkpointer.retrieve_node_output(lhs);
            // For `lhs · rhsᵀ`, `dyᵀ · lhs`, laid out as `rhs` is: the transpose of `lhsᵀ · dy`
            // would be a strided view, whose sum with a tied embedding's own gradient and every
            // pass of the update would walk a 100 MB+ matrix column by column.
            let grad = if self.rhs_transposed { B::exact_matmul(B::float_transpose(dy), lhs) } else { B::exact_matmul(B::float_transpose(lhs), dy) };
            grads.register::<B>(node.id, grad);
        }
    }
}

/// `op`'s product of `lhs` and `rhs` on the inner backend, recorded with `op` as its backward step.
fn record<B: Backend + ExactMatmulBackend, C: CheckpointStrategy>(op: ExactMatmul, lhs: FloatTensor<Autodiff<B, C>>, rhs: FloatTensor<Autodiff<B, C>>) -> FloatTensor<Autodiff<B, C>> {
    let forward = if op.rhs_transposed { B::exact_matmul_nt } else { B::exact_matmul };
    let (lhs_tracked, rhs_tracked) = (lhs.is_tracked(), rhs.is_tracked());
    match op.prepare::<C>([lhs.node(), rhs.node()]).compute_bound().stateful() {
        OpsKind::Tracked(mut prep) => {
            // Each operand is kept only for the other's gradient.
            let lhs_state = rhs_tracked.then(|| prep.checkpoint(&lhs));
            let rhs_state = lhs_tracked.then(|| prep.checkpoint(&rhs));
            prep.finish((lhs_state, rhs_state), forward(lhs.into_primitive(), rhs.into_primitive()))
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(lhs.into_primitive(), rhs.into_primitive())),
    }
}

/// Products that ran cubek's unit routine in place of burn's (for the tests that check it ran).
#[cfg(feature = "cube")]
static CUBE_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How often an f32 product in this process ran in f32 where burn's matmul would have rounded it
/// to TF32 (0 without the `cube` feature, or on devices without TF32).
pub fn exact_matmul_calls() -> usize {
    #[cfg(feature = "cube")]
    return CUBE_CALLS.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(feature = "cube"))]
    0
}

/// Where the extension runs: flex and the cubecl backends (libtorch keeps burn's product).
const REACH: crate::Reach = crate::Reach { flex: true, libtorch: false, cube: true };

/// `lhs · rhs` for `[M, K]` and `[K, N]`, or `[.., M, K]` and `[.., K, N]` with the same leading
/// dimensions (attention's products over batch and heads): through the extension on flex (one
/// allocation for the output of two matrices; burn-flex's product for more dimensions) and on the
/// cubecl backends, where f32 operands are multiplied in f32 (see the module docs); burn's
/// `matmul` on libtorch.
pub fn matmul<const D: usize>(lhs: Tensor<D>, rhs: Tensor<D>) -> Tensor<D> {
    if !crate::extended(&lhs.clone().into_dispatch().kind, REACH) {
        return lhs.matmul(rhs);
    }
    Tensor::from_dispatch(<Dispatch as ExactMatmulBackend>::exact_matmul(lhs.into_dispatch(), rhs.into_dispatch()))
}

/// `lhs · rhsᵀ` for `[M, K]` and `[N, K]` (a tied LM head: hidden states times the embedding's
/// transpose), as [`matmul`] does it, with `rhs`'s gradient computed in `rhs`'s own layout (`dyᵀ ·
/// lhs`) rather than as a transposed view of `lhsᵀ · dy`; burn's `matmul` on libtorch.
pub fn matmul_nt(lhs: Tensor<2>, rhs: Tensor<2>) -> Tensor<2> {
    if !crate::extended(&lhs.clone().into_dispatch().kind, REACH) {
        return lhs.matmul(rhs.transpose());
    }
    Tensor::from_dispatch(<Dispatch as ExactMatmulBackend>::exact_matmul_nt(lhs.into_dispatch(), rhs.into_dispatch()))
}

/// `x·W + b` for `x` `[.., in]`, `W` `[in, out]`, `b` `[out]`: burn's `linear` on libtorch; on flex
/// and the cubecl backends the product is [`matmul`] over the rows of `x`.
pub fn linear<const D: usize>(x: Tensor<D>, weight: Tensor<2>, bias: Option<Tensor<1>>) -> Tensor<D> {
    if !crate::extended(&x.clone().into_dispatch().kind, REACH) {
        return burn::tensor::module::linear(x, weight, bias);
    }
    let dims = x.dims();
    let [d_in, d_out] = weight.dims();
    let rows = dims[..D - 1].iter().product();
    // The rows as views where their layout allows (`reshape_rows`), forward and backward.
    let mut y = matmul(crate::reshape_rows(x, [rows, d_in]), weight);
    if let Some(b) = bias {
        y = y + b.unsqueeze_dim(0);
    }
    let mut out = dims;
    out[D - 1] = d_out;
    crate::reshape_rows(y, out)
}
