//! `DataConfig`: the `[data]` table of a run config, and of each `datasets/<name>/dataset.toml` description.
//! Strict: an unknown key is an error, and an option that does not apply to the format is refused.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use odpo_loss::offset::OffsetConfig;
use serde::{Deserialize, Serialize};

use crate::error::DataError;
use crate::pairs::Pairing;

/// How the rows of a data file are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// One JSON object a line with a prompt, a chosen and a rejected response (HF's preference layout),
    /// optional scores and weight.
    Jsonl,
    /// The same columns in a parquet file, as HF datasets publish them.
    Parquet,
    /// One scored response a line, `{"prompt", "text", "reward"}` (the ODPO paper's IMDB and toxicity files);
    /// lines sharing a prompt are grouped and paired by [`Pairing`].
    ScoredJsonl,
    /// One JSON object `{post: {"responses": [...], "rewards": [...]}}` (the paper's TL;DR files); the prompt is
    /// the post followed by `"\n\nTL;DR:"`.
    TldrJson,
}

impl Format {
    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Parquet => "parquet",
            Format::ScoredJsonl => "scored-jsonl",
            Format::TldrJson => "tldr-json",
        }
    }

    /// Whether rows are scored responses that the loader pairs (rather than ready-made pairs).
    pub fn is_scored(self) -> bool {
        matches!(self, Format::ScoredJsonl | Format::TldrJson)
    }
}

impl FromStr for Format {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self, DataError> {
        match s {
            "jsonl" => Ok(Format::Jsonl),
            "parquet" => Ok(Format::Parquet),
            "scored-jsonl" => Ok(Format::ScoredJsonl),
            "tldr-json" => Ok(Format::TldrJson),
            other => Err(DataError::UnknownFormat(other.to_owned())),
        }
    }
}

/// Column (field) names. Defaults follow HF's preference datasets and UltraFeedback.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Columns {
    /// The prompt: a string or a list of chat messages.
    pub prompt: String,
    /// The preferred response (pair formats): a string or a list of chat messages.
    pub chosen: String,
    /// The dispreferred response (pair formats).
    pub rejected: String,
    /// Optional score of the chosen response (pair formats); UltraFeedback's name by default.
    pub score_chosen: String,
    /// Optional score of the rejected response (pair formats).
    pub score_rejected: String,
    /// The response text (scored-jsonl).
    pub text: String,
    /// The response score (scored-jsonl).
    pub score: String,
    /// An optional per-pair weight column (pair formats); unset means every pair weighs 1.
    pub weight: Option<String>,
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            prompt: "prompt".into(),
            chosen: "chosen".into(),
            rejected: "rejected".into(),
            score_chosen: "score_chosen".into(),
            score_rejected: "score_rejected".into(),
            text: "text".into(),
            score: "reward".into(),
            weight: None,
        }
    }
}

/// What to do with a row that cannot be used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnBadRow {
    /// Stop with the row's error (file, position, field).
    #[default]
    Error,
    /// Skip the row, log it, and report every skipped row and the total.
    Skip,
}

/// What to do when prompt + completion exceed `max_length`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LongCompletion {
    /// Keep the start of the completion (it then has no EOS); counted in the report. What the paper's code did.
    #[default]
    Truncate,
    /// Drop the pair; counted in the report.
    Drop,
}

fn default_max_length() -> usize {
    1024
}
fn default_max_prompt_length() -> Option<usize> {
    Some(256)
}
fn default_seed() -> u64 {
    42
}

/// The data section of a run: where the data is, how to read, pair, score, split and tokenize it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The data file. A relative path is taken from the working directory (the repository root for `cargo xtask`).
    pub path: PathBuf,
    /// The file's layout.
    pub format: Format,
    /// Column names; only for `jsonl`, `parquet` and `scored-jsonl` (the TL;DR layout is fixed).
    #[serde(default)]
    pub columns: Option<Columns>,
    /// How scored responses become pairs; only for scored formats (default `all-pairs`).
    #[serde(default)]
    pub pairing: Option<Pairing>,
    /// The offset Δ = alpha·f(s_w − s_l) per pair; absent means Δ = 0 (DPO) and scores are not needed.
    #[serde(default)]
    pub offset: Option<OffsetConfig>,
    /// Share of prompts held out for evaluation, in [0, 1); no prompt is in both parts.
    #[serde(default)]
    pub eval_fraction: f64,
    /// Longest prompt + completion, in tokens (the paper: 1024).
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// Longest prompt in tokens; longer prompts keep their end (the paper: 256, 512 for TL;DR). Must be below
    /// `max_length`. `None`: prompts are never cut, and a pair whose prompt fills `max_length` is dropped.
    #[serde(default = "default_max_prompt_length")]
    pub max_prompt_length: Option<usize>,
    /// Pad the time dimension of a batch up to a multiple of this (fewer distinct shapes for GPU kernels).
    #[serde(default)]
    pub pad_to_multiple: Option<usize>,
    /// Render prompts with the tokenizer's chat template (with the generation prompt); otherwise plain text.
    #[serde(default)]
    pub chat_template: bool,
    /// Text put between the prompt and each completion (before tokenizing the completion), e.g. `" "` when
    /// the completions continue the prompt's last word without a space (the paper's IMDB and toxicity files).
    #[serde(default)]
    pub separator: String,
    /// Accept empty responses as data (a model that stopped at once: the completion is just EOS); otherwise an
    /// empty response is a bad row. Empty prompts are always bad rows.
    #[serde(default)]
    pub allow_empty_completions: bool,
    /// Stop at the first bad row (default) or skip and report bad rows.
    #[serde(default)]
    pub on_bad_row: OnBadRow,
    /// What to do with completions that do not fit in `max_length` after the prompt.
    #[serde(default)]
    pub long_completion: LongCompletion,
    /// Seed for random pairing, the train/eval split and shuffling.
    #[serde(default = "default_seed")]
    pub seed: u64,
}

impl DataConfig {
    /// A config with every default for a file of the given format.
    pub fn new(path: impl Into<PathBuf>, format: Format) -> Self {
        DataConfig {
            path: path.into(),
            format,
            columns: None,
            pairing: None,
            offset: None,
            eval_fraction: 0.0,
            max_length: default_max_length(),
            max_prompt_length: default_max_prompt_length(),
            pad_to_multiple: None,
            chat_template: false,
            separator: String::new(),
            allow_empty_completions: false,
            on_bad_row: OnBadRow::Error,
            long_completion: LongCompletion::Truncate,
            seed: default_seed(),
        }
    }

    /// Parses TOML: either a data config itself or a run config holding it as its `[data]` table. Checked.
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Self, DataError> {
        #[derive(Deserialize)]
        struct Run {
            data: DataConfig,
        }
        let parse_err = |e: toml::de::Error| DataError::ConfigParse {
            path: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        };
        let table: toml::Table = toml::from_str(text).map_err(parse_err)?;
        let cfg = if table.contains_key("data") && !table.contains_key("path") {
            toml::from_str::<Run>(text).map_err(parse_err)?.data
        } else {
            toml::from_str::<DataConfig>(text).map_err(parse_err)?
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads [`DataConfig::from_toml_str`] from a file.
    pub fn from_toml_file(path: &Path) -> Result<Self, DataError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| DataError::Io { path: path.to_owned(), source })?;
        Self::from_toml_str(&text, path)
    }

    /// The column names in force (the defaults when none were set).
    pub fn columns(&self) -> Columns {
        self.columns.clone().unwrap_or_default()
    }

    /// The pairing strategy in force for scored formats.
    pub fn pairing(&self) -> Pairing {
        self.pairing.unwrap_or_default()
    }

    /// Refuses settings that cannot work or would do nothing, naming the option and the way out.
    pub fn validate(&self) -> Result<(), DataError> {
        let err = |m: String| Err(DataError::Config(m));
        if self.max_length < 2 {
            return err(format!("`max_length` is {}; it must be at least 2", self.max_length));
        }
        if let Some(mp) = self.max_prompt_length
            && (mp == 0 || mp >= self.max_length)
        {
            return err(format!(
                "`max_prompt_length` ({mp}) must be between 1 and `max_length` - 1 ({}) to leave room for the completion",
                self.max_length - 1
            ));
        }
        if self.pad_to_multiple == Some(0) {
            return err("`pad_to_multiple` must be at least 1 (or left out)".into());
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return err(format!("`eval_fraction` is {}; it must be in [0, 1)", self.eval_fraction));
        }
        if self.pairing.is_some() && !self.format.is_scored() {
            return err(format!(
                "`pairing` applies to scored formats (scored-jsonl, tldr-json), not `{}`, whose rows are pairs already; remove it",
                self.format.name()
            ));
        }
        if let Some(Pairing::RandomK { k: 0 }) = self.pairing {
            return err("`pairing.k` must be at least 1".into());
        }
        if self.columns.is_some() && self.format == Format::TldrJson {
            return err("`columns` does not apply to `tldr-json`, whose layout is fixed; remove it".into());
        }
        if let Some(c) = &self.columns
            && c.weight.is_some()
            && self.format.is_scored()
        {
            return err("`columns.weight` applies to pair formats (jsonl, parquet) only; remove it".into());
        }
        if let Some(o) = &self.offset {
            // Named as the other keys of this table are (`offset.alpha`), so a refusal names its key.
            o.validate().map_err(|e| match e {
                odpo_loss::offset::OffsetError::InvalidConfig { option, value, reason } => DataError::Config(format!("`offset.{option}` = {value}: {reason}")),
                e => DataError::Config(format!("`offset`: {e}")),
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Every description in datasets/ reads and validates (hh-rlhf's and UltraFeedback's point at a copy
    /// the user downloads, so nothing else reads them).
    #[test]
    fn every_dataset_description_is_a_valid_config() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&root).unwrap() {
            let desc = entry.unwrap().path().join("dataset.toml");
            if desc.exists() {
                DataConfig::from_toml_file(&desc).unwrap().validate().unwrap_or_else(|e| panic!("{}: {e}", desc.display()));
                names.push(desc.parent().and_then(|d| d.file_name()).unwrap().to_string_lossy().into_owned());
            }
        }
        names.sort();
        assert_eq!(names, ["hh-rlhf", "imdb", "tldr", "toxicity", "ultrafeedback"]);
    }

    #[test]
    fn parses_run_config_data_table_and_rejects_unknown_keys() {
        let run = "[model]\nname = \"x\"\n[data]\npath = \"a.jsonl\"\nformat = \"scored-jsonl\"\nseparator = \" \"\n";
        let cfg = DataConfig::from_toml_str(run, Path::new("run.toml")).unwrap();
        assert_eq!(cfg.format, Format::ScoredJsonl);
        assert_eq!(cfg.separator, " ");
        assert_eq!(cfg.max_prompt_length, Some(256));

        let bad = "path = \"a.jsonl\"\nformat = \"jsonl\"\nmax_lenght = 5\n";
        let e = DataConfig::from_toml_str(bad, Path::new("d.toml")).unwrap_err().to_string();
        assert!(e.starts_with("d.toml: TOML parse error at line 3, column 1"), "{e}");
        assert!(e.contains("unknown field `max_lenght`"), "{e}");
    }

    #[test]
    fn refuses_options_that_do_not_apply() {
        let t = "path = \"a.jsonl\"\nformat = \"jsonl\"\npairing = { strategy = \"best-vs-worst\" }\n";
        let e = DataConfig::from_toml_str(t, Path::new("d.toml")).unwrap_err().to_string();
        assert_eq!(
            e,
            "data config: `pairing` applies to scored formats (scored-jsonl, tldr-json), not `jsonl`, whose rows are pairs already; remove it"
        );
        let t = "path = \"a\"\nformat = \"jsonl\"\nmax_length = 100\nmax_prompt_length = 100\n";
        let e = DataConfig::from_toml_str(t, Path::new("d.toml")).unwrap_err().to_string();
        assert_eq!(
            e,
            "data config: `max_prompt_length` (100) must be between 1 and `max_length` - 1 (99) to leave room for the completion"
        );
        assert_eq!(
            "csv".parse::<Format>().unwrap_err().to_string(),
            "unknown data format `csv`; known formats: jsonl, parquet, scored-jsonl, tldr-json"
        );
    }
}
