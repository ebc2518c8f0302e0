//! A corpus of broken files (tests/fixtures/broken/), each with the exact error message it must give, and the
//! skip policy's report on them.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use odpo_data::{DataConfig, Format, OnBadRow, load};
use odpo_loss::offset::OffsetConfig;

const DIR: &str = "tests/fixtures/broken";

fn cfg(file: &str, format: Format) -> DataConfig {
    DataConfig::new(PathBuf::from(DIR).join(file), format)
}

fn error_of(c: &DataConfig) -> String {
    match load(c) {
        Ok(l) => panic!("{} loaded {} pairs, expected an error", c.path.display(), l.pairs.len()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn each_broken_file_gives_its_message() {
    use Format::*;
    let cases: &[(&str, Format, &str)] = &[
        ("malformed.jsonl", Jsonl, "line 2, column 44: malformed JSON: expected value"),
        ("missing_field.jsonl", Jsonl, "line 1, field `rejected`: missing"),
        ("mistyped.jsonl", Jsonl, "line 3, field `chosen`: expected a string or a list of chat messages, got a number"),
        ("empty_text.jsonl", Jsonl, "line 1, field `chosen`: empty response (set `allow_empty_completions = true` if empty responses are real data)"),
        ("empty_prompt.jsonl", Jsonl, "line 1, field `prompt`: empty text"),
        ("not_object.jsonl", Jsonl, "line 1: expected a JSON object, got a list"),
        (
            "inverted.jsonl",
            Jsonl,
            "line 1, field `score_chosen`: score_chosen 1.5 is below score_rejected 2: the pair contradicts its scores",
        ),
        ("one_score.jsonl", Jsonl, "line 1, field `score_rejected`: missing"),
        ("score_string.jsonl", Jsonl, "line 1, field `score_chosen`: expected a number, got a string"),
        ("prompt_only_messages.jsonl", Jsonl, "line 1, field `chosen`: the messages hold only the prompt, no response"),
        ("message_not_object.jsonl", Jsonl, "line 1, field `chosen[0]`: expected a chat message object, got a string"),
        ("invalid_utf8.jsonl", Jsonl, "line 2: invalid UTF-8 at byte 30 of the line"),
        (
            "nan_reward.jsonl",
            ScoredJsonl,
            "line 2, column 40: malformed JSON: expected value (NaN and Infinity are not JSON: a score must be a finite number)",
        ),
        ("huge_reward.jsonl", ScoredJsonl, "line 1, column 44: malformed JSON: number out of range"),
        ("missing_reward.jsonl", ScoredJsonl, "line 1, field `reward`: missing"),
        ("tldr_mismatch.json", TldrJson, "entry 1, field `rewards`: 2 responses but 1 rewards"),
        ("tldr_truncated.json", TldrJson, "line 2, column 32: malformed JSON: EOF while parsing a list"),
        ("tldr_not_object.json", TldrJson, "entry 0: expected a JSON object, got a list"),
        ("tldr_empty_response.json", TldrJson, "entry 0, field `responses[1]`: empty response (set `allow_empty_completions = true` if empty responses are real data)"),
        (
            "tldr_array.json",
            TldrJson,
            "line 1: malformed JSON: invalid type: sequence, expected an object mapping each post to its responses and rewards",
        ),
        ("tldr_invalid_utf8.json", TldrJson, "line 2, column 19: invalid UTF-8 at byte 18 of the line"),
    ];
    let mut wrong = Vec::new();
    for (file, format, expected) in cases {
        let expected = format!("{DIR}/{file}: {expected}");
        let got = error_of(&cfg(file, *format));
        if got != expected {
            wrong.push(format!("{file}\n  expected: {expected}\n  got:      {got}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn whole_file_errors() {
    let e = error_of(&cfg("garbage.parquet", Format::Parquet));
    assert!(e.starts_with(&format!("{DIR}/garbage.parquet: whole file: cannot read parquet: ")), "{e}");
    let e = error_of(&cfg("no_such_file.jsonl", Format::Jsonl));
    assert_eq!(e, format!("{DIR}/no_such_file.jsonl: cannot read: No such file or directory (os error 2)"));
    assert_eq!(
        "xml".parse::<Format>().unwrap_err().to_string(),
        "unknown data format `xml`; known formats: jsonl, parquet, scored-jsonl, tldr-json"
    );
}

#[test]
fn skip_reports_each_row_and_the_totals() {
    let mut c = cfg("mistyped.jsonl", Format::Jsonl);
    c.on_bad_row = OnBadRow::Skip;
    let l = load(&c).unwrap();
    assert_eq!(l.pairs.len(), 2);
    assert_eq!(
        l.report.skipped,
        vec![format!(
            "{DIR}/mistyped.jsonl: line 3, field `chosen`: expected a string or a list of chat messages, got a number"
        )]
    );
    // A file whose every row is bad leaves nothing: that is an error even when skipping.
    let mut c = cfg("empty_text.jsonl", Format::Jsonl);
    c.on_bad_row = OnBadRow::Skip;
    assert_eq!(
        error_of(&c),
        format!("{DIR}/empty_text.jsonl: no preference pairs left (0 rows used, 1 skipped, 0 ties, 0 prompts with one response)")
    );
    // Bad lines in the middle of a scored file: the rest of the prompt's group stays.
    let mut c = cfg("nan_reward.jsonl", Format::ScoredJsonl);
    c.on_bad_row = OnBadRow::Skip;
    c.offset = Some(OffsetConfig::default());
    assert!(error_of(&c).ends_with("(1 rows used, 1 skipped, 0 ties, 1 prompts with one response)"));
    // Skipping never hides a file that cannot be read as a whole.
    let mut c = cfg("tldr_truncated.json", Format::TldrJson);
    c.on_bad_row = OnBadRow::Skip;
    assert!(error_of(&c).contains("malformed JSON: EOF while parsing a list"));
}
