//! The model crate's error type.

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
        "{path}: unknown architecture `{architecture}`; supported: GPT2LMHeadModel (gpt2), LlamaForCausalLM (llama), MistralForCausalLM (mistral), Qwen2ForCausalLM (qwen2), Qwen3ForCausalLM (qwen3), GemmaForCausalLM (gemma), Gemma2ForCausalLM (gemma2), Gemma3ForCausalLM (gemma3_text), GPTNeoForCausalLM (gpt_neo), GPTJForCausalLM (gptj), GPTNeoXForCausalLM (gpt_neox)"
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
    Gguf(#[from] crate::gguf::GgufError),
    /// The tokenizer could not be loaded or used.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
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
