//! Checkpoint tensors on the host: reading HF safetensors (single file or sharded), handing tensors
//! to the model builders by HF name with shape checks, and writing HF safetensors back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::nn::LayerNorm;
use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::error::{ModelError, Result};
use crate::quantized::QuantBlocks;

pub use crate::gguf::HostTensor;

/// The tensors of a checkpoint under their HF names, and the file they came from (for errors).
#[derive(Debug)]
pub struct Weights {
    path: PathBuf,
    tensors: BTreeMap<String, HostTensor>,
    /// When set, tensors are made up on request instead of read: a fresh random model.
    random: Option<RandomInit>,
    /// Projections kept in ggml's blocks as the file stores them (a GGUF read for a quantised base).
    quantized: BTreeMap<String, QuantBlocks>,
    /// Whether the model's projections are to be loaded block-quantised (a LoRA base).
    quantize_projections: bool,
}

/// How a fresh model's weights are drawn: N(0, std) for matrices and embeddings (GPT-2's and
/// Llama's initialisation), ones for norm scales (zeros where the norm scales by 1 + weight, as
/// Gemma's do), zeros for biases.
#[derive(Debug)]
struct RandomInit {
    rng: rand::rngs::StdRng,
    std: f32,
    norm_scale: f32,
}

impl Weights {
    /// Wraps tensors already on the host (the GGUF loader produces these).
    pub fn new(path: impl Into<PathBuf>, tensors: BTreeMap<String, HostTensor>) -> Self {
        Self { path: path.into(), tensors, ..Self::new_empty() }
    }

    fn new_empty() -> Self {
        Self { path: PathBuf::new(), tensors: BTreeMap::new(), random: None, quantized: BTreeMap::new(), quantize_projections: false }
    }

    /// Adds projections held in ggml's blocks (a GGUF file's Q8_0, Q4_0 and Q4_1 tensors).
    pub fn with_blocks(mut self, quantized: BTreeMap<String, QuantBlocks>) -> Self {
        self.quantized.extend(quantized);
        self
    }

    /// Loads every projection (each `nn.Linear` and `Conv1D` weight) block-quantised: as the file
    /// stores it when it is in blocks, otherwise quantised to Q8_0 here (a frozen LoRA base).
    pub fn quantizing_projections(mut self) -> Self {
        self.quantize_projections = true;
        self
    }

    /// Whether the weights are drawn at random on request (a fresh model) rather than read.
    pub fn draws_random(&self) -> bool {
        self.random.is_some()
    }

    /// Whether projections load block-quantised.
    pub fn quantizes_projections(&self) -> bool {
        self.quantize_projections
    }

    /// Projection weight `name`, `[out, in]`, in blocks: the file's own, or quantised to Q8_0 from
    /// its float values (`conv1d`: stored `[in, out]`, as transformers' Conv1D keeps it).
    pub fn quantized(&mut self, name: &str, shape: [usize; 2], conv1d: bool) -> Result<QuantBlocks> {
        if let Some(b) = self.quantized.remove(name) {
            if b.shape != shape {
                return Err(ModelError::Shape { path: self.path.clone(), name: name.into(), expected: shape.to_vec(), got: b.shape.to_vec() });
            }
            return Ok(b);
        }
        let [out, inp] = shape;
        let data = if conv1d {
            let t = self.take(name, &[inp, out])?;
            let mut data = vec![0.0f32; t.data.len()];
            for (i, row) in t.data.chunks_exact(out.max(1)).enumerate() {
                for (o, &x) in row.iter().enumerate() {
                    data[o * inp + i] = x;
                }
            }
            data
        } else {
            self.take(name, &shape)?.data
        };
        crate::quantized::quantize_at_load(name, shape, &data)
    }

    /// A source that makes up every tensor the model asks for: a randomly initialised model
    /// (seeded), for training from scratch and benchmarks.
    pub fn random(seed: u64, std: f32) -> Self {
        use rand::SeedableRng;
        Self {
            path: PathBuf::from("<random init>"),
            tensors: BTreeMap::new(),
            random: Some(RandomInit { rng: rand::rngs::StdRng::seed_from_u64(seed), std: if std.is_finite() { std.abs() } else { 0.02 }, norm_scale: 1.0 }),
            ..Self::new_empty()
        }
    }

    /// A [`Self::random`] source whose norm weights are zeros: for norms that scale by
    /// `1 + weight` (Gemma's), which transformers initialises so.
    pub fn with_zero_centred_norms(mut self) -> Self {
        if let Some(r) = &mut self.random {
            r.norm_scale = 0.0;
        }
        self
    }

    /// Reads `model.safetensors`, or the shards listed by `model.safetensors.index.json`, from a folder.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.exists() {
            check_host_memory(&single, std::slice::from_ref(&single), crate::out_of_memory::host_free_bytes())?;
            let mut tensors = BTreeMap::new();
            read_safetensors(&single, &mut tensors)?;
            return Ok(Self { path: single, tensors, ..Self::new_empty() });
        }
        if !index.exists() {
            return Err(ModelError::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "neither model.safetensors nor model.safetensors.index.json found",
                ),
            ));
        }
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Safetensors { path: index.clone(), message: e.to_string() })?;
        let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
            ModelError::Safetensors { path: index.clone(), message: "no `weight_map` object".into() }
        })?;
        let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
        shards.sort_unstable();
        shards.dedup();
        check_host_memory(&index, &shards.iter().map(|s| dir.join(s)).collect::<Vec<_>>(), crate::out_of_memory::host_free_bytes())?;
        let mut tensors = BTreeMap::new();
        for shard in shards {
            read_safetensors(&dir.join(shard), &mut tensors)?;
        }
        for name in map.keys() {
            if !tensors.contains_key(name) {
                return Err(ModelError::MissingTensor { path: index.clone(), name: name.clone() });
            }
        }
        Ok(Self { path: index, tensors, ..Self::new_empty() })
    }

    /// The file the tensors were read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a tensor is present (a random source has every tensor).
    pub fn contains(&self, name: &str) -> bool {
        self.random.is_some() || self.tensors.contains_key(name) || self.quantized.contains_key(name)
    }

    /// Puts `prefix` before every name (a checkpoint saved without its model's prefix).
    pub fn add_prefix(&mut self, prefix: &str) {
        self.tensors = std::mem::take(&mut self.tensors).into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)).collect();
    }

    /// Renames one tensor, if present (a checkpoint that calls a tensor by another family's name).
    pub fn rename(&mut self, from: &str, to: &str) {
        if let Some(t) = self.tensors.remove(from) {
            self.tensors.insert(to.to_string(), t);
        }
    }

    /// Removes a tensor, checking its shape.
    pub fn take(&mut self, name: &str, expected: &[usize]) -> Result<HostTensor> {
        if let Some(init) = &mut self.random {
            return Ok(init.make(name, expected));
        }
        if let Some(b) = self.quantized.remove(name) {
            self.tensors.insert(name.to_string(), HostTensor { shape: b.shape.to_vec(), data: b.dequantize() });
        }
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::MissingTensor { path: self.path.clone(), name: name.into() })?;
        if t.shape != expected {
            return Err(ModelError::Shape {
                path: self.path.clone(),
                name: name.into(),
                expected: expected.to_vec(),
                got: t.shape,
            });
        }
        Ok(t)
    }

    /// A tensor as a burn tensor on `device`, shape-checked.
    pub fn tensor<const D: usize>(&mut self, name: &str, shape: [usize; D], device: &Device) -> Result<Tensor<D>> {
        let t = self.take(name, &shape)?;
        Ok(Tensor::from_data(TensorData::new(t.data, shape), device))
    }

    /// A `[out, in]` HF linear weight, transposed to burn's `[in, out]`.
    ///
    /// The transpose is done here on the host, so that the weight is contiguous on the device:
    /// a transposed view is copied in full by any op that reshapes it, and burn's `linear`
    /// reshapes its weight on every call (on flex that copy cost more than the matmul itself
    /// when generating one token at a time).
    pub fn linear_weight(&mut self, name: &str, out: usize, inp: usize, device: &Device) -> Result<Tensor<2>> {
        let t = self.take(name, &[out, inp])?;
        let mut data = vec![0.0f32; t.data.len()];
        for (o, row) in t.data.chunks_exact(inp.max(1)).enumerate() {
            for (i, &x) in row.iter().enumerate() {
                data[i * out + o] = x;
            }
        }
        Ok(Tensor::from_data(TensorData::new(data, [inp, out]), device))
    }

    /// Names left after the model took what it needs.
    pub fn remaining(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().chain(self.quantized.keys()).map(String::as_str)
    }
}

impl RandomInit {
    fn make(&mut self, name: &str, shape: &[usize]) -> HostTensor {
        use rand_distr::Distribution;
        let n: usize = shape.iter().product();
        let is_norm = name.contains("norm") || name.contains("ln_");
        let data = if name.ends_with(".bias") {
            vec![0.0; n]
        } else if is_norm {
            vec![self.norm_scale; n]
        } else {
            let normal = rand_distr::Normal::new(0.0f32, self.std).unwrap_or_else(|_| unreachable!());
            (0..n).map(|_| normal.sample(&mut self.rng)).collect()
        };
        HostTensor { shape: shape.to_vec(), data }
    }
}

pub(crate) fn read_safetensors(path: &Path, out: &mut BTreeMap<String, HostTensor>) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| ModelError::Safetensors { path: path.into(), message: e.to_string() })?;
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            // Older GPT-2 / GPT-Neo / GPT-J / Pythia files carry their causal-mask buffers; the
            // masks are rebuilt at run time, so these are skipped whatever their dtype.
            _ if is_mask_buffer(&name) => continue,
            other => {
                return Err(ModelError::Safetensors {
                    path: path.into(),
                    message: format!("tensor `{name}` has dtype {other:?}; expected F32, F16 or BF16"),
                });
            }
        };
        out.insert(name, HostTensor { shape: view.shape().to_vec(), data });
    }
    Ok(())
}

/// Refuses safetensors files whose tensors, every one converted to f32 and held at once before the
/// model is built, need more host memory than is free (a bf16 8-billion-parameter model takes
/// 32 GB so). Files whose headers do not read cleanly are left to the read, which names what is
/// wrong.
fn check_host_memory(path: &Path, files: &[PathBuf], free: Option<u64>) -> Result<()> {
    let Some(params) = files.iter().try_fold(0u64, |n, f| n.checked_add(safetensors_elements(f)?)) else { return Ok(()) };
    let bytes = params.saturating_mul(4);
    match crate::out_of_memory::weights_beyond_free(params, bytes, "as f32", "where every tensor is read before the model is built", free) {
        Some(message) => Err(ModelError::TooLarge { path: path.into(), message }),
        None => Ok(()),
    }
}

/// The elements of the tensors a safetensors file's header lists (causal-mask buffers left out),
/// where the header reads whole and its last tensor ends where the file does; else `None`.
fn safetensors_elements(path: &Path) -> Option<u64> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let mut size = [0u8; 8];
    file.read_exact(&mut size).ok()?;
    let n = u64::from_le_bytes(size);
    // safetensors' own limit on a header.
    if n > 100_000_000 || n.checked_add(8)? > len {
        return None;
    }
    let mut header = vec![0u8; usize::try_from(n).ok()?];
    file.read_exact(&mut header).ok()?;
    let json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header).ok()?;
    let (mut elements, mut end) = (0u64, 0u64);
    for (name, tensor) in json.iter().filter(|(name, _)| *name != "__metadata__") {
        let count = tensor.get("shape")?.as_array()?.iter().try_fold(1u64, |a, d| a.checked_mul(d.as_u64()?))?;
        end = end.max(tensor.get("data_offsets")?.as_array()?.get(1)?.as_u64()?);
        if !is_mask_buffer(name) {
            elements = elements.checked_add(count)?;
        }
    }
    (end.checked_add(n + 8)? == len).then_some(elements)
}

fn is_mask_buffer(name: &str) -> bool {
    name.ends_with(".attn.bias") || name.ends_with(".attention.bias") || name.ends_with("masked_bias")
}

/// One tensor of [`HfTensors`]: HF name, shape, row-major values.
pub type HfEntry = (String, Vec<usize>, Vec<f32>);

/// Collects named burn tensors for saving in HF layout.
#[derive(Default)]
pub struct HfTensors {
    entries: Vec<(String, Vec<usize>, Vec<f32>)>,
    /// The first tensor that could not be read back from the device, with why: [`HfTensors::write`]
    /// refuses to save without it.
    unread: Option<(String, String)>,
}

impl HfTensors {
    /// Adds a tensor as it is.
    pub fn push<const D: usize>(&mut self, name: impl Into<String>, tensor: Tensor<D>) {
        let (name, shape) = (name.into(), tensor.dims().to_vec());
        match tensor.into_data().convert::<f32>().try_into_vec::<f32>() {
            Ok(data) => self.entries.push((name, shape, data)),
            Err(e) => {
                self.unread.get_or_insert((name, format!("{e:?}")));
            }
        }
    }

    /// The collected tensors: name, shape, values.
    #[cfg(test)]
    pub(crate) fn entries(&self) -> &[(String, Vec<usize>, Vec<f32>)] {
        &self.entries
    }

    /// Adds a layer norm under `{name}.weight` and `{name}.bias`.
    pub fn push_layer_norm(&mut self, name: impl std::fmt::Display, ln: &LayerNorm) {
        self.push(format!("{name}.weight"), ln.gamma.val());
        if let Some(b) = &ln.beta {
            self.push(format!("{name}.bias"), b.val());
        }
    }

    /// Adds a burn `[in, out]` linear weight as HF's `[out, in]`.
    pub fn push_linear(&mut self, name: impl Into<String>, weight: Tensor<2>) {
        self.push(name, weight.transpose());
    }

    /// The tensors as (HF name, shape, row-major values), or the error of the first that could not
    /// be read back from the device; `path` is the file being written, for that error.
    pub fn read_back(&self, path: &Path) -> Result<&[HfEntry]> {
        match &self.unread {
            Some((name, why)) => Err(ModelError::Safetensors { path: path.into(), message: format!("tensor `{name}` could not be read back from the device: {why}") }),
            None => Ok(&self.entries),
        }
    }

    /// Writes `model.safetensors` (float32) atomically: a temporary file, then a rename.
    pub fn write(&self, path: &Path) -> Result<()> {
        // safetensors' writer assumes distinct names.
        let mut names = std::collections::HashSet::new();
        if let Some((name, ..)) = self.entries.iter().find(|(name, ..)| !names.insert(name)) {
            return Err(ModelError::Safetensors { path: path.into(), message: format!("tensor `{name}` given twice") });
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = self
            .read_back(path)?
            .iter()
            .map(|(name, shape, data)| {
                let bytes: &[u8] = bytemuck::cast_slice(data);
                safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| ModelError::Safetensors { path: path.into(), message: e.to_string() })
            })
            .collect::<Result<_>>()?;
        let mut metadata = std::collections::HashMap::new();
        metadata.insert("format".to_string(), "pt".to_string());
        let bytes = safetensors::serialize(views, Some(metadata))
            .map_err(|e| ModelError::Safetensors { path: path.into(), message: e.to_string() })?;
        write_atomic(path, &bytes)
    }
}

/// Writes a file through a temporary file in the same folder and a rename, so a crash never
/// leaves a half-written file under the final name. The temporary name is this writer's own
/// (process id and a counter), so two processes writing the same file at once each rename a
/// complete file into place; a failed write (a full disk) removes its temporary file, and the error
/// names the final path.
///
/// A file that already holds exactly these bytes is left as it is, its modification time too: a
/// finished stage resumed exports the same model again, and the reference caches keyed on its
/// files' times (odpo-trainer's reference log-prob cache) stay valid.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    if holds(path, bytes) {
        return Ok(());
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.{}.tmp", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::File::open(&tmp)?.sync_all()).and_then(|()| std::fs::rename(&tmp, path));
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ModelError::io(path, e)
    })
}

/// Whether the file at `path` holds exactly `bytes` (false when it cannot be read), compared a
/// block at a time so that a large model file is never held twice.
fn holds(path: &Path, bytes: &[u8]) -> bool {
    use std::io::Read;
    let Ok(mut file) = std::fs::File::open(path) else { return false };
    if !file.metadata().is_ok_and(|m| m.len() == bytes.len() as u64) {
        return false;
    }
    let mut block = vec![0u8; 1 << 20];
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = block.len().min(rest.len());
        if file.read_exact(&mut block[..n]).is_err() || block[..n] != rest[..n] {
            return false;
        }
        rest = &rest[n..];
    }
    // Nothing past the length read (a file that grew meanwhile).
    file.read(&mut block[..1]).is_ok_and(|n| n == 0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_safetensors_file_too_large_for_the_free_memory_is_refused_from_its_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        // 3 × 4 f32 and 5 bf16 weights, and a causal-mask buffer the read skips: 17 weights, 68
        // bytes once read as f32.
        let (a, b, mask) = (vec![0u8; 48], vec![0u8; 10], vec![0u8; 4]);
        let views = vec![
            ("a".to_string(), safetensors::tensor::TensorView::new(Dtype::F32, vec![3, 4], &a).unwrap()),
            ("b".to_string(), safetensors::tensor::TensorView::new(Dtype::BF16, vec![5], &b).unwrap()),
            ("h.0.attn.bias".to_string(), safetensors::tensor::TensorView::new(Dtype::U8, vec![1, 1, 2, 2], &mask).unwrap()),
        ];
        let bytes = safetensors::serialize(views, None).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(safetensors_elements(&path), Some(17));
        let files = std::slice::from_ref(&path);
        assert!(check_host_memory(&path, files, Some(68)).is_ok());
        assert!(check_host_memory(&path, files, None).is_ok());
        let err = check_host_memory(&path, files, Some(67)).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("{}: the model's 17 parameters need at least 68 bytes of host memory as f32, where every tensor is read before the model is built, and this machine has 67 bytes free (memory and swap)", path.display())
        );
        // A file cut short is left to the read, which says so.
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert_eq!(safetensors_elements(&path), None);
        assert!(check_host_memory(&path, files, Some(1)).is_ok());
        let Err(ModelError::Safetensors { message, .. }) = Weights::from_hf_dir(dir.path()) else { panic!("a cut file was read") };
        assert!(message.contains("MetadataIncompleteBuffer") || message.contains("incomplete"), "{message}");
    }

    /// Writing the bytes a file already holds leaves it untouched (its modification time too); any
    /// other bytes, of the same length or not, replace it.
    #[test]
    fn writing_the_same_bytes_again_leaves_the_file_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        write_atomic(&path, &bytes).unwrap();
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(old).unwrap();
        let written = || std::fs::metadata(&path).unwrap().modified().unwrap();

        write_atomic(&path, &bytes).unwrap();
        assert_eq!(written(), old, "the same bytes were written again");
        let mut changed = bytes.clone();
        *changed.last_mut().unwrap() ^= 1;
        for other in [changed, bytes[..bytes.len() - 1].to_vec(), [&bytes[..], &[0]].concat()] {
            write_atomic(&path, &other).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), other);
            assert_ne!(written(), old, "other bytes left the file as it was");
            std::fs::File::options().write(true).open(&path).unwrap().set_modified(old).unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "a temporary file was left");
    }
}
