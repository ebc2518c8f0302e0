//! A chat template that renders the prompt differently once a response follows it would put the
//! prompt/completion boundary in the wrong place: that is an error naming the pair, not a silent
//! guess. The tiny tokenizer fixture of odpo-model, with templates set here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use odpo_data::{DataConfig, DataError, Format, PreferencePair, Text, tokenize_pairs};
use odpo_model::tokenizer::{ChatMessage, Tokenizer};

fn tokenizer(template: &str) -> Tokenizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../odpo-model/tests/fixtures/tokenizer/tiny");
    let mut tok = Tokenizer::from_dir(&dir).unwrap();
    tok.set_chat_template(template, &dir.join("test template"));
    tok
}

fn pair() -> PreferencePair {
    let msgs = |role: &str, text: &str| Text::Messages(vec![ChatMessage::new(role, text)]);
    let mut cfg = DataConfig::new("mem.jsonl", Format::Jsonl);
    cfg.chat_template = true;
    let row = serde_json::json!({"prompt": [{"role": "user", "content": "hello"}], "chosen": [{"role": "assistant", "content": "world"}], "rejected": [{"role": "assistant", "content": "hello"}]});
    let mut p = odpo_data::load_bytes(&cfg, format!("{row}\n").into_bytes()).unwrap().pairs.remove(0);
    (p.prompt, p.chosen) = (msgs("user", "hello"), msgs("assistant", "world"));
    p
}

#[test]
fn a_template_that_changes_the_prompt_is_refused() {
    let mut cfg = DataConfig::new("mem.jsonl", Format::Jsonl);
    (cfg.chat_template, cfg.max_length) = (true, 64);
    // The last user turn is marked: alone (with the generation prompt) it reads `LAST:hello>`, with a
    // response after it `hellohello` — no prefix in common.
    let bad = tokenizer("{% for m in messages %}{% if loop.last and m['role'] == 'user' %}LAST:{% endif %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}");
    let e = tokenize_pairs(&[pair()], &bad, &cfg).unwrap_err();
    assert!(matches!(e, DataError::TemplateMismatch { pair: 0, .. }), "{e}");
    assert!(e.to_string().starts_with("pair 0: the chat template renders the prompt differently"), "{e}");
    // A template whose prompt is a prefix of the conversation tokenizes.
    let good = tokenizer("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}");
    let (items, _) = tokenize_pairs(&[pair()], &good, &cfg).unwrap();
    assert_eq!(items.len(), 1);
}

/// Every completion ends in exactly one EOS, whether the text has none, one or two already.
#[test]
fn completions_end_in_exactly_one_eos() {
    let tok = tokenizer("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}");
    let eos = tok.eos_token_id().unwrap();
    let mut cfg = DataConfig::new("mem.jsonl", Format::Jsonl);
    cfg.max_length = 64;
    let rows: String = ["world", "world</s>", "world</s></s>"]
        .iter()
        .map(|c| format!("{}\n", serde_json::json!({"prompt": "hello", "chosen": c, "rejected": "hello</s></s></s>"})))
        .collect();
    let pairs = odpo_data::load_bytes(&cfg, rows.into_bytes()).unwrap().pairs;
    let (items, _) = tokenize_pairs(&pairs, &tok, &cfg).unwrap();
    for t in &items {
        for ids in [&t.chosen, &t.rejected] {
            assert_eq!(ids.iter().filter(|&&i| i == eos).count(), 1, "{ids:?}");
            assert_eq!(ids.last(), Some(&eos));
        }
    }
    assert_eq!(items[0].chosen, items[2].chosen);
    // A template that ends the assistant turn with EOS gives one EOS too.
    cfg.chat_template = true;
    let row = serde_json::json!({"prompt": [{"role": "user", "content": "hello"}], "chosen": [{"role": "assistant", "content": "world"}], "rejected": [{"role": "assistant", "content": "hello"}]});
    let pairs = odpo_data::load_bytes(&cfg, format!("{row}\n").into_bytes()).unwrap().pairs;
    let (items, _) = tokenize_pairs(&pairs, &tok, &cfg).unwrap();
    assert_eq!(items[0].chosen.iter().filter(|&&i| i == eos).count(), 1, "{:?}", items[0].chosen);
}
