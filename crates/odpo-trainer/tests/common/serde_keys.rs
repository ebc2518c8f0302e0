//! Every key a serde config struct accepts, found by deserializing it from a tracing `Deserializer`:
//! each `deserialize_struct` call names its fields, each `deserialize_enum` its variants. `Option`
//! fields are followed into (so `[data.offset]`'s keys are found); an `Option` whose contents cannot be
//! traced (an internally tagged or untagged enum, which asks for `deserialize_any`) is retried as `None`.
//! Used by docs tests that check every key is documented in docs/config.md.
#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};

/// What a trace found.
#[derive(Debug, Default)]
pub struct Keys {
    /// Dotted keys, tables included (`data`, `data.offset`, `data.offset.alpha`, ...).
    pub keys: BTreeSet<String>,
    /// Enum-valued keys and their spellings.
    pub enums: BTreeMap<String, Vec<&'static str>>,
}

/// Traces `T`.
pub fn keys_of<T: DeserializeOwned>() -> Keys {
    let mut none = HashSet::new();
    for _ in 0..64 {
        let t = Trace { none: none.clone(), ..Trace::default() };
        let result = T::deserialize(De { t: &t, path: String::new() });
        match result {
            Ok(_) => return Keys { keys: t.keys.into_inner(), enums: t.enums.into_inner() },
            Err(e) => {
                let path = t.any_path.into_inner().unwrap_or_else(|| panic!("tracing failed: {e}"));
                assert!(none.insert(path.clone()), "tracing failed at `{path}`: {e}");
            }
        }
    }
    panic!("tracing did not finish");
}

#[derive(Default)]
struct Trace {
    keys: RefCell<BTreeSet<String>>,
    enums: RefCell<BTreeMap<String, Vec<&'static str>>>,
    none: HashSet<String>,
    any_path: RefCell<Option<String>>,
}

#[derive(Debug)]
pub struct Error(String);
impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Error {}
impl de::Error for Error {
    fn custom<M: fmt::Display>(msg: M) -> Self {
        Error(msg.to_string())
    }
}

struct De<'a> {
    t: &'a Trace,
    path: String,
}

impl<'a> De<'a> {
    fn child(&self, field: &str) -> De<'a> {
        let path = if self.path.is_empty() { field.to_string() } else { format!("{}.{field}", self.path) };
        De { t: self.t, path }
    }
}

macro_rules! leaf {
    ($($method:ident => $visit:ident($value:expr);)*) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            visitor.$visit($value)
        })*
    };
}

impl<'de, 'a> de::Deserializer<'de> for De<'a> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        *self.t.any_path.borrow_mut() = Some(self.path.clone());
        visitor.visit_seq(Seq { de: None, left: 0 })
    }

    leaf! {
        deserialize_bool => visit_bool(false);
        deserialize_i8 => visit_i64(1);
        deserialize_i16 => visit_i64(1);
        deserialize_i32 => visit_i64(1);
        deserialize_i64 => visit_i64(1);
        deserialize_u8 => visit_u64(1);
        deserialize_u16 => visit_u64(1);
        deserialize_u32 => visit_u64(1);
        deserialize_u64 => visit_u64(1);
        deserialize_f32 => visit_f64(0.5);
        deserialize_f64 => visit_f64(0.5);
        deserialize_char => visit_char('x');
        deserialize_str => visit_str("x");
        deserialize_string => visit_str("x");
        deserialize_bytes => visit_bytes(b"");
        deserialize_byte_buf => visit_bytes(b"");
        deserialize_identifier => visit_str("x");
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }
    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        if self.t.none.contains(&self.path) { visitor.visit_none() } else { visitor.visit_some(self) }
    }
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_seq(Seq { de: None, left: 0 })
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_seq(Seq { de: Some(self), left: len })
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(self, _name: &'static str, len: usize, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_seq(Seq { de: Some(self), left: len })
    }
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_map(Fields { de: self, fields: &[], next: 0 })
    }
    fn deserialize_struct<V: Visitor<'de>>(self, _name: &'static str, fields: &'static [&'static str], visitor: V) -> Result<V::Value, Error> {
        for f in fields {
            self.t.keys.borrow_mut().insert(self.child(f).path);
        }
        visitor.visit_map(Fields { de: self, fields, next: 0 })
    }
    fn deserialize_enum<V: Visitor<'de>>(self, _name: &'static str, variants: &'static [&'static str], visitor: V) -> Result<V::Value, Error> {
        self.t.enums.borrow_mut().insert(self.path.clone(), variants.to_vec());
        visitor.visit_enum(Enum { de: self, variant: variants[0] })
    }
}

struct Seq<'a> {
    de: Option<De<'a>>,
    left: usize,
}

impl<'de> de::SeqAccess<'de> for Seq<'_> {
    type Error = Error;
    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Error> {
        match &self.de {
            Some(de) if self.left > 0 => {
                self.left -= 1;
                seed.deserialize(De { t: de.t, path: de.path.clone() }).map(Some)
            }
            _ => Ok(None),
        }
    }
}

struct Fields<'a> {
    de: De<'a>,
    fields: &'static [&'static str],
    next: usize,
}

impl<'de> de::MapAccess<'de> for Fields<'_> {
    type Error = Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
        match self.fields.get(self.next) {
            Some(f) => seed.deserialize(IntoDeserializer::<Error>::into_deserializer(*f)).map(Some),
            None => Ok(None),
        }
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let field = self.fields[self.next];
        self.next += 1;
        seed.deserialize(self.de.child(field))
    }
}

struct Enum<'a> {
    de: De<'a>,
    variant: &'static str,
}

impl<'de, 'a> de::EnumAccess<'de> for Enum<'a> {
    type Error = Error;
    type Variant = De<'a>;
    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, De<'a>), Error> {
        let v = seed.deserialize(IntoDeserializer::<Error>::into_deserializer(self.variant))?;
        Ok((v, self.de))
    }
}

impl<'de> de::VariantAccess<'de> for De<'_> {
    type Error = Error;
    fn unit_variant(self) -> Result<(), Error> {
        Ok(())
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        seed.deserialize(self)
    }
    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_seq(Seq { de: Some(self), left: len })
    }
    fn struct_variant<V: Visitor<'de>>(self, fields: &'static [&'static str], visitor: V) -> Result<V::Value, Error> {
        visitor.visit_map(Fields { de: self, fields, next: 0 })
    }
}

/// Keys of `T` (with `prefix.` before each) that `doc` does not mention as `` `key` `` (tables may be written
/// `` `[table]` ``), and enum spellings
/// missing from the line that documents their key.
pub fn undocumented(keys: &Keys, prefix: &str, doc: &str) -> Vec<String> {
    let full = |k: &str| if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
    let mut missing = Vec::new();
    for k in &keys.keys {
        let k = full(k);
        if !doc.contains(&format!("`{k}`")) && !doc.contains(&format!("`[{k}]`")) {
            missing.push(format!("key `{k}`"));
        }
    }
    for (k, variants) in &keys.enums {
        let k = full(k);
        let Some(line) = doc.lines().find(|l| l.contains(&format!("`{k}`"))) else { continue };
        for v in variants {
            if !line.contains(v) {
                missing.push(format!("value `{v}` of `{k}` (on its line)"));
            }
        }
    }
    missing
}
