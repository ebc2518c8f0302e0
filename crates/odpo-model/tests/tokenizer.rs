//! Tokenizer and chat-template tests: SmolLM2 against HF's reference ids and prompt text (from the
//! shared folder, `ODPO_SHARED`), and small fixtures whose expected output HF rendered
//! (`tests/fixtures/tokenizer/make_expected.py`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use odpo_model::tokenizer::{ChatMessage, Tokenizer, TokenizerError};

#[path = "common/env.rs"]
mod env;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

/// The SmolLM2 folder of the shared material, or `None` (after saying so) when it is absent.
fn smollm2_dir() -> Option<PathBuf> {
    env::shared_path("models/smollm2-135m-instruct/tokenizer.json")?;
    env::shared_path("models/smollm2-135m-instruct")
}

struct Case {
    user: String,
    prompt_text: String,
    completion_text: String,
    prompt_len: usize,
    completion_len: usize,
    input_ids: Vec<u32>,
}

fn reference_cases(dir: &Path) -> Vec<Case> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let cases = json["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    cases
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let view = tensors.tensor(&format!("case{i}.input_ids")).unwrap();
            assert_eq!(view.dtype(), safetensors::Dtype::I64);
            let input_ids = view
                .data()
                .chunks_exact(8)
                .map(|b| u32::try_from(i64::from_le_bytes(b.try_into().unwrap())).unwrap())
                .collect();
            Case {
                user: c["user"].as_str().unwrap().to_owned(),
                prompt_text: c["prompt_text"].as_str().unwrap().to_owned(),
                completion_text: c["completion_text"].as_str().unwrap().to_owned(),
                prompt_len: c["prompt_len"].as_u64().unwrap() as usize,
                completion_len: c["completion_len"].as_u64().unwrap() as usize,
                input_ids,
            }
        })
        .collect()
}

#[test]
fn smollm2_reference_input_ids() {
    let Some(dir) = smollm2_dir() else { return };
    let tok = Tokenizer::from_dir(&dir).unwrap();
    for case in reference_cases(&dir) {
        let joint = format!("{}{}", case.prompt_text, case.completion_text);
        assert_eq!(tok.encode(&joint, true).unwrap(), case.input_ids, "prompt + completion encoded together");
        // The data pipeline encodes prompt and completion separately: same ids, same split.
        let prompt = tok.encode(&case.prompt_text, false).unwrap();
        let completion = tok.encode(&case.completion_text, false).unwrap();
        assert_eq!(prompt.len(), case.prompt_len);
        assert_eq!(completion.len(), case.completion_len);
        assert_eq!([prompt, completion].concat(), case.input_ids, "prompt and completion encoded separately");
    }
}

#[test]
fn smollm2_chat_template_gives_reference_prompt() {
    let Some(dir) = smollm2_dir() else { return };
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert!(tok.has_chat_template());
    for case in reference_cases(&dir) {
        let messages = [ChatMessage::new("user", case.user.as_str())];
        assert_eq!(tok.apply_chat_template(&messages, true).unwrap(), case.prompt_text);
        assert_eq!(tok.chat_prompt(&case.user).unwrap(), case.prompt_text);
        let without = tok.apply_chat_template(&messages, false).unwrap();
        assert_eq!(format!("{without}<|im_start|>assistant\n"), case.prompt_text);
    }
    // A system message replaces the default one.
    let messages = [ChatMessage::new("system", "S"), ChatMessage::new("user", "U")];
    assert_eq!(
        tok.apply_chat_template(&messages, false).unwrap(),
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
    );
}

#[test]
fn smollm2_special_tokens_and_vocab() {
    let Some(dir) = smollm2_dir() else { return };
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    assert_eq!(tok.eos_token_id(), Some(2));
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.pad_token_id(), Some(2));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    assert_eq!(tok.token_to_id("no such token"), None);
    assert_eq!(tok.vocab_size(), 49152);
}

#[test]
fn smollm2_decode_roundtrip() {
    let Some(dir) = smollm2_dir() else { return };
    let tok = Tokenizer::from_dir(&dir).unwrap();
    for text in [
        "Hello, world!",
        "  leading and trailing spaces \n\n",
        "Ünïcödé: naïve café, 日本語のテキスト, emoji 😀👍🏽, Ελληνικά",
        "tabs\tand\r\nnewlines",
        "<|im_start|>user\nhi<|im_end|>\n",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
    // Greedy reference output: special tokens are kept or skipped on request.
    let ids = [33, 30, 3950, 198, 34, 30, 10062, 198, 35, 30, 4910, 2];
    assert_eq!(tok.decode(&ids, false).unwrap(), "1. Red\n2. Blue\n3. Green<|im_end|>");
    assert_eq!(tok.decode(&ids, true).unwrap(), "1. Red\n2. Blue\n3. Green");
}

#[test]
fn config_special_tokens_and_template_list() {
    // tokenizer_config.json gives bos/eos as AddedToken objects, pad as a string, and the
    // template as a list from which "default" is picked.
    let tok = Tokenizer::from_dir(&fixtures().join("tiny")).unwrap();
    assert_eq!((tok.bos_token_id(), tok.eos_token_id(), tok.pad_token_id()), (Some(0), Some(1), Some(2)));
    assert_eq!(tok.encode("hello world", false).unwrap(), vec![4, 5]);
    let messages = [ChatMessage::new("user", "hi")];
    assert_eq!(tok.apply_chat_template(&messages, true).unwrap(), "<user>hi</s><assistant>");
}

#[test]
fn raise_exception_is_a_clean_error() {
    let tok = Tokenizer::from_dir(&fixtures().join("tiny")).unwrap();
    let messages = [ChatMessage::new("robot", "beep")];
    let err = tok.apply_chat_template(&messages, false).unwrap_err();
    assert!(matches!(err, TokenizerError::Template { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("Unknown role: robot") && text.contains("tokenizer_config.json"), "{text}");
}

#[test]
fn trim_and_lstrip_blocks_render_as_hf() {
    let dir = fixtures();
    let mut tok = Tokenizer::from_dir(&dir.join("tiny")).unwrap();
    let template_path = dir.join("trim_template.jinja");
    tok.set_chat_template(&std::fs::read_to_string(&template_path).unwrap(), &template_path);
    let messages: Vec<ChatMessage> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("trim_messages.json")).unwrap()).unwrap();
    let expected = std::fs::read_to_string(dir.join("trim_expected.txt")).unwrap();
    assert_eq!(tok.apply_chat_template(&messages, true).unwrap(), expected);
}

#[test]
fn template_errors_and_generation_tags() {
    let mut tok = Tokenizer::from_dir(&fixtures().join("tiny")).unwrap();
    let origin = Path::new("inline.jinja");
    // transformers' `{% generation %}` blocks render their content.
    tok.set_chat_template(
        "{% for m in messages %}{%- generation -%} {{ m.content }} {%- endgeneration %}{% endfor %}",
        origin,
    );
    assert_eq!(tok.apply_chat_template(&[ChatMessage::new("user", "x")], false).unwrap(), "x");
    // strftime_now (UTC) as HF provides it, e.g. for Llama 3 date lines.
    tok.set_chat_template("{{ strftime_now('%Y-%m-%d|%B|%b|%%') }}", origin);
    let date = tok.chat_prompt("x").unwrap();
    let parts: Vec<&str> = date.split('|').collect();
    assert_eq!(parts.len(), 4, "{date}");
    assert!(parts[0].len() == 10 && parts[0].starts_with("20"), "{date}");
    assert!(parts[1].starts_with(parts[2]) && parts[2].len() == 3 && parts[3] == "%", "{date}");
    tok.set_chat_template("{% for m in messages %}", origin);
    assert!(tok.has_chat_template());
    let err = tok.chat_prompt("x").unwrap_err().to_string();
    assert!(err.contains("inline.jinja"), "{err}");
}

#[test]
fn missing_or_corrupt_tokenizer_json_names_the_file() {
    let dir = env::scratch("tokenizer-corrupt");
    let missing = dir.join("missing");
    let err = Tokenizer::from_dir(&missing).err().unwrap();
    assert!(matches!(err, TokenizerError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains(&missing.join("tokenizer.json").display().to_string()), "{err}");

    let file = dir.join("tokenizer.json");
    std::fs::write(&file, "{\"model\": 42").unwrap();
    let err = Tokenizer::from_file(&file).err().unwrap();
    let text = err.to_string();
    assert!(matches!(err, TokenizerError::Invalid { .. }), "{err:?}");
    assert!(text.contains(&file.display().to_string()) && text.contains("tokenizers JSON"), "{text}");

    // A valid tokenizer.json beside a corrupt tokenizer_config.json: that file is named.
    std::fs::copy(fixtures().join("tiny/tokenizer.json"), &file).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), "not json").unwrap();
    let text = Tokenizer::from_dir(&dir).err().unwrap().to_string();
    assert!(text.contains("tokenizer_config.json"), "{text}");
}

#[test]
fn no_chat_template_is_an_error() {
    let dir = env::scratch("tokenizer-plain");
    std::fs::copy(fixtures().join("tiny/tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert!(!tok.has_chat_template());
    assert_eq!((tok.bos_token_id(), tok.eos_token_id()), (None, None));
    assert!(matches!(tok.chat_prompt("hi"), Err(TokenizerError::NoChatTemplate { .. })));
}
