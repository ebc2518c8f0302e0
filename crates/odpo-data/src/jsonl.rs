//! JSONL in HF's preference layout: one object a line with `prompt`, `chosen`, `rejected` (strings or chat
//! message lists), optional scores and weight. Also the field readers every format shares (parquet rows are
//! turned into the same JSON objects).

use std::path::Path;

use odpo_model::tokenizer::ChatMessage;
use serde_json::{Map, Value};

use crate::config::{Columns, OnBadRow};
use crate::error::{DataError, Position, RowProblem};
use crate::pairs::{PairRow, Text};

/// The row policy readers follow: the collector of bad rows, which stops at the first one or records each and
/// goes on, and whether empty responses are data.
#[derive(Debug)]
pub struct BadRows {
    policy: OnBadRow,
    /// Accept empty responses (a model that ended at once); prompts must never be empty.
    pub allow_empty_completions: bool,
    /// The message of every skipped row, in file order.
    pub skipped: Vec<String>,
}

impl BadRows {
    /// A collector with the given policy.
    pub fn new(policy: OnBadRow) -> Self {
        BadRows { policy, allow_empty_completions: false, skipped: Vec::new() }
    }

    /// The same collector, accepting empty responses or not.
    pub fn with_empty_completions(mut self, allow: bool) -> Self {
        self.allow_empty_completions = allow;
        self
    }

    /// Passes a good row through; a bad one is returned as the error or recorded and skipped.
    pub fn handle<T>(&mut self, row: Result<T, DataError>) -> Result<Option<T>, DataError> {
        match (row, self.policy) {
            (Ok(v), _) => Ok(Some(v)),
            (Err(e @ DataError::Row { .. }), OnBadRow::Skip) => {
                tracing::warn!("skipping bad row: {e}");
                self.skipped.push(e.to_string());
                Ok(None)
            }
            (Err(e), _) => Err(e),
        }
    }
}

/// The JSON type of a value, as error messages name it.
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A field problem: the field's name and what is wrong.
pub(crate) type FieldError = (String, RowProblem);

fn field_err(field: &str, p: RowProblem) -> FieldError {
    (field.to_owned(), p)
}

/// A required text field: a non-empty string or a non-empty list of `{role, content}` messages.
pub(crate) fn get_text(obj: &Map<String, Value>, field: &str) -> Result<Text, FieldError> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(field_err(field, RowProblem::Missing)),
        Some(v) => parse_text(v).map_err(|(sub, p)| (format!("{field}{sub}"), p)),
    }
}

/// A required response field: like [`get_text`], but an empty string is an empty response, accepted when
/// `allow_empty`.
pub(crate) fn get_completion(obj: &Map<String, Value>, field: &str, allow_empty: bool) -> Result<Text, FieldError> {
    match obj.get(field) {
        Some(Value::String(s)) if s.trim().is_empty() => plain_completion(s, field, allow_empty),
        _ => get_text(obj, field),
    }
}

/// A response's text, refused when it is empty (or only whitespace) unless `allow_empty`.
fn plain_completion(s: &str, field: &str, allow_empty: bool) -> Result<Text, FieldError> {
    if s.trim().is_empty() && !allow_empty { Err(field_err(field, RowProblem::EmptyCompletion)) } else { Ok(Text::Plain(s.to_owned())) }
}

/// A text value; the error's string is a suffix for the field name (`[2].content`).
fn parse_text(v: &Value) -> Result<Text, (String, RowProblem)> {
    const EXPECTED: &str = "a string or a list of chat messages";
    match v {
        Value::String(s) if s.trim().is_empty() => Err((String::new(), RowProblem::EmptyText)),
        Value::String(s) => Ok(Text::Plain(s.clone())),
        Value::Array(items) if items.is_empty() => Err((String::new(), RowProblem::EmptyText)),
        Value::Array(items) => {
            let mut msgs = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let Value::Object(m) = item else {
                    let got = type_name(item);
                    return Err((format!("[{i}]"), RowProblem::WrongType { expected: "a chat message object", got }));
                };
                let s = |k: &str| match m.get(k) {
                    Some(Value::String(s)) => Ok(s.clone()),
                    None | Some(Value::Null) => Err((format!("[{i}].{k}"), RowProblem::Missing)),
                    Some(o) => Err((format!("[{i}].{k}"), RowProblem::WrongType { expected: "a string", got: type_name(o) })),
                };
                let role = s("role")?;
                let content = s("content")?;
                if role.trim().is_empty() {
                    return Err((format!("[{i}].role"), RowProblem::EmptyText));
                }
                msgs.push(ChatMessage { role, content });
            }
            Ok(Text::Messages(msgs))
        }
        other => Err((String::new(), RowProblem::WrongType { expected: EXPECTED, got: type_name(other) })),
    }
}

/// An optional finite number; `null` counts as absent.
pub(crate) fn get_number(obj: &Map<String, Value>, field: &str) -> Result<Option<f64>, FieldError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(field_err(field, RowProblem::NotFinite(n.to_string()))),
        },
        Some(o) => Err(field_err(field, RowProblem::WrongType { expected: "a number", got: type_name(o) })),
    }
}

/// A required finite number.
pub(crate) fn require_number(obj: &Map<String, Value>, field: &str) -> Result<f64, FieldError> {
    get_number(obj, field)?.ok_or_else(|| field_err(field, RowProblem::Missing))
}

/// Removes from a message-list completion the copy of the prompt that HF datasets put in front of it
/// (UltraFeedback's `chosen` holds the user turn, then the assistant turn). A lone assistant message becomes
/// its plain content. After a prompt that ends in a user turn (a string is one), a response that begins
/// with a user or system turn is refused: its messages hold a prompt that is not the row's (a copy that
/// differs, if only in a space), which would otherwise be trained as part of the response.
pub(crate) fn strip_prompt(prompt: &Text, completion: Text, field: &str, allow_empty: bool) -> Result<Text, FieldError> {
    let Text::Messages(msgs) = completion else { return Ok(completion) };
    let skip = match prompt {
        Text::Plain(p) if msgs.first().is_some_and(|m| m.role == "user" && m.content == *p) => 1,
        Text::Messages(pm) if msgs.len() >= pm.len() && msgs[..pm.len()] == pm[..] => pm.len(),
        _ => 0,
    };
    let rest = &msgs[skip..];
    let asks = match prompt {
        Text::Plain(_) => true,
        Text::Messages(pm) => pm.last().is_some_and(|m| m.role == "user"),
    };
    if let Some(m) = rest.first().filter(|m| asks && (m.role == "user" || m.role == "system")) {
        let why = format!(
            "a {} turn where the response should begin: the messages do not begin with the row's prompt, so this turn would be trained as part of the response; correct the prompt, or leave the prompt out to take the one the two message lists share (as TRL does)",
            m.role
        );
        return Err((format!("{field}[{skip}]"), RowProblem::BadMessages(why)));
    }
    match rest {
        [] => Err(field_err(field, RowProblem::BadMessages("the messages hold only the prompt, no response".into()))),
        [m] if m.role == "assistant" => plain_completion(&m.content, &format!("{field}[{skip}].content"), allow_empty),
        _ => Ok(Text::Messages(rest.to_vec())),
    }
}

/// The prompt that a row without one shares between its chosen and rejected texts, and the two
/// responses after it: TRL's implicit prompt (`trl.data_utils.extract_prompt`), as in Anthropic's
/// hh-rlhf, where both sides hold the whole conversation.
///
/// Texts are compared character by character, message lists message by message; the prompt ends at
/// the first difference, or one character earlier when that one is a space (the space starts the
/// responses). When one side is a start of the other, the prompt is all but the shorter side's last
/// character (or message), as TRL's loop leaves it. A list's remaining messages are read as an
/// explicit prompt's are ([`strip_prompt`]: a lone assistant message is its content). Sides that
/// differ from their first character hold no prompt: the row is refused.
pub(crate) fn implicit_prompt(chosen: Text, rejected: Text, cols: &Columns, allow_empty: bool) -> Result<(Text, Text, Text), FieldError> {
    let no_start = || field_err(&cols.prompt, RowProblem::NoSharedStart);
    match (chosen, rejected) {
        (Text::Plain(c), Text::Plain(r)) => {
            // The byte where the responses start: the first difference, else the shorter side's last
            // character; a space before a difference goes with the responses.
            let mut last = None;
            let mut cut = None;
            for ((i, a), (_, b)) in c.char_indices().zip(r.char_indices()) {
                if a != b {
                    cut = Some(match last {
                        Some((j, ' ')) => j,
                        _ => i,
                    });
                    break;
                }
                last = Some((i, a));
            }
            let cut = cut.or(last.map(|(j, _)| j)).unwrap_or(0);
            let prompt = &c[..cut];
            if prompt.trim().is_empty() {
                return Err(no_start());
            }
            let (chosen, rejected) = (plain_completion(&c[cut..], &cols.chosen, allow_empty)?, plain_completion(&r[cut..], &cols.rejected, allow_empty)?);
            Ok((Text::Plain(prompt.to_owned()), chosen, rejected))
        }
        (Text::Messages(c), Text::Messages(r)) => {
            let shared = c.iter().zip(&r).position(|(a, b)| a != b).unwrap_or(c.len().min(r.len()).saturating_sub(1));
            if shared == 0 {
                return Err(no_start());
            }
            let prompt = Text::Messages(c[..shared].to_vec());
            let chosen = strip_prompt(&prompt, Text::Messages(c), &cols.chosen, allow_empty)?;
            let rejected = strip_prompt(&prompt, Text::Messages(r), &cols.rejected, allow_empty)?;
            Ok((prompt, chosen, rejected))
        }
        (c, r) => {
            let kind = |t: &Text| if matches!(t, Text::Plain(_)) { "a string" } else { "a list of chat messages" };
            let why = format!("{} where the chosen response is {}: a prompt implicit in both (the row has no prompt) needs them of one kind", kind(&r), kind(&c));
            Err(field_err(&cols.rejected, RowProblem::BadMessages(why)))
        }
    }
}

/// Parses one pair object with the configured columns. A row without a prompt (absent or `null`)
/// takes the start its chosen and rejected texts share ([`implicit_prompt`]).
pub(crate) fn pair_from_object(
    obj: &Map<String, Value>,
    cols: &Columns,
    allow_empty: bool,
    position: Position,
) -> Result<PairRow, FieldError> {
    let implicit = matches!(obj.get(&cols.prompt), None | Some(Value::Null));
    let (prompt, chosen, rejected) = if implicit {
        implicit_prompt(get_text(obj, &cols.chosen)?, get_text(obj, &cols.rejected)?, cols, allow_empty)?
    } else {
        let prompt = get_text(obj, &cols.prompt)?;
        let chosen = strip_prompt(&prompt, get_completion(obj, &cols.chosen, allow_empty)?, &cols.chosen, allow_empty)?;
        let rejected = strip_prompt(&prompt, get_completion(obj, &cols.rejected, allow_empty)?, &cols.rejected, allow_empty)?;
        (prompt, chosen, rejected)
    };
    let score_chosen = get_number(obj, &cols.score_chosen)?;
    let score_rejected = get_number(obj, &cols.score_rejected)?;
    match (score_chosen, score_rejected) {
        (Some(_), None) => return Err(field_err(&cols.score_rejected, RowProblem::Missing)),
        (None, Some(_)) => return Err(field_err(&cols.score_chosen, RowProblem::Missing)),
        (Some(c), Some(r)) if c < r => {
            return Err(field_err(&cols.score_chosen, RowProblem::Inverted { chosen: c, rejected: r }));
        }
        _ => {}
    }
    let weight = match &cols.weight {
        Some(w) => {
            let x = require_number(obj, w)?;
            if x < 0.0 {
                return Err(field_err(w, RowProblem::NegativeWeight(x)));
            }
            Some(x)
        }
        None => None,
    };
    Ok(PairRow { prompt, chosen, rejected, score_chosen, score_rejected, weight, implicit_prompt: implicit, position })
}

/// The lines of a text file with 1-based numbers, `\r\n` tolerated, a leading UTF-8 BOM removed; blank lines
/// are left out.
pub(crate) fn lines(bytes: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    bytes.split(|&b| b == b'\n').enumerate().filter_map(|(i, l)| {
        let l = l.strip_suffix(b"\r").unwrap_or(l);
        if l.iter().all(u8::is_ascii_whitespace) { None } else { Some((i + 1, l)) }
    })
}

/// Decodes one line into a JSON object, with the line's position in any error.
pub(crate) fn parse_object(path: &Path, line_no: usize, line: &[u8]) -> Result<Map<String, Value>, DataError> {
    let at = |column| Position::Line { line: line_no, column };
    let text = std::str::from_utf8(line)
        .map_err(|e| DataError::row(path, at(None), None, RowProblem::InvalidUtf8(e.valid_up_to())))?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(DataError::row(path, at(None), None, RowProblem::NotAnObject(type_name(&other)))),
        Err(e) => Err(DataError::row(path, at((e.column() > 0).then_some(e.column())), None, RowProblem::MalformedJson(json_message(&e, text)))),
    }
}

/// serde_json's message without its own " at line L column C" (the location says it), with a hint for the
/// non-JSON `NaN`/`Infinity` that Python's `json` writes for non-finite floats.
pub(crate) fn json_message(e: &serde_json::Error, text: &str) -> String {
    let full = e.to_string();
    let mut msg = match full.rfind(" at line ") {
        Some(i) => full[..i].to_owned(),
        None => full,
    };
    if e.is_syntax() && (text.contains("NaN") || text.contains("Infinity")) {
        msg.push_str(" (NaN and Infinity are not JSON: a score must be a finite number)");
    }
    msg
}

/// Parses one JSONL line of HF pair layout (`allow_empty`: accept empty responses).
pub fn parse_pair_line(path: &Path, line_no: usize, line: &[u8], cols: &Columns, allow_empty: bool) -> Result<PairRow, DataError> {
    let obj = parse_object(path, line_no, line)?;
    let position = Position::Line { line: line_no, column: None };
    pair_from_object(&obj, cols, allow_empty, position.clone())
        .map_err(|(field, p)| DataError::row(path, position, Some(&field), p))
}

/// Reads a JSONL file of pairs (bytes already read), applying the bad-row policy.
pub fn read_pairs(path: &Path, bytes: &[u8], cols: &Columns, bad: &mut BadRows) -> Result<Vec<PairRow>, DataError> {
    let mut out = Vec::new();
    for (n, line) in lines(bytes) {
        if let Some(row) = bad.handle(parse_pair_line(path, n, line, cols, bad.allow_empty_completions))? {
            out.push(row);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(line: &str) -> Result<PairRow, String> {
        parse_pair_line(Path::new("f.jsonl"), 4, line.as_bytes(), &Columns::default(), false).map_err(|e| e.to_string())
    }

    #[test]
    fn reads_strings_and_ultrafeedback_messages() {
        let r = parse(r#"{"prompt":"hi","chosen":"a","rejected":"b","score_chosen":7,"score_rejected":2.5}"#).unwrap();
        assert_eq!(r.chosen, Text::Plain("a".into()));
        assert_eq!((r.score_chosen, r.score_rejected), (Some(7.0), Some(2.5)));
        let r = parse(
            r#"{"prompt":"hi","chosen":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}],
                "rejected":[{"role":"user","content":"hi"},{"role":"assistant","content":"no"}]}"#
                .replace('\n', " ")
                .as_str(),
        )
        .unwrap();
        assert_eq!((r.chosen, r.rejected), (Text::Plain("yo".into()), Text::Plain("no".into())));
    }

    /// A JSON text or message list as odpo reads a response: a lone assistant message is its content.
    fn text_of(v: &Value) -> Text {
        match parse_text(v).unwrap() {
            Text::Messages(m) if m.len() == 1 && m[0].role == "assistant" => Text::Plain(m[0].content.clone()),
            t => t,
        }
    }

    /// Rows without a prompt come out as TRL's DPOTrainer reads them (`maybe_extract_prompt`, whose
    /// outputs `tests/fixtures/make_implicit_prompt.py` wrote with trl 1.16.0), or are refused where
    /// TRL would go on with a blank prompt or one cut from the chosen text's end.
    #[test]
    fn rows_without_a_prompt_take_trls_implicit_prompt() {
        let cases = include_str!("../tests/fixtures/implicit_prompt.jsonl");
        let (mut pairs, mut refused) = (0, 0);
        for (i, case) in cases.lines().enumerate() {
            let case: Value = serde_json::from_str(case).unwrap();
            let line = serde_json::to_string(&case["row"]).unwrap();
            let got = parse(&line);
            if case["odpo"] == "refused" {
                let err = got.err().unwrap_or_else(|| panic!("case {i} ({line}) was read; it must be refused"));
                assert!(err.starts_with("f.jsonl: line 4, field `prompt`: missing, and the chosen and rejected responses share no start"), "case {i}: {err}");
                refused += 1;
                continue;
            }
            let row = got.unwrap_or_else(|e| panic!("case {i} ({line}): {e}"));
            let trl = &case["trl"];
            let prompt = parse_text(&trl["prompt"]).unwrap();
            assert_eq!((&row.prompt, &row.chosen, &row.rejected), (&prompt, &text_of(&trl["chosen"]), &text_of(&trl["rejected"])), "case {i}: {line}");
            assert!(row.implicit_prompt);
            pairs += 1;
        }
        assert_eq!((pairs, refused), (12, 4));
    }

    /// A prompt the messages repeat with a difference (here a trailing space) is not taken for a
    /// response's first turn.
    #[test]
    fn a_response_may_not_begin_with_a_turn_that_asks() {
        let why = "a user turn where the response should begin: the messages do not begin with the row's prompt, so this turn would be trained as part of the response; correct the prompt, or leave the prompt out to take the one the two message lists share (as TRL does)";
        assert_eq!(
            parse(r#"{"prompt":"hi","chosen":[{"role":"user","content":"hi "},{"role":"assistant","content":"yo"}],"rejected":"no"}"#).unwrap_err(),
            format!("f.jsonl: line 4, field `chosen[0]`: {why}")
        );
        let prompt = r#"[{"role":"system","content":"Be brief."},{"role":"user","content":"hi"}]"#;
        let chosen = r#"[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]"#;
        assert_eq!(
            parse(&format!(r#"{{"prompt":{prompt},"chosen":{chosen},"rejected":"no"}}"#)).unwrap_err(),
            format!("f.jsonl: line 4, field `chosen[0]`: {why}")
        );
        // Without the prompt, the two lists' shared start is the prompt.
        let r = parse(r#"{"chosen":[{"role":"system","content":"Be brief."},{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}],"rejected":[{"role":"system","content":"Be brief."},{"role":"user","content":"hi"},{"role":"assistant","content":"no"}]}"#).unwrap();
        assert_eq!((r.chosen, r.rejected), (Text::Plain("yo".into()), Text::Plain("no".into())));
        // After a prompt that ends in the assistant's turn, the next user turn is the response's.
        let p = r#"[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]"#;
        let r = parse(&format!(r#"{{"prompt":{p},"chosen":[{{"role":"user","content":"more"}},{{"role":"assistant","content":"ok"}}],"rejected":"no"}}"#)).unwrap();
        assert!(matches!(r.chosen, Text::Messages(m) if m.len() == 2));
    }

    #[test]
    fn an_implicit_prompt_needs_both_sides_of_one_kind_and_null_is_no_prompt() {
        assert_eq!(
            parse(r#"{"chosen":"Q: a","rejected":[{"role":"user","content":"Q: b"}]}"#).unwrap_err(),
            "f.jsonl: line 4, field `rejected`: a list of chat messages where the chosen response is a string: a prompt implicit in both (the row has no prompt) needs them of one kind"
        );
        let r = parse(r#"{"prompt":null,"chosen":"Q: yes","rejected":"Q: no"}"#).unwrap();
        assert_eq!((r.prompt, r.chosen, r.rejected, r.implicit_prompt), (Text::Plain("Q:".into()), Text::Plain(" yes".into()), Text::Plain(" no".into()), true));
        // A response left blank after the prompt is an empty response.
        assert_eq!(parse(r#"{"chosen":"Q: a  ","rejected":"Q: a  b"}"#).unwrap_err(), "f.jsonl: line 4, field `chosen`: empty response (set `allow_empty_completions = true` if empty responses are real data)");
        assert!(!parse(r#"{"prompt":"Q:","chosen":"a","rejected":"b"}"#).unwrap().implicit_prompt);
    }

    #[test]
    fn bad_rows_name_line_and_field() {
        assert_eq!(parse(r#"{"prompt":"hi","chosen":"a"}"#).unwrap_err(), "f.jsonl: line 4, field `rejected`: missing");
        assert_eq!(
            parse(r#"{"prompt":"hi","chosen":"a","rejected":"b","score_chosen":1,"score_rejected":NaN}"#).unwrap_err(),
            "f.jsonl: line 4, column 78: malformed JSON: expected value (NaN and Infinity are not JSON: a score must be a finite number)"
        );
        assert_eq!(
            parse(r#"{"prompt":"hi","chosen":[{"role":"user"}],"rejected":"b"}"#).unwrap_err(),
            "f.jsonl: line 4, field `chosen[0].content`: missing"
        );
    }
}
