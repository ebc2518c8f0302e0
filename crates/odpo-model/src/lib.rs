//! Causal language models for preference training, on burn.
//!
//! This crate owns everything about the model itself: reading HF `config.json`, building the
//! GPT-2, Llama (with Mistral, Qwen2 / 3, OLMo 2 / 3, SmolLM3, Granite, Phi-3 and the mixtures of
//! experts Mixtral, Qwen2-MoE and Qwen3-MoE), Gemma, GPT-Neo, GPT-J, GPT-NeoX, Phi and
//! StableLM families ([`gpt2`], [`llama`], [`gemma`], [`gpt_neo`], [`gptj`], [`gpt_neox`], [`phi`], [`stablelm`]) from HF safetensors or llama.cpp GGUF files,
//! the forward pass over padded batches, sequence log-probabilities ([`logprobs`]), generation
//! with a KV cache ([`generate`]), the tokenizer and chat template ([`tokenizer`]), LoRA adapters
//! in PEFT's layout ([`lora`]) on the families' projections ([`linear`]), and saving back in HF layout. Nothing here names a backend except [`backend`], which maps a
//! `--backend` name to a burn `Device`, and [`out_of_memory`], which reads the backends' allocation
//! failures.
//!
//! ```no_run
//! use odpo_model::{CausalLm, Module, backend};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = backend::device("flex")?;
//! let loaded = CausalLm::load("models/smollm2".as_ref(), &device)?;
//! println!("{} parameters", loaded.model.num_params());
//! # Ok(()) }
//! ```
//!
//! A tiny random GPT-2 (no files needed), its logits and the summed log-probability of a sequence:
//!
//! ```
//! use burn::tensor::{Int, Tensor, TensorData};
//! use odpo_model::{CausalLm, ModelConfig, backend, logprobs::sequence_logprobs};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = backend::device("flex")?;
//! let json = serde_json::json!({"architectures": ["GPT2LMHeadModel"], "vocab_size": 16,
//!     "n_positions": 8, "n_embd": 8, "n_layer": 1, "n_head": 2});
//! let config = ModelConfig::from_hf_json(&json, "tiny".as_ref())?;
//! let model = CausalLm::random(&config, 0, &device)?;
//! let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 2, 3, 4], [1, 4]), &device);
//! let mask = Tensor::<2, Int>::ones([1, 4], &device);
//! let logits = model.forward(ids.clone(), &mask, None);
//! assert_eq!(logits.dims(), [1, 4, 16]);
//! let (sum, count) = sequence_logprobs(logits, ids, mask.float()); // each [1]
//! assert!(sum.into_scalar::<f32>() < 0.0 && count.into_scalar::<f32>() > 0.0);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod backend;
mod error;
pub mod gemma;
pub mod generate;
pub mod gguf;
pub mod gpt2;
pub mod gpt_neo;
pub mod gpt_neox;
pub mod gptj;
mod layers;
pub mod linear;
pub mod llama;
pub mod logprobs;
pub mod lora;
mod model;
pub mod moe;
mod names;
pub mod out_of_memory;
pub mod phi;
pub mod quantized;
pub mod stablelm;
pub mod tokenizer;
pub mod weights;

pub use burn::module::Module;
pub use error::{ModelError, Result};
pub use layers::{KvCache, parameter_count};
pub use lora::LoraConfig;
pub use model::{CausalLm, HalfWeights, LoadedModel, ModelConfig, Precision};
