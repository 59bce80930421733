//! A JSON-like value: what plugin metadata is made of.
//!
//! It maps one to one onto `google.protobuf.Struct` (what Envoy's `dynamic_metadata` takes) and
//! onto JSON, and keeps integers apart from floats so that token counts stay exact on the wire.

use std::cell::Cell;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Metadata a plugin returns from a final call: namespace (e.g. `plugvisor.usage`) → a value,
/// normally a [`Value::Map`].
pub type Metadata = BTreeMap<String, Value>;

/// How deeply lists and maps may nest in a decoded [`Value`].
///
/// A hostile peer could otherwise send a 16 MiB frame of nested one-element lists and overflow the
/// decoder's stack, which aborts the process instead of failing one connection.
pub const MAX_VALUE_DEPTH: usize = 64;

/// A JSON-like value: null, bool, number, string, list or map.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Value {
    /// JSON `null`.
    Null,
    /// JSON `true` / `false`.
    Bool(bool),
    /// An integer (token counts, byte counts, ids).
    Int(i64),
    /// A floating-point number (milliseconds, ratios).
    Float(f64),
    /// A UTF-8 string.
    String(String),
    /// An ordered list.
    List(Vec<Value>),
    /// A map with string keys, kept in key order.
    Map(BTreeMap<String, Value>),
}

/// The derived twin of [`Value`], used only to decode. Its nested values go through
/// `Value::deserialize`, which counts depth.
#[derive(Deserialize)]
#[serde(rename = "Value")]
enum ValueRepr {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
    List(Vec<Value>),
    Map(BTreeMap<String, Value>),
}

thread_local! {
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

struct DepthGuard;

impl DepthGuard {
    fn enter() -> Option<DepthGuard> {
        DEPTH.with(|d| {
            if d.get() >= MAX_VALUE_DEPTH {
                None
            } else {
                d.set(d.get() + 1);
                Some(DepthGuard)
            }
        })
    }
}

impl Drop for DepthGuard {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get() - 1));
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let _guard = DepthGuard::enter().ok_or_else(|| {
            <D::Error as serde::de::Error>::custom(format!(
                "value nested deeper than {MAX_VALUE_DEPTH} levels"
            ))
        })?;
        Ok(match ValueRepr::deserialize(deserializer)? {
            ValueRepr::Null => Value::Null,
            ValueRepr::Bool(b) => Value::Bool(b),
            ValueRepr::Int(i) => Value::Int(i),
            ValueRepr::Float(f) => Value::Float(f),
            ValueRepr::String(s) => Value::String(s),
            ValueRepr::List(l) => Value::List(l),
            ValueRepr::Map(m) => Value::Map(m),
        })
    }
}

impl Value {
    /// A map value built from `(key, value)` pairs.
    pub fn map<K: Into<String>, I: IntoIterator<Item = (K, Value)>>(pairs: I) -> Value {
        Value::Map(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    /// The entry `key` if this is a map that has it.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(m) => m.get(key),
            _ => None,
        }
    }

    /// This value as an `i64`, if it is an integer (or a float with an exact integer value).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::Int(i) => Some(i),
            Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 => {
                Some(f as i64)
            }
            _ => None,
        }
    }

    /// This value as an `f64`, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Int(i) => Some(i as f64),
            Value::Float(f) => Some(f),
            _ => None,
        }
    }

    /// This value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}
impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}
impl From<u64> for Value {
    fn from(u: u64) -> Self {
        i64::try_from(u).map_or(Value::Float(u as f64), Value::Int)
    }
}
impl From<u32> for Value {
    fn from(u: u32) -> Self {
        Value::Int(u.into())
    }
}
impl From<f64> for Value {
    fn from(f: f64) -> Self {
        Value::Float(f)
    }
}
impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.to_owned())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::String(s)
    }
}
impl<T: Into<Value>> From<Vec<T>> for Value {
    fn from(v: Vec<T>) -> Self {
        Value::List(v.into_iter().map(Into::into).collect())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

impl From<serde_json::Value> for Value {
    /// JSON integers that fit `i64` become [`Value::Int`]; larger ones and fractions become
    /// [`Value::Float`].
    fn from(json: serde_json::Value) -> Self {
        match json {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::String(s),
            serde_json::Value::Array(a) => Value::List(a.into_iter().map(Value::from).collect()),
            serde_json::Value::Object(o) => {
                Value::Map(o.into_iter().map(|(k, v)| (k, Value::from(v))).collect())
            }
        }
    }
}

impl From<Value> for serde_json::Value {
    /// Non-finite floats (NaN, ±inf) have no JSON form and become `null`.
    fn from(v: Value) -> Self {
        match v {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(b),
            Value::Int(i) => serde_json::Value::from(i),
            Value::Float(f) => serde_json::Number::from_f64(f)
                .map_or(serde_json::Value::Null, serde_json::Value::Number),
            Value::String(s) => serde_json::Value::String(s),
            Value::List(l) => serde_json::Value::Array(l.into_iter().map(Into::into).collect()),
            Value::Map(m) => {
                serde_json::Value::Object(m.into_iter().map(|(k, v)| (k, v.into())).collect())
            }
        }
    }
}

impl std::fmt::Display for Value {
    /// Formats the value as compact JSON.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", serde_json::Value::from(self.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_round_trip_keeps_integers_exact() {
        let j = json!({"prompt_tokens": 12, "big": 18446744073709551615u64, "ms": 1.5,
                       "model": "m", "list": [null, true], "nested": {"a": {}}});
        let v = Value::from(j.clone());
        assert_eq!(v.get("prompt_tokens"), Some(&Value::Int(12)));
        assert_eq!(v.get("big"), Some(&Value::Float(18446744073709551615.0)));
        let back = serde_json::Value::from(v);
        assert_eq!(back["prompt_tokens"], json!(12));
        assert_eq!(back["list"], json!([null, true]));
        assert_eq!(back["nested"], json!({"a": {}}));
    }

    #[test]
    fn non_finite_floats_become_json_null() {
        assert_eq!(serde_json::Value::from(Value::Float(f64::NAN)), json!(null));
        assert_eq!(
            serde_json::Value::from(Value::Float(f64::INFINITY)),
            json!(null)
        );
    }

    #[test]
    fn display_is_compact_json() {
        let v = Value::map([("a", Value::Int(1)), ("b", Value::from("x"))]);
        assert_eq!(v.to_string(), r#"{"a":1,"b":"x"}"#);
    }
}
