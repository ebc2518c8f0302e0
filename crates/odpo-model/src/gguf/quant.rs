//! ggml's tensor types: the table of block sizes, and dequantisation of F32, F16, BF16, Q8_0, Q4_0
//! and Q4_1 blocks to f32, following ggml's `dequantize_row_*` (checked against gguf-py's
//! `gguf.quants.dequantize`).

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

/// The f32 values of a tensor's bytes of ggml type `ggml_type` (one the reader accepted: its size
/// and block layout are checked before).
pub(super) fn dequantize(ggml_type: u32, bytes: &[u8]) -> Vec<f32> {
    match ggml_type {
        0 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        1 => bytes.chunks_exact(2).map(f16).collect(),
        30 => bytes
            .chunks_exact(2)
            .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
            .collect(),
        8 => dequant_blocks(&bytes, 34, |b, out| {
            let d = f16(&b[0..2]);
            for (o, &q) in out.iter_mut().zip(&b[2..34]) {
                *o = f32::from(q as i8) * d;
            }
        }),
        // Q4_0 and Q4_1: byte j holds element j in its low nibble and element j+16 in its high one.
        2 => dequant_blocks(&bytes, 18, |b, out| {
            let d = f16(&b[0..2]);
            for (j, &q) in b[2..18].iter().enumerate() {
                out[j] = f32::from((q & 0x0f) as i8 - 8) * d;
                out[j + 16] = f32::from((q >> 4) as i8 - 8) * d;
            }
        }),
        _ => dequant_blocks(&bytes, 20, |b, out| {
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

