//! Property-style fuzzing of the row parsers (the stand-in for the cargo-fuzz target in fuzz/, which needs
//! a nightly toolchain and cargo-fuzz): 100,000 random and mutated inputs, none of which may panic, and every
//! error must name the file and a position. `ODPO_FUZZ_CASES` changes the count.

use std::path::Path;

use odpo_data::config::{Columns, OnBadRow};
use odpo_data::jsonl::{BadRows, parse_pair_line};
use odpo_data::paper::{parse_scored_line, read_tldr};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SEEDS: &[&str] = &[
    r#"{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 7.5, "score_rejected": 2}"#,
    r#"{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "rejected": [{"role": "assistant", "content": "no"}]}"#,
    r#"{"prompt": "I found it", "text": "real shocking \u00e9", "reward": 1.990998387336731}"#,
    r#"{"post one": {"responses": [" a", " b"], "rewards": [1, 7]}, "post two": {"responses": [" c"], "rewards": [3]}}"#,
];

const TOKENS: &[&[u8]] = &[
    b"{", b"}", b"[", b"]", b"\"", b":", b",", b"NaN", b"-Infinity", b"1e999", b"null", b"true", b"\\u", b"\\ud800",
    b"\xff", b"\xc3", b"\n", b"\"role\"", b"\"content\"", b"\"chosen\"", b"\"rewards\"", b"-0", b"1.5", b"\"\"",
];

fn mutate(rng: &mut StdRng, mut v: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.random_range(1..6) {
        let pos = if v.is_empty() { 0 } else { rng.random_range(0..=v.len()) };
        match rng.random_range(0..6) {
            0 if !v.is_empty() && pos < v.len() => v[pos] = rng.random(),
            1 if pos < v.len() => {
                v.remove(pos);
            }
            2 => v.truncate(pos),
            3 => {
                let t = TOKENS[rng.random_range(0..TOKENS.len())];
                v.splice(pos..pos, t.iter().copied());
            }
            4 if pos < v.len() => {
                let end = rng.random_range(pos..=v.len());
                let chunk = v[pos..end].to_vec();
                v.splice(pos..pos, chunk);
            }
            _ => v.insert(pos.min(v.len()), rng.random_range(0x20..0x7f)),
        }
    }
    v
}

#[test]
fn row_parsers_never_panic() {
    let cases: usize = std::env::var("ODPO_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let mut rng = StdRng::seed_from_u64(0x0d90);
    let cols = Columns::default();
    let weighted = Columns { weight: Some("score_chosen".into()), ..Columns::default() };
    let path = Path::new("fuzz.jsonl");
    let (mut ok, mut err) = (0usize, 0usize);
    for i in 0..cases {
        let input = if i % 10 == 0 {
            let n = rng.random_range(0..64);
            (0..n).map(|_| rng.random()).collect()
        } else {
            mutate(&mut rng, SEEDS[i % SEEDS.len()].as_bytes().to_vec())
        };
        let results = [
            parse_pair_line(path, 1, &input, &cols, i % 2 == 0).map(|_| ()),
            parse_pair_line(path, 1, &input, &weighted, false).map(|_| ()),
            parse_scored_line(path, 1, &input, &cols, i % 3 == 0).map(|_| ()),
            read_tldr(path, &input, &mut BadRows::new(OnBadRow::Skip).with_empty_completions(i % 2 == 1)).map(|_| ()),
        ];
        for r in results {
            match r {
                Ok(()) => ok += 1,
                Err(e) => {
                    err += 1;
                    let m = e.to_string();
                    assert!(m.starts_with("fuzz.jsonl: "), "{m}");
                }
            }
        }
    }
    eprintln!("{cases} inputs, {} parser calls: {ok} accepted, {err} rejected with a located error", ok + err);
    assert!(ok > 0 && err > 0);
}
