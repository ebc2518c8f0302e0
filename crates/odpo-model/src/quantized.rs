//! Frozen projection weights kept block-quantised on the device: the base of LoRA over a
//! quantised model (QLoRA's idea; Dettmers et al. 2023, arXiv:2305.14314, with ggml's block
//! formats instead of NF4).
//!
//! A weight `[out, in]` is stored as ggml stores it: blocks of 32 along `in`, each with a scale
//! `d` (and, for Q4_1, a minimum `m`): `w = d·q` (Q8_0, q ∈ [−128, 127]; Q4_0, q ∈ [−8, 7]) or
//! `w = d·q + m` (Q4_1, q ∈ [0, 15]). On the device it becomes one of burn's block-quantised
//! tensors, `[in, out]` with blocks of `[32, 1]` and f16 scales, exactly the file's values.
//! burn 0.22's schemes are symmetric (a scale, no offset), so Q4_1 is held as `d·(q − 8)` plus a
//! per-block offset `o = m + 8d`: `x·W = x·deq(Q) + blocksum(x)·O`, where `blocksum` adds each 32
//! inputs and `O` is the `[in/32, out]` offsets, an f32 tensor the size of the scales.
//!
//! On flex a quantised value takes one byte whatever its width (flex unpacks to i8) and its block
//! scale 3/32 of a byte more (burn's f16 copy beside the values, flex's f32 one), so Q8_0, Q4_0 and
//! Q4_1 bases take 1.19 bytes a weight against f32's 4. The product runs through
//! `odpo_kernels::dequantized_matmul`, whose backward pass keeps the weight quantised.

use burn::tensor::quantization::{QuantScheme, QuantStore, QuantValue, ScaleDtype};
use burn::tensor::{Device, Tensor, TensorData};

use crate::error::{ModelError, Result};

/// Elements per block, along a row (ggml's `QK8_0`, `QK4_0`, `QK4_1`).
pub const BLOCK: usize = 32;

/// ggml's block format of a [`QuantBlocks`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// `d·q`, 8-bit q.
    Q8_0,
    /// `d·q`, 4-bit q ∈ [−8, 7].
    Q4_0,
    /// `d·q + m`, 4-bit q ∈ [0, 15].
    Q4_1,
}

/// A `[out, in]` weight in ggml's blocks of 32 along `in`, on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantBlocks {
    /// The format.
    pub kind: BlockKind,
    /// `[out, in]` (rows, row length); `in` is a multiple of [`BLOCK`].
    pub shape: [usize; 2],
    /// One value per element, row-major.
    pub q: Vec<i8>,
    /// One scale per block, row-major `[out, in/32]`.
    pub d: Vec<f32>,
    /// Q4_1's minimum per block, laid out as `d`.
    pub m: Option<Vec<f32>>,
}

impl QuantBlocks {
    /// The f32 values `[out, in]`, row-major, as ggml's `dequantize_row_*` computes them.
    pub fn dequantize(&self) -> Vec<f32> {
        self.q
            .iter()
            .enumerate()
            .map(|(i, &q)| {
                let b = i / BLOCK;
                let x = f32::from(q) * self.d[b];
                match &self.m {
                    Some(m) => x + m[b],
                    None => x,
                }
            })
            .collect()
    }

    /// Q8_0 blocks of `[out, in]` f32 values, as ggml's `quantize_row_q8_0_ref`: `d = max|x| / 127`
    /// stored as f16, `q = round(x / d)` with the unrounded `d`.
    pub fn quantize_q8_0(shape: [usize; 2], data: &[f32]) -> Self {
        let mut q = Vec::with_capacity(data.len());
        let mut d = Vec::with_capacity(data.len() / BLOCK);
        for block in data.chunks(BLOCK) {
            let amax = block.iter().fold(0f32, |m, &x| m.max(x.abs()));
            let scale = amax / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            q.extend(block.iter().map(|&x| (x * inv).round() as i8));
            d.push(half::f16::from_f32(scale).to_f32());
        }
        Self { kind: BlockKind::Q8_0, shape, q, d, m: None }
    }

    /// The same weight with its rows reordered: row `r` of the result is row `src(r)` of `self`
    /// (llama.cpp's Q/K row permutation undone on whole rows, blocks included).
    pub fn permute_rows(&mut self, src: impl Fn(usize) -> usize) {
        let [rows, cols] = self.shape;
        let per = cols / BLOCK;
        let pick = |v: &[i8]| (0..rows).flat_map(|r| v[src(r) * cols..(src(r) + 1) * cols].to_vec()).collect::<Vec<_>>();
        let pick_f = |v: &[f32]| (0..rows).flat_map(|r| v[src(r) * per..(src(r) + 1) * per].to_vec()).collect::<Vec<_>>();
        self.q = pick(&self.q);
        self.d = pick_f(&self.d);
        self.m = self.m.as_deref().map(pick_f);
    }

    /// Rows `start..start + n` of the weight, blocks included (a fused projection split).
    pub fn rows(&self, start: usize, n: usize) -> Self {
        let cols = self.shape[1];
        let per = cols / BLOCK;
        let pick_f = |v: &[f32]| v[start * per..(start + n) * per].to_vec();
        Self { kind: self.kind, shape: [n, cols], q: self.q[start * cols..(start + n) * cols].to_vec(), d: pick_f(&self.d), m: self.m.as_deref().map(pick_f) }
    }

    /// The weight as burn's `[in, out]` layout on `device`: a block-quantised tensor (blocks
    /// `[32, 1]`, f16 scales) and, for Q4_1, the `[in/32, out]` block offsets.
    pub fn to_device(&self, device: &Device) -> (Tensor<2>, Option<Tensor<2>>) {
        let [out, inp] = self.shape;
        let per = inp / BLOCK;
        // Q4_1's q ∈ [0, 15] becomes the symmetric q − 8, and its minimum the offset m + 8d.
        let shift: i8 = if self.m.is_some() { 8 } else { 0 };
        // Room for the f16 scales (and their alignment) that `TensorData::quantized` appends:
        // without it the vector reallocates to twice its size, and flex keeps that allocation.
        let mut values = Vec::with_capacity(out * inp + 2 * per * out + 64);
        values.resize(out * inp, 0i8);
        for (o, row) in self.q.chunks_exact(inp).enumerate() {
            for (i, &q) in row.iter().enumerate() {
                values[i * out + o] = q - shift;
            }
        }
        let transpose_blocks = |v: &[f32]| {
            let mut t = vec![0f32; per * out];
            for o in 0..out {
                for b in 0..per {
                    t[b * out + o] = v[o * per + b];
                }
            }
            t
        };
        let value = match self.kind {
            BlockKind::Q8_0 => QuantValue::Q8S,
            BlockKind::Q4_0 | BlockKind::Q4_1 => QuantValue::Q4S,
        };
        let scheme = QuantScheme::default().with_value(value).with_store(QuantStore::Native).per_block([BLOCK as u8, 1], ScaleDtype::F16);
        let data = TensorData::quantized(values, [inp, out], scheme, &transpose_blocks(&self.d), None);
        let offsets = self.m.as_ref().map(|m| {
            let o: Vec<f32> = m.iter().zip(&self.d).map(|(&m, &d)| m + 8.0 * d).collect();
            Tensor::<2>::from_data(TensorData::new(transpose_blocks(&o), [per, out]), device)
        });
        (Tensor::from_data(data, device), offsets)
    }
}

/// Q8_0 blocks of a `[out, in]` f32 weight named `name` (a base quantised at load), or an error
/// when a row does not split into blocks.
pub(crate) fn quantize_at_load(name: &str, shape: [usize; 2], data: &[f32]) -> Result<QuantBlocks> {
    if !shape[1].is_multiple_of(BLOCK) {
        return Err(ModelError::Invalid(format!(
            "lora.quantized_base: `{name}` has rows of {} inputs, which do not split into blocks of {BLOCK}; use an f32 base for this model",
            shape[1]
        )));
    }
    Ok(QuantBlocks::quantize_q8_0(shape, data))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn blocks(kind: BlockKind) -> QuantBlocks {
        let (out, inp) = (3, 64);
        let q: Vec<i8> = (0..out * inp)
            .map(|i| match kind {
                BlockKind::Q8_0 => ((i * 37 % 256) as i32 - 128) as i8,
                BlockKind::Q4_0 => ((i * 7 % 16) as i32 - 8) as i8,
                BlockKind::Q4_1 => (i * 7 % 16) as i8,
            })
            .collect();
        let n = out * inp / BLOCK;
        let d: Vec<f32> = (0..n).map(|b| half::f16::from_f32(0.01 + b as f32 * 0.003).to_f32()).collect();
        let m = (kind == BlockKind::Q4_1).then(|| (0..n).map(|b| half::f16::from_f32(-0.05 * b as f32).to_f32()).collect());
        QuantBlocks { kind, shape: [out, inp], q, d, m }
    }

    /// On the device, the weight and its offsets give exactly the file's values, transposed.
    #[test]
    fn device_tensors_hold_the_blocks_values() {
        let device = crate::backend::device("flex").unwrap();
        for kind in [BlockKind::Q8_0, BlockKind::Q4_0, BlockKind::Q4_1] {
            let b = blocks(kind);
            let want = b.dequantize();
            let (w, offsets) = b.to_device(&device);
            assert!(matches!(w.dtype(), burn::tensor::DType::QFloat(_)));
            let mut got = w.dequantize();
            if let Some(o) = offsets {
                // Each offset covers 32 inputs of its column.
                let [per, out] = o.dims();
                got = got + o.unsqueeze_dim::<3>(1).expand([per, BLOCK, out]).reshape([per * BLOCK, out]);
            }
            let got: Vec<f32> = got.transpose().into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
            for (i, (a, w)) in got.iter().zip(&want).enumerate() {
                assert!((a - w).abs() <= 1e-6 * w.abs().max(1e-3), "{kind:?}[{i}]: {a} against {w}");
            }
        }
    }

    /// A linear layer over each kind gives the float layer's outputs and input gradients, and its
    /// product goes through the op that keeps the weight quantised.
    #[test]
    fn a_quantized_linear_matches_the_float_one_forward_and_backward() {
        use crate::linear::Linear;
        use burn::module::Param;
        use burn::tensor::TensorData;
        let device = crate::backend::device("flex").unwrap().autodiff();
        for kind in [BlockKind::Q8_0, BlockKind::Q4_0, BlockKind::Q4_1] {
            let b = blocks(kind);
            let [out, inp] = b.shape;
            let (w, offset) = b.to_device(&device);
            let bias = Tensor::<1>::from_data(TensorData::new((0..out).map(|i| i as f32 * 0.1).collect::<Vec<_>>(), [out]), &device);
            let quantized = Linear { weight: Param::from_tensor(w), bias: Some(Param::from_tensor(bias.clone())), lora: None, offset: offset.map(Param::from_tensor) };
            assert!(quantized.is_quantized());
            let float = Linear::new(quantized.float_weight(), Some(bias));
            let xs: Vec<f32> = (0..2 * 3 * inp).map(|i| ((i * 11 % 23) as f32 - 11.0) / 7.0).collect();
            let run = |l: &Linear| {
                let x = Tensor::<3>::from_data(TensorData::new(xs.clone(), [2, 3, inp]), &device).require_grad();
                let y = l.forward(x.clone());
                let grads = (y.clone() * y.clone()).sum().backward();
                let v = |t: Tensor<3>| t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
                (v(y.inner()), v(x.grad(&grads).unwrap()))
            };
            let before = odpo_kernels::dequantized_matmul_calls();
            let (y, gx) = run(&quantized);
            assert!(odpo_kernels::dequantized_matmul_calls() > before, "{kind:?}: the quantised product did not run");
            let (want_y, want_gx) = run(&float);
            for (a, w) in y.iter().zip(&want_y).chain(gx.iter().zip(&want_gx)) {
                assert!((a - w).abs() <= 1e-5 * w.abs().max(1.0), "{kind:?}: {a} against {w}");
            }
        }
    }

    /// A fused projection's rows split off keep their values, block scales and offsets with them.
    #[test]
    fn rows_split_off_keep_their_values() {
        for kind in [BlockKind::Q8_0, BlockKind::Q4_0, BlockKind::Q4_1] {
            let b = blocks(kind);
            let all = b.dequantize();
            let cols = b.shape[1];
            let (first, rest) = (b.rows(0, 1), b.rows(1, 2));
            assert_eq!((first.shape, rest.shape, rest.kind), ([1, cols], [2, cols], kind));
            assert_eq!(first.dequantize(), all[..cols]);
            assert_eq!(rest.dequantize(), all[cols..]);
        }
    }

    #[test]
    fn q8_0_quantisation_is_within_half_a_step() {
        let data: Vec<f32> = (0..2 * 64).map(|i| ((i * 29 % 97) as f32 - 48.0) / 37.0).collect();
        let b = QuantBlocks::quantize_q8_0([2, 64], &data);
        for (i, (&x, y)) in data.iter().zip(b.dequantize()).enumerate() {
            // Half a step, plus the f16 rounding of the scale over up to 127 steps.
            let step = b.d[i / BLOCK];
            assert!((x - y).abs() <= 0.5 * step + 127.0 * step * 1e-3, "[{i}]: {x} against {y}");
        }
        assert!(quantize_at_load("w", [2, 40], &data[..80]).is_err());
    }
}
