//! The model crate's error types: [`ModelError`], and the GGUF reader's and the tokenizer's, which it wraps.

use std::path::PathBuf;

/// Everything that can go wrong while reading, building, running or saving a model.
///
/// Each variant names the file and, where one is concerned, the tensor or config key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON or a key has the wrong type.
    #[error("{path}: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
    /// The checkpoint's architecture is not one this crate implements.
    #[error(
        "{path}: unknown architecture `{architecture}`; supported: GPT2LMHeadModel (gpt2), LlamaForCausalLM (llama), MistralForCausalLM (mistral), Qwen2ForCausalLM (qwen2), Qwen3ForCausalLM (qwen3), Olmo2ForCausalLM (olmo2), Olmo3ForCausalLM (olmo3), SmolLM3ForCausalLM (smollm3), GraniteForCausalLM (granite), Phi3ForCausalLM (phi3), GemmaForCausalLM (gemma), Gemma2ForCausalLM (gemma2), Gemma3ForCausalLM (gemma3_text), GPTNeoForCausalLM (gpt_neo), GPTJForCausalLM (gptj), GPTNeoXForCausalLM (gpt_neox), PhiForCausalLM (phi), StableLmForCausalLM (stablelm)"
    )]
    UnknownArchitecture {
        /// The config file.
        path: PathBuf,
        /// The `architectures[0]` or `model_type` found.
        architecture: String,
    },
    /// A tensor the model needs is absent from the checkpoint.
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor {
        /// The checkpoint file (or index).
        path: PathBuf,
        /// The HF tensor name.
        name: String,
    },
    /// A tensor has a shape other than the config implies.
    #[error("{path}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    Shape {
        /// The checkpoint file.
        path: PathBuf,
        /// The HF tensor name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },
    /// A safetensors file is malformed, truncated or holds an unsupported dtype.
    #[error("{path}: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong (naming the tensor where one is concerned).
        message: String,
    },
    /// A GGUF file could not be read.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The tokenizer could not be loaded or used.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The request cannot be served by this model (bad input shape, sequence too long, ...).
    #[error("{0}")]
    Invalid(String),
    /// A model's weights need more host memory than the machine has free: a safetensors file's, as
    /// they are read, or a fresh model's, as they are drawn (checked before either begins).
    #[error("{path}: {message}")]
    TooLarge {
        /// The file the sizes came from: the weights, or the config of a fresh model.
        path: PathBuf,
        /// What the weights need, and what is free.
        message: String,
    },
    /// Rows longer than the model's learned position table.
    #[error("{what} needs {tokens} positions; the model has {limit} (its learned position table, `n_positions` or `max_position_embeddings` in config.json) and no embedding beyond them")]
    TooLong {
        /// What was asked: `pair 17 (prompt 40 + completion 30 tokens)`.
        what: String,
        /// Positions needed.
        tokens: usize,
        /// Positions the model has.
        limit: usize,
    },
    /// A token id past the model's vocabulary (a tokenizer or data made for another model).
    #[error("{what} holds token id {id}, past the model's vocabulary of {vocab} (ids 0 to {last}): the tokenizer, or the data's tokens, are not the model's", last = .vocab.saturating_sub(1))]
    TokenPastVocab {
        /// Where the token is: `pair 17`, `the prompt`.
        what: String,
        /// The token id.
        id: u32,
        /// Entries of the model's vocabulary.
        vocab: usize,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
    pub(crate) fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Config { path: path.into(), message: message.into() }
    }

    /// A [`Self::Config`] or [`Self::TooLarge`] error found while building a model from its weights, named for the
    /// config file the values came from (`config_path`) rather than the weights; any other error as
    /// it is.
    #[must_use]
    pub fn in_config_file(self, config_path: &std::path::Path) -> Self {
        match self {
            Self::Config { message, .. } => Self::Config { path: config_path.into(), message },
            Self::TooLarge { message, .. } => Self::TooLarge { path: config_path.into(), message },
            other => other,
        }
    }
}

/// Why a GGUF file could not be read. Every message starts with the file path, and names the
/// tensor or metadata key concerned, if any.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The operating system refused to open or read the file.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The first four bytes are not `GGUF`.
    #[error("{}: not a GGUF file (magic {magic:02x?}, expected \"GGUF\")", .path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// Its first (up to four) bytes.
        magic: Vec<u8>,
    },
    /// A GGUF version other than 2 or 3 (v1 used 32-bit counts; v2 and v3 share one layout).
    #[error("{}: unsupported GGUF version {version} (supported: 2, 3)", .path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version it declares.
        version: u32,
    },
    /// Part of the file (the header, or a tensor's data) extends past its end.
    #[error("{}: truncated: {what} needs bytes {start}..{end} but the file has {len}", .path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// `header`, or ``tensor `name` ``.
        what: String,
        /// First byte needed.
        start: u64,
        /// One past the last byte needed.
        end: u64,
        /// The file length.
        len: u64,
    },
    /// The header is structurally invalid (unknown value type, duplicate key or name, ...).
    #[error("{}: malformed header: {msg}", .path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A metadata key is missing or has the wrong type or value.
    #[error("{}: metadata `{key}`: {msg}", .path.display())]
    Metadata {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        msg: String,
    },
    /// A tensor is absent, of an unknown or unsupported ggml type, or has an unusable shape,
    /// offset or name.
    #[error("{}: tensor `{tensor}`: {msg}", .path.display())]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The tensor's GGUF name.
        tensor: String,
        /// What is wrong, e.g. `unknown quantisation type 99`.
        msg: String,
    },
    /// The tensors, as they are read, need more host memory than the machine has free.
    #[error("{}: {message}", .path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// What they need, and what is free.
        message: String,
    },
    /// `general.architecture` is not one this reader knows.
    #[error("{}: architecture `{arch}` is not supported (expected `llama`, `qwen2`, `qwen3`, `olmo2`, `smollm3`, `granite`, `phi3`, `gemma`, `gemma2`, `gemma3`, `phi2` or `stablelm`)", .path.display())]
    Architecture {
        /// The file.
        path: PathBuf,
        /// The architecture it declares.
        arch: String,
    },
}

/// Errors of loading a tokenizer, encoding, decoding and rendering chat templates.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {}: {message}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        message: String,
    },
    /// A file is not what was expected.
    #[error("{}: expected {expected}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What the file should have been.
        expected: &'static str,
        /// What went wrong.
        message: String,
    },
    /// Encoding or decoding failed.
    #[error("tokenizer {}: {op} failed: {message}", path.display())]
    Codec {
        /// The `tokenizer.json` in use.
        path: PathBuf,
        /// `encode`, `decode` or `save`.
        op: &'static str,
        /// The cause.
        message: String,
    },
    /// A GGUF file's tokenizer could not be read.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The tokenizer has no chat template.
    #[error("no chat template for {}: expected `chat_template` in tokenizer_config.json or a chat_template.jinja beside it", path.display())]
    NoChatTemplate {
        /// The `tokenizer.json` in use.
        path: PathBuf,
    },
    /// The chat template failed to compile or render (including `raise_exception`).
    #[error("chat template from {}: {message}", path.display())]
    Template {
        /// Where the template came from.
        path: PathBuf,
        /// The minijinja error, with the template line.
        message: String,
    },
}
