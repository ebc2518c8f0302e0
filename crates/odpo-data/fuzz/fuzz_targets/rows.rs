//! Fuzz target: every row parser on arbitrary bytes. Any panic is a bug; errors are expected.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use odpo_data::config::{Columns, OnBadRow};
use odpo_data::jsonl::{BadRows, parse_pair_line, read_pairs};
use odpo_data::paper::{parse_scored_line, read_scored_jsonl, read_tldr};

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz");
    let cols = Columns::default();
    let weighted = Columns { weight: Some("w".into()), ..Columns::default() };
    let allow = data.first().is_some_and(|b| b & 1 == 1);
    let _ = parse_pair_line(path, 1, data, &cols, allow);
    let _ = parse_pair_line(path, 1, data, &weighted, !allow);
    let _ = parse_scored_line(path, 1, data, &cols, allow);
    let _ = read_pairs(path, data, &cols, &mut BadRows::new(OnBadRow::Skip));
    let _ = read_scored_jsonl(path, data, &cols, &mut BadRows::new(OnBadRow::Skip));
    let _ = read_tldr(path, data, &mut BadRows::new(OnBadRow::Skip).with_empty_completions(allow));
});
