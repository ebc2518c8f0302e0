//! Hostile configs and `--set` values through loading and validation: every key of a full run config
//! gets wrong types, huge, negative, zero and non-finite numbers, empty strings and unknown names;
//! malformed `--set` arguments; and the config files of `configs/` cut short and with bytes changed
//! at random. Nothing may panic, and every refusal must name the key (or, for a file that does not
//! parse, the line). The counts are printed for docs/reliability.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::panic::{AssertUnwindSafe, catch_unwind};

use odpo_trainer::RunConfig;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const VALUES: &[&str] = &[
    "\"\"",
    "\"no-such-name\"",
    "\"../../../../etc/passwd\"",
    "0",
    "-1",
    "-0.0",
    "1.5",
    "1e308",
    "-1e308",
    "nan",
    "inf",
    "-inf",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551616",
    "true",
    "[]",
    "[1, -2]",
    "[\"a\", 1]",
    "{}",
    "{ x = 1 }",
    "1979-05-27T07:32:00Z",
];

/// Every leaf key of a config, dotted, with a table's own key too.
fn keys(table: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    for (k, v) in table {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        if let toml::Value::Table(t) = v {
            keys(t, &key, out);
        }
        out.push(key);
    }
}

#[derive(Default, Debug)]
struct Tally {
    tried: usize,
    accepted: usize,
    refused_naming_it: usize,
    refused_otherwise: Vec<String>,
    panics: Vec<String>,
}

impl Tally {
    /// Prints the counts under `what` and fails on any panic or unnamed refusal.
    fn report(&self, what: &str) {
        println!(
            "{what}: {} tried, {} accepted, {} refused naming the key, line or argument, {} refused otherwise, {} panics",
            self.tried,
            self.accepted,
            self.refused_naming_it,
            self.refused_otherwise.len(),
            self.panics.len()
        );
        assert!(self.panics.is_empty(), "{what}: panics: {:?}", self.panics);
        assert!(self.refused_otherwise.is_empty(), "{what}: refusals that name neither the key nor the line:\n{}", self.refused_otherwise.join("\n"));
    }

    /// Loads `text` with `sets`; a refusal must mention one of `names`.
    fn check(&mut self, text: &str, sets: &[String], names: &[String]) {
        self.tried += 1;
        let what = format!("{sets:?}");
        match catch_unwind(AssertUnwindSafe(|| RunConfig::from_toml_str(text, "fuzz.toml", sets))) {
            Ok(Ok(_)) => {
                self.accepted += 1;
                if std::env::var_os("ODPO_FUZZ_SHOW_ACCEPTED").is_some() {
                    println!("accepted: {what}");
                }
            }
            Ok(Err(e)) => {
                let msg = e.to_string();
                if names.iter().any(|n| msg.contains(n.as_str())) {
                    self.refused_naming_it += 1;
                } else {
                    self.refused_otherwise.push(format!("{what}: {msg}"));
                }
            }
            Err(_) => self.panics.push(what),
        }
    }
}

fn base() -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::read_to_string(root.join("configs/smollm2-imdb-odpo.toml")).expect("configs/smollm2-imdb-odpo.toml")
}

#[test]
fn hostile_values_for_every_key_are_refused_by_name_without_panics() {
    let text = base();
    let full = RunConfig::from_toml_str(&text, "base.toml", &[]).expect("the base config loads");
    let table: toml::Table = toml::from_str(&full.to_toml().unwrap()).unwrap();
    let mut all = Vec::new();
    keys(&table, "", &mut all);
    // Keys the resolved config leaves out when unset, and ones that do not exist.
    for extra in ["lora.rank", "lora.alpha", "lora.targets", "optim.betas", "optim.alpha", "optim.momentum", "train.devices", "model.tokenizer", "data.columns.weight", "data.offset.function", "no_such_table.x", "train.no_such_key"] {
        if !all.iter().any(|k| k == extra) {
            all.push(extra.to_string());
        }
    }
    let mut tally = Tally::default();
    for key in &all {
        let last = key.rsplit('.').next().unwrap().to_string();
        for value in VALUES {
            tally.check(&text, &[format!("{key}={value}")], &[key.clone(), last.clone()]);
        }
    }
    tally.report(&format!("{} keys x {} values", all.len(), VALUES.len()));
    assert!(tally.refused_naming_it > tally.accepted, "{tally:?}");
}

#[test]
fn malformed_set_arguments_are_refused_by_name() {
    let text = base();
    let mut tally = Tally::default();
    for set in ["", "=", "==1", "optim.lr", "optim.lr=", ".lr=1", "optim..lr=1", "optim.lr.=1", "optim.lr.x=1", "optim=1", "train=[]", "model.path.x=\"a\"", "ö.ß=1", "optim.lr=1=2", "optim.lr=\"1e-3", "optim.lr=[1e-3"] {
        let names = vec![format!("--set {set}")];
        tally.check(&text, &[set.to_string()], &names);
    }
    tally.report("--set");
}

#[test]
fn config_files_cut_short_or_changed_at_random_never_panic() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut rng = StdRng::seed_from_u64(20261130);
    let mut tally = Tally::default();
    let mut files = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        files += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        let bytes = text.as_bytes();
        for i in 0..400 {
            let mut b = bytes.to_vec();
            if i % 4 == 0 {
                b.truncate(rng.random_range(0..bytes.len()));
            } else {
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..b.len());
                    const BYTES: &[u8] = b"=[]{}\"'.,#\n 0123456789-aeEnf";
                    b[at] = BYTES[rng.random_range(0..BYTES.len())];
                }
            }
            let mutated = String::from_utf8_lossy(&b).into_owned();
            // A refusal names a line (`fuzz.toml` + TOML's position) or a key (`config: ...`).
            tally.check(&mutated, &[], &["fuzz.toml".into(), "config: `".into()]);
        }
    }
    tally.report(&format!("{files} config files x 400 mutations"));
}
