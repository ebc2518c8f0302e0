//! Tokenization with a real tokenizer (SmolLM2-135M-Instruct from the shared folder): tokenized pairs decode
//! back to prompt + completion, loss masks cover exactly the completion and EOS, truncation keeps the end of
//! the prompt, and batches come out of burn's data loader.
#![allow(clippy::unwrap_used)]

use odpo_data::{
    DataConfig, Format, Layout, LongCompletion, PreferenceBatcher, PreferencePair, Text, load_bytes, preference_loader,
    sft_from_pairs, tokenize_pairs,
};
use odpo_model::tokenizer::Tokenizer;

#[path = "../../odpo-model/tests/common/env.rs"]
mod env;

fn tokenizer() -> Option<Tokenizer> {
    let file = env::shared_path("models/smollm2-135m-instruct/tokenizer.json")?;
    Some(Tokenizer::from_dir(file.parent().unwrap()).unwrap())
}

fn pairs(cfg: &DataConfig, jsonl: &str) -> Vec<PreferencePair> {
    load_bytes(cfg, jsonl.as_bytes().to_vec()).unwrap().pairs
}

const DATA: &str = concat!(
    "{\"prompt\":\"I found it real shocking\",\"text\":\"for the time, and moving.\",\"reward\":1.9}\n",
    "{\"prompt\":\"I found it real shocking\",\"text\":\". Dull film, café crème ☕ ugh\",\"reward\":0.2}\n",
    "{\"prompt\":\"Another  prompt\\nwith lines\",\"text\":\"good\",\"reward\":1.7}\n",
    "{\"prompt\":\"Another  prompt\\nwith lines\",\"text\":\"bad bad bad\",\"reward\":0.1}\n",
);

#[test]
fn plain_pairs_decode_back_and_masks_cover_completion_and_eos() {
    let Some(tok) = tokenizer() else { return };
    let eos = tok.eos_token_id().unwrap();
    let mut cfg = DataConfig::new("mem.jsonl", Format::ScoredJsonl);
    cfg.separator = " ".into();
    let ps = pairs(&cfg, DATA);
    let (items, report) = tokenize_pairs(&ps, &tok, &cfg).unwrap();
    assert_eq!(report.kept, 2);
    for (t, p) in items.iter().zip(&ps) {
        let (Text::Plain(prompt), Text::Plain(c), Text::Plain(r)) = (&p.prompt, &p.chosen, &p.rejected) else { panic!() };
        for (ids, text) in [(&t.chosen, c), (&t.rejected, r)] {
            assert_eq!(ids.last(), Some(&eos));
            let mut all = t.prompt.clone();
            all.extend_from_slice(&ids[..ids.len() - 1]);
            assert_eq!(tok.decode(&all, false).unwrap(), format!("{prompt} {text}"));
            assert_eq!(tok.decode(&t.prompt, false).unwrap(), *prompt);
        }
    }
    // The batch: chosen rows then rejected rows; the mask is 1 exactly on completion + EOS.
    let batcher = PreferenceBatcher::new(tok.pad_token_id().unwrap_or(0), Some(8), Layout::Concatenated);
    let h = batcher.host_rows(&items);
    assert_eq!(h.rows, 4);
    assert_eq!(h.len % 8, 0);
    for (row, (t, completion)) in items.iter().map(|t| (t, &t.chosen)).chain(items.iter().map(|t| (t, &t.rejected))).enumerate() {
        let mask = &h.loss_mask[row * h.len..(row + 1) * h.len];
        let ids = &h.input_ids[row * h.len..(row + 1) * h.len];
        let masked: Vec<u32> = ids.iter().zip(mask).filter(|(_, m)| **m == 1.0).map(|(i, _)| *i as u32).collect();
        assert_eq!(&masked, completion);
        let first = mask.iter().position(|&m| m == 1.0).unwrap();
        assert_eq!(first, t.prompt.len());
        assert_eq!(mask.iter().filter(|&&m| m == 1.0).count(), completion.len());
    }
}

#[test]
fn chat_template_prompt_and_messages() {
    let Some(tok) = tokenizer() else { return };
    let mut cfg = DataConfig::new("mem.jsonl", Format::Jsonl);
    cfg.chat_template = true;
    let ps = pairs(
        &cfg,
        "{\"prompt\":\"Hi?\",\"chosen\":[{\"role\":\"user\",\"content\":\"Hi?\"},{\"role\":\"assistant\",\"content\":\"Hello!\"}],\"rejected\":\"Go away.\"}\n",
    );
    assert_eq!(ps[0].chosen, Text::Plain("Hello!".into()));
    let (items, _) = tokenize_pairs(&ps, &tok, &cfg).unwrap();
    let rendered = tok.chat_prompt("Hi?").unwrap();
    assert!(rendered.ends_with("<|im_start|>assistant\n"));
    assert_eq!(tok.decode(&items[0].prompt, false).unwrap(), rendered);
    let mut all = items[0].prompt.clone();
    all.extend(&items[0].chosen);
    assert_eq!(tok.decode(&all, false).unwrap(), format!("{rendered}Hello!<|im_end|>"));
}

#[test]
fn truncation_keeps_prompt_end_and_counts_drops() {
    let Some(tok) = tokenizer() else { return };
    let mut cfg = DataConfig::new("mem.jsonl", Format::ScoredJsonl);
    cfg.separator = " ".into();
    let ps = pairs(&cfg, DATA);
    let (full, _) = tokenize_pairs(&ps, &tok, &cfg).unwrap();

    cfg.max_prompt_length = Some(3);
    cfg.max_length = 8;
    let (items, report) = tokenize_pairs(&ps, &tok, &cfg).unwrap();
    for (t, f) in items.iter().zip(&full) {
        assert_eq!(t.prompt, f.prompt[f.prompt.len() - 3..]);
        assert!(t.prompt.len() + t.chosen.len() <= 8 && t.prompt.len() + t.rejected.len() <= 8);
        assert_eq!(t.chosen[..], f.chosen[..t.chosen.len()]);
    }
    assert_eq!(report.prompts_truncated, 2);
    assert!(report.completions_truncated >= 2);

    cfg.long_completion = LongCompletion::Drop;
    let (items, report) = tokenize_pairs(&ps, &tok, &cfg).unwrap();
    let too_long = full.iter().filter(|f| f.chosen.len().max(f.rejected.len()) > 8 - 3).count();
    assert_eq!((items.len(), report.dropped_completion_too_long), (2 - too_long, too_long));
    assert!(too_long >= 1);
    for t in &items {
        let f = full.iter().find(|f| f.pair_id == t.pair_id).unwrap();
        assert_eq!((&t.chosen, &t.rejected), (&f.chosen, &f.rejected), "kept pairs are never cut");
    }

    // Without a prompt limit, a prompt that fills max_length drops its pair.
    cfg.max_prompt_length = None;
    cfg.max_length = full[0].prompt.len();
    cfg.long_completion = LongCompletion::Truncate;
    let (_, report) = tokenize_pairs(&ps, &tok, &cfg).unwrap();
    assert!(report.dropped_prompt_too_long >= 1);
}

#[test]
fn loader_and_sft_view() {
    let Some(tok) = tokenizer() else { return };
    let mut cfg = DataConfig::new("mem.jsonl", Format::ScoredJsonl);
    cfg.separator = " ".into();
    let ps = pairs(&cfg, DATA);
    let (items, _) = tokenize_pairs(&ps, &tok, &cfg).unwrap();
    let device = burn::tensor::Device::default();
    let loader = preference_loader(items.clone(), PreferenceBatcher::new(0, None, Layout::Concatenated), 2, Some(1), 1, &device);
    let batches: Vec<_> = loader.iter().collect::<Result<_, _>>().unwrap();
    assert_eq!(batches.len(), 1);
    let b = batches[0].concatenated().unwrap();
    let t = items.iter().map(|i| i.prompt.len() + i.chosen.len().max(i.rejected.len())).max().unwrap();
    assert_eq!(b.input_ids.dims(), [4, t]);
    let mask_sum: f32 = b.loss_mask.clone().sum().into_scalar();
    let want: usize = items.iter().map(|i| i.chosen.len() + i.rejected.len()).sum();
    assert_eq!(mask_sum as usize, want);
    let (sft, _) = sft_from_pairs(&ps, &tok, &cfg).unwrap();
    assert_eq!(sft[0].prompt_len, items[0].prompt.len());
    assert_eq!(sft[0].ids.len(), items[0].prompt.len() + items[0].chosen.len());
}

/// Each distinct prompt and response is tokenized once per file: the ids are exactly those of
/// tokenizing every pair on its own, on the paper's TL;DR file (all pairs: each response in several).
#[test]
fn texts_shared_by_pairs_are_tokenized_once_with_the_same_ids() {
    let Some(tok) = tokenizer() else { return };
    let Some(path) = env::shared_path("data/odpo-paper/tldr-sft-test-rel.json") else { return };
    let mut cfg = DataConfig::new(&path, Format::TldrJson);
    (cfg.max_length, cfg.max_prompt_length) = (1024, Some(512));
    let loaded = odpo_data::load(&cfg).unwrap();
    let ps: Vec<PreferencePair> = loaded.pairs.into_iter().take(400).collect();
    let prompts: std::collections::HashSet<String> = ps.iter().map(|p| p.prompt.flat()).collect();
    assert!(prompts.len() * 4 < ps.len(), "{} prompts for {} pairs: too few repeats to test", prompts.len(), ps.len());
    let (all, _) = tokenize_pairs(&ps, &tok, &cfg).unwrap();
    let one_by_one: Vec<_> = ps.iter().flat_map(|p| tokenize_pairs(std::slice::from_ref(p), &tok, &cfg).unwrap().0).collect();
    assert_eq!(all, one_by_one);
}
