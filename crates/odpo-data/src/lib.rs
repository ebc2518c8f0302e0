//! odpo-data: what users have on disk, turned into tokenized, batched preference pairs with offsets.
//!
//! It owns:
//! - readers for HF's preference layout in JSONL ([`jsonl`]) and parquet ([`parquet`]), and the ODPO paper's
//!   scored-response files ([`paper`]), with every row problem naming file, line (or row group/row, or entry)
//!   and field ([`DataError`]), stopping by default or skipping and reporting (`on_bad_row = "skip"`);
//! - pairing of scored responses ([`Pairing`]: all distinct-score pairs, best-vs-worst, first two, k random),
//!   the better-scored response chosen, ties dropped and counted, each pair's offset Δ = α·f(s_w − s_l) from
//!   `odpo_loss::offset` ([`load()`]);
//! - the train/eval split by prompt ([`split_by_prompt`]);
//! - tokenization with an exact prompt/completion boundary and the truncation rule ([`tokenize`]);
//! - burn batches with chosen and rejected stacked for one forward pass ([`PreferenceBatcher`],
//!   [`preference_loader`]) and an SFT view ([`SftBatcher`]);
//! - the `data stats` report ([`stats()`]).
//!
//! ```no_run
//! use std::path::Path;
//! use odpo_data::{DataConfig, Layout, PreferenceBatcher, load, preference_loader, split_by_prompt, tokenize_pairs};
//! use odpo_model::tokenizer::Tokenizer;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg = DataConfig::from_toml_file(Path::new("datasets/imdb/dataset.toml"))?;
//! let loaded = load(&cfg)?;
//! let (train, _eval) = split_by_prompt(loaded.pairs, cfg.eval_fraction, cfg.seed);
//! let tok = Tokenizer::from_dir(Path::new("../shared/models/smollm2-135m-instruct"))?;
//! let (items, report) = tokenize_pairs(&train, &tok, &cfg)?;
//! println!("{report:?}");
//! let batcher = PreferenceBatcher::new(tok.pad_token_id().unwrap_or(0), cfg.pad_to_multiple, Layout::Concatenated);
//! let device = burn::tensor::Device::default();
//! for batch in preference_loader(items, batcher, 8, Some(cfg.seed), 1, &device).iter() {
//!     let batch = batch?; // [2B, T] ids and masks, [B] offsets
//!     let rows = batch.concatenated().ok_or("asked for the concatenated layout")?;
//!     let _ = (&rows.input_ids, &rows.loss_mask, &batch.offsets);
//! }
//! # Ok(()) }
//! ```
//!
//! Scored responses in memory, paired (the better-scored one chosen) with ODPO's offset Δ = log(s_w − s_l):
//!
//! ```
//! use odpo_data::{DataConfig, Format, load_bytes};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut cfg = DataConfig::new("inline.jsonl", Format::ScoredJsonl);
//! cfg.offset = Some(odpo_loss::OffsetConfig::default());
//! let rows = "{\"prompt\": \"p\", \"text\": \"b\", \"reward\": 1}\n{\"prompt\": \"p\", \"text\": \"a\", \"reward\": 3}\n";
//! let loaded = load_bytes(&cfg, rows.as_bytes().to_vec())?;
//! assert_eq!(loaded.pairs.len(), 1);
//! assert!((loaded.pairs[0].offset - 2f64.ln()).abs() < 1e-12);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod batch;
pub mod config;
pub mod error;
pub mod jsonl;
pub mod load;
pub mod pairs;
pub mod paper;
pub mod parquet;
pub mod split;
pub mod stats;
pub mod tokenize;

pub use batch::{ConcatenatedRows, Layout, PairRows, SharedPromptRows, PreferenceBatch, PreferenceBatcher, SftBatch, SftBatcher, preference_loader, sft_loader};
pub use config::{Columns, DataConfig, Format, LongCompletion, OnBadRow};
pub use error::{DataError, Position, RowProblem};
pub use load::{DropReason, LoadReport, Loaded, load, load_bytes, load_responses, stream};
pub use pairs::{Pairing, PreferencePair, Text};
pub use split::{eval_prompts, split_by_prompt};
pub use stats::{Stats, stats};
pub use tokenize::{SftItem, TokenizeReport, TokenizedPair, sft_from_pairs, sft_from_texts, tokenize_pairs};
