//! The documentation keeps up with the code: every key of a run config (`RunConfig`, with odpo-data's
//! `[data]` and odpo-loss's `[loss]` tables) is documented in docs/config.md with every value its enums
//! accept, and every objective serde accepts has its row in docs/losses.md. The keys are read from the
//! config structs themselves (a tracing serde `Deserializer`), so a new field fails here until documented.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/serde_keys.rs"]
mod serde_keys;

use odpo_loss::LossKind;
use odpo_trainer::RunConfig;
use serde_keys::{keys_of, undocumented};

const CONFIG_DOC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/config.md"));
const LOSSES_DOC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/losses.md"));

#[test]
fn every_run_config_key_is_in_docs_config_md() {
    let keys = keys_of::<RunConfig>();
    // The trace reaches the nested tables.
    for k in ["model.path", "data.offset.alpha", "data.columns.prompt", "loss.beta", "optim.lr", "train.batch_size", "eval.every", "output.dir"] {
        assert!(keys.keys.contains(k), "the trace missed `{k}`: {:?}", keys.keys);
    }
    let missing = undocumented(&keys, "", CONFIG_DOC);
    assert!(missing.is_empty(), "docs/config.md does not document:\n  {}", missing.join("\n  "));
}

#[test]
fn pairing_strategies_are_in_docs_config_md() {
    // `data.pairing` is an internally tagged enum, which the trace cannot enter: list it here. The match
    // stops compiling when a strategy is added.
    let all = [
        odpo_data::Pairing::AllPairs,
        odpo_data::Pairing::BestVsWorst,
        odpo_data::Pairing::FirstTwo,
        odpo_data::Pairing::RandomK { k: 2 },
    ];
    for p in all {
        match p {
            odpo_data::Pairing::AllPairs | odpo_data::Pairing::BestVsWorst | odpo_data::Pairing::FirstTwo | odpo_data::Pairing::RandomK { .. } => {}
        }
        let v = serde_json::to_value(p).unwrap();
        let strategy = v["strategy"].as_str().unwrap().to_string();
        let line = CONFIG_DOC.lines().find(|l| l.contains("`data.pairing.strategy`")).expect("docs/config.md documents `data.pairing.strategy`");
        assert!(line.contains(&strategy), "docs/config.md: `data.pairing.strategy` does not list `{strategy}`");
        for key in v.as_object().unwrap().keys().filter(|k| *k != "strategy") {
            assert!(CONFIG_DOC.contains(&format!("`data.pairing.{key}`")), "docs/config.md does not document `data.pairing.{key}`");
        }
    }
}

#[test]
fn every_objective_serde_accepts_has_a_row_in_docs_losses_md() {
    // The spellings come from serde (the enum's own variant list, aliases included), not from `LossKind::ALL`.
    let keys = keys_of::<LossKind>();
    let mut kinds = std::collections::BTreeSet::new();
    for name in &keys.enums[""] {
        let kind: LossKind = serde_json::from_value(serde_json::json!(name)).unwrap();
        assert!(LossKind::ALL.contains(&kind), "LossKind::ALL is missing `{kind}`");
        assert!(LOSSES_DOC.contains(&format!("| `{}` |", kind.name())), "docs/losses.md has no row for objective `{kind}`");
        kinds.insert(kind.name());
    }
    assert_eq!(kinds.len(), LossKind::ALL.len());
    let line = CONFIG_DOC.lines().find(|l| l.contains("`loss.loss_type`")).expect("docs/config.md documents `loss.loss_type`");
    assert!(line.contains("losses.md"), "the `loss.loss_type` row should point to docs/losses.md");
}
