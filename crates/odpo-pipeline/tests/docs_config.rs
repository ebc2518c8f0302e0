//! Every key of the pipeline, frontier and experiment configs is documented in its section of docs/config.md (the
//! keys are read from the structs by a tracing serde `Deserializer`, so a new field fails here).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../odpo-trainer/tests/common/serde_keys.rs"]
mod serde_keys;

use odpo_pipeline::{ExperimentConfig, FrontierConfig, PipelineConfig};
use serde_keys::{keys_of, undocumented};

const CONFIG_DOC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/config.md"));

/// The text of the `## heading` section of docs/config.md.
fn section(heading: &str) -> &'static str {
    let start = CONFIG_DOC.find(&format!("\n## {heading}\n")).unwrap_or_else(|| panic!("docs/config.md has no `## {heading}`"));
    let rest = &CONFIG_DOC[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    &rest[..end]
}

#[test]
fn every_pipeline_config_key_is_in_docs_config_md() {
    let keys = keys_of::<PipelineConfig>();
    assert!(keys.keys.contains("pref.beta"), "{:?}", keys.keys);
    let missing = undocumented(&keys, "", section("The pipeline config"));
    assert!(missing.is_empty(), "docs/config.md (The pipeline config) does not document:\n  {}", missing.join("\n  "));
}

#[test]
fn every_frontier_config_key_is_in_docs_config_md() {
    let keys = keys_of::<FrontierConfig>();
    assert!(keys.keys.contains("pair_counts"), "{:?}", keys.keys);
    let missing = undocumented(&keys, "", section("The frontier config"));
    assert!(missing.is_empty(), "docs/config.md (The frontier config) does not document:\n  {}", missing.join("\n  "));
}

#[test]
fn every_experiment_config_key_is_in_docs_config_md() {
    let keys = keys_of::<ExperimentConfig>();
    assert!(keys.keys.contains("pref.max_prompt_length"), "{:?}", keys.keys);
    let missing = undocumented(&keys, "", section("The experiment config"));
    assert!(missing.is_empty(), "docs/config.md (The experiment config) does not document:\n  {}", missing.join("\n  "));
}
