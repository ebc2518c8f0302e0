//! Repository rules for this crate: every source file opens with `//!`, and docs/losses.md has a row for
//! every `LossKind` and a definition for every metric.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use odpo_loss::{LossKind, Metrics};

const DOC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/losses.md"));

#[test]
fn every_loss_kind_has_a_row_in_docs_losses_md() {
    for kind in LossKind::ALL {
        let row = format!("| `{}` |", kind.name());
        assert!(DOC.contains(&row), "docs/losses.md has no row `{row}`");
    }
}

#[test]
fn every_metric_is_defined_in_docs_losses_md() {
    for name in Metrics::NAMES.into_iter().chain([Metrics::WPO_WEIGHT]) {
        assert!(
            DOC.contains(&format!("| `{name}` |")),
            "docs/losses.md does not define `{name}`"
        );
    }
}

#[test]
fn every_source_file_opens_with_a_module_doc() {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                text.starts_with("//!"),
                "{} does not start with `//!`",
                path.display()
            );
        }
    }
}
