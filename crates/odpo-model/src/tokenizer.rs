//! HF tokenizers and chat templates.
//!
//! [`Tokenizer`] loads a model folder's `tokenizer.json` (through the `tokenizers` crate, so
//! encoding matches HF exactly), the special tokens of `tokenizer_config.json`, and the chat
//! template (`chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`); or all three
//! from a GGUF file's metadata ([`Tokenizer::from_gguf`]). [`Tokenizer::open`] takes whichever a
//! model path holds. Templates
//! are rendered with minijinja set up like transformers' jinja2 sandbox: `trim_blocks`,
//! `lstrip_blocks`, `raise_exception`, `strftime_now`, a Python-style `tojson`, Python string
//! and dict methods, and `{% generation %}` blocks rendered as plain content.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde_json::Value as Json;

pub use crate::error::TokenizerError;
use crate::weights::write_atomic;


/// One chat turn, as in HF's `messages` list.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// Special-token names HF passes to chat templates (its `special_tokens_map`).
const SPECIAL_NAMES: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// A compiled chat template and where it came from.
struct ChatTemplate {
    path: PathBuf,
    source: String,
    env: Result<Environment<'static>, String>,
}

/// An HF tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// Special tokens by HF name (`bos_token` -> `<|im_start|>`), from tokenizer_config.json.
    special: Vec<(&'static str, String)>,
    /// Ids from config.json, used when tokenizer_config.json does not name a token.
    config_ids: [Option<u32>; 3],
    chat: Option<ChatTemplate>,
}

impl Tokenizer {
    /// The tokenizer of a model path: a folder's `tokenizer.json` ([`Tokenizer::from_dir`]); for a
    /// `.gguf` file, the `tokenizer.json` beside it when there is one, else the file's own
    /// vocabulary ([`Tokenizer::from_gguf`]); any other file as a `tokenizer.json`.
    pub fn open(path: &Path) -> Result<Self, TokenizerError> {
        if path.is_dir() {
            return Self::from_dir(path);
        }
        if !path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            return Self::from_file(path);
        }
        let beside = path.with_file_name("tokenizer.json");
        if beside.is_file() { Self::from_file(&beside) } else { Self::from_gguf(path) }
    }

    /// The tokenizer a GGUF file's metadata describes (`tokenizer.ggml.*`: byte-level and
    /// SentencePiece BPE vocabularies, see [`crate::gguf::load_tokenizer`]), with its special tokens and its
    /// `tokenizer.chat_template`.
    pub fn from_gguf(path: &Path) -> Result<Self, TokenizerError> {
        let gguf = crate::gguf::load_tokenizer(path)?;
        let bytes = serde_json::to_vec(&gguf.tokenizer_json).unwrap_or_default();
        let inner = parse_tokenizer(&bytes).map_err(|message| TokenizerError::Invalid {
            path: path.to_path_buf(),
            expected: "a vocabulary the tokenizers crate can build",
            message,
        })?;
        let mut tokenizer = Self { inner, path: path.to_path_buf(), special: gguf.special, config_ids: [None; 3], chat: None };
        if let Some(source) = &gguf.chat_template {
            tokenizer.set_chat_template(source, path);
        }
        Ok(tokenizer)
    }

    /// Writes `tokenizer.json` and a `tokenizer_config.json` naming the special tokens and holding
    /// the chat template into `dir`: the files [`Tokenizer::from_dir`] reads back.
    pub fn save(&self, dir: &Path) -> Result<(), TokenizerError> {
        let write = |path: PathBuf, text: String| {
            write_atomic(&path, text.as_bytes()).map_err(|e| TokenizerError::Write { path, message: e.to_string() })
        };
        std::fs::create_dir_all(dir).map_err(|e| TokenizerError::Write { path: dir.to_path_buf(), message: e.to_string() })?;
        let text = self.inner.to_string(false).map_err(|e| self.codec("save", e))?;
        write(dir.join("tokenizer.json"), text)?;
        let mut config: serde_json::Map<String, Json> = self.special.iter().map(|(k, v)| ((*k).to_string(), Json::from(v.as_str()))).collect();
        if let Some(chat) = &self.chat {
            config.insert("chat_template".into(), Json::from(chat.source.as_str()));
        }
        write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&config).unwrap_or_default())
    }

    /// Loads `tokenizer.json` from a model folder, with `tokenizer_config.json` (special tokens,
    /// chat_template) and `chat_template.jinja` when present.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    /// Loads a `tokenizer.json`, looking for `tokenizer_config.json` (or `special_tokens_map.json`),
    /// `chat_template.jinja` and `config.json` beside it.
    pub fn from_file(tokenizer_json: &Path) -> Result<Self, TokenizerError> {
        let path = tokenizer_json.to_path_buf();
        let bytes = std::fs::read(&path).map_err(|source| TokenizerError::Io { path: path.clone(), source })?;
        let invalid = |message: String| TokenizerError::Invalid { path: path.clone(), expected: "an HF tokenizers JSON file", message };
        let inner = parse_tokenizer(&bytes).map_err(invalid)?;
        let dir = tokenizer_json.parent().unwrap_or(Path::new("."));
        let mut config = read_json(&dir.join("tokenizer_config.json"))?;
        if config.is_none() {
            config = read_json(&dir.join("special_tokens_map.json"))?;
        }
        let special = SPECIAL_NAMES
            .iter()
            .filter_map(|&name| Some((name, token_content(config.as_ref()?.get(name)?)?)))
            .collect();
        let model_config = read_json(&dir.join("config.json"))?;
        let config_ids = ["bos_token_id", "eos_token_id", "pad_token_id"]
            .map(|key| model_config.as_ref().and_then(|c| config_id(c.get(key)?)));
        let mut tokenizer = Self { inner, path, special, config_ids, chat: None };
        // transformers lets chat_template.jinja override tokenizer_config.json's template.
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let source =
                std::fs::read_to_string(&jinja).map_err(|source| TokenizerError::Io { path: jinja.clone(), source })?;
            tokenizer.set_chat_template(&source, &jinja);
        } else if let Some(value) = config.as_ref().and_then(|c| c.get("chat_template")) {
            let config_path = dir.join("tokenizer_config.json");
            let source = default_template(value).ok_or_else(|| TokenizerError::Invalid {
                path: config_path.clone(),
                expected: "`chat_template` as a string or a list of {name, template} with a \"default\" entry",
                message: format!("found {value}"),
            })?;
            tokenizer.set_chat_template(&source, &config_path);
        }
        Ok(tokenizer)
    }

    /// Replaces the chat template (`origin` names it in errors). A template that does not
    /// compile is kept and reported by [`Tokenizer::apply_chat_template`].
    pub fn set_chat_template(&mut self, source: &str, origin: &Path) {
        let env = build_env(&hide_generation_tags(source)).map_err(|e| format!("{e:#}"));
        if let Err(message) = &env {
            tracing::warn!("chat template from {} does not compile: {message}", origin.display());
        }
        self.chat = Some(ChatTemplate { path: origin.to_path_buf(), source: source.to_string(), env });
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (BOS etc.).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self.inner.encode(text, add_special_tokens).map_err(|e| self.codec("encode", e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, dropping special tokens when `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| self.codec("decode", e))
    }

    /// Text as the tokens of one sequence come, a piece per token that completes one
    /// (tokenizers' `DecodeStream`: a token that ends inside a UTF-8 character waits for the next,
    /// and a SentencePiece word keeps its space): for printing a generation as it runs.
    pub fn decode_stream(&self, skip_special_tokens: bool) -> DecodeStream<'_> {
        DecodeStream { inner: self.inner.decode_stream(skip_special_tokens), tokenizer: self }
    }

    /// Number of token ids, added tokens included (HF's `len(tokenizer)`).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of the end-of-sequence token (tokenizer_config.json's `eos_token`, else config.json's `eos_token_id`).
    pub fn eos_token_id(&self) -> Option<u32> {
        self.special_id("eos_token", 1)
    }

    /// Id of the beginning-of-sequence token (`bos_token`, else config.json's `bos_token_id`).
    pub fn bos_token_id(&self) -> Option<u32> {
        self.special_id("bos_token", 0)
    }

    /// Id of the padding token (`pad_token`, else config.json's `pad_token_id`).
    pub fn pad_token_id(&self) -> Option<u32> {
        self.special_id("pad_token", 2)
    }

    /// Id of a token (added tokens included), if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The chat template as written (before compiling), if there is one.
    pub fn chat_template_source(&self) -> Option<&str> {
        self.chat.as_ref().map(|c| c.source.as_str())
    }

    /// Whether a chat template was found.
    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    /// Renders the chat template as HF `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` does.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let chat = self.chat.as_ref().ok_or_else(|| TokenizerError::NoChatTemplate { path: self.path.clone() })?;
        let err = |message: String| TokenizerError::Template { path: chat.path.clone(), message };
        let env = chat.env.as_ref().map_err(|m| err(m.clone()))?;
        let messages: Vec<Value> = messages.iter().map(|m| Value::from_object(Message(m.clone()))).collect();
        let mut ctx: Vec<(&str, Value)> =
            vec![("messages", Value::from(messages)), ("add_generation_prompt", Value::from(add_generation_prompt))];
        ctx.extend(self.special.iter().map(|(k, v)| (*k, Value::from(v.as_str()))));
        let template = env.get_template("chat").map_err(|e| err(format!("{e:#}")))?;
        template.render(Value::from_iter(ctx)).map_err(|e| err(format!("{e:#}")))
    }

    /// Renders a single user turn with the generation prompt (what `--chat` does on the command line).
    pub fn chat_prompt(&self, user: &str) -> Result<String, TokenizerError> {
        self.apply_chat_template(&[ChatMessage::new("user", user)], true)
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    fn special_id(&self, name: &str, config_index: usize) -> Option<u32> {
        match self.special.iter().find(|(k, _)| *k == name) {
            Some((_, token)) => self.inner.token_to_id(token).or(self.config_ids[config_index]),
            None => self.config_ids[config_index],
        }
    }

    fn codec(&self, op: &'static str, e: tokenizers::Error) -> TokenizerError {
        TokenizerError::Codec { path: self.path.clone(), op, message: e.to_string() }
    }
}

/// [`Tokenizer::decode_stream`]'s state.
pub struct DecodeStream<'a> {
    inner: tokenizers::DecodeStream<
        'a,
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >,
    tokenizer: &'a Tokenizer,
}

impl DecodeStream<'_> {
    /// The text `id` completes, or `None` while it needs the tokens after it.
    pub fn step(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.inner.step(id).map_err(|e| self.tokenizer.codec("decode", e))
    }
}

/// Reads a JSON file if it exists.
fn read_json(path: &Path) -> Result<Option<Json>, TokenizerError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map(Some).map_err(|e| TokenizerError::Invalid {
        path: path.to_path_buf(),
        expected: "a JSON object",
        message: e.to_string(),
    })
}

/// A special token given as a string or as an AddedToken object `{"content": ...}`.
fn token_content(value: &Json) -> Option<String> {
    match value {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// A token id from config.json: a number, or the first of a list.
fn config_id(value: &Json) -> Option<u32> {
    match value {
        Json::Array(a) => config_id(a.first()?),
        v => v.as_u64().and_then(|n| u32::try_from(n).ok()),
    }
}

/// tokenizer_config.json's `chat_template`: a string, or a list of `{name, template}` (pick "default").
fn default_template(value: &Json) -> Option<String> {
    match value {
        Json::String(s) => Some(s.clone()),
        Json::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
        _ => None,
    }
}

/// Rewrites transformers' `{% generation %}` / `{% endgeneration %}` (assistant-mask markers) as
/// `{% if true %}` / `{% endif %}`, keeping the whitespace-control marks.
fn hide_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else { break };
        let tag = &rest[start..start + len + 2];
        let word = tag[2..tag.len() - 2].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        match word {
            "generation" => out.push_str(&tag.replacen("generation", "if true", 1)),
            "endgeneration" => out.push_str(&tag.replacen("endgeneration", "endif", 1)),
            _ => out.push_str(tag),
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

/// A minijinja environment configured like transformers' chat-template sandbox.
fn build_env(source: &str) -> Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |message: String| -> Result<Value, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
    });
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env.add_template_owned("chat", source.to_owned())?;
    Ok(env)
}

/// A message as a template sees it: a dict whose keys iterate as `role`, `content` (Python order).
#[derive(Debug)]
struct Message(ChatMessage);

impl Object for Message {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.0.role.as_str())),
            "content" => Some(Value::from(self.0.content.as_str())),
            _ => None,
        }
    }
    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

/// HF's `tojson`: Python `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let indent = kwargs.get::<Option<Value>>("indent")?.filter(|v| !v.is_none());
    let indent = match indent {
        Some(v) if v.kind() == ValueKind::String => v.as_str().map(str::to_owned),
        Some(v) => Some(" ".repeat(usize::try_from(v)?)),
        None => None,
    };
    let separators = kwargs.get::<Option<Vec<String>>>("separators")?;
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([a, b]) => (a.clone(), b.clone()),
        Some(_) => return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "separators must be two strings")),
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let opts = JsonOpts { ensure_ascii, indent, item_sep, key_sep, sort_keys };
    let mut out = String::new();
    dump(value, &opts, 0, &mut out)?;
    Ok(Value::from(out))
}

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// A JSON string as Python writes it (`\uXXXX` escapes for non-ASCII when `ensure_ascii`).
fn json_string(s: &str, ensure_ascii: bool) -> String {
    let json = serde_json::to_string(s).unwrap_or_default();
    if !ensure_ascii {
        return json;
    }
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            c.encode_utf16(&mut [0; 2]).iter().for_each(|u| out.push_str(&format!("\\u{u:04x}")));
        }
    }
    out
}

/// Appends `value` as Python's json.dumps would write it.
fn dump(value: &Value, o: &JsonOpts, depth: usize, out: &mut String) -> Result<(), minijinja::Error> {
    let scalar = match value.kind() {
        ValueKind::Undefined | ValueKind::None => Some("null".to_owned()),
        ValueKind::Bool => Some(value.is_true().to_string()),
        ValueKind::Number => Some(value.to_string()),
        ValueKind::String => Some(json_string(value.as_str().unwrap_or_default(), o.ensure_ascii)),
        ValueKind::Map | ValueKind::Seq | ValueKind::Iterable => None,
        kind => {
            return Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("cannot serialize {kind} to JSON")));
        }
    };
    if let Some(scalar) = scalar {
        out.push_str(&scalar);
        return Ok(());
    }
    let newline = |d: usize, out: &mut String| {
        if let Some(indent) = &o.indent {
            out.push('\n');
            out.push_str(&indent.repeat(d));
        }
    };
    let is_map = value.kind() == ValueKind::Map;
    let mut items: Vec<Value> = value.try_iter()?.collect();
    if is_map && o.sort_keys {
        items.sort();
    }
    out.push(if is_map { '{' } else { '[' });
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&o.item_sep);
        }
        newline(depth + 1, out);
        if is_map {
            out.push_str(&json_string(&item.to_string(), o.ensure_ascii));
            out.push_str(&o.key_sep);
            dump(&value.get_item(item)?, o, depth + 1, out)?;
        } else {
            dump(item, o, depth + 1, out)?;
        }
    }
    if !items.is_empty() {
        newline(depth, out);
    }
    out.push(if is_map { '}' } else { ']' });
    Ok(())
}

/// HF's `strftime_now(format)`, in UTC: supports `%Y %y %m %d %B %b %H %M %S %%`.
fn strftime_now(format: String) -> String {
    const MONTHS: &str = "January February March April May June July August September October November December";
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let month_name = MONTHS.split(' ').nth((month - 1) as usize).unwrap_or_default();
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let field = match chars.next() {
            Some('Y') => year.to_string(),
            Some('y') => format!("{:02}", year % 100),
            Some('m') => format!("{month:02}"),
            Some('d') => format!("{day:02}"),
            Some('B') => month_name.to_owned(),
            Some('b') => month_name[..3].to_owned(),
            Some('H') => format!("{:02}", rem / 3600),
            Some('M') => format!("{:02}", rem / 60 % 60),
            Some('S') => format!("{:02}", rem % 60),
            Some('%') => "%".to_owned(),
            other => format!("%{}", other.map(String::from).unwrap_or_default()),
        };
        out.push_str(&field);
    }
    out
}

/// `tokenizers::Tokenizer::from_bytes`, with the panics some malformed files raise inside the
/// tokenizers crate (an `expect` in its decoder deserializer) turned into errors; the panic hook
/// is silenced meanwhile, so that the user sees one error naming the file, not a panic message.
fn parse_tokenizer(bytes: &[u8]) -> Result<tokenizers::Tokenizer, String> {
    static HOOK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = HOOK.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes));
    std::panic::set_hook(hook);
    match parsed {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(panic) => {
            let why = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_default();
            Err(format!("the tokenizers crate could not read it ({why})"))
        }
    }
}
