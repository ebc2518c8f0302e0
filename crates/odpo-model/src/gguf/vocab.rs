//! The tokenizer a GGUF file describes (`tokenizer.ggml.*`), as the HF `tokenizer.json` it stands
//! for, so that a `.gguf` file alone is enough to train: no `tokenizer.json` need lie beside it.
//!
//! Two kinds of vocabulary (`tokenizer.ggml.model`) are read:
//! - `gpt2`, byte-level BPE (SmolLM, Llama 3, Qwen 2 / 3): the vocabulary and the merges as
//!   stored; the text is split before merging as llama.cpp splits it for the file's
//!   `tokenizer.ggml.pre` (`llama-vocab.cpp`). A splitter not in [`SPLITS`] is an error rather
//!   than a guess, since the wrong split gives other ids than the model was trained on.
//! - `llama`, SentencePiece BPE (Llama 2, Mistral, Gemma): spaces become `▁`, with one in front
//!   when `tokenizer.ggml.add_space_prefix` says so (by default; Gemma's files say not), and the
//!   pieces merge best score first, falling back to `<0xXX>` byte pieces; SentencePiece's merges
//!   are rebuilt from the scores (Gemma's from the pieces' order, whose scores do not follow its
//!   merges, as transformers found). As in llama.cpp and HF's legacy Llama tokenizer, the text
//!   after a special or added token gets its own `▁` in front.
//!
//! Both: control tokens (and the unknown one) are special tokens, user-defined ones are kept
//! whole; BOS / EOS are added as the file asks; the special tokens' names and the chat template
//! come along.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::{GgufError, GgufFile, GgufValue, meta_err};

/// GPT-2's split, as llama.cpp writes it (the `tokenizers` crate's `ByteLevel` pre-tokenizer
/// applies the same by itself, with a last `|\s+` that llama.cpp's gaps between matches stand for).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// Llama 3's split: letters with one leading non-letter, numbers of at most three digits.
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 2's split: Llama 3's with every digit on its own.
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Each `tokenizer.ggml.pre` of a `gpt2` vocabulary read, with llama.cpp's splits for it
/// (`llm_tokenizer_bpe`): each applied in turn to the pieces of the one before, matches and the
/// text between them both becoming pieces; `true` when GPT-2's split comes last (which the
/// `ByteLevel` pre-tokenizer applies). `default` is also what a file without the key gets.
/// (`gpt2` is no name llama.cpp knows; odpo's first GGUF writer wrote it for `gpt-2`.)
pub const SPLITS: [(&str, &[&str], bool); 9] = [
    ("gpt-2", &[], true),
    ("gpt2", &[], true),
    ("default", &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"], false),
    ("smollm", &[r"\p{N}"], true),
    ("starcoder", &[r"\p{N}"], true),
    ("llama-bpe", &[LLAMA3], false),
    ("llama3", &[LLAMA3], false),
    ("qwen2", &[QWEN2], false),
    ("deepseek-r1-qwen", &[QWEN2], false),
];

/// llama.cpp's token types.
pub(super) const NORMAL: u64 = 1;
pub(super) const UNKNOWN: u64 = 2;
pub(super) const CONTROL: u64 = 3;
pub(super) const USER_DEFINED: u64 = 4;
pub(super) const UNUSED: u64 = 5;
pub(super) const BYTE: u64 = 6;

/// What to do when a file cannot be read.
const ASK: &str = "put the model's tokenizer.json beside the file, or name one with --tokenizer";

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

/// The parts of a vocabulary both kinds share.
struct Vocab {
    tokens: Vec<String>,
    /// llama.cpp's type of each token ([`NORMAL`] where the file gives none).
    types: Vec<u64>,
}

/// The tokenizer of the GGUF file `f`.
pub fn tokenizer(f: &GgufFile) -> Result<GgufTokenizer, GgufError> {
    let path = f.path();
    let string = |key: &str| f.meta(key, "a string", |v| v.as_str().map(str::to_string));
    let model_key = "tokenizer.ggml.model";
    let model = f.required(model_key, string(model_key)?)?;
    let tokens = strings(f, "tokenizer.ggml.tokens")?;
    let types_key = "tokenizer.ggml.token_type";
    let types = f.meta(types_key, "an array of integers", |v| array(v, GgufValue::as_u64))?.unwrap_or_else(|| vec![NORMAL; tokens.len()]);
    if types.len() != tokens.len() {
        return Err(meta_err(path, types_key, format!("has {} entries for {} tokens", types.len(), tokens.len())));
    }
    let vocab = Vocab { tokens, types };

    let (model_json, pre_tokenizer, normalizer, decoder, added) = match model.as_str() {
        "gpt2" => byte_level(f, &vocab)?,
        "llama" => sentencepiece(f, &vocab)?,
        other => return Err(meta_err(path, model_key, format!("`{other}` vocabularies are not read (only `gpt2`, byte-level BPE, and `llama`, SentencePiece BPE): {ASK}"))),
    };

    let id = |key: &str| -> Result<Option<(u32, String)>, GgufError> {
        let Some(id) = f.meta(key, "an unsigned integer", GgufValue::as_u64)? else { return Ok(None) };
        match vocab.tokens.get(id as usize) {
            Some(t) => Ok(Some((id as u32, t.clone()))),
            None => Err(meta_err(path, key, format!("{id} is past the vocabulary's {} tokens", vocab.tokens.len()))),
        }
    };
    let flag = |key: &str| f.meta(key, "a boolean", |v| if let GgufValue::Bool(b) = v { Some(*b) } else { None });
    // llama.cpp's defaults: SentencePiece vocabularies add BOS, byte-level ones add nothing.
    let add_bos = flag("tokenizer.ggml.add_bos_token")?.unwrap_or(model == "llama");
    let add_eos = flag("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let ends = |add: bool, name: &str| -> Result<Vec<(u32, String)>, GgufError> {
        let key = format!("tokenizer.ggml.{name}_token_id");
        match (add, id(&key)?) {
            (false, _) => Ok(vec![]),
            (true, Some(t)) => Ok(vec![t]),
            (true, None) => Err(meta_err(path, &format!("tokenizer.ggml.add_{name}_token"), format!("is true, but the file has no `{key}`"))),
        }
    };
    let (head, tail) = (ends(add_bos, "bos")?, ends(add_eos, "eos")?);
    let special_piece = |(_, t): &(u32, String)| json!({"SpecialToken": {"id": t, "type_id": 0}});
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let single: Vec<Value> = head.iter().map(special_piece).chain([seq("A", 0)]).chain(tail.iter().map(special_piece)).collect();
    let pair: Vec<Value> = single.iter().cloned().chain(head.iter().map(special_piece)).chain([seq("B", 1)]).chain(tail.iter().map(special_piece)).collect();
    let special_tokens: serde_json::Map<String, Value> =
        head.iter().chain(&tail).map(|(id, t)| (t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}))).collect();

    let added: Vec<Value> = added
        .into_iter()
        .map(|(id, special)| {
            let t = &vocab.tokens[id];
            json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": special})
        })
        .collect();
    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens},
        "decoder": decoder,
        "model": model_json,
    });
    let mut special = Vec::new();
    for (name, key) in [("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")] {
        if let Some((_, t)) = id(&format!("tokenizer.ggml.{key}_token_id"))? {
            special.push((name, t));
        }
    }
    Ok(GgufTokenizer { tokenizer_json, special, chat_template: string("tokenizer.chat_template")? })
}

/// A vocabulary's `model`, pre-tokenizer, normalizer and decoder, and its added tokens (id, special).
type Parts = (Value, Value, Value, Value, Vec<(usize, bool)>);

/// A `gpt2` vocabulary: byte-level BPE with the file's merges.
fn byte_level(f: &GgufFile, vocab: &Vocab) -> Result<Parts, GgufError> {
    let path = f.path();
    let pre_key = "tokenizer.ggml.pre";
    let pre = f.meta(pre_key, "a string", |v| v.as_str().map(str::to_string))?.unwrap_or_else(|| "default".into());
    let Some(&(_, splits, gpt2)) = SPLITS.iter().find(|(name, ..)| *name == pre) else {
        let known: Vec<&str> = SPLITS.iter().map(|(name, ..)| *name).collect();
        return Err(meta_err(path, pre_key, format!("`{pre}` is not a text split this reader knows ({}): {ASK}", known.join(", "))));
    };
    // Byte-level vocabularies spell every byte as one printable character; a token written in
    // other characters (llama.cpp writes some added tokens as plain text) is respelled, as
    // transformers does, so that the merges can still reach it.
    let alphabet = byte_alphabet();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let spell = |t: &str| if in_alphabet(t) { t.to_string() } else { t.bytes().map(|b| alphabet[usize::from(b)]).collect() };
    let ids: serde_json::Map<String, Value> = vocab.tokens.iter().enumerate().map(|(id, t)| (spell(t), id.into())).collect();
    let merges_key = "tokenizer.ggml.merges";
    let mut merges = Vec::new();
    for (i, m) in strings(f, merges_key)?.iter().enumerate() {
        let Some((a, b)) = m.split_once(' ') else {
            return Err(meta_err(path, merges_key, format!("entry {i} (`{m}`) is not two tokens separated by a space")));
        };
        merges.push(json!([a, b]));
    }
    // A control token outside the byte alphabet is one llama.cpp mislabelled: left to the merges.
    let added = added_tokens(vocab, |t| in_alphabet(t));

    let pre_tokenizer = split_json(splits, gpt2);
    let model = json!({
        "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
        "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": ids, "merges": merges,
    });
    let decoder = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
    Ok((model, pre_tokenizer, Value::Null, decoder, added))
}

/// The `tokenizers` pre-tokenizer of a [`SPLITS`] entry.
fn split_json(splits: &[&str], gpt2: bool) -> Value {
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": gpt2});
    let regex = |r: &&str| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false});
    let mut steps: Vec<Value> = splits.iter().map(regex).collect();
    steps.push(byte_level);
    if steps.len() == 1 { steps.remove(0) } else { json!({"type": "Sequence", "pretokenizers": steps}) }
}

/// The `tokenizer.ggml.pre` whose split a byte-level tokenizer's pre-tokenizer makes, if any: the
/// inverse of [`SPLITS`] (HF's `Digits` pre-tokenizer standing for the digit split).
pub(super) fn pre_of(pre_tokenizer: &Value) -> Option<&'static str> {
    let digits = json!({"type": "Digits", "individual_digits": true});
    let mut as_split = pre_tokenizer.clone();
    if let Some(steps) = as_split.get_mut("pretokenizers").and_then(Value::as_array_mut) {
        for step in steps.iter_mut().filter(|s| **s == digits) {
            *step = json!({"type": "Split", "pattern": {"Regex": r"\p{N}"}, "behavior": "Isolated", "invert": false});
        }
    }
    SPLITS.iter().find(|(_, splits, gpt2)| split_json(splits, *gpt2) == as_split).map(|(name, ..)| *name)
}

/// A `llama` vocabulary: SentencePiece BPE with byte fallback, its merges rebuilt from the scores.
fn sentencepiece(f: &GgufFile, vocab: &Vocab) -> Result<Parts, GgufError> {
    let path = f.path();
    let arch = f.architecture()?;
    let gemma = arch.starts_with("gemma");
    let prefix_key = "tokenizer.ggml.add_space_prefix";
    let prefix = f.meta(prefix_key, "a boolean", |v| if let GgufValue::Bool(b) = v { Some(*b) } else { None })?.unwrap_or(true);
    let scores_key = "tokenizer.ggml.scores";
    let scores: Vec<f64> = if gemma {
        // Gemma's merges follow the pieces' order.
        (0..vocab.tokens.len()).map(|i| -(i as f64)).collect()
    } else {
        let s = f.meta(scores_key, "an array of numbers", |v| array(v, GgufValue::as_f64))?;
        f.required(scores_key, s)?
    };
    if scores.len() != vocab.tokens.len() {
        return Err(meta_err(path, scores_key, format!("has {} entries for {} tokens", scores.len(), vocab.tokens.len())));
    }
    // Gemma files write pieces of two or more spaces with real spaces; the text's spaces become `▁`.
    let pieces: Vec<String> = vocab
        .tokens
        .iter()
        .map(|t| if gemma && t.len() > 1 && t.chars().all(|c| c == ' ') { "▁".repeat(t.len()) } else { t.clone() })
        .collect();
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(pieces.len());
    for (id, p) in pieces.iter().enumerate() {
        ids.entry(p.as_str()).or_insert(id);
    }
    // SentencePiece merges the adjacent pair whose joint piece scores best; as ranked BPE merges,
    // that is every split of every normal piece into two pieces, best joint score first (ties as
    // transformers breaks them: longer left part, then longer right part, then the parts' ids).
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for (id, p) in pieces.iter().enumerate() {
        if vocab.types[id] != NORMAL {
            continue;
        }
        let mut local: Vec<(&str, &str)> = p
            .char_indices()
            .skip(1)
            .map(|(i, _)| p.split_at(i))
            .filter(|(l, r)| ids.contains_key(l) && ids.contains_key(r))
            .collect();
        local.sort_by_key(|(l, r)| (ids[l], ids[r]));
        merges.extend(local.into_iter().map(|(l, r)| (l, r, scores[id])));
    }
    let len = |s: &str| s.chars().count();
    merges.sort_by(|a, b| b.2.total_cmp(&a.2).then(len(b.0).cmp(&len(a.0))).then(len(b.1).cmp(&len(a.1))));
    let merges: Vec<Value> = merges.into_iter().map(|(l, r, _)| json!([l, r])).collect();
    let unk = vocab.types.iter().position(|&t| t == UNKNOWN).map(|i| pieces[i].clone());
    let added = added_tokens(vocab, |_| true);

    let vocab_json: serde_json::Map<String, Value> = pieces.iter().enumerate().rev().map(|(id, p)| (p.clone(), id.into())).collect();
    let model = json!({
        "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null, "end_of_word_suffix": null,
        "fuse_unk": true, "byte_fallback": true, "ignore_merges": false, "vocab": vocab_json, "merges": merges,
    });
    let replace = |from: &str, to: &str| json!({"type": "Replace", "pattern": {"String": from}, "content": to});
    let mut normalizers = vec![replace(" ", "▁")];
    let mut decoders = vec![replace("▁", " "), json!({"type": "ByteFallback"}), json!({"type": "Fuse"})];
    if prefix {
        normalizers.insert(0, json!({"type": "Prepend", "prepend": "▁"}));
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let normalizer = json!({"type": "Sequence", "normalizers": normalizers});
    let decoder = json!({"type": "Sequence", "decoders": decoders});
    Ok((model, Value::Null, normalizer, decoder, added))
}

/// The tokens kept whole in text: control and unknown ones (special, where `keep` takes them) and
/// user-defined ones.
fn added_tokens(vocab: &Vocab, keep: impl Fn(&str) -> bool) -> Vec<(usize, bool)> {
    vocab
        .types
        .iter()
        .enumerate()
        .filter_map(|(id, &ty)| match ty {
            CONTROL | UNKNOWN if keep(&vocab.tokens[id]) => Some((id, true)),
            USER_DEFINED => Some((id, false)),
            _ => None,
        })
        .collect()
}

/// A required array of strings.
fn strings(f: &GgufFile, key: &str) -> Result<Vec<String>, GgufError> {
    let v = f.meta(key, "an array of strings", |v| array(v, |s| s.as_str().map(str::to_string)))?;
    f.required(key, v)
}

/// An array's items through `get`, if the value is an array and every item converts.
fn array<T>(v: &GgufValue, get: impl Fn(&GgufValue) -> Option<T>) -> Option<Vec<T>> {
    match v {
        GgufValue::Array(a) => a.iter().map(get).collect(),
        _ => None,
    }
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
