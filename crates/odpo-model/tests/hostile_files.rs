//! Random damage to the files a run reads besides its config: a model folder's `config.json` (which
//! then disagrees with its weights, or does not parse), its `model.safetensors`, the tokenizer's
//! `tokenizer.json` and `tokenizer_config.json` (chat template included), and a PEFT adapter
//! folder's `adapter_config.json` and `adapter_model.safetensors`. Bytes are changed and files
//! cut short at random (fixed seeds); loading must never panic, and every refusal must name the file
//! or the tensor. The counts are printed for docs/reliability.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use common::{fixture, scratch, test_device};
use odpo_model::CausalLm;
use odpo_model::tokenizer::Tokenizer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// `bytes` with a few bytes replaced by characters that matter to JSON, or cut short.
fn mutate(bytes: &[u8], rng: &mut StdRng, i: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    if i.is_multiple_of(5) {
        b.truncate(rng.random_range(0..bytes.len()));
    } else {
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..b.len());
            const BYTES: &[u8] = b"{}[]\":,0123456789-eE.tnfa \\\n\x00\xff";
            b[at] = BYTES[rng.random_range(0..BYTES.len())];
        }
    }
    b
}

#[derive(Default)]
struct Tally {
    tried: usize,
    loaded: usize,
    named: usize,
    unnamed: Vec<String>,
    panics: usize,
}

impl Tally {
    fn report(&self, what: &str) {
        println!("{what}: {} tried, {} loaded, {} refused naming the file or tensor, {} refused otherwise, {} panics", self.tried, self.loaded, self.named, self.unnamed.len(), self.panics);
        assert_eq!(self.panics, 0, "{what}: panics");
        assert!(self.unnamed.is_empty(), "{what}: refusals that name neither the file nor a tensor:\n{}", self.unnamed.join("\n"));
    }

    fn check<T, E: std::fmt::Display>(&mut self, f: impl FnOnce() -> Result<T, E>, names: &[&str]) {
        self.tried += 1;
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok(_)) => self.loaded += 1,
            Ok(Err(e)) => {
                let msg = e.to_string();
                if names.iter().any(|n| msg.contains(n)) {
                    self.named += 1;
                } else {
                    self.unnamed.push(msg);
                }
            }
            Err(_) => self.panics += 1,
        }
    }
}


fn copy(from: &Path, to: &Path, files: &[&str]) {
    for f in files {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

#[test]
fn damaged_model_folders_are_refused_by_name() {
    let device = test_device();
    let mut rng = StdRng::seed_from_u64(7);
    for case in ["gpt2", "llama_gqa_untied"] {
        let dir = scratch(&format!("hostile-{case}"));
        copy(&fixture(case), &dir, &["config.json", "model.safetensors"]);
        let config = std::fs::read(fixture(case).join("config.json")).unwrap();
        let mut tally = Tally::default();
        for i in 0..300 {
            std::fs::write(dir.join("config.json"), mutate(&config, &mut rng, i)).unwrap();
            // A config that still parses but disagrees with the weights names the tensor and both shapes.
            tally.check(|| CausalLm::load(&dir, &device), &["config.json", "model.safetensors", "shape"]);
        }
        tally.report(&format!("{case} config.json"));

        std::fs::write(dir.join("config.json"), &config).unwrap();
        let weights = std::fs::read(fixture(case).join("model.safetensors")).unwrap();
        let mut tally = Tally::default();
        for i in 0..150 {
            // The header (the first bytes) is where damage changes meaning; the data is just numbers.
            let cut = weights.len().min(4096);
            let mut damaged = mutate(&weights[..cut], &mut rng, i);
            if damaged.len() == cut {
                damaged.extend_from_slice(&weights[cut..]);
            }
            std::fs::write(dir.join("model.safetensors"), damaged).unwrap();
            tally.check(|| CausalLm::load(&dir, &device), &["model.safetensors", "shape"]);
        }
        tally.report(&format!("{case} model.safetensors"));
    }
}

#[test]
fn damaged_tokenizer_files_are_refused_by_name() {
    let tiny = fixture("tokenizer/tiny");
    let mut rng = StdRng::seed_from_u64(11);
    let dir = scratch("hostile-tokenizer");
    copy(&tiny, &dir, &["tokenizer.json", "tokenizer_config.json"]);
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        let original = std::fs::read(tiny.join(file)).unwrap();
        let mut tally = Tally::default();
        for i in 0..300 {
            std::fs::write(dir.join(file), mutate(&original, &mut rng, i)).unwrap();
            tally.check(
                || {
                    // Loading, then what a run does with it: tokenize, and render the chat template.
                    let tok = Tokenizer::from_dir(&dir)?;
                    tok.encode("hello world", true)?;
                    if tok.has_chat_template() {
                        tok.chat_prompt("hello")?;
                    }
                    Ok::<_, odpo_model::tokenizer::TokenizerError>(())
                },
                &[file, "chat template", "template"],
            );
        }
        std::fs::write(dir.join(file), &original).unwrap();
        tally.report(file);
    }
}

#[test]
fn damaged_adapter_folders_are_refused_by_name() {
    let device = test_device();
    let mut rng = StdRng::seed_from_u64(13);
    for (case, base) in [("gpt2", "gpt2"), ("llama_rslora", "llama_gqa_untied"), ("qwen3_moe_experts", "qwen3_moe")] {
        let model = CausalLm::load(&fixture(base), &device).unwrap().model;
        let ids = burn::tensor::Tensor::<2, burn::tensor::Int>::from_data(burn::tensor::TensorData::new(vec![1i64, 5, 9, 2], [1, 4]), &device);
        let mask = burn::tensor::Tensor::<2, burn::tensor::Int>::ones([1, 4], &device);
        let src = fixture("lora").join(case);
        let dir = scratch(&format!("hostile-adapter-{case}"));
        let files = ["adapter_config.json", "adapter_model.safetensors"];
        copy(&src, &dir, &files);
        for file in files {
            let original = std::fs::read(src.join(file)).unwrap();
            let mut tally = Tally::default();
            for i in 0..if file.ends_with(".json") { 300 } else { 150 } {
                // As above, a safetensors file's header is where damage changes meaning.
                let cut = original.len().min(4096);
                let mut damaged = mutate(&original[..cut], &mut rng, i);
                if damaged.len() == cut {
                    damaged.extend_from_slice(&original[cut..]);
                }
                std::fs::write(dir.join(file), damaged).unwrap();
                // Loading, then what a run does with adapters: a forward pass and the merge.
                tally.check(
                    || {
                        let (adapted, _) = model.clone().load_peft(&dir, &device)?;
                        let logits = adapted.forward(ids.clone(), &mask, None);
                        let merged = adapted.merge_adapters().forward(ids.clone(), &mask, None);
                        Ok::<_, odpo_model::ModelError>((logits, merged))
                    },
                    &[file, "adapter_config.json", "shape"],
                );
            }
            std::fs::write(dir.join(file), &original).unwrap();
            tally.report(&format!("{case} {file}"));
        }
    }
}
