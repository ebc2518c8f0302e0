//! The tokenizer a GGUF file describes (`tokenizer.ggml.*`), as the HF `tokenizer.json` it stands
//! for, so that a `.gguf` file alone is enough to train: no `tokenizer.json` need lie beside it.
//!
//! Read: byte-level BPE (`tokenizer.ggml.model` = `gpt2`: SmolLM, Llama 3, Qwen 2 / 3 and most
//! models of the last years), with the vocabulary, the merges, the control tokens (added as special
//! tokens) and the user-defined ones (added as plain tokens). The text is split before merging as
//! llama.cpp splits it for the file's `tokenizer.ggml.pre` (`llama-vocab.cpp`); a splitter not in
//! [`SPLITS`] is an error rather than a guess, since the wrong split gives other ids than the model
//! was trained on. SentencePiece vocabularies (`llama`: Llama 2, Mistral, Gemma) are not read:
//! their merges would have to be rebuilt from scores; such a file needs its `tokenizer.json`.

use serde_json::{Value, json};

use super::{GgufError, GgufFile, GgufValue, meta_err};

/// GPT-2's split (`'s|'t|... ?\p{L}+| ?\p{N}+|...`), which the `tokenizers` crate's `ByteLevel`
/// pre-tokenizer applies by itself.
const GPT2: Option<&str> = None;

/// Llama 3's split: letters with one leading non-letter, numbers of at most three digits.
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 2's split: Llama 3's with every digit on its own.
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Each `tokenizer.ggml.pre` read: a split applied first (`\p{N}`: every digit alone), then the
/// split of the second entry (`None`: GPT-2's).
pub const SPLITS: [(&str, Option<&str>, Option<&str>); 8] = [
    ("gpt2", None, GPT2),
    ("default", None, GPT2),
    ("smollm", Some(r"\p{N}"), GPT2),
    ("starcoder", Some(r"\p{N}"), GPT2),
    ("llama-bpe", None, Some(LLAMA3)),
    ("llama3", None, Some(LLAMA3)),
    ("qwen2", None, Some(QWEN2)),
    ("deepseek-r1-qwen", None, Some(QWEN2)),
];

/// llama.cpp's token types.
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;

/// A GGUF file's tokenizer, in the shapes HF's files give it.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    /// The `tokenizer.json` the file stands for.
    pub tokenizer_json: Value,
    /// The special tokens by HF name (`bos_token`, `eos_token`, `unk_token`, `pad_token`) with their text.
    pub special: Vec<(&'static str, String)>,
    /// `tokenizer.chat_template`, when the file has one.
    pub chat_template: Option<String>,
}

/// The tokenizer of the GGUF file `f`.
pub fn tokenizer(f: &GgufFile) -> Result<GgufTokenizer, GgufError> {
    let path = f.path();
    let string = |key: &str| f.meta(key, "a string", |v| v.as_str().map(str::to_string));
    let model_key = "tokenizer.ggml.model";
    let model = f.required(model_key, string(model_key)?)?;
    if model != "gpt2" {
        return Err(meta_err(
            path,
            model_key,
            format!("`{model}` vocabularies are not read (only byte-level BPE, `gpt2`): put the model's tokenizer.json beside the file, or name one with --tokenizer"),
        ));
    }
    let pre_key = "tokenizer.ggml.pre";
    let pre = string(pre_key)?.unwrap_or_else(|| "default".into());
    let Some(&(_, first, split)) = SPLITS.iter().find(|(name, ..)| *name == pre) else {
        let known: Vec<&str> = SPLITS.iter().map(|(name, ..)| *name).collect();
        return Err(meta_err(
            path,
            pre_key,
            format!("`{pre}` is not a text split this reader knows ({}): put the model's tokenizer.json beside the file, or name one with --tokenizer", known.join(", ")),
        ));
    };

    let strings = |key: &str| {
        let v = f.meta(key, "an array of strings", |v| match v {
            GgufValue::Array(a) => a.iter().map(|s| s.as_str().map(str::to_string)).collect::<Option<Vec<_>>>(),
            _ => None,
        })?;
        f.required(key, v)
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types_key = "tokenizer.ggml.token_type";
    let types = f
        .meta(types_key, "an array of integers", |v| match v {
            GgufValue::Array(a) => a.iter().map(GgufValue::as_u64).collect::<Option<Vec<_>>>(),
            _ => None,
        })?
        .unwrap_or_default();
    if !types.is_empty() && types.len() != tokens.len() {
        return Err(meta_err(path, types_key, format!("has {} entries for {} tokens", types.len(), tokens.len())));
    }

    // Byte-level vocabularies spell every byte as one printable character; a token written in
    // other characters (llama.cpp writes some added tokens as plain text) is respelled, as
    // transformers does, so that the merges can still reach it.
    let alphabet = byte_alphabet();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let spell = |t: &str| if in_alphabet(t) { t.to_string() } else { t.bytes().map(|b| alphabet[usize::from(b)]).collect() };
    let mut vocab = serde_json::Map::new();
    for (id, t) in tokens.iter().enumerate() {
        vocab.insert(spell(t), id.into());
    }
    let mut pairs = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        let Some((a, b)) = m.split_once(' ') else {
            return Err(meta_err(path, "tokenizer.ggml.merges", format!("entry {i} (`{m}`) is not two tokens separated by a space")));
        };
        pairs.push(json!([a, b]));
    }
    // Control tokens stay whole and are special; user-defined ones stay whole. A control token
    // outside the byte alphabet is one llama.cpp mislabelled, and is left to the merges.
    let added: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (t, ty))| (**ty == CONTROL && in_alphabet(t)) || **ty == USER_DEFINED)
        .map(|(id, (t, ty))| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": *ty == CONTROL})
        })
        .collect();

    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": split.is_none()});
    let mut steps: Vec<Value> = first.map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false})).into_iter().collect();
    if let Some(r) = split {
        steps.push(json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}));
    }
    steps.push(byte_level);
    let pre_tokenizer = if steps.len() == 1 { steps.remove(0) } else { json!({"type": "Sequence", "pretokenizers": steps}) };

    let id = |key: &str| -> Result<Option<(u32, String)>, GgufError> {
        let Some(id) = f.meta(key, "an unsigned integer", GgufValue::as_u64)? else { return Ok(None) };
        match tokens.get(id as usize) {
            Some(t) => Ok(Some((id as u32, t.clone()))),
            None => Err(meta_err(path, key, format!("{id} is past the vocabulary's {} tokens", tokens.len()))),
        }
    };
    let flag = |key: &str| f.meta(key, "a boolean", |v| if let GgufValue::Bool(b) = v { Some(*b) } else { None });
    let bos = id("tokenizer.ggml.bos_token_id")?;
    let eos = id("tokenizer.ggml.eos_token_id")?;
    // Byte-level vocabularies add neither unless the file says so (llama.cpp's default for `gpt2`).
    let add_bos = flag("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = flag("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let ends = |add: bool, t: &Option<(u32, String)>, key: &str| -> Result<Vec<(u32, String)>, GgufError> {
        match (add, t) {
            (false, _) => Ok(vec![]),
            (true, Some(t)) => Ok(vec![t.clone()]),
            (true, None) => Err(meta_err(path, key, "is true, but the file names no such token")),
        }
    };
    let (head, tail) = (ends(add_bos, &bos, "tokenizer.ggml.add_bos_token")?, ends(add_eos, &eos, "tokenizer.ggml.add_eos_token")?);
    let special_piece = |(_, t): &(u32, String)| json!({"SpecialToken": {"id": t, "type_id": 0}});
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let single: Vec<Value> = head.iter().map(special_piece).chain([seq("A", 0)]).chain(tail.iter().map(special_piece)).collect();
    let pair: Vec<Value> = single.iter().cloned().chain(head.iter().map(special_piece)).chain([seq("B", 1)]).chain(tail.iter().map(special_piece)).collect();
    let special_tokens: serde_json::Map<String, Value> =
        head.iter().chain(&tail).map(|(id, t)| (t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}))).collect();

    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": pairs,
        },
    });
    let mut special = Vec::new();
    for (name, key) in [("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")] {
        if let Some((_, t)) = id(&format!("tokenizer.ggml.{key}_token_id"))? {
            special.push((name, t));
        }
    }
    Ok(GgufTokenizer { tokenizer_json, special, chat_template: string("tokenizer.chat_template")? })
}

/// GPT-2's printable spelling of the 256 bytes: the printable Latin-1 characters stand for
/// themselves, the other bytes for 256, 257, ... in order.
fn byte_alphabet() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b)
            } else {
                next += 1;
                char::from_u32(next - 1)
            }
        })
        .map(|c| c.unwrap_or('\u{FFFD}'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::byte_alphabet;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let a = byte_alphabet();
        // GPT-2's well-known spellings: space is Ġ (U+0120), newline Ċ (U+010A), 'A' itself.
        assert_eq!((a[32], a[10], a[65], a[0], a[255]), ('Ġ', 'Ċ', 'A', 'Ā', 'ÿ'));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
    }
}
