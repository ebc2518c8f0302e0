//! Tokenizers read from GGUF files' metadata: the real SmolLM2 file against its HF
//! `tokenizer.json` on the paper's IMDB texts (shared folder, `ODPO_SHARED`), and small byte-level
//! vocabularies under three splitters against transformers' GGUF tokenizer
//! (`tests/fixtures/gguf/vocab`, by `make_gguf_fixtures.py`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use odpo_model::tokenizer::{ChatMessage, Tokenizer, TokenizerError};

#[path = "common/env.rs"]
mod env;

fn vocab(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/vocab").join(name)
}

/// Every probe of `expected.json`, with and without special tokens, gives the reference's ids
/// (transformers' GGUF tokenizer for the byte-level files, SentencePiece itself for the
/// SentencePiece models), and decodes back to its text.
#[test]
fn gguf_vocabularies_match_transformers() {
    let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(vocab("expected.json")).unwrap()).unwrap();
    let cases = expected["cases"].as_object().unwrap();
    assert_eq!(cases.keys().collect::<Vec<_>>(), ["gpt2", "llama-bpe", "qwen2", "sentencepiece", "sentencepiece_gemma"]);
    let ids = |v: &serde_json::Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect() };
    for (pre, probes) in cases {
        let tok = Tokenizer::from_gguf(&vocab(&format!("{pre}.gguf"))).unwrap();
        for p in probes.as_array().unwrap() {
            let text = p["text"].as_str().unwrap();
            assert_eq!(tok.encode(text, true).unwrap(), ids(&p["ids"]), "{pre}: {text:?}");
            let plain = tok.encode(text, false).unwrap();
            assert_eq!(plain, ids(&p["ids_plain"]), "{pre}: {text:?} without special tokens");
            assert_eq!(tok.decode(&plain, false).unwrap(), text, "{pre}");
        }
    }
    // The three splitters split this text three ways; only Llama 3's file asks for BOS.
    let got: Vec<(Vec<u32>, bool)> = ["gpt2", "llama-bpe", "qwen2"]
        .iter()
        .map(|pre| {
            let tok = Tokenizer::from_gguf(&vocab(&format!("{pre}.gguf"))).unwrap();
            (tok.encode("It's 3.14159 + 2,718 ; 99bottles", false).unwrap(), tok.encode("x", true).unwrap()[0] == 1)
        })
        .collect();
    assert!(got[0].0 != got[1].0 && got[1].0 != got[2].0 && got[0].0 != got[2].0, "{got:?}");
    assert_eq!(got.iter().map(|l| l.1).collect::<Vec<_>>(), [false, true, false]);
}

/// llama.cpp's own ids (`vocab/llamacpp_expected.json`, by `make_llamacpp_expected.py` through
/// llama-cpp-python) for every probe, with and without the file's BOS/EOS, under each text split
/// read (`gpt-2`, `default` with its punctuation and three-digit splits, `smollm`, `starcoder`,
/// `llama-bpe`, `llama3`, `qwen2`, `deepseek-r1-qwen`) and both SentencePiece settings. The
/// Gemma-style file spells whitespace pieces with real spaces, which llama.cpp (replacing the text's
/// spaces by `▁` first) never matches: where a probe has a run of spaces, odpo keeps SentencePiece's
/// ids (`gguf_vocabularies_match_transformers`), the ids the model was trained on.
#[test]
fn gguf_vocabularies_match_llama_cpp() {
    let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(vocab("llamacpp_expected.json")).unwrap()).unwrap();
    let cases = expected["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 10);
    let ids = |v: &serde_json::Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect() };
    let mut compared = 0;
    for (name, probes) in cases {
        let tok = Tokenizer::from_gguf(&vocab(&format!("{name}.gguf"))).unwrap();
        for p in probes.as_array().unwrap() {
            let text = p["text"].as_str().unwrap();
            if name == "sentencepiece_gemma" && text.contains("  ") {
                continue;
            }
            assert_eq!(tok.encode(text, true).unwrap(), ids(&p["ids"]), "{name}: {text:?}");
            assert_eq!(tok.encode(text, false).unwrap(), ids(&p["ids_plain"]), "{name}: {text:?} without BOS/EOS");
            compared += 1;
        }
    }
    assert!(compared >= 95, "{compared}");
    // `default` is not GPT-2's split: punctuation runs, then digits in threes.
    let [gpt2, default] = ["pre-gpt-2", "pre-default"].map(|n| Tokenizer::from_gguf(&vocab(&format!("{n}.gguf"))).unwrap());
    assert_ne!(gpt2.encode("1234567 it's", false).unwrap(), default.encode("1234567 it's", false).unwrap());
}

/// SentencePiece vocabularies: the file's special and added tokens stay whole, and, as in llama.cpp,
/// the text after one starts a new word (`▁` in front) where the file adds a space prefix; bytes
/// outside the pieces fall back to `<0xXX>` pieces.
#[test]
fn sentencepiece_special_tokens_and_byte_fallback() {
    let tok = Tokenizer::from_gguf(&vocab("sentencepiece.gguf")).unwrap();
    let id = |t: &str| tok.token_to_id(t).unwrap();
    assert_eq!((tok.bos_token_id(), tok.eos_token_id(), tok.token_to_id("<unk>")), (Some(1), Some(2), Some(0)));
    assert_eq!(tok.encode("the", false).unwrap(), [id("▁the")]);
    assert_eq!(tok.encode("the</s>the", true).unwrap(), [1, id("▁the"), 2, id("▁the")]);
    assert_eq!(tok.encode("<think>the", false).unwrap(), [id("<think>"), id("▁the")]);
    assert_eq!(tok.decode(&tok.encode("the</s>the", true).unwrap(), true).unwrap(), "the the");
    // A character no piece holds: its UTF-8 bytes.
    let ids = tok.encode("ж", false).unwrap();
    assert_eq!(ids[1..], [id("<0xD0>"), id("<0xB6>")], "{ids:?}");
    assert_eq!(tok.decode(&ids, false).unwrap(), "ж");
    // Gemma's files: no space prefix, whitespace pieces spelled with real spaces.
    let gemma = Tokenizer::from_gguf(&vocab("sentencepiece_gemma.gguf")).unwrap();
    assert_eq!(gemma.encode("  ", false).unwrap(), [gemma.token_to_id("▁▁").unwrap()]);
    let ids = gemma.encode("the  the", false).unwrap();
    assert_eq!(gemma.decode(&ids, false).unwrap(), "the  the");
    assert_eq!(gemma.decode(&ids[..1], false).unwrap(), "t", "no space in front: {ids:?}");
}

/// `smollm` splits every digit off before GPT-2's split (llama.cpp's `\p{N}` rule), which
/// transformers' GGUF reader leaves out: checked by hand on a vocabulary that has merged digits.
#[test]
fn smollm_split_isolates_digits() {
    let smollm = Tokenizer::from_gguf(&vocab("smollm.gguf")).unwrap();
    let gpt2 = Tokenizer::from_gguf(&vocab("gpt2.gguf")).unwrap();
    for text in ["12345", "In 2024, 42 of 1999"] {
        let ids = smollm.encode(text, false).unwrap();
        let pieces: Vec<String> = ids.iter().map(|&i| smollm.decode(&[i], false).unwrap()).collect();
        for p in &pieces {
            assert!(!(p.chars().any(|c| c.is_ascii_digit()) && p.chars().count() > 1), "{text:?}: {pieces:?}");
        }
        assert_eq!(pieces.concat(), text);
        assert!(gpt2.encode(text, false).unwrap().len() < ids.len(), "the vocabulary merges digits, so the split shows");
    }
    // Elsewhere the two agree.
    let text = "Don't stop, they've said!";
    assert_eq!(smollm.encode(text, false).unwrap(), gpt2.encode(text, false).unwrap());
}

/// The special tokens, the added tokens and the chat template come from the file.
#[test]
fn gguf_special_tokens_and_chat_template() {
    let tok = Tokenizer::from_gguf(&vocab("gpt2.gguf")).unwrap();
    assert_eq!((tok.bos_token_id(), tok.eos_token_id(), tok.pad_token_id()), (Some(1), Some(2), Some(0)));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    let think = tok.token_to_id("<think>").unwrap();
    // A user-defined token stays whole in text and survives skipping special tokens; a control one does not.
    let ids = tok.encode("a<think>b<|im_end|>", false).unwrap();
    assert!(ids.contains(&think) && ids.contains(&2), "{ids:?}");
    assert_eq!(tok.decode(&ids, true).unwrap(), "a<think>b");
    let messages = [ChatMessage::new("user", "hi")];
    assert_eq!(tok.apply_chat_template(&messages, false).unwrap(), "<|im_start|>user\nhi<|im_end|>\n");
}

/// [`Tokenizer::save`] writes files [`Tokenizer::from_dir`] reads back as the same tokenizer.
#[test]
fn gguf_tokenizer_saved_reads_back() {
    let tok = Tokenizer::from_gguf(&vocab("llama-bpe.gguf")).unwrap();
    let dir = env::scratch("gguf-tokenizer-save");
    tok.save(&dir).unwrap();
    let back = Tokenizer::from_dir(&dir).unwrap();
    for text in ["It's 2024!  <|im_start|>x<think>", "Café 東京 🙂\r\n"] {
        assert_eq!(back.encode(text, true).unwrap(), tok.encode(text, true).unwrap(), "{text:?}");
    }
    assert_eq!((back.bos_token_id(), back.eos_token_id(), back.pad_token_id()), (Some(1), Some(2), Some(0)));
    let messages = [ChatMessage::new("user", "hi")];
    assert_eq!(back.apply_chat_template(&messages, false).unwrap(), tok.apply_chat_template(&messages, false).unwrap());
}

/// A vocabulary this reader cannot build is refused with the file, the key and what to do.
#[test]
fn unreadable_gguf_vocabularies_are_clear_errors() {
    for (file, key, says) in [
        ("unknown_pre.gguf", "tokenizer.ggml.pre", "`mystery` is not a text split this reader knows"),
        ("unigram.gguf", "tokenizer.ggml.model", "`t5` vocabularies are not read"),
    ] {
        let path = vocab(file);
        let err = Tokenizer::from_gguf(&path).err().unwrap();
        assert!(matches!(err, TokenizerError::Gguf(_)), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()) && text.contains(key) && text.contains(says) && text.contains("tokenizer.json"), "{text}");
    }
    // A model file without any vocabulary.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/tiny_llama.gguf");
    let text = Tokenizer::from_gguf(&path).err().unwrap().to_string();
    assert!(text.contains("tokenizer.ggml.model") && text.contains("missing"), "{text}");
}

/// [`Tokenizer::open`] prefers a `tokenizer.json` beside a GGUF file, and reads the file's own
/// vocabulary when there is none.
#[test]
fn open_takes_what_a_model_path_holds() {
    let dir = env::scratch("gguf-tokenizer-open");
    let alone = dir.join("alone");
    std::fs::create_dir_all(&alone).unwrap();
    std::fs::copy(vocab("qwen2.gguf"), alone.join("m.gguf")).unwrap();
    let own = Tokenizer::open(&alone.join("m.gguf")).unwrap();
    assert_eq!(own.encode("12345", false).unwrap().len(), 5, "Qwen 2's split");
    let gpt2 = Tokenizer::from_gguf(&vocab("gpt2.gguf")).unwrap();
    let merged = gpt2.encode("12345", false).unwrap();
    assert!(merged.len() < 5);
    gpt2.save(&alone).unwrap();
    let beside = Tokenizer::open(&alone.join("m.gguf")).unwrap();
    assert_eq!(beside.encode("12345", false).unwrap(), merged, "the tokenizer.json beside it (GPT-2's split)");
    assert_eq!(Tokenizer::open(&alone).unwrap().encode("12345", false).unwrap(), merged);
}

/// The SmolLM2 GGUF file's own vocabulary gives the ids of its HF `tokenizer.json` on every prompt
/// and response of the paper's IMDB test set, and the same chat prompts.
#[test]
fn smollm2_gguf_tokenizer_matches_tokenizer_json() {
    let Some(gguf) = env::shared_path("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    let Some(imdb) = env::shared_path("data/odpo-paper/imdb-sft-test.jsonl") else { return };
    let from_gguf = Tokenizer::from_gguf(&gguf).unwrap();
    let hf = Tokenizer::from_dir(gguf.parent().unwrap()).unwrap();
    assert_eq!(from_gguf.vocab_size(), hf.vocab_size());
    assert_eq!(
        (from_gguf.bos_token_id(), from_gguf.eos_token_id(), from_gguf.pad_token_id()),
        (hf.bos_token_id(), hf.eos_token_id(), hf.pad_token_id())
    );
    let mut texts = 0;
    for line in std::fs::read_to_string(&imdb).unwrap().lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let (prompt, text) = (row["prompt"].as_str().unwrap(), row["text"].as_str().unwrap());
        for t in [prompt.to_string(), text.to_string(), from_gguf.chat_prompt(prompt).unwrap() + text] {
            assert_eq!(from_gguf.encode(&t, true).unwrap(), hf.encode(&t, true).unwrap(), "{t:?}");
            texts += 1;
        }
        assert_eq!(from_gguf.chat_prompt(prompt).unwrap(), hf.chat_prompt(prompt).unwrap());
    }
    assert_eq!(texts, 3 * 2560);
}

/// Text printed as it is generated: each vocabulary's pieces, streamed a token at a time, join into
/// the whole decode, and a character split over byte tokens comes out once it is whole.
#[test]
fn streamed_text_joins_into_the_whole_decode() {
    let texts = ["the  the", "ж and жж", "Hello, world! 12345", "naïve café, 日本語, emoji 😀👍🏽\n\nend", "<think>the</s>the"];
    for name in ["gpt2", "llama-bpe", "qwen2", "smollm", "sentencepiece", "sentencepiece_gemma"] {
        let tok = Tokenizer::from_gguf(&vocab(&format!("{name}.gguf"))).unwrap();
        for text in texts {
            let ids = tok.encode(text, false).unwrap();
            for skip in [false, true] {
                let mut stream = tok.decode_stream(skip);
                let mut streamed = String::new();
                for &id in &ids {
                    streamed.extend(stream.step(id).unwrap());
                }
                assert_eq!(streamed, tok.decode(&ids, skip).unwrap(), "{name}: {text:?} (skip special: {skip})");
            }
        }
    }
    // SentencePiece's byte fallback: `ж` is two byte tokens, and only the second completes it.
    let tok = Tokenizer::from_gguf(&vocab("sentencepiece.gguf")).unwrap();
    let mut stream = tok.decode_stream(false);
    let pieces: Vec<Option<String>> = tok.encode("ж", false).unwrap().into_iter().map(|id| stream.step(id).unwrap()).collect();
    assert_eq!(pieces[1..], [None, Some("ж".to_string())], "{pieces:?}");
}
