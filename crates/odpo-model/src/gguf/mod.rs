//! llama.cpp's GGUF files (versions 2 and 3, little-endian). This file reads them: header, metadata,
//! tensor infos, each tensor's bytes; [`quant`] turns ggml's tensor types into f32 (F32, F16, BF16,
//! Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K to Q6_K); [`load_as_hf`] turns a file of the Llama family (`llama`, `qwen2`, `qwen3`, `olmo2`, `smollm3`, `granite`, `phi3`:
//! `llama.rs`), the Gemma family (`gemma`, `gemma2`, `gemma3`: `gemma.rs`), Phi (`phi2`: `phi.rs`) or StableLM (`stablelm`: `stablelm.rs`) into an HF
//! `config.json` value and weights under HF names and layouts; [`load_tokenizer`] turns its
//! vocabulary into the HF `tokenizer.json` it stands for (`vocab.rs`); [`save_gguf`] writes a
//! model of those families with its tokenizer as a GGUF file (`write.rs`).
//!
//! Format: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>. Block layouts follow
//! ggml's `dequantize_row_*` (checked against gguf-py's `gguf.quants.dequantize`).
//!
//! The file is read with ordinary reads (no memory map: the workspace denies `unsafe`); the
//! header is parsed once by [`GgufFile::open`], and each tensor's bytes are read on demand.
//! Every length and offset is checked against the file length before anything is allocated,
//! so corrupt files give a [`GgufError`], never a panic or a huge allocation.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

mod gemma;
mod llama;
mod phi;
pub mod quant;
mod stablelm;
mod vocab;
mod write;

pub use quant::ggml_type_name;
pub use vocab::{GgufTokenizer, SPLITS};
pub use write::{GgufDtype, save_gguf};
use quant::type_info;

pub use crate::error::GgufError;
use crate::quantized::QuantBlocks;

/// A GGUF model as the HF loader takes it: a `config.json` value, the weights under HF names and
/// layouts, and the projections kept in ggml's blocks (empty unless asked for).
pub type HfModel = (serde_json::Value, BTreeMap<String, HostTensor>, BTreeMap<String, QuantBlocks>);

/// The weights of an [`HfModel`]: dequantised, and kept in blocks.
type HfTensors = (BTreeMap<String, HostTensor>, BTreeMap<String, QuantBlocks>);

/// A GGUF file of the Llama family (`llama`, `qwen2`, `qwen3`, `olmo2`, `smollm3`, `granite`, `phi3`), the Gemma family (`gemma`,
/// `gemma2`, `gemma3`), Phi (`phi2`) or StableLM (`stablelm`), by its `general.architecture`, as an HF config and weights.
pub fn load_as_hf(path: &Path) -> Result<(serde_json::Value, BTreeMap<String, HostTensor>), GgufError> {
    load_blocks_as_hf(path, false).map(|(config, weights, _)| (config, weights))
}

/// [`load_as_hf`], with the attention and MLP projections stored in Q8_0, Q4_0 or Q4_1 kept in
/// their blocks (third map) when `keep_blocks`, instead of dequantised.
pub fn load_blocks_as_hf(path: &Path, keep_blocks: bool) -> Result<HfModel, GgufError> {
    let f = GgufFile::open(path)?;
    f.check_host_memory(keep_blocks, crate::out_of_memory::host_free_bytes())?;
    let arch = f.architecture()?;
    if llama::ARCHITECTURES.iter().any(|(a, _)| *a == arch) {
        llama::read(&f, &arch, keep_blocks)
    } else if gemma::ARCHITECTURES.iter().any(|(a, ..)| *a == arch) {
        gemma::read(&f, &arch, keep_blocks)
    } else if arch == phi::ARCH {
        phi::read(&f, keep_blocks)
    } else if arch == stablelm::ARCH {
        stablelm::read(&f, keep_blocks)
    } else {
        Err(GgufError::Architecture { path: path.into(), arch })
    }
}

/// The tokenizer a GGUF file describes, as the HF `tokenizer.json` it stands for (byte-level and
/// SentencePiece BPE vocabularies; see `vocab.rs`).
pub fn load_tokenizer(path: &Path) -> Result<GgufTokenizer, GgufError> {
    vocab::tokenizer(&GgufFile::open(path)?)
}

/// The HF name of a llama.cpp tensor (`weight` or `bias`) by a family's tables of the tensors
/// outside the layers (`top`: llama.cpp's name and HF's) and in each layer (`parts`), or `None`
/// if it has none.
fn hf_name_by(top: &[(&str, &str)], parts: &[(&str, &str)], gguf: &str) -> Option<String> {
    let (base, suffix) = gguf.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    if let Some((_, top)) = top.iter().find(|(g, _)| *g == base) {
        return Some(format!("{top}.{suffix}"));
    }
    let (layer, part) = base.strip_prefix("blk.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let part = parts.iter().find(|(g, _)| *g == part)?.1;
    Some(format!("model.layers.{layer}.{part}.{suffix}"))
}

/// The llama.cpp name of an HF tensor by the same tables: the inverse of [`hf_name_by`].
fn gguf_name_by(top: &[(&str, &str)], parts: &[(&str, &str)], hf: &str) -> Option<String> {
    let (base, suffix) = hf.rsplit_once('.')?;
    let name = if let Some((g, _)) = top.iter().find(|(_, h)| *h == base) {
        format!("{g}.{suffix}")
    } else {
        let (layer, part) = base.strip_prefix("model.layers.")?.split_once('.')?;
        format!("blk.{layer}.{}.{suffix}", parts.iter().find(|(_, h)| *h == part)?.0)
    };
    (hf_name_by(top, parts, &name).as_deref() == Some(hf)).then_some(name)
}

/// The vocabulary size: the rows of the token embedding.
fn vocab(path: &Path, weights: &BTreeMap<String, HostTensor>) -> Result<usize, GgufError> {
    match weights.get("model.embed_tokens.weight") {
        Some(t) if t.shape.len() == 2 => Ok(t.shape[0]),
        _ => Err(tensor_err(path, "token_embd.weight", "missing, or not 2-D")),
    }
}

/// A tensor on the host, row-major, in HF (PyTorch) layout and naming.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first (PyTorch order).
    pub shape: Vec<usize>,
    /// Row-major elements; `data.len()` is the product of `shape`.
    pub data: Vec<f32>,
}


/// A metadata value, one variant per GGUF value type (numbered 0..=12 in this order).
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)] // the variant names are the GGUF type names
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            Self::U8(v) => v.into(),
            Self::I8(v) => v.into(),
            Self::U16(v) => v.into(),
            Self::I16(v) => v.into(),
            Self::U32(v) => v.into(),
            Self::I32(v) => v.into(),
            Self::U64(v) => v.into(),
            Self::I64(v) => v.into(),
            _ => return None,
        })
    }
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        u64::try_from(self.as_i128()?).ok()
    }
    /// The value as a float, if it is a float or an integer (large 64-bit integers round).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => self.as_i128().map(|v| v as f64),
        }
    }
    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// The GGUF tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// ggml dimensions `ne`, innermost (contiguous) first: the reverse of the row-major shape.
    pub dims: Vec<u64>,
    /// The ggml type number (0 = F32, 1 = F16, 2 = Q4_0, ...).
    pub ggml_type: u32,
    /// Byte offset from the start of the data section.
    pub offset: u64,
    /// Byte length of the data.
    pub n_bytes: u64,
}

/// A parsed GGUF file: metadata and tensor infos; tensor data is read on demand.
#[derive(Debug, Clone)]
pub struct GgufFile {
    path: PathBuf,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    index: BTreeMap<String, usize>,
    data_start: u64,
}

/// ggml types: (name, elements per block, bytes per block), indexed by type number; gaps are
/// numbers ggml retired. From ggml.h / gguf-py `GGML_QUANT_SIZES`.
#[rustfmt::skip]
/// Nesting limit for metadata arrays, so a crafted file cannot exhaust the stack.
const MAX_ARRAY_DEPTH: u32 = 8;

/// Header reader that checks every read against the file length before allocating.
struct Reader<'a> {
    inner: BufReader<File>,
    pos: u64,
    len: u64,
    path: &'a Path,
}

impl Reader<'_> {
    fn need(&self, n: u64) -> Result<(), GgufError> {
        let end = self.pos.saturating_add(n);
        if end > self.len {
            return Err(truncated(
                self.path,
                "header".into(),
                self.pos,
                end,
                self.len,
            ));
        }
        Ok(())
    }
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), GgufError> {
        self.need(buf.len() as u64)?;
        self.inner
            .read_exact(buf)
            .map_err(|e| io_err(self.path, e))?;
        self.pos += buf.len() as u64;
        Ok(())
    }
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.fill(&mut b)?;
        Ok(b)
    }
    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn string(&mut self) -> Result<String, GgufError> {
        let n = self.u64()?;
        self.need(n)?;
        let mut v = vec![0u8; usize::try_from(n).map_err(|_| self.malformed("string too long"))?];
        self.fill(&mut v)?;
        // Lossy: a token string with bad UTF-8 should not make the whole file unreadable.
        Ok(String::from_utf8(v)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    }
    fn malformed(&self, msg: impl Into<String>) -> GgufError {
        GgufError::Malformed {
            path: self.path.into(),
            msg: msg.into(),
        }
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<GgufValue, GgufError> {
        use GgufValue as V;
        Ok(match ty {
            0 => V::U8(u8::from_le_bytes(self.bytes()?)),
            1 => V::I8(i8::from_le_bytes(self.bytes()?)),
            2 => V::U16(u16::from_le_bytes(self.bytes()?)),
            3 => V::I16(i16::from_le_bytes(self.bytes()?)),
            4 => V::U32(u32::from_le_bytes(self.bytes()?)),
            5 => V::I32(i32::from_le_bytes(self.bytes()?)),
            6 => V::F32(f32::from_le_bytes(self.bytes()?)),
            7 => V::Bool(self.bytes::<1>()?[0] != 0),
            8 => V::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.malformed(format!(
                        "metadata arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    )));
                }
                let ety = self.u32()?;
                let n = self.u64()?;
                // Smallest encoding of one element, to bound `n` by the bytes left in the file.
                let min = match ety {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    _ => return Err(self.malformed(format!("unknown metadata value type {ety}"))),
                };
                self.need(n.saturating_mul(min))?;
                let mut items = Vec::with_capacity(n.min(1 << 16) as usize);
                for _ in 0..n {
                    items.push(self.value(ety, depth + 1)?);
                }
                V::Array(items)
            }
            10 => V::U64(u64::from_le_bytes(self.bytes()?)),
            11 => V::I64(i64::from_le_bytes(self.bytes()?)),
            12 => V::F64(f64::from_le_bytes(self.bytes()?)),
            _ => return Err(self.malformed(format!("unknown metadata value type {ty}"))),
        })
    }
}

fn io_err(path: &Path, source: std::io::Error) -> GgufError {
    GgufError::Io {
        path: path.into(),
        source,
    }
}

fn truncated(path: &Path, what: String, start: u64, end: u64, len: u64) -> GgufError {
    GgufError::Truncated {
        path: path.into(),
        what,
        start,
        end,
        len,
    }
}

fn meta_err(path: &Path, key: &str, msg: impl Into<String>) -> GgufError {
    GgufError::Metadata {
        path: path.into(),
        key: key.into(),
        msg: msg.into(),
    }
}

impl GgufFile {
    /// The parameters of every tensor, and a lower bound on the bytes they take once read: each
    /// dequantised to f32, or, with `keep_blocks`, a quantised matrix in its blocks as stored.
    pub fn host_bytes(&self, keep_blocks: bool) -> (u64, u64) {
        let (mut params, mut bytes) = (0u64, 0u64);
        for t in &self.tensors {
            let n = t.dims.iter().fold(1u64, |a, &d| a.saturating_mul(d));
            let blocks = keep_blocks && t.dims.len() == 2 && !matches!(t.ggml_type, 0 | 1 | 30);
            params = params.saturating_add(n);
            bytes = bytes.saturating_add(if blocks { t.n_bytes } else { n.saturating_mul(4) });
        }
        (params, bytes)
    }

    /// Refuses a file whose tensors need more host memory than `free`: every tensor is dequantised
    /// (a kept projection stays in its blocks) and held at once before the model is built, so a
    /// 4-bit file of 8 billion parameters takes 32 GB.
    fn check_host_memory(&self, keep_blocks: bool, free: Option<u64>) -> Result<(), GgufError> {
        let (params, bytes) = self.host_bytes(keep_blocks);
        let form = if keep_blocks { "with the projections in their blocks" } else { "as f32" };
        let place = "where every tensor is read before the model is built";
        match crate::out_of_memory::weights_beyond_free(params, bytes, form, place, free) {
            Some(message) => Err(GgufError::TooLarge { path: self.path.clone(), message }),
            None => Ok(()),
        }
    }

    /// Parses the header, metadata and tensor infos of `path`, and checks that every tensor's
    /// type is known and its bytes lie inside the file.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let file = File::open(path).map_err(|e| io_err(path, e))?;
        let len = file.metadata().map_err(|e| io_err(path, e))?.len();
        let inner = BufReader::new(file);
        let mut r = Reader {
            inner,
            pos: 0,
            len,
            path,
        };
        let pb = || path.to_path_buf();

        let mut magic = vec![0u8; len.min(4) as usize];
        r.fill(&mut magic)?;
        if magic != b"GGUF" {
            return Err(GgufError::BadMagic { path: pb(), magic });
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion {
                path: pb(),
                version,
            });
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;

        let mut metadata = BTreeMap::new();
        r.need(n_kv.saturating_mul(12))?; // key length + value type, at least
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(ty, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(r.malformed(format!("duplicate metadata key `{key}`")));
            }
        }

        let mut tensors = Vec::new();
        let mut index = BTreeMap::new();
        r.need(n_tensors.saturating_mul(24))?; // name length + n_dims + type + offset, at least
        for i in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims > 4 {
                return Err(tensor_err(
                    path,
                    &name,
                    format!("{n_dims} dims (at most 4)"),
                ));
            }
            let dims = (0..n_dims)
                .map(|_| r.u64())
                .collect::<Result<Vec<_>, _>>()?;
            let ggml_type = r.u32()?;
            let offset = r.u64()?;
            if index.insert(name.clone(), i as usize).is_some() {
                return Err(r.malformed(format!("duplicate tensor name `{name}`")));
            }
            let n_bytes = 0; // set below, once the data section's start is known
            tensors.push(GgufTensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                n_bytes,
            });
        }

        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(GgufValue::U32(a)) if a.is_power_of_two() => u64::from(*a),
            Some(v) => {
                let msg = format!("must be a power of two as u32, found {v:?}");
                return Err(meta_err(path, "general.alignment", msg));
            }
        };
        let data_start = r.pos.div_ceil(alignment) * alignment;

        for t in &mut tensors {
            t.n_bytes = checked_size(path, t, alignment)?;
            let start = data_start.saturating_add(t.offset);
            let end = start.saturating_add(t.n_bytes);
            if end > len {
                return Err(truncated(
                    path,
                    format!("tensor `{}`", t.name),
                    start,
                    end,
                    len,
                ));
            }
        }
        let path = pb();
        Ok(Self {
            path,
            version,
            metadata,
            tensors,
            index,
            data_start,
        })
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// All metadata key-values.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// Tensor names in file order.
    pub fn tensor_names(&self) -> Vec<String> {
        self.tensors.iter().map(|t| t.name.clone()).collect()
    }

    /// Byte offset of the (aligned) tensor data section; tensor offsets count from here.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// Tensor infos in file order.
    pub fn tensor_infos(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// Reads tensor `name` and dequantises it to f32, shape in row-major order (GGUF dims
    /// reversed). No layout change beyond that: see [`load_as_hf`] for HF layouts.
    pub fn dequantize(&self, name: &str) -> Result<HostTensor, GgufError> {
        let (t, bytes) = self.raw(name)?;
        let data = quant::dequantize(t.ggml_type, &bytes);
        let shape = t.dims.iter().rev().map(|&d| d as usize).collect();
        Ok(HostTensor { shape, data })
    }

    /// Reads a 2-D Q8_0, Q4_0 or Q4_1 tensor as its blocks (`None` for any other type or rank); a
    /// 3-D one (a mixture of experts' stacked matrices) as the rows of all its matrices in turn.
    pub fn blocks(&self, name: &str) -> Result<Option<crate::quantized::QuantBlocks>, GgufError> {
        let (t, bytes) = self.raw(name)?;
        let (rows, cols) = match *t.dims.as_slice() {
            [cols, rows] => (rows, cols),
            [cols, rows, n] => (rows.saturating_mul(n), cols),
            _ => return Ok(None),
        };
        Ok(quant::blocks(t.ggml_type, &bytes, [rows as usize, cols as usize]))
    }

    /// The info and bytes of tensor `name`, of a type this reader supports.
    fn raw(&self, name: &str) -> Result<(&GgufTensorInfo, Vec<u8>), GgufError> {
        let path = self.path.as_path();
        let t = self
            .index
            .get(name)
            .and_then(|&i| self.tensors.get(i))
            .ok_or_else(|| tensor_err(path, name, "no such tensor"))?;
        if !quant::READ.contains(&t.ggml_type) {
            let (ty, ty_name) = (t.ggml_type, ggml_type_name(t.ggml_type).unwrap_or("?"));
            let read: Vec<&str> = quant::READ.iter().filter_map(|&t| ggml_type_name(t)).collect();
            let msg = format!("quantisation type {ty_name} ({ty}) is not supported (supported: {})", read.join(", "));
            return Err(tensor_err(path, name, msg));
        }
        let too_big = || tensor_err(path, name, "too large for this platform");
        let mut bytes = vec![0u8; usize::try_from(t.n_bytes).map_err(|_| too_big())?];
        let mut f = File::open(path).map_err(|e| io_err(path, e))?;
        f.seek(SeekFrom::Start(self.data_start + t.offset))
            .map_err(|e| io_err(path, e))?;
        // Only fails if the file shrank since `open` checked its length.
        f.read_exact(&mut bytes).map_err(|e| io_err(path, e))?;
        Ok((t, bytes))
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `general.architecture`.
    fn architecture(&self) -> Result<String, GgufError> {
        let key = "general.architecture";
        let arch = self.meta(key, "a string", |v| v.as_str().map(str::to_string))?;
        self.required(key, arch)
    }

    /// A required unsigned integer that must not be zero.
    fn positive(&self, key: &str) -> Result<u64, GgufError> {
        match self.required(key, self.meta(key, "an unsigned integer", GgufValue::as_u64)?)? {
            0 => Err(meta_err(&self.path, key, "must be positive")),
            v => Ok(v),
        }
    }

    /// Every tensor under its HF name (`hf_name` gives it, or the error for a tensor that has
    /// none), dequantised and passed through `fix`; with `keep_blocks`, the projections
    /// (`*_proj.weight`) stored in Q8_0, Q4_0 or Q4_1 are kept in their blocks and passed through
    /// `fix_blocks` instead. The closures take the GGUF name, the HF name and the tensor.
    fn read_tensors(
        &self,
        keep_blocks: bool,
        hf_name: impl Fn(&str) -> Result<String, GgufError>,
        mut fix_blocks: impl FnMut(&str, &str, &mut QuantBlocks) -> Result<(), GgufError>,
        mut fix: impl FnMut(&str, &str, &mut HostTensor) -> Result<(), GgufError>,
    ) -> Result<HfTensors, GgufError> {
        let (mut weights, mut blocks) = (BTreeMap::new(), BTreeMap::new());
        for info in &self.tensors {
            let name = info.name.as_str();
            let hf = hf_name(name)?;
            // The attention's and the MLP's projections (Phi's `dense`, `fc1` and `fc2` among them).
            let projection = ["_proj.weight", ".dense.weight", ".fc1.weight", ".fc2.weight"].iter().any(|s| hf.ends_with(s));
            if keep_blocks && projection && let Some(mut b) = self.blocks(name)? {
                fix_blocks(name, &hf, &mut b)?;
                blocks.insert(hf, b);
                continue;
            }
            let mut t = self.dequantize(name)?;
            fix(name, &hf, &mut t)?;
            weights.insert(hf, t);
        }
        Ok((weights, blocks))
    }

    /// The shape of a file of a LayerNorm family (`phi2`, `stablelm`): the embedding length, the
    /// query and key-value heads, and the head size (`embedding_length / head_count`, which must
    /// divide).
    fn layer_norm_shape(&self, arch: &str) -> Result<[u64; 4], GgufError> {
        let key = |k: &str| format!("{arch}.{k}");
        let hidden = self.positive(&key("embedding_length"))?;
        let heads = self.positive(&key("attention.head_count"))?;
        let kv_heads = self.meta(&key("attention.head_count_kv"), "an unsigned integer", GgufValue::as_u64)?.unwrap_or(heads);
        if !hidden.is_multiple_of(heads) {
            return Err(meta_err(&self.path, &key("attention.head_count"), format!("{heads} heads do not divide the embedding length ({hidden})")));
        }
        Ok([hidden, heads, kv_heads, hidden / heads])
    }

    /// The `config.json` keys a LayerNorm family's file (`phi2`, `stablelm`) gives alike, of a model
    /// of [`Self::layer_norm_shape`]'s `shape` whose HF architecture is `hf_arch`: the sizes, the
    /// LayerNorm's epsilon, the positions, whether the head is tied (no `output`), the special
    /// tokens, and in `rope_parameters` the rotated part of each head (`rope.dimension_count`),
    /// the base (10,000 where the file has none, as in llama.cpp) and the file's scaling.
    fn layer_norm_config(&self, arch: &str, hf_arch: &str, model_type: &str, shape: [u64; 4], weights: &BTreeMap<String, HostTensor>) -> Result<serde_json::Value, GgufError> {
        let key = |k: &str| format!("{arch}.{k}");
        let uint = |k: &str| self.meta(&key(k), "an unsigned integer", GgufValue::as_u64);
        let [hidden, heads, kv_heads, head_dim] = shape;
        let eps_key = key("attention.layer_norm_epsilon");
        let rotated = uint("rope.dimension_count")?.unwrap_or(head_dim);
        let mut config = serde_json::json!({
            "architectures": [hf_arch],
            "model_type": model_type,
            "hidden_size": hidden,
            "intermediate_size": self.required(&key("feed_forward_length"), uint("feed_forward_length")?)?,
            "num_hidden_layers": self.positive(&key("block_count"))?,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "layer_norm_eps": self.required(&eps_key, self.meta(&eps_key, "a number", GgufValue::as_f64)?)?,
            "max_position_embeddings": self.required(&key("context_length"), uint("context_length")?)?,
            "vocab_size": vocab(&self.path, weights)?,
            "tie_word_embeddings": !weights.contains_key("lm_head.weight"),
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.meta(&key("rope.freq_base"), "a number", GgufValue::as_f64)?.unwrap_or(10_000.0),
                "partial_rotary_factor": rotated as f64 / head_dim as f64,
            },
        });
        if let Some(scaling) = self.rope_scaling(arch)? {
            for (k, v) in scaling.as_object().into_iter().flatten() {
                config["rope_parameters"][k] = v.clone();
            }
        }
        self.add_token_ids(&mut config)?;
        Ok(config)
    }

    /// The special tokens' ids, where the file gives them, as `config.json` keys.
    fn add_token_ids(&self, config: &mut serde_json::Value) -> Result<(), GgufError> {
        for (key, hf_key) in [
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
            ("tokenizer.ggml.padding_token_id", "pad_token_id"),
        ] {
            if let Some(id) = self.meta(key, "an unsigned integer", GgufValue::as_u64)? {
                config[hf_key] = id.into();
            }
        }
        Ok(())
    }

    /// `{arch}.rope.scaling.*` as an HF `rope_scaling` value, or `None` where the file has none.
    fn rope_scaling(&self, arch: &str) -> Result<Option<serde_json::Value>, GgufError> {
        let key = |k: &str| format!("{arch}.rope.scaling.{k}");
        let kind = self.meta(&key("type"), "a string", |v| v.as_str().map(str::to_string))?;
        let Some(kind) = kind.filter(|k| k != "none") else { return Ok(None) };
        let mut s = serde_json::json!({ "rope_type": kind });
        if let Some(factor) = self.meta(&key("factor"), "a number", GgufValue::as_f64)? {
            s["factor"] = factor.into();
        }
        if let Some(orig) = self.meta(&key("original_context_length"), "an unsigned integer", GgufValue::as_u64)? {
            s["original_max_position_embeddings"] = orig.into();
        }
        if kind == "yarn" {
            // The options llama.cpp's converter copies from the checkpoint, under transformers' names.
            for (k, hf) in [("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"), ("yarn_attn_factor", "attention_factor")] {
                if let Some(v) = self.meta(&key(k), "a number", GgufValue::as_f64)? {
                    s[hf] = v.into();
                }
            }
            // What transformers' YaRN has no counterpart for.
            for (k, neutral) in [("yarn_ext_factor", 1.0), ("yarn_log_multiplier", 0.0)] {
                if let Some(v) = self.meta(&key(k), "a number", GgufValue::as_f64)?.filter(|v| *v != neutral) {
                    return Err(meta_err(self.path(), &key(k), format!("{v}: YaRN with this option is not implemented (transformers' YaRN has none)")));
                }
            }
        }
        Ok(Some(s))
    }

    fn meta<T>(
        &self,
        key: &str,
        kind: &str,
        get: impl Fn(&GgufValue) -> Option<T>,
    ) -> Result<Option<T>, GgufError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => {
                // Bounded: a mistyped key could hold a whole vocabulary.
                let err = || {
                    let found: String = format!("{v:?}").chars().take(80).collect();
                    meta_err(&self.path, key, format!("expected {kind}, found {found}"))
                };
                get(v).map(Some).ok_or_else(err)
            }
        }
    }

    fn required<T>(&self, key: &str, v: Option<T>) -> Result<T, GgufError> {
        v.ok_or_else(|| meta_err(&self.path, key, "missing"))
    }
}

/// The byte size of tensor `t`, after checking its type, shape and alignment.
fn checked_size(path: &Path, t: &GgufTensorInfo, alignment: u64) -> Result<u64, GgufError> {
    let bad = |msg: String| Err(tensor_err(path, &t.name, msg));
    let Some((_, block, size)) = type_info(t.ggml_type) else {
        return Err(tensor_err(
            path,
            &t.name,
            format!("unknown quantisation type {}", t.ggml_type),
        ));
    };
    if t.dims.first().is_some_and(|d0| d0 % block != 0) {
        return bad(format!(
            "row length {} is not a multiple of the block size {block}",
            t.dims[0]
        ));
    }
    if !t.offset.is_multiple_of(alignment) {
        return bad(format!(
            "data offset {} is not {alignment}-byte aligned",
            t.offset
        ));
    }
    let n_el = t.dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
    match n_el.and_then(|n| (n / block).checked_mul(size)) {
        Some(n_bytes) => Ok(n_bytes),
        None => bad(format!("size overflows: dims {:?}", t.dims)),
    }
}

fn tensor_err(path: &Path, tensor: &str, msg: impl Into<String>) -> GgufError {
    GgufError::Tensor {
        path: path.into(),
        tensor: tensor.into(),
        msg: msg.into(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use super::llama::{hf_name, unpermute_rows};

    #[test]
    fn hf_names() {
        for (gguf, hf) in [
            ("token_embd.weight", Some("model.embed_tokens.weight")),
            ("output.weight", Some("lm_head.weight")),
            (
                "blk.12.attn_k.bias",
                Some("model.layers.12.self_attn.k_proj.bias"),
            ),
            (
                "blk.0.ffn_down.weight",
                Some("model.layers.0.mlp.down_proj.weight"),
            ),
            ("rope_freqs.weight", None),
            ("blk.x.attn_q.weight", None),
            ("blk.0.attn_q.scale", None),
        ] {
            assert_eq!(hf_name("llama", gguf).as_deref(), hf, "{gguf}");
        }
        // OLMo 2's norms come after the attention and the MLP; the others' before them.
        for (arch, gguf, hf) in [
            ("olmo2", "blk.1.post_attention_norm.weight", Some("model.layers.1.post_attention_layernorm.weight")),
            ("olmo2", "blk.1.post_ffw_norm.weight", Some("model.layers.1.post_feedforward_layernorm.weight")),
            ("olmo2", "blk.1.ffn_norm.weight", None),
            ("olmo2", "blk.1.attn_norm.weight", None),
            ("llama", "blk.1.ffn_norm.weight", Some("model.layers.1.post_attention_layernorm.weight")),
            ("smollm3", "blk.1.post_ffw_norm.weight", None),
            ("granite", "blk.1.post_attention_norm.weight", None),
            // Phi-3's fused projections in place of the separate ones, and only in Phi-3.
            ("phi3", "blk.1.attn_qkv.weight", Some("model.layers.1.self_attn.qkv_proj.weight")),
            ("phi3", "blk.1.ffn_up.weight", Some("model.layers.1.mlp.gate_up_proj.weight")),
            ("phi3", "blk.1.attn_q.weight", None),
            ("phi3", "blk.1.ffn_gate.weight", None),
            ("llama", "blk.1.attn_qkv.weight", None),
            ("llama", "blk.1.ffn_up.weight", Some("model.layers.1.mlp.up_proj.weight")),
        ] {
            assert_eq!(hf_name(arch, gguf).as_deref(), hf, "{arch} {gguf}");
            if let Some(hf) = hf {
                assert_eq!(super::llama::gguf_name(arch, hf).as_deref(), Some(gguf), "{arch} {hf}");
            }
        }
        // LongRoPE's factors are read from Phi-3's files (into its config) and from no other.
        assert_eq!(hf_name("phi3", "rope_factors_long.weight").as_deref(), Some("rope_factors_long.weight"));
        assert_eq!(hf_name("llama", "rope_factors_long.weight"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // convert_hf_to_gguf's permute on 2 heads of 4 rows: HF rows [0 1 2 3 | 4 5 6 7]
        // are stored as [0 2 1 3 | 4 6 5 7]; one column, so values are row numbers.
        let mut t = HostTensor {
            shape: vec![8, 1],
            data: vec![0., 2., 1., 3., 4., 6., 5., 7.],
        };
        unpermute_rows(Path::new("x"), "q", &mut t, 2).unwrap();
        assert_eq!(t.data, vec![0., 1., 2., 3., 4., 5., 6., 7.]);
        let mut bad = HostTensor {
            shape: vec![6, 1],
            data: vec![0.; 6],
        };
        assert!(unpermute_rows(Path::new("x"), "q", &mut bad, 2).is_err());
    }

    #[test]
    fn type_table() {
        assert_eq!(ggml_type_name(30), Some("BF16"));
        assert_eq!(ggml_type_name(4), None);
        assert_eq!(ggml_type_name(99), None);
        assert_eq!(type_info(8), Some(("Q8_0", 32, 34)));
    }
}
