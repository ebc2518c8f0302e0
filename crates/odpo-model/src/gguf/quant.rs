//! ggml's tensor types: the table of block sizes, and dequantisation of F32, F16, BF16, Q8_0, Q4_0,
//! Q4_1, Q5_0, Q5_1 and the k-quants Q2_K to Q6_K (the types of llama.cpp's `Q4_K_M`-style files)
//! to f32, following ggml's `dequantize_row_*` (checked against gguf-py's `gguf.quants.dequantize`).

use crate::quantized::{BlockKind, QuantBlocks};

const GGML_TYPES: [Option<(&str, u64, u64)>; 42] = [
    Some(("F32", 1, 4)), Some(("F16", 1, 2)), Some(("Q4_0", 32, 18)), Some(("Q4_1", 32, 20)),
    None, None, Some(("Q5_0", 32, 22)), Some(("Q5_1", 32, 24)), Some(("Q8_0", 32, 34)),
    Some(("Q8_1", 32, 36)), Some(("Q2_K", 256, 84)), Some(("Q3_K", 256, 110)),
    Some(("Q4_K", 256, 144)), Some(("Q5_K", 256, 176)), Some(("Q6_K", 256, 210)),
    Some(("Q8_K", 256, 292)), Some(("IQ2_XXS", 256, 66)), Some(("IQ2_XS", 256, 74)),
    Some(("IQ3_XXS", 256, 98)), Some(("IQ1_S", 256, 50)), Some(("IQ4_NL", 32, 18)),
    Some(("IQ3_S", 256, 110)), Some(("IQ2_S", 256, 82)), Some(("IQ4_XS", 256, 136)),
    Some(("I8", 1, 1)), Some(("I16", 1, 2)), Some(("I32", 1, 4)), Some(("I64", 1, 8)),
    Some(("F64", 1, 8)), Some(("IQ1_M", 256, 56)), Some(("BF16", 1, 2)), None, None, None,
    Some(("TQ1_0", 256, 54)), Some(("TQ2_0", 256, 66)), None, None, None,
    Some(("MXFP4", 32, 17)), Some(("NVFP4", 64, 36)), Some(("Q1_0", 128, 18)),
];

/// The name of a ggml type number, if ggml defines it.
pub fn ggml_type_name(ty: u32) -> Option<&'static str> {
    type_info(ty).map(|t| t.0)
}

/// (name, elements per block, bytes per block) of a ggml type number.
pub(super) fn type_info(ty: u32) -> Option<(&'static str, u64, u64)> {
    GGML_TYPES.get(usize::try_from(ty).ok()?).copied().flatten()
}

/// The ggml types [`dequantize`] reads, by number.
pub(super) const READ: [u32; 13] = [0, 1, 30, 8, 2, 3, 6, 7, 10, 11, 12, 13, 14];

/// The f32 values of a tensor's bytes of ggml type `ggml_type` (one of [`READ`]; its size and
/// block layout are checked before).
pub(super) fn dequantize(ggml_type: u32, bytes: &[u8]) -> Vec<f32> {
    match ggml_type {
        6 | 7 => q5(bytes, ggml_type == 7),
        10 => super_blocks(bytes, 84, q2_k),
        11 => super_blocks(bytes, 110, q3_k),
        12 => super_blocks(bytes, 144, q4_k),
        13 => super_blocks(bytes, 176, q5_k),
        14 => super_blocks(bytes, 210, q6_k),
        0 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        1 => bytes.chunks_exact(2).map(f16).collect(),
        30 => bytes
            .chunks_exact(2)
            .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
            .collect(),
        8 => dequant_blocks(bytes, 34, |b, out| {
            let d = f16(&b[0..2]);
            for (o, &q) in out.iter_mut().zip(&b[2..34]) {
                *o = f32::from(q as i8) * d;
            }
        }),
        // Q4_0 and Q4_1: byte j holds element j in its low nibble and element j+16 in its high one.
        2 => dequant_blocks(bytes, 18, |b, out| {
            let d = f16(&b[0..2]);
            for (j, &q) in b[2..18].iter().enumerate() {
                out[j] = f32::from((q & 0x0f) as i8 - 8) * d;
                out[j + 16] = f32::from((q >> 4) as i8 - 8) * d;
            }
        }),
        _ => dequant_blocks(bytes, 20, |b, out| {
            let (d, m) = (f16(&b[0..2]), f16(&b[2..4]));
            for (j, &q) in b[4..20].iter().enumerate() {
                out[j] = f32::from(q & 0x0f) * d + m;
                out[j + 16] = f32::from(q >> 4) * d + m;
            }
        }),
    }
}

/// The blocks of a `[rows, cols]` Q8_0 (8), Q4_0 (2) or Q4_1 (3) tensor, values unpacked one per
/// element as [`dequantize`] reads them; `None` for other types.
pub(super) fn blocks(ggml_type: u32, bytes: &[u8], shape: [usize; 2]) -> Option<QuantBlocks> {
    let (kind, block_bytes) = match ggml_type {
        8 => (BlockKind::Q8_0, 34),
        2 => (BlockKind::Q4_0, 18),
        3 => (BlockKind::Q4_1, 20),
        _ => return None,
    };
    let n = bytes.len() / block_bytes;
    let (mut q, mut d) = (Vec::with_capacity(n * 32), Vec::with_capacity(n));
    let mut m = (kind == BlockKind::Q4_1).then(|| Vec::with_capacity(n));
    for b in bytes.chunks_exact(block_bytes) {
        d.push(f16(&b[0..2]));
        let nibbles = match kind {
            BlockKind::Q8_0 => {
                q.extend(b[2..34].iter().map(|&x| x as i8));
                continue;
            }
            BlockKind::Q4_0 => &b[2..18],
            BlockKind::Q4_1 => {
                if let Some(m) = &mut m {
                    m.push(f16(&b[2..4]));
                }
                &b[4..20]
            }
        };
        // Q4_0 is stored offset by 8; Q4_1 as it is.
        let shift = if kind == BlockKind::Q4_0 { 8 } else { 0 };
        q.extend(nibbles.iter().map(|&x| (x & 0x0f) as i8 - shift));
        q.extend(nibbles.iter().map(|&x| (x >> 4) as i8 - shift));
    }
    Some(QuantBlocks { kind, shape, q, d, m })
}

pub(super) fn f16(b: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// Q5_0 (`d`, 32 high bits, nibbles; offset by 16) or Q5_1 (`d`, `m`, high bits, nibbles): the
/// fifth bit of element j is bit j of the high bits, of element j+16 bit j+16.
fn q5(bytes: &[u8], with_min: bool) -> Vec<f32> {
    let at = if with_min { 4 } else { 2 };
    dequant_blocks(bytes, at + 20, |b, out| {
        let d = f16(&b[0..2]);
        let high = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        // As ggml: Q5_0's `(x - 16) * d`, Q5_1's `x * d + m`.
        let value = |x: u8| if with_min { f32::from(x) * d + f16(&b[2..4]) } else { f32::from(x as i8 - 16) * d };
        for (j, &q) in b[at + 4..at + 20].iter().enumerate() {
            let (h0, h1) = (((high >> j) & 1) as u8, ((high >> (j + 16)) & 1) as u8);
            out[j] = value((q & 0x0f) | (h0 << 4));
            out[j + 16] = value((q >> 4) | (h1 << 4));
        }
    })
}

/// The k-quants' blocks: 256 values each, in 16 or 8 sub-blocks with their own scales.
const QK_K: usize = 256;

/// Runs `f` on each k-quant block of `block_bytes` bytes, producing 256 values per block.
fn super_blocks(bytes: &[u8], block_bytes: usize, f: fn(&[u8], &mut [f32; QK_K])) -> Vec<f32> {
    let mut data = Vec::with_capacity(bytes.len() / block_bytes * QK_K);
    let mut out = [0f32; QK_K];
    for b in bytes.chunks_exact(block_bytes) {
        f(b, &mut out);
        data.extend_from_slice(&out);
    }
    data
}

/// Q2_K: 16 scale/min bytes (4 bits each), 64 bytes of 2-bit values, `d`, `dmin`.
fn q2_k(b: &[u8], out: &mut [f32; QK_K]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, min) = (f16(&b[80..82]), f16(&b[82..84]));
    let mut y = 0;
    for (half, q) in qs.chunks_exact(32).enumerate() {
        for shift in 0..4 {
            for part in 0..2 {
                let sc = scales[half * 8 + shift * 2 + part];
                let (dl, ml) = (d * f32::from(sc & 0x0f), min * f32::from(sc >> 4));
                for &x in &q[part * 16..part * 16 + 16] {
                    out[y] = dl * f32::from((x >> (2 * shift)) & 3) - ml;
                    y += 1;
                }
            }
        }
    }
}

/// Q3_K: 32 bytes of high bits, 64 bytes of 2-bit values, 12 bytes of 6-bit scales, `d`.
fn q3_k(b: &[u8], out: &mut [f32; QK_K]) {
    let (hmask, qs, packed) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = f16(&b[108..110]);
    // Sixteen 6-bit scales: low 4 bits from the first 8 bytes, high 2 bits from the last 4.
    let scale = |i: usize| -> f32 {
        let low = if i < 8 { packed[i] & 0x0f } else { packed[i - 8] >> 4 };
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        f32::from((low | (high << 4)) as i8 - 32)
    };
    let mut y = 0;
    for (half, q) in qs.chunks_exact(32).enumerate() {
        for shift in 0..4 {
            let bit = 1u8 << (half * 4 + shift);
            for part in 0..2 {
                let dl = d * scale(half * 8 + shift * 2 + part);
                for l in part * 16..part * 16 + 16 {
                    let low = ((q[l] >> (2 * shift)) & 3) as i8;
                    let v = if hmask[l] & bit != 0 { low } else { low - 4 };
                    out[y] = dl * f32::from(v);
                    y += 1;
                }
            }
        }
    }
}

/// The j-th 6-bit scale and min of Q4_K / Q5_K's 12 packed bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    let (d, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    };
    (f32::from(d), f32::from(m))
}

/// Q4_K: `d`, `dmin`, 12 bytes of scales and mins, 128 bytes of nibbles (64 values a pair of sub-blocks).
fn q4_k(b: &[u8], out: &mut [f32; QK_K]) {
    q45_k(b, None, &b[16..144], out);
}

/// Q5_K: Q4_K's layout with 32 bytes of fifth bits before the nibbles.
fn q5_k(b: &[u8], out: &mut [f32; QK_K]) {
    q45_k(b, Some(&b[16..48]), &b[48..176], out);
}

fn q45_k(b: &[u8], qh: Option<&[u8]>, qs: &[u8], out: &mut [f32; QK_K]) {
    let (d, min, scales) = (f16(&b[0..2]), f16(&b[2..4]), &b[4..16]);
    for (pair, q) in qs.chunks_exact(32).enumerate() {
        for (nibble, shift) in [(0, 0), (1, 4)] {
            let (sc, m) = scale_min_k4(2 * pair + nibble, scales);
            let (dl, ml) = (d * sc, min * m);
            let bit = 1u8 << (2 * pair + nibble);
            for (l, &x) in q.iter().enumerate() {
                let high = qh.map_or(0, |h| if h[l] & bit != 0 { 16 } else { 0 });
                out[64 * pair + 32 * nibble + l] = dl * f32::from(((x >> shift) & 0x0f) + high) - ml;
            }
        }
    }
}

/// Q6_K: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 signed scales, `d`.
fn q6_k(b: &[u8], out: &mut [f32; QK_K]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16(&b[208..210]);
    for half in 0..2 {
        let (ql, qh, sc, y) = (&ql[64 * half..], &qh[32 * half..], &scales[8 * half..], 128 * half);
        for l in 0..32 {
            let is = l / 16;
            let q = [
                (ql[l] & 0x0f) | ((qh[l] & 3) << 4),
                (ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            ];
            for (k, q) in q.into_iter().enumerate() {
                out[y + l + 32 * k] = d * f32::from(sc[is + 2 * k] as i8) * f32::from(q as i8 - 32);
            }
        }
    }
}

/// Runs `f` on each block of `block_bytes` bytes, producing 32 values per block.
fn dequant_blocks(bytes: &[u8], block_bytes: usize, f: impl Fn(&[u8], &mut [f32; 32])) -> Vec<f32> {
    let mut data = Vec::with_capacity(bytes.len() / block_bytes * 32);
    let mut out = [0f32; 32];
    for b in bytes.chunks_exact(block_bytes) {
        f(b, &mut out);
        data.extend_from_slice(&out);
    }
    data
}

