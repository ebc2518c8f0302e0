//! The kernels on CPU memory: reaching the f32 buffer of a flex or libtorch tensor, and the loops.

use burn::backend::DispatchTensorKind;
use rayon::prelude::*;

use crate::Coeffs;

/// Elements per rayon task: large enough that scheduling costs nothing next to the memory traffic.
pub(crate) const CHUNK: usize = 1 << 15;

/// The tensor's elements in row-major order as a mutable slice, when it is an f32 CPU tensor,
/// contiguous and the only owner of its buffer (so writing it changes no other tensor).
fn slice_mut(kind: &mut DispatchTensorKind) -> Option<&mut [f32]> {
    match kind {
        #[cfg(feature = "flex")]
        DispatchTensorKind::Flex(burn::backend::BackendTensor::Float(t)) => flex::slice_mut(t),
        #[cfg(feature = "tch")]
        #[allow(deprecated)]
        DispatchTensorKind::LibTorch(burn::backend::BackendTensor::Float(t)) => tch::slice_mut(t),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// Calls `f` with the tensor's elements in row-major order, when it is an f32 CPU tensor (strided
/// ones, such as the transposed gradient of a tied embedding, are copied first).
fn with_rows<R>(kind: &DispatchTensorKind, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    match kind {
        #[cfg(feature = "flex")]
        DispatchTensorKind::Flex(burn::backend::BackendTensor::Float(t)) => flex::with_rows(t, f),
        #[cfg(feature = "tch")]
        #[allow(deprecated)]
        DispatchTensorKind::LibTorch(burn::backend::BackendTensor::Float(t)) => tch::with_rows(t, f),
        #[allow(unreachable_patterns)]
        _ => {
            let _ = f;
            None
        }
    }
}

/// The tensor's elements in storage order (any order: for sums), when it is an f32 CPU tensor whose
/// elements fill one span of its buffer (contiguous, or a permutation of it such as a transpose).
fn span(kind: &DispatchTensorKind) -> Option<&[f32]> {
    match kind {
        #[cfg(feature = "flex")]
        DispatchTensorKind::Flex(burn::backend::BackendTensor::Float(t)) => flex::span(t),
        #[cfg(feature = "tch")]
        #[allow(deprecated)]
        DispatchTensorKind::LibTorch(burn::backend::BackendTensor::Float(t)) => tch::span(t),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// Whether a layout's elements fill exactly `Π shape` consecutive slots: its strides, sorted, are
/// the running products of the matching sizes.
#[cfg(any(feature = "flex", feature = "tch"))]
fn dense<S: Copy + TryInto<usize>>(shape: &[usize], strides: &[S]) -> bool {
    let mut dims: Vec<(usize, usize)> = Vec::with_capacity(shape.len());
    for (&n, &s) in shape.iter().zip(strides) {
        match s.try_into() {
            Ok(s) => dims.push((s, n)),
            Err(_) => return false,
        }
    }
    dims.retain(|&(_, n)| n != 1);
    dims.sort_unstable();
    let mut expected = 1;
    for (s, n) in dims {
        if s != expected {
            return false;
        }
        expected *= n;
    }
    true
}

/// The fused AdamW update, in place; false (nothing written) when a buffer is out of reach.
pub(crate) fn adamw(p: &mut DispatchTensorKind, g: &DispatchTensorKind, m: &mut DispatchTensorKind, v: &mut DispatchTensorKind, c: &Coeffs) -> bool {
    let (Some(p), Some(m), Some(v)) = (slice_mut(p), slice_mut(m), slice_mut(v)) else {
        return false;
    };
    if m.len() != p.len() || v.len() != p.len() {
        return false;
    }
    // The scalars as locals (loaded once, not re-read after every store) and the optional factors
    // as 1.0 (multiplying by 1 is exact), so that the loop has no branch and vectorises.
    let Coeffs { decay, scale, w1, b2, w2, bc2_sqrt, eps, neg_step_size, .. } = *c;
    let (decay, scale) = (decay.unwrap_or(1.0), scale.unwrap_or(1.0));
    let run = move |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = g * scale;
            // PyTorch's lerp for a weight below 0.5, and addcmul's `self + value·t1·t2`.
            let m1 = *m + w1 * (g - *m);
            let v1 = *v * b2 + w2 * g * g;
            let denom = v1.sqrt() / bc2_sqrt + eps;
            *p = *p * decay + neg_step_size * m1 / denom;
            (*m, *v) = (m1, v1);
        }
    };
    with_rows(g, |g| {
        if g.len() != p.len() {
            return false;
        }
        if p.len() <= CHUNK {
            run(p, g, m, v);
        } else {
            p.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).zip(m.par_chunks_mut(CHUNK)).zip(v.par_chunks_mut(CHUNK)).for_each(|(((p, g), m), v)| run(p, g, m, v));
        }
        true
    })
    .unwrap_or(false)
}

/// `Σ x²` in f64, when the buffer is reachable.
pub(crate) fn sum_squares(x: &DispatchTensorKind) -> Option<f64> {
    let x = span(x)?;
    // Eight independent accumulators: a single running sum is a chain of dependent adds that
    // cannot vectorise.
    let sum = |x: &[f32]| {
        let mut lanes = [0f64; 8];
        let mut blocks = x.chunks_exact(8);
        for b in &mut blocks {
            for (l, &a) in lanes.iter_mut().zip(b) {
                *l += f64::from(a) * f64::from(a);
            }
        }
        lanes.iter().sum::<f64>() + blocks.remainder().iter().map(|&a| f64::from(a) * f64::from(a)).sum::<f64>()
    };
    Some(if x.len() <= CHUNK { sum(x) } else { x.par_chunks(CHUNK).map(sum).sum() })
}

/// Whether tensors on `device` are ones the kernels reach (tests check the fused path ran there).
#[cfg(test)]
pub(crate) fn reachable(device: &burn::tensor::Device) -> bool {
    let t = burn::tensor::Tensor::<1>::zeros([4], device);
    sum_squares(&t.into_dispatch().kind).is_some()
}

#[cfg(feature = "flex")]
pub(crate) mod flex {
    use burn::backend::flex::FlexTensor;
    use burn::tensor::DType;

    pub(crate) fn slice_mut(t: &mut FlexTensor) -> Option<&mut [f32]> {
        if t.dtype() != DType::F32 {
            return None;
        }
        let (start, end) = t.layout().contiguous_offsets()?;
        t.try_storage_mut::<f32>()?.get_mut(start..end)
    }

    pub(crate) fn with_rows<R>(t: &FlexTensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
        if t.dtype() != DType::F32 {
            return None;
        }
        match t.as_slice::<f32>() {
            Some(s) => Some(f(s)),
            None => t.to_contiguous().as_slice::<f32>().map(f),
        }
    }

    /// The elements of an integer tensor as i64, in row-major order.
    pub(crate) fn ints(t: &FlexTensor) -> Option<Vec<i64>> {
        let t = if t.is_contiguous() { t.clone() } else { t.to_contiguous() };
        match t.dtype() {
            DType::I64 => t.as_slice::<i64>().map(<[i64]>::to_vec),
            DType::I32 => t.as_slice::<i32>().map(|s| s.iter().map(|&a| i64::from(a)).collect()),
            _ => None,
        }
    }

    /// `f` applied to the elements of `inputs` (f32 tensors of one shape), a chunk of positions at
    /// a time, into `M` new tensors of that shape, split over rayon's threads; `None` when an input
    /// is not f32 or the shapes differ. `f` gets the same range of every input and output, all of
    /// one length, so that its loop can run in vector lanes. One pass over each buffer, where
    /// burn-flex's element-wise operations make one per operation, on one thread.
    pub(crate) fn zip_chunks<const N: usize, const M: usize>(inputs: [&FlexTensor; N], f: impl Fn([&[f32]; N], [&mut [f32]; M]) + Sync) -> Option<[FlexTensor; M]> {
        use rayon::prelude::*;

        let shape = inputs.first()?.layout().shape().clone();
        if inputs.iter().any(|t| t.dtype() != DType::F32 || *t.layout().shape() != shape) {
            return None;
        }
        let owned: Vec<FlexTensor> = inputs.iter().filter(|t| t.as_slice::<f32>().is_none()).map(|t| t.to_contiguous()).collect();
        let mut copies = owned.iter();
        let mut slices: [&[f32]; N] = [&[]; N];
        for (s, t) in slices.iter_mut().zip(inputs) {
            *s = match t.as_slice::<f32>() {
                Some(x) => x,
                None => copies.next()?.as_slice::<f32>()?,
            };
        }
        let n = shape.num_elements();
        let mut outs: [Vec<f32>; M] = std::array::from_fn(|_| vec![0f32; n]);
        // Per chunk of positions, the matching chunk of every output.
        let mut per_output: Vec<std::vec::IntoIter<&mut [f32]>> = outs.iter_mut().map(|o| o.chunks_mut(super::CHUNK).collect::<Vec<_>>().into_iter()).collect();
        let chunks: Vec<[&mut [f32]; M]> = (0..n.div_ceil(super::CHUNK)).map(|_| std::array::from_fn(|j| per_output[j].next().unwrap_or_default())).collect();
        chunks.into_par_iter().enumerate().for_each(|(c, out)| {
            let start = c * super::CHUNK;
            let end = (start + super::CHUNK).min(n);
            f(slices.map(|s| &s[start..end]), out);
        });
        Some(outs.map(|o| tensor(shape.clone(), o)))
    }

    /// A contiguous f32 tensor of `shape` holding `data`, without a copy.
    pub(crate) fn tensor(shape: burn::tensor::Shape, data: Vec<f32>) -> FlexTensor {
        FlexTensor::new(burn::tensor::Bytes::from_elems(data), burn::backend::flex::Layout::contiguous(shape), DType::F32)
    }

    /// A rank-4 tensor read in place as `shape`: its buffer, the offset of element `[0, 0, 0, 0]`
    /// and the strides (0 where a dimension of size 1 is read as a larger one). Built only when the
    /// strides are non-negative and every element the view reaches lies inside the buffer.
    pub(crate) struct View<'a, T> {
        pub(crate) data: &'a [T],
        start: usize,
        pub(crate) strides: [usize; 4],
    }

    impl<'a, T> View<'a, T> {
        /// `t`, whose buffer is `data` (its elements, of `t`'s dtype), read as `shape`.
        pub(crate) fn new(t: &'a FlexTensor, data: &'a [T], shape: [usize; 4]) -> Option<Self> {
            let layout = t.layout();
            let (dims, strides) = (layout.shape(), layout.strides());
            if dims.num_dims() != 4 {
                return None;
            }
            let mut out = [0usize; 4];
            let mut last = layout.start_offset();
            for i in 0..4 {
                out[i] = match dims[i] {
                    n if n == shape[i] => usize::try_from(strides[i]).ok()?,
                    1 => 0,
                    _ => return None,
                };
                last = last.checked_add(shape[i].saturating_sub(1).checked_mul(out[i])?)?;
            }
            (last < data.len() || shape.contains(&0)).then_some(Self { data, start: layout.start_offset(), strides: out })
        }

        /// The offset of element `[b, h, i, 0]`.
        pub(crate) fn at(&self, b: usize, h: usize, i: usize) -> usize {
            self.start + b * self.strides[0] + h * self.strides[1] + i * self.strides[2]
        }

        /// The matrix `[b, h]` as the gemm crate takes it: its first element and its column and
        /// row strides.
        pub(crate) fn matrix(&self, b: usize, h: usize) -> (*const T, isize, isize) {
            self.rows_from(b, h, 0)
        }

        /// The matrix `[b, h]` from its row `i` on, as [`View::matrix`] gives it.
        pub(crate) fn rows_from(&self, b: usize, h: usize, i: usize) -> (*const T, isize, isize) {
            // In bounds for a row of the view: `new` checked the last element it reaches.
            (self.data[self.at(b, h, i)..].as_ptr(), self.strides[3] as isize, self.strides[2] as isize)
        }

        /// The same matrix transposed.
        pub(crate) fn transposed(&self, b: usize, h: usize) -> (*const T, isize, isize) {
            let (ptr, cs, rs) = self.matrix(b, h);
            (ptr, rs, cs)
        }
    }

    impl<'a> View<'a, f32> {
        /// An f32 tensor read as `shape`.
        pub(crate) fn f32(t: &'a FlexTensor, shape: [usize; 4]) -> Option<Self> {
            if t.dtype() != DType::F32 {
                return None;
            }
            Self::new(t, t.storage::<f32>(), shape)
        }

        /// The row `[b, h, i, ..]` as `n` values: a slice of the buffer where the last stride is 1,
        /// else copied into `buf`.
        pub(crate) fn row<'b>(&'b self, [b, h, i]: [usize; 3], n: usize, buf: &'b mut Vec<f32>) -> Option<&'b [f32]> {
            let base = self.at(b, h, i);
            if self.strides[3] == 1 {
                return self.data.get(base..base + n);
            }
            buf.clear();
            for j in 0..n {
                buf.push(*self.data.get(base + j * self.strides[3])?);
            }
            Some(buf)
        }
    }

    pub(crate) fn span(t: &FlexTensor) -> Option<&[f32]> {
        if t.dtype() != DType::F32 {
            return None;
        }
        let layout = t.layout();
        if !super::dense(layout.shape(), layout.strides()) {
            return None;
        }
        let start = layout.start_offset();
        t.storage::<f32>().get(start..start + layout.num_elements())
    }

    /// Test data for the flex loops of the layer kernels.
    #[cfg(test)]
    #[allow(clippy::expect_used)]
    pub(crate) mod testing {
        use burn::backend::flex::FlexTensor;

        /// A tensor's values in row-major order.
        pub(crate) fn values(t: &FlexTensor) -> Vec<f32> {
            t.to_contiguous().as_slice::<f32>().expect("f32").to_vec()
        }

        /// `n` values spread over `[−scale, scale]` in a fixed, seed-dependent order.
        pub(crate) fn wave(n: usize, seed: usize, scale: f32) -> Vec<f32> {
            (0..n).map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0) * scale).collect()
        }
    }
}

// burn-tch is marked deprecated upstream; it is still the libtorch backend of burn 0.22.
#[cfg(feature = "tch")]
#[allow(unsafe_code, deprecated)]
pub(crate) mod tch {
    use burn::backend::TensorMetadata;
    use burn::backend::libtorch::{LibTorchDevice, TchTensor};
    use burn::tensor::DType;

    fn cpu_f32(t: &TchTensor) -> bool {
        t.dtype() == DType::F32 && t.device() == LibTorchDevice::Cpu
    }

    fn numel(t: &TchTensor) -> Option<usize> {
        Some(t.tensor.numel())
    }

    pub(crate) fn slice_mut(t: &mut TchTensor) -> Option<&mut [f32]> {
        // `can_mut`: burn-tch's own test for writing in place (no other tensor holds the buffer, no
        // broadcast stride).
        if !t.can_mut() || !cpu_f32(t) || !t.tensor.is_contiguous() {
            return None;
        }
        let n = numel(t)?;
        if n == 0 {
            return Some(&mut []);
        }
        // SAFETY: the tensor is a contiguous f32 CPU tensor of `n` elements starting at `data_ptr`,
        // no other burn tensor shares its buffer (`can_mut`), and the slice borrows `t` mutably, so
        // nothing else reads or writes it while the slice lives.
        Some(unsafe { std::slice::from_raw_parts_mut(t.tensor.data_ptr().cast::<f32>(), n) })
    }

    /// The `n` elements from `data_ptr`.
    ///
    /// SAFETY (for callers): `t` is an f32 CPU tensor whose `n` elements fill one span starting at
    /// `data_ptr` (contiguous, or a permutation of contiguous strides, all non-negative).
    unsafe fn raw(t: &TchTensor, n: usize) -> &[f32] {
        if n == 0 {
            return &[];
        }
        // SAFETY: per the caller's guarantee; the slice borrows `t`, which keeps the buffer alive,
        // and tensors sharing the buffer are only written through `slice_mut`, which refuses them.
        unsafe { std::slice::from_raw_parts(t.tensor.data_ptr().cast::<f32>().cast_const(), n) }
    }

    pub(crate) fn with_rows<R>(t: &TchTensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
        if !cpu_f32(t) {
            return None;
        }
        let n = numel(t)?;
        if t.tensor.is_contiguous() {
            // SAFETY: contiguous f32 CPU tensor of `n` elements.
            return Some(f(unsafe { raw(t, n) }));
        }
        let copy = TchTensor::new(t.tensor.contiguous());
        // SAFETY: `contiguous()` of a strided tensor is a new contiguous f32 CPU tensor of `n` elements.
        Some(f(unsafe { raw(&copy, n) }))
    }

    /// The elements of an integer CPU tensor as i64, in row-major order.
    pub(crate) fn ints(t: &TchTensor) -> Option<Vec<i64>> {
        if t.device() != LibTorchDevice::Cpu {
            return None;
        }
        let t = TchTensor::new(t.tensor.contiguous());
        let n = numel(&t)?;
        if n == 0 {
            return Some(Vec::new());
        }
        let ptr = t.tensor.data_ptr();
        // SAFETY: `contiguous()` gives a contiguous CPU tensor of `n` elements of the checked type,
        // kept alive by `t` while the slice is read.
        match t.dtype() {
            DType::I64 => Some(unsafe { std::slice::from_raw_parts(ptr.cast::<i64>().cast_const(), n) }.to_vec()),
            DType::I32 => Some(unsafe { std::slice::from_raw_parts(ptr.cast::<i32>().cast_const(), n) }.iter().map(|&a| i64::from(a)).collect()),
            _ => None,
        }
    }

    pub(crate) fn span(t: &TchTensor) -> Option<&[f32]> {
        if !cpu_f32(t) {
            return None;
        }
        let (shape, strides) = (t.tensor.size(), t.tensor.stride());
        let shape: Vec<usize> = shape.iter().map(|&d| usize::try_from(d).unwrap_or(0)).collect();
        if !super::dense(&shape, &strides) {
            return None;
        }
        // SAFETY: `dense` checked that the non-negative strides are a permutation of contiguous
        // ones, so the `n` elements fill the span starting at `data_ptr` (the element at index 0).
        Some(unsafe { raw(t, numel(t)?) })
    }
}
