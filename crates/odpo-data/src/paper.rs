//! The ODPO paper's two layouts of scored responses:
//! - scored JSONL, one response a line, `{"prompt", "text", "reward"}` (IMDB, toxicity); lines sharing a prompt
//!   form one group, in order of first appearance;
//! - the TL;DR file, one JSON object `{post: {"responses": [...], "rewards": [...]}}`, prompt = post + "\n\nTL;DR:".

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use serde::de::{MapAccess, Visitor};
use serde_json::Value;

use crate::config::Columns;
use crate::error::{DataError, Position, RowProblem};
use crate::jsonl::{BadRows, get_completion, get_text, json_message, lines, parse_object, require_number, type_name};
use crate::pairs::{ScoredGroup, ScoredResponse, Text};

/// What the paper's code appends to a TL;DR post to make the prompt.
pub const TLDR_SUFFIX: &str = "\n\nTL;DR:";

/// Groups scored responses by prompt, keeping the order in which prompts first appear.
#[derive(Default)]
pub(crate) struct Grouper {
    index: HashMap<String, usize>,
    /// The groups so far.
    pub groups: Vec<ScoredGroup>,
}

impl Grouper {
    pub(crate) fn push(&mut self, prompt: Text, response: ScoredResponse) {
        let key = prompt.key();
        let i = *self.index.entry(key).or_insert_with(|| {
            self.groups.push(ScoredGroup { prompt, responses: Vec::new() });
            self.groups.len() - 1
        });
        self.groups[i].responses.push(response);
    }
}

/// Parses one scored-JSONL line into its prompt and scored response.
pub fn parse_scored_line(
    path: &Path,
    line_no: usize,
    line: &[u8],
    cols: &Columns,
    allow_empty: bool,
) -> Result<(Text, ScoredResponse), DataError> {
    let obj = parse_object(path, line_no, line)?;
    let position = Position::Line { line: line_no, column: None };
    let parsed = (|| {
        let prompt = get_text(&obj, &cols.prompt)?;
        let text = get_completion(&obj, &cols.text, allow_empty)?;
        let score = require_number(&obj, &cols.score)?;
        Ok((prompt, text, score))
    })();
    match parsed {
        Ok((prompt, text, score)) => Ok((prompt, ScoredResponse { text, score, position })),
        Err((field, p)) => Err(DataError::row(path, position, Some(&field), p)),
    }
}

/// Reads a scored-JSONL file (bytes already read) into groups by prompt.
pub fn read_scored_jsonl(path: &Path, bytes: &[u8], cols: &Columns, bad: &mut BadRows) -> Result<Vec<ScoredGroup>, DataError> {
    let mut g = Grouper::default();
    for (n, line) in lines(bytes) {
        if let Some((prompt, resp)) = bad.handle(parse_scored_line(path, n, line, cols, bad.allow_empty_completions))? {
            g.push(prompt, resp);
        }
    }
    Ok(g.groups)
}

/// The top-level object's entries in file order (serde_json's own map sorts keys unless `preserve_order`).
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object mapping each post to its responses and rewards")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// 1-based line and column of a byte offset.
fn line_col(bytes: &[u8], offset: usize) -> (usize, usize) {
    let before = &bytes[..offset.min(bytes.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let col = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
    (line, col)
}

/// Parses one TL;DR entry (post and its value) into a group.
pub fn parse_tldr_entry(path: &Path, index: usize, post: &str, value: &Value, allow_empty: bool) -> Result<ScoredGroup, DataError> {
    let at = Position::Entry(index);
    let err = |field: String, p| DataError::row(path, at.clone(), Some(&field), p);
    if post.trim().is_empty() {
        return Err(err("post".into(), RowProblem::EmptyText));
    }
    let Value::Object(obj) = value else {
        return Err(DataError::row(path, at.clone(), None, RowProblem::NotAnObject(type_name(value))));
    };
    let list = |k: &str| match obj.get(k) {
        Some(Value::Array(a)) => Ok(a),
        None | Some(Value::Null) => Err(err(k.into(), RowProblem::Missing)),
        Some(o) => Err(err(k.into(), RowProblem::WrongType { expected: "a list", got: type_name(o) })),
    };
    let responses = list("responses")?;
    let rewards = list("rewards")?;
    if responses.len() != rewards.len() {
        return Err(err(
            "rewards".into(),
            RowProblem::LengthMismatch { responses: responses.len(), rewards: rewards.len() },
        ));
    }
    let mut out = Vec::with_capacity(responses.len());
    for (i, (r, s)) in responses.iter().zip(rewards).enumerate() {
        let text = match r {
            Value::String(t) if t.trim().is_empty() && !allow_empty => {
                return Err(err(format!("responses[{i}]"), RowProblem::EmptyCompletion));
            }
            Value::String(t) => Text::Plain(t.clone()),
            o => {
                let got = type_name(o);
                return Err(err(format!("responses[{i}]"), RowProblem::WrongType { expected: "a string", got }));
            }
        };
        let score = match s {
            Value::Number(n) => match n.as_f64() {
                Some(x) if x.is_finite() => x,
                _ => return Err(err(format!("rewards[{i}]"), RowProblem::NotFinite(n.to_string()))),
            },
            o => {
                let got = type_name(o);
                return Err(err(format!("rewards[{i}]"), RowProblem::WrongType { expected: "a number", got }));
            }
        };
        out.push(ScoredResponse { text, score, position: at.clone() });
    }
    Ok(ScoredGroup { prompt: Text::Plain(format!("{post}{TLDR_SUFFIX}")), responses: out })
}

/// Reads a TL;DR file (bytes already read). A file that is not one JSON object stops whatever the bad-row
/// policy (there is no next row to go on with); a bad entry follows the policy.
pub fn read_tldr(path: &Path, bytes: &[u8], bad: &mut BadRows) -> Result<Vec<ScoredGroup>, DataError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let (line, column) = line_col(bytes, e.valid_up_to());
        DataError::row(path, Position::Line { line, column: Some(column) }, None, RowProblem::InvalidUtf8(column - 1))
    })?;
    let entries: Entries = serde_json::from_str(text).map_err(|e| {
        // serde_json gives column 0 when the error is not at a character (a type error on the whole value).
        let at = Position::Line { line: e.line(), column: (e.column() > 0).then_some(e.column()) };
        DataError::row(path, at, None, RowProblem::MalformedJson(json_message(&e, text)))
    })?;
    let mut g = Grouper::default();
    for (i, (post, value)) in entries.0.iter().enumerate() {
        if let Some(group) = bad.handle(parse_tldr_entry(path, i, post, value, bad.allow_empty_completions))? {
            for r in group.responses {
                g.push(group.prompt.clone(), r);
            }
        }
    }
    Ok(g.groups)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::config::OnBadRow;

    #[test]
    fn tldr_entries_keep_file_order_and_suffix() {
        let f = br#"{"zeta post": {"responses": [" a", " b"], "rewards": [1, 7]}, "alpha post": {"responses": [" c"], "rewards": [3]}}"#;
        let g = read_tldr(Path::new("t.json"), f, &mut BadRows::new(OnBadRow::Error)).unwrap();
        assert_eq!(g[0].prompt, Text::Plain("zeta post\n\nTL;DR:".into()));
        assert_eq!(g[1].responses[0].score, 3.0);
    }

    #[test]
    fn tldr_errors_name_entry_and_field() {
        let f = br#"{"p": {"responses": [" a", " b"], "rewards": [1, "7"]}}"#;
        let e = read_tldr(Path::new("t.json"), f, &mut BadRows::new(OnBadRow::Error)).unwrap_err();
        assert_eq!(e.to_string(), "t.json: entry 0, field `rewards[1]`: expected a number, got a string");
        let f = b"{\"p\": {\"responses\": [],\n \"rewards\": [1,]}}";
        let e = read_tldr(Path::new("t.json"), f, &mut BadRows::new(OnBadRow::Skip)).unwrap_err();
        assert_eq!(e.to_string(), "t.json: line 2, column 16: malformed JSON: trailing comma");
    }
}
