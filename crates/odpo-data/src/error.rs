//! The crate's one error type. Every problem with a row names the file, the place in it (line, parquet
//! row group and row, or TL;DR entry) and the field, so a user can open the file and fix it.

use std::fmt;
use std::path::PathBuf;

/// Where in a file a row sits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Position {
    /// A 1-based line of a text file (JSONL), with an optional 1-based column.
    Line {
        /// 1-based line.
        line: usize,
        /// 1-based column, where the problem is at a known character.
        column: Option<usize>,
    },
    /// A row of a parquet file: 0-based row group and 0-based row within it.
    Row {
        /// Row group index.
        group: usize,
        /// Row index within the group.
        row: usize,
    },
    /// An entry (a post) of a single-object JSON file, 0-based in file order.
    Entry(usize),
    /// The file as a whole.
    File,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Line { line, column: Some(c) } => write!(f, "line {line}, column {c}"),
            Position::Line { line, column: None } => write!(f, "line {line}"),
            Position::Row { group, row } => write!(f, "row group {group}, row {row}"),
            Position::Entry(i) => write!(f, "entry {i}"),
            Position::File => write!(f, "whole file"),
        }
    }
}

/// What is wrong with one row.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RowProblem {
    /// The text is not JSON (serde_json's message, which carries no position: the position is in the location).
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// The bytes are not UTF-8.
    #[error("invalid UTF-8 at byte {0} of the line")]
    InvalidUtf8(usize),
    /// A row is not a JSON object.
    #[error("expected a JSON object, got {0}")]
    NotAnObject(&'static str),
    /// A required field is absent (or null).
    #[error("missing")]
    Missing,
    /// A row without a prompt whose chosen and rejected texts differ from their start, so that no
    /// prompt is implicit in them.
    #[error(
        "missing, and the chosen and rejected responses share no start to take as the prompt (the prompt implicit in both, as in hh-rlhf); if the prompt has a column of another name, set `data.columns.prompt`"
    )]
    NoSharedStart,
    /// A field has the wrong JSON type.
    #[error("expected {expected}, got {got}")]
    WrongType {
        /// What the field should be.
        expected: &'static str,
        /// The JSON type found.
        got: &'static str,
    },
    /// A score or weight is NaN or infinite.
    #[error("not a finite number ({0})")]
    NotFinite(String),
    /// A text is empty or only whitespace.
    #[error("empty text")]
    EmptyText,
    /// A response is empty or only whitespace (allowed by `allow_empty_completions`).
    #[error("empty response (set `allow_empty_completions = true` if empty responses are real data)")]
    EmptyCompletion,
    /// A weight is negative.
    #[error("negative weight {0}")]
    NegativeWeight(f64),
    /// A labelled pair whose chosen response scored below the rejected one.
    #[error("score_chosen {chosen} is below score_rejected {rejected}: the pair contradicts its scores")]
    Inverted {
        /// The chosen score.
        chosen: f64,
        /// The rejected score.
        rejected: f64,
    },
    /// TL;DR entries: the two lists differ in length.
    #[error("{responses} responses but {rewards} rewards")]
    LengthMismatch {
        /// Number of responses.
        responses: usize,
        /// Number of rewards.
        rewards: usize,
    },
    /// A chat message list that cannot be used as given (the message says why).
    #[error("{0}")]
    BadMessages(String),
    /// A pair without scores under an offset config.
    #[error("missing (the offset needs both scores; remove [data.offset] to train without offsets)")]
    ScoreNeeded,
    /// The offset function refused the pair's scores (for example log-ratio with a non-positive score).
    #[error("offset: {0}")]
    Offset(String),
}

/// Where a row problem is: file, position and field.
#[derive(Clone, Debug, PartialEq)]
pub struct RowLocation {
    /// The data file.
    pub path: PathBuf,
    /// The place in the file.
    pub position: Position,
    /// The field (column) at fault, where one is.
    pub field: Option<String>,
}

impl fmt::Display for RowLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.position)?;
        if let Some(field) = &self.field {
            write!(f, ", field `{field}`")?;
        }
        Ok(())
    }
}

/// Everything that can go wrong turning files into batches.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// A row of a data file is unusable; the default `on_bad_row = "error"` stops here.
    #[error("{at}: {problem}")]
    Row {
        /// File, position and field.
        at: RowLocation,
        /// What is wrong.
        problem: RowProblem,
    },
    /// A file could not be read at all.
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A parquet file is unreadable as a whole (footer, schema, codec, corrupt pages).
    #[error("{}: {position}: cannot read parquet: {message}", path.display())]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The row group or the whole file.
        position: Position,
        /// The parquet crate's message.
        message: String,
    },
    /// A parquet file lacks a configured column.
    #[error("{}: no column `{column}` (columns: {available}); set it under [data.columns]", path.display())]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// The configured column name.
        column: String,
        /// The file's top-level columns, comma separated.
        available: String,
    },
    /// A format name that is not known.
    #[error("unknown data format `{0}`; known formats: jsonl, parquet, scored-jsonl, tldr-json")]
    UnknownFormat(String),
    /// A data configuration that cannot work (the message names the option and the way out).
    #[error("data config: {0}")]
    Config(String),
    /// A TOML data configuration that does not parse.
    #[error("{}: {message}", path.display())]
    ConfigParse {
        /// The TOML file.
        path: PathBuf,
        /// toml's message, with line and column.
        message: String,
    },
    /// Tokenizing or rendering a chat template failed for a pair.
    #[error("pair {pair}: {source}")]
    Tokenizer {
        /// The pair id.
        pair: usize,
        /// The tokenizer's error.
        #[source]
        source: odpo_model::tokenizer::TokenizerError,
    },
    /// The chat template renders a pair's prompt differently once a response follows it, so the
    /// prompt/completion boundary cannot be found.
    #[error("pair {pair}: the chat template renders the prompt differently when a response follows it (the conversation starts {conversation:?}, the prompt alone is {prompt:?}); the boundary between prompt and completion would be wrong")]
    TemplateMismatch {
        /// The pair id.
        pair: usize,
        /// The start of the prompt rendered alone.
        prompt: String,
        /// The start of prompt and completion rendered together.
        conversation: String,
    },
    /// Nothing usable is left (every row skipped or dropped).
    #[error("{}: no preference pairs left ({why})", path.display())]
    NoPairs {
        /// The data file.
        path: PathBuf,
        /// Counts that explain it.
        why: String,
    },
}

impl DataError {
    /// A row error at `path`, `position`, `field`.
    pub fn row(path: impl Into<PathBuf>, position: Position, field: Option<&str>, problem: RowProblem) -> Self {
        DataError::Row {
            at: RowLocation { path: path.into(), position, field: field.map(str::to_owned) },
            problem,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_error_names_file_line_and_field() {
        let e = DataError::row(
            "d.jsonl",
            Position::Line { line: 3, column: None },
            Some("chosen"),
            RowProblem::WrongType { expected: "a string or a list of chat messages", got: "a number" },
        );
        assert_eq!(
            e.to_string(),
            "d.jsonl: line 3, field `chosen`: expected a string or a list of chat messages, got a number"
        );
        let e = DataError::row("d.parquet", Position::Row { group: 1, row: 7 }, None, RowProblem::EmptyText);
        assert_eq!(e.to_string(), "d.parquet: row group 1, row 7: empty text");
    }
}
